//! The operator's view of a deployment (`handler status`): per scale set, how many instances are
//! healthy, unhealthy, being repaired or in maintenance, the brake in force, the open incidents and
//! the latest journal rows. Built by the same judgement `monitor-status` uses, so it shows what the
//! next pass would see. Pure: observations in, a report and its text out.

use crate::incident::State;
use crate::journal::{stamp, Entry};
use crate::plan::{decide, Brakes, Observation};
use crate::policy::Policy;
use crate::scaleset::ScaleSetId;
use crate::verdict::Verdict;
use serde::Serialize;
use time::OffsetDateTime;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub dry_run: bool,
    /// Optional settings that cannot be used (the handler runs without them).
    pub settings_warnings: Vec<String>,
    pub scale_sets: Vec<SetStatus>,
    /// The long-running operations that are not over (design §7).
    pub operations: Vec<crate::operations::Operation>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SetStatus {
    pub scale_set: String,
    pub name: String,
    /// `Uniform` or `Flexible`, as the mirror last read it (`None`: never mirrored).
    pub orchestration: Option<&'static str>,
    pub total: usize,
    pub healthy: usize,
    pub unhealthy: usize,
    /// Trouble that does not count yet (within a grace, DOWN not long enough), or a DOWN whose
    /// source proved too little.
    pub suspect: usize,
    pub starting: usize,
    pub maintenance: usize,
    /// Instances draining before a platform event (terminate, reboot, redeploy): never faults.
    pub draining: usize,
    /// Incidents with a repair step under way.
    pub repairing: usize,
    #[serde(with = "time::serde::rfc3339::option")]
    pub mirrored_at: Option<OffsetDateTime>,
    /// The brake holding the scale set's repairs, if any: its label and why.
    pub brake: Option<String>,
    pub brake_reason: Option<String>,
    pub incidents: Vec<IncidentLine>,
    pub recent: Vec<JournalLine>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IncidentLine {
    pub instance: String,
    pub incident: String,
    pub state: &'static str,
    pub cause: String,
    pub action: Option<String>,
    pub attempt: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub opened_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub deadline: Option<OffsetDateTime>,
    /// Where the step's call stands (`surge running`, `restart pending (busy)`, …).
    pub step: String,
    /// ARM's code of the last failure, if any.
    pub error: Option<String>,
    pub dry_run: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JournalLine {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub instance: String,
    pub kind: &'static str,
    pub outcome: String,
    pub reason: String,
    pub dry_run: bool,
}

/// One scale set's status. `recent` is its journal, newest first.
pub fn summarize(
    id: &ScaleSetId,
    policy: &Policy,
    obs: &Observation,
    brakes: Brakes,
    recent: &[Entry],
    now: OffsetDateTime,
) -> SetStatus {
    let verdicts = crate::plan::verdicts(obs, policy, brakes.dry_run, now);
    let count = |f: fn(&Verdict) -> bool| verdicts.values().filter(|v| f(v)).count();
    let plan = decide(obs, policy, brakes, now);
    let brake = plan.paused();
    let mut incidents: Vec<IncidentLine> = obs
        .incidents
        .values()
        .map(|v| &v.value)
        .filter(|i| i.state != State::Closed)
        .map(|i| IncidentLine {
            instance: i.target.clone(),
            incident: i.id.clone(),
            state: match i.state {
                State::Repairing => "repairing",
                State::GivenUp => "given_up",
                State::Closed => "closed",
            },
            cause: i.cause.clone(),
            action: i.action.map(|a| a.to_string()),
            attempt: i.attempt,
            opened_at: i.opened_at,
            deadline: i.deadline,
            step: format!(
                "{} {}{}",
                i.call().map(|c| c.as_str()).unwrap_or("-"),
                i.phase.as_str(),
                i.hold
                    .map(|h| format!(" ({})", h.as_str()))
                    .unwrap_or_default()
            ),
            error: i.error.as_ref().map(|e| format!("{} {}", e.status, e.code)),
            dry_run: i.dry_run,
        })
        .collect();
    incidents.sort_by_key(|i| i.opened_at);
    SetStatus {
        scale_set: id.resource_id(),
        name: id.name.clone(),
        orchestration: obs
            .record
            .as_ref()
            .filter(|r| r.synced_at.is_some())
            .map(|r| {
                crate::scaleset::Orchestration::parse(r.orchestration_mode.as_deref()).as_str()
            }),
        total: obs.instances.len(),
        healthy: count(|v| *v == Verdict::Healthy),
        unhealthy: count(Verdict::is_unhealthy),
        suspect: count(|v| matches!(v, Verdict::Suspect { .. })),
        starting: count(|v| *v == Verdict::Starting),
        maintenance: count(|v| matches!(v, Verdict::Maintenance { .. })),
        draining: count(|v| matches!(v, Verdict::Draining { .. })),
        repairing: incidents.iter().filter(|i| i.state == "repairing").count(),
        mirrored_at: obs.record.as_ref().and_then(|r| r.synced_at),
        brake: brake.map(|b| b.label().to_string()),
        brake_reason: brake.map(|b| b.describe()),
        incidents,
        recent: recent
            .iter()
            .map(|e| JournalLine {
                at: e.at,
                instance: e.instance_id.clone(),
                kind: e.kind.as_str(),
                outcome: e.outcome.clone(),
                reason: e.reason.clone(),
                dry_run: e.dry_run,
            })
            .collect(),
    }
}

/// A health bar of `width` cells: healthy `#`, repairing `R`, unhealthy `!`, maintenance `M`,
/// draining `D`, the rest (starting, suspect) `.`.
pub fn bar(s: &SetStatus, width: usize) -> String {
    if s.total == 0 {
        return " ".repeat(width);
    }
    let cells = |n: usize| (n * width + s.total / 2) / s.total;
    let repairing = s.repairing.min(s.unhealthy + s.suspect);
    // Failing instances show as failing even before they count (`?`: within a grace, or DOWN
    // for less than HEALER_DOWN_FOR): a half-DOWN scale set must not read as half empty.
    let parts = [
        ('#', cells(s.healthy)),
        ('R', cells(repairing)),
        ('!', cells(s.unhealthy.saturating_sub(repairing))),
        (
            '?',
            cells((s.unhealthy + s.suspect).saturating_sub(repairing.max(s.unhealthy))),
        ),
        ('M', cells(s.maintenance)),
        ('D', cells(s.draining)),
    ];
    let mut out: String = parts
        .iter()
        .flat_map(|(c, n)| std::iter::repeat_n(*c, *n))
        .take(width)
        .collect();
    while out.chars().count() < width {
        out.push('.');
    }
    out
}

/// The report as text for a terminal or a log.
pub fn render(report: &Report) -> String {
    let mut out = format!(
        "vmss-healer status at {}{}: {} scale set(s)\n",
        stamp(report.at),
        if report.dry_run { " (DRY RUN)" } else { "" },
        report.scale_sets.len()
    );
    for w in &report.settings_warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    for o in &report.operations {
        out.push_str(&format!(
            "operation {} on {}: {}{}, {}\n",
            o.id,
            o.sets(),
            o.state.as_str(),
            if o.dry_run { " (dry run)" } else { "" },
            o.progress(),
        ));
    }
    for s in &report.scale_sets {
        out.push_str(&format!(
            "\n{}  [{}]  {} instances: {} healthy, {} unhealthy, {} repairing, {} suspect, {} starting, {} maintenance, {} draining\n",
            s.name,
            bar(s, 30),
            s.total,
            s.healthy,
            s.unhealthy,
            s.repairing,
            s.suspect,
            s.starting,
            s.maintenance,
            s.draining
        ));
        out.push_str(&format!(
            "  {} ({})\n",
            s.scale_set,
            s.orchestration.unwrap_or("mode not read yet")
        ));
        let mirror = s
            .mirrored_at
            .map(|t| format!("mirror read {} s ago", (report.at - t).whole_seconds()))
            .unwrap_or_else(|| "never mirrored".into());
        match (&s.brake, &s.brake_reason) {
            (Some(label), Some(why)) => {
                out.push_str(&format!("  PAUSED ({label}): {why}; {mirror}\n"))
            }
            _ => out.push_str(&format!("  repairs active; {mirror}\n")),
        }
        if s.incidents.is_empty() {
            out.push_str("  no open incident\n");
        }
        for i in &s.incidents {
            out.push_str(&format!(
                "  incident {} on #{}: {} ({}), {} attempt {}: {}{}{}{}\n",
                i.incident,
                i.instance,
                i.state,
                i.cause,
                i.action.as_deref().unwrap_or("-"),
                i.attempt,
                i.step,
                i.error
                    .as_deref()
                    .map(|e| format!(", last error {e}"))
                    .unwrap_or_default(),
                i.deadline
                    .map(|d| format!(", deadline {}", stamp(d)))
                    .unwrap_or_default(),
                if i.dry_run { " [dry run]" } else { "" }
            ));
        }
        if !s.recent.is_empty() {
            out.push_str("  recent:\n");
        }
        for j in &s.recent {
            out.push_str(&format!(
                "    {}  {:<8} #{:<6} {:<20} {}{}\n",
                stamp(j.at),
                j.kind,
                j.instance,
                j.outcome,
                j.reason,
                if j.dry_run { " [dry run]" } else { "" }
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(healthy: usize, unhealthy: usize, repairing: usize, maintenance: usize) -> SetStatus {
        SetStatus {
            scale_set: "/subscriptions/s/resourceGroups/r/providers/Microsoft.Compute/virtualMachineScaleSets/web".into(),
            name: "web".into(),
            orchestration: Some("Flexible"),
            total: healthy + unhealthy + maintenance,
            healthy,
            unhealthy,
            suspect: 0,
            starting: 0,
            maintenance,
            draining: 0,
            repairing,
            mirrored_at: None,
            brake: None,
            brake_reason: None,
            incidents: vec![],
            recent: vec![],
        }
    }

    #[test]
    fn the_bar_shows_shares_at_a_glance() {
        assert_eq!(bar(&status(10, 0, 0, 0), 10), "##########");
        assert_eq!(bar(&status(8, 2, 1, 0), 10), "########R!");
        assert_eq!(bar(&status(5, 0, 0, 5), 10), "#####MMMMM");
        assert_eq!(bar(&status(0, 0, 0, 0), 4), "    ");
        let mut half_down = status(5, 0, 0, 0);
        half_down.suspect = 5;
        half_down.total = 10;
        assert_eq!(
            bar(&half_down, 10),
            "#####?????",
            "failing before it counts"
        );
        // Rounding never makes it longer or shorter than asked.
        for (h, u, r, m) in [(1, 1, 0, 1), (33, 1, 1, 0), (2, 97, 50, 1)] {
            assert_eq!(bar(&status(h, u, r, m), 30).chars().count(), 30);
        }
    }

    fn running_cycle() -> crate::operations::Operation {
        let mut o = crate::operations::Operation::new(
            crate::operations::Kind::Cycle,
            ScaleSetId::new("s", "r", "web"),
            serde_json::Value::Null,
            "ops".into(),
            false,
            OffsetDateTime::UNIX_EPOCH,
        );
        o.state = crate::operations::State::Running;
        o.done = 4;
        o.total = 20;
        o.step = "batch 2".into();
        o.wait_until = Some(OffsetDateTime::UNIX_EPOCH + time::Duration::minutes(5));
        o.waiting = Some("batch 2: 2 of 4 back healthy".into());
        o
    }

    #[test]
    fn the_text_names_the_brake_and_the_incidents() {
        let mut s = status(9, 1, 1, 0);
        s.brake = Some("paused_by_operator".into());
        s.brake_reason = Some("paused by an operator: deploying".into());
        s.incidents.push(IncidentLine {
            instance: "4".into(),
            incident: "4-1".into(),
            state: "repairing",
            cause: "reported_down".into(),
            action: Some("restart".into()),
            attempt: 1,
            opened_at: OffsetDateTime::UNIX_EPOCH,
            deadline: None,
            step: "restart running".into(),
            error: Some("409 Conflict".into()),
            dry_run: false,
        });
        let text = render(&Report {
            at: OffsetDateTime::UNIX_EPOCH,
            dry_run: true,
            settings_warnings: vec!["HEALER_WEBHOOK_URL: unusable; alerts are not sent".into()],
            scale_sets: vec![s],
            operations: vec![running_cycle(), {
                let mut swap = running_cycle();
                swap.id = "swap-0".into();
                swap.kind = crate::operations::Kind::Swap;
                swap.partner = Some(ScaleSetId::new("s", "r", "web-green"));
                swap.step = "soak".into();
                swap.waiting = Some("the new set to be healthy: 2 of 4".into());
                swap
            }],
        });
        assert!(text.contains("(DRY RUN)"), "{text}");
        // A running operation: n of N, the batch, what it waits for and until when.
        assert!(
            text.contains("operation cycle-0 on r/web: running, 4 of 20 (batch 2); waiting for batch 2: 2 of 4 back healthy until 1970-01-01T00:05:00Z\n"),
            "{text}"
        );
        // A swap names both its sets.
        assert!(
            text.contains("operation swap-0 on r/web → r/web-green: running, 4 of 20 (soak); waiting for the new set to be healthy: 2 of 4"),
            "{text}"
        );
        assert!(
            text.contains("warning: HEALER_WEBHOOK_URL: unusable; alerts are not sent"),
            "{text}"
        );
        assert!(
            text.contains("PAUSED (paused_by_operator): paused by an operator: deploying"),
            "{text}"
        );
        assert!(
            text.contains("virtualMachineScaleSets/web (Flexible)"),
            "{text}"
        );
        assert!(
            text.contains("incident 4-1 on #4: repairing (reported_down), restart attempt 1: restart running, last error 409 Conflict"),
            "{text}"
        );
    }
}
