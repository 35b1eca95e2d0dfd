//! The blue/green swap (issue 16): the traffic of one scale set (`from`) moved to another (`to`)
//! with no moment where fewer instances serve than at the start, and a way back until the old
//! set is let go.
//!
//! 1. Preflight: both sets mirrored, one region, `to` at zero (or already at the capacity), and
//!    at most one autoscale setting on each — `to`'s disabled, or it would fight the scale-out.
//!    The settings are journaled.
//! 2. Scale-out: `to` to `from`'s capacity (or `--capacity`), with `If-Match` on a fresh read and
//!    refused if `to` changed since the preflight.
//! 3. Soak: every `to` instance healthy by *our* verdict (a heartbeat UP sent after the scale-out
//!    ended) and staying so for `--soak`; brakes hold it, `--timeout` bounds it.
//! 4. Move autoscale: `to`'s setting takes `from`'s profiles, then `from`'s is disabled (a
//!    setting's target cannot change: `crate::autoscale`). Only then is `from` scaled in: its
//!    own enabled setting would scale it back up.
//! 5. Scale-in: `from` to zero; with terminate notifications its instances drain first.
//!
//! Any failure before the scale-in is accepted rolls back: the autoscale writes undone, `to` back
//! to its capacity, `from` untouched, an alert. After it, `handler swap` the other way is the way
//! back. The sample workflow this replaces (Azure-Samples' vmscalesets) scaled out and in with no
//! health wait between and no way back.
//!
//! Pure: [`advance`] is (operation, both sets as the pass sees them, autoscale settings when read,
//! call statuses, now) → the next row; `passes::operate` sends what it decides.

#[cfg(test)]
mod tests;

use super::step::{self, Advance, CallState, Note, Status};
use super::{Operation, State};
use crate::autoscale::{move_writes, targeting, AutoscaleSetting, Write};
use crate::heartbeat::Heartbeat;
use crate::mirror::{MirroredInstance, ScaleSetRecord};
use crate::policy::parse_duration;
use crate::scaleset::ScaleSetId;
use crate::verdict::Verdict;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use time::{Duration, OffsetDateTime};

/// The swap's parameters, as the operation's row keeps them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Params {
    /// The set that takes over (its key).
    pub to: String,
    /// Instances `to` serves with (none: `from`'s capacity at the start).
    pub capacity: Option<u32>,
    /// How long every `to` instance must stay healthy before `from` is let go (seconds).
    pub soak_s: i64,
    /// How long `to` has to come up healthy (seconds).
    pub timeout_s: i64,
    pub dry_run: bool,
}

/// The command line's values, unparsed.
#[derive(Debug, Clone, Default)]
pub struct Raw<'a> {
    pub capacity: Option<&'a str>,
    pub soak: Option<&'a str>,
    pub timeout: Option<&'a str>,
    pub dry_run: bool,
}

/// Reads the parameters; every problem at once.
pub fn parse(raw: &Raw, to: &ScaleSetId) -> Result<Params, Vec<String>> {
    let mut problems = Vec::new();
    let capacity = raw.capacity.and_then(|c| match c.trim().parse::<u32>() {
        Ok(n) if n > 0 => Some(n),
        _ => {
            problems.push(format!(
                "--capacity `{c}`: a whole number of instances, at least 1"
            ));
            None
        }
    });
    let mut duration =
        |name: &str, value: Option<&str>, default: &str, zero_ok: bool| match parse_duration(
            value.unwrap_or(default),
        ) {
            Ok(d) if d.is_zero() && !zero_ok => {
                problems.push(format!("{name}: more than zero"));
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                problems.push(format!("{name}: {e}"));
                None
            }
        };
    let soak = duration("--soak", raw.soak, "5m", true);
    let timeout = duration("--timeout", raw.timeout, "30m", false);
    match (soak, timeout) {
        (Some(soak), Some(timeout)) if problems.is_empty() => Ok(Params {
            to: to.key(),
            capacity,
            soak_s: soak.whole_seconds(),
            timeout_s: timeout.whole_seconds(),
            dry_run: raw.dry_run,
        }),
        _ => Err(problems),
    }
}

impl Params {
    pub fn from_stored(v: &serde_json::Value) -> Result<Params, String> {
        serde_json::from_value(v.clone())
            .map_err(|e| format!("stored swap parameters are unreadable: {e}: {v}"))
    }

    pub fn to_set(&self) -> Option<ScaleSetId> {
        ScaleSetId::from_key(&self.to)
    }
}

/// Which of the two scale sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    From,
    To,
}

/// What a call of the swap does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "act", rename_all = "snake_case")]
pub enum Act {
    /// Set a scale set's capacity (with `expect`: only if it is still that).
    Capacity {
        side: Side,
        capacity: u32,
        expect: Option<u32>,
    },
    /// Create or replace an autoscale setting.
    PutAutoscale { write: Write },
    /// Delete an autoscale setting the swap created (its rollback).
    DeleteAutoscale {
        subscription: String,
        resource_group: String,
        name: String,
    },
}

impl Act {
    pub fn describe(&self) -> String {
        match self {
            Act::Capacity { side, capacity, .. } => {
                format!("capacity of {} to {capacity}", side_name(*side))
            }
            Act::PutAutoscale { write } => format!("write autoscale setting {}", write.name),
            Act::DeleteAutoscale { name, .. } => format!("delete autoscale setting {name}"),
        }
    }
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::From => "from",
        Side::To => "to",
    }
}

/// One call, and where it stands.
pub type Call = super::step::Call<Act>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    #[default]
    Preflight,
    ScaleOut,
    Soak,
    Move,
    ScaleIn,
    RollBack,
}

impl Stage {
    fn label(self) -> &'static str {
        match self {
            Stage::Preflight => "preflight",
            Stage::ScaleOut => "scale-out",
            Stage::Soak => "soak",
            Stage::Move => "move autoscale",
            Stage::ScaleIn => "scale-in",
            Stage::RollBack => "rolling back",
        }
    }
}

/// The swap's own record of where it is, kept in the operation's row.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Memo {
    #[serde(default)]
    pub stage: Stage,
    /// The capacity `to` serves with.
    #[serde(default)]
    pub target: u32,
    #[serde(default)]
    pub from_capacity: u32,
    /// `to`'s capacity and instances at the start: what a rollback returns it to.
    #[serde(default)]
    pub to_before: u32,
    #[serde(default)]
    pub to_before_instances: Vec<String>,
    /// The calls of the current stage.
    #[serde(default)]
    pub calls: Vec<Call>,
    /// The autoscale writes that landed: a rollback undoes them, last first.
    #[serde(default)]
    pub written: Vec<Write>,
    /// Until when `to` may take to come up healthy.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub deadline: Option<OffsetDateTime>,
    /// When the scale-out ended: heartbeats sent before never count.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub scaled_out_at: Option<OffsetDateTime>,
    /// Since when every `to` instance has been healthy.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub healthy_since: Option<OffsetDateTime>,
    /// Why it rolls back.
    #[serde(default)]
    pub rollback: Option<String>,
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
            .map_err(|e| format!("the swap's stored progress is unreadable: {e}"))
    }
}

/// An operator's abort, when it rolls the swap back: it started, is not already rolling back, and
/// the old set's scale-in was not sent (from then on nothing is undone, as after a failure). The
/// memo that says so, which the next pass acts on.
pub fn abort(op: &Operation) -> Option<serde_json::Value> {
    step::abort(op, Memo::read(op), |m| {
        let undoable =
            m.rollback.is_none() && matches!(m.stage, Stage::ScaleOut | Stage::Soak | Stage::Move);
        m.aborted = undoable;
        undoable
    })
}

/// Whether the pass must read the autoscale settings of both sets' resource groups before
/// deciding: at the preflight (to check and journal them) and when they are moved (afresh: an
/// operator may have changed them during the soak).
pub fn needs_autoscale(op: &Operation) -> bool {
    if op.state == State::Pending {
        return true;
    }
    op.state == State::Running
        && Memo::read(op).is_ok_and(|m| m.stage == Stage::Move && m.calls.is_empty())
}

/// The capacity write a swap has sent on `set` and not yet seen end, if any: the healer's own
/// grows and deletes there wait for it.
pub fn write_in_flight(op: &Operation, set: &ScaleSetId) -> Option<crate::incident::Call> {
    if op.state.is_over() || op.dry_run {
        return None;
    }
    let memo = Memo::read(op).ok()?;
    let side = if op.scale_set == *set {
        Side::From
    } else if op.partner.as_ref() == Some(set) {
        Side::To
    } else {
        return None;
    };
    memo.calls.iter().find_map(|c| match (&c.act, &c.state) {
        (Act::Capacity { side: s, .. }, CallState::Sending { .. } | CallState::Accepted { .. })
            if *s == side =>
        {
            Some(crate::incident::Call::Grow)
        }
        _ => None,
    })
}

/// One scale set as the pass sees it.
pub struct SetView<'a> {
    pub record: Option<&'a ScaleSetRecord>,
    pub instances: &'a [MirroredInstance],
    pub heartbeats: &'a HashMap<String, Heartbeat>,
    pub verdicts: &'a HashMap<&'a str, Verdict>,
    /// The brake holding the set, in words, if one does.
    pub brake: Option<String>,
}

impl SetView<'_> {
    fn present(&self) -> Vec<&MirroredInstance> {
        self.instances
            .iter()
            .filter(|m| {
                !m.instance
                    .provisioning_state
                    .as_deref()
                    .is_some_and(|p| p.eq_ignore_ascii_case("deleting"))
            })
            .collect()
    }

    fn capacity(&self) -> Option<u32> {
        self.record
            .and_then(|r| r.capacity)
            .and_then(|c| u32::try_from(c).ok())
    }

    /// Healthy by our verdict, with a heartbeat sent after `since`.
    fn back_since(&self, id: &str, since: OffsetDateTime) -> bool {
        matches!(self.verdicts.get(id), Some(Verdict::Healthy))
            && self
                .heartbeats
                .get(id)
                .is_some_and(|hb| hb.event_time.min(hb.received_at) > since)
    }
}

/// What one pass sees of the swap's two scale sets.
pub struct View<'a> {
    pub from: SetView<'a>,
    /// `None`: `to` is not watched (any more).
    pub to: Option<SetView<'a>>,
    /// The autoscale settings of both sets' resource groups, when this pass read them (see
    /// [`needs_autoscale`]); `Err`: they could not be read.
    pub autoscale: Option<Result<Vec<AutoscaleSetting>, String>>,
    /// The status of each accepted call, by URL, read this pass.
    pub statuses: &'a HashMap<String, Status>,
    /// How long heartbeats get to come back once a brake releases.
    pub settle: Duration,
    pub dry_run: bool,
}

/// Advances a swap by one pass.
pub fn advance(op: &Operation, view: &View, now: OffsetDateTime) -> Advance {
    let mut s = Swap {
        view,
        now,
        out: Advance::of(op),
        memo: Memo::default(),
        params: None,
        to: None,
    };
    if !matches!(
        op.state,
        State::Pending | State::Running | State::RollingBack
    ) {
        return s.out;
    }
    match (Params::from_stored(&op.params), Memo::read(op)) {
        (Ok(p), Ok(m)) => {
            s.to = p.to_set();
            s.params = Some(p);
            s.memo = m;
            s.run();
        }
        (Err(e), _) | (_, Err(e)) => s.end(State::Failed, e),
    }
    s.out.finish(op, &s.memo, now)
}

struct Swap<'a, 'v> {
    view: &'a View<'v>,
    now: OffsetDateTime,
    out: Advance,
    memo: Memo,
    params: Option<Params>,
    to: Option<ScaleSetId>,
}

impl<'a, 'v> Swap<'a, 'v> {
    fn params(&self) -> &Params {
        self.params
            .as_ref()
            .unwrap_or_else(|| unreachable!("params are read before the swap runs"))
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

    fn step(&mut self, stage: Stage) {
        self.memo.stage = stage;
        self.memo.calls.clear();
        self.out.op.step = stage.label().into();
        self.out.op.waiting = None;
        self.out.op.wait_until = None;
        self.out.resync = true;
    }

    fn run(&mut self) {
        let Some(to_view) = self.view.to.as_ref() else {
            let why = format!(
                "{} is not a watched scale set any more (HEALER_SCALE_SETS)",
                self.params().to
            );
            return match self.memo.stage {
                Stage::Preflight => self.end(State::Failed, why),
                _ => self.pause(why),
            };
        };
        let brake = self
            .view
            .from
            .brake
            .clone()
            .map(|b| format!("from: {b}"))
            .or_else(|| to_view.brake.clone().map(|b| format!("to: {b}")));
        if let Some(brake) = brake {
            return self.hold(brake);
        }
        self.track();
        if self.memo.aborted && self.memo.rollback.is_none() {
            // The call in flight ends first: an undo sent beside it would meet a busy set.
            if let Some(on) = self.memo.calls.iter().find(|c| c.in_flight()) {
                let what = format!(
                    "{} to end before the roll-back an operator asked for",
                    on.act.describe()
                );
                return self.wait(what, None);
            }
            self.remember_landed_writes();
            return self.start_rollback("aborted by an operator".into());
        }
        match self.memo.stage {
            Stage::Preflight => self.preflight(),
            Stage::ScaleOut => self.scale_out(),
            Stage::Soak => self.soak(),
            Stage::Move => self.move_autoscale(),
            Stage::ScaleIn => self.scale_in(),
            Stage::RollBack => self.roll_back(),
        }
    }

    fn to_view(&self) -> &'a SetView<'v> {
        self.view
            .to
            .as_ref()
            .unwrap_or_else(|| unreachable!("run() returns first without `to`"))
    }

    /// A brake holds every step: no new call, the soak starts over (no heartbeat proves anything
    /// during a pipeline fault), and `to` gets time to be judged once it releases.
    fn hold(&mut self, brake: String) {
        self.memo.healthy_since = None;
        let (what, news) = step::hold(
            &self.out.op,
            &mut self.memo.deadline,
            &brake,
            self.now,
            self.view.settle,
        );
        if news {
            self.note("*", "held", format!("{what}; no step until it releases"));
        }
        let until = self.memo.deadline;
        self.wait(what, until);
    }

    /// What the status reads and the mirror say of the calls sent.
    fn track(&mut self) {
        let dry = self.dry();
        let now = self.now;
        let present = |side: Side| -> Option<u32> {
            match side {
                Side::From => Some(self.view.from.present().len() as u32),
                Side::To => self.view.to.as_ref().map(|t| t.present().len() as u32),
            }
        };
        let statuses = self.view.statuses;
        let mut lost = Vec::new();
        for (i, call) in self.memo.calls.iter_mut().enumerate() {
            // An autoscale write is synchronous and the same write again changes nothing: one
            // whose answer was lost is sent again. A capacity change never is (a second
            // scale-out would find `to` changed and roll back): the mirror tells.
            let repeatable = !matches!(call.act, Act::Capacity { .. });
            if let Some(sent_at) = call.state.settle(statuses, dry, repeatable, now) {
                lost.push((i, sent_at));
            }
        }
        for (i, sent_at) in lost {
            let Some(Act::Capacity { side, capacity, .. }) = self.memo.calls.get(i).map(|c| &c.act)
            else {
                continue;
            };
            if present(*side) == Some(*capacity) {
                self.memo.calls[i].state = CallState::Ended {
                    at: now.max(sent_at),
                };
            }
        }
    }

    fn preflight(&mut self) {
        let params = self.params().clone();
        let to_id = self.to.clone();
        let from = &self.view.from;
        let to = self.to_view();
        let mut problems = Vec::new();
        if to_id.is_none() {
            problems.push(format!("`{}` is not a scale set key", params.to));
        }
        let (from_loc, to_loc) = (
            from.record.and_then(|r| r.location.clone()),
            to.record.and_then(|r| r.location.clone()),
        );
        match (&from_loc, &to_loc) {
            (Some(a), Some(b)) if !a.eq_ignore_ascii_case(b) => problems.push(format!(
                "the sets are in different regions ({a}, {b}): a swap moves traffic within one region"
            )),
            (Some(_), Some(_)) => {}
            _ => problems.push(
                "the region of a set is not known yet: the mirror has not read it (monitor-state)"
                    .into(),
            ),
        }
        let from_capacity = from.capacity().unwrap_or(0);
        let to_capacity = to.capacity();
        let target = params.capacity.unwrap_or(from_capacity);
        if target == 0 {
            problems.push("the old set has no instances: give --capacity".into());
        }
        match to_capacity {
            None => problems.push("the new set's capacity is not known yet (monitor-state)".into()),
            Some(c) if c != 0 && c != target => problems.push(format!(
                "the new set has {c} instances: a swap starts from zero or from the capacity it swaps to ({target})"
            )),
            Some(_) => {}
        }
        let mut evidence = serde_json::Value::Null;
        match (&self.view.autoscale, &to_id) {
            (None, _) if self.dry() => {}
            (None, _) => problems.push("the autoscale settings were not read".into()),
            (Some(Err(e)), _) => {
                problems.push(format!("the autoscale settings could not be read: {e}"))
            }
            (Some(Ok(settings)), Some(to_id)) => {
                let on_from = targeting(settings, &self.out.op.scale_set);
                let on_to = targeting(settings, to_id);
                for (name, list) in [("old", &on_from), ("new", &on_to)] {
                    if list.len() > 1 {
                        problems.push(format!(
                            "the {name} set has {} autoscale settings ({}): which one to move is not clear",
                            list.len(),
                            list.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
                        ));
                    }
                }
                if let Some(b) = on_to.iter().find(|s| s.enabled) {
                    problems.push(format!(
                        "the new set's autoscale setting {} is enabled: it would fight the scale-out; disable it (the swap gives it the old set's profiles)",
                        b.name
                    ));
                }
                let read = serde_json::json!({
                    "from": on_from.iter().map(|s| &s.resource).collect::<Vec<_>>(),
                    "to": on_to.iter().map(|s| &s.resource).collect::<Vec<_>>(),
                });
                // A setting's notifications may name a webhook with its token in the query: the
                // journal keeps the settings, never a secret.
                evidence = serde_json::from_str(&crate::secret::redact(&read.to_string()))
                    .unwrap_or(serde_json::Value::Null);
            }
            (Some(Ok(_)), None) => {}
        }
        if !problems.is_empty() {
            return self.end(State::Failed, format!("preflight: {}", problems.join("; ")));
        }
        let to_before_instances: Vec<String> = to
            .present()
            .iter()
            .map(|m| m.instance.instance_id.clone())
            .collect();
        self.memo.target = target;
        self.memo.from_capacity = from_capacity;
        self.memo.to_before = to_capacity.unwrap_or(0);
        self.memo.to_before_instances = to_before_instances;
        self.memo.deadline = Some(self.now + Duration::seconds(params.timeout_s));
        self.out.op.state = State::Running;
        self.out.op.total = target;
        self.out.op.done = 0;
        let autoscale = match &evidence {
            serde_json::Value::Null => "autoscale settings not read (dry run)".to_string(),
            e => format!(
                "autoscale settings: old set {}, new set {}",
                list_names(&e["from"]),
                list_names(&e["to"])
            ),
        };
        self.out.notes.push(Note {
            instance: "*".into(),
            outcome: "started",
            reason: format!(
                "swap to {}: scale it to {target}, soak {} s, then let the old set ({from_capacity} instances) go; {autoscale}{}",
                self.to.as_ref().map(|t| t.name.as_str()).unwrap_or("?"),
                params.soak_s,
                if self.dry() { " (dry run: nothing is called)" } else { "" }
            ),
            evidence,
        });
        if self.memo.to_before == target {
            self.note(
                "*",
                "scaled_out",
                format!("the new set is at {target} already: no scale-out"),
            );
            self.memo.scaled_out_at = Some(self.out.op.started);
            return self.step(Stage::Soak);
        }
        self.step(Stage::ScaleOut);
        self.memo.calls.push(Call::new(Act::Capacity {
            side: Side::To,
            capacity: target,
            expect: Some(self.memo.to_before),
        }));
        self.hold_new_instances();
        self.wait(
            format!("the new set to be scaled to {target}"),
            self.memo.deadline,
        );
    }

    /// The new set's instances are the swap's while they are judged: the healer does not repair
    /// what a failed soak rolls back anyway.
    fn hold_new_instances(&mut self) {
        let mut ids: Vec<String> = self
            .to_view()
            .present()
            .iter()
            .map(|m| m.instance.instance_id.clone())
            .collect();
        ids.sort();
        self.out.op.partner_holds = ids;
    }

    fn scale_out(&mut self) {
        self.hold_new_instances();
        if let Some(error) = self.memo.calls.iter().find_map(Call::failed) {
            return self.start_rollback(format!("the scale-out of the new set failed: {error}"));
        }
        let target = self.memo.target;
        let present = self.to_view().present().len() as u32;
        let ended = self.memo.calls.iter().filter_map(Call::ended_at).max();
        match ended {
            Some(at) if self.dry() || present >= target => {
                self.note(
                    "*",
                    "scaled_out",
                    format!("the new set is at {target} instances; now each must be healthy"),
                );
                self.memo.scaled_out_at = Some(at);
                self.step(Stage::Soak);
                self.soak();
            }
            _ if self.past_deadline() => self.start_rollback(format!(
                "the new set did not reach {target} instances in time ({present} there)"
            )),
            _ => {
                let until = self.memo.deadline;
                self.wait(
                    format!("the new set to be scaled to {target} ({present} there)"),
                    until,
                )
            }
        }
    }

    fn past_deadline(&self) -> bool {
        self.memo.deadline.is_some_and(|d| self.now > d)
    }

    fn soak(&mut self) {
        self.hold_new_instances();
        let target = self.memo.target;
        let since = self.memo.scaled_out_at.unwrap_or(self.out.op.started);
        let soak = Duration::seconds(self.params().soak_s);
        let to = self.to_view();
        let present = to.present();
        let healthy = present
            .iter()
            .filter(|m| to.back_since(&m.instance.instance_id, since))
            .count() as u32;
        let all =
            self.dry() || (present.len() as u32 >= target && healthy as usize == present.len());
        self.out.op.done = if self.dry() {
            target
        } else {
            healthy.min(target)
        };
        if !all {
            if self.memo.healthy_since.take().is_some() {
                self.note(
                    "*",
                    "soak_broken",
                    format!(
                        "{healthy} of {} new instances healthy: the soak starts over",
                        present.len()
                    ),
                );
            }
            if self.past_deadline() {
                return self.start_rollback(format!(
                    "the new set did not become healthy within {} s: {healthy} of {target} instances healthy",
                    self.params().timeout_s
                ));
            }
            let until = self.memo.deadline;
            return self.wait(
                format!("the new set to be healthy: {healthy} of {target}"),
                until,
            );
        }
        // A dry run shows the steps, not the waits: there are no new instances to watch.
        let soak = if self.dry() { Duration::ZERO } else { soak };
        let start = *self.memo.healthy_since.get_or_insert(self.now);
        if start == self.now && !soak.is_zero() {
            self.note(
                "*",
                "healthy",
                format!(
                    "all {target} new instances are healthy; soaking {} s",
                    soak.whole_seconds()
                ),
            );
        }
        if self.now - start < soak {
            return self.wait(
                format!(
                    "the soak: every new instance healthy for {} s",
                    soak.whole_seconds()
                ),
                Some(start + soak),
            );
        }
        self.note(
            "*",
            "soaked",
            format!(
                "all {target} new instances stayed healthy for {} s",
                soak.whole_seconds()
            ),
        );
        self.out.op.partner_holds.clear();
        self.step(Stage::Move);
        self.move_autoscale();
    }

    /// Each autoscale write that landed is remembered for a rollback; the next is sent after it.
    fn remember_landed_writes(&mut self) {
        let landed: Vec<Write> = self
            .memo
            .calls
            .iter()
            .filter(|c| c.ended_at().is_some())
            .filter_map(|c| match &c.act {
                Act::PutAutoscale { write } => Some(write.clone()),
                _ => None,
            })
            .collect();
        for w in landed {
            if !self.memo.written.contains(&w) {
                self.note(
                    "*",
                    "autoscale_written",
                    format!("autoscale setting {} written", w.name),
                );
                self.memo.written.push(w);
            }
        }
    }

    fn move_autoscale(&mut self) {
        if let Some(error) = self.memo.calls.iter().find_map(Call::failed) {
            return self.start_rollback(format!("moving autoscale failed: {error}"));
        }
        self.remember_landed_writes();
        if self.memo.calls.is_empty() {
            let Some(to_id) = self.to.clone() else {
                return self.start_rollback("the new set's key is unreadable".into());
            };
            let writes = match &self.view.autoscale {
                None if self.dry() => {
                    self.note(
                        "*",
                        "autoscale_moved",
                        "dry run: the autoscale settings would be moved".into(),
                    );
                    return self.start_scale_in();
                }
                None => return self.wait("the autoscale settings to be read".into(), None),
                Some(Err(e)) => {
                    return self
                        .start_rollback(format!("the autoscale settings could not be read: {e}"))
                }
                Some(Ok(settings)) => {
                    let on_from = targeting(settings, &self.out.op.scale_set);
                    let on_to = targeting(settings, &to_id);
                    match (on_from.as_slice(), on_to.as_slice()) {
                        ([], _) => {
                            self.note(
                                "*",
                                "autoscale_moved",
                                "no autoscale setting targets the old set: nothing to move".into(),
                            );
                            return self.start_scale_in();
                        }
                        ([a], [] | [_]) => {
                            if let Some(b) = on_to.first().filter(|b| b.enabled) {
                                return self.start_rollback(format!(
                                    "the new set's autoscale setting {} was enabled during the swap",
                                    b.name
                                ));
                            }
                            move_writes(
                                a,
                                on_to.first().copied(),
                                &self.out.op.scale_set,
                                &to_id,
                                settings,
                            )
                        }
                        _ => {
                            return self.start_rollback(
                                "more than one autoscale setting targets a set now".into(),
                            )
                        }
                    }
                }
            };
            self.memo.calls = writes
                .into_iter()
                .map(|write| Call::new(Act::PutAutoscale { write }))
                .collect();
        }
        // One write at a time, in order: the new set's setting before the old one is disabled.
        let next = self.memo.calls.iter().position(|c| c.ended_at().is_none());
        match next {
            None => {
                let said = match self.memo.written.as_slice() {
                    [to, from] => format!(
                        "{} has the old set's profiles, {} is disabled",
                        to.name, from.name
                    ),
                    written => written
                        .iter()
                        .map(|w| w.name.clone())
                        .collect::<Vec<_>>()
                        .join(", "),
                };
                self.note(
                    "*",
                    "autoscale_moved",
                    format!("autoscale moved to the new set: {said}"),
                );
                self.start_scale_in();
            }
            Some(i) => {
                // Calls after the one in flight wait unsent.
                for (j, c) in self.memo.calls.iter_mut().enumerate() {
                    if j > i && c.state != CallState::Unsent {
                        c.state = CallState::Unsent;
                    }
                }
                self.out.op.waiting = Some("the autoscale settings to be written".into());
                self.out.op.wait_until = None;
            }
        }
    }

    fn start_scale_in(&mut self) {
        self.step(Stage::ScaleIn);
        self.memo.calls.push(Call::new(Act::Capacity {
            side: Side::From,
            capacity: 0,
            expect: None,
        }));
        let mut ids: Vec<String> = self
            .view
            .from
            .present()
            .iter()
            .map(|m| m.instance.instance_id.clone())
            .collect();
        ids.sort();
        self.out.op.holds = ids;
        self.note(
            "*",
            "scale_in",
            format!(
                "the old set to zero: its {} instances drain and go; no way back but a swap the other way",
                self.out.op.holds.len()
            ),
        );
        self.wait("the old set to be scaled to zero".into(), None);
    }

    /// Sendable calls of this stage: the pass sends those `Unsent` whose turn it is.
    fn scale_in(&mut self) {
        if let Some(error) = self.memo.calls.iter().find_map(Call::failed) {
            let error = error.to_string();
            self.out.alert = Some(format!(
                "swap: the new set serves at full capacity with autoscale, but the old set could not be scaled in: {error}; scale it in by hand, or `handler swap` the other way"
            ));
            return self.end(
                State::Failed,
                format!("the scale-in of the old set failed: {error}"),
            );
        }
        let left = self.view.from.present().len();
        let ended = self.memo.calls.iter().all(|c| c.ended_at().is_some());
        if ended && (self.dry() || left == 0) {
            self.out.op.done = self.memo.target;
            return self.end(
                State::Succeeded,
                format!(
                    "swapped: the new set serves with {} instances and autoscale, the old set is at zero",
                    self.memo.target
                ),
            );
        }
        self.wait(
            format!("the old set to be scaled to zero ({left} left, draining)"),
            None,
        );
    }

    fn start_rollback(&mut self, why: String) {
        self.note("*", "rollback", format!("rolling back: {why}"));
        if !self.memo.aborted {
            self.out.alert = Some(format!(
                "swap rolled back: {why}; the new set goes back to {} instances, the old set was not touched",
                self.memo.to_before
            ));
        }
        self.out.op.last_error = Some(why.clone());
        self.memo.rollback = Some(why);
        self.out.op.state = State::RollingBack;
        self.step(Stage::RollBack);
        let undo: Vec<Call> = self
            .memo
            .written
            .iter()
            .rev()
            .map(|w| match &w.before {
                Some(before) => Call::new(Act::PutAutoscale {
                    write: Write {
                        body: before.clone(),
                        before: None,
                        ..w.clone()
                    },
                }),
                None => Call::new(Act::DeleteAutoscale {
                    subscription: w.subscription.clone(),
                    resource_group: w.resource_group.clone(),
                    name: w.name.clone(),
                }),
            })
            .collect();
        self.memo.calls = undo;
        self.memo.calls.push(Call::new(Act::Capacity {
            side: Side::To,
            capacity: self.memo.to_before,
            expect: None,
        }));
        self.roll_back();
    }

    fn roll_back(&mut self) {
        if let Some(error) = self.memo.calls.iter().find_map(Call::failed) {
            let error = error.to_string();
            self.out.alert = Some(format!(
                "swap: the rollback failed ({error}); the new set may still have instances and autoscale settings may be moved: see the journal and fix by hand"
            ));
            return self.end(State::Failed, format!("the rollback failed: {error}"));
        }
        // Resumed after a pause, it is still rolling back.
        self.out.op.state = State::RollingBack;
        let to_before = self.memo.to_before;
        let left = self.to_view().present().len() as u32;
        let ended = self.memo.calls.iter().all(|c| c.ended_at().is_some());
        if ended && (self.dry() || left <= to_before) {
            let why = self.memo.rollback.clone().unwrap_or_default();
            self.out.op.partner_holds.clear();
            return self.end(
                if self.memo.aborted {
                    State::Aborted
                } else {
                    State::Failed
                },
                format!("rolled back ({why}): the new set is back at {to_before}, the old set untouched"),
            );
        }
        // Autoscale first (restored or deleted), then the capacity: one at a time, in order.
        if let Some(i) = self.memo.calls.iter().position(|c| c.ended_at().is_none()) {
            for (j, c) in self.memo.calls.iter_mut().enumerate() {
                if j > i && c.state != CallState::Unsent {
                    c.state = CallState::Unsent;
                }
            }
        }
        self.wait(
            format!("the new set to go back to {to_before} instances ({left} there)"),
            None,
        );
    }

    /// Stopped until an operator resumes or aborts it.
    fn pause(&mut self, reason: String) {
        self.note("*", "paused", reason.clone());
        self.out.alert = Some(format!("swap paused: {reason}"));
        self.out.op.state = State::Paused;
        self.out.op.last_error = Some(reason);
        self.wait("the operator: resume or abort".into(), None);
    }

    fn end(&mut self, state: State, reason: String) {
        if state == State::Failed && self.out.alert.is_none() && self.memo.stage == Stage::Preflight
        {
            self.out.alert = Some(format!("swap not started: {reason}"));
        }
        self.note("*", state.as_str(), reason.clone());
        self.out.op.state = state;
        self.out.op.step = state.as_str().into();
        self.out.op.holds.clear();
        self.out.op.partner_holds.clear();
        if state != State::Succeeded {
            self.out.op.last_error = Some(reason);
        }
        self.out.op.waiting = None;
        self.out.op.wait_until = None;
    }
}

/// Which calls the pass may send now: the first unended one that is unsent (calls go one at a
/// time, in order, so an autoscale write never overtakes the one before it).
pub fn sendable(memo: &Memo) -> Option<usize> {
    super::step::sendable(&memo.calls)
}

fn list_names(v: &serde_json::Value) -> String {
    let names: Vec<String> = v
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| AutoscaleSetting::from_arm(s.clone()))
                .map(|s| s.describe())
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}
