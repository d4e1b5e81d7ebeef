//! Staged batch rollouts with automatic rollback.
//!
//! - [`plan`]: who goes in which stage (pure);
//! - [`machine`]: the state machine (pure);
//! - `executor`: loads, steps and stores rollouts, then acts (pushes, promotes).
//!
//! A rollout moves the agents that an assignment wins to a target config
//! version. Until it completes, the assignment keeps its old version and the
//! rollout overrides it for the agents it changed; on completion the
//! assignment is pointed at the target version and the overrides end. Agents
//! that start matching the assignment during a rollout get the assignment's
//! (old) config until the rollout completes, then the target like everyone.

pub mod executor;
pub mod machine;
pub mod plan;
