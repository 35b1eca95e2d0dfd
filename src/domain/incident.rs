//! An incident: one repair episode of one target, a small state machine persisted in a row and
//! advanced by the timer — steps, their Compute calls followed to the end, deadlines, outcomes. The
//! row is also the claim: a pass acts on a target only after replacing the row it read (by
//! version), so two overlapping passes never act on one target twice.
//!
//! A step's life: `Sending` (claimed; the call is going out) → `Running` (ARM accepted it; its
//! long-running operation is followed) → `Succeeded` (the instance then has until the deadline to
//! be healthy) or `Failed` (ARM's operation failed, or ARM refused the call: the attempt is spent).
//! A call ARM did not take but may take later (busy, stale, throttled, a server error, or a batch
//! to split) leaves the step `Pending`, to be sent again without spending an attempt, until the
//! deadline. A step whose answer never came stays `Sending`: it is never sent twice.

use crate::compute::{ArmError, OperationRef};
use crate::policy::RepairAction;
use serde::Serialize;
use time::OffsetDateTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// A step was decided and has until `deadline` to work.
    Repairing,
    /// Every allowed attempt failed; nothing more is done until the target recovers or goes.
    GivenUp,
    /// Over: the target recovered or was removed.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// Healthy again after a restart or reimage (or by itself after a give-up).
    Recovered,
    /// Gone after a delete or replace (or removed by someone else).
    Removed,
}

impl Resolution {
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Recovered => "recovered",
            Resolution::Removed => "removed",
        }
    }
}

/// Where the current step's Compute call stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Decided, not (yet) taken by ARM: sent again by a later pass, no attempt spent.
    Pending,
    /// Claimed and being sent; if it stays so, the answer was lost and it is not sent again.
    Sending,
    /// Accepted; its long-running operation runs.
    Running,
    /// The operation ended `Succeeded`.
    Succeeded,
    /// The operation ended `Failed`/`Canceled`, or ARM refused the call: the step is spent.
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Sending => "sending",
            Phase::Running => "running",
            Phase::Succeeded => "succeeded",
            Phase::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(Phase::Pending),
            "sending" => Some(Phase::Sending),
            "running" => Some(Phase::Running),
            "succeeded" => Some(Phase::Succeeded),
            "failed" => Some(Phase::Failed),
            _ => None,
        }
    }
}

/// Which part of its action the step is in. Only `replace` has more than one: it surges first
/// (capacity + n, `If-Match` on a fresh read) and deletes the broken instance once the new one is
/// mirrored; where the scale set cannot grow it deletes first and restores the capacity after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The action itself (restart, start, reimage, delete).
    Act,
    Surge,
    /// Delete the broken instance once the surge has succeeded.
    Delete,
    /// The scale set could not grow: delete first…
    DeleteFirst,
    /// …then raise the capacity back.
    Restore,
    /// A stateful set's replace: handed to a stateful replacement operation, which carries the
    /// instance's data disks to the new VM before the broken one goes.
    Carry,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Act => "act",
            Stage::Surge => "surge",
            Stage::Delete => "delete",
            Stage::DeleteFirst => "delete_first",
            Stage::Restore => "restore",
            Stage::Carry => "carry",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "act" => Some(Stage::Act),
            "surge" => Some(Stage::Surge),
            "delete" => Some(Stage::Delete),
            "delete_first" => Some(Stage::DeleteFirst),
            "restore" => Some(Stage::Restore),
            "carry" => Some(Stage::Carry),
            _ => None,
        }
    }
}

/// The Compute call a step makes. `Grow` is the only write to the scale set itself; the rest are
/// actions on its instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Call {
    Delete,
    Restart,
    Start,
    Reimage,
    Redeploy,
    Grow,
    /// Start the stateful replacement operation (a table write; its calls are the operation's).
    Carry,
}

impl Call {
    pub fn as_str(self) -> &'static str {
        match self {
            Call::Delete => "delete",
            Call::Restart => "restart",
            Call::Start => "start",
            Call::Reimage => "reimage",
            Call::Redeploy => "redeploy",
            Call::Grow => "grow",
            Call::Carry => "carry",
        }
    }
}

/// Why a step waits to be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hold {
    /// Another operation runs on the instance or the scale set (409 `Conflict`, `Updating`).
    Busy,
    /// The scale set changed between our read and our write (412).
    Stale,
    /// A server error: the call was answered and not carried out.
    Transient,
    /// Its batch was refused: it goes in a call of its own, so one bad instance blocks no other.
    Alone,
}

impl Hold {
    pub fn as_str(self) -> &'static str {
        match self {
            Hold::Busy => "busy",
            Hold::Stale => "stale",
            Hold::Transient => "transient",
            Hold::Alone => "alone",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "busy" => Some(Hold::Busy),
            "stale" => Some(Hold::Stale),
            "transient" => Some(Hold::Transient),
            "alone" => Some(Hold::Alone),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Incident {
    pub id: String,
    pub target: String,
    #[serde(with = "time::serde::rfc3339")]
    pub opened_at: OffsetDateTime,
    /// The reason label the incident was opened for.
    pub cause: String,
    pub state: State,
    /// The number of the current step (1 for the first); a step that is only waiting to be sent
    /// keeps its number.
    pub attempt: u32,
    pub action: Option<RepairAction>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub step_started: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub deadline: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub ended_at: Option<OffsetDateTime>,
    pub resolution: Option<Resolution>,
    pub phase: Phase,
    pub stage: Stage,
    pub hold: Option<Hold>,
    /// The status URL of the step's running operation.
    pub operation: Option<OperationRef>,
    /// When the step's operation ended (ARM's `endTime`, else when we saw it).
    #[serde(with = "time::serde::rfc3339::option")]
    pub settled_at: Option<OffsetDateTime>,
    /// ARM's error of the last failure of this incident's steps.
    pub error: Option<ArmError>,
    /// A replace added capacity for this target already: a retry deletes without surging again.
    pub surged: bool,
    /// Decided under `HEALER_DRY_RUN`: nothing was called, and live passes ignore it.
    pub dry_run: bool,
    /// When the pass that claimed the current call was about to send it. A call still `Sending`
    /// once that pass is surely over (its deadline and one call later) had its answer lost, or was
    /// never sent: which, the instance's state says.
    #[serde(with = "time::serde::rfc3339::option")]
    pub sent_at: Option<OffsetDateTime>,
    /// How many times the current step's call was found not to have landed after its answer was
    /// lost: the first is sent again, the second spends the attempt.
    pub unanswered: u32,
}

/// A stored value with the version (ETag) it was read at: the claim token.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    pub version: String,
}

impl Incident {
    /// A new incident whose first step starts now.
    pub fn open(
        target: &str,
        cause: &str,
        action: RepairAction,
        now: OffsetDateTime,
        timeout: time::Duration,
    ) -> Self {
        Incident {
            id: format!("{target}-{}", now.unix_timestamp()),
            target: target.to_string(),
            opened_at: now,
            cause: cause.to_string(),
            state: State::Repairing,
            attempt: 1,
            action: Some(action),
            step_started: Some(now),
            deadline: Some(now + timeout),
            ended_at: None,
            resolution: None,
            phase: Phase::Sending,
            stage: first_stage(action, false),
            hold: None,
            operation: None,
            settled_at: None,
            error: None,
            surged: false,
            dry_run: false,
            sent_at: None,
            unanswered: 0,
        }
    }

    /// The next step of this incident, starting now.
    pub fn escalate(
        &self,
        action: RepairAction,
        now: OffsetDateTime,
        timeout: time::Duration,
    ) -> Self {
        Incident {
            state: State::Repairing,
            attempt: self.attempt + 1,
            action: Some(action),
            step_started: Some(now),
            deadline: Some(now + timeout),
            phase: Phase::Sending,
            stage: first_stage(action, self.surged),
            hold: None,
            operation: None,
            settled_at: None,
            unanswered: 0,
            ..self.clone()
        }
    }

    /// The same step, sent again (it was pending).
    pub fn resend(&self) -> Self {
        Incident {
            phase: Phase::Sending,
            operation: None,
            ..self.clone()
        }
    }

    /// The next stage of a replace, starting now, within the step's deadline.
    pub fn advance(&self, stage: Stage) -> Self {
        Incident {
            phase: Phase::Sending,
            stage,
            hold: None,
            operation: None,
            settled_at: None,
            unanswered: 0,
            ..self.clone()
        }
    }

    pub fn close(&self, resolution: Resolution, now: OffsetDateTime) -> Self {
        Incident {
            state: State::Closed,
            ended_at: Some(now),
            resolution: Some(resolution),
            ..self.clone()
        }
    }

    pub fn give_up(&self, now: OffsetDateTime) -> Self {
        Incident {
            state: State::GivenUp,
            ended_at: Some(now),
            ..self.clone()
        }
    }

    /// ARM accepted the call.
    pub fn accepted(&self, operation: Option<OperationRef>) -> Self {
        Incident {
            phase: Phase::Running,
            hold: None,
            operation,
            ..self.clone()
        }
    }

    /// ARM did not take the call, but may later.
    pub fn pending(&self, hold: Hold, error: Option<ArmError>) -> Self {
        Incident {
            phase: Phase::Pending,
            hold: Some(hold),
            operation: None,
            error: error.or_else(|| self.error.clone()),
            ..self.clone()
        }
    }

    /// The call's answer was lost and the instance shows it did not land: sent again once, and
    /// the attempt is spent the next time.
    pub fn unanswered_again(&self) -> Self {
        Incident {
            phase: Phase::Sending,
            operation: None,
            unanswered: self.unanswered + 1,
            ..self.clone()
        }
    }

    /// The claiming pass is about to send the call.
    pub fn sending_at(&self, now: OffsetDateTime) -> Self {
        Incident {
            sent_at: Some(now),
            ..self.clone()
        }
    }

    /// The step is spent: ARM refused it, or its operation failed.
    pub fn failed(&self, error: ArmError, now: OffsetDateTime) -> Self {
        Incident {
            phase: Phase::Failed,
            hold: None,
            settled_at: Some(now),
            error: Some(error),
            ..self.clone()
        }
    }

    /// The step's operation succeeded at `at`.
    pub fn succeeded(&self, at: OffsetDateTime) -> Self {
        Incident {
            phase: Phase::Succeeded,
            settled_at: Some(at),
            surged: self.surged || self.stage == Stage::Surge,
            ..self.clone()
        }
    }

    /// How the journal names the end of a closed incident: `recovered`, or for a removed target
    /// what removed it — `replaced`, `deleted`, or `removed` when it was not our step.
    pub fn closing(&self) -> &'static str {
        match (self.resolution, self.action) {
            (Some(Resolution::Recovered), _) => "recovered",
            (Some(Resolution::Removed), Some(RepairAction::Replace)) => "replaced",
            (Some(Resolution::Removed), Some(RepairAction::Delete)) => "deleted",
            (Some(Resolution::Removed), _) => "removed",
            (None, _) => "open",
        }
    }

    /// The same step as a stateful set takes it: a replace is handed to the stateful replacement
    /// (which surges, carries the disks, and deletes) instead of surging itself.
    pub fn stateful(self) -> Self {
        if self.action == Some(RepairAction::Replace) {
            Incident {
                stage: Stage::Carry,
                ..self
            }
        } else {
            self
        }
    }

    /// The step's deadline has passed.
    pub fn timed_out(&self, now: OffsetDateTime) -> bool {
        self.deadline.is_some_and(|d| now > d)
    }

    /// A step is under way: not failed, and its deadline has not passed.
    pub fn in_flight(&self, now: OffsetDateTime) -> bool {
        self.state == State::Repairing && self.phase != Phase::Failed && !self.timed_out(now)
    }

    /// Its call went out and may still be changing the target (or the scale set).
    pub fn call_in_flight(&self) -> bool {
        self.state == State::Repairing && matches!(self.phase, Phase::Sending | Phase::Running)
    }

    /// The Compute call of the current step.
    pub fn call(&self) -> Option<Call> {
        Some(match self.stage {
            Stage::Surge | Stage::Restore => Call::Grow,
            Stage::Delete | Stage::DeleteFirst => Call::Delete,
            Stage::Carry => Call::Carry,
            Stage::Act => match self.action? {
                RepairAction::Delete | RepairAction::Replace => Call::Delete,
                RepairAction::Restart => Call::Restart,
                RepairAction::Start => Call::Start,
                RepairAction::Reimage => Call::Reimage,
                RepairAction::Redeploy => Call::Redeploy,
            },
        })
    }

    /// A delete of ours may be removing the target (sent, running, or done and not yet mirrored),
    /// or has removed it and the capacity is being restored: a healthy heartbeat then does not
    /// close the incident as recovered.
    pub fn deleting(&self) -> bool {
        self.state == State::Repairing
            && (self.stage == Stage::Restore
                || (matches!(self.call(), Some(Call::Delete | Call::Carry))
                    && matches!(
                        self.phase,
                        Phase::Sending | Phase::Running | Phase::Succeeded
                    )))
    }
}

/// The stage a step of `action` starts in: a replace surges, unless it already did.
fn first_stage(action: RepairAction, surged: bool) -> Stage {
    match action {
        RepairAction::Replace if surged => Stage::Delete,
        RepairAction::Replace => Stage::Surge,
        _ => Stage::Act,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;
    use time::Duration;

    #[test]
    fn an_incident_walks_its_steps() {
        let t0 = datetime!(2026-11-22 12:00 UTC);
        let timeout = Duration::minutes(15);
        let i = Incident::open("7", "silent", RepairAction::Restart, t0, timeout);
        assert_eq!(
            (i.state, i.attempt, i.deadline, i.phase, i.call()),
            (
                State::Repairing,
                1,
                Some(t0 + timeout),
                Phase::Sending,
                Some(Call::Restart)
            )
        );
        assert!(i.in_flight(t0 + Duration::minutes(14)));
        assert!(!i.in_flight(t0 + Duration::minutes(16)));
        let j = i.escalate(RepairAction::Replace, t0 + Duration::minutes(16), timeout);
        assert_eq!(
            (j.attempt, j.action, j.id.as_str(), j.stage, j.call()),
            (
                2,
                Some(RepairAction::Replace),
                i.id.as_str(),
                Stage::Surge,
                Some(Call::Grow)
            )
        );
        let done = j.close(Resolution::Removed, t0 + Duration::minutes(20));
        assert_eq!(
            (done.state, done.resolution),
            (State::Closed, Some(Resolution::Removed))
        );
        assert!(!done.in_flight(t0 + Duration::minutes(20)));
        assert_eq!(done.closing(), "replaced");
        let restarted = i.close(Resolution::Removed, t0);
        assert_eq!(
            restarted.closing(),
            "removed",
            "a restarted VM that vanished"
        );
        assert_eq!(i.close(Resolution::Recovered, t0).closing(), "recovered");
        assert_eq!(j.give_up(t0 + Duration::hours(1)).state, State::GivenUp);
    }

    #[test]
    fn a_failed_step_is_over_before_its_deadline_and_a_surge_is_remembered() {
        let t0 = datetime!(2026-11-22 12:00 UTC);
        let timeout = Duration::minutes(15);
        let arm = ArmError {
            status: 200,
            code: "OperationPreempted".into(),
            message: "preempted".into(),
        };
        let i = Incident::open("7", "silent", RepairAction::Replace, t0, timeout);
        let surged = i.accepted(None).succeeded(t0 + Duration::minutes(1));
        assert!(surged.surged && surged.in_flight(t0 + Duration::minutes(2)));
        let deleting = surged.advance(Stage::Delete);
        assert_eq!(deleting.call(), Some(Call::Delete));
        assert!(deleting.deleting());
        let failed = deleting.failed(arm.clone(), t0 + Duration::minutes(3));
        assert!(
            !failed.in_flight(t0 + Duration::minutes(3)),
            "failed is over"
        );
        let retry = failed.escalate(RepairAction::Replace, t0 + Duration::minutes(3), timeout);
        assert_eq!(
            (retry.stage, retry.attempt, retry.error.as_ref()),
            (Stage::Delete, 2, Some(&arm)),
            "the surge stands: the retry only deletes"
        );
        let pending = i.pending(Hold::Busy, None);
        assert!(pending.in_flight(t0) && !pending.call_in_flight() && !pending.deleting());
    }
}
