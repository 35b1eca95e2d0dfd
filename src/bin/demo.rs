//! demo: heal a simulated fleet on this machine.
//!
//! Starts Azurite (installing the pinned version on first use), the Compute simulator and the
//! real handler, then drives the handler exactly as the Functions host would: timer invocations
//! and Event Grid deliveries over HTTP. A VM reports DOWN, another hangs silently; both must be
//! replaced and nothing else touched. Exits non-zero if that is not what happened.

#[path = "compute-sim/admin.rs"]
mod admin;
#[path = "compute-sim/arm.rs"]
mod arm;
#[allow(dead_code)]
#[path = "../../tests/common/azurite.rs"]
mod azurite;
#[path = "compute-sim/server.rs"]
mod server;
#[path = "compute-sim/world.rs"]
mod world;

pub use server::Shared;

use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use vmss_healer::compute::Compute;
use vmss_healer::host::{app, AppState, Counters};
use vmss_healer::journal::EntryKind;
use vmss_healer::scaleset::ScaleSetId;
use vmss_healer::settings::Settings;
use vmss_healer::state::Store;

const SUB: &str = "00000000-0000-0000-0000-0000000000de";
const RG: &str = "rg-demo";
const SECRET: &str = "demo-identity-secret";
const SETS: [(&str, usize); 3] = [("web", 12), ("api", 12), ("jobs", 12)];

/// One scripted fault: at `tick`, instance `instance` of `set` starts doing `beat`.
struct Fault {
    tick: u32,
    set: &'static str,
    instance: u64,
    beat: &'static str,
    what: &'static str,
}

const STORY: [Fault; 2] = [
    Fault {
        tick: 3,
        set: "web",
        instance: 4,
        beat: "down",
        what: "reports DOWN (its health check fails)",
    },
    Fault {
        tick: 5,
        set: "api",
        instance: 7,
        beat: "silent",
        what: "hangs: no more heartbeats",
    },
];

struct Timing {
    tick: Duration,
    heartbeat_timeout_s: u32,
    down_for_s: u32,
    max_ticks: u32,
}

fn main() {
    let fast = std::env::args().any(|a| a == "--fast");
    let timing = if fast {
        Timing {
            tick: Duration::from_millis(250),
            heartbeat_timeout_s: 2,
            down_for_s: 1,
            max_ticks: 120,
        }
    } else {
        Timing {
            tick: Duration::from_secs(1),
            heartbeat_timeout_s: 6,
            down_for_s: 3,
            max_ticks: 90,
        }
    };
    let sim_port = azurite::free_port();
    // The handler's credential reads these, exactly as in a Function App.
    std::env::set_var(
        "IDENTITY_ENDPOINT",
        format!("http://127.0.0.1:{sim_port}/msi/token"),
    );
    std::env::set_var("IDENTITY_HEADER", SECRET);
    azurite::ensure_installed_quietly(true);
    println!("starting Azurite, the Compute simulator and the handler…");
    let storage = azurite::Azurite::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let ok = runtime.block_on(run(sim_port, storage.connection_string(), timing));
    drop(storage);
    std::process::exit(if ok { 0 } else { 1 });
}

fn set_id(name: &str) -> String {
    format!("/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachineScaleSets/{name}")
}

fn key(name: &str) -> String {
    format!("{SUB}:{RG}:{name}")
}

fn timer_invocation(function: &str) -> Value {
    let now = OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    json!({"Data": {"timer": {"Schedule": {"AdjustForDST": true}, "ScheduleStatus": null, "IsPastDue": false}},
           "Metadata": {"sys": {"MethodName": function, "UtcNow": now, "RandGuid": uuid::Uuid::new_v4().to_string()}}})
}

async fn run(sim_port: u16, connection_string: String, timing: Timing) -> bool {
    // The simulated fleet; operations take two ticks, as real ones take minutes.
    let mut world = world::World::new(timing.tick * 2, 100);
    // A fleet that has been running for a day, past every creation grace period.
    let day_ago = OffsetDateTime::now_utc() - time::Duration::days(1);
    for (name, capacity) in SETS {
        let zones = vec!["1".into(), "2".into(), "3".into()];
        let key = world.create_set(
            SUB,
            RG,
            name,
            capacity,
            "westeurope",
            zones,
            "Uniform",
            false,
        );
        for vm in world
            .sets
            .get_mut(&key)
            .into_iter()
            .flat_map(|s| s.vms.values_mut())
        {
            vm.time_created = day_ago;
        }
    }
    let sim = Shared::new(
        world,
        sim_port,
        SECRET.into(),
        None,
        admin::Delivery::Handler,
    );
    let sim_router = sim.clone();
    let sim_listener = tokio::net::TcpListener::bind(("127.0.0.1", sim_port))
        .await
        .expect("bind the simulator");
    tokio::spawn(async move { axum::serve(sim_listener, server::router(sim_router)).await });

    let handler_port = azurite::free_port();
    let ids: Vec<String> = SETS.iter().map(|(n, _)| set_id(n)).collect();
    let env: HashMap<&str, String> = HashMap::from([
        ("HEALER_SCALE_SETS", ids.join(",")),
        ("HEALER_STORAGE", connection_string),
        (
            "HEALER_ARM_ENDPOINT",
            format!("http://127.0.0.1:{sim_port}"),
        ),
        (
            "HEALER_HEARTBEAT_TIMEOUT",
            timing.heartbeat_timeout_s.to_string(),
        ),
        ("HEALER_DOWN_FOR", timing.down_for_s.to_string()),
        ("HEALER_MIRROR_MAX_AGE", "30".into()),
        ("HEALER_REPAIR_ACTIONS", "replace".into()),
        ("FUNCTIONS_CUSTOMHANDLER_PORT", handler_port.to_string()),
    ]);
    let settings = match Settings::from_lookup(|k| env.get(k).cloned()) {
        Ok(s) => s,
        Err(e) => {
            eprint!("{e}");
            return false;
        }
    };
    let store = Store::connect(&settings.storage, vmss_healer::identity::credential)
        .expect("storage settings");
    let credential =
        vmss_healer::identity::credential(None).expect("the simulator's identity endpoint");
    let compute = Compute::new(&settings.arm_endpoint, credential).expect("compute client");
    if let Err(e) = store.ensure_tables().await {
        eprintln!("cannot create the tables in Azurite: {e}");
        return false;
    }
    let state = AppState {
        notifier: vmss_healer::alert::Notifier::new(None),
        settings: Arc::new(settings),
        store: store.clone(),
        compute,
        counters: Arc::new(Counters::default()),
    };
    let handler_listener = tokio::net::TcpListener::bind(("127.0.0.1", handler_port))
        .await
        .expect("bind the handler");
    tokio::spawn(async move { axum::serve(handler_listener, app(state)).await });

    let handler = format!("http://127.0.0.1:{handler_port}");
    let http = reqwest::Client::new();
    let invoke = |function: &'static str| {
        let (http, url) = (http.clone(), format!("{handler}/{function}"));
        async move {
            match http
                .post(url)
                .json(&timer_invocation(function))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => r.json::<Value>().await.ok(),
                Ok(r) => {
                    println!("  ! {function} answered {}", r.status());
                    None
                }
                Err(e) => {
                    println!("  ! {function} unreachable: {e}");
                    None
                }
            }
        }
    };

    let originals: BTreeMap<&str, BTreeSet<u64>> = SETS
        .iter()
        .map(|(n, c)| (*n, (0..*c as u64).collect()))
        .collect();
    println!(
        "fleet: {} scale sets × 12 VMs, heartbeat every tick ({:?}), silent after {} s, repair = replace\n",
        SETS.len(),
        timing.tick,
        timing.heartbeat_timeout_s
    );
    let started = Instant::now();
    let since = OffsetDateTime::now_utc() - time::Duration::seconds(1);
    let mut faulted_at: HashMap<(&str, String), Instant> = HashMap::new();
    let mut repaired_at: HashMap<(&str, String), Instant> = HashMap::new();
    let mut seen_rows = 0usize;
    let mut ticker = tokio::time::interval(timing.tick);

    for tick in 0..timing.max_ticks {
        ticker.tick().await;
        for f in STORY.iter().filter(|f| f.tick == tick) {
            let mut w = sim.world.lock().await;
            if let Some(vm) = w
                .sets
                .get_mut(&key(f.set))
                .and_then(|s| s.vms.get_mut(&f.instance))
            {
                vm.beat = if f.beat == "down" {
                    world::Beat::Down
                } else {
                    world::Beat::Silent
                };
            }
            println!(
                "{:>6.1}s  fault   {}#{} {}",
                started.elapsed().as_secs_f32(),
                f.set,
                f.instance,
                f.what
            );
            faulted_at.insert((f.set, f.instance.to_string()), Instant::now());
        }
        // Heartbeats, and the Resource Manager events the fleet raised since the last tick.
        let mut round = admin::heartbeat_round(&sim).await;
        round.extend(admin::resource_event_round(&sim).await);
        admin::deliver(&sim.http, &handler, admin::Delivery::Handler, round).await;
        invoke("monitor-state").await;
        invoke("monitor-status").await;

        // Print what the healer decided, from its journal.
        let mut rows = Vec::new();
        for (name, _) in SETS {
            let id = ScaleSetId::parse(&set_id(name)).expect("demo ids parse");
            if let Ok((entries, _)) = store.journal(&id, since).await {
                rows.extend(entries.into_iter().map(|e| (name, e)));
            }
        }
        rows.sort_by_key(|(_, e)| e.at);
        for (name, e) in rows.iter().skip(seen_rows) {
            let kind = match e.kind {
                EntryKind::Repair => "repair ",
                EntryKind::Withheld => "withheld",
                EntryKind::Outcome => "outcome",
            };
            let what = match (e.kind, e.action) {
                (EntryKind::Repair, Some(action)) => {
                    format!("{action} {}: {}", e.outcome, e.reason)
                }
                _ => format!("{}: {}", e.outcome, e.reason),
            };
            println!(
                "{:>6.1}s  {kind} {name}#{} {what}",
                started.elapsed().as_secs_f32(),
                e.instance_id
            );
            if e.kind == EntryKind::Repair && e.outcome == "requested" {
                repaired_at
                    .entry((*name, e.instance_id.clone()))
                    .or_insert_with(Instant::now);
            }
        }
        seen_rows = rows.len();

        let all_done = STORY.iter().all(|f| {
            rows.iter().any(|(n, e)| {
                *n == f.set
                    && e.instance_id == f.instance.to_string()
                    && e.kind == EntryKind::Outcome
            })
        });
        if all_done {
            break;
        }
    }

    // Verdict: every fault repaired, nothing else touched, capacity restored.
    let mut ok = true;
    println!("\nsummary");
    for f in &STORY {
        let k = (f.set, f.instance.to_string());
        match (faulted_at.get(&k), repaired_at.get(&k)) {
            (Some(a), Some(b)) => println!(
                "  {}#{} {}: repair requested {:.1} s after the fault",
                f.set,
                f.instance,
                f.what,
                b.duration_since(*a).as_secs_f32()
            ),
            _ => {
                println!("  {}#{} {}: MISSED", f.set, f.instance, f.what);
                ok = false;
            }
        }
    }
    let w = sim.world.lock().await;
    for (name, capacity) in SETS {
        let Some(set) = w.sets.get(&key(name)) else {
            continue;
        };
        let broken: BTreeSet<u64> = STORY
            .iter()
            .filter(|f| f.set == name)
            .map(|f| f.instance)
            .collect();
        let lost: Vec<u64> = originals[name]
            .iter()
            .filter(|i| !broken.contains(i) && !set.vms.contains_key(i))
            .copied()
            .collect();
        if !lost.is_empty() {
            println!("  {name}: healthy instances {lost:?} were removed WRONGLY");
            ok = false;
        }
        if set.capacity() != capacity {
            println!(
                "  {name}: capacity {} instead of {capacity}",
                set.capacity()
            );
            ok = false;
        }
    }
    let repaired = repaired_at.len();
    println!(
        "  repaired {repaired}/{} faults; {}",
        STORY.len(),
        if ok {
            "no healthy instance touched"
        } else {
            "FAILED"
        }
    );
    ok
}
