//! One repair pass (`monitor-status`): gather → decide → claim → act → journal → report. Reads
//! only the tables; calls the Compute API only to act.

use crate::alert::{Alert, Kind as AlertKind, Notifier};
use crate::compute::{Accepted, Compute, ComputeError};
use crate::incident::Incident;
use crate::journal::{Entry, EntryKind};
use crate::mirror::ScaleSetRecord;
use crate::plan::{decide, pipeline_fault, Brakes, Observation, Plan, Step, Transition};
use crate::policy::RepairAction;
use crate::scaleset::ScaleSetId;
use crate::settings::{Settings, WatchedScaleSet};
use crate::state::{Store, StoreError};
use futures::StreamExt;
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use time::OffsetDateTime;

/// Scale sets read concurrently by a repair pass.
const GATHER_CONCURRENCY: usize = 4;

#[derive(Debug, Clone, Serialize, Default)]
pub struct SetReport {
    pub scale_set: String,
    pub total: usize,
    pub healthy: usize,
    pub unhealthy: usize,
    pub repairs_requested: usize,
    pub repairs_failed: usize,
    /// Transitions another overlapping pass claimed first.
    pub claimed_elsewhere: usize,
    pub withheld: usize,
    pub outcomes: usize,
    pub paused: Option<&'static str>,
    pub next_check_s: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RepairReport {
    pub dry_run: bool,
    pub pipeline_fault: bool,
    pub scale_sets: Vec<SetReport>,
    /// What the pass cost (approximate when passes of this process overlap).
    pub table_requests: u64,
    pub compute_calls: u64,
}

pub async fn repair_all(
    store: &Store,
    compute: &Compute,
    notifier: &Notifier,
    settings: &Settings,
    now: OffsetDateTime,
) -> Result<RepairReport, StoreError> {
    let mut observations = Vec::with_capacity(settings.scale_sets.len());
    let (requests_before, calls_before) = (store.requests(), compute.observed().calls());
    let records = store.scale_sets().await?;
    // A few scale sets are read at once: the pass is bound by table round trips, not CPU.
    let reads: Vec<_> = settings
        .scale_sets
        .iter()
        .map(|watched| gather(store, &watched.id, records.get(&watched.id.key()).cloned()))
        .collect();
    let mut reads = futures::stream::iter(reads).buffered(GATHER_CONCURRENCY);
    while let Some(observation) = reads.next().await {
        observations.push(observation?);
    }
    drop(reads);
    let pairs: Vec<(&Observation, &crate::policy::Policy)> = observations
        .iter()
        .zip(&settings.scale_sets)
        .map(|(o, w)| (o, &w.policy))
        .collect();
    let fault = pipeline_fault(&pairs, now);
    if let Some(f) = fault {
        tracing::error!(silent = f.silent, reporting = f.reporting, decision = "pause",
            "most of the fleet fell silent at once: heartbeat pipeline fault; no repairs until heartbeats return");
    }
    let brakes = Brakes {
        mirror_max_age: settings.mirror_max_age,
        full_resync: settings.full_resync,
        pipeline_fault: fault,
    };
    let mut reports = Vec::new();
    let mut resyncs = Vec::new();
    for (watched, obs) in settings.scale_sets.iter().zip(&observations) {
        let plan = decide(obs, &watched.policy, brakes, now);
        if let Some(why) = plan.resync.filter(|_| !resync_pending(obs.record.as_ref())) {
            tracing::debug!(scale_set = %watched.id, why, "next mirror pass asked to read this scale set");
            resyncs.push(watched.id.clone());
        }
        let (report, alerts) = carry_out(
            store,
            compute,
            settings,
            watched,
            plan,
            obs.record.as_ref(),
            now,
        )
        .await?;
        notifier.send(alerts);
        reports.push(report);
    }
    // Asked for at the end, in one batch: a pass that stops before this point leaves its incidents
    // in flight, and the next pass asks again.
    store.request_resync(&resyncs, now).await?;
    Ok(RepairReport {
        dry_run: settings.dry_run,
        pipeline_fault: fault.is_some(),
        scale_sets: reports,
        table_requests: store.requests() - requests_before,
        compute_calls: compute.observed().calls() - calls_before,
    })
}

/// Reads what `decide` looks at for one scale set (also the operator's `handler status`).
pub async fn gather(
    store: &Store,
    id: &ScaleSetId,
    record: Option<ScaleSetRecord>,
) -> Result<Observation, StoreError> {
    let (instances, bad_instances) = store.mirror(id).await?;
    let (heartbeats, bad_heartbeats) = store.heartbeats(id).await?;
    let (incidents, bad_incidents) = store.incidents(id).await?;
    for bad in bad_instances
        .0
        .iter()
        .chain(&bad_heartbeats.0)
        .chain(&bad_incidents.0)
    {
        tracing::warn!(scale_set = %id, error = %bad, "skipped an unreadable row");
    }
    Ok(Observation {
        record,
        instances,
        heartbeats,
        incidents,
    })
}

fn entry(
    id: &ScaleSetId,
    instance: &str,
    incident: &str,
    kind: EntryKind,
    dry_run: bool,
    now: OffsetDateTime,
) -> Entry {
    Entry {
        scale_set: id.clone(),
        instance_id: instance.to_string(),
        at: now,
        incident: incident.to_string(),
        kind,
        action: None,
        attempt: 0,
        outcome: String::new(),
        reason: String::new(),
        evidence: serde_json::Value::Null,
        dry_run,
    }
}

async fn carry_out(
    store: &Store,
    compute: &Compute,
    settings: &Settings,
    watched: &WatchedScaleSet,
    plan: Plan,
    record: Option<&ScaleSetRecord>,
    now: OffsetDateTime,
) -> Result<(SetReport, Vec<Alert>), StoreError> {
    let id = &watched.id;
    let dry_run = settings.dry_run;
    let capacity = record.and_then(|r| r.capacity);
    let alert = |kind, t: Option<&Transition>, reason: String| Alert {
        kind,
        scale_set: id.resource_id(),
        instance: t.map(|t| t.incident.target.clone()),
        incident: t.map(|t| t.incident.id.clone()),
        action: t.and_then(|t| t.incident.action).map(|a| a.to_string()),
        attempt: t.map(|t| t.incident.attempt),
        reason,
        at: now,
        dry_run,
    };
    let mut alerts = Vec::new();
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

    // Pause and resume are the breaker's edges: alert once when it changes, not every pass.
    let breaker_now = plan.paused().map(|w| w.label());
    let breaker_before = record.and_then(|r| r.breaker.as_deref());
    if breaker_now != breaker_before {
        store.set_breaker(id, breaker_now, now).await?;
        match plan.paused() {
            Some(why) => {
                tracing::warn!(scale_set = %id, decision = "pause", why = why.label(), reason = %why.describe(), "repairs paused");
                alerts.push(alert(AlertKind::Pause, None, why.describe()));
            }
            None => {
                tracing::info!(scale_set = %id, decision = "resume", was = breaker_before.unwrap_or(""), "repairs resumed");
                alerts.push(alert(
                    AlertKind::Resume,
                    None,
                    format!("the brake `{}` released", breaker_before.unwrap_or("")),
                ));
            }
        }
    }
    let mut report = SetReport {
        scale_set: id.key(),
        total: plan.total,
        healthy: plan.healthy,
        unhealthy: plan.unhealthy,
        withheld: plan.withheld.len(),
        paused: plan.paused().map(|w| w.label()),
        next_check_s: plan.next_check.map(|d| d.whole_seconds()),
        ..SetReport::default()
    };
    let mut journal = Vec::new();
    if let (Some(was), None) = (breaker_before, breaker_now) {
        journal.push(Entry {
            outcome: "resumed".into(),
            reason: format!("the brake `{was}` released; repairs resume"),
            ..entry(id, "*", "", EntryKind::Withheld, dry_run, now)
        });
    }

    for w in &plan.withheld {
        let instance = w.instance_id.as_deref().unwrap_or("*");
        tracing::info!(scale_set = %id, instance, decision = "withheld", why = w.why.label(), reason = %w.why.describe(), "repair withheld");
        // A running or given-up incident already has its rows, and a scale-set pause its row from
        // the pass it began (the breaker column remembers it): repeating them every pass would bury
        // the rest.
        let repeated_pause = w.instance_id.is_none() && breaker_now == breaker_before;
        if repeated_pause
            || matches!(
                w.why,
                crate::plan::WithheldReason::RepairInFlight { .. }
                    | crate::plan::WithheldReason::GivenUp { .. }
            )
        {
            continue;
        }
        journal.push(Entry {
            outcome: w.why.label().into(),
            reason: w.why.describe(),
            evidence: json!(w.why),
            ..entry(id, instance, "", EntryKind::Withheld, dry_run, now)
        });
    }

    // Claim every transition; only what this pass claimed is acted on.
    let mut claimed: Vec<Claimed> = Vec::new();
    for t in plan.transitions {
        match store
            .claim_incident(id, &t.incident, t.claim.as_deref())
            .await?
        {
            Some(version) => claimed.push((t, version)),
            None => {
                report.claimed_elsewhere += 1;
                tracing::info!(scale_set = %id, instance = %t.incident.target, incident = %t.incident.id, step = t.step.label(),
                    decision = "skipped", "another monitor-status run claimed this incident first");
            }
        }
    }

    let mut by_action: BTreeMap<&'static str, (RepairAction, Vec<Claimed>)> = BTreeMap::new();
    for (t, version) in claimed {
        match t.step {
            Step::Close(_) => {
                report.outcomes += 1;
                tracing::info!(scale_set = %id, instance = %t.incident.target, incident = %t.incident.id, decision = "close", outcome = t.incident.closing(), "incident closed");
                journal.push(Entry {
                    action: t.incident.action,
                    attempt: t.incident.attempt,
                    outcome: t.incident.closing().into(),
                    reason: format!(
                        "{} after {} attempt(s)",
                        t.incident.closing(),
                        t.incident.attempt
                    ),
                    ..outcome_entry(&t)
                });
            }
            Step::GiveUp => {
                report.outcomes += 1;
                alerts.push(alert(
                    AlertKind::GiveUp,
                    Some(&t),
                    format!(
                        "still unhealthy after {} attempt(s); needs a person",
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
                        "still unhealthy after {} attempt(s) (HEALER_MAX_ATTEMPTS); needs a person",
                        t.incident.attempt
                    ),
                    evidence: t.evidence.clone(),
                    ..outcome_entry(&t)
                });
            }
            Step::Open | Step::Escalate => {
                if let Some(action) = t.action() {
                    by_action
                        .entry(action.as_str())
                        .or_insert((action, Vec::new()))
                        .1
                        .push((t, version));
                }
            }
        }
    }

    for (action, group) in by_action.into_values() {
        let ids: Vec<String> = group
            .iter()
            .map(|(t, _)| t.incident.target.clone())
            .collect();
        let result = if dry_run {
            Ok(Accepted { operation: None })
        } else {
            send(compute, id, action, &ids, capacity).await
        };
        let (outcome, note) = match &result {
            Ok(_) if dry_run => ("dry_run", Some("dry run: nothing was called".to_string())),
            Ok(_) => ("requested", None),
            Err(ComputeError::Throttled { retry_after_s }) => (
                "throttled",
                Some(format!("Compute API throttled; decided again on a later pass (retry after {retry_after_s} s)")),
            ),
            Err(e) => ("failed", Some(e.to_string())),
        };
        let operation = result.as_ref().ok().and_then(|a| a.operation.clone());
        if let Err(ComputeError::Throttled { retry_after_s }) = &result {
            // Later passes (and the mirror sync) hold off until Retry-After has passed.
            store
                .set_throttled(id, now + time::Duration::seconds(*retry_after_s))
                .await?;
        }
        for (t, version) in group {
            if result.is_ok() {
                report.repairs_requested += 1;
                let why = t.reason.as_ref().map(|r| r.describe()).unwrap_or_default();
                alerts.push(alert(AlertKind::Repair, Some(&t), why));
            } else {
                report.repairs_failed += 1;
                // Not carried out: give the claim back, so the attempt is not counted.
                release(store, id, &t, &version).await?;
            }
            let reason = t.reason.as_ref().map(|r| r.describe()).unwrap_or_default();
            tracing::info!(scale_set = %id, instance = %t.incident.target, incident = %t.incident.id, action = %action,
                attempt = t.incident.attempt, step = t.step.label(), outcome, reason = %reason, "repair decided");
            let mut evidence = t.evidence.clone();
            if let Some(op) = &operation {
                // The Azure-AsyncOperation URL, for an operator following the repair in ARM.
                evidence["operation"] = json!(op);
            }
            journal.push(Entry {
                action: Some(action),
                attempt: t.incident.attempt,
                outcome: outcome.into(),
                reason: match &note {
                    Some(note) => format!("{reason}; {note}"),
                    None => reason,
                },
                evidence,
                ..entry(
                    id,
                    &t.incident.target,
                    &t.incident.id,
                    EntryKind::Repair,
                    dry_run,
                    now,
                )
            });
        }
    }
    store.append_journal(&journal).await?;
    Ok((report, alerts))
}

/// A transition this pass claimed, with the row version the claim wrote.
type Claimed = (Transition, String);

/// One batched Compute call for every instance that takes this action.
async fn send(
    compute: &Compute,
    id: &ScaleSetId,
    action: RepairAction,
    ids: &[String],
    capacity: Option<i64>,
) -> Result<Accepted, ComputeError> {
    match action {
        RepairAction::Delete => compute.delete_instances(id, ids).await,
        RepairAction::Replace => {
            let accepted = compute.delete_instances(id, ids).await?;
            // The delete lowers capacity; setting it back makes the scale set create fresh VMs.
            if let Some(c) = capacity {
                compute.set_capacity(id, c).await?;
            }
            Ok(accepted)
        }
        RepairAction::Reimage => compute.reimage_instances(id, ids).await,
        RepairAction::Restart => compute.restart_instances(id, ids).await,
    }
}

/// Whether the next mirror pass reads the scale set anyway: never mirrored, or a change already
/// pending (whose time the mirror-behind brake measures from, so it is not moved on).
fn resync_pending(record: Option<&ScaleSetRecord>) -> bool {
    match record.and_then(|r| r.synced_at) {
        None => true,
        Some(synced) => record
            .and_then(|r| r.changed_at)
            .is_some_and(|c| c >= synced),
    }
}

/// Puts an incident row back as it was before this pass claimed it.
async fn release(
    store: &Store,
    id: &ScaleSetId,
    t: &Transition,
    version: &str,
) -> Result<(), StoreError> {
    let restored: Option<&Incident> = t.previous.as_ref();
    if store
        .release_incident(id, &t.incident.target, restored, version)
        .await?
    {
        Ok(())
    } else {
        tracing::warn!(scale_set = %id, instance = %t.incident.target, "could not release a claim (changed meanwhile); its deadline will expire it");
        Ok(())
    }
}
