//! The blue/green swap end to end (issue 16): `handler swap` writes the operation, each
//! `monitor-status` pass advances it against the simulator, whose history of what served shows
//! that no moment had fewer instances serving than at the start.

mod common;

use common::webhook::{start_receiver, wait_for_alerts, Receiver};
use common::{scale_set_id, spawn_app, TestApp, IDENTITY_SECRET, RG, SUB};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vmss_healer::journal::EntryKind;

/// One round of the Function App's timers and the fleet: the simulator's running operations end,
/// every live VM reports (those with a Terminate event drain and approve it), the mirror pass,
/// then the status pass (whose answer is returned).
async fn round(app: &TestApp) -> Value {
    round_watching(app, None).await
}

/// A round that, with `drained`, notes whether any of blue's stored heartbeats says DRAINING
/// right after the VMs reported (before the mirror drops the instances that left).
async fn round_watching(app: &TestApp, drained: Option<&AtomicBool>) -> Value {
    app.heartbeat_round().await;
    if let Some(flag) = drained {
        let (heartbeats, _) = app
            .store
            .heartbeats(&TestApp::scale_set("blue"))
            .await
            .unwrap();
        if heartbeats
            .values()
            .any(|h| matches!(h.status, vmss_healer::heartbeat::Status::Draining { .. }))
        {
            flag.store(true, Ordering::SeqCst);
        }
    }
    app.complete_operations().await;
    let (status, answer) = app.invoke_timer("monitor-state").await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(status, 200, "{answer}");
    answer
}

/// The swap as the status pass reported it (on its `from` set, the first).
fn operation(answer: &Value) -> &Value {
    &answer["ReturnValue"]["scale_sets"][0]["operation"]
}

async fn until(
    app: &TestApp,
    states: &[&str],
    limit: Duration,
    drained: Option<&AtomicBool>,
    each: impl AsyncFn(&TestApp),
) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    let mut answers = Vec::new();
    loop {
        each(app).await;
        let answer = round_watching(app, drained).await;
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

fn autoscale_url(name: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Insights/autoscalesettings{name}?api-version=2022-10-01"
    )
}

/// A request to the simulator's Resource Manager, as an operator's tool would send it.
async fn arm(app: &TestApp, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    let token: Value = app
        .http
        .get(format!(
            "{}/msi/token?api-version=2019-08-01&resource=https://management.azure.com",
            app.sim_url
        ))
        .header("X-IDENTITY-HEADER", IDENTITY_SECRET)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut request = app
        .http
        .request(method, format!("{}{path}", app.sim_url))
        .bearer_auth(token["access_token"].as_str().unwrap());
    if let Some(body) = body {
        request = request.json(&body);
    }
    let r = request.send().await.unwrap();
    assert!(r.status().is_success(), "{path}: {}", r.status());
    r.json().await.unwrap_or(Value::Null)
}

async fn two_sets(extra: &[(&str, &str)]) -> TestApp {
    let mut builder = spawn_app()
        .scale_set_spec(json!({"name": "blue", "capacity": 4, "terminateNotificationSeconds": 600}))
        .scale_set_spec(
            json!({"name": "green", "capacity": 0, "terminateNotificationSeconds": 600}),
        );
    for (k, v) in extra {
        builder = builder.env(k, v);
    }
    let app = builder.start().await;
    // Blue's autoscale setting, as the sample deploys it.
    arm(
        &app,
        reqwest::Method::PUT,
        &autoscale_url("/as-blue"),
        Some(json!({"location": "westeurope", "properties": {
            "enabled": true, "targetResourceUri": scale_set_id("blue"),
            "profiles": [{"name": "default", "capacity": {"minimum": "2", "maximum": "10", "default": "4"},
                "rules": [{"metricTrigger": {"metricName": "Percentage CPU", "metricResourceUri": scale_set_id("blue")}}]}]
        }})),
    )
    .await;
    round(&app).await;
    app
}

fn start(app: &TestApp, args: &[&str]) -> String {
    let mut all = vec!["swap", "blue", "green"];
    all.extend_from_slice(args);
    let (code, out, err) = app.cli(&all);
    assert_eq!(code, 0, "{out}{err}");
    out
}

/// What served in each set, each time that changed: (blue, green).
async fn serving(app: &TestApp) -> Vec<(u64, u64)> {
    let history = app.admin(reqwest::Method::GET, "serving", None).await;
    let (b, g) = (TestApp::key("blue"), TestApp::key("green"));
    history
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["sets"][&b].as_u64().unwrap_or(0),
                p["sets"][&g].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

fn operation_outcomes(journal: &[vmss_healer::journal::Entry]) -> Vec<String> {
    // The journal is newest first.
    journal
        .iter()
        .rev()
        .filter(|e| e.kind == EntryKind::Operation && e.incident.starts_with("swap-"))
        .map(|e| e.outcome.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_under_steady_traffic_moves_everything_and_never_serves_fewer() {
    let app = two_sets(&[]).await;
    let started = serving(&app).await.len();
    let out = start(&app, &["--soak", "2s", "--reason", "release v2"]);
    assert!(out.contains("swap to"), "{out}");
    // Blue's instances drain before they go: DRAINING is seen among its stored heartbeats.
    let drained = AtomicBool::new(false);
    let answers = until(
        &app,
        &["succeeded", "failed"],
        Duration::from_secs(120),
        Some(&drained),
        async |_| {},
    )
    .await;
    let last = operation(answers.last().unwrap());
    assert_eq!(last["state"], "succeeded", "{last:#}");
    assert!(
        drained.load(Ordering::SeqCst),
        "blue's instances never said DRAINING"
    );

    // Green serves at full capacity, blue is at zero.
    assert_eq!(app.fleet("green").await["capacity"], 4);
    assert_eq!(app.fleet("blue").await["capacity"], 0);
    // Autoscale moved: a setting for green with blue's range and rules, blue's disabled.
    let listed = arm(&app, reqwest::Method::GET, &autoscale_url(""), None).await;
    let settings = listed["value"].as_array().unwrap();
    let on = |set: &str| {
        settings
            .iter()
            .find(|s| s["properties"]["targetResourceUri"].as_str() == Some(&scale_set_id(set)))
            .unwrap_or_else(|| panic!("no setting for {set}: {listed}"))
    };
    assert_eq!(on("blue")["properties"]["enabled"], false);
    let green = &on("green")["properties"];
    assert_eq!(green["enabled"], true);
    assert_eq!(green["profiles"][0]["capacity"]["maximum"], "10");
    assert_eq!(
        green["profiles"][0]["rules"][0]["metricTrigger"]["metricResourceUri"],
        json!(scale_set_id("green"))
    );
    // A round later autoscale still holds blue at zero (its setting is off) and green at four.
    round(&app).await;
    assert_eq!(app.fleet("blue").await["capacity"], 0);

    // No moment with fewer than the four that served at the start, by the simulator's history.
    let history = serving(&app).await;
    assert!(history.len() > started, "{history:?}");
    let low = history[started - 1..]
        .iter()
        .map(|(b, g)| b + g)
        .min()
        .unwrap();
    assert!(low >= 4, "serving fell to {low}: {history:?}");
    assert!(
        history.iter().any(|(b, g)| *g == 4 && *b < 4),
        "blue drained while green served: {history:?}"
    );
    assert_eq!(history.last(), Some(&(0, 4)));

    // The journal tells the steps in order: the old set let go only after the soak.
    let (journal, _) = app.recent_journal(&TestApp::scale_set("blue")).await;
    let outcomes = operation_outcomes(&journal);
    // Steps of one pass share its time: the order is by time, equal within a pass.
    let at = |o: &str| {
        journal
            .iter()
            .filter(|e| e.incident.starts_with("swap-"))
            .find(|e| e.outcome == o)
            .map(|e| e.at)
            .unwrap_or_else(|| panic!("{o} missing: {outcomes:?}"))
    };
    assert!(at("operator_start") < at("started"));
    assert!(at("started") < at("scaled_out"));
    assert!(at("scaled_out") < at("soaked"), "the soak lasted");
    assert!(at("soaked") <= at("autoscale_moved"));
    assert!(at("autoscale_moved") <= at("scale_in"));
    assert!(
        at("scale_in") < at("succeeded"),
        "the old set drained first"
    );
    let started_entry = journal
        .iter()
        .find(|e| e.outcome == "started" && e.incident.starts_with("swap-"))
        .unwrap();
    assert_eq!(
        started_entry.evidence["from"][0]["name"], "as-blue",
        "the autoscale settings are journaled at the start: {started_entry:?}"
    );
    // Every request of the swap is one the roles allow (infra/), autoscale read and written.
    let mut used = std::collections::BTreeSet::new();
    for call in app.compute_calls().await {
        let (method, path) = (
            call["method"].as_str().unwrap(),
            call["path"].as_str().unwrap(),
        );
        if path.starts_with("/msi/") {
            continue;
        }
        let action = vmss_healer::compute::required_action(method, path)
            .unwrap_or_else(|| panic!("{method} {path} is not covered by REQUIRED_ACTIONS"));
        used.insert(action);
    }
    for action in &vmss_healer::compute::AUTOSCALE_ACTIONS[..2] {
        assert!(used.contains(action), "{action} unused: {used:?}");
    }
    // Both sets are free again.
    let (code, out, err) = app.cli(&["cycle", "green", "--dry-run"]);
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_set_that_never_becomes_healthy_is_rolled_back_with_the_old_set_untouched() {
    let (url, receiver) = start_receiver(Receiver::default()).await;
    let app = two_sets(&[("HEALER_WEBHOOK_URL", &url)]).await;
    app.clear_compute_calls().await;
    start(&app, &["--soak", "1s", "--timeout", "8s"]);
    // Green's instances come up, but their application reports DOWN.
    let answers = until(
        &app,
        &["failed", "succeeded"],
        Duration::from_secs(90),
        None,
        async |app: &TestApp| {
            let fleet = app.fleet("green").await;
            for vm in fleet["vms"].as_array().unwrap() {
                if vm["beat"] != "down" {
                    app.break_vm(
                        "green",
                        vm["instance_id"].as_u64().unwrap(),
                        json!({"beat": "down"}),
                    )
                    .await;
                }
            }
        },
    )
    .await;
    let last = operation(answers.last().unwrap());
    assert_eq!(last["state"], "failed", "{last:#}");
    assert!(
        answers
            .iter()
            .any(|a| operation(a)["state"] == "rolling_back"),
        "it rolled back first"
    );
    // Green is back at zero; blue was never written to, and serves as before.
    app.complete_operations().await;
    assert_eq!(app.fleet("green").await["capacity"], 0);
    assert_eq!(app.fleet("blue").await["capacity"], 4);
    let blue = scale_set_id("blue").to_ascii_lowercase();
    let writes: Vec<Value> = app
        .compute_calls()
        .await
        .into_iter()
        .filter(|c| c["method"] != "GET")
        .filter(|c| {
            c["path"]
                .as_str()
                .unwrap()
                .to_ascii_lowercase()
                .starts_with(&blue)
        })
        .collect();
    assert!(writes.is_empty(), "blue was written to: {writes:?}");
    let listed = arm(&app, reqwest::Method::GET, &autoscale_url(""), None).await;
    assert_eq!(
        listed["value"].as_array().unwrap().len(),
        1,
        "nothing moved: {listed}"
    );
    assert_eq!(listed["value"][0]["properties"]["enabled"], true);
    assert!(serving(&app).await.iter().all(|(b, _)| *b == 4));
    // The operator hears of it.
    let alerts = wait_for_alerts(&receiver, 1, Duration::from_secs(30)).await;
    let alert = alerts
        .iter()
        .find(|a| a["kind"] == "operation")
        .unwrap_or_else(|| panic!("no operation alert: {alerts:?}"));
    assert!(
        alert["reason"].as_str().unwrap().contains("rolled back"),
        "{alert}"
    );
    let (journal, _) = app.recent_journal(&TestApp::scale_set("blue")).await;
    let outcomes = operation_outcomes(&journal);
    assert!(outcomes.contains(&"rollback".to_string()), "{outcomes:?}");
    assert_eq!(outcomes.last().map(String::as_str), Some("failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_is_refused_with_every_reason_and_holds_both_sets() {
    let app = two_sets(&[]).await;
    let (code, _, err) = app.cli(&["swap", "blue", "blue", "--soak", "soon", "--capacity", "0"]);
    assert_eq!(code, 2, "{err}");
    for why in ["same scale set", "--soak", "--capacity"] {
        assert!(err.contains(why), "{why}: {err}");
    }
    let (code, _, err) = app.cli(&["swap", "blue", "nosuchset"]);
    assert_eq!(code, 2, "{err}");
    start(&app, &["--dry-run"]);
    // Both sets are held: no cycle of either, no second swap.
    for args in [
        &["cycle", "green"][..],
        &["cycle", "blue"],
        &["swap", "green", "blue"],
    ] {
        let (code, _, err) = app.cli(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("one per scale set"), "{err}");
    }
    // A dry run walks every step and writes nothing.
    app.clear_compute_calls().await;
    let answers = until(
        &app,
        &["succeeded", "failed"],
        Duration::from_secs(60),
        None,
        async |_| {},
    )
    .await;
    assert_eq!(operation(answers.last().unwrap())["state"], "succeeded");
    let writes: Vec<Value> = app
        .compute_calls()
        .await
        .into_iter()
        .filter(|c| c["method"] != "GET")
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
    assert_eq!(app.fleet("blue").await["capacity"], 4);
}
