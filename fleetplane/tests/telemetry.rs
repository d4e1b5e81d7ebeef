//! Fleetplane's own telemetry from a real agent session across separate
//! gateway and coordinator processes: spans and metrics arrive at a real OTLP
//! receiver (an OTLP/HTTP endpoint run by this test), one trace crosses the
//! gateway and the coordinator, and the Prometheus endpoints expose the metrics.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use axum::{Router, body::Bytes, extract::State, routing::post};
use fleetplane_testkit::{
    agent::{AgentOptions, SimAgent},
    fleet::Fleet,
    wait::{DEFAULT_DEADLINE, eventually},
};
use opentelemetry_proto::tonic::{
    collector::{metrics::v1::ExportMetricsServiceRequest, trace::v1::ExportTraceServiceRequest},
    common::v1::{AnyValue, KeyValue, any_value::Value},
    trace::v1::Span,
};
use prost::Message;

const BINARY: &str = env!("CARGO_BIN_EXE_fleetplane");

/// What the receiver got: spans with their service name, and metric names.
#[derive(Default)]
struct Received {
    spans: Vec<(String, Span)>,
    metrics: HashSet<String>,
}

type Shared = Arc<Mutex<Received>>;

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs.iter().find(|kv| kv.key == key).map(|kv| text(&kv.value))
}

async fn traces(State(received): State<Shared>, body: Bytes) -> Vec<u8> {
    let request = ExportTraceServiceRequest::decode(body).expect("OTLP trace export decodes");
    let mut received = received.lock().unwrap();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .as_ref()
            .and_then(|r| attr(&r.attributes, "service.name"))
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                received.spans.push((service.clone(), span));
            }
        }
    }
    Vec::new()
}

async fn metrics(State(received): State<Shared>, body: Bytes) -> Vec<u8> {
    let request = ExportMetricsServiceRequest::decode(body).expect("OTLP metric export decodes");
    let mut received = received.lock().unwrap();
    for resource_metrics in request.resource_metrics {
        for scope in resource_metrics.scope_metrics {
            for metric in scope.metrics {
                received.metrics.insert(metric.name);
            }
        }
    }
    Vec::new()
}

async fn receiver() -> (String, Shared) {
    let received = Shared::default();
    let app = Router::new()
        .route("/v1/traces", post(traces))
        .route("/v1/metrics", post(metrics))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

#[tokio::test]
async fn spans_and_metrics_of_an_agent_session_reach_otlp_and_prometheus() {
    let (endpoint, received) = receiver().await;
    let fleet = Fleet::builder(BINARY)
        .gateways(1)
        .coordinators(1)
        .env("FLEETPLANE_OTLP_ENDPOINT", endpoint)
        .env("FLEETPLANE_TRACE_SAMPLE_RATIO", "1")
        .env("FLEETPLANE_METRICS_INTERVAL_MS", "300")
        // The SDK's batch span processor: export quickly.
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        // Agent gauges are recorded by the sweep, which runs at a third of this.
        .env("FLEETPLANE_HTTP_OFFLINE_AFTER_SECS", "3")
        .start()
        .await
        .unwrap();
    let agent = SimAgent::connect_ws(
        &fleet.ws_urls()[0],
        AgentOptions::default().attr("service.name", "traced"),
    )
    .await
    .unwrap();
    let uid = agent.uid().to_string();
    agent.wait_for("first reply", |s| s.replies >= 1).await.unwrap();
    agent.heartbeat().await.unwrap();
    agent.wait_for("heartbeat reply", |s| s.replies >= 2).await.unwrap();

    // One trace: the gateway's message span, its bus request, and the
    // coordinator's handling of it in the other process, parented across NATS.
    let (gateway_span, bus_span, coordinator_span) =
        eventually("a trace across both processes", DEFAULT_DEADLINE, || {
            let received = received.clone();
            let uid = uid.clone();
            async move {
                let received = received.lock().unwrap();
                let find = |service: &str, name: &str| -> Vec<Span> {
                    received
                        .spans
                        .iter()
                        .filter(|(s, span)| s == service && span.name == name)
                        .map(|(_, span)| span.clone())
                        .collect()
                };
                for coordinator in find("fleetplane-coordinator", "coordinator.report") {
                    if attr(&coordinator.attributes, "instance_uid").as_deref() != Some(uid.as_str()) {
                        continue;
                    }
                    let bus = find("fleetplane-gateway", "bus.request")
                        .into_iter()
                        .find(|b| b.span_id == coordinator.parent_span_id && b.trace_id == coordinator.trace_id);
                    let Some(bus) = bus else { continue };
                    let message = find("fleetplane-gateway", "opamp.message")
                        .into_iter()
                        .find(|m| m.span_id == bus.parent_span_id && m.trace_id == bus.trace_id);
                    if let Some(message) = message {
                        return Ok(Some((message, bus, coordinator)));
                    }
                }
                Ok(None)
            }
        })
        .await
        .unwrap();
    assert_eq!(
        attr(&gateway_span.attributes, "instance_uid").as_deref(),
        Some(uid.as_str())
    );
    assert_eq!(
        attr(&gateway_span.attributes, "transport").as_deref(),
        Some("websocket")
    );
    assert_eq!(attr(&bus_span.attributes, "outcome").as_deref(), Some("ok"));
    assert_eq!(attr(&coordinator_span.attributes, "outcome").as_deref(), Some("ok"));
    assert_eq!(attr(&coordinator_span.attributes, "tenant").as_deref(), Some("default"));

    // Metrics arrive over OTLP from both processes.
    let expected = [
        "fleetplane.gateway.connections",
        "fleetplane.gateway.messages.in",
        "fleetplane.gateway.messages.out",
        "fleetplane.gateway.admission",
        "fleetplane.bus.request.duration",
        "fleetplane.coordinator.reports",
        "fleetplane.coordinator.report.duration",
        "fleetplane.store.duration",
        "fleetplane.agents.connected",
    ];
    eventually("metrics over OTLP", DEFAULT_DEADLINE, || {
        let received = received.clone();
        async move {
            let received = received.lock().unwrap();
            Ok(expected
                .iter()
                .all(|name| received.metrics.contains(*name))
                .then_some(()))
        }
    })
    .await
    .unwrap();

    // And the Prometheus endpoints expose them to a scrape.
    let gateway_scrape = fleetplane_testkit::fleet::scrape(fleet.gateways[0].health.unwrap())
        .await
        .unwrap();
    for line in [
        "fleetplane_gateway_connections{",
        "fleetplane_gateway_messages_in_total{",
        "fleetplane_bus_request_duration_seconds_bucket{",
    ] {
        assert!(
            gateway_scrape.contains(line),
            "gateway scrape lacks {line}:\n{gateway_scrape}"
        );
    }
    assert!(
        gateway_scrape.contains("type=\"heartbeat\""),
        "heartbeats are counted by type"
    );
    let coordinator_scrape = fleetplane_testkit::fleet::scrape(fleet.coordinators[0].addr)
        .await
        .unwrap();
    for line in [
        "fleetplane_coordinator_reports_total{",
        "fleetplane_store_duration_seconds_bucket{",
    ] {
        assert!(
            coordinator_scrape.contains(line),
            "coordinator scrape lacks {line}:\n{coordinator_scrape}"
        );
    }
    // The connection's span ends (and is exported) when the agent leaves.
    agent.disconnect().await.unwrap();
    eventually("the connection's span", DEFAULT_DEADLINE, || {
        let received = received.clone();
        async move {
            let received = received.lock().unwrap();
            Ok(received
                .spans
                .iter()
                .any(|(s, span)| s == "fleetplane-gateway" && span.name == "opamp.connection")
                .then_some(()))
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn metrics_can_require_a_token() {
    let data = tempfile::tempdir().unwrap();
    let env = [
        ("FLEETPLANE_OPAMP_LISTEN", "127.0.0.1:0".to_owned()),
        ("FLEETPLANE_ADMIN_LISTEN", "127.0.0.1:0".to_owned()),
        ("FLEETPLANE_DATA_DIR", data.path().display().to_string()),
        ("FLEETPLANE_TELEMETRY_METRICS_TOKEN", "scrape-me-please".to_owned()),
    ]
    .map(|(k, v)| (k.to_owned(), v))
    .to_vec();
    let node =
        fleetplane_testkit::fleet::NodeProcess::spawn(&env!("CARGO_BIN_EXE_fleetplane").into(), "all-in-one", env)
            .await
            .unwrap();
    let url = format!("http://{}/metrics", node.addr);
    let client = reqwest::Client::new();
    assert_eq!(client.get(&url).send().await.unwrap().status(), 401);
    assert_eq!(
        client.get(&url).bearer_auth("wrong").send().await.unwrap().status(),
        401
    );
    let scraped = client.get(&url).bearer_auth("scrape-me-please").send().await.unwrap();
    assert_eq!(scraped.status(), 200);
    assert!(scraped.text().await.unwrap().contains("# TYPE"));
}
