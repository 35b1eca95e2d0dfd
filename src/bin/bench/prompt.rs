//! `bench prompt [--instances N] [--faults F] [--timer-s T]` (issue 19): the time from the DOWN
//! heartbeat that completes `HEALER_DOWN_FOR` to the repair's Compute call, over F faults spread
//! across a fleet of N instances (scale sets of 1,000), with the evaluation on the evidence
//! (`HEALER_EVENT_REPAIRS=true`) and with the timer alone (`monitor-status` every T seconds), in
//! one run. The call's time is its `intent` journal row, written just before it is sent.

use crate::{start_handler, SECRET, SET_SIZE, TICK_RG, TICK_SUB};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use vmss_healer::journal::EntryKind;
use vmss_healer::scaleset::ScaleSetId;

/// `HEALER_DOWN_FOR` of the run: the second DOWN of a fault completes it.
const DOWN_FOR_S: u64 = 2;

pub fn run(instances: usize, faults: usize, timer_s: u64) {
    let sets = instances.div_ceil(SET_SIZE).max(1);
    let (storage, runtime) = crate::storage_and_runtime();
    runtime.block_on(async {
        let crate::fleet::Fleet { sim, port: sim_port, ids, names } = crate::fleet::start(instances, SET_SIZE, "Uniform").await;
        let env = |event_repairs: bool| {
            vec![
                ("HEALER_SCALE_SETS", ids.join(",")),
                ("HEALER_STORAGE", storage.connection_string()),
                ("HEALER_ARM_ENDPOINT", format!("http://127.0.0.1:{sim_port}")),
                ("HEALER_REPAIR_ACTIONS", "restart".to_string()),
                ("HEALER_DOWN_FOR", DOWN_FOR_S.to_string()),
                ("HEALER_EVENT_REPAIRS", event_repairs.to_string()),
                ("IDENTITY_ENDPOINT", format!("http://127.0.0.1:{sim_port}/msi/token")),
                ("IDENTITY_HEADER", SECRET.to_string()),
            ]
        };
        // The faults: instances spread over every set, different ones for each mode.
        let vms: Vec<(String, u64, String)> = {
            let w = sim.world.lock().await;
            w.sets
                .values()
                .flat_map(|s| s.vms.values().map(move |vm| (s.name.clone(), vm.instance_id, vm.vm_id.clone())))
                .collect()
        };
        let stride = (vms.len() / (2 * faults).max(1)).max(1);
        let picked: Vec<&(String, u64, String)> = vms.iter().step_by(stride).take(2 * faults).collect();
        println!("\n{instances} instances in {sets} Uniform scale sets of up to {SET_SIZE}; {faults} faults per mode, one every 100 ms; HEALER_DOWN_FOR={DOWN_FOR_S} s; the timer-only mode's monitor-status every {timer_s} s (60 s in Azure)\n");
        println!("| mode | faults repaired | median | p99 | max | monitor-status invocations |");
        println!("|---|---|---|---|---|---|");
        let mut first = true;
        for (mode, event_repairs, faulted) in [
            ("evaluation on the evidence", true, &picked[..faults.min(picked.len())]),
            ("timer only", false, &picked[faults.min(picked.len())..]),
        ] {
            let (mut child, base, store) = start_handler(&env(event_repairs), &storage.connection_string()).await;
            let http = reqwest::Client::new();
            if first {
                // The first mirror.
                crate::invoke_timer(&http, &base, "monitor-state").await;
                first = false;
            }
            // Every VM reporting UP, as of now.
            store.import_heartbeats(&crate::fleet::heartbeats(&sim, OffsetDateTime::now_utc(), 0, |_| false).await).await.expect("seed heartbeats");
            let mut latencies: Vec<Duration> = Vec::new();
            let completed = std::sync::Arc::new(tokio::sync::Mutex::new(HashMap::<(String, u64), OffsetDateTime>::new()));
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let passes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            let timer = (!event_repairs).then(|| {
                let (http, base, stop, passes) = (http.clone(), base.clone(), stop.clone(), passes.clone());
                tokio::spawn(async move {
                    let mut every = tokio::time::interval(Duration::from_secs(timer_s));
                    every.tick().await;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        every.tick().await;
                        crate::invoke_timer(&http, &base, "monitor-status").await;
                        passes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                })
            });
            let sends: Vec<_> = faulted
                .iter()
                .enumerate()
                .map(|(k, (set, n, vm_id))| {
                    let (http, base, completed) = (http.clone(), base.clone(), completed.clone());
                    let (set, n, vm_id) = (set.clone(), *n, vm_id.clone());
                    async move {
                        tokio::time::sleep(Duration::from_millis(100 * k as u64)).await;
                        post(&http, &base, &set, n, &vm_id, 1).await;
                        tokio::time::sleep(Duration::from_millis(DOWN_FOR_S * 1000 + 50)).await;
                        let at = OffsetDateTime::now_utc();
                        post(&http, &base, &set, n, &vm_id, 2).await;
                        completed.lock().await.insert((set, n), at);
                    }
                })
                .collect();
            futures::future::join_all(sends).await;
            // Until every fault's repair call was journaled (bounded).
            let deadline = Instant::now() + Duration::from_secs(timer_s * 3 + 30);
            loop {
                latencies.clear();
                let completed = completed.lock().await.clone();
                for name in &names {
                    let id = ScaleSetId::new(TICK_SUB, TICK_RG, name);
                    let since = OffsetDateTime::now_utc() - time::Duration::minutes(30);
                    let Ok((entries, _)) = store.journal(&id, since).await else { continue };
                    for e in entries.iter().filter(|e| e.kind == EntryKind::Intent) {
                        let Ok(n) = e.instance_id.parse::<u64>() else { continue };
                        if let Some(at) = completed.get(&(name.clone(), n)) {
                            latencies.push(Duration::try_from(e.at - *at).unwrap_or_default());
                        }
                    }
                }
                if latencies.len() >= faulted.len() || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(t) = timer {
                t.abort();
            }
            let _ = child.kill();
            let _ = child.wait();
            latencies.sort();
            let at = |q: f64| {
                latencies
                    .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
                    .map_or("-".to_string(), |d| format!("{:.2} s", d.as_secs_f64()))
            };
            println!(
                "| {mode} | {} of {} | {} | {} | {} | {} |",
                latencies.len(),
                faulted.len(),
                at(0.5),
                at(0.99),
                at(1.0),
                passes.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
    });
}

/// One DOWN heartbeat of `set`'s instance `n`, as Event Grid delivers it.
async fn post(
    http: &reqwest::Client,
    base: &str,
    set: &str,
    n: u64,
    vm_id: &str,
    sequence: u64,
) -> Value {
    let at = OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let body = json!({"Data": {"event": {
        "id": uuid::Uuid::new_v4().to_string(), "eventType": "VmssHealer.Heartbeat", "dataVersion": "1",
        "subject": format!("/subscriptions/{TICK_SUB}/resourceGroups/{TICK_RG}/providers/Microsoft.Compute/virtualMachineScaleSets/{set}/virtualMachines/{n}"),
        "eventTime": at,
        "data": {"status": "DOWN", "vmId": vm_id, "sequence": sequence}}},
        "Metadata": {"sys": {"MethodName": "monitor-events"}}});
    match http
        .post(format!("{base}/monitor-events"))
        .json(&body)
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}
