//! Which scale sets a mirror pass reads, and why. Reading a scale set costs one Compute call per
//! page of instances, so a quiet scale set is read only at the slow full-resync interval; one that
//! something says changed (a Resource Manager event, a repair of ours in flight) or whose last read
//! failed is read on the next pass. Pure: the record, the interval and the clock decide.

use crate::mirror::ScaleSetRecord;
use serde::Serialize;
use time::{Duration, OffsetDateTime};

/// Why a pass reads a scale set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Read {
    /// Never read yet.
    FirstSync,
    /// Something said it changed after the last read.
    Changed,
    /// The last read failed: the mirror is behind.
    Retry,
    /// Quiet, but not read in full for the full-resync interval.
    FullResync,
}

impl Read {
    pub fn label(self) -> &'static str {
        match self {
            Read::FirstSync => "first_sync",
            Read::Changed => "changed",
            Read::Retry => "retry",
            Read::FullResync => "full_resync",
        }
    }
}

/// Why a pass leaves a scale set alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Read recently and nothing changed since; read again at `next` at the latest.
    Fresh { next: OffsetDateTime },
    /// The Compute API asked us to wait (429 `Retry-After`).
    Throttled { until: OffsetDateTime },
}

/// Whether this pass reads the scale set.
pub fn due(
    record: Option<&ScaleSetRecord>,
    key: &str,
    full_resync: Duration,
    now: OffsetDateTime,
) -> Result<Read, Hold> {
    let Some(record) = record else {
        return Ok(Read::FirstSync);
    };
    if let Some(until) = record.throttled_until.filter(|u| *u > now) {
        return Err(Hold::Throttled { until });
    }
    let Some(synced) = record.synced_at else {
        return Ok(Read::FirstSync);
    };
    if record.changed_at.is_some_and(|c| c >= synced) {
        return Ok(Read::Changed);
    }
    // A scale set found deleted is not retried every pass: its re-creation is an event, and the
    // full resync catches it otherwise.
    if record.sync_error.is_some() && record.exists {
        return Ok(Read::Retry);
    }
    let next = synced + interval(key, full_resync);
    if now >= next {
        Ok(Read::FullResync)
    } else {
        Err(Hold::Fresh { next })
    }
}

/// The full-resync interval of one scale set: between three quarters and all of the setting, fixed
/// per scale set, so that a hundred sets first read in the same pass do not all fall due in the
/// same later pass and spend the Compute read budget at once.
pub fn interval(key: &str, full_resync: Duration) -> Duration {
    // FNV-1a: stable across processes and releases, unlike the standard library's hasher.
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let spread = (hash % 1000) as f64 / 1000.0; // [0, 1)
    full_resync - full_resync * (spread / 4.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-23 10:00 UTC);
    const KEY: &str = "sub:rg:web";

    fn synced(ago_s: i64) -> ScaleSetRecord {
        ScaleSetRecord {
            synced_at: Some(NOW - Duration::seconds(ago_s)),
            ..ScaleSetRecord::unsynced()
        }
    }

    type Case = (
        &'static str,
        Option<ScaleSetRecord>,
        Duration,
        Result<Read, Hold>,
    );

    #[test]
    fn what_a_pass_reads() {
        let ten_min = Duration::minutes(10);
        let fresh_next = NOW - Duration::seconds(60) + interval(KEY, ten_min);
        let cases: Vec<Case> = vec![
            ("no row yet", None, ten_min, Ok(Read::FirstSync)),
            (
                "row without a sync (an event came first)",
                Some(ScaleSetRecord {
                    changed_at: Some(NOW),
                    ..ScaleSetRecord::unsynced()
                }),
                ten_min,
                Ok(Read::FirstSync),
            ),
            (
                "quiet and recent",
                Some(synced(60)),
                ten_min,
                Err(Hold::Fresh { next: fresh_next }),
            ),
            (
                "quiet past the interval",
                Some(synced(601)),
                ten_min,
                Ok(Read::FullResync),
            ),
            (
                "changed after the read",
                Some(ScaleSetRecord {
                    changed_at: Some(NOW - Duration::seconds(5)),
                    ..synced(60)
                }),
                ten_min,
                Ok(Read::Changed),
            ),
            (
                "changed before the read",
                Some(ScaleSetRecord {
                    changed_at: Some(NOW - Duration::seconds(61)),
                    ..synced(60)
                }),
                ten_min,
                Err(Hold::Fresh { next: fresh_next }),
            ),
            (
                "last read failed",
                Some(ScaleSetRecord {
                    sync_error: Some("boom".into()),
                    ..synced(60)
                }),
                ten_min,
                Ok(Read::Retry),
            ),
            (
                "found deleted: only at the interval",
                Some(ScaleSetRecord {
                    sync_error: Some("not found".into()),
                    exists: false,
                    ..synced(60)
                }),
                ten_min,
                Err(Hold::Fresh { next: fresh_next }),
            ),
            (
                "throttled",
                Some(ScaleSetRecord {
                    throttled_until: Some(NOW + Duration::seconds(30)),
                    changed_at: Some(NOW),
                    ..synced(60)
                }),
                ten_min,
                Err(Hold::Throttled {
                    until: NOW + Duration::seconds(30),
                }),
            ),
            (
                "throttling over",
                Some(ScaleSetRecord {
                    throttled_until: Some(NOW - Duration::seconds(1)),
                    ..synced(700)
                }),
                ten_min,
                Ok(Read::FullResync),
            ),
            (
                "interval zero: every pass",
                Some(synced(1)),
                Duration::ZERO,
                Ok(Read::FullResync),
            ),
        ];
        for (name, record, full, expected) in cases {
            assert_eq!(due(record.as_ref(), KEY, full, NOW), expected, "{name}");
        }
    }

    #[test]
    fn a_hundred_scale_sets_spread_their_full_reads() {
        let full = Duration::minutes(10);
        let mut minutes: Vec<i64> = (0..100)
            .map(|i| interval(&format!("sub:rg:set-{i:03}"), full).whole_minutes())
            .collect();
        minutes.sort_unstable();
        minutes.dedup();
        // 7.5 to 10 minutes: the sets fall due over at least three different passes.
        assert!(minutes.len() >= 3, "{minutes:?}");
    }

    proptest! {
        #[test]
        fn a_quiet_scale_set_is_never_left_longer_than_the_interval(
            key in "[a-z0-9:-]{1,40}",
            full_s in 0i64..86_400,
            age_s in 0i64..200_000,
        ) {
            let full = Duration::seconds(full_s);
            let i = interval(&key, full);
            prop_assert!(i <= full && i >= full * 0.75 - Duration::seconds(1));
            match due(Some(&synced(age_s)), &key, full, NOW) {
                Ok(read) => prop_assert!(read == Read::FullResync && Duration::seconds(age_s) >= i),
                Err(Hold::Fresh { next }) => {
                    prop_assert!(Duration::seconds(age_s) < i);
                    prop_assert!(next <= NOW - Duration::seconds(age_s) + full);
                }
                Err(other) => prop_assert!(false, "unexpected {other:?}"),
            }
        }
    }
}
