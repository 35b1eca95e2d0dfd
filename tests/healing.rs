//! End to end: Azurite + Compute simulator + handler, driven as the Functions host drives it.

mod common;

use common::{now_rfc3339, spawn_app, Mode, TestApp};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use time::{Duration, OffsetDateTime};
use vmss_healer::journal::EntryKind;

fn mutating(calls: &[Value]) -> Vec<&Value> {
    calls.iter().filter(|c| c["method"] != "GET").collect()
}

in_both_modes!(
    a_down_and_a_silent_instance_are_deleted_and_the_rest_untouched,
    a_restart_that_works_closes_the_incident_as_recovered,
    a_throttled_repair_is_journaled_held_until_retry_after_and_then_carried_out,
);

async fn a_down_and_a_silent_instance_are_deleted_and_the_rest_untouched(mode: Mode) {
    let app = spawn_app()
        .mode(mode)
        .scale_set("web", 20)
        .page_size(7)
        .env("HEALER_REPAIR_ACTIONS", "delete")
        .start()
        .await;
    let set = TestApp::scale_set("web");

    // The mirror follows nextLink across all three pages.
    let (status, answer) = app.invoke_timer("monitor-state").await;
    assert_eq!(status, 200, "{answer}");
    let (mirror, _) = app.store.mirror(&set).await.unwrap();
    assert_eq!(mirror.len(), 20);
    let lists = app
        .compute_calls()
        .await
        .iter()
        .filter(|c| {
            c["method"] == "GET" && c["path"].as_str().unwrap().ends_with("/virtualMachines")
        })
        .count();
    assert_eq!(lists, 3, "20 instances at 7 per page is three list calls");

    // Instance 5 reports DOWN; instance 9 hangs: its last heartbeat is ten minutes old.
    app.break_vm("web", 5, json!({"beat": "down"})).await;
    app.break_vm("web", 9, json!({"beat": "silent"})).await;
    let old = app
        .heartbeat_of("web", 9, "UP", &now_rfc3339(Duration::minutes(-10)))
        .await;
    let (status, answer) = app.deliver_event(old).await;
    assert_eq!(
        (status, answer["ReturnValue"]["stored"].clone()),
        (200, json!(true)),
        "{answer}"
    );
    let (five, nine) = (app.key_of("web", 5).await, app.key_of("web", 9).await);
    let round = app.heartbeat_round().await;
    assert_eq!(round, json!({"sent": 19, "failed": 0}));
    let (beats, _) = app.store.heartbeats(&set).await.unwrap();
    assert_eq!(beats.len(), 20);

    app.clear_compute_calls().await;
    let (status, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["repairs_requested"],
        json!(2),
        "{answer}"
    );

    // One batched delete naming exactly the two instances; nothing else was changed.
    let calls = app.compute_calls().await;
    let writes = mutating(&calls);
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert!(writes[0]["path"]
        .as_str()
        .unwrap()
        .ends_with("/virtualMachineScaleSets/web/delete"));
    let fleet = app.fleet("web").await;
    let remaining: BTreeSet<u64> = fleet["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["instance_id"].as_u64().unwrap())
        .collect();
    let expected: BTreeSet<u64> = (0..20).filter(|i| *i != 5 && *i != 9).collect();
    assert_eq!(remaining, expected);
    assert!(fleet["vms"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v["provisioning_state"] == "Succeeded"));

    // The journal says what was done and why.
    let (journal, _) = app.recent_journal(&set).await;
    let repairs: Vec<_> = journal
        .iter()
        .filter(|e| e.kind == EntryKind::Repair)
        .collect();
    assert_eq!(repairs.len(), 2);
    let down = repairs.iter().find(|e| e.instance_id == five).unwrap();
    assert_eq!(down.outcome, "requested");
    assert!(down.reason.contains("reported DOWN"), "{}", down.reason);
    let silent = repairs.iter().find(|e| e.instance_id == nine).unwrap();
    assert!(
        silent.reason.contains("no heartbeat for"),
        "{}",
        silent.reason
    );
    assert_eq!(silent.evidence["verdict"]["reason"], "silent");

    // The next passes see the instances gone and close both incidents; nothing more is repaired.
    app.invoke_timer("monitor-state").await;
    let (mirror, _) = app.store.mirror(&set).await.unwrap();
    assert_eq!(mirror.len(), 18);
    app.clear_compute_calls().await;
    let (_, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["repairs_requested"],
        json!(0),
        "{answer}"
    );
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["outcomes"],
        json!(2),
        "{answer}"
    );
    assert!(mutating(&app.compute_calls().await).is_empty());
    let (journal, _) = app.recent_journal(&set).await;
    let outcomes: BTreeSet<(&str, &str)> = journal
        .iter()
        .filter(|e| e.kind == EntryKind::Outcome)
        .map(|e| (e.instance_id.as_str(), e.outcome.as_str()))
        .collect();
    assert_eq!(
        outcomes,
        BTreeSet::from([(five.as_str(), "deleted"), (nine.as_str(), "deleted")])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_status_calls_the_compute_api_only_to_act() {
    let app = spawn_app().scale_set("api", 5).start().await;
    app.invoke_timer("monitor-state").await;
    app.heartbeat_round().await;
    app.clear_compute_calls().await;
    let (status, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["healthy"],
        json!(5),
        "{answer}"
    );
    assert!(
        app.compute_calls().await.is_empty(),
        "a healthy fleet costs no Compute call"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_keeps_the_mirror_and_is_carried_to_later_passes() {
    let app = spawn_app().scale_set("web", 4).start().await;
    let set = TestApp::scale_set("web");
    app.invoke_timer("monitor-state").await;
    app.inject_fault(
        json!({"status": 429, "retryAfter": 1200, "pathContains": "/virtualMachines"}),
    )
    .await;

    let (status, answer) = app.invoke_timer("monitor-state").await;
    assert_eq!(
        status, 200,
        "throttling is reported, not retried inside the call: {answer}"
    );
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["outcome"],
        "throttled"
    );
    let record = app.store.scale_set(&set).await.unwrap().unwrap();
    let until = record.throttled_until.expect("throttle recorded");
    assert!(
        until > OffsetDateTime::now_utc() + Duration::minutes(19),
        "Retry-After honoured: {until}"
    );
    assert_eq!(
        app.store.mirror(&set).await.unwrap().0.len(),
        4,
        "the mirror kept its last state"
    );

    // The next pass does not call the Compute API at all until the throttle expires.
    app.clear_compute_calls().await;
    let (_, answer) = app.invoke_timer("monitor-state").await;
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["outcome"],
        "throttled"
    );
    assert!(app.compute_calls().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_instances_and_deleted_scale_sets_leave_the_mirror() {
    // The deployed default: between full reads only announced changes are read.
    let app = spawn_app()
        .scale_set("web", 6)
        .env("HEALER_FULL_RESYNC", "1h")
        .start()
        .await;
    let set = TestApp::scale_set("web");
    app.invoke_timer("monitor-state").await;
    app.heartbeat_round().await;
    let before = app.stored_heartbeat("web", "2").await;

    // Issue 12 item 9: a Resource Manager event is a reason to read again, not the truth. One
    // that says instance 2 was deleted (forged: it was not) removes nothing — a removed instance
    // would be re-mirrored with no heartbeat and replaced as never having reported.
    let event = json!({"id": "rm-1", "topic": "/subscriptions/x/resourceGroups/rg-fleet",
        "subject": format!("{}/virtualMachines/2", common::scale_set_id("web")),
        "eventType": "Microsoft.Resources.ResourceDeleteSuccess", "eventTime": now_rfc3339(Duration::ZERO),
        "data": {"resourceUri": format!("{}/virtualMachines/2", common::scale_set_id("web")),
                 "operationName": "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/delete"},
        "dataVersion": "2", "metadataVersion": "1"});
    let (status, answer) = app.deliver_event(event).await;
    assert_eq!(status, 200, "{answer}");
    assert!(app
        .store
        .mirrored_instance(&set, "2")
        .await
        .unwrap()
        .is_some());
    assert_eq!(app.stored_heartbeat("web", "2").await, before);
    let (_, answer) = app.invoke_timer("monitor-state").await;
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["read"], "changed",
        "the event has the set read at once: {answer}"
    );
    assert_eq!(app.store.mirror(&set).await.unwrap().0.len(), 6);
    assert_eq!(app.stored_heartbeat("web", "2").await, before);

    // Scale-in in the simulator: its Resource Manager event has the next sync read the set, which
    // drops what is gone.
    app.set_capacity("web", 3).await;
    assert_eq!(app.resource_events().await, 1);
    let (_, answer) = app.invoke_timer("monitor-state").await;
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["read"], "changed",
        "{answer}"
    );
    assert_eq!(app.store.mirror(&set).await.unwrap().0.len(), 3);

    // A deleted scale set empties its mirror and says so on its row.
    app.delete_scale_set("web").await;
    assert_eq!(app.resource_events().await, 1);
    let (_, answer) = app.invoke_timer("monitor-state").await;
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["outcome"], "not_found",
        "{answer}"
    );
    assert!(app.store.mirror(&set).await.unwrap().0.is_empty());
    assert!(!app.store.scale_set(&set).await.unwrap().unwrap().exists);
}

async fn a_restart_that_works_closes_the_incident_as_recovered(mode: Mode) {
    let app = spawn_app()
        .mode(mode)
        .scale_set("web", 3)
        .env("HEALER_REPAIR_ACTIONS", "restart,replace")
        .start()
        .await;
    let set = TestApp::scale_set("web");
    app.sync_and_break("web", 1, json!({"beat": "down"})).await;

    let (_, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["repairs_requested"],
        json!(1),
        "{answer}"
    );
    let calls = app.compute_calls().await;
    let writes = mutating(&calls);
    assert_eq!(writes.len(), 1);
    // Uniform: the scale set's batch restart; Flexible: the VM's own.
    let one = app.key_of("web", 1).await;
    let restarted = match mode {
        Mode::Uniform => "/virtualMachineScaleSets/web/restart".to_string(),
        Mode::Flexible => format!("/virtualMachines/{one}/restart"),
    };
    assert!(
        writes[0]["path"]
            .as_str()
            .unwrap()
            .to_ascii_lowercase()
            .ends_with(&restarted.to_ascii_lowercase()),
        "{writes:?}"
    );
    assert_eq!(
        app.vm("web", 1).await["beat"],
        "up",
        "the simulated restart cleared the soft fault"
    );

    // While the restarted VM has not reported yet, the repair is in flight: nothing is repeated.
    let (_, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["repairs_requested"],
        json!(0),
        "{answer}"
    );

    // Its next heartbeat is UP: the incident closes as recovered.
    app.heartbeat_round().await;
    let (_, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["outcomes"],
        json!(1),
        "{answer}"
    );
    let (journal, _) = app.recent_journal(&set).await;
    let outcome = journal
        .iter()
        .find(|e| e.kind == EntryKind::Outcome)
        .expect("an outcome row");
    assert_eq!(
        (outcome.instance_id.as_str(), outcome.outcome.as_str()),
        (one.as_str(), "recovered")
    );
    let repair = journal
        .iter()
        .find(|e| e.kind == EntryKind::Repair)
        .unwrap();
    assert_eq!(
        outcome.incident, repair.incident,
        "one incident from repair to outcome"
    );
    // The operator sees which mode the scale set is in.
    let (code, out, err) = app.cli(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("({})", mode.as_str())), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_journals_the_decision_and_calls_nothing() {
    let app = spawn_app()
        .scale_set("web", 3)
        .env("HEALER_DRY_RUN", "true")
        .start()
        .await;
    let set = TestApp::scale_set("web");
    app.sync_and_break("web", 0, json!({"beat": "down"})).await;
    let (_, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(answer["ReturnValue"]["dry_run"], json!(true));
    assert!(app.compute_calls().await.is_empty());
    let (journal, _) = app.recent_journal(&set).await;
    assert_eq!(journal.len(), 1);
    assert_eq!(
        (journal[0].outcome.as_str(), journal[0].dry_run),
        ("dry_run", true)
    );
    assert_eq!(app.fleet("web").await["capacity"], json!(3));
}

async fn a_throttled_repair_is_journaled_held_until_retry_after_and_then_carried_out(mode: Mode) {
    let app = spawn_app()
        .mode(mode)
        .scale_set("web", 10)
        .env("HEALER_REPAIR_ACTIONS", "delete")
        .start()
        .await;
    let set = TestApp::scale_set("web");
    app.invoke_timer("monitor-state").await;
    app.break_vm("web", 6, json!({"beat": "down"})).await;
    app.heartbeat_round().await;
    app.inject_fault(json!({"status": 429, "retryAfter": 2, "method": "POST"}))
        .await;
    app.clear_compute_calls().await;

    let (_, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["repairs_failed"],
        json!(1),
        "{answer}"
    );
    let (journal, _) = app.recent_journal(&set).await;
    assert!(
        journal
            .iter()
            .any(|e| e.kind == EntryKind::Repair && e.outcome == "throttled"),
        "{journal:?}"
    );
    assert!(
        app.store.incidents(&set).await.unwrap().0.is_empty(),
        "the claim was released: no attempt spent"
    );

    // Until Retry-After passes, no pass calls the Compute API to act.
    let (_, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["paused"],
        json!("throttled"),
        "{answer}"
    );
    let posts = |calls: &[Value]| calls.iter().filter(|c| c["method"] == "POST").count();
    assert_eq!(posts(&app.compute_calls().await), 1);

    // Then the repair is decided again and carried out.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, answer) = app.invoke_timer("monitor-status").await;
        if answer["ReturnValue"]["scale_sets"][0]["repairs_requested"] == json!(1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the repair never went out: {answer}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(
        posts(&app.compute_calls().await),
        2,
        "one throttled call, one that worked"
    );
    assert_eq!(app.fleet("web").await["capacity"], json!(9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_writes_only_what_changed() {
    let app = spawn_app().scale_set("web", 30).page_size(7).start().await;
    let (_, first) = app.invoke_timer("monitor-state").await;
    assert_eq!(first["ReturnValue"]["scale_sets"][0]["written"], json!(30));
    let (_, again) = app.invoke_timer("monitor-state").await;
    assert_eq!(
        again["ReturnValue"]["scale_sets"][0]["written"],
        json!(0),
        "nothing changed: {again}"
    );
    app.break_vm("web", 4, json!({"health": "unhealthy"})).await;
    app.break_vm("web", 11, json!({"powerState": "stopped"}))
        .await;
    let (_, changed) = app.invoke_timer("monitor-state").await;
    assert_eq!(
        changed["ReturnValue"]["scale_sets"][0]["written"],
        json!(2),
        "{changed}"
    );
    // One get, five pages; the table: one query of the set rows, the mirror, one batch, the set
    // row, and (a full read) the journal's retention query.
    assert_eq!(changed["ReturnValue"]["compute_calls"], json!(6));
    assert_eq!(
        changed["ReturnValue"]["table_requests"],
        json!(5),
        "{changed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_retry_after_is_capped_and_breaks_nothing() {
    let app = spawn_app().scale_set("web", 4).start().await;
    let set = TestApp::scale_set("web");
    app.invoke_timer("monitor-state").await;
    app.inject_fault(json!({"status": 429, "retryAfter": 1_000_000_000_000u64, "pathContains": "/virtualMachines"}))
        .await;
    let (status, answer) = app.invoke_timer("monitor-state").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["outcome"], "throttled",
        "{answer}"
    );
    let until = app
        .store
        .scale_set(&set)
        .await
        .unwrap()
        .unwrap()
        .throttled_until
        .expect("the throttle is recorded");
    assert!(
        until <= OffsetDateTime::now_utc() + Duration::hours(1),
        "held at most an hour, whatever Retry-After says: {until}"
    );
    // The handler still serves, and later passes read the hold as any other.
    app.heartbeat_round().await;
    let (status, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["paused"], "throttled",
        "{answer}"
    );
}

/// Issue 16: a repair that deletes an instance of a scale set with terminate notifications. The
/// VM first says DRAINING (its agent drains and approves its Terminate event), which the healer
/// never counts as a fault; the delete goes on once approved; the journal shows the drain, and the
/// step's timeout starts after the notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_instance_drains_first_and_its_drain_is_no_fault() {
    let app = spawn_app()
        .scale_set_spec(json!({"name": "web", "capacity": 4, "terminateNotificationSeconds": 300}))
        .env("HEALER_REPAIR_ACTIONS", "delete")
        .start()
        .await;
    let set = TestApp::scale_set("web");
    app.sync_and_break("web", 2, json!({"beat": "down"})).await;
    // Operations take their time: the delete waits for the VM's approval, not for the clock.
    app.operation_delay_ms(3_600_000).await;
    let (_, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["repairs_requested"],
        json!(1),
        "{answer}"
    );
    let (journal, _) = app.recent_journal(&set).await;
    let repair = journal
        .iter()
        .find(|e| e.kind == EntryKind::Repair)
        .expect("the delete is journaled");
    assert!(
        repair.evidence["drain"]
            .as_str()
            .is_some_and(|d| d.contains("300 s")),
        "the journal shows the drain: {}",
        repair.evidence
    );
    let (incidents, _) = app.store.incidents(&set).await.unwrap();
    let incident = &incidents["2"].value;
    let window = incident.deadline.unwrap() - incident.step_started.unwrap();
    assert_eq!(
        window,
        Duration::seconds(900 + 300),
        "HEALER_REPAIR_TIMEOUT starts after the notice"
    );

    // The VM drains: DRAINING until its NotBefore, its event approved, then it is deleted.
    app.heartbeat_round().await;
    let stored = app.stored_heartbeat("web", "2").await;
    assert_eq!(stored.status.label(), "DRAINING", "{stored:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        app.invoke_timer("monitor-state").await;
        let (_, answer) = app.invoke_timer("monitor-status").await;
        assert_eq!(
            answer["ReturnValue"]["scale_sets"][0]["repairs_requested"],
            json!(0),
            "nothing more is repaired while it drains: {answer}"
        );
        let (incidents, _) = app.store.incidents(&set).await.unwrap();
        if incidents["2"].value.state == vmss_healer::incident::State::Closed {
            assert_eq!(
                incidents["2"].value.resolution,
                Some(vmss_healer::incident::Resolution::Removed)
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never removed: {answer}"
        );
        app.heartbeat_round().await;
    }
    let fleet = app.fleet("web").await;
    assert_eq!(fleet["vms"].as_array().unwrap().len(), 3, "{fleet}");
}
