//! `GET /events`: the tenant's event stream as Server-Sent Events (see
//! [`crate::events`]).
//!
//! Each event is `id: <id>`, `event: <kind>`, `data: <json>`. A client that
//! reconnects with `Last-Event-ID` (or `?since=<id>`) resumes after that
//! event, from whichever coordinator replica it reaches; `since=0` starts
//! from the oldest event kept; neither starts with events from now on. A
//! client whose position was trimmed from the log gets `event: lagged` and
//! the stream ends: it must re-read state and start over.

use std::convert::Infallible;

use axum::{
    extract::{Query, State},
    http::HeaderMap,
    response::sse::{Event, KeepAlive, Sse},
};
use futures_util::{Stream, StreamExt};

use serde::Deserialize;

use super::{AdminState, ApiError, tenant};
use crate::events::{Next, Start, stream};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    /// Resume after this event id; `0`: from the oldest kept.
    since: Option<String>,
}

pub(super) async fn events(
    State(state): State<AdminState>,
    Query(query): Query<EventsQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let header = headers
        .get("last-event-id")
        .map(|v| v.to_str().map(|s| s.trim().to_owned()))
        .transpose()
        .map_err(|_| ApiError::bad_request("Last-Event-ID is not text"))?;
    let since = header.or(query.since).filter(|s| !s.is_empty());
    // `0`: everything kept; otherwise an id the stream gave out.
    let start = match since {
        Some(id) if id == "0" => Start::Oldest,
        Some(id) => {
            if crate::store::parse_event_id(&id).is_none() {
                return Err(ApiError::bad_request(format!(
                    "{id:?} is not an event id (<unix_ms>-<sequence>, or 0)"
                )));
            }
            Start::After(id)
        }
        None => Start::Now,
    };
    let coordinator = &state.coordinator;
    let source = stream(
        coordinator.store().clone(),
        coordinator.events(),
        tenant(),
        start,
        coordinator.stopping(),
    );
    let sse = source.map(|next| {
        Ok(match next {
            Next::Event(event) => Event::default()
                .id(event.id.clone())
                .event(event.kind.clone())
                .json_data(serde_json::json!({
                    "id": event.id,
                    "unix_ms": event.unix_ms,
                    "kind": event.kind,
                    "subject": event.subject,
                    "message": event.message,
                    "fields": event.fields,
                }))
                .unwrap_or_else(|_| Event::default().comment("unencodable event")),
            Next::Lagged => Event::default()
                .event("lagged")
                .data("{\"error\":\"this reader fell behind and events were trimmed; re-read state and reconnect without Last-Event-ID\"}"),
        })
    });
    Ok(Sse::new(sse).keep_alive(KeepAlive::default()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LogQuery {
    /// Only events about this agent uid or rollout id.
    subject: Option<String>,
    /// Only this kind (`agent.config_status`, `rollout`, ...).
    kind: Option<String>,
    /// Most events returned, newest last (default 100, at most 1,000).
    limit: Option<usize>,
}

/// `GET /event-log`: the newest kept events as one JSON array (oldest
/// first), for pages that show a history rather than follow the stream.
pub(super) async fn log(
    State(state): State<AdminState>,
    Query(query): Query<LogQuery>,
) -> Result<axum::Json<Vec<serde_json::Value>>, ApiError> {
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let store = state.coordinator.store();
    let tenant = tenant();
    let mut matching = std::collections::VecDeque::new();
    let mut after: Option<String> = None;
    // Walk the kept log page by page (it is capped), keeping the newest matches.
    loop {
        let page = store.events_after(&tenant, after.as_deref(), 1000).await?;
        if page.lagged {
            // Trimmed under our feet: start over from the oldest kept.
            after = None;
            matching.clear();
            continue;
        }
        let Some(last) = page.events.last() else { break };
        after = Some(last.id.clone());
        let full = page.events.len() < 1000;
        for event in page.events {
            let wanted = query.subject.as_ref().is_none_or(|s| *s == event.subject)
                && query.kind.as_ref().is_none_or(|k| *k == event.kind);
            if wanted {
                if matching.len() == limit {
                    matching.pop_front();
                }
                matching.push_back(serde_json::json!({
                    "id": event.id,
                    "unix_ms": event.unix_ms,
                    "kind": event.kind,
                    "subject": event.subject,
                    "message": event.message,
                    "fields": event.fields,
                }));
            }
        }
        if full {
            break;
        }
    }
    Ok(axum::Json(matching.into()))
}
