//! vmss-healer: keeps Azure Virtual Machine Scale Sets healthy from VM heartbeats.
//!
//! Pure domain modules (`scaleset`, `policy`, `event`, `heartbeat`, `mirror`, `verdict`, `plan`,
//! `journal`, `resync`) decide; the edges (`state` for tables, `compute` for ARM, `host` for the Functions
//! host) do I/O; `functions` holds one thin module per Azure Function.

pub mod admission;
pub mod alert;
pub mod attestation;
pub mod compute;
pub mod deadline;
pub mod event;
pub mod follow;
pub mod functions;
pub mod heartbeat;
pub mod host;
pub mod identity;
pub mod incident;
pub mod journal;
pub mod lifecycle;
pub mod logs;
pub mod mirror;
pub mod operator;
pub mod plan;
pub mod policy;
pub mod repair;
pub mod resync;
pub mod scaleset;
pub mod secret;
pub mod settings;
pub mod state;
pub mod status;
pub mod sync;
pub mod telemetry;
pub mod throttle;
pub mod verdict;
