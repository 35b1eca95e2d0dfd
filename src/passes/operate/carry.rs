//! A stateful replacement's step (issue 18): read how its call went and the slot it carries;
//! decide ([`crate::operations::carry::advance`]); claim; journal; move the slot where the
//! engine says (over the version read); send the one call whose turn it is; record the answer.

use super::{answered, claim, entry, read_statuses, writes_busy, OperatePass, OperationReport};
use crate::alert::Alert;
use crate::compute::{AddressChange, Compute, ComputeError};
use crate::incident::Versioned;
use crate::operations::carry::{self, Act, Memo};
use crate::operations::step::CallState;
use crate::operations::Operation;
use crate::plan::verdicts;
use crate::scaleset::{Orchestration, ScaleSetId};
use crate::state::StoreError;
use std::collections::HashMap;

pub(super) async fn operate(
    pass: &OperatePass<'_>,
    op: Versioned<Operation>,
) -> Result<(OperationReport, Vec<Alert>, bool), StoreError> {
    let OperatePass {
        store,
        compute,
        id,
        obs,
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
        read_statuses(compute, memo.calls.iter().map(|c| &c.state)).await
    };
    // The slot it carries: by id once taken (it moves to the new instance), else the broken
    // instance's.
    let params = carry::Params::from_stored(&op.params).ok();
    let (slots, skipped) = store.slots(id).await?;
    if let Some(bad) = skipped.0.first() {
        tracing::error!(scale_set = %id, operation = %op.id, error = %bad, "an unreadable slot row");
    }
    let slot = slots.into_iter().find(|v| match (&memo.slot, &params) {
        (Some(s), _) => v.value.id == s.id,
        (None, Some(p)) => v.value.instance == p.instance,
        (None, None) => false,
    });
    let verdicts = verdicts(obs, pass.policy, pass.dry_run, now);
    let view = carry::View {
        record: obs.record.as_ref(),
        instances: &obs.instances,
        heartbeats: &obs.heartbeats,
        verdicts: &verdicts,
        slot: slot.as_ref().map(|v| &v.value),
        brake: pass
            .brake
            .filter(|w| super::holds_operations(w))
            .map(|w| w.describe()),
        statuses: &statuses,
        settle: pass.policy.heartbeat_timeout,
        dry_run,
    };
    let carried = carry::advance(&op, &view, now);
    let advance = carried.advance;
    let mut next = advance.op.clone();
    let mut memo = Memo::read(&next).unwrap_or_default();
    // A grow or delete of the healer's runs or goes out: the replacement's writes wait.
    let busy = writes_busy(pass.healer_writes, obs);
    let to_send = crate::operations::step::sendable(&memo.calls)
        .filter(|i| !(matches!(memo.calls[*i].act, Act::Grow | Act::Delete { .. }) && busy))
        .filter(|_| dry_run || pass.deadline.fits_a_call());
    if let Some(call) = to_send.and_then(|i| memo.calls.get_mut(i)) {
        call.state = CallState::sending(dry_run, now);
    }
    next.memo = serde_json::to_value(&memo).unwrap_or(serde_json::Value::Null);
    let mut report = OperationReport::of(&next);
    if !advance.changed(&op) && to_send.is_none() && next.memo == op.memo && carried.slot.is_none()
    {
        return Ok((report, Vec::new(), false));
    }
    let Some((claimed, alerts)) = claim(pass, &next, &version, &advance, dry_run).await? else {
        report.claimed_elsewhere = true;
        return Ok((report, Vec::new(), false));
    };
    version = claimed;
    if let (Some(want), Some(stored)) = (&carried.slot, &slot) {
        match store.update_slot(id, want, &stored.version).await? {
            Some(_) => {
                tracing::info!(scale_set = %id, operation = %next.id, slot = %want.id, instance = %want.instance, decision = "slot_moved", "the slot follows its disks");
                store
                    .append_journal(&[entry(
                        id,
                        &next,
                        &want.instance,
                        "slot_moved",
                        format!(
                            "{} now names {} with {}",
                            want.id,
                            want.instance,
                            want.disks
                                .iter()
                                .map(|d| format!("{} at LUN {}", carry::name_of(&d.id), d.lun))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        dry_run,
                        now,
                    )])
                    .await?;
            }
            None => {
                tracing::warn!(scale_set = %id, operation = %next.id, slot = %want.id, "the slot changed meanwhile; it is written again next pass");
            }
        }
    }
    let (Some(i), false) = (to_send, dry_run) else {
        report.progress = next.progress();
        return Ok((report, alerts, advance.resync));
    };
    let Some(call) = memo.calls.get_mut(i) else {
        return Ok((report, alerts, advance.resync));
    };
    let what = call.act.describe();
    let location = obs
        .record
        .as_ref()
        .and_then(|r| r.location.clone())
        .unwrap_or_else(|| "westeurope".into());
    let sent = send(compute, id, pass.mode, &location, &call.act).await;
    report.calls += 1;
    let sent = sent.map(|a| a.filter(|a| a.operation.is_some()));
    let (state, outcome, reason) = answered(sent, &what, now, &mut next.last_error);
    call.state = state;
    tracing::info!(scale_set = %id, operation = %next.id, decision = outcome, reason = %reason, "operation call");
    next.memo = serde_json::to_value(&memo).unwrap_or(serde_json::Value::Null);
    next.updated = now;
    if store.update_operation(&next, &version).await?.is_none() {
        tracing::warn!(scale_set = %id, operation = %next.id, "operation changed while its call was sent; its answer is judged again");
    }
    store
        .append_journal(&[entry(id, &next, "*", outcome, reason, false, now)])
        .await?;
    report.progress = next.progress();
    Ok((report, alerts, true))
}

/// Sends one call; `Some` with the operation ARM accepted, `None` when the answer is the end.
async fn send(
    compute: &Compute,
    id: &ScaleSetId,
    mode: Orchestration,
    location: &str,
    act: &Act,
) -> Result<Option<crate::compute::Accepted>, ComputeError> {
    match act {
        Act::Grow => {
            let grown = compute.grow(id, 1).await?;
            tracing::info!(scale_set = %id, from = grown.from, to = grown.to, "capacity raised by 1 for a stateful replacement, with If-Match");
            Ok(Some(grown.accepted))
        }
        Act::Detach { instance, disks } => compute
            .attach_detach(id, instance, mode, &[], disks)
            .await
            .map(Some),
        Act::Attach { instance, disks } => compute
            .attach_detach(id, instance, mode, disks, &[])
            .await
            .map(Some),
        Act::Snapshot { name, disk } => compute
            .create_snapshot(id, name, location, disk)
            .await
            .map(Some),
        Act::CreateDisk {
            name,
            zone,
            snapshot,
        } => compute
            .create_disk(id, name, location, zone.as_deref(), snapshot)
            .await
            .map(Some),
        Act::Delete { instance } => compute
            .delete_instances(id, std::slice::from_ref(instance))
            .await
            .map(Some),
        Act::DeleteDisk { id: disk } => compute.delete_disk(id, disk).await.map(Some),
        Act::DeleteSnapshot { name } => compute.delete_snapshot(id, name).await.map(Some),
        Act::SetAddress {
            instance,
            kind,
            address,
        } => {
            let nic = compute.instance_address(id, instance).await?.nic;
            let change = match kind {
                crate::slot::Address::PrivateIp => AddressChange::Private(address.clone()),
                _ => AddressChange::Public(address.clone()),
            };
            compute.set_address(&nic, &change).await.map(|_| None)
        }
    }
}
