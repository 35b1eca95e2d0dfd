//! A webhook receiver standing in for `HEALER_WEBHOOK_URL`: records the alerts it gets, and can
//! fail or hang on purpose.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::Value;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct Receiver {
    /// Fail this many requests with 500 before accepting.
    pub fail_first: AtomicUsize,
    /// Never answer (a dead webhook that keeps connections open).
    pub hang: bool,
    pub attempts: AtomicUsize,
    pub received: Mutex<Vec<Value>>,
}

async fn receive(State(r): State<Arc<Receiver>>, Json(body): Json<Value>) -> StatusCode {
    r.attempts.fetch_add(1, Ordering::SeqCst);
    if r.hang {
        std::future::pending::<()>().await;
    }
    if r.fail_first.load(Ordering::SeqCst) > 0 {
        r.fail_first.fetch_sub(1, Ordering::SeqCst);
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    r.received.lock().unwrap().push(body);
    StatusCode::OK
}

pub async fn start_receiver(receiver: Receiver) -> (String, Arc<Receiver>) {
    let receiver = Arc::new(receiver);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, receiver)
}

/// Waits until `count` alerts arrived, or fails after `limit`.
pub async fn wait_for_alerts(r: &Receiver, count: usize, limit: Duration) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    loop {
        let got = r.received.lock().unwrap().clone();
        if got.len() >= count {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {count} alerts arrived: {got:?}",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
