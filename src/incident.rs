//! An incident: one repair episode of one target, a small state machine persisted in a row and
//! advanced by the timer — steps, deadlines, outcomes. The row is also the claim: a pass acts on a
//! target only after replacing the row it read (by version), so two overlapping passes never act
//! on one target twice. Later long-running operations (rolling reimage, blue/green) reuse it.

use crate::policy::RepairAction;
use serde::Serialize;
use time::OffsetDateTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// A step was requested and has until `deadline` to work.
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

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Incident {
    pub id: String,
    pub target: String,
    #[serde(with = "time::serde::rfc3339")]
    pub opened_at: OffsetDateTime,
    /// The reason label the incident was opened for.
    pub cause: String,
    pub state: State,
    /// Steps taken so far (1 after the first repair).
    pub attempt: u32,
    pub action: Option<RepairAction>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub step_started: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub deadline: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub ended_at: Option<OffsetDateTime>,
    pub resolution: Option<Resolution>,
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

    /// A step is running and its deadline has not passed.
    pub fn in_flight(&self, now: OffsetDateTime) -> bool {
        self.state == State::Repairing && self.deadline.is_some_and(|d| now <= d)
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
            (i.state, i.attempt, i.deadline),
            (State::Repairing, 1, Some(t0 + timeout))
        );
        assert!(i.in_flight(t0 + Duration::minutes(14)));
        assert!(!i.in_flight(t0 + Duration::minutes(16)));
        let j = i.escalate(RepairAction::Replace, t0 + Duration::minutes(16), timeout);
        assert_eq!(
            (j.attempt, j.action, j.id.as_str()),
            (2, Some(RepairAction::Replace), i.id.as_str())
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
}
