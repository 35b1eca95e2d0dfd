//! One repair pass (`monitor-status`): gather → follow → decide → claim → act → journal → report.
//! Reads the tables; calls the Compute API only to act and to read how its own operations went.

use crate::alert::{Alert, Kind as AlertKind, Notifier};
use crate::compute::{Accepted, Compute, ComputeError};
use crate::deadline::Deadline;
use crate::incident::{Call, Incident, Phase, Stage, Versioned};
use crate::journal::{Entry, EntryKind};
use crate::mirror::ScaleSetRecord;
use crate::operations::Operation;
use crate::plan::{decide, pipeline_fault, Brakes, Observation, Plan, Step, Transition};
use crate::scaleset::{Orchestration, ScaleSetId};
use crate::settings::Settings;
use crate::state::{Store, StoreError};
use futures::StreamExt;
use serde::Serialize;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use time::OffsetDateTime;

mod act;
mod error_policy;
mod settle;

use act::{claim, journal_rows, SetPass};
use error_policy::{after, explain};
pub use error_policy::{error_policy, Next};

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
    /// The scale set's long-running operation, as this pass left it.
    pub operation: Option<crate::operate::OperationReport>,
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
                .map(|watched| {
                    let record = records.get(&watched.id.key()).cloned();
                    gather(
                        store,
                        &watched.id,
                        record,
                        watched.policy.stateful.is_some(),
                    )
                })
                .collect();
            let mut reads = futures::stream::iter(reads).buffered(GATHER_CONCURRENCY);
            let mut observations = Vec::with_capacity(settings.scale_sets.len());
            while let Some(observation) = reads.next().await {
                observations.push(observation?);
            }
            // What long-running operations hold, for the whole fleet in one read.
            let (running, mut carried) = pass_operations(store).await?;
            let mut held = held_by(running.iter().map(|v| &v.value));
            for (watched, obs) in settings.scale_sets.iter().zip(observations.iter_mut()) {
                obs.held = held.remove(&watched.id.key()).unwrap_or_default();
                obs.carried = carried.remove(&watched.id.key()).unwrap_or_default();
                obs.operation_write = running
                    .iter()
                    .find_map(|v| crate::operations::write_in_flight(&v.value, &watched.id));
            }
            Ok::<_, StoreError>((observations, running))
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
    let (mut observations, running) = observations;

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
    let mut seen = Vec::with_capacity(observations.len());
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
            tracing::debug!(scale_set = %watched.id, why = why.label(), "next mirror pass asked to read this scale set");
            resyncs.push(watched.id.clone());
        }
        let pass = SetPass {
            store,
            compute,
            id: &watched.id,
            dry_run: settings.dry_run,
            deadline: &deadline,
            now,
            mode: Orchestration::parse(
                obs.record
                    .as_ref()
                    .and_then(|r| r.orchestration_mode.as_deref()),
            ),
            policy: &watched.policy,
            by: "timer",
        };
        let brake = plan.paused().cloned();
        // A grow or delete of the healer's that goes out this pass: the operation's writes wait.
        let healer_writes = plan
            .transitions
            .iter()
            .any(|t| t.step.acts() && matches!(t.call(), Some(Call::Grow | Call::Delete)));
        let (report, alerts) = carry_out(&pass, plan, obs.record.as_ref(), journal).await?;
        notifier.send(alerts);
        reports.push(report);
        seen.push(Seen {
            obs,
            brake,
            healer_writes,
            mode: pass.mode,
        });
    }
    // Long-running operations take their step after the healer's repairs on every set: both see
    // the same observations, and neither touches what the other holds. A swap sees both its sets.
    let index = |id: &ScaleSetId| settings.scale_sets.iter().position(|w| w.id == *id);
    for op in running {
        let Some(i) = index(&op.value.scale_set) else {
            continue; // its scale set is not watched (any more): left as it is
        };
        let (watched, at) = (&settings.scale_sets[i], &seen[i]);
        let partner = op.value.partner.as_ref().and_then(index).map(|j| {
            let p = &seen[j];
            crate::operate::Partner {
                id: &settings.scale_sets[j].id,
                obs: &p.obs,
                policy: &settings.scale_sets[j].policy,
                brake: p.brake.as_ref(),
                healer_writes: p.healer_writes,
            }
        });
        let operate = crate::operate::OperatePass {
            store,
            compute,
            id: &watched.id,
            obs: &at.obs,
            policy: &watched.policy,
            brake: at.brake.as_ref(),
            mode: at.mode,
            dry_run: settings.dry_run,
            healer_writes: at.healer_writes,
            deadline: &deadline,
            now,
            partner,
        };
        let held: Vec<ScaleSetId> = op.value.held().iter().map(|(s, _)| (*s).clone()).collect();
        let (op_report, alerts, resync) = crate::operate::operate(&operate, op).await?;
        notifier.send(alerts);
        if resync {
            for set in held {
                if !resyncs.contains(&set) {
                    resyncs.push(set);
                }
            }
        }
        reports[i].operation = Some(op_report);
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

/// One scale set's gather → follow → decide → claim → act → journal, outside the timer: what
/// `monitor-events` runs the moment evidence against an instance of the set arrives (issue 19).
/// Every per-set brake and every claim rule is the timer pass's own (both sides claim by ETag, so
/// racing each other they never act twice); the fleet-wide pipeline-fault brake is the timer's to
/// judge — while its last pass found one, or while most of this set is silent, nothing is done
/// here (`None`). Long-running operations are left to the timer. Bounded by `budget`: a call
/// that no longer fits is left to the next pass, as in any pass.
pub async fn repair_one(
    store: &Store,
    compute: &Compute,
    notifier: &Notifier,
    settings: &Settings,
    watched: &crate::settings::WatchedScaleSet,
    budget: std::time::Duration,
    now: OffsetDateTime,
) -> Result<Option<SetReport>, StoreError> {
    let id = &watched.id;
    let deadline = Deadline::after(budget, settings.call_timeout.unsigned_abs());
    let record = store.scale_set(id).await?;
    // A pipeline fault is the fleet's, judged by the timer pass over every set; this set alone
    // cannot say when it ends. (A set recovering from any set-wide pause settles first: the plan
    // holds it, here as in the timer pass.)
    if let Some(brake @ "pipeline_fault") = record.as_ref().and_then(|r| r.brake.as_deref()) {
        tracing::info!(scale_set = %id, decision = "left_to_timer", brake, "the last pass found a pipeline fault: the set is left to the timer");
        return Ok(None);
    }
    let mut obs = gather(store, id, record, watched.policy.stateful.is_some()).await?;
    let (running, mut carried) = pass_operations(store).await?;
    obs.held = held_by(running.iter().map(|v| &v.value))
        .remove(&id.key())
        .unwrap_or_default();
    obs.carried = carried.remove(&id.key()).unwrap_or_default();
    obs.operation_write = running
        .iter()
        .find_map(|v| crate::operations::write_in_flight(&v.value, id));
    if pipeline_fault(&[(&obs, &watched.policy)], now).is_some() {
        tracing::info!(scale_set = %id, decision = "left_to_timer", "most of the set is silent: the fleet-wide pipeline check is the timer's");
        return Ok(None);
    }
    let followed = if settings.dry_run {
        Vec::new()
    } else {
        crate::follow::follow(store, compute, id, &mut obs, &deadline, now).await?
    };
    if let (Some(record), Some(until)) = (
        obs.record.as_mut(),
        compute.observed().throttled_until(&id.subscription),
    ) {
        record.throttled_until = Some(record.throttled_until.map_or(until, |t| t.max(until)));
    }
    let brakes = Brakes {
        mirror_max_age: settings.mirror_max_age,
        full_resync: settings.full_resync,
        pipeline_fault: None,
        dry_run: settings.dry_run,
        lease: settings.lease(),
    };
    let plan = decide(&obs, &watched.policy, brakes, now);
    let resync = plan
        .resync
        .filter(|_| !resync_pending(obs.record.as_ref()))
        .is_some();
    let pass = SetPass {
        store,
        compute,
        id,
        dry_run: settings.dry_run,
        deadline: &deadline,
        now,
        mode: Orchestration::parse(
            obs.record
                .as_ref()
                .and_then(|r| r.orchestration_mode.as_deref()),
        ),
        policy: &watched.policy,
        by: "evaluation",
    };
    let (report, alerts) = carry_out(&pass, plan, obs.record.as_ref(), followed).await?;
    notifier.send(alerts);
    if resync {
        store.request_resync(std::slice::from_ref(id), now).await?;
    }
    Ok(Some(report))
}

/// What one scale set's pass left for the operations that follow the repairs.
struct Seen {
    obs: Observation,
    brake: Option<crate::plan::WithheldReason>,
    healer_writes: bool,
    mode: Orchestration,
}

/// Reads what `decide` looks at for one scale set (also the operator's `handler status`);
/// `stateful`: its slots too.
pub async fn gather(
    store: &Store,
    id: &ScaleSetId,
    record: Option<ScaleSetRecord>,
    stateful: bool,
) -> Result<Observation, StoreError> {
    let slotted = if stateful {
        let (slots, bad) = store.slots(id).await?;
        for bad in &bad.0 {
            tracing::warn!(scale_set = %id, error = %bad, "skipped an unreadable slot row");
        }
        slots.into_iter().map(|v| v.value.instance).collect()
    } else {
        Default::default()
    };
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
        held: HashMap::new(),
        operation_write: None,
        carried: HashMap::new(),
        slotted,
    })
}

/// The long-running operations not yet over, with their versions, read once per pass for every
/// set; unreadable rows are logged and skipped so one bad row cannot stop repairs.
pub async fn running_operations(store: &Store) -> Result<Vec<Versioned<Operation>>, StoreError> {
    Ok(pass_operations(store).await?.0)
}

/// How each instance's last stateful replacement ended, by scale set key then instance.
type Carried = HashMap<String, HashMap<String, crate::operations::carry::Outcome>>;

/// The operations not yet over, and how the stateful replacements that are over ended (the
/// latest of each instance), in one read for every set.
async fn pass_operations(
    store: &Store,
) -> Result<(Vec<Versioned<Operation>>, Carried), StoreError> {
    let (ops, skipped) = store.operations(None).await?;
    for bad in &skipped.0 {
        tracing::warn!(error = %bad, "skipped an unreadable operation row");
    }
    let mut carried: Carried = HashMap::new();
    // Sorted by start: a later replacement of the same instance overwrites an earlier one.
    for v in &ops {
        if let Some((instance, outcome)) = crate::operations::carry::outcome(&v.value) {
            carried
                .entry(v.value.scale_set.key())
                .or_default()
                .insert(instance, outcome);
        }
    }
    let running = ops
        .into_iter()
        .filter(|v| !v.value.state.is_over())
        .collect();
    Ok((running, carried))
}

/// The instances each running operation holds, by scale set key, then instance, with the
/// operation's id.
pub fn held_by<'a>(
    running: impl IntoIterator<Item = &'a Operation>,
) -> HashMap<String, HashMap<String, String>> {
    let mut held: HashMap<String, HashMap<String, String>> = HashMap::new();
    for op in running {
        for (set, instances) in op.held() {
            let set = held.entry(set.key()).or_default();
            for instance in instances {
                set.insert(instance.clone(), op.id.clone());
            }
        }
    }
    held
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

/// One scale set's plan carried out: the brake's edges alerted, what is withheld journaled, the
/// closes and give-ups settled, then the steps that call the Compute API acted on.
async fn carry_out(
    pass: &SetPass<'_>,
    plan: Plan,
    record: Option<&ScaleSetRecord>,
    followed: Vec<Entry>,
) -> Result<(SetReport, Vec<Alert>), StoreError> {
    let SetPass {
        store,
        id,
        dry_run,
        now,
        mode,
        ..
    } = *pass;
    let alert = |kind, t: Option<&Transition>, reason: String| pass.alert(kind, t, reason);
    let mut alerts = Vec::new();

    // Pause and resume are the brake's edges: alert once when it changes, not every pass.
    let brake_now = plan.paused().map(|w| w.label());
    let brake_before = record.and_then(|r| r.brake.as_deref());
    if brake_now != brake_before {
        store.set_brake(id, brake_now, now).await?;
        match plan.paused() {
            // Still the same pause to an operator: it ends when the set has settled.
            Some(why @ crate::plan::WithheldReason::Settling { .. }) => {
                tracing::info!(scale_set = %id, decision = "settling", was = brake_before.unwrap_or(""), reason = %why.describe(), "the set settles before repairs resume");
            }
            Some(why) => {
                tracing::warn!(scale_set = %id, decision = "pause", why = why.label(), reason = %why.describe(), "repairs paused");
                alerts.push(alert(AlertKind::Pause, None, why.describe()));
            }
            None => {
                tracing::info!(scale_set = %id, decision = "resume", was = brake_before.unwrap_or(""), "repairs resumed");
                alerts.push(alert(
                    AlertKind::Resume,
                    None,
                    format!("the brake `{}` released", brake_before.unwrap_or("")),
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
        paused_for_s: brake_now.map(|_| {
            let since = record
                .and_then(|r| r.brake_since)
                .filter(|_| brake_now == brake_before)
                .unwrap_or(now);
            (now - since).whole_seconds().max(0)
        }),
        next_check_s: plan.next_check.map(|d| d.whole_seconds()),
        ..SetReport::default()
    };
    let mut journal = followed;
    if let (Some(was), None) = (brake_before, brake_now) {
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
        // the pass it began (the brake column remembers it): repeating them every pass would bury
        // the rest.
        let repeated_pause = w.instance_id.is_none() && brake_now == brake_before;
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

    // Closes and give-ups call nothing: claimed and journaled together, first. A dry run's step
    // is recorded as if ARM had taken it, so the dry run follows it to its deadline.
    let (mut acting, settling): (Vec<Transition>, Vec<Transition>) =
        plan.transitions.into_iter().partition(|t| t.step.acts());
    for t in acting.iter_mut().filter(|_| dry_run) {
        t.incident = t.incident.accepted(None);
    }
    settle::settle(pass, settling, &mut report, &mut alerts).await?;

    let calls = act::group(acting, mode);
    act::act(pass, calls, &mut report, &mut alerts).await?;
    Ok((report, alerts))
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
