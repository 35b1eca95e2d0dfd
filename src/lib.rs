//! vmss-healer: keeps Azure Virtual Machine Scale Sets healthy from VM heartbeats.
//!
//! The folders say what each module is:
//! - `domain`: pure decisions and the types they speak — identities (`scaleset`), events and
//!   heartbeats, the mirror, verdicts, incidents, the repair policy and `plan::decide`, the
//!   journal, what `handler status` shows. No I/O.
//! - `passes`: the timer passes that gather, decide, act and record — `sync` (the mirror),
//!   `repair` (with `follow` for the operations it started), and what they share (`deadline`,
//!   `throttle`).
//! - `edges`: everything that talks to the outside — `state` (the only code that knows tables,
//!   keys and ETags), `compute` (the only code that knows ARM), `host` (the Functions host),
//!   alerts, telemetry, settings, identity, logs and secrets, the operator's commands.
//! - `functions`: one thin module per Azure Function: parse the invocation, call a pass, answer.
//!
//! - `operations`: long-running operations (design §7): the operation, what an operator may do to
//!   it, and each kind's pure engine (`cycle`); `passes::operate` advances them in `monitor-status`.
//!
//! Every module is also reachable at the crate's root (`vmss_healer::plan`), as before the folders.

pub mod domain {
    pub mod attestation;
    pub mod autoscale;
    pub mod event;
    pub mod heartbeat;
    pub mod incident;
    pub mod journal;
    pub mod lifecycle;
    pub mod mirror;
    pub mod plan;
    pub mod policy;
    pub mod resync;
    pub mod scaleset;
    pub mod slot;
    pub mod status;
    pub mod verdict;
}

pub mod passes {
    pub mod deadline;
    pub mod follow;
    pub mod operate;
    pub mod prompt;
    pub mod repair;
    pub mod sync;
    pub mod throttle;
}

pub mod edges {
    pub mod admission;
    pub mod alert;
    pub mod compute;
    pub mod host;
    pub mod identity;
    pub mod logs;
    pub mod operator;
    pub mod secret;
    pub mod settings;
    pub mod state;
    pub mod telemetry;
}

pub mod functions;
pub mod operations;

pub use domain::{
    attestation, autoscale, event, heartbeat, incident, journal, lifecycle, mirror, plan, policy,
    resync, scaleset, slot, status, verdict,
};
pub use edges::{
    admission, alert, compute, host, identity, logs, operator, secret, settings, state, telemetry,
};
pub use passes::{deadline, follow, operate, prompt, repair, sync, throttle};
