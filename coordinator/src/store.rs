//! The store the coordinator uses: the `fleetplane-store` crate (contract,
//! backends, cache, timing decorator), re-exported.

pub use fleetplane_store::*;
