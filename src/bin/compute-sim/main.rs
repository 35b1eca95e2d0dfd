//! compute-sim: a local stand-in for the Microsoft.Compute scale-set REST API (api-version
//! 2024-07-01) and for the App Service managed-identity endpoint, so the handler's real
//! `azure_mgmt_compute` and `azure_identity` code paths run without Azure.
//!
//! Test and demo tooling only: the published Function App contains `handler`, never this.

mod admin;
mod arm;
mod disks;
mod gallery;
mod network;
mod server;
mod world;

pub use server::Shared;
use std::time::Duration;
use world::World;

const USAGE: &str = "usage: compute-sim [--port N] [--operation-ms N] [--page-size N] [--identity-secret S]
                   [--scale-set SUB/RG/NAME=CAPACITY]... [--heartbeat-target URL] [--heartbeat-interval-ms N]
                   [--heartbeat-via handler|eventgrid]";

struct Args {
    port: u16,
    operation_ms: u64,
    page_size: usize,
    identity_secret: String,
    scale_sets: Vec<(String, String, String, usize)>,
    heartbeat_target: Option<String>,
    heartbeat_interval_ms: Option<u64>,
    delivery: admin::Delivery,
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
        delivery: admin::Delivery::Handler,
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
            "--heartbeat-via" => {
                a.delivery = match value()?.as_str() {
                    "handler" => admin::Delivery::Handler,
                    "eventgrid" => admin::Delivery::EventGrid,
                    other => {
                        return Err(format!(
                            "--heartbeat-via {other}: expected handler or eventgrid"
                        ))
                    }
                }
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
    let shared = Shared::new(
        world,
        args.port,
        args.identity_secret,
        args.heartbeat_target.clone(),
        args.delivery,
    );
    let base_url = shared.base_url.clone();
    let app = server::router(shared.clone());
    if let (Some(target), Some(ms)) = (args.heartbeat_target, args.heartbeat_interval_ms) {
        tokio::spawn(server::publish_heartbeats(
            shared.clone(),
            target,
            Duration::from_millis(ms),
        ));
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
