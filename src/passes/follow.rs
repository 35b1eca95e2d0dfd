//! Following the long-running operations our repairs started: a 202 only starts one. Each pass
//! reads the status of every step still running (one read per operation, within the read budget,
//! never while the subscription is throttled) and settles the incidents whose operation ended, so
//! that `decide` sees a preempted or failed step at once instead of when its deadline runs out.

use crate::compute::{Compute, ComputeError, OperationState, OperationStatus, READ_RESERVE};
use crate::incident::{Incident, Phase, State};
use crate::journal::{Entry, EntryKind};
use crate::plan::Observation;
use crate::scaleset::ScaleSetId;
use crate::state::{Store, StoreError};
use serde_json::json;
use std::collections::BTreeMap;
use time::OffsetDateTime;

/// What became of one incident's running step.
pub fn settle(inc: &Incident, status: &OperationStatus, now: OffsetDateTime) -> Option<Incident> {
    match status.state {
        OperationState::InProgress => None,
        OperationState::Succeeded => Some(inc.succeeded(status.ended_at.unwrap_or(now))),
        OperationState::Failed | OperationState::Canceled => {
            let error = status.error.clone().unwrap_or(crate::compute::ArmError {
                status: 200,
                code: format!("{:?}", status.state),
                message: "the operation ended without an error".into(),
            });
            Some(inc.failed(error, now))
        }
    }
}

/// Reads the status of the scale set's running operations and writes what ended to the incident
/// rows (claimed by version, like any step). Updates `obs` in place; returns the journal rows.
pub async fn follow(
    store: &Store,
    compute: &Compute,
    id: &ScaleSetId,
    obs: &mut Observation,
    deadline: &crate::deadline::Deadline,
    now: OffsetDateTime,
) -> Result<Vec<Entry>, StoreError> {
    let mut by_operation: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (target, v) in &obs.incidents {
        let inc = &v.value;
        if inc.state == State::Repairing && inc.phase == Phase::Running && !inc.dry_run {
            if let Some(op) = &inc.operation {
                by_operation
                    .entry(op.url.clone())
                    .or_default()
                    .push(target.clone());
            }
        }
    }
    let mut journal = Vec::new();
    let mut settled: Vec<(Incident, String)> = Vec::new();
    for targets in by_operation.into_values() {
        let held = compute
            .observed()
            .throttled_until(&id.subscription)
            .filter(|u| *u > now)
            .or(obs
                .record
                .as_ref()
                .and_then(|r| r.throttled_until)
                .filter(|u| *u > now));
        let low = compute
            .observed()
            .remaining_budget(&id.subscription)
            .is_some_and(|left| left < READ_RESERVE);
        if held.is_some() || low {
            tracing::info!(scale_set = %id, throttled = held.is_some(), "operation status not read this pass: the Compute budget is spent; the step's deadline still holds");
            break;
        }
        if !deadline.fits_a_call() {
            tracing::warn!(scale_set = %id, "operation status not read this pass: the pass deadline is near; the next pass reads it");
            break;
        }
        let Some(operation) = obs.incidents[&targets[0]].value.operation.clone() else {
            continue;
        };
        let status = match compute.operation_status(&operation).await {
            Ok(status) => status,
            Err(ComputeError::Throttled { retry_after_s }) => {
                tracing::warn!(scale_set = %id, retry_after_s, "throttled while reading operation status");
                break;
            }
            Err(e) => {
                tracing::warn!(scale_set = %id, operation = %operation.url, error = %e, "could not read an operation's status; the step's deadline still holds");
                continue;
            }
        };
        for target in targets {
            let v = &obs.incidents[&target];
            if let Some(row) = settle(&v.value, &status, now) {
                settled.push((row, v.version.clone()));
            }
        }
    }
    // Every ended step of the scale set is written in one batch.
    let rows: Vec<(&Incident, Option<&str>)> = settled
        .iter()
        .map(|(row, version)| (row, Some(version.as_str())))
        .collect();
    let versions = store.claim_incidents(id, &rows).await?;
    for ((row, _), version) in settled.into_iter().zip(versions) {
        let Some(version) = version else {
            tracing::info!(scale_set = %id, instance = %row.target, "incident changed meanwhile; its operation's end is settled by whoever changed it");
            continue;
        };
        journal.push(entry(id, &row, now));
        log(id, &row);
        if let Some(slot) = obs.incidents.get_mut(&row.target) {
            slot.value = row;
            slot.version = version;
        }
    }
    Ok(journal)
}

fn log(id: &ScaleSetId, inc: &Incident) {
    let call = inc.call().map(|c| c.as_str()).unwrap_or("");
    match &inc.error {
        Some(e) if inc.phase == Phase::Failed => {
            tracing::warn!(scale_set = %id, instance = %inc.target, incident = %inc.id, call, attempt = inc.attempt,
                code = %e.code, error = %e.message, decision = "step_failed", "a repair's operation failed; the attempt is spent")
        }
        _ => {
            tracing::info!(scale_set = %id, instance = %inc.target, incident = %inc.id, call, attempt = inc.attempt,
                decision = "step_succeeded", "a repair's operation succeeded")
        }
    }
}

fn entry(id: &ScaleSetId, inc: &Incident, now: OffsetDateTime) -> Entry {
    let call = inc.call().map(|c| c.as_str()).unwrap_or("call");
    let (outcome, reason) = match (&inc.phase, &inc.error) {
        (Phase::Failed, Some(e)) => (
            "failed",
            format!(
                "the {call} ({} stage) ended {}: {}: {}; the attempt is spent",
                inc.stage.as_str(),
                if e.code.eq_ignore_ascii_case("canceled") {
                    "Canceled"
                } else {
                    "Failed"
                },
                e.code,
                e.message
            ),
        ),
        _ => (
            "succeeded",
            format!("the {call} ({} stage) ended Succeeded", inc.stage.as_str()),
        ),
    };
    Entry {
        scale_set: id.clone(),
        instance_id: inc.target.clone(),
        at: now,
        incident: inc.id.clone(),
        kind: EntryKind::Step,
        action: inc.action,
        attempt: inc.attempt,
        outcome: outcome.into(),
        reason,
        evidence: json!({"operation": inc.operation, "stage": inc.stage, "error": inc.error, "endedAt": inc.settled_at.map(crate::journal::stamp)}),
        dry_run: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::ArmError;
    use crate::incident::Stage;
    use crate::policy::RepairAction;
    use time::macros::datetime;
    use time::Duration;

    #[test]
    fn an_ended_operation_settles_its_step() {
        let t0 = datetime!(2026-11-22 12:00 UTC);
        let inc = Incident::open(
            "3",
            "silent",
            RepairAction::Replace,
            t0,
            Duration::minutes(15),
        )
        .accepted(None);
        let status = |state, ended_at, error| OperationStatus {
            state,
            ended_at,
            error,
            output: None,
        };
        assert_eq!(
            settle(&inc, &status(OperationState::InProgress, None, None), t0),
            None
        );
        let done = settle(
            &inc,
            &status(
                OperationState::Succeeded,
                Some(t0 - Duration::seconds(5)),
                None,
            ),
            t0,
        )
        .unwrap();
        assert_eq!(
            (done.phase, done.settled_at, done.surged, done.stage),
            (
                Phase::Succeeded,
                Some(t0 - Duration::seconds(5)),
                true,
                Stage::Surge
            ),
            "ARM's end time is kept: the mirror must be read after it"
        );
        let preempted = ArmError {
            status: 200,
            code: "OperationPreempted".into(),
            message: "Operation execution has been preempted by a more recent operation.".into(),
        };
        let failed = settle(
            &inc,
            &status(OperationState::Failed, None, Some(preempted.clone())),
            t0,
        )
        .unwrap();
        assert_eq!(
            (failed.phase, failed.error),
            (Phase::Failed, Some(preempted))
        );
        let canceled = settle(&inc, &status(OperationState::Canceled, None, None), t0).unwrap();
        assert_eq!(canceled.error.map(|e| e.code), Some("Canceled".into()));
    }
}
