//! The Azure Functions custom-handler contract (design §1): the HTTP server the host talks to,
//! the invocation envelope, and the always-JSON answer.

use crate::compute::Compute;
use crate::functions;
use crate::settings::Settings;
use crate::state::Store;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// What every request handler shares: cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: Store,
    pub compute: Compute,
    pub notifier: crate::alert::Notifier,
    pub counters: Arc<Counters>,
}

/// Rejected events by reason, since start: the "counted" of design §1.
#[derive(Debug, Default)]
pub struct Counters {
    rejected: Mutex<BTreeMap<&'static str, u64>>,
}

impl Counters {
    pub fn reject(&self, label: &'static str) -> u64 {
        let mut map = match self.rejected.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        let n = map.entry(label).or_insert(0);
        *n += 1;
        *n
    }
}

/// The host's request: `Data` holds one entry per input binding, `Metadata` the trigger metadata.
#[derive(Debug, Deserialize)]
pub struct Invocation {
    #[serde(rename = "Data", default)]
    pub data: Map<String, Value>,
    #[serde(rename = "Metadata", default)]
    pub metadata: Value,
}

impl Invocation {
    /// The single trigger input, whatever the binding is named (`event`, `timer`, …).
    pub fn trigger(&self, preferred: &str) -> Option<&Value> {
        self.data.get(preferred).or_else(|| {
            (self.data.len() == 1)
                .then(|| self.data.values().next())
                .flatten()
        })
    }
}

/// The answer the host expects: always a JSON object with these three members.
#[derive(Debug, Serialize, Default)]
pub struct Outcome {
    #[serde(rename = "Outputs")]
    pub outputs: Map<String, Value>,
    #[serde(rename = "Logs")]
    pub logs: Vec<String>,
    #[serde(rename = "ReturnValue")]
    pub return_value: Value,
}

impl Outcome {
    pub fn new(log: impl Into<String>, return_value: Value) -> Self {
        Outcome {
            outputs: Map::new(),
            logs: vec![log.into()],
            return_value,
        }
    }
}

/// Errors answered to the host. Only `Transient` is worth a retry (non-2xx ⇒ redelivery).
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{0}")]
    BadRequest(String),
    #[error("unknown function `{0}`; this handler serves monitor-events, monitor-status and monitor-state")]
    UnknownFunction(String),
    #[error("transient failure, retry later: {0:#}")]
    Transient(anyhow::Error),
    #[error("{0:#}")]
    Internal(anyhow::Error),
}

impl IntoResponse for HostError {
    fn into_response(self) -> Response {
        let status = match &self {
            HostError::BadRequest(_) => StatusCode::BAD_REQUEST,
            HostError::UnknownFunction(_) => StatusCode::NOT_FOUND,
            HostError::Transient(_) => StatusCode::SERVICE_UNAVAILABLE,
            HostError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = self.to_string();
        tracing::error!(status = status.as_u16(), error = %message, "invocation failed");
        let body = json!({"Outputs": {}, "Logs": [message.clone()], "ReturnValue": null, "error": message});
        (status, Json(body)).into_response()
    }
}

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/", get(ready))
        .route("/{function}", post(invoke))
        .fallback(unknown_route)
        .with_state(state)
}

/// The host polls this until the handler answers.
async fn ready() -> Json<Value> {
    Json(
        json!({"status": "ready", "functions": ["monitor-events", "monitor-status", "monitor-state"]}),
    )
}

async fn unknown_route() -> HostError {
    HostError::BadRequest("the Functions host posts invocations to /{function-name}".into())
}

async fn invoke(
    State(state): State<AppState>,
    Path(function): Path<String>,
    body: Result<Json<Invocation>, JsonRejection>,
) -> Result<Json<Outcome>, HostError> {
    let known = ["monitor-events", "monitor-status", "monitor-state"];
    if !known.contains(&function.as_str()) {
        return Err(HostError::UnknownFunction(function));
    }
    let Json(invocation) = body.map_err(|e| {
        HostError::BadRequest(format!(
            "invocation body is not a host invocation: {}",
            e.body_text()
        ))
    })?;
    let outcome = match function.as_str() {
        "monitor-events" => functions::monitor_events::run(&state, invocation).await?,
        "monitor-status" => functions::monitor_status::run(&state, invocation).await?,
        _ => functions::monitor_state::run(&state, invocation).await?,
    };
    Ok(Json(outcome))
}
