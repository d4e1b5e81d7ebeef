//! Size-limited decoding for both transports, and the WebSocket framing.
//!
//! On WebSocket every binary message is a header (a protobuf varint, which must
//! be 0 in this version of OpAMP) followed by the protobuf-encoded message. A
//! frame of exactly `[0x00]` is a valid empty message. Like opamp-go, we also
//! accept legacy frames without the header: a protobuf message never starts with
//! a 0x00 byte (field number 0 is invalid), so the two cannot be confused.
//!
//! Over plain HTTP the body is the bare protobuf message; size limits apply
//! after decompression, which the transport does before calling [`decode`].

use prost::Message;

/// Why a frame or body could not be turned into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input is larger than the configured limit (counted after
    /// decompression, header included).
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size of the input in bytes.
        size: usize,
        /// The limit in force.
        limit: usize,
    },
    /// A WebSocket message with no bytes at all (not even the header).
    #[error("empty websocket frame: expected a 0x00 header")]
    EmptyFrame,
    /// The bytes are not a valid protobuf encoding of the expected message
    /// (truncated, wrong wire type, invalid field number, bad UTF-8 ...).
    #[error("malformed protobuf: {0}")]
    Malformed(String),
}

/// Decodes a bare protobuf message, refusing input over `limit` bytes.
///
/// ```
/// use fleetplane_proto::{framing, opamp::AgentToServer};
/// let err = framing::decode::<AgentToServer>(&[0x0a, 0x10, 0x01], 1024).unwrap_err();
/// assert!(err.to_string().starts_with("malformed protobuf"));
/// ```
pub fn decode<M: Message + Default>(bytes: &[u8], limit: usize) -> Result<M, DecodeError> {
    if bytes.len() > limit {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            limit,
        });
    }
    M::decode(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))
}

/// Decodes one WebSocket binary message: checks the size, strips the 0x00
/// header (or accepts a legacy headerless frame), then decodes the protobuf.
///
/// ```
/// use fleetplane_proto::{framing, opamp::AgentToServer};
/// let msg: AgentToServer = framing::decode_ws(&[0x00], 1024).unwrap();
/// assert_eq!(msg, AgentToServer::default());
/// ```
pub fn decode_ws<M: Message + Default>(frame: &[u8], limit: usize) -> Result<M, DecodeError> {
    if frame.len() > limit {
        return Err(DecodeError::TooLarge {
            size: frame.len(),
            limit,
        });
    }
    match frame.split_first() {
        None => Err(DecodeError::EmptyFrame),
        Some((0x00, payload)) => decode(payload, limit),
        // Legacy headerless frame: the whole frame is the protobuf message.
        Some(_) => decode(frame, limit),
    }
}

/// Encodes one WebSocket binary message: the 0x00 header, then the message.
///
/// ```
/// use fleetplane_proto::{framing, opamp::ServerToAgent};
/// let frame = framing::encode_ws(&ServerToAgent { capabilities: 1, ..Default::default() });
/// assert_eq!(frame, [0x00, 0x38, 0x01]);
/// ```
pub fn encode_ws<M: Message>(message: &M) -> Vec<u8> {
    let mut frame = Vec::with_capacity(1 + message.encoded_len());
    frame.push(0x00);
    // Cannot fail: a Vec grows as needed.
    let _ = message.encode(&mut frame);
    frame
}

#[cfg(test)]
mod tests;
