//! One thin module per Azure Function: parse the invocation, call the domain, write the result.

pub mod monitor_events;
pub mod monitor_state;
pub mod monitor_status;

use crate::host::{HostError, Invocation};
use crate::state::StoreError;
use serde_json::Value;

/// The timer binding's payload; `ScheduleStatus` may be null (first run, or no storage for it).
#[derive(Debug, Clone, PartialEq)]
pub struct Timer {
    pub is_past_due: bool,
    pub last: Option<String>,
}

pub fn timer(invocation: &Invocation) -> Result<Timer, HostError> {
    let value = invocation
        .trigger("timer")
        .ok_or_else(|| HostError::BadRequest("timer invocation has no Data.timer".into()))?;
    let Value::Object(timer) = value else {
        return Err(HostError::BadRequest(
            "Data.timer is not a JSON object".into(),
        ));
    };
    let is_past_due = match timer.get("IsPastDue") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(HostError::BadRequest(format!(
                "Data.timer.IsPastDue is {other}, expected true or false"
            )))
        }
    };
    let last = timer
        .get("ScheduleStatus")
        .and_then(|s| s.get("Last"))
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(Timer { is_past_due, last })
}

/// Storage faults are transient (the host retries); anything else is a bug or a misconfiguration.
pub fn store_error(e: StoreError) -> HostError {
    if e.is_transient() {
        HostError::Transient(e.into())
    } else {
        HostError::Internal(e.into())
    }
}
