//! A swap's step (issue 16): read how its call went and, when it decides on them, the autoscale
//! settings of both sets' resource groups; decide ([`crate::operations::swap::advance`]); claim;
//! journal; send the one call whose turn it is; record the answer. Calls go one at a time, in
//! order: an autoscale write never overtakes the one before it, and a capacity write waits while
//! one of the healer's grows or deletes runs on that set.

use super::turn::{self, Sequential, Taken};
use super::{read_statuses, writes_busy, OperatePass, OperationReport};
use crate::alert::Alert;
use crate::autoscale::AutoscaleSetting;
use crate::compute::{Compute, ComputeError};
use crate::incident::Versioned;
use crate::operations::step::Call;
use crate::operations::swap::{self, Act, Memo, SetView, Side};
use crate::operations::Operation;
use crate::plan::verdicts;
use crate::scaleset::ScaleSetId;
use crate::state::StoreError;
use std::collections::HashMap;

pub(super) async fn operate(
    pass: &OperatePass<'_>,
    op: Versioned<Operation>,
) -> Result<(OperationReport, Vec<Alert>, bool), StoreError> {
    let OperatePass {
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
    let partner = pass
        .partner
        .as_ref()
        .filter(|p| op.partner.as_ref() == Some(p.id));
    let autoscale = match (&op.partner, swap::needs_autoscale(&op) && !dry_run) {
        (Some(to), true) => Some(read_autoscale(compute, id, to).await),
        _ => None,
    };
    let from_verdicts = verdicts(obs, pass.policy, pass.dry_run, now);
    let to_verdicts = partner.map(|p| verdicts(p.obs, p.policy, pass.dry_run, now));
    let brake = |b: Option<&crate::plan::WithheldReason>| {
        b.filter(|w| super::holds_operations(w))
            .map(|w| w.describe())
    };
    let view = swap::View {
        from: SetView {
            record: obs.record.as_ref(),
            instances: &obs.instances,
            heartbeats: &obs.heartbeats,
            verdicts: &from_verdicts,
            brake: brake(pass.brake),
        },
        to: partner.zip(to_verdicts.as_ref()).map(|(p, v)| SetView {
            record: p.obs.record.as_ref(),
            instances: &p.obs.instances,
            heartbeats: &p.obs.heartbeats,
            verdicts: v,
            brake: brake(p.brake),
        }),
        autoscale,
        statuses: &statuses,
        settle: pass.policy.heartbeat_timeout,
        dry_run,
    };
    let advance = swap::advance(&op, &view, now);
    let busy = |side: Side| match side {
        Side::From => writes_busy(pass.healer_writes, obs),
        Side::To => partner.is_some_and(|p| writes_busy(p.healer_writes, p.obs)),
    };
    let may_send = |act: &Act| match act {
        Act::Capacity { side, .. } => !busy(*side),
        _ => true,
    };
    let taken = turn::take::<Memo>(pass, &op, &version, &advance, may_send, dry_run, false);
    let mut turn = match taken.await? {
        Taken::Turn(t) => t,
        Taken::Done(passed) => return Ok(passed),
    };
    let Some(act) = turn.act().cloned() else {
        return Ok(turn.idle());
    };
    let sent = send(compute, id, op.partner.as_ref(), &act).await;
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

/// Sends one call; `Some` for a long-running operation ARM accepted, `None` for a synchronous
/// write that is done.
async fn send(
    compute: &Compute,
    from: &ScaleSetId,
    to: Option<&ScaleSetId>,
    act: &Act,
) -> Result<Option<crate::compute::Accepted>, ComputeError> {
    match act {
        Act::Capacity {
            side,
            capacity,
            expect,
        } => {
            let set = match side {
                Side::From => from,
                Side::To => to.ok_or_else(|| {
                    ComputeError::Failed("the swap's new set is not recorded".into())
                })?,
            };
            compute
                .set_capacity(set, *capacity, *expect)
                .await
                .map(|g| Some(g.accepted))
        }
        Act::PutAutoscale { write } => compute
            .put_autoscale(
                &write.subscription,
                &write.resource_group,
                &write.name,
                &write.body,
            )
            .await
            .map(|_| None),
        Act::DeleteAutoscale {
            subscription,
            resource_group,
            name,
        } => compute
            .delete_autoscale(subscription, resource_group, name)
            .await
            .map(|_| None),
    }
}

/// The autoscale settings of both sets' resource groups (one list each; one when they share it).
async fn read_autoscale(
    compute: &Compute,
    from: &ScaleSetId,
    to: &ScaleSetId,
) -> Result<Vec<AutoscaleSetting>, String> {
    let mut groups = vec![(&from.subscription, &from.resource_group)];
    if !(to.subscription.eq_ignore_ascii_case(&from.subscription)
        && to.resource_group.eq_ignore_ascii_case(&from.resource_group))
    {
        groups.push((&to.subscription, &to.resource_group));
    }
    let mut out = Vec::new();
    for (subscription, group) in groups {
        let listed = compute
            .autoscale_settings(subscription, group)
            .await
            .map_err(|e| format!("listing the autoscale settings of {group}: {e}"))?;
        out.extend(listed);
    }
    Ok(out)
}
