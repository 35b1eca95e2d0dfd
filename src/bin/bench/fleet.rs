//! The simulated fleet the handler's benchmarks run against, served from this process: scale
//! sets of a given size, a day old, every VM running.

use crate::{admin, server, world, Shared, SECRET, TICK_RG, TICK_SUB};
use std::time::Duration;
use time::OffsetDateTime;
use vmss_healer::heartbeat::{Heartbeat, Origin, Status};
use vmss_healer::scaleset::ScaleSetId;

pub struct Fleet {
    pub sim: Shared,
    /// Where the simulated ARM listens.
    pub port: u16,
    /// The scale sets' resource ids, for `HEALER_SCALE_SETS`.
    pub ids: Vec<String>,
    /// Their names, in the same order.
    pub names: Vec<String>,
}

/// `instances` VMs in sets of up to `set_size` named `web000`, `web001`, … of `mode` (`Uniform`
/// or `Flexible`).
pub async fn start(instances: usize, set_size: usize, mode: &str) -> Fleet {
    let sets = instances.div_ceil(set_size).max(1);
    let port = crate::azurite::free_port();
    let mut fleet = world::World::new(Duration::ZERO, 100);
    let day_ago = OffsetDateTime::now_utc() - time::Duration::days(1);
    let names: Vec<String> = (0..sets).map(|i| format!("web{i:03}")).collect();
    for (i, name) in names.iter().enumerate() {
        let size = set_size.min(instances.saturating_sub(set_size * i));
        let key = fleet.create_set(
            TICK_SUB,
            TICK_RG,
            name,
            size,
            "westeurope",
            Vec::new(),
            mode,
            false,
        );
        for vm in fleet
            .sets
            .get_mut(&key)
            .into_iter()
            .flat_map(|s| s.vms.values_mut())
        {
            vm.time_created = day_ago;
        }
    }
    let sim = Shared::new(fleet, port, SECRET.into(), None, admin::Delivery::Handler);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the simulator");
    let router = server::router(sim.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let ids = names
        .iter()
        .map(|n| format!("/subscriptions/{TICK_SUB}/resourceGroups/{TICK_RG}/providers/Microsoft.Compute/virtualMachineScaleSets/{n}"))
        .collect();
    Fleet {
        sim,
        port,
        ids,
        names,
    }
}

/// A heartbeat of every VM of the fleet at `now`, DOWN where `down(instance id)` says so.
pub async fn heartbeats(
    sim: &Shared,
    now: OffsetDateTime,
    sequence: i64,
    down: impl Fn(u64) -> bool,
) -> Vec<Heartbeat> {
    let w = sim.world.lock().await;
    let mut beats = Vec::new();
    for set in w.sets.values() {
        let id = ScaleSetId::new(&set.subscription, &set.resource_group, &set.name);
        for vm in set.vms.values() {
            beats.push(Heartbeat {
                // Uniform: the instance id; Flexible: the VM's name.
                target: id.instance(&set.key_of(vm).to_ascii_lowercase()),
                status: if down(vm.instance_id) {
                    Status::Down
                } else {
                    Status::Up
                },
                event_time: now,
                received_at: now,
                sequence: Some(sequence),
                vm_id: Some(vm.vm_id.clone()),
                computer_name: Some(vm.computer_name.clone()),
                detail: None,
                origin: Origin::Agent,
                event_id: String::new(),
                down_since: None,
                attested: false,
                attestation: None,
            });
        }
    }
    beats
}
