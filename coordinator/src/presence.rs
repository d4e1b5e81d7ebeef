//! Which gateways are alive, from their presence beats.
//!
//! A gateway that dies without a goodbye (SIGKILL, lost node) leaves its
//! WebSocket agents marked connected. Every coordinator replica hears every
//! gateway's beat; a gateway silent for longer than `dead_after` is declared
//! dead, and its agents count as disconnected until they reconnect elsewhere.
//! Agents of gateways never heard from at all (they died while no coordinator
//! ran) are caught by one orphan check after the first `dead_after` of a
//! coordinator's life.

use std::{collections::HashMap, time::Duration};

use fleetplane_bus::GatewayPresence;
use fleetplane_proto::GatewayId;
use tokio::time::Instant;

/// What a presence check found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Gateways that just went silent or said goodbye.
    pub dead: Vec<GatewayId>,
    /// True once, when the warm-up ended: agents on gateways that are not
    /// alive now are orphans.
    pub check_orphans: bool,
}

/// Liveness of gateways as seen by one coordinator.
#[derive(Debug)]
pub struct Presence {
    dead_after: Duration,
    started: Instant,
    warmed_up: bool,
    alive: HashMap<GatewayId, Instant>,
    leaving: Vec<GatewayId>,
}

impl Presence {
    /// A tracker declaring gateways dead after `dead_after` of silence.
    pub fn new(dead_after: Duration, now: Instant) -> Self {
        Self {
            dead_after,
            started: now,
            warmed_up: false,
            alive: HashMap::new(),
            leaving: Vec::new(),
        }
    }

    /// Records a beat.
    pub fn beat(&mut self, beat: &GatewayPresence, now: Instant) {
        if beat.leaving {
            self.alive.remove(&beat.gateway);
            self.leaving.push(beat.gateway.clone());
        } else {
            self.alive.insert(beat.gateway.clone(), now);
        }
    }

    /// Whether a gateway is alive now.
    pub fn is_alive(&self, gateway: &str) -> bool {
        self.alive.contains_key(gateway)
    }

    /// Whether a gateway beat within `within` before `now`: stricter than
    /// [`Presence::is_alive`], for deciding at once whether a connection
    /// it holds may still be live.
    pub fn heard_within(&self, gateway: &str, within: Duration, now: Instant) -> bool {
        self.alive
            .get(gateway)
            .is_some_and(|last| now.saturating_duration_since(*last) <= within)
    }

    /// Declares silent gateways dead.
    pub fn check(&mut self, now: Instant) -> Verdict {
        let dead_after = self.dead_after;
        let mut dead: Vec<GatewayId> = std::mem::take(&mut self.leaving);
        self.alive.retain(|gateway, last| {
            let alive = now.duration_since(*last) <= dead_after;
            if !alive {
                dead.push(gateway.clone());
            }
            alive
        });
        let check_orphans = !self.warmed_up && now.duration_since(self.started) > dead_after;
        self.warmed_up |= check_orphans;
        Verdict { dead, check_orphans }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(id: &str, leaving: bool) -> GatewayPresence {
        GatewayPresence {
            gateway: GatewayId::new(id).unwrap(),
            agents: 0,
            sent_unix_ms: 0,
            leaving,
        }
    }

    #[test]
    fn silence_beyond_the_limit_is_death() {
        let t0 = Instant::now();
        let mut p = Presence::new(Duration::from_secs(3), t0);
        p.beat(&beat("a", false), t0);
        p.beat(&beat("b", false), t0);
        p.beat(&beat("b", false), t0 + Duration::from_secs(3));
        let v = p.check(t0 + Duration::from_secs(4));
        assert_eq!(v.dead, vec![GatewayId::new("a").unwrap()]);
        assert!(v.check_orphans, "warm-up over");
        assert!(p.is_alive("b") && !p.is_alive("a"));
        // Orphans are checked once, dead gateways reported once.
        assert_eq!(p.check(t0 + Duration::from_secs(5)), Verdict::default());
    }

    #[test]
    fn goodbye_is_immediate() {
        let t0 = Instant::now();
        let mut p = Presence::new(Duration::from_secs(3), t0);
        p.beat(&beat("a", false), t0);
        p.beat(&beat("a", true), t0);
        assert_eq!(p.check(t0).dead, vec![GatewayId::new("a").unwrap()]);
        assert!(!p.check(t0).check_orphans, "still warming up");
    }
}
