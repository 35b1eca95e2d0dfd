//! Repair in seconds, not minutes (issue 19): when evidence that can make an instance unhealthy
//! arrives by event — a DOWN heartbeat whose streak has lasted `HEALER_DOWN_FOR`, a Resource
//! Manager event of a failed operation or a stopped VM — `monitor-events` has its scale set
//! evaluated at once ([`crate::repair::repair_one`]: the timer pass's gather →
//! decide → act → journal for that one set), instead of waiting up to a minute for the timer.
//!
//! Coalesced: a burst of evidence in one set (a bad deployment: hundreds of DOWNs in a second)
//! runs at most one evaluation of it at a time — evidence arriving meanwhile asks for one more run
//! after it, never one per event — at most one start per set per [`MIN_INTERVAL`], and at most
//! [`MAX_CONCURRENT`] sets at once across the process. Bounded: an evaluation has [`BUDGET`]; what
//! does not fit is the next pass's, under the same claim rules, never done twice. The event's
//! answer does not wait for it (Event Grid gives a delivery 30 s before it retries).
//!
//! A Resource Manager event is only a hint (anyone who reaches the endpoint can send one): its
//! evaluation reads the scale set from the Compute API first and judges what that says — at most
//! once per set per [`FRESH_INTERVAL`], never from the read budget the mirror passes need.

use crate::heartbeat::{Heartbeat, Status};
use crate::host::AppState;
use crate::policy::Policy;
use crate::scaleset::ScaleSetId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use tokio::sync::Semaphore;

/// The least time between two evaluations of one scale set.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// The least time between two evaluations of one scale set that read it afresh first.
pub const FRESH_INTERVAL: Duration = Duration::from_secs(10);
/// The least time between two fresh reads of any sets by one process: a flood of Resource
/// Manager events (forged, or a regional outage's) reads one set per second, never the
/// subscription's read budget at once.
pub const FRESH_GAP: Duration = Duration::from_secs(1);
/// Scale sets evaluated at once by one process.
pub const MAX_CONCURRENT: usize = 4;
/// How long one evaluation may run beyond one `HEALER_CALL_TIMEOUT`: a call fits (a pass's must
/// fit its deadline); a second group of calls that no longer does is the next pass's.
pub const BUDGET: Duration = Duration::from_secs(10);

/// Whether this heartbeat, just stored, is evidence to act on now: DOWN for `HEALER_DOWN_FOR`
/// already (its streak began at `down_since`). A DOWN not yet that long is looked at again by the
/// next DOWN after that moment (agents report every interval); silence is the timer's.
///
/// By the agent's clock as well as ours: the streak began at the first DOWN's event time, and an
/// agent reporting every `HEALER_DOWN_FOR` (both a minute by default) sends the DOWN that completes
/// it at exactly that time later — by our clock it may arrive a hair early (clock skew), and
/// waiting for the next one would cost a whole interval. The evaluation itself judges by our
/// clock, so a forged event time only costs an evaluation.
pub fn due(
    hb: &Heartbeat,
    down_since: Option<OffsetDateTime>,
    policy: &Policy,
    now: OffsetDateTime,
) -> bool {
    let since = down_since.unwrap_or(hb.event_time);
    hb.status == Status::Down && now.max(hb.event_time) >= since + policy.down_for
}

#[derive(Debug, Default)]
struct Gate {
    running: bool,
    again: bool,
    /// The next run reads the scale set afresh first (a Resource Manager event asked).
    fresh: bool,
    last: Option<Instant>,
    last_fresh: Option<Instant>,
}

/// What a trigger did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Triggered {
    /// An evaluation of the set starts.
    Started,
    /// One runs: it runs once more when done (coalesced).
    Coalesced,
}

impl Triggered {
    pub fn as_str(self) -> &'static str {
        match self {
            Triggered::Started => "started",
            Triggered::Coalesced => "coalesced",
        }
    }
}

/// The process's evaluations, per scale set.
#[derive(Debug)]
pub struct Prompts {
    gates: Mutex<HashMap<String, Gate>>,
    permits: Arc<Semaphore>,
    /// Evaluations run since start (for the benchmark and `handler status`).
    runs: std::sync::atomic::AtomicU64,
    /// When the next fresh read of any set may start ([`FRESH_GAP`]).
    fresh_next: Mutex<Option<Instant>>,
}

impl Default for Prompts {
    fn default() -> Self {
        Prompts {
            gates: Mutex::new(HashMap::new()),
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT)),
            runs: std::sync::atomic::AtomicU64::new(0),
            fresh_next: Mutex::new(None),
        }
    }
}

impl Prompts {
    fn gates(&self) -> std::sync::MutexGuard<'_, HashMap<String, Gate>> {
        match self.gates.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Asks for an evaluation of `set` (`fresh`: reading it afresh first): `Started` when this
    /// call is to run it, `Coalesced` when one runs already (it runs once more after).
    pub fn enter(&self, set: &ScaleSetId, fresh: bool) -> Triggered {
        let mut gates = self.gates();
        let gate = gates.entry(set.key()).or_default();
        gate.fresh |= fresh;
        if gate.running {
            gate.again = true;
            Triggered::Coalesced
        } else {
            gate.running = true;
            Triggered::Started
        }
    }

    /// An evaluation ended: whether to run it once more (evidence came meanwhile).
    pub fn leave(&self, set: &ScaleSetId) -> bool {
        let mut gates = self.gates();
        let gate = gates.entry(set.key()).or_default();
        if gate.again {
            gate.again = false;
            true
        } else {
            gate.running = false;
            false
        }
    }

    /// How long to wait before the next start of `set` (at most one per [`MIN_INTERVAL`], one
    /// with a fresh read per [`FRESH_INTERVAL`], and fresh reads of all sets [`FRESH_GAP`] apart),
    /// and whether it reads afresh; the start is recorded.
    fn pace(&self, set: &ScaleSetId) -> (Duration, bool) {
        let mut gates = self.gates();
        let gate = gates.entry(set.key()).or_default();
        let now = Instant::now();
        let after = |last: Option<Instant>, gap: Duration| {
            last.map(|l| (l + gap).saturating_duration_since(now))
                .unwrap_or_default()
        };
        let fresh = std::mem::take(&mut gate.fresh);
        let mut wait = after(gate.last, MIN_INTERVAL);
        if fresh {
            wait = wait.max(after(gate.last_fresh, FRESH_INTERVAL));
            let mut next = match self.fresh_next.lock() {
                Ok(n) => n,
                Err(poisoned) => poisoned.into_inner(),
            };
            wait = wait.max(next.map_or(Duration::ZERO, |n| n.saturating_duration_since(now)));
            *next = Some(now + wait + FRESH_GAP);
            gate.last_fresh = Some(now + wait);
        }
        gate.last = Some(now + wait);
        (wait, fresh)
    }

    /// Scale sets with an evaluation running or about to.
    pub fn running(&self) -> usize {
        self.gates().values().filter(|g| g.running).count()
    }

    pub fn runs(&self) -> u64 {
        self.runs.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Has `set` evaluated now, in the background, coalesced with any evaluation of it under way;
/// `fresh`: read from the Compute API first (the evidence is an event's word).
pub fn trigger(state: &AppState, set: &ScaleSetId, why: &str, fresh: bool) -> Triggered {
    let triggered = state.prompts.enter(set, fresh);
    tracing::info!(scale_set = %set, decision = "evaluate", trigger = triggered.as_str(), why, fresh, "scale set evaluated at once");
    if triggered == Triggered::Started {
        let (state, set) = (state.clone(), set.clone());
        tokio::spawn(async move {
            loop {
                let (wait, fresh) = state.prompts.pace(&set);
                tokio::time::sleep(wait).await;
                evaluate(&state, &set, fresh).await;
                if !state.prompts.leave(&set) {
                    break;
                }
            }
        });
    }
    triggered
}

async fn evaluate(state: &AppState, set: &ScaleSetId, fresh: bool) {
    let Some(watched) = state.settings.scale_set(set) else {
        return;
    };
    let Ok(_permit) = state.prompts.permits.clone().acquire_owned().await else {
        return;
    };
    state
        .prompts
        .runs
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let now = OffsetDateTime::now_utc();
    let budget = state.settings.call_timeout.unsigned_abs() + BUDGET;
    let run = async {
        if fresh {
            let (store, compute) = (&state.store, &state.compute);
            let read = crate::sync::sync_set(store, compute, &state.settings, set, budget, now);
            if let Some(sync) = read.await? {
                tracing::info!(scale_set = %set, outcome = sync.outcome.label(), instances = sync.instances, written = sync.written, "read afresh for the evaluation");
            }
        }
        crate::repair::repair_one(
            &state.store,
            &state.compute,
            &state.notifier,
            &state.settings,
            watched,
            budget,
            OffsetDateTime::now_utc(),
        )
        .await
    };
    // The budget bounds the calls; this bounds everything else (storage that hangs).
    match tokio::time::timeout(budget * 2 + BUDGET, run).await {
        Ok(Ok(Some(report))) => {
            tracing::info!(scale_set = %set, requested = report.repairs_requested, withheld = report.withheld, paused = report.paused.unwrap_or(""), "evaluation done");
        }
        Ok(Ok(None)) => {}
        Ok(Err(e)) => {
            tracing::warn!(scale_set = %set, error = %e, "evaluation failed; the next timer pass decides");
        }
        Err(_) => {
            tracing::warn!(scale_set = %set, "evaluation did not end in time; the next timer pass decides (claims keep it from acting twice)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heartbeat::Origin;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-12-02 10:00 UTC);

    fn hb(status: Status) -> Heartbeat {
        Heartbeat {
            target: ScaleSetId::new("s", "rg", "web").instance("1"),
            status,
            event_time: NOW,
            received_at: NOW,
            sequence: None,
            vm_id: None,
            computer_name: None,
            detail: None,
            origin: Origin::Agent,
            event_id: "e".into(),
            down_since: None,
            attested: false,
            attestation: None,
        }
    }

    #[test]
    fn a_down_is_due_once_its_streak_lasted_down_for() {
        let policy = crate::settings::Settings::from_lookup(|k| match k {
            "HEALER_SCALE_SETS" => Some(
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/web".into(),
            ),
            "HEALER_STORAGE" => Some("UseDevelopmentStorage=true".into()),
            _ => None,
        })
        .unwrap()
        .defaults;
        let down_for = policy.down_for;
        let second = time::Duration::seconds(1);
        for (status, since, sent, want) in [
            (Status::Down, Some(NOW - down_for), NOW, true),
            (Status::Down, Some(NOW - down_for + second), NOW, false),
            (Status::Down, None, NOW, down_for.is_zero()),
            (Status::Up, Some(NOW - down_for * 2), NOW, false),
            (Status::Starting, None, NOW, false),
            // The agent's clock a second ahead of ours: its DOWN sent HEALER_DOWN_FOR after the
            // first completes the streak by its own clock.
            (
                Status::Down,
                Some(NOW - down_for + second),
                NOW + second,
                true,
            ),
        ] {
            let mut beat = hb(status.clone());
            beat.event_time = sent;
            assert_eq!(
                due(&beat, since, &policy, NOW),
                want,
                "{status:?} {since:?} {sent}"
            );
        }
    }

    #[test]
    fn evaluations_of_one_set_coalesce_and_others_do_not_wait() {
        let prompts = Prompts::default();
        let (web, api) = (
            ScaleSetId::new("s", "rg", "web"),
            ScaleSetId::new("s", "rg", "api"),
        );
        assert_eq!(prompts.enter(&web, false), Triggered::Started);
        for _ in 0..500 {
            assert_eq!(prompts.enter(&web, false), Triggered::Coalesced);
        }
        assert_eq!(
            prompts.enter(&api, false),
            Triggered::Started,
            "another set is not held"
        );
        assert!(prompts.leave(&web), "evidence came meanwhile: once more");
        assert!(!prompts.leave(&web), "and only once, for 500 events");
        assert_eq!(prompts.enter(&web, false), Triggered::Started);
        // Paced: a second start within the interval waits for it.
        assert_eq!(prompts.pace(&web), (Duration::ZERO, false));
        let (wait, _) = prompts.pace(&web);
        assert!(wait > Duration::ZERO && wait <= MIN_INTERVAL, "{wait:?}");
    }

    #[test]
    fn a_fresh_read_is_asked_once_for_a_burst_and_paced_apart() {
        let prompts = Prompts::default();
        let web = ScaleSetId::new("s", "rg", "web");
        assert_eq!(prompts.enter(&web, true), Triggered::Started);
        assert_eq!(prompts.pace(&web), (Duration::ZERO, true));
        // Events while it runs: one more run, which reads afresh if any of them asked.
        prompts.enter(&web, false);
        prompts.enter(&web, true);
        prompts.enter(&web, false);
        assert!(prompts.leave(&web));
        let (wait, fresh) = prompts.pace(&web);
        assert!(fresh, "the second event asked for a read");
        assert!(
            wait > MIN_INTERVAL && wait <= FRESH_INTERVAL,
            "a second read of the set waits for FRESH_INTERVAL: {wait:?}"
        );
        assert!(!prompts.leave(&web));
        // Another set's fresh read waits for the process-wide gap; its heartbeat evaluations do
        // not.
        let api = ScaleSetId::new("s", "rg", "api");
        assert_eq!(prompts.enter(&api, true), Triggered::Started);
        let (api_wait, api_fresh) = prompts.pace(&api);
        assert!(
            api_fresh && api_wait >= wait + FRESH_GAP - Duration::from_millis(50),
            "{api_wait:?}"
        );
        assert!(!prompts.leave(&api));
        assert_eq!(prompts.enter(&api, false), Triggered::Started);
        let (later_api, _) = prompts.pace(&api);
        assert!(later_api <= api_wait + MIN_INTERVAL, "{later_api:?}");
        // A heartbeat's evaluation after it needs no read and waits only MIN_INTERVAL after it.
        assert_eq!(prompts.enter(&web, false), Triggered::Started);
        let (later, fresh) = prompts.pace(&web);
        assert!(!fresh && later <= wait + MIN_INTERVAL, "{later:?}");
    }
}
