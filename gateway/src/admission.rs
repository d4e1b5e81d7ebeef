//! Admission control: who may connect and how often agents may talk, so a
//! gateway sheds load with retry hints instead of queueing until it falls
//! over (a reconnect storm after a gateway restart or a network blip).
//!
//! | limit | scope | over the limit |
//! |---|---|---|
//! | `max_connections` | open WebSockets on this gateway | upgrade refused: HTTP 503 + `Retry-After` |
//! | `connections_per_second` | new WebSockets on this gateway | upgrade refused: 503 + `Retry-After` |
//! | `tenant_connections_per_second` | new WebSockets per tenant | upgrade refused: 503 + `Retry-After` |
//! | `messages_per_agent_per_minute` | messages of one agent | WebSocket: `Unavailable` + `RetryInfo`; HTTP: 429 + `Retry-After` |
//! | `max_pending_reports` | reports waiting for a coordinator's answer | new WebSockets and plain-HTTP polls refused: 503 + `Retry-After` |
//!
//! The last one is backpressure from behind the gateway: when coordinators
//! fall behind, answers take long and reports pile up here; refusing new
//! arrivals at once, with a retry hint, beats holding them until the bus times
//! out. Messages on open WebSockets are counted but not refused: their bursts
//! (every agent's status after a config push) are the control plane's own
//! doing and end by themselves.
//!
//! Every hint is jittered (`retry::spread`) and never shorter than the time
//! the limiter says the next attempt would pass, so a shed wave comes back
//! spread out. The limiters are generic over their clock so tests drive time.

use std::{
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use fleetplane_proto::{InstanceUid, TenantId, retry};
use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock, QuantaClock},
    middleware::NoOpMiddleware,
    state::{InMemoryState, NotKeyed, keyed::DashMapStateStore},
};

/// Limits, all per gateway process. Zero disables a limit.
#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    /// Most WebSocket connections held at once.
    pub max_connections: usize,
    /// New WebSocket connections per second (burst: one second's worth).
    pub connections_per_second: u32,
    /// New WebSocket connections per second per tenant.
    pub tenant_connections_per_second: u32,
    /// Messages per agent per minute (burst: a quarter minute's worth, at
    /// least 5), far above the 2 a minute of a 30 s heartbeat.
    pub messages_per_agent_per_minute: u32,
    /// Reports sent to coordinators and not answered yet; at this many, new
    /// WebSockets and plain-HTTP polls are refused until answers catch up.
    pub max_pending_reports: usize,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            connections_per_second: 5_000,
            tenant_connections_per_second: 5_000,
            messages_per_agent_per_minute: 120,
            max_pending_reports: 1_000,
        }
    }
}

/// Which limit refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `max_connections`.
    Connections,
    /// `connections_per_second`.
    ConnectionRate,
    /// `tenant_connections_per_second`.
    TenantConnectionRate,
    /// `messages_per_agent_per_minute`.
    AgentMessageRate,
    /// `max_pending_reports`.
    PendingReports,
}

impl Limit {
    /// Label for the admission metric.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Connections => "max_connections",
            Self::ConnectionRate => "connection_rate",
            Self::TenantConnectionRate => "tenant_connection_rate",
            Self::AgentMessageRate => "agent_message_rate",
            Self::PendingReports => "control_plane_busy",
        }
    }
}

/// A refusal and the (jittered) wait to tell the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub limit: Limit,
    pub retry_after: Duration,
}

type Direct<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;
type Keyed<K, C> = RateLimiter<K, DashMapStateStore<K>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// The gateway's limiters.
#[derive(Debug)]
pub struct Admission<C: Clock = DefaultClock> {
    config: AdmissionConfig,
    clock: C,
    /// Base of retry hints; jittered up to twice.
    retry_after: Duration,
    open: Arc<AtomicUsize>,
    pending: Arc<AtomicUsize>,
    connections: Option<Direct<C>>,
    tenants: Option<Keyed<TenantId, C>>,
    agents: Option<Keyed<InstanceUid, C>>,
}

fn per_second(n: u32) -> Option<Quota> {
    NonZeroU32::new(n).map(Quota::per_second)
}

fn per_minute(n: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(n)?;
    let burst = NonZeroU32::new((n / 4).max(5)).unwrap_or(rate);
    Some(Quota::per_minute(rate).allow_burst(burst))
}

impl Admission<QuantaClock> {
    /// Limiters on the real clock.
    pub fn new(config: AdmissionConfig, retry_after: Duration) -> Self {
        Self::with_clock(config, retry_after, QuantaClock::default())
    }
}

/// Held for as long as a connection is open; frees its slot when dropped.
#[derive(Debug)]
pub struct ConnectionPermit {
    open: Arc<AtomicUsize>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Held while a report waits for a coordinator's answer.
#[derive(Debug)]
pub struct ReportPermit {
    pending: Arc<AtomicUsize>,
}

impl Drop for ReportPermit {
    fn drop(&mut self) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<C: Clock + Clone> Admission<C> {
    /// Limiters on `clock` (tests use `FakeRelativeClock`).
    pub fn with_clock(config: AdmissionConfig, retry_after: Duration, clock: C) -> Self {
        Self {
            connections: per_second(config.connections_per_second)
                .map(|q| RateLimiter::direct_with_clock(q, clock.clone())),
            tenants: per_second(config.tenant_connections_per_second)
                .map(|q| RateLimiter::dashmap_with_clock(q, clock.clone())),
            agents: per_minute(config.messages_per_agent_per_minute)
                .map(|q| RateLimiter::dashmap_with_clock(q, clock.clone())),
            open: Arc::new(AtomicUsize::new(0)),
            pending: Arc::new(AtomicUsize::new(0)),
            retry_after,
            config,
            clock,
        }
    }

    fn refuse(&self, limit: Limit, not_before: Duration) -> Refused {
        // The same base for every limit. A shorter hint for pending reports
        // was tried: 76,000 agents arriving at once then retried every few
        // seconds, and their refused handshakes took the CPU the coordinator
        // needed to catch up (the fleet never settled).
        Refused {
            limit,
            retry_after: retry::spread(self.retry_after.max(not_before), 1.0),
        }
    }

    /// Admits a new WebSocket connection of `tenant`, or says which limit
    /// refused it and when to come back.
    pub fn admit_connection(&self, tenant: &TenantId) -> Result<ConnectionPermit, Refused> {
        let open = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        let permit = ConnectionPermit {
            open: self.open.clone(),
        };
        if self.config.max_connections > 0 && open > self.config.max_connections {
            return Err(self.refuse(Limit::Connections, Duration::ZERO));
        }
        // A new connection's first message goes to a coordinator.
        if self.coordinators_busy() {
            return Err(self.refuse(Limit::PendingReports, Duration::ZERO));
        }
        if let Some(limiter) = &self.connections
            && let Err(not_until) = limiter.check()
        {
            return Err(self.refuse(Limit::ConnectionRate, not_until.wait_time_from(self.clock.now())));
        }
        if let Some(limiter) = &self.tenants
            && let Err(not_until) = limiter.check_key(tenant)
        {
            return Err(self.refuse(Limit::TenantConnectionRate, not_until.wait_time_from(self.clock.now())));
        }
        Ok(permit)
    }

    /// Admits one message of an agent.
    pub fn admit_message(&self, uid: &InstanceUid) -> Result<(), Refused> {
        match &self.agents {
            Some(limiter) => limiter
                .check_key(uid)
                .map_err(|not_until| self.refuse(Limit::AgentMessageRate, not_until.wait_time_from(self.clock.now()))),
            None => Ok(()),
        }
    }

    fn coordinators_busy(&self) -> bool {
        self.config.max_pending_reports > 0 && self.pending.load(Ordering::Acquire) >= self.config.max_pending_reports
    }

    /// Counts a report of a connected WebSocket agent as pending until the
    /// permit drops (answer, error or timeout), without refusing it.
    pub fn track_report(&self) -> ReportPermit {
        self.pending.fetch_add(1, Ordering::AcqRel);
        ReportPermit {
            pending: self.pending.clone(),
        }
    }

    /// Admits a report that opens an exchange (a plain-HTTP poll) and counts
    /// it as pending until the permit drops; refused while coordinators are
    /// behind.
    pub fn admit_report(&self) -> Result<ReportPermit, Refused> {
        let pending = self.pending.fetch_add(1, Ordering::AcqRel) + 1;
        let permit = ReportPermit {
            pending: self.pending.clone(),
        };
        if self.config.max_pending_reports > 0 && pending > self.config.max_pending_reports {
            return Err(self.refuse(Limit::PendingReports, Duration::ZERO));
        }
        Ok(permit)
    }

    /// Open WebSocket connections.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Forgets per-agent and per-tenant state that has fully replenished, so
    /// the keyed limiters stay as small as the set of recently active keys.
    pub fn prune(&self) {
        if let Some(limiter) = &self.agents {
            limiter.retain_recent();
        }
        if let Some(limiter) = &self.tenants {
            limiter.retain_recent();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn admission(config: AdmissionConfig) -> (Admission<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (
            Admission::with_clock(config, Duration::from_secs(1), clock.clone()),
            clock,
        )
    }

    #[test]
    fn pending_reports_refuse_new_connections_and_polls_but_not_open_websockets() {
        let (a, _) = admission(AdmissionConfig {
            max_pending_reports: 2,
            ..Default::default()
        });
        let tenant = TenantId::default_tenant();
        let first = a.admit_report().unwrap();
        let _second = a.track_report(); // never refused
        let third = a.track_report();
        let refused = a.admit_report().unwrap_err();
        assert_eq!(refused.limit, Limit::PendingReports);
        assert!(refused.retry_after >= Duration::from_secs(1), "{refused:?}");
        assert_eq!(
            a.admit_connection(&tenant).unwrap_err().limit,
            Limit::PendingReports,
            "no new connections while coordinators are behind"
        );
        drop(first);
        drop(third);
        assert!(a.admit_report().is_ok(), "answers free slots");
        assert!(a.admit_connection(&tenant).is_ok());
    }

    #[test]
    fn the_connection_cap_holds_and_frees_on_drop() {
        let (a, _) = admission(AdmissionConfig {
            max_connections: 2,
            ..Default::default()
        });
        let tenant = TenantId::default_tenant();
        let first = a.admit_connection(&tenant).unwrap();
        let _second = a.admit_connection(&tenant).unwrap();
        let refused = a.admit_connection(&tenant).unwrap_err();
        assert_eq!(refused.limit, Limit::Connections);
        assert!(refused.retry_after >= Duration::from_secs(1) && refused.retry_after <= Duration::from_secs(2));
        assert_eq!(a.open_connections(), 2, "a refused connection holds no slot");
        drop(first);
        assert!(a.admit_connection(&tenant).is_ok());
    }

    #[test]
    fn the_connection_rate_sheds_the_excess_and_recovers() {
        let (a, clock) = admission(AdmissionConfig {
            connections_per_second: 10,
            tenant_connections_per_second: 0,
            ..Default::default()
        });
        let tenant = TenantId::default_tenant();
        let admitted = (0..25).filter(|_| a.admit_connection(&tenant).is_ok()).count();
        assert_eq!(admitted, 10, "one second's burst");
        assert_eq!(a.admit_connection(&tenant).unwrap_err().limit, Limit::ConnectionRate);
        clock.advance(Duration::from_secs(1));
        assert!(a.admit_connection(&tenant).is_ok());
    }

    #[test]
    fn tenants_are_limited_apart() {
        let (a, _) = admission(AdmissionConfig {
            connections_per_second: 0,
            tenant_connections_per_second: 2,
            ..Default::default()
        });
        let busy = TenantId::new("busy").unwrap();
        let quiet = TenantId::new("quiet").unwrap();
        let _held: Vec<_> = (0..2).map(|_| a.admit_connection(&busy).unwrap()).collect();
        assert_eq!(
            a.admit_connection(&busy).unwrap_err().limit,
            Limit::TenantConnectionRate
        );
        assert!(
            a.admit_connection(&quiet).is_ok(),
            "one tenant's storm does not shed another"
        );
    }

    #[test]
    fn chatty_agents_are_slowed_one_by_one_and_hints_cover_the_wait() {
        let (a, clock) = admission(AdmissionConfig {
            messages_per_agent_per_minute: 60,
            ..Default::default()
        });
        let chatty = InstanceUid::from_array([1; 16]);
        let calm = InstanceUid::from_array([2; 16]);
        let burst = (0..100).take_while(|_| a.admit_message(&chatty).is_ok()).count();
        assert_eq!(burst, 15, "a quarter minute's worth");
        let refused = a.admit_message(&chatty).unwrap_err();
        assert_eq!(refused.limit, Limit::AgentMessageRate);
        assert!(
            refused.retry_after >= Duration::from_secs(1),
            "never shorter than the limiter's wait"
        );
        assert!(a.admit_message(&calm).is_ok());
        clock.advance(Duration::from_secs(1));
        assert!(a.admit_message(&chatty).is_ok(), "one message a second refills");
        a.prune();
    }

    #[test]
    fn zero_disables_a_limit() {
        let (a, _) = admission(AdmissionConfig {
            max_connections: 0,
            connections_per_second: 0,
            tenant_connections_per_second: 0,
            messages_per_agent_per_minute: 0,
            max_pending_reports: 0,
        });
        let tenant = TenantId::default_tenant();
        let uid = InstanceUid::from_array([3; 16]);
        for _ in 0..1000 {
            std::mem::forget(a.admit_connection(&tenant).unwrap());
            std::mem::forget(a.admit_report().unwrap());
            a.admit_message(&uid).unwrap();
        }
    }
}
