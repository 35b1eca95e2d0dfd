//! vmss-healer: keeps Azure Virtual Machine Scale Sets healthy from VM heartbeats.
//!
//! Pure domain modules (`scaleset`, `policy`, `event`, `heartbeat`, `mirror`, `verdict`, `plan`,
//! `journal`) decide; the edges (`state` for tables, `compute` for ARM, `host` for the Functions
//! host) do I/O; `functions` holds one thin module per Azure Function.

pub mod event;
pub mod heartbeat;
pub mod journal;
pub mod mirror;
pub mod plan;
pub mod policy;
pub mod scaleset;
pub mod settings;
pub mod state;
pub mod verdict;
