//! Issue 12 item 8: no secret reaches a log line, an invocation's answer or an operator's output,
//! under every failure we can provoke — storage unreachable with a SAS connection string, a
//! malformed connection string with an account key, a webhook with a token that cannot be reached.

mod common;

use common::azurite::free_port;
use common::{heartbeat_event, now_rfc3339, spawn_app, IDENTITY_SECRET};
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

const SIG: &str = "c2lnbmF0dXJlLXRoYXQtbXVzdC1zdGF5LXNlY3JldA%3D%3D";
const ACCOUNT_KEY: &str = "YWNjb3VudC1rZXktdGhhdC1tdXN0LXN0YXktc2VjcmV0+/==";
const WEBHOOK_TOKEN: &str = "webhook-token-that-must-stay-secret";

/// Fails the test if `text` (named `what`) quotes any secret.
fn assert_no_secret(what: &str, text: &str) {
    for secret in [
        SIG,
        ACCOUNT_KEY,
        WEBHOOK_TOKEN,
        IDENTITY_SECRET,
        // The SAS decoded, as a client may print it.
        "c2lnbmF0dXJlLXRoYXQtbXVzdC1zdGF5LXNlY3JldA==",
    ] {
        assert!(
            !text.contains(secret),
            "{what} quotes a secret ({secret}):\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_failures_with_a_sas_never_quote_it() {
    // Storage that cannot be reached: every request fails, and the error names its URL — which
    // carries the SAS.
    let storage = format!(
        "TableEndpoint=http://127.0.0.1:{}/devstoreaccount1;SharedAccessSignature=sv=2023-11-03&ss=t&srt=sco&sp=rwdlacu&se=2099-01-01T00:00:00Z&sig={SIG}",
        free_port()
    );
    let app = spawn_app()
        .scale_set("web", 2)
        .env("HEALER_STORAGE", &storage)
        .start()
        .await;
    let mut answers = Vec::new();
    for function in ["monitor-state", "monitor-status"] {
        let (status, answer) = app.invoke_timer(function).await;
        assert_eq!(status, 503, "{function}: {answer}");
        answers.push(answer);
    }
    let vm_id = app.vm("web", 1).await["vm_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, answer) = app
        .deliver_event(heartbeat_event(
            "web",
            1,
            &vm_id,
            "UP",
            &now_rfc3339(time::Duration::ZERO),
        ))
        .await;
    assert_eq!(status, 503, "{answer}");
    answers.push(answer);
    for answer in &answers {
        assert_no_secret("an answer", &answer.to_string());
        let detail = answer["ReturnValue"]["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains("table storage unavailable"),
            "the answer still says what failed: {answer}"
        );
    }

    let (code, out, err) = app.cli(&["status"]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("sig=REDACTED"),
        "the error is kept, the SAS masked: {err}"
    );
    assert_no_secret("`handler status`", &format!("{out}{err}"));

    let logs = app
        .wait_for_log("invocation not carried out", Duration::from_secs(10))
        .await;
    assert!(logs.contains("sig=REDACTED"), "{logs}");
    assert_no_secret("the handler's log", &logs);
}

/// The handler started with `env` on top of a minimal valid configuration: its exit code and
/// everything it printed.
fn start_with(env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_handler"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", free_port().to_string())
        .env("HEALER_SCALE_SETS", common::scale_set_id("web"))
        .env("HEALER_ARM_ENDPOINT", "http://127.0.0.1:1")
        .env("IDENTITY_ENDPOINT", "http://127.0.0.1:1/msi/token")
        .env("IDENTITY_HEADER", IDENTITY_SECRET);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run the handler");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn malformed_settings_are_listed_without_their_secrets() {
    let cases = [
        (
            "a connection string with a key but a stray part",
            format!("AccountName=acct;AccountKey={ACCOUNT_KEY};NotAPair"),
        ),
        (
            "a key but no account",
            format!("DefaultEndpointsProtocol=https;AccountKey={ACCOUNT_KEY}"),
        ),
        (
            "a SAS and nowhere to use it",
            format!("SharedAccessSignature=sv=1&sig={SIG}"),
        ),
    ];
    for (name, storage) in cases {
        let (code, output) = start_with(&[
            ("HEALER_STORAGE", storage.as_str()),
            (
                "HEALER_WEBHOOK_URL",
                &format!("ftp://hooks.example/x?token={WEBHOOK_TOKEN}"),
            ),
        ]);
        assert_eq!(
            code, 2,
            "{name}: a misconfiguration stops the handler at startup:\n{output}"
        );
        assert!(output.contains("HEALER_STORAGE"), "{name}: {output}");
        assert_no_secret(name, &output);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_cannot_be_reached_is_logged_without_its_token() {
    let webhook = format!(
        "http://127.0.0.1:{}/hooks/alerts?code={WEBHOOK_TOKEN}",
        free_port()
    );
    let app = spawn_app()
        .scale_set("web", 3)
        .env("HEALER_WEBHOOK_URL", &webhook)
        .env("HEALER_REPAIR_ACTIONS", "restart")
        .start()
        .await;
    app.sync_and_break("web", 1, json!({"beat": "down"})).await;
    let (status, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["repairs_requested"],
        Value::from(1),
        "{answer}"
    );
    assert_no_secret("the answer", &answer.to_string());
    let logs = app
        .wait_for_log("webhook delivery failed", Duration::from_secs(20))
        .await;
    assert!(
        logs.contains("http://127.0.0.1"),
        "the log still says where alerts go: {logs}"
    );
    assert_no_secret("the handler's log", &logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_managed_identity_header_is_never_quoted() {
    // The platform's identity endpoint refuses the header the handler was given.
    const WRONG: &str = "identity-header-the-endpoint-refuses";
    let app = spawn_app()
        .scale_set("web", 2)
        .env("IDENTITY_HEADER", WRONG)
        .start()
        .await;
    let (status, answer) = app.invoke_timer("monitor-state").await;
    assert_eq!(status, 200, "{answer}");
    let outcome = answer["ReturnValue"]["scale_sets"][0]["outcome"]
        .as_str()
        .unwrap_or("");
    assert_ne!(outcome, "synced", "no token, no read: {answer}");
    let logs = app
        .wait_for_log("mirror sync failed", Duration::from_secs(10))
        .await;
    for (what, text) in [("the answer", answer.to_string()), ("the log", logs)] {
        assert!(
            !text.contains(WRONG),
            "{what} quotes the identity header:\n{text}"
        );
        assert_no_secret(what, &text);
    }
}
