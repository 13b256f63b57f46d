//! The Redis store for tollgate: limit state shared by every process of a fleet, each decision one
//! atomic Lua script on Redis' own clock.
//!
//! [`RedisStore`] implements [`tollgate_core::Store`] on a standalone Redis (a multiplexed,
//! reconnecting connection), a Redis Cluster (redis-rs' async cluster client) or the master of a
//! Sentinel group (found and followed through the sentinels), with one code path over every
//! connection type. The script ports the algorithms of `tollgate-core` exactly; the same
//! test vectors are replayed against both. Right after its helpers and the token bucket comes a
//! fast path for the most common call, a decision over token buckets only (the default tier +
//! route + global): one `GET` or `MGET` and one `SET` per charged bucket, without the general
//! path's bookkeeping (and, with `EVALSHA`, without the other algorithms' definitions). It
//! decides and writes, and leaves the describing to the client: its reply is the server time,
//! whether it wrote, and each bucket's state as read, from which the client computes each
//! limit's decision with `tollgate-core`'s token bucket (the function the script ports); a reply
//! whose verdict the client does not reproduce is an error. The test vectors and the
//! conformance suite run through it.
//!
//! ```no_run
//! use tollgate_core::{Limit, Quota, Store};
//! use tollgate_redis::RedisStore;
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let store = RedisStore::builder("redis://127.0.0.1:6379").prefix("myapp").build()?;
//! let basic = Quota::per_minute(100)?.with_burst(20)?;
//! let global = Quota::per_second(1000)?;
//! let verdict = store
//!     .decide(&[
//!         Limit::new("{user:alice}:tier", &basic, 1),
//!         Limit::new("global", &global, 1),
//!     ])
//!     .await?;
//! println!("allowed: {}", verdict.is_allowed());
//! # Ok(())
//! # }
//! ```
//!
//! # Key layout
//!
//! A limit key `KEY` is stored under `PREFIX:KEY` (prefix `tollgate` by default). Its value:
//!
//! | algorithm | Redis type | value |
//! |---|---|---|
//! | token bucket, leaky bucket | string | `b:<tat>`: the theoretical arrival time, µs |
//! | fixed window | string | `w:<window start>:<count>` |
//! | sliding window counter | string | `c:<window start>:<previous>:<current>` |
//! | sliding window log | sorted set | one member per unit of cost, scored with its time in µs, named `<call id>:<limit>:<unit>` |
//! | concurrency lease | sorted set | one member per lease held, scored with its expiry in µs, named by its id (32 hex digits) |
//!
//! A value written by another algorithm (the configuration changed) counts as fresh, as in the Rust
//! model. Log members are unique even for simultaneous requests (the call id is a random process
//! seed and a counter), and a log never holds more live members than its limit: expired members are
//! removed before every write.
//!
//! # Expiry
//!
//! Every write sets a TTL (rounded up to the millisecond) that ends when the state is back to
//! fresh: a full bucket (`tat`), the end of the window, both counters slid out, the newest log
//! entry out of its window. A state already fresh is deleted instead of written. No key lives
//! forever, and a token-bucket denial writes nothing.
//!
//! # Time
//!
//! The script reads Redis' `TIME`, so every process sharing a server decides on one clock; skewed
//! application servers agree. (`RedisStoreBuilder::client_clock` exists for replaying test vectors
//! only.) On a cluster each node reads its own clock: keep the nodes NTP-synchronised, as Redis
//! Cluster itself expects.
//!
//! # Cluster
//!
//! A script can only touch keys of one slot. Keys with the same hash tag share a slot: name the
//! limits of one caller `{user:alice}:tier`, `{user:alice}:route:/api/search`, and they are decided
//! in one atomic call, as on a standalone server.
//!
//! A limit shared by everyone, such as the whole-service limit, cannot live in every caller's
//! slot. Such a request is decided **group by group, in the order the limits are given**, each
//! group one atomic call, all or nothing in the end:
//!
//! 1. each group is decided and charged atomically;
//! 2. if a later group denies, the groups already charged are undone: a bucket returns to its
//!    earlier state if nobody wrote it since, a window or counter is decremented, a log loses
//!    exactly this call's members;
//! 3. the other limits are then peeked, so the verdict reports every limit as it stands.
//!
//! The trade-off: no limit is ever exceeded, and the request is charged everywhere or nowhere, but
//! between steps 1 and 2 (one round trip) the earlier groups' charge is visible, so a concurrent
//! request on the same keys may be denied when it would have passed; and if an undo fails (Redis
//! down at that moment) the charge stays — an error toward denial, never toward overshoot. A bucket
//! written by someone else in between keeps its state for the same reason. Put the caller's own
//! limits first and the shared limit last: callers over their own limit (the common denial) then
//! never touch the shared key, and most requests cost one call per group. Reservations across
//! slots agree on one departure time first, then hold it in every group, giving back and retrying
//! if it was taken meanwhile.
//!
//! **A failover.** When a master dies, the cluster promotes its replica once the other masters
//! agree it is down (a few seconds with a 2 s `cluster-node-timeout`). Meanwhile calls on its
//! slots fail as unavailable (connection refused, `CLUSTERDOWN`) or time out, like calls on the
//! other masters' slots once the cluster reports itself down; then redis-rs learns the new slot
//! map and the calls go to the promoted replica, whose `NOSCRIPT` makes the call load the script
//! if it lacks it. In the tests (three masters with one replica each), decisions come from the
//! promoted replica within milliseconds of the promotion, and a cross-slot limit admits no more
//! than its burst before and after. What a failover can lose is as with Sentinel (below): the
//! writes the replica had not received yet.
//!
//! # Sentinel
//!
//! [`RedisStore::sentinel_builder`] takes the name the sentinels monitor the master under and
//! the sentinels' URLs; the store asks them (redis-rs' sentinel client) for the master, checks
//! that the node says it is one, and keeps one multiplexed connection to it. Scripts, deadlines
//! and error handling are the standalone store's. A master behind a password takes it (and an
//! ACL user, and a database number) through
//! [`master_auth`](RedisStoreBuilder::master_auth) and
//! [`master_db`](RedisStoreBuilder::master_db); the sentinels' own credentials go in their
//! URLs.
//!
//! ```no_run
//! use tollgate_redis::RedisStore;
//!
//! # fn example() -> Result<(), tollgate_redis::RedisStoreError> {
//! let store = RedisStore::sentinel_builder(
//!     "mymaster",
//!     ["redis://10.0.0.1:26379", "redis://10.0.0.2:26379", "redis://10.0.0.3:26379"],
//! )
//! .build()?;
//! # let _ = store;
//! # Ok(())
//! # }
//! ```
//!
//! **Following a failover.** The connection is forgotten, and the next call asks the sentinels
//! again, when a call fails in a way that says its node is no longer the master to talk to (the
//! connection refused, dropped or timed out; `READONLY` from a demoted master; `MASTERDOWN`), and
//! when a background check, every 500 ms, finds that the sentinels name another master (a forced
//! `SENTINEL FAILOVER` leaves the old master writable for seconds, answering as if nothing had
//! happened). The call that failed is **not** replayed, its outcome may be unknown: it fails,
//! and the failure policy answers it; the calls after it go to the new master. The new master
//! already has the function library (libraries replicate); with `EVALSHA` it may not have the
//! script cached (the script cache does not replicate): its `NOSCRIPT` makes the call load the
//! script, as after a restart.
//! In the tests, decisions come from the new master within a few hundred milliseconds of the
//! sentinels naming it.
//!
//! **What a failover can lose.** Replication is asynchronous: the writes the old master
//! acknowledged but had not yet sent to its replica are gone when the replica is promoted, and
//! with a forced failover, whatever the store wrote to the old master between the promotion and
//! the moment it noticed (up to about the 500 ms check interval). For a limit this means the
//! charges of that window are forgotten: right after the switch a key may admit again what it
//! admitted in the lost window, **up to about one more burst's worth** (its burst or window limit,
//! plus what refills during that short window). A denial writes nothing and loses nothing. The
//! deadline offsets learnt from the old master's clock carry over to the new one until its replies
//! correct them: keep the group's nodes NTP-synchronised, as for a cluster. Where that
//! matters, Redis' `min-replicas-to-write` narrows the window at the cost of availability.
//!
//! # Concurrency leases
//!
//! [`Store::decide_leased`](tollgate_core::Store::decide_leased) caps the work in flight on a
//! lease key across the fleet. The key (`PREFIX:KEY`, as for a limit; it must differ from every
//! limit's key) is a sorted set: one member per lease, named by the lease id (the store's random
//! 64-bit seed and a counter, as 32 hex digits: ids of two stores collide only if their seeds
//! do), scored
//! with its expiry on Redis' `TIME`. In the same script call as the decision, the call drops the
//! expired members (`ZREMRANGEBYSCORE`), counts the rest (`ZCARD`), and only if fewer than `max`
//! remain decides the limits (the general path, not the fast path); only if every limit allows
//! does it add the lease (`ZADD`, scored now + ttl) and extend the key's TTL to the lease's ttl
//! plus one second when that is longer than the TTL it has. A full lease decides no limit.
//! [`release`](tollgate_core::Store::release) is one `ZREM`, routed by the key; an expired or
//! unknown id is not an error, so a release that failed or timed out can be sent again.
//!
//! **Expiry bound.** A lease not given back (its holder crashed, or never learnt it had one)
//! stops counting `ttl` after it was taken, on the server's clock, and is dropped by the next call
//! on its key; the key itself is gone about one second (the margin of its TTL) after the last of
//! its leases expired.
//!
//! **A timeout's outcome is unknown**, as for any decision: the script may have taken the lease
//! and the answer been lost. The caller then holds no id to give back, and the lease counts
//! against `max` until its ttl runs out: pick a ttl not much longer than the work it covers. A
//! call the server runs after its deadline writes nothing, lease included.
//!
//! **On a cluster** give the lease key the caller's hash tag (`{user:alice}:c:basic`) and it is
//! part of the caller's single call. Wherever it lands, it is one more key of the cross-slot
//! protocol (see "Cluster"): decided in its slot's group, and if a later group denies after the
//! lease was taken, the undo gives it back with that group's other charges (a failed undo is a
//! compensating write like the others, logged and counted; the lease then expires by its ttl).
//!
//! # Batching
//!
//! Many tasks deciding through one store share its multiplexed connection. With batching on
//! (the default; [`RedisStoreBuilder::batching`] turns it off), the decisions waiting on the same
//! connection go out together:
//!
//! * a decision that finds no call of its connection in flight is sent **at once**, in a call of
//!   its own: there is no timer and no linger, so a lone request never waits for company;
//! * decisions that arrive while a call is in flight queue up; when it completes, everything
//!   queued (at most 64 decisions and 256 keys per call) goes out as **one** script call, and
//!   what arrives meanwhile waits for the next;
//! * that call decides each of its decisions in turn, each all or nothing on its own limits,
//!   exactly as it would alone (the same token bucket, the same compact reply, each read of a
//!   key after the writes of the decisions before it): one decision's denial never affects
//!   another's, and a burst is as exact as without batching;
//! * inside the call, a key is read once and written once, however many of the batch's
//!   decisions pass through it: one `MGET` of the batch's distinct keys, the decisions in turn on
//!   those states, then one `SET` per key the batch changed, with the state (and the TTL) its
//!   last decision left, which is what one call per decision would have left. Where decisions
//!   share a key, as every request shares a service-wide limit and a busy caller's requests
//!   share its bucket, this is most of what batching saves Redis;
//! * the batch travels packed: its distinct keys once, and one string of 64-bit integers for
//!   every decision's numbers (each key named by its place among the keys); the reply is one
//!   string too. Redis then parses three arguments and builds one reply per call, not five
//!   arguments and a reply per decision.
//!
//! **What is batched**: `decide` over token buckets only, on distinct keys, in one slot: the
//! fast path's decisions, the common inbound case. Everything else keeps a call of its own:
//! `peek`, `reserve`, `cancel`, `pause`, concurrency leases, the window and leaky-bucket
//! algorithms, and on a cluster a decision whose limits span slots (the cross-slot protocol).
//!
//! **On a cluster** there is one queue per slot, since a call's keys must share a slot:
//! decisions on different slots are decided in separate calls, each batched with the decisions
//! of its own slot.
//!
//! **Deadlines and failures.** Each decision keeps its own deadline: it stops waiting when its
//! timeout passes, wherever it is; one whose deadline passed while it was queued fails with a
//! timeout and is never sent; and each decision of a batch carries its own deadline on the
//! server's clock, so the script answers *late* and writes nothing for exactly the decisions
//! the caller gave up on. A batch call that fails gives each of its decisions the error (a
//! timeout, an unavailable server, a protocol error), and the caller's failure policy answers
//! each. A batch whose outcome is unknown (a timeout, a connection lost after sending) is
//! **never sent again**, as for a single call. A malformed batch is refused before anything is
//! written. A script error during the batch's writes (an out-of-memory refusal of a `SET`, say)
//! leaves the keys written before it charged and fails every decision: an error toward denial. (On a cluster, redis-rs' own retry of a request
//! whose connection dropped, see "Failures", applies to a batch as to a single call.)
//!
//! The cost at low load is the queue itself, a lock and no wait; the bench (`tollgate-bench
//! redis`) has decisions per second and latencies with batching on and off at 1, 16 and 128
//! tasks.
//!
//! # Failures
//!
//! The user guide's "Failure behaviour" (`docs/guide.md` in the repository) tabulates what each
//! fault the tests inject does (a refused connection, a frozen server, a blackholed port, a
//! Sentinel or Cluster failover, a killed master) and a chaos soak's per-phase results.
//!
//! Every call has a deadline (the `timeout`, 50 ms by default, covering connecting, loading the
//! script and running it). A call fails with a [`StoreError`](tollgate_core::StoreError) that
//! tells the layer above what happened:
//!
//! * [`is_timeout`](tollgate_core::StoreError::is_timeout): no answer in time. The store never
//!   replays such a call itself; the layer should apply its failure policy (fail open, fail
//!   closed, or decide locally) and not retry the decision. A call sent to a server that hangs
//!   (stopped, swapping, behind a stalled link) stays in its input buffer and runs when it wakes:
//!   so every `decide` and `reserve` carries its **deadline on the server's clock** (the end of
//!   the call timeout, converted with the offset the store learns from the `TIME` of earlier
//!   replies, conservatively), and a script that runs past it writes nothing and answers *late*.
//!   The bound: a call the store gave up on can still have charged only if its script started
//!   before the deadline and the reply was on its way back (one network hop); until the first
//!   reply of a process the offset is unknown and that first call carries no deadline. On a
//!   cluster each slot keeps its own offset (each node has its own clock).
//! * [`is_unavailable`](tollgate_core::StoreError::is_unavailable): Redis could not be reached
//!   (refused, connection lost, cluster down). The connection reopens by itself in the background;
//!   a later call succeeds once Redis is back.
//! * anything else: a malformed reply or a script error. A reply the client does not understand
//!   (an unknown status or outcome code, a negative time, a count past `u32`) is such an error,
//!   never a plausible decision.
//!
//! An undo (cross-slot) or a give-back (a cancelled reservation) that fails leaves a charge in
//! place, which errs toward denial; it is logged and counted in
//! `rate_limiter_store_compensation_errors_total{store="redis",op}`.
//!
//! A server without the code (a restart, `FUNCTION FLUSH` or `SCRIPT FLUSH`, a new node) answers
//! "Function not found" or `NOSCRIPT`: the call loads the code and runs once more (it had not
//! run); see "Functions or EVALSHA". A second refusal (on a cluster during a failover, the code
//! loaded on the nodes redis-rs had connections to, not the one that answered) fails the call as
//! unavailable. On a cluster, redis-rs also follows `MOVED` / `ASK` redirections and `TRYAGAIN` (the script had not
//! run either), and it retries a request whose connection dropped after sending, which can charge
//! a request twice: an error toward denial.
//!
//! # Functions or EVALSHA
//!
//! The Lua code runs one of two ways, chosen with
//! [`RedisStoreBuilder::scripting`] ([`Scripting`]); both run the same functions on the same
//! arguments and answer the same (the test vectors and the conformance suite run on both):
//!
//! * **Functions** (Redis 7 or later): the code is a function library, loaded once with
//!   `FUNCTION LOAD REPLACE` and called with `FCALL`. Its functions are defined once, at load;
//!   with `EVALSHA` the script's whole chunk runs on every call and defines every function
//!   again. The library and its one function are named `tollgate_<8 hex digits>`, a hash of the
//!   code ([`function_library_name`]), so two tollgate versions on one server each call their
//!   own code. A server without it answers "Function not found": the call loads the library and
//!   runs once more (the call had not run; nothing else is ever sent twice).
//! * **EVALSHA**: the script, loaded with `SCRIPT LOAD` on `NOSCRIPT`, as on any Redis.
//!
//! [`Scripting::Auto`], the default, calls `FCALL`; when the server refuses it or `FUNCTION` as
//! a command it does not know (before Redis 7) or one the user may not run (`NOPERM`), the call
//! goes on with `EVALSHA` (the refused command had not run) and the store uses `EVALSHA` from
//! then on, for its lifetime (logged once). [`Scripting::Functions`] never falls back (a server
//! without Functions fails every call); [`Scripting::Eval`] never tries Functions.
//!
//! On a **cluster**, redis-rs routes `FCALL` by its keys, like `EVALSHA`, and sends `FUNCTION
//! LOAD` to every master; a load fails if a master cannot be reached, and the call fails with
//! it (the next call loads again). A node added later loads the library on its first "Function
//! not found". On a **Sentinel** group, libraries replicate to the replicas, so a promoted
//! replica already has the library (the script cache, in contrast, does not replicate).
//! `FUNCTION FLUSH`, `FUNCTION DELETE` or a `FUNCTION RESTORE` without the library are handled
//! like a restart.
//!
//! # Source layout
//!
//! For readers of the code, one job per file: `store.rs` holds [`RedisStore`] and its builder;
//! `batch.rs` the queues that batch decisions; `protocol.rs` the wire codec of one script call (the `KEYS` and `ARGV` it sends, the packed
//! reply it reads and checks); `cluster.rs` the cross-slot protocol (limits grouped by redis-rs'
//! own slot function, the one its cluster client routes with; undo; one departure time across
//! slots); `deadline.rs` the call deadlines on the server's clock; `sentinel.rs` the connection
//! to a Sentinel group's master and how it follows a failover; `script.rs` the Lua script,
//! joined from the files of `lua/`, as a script and as a function library.

mod batch;
mod cluster;
mod deadline;
mod protocol;
mod script;
mod sentinel;
mod store;

#[doc(hidden)]
pub use protocol::decode_reply;
pub use script::Scripting;
pub use store::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_PREFIX, DEFAULT_TIMEOUT, RedisStore, RedisStoreBuilder,
    RedisStoreError,
};

/// The Lua source of the script, for inspection (`redis-benchmark` runs it in `tollgate-bench`).
pub fn script_source() -> &'static str {
    script::SOURCE
}

/// The name of the function library this version of tollgate loads, which is also the name of
/// its one function (`FCALL <name> ...`): `tollgate_` and 8 hex digits of a hash of its code.
pub fn function_library_name() -> &'static str {
    &script::LIBRARY.name
}

/// The source of the function library, as `FUNCTION LOAD` takes it, for inspection.
pub fn function_library_source() -> &'static str {
    &script::LIBRARY.source
}
