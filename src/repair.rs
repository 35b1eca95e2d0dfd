//! One repair pass (`monitor-status`): gather → decide → act → journal → report. Reads only the
//! tables; calls the Compute API only to act.

use crate::compute::{Accepted, Compute, ComputeError};
use crate::journal::{Entry, EntryKind};
use crate::plan::{decide, Brakes, Observation, Plan, PlannedRepair};
use crate::policy::RepairAction;
use crate::scaleset::ScaleSetId;
use crate::settings::{Settings, WatchedScaleSet};
use crate::state::{Store, StoreError};
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use time::{Duration, OffsetDateTime};

#[derive(Debug, Clone, Serialize)]
pub struct SetReport {
    pub scale_set: String,
    pub healthy: usize,
    pub repairs_requested: usize,
    pub repairs_failed: usize,
    pub withheld: usize,
    pub outcomes: usize,
    pub next_check_s: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RepairReport {
    pub dry_run: bool,
    pub scale_sets: Vec<SetReport>,
}

pub async fn repair_all(
    store: &Store,
    compute: &Compute,
    settings: &Settings,
    now: OffsetDateTime,
) -> Result<RepairReport, StoreError> {
    let mut reports = Vec::new();
    for watched in &settings.scale_sets {
        reports.push(repair_one(store, compute, settings, watched, now).await?);
    }
    Ok(RepairReport {
        dry_run: settings.dry_run,
        scale_sets: reports,
    })
}

async fn gather(
    store: &Store,
    id: &ScaleSetId,
    window: Duration,
    now: OffsetDateTime,
) -> Result<Observation, StoreError> {
    let record = store.scale_set(id).await?;
    let (instances, bad_instances) = store.mirror(id).await?;
    let (heartbeats, bad_heartbeats) = store.heartbeats(id).await?;
    let (journal, bad_journal) = store.journal(id, now - window).await?;
    for bad in bad_instances
        .0
        .iter()
        .chain(&bad_heartbeats.0)
        .chain(&bad_journal.0)
    {
        tracing::warn!(scale_set = %id, error = %bad, "skipped an unreadable row");
    }
    Ok(Observation {
        record,
        instances,
        heartbeats,
        journal,
    })
}

async fn repair_one(
    store: &Store,
    compute: &Compute,
    settings: &Settings,
    watched: &WatchedScaleSet,
    now: OffsetDateTime,
) -> Result<SetReport, StoreError> {
    let id = &watched.id;
    let policy = &watched.policy;
    // Long enough to see every repair that can still be in flight.
    let window = policy.repair_timeout * 2 + Duration::hours(1);
    let obs = gather(store, id, window, now).await?;
    let brakes = Brakes {
        mirror_max_age: settings.mirror_max_age,
    };
    let plan = decide(&obs, policy, brakes, now);
    let capacity = obs.record.as_ref().and_then(|r| r.capacity);

    let mut journal = Vec::new();
    let entry = |instance_id: &str, incident: &str, kind: EntryKind| Entry {
        scale_set: id.clone(),
        instance_id: instance_id.to_string(),
        at: now,
        incident: incident.to_string(),
        kind,
        action: None,
        attempt: 0,
        outcome: String::new(),
        reason: String::new(),
        evidence: serde_json::Value::Null,
        dry_run: settings.dry_run,
    };

    for o in &plan.outcomes {
        tracing::info!(scale_set = %id, instance = %o.instance_id, incident = %o.incident, action = %o.action, outcome = o.result.as_str(), "repair outcome");
        journal.push(Entry {
            action: Some(o.action),
            attempt: o.attempt,
            outcome: o.result.as_str().into(),
            reason: format!(
                "{} of attempt {}: {}",
                o.action,
                o.attempt,
                o.result.as_str()
            ),
            ..entry(&o.instance_id, &o.incident, EntryKind::Outcome)
        });
    }

    let mut withheld = 0;
    for w in &plan.withheld {
        let instance = w.instance_id.as_deref().unwrap_or("*");
        tracing::info!(scale_set = %id, instance, decision = "withheld", why = w.why.label(), reason = %w.why.describe(), "repair withheld");
        withheld += 1;
        // An in-flight repair is already journaled; repeating it every pass would bury the rest.
        if matches!(w.why, crate::plan::WithheldReason::RepairInFlight { .. }) {
            continue;
        }
        journal.push(Entry {
            outcome: w.why.label().into(),
            reason: w.why.describe(),
            evidence: json!(w.why),
            ..entry(instance, "", EntryKind::Withheld)
        });
    }

    let (requested, failed) = act(compute, settings, id, &plan, capacity, now, &mut journal).await;
    store.append_journal(&journal).await?;
    Ok(SetReport {
        scale_set: id.key(),
        healthy: plan.healthy,
        repairs_requested: requested,
        repairs_failed: failed,
        withheld,
        outcomes: plan.outcomes.len(),
        next_check_s: plan.next_check.map(|d| d.whole_seconds()),
    })
}

/// Sends the plan's repairs, one batched call per action, and journals each.
async fn act(
    compute: &Compute,
    settings: &Settings,
    id: &ScaleSetId,
    plan: &Plan,
    capacity: Option<i64>,
    now: OffsetDateTime,
    journal: &mut Vec<Entry>,
) -> (usize, usize) {
    let mut by_action: BTreeMap<&'static str, (RepairAction, Vec<&PlannedRepair>)> =
        BTreeMap::new();
    for r in &plan.repairs {
        by_action
            .entry(r.action.as_str())
            .or_insert((r.action, Vec::new()))
            .1
            .push(r);
    }
    let (mut requested, mut failed) = (0, 0);
    for (action, repairs) in by_action.into_values() {
        let ids: Vec<String> = repairs.iter().map(|r| r.instance_id.clone()).collect();
        let result: Result<Accepted, ComputeError> = if settings.dry_run {
            Ok(Accepted { operation: None })
        } else {
            match action {
                RepairAction::Delete => compute.delete_instances(id, &ids).await,
                RepairAction::Replace => match compute.delete_instances(id, &ids).await {
                    // The delete lowers capacity; setting it back makes the scale set create fresh VMs.
                    Ok(accepted) => match capacity {
                        Some(c) => compute.set_capacity(id, c).await.map(|_| accepted),
                        None => Ok(accepted),
                    },
                    Err(e) => Err(e),
                },
                RepairAction::Reimage => compute.reimage_instances(id, &ids).await,
                RepairAction::Restart => compute.restart_instances(id, &ids).await,
            }
        };
        let (outcome, note) = match &result {
            Ok(_) if settings.dry_run => {
                ("dry_run", Some("dry run: nothing was called".to_string()))
            }
            Ok(_) => ("requested", None),
            Err(ComputeError::Throttled { retry_after_s }) => (
                "throttled",
                Some(format!(
                    "Compute API throttled; retried on a later pass after {retry_after_s} s"
                )),
            ),
            Err(e) => ("failed", Some(e.to_string())),
        };
        let operation = result.as_ref().ok().and_then(|a| a.operation.clone());
        for r in repairs {
            let ok = result.is_ok();
            if ok {
                requested += 1;
            } else {
                failed += 1;
            }
            tracing::info!(scale_set = %id, instance = %r.instance_id, incident = %r.incident, action = %action,
                attempt = r.attempt, outcome, reason = %r.reason.describe(), "repair decided");
            journal.push(Entry {
                scale_set: id.clone(),
                instance_id: r.instance_id.clone(),
                at: now,
                incident: r.incident.clone(),
                kind: EntryKind::Repair,
                action: Some(action),
                attempt: r.attempt,
                outcome: outcome.into(),
                reason: match &note {
                    Some(note) => format!("{}; {note}", r.reason.describe()),
                    None => r.reason.describe(),
                },
                evidence: {
                    let mut evidence = r.evidence.clone();
                    // The Azure-AsyncOperation URL, for an operator following the repair in ARM.
                    if let Some(op) = &operation {
                        evidence["operation"] = json!(op);
                    }
                    evidence
                },
                dry_run: settings.dry_run,
            });
        }
    }
    (requested, failed)
}
