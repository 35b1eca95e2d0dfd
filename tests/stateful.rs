//! Stateful instances (issue 18): a capacity-1 stateful set whose VM dies is healed with its data
//! disk (same disk, same LUN) on the new VM, which counts as healthy only once it has mounted it;
//! a failed attach leaves the disk on the old VM and the incident escalates with an alert; a
//! replacement into another zone copies the disk. After every pass: no disk on two VMs, none
//! orphaned (each attached, or named by the slot while a replacement moves it).

mod common;

use common::{scale_set_id, spawn_app, TestApp};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use vmss_healer::journal::{Entry, EntryKind};

/// A capacity-1 stateful set `db` (a disk at LUN 0 with data on it) in `zones`, whose agents wait
/// for that disk; repairs give up on restart and reimage fast.
async fn stateful_app(zones: &[&str], extra: &str, webhook: Option<&str>) -> TestApp {
    let spec = json!({"name": "db", "capacity": 1, "zones": zones,
                      "dataDisks": [{"lun": 0, "sizeGb": 128}]});
    stateful_app_of(spec, extra, webhook).await
}

async fn stateful_app_of(spec: Value, extra: &str, webhook: Option<&str>) -> TestApp {
    let mut b = spawn_app().scale_set_spec(spec).env(
        "HEALER_SCALE_SETS",
        &format!(
            "{}[STATEFUL_DISKS=0 MAX_UNHEALTHY=100% REPAIR_TIMEOUT=6 GRACE_PERIOD=0 {extra}]",
            scale_set_id("db")
        ),
    );
    if let Some(url) = webhook {
        b = b.env("HEALER_WEBHOOK_URL", url);
    }
    b.start().await
}

async fn disks(app: &TestApp) -> Vec<Value> {
    app.admin(reqwest::Method::GET, "disks", None)
        .await
        .as_array()
        .cloned()
        .unwrap_or_default()
}

async fn slots(app: &TestApp) -> Vec<vmss_healer::slot::Slot> {
    let (slots, _) = app.store.slots(&TestApp::scale_set("db")).await.unwrap();
    slots.into_iter().map(|v| v.value).collect()
}

/// The invariant, on the simulator's state: a disk is attached to at most one VM (its
/// `managedBy`), and an unattached disk is one the healer's records name — the slot, or the
/// running replacement that moves it — never one nobody knows.
async fn assert_no_disk_lost(app: &TestApp, when: &str) {
    let slots = slots(app).await;
    let (ops, _) = app
        .store
        .operations(Some(&TestApp::scale_set("db")))
        .await
        .unwrap();
    let moving: Vec<String> = ops
        .iter()
        .filter(|o| !o.value.state.is_over())
        .map(|o| o.value.memo.to_string().to_ascii_lowercase())
        .collect();
    for d in disks(app).await {
        let id = d["id"].as_str().unwrap().to_ascii_lowercase();
        if d["managedBy"].is_string() {
            continue;
        }
        let named = slots
            .iter()
            .any(|s| s.disk_ids().any(|x| x.eq_ignore_ascii_case(&id)))
            || moving.iter().any(|m| m.contains(&id));
        assert!(
            named,
            "{when}: disk {id} is attached to no VM and named by nothing: {d}"
        );
    }
}

/// One pass of everything (heartbeats, mirror, repairs) with the invariant checked after it.
async fn pass(app: &TestApp, when: &str) -> Value {
    app.heartbeat_round().await;
    app.invoke_timer("monitor-state").await;
    let (status, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(status, 200, "{answer}");
    assert_no_disk_lost(app, when).await;
    answer
}

async fn journal(app: &TestApp) -> Vec<Entry> {
    let (mut j, _) = app.recent_journal(&TestApp::scale_set("db")).await;
    j.reverse();
    j
}

fn outcomes(j: &[Entry], kind: EntryKind) -> Vec<String> {
    j.iter()
        .filter(|e| e.kind == kind)
        .map(|e| e.outcome.clone())
        .collect()
}

/// The new VM said STARTING first and UP last: it counted only once it had its data.
fn starting_until_its_data(seen: &[(String, String)], new_id: &str) {
    let new_seen: Vec<&str> = seen
        .iter()
        .filter(|(i, _)| i == new_id)
        .map(|(_, s)| s.as_str())
        .collect();
    assert_eq!(new_seen.first(), Some(&"STARTING"), "{seen:?}");
    assert_eq!(new_seen.last(), Some(&"UP"), "{seen:?}");
}

/// Drives passes until `done` holds of the journal, checking the invariant after each; returns
/// the heartbeat statuses seen stored for each instance along the way, in order.
async fn drive(
    app: &TestApp,
    limit: Duration,
    done: impl Fn(&[Entry]) -> bool,
) -> (Vec<Entry>, Vec<(String, String)>) {
    let deadline = Instant::now() + limit;
    let mut seen: Vec<(String, String)> = Vec::new();
    loop {
        pass(app, "a pass").await;
        for instance in ["1", "2", "3"] {
            if let Some(stored) = app
                .store
                .heartbeat(&TestApp::scale_set("db"), instance)
                .await
                .unwrap()
            {
                let status = stored.heartbeat.status.label().to_string();
                if seen.last() != Some(&(instance.to_string(), status.clone())) {
                    seen.push((instance.to_string(), status));
                }
            }
        }
        let j = journal(app).await;
        if done(&j) {
            return (j, seen);
        }
        assert!(
            Instant::now() < deadline,
            "not done in time; journal: {j:#?}\nlog: {}",
            app.logs()
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

fn disk_at(vm: &Value, lun: u64) -> Option<String> {
    vm["data_disks"][lun.to_string()]["id"]
        .as_str()
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_stateful_vm_is_replaced_with_its_data_disk_on_the_new_one() {
    let app = stateful_app(&["1"], "", None).await;
    pass(&app, "first mirror").await;
    let slot = slots(&app).await;
    assert_eq!(
        slot.len(),
        1,
        "the set's VM got its slot when first mirrored"
    );
    assert_eq!(slot[0].instance, "0");
    let disk = disk_at(&app.vm("db", 0).await, 0).expect("VM 0 has its data disk");
    assert!(slot[0].disk_ids().any(|d| d.eq_ignore_ascii_case(&disk)));

    // It dies for good: restart and reimage do not help.
    app.sync_and_break("db", 0, json!({"beat": "down", "fault": "hard"}))
        .await;
    let (j, seen) = drive(&app, Duration::from_secs(120), |j| {
        outcomes(j, EntryKind::Operation).contains(&"succeeded".to_string())
            && j.iter().any(|e| e.outcome == "replaced")
    })
    .await;
    // The escalation kept the disk first: restart, reimage, then the stateful replacement.
    let actions: Vec<&str> = j
        .iter()
        .filter(|e| e.kind == EntryKind::Repair && e.outcome == "requested")
        .filter_map(|e| e.action.map(|a| a.as_str()))
        .collect();
    assert_eq!(actions, vec!["restart", "reimage", "replace"], "{j:#?}");
    // In order (steps of one pass share a time).
    let order = [
        "started",
        "new_instance",
        "detached",
        "attached",
        "slot_moved",
        "healthy",
        "deleted",
        "succeeded",
    ];
    let at = |step: &str| {
        j.iter()
            .find(|e| e.kind == EntryKind::Operation && e.outcome == step)
            .map(|e| e.at)
            .unwrap_or_else(|| panic!("no {step}: {j:#?}"))
    };
    for pair in order.windows(2) {
        assert!(
            at(pair[0]) <= at(pair[1]),
            "{} after {}: {j:#?}",
            pair[1],
            pair[0]
        );
    }
    // Same disk, same LUN, on the new VM; the old one gone; the slot follows.
    let fleet = app.fleet("db").await;
    let vms = fleet["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 1, "capacity 1 again: {fleet}");
    let new_vm = &vms[0];
    let new_id = new_vm["instance_id"].to_string();
    assert_ne!(new_id, "0");
    assert_eq!(
        disk_at(new_vm, 0).as_deref(),
        Some(disk.as_str()),
        "{new_vm}"
    );
    let d = disks(&app).await;
    assert_eq!(d.len(), 1, "no disk left behind, none added: {d:?}");
    assert_eq!(
        d[0]["content"], "data written by db_0",
        "the data went along"
    );
    let slot = slots(&app).await;
    assert_eq!(slot[0].instance, new_id);
    // Counted healthy only once it had its data: it said STARTING before the attach.
    starting_until_its_data(&seen, &new_id);
}

/// The data disk is in the scale set's model, the usual way to give each VM one: the new VM comes
/// with an empty disk of its own at LUN 0, where Azure attaches no second disk ("A disk at LUN 0
/// already exists."). It is taken off the new VM first, the slot's disk takes its LUN, and the
/// empty disk is deleted once the replacement is done — the data disk never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_vm_whose_model_gives_it_a_disk_at_the_slots_lun_gets_the_slots_disk_there() {
    let spec = json!({"name": "db", "capacity": 1, "modelDisks": true,
                      "dataDisks": [{"lun": 0, "sizeGb": 128}]});
    let app = stateful_app_of(spec, "REPAIR_ACTIONS=reimage,replace", None).await;
    pass(&app, "first mirror").await;
    let disk = disk_at(&app.vm("db", 0).await, 0).expect("VM 0 has its data disk");
    app.sync_and_break("db", 0, json!({"beat": "down", "fault": "hard"}))
        .await;
    let (j, seen) = drive(&app, Duration::from_secs(120), |j| {
        outcomes(j, EntryKind::Operation).contains(&"succeeded".to_string())
            || outcomes(j, EntryKind::Operation).contains(&"failed".to_string())
    })
    .await;
    let ops = outcomes(&j, EntryKind::Operation);
    assert!(ops.contains(&"succeeded".to_string()), "{j:#?}");
    assert!(ops.contains(&"cleared".to_string()), "{ops:?}");
    let fleet = app.fleet("db").await;
    let vms = fleet["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 1, "capacity 1 again: {fleet}");
    let new_id = vms[0]["instance_id"].to_string();
    assert_ne!(new_id, "0");
    assert_eq!(
        disk_at(&vms[0], 0).as_deref(),
        Some(disk.as_str()),
        "the slot's disk at LUN 0: {fleet}"
    );
    let d = disks(&app).await;
    assert_eq!(
        d.len(),
        1,
        "the model's empty disk deleted, the data kept: {d:?}"
    );
    assert_eq!(d[0]["content"], "data written by db_0");
    // Its empty disk did not count: STARTING until the slot's disk was there.
    starting_until_its_data(&seen, &new_id);
}

/// An operator who aborts a stateful replacement under way gets everything back as it was — the
/// disk on the broken VM, the new VM deleted — not a VM without its data; the operation ends
/// `aborted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_replacement_puts_the_disk_back_and_removes_the_new_vm() {
    let app = stateful_app(&["1"], "REPAIR_ACTIONS=reimage,replace", None).await;
    pass(&app, "first mirror").await;
    let disk = disk_at(&app.vm("db", 0).await, 0).expect("VM 0 has its data disk");
    app.sync_and_break("db", 0, json!({"beat": "down", "fault": "hard"}))
        .await;
    drive(&app, Duration::from_secs(60), |j| {
        outcomes(j, EntryKind::Operation).contains(&"new_instance".to_string())
    })
    .await;
    // The new VM never comes up, so the replacement cannot get past it before the abort.
    let fleet = app.fleet("db").await;
    let new_id = fleet["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["instance_id"].as_u64())
        .find(|id| *id != 0)
        .unwrap_or_else(|| panic!("the new VM: {fleet}"));
    app.break_vm("db", new_id, json!({"beat": "silent"})).await;
    let (code, out, err) = app.cli(&["operations", "db", "--json"]);
    assert_eq!(code, 0, "{err}");
    let ops: Vec<Value> = serde_json::from_str(&out).unwrap();
    let id = ops
        .iter()
        .find(|o| o["kind"] == "carry" && o["state"] == "running")
        .and_then(|o| o["id"].as_str())
        .unwrap_or_else(|| panic!("a running carry: {out}"))
        .to_string();
    let (code, out, err) = app.cli(&["operation", "abort", &id, "--reason", "wrong VM size"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("rolling_back"), "{out}");
    let (j, _) = drive(&app, Duration::from_secs(60), |j| {
        outcomes(j, EntryKind::Operation).contains(&"aborted".to_string())
    })
    .await;
    let ops = outcomes(&j, EntryKind::Operation);
    assert!(ops.contains(&"rolled_back".to_string()), "{ops:?}");
    let fleet = app.fleet("db").await;
    let vms = fleet["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 1, "the new VM deleted: {fleet}");
    assert_eq!(vms[0]["instance_id"], 0);
    assert_eq!(
        disk_at(&vms[0], 0).as_deref(),
        Some(disk.as_str()),
        "{fleet}"
    );
    assert_eq!(slots(&app).await[0].instance, "0");
    let (_, out, _) = app.cli(&["operations", "db", "--json"]);
    let ops: Vec<Value> = serde_json::from_str(&out).unwrap();
    let op = ops.iter().find(|o| o["id"] == id.as_str()).unwrap();
    assert_eq!(op["state"], "aborted", "{op}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attach_leaves_the_disk_on_the_old_vm_and_the_incident_escalates() {
    let (url, receiver) =
        common::webhook::start_receiver(common::webhook::Receiver::default()).await;
    // Straight to the replacement (one step in place, then replace), and room for a second try.
    let app = stateful_app(
        &["1"],
        "REPAIR_ACTIONS=reimage,replace MAX_ATTEMPTS=3",
        Some(&url),
    )
    .await;
    pass(&app, "first mirror").await;
    let disk = disk_at(&app.vm("db", 0).await, 0).unwrap();
    app.admin(
        reqwest::Method::POST,
        "operation-faults",
        Some(json!({"verb": "attachdatadisks", "status": "Failed", "code": "AttachDiskWhileBeingDetached",
                    "message": "Cannot attach data disk to VM because the disk is currently being detached."})),
    )
    .await;
    app.sync_and_break("db", 0, json!({"beat": "down", "fault": "hard"}))
        .await;
    let (j, _) = drive(&app, Duration::from_secs(120), |j| {
        outcomes(j, EntryKind::Operation).contains(&"failed".to_string())
    })
    .await;
    assert!(j.iter().any(|e| e.outcome == "rolled_back"), "{j:#?}");
    // Where the first replacement left things: the disk back on VM 0, the new VM gone.
    let vm0 = app.vm("db", 0).await;
    assert_eq!(
        disk_at(&vm0, 0).as_deref(),
        Some(disk.as_str()),
        "back on the old VM: {vm0}"
    );
    let fleet = app.fleet("db").await;
    assert_eq!(
        fleet["vms"].as_array().unwrap().len(),
        1,
        "the new VM was removed: {fleet}"
    );
    assert_eq!(slots(&app).await[0].instance, "0");
    let alerts = common::webhook::wait_for_alerts(&receiver, 1, Duration::from_secs(30)).await;
    assert!(
        alerts.iter().any(|a| a["kind"] == "operation"
            && a["reason"]
                .as_str()
                .unwrap_or("")
                .contains("AttachDiskWhileBeingDetached")),
        "{alerts:#?}"
    );
    // The incident escalates: the next attempt is another replacement, which works.
    let (j, _) = drive(&app, Duration::from_secs(120), |j| {
        j.iter().any(|e| e.outcome == "replaced")
    })
    .await;
    let escalated = j
        .iter()
        .find(|e| e.kind == EntryKind::Repair && e.attempt == 3)
        .unwrap_or_else(|| panic!("{j:#?}"));
    assert!(
        escalated
            .evidence
            .to_string()
            .contains("AttachDiskWhileBeingDetached"),
        "the escalation says why the replacement before failed: {escalated:?}"
    );
    let fleet = app.fleet("db").await;
    let vm = &fleet["vms"][0];
    assert_eq!(disk_at(vm, 0).as_deref(), Some(disk.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_in_another_zone_copies_the_disk_there() {
    // Zones 1 and 2: VM 0 is in zone 1, the next VM lands in zone 2.
    let mut app = stateful_app(&["1", "2"], "REPAIR_ACTIONS=reimage,replace", None).await;
    pass(&app, "first mirror").await;
    let disk = disk_at(&app.vm("db", 0).await, 0).unwrap();
    app.sync_and_break("db", 0, json!({"beat": "down", "fault": "hard"}))
        .await;
    // The handler restarts in the middle of the copy: the replacement resumes from its row.
    drive(&app, Duration::from_secs(120), |j| {
        j.iter().any(|e| e.outcome == "zone_copy")
    })
    .await;
    app.restart_handler(&[]);
    // Replaced, and the clean-up after it done (the original disk and the snapshot gone).
    let (j, _) = drive(&app, Duration::from_secs(120), |j| {
        j.iter().any(|e| e.outcome == "replaced")
            && outcomes(j, EntryKind::Operation).contains(&"succeeded".to_string())
    })
    .await;
    assert!(
        j.iter()
            .any(|e| e.outcome == "zone_copy" && e.reason.contains("into zone 2")),
        "the journal says the disk moves zones: {j:#?}"
    );
    let fleet = app.fleet("db").await;
    let vm = &fleet["vms"][0];
    assert_eq!(vm["zone"], "2");
    let copy = disk_at(vm, 0).expect("a disk at LUN 0");
    assert_ne!(copy, disk, "a copy: a zonal disk attaches only in its zone");
    let d = disks(&app).await;
    assert_eq!(d.len(), 1, "the old disk went once the copy served: {d:?}");
    assert_eq!(d[0]["zone"], "2");
    assert_eq!(
        d[0]["content"], "data written by db_0",
        "the data went along"
    );
    let slot = slots(&app).await;
    assert!(slot[0].disk_ids().any(|x| x.eq_ignore_ascii_case(&copy)));
    assert_eq!(slot[0].zone.as_deref(), Some("2"));

    // Every request it sent is one the deployed roles allow, and the stateful role is all used
    // (but what a Flexible VM's attach and address take, held in the Flexible test, and the disk
    // read Azure checks on its own).
    let mut used = std::collections::BTreeSet::new();
    for call in app.compute_calls().await {
        let (method, path) = (
            call["method"].as_str().unwrap(),
            call["path"].as_str().unwrap(),
        );
        if path.starts_with("/msi/") {
            continue;
        }
        let action = vmss_healer::compute::required_action(method, path)
            .unwrap_or_else(|| panic!("{method} {path} is not covered by REQUIRED_ACTIONS"));
        used.insert(action);
    }
    for action in vmss_healer::compute::STATEFUL_ACTIONS.iter().filter(|a| {
        !a.ends_with("disks/read")
            && !a.starts_with("Microsoft.Compute/virtualMachines/")
            && !a.starts_with("Microsoft.Network/")
    }) {
        assert!(used.contains(action), "{action} unused: {used:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_zone_replacement_is_refused_when_copying_is_not_allowed() {
    let app = stateful_app(
        &["1", "2"],
        "REPAIR_ACTIONS=reimage,replace MAX_ATTEMPTS=2 STATEFUL_ZONE_COPY=false",
        None,
    )
    .await;
    pass(&app, "first mirror").await;
    let disk = disk_at(&app.vm("db", 0).await, 0).unwrap();
    app.sync_and_break("db", 0, json!({"beat": "down", "fault": "hard"}))
        .await;
    let (j, _) = drive(&app, Duration::from_secs(120), |j| {
        j.iter().any(|e| e.outcome == "given_up")
    })
    .await;
    assert!(
        j.iter().any(|e| e.kind == EntryKind::Operation
            && e.outcome == "failed"
            && e.reason.contains("STATEFUL_ZONE_COPY=false")),
        "{j:#?}"
    );
    assert_eq!(
        disk_at(&app.vm("db", 0).await, 0).as_deref(),
        Some(disk.as_str())
    );
    assert_eq!(app.fleet("db").await["vms"].as_array().unwrap().len(), 1);
}

/// A Flexible stateful VM's public IP follows its slot too (the licence tied to the address): on
/// the new VM before it must come up, off the broken one first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flexible_vms_public_ip_follows_its_data_to_the_new_vm() {
    let app = spawn_app()
        .mode(common::Mode::Flexible)
        .scale_set_spec(json!({"name": "db", "capacity": 1, "zones": ["1"],
                               "dataDisks": [{"lun": 0, "sizeGb": 128}], "publicIps": true}))
        .env(
            "HEALER_SCALE_SETS",
            &format!(
                "{}[STATEFUL_DISKS=0 STATEFUL_ADDRESS=public-ip MAX_UNHEALTHY=100% REPAIR_TIMEOUT=6 GRACE_PERIOD=0 REPAIR_ACTIONS=reimage,replace]",
                scale_set_id("db")
            ),
        )
        .start()
        .await;
    pass(&app, "first mirror").await;
    let slot = slots(&app).await;
    let pip = slot[0]
        .address
        .clone()
        .expect("the slot records its public IP");
    assert!(pip.contains("/publicIPAddresses/"), "{pip}");
    let old_name = app.key_of("db", 0).await;
    assert_eq!(slot[0].instance, old_name);
    let disk = disk_at(&app.vm("db", 0).await, 0).unwrap();
    app.sync_and_break("db", 0, json!({"beat": "down", "fault": "hard"}))
        .await;
    let (j, _) = drive(&app, Duration::from_secs(120), |j| {
        j.iter().any(|e| e.outcome == "replaced")
            && outcomes(j, EntryKind::Operation).contains(&"succeeded".to_string())
    })
    .await;
    assert!(j.iter().any(|e| e.outcome == "address_moved"), "{j:#?}");
    let fleet = app.fleet("db").await;
    let vms = fleet["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 1, "{fleet}");
    let new_name = vms[0]["name"].as_str().unwrap().to_ascii_lowercase();
    assert_ne!(new_name, old_name);
    assert_eq!(disk_at(&vms[0], 0).as_deref(), Some(disk.as_str()));
    // The public IP is the new VM's NIC's, and only its.
    let network = app.admin(reqwest::Method::GET, "network", None).await;
    let holders: Vec<&str> = network["nics"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, n)| {
            n["public_ip"]
                .as_str()
                .is_some_and(|p| p.eq_ignore_ascii_case(&pip))
        })
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(holders.len(), 1, "{network:#}");
    assert!(holders[0].contains(&new_name), "{holders:?}");
    assert_eq!(slots(&app).await[0].instance, new_name);
    // The NIC's read and write are in the stateful role, and were used.
    let used: std::collections::BTreeSet<&str> = app
        .compute_calls()
        .await
        .iter()
        .filter_map(|c| {
            vmss_healer::compute::required_action(c["method"].as_str()?, c["path"].as_str()?)
        })
        .collect();
    for action in [
        "Microsoft.Network/networkInterfaces/read",
        "Microsoft.Network/networkInterfaces/write",
        "Microsoft.Compute/virtualMachines/attachDetachDataDisks/action",
    ] {
        assert!(used.contains(action), "{action}: {used:?}");
    }
}

/// A stateful policy that cannot work on its set — an address to carry on a Uniform set, whose
/// NICs are its model's — stops the handler at startup with the reason (exit 2), as any other
/// misconfiguration; the same policy on a Flexible set starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_policy_on_a_uniform_set_is_refused_at_startup() {
    let app = stateful_app(&["1"], "", None).await;
    let uniform = format!(
        "{}[STATEFUL_DISKS=0 STATEFUL_ADDRESS=public-ip]",
        scale_set_id("db")
    );
    let (code, stderr) = app.start_handler_expecting_exit(
        &[("HEALER_SCALE_SETS", uniform.as_str())],
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("STATEFUL_ADDRESS=public-ip needs a Flexible scale set"),
        "{stderr}"
    );
    // Without the address, the same set starts (and runs until stopped).
    let disks_only = format!("{}[STATEFUL_DISKS=0]", scale_set_id("db"));
    let (code, stderr) = app.start_handler_expecting_exit(
        &[("HEALER_SCALE_SETS", disks_only.as_str())],
        Duration::from_secs(3),
    );
    assert_eq!(code, None, "it keeps running: {stderr}");
}

/// An instance of a stateful set that no slot names (added by a scale-out, without the slot's
/// disks) has nothing to carry: its replace is a plain one (surge, then delete) — not a stateful
/// replacement that would refuse it and leave the incident to give up — and the slotted VM and its
/// disk are not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_no_slot_names_is_replaced_plainly() {
    let app = spawn_app()
        .scale_set_spec(
            json!({"name": "db", "capacity": 1, "zones": ["1"], "requireMount": false,
                               "dataDisks": [{"lun": 0, "sizeGb": 128}]}),
        )
        .env(
            "HEALER_SCALE_SETS",
            &format!(
                "{}[STATEFUL_DISKS=0 MAX_UNHEALTHY=100% REPAIR_TIMEOUT=6 GRACE_PERIOD=0]",
                scale_set_id("db")
            ),
        )
        .start()
        .await;
    app.set_capacity("db", 2).await;
    app.complete_operations().await;
    pass(&app, "the first mirror").await;
    let slotted: Vec<String> = slots(&app).await.into_iter().map(|s| s.instance).collect();
    assert_eq!(slotted, ["0"], "only the first VM has the slot's disk");
    let disk = disk_at(&app.vm("db", 0).await, 0).expect("db#0's data disk");
    app.break_vm("db", 1, json!({"beat": "down", "fault": "hard"}))
        .await;
    let (j, _) = drive(&app, Duration::from_secs(60), |j| {
        j.iter().any(|e| {
            e.kind == EntryKind::Outcome && e.instance_id == "1" && e.outcome == "replaced"
        })
    })
    .await;
    let stages: Vec<&str> = j
        .iter()
        .filter(|e| e.kind == EntryKind::Repair && e.instance_id == "1" && e.outcome == "requested")
        .filter_map(|e| e.evidence["stage"].as_str())
        .collect();
    assert!(
        stages.contains(&"surge") && !stages.contains(&"carry"),
        "{stages:?}"
    );
    let (ops, _) = app
        .store
        .operations(Some(&TestApp::scale_set("db")))
        .await
        .unwrap();
    assert!(ops.is_empty(), "no stateful replacement: {ops:?}");
    assert_eq!(
        disk_at(&app.vm("db", 0).await, 0),
        Some(disk),
        "the slotted VM keeps its disk"
    );
}
