//! Repairs against the Compute API as Azure behaves (the simulator learnt each behaviour in
//! `tests/simulator.rs`): every step followed to its end, replace without races, refusals isolated
//! and counted, stopped instances started, dry run never blocking live, throttling per
//! subscription. Each scenario counts the exact Compute calls.

mod common;

use common::webhook::{start_receiver, wait_for_alerts, Receiver};
use common::{spawn_app, Mode, TestApp, OTHER_SUB};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use vmss_healer::incident::{Phase, Stage};
use vmss_healer::journal::{Entry, EntryKind};

/// A Compute call as the simulator logged it: method, last path segment, status, and the
/// `If-Match` it carried.
type Logged = (String, String, u16, Option<String>);

fn logged(call: &Value) -> Logged {
    let path = call["path"].as_str().unwrap_or_default();
    let last = path.rsplit('/').next().unwrap_or_default().to_string();
    // Operation status reads are named as such, whatever their id.
    let last = if path.to_ascii_lowercase().contains("/operations/") {
        "operation".to_string()
    } else {
        last
    };
    (
        call["method"].as_str().unwrap_or_default().to_string(),
        last,
        call["status"].as_u64().unwrap_or_default() as u16,
        call["if_match"].as_str().map(str::to_string),
    )
}

/// The Compute calls since the last clear, in order (the identity endpoint left out).
async fn calls(app: &TestApp) -> Vec<Logged> {
    let calls: Vec<Logged> = app
        .compute_calls()
        .await
        .iter()
        .filter(|c| !c["path"].as_str().unwrap_or_default().starts_with("/msi/"))
        .map(logged)
        .collect();
    app.clear_compute_calls().await;
    calls
}

fn call(method: &str, last: &str, status: u16) -> (String, String, u16) {
    (method.into(), last.into(), status)
}

fn without_if_match(calls: &[Logged]) -> Vec<(String, String, u16)> {
    calls
        .iter()
        .map(|(m, l, s, _)| (m.clone(), l.clone(), *s))
        .collect()
}

/// One monitor-status pass; returns its report of the first scale set.
async fn status_pass(app: &TestApp) -> Value {
    let (status, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(status, 200, "{answer}");
    answer["ReturnValue"]["scale_sets"][0].clone()
}

async fn journal(app: &TestApp, name: &str) -> Vec<Entry> {
    let (mut rows, _) = app.recent_journal(&TestApp::scale_set(name)).await;
    rows.reverse(); // oldest first
    rows
}

fn repairs(journal: &[Entry], instance: &str) -> Vec<(String, String, u32)> {
    journal
        .iter()
        .filter(|e| e.kind == EntryKind::Repair && e.instance_id == instance)
        .map(|e| {
            (
                e.action.map(|a| a.to_string()).unwrap_or_default(),
                e.outcome.clone(),
                e.attempt,
            )
        })
        .collect()
}

fn ids(fleet: &Value) -> BTreeSet<u64> {
    fleet["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["instance_id"].as_u64().unwrap())
        .collect()
}

async fn failed_operations(app: &TestApp) -> Vec<Value> {
    app.operations()
        .await
        .into_iter()
        .filter(|o| matches!(o["outcome"]["status"].as_str(), Some("Failed" | "Canceled")))
        .collect()
}

in_both_modes!(
    replace_surges_from_a_fresh_read_keeps_autoscale_capacity_and_then_deletes,
    a_429_on_one_scale_set_holds_its_whole_subscription,
);

async fn replace_surges_from_a_fresh_read_keeps_autoscale_capacity_and_then_deletes(mode: Mode) {
    let app = spawn_app().mode(mode).scale_set("web", 5).start().await;
    let set = TestApp::scale_set("web");
    app.sync_and_break("web", 3, json!({"beat": "down"})).await;
    let three = app.key_of("web", 3).await;
    // Autoscale scales out after the mirror's last read, and once more between our read and our
    // write: the mirror's capacity (5) is stale twice over.
    app.set_capacity("web", 7).await;
    app.inject_fault(json!({"method": "PATCH", "autoscaleTo": 8}))
        .await;
    app.clear_compute_calls().await;

    // 1. The surge reads the scale set afresh and writes with If-Match: autoscale's write in
    //    between makes it 412, and nothing is overwritten; no attempt is spent.
    let report = status_pass(&app).await;
    assert_eq!(report["repairs_failed"], 1, "{report}");
    let pass = calls(&app).await;
    assert_eq!(
        without_if_match(&pass),
        [call("GET", "web", 200), call("PATCH", "web", 412)]
    );
    assert!(pass[1].3.is_some(), "the surge carries If-Match");
    assert_eq!(
        app.fleet("web").await["capacity"],
        8,
        "autoscale's capacity stands"
    );
    let (incidents, _) = app.store.incidents(&set).await.unwrap();
    let inc = &incidents[&three].value;
    assert_eq!(
        (inc.phase, inc.attempt, inc.stage),
        (Phase::Pending, 1, Stage::Surge)
    );

    // 2. Read again: capacity 8 + 1, at the version just read.
    status_pass(&app).await;
    let pass = calls(&app).await;
    assert_eq!(
        without_if_match(&pass),
        [call("GET", "web", 200), call("PATCH", "web", 200)]
    );
    assert_eq!(app.fleet("web").await["capacity"], 9);

    // 3. The surge's operation succeeded and the new instance is mirrored: the broken one goes.
    app.invoke_timer("monitor-state").await;
    app.clear_compute_calls().await;
    let report = status_pass(&app).await;
    assert_eq!(report["operations_ended"], 1, "{report}");
    assert_eq!(
        without_if_match(&calls(&app).await),
        [call("GET", "operation", 200), call("POST", "delete", 202)]
    );

    // 4. The delete's operation succeeded and the instance is gone: replaced.
    app.invoke_timer("monitor-state").await;
    app.clear_compute_calls().await;
    let report = status_pass(&app).await;
    assert_eq!(report["outcomes"], 1, "{report}");
    assert_eq!(
        without_if_match(&calls(&app).await),
        [call("GET", "operation", 200)]
    );
    let fleet = app.fleet("web").await;
    assert_eq!(
        fleet["capacity"], 8,
        "autoscale's capacity, one broken instance swapped"
    );
    let remaining = ids(&fleet);
    assert!(!remaining.contains(&3));
    for healthy in [0, 1, 2, 4, 5, 6, 7] {
        assert!(
            remaining.contains(&healthy),
            "healthy #{healthy} was scaled in: {remaining:?}"
        );
    }
    assert!(
        failed_operations(&app).await.is_empty(),
        "nothing of ours was preempted"
    );
    let journal = journal(&app, "web").await;
    assert_eq!(
        repairs(&journal, &three),
        [
            ("replace".into(), "stale".into(), 1),
            ("replace".into(), "requested".into(), 1),
            ("replace".into(), "requested".into(), 1),
        ]
    );
    assert!(journal
        .iter()
        .any(|e| e.kind == EntryKind::Outcome && e.outcome == "replaced"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replace_never_writes_to_the_scale_set_while_our_delete_runs() {
    let app = spawn_app()
        .scale_set("web", 6)
        .env("HEALER_MAX_PARALLEL", "2")
        .start()
        .await;
    app.operation_delay_ms(3_600_000).await;
    app.sync_and_break("web", 1, json!({"beat": "down"})).await;

    status_pass(&app).await; // surge for #1
    app.complete_operations().await;
    app.invoke_timer("monitor-state").await;
    status_pass(&app).await; // #1's delete goes out and runs
    assert_eq!(app.vm("web", 1).await["provisioning_state"], "Deleting");

    // #2 breaks while #1's delete runs: its surge waits, no write goes out.
    app.break_vm("web", 2, json!({"beat": "down"})).await;
    app.heartbeat_round().await;
    app.clear_compute_calls().await;
    let report = status_pass(&app).await;
    let writes: Vec<Logged> = calls(&app)
        .await
        .into_iter()
        .filter(|c| c.0 != "GET")
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
    let journal = journal(&app, "web").await;
    let busy = journal
        .iter()
        .find(|e| e.instance_id == "2" && e.outcome == "scale_set_busy")
        .unwrap_or_else(|| panic!("{report}: {journal:#?}"));
    assert!(
        busy.reason.contains("grow waits for our delete"),
        "{}",
        busy.reason
    );

    // Once the delete has ended, #2's surge goes out.
    app.complete_operations().await;
    app.invoke_timer("monitor-state").await;
    app.clear_compute_calls().await;
    status_pass(&app).await;
    let writes: Vec<(String, String, u16)> = without_if_match(&calls(&app).await)
        .into_iter()
        .filter(|c| c.0 != "GET")
        .collect();
    assert_eq!(writes, [call("PATCH", "web", 200)]);
    assert!(
        failed_operations(&app).await.is_empty(),
        "no delete of ours was preempted: {:?}",
        failed_operations(&app).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_operation_is_noticed_next_pass_retried_as_the_next_attempt_then_given_up() {
    let (url, receiver) = start_receiver(Receiver::default()).await;
    let app = spawn_app()
        .scale_set("web", 5)
        .env("HEALER_REPAIR_ACTIONS", "restart")
        .env("HEALER_MAX_ATTEMPTS", "3")
        .env("HEALER_WEBHOOK_URL", &url)
        .start()
        .await;
    // Every restart is accepted and then preempted, as autoscale's writes would do.
    app.admin(
        reqwest::Method::POST,
        "operation-faults",
        Some(json!({"verb": "restart", "status": "Failed", "code": "OperationPreempted",
                    "message": "Operation execution has been preempted by a more recent operation.", "count": 3})),
    )
    .await;
    app.sync_and_break("web", 2, json!({"beat": "down"})).await;

    status_pass(&app).await;
    assert_eq!(
        without_if_match(&calls(&app).await),
        [call("POST", "restart", 202)]
    );
    for attempt in 2..=3 {
        // The repair timeout (15 min) is far off: the failure is read from the operation.
        let report = status_pass(&app).await;
        assert_eq!(
            (&report["operations_failed"], &report["repairs_requested"]),
            (&json!(1), &json!(1)),
            "attempt {attempt}: {report}"
        );
        assert_eq!(
            without_if_match(&calls(&app).await),
            [call("GET", "operation", 200), call("POST", "restart", 202)]
        );
    }
    let report = status_pass(&app).await;
    assert_eq!(report["outcomes"], 1, "given up: {report}");
    assert_eq!(
        without_if_match(&calls(&app).await),
        [call("GET", "operation", 200)]
    );

    let journal = journal(&app, "web").await;
    let failures: Vec<(u32, String)> = journal
        .iter()
        .filter(|e| e.kind == EntryKind::Step && e.outcome == "failed")
        .map(|e| {
            (
                e.attempt,
                e.evidence["error"]["code"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect();
    assert_eq!(
        failures,
        (1..=3)
            .map(|n| (n, "OperationPreempted".to_string()))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        repairs(&journal, "2"),
        (1..=3)
            .map(|n| ("restart".to_string(), "requested".to_string(), n))
            .collect::<Vec<_>>()
    );
    let alerts = wait_for_alerts(&receiver, 4, Duration::from_secs(10)).await;
    let give_up = alerts
        .iter()
        .find(|a| a["kind"] == "give_up")
        .unwrap_or_else(|| panic!("{alerts:?}"));
    assert_eq!(give_up["attempt"], 3);
    assert!(
        give_up["reason"]
            .as_str()
            .unwrap()
            .contains("OperationPreempted"),
        "{give_up}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refused_instance_does_not_block_the_rest_of_its_batch() {
    let app = spawn_app()
        .scale_set("web", 6)
        .env("HEALER_REPAIR_ACTIONS", "restart,reimage")
        .env("HEALER_MAX_PARALLEL", "3")
        .start()
        .await;
    app.invoke_timer("monitor-state").await;
    app.break_vm("web", 1, json!({"beat": "down"})).await;
    app.break_vm("web", 2, json!({"beat": "down"})).await;
    app.heartbeat_round().await;
    // #2 is deallocated after the mirror's read: the healer cannot know, ARM refuses its restart.
    app.break_vm("web", 2, json!({"powerState": "deallocated"}))
        .await;
    app.clear_compute_calls().await;

    // The batch is refused as a whole; no attempt is spent, each goes alone next pass.
    let report = status_pass(&app).await;
    assert_eq!(report["repairs_failed"], 2, "{report}");
    assert_eq!(
        without_if_match(&calls(&app).await),
        [call("POST", "restart", 409)]
    );

    // Alone: #1 is restarted; #2 is refused again, which spends its attempt.
    status_pass(&app).await;
    let pass = without_if_match(&calls(&app).await);
    assert_eq!(
        pass,
        [call("POST", "restart", 202), call("POST", "restart", 409)]
    );
    assert_eq!(app.vm("web", 1).await["beat"], "up", "#1 was restarted");
    let journal = journal(&app, "web").await;
    assert_eq!(
        repairs(&journal, "1"),
        [
            ("restart".into(), "split".into(), 1),
            ("restart".into(), "requested".into(), 1)
        ]
    );
    assert_eq!(
        repairs(&journal, "2"),
        [
            ("restart".into(), "split".into(), 1),
            ("restart".into(), "refused".into(), 1)
        ]
    );
    let refused = journal
        .iter()
        .find(|e| e.instance_id == "2" && e.outcome == "refused")
        .unwrap();
    assert_eq!(refused.evidence["error"]["code"], "OperationNotAllowed");

    // #2's next step is its escalation (the attempt was spent): no third restart.
    status_pass(&app).await;
    let pass = without_if_match(&calls(&app).await);
    assert!(
        pass.contains(&call("POST", "reimage", 202)),
        "#2 escalates to reimage: {pass:?}"
    );
    assert!(!pass.iter().any(|c| c.1 == "restart"), "{pass:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deallocated_instance_is_started_not_restarted() {
    let app = spawn_app()
        .scale_set("web", 4)
        .env("HEALER_REPAIR_ACTIONS", "restart,replace")
        .start()
        .await;
    app.break_vm("web", 2, json!({"powerState": "deallocated"}))
        .await;
    app.invoke_timer("monitor-state").await;
    app.heartbeat_round().await;
    app.clear_compute_calls().await;

    status_pass(&app).await;
    assert_eq!(
        without_if_match(&calls(&app).await),
        [call("POST", "start", 202)]
    );
    assert_eq!(app.vm("web", 2).await["power_state"], "running");
    let journal = journal(&app, "web").await;
    assert_eq!(
        repairs(&journal, "2"),
        [("start".into(), "requested".into(), 1)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_dry_run_off_repairs_at_once_as_attempt_one() {
    let mut app = spawn_app()
        .scale_set("web", 4)
        .env("HEALER_REPAIR_ACTIONS", "restart,replace")
        .env("HEALER_DRY_RUN", "true")
        .start()
        .await;
    app.sync_and_break("web", 1, json!({"beat": "down"})).await;
    status_pass(&app).await;
    assert!(calls(&app).await.is_empty(), "a dry run calls nothing");

    // The operator switches dry run off (the guide says: dry run first).
    app.restart_handler(&[("HEALER_DRY_RUN", "false")]);
    let report = status_pass(&app).await;
    assert_eq!(report["repairs_requested"], 1, "{report}");
    assert_eq!(
        without_if_match(&calls(&app).await),
        [call("POST", "restart", 202)]
    );
    let journal = journal(&app, "web").await;
    let live: Vec<(String, u32, bool)> = journal
        .iter()
        .filter(|e| e.kind == EntryKind::Repair)
        .map(|e| (e.outcome.clone(), e.attempt, e.dry_run))
        .collect();
    assert_eq!(
        live,
        [("dry_run".into(), 1, true), ("requested".into(), 1, false)]
    );
}

async fn a_429_on_one_scale_set_holds_its_whole_subscription(mode: Mode) {
    let app = spawn_app()
        .mode(mode)
        .scale_set("a", 4)
        .scale_set("b", 4)
        .scale_set_spec(json!({"name": "c", "capacity": 4, "subscription": OTHER_SUB}))
        .env("HEALER_REPAIR_ACTIONS", "restart")
        .start()
        .await;
    app.invoke_timer("monitor-state").await;
    for (set, sub) in [("a", common::SUB), ("b", common::SUB), ("c", OTHER_SUB)] {
        let key = format!("{sub}:{}:{set}", common::RG).to_lowercase();
        app.admin(
            reqwest::Method::PATCH,
            &format!("scalesets/{key}/vms/1"),
            Some(json!({"beat": "down"})),
        )
        .await;
    }
    app.heartbeat_round().await;
    // a's restart: the scale set's batch (Uniform), or the VM's own (Flexible).
    let a_restart = match mode {
        Mode::Uniform => "/virtualMachineScaleSets/a/restart".to_string(),
        Mode::Flexible => format!("/virtualMachines/{}/restart", app.key_of("a", 1).await),
    };
    app.inject_fault(json!({"status": 429, "retryAfter": 120, "pathContains": a_restart}))
        .await;
    app.clear_compute_calls().await;

    let (_, answer) = app.invoke_timer("monitor-status").await;
    let reports = answer["ReturnValue"]["scale_sets"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        without_if_match(&calls(&app).await),
        [call("POST", "restart", 429), call("POST", "restart", 202)],
        "a is throttled, b is not called, c (another subscription) is repaired"
    );
    assert_eq!(reports[0]["repairs_failed"], 1, "{answer}");
    assert_eq!(reports[1]["paused"], "throttled", "{answer}");
    assert_eq!(reports[2]["repairs_requested"], 1, "{answer}");
    let b = app
        .store
        .scale_set(&TestApp::scale_set("b"))
        .await
        .unwrap()
        .unwrap();
    assert!(
        b.throttled_until
            .is_some_and(|u| u > time::OffsetDateTime::now_utc() + time::Duration::seconds(100)),
        "the hold is recorded for later passes: {:?}",
        b.throttled_until
    );

    // Later passes, mirror and repair, leave the subscription alone until Retry-After.
    let (_, synced) = app.invoke_timer("monitor-state").await;
    let outcomes: Vec<&str> = synced["ReturnValue"]["scale_sets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(&outcomes[..2], ["throttled", "throttled"], "{synced}");
    status_pass(&app).await;
    let held = format!("/subscriptions/{}/", common::SUB).to_lowercase();
    let touched_sub: Vec<Value> = app
        .compute_calls()
        .await
        .into_iter()
        .filter(|c| {
            c["path"]
                .as_str()
                .unwrap()
                .to_lowercase()
                .starts_with(&held)
        })
        .collect();
    assert!(touched_sub.is_empty(), "{touched_sub:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_instance_waits_without_spending_an_attempt_until_the_repair_timeout() {
    let app = spawn_app()
        .scale_set("web", 4)
        .env("HEALER_REPAIR_ACTIONS", "restart,reimage")
        .env("HEALER_REPAIR_TIMEOUT", "3")
        .start()
        .await;
    app.sync_and_break("web", 1, json!({"beat": "down"})).await;
    // Someone else's operation runs on #1 (the mirror has not seen it): ARM answers 409 Conflict.
    app.break_vm("web", 1, json!({"provisioningState": "Updating"}))
        .await;
    let started = Instant::now();
    let mut restarts = 0;
    loop {
        status_pass(&app).await;
        let pass = without_if_match(&calls(&app).await);
        if pass.iter().any(|c| c.1 == "reimage") {
            break;
        }
        assert_eq!(pass, [call("POST", "restart", 409)]);
        restarts += 1;
        let (incidents, _) = app
            .store
            .incidents(&TestApp::scale_set("web"))
            .await
            .unwrap();
        assert_eq!(incidents["1"].value.attempt, 1, "waiting spends no attempt");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never escalated"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "escalated before the repair timeout"
    );
    assert!(
        restarts >= 2,
        "the restart was sent again while busy: {restarts}"
    );
    let journal = journal(&app, "web").await;
    let outcomes: BTreeSet<(String, u32)> = journal
        .iter()
        .filter(|e| e.kind == EntryKind::Repair)
        .map(|e| (e.outcome.clone(), e.attempt))
        .collect();
    assert_eq!(
        outcomes,
        BTreeSet::from([("busy".into(), 1), ("busy".into(), 2)]),
        "the reimage meets the same busy instance: {journal:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_set_that_cannot_grow_is_replaced_by_deleting_first_then_restoring() {
    let app = spawn_app()
        .scale_set_spec(json!({"name": "web", "capacity": 3, "maxCapacity": 3}))
        .start()
        .await;
    app.sync_and_break("web", 1, json!({"beat": "down"})).await;

    status_pass(&app).await;
    assert_eq!(
        without_if_match(&calls(&app).await),
        [call("GET", "web", 200), call("PATCH", "web", 409)]
    );
    status_pass(&app).await;
    assert_eq!(
        without_if_match(&calls(&app).await),
        [call("POST", "delete", 202)]
    );
    assert_eq!(app.fleet("web").await["capacity"], 2);

    // Only once the delete has succeeded is the capacity raised again, from a fresh read.
    app.invoke_timer("monitor-state").await;
    app.clear_compute_calls().await;
    status_pass(&app).await;
    let pass = calls(&app).await;
    assert_eq!(
        without_if_match(&pass),
        [
            call("GET", "operation", 200),
            call("GET", "web", 200),
            call("PATCH", "web", 200)
        ]
    );
    assert!(pass[2].3.is_some(), "the restore carries If-Match");
    assert_eq!(app.fleet("web").await["capacity"], 3);

    app.invoke_timer("monitor-state").await;
    let report = status_pass(&app).await;
    assert_eq!(report["outcomes"], 1, "{report}");
    let journal = journal(&app, "web").await;
    assert_eq!(
        repairs(&journal, "1"),
        [
            ("replace".into(), "cannot_grow".into(), 1),
            ("replace".into(), "requested".into(), 1),
            ("replace".into(), "requested".into(), 1),
        ]
    );
    assert!(journal
        .iter()
        .any(|e| e.kind == EntryKind::Outcome && e.outcome == "replaced"));
}
