//! Agent authentication: who is connecting, decided once at the edge, before
//! any WebSocket upgrade or body read.
//!
//! With [`AuthMode::ApiKey`] an agent presents a tenant-scoped API key
//! (`fp_<id>_<secret>`, see [`fleetplane_proto::credentials`]) as a bearer
//! token in the configured header; the key's tenant becomes the agent's
//! tenant, whatever the agent says about itself. Keys are looked up by id
//! through the bus (a coordinator reads its store) and cached here for
//! `cache_ttl`, one lookup per id at a time however many agents arrive at
//! once. Refusals:
//!
//! | case | status | counted as |
//! |---|---|---|
//! | no credentials | 401 + jittered `Retry-After` | `missing` |
//! | not a Fleetplane key | 401 | `malformed` |
//! | unknown id or wrong secret | 401 | `unknown` / `wrong_secret` |
//! | revoked key | 401 | `revoked` |
//! | client certificate of no tenant's CA (mutual TLS) | 401 | `unknown_certificate` |
//! | too many failures from one address | 429 + `Retry-After` | `throttled` |
//! | no coordinator to ask | 503 + `Retry-After` | `unavailable` |
//!
//! Failures are rate limited per source address: an address over
//! `failures_per_minute` is refused without a lookup until its budget
//! refills, so a guessing flood costs neither lookups nor the real agents'
//! admission. Open connections are re-checked every `cache_ttl`
//! ([`Authenticator::watch`]): a revoked key's connections are closed.
//!
//! With mutual TLS configured (`client_certs`), an agent may present a client
//! certificate instead of a key: each tenant has its own CA, and the
//! certificate's issuer decides the tenant.
//!
//! [`AuthMode::None`] is the explicit open mode for a first run on a laptop:
//! every agent is in the default tenant, and the gateway says so loudly.

use std::{
    collections::HashMap,
    net::IpAddr,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::http::{HeaderMap, HeaderName, header};
use fleetplane_bus::Bus;
use fleetplane_proto::{
    TenantId,
    credentials::{KeyFormatError, PresentedKey},
    internal::ApiKey,
};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How agents prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Nobody: every agent is in the default tenant. For a laptop's first run.
    None,
    /// A tenant-scoped API key as a bearer token.
    ApiKey,
}

/// Authentication settings.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Whether and how agents authenticate.
    pub mode: AuthMode,
    /// Header carrying the key; `Authorization` takes `Bearer <key>`, any
    /// other header the key alone (or also `Bearer <key>`).
    pub header: HeaderName,
    /// How long a looked-up key is trusted before it is asked for again; also
    /// how often open connections' keys are re-checked. Revocation takes
    /// effect within this. Default 5 s.
    pub cache_ttl: Duration,
    /// Failed attempts per source address per minute before the address is
    /// refused without a lookup (burst: a quarter of it, at least 5).
    /// Zero: no limit. Default 60.
    pub failures_per_minute: u32,
    /// Tenant of every agent in [`AuthMode::None`].
    pub open_tenant: TenantId,
    /// Mutual TLS: agents presenting a client certificate of a tenant's CA
    /// belong to that tenant (an API key, when also presented, wins).
    pub client_certs: Option<Arc<crate::tls::ClientTenants>>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::ApiKey,
            header: header::AUTHORIZATION,
            cache_ttl: Duration::from_secs(5),
            failures_per_minute: 60,
            open_tenant: TenantId::default_tenant(),
            client_certs: None,
        }
    }
}

/// Who an agent connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The tenant every message of this connection belongs to.
    pub tenant: TenantId,
    /// The API key's public id (`None` in open mode).
    pub key_id: Option<Arc<str>>,
    /// For a connection authenticated by a client certificate,
    /// `cert:<32 hex digits of the SHA-256 of the leaf>`: the identity the
    /// coordinators bind instance uids to, as they do for API keys, so one
    /// certificate of a tenant cannot speak for another's agents.
    pub certificate: Option<Arc<str>>,
}

impl Principal {
    /// The identity a report carries in `key_id`: the API key, else the
    /// client certificate, else none (open mode).
    pub fn report_identity(&self) -> Option<String> {
        self.key_id
            .as_deref()
            .or(self.certificate.as_deref())
            .map(str::to_owned)
    }
}

/// Why an agent was refused. Messages never contain the presented key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required: present an API key as a bearer token")]
    Missing,
    #[error("{0}")]
    Malformed(#[from] KeyFormatError),
    #[error("unknown API key")]
    Unknown,
    #[error("wrong API key secret")]
    WrongSecret,
    #[error("API key revoked")]
    Revoked,
    #[error("client certificate not issued by any tenant's CA")]
    UnknownCertificate,
    #[error("too many failed authentication attempts from this address; retry later")]
    Throttled(Duration),
    #[error("credentials cannot be checked now: {0}")]
    Unavailable(String),
}

impl AuthError {
    /// Label for the refusal metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed(_) => "malformed",
            Self::Unknown => "unknown",
            Self::WrongSecret => "wrong_secret",
            Self::Revoked => "revoked",
            Self::UnknownCertificate => "unknown_certificate",
            Self::Throttled(_) => "throttled",
            Self::Unavailable(_) => "unavailable",
        }
    }

    /// Whether the attempt counts against its address's failure budget.
    fn is_failure(&self) -> bool {
        !matches!(self, Self::Throttled(_) | Self::Unavailable(_))
    }
}

/// A cached lookup: the key (or its absence) and when it was fetched.
type Cached = Option<(Option<ApiKey>, Instant)>;

/// Most cached key ids; past it, absences are not cached (a flood of random
/// ids must not grow the cache).
const MAX_CACHED: usize = 65_536;

/// Checks credentials; one per gateway.
#[derive(Debug)]
pub struct Authenticator {
    config: AuthConfig,
    bus: Arc<dyn Bus>,
    /// Key id → its latest lookup. Each entry's own lock makes concurrent
    /// arrivals with one key wait for a single lookup.
    cache: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Cached>>>>,
    failures: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// Addresses over their failure budget, until when.
    blocked: Mutex<HashMap<IpAddr, Instant>>,
    /// Keys of open connections, each with the token that closes them.
    watched: Mutex<HashMap<Arc<str>, Watched>>,
}

#[derive(Debug)]
struct Watched {
    tenant: TenantId,
    revoked: CancellationToken,
    connections: usize,
}

/// Held by a connection authenticated with a key: its `revoked` token fires
/// when the key is revoked. Dropping it stops watching once no connection
/// uses the key.
#[derive(Debug)]
pub struct KeyWatch {
    authenticator: Arc<Authenticator>,
    id: Arc<str>,
    /// Cancelled when the key is revoked or deleted.
    pub revoked: CancellationToken,
}

impl KeyWatch {
    /// The watched key's public id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for KeyWatch {
    fn drop(&mut self) {
        let mut watched = lock(&self.authenticator.watched);
        if let Some(entry) = watched.get_mut(&self.id) {
            entry.connections = entry.connections.saturating_sub(1);
            if entry.connections == 0 {
                watched.remove(&self.id);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Authenticator {
    /// An authenticator asking `bus` for keys.
    pub fn new(config: AuthConfig, bus: Arc<dyn Bus>) -> Self {
        if config.mode == AuthMode::None {
            tracing::warn!(
                tenant = %config.open_tenant,
                "agents.auth = \"none\": ANY client can connect as ANY agent; use API keys outside a laptop"
            );
        }
        let failures = NonZeroU32::new(config.failures_per_minute).map(|rate| {
            let burst = NonZeroU32::new((config.failures_per_minute / 4).max(5)).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_minute(rate).allow_burst(burst))
        });
        Self {
            config,
            bus,
            cache: Mutex::new(HashMap::new()),
            failures,
            blocked: Mutex::new(HashMap::new()),
            watched: Mutex::new(HashMap::new()),
        }
    }

    /// The mode in force.
    pub fn mode(&self) -> AuthMode {
        self.config.mode
    }

    /// Decides who a request is, from its headers, source address and TLS
    /// client certificate chain.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        peer: IpAddr,
        client_chain: Option<&[rustls::pki_types::CertificateDer<'static>]>,
    ) -> Result<Principal, AuthError> {
        if self.config.mode == AuthMode::None {
            return Ok(Principal {
                tenant: self.config.open_tenant.clone(),
                key_id: None,
                certificate: None,
            });
        }
        if let Some(until) = lock(&self.blocked).get(&peer).copied()
            && until > Instant::now()
        {
            return Err(AuthError::Throttled(until - Instant::now()));
        }
        let result = match (client_chain, &self.config.client_certs) {
            (Some(chain), Some(clients)) if !headers.contains_key(&self.config.header) => clients
                .tenant_of(chain)
                .map(|tenant| Principal {
                    tenant,
                    key_id: None,
                    certificate: chain
                        .first()
                        .map(|leaf| Arc::from(fleetplane_proto::credentials::certificate_id(leaf).as_str())),
                })
                .ok_or(AuthError::UnknownCertificate),
            _ => self.check(headers).await,
        };
        if let Err(e) = &result
            && e.is_failure()
        {
            return Err(self.count_failure(peer, e.clone()));
        }
        result
    }

    async fn check(&self, headers: &HeaderMap) -> Result<Principal, AuthError> {
        let value = headers
            .get(&self.config.header)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .ok_or(AuthError::Missing)?;
        let token = match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            _ if self.config.header == header::AUTHORIZATION => return Err(AuthError::Missing),
            _ => value,
        };
        let presented = PresentedKey::parse(token)?;
        let key = self.key(presented.id()).await?.ok_or(AuthError::Unknown)?;
        if !presented.matches(&key.secret_sha256) {
            return Err(AuthError::WrongSecret);
        }
        if key.revoked_unix_ms != 0 {
            return Err(AuthError::Revoked);
        }
        let tenant = TenantId::new(key.tenant.clone()).map_err(|_| AuthError::Unknown)?;
        Ok(Principal {
            tenant,
            key_id: Some(Arc::from(key.id.as_str())),
            certificate: None,
        })
    }

    /// Counts a failure against `peer`; over budget, blocks the address
    /// until the limiter would let it try again.
    fn count_failure(&self, peer: IpAddr, error: AuthError) -> AuthError {
        let Some(limiter) = &self.failures else { return error };
        match limiter.check_key(&peer) {
            Ok(()) => error,
            Err(not_until) => {
                let wait =
                    not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
                let wait = wait.max(Duration::from_secs(1));
                lock(&self.blocked).insert(peer, Instant::now() + wait);
                AuthError::Throttled(wait)
            }
        }
    }

    /// The key with this id, from the cache if fresh, else from a
    /// coordinator (one lookup per id at a time).
    async fn key(&self, id: &str) -> Result<Option<ApiKey>, AuthError> {
        let slot = {
            let mut cache = lock(&self.cache);
            if let Some(slot) = cache.get(id) {
                slot.clone()
            } else {
                let slot = Arc::new(tokio::sync::Mutex::new(None));
                if cache.len() < MAX_CACHED {
                    cache.insert(id.to_owned(), slot.clone());
                }
                slot
            }
        };
        let mut entry = slot.lock().await;
        if let Some((key, at)) = entry.as_ref()
            && at.elapsed() < self.config.cache_ttl
        {
            return Ok(key.clone());
        }
        let key = self
            .bus
            .lookup_key(id)
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        *entry = Some((key.clone(), Instant::now()));
        Ok(key)
    }

    /// Starts watching the key of a new connection.
    pub fn watch(self: &Arc<Self>, principal: &Principal) -> Option<KeyWatch> {
        let id = principal.key_id.clone()?;
        let mut watched = lock(&self.watched);
        let entry = watched.entry(id.clone()).or_insert_with(|| Watched {
            tenant: principal.tenant.clone(),
            revoked: CancellationToken::new(),
            connections: 0,
        });
        entry.connections += 1;
        Some(KeyWatch {
            authenticator: self.clone(),
            id,
            revoked: entry.revoked.clone(),
        })
    }

    /// Re-checks every key in use by an open connection (fresh lookups) and
    /// fires the revocation token of those revoked, deleted or moved to
    /// another tenant. Lookups that fail leave connections alone.
    pub async fn recheck_watched(&self) {
        let ids: Vec<(Arc<str>, TenantId)> = lock(&self.watched)
            .iter()
            .map(|(id, w)| (id.clone(), w.tenant.clone()))
            .collect();
        for (id, tenant) in ids {
            let Ok(key) = self.bus.lookup_key(&id).await else {
                continue;
            };
            let slot = lock(&self.cache).get(&*id).cloned();
            if let Some(slot) = slot
                && let Ok(mut entry) = slot.try_lock()
            {
                *entry = Some((key.clone(), Instant::now()));
            }
            let valid = key.is_some_and(|k| k.revoked_unix_ms == 0 && k.tenant == tenant.as_str());
            if !valid && let Some(watched) = lock(&self.watched).remove(&id) {
                tracing::info!(key_id = %id, connections = watched.connections, "API key revoked: closing its connections");
                watched.revoked.cancel();
            }
        }
    }

    /// Forgets stale cache entries and expired address blocks (bounded state).
    pub fn prune(&self) {
        let ttl = self.config.cache_ttl;
        lock(&self.cache).retain(|_, slot| {
            slot.try_lock()
                .map(|entry| entry.as_ref().is_some_and(|(_, at)| at.elapsed() < ttl * 4))
                .unwrap_or(true)
        });
        let now = Instant::now();
        lock(&self.blocked).retain(|_, until| *until > now);
        if let Some(limiter) = &self.failures {
            limiter.retain_recent();
        }
    }

    /// How often open connections' keys are re-checked.
    pub fn recheck_interval(&self) -> Duration {
        self.config.cache_ttl
    }
}

#[cfg(test)]
mod tests;
