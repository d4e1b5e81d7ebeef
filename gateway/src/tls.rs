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
use rustls::{
    ServerConfig,
    crypto::ring::sign::any_supported_type,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
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
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Provider(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
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

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}
