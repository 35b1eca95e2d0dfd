//! `monitor-state` (timer): mirror each watched scale set's instances into the `instances` table.

use super::{store_error, timer};
use crate::host::{AppState, HostError, Invocation, Outcome};
use crate::sync::SyncOutcome;
use time::OffsetDateTime;

pub async fn run(state: &AppState, invocation: Invocation) -> Result<Outcome, HostError> {
    let timer = timer(&invocation)?;
    let now = OffsetDateTime::now_utc();
    if timer.is_past_due {
        tracing::warn!(function = "monitor-state", "timer is past due");
    }
    let report = crate::sync::sync_all(&state.store, &state.compute, &state.settings, now)
        .await
        .map_err(store_error)?;
    for set in &report.scale_sets {
        crate::telemetry::mirror_pass(&set.scale_set, set.outcome.label());
    }
    let count = |outcome: SyncOutcome| {
        report
            .scale_sets
            .iter()
            .filter(|s| s.outcome == outcome)
            .count()
    };
    let log = format!(
        "monitor-state: {} of {} scale sets synced, {} fresh, with {} Compute calls",
        count(SyncOutcome::Synced),
        report.scale_sets.len(),
        count(SyncOutcome::Fresh),
        report.compute_calls
    );
    let value = serde_json::to_value(&report).map_err(|e| HostError::Internal(e.into()))?;
    Ok(Outcome::new(log, value))
}
