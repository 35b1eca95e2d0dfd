//! One mirror pass (`monitor-state`): read each scale set that is due from the Compute API, write
//! only what changed, drop instances that are gone, and record the sync on the scale set's row.

use crate::compute::{Compute, ComputeError, READ_RESERVE};
use crate::deadline::Deadline;
use crate::journal::stamp;
use crate::mirror::{diff, Instance, MirroredInstance, ScaleSetRecord};
use crate::resync::{self, Hold, Read};
use crate::scaleset::{Orchestration, ScaleSetId};
use crate::settings::Settings;
use crate::slot::{Slot, Stateful};
use crate::state::{Store, StoreError};
use futures::{FutureExt, StreamExt};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use time::{Duration, OffsetDateTime};
use tokio::sync::Mutex;

/// Scale sets read at once by a mirror pass: reads wait on the Compute API, not on CPU, and a
/// few at a time stay well inside its read budget.
const SYNC_CONCURRENCY: usize = 4;

/// Journal rows deleted per scale set per full read, at most: one query and ten batch requests;
/// a backlog (a first deployment of the retention) drains over the next full reads.
pub const JOURNAL_PRUNE_BATCH: usize = 1000;

/// How one scale set's mirror read went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncOutcome {
    /// Read and written.
    Synced,
    /// Not due: nothing announced a change and the full resync is not due yet.
    Fresh,
    /// Left to the next pass: the read budget or the pass deadline.
    Deferred,
    /// Cut at the pass deadline; the mirror keeps its last state.
    TimedOut,
    /// The Compute API asked us to wait.
    Throttled,
    /// The scale set does not exist (its mirror was emptied).
    NotFound,
    /// The read failed: the Compute error's label (`refused`, `transient`, `no_answer`, …).
    Failed(&'static str),
}

impl SyncOutcome {
    pub fn label(self) -> &'static str {
        match self {
            SyncOutcome::Synced => "synced",
            SyncOutcome::Fresh => "fresh",
            SyncOutcome::Deferred => "deferred",
            SyncOutcome::TimedOut => "timed_out",
            SyncOutcome::Throttled => "throttled",
            SyncOutcome::NotFound => "not_found",
            SyncOutcome::Failed(label) => label,
        }
    }
}

/// Reports carry the label, as the invocation's answer and `handler status` show it.
impl Serialize for SyncOutcome {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.label())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SetSync {
    pub scale_set: String,
    /// `synced`, `fresh` (not due), `deferred` (read budget, or the pass deadline near),
    /// `timed_out` (cut at the pass deadline), `throttled`, `not_found`, or the Compute error's
    /// label.
    pub outcome: SyncOutcome,
    /// Why the set was read (`first_sync`, `changed`, `retry`, `full_resync`), if it was.
    pub read: Option<&'static str>,
    pub instances: usize,
    pub written: usize,
    pub removed: usize,
    /// Journal rows past `HEALER_JOURNAL_DAYS` deleted after a full read.
    pub journal_pruned: usize,
    pub detail: Option<String>,
}

impl SetSync {
    fn new(id: &ScaleSetId, outcome: SyncOutcome, read: Option<Read>) -> Self {
        SetSync {
            scale_set: id.key(),
            outcome,
            read: read.map(Read::label),
            instances: 0,
            written: 0,
            removed: 0,
            journal_pruned: 0,
            detail: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    pub scale_sets: Vec<SetSync>,
    pub compute_calls: u64,
    /// Table requests of the pass (approximate when passes of this process overlap).
    pub table_requests: u64,
}

/// Mirrors every watched scale set that is due (see [`crate::resync`]). A failure of one set is
/// recorded on its row and does not stop the others; only storage being unreachable fails the pass.
pub async fn sync_all(
    store: &Store,
    compute: &Compute,
    settings: &Settings,
    now: OffsetDateTime,
) -> Result<SyncReport, StoreError> {
    let calls_before = compute.observed().calls();
    let requests_before = store.requests();
    let records = store.scale_sets().await?;
    // Least recently synced first, so a pass cut short by the rate budget is caught up next time.
    let mut order: Vec<(usize, &crate::settings::WatchedScaleSet)> =
        settings.scale_sets.iter().enumerate().collect();
    order.sort_by_key(|(_, w)| records.get(&w.id.key()).and_then(|r| r.synced_at));
    let deadline = Deadline::after(
        settings.pass_deadline.unsigned_abs(),
        settings.call_timeout.unsigned_abs(),
    );
    let mut report: Vec<(usize, SetSync)> = Vec::new();
    let mut due: Vec<(usize, &ScaleSetId, Option<ScaleSetRecord>, Read)> = Vec::new();
    for (position, watched) in order {
        let id = &watched.id;
        let mut record = records.get(&id.key()).cloned();
        // A 429 met on another scale set of this subscription, this pass, holds this one too.
        if let (Some(r), Some(until)) = (
            record.as_mut(),
            compute.observed().throttled_until(&id.subscription),
        ) {
            r.throttled_until = Some(r.throttled_until.map_or(until, |t| t.max(until)));
        }
        let record = record.as_ref();
        let read = match resync::due(record, &id.key(), settings.full_resync, now) {
            Ok(read) => read,
            Err(Hold::Fresh { next }) => {
                tracing::debug!(scale_set = %id, next = %next, "mirror fresh; not read this pass");
                let mut fresh = SetSync::new(id, SyncOutcome::Fresh, None);
                fresh.detail = Some(format!("nothing changed; full read due by {}", stamp(next)));
                report.push((position, fresh));
                continue;
            }
            Err(Hold::Throttled { until }) => {
                tracing::warn!(scale_set = %id, until = %until, "mirror sync skipped: still throttled");
                let mut held = SetSync::new(id, SyncOutcome::Throttled, None);
                held.detail = Some(format!("Compute API asked to wait until {}", stamp(until)));
                report.push((position, held));
                continue;
            }
        };
        due.push((position, id, record.cloned(), read));
    }
    // A few scale sets are read at once, each within the pass deadline; one the deadline cuts
    // short keeps its mirror and is read again next pass.
    // Compute counts its read budget per subscription, and only an answer tells what is left:
    // the first read of each subscription goes out alone, the others wait for it.
    let mut gates: HashMap<String, Arc<Mutex<bool>>> = HashMap::new();
    let reads: Vec<_> = due
        .into_iter()
        .map(|(position, id, record, read)| {
            let gate = gates
                .entry(id.subscription.to_ascii_lowercase())
                .or_default()
                .clone();
            within(
                store, compute, settings, &deadline, gate, id, record, read, now,
            )
            .map(move |r| r.map(|sync| (position, sync)))
        })
        .collect();
    let mut reads = futures::stream::iter(reads).buffer_unordered(SYNC_CONCURRENCY);
    while let Some(done) = reads.next().await {
        report.push(done?);
    }
    drop(reads);
    prune_journals(store, settings, &deadline, &mut report, now).await;
    crate::throttle::hold_subscriptions(store, compute, settings, now).await?;
    report.sort_by_key(|(position, _)| *position);
    let report = report.into_iter().map(|(_, r)| r).collect();
    Ok(SyncReport {
        scale_sets: report,
        compute_calls: compute.observed().calls() - calls_before,
        table_requests: store.requests() - requests_before,
    })
}

/// The journal of each scale set read in full this pass loses its rows past
/// `HEALER_JOURNAL_DAYS` (a bounded share): the pass that reads a set anyway, at the full-resync
/// cadence, costs no extra pass. Best effort: a failure is logged and tried at the next full read.
async fn prune_journals(
    store: &Store,
    settings: &Settings,
    deadline: &Deadline,
    report: &mut [(usize, SetSync)],
    now: OffsetDateTime,
) {
    let Some(days) = settings.journal_days else {
        return;
    };
    let before = now - Duration::days(i64::from(days));
    for (position, set) in report.iter_mut() {
        // Not on a set's first read: a set just added has no journal yet.
        if set.outcome != SyncOutcome::Synced || set.read != Some(Read::FullResync.label()) {
            continue;
        }
        let Some(watched) = settings.scale_sets.get(*position) else {
            continue;
        };
        if !deadline.fits_a_call() {
            tracing::info!(scale_set = %watched.id, "journal retention left to a later pass: the pass deadline is near");
            return;
        }
        let id = &watched.id;
        match deadline
            .bound(store.prune_journal(id, before, JOURNAL_PRUNE_BATCH))
            .await
        {
            Some(Ok(n)) => {
                set.journal_pruned = n;
                if n > 0 {
                    tracing::info!(scale_set = %id, rows = n, days, "journal rows past their retention deleted");
                }
            }
            Some(Err(e)) => {
                tracing::warn!(scale_set = %id, error = %e, "journal retention failed; tried again at the next full read")
            }
            None => tracing::warn!(scale_set = %id, "journal retention cut at the pass deadline"),
        }
    }
}

/// Mirrors one scale set now if it is due — an event has just marked it changed — within
/// `budget`: an evaluation on an event's word reads what the Compute API says first (issue 19).
/// `None`: not read (throttled, or nothing said it changed).
pub async fn sync_set(
    store: &Store,
    compute: &Compute,
    settings: &Settings,
    id: &ScaleSetId,
    budget: std::time::Duration,
    now: OffsetDateTime,
) -> Result<Option<SetSync>, StoreError> {
    let record = store.scale_set(id).await?;
    let read = match resync::due(record.as_ref(), &id.key(), settings.full_resync, now) {
        Ok(read) => read,
        Err(hold) => {
            tracing::info!(scale_set = %id, hold = ?hold, "mirror not read for the evaluation");
            return Ok(None);
        }
    };
    // Events can be forged: their reads never spend what the mirror passes need.
    if let Some(left) = compute
        .observed()
        .remaining_budget(&id.subscription)
        .filter(|left| *left < READ_RESERVE)
    {
        tracing::warn!(scale_set = %id, remaining = left, "Compute read budget nearly spent: mirror not read for the evaluation");
        return Ok(None);
    }
    let deadline = Deadline::after(budget, settings.call_timeout.unsigned_abs());
    let gate = Arc::new(Mutex::new(false));
    let sync = within(
        store, compute, settings, &deadline, gate, id, record, read, now,
    )
    .await?;
    Ok(Some(sync))
}

/// One scale set's sync within the pass deadline: not started once a call no longer fits, cut
/// where it stands when the deadline comes.
#[allow(clippy::too_many_arguments)]
async fn within(
    store: &Store,
    compute: &Compute,
    settings: &Settings,
    deadline: &Deadline,
    gate: Arc<Mutex<bool>>,
    id: &ScaleSetId,
    record: Option<ScaleSetRecord>,
    read: Read,
    now: OffsetDateTime,
) -> Result<SetSync, StoreError> {
    let mut first_done = gate.lock().await;
    let first = !*first_done;
    *first_done = true;
    // The first read of the subscription holds the gate until it returns.
    let _held = if first {
        Some(first_done)
    } else {
        drop(first_done);
        None
    };
    if !first {
        if let Some(left) = compute
            .observed()
            .remaining_budget(&id.subscription)
            .filter(|left| *left < READ_RESERVE)
        {
            tracing::warn!(scale_set = %id, remaining = left, "Compute read budget nearly spent; sync deferred to the next pass");
            let mut deferred = SetSync::new(id, SyncOutcome::Deferred, Some(read));
            deferred.detail = Some(format!(
                "Compute read budget nearly spent ({left} left); deferred to the next pass"
            ));
            return Ok(deferred);
        }
    }
    if !deadline.fits_a_call() {
        let mut deferred = SetSync::new(id, SyncOutcome::Deferred, Some(read));
        deferred.detail = Some(format!(
            "{} s of HEALER_PASS_DEADLINE left, less than one HEALER_CALL_TIMEOUT: read next pass",
            deadline.remaining().as_secs()
        ));
        tracing::warn!(scale_set = %id, decision = "deferred", "mirror sync left to the next pass: the pass deadline is near");
        return Ok(deferred);
    }
    let stateful = settings
        .scale_set(id)
        .and_then(|w| w.policy.stateful.as_ref());
    let sync = sync_one(store, compute, id, stateful, record.clone(), read, now);
    match deadline.bound(sync).await {
        Some(result) => result,
        None => {
            let why = format!(
                "cut at HEALER_PASS_DEADLINE ({} s): the Compute API or storage did not answer in time; the mirror keeps its last state",
                settings.pass_deadline.whole_seconds()
            );
            tracing::error!(scale_set = %id, error = %why, "mirror sync cut short");
            let mut record = record.unwrap_or_else(ScaleSetRecord::unsynced);
            record.sync_error = Some(why.clone());
            store.record_sync(id, &record).await?;
            let mut cut = SetSync::new(id, SyncOutcome::TimedOut, Some(read));
            cut.detail = Some(why);
            Ok(cut)
        }
    }
}

async fn sync_one(
    store: &Store,
    compute: &Compute,
    id: &ScaleSetId,
    stateful: Option<&Stateful>,
    record: Option<ScaleSetRecord>,
    why: Read,
    now: OffsetDateTime,
) -> Result<SetSync, StoreError> {
    let mut record = record.unwrap_or_else(ScaleSetRecord::unsynced);
    let mut result = SetSync::new(id, SyncOutcome::Synced, Some(why));

    let read = async {
        let info = compute.scale_set(id).await?;
        let mut instances = compute.instances(id, &info).await?;
        // A Flexible VM's protection is a resource lock: unread, the mirror would call a locked
        // VM unprotected, so a failed read fails the sync.
        if info.orchestration() == Orchestration::Flexible {
            let locks = compute.locks(id).await?;
            crate::mirror::apply_locks(&mut instances, id, &locks);
        }
        Ok::<_, ComputeError>((info, instances))
    };
    match read.await {
        Ok((info, observed)) => {
            let (stored, skipped) = store.mirror(id).await?;
            if !skipped.0.is_empty() {
                tracing::warn!(scale_set = %id, rows = skipped.0.len(), first = %skipped.0[0], "unreadable mirror rows will be rewritten");
            }
            result.instances = observed.len();
            if let Some(policy) = stateful {
                let flexible = info.orchestration() == Orchestration::Flexible;
                result.detail =
                    slot_instances(store, compute, id, policy, &observed, flexible, now).await?;
            }
            let observed = carry_health_since(&stored, observed, now);
            let mut changes = diff(&stored, observed);
            // Unreadable rows are rewritten from what ARM reports.
            for bad in &skipped.0 {
                if let Some(pos) = changes.unchanged.iter().position(|u| *u == bad.row_key) {
                    changes.unchanged.remove(pos);
                }
            }
            result.written = store.write_mirror(id, &changes.upserts, now).await?;
            result.removed = store.remove_instances(id, &changes.removals).await?;
            record = ScaleSetRecord {
                capacity: info.capacity,
                orchestration_mode: info.orchestration_mode,
                platform_auto_repair: info.platform_auto_repair,
                terminate_notice: info.terminate_notice,
                image: info.image.as_ref().map(|i| match i {
                    crate::compute::ImageRef::Custom(id) => id.clone(),
                    crate::compute::ImageRef::Platform(p) => format!("platform:{p}"),
                }),
                location: info.location,
                synced_at: Some(now),
                sync_error: None,
                throttled_until: None,
                exists: true,
                ..record
            };
            if record.platform_auto_repair {
                tracing::warn!(scale_set = %id, "the scale set has the platform's automatic repairs enabled: two healers may act on one instance");
            }
            tracing::info!(scale_set = %id, read = why.label(), instances = result.instances, written = result.written, removed = result.removed, "mirror synced");
        }
        Err(ComputeError::NotFound(why_not)) => {
            let (stored, _) = store.mirror(id).await?;
            let ids: Vec<String> = stored.into_iter().map(|m| m.instance.instance_id).collect();
            result.removed = store.remove_instances(id, &ids).await?;
            result.outcome = SyncOutcome::NotFound;
            result.detail = Some(why_not.clone());
            record.exists = false;
            record.synced_at = Some(now);
            record.sync_error = Some(why_not.clone());
            tracing::error!(scale_set = %id, error = %why_not, "watched scale set does not exist; its mirror was emptied");
        }
        Err(ComputeError::Throttled { retry_after_s }) => {
            record.throttled_until = Some(now + Duration::seconds(retry_after_s));
            record.sync_error = Some(format!("throttled for {retry_after_s} s"));
            result.outcome = SyncOutcome::Throttled;
            result.detail = record.sync_error.clone();
            tracing::warn!(scale_set = %id, retry_after_s, "mirror sync throttled; the mirror keeps its last state");
        }
        Err(e) => {
            record.sync_error = Some(e.to_string());
            result.outcome = SyncOutcome::Failed(e.label());
            result.detail = Some(e.to_string());
            tracing::error!(scale_set = %id, error = %e, "mirror sync failed; the mirror keeps its last state");
        }
    }
    store.record_sync(id, &record).await?;
    Ok(result)
}

/// The stateful policies that cannot work on their scale sets, read from ARM at startup (an
/// address to carry on a Uniform set: its NICs are its model's). A set that cannot be read now is
/// left to the mirror passes, which say the same at each read.
pub async fn stateful_refusals(compute: &Compute, settings: &Settings) -> Vec<String> {
    let mut problems = Vec::new();
    for watched in &settings.scale_sets {
        let Some(policy) = watched
            .policy
            .stateful
            .as_ref()
            .filter(|p| p.address != crate::slot::Address::None)
        else {
            continue;
        };
        match compute.scale_set(&watched.id).await {
            Ok(info) => {
                let flexible = info.orchestration() == Orchestration::Flexible;
                if let Some(why) = policy.refusal(flexible) {
                    problems.push(format!(
                        "{} override for {}: {why}",
                        crate::settings::SCALE_SETS,
                        watched.id
                    ));
                }
            }
            Err(e) => {
                tracing::warn!(scale_set = %watched.id, error = %e, "cannot read the scale set to check its stateful policy; the mirror checks it at each read");
            }
        }
    }
    problems
}

/// A stateful set's slots: each instance that has the policy's disks and no slot gets one, so what
/// it holds is known before it ever needs replacing. A policy that cannot work on this set (an
/// address on a Uniform set) is said, each read, instead.
async fn slot_instances(
    store: &Store,
    compute: &Compute,
    id: &ScaleSetId,
    policy: &Stateful,
    instances: &[Instance],
    flexible: bool,
    now: OffsetDateTime,
) -> Result<Option<String>, StoreError> {
    if let Some(why) = policy.refusal(flexible) {
        tracing::error!(scale_set = %id, error = %why, "stateful policy cannot work on this scale set; its instances are not replaced");
        return Ok(Some(why));
    }
    let (existing, skipped) = store.slots(id).await?;
    if let Some(bad) = skipped.0.first() {
        // A slot that cannot be read is never taken for a missing one: no new slot this read.
        tracing::error!(scale_set = %id, error = %bad, "an unreadable slot row; no slot is added until it is mended");
        return Ok(Some(format!("unreadable slot row: {bad}")));
    }
    let stored: Vec<Slot> = existing.iter().map(|v| v.value.clone()).collect();
    for mut slot in crate::slot::new_slots(&stored, instances, policy, now) {
        if policy.address != crate::slot::Address::None {
            // What address follows the slot is read once, when it is made; a read that fails
            // leaves the slot to the next mirror pass rather than make it without one.
            match slot_address(compute, id, &slot.instance, policy.address).await {
                Ok(address) => slot.address = address,
                Err(e) => {
                    tracing::warn!(scale_set = %id, instance = %slot.instance, error = %e, "the address of a stateful instance could not be read; its slot is made next pass");
                    continue;
                }
            }
        }
        match store.insert_slot(id, &slot).await {
            Ok(_) => {
                let disks: Vec<String> = slot
                    .disks
                    .iter()
                    .map(|d| format!("LUN {} {}", d.lun, d.id))
                    .collect();
                tracing::info!(scale_set = %id, instance = %slot.instance, slot = %slot.id, disks = %disks.join(", "), address = slot.address.as_deref().unwrap_or("none"), "stateful slot created");
            }
            // Another pass created it first.
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// The address of a stateful instance the policy carries: its public IP's id, or its private
/// address. `None` when it has none (said once, in the log).
async fn slot_address(
    compute: &Compute,
    id: &ScaleSetId,
    instance: &str,
    kind: crate::slot::Address,
) -> Result<Option<String>, ComputeError> {
    let found = compute.instance_address(id, instance).await?;
    let address = match kind {
        crate::slot::Address::PublicIp => found.public_ip,
        crate::slot::Address::PrivateIp => found.private_ip,
        crate::slot::Address::None => None,
    };
    if address.is_none() {
        tracing::warn!(scale_set = %id, instance, kind = kind.as_str(), "a stateful instance has no such address: its slot carries none");
    }
    Ok(address)
}

/// The Compute API reports the Application Health state, not since when: the mirror keeps the time
/// it first saw the current state, so "unhealthy past its grace" can be judged.
fn carry_health_since(
    stored: &[MirroredInstance],
    observed: Vec<Instance>,
    now: OffsetDateTime,
) -> Vec<Instance> {
    let previous: HashMap<&str, &Instance> = stored
        .iter()
        .map(|m| (m.instance.instance_id.as_str(), &m.instance))
        .collect();
    observed
        .into_iter()
        .map(|mut inst| {
            inst.health_since = match previous.get(inst.instance_id.as_str()) {
                Some(prev) if prev.health == inst.health => prev.health_since,
                _ => inst
                    .health
                    .map(|_| crate::mirror::at_storage_precision(now)),
            };
            inst
        })
        .collect()
}
