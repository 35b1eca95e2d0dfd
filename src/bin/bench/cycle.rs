//! `bench cycle [--instances N] [--batch 20%] [--reimage-minutes R]`: a rolling cycle of one scale
//! set of N instances by the handler binary (`handler cycle`, then timer passes as the Functions
//! host would run them), beside the classic cycle_vmss script's strategy on the same simulated
//! fleet: one instance at a time, reimage, poll its instance view until it drops and returns.
//! Both are counted from the simulator's own log of the Compute requests it served.

use super::*;

/// What the simulator served between two points: writes (reimages and the like), reads.
fn served(calls: &[world::Call]) -> (usize, usize) {
    let writes = calls.iter().filter(|c| c.method != "GET").count();
    (writes, calls.len() - writes)
}

async fn calls_since(sim: &Shared, from: usize) -> (usize, usize, usize) {
    let w = sim.world.lock().await;
    let (writes, reads) = served(&w.calls[from.min(w.calls.len())..]);
    (writes, reads, w.calls.len())
}

/// Waits until the simulator has no operation running (each lasts the configured delay).
async fn settled(sim: &Shared) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        {
            let mut w = sim.world.lock().await;
            w.advance();
            if w.operations.values().all(|o| o.ended.is_some()) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "simulated operations never ended"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every live VM reports UP now, as its agent would after the step that took it down.
async fn heartbeats(sim: &Shared, store: &Store) {
    let now = OffsetDateTime::now_utc();
    let mut beats = Vec::new();
    {
        let w = sim.world.lock().await;
        for set in w.sets.values() {
            let id = ScaleSetId::new(&set.subscription, &set.resource_group, &set.name);
            for vm in set.vms.values() {
                if vm.provisioning_state != "Succeeded" || vm.power_state != "running" {
                    continue;
                }
                beats.push(vmss_healer::heartbeat::Heartbeat {
                    target: id.instance(&set.key_of(vm).to_ascii_lowercase()),
                    status: vmss_healer::heartbeat::Status::Up,
                    event_time: now,
                    received_at: now,
                    sequence: Some(vm.sequence),
                    vm_id: Some(vm.vm_id.clone()),
                    computer_name: Some(vm.computer_name.clone()),
                    detail: None,
                    origin: vmss_healer::heartbeat::Origin::Agent,
                    event_id: String::new(),
                    down_since: None,
                    attested: false,
                    attestation: None,
                });
            }
        }
    }
    store
        .import_heartbeats(&beats)
        .await
        .expect("import heartbeats");
}

pub fn run(instances: usize, batch: &str, reimage_minutes: f64) {
    let (storage, runtime) = crate::storage_and_runtime();
    runtime.block_on(async {
        // Reimages take a moment, so that both strategies see an instance drop and return.
        let sim_port = azurite::free_port();
        let mut fleet = world::World::new(Duration::from_millis(20), 100);
        let key = fleet.create_set(TICK_SUB, TICK_RG, "web", instances, "westeurope", Vec::new(), "Uniform", false);
        let day_ago = OffsetDateTime::now_utc() - time::Duration::days(1);
        if let Some(set) = fleet.sets.get_mut(&key) {
            set.max_capacity = instances * 2 + 10;
            for vm in set.vms.values_mut() {
                vm.time_created = day_ago;
                vm.provisioned_at = day_ago;
            }
        }
        let sim = Shared::new(fleet, sim_port, SECRET.into(), None, admin::Delivery::Handler);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", sim_port)).await.expect("bind the simulator");
        let router = server::router(sim.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });

        let set_id = format!("/subscriptions/{TICK_SUB}/resourceGroups/{TICK_RG}/providers/Microsoft.Compute/virtualMachineScaleSets/web");
        let env: Vec<(&str, String)> = vec![
            ("HEALER_SCALE_SETS", set_id.clone()),
            ("HEALER_STORAGE", storage.connection_string()),
            ("HEALER_ARM_ENDPOINT", format!("http://127.0.0.1:{sim_port}")),
            ("HEALER_FULL_RESYNC", "0".into()),
            ("IDENTITY_ENDPOINT", format!("http://127.0.0.1:{sim_port}/msi/token")),
            ("IDENTITY_HEADER", SECRET.into()),
        ];
        let (mut child, base, store) = start_handler(&env, &storage.connection_string()).await;
        let http = reqwest::Client::new();
        let invoke = |function: &'static str| {
            let (http, base) = (&http, &base);
            async move { invoke_timer(http, base, function).await.1 }
        };
        invoke("monitor-state").await;
        heartbeats(&sim, &store).await;

        // vmss-healer: the operator's command, then passes until the cycle is over.
        let started = Instant::now();
        let (_, _, from) = calls_since(&sim, 0).await;
        let out = Command::new(handler_binary())
            .args(["cycle", "web", "--batch", batch, "--reason", "bench"])
            .env_clear()
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .expect("handler cycle");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let (mut passes, mut table_requests, mut lowest) = (0usize, 0u64, instances);
        let outcome = loop {
            let state = invoke("monitor-state").await;
            let status = invoke("monitor-status").await;
            passes += 1;
            table_requests += state["table_requests"].as_u64().unwrap_or(0) + status["table_requests"].as_u64().unwrap_or(0);
            {
                let w = sim.world.lock().await;
                let serving = w.sets[&key].vms.values().filter(|v| v.provisioning_state == "Succeeded").count();
                lowest = lowest.min(serving);
            }
            let op = &status["scale_sets"][0]["operation"];
            let s = op["state"].as_str().unwrap_or("none").to_string();
            if s != "running" && s != "pending" {
                break s;
            }
            assert!(passes < 10_000, "the cycle never ended: {op}");
            settled(&sim).await;
            heartbeats(&sim, &store).await;
        };
        let ours_time = started.elapsed();
        let (ours_writes, ours_reads, from) = calls_since(&sim, from).await;
        let peak = proc_status_kib(child.id(), "VmHWM:").unwrap_or(0);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(outcome, "succeeded");

        // The classic script: one instance at a time, reimage, poll its instance view.
        let token: Value = http
            .get(format!("http://127.0.0.1:{sim_port}/msi/token?api-version=2019-08-01&resource=https://management.azure.com"))
            .header("X-IDENTITY-HEADER", SECRET)
            .send()
            .await
            .expect("token")
            .json()
            .await
            .expect("token JSON");
        let token = token["access_token"].as_str().unwrap_or_default().to_string();
        let arm = format!("http://127.0.0.1:{sim_port}{set_id}");
        let ids: Vec<u64> = sim.world.lock().await.sets[&key].vms.keys().copied().collect();
        let classic_started = Instant::now();
        let mut polls = 0usize;
        for id in &ids {
            let r = http
                .post(format!("{arm}/reimage?api-version=2024-07-01"))
                .bearer_auth(&token)
                .json(&json!({"instanceIds": [id.to_string()]}))
                .send()
                .await
                .expect("reimage");
            assert_eq!(r.status().as_u16(), 202);
            // Wait for it to drop, then to return (the script's 15 s polls, here back to back).
            let mut dropped = false;
            loop {
                let view: Value = http
                    .get(format!("{arm}/virtualMachines/{id}/instanceView?api-version=2024-07-01"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .expect("instance view")
                    .json()
                    .await
                    .expect("instance view JSON");
                polls += 1;
                let ok = view["statuses"].as_array().is_some_and(|s| {
                    s.iter().any(|c| c["code"] == "ProvisioningState/succeeded")
                        && s.iter().any(|c| c["code"] == "PowerState/running")
                });
                if !ok {
                    dropped = true;
                } else if dropped {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let classic_time = classic_started.elapsed();
        let (classic_writes, classic_reads, _) = calls_since(&sim, from).await;

        let batches = {
            let p = vmss_healer::operations::cycle::parse(&vmss_healer::operations::cycle::Raw {
                batch: Some(batch),
                ..Default::default()
            })
            .expect("batch");
            instances.div_ceil(p.batch_size(instances))
        };
        // In Azure: a batch is out for a reimage, then back by the next pass after its heartbeat
        // (passes a minute apart); the script waits out each instance's reimage in turn, plus
        // half a 15 s poll on average to see it return.
        let ours_azure = batches as f64 * (reimage_minutes.ceil() + 1.0);
        let classic_azure = ids.len() as f64 * (reimage_minutes + 7.5 / 60.0);
        println!("\ncycle of {instances} instances (Uniform), batches of {batch}; simulated reimages take 20 ms\n");
        println!("| strategy | Compute writes | Compute reads | passes / polls | table requests | wall time on the simulator | in Azure, reimages of {reimage_minutes} min |");
        println!("|---|---|---|---|---|---|---|");
        println!(
            "| vmss-healer `handler cycle` | {ours_writes} | {ours_reads} | {passes} passes | {table_requests} | {:.1} s | ≈ {:.0} min ({batches} batches) |",
            ours_time.as_secs_f64(),
            ours_azure
        );
        println!(
            "| classic script, one at a time | {classic_writes} | {classic_reads} | {polls} polls | 0 | {:.1} s | ≈ {:.1} h |",
            classic_time.as_secs_f64(),
            classic_azure / 60.0
        );
        println!("\nfewest instances in service during the vmss-healer cycle: {lowest} of {instances}; handler peak RSS (VmHWM): {:.1} MiB", peak as f64 / 1024.0);
    });
}
