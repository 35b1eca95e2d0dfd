//! The stateful replacement (issue 18): the lifecycle hook Azure lacks. When a stateful set's
//! instance must be replaced, its slot's data disks go with it to the new VM — the same disks at
//! the same LUNs — before the broken VM is deleted, as the EC2 Autoheal pattern's launch hook
//! carries a volume to the new instance.
//!
//! 1. Preflight: the slot is known and its disks are on the broken instance (or on none): a disk
//!    on another VM is never taken. The policy must work on this set.
//! 2. Surge: capacity + 1 (`If-Match` on a fresh read); the new instance is the one the mirror
//!    shows that was not there before, once provisioned.
//! 3. Detach the slot's disks from the broken instance.
//! 4. Zones: a disk in another zone than the new VM cannot be attached there (400 "not in the same
//!    zone as the VM"), nor copied there directly: it is snapshotted and the snapshot copied into
//!    the new zone — or, when the policy forbids copying, the replacement is refused.
//! 5. Attach them to the new instance at their LUNs — its own disks there (a model's data disks
//!    come empty with every new VM) taken off it first; the slot now names it. The agent reports
//!    STARTING until its disk is mounted (`HEALER_REQUIRE_MOUNT`), so the new VM is counted
//!    healthy only with its data.
//! 6. Healthy by our verdict (UP sent after the attach), then the broken instance is deleted, and
//!    what a copy left behind (the old disk, the snapshot) goes, and the new VM's own disks.
//!
//! Any failure before the broken instance is deleted rolls back: the disks detached from the new
//! VM and attached to the broken one again (originals: a copy is discarded), the new VM deleted,
//! an alert; the incident that asked for the replacement then escalates or gives up. A disk is at
//! every moment attached to one VM or named by the slot and this operation, never lost.
//!
//! Pure: [`advance`] decides; `passes::operate` sends its calls one at a time and writes the slot.

#[cfg(test)]
mod tests;

use super::step::{self, Advance, CallState, Note, Progress, Status};
use super::{Operation, State};
use crate::heartbeat::Heartbeat;
use crate::mirror::{MirroredInstance, ScaleSetRecord};
use crate::slot::{Address, Slot, SlotDisk, Stateful};
use crate::verdict::Verdict;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use time::{Duration, OffsetDateTime};

/// The parameters, as the operation's row keeps them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Params {
    /// The broken instance.
    pub instance: String,
    /// The incident that asked for it.
    pub incident: String,
    pub luns: Vec<u32>,
    #[serde(default)]
    pub address: Address,
    pub zone_copy: bool,
    /// How long each step may take, the new VM coming up healthy included.
    pub timeout_s: i64,
    /// How long a copy into another zone may take.
    pub copy_timeout_s: i64,
}

impl Params {
    pub fn new(instance: &str, incident: &str, policy: &Stateful, timeout: Duration) -> Self {
        Params {
            instance: instance.to_string(),
            incident: incident.to_string(),
            luns: policy.luns.clone(),
            address: policy.address,
            zone_copy: policy.zone_copy,
            timeout_s: timeout.whole_seconds(),
            // A copy reads the whole disk: hours for a large one.
            copy_timeout_s: (timeout * 8i32).whole_seconds().max(3 * 3600),
        }
    }

    pub fn from_stored(v: &serde_json::Value) -> Result<Params, String> {
        serde_json::from_value(v.clone())
            .map_err(|e| format!("stored stateful replacement parameters are unreadable: {e}: {v}"))
    }
}

/// What a call does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "act", rename_all = "snake_case")]
pub enum Act {
    /// Capacity + 1, with If-Match on a fresh read.
    Grow,
    Detach {
        instance: String,
        disks: Vec<String>,
    },
    Snapshot {
        name: String,
        disk: String,
    },
    /// A disk in `zone` copied from a snapshot.
    CreateDisk {
        name: String,
        zone: Option<String>,
        snapshot: String,
    },
    /// (LUN, disk id) each.
    Attach {
        instance: String,
        disks: Vec<(u32, String)>,
    },
    Delete {
        instance: String,
    },
    DeleteDisk {
        id: String,
    },
    DeleteSnapshot {
        name: String,
    },
    /// A Flexible VM's address on its NIC: the public IP (or none), or the static private address
    /// (none: back to dynamic).
    SetAddress {
        instance: String,
        kind: Address,
        address: Option<String>,
    },
}

impl Act {
    pub fn describe(&self) -> String {
        match self {
            Act::Grow => "capacity + 1".into(),
            Act::Detach { instance, disks } => {
                format!("detach {} from {instance}", names(disks.iter()))
            }
            Act::Snapshot { name, .. } => format!("snapshot {name}"),
            Act::CreateDisk { name, zone, .. } => format!(
                "disk {name} in zone {}",
                zone.as_deref().unwrap_or("(none)")
            ),
            Act::Attach { instance, disks } => format!(
                "attach {} to {instance}",
                disks
                    .iter()
                    .map(|(lun, d)| format!("{} at LUN {lun}", name_of(d)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Act::Delete { instance } => format!("delete {instance}"),
            Act::DeleteDisk { id } => format!("delete disk {}", name_of(id)),
            Act::DeleteSnapshot { name } => format!("delete snapshot {name}"),
            Act::SetAddress {
                instance,
                kind,
                address: Some(a),
            } => format!("{} {} to {instance}", kind.as_str(), name_of(a)),
            Act::SetAddress { instance, kind, .. } => format!("{} off {instance}", kind.as_str()),
        }
    }

    /// Whether it writes the scale set (its capacity): the healer's writes wait for it.
    fn write(&self) -> Option<crate::incident::Call> {
        match self {
            Act::Grow => Some(crate::incident::Call::Grow),
            Act::Delete { .. } => Some(crate::incident::Call::Delete),
            _ => None,
        }
    }
}

/// A disk's name: the last segment of its id.
pub fn name_of(id: &str) -> &str {
    id.rsplit('/').next().unwrap_or(id)
}

fn names<'a>(ids: impl Iterator<Item = &'a String>) -> String {
    ids.map(|d| name_of(d)).collect::<Vec<_>>().join(", ")
}

pub type Call = super::step::Call<Act>;

/// How many refused undo calls a roll-back sends again before it stops for the operator.
const RETRIES: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    #[default]
    Preflight,
    Surge,
    Arrive,
    Detach,
    Snapshot,
    Copy,
    /// The new instance's own disks at the slot's LUNs (its model's, empty) taken off it.
    Clear,
    Attach,
    /// A public IP moved to the new VM (before it must come up: an application may need it).
    Address,
    Healthy,
    Delete,
    /// A static private address taken by the new VM (only once the broken VM's NIC is gone).
    LateAddress,
    Cleanup,
    /// Rolling back: the address back on the broken VM…
    Unaddress,
    /// …the carried disks off the new VM…
    Unattach,
    /// …the originals back on the broken one…
    Reattach,
    /// …the new VM deleted…
    Remove,
    /// …and copies discarded.
    Discard,
}

impl Stage {
    fn label(self) -> &'static str {
        match self {
            Stage::Preflight => "preflight",
            Stage::Surge => "surge",
            Stage::Arrive => "new instance",
            Stage::Detach => "detach",
            Stage::Snapshot => "snapshot",
            Stage::Copy => "copy into the new zone",
            Stage::Clear => "clear the slot's LUNs on the new instance",
            Stage::Attach => "attach",
            Stage::Address => "move the address",
            Stage::Healthy => "healthy with its data",
            Stage::Delete => "delete the broken instance",
            Stage::LateAddress => "take the private address",
            Stage::Cleanup => "clean up",
            Stage::Unaddress => "roll back: the address back on the broken instance",
            Stage::Unattach => "roll back: detach from the new instance",
            Stage::Reattach => "roll back: attach to the broken instance",
            Stage::Remove => "roll back: delete the new instance",
            Stage::Discard => "roll back: discard copies",
        }
    }
}

/// A disk copied into the new VM's zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Copied {
    pub lun: u32,
    pub from: String,
    pub snapshot: String,
    /// The copy's id.
    pub disk: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Memo {
    #[serde(default)]
    pub stage: Stage,
    /// The slot being carried, as it was at the start (its original disks).
    #[serde(default)]
    pub slot: Option<Slot>,
    /// Instances there before the surge: the new one is not among them.
    #[serde(default)]
    pub before: Vec<String>,
    #[serde(default)]
    pub new_instance: Option<String>,
    #[serde(default)]
    pub new_zone: Option<String>,
    #[serde(default)]
    pub copies: Vec<Copied>,
    /// The new instance's own disks at the slot's LUNs: its scale set's model gives each new VM
    /// an empty disk there, and a LUN takes one disk. Taken off it before the attach, deleted
    /// once the replacement is done (or rolled back).
    #[serde(default)]
    pub displaced: Vec<String>,
    /// Snapshots a roll-back found taken (or perhaps taken) before their copies were made.
    #[serde(default)]
    pub snapshots: Vec<String>,
    #[serde(default)]
    pub calls: Vec<Call>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub deadline: Option<OffsetDateTime>,
    /// When the last call ended: what the mirror shows after it shows its effect.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub ended_at: Option<OffsetDateTime>,
    /// The originals are (or may be) off the broken instance.
    #[serde(default)]
    pub detached: bool,
    /// The carried disks are (or may be) on the new instance.
    #[serde(default)]
    pub attached: bool,
    #[serde(default)]
    pub grew: bool,
    /// The address is (or may be) on the new instance.
    #[serde(default)]
    pub address_moved: bool,
    /// Why it is rolling back.
    #[serde(default)]
    pub failed: Option<String>,
    /// Refused undo calls sent again so far.
    #[serde(default)]
    pub retries: u32,
    /// An operator aborted it: rolled back, it ends `aborted`, with no alert.
    #[serde(default)]
    pub aborted: bool,
}

impl Memo {
    pub fn read(op: &Operation) -> Result<Memo, String> {
        if op.memo.is_null() {
            return Ok(Memo::default());
        }
        serde_json::from_value(op.memo.clone())
            .map_err(|e| format!("the stateful replacement's stored progress is unreadable: {e}"))
    }

    /// The disks the new instance gets, by LUN: copies where made, else the originals.
    pub fn carried(&self) -> Vec<(u32, String)> {
        self.slot
            .iter()
            .flat_map(|s| s.disks.iter())
            .map(|d| {
                let id = self
                    .copies
                    .iter()
                    .find(|c| c.lun == d.lun)
                    .map(|c| c.disk.clone())
                    .unwrap_or_else(|| d.id.clone());
                (d.lun, id)
            })
            .collect()
    }

    fn originals(&self) -> Vec<SlotDisk> {
        self.slot
            .as_ref()
            .map(|s| s.disks.clone())
            .unwrap_or_default()
    }
}

/// An operator's abort, when it rolls the replacement back: it started, is not already rolling
/// back, and the new instance does not serve yet (from then on nothing is undone, as after a
/// failure). The memo that says so, which the next pass acts on.
pub fn abort(op: &Operation) -> Option<serde_json::Value> {
    step::abort(op, Memo::read(op), |m| {
        let undoable = m.failed.is_none()
            && matches!(
                m.stage,
                Stage::Surge
                    | Stage::Arrive
                    | Stage::Detach
                    | Stage::Snapshot
                    | Stage::Copy
                    | Stage::Clear
                    | Stage::Attach
                    | Stage::Address
                    | Stage::Healthy
            );
        m.aborted = undoable;
        undoable
    })
}

/// The capacity write or delete it has sent and not yet seen end: the healer's writes wait.
pub fn write_in_flight(op: &Operation) -> Option<crate::incident::Call> {
    if op.state.is_over() || op.dry_run {
        return None;
    }
    let memo = Memo::read(op).ok()?;
    memo.calls.iter().find_map(|c| match &c.state {
        CallState::Sending { .. } | CallState::Accepted { .. } => c.act.write(),
        _ => None,
    })
}

/// How a replacement ended, for the incident that asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The broken instance is deleted (or being deleted) and its slot lives on the new one.
    Replaced,
    /// It did not work (rolled back, or stopped): the error.
    Failed(String),
}

/// What a carry operation that is over says of the instance it replaced: `(instance, outcome)`.
pub fn outcome(op: &Operation) -> Option<(String, Outcome)> {
    if op.kind != super::Kind::Carry || !op.state.is_over() {
        return None;
    }
    let params = Params::from_stored(&op.params).ok()?;
    let outcome = match op.state {
        State::Succeeded => Outcome::Replaced,
        _ => Outcome::Failed(
            op.last_error
                .clone()
                .unwrap_or_else(|| format!("the stateful replacement {}", op.state.as_str())),
        ),
    };
    Some((params.instance, outcome))
}

/// What one pass sees.
pub struct View<'a> {
    pub record: Option<&'a ScaleSetRecord>,
    pub instances: &'a [MirroredInstance],
    pub heartbeats: &'a HashMap<String, Heartbeat>,
    pub verdicts: &'a HashMap<&'a str, Verdict>,
    /// The broken instance's slot, as stored.
    pub slot: Option<&'a Slot>,
    pub brake: Option<String>,
    pub statuses: &'a HashMap<String, Status>,
    pub settle: Duration,
    pub dry_run: bool,
}

impl View<'_> {
    fn present(&self, id: &str) -> Option<&MirroredInstance> {
        self.instances.iter().find(|m| m.instance.instance_id == id)
    }

    /// The instance that has this disk attached, per the mirror.
    fn holder(&self, disk: &str) -> Option<&str> {
        self.instances
            .iter()
            .find(|m| {
                m.instance
                    .data_disks
                    .iter()
                    .any(|(_, d)| d.eq_ignore_ascii_case(disk))
            })
            .map(|m| m.instance.instance_id.as_str())
    }

    fn synced_after(&self, t: Option<OffsetDateTime>) -> bool {
        match (self.record.and_then(|r| r.synced_at), t) {
            (Some(s), Some(t)) => s > t,
            (_, None) => true,
            _ => false,
        }
    }
}

/// The operation after one pass, and the slot to write (over the version read) if it moved.
#[derive(Debug, Clone, PartialEq)]
pub struct Carry {
    pub advance: Advance,
    pub slot: Option<Slot>,
}

pub fn advance(op: &Operation, view: &View, now: OffsetDateTime) -> Carry {
    let mut c = Engine {
        view,
        now,
        out: Advance::of(op),
        memo: Memo::default(),
        params: None,
    };
    if !matches!(
        op.state,
        State::Pending | State::Running | State::RollingBack
    ) {
        return Carry {
            advance: c.out,
            slot: None,
        };
    }
    match (Params::from_stored(&op.params), Memo::read(op)) {
        (Ok(params), Ok(m)) => {
            c.params = Some(params);
            c.memo = m;
            c.run();
        }
        (Err(e), _) | (_, Err(e)) => c.end(State::Failed, e),
    }
    let slot = c.desired_slot();
    let out = c.out.finish(op, &c.memo, now);
    Carry { advance: out, slot }
}

struct Engine<'a, 'v> {
    view: &'a View<'v>,
    now: OffsetDateTime,
    out: Advance,
    memo: Memo,
    params: Option<Params>,
}

impl Engine<'_, '_> {
    fn params(&self) -> &Params {
        self.params
            .as_ref()
            .unwrap_or_else(|| unreachable!("params are read before the replacement runs"))
    }

    fn dry(&self) -> bool {
        self.view.dry_run || self.out.op.dry_run
    }

    fn note(&mut self, instance: &str, outcome: &'static str, reason: String) {
        self.out.notes.push(Note {
            instance: instance.to_string(),
            outcome,
            reason,
            evidence: serde_json::Value::Null,
        });
    }

    fn old(&self) -> String {
        self.params().instance.clone()
    }

    fn new_vm(&self) -> String {
        self.memo.new_instance.clone().unwrap_or_default()
    }

    fn wait(&mut self, what: String) {
        self.out.op.waiting = Some(what);
        self.out.op.wait_until = self.memo.deadline;
    }

    fn step(&mut self, stage: Stage, acts: Vec<Act>, deadline: Duration) {
        self.memo.stage = stage;
        self.memo.calls = acts.into_iter().map(Call::new).collect();
        self.memo.deadline = Some(self.now + deadline);
        self.out.op.step = stage.label().into();
        self.out.op.done = (stage as u32).min(Stage::Cleanup as u32);
        self.out.resync = true;
    }

    fn timeout(&self) -> Duration {
        Duration::seconds(self.params().timeout_s)
    }

    fn run(&mut self) {
        if let Some(brake) = self.view.brake.as_deref() {
            let (what, news) = step::hold(
                &self.out.op,
                &mut self.memo.deadline,
                brake,
                self.now,
                self.view.settle,
            );
            if news {
                let old = self.old();
                self.note(&old, "held", format!("{what}; no step until it releases"));
            }
            return self.wait(what);
        }
        if self.out.op.state == State::Pending {
            return self.preflight();
        }
        self.track();
        let what = self.memo.stage.label();
        match step::progress(
            &self.memo.calls,
            self.memo.deadline,
            self.now,
            Act::describe,
        ) {
            Progress::Failed(i, error) => {
                let act = self.memo.calls[i].act.describe();
                // Undoing is what keeps the data with one VM: a refused undo is tried again (a
                // busy VM, a detach not yet settled) before the operator is called.
                let retried = self.memo.failed.is_some() || self.memo.stage == Stage::Delete;
                if retried && self.memo.retries < RETRIES {
                    self.memo.retries += 1;
                    self.memo.calls[i].state = CallState::Unsent;
                    let old = self.old();
                    self.note(
                        &old,
                        "retry",
                        format!(
                            "{act}: {error}; tried again ({} of {RETRIES})",
                            self.memo.retries
                        ),
                    );
                    return self.wait(act);
                }
                return self.fail(format!("{what} ({act}): {error}"));
            }
            Progress::Late => return self.fail(format!("{what} did not end in time")),
            Progress::Waiting(on) => return self.wait(on),
            Progress::Ended => {}
        }
        if let Some(t) = self.memo.calls.iter().filter_map(Call::ended_at).max() {
            self.memo.ended_at = Some(self.memo.ended_at.map_or(t, |e| e.max(t)));
        }
        if self.memo.aborted && self.memo.failed.is_none() {
            // An operator's abort: the call in flight ended first; now everything is undone.
            return self.fail("aborted by an operator".into());
        }
        match self.memo.stage {
            Stage::Preflight => self.preflight(),
            Stage::Surge => self.surged(),
            Stage::Arrive => self.arrive(),
            Stage::Detach => self.detached(),
            Stage::Snapshot => self.snapshotted(),
            Stage::Copy => self.copied(),
            Stage::Clear => self.cleared(),
            Stage::Attach => self.attached(),
            Stage::Address => self.addressed(),
            Stage::Healthy => self.healthy(),
            Stage::Delete => self.deleted(),
            Stage::LateAddress => self.cleanup(),
            Stage::Cleanup => self.succeed(),
            Stage::Unaddress
            | Stage::Unattach
            | Stage::Reattach
            | Stage::Remove
            | Stage::Discard => self.roll_back(),
        }
    }

    /// What the statuses and the mirror say of the calls sent. A call whose answer was lost is
    /// judged by the mirror once it was read after it: the disks where the call would put them.
    fn track(&mut self) {
        let (dry, now) = (self.dry(), self.now);
        let mut landed_by_mirror = Vec::new();
        for (i, call) in self.memo.calls.iter_mut().enumerate() {
            // Writing a NIC whole is the same write again: a lost answer is sent again.
            let repeatable = matches!(call.act, Act::SetAddress { .. });
            if let Some(sent_at) = call.state.settle(self.view.statuses, dry, repeatable, now) {
                landed_by_mirror.push((i, sent_at));
            }
        }
        for (i, sent_at) in landed_by_mirror {
            if !self.view.synced_after(Some(sent_at)) {
                continue;
            }
            let landed = match &self.memo.calls[i].act {
                Act::Detach { instance, disks } => disks
                    .iter()
                    .all(|d| self.view.holder(d) != Some(instance.as_str())),
                Act::Attach { instance, disks } => disks
                    .iter()
                    .all(|(_, d)| self.view.holder(d) == Some(instance.as_str())),
                Act::Delete { instance } => self.view.present(instance).is_none(),
                // The surge shows as a new instance (see `arrive`); the rest have status URLs.
                Act::Grow => true,
                _ => false,
            };
            if landed {
                self.memo.calls[i].state = CallState::Ended { at: now };
            }
        }
    }

    fn preflight(&mut self) {
        let old = self.old();
        let refuse = |why: String| format!("stateful replacement of {old} refused: {why}");
        let Some(slot) = self.view.slot.cloned() else {
            let why = refuse(format!(
                "no slot holds {old}: its set was never mirrored with its disks, so what to carry is not known"
            ));
            return self.end(State::Failed, why);
        };
        let flexible = self
            .view
            .record
            .and_then(|r| r.orchestration_mode.as_deref())
            .is_some_and(|m| m.eq_ignore_ascii_case("flexible"));
        let policy = Stateful {
            luns: self.params().luns.clone(),
            address: self.params().address,
            zone_copy: self.params().zone_copy,
        };
        if let Some(why) = policy.refusal(flexible) {
            return self.end(State::Failed, refuse(why));
        }
        if self.view.present(&old).is_none() {
            return self.end(State::Failed, refuse(format!("{old} is not in the mirror")));
        }
        // A disk on another VM is never taken from it.
        for d in &slot.disks {
            if let Some(other) = self.view.holder(&d.id).filter(|h| *h != old) {
                let why = refuse(format!(
                    "disk {} of {} is attached to instance {other}, not to {old}",
                    name_of(&d.id),
                    slot.id
                ));
                return self.end(State::Failed, why);
            }
        }
        self.memo.before = self
            .view
            .instances
            .iter()
            .map(|m| m.instance.instance_id.clone())
            .collect();
        self.memo.slot = Some(slot.clone());
        self.out.op.state = State::Running;
        self.out.op.holds = vec![old.clone()];
        self.out.op.total = Stage::Cleanup as u32;
        let disks: Vec<String> = slot
            .disks
            .iter()
            .map(|d| format!("{} at LUN {}", name_of(&d.id), d.lun))
            .collect();
        let dry = if self.dry() {
            " (dry run: nothing is called)"
        } else {
            ""
        };
        self.note(
            &old,
            "started",
            format!(
                "stateful replacement of {old} for incident {}: {} carries {} to a new instance{dry}",
                self.params().incident,
                slot.id,
                disks.join(", ")
            ),
        );
        self.step(Stage::Surge, vec![Act::Grow], self.timeout());
        self.wait("capacity + 1".into());
    }

    fn surged(&mut self) {
        self.memo.grew = true;
        self.step(Stage::Arrive, Vec::new(), self.timeout());
        self.arrive();
    }

    /// The new instance: in the mirror after the surge, not there before, provisioned.
    fn arrive(&mut self) {
        if self.dry() {
            self.memo.new_instance = Some("(new)".into());
            return self.detach();
        }
        if !self.view.synced_after(self.memo.ended_at) {
            return self.wait("the mirror to show the new instance".into());
        }
        let new = self
            .view
            .instances
            .iter()
            .filter(|m| !self.memo.before.contains(&m.instance.instance_id))
            .filter(|m| {
                m.instance
                    .provisioning_state
                    .as_deref()
                    .is_some_and(|p| p.eq_ignore_ascii_case("succeeded"))
            })
            .min_by_key(|m| {
                (
                    m.instance.created_at,
                    m.instance.instance_id.len(),
                    m.instance.instance_id.clone(),
                )
            })
            .map(|m| (m.instance.instance_id.clone(), m.instance.zone.clone()));
        let Some((new, zone)) = new else {
            if self.memo.deadline.is_some_and(|d| self.now > d) {
                return self.fail("the new instance did not appear in time".into());
            }
            return self.wait("the new instance to be provisioned".into());
        };
        self.memo.new_instance = Some(new.clone());
        self.memo.new_zone = zone.clone();
        self.memo.displaced = self.own_disks(&new);
        self.out.op.holds = vec![self.old(), new.clone()];
        let old = self.old();
        self.note(
            &new,
            "new_instance",
            format!(
                "{new} (zone {}) takes {old}'s slot",
                zone.as_deref().unwrap_or("none")
            ),
        );
        // Zones: refused before anything is detached when the policy forbids the copy.
        let elsewhere: Vec<String> = self
            .memo
            .originals()
            .iter()
            .filter(|d| d.zone.is_some() && d.zone != zone)
            .map(|d| {
                format!(
                    "{} (zone {})",
                    name_of(&d.id),
                    d.zone.clone().unwrap_or_default()
                )
            })
            .collect();
        if !elsewhere.is_empty() && !self.params().zone_copy {
            return self.fail(format!(
                "the new instance is in zone {} and {} cannot be attached there; STATEFUL_ZONE_COPY=false forbids copying",
                zone.as_deref().unwrap_or("none"),
                elsewhere.join(", ")
            ));
        }
        self.detach();
    }

    fn detach(&mut self) {
        let old = self.old();
        let disks: Vec<String> = self
            .memo
            .originals()
            .iter()
            .filter(|d| self.dry() || self.view.holder(&d.id) == Some(old.as_str()))
            .map(|d| d.id.clone())
            .collect();
        self.memo.detached = true;
        if disks.is_empty() {
            // Already off it (an earlier attempt, or the broken VM lost them): nothing to detach.
            return self.detached();
        }
        self.step(
            Stage::Detach,
            vec![Act::Detach {
                instance: old.clone(),
                disks,
            }],
            self.timeout(),
        );
        self.wait(format!("the slot's disks to be detached from {old}"));
    }

    fn detached(&mut self) {
        let old = self.old();
        self.note(&old, "detached", format!("the slot's disks are off {old}"));
        let zone = self.memo.new_zone.clone();
        let to_copy: Vec<SlotDisk> = self
            .memo
            .originals()
            .into_iter()
            .filter(|d| !self.dry() && d.zone.is_some() && d.zone != zone)
            .collect();
        if to_copy.is_empty() {
            return self.attach();
        }
        let set = &self.out.op.scale_set;
        let stamp = self.now.unix_timestamp();
        let acts: Vec<Act> = to_copy
            .iter()
            .map(|d| Act::Snapshot {
                name: format!("{}-lun{}-{stamp}", set.name, d.lun),
                disk: d.id.clone(),
            })
            .collect();
        let moves: Vec<String> = to_copy
            .iter()
            .map(|d| {
                format!(
                    "{} from zone {} into zone {}",
                    name_of(&d.id),
                    d.zone.clone().unwrap_or_default(),
                    zone.clone().unwrap_or_default()
                )
            })
            .collect();
        let new = self.new_vm();
        self.note(
            &new,
            "zone_copy",
            format!(
                "the new instance landed in another zone: {} is copied by snapshot (a zonal disk attaches only in its zone)",
                moves.join(", ")
            ),
        );
        let copy_timeout = Duration::seconds(self.params().copy_timeout_s);
        self.step(Stage::Snapshot, acts, copy_timeout);
        self.wait("the snapshots".into());
    }

    fn snapshotted(&mut self) {
        let set = self.out.op.scale_set.clone();
        let zone = self.memo.new_zone.clone();
        let mut acts = Vec::new();
        let mut copies = Vec::new();
        for call in &self.memo.calls {
            let Act::Snapshot { name, disk } = &call.act else {
                continue;
            };
            let lun = self
                .memo
                .originals()
                .iter()
                .find(|d| d.id == *disk)
                .map(|d| d.lun)
                .unwrap_or_default();
            let copy_name = format!("{}-z{}", name, zone.clone().unwrap_or_default());
            let snapshot = format!(
                "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/snapshots/{name}",
                set.subscription, set.resource_group
            );
            let id = format!(
                "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/disks/{copy_name}",
                set.subscription, set.resource_group
            );
            acts.push(Act::CreateDisk {
                name: copy_name,
                zone: zone.clone(),
                snapshot: snapshot.clone(),
            });
            copies.push(Copied {
                lun,
                from: disk.clone(),
                snapshot: name.clone(),
                disk: id,
            });
        }
        self.memo.copies = copies;
        let copy_timeout = Duration::seconds(self.params().copy_timeout_s);
        self.step(Stage::Copy, acts, copy_timeout);
        self.wait("the copies into the new zone".into());
    }

    fn copied(&mut self) {
        let names: Vec<String> = self
            .memo
            .copies
            .iter()
            .map(|c| format!("{} → {}", name_of(&c.from), name_of(&c.disk)))
            .collect();
        let new = self.new_vm();
        self.note(&new, "copied", format!("copied: {}", names.join(", ")));
        self.attach();
    }

    /// The new instance's own disks at the slot's LUNs, as it arrived: Azure attaches no second
    /// disk at a LUN ("A disk at LUN 0 already exists.", Azure/azure-sdk-for-go#678), and a scale
    /// set whose model has data disks gives every new VM an empty one at each (the usual way to
    /// give each VM one). Never one of the slot's: the new VM did not exist before the surge, so
    /// nothing of value is on them.
    fn own_disks(&self, new: &str) -> Vec<String> {
        let originals = self.memo.originals();
        let luns: Vec<u32> = originals.iter().map(|d| d.lun).collect();
        let ours = |d: &str| originals.iter().any(|o| o.id.eq_ignore_ascii_case(d));
        self.view
            .present(new)
            .map(|m| {
                m.instance
                    .data_disks
                    .iter()
                    .filter(|(lun, d)| luns.contains(lun) && !ours(d))
                    .map(|(_, d)| d.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The slot's disks onto the new instance, once its own disks at their LUNs are off it.
    fn attach(&mut self) {
        let new = self.new_vm();
        let own: Vec<String> = self
            .memo
            .displaced
            .iter()
            .filter(|d| !self.dry() && self.view.holder(d) == Some(new.as_str()))
            .cloned()
            .collect();
        if own.is_empty() {
            return self.attach_carried();
        }
        self.note(
            &new,
            "clearing",
            format!(
                "{new} came with {} of its own at the slot's LUNs (its model's): taken off it for the slot's",
                names(own.iter())
            ),
        );
        self.step(
            Stage::Clear,
            vec![Act::Detach {
                instance: new.clone(),
                disks: own,
            }],
            self.timeout(),
        );
        self.wait(format!("{new}'s own disks to be detached"));
    }

    fn cleared(&mut self) {
        let new = self.new_vm();
        let own = names(self.memo.displaced.iter());
        self.note(
            &new,
            "cleared",
            format!("{own} off {new}: the slot's LUNs are free"),
        );
        self.attach_carried();
    }

    fn attach_carried(&mut self) {
        let new = self.new_vm();
        let disks = self.memo.carried();
        self.memo.attached = true;
        self.step(
            Stage::Attach,
            vec![Act::Attach {
                instance: new.clone(),
                disks,
            }],
            self.timeout(),
        );
        self.wait(format!("the slot's disks to be attached to {new}"));
    }

    fn attached(&mut self) {
        let new = self.new_vm();
        let disks: Vec<String> = self
            .memo
            .carried()
            .iter()
            .map(|(lun, d)| format!("{} at LUN {lun}", name_of(d)))
            .collect();
        self.note(
            &new,
            "attached",
            format!(
                "{} attached to {new}; the slot follows it; waiting for it to mount them and report UP",
                disks.join(", ")
            ),
        );
        if let (Address::PublicIp, Some(pip)) = (self.params().address, self.slot_address()) {
            // Released by the broken VM first: a public IP is one IP configuration's.
            let old = self.old();
            self.memo.address_moved = true;
            self.step(
                Stage::Address,
                vec![
                    Act::SetAddress {
                        instance: old,
                        kind: Address::PublicIp,
                        address: None,
                    },
                    Act::SetAddress {
                        instance: new.clone(),
                        kind: Address::PublicIp,
                        address: Some(pip),
                    },
                ],
                self.timeout(),
            );
            return self.wait(format!("the public IP to move to {new}"));
        }
        self.step(Stage::Healthy, Vec::new(), self.timeout());
        self.healthy();
    }

    /// The address the slot carries, if it recorded one.
    fn slot_address(&self) -> Option<String> {
        self.memo.slot.as_ref().and_then(|s| s.address.clone())
    }

    fn addressed(&mut self) {
        let new = self.new_vm();
        let pip = self.slot_address().unwrap_or_default();
        self.note(
            &new,
            "address_moved",
            format!("public IP {} moved to {new}", name_of(&pip)),
        );
        self.step(Stage::Healthy, Vec::new(), self.timeout());
        self.healthy();
    }

    /// Healthy by our verdict, with a heartbeat sent after the attach ended.
    fn healthy(&mut self) {
        let new = self.new_vm();
        let since = self.memo.ended_at.unwrap_or(self.now);
        let up = matches!(self.view.verdicts.get(new.as_str()), Some(Verdict::Healthy))
            && self
                .view
                .heartbeats
                .get(&new)
                .is_some_and(|hb| hb.event_time.min(hb.received_at) > since);
        if !(self.dry() || up) {
            if self.memo.deadline.is_some_and(|d| self.now > d) {
                return self.fail(format!(
                    "{new} did not report UP with its data in time (is the agent's HEALER_REQUIRE_MOUNT met?)"
                ));
            }
            return self.wait(format!("{new} to mount its data and report UP"));
        }
        let old = self.old();
        self.note(
            &new,
            "healthy",
            format!("{new} is healthy with its data: {old} goes"),
        );
        self.step(
            Stage::Delete,
            vec![Act::Delete {
                instance: old.clone(),
            }],
            self.timeout(),
        );
        self.wait(format!("{old} to be deleted"));
    }

    fn deleted(&mut self) {
        let old = self.old();
        self.note(&old, "deleted", format!("{old} deleted"));
        self.out.op.holds = vec![self.new_vm()];
        if let (Address::PrivateIp, Some(ip)) = (self.params().address, self.slot_address()) {
            // A private address is one NIC's: free only once the broken VM's NIC went with it.
            let new = self.new_vm();
            self.step(
                Stage::LateAddress,
                vec![Act::SetAddress {
                    instance: new.clone(),
                    kind: Address::PrivateIp,
                    address: Some(ip),
                }],
                self.timeout(),
            );
            return self.wait(format!("{new} to take the private address"));
        }
        self.cleanup();
    }

    /// What a copy left behind goes: the original disks and the snapshots.
    fn cleanup(&mut self) {
        if self.memo.stage == Stage::LateAddress {
            let new = self.new_vm();
            let ip = self.slot_address().unwrap_or_default();
            self.note(
                &new,
                "address_moved",
                format!("private address {ip} taken by {new}"),
            );
        }
        let mut acts: Vec<Act> = self
            .memo
            .copies
            .iter()
            .map(|c| Act::DeleteDisk { id: c.from.clone() })
            .collect();
        acts.extend(self.memo.copies.iter().map(|c| Act::DeleteSnapshot {
            name: c.snapshot.clone(),
        }));
        acts.extend(self.displaced_to_delete());
        if acts.is_empty() {
            return self.succeed();
        }
        self.step(Stage::Cleanup, acts, self.timeout());
        self.wait("what the replacement left behind: the disks a copy replaced, the snapshots, the new instance's own disks".into());
    }

    /// The new instance's own disks taken off it, once no VM holds them by the mirror.
    fn displaced_to_delete(&self) -> Vec<Act> {
        self.memo
            .displaced
            .iter()
            .filter(|d| self.view.holder(d).is_none())
            .map(|d| Act::DeleteDisk { id: d.clone() })
            .collect()
    }

    fn succeed(&mut self) {
        let (old, new) = (self.old(), self.new_vm());
        let slot = self
            .memo
            .slot
            .as_ref()
            .map(|s| s.id.clone())
            .unwrap_or_default();
        self.end(
            State::Succeeded,
            format!("{old} replaced by {new}; {slot} and its data live on {new}"),
        );
    }

    /// A failure: what was done is undone, in order, from where it stands — until the new
    /// instance serves with the data. From then on nothing is undone: the broken instance not
    /// deleted is the operator's, and a clean-up that failed leaves its leftovers named.
    fn fail(&mut self, why: String) {
        match self.memo.stage {
            Stage::Cleanup => {
                let old = self.old();
                self.note(
                    &old,
                    "cleanup_failed",
                    format!("{why}; left for an operator"),
                );
                return self.succeed();
            }
            Stage::LateAddress => {
                let new = self.new_vm();
                let why = format!(
                    "{new} serves with the slot's data, but could not take the private address ({why}); set it by hand"
                );
                self.note(&new, "address_failed", why.clone());
                self.out.alert = Some(format!(
                    "stateful replacement on {}: {why}",
                    self.out.op.scale_set
                ));
                self.memo.stage = Stage::Cleanup;
                self.memo.calls.clear();
                return self.cleanup();
            }
            Stage::Delete => {
                let (old, new) = (self.old(), self.new_vm());
                return self.give_up(format!(
                    "{new} serves with the slot's data, but {old} could not be deleted ({why}); delete it by hand"
                ));
            }
            _ => {}
        }
        if self.memo.failed.is_some() {
            // Failing while rolling back: stop where it is, with everything said.
            return self.give_up(format!(
                "{why}; rolling back after: {}",
                self.memo.failed.clone().unwrap_or_default()
            ));
        }
        if self.memo.stage == Stage::Snapshot {
            // Their copies were never made: the snapshots go with the roll-back.
            self.memo.snapshots = self
                .memo
                .calls
                .iter()
                .filter(|c| !matches!(c.state, CallState::Unsent))
                .filter_map(|c| match &c.act {
                    Act::Snapshot { name, .. } => Some(name.clone()),
                    _ => None,
                })
                .collect();
        }
        self.memo.failed = Some(why.clone());
        self.out.op.last_error = Some(why.clone());
        self.out.op.state = State::RollingBack;
        let old = self.old();
        self.note(&old, "failed_step", format!("{why}; rolling back"));
        self.memo.stage = Stage::Unaddress;
        self.memo.calls.clear();
        self.roll_back();
    }

    /// The next undo whose turn has come, from the stage just ended.
    fn roll_back(&mut self) {
        let (old, new) = (self.old(), self.new_vm());
        let dry = self.dry();
        loop {
            match self.memo.stage {
                Stage::Unaddress if self.memo.calls.is_empty() && self.memo.address_moved => {
                    self.memo.address_moved = false;
                    let pip = self.slot_address();
                    return self.undo_all(
                        Stage::Unaddress,
                        vec![
                            Act::SetAddress {
                                instance: new.clone(),
                                kind: Address::PublicIp,
                                address: None,
                            },
                            Act::SetAddress {
                                instance: old.clone(),
                                kind: Address::PublicIp,
                                address: pip,
                            },
                        ],
                    );
                }
                Stage::Unaddress => {
                    self.memo.calls.clear();
                    self.memo.stage = Stage::Unattach;
                }
                Stage::Unattach if self.memo.calls.is_empty() && self.memo.attached => {
                    // Where the disks are, the mirror says once it was read after the last call.
                    if !self.view.synced_after(self.memo.ended_at) && !dry {
                        return self.wait("the mirror to show where the disks are".into());
                    }
                    let on_new: Vec<String> = self
                        .memo
                        .carried()
                        .into_iter()
                        .map(|(_, d)| d)
                        .filter(|d| !dry && self.view.holder(d) == Some(new.as_str()))
                        .collect();
                    if !on_new.is_empty() {
                        return self.undo(
                            Stage::Unattach,
                            Act::Detach {
                                instance: new.clone(),
                                disks: on_new,
                            },
                        );
                    }
                    self.memo.stage = Stage::Reattach;
                }
                Stage::Unattach => {
                    self.memo.calls.clear();
                    self.memo.stage = Stage::Reattach;
                }
                Stage::Reattach if self.memo.calls.is_empty() && self.memo.detached => {
                    if !self.view.synced_after(self.memo.ended_at) && !dry {
                        return self
                            .wait("the mirror to show the disks off the new instance".into());
                    }
                    let off: Vec<(u32, String)> = self
                        .memo
                        .originals()
                        .into_iter()
                        .filter(|d| !dry && self.view.holder(&d.id).is_none())
                        .map(|d| (d.lun, d.id))
                        .collect();
                    if !off.is_empty() && self.view.present(&old).is_some() {
                        return self.undo(
                            Stage::Reattach,
                            Act::Attach {
                                instance: old.clone(),
                                disks: off,
                            },
                        );
                    }
                    self.memo.stage = Stage::Remove;
                }
                Stage::Reattach => {
                    self.memo.calls.clear();
                    self.memo.stage = Stage::Remove;
                }
                Stage::Remove if self.memo.calls.is_empty() => {
                    let present = !new.is_empty() && self.view.present(&new).is_some();
                    if present && !dry {
                        return self.undo(
                            Stage::Remove,
                            Act::Delete {
                                instance: new.clone(),
                            },
                        );
                    }
                    self.memo.stage = Stage::Discard;
                }
                Stage::Remove => {
                    self.memo.calls.clear();
                    self.memo.stage = Stage::Discard;
                }
                Stage::Discard
                    if self.memo.calls.is_empty()
                        && !(self.memo.copies.is_empty()
                            && self.memo.displaced.is_empty()
                            && self.memo.snapshots.is_empty()) =>
                {
                    // The new VM's own disks, detached or left by its delete: the mirror says.
                    if !self.memo.displaced.is_empty()
                        && !self.view.synced_after(self.memo.ended_at)
                        && !dry
                    {
                        return self
                            .wait("the mirror to show the new instance's own disks free".into());
                    }
                    let mut acts: Vec<Act> = self
                        .memo
                        .copies
                        .iter()
                        .filter(|c| self.view.holder(&c.disk).is_none())
                        .map(|c| Act::DeleteDisk { id: c.disk.clone() })
                        .collect();
                    acts.extend(self.memo.copies.iter().map(|c| Act::DeleteSnapshot {
                        name: c.snapshot.clone(),
                    }));
                    acts.extend(self.displaced_to_delete());
                    acts.extend(
                        self.memo
                            .snapshots
                            .drain(..)
                            .map(|name| Act::DeleteSnapshot { name }),
                    );
                    self.memo.copies.clear();
                    self.memo.displaced.clear();
                    if acts.is_empty() {
                        continue;
                    }
                    self.step(Stage::Discard, acts, self.timeout());
                    return self.wait("the copies to be discarded".into());
                }
                _ => {
                    let why = self.memo.failed.clone().unwrap_or_default();
                    // The surge's instance is deleted only once known: another VM that appeared
                    // meanwhile (an autoscale) is never taken for it.
                    let gone = if new.is_empty() && self.memo.grew && !dry {
                        "the capacity added for the new instance stays (it was never seen provisioned): scale the set back by hand"
                    } else {
                        "the new instance is gone"
                    };
                    self.note(
                        &old,
                        "rolled_back",
                        format!("the slot's disks are back on {old}; {gone}"),
                    );
                    if self.memo.aborted {
                        return self.end(State::Aborted, format!("{why}: rolled back"));
                    }
                    return self.give_up(why);
                }
            }
        }
    }

    fn undo(&mut self, stage: Stage, act: Act) {
        self.undo_all(stage, vec![act]);
    }

    fn undo_all(&mut self, stage: Stage, acts: Vec<Act>) {
        let what = acts
            .iter()
            .map(Act::describe)
            .collect::<Vec<_>>()
            .join(", then ");
        self.step(stage, acts, self.timeout());
        self.wait(what);
    }

    /// Where the slot should be now, if the stored row says otherwise: on the new instance once
    /// the disks are attached there, back on the broken one once a roll-back began. Never in a
    /// dry run.
    fn desired_slot(&self) -> Option<Slot> {
        let original = self.memo.slot.clone().filter(|_| !self.dry())?;
        let forward = self.memo.failed.is_none()
            && (self.out.op.state == State::Succeeded
                || matches!(
                    self.memo.stage,
                    Stage::Address
                        | Stage::Healthy
                        | Stage::Delete
                        | Stage::LateAddress
                        | Stage::Cleanup
                ));
        let want = if forward {
            let zone = self.memo.new_zone.clone();
            Slot {
                instance: self.new_vm(),
                disks: self
                    .memo
                    .carried()
                    .into_iter()
                    .map(|(lun, id)| SlotDisk {
                        lun,
                        id,
                        zone: zone.clone(),
                    })
                    .collect(),
                zone,
                ..original
            }
        } else if self.memo.failed.is_some() {
            original
        } else {
            return None;
        };
        match self.view.slot {
            Some(s) if s.instance == want.instance && s.disks == want.disks => None,
            _ => Some(Slot {
                updated: self.now,
                ..want
            }),
        }
    }

    fn give_up(&mut self, why: String) {
        let data = if self.memo.stage == Stage::Delete {
            "its data lives on the new instance"
        } else {
            "its data stays with it"
        };
        self.out.alert = Some(format!(
            "stateful replacement of {} on {} failed: {why}; {data}",
            self.old(),
            self.out.op.scale_set
        ));
        self.end(State::Failed, why);
    }

    fn end(&mut self, state: State, reason: String) {
        if state == State::Failed && self.out.alert.is_none() {
            self.out.alert = Some(format!("stateful replacement not done: {reason}"));
        }
        let instance = self.params.as_ref().map(|p| p.instance.clone());
        self.note(
            instance.as_deref().unwrap_or("*"),
            match state {
                State::Succeeded => "succeeded",
                State::Aborted => "aborted",
                _ => "failed",
            },
            reason.clone(),
        );
        self.out.op.state = state;
        self.out.op.step = state.as_str().into();
        self.out.op.holds.clear();
        if state != State::Succeeded {
            self.out.op.last_error = Some(reason);
        }
        self.out.op.waiting = None;
        self.out.op.wait_until = None;
    }
}
