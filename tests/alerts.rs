//! Webhook alerts: repair, pause and resume arrive (retried when the webhook fails), and a webhook
//! that never answers does not delay a repair.

mod common;

use common::spawn_app;
use common::webhook::{start_receiver, wait_for_alerts, Receiver};
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_pause_and_resume_are_posted_and_failures_retried() {
    let (url, receiver) = start_receiver(Receiver {
        fail_first: AtomicUsize::new(2),
        ..Receiver::default()
    })
    .await;
    let app = spawn_app()
        .scale_set("web", 5)
        .env("HEALER_WEBHOOK_URL", &url)
        .env("HEALER_REPAIR_ACTIONS", "delete")
        .start()
        .await;
    app.invoke_timer("monitor-state").await;
    app.break_vm("web", 1, json!({"beat": "down"})).await;
    app.heartbeat_round().await;
    let (status, _) = app.invoke_timer("monitor-status").await;
    assert_eq!(status, 200);

    let alerts = wait_for_alerts(&receiver, 1, Duration::from_secs(30)).await;
    assert_eq!(alerts[0]["kind"], "repair");
    assert_eq!(alerts[0]["instance"], "1");
    assert_eq!(alerts[0]["action"], "delete");
    assert!(alerts[0]["scaleSet"]
        .as_str()
        .unwrap()
        .ends_with("/virtualMachineScaleSets/web"));
    assert_eq!(
        receiver.attempts.load(Ordering::SeqCst),
        3,
        "two failures, then delivered"
    );

    // Three of the four left go DOWN: the scale set short-circuits (pause), once.
    app.invoke_timer("monitor-state").await;
    for i in [0, 2, 3] {
        app.break_vm("web", i, json!({"beat": "down"})).await;
    }
    app.heartbeat_round().await;
    app.invoke_timer("monitor-status").await;
    app.invoke_timer("monitor-status").await;
    let alerts = wait_for_alerts(&receiver, 2, Duration::from_secs(10)).await;
    assert_eq!(alerts[1]["kind"], "pause");
    assert!(
        alerts[1]["reason"].as_str().unwrap().contains("unhealthy"),
        "{}",
        alerts[1]
    );

    // They recover: the brake releases and says so.
    for i in [0, 2, 3] {
        app.break_vm("web", i, json!({"beat": "up"})).await;
    }
    app.heartbeat_round().await;
    app.invoke_timer("monitor-status").await;
    let alerts = wait_for_alerts(&receiver, 3, Duration::from_secs(10)).await;
    assert_eq!(alerts[2]["kind"], "resume");
    assert_eq!(alerts.len(), 3, "one pause, not one per pass: {alerts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_never_answers_does_not_delay_a_repair() {
    let (url, receiver) = start_receiver(Receiver {
        hang: true,
        ..Receiver::default()
    })
    .await;
    let app = spawn_app()
        .scale_set("web", 5)
        .env("HEALER_WEBHOOK_URL", &url)
        .env("HEALER_REPAIR_ACTIONS", "delete")
        .start()
        .await;
    app.invoke_timer("monitor-state").await;
    app.break_vm("web", 2, json!({"beat": "down"})).await;
    app.heartbeat_round().await;

    let (status, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(status, 200);
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["repairs_requested"],
        json!(1),
        "{answer}"
    );
    assert_eq!(
        app.fleet("web").await["capacity"],
        json!(4),
        "the repair is done"
    );
    // The alert was attempted and is still hanging: the pass did not wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while receiver.attempts.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the alert was never attempted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(receiver.received.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_wide_silence_alerts_a_pipeline_fault_and_repairs_nothing() {
    let (url, receiver) = start_receiver(Receiver::default()).await;
    let app = spawn_app()
        .scale_set("web", 4)
        .scale_set("api", 4)
        .env("HEALER_WEBHOOK_URL", &url)
        .start()
        .await;
    app.invoke_timer("monitor-state").await;
    for set in ["web", "api"] {
        for i in 0..4 {
            let vm_id = app.vm(set, i).await["vm_id"].as_str().unwrap().to_string();
            let stale = common::heartbeat_event(
                set,
                i,
                &vm_id,
                "UP",
                &common::now_rfc3339(time::Duration::minutes(-10)),
            );
            app.deliver_event(stale).await;
        }
    }
    app.clear_compute_calls().await;
    let (_, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(
        answer["ReturnValue"]["pipeline_fault"],
        json!(true),
        "{answer}"
    );
    assert!(
        app.compute_calls()
            .await
            .iter()
            .all(|c| c["method"] == "GET"),
        "zero repairs"
    );
    let alerts = wait_for_alerts(&receiver, 2, Duration::from_secs(10)).await;
    for a in &alerts {
        assert_eq!(a["kind"], "pause", "{a}");
        assert!(
            a["reason"]
                .as_str()
                .unwrap()
                .contains("heartbeat pipeline fault"),
            "{a}"
        );
    }
}
