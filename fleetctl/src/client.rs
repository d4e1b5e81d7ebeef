//! The admin API over HTTP: every call returns the JSON body, or an error
//! carrying the server's own message and the HTTP status.

use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::Method;
use serde_json::Value;

/// Where and as whom to talk to a control plane.
#[derive(Debug, Clone)]
pub struct Target {
    pub server: String,
    pub token: Option<String>,
    pub tenant: Option<String>,
}

/// Admin API client.
#[derive(Debug, Clone)]
pub struct Client {
    target: Target,
    http: reqwest::Client,
}

impl Client {
    pub fn new(target: Target) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("building the HTTP client")?;
        Ok(Self { target, http })
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let base = self.target.server.trim_end_matches('/');
        let mut request = self.http.request(method, format!("{base}{path}"));
        if let Some(token) = &self.target.token {
            request = request.bearer_auth(token);
        }
        if let Some(tenant) = &self.target.tenant {
            request = request.header("fleetplane-tenant", tenant);
        }
        request
    }

    /// One call; a non-2xx answer is an error with the server's message.
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let mut request = self.request(method, path).timeout(Duration::from_secs(30));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| self.unreachable(e))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let value: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            let message = value["error"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| value.to_string());
            bail!("{message} (HTTP {})", status.as_u16());
        }
        Ok(value)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(Method::GET, path, None).await
    }

    /// The event stream, raw (see [`crate::events`]).
    pub async fn stream(&self, path: &str, last_event_id: Option<&str>) -> anyhow::Result<reqwest::Response> {
        let mut request = self.request(Method::GET, path);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.map_err(|e| self.unreachable(e))?;
        if !response.status().is_success() {
            let status = response.status().as_u16();
            let text = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or(text);
            bail!("{message} (HTTP {status})");
        }
        Ok(response)
    }

    fn unreachable(&self, e: reqwest::Error) -> anyhow::Error {
        let why = if e.is_connect() {
            "connection refused or unreachable".to_owned()
        } else if e.is_timeout() {
            "timed out".to_owned()
        } else {
            e.to_string()
        };
        anyhow::anyhow!("cannot reach {}: {why}", self.target.server)
    }
}
