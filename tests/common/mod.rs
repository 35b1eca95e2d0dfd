//! Test harness: real Azurite, the Compute simulator and the handler on free ports.
#![allow(dead_code)]

pub mod azurite;
