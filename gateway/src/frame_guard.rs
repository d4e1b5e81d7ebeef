//! Memory that grows with the bytes a client sends, not with the bytes its
//! frame header promises.
//!
//! tungstenite reserves a frame's whole declared length as soon as it has
//! parsed the header. A client could send a 14-byte header declaring 64 MiB,
//! then 16 KiB, then nothing: about 2.2 MiB resident per socket (the
//! allocator backs a reservation that size with a huge page), so a few
//! thousand cheap sockets could exhaust a gateway.
//!
//! [`FrameGuard`] sits between the socket and tungstenite and reads the
//! client's frame headers as they pass. Frames up to `threshold` bytes pass
//! straight through (tungstenite reserves at most that much). A larger frame
//! is held back here, header included, in a buffer that grows as its bytes
//! actually arrive, and handed to tungstenite only once it is complete. A frame
//! over `max_frame` passes at once, so that tungstenite refuses it with close
//! code 1009 without waiting for its body.
//!
//! Writes pass through untouched.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Where the scanner is in the client's byte stream.
#[derive(Debug, Clone, Copy)]
enum Scan {
    /// Inside a frame header; `have` of its bytes seen so far.
    Header { bytes: [u8; 14], have: usize },
    /// Inside a frame's payload that passes through; this many bytes left.
    Payload(u64),
}

const HEADER_START: Scan = Scan::Header {
    bytes: [0; 14],
    have: 0,
};

/// A large frame being held back until it is complete.
#[derive(Debug)]
struct Held {
    /// Header bytes not yet passed on, then the payload received so far.
    data: Vec<u8>,
    /// Length `data` will have when the frame is complete.
    total: usize,
    /// Bytes of `data` already handed to the reader once complete.
    handed: usize,
}

/// See the module docs.
#[derive(Debug)]
pub struct FrameGuard<S> {
    inner: S,
    scan: Scan,
    held: Option<Held>,
    threshold: usize,
    max_frame: usize,
}

impl<S> FrameGuard<S> {
    /// Guards `inner`: frames over `threshold` bytes are held until complete;
    /// frames over `max_frame` pass at once (to be refused downstream).
    pub fn new(inner: S, threshold: usize, max_frame: usize) -> Self {
        Self {
            inner,
            scan: HEADER_START,
            held: None,
            threshold,
            max_frame,
        }
    }
}

/// Header length once its first two bytes are known (RFC 6455 5.2).
fn header_len(b0_b1: [u8; 2]) -> usize {
    let masked = b0_b1[1] & 0x80 != 0;
    let ext = match b0_b1[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if masked { 4 } else { 0 }
}

/// Payload length of a complete header.
fn payload_len(header: &[u8]) -> u64 {
    match header[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
        127 => {
            let mut be = [0u8; 8];
            be.copy_from_slice(&header[2..10]);
            u64::from_be_bytes(be)
        }
        n => u64::from(n),
    }
}

impl<S> FrameGuard<S> {
    /// Scans `bytes` (just read, about to be passed on). Returns the offset
    /// from which bytes must be held back instead (a large frame started and
    /// is not complete in `bytes`), with the held frame's total size counted
    /// from that offset; everything from that offset to the end of `bytes`
    /// belongs to the held frame.
    fn scan(&mut self, bytes: &[u8]) -> Option<(usize, usize)> {
        let mut pos = 0;
        // Where the header being parsed began within `bytes` (0 if it began
        // in an earlier read: those bytes are already passed on, which is
        // harmless, since tungstenite reserves only once a header is whole).
        let mut header_from = 0;
        while pos < bytes.len() {
            match &mut self.scan {
                Scan::Payload(left) => {
                    let take = (*left).min((bytes.len() - pos) as u64);
                    *left -= take;
                    pos += take as usize;
                    if *left == 0 {
                        self.scan = HEADER_START;
                        header_from = pos;
                    }
                }
                Scan::Header { bytes: header, have } => {
                    header[*have] = bytes[pos];
                    *have += 1;
                    pos += 1;
                    if *have < 2 || *have < header_len([header[0], header[1]]) {
                        continue;
                    }
                    let len = payload_len(&header[..*have]);
                    let held_header = pos - header_from;
                    // Held only while incomplete: a frame already wholly
                    // in this read costs nothing more to pass on.
                    let incomplete = len > (bytes.len() - pos) as u64;
                    if len > self.threshold as u64 && len <= self.max_frame as u64 && incomplete {
                        self.scan = HEADER_START;
                        return Some((header_from, held_header + len as usize));
                    }
                    self.scan = if len == 0 { HEADER_START } else { Scan::Payload(len) };
                    header_from = pos;
                }
            }
        }
        None
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameGuard<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            // A complete held frame: hand it on, then resume scanning.
            if let Some(held) = this.held.as_mut().filter(|h| h.data.len() == h.total) {
                let n = (held.total - held.handed).min(buf.remaining());
                buf.put_slice(&held.data[held.handed..held.handed + n]);
                held.handed += n;
                if held.handed == held.total {
                    this.held = None;
                }
                return Poll::Ready(Ok(()));
            }
            // A frame being held: read only its own bytes, into the hold.
            if let Some(held) = this.held.as_mut() {
                let want = held.total - held.data.len();
                let mut chunk = [0u8; 16 * 1024];
                let limit = want.min(chunk.len());
                let mut read = ReadBuf::new(&mut chunk[..limit]);
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
                if read.filled().is_empty() {
                    // End of stream inside a frame: pass the end on.
                    this.held = None;
                    return Poll::Ready(Ok(()));
                }
                held.data.extend_from_slice(read.filled());
                continue;
            }
            let start = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            let end = buf.filled().len();
            if end == start {
                return Poll::Ready(Ok(()));
            }
            let Some((from, total)) = this.scan(&buf.filled()[start..end]) else {
                return Poll::Ready(Ok(()));
            };
            let cut = start + from;
            let tail = buf.filled()[cut..end].to_vec();
            buf.set_filled(cut);
            let mut data = Vec::with_capacity(tail.len().max(1024).min(total));
            data.extend_from_slice(&tail);
            this.held = Some(Held { data, total, handed: 0 });
            if cut > start {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameGuard<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests;
