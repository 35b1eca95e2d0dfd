//! Long-running operations (design §7): work that outlives one invocation — a rolling cycle of a
//! scale set, a blue/green swap, a golden image, a stateful replacement — each a row of the
//! `operations` table that `monitor-status` advances pass by pass, claimed by ETag like an
//! incident, resumed after any restart.
//!
//! This module is the operation itself and what an operator may do to it (pause, resume, abort):
//! pure, table-tested. The engine that advances each kind's steps builds on it.

pub mod carry;
pub mod cycle;
pub mod prototype;
pub mod step;
pub mod swap;

use crate::scaleset::ScaleSetId;
use serde::Serialize;
use time::OffsetDateTime;

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A rolling, health-gated reimage (or replace, or model upgrade) of a whole scale set.
    Cycle,
    /// A blue/green swap: the traffic of one scale set moved to another, health-gated.
    Swap,
    /// A golden image captured from a known-good instance, which the model then follows.
    Prototype,
    /// A stateful instance replaced with its data disks (and address) carried to the new one.
    Carry,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Cycle => "cycle",
            Kind::Swap => "swap",
            Kind::Prototype => "prototype",
            Kind::Carry => "carry",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cycle" => Some(Kind::Cycle),
            "swap" => Some(Kind::Swap),
            "prototype" => Some(Kind::Prototype),
            "carry" => Some(Kind::Carry),
            _ => None,
        }
    }
}

/// Where an operation stands (design §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Started by an operator, not yet taken up by a pass.
    Pending,
    Running,
    /// Held by an operator (or by a failed batch) until resumed.
    Paused,
    Succeeded,
    Failed,
    Aborted,
    /// Undoing what it did (a swap's way back).
    RollingBack,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Running => "running",
            State::Paused => "paused",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Aborted => "aborted",
            State::RollingBack => "rolling_back",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => State::Pending,
            "running" => State::Running,
            "paused" => State::Paused,
            "succeeded" => State::Succeeded,
            "failed" => State::Failed,
            "aborted" => State::Aborted,
            "rolling_back" => State::RollingBack,
            _ => return None,
        })
    }

    /// Over: nothing more is done, and the scale set is free for another operation.
    pub fn is_over(self) -> bool {
        matches!(self, State::Succeeded | State::Failed | State::Aborted)
    }
}

/// One operation, as its row holds it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Operation {
    /// `<kind>-<unix seconds>`: unique within its scale set, and sorted by start.
    pub id: String,
    pub scale_set: ScaleSetId,
    pub kind: Kind,
    pub state: State,
    /// The kind's own name for the step it is at (`preflight`, `surge`, `batch 3`, …).
    pub step: String,
    pub done: u32,
    pub total: u32,
    /// The instances it holds: the healer's repairs never touch them.
    pub holds: Vec<String>,
    /// The second scale set it holds (a swap's `to`): no other operation runs there either.
    pub partner: Option<ScaleSetId>,
    /// The partner's instances it holds.
    pub partner_holds: Vec<String>,
    /// The operator's parameters, as the command gave them.
    pub params: serde_json::Value,
    #[serde(with = "time::serde::rfc3339")]
    pub started: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated: OffsetDateTime,
    /// Until when the current step waits (an instance to come back, a pause between batches).
    #[serde(with = "time::serde::rfc3339::option")]
    pub wait_until: Option<OffsetDateTime>,
    pub last_error: Option<String>,
    /// What the current step waits for, in the operator's words (`batch 3: 2 of 4 back healthy`).
    pub waiting: Option<String>,
    /// The kind's own record of where it is (a cycle's [`cycle::Memo`]); not shown.
    #[serde(skip)]
    pub memo: serde_json::Value,
    /// Who asked for it, and why (the operator's note).
    pub requested_by: String,
    pub dry_run: bool,
}

/// What an operator may do to a running operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    Abort,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Abort => "abort",
        }
    }
}

/// Why a command cannot be carried out, in the operator's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("operation {id} is {state}: cannot {command} it")]
pub struct Refused {
    pub id: String,
    pub state: &'static str,
    pub command: &'static str,
}

impl Operation {
    /// A new operation, pending until a pass takes it up.
    pub fn new(
        kind: Kind,
        scale_set: ScaleSetId,
        params: serde_json::Value,
        requested_by: String,
        dry_run: bool,
        now: OffsetDateTime,
    ) -> Self {
        Operation {
            id: format!("{}-{}", kind.as_str(), now.unix_timestamp()),
            scale_set,
            kind,
            state: State::Pending,
            step: "pending".into(),
            done: 0,
            total: 0,
            holds: Vec::new(),
            partner: None,
            partner_holds: Vec::new(),
            params,
            started: now,
            updated: now,
            wait_until: None,
            last_error: None,
            waiting: None,
            memo: serde_json::Value::Null,
            requested_by,
            dry_run,
        }
    }

    /// The operation after an operator's command: a pause holds it where it is (its holds
    /// kept, so nothing else touches half-done instances), a resume takes it up again, an abort
    /// ends it and frees what it held. Over is over.
    pub fn command(&self, command: Command, now: OffsetDateTime) -> Result<Operation, Refused> {
        let refused = || Refused {
            id: self.id.clone(),
            state: self.state.as_str(),
            command: command.as_str(),
        };
        // An operation under way with an undo is undone, not left half-done: a stateful
        // replacement's disks back on the broken VM, a swap's new set back where it was, a golden
        // image's instance restored and nothing published. Aborting the undo stops it where it is;
        // a cycle's reimaged instances cannot be un-reimaged: it just stops.
        let undo = match (command, self.state) {
            (Command::Abort, State::Running | State::Paused) => match self.kind {
                Kind::Carry => carry::abort(self),
                Kind::Swap => swap::abort(self),
                Kind::Prototype => prototype::abort(self),
                Kind::Cycle => None,
            },
            _ => None,
        };
        let state = match (command, self.state) {
            (_, s) if s.is_over() => return Err(refused()),
            (Command::Pause, State::Pending | State::Running | State::RollingBack) => State::Paused,
            (Command::Resume, State::Paused) => State::Running,
            (Command::Abort, _) if undo.is_some() => State::RollingBack,
            (Command::Abort, _) => State::Aborted,
            _ => return Err(refused()),
        };
        Ok(Operation {
            state,
            updated: now,
            holds: if state == State::Aborted {
                Vec::new()
            } else {
                self.holds.clone()
            },
            partner_holds: if state == State::Aborted {
                Vec::new()
            } else {
                self.partner_holds.clone()
            },
            wait_until: if state == State::Running {
                None
            } else {
                self.wait_until
            },
            waiting: match state {
                State::Paused => Some("the operator: resume or abort".into()),
                State::Running => None,
                State::RollingBack => Some("the roll-back an operator asked for".into()),
                _ => self.waiting.clone(),
            },
            memo: undo.unwrap_or_else(|| self.memo.clone()),
            ..self.clone()
        })
    }

    /// `done of total`, for `handler status` and the operations list.
    pub fn progress(&self) -> String {
        let mut p = if self.total == 0 {
            self.step.clone()
        } else {
            format!("{} of {} ({})", self.done, self.total, self.step)
        };
        if let Some(w) = &self.waiting {
            p += &format!("; waiting for {w}");
            if let Some(until) = self.wait_until {
                p += &format!(" until {}", crate::journal::stamp(until));
            }
        }
        p
    }
}

impl Operation {
    /// Every scale set it holds, with the instances it holds there.
    pub fn held(&self) -> Vec<(&ScaleSetId, &[String])> {
        let mut out = vec![(&self.scale_set, self.holds.as_slice())];
        if let Some(p) = &self.partner {
            out.push((p, self.partner_holds.as_slice()));
        }
        out
    }

    /// The scale set it runs on, and a swap's second one: `r/web → r/web-green`.
    pub fn sets(&self) -> String {
        match &self.partner {
            Some(p) => format!("{} → {p}", self.scale_set),
            None => self.scale_set.to_string(),
        }
    }

    /// Whether it holds this scale set (as its own or as its partner).
    pub fn holds_set(&self, set: &ScaleSetId) -> bool {
        self.scale_set == *set || self.partner.as_ref() == Some(set)
    }
}

/// The grow or delete an operation has sent to the scale set and not yet seen end, if any: the
/// healer's own writes there wait for it (a scale set write preempts a running delete).
pub fn write_in_flight(op: &Operation, set: &ScaleSetId) -> Option<crate::incident::Call> {
    match op.kind {
        Kind::Cycle if op.scale_set == *set => cycle::write_in_flight(op),
        Kind::Cycle => None,
        Kind::Swap => swap::write_in_flight(op, set),
        Kind::Prototype if op.scale_set == *set => prototype::write_in_flight(op),
        Kind::Prototype => None,
        Kind::Carry if op.scale_set == *set => carry::write_in_flight(op),
        Kind::Carry => None,
    }
}

/// At most one operation per scale set that is not over (design §7): the one in the way, if any.
pub fn in_the_way(existing: &[Operation]) -> Option<&Operation> {
    existing.iter().find(|o| !o.state.is_over())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-12-01 10:00 UTC);

    fn op(state: State) -> Operation {
        let mut o = Operation::new(
            Kind::Cycle,
            ScaleSetId::new("s", "rg", "web"),
            serde_json::json!({"batch": "20%"}),
            "ops: monthly refresh".into(),
            false,
            T0,
        );
        o.state = state;
        o.holds = vec!["3".into(), "4".into()];
        o.wait_until = Some(T0 + time::Duration::minutes(5));
        o
    }

    #[test]
    fn new_operations_are_pending_and_named_by_kind_and_start() {
        let o = op(State::Pending);
        assert_eq!(o.id, format!("cycle-{}", T0.unix_timestamp()));
        assert_eq!(Kind::parse(o.kind.as_str()), Some(Kind::Cycle));
        for s in [
            State::Pending,
            State::Running,
            State::Paused,
            State::Succeeded,
            State::Failed,
            State::Aborted,
            State::RollingBack,
        ] {
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn what_an_operator_may_do_in_each_state() {
        let later = T0 + time::Duration::minutes(1);
        #[rustfmt::skip]
        let cases: Vec<(State, Command, Option<State>)> = vec![
            (State::Pending, Command::Pause, Some(State::Paused)),
            (State::Running, Command::Pause, Some(State::Paused)),
            (State::RollingBack, Command::Pause, Some(State::Paused)),
            (State::Paused, Command::Pause, None),
            (State::Paused, Command::Resume, Some(State::Running)),
            (State::Running, Command::Resume, None),
            (State::Pending, Command::Resume, None),
            (State::Running, Command::Abort, Some(State::Aborted)),
            (State::Paused, Command::Abort, Some(State::Aborted)),
            (State::Pending, Command::Abort, Some(State::Aborted)),
            (State::Succeeded, Command::Abort, None),
            (State::Failed, Command::Resume, None),
            (State::Aborted, Command::Pause, None),
        ];
        for (from, command, want) in cases {
            let result = op(from).command(command, later);
            match want {
                Some(to) => {
                    let o = result.unwrap_or_else(|e| panic!("{from:?} {command:?}: {e}"));
                    assert_eq!(o.state, to, "{from:?} {command:?}");
                    assert_eq!(o.updated, later);
                    // An abort frees what it held; a pause keeps it held; a resume stops waiting.
                    assert_eq!(
                        o.holds.is_empty(),
                        to == State::Aborted,
                        "{from:?} {command:?}"
                    );
                    assert_eq!(
                        o.wait_until.is_none(),
                        to == State::Running,
                        "{from:?} {command:?}"
                    );
                }
                None => {
                    let e = result.unwrap_err();
                    assert!(
                        e.to_string().contains(from.as_str())
                            && e.to_string().contains(command.as_str()),
                        "{e}"
                    );
                }
            }
        }
    }

    #[test]
    fn one_operation_per_scale_set_until_it_is_over() {
        assert!(in_the_way(&[op(State::Succeeded), op(State::Aborted)]).is_none());
        assert_eq!(
            in_the_way(&[op(State::Failed), op(State::Paused)]).map(|o| o.state),
            Some(State::Paused)
        );
        let mut o = op(State::Running);
        o.total = 20;
        o.done = 4;
        o.step = "batch 2".into();
        assert_eq!(o.progress(), "4 of 20 (batch 2)");
    }
}
