//! Issue 12 item 12: a burst of deliveries is served at a bounded pace. Unbounded, every
//! concurrent delivery opened its own storage connection (2,000 deliveries: 2,800 connections and
//! 177 MiB held for good); the memory figures are in docs/benchmarks.md (`bench load`).

mod common;

use common::{heartbeat_event, now_rfc3339, spawn_app};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use vmss_healer::admission::{MAX_CONCURRENT_INVOCATIONS, MAX_CONNECTIONS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_answered_in_full_with_bounded_storage_connections() {
    let app = spawn_app().scale_set("web", 3).start().await;
    app.invoke_timer("monitor-state").await;
    let vm_id = app.vm("web", 1).await["vm_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (pid, storage) = (app.handler_pid(), app.azurite.port);

    let sampling = Arc::new(AtomicBool::new(true));
    let peak = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (sampling, peak) = (sampling.clone(), peak.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(
                    common::sockets::connections_to(pid, storage),
                    Ordering::Relaxed,
                );
                tokio::task::yield_now().await;
            }
        })
    };
    // More deliveries than the handler holds connections, from a client that keeps every
    // connection open once answered (as a pooling client may): none may be left waiting.
    let deliveries = 2 * MAX_CONNECTIONS;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(deliveries)
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .unwrap();
    let url = format!("{}/monitor-events", app.handler_url);
    let sends = (0..deliveries).map(|n| {
        let mut event = heartbeat_event("web", 1, &vm_id, "UP", &now_rfc3339(time::Duration::ZERO));
        event["data"]["sequence"] = n.into();
        let body = serde_json::json!({"Data": {"event": event}, "Metadata": {}});
        let (http, url) = (http.clone(), url.clone());
        async move {
            http.post(url)
                .json(&body)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    let answers = futures::future::join_all(sends).await;
    sampling.store(false, Ordering::Relaxed);
    sampler.await.unwrap();
    let answered = answers.iter().filter(|a| matches!(a, Ok(200))).count();
    assert_eq!(
        answered,
        deliveries,
        "{:?}",
        answers.iter().find(|a| !matches!(a, Ok(200)))
    );
    let peak = peak.load(Ordering::Relaxed);
    assert!(
        peak <= 2 * MAX_CONCURRENT_INVOCATIONS,
        "{peak} storage connections at once for {deliveries} concurrent deliveries"
    );
}
