//! A small client for the admin API, returning JSON values so that tests
//! assert on the documented shape, not on our own Rust types.

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// Admin API client.
#[derive(Debug, Clone)]
pub struct Admin {
    base: String,
    token: Option<String>,
    tenant: Option<String>,
    client: reqwest::Client,
}

impl Admin {
    /// A client for the admin API at `addr` (`127.0.0.1:4321`).
    pub fn new(addr: impl std::fmt::Display) -> Self {
        Self {
            base: format!("http://{addr}"),
            token: None,
            tenant: None,
            client: reqwest::Client::new(),
        }
    }

    /// `http://host:port`, the API's base URL.
    pub fn base_url(&self) -> String {
        self.base.clone()
    }

    /// Sends this bearer token with every request.
    #[must_use]
    pub fn with_token(mut self, token: &str) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Acts on `tenant` (the `Fleetplane-Tenant` header) in every request.
    #[must_use]
    pub fn for_tenant(mut self, tenant: &str) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// Creates an agent API key named `name` in this client's tenant; the
    /// key itself (`fp_<id>_<secret>`) and its id.
    pub async fn create_key(&self, name: &str) -> anyhow::Result<(String, String)> {
        let created = self
            .ok(reqwest::Method::POST, "/api/v1/keys", Some(json!({ "name": name })))
            .await?;
        let key = created["key"].as_str().context("no key in the answer")?.to_owned();
        let id = created["id"].as_str().context("no id in the answer")?.to_owned();
        Ok((key, id))
    }

    /// A raw request; returns the status and the JSON body (Null when empty).
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(tenant) = &self.tenant {
            request = request.header("fleetplane-tenant", tenant);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.with_context(|| format!("admin request {path}"))?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, value))
    }

    async fn ok(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let (status, value) = self.request(method, path, body).await?;
        if !(200..300).contains(&status) {
            bail!("{path}: HTTP {status}: {value}");
        }
        Ok(value)
    }

    /// Creates a config version with one file; returns the version JSON.
    pub async fn create_config(&self, name: &str, file: &str, body: &str, content_type: &str) -> anyhow::Result<Value> {
        let files = json!({ file: { "body": body, "content_type": content_type } });
        self.ok(
            reqwest::Method::POST,
            &format!("/api/v1/configs/{name}/versions"),
            Some(json!({ "files": files })),
        )
        .await
    }

    /// Assigns the latest version of `config` to agents matching `selector`.
    pub async fn assign(&self, name: &str, selector: &str, config: &str) -> anyhow::Result<Value> {
        self.ok(
            reqwest::Method::PUT,
            &format!("/api/v1/assignments/{name}"),
            Some(json!({ "selector": selector, "config": config })),
        )
        .await
    }

    /// Lists agents; `query` is a URL query string without `?` (may be empty).
    pub async fn agents(&self, query: &str) -> anyhow::Result<Vec<Value>> {
        let value = self
            .ok(reqwest::Method::GET, &format!("/api/v1/agents?{query}"), None)
            .await?;
        Ok(value.as_array().cloned().unwrap_or_default())
    }

    /// One agent in full, or None when unknown.
    pub async fn agent(&self, uid: impl std::fmt::Display) -> anyhow::Result<Option<Value>> {
        let (status, value) = self
            .request(reqwest::Method::GET, &format!("/api/v1/agents/{uid}"), None)
            .await?;
        match status {
            200 => Ok(Some(value)),
            404 => Ok(None),
            _ => bail!("agent {uid}: HTTP {status}: {value}"),
        }
    }

    /// Waits (deadline-bounded) until agent `uid` is listed and `check` holds
    /// for its JSON; returns that JSON.
    pub async fn wait_for_agent(
        &self,
        uid: impl std::fmt::Display + Copy,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        crate::wait::eventually(what, crate::wait::DEFAULT_DEADLINE, || async {
            Ok(self.agent(uid).await?.filter(|a| check(a)))
        })
        .await
    }

    /// Waits (deadline-bounded) until rollout `id` is in `state`; returns
    /// its JSON (with its agents).
    pub async fn wait_for_rollout(&self, id: &str, state: &str) -> anyhow::Result<Value> {
        crate::wait::eventually(
            &format!("rollout {id} {state}"),
            crate::wait::DEFAULT_DEADLINE,
            || async {
                let rollout = self
                    .ok(reqwest::Method::GET, &format!("/api/v1/rollouts/{id}"), None)
                    .await?;
                Ok((rollout["state"] == state).then_some(rollout))
            },
        )
        .await
    }

    /// Creates a rollout from `body` (201 expected) and waits until it is in
    /// `state`; returns its JSON.
    pub async fn roll_out(&self, body: Value, state: &str) -> anyhow::Result<Value> {
        let created = self.ok(reqwest::Method::POST, "/api/v1/rollouts", Some(body)).await?;
        let id = created["id"].as_str().context("rollout id")?.to_owned();
        self.wait_for_rollout(&id, state).await
    }

    /// Agents grouped by reported config hash.
    pub async fn config_status(&self) -> anyhow::Result<Vec<Value>> {
        let value = self.ok(reqwest::Method::GET, "/api/v1/config-status", None).await?;
        Ok(value.as_array().cloned().unwrap_or_default())
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
pub struct Sse {
    pub id: Option<String>,
    pub event: String,
    pub data: Value,
}

/// A reader of the admin API's event stream (`/api/v1/events`).
#[derive(Debug)]
pub struct EventReader {
    response: reqwest::Response,
    buffer: String,
}

impl Admin {
    /// Opens the event stream; `last_event_id` resumes after that event
    /// (`Some("0")`: from the oldest kept). Fails on a non-200 answer.
    pub async fn events(&self, last_event_id: Option<&str>) -> anyhow::Result<EventReader> {
        let mut request = self.client.get(format!("{}/api/v1/events", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(tenant) = &self.tenant {
            request = request.header("fleetplane-tenant", tenant);
        }
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.context("opening the event stream")?;
        if response.status() != 200 {
            let status = response.status();
            bail!(
                "event stream: HTTP {status}: {}",
                response.text().await.unwrap_or_default()
            );
        }
        Ok(EventReader {
            response,
            buffer: String::new(),
        })
    }
}

impl EventReader {
    /// The next event (comments and keep-alives skipped); `None` when the
    /// server ended the stream.
    pub async fn next(&mut self) -> anyhow::Result<Option<Sse>> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut sse = Sse {
                    id: None,
                    event: "message".into(),
                    data: Value::Null,
                };
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        sse.id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        sse.event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                sse.data = serde_json::from_str(&data).unwrap_or(Value::String(data));
                return Ok(Some(sse));
            }
            match self.response.chunk().await? {
                Some(bytes) => self.buffer.push_str(&String::from_utf8_lossy(&bytes)),
                None => return Ok(None),
            }
        }
    }

    /// Reads until an event satisfies `check`, within the default deadline.
    pub async fn wait_for(&mut self, what: &str, check: impl Fn(&Sse) -> bool) -> anyhow::Result<Sse> {
        let deadline = crate::wait::DEFAULT_DEADLINE;
        let found = tokio::time::timeout(deadline, async {
            while let Some(event) = self.next().await? {
                if check(&event) {
                    return Ok(event);
                }
            }
            bail!("the event stream ended before {what}")
        })
        .await;
        match found {
            Ok(result) => result,
            Err(_) => bail!("timed out after {deadline:?} waiting for {what}"),
        }
    }
}
