use std::sync::atomic::{AtomicUsize, Ordering};

use axum::http::HeaderValue;
use fleetplane_bus::{CoordinatorInput, memory::MemoryBus};
use fleetplane_proto::credentials::MintedKey;

use super::*;

/// A bus whose coordinator side answers key lookups from `keys`, counting
/// them.
struct Keys {
    bus: Arc<MemoryBus>,
    keys: Arc<Mutex<HashMap<String, ApiKey>>>,
    lookups: Arc<AtomicUsize>,
}

impl Keys {
    async fn start() -> Self {
        let bus = Arc::new(MemoryBus::default());
        let mut inputs = bus.subscribe_coordinator().await.unwrap();
        let keys: Arc<Mutex<HashMap<String, ApiKey>>> = Arc::default();
        let lookups = Arc::new(AtomicUsize::new(0));
        let (k, l) = (keys.clone(), lookups.clone());
        tokio::spawn(async move {
            while let Some(input) = inputs.recv().await {
                if let CoordinatorInput::KeyLookup(lookup) = input {
                    l.fetch_add(1, Ordering::SeqCst);
                    if lookup.id == BROKEN_STORE_ID {
                        lookup.fail("store backend failed: disk full".into());
                        continue;
                    }
                    let key = lock(&k).get(&lookup.id).cloned();
                    lookup.respond(key);
                }
            }
        });
        Self { bus, keys, lookups }
    }

    fn mint(&self, tenant: &str) -> MintedKey {
        let minted = MintedKey::generate();
        lock(&self.keys).insert(
            minted.id().to_owned(),
            ApiKey {
                id: minted.id().to_owned(),
                tenant: tenant.to_owned(),
                name: "test".into(),
                secret_sha256: minted.secret_sha256().to_vec(),
                created_unix_ms: 1,
                revoked_unix_ms: 0,
            },
        );
        minted
    }

    fn revoke(&self, id: &str) {
        if let Some(key) = lock(&self.keys).get_mut(id) {
            key.revoked_unix_ms = 2;
        }
    }

    fn authenticator(&self, config: AuthConfig) -> Arc<Authenticator> {
        Arc::new(Authenticator::new(config, self.bus.clone()))
    }
}

/// A key id whose lookup fails in the coordinator's store.
const BROKEN_STORE_ID: &str = "ffffffffffffffff";

fn bearer(token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    headers
}

impl Authenticator {
    async fn authenticate_key(&self, headers: &HeaderMap, peer: IpAddr) -> Result<Principal, AuthError> {
        self.authenticate(headers, peer, None).await
    }
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([10, 0, 0, last])
}

#[tokio::test]
async fn a_valid_key_names_its_tenant_and_everything_else_is_refused_by_reason() {
    let keys = Keys::start().await;
    let auth = keys.authenticator(AuthConfig::default());
    let acme = keys.mint("acme");
    let principal = auth.authenticate_key(&bearer(acme.token()), ip(1)).await.unwrap();
    assert_eq!(principal.tenant.as_str(), "acme");
    assert_eq!(principal.key_id.as_deref(), Some(acme.id()));

    assert_eq!(
        auth.authenticate_key(&HeaderMap::new(), ip(1)).await,
        Err(AuthError::Missing)
    );
    let refused = auth.authenticate_key(&bearer("bogus"), ip(1)).await.unwrap_err();
    assert_eq!(refused.reason(), "malformed");
    let unknown = MintedKey::generate();
    assert_eq!(
        auth.authenticate_key(&bearer(unknown.token()), ip(1)).await,
        Err(AuthError::Unknown)
    );
    let mut wrong = acme.token().to_owned();
    let last = wrong.pop().unwrap();
    wrong.push(if last == 'a' { 'b' } else { 'a' });
    let refused = auth.authenticate_key(&bearer(&wrong), ip(1)).await.unwrap_err();
    assert_eq!(refused, AuthError::WrongSecret);
    assert!(
        !refused.to_string().contains(&wrong[20..]),
        "the secret is never echoed"
    );
}

#[tokio::test]
async fn open_mode_puts_everyone_in_the_default_tenant() {
    let keys = Keys::start().await;
    let auth = keys.authenticator(AuthConfig {
        mode: AuthMode::None,
        ..Default::default()
    });
    let principal = auth.authenticate_key(&HeaderMap::new(), ip(1)).await.unwrap();
    assert_eq!(principal.tenant, TenantId::default_tenant());
    assert_eq!(keys.lookups.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_guessing_flood_is_throttled_per_address_and_costs_no_lookups() {
    let keys = Keys::start().await;
    let auth = keys.authenticator(AuthConfig {
        failures_per_minute: 20,
        ..Default::default()
    });
    let mut throttled = 0;
    for _ in 0..200 {
        let guess = MintedKey::generate();
        if let Err(AuthError::Throttled(wait)) = auth.authenticate_key(&bearer(guess.token()), ip(66)).await {
            assert!(wait >= Duration::from_secs(1));
            throttled += 1;
        }
    }
    assert!(
        throttled >= 190,
        "the flood is cut off after its burst ({throttled} throttled)"
    );
    assert!(
        keys.lookups.load(Ordering::SeqCst) <= 10,
        "throttled guesses are not looked up ({} lookups)",
        keys.lookups.load(Ordering::SeqCst)
    );
    // A real agent elsewhere is not affected.
    let real = keys.mint("acme");
    assert!(auth.authenticate_key(&bearer(real.token()), ip(1)).await.is_ok());
}

#[tokio::test]
async fn many_arrivals_with_one_key_cost_one_lookup() {
    let keys = Keys::start().await;
    let auth = keys.authenticator(AuthConfig::default());
    let key = keys.mint("acme");
    let arrivals: Vec<_> = (0..100)
        .map(|i| {
            let (auth, token) = (auth.clone(), key.token().to_owned());
            tokio::spawn(async move { auth.authenticate_key(&bearer(&token), ip(i)).await })
        })
        .collect();
    for arrival in arrivals {
        assert!(arrival.await.unwrap().is_ok());
    }
    assert_eq!(keys.lookups.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn revoking_a_key_fires_its_connections_token_on_the_next_recheck() {
    let keys = Keys::start().await;
    let auth = keys.authenticator(AuthConfig {
        cache_ttl: Duration::ZERO,
        ..Default::default()
    });
    let key = keys.mint("acme");
    let other = keys.mint("acme");
    let principal = auth.authenticate_key(&bearer(key.token()), ip(1)).await.unwrap();
    let other_principal = auth.authenticate_key(&bearer(other.token()), ip(1)).await.unwrap();
    let watch = auth.watch(&principal).unwrap();
    let other_watch = auth.watch(&other_principal).unwrap();
    auth.recheck_watched().await;
    assert!(!watch.revoked.is_cancelled());
    keys.revoke(key.id());
    auth.recheck_watched().await;
    assert!(watch.revoked.is_cancelled(), "the revoked key's connections are told");
    assert!(!other_watch.revoked.is_cancelled(), "other keys' connections are not");
    assert_eq!(
        auth.authenticate_key(&bearer(key.token()), ip(1)).await,
        Err(AuthError::Revoked)
    );
}

#[tokio::test]
async fn a_store_failure_is_unavailable_at_once_and_not_held_against_the_address() {
    let keys = Keys::start().await;
    let auth = keys.authenticator(AuthConfig {
        failures_per_minute: 5,
        ..Default::default()
    });
    let token = format!("fp_{BROKEN_STORE_ID}_{}", "0".repeat(64));
    for _ in 0..20 {
        let refused = auth.authenticate_key(&bearer(&token), ip(9)).await.unwrap_err();
        assert!(
            matches!(refused, AuthError::Unavailable(ref why) if why.contains("disk full")),
            "{refused:?}"
        );
    }
}
