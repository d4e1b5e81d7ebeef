//! Building error answers, which must carry nothing but the error (spec 4.A.8).

use std::time::Duration;

use crate::opamp::{
    RetryInfo, ServerErrorResponse, ServerErrorResponseType, ServerToAgent, server_error_response::Details,
};

/// A `ServerToAgent` carrying only `instance_uid` and an error. `retry_after`
/// becomes RetryInfo, which clients honour with `Unavailable`.
///
/// ```
/// # use std::time::Duration;
/// # use fleetplane_proto::{errors::error_reply, opamp::ServerErrorResponseType};
/// let reply = error_reply(&[1; 16], ServerErrorResponseType::Unavailable, "busy", Some(Duration::from_secs(3)));
/// assert!(reply.remote_config.is_none() && reply.capabilities == 0);
/// ```
pub fn error_reply(
    uid: &[u8],
    kind: ServerErrorResponseType,
    message: impl Into<String>,
    retry_after: Option<Duration>,
) -> ServerToAgent {
    ServerToAgent {
        instance_uid: uid.to_vec(),
        error_response: Some(ServerErrorResponse {
            r#type: kind as i32,
            error_message: message.into(),
            details: retry_after.map(|wait| {
                Details::RetryInfo(RetryInfo {
                    retry_after_nanoseconds: u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX),
                })
            }),
        }),
        ..Default::default()
    }
}
