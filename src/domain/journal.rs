//! The journal (`repairs` table): every decision, taken or withheld, and every outcome, so an
//! operator can reconstruct why each instance was (or was not) touched.

use crate::policy::RepairAction;
use crate::scaleset::ScaleSetId;
use serde::Serialize;
use time::OffsetDateTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A repair was decided and requested from the Compute API.
    Repair,
    /// A repair was decided but not carried out, with the reason.
    Withheld,
    /// What became of an earlier repair.
    Outcome,
    /// A step's Compute call ended (its operation succeeded, failed or was canceled).
    Step,
    /// A repair's Compute call is about to be sent: written before the call, so that the journal
    /// shows every call ARM may have received even if the pass stops before recording the answer.
    Intent,
    /// A long-running operation's step or an operator's command on it (design §7); its
    /// `incident` is the operation's id.
    Operation,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Repair => "repair",
            EntryKind::Withheld => "withheld",
            EntryKind::Outcome => "outcome",
            EntryKind::Step => "step",
            EntryKind::Intent => "intent",
            EntryKind::Operation => "operation",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "repair" => Some(EntryKind::Repair),
            "withheld" => Some(EntryKind::Withheld),
            "outcome" => Some(EntryKind::Outcome),
            "step" => Some(EntryKind::Step),
            "intent" => Some(EntryKind::Intent),
            "operation" => Some(EntryKind::Operation),
            _ => None,
        }
    }
}

/// A time as an operator reads it in a journal reason or a log line: UTC, to the second.
pub fn stamp(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// One journal row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    pub scale_set: ScaleSetId,
    pub instance_id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Groups all rows of one instance episode.
    pub incident: String,
    pub kind: EntryKind,
    pub action: Option<RepairAction>,
    pub attempt: u32,
    /// `requested`, `busy`, `refused`, `throttled`, `succeeded`, `failed`, `dry_run`, …
    pub outcome: String,
    /// Why, in one sentence.
    pub reason: String,
    /// The facts the decision rested on (heartbeat, mirror state), as JSON.
    pub evidence: serde_json::Value,
    pub dry_run: bool,
}

/// The incident id of a new episode, unique within its scale set's partition: the instance and
/// the time it was opened.
pub fn incident_id(instance_id: &str, opened: OffsetDateTime) -> String {
    format!("{instance_id}-{}", opened.unix_timestamp())
}
