//! What one pass of any operation decides, whatever its kind: the calls it makes and where each
//! stands, how their operations went, the journal lines, and the operation's next row.

use super::Operation;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use time::{Duration, OffsetDateTime};

/// Where one call stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum CallState {
    /// Decided, not sent yet (or ARM asked to be asked again later: throttled, busy).
    Unsent,
    /// A pass was about to send it. Still so on a later pass, its answer was lost: whether it
    /// landed, the mirror tells — it is never sent again.
    Sending {
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
    /// ARM took it; its status is read at `url` (none: the mirror tells when it ended).
    Accepted {
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
        url: Option<String>,
        /// How the URL is read (`async_operation` or `location`).
        follow: Option<String>,
    },
    Ended {
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
    /// Refused, or its operation failed: ARM's code and message.
    Failed { error: String },
}

/// How a call's operation stands, as the pass read it from its status URL.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Running,
    Ended(OffsetDateTime),
    Failed(String),
    /// Could not be read (gone, unreadable): the mirror tells instead.
    Unknown,
}

/// A line for the journal: the instance (`*` for the scale set), an outcome label, why.
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    pub instance: String,
    pub outcome: &'static str,
    pub reason: String,
    /// What it rests on, kept with the journal line (the autoscale settings a swap read).
    pub evidence: serde_json::Value,
}

/// The operation after one pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Advance {
    pub op: Operation,
    pub notes: Vec<Note>,
    /// Something an operator must see: a failed batch, a failed cycle.
    pub alert: Option<String>,
    /// The mirror should read the scale set soon (a call was decided).
    pub resync: bool,
}

impl Advance {
    /// A pass's start: the row as it is, nothing decided yet.
    pub fn of(op: &Operation) -> Advance {
        Advance {
            op: op.clone(),
            notes: Vec::new(),
            alert: None,
            resync: false,
        }
    }

    /// The row after the pass: the kind's memo in it, and `updated` moved if anything changed.
    pub fn finish(
        mut self,
        before: &Operation,
        memo: &impl Serialize,
        now: OffsetDateTime,
    ) -> Self {
        self.op.memo = serde_json::to_value(memo).unwrap_or(serde_json::Value::Null);
        if self.changed(before) {
            self.op.updated = now;
        }
        self
    }

    /// Whether the row needs writing.
    pub fn changed(&self, before: &Operation) -> bool {
        let mut a = self.op.clone();
        a.updated = before.updated;
        a != *before
    }
}

/// One call of an operation whose calls go one at a time, in order (a swap's, a golden image's):
/// what it does, and where it stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Call<A> {
    pub act: A,
    pub state: CallState,
}

impl<A> Call<A> {
    pub fn new(act: A) -> Self {
        Call {
            act,
            state: CallState::Unsent,
        }
    }

    pub fn ended_at(&self) -> Option<OffsetDateTime> {
        self.state.ended_at()
    }

    pub fn failed(&self) -> Option<&str> {
        self.state.failed()
    }

    /// Sent, and not yet seen to end: ARM may still be carrying it out.
    pub fn in_flight(&self) -> bool {
        matches!(
            self.state,
            CallState::Sending { .. } | CallState::Accepted { .. }
        )
    }
}

impl CallState {
    pub fn ended_at(&self) -> Option<OffsetDateTime> {
        match self {
            CallState::Ended { at } => Some(*at),
            _ => None,
        }
    }

    pub fn failed(&self) -> Option<&str> {
        match self {
            CallState::Failed { error } => Some(error),
            _ => None,
        }
    }

    /// What a call becomes as its pass is about to send it: `Sending`, or, in a dry run, taken
    /// as if ARM had (nothing is sent).
    pub fn sending(dry_run: bool, now: OffsetDateTime) -> CallState {
        if dry_run {
            CallState::Accepted {
                at: now,
                url: None,
                follow: None,
            }
        } else {
            CallState::Sending { at: now }
        }
    }
}

/// An operator's abort of an operation that has an undo: its memo marked when `undoable` (which
/// marks it) says the operation is under way and not undoing already, for the next pass to act
/// on. A dry run did nothing to undo.
pub fn abort<M: Serialize>(
    op: &Operation,
    memo: Result<M, String>,
    undoable: impl FnOnce(&mut M) -> bool,
) -> Option<serde_json::Value> {
    if op.dry_run {
        return None;
    }
    let mut memo = memo.ok()?;
    if !undoable(&mut memo) {
        return None;
    }
    serde_json::to_value(&memo).ok()
}

/// The first call not ended, if it is unsent: its turn has come.
pub fn sendable<A>(calls: &[Call<A>]) -> Option<usize> {
    let i = calls.iter().position(|c| c.ended_at().is_none())?;
    (calls[i].state == CallState::Unsent).then_some(i)
}

impl CallState {
    /// Settles a sent call by what its status URL says, where it has one. What is left is when it
    /// was sent, for the caller to judge by the mirror — except in a dry run (nothing was sent:
    /// it ends now) and for a `repeatable` write whose answer was lost (the same write again
    /// changes nothing: it is sent again).
    pub fn settle(
        &mut self,
        statuses: &HashMap<String, Status>,
        dry: bool,
        repeatable: bool,
        now: OffsetDateTime,
    ) -> Option<OffsetDateTime> {
        let sent_at = match self {
            CallState::Accepted {
                url: Some(u), at, ..
            } => match statuses.get(u) {
                Some(Status::Running) => return None,
                Some(Status::Ended(t)) => {
                    *self = CallState::Ended { at: *t };
                    return None;
                }
                Some(Status::Failed(e)) => {
                    *self = CallState::Failed { error: e.clone() };
                    return None;
                }
                Some(Status::Unknown) | None => *at,
            },
            CallState::Accepted { at, .. } | CallState::Sending { at } => *at,
            _ => return None,
        };
        if dry {
            *self = CallState::Ended { at: now };
            return None;
        }
        if repeatable && matches!(self, CallState::Sending { .. }) {
            *self = CallState::Unsent;
            return None;
        }
        Some(sent_at)
    }
}

/// Where the calls of a step stand together.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// The first failed call: its index and ARM's error.
    Failed(usize, String),
    /// Not all ended, and the step's deadline has passed.
    Late,
    /// Not all ended: the first one not ended, in words.
    Waiting(String),
    Ended,
}

pub fn progress<A>(
    calls: &[Call<A>],
    deadline: Option<OffsetDateTime>,
    now: OffsetDateTime,
    describe: impl Fn(&A) -> String,
) -> Progress {
    if let Some((i, e)) = calls
        .iter()
        .enumerate()
        .find_map(|(i, c)| c.failed().map(|e| (i, e.to_string())))
    {
        return Progress::Failed(i, e);
    }
    match calls.iter().find(|c| c.ended_at().is_none()) {
        None => Progress::Ended,
        Some(_) if deadline.is_some_and(|d| now > d) => Progress::Late,
        Some(c) => Progress::Waiting(describe(&c.act)),
    }
}

/// A brake holds every step: no call is sent, and the step's deadline leaves the set time to be
/// judged once the brake releases. What the operation waits on, and whether that is news (a
/// journal line) or the same hold as the last pass's.
pub fn hold(
    op: &Operation,
    deadline: &mut Option<OffsetDateTime>,
    brake: &str,
    now: OffsetDateTime,
    settle: Duration,
) -> (String, bool) {
    if let Some(d) = deadline.as_mut() {
        *d = (*d).max(now + settle);
    }
    let what = format!("held by the brake: {brake}");
    let news = op.waiting.as_deref() != Some(what.as_str());
    (what, news)
}
