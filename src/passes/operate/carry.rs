//! A stateful replacement's step (issue 18): read how its call went and the slot it carries;
//! decide ([`crate::operations::carry::advance`]); claim; journal; move the slot where the
//! engine says (over the version read); send the one call whose turn it is; record the answer.

use super::turn::{self, Sequential, Taken};
use super::{entry, read_statuses, writes_busy, OperatePass, OperationReport};
use crate::alert::Alert;
use crate::compute::{AddressChange, Compute, ComputeError};
use crate::incident::Versioned;
use crate::operations::carry::{self, Act, Memo};
use crate::operations::step::Call;
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
    let Versioned { value: op, version } = op;
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
    // A grow or delete of the healer's runs or goes out: the replacement's writes wait.
    let busy = writes_busy(pass.healer_writes, obs);
    let may_send = |act: &Act| !(matches!(act, Act::Grow | Act::Delete { .. }) && busy);
    let changed = carried.slot.is_some();
    let taken = turn::take::<Memo>(pass, &op, &version, &advance, may_send, dry_run, changed);
    let mut turn = match taken.await? {
        Taken::Turn(t) => t,
        Taken::Done(passed) => return Ok(passed),
    };
    let next = &turn.next;
    if let (Some(want), Some(stored)) = (&carried.slot, &slot) {
        match store.update_slot(id, want, &stored.version).await? {
            Some(_) => {
                tracing::info!(scale_set = %id, operation = %next.id, slot = %want.id, instance = %want.instance, decision = "slot_moved", "the slot follows its disks");
                store
                    .append_journal(&[entry(
                        id,
                        next,
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
    let Some(act) = turn.act().cloned() else {
        return Ok(turn.idle());
    };
    let location = obs
        .record
        .as_ref()
        .and_then(|r| r.location.clone())
        .unwrap_or_else(|| "westeurope".into());
    let sent = send(compute, id, pass.mode, &location, &act).await;
    // An accepted call without an operation to follow is done with its answer.
    let sent = sent.map(|a| a.filter(|a| a.operation.is_some()));
    turn.record(pass, act.describe(), sent).await
}

impl Sequential for Memo {
    type Act = Act;
    fn read(op: &Operation) -> Result<Self, String> {
        Memo::read(op)
    }
    fn calls_mut(&mut self) -> &mut Vec<Call<Act>> {
        &mut self.calls
    }
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
