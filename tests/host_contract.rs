//! The custom-handler contract (design §1), proven by POSTing exactly what the Functions host posts.

mod common;

use common::{heartbeat_event, now_rfc3339, scale_set_id, spawn_app, TestApp};
use serde_json::{json, Value};
use std::process::Command;
use time::{Duration, OffsetDateTime};

fn assert_host_shape(answer: &Value) {
    for key in ["Outputs", "Logs", "ReturnValue"] {
        assert!(answer.get(key).is_some(), "answer lacks {key}: {answer}");
    }
    assert!(
        answer["Logs"].as_array().is_some_and(|l| !l.is_empty()),
        "{answer}"
    );
}

/// A mirrored 3-instance scale set `web`; returns the app and the vmId of instance 1.
async fn mirrored_app() -> (TestApp, String) {
    let app = spawn_app().scale_set("web", 3).start().await;
    let (status, _) = app.invoke_timer("monitor-state").await;
    assert_eq!(status, 200);
    let vm_id = app.vm("web", 1).await["vm_id"]
        .as_str()
        .unwrap()
        .to_string();
    (app, vm_id)
}

/// As [`mirrored_app`], with `web` still migrating from Prunella: its operator accepts computer
/// names as proof (`[DOWN_PROOF=name]`).
async fn migrating_app() -> TestApp {
    let app = spawn_app()
        .scale_set("web", 3)
        .env(
            "HEALER_SCALE_SETS",
            &format!("{}[DOWN_PROOF=name]", scale_set_id("web")),
        )
        .start()
        .await;
    let (status, _) = app.invoke_timer("monitor-state").await;
    assert_eq!(status, 200);
    app
}

/// Instance 1 of `web` reports UP now.
async fn deliver_up(app: &TestApp, vm_id: &str) -> (u16, Value) {
    app.deliver_event(heartbeat_event(
        "web",
        1,
        vm_id,
        "UP",
        &now_rfc3339(Duration::ZERO),
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_timers_and_routing_errors() {
    let app = spawn_app().scale_set("web", 2).start().await;
    let ready = app
        .http
        .get(format!("{}/", app.handler_url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.headers()["content-type"], "application/json");

    for function in ["monitor-status", "monitor-state"] {
        let (status, answer) = app.invoke_timer(function).await;
        assert_eq!(status, 200, "{function}: {answer}");
        assert_host_shape(&answer);
    }
    // First run: ScheduleStatus is null; a late run is past due.
    let first_run = json!({"Data": {"timer": {"Schedule": {"AdjustForDST": true}, "ScheduleStatus": null, "IsPastDue": true}},
        "Metadata": {"sys": {"MethodName": "monitor-state", "UtcNow": now_rfc3339(Duration::ZERO), "RandGuid": "x"}}});
    let (status, answer) = app.post_raw("monitor-state", first_run.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    assert_host_shape(&answer);

    // Nothing a retry could mend is answered non-2xx: the host would fail the invocation (and
    // Event Grid redeliver it for a day). It is answered 200, with the reason, and counted.
    let (status, answer) = app.post_raw("monitor-nothing", "{}".into()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["ReturnValue"]["reason"], "unknown_function",
        "{answer}"
    );
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("monitor-nothing"),
        "{answer}"
    );
    assert_host_shape(&answer);

    for (body, needle) in [
        ("{not json", "not a host invocation"),
        ("[1,2]", "not a host invocation"),
        (r#"{"Data": 5}"#, "not a host invocation"),
        (r#"{"Data": {}}"#, "no Data.timer"),
        (r#"{"Data": {"timer": "soon"}}"#, "not a JSON object"),
    ] {
        let (status, answer) = app.post_raw("monitor-status", body.into()).await;
        assert_eq!(status, 200, "{body}: {answer}");
        assert_eq!(
            (
                &answer["ReturnValue"]["accepted"],
                &answer["ReturnValue"]["reason"]
            ),
            (&json!(false), &json!("bad_invocation")),
            "{body}: {answer}"
        );
        assert!(
            answer["error"].as_str().unwrap().contains(needle),
            "{body}: {answer}"
        );
        assert_host_shape(&answer);
    }
    let (status, answer) = app
        .post_raw("monitor-events", r#"{"Data": {}}"#.into())
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["ReturnValue"]["reason"], "bad_invocation");
    assert!(
        answer["ReturnValue"]["failed_total"].as_u64().unwrap() >= 6,
        "each is counted: {answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_no_retry_can_mend_is_answered_2xx_with_its_reason() {
    let (mut app, vm_id) = mirrored_app().await;
    // Storage refuses our key (403): not unreachable, not throttled — a redelivery cannot help.
    let wrong_key = app
        .azurite
        .connection_string()
        .split(';')
        .map(|part| match part.split_once('=') {
            Some(("AccountKey", _)) => {
                "AccountKey=d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk=".to_string()
            }
            _ => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(";");
    app.restart_handler(&[("HEALER_STORAGE", &wrong_key)]);
    let (code, answer) = deliver_up(&app, &vm_id).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["ReturnValue"]["reason"], "internal", "{answer}");
    assert!(
        answer["ReturnValue"]["detail"]
            .as_str()
            .unwrap()
            .contains("403"),
        "{answer}"
    );
    assert_host_shape(&answer);
    let (code, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["ReturnValue"]["failed_total"], 2, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_as_objects_strings_and_in_both_schemas() {
    let (app, vm_id) = mirrored_app().await;
    let set = TestApp::scale_set("web");
    let mut second = 0;
    let mut next_time = || {
        second += 1;
        now_rfc3339(Duration::seconds(second - 10))
    };

    let as_object = heartbeat_event("web", 1, &vm_id, "UP", &next_time());
    let as_string =
        Value::String(heartbeat_event("web", 1, &vm_id, "DOWN", &next_time()).to_string());
    let twice = Value::String(
        Value::String(heartbeat_event("web", 1, &vm_id, "up", &next_time()).to_string())
            .to_string(),
    );
    let cloud = json!({"specversion": "1.0", "id": "ce-1", "source": "/topics/heartbeats", "type": "VmssHealer.Heartbeat",
        "subject": format!("{}/virtualMachines/1", scale_set_id("web")), "time": next_time(),
        "data": {"status": "MAINTENANCE", "until": now_rfc3339(Duration::hours(1)), "vmId": vm_id, "sequence": 9}});
    for (name, event, status) in [
        ("object", as_object, "UP"),
        ("string", as_string, "DOWN"),
        ("twice", twice, "UP"),
        ("cloudevents", cloud, "MAINTENANCE"),
    ] {
        let (code, answer) = app.deliver_event(event).await;
        assert_eq!(code, 200, "{name}: {answer}");
        assert_host_shape(&answer);
        assert_eq!(
            answer["ReturnValue"]["stored"],
            json!(true),
            "{name}: {answer}"
        );
        let stored = app
            .store
            .heartbeat(&set, "1")
            .await
            .unwrap()
            .unwrap()
            .heartbeat;
        assert_eq!(stored.status.label(), status, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_spoofed_stale_and_foreign_heartbeats_are_answered_2xx_and_change_nothing() {
    let (app, vm_id) = mirrored_app().await;
    let set = TestApp::scale_set("web");
    let good = heartbeat_event("web", 1, &vm_id, "UP", &now_rfc3339(Duration::seconds(-5)));
    assert_eq!(
        app.deliver_event(good).await.1["ReturnValue"]["stored"],
        json!(true)
    );
    let before = app
        .store
        .heartbeat(&set, "1")
        .await
        .unwrap()
        .unwrap()
        .heartbeat;

    let mut sleepy = heartbeat_event("web", 1, &vm_id, "SLEEPY", &now_rfc3339(Duration::ZERO));
    let spoof = heartbeat_event(
        "web",
        1,
        "not-the-vm-id",
        "DOWN",
        &now_rfc3339(Duration::ZERO),
    );
    let stale = heartbeat_event(
        "web",
        1,
        &vm_id,
        "DOWN",
        &now_rfc3339(Duration::minutes(-5)),
    );
    let unknown_instance = heartbeat_event("web", 77, &vm_id, "DOWN", &now_rfc3339(Duration::ZERO));
    let mut foreign = heartbeat_event("web", 1, &vm_id, "DOWN", &now_rfc3339(Duration::ZERO));
    foreign["subject"] = json!(format!("{}/virtualMachines/1", scale_set_id("not-watched")));
    let not_json = Value::String("{broken".into());
    let other_type = json!({"id": "x", "eventType": "Contoso.Other", "subject": "s", "eventTime": now_rfc3339(Duration::ZERO), "data": {}});
    sleepy["data"]["detail"] = json!("agent confused");

    for (name, event, reason) in [
        ("unknown status", sleepy, Some("unknown_status")),
        ("spoofed vmId", spoof, Some("vm_id_mismatch")),
        (
            "unknown instance",
            unknown_instance,
            Some("unknown_instance"),
        ),
        ("unwatched scale set", foreign, Some("unknown_scale_set")),
        ("not JSON", not_json, Some("bad_envelope")),
        ("other event type", other_type, Some("unknown_event_type")),
        ("older than stored", stale, None),
    ] {
        let (code, answer) = app.deliver_event(event).await;
        assert_eq!(
            code, 200,
            "{name}: permanent problems are not retried: {answer}"
        );
        assert_host_shape(&answer);
        match reason {
            Some(r) => {
                assert_eq!(
                    answer["ReturnValue"]["accepted"],
                    json!(false),
                    "{name}: {answer}"
                );
                assert_eq!(
                    answer["ReturnValue"]["reason"],
                    json!(r),
                    "{name}: {answer}"
                );
                assert!(
                    answer["Logs"][0]
                        .as_str()
                        .unwrap()
                        .starts_with("rejected: "),
                    "{name}: {answer}"
                );
            }
            None => assert_eq!(
                answer["ReturnValue"]["stored"],
                json!(false),
                "{name}: {answer}"
            ),
        }
        let after = app
            .store
            .heartbeat(&set, "1")
            .await
            .unwrap()
            .unwrap()
            .heartbeat;
        assert_eq!(after, before, "{name} must not change the stored heartbeat");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prunella_heartbeats_are_accepted_by_computer_name_only_where_names_are_proof() {
    let (default, _) = mirrored_app().await;
    let name = default.vm("web", 2).await["computer_name"]
        .as_str()
        .unwrap()
        .to_string();
    let refused = json!({"id": "p0", "eventType": "prunella-status", "subject": scale_set_id("web"),
        "eventTime": now_rfc3339(Duration::ZERO), "data": {"name": name, "status": "UP"}});
    let (code, answer) = default.deliver_event(refused).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(
        answer["ReturnValue"]["reason"], "insufficient_proof",
        "{answer}"
    );
    assert!(
        answer["ReturnValue"]["detail"]
            .as_str()
            .unwrap()
            .contains("[DOWN_PROOF=name]"),
        "the answer says how to accept them: {answer}"
    );
    drop(default);

    let app = migrating_app().await;
    let name = app.vm("web", 2).await["computer_name"]
        .as_str()
        .unwrap()
        .to_uppercase();
    let event = |computer: &str| {
        json!({"id": "p1", "eventType": "prunella-status", "subject": scale_set_id("web"),
            "eventTime": now_rfc3339(Duration::ZERO), "dataVersion": "1", "data": {"name": computer, "status": "DOWN"}})
    };
    let (code, answer) = app.deliver_event(event(&name)).await;
    assert_eq!(
        (code, answer["ReturnValue"]["stored"].clone()),
        (200, json!(true)),
        "{answer}"
    );
    let stored = app.stored_heartbeat("web", "2").await;
    assert_eq!(stored.status.label(), "DOWN");
    // A name whose suffix points at instance 2 but whose prefix is wrong is not trusted.
    let forged = format!("evil{}", &name[name.len() - 6..]);
    let (_, answer) = app.deliver_event(event(&forged)).await;
    assert_eq!(
        answer["ReturnValue"]["reason"],
        json!("computer_name_mismatch"),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_deeply_nested_deliveries_are_answered_2xx_and_counted() {
    let (app, vm_id) = mirrored_app().await;
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let nested = format!(
        r#"{{"Data": {{"event": {{"id": "e", "eventType": "VmssHealer.Heartbeat", "subject": "x", "data": {deep}}}}}, "Metadata": {{}}}}"#
    );
    let huge = json!({"Data": {"event": heartbeat_event("web", 1, &vm_id, "UP", &now_rfc3339(Duration::ZERO))},
        "Metadata": {"padding": "x".repeat(5 << 20)}})
    .to_string();
    // As the host double-encodes strings: the nesting inside a string-encoded event.
    let encoded = json!({"Data": {"event": format!(r#"{{"id": "e", "eventType": "t", "data": {deep}}}"#)}, "Metadata": {}})
        .to_string();
    for (name, body) in [
        ("nested", nested),
        ("over 4 MB", huge),
        ("nested in a string", encoded),
    ] {
        let (status, answer) = app.post_raw("monitor-events", body).await;
        assert_eq!(status, 200, "{name}: {answer}");
        assert_eq!(
            answer["ReturnValue"]["accepted"],
            json!(false),
            "{name}: {answer}"
        );
        assert_host_shape(&answer);
    }
    let stored = app
        .store
        .heartbeat(&TestApp::scale_set("web"), "1")
        .await
        .unwrap();
    assert!(stored.is_none(), "nothing was stored: {stored:?}");
}

/// What the Prunella sample's own agent (`samples/vmss/scripts/hosts/announcer.sh` in
/// primegonzola/prunella) publishes, unchanged: `"id": "$RANDOM"`, no `dataVersion`, and
/// `"eventTime": "$(date +%Y-%m-%dT%H:%M:%S%z)"` — an ISO 8601 offset without a colon.
fn prunella_announcer_event(host_id: &str, host_name: &str, random: u16) -> Value {
    let event_time = OffsetDateTime::now_utc()
        .to_offset(time::macros::offset!(+1))
        .format(time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second][offset_hour sign:mandatory][offset_minute]"
        ))
        .unwrap();
    let payload = format!(
        r#"{{
    "id": "{random}",
    "eventType": "prunella-status",
    "subject": "{host_id}",
    "eventTime": "{event_time}",
    "data": {{
        "type": "web",
        "category": "standalone-vmss",
        "name": "{host_name}",
        "status": "UP",
        "data": {{
            "ipAddress": "10.0.0.5"
        }} 
    }}
}}"#
    );
    serde_json::from_str(&payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prunella_samples_own_agent_payload_is_accepted_as_it_is() {
    let app = migrating_app().await;
    let name = app.vm("web", 1).await["computer_name"]
        .as_str()
        .unwrap()
        .to_string();
    let event = prunella_announcer_event(&scale_set_id("web"), &name, 20_417);
    assert!(
        event["eventTime"].as_str().unwrap().ends_with("+0100"),
        "{event}"
    );
    let (code, answer) = app.deliver_event(event.clone()).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["ReturnValue"]["stored"], json!(true), "{answer}");
    let stored = app.stored_heartbeat("web", "1").await;
    assert_eq!(stored.status.label(), "UP");
    let sent = event["eventTime"].as_str().unwrap();
    assert_eq!(
        stored.event_time.to_offset(time::UtcOffset::UTC).hour(),
        (sent[11..13].parse::<u8>().unwrap() + 23) % 24,
        "the offset is honoured: {sent} is an hour ahead of UTC"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_lost_under_a_running_handler_are_recreated_on_demand() {
    let (app, vm_id) = mirrored_app().await;
    // Someone (or a storage restore) drops the heartbeats table while the handler runs.
    let tables = azure_data_tables::clients::TableServiceClientBuilder::with_location(
        azure_storage::CloudLocation::Custom {
            account: "devstoreaccount1".into(),
            uri: app.azurite.table_endpoint(),
        },
        azure_storage::StorageCredentials::emulator(),
    )
    .build();
    tables
        .table_client("heartbeats")
        .delete()
        .await
        .expect("drop the table");
    // The delivery that meets the missing table is worth a retry: 503, and the table comes back.
    let (code, answer) = deliver_up(&app, &vm_id).await;
    assert_eq!(code, 503, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("heartbeats"),
        "{answer}"
    );
    let (code, answer) = deliver_up(&app, &vm_id).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["ReturnValue"]["stored"], json!(true), "{answer}");
    // Timer passes recover the same way.
    let (code, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(code, 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_down_answers_503_so_event_grid_redelivers() {
    let (mut app, vm_id) = mirrored_app().await;
    app.azurite.stop();
    let (code, answer) = deliver_up(&app, &vm_id).await;
    assert_eq!(code, 503, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("unavailable"),
        "{answer}"
    );
    assert_host_shape(&answer);
    let (code, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(code, 503, "{answer}");
}

#[test]
fn a_bad_configuration_exits_listing_every_problem() {
    let out = Command::new(env!("CARGO_BIN_EXE_handler"))
        .env_clear()
        .env("HEALER_HEARTBEAT_TIMEOUT", "soon")
        .env("HEALER_MAX_PARALLEL", "0%")
        .env("HEALER_REPAIR_ACTIONS", "reboot")
        .output()
        .expect("run handler");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "HEALER_SCALE_SETS is required",
        "no table storage configured",
        "HEALER_HEARTBEAT_TIMEOUT",
        "HEALER_MAX_PARALLEL",
        "reboot",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
    assert!(stderr.contains("5 problems"), "{stderr}");
}
