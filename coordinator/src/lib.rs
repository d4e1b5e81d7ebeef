pub mod desired;
pub mod inventory;
pub mod reconcile;
pub mod selector;
pub mod store;
