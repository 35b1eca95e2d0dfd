//! `bench burst [--sets S] [--set-size N] [--downs D]` (issue 19): D DOWN heartbeats that all
//! complete `HEALER_DOWN_FOR` at once, across S scale sets of N instances: half of the sets lose
//! 80 % of their instances (a bad deployment: the short-circuit must pause them), the other half
//! share the rest (few enough to repair). The handler runs in this process, so its own counters
//! say what the burst cost: evaluations run, table requests, Compute calls — and the journal what
//! it did.

use crate::{azurite, fleet, TICK_RG, TICK_SUB};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use vmss_healer::journal::EntryKind;
use vmss_healer::scaleset::ScaleSetId;
use vmss_healer::settings::Settings;
use vmss_healer::state::Store;

const DOWN_FOR_S: u64 = 2;

pub fn run(sets: usize, set_size: usize, downs: usize) {
    let set_size = set_size.max(5);
    let sets = sets.max(2);
    let (storage, runtime) = crate::storage_and_runtime();
    runtime.block_on(async {
        let fleet::Fleet { sim, port, ids, names } = fleet::start(sets * set_size, set_size, "Uniform").await;
        // The handler's credential reads these, as in a Function App.
        std::env::set_var("IDENTITY_ENDPOINT", format!("http://127.0.0.1:{port}/msi/token"));
        std::env::set_var("IDENTITY_HEADER", crate::SECRET);
        let handler_port = azurite::free_port();
        let env: HashMap<&str, String> = HashMap::from([
            ("HEALER_SCALE_SETS", ids.join(",")),
            ("HEALER_STORAGE", storage.connection_string()),
            ("HEALER_ARM_ENDPOINT", format!("http://127.0.0.1:{port}")),
            ("HEALER_REPAIR_ACTIONS", "restart".to_string()),
            ("HEALER_DOWN_FOR", DOWN_FOR_S.to_string()),
            ("HEALER_EVENT_REPAIRS", "true".to_string()),
            ("FUNCTIONS_CUSTOMHANDLER_PORT", handler_port.to_string()),
        ]);
        let settings = Settings::from_lookup(|k| env.get(k).cloned()).expect("bench settings");
        let store = Store::connect(&settings.storage, |_| anyhow::bail!("no identity")).expect("store");
        store.ensure_tables().await.expect("tables");
        let credential = vmss_healer::identity::credential(None).expect("the simulator's managed identity");
        let compute = vmss_healer::compute::Compute::new(&settings.arm_endpoint, credential, settings.call_timeout.unsigned_abs()).expect("compute client");
        let settings = Arc::new(settings);
        let mirrored = vmss_healer::sync::sync_all(&store, &compute, &settings, OffsetDateTime::now_utc()).await.expect("first mirror");
        assert!(mirrored.scale_sets.iter().all(|s| s.instances == set_size), "every set mirrored");
        store
            .import_heartbeats(&fleet::heartbeats(&sim, OffsetDateTime::now_utc(), 0, |_| false).await)
            .await
            .expect("seed heartbeats");
        let state = vmss_healer::host::AppState {
            settings: settings.clone(),
            store: store.clone(),
            compute: compute.clone(),
            notifier: vmss_healer::alert::Notifier::new(None),
            counters: Arc::default(),
            prompts: Default::default(),
        };
        let prompts = state.prompts.clone();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", handler_port)).await.expect("bind");
        tokio::spawn(async move { axum::serve(listener, vmss_healer::host::app(state)).await });

        // Which instances go DOWN: 80 % of the first half of the sets, the rest spread evenly
        // over the other half (capped under the 40 % limit).
        let mass_sets = sets / 2;
        let mass_each = (set_size * 4).div_ceil(5);
        let rest = downs.saturating_sub(mass_sets * mass_each);
        let scattered_each = (rest / (sets - mass_sets)).min((set_size * 2 / 5).saturating_sub(1));
        let mut down: Vec<(usize, u64)> = Vec::new();
        for (s, _) in names.iter().enumerate() {
            let k = if s < mass_sets { mass_each } else { scattered_each };
            down.extend((0..k as u64).map(|i| (s, i)));
        }
        let vm_ids: HashMap<(String, u64), String> = {
            let w = sim.world.lock().await;
            w.sets.values().flat_map(|set| set.vms.values().map(move |vm| ((set.name.clone(), vm.instance_id), vm.vm_id.clone()))).collect()
        };
        let http = reqwest::Client::builder().pool_max_idle_per_host(64).build().expect("http client");
        let url = format!("http://127.0.0.1:{handler_port}/monitor-events");
        let post = |s: usize, i: u64, sequence: u64| {
            let (http, url) = (http.clone(), url.clone());
            let set = names[s].clone();
            let vm_id = vm_ids.get(&(set.clone(), i)).cloned().unwrap_or_default();
            async move {
                let at = OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
                let body = json!({"Data": {"event": {
                    "id": uuid::Uuid::new_v4().to_string(), "eventType": "VmssHealer.Heartbeat", "dataVersion": "1",
                    "subject": format!("/subscriptions/{TICK_SUB}/resourceGroups/{TICK_RG}/providers/Microsoft.Compute/virtualMachineScaleSets/{set}/virtualMachines/{i}"),
                    "eventTime": at, "data": {"status": "DOWN", "vmId": vm_id, "sequence": sequence}}},
                    "Metadata": {"sys": {"MethodName": "monitor-events"}}});
                let answer: Value = match http.post(url).json(&body).send().await {
                    Ok(r) => r.json().await.unwrap_or(Value::Null),
                    Err(_) => Value::Null,
                };
                answer["ReturnValue"]["evaluation"].as_str().unwrap_or("none").to_string()
            }
        };
        use futures::StreamExt;
        // The streaks begin: nothing is due yet.
        let first: Vec<String> = futures::stream::iter(down.iter().map(|(s, i)| post(*s, *i, 1))).buffer_unordered(64).collect().await;
        assert!(first.iter().all(|e| e == "none"), "a DOWN not yet HEALER_DOWN_FOR long evaluates nothing");
        tokio::time::sleep(Duration::from_secs(DOWN_FOR_S) + Duration::from_millis(200)).await;

        // The burst: every streak completes at once.
        let (requests, calls, runs) = (store.requests(), compute.observed().calls(), prompts.runs());
        let started = Instant::now();
        let answers: Vec<String> = futures::stream::iter(down.iter().map(|(s, i)| post(*s, *i, 2))).buffer_unordered(64).collect().await;
        let delivered = started.elapsed();
        let settle_by = Instant::now() + Duration::from_secs(300);
        while prompts.running() > 0 && Instant::now() < settle_by {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let settled = started.elapsed();
        let requests = store.requests() - requests;
        let calls = compute.observed().calls() - calls;
        let runs = prompts.runs() - runs;
        let count = |what: &str| answers.iter().filter(|a| *a == what).count();

        // What the journal says each set got.
        let since = OffsetDateTime::now_utc() - time::Duration::minutes(30);
        let (mut mass_repairs, mut scattered_repairs, mut paused, mut scattered_paused) = (0, 0, 0, 0);
        for (s, name) in names.iter().enumerate() {
            let id = ScaleSetId::new(TICK_SUB, TICK_RG, name);
            let (entries, _) = store.journal(&id, since).await.expect("journal");
            let repairs = entries.iter().filter(|e| e.kind == EntryKind::Repair && e.outcome == "requested").count();
            let held = entries.iter().any(|e| e.kind == EntryKind::Withheld && e.outcome == "too_many_unhealthy");
            if s < mass_sets {
                mass_repairs += repairs;
                paused += usize::from(held);
            } else {
                scattered_repairs += repairs;
                scattered_paused += usize::from(held);
            }
        }
        println!("\n{} DOWNs completing HEALER_DOWN_FOR={DOWN_FOR_S} s at once, 64 deliveries in flight, across {sets} Uniform scale sets of {set_size}: {mass_sets} sets with {mass_each} DOWN each (over the 40 % limit), {} with {scattered_each} each\n", down.len(), sets - mass_sets);
        println!("| measure | value |");
        println!("|---|---|");
        println!("| deliveries answered | {} in {:.2} s ({} started an evaluation, {} coalesced) |", answers.len(), delivered.as_secs_f64(), count("started"), count("coalesced"));
        println!("| evaluations run | {runs} ({:.2} per set; one per event would be {}) |", runs as f64 / sets as f64, down.len());
        println!("| table requests | {requests} ({} heartbeat writes, {} by the evaluations) |", down.len(), requests.saturating_sub(down.len() as u64));
        println!("| Compute calls | {calls} |");
        println!("| mass-DOWN sets paused (too_many_unhealthy) | {paused} of {mass_sets} |");
        println!("| repairs in the mass-DOWN sets | {mass_repairs} |");
        println!("| repairs in the other sets | {scattered_repairs} ({} DOWN; HEALER_MAX_PARALLEL per set), {scattered_paused} paused |", (sets - mass_sets) * scattered_each);
        println!("| burst to the last evaluation's end | {:.2} s |", settled.as_secs_f64());
        assert_eq!(mass_repairs, 0, "a short-circuited set makes no repair");
    });
}
