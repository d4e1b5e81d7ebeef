//! The rollout state machine: `Rollout × (agent reports, time, command) →
//! Rollout + actions`. Pure: the executor loads, steps, writes with
//! compare-and-set, and only then acts, so a transition happens once even
//! when several coordinator replicas step the same rollout at once.
//!
//! ```text
//!                 ┌──────── pause ───────┐
//!                 ▼                      │
//!  PAUSED ─resume─▶ PROGRESSING ──stage done──▶ BAKING ──bake over──▶ PROGRESSING (next stage)
//!                     │   ▲                        │                      or COMPLETED (last stage)
//!                     │   └──────── resume ── PAUSED ◀─ pause ─┘
//!       threshold crossed / rollback                │ threshold crossed / rollback
//!                     ▼                             ▼
//!               ROLLING_BACK ──every changed agent reports its previous hash──▶ ROLLED_BACK
//!  abort (from any live state) ──▶ ABORTED
//! ```
//!
//! An agent counts as failed when it reports the target config FAILED (its
//! error text is kept), when it has not reported APPLIED within the apply
//! timeout, when its health turns unhealthy after the change, when it is
//! disconnected for longer than the grace period, or when the stage deadline
//! passes before it reported the new config. Health and connection keep being
//! checked for every changed agent while later stages run and during bakes.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
};

use fleetplane_proto::internal::{AgentPhase, Rollout, RolloutAgent, RolloutEvent, RolloutState};
use fleetplane_proto::opamp::RemoteConfigStatuses;

use super::plan::cumulative_sizes;

/// What the machine needs to know about one agent.
#[derive(Debug, Clone, Default)]
pub struct AgentView {
    /// Which rollout pins the agent's desired config, and to what.
    pub pinned_by: String,
    pub pinned_hash: Vec<u8>,
    pub pinned_key: String,
    pub connected: bool,
    pub last_seen_unix_ms: u64,
    /// `last_remote_config_hash` the agent reports: the hash of its whole
    /// config map.
    pub reported_hash: Vec<u8>,
    /// The config hash last offered to the agent: an agent that was offered
    /// the rollout's target and has not reported it yet still has it as its
    /// last instruction, so it is back only once offered its previous hash.
    pub offered_hash: Vec<u8>,
    /// What the last offer was made of: the base config's version hash and
    /// each layer's by key (empty for records from before they were kept).
    pub offered_base_hash: Vec<u8>,
    pub offered_layer_hashes: std::collections::BTreeMap<String, Vec<u8>>,
    /// Its `RemoteConfigStatuses` value.
    pub status: i32,
    pub error: String,
    pub healthy: Option<bool>,
    pub health_error: String,
}

impl AgentView {
    /// The version hash of the part `key` of the last offer (`""`: the base
    /// config); the whole map's hash for records that do not say.
    pub fn offered(&self, key: &str) -> &[u8] {
        let part = if key.is_empty() {
            Some(&self.offered_base_hash).filter(|h| !h.is_empty())
        } else {
            self.offered_layer_hashes.get(key)
        };
        part.unwrap_or(&self.offered_hash)
    }

    /// The version hash of the part `key` the agent reports running: known
    /// when it reports the whole map of the last offer, whose parts are
    /// kept; otherwise the map's hash, which matches no part (unless the
    /// agent gets no layers, when map and base config are one).
    pub fn reported(&self, key: &str) -> &[u8] {
        if !self.offered_hash.is_empty() && self.reported_hash == self.offered_hash {
            self.offered(key)
        } else {
            &self.reported_hash
        }
    }
}

/// What the executor must do after a transition is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// These agents' desired config changed: push to them.
    Push(Vec<Vec<u8>>),
    /// Point the assignment at the target version (the rollout completed).
    Promote,
}

/// Operator commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    Abort,
    Rollback,
}

/// A command that does not apply in the rollout's state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {command:?} a rollout that is {state}")]
pub struct InvalidCommand {
    pub command: Command,
    pub state: &'static str,
}

/// The state's name for people (`PROGRESSING`, ...).
pub fn state_name(state: i32) -> &'static str {
    match RolloutState::try_from(state).unwrap_or(RolloutState::Unspecified) {
        RolloutState::Unspecified => "UNSPECIFIED",
        RolloutState::Progressing => "PROGRESSING",
        RolloutState::Baking => "BAKING",
        RolloutState::Paused => "PAUSED",
        RolloutState::Completed => "COMPLETED",
        RolloutState::RollingBack => "ROLLING_BACK",
        RolloutState::RolledBack => "ROLLED_BACK",
        RolloutState::Aborted => "ABORTED",
    }
}

/// Whether the rollout still moves agents (and so blocks another rollout).
pub fn is_live(r: &Rollout) -> bool {
    matches!(
        r.state(),
        RolloutState::Progressing | RolloutState::Baking | RolloutState::Paused | RolloutState::RollingBack
    )
}

/// The config hash this rollout wants `agent` to run, if it overrides the
/// assignment for it.
pub fn override_for<'a>(r: &'a Rollout, agent: &'a RolloutAgent) -> Option<&'a [u8]> {
    match (r.state(), agent.phase()) {
        (RolloutState::Completed | RolloutState::Unspecified, _) => None,
        (_, AgentPhase::Changing | AgentPhase::Applied | AgentPhase::Failed) => Some(&r.target_hash),
        (_, AgentPhase::Reverting | AgentPhase::Reverted) if !agent.previous_hash.is_empty() => {
            Some(&agent.previous_hash)
        }
        _ => None,
    }
}

/// Records an event in the rollout (pure: the executor logs and publishes
/// it once the write that carries it has won).
fn event(r: &mut Rollout, now: u64, message: String) {
    r.events.push(RolloutEvent { unix_ms: now, message });
}

fn set_state(r: &mut Rollout, state: RolloutState) {
    r.state = state as i32;
}

/// Applies an operator command.
pub fn command(r: &mut Rollout, command: Command, now: u64) -> Result<Vec<Action>, InvalidCommand> {
    let invalid = || InvalidCommand {
        command,
        state: state_name(r.state),
    };
    let state = r.state();
    match command {
        Command::Pause if matches!(state, RolloutState::Progressing | RolloutState::Baking) => {
            r.paused_from = r.state;
            set_state(r, RolloutState::Paused);
            event(r, now, "paused by operator".into());
            Ok(Vec::new())
        }
        Command::Resume if state == RolloutState::Paused => {
            r.state = r.paused_from;
            // A pause does not eat the stage deadline or the bake.
            r.stage_started_unix_ms = now;
            if r.state() == RolloutState::Baking {
                r.bake_started_unix_ms = now;
            }
            event(r, now, "resumed by operator".into());
            Ok(Vec::new())
        }
        Command::Abort if is_live(r) => {
            set_state(r, RolloutState::Aborted);
            r.reason = "aborted by operator".into();
            event(
                r,
                now,
                "aborted by operator; changed agents keep the target config".into(),
            );
            Ok(Vec::new())
        }
        Command::Rollback if is_live(r) && state != RolloutState::RollingBack => {
            r.reason = "rollback requested by operator".into();
            Ok(start_rollback(r, now))
        }
        _ => Err(invalid()),
    }
}

fn start_rollback(r: &mut Rollout, now: u64) -> Vec<Action> {
    set_state(r, RolloutState::RollingBack);
    event(r, now, format!("rolling back: {}", r.reason));
    let mut pushed = Vec::new();
    for agent in &mut r.agents {
        if matches!(
            agent.phase(),
            AgentPhase::Changing | AgentPhase::Applied | AgentPhase::Failed
        ) {
            agent.changed_unix_ms = now;
            if agent.previous_hash.is_empty() {
                agent.set_phase(AgentPhase::Reverted);
                if agent.reason.is_empty() {
                    agent.reason = "had no remote config before the rollout; nothing to restore".into();
                }
            } else {
                agent.set_phase(AgentPhase::Reverting);
                pushed.push(agent.instance_uid.clone());
            }
        }
    }
    if pushed.is_empty() {
        Vec::new()
    } else {
        vec![Action::Push(pushed)]
    }
}

fn fail(agent: &mut RolloutAgent, reason: String) {
    agent.set_phase(AgentPhase::Failed);
    agent.reason = reason;
}

/// A digest of everything a step or command can change. Every transition
/// moves the state, the stage, a deadline, the event log, the reason or an
/// agent's phase, time or reason, so the executor writes a rollout only when
/// its digest moved, without keeping a whole copy to compare with. (A change
/// hidden by a collision is not lost: the next tick steps the stored
/// rollout again.)
pub fn progress(r: &Rollout) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    (
        r.state,
        r.stage,
        r.events.len(),
        &r.reason,
        r.stage_started_unix_ms,
        r.bake_started_unix_ms,
    )
        .hash(&mut h);
    for a in &r.agents {
        (a.phase, a.changed_unix_ms, &a.reason).hash(&mut h);
    }
    h.finish()
}

/// What [`check`] holds a changed agent to: the rollout's target and limits,
/// apart from the rollout so its agents can be changed while they are read.
struct Limits {
    target_hash: Vec<u8>,
    config_key: String,
    apply_timeout_ms: u64,
    disconnect_grace_ms: u64,
}

/// Health and liveness checks of one changed agent.
fn check(r: &Limits, agent: &mut RolloutAgent, view: Option<&AgentView>, now: u64) {
    if !matches!(agent.phase(), AgentPhase::Changing | AgentPhase::Applied) {
        return;
    }
    let Some(view) = view else {
        fail(agent, "agent no longer known to the server".into());
        return;
    };
    let on_target = view.reported(&r.config_key) == r.target_hash;
    let silent_for = now.saturating_sub(view.last_seen_unix_ms);
    match agent.phase() {
        AgentPhase::Changing => {
            if on_target && view.status == RemoteConfigStatuses::Applied as i32 {
                agent.set_phase(AgentPhase::Applied);
            } else if on_target && view.status == RemoteConfigStatuses::Failed as i32 {
                fail(agent, format!("agent reported FAILED: {}", view.error));
            } else if now.saturating_sub(agent.changed_unix_ms) > r.apply_timeout_ms {
                fail(
                    agent,
                    format!("did not report APPLIED within {} s", r.apply_timeout_ms / 1000),
                );
            } else if !view.connected && silent_for > r.disconnect_grace_ms {
                fail(
                    agent,
                    format!("disconnected for more than {} s", r.disconnect_grace_ms / 1000),
                );
            }
        }
        AgentPhase::Applied => {
            if on_target && view.status == RemoteConfigStatuses::Failed as i32 {
                fail(agent, format!("agent reported FAILED: {}", view.error));
            } else if view.healthy == Some(false) && view.last_seen_unix_ms >= agent.changed_unix_ms {
                fail(agent, format!("unhealthy after the change: {}", view.health_error));
            } else if !view.connected && silent_for > r.disconnect_grace_ms {
                fail(
                    agent,
                    format!("disconnected for more than {} s", r.disconnect_grace_ms / 1000),
                );
            }
        }
        _ => {}
    }
}

/// Allowed failures in stage `k` of `size` agents.
fn allowed(r: &Rollout, k: usize, size: usize) -> usize {
    let bp = if k == 0 {
        r.first_stage_max_failures_bp
    } else {
        r.later_stages_max_failures_bp
    };
    size * bp as usize / 10_000
}

/// Advances the rollout by what the agents reported and what time it is.
pub fn step(r: &mut Rollout, views: &HashMap<Vec<u8>, AgentView>, now: u64) -> Vec<Action> {
    match r.state() {
        RolloutState::Progressing | RolloutState::Baking => step_forward(r, views, now),
        RolloutState::RollingBack => step_back(r, views, now),
        _ => Vec::new(),
    }
}

fn step_forward(r: &mut Rollout, views: &HashMap<Vec<u8>, AgentView>, now: u64) -> Vec<Action> {
    let stage = r.stage as usize;
    let total = r.agents.len();
    let sizes = cumulative_sizes(&r.stages, total);

    // 1. What the changed agents reported; the stage deadline.
    let deadline_passed =
        r.state() == RolloutState::Progressing && now.saturating_sub(r.stage_started_unix_ms) > r.stage_deadline_ms;
    let limits = Limits {
        target_hash: r.target_hash.clone(),
        config_key: r.config_key.clone(),
        apply_timeout_ms: r.apply_timeout_ms,
        disconnect_grace_ms: r.disconnect_grace_ms,
    };
    for agent in &mut r.agents {
        if agent.stage as usize > stage {
            continue;
        }
        check(&limits, agent, views.get(&agent.instance_uid), now);
        if deadline_passed && agent.stage as usize == stage && agent.phase() == AgentPhase::Changing {
            fail(
                agent,
                format!(
                    "did not report the new config by the {} s stage deadline",
                    r.stage_deadline_ms / 1000
                ),
            );
        }
    }
    if deadline_passed {
        for agent in r
            .agents
            .iter_mut()
            .filter(|a| a.stage as usize == stage && a.phase() == AgentPhase::Pending)
        {
            fail(
                agent,
                format!("not changed before the {} s stage deadline", r.stage_deadline_ms / 1000),
            );
        }
    }

    // 2. Thresholds, for every stage run so far.
    for k in 0..=stage.min(sizes.len().saturating_sub(1)) {
        let size = r.agents.iter().filter(|a| a.stage as usize == k).count();
        let failed = r
            .agents
            .iter()
            .filter(|a| a.stage as usize == k && a.phase() == AgentPhase::Failed)
            .count();
        if failed > allowed(r, k, size) {
            r.reason = format!(
                "stage {} failed: {failed} of {size} agents failed, {} allowed",
                k + 1,
                allowed(r, k, size)
            );
            return start_rollback(r, now);
        }
    }

    if r.state() == RolloutState::Baking {
        if now.saturating_sub(r.bake_started_unix_ms) < r.bake_ms {
            return Vec::new();
        }
        if stage + 1 < r.stages.len() {
            r.stage += 1;
            r.stage_started_unix_ms = now;
            set_state(r, RolloutState::Progressing);
            let msg = format!("stage {} of {} started", r.stage + 1, r.stages.len());
            event(r, now, msg);
            // Launch right away rather than on the next tick.
            return step_forward(r, views, now);
        }
        set_state(r, RolloutState::Completed);
        event(r, now, format!("completed: {total} agents on the target config"));
        return vec![Action::Promote];
    }

    // 3. Launch pending agents of this stage, at most max_in_flight at once.
    let in_flight = r.agents.iter().filter(|a| a.phase() == AgentPhase::Changing).count();
    let mut slots = if r.max_in_flight == 0 {
        usize::MAX
    } else {
        (r.max_in_flight as usize).saturating_sub(in_flight)
    };
    let mut pushed = Vec::new();
    for agent in &mut r.agents {
        if slots == 0 {
            break;
        }
        if agent.stage as usize == stage && agent.phase() == AgentPhase::Pending {
            agent.set_phase(AgentPhase::Changing);
            agent.changed_unix_ms = now;
            pushed.push(agent.instance_uid.clone());
            slots -= 1;
        }
    }

    // 4. Stage done when nobody in it is pending or changing.
    let open = r
        .agents
        .iter()
        .any(|a| a.stage as usize == stage && matches!(a.phase(), AgentPhase::Pending | AgentPhase::Changing));
    if !open {
        let applied = r
            .agents
            .iter()
            .filter(|a| a.stage as usize == stage && a.phase() == AgentPhase::Applied)
            .count();
        let failed = r
            .agents
            .iter()
            .filter(|a| a.stage as usize == stage && a.phase() == AgentPhase::Failed)
            .count();
        set_state(r, RolloutState::Baking);
        r.bake_started_unix_ms = now;
        event(
            r,
            now,
            format!(
                "stage {} of {} done: {applied} applied, {failed} failed; baking",
                stage + 1,
                r.stages.len()
            ),
        );
    }
    if pushed.is_empty() {
        Vec::new()
    } else {
        vec![Action::Push(pushed)]
    }
}

fn step_back(r: &mut Rollout, views: &HashMap<Vec<u8>, AgentView>, now: u64) -> Vec<Action> {
    for agent in &mut r.agents {
        if agent.phase() != AgentPhase::Reverting {
            continue;
        }
        // Back only when the previous config was offered again and the agent
        // reports it: a silent agent still holding the target as its last
        // instruction is not back, whatever it reported before.
        let key = &r.config_key;
        let back = views.get(&agent.instance_uid).is_some_and(|v| {
            v.reported(key) == agent.previous_hash
                && (v.offered_hash.is_empty() || v.offered(key) == agent.previous_hash)
                && v.status != RemoteConfigStatuses::Failed as i32
        });
        if back {
            agent.set_phase(AgentPhase::Reverted);
        } else if now.saturating_sub(agent.changed_unix_ms) > r.apply_timeout_ms {
            agent.set_phase(AgentPhase::Reverted);
            agent.reason = format!(
                "{}did not confirm its previous config within {} s",
                if agent.reason.is_empty() {
                    String::new()
                } else {
                    format!("{}; ", agent.reason)
                },
                r.apply_timeout_ms / 1000
            );
        }
    }
    if r.agents.iter().all(|a| a.phase() != AgentPhase::Reverting) {
        set_state(r, RolloutState::RolledBack);
        let reverted = r.agents.iter().filter(|a| a.phase() == AgentPhase::Reverted).count();
        event(
            r,
            now,
            format!("rolled back: {reverted} agents returned to their previous config"),
        );
    }
    Vec::new()
}

#[cfg(test)]
mod tests;
