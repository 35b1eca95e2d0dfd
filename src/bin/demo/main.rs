//! demo: heal a simulated fleet on this machine (README command one).
//!
//! Starts Azurite (installing the pinned version on first use), the Compute simulator with three
//! scale sets of 50 VMs that publish heartbeats (and an empty one to swap to), and the real
//! handler, driven exactly as the Functions host drives it: timer invocations and Event Grid
//! deliveries over HTTP. A scripted story (`story`) plays eight acts — a DOWN VM, a hung VM, a VM
//! that never comes up, a planned reboot, a heartbeat-pipeline outage, a scale set past its
//! unhealthy limit, a rolling cycle of a scale set that keeps 80 % serving, a blue/green swap that
//! never serves fewer — shown live on a
//! terminal (`view`) or as plain lines, summarized at the end, and drawn as an SVG timeline
//! (`timeline`). Exits non-zero if a fault was missed or anything was repaired wrongly.
//!
//!   demo [--fast] [--plain] [--svg PATH]

#[path = "../compute-sim/admin.rs"]
mod admin;
#[path = "../compute-sim/arm.rs"]
mod arm;
#[allow(dead_code)]
#[path = "../../../tests/common/azurite.rs"]
mod azurite;
#[path = "../compute-sim/disks.rs"]
mod disks;
#[path = "../compute-sim/gallery.rs"]
mod gallery;
#[path = "../compute-sim/network.rs"]
mod network;
#[path = "../compute-sim/server.rs"]
mod server;
mod story;
mod timeline;
mod view;
#[path = "../compute-sim/world.rs"]
mod world;

pub use server::Shared;

use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};
use story::SETS;
use time::OffsetDateTime;
use timeline::{Cell, Timeline};
use vmss_healer::compute::Compute;
use vmss_healer::host::{app, AppState, Counters};
use vmss_healer::incident::State as IncidentState;
use vmss_healer::journal::EntryKind;
use vmss_healer::plan::{decide, pipeline_fault, verdicts, Brakes};
use vmss_healer::scaleset::ScaleSetId;
use vmss_healer::settings::Settings;
use vmss_healer::state::Store;
use vmss_healer::verdict::Verdict;

const SUB: &str = "00000000-0000-0000-0000-0000000000de";
const RG: &str = "rg-demo";
const SECRET: &str = "demo-identity-secret";

struct Options {
    tick: Duration,
    live: bool,
    svg: std::path::PathBuf,
    /// `monitor-status` runs every this many ticks: as on Azure, where its timer (60 s) is as
    /// long as `HEALER_DOWN_FOR`, the story's 4 ticks.
    status_every: u32,
    /// `--timer-only`: `HEALER_EVENT_REPAIRS=false`, for the comparison.
    timer_only: bool,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let fast = args.iter().any(|a| a == "--fast");
    let plain = args.iter().any(|a| a == "--plain");
    let svg = args
        .iter()
        .position(|a| a == "--svg")
        .and_then(|i| args.get(i + 1))
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("target/demo-timeline.svg"));
    let options = Options {
        // The healer's timeouts are whole seconds and the story counts ticks: 8 ticks of silence
        // are 2 s fast and 6 s at the watchable pace.
        tick: Duration::from_millis(if fast { 250 } else { 750 }),
        live: !plain && std::io::stdout().is_terminal(),
        svg,
        status_every: args
            .iter()
            .position(|a| a == "--status-every")
            .and_then(|i| args.get(i + 1))
            .and_then(|n| n.parse().ok())
            .filter(|n| *n > 0)
            .unwrap_or(story::DOWN_FOR),
        timer_only: args.iter().any(|a| a == "--timer-only"),
    };
    story::set_tick(options.tick);
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
    let ok = runtime.block_on(run(sim_port, storage.connection_string(), options));
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

/// Starts the simulated fleet and the handler; returns the simulator, the store and the handler's
/// base URL.
async fn start(
    sim_port: u16,
    connection_string: String,
    tick: Duration,
    timer_only: bool,
) -> Option<(Shared, Store, String)> {
    // Operations take two ticks, as real ones take minutes.
    let mut world = world::World::new(tick * 2, 100);
    // A fleet that has been running for a day, past every creation grace period.
    let day_ago = OffsetDateTime::now_utc() - time::Duration::days(1);
    for (name, capacity) in SETS {
        // The stateful VM's next VM lands in its other zone: its disk moves by a copy.
        let zones = if name == story::STATEFUL_SET {
            vec!["1".into(), "2".into()]
        } else {
            vec!["1".into(), "2".into(), "3".into()]
        };
        let mode = if name == story::FLEXIBLE_SET {
            "Flexible"
        } else {
            "Uniform"
        };
        let key = world.create_set(SUB, RG, name, capacity, "westeurope", zones, mode, false);
        for vm in world
            .sets
            .get_mut(&key)
            .into_iter()
            .flat_map(|s| s.vms.values_mut())
        {
            vm.time_created = day_ago;
        }
    }
    // db's VM keeps its data on a managed disk at LUN 0, which its agent waits for.
    let db = key(story::STATEFUL_SET);
    world.give_data_disk(&db, 0, 0, 64);
    if let Some(set) = world.sets.get_mut(&db) {
        set.require_luns = vec![0];
    }
    // api is autoscaled (50 to 60 instances); the swap moves that to api-green.
    world.autoscale.insert(
        format!("/subscriptions/{SUB}/resourceGroups/{RG}/providers/microsoft.insights/autoscalesettings/api-autoscale").to_ascii_lowercase(),
        json!({
            "id": format!("/subscriptions/{SUB}/resourceGroups/{RG}/providers/microsoft.insights/autoscalesettings/api-autoscale"),
            "name": "api-autoscale",
            "type": "Microsoft.Insights/autoscaleSettings",
            "location": "westeurope",
            "properties": {"enabled": true, "targetResourceUri": set_id(story::SWAP_FROM),
                "profiles": [{"name": "default", "capacity": {"minimum": "50", "maximum": "60", "default": "50"}, "rules": []}]}
        }),
    );
    world.resource_events.clear();
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

    let seconds = |ticks: u32| (tick * ticks).as_secs().max(1).to_string();
    let handler_port = azurite::free_port();
    // db is stateful: a set of one whose disk follows its VM (restart, reimage, then the stateful
    // replacement; 40 % of one VM is none, so no short-circuit there).
    let ids: Vec<String> = SETS
        .iter()
        .map(|(n, _)| match *n {
            story::STATEFUL_SET => format!(
                "{}[STATEFUL_DISKS=0 MAX_UNHEALTHY=100% REPAIR_ACTIONS=reimage,replace REPAIR_TIMEOUT={}]",
                set_id(n),
                seconds(story::STATEFUL_REPAIR_TIMEOUT)
            ),
            _ => set_id(n),
        })
        .collect();
    let env: HashMap<&str, String> = HashMap::from([
        ("HEALER_SCALE_SETS", ids.join(",")),
        ("HEALER_STORAGE", connection_string),
        (
            "HEALER_ARM_ENDPOINT",
            format!("http://127.0.0.1:{sim_port}"),
        ),
        (
            "HEALER_HEARTBEAT_TIMEOUT",
            seconds(story::HEARTBEAT_TIMEOUT),
        ),
        ("HEALER_DOWN_FOR", seconds(story::DOWN_FOR)),
        ("HEALER_STARTUP_TIMEOUT", seconds(story::STARTUP_TIMEOUT)),
        ("HEALER_GRACE_PERIOD", seconds(story::GRACE)),
        ("HEALER_MIRROR_MAX_AGE", "30".into()),
        ("HEALER_REPAIR_ACTIONS", "replace".into()),
        ("HEALER_EVENT_REPAIRS", (!timer_only).to_string()),
        ("FUNCTIONS_CUSTOMHANDLER_PORT", handler_port.to_string()),
    ]);
    let settings = match Settings::from_lookup(|k| env.get(k).cloned()) {
        Ok(s) => s,
        Err(e) => {
            eprint!("{e}");
            return None;
        }
    };
    let store = Store::connect(&settings.storage, vmss_healer::identity::credential).ok()?;
    let credential = vmss_healer::identity::credential(None).ok()?;
    let compute = Compute::new(
        &settings.arm_endpoint,
        credential,
        settings.call_timeout.unsigned_abs(),
    )
    .ok()?;
    if let Err(e) = store.ensure_tables().await {
        eprintln!("cannot create the tables in Azurite: {e}");
        return None;
    }
    let state = AppState {
        notifier: vmss_healer::alert::Notifier::new(None),
        settings: Arc::new(settings),
        store: store.clone(),
        compute,
        counters: Arc::new(Counters::default()),
        prompts: Default::default(),
    };
    let handler_listener = tokio::net::TcpListener::bind(("127.0.0.1", handler_port))
        .await
        .expect("bind the handler");
    tokio::spawn(async move { axum::serve(handler_listener, app(state)).await });
    Some((sim, store, format!("http://127.0.0.1:{handler_port}")))
}

async fn run(sim_port: u16, connection_string: String, options: Options) -> bool {
    let tick_len = options.tick;
    let Some((sim, store, handler)) =
        start(sim_port, connection_string, tick_len, options.timer_only).await
    else {
        return false;
    };
    let settings = Settings::from_lookup(|k| match k {
        "HEALER_SCALE_SETS" => Some(
            SETS.iter()
                .map(|(n, _)| set_id(n))
                .collect::<Vec<_>>()
                .join(","),
        ),
        "HEALER_STORAGE" => Some("UseDevelopmentStorage=true".into()),
        "HEALER_HEARTBEAT_TIMEOUT" => {
            Some((tick_len * story::HEARTBEAT_TIMEOUT).as_secs().to_string())
        }
        "HEALER_DOWN_FOR" => Some((tick_len * story::DOWN_FOR).as_secs().to_string()),
        "HEALER_STARTUP_TIMEOUT" => Some((tick_len * story::STARTUP_TIMEOUT).as_secs().to_string()),
        "HEALER_GRACE_PERIOD" => Some((tick_len * story::GRACE).as_secs().to_string()),
        "HEALER_MIRROR_MAX_AGE" => Some("30".into()),
        _ => None,
    })
    .expect("the demo's own policy, for the live view");
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
                _ => None,
            }
        }
    };

    let originals: BTreeMap<&str, BTreeSet<u64>> = SETS
        .iter()
        .map(|(n, c)| (*n, (0..*c as u64).collect()))
        .collect();
    let mut view = view::View::new(options.live);
    let mut picture = Timeline::default();
    println!(
        "fleet: {} scale sets × 50 VMs ({} in Flexible orchestration, the others Uniform), {}, empty, and {}, a stateful VM of one; one tick = {:?}; a VM is silent after {} ticks; repair = replace",
        SETS.len() - 2,
        story::FLEXIBLE_SET,
        story::SWAP_TO,
        story::STATEFUL_SET,
        tick_len,
        story::HEARTBEAT_TIMEOUT
    );
    println!(
        "healer: heartbeats every tick, monitor-state every tick, monitor-status every {} ticks (HEALER_DOWN_FOR); evaluation on the evidence {}\n",
        options.status_every,
        if options.timer_only {
            "off (--timer-only)"
        } else {
            "on"
        }
    );
    let since = OffsetDateTime::now_utc() - time::Duration::seconds(1);
    let mut jobs_new = None;
    let mut repairs: Vec<(String, u64, u32)> = Vec::new();
    // When each repair was requested (s since the start) and what decided it.
    let mut repair_times: HashMap<(String, u64), (f32, String)> = HashMap::new();
    let mut pauses_seen: Vec<(String, String, u32)> = Vec::new();
    let mut withheld_rows = 0usize;
    let mut detected: BTreeSet<(String, String)> = BTreeSet::new();
    let mut seen_rows = 0usize;
    let mut ticker = tokio::time::interval(tick_len);
    // The healer keeps wall-clock time: a slow tick may stretch the story, never squeeze it (a
    // burst of late ticks would end the pipeline outage before any VM looked silent).
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tick = 0u32;
    // The fleet was running and reporting before the healer's first pass.
    let round = admin::heartbeat_round(&sim).await;
    admin::deliver(&sim.http, &handler, admin::Delivery::Handler, round).await;
    invoke("monitor-state").await;

    // The story's clock starts with its first tick, whatever the first mirror pass took.
    let started = Instant::now();
    let started_wall = OffsetDateTime::now_utc();
    // When each tick began (s since the start): times to repair are wall-clock times.
    let mut tick_started: Vec<f32> = Vec::new();
    let mut numbers: HashMap<(String, String), u64> = HashMap::new();
    // The cycle of the last act: when it began, the instances it had to cycle, and the fewest
    // instances serving while it ran.
    let mut cycle_started: Option<OffsetDateTime> = None;
    let mut cycle_at_start: BTreeSet<u64> = BTreeSet::new();
    let mut cycle_lowest = usize::MAX;
    let mut cycle_state: Option<String> = None;
    // The swap of the last act: where the simulator's history of what served stood when it began,
    // and how it ended.
    let mut swap_from_point: Option<usize> = None;
    let mut swap_state: Option<String> = None;
    // The stateful replacement of the last act, and what it holds.
    let mut carry_state: Option<String> = None;
    loop {
        ticker.tick().await;
        tick_started.push(started.elapsed().as_secs_f32());
        // When each tick began, for the picture's time axis.
        picture.time(tick, started.elapsed().as_secs_f32());
        {
            let mut w = sim.world.lock().await;
            // A Flexible set's instances are named VMs: remember which number each name is,
            // also once the VM is gone, for the picture and the grading.
            for (name, _) in SETS {
                if let Some(set) = w.sets.get(&key(name)) {
                    for vm in set.vms.values() {
                        numbers.insert(
                            (name.to_string(), set.key_of(vm).to_ascii_lowercase()),
                            vm.instance_id,
                        );
                    }
                }
            }
            for said in story::play(tick, &mut w, key, &mut jobs_new) {
                if let Some(act) = story::ACTS
                    .iter()
                    .position(|a| a.tick == tick && a.title == said)
                {
                    picture.act(tick, &said);
                    view.line(
                        started.elapsed().as_secs_f32(),
                        &format!("story   act {}: {said}", act + 1),
                    );
                } else {
                    view.line(started.elapsed().as_secs_f32(), &format!("story   {said}"));
                }
            }
        }
        if tick == story::CYCLE {
            // As an operator would: `handler cycle web --reason …` (the defaults: batches of 20 %,
            // at least 80 % healthy).
            let raw = vmss_healer::operations::cycle::Raw::default();
            let result = vmss_healer::operator::start_cycle(
                &settings,
                &store,
                story::CYCLE_SET,
                &raw,
                "demo: monthly refresh",
                false,
            )
            .await;
            let at = started.elapsed().as_secs_f32();
            let command = format!("handler cycle {}", story::CYCLE_SET);
            if say_operator(&mut view, at, &command, result) {
                cycle_started = Some(OffsetDateTime::now_utc());
                let w = sim.world.lock().await;
                cycle_at_start = w
                    .sets
                    .get(&key(story::CYCLE_SET))
                    .map(|s| s.vms.keys().copied().collect())
                    .unwrap_or_default();
            }
        }
        if tick == story::SWAP {
            // As an operator would: `handler swap api api-green --soak … --reason …`.
            let soak = seconds(2, tick_len);
            let timeout = seconds(40, tick_len);
            let raw = vmss_healer::operations::swap::Raw {
                soak: Some(&soak),
                timeout: Some(&timeout),
                ..Default::default()
            };
            let result = vmss_healer::operator::start_swap(
                &settings,
                &store,
                story::SWAP_FROM,
                story::SWAP_TO,
                &raw,
                "demo: release 2",
                false,
            )
            .await;
            let at = started.elapsed().as_secs_f32();
            let command = format!("handler swap {} {}", story::SWAP_FROM, story::SWAP_TO);
            if say_operator(&mut view, at, &command, result) {
                swap_from_point = Some(sim.world.lock().await.serving.len().saturating_sub(1));
                swap_state = Some("pending".into());
            }
        }
        let mut round = if story::heartbeats_flow(tick) {
            admin::heartbeat_round(&sim).await
        } else {
            Vec::new()
        };
        round.extend(admin::resource_event_round(&sim).await);
        admin::deliver(&sim.http, &handler, admin::Delivery::Handler, round).await;
        invoke("monitor-state").await;
        // Out of step with the faults, as a timer is: the passes fall a tick after the story's
        // acts (on every fourth tick from the third), not on the tick a DOWN completes its streak.
        if tick % options.status_every == options.status_every - 1 {
            invoke("monitor-status").await;
        }
        // While the cycle runs: how many of its scale set's instances serve (the batch being
        // reimaged does not), and what the operation holds.
        let mut cycling: BTreeSet<String> = BTreeSet::new();
        if cycle_started.is_some() {
            let id = ScaleSetId::parse(&set_id(story::CYCLE_SET)).expect("demo ids parse");
            if let Ok((ops, _)) = store.operations(Some(&id)).await {
                if let Some(op) = ops.last() {
                    cycle_state = Some(op.value.state.as_str().to_string());
                    cycling = op.value.holds.iter().cloned().collect();
                }
            }
            if cycle_state
                .as_deref()
                .is_some_and(|s| s == "running" || s == "pending")
            {
                let w = sim.world.lock().await;
                let serving = w.sets.get(&key(story::CYCLE_SET)).map_or(0, |s| {
                    s.vms
                        .values()
                        .filter(|v| {
                            v.provisioning_state == "Succeeded" && v.power_state == "running"
                        })
                        .count()
                });
                cycle_lowest = cycle_lowest.min(serving);
            }
        }

        // What the swap holds: green's new instances while they are judged, then api's draining.
        let mut swapping: BTreeSet<(String, String)> = BTreeSet::new();
        if swap_state.is_some() {
            let id = ScaleSetId::parse(&set_id(story::SWAP_FROM)).expect("demo ids parse");
            if let Ok((ops, _)) = store.operations(Some(&id)).await {
                if let Some(op) = ops.iter().rev().find(|o| o.value.id.starts_with("swap-")) {
                    swap_state = Some(op.value.state.as_str().to_string());
                    for (set, held) in op.value.held() {
                        for i in held {
                            swapping.insert((set.name.clone(), i.clone()));
                        }
                    }
                }
            }
        }

        // What the stateful replacement holds: the broken VM, then the new one too.
        {
            let id = ScaleSetId::parse(&set_id(story::STATEFUL_SET)).expect("demo ids parse");
            if let Ok((ops, _)) = store.operations(Some(&id)).await {
                if let Some(op) = ops.iter().rev().find(|o| o.value.id.starts_with("carry-")) {
                    carry_state = Some(op.value.state.as_str().to_string());
                    for i in &op.value.holds {
                        swapping.insert((story::STATEFUL_SET.to_string(), i.clone()));
                    }
                }
            }
        }

        // What the healer sees now, judged as monitor-status judges it.
        let now = OffsetDateTime::now_utc();
        let records = store.scale_sets().await.unwrap_or_default();
        let mut observations = Vec::new();
        for (name, _) in SETS {
            let id = ScaleSetId::parse(&set_id(name)).expect("demo ids parse");
            let record = records.get(&id.key()).cloned();
            let stateful = name == story::STATEFUL_SET;
            match vmss_healer::repair::gather(&store, &id, record, stateful).await {
                Ok(obs) => observations.push((name, id, obs)),
                Err(e) => view.line(
                    started.elapsed().as_secs_f32(),
                    &format!("! cannot read {name}: {e}"),
                ),
            }
        }
        let pairs: Vec<_> = observations
            .iter()
            .map(|(_, _, o)| (o, &settings.scale_sets[0].policy))
            .collect();
        let brakes = Brakes {
            mirror_max_age: settings.mirror_max_age,
            full_resync: settings.full_resync,
            pipeline_fault: pipeline_fault(&pairs, now),
            dry_run: settings.dry_run,
            lease: settings.lease(),
        };
        let mut statuses = Vec::new();
        for (name, id, obs) in &observations {
            let policy = &settings.scale_sets[0].policy;
            for (instance, verdict) in verdicts(obs, policy, settings.dry_run, now) {
                let repairing = obs
                    .incidents
                    .get(instance)
                    .is_some_and(|v| v.value.state == IncidentState::Repairing);
                let cell = match verdict {
                    _ if repairing => Cell::Repairing,
                    _ if *name == story::CYCLE_SET && cycling.contains(instance) => Cell::Cycling,
                    _ if swapping.contains(&(name.to_string(), instance.to_string())) => {
                        Cell::Cycling
                    }
                    Verdict::Healthy => Cell::Healthy,
                    Verdict::Unhealthy(_) => Cell::Unhealthy,
                    Verdict::Suspect { .. } => Cell::Suspect,
                    Verdict::Maintenance { .. } | Verdict::Draining { .. } => Cell::Maintenance,
                    Verdict::Starting => Cell::Starting,
                };
                if let Some(n) = number(&numbers, name, instance) {
                    picture.cell(name, n, tick, cell);
                }
            }
            if let Some(brake) = decide(obs, policy, brakes, now).paused() {
                picture.pause(name, tick, brake.label());
            }
            statuses.push(vmss_healer::status::summarize(
                id,
                policy,
                obs,
                brakes,
                &[],
                now,
            ));
        }

        // What it decided, from its journal.
        let mut rows = Vec::new();
        for (name, _) in SETS {
            let id = ScaleSetId::parse(&set_id(name)).expect("demo ids parse");
            if let Ok((entries, _)) = store.journal(&id, since).await {
                rows.extend(entries.into_iter().map(|e| (name, e)));
            }
        }
        rows.sort_by_key(|(_, e)| e.at);
        // An operation's rows about single instances (a batch of ten, say) read as one line.
        // Rows of one pass share their time: the instances' lines (a batch decided, a batch back)
        // are shown before the calls and the end they led to.
        let mut grouped: Vec<(RowGroup, Vec<String>)> = Vec::new();
        let mut after_groups: Vec<String> = Vec::new();
        for (name, e) in rows.iter().skip(seen_rows) {
            if e.kind == EntryKind::Operation && e.instance_id != "*" {
                let k = (*name, e.outcome.clone(), e.reason.clone());
                match grouped.iter_mut().find(|(g, _)| *g == k) {
                    Some((_, ids)) => ids.push(e.instance_id.clone()),
                    None => grouped.push((k, vec![e.instance_id.clone()])),
                }
                continue;
            }
            if e.kind == EntryKind::Operation
                && !matches!(e.outcome.as_str(), "started" | "operator_start")
            {
                after_groups.push(format!("operation {name}#* {}: {}", e.outcome, e.reason));
                continue;
            }
            let what = match (e.kind, e.action) {
                (EntryKind::Repair, Some(action)) => {
                    // A replace journals each of its stages (surge, delete): name the stage.
                    let stage = match e.evidence["stage"].as_str() {
                        Some(s) if s != "act" => format!(" ({s})"),
                        _ => String::new(),
                    };
                    format!("{action}{stage} {}: {}", e.outcome, e.reason)
                }
                _ => format!("{}: {}", e.outcome, e.reason),
            };
            let kind = match e.kind {
                EntryKind::Repair => "repair ",
                EntryKind::Withheld => "withheld",
                EntryKind::Outcome => "outcome",
                EntryKind::Step => "step   ",
                EntryKind::Intent => "sending",
                EntryKind::Operation => "operation",
            };
            // The journal records a pause when it begins and `resumed` when it ends.
            let released = e.kind == EntryKind::Withheld && e.outcome == "resumed";
            let line = if released {
                format!("resumed {name}: {}", e.reason)
            } else {
                format!("{kind} {name}#{} {what}", e.instance_id)
            };
            view.line(started.elapsed().as_secs_f32(), &line);
            if e.instance_id != "*" {
                detected.insert((name.to_string(), e.instance_id.clone()));
            }
            match e.kind {
                // A replace journals its surge and then its delete: one repair, counted once.
                EntryKind::Repair
                    if e.outcome == "requested"
                        && !matches!(e.evidence["stage"].as_str(), Some("delete" | "restore")) =>
                {
                    if let Some(n) = number(&numbers, name, &e.instance_id) {
                        repairs.push((name.to_string(), n, tick));
                        picture.repair(name, n, tick);
                        let at = (e.at - started_wall).as_seconds_f32();
                        let by = e.evidence["by"].as_str().unwrap_or("timer").to_string();
                        repair_times
                            .entry((name.to_string(), n))
                            .or_insert((at, by));
                    }
                }
                EntryKind::Withheld if !released => {
                    withheld_rows += 1;
                    if e.instance_id == "*" {
                        pauses_seen.push((name.to_string(), e.outcome.clone(), tick));
                    }
                }
                _ => {}
            }
        }
        for ((name, outcome, reason), mut ids) in grouped {
            ids.sort_by_key(|i| (i.parse::<u64>().unwrap_or(u64::MAX), i.clone()));
            view.line(
                started.elapsed().as_secs_f32(),
                &format!("operation {name}#{} {outcome}: {reason}", ids.join(",")),
            );
        }
        for line in after_groups {
            view.line(started.elapsed().as_secs_f32(), &line);
        }
        seen_rows = rows.len();
        let act = story::act_at(tick);
        let title = act
            .checked_sub(1)
            .map_or("the fleet runs", |i| story::ACTS[i].title);
        view.frame(
            tick,
            story::LAST_TICK,
            act,
            story::ACTS.len(),
            title,
            &statuses,
        );

        let expected = story::expectations(jobs_new);
        let all_repaired = expected
            .must_repair
            .iter()
            .all(|(s, i, _)| repairs.iter().any(|(rs, ri, _)| rs == s && ri == i));
        let calm = statuses
            .iter()
            .all(|s| s.brake.is_none() && s.repairing == 0);
        let cycled = cycle_state
            .as_deref()
            .is_some_and(|s| s != "running" && s != "pending");
        let swapped = swap_state
            .as_deref()
            .is_some_and(|s| s != "running" && s != "pending" && s != "rolling_back");
        let carried = carry_state
            .as_deref()
            .is_some_and(|s| s == "succeeded" || s == "failed" || s == "aborted");
        if (tick >= story::LAST_TICK && all_repaired && calm && cycled && swapped && carried)
            || tick >= story::LAST_TICK + 60
        {
            break;
        }
        tick += 1;
    }

    // The verdict on the healer.
    let expected = story::expectations(jobs_new);
    let mut ok = true;
    println!("\nsummary");
    let seconds_at = |t: u32| {
        tick_started
            .get(t as usize)
            .copied()
            .unwrap_or(t as f32 * tick_len.as_secs_f32())
    };
    let repaired_at = |set: &str, n: u64| repair_times.get(&(set.to_string(), n)).cloned();
    for line in story::grade(&expected, &repairs, &pauses_seen, seconds_at, repaired_at) {
        println!("  {}", line.text);
        ok &= line.ok;
    }
    {
        let w = sim.world.lock().await;
        // Every reimage of the cycle's scale set since the cycle began.
        let mut reimaged: BTreeMap<u64, usize> = BTreeMap::new();
        for op in w.operations.values() {
            if op.set_key != key(story::CYCLE_SET) || cycle_started.is_none_or(|t| op.started < t) {
                continue;
            }
            if let world::Effect::Reimage(ids) = &op.effect {
                for id in ids {
                    *reimaged.entry(*id).or_default() += 1;
                }
            }
        }
        for line in story::grade_cycle(
            cycle_state.as_deref(),
            cycle_lowest,
            &reimaged,
            &cycle_at_start,
        ) {
            println!("  {}", line.text);
            ok &= line.ok;
        }
        // The swap: what served across api and api-green from its start, by the simulator's
        // history; the capacities it left; whether api-green has api's autoscale now.
        let (from_key, to_key) = (key(story::SWAP_FROM), key(story::SWAP_TO));
        let lowest_swap = swap_from_point.map_or(0, |from| {
            w.serving[from.min(w.serving.len().saturating_sub(1))..]
                .iter()
                .map(|p| p.sets.get(&from_key).unwrap_or(&0) + p.sets.get(&to_key).unwrap_or(&0))
                .min()
                .unwrap_or(0)
        });
        let capacity_of = |k: &str| w.sets.get(k).map_or(0, |s| s.capacity());
        let moved = w
            .sets
            .get(&to_key)
            .and_then(|s| w.autoscale_range(s))
            .is_some()
            && w.sets
                .get(&from_key)
                .and_then(|s| w.autoscale_range(s))
                .is_none();
        let swapped = swap_state.as_deref() == Some("succeeded");
        for line in story::grade_swap(
            swap_state.as_deref(),
            lowest_swap,
            (capacity_of(&from_key), capacity_of(&to_key)),
            moved,
        ) {
            println!("  {}", line.text);
            ok &= line.ok;
        }
        // The stateful act: one VM left, a new one, with the old one's data at LUN 0.
        let db = w.sets.get(&key(story::STATEFUL_SET));
        let vms: Vec<(u64, Option<String>, Option<String>)> = db
            .map(|s| {
                s.vms
                    .values()
                    .map(|vm| {
                        (
                            vm.instance_id,
                            vm.zone.clone(),
                            vm.data_disks.get(&0).map(|d| d.key.clone()),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let disks: Vec<(String, String, Option<String>)> = w
            .disks
            .iter()
            .map(|(k, d)| (k.clone(), d.content.clone(), d.zone.clone()))
            .collect();
        for line in story::grade_stateful(carry_state.as_deref(), &vms, &disks) {
            println!("  {}", line.text);
            ok &= line.ok;
        }
        for (name, capacity) in SETS {
            let Some(set) = w.sets.get(&key(name)) else {
                continue;
            };
            // What the swap changed is graded above.
            if swapped && (name == story::SWAP_FROM || name == story::SWAP_TO) {
                continue;
            }
            let repaired: BTreeSet<u64> = repairs
                .iter()
                .filter(|(s, _, _)| s == name)
                .map(|(_, i, _)| *i)
                .collect();
            let lost: Vec<u64> = originals[name]
                .iter()
                .filter(|i| !repaired.contains(i) && !set.vms.contains_key(i))
                .copied()
                .collect();
            if !lost.is_empty() {
                println!("  {name}: healthy instances {lost:?} disappeared");
                ok = false;
            }
            let want = capacity + usize::from(name == "jobs");
            if set.capacity() != want {
                println!("  {name}: capacity {} instead of {want}", set.capacity());
                ok = false;
            }
        }
    }
    println!(
        "  {} instances detected, {} repaired, {} decisions withheld (journaled with their reasons)",
        detected.len(),
        repairs.len(),
        withheld_rows
    );
    if let Some(dir) = options.svg.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&options.svg, picture.svg()) {
        Ok(()) => println!("  timeline: {}", options.svg.display()),
        Err(e) => println!("  timeline not written to {}: {e}", options.svg.display()),
    }
    println!(
        "  {}",
        if ok {
            "every fault repaired, nothing repaired wrongly, the cycle and the swap kept the line, the stateful VM's data followed it"
        } else {
            "FAILED"
        }
    );
    ok
}

/// What the operator's command answered, on the log; whether it started.
fn say_operator(
    view: &mut view::View,
    at: f32,
    command: &str,
    result: anyhow::Result<String>,
) -> bool {
    match result {
        Ok(told) => {
            view.line(at, &format!("operator {command}: {}", told.trim()));
            true
        }
        Err(e) => {
            view.line(at, &format!("! {command}: {e:#}"));
            false
        }
    }
}

/// A number of ticks in whole seconds, as the healer's settings and the operator take them.
fn seconds(ticks: u32, tick: Duration) -> String {
    format!("{}s", (tick * ticks).as_secs().max(1))
}

/// An operation's journal rows about single instances that read as one line: (scale set, outcome,
/// reason).
type RowGroup<'a> = (&'a str, String, String);

/// The simulator's number of an instance the healer names by its key: a Uniform instance id, or a
/// Flexible VM's name.
fn number(numbers: &HashMap<(String, String), u64>, set: &str, key: &str) -> Option<u64> {
    key.parse::<u64>()
        .ok()
        .or_else(|| numbers.get(&(set.to_string(), key.to_string())).copied())
}
