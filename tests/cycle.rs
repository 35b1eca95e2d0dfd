//! The rolling cycle end to end (issue 15): `handler cycle` writes the operation, each
//! `monitor-status` pass advances it against the simulator, and what the fleet serves stays above
//! `--min-healthy` throughout.

mod common;

use common::webhook::{start_receiver, wait_for_alerts, Receiver};
use common::{spawn_app, Mode, TestApp};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use vmss_healer::journal::EntryKind;

/// One round of the Function App's timers and the fleet: the simulator's running operations end,
/// every live VM reports, the mirror pass, then the status pass (whose answer is returned).
async fn round(app: &TestApp) -> Value {
    app.complete_operations().await;
    app.heartbeat_round().await;
    let (status, answer) = app.invoke_timer("monitor-state").await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(status, 200, "{answer}");
    answer
}

/// The scale set's operation as the status pass reported it.
fn operation(answer: &Value) -> &Value {
    &answer["ReturnValue"]["scale_sets"][0]["operation"]
}

/// Instances serving: provisioned and running in the simulator, not being reimaged.
async fn serving(app: &TestApp, name: &str) -> usize {
    app.fleet(name).await["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["provisioning_state"] == "Succeeded" && v["power_state"] == "running")
        .count()
}

/// How often the simulator was asked to reimage each instance.
async fn reimaged(app: &TestApp) -> BTreeMap<u64, usize> {
    let mut out = BTreeMap::new();
    for op in app.operations().await {
        if let Some(ids) = op["effect"]["Reimage"].as_array() {
            for id in ids {
                *out.entry(id.as_u64().unwrap()).or_default() += 1;
            }
        }
    }
    out
}

fn start(app: &TestApp, args: &[&str]) -> String {
    let mut all = vec!["cycle", "web"];
    all.extend_from_slice(args);
    let (code, out, err) = app.cli(&all);
    assert_eq!(code, 0, "{out}{err}");
    out
}

/// Rounds until the operation's state is one of `states`; the answers of every round.
async fn until(app: &TestApp, states: &[&str], limit: Duration) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    let mut answers = Vec::new();
    loop {
        let answer = round(app).await;
        let state = operation(&answer)["state"]
            .as_str()
            .unwrap_or("")
            .to_string();
        answers.push(answer);
        if states.contains(&state.as_str()) {
            return answers;
        }
        assert!(
            Instant::now() < deadline,
            "not {states:?} in time: {:#}",
            answers.last().unwrap()
        );
    }
}

in_both_modes!(twenty_instances_in_batches_of_twenty_percent_never_below_eighty,);

async fn twenty_instances_in_batches_of_twenty_percent_never_below_eighty(mode: Mode) {
    let app = spawn_app().mode(mode).scale_set("web", 20).start().await;
    round(&app).await;
    // Reimages run until the next round ends them: the batch is out of service meanwhile.
    app.operation_delay_ms(3_600_000).await;
    let told = start(&app, &["--reason", "monthly refresh"]);
    assert!(told.contains("pending"), "{told}");

    let deadline = Instant::now() + Duration::from_secs(120);
    let mut lowest = usize::MAX;
    let mut progress_seen = false;
    loop {
        let answer = round(&app).await;
        lowest = lowest.min(serving(&app, "web").await);
        let op = operation(&answer);
        if op["state"] == "succeeded" {
            break;
        }
        assert_eq!(op["state"], "running", "{answer:#}");
        if !progress_seen && op["progress"].as_str().unwrap().contains("batch 2") {
            // `handler status --json` shows the running cycle: n of N, the batch, what it waits for.
            let (code, out, err) = app.cli(&["status", "--json"]);
            assert_eq!(code, 0, "{err}");
            let status: Value = serde_json::from_str(&out).unwrap();
            let running = &status["operations"][0];
            assert_eq!(running["kind"], "cycle");
            assert_eq!(running["total"], 20);
            assert_eq!(running["done"], 4, "{running:#}");
            assert_eq!(running["step"], "batch 2");
            assert_eq!(running["holds"].as_array().unwrap().len(), 4);
            assert!(
                running["waiting"].as_str().unwrap().contains("batch 2"),
                "{running:#}"
            );
            assert!(running["wait_until"].is_string());
            let (_, text, _) = app.cli(&["status"]);
            assert!(text.contains("4 of 20 (batch 2)"), "{text}");
            progress_seen = true;
        }
        assert!(
            Instant::now() < deadline,
            "the cycle did not finish: {answer:#}"
        );
    }
    assert!(progress_seen);
    assert!(lowest >= 16, "only {lowest} of 20 serving at one point");
    // Every instance reimaged exactly once, four at a time, nothing else done to the set.
    let times = reimaged(&app).await;
    assert_eq!(times.len(), 20, "{times:?}");
    assert!(times.values().all(|n| *n == 1), "{times:?}");
    assert_eq!(serving(&app, "web").await, 20);
    let calls = app.compute_calls().await;
    assert!(
        !calls
            .iter()
            .any(|c| c["method"] == "PATCH" || c["path"].as_str().unwrap().ends_with("/delete")),
        "no surge was needed and nothing was deleted"
    );
    // The journal has every step under the operation's id.
    let (journal, _) = app.recent_journal(&TestApp::scale_set("web")).await;
    let ops: Vec<_> = journal
        .iter()
        .filter(|e| e.kind == EntryKind::Operation)
        .collect();
    let id = ops[0].incident.clone();
    assert!(id.starts_with("cycle-"));
    assert!(ops.iter().all(|e| e.incident == id));
    assert_eq!(ops.iter().filter(|e| e.outcome == "cycled").count(), 20);
    assert!(ops.iter().any(|e| e.outcome == "succeeded"));
    assert!(ops.iter().any(|e| e.outcome == "operator_start"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_instance_set_is_surged_to_two_and_given_back() {
    let app = spawn_app().scale_set("web", 1).start().await;
    round(&app).await;
    start(&app, &[]);
    let answers = until(&app, &["succeeded"], Duration::from_secs(60)).await;
    // Never without a serving instance: the surge first, the reimage once it served, then back.
    let fleet = app.fleet("web").await;
    let vms = fleet["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 1, "{fleet:#}");
    assert_eq!(vms[0]["instance_id"], 0, "the original instance stays");
    assert_eq!(reimaged(&app).await, BTreeMap::from([(0, 1)]));
    let writes: Vec<String> = app
        .compute_calls()
        .await
        .iter()
        .filter(|c| c["method"] != "GET")
        .map(|c| {
            let path = c["path"].as_str().unwrap();
            format!(
                "{} {}",
                c["method"].as_str().unwrap(),
                path.rsplit('/').next().unwrap()
            )
        })
        .collect();
    assert_eq!(
        writes,
        vec!["PATCH web", "POST reimage", "POST delete"],
        "{answers:#?}"
    );
    // The surge kept the scale set's version: If-Match on the capacity write.
    let patch = app
        .compute_calls()
        .await
        .into_iter()
        .find(|c| c["method"] == "PATCH")
        .unwrap();
    assert!(patch["if_match"].is_string(), "{patch}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_never_returns_pauses_the_cycle_with_an_alert_and_resume_goes_on() {
    let (url, receiver) = start_receiver(Receiver::default()).await;
    let app = spawn_app()
        .scale_set("web", 5)
        .env("HEALER_WEBHOOK_URL", &url)
        .start()
        .await;
    round(&app).await;
    app.operation_delay_ms(3_600_000).await;
    start(&app, &["--batch", "1", "--timeout", "3s"]);
    let answer = round(&app).await;
    let held = operation(&answer)["progress"].as_str().unwrap().to_string();
    assert!(held.contains("batch 1"), "{answer:#}");
    // The first instance of the batch never comes back from its reimage.
    let first = app
        .cli(&["operations", "--json"])
        .1
        .parse::<Value>()
        .unwrap()[0]["holds"][0]
        .as_str()
        .unwrap()
        .to_string();
    let n: u64 = first.parse().unwrap();
    app.break_vm(
        "web",
        n,
        serde_json::json!({"beat": "silent", "fault": "hard"}),
    )
    .await;
    let answers = until(&app, &["paused"], Duration::from_secs(60)).await;
    let paused = operation(answers.last().unwrap());
    assert!(
        paused["progress"]
            .as_str()
            .unwrap()
            .contains("failed_batch"),
        "{paused:#}"
    );
    // Other alerts may come first (the healer takes the broken instance over): wait for ours.
    let deadline = Instant::now() + Duration::from_secs(30);
    let alert = loop {
        let seen = receiver.received.lock().unwrap().len();
        let alerts = wait_for_alerts(&receiver, seen.max(1), Duration::from_secs(30)).await;
        if let Some(a) = alerts.iter().find(|a| a["kind"] == "operation") {
            break a.clone();
        }
        assert!(Instant::now() < deadline, "no operation alert: {alerts:?}");
        wait_for_alerts(&receiver, alerts.len() + 1, Duration::from_secs(30)).await;
    };
    assert!(
        alert["reason"]
            .as_str()
            .unwrap()
            .contains("did not return healthy"),
        "{alert}"
    );
    assert!(alert["incident"].as_str().unwrap().starts_with("cycle-"));

    // Paused, it does nothing more.
    let before = reimaged(&app).await;
    round(&app).await;
    assert_eq!(reimaged(&app).await, before);

    let id = alert["incident"].as_str().unwrap();
    let (code, out, err) = app.cli(&["operation", "resume", id, "--reason", "0 is the healer's"]);
    assert_eq!(code, 0, "{out}{err}");
    until(&app, &["succeeded"], Duration::from_secs(60)).await;
    let (_, list, _) = app.cli(&["operations", "--json"]);
    let done: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(done[0]["done"], 4, "{done:#}");
    assert_eq!(done[0]["total"], 5);
    // The cycle reimaged each instance once (the broken one too, before it failed).
    let (journal, _) = app.recent_journal(&TestApp::scale_set("web")).await;
    let batches: Vec<&str> = journal
        .iter()
        .filter(|e| e.kind == EntryKind::Operation && e.outcome == "batch")
        .map(|e| e.instance_id.as_str())
        .collect();
    assert_eq!(batches.len(), 5, "{batches:?}");
    assert!(journal.iter().any(|e| e.kind == EntryKind::Operation
        && e.outcome == "failed"
        && e.instance_id == first));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_fault_in_the_middle_holds_the_cycle_until_heartbeats_return() {
    let app = spawn_app()
        .scale_set("web", 10)
        .env("HEALER_HEARTBEAT_TIMEOUT", "4s")
        .env("HEALER_STARTUP_TIMEOUT", "4s")
        .start()
        .await;
    round(&app).await;
    start(&app, &["--batch", "2"]);
    round(&app).await;
    round(&app).await;
    // Heartbeats stop reaching the handler (the pipeline, not the fleet): rounds without them.
    let deadline = Instant::now() + Duration::from_secs(30);
    let held = loop {
        app.complete_operations().await;
        app.invoke_timer("monitor-state").await;
        let (_, answer) = app.invoke_timer("monitor-status").await;
        if answer["ReturnValue"]["pipeline_fault"] == true {
            break answer;
        }
        assert!(Instant::now() < deadline, "no pipeline fault: {answer:#}");
    };
    let op = operation(&held);
    assert_eq!(op["state"], "running", "{held:#}");
    assert!(
        op["progress"]
            .as_str()
            .unwrap()
            .contains("held by the brake"),
        "{op:#}"
    );
    let calls = app.compute_calls().await.len();
    let before = reimaged(&app).await;
    for _ in 0..3 {
        app.invoke_timer("monitor-state").await;
        app.invoke_timer("monitor-status").await;
    }
    assert_eq!(
        reimaged(&app).await,
        before,
        "nothing new while the brake holds"
    );
    assert!(
        app.compute_calls().await[calls..]
            .iter()
            .all(|c| c["method"] == "GET"),
        "only reads"
    );
    // Heartbeats return: the cycle goes on and finishes, every instance once.
    until(&app, &["succeeded"], Duration::from_secs(60)).await;
    let times = reimaged(&app).await;
    assert_eq!(times.len(), 10);
    assert!(times.values().all(|n| *n == 1), "{times:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_restarted_mid_cycle_resumes_it() {
    let mut app = spawn_app().scale_set("web", 10).start().await;
    round(&app).await;
    app.operation_delay_ms(3_600_000).await;
    start(&app, &["--batch", "3", "--min-healthy", "7"]);
    round(&app).await;
    round(&app).await;
    let pid = app.handler_pid();
    app.restart_handler(&[]);
    assert_ne!(app.handler_pid(), pid);
    until(&app, &["succeeded"], Duration::from_secs(60)).await;
    let times = reimaged(&app).await;
    assert_eq!(times.len(), 10);
    assert!(times.values().all(|n| *n == 1), "{times:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_journals_every_batch_and_calls_nothing() {
    let app = spawn_app().scale_set("web", 1).start().await;
    round(&app).await;
    app.clear_compute_calls().await;
    let told = start(&app, &["--dry-run"]);
    assert!(told.contains("dry run"), "{told}");
    until(&app, &["succeeded"], Duration::from_secs(60)).await;
    let writes: Vec<Value> = app
        .compute_calls()
        .await
        .into_iter()
        .filter(|c| c["method"] != "GET")
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
    let (journal, _) = app.recent_journal(&TestApp::scale_set("web")).await;
    let steps: Vec<&str> = journal
        .iter()
        .rev()
        .filter(|e| e.kind == EntryKind::Operation)
        .map(|e| e.outcome.as_str())
        .collect();
    // Even the surge a single instance needs is decided and journaled.
    for step in ["operator_start", "started", "surge", "batch", "succeeded"] {
        assert!(steps.contains(&step), "{step}: {steps:?}");
    }
    assert!(journal
        .iter()
        .filter(|e| e.kind == EntryKind::Operation)
        .all(|e| e.dry_run));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_and_a_second_cycle_are_refused_with_every_reason() {
    let app = spawn_app().scale_set("web", 3).start().await;
    let (code, out, err) = app.cli(&[
        "cycle",
        "web",
        "--action",
        "rebuild",
        "--batch",
        "0",
        "--timeout",
        "soon",
    ]);
    assert_eq!(code, 2, "{out}{err}");
    for needle in ["--action `rebuild`", "--batch", "--timeout"] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    let (code, _, err) = app.cli(&["cycle", "nosuchset"]);
    assert_eq!(code, 2, "{err}");
    start(&app, &[]);
    let (code, _, err) = app.cli(&["cycle", "web"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("one per scale set"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_brings_only_outdated_instances_to_the_latest_model() {
    let app = spawn_app().scale_set("web", 5).start().await;
    round(&app).await;
    let model = format!("scalesets/{}/model", TestApp::key("web"));
    app.admin(reqwest::Method::POST, &model, None).await;
    let (status, answer) = app.invoke_timer("monitor-state").await;
    assert_eq!(status, 200, "{answer}");
    start(
        &app,
        &["--action", "upgrade", "--batch", "2", "--min-healthy", "3"],
    );
    let answers = until(&app, &["succeeded"], Duration::from_secs(60)).await;
    let fleet = app.fleet("web").await;
    assert!(
        fleet["vms"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["latest_model_applied"] == true),
        "{fleet:#}"
    );
    let upgrades: Vec<Value> = app
        .operations()
        .await
        .into_iter()
        .filter(|o| o["effect"]["Upgrade"].is_array())
        .collect();
    let upgraded: usize = upgrades
        .iter()
        .map(|o| o["effect"]["Upgrade"].as_array().unwrap().len())
        .sum();
    assert_eq!(upgraded, 5, "{upgrades:?}");
    assert!(
        reimaged(&app).await.is_empty(),
        "an upgrade is not a reimage"
    );
    assert_eq!(
        operation(answers.last().unwrap())["progress"],
        "5 of 5 (done)"
    );

    // Again, with nothing outdated: nothing to do.
    start(&app, &["--action", "upgrade"]);
    let answers = until(&app, &["succeeded"], Duration::from_secs(30)).await;
    assert_eq!(operation(answers.last().unwrap())["progress"], "done");
    let again: usize = app
        .operations()
        .await
        .into_iter()
        .filter(|o| o["effect"]["Upgrade"].is_array())
        .count();
    assert_eq!(again, upgrades.len(), "nothing was upgraded twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_batch_is_sent_again_once_the_subscription_may_be_called() {
    let app = spawn_app().scale_set("web", 5).start().await;
    round(&app).await;
    app.inject_fault(serde_json::json!({
        "method": "POST", "pathContains": "/reimage", "status": 429, "retryAfter": 1
    }))
    .await;
    start(&app, &["--batch", "1", "--min-healthy", "4"]);
    until(&app, &["succeeded"], Duration::from_secs(60)).await;
    let times = reimaged(&app).await;
    assert_eq!(times.len(), 5, "{times:?}");
    assert!(times.values().all(|n| *n == 1), "{times:?}");
    let (journal, _) = app.recent_journal(&TestApp::scale_set("web")).await;
    assert!(
        journal
            .iter()
            .any(|e| e.kind == EntryKind::Operation && e.outcome == "throttled"),
        "the refusal is journaled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_started_in_the_second_an_earlier_one_began_never_overwrites_it() {
    use vmss_healer::operations::{Kind, Operation, State};
    let app = spawn_app().scale_set("web", 2).start().await;
    // Finished cycles whose ids cover the seconds around now.
    let now = time::OffsetDateTime::now_utc();
    for s in -2..8 {
        let mut done = Operation::new(
            Kind::Cycle,
            TestApp::scale_set("web"),
            serde_json::json!({}),
            "earlier".into(),
            false,
            now + time::Duration::seconds(s),
        );
        done.state = State::Succeeded;
        app.store.start_operation(&done).await.unwrap();
    }
    let (code, out, err) = app.cli(&["cycle", "web", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let started: Value = serde_json::from_str(&out).unwrap();
    let (ops, _) = app.store.operations(None).await.unwrap();
    assert_eq!(ops.len(), 11, "the earlier ten kept, one added");
    let new: Vec<_> = ops.iter().filter(|o| o.value.id == started["id"]).collect();
    assert_eq!(new.len(), 1);
    assert_eq!(new[0].value.state, State::Pending);
}
