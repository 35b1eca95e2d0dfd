//! Repair in seconds (issue 19): a DOWN that has lasted `HEALER_DOWN_FOR` has `monitor-events`
//! evaluate its scale set at once — no timer invocation needed — with every brake and claim rule
//! of the timer pass; an evaluation and a timer pass together repair once; a burst pauses the set;
//! `HEALER_EVENT_REPAIRS=false` leaves it all to the timer.

mod common;

use common::{now_rfc3339, spawn_app, Mode, TestApp};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use vmss_healer::journal::{Entry, EntryKind};

/// Delivers a heartbeat of `web#instance` as Event Grid would; the invocation's answer.
async fn beat(app: &TestApp, instance: u64, status: &str) -> Value {
    let event = app
        .heartbeat_of("web", instance, status, &now_rfc3339(time::Duration::ZERO))
        .await;
    let (code, answer) = app.deliver_event(event).await;
    assert_eq!(code, 200, "{answer}");
    answer["ReturnValue"].clone()
}

/// The set's journal, oldest first.
async fn journal(app: &TestApp) -> Vec<Entry> {
    let (mut j, _) = app.recent_journal(&TestApp::scale_set("web")).await;
    j.reverse();
    j
}

fn requested(j: &[Entry], instance: &str) -> usize {
    j.iter()
        .filter(|e| {
            e.kind == EntryKind::Repair && e.outcome == "requested" && e.instance_id == instance
        })
        .count()
}

/// Who decided each call for `instance` (its intent and request rows' `evidence.by`).
fn by(j: &[Entry], instance: &str) -> Vec<String> {
    j.iter()
        .filter(|e| {
            matches!(e.kind, EntryKind::Intent | EntryKind::Repair) && e.instance_id == instance
        })
        .map(|e| e.evidence["by"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Waits (polling, bounded) until the journal satisfies `done`.
async fn until(app: &TestApp, what: &str, done: impl Fn(&[Entry]) -> bool) -> Vec<Entry> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let j = journal(app).await;
        if done(&j) {
            return j;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within 30 s: {j:#?}\n{}",
            app.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Restart calls the simulator received for web (one instance is broken in each test).
async fn restarts(app: &TestApp) -> usize {
    app.compute_calls()
        .await
        .iter()
        .filter(|c| {
            c["method"] == "POST"
                && c["path"]
                    .as_str()
                    .is_some_and(|p| p.ends_with("/virtualMachineScaleSets/web/restart"))
        })
        .count()
}

async fn mirrored(app: &TestApp) {
    let (status, answer) = app.invoke_timer("monitor-state").await;
    assert_eq!(status, 200, "{answer}");
    for i in 0..4 {
        assert_eq!(beat(app, i, "UP").await["accepted"], true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_instance_is_repaired_with_no_timer_once_down_lasted_down_for() {
    let app = spawn_app()
        .scale_set("web", 4)
        .env("HEALER_REPAIR_ACTIONS", "restart")
        .env("HEALER_EVENT_REPAIRS", "true")
        .env("HEALER_DOWN_FOR", "2")
        .start()
        .await;
    mirrored(&app).await;
    app.break_vm("web", 2, json!({"beat": "down"})).await;
    // The first DOWN has not lasted HEALER_DOWN_FOR: nothing is evaluated.
    let first = beat(&app, 2, "DOWN").await;
    assert_eq!(first["evaluation"], Value::Null, "{first}");
    // The DOWN that completes the streak (the agent reports every interval) is.
    let started = Instant::now();
    let answer = loop {
        let answer = beat(&app, 2, "DOWN").await;
        if !answer["evaluation"].is_null() {
            break answer;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(answer["evaluation"], "started", "{answer}");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "not before the streak lasted HEALER_DOWN_FOR"
    );
    let j = until(&app, "the restart of web#2", |j| requested(j, "2") == 1).await;
    assert_eq!(requested(&j, "2"), 1);
    assert_eq!(
        by(&j, "2"),
        ["evaluation", "evaluation"],
        "intent and request say who decided"
    );
    assert!(
        app.compute_calls()
            .await
            .iter()
            .any(|c| c["method"] == "POST"
                && c["path"].as_str().unwrap_or("").ends_with("/web/restart")),
        "the restart reached the Compute API, and monitor-status was never invoked"
    );
    assert!(app.logs().contains("scale set evaluated at once"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evaluation_and_a_timer_pass_together_repair_once() {
    let app = spawn_app()
        .scale_set("web", 4)
        .env("HEALER_REPAIR_ACTIONS", "restart")
        .env("HEALER_EVENT_REPAIRS", "true")
        .start()
        .await;
    mirrored(&app).await;
    // The restart stays in flight: whoever claims the incident first acts, the other sees it.
    app.operation_delay_ms(60_000).await;
    app.break_vm("web", 1, json!({"beat": "down"})).await;
    let (answer, (status, pass)) =
        tokio::join!(beat(&app, 1, "DOWN"), app.invoke_timer("monitor-status"));
    assert_eq!(status, 200, "{pass}");
    assert_eq!(answer["evaluation"], "started", "{answer}");
    until(&app, "the restart of web#1", |j| requested(j, "1") >= 1).await;
    // More passes and more DOWNs: nothing more.
    for _ in 0..3 {
        beat(&app, 1, "DOWN").await;
        app.invoke_timer("monitor-status").await;
    }
    let j = until(&app, "evaluations settled", |_| true).await;
    assert_eq!(requested(&j, "1"), 1, "{j:#?}");
    assert_eq!(restarts(&app).await, 1, "one restart call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_downs_pauses_the_set_instead_of_repairing_it() {
    let app = spawn_app()
        .scale_set("web", 4)
        .env("HEALER_REPAIR_ACTIONS", "restart")
        .env("HEALER_EVENT_REPAIRS", "true")
        .start()
        .await;
    mirrored(&app).await;
    // Three of four DOWN at once (the unhealthy limit is 40 %): evaluations coalesce.
    let mut evaluations = Vec::new();
    for i in 0..3 {
        app.break_vm("web", i, json!({"beat": "down"})).await;
    }
    let answers = futures::future::join_all((0..3).map(|i| beat(&app, i, "DOWN"))).await;
    for a in &answers {
        evaluations.push(a["evaluation"].as_str().unwrap_or("none").to_string());
    }
    assert!(
        evaluations
            .iter()
            .all(|e| e == "started" || e == "coalesced"),
        "{evaluations:?}"
    );
    let j = until(&app, "the pause", |j| {
        j.iter()
            .any(|e| e.kind == EntryKind::Withheld && e.outcome == "too_many_unhealthy")
    })
    .await;
    assert_eq!(
        j.iter()
            .filter(|e| e.kind == EntryKind::Repair && e.outcome == "requested")
            .count(),
        0,
        "paused, nothing repaired: {j:#?}"
    );
    assert_eq!(restarts(&app).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_event_repairs_off_nothing_happens_until_the_timer() {
    let app = spawn_app()
        .scale_set("web", 4)
        .env("HEALER_REPAIR_ACTIONS", "restart")
        .env("HEALER_EVENT_REPAIRS", "false")
        .start()
        .await;
    mirrored(&app).await;
    app.break_vm("web", 3, json!({"beat": "down"})).await;
    for _ in 0..3 {
        let answer = beat(&app, 3, "DOWN").await;
        assert_eq!(answer["evaluation"], Value::Null, "{answer}");
    }
    assert_eq!(
        requested(&journal(&app).await, "3"),
        0,
        "nothing without the timer"
    );
    let (status, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(status, 200, "{answer}");
    let j = journal(&app).await;
    assert_eq!(requested(&j, "3"), 1);
    assert_eq!(by(&j, "3"), ["timer", "timer"]);
}

/// A short-circuited set that recovers settles before anything is repaired: with some of its
/// instances back UP and the share under the limit, a DOWN of one not yet back does not have an
/// evaluation (nor a timer pass) repair it until every instance has had
/// `HEALER_HEARTBEAT_TIMEOUT` to report again (the demo's mass DOWN: the fleet comes back one
/// heartbeat at a time, and an evaluation in the middle repaired the stragglers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_circuited_set_that_recovers_settles_before_repairing() {
    let app = spawn_app()
        .scale_set("web", 4)
        .env("HEALER_REPAIR_ACTIONS", "restart")
        .env("HEALER_EVENT_REPAIRS", "true")
        .env("HEALER_DOWN_FOR", "2")
        .env("HEALER_HEARTBEAT_TIMEOUT", "6")
        .env("HEALER_MAX_UNHEALTHY", "1")
        .start()
        .await;
    mirrored(&app).await;
    // Two DOWN together (over the limit of one): once their streaks are complete, the
    // evaluation pauses the set.
    for i in [0, 1] {
        app.break_vm("web", i, json!({"beat": "down"})).await;
        beat(&app, i, "DOWN").await;
    }
    let started = Instant::now();
    while beat(&app, 0, "DOWN").await["evaluation"].is_null() {
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    until(&app, "the pause", |j| {
        j.iter()
            .any(|e| e.kind == EntryKind::Withheld && e.outcome == "too_many_unhealthy")
    })
    .await;
    // web#0 comes back: one DOWN now, within the limit — but the set is not seen whole yet.
    app.break_vm("web", 0, json!({"beat": "up"})).await;
    assert_eq!(beat(&app, 0, "UP").await["accepted"], true);
    let answer = beat(&app, 1, "DOWN").await;
    assert_eq!(answer["evaluation"], "started", "{answer}");
    let j = until(&app, "the set settling", |j| {
        j.iter()
            .any(|e| e.kind == EntryKind::Withheld && e.outcome == "settling")
    })
    .await;
    let settling_at = j
        .iter()
        .find(|e| e.kind == EntryKind::Withheld && e.outcome == "settling")
        .map(|e| e.at);
    assert_eq!(requested(&j, "1"), 0, "not repaired by the evaluation");
    let (status, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["paused"], "settling",
        "nor by the timer pass: {answer}"
    );
    // Once every instance had HEALER_HEARTBEAT_TIMEOUT to report, web#1 — still DOWN — is:
    // by a pass, or by the evaluation its next DOWN of the rounds asks for (either may be first).
    app.passes_until("the repair of web#1", |a| {
        a["scale_sets"][0]["repairs_requested"] == json!(1)
            || a["scale_sets"][0]["unhealthy"] == json!(0)
    })
    .await;
    let j = journal(&app).await;
    assert_eq!(requested(&j, "1"), 1, "repaired once");
    assert_eq!(requested(&j, "0"), 0);
    let repaired_at = j
        .iter()
        .find(|e| e.kind == EntryKind::Repair && e.outcome == "requested")
        .map(|e| e.at);
    match (settling_at, repaired_at) {
        (Some(settled), Some(repaired)) => assert!(
            repaired - settled >= time::Duration::seconds(4),
            "repaired {repaired}, settling since {settled}: the hold was not kept"
        ),
        other => panic!("settling and repair rows expected: {other:?}"),
    }
}

/// The repair requests and status of `instance` in the journal.
fn repaired(j: &[Entry], instance: &str) -> bool {
    requested(j, instance) >= 1
}

in_both_modes!(a_vm_stopped_through_arm_is_repaired_on_its_resource_manager_event);

/// Resource Manager reports a VM stopped through ARM (on the instance of a Uniform set, on the
/// plain VM of a Flexible one): its set is read afresh and evaluated at once, and the VM repaired
/// with no timer invocation.
async fn a_vm_stopped_through_arm_is_repaired_on_its_resource_manager_event(mode: Mode) {
    let app = spawn_app()
        .mode(mode)
        .scale_set("web", 4)
        .env("HEALER_EVENT_REPAIRS", "true")
        .start()
        .await;
    mirrored(&app).await;
    app.clear_resource_events_now().await;
    app.clear_compute_calls().await;
    app.admin(
        reqwest::Method::POST,
        &format!("scalesets/{}/vms/2/poweroff", TestApp::key("web")),
        None,
    )
    .await;
    assert_eq!(app.resource_events().await, 1);
    let two = app.key_of("web", 2).await;
    let j = until(&app, "the repair of web#2", |j| repaired(j, &two)).await;
    let incident = j
        .iter()
        .find(|e| e.kind == EntryKind::Repair && e.instance_id == two)
        .map(|e| e.reason.clone())
        .unwrap_or_default();
    assert!(incident.contains("stopped"), "{incident}");
    let calls = app.compute_calls().await;
    let first_write = calls.iter().position(|c| c["method"] != "GET");
    // Uniform: the set's instances; Flexible: the group's VMs, by filter.
    let read = calls.iter().position(|c| {
        c["method"] == "GET"
            && c["path"]
                .as_str()
                .unwrap_or("")
                .ends_with("/virtualMachines")
    });
    assert!(
        read.is_some() && first_write.is_some() && read < first_write,
        "the set was read afresh before the repair: {calls:#?}"
    );
    assert_eq!(requested(&j, &two), 1);
    assert!(!app.logs().contains("monitor-status"), "no timer pass");
}

/// A forged event (web#1 is running) has the set read and judged — nothing repaired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_stop_event_repairs_nothing() {
    let app = spawn_app()
        .scale_set("web", 4)
        .env("HEALER_EVENT_REPAIRS", "true")
        .start()
        .await;
    mirrored(&app).await;
    app.clear_compute_calls().await;
    let uri = app.resource_id_of("web", 1).await;
    let forged = json!({"id": "f1", "eventType": "Microsoft.Resources.ResourceActionSuccess",
        "subject": uri, "eventTime": now_rfc3339(time::Duration::ZERO), "dataVersion": "2",
        "data": {"resourceUri": uri, "status": "Succeeded",
                 "operationName": "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/powerOff/action"}});
    let (code, answer) = app.deliver_event(forged).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["ReturnValue"]["evaluation"], "started", "{answer}");
    app.wait_for_log("evaluation done", Duration::from_secs(20))
        .await;
    assert!(app.logs().contains("read afresh for the evaluation"));
    let j = journal(&app).await;
    assert!(!repaired(&j, "1"), "{j:#?}");
    let calls = app.compute_calls().await;
    assert!(
        calls.iter().all(|c| c["method"] == "GET"),
        "reads only: {calls:#?}"
    );
    assert!(!calls.is_empty(), "the set was read");
}

/// A scale-out fails and leaves its new instance `Failed`: Resource Manager's failure event has
/// the set read and the failed instance repaired at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_left_failed_by_a_failed_operation_is_repaired_on_its_event() {
    let app = spawn_app()
        .scale_set("web", 4)
        .env("HEALER_EVENT_REPAIRS", "true")
        .start()
        .await;
    mirrored(&app).await;
    app.clear_resource_events_now().await;
    app.admin(
        reqwest::Method::POST,
        "operation-faults",
        Some(json!({"verb": "scale", "status": "Failed", "code": "AllocationFailed", "leaves": "Failed"})),
    )
    .await;
    app.set_capacity("web", 5).await;
    app.complete_operations().await;
    assert!(app.resource_events().await >= 1);
    let j = until(&app, "the repair of web#4", |j| repaired(j, "4")).await;
    assert_eq!(requested(&j, "4"), 1, "{j:#?}");
    assert!(!app.logs().contains("monitor-status"), "no timer pass");
}
