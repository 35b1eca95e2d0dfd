//! The stateful replacement's decisions, pass by pass, against a small model of Azure that carries
//! its calls out (and fails the one a case names): where the disks are after every pass, and how
//! each ending leaves them.

use super::*;
use crate::heartbeat::{Origin, Status as Beat};
use crate::mirror::fixtures::instance;
use crate::operations::Kind;
use crate::scaleset::ScaleSetId;
use proptest::prelude::*;
use std::collections::BTreeMap;
use time::macros::datetime;

const T0: OffsetDateTime = datetime!(2026-12-02 10:00 UTC);

fn set() -> ScaleSetId {
    ScaleSetId::new("sub", "rg", "db")
}

fn disk_id(name: &str) -> String {
    format!("/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Compute/disks/{name}")
}

#[derive(Debug, Clone)]
struct Vm {
    zone: String,
    disks: BTreeMap<u32, String>,
}

/// Azure as far as a replacement touches it.
struct Azure {
    now: OffsetDateTime,
    zones: Vec<String>,
    vms: BTreeMap<String, Vm>,
    /// Disk id → zone.
    disks: BTreeMap<String, String>,
    snapshots: Vec<String>,
    next: u32,
    slot: Slot,
    /// The call (by the order they are sent) that fails, if any.
    fail_at: Option<usize>,
    sent: usize,
    /// Whether the new VM ever reports UP once it has its disk.
    new_comes_up: bool,
    brake_passes: std::ops::Range<usize>,
    /// Every delete of a VM is refused (a lock an operator added, say).
    refuse_delete: bool,
    /// The address policy (a Flexible set when it is not `None`).
    address: Address,
    /// Public IP by VM (one IP configuration each), and static private addresses by VM.
    public_ips: BTreeMap<String, String>,
    private_ips: BTreeMap<String, String>,
    /// The scale set's model has a data disk at LUN 0: each new VM comes with an empty one there.
    model_disk: bool,
    /// An operator aborts it before this pass, if it still runs.
    abort_before: Option<usize>,
}

const PIP: &str =
    "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Network/publicIPAddresses/db-pip";
const PRIVATE: &str = "10.0.0.4";

impl Azure {
    /// One VM `0` in zone 1 with its disk at LUN 0 (and a scratch disk at LUN 5 that is not the
    /// slot's); new VMs land in the zones in turn.
    fn new(zones: &[&str]) -> Self {
        let d0 = disk_id("db_0-data-0");
        let scratch = disk_id("db_0-scratch");
        let mut vms = BTreeMap::new();
        vms.insert(
            "0".to_string(),
            Vm {
                zone: zones[0].into(),
                disks: BTreeMap::from([(0, d0.clone()), (5, scratch.clone())]),
            },
        );
        Azure {
            now: T0,
            zones: zones.iter().map(|z| z.to_string()).collect(),
            vms,
            disks: BTreeMap::from([(d0.clone(), zones[0].into()), (scratch, zones[0].into())]),
            snapshots: Vec::new(),
            next: 1,
            slot: Slot {
                id: "slot-0".into(),
                instance: "0".into(),
                disks: vec![SlotDisk {
                    lun: 0,
                    id: d0,
                    zone: Some(zones[0].into()),
                }],
                address: None,
                zone: Some(zones[0].into()),
                updated: T0,
            },
            fail_at: None,
            sent: 0,
            new_comes_up: true,
            brake_passes: 0..0,
            refuse_delete: false,
            address: Address::None,
            public_ips: BTreeMap::new(),
            private_ips: BTreeMap::new(),
            model_disk: false,
            abort_before: None,
        }
    }

    /// The same, Flexible, with VM 0 holding the slot's address.
    fn with_address(zones: &[&str], address: Address) -> Self {
        let mut azure = Azure::new(zones);
        azure.address = address;
        match address {
            Address::PublicIp => {
                azure.public_ips.insert("0".into(), PIP.into());
                azure.slot.address = Some(PIP.into());
            }
            Address::PrivateIp => {
                azure.private_ips.insert("0".into(), PRIVATE.into());
                azure.slot.address = Some(PRIVATE.into());
            }
            Address::None => {}
        }
        azure
    }

    fn holder(&self, disk: &str) -> Vec<&str> {
        self.vms
            .iter()
            .filter(|(_, vm)| vm.disks.values().any(|d| d == disk))
            .map(|(id, _)| id.as_str())
            .collect()
    }

    /// Carries out one call: `Err` with ARM's words where Azure refuses or the case fails it.
    fn carry_out(&mut self, act: &Act) -> Result<(), String> {
        let n = self.sent;
        self.sent += 1;
        if self.fail_at == Some(n) {
            return Err(format!("HTTP 409 InjectedFailure: call {n} failed"));
        }
        match act {
            Act::Grow => {
                let id = self.next.to_string();
                let zone = self.zones[self.next as usize % self.zones.len()].clone();
                self.next += 1;
                let mut disks = BTreeMap::new();
                if self.model_disk {
                    let own = disk_id(&format!("db_{id}-model-0"));
                    self.disks.insert(own.clone(), zone.clone());
                    disks.insert(0, own);
                }
                self.vms.insert(id, Vm { zone, disks });
            }
            Act::Detach { instance, disks } => {
                let vm = self.vms.get_mut(instance).ok_or("no such VM")?;
                for d in disks {
                    let before = vm.disks.len();
                    vm.disks.retain(|_, x| x != d);
                    if vm.disks.len() == before {
                        return Err(format!("{d} is not attached to {instance}"));
                    }
                }
            }
            Act::Attach { instance, disks } => {
                for (_, d) in disks {
                    if !self.holder(d).is_empty() {
                        return Err(format!("ConflictingUserInput: {d} is owned"));
                    }
                    let zone = self.disks.get(d).ok_or("no such disk")?;
                    if *zone != self.vms.get(instance).ok_or("no such VM")?.zone {
                        return Err("BadRequest: not in the same zone as the VM".into());
                    }
                }
                let vm = self.vms.get_mut(instance).ok_or("no such VM")?;
                for (lun, d) in disks {
                    if vm.disks.contains_key(lun) {
                        return Err(format!(
                            "InvalidParameter: A disk at LUN {lun} already exists."
                        ));
                    }
                    vm.disks.insert(*lun, d.clone());
                }
            }
            Act::Snapshot { name, disk } => {
                if !self.disks.contains_key(disk) {
                    return Err("NotFound".into());
                }
                self.snapshots.push(name.clone());
            }
            Act::CreateDisk { name, zone, .. } => {
                self.disks
                    .insert(disk_id(name), zone.clone().unwrap_or_default());
            }
            Act::Delete { .. } if self.refuse_delete => {
                return Err("HTTP 409 ScopeLocked: the scope cannot perform delete".into())
            }
            Act::Delete { instance } => {
                self.vms.remove(instance);
                // Its NIC goes with it.
                self.public_ips.remove(instance);
                self.private_ips.remove(instance);
            }
            Act::SetAddress {
                instance,
                kind,
                address,
            } => {
                if !self.vms.contains_key(instance) {
                    return Err("ResourceNotFound: no such VM".into());
                }
                let held = match kind {
                    Address::PrivateIp => &mut self.private_ips,
                    _ => &mut self.public_ips,
                };
                match address {
                    Some(a) => {
                        if held.iter().any(|(vm, x)| x == a && vm != instance) {
                            return Err("HTTP 400 PublicIPAddressInUse: already allocated".into());
                        }
                        held.insert(instance.clone(), a.clone());
                    }
                    None => {
                        held.remove(instance);
                    }
                }
            }
            Act::DeleteDisk { id } => {
                if !self.holder(id).is_empty() {
                    return Err("OperationNotAllowed: attached".into());
                }
                self.disks.remove(id);
            }
            Act::DeleteSnapshot { name } => self.snapshots.retain(|s| s != name),
        }
        Ok(())
    }

    /// The mirror as a pass reads it (just read), with heartbeats: the new VMs say UP once they
    /// have the slot's LUNs.
    fn mirror(&self) -> (Vec<MirroredInstance>, HashMap<String, Heartbeat>) {
        let mut instances = Vec::new();
        let mut heartbeats = HashMap::new();
        for (id, vm) in &self.vms {
            let mut i = instance(id);
            i.zone = Some(vm.zone.clone());
            i.created_at = Some(T0 - Duration::days(1));
            i.data_disks = vm.disks.iter().map(|(l, d)| (*l, d.clone())).collect();
            instances.push(MirroredInstance {
                instance: i,
                synced_at: self.now,
            });
            // An empty disk has nothing to mount.
            let mounted = vm.disks.get(&0).is_some_and(|d| !d.contains("-model-"));
            let status = if id == "0" {
                Beat::Down
            } else if mounted && self.new_comes_up {
                Beat::Up
            } else {
                Beat::Starting
            };
            heartbeats.insert(
                id.clone(),
                Heartbeat {
                    target: set().instance(id),
                    status,
                    event_time: self.now,
                    received_at: self.now,
                    sequence: None,
                    vm_id: None,
                    computer_name: None,
                    detail: None,
                    origin: Origin::Agent,
                    event_id: "e".into(),
                    down_since: None,
                    attested: false,
                    attestation: None,
                },
            );
        }
        (instances, heartbeats)
    }

    fn op(&self, zone_copy: bool) -> Operation {
        let policy = Stateful {
            luns: vec![0],
            address: Address::None,
            zone_copy,
        };
        let policy = Stateful {
            address: self.address,
            ..policy
        };
        let params = Params::new("0", "0-1", &policy, Duration::minutes(5));
        let mut op = Operation::new(
            Kind::Carry,
            set(),
            serde_json::to_value(&params).unwrap(),
            "incident 0-1".into(),
            false,
            T0,
        );
        op.holds = vec!["0".into()];
        op
    }

    /// Runs passes (a send of the call whose turn it is after each decision) until the operation
    /// is over; checks after every pass that no disk is on two VMs and none is lost.
    fn run(&mut self, mut op: Operation) -> (Operation, Vec<Note>, Vec<String>) {
        let mut notes = Vec::new();
        let mut alerts = Vec::new();
        let mut record = ScaleSetRecord::unsynced();
        record.orchestration_mode = Some(
            if self.address == Address::None {
                "Uniform"
            } else {
                "Flexible"
            }
            .into(),
        );
        for pass in 0..400 {
            self.now += Duration::seconds(10);
            if self.abort_before == Some(pass) && matches!(op.state, State::Running | State::Paused)
            {
                op = op
                    .command(crate::operations::Command::Abort, self.now)
                    .unwrap();
            }
            record.synced_at = Some(self.now);
            let (instances, heartbeats) = self.mirror();
            let verdicts: HashMap<&str, Verdict> = heartbeats
                .iter()
                .map(|(id, hb)| {
                    let v = match hb.status {
                        Beat::Up => Verdict::Healthy,
                        Beat::Starting => Verdict::Starting,
                        _ => Verdict::Unhealthy(crate::verdict::Reason::ReportedDown { since: T0 }),
                    };
                    (id.as_str(), v)
                })
                .collect();
            let statuses = HashMap::new();
            let slot = self.slot.clone();
            let view = View {
                record: Some(&record),
                instances: &instances,
                heartbeats: &heartbeats,
                verdicts: &verdicts,
                slot: Some(&slot),
                brake: self
                    .brake_passes
                    .contains(&pass)
                    .then(|| "a pipeline fault".to_string()),
                statuses: &statuses,
                settle: Duration::seconds(180),
                dry_run: false,
            };
            let carried = advance(&op, &view, self.now);
            if let Some(s) = carried.slot {
                self.slot = s;
            }
            notes.extend(carried.advance.notes);
            alerts.extend(carried.advance.alert);
            op = carried.advance.op;
            let mut memo = Memo::read(&op).unwrap();
            if let Some(i) = crate::operations::step::sendable(&memo.calls) {
                let act = memo.calls[i].act.clone();
                memo.calls[i].state = match self.carry_out(&act) {
                    Ok(()) => CallState::Ended { at: self.now },
                    Err(error) => CallState::Failed { error },
                };
                op.memo = serde_json::to_value(&memo).unwrap();
            }
            self.check(&op, &format!("pass {pass}"));
            if op.state.is_over() {
                return (op, notes, alerts);
            }
        }
        panic!("not over after 400 passes: {op:#?}");
    }

    fn check(&self, op: &Operation, when: &str) {
        let memo = op.memo.to_string();
        for disk in self.disks.keys() {
            let holders = self.holder(disk);
            assert!(holders.len() <= 1, "{when}: {disk} on {holders:?}");
            let named = self.slot.disk_ids().any(|d| d == disk) || memo.contains(disk.as_str());
            let scratch = disk.ends_with("scratch");
            assert!(
                !holders.is_empty() || named || scratch,
                "{when}: {disk} is on no VM and named by nothing"
            );
        }
    }
}

fn outcomes(notes: &[Note]) -> Vec<&'static str> {
    notes.iter().map(|n| n.outcome).collect()
}

#[test]
fn the_disk_goes_to_the_new_vm_before_the_broken_one_goes() {
    let mut azure = Azure::new(&["1"]);
    let (op, notes, alerts) = azure.run(azure.op(true));
    assert_eq!(op.state, State::Succeeded, "{notes:#?}");
    assert!(alerts.is_empty());
    assert_eq!(
        outcomes(&notes),
        vec![
            "started",
            "new_instance",
            "detached",
            "attached",
            "healthy",
            "deleted",
            "succeeded"
        ]
    );
    assert!(!azure.vms.contains_key("0"), "the broken VM is gone");
    let new = &azure.vms["1"];
    assert_eq!(
        new.disks.get(&0),
        Some(&disk_id("db_0-data-0")),
        "same disk, same LUN"
    );
    assert_eq!(azure.slot.instance, "1");
    assert!(op.holds.is_empty());
    // The scratch disk was not the slot's: it stays where the broken VM left it.
    assert!(azure.disks.contains_key(&disk_id("db_0-scratch")));
}

#[test]
fn a_new_vm_with_its_own_disk_at_the_lun_has_it_taken_off_and_deleted_after() {
    let mut azure = Azure::new(&["1"]);
    azure.model_disk = true;
    let (op, notes, alerts) = azure.run(azure.op(true));
    assert_eq!(op.state, State::Succeeded, "{notes:#?}");
    assert!(alerts.is_empty());
    let o = outcomes(&notes);
    let at = |s: &str| o.iter().position(|x| *x == s).unwrap_or(usize::MAX);
    assert!(
        at("detached") < at("clearing") && at("clearing") < at("cleared"),
        "{o:?}"
    );
    assert!(at("cleared") < at("attached"), "{o:?}");
    assert_eq!(
        azure.vms["1"].disks.get(&0),
        Some(&disk_id("db_0-data-0")),
        "the slot's disk at its LUN"
    );
    assert!(
        !azure.disks.contains_key(&disk_id("db_1-model-0")),
        "the new VM's empty disk went once it was done: {:?}",
        azure.disks
    );
    assert!(azure.disks.contains_key(&disk_id("db_0-data-0")));
}

#[test]
fn an_abort_while_the_new_vm_waits_to_come_up_puts_everything_back() {
    let mut azure = Azure::new(&["1"]);
    azure.new_comes_up = false;
    azure.model_disk = true;
    azure.abort_before = Some(12);
    let (op, notes, alerts) = azure.run(azure.op(true));
    assert_eq!(op.state, State::Aborted, "{notes:#?}");
    assert!(alerts.is_empty(), "the operator's own abort: {alerts:?}");
    let o = outcomes(&notes);
    assert!(
        o.contains(&"attached") && o.contains(&"rolled_back"),
        "{o:?}"
    );
    assert_eq!(o.last(), Some(&"aborted"), "{o:?}");
    assert_eq!(
        azure.vms.keys().collect::<Vec<_>>(),
        ["0"],
        "the new VM is gone"
    );
    assert_eq!(azure.vms["0"].disks.get(&0), Some(&disk_id("db_0-data-0")));
    assert_eq!(azure.slot.instance, "0");
    assert!(op.holds.is_empty());
    assert!(
        !azure.disks.keys().any(|d| d.contains("-model-")),
        "{:?}",
        azure.disks
    );
}

#[test]
fn an_abort_rolls_back_only_what_is_under_way_and_undoable() {
    use crate::operations::Command;
    let azure = Azure::new(&["1"]);
    let at = |state: State, stage: Stage, failed: bool, dry_run: bool| {
        let mut op = azure.op(true);
        op.state = state;
        op.dry_run = dry_run;
        let memo = Memo {
            stage,
            failed: failed.then(|| "a step failed".to_string()),
            ..Memo::default()
        };
        op.memo = serde_json::to_value(&memo).unwrap();
        op.command(Command::Abort, T0)
    };
    #[rustfmt::skip]
    let cases = [
        (State::Pending, Stage::Preflight, false, false, State::Aborted),
        (State::Running, Stage::Surge, false, false, State::RollingBack),
        (State::Running, Stage::Attach, false, false, State::RollingBack),
        (State::Paused, Stage::Healthy, false, false, State::RollingBack),
        // The new VM serves: nothing is undone from here, as after a failure.
        (State::Running, Stage::Delete, false, false, State::Aborted),
        (State::Running, Stage::Cleanup, false, false, State::Aborted),
        // Aborting a roll-back stops it where it is.
        (State::RollingBack, Stage::Reattach, true, false, State::Aborted),
        (State::Paused, Stage::Unattach, true, false, State::Aborted),
        // A dry run did nothing to undo.
        (State::Running, Stage::Attach, false, true, State::Aborted),
    ];
    for (state, stage, failed, dry, want) in cases {
        assert_eq!(
            at(state, stage, failed, dry).map(|o| o.state),
            Ok(want),
            "{state:?} at {stage:?} (failed {failed}, dry run {dry})"
        );
    }
    // The abort is in the memo: a pause and a resume before any pass do not lose it.
    let aborted = at(State::Running, Stage::Attach, false, false).unwrap();
    let resumed = aborted
        .command(Command::Pause, T0)
        .and_then(|o| o.command(Command::Resume, T0))
        .unwrap();
    assert_eq!(resumed.state, State::Running);
    assert!(Memo::read(&resumed).unwrap().aborted);
}

#[test]
fn another_zone_copies_the_disk_by_snapshot_and_drops_the_original_after() {
    let mut azure = Azure::new(&["1", "2"]);
    let (op, notes, _) = azure.run(azure.op(true));
    assert_eq!(op.state, State::Succeeded, "{notes:#?}");
    let o = outcomes(&notes);
    assert!(o.contains(&"zone_copy") && o.contains(&"copied"), "{o:?}");
    let carried = azure.vms["1"].disks[&0].clone();
    assert_ne!(carried, disk_id("db_0-data-0"));
    assert_eq!(azure.disks[&carried], "2");
    assert!(
        !azure.disks.contains_key(&disk_id("db_0-data-0")),
        "the original went"
    );
    assert!(azure.snapshots.is_empty(), "and the snapshot");
    assert_eq!(azure.slot.disks[0].id, carried);
    assert_eq!(azure.slot.zone.as_deref(), Some("2"));
}

#[test]
fn a_forbidden_copy_is_refused_before_anything_is_detached() {
    let mut azure = Azure::new(&["1", "2"]);
    let (op, notes, alerts) = azure.run(azure.op(false));
    assert_eq!(op.state, State::Failed);
    assert!(op.last_error.unwrap().contains("STATEFUL_ZONE_COPY=false"));
    assert!(!outcomes(&notes).contains(&"detached"), "{notes:#?}");
    assert_eq!(azure.vms["0"].disks[&0], disk_id("db_0-data-0"));
    assert_eq!(azure.vms.len(), 1, "the new VM was removed");
    assert_eq!(alerts.len(), 1);
}

#[test]
fn a_new_vm_that_never_comes_up_gives_the_disk_back() {
    let mut azure = Azure::new(&["1"]);
    azure.new_comes_up = false;
    let (op, notes, alerts) = azure.run(azure.op(true));
    assert_eq!(op.state, State::Failed);
    assert!(
        op.last_error
            .as_deref()
            .unwrap_or("")
            .contains("REQUIRE_MOUNT met"),
        "{op:?}"
    );
    assert!(outcomes(&notes).contains(&"rolled_back"), "{notes:#?}");
    assert_eq!(azure.vms["0"].disks[&0], disk_id("db_0-data-0"));
    assert_eq!(azure.vms.len(), 1);
    assert_eq!(
        azure.slot.instance, "0",
        "the slot names the broken VM again"
    );
    assert!(alerts[0].contains("its data stays with it"), "{alerts:?}");
}

#[test]
fn a_broken_vm_that_will_not_go_is_left_to_the_operator_with_the_data_on_the_new_one() {
    let mut azure = Azure::new(&["1"]);
    azure.refuse_delete = true;
    let (op, notes, alerts) = azure.run(azure.op(true));
    assert_eq!(op.state, State::Failed);
    let o = outcomes(&notes);
    assert_eq!(o.iter().filter(|x| **x == "retry").count(), 3, "{o:?}");
    assert!(
        !o.contains(&"rolled_back"),
        "nothing is undone once the new VM serves: {o:?}"
    );
    assert_eq!(azure.vms["1"].disks[&0], disk_id("db_0-data-0"));
    assert_eq!(azure.slot.instance, "1");
    assert!(alerts[0].contains("delete it by hand"), "{alerts:?}");
}

#[test]
fn a_disk_on_another_vm_is_never_taken() {
    let mut azure = Azure::new(&["1"]);
    let d0 = disk_id("db_0-data-0");
    azure.vms.get_mut("0").unwrap().disks.remove(&0);
    azure.vms.insert(
        "7".into(),
        Vm {
            zone: "1".into(),
            disks: BTreeMap::from([(0, d0)]),
        },
    );
    let (op, _, _) = azure.run(azure.op(true));
    assert_eq!(op.state, State::Failed);
    assert!(op.last_error.unwrap().contains("attached to instance 7"));
    assert_eq!(azure.sent, 0, "nothing was called");
}

#[test]
fn a_public_ip_follows_the_slot_before_the_new_vm_must_come_up() {
    let mut azure = Azure::with_address(&["1"], Address::PublicIp);
    let (op, notes, _) = azure.run(azure.op(true));
    assert_eq!(op.state, State::Succeeded, "{notes:#?}");
    let o = outcomes(&notes);
    let at = |x: &str| o.iter().position(|y| *y == x).unwrap();
    assert!(
        at("attached") < at("address_moved") && at("address_moved") < at("healthy"),
        "{o:?}"
    );
    assert_eq!(azure.public_ips.get("1").map(String::as_str), Some(PIP));
    assert_eq!(azure.public_ips.len(), 1);
}

#[test]
fn a_private_address_is_taken_once_the_broken_vms_nic_is_gone() {
    let mut azure = Azure::with_address(&["1"], Address::PrivateIp);
    let (op, notes, _) = azure.run(azure.op(true));
    assert_eq!(op.state, State::Succeeded, "{notes:#?}");
    let o = outcomes(&notes);
    let at = |x: &str| o.iter().position(|y| *y == x).unwrap();
    assert!(at("deleted") < at("address_moved"), "{o:?}");
    assert_eq!(
        azure.private_ips.get("1").map(String::as_str),
        Some(PRIVATE)
    );
}

#[test]
fn a_private_address_taken_meanwhile_leaves_the_replacement_standing_with_an_alert() {
    let mut azure = Azure::with_address(&["1"], Address::PrivateIp);
    // Another VM took the address once the broken VM's NIC let it go.
    azure.private_ips.insert("9".into(), PRIVATE.into());
    let (op, notes, alerts) = azure.run(azure.op(true));
    assert_eq!(op.state, State::Succeeded, "{notes:#?}");
    assert!(outcomes(&notes).contains(&"address_failed"), "{notes:#?}");
    assert!(alerts[0].contains("set it by hand"), "{alerts:?}");
    assert_eq!(
        azure.vms["1"].disks[&0],
        disk_id("db_0-data-0"),
        "the data stays"
    );
}

#[test]
fn a_new_vm_that_never_comes_up_gives_the_public_ip_back_too() {
    let mut azure = Azure::with_address(&["1"], Address::PublicIp);
    azure.new_comes_up = false;
    let (op, notes, _) = azure.run(azure.op(true));
    assert_eq!(op.state, State::Failed, "{notes:#?}");
    assert_eq!(azure.public_ips.get("0").map(String::as_str), Some(PIP));
    assert_eq!(azure.public_ips.len(), 1, "{:?}", azure.public_ips);
    assert_eq!(azure.vms["0"].disks[&0], disk_id("db_0-data-0"));
}

#[test]
fn an_address_on_a_uniform_set_is_refused() {
    let mut azure = Azure::with_address(&["1"], Address::PublicIp);
    let op = azure.op(true);
    azure.address = Address::None; // the record says Uniform
    let (op, _, _) = azure.run(op);
    assert!(op
        .last_error
        .unwrap()
        .contains("needs a Flexible scale set"));
    assert_eq!(azure.sent, 0);
}

#[test]
fn a_brake_holds_every_step() {
    let mut azure = Azure::new(&["1"]);
    azure.brake_passes = 2..6;
    let (op, notes, _) = azure.run(azure.op(true));
    assert_eq!(op.state, State::Succeeded);
    assert_eq!(
        outcomes(&notes).iter().filter(|o| **o == "held").count(),
        1,
        "said once"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Whichever call fails, in one zone or across two, the disks end on exactly one VM: the new
    /// one after a success, the broken one after a failure; no copy, snapshot or VM is left over
    /// on a failure, and the slot names where the disk is.
    #[test]
    fn wherever_it_fails_the_disk_is_on_one_vm(fail_at in proptest::option::of(0usize..14), cross in any::<bool>(), comes_up in any::<bool>(), model in any::<bool>(), abort_before in proptest::option::of(0usize..40), address in prop_oneof![Just(Address::None), Just(Address::PublicIp), Just(Address::PrivateIp)]) {
        let zones: &[&str] = if cross { &["1", "2"] } else { &["1"] };
        let mut azure = Azure::with_address(zones, address);
        azure.fail_at = fail_at;
        azure.new_comes_up = comes_up;
        azure.model_disk = model;
        azure.abort_before = abort_before;
        let (op, notes, alerts) = azure.run(azure.op(true));
        let at_lun0: Vec<(&String, &String)> = azure
            .vms
            .iter()
            .filter_map(|(id, vm)| vm.disks.get(&0).filter(|d| !d.contains("-model-")).map(|d| (id, d)))
            .collect();
        prop_assert_eq!(at_lun0.len(), 1, "one VM has the slot's disk: {:?} {:#?}", azure.vms, notes);
        let (holder, disk) = at_lun0[0];
        prop_assert_eq!(&azure.slot.instance, holder);
        prop_assert_eq!(&azure.slot.disks[0].id, disk);
        let rolled_back = outcomes(&notes).contains(&"rolled_back");
        match op.state {
            State::Aborted if rolled_back => {
                // Undone: the original on the broken VM, no alert for the operator's own abort.
                prop_assert_eq!(disk, &disk_id("db_0-data-0"));
                prop_assert_eq!(holder.as_str(), "0");
                prop_assert!(azure.snapshots.is_empty());
                prop_assert!(alerts.is_empty(), "{:?}", alerts);
            }
            State::Aborted => {
                // Aborted where nothing was to undo (or the new VM already served): the disk is
                // on one VM (above) and the slot names it.
                prop_assert!(alerts.is_empty(), "{:?}", alerts);
            }
            State::Succeeded => {
                prop_assert!(!azure.vms.contains_key("0"));
                prop_assert_eq!(azure.vms.len(), 1);
                // The new VM's own disk at the LUN gone (unless its clean-up failed, said so).
                let left = azure.disks.keys().any(|d| d.contains("-model-"));
                prop_assert!(!left || outcomes(&notes).contains(&"cleanup_failed"), "{:?}", azure.disks);
            }
            _ => {
                prop_assert!(alerts.len() == 1, "{:?}", alerts);
                let error = op.last_error.clone().unwrap_or_default();
                if error.contains("could not be deleted") {
                    // The broken VM would not go: the data stays on the new one, said so.
                    prop_assert_eq!(holder.as_str(), "1");
                    prop_assert!(alerts[0].contains("delete it by hand"), "{:?}", alerts);
                } else if !error.contains("rolling back") {
                    // Rolled back whole: the original on the broken VM, nothing left over.
                    prop_assert_eq!(disk, &disk_id("db_0-data-0"));
                    prop_assert!(azure.snapshots.is_empty());
                    prop_assert_eq!(azure.disks.len(), 2, "{:?}", azure.disks);
                    prop_assert!(azure.vms.contains_key("0") && azure.vms.len() == 1, "{:?}", azure.vms);
                } else {
                    // A roll-back step itself failed: the alert names the call that did, and
                    // the disk is still on one VM (above).
                    prop_assert!(alerts[0].contains("roll back"), "{:?}", alerts);
                }
            }
        }
        prop_assert!(op.holds.is_empty());
        // The public IP is on one VM: the one with the data, unless a roll-back step failed.
        if address == Address::PublicIp && !op.last_error.as_deref().unwrap_or("").contains("rolling back") {
            let on: Vec<&String> = azure.public_ips.keys().collect();
            prop_assert_eq!(on, vec![holder], "{:?}", azure.public_ips);
        }
    }
}
