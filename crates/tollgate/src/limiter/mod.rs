//! The decision path every front end stands on: a store behind its timeout, circuit breaker and
//! failure policy ([`OnStoreError`]).

pub(crate) mod guarded;
pub(crate) mod wait;

pub use guarded::OnStoreError;
