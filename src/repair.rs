//! One repair pass (`monitor-status`): gather → follow → decide → claim → act → journal → report.
//! Reads the tables; calls the Compute API only to act and to read how its own operations went.

use crate::alert::{Alert, Kind as AlertKind, Notifier};
use crate::compute::{Accepted, ArmError, Compute, ComputeError};
use crate::deadline::Deadline;
use crate::incident::{Call, Hold, Incident, Phase, Stage};
use crate::journal::{Entry, EntryKind};
use crate::mirror::ScaleSetRecord;
use crate::plan::{decide, pipeline_fault, Brakes, Observation, Plan, Step, Transition};
use crate::scaleset::{Orchestration, ScaleSetId};
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
    /// Steps ARM accepted this pass (or, in a dry run, would have been sent).
    pub repairs_requested: usize,
    /// Steps ARM did not take this pass (throttled, busy, refused, no answer).
    pub repairs_failed: usize,
    /// Transitions another overlapping pass claimed first.
    pub claimed_elsewhere: usize,
    pub withheld: usize,
    pub outcomes: usize,
    /// Operations of earlier steps found ended this pass, and how many of them failed.
    pub operations_ended: usize,
    pub operations_failed: usize,
    /// Steps left to the next pass: the pass deadline was too close for another call.
    pub deferred: usize,
    pub paused: Option<&'static str>,
    /// How long the brake has held, from when a pass first found it.
    pub paused_for_s: Option<i64>,
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
    let deadline = Deadline::after(
        settings.pass_deadline.unsigned_abs(),
        settings.call_timeout.unsigned_abs(),
    );
    let (requests_before, calls_before) = (store.requests(), compute.observed().calls());
    // Every scale set is read before any is decided (the pipeline-fault brake weighs the whole
    // fleet): storage too slow for that within the deadline fails the pass, as storage down does.
    let observations = deadline
        .bound(async {
            let records = store.scale_sets().await?;
            // A few scale sets are read at once: the pass is bound by table round trips, not CPU.
            let reads: Vec<_> = settings
                .scale_sets
                .iter()
                .map(|watched| gather(store, &watched.id, records.get(&watched.id.key()).cloned()))
                .collect();
            let mut reads = futures::stream::iter(reads).buffered(GATHER_CONCURRENCY);
            let mut observations = Vec::with_capacity(settings.scale_sets.len());
            while let Some(observation) = reads.next().await {
                observations.push(observation?);
            }
            Ok::<_, StoreError>(observations)
        })
        .await
        .ok_or_else(|| StoreError::Unavailable {
            table: "repairs",
            op: "reading every scale set",
            detail: format!(
                "not done within HEALER_PASS_DEADLINE ({} s)",
                settings.pass_deadline.whole_seconds()
            ),
        })??;
    let mut observations = observations;

    // How the operations of earlier passes went, before deciding on them.
    let mut followed = Vec::with_capacity(observations.len());
    for (watched, obs) in settings.scale_sets.iter().zip(observations.iter_mut()) {
        let journal = if settings.dry_run {
            Vec::new()
        } else {
            crate::follow::follow(store, compute, &watched.id, obs, &deadline, now).await?
        };
        followed.push(journal);
    }

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
        dry_run: settings.dry_run,
        lease: settings.lease(),
    };
    let mut reports = Vec::new();
    let mut resyncs = Vec::new();
    for ((watched, mut obs), journal) in settings.scale_sets.iter().zip(observations).zip(followed)
    {
        // A 429 met anywhere in the subscription this pass holds this scale set too.
        if let (Some(record), Some(until)) = (
            obs.record.as_mut(),
            compute.observed().throttled_until(&watched.id.subscription),
        ) {
            record.throttled_until = Some(record.throttled_until.map_or(until, |t| t.max(until)));
        }
        let plan = decide(&obs, &watched.policy, brakes, now);
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
            journal,
            &deadline,
            now,
        )
        .await?;
        notifier.send(alerts);
        reports.push(report);
    }
    crate::throttle::hold_subscriptions(store, compute, settings, now).await?;
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
fn after(
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

#[allow(clippy::too_many_arguments)]
async fn carry_out(
    store: &Store,
    compute: &Compute,
    settings: &Settings,
    watched: &WatchedScaleSet,
    plan: Plan,
    record: Option<&ScaleSetRecord>,
    followed: Vec<Entry>,
    deadline: &Deadline,
    now: OffsetDateTime,
) -> Result<(SetReport, Vec<Alert>), StoreError> {
    let id = &watched.id;
    let dry_run = settings.dry_run;
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
        operations_ended: followed.len(),
        operations_failed: followed.iter().filter(|e| e.outcome == "failed").count(),
        paused: plan.paused().map(|w| w.label()),
        paused_for_s: breaker_now.map(|_| {
            let since = record
                .and_then(|r| r.breaker_since)
                .filter(|_| breaker_now == breaker_before)
                .unwrap_or(now);
            (now - since).whole_seconds().max(0)
        }),
        next_check_s: plan.next_check.map(|d| d.whole_seconds()),
        ..SetReport::default()
    };
    let mut journal = followed;
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
                    | crate::plan::WithheldReason::DryRunHolds { .. }
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

    // What is known before acting is journaled before acting: a pass stopped midway keeps it.
    journal_rows(store, &journal).await?;
    let mut journal = Vec::new();

    // Closes and give-ups call nothing: claimed and journaled together, first. A dry run's step
    // is recorded as if ARM had taken it, so the dry run follows it to its deadline.
    let (mut acting, settling): (Vec<Transition>, Vec<Transition>) =
        plan.transitions.into_iter().partition(|t| t.step.acts());
    for t in acting.iter_mut().filter(|_| dry_run) {
        t.incident = t.incident.accepted(None);
    }
    for (t, _) in claim(store, id, settling, &mut report).await? {
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
    journal_rows(store, &journal).await?;

    // One call per kind of call, except steps split from a refused batch, and a Flexible scale
    // set's restarts, starts and reimages (the VM API takes one VM): one call each.
    let mode = Orchestration::parse(record.and_then(|r| r.orchestration_mode.as_deref()));
    let mut calls: BTreeMap<(Call, Option<String>), Vec<Transition>> = BTreeMap::new();
    for t in acting {
        if let Some(call) = t.incident.call() {
            let one_vm = mode == Orchestration::Flexible
                && matches!(
                    call,
                    Call::Restart | Call::Start | Call::Reimage | Call::Redeploy
                );
            let alone =
                ((t.alone() || one_vm) && call != Call::Grow).then(|| t.incident.target.clone());
            calls.entry((call, alone)).or_default().push(t);
        }
    }

    // Each call is claimed, journaled, sent and recorded before the next is claimed: a pass
    // stopped anywhere leaves at most one call whose answer is not recorded, and that one still
    // `Sending`, which the next passes find out from the instance (see `plan::unanswered`).
    for ((call, _), group) in calls {
        if !dry_run && !deadline.fits_a_call() {
            defer(store, id, &group, deadline, now).await?;
            report.deferred += group.len();
            continue;
        }
        let group: Vec<Transition> = group
            .into_iter()
            .map(|mut t| {
                if !dry_run {
                    t.incident = t.incident.sending_at(now);
                }
                t
            })
            .collect();
        let group = claim(store, id, group, &mut report).await?;
        if group.is_empty() {
            continue;
        }
        let ids: Vec<String> = group
            .iter()
            .map(|(t, _)| t.incident.target.clone())
            .collect();
        let stage = group[0].0.incident.stage;
        // Stamped when written, not with the pass's clock: the intent, then the answer.
        let entry_of = |t: &Transition, kind, outcome: &str, reason: String, evidence| Entry {
            action: t.incident.action,
            attempt: t.incident.attempt,
            outcome: outcome.into(),
            reason,
            evidence,
            ..entry(
                id,
                &t.incident.target,
                &t.incident.id,
                kind,
                dry_run,
                OffsetDateTime::now_utc(),
            )
        };
        let reason_of =
            |t: &Transition| t.reason.as_ref().map(|r| r.describe()).unwrap_or_default();
        if !dry_run {
            // The intent, before the call: the journal shows every call ARM may have received.
            let intent: Vec<Entry> = group
                .iter()
                .map(|(t, _)| {
                    let mut evidence = t.evidence.clone();
                    evidence["call"] = json!(call);
                    evidence["stage"] = json!(t.incident.stage);
                    entry_of(
                        t,
                        EntryKind::Intent,
                        "sending",
                        format!(
                            "{}; sending {} to the Compute API",
                            reason_of(t),
                            call.as_str()
                        ),
                        evidence,
                    )
                })
                .collect();
            journal_rows(store, &intent).await?;
        }
        let held = compute
            .observed()
            .throttled_until(&id.subscription)
            .filter(|u| *u > now);
        let result = if dry_run {
            Ok(Accepted { operation: None })
        } else if let Some(until) = held {
            // Another scale set of this subscription met a 429 earlier in this pass.
            Err(ComputeError::Throttled {
                retry_after_s: (until - now).whole_seconds().max(1),
            })
        } else {
            send(compute, id, call, &ids, mode).await
        };
        let next = result
            .as_ref()
            .err()
            .map(|e| error_policy(e, ids.len(), call, stage));
        let (outcome, note) = match (&result, &next) {
            (Ok(_), _) if dry_run => ("dry_run", Some("dry run: nothing was called".to_string())),
            (Ok(_), _) => ("requested", None),
            (Err(e), Some(next)) => (next.label(), Some(explain(e, next))),
            (Err(e), None) => ("failed", Some(e.to_string())),
        };
        let operation = result.as_ref().ok().and_then(|a| a.operation.clone());
        let mut answers: Vec<(Incident, String)> = Vec::new();
        let mut releases: Vec<Claimed> = Vec::new();
        let mut entries = Vec::new();
        for (t, version) in group {
            if result.is_ok() {
                report.repairs_requested += 1;
                if matches!(t.step, Step::Open | Step::Escalate | Step::Resend) {
                    alerts.push(alert(AlertKind::Repair, Some(&t), reason_of(&t)));
                }
            } else {
                report.repairs_failed += 1;
            }
            let reason = reason_of(&t);
            let action = t.incident.action.map(|a| a.as_str()).unwrap_or("");
            tracing::info!(scale_set = %id, instance = %t.incident.target, incident = %t.incident.id, action, call = call.as_str(),
                stage = t.incident.stage.as_str(), attempt = t.incident.attempt, step = t.step.label(), outcome, reason = %reason, "repair decided");
            let mut evidence = t.evidence.clone();
            evidence["call"] = json!(call);
            evidence["stage"] = json!(t.incident.stage);
            if let Some(op) = &operation {
                // The Azure-AsyncOperation URL, for an operator following the repair in ARM.
                evidence["operation"] = json!(op.url);
            }
            if let Some(arm) = result.as_ref().err().and_then(|e| e.arm()) {
                evidence["error"] = json!(arm);
            }
            let reason = match &note {
                Some(note) => format!("{reason}; {note}"),
                None => reason,
            };
            entries.push(entry_of(&t, EntryKind::Repair, outcome, reason, evidence));
            match after(&t.incident, &result, next.as_ref(), now) {
                _ if dry_run => {}
                None => releases.push((t, version)),
                Some(row) => answers.push((row, version)),
            }
        }
        let rows: Vec<(&Incident, Option<&str>)> = answers
            .iter()
            .map(|(row, version)| (row, Some(version.as_str())))
            .collect();
        for ((row, _), written) in answers.iter().zip(store.claim_incidents(id, &rows).await?) {
            if written.is_none() {
                tracing::warn!(scale_set = %id, instance = %row.target, "could not record a step's answer (its row changed meanwhile); its deadline bounds it");
            }
        }
        for (t, version) in &releases {
            release(store, id, t, version).await?;
        }
        journal_rows(store, &entries).await?;
    }
    Ok((report, alerts))
}

/// Claims transitions by replacing each row at the version read; only what this pass claimed
/// is acted on.
async fn claim(
    store: &Store,
    id: &ScaleSetId,
    transitions: Vec<Transition>,
    report: &mut SetReport,
) -> Result<Vec<Claimed>, StoreError> {
    if transitions.is_empty() {
        return Ok(Vec::new());
    }
    let claims: Vec<(&Incident, Option<&str>)> = transitions
        .iter()
        .map(|t| (&t.incident, t.claim.as_deref()))
        .collect();
    let versions = store.claim_incidents(id, &claims).await?;
    let mut claimed = Vec::new();
    for (t, version) in transitions.into_iter().zip(versions) {
        match version {
            Some(version) => claimed.push((t, version)),
            None => {
                report.claimed_elsewhere += 1;
                tracing::info!(scale_set = %id, instance = %t.incident.target, incident = %t.incident.id, step = t.step.label(),
                    decision = "skipped", "another monitor-status run claimed this incident first");
            }
        }
    }
    Ok(claimed)
}

/// Steps that no longer fit the pass: not claimed, so the next pass decides them afresh; the
/// journal says why they waited.
async fn defer(
    store: &Store,
    id: &ScaleSetId,
    group: &[Transition],
    deadline: &Deadline,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    let left = deadline.remaining().as_secs();
    let entries: Vec<Entry> = group
        .iter()
        .map(|t| {
            tracing::warn!(scale_set = %id, instance = %t.incident.target, step = t.step.label(), left_s = left,
                decision = "deferred", "the pass deadline is too close for another Compute call; left to the next pass");
            Entry {
                action: t.incident.action,
                attempt: t.incident.attempt,
                outcome: "pass_deadline".into(),
                reason: format!(
                    "{} step left to the next pass: {left} s of HEALER_PASS_DEADLINE left, less than one HEALER_CALL_TIMEOUT",
                    t.step.label()
                ),
                ..entry(id, &t.incident.target, &t.incident.id, EntryKind::Withheld, false, now)
            }
        })
        .collect();
    journal_rows(store, &entries).await
}

/// What the journal says of a call ARM did not take.
fn explain(e: &ComputeError, next: &Next) -> String {
    match next {
        Next::Release => format!("{e}; decided again on a later pass, no attempt spent"),
        Next::Pending(_) => format!("{e}; sent again on a later pass within the step's deadline, no attempt spent"),
        Next::Split => format!("{e}; the batch was refused, so each of its instances is sent on its own next pass"),
        Next::DeleteFirst => format!("{e}; the scale set cannot grow, so the broken instance is deleted first and the capacity restored after"),
        Next::Fail(arm) => format!("refused by ARM ({} {}): {}; the attempt is spent", arm.status, arm.code, arm.message),
        Next::Unknown => format!("{e}; whether it landed is unknown, so it is not sent again and the repair timeout decides"),
    }
}

/// A transition this pass claimed, with the row version the claim wrote.
type Claimed = (Transition, String);

/// One Compute call for every instance that takes it.
async fn send(
    compute: &Compute,
    id: &ScaleSetId,
    call: Call,
    ids: &[String],
    mode: Orchestration,
) -> Result<Accepted, ComputeError> {
    match call {
        // Both modes delete through the scale set's batch delete (Flexible: by VM name).
        Call::Delete => compute.delete_instances(id, ids).await,
        Call::Restart => compute.restart_instances(id, ids, mode).await,
        Call::Start => compute.start_instances(id, ids, mode).await,
        Call::Reimage => compute.reimage_instances(id, ids, mode).await,
        Call::Redeploy => compute.redeploy_instances(id, ids, mode).await,
        Call::Grow => {
            let n = u32::try_from(ids.len()).unwrap_or(u32::MAX);
            let grown = compute.grow(id, n).await?;
            tracing::info!(scale_set = %id, from = grown.from, to = grown.to, "capacity raised by {n} from a fresh read, with If-Match");
            Ok(grown.accepted)
        }
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
    if !store
        .release_incident(id, &t.incident.target, restored, version)
        .await?
    {
        tracing::warn!(scale_set = %id, instance = %t.incident.target, "could not release a claim (changed meanwhile); its deadline will expire it");
    }
    Ok(())
}

/// Rows are written to the journal, then counted: the repair metrics say what the journal holds.
async fn journal_rows(store: &Store, entries: &[Entry]) -> Result<(), StoreError> {
    store.append_journal(entries).await?;
    crate::telemetry::journaled(entries);
    Ok(())
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
