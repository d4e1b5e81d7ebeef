//! The shard workers: every change to an agent's record happens here.
//!
//! Agents are spread over a fixed number of shards by instance uid, and each
//! shard handles its jobs one at a time. So per agent, reports, close events,
//! pushes and expiries apply in arrival order and never race each other, while
//! different agents proceed in parallel.

use std::{
    hash::{BuildHasher, BuildHasherDefault, DefaultHasher},
    sync::Arc,
    time::Duration,
};

use fleetplane_bus::{Bus, Delivery, Heartbeat, Report, ReportRequest};
use fleetplane_proto::{
    ConnectionId, GatewayId, InstanceUid, Link, TenantId,
    capabilities::{AgentCaps, AgentFlags},
    errors::error_reply,
    internal::{AgentRecord, Transport},
    opamp::{AgentCapabilities, AgentIdentification, AgentToServerFlags, ServerErrorResponseType, ServerToAgent},
    retry,
};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    conflict::{Conflict, retry_conflicts},
    desired,
    inventory::{self, Arrival},
    liveness,
    reconcile::{self, ReplySettings},
    store::{Store, StoreError},
};

/// Work for one shard.
#[derive(Debug)]
pub(crate) enum Job {
    /// An agent message awaiting its reply.
    Report(Box<ReportRequest>),
    /// A gateway lost this connection without an `agent_disconnect`.
    Closed {
        tenant: TenantId,
        uid: InstanceUid,
        gateway: GatewayId,
        connection: ConnectionId,
        /// The gateway itself reported the close: the connection is gone for
        /// good, and liveness arriving late for it (from another replica, or
        /// delayed) must not revive the agent. False when the close is only
        /// presumed from a silent gateway, whose liveness, if it was alive
        /// after all, rightly brings its agents back.
        reported: bool,
        /// The gateway's notice, acknowledged once all its connections are.
        recorded: Option<std::sync::Arc<crate::liveness::Recorded>>,
    },
    /// Desired state may have changed: push what the agent is missing.
    Reconcile { tenant: TenantId, uid: InstanceUid },
    /// Offer the desired config again even if it was offered already: the
    /// agent has not confirmed it for a while, and the offer may have been
    /// lost (a replica killed before its publish left the process, a
    /// gateway queue full) while the record says it went out.
    Resend {
        tenant: TenantId,
        uid: InstanceUid,
        /// Only if the agent has spoken since the offer and still reports
        /// another hash (the reconcile pass after an admin change); else
        /// unconditionally (a rollout's unconfirmed offer, already rate
        /// limited by its executor).
        if_answered: bool,
    },
    /// A rollout takes (non-empty hash) or releases (empty) its hold on an
    /// agent's desired config; then what the agent is missing is pushed.
    Pin {
        tenant: TenantId,
        uid: InstanceUid,
        rollout: String,
        pin: Pin,
    },
    /// A heartbeat the gateway answered itself whose batched write lost a
    /// race with another writer: redone here, in order with the agent's reports.
    Liveness {
        tenant: TenantId,
        uid: InstanceUid,
        gateway: GatewayId,
        entry: Heartbeat,
    },
    /// An HTTP agent has not polled since `last_seen_unix_ms`: mark it offline
    /// unless it polled in the meantime.
    Expire {
        tenant: TenantId,
        uid: InstanceUid,
        last_seen_unix_ms: u64,
    },
}

impl Job {
    fn uid(&self) -> Option<&[u8]> {
        match self {
            Job::Report(request) => Some(request.report.uid.as_bytes()),
            Job::Closed { uid, .. }
            | Job::Reconcile { uid, .. }
            | Job::Resend { uid, .. }
            | Job::Expire { uid, .. }
            | Job::Pin { uid, .. }
            | Job::Liveness { uid, .. } => Some(uid.as_bytes()),
        }
    }
}

/// What a rollout holds an agent to.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Pin {
    /// A config version hash (empty: released), for the whole config or
    /// one config-map key.
    Config { hash: Vec<u8>, key: String },
    /// A package set's contents (`None`: released).
    Packages(Option<fleetplane_proto::opamp::PackagesAvailable>),
    /// Connection settings (`None`: released); boxed, as they are large and
    /// jobs many.
    Connection(Option<Box<fleetplane_proto::internal::ConnectionSettingsAssignment>>),
}

impl Pin {
    /// Sets the pin in `record` for `rollout`; whether the record changed.
    /// Only a rollout's own hold is released; a hold is taken from anyone (a
    /// newer rollout supersedes an older one's pin).
    fn apply(&self, record: &mut AgentRecord, rollout: &str) -> bool {
        match self {
            Pin::Config { hash, key } => {
                let releasing_other = hash.is_empty() && record.pinned_by != rollout;
                let same = record.pinned_hash == *hash
                    && (hash.is_empty() || (record.pinned_by == rollout && record.pinned_key == *key));
                if releasing_other || same {
                    return false;
                }
                (record.pinned_by, record.pinned_key) = if hash.is_empty() {
                    (String::new(), String::new())
                } else {
                    (rollout.to_owned(), key.clone())
                };
                record.pinned_hash = hash.clone();
                true
            }
            Pin::Packages(None) => {
                if record.pinned_packages_by != rollout {
                    return false;
                }
                record.pinned_packages_by.clear();
                record.pinned_packages = None;
                true
            }
            Pin::Packages(Some(packages)) => {
                let same = record.pinned_packages_by == rollout
                    && record
                        .pinned_packages
                        .as_ref()
                        .is_some_and(|p| p.all_packages_hash == packages.all_packages_hash);
                if same {
                    return false;
                }
                record.pinned_packages_by = rollout.to_owned();
                record.pinned_packages = Some(Box::new(packages.clone()));
                true
            }
            Pin::Connection(None) => {
                if record.pinned_connection_by != rollout {
                    return false;
                }
                record.pinned_connection_by.clear();
                record.pinned_connection = None;
                true
            }
            Pin::Connection(Some(settings)) => {
                if record.pinned_connection_by == rollout && record.pinned_connection.as_ref() == Some(settings) {
                    return false;
                }
                record.pinned_connection_by = rollout.to_owned();
                record.pinned_connection = Some(settings.clone());
                true
            }
        }
    }
}

/// Whether a push offers again what the record says was offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resend {
    /// Never: offers on their way are not repeated.
    No,
    /// Always (a rollout's unconfirmed offer).
    Always,
    /// When the agent spoke after the offer and reports another hash.
    IfAnswered,
}

/// Handle for sending jobs to the shard that owns an agent.
#[derive(Debug, Clone)]
pub(crate) struct Shards {
    senders: Arc<Vec<mpsc::Sender<Job>>>,
}

impl Shards {
    /// Queues a job on its agent's shard; waits when that shard is busy.
    pub(crate) async fn send(&self, job: Job) {
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(job.uid().unwrap_or_default());
        let shard = (hash % self.senders.len() as u64) as usize;
        if self.senders[shard].send(job).await.is_err() {
            tracing::debug!("shard stopped, job dropped during shutdown");
        }
    }
}

/// What every worker needs.
#[derive(Debug, Clone)]
pub(crate) struct WorkerContext {
    pub store: Arc<dyn Store>,
    /// The tenant event stream (agents connecting, leaving, config status).
    pub events: Arc<crate::events::Events>,
    pub bus: Arc<dyn Bus>,
    pub settings: ReplySettings,
    /// Base of the retry hint given when the store is unavailable.
    pub retry_after: Duration,
    /// Which gateways are alive: a connection held by a gateway that went
    /// silent is not defended against a newcomer.
    pub presence: Arc<std::sync::Mutex<crate::presence::Presence>>,
    /// Component inventories agents sent in full, by hash.
    pub inventories: Arc<crate::components::InventoryCache>,
}

/// A gateway silent this long no longer counts as holding its connections
/// when another connection claims one of its agents (its beats come every
/// second; a killed gateway's agents reconnect elsewhere within seconds).
const HOLDER_SILENT_AFTER: Duration = Duration::from_millis(2500);

/// Base of the retry hint for a message refused because its uid is held by
/// another live connection: short, because the usual cause is an agent that
/// restarted and reconnected before its old connection's close was handled.
const HELD_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Starts `count` shard workers; they stop on `shutdown`.
pub(crate) fn start(
    count: usize,
    queue: usize,
    context: WorkerContext,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Shards {
    let senders = (0..count.max(1))
        .map(|_| {
            let (tx, rx) = mpsc::channel(queue);
            tracker.spawn(run(context.clone(), rx, shutdown.clone()));
            tx
        })
        .collect();
    Shards {
        senders: Arc::new(senders),
    }
}

/// Handles jobs until shutdown. Jobs still queued then are dropped: report
/// requests fail at the gateway and the agents retry, which heals them.
async fn run(context: WorkerContext, mut jobs: mpsc::Receiver<Job>, shutdown: CancellationToken) {
    loop {
        let job = tokio::select! {
            _ = shutdown.cancelled() => break,
            job = jobs.recv() => job,
        };
        let Some(job) = job else { break };
        context.handle(job).await;
    }
}

/// Wall-clock milliseconds, as records carry them.
pub(crate) use fleetplane_proto::clock::unix_ms as now_unix_ms;

impl WorkerContext {
    async fn handle(&self, job: Job) {
        match job {
            Job::Report(request) => self.report(request).await,
            Job::Closed {
                tenant,
                uid,
                gateway,
                connection,
                reported,
                recorded,
            } => {
                let closed = std::sync::atomic::AtomicBool::new(false);
                let result = self
                    .update(&tenant, &uid, |record| {
                        let same = record.connected
                            && record.gateway_id == gateway.as_str()
                            && record.connection_id == connection.get();
                        closed.store(same, std::sync::atomic::Ordering::Relaxed);
                        if same {
                            record.connected = false;
                            if reported {
                                // No connection of any gateway has id 0.
                                record.connection_id = 0;
                            }
                        }
                        same
                    })
                    .await;
                match result {
                    Ok(_) => {
                        if closed.load(std::sync::atomic::Ordering::Relaxed) {
                            let why = if reported {
                                "connection closed"
                            } else {
                                "its gateway went silent or left"
                            };
                            self.events
                                .publish(&tenant, "agent.disconnected", &uid.to_string(), why.into(), &[]);
                        }
                        if let Some(recorded) = recorded {
                            recorded.one_done();
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%uid, error = %e, "could not record a closed connection; the gateway sends it again")
                    }
                }
            }
            Job::Liveness {
                tenant,
                uid,
                gateway,
                entry,
            } => {
                let result = self
                    .update(&tenant, &uid, |record| liveness::apply(record, &gateway, &entry))
                    .await;
                if let Err(e) = result {
                    tracing::debug!(%uid, error = %e, "liveness not recorded; the next one will be");
                }
            }
            Job::Expire {
                tenant,
                uid,
                last_seen_unix_ms,
            } => {
                let result = self
                    .update(&tenant, &uid, |record| {
                        let stale = record.connected && record.last_seen_unix_ms == last_seen_unix_ms;
                        if stale {
                            record.connected = false;
                        }
                        stale
                    })
                    .await;
                if let Err(e) = result {
                    tracing::warn!(%uid, error = %e, "could not expire an http agent");
                }
            }
            Job::Pin {
                tenant,
                uid,
                rollout,
                pin,
            } => {
                let result = self.update(&tenant, &uid, |record| pin.apply(record, &rollout)).await;
                if let Err(e) = result {
                    tracing::warn!(%uid, error = %e, "could not pin an agent; the next rollout tick retries");
                    return;
                }
                self.push_retrying(&tenant, &uid, Resend::No).await;
            }
            Job::Reconcile { tenant, uid } => self.push_retrying(&tenant, &uid, Resend::No).await,
            Job::Resend {
                tenant,
                uid,
                if_answered,
            } => {
                let resend = if if_answered {
                    Resend::IfAnswered
                } else {
                    Resend::Always
                };
                self.push_retrying(&tenant, &uid, resend).await
            }
        }
    }

    /// Loads a record, lets `change` edit it, and writes it back if it says
    /// so; re-reads and redoes the change when another writer got there first.
    async fn update(
        &self,
        tenant: &TenantId,
        uid: &InstanceUid,
        change: impl Fn(&mut AgentRecord) -> bool,
    ) -> Result<(), StoreError> {
        let change = &change;
        retry_conflicts(|| async move {
            let Some(mut record) = self.store.agent(tenant, uid).await? else {
                return Ok(());
            };
            if !change(&mut record) {
                return Ok(());
            }
            self.store.put_agent(record).await
        })
        .await
    }

    async fn report(&self, request: Box<ReportRequest>) {
        if request.is_expired() {
            // Waited in the queue past the gateway's patience: the agent was
            // told to retry later. Dropping it keeps an overload from turning
            // into work whose every answer comes too late.
            crate::metrics::metrics().report_expired();
            return;
        }
        let uid = request.report.uid;
        let span = tracing::info_span!(
            "coordinator.report",
            otel.kind = "server",
            instance_uid = %uid,
            tenant = %request.report.tenant,
            outcome = tracing::field::Empty,
        );
        fleetplane_bus::trace_context::attach(&span, &request.report.trace_context);
        let started = tokio::time::Instant::now();
        let outcome = self.answer_report(request).instrument(span.clone()).await;
        span.record("outcome", outcome);
        crate::metrics::metrics().report(outcome, started.elapsed().as_secs_f64());
    }

    /// Applies a report, retrying lost write races, and sends the answer.
    async fn answer_report(&self, request: Box<ReportRequest>) -> &'static str {
        let uid = request.report.uid;
        let uid_bytes = uid.as_bytes();
        let outcome = retry_conflicts(|| self.apply_report(&request)).await;
        let label = match &outcome {
            Ok(_) => "ok",
            Err(ReportError::HeldElsewhere) => "held_elsewhere",
            Err(ReportError::OwnedByAnotherKey) => "owned_by_another_key",
            Err(ReportError::Store(_)) => "store_unavailable",
        };
        let reply = match outcome {
            Ok(reply) => reply,
            Err(e @ ReportError::OwnedByAnotherKey) => {
                error_reply(uid_bytes, ServerErrorResponseType::BadRequest, e.to_string(), None)
            }
            Err(e @ ReportError::HeldElsewhere) => error_reply(
                uid_bytes,
                ServerErrorResponseType::Unavailable,
                e.to_string(),
                Some(retry::spread(HELD_RETRY_AFTER, 1.0)),
            ),
            Err(ReportError::Store(e)) => {
                tracing::warn!(error = %e, "store unavailable while handling a report");
                error_reply(
                    uid_bytes,
                    ServerErrorResponseType::Unavailable,
                    format!("state store unavailable: {e}"),
                    Some(retry::spread(self.retry_after, 1.0)),
                )
            }
        };
        request.respond(reply);
        label
    }

    async fn apply_report(&self, request: &ReportRequest) -> Result<ServerToAgent, ReportError> {
        let report = &request.report;
        let msg = &report.message;
        let sent_uid = report.uid;
        let tenant = &report.tenant;

        // An agent asking for a uid gets a fresh UUIDv7; its state lives under
        // the new uid from this message on, and the reply goes to the old one.
        let new_uid = AgentFlags(msg.flags)
            .has(AgentToServerFlags::RequestInstanceUid)
            .then(InstanceUid::new_v7);
        let uid = new_uid.unwrap_or(sent_uid);

        let mut record = match self.store.agent(tenant, &uid).await? {
            Some(record) => record,
            None => inventory::new_record(tenant.as_str(), uid.as_bytes()),
        };
        if new_uid.is_none() && self.held_elsewhere(&record, report) {
            return Err(ReportError::HeldElsewhere);
        }
        if new_uid.is_none() && !self.may_speak_for(&record, report).await? {
            return Err(ReportError::OwnedByAnotherKey);
        }
        // The speaker owns the uid from now on when nobody does, or when its
        // owner key was revoked (keys rotate). Certificates of a tenant's CA
        // identify the tenant, not one agent, and may be replaced: they do
        // not take ownership (a certificate issued for a CSR is bound to its
        // uid as `owner_certificate` instead).
        let speaker = report.identity.as_deref().unwrap_or_default();
        if !speaker.is_empty()
            && !speaker.starts_with(fleetplane_proto::credentials::CERTIFICATE_ID_PREFIX)
            && speaker != record.owner_key
            && speaker != record.owner_certificate
        {
            record.owner_key = speaker.to_owned();
        }
        // Speaking with the certificate it was issued last, the agent proves
        // it holds the key: the record keeps no copy of a server-generated
        // one, and the certificate it replaced no longer speaks for it.
        if !speaker.is_empty() && speaker == record.owner_certificate {
            record.previous_owner_certificate.clear();
            if let Some(certificate) = record.issued_certificate.as_mut() {
                certificate.private_key.clear();
            }
        }
        let arrival = Arrival {
            gateway: &report.gateway,
            link: report.link,
            endpoint: &report.endpoint,
            now_unix_ms: now_unix_ms(),
            acked_sequence_num: report.acked_sequence_num,
        };
        let before = AgentEventState::of(&record);
        self.known_inventory(tenant, &mut record, msg);
        let merged = inventory::merge(&mut record, msg, &arrival);
        if let Some(full) = msg.available_components.as_ref().filter(|a| !a.components.is_empty()) {
            self.inventories.put(tenant, full);
        }
        if merged.new_agent {
            tracing::info!(%tenant, instance_uid = %uid, link = ?arrival.link, "new agent");
        }
        // A certificate request (spec 4.G.38) is decided before the reply is
        // planned: a refusal answers BadRequest and must not consume what
        // the reply would have carried (a pending restart, an offer).
        let mut issued = false;
        if let Some(csr) = certificate_request(msg) {
            let accepts = AgentCaps(record.capabilities).has(AgentCapabilities::AcceptsOpAmpConnectionSettings);
            let signed = if accepts {
                self.settings.issuers.sign(tenant, &uid, csr).map_err(|e| e.to_string())
            } else {
                Err("to receive a certificate, advertise AcceptsOpAMPConnectionSettings".to_owned())
            };
            match signed {
                Ok((certificate, id)) => {
                    // Offered from now on in every connection-settings offer
                    // (the reply below carries it), and its holder may speak
                    // for this uid.
                    record.issued_certificate = Some(certificate);
                    record.owner_certificate = id;
                    issued = true;
                }
                Err(reason) => {
                    if !merged.stale {
                        self.store.put_agent(record).await?;
                    }
                    // Spec 4.E.25: CSR failures are BadRequest.
                    tracing::info!(%tenant, instance_uid = %uid, %reason, "certificate request refused");
                    self.events.publish(
                        tenant,
                        "agent.certificate",
                        &uid.to_string(),
                        format!("certificate request refused: {reason}"),
                        &[("error", &reason)],
                    );
                    return Ok(error_reply(
                        &msg.instance_uid,
                        ServerErrorResponseType::BadRequest,
                        format!("certificate request refused: {reason}"),
                        None,
                    ));
                }
            }
        }
        let desired = desired::resolve(self.store.as_ref(), tenant, &record).await?;
        let connection = desired::connection_settings(self.store.as_ref(), tenant, &record).await?;
        let packages = desired::package_set(self.store.as_ref(), tenant, &record).await?;
        let mut reply = reconcile::plan(
            &mut record,
            desired.as_ref().map(|d| &*d.config),
            reconcile::Extras {
                connection: connection.as_ref(),
                packages: packages.as_ref(),
            },
            Some(&merged),
            &self.settings,
        );
        tracing::debug!(
            instance_uid = %uid,
            seq = msg.sequence_num,
            reported = %record.remote_config_status.as_ref().map(|s| hex::encode(&s.last_remote_config_hash)).unwrap_or_default(),
            replied = %reply.remote_config.as_ref().map(|c| hex::encode(&c.config_hash)).unwrap_or_default(),
            "report"
        );
        if let (Some(_), Some(desired)) = (&reply.remote_config, &desired) {
            record.offered_config_unix_ms = now_unix_ms();
            desired.note_offer(&mut record);
        }
        if !merged.stale {
            let after = AgentEventState::of(&record);
            self.store.put_agent(record).await?;
            before.publish_changes(&after, &self.events, tenant, &uid, &arrival);
            if issued {
                self.events.publish(
                    tenant,
                    "agent.certificate",
                    &uid.to_string(),
                    "certificate issued from its CSR".into(),
                    &[],
                );
            }
            if let Some(custom) = &msg.custom_message {
                self.events.publish(
                    tenant,
                    "agent.custom_message",
                    &uid.to_string(),
                    format!(
                        "custom message {}/{} ({} bytes)",
                        custom.capability,
                        custom.r#type,
                        custom.data.len()
                    ),
                    &[("capability", &custom.capability), ("type", &custom.r#type)],
                );
            }
        }
        if let Some(new_uid) = new_uid {
            reply.instance_uid = sent_uid.to_vec();
            reply.agent_identification = Some(AgentIdentification {
                new_instance_uid: new_uid.to_vec(),
            });
            // The old record goes only if this very WebSocket connection
            // holds it: a request for a new uid must never delete someone
            // else's agent (over plain HTTP, with nothing to prove who
            // asks, the old record is left to go offline by itself).
            if new_uid != sent_uid
                && report.link.connection().is_some()
                && let Some(old) = self.store.agent(tenant, &sent_uid).await?
                && holds(&old, report)
            {
                self.store.remove_agent(tenant, &sent_uid).await?;
            }
        }
        Ok(reply)
    }

    /// An agent that announces an inventory by hash only, which its record
    /// lacks but another agent of the tenant sent in full, gets that one:
    /// it is not asked for its list (spec: `ReportAvailableComponents`).
    fn known_inventory(
        &self,
        tenant: &TenantId,
        record: &mut AgentRecord,
        msg: &fleetplane_proto::opamp::AgentToServer,
    ) {
        let Some(reported) = msg.available_components.as_ref().filter(|a| a.components.is_empty()) else {
            return;
        };
        let on_record = record
            .available_components
            .as_ref()
            .is_some_and(|stored| stored.hash == reported.hash && !stored.components.is_empty());
        if !on_record && let Some(known) = self.inventories.get(tenant, &reported.hash) {
            record.available_components = Some((*known).clone());
        }
    }

    /// Whether another live WebSocket connection holds this agent: the
    /// record says connected over WebSocket on a different gateway or
    /// connection, and that gateway beat recently. Then the message (over
    /// HTTP, or on a second WebSocket) must not take the record over: it
    /// could mark a live agent disconnected or poison its sequence number.
    fn held_elsewhere(&self, record: &AgentRecord, report: &Report) -> bool {
        if !record.connected || record.transport != Transport::Websocket as i32 || holds(record, report) {
            return false;
        }
        if record.gateway_id == report.gateway.as_str() {
            // The holder would be on the very gateway that asks, which knows.
            return report.other_live_connection.is_some();
        }
        self.presence.lock().unwrap_or_else(|p| p.into_inner()).heard_within(
            &record.gateway_id,
            HOLDER_SILENT_AFTER,
            tokio::time::Instant::now(),
        )
    }

    /// Whether the report's identity may speak for this uid: the API key
    /// that registered it owns it (and so does the certificate issued for
    /// its CSR) until that key is revoked or deleted; then the uid passes to
    /// whichever key of the tenant speaks next, so agents can rotate keys.
    /// Reports without an identity (open mode) are not held to it, nor are
    /// uids nobody owns.
    async fn may_speak_for(&self, record: &AgentRecord, report: &Report) -> Result<bool, StoreError> {
        let Some(speaker) = report.identity.as_deref() else {
            return Ok(true);
        };
        if record.owner_key.is_empty()
            || record.owner_key == speaker
            || record.owner_certificate == speaker
            || (!record.previous_owner_certificate.is_empty() && record.previous_owner_certificate == speaker)
        {
            return Ok(true);
        }
        let owner = self.store.api_key(&record.owner_key).await?;
        Ok(owner.is_none_or(|k| k.revoked_unix_ms != 0))
    }

    /// [`WorkerContext::push`], redone when it loses a write race.
    async fn push_retrying(&self, tenant: &TenantId, uid: &InstanceUid, resend: Resend) {
        let result = retry_conflicts(|| self.push(tenant, uid, resend)).await;
        if let Err(e) = result {
            tracing::warn!(%uid, error = %e, "could not push to agent");
        }
    }

    /// Sends a WebSocket agent what it is missing, through its gateway.
    /// With `resend`, a config already offered is offered again.
    async fn push(&self, tenant: &TenantId, uid: &InstanceUid, resend: Resend) -> Result<(), StoreError> {
        let Some(mut record) = self.store.agent(tenant, uid).await? else {
            return Ok(());
        };
        // Only agents that report their config status (for the others the
        // hash offered stands in for the one they run), and only once the
        // agent has spoken since the offer and still reports another hash:
        // an offer lost or overtaken by an older one, not one still being
        // applied.
        let again = match resend {
            Resend::No => false,
            Resend::Always => true,
            Resend::IfAnswered => {
                AgentCaps(record.capabilities).has(AgentCapabilities::ReportsRemoteConfig)
                    && record.last_seen_unix_ms > record.offered_config_unix_ms
            }
        };
        if again {
            record.offered_config_hash.clear();
        }
        if resend == Resend::Always {
            // A package or connection-settings rollout's unconfirmed offer,
            // likewise.
            record.offered_packages_hash.clear();
            record.offered_connection_settings_hash.clear();
        }
        // HTTP agents collect on their next poll; offline agents on reconnect.
        if !record.connected || record.transport != Transport::Websocket as i32 {
            return Ok(());
        }
        let desired = desired::resolve(self.store.as_ref(), tenant, &record).await?;
        let connection = desired::connection_settings(self.store.as_ref(), tenant, &record).await?;
        let packages = desired::package_set(self.store.as_ref(), tenant, &record).await?;
        let message = reconcile::plan(
            &mut record,
            desired.as_ref().map(|d| &*d.config),
            reconcile::Extras {
                connection: connection.as_ref(),
                packages: packages.as_ref(),
            },
            None,
            &self.settings,
        );
        if !reconcile::worth_pushing(&message) {
            return Ok(());
        }
        if let (Some(_), Some(desired)) = (&message.remote_config, &desired) {
            record.offered_config_unix_ms = now_unix_ms();
            desired.note_offer(&mut record);
        }
        let (Ok(gateway), Some(connection)) = (
            GatewayId::new(record.gateway_id.as_str()),
            ConnectionId::new(record.connection_id),
        ) else {
            // Not a connection any gateway holds: the agent's next report heals it.
            return Ok(());
        };
        let delivery = Delivery {
            tenant: tenant.clone(),
            uid: *uid,
            gateway,
            connection,
            message,
        };
        if delivery.message.command.is_some() || delivery.message.custom_message.is_some() {
            // A restart or custom message is taken from the record before it
            // is sent: a write race redone after sending would send it twice
            // (a second restart), while a lost send costs only that ask.
            self.store.put_agent(record).await?;
            if let Err(e) = self.bus.deliver(delivery).await {
                tracing::warn!(%uid, error = %e, "a restart or custom message could not be delivered; ask again");
            }
            return Ok(());
        }
        tracing::debug!(
            %uid,
            config = %delivery.message.remote_config.as_ref().map(|c| hex::encode(&c.config_hash)).unwrap_or_default(),
            "push"
        );
        match self.bus.deliver(delivery).await {
            // Remember what was offered only once it is on its way.
            Ok(()) => self.store.put_agent(record).await,
            Err(e) => {
                tracing::debug!(%uid, error = %e, "push not delivered; the next report heals it");
                Ok(())
            }
        }
    }
}

/// The PEM CSR of an agent-initiated certificate request, if any (spec 4.G.38).
fn certificate_request(msg: &fleetplane_proto::opamp::AgentToServer) -> Option<&[u8]> {
    msg.connection_settings_request
        .as_ref()?
        .opamp
        .as_ref()?
        .certificate_request
        .as_ref()
        .map(|c| c.csr.as_slice())
        .filter(|csr| !csr.is_empty())
}

/// What of an agent's record the event stream reports on.
struct AgentEventState {
    connected: bool,
    config_hash: Vec<u8>,
    config_status: i32,
    error: String,
}

impl AgentEventState {
    fn of(record: &AgentRecord) -> Self {
        let status = record.remote_config_status.as_ref();
        Self {
            connected: record.connected,
            config_hash: status.map(|s| s.last_remote_config_hash.clone()).unwrap_or_default(),
            config_status: status.map_or(0, |s| s.status),
            error: status.map(|s| s.error_message.clone()).unwrap_or_default(),
        }
    }

    /// Publishes what changed from `self` to `after` (a stored write).
    fn publish_changes(
        &self,
        after: &Self,
        events: &crate::events::Events,
        tenant: &TenantId,
        uid: &InstanceUid,
        arrival: &Arrival<'_>,
    ) {
        let subject = uid.to_string();
        let transport = match arrival.link {
            Link::Http => "http",
            Link::WebSocket(_) => "websocket",
        };
        if !self.connected && after.connected {
            events.publish(
                tenant,
                "agent.connected",
                &subject,
                format!("connected over {transport}"),
                &[("transport", transport), ("gateway", arrival.gateway.as_str())],
            );
        }
        if self.connected && !after.connected {
            events.publish(tenant, "agent.disconnected", &subject, "said goodbye".into(), &[]);
        }
        let changed = (&self.config_hash, self.config_status, &self.error)
            != (&after.config_hash, after.config_status, &after.error);
        if changed && !after.config_hash.is_empty() {
            let status = crate::admin::views::status_name(after.config_status);
            let hash = hex::encode(&after.config_hash);
            let message = if after.error.is_empty() {
                format!("config {} {status}", &hash[..hash.len().min(12)])
            } else {
                format!("config {} {status}: {}", &hash[..hash.len().min(12)], after.error)
            };
            events.publish(
                tenant,
                "agent.config_status",
                &subject,
                message,
                &[("hash", &hash), ("status", &status), ("error", &after.error)],
            );
        }
    }
}

/// Whether the connection a report came on is the one the record names:
/// the same WebSocket connection (connection ids are never 0 for those), or,
/// for plain HTTP, a record that is not held by any WebSocket.
fn holds(record: &AgentRecord, report: &Report) -> bool {
    match report.link {
        Link::Http => record.transport != Transport::Websocket as i32 || !record.connected,
        Link::WebSocket(connection) => {
            record.gateway_id == report.gateway.as_str() && record.connection_id == connection.get()
        }
    }
}

impl Conflict for ReportError {
    fn is_conflict(&self) -> bool {
        matches!(self, ReportError::Store(e) if e.is_conflict())
    }
}

#[derive(Debug, thiserror::Error)]
enum ReportError {
    /// Another live WebSocket connection holds this uid (spec 4.B.11): the
    /// holder keeps it, the newcomer is refused until the holder is gone.
    #[error(
        "instance_uid is in use by another live connection; retry later (if this agent was cloned, give it a new instance_uid)"
    )]
    HeldElsewhere,
    /// The uid was registered with another valid API key of the tenant.
    #[error("instance_uid belongs to another API key of this tenant")]
    OwnedByAnotherKey,
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use fleetplane_bus::{Bus, memory::MemoryBus};
    use fleetplane_proto::{
        GatewayId,
        internal::{AgentRecord, Transport},
        opamp::AgentCapabilities,
    };
    use tokio_util::{sync::CancellationToken, task::TaskTracker};

    use super::*;
    use crate::{reconcile::ReplySettings, store::embedded::EmbeddedStore};

    /// The record says the config went out, but it never arrived (the
    /// replica died before its publish left the process): a plain reconcile
    /// trusts the record and sends nothing; a resend sends it again.
    #[tokio::test]
    async fn a_resend_offers_again_what_the_record_says_was_offered() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let tenant = TenantId::default_tenant();
        let bus = Arc::new(MemoryBus::default());
        let gateway = GatewayId::new("gw-a").unwrap();
        let mut deliveries = bus.subscribe_deliveries(&gateway).await.unwrap();
        let created = store
            .create_config_version(
                &tenant,
                "c",
                [(
                    "c.yaml".to_owned(),
                    fleetplane_proto::internal::ConfigFile {
                        body: b"v2".to_vec(),
                        content_type: "text/yaml".into(),
                    },
                )]
                .into(),
                1,
            )
            .await
            .unwrap();
        let uid = InstanceUid::new_v7();
        store
            .put_agent(AgentRecord {
                tenant: tenant.to_string(),
                instance_uid: uid.to_vec(),
                capabilities: AgentCapabilities::AcceptsRemoteConfig as u64
                    | AgentCapabilities::ReportsRemoteConfig as u64,
                connected: true,
                transport: Transport::Websocket as i32,
                gateway_id: gateway.to_string(),
                connection_id: 7,
                pinned_by: "ro-1".into(),
                pinned_hash: created.version.hash.clone(),
                offered_config_hash: created.version.hash.clone(),
                first_seen_unix_ms: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        let (tracker, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let context = WorkerContext {
            store: store.clone(),
            events: crate::events::Events::start(store.clone(), 100, &tracker, shutdown.clone()),
            bus: bus.clone(),
            settings: ReplySettings {
                heartbeat_interval: Duration::ZERO,
                issuers: Default::default(),
            },
            retry_after: Duration::from_secs(1),
            presence: Arc::new(std::sync::Mutex::new(crate::presence::Presence::new(
                Duration::from_secs(5),
                tokio::time::Instant::now(),
            ))),
            inventories: Default::default(),
        };
        // One shard: jobs run in the order sent.
        let shards = start(1, 16, context, &tracker, &shutdown);
        shards
            .send(Job::Reconcile {
                tenant: tenant.clone(),
                uid,
            })
            .await;
        shards
            .send(Job::Resend {
                tenant: tenant.clone(),
                uid,
                if_answered: false,
            })
            .await;
        let delivery = tokio::time::timeout(Duration::from_secs(10), deliveries.recv())
            .await
            .expect("a delivery")
            .unwrap();
        let message = delivery.message;
        assert_eq!(message.remote_config.unwrap().config_hash, created.version.hash);
        assert!(deliveries.try_recv().is_err(), "the plain reconcile sent nothing");
        shutdown.cancel();
    }
}
