//! Design §6's safety rules, end to end: Azurite + simulator + handler.

mod common;

use common::{heartbeat_event, now_rfc3339, spawn_app, Mode, TestApp};
use serde_json::{json, Value};
use time::{Duration, OffsetDateTime};
use vmss_healer::journal::EntryKind;

fn repair_calls(calls: &[Value]) -> usize {
    calls.iter().filter(|c| c["method"] != "GET").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_runs_never_repair_one_instance_twice() {
    let app = spawn_app()
        .scale_set("web", 10)
        .env("HEALER_REPAIR_ACTIONS", "delete")
        .start()
        .await;
    let set = TestApp::scale_set("web");
    app.sync_and_break("web", 3, json!({"beat": "down"})).await;

    // Two timer runs at once, as when a run overlaps the next or the host retries.
    for round in 0..3 {
        let (a, b) = tokio::join!(
            app.invoke_timer("monitor-status"),
            app.invoke_timer("monitor-status")
        );
        assert_eq!((a.0, b.0), (200, 200), "round {round}: {} {}", a.1, b.1);
    }
    assert_eq!(
        repair_calls(&app.compute_calls().await),
        1,
        "exactly one delete call"
    );
    let (journal, _) = app.recent_journal(&set).await;
    let repairs: Vec<_> = journal
        .iter()
        .filter(|e| e.kind == EntryKind::Repair)
        .collect();
    assert_eq!(repairs.len(), 1, "{repairs:?}");
    assert_eq!(repairs[0].instance_id, "3");
}

in_both_modes!(
    a_fleet_wide_silence_pauses_everything_and_resumes_when_heartbeats_return,
    a_scale_set_mostly_down_short_circuits_while_others_still_heal,
    escalation_restart_reimage_replace_with_the_journal_showing_each_step,
    a_forged_vm_id_never_repairs_a_healthy_vm,
);

async fn a_fleet_wide_silence_pauses_everything_and_resumes_when_heartbeats_return(mode: Mode) {
    let app = spawn_app()
        .mode(mode)
        .scale_set("web", 6)
        .scale_set("api", 6)
        // Silence, and the settling after the pause, last seconds here.
        .env("HEALER_HEARTBEAT_TIMEOUT", "3")
        .start()
        .await;
    app.invoke_timer("monitor-state").await;
    // Every VM last reported ten minutes ago: the pipeline broke, not the fleet.
    for set in ["web", "api"] {
        for i in 0..6 {
            let old = app
                .heartbeat_of(set, i, "UP", &now_rfc3339(Duration::minutes(-10)))
                .await;
            let (status, answer) = app.deliver_event(old).await;
            assert_eq!(
                (status, &answer["ReturnValue"]["stored"]),
                (200, &json!(true)),
                "{answer}"
            );
        }
    }
    app.clear_compute_calls().await;
    let (_, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(
        answer["ReturnValue"]["pipeline_fault"],
        json!(true),
        "{answer}"
    );
    for s in answer["ReturnValue"]["scale_sets"].as_array().unwrap() {
        assert_eq!(s["paused"], json!("pipeline_fault"), "{answer}");
        assert_eq!(s["repairs_requested"], json!(0));
    }
    assert_eq!(
        repair_calls(&app.compute_calls().await),
        0,
        "nothing deleted"
    );

    // Heartbeats come back, except from one VM that really hung. The first pass cannot tell it
    // from a VM that has not reported yet (agents report at their own moment of the interval):
    // web settles, nothing is repaired; api, seen whole, resumes at once.
    app.break_vm("web", 2, json!({"beat": "silent"})).await;
    app.heartbeat_round().await;
    let (_, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(
        answer["ReturnValue"]["pipeline_fault"],
        json!(false),
        "{answer}"
    );
    let paused: Vec<(Value, Value)> = answer["ReturnValue"]["scale_sets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["paused"].clone(), s["repairs_requested"].clone()))
        .collect();
    assert_eq!(
        paused,
        [(json!("settling"), json!(0)), (Value::Null, json!(0))],
        "{answer}"
    );
    let settled_from = std::time::Instant::now();
    // Once every VM has had HEALER_HEARTBEAT_TIMEOUT to report again, only the hung one is
    // repaired.
    let answer = app
        .passes_until("the repair of the hung VM", |a| {
            a["scale_sets"][0]["repairs_requested"] == json!(1)
        })
        .await;
    assert!(
        settled_from.elapsed() >= std::time::Duration::from_secs(2),
        "not before the set settled"
    );
    assert_eq!(answer["scale_sets"][0]["paused"], Value::Null, "{answer}");
    assert_eq!(
        answer["scale_sets"][1]["repairs_requested"],
        json!(0),
        "{answer}"
    );
    assert_eq!(
        repair_calls(&app.compute_calls().await),
        1,
        "one VM repaired"
    );
}

async fn a_scale_set_mostly_down_short_circuits_while_others_still_heal(mode: Mode) {
    let app = spawn_app()
        .mode(mode)
        .scale_set("web", 5)
        .scale_set("api", 5)
        .start()
        .await;
    app.invoke_timer("monitor-state").await;
    for i in 0..3 {
        app.break_vm("web", i, json!({"beat": "down"})).await; // 60 % of web
    }
    app.break_vm("api", 4, json!({"beat": "down"})).await;
    app.heartbeat_round().await;
    app.clear_compute_calls().await;
    let (_, answer) = app.invoke_timer("monitor-status").await;
    let sets = answer["ReturnValue"]["scale_sets"].as_array().unwrap();
    assert_eq!(sets[0]["paused"], json!("too_many_unhealthy"), "{answer}");
    assert_eq!(sets[0]["repairs_requested"], json!(0));
    assert_eq!(sets[1]["repairs_requested"], json!(1), "{answer}");
    // Held for two more passes, then the VMs recover: the journal says when the pause began and
    // when it ended, once each.
    app.invoke_timer("monitor-status").await;
    app.invoke_timer("monitor-status").await;
    for i in 0..3 {
        app.break_vm("web", i, json!({"beat": "up"})).await;
    }
    app.heartbeat_round().await;
    app.invoke_timer("monitor-status").await;
    let (journal, _) = app.recent_journal(&TestApp::scale_set("web")).await;
    let pause_rows: Vec<&str> = journal
        .iter()
        .filter(|e| e.instance_id == "*")
        .map(|e| e.outcome.as_str())
        .collect();
    assert_eq!(
        pause_rows,
        ["resumed", "too_many_unhealthy"],
        "newest first"
    );
    let calls = app.compute_calls().await;
    let writes: Vec<&str> = calls
        .iter()
        .filter(|c| c["method"] != "GET")
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert!(
        writes
            .iter()
            .all(|p| p.contains("/virtualMachineScaleSets/api")),
        "{writes:?}"
    );
    let (journal, _) = app.recent_journal(&TestApp::scale_set("web")).await;
    assert!(
        journal
            .iter()
            .any(|e| e.kind == EntryKind::Withheld
                && e.reason.contains("3 of 5 instances unhealthy")),
        "{journal:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_vm_is_not_repaired_until_down_persists() {
    let app = spawn_app()
        .scale_set("web", 5)
        .env("HEALER_DOWN_FOR", "60")
        .env("HEALER_REPAIR_ACTIONS", "delete")
        .start()
        .await;
    let set = TestApp::scale_set("web");
    app.invoke_timer("monitor-state").await;
    for i in [1, 2] {
        app.break_vm("web", i, json!({"beat": "silent"})).await; // their readings come from below
    }
    app.heartbeat_round().await; // the others report UP now
    let vm_id = |i: u64| {
        let app = &app;
        async move {
            app.vm("web", i).await["vm_id"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let (flapper, steady) = (vm_id(1).await, vm_id(2).await);
    // Instance 1 flaps: DOWN, UP, DOWN, UP, DOWN over two minutes, never DOWN for a whole minute.
    for (status, ago) in [
        ("DOWN", 120),
        ("UP", 100),
        ("DOWN", 80),
        ("UP", 40),
        ("DOWN", 30),
        ("DOWN", 0),
    ] {
        app.deliver_event(heartbeat_event(
            "web",
            1,
            &flapper,
            status,
            &now_rfc3339(Duration::seconds(-ago)),
        ))
        .await;
    }
    // Instance 2 has reported DOWN for 90 s without a break.
    for ago in [90, 60, 30, 0] {
        app.deliver_event(heartbeat_event(
            "web",
            2,
            &steady,
            "DOWN",
            &now_rfc3339(Duration::seconds(-ago)),
        ))
        .await;
    }
    let flapping = app
        .store
        .heartbeat(&set, "1")
        .await
        .unwrap()
        .unwrap()
        .heartbeat;
    let since = flapping.down_since.expect("a DOWN streak");
    assert!(
        (OffsetDateTime::now_utc() - since).whole_seconds() < 60,
        "the last UP ended the earlier streak"
    );

    app.clear_compute_calls().await;
    let (_, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["repairs_requested"],
        json!(1),
        "{answer}"
    );
    let calls = app.compute_calls().await;
    let deletes: Vec<&Value> = calls.iter().filter(|c| c["method"] == "POST").collect();
    assert_eq!(deletes.len(), 1);
    let (journal, _) = app.recent_journal(&set).await;
    let repaired: Vec<&str> = journal
        .iter()
        .filter(|e| e.kind == EntryKind::Repair)
        .map(|e| e.instance_id.as_str())
        .collect();
    assert_eq!(repaired, ["2"], "only the VM that stayed DOWN");
}

/// Drives passes until `done` holds for the journal, or fails after `limit`. Each pass waits for
/// nothing but the clock the repair timeout needs.
async fn escalation_restart_reimage_replace_with_the_journal_showing_each_step(mode: Mode) {
    let app = spawn_app()
        .mode(mode)
        .scale_set("web", 5)
        .env("HEALER_REPAIR_ACTIONS", "restart,reimage,replace")
        // Long enough for a replace's surge, the mirror read and the delete (about three passes).
        .env("HEALER_REPAIR_TIMEOUT", "3")
        .start()
        .await;
    app.invoke_timer("monitor-state").await;
    // A fault that survives a restart and a reimage: only a new VM helps.
    app.break_vm("web", 3, json!({"beat": "down", "fault": "hard"}))
        .await;
    let three = app.key_of("web", 3).await;

    let journal = app
        .drive_until("web", std::time::Duration::from_secs(60), |j| {
            j.iter()
                .any(|e| e.kind == EntryKind::Outcome && e.outcome == "replaced")
        })
        .await;
    let steps: Vec<(String, u32, String)> = journal
        .iter()
        .filter(|e| e.kind == EntryKind::Repair && e.outcome == "requested")
        .map(|e| {
            (
                e.action.unwrap().to_string(),
                e.attempt,
                e.evidence["stage"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let want = [
        ("restart", 1, "act"),
        ("reimage", 2, "act"),
        ("replace", 3, "surge"),
        ("replace", 3, "delete"),
    ]
    .map(|(a, n, s)| (a.to_string(), n, s.to_string()));
    assert_eq!(steps, want);
    let incidents: std::collections::HashSet<&str> = journal
        .iter()
        .filter(|e| e.instance_id == three)
        .map(|e| e.incident.as_str())
        .collect();
    assert_eq!(
        incidents.len(),
        1,
        "one incident from first step to outcome"
    );
    let fleet = app.fleet("web").await;
    assert_eq!(fleet["capacity"], json!(5), "replaced, capacity kept");
    assert!(fleet["vms"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v["instance_id"] != json!(3)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_max_attempts_the_healer_gives_up_and_stops() {
    let app = spawn_app()
        .scale_set("web", 5)
        .env("HEALER_REPAIR_ACTIONS", "restart")
        .env("HEALER_MAX_ATTEMPTS", "2")
        .env("HEALER_REPAIR_TIMEOUT", "1")
        .start()
        .await;
    app.invoke_timer("monitor-state").await;
    app.break_vm("web", 1, json!({"beat": "down", "fault": "hard"}))
        .await;
    app.drive_until("web", std::time::Duration::from_secs(60), |j| {
        j.iter().any(|e| e.outcome == "given_up")
    })
    .await;

    // Given up means left alone: further passes call nothing.
    app.clear_compute_calls().await;
    for _ in 0..3 {
        app.heartbeat_round().await;
        app.invoke_timer("monitor-status").await;
    }
    assert_eq!(repair_calls(&app.compute_calls().await), 0);
    let restarts = app
        .recent_journal(&TestApp::scale_set("web"))
        .await
        .0
        .iter()
        .filter(|e| e.kind == EntryKind::Repair && e.outcome == "requested")
        .count();
    assert_eq!(restarts, 2, "HEALER_MAX_ATTEMPTS restarts, then nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_that_never_reports_is_replaced_after_the_startup_timeout() {
    let app = spawn_app()
        .scale_set("web", 4)
        .env("HEALER_STARTUP_TIMEOUT", "2")
        .start()
        .await;
    app.invoke_timer("monitor-state").await;
    // Scale-out adds instance 4, whose agent never starts.
    app.set_capacity("web", 5).await;
    app.break_vm("web", 4, json!({"beat": "silent"})).await;
    app.heartbeat_round().await;
    app.invoke_timer("monitor-state").await;
    let (_, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["repairs_requested"],
        json!(0),
        "new: not judged yet: {answer}"
    );

    let journal = app
        .drive_until("web", std::time::Duration::from_secs(30), |j| {
            j.iter().any(|e| e.kind == EntryKind::Repair)
        })
        .await;
    let repair = journal
        .iter()
        .find(|e| e.kind == EntryKind::Repair)
        .unwrap();
    assert_eq!(repair.instance_id, "4");
    assert!(
        repair.reason.contains("no heartbeat since creation"),
        "{}",
        repair.reason
    );
    assert_eq!(
        repair.action.map(|a| a.to_string()).as_deref(),
        Some("replace")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_instances_and_maintenance_are_not_touched() {
    let app = spawn_app().scale_set("web", 10).start().await;
    app.invoke_timer("monitor-state").await;
    app.break_vm(
        "web",
        1,
        json!({"beat": "down", "protectFromScaleSetActions": true}),
    )
    .await;
    app.break_vm(
        "web",
        2,
        json!({"beat": "maintenance", "maintenanceUntil": common::now_rfc3339(Duration::hours(1))}),
    )
    .await;
    app.invoke_timer("monitor-state").await;
    app.heartbeat_round().await;
    app.break_vm("web", 2, json!({"beat": "silent"})).await; // rebooting for the planned work
    app.clear_compute_calls().await;
    let (_, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["repairs_requested"],
        json!(0),
        "{answer}"
    );
    assert_eq!(repair_calls(&app.compute_calls().await), 0);
    let (journal, _) = app.recent_journal(&TestApp::scale_set("web")).await;
    let withheld: Vec<(&str, &str)> = journal
        .iter()
        .map(|e| (e.instance_id.as_str(), e.outcome.as_str()))
        .collect();
    assert_eq!(
        withheld,
        [("1", "protected")],
        "the protected instance is journaled as withheld"
    );
}

/// A VM the platform is about to terminate publishes DRAINING (design §2) and then goes quiet and
/// is deallocated by its event: none of that is a fault, and `handler status` counts it draining.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_instance_is_never_a_fault() {
    let app = spawn_app()
        .scale_set("web", 6)
        .env("HEALER_GRACE_PERIOD", "2s")
        .start()
        .await;
    app.invoke_timer("monitor-state").await;
    app.heartbeat_round().await;
    let mut draining = app
        .heartbeat_of("web", 3, "DRAINING", &common::now_rfc3339(Duration::ZERO))
        .await;
    draining["data"]["until"] = json!(common::now_rfc3339(Duration::seconds(1)));
    draining["data"]["sequence"] = json!(1_000_000);
    let (status, answer) = app.deliver_event(draining).await;
    assert_eq!(
        (status, &answer["ReturnValue"]["stored"]),
        (200, &json!(true)),
        "{answer}"
    );
    app.break_vm(
        "web",
        3,
        json!({"beat": "silent", "powerState": "deallocated"}),
    )
    .await;
    app.invoke_timer("monitor-state").await;
    app.clear_compute_calls().await;
    let (_, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["repairs_requested"],
        json!(0),
        "{answer}"
    );
    assert_eq!(repair_calls(&app.compute_calls().await), 0);
    let (code, out, err) = app.cli(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["scale_sets"][0]["draining"], 1, "{status:#}");
    // Still deallocated well after its event's time (NotBefore + HEALER_GRACE_PERIOD): judged
    // again, and repaired.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        app.heartbeat_round().await;
        app.invoke_timer("monitor-state").await;
        let (_, answer) = app.invoke_timer("monitor-status").await;
        if answer["ReturnValue"]["scale_sets"][0]["repairs_requested"] == json!(1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never judged again: {answer}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_automatic_repairs_are_reported_and_deferred_to_unless_told_to_act() {
    for (setting, expected) in [("defer", 0), ("act", 1)] {
        let app = spawn_app()
            .scale_set_spec(json!({"name": "web", "capacity": 4, "automaticRepairs": true}))
            .env("HEALER_PLATFORM_REPAIRS", setting)
            .start()
            .await;
        app.invoke_timer("monitor-state").await;
        let record = app
            .store
            .scale_set(&TestApp::scale_set("web"))
            .await
            .unwrap()
            .unwrap();
        assert!(
            record.platform_auto_repair,
            "mirrored from automaticRepairsPolicy"
        );
        app.break_vm("web", 1, json!({"beat": "down"})).await;
        app.heartbeat_round().await;
        let (_, answer) = app.invoke_timer("monitor-status").await;
        let web = &answer["ReturnValue"]["scale_sets"][0];
        assert_eq!(
            web["repairs_requested"],
            json!(expected),
            "{setting}: {answer}"
        );
        if setting == "defer" {
            assert_eq!(web["paused"], json!("platform_repairs"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_heartbeats_never_repair_a_healthy_vm() {
    // `legacy` still runs Prunella agents and its operator accepts computer names as proof.
    let sets = format!(
        "{} {}[DOWN_PROOF=name]",
        common::scale_set_id("web"),
        common::scale_set_id("legacy")
    );
    let app = spawn_app()
        .scale_set("web", 6)
        .scale_set("legacy", 6)
        .env("HEALER_SCALE_SETS", &sets)
        .env("HEALER_REPAIR_ACTIONS", "delete")
        .start()
        .await;
    let (web, legacy) = (TestApp::scale_set("web"), TestApp::scale_set("legacy"));
    // Legacy VM 4 runs only a Prunella agent: no vmId reading of its own.
    app.break_vm("legacy", 4, json!({"beat": "silent"})).await;
    app.sync_and_break("web", 0, json!({})).await;

    // Another VM's vmId: refused as a spoof, and counted.
    let other = app.vm("web", 3).await["vm_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut totals = Vec::new();
    for _ in 0..2 {
        let forged = heartbeat_event("web", 2, &other, "DOWN", &now_rfc3339(Duration::ZERO));
        let (status, answer) = app.deliver_event(forged).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(
            answer["ReturnValue"]["reason"], "vm_id_mismatch",
            "{answer}"
        );
        totals.push(answer["ReturnValue"]["rejected_total"].as_u64().unwrap());
    }
    assert_eq!(totals[1], totals[0] + 1);
    assert_eq!(
        app.store
            .heartbeat(&web, "2")
            .await
            .unwrap()
            .unwrap()
            .heartbeat
            .status
            .label(),
        "UP",
        "the stored heartbeat is untouched"
    );

    // A DOWN that proves only a computer name (anyone on the network can learn one) is refused
    // where vmId proof is required, and believed only where the operator accepts names.
    let prunella_down = |set: &str, name: &str| {
        json!({"id": uuid::Uuid::new_v4().to_string(), "eventType": "prunella-status",
            "subject": common::scale_set_id(set), "eventTime": now_rfc3339(Duration::ZERO),
            "dataVersion": "1", "data": {"name": name, "status": "DOWN"}})
    };
    for set in ["web", "legacy"] {
        let name = app.vm(set, 4).await["computer_name"]
            .as_str()
            .unwrap()
            .to_string();
        let (_, answer) = app.deliver_event(prunella_down(set, &name)).await;
        if set == "web" {
            assert_eq!(
                answer["ReturnValue"]["reason"], "insufficient_proof",
                "{answer}"
            );
        } else {
            assert_eq!(answer["ReturnValue"]["stored"], true, "{answer}");
        }
    }
    assert_eq!(app.stored_heartbeat("web", "4").await.status.label(), "UP");
    let (_, status) = app.invoke_timer("monitor-status").await;
    let report = |name: &str| {
        status["ReturnValue"]["scale_sets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["scale_set"] == TestApp::key(name))
            .cloned()
            .unwrap()
    };
    assert_eq!(report("web")["repairs_requested"], 0, "{status}");
    assert_eq!(report("legacy")["repairs_requested"], 1, "{status}");
    let deletes: Vec<String> = app
        .compute_calls()
        .await
        .iter()
        .filter(|c| c["method"] == "POST")
        .map(|c| c["path"].as_str().unwrap().to_lowercase())
        .collect();
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    assert!(
        deletes[0].contains("/virtualmachinescalesets/legacy/"),
        "{deletes:?}"
    );
    let (journal, _) = app.recent_journal(&legacy).await;
    assert!(journal
        .iter()
        .any(|e| e.kind == EntryKind::Repair && e.instance_id == "4"));
}

/// Issue 12, items 1 and 2: a computer name is all a Prunella-format heartbeat proves, and anyone
/// on the network can learn one. It must neither make a new VM look silent for years (and have it
/// replaced) nor hide a broken VM whose own agent, proving its vmId, reports DOWN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_computer_name_can_neither_delete_a_new_vm_nor_hide_a_broken_one() {
    let sets = format!(
        "{} {}[DOWN_PROOF=name]",
        common::scale_set_id("web"),
        common::scale_set_id("legacy")
    );
    let app = spawn_app()
        .scale_set("web", 3)
        .scale_set("legacy", 3)
        .env("HEALER_SCALE_SETS", &sets)
        .env("HEALER_REPAIR_ACTIONS", "delete")
        .start()
        .await;
    app.invoke_timer("monitor-state").await;
    // Scale-out adds instance 3 to each set: booting, no heartbeat yet.
    for set in ["web", "legacy"] {
        app.set_capacity(set, 4).await;
        app.break_vm(set, 3, json!({"beat": "silent"})).await;
    }
    app.invoke_timer("monitor-state").await;
    app.heartbeat_round().await;

    let prunella = |set: &str, name: &str, status: &str, time: &str| {
        json!({"id": "1234", "eventType": "prunella-status", "subject": common::scale_set_id(set),
            "eventTime": time, "data": {"name": name, "status": status}})
    };
    let name = |set: &'static str, i: u64| {
        let app = &app;
        async move {
            app.vm(set, i).await["computer_name"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let reason = |answer: &Value| answer["ReturnValue"]["reason"].as_str().map(str::to_string);

    // A new VM dated 27 years back by its hostname alone: no delivery is that late.
    let ancient = "2000-01-01T00:00:00Z";
    for set in ["web", "legacy"] {
        let (_, answer) = app
            .deliver_event(prunella(set, &name(set, 3).await, "UP", ancient))
            .await;
        assert_eq!(reason(&answer).as_deref(), Some("too_old"), "{answer}");
    }
    // Within a day, but before the VM existed; and where names are no proof, not at all.
    let before = now_rfc3339(-Duration::hours(1));
    for (set, why) in [("web", "insufficient_proof"), ("legacy", "before_creation")] {
        let (_, answer) = app
            .deliver_event(prunella(set, &name(set, 3).await, "UP", &before))
            .await;
        assert_eq!(reason(&answer).as_deref(), Some(why), "{answer}");
    }
    for set in ["web", "legacy"] {
        let stored = app
            .store
            .heartbeat(&TestApp::scale_set(set), "3")
            .await
            .unwrap();
        assert!(stored.is_none(), "{set}#3: {stored:?}");
    }

    // Instance 2's own agent reports DOWN; a hostname-only UP dated ahead does not mask it.
    for set in ["web", "legacy"] {
        let vm_id = app.vm(set, 2).await["vm_id"].as_str().unwrap().to_string();
        let down = heartbeat_event(set, 2, &vm_id, "DOWN", &now_rfc3339(Duration::ZERO));
        let (_, answer) = app.deliver_event(down).await;
        assert_eq!(answer["ReturnValue"]["stored"], true, "{answer}");
        let ahead = now_rfc3339(Duration::minutes(4));
        let (_, answer) = app
            .deliver_event(prunella(set, &name(set, 2).await, "UP", &ahead))
            .await;
        if set == "web" {
            assert_eq!(
                reason(&answer).as_deref(),
                Some("insufficient_proof"),
                "{answer}"
            );
        } else {
            assert_eq!(answer["ReturnValue"]["stored"], false, "{answer}");
        }
        assert_eq!(app.stored_heartbeat(set, "2").await.status.label(), "DOWN");
    }

    let (_, status) = app.invoke_timer("monitor-status").await;
    for set in ["web", "legacy"] {
        let (journal, _) = app.recent_journal(&TestApp::scale_set(set)).await;
        let repaired: Vec<&str> = journal
            .iter()
            .filter(|e| e.kind == EntryKind::Repair)
            .map(|e| e.instance_id.as_str())
            .collect();
        assert_eq!(repaired, ["2"], "{set}: {status}");
    }
}

/// A heartbeat carrying another VM's vmId is refused whatever form its subject takes, and a plain
/// VM id the mirrors do not hold names no instance at all.
async fn a_forged_vm_id_never_repairs_a_healthy_vm(mode: Mode) {
    let app = spawn_app()
        .mode(mode)
        .scale_set("web", 4)
        .env("HEALER_REPAIR_ACTIONS", "delete")
        .start()
        .await;
    app.sync_and_break("web", 0, json!({})).await;
    let other = app.vm("web", 3).await["vm_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut forged = app
        .heartbeat_of("web", 2, "DOWN", &now_rfc3339(Duration::ZERO))
        .await;
    forged["data"]["vmId"] = json!(other);
    let (status, answer) = app.deliver_event(forged.clone()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["ReturnValue"]["reason"], "vm_id_mismatch",
        "{answer}"
    );
    if mode == Mode::Flexible {
        // The agents name a Flexible VM under its scale set; that form is checked the same way.
        let name = app.key_of("web", 2).await;
        forged["subject"] = json!(format!(
            "{}/virtualMachines/{name}",
            common::scale_set_id("web")
        ));
        let (_, answer) = app.deliver_event(forged.clone()).await;
        assert_eq!(
            answer["ReturnValue"]["reason"], "vm_id_mismatch",
            "{answer}"
        );
        // A VM of the group that no watched set mirrors: no instance of ours.
        forged["subject"] = json!(format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/web_00000000",
            common::SUB,
            common::RG
        ));
        let (_, answer) = app.deliver_event(forged).await;
        assert_eq!(
            answer["ReturnValue"]["reason"], "unknown_instance",
            "{answer}"
        );
    }
    let key = app.key_of("web", 2).await;
    assert_eq!(app.stored_heartbeat("web", &key).await.status.label(), "UP");
    app.clear_compute_calls().await;
    let (_, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["repairs_requested"], 0,
        "{answer}"
    );
    assert_eq!(repair_calls(&app.compute_calls().await), 0);
}

/// A subject whose instance part is no possible VM name (`#`, `?`, a control character) is a bad
/// event, answered 2xx and counted — never a storage error that Event Grid would redeliver for a
/// day.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_no_table_key_can_hold_is_refused_not_retried() {
    let app = spawn_app().scale_set("web", 2).start().await;
    app.invoke_timer("monitor-state").await;
    let vm_id = app.vm("web", 1).await["vm_id"]
        .as_str()
        .unwrap()
        .to_string();
    for bad in ["1#2", "1?x", "web\u{1}", "a\\b"] {
        for subject in [
            format!("{}/virtualMachines/{bad}", common::scale_set_id("web")),
            format!(
                "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{bad}",
                common::SUB,
                common::RG
            ),
        ] {
            let mut event = heartbeat_event("web", 1, &vm_id, "DOWN", &now_rfc3339(Duration::ZERO));
            event["subject"] = json!(subject);
            let (status, answer) = app.deliver_event(event).await;
            assert_eq!(status, 200, "{subject:?}: {answer}");
            assert_eq!(answer["ReturnValue"]["accepted"], false, "{answer}");
            assert_eq!(answer["ReturnValue"]["reason"], "bad_subject", "{answer}");
        }
    }
}

/// Issue 14: a Flexible VM's protection is a resource lock (Azure's alternative to instance
/// protection). Locked against deletion, a broken VM is not deleted or replaced — a restart still
/// goes; read-only, nothing is done to it; and a lock list that cannot be read leaves the mirror
/// as it was rather than calling every VM unprotected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_flexible_vm_is_never_deleted_and_unreadable_locks_stop_the_mirror() {
    let sets = format!(
        "{} {}[REPAIR_ACTIONS=restart]",
        common::scale_set_id("web"),
        common::scale_set_id("api")
    );
    let app = spawn_app()
        .mode(Mode::Flexible)
        .scale_set("web", 5)
        .scale_set("api", 5)
        .env("HEALER_SCALE_SETS", &sets)
        .start()
        .await;
    let lock = |scope: String, level: &str| json!({"scope": scope, "level": level});
    for (set, level) in [("web", "CanNotDelete"), ("api", "CanNotDelete")] {
        let scope = app.resource_id_of(set, 1).await;
        app.admin(reqwest::Method::POST, "locks", Some(lock(scope, level)))
            .await;
    }
    let read_only = app.resource_id_of("web", 2).await;
    app.admin(
        reqwest::Method::POST,
        "locks",
        Some(lock(read_only, "ReadOnly")),
    )
    .await;
    for set in ["web", "api"] {
        app.break_vm(set, 1, json!({"beat": "down"})).await;
    }
    app.break_vm("web", 2, json!({"beat": "down"})).await;
    app.invoke_timer("monitor-state").await;
    let (web_1, web_2) = (app.key_of("web", 1).await, app.key_of("web", 2).await);
    let mirrored = app
        .store
        .mirrored_instance(&TestApp::scale_set("web"), &web_1)
        .await
        .unwrap()
        .unwrap();
    assert!(mirrored.delete_locked && !mirrored.protected_from_scale_set_actions);
    app.heartbeat_round().await;
    app.clear_compute_calls().await;
    let (_, answer) = app.invoke_timer("monitor-status").await;
    let sets = answer["ReturnValue"]["scale_sets"].as_array().unwrap();
    assert_eq!(
        (
            sets[0]["repairs_requested"].clone(),
            sets[1]["repairs_requested"].clone()
        ),
        (json!(0), json!(1)),
        "{answer}"
    );
    let writes: Vec<String> = app
        .compute_calls()
        .await
        .iter()
        .filter(|c| c["method"] != "GET")
        .map(|c| c["path"].as_str().unwrap().to_string())
        .collect();
    let api_1 = app.key_of("api", 1).await;
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert!(
        writes[0].ends_with(&format!("/virtualMachines/{api_1}/restart")),
        "{writes:?}"
    );
    let (journal, _) = app.recent_journal(&TestApp::scale_set("web")).await;
    let why = |instance: &str| {
        journal
            .iter()
            .find(|e| e.kind == EntryKind::Withheld && e.instance_id == instance)
            .map(|e| (e.outcome.clone(), e.reason.clone()))
            .unwrap_or_default()
    };
    let (outcome, reason) = why(&web_1);
    assert_eq!(outcome, "delete_locked", "{journal:?}");
    assert!(
        reason.contains("resource lock forbids deleting"),
        "{reason}"
    );
    assert_eq!(why(&web_2).0, "protected", "{journal:?}");

    // The lock list cannot be read (the role lacks it): the mirror is not rewritten as unlocked,
    // and the sync says the identity is not authorized, as for any other call it may not make.
    app.inject_fault(json!({"status": 403, "code": "AuthorizationFailed", "pathContains": "/Microsoft.Authorization/locks", "count": 10}))
        .await;
    let (_, answer) = app.invoke_timer("monitor-state").await;
    let outcomes = common::sync_outcomes(&answer);
    assert!(outcomes.iter().all(|o| *o == "unauthorized"), "{answer}");
    assert!(answer
        .to_string()
        .contains("list resource locks: HTTP 403 AuthorizationFailed"));
    let still = app
        .store
        .mirrored_instance(&TestApp::scale_set("web"), &web_1)
        .await
        .unwrap()
        .unwrap();
    assert!(still.delete_locked);
}
