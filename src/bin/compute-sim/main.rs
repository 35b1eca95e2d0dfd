//! compute-sim: a local stand-in for the Microsoft.Compute scale-set REST API (api-version
//! 2024-07-01) and for the App Service managed-identity endpoint, so the handler's real
//! `azure_mgmt_compute` and `azure_identity` code paths run without Azure.
//!
//! Test and demo tooling only: the published Function App contains `handler`, never this.

mod admin;
mod arm;
mod world;

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
use world::World;

#[derive(Clone)]
pub struct Shared {
    pub world: Arc<Mutex<World>>,
    pub base_url: String,
    pub identity_secret: String,
    pub heartbeat_target: Option<String>,
    pub http: reqwest::Client,
}

const USAGE: &str = "usage: compute-sim [--port N] [--operation-ms N] [--page-size N] [--identity-secret S]
                   [--scale-set SUB/RG/NAME=CAPACITY]... [--heartbeat-target URL] [--heartbeat-interval-ms N]";

struct Args {
    port: u16,
    operation_ms: u64,
    page_size: usize,
    identity_secret: String,
    scale_sets: Vec<(String, String, String, usize)>,
    heartbeat_target: Option<String>,
    heartbeat_interval_ms: Option<u64>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        port: 7080,
        operation_ms: 0,
        page_size: 100,
        identity_secret: "local-identity-secret".into(),
        scale_sets: Vec::new(),
        heartbeat_target: None,
        heartbeat_interval_ms: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--port" => a.port = value()?.parse().map_err(|e| format!("--port: {e}"))?,
            "--operation-ms" => {
                a.operation_ms = value()?
                    .parse()
                    .map_err(|e| format!("--operation-ms: {e}"))?
            }
            "--page-size" => {
                a.page_size = value()?.parse().map_err(|e| format!("--page-size: {e}"))?
            }
            "--identity-secret" => a.identity_secret = value()?,
            "--heartbeat-target" => a.heartbeat_target = Some(value()?),
            "--heartbeat-interval-ms" => {
                a.heartbeat_interval_ms = Some(
                    value()?
                        .parse()
                        .map_err(|e| format!("--heartbeat-interval-ms: {e}"))?,
                )
            }
            "--scale-set" => {
                let v = value()?;
                let (path, cap) = v
                    .split_once('=')
                    .ok_or(format!("--scale-set {v}: expected SUB/RG/NAME=CAPACITY"))?;
                let parts: Vec<&str> = path.split('/').collect();
                let [sub, rg, name] = parts.as_slice() else {
                    return Err(format!("--scale-set {v}: expected SUB/RG/NAME=CAPACITY"));
                };
                let cap = cap.parse().map_err(|e| format!("--scale-set {v}: {e}"))?;
                a.scale_sets
                    .push((sub.to_string(), rg.to_string(), name.to_string(), cap));
            }
            "--help" | "-h" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(a)
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let mut world = World::new(Duration::from_millis(args.operation_ms), args.page_size);
    for (sub, rg, name, cap) in &args.scale_sets {
        world.create_set(
            sub,
            rg,
            name,
            *cap,
            "westeurope",
            Vec::new(),
            "Uniform",
            false,
        );
    }
    let base_url = format!("http://127.0.0.1:{}", args.port);
    let shared = Shared {
        world: Arc::new(Mutex::new(world)),
        base_url: base_url.clone(),
        identity_secret: args.identity_secret,
        heartbeat_target: args.heartbeat_target.clone(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default(),
    };
    let app = Router::new()
        .route("/msi/token", get(token))
        .merge(admin::routes())
        .fallback(arm::handle)
        .with_state(shared.clone());

    if let (Some(target), Some(ms)) = (args.heartbeat_target, args.heartbeat_interval_ms) {
        let s = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(ms.max(50)));
            loop {
                tick.tick().await;
                let round = admin::heartbeat_round(&s).await;
                admin::deliver(&s.http, &target, round).await;
            }
        });
    }

    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("compute-sim: cannot listen on 127.0.0.1:{}: {e}", args.port);
            std::process::exit(1);
        }
    };
    println!("compute-sim listening on {base_url} (identity endpoint {base_url}/msi/token)");
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("compute-sim: {e}");
        std::process::exit(1);
    }
}
