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

/// Which rows an operator asked for (`handler journal`): every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    /// An instance id, or a Flexible VM's name (any case).
    pub instance: Option<String>,
    pub incident: Option<String>,
    /// Any of these kinds; none given: every kind.
    pub kinds: Vec<EntryKind>,
}

impl Filter {
    pub fn keeps(&self, e: &Entry) -> bool {
        self.instance
            .as_deref()
            .is_none_or(|i| e.instance_id.eq_ignore_ascii_case(i))
            && self.incident.as_deref().is_none_or(|i| e.incident == i)
            && (self.kinds.is_empty() || self.kinds.contains(&e.kind))
    }
}

/// The audit trail as an operator reads it: the rows of several scale sets, each listed newest
/// first as the table keeps them, merged oldest first; of the same time, in the order they were
/// written (the table's order within a time). `limit` keeps the newest.
pub fn chronicle(per_set: Vec<Vec<Entry>>, filter: &Filter, limit: Option<usize>) -> Vec<Entry> {
    let mut rows: Vec<Entry> = per_set
        .into_iter()
        .flatten()
        .filter(|e| filter.keeps(e))
        .collect();
    rows.sort_by_key(|e| e.at);
    if let Some(n) = limit {
        let cut = rows.len().saturating_sub(n);
        rows.drain(..cut);
    }
    rows
}

/// One line per row (with `evidence`, the row's evidence as JSON on the next line).
pub fn render(rows: &[Entry], evidence: bool) -> String {
    if rows.is_empty() {
        return "no journal row\n".into();
    }
    rows.iter().map(|e| line(e, evidence)).collect()
}

/// One row as [`render`] shows it.
pub fn line(e: &Entry, evidence: bool) -> String {
    let action = match e.action {
        Some(a) if e.attempt > 0 => format!("{} (attempt {})  ", a.as_str(), e.attempt),
        Some(a) => format!("{}  ", a.as_str()),
        None => String::new(),
    };
    let mut out = format!(
        "{}  {}  #{:<6} {:<9} {:<20} {action}{}  [incident {}]{}\n",
        stamp(e.at),
        e.scale_set.name,
        e.instance_id,
        e.kind.as_str(),
        e.outcome,
        e.reason,
        e.incident,
        if e.dry_run { " [dry run]" } else { "" }
    );
    if evidence && !e.evidence.is_null() {
        out.push_str(&format!("    evidence: {}\n", e.evidence));
    }
    out
}

/// What follows a journal as it grows: the rows read so far at the newest time (the next read
/// starts there, at or after it), so that each row is shown once.
#[derive(Debug, Default)]
pub struct Follow {
    newest: Option<OffsetDateTime>,
    at_newest: std::collections::HashSet<String>,
}

impl Follow {
    /// Where the next read starts: the newest time shown, or `start` before anything was.
    pub fn since(&self, start: OffsetDateTime) -> OffsetDateTime {
        self.newest.unwrap_or(start)
    }

    /// The rows of a read (oldest first) not shown before; remembers them.
    pub fn fresh(&mut self, rows: Vec<Entry>) -> Vec<Entry> {
        let identity = |e: &Entry| {
            format!(
                "{}|{}|{}|{}|{}|{}",
                e.scale_set.key(),
                e.instance_id,
                e.incident,
                e.kind.as_str(),
                e.outcome,
                e.reason
            )
        };
        let fresh: Vec<Entry> = rows
            .into_iter()
            .filter(|e| {
                self.newest.is_none_or(|n| e.at > n)
                    || (Some(e.at) == self.newest && !self.at_newest.contains(&identity(e)))
            })
            .collect();
        for e in &fresh {
            if self.newest.is_none_or(|n| e.at > n) {
                self.newest = Some(e.at);
                self.at_newest.clear();
            }
            if Some(e.at) == self.newest {
                self.at_newest.insert(identity(e));
            }
        }
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn row(set: &str, instance: &str, at: OffsetDateTime, kind: EntryKind, outcome: &str) -> Entry {
        Entry {
            scale_set: ScaleSetId::new("sub", "rg", set),
            instance_id: instance.into(),
            at,
            incident: format!("{instance}-1"),
            kind,
            action: Some(RepairAction::Restart),
            attempt: 1,
            outcome: outcome.into(),
            reason: format!("{outcome} {instance}"),
            evidence: serde_json::json!({"by": "timer"}),
            dry_run: false,
        }
    }

    const T: OffsetDateTime = datetime!(2026-12-02 07:00 UTC);

    #[test]
    fn sets_merge_oldest_first_and_a_time_keeps_the_written_order() {
        let s = time::Duration::seconds(1);
        // As the table lists them: newest first; within one time, in the order written.
        let web = vec![
            row("web", "1", T + s * 2, EntryKind::Step, "succeeded"),
            row("web", "1", T, EntryKind::Intent, "sending"),
            row("web", "1", T, EntryKind::Repair, "requested"),
        ];
        let api = vec![row("api", "4", T + s, EntryKind::Withheld, "cooldown")];
        let all = chronicle(vec![web, api], &Filter::default(), None);
        let order: Vec<&str> = all.iter().map(|e| e.outcome.as_str()).collect();
        assert_eq!(order, ["sending", "requested", "cooldown", "succeeded"]);
        let newest_two = chronicle(vec![all.clone()], &Filter::default(), Some(2));
        let order: Vec<&str> = newest_two.iter().map(|e| e.outcome.as_str()).collect();
        assert_eq!(order, ["cooldown", "succeeded"]);
    }

    #[test]
    fn a_filter_keeps_what_every_condition_allows() {
        let rows = vec![
            row("web", "1", T, EntryKind::Repair, "requested"),
            row("web", "2", T, EntryKind::Repair, "requested"),
            row("web", "1", T, EntryKind::Withheld, "cooldown"),
        ];
        let cases: Vec<(Filter, Vec<&str>)> = vec![
            (
                Filter::default(),
                vec!["requested 1", "requested 2", "cooldown 1"],
            ),
            (
                Filter {
                    instance: Some("1".into()),
                    ..Filter::default()
                },
                vec!["requested 1", "cooldown 1"],
            ),
            (
                Filter {
                    kinds: vec![EntryKind::Withheld, EntryKind::Step],
                    ..Filter::default()
                },
                vec!["cooldown 1"],
            ),
            (
                Filter {
                    instance: Some("2".into()),
                    incident: Some("1-1".into()),
                    ..Filter::default()
                },
                vec![],
            ),
        ];
        for (filter, want) in cases {
            let got: Vec<String> = chronicle(vec![rows.clone()], &filter, None)
                .into_iter()
                .map(|e| e.reason)
                .collect();
            assert_eq!(got, want, "{filter:?}");
        }
    }

    #[test]
    fn a_followed_journal_shows_each_row_once() {
        let s = time::Duration::seconds(1);
        let mut follow = Follow::default();
        assert_eq!(follow.since(T), T);
        let first = vec![
            row("web", "1", T, EntryKind::Intent, "sending"),
            row("web", "1", T + s, EntryKind::Repair, "requested"),
        ];
        assert_eq!(follow.fresh(first.clone()).len(), 2);
        assert_eq!(
            follow.since(T),
            T + s,
            "the next read starts at the newest row"
        );
        // The next read has the edge row again and rows of its time and after.
        let next = vec![
            first[1].clone(),
            row("web", "2", T + s, EntryKind::Withheld, "cooldown"),
            row("web", "1", T + s * 5, EntryKind::Step, "succeeded"),
        ];
        let shown: Vec<String> = follow.fresh(next).into_iter().map(|e| e.reason).collect();
        assert_eq!(shown, ["cooldown 2", "succeeded 1"]);
        assert!(follow
            .fresh(vec![row(
                "web",
                "1",
                T + s * 5,
                EntryKind::Step,
                "succeeded"
            )])
            .is_empty());
    }

    #[test]
    fn a_line_says_when_where_what_and_why() {
        let text = render(&[row("web", "7", T, EntryKind::Repair, "requested")], true);
        assert_eq!(
            text,
            "2026-12-02T07:00:00Z  web  #7      repair    requested            restart (attempt 1)  requested 7  [incident 7-1]\n    evidence: {\"by\":\"timer\"}\n"
        );
        assert_eq!(render(&[], false), "no journal row\n");
    }
}
