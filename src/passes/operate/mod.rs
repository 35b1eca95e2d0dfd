//! Long-running operations advanced by `monitor-status` (design §7), one step per pass: read how
//! the operation's calls went (their `Azure-AsyncOperation` status), decide
//! ([`crate::operations::cycle::advance`]), claim the row by its ETag, journal, send what was
//! decided, record each answer. A pass that stops anywhere leaves at most the calls it was sending
//! marked `Sending`, which later passes judge by the mirror and never send again.

use crate::alert::{Alert, Kind as AlertKind};
use crate::compute::{
    Accepted, Compute, ComputeError, OperationKind, OperationRef, OperationState,
};
use crate::deadline::Deadline;
use crate::incident::{Call, State as IncidentState, Versioned};
use crate::journal::{Entry, EntryKind};
use crate::operations::cycle::{self, CallState, Memo, Status, Verb};
use crate::operations::{Kind, Operation};
use crate::plan::{verdicts, Observation, WithheldReason};
use crate::policy::Policy;
use crate::scaleset::{Orchestration, ScaleSetId};
use crate::state::{Store, StoreError};
use serde::Serialize;
use std::collections::HashMap;
use time::OffsetDateTime;

mod carry;
mod prototype;
mod swap;
mod turn;

/// What one scale set's pass shares with its operation.
pub struct OperatePass<'a> {
    pub store: &'a Store,
    pub compute: &'a Compute,
    pub id: &'a ScaleSetId,
    pub obs: &'a Observation,
    pub policy: &'a Policy,
    /// The brake the repair pass found on the scale set, if any.
    pub brake: Option<&'a WithheldReason>,
    pub mode: Orchestration,
    /// `HEALER_DRY_RUN`: every operation only decides and journals.
    pub dry_run: bool,
    /// The healer's repairs send a grow or a delete to the scale set this pass.
    pub healer_writes: bool,
    pub deadline: &'a Deadline,
    pub now: OffsetDateTime,
    /// The second scale set an operation holds (a swap's `to`), when it is watched.
    pub partner: Option<Partner<'a>>,
}

/// What the pass saw of an operation's second scale set.
pub struct Partner<'a> {
    pub id: &'a ScaleSetId,
    pub obs: &'a Observation,
    pub policy: &'a Policy,
    pub brake: Option<&'a WithheldReason>,
    pub healer_writes: bool,
}

/// Whether a grow or delete of the healer's runs or goes out on the scale set this pass: an
/// operation's capacity writes there wait (a write preempts a running delete).
fn writes_busy(healer_writes: bool, obs: &Observation) -> bool {
    healer_writes
        || obs.incidents.values().any(|v| {
            v.value.state == IncidentState::Repairing
                && v.value.call_in_flight()
                && matches!(v.value.call(), Some(Call::Grow | Call::Delete))
        })
}

/// What became of the scale set's operation this pass (`monitor-status`'s answer).
#[derive(Debug, Clone, Serialize, Default)]
pub struct OperationReport {
    pub id: String,
    pub state: String,
    pub progress: String,
    /// Calls sent to the Compute API this pass.
    pub calls: usize,
    /// Another writer changed the row first: the step is left to the next pass.
    pub claimed_elsewhere: bool,
}

impl OperationReport {
    fn of(op: &Operation) -> Self {
        OperationReport {
            id: op.id.clone(),
            state: op.state.as_str().into(),
            progress: op.progress(),
            ..OperationReport::default()
        }
    }
}

/// Which brakes hold an operation: all but the platform-repairs deferral, which concerns the
/// healer's own repairs only.
fn holds_operations(why: &WithheldReason) -> bool {
    !matches!(why, WithheldReason::PlatformRepairs)
}

/// Advances one operation by one step. Returns its report, the alerts it raised and whether the
/// mirror should read its scale sets soon.
pub async fn operate(
    pass: &OperatePass<'_>,
    op: Versioned<Operation>,
) -> Result<(OperationReport, Vec<Alert>, bool), StoreError> {
    match op.value.kind {
        Kind::Cycle => operate_cycle(pass, op).await,
        Kind::Swap => swap::operate(pass, op).await,
        Kind::Prototype => prototype::operate(pass, op).await,
        Kind::Carry => carry::operate(pass, op).await,
    }
}

async fn operate_cycle(
    pass: &OperatePass<'_>,
    op: Versioned<Operation>,
) -> Result<(OperationReport, Vec<Alert>, bool), StoreError> {
    let OperatePass {
        store,
        compute,
        id,
        obs,
        policy,
        now,
        ..
    } = *pass;
    let Versioned {
        value: op,
        mut version,
    } = op;
    let dry_run = pass.dry_run || op.dry_run;
    let memo = Memo::read(&op).unwrap_or_default();
    let statuses = if dry_run {
        HashMap::new()
    } else {
        read_statuses(compute, memo.calls().into_iter().map(|(_, c)| &c.state)).await
    };
    let verdicts = verdicts(obs, policy, pass.dry_run, now);
    let incidents = obs
        .incidents
        .iter()
        .filter(|(_, v)| {
            v.value.state != IncidentState::Closed && (pass.dry_run || !v.value.dry_run)
        })
        .map(|(k, _)| k.as_str())
        .collect();
    let view = cycle::View {
        instances: &obs.instances,
        heartbeats: &obs.heartbeats,
        verdicts: &verdicts,
        incidents,
        brake: pass
            .brake
            .filter(|w| holds_operations(w))
            .map(|w| w.describe()),
        flexible: pass.mode == Orchestration::Flexible,
        statuses: &statuses,
        settle: policy.heartbeat_timeout,
        dry_run,
    };
    let advance = cycle::advance(&op, &view, now);
    let mut next = advance.op.clone();
    let mut memo = Memo::read(&next).unwrap_or_default();
    // A write of the healer's to the scale set (a replace's capacity change or delete) still
    // runs: ours wait, so that two writes never overlap (a write preempts a running delete).
    let writes_busy = writes_busy(pass.healer_writes, obs);
    let to_send: Vec<cycle::Slot> = memo
        .calls()
        .into_iter()
        .filter(|(_, c)| c.state == CallState::Unsent)
        .filter(|(_, c)| !(writes_busy && matches!(c.verb, Verb::Grow | Verb::Delete)))
        .filter(|_| dry_run || pass.deadline.fits_a_call())
        .map(|(slot, _)| slot)
        .collect();
    for slot in &to_send {
        if let Some(call) = memo.call_mut(*slot) {
            // A dry run records its calls as taken, so it goes on as if ARM had; nothing is sent.
            call.state = CallState::sending(dry_run, now);
        }
    }
    next.memo = serde_json::to_value(&memo).unwrap_or(serde_json::Value::Null);
    let mut report = OperationReport::of(&next);
    if !advance.changed(&op) && to_send.is_empty() && next.memo == op.memo {
        return Ok((report, Vec::new(), false));
    }
    let Some((claimed, alerts)) = claim(pass, &next, &version, &advance, dry_run).await? else {
        report.claimed_elsewhere = true;
        return Ok((report, Vec::new(), false));
    };
    version = claimed;
    let mut journal = Vec::new();
    if dry_run || to_send.is_empty() {
        report.progress = next.progress();
        return Ok((report, alerts, advance.resync));
    }

    for slot in to_send {
        let Some(call) = memo.call_mut(slot) else {
            continue;
        };
        // A Flexible batch is one call per VM: what no longer fits the pass goes next pass.
        if !pass.deadline.fits_a_call() {
            call.state = CallState::Unsent;
            continue;
        }
        let (verb, instances, grow) = (call.verb, call.instances.clone(), call.grow);
        let sent = match verb {
            Verb::Reimage => compute.reimage_instances(id, &instances, pass.mode).await,
            Verb::Upgrade => compute.upgrade_instances(id, &instances).await,
            Verb::Delete => compute.delete_instances(id, &instances).await,
            Verb::Grow => compute.grow(id, grow).await.map(|g| g.accepted),
        };
        report.calls += 1;
        let what = if verb == Verb::Grow {
            format!("{} {grow}", verb.as_str())
        } else {
            format!("{} {}", verb.as_str(), instances.join(", "))
        };
        let (state, outcome, reason) = answered(sent.map(Some), &what, now, &mut next.last_error);
        call.state = state;
        tracing::info!(scale_set = %id, operation = %next.id, decision = outcome, reason = %reason, "operation call");
        journal.push(entry(id, &next, "*", outcome, reason, false, now));
    }
    next.memo = serde_json::to_value(&memo).unwrap_or(serde_json::Value::Null);
    next.updated = now;
    // The answers recorded over our own claim; lost to another writer, the calls stay `Sending`
    // and the mirror tells later passes whether they landed.
    if store.update_operation(&next, &version).await?.is_none() {
        tracing::warn!(scale_set = %id, operation = %next.id, "operation changed while its calls were sent; their answers are judged by the mirror");
    }
    store.append_journal(&journal).await?;
    report.progress = next.progress();
    Ok((report, alerts, true))
}

/// The claim: the operation's next row written over the version read — nothing is journaled or
/// sent for a step another writer (an operator's command, an overlapping pass) got to first
/// (`None`). Claimed, the step's notes are journaled and its alert raised.
async fn claim(
    pass: &OperatePass<'_>,
    next: &Operation,
    version: &str,
    advance: &crate::operations::step::Advance,
    dry_run: bool,
) -> Result<Option<(String, Vec<Alert>)>, StoreError> {
    let (id, now) = (pass.id, pass.now);
    let version = match pass.store.update_operation(next, version).await? {
        Some(v) => v,
        None => {
            tracing::info!(scale_set = %id, operation = %next.id, decision = "claimed_elsewhere", "operation changed meanwhile; next pass");
            return Ok(None);
        }
    };
    let journal: Vec<Entry> = advance
        .notes
        .iter()
        .map(|n| {
            tracing::info!(scale_set = %id, instance = %n.instance, operation = %next.id, decision = n.outcome, reason = %n.reason, "operation step");
            Entry {
                evidence: n.evidence.clone(),
                ..entry(id, next, &n.instance, n.outcome, n.reason.clone(), dry_run, now)
            }
        })
        .collect();
    pass.store.append_journal(&journal).await?;
    let mut alerts = Vec::new();
    if let Some(reason) = &advance.alert {
        tracing::warn!(scale_set = %id, operation = %next.id, decision = "alert", reason = %reason, "operation needs the operator");
        alerts.push(alert(id, next, reason.clone(), dry_run, now));
    }
    Ok(Some((version, alerts)))
}

/// A sent call's state once ARM answered — `Ok(None)`: a synchronous call, done with its answer;
/// `Ok(Some(_))`: a long-running one to follow (by its status URL, or by the mirror without one)
/// — with the journal's outcome and reason. An error worth an operator's eye is kept in
/// `last_error`.
fn answered(
    sent: Result<Option<Accepted>, ComputeError>,
    what: &str,
    now: OffsetDateTime,
    last_error: &mut Option<String>,
) -> (CallState, &'static str, String) {
    match sent {
        Ok(Some(accepted)) => (
            CallState::Accepted {
                at: now,
                url: accepted.operation.as_ref().map(|o| o.url.clone()),
                follow: accepted
                    .operation
                    .as_ref()
                    .map(|o| o.kind.as_str().to_string()),
            },
            "requested",
            format!("{what}: accepted"),
        ),
        Ok(None) => (
            CallState::Ended { at: now },
            "requested",
            format!("{what}: accepted"),
        ),
        Err(e) => {
            let (state, outcome) = answer(&e, now);
            if outcome != "no_answer" {
                *last_error = Some(format!("{what}: {e}"));
            }
            (state, outcome, format!("{what}: {e}"))
        }
    }
}

/// What an answer means for the call: taken, to be sent again (throttled, busy, the scale set
/// changed, a server error), refused for good, or unknown (no answer: never sent again).
fn answer(e: &ComputeError, now: OffsetDateTime) -> (CallState, &'static str) {
    match e {
        ComputeError::Throttled { .. } => (CallState::Unsent, "throttled"),
        ComputeError::Busy(_) => (CallState::Unsent, "busy"),
        ComputeError::Stale(_) => (CallState::Unsent, "stale"),
        ComputeError::Transient(_) => (CallState::Unsent, "transient"),
        ComputeError::NoAnswer(_) | ComputeError::Failed(_) => {
            (CallState::Sending { at: now }, "no_answer")
        }
        ComputeError::Refused(_) | ComputeError::NotFound(_) | ComputeError::Unauthorized(_) => (
            CallState::Failed {
                error: e.to_string(),
            },
            "refused",
        ),
    }
}

/// The status of every call that ARM took and that has not ended, by URL; one that cannot be
/// read is `Unknown` (the mirror tells instead).
async fn read_statuses<'c>(
    compute: &Compute,
    calls: impl Iterator<Item = &'c CallState>,
) -> HashMap<String, Status> {
    read_statuses_and_output(compute, calls).await.0
}

/// The statuses, and what each finished command wrote to its output, by URL.
async fn read_statuses_and_output<'c>(
    compute: &Compute,
    calls: impl Iterator<Item = &'c CallState>,
) -> (HashMap<String, Status>, HashMap<String, String>) {
    let mut out = HashMap::new();
    let mut outputs = HashMap::new();
    for state in calls {
        let CallState::Accepted {
            url: Some(url),
            follow,
            ..
        } = state
        else {
            continue;
        };
        let kind = follow
            .as_deref()
            .and_then(OperationKind::parse)
            .unwrap_or(OperationKind::AsyncOperation);
        let status = match compute
            .operation_status(&OperationRef {
                url: url.clone(),
                kind,
            })
            .await
        {
            Ok(s) => match s.state {
                _ if s.output.is_some() && s.state == OperationState::Succeeded => {
                    outputs.insert(url.clone(), s.output.clone().unwrap_or_default());
                    Status::Ended(s.ended_at.unwrap_or_else(OffsetDateTime::now_utc))
                }
                OperationState::InProgress => Status::Running,
                OperationState::Succeeded => {
                    Status::Ended(s.ended_at.unwrap_or_else(OffsetDateTime::now_utc))
                }
                OperationState::Failed | OperationState::Canceled => Status::Failed(
                    s.error
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| format!("{:?}", s.state)),
                ),
            },
            Err(e) => {
                tracing::warn!(url = %url, error = %e, "could not read an operation's status; the mirror tells");
                Status::Unknown
            }
        };
        out.insert(url.clone(), status);
    }
    (out, outputs)
}

fn entry(
    id: &ScaleSetId,
    op: &Operation,
    instance: &str,
    outcome: &str,
    reason: String,
    dry_run: bool,
    now: OffsetDateTime,
) -> Entry {
    Entry {
        scale_set: id.clone(),
        instance_id: instance.to_string(),
        at: now,
        incident: op.id.clone(),
        kind: EntryKind::Operation,
        action: None,
        attempt: op.done,
        outcome: outcome.to_string(),
        reason,
        evidence: serde_json::Value::Null,
        dry_run,
    }
}

fn alert(
    id: &ScaleSetId,
    op: &Operation,
    reason: String,
    dry_run: bool,
    now: OffsetDateTime,
) -> Alert {
    Alert {
        kind: AlertKind::Operation,
        scale_set: id.resource_id(),
        instance: None,
        incident: Some(op.id.clone()),
        action: Some(op.kind.as_str().into()),
        attempt: None,
        reason,
        at: now,
        dry_run,
    }
}
