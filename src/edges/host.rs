//! The Azure Functions custom-handler contract (design §1): the HTTP server the host talks to,
//! the invocation envelope, and the always-JSON answer.

use crate::compute::Compute;
use crate::functions;
use crate::settings::Settings;
use crate::state::Store;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tracing::Instrument;

/// What every request handler shares: cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: Store,
    pub compute: Compute,
    pub notifier: crate::alert::Notifier,
    pub counters: Arc<Counters>,
    /// Scale sets evaluated at once when evidence arrives by event (issue 19).
    pub prompts: Arc<crate::prompt::Prompts>,
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

/// Why an invocation was not carried out. Only `Transient` is worth a retry: the host turns any
/// non-2xx answer into a failed invocation (and drops its `Logs`), and the Event Grid extension
/// then answers 500 to Event Grid, which redelivers for up to 24 h and slows every delivery to the
/// endpoint. So everything else is answered 2xx, logged with its reason and counted.
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

impl HostError {
    pub fn label(&self) -> &'static str {
        match self {
            HostError::BadRequest(_) => "bad_invocation",
            HostError::UnknownFunction(_) => "unknown_function",
            HostError::Transient(_) => "transient",
            HostError::Internal(_) => "internal",
        }
    }

    /// The answer's status: 503 where a retry can help, else 200.
    pub fn status(&self) -> StatusCode {
        match self {
            HostError::Transient(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::OK,
        }
    }

    /// The answer, in the host's shape, with the error for whoever reads it.
    fn answer(&self, count: Option<u64>) -> Response {
        let message = self.to_string();
        let mut return_value =
            json!({"accepted": false, "reason": self.label(), "detail": message});
        if let Some(n) = count {
            return_value["failed_total"] = json!(n);
        }
        let body = json!({"Outputs": {}, "Logs": [message.clone()], "ReturnValue": return_value, "error": message});
        redacted_json(self.status(), &body)
    }
}

/// Every answer leaves through here: the host copies `Logs` into its own logs and Application
/// Insights, and `ReturnValue` quotes error messages that can carry a storage URL's SAS.
fn redacted_json(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_string(body) {
        Ok(text) => (
            status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            crate::secret::redact(&text),
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "answer could not be serialized");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

impl IntoResponse for HostError {
    fn into_response(self) -> Response {
        tracing::error!(status = self.status().as_u16(), reason = self.label(), error = %self, "request not served");
        self.answer(None)
    }
}

/// Invocations larger than this are refused (counted, 2xx): Event Grid's events are at most 1 MB,
/// and the host's envelope adds little.
pub const MAX_INVOCATION_BYTES: usize = 4 << 20;
/// Bodies are read to the end up to this, so that an oversized one is answered rather than cut
/// off (a closed connection is a failed delivery, which Event Grid redelivers).
const READ_LIMIT_BYTES: usize = 64 << 20;

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/", get(ready))
        .route(
            "/{function}",
            post(invoke).layer(axum::extract::DefaultBodyLimit::max(READ_LIMIT_BYTES)),
        )
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
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let _turn = crate::admission::invocation().await;
    // One span per timer pass: a request in Application Insights, with the pass's log lines and
    // Compute calls under it. Not per delivered event: the host already records each invocation,
    // an event's log line carries its event id, and a span per heartbeat would double what the
    // export uploads (docs/benchmarks.md).
    let span = if function == "monitor-events" {
        tracing::Span::none()
    } else {
        tracing::info_span!(
            "invocation",
            otel.name = %function,
            otel.kind = "server",
            function = %function,
            http.response.status_code = tracing::field::Empty,
        )
    };
    let started = std::time::Instant::now();
    let (mut response, result) = answer(&state, &function, body)
        .instrument(span.clone())
        .await;
    span.record("http.response.status_code", response.status().as_u16());
    if ["monitor-events", "monitor-status", "monitor-state"].contains(&function.as_str()) {
        crate::telemetry::invocation(&function, result, started.elapsed());
    }
    if crate::admission::crowded() {
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}

/// The answer, and how the invocation went: `ok` or the error's label.
async fn answer(
    state: &AppState,
    function: &str,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> (Response, &'static str) {
    match run(state, function, body).await {
        Ok(outcome) => (redacted_json(StatusCode::OK, &outcome), "ok"),
        Err(e) => {
            // A table found missing is recreated now, so the retry this answer asks for succeeds.
            if let Err(again) = state.store.recreate_missing_tables().await {
                tracing::error!(error = %again, "could not recreate the missing tables");
            }
            // The host records our stdout, not a non-2xx answer's Logs: log it here, always.
            let count = state.counters.reject(e.label());
            tracing::error!(function = %function, status = e.status().as_u16(), reason = e.label(),
                failed_total = count, error = %e, "invocation not carried out");
            (e.answer(Some(count)), e.label())
        }
    }
}

async fn run(
    state: &AppState,
    function: &str,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Outcome, HostError> {
    let known = ["monitor-events", "monitor-status", "monitor-state"];
    if !known.contains(&function) {
        return Err(HostError::UnknownFunction(function.to_string()));
    }
    let body = body.map_err(|e| {
        HostError::BadRequest(format!(
            "invocation body could not be read: {}",
            e.body_text()
        ))
    })?;
    if body.len() > MAX_INVOCATION_BYTES {
        return Err(HostError::BadRequest(format!(
            "invocation body is not a host invocation: {} bytes, more than the {MAX_INVOCATION_BYTES} an Event Grid delivery can be",
            body.len()
        )));
    }
    let invocation: Invocation = serde_json::from_slice(&body).map_err(|e| {
        HostError::BadRequest(format!("invocation body is not a host invocation: {e}"))
    })?;
    match function {
        "monitor-events" => functions::monitor_events::run(state, invocation).await,
        "monitor-status" => functions::monitor_status::run(state, invocation).await,
        _ => functions::monitor_state::run(state, invocation).await,
    }
}
