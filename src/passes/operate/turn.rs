//! The edge's part of an operation whose calls go one at a time, in order (a stateful
//! replacement, a golden image, a swap), once its engine has decided: mark the call whose turn it
//! is, claim the row and journal the engine's notes, then send that one call and record its
//! answer. The kinds keep only what they read before deciding and how each call is sent.

use super::{answered, claim, entry, OperatePass, OperationReport};
use crate::alert::Alert;
use crate::compute::{Accepted, ComputeError};
use crate::operations::step::{self, Advance, Call, CallState};
use crate::operations::Operation;
use crate::state::StoreError;
use serde::Serialize;

/// A kind's progress row, which holds its calls.
pub(super) trait Sequential: Serialize + Default {
    type Act;
    fn read(op: &Operation) -> Result<Self, String>;
    fn calls_mut(&mut self) -> &mut Vec<Call<Self::Act>>;
}

/// What a pass returns for an operation: its report, the alerts, whether to read the sets soon.
pub(super) type Passed = (OperationReport, Vec<Alert>, bool);

pub(super) enum Taken<M> {
    /// The row is the pass's: maybe a call to send.
    Turn(Box<Turn<M>>),
    /// Nothing changed, or another pass claimed the row first.
    Done(Passed),
}

pub(super) struct Turn<M> {
    pub next: Operation,
    memo: M,
    to_send: Option<usize>,
    version: String,
    pub report: OperationReport,
    pub alerts: Vec<Alert>,
    resync: bool,
    dry_run: bool,
}

/// Marks the call whose turn it is as being sent — if the kind lets it go now (`may_send`) and
/// the pass has time for it — and claims the row with the engine's notes and alert. `changed`:
/// the kind has more to write than the row (a slot).
pub(super) async fn take<M: Sequential>(
    pass: &OperatePass<'_>,
    op: &Operation,
    version: &str,
    advance: &Advance,
    may_send: impl Fn(&M::Act) -> bool,
    dry_run: bool,
    changed: bool,
) -> Result<Taken<M>, StoreError> {
    let mut next = advance.op.clone();
    let mut memo = M::read(&next).unwrap_or_default();
    let calls = memo.calls_mut();
    let to_send = step::sendable(calls)
        .filter(|i| may_send(&calls[*i].act))
        .filter(|_| dry_run || pass.deadline.fits_a_call());
    if let Some(call) = to_send.and_then(|i| calls.get_mut(i)) {
        // A dry run records its calls as taken; nothing is sent.
        call.state = CallState::sending(dry_run, pass.now);
    }
    next.memo = serde_json::to_value(&memo).unwrap_or(serde_json::Value::Null);
    let mut report = OperationReport::of(&next);
    if !advance.changed(op) && to_send.is_none() && next.memo == op.memo && !changed {
        return Ok(Taken::Done((report, Vec::new(), false)));
    }
    let Some((version, alerts)) = claim(pass, &next, version, advance, dry_run).await? else {
        report.claimed_elsewhere = true;
        return Ok(Taken::Done((report, Vec::new(), false)));
    };
    Ok(Taken::Turn(Box::new(Turn {
        next,
        memo,
        to_send: to_send.filter(|_| !dry_run),
        version,
        report,
        alerts,
        resync: advance.resync,
        dry_run,
    })))
}

impl<M: Sequential> Turn<M> {
    /// The call to send now, if any (never in a dry run).
    pub fn act(&mut self) -> Option<&M::Act> {
        let i = self.to_send?;
        self.memo.calls_mut().get(i).map(|c| &c.act)
    }

    /// No call this pass.
    pub fn idle(mut self) -> Passed {
        self.report.progress = self.next.progress();
        (self.report, self.alerts, self.resync)
    }

    /// Records ARM's answer to the call [`Turn::act`] gave: the row, and a journal line.
    pub async fn record(
        mut self,
        pass: &OperatePass<'_>,
        what: String,
        sent: Result<Option<Accepted>, ComputeError>,
    ) -> Result<Passed, StoreError> {
        let (id, now) = (pass.id, pass.now);
        let Some(call) = self.to_send.and_then(|i| self.memo.calls_mut().get_mut(i)) else {
            return Ok(self.idle());
        };
        self.report.calls += 1;
        let (state, outcome, reason) = answered(sent, &what, now, &mut self.next.last_error);
        call.state = state;
        tracing::info!(scale_set = %id, operation = %self.next.id, decision = outcome, reason = %reason, "operation call");
        self.next.memo = serde_json::to_value(&self.memo).unwrap_or(serde_json::Value::Null);
        self.next.updated = now;
        if pass
            .store
            .update_operation(&self.next, &self.version)
            .await?
            .is_none()
        {
            tracing::warn!(scale_set = %id, operation = %self.next.id, "operation changed while its call was sent; its answer is judged again");
        }
        let line = entry(id, &self.next, "*", outcome, reason, self.dry_run, now);
        pass.store.append_journal(&[line]).await?;
        self.report.progress = self.next.progress();
        Ok((self.report, self.alerts, true))
    }
}
