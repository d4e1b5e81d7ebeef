//! Who goes in which stage: pure, deterministic, and documented.
//!
//! Order: agents are sorted by the SHA-256 of their instance uid, so the order
//! is stable (a re-run of the same rollout picks the same canaries) yet
//! unrelated to when agents connected or how their uids were generated.
//! Named canaries come first, in the order given. With `spread_by`, agents are
//! grouped by the value of that attribute and the groups are interleaved
//! round-robin (groups in value order), so every stage samples every value,
//! for example every region, instead of taking one region whole.
//!
//! Stages are cumulative: a stage of 10% means "10% of the target set have
//! been changed once this stage is done". Sizes round up, so a 1% first stage
//! of any non-empty fleet holds at least one agent.

use std::collections::BTreeMap;

use fleetplane_proto::internal::RolloutStage;
use sha2::{Digest, Sha256};

/// An agent to plan, with the attribute value used for spreading.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub uid: Vec<u8>,
    pub spread_value: String,
}

/// Cumulative number of agents done after each stage.
pub fn cumulative_sizes(stages: &[RolloutStage], total: usize) -> Vec<usize> {
    stages
        .iter()
        .map(|s| {
            let n = if s.percent > 0 {
                (total * s.percent.min(100) as usize).div_ceil(100)
            } else {
                s.count as usize
            };
            n.min(total)
        })
        .scan(0, |done, n| {
            *done = (*done).max(n);
            Some(*done)
        })
        .collect()
}

fn order_key(uid: &[u8]) -> [u8; 32] {
    Sha256::digest(uid).into()
}

/// Orders the target set and assigns each agent its stage index.
pub fn plan(candidates: Vec<Candidate>, canaries: &[Vec<u8>], stages: &[RolloutStage]) -> Vec<(Vec<u8>, u32)> {
    let mut ordered: Vec<Vec<u8>> = Vec::new();
    for canary in canaries {
        if candidates.iter().any(|a| &a.uid == canary) && !ordered.contains(canary) {
            ordered.push(canary.clone());
        }
    }
    let mut groups: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for candidate in candidates {
        if !ordered.contains(&candidate.uid) {
            groups.entry(candidate.spread_value).or_default().push(candidate.uid);
        }
    }
    for members in groups.values_mut() {
        members.sort_by_key(|uid| order_key(uid));
    }
    let mut groups: Vec<std::collections::VecDeque<Vec<u8>>> = groups.into_values().map(Into::into).collect();
    while groups.iter().any(|g| !g.is_empty()) {
        for group in &mut groups {
            if let Some(uid) = group.pop_front() {
                ordered.push(uid);
            }
        }
    }
    let sizes = cumulative_sizes(stages, ordered.len());
    ordered
        .into_iter()
        .enumerate()
        .map(|(i, uid)| {
            let stage = sizes
                .iter()
                .position(|done| i < *done)
                .unwrap_or(sizes.len().saturating_sub(1));
            (uid, stage as u32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pct(p: u32) -> RolloutStage {
        RolloutStage { percent: p, count: 0 }
    }

    fn candidates(n: u8, spread: impl Fn(u8) -> String) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate {
                uid: vec![i; 16],
                spread_value: spread(i),
            })
            .collect()
    }

    #[test]
    fn default_stages_round_up() {
        let stages = [pct(1), pct(10), pct(50), pct(100)];
        assert_eq!(cumulative_sizes(&stages, 300), vec![3, 30, 150, 300]);
        assert_eq!(cumulative_sizes(&stages, 5), vec![1, 1, 3, 5]);
        assert_eq!(cumulative_sizes(&stages, 0), vec![0, 0, 0, 0]);
        let counts = [RolloutStage { percent: 0, count: 2 }, pct(100)];
        assert_eq!(cumulative_sizes(&counts, 10), vec![2, 10]);
    }

    #[test]
    fn order_is_stable_and_canaries_come_first() {
        let stages = [pct(10), pct(100)];
        let canary = vec![7u8; 16];
        let a = plan(
            candidates(50, |_| String::new()),
            std::slice::from_ref(&canary),
            &stages,
        );
        let mut shuffled = candidates(50, |_| String::new());
        shuffled.reverse();
        let b = plan(shuffled, std::slice::from_ref(&canary), &stages);
        assert_eq!(a, b, "same input set, same plan");
        assert_eq!(a[0], (canary, 0));
        assert_eq!(a.iter().filter(|(_, s)| *s == 0).count(), 5);
        assert_eq!(a.len(), 50);
    }

    #[test]
    fn spread_by_samples_every_value_in_each_stage() {
        let stages = [pct(10), pct(100)];
        let regions = ["eu", "us", "ap"];
        let all = candidates(60, |i| regions[i as usize % 3].to_owned());
        let region_of = |uid: &Vec<u8>| regions[uid[0] as usize % 3];
        let planned = plan(all, &[], &stages);
        let first: Vec<&str> = planned
            .iter()
            .filter(|(_, s)| *s == 0)
            .map(|(u, _)| region_of(u))
            .collect();
        assert_eq!(first.len(), 6);
        for region in regions {
            assert_eq!(first.iter().filter(|r| **r == region).count(), 2, "{first:?}");
        }
    }

    #[test]
    fn unknown_canaries_are_ignored() {
        let planned = plan(
            candidates(3, |_| String::new()),
            &[vec![99; 16], vec![1; 16], vec![1; 16]],
            &[pct(100)],
        );
        assert_eq!(planned.len(), 3, "unknown canaries ignored, repeated ones once");
    }
}
