//! `monitor-events` (Event Grid trigger): heartbeats and scale-set lifecycle events in.
//!
//! A permanently bad event is logged, counted and answered 2xx so Event Grid does not redeliver
//! it forever; only storage faults answer non-2xx.

use super::store_error;
use crate::attestation;
use crate::event::{decode, Event};
use crate::heartbeat::{self, supersedes, HEARTBEAT_TYPE, PRUNELLA_TYPE};
use crate::host::{AppState, HostError, Invocation, Outcome};
use crate::lifecycle::{self, Change};
use crate::scaleset::{Orchestration, ScaleSetId, VmRef};
use crate::state::HeartbeatWrite;
use serde_json::json;
use time::OffsetDateTime;

pub async fn run(state: &AppState, invocation: Invocation) -> Result<Outcome, HostError> {
    let raw = invocation
        .trigger("event")
        .cloned()
        .ok_or_else(|| HostError::BadRequest("event invocation has no Data.event".into()))?;
    let now = OffsetDateTime::now_utc();
    let event = match decode(raw) {
        Ok(e) => e,
        Err(e) => return Ok(rejected(state, "bad_envelope", None, &e.to_string())),
    };
    if event.event_type.eq_ignore_ascii_case(HEARTBEAT_TYPE)
        || event.event_type.eq_ignore_ascii_case(PRUNELLA_TYPE)
    {
        on_heartbeat(state, &event, now).await
    } else if lifecycle::is_lifecycle(&event.event_type) {
        on_lifecycle(state, &event, now).await
    } else {
        let why = format!("event type `{}` is not handled", event.event_type);
        Ok(rejected(state, "unknown_event_type", Some(&event.id), &why))
    }
}

fn rejected(state: &AppState, label: &'static str, event_id: Option<&str>, why: &str) -> Outcome {
    let count = state.counters.reject(label);
    tracing::warn!(
        event_id = event_id.unwrap_or(""),
        reason = label,
        rejected_total = count,
        error = why,
        "event rejected"
    );
    Outcome::new(
        format!("rejected: {why}"),
        json!({"accepted": false, "reason": label, "detail": why, "rejected_total": count}),
    )
}

async fn on_heartbeat(
    state: &AppState,
    event: &Event,
    now: OffsetDateTime,
) -> Result<Outcome, HostError> {
    // A Flexible VM names itself, not its scale set: find the set before reading the rest.
    let resolved;
    let event = match flexible_subject(state, event).await? {
        Ok(None) => event,
        Ok(Some(subject)) => {
            resolved = Event {
                subject: Some(subject),
                ..event.clone()
            };
            &resolved
        }
        Err(r) => return Ok(rejected(state, r.label(), Some(&event.id), &r.to_string())),
    };
    let mut hb = match heartbeat::read(event, now) {
        Ok(hb) => hb,
        Err(r) => return Ok(rejected(state, r.label(), Some(&event.id), &r.to_string())),
    };
    let set = hb.target.scale_set.clone();
    let set = &set;
    let Some(watched) = state.settings.scale_set(set) else {
        let r = heartbeat::Rejection::UnknownScaleSet(set.resource_id());
        return Ok(rejected(state, r.label(), Some(&event.id), &r.to_string()));
    };
    let required = watched.policy.down_proof;
    let mirrored = state
        .store
        .mirrored_identity(set, &hb.target.instance_id)
        .await
        .map_err(store_error)?;
    // Who it claims to be, what it proves, and whether it can be that VM's reading at all.
    let checked = heartbeat::verify(&hb, mirrored.as_ref()).and_then(|instance| {
        attestation::prove(
            &mut hb,
            instance.vm_id.as_deref(),
            state.settings.attestation.as_ref(),
            now,
        )?;
        heartbeat::admit(&hb, instance, required)
    });
    if let Err(r) = checked {
        return Ok(rejected(state, r.label(), Some(&event.id), &r.to_string()));
    }
    let write = state
        .store
        .store_heartbeat(&hb, |new, stored| supersedes(new, stored, required))
        .await
        .map_err(store_error)?;
    let stored = write == HeartbeatWrite::Stored;
    tracing::info!(scale_set = %set, instance = %hb.target.instance_id, status = hb.status.label(),
        proof = hb.proof().as_str(), event_id = %hb.event_id, stored, "heartbeat");
    // Evidence that can make the instance unhealthy now: its set is evaluated at once (issue 19).
    // An UP costs nothing more than its write.
    let evaluation =
        (stored && state.settings.event_repairs && hb.status == heartbeat::Status::Down)
            .then(|| {
                state
                    .store
                    .remembered_down_since(set, &hb.target.instance_id)
            })
            .filter(|since| crate::prompt::due(&hb, *since, &watched.policy, now))
            .map(|_| {
                crate::prompt::trigger(
                    state,
                    set,
                    &format!("{} DOWN for HEALER_DOWN_FOR", hb.target.instance_id),
                    false,
                )
                .as_str()
            });
    let note = if stored {
        "stored"
    } else {
        "ignored: an equal or newer heartbeat is stored"
    };
    Ok(Outcome::new(
        format!("heartbeat {} from {}: {note}", hb.status.label(), hb.target),
        json!({"accepted": true, "stored": stored, "instance": hb.target.to_string(), "status": hb.status.label(), "proof": hb.proof().as_str(), "evaluation": evaluation}),
    ))
}

async fn on_lifecycle(
    state: &AppState,
    event: &Event,
    now: OffsetDateTime,
) -> Result<Outcome, HostError> {
    let change = match lifecycle::read(event) {
        Ok(c) => c,
        Err(e) => {
            return Ok(rejected(
                state,
                "not_a_scale_set",
                Some(&event.id),
                &e.to_string(),
            ))
        }
    };
    let sets: Vec<ScaleSetId> = match (&change, change.scale_set()) {
        (_, Some(set)) if state.settings.scale_set(set).is_some() => vec![set.clone()],
        (_, Some(set)) => {
            let why = format!("scale set {} is not watched", set.resource_id());
            return Ok(rejected(state, "unknown_scale_set", Some(&event.id), &why));
        }
        (Change::VmChanged { vm, .. }, None) => {
            // Sets mirrored as Uniform hold no plain VMs: a standalone VM of their group is
            // none of theirs.
            let mut sets = Vec::new();
            for id in state.settings.scale_sets.iter().map(|w| &w.id) {
                if !vm.could_be_in(id) {
                    continue;
                }
                let record = state.store.scale_set(id).await.map_err(store_error)?;
                let mode = record
                    .as_ref()
                    .and_then(|r| r.orchestration_mode.as_deref());
                if mode.is_none() || Orchestration::parse(mode) == Orchestration::Flexible {
                    sets.push(id.clone());
                }
            }
            if sets.is_empty() {
                let why = format!(
                    "VM {} is in resource group {}, where no Flexible scale set is watched",
                    vm.name, vm.resource_group
                );
                return Ok(rejected(state, "unknown_scale_set", Some(&event.id), &why));
            }
            sets
        }
        (_, None) => Vec::new(),
    };
    // Anyone who can reach the endpoint can send one of these, so none is taken as the truth:
    // each only has the next mirror pass read the scale set (one table write, no Compute call).
    // Removing an instance on the event's word would have it re-mirrored with no heartbeat and
    // replaced as never having reported.
    for set in &sets {
        state
            .store
            .mark_scale_set_changed(set, now)
            .await
            .map_err(store_error)?;
    }
    // A failed operation or a stopped VM can make an instance unhealthy: its set is evaluated at
    // once, on what a fresh read of it says (issue 19).
    let suspect = lifecycle::suspect(event).filter(|_| state.settings.event_repairs);
    let evaluation = suspect.as_ref().and_then(|why| {
        // Every set the event could be about is evaluated; the answer says how the last went.
        let triggered: Vec<&str> = sets
            .iter()
            .map(|set| crate::prompt::trigger(state, set, why, true).as_str())
            .collect();
        triggered.last().copied()
    });
    let set = sets
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let note = match &change {
        Change::InstanceDeleted(i) => {
            format!(
                "instance {} reported deleted: scale set marked for resync",
                i.instance_id
            )
        }
        Change::ScaleSetDeleted(_) => "scale set reported deleted: marked for resync".to_string(),
        Change::ScaleSetChanged(_) => "scale set marked for resync".to_string(),
        Change::VmChanged { vm, deleted } => format!(
            "VM {} {}: the watched scale sets of its resource group marked for resync",
            vm.name,
            if *deleted {
                "reported deleted"
            } else {
                "changed"
            }
        ),
    };
    tracing::info!(scale_set = %set, event_type = %event.event_type, event_id = %event.id, "{note}");
    Ok(Outcome::new(
        format!("lifecycle: {note}"),
        json!({"accepted": true, "change": note, "evaluation": evaluation}),
    ))
}

/// The subject of a Flexible VM's heartbeat, `…/providers/Microsoft.Compute/virtualMachines/<name>`
/// (design §2), as the instance of its scale set: the watched set of the VM's subscription and
/// resource group whose mirror holds a VM of that name. `Ok(None)`: not a plain VM subject (read as
/// before). Which set it is only decides where to look; the vmId check that follows is what
/// proves the sender is that VM.
async fn flexible_subject(
    state: &AppState,
    event: &Event,
) -> Result<Result<Option<String>, heartbeat::Rejection>, HostError> {
    let Some(vm) = event.subject.as_deref().and_then(|s| VmRef::parse(s).ok()) else {
        return Ok(Ok(None));
    };
    let mut candidates: Vec<&ScaleSetId> = state
        .settings
        .scale_sets
        .iter()
        .map(|w| &w.id)
        .filter(|id| vm.could_be_in(id))
        .collect();
    // A Flexible set names its VMs `<set>_<suffix>`: that set is looked in first, so a group that
    // also holds other sets costs no extra read per heartbeat.
    candidates.sort_by_key(|id| !vm.name.starts_with(&format!("{}_", id.name)));
    if candidates.is_empty() {
        return Ok(Err(heartbeat::Rejection::UnknownScaleSet(format!(
            "of VM {} (no watched scale set in resource group {})",
            vm.name, vm.resource_group
        ))));
    }
    for set in candidates {
        if state
            .store
            .mirrored_identity(set, &vm.name)
            .await
            .map_err(store_error)?
            .is_some()
        {
            return Ok(Ok(Some(vm.in_scale_set(set).resource_id())));
        }
    }
    Ok(Err(heartbeat::Rejection::UnknownInstance(format!(
        "VM {} (in no mirror of the watched scale sets of resource group {})",
        vm.name, vm.resource_group
    ))))
}
