//! Jittered waits: the one place that decides how long anything waits before
//! trying again, so that a crowd of agents (or gateways) told to retry never
//! comes back at the same instant.

use std::time::Duration;

use rand::Rng;

/// A wait of `base` plus a random extra of up to `spread` of it: what the
/// server hands out in Retry-After and RetryInfo, so that a wave of shed
/// clients spreads over `[base, base * (1 + spread)]`.
///
/// ```
/// # use std::time::Duration;
/// # use fleetplane_proto::retry::spread;
/// let wait = spread(Duration::from_secs(10), 0.5);
/// assert!(wait >= Duration::from_secs(10) && wait <= Duration::from_secs(15));
/// ```
pub fn spread(base: Duration, spread: f64) -> Duration {
    let extra = base.mul_f64(spread.clamp(0.0, 10.0) * rand::rng().random::<f64>());
    base + extra
}

/// A uniformly random wait in `[0, max)`: how a draining gateway spreads its
/// connection closes, so a rolling restart does not cause a reconnect storm.
pub fn uniform(max: Duration) -> Duration {
    max.mul_f64(rand::rng().random::<f64>())
}

/// Exponential backoff with full jitter (AWS's "full jitter"): attempt `n`
/// waits a uniform random time in `[0, min(cap, initial * 2^n)]`. Used by the
/// clients we ship (the simulated agents) for reconnects, as the spec asks.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `initial`, never waiting longer than `cap`.
    pub fn new(initial: Duration, cap: Duration) -> Self {
        Self {
            initial,
            cap: cap.max(initial),
            attempt: 0,
        }
    }

    /// The next wait; at least `floor` (a server's Retry-After wins when longer).
    pub fn next_wait(&mut self, floor: Duration) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(rand::rng().random::<f64>()).max(floor)
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_stays_in_range_and_varies() {
        let base = Duration::from_secs(30);
        let waits: Vec<Duration> = (0..200).map(|_| spread(base, 1.0)).collect();
        assert!(waits.iter().all(|w| *w >= base && *w <= base * 2));
        let distinct: std::collections::HashSet<_> = waits.iter().collect();
        assert!(distinct.len() > 100, "jitter must spread the waits");
    }

    #[test]
    fn backoff_grows_to_the_cap_and_honours_the_floor() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for _ in 0..50 {
            assert!(b.next_wait(Duration::ZERO) <= Duration::from_secs(2));
        }
        assert_eq!(b.next_wait(Duration::from_secs(5)), Duration::from_secs(5));
        b.reset();
        assert!(b.next_wait(Duration::ZERO) <= Duration::from_millis(100));
    }
}
