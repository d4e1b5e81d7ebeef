//! The coordinator's metrics, from the process's global meter.
//!
//! | instrument | kind | attributes |
//! |---|---|---|
//! | `fleetplane.coordinator.reports` | counter | `outcome` (ok, bad_request, store_unavailable, held_elsewhere, expired, coordinator_busy) |
//! | `fleetplane.coordinator.report.duration` | histogram (s) | `outcome` |
//! | `fleetplane.store.duration` | histogram (s) | `op`, `outcome` (ok, conflict, error) |
//! | `fleetplane.agents.connected` | gauge | `tenant`, `transport` |
//! | `fleetplane.agents.remote_config_status` | gauge | `tenant`, `status` |
//! | `fleetplane.rollout.decisions` | counter | `tenant`, `state` (the rollout's state after the decision) |
//! | `fleetplane.rollout.stage` | gauge | `tenant`, `rollout`, `state` (current stage, 1-based) |

use std::{collections::BTreeMap, sync::OnceLock};

/// Histogram buckets for latencies in seconds: 0.5 ms to 10 s.
pub(crate) const SECONDS_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

use opentelemetry::{
    KeyValue, global,
    metrics::{Counter, Gauge, Histogram},
};

#[derive(Debug)]
pub(crate) struct CoordinatorMetrics {
    reports: Counter<u64>,
    report_duration: Histogram<f64>,
    store_duration: Histogram<f64>,
    agents_connected: Gauge<u64>,
    agents_by_status: Gauge<u64>,
    rollout_decisions: Counter<u64>,
    rollout_stage: Gauge<u64>,
}

/// The instruments, created once per process.
pub(crate) fn metrics() -> &'static CoordinatorMetrics {
    static METRICS: OnceLock<CoordinatorMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let meter = global::meter("fleetplane.coordinator");
        CoordinatorMetrics {
            reports: meter
                .u64_counter("fleetplane.coordinator.reports")
                .with_description("Agent reports handled")
                .build(),
            report_duration: meter
                .f64_histogram("fleetplane.coordinator.report.duration")
                .with_unit("s")
                .with_boundaries(crate::metrics::SECONDS_BUCKETS.to_vec())
                .with_description("Time to handle one agent report, store included")
                .build(),
            store_duration: meter
                .f64_histogram("fleetplane.store.duration")
                .with_unit("s")
                .with_boundaries(crate::metrics::SECONDS_BUCKETS.to_vec())
                .with_description("Store operation latency")
                .build(),
            agents_connected: meter
                .u64_gauge("fleetplane.agents.connected")
                .with_description("Connected agents, as of the last sweep")
                .build(),
            agents_by_status: meter
                .u64_gauge("fleetplane.agents.remote_config_status")
                .with_description("Agents by the remote config status they last reported")
                .build(),
            rollout_decisions: meter
                .u64_counter("fleetplane.rollout.decisions")
                .with_description("Rollout decisions (stage started or done, rollback, completion, operator commands)")
                .build(),
            rollout_stage: meter
                .u64_gauge("fleetplane.rollout.stage")
                .with_description("Current stage of each rollout, 1-based")
                .build(),
        }
    })
}

impl CoordinatorMetrics {
    pub fn report(&self, outcome: &'static str, seconds: f64) {
        let attrs = [KeyValue::new("outcome", outcome)];
        self.reports.add(1, &attrs);
        self.report_duration.record(seconds, &attrs);
    }

    /// A report dropped unanswered because its gateway stopped waiting:
    /// counted, but kept out of the duration histogram.
    pub fn report_expired(&self) {
        self.report_expired_as("expired");
    }

    /// A report answered without being handled (`expired`, or
    /// `coordinator_busy` when the report queue was full).
    pub fn report_expired_as(&self, outcome: &'static str) {
        self.reports.add(1, &[KeyValue::new("outcome", outcome)]);
    }

    pub fn store(&self, op: &'static str, outcome: &'static str, seconds: f64) {
        self.store_duration
            .record(seconds, &[KeyValue::new("op", op), KeyValue::new("outcome", outcome)]);
    }

    /// Counts one rollout decision and records where the rollout stands.
    pub fn rollout(&self, tenant: &str, rollout: &str, state: &'static str, stage: u32) {
        let tenant = KeyValue::new("tenant", tenant.to_owned());
        self.rollout_decisions
            .add(1, &[tenant.clone(), KeyValue::new("state", state)]);
        self.rollout_stage.record(
            u64::from(stage) + 1,
            &[
                tenant,
                KeyValue::new("rollout", rollout.to_owned()),
                KeyValue::new("state", state),
            ],
        );
    }

    /// Records a tenant's agent counts: connected by transport, and by
    /// reported remote config status.
    pub fn agents(&self, tenant: &str, connected: &BTreeMap<&'static str, u64>, statuses: &BTreeMap<String, u64>) {
        for transport in ["websocket", "http"] {
            self.agents_connected.record(
                connected.get(transport).copied().unwrap_or(0),
                &[
                    KeyValue::new("tenant", tenant.to_owned()),
                    KeyValue::new("transport", transport),
                ],
            );
        }
        for (status, count) in statuses {
            self.agents_by_status.record(
                *count,
                &[
                    KeyValue::new("tenant", tenant.to_owned()),
                    KeyValue::new("status", status.clone()),
                ],
            );
        }
    }
}
