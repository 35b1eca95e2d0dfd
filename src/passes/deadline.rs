//! The time budget of one timer pass (`HEALER_PASS_DEADLINE`): the Functions host abandons an
//! invocation at `functionTimeout`, and an abandoned pass leaves claims and journal rows half
//! written. A pass stops starting work once what is left could not finish in time, and leaves the
//! rest to the next pass — saying so.

use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: Instant,
    /// The longest one Compute call may take (`HEALER_CALL_TIMEOUT`).
    call: Duration,
}

impl Deadline {
    /// A pass starting now, allowed `budget`, making calls of at most `call`.
    pub fn after(budget: Duration, call: Duration) -> Self {
        Deadline {
            at: Instant::now() + budget,
            call,
        }
    }

    /// Time left before the deadline (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Whether one more Compute call still fits: a call that could outlast the deadline is not
    /// started.
    pub fn fits_a_call(&self) -> bool {
        self.remaining() >= self.call
    }

    /// Whether the deadline has passed.
    pub fn passed(&self) -> bool {
        self.remaining().is_zero()
    }

    /// Runs `work` until the deadline; `None` if the deadline came first (the work is dropped
    /// where it stood: only reads are cut this way, never a write between its call and its record).
    pub async fn bound<T>(&self, work: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::time::timeout_at(self.at, work).await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_pass_stops_starting_calls_that_would_outlast_it() {
        let d = Deadline::after(Duration::from_secs(100), Duration::from_secs(30));
        assert!(d.fits_a_call() && !d.passed());
        tokio::time::advance(Duration::from_secs(71)).await;
        assert!(!d.fits_a_call(), "29 s left: a 30 s call does not fit");
        assert!(!d.passed());
        let slow = d.bound(tokio::time::sleep(Duration::from_secs(60))).await;
        assert_eq!(slow, None, "cut at the deadline");
        assert!(d.passed());
        let d = Deadline::after(Duration::from_secs(100), Duration::from_secs(30));
        assert_eq!(d.bound(async { 7 }).await, Some(7));
    }
}
