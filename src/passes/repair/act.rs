//! Acting on one scale set's claimed steps: claim by version, journal the intent, send one Compute
//! call per group, record each answer as the error policy says — one call at a time.

use super::*;

/// What one scale set's repair pass shares while it acts.
#[derive(Clone, Copy)]
pub(super) struct SetPass<'a> {
    pub store: &'a Store,
    pub compute: &'a Compute,
    pub id: &'a ScaleSetId,
    pub dry_run: bool,
    pub deadline: &'a Deadline,
    pub now: OffsetDateTime,
    pub mode: Orchestration,
    pub policy: &'a crate::policy::Policy,
    /// What decided: `timer` (a `monitor-status` pass) or `evaluation` (an event's, issue 19);
    /// kept with each call's journal rows.
    pub by: &'static str,
}

impl SetPass<'_> {
    /// An alert about the scale set, or about one step of it.
    pub fn alert(&self, kind: AlertKind, t: Option<&Transition>, reason: String) -> Alert {
        Alert {
            kind,
            scale_set: self.id.resource_id(),
            instance: t.map(|t| t.incident.target.clone()),
            incident: t.map(|t| t.incident.id.clone()),
            action: t.and_then(|t| t.incident.action).map(|a| a.to_string()),
            attempt: t.map(|t| t.incident.attempt),
            reason,
            at: self.now,
            dry_run: self.dry_run,
        }
    }
}

/// The groups of steps that go out as one call each: one per kind of call, except steps split
/// from a refused batch, and a Flexible scale set's restarts, starts, reimages and redeploys (the
/// VM API takes one VM).
pub(super) fn group(
    acting: Vec<Transition>,
    mode: Orchestration,
) -> BTreeMap<(Call, Option<String>), Vec<Transition>> {
    let mut calls: BTreeMap<(Call, Option<String>), Vec<Transition>> = BTreeMap::new();
    for t in acting {
        if let Some(call) = t.incident.call() {
            let one_vm = mode == Orchestration::Flexible
                && matches!(
                    call,
                    Call::Restart | Call::Start | Call::Reimage | Call::Redeploy
                );
            // A stateful replacement is one operation per instance.
            let alone = ((t.alone() || one_vm || call == Call::Carry) && call != Call::Grow)
                .then(|| t.incident.target.clone());
            calls.entry((call, alone)).or_default().push(t);
        }
    }

    calls
}

/// The steps that call the Compute API, one group (one call) at a time.
pub(super) async fn act(
    pass: &SetPass<'_>,
    calls: BTreeMap<(Call, Option<String>), Vec<Transition>>,
    report: &mut SetReport,
    alerts: &mut Vec<Alert>,
) -> Result<(), StoreError> {
    let SetPass {
        store,
        id,
        dry_run,
        deadline,
        now,
        ..
    } = *pass;
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
        let group = claim(store, id, group, report).await?;
        if group.is_empty() {
            continue;
        }
        send_group(pass, call, group, report, alerts).await?;
    }
    Ok(())
}

/// One claimed group: its intent journaled, its one Compute call sent, each step's answer
/// recorded as the error policy says (or the claim released), all journaled.
async fn send_group(
    pass: &SetPass<'_>,
    call: Call,
    group: Vec<Claimed>,
    report: &mut SetReport,
    alerts: &mut Vec<Alert>,
) -> Result<(), StoreError> {
    let SetPass {
        store,
        compute,
        id,
        dry_run,
        now,
        mode,
        ..
    } = *pass;
    let alert = |kind, t: Option<&Transition>, reason: String| pass.alert(kind, t, reason);
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
    let reason_of = |t: &Transition| t.reason.as_ref().map(|r| r.describe()).unwrap_or_default();
    if !dry_run {
        // The intent, before the call: the journal shows every call ARM may have received.
        let intent: Vec<Entry> = group
            .iter()
            .map(|(t, _)| {
                let mut evidence = t.evidence.clone();
                evidence["call"] = json!(call);
                evidence["stage"] = json!(t.incident.stage);
                evidence["by"] = json!(pass.by);
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
    } else if call == Call::Carry {
        start_carry(pass, &group[0].0).await
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
        evidence["by"] = json!(pass.by);
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
    Ok(())
}

/// Claims transitions by replacing each row at the version read; only what this pass claimed
/// is acted on.
pub(super) async fn claim(
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
pub(super) async fn defer(
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

/// A transition this pass claimed, with the row version the claim wrote.
pub(super) type Claimed = (Transition, String);

/// One Compute call for every instance that takes it.
pub(super) async fn send(
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
        // Started by `start_carry`, never sent here.
        Call::Carry => Err(ComputeError::Failed(
            "a stateful replacement is an operation, not one call".into(),
        )),
        Call::Grow => {
            let n = u32::try_from(ids.len()).unwrap_or(u32::MAX);
            let grown = compute.grow(id, n).await?;
            tracing::info!(scale_set = %id, from = grown.from, to = grown.to, "capacity raised by {n} from a fresh read, with If-Match");
            Ok(grown.accepted)
        }
    }
}

/// A stateful set's replace: the stateful replacement operation is started for the target (it
/// holds the target from its first row). Another operation on the set makes it wait, as a busy
/// scale set would; a dry run starts a dry-run operation that calls nothing.
async fn start_carry(pass: &SetPass<'_>, t: &Transition) -> Result<Accepted, ComputeError> {
    let Some(stateful) = pass.policy.stateful.as_ref() else {
        return Err(ComputeError::Failed(
            "a stateful replacement on a set without a stateful policy".into(),
        ));
    };
    let params = crate::operations::carry::Params::new(
        &t.incident.target,
        &t.incident.id,
        stateful,
        pass.policy.repair_timeout,
    );
    let mut op = crate::operations::Operation::new(
        crate::operations::Kind::Carry,
        pass.id.clone(),
        serde_json::to_value(&params).unwrap_or_default(),
        format!(
            "incident {} (attempt {})",
            t.incident.id, t.incident.attempt
        ),
        pass.dry_run,
        pass.now,
    );
    op.holds = vec![t.incident.target.clone()];
    match pass.store.start_operation(&op).await {
        Ok(_) => {
            tracing::info!(scale_set = %pass.id, instance = %t.incident.target, incident = %t.incident.id, operation = %op.id, "stateful replacement started");
            Ok(Accepted { operation: None })
        }
        Err(StoreError::Conflict { key, .. }) => {
            Err(ComputeError::Busy(crate::compute::ArmError {
                status: 409,
                code: "OperationInTheWay".into(),
                message: format!(
                    "another operation holds the scale set ({key}): the stateful replacement waits"
                ),
            }))
        }
        Err(e) => Err(ComputeError::Transient(format!(
            "starting the stateful replacement: {e}"
        ))),
    }
}

/// Puts an incident row back as it was before this pass claimed it.
pub(super) async fn release(
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
pub(super) async fn journal_rows(store: &Store, entries: &[Entry]) -> Result<(), StoreError> {
    store.append_journal(entries).await?;
    crate::telemetry::journaled(entries);
    Ok(())
}
