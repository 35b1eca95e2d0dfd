//! The simulator's HTTP server: shared state, the managed-identity endpoint, and the router.
//! Used by the `compute-sim` binary and, in-process, by the `demo`.

use crate::admin::{self, Delivery};
use crate::arm;
use crate::world::World;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::Mutex;

#[derive(Clone)]
pub struct Shared {
    pub world: Arc<Mutex<World>>,
    pub base_url: String,
    pub identity_secret: String,
    pub heartbeat_target: Option<String>,
    pub delivery: Delivery,
    pub http: reqwest::Client,
}

impl Shared {
    pub fn new(
        world: World,
        port: u16,
        identity_secret: String,
        heartbeat_target: Option<String>,
        delivery: Delivery,
    ) -> Self {
        Shared {
            world: Arc::new(Mutex::new(world)),
            base_url: format!("http://127.0.0.1:{port}"),
            identity_secret,
            heartbeat_target,
            delivery,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
        }
    }
}

pub fn router(shared: Shared) -> Router {
    Router::new()
        .route("/msi/token", get(token))
        .merge(admin::routes())
        .fallback(arm::handle)
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            note_serving,
        ))
        .with_state(shared)
}

/// After every request (the only moments the world changes), what serves is noted.
async fn note_serving(
    State(s): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let response = next.run(request).await;
    s.world.lock().await.note_serving();
    response
}

/// Sends a heartbeat round, and the Resource Manager events raised meanwhile, every `interval`,
/// forever.
#[allow(dead_code)] // compute-sim's --heartbeat-interval-ms; the demo paces heartbeats itself
pub async fn publish_heartbeats(shared: Shared, target: String, interval: Duration) {
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(50)));
    loop {
        tick.tick().await;
        let mut round = admin::heartbeat_round(&shared).await;
        round.extend(admin::resource_event_round(&shared).await);
        admin::deliver(&shared.http, &target, shared.delivery, round).await;
    }
}

/// The App Service managed-identity endpoint (`IDENTITY_ENDPOINT`), api-version 2019-08-01.
async fn token(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let secret = headers
        .get("x-identity-header")
        .and_then(|v| v.to_str().ok());
    if secret != Some(s.identity_secret.as_str()) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid or missing X-IDENTITY-HEADER"})),
        )
            .into_response();
    }
    let Some(resource) = q.get("resource") else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "resource is required"})),
        )
            .into_response();
    };
    let access_token = format!("sim-{}", uuid::Uuid::new_v4());
    let expires = OffsetDateTime::now_utc() + time::Duration::hours(1);
    s.world
        .lock()
        .await
        .tokens
        .insert(access_token.clone(), expires);
    Json(json!({
        "access_token": access_token,
        "expires_on": expires.unix_timestamp().to_string(),
        "resource": resource,
        "token_type": "Bearer",
        "client_id": q.get("client_id").cloned().unwrap_or_else(|| "system-assigned".into()),
    }))
    .into_response()
}
