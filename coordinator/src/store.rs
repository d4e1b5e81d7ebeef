//! The store the coordinator uses: the `fleetplane-store` crate (contract,
//! backends, cache), plus [`metered::MeteredStore`], which times every call
//! into the coordinator's metrics.

pub use fleetplane_store::*;

pub mod metered;
