//! The gateway's metrics, created from the process's global meter (a no-op
//! until the binary installs a meter provider).
//!
//! | instrument | kind | attributes |
//! |---|---|---|
//! | `fleetplane.gateway.connections` | up-down counter | `gateway`, `tenant`, `transport` |
//! | `fleetplane.gateway.messages.in` | counter | `gateway`, `transport`, `type` (status, heartbeat, disconnect) |
//! | `fleetplane.gateway.messages.out` | counter | `gateway`, `transport`, `type` (reply, push, error) |
//! | `fleetplane.gateway.decode.errors` | counter | `gateway`, `transport`, `reason` |
//! | `fleetplane.gateway.admission` | counter | `gateway`, `decision` (accepted, shed), `reason` |
//! | `fleetplane.bus.request.duration` | histogram (s) | `gateway`, `outcome` |
//! | `fleetplane.gateway.auth.refusals` | counter | `gateway`, `reason` (missing, malformed, unknown, wrong_secret, revoked, throttled, unavailable) |
//! | `fleetplane.gateway.connection.timeouts` | counter | `gateway`, `reason` (first_message, idle) |

/// Histogram buckets for latencies in seconds: 0.5 ms to 10 s.
pub(crate) const SECONDS_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

use std::sync::Arc;

use opentelemetry::{
    KeyValue, StringValue, global,
    metrics::{Counter, Histogram, UpDownCounter},
};

/// Instruments of one gateway, with its constant attributes.
#[derive(Debug, Clone)]
pub(crate) struct GatewayMetrics {
    gateway: KeyValue,
    tenant: KeyValue,
    connections: UpDownCounter<i64>,
    messages_in: Counter<u64>,
    messages_out: Counter<u64>,
    decode_errors: Counter<u64>,
    admission: Counter<u64>,
    timeouts: Counter<u64>,
    auth_refusals: Counter<u64>,
    bus_duration: Histogram<f64>,
}

impl GatewayMetrics {
    pub fn new(gateway: &str, tenant: &str) -> Self {
        let meter = global::meter("fleetplane.gateway");
        Self {
            // Shared strings: these labels are cloned on every message.
            gateway: KeyValue::new("gateway", StringValue::from(Arc::<str>::from(gateway))),
            tenant: KeyValue::new("tenant", StringValue::from(Arc::<str>::from(tenant))),
            connections: meter
                .i64_up_down_counter("fleetplane.gateway.connections")
                .with_description("Open agent WebSocket connections")
                .build(),
            messages_in: meter
                .u64_counter("fleetplane.gateway.messages.in")
                .with_description("Agent messages received")
                .build(),
            messages_out: meter
                .u64_counter("fleetplane.gateway.messages.out")
                .with_description("Messages sent to agents")
                .build(),
            decode_errors: meter
                .u64_counter("fleetplane.gateway.decode.errors")
                .with_description("Agent input rejected as malformed or oversized")
                .build(),
            admission: meter
                .u64_counter("fleetplane.gateway.admission")
                .with_description("Admission decisions for agent messages")
                .build(),
            auth_refusals: meter
                .u64_counter("fleetplane.gateway.auth.refusals")
                .with_description("Agent connections and polls refused for their credentials")
                .build(),
            timeouts: meter
                .u64_counter("fleetplane.gateway.connection.timeouts")
                .with_description("WebSockets closed for sending nothing in time")
                .build(),
            bus_duration: meter
                .f64_histogram("fleetplane.bus.request.duration")
                .with_unit("s")
                .with_boundaries(crate::metrics::SECONDS_BUCKETS.to_vec())
                .with_description("Time from handing a report to the bus to the coordinator's answer")
                .build(),
        }
    }

    /// This gateway's label and two more, without allocating.
    fn attrs(&self, a: KeyValue, b: KeyValue) -> [KeyValue; 3] {
        [self.gateway.clone(), a, b]
    }

    pub fn connection_opened(&self, transport: &'static str) {
        let attrs = [
            self.gateway.clone(),
            self.tenant.clone(),
            KeyValue::new("transport", transport),
        ];
        self.connections.add(1, &attrs);
    }

    pub fn connection_closed(&self, transport: &'static str) {
        let attrs = [
            self.gateway.clone(),
            self.tenant.clone(),
            KeyValue::new("transport", transport),
        ];
        self.connections.add(-1, &attrs);
    }

    pub fn message_in(&self, transport: &'static str, kind: &'static str) {
        self.messages_in.add(
            1,
            &self.attrs(KeyValue::new("transport", transport), KeyValue::new("type", kind)),
        );
    }

    pub fn message_out(&self, transport: &'static str, kind: &'static str) {
        self.messages_out.add(
            1,
            &self.attrs(KeyValue::new("transport", transport), KeyValue::new("type", kind)),
        );
    }

    pub fn auth_refused(&self, reason: &'static str) {
        self.auth_refusals
            .add(1, &[self.gateway.clone(), KeyValue::new("reason", reason)]);
    }

    pub fn connection_timeout(&self, reason: &'static str) {
        self.timeouts
            .add(1, &[self.gateway.clone(), KeyValue::new("reason", reason)]);
    }

    pub fn decode_error(&self, transport: &'static str, reason: &'static str) {
        self.decode_errors.add(
            1,
            &self.attrs(KeyValue::new("transport", transport), KeyValue::new("reason", reason)),
        );
    }

    pub fn admission(&self, decision: &'static str, reason: &'static str) {
        self.admission.add(
            1,
            &self.attrs(KeyValue::new("decision", decision), KeyValue::new("reason", reason)),
        );
    }

    pub fn bus_request(&self, seconds: f64, outcome: &'static str) {
        self.bus_duration
            .record(seconds, &[self.gateway.clone(), KeyValue::new("outcome", outcome)]);
    }
}

/// How a message is counted: what it carries.
pub(crate) fn message_kind(message: &fleetplane_proto::opamp::AgentToServer) -> &'static str {
    if message.agent_disconnect.is_some() {
        "disconnect"
    } else if message.agent_description.is_none()
        && message.health.is_none()
        && message.effective_config.is_none()
        && message.remote_config_status.is_none()
        && message.package_statuses.is_none()
        && message.custom_capabilities.is_none()
        && message.custom_message.is_none()
        && message.available_components.is_none()
        && message.connection_settings_status.is_none()
        && message.connection_settings_request.is_none()
        && message.flags == 0
    {
        "heartbeat"
    } else {
        "status"
    }
}
