//! Fleetplane's own telemetry, set up once per process by the binary.
//!
//! - Logs: `tracing`, as text or JSON lines on stderr.
//! - Traces: the same `tracing` spans, bridged to OpenTelemetry and exported
//!   over OTLP/HTTP (protobuf) when an endpoint is configured, sampled by
//!   trace-id ratio (parent-based, so a trace started at the gateway is kept or
//!   dropped as a whole across the coordinator).
//! - Metrics: OpenTelemetry instruments, which the libraries create from the
//!   global meter; exported over OTLP when an endpoint is configured, and
//!   always readable at `/metrics` in Prometheus text format.
//!
//! Libraries (gateway, coordinator, bus) depend only on the OpenTelemetry API
//! and `tracing`; this crate holds the SDK and exporters.

use std::time::Duration;

use axum::{Router, http::header, response::IntoResponse, routing::get};
use opentelemetry::{KeyValue, global, trace::TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    metrics::{PeriodicReader, SdkMeterProvider},
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider},
};
use prometheus::{Encoder, TextEncoder};
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Telemetry settings.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// `service.name` of this process, e.g. `fleetplane-gateway`.
    pub service_name: String,
    /// `service.instance.id`, e.g. the gateway id.
    pub instance_id: String,
    /// Base URL of an OTLP/HTTP receiver (`http://collector:4318`); `/v1/traces`
    /// and `/v1/metrics` are appended. None: nothing is exported.
    pub otlp_endpoint: Option<String>,
    /// Share of traces kept, 0.0 to 1.0.
    pub trace_sample_ratio: f64,
    /// How often metrics are pushed over OTLP.
    pub metrics_interval: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter in `RUST_LOG` syntax (`RUST_LOG` wins when set).
    pub log_filter: String,
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// An exporter could not be built (bad endpoint, ...).
    #[error("cannot build the {what} exporter: {reason}")]
    Exporter {
        /// Which exporter.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A global subscriber was already installed.
    #[error("logging was already initialised: {0}")]
    AlreadyInitialised(String),
}

/// The installed providers; keep it alive for the process's life and call
/// [`Telemetry::shutdown`] at the end so buffered spans and metrics go out.
#[derive(Debug)]
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: SdkMeterProvider,
    registry: prometheus::Registry,
}

fn exporter_error(what: &'static str, e: impl std::fmt::Display) -> TelemetryError {
    TelemetryError::Exporter {
        what,
        reason: e.to_string(),
    }
}

impl Telemetry {
    /// Installs logging, tracing, metrics and the W3C trace-context propagator
    /// for this process.
    pub fn init(config: &TelemetryConfig) -> Result<Self, TelemetryError> {
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .with_attributes([
                KeyValue::new("service.instance.id", config.instance_id.clone()),
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            ])
            .build();
        global::set_text_map_propagator(TraceContextPropagator::new());

        let registry = prometheus::Registry::new();
        let prometheus_reader = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()
            .map_err(|e| exporter_error("prometheus", e))?;
        let mut meters = SdkMeterProvider::builder()
            .with_resource(resource.clone())
            .with_reader(prometheus_reader);
        let mut tracer_provider = None;
        if let Some(endpoint) = &config.otlp_endpoint {
            let base = endpoint.trim_end_matches('/');
            let metric_exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_endpoint(format!("{base}/v1/metrics"))
                .with_timeout(Duration::from_secs(5))
                .build()
                .map_err(|e| exporter_error("otlp metrics", e))?;
            meters = meters.with_reader(
                PeriodicReader::builder(metric_exporter)
                    .with_interval(config.metrics_interval)
                    .build(),
            );
            let span_exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(format!("{base}/v1/traces"))
                .with_timeout(Duration::from_secs(5))
                .build()
                .map_err(|e| exporter_error("otlp traces", e))?;
            let ratio = config.trace_sample_ratio.clamp(0.0, 1.0);
            tracer_provider = Some(
                SdkTracerProvider::builder()
                    .with_resource(resource)
                    .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))))
                    .with_batch_exporter(span_exporter)
                    .build(),
            );
        }
        let meter_provider = meters.build();
        global::set_meter_provider(meter_provider.clone());

        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log_filter));
        let fmt = match config.log_format {
            LogFormat::Text => tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr)
                .boxed(),
        };
        let otel = tracer_provider.as_ref().map(|provider| {
            // Spans go to OpenTelemetry whatever the log filter says; the
            // sampler decides what is kept.
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("fleetplane"))
                .with_filter(EnvFilter::new("info,fleetplane=debug"))
        });
        tracing_subscriber::registry()
            .with(fmt.with_filter(filter))
            .with(otel)
            .try_init()
            .map_err(|e| TelemetryError::AlreadyInitialised(e.to_string()))?;
        Ok(Self {
            tracer_provider,
            meter_provider,
            registry,
        })
    }

    /// `GET /metrics` in the Prometheus text format, to merge into an HTTP
    /// router of the process.
    pub fn metrics_router(&self) -> Router {
        let registry = self.registry.clone();
        Router::new().route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut body = Vec::new();
                    let encoder = TextEncoder::new();
                    if let Err(e) = encoder.encode(&registry.gather(), &mut body) {
                        return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
                    }
                    ([(header::CONTENT_TYPE, encoder.format_type().to_owned())], body).into_response()
                }
            }),
        )
    }

    /// Flushes and stops the exporters.
    pub fn shutdown(self) {
        if let Some(provider) = self.tracer_provider {
            let _ = provider.shutdown();
        }
        let _ = self.meter_provider.shutdown();
    }
}
