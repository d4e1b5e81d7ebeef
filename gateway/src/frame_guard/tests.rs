use futures_util::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

use super::*;

/// A masked client frame with `payload`.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0x82];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&[1, 2, 3, 4]);
    out.extend_from_slice(payload);
    out
}

/// Reads whatever is available now, without waiting.
fn read_now<S: AsyncRead + Unpin>(guard: &mut FrameGuard<S>) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut chunk = [0u8; 700];
        match guard.read(&mut chunk).now_or_never() {
            Some(Ok(0)) | None => return out,
            Some(Ok(n)) => out.extend_from_slice(&chunk[..n]),
            Some(Err(e)) => panic!("read failed: {e}"),
        }
    }
}

#[tokio::test]
async fn small_frames_pass_unchanged_whatever_the_chunking() {
    let mut stream = Vec::new();
    for len in [0, 1, 125, 126, 300, 65_535, 65_536, 70_000] {
        stream.extend(frame(&vec![len as u8; len]));
    }
    for chunk in [1, 3, 13, 1000, 100_000] {
        let (mut client, server) = duplex(1 << 20);
        let mut guard = FrameGuard::new(server, 100_000, 1 << 20);
        for piece in stream.chunks(chunk) {
            client.write_all(piece).await.unwrap();
        }
        drop(client);
        let mut out = Vec::new();
        guard.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, stream, "chunk size {chunk}");
    }
}

#[tokio::test]
async fn a_large_frame_is_held_until_its_bytes_arrive() {
    let small = frame(b"hello");
    let large = frame(&vec![7u8; 5_000]);
    let (mut client, server) = duplex(1 << 20);
    let mut guard = FrameGuard::new(server, 1_000, 1 << 20);
    // The small frame, then the large frame's header and a tenth of it.
    client.write_all(&small).await.unwrap();
    client.write_all(&large[..500]).await.unwrap();
    let got = read_now(&mut guard);
    assert_eq!(got, small, "only the small frame passes; the large header is held");
    client.write_all(&large[500..4_000]).await.unwrap();
    assert!(read_now(&mut guard).is_empty(), "still incomplete, nothing passes");
    client.write_all(&large[4_000..]).await.unwrap();
    client.write_all(&small).await.unwrap();
    drop(client);
    let mut rest = Vec::new();
    guard.read_to_end(&mut rest).await.unwrap();
    let mut expected = large.clone();
    expected.extend_from_slice(&small);
    assert_eq!(rest, expected);
}

#[tokio::test]
async fn a_frame_over_the_limit_passes_at_once_to_be_refused() {
    let (mut client, server) = duplex(1 << 20);
    let mut guard = FrameGuard::new(server, 1_000, 10_000);
    let header = &frame(&vec![0u8; 20_000])[..14];
    client.write_all(header).await.unwrap();
    assert_eq!(read_now(&mut guard), header);
}

#[tokio::test]
async fn a_promise_costs_only_what_was_sent() {
    // 64 MiB declared, 16 KiB sent: the hold grows with the 16 KiB.
    let (mut client, server) = duplex(1 << 20);
    let mut guard = FrameGuard::new(server, 64 * 1024, 64 << 20);
    let mut bytes = vec![0x82, 0x80 | 127];
    bytes.extend_from_slice(&(64u64 << 20).to_be_bytes());
    bytes.extend_from_slice(&[0; 4]);
    bytes.extend(vec![0u8; 16 * 1024]);
    client.write_all(&bytes).await.unwrap();
    assert!(read_now(&mut guard).is_empty());
    let held = guard.held.as_ref().expect("frame held");
    assert_eq!(held.data.len(), bytes.len());
    assert!(held.data.capacity() <= 64 * 1024, "capacity {}", held.data.capacity());
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Whatever the frames (some over the threshold, some empty) and
        /// however the bytes are cut, the guard passes exactly what came in.
        #[test]
        fn the_byte_stream_is_unchanged(
            lengths in proptest::collection::vec(prop_oneof![0usize..200, 900usize..3000], 1..12),
            chunk in 1usize..700,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let mut stream = Vec::new();
            for (i, len) in lengths.iter().enumerate() {
                stream.extend(frame(&vec![i as u8; *len]));
            }
            let out = runtime.block_on(async {
                let (mut client, server) = duplex(1 << 16);
                let mut guard = FrameGuard::new(server, 1000, 1 << 20);
                let input = stream.clone();
                let writer = async move {
                    for piece in input.chunks(chunk) {
                        client.write_all(piece).await.unwrap();
                    }
                    drop(client);
                };
                let reader = async {
                    let mut out = Vec::new();
                    guard.read_to_end(&mut out).await.unwrap();
                    out
                };
                tokio::join!(writer, reader).1
            });
            prop_assert_eq!(out, stream);
        }
    }
}
