//! The tenant's event stream: agents connecting and leaving, config status
//! changes, rollout transitions, audit entries.
//!
//! Events are written to the store's capped per-tenant log (so every
//! coordinator replica serves the same stream, and a reader resumes from the
//! last id it saw), by one writer task that batches them. Publishing never
//! waits: the report path hands an event over or, when the writer is behind,
//! drops it and counts it. Events tell operators what happened; they are not
//! the state (the agent records are), so losing one under overload costs a
//! line in a feed, never a decision.
//!
//! Events an agent causes (`agent.*`) are rate limited per agent: the log is
//! capped, so one agent flapping its connection or sending custom messages or
//! certificate requests in a loop must not push every other event out of it.
//! Past [`AGENT_BURST`] events, an agent gets one more a
//! [`AGENT_REFILL`]; the first one dropped is replaced by an
//! `agent.events_throttled` event saying so.
//!
//! Readers ([`stream`]) pull pages from the log, woken by this replica's
//! writes and, for other replicas' writes, by a short poll. A reader that
//! falls so far behind that its position is trimmed from the log is told
//! (`event: lagged`) and dropped: nothing is ever buffered for it beyond one
//! page.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use fleetplane_proto::{TenantId, internal::FleetEvent};
use tokio::sync::{mpsc, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{store::Store, worker::now_unix_ms};

/// Events waiting for the writer; past this they are dropped and counted.
const QUEUE: usize = 8192;
/// Most events in one store write.
const BATCH: usize = 512;
/// Events one reader pulls per page.
pub const PAGE: usize = 256;
/// How often a reader with nothing new looks again (other replicas' events).
pub const POLL: Duration = Duration::from_millis(500);
/// Events one agent may cause at once.
pub const AGENT_BURST: u32 = 30;
/// Then one more per this long.
pub const AGENT_REFILL: Duration = Duration::from_secs(2);
/// Agents whose budgets are tracked; past this, the full ones are forgotten.
const BUDGETS_MAX: usize = 100_000;

/// One agent's event budget.
#[derive(Debug, Clone, Copy)]
struct Budget {
    tokens: u32,
    /// When the last token was added (or the budget created).
    refilled: tokio::time::Instant,
    /// Its events are being dropped (the throttle event was published).
    throttled: bool,
}

impl Budget {
    /// Takes a token if there is one, after adding those earned since the
    /// last refill.
    fn take(&mut self, now: tokio::time::Instant) -> bool {
        let earned = now.saturating_duration_since(self.refilled).as_millis() / AGENT_REFILL.as_millis().max(1);
        if earned > 0 {
            self.tokens = self
                .tokens
                .saturating_add(u32::try_from(earned).unwrap_or(u32::MAX))
                .min(AGENT_BURST);
            self.refilled += AGENT_REFILL * u32::try_from(earned).unwrap_or(u32::MAX);
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// Where events are published.
#[derive(Debug)]
pub struct Events {
    tx: mpsc::Sender<(TenantId, FleetEvent)>,
    written: watch::Sender<u64>,
    dropped: AtomicU64,
    retain: usize,
    budgets: std::sync::Mutex<std::collections::HashMap<(TenantId, String), Budget>>,
}

impl Events {
    /// Starts the writer; events are kept per tenant, about `retain` of them.
    pub(crate) fn start(
        store: Arc<dyn Store>,
        retain: usize,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let (tx, mut rx) = mpsc::channel::<(TenantId, FleetEvent)>(QUEUE);
        let events = Arc::new(Self {
            tx,
            written: watch::Sender::new(0),
            dropped: AtomicU64::new(0),
            retain: retain.max(1),
            budgets: Default::default(),
        });
        let writer = events.clone();
        tracker.spawn(async move {
            loop {
                let first = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    first = rx.recv() => first,
                };
                let Some(first) = first else { return };
                let mut by_tenant: BTreeMap<TenantId, Vec<FleetEvent>> = BTreeMap::new();
                by_tenant.entry(first.0).or_default().push(first.1);
                let mut count = 1;
                while count < BATCH {
                    let Ok((tenant, event)) = rx.try_recv() else { break };
                    by_tenant.entry(tenant).or_default().push(event);
                    count += 1;
                }
                for (tenant, batch) in by_tenant {
                    let lost = batch.len();
                    if let Err(e) = store.append_events(&tenant, batch, writer.retain).await {
                        writer.dropped.fetch_add(lost as u64, Ordering::Relaxed);
                        tracing::warn!(%tenant, lost, error = %e, "events not written");
                    }
                }
                writer.written.send_modify(|n| *n = n.wrapping_add(1));
            }
        });
        events
    }

    /// Publishes an event; never waits (dropped and counted when the writer
    /// is behind).
    pub fn publish(&self, tenant: &TenantId, kind: &str, subject: &str, message: String, fields: &[(&str, &str)]) {
        if kind.starts_with("agent.") {
            match self.agent_budget(tenant, subject) {
                Allowed::Yes => {}
                Allowed::No => return,
                Allowed::LastBeforeThrottle => {
                    self.send(
                        tenant,
                        "agent.events_throttled",
                        subject,
                        format!(
                            "more than {AGENT_BURST} events at once from this agent; its events are dropped \
                             until it slows to one per {} s",
                            AGENT_REFILL.as_secs()
                        ),
                        &[],
                    );
                    return;
                }
            }
        }
        self.send(tenant, kind, subject, message, fields);
    }

    /// Whether agent `subject` may cause one more event now.
    fn agent_budget(&self, tenant: &TenantId, subject: &str) -> Allowed {
        let now = tokio::time::Instant::now();
        let mut budgets = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        if budgets.len() >= BUDGETS_MAX {
            // Full budgets are the same as none. If most are not full (a
            // rollout touching every agent), all are forgotten: pruning must
            // not run again on the next event (amortised, not per event).
            budgets.retain(|_, b| {
                let mut probe = *b;
                probe.take(now);
                probe.tokens + 1 < AGENT_BURST
            });
            if budgets.len() >= BUDGETS_MAX / 2 {
                budgets.clear();
            }
        }
        let budget = budgets.entry((tenant.clone(), subject.to_owned())).or_insert(Budget {
            tokens: AGENT_BURST,
            refilled: now,
            throttled: false,
        });
        if budget.take(now) {
            budget.throttled = false;
            Allowed::Yes
        } else if budget.throttled {
            Allowed::No
        } else {
            budget.throttled = true;
            Allowed::LastBeforeThrottle
        }
    }

    fn send(&self, tenant: &TenantId, kind: &str, subject: &str, message: String, fields: &[(&str, &str)]) {
        let event = FleetEvent {
            id: String::new(),
            unix_ms: now_unix_ms(),
            kind: kind.to_owned(),
            subject: subject.to_owned(),
            message,
            fields: fields.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        };
        if self.tx.try_send((tenant.clone(), event)).is_err() {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(dropped, "event writer behind; events dropped (count so far)");
            }
        }
    }

    /// Changes each time this replica wrote events.
    pub fn written(&self) -> watch::Receiver<u64> {
        self.written.subscribe()
    }

    /// Events dropped so far (writer behind or store failing).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// What an agent's event budget allows.
enum Allowed {
    Yes,
    No,
    /// The first event over the budget: it becomes the throttle notice.
    LastBeforeThrottle,
}

/// What a reader gets next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    Event(FleetEvent),
    /// The reader's position is gone from the log: events were missed.
    Lagged,
}

/// Where a reader starts.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// With the events written from now on.
    Now,
    /// With the oldest event kept.
    Oldest,
    /// After the event with this id.
    After(String),
}

/// A tenant's events from `start`, as an endless stream that ends after
/// [`Next::Lagged`] or when `shutdown` fires.
pub fn stream(
    store: Arc<dyn Store>,
    events: &Events,
    tenant: TenantId,
    start: Start,
    shutdown: CancellationToken,
) -> impl futures_util::Stream<Item = Next> + Send + use<> {
    struct State {
        store: Arc<dyn Store>,
        written: watch::Receiver<u64>,
        tenant: TenantId,
        /// `None` until the starting point is known (the newest id now).
        cursor: Option<String>,
        started: bool,
        page: std::collections::VecDeque<FleetEvent>,
        done: bool,
        shutdown: CancellationToken,
    }
    let (started, cursor) = match start {
        Start::Now => (false, None),
        Start::Oldest => (true, None),
        Start::After(id) => (true, Some(id)),
    };
    let state = State {
        store,
        written: events.written(),
        tenant,
        started,
        cursor,
        page: Default::default(),
        done: false,
        shutdown,
    };
    futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if s.done {
                return None;
            }
            if let Some(event) = s.page.pop_front() {
                s.cursor = Some(event.id.clone());
                return Some((Next::Event(event), s));
            }
            if !s.started {
                match s.store.latest_event_id(&s.tenant).await {
                    Ok(latest) => {
                        s.cursor = latest;
                        s.started = true;
                    }
                    Err(e) => tracing::debug!(error = %e, "event stream: store unavailable"),
                }
            }
            if s.started {
                match s.store.events_after(&s.tenant, s.cursor.as_deref(), PAGE).await {
                    Ok(page) if page.lagged => {
                        s.done = true;
                        return Some((Next::Lagged, s));
                    }
                    Ok(page) if !page.events.is_empty() => {
                        s.page.extend(page.events);
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "event stream: store unavailable"),
                }
            }
            tokio::select! {
                _ = s.shutdown.cancelled() => return None,
                changed = s.written.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;
    use crate::store::embedded::EmbeddedStore;

    /// One agent causing events in a loop is throttled (once told), without
    /// touching other agents' events or events that are not an agent's, and
    /// gets its budget back as time passes.
    #[tokio::test(start_paused = true)]
    async fn an_agent_flooding_the_log_is_throttled_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let (tracker, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let events = Events::start(store, 1000, &tracker, shutdown.clone());
        let tenant = TenantId::default_tenant();
        let mut allowed = 0;
        let mut notices = 0;
        for _ in 0..100 {
            match events.agent_budget(&tenant, "flooder") {
                Allowed::Yes => allowed += 1,
                Allowed::LastBeforeThrottle => notices += 1,
                Allowed::No => {}
            }
        }
        assert_eq!((allowed, notices), (AGENT_BURST, 1), "a burst, then one notice");
        assert!(
            matches!(events.agent_budget(&tenant, "quiet"), Allowed::Yes),
            "others untouched"
        );
        let other_tenant = TenantId::new("other").unwrap();
        assert!(matches!(events.agent_budget(&other_tenant, "flooder"), Allowed::Yes));
        tokio::time::advance(AGENT_REFILL * 5).await;
        let refilled = (0..10)
            .filter(|_| matches!(events.agent_budget(&tenant, "flooder"), Allowed::Yes))
            .count();
        assert_eq!(refilled, 5, "one event per refill period");
        // Budgets are bounded: when every tracked agent has just spent some
        // (a rollout touching each), they are all forgotten at once, not
        // pruned again on every event.
        for n in 0..BUDGETS_MAX {
            events.agent_budget(&tenant, &format!("agent-{n}"));
        }
        events.agent_budget(&tenant, "one more");
        let tracked = events.budgets.lock().unwrap().len();
        assert!(tracked < 10, "{tracked} budgets kept");
        shutdown.cancel();
    }

    /// A reader that stops reading is never buffered for: it keeps its
    /// position, and once the log has moved past it, it is told and dropped.
    #[tokio::test]
    async fn a_reader_left_behind_is_told_it_lagged_and_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let (tracker, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let events = Events::start(store.clone(), 10, &tracker, shutdown.clone());
        let tenant = TenantId::default_tenant();
        let mut reader = Box::pin(stream(
            store.clone(),
            &events,
            tenant.clone(),
            Start::Now,
            shutdown.clone(),
        ));
        let mut written = events.written();
        events.publish(&tenant, "test", "", "first".into(), &[]);
        let Some(Next::Event(first)) = reader.next().await else {
            panic!("the first event")
        };
        assert_eq!(first.message, "first");
        // The reader stalls while 50 more are written (10 kept).
        for n in 0..50 {
            events.publish(&tenant, "test", "", format!("e{n}"), &[]);
        }
        while store
            .events_after(&tenant, None, 100)
            .await
            .unwrap()
            .events
            .last()
            .map(|e| e.message.as_str())
            != Some("e49")
        {
            written.changed().await.unwrap();
        }
        assert_eq!(reader.next().await, Some(Next::Lagged));
        assert_eq!(reader.next().await, None, "dropped after being told");
        // Another tenant's reader sees none of it.
        let other = TenantId::new("other").unwrap();
        let page = store.events_after(&other, None, 100).await.unwrap();
        assert!(page.events.is_empty());
        shutdown.cancel();
    }
}
