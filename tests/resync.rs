//! The event-driven mirror: between full resyncs `monitor-state` reads only the scale sets that
//! Resource Manager events, failures or our own repairs point at; the full resync catches what no
//! event announced; a change that is not mirrored in time pauses repairs.

mod common;

use common::{spawn_app, TestApp};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use vmss_healer::journal::EntryKind;
use vmss_healer::mirror::AppHealth;

fn outcome<'a>(answer: &'a Value, name: &str) -> &'a Value {
    answer["ReturnValue"]["scale_sets"]
        .as_array()
        .expect("a scale set list")
        .iter()
        .find(|s| s["scale_set"] == TestApp::key(name))
        .unwrap_or_else(|| panic!("{name} not in {answer}"))
}

/// The scale sets whose instances the simulator was asked for.
async fn sets_read(app: &TestApp) -> Vec<String> {
    let mut names: Vec<String> = app
        .compute_calls()
        .await
        .iter()
        .filter(|c| c["method"] == "GET")
        .filter_map(|c| {
            let path = c["path"].as_str()?.to_lowercase();
            let rest = path.split("/virtualmachinescalesets/").nth(1)?;
            Some(rest.split('/').next()?.to_string())
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn between_full_reads_only_announced_changes_are_read() {
    let app = spawn_app()
        .scale_set("web", 5)
        .scale_set("api", 5)
        .scale_set("jobs", 5)
        .env("HEALER_FULL_RESYNC", "1h")
        .start()
        .await;

    let (_, first) = app.invoke_timer("monitor-state").await;
    for name in ["web", "api", "jobs"] {
        assert_eq!(outcome(&first, name)["read"], "first_sync", "{first}");
    }
    app.clear_compute_calls().await;

    // Nothing happened: nothing is read.
    let (status, quiet) = app.invoke_timer("monitor-state").await;
    assert_eq!(status, 200, "{quiet}");
    for name in ["web", "api", "jobs"] {
        assert_eq!(outcome(&quiet, name)["outcome"], "fresh", "{quiet}");
    }
    assert_eq!(quiet["ReturnValue"]["compute_calls"], 0, "{quiet}");
    assert!(app.compute_calls().await.is_empty());

    // Autoscale grows `api`: Resource Manager says so, and only `api` is read.
    app.set_capacity("api", 7).await;
    assert_eq!(app.resource_events().await, 1);
    let (_, after) = app.invoke_timer("monitor-state").await;
    assert_eq!(outcome(&after, "api")["read"], "changed", "{after}");
    assert_eq!(outcome(&after, "api")["written"], 2, "{after}");
    assert_eq!(outcome(&after, "web")["outcome"], "fresh", "{after}");
    assert_eq!(outcome(&after, "jobs")["outcome"], "fresh", "{after}");
    assert_eq!(sets_read(&app).await, ["api"]);
    assert_eq!(
        app.store
            .mirror(&TestApp::scale_set("api"))
            .await
            .unwrap()
            .0
            .len(),
        7
    );

    // An instance made protected through ARM is an event too.
    app.clear_compute_calls().await;
    app.break_vm("jobs", 1, json!({"protectFromScaleSetActions": true}))
        .await;
    assert_eq!(app.resource_events().await, 1);
    app.invoke_timer("monitor-state").await;
    assert_eq!(sets_read(&app).await, ["jobs"]);
    let jobs_1 = app
        .store
        .mirrored_instance(&TestApp::scale_set("jobs"), "1")
        .await
        .unwrap()
        .expect("instance 1 mirrored");
    assert!(jobs_1.protected_from_scale_set_actions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_resync_catches_what_no_event_announced() {
    let app = spawn_app()
        .scale_set("web", 4)
        .env("HEALER_FULL_RESYNC", "2s")
        .start()
        .await;
    let set = TestApp::scale_set("web");
    let started = Instant::now();
    app.invoke_timer("monitor-state").await;
    // The guest's health extension turns unhealthy: the platform raises no Resource Manager event.
    app.break_vm("web", 2, json!({"health": "unhealthy"})).await;
    assert_eq!(app.resource_events().await, 0);

    let deadline = Instant::now() + Duration::from_secs(20);
    let read = loop {
        let (_, answer) = app.invoke_timer("monitor-state").await;
        let web = outcome(&answer, "web").clone();
        if web["outcome"] == "synced" {
            break web;
        }
        assert_eq!(web["outcome"], "fresh", "{answer}");
        assert!(Instant::now() < deadline, "no full resync within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(read["read"], "full_resync", "{read}");
    // Each scale set's interval is between three quarters and all of the setting.
    assert!(started.elapsed() >= Duration::from_millis(1500));
    let vm = app
        .store
        .mirrored_instance(&set, "2")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(vm.health, Some(AppHealth::Unhealthy));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_is_followed_until_its_effect_is_mirrored() {
    let app = spawn_app()
        .scale_set("web", 6)
        .scale_set("api", 6)
        .env("HEALER_FULL_RESYNC", "1h")
        .start()
        .await;
    let set = TestApp::scale_set("web");
    app.sync_and_break("web", 2, json!({"beat": "down"})).await;

    let (status, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["repairs_requested"], 1,
        "{answer}"
    );
    // The Resource Manager events of the repair are not delivered here: the repair pass itself
    // asks the next mirror pass to read the scale set it acted on, and only that one.
    app.clear_compute_calls().await;
    let (_, synced) = app.invoke_timer("monitor-state").await;
    assert_eq!(outcome(&synced, "web")["read"], "changed", "{synced}");
    assert_eq!(outcome(&synced, "api")["outcome"], "fresh", "{synced}");
    assert_eq!(sets_read(&app).await, ["web"]);
    let ids = |app: &TestApp| {
        let store = app.store.clone();
        let set = set.clone();
        async move {
            store
                .mirror(&set)
                .await
                .unwrap()
                .0
                .iter()
                .map(|m| m.instance.instance_id.clone())
                .collect::<Vec<String>>()
        }
    };
    let surged = ids(&app).await;
    assert!(surged.contains(&"2".to_string()), "{surged:?}");
    assert_eq!(
        surged.len(),
        7,
        "the surge's new instance is mirrored: {surged:?}"
    );

    // Its operation followed and the new instance mirrored, the broken one is deleted.
    let (_, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(
        (
            &answer["ReturnValue"]["scale_sets"][0]["operations_ended"],
            &answer["ReturnValue"]["scale_sets"][0]["repairs_requested"]
        ),
        (&json!(1), &json!(1)),
        "{answer}"
    );
    let (_, synced) = app.invoke_timer("monitor-state").await;
    assert_eq!(outcome(&synced, "web")["read"], "changed", "{synced}");
    let replaced = ids(&app).await;
    assert!(!replaced.contains(&"2".to_string()), "{replaced:?}");
    assert_eq!(replaced.len(), 6, "capacity kept: {replaced:?}");

    app.heartbeat_round().await;
    app.invoke_timer("monitor-status").await;
    let (journal, _) = app.recent_journal(&set).await;
    let closed: Vec<&str> = journal
        .iter()
        .filter(|e| e.kind == EntryKind::Outcome && e.instance_id == "2")
        .map(|e| e.outcome.as_str())
        .collect();
    assert_eq!(closed, ["replaced"], "{journal:?}");

    // Nothing in flight any more: the set is left to the full resync again.
    app.invoke_timer("monitor-state").await;
    let (_, quiet) = app.invoke_timer("monitor-state").await;
    assert_eq!(outcome(&quiet, "web")["outcome"], "fresh", "{quiet}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_not_mirrored_in_time_pauses_repairs() {
    let app = spawn_app()
        .scale_set("web", 6)
        .env("HEALER_FULL_RESYNC", "1h")
        .env("HEALER_MIRROR_MAX_AGE", "1")
        .start()
        .await;
    let set = TestApp::scale_set("web");
    app.invoke_timer("monitor-state").await;
    app.heartbeat_round().await;

    // Autoscale changes the set, and every read of it fails from now on.
    app.set_capacity("web", 8).await;
    assert_eq!(app.resource_events().await, 1);
    app.inject_fault(json!({"method": "GET", "status": 500, "count": 1000}))
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let paused = loop {
        let (_, sync) = app.invoke_timer("monitor-state").await;
        assert_eq!(outcome(&sync, "web")["read"], "changed", "{sync}");
        let (_, status) = app.invoke_timer("monitor-status").await;
        let web = status["ReturnValue"]["scale_sets"][0].clone();
        if !web["paused"].is_null() {
            break web;
        }
        assert!(Instant::now() < deadline, "never paused: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(paused["paused"], "stale_mirror", "{paused}");
    let (journal, _) = app.recent_journal(&set).await;
    let pause = journal
        .iter()
        .find(|e| e.kind == EntryKind::Withheld && e.outcome == "stale_mirror")
        .expect("the pause is journaled");
    assert!(
        pause.reason.contains("not mirrored yet"),
        "{}",
        pause.reason
    );

    // A VM reporting DOWN now is not repaired on a mirror known to be behind.
    app.break_vm("web", 4, json!({"beat": "down"})).await;
    app.heartbeat_round().await;
    let (_, status) = app.invoke_timer("monitor-status").await;
    assert_eq!(
        status["ReturnValue"]["scale_sets"][0]["repairs_requested"], 0,
        "{status}"
    );

    // The Compute API recovers: the set is read, and repairs resume.
    app.admin(reqwest::Method::DELETE, "faults", None).await;
    let (_, sync) = app.invoke_timer("monitor-state").await;
    assert_eq!(outcome(&sync, "web")["outcome"], "synced", "{sync}");
    let (_, status) = app.invoke_timer("monitor-status").await;
    let web = &status["ReturnValue"]["scale_sets"][0];
    assert!(web["paused"].is_null(), "{status}");
    assert_eq!(web["repairs_requested"], 1, "{status}");
}

/// Issue 14: a Flexible set's instances are plain VMs, whose Resource Manager events name the VM,
/// not its set. Such an event has the Flexible sets of the VM's resource group read; a Uniform
/// set there holds no plain VM and stays fresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_vm_event_has_the_flexible_sets_of_its_group_read() {
    let app = spawn_app()
        .scale_set("web", 3)
        .mode(common::Mode::Flexible)
        .scale_set("fa", 3)
        .scale_set("fb", 3)
        .env("HEALER_FULL_RESYNC", "1h")
        .start()
        .await;
    app.invoke_timer("monitor-state").await;
    app.clear_compute_calls().await;

    let vm = app.resource_id_of("fa", 1).await;
    for (kind, uri) in [
        (
            "Microsoft.Resources.ResourceActionSuccess",
            format!("{vm}/restart"),
        ),
        ("Microsoft.Resources.ResourceDeleteSuccess", vm.clone()),
    ] {
        let event = json!({"id": uuid::Uuid::new_v4().to_string(), "eventType": kind, "subject": uri,
            "eventTime": common::now_rfc3339(time::Duration::ZERO), "dataVersion": "2",
            "data": {"resourceUri": uri, "operationName": "Microsoft.Compute/virtualMachines/restart/action"}});
        let (status, answer) = app.deliver_event(event).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["ReturnValue"]["accepted"], true, "{answer}");
        let (_, pass) = app.invoke_timer("monitor-state").await;
        assert_eq!(outcome(&pass, "fa")["read"], "changed", "{pass}");
        assert_eq!(outcome(&pass, "fb")["read"], "changed", "{pass}");
        assert_eq!(outcome(&pass, "web")["outcome"], "fresh", "{pass}");
        assert_eq!(sets_read(&app).await, ["fa", "fb"]);
        app.clear_compute_calls().await;
    }
    // A VM of a group where no scale set is watched is refused, and counted.
    let stray = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/elsewhere/providers/Microsoft.Compute/virtualMachines/x";
    let event = json!({"id": "stray", "eventType": "Microsoft.Resources.ResourceWriteSuccess", "subject": stray,
        "eventTime": common::now_rfc3339(time::Duration::ZERO), "dataVersion": "2",
        "data": {"resourceUri": stray, "operationName": "Microsoft.Compute/virtualMachines/write"}});
    let (status, answer) = app.deliver_event(event).await;
    assert_eq!(
        (status, &answer["ReturnValue"]["reason"]),
        (200, &json!("unknown_scale_set")),
        "{answer}"
    );
}

/// `HEALER_JOURNAL_DAYS`: a full read of a scale set (not its first) deletes its journal rows
/// past their retention and says how many; `0` keeps them for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_read_deletes_journal_rows_past_their_retention() {
    use time::{Duration as Span, OffsetDateTime};
    use vmss_healer::journal::Entry;
    for (days, pruned) in [("1", 3), ("0", 0)] {
        let app = spawn_app()
            .scale_set("web", 2)
            .env("HEALER_JOURNAL_DAYS", days)
            .start()
            .await;
        let web = TestApp::scale_set("web");
        let now = OffsetDateTime::now_utc();
        let row = |i: i64, at: OffsetDateTime| Entry {
            scale_set: web.clone(),
            instance_id: i.to_string(),
            at,
            incident: format!("{i}-1"),
            kind: EntryKind::Withheld,
            action: None,
            attempt: 0,
            outcome: "cooldown".into(),
            reason: "a step ran recently".into(),
            evidence: Value::Null,
            dry_run: false,
        };
        let rows: Vec<Entry> = (0..3)
            .map(|i| row(i, now - Span::days(2)))
            .chain((0..2).map(|i| row(i, now - Span::minutes(5))))
            .collect();
        app.store.append_journal(&rows).await.unwrap();
        // The first read of a set leaves its journal alone; the full reads after it prune.
        let (_, first) = app.invoke_timer("monitor-state").await;
        assert_eq!(outcome(&first, "web")["read"], "first_sync", "{first}");
        assert_eq!(outcome(&first, "web")["journal_pruned"], 0, "{first}");
        let (status, answer) = app.invoke_timer("monitor-state").await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(outcome(&answer, "web")["read"], "full_resync", "{answer}");
        assert_eq!(
            outcome(&answer, "web")["journal_pruned"],
            pruned,
            "HEALER_JOURNAL_DAYS={days}: {answer}"
        );
        let (left, _) = app.store.journal(&web, now - Span::days(30)).await.unwrap();
        assert_eq!(left.len(), 5 - pruned, "HEALER_JOURNAL_DAYS={days}");
    }
}
