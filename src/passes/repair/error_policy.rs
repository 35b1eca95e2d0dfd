//! What a refused or unanswered Compute call means for the steps it carried: the error policy of
//! a step, apart from the code that sends it (as controller-rs keeps `error_policy` apart from
//! `reconcile`). Pure: table-tested below.

use crate::compute::{Accepted, ArmError, ComputeError};
use crate::incident::{Call, Hold, Incident, Stage};
use time::OffsetDateTime;

/// What a refused or unanswered call means for the steps it carried: the error policy of a step,
/// apart from the code that sends it (as controller-rs keeps `error_policy` apart from `reconcile`).
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Throttled: put the rows back as they were (no attempt spent); the subscription waits.
    Release,
    /// Not taken now, may be later: send again on a later pass, within the step's deadline.
    Pending(Hold),
    /// The batch was refused: each of its instances goes in a call of its own next pass.
    Split,
    /// The scale set cannot grow (its limit, quota, SKU): replace deletes first, then restores.
    DeleteFirst,
    /// ARM refused this step itself: the attempt is spent.
    Fail(ArmError),
    /// No answer: whether it landed is unknown, so it is never sent again; the deadline decides.
    Unknown,
}

impl Next {
    pub fn label(&self) -> &'static str {
        match self {
            Next::Release => "throttled",
            Next::Pending(Hold::Busy) => "busy",
            Next::Pending(Hold::Stale) => "stale",
            Next::Pending(Hold::Transient) => "transient",
            Next::Pending(Hold::Alone) | Next::Split => "split",
            Next::DeleteFirst => "cannot_grow",
            Next::Fail(_) => "refused",
            Next::Unknown => "no_answer",
        }
    }
}

pub fn error_policy(error: &ComputeError, batch: usize, call: Call, stage: Stage) -> Next {
    let refused = |e: &ComputeError| match e.arm() {
        Some(arm) => arm.clone(),
        None => ArmError {
            status: match e {
                ComputeError::NotFound(_) => 404,
                ComputeError::Unauthorized(_) => 403,
                _ => 0,
            },
            code: e.label().into(),
            message: e.to_string(),
        },
    };
    match error {
        ComputeError::Throttled { .. } => Next::Release,
        ComputeError::Busy(_) => Next::Pending(Hold::Busy),
        ComputeError::Stale(_) => Next::Pending(Hold::Stale),
        ComputeError::Transient(_) => Next::Pending(Hold::Transient),
        ComputeError::NoAnswer(_) | ComputeError::Failed(_) => Next::Unknown,
        ComputeError::Refused(_) | ComputeError::NotFound(_) | ComputeError::Unauthorized(_) => {
            // A capacity change is one write whatever it carries: it is never split.
            if call == Call::Grow && stage == Stage::Surge {
                Next::DeleteFirst
            } else if call == Call::Grow {
                Next::Fail(refused(error))
            } else if batch > 1 {
                Next::Split
            } else {
                Next::Fail(refused(error))
            }
        }
    }
}

/// The row after the call: accepted, or what the error policy says.
pub(super) fn after(
    inc: &Incident,
    result: &Result<Accepted, ComputeError>,
    next: Option<&Next>,
    now: OffsetDateTime,
) -> Option<Incident> {
    match (result, next) {
        (Ok(accepted), _) => Some(inc.accepted(accepted.operation.clone())),
        (Err(_), Some(Next::Release)) => None,
        (Err(e), Some(Next::Pending(hold))) => Some(inc.pending(*hold, e.arm().cloned())),
        (Err(e), Some(Next::Split)) => Some(inc.pending(Hold::Alone, e.arm().cloned())),
        // Not a wait for ARM: the delete goes out on the next pass.
        (Err(e), Some(Next::DeleteFirst)) => Some(Incident {
            stage: Stage::DeleteFirst,
            hold: None,
            ..inc.pending(Hold::Busy, e.arm().cloned())
        }),
        (Err(_), Some(Next::Fail(arm))) => Some(inc.failed(arm.clone(), now)),
        (Err(_), Some(Next::Unknown) | None) => Some(inc.clone()),
    }
}

/// What the journal says of a call ARM did not take.
pub(super) fn explain(e: &ComputeError, next: &Next) -> String {
    match next {
        Next::Release => format!("{e}; decided again on a later pass, no attempt spent"),
        Next::Pending(_) => format!("{e}; sent again on a later pass within the step's deadline, no attempt spent"),
        Next::Split => format!("{e}; the batch was refused, so each of its instances is sent on its own next pass"),
        Next::DeleteFirst => format!("{e}; the scale set cannot grow, so the broken instance is deleted first and the capacity restored after"),
        Next::Fail(arm) => format!("refused by ARM ({} {}): {}; the attempt is spent", arm.status, arm.code, arm.message),
        Next::Unknown => format!("{e}; whether it landed is unknown, so it is not sent again and the repair timeout decides"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arm(status: u16, code: &str) -> ArmError {
        ArmError {
            status,
            code: code.into(),
            message: "m".into(),
        }
    }

    #[test]
    fn what_each_error_means_for_a_step() {
        let refused = ComputeError::Refused(arm(409, "OperationNotAllowed"));
        #[rustfmt::skip]
        let cases: Vec<(&str, ComputeError, usize, Call, Stage, Next)> = vec![
            ("429: put back, no attempt", ComputeError::Throttled { retry_after_s: 30 }, 3, Call::Restart, Stage::Act, Next::Release),
            ("409 Conflict: wait, no attempt", ComputeError::Busy(arm(409, "Conflict")), 1, Call::Restart, Stage::Act, Next::Pending(Hold::Busy)),
            ("412: read again", ComputeError::Stale(arm(412, "PreconditionFailed")), 1, Call::Grow, Stage::Surge, Next::Pending(Hold::Stale)),
            ("5xx: again later", ComputeError::Transient("503".into()), 2, Call::Delete, Stage::Act, Next::Pending(Hold::Transient)),
            ("no answer: never twice", ComputeError::NoAnswer("timeout".into()), 1, Call::Grow, Stage::Surge, Next::Unknown),
            ("a refused batch is split", refused.clone(), 2, Call::Restart, Stage::Act, Next::Split),
            ("a refused single step is spent", refused.clone(), 1, Call::Restart, Stage::Act, Next::Fail(arm(409, "OperationNotAllowed"))),
            ("a refused surge deletes first", refused.clone(), 4, Call::Grow, Stage::Surge, Next::DeleteFirst),
            ("a refused restore is spent, never split", refused, 3, Call::Grow, Stage::Restore, Next::Fail(arm(409, "OperationNotAllowed"))),
            ("404 on an act is a refusal", ComputeError::NotFound("gone".into()), 1, Call::Delete, Stage::Act, Next::Fail(ArmError { status: 404, code: "not_found".into(), message: "not found: gone".into() })),
        ];
        for (name, error, batch, call, stage, want) in cases {
            assert_eq!(error_policy(&error, batch, call, stage), want, "{name}");
        }
    }
}
