//! Fleetplane's test kit, used by every integration test.
//!
//! - [`agent`]: a simulated OpAMP agent that speaks the real protocol over
//!   WebSocket or HTTP: it describes itself, applies pushed configs (or rejects
//!   them), reports status, honours ReportFullState and new uids, and exposes
//!   what it saw through waits with deadlines.
//! - [`admin`]: a small client for the admin API.
//! - [`fleet`]: the scaled form as real processes (NATS, Redis, gateways, coordinators).
//! - [`python`]: runs the official Python OpAMP client, which we did not write.
//! - [`services`]: real redis-server and nats-server processes on their own ports.
//! - [`wait`]: deadline-bounded waits; tests never sleep to synchronise.
// Load tools and tests measure wall-clock time on purpose.
#![allow(clippy::disallowed_types)]

pub mod admin;
pub mod agent;
pub mod fleet;
pub mod python;
pub mod services;
pub mod wait;
