//! `monitor-status` (timer): decide which instances need repair, and repair them.

use super::{store_error, timer};
use crate::host::{AppState, HostError, Invocation, Outcome};
use time::OffsetDateTime;

pub async fn run(state: &AppState, invocation: Invocation) -> Result<Outcome, HostError> {
    let timer = timer(&invocation)?;
    // The clock is read once per pass and handed down.
    let now = OffsetDateTime::now_utc();
    if timer.is_past_due {
        tracing::warn!(function = "monitor-status", "timer is past due");
    }
    let report = crate::repair::repair_all(
        &state.store,
        &state.compute,
        &state.notifier,
        &state.settings,
        now,
    )
    .await
    .map_err(store_error)?;
    for set in &report.scale_sets {
        crate::telemetry::scale_set_judged(&set.scale_set, set.total, set.unhealthy);
        if let (Some(brake), Some(held)) = (set.paused, set.paused_for_s) {
            crate::telemetry::brake_held(
                &set.scale_set,
                brake,
                std::time::Duration::from_secs(held.unsigned_abs()),
            );
        }
    }
    let requested: usize = report.scale_sets.iter().map(|s| s.repairs_requested).sum();
    let withheld: usize = report.scale_sets.iter().map(|s| s.withheld).sum();
    let log = format!(
        "monitor-status: {requested} repairs {}, {withheld} withheld across {} scale sets",
        if report.dry_run {
            "decided (dry run)"
        } else {
            "requested"
        },
        report.scale_sets.len()
    );
    let value = serde_json::to_value(&report).map_err(|e| HostError::Internal(e.into()))?;
    Ok(Outcome::new(log, value))
}
