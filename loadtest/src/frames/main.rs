//! `fleetplane-frame-memory`: what a socket that promises a huge WebSocket
//! frame and sends a few KiB costs a gateway.
//!
//! Starts the all-in-one `fleetplane` (release build next to this binary),
//! opens `--sockets` WebSockets (default 1,000), and on each sends a frame
//! header declaring the largest allowed frame (64 MiB) followed by
//! `--payload-kib` KiB (default 4) of it, then nothing. Prints the server's
//! resident memory before and after, per socket. The target (issue 12): at
//! most 64 KiB per socket.
//!
//! ```text
//! cargo build --release --bin fleetplane --bin fleetplane-frame-memory
//! target/release/fleetplane-frame-memory --sockets 1000 --payload-kib 4
//! ```

// Wall-clock waits are the measurement's own; only the RSS reader is used.
#![allow(clippy::disallowed_types, dead_code)]

#[path = "../bench/procfs.rs"]
mod procfs;

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use fleetplane_testkit::fleet::NodeProcess;
use tokio::io::AsyncWriteExt;

struct Settings {
    sockets: usize,
    payload_kib: usize,
    bin_dir: PathBuf,
}

fn settings() -> anyhow::Result<Settings> {
    let mut settings = Settings {
        sockets: 1000,
        payload_kib: 4,
        bin_dir: std::env::current_exe()?.parent().context("binary dir")?.to_owned(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--sockets" => settings.sockets = value()?.parse()?,
            "--payload-kib" => settings.payload_kib = value()?.parse()?,
            "--bin-dir" => settings.bin_dir = PathBuf::from(value()?),
            other => bail!("unknown argument {other:?} (--sockets N, --payload-kib N, --bin-dir DIR)"),
        }
    }
    Ok(settings)
}

/// A WebSocket upgrade request, answered before the frame goes out.
async fn upgraded(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpStream> {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!(
                "GET /v1/opamp HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            bail!("closed during the handshake");
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        bail!("upgrade refused: {}", String::from_utf8_lossy(&head));
    }
    Ok(stream)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = settings()?;
    let data = tempfile::tempdir()?;
    let env = [
        ("FLEETPLANE_DATA_DIR", data.path().display().to_string()),
        ("FLEETPLANE_OPAMP_LISTEN", "127.0.0.1:0".to_owned()),
        ("FLEETPLANE_ADMIN_LISTEN", "127.0.0.1:0".to_owned()),
        ("FLEETPLANE_GATEWAY_DRAIN_MS", "0".to_owned()),
        ("FLEETPLANE_AGENTS_AUTH", "none".to_owned()),
        // Only the memory is measured: no deadline may close the sockets.
        ("FLEETPLANE_GATEWAY_FIRST_MESSAGE_TIMEOUT_SECS", "0".to_owned()),
        ("FLEETPLANE_GATEWAY_CONNECTIONS_PER_SECOND", "0".to_owned()),
    ]
    .map(|(k, v)| (k.to_owned(), v))
    .to_vec();
    let node = NodeProcess::spawn(&settings.bin_dir.join("fleetplane"), "all-in-one", env).await?;
    let pid = node.pid().context("server pid")?;
    let addr = node.opamp.context("no OpAMP address")?;
    // Let the process settle after start-up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = procfs::rss_kib(pid);
    let mut header = vec![0x82u8, 0x80 | 127];
    header.extend_from_slice(&(64u64 << 20).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    let payload = vec![0x5au8; settings.payload_kib * 1024];
    let mut sockets = Vec::with_capacity(settings.sockets);
    for _ in 0..settings.sockets {
        let mut stream = upgraded(addr).await?;
        stream.write_all(&header).await?;
        stream.write_all(&payload).await?;
        sockets.push(stream);
    }
    // Give the server time to read what was sent (it cannot answer: the
    // frames never complete).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = procfs::rss_kib(pid);
    let per_socket = (after.saturating_sub(before)) as f64 / settings.sockets as f64;
    println!(
        "{} sockets, each a header declaring 64 MiB and {} KiB of payload: server RSS {} KiB -> {} KiB, {:.1} KiB per socket (target <= 64)",
        settings.sockets, settings.payload_kib, before, after, per_socket
    );
    drop(sockets);
    Ok(())
}
