//! A golden image's step (issue 17): read how its call went (a command's output with it) and
//! what the engine asks for (the instance's disk, the definition's versions); decide
//! ([`crate::operations::prototype::advance`]); claim; journal; send the one call whose turn it
//! is; record the answer. Once it succeeded with `--then-cycle`, the rolling upgrade is started.

use super::turn::{self, Sequential, Taken};
use super::{entry, read_statuses_and_output, writes_busy, OperatePass, OperationReport};
use crate::alert::Alert;
use crate::compute::{Compute, ComputeError};
use crate::incident::{State as IncidentState, Versioned};
use crate::operations::prototype::{self, Act, Disk, Memo, Needs, Version};
use crate::operations::step::Call;
use crate::operations::{Kind, Operation, State};
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
    let (statuses, outputs) = if dry_run {
        (HashMap::new(), HashMap::new())
    } else {
        read_statuses_and_output(compute, memo.calls.iter().map(|c| &c.state)).await
    };
    let params = prototype::Params::from_stored(&op.params).ok();
    let (mut disk, mut versions) = (None, None);
    if !dry_run {
        match prototype::needs(&op) {
            Needs::Disk => {
                disk = Some(
                    compute
                        .instance_disk(id, &memo.instance)
                        .await
                        .map(|d| Disk {
                            os_disk: d.os_disk,
                            os_type: d.os_type,
                            hyper_v_generation: d.hyper_v_generation,
                            architecture: d.architecture,
                        })
                        .map_err(|e| e.to_string()),
                )
            }
            Needs::Versions => {
                if let Some(p) = &params {
                    let definition = prototype::definition_name(id);
                    versions = Some(
                        compute
                            .image_versions(id, &p.gallery, &definition)
                            .await
                            .map(|list| {
                                list.into_iter()
                                    .map(|v| Version {
                                        name: v.name,
                                        state: v.provisioning_state,
                                    })
                                    .collect()
                            })
                            .map_err(|e| e.to_string()),
                    );
                }
            }
            Needs::Nothing => {}
        }
    }
    let verdicts = verdicts(obs, pass.policy, pass.dry_run, now);
    let incidents = obs
        .incidents
        .iter()
        .filter(|(_, v)| {
            v.value.state != IncidentState::Closed && (pass.dry_run || !v.value.dry_run)
        })
        .map(|(k, _)| k.as_str())
        .collect();
    let view = prototype::View {
        record: obs.record.as_ref(),
        instances: &obs.instances,
        heartbeats: &obs.heartbeats,
        verdicts: &verdicts,
        incidents,
        brake: pass
            .brake
            .filter(|w| super::holds_operations(w))
            .map(|w| w.describe()),
        statuses: &statuses,
        outputs: &outputs,
        disk,
        versions,
        settle: pass.policy.heartbeat_timeout,
        dry_run,
    };
    let advance = prototype::advance(&op, &view, now);
    let may_send =
        |act: &Act| !(matches!(act, Act::SetImage { .. }) && writes_busy(pass.healer_writes, obs));
    let taken = turn::take::<Memo>(pass, &op, &version, &advance, may_send, dry_run, false);
    let mut turn = match taken.await? {
        Taken::Turn(t) => t,
        Taken::Done(passed) => return Ok(passed),
    };
    if turn.next.state == State::Succeeded && params.as_ref().is_some_and(|p| p.then_cycle) {
        then_cycle(pass, &turn.next, dry_run).await?;
    }
    let Some(act) = turn.act().cloned() else {
        return Ok(turn.idle());
    };
    let location = obs
        .record
        .as_ref()
        .and_then(|r| r.location.clone())
        .unwrap_or_else(|| "westeurope".into());
    let sent = send(compute, id, &location, &act).await;
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

/// `--then-cycle`: the rolling upgrade of every outdated instance, as `handler cycle --action
/// upgrade` would start it. One that cannot start (another operation took the set) is journaled.
async fn then_cycle(
    pass: &OperatePass<'_>,
    done: &Operation,
    dry_run: bool,
) -> Result<(), StoreError> {
    let raw = crate::operations::cycle::Raw {
        action: Some("upgrade"),
        ..Default::default()
    };
    let Ok(params) = crate::operations::cycle::parse(&raw) else {
        return Ok(());
    };
    let mut cycle = Operation::new(
        Kind::Cycle,
        pass.id.clone(),
        serde_json::to_value(&params).unwrap_or_default(),
        format!("{}: --then-cycle", done.id),
        dry_run,
        pass.now,
    );
    cycle.id = format!("cycle-{}", pass.now.unix_timestamp() + 1);
    let (outcome, reason) = match pass.store.start_operation(&cycle).await {
        Ok(_) => (
            "then_cycle",
            format!("rolling upgrade {} started", cycle.id),
        ),
        Err(StoreError::Conflict { key, .. }) => (
            "then_cycle_refused",
            format!("the rolling upgrade could not start: {key}"),
        ),
        Err(e) => return Err(e),
    };
    tracing::info!(scale_set = %pass.id, operation = %done.id, decision = outcome, reason = %reason, "operation step");
    pass.store
        .append_journal(&[entry(
            pass.id, done, "*", outcome, reason, dry_run, pass.now,
        )])
        .await
}

/// Sends one call; `Some` with the operation ARM accepted, `None` when the answer is the end.
async fn send(
    compute: &Compute,
    id: &ScaleSetId,
    location: &str,
    act: &Act,
) -> Result<Option<crate::compute::Accepted>, ComputeError> {
    match act {
        Act::RunCommand {
            instance,
            script,
            windows,
        } => compute
            .run_command(id, instance, script, *windows)
            .await
            .map(Some),
        Act::Deallocate { instance } => compute.deallocate_instance(id, instance).await.map(Some),
        Act::Snapshot { name, disk } => compute
            .create_snapshot(id, name, location, disk)
            .await
            .map(Some),
        Act::EnsureImage {
            gallery,
            definition,
            os_type,
            hyper_v_generation,
            architecture,
        } => {
            compute.ensure_gallery(id, gallery, location).await?;
            compute
                .ensure_image_definition(
                    id,
                    gallery,
                    definition,
                    location,
                    os_type,
                    hyper_v_generation,
                    architecture,
                )
                .await
                .map(|_| None)
        }
        Act::CreateVersion {
            gallery,
            definition,
            version,
            snapshot,
        } => {
            // Zone-redundant replicas where the region has zones; where ZRS is refused, locally
            // redundant ones (kamino's fallback).
            match compute
                .create_image_version(
                    id,
                    gallery,
                    definition,
                    version,
                    location,
                    snapshot,
                    "Standard_ZRS",
                )
                .await
            {
                Err(ComputeError::Refused(e)) if e.message.contains("ZRS") => compute
                    .create_image_version(
                        id,
                        gallery,
                        definition,
                        version,
                        location,
                        snapshot,
                        "Standard_LRS",
                    )
                    .await
                    .map(Some),
                other => other.map(Some),
            }
        }
        Act::Start { instance } => compute
            .start_instances(
                id,
                std::slice::from_ref(instance),
                crate::scaleset::Orchestration::Uniform,
            )
            .await
            .map(Some),
        Act::Reimage { instance } => compute
            .reimage_instances(
                id,
                std::slice::from_ref(instance),
                crate::scaleset::Orchestration::Uniform,
            )
            .await
            .map(Some),
        Act::SetImage { image } => compute.set_image(id, image).await.map(Some),
        Act::DeleteSnapshot { name } => compute.delete_snapshot(id, name).await.map(Some),
        Act::DeleteVersion {
            gallery,
            definition,
            version,
        } => compute
            .delete_image_version(id, gallery, definition, version)
            .await
            .map(Some),
    }
}
