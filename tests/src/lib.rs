//! kuberaft test harnesses.
//!
//! - [`sim`]: deterministic simulation of a group of consensus cores over a
//!   simulated network, disk and clocks, with invariants checked after every
//!   event and the client history checked for linearizability;
//! - [`history`]: operation histories and the per-key linearizability check;
//! - [`kv`]: the simulation's key-value state machine with per-client dedup;
//! - [`nemesis`]: real node processes behind faulty proxies, with clients
//!   whose histories are checked afterwards.

pub mod history;
pub mod kv;
pub mod nemesis;
pub mod sim;
