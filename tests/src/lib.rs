//! kuberaft test harnesses.
//!
//! - [`sim`]: deterministic simulation of a group of consensus cores over a
//!   simulated network, disk and clocks, with invariants checked after every
//!   event and the client history checked for linearizability;
//! - [`history`]: operation histories and the per-key linearizability check;
//! - [`kv`]: the simulation's key-value state machine with per-client dedup.

pub mod history;
pub mod kv;
pub mod sim;
