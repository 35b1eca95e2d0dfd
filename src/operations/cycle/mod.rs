//! The rolling cycle (issue 15): every instance of a scale set reimaged (or replaced, or brought
//! to the latest model) batch by batch, each batch gated on *our* verdict of health — a heartbeat
//! UP sent after its step ended — while never fewer than `--min-healthy` instances stay healthy.
//!
//! Pure: [`advance`] is a function of (operation, what the pass sees, now) → the operation's next
//! row, what to journal, whether to alert. The calls it decides are written into the operation
//! (its [`Memo`]) as [`CallState::Unsent`]; the pass that runs it (`passes::operate`) sends them
//! and records each answer, so a pass stopped between the two never sends a call twice.
//!
//! What it takes from its references: Azure's rolling upgrade policy (batch share, pause between
//! batches, unhealthy instances first, max surge) and AWS instance refresh (min healthy share,
//! skip what already matches), but health is the healer's own verdict, not the platform's alone.

mod params;

pub use params::{parse, Action, Params, Raw};

pub use super::step::{Advance, CallState, Note, Status};
use super::{Operation, State};
use crate::heartbeat::Heartbeat;
use crate::mirror::MirroredInstance;
use crate::verdict::{operation_in_progress, Verdict};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, HashSet};
use time::{Duration, OffsetDateTime};

/// What a call of the cycle does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verb {
    Reimage,
    /// The scale set's manual upgrade (`manualupgrade`): the latest model on these instances.
    Upgrade,
    /// Raise the capacity by `grow` (a surge, or a replace's new instances).
    Grow,
    /// Delete these instances (a replace's old ones, or the surge given back).
    Delete,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Reimage => "reimage",
            Verb::Upgrade => "upgrade",
            Verb::Grow => "grow",
            Verb::Delete => "delete",
        }
    }
}

/// One Compute call of the cycle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sent {
    pub verb: Verb,
    #[serde(default)]
    pub instances: Vec<String>,
    /// Instances to add (`Grow`).
    #[serde(default)]
    pub grow: u32,
    pub state: CallState,
}

impl Sent {
    fn new(verb: Verb, instances: Vec<String>, grow: u32) -> Self {
        Sent {
            verb,
            instances,
            grow,
            state: CallState::Unsent,
        }
    }

    fn ended_at(&self) -> Option<OffsetDateTime> {
        self.state.ended_at()
    }

    fn failed(&self) -> Option<&str> {
        self.state.failed()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The batch's reimage or upgrade runs; then its instances must come back healthy.
    Act,
    /// A replace's new instances are created and must come up healthy.
    Grow,
    /// A replace's old instances are deleted.
    Delete,
}

/// The batch in flight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub number: u32,
    pub instances: Vec<String>,
    pub stage: Stage,
    pub calls: Vec<Sent>,
    #[serde(with = "time::serde::rfc3339")]
    pub deadline: OffsetDateTime,
    /// The instances before a grow: the new ones are the others.
    #[serde(default)]
    pub before: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SurgeStage {
    Growing,
    Up,
    GivingBack,
}

/// Capacity added to keep `--min-healthy` while healthy instances are cycled; given back at the
/// end by deleting exactly the instances it added (whatever autoscale did meanwhile stays).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Surge {
    pub n: u32,
    pub stage: SurgeStage,
    pub calls: Vec<Sent>,
    #[serde(with = "time::serde::rfc3339")]
    pub deadline: OffsetDateTime,
    #[serde(default)]
    pub before: Vec<String>,
    /// The instances it added, once they came up.
    #[serde(default)]
    pub added: Vec<String>,
}

/// The cycle's own record of where it is, kept in the operation's row.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Memo {
    /// Still to cycle, in order.
    #[serde(default)]
    pub todo: Vec<String>,
    /// Did not come back healthy in time: released to the healer's incident engine.
    #[serde(default)]
    pub failed: Vec<String>,
    /// Gone before their turn, or held by an incident of the healer's to the end.
    #[serde(default)]
    pub skipped: Vec<String>,
    #[serde(default)]
    pub batch: Option<Batch>,
    #[serde(default)]
    pub surge: Option<Surge>,
    /// The instance count `--min-healthy` and `--batch` are shares of, read at the start.
    #[serde(default)]
    pub capacity: u32,
    #[serde(default)]
    pub batches: u32,
    /// Since when no batch could start for want of healthy instances.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub short_since: Option<OffsetDateTime>,
    /// The pause between batches lasts until then.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub next_batch_at: Option<OffsetDateTime>,
}

/// Which call of the memo: for the pass that sends it and records its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Batch(usize),
    Surge(usize),
}

impl Memo {
    pub fn read(op: &Operation) -> Result<Memo, String> {
        if op.memo.is_null() {
            return Ok(Memo::default());
        }
        serde_json::from_value(op.memo.clone())
            .map_err(|e| format!("the cycle's stored progress is unreadable: {e}"))
    }

    pub fn call_mut(&mut self, slot: Slot) -> Option<&mut Sent> {
        match slot {
            Slot::Batch(i) => self.batch.as_mut()?.calls.get_mut(i),
            Slot::Surge(i) => self.surge.as_mut()?.calls.get_mut(i),
        }
    }

    pub fn slots(&self) -> Vec<Slot> {
        self.calls().into_iter().map(|(s, _)| s).collect()
    }

    /// Every call with where it is.
    pub fn calls(&self) -> Vec<(Slot, &Sent)> {
        let batch = self.batch.iter().flat_map(|b| b.calls.iter().enumerate());
        let surge = self.surge.iter().flat_map(|s| s.calls.iter().enumerate());
        batch
            .map(|(i, c)| (Slot::Batch(i), c))
            .chain(surge.map(|(i, c)| (Slot::Surge(i), c)))
            .collect()
    }
}

/// The grow or delete a cycle has sent and not yet seen end, if any: the healer's own writes to
/// the scale set wait for it (a scale set write preempts a running delete).
pub fn write_in_flight(op: &Operation) -> Option<crate::incident::Call> {
    // A dry run's calls were never sent.
    if op.state.is_over() || op.dry_run {
        return None;
    }
    let memo = Memo::read(op).ok()?;
    memo.calls().into_iter().find_map(|(_, c)| {
        let in_flight = matches!(
            c.state,
            CallState::Sending { .. } | CallState::Accepted { .. }
        );
        match c.verb {
            Verb::Grow if in_flight => Some(crate::incident::Call::Grow),
            Verb::Delete if in_flight => Some(crate::incident::Call::Delete),
            _ => None,
        }
    })
}

/// What one pass sees of the scale set.
pub struct View<'a> {
    pub instances: &'a [MirroredInstance],
    pub heartbeats: &'a HashMap<String, Heartbeat>,
    pub verdicts: &'a HashMap<&'a str, Verdict>,
    /// Instances with an open incident of the healer's: the cycle never acts on them.
    pub incidents: HashSet<&'a str>,
    /// The brake holding the scale set, in words, if one does.
    pub brake: Option<String>,
    pub flexible: bool,
    /// The status of each accepted call, by URL, read this pass.
    pub statuses: &'a HashMap<String, Status>,
    /// How long heartbeats get to come back once a brake releases (the heartbeat timeout).
    pub settle: Duration,
    /// Decide and journal, call nothing.
    pub dry_run: bool,
}

/// Advances a cycle by one pass.
pub fn advance(op: &Operation, view: &View, now: OffsetDateTime) -> Advance {
    let mut c = Cycle {
        view,
        now,
        out: Advance::of(op),
        memo: Memo::default(),
        params: None,
    };
    if !matches!(op.state, State::Pending | State::Running) {
        return c.out;
    }
    match (Params::from_stored(&op.params), Memo::read(op)) {
        (Ok(p), Ok(m)) => {
            c.params = Some(p);
            c.memo = m;
            c.run();
        }
        (Err(problems), _) => c.end(State::Failed, problems.join("; ")),
        (_, Err(e)) => c.end(State::Failed, e),
    }
    c.out.finish(op, &c.memo, now)
}

struct Cycle<'a, 'v> {
    view: &'a View<'v>,
    now: OffsetDateTime,
    out: Advance,
    memo: Memo,
    params: Option<Params>,
}

/// Instance ids in the order an operator reads them (numbers as numbers).
fn order_key(id: &str) -> (u64, &str) {
    (id.parse().unwrap_or(u64::MAX), id)
}

impl Cycle<'_, '_> {
    fn params(&self) -> &Params {
        self.params
            .as_ref()
            .unwrap_or_else(|| unreachable!("params are read before the cycle runs"))
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

    fn wait(&mut self, what: String, until: Option<OffsetDateTime>) {
        self.out.op.waiting = Some(what);
        self.out.op.wait_until = until;
    }

    fn present(&self) -> HashMap<&str, &MirroredInstance> {
        self.view
            .instances
            .iter()
            .filter(|m| {
                !m.instance
                    .provisioning_state
                    .as_deref()
                    .is_some_and(|p| p.eq_ignore_ascii_case("deleting"))
            })
            .map(|m| (m.instance.instance_id.as_str(), m))
            .collect()
    }

    fn healthy(&self, id: &str) -> bool {
        matches!(self.view.verdicts.get(id), Some(Verdict::Healthy))
    }

    /// Healthy by our verdict, with a heartbeat sent after `since` (its step's end): a stale UP
    /// from before the reimage never counts.
    fn back_since(&self, id: &str, since: OffsetDateTime) -> bool {
        self.healthy(id)
            && self
                .view
                .heartbeats
                .get(id)
                .is_some_and(|hb| hb.event_time.min(hb.received_at) > since)
    }

    fn run(&mut self) {
        if let Some(brake) = self.view.brake.clone() {
            return self.hold(brake);
        }
        if self.out.op.state == State::Pending && !self.preflight() {
            return;
        }
        self.track();
        if self
            .memo
            .surge
            .as_ref()
            .is_some_and(|s| s.stage == SurgeStage::Growing)
            && !self.surge_up()
        {
            return;
        }
        if self.memo.batch.is_some() && !self.batch_back() {
            return;
        }
        self.next_batch();
    }

    /// A brake holds every step: nothing new starts, and what runs gets time to be judged once
    /// the brake releases (during a pipeline fault no heartbeat can prove anything).
    fn hold(&mut self, brake: String) {
        let until = self.now + self.view.settle;
        let mut deadline = None;
        if let Some(b) = self.memo.batch.as_mut() {
            b.deadline = b.deadline.max(until);
            deadline = Some(b.deadline);
        }
        if let Some(s) = self
            .memo
            .surge
            .as_mut()
            .filter(|s| s.stage == SurgeStage::Growing)
        {
            s.deadline = s.deadline.max(until);
            deadline = Some(s.deadline);
        }
        let what = format!("held by the brake: {brake}");
        if self.out.op.waiting.as_deref() != Some(what.as_str()) {
            self.note("*", "held", format!("{what}; no step until it releases"));
        }
        self.wait(what, deadline);
    }

    fn preflight(&mut self) -> bool {
        let params = self.params().clone();
        if params.action == Action::Upgrade && self.view.flexible {
            self.end(
                State::Failed,
                "--action upgrade: manual upgrade of a Flexible scale set is in preview (\"Performing manual upgrades on Virtual Machine Scale Sets\", learn.microsoft.com); reimage or replace instead".into(),
            );
            return false;
        }
        let present = self.present();
        let capacity = present.len();
        let mut todo: Vec<&str> = present
            .iter()
            .filter(|(_, m)| !params.only_outdated || m.instance.latest_model_applied != Some(true))
            .map(|(id, _)| *id)
            .collect();
        // Unhealthy instances first: cycling them costs no availability.
        todo.sort_by_key(|id| (self.healthy(id), order_key(id)));
        let todo: Vec<String> = todo.into_iter().map(str::to_string).collect();
        let keep = params.min_healthy_of(capacity);
        let batch = params.batch_size(capacity);
        let surge_cap = params.max_surge.map_or(batch, |n| n as usize);
        if params.action != Action::Replace && !todo.is_empty() && keep >= capacity + surge_cap {
            self.end(
                State::Failed,
                format!("--min-healthy keeps {keep} of {capacity} instances healthy: even with a surge of {surge_cap} not one could be cycled; lower --min-healthy or raise --max-surge"),
            );
            return false;
        }
        self.memo.capacity = capacity as u32;
        self.out.op.total = todo.len() as u32;
        self.out.op.done = 0;
        self.out.op.state = State::Running;
        self.out.op.step = "preflight".into();
        let what = match params.action {
            Action::Reimage => "reimage",
            Action::Replace => "replace",
            Action::Upgrade => "upgrade",
        };
        self.note(
            "*",
            "started",
            format!(
                "cycle: {what} {} of {capacity} instances in batches of {batch}, keeping {keep} healthy{}",
                todo.len(),
                if self.dry() { " (dry run: nothing is called)" } else { "" }
            ),
        );
        self.memo.todo = todo;
        true
    }

    /// What the status reads and the mirror say of the calls sent.
    fn track(&mut self) {
        let dry = self.dry();
        let now = self.now;
        let present: HashMap<String, MirroredInstance> = self
            .present()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let statuses = self.view.statuses;
        let mut befores: Vec<(Slot, Vec<String>)> = Vec::new();
        if let Some(b) = &self.memo.batch {
            befores.extend((0..b.calls.len()).map(|i| (Slot::Batch(i), b.before.clone())));
        }
        if let Some(s) = &self.memo.surge {
            befores.extend((0..s.calls.len()).map(|i| (Slot::Surge(i), s.before.clone())));
        }
        for (slot, before) in befores {
            let Some(call) = self.memo.call_mut(slot) else {
                continue;
            };
            let Some(sent_at) = call.state.settle(statuses, dry, false, now) else {
                continue;
            };
            if let Some(at) = landed(call, sent_at, &present, &before) {
                call.state = CallState::Ended { at };
            }
        }
    }

    fn surge_up(&mut self) -> bool {
        let Some(surge) = self.memo.surge.clone() else {
            return true;
        };
        if let Some(error) = surge.calls.iter().find_map(|c| c.failed()) {
            let reason = format!("the surge of {} instances failed: {error}", surge.n);
            if let Some(s) = self.memo.surge.as_mut() {
                s.stage = SurgeStage::Up;
            }
            self.pause(reason);
            return false;
        }
        let ended = surge.calls.iter().all(|c| c.ended_at().is_some());
        let before: HashSet<&str> = surge.before.iter().map(String::as_str).collect();
        let mut added: Vec<String> = self
            .present()
            .keys()
            .filter(|id| !before.contains(*id))
            .map(|id| id.to_string())
            .collect();
        added.sort_by(|a, b| order_key(a).cmp(&order_key(b)));
        // Autoscale (or an operator) may have added instances meanwhile: only as many as the
        // surge asked for are ours to give back, so their change of capacity stays.
        added.truncate(surge.n as usize);
        let up = added.iter().filter(|id| self.healthy(id)).count();
        if ended && (self.dry() || up >= surge.n as usize) {
            self.note(
                "*",
                "surge_up",
                format!(
                    "{} added instances are up and healthy: {}",
                    added.len(),
                    added.join(", ")
                ),
            );
            if let Some(s) = self.memo.surge.as_mut() {
                s.stage = SurgeStage::Up;
                s.added = added;
                s.before.clear();
            }
            return true;
        }
        if self.now > surge.deadline {
            if let Some(s) = self.memo.surge.as_mut() {
                s.stage = SurgeStage::Up;
                s.added = added;
                s.before.clear();
            }
            self.pause(format!(
                "the surge of {} instances did not come up healthy within {} s ({up} healthy)",
                surge.n,
                self.params().timeout.whole_seconds()
            ));
            return false;
        }
        self.wait(
            format!(
                "surge: {} new instances to come up healthy ({up} so far)",
                surge.n
            ),
            Some(surge.deadline),
        );
        false
    }

    /// Whether the batch in flight is done (and the next may start this pass).
    fn batch_back(&mut self) -> bool {
        let Some(batch) = self.memo.batch.clone() else {
            return true;
        };
        if let Some(error) = batch.calls.iter().find_map(|c| c.failed()) {
            self.fail_batch(&batch, format!("batch {}: {error}", batch.number));
            return false;
        }
        let ended = batch.calls.iter().all(|c| c.ended_at().is_some());
        match batch.stage {
            Stage::Act => {
                let present = self.present();
                let ended_at: HashMap<&str, OffsetDateTime> = batch
                    .calls
                    .iter()
                    .filter_map(|c| c.ended_at().map(|t| (c, t)))
                    .flat_map(|(c, t)| c.instances.iter().map(move |i| (i.as_str(), t)))
                    .collect();
                let back = |id: &str| {
                    self.dry()
                        || !present.contains_key(id)
                        || ended_at.get(id).is_some_and(|t| self.back_since(id, *t))
                };
                let waiting: Vec<&String> = batch.instances.iter().filter(|i| !back(i)).collect();
                if ended && waiting.is_empty() {
                    self.complete_batch(&batch);
                    return true;
                }
                if self.now > batch.deadline {
                    let reason = format!(
                        "batch {}: {} did not return healthy within {} s",
                        batch.number,
                        waiting
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        self.params().timeout.whole_seconds()
                    );
                    self.fail_batch(&batch, reason);
                    return false;
                }
                let what = if ended {
                    format!(
                        "batch {}: {} of {} back healthy",
                        batch.number,
                        batch.instances.len() - waiting.len(),
                        batch.instances.len()
                    )
                } else {
                    format!("batch {}: the Compute API to finish", batch.number)
                };
                self.wait(what, Some(batch.deadline));
                false
            }
            Stage::Grow => {
                let before: HashSet<&str> = batch.before.iter().map(String::as_str).collect();
                let added: Vec<String> = self
                    .present()
                    .keys()
                    .filter(|id| !before.contains(*id))
                    .map(|id| id.to_string())
                    .collect();
                let up = added.iter().filter(|id| self.healthy(id)).count();
                let want = batch.instances.len();
                if ended && (self.dry() || up >= want) {
                    let old: Vec<String> = {
                        let present = self.present();
                        batch
                            .instances
                            .iter()
                            .filter(|i| present.contains_key(i.as_str()))
                            .cloned()
                            .collect()
                    };
                    self.note(
                        "*",
                        "replaced_up",
                        format!(
                            "batch {}: {up} new instances healthy; deleting {}",
                            batch.number,
                            old.join(", ")
                        ),
                    );
                    if let Some(b) = self.memo.batch.as_mut() {
                        b.stage = Stage::Delete;
                        b.before.clear();
                        b.calls = vec![Sent::new(Verb::Delete, old, 0)];
                    }
                    self.out.resync = true;
                    self.wait(
                        format!("batch {}: the old instances to be deleted", batch.number),
                        Some(batch.deadline),
                    );
                    return false;
                }
                if self.now > batch.deadline {
                    let reason = format!(
                        "batch {}: {up} of {want} new instances came up healthy within {} s",
                        batch.number,
                        self.params().timeout.whole_seconds()
                    );
                    self.fail_batch(&batch, reason);
                    return false;
                }
                self.wait(
                    format!(
                        "batch {}: {want} new instances to come up healthy ({up} so far)",
                        batch.number
                    ),
                    Some(batch.deadline),
                );
                false
            }
            Stage::Delete => {
                if ended {
                    self.complete_batch(&batch);
                    return true;
                }
                if self.now > batch.deadline {
                    self.fail_batch(
                        &batch,
                        format!(
                            "batch {}: the old instances were not deleted in time",
                            batch.number
                        ),
                    );
                    return false;
                }
                self.wait(
                    format!("batch {}: the old instances to be deleted", batch.number),
                    Some(batch.deadline),
                );
                false
            }
        }
    }

    fn complete_batch(&mut self, batch: &Batch) {
        let present = self.present();
        let (here, gone): (Vec<&String>, Vec<&String>) = batch
            .instances
            .iter()
            .partition(|i| present.contains_key(i.as_str()) || batch.stage == Stage::Delete);
        let gone: Vec<String> = gone.into_iter().cloned().collect();
        for id in &here {
            self.note(
                id,
                "cycled",
                format!("batch {}: back healthy", batch.number),
            );
        }
        for id in &gone {
            self.note(
                id,
                "skipped",
                format!("batch {}: gone meanwhile", batch.number),
            );
        }
        self.out.op.done += here.len() as u32;
        self.memo.skipped.extend(gone);
        self.memo.batch = None;
        self.out.op.holds.clear();
        let pause = self.params().pause_between;
        self.memo.next_batch_at = (!pause.is_zero()).then_some(self.now + pause);
    }

    /// A batch that did not come back: what did is counted, what did not is released to the
    /// healer's incident engine, and the operation waits for the operator — unless more has
    /// failed than the availability budget, which ends it.
    fn fail_batch(&mut self, batch: &Batch, reason: String) {
        if batch.stage == Stage::Grow {
            // A replace whose new instances did not come up: its old ones were never touched.
            // They go back to the front of the queue, not to the healer; the new ones are the
            // healer's like any instance.
            let mut todo = batch.instances.clone();
            todo.append(&mut self.memo.todo);
            self.memo.todo = todo;
            self.memo.batch = None;
            self.out.op.holds.clear();
            return self.pause(reason);
        }
        let present = self.present();
        let ended_at: HashMap<&str, OffsetDateTime> = batch
            .calls
            .iter()
            .filter_map(|c| c.ended_at().map(|t| (c, t)))
            .flat_map(|(c, t)| c.instances.iter().map(move |i| (i.as_str(), t)))
            .collect();
        let mut back = 0;
        let mut failed = Vec::new();
        for id in &batch.instances {
            let returned = batch.stage == Stage::Act
                && present.contains_key(id.as_str())
                && ended_at
                    .get(id.as_str())
                    .is_some_and(|t| self.back_since(id, *t));
            if returned {
                back += 1;
            } else if present.contains_key(id.as_str()) {
                failed.push(id.clone());
            }
        }
        for id in &failed {
            self.note(id, "failed", format!("{reason}; left to the healer"));
        }
        self.out.op.done += back;
        self.memo.failed.extend(failed);
        self.memo.batch = None;
        self.out.op.holds.clear();
        self.pause(reason);
    }

    /// Stops for the operator (resume goes on with the next batch, abort ends it); more failed
    /// instances than `--min-healthy` leaves room for fails the cycle instead.
    fn pause(&mut self, reason: String) {
        let capacity = self.memo.capacity as usize;
        let budget = capacity.saturating_sub(self.params().min_healthy_of(capacity));
        if self.memo.failed.len() > budget {
            let reason = format!(
                "{reason}; {} instances failed, more than the {budget} --min-healthy leaves room for: the cycle stops",
                self.memo.failed.len()
            );
            self.out.alert = Some(reason.clone());
            return self.end(State::Failed, reason);
        }
        self.note("*", "failed_batch", reason.clone());
        self.out.alert = Some(format!(
            "{reason}; the cycle waits: `handler operation resume {id}` goes on (those instances are the healer's), `handler operation abort {id}` stops",
            id = self.out.op.id
        ));
        self.out.op.state = State::Paused;
        self.out.op.step = "failed_batch".into();
        self.out.op.last_error = Some(reason);
        self.wait("the operator: resume or abort".into(), None);
    }

    fn next_batch(&mut self) {
        if let Some(at) = self.memo.next_batch_at.filter(|t| *t > self.now) {
            return self.wait("the pause between batches".into(), Some(at));
        }
        self.memo.next_batch_at = None;
        let present = self.present();
        let (remaining, gone): (Vec<String>, Vec<String>) = self
            .memo
            .todo
            .iter()
            .cloned()
            .partition(|id| present.contains_key(id.as_str()));
        drop(present);
        for id in &gone {
            self.note(id, "skipped", "gone before its turn".into());
        }
        self.memo.skipped.extend(gone);
        self.memo.todo = remaining;
        if self.memo.todo.is_empty() {
            return self.finish();
        }
        let eligible: Vec<String> = self
            .memo
            .todo
            .iter()
            .filter(|id| !self.view.incidents.contains(id.as_str()))
            .cloned()
            .collect();
        if eligible.is_empty() {
            // What is left is the healer's: an operation never acts on an instance with an open
            // incident, and waiting on the healer could last forever.
            let left = std::mem::take(&mut self.memo.todo);
            for id in &left {
                self.note(
                    id,
                    "skipped",
                    "an incident of the healer's is open on it".into(),
                );
            }
            self.memo.skipped.extend(left);
            return self.finish();
        }
        let params = self.params().clone();
        let capacity = self.memo.capacity as usize;
        let size = params.batch_size(capacity);
        let keep = params.min_healthy_of(capacity);
        let mut picked: Vec<String> = Vec::new();
        if params.action == Action::Replace {
            // New instances come first: availability never drops.
            let mut ordered = eligible.clone();
            ordered.sort_by_key(|id| self.healthy(id));
            picked = ordered.into_iter().take(size).collect();
        } else {
            let present = self.present();
            let mut healthy = present.keys().filter(|id| self.healthy(id)).count();
            if self.dry() {
                healthy += self.memo.surge.as_ref().map_or(0, |s| s.n as usize);
            }
            let mut room = healthy.saturating_sub(keep);
            let (sick, well): (Vec<&String>, Vec<&String>) =
                eligible.iter().partition(|id| !self.healthy(id));
            picked.extend(sick.into_iter().take(size).cloned());
            for id in well {
                if picked.len() >= size || room == 0 {
                    break;
                }
                picked.push(id.clone());
                room -= 1;
            }
            let wanted = size.min(eligible.len());
            if picked.len() < wanted && self.memo.surge.is_none() {
                let cap = params.max_surge.map_or(size, |n| n as usize);
                let n = (wanted - picked.len()).min(cap) as u32;
                if n > 0 {
                    return self.start_surge(n);
                }
            }
        }
        if picked.is_empty() {
            let since = *self.memo.short_since.get_or_insert(self.now);
            let until = since + params.timeout;
            if self.now > until {
                self.memo.short_since = None;
                return self.pause(format!(
                    "fewer than {} instances healthy for {} s: no batch could start without going below --min-healthy",
                    keep + 1,
                    params.timeout.whole_seconds()
                ));
            }
            return self.wait(
                format!("healthy instances: {keep} must stay healthy, none to spare"),
                Some(until),
            );
        }
        self.memo.short_since = None;
        self.start_batch(picked, &params);
    }

    fn start_surge(&mut self, n: u32) {
        let before: Vec<String> = self.present().keys().map(|s| s.to_string()).collect();
        let deadline = self.now + self.params().timeout;
        self.note(
            "*",
            "surge",
            format!(
                "adding {n} instances first: --min-healthy leaves no healthy instance to spare"
            ),
        );
        self.memo.surge = Some(Surge {
            n,
            stage: SurgeStage::Growing,
            calls: vec![Sent::new(Verb::Grow, Vec::new(), n)],
            deadline,
            before,
            added: Vec::new(),
        });
        self.out.op.step = "surge".into();
        self.out.resync = true;
        self.wait(
            format!("surge: {n} new instances to come up healthy"),
            Some(deadline),
        );
    }

    fn start_batch(&mut self, picked: Vec<String>, params: &Params) {
        self.memo.batches += 1;
        let number = self.memo.batches;
        let deadline = self.now + params.timeout;
        let picked_set: BTreeSet<&String> = picked.iter().collect();
        self.memo.todo.retain(|id| !picked_set.contains(id));
        let (stage, calls, before, verb) = match params.action {
            Action::Replace => (
                Stage::Grow,
                vec![Sent::new(Verb::Grow, Vec::new(), picked.len() as u32)],
                self.present().keys().map(|s| s.to_string()).collect(),
                "replace",
            ),
            // A Flexible scale set's VMs are reimaged one per call (the VM API).
            Action::Reimage if self.view.flexible => (
                Stage::Act,
                picked
                    .iter()
                    .map(|id| Sent::new(Verb::Reimage, vec![id.clone()], 0))
                    .collect(),
                Vec::new(),
                "reimage",
            ),
            Action::Reimage => (
                Stage::Act,
                vec![Sent::new(Verb::Reimage, picked.clone(), 0)],
                Vec::new(),
                "reimage",
            ),
            Action::Upgrade => (
                Stage::Act,
                vec![Sent::new(Verb::Upgrade, picked.clone(), 0)],
                Vec::new(),
                "upgrade",
            ),
        };
        for id in &picked {
            let health = if self.healthy(id) {
                "healthy"
            } else {
                "unhealthy"
            };
            self.note(
                id,
                "batch",
                format!("batch {number}: {verb} ({health} before)"),
            );
        }
        self.out.op.holds = picked.clone();
        self.out.op.step = format!("batch {number}");
        self.out.resync = true;
        self.wait(
            format!(
                "batch {number}: {} instances to {verb} and return healthy",
                picked.len()
            ),
            Some(deadline),
        );
        self.memo.batch = Some(Batch {
            number,
            instances: picked,
            stage,
            calls,
            deadline,
            before,
        });
    }

    /// Every instance had its turn: the surge goes back, then the cycle is over.
    fn finish(&mut self) {
        if let Some(surge) = self.memo.surge.clone() {
            match surge.stage {
                SurgeStage::Up => {
                    let present = self.present();
                    let ours: Vec<String> = surge
                        .added
                        .iter()
                        .filter(|id| present.contains_key(id.as_str()))
                        .cloned()
                        .collect();
                    drop(present);
                    if !ours.is_empty() {
                        self.note(
                            "*",
                            "give_back",
                            format!("giving the surge back: deleting {}", ours.join(", ")),
                        );
                        let deadline = self.now + self.params().timeout;
                        if let Some(s) = self.memo.surge.as_mut() {
                            s.stage = SurgeStage::GivingBack;
                            s.calls = vec![Sent::new(Verb::Delete, ours, 0)];
                            s.deadline = deadline;
                        }
                        self.out.op.step = "give back".into();
                        self.out.resync = true;
                        return self.wait("the surge to be given back".into(), Some(deadline));
                    }
                }
                SurgeStage::GivingBack => {
                    if let Some(error) = surge.calls.iter().find_map(|c| c.failed()) {
                        let reason = format!(
                            "giving the surge back failed ({error}): delete {} by hand",
                            surge
                                .calls
                                .iter()
                                .flat_map(|c| c.instances.clone())
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                        self.out.alert = Some(reason.clone());
                        self.out.op.last_error = Some(reason);
                    } else if !surge.calls.iter().all(|c| c.ended_at().is_some())
                        && self.now <= surge.deadline
                    {
                        return self
                            .wait("the surge to be given back".into(), Some(surge.deadline));
                    }
                }
                SurgeStage::Growing => {}
            }
        }
        let summary = format!(
            "cycle done: {} cycled, {} failed (left to the healer), {} skipped",
            self.out.op.done,
            self.memo.failed.len(),
            self.memo.skipped.len()
        );
        self.note("*", "succeeded", summary);
        self.out.op.state = State::Succeeded;
        self.out.op.step = "done".into();
        self.out.op.holds.clear();
        self.out.op.waiting = None;
        self.out.op.wait_until = None;
    }

    fn end(&mut self, state: State, reason: String) {
        self.note("*", state.as_str(), reason.clone());
        self.out.op.state = state;
        self.out.op.step = state.as_str().into();
        self.out.op.holds.clear();
        self.out.op.last_error = Some(reason);
        self.out.op.waiting = None;
        self.out.op.wait_until = None;
    }
}

/// When a call whose status could not be read (or was never given) ended, by what the mirror
/// shows: a reimage or upgrade when each of its instances finished an operation after it was sent;
/// a grow when the instances it added are there; a delete when its instances are gone.
fn landed(
    call: &Sent,
    sent_at: OffsetDateTime,
    present: &HashMap<String, MirroredInstance>,
    before: &[String],
) -> Option<OffsetDateTime> {
    let busy = |m: &MirroredInstance| {
        m.instance
            .provisioning_state
            .as_deref()
            .is_some_and(|p| operation_in_progress(&p.to_ascii_lowercase()))
    };
    match call.verb {
        Verb::Reimage | Verb::Upgrade => {
            let mut last = sent_at;
            for id in &call.instances {
                if let Some(m) = present.get(id) {
                    let at = m.instance.provisioned_at.filter(|t| *t >= sent_at)?;
                    if busy(m) {
                        return None;
                    }
                    last = last.max(at);
                }
            }
            Some(last)
        }
        Verb::Grow => {
            let before: HashSet<&str> = before.iter().map(String::as_str).collect();
            let new: Vec<&MirroredInstance> = present
                .iter()
                .filter(|(id, _)| !before.contains(id.as_str()))
                .map(|(_, m)| m)
                .collect();
            (new.len() >= call.grow as usize && !new.iter().any(|m| busy(m)))
                .then(|| new.iter().map(|m| m.synced_at).max().unwrap_or(sent_at))
        }
        Verb::Delete => call
            .instances
            .iter()
            .all(|id| !present.contains_key(id))
            .then_some(sent_at),
    }
}

#[cfg(test)]
mod tests;
