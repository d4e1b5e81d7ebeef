//! The accept loop every Fleetplane listener uses (OpAMP here; the server
//! binary reuses it for the admin and health ports).
//!
//! `axum::serve` gives no way to set hyper's timer, and without a timer hyper
//! drops its header-read timeout: a client sending one header byte a second
//! held a socket forever. Here each connection is served by hyper's HTTP/1
//! builder with a timer, and two bounds hold before any byte is parsed:
//!
//! - **a slot before accept**: at most `max_connections` sockets are open at
//!   once; when all slots are taken the loop stops accepting and new clients
//!   wait in the kernel's backlog instead of costing memory here. A slot lives
//!   as long as its socket, WebSocket sessions included ([`ConnectionSlot`]
//!   travels in the request's extensions so the session keeps it);
//! - **a header-read timeout**: a request whose headers are not complete
//!   within `header_read_timeout` is dropped.
//!
//! On shutdown the loop stops accepting, asks every HTTP connection to finish
//! its request in flight, and gives them `grace` before dropping them.
//! Upgraded WebSockets are not waited for here: their sessions drain on their
//! own schedule (see [`crate::ws`]).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, extract::Request};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower_service::Service;

/// Limits and transport of one listener.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Serve TLS with this configuration (see [`crate::tls`]); plain TCP
    /// when `None`. The handshake must finish within `header_read_timeout`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Open sockets at most; 0 = no cap.
    pub max_connections: usize,
    /// A request's headers must arrive within this.
    pub header_read_timeout: Duration,
    /// On shutdown, HTTP requests in flight get this long to finish.
    pub grace: Duration,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            tls: None,
            max_connections: 0,
            header_read_timeout: Duration::from_secs(10),
            grace: Duration::from_secs(5),
        }
    }
}

/// The accept slot a socket holds; shared by the HTTP connection and, after
/// an upgrade, the WebSocket session, and released when both are gone.
#[derive(Debug, Clone)]
pub struct ConnectionSlot {
    /// Who is on the other end.
    pub peer: SocketAddr,
    /// The client certificate chain presented in the TLS handshake, leaf
    /// first (mutual TLS), if any.
    pub client_chain: Option<Arc<[rustls::pki_types::CertificateDer<'static>]>>,
    _permit: Option<Arc<OwnedSemaphorePermit>>,
}

/// Backlog of the listening sockets: a reconnect storm arrives as thousands
/// of SYNs within a second, and with the usual 128 or 1024 the kernel drops
/// the rest and the clients wait out a 1 s SYN retry.
pub const LISTEN_BACKLOG: u32 = 8192;

/// Binds `addr` with [`LISTEN_BACKLOG`] and address reuse.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves one HTTP/1.1 connection (upgrades included) until it ends, or
/// until `shutdown`, after which the request in flight gets `grace`.
async fn serve_connection<I, S>(
    io: I,
    service: S,
    builder: &hyper::server::conn::http1::Builder,
    peer: SocketAddr,
    grace: Duration,
    shutdown: CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming> + Send,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as hyper::body::Body>::Data: Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connection = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            if tokio::time::timeout(grace, connection).await.is_err() {
                tracing::debug!(%peer, "connection cut off after the shutdown grace");
            }
        }
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets HTTP requests in
/// flight finish within `limits.grace`. Returns when every HTTP connection
/// has ended or been cut off.
pub async fn serve(listener: TcpListener, router: Router, limits: ListenerConfig, shutdown: CancellationToken) {
    let slots = (limits.max_connections > 0).then(|| Arc::new(Semaphore::new(limits.max_connections)));
    let connections = TaskTracker::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let builder = Arc::new(builder);
    loop {
        let permit = match &slots {
            Some(slots) => tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(permit) => Some(Arc::new(permit)),
                    Err(_) => break,
                },
            },
            None => None,
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of files or a connection reset before accept: back
                    // off briefly instead of spinning.
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        let grace = limits.grace;
        let tls = limits.tls.clone();
        let handshake_timeout = limits.header_read_timeout;
        connections.spawn(async move {
            let service = |client_chain| {
                let slot = ConnectionSlot {
                    peer,
                    client_chain,
                    _permit: permit,
                };
                hyper::service::service_fn(move |mut request: Request<Incoming>| {
                    request.extensions_mut().insert(slot.clone());
                    router.clone().call(request)
                })
            };
            match tls {
                None => serve_connection(TokioIo::new(stream), service(None), &builder, peer, grace, shutdown).await,
                Some(config) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let chain = stream.get_ref().1.peer_certificates().map(Arc::from);
                            serve_connection(TokioIo::new(stream), service(chain), &builder, peer, grace, shutdown)
                                .await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    connections.close();
    if tokio::time::timeout(limits.grace + Duration::from_secs(1), connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "HTTP connections still open after the grace period; dropped"
        );
    }
}
