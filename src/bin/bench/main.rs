//! bench: the speed and memory figures of docs/benchmarks.md, measured on this machine.
//!
//! `bench ingest [--instances N] [--rounds R] [--concurrency C] [--event-repairs true|false]`:
//! heartbeat ingest through the
//! handler (HTTP, JSON, validation, identity check, conditional write) side by side with a plain
//! loop writing the same rows straight to Azurite.
//! `bench startup [--runs N]`: the handler binary's start-to-ready time and idle RSS.
//! `bench tick --instances N`: `monitor-state` and `monitor-status` passes of the handler binary
//! over N simulated instances (scale sets of 1,000): wall time, table requests, Compute calls and
//! the handler's peak RSS.
//! `bench load [--deliveries N] [--instances M]`: N heartbeat deliveries posted to the handler
//! binary all at once (as Event Grid does after an outage): the handler's RSS idle before, at its
//! peak and settled after, its connections to storage, and how the deliveries were answered.
//!
//! `bench telemetry [--instances N] [--rounds R] [--concurrency C]`: the same heartbeat ingest
//! through the handler binary at `RUST_LOG=info`, without and with the export to Application
//! Insights (a local collector standing for ingestion): throughput, latency, the handler's CPU
//! time per event and peak RSS, and what reached the collector.
//!
//! `bench cycle [--instances N] [--batch 20%] [--reimage-minutes R]`: a rolling cycle of one
//! scale set by the handler binary beside the classic one-at-a-time script (`cycle.rs`).
//!
//! `bench prompt [--instances N] [--faults F] [--timer-s T]`: the time from the DOWN that completes
//! `HEALER_DOWN_FOR` to the repair's Compute call, evaluation on the evidence vs the timer alone
//! (`prompt.rs`).
//!
//! `bench burst [--sets S] [--set-size N] [--downs D]`: D DOWNs at once across S sets, half of
//! them a mass DOWN the short-circuit must pause (`burst.rs`): evaluations, table requests,
//! Compute calls, repairs.
//!
//! Build first: `cargo build --release --bins` (startup runs the `handler` next to this binary).

#[path = "../compute-sim/admin.rs"]
mod admin;
#[path = "../compute-sim/arm.rs"]
mod arm;
#[allow(dead_code)]
#[path = "../../../tests/common/azurite.rs"]
mod azurite;
mod burst;
mod cycle;
#[path = "../compute-sim/disks.rs"]
mod disks;
mod fleet;
#[path = "../compute-sim/gallery.rs"]
mod gallery;
#[path = "../compute-sim/network.rs"]
mod network;
mod prompt;
#[path = "../compute-sim/server.rs"]
mod server;
#[path = "../../../tests/common/sockets.rs"]
mod sockets;
#[path = "../compute-sim/world.rs"]
mod world;

pub use server::Shared;

use azure_data_tables::clients::TableServiceClientBuilder;
use azure_storage::{CloudLocation, StorageCredentials};
use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use vmss_healer::mirror::Instance;
use vmss_healer::scaleset::ScaleSetId;
use vmss_healer::settings::Settings;
use vmss_healer::state::Store;

const SET: &str = "/subscriptions/00000000-0000-0000-0000-0000000000be/resourceGroups/rg-bench/providers/Microsoft.Compute/virtualMachineScaleSets/web";

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn text_arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    match mode.as_str() {
        "ingest" => ingest(
            arg("--instances", 1000),
            arg("--rounds", 5),
            arg("--concurrency", 16),
        ),
        "startup" => startup(arg("--runs", 20)),
        "tick" => tick(
            arg("--instances", 1000),
            std::env::args().any(|a| a == "--flexible"),
        ),
        "load" => load(arg("--deliveries", 2000), arg("--instances", 2000)),
        "cycle" => cycle::run(
            arg("--instances", 1000),
            &text_arg("--batch", "20%"),
            text_arg("--reimage-minutes", "3").parse().unwrap_or(3.0),
        ),
        "prompt" => prompt::run(
            arg("--instances", 10_000),
            arg("--faults", 100),
            arg("--timer-s", 10) as u64,
        ),
        "burst" => burst::run(
            arg("--sets", 100),
            arg("--set-size", 20),
            arg("--downs", 1000),
        ),
        "telemetry" => telemetry(
            arg("--instances", 1000),
            arg("--rounds", 5),
            arg("--concurrency", 16),
        ),
        _ => {
            eprintln!("usage: bench ingest [--instances N] [--rounds R] [--concurrency C] | bench startup [--runs N] | bench tick [--instances N] | bench load [--deliveries N] [--instances M] | bench cycle [--instances N] [--batch 20%] [--reimage-minutes R] | bench telemetry [--instances N] [--rounds R] [--concurrency C] | bench prompt [--instances N] [--faults F] [--timer-s T] | bench burst [--sets S] [--set-size N] [--downs D]");
            std::process::exit(2);
        }
    }
}

/// A mirrored, running instance `i` of the bench scale set, whose heartbeats carry the matching
/// vmId.
fn bench_instance(i: usize, created: Option<OffsetDateTime>) -> Instance {
    Instance {
        instance_id: i.to_string(),
        vm_id: Some(format!("00000000-0000-4000-8000-{i:012}")),
        computer_name: Some(format!("web{i:06}")),
        provisioning_state: Some("Succeeded".into()),
        power_state: Some("running".into()),
        health: None,
        health_since: None,
        latest_model_applied: Some(true),
        protected_from_scale_set_actions: false,
        protected_from_scale_in: false,
        delete_locked: false,
        zone: None,
        created_at: created,
        provisioned_at: created,
        data_disks: Vec::new(),
    }
}

struct Run {
    events: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    requests: Option<u64>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort_unstable();
        l[((l.len() as f64 - 1.0) * p).round() as usize]
    }

    fn report(&self, name: &str) {
        println!(
            "| {name} | {} | {:.0} | {:.2} | {:.2} | {} |",
            self.events,
            self.rate(),
            self.percentile(0.50).as_secs_f64() * 1000.0,
            self.percentile(0.99).as_secs_f64() * 1000.0,
            self.requests.map_or("–".to_string(), |r| format!(
                "{:.2}",
                r as f64 / self.events as f64
            )),
        );
    }
}

/// Runs `count` jobs, `concurrency` at a time, timing each.
async fn timed<F, Fut>(count: usize, concurrency: usize, job: F) -> (Duration, Vec<Duration>)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = Instant::now();
    let latencies: Vec<Duration> = futures::stream::iter(0..count)
        .map(|i| {
            let fut = job(i);
            async move {
                let t = Instant::now();
                fut.await;
                t.elapsed()
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    (started.elapsed(), latencies)
}

/// A fresh Azurite (installed first if need be) and the runtime a benchmark runs on.
fn storage_and_runtime() -> (azurite::Azurite, tokio::runtime::Runtime) {
    azurite::ensure_installed_quietly(true);
    let storage = azurite::Azurite::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    (storage, runtime)
}

fn ingest(instances: usize, rounds: usize, concurrency: usize) {
    let (storage, runtime) = storage_and_runtime();
    runtime.block_on(async {
        let handler_port = azurite::free_port();
        let env: HashMap<&str, String> = HashMap::from([
            ("HEALER_SCALE_SETS", SET.to_string()),
            ("HEALER_STORAGE", storage.connection_string()),
            ("HEALER_ARM_ENDPOINT", "http://127.0.0.1:9".to_string()),
            ("FUNCTIONS_CUSTOMHANDLER_PORT", handler_port.to_string()),
            // Issue 19: evaluation on the evidence, on (the default) or off; UP costs the same.
            ("HEALER_EVENT_REPAIRS", text_arg("--event-repairs", "true")),
        ]);
        let settings = Settings::from_lookup(|k| env.get(k).cloned()).expect("bench settings");
        let store = Store::connect(&settings.storage, |_| anyhow::bail!("no identity")).expect("store");
        store.ensure_tables().await.expect("tables");
        let set = ScaleSetId::parse(SET).expect("bench id");
        let mirror: Vec<Instance> = (0..instances).map(|i| bench_instance(i, None)).collect();
        store.write_mirror(&set, &mirror, OffsetDateTime::now_utc()).await.expect("mirror");

        // The handler's router, served on loopback as the Functions host would reach it. The
        // Compute client is never called by monitor-events.
        let credential = azure_identity::create_credential().expect("a credential object (never used)");
        let compute = vmss_healer::compute::Compute::new(&settings.arm_endpoint, credential, settings.call_timeout.unsigned_abs()).expect("compute client");
        let state = vmss_healer::host::AppState {
            settings: Arc::new(settings),
            store: store.clone(),
            compute,
            notifier: vmss_healer::alert::Notifier::new(None),
            counters: Arc::default(),
            prompts: Default::default(),
        };
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", handler_port)).await.expect("bind");
        tokio::spawn(async move { axum::serve(listener, vmss_healer::host::app(state)).await });

        let http = reqwest::Client::builder().pool_max_idle_per_host(concurrency).build().expect("http client");
        let url = format!("http://127.0.0.1:{handler_port}/monitor-events");
        let t0 = OffsetDateTime::now_utc() - time::Duration::hours(1);
        let invocation = |round: usize, i: usize| {
            heartbeat_invocation(&format!("{round}-{i}"), i, round, t0 + time::Duration::seconds(round as i64))
        };
        let send = |body: Value| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let r = http.post(url).json(&body).send().await.expect("handler reachable");
                assert!(r.status().is_success(), "handler answered {}", r.status());
                let answer: Value = r.json().await.expect("JSON answer");
                assert_eq!(answer["ReturnValue"]["stored"], json!(true), "{answer}");
            }
        };

        // The same rows, written straight to Azurite with insert-or-replace, into their own
        // partition so they do not disturb the handler's rows.
        let service = TableServiceClientBuilder::with_location(
            CloudLocation::Custom { account: azurite::DEV_ACCOUNT.into(), uri: storage.table_endpoint() },
            StorageCredentials::access_key(azurite::DEV_ACCOUNT, azure_core::auth::Secret::new(azurite::DEV_KEY)),
        )
        // The same pooled HTTP client the state layer uses: the SDK's default disables pooling,
        // which would slow the baseline rather than measure the handler.
        .transport(azure_core::TransportOptions::new(Arc::new(reqwest::Client::new())))
        .build();
        let table = service.table_client("heartbeats");
        let pk = format!("{}-plain", set.key());
        let row = |round: usize, i: usize| {
            let at = t0 + time::Duration::seconds(round as i64);
            json!({"PartitionKey": pk, "RowKey": i.to_string(), "status": "UP",
                   "eventTime": at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
                   "eventTime@odata.type": "Edm.DateTime", "sequence": round.to_string(), "sequence@odata.type": "Edm.Int64",
                   "vmId": format!("00000000-0000-4000-8000-{i:012}")})
        };
        let plain = || async {
            let (elapsed, latencies) = timed(instances * rounds, concurrency, |n| {
                let client = table.partition_key_client(&pk).entity_client((n % instances).to_string());
                let body = row(1 + n / instances, n % instances);
                async move {
                    client.insert_or_replace(body).expect("entity").await.expect("plain write");
                }
            })
            .await;
            Run { events: instances * rounds, elapsed, latencies, requests: Some((instances * rounds) as u64) }
        };

        // Warm-up: first sight of each instance (read + insert) and of each plain row; not measured.
        timed(instances, concurrency, |i| send(invocation(0, i))).await;
        let plain_before = plain().await;
        let before = store.requests();
        let (elapsed, latencies) = timed(instances * rounds, concurrency, |n| send(invocation(1 + n / instances, n % instances))).await;
        let handler = Run { events: instances * rounds, elapsed, latencies, requests: Some(store.requests() - before) };
        let plain_after = plain().await;

        println!("\nheartbeat ingest: {instances} instances × {rounds} rounds, concurrency {concurrency}, HEALER_EVENT_REPAIRS={}\n", text_arg("--event-repairs", "true"));
        println!("| path | events | events/s | p50 ms | p99 ms | table requests/event |");
        println!("|---|---|---|---|---|---|");
        plain_before.report("plain loop to Azurite (before)");
        handler.report("handler (monitor-events)");
        plain_after.report("plain loop to Azurite (after)");
        let plain_rate = (plain_before.rate() + plain_after.rate()) / 2.0;
        println!("\nhandler / plain throughput (mean of the two plain runs): {:.0} %", 100.0 * handler.rate() / plain_rate);
    });
}

fn load(deliveries: usize, instances: usize) {
    let (storage, runtime) = storage_and_runtime();
    let storage_port = storage.port;
    runtime.block_on(async {
        let store = Store::connect(
            &vmss_healer::settings::StorageSettings::ConnectionString(storage.connection_string()),
            |_| anyhow::bail!("no identity"),
        )
        .expect("store");
        store.ensure_tables().await.expect("tables");
        let set = ScaleSetId::parse(SET).expect("bench id");
        let created = OffsetDateTime::now_utc() - time::Duration::days(1);
        let mirror: Vec<Instance> = (0..instances).map(|i| bench_instance(i, Some(created))).collect();
        store.write_mirror(&set, &mirror, OffsetDateTime::now_utc()).await.expect("mirror");

        let port = azurite::free_port();
        let mut child = Command::new(handler_binary())
            .env_clear()
            .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
            .env("HEALER_SCALE_SETS", SET)
            .env("HEALER_STORAGE", storage.connection_string())
            .env("HEALER_ARM_ENDPOINT", "http://127.0.0.1:9")
            .env("IDENTITY_ENDPOINT", "http://127.0.0.1:9/msi/token")
            .env("IDENTITY_HEADER", SECRET)
            .env("RUST_LOG", "warn")
            .envs(std::env::var("BENCH_MALLOC_ARENA_MAX").ok().map(|v| ("MALLOC_ARENA_MAX", v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start handler");
        let pid = child.id();
        // As many connections as deliveries: Event Grid opens them, not a pool of ours.
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(deliveries)
            .timeout(Duration::from_secs(120))
            .build()
            .expect("http client");
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while http.get(&base).send().await.is_err() {
            assert!(Instant::now() < deadline, "handler not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let at = OffsetDateTime::now_utc();
        let delivery = |n: usize| heartbeat_invocation(&format!("load-{n}"), n % instances, n, at);
        let post = |body: Value| {
            let (http, url) = (http.clone(), format!("{base}/monitor-events"));
            async move {
                match http.post(url).json(&body).send().await {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0,
                }
            }
        };
        // Warm-up: one delivery, so idle means "has served", as in production.
        post(delivery(0)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle_before = rss_kib(pid).unwrap_or(0);

        // Sample RSS and storage connections while the burst runs.
        let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let sampler = {
            let sampling = sampling.clone();
            tokio::spawn(async move {
                let (mut peak_rss, mut peak_conns) = (0, 0);
                while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                    peak_rss = peak_rss.max(rss_kib(pid).unwrap_or(0));
                    peak_conns = peak_conns.max(sockets::connections_to(pid, storage_port));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (peak_rss, peak_conns)
            })
        };
        let started = Instant::now();
        let answers = futures::future::join_all((1..=deliveries).map(|n| post(delivery(n)))).await;
        let elapsed = started.elapsed();
        sampling.store(false, std::sync::atomic::Ordering::Relaxed);
        let (peak_sampled, peak_conns) = sampler.await.expect("sampler");
        let hwm = proc_status_kib(pid, "VmHWM:").unwrap_or(0);
        let mut by_status: std::collections::BTreeMap<u16, usize> = std::collections::BTreeMap::new();
        for s in &answers {
            *by_status.entry(*s).or_default() += 1;
        }
        // Event Grid's connections close once it is done; ours too.
        drop(http);
        let after_1s = { tokio::time::sleep(Duration::from_secs(1)).await; rss_kib(pid).unwrap_or(0) };
        let conns_after_1s = sockets::connections_to(pid, storage_port);
        tokio::time::sleep(Duration::from_secs(40)).await;
        let settled = rss_kib(pid).unwrap_or(0);
        let conns_settled = sockets::connections_to(pid, storage_port);
        let _ = child.kill();
        let _ = child.wait();

        let mib = |k: u64| k as f64 / 1024.0;
        println!("\n{deliveries} concurrent heartbeat deliveries to the handler binary ({instances} mirrored instances)\n");
        println!("| measure | value |");
        println!("|---|---|");
        println!("| answered | {} in {:.1} s ({:?} by HTTP status; 0 = no answer) |", answers.len(), elapsed.as_secs_f64(), by_status);
        println!("| RSS idle before | {:.1} MiB |", mib(idle_before));
        println!("| RSS peak (VmHWM; highest 5 ms sample) | {:.1} MiB ({:.1} MiB) |", mib(hwm), mib(peak_sampled));
        println!("| RSS 1 s after | {:.1} MiB |", mib(after_1s));
        println!("| RSS settled (41 s after) | {:.1} MiB |", mib(settled));
        println!("| connections to storage: peak, 1 s after, settled | {peak_conns}, {conns_after_1s}, {conns_settled} |");
    });
}

fn rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS:")
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn handler_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("own path");
    let handler = exe.with_file_name("handler");
    if !handler.exists() {
        eprintln!(
            "{} not found: run `cargo build --release --bins` first",
            handler.display()
        );
        std::process::exit(2);
    }
    handler
}

fn startup(runs: usize) {
    let handler = handler_binary();
    let mut ready = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..runs {
        let port = azurite::free_port();
        let started = Instant::now();
        let mut child = Command::new(&handler)
            .env_clear()
            .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
            .env("HEALER_SCALE_SETS", SET)
            // Unreachable storage: readiness must not wait for it.
            .env(
                "HEALER_STORAGE",
                "UseDevelopmentStorage=true;DevelopmentStorageProxyUri=http://127.0.0.1:9",
            )
            .env("IDENTITY_ENDPOINT", "http://127.0.0.1:9/msi/token")
            .env("IDENTITY_HEADER", "x")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start handler");
        let answered = loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                use std::io::{Read, Write};
                let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let mut buf = [0u8; 12];
                if s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 200") {
                    break started.elapsed();
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "handler not ready in 10 s"
            );
            std::thread::sleep(Duration::from_micros(200));
        };
        // Idle: after readiness, with its background table retry sleeping.
        std::thread::sleep(Duration::from_millis(300));
        rss.push(rss_kib(child.id()).unwrap_or(0));
        ready.push(answered);
        let _ = child.kill();
        let _ = child.wait();
    }
    ready.sort_unstable();
    rss.sort_unstable();
    println!("\nhandler startup over {runs} runs\n");
    println!("| measure | min | median | max |");
    println!("|---|---|---|---|");
    println!(
        "| start to ready (GET / answers) | {:.1} ms | {:.1} ms | {:.1} ms |",
        ready[0].as_secs_f64() * 1000.0,
        ready[runs / 2].as_secs_f64() * 1000.0,
        ready[runs - 1].as_secs_f64() * 1000.0
    );
    println!(
        "| idle RSS | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
        rss[0] as f64 / 1024.0,
        rss[runs / 2] as f64 / 1024.0,
        rss[runs - 1] as f64 / 1024.0
    );
}

const TICK_SUB: &str = "00000000-0000-0000-0000-0000000000be";
const TICK_RG: &str = "rg-bench";
const SECRET: &str = "bench-identity-secret";
const SET_SIZE: usize = 1000;

/// The release handler binary with these settings, started on a free port as the Functions host
/// starts it and waited for (its port answering, its tables created): the process, its base URL,
/// and a store on the same storage.
async fn start_handler(
    env: &[(&str, String)],
    connection_string: &str,
) -> (std::process::Child, String, Store) {
    let port = azurite::free_port();
    let child = Command::new(handler_binary())
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start handler");
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(&base).send().await.is_err() {
        assert!(Instant::now() < deadline, "handler not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let store = Store::connect(
        &vmss_healer::settings::StorageSettings::ConnectionString(connection_string.to_string()),
        |_| anyhow::bail!("no identity"),
    )
    .expect("store");
    while store.scale_sets().await.is_err() {
        assert!(Instant::now() < deadline, "tables not created");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (child, base, store)
}

/// A timer invocation, as the Functions host posts it: its wall time and `ReturnValue`.
async fn invoke_timer(http: &reqwest::Client, base: &str, function: &str) -> (Duration, Value) {
    let body =
        json!({"Data": {"timer": {"ScheduleStatus": null, "IsPastDue": false}}, "Metadata": {}});
    let started = Instant::now();
    let r = http
        .post(format!("{base}/{function}"))
        .json(&body)
        .send()
        .await
        .expect("handler reachable");
    assert!(
        r.status().is_success(),
        "{function} answered {}",
        r.status()
    );
    let answer: Value = r.json().await.expect("JSON");
    (started.elapsed(), answer["ReturnValue"].clone())
}

fn tick(instances: usize, flexible: bool) {
    let sets = instances.div_ceil(SET_SIZE).max(1);
    let mode = if flexible { "Flexible" } else { "Uniform" };
    let (storage, runtime) = storage_and_runtime();
    runtime.block_on(async {
        // The simulated fleet, in this process: a day old, every VM running.
        let fleet::Fleet { sim, port: sim_port, ids, .. } = fleet::start(instances, SET_SIZE, mode).await;

        // The real handler binary, as the Functions host runs it.
        let env = [
            ("HEALER_SCALE_SETS", ids.join(",")),
            ("HEALER_STORAGE", storage.connection_string()),
            ("HEALER_ARM_ENDPOINT", format!("http://127.0.0.1:{sim_port}")),
            ("HEALER_REPAIR_ACTIONS", "delete".to_string()),
            ("HEALER_DOWN_FOR", "0".to_string()),
            ("IDENTITY_ENDPOINT", format!("http://127.0.0.1:{sim_port}/msi/token")),
            ("IDENTITY_HEADER", SECRET.to_string()),
        ];
        let (mut child, base, store) = start_handler(&env, &storage.connection_string()).await;
        let http = reqwest::Client::new();
        let invoke = |function: &'static str| invoke_timer(&http, &base, function);

        // 1. The first mirror: every instance written.
        let (first_sync, first) = invoke("monitor-state").await;

        // 2. Every VM reports UP now, except one in two hundred that reports DOWN.
        let now = OffsetDateTime::now_utc();
        let beats = fleet::heartbeats(&sim, now, 1, |n| n % 200 == 199).await;
        store.import_heartbeats(&beats).await.expect("seed heartbeats");

        // 3. A repair pass over the whole fleet.
        let (status_time, status) = invoke("monitor-status").await;
        let repaired: u64 = status["scale_sets"].as_array().map_or(0, |a| a.iter().map(|s| s["repairs_requested"].as_u64().unwrap_or(0)).sum());

        // 4. 0.1 % of instances change (their Application Health state); the mirror catches up.
        {
            let mut w = sim.world.lock().await;
            for set in w.sets.values_mut() {
                for vm in set.vms.values_mut().filter(|v| v.instance_id % 1000 == 500) {
                    vm.health = Some("unhealthy".into());
                }
            }
        }
        // The repairs' Resource Manager events arrive, as the system topic delivers them.
        let events = admin::resource_event_round(&sim).await;
        let event_count = events.len();
        let (delivered, _) = admin::deliver(&sim.http, &base, admin::Delivery::Handler, events).await;
        assert_eq!(delivered, event_count, "every Resource Manager event accepted");
        let (second_sync, second) = invoke("monitor-state").await;
        let sum = |v: &Value, field: &str| -> u64 { v["scale_sets"].as_array().map_or(0, |a| a.iter().map(|s| s[field].as_u64().unwrap_or(0)).sum()) };
        let count = |v: &Value, outcome: &str| v["scale_sets"].as_array().map_or(0, |a| a.iter().filter(|s| s["outcome"] == outcome).count());
        let written = sum(&second, "written");
        let removed = sum(&second, "removed");

        // 5. Nothing changes: the event-driven mirror reads nothing until the full resync.
        let (quiet_sync, quiet) = invoke("monitor-state").await;

        // 6. Autoscale adds 100 instances to one scale set; its one event has only that set read.
        {
            let mut w = sim.world.lock().await;
            let key = w.sets.keys().next().cloned().expect("a scale set");
            let target = w.sets[&key].capacity() + 100;
            w.start_operation(&key, world::Effect::Scale(target));
        }
        let events = admin::resource_event_round(&sim).await;
        let scale_events = events.len();
        admin::deliver(&sim.http, &base, admin::Delivery::Handler, events).await;
        let (scaled_sync, scaled) = invoke("monitor-state").await;

        // 7. The next repair pass follows the repairs' operations (one status read per scale set:
        //    its deletes went out in one call) and closes the incidents whose instances are gone.
        let (follow_time, followed) = invoke("monitor-status").await;
        let ended = sum(&followed, "operations_ended");
        let closed = sum(&followed, "outcomes");
        let peak = proc_status_kib(child.id(), "VmHWM:").unwrap_or(0);
        let _ = child.kill();
        let _ = child.wait();

        println!("\n{instances} instances in {sets} {mode} scale sets of up to {SET_SIZE}, 100 per page\n");
        println!("| pass | wall time | table requests | Compute calls | effect |");
        println!("|---|---|---|---|---|");
        println!(
            "| monitor-state, first mirror | {:.2} s | {} | {} | {} instances written |",
            first_sync.as_secs_f64(), first["table_requests"], first["compute_calls"],
            first["scale_sets"].as_array().map_or(0, |a| a.iter().map(|s| s["written"].as_u64().unwrap_or(0)).sum::<u64>())
        );
        println!(
            "| monitor-status | {:.2} s | {} | {} | {repaired} repairs of {} DOWN |",
            status_time.as_secs_f64(), status["table_requests"], status["compute_calls"], instances / 200
        );
        println!(
            "| monitor-state, 0.1 % changed ({} sets read: repairs in flight, {event_count} events) | {:.2} s | {} | {} | {written} rows written, {removed} removed |",
            count(&second, "synced"), second_sync.as_secs_f64(), second["table_requests"], second["compute_calls"]
        );
        println!(
            "| monitor-state, nothing changed | {:.2} s | {} | {} | {} sets fresh, {} rows written |",
            quiet_sync.as_secs_f64(), quiet["table_requests"], quiet["compute_calls"], count(&quiet, "fresh"), sum(&quiet, "written")
        );
        println!(
            "| monitor-state after autoscale adds 100 VMs to one set ({scale_events} event) | {:.2} s | {} | {} | {} set read, {} rows written |",
            scaled_sync.as_secs_f64(), scaled["table_requests"], scaled["compute_calls"], count(&scaled, "synced"), sum(&scaled, "written")
        );
        println!(
            "| monitor-status, following the repairs | {:.2} s | {} | {} | {ended} operations ended, {closed} incidents closed |",
            follow_time.as_secs_f64(), followed["table_requests"], followed["compute_calls"]
        );
        println!("\nhandler peak RSS (VmHWM): {:.1} MiB", peak as f64 / 1024.0);
        if flexible {
            // The classic design knew Uniform scale sets only.
            return;
        }

        // The classic design on the same fleet, built from the same pieces so that only the
        // strategy differs: every instance rewritten every tick, one delete call per VM.
        let classic = Classic::new(sim_port, storage.connection_string());
        let ids: Vec<ScaleSetId> = ids.iter().map(|i| ScaleSetId::parse(i).expect("bench ids")).collect();
        {
            let mut w = sim.world.lock().await;
            for set in w.sets.values_mut() {
                for vm in set.vms.values_mut().filter(|v| v.instance_id % 1000 == 501) {
                    vm.health = Some("unhealthy".into());
                }
            }
        }
        let (sync_time, sync_requests, sync_calls, sync_written) = classic.sync(&ids).await;
        // The DOWN instances of step 2 were deleted by the handler; mark as many again.
        let mut down = Vec::new();
        {
            let w = sim.world.lock().await;
            for (set, id) in w.sets.values().zip(&ids) {
                for vm in set.vms.values().filter(|v| v.instance_id % 200 == 198) {
                    down.push((id.clone(), vm.instance_id.to_string(), vm.vm_id.clone()));
                }
            }
        }
        let now = OffsetDateTime::now_utc();
        let beats: Vec<_> = down
            .iter()
            .map(|(id, instance, vm_id)| vmss_healer::heartbeat::Heartbeat {
                target: id.instance(instance),
                status: vmss_healer::heartbeat::Status::Down,
                event_time: now,
                received_at: now,
                sequence: Some(2),
                vm_id: Some(vm_id.clone()),
                computer_name: None,
                detail: None,
                origin: vmss_healer::heartbeat::Origin::Agent,
                event_id: String::new(),
                down_since: None,
                attested: false,
                attestation: None,
            })
            .collect();
        store.import_heartbeats(&beats).await.expect("seed DOWN heartbeats");
        let (status_time, status_requests, status_calls, deleted) = classic.repair(&ids).await;
        println!("\nbaseline: the classic design on the same fleet\n");
        println!("| pass | wall time | table requests | Compute calls | effect |");
        println!("|---|---|---|---|---|");
        println!(
            "| classic monitor-status (one delete call per VM) | {:.2} s | {status_requests} | {status_calls} | {deleted} deletes |",
            status_time.as_secs_f64()
        );
        println!(
            "| classic monitor-state (full rewrite), 0.1 % changed | {:.2} s | {sync_requests} | {sync_calls} | {sync_written} rows written |",
            sync_time.as_secs_f64()
        );
        let written_ratio = sync_written as f64 / written.max(1) as f64;
        println!("\nrows written per sync, classic / vmss-healer: {written_ratio:.0}×; delete calls for {deleted} repairs: {status_calls} vs {}", status["compute_calls"]);
    });
}

/// The classic healer's strategy, for the baseline: it re-reads and rewrites the whole mirror
/// every tick and deletes unhealthy VMs one call each.
struct Classic {
    store: Store,
    compute: vmss_healer::compute::Compute,
}

impl Classic {
    fn new(sim_port: u16, connection_string: String) -> Self {
        let store = Store::connect(
            &vmss_healer::settings::StorageSettings::ConnectionString(connection_string),
            |_| anyhow::bail!("no identity"),
        )
        .expect("store");
        // The simulator's identity endpoint, as the handler uses it.
        std::env::set_var(
            "IDENTITY_ENDPOINT",
            format!("http://127.0.0.1:{sim_port}/msi/token"),
        );
        std::env::set_var("IDENTITY_HEADER", SECRET);
        let credential = vmss_healer::identity::credential(None).expect("identity");
        let endpoint = url::Url::parse(&format!("http://127.0.0.1:{sim_port}")).expect("url");
        let compute = vmss_healer::compute::Compute::new(
            &endpoint,
            credential,
            std::time::Duration::from_secs(30),
        )
        .expect("compute");
        Classic { store, compute }
    }

    fn costs(&self) -> (u64, u64) {
        (self.store.requests(), self.compute.observed().calls())
    }

    async fn sync(&self, ids: &[ScaleSetId]) -> (Duration, u64, u64, usize) {
        let (r0, c0) = self.costs();
        let started = Instant::now();
        let mut written = 0;
        for id in ids {
            // The classic design listed Uniform instances only.
            let uniform = vmss_healer::compute::ScaleSetInfo::default();
            let instances = self.compute.instances(id, &uniform).await.expect("list");
            written += self
                .store
                .write_mirror(id, &instances, OffsetDateTime::now_utc())
                .await
                .expect("rewrite");
        }
        let (r1, c1) = self.costs();
        (started.elapsed(), r1 - r0, c1 - c0, written)
    }

    async fn repair(&self, ids: &[ScaleSetId]) -> (Duration, u64, u64, usize) {
        let (r0, c0) = self.costs();
        let started = Instant::now();
        let mut deleted = 0;
        for id in ids {
            let (mirror, _) = self.store.mirror(id).await.expect("mirror");
            let (beats, _) = self.store.heartbeats(id).await.expect("heartbeats");
            for m in mirror {
                let down = beats
                    .get(&m.instance.instance_id)
                    .is_some_and(|b| b.status == vmss_healer::heartbeat::Status::Down);
                if down {
                    self.compute
                        .delete_instances(id, std::slice::from_ref(&m.instance.instance_id))
                        .await
                        .expect("delete");
                    deleted += 1;
                }
            }
        }
        let (r1, c1) = self.costs();
        (started.elapsed(), r1 - r0, c1 - c0, deleted)
    }
}

/// CPU time (user + system) the process has used so far.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(Duration::from_millis(ticks * 10))
}

/// A stand-in for Application Insights ingestion: counts uploads, envelopes, gzip and JSON bytes.
async fn collector() -> (String, Arc<std::sync::Mutex<(u64, u64, u64, u64)>>) {
    use axum::routing::post;
    let counts = Arc::new(std::sync::Mutex::new((0u64, 0u64, 0u64, 0u64)));
    let seen = counts.clone();
    let app = axum::Router::new().route(
        "/v2.1/track",
        post(move |body: axum::body::Bytes| {
            let seen = seen.clone();
            async move {
                use std::io::Read;
                let mut text = String::new();
                let _ = flate2::read::GzDecoder::new(&body[..]).read_to_string(&mut text);
                let n = serde_json::from_str::<Vec<Value>>(&text).map_or(0, |v| v.len());
                let mut c = seen.lock().unwrap_or_else(|e| e.into_inner());
                c.0 += 1;
                c.1 += n as u64;
                c.2 += body.len() as u64;
                c.3 += text.len() as u64;
                axum::Json(json!({"itemsReceived": n, "itemsAccepted": n, "errors": []}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind collector");
    let port = listener.local_addr().expect("collector address").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://127.0.0.1:{port}"), counts)
}

fn telemetry(instances: usize, rounds: usize, concurrency: usize) {
    let handler = handler_binary();
    let (storage, runtime) = storage_and_runtime();
    runtime.block_on(async {
        let store = Store::connect(
            &vmss_healer::settings::StorageSettings::ConnectionString(storage.connection_string()),
            |_| anyhow::bail!("no identity"),
        )
        .expect("store");
        store.ensure_tables().await.expect("tables");
        let set = ScaleSetId::parse(SET).expect("bench id");
        let mirror: Vec<Instance> = (0..instances).map(|i| bench_instance(i, None)).collect();
        store.write_mirror(&set, &mirror, OffsetDateTime::now_utc()).await.expect("mirror");
        let (endpoint, counts) = collector().await;
        let http = reqwest::Client::builder().pool_max_idle_per_host(concurrency).build().expect("http client");

        println!("\nheartbeat ingest with and without the export: {instances} instances × {rounds} rounds, concurrency {concurrency}, RUST_LOG=info\n");
        println!("| handler | events | events/s | p50 ms | p99 ms | CPU µs/event | peak RSS MiB | uploads | envelopes | gzip KiB | JSON KiB |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        // Each run starts a fresh handler and sends heartbeats later than the last run's, so
        // every one is stored (none is a duplicate).
        for (run, export) in [false, true, false, true].into_iter().enumerate() {
            let port = azurite::free_port();
            let mut command = Command::new(&handler);
            command
                .env_clear()
                .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
                .env("HEALER_SCALE_SETS", SET)
                .env("HEALER_STORAGE", storage.connection_string())
                .env("HEALER_ARM_ENDPOINT", "http://127.0.0.1:9")
                .env("IDENTITY_ENDPOINT", "http://127.0.0.1:9/msi/token")
                .env("IDENTITY_HEADER", SECRET)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if export {
                command.env(
                    "APPLICATIONINSIGHTS_CONNECTION_STRING",
                    format!("InstrumentationKey=00000000-0000-4000-8000-0000000000be;IngestionEndpoint={endpoint}"),
                );
            }
            let mut child = command.spawn().expect("start handler");
            let pid = child.id();
            let base = format!("http://127.0.0.1:{port}");
            let deadline = Instant::now() + Duration::from_secs(30);
            while http.get(&base).send().await.is_err() {
                assert!(Instant::now() < deadline, "handler not ready");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let url = format!("{base}/monitor-events");
            let t0 = OffsetDateTime::now_utc() - time::Duration::hours(2) + time::Duration::minutes(run as i64 * 10);
            let invocation = |round: usize, i: usize| {
                heartbeat_invocation(&format!("t{run}-{round}-{i}"), i, round, t0 + time::Duration::seconds(round as i64))
            };
            let send = |body: Value| {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    let r = http.post(url).json(&body).send().await.expect("handler reachable");
                    assert!(r.status().is_success(), "handler answered {}", r.status());
                }
            };
            // Warm-up round, not measured.
            timed(instances, concurrency, |i| send(invocation(0, i))).await;
            let before_counts = *counts.lock().unwrap_or_else(|e| e.into_inner());
            let cpu_before = cpu_time(pid).unwrap_or_default();
            let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let sampling = {
                let peak = peak.clone();
                tokio::spawn(async move {
                    loop {
                        if let Some(r) = rss_kib(pid) {
                            peak.fetch_max(r, std::sync::atomic::Ordering::Relaxed);
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
            };
            let (elapsed, latencies) = timed(instances * rounds, concurrency, |n| send(invocation(1 + n / instances, n % instances))).await;
            // The batch processors export every second or so: wait for the last batch.
            let settle = Instant::now();
            if export {
                let mut last = counts.lock().unwrap_or_else(|e| e.into_inner()).1;
                loop {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    let now = counts.lock().unwrap_or_else(|e| e.into_inner()).1;
                    if now == last || settle.elapsed() > Duration::from_secs(20) {
                        break;
                    }
                    last = now;
                }
            }
            sampling.abort();
            let cpu = cpu_time(pid).unwrap_or_default().saturating_sub(cpu_before);
            let after_counts = *counts.lock().unwrap_or_else(|e| e.into_inner());
            let _ = child.kill();
            let _ = child.wait();
            let events = instances * rounds;
            let r = Run { events, elapsed, latencies, requests: None };
            println!(
                "| {} | {events} | {:.0} | {:.2} | {:.2} | {:.0} | {:.1} | {} | {} | {:.0} | {:.0} |",
                if export { "exporting" } else { "not exporting" },
                r.rate(),
                r.percentile(0.50).as_secs_f64() * 1000.0,
                r.percentile(0.99).as_secs_f64() * 1000.0,
                cpu.as_secs_f64() * 1e6 / events as f64,
                peak.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0,
                after_counts.0 - before_counts.0,
                after_counts.1 - before_counts.1,
                (after_counts.2 - before_counts.2) as f64 / 1024.0,
                (after_counts.3 - before_counts.3) as f64 / 1024.0,
            );
        }
    });
}

/// The Functions host's invocation of `monitor-events` for one UP heartbeat of bench instance `i`
/// (its vmId is the one `bench_instance` mirrors).
fn heartbeat_invocation(id: &str, i: usize, sequence: usize, at: OffsetDateTime) -> Value {
    json!({"Data": {"event": {
        "id": id, "eventType": "VmssHealer.Heartbeat", "dataVersion": "1",
        "subject": format!("{SET}/virtualMachines/{i}"),
        "eventTime": at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        "data": {"status": "UP", "vmId": format!("00000000-0000-4000-8000-{i:012}"), "sequence": sequence}}},
        "Metadata": {"sys": {"MethodName": "monitor-events"}}})
}
