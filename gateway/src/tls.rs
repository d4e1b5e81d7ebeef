//! TLS for Fleetplane's listeners (rustls, ring), with the certificate and
//! key reloaded from disk without a restart.
//!
//! [`ReloadingCert`] resolves every handshake to the certificate it holds in
//! an `ArcSwap`; [`ReloadingCert::watch`] checks the files' modification
//! times every `interval` and swaps in the new pair once it parses (a pair
//! that does not parse, or a key that does not match, is logged and the old
//! one kept). Handshakes in flight keep the pair they started with.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use fleetplane_proto::TenantId;
use rustls::{
    RootCertStore, ServerConfig,
    crypto::ring::sign::any_supported_type,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier, danger::ClientCertVerifier},
    sign::CertifiedKey,
};
use tokio_util::sync::CancellationToken;

/// Why a certificate and key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file is missing, unreadable, or holds no certificate.
    #[error("cannot read certificates from {path}: {reason}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The key file is missing, unreadable, or holds no private key.
    #[error("cannot read a private key from {path}: {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The crypto provider refused the protocol versions (a build problem).
    #[error("TLS provider: {0}")]
    Provider(String),
    /// The key is of an unsupported type or does not match the certificate.
    #[error("the key in {path} cannot serve the certificate: {reason}")]
    Mismatch {
        /// The key file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Where a listener's certificate chain and key live (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

fn load(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| TlsError::Certificate {
            path: files.cert.clone(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Certificate {
            path: files.cert.clone(),
            reason: "no certificate in the file".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Key {
        path: files.key.clone(),
        reason: e.to_string(),
    })?;
    let signing = any_supported_type(&key).map_err(|e| TlsError::Mismatch {
        path: files.key.clone(),
        reason: e.to_string(),
    })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| TlsError::Mismatch {
        path: files.key.clone(),
        reason: e.to_string(),
    })?;
    Ok(certified)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The certificate every handshake gets, replaced when the files change.
#[derive(Debug)]
pub struct ReloadingCert {
    files: TlsFiles,
    current: ArcSwap<CertifiedKey>,
    /// Modification times of (cert, key) when last loaded.
    loaded: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

impl ReloadingCert {
    /// Loads `files` now; fails if they cannot serve.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let stamps = (modified(&files.cert), modified(&files.key));
        let certified = load(&files)?;
        Ok(Arc::new(Self {
            files,
            current: ArcSwap::from_pointee(certified),
            loaded: Mutex::new(stamps),
        }))
    }

    /// A rustls server configuration resolving to this certificate,
    /// speaking HTTP/1.1 (WebSocket upgrades included), TLS 1.2 and 1.3.
    /// With `clients`, a client certificate issued by one of their CAs is
    /// asked for (and optional: API keys still work).
    pub fn server_config(self: &Arc<Self>, clients: Option<&ClientTenants>) -> Result<Arc<ServerConfig>, TlsError> {
        let builder = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Provider(e.to_string()))?;
        let builder = match clients {
            Some(clients) => builder.with_client_cert_verifier(clients.any.clone()),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Reloads if either file changed since the last load. Returns whether
    /// a new pair is now served.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let stamps = (modified(&self.files.cert), modified(&self.files.key));
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if *loaded == stamps {
            return Ok(false);
        }
        let certified = load(&self.files)?;
        self.current.store(Arc::new(certified));
        *loaded = stamps;
        Ok(true)
    }

    /// Checks the files every `interval` until `stop`.
    pub async fn watch(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            match self.reload_if_changed() {
                Ok(true) => tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded"),
                Ok(false) => {}
                // Keep serving the old pair; a half-written file is retried
                // on the next tick.
                Err(e) => tracing::warn!(error = %e, "TLS certificate not reloaded; the previous one is still served"),
            }
        }
    }
}

/// Agents identified by client certificates (mutual TLS): each tenant has a
/// CA of its own, and an agent's certificate belongs to the tenant whose CA
/// issued it. Decided once per connection, after the handshake.
#[derive(Clone)]
pub struct ClientTenants {
    tenants: Vec<(TenantId, Arc<dyn ClientCertVerifier>)>,
    /// Accepts a certificate of any tenant's CA, or none.
    any: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for ClientTenants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.tenants.iter().map(|(t, _)| t)).finish()
    }
}

fn roots(paths: &[&Path]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for path in paths {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<_, _>>())
            .map_err(|e| TlsError::Certificate {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        for cert in certs {
            roots.add(cert).map_err(|e| TlsError::Certificate {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        }
    }
    if roots.is_empty() {
        return Err(TlsError::Certificate {
            path: paths.first().map(|p| p.to_path_buf()).unwrap_or_default(),
            reason: "no CA certificate".into(),
        });
    }
    Ok(roots)
}

fn verifier(roots: RootCertStore, optional: bool) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let builder = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    );
    let builder = if optional {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    builder.build().map_err(|e| TlsError::Provider(e.to_string()))
}

impl ClientTenants {
    /// One CA file (PEM) per tenant.
    pub fn load(cas: &[(TenantId, PathBuf)]) -> Result<Self, TlsError> {
        let mut tenants = Vec::with_capacity(cas.len());
        for (tenant, path) in cas {
            tenants.push((tenant.clone(), verifier(roots(&[path])?, false)?));
        }
        let all: Vec<&Path> = cas.iter().map(|(_, p)| p.as_path()).collect();
        Ok(Self {
            tenants,
            any: verifier(roots(&all)?, true)?,
        })
    }

    /// The tenant whose CA issued `chain` (leaf first), if any.
    pub fn tenant_of(&self, chain: &[CertificateDer<'static>]) -> Option<TenantId> {
        let (leaf, intermediates) = chain.split_first()?;
        let now = UnixTime::now();
        self.tenants
            .iter()
            .find(|(_, verifier)| verifier.verify_client_cert(leaf, intermediates, now).is_ok())
            .map(|(tenant, _)| tenant.clone())
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}
