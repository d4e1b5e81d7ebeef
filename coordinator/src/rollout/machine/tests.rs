use super::*;
use fleetplane_proto::internal::RolloutStage;

const TARGET: u8 = 9;
const OLD: u8 = 1;

fn rollout(n: u8, stages: &[u32]) -> Rollout {
    let stages: Vec<RolloutStage> = stages.iter().map(|p| RolloutStage { percent: *p, count: 0 }).collect();
    let sizes = cumulative_sizes(&stages, n as usize);
    Rollout {
        id: "r1".into(),
        target_hash: vec![TARGET; 32],
        agents: (0..n)
            .map(|i| RolloutAgent {
                instance_uid: vec![i; 16],
                stage: sizes.iter().position(|d| (i as usize) < *d).unwrap() as u32,
                previous_hash: vec![OLD; 32],
                ..Default::default()
            })
            .collect(),
        stages,
        bake_ms: 1000,
        stage_deadline_ms: 60_000,
        apply_timeout_ms: 30_000,
        disconnect_grace_ms: 10_000,
        first_stage_max_failures_bp: 0,
        later_stages_max_failures_bp: 200,
        state: RolloutState::Progressing as i32,
        ..Default::default()
    }
}

fn view(hash: u8, status: RemoteConfigStatuses, now: u64) -> AgentView {
    AgentView {
        connected: true,
        last_seen_unix_ms: now,
        reported_hash: vec![hash; 32],
        status: status as i32,
        healthy: Some(true),
        ..Default::default()
    }
}

/// Every agent the rollout pushed to applies the target.
fn all_apply(r: &Rollout, now: u64) -> HashMap<Vec<u8>, AgentView> {
    r.agents
        .iter()
        .map(|a| {
            let hash = if a.phase() == AgentPhase::Pending { OLD } else { TARGET };
            (a.instance_uid.clone(), view(hash, RemoteConfigStatuses::Applied, now))
        })
        .collect()
}

fn pushed(actions: &[Action]) -> usize {
    actions
        .iter()
        .map(|a| if let Action::Push(v) = a { v.len() } else { 0 })
        .sum()
}

#[test]
fn a_healthy_rollout_runs_stage_by_stage_and_completes() {
    let mut r = rollout(100, &[1, 10, 50, 100]);
    let mut now = 0;
    let mut stage_pushes = Vec::new();
    let mut done = false;
    for _ in 0..40 {
        let views = all_apply(&r, now);
        let actions = step(&mut r, &views, now);
        if pushed(&actions) > 0 {
            stage_pushes.push(pushed(&actions));
        }
        if actions.contains(&Action::Promote) {
            done = true;
            break;
        }
        now += 600;
    }
    assert!(done, "{:?}", r.events);
    assert_eq!(r.state(), RolloutState::Completed);
    assert_eq!(stage_pushes, vec![1, 9, 40, 50]);
    assert!(r.agents.iter().all(|a| a.phase() == AgentPhase::Applied));
}

#[test]
fn max_in_flight_limits_concurrent_changes() {
    let mut r = rollout(10, &[100]);
    r.max_in_flight = 3;
    let views: HashMap<_, _> = r
        .agents
        .iter()
        .map(|a| (a.instance_uid.clone(), view(OLD, RemoteConfigStatuses::Applied, 0)))
        .collect();
    assert_eq!(pushed(&step(&mut r, &views, 0)), 3);
    assert_eq!(pushed(&step(&mut r, &views, 1)), 0, "nobody finished, no new slot");
    let views = all_apply(&r, 2);
    assert_eq!(pushed(&step(&mut r, &views, 2)), 3);
}

#[test]
fn any_failure_in_the_first_stage_rolls_back_with_the_agents_reason() {
    let mut r = rollout(100, &[1, 100]);
    step(&mut r, &HashMap::new(), 0);
    let canary = r
        .agents
        .iter()
        .find(|a| a.phase() == AgentPhase::Changing)
        .unwrap()
        .instance_uid
        .clone();
    let mut views = HashMap::new();
    let mut v = view(TARGET, RemoteConfigStatuses::Failed, 10);
    v.error = "bad exporter".into();
    views.insert(canary.clone(), v);
    let actions = step(&mut r, &views, 10);
    assert_eq!(r.state(), RolloutState::RollingBack);
    assert_eq!(actions, vec![Action::Push(vec![canary.clone()])]);
    assert!(r.reason.contains("stage 1 failed"), "{}", r.reason);
    let agent = r.agents.iter().find(|a| a.instance_uid == canary).unwrap();
    assert_eq!(agent.phase(), AgentPhase::Reverting);
    assert_eq!(agent.reason, "agent reported FAILED: bad exporter");
    assert_eq!(override_for(&r, agent), Some(&[OLD; 32][..]));

    // Back on its previous hash: rolled back.
    views.insert(canary, view(OLD, RemoteConfigStatuses::Applied, 20));
    step(&mut r, &views, 20);
    assert_eq!(r.state(), RolloutState::RolledBack);
}

#[test]
fn later_stages_tolerate_two_percent() {
    let mut r = rollout(200, &[1, 100]);
    let mut now = 0;
    // Stage 1 passes.
    for _ in 0..3 {
        let views = all_apply(&r, now);
        step(&mut r, &views, now);
        now += 1100;
    }
    assert_eq!(r.stage, 1);
    // Stage 2: 199 agents, 3 may fail (2%), the fourth fails the stage.
    let failing: Vec<Vec<u8>> = r
        .agents
        .iter()
        .filter(|a| a.stage == 1)
        .take(4)
        .map(|a| a.instance_uid.clone())
        .collect();
    let mut views = all_apply(&r, now);
    for uid in &failing[..3] {
        views.insert(uid.clone(), view(TARGET, RemoteConfigStatuses::Failed, now));
    }
    step(&mut r, &views, now);
    assert_ne!(r.state(), RolloutState::RollingBack);
    views.insert(failing[3].clone(), view(TARGET, RemoteConfigStatuses::Failed, now));
    step(&mut r, &views, now + 1);
    assert_eq!(r.state(), RolloutState::RollingBack);
}

#[test]
fn a_silent_agent_fails_after_the_grace_period() {
    let mut r = rollout(10, &[100]);
    r.bake_ms = 60_000;
    step(&mut r, &HashMap::new(), 0);
    let mut views = all_apply(&r, 0);
    step(&mut r, &views, 0);
    let silent = r.agents[0].instance_uid.clone();
    views.get_mut(&silent).unwrap().connected = false;
    step(&mut r, &views, 5_000);
    assert_eq!(r.state(), RolloutState::Baking, "within grace");
    step(&mut r, &views, 10_001);
    assert_eq!(r.state(), RolloutState::RollingBack);
    assert!(r.agents[0].reason.starts_with("disconnected for more than"));
}

#[test]
fn unhealthy_after_the_change_fails_during_bake() {
    let mut r = rollout(10, &[100]);
    step(&mut r, &HashMap::new(), 0);
    let mut views = all_apply(&r, 5);
    step(&mut r, &views, 5);
    assert_eq!(r.state(), RolloutState::Baking);
    let sick = views.get_mut(&r.agents[3].instance_uid).unwrap();
    sick.healthy = Some(false);
    sick.health_error = "exporter queue full".into();
    step(&mut r, &views, 500);
    assert_eq!(r.state(), RolloutState::RollingBack);
    assert_eq!(r.agents[3].reason, "unhealthy after the change: exporter queue full");
}

#[test]
fn the_stage_deadline_fails_agents_that_never_reported() {
    let mut r = rollout(10, &[100]);
    r.first_stage_max_failures_bp = 10_000;
    step(&mut r, &HashMap::new(), 0);
    let views: HashMap<_, _> = r
        .agents
        .iter()
        .map(|a| (a.instance_uid.clone(), view(OLD, RemoteConfigStatuses::Applied, 0)))
        .collect();
    step(&mut r, &views, 60_001);
    assert!(r.agents.iter().all(|a| a.phase() == AgentPhase::Failed));
    assert!(r.agents[0].reason.contains("stage deadline") || r.agents[0].reason.contains("APPLIED within"));
}

#[test]
fn operator_commands_follow_the_state() {
    let mut r = rollout(10, &[100]);
    assert!(command(&mut r, Command::Resume, 0).is_err());
    command(&mut r, Command::Pause, 0).unwrap();
    assert_eq!(r.state(), RolloutState::Paused);
    assert!(
        step(&mut r, &HashMap::new(), 1).is_empty(),
        "paused rollouts do nothing"
    );
    command(&mut r, Command::Resume, 2).unwrap();
    assert_eq!(r.state(), RolloutState::Progressing);
    step(&mut r, &HashMap::new(), 3);
    let actions = command(&mut r, Command::Rollback, 4).unwrap();
    assert_eq!(pushed(&actions), 10);
    assert!(command(&mut r, Command::Rollback, 5).is_err());
    command(&mut r, Command::Abort, 6).unwrap();
    assert_eq!(r.state(), RolloutState::Aborted);
    assert!(command(&mut r, Command::Abort, 7).is_err());
}

#[test]
fn a_silent_canary_is_reverted_only_once_offered_and_reporting_its_previous_config() {
    let mut r = rollout(10, &[10, 100]);
    step(&mut r, &HashMap::new(), 0);
    let canary = r
        .agents
        .iter()
        .find(|a| a.phase() == AgentPhase::Changing)
        .unwrap()
        .instance_uid
        .clone();
    // Offered the target, silent since: it still reports the old hash.
    let mut silent = view(OLD, RemoteConfigStatuses::Applied, 0);
    silent.offered_hash = vec![TARGET; 32];
    let mut views = HashMap::from([(canary.clone(), silent.clone())]);
    command(&mut r, Command::Rollback, 5).unwrap();
    step(&mut r, &views, 10);
    let agent = r.agents.iter().find(|a| a.instance_uid == canary).unwrap();
    assert_eq!(
        agent.phase(),
        AgentPhase::Reverting,
        "its last instruction is still the target: not back yet"
    );
    assert_eq!(r.state(), RolloutState::RollingBack);
    // Offered its previous config again (the rollback's push), and reporting it.
    silent.offered_hash = vec![OLD; 32];
    views.insert(canary.clone(), silent);
    step(&mut r, &views, 20);
    assert_eq!(r.state(), RolloutState::RolledBack);
}

/// The executor writes a rollout only when its digest moved: every step that
/// changed the rollout must move it, and a step that changed nothing must not.
#[test]
fn progress_moves_exactly_when_a_step_changes_the_rollout() {
    let mut r = rollout(50, &[10, 50, 100]);
    let mut now = 0;
    let (mut moved, mut still) = (0, 0);
    for i in 0..60 {
        // Every third tick comes a millisecond after the one before, with
        // the same reports: nothing moves then.
        let views = all_apply(&r, now);
        let (before, copy) = (progress(&r), r.clone());
        step(&mut r, &views, now);
        assert_eq!(
            progress(&r) != before,
            r != copy,
            "tick {i}: the digest and the rollout disagree about a change"
        );
        moved += usize::from(r != copy);
        still += usize::from(r == copy);
        if r.state() == RolloutState::Completed {
            break;
        }
        now += if i % 3 == 2 { 1 } else { 600 };
    }
    assert_eq!(r.state(), RolloutState::Completed, "{:?}", r.events);
    assert!(moved >= 6, "launches, stage ends and bakes each moved it: {moved}");
    assert!(still > 0, "some ticks changed nothing");
    // A failure, then the rollback, move it too.
    let mut failing = rollout(10, &[100]);
    step(&mut failing, &HashMap::new(), 0);
    let before = progress(&failing);
    let mut views = all_apply(&failing, 1);
    views.insert(vec![0; 16], view(TARGET, RemoteConfigStatuses::Failed, 1));
    step(&mut failing, &views, 1);
    assert_eq!(failing.state(), RolloutState::RollingBack);
    assert_ne!(progress(&failing), before);
}
