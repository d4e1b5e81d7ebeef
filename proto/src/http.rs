//! Constants of OpAMP's transports (spec section 3).

/// Default URL path for both transports.
pub const OPAMP_PATH: &str = "/v1/opamp";
/// Default port that OpAMP servers SHOULD listen on.
pub const DEFAULT_PORT: u16 = 4320;
/// The content type that marks a plain-HTTP OpAMP request (anything else on
/// the OpAMP path is treated as a WebSocket upgrade).
pub const CONTENT_TYPE_PROTOBUF: &str = "application/x-protobuf";
/// Request header carrying the uid in canonical UUID text, for load balancers
/// and early rejection.
pub const HEADER_INSTANCE_UID: &str = "OpAMP-Instance-UID";
/// Spec-recommended inbound size limit, counted after decompression.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// WebSocket close code for an oversized message (RFC 6455 "message too big").
pub const WS_CLOSE_TOO_BIG: u16 = 1009;
