//! The operator's commands of the `handler` binary against a running deployment: `status` shows
//! what the healer sees and did; `journal` its audit trail; `pause` / `resume` set a manual brake
//! `monitor-status` obeys.

mod common;

use common::{spawn_app, TestApp};
use serde_json::{json, Value};
use vmss_healer::journal::EntryKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_pause_and_resume() {
    let app = spawn_app()
        .scale_set("web", 6)
        .scale_set("api", 4)
        .env("HEALER_REPAIR_ACTIONS", "restart,replace")
        .start()
        .await;
    let web = TestApp::scale_set("web");

    // An operator pauses `web` before maintenance work; the pause is journaled.
    app.invoke_timer("monitor-state").await;
    let (code, out, err) = app.cli(&["pause", "web", "--reason", "kernel upgrade, ticket 4711"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("paused"), "{out}");
    app.sync_and_break("web", 2, json!({"beat": "down"})).await;
    app.break_vm("api", 1, json!({"beat": "down"})).await;
    app.heartbeat_round().await;

    // monitor-status obeys: nothing on `web`, `api` heals.
    let (_, answer) = app.invoke_timer("monitor-status").await;
    let report = |answer: &Value, key: &str| {
        answer["ReturnValue"]["scale_sets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["scale_set"] == TestApp::key(key))
            .cloned()
            .unwrap()
    };
    assert_eq!(
        report(&answer, "web")["paused"],
        "paused_by_operator",
        "{answer}"
    );
    assert_eq!(report(&answer, "web")["repairs_requested"], 0, "{answer}");
    assert_eq!(report(&answer, "api")["repairs_requested"], 1, "{answer}");

    // status, as JSON: counts, the brake with its note, api's incident, the journal.
    let (code, out, err) = app.cli(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: Value = serde_json::from_str(&out).unwrap();
    let set = |name: &str| {
        status["scale_sets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
            .unwrap()
    };
    let (w, a) = (set("web"), set("api"));
    assert_eq!(
        (
            w["total"].clone(),
            w["healthy"].clone(),
            w["unhealthy"].clone()
        ),
        (json!(6), json!(5), json!(1)),
        "{w}"
    );
    assert_eq!(w["brake"], "paused_by_operator", "{w}");
    assert!(
        w["brake_reason"].as_str().unwrap().contains("ticket 4711"),
        "{w}"
    );
    assert_eq!(a["repairing"], 1, "{a}");
    assert_eq!(a["incidents"][0]["instance"], "1", "{a}");
    assert_eq!(a["incidents"][0]["action"], "restart", "{a}");
    assert!(
        w["recent"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["outcome"] == "operator_pause"),
        "{w}"
    );

    // … and as text.
    let (code, text, _) = app.cli(&["status"]);
    assert_eq!(code, 0);
    assert!(text.contains("PAUSED (paused_by_operator)"), "{text}");
    assert!(text.contains("on #1: repairing"), "{text}");

    // Mistakes are the operator's: exit 2, with the watched list.
    let (code, _, err) = app.cli(&["pause", "nope"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("not a watched scale set") && err.contains("virtualMachineScaleSets/web"),
        "{err}"
    );
    let (code, _, _) = app.cli(&["resume"]);
    assert_eq!(code, 2);

    // Resumed: the next pass repairs `web` too.
    let (code, _, err) = app.cli(&["resume", &common::scale_set_id("web")]);
    assert_eq!(code, 0, "{err}");
    let (_, answer) = app.invoke_timer("monitor-status").await;
    assert!(report(&answer, "web")["paused"].is_null(), "{answer}");
    assert_eq!(report(&answer, "web")["repairs_requested"], 1, "{answer}");
    let (journal, _) = app.recent_journal(&web).await;
    let operator: Vec<&str> = journal
        .iter()
        .filter(|e| e.kind == EntryKind::Withheld && e.outcome.starts_with("operator_"))
        .map(|e| e.outcome.as_str())
        .collect();
    assert_eq!(operator, ["operator_resume", "operator_pause"]);
}

/// `handler journal`: the audit trail an operator reads after the fact — one instance's incident
/// from its decision to its outcome, oldest first, across the watched sets or one; filtered by
/// instance, incident and kind; the newest rows with `--limit`; with the evidence (always in
/// `--json`); bad arguments all named at once, exit 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_tells_an_instances_story_oldest_first() {
    let app = spawn_app()
        .scale_set("web", 4)
        .scale_set("api", 4)
        .env("HEALER_REPAIR_ACTIONS", "restart")
        .start()
        .await;
    app.sync_and_break("web", 2, json!({"beat": "down"})).await;
    app.break_vm("api", 1, json!({"beat": "down"})).await;
    app.heartbeat_round().await;
    let (status, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(status, 200, "{answer}");
    app.complete_operations().await;
    app.heartbeat_round().await;
    app.invoke_timer("monitor-state").await;
    app.invoke_timer("monitor-status").await;

    // Both sets, oldest first: the intent before the request, the request before the outcome.
    let (code, out, err) = app.cli(&["journal", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    let story = |rows: &[Value], set: &str, instance: &str| -> Vec<String> {
        rows.iter()
            .filter(|r| r["scale_set"]["name"] == set && r["instance_id"] == instance)
            .map(|r| {
                format!(
                    "{}:{}",
                    r["kind"].as_str().unwrap(),
                    r["outcome"].as_str().unwrap()
                )
            })
            .collect()
    };
    let web2 = story(&rows, "web", "2");
    let at = |s: &str| web2.iter().position(|x| x == s);
    assert!(
        at("intent:sending") < at("repair:requested") && at("repair:requested").is_some(),
        "{web2:?}"
    );
    assert!(
        web2.iter()
            .skip_while(|x| *x != "repair:requested")
            .any(|x| x.starts_with("outcome:") || x.starts_with("step:")),
        "the outcome follows the request: {web2:?}"
    );
    assert!(!story(&rows, "api", "1").is_empty(), "every watched set");
    let times: Vec<&str> = rows.iter().map(|r| r["at"].as_str().unwrap()).collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted, "oldest first");
    assert!(
        rows.iter().all(|r| !r["evidence"].is_null()),
        "with evidence"
    );
    // Its times read as times (RFC 3339), not as lists of numbers.
    let request = rows
        .iter()
        .find(|r| r["kind"] == "repair" && r["instance_id"] == "2")
        .unwrap();
    let created = &request["evidence"]["instance"]["created_at"];
    assert!(
        created.as_str().is_some_and(|t| t.contains('T')),
        "{created}"
    );

    // One set, one instance, one kind; the newest row only.
    let (code, out, err) = app.cli(&[
        "journal",
        "web",
        "--instance",
        "2",
        "--kind",
        "repair",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let only: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert!(!only.is_empty());
    assert!(
        only.iter().all(|r| r["scale_set"]["name"] == "web"
            && r["instance_id"] == "2"
            && r["kind"] == "repair"),
        "{out}"
    );
    let incident = only[0]["incident"].as_str().unwrap().to_string();
    let (_, out, _) = app.cli(&["journal", "--incident", &incident, "--json"]);
    let same: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(
        story(&same, "web", "2"),
        web2,
        "an incident's rows are the instance's here"
    );
    let (_, out, _) = app.cli(&["journal", "web", "--limit", "1", "--json"]);
    let last: Vec<Value> = serde_json::from_str(&out).unwrap();
    let web_rows: Vec<&Value> = rows
        .iter()
        .filter(|r| r["scale_set"]["name"] == "web")
        .collect();
    assert_eq!(last.len(), 1);
    assert_eq!(&last[0], *web_rows.last().unwrap(), "the newest");

    // As text: a line per row, the evidence on request.
    let (code, text, _) = app.cli(&["journal", "web", "--instance", "2"]);
    assert_eq!(code, 0);
    assert_eq!(text.lines().count(), web2.len(), "{text}");
    assert!(
        text.contains("#2") && text.contains("requested") && text.contains("restart"),
        "{text}"
    );
    assert!(!text.contains("evidence:"), "{text}");
    let (_, text, _) = app.cli(&["journal", "web", "--instance", "2", "--evidence"]);
    assert!(text.contains("evidence: {"), "{text}");
    let (_, text, _) = app.cli(&["journal", "web", "--instance", "99"]);
    assert_eq!(text, "no journal row\n");

    // The operator's mistakes: every one named, exit 2.
    let (code, _, err) = app.cli(&[
        "journal",
        "--kind",
        "repairs,withheld",
        "--since",
        "yesterday",
        "--limit",
        "0",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("`repairs` is not a kind")
            && err.contains("--since")
            && err.contains("--limit"),
        "{err}"
    );
    let (code, _, err) = app.cli(&["journal", "nope"]);
    assert_eq!(code, 2);
    assert!(err.contains("not a watched scale set"), "{err}");
}

/// `handler journal --follow`: each new row as it is written, once, without the operator asking
/// again — here the repair requests of two instances broken one after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_journal_shows_each_new_row_once() {
    use std::io::BufRead;
    let app = spawn_app()
        .scale_set("web", 4)
        .env("HEALER_REPAIR_ACTIONS", "restart")
        .start()
        .await;
    let mut child = app.cli_spawn(&["journal", "web", "--kind", "repair", "--follow", "--json"]);
    let stdout = child.0.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines: Vec<Value> = Vec::new();
    let wait_for = |instance: &str, lines: &mut Vec<Value>| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !lines.iter().any(|l| l["instance_id"] == instance) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no row for #{instance} within 30 s: {lines:?}"));
            lines.push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}")));
        }
    };
    app.sync_and_break("web", 2, json!({"beat": "down"})).await;
    app.heartbeat_round().await;
    let (status, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(status, 200, "{answer}");
    wait_for("2", &mut lines);
    // Later passes and another repair: #3's row comes, #2's never again.
    app.invoke_timer("monitor-status").await;
    app.break_vm("web", 3, json!({"beat": "down"})).await;
    app.heartbeat_round().await;
    app.invoke_timer("monitor-status").await;
    wait_for("3", &mut lines);
    drop(child);
    let instances: Vec<&str> = lines
        .iter()
        .map(|l| l["instance_id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(instances, ["2", "3"], "each row once: {lines:?}");
    assert!(lines
        .iter()
        .all(|l| l["kind"] == "repair" && l["outcome"] == "requested"));
}

/// Issue 13: help needs no settings — an operator asks for it before configuring anything.
#[test]
fn every_command_prints_its_help_without_settings() {
    for args in [
        vec!["--help"],
        vec!["status", "--help"],
        vec!["journal", "--help"],
        vec!["journal", "--follow", "--help"],
        vec!["pause", "--help"],
        vec!["resume", "--help"],
        vec!["operations", "--help"],
        vec!["operation", "pause", "--help"],
        vec!["operation", "abort", "--help"],
        vec!["cycle", "--help"],
        vec!["help", "status"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_handler"))
            .args(&args)
            .env_clear()
            .output()
            .expect("run the handler");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{args:?}: {}{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("Usage: handler"), "{args:?}: {text}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_handler"))
        .args(["status", "--jsn"])
        .env_clear()
        .output()
        .expect("run the handler");
    assert_eq!(
        out.status.code(),
        Some(2),
        "a mistyped flag is a usage error"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--json"));
}

/// Issue 13: an optional setting is never fatal. A Key Vault reference the platform could not
/// resolve yet (its role is granted after the app; references refresh about daily) arrives as the
/// literal `@Microsoft.KeyVault(...)`: the handler serves, and says what is wrong where an
/// operator looks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresolved_key_vault_reference_in_an_optional_setting_leaves_the_handler_serving() {
    let reference =
        "@Microsoft.KeyVault(SecretUri=https://kv-healer.vault.azure.net/secrets/webhook/)";
    let app = spawn_app()
        .scale_set("web", 3)
        .env("HEALER_WEBHOOK_URL", reference)
        .start()
        .await;
    app.sync_and_break("web", 1, serde_json::json!({"beat": "down"}))
        .await;
    let (status, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["repairs_requested"], 1,
        "repairs go on without alerts: {answer}"
    );
    let logs = app.logs();
    assert!(
        logs.contains("HEALER_WEBHOOK_URL") && logs.contains("Key Vault reference"),
        "the startup log says so: {logs}"
    );
    let (code, text, err) = app.cli(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("HEALER_WEBHOOK_URL") && text.contains("alerts are not sent"),
        "{text}"
    );
    let (_, json, _) = app.cli(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(
        json["settings_warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("HEALER_WEBHOOK_URL")),
        "{json}"
    );
}

/// Design §7: an operator lists the long-running operations and pauses, resumes or aborts one;
/// each command is journaled; a command the operation's state does not allow, or an id that is
/// not there, is the operator's mistake (exit 2) and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_are_listed_paused_resumed_and_aborted() {
    use vmss_healer::operations::{Kind, Operation, State};
    let app = spawn_app().scale_set("web", 3).start().await;
    let (code, out, err) = app.cli(&["operations"]);
    assert_eq!((code, out.as_str()), (0, "no operation\n"), "{err}");
    let now = time::OffsetDateTime::now_utc();
    let mut op = Operation::new(
        Kind::Cycle,
        TestApp::scale_set("web"),
        json!({"batch": "20%"}),
        "ops: monthly refresh".into(),
        false,
        now,
    );
    op.state = State::Running;
    op.total = 3;
    op.done = 1;
    op.step = "batch 2".into();
    app.store.start_operation(&op).await.unwrap();

    let (code, out, err) = app.cli(&["operations", "web"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&op.id) && out.contains("running") && out.contains("1 of 3 (batch 2)"),
        "{out}"
    );
    let (code, out, _) = app.cli(&["operations", "--json"]);
    assert_eq!(code, 0);
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed[0]["state"], "running", "{listed}");

    let (code, out, err) = app.cli(&["operation", "pause", &op.id, "--reason", "traffic peak"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("running → paused"), "{out}");
    let (_, status, _) = app.cli(&["status"]);
    assert!(
        status.contains(&format!(
            "operation {} on rg-fleet/web: paused, 1 of 3 (batch 2)",
            op.id
        )),
        "{status}"
    );
    // Resuming twice: the second is refused and changes nothing.
    assert_eq!(app.cli(&["operation", "resume", &op.id]).0, 0);
    let (code, _, err) = app.cli(&["operation", "resume", &op.id]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is running: cannot resume"), "{err}");
    let (code, _, err) = app.cli(&["operation", "abort", "cycle-1", "--scale-set", "web"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no operation `cycle-1`"), "{err}");
    assert_eq!(
        app.cli(&["operation", "abort", &op.id, "--reason", "wrong set"])
            .0,
        0
    );
    let (ops, _) = app.store.operations(None).await.unwrap();
    assert_eq!(ops[0].value.state, State::Aborted);
    assert!(ops[0].value.holds.is_empty());

    // The audit trail: each command, with the operation's id and the note.
    let (journal, _) = app.recent_journal(&TestApp::scale_set("web")).await;
    let rows: Vec<(&str, &str)> = journal
        .iter()
        .filter(|e| e.kind == EntryKind::Operation)
        .map(|e| (e.incident.as_str(), e.outcome.as_str()))
        .collect();
    assert_eq!(
        rows,
        [
            (op.id.as_str(), "operator_abort"),
            (op.id.as_str(), "operator_resume"),
            (op.id.as_str(), "operator_pause"),
        ],
        "newest first"
    );
    assert!(journal.iter().any(|e| e.reason.contains("traffic peak")));
}

/// Design §7, one claim per instance: what a running operation holds, the healer's repairs leave
/// alone (journaled as such); once the operation is over, the instance is the healer's again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_healer_never_repairs_what_an_operation_holds() {
    use vmss_healer::operations::{Kind, Operation, State};
    // Six instances: two of them down stays under the short-circuit's 40 %.
    let app = spawn_app()
        .scale_set("web", 6)
        .env("HEALER_REPAIR_ACTIONS", "restart")
        .start()
        .await;
    let mut op = Operation::new(
        Kind::Cycle,
        TestApp::scale_set("web"),
        json!({}),
        "ops".into(),
        false,
        time::OffsetDateTime::now_utc(),
    );
    // Paused where it stands (a running cycle would move on, and its engine is not the point
    // here): what it holds stays held.
    op.state = State::Paused;
    op.holds = vec!["1".into()];
    app.store.start_operation(&op).await.unwrap();
    app.sync_and_break("web", 1, json!({"beat": "down"})).await;
    app.break_vm("web", 2, json!({"beat": "down"})).await;
    app.heartbeat_round().await;

    let (_, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["repairs_requested"], 1,
        "{answer}"
    );
    let restarted: Vec<Value> = app
        .compute_calls()
        .await
        .into_iter()
        .filter(|c| c["method"] == "POST")
        .collect();
    assert_eq!(restarted.len(), 1, "{restarted:?}");
    let (journal, _) = app.recent_journal(&TestApp::scale_set("web")).await;
    let held = journal
        .iter()
        .find(|e| e.instance_id == "1" && e.kind == EntryKind::Withheld)
        .expect("the held instance's withholding is journaled");
    assert_eq!(held.outcome, "held_by_operation");
    assert!(held.reason.contains(&op.id), "{}", held.reason);

    // The operation ends: instance 1 is the healer's again.
    assert_eq!(app.cli(&["operation", "abort", &op.id]).0, 0);
    app.heartbeat_round().await;
    let (_, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["repairs_requested"], 1,
        "{answer}"
    );
}
