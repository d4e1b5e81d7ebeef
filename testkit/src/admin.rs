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

    /// Agents grouped by reported config hash.
    pub async fn config_status(&self) -> anyhow::Result<Vec<Value>> {
        let value = self.ok(reqwest::Method::GET, "/api/v1/config-status", None).await?;
        Ok(value.as_array().cloned().unwrap_or_default())
    }
}
