//! The steps that call nothing: incidents closed (recovered, replaced, removed) and given up,
//! claimed and journaled together before any Compute call, with their alerts.

use super::*;

/// Closes and give-ups, claimed by version; each journaled, a give-up (or a capacity that could
/// not be restored) alerted.
pub(super) async fn settle(
    pass: &SetPass<'_>,
    settling: Vec<Transition>,
    report: &mut SetReport,
    alerts: &mut Vec<Alert>,
) -> Result<(), StoreError> {
    let SetPass {
        store,
        id,
        dry_run,
        now,
        ..
    } = *pass;
    let alert = |kind, t: Option<&Transition>, reason: String| pass.alert(kind, t, reason);
    let outcome_entry = |t: &Transition| {
        entry(
            id,
            &t.incident.target,
            &t.incident.id,
            EntryKind::Outcome,
            dry_run,
            now,
        )
    };
    let mut journal = Vec::new();
    for (t, _) in claim(store, id, settling, report).await? {
        report.outcomes += 1;
        match t.step {
            Step::GiveUp => {
                let why = match &t.incident.error {
                    Some(e) => format!("; the last step ended {}: {}", e.code, e.message),
                    None => String::new(),
                };
                alerts.push(alert(
                    AlertKind::GiveUp,
                    Some(&t),
                    format!(
                        "still unhealthy after {} attempt(s){why}; needs a person",
                        t.incident.attempt
                    ),
                ));
                tracing::error!(scale_set = %id, instance = %t.incident.target, incident = %t.incident.id, attempts = t.incident.attempt,
                    decision = "give_up", "every allowed repair failed; giving up on this instance");
                journal.push(Entry {
                    action: t.incident.action,
                    attempt: t.incident.attempt,
                    outcome: "given_up".into(),
                    reason: format!(
                        "still unhealthy after {} attempt(s) (HEALER_MAX_ATTEMPTS){why}; needs a person",
                        t.incident.attempt
                    ),
                    evidence: t.evidence.clone(),
                    ..outcome_entry(&t)
                });
            }
            _ => {
                tracing::info!(scale_set = %id, instance = %t.incident.target, incident = %t.incident.id, decision = "close", outcome = t.incident.closing(), "incident closed");
                let restore_lost = t
                    .previous
                    .as_ref()
                    .is_some_and(|p| p.stage == Stage::Restore && p.phase != Phase::Succeeded);
                if restore_lost {
                    alerts.push(alert(
                        AlertKind::GiveUp,
                        Some(&t),
                        "the instance was deleted but its capacity could not be restored; the scale set is one instance short until someone raises it".into(),
                    ));
                }
                journal.push(Entry {
                    action: t.incident.action,
                    attempt: t.incident.attempt,
                    outcome: t.incident.closing().into(),
                    reason: format!(
                        "{} after {} attempt(s){}",
                        t.incident.closing(),
                        t.incident.attempt,
                        if restore_lost {
                            "; its capacity was not restored"
                        } else {
                            ""
                        }
                    ),
                    evidence: t.evidence.clone(),
                    ..outcome_entry(&t)
                });
            }
        }
    }
    journal_rows(store, &journal).await
}
