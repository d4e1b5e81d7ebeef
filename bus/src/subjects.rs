//! Every NATS subject Fleetplane uses, spelled here and nowhere else.
//!
//! | subject | from → to | payload | delivery |
//! |---|---|---|---|
//! | `fp.v1.report.{tenant}` | gateway → one coordinator | `AgentReport`, reply `opamp.ServerToAgent` | request/reply, queue group `fp-coordinators` |
//! | `fp.v1.closed.{tenant}` | gateway → one coordinator | `ConnectionsClosed`, empty reply once recorded | request/reply, queue group `fp-coordinators`; resent until acknowledged (30 s) |
//! | `fp.v1.liveness.{tenant}` | gateway → one coordinator | `LivenessBatch` | queue group `fp-coordinators`, about once a second |
//! | `fp.v1.deliver.{gateway}` | coordinator → that gateway | `Delivery` | plain |
//! | `fp.v1.presence` | gateway → every coordinator | `GatewayPresence` | plain, about once a second |
//! | `fp.v1.rollouts.{tenant}` | coordinator → anyone | `RolloutNotice` | plain, one per rollout decision |
//! | `fp.v1.changed.{tenant}` | coordinator → every coordinator | empty: the tenant's assignments, connection settings or package sets changed | plain, one per admin change |
//!
//! Tenant and gateway ids are restricted to `[a-z0-9_-]`, so they are always
//! single, safe subject tokens. The `v1` token is the envelope generation: an
//! incompatible envelope change moves to `v2` subjects, so old and new nodes
//! never misread each other during an upgrade.

use fleetplane_proto::{GatewayId, TenantId};

const ROOT: &str = "fp.v1";

/// Queue group shared by all coordinator replicas: each report goes to one.
pub const COORDINATOR_QUEUE: &str = "fp-coordinators";

/// Agent reports of one tenant.
pub fn report(tenant: &TenantId) -> String {
    format!("{ROOT}.report.{tenant}")
}

/// Agent reports of every tenant (coordinator subscription).
pub fn all_reports() -> String {
    format!("{ROOT}.report.*")
}

/// Closed connections of one tenant.
pub fn closed(tenant: &TenantId) -> String {
    format!("{ROOT}.closed.{tenant}")
}

/// Closed connections of every tenant (coordinator subscription).
pub fn all_closed() -> String {
    format!("{ROOT}.closed.*")
}

/// Locally answered heartbeats of one tenant.
pub fn liveness(tenant: &TenantId) -> String {
    format!("{ROOT}.liveness.{tenant}")
}

/// Locally answered heartbeats of every tenant (coordinator subscription).
pub fn all_liveness() -> String {
    format!("{ROOT}.liveness.*")
}

/// Messages for the agents held by one gateway.
pub fn deliver(gateway: &GatewayId) -> String {
    format!("{ROOT}.deliver.{gateway}")
}

/// Rollout decisions of one tenant, for other systems to follow.
pub fn rollouts(tenant: &TenantId) -> String {
    format!("{ROOT}.rollouts.{tenant}")
}

/// A tenant's desired state changed (every coordinator listens).
pub fn changed(tenant: &TenantId) -> String {
    format!("{ROOT}.changed.{tenant}")
}

/// Desired-state changes of every tenant (coordinator subscription).
pub fn all_changed() -> String {
    format!("{ROOT}.changed.*")
}

/// The tenant a `changed` subject names, if it is one.
pub fn changed_tenant(subject: &str) -> Option<TenantId> {
    let tenant = subject.strip_prefix(ROOT)?.strip_prefix(".changed.")?;
    TenantId::new(tenant).ok()
}

/// Gateway presence beats.
pub fn presence() -> String {
    format!("{ROOT}.presence")
}

/// API key lookups by gateways (request/reply, one coordinator answers).
pub fn key_lookup() -> String {
    format!("{ROOT}.keys.lookup")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_stable() {
        let tenant = TenantId::default_tenant();
        let gateway = GatewayId::new("gw-a").unwrap();
        assert_eq!(report(&tenant), "fp.v1.report.default");
        assert_eq!(closed(&tenant), "fp.v1.closed.default");
        assert_eq!(deliver(&gateway), "fp.v1.deliver.gw-a");
        assert_eq!(presence(), "fp.v1.presence");
        assert!(all_reports().ends_with(".*") && all_closed().ends_with(".*"));
        assert_eq!(changed(&tenant), "fp.v1.changed.default");
    }

    #[test]
    fn a_change_notice_names_its_tenant_or_is_ignored() {
        assert_eq!(changed_tenant("fp.v1.changed.acme"), TenantId::new("acme").ok());
        assert_eq!(changed_tenant("fp.v1.changed.Not A Tenant"), None);
        assert_eq!(changed_tenant("fp.v1.report.acme"), None);
    }
}
