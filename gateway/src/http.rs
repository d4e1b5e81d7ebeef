//! The OpAMP endpoint: dispatch on content type, and the plain-HTTP transport.
//!
//! Plain HTTP (spec 3.3): `POST` with an `AgentToServer` body, optionally
//! gzipped; the answer is one `ServerToAgent`, gzipped when the client accepts
//! it. Status codes: 200 for every processed message, protocol errors included
//! (they travel in `error_response`); 413 for a body over the limit after
//! decompression; 415 for a wrong content type or encoding; 503 with a jittered
//! `Retry-After` when no coordinator answers.

use std::{io::Read, net::IpAddr, sync::Arc};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use flate2::{Compression, read::GzDecoder, write::GzEncoder};
use fleetplane_proto::{
    InstanceUid, Link, Message,
    errors::error_reply,
    framing,
    http::{CONTENT_TYPE_PROTOBUF, HEADER_INSTANCE_UID},
    opamp::{AgentToServer, ServerErrorResponseType, ServerToAgent},
    retry,
};

use tracing::Instrument;

use crate::{
    Shared,
    admission::Refused,
    auth::{AuthError, Principal},
    listener::ConnectionSlot,
    metrics::message_kind,
    validate, ws,
};

/// Responses smaller than this are not worth gzipping.
const GZIP_MIN_BYTES: usize = 1024;

/// Gzip work on more bytes than this runs off the async runtime.
const INLINE_GZIP_BYTES: usize = 16 * 1024;

/// `/v1/opamp`: plain HTTP when the body is protobuf, else a WebSocket upgrade.
pub(crate) async fn opamp(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    // Who is asking, before anything else is read or upgraded.
    let slot = request.extensions().get::<ConnectionSlot>();
    let peer = slot.map_or(IpAddr::from([0, 0, 0, 0]), |slot| slot.peer.ip());
    let chain = slot.and_then(|slot| slot.client_chain.clone());
    let principal = match shared
        .auth
        .authenticate(request.headers(), peer, chain.as_deref())
        .await
    {
        Ok(principal) => principal,
        Err(refused) => return unauthorized(&shared, refused),
    };
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase());
    if content_type.as_deref() == Some(CONTENT_TYPE_PROTOBUF) {
        if request.method() != Method::POST {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "plain-HTTP OpAMP uses POST");
        }
        return handle_post(shared, request, principal).await;
    }
    if request.method() == Method::POST {
        shared.metrics.decode_error("http", "wrong_content_type");
        return plain(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "content type {:?} is not OpAMP: plain-HTTP agents must send {CONTENT_TYPE_PROTOBUF}",
                content_type.unwrap_or_default()
            ),
        );
    }
    let host = host(request.headers());
    let key = match ws::check_upgrade(&request) {
        Ok(key) => key,
        Err(refusal) => {
            shared.metrics.decode_error("http", "not_an_upgrade");
            return refusal.into_response();
        }
    };
    match shared.admission.admit_connection(&principal.tenant) {
        Ok(permit) => ws::upgrade(shared, request, key, host, permit, principal),
        Err(refused) => shed(&shared, StatusCode::SERVICE_UNAVAILABLE, refused, "websocket"),
    }
}

/// Refuses credentials: 401 (429 when the address is throttled, 503 when
/// they cannot be checked) with a jittered `Retry-After`, counted by reason.
/// The answer never repeats what was presented.
fn unauthorized(shared: &Shared, refused: AuthError) -> Response {
    shared.metrics.auth_refused(refused.reason());
    tracing::debug!(reason = refused.reason(), "agent credentials refused");
    let (status, wait) = match &refused {
        AuthError::Throttled(wait) => (StatusCode::TOO_MANY_REQUESTS, *wait),
        AuthError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, shared.config.retry_after),
        _ => (StatusCode::UNAUTHORIZED, shared.config.retry_after),
    };
    let mut response = plain(status, refused.to_string());
    let seconds = retry::spread(wait, 1.0).as_secs_f64().ceil().max(1.0) as u64;
    if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

/// Refuses with a status and a jittered `Retry-After`, and counts it.
fn shed(shared: &Shared, status: StatusCode, refused: Refused, transport: &'static str) -> Response {
    shared.metrics.admission("shed", refused.limit.reason());
    tracing::debug!(transport, limit = refused.limit.reason(), "shed");
    let mut response = plain(
        status,
        format!("over the {} limit; retry later", refused.limit.reason()),
    );
    let seconds = refused.retry_after.as_secs_f64().ceil().max(1.0) as u64;
    if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

fn host(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn plain(status: StatusCode, text: impl Into<String>) -> Response {
    (status, text.into()).into_response()
}

/// Why a plain-HTTP body could not be read.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("request body exceeds the limit of {0} bytes")]
    TooLarge(usize),
    #[error("content encoding {0:?} is not supported (use gzip or none)")]
    Encoding(String),
    #[error("request body is not valid gzip: {0}")]
    Gzip(std::io::Error),
    #[error("could not read the request body: {0}")]
    Read(String),
}

impl BodyError {
    /// Short label for the decode-error metric.
    fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge(_) => "too_large",
            Self::Encoding(_) => "unsupported_encoding",
            Self::Gzip(_) => "bad_gzip",
            Self::Read(_) => "read_failed",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Encoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Gzip(_) | Self::Read(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// Reads and (if gzipped) inflates the body, never beyond `limit` bytes.
async fn read_body(request: Request, limit: usize) -> Result<Vec<u8>, BodyError> {
    let encoding = request
        .headers()
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let raw = axum::body::to_bytes(request.into_body(), limit).await.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.to_string().contains("length limit")) {
            BodyError::TooLarge(limit)
        } else {
            BodyError::Read(e.to_string())
        }
    })?;
    match encoding.as_str() {
        "" | "identity" => Ok(raw.to_vec()),
        "gzip" | "x-gzip" => {
            let compressed = raw.len();
            let inflate = move || {
                let mut inflated = Vec::new();
                // Read one byte past the limit to tell "exactly at" from "over".
                GzDecoder::new(raw.as_ref())
                    .take(limit as u64 + 1)
                    .read_to_end(&mut inflated)
                    .map_err(BodyError::Gzip)?;
                if inflated.len() > limit {
                    return Err(BodyError::TooLarge(limit));
                }
                Ok(inflated)
            };
            // A small body inflates faster than a thread hop; a large one
            // (up to a limit-sized bomb) must not hold a runtime worker.
            if compressed <= INLINE_GZIP_BYTES {
                inflate()
            } else {
                tokio::task::spawn_blocking(inflate)
                    .await
                    .map_err(|e| BodyError::Read(e.to_string()))?
            }
        }
        other => Err(BodyError::Encoding(other.to_owned())),
    }
}

async fn handle_post(shared: Arc<Shared>, request: Request, principal: Principal) -> Response {
    let accepts_gzip = request
        .headers()
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|e| e.trim().starts_with("gzip")));
    let header_uid = request
        .headers()
        .get(HEADER_INSTANCE_UID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let endpoint = shared.endpoint("http", host(request.headers()).as_deref());
    let limit = shared.config.max_message_bytes;
    let metrics = &shared.metrics;
    let body = match read_body(request, limit).await {
        Ok(body) => body,
        Err(e) => {
            metrics.decode_error("http", e.reason());
            return plain(e.status(), e.to_string());
        }
    };
    let message: AgentToServer = match framing::decode(&body, limit) {
        Ok(message) => message,
        Err(e) => {
            metrics.decode_error("http", "malformed");
            return protobuf(&bad_request(&[], e.to_string()), accepts_gzip);
        }
    };
    let uid = match validate(&message) {
        Ok(uid) => uid,
        Err(e) => {
            metrics.decode_error("http", "bad_instance_uid");
            return protobuf(&bad_request(&message.instance_uid, e), accepts_gzip);
        }
    };
    if let Err(refused) = shared.admission.admit_message(&uid) {
        return shed(&shared, StatusCode::TOO_MANY_REQUESTS, refused, "http");
    }
    metrics.message_in("http", message_kind(&message));
    let span = tracing::info_span!(
        "opamp.message",
        otel.kind = "server",
        transport = "http",
        instance_uid = %uid,
        sequence_num = message.sequence_num,
    );
    answer(&shared, &principal, uid, message, header_uid, &endpoint, accepts_gzip)
        .instrument(span)
        .await
}

/// Checks the uid header and hands the message to a coordinator.
async fn answer(
    shared: &Shared,
    principal: &Principal,
    uid: InstanceUid,
    message: AgentToServer,
    header_uid: Option<String>,
    endpoint: &str,
    accepts_gzip: bool,
) -> Response {
    if let Some(text) = header_uid {
        match InstanceUid::parse(&text) {
            Ok(from_header) if from_header == uid => {}
            _ => {
                let e = format!("{HEADER_INSTANCE_UID} header {text:?} does not match the body's instance_uid {uid}");
                shared.metrics.decode_error("http", "instance_uid_mismatch");
                return protobuf(&bad_request(uid.as_bytes(), e), accepts_gzip);
            }
        }
    }
    let _pending = match shared.admission.admit_report() {
        Ok(permit) => permit,
        Err(refused) => return shed(shared, StatusCode::SERVICE_UNAVAILABLE, refused, "http"),
    };
    let mut report = shared.envelope(
        &principal.tenant,
        uid,
        message,
        Link::Http,
        endpoint,
        principal.report_identity(),
    );
    report.other_live_connection = shared.registry.other_holder(&principal.tenant, &uid, None);
    match shared.ask(report).await {
        Ok(reply) => {
            shared.metrics.message_out("http", "reply");
            if accepts_gzip && reply.encoded_len() > INLINE_GZIP_BYTES {
                tokio::task::spawn_blocking(move || protobuf(&reply, true))
                    .await
                    .unwrap_or_else(|e| plain(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
            } else {
                protobuf(&reply, accepts_gzip)
            }
        }
        Err(e) => {
            tracing::debug!(%uid, error = %e, "no coordinator answer for an http agent");
            shared.unanswered.note(
                "agents told to retry: no coordinator answered (count since the last such line)",
                &e,
            );
            let wait = retry::spread(shared.config.retry_after, 1.0);
            let mut response = plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("control plane unavailable: {e}"),
            );
            if let Ok(value) = HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            response
        }
    }
}

pub(crate) fn bad_request(uid: &[u8], message: String) -> ServerToAgent {
    error_reply(uid, ServerErrorResponseType::BadRequest, message, None)
}

fn protobuf(message: &ServerToAgent, gzip: bool) -> Response {
    let bytes = message.encode_to_vec();
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, CONTENT_TYPE_PROTOBUF);
    let body = if gzip && bytes.len() >= GZIP_MIN_BYTES {
        let mut encoder = GzEncoder::new(Vec::with_capacity(bytes.len() / 2), Compression::fast());
        match std::io::Write::write_all(&mut encoder, &bytes).and_then(|()| encoder.finish()) {
            Ok(compressed) => {
                builder = builder.header(header::CONTENT_ENCODING, "gzip");
                compressed
            }
            Err(_) => bytes,
        }
    } else {
        bytes
    };
    builder
        .body(Body::from(body))
        .unwrap_or_else(|e| plain(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}
