//! The core of tollgate: rate-limiting algorithms as pure functions of state and time, the
//! [`Store`] trait, and the in-memory [`MemoryStore`].
//!
//! Nothing here does I/O or reads a clock on its own: time comes from a [`Clock`], state from a
//! [`Store`], and every algorithm in [`algorithm`] is arithmetic on a small, plain state. That is what
//! lets the Redis store (`tollgate-redis`) run the very same functions as Lua scripts, and lets the
//! tests replay one set of [test vectors](https://github.com/tollgate-rs/tollgate/blob/main/crates/tollgate-core/tests/vectors.txt)
//! against every store.
//!
//! # Quick look
//!
//! ```
//! use tollgate_core::{Limit, ManualClock, MemoryStore, Outcome, Quota};
//!
//! # fn main() -> Result<(), tollgate_core::QuotaError> {
//! // 100 requests a minute, at most 20 at once.
//! let basic = Quota::per_minute(100)?.with_burst(20)?;
//! // The system clock by default; a manual one here so the numbers are exact.
//! let store = MemoryStore::builder().clock(ManualClock::default()).build();
//!
//! for _ in 0..20 {
//!     assert!(store.decide_now(&[Limit::new("alice", &basic, 1)]).is_allowed());
//! }
//! let verdict = store.decide_now(&[Limit::new("alice", &basic, 1)]);
//! assert_eq!(verdict.outcome(), Outcome::Denied);
//! // One token comes back every 600 ms.
//! assert_eq!(verdict.retry_after().as_millis(), 600);
//! # Ok(())
//! # }
//! ```
//!
//! # Algorithms
//!
//! | config name | behaviour |
//! |---|---|
//! | `token_bucket` (default) | GCRA: capacity `burst`, refilled at the rate; a new key starts full; denials consume nothing |
//! | `leaky_bucket` | shaping: constant spacing, a request may be **delayed** up to `max_delay`, beyond that denied |
//! | `fixed_window` | a counter per aligned window |
//! | `sliding_window_log` | exact: never more than `limit` in any window |
//! | `sliding_window_counter` | two-window weighted approximation in constant memory |
//!
//! Every [`Decision`] carries the outcome, the limit, what remains, when the quota is whole again,
//! when a denied request could pass, and (leaky bucket) how long to delay; a cost the quota can
//! never hold is its own outcome, [`Outcome::InsufficientCapacity`].
//!
//! # Concurrency leases
//!
//! Besides rates, a store caps work in flight: [`Store::decide_leased`] takes one of at most
//! `max` [`Lease`]s on a key in the same atomic step as the limits, and [`Store::release`] gives
//! it back; a lease never given back expires `ttl` after it was taken, so a crashed holder frees
//! its place.
//!
//! # Features
//!
//! | feature | what it adds |
//! |---|---|
//! | `vectors` | `tollgate_core::vectors`: the shared test vectors, parsed, so another [`Store`] can replay them |
//!
//! The HTTP layers, the plain limiter and the YAML configuration are in the `tollgate` crate; the
//! Redis store is `tollgate-redis`.

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod algorithm;
mod clock;
mod decision;
mod lease;
mod memory;
mod quota;
mod store;
#[cfg(any(test, feature = "vectors"))]
pub mod vectors;

pub use clock::{Clock, ManualClock, Stopwatch, SystemClock, Timestamp};
pub use decision::{Decision, Outcome};
pub use lease::{LEASE_RETRY_AFTER, Lease, LeaseId, Leased};
pub use memory::{DEFAULT_MAX_KEYS, MemoryStore, MemoryStoreBuilder};
pub use quota::{Algorithm, MAX_LIMIT, MAX_SPAN_MICROS, Quota, QuotaError};
pub use store::{
    BoxFuture, DynStore, Held, Limit, Reservation, Reserve, Store, StoreError, StoreErrorKind,
    Verdict,
};
