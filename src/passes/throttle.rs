//! Compute throttles per subscription and region ("Azure Compute requests may be throttled at a
//! subscription and on a per-region basis", Troubleshooting API throttling errors): a 429 met on
//! one scale set is a 429 for its neighbours too. The transport records each subscription's
//! `Retry-After` as it sees it; this writes it on every watched scale set of that subscription, so
//! that both timer passes, in any worker, leave the whole subscription alone until then.

use crate::compute::Compute;
use crate::scaleset::ScaleSetId;
use crate::settings::Settings;
use crate::state::{Store, StoreError};
use time::OffsetDateTime;

/// Holds every watched scale set of each subscription throttled beyond `now` until its
/// `Retry-After`: one batched merge per subscription.
pub async fn hold_subscriptions(
    store: &Store,
    compute: &Compute,
    settings: &Settings,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    for (subscription, until) in compute.observed().throttled(now) {
        let sets: Vec<ScaleSetId> = settings
            .scale_sets
            .iter()
            .filter(|w| w.id.subscription.eq_ignore_ascii_case(&subscription))
            .map(|w| w.id.clone())
            .collect();
        if !sets.is_empty() {
            tracing::warn!(subscription = %subscription, until = %crate::journal::stamp(until), scale_sets = sets.len(),
                "the Compute API throttled this subscription: every scale set in it waits");
            store.set_throttled(&sets, until).await?;
        }
    }
    Ok(())
}
