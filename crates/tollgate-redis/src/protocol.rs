//! The wire codec of one script call: the `KEYS` and `ARGV` a call sends (laid out as
//! `lua/tollgate.lua` reads them) and the reply it reads back, checked value by value. A reply the
//! client does not understand is a [`StoreError`], never a plausible decision.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;
use tollgate_core::{
    Decision, Held, Limit, MAX_SPAN_MICROS, Outcome, Reservation, Reserve, StoreError,
    StoreErrorKind, Timestamp,
};

use crate::batch::{BatchReply, Member};
use crate::deadline::ClockOffset;
use crate::script::{LEASE_CODE, LIBRARY, Mode, SCRIPT, algorithm_code};
use crate::store::{Connection, RedisStore};

/// The status of a script call that ran after its deadline and wrote nothing (`late` in
/// `lua/common.lua`).
const LATE: i64 = 4;

/// The status of the fast path's reply (`lua/fast_path.lua`): the server time, whether every
/// limit allowed (the call wrote), each bucket's state as read; the client works out the
/// decisions ([`RedisStore::expand_fast`]).
const FAST: i64 = 5;

/// When a store operation must be answered by, and whether its script calls carry that deadline
/// to the server (only the calls that charge: `decide`, `reserve`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    deadline: Instant,
    guard: bool,
}

impl Budget {
    pub(crate) fn guarded(deadline: Instant) -> Budget {
        Budget {
            deadline,
            guard: true,
        }
    }

    pub(crate) fn unguarded(deadline: Instant) -> Budget {
        Budget {
            deadline,
            guard: false,
        }
    }
}

/// One limit as the script sees it.
pub(crate) struct Item<'a> {
    pub(crate) key: String,
    pub(crate) limit: &'a Limit<'a>,
    /// The cost the script is given: the limit's, or for a give-back, the reservation's charge
    /// in µs.
    pub(crate) cost: u64,
    /// What an undo or a give-back tells the script about the state written before (see
    /// `lua/tollgate.lua`); 0 otherwise.
    pub(crate) a: u64,
    pub(crate) b: u64,
    /// For the key of a concurrency lease (whose `limit` only carries the key), what the script
    /// needs of it instead of a quota; `None` for a limit.
    pub(crate) lease: Option<LeaseArgs>,
}

/// A concurrency lease as the script reads it, in place of a limit's quota (`lua/tollgate.lua`,
/// algorithm 5): the most leases held at once, the lease's ttl (µs), and the `retry_after` of
/// a full lease (µs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseArgs {
    pub(crate) max: u32,
    pub(crate) ttl: u64,
    pub(crate) retry_after: u64,
}

/// The script's answer.
pub(crate) struct Answer {
    pub(crate) status: i64,
    pub(crate) now: u64,
    pub(crate) wait: u64,
    pub(crate) rows: Vec<Row>,
    /// A fast-path reply (status [`FAST`]): whether it wrote, and each bucket's `tat` as read;
    /// `rows` is empty until [`RedisStore::expand_fast`] fills it.
    pub(crate) fast: Option<(bool, Vec<u64>)>,
}

/// One limit's row of the answer: its decision and its state times.
#[derive(Clone, Copy)]
pub(crate) struct Row {
    pub(crate) decision: Decision,
    pub(crate) a: u64,
    pub(crate) b: u64,
}

/// A reply the client does not understand, or a protocol step that went wrong.
pub(crate) fn protocol(message: String) -> StoreError {
    StoreError::new(StoreErrorKind::Other, message)
}

pub(crate) fn map_error(e: redis::RedisError) -> StoreError {
    let kind = if e.is_timeout() {
        StoreErrorKind::Timeout
    } else if e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.is_io_error()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            redis::ErrorKind::Server(
                redis::ServerErrorKind::ClusterDown
                    | redis::ServerErrorKind::MasterDown
                    // A demoted master (Sentinel failover): a script refused at its first write
                    // wrote nothing.
                    | redis::ServerErrorKind::ReadOnly
                    | redis::ServerErrorKind::TryAgain
                    | redis::ServerErrorKind::BusyLoading
                    // A redirection the cluster client gave up following: the slot's owner could
                    // not be reached (a node down sends the request to a random node, which
                    // answers MOVED back to it). The script had not run.
                    | redis::ServerErrorKind::Moved
                    | redis::ServerErrorKind::Ask
                    // NOSCRIPT even after loading the script: on a cluster whose topology is
                    // changing (a failover), redis-rs loads it on the nodes it has connections to,
                    // which may not include the node the call then reaches. The script had not
                    // run; a later call, once the slot map is refreshed, loads it there.
                    | redis::ServerErrorKind::NoScript
            ) | redis::ErrorKind::ClusterConnectionNotFound
        )
        // The same for a library a failover's node lacks even after `FUNCTION LOAD`.
        || function_missing(&e)
    {
        StoreErrorKind::Unavailable
    } else {
        StoreErrorKind::Other
    };
    StoreError::new(kind, e)
}

/// Whether `FCALL` failed because the server does not have the library (yet): restarted,
/// `FUNCTION FLUSH`ed, a node that never had it. The call did not run.
fn function_missing(e: &redis::RedisError) -> bool {
    e.code() == Some("ERR")
        && e.detail()
            .is_some_and(|d| d.starts_with("Function not found"))
}

/// The script's reply, `3 + 8 n` (or, from the fast path, `3 + n`) little-endian 64-bit
/// integers in one string (see `packed` in `lua/common.lua`), as integers.
fn unpack(reply: &[u8], n: usize) -> Result<Vec<i64>, StoreError> {
    let words = |per_limit: usize| {
        n.checked_mul(per_limit)
            .and_then(|v| v.checked_add(3))
            .and_then(|v| v.checked_mul(8))
    };
    let (full, fast) = (words(8), words(1));
    if full != Some(reply.len()) && fast != Some(reply.len()) {
        return Err(protocol(format!(
            "unexpected script reply: {} bytes for {n} limits ({} or {} expected)",
            reply.len(),
            full.map_or_else(|| "more than can be".to_owned(), |e| e.to_string()),
            fast.map_or_else(|| "more than can be".to_owned(), |e| e.to_string()),
        )));
    }
    Ok(reply
        .chunks_exact(8)
        .map(|b| {
            let mut word = [0; 8];
            word.copy_from_slice(b);
            i64::from_le_bytes(word)
        })
        .collect())
}

/// A count or a time of the reply, which the script never sends negative.
fn non_negative(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| protocol(format!("unexpected script reply: {what} is {v}")))
}

/// A limit's count or remaining, which fits a `u32` (quotas are validated for it).
fn count(v: i64, what: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| protocol(format!("unexpected script reply: {what} is {v}")))
}

/// Reads the reply's values. Anything the script never sends (an unknown status or outcome code,
/// a negative time, a count past `u32`) is a protocol error, never a plausible decision: the
/// failure policy decides then.
fn parse(values: &[i64], n: usize) -> Result<Answer, StoreError> {
    if values.first() == Some(&FAST) {
        return parse_fast(values, n);
    }
    if values.len() != 3 + 8 * n {
        return Err(protocol(format!(
            "unexpected script reply: {} values for {n} limits",
            values.len()
        )));
    }
    let status = values[0];
    if !(0..=LATE).contains(&status) {
        return Err(protocol(format!(
            "unexpected script reply: unknown status {status}"
        )));
    }
    let now = non_negative(values[1], "the server time")?;
    let wait = non_negative(values[2], "the wait")?;
    let mut rows = Vec::with_capacity(n);
    if status != LATE {
        for r in values[3..].chunks_exact(8) {
            let outcome = match r[0] {
                0 => Outcome::Allowed,
                1 => Outcome::Denied,
                2 => Outcome::InsufficientCapacity,
                code => {
                    return Err(protocol(format!(
                        "unexpected script reply: unknown outcome code {code}"
                    )));
                }
            };
            rows.push(Row {
                decision: Decision {
                    outcome,
                    limit: count(r[1], "a limit")?,
                    remaining: count(r[2], "the remaining count")?,
                    reset_after: Duration::from_micros(non_negative(r[3], "reset_after")?),
                    retry_after: Duration::from_micros(non_negative(r[4], "retry_after")?),
                    delay: Duration::from_micros(non_negative(r[5], "a delay")?),
                },
                a: non_negative(r[6], "a state time")?,
                b: non_negative(r[7], "a state time")?,
            });
        }
    }
    Ok(Answer {
        status,
        now,
        wait,
        rows,
        fast: None,
    })
}

/// Reads a fast-path reply: status, now, whether it wrote (0 or 1), then each bucket's `tat`.
fn parse_fast(values: &[i64], n: usize) -> Result<Answer, StoreError> {
    if values.len() != 3 + n {
        return Err(protocol(format!(
            "unexpected script reply: {} values for {n} limits on the fast path",
            values.len()
        )));
    }
    let now = non_negative(values[1], "the server time")?;
    let wrote = match values[2] {
        0 => false,
        1 => true,
        other => {
            return Err(protocol(format!(
                "unexpected script reply: fast-path flag {other}"
            )));
        }
    };
    let tats = values[3..]
        .iter()
        .map(|&v| non_negative(v, "a bucket state"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Answer {
        status: 0,
        now,
        wait: 0,
        rows: Vec::new(),
        fast: Some((wrote, tats)),
    })
}

/// Decodes a script reply for `n` limits, as the store does. For the fuzz targets and tests of
/// the decoder; not part of the API.
#[doc(hidden)]
pub fn decode_reply(reply: &[u8], n: usize) -> Result<(), StoreError> {
    parse(&unpack(reply, n)?, n).map(|_| ())
}

/// A duration as the script reads it: µs, capped to the longest span the algorithms handle.
pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX)
        .min(MAX_SPAN_MICROS)
}

/// The `ARGV` of one call (`KEYS` are the items' keys): see `lua/tollgate.lua` for their order.
/// Numbers go to the command buffer as they are, never through a `String` of their own.
struct CallArgs<'a> {
    mode: Mode,
    /// Test-vector replays' client time (µs), or empty: Redis' clock.
    now: String,
    id: &'a str,
    arg4: u64,
    floor: u64,
    deadline: u64,
    items: &'a [Item<'a>],
}

/// Where [`CallArgs`] go: an `FCALL` command or an `EVALSHA` invocation.
trait ArgSink {
    fn push(&mut self, arg: impl redis::ToRedisArgs);
}

impl ArgSink for redis::Cmd {
    fn push(&mut self, arg: impl redis::ToRedisArgs) {
        self.arg(arg);
    }
}

impl ArgSink for redis::ScriptInvocation<'_> {
    fn push(&mut self, arg: impl redis::ToRedisArgs) {
        self.arg(arg);
    }
}

/// Whether a decision over `items` is one for the script's fast path: token buckets only (no
/// lease), on distinct keys. Such a decision is also one that can be batched.
pub(crate) fn fast_eligible(items: &[Item<'_>]) -> bool {
    items.iter().enumerate().all(|(i, item)| {
        item.lease.is_none()
            && item.limit.quota.algorithm() == tollgate_core::Algorithm::TokenBucket
            && items[..i].iter().all(|other| other.key != item.key)
    })
}

/// The `KEYS` and `ARGV` of one script call, as [`RedisStore::run`] sends them.
trait ScriptArgs {
    fn key_count(&self) -> usize;
    fn for_each_key(&self, f: impl FnMut(&str));
    fn push_to(&self, sink: &mut impl ArgSink);
}

/// A batch call (mode `b` of `lua/fast_path.lua`): `KEYS` are the batch's distinct keys, `ARGV`
/// 'b', now, then one string of little-endian 64-bit integers: per decision its key count and its
/// deadline, then per key its place in `KEYS` (from 1), limit, interval (µs) and cost.
struct BatchArgs<'a> {
    now: String,
    keys: Vec<&'a str>,
    packed: Vec<u8>,
}

impl<'a> BatchArgs<'a> {
    fn new(now: String, members: &[&'a Member]) -> Self {
        let words: usize = members.iter().map(|m| 2 + 4 * m.keys.len()).sum();
        let mut packed = Vec::with_capacity(8 * words);
        let mut keys: Vec<&'a str> = Vec::new();
        let mut places: HashMap<&'a str, u64> = HashMap::new();
        let put = |packed: &mut Vec<u8>, v: u64| packed.extend_from_slice(&v.to_le_bytes());
        for member in members {
            put(&mut packed, member.keys.len() as u64);
            put(&mut packed, member.server_deadline);
            for (key, args) in member.keys.iter().zip(member.args.chunks_exact(3)) {
                let place = *places.entry(key.as_str()).or_insert_with(|| {
                    keys.push(key.as_str());
                    keys.len() as u64
                });
                put(&mut packed, place);
                for &arg in args {
                    put(&mut packed, arg);
                }
            }
        }
        BatchArgs { now, keys, packed }
    }
}

impl ScriptArgs for BatchArgs<'_> {
    fn key_count(&self) -> usize {
        self.keys.len()
    }

    fn for_each_key(&self, mut f: impl FnMut(&str)) {
        for key in &self.keys {
            f(key);
        }
    }

    fn push_to(&self, sink: &mut impl ArgSink) {
        sink.push("b");
        sink.push(&self.now);
        sink.push(self.packed.as_slice());
    }
}

/// Splits a batch's reply, per decision the count of its values and then those values (8 bytes
/// each), into each decision's answer, in order.
fn split_batch(reply: &[u8], decisions: usize) -> Result<Vec<Vec<u8>>, StoreError> {
    let mut answers = Vec::with_capacity(decisions);
    let mut rest = reply;
    while let Some((head, tail)) = rest.split_first_chunk::<8>() {
        let bytes = usize::try_from(i64::from_le_bytes(*head))
            .ok()
            .and_then(|count| count.checked_mul(8))
            .filter(|&bytes| bytes <= tail.len())
            .ok_or_else(|| {
                protocol(format!(
                    "unexpected script reply: answer {} of a batch of {decisions} overruns the \
                     reply of {} bytes",
                    answers.len() + 1,
                    reply.len()
                ))
            })?;
        let (answer, tail) = tail.split_at(bytes);
        answers.push(answer.to_vec());
        rest = tail;
    }
    if !rest.is_empty() || answers.len() != decisions {
        return Err(protocol(format!(
            "unexpected script reply: {} answers ({} bytes left over) for a batch of {decisions} \
             decisions",
            answers.len(),
            rest.len()
        )));
    }
    Ok(answers)
}

impl ScriptArgs for CallArgs<'_> {
    fn key_count(&self) -> usize {
        self.items.len()
    }

    fn for_each_key(&self, mut f: impl FnMut(&str)) {
        for item in self.items {
            f(&item.key);
        }
    }

    fn push_to(&self, sink: &mut impl ArgSink) {
        self.push_call(sink);
    }
}

impl CallArgs<'_> {
    /// Whether the call is one for the script's fast path (`lua/fast_path.lua`): a decision over
    /// token buckets only, on distinct keys. It then goes in the compact layout.
    fn is_fast(&self) -> bool {
        self.mode == Mode::Decide && self.arg4 == 0 && self.floor == 0 && fast_eligible(self.items)
    }

    fn push_call(&self, sink: &mut impl ArgSink) {
        if self.is_fast() {
            // 'd', now, deadline, then limit, interval (µs) and cost per key.
            sink.push("d");
            sink.push(&self.now);
            sink.push(self.deadline);
            for item in self.items {
                let q = item.limit.quota;
                sink.push(q.limit());
                sink.push(q.interval_micros());
                sink.push(item.cost);
            }
            return;
        }
        sink.push(self.mode.as_str());
        sink.push(&self.now);
        sink.push(self.id);
        sink.push(self.arg4);
        sink.push(self.floor);
        sink.push(self.deadline);
        for item in self.items {
            if let Some(lease) = item.lease {
                sink.push(LEASE_CODE);
                sink.push(lease.max);
                sink.push(lease.ttl);
                sink.push(lease.retry_after);
                sink.push(1);
                sink.push(item.a);
                sink.push(item.b);
                continue;
            }
            let q = item.limit.quota;
            sink.push(algorithm_code(q.algorithm()));
            sink.push(q.limit());
            sink.push(q.interval_micros());
            sink.push(q.max_delay_micros());
            sink.push(item.cost);
            sink.push(item.a);
            sink.push(item.b);
        }
    }
}

impl RedisStore {
    /// The decisions of a fast-path reply, computed as the script decided them: with
    /// tollgate-core's token bucket, which `token_bucket()` in `lua/token_bucket.lua` ports, from
    /// each bucket's state as the script read it, all or nothing as `decide_all()` in
    /// `lua/tollgate.lua` (when one limit denies, the others report themselves as they stand). A
    /// reply whose verdict this does not reproduce (the script wrote and a limit denies, or the
    /// other way round) is a protocol error, never a guess.
    fn expand_fast(mut answer: Answer, items: &[Item<'_>]) -> Result<Answer, StoreError> {
        use tollgate_core::algorithm::{self, BucketState, State};
        let Some((wrote, tats)) = answer.fast.take() else {
            return Ok(answer);
        };
        let now = Timestamp::from_micros(answer.now);
        let decide = |item: &Item<'_>, tat: u64, cost: u32| {
            let state = State::Bucket(BucketState {
                tat: Timestamp::from_micros(tat),
            });
            algorithm::decide(Some(&state), now, item.limit.quota, cost)
        };
        // First as charged (`a`, `b`: the state before and after), then fixed up in place.
        let mut all = true;
        answer.rows.reserve_exact(items.len());
        for (item, &tat) in items.iter().zip(&tats) {
            let cost = u32::try_from(item.cost)
                .map_err(|_| protocol(format!("a fast-path cost of {}", item.cost)))?;
            let (decision, next) = decide(item, tat, cost);
            all &= decision.is_allowed();
            let next = match next {
                State::Bucket(b) => b.tat.as_micros(),
                _ => tat,
            };
            answer.rows.push(Row {
                decision,
                a: tat,
                b: next,
            });
        }
        if all != wrote {
            return Err(protocol(format!(
                "unexpected script reply: the fast path {} but the limits {}",
                if wrote { "wrote" } else { "did not write" },
                if all { "all allow" } else { "do not all allow" }
            )));
        }
        for (row, item) in answer.rows.iter_mut().zip(items) {
            if !all && row.decision.is_allowed() {
                // Not charged after all: how it stands.
                row.decision = decide(item, row.a, 0).0;
            }
            // The states are reported only for what was written, and only if it changed, as
            // the script does.
            if !all || row.a == row.b {
                (row.a, row.b) = (0, 0);
            }
        }
        Ok(answer)
    }

    /// One call of the Lua code over the connection, whatever its type: `FCALL` of the function
    /// library, or `EVALSHA` of the script, as [`Scripting`](crate::Scripting) and what the
    /// server supports say.
    ///
    /// A server without the library (restarted, `FUNCTION FLUSH`, a new node) answers "Function
    /// not found": the call had not run, so the library is loaded (`FUNCTION LOAD REPLACE`) and
    /// the call sent once more, as `EVALSHA` does on `NOSCRIPT`. Nothing else is ever resent.
    async fn run<C: ConnectionLike, T: redis::FromRedisValue>(
        &self,
        conn: &mut C,
        args: &impl ScriptArgs,
    ) -> Result<T, StoreError> {
        if self.inner.scripting.uses_functions() {
            let library = &*LIBRARY;
            let mut fcall = redis::cmd("FCALL");
            fcall.arg(&library.name).arg(args.key_count());
            args.for_each_key(|key| {
                fcall.arg(key);
            });
            args.push_to(&mut fcall);
            let refused = match fcall.query_async(conn).await {
                Ok(reply) => return Ok(reply),
                Err(e) if function_missing(&e) => {
                    let load = redis::cmd("FUNCTION")
                        .arg("LOAD")
                        .arg("REPLACE")
                        .arg(&library.source)
                        .query_async::<redis::Value>(conn)
                        .await;
                    match load {
                        Ok(_) => return fcall.query_async(conn).await.map_err(map_error),
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            if !self.inner.scripting.falls_back(&refused) {
                return Err(map_error(refused));
            }
        }
        let mut invocation = SCRIPT.prepare_invoke();
        args.for_each_key(|key| {
            invocation.key(key);
        });
        args.push_to(&mut invocation);
        invocation.invoke_async(conn).await.map_err(map_error)
    }

    /// The clock offset of the server holding `items` (all in one slot).
    fn offset(&self, items: &[Item<'_>]) -> &ClockOffset {
        self.inner
            .offsets
            .of(items.first().map_or("", |item| item.key.as_str()))
    }

    /// One script call: `items` and the arguments encoded, sent within `budget`, the reply
    /// decoded. A call the server ran after its deadline is a timeout (it wrote nothing).
    pub(crate) async fn call(
        &self,
        mode: Mode,
        items: &[Item<'_>],
        id: &str,
        arg4: u64,
        floor: u64,
        budget: Budget,
    ) -> Result<Answer, StoreError> {
        let now = self
            .inner
            .clock
            .as_ref()
            .map_or(String::new(), |c| c.now().as_micros().to_string());
        // A client clock (test-vector replays) is not Redis' clock: no deadline on it.
        let offset = self.offset(items);
        let deadline = if budget.guard && self.inner.clock.is_none() {
            offset.server_deadline(budget.deadline)
        } else {
            0
        };
        let args = CallArgs {
            mode,
            now,
            id,
            arg4,
            floor,
            deadline,
            items,
        };
        let sent = Instant::now();
        let reply: Vec<u8> = self
            .within(budget.deadline, async {
                match self.inner.conn.clone() {
                    Connection::Standalone(mut c) => self.run(&mut c, &args).await,
                    Connection::Cluster(mut c) => self.run(&mut c, &args).await,
                    Connection::Sentinel(mut c) => self.run(&mut c, &args).await,
                }
            })
            .await?;
        self.finish(&reply, items, offset, sent, Instant::now())
    }

    /// Reads the packed `reply` of a call over `items` sent at `sent` and answered at
    /// `received`, learning the server's clock offset from it. A call the server ran after its
    /// deadline is a timeout (it wrote nothing).
    fn finish(
        &self,
        reply: &[u8],
        items: &[Item<'_>],
        offset: &ClockOffset,
        sent: Instant,
        received: Instant,
    ) -> Result<Answer, StoreError> {
        let mut answer = parse(&unpack(reply, items.len())?, items.len())?;
        if answer.fast.is_some() {
            answer = Self::expand_fast(answer, items)?;
        }
        if self.inner.clock.is_none() {
            offset.observe(sent, received, answer.now);
        }
        if answer.status == LATE {
            return Err(StoreError::new(
                StoreErrorKind::Timeout,
                "redis ran the call after its deadline, so it wrote nothing",
            ));
        }
        Ok(answer)
    }

    /// A decision over `items` (one for the fast path, in one slot, at least one limit) through
    /// its connection's batch queue (`crate::batch`): sent at once when nothing is in flight,
    /// else with the decisions queued behind the call in flight. Answers by `deadline`. The
    /// items' keys go into the batch (taken, not copied): they are left empty.
    pub(crate) async fn decide_batched(
        &self,
        items: &mut [Item<'_>],
        deadline: Instant,
    ) -> Result<Answer, StoreError> {
        let offset = self.offset(items);
        let lane = self.inner.lanes.of(&items[0].key);
        let server_deadline = if self.inner.clock.is_none() {
            offset.server_deadline(deadline)
        } else {
            0
        };
        let mut args = Vec::with_capacity(3 * items.len());
        for item in items.iter() {
            let q = item.limit.quota;
            args.extend([u64::from(q.limit()), q.interval_micros(), item.cost]);
        }
        let member = Member {
            keys: items
                .iter_mut()
                .map(|item| std::mem::take(&mut item.key))
                .collect(),
            args,
            deadline,
            server_deadline,
        };
        let delivered = crate::batch::submit(lane, self, member).await?;
        self.finish(
            &delivered.reply,
            items,
            offset,
            delivered.sent,
            delivered.received,
        )
    }

    /// One batch call over `members` (all in one slot): their packed answers, in order. Not
    /// bounded in time by itself: the caller runs it within the batch's deadline.
    pub(crate) async fn send_batch(&self, members: &[&Member]) -> Result<BatchReply, StoreError> {
        let now = self
            .inner
            .clock
            .as_ref()
            .map_or(String::new(), |c| c.now().as_micros().to_string());
        let args = BatchArgs::new(now, members);
        let sent = Instant::now();
        let reply: Vec<u8> = match self.inner.conn.clone() {
            Connection::Standalone(mut c) => self.run(&mut c, &args).await,
            Connection::Cluster(mut c) => self.run(&mut c, &args).await,
            Connection::Sentinel(mut c) => self.run(&mut c, &args).await,
        }?;
        let received = Instant::now();
        let replies = split_batch(&reply, members.len())?;
        Ok(BatchReply {
            replies,
            sent,
            received,
        })
    }

    /// The limits as the script sees them, under their Redis keys.
    pub(crate) fn items<'a>(&self, limits: &'a [Limit<'a>]) -> Vec<Item<'a>> {
        limits
            .iter()
            .map(|limit| Item {
                key: self.redis_key(limit.key),
                limit,
                cost: u64::from(limit.cost),
                a: 0,
                b: 0,
                lease: None,
            })
            .collect()
    }

    /// Reads the answer of a `reserve` call over `items`.
    pub(crate) fn reserve_answer(
        &self,
        items: &[Item<'_>],
        answer: Answer,
    ) -> Result<Reserve, StoreError> {
        let wait = Duration::from_micros(answer.wait);
        Ok(match answer.status {
            0 => {
                let held = items
                    .iter()
                    .zip(&answer.rows)
                    .filter(|(item, _)| item.limit.quota.algorithm().is_bucket())
                    .map(|(item, row)| Held {
                        key: item.limit.key.to_owned(),
                        before: Timestamp::from_micros(row.a),
                        after: Timestamp::from_micros(row.b),
                        charge: item.limit.quota.interval() * item.limit.cost,
                    })
                    .collect();
                Reserve::Granted(Reservation::new(wait, held))
            }
            1 => Reserve::WouldExceed { retry_after: wait },
            2 => Reserve::Retry { after: wait },
            3 => Reserve::Never,
            status => {
                return Err(protocol(format!(
                    "unexpected script reply: reserve status {status}"
                )));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_of_a_call_that_did_not_run_are_unavailable() {
        use redis::{ErrorKind, RedisError, ServerErrorKind};
        let not_run = [
            RedisError::from((ErrorKind::Server(ServerErrorKind::NoScript), "NOSCRIPT")),
            RedisError::from((
                ErrorKind::Server(ServerErrorKind::ClusterDown),
                "CLUSTERDOWN",
            )),
            RedisError::from((ErrorKind::Server(ServerErrorKind::TryAgain), "TRYAGAIN")),
        ];
        for e in not_run {
            let message = e.to_string();
            assert_eq!(
                map_error(e).kind(),
                StoreErrorKind::Unavailable,
                "{message}"
            );
        }
        let other = RedisError::from((ErrorKind::UnexpectedReturnType, "not a string"));
        assert_eq!(map_error(other).kind(), StoreErrorKind::Other);
    }

    fn packed(values: &[i64]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn unpacks_the_script_reply() {
        let values: Vec<i64> = (0..11).map(|i| i * 1_000_000_007 - 3).collect();
        assert_eq!(unpack(&packed(&values), 1).ok(), Some(values));
        let big = vec![0, 1_763_800_000_000_000, i64::MAX, -1, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(unpack(&packed(&big), 1).ok(), Some(big));
    }

    /// A reply of one allowed row: status, now, wait, then the row's eight values.
    fn one_row() -> Vec<i64> {
        vec![0, 1_000, 0, 0, 10, 9, 1_000, 0, 0, 0, 0]
    }

    #[test]
    fn reads_a_plausible_reply() {
        let answer = parse(&one_row(), 1).expect("a valid reply");
        assert_eq!((answer.status, answer.now), (0, 1_000));
        assert_eq!(answer.rows[0].decision.outcome, Outcome::Allowed);
        assert_eq!(answer.rows[0].decision.remaining, 9);
        // A late call has no rows to read.
        let mut late = vec![0; 11];
        late[0] = LATE;
        assert!(parse(&late, 1).expect("a late reply").rows.is_empty());
    }

    #[test]
    fn codes_it_does_not_know_are_errors_not_decisions() {
        // (index, value): an outcome code, a status, negatives, a count past u32.
        for (i, v) in [
            (3, 3),
            (3, -1),
            (0, 5),
            (0, -1),
            (1, -1),
            (2, -7),
            (5, -1),
            (6, -1),
            (7, -2),
            (8, -3),
            (9, -4),
            (10, -5),
            (4, i64::from(u32::MAX) + 1),
            (5, i64::from(u32::MAX) + 1),
        ] {
            let mut values = one_row();
            values[i] = v;
            let e = match parse(&values, 1) {
                Ok(_) => panic!("value {v} at {i} was read as a decision"),
                Err(e) => e,
            };
            assert!(e.to_string().contains("unexpected script reply"), "{e}");
            assert!(!e.is_timeout() && !e.is_unavailable(), "{e}");
        }
    }

    proptest::proptest! {
        /// Any values the script can pack, for any number of limits, unpack to themselves.
        #[test]
        fn packed_replies_unpack_to_what_was_packed(
            n in 0usize..8,
            seed in proptest::collection::vec(proptest::prelude::any::<i64>(), 67),
        ) {
            let values = &seed[..3 + 8 * n];
            proptest::prop_assert_eq!(unpack(&packed(values), n).ok(), Some(values.to_vec()));
            // One byte short or long is refused.
            let bytes = packed(values);
            proptest::prop_assert!(unpack(&bytes[1..], n).is_err());
            proptest::prop_assert!(unpack(&[&bytes[..], &[0]].concat(), n).is_err());
        }
    }

    #[test]
    fn refuses_a_reply_of_the_wrong_size() {
        let eleven = packed(&[0; 11]);
        for bad in [&eleven[..87], &eleven[..], &[][..]] {
            let n = if bad.len() == 88 { 2 } else { 1 };
            let e = unpack(bad, n).expect_err("refused");
            assert!(e.to_string().contains("unexpected script reply"), "{e}");
        }
    }

    /// A limit of `quota` at cost 1 under key `k`, as the store passes it to the script.
    fn item<'a>(limit: &'a Limit<'a>) -> Item<'a> {
        Item {
            key: limit.key.to_owned(),
            limit,
            cost: u64::from(limit.cost),
            a: 0,
            b: 0,
            lease: None,
        }
    }

    #[test]
    fn fast_replies_are_expanded_as_the_script_decided() {
        let quota = tollgate_core::Quota::per_second(10)
            .unwrap()
            .with_burst(2)
            .unwrap();
        let limits = [Limit::new("a", &quota, 1), Limit::new("b", &quota, 1)];
        let items: Vec<Item<'_>> = limits.iter().map(item).collect();
        let now: i64 = 1_000_000_000;
        // Both fresh: both allowed, both written.
        let answer = parse(&[FAST, now, 1, 0, 0], 2).unwrap();
        let answer = RedisStore::expand_fast(answer, &items).unwrap();
        assert_eq!(answer.rows.len(), 2);
        for row in &answer.rows {
            assert!(row.decision.is_allowed());
            assert_eq!(row.decision.remaining, 1);
            assert_eq!((row.a, row.b), (0, u64::try_from(now).unwrap() + 100_000));
        }
        // `b` is full (its tat 200 ms ahead): `a` would pass, so it reports itself uncharged.
        let full = now + 200_000;
        let answer = parse(&[FAST, now, 0, 0, full], 2).unwrap();
        let answer = RedisStore::expand_fast(answer, &items).unwrap();
        assert!(answer.rows[0].decision.is_allowed());
        assert_eq!(answer.rows[0].decision.remaining, 2, "a peek, not a charge");
        assert!(!answer.rows[1].decision.is_allowed());
        // A flag the limits contradict is an error, either way round.
        for values in [[FAST, now, 1, 0, full], [FAST, now, 0, 0, 0]] {
            let answer = parse(&values, 2).unwrap();
            let e = RedisStore::expand_fast(answer, &items)
                .err()
                .expect("refused");
            assert!(e.to_string().contains("fast path"), "{e}");
        }
    }

    /// A lease goes in the general layout, its arguments in place of a quota's: code 5, max,
    /// ttl, the full lease's retry_after, cost 1, then a and b; and never on the fast path.
    #[test]
    fn a_lease_is_sent_as_the_script_reads_it() {
        let quota = tollgate_core::Quota::per_second(10).unwrap();
        let limits = [Limit::new("tier", &quota, 1), Limit::new("c", &quota, 1)];
        let mut items: Vec<Item<'_>> = limits.iter().map(item).collect();
        items[1].lease = Some(LeaseArgs {
            max: 3,
            ttl: 300_000,
            retry_after: 1_000_000,
        });
        for mode in [Mode::Decide, Mode::Lease] {
            let args = CallArgs {
                mode,
                now: String::new(),
                id: "0123456789abcdef0123456789abcdef",
                arg4: 0,
                floor: 0,
                deadline: 0,
                items: &items,
            };
            assert!(
                !args.is_fast(),
                "{mode:?}: a lease is never on the fast path"
            );
            let mut cmd = redis::cmd("FCALL");
            args.push_to(&mut cmd);
            let sent: Vec<String> = cmd
                .args_iter()
                .map(|a| match a {
                    redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                    other => panic!("an argument that is not bytes: {other:?}"),
                })
                .collect();
            assert_eq!(sent[1], mode.as_str());
            assert_eq!(sent[3], args.id);
            assert_eq!(sent.len(), 1 + 6 + 7 * 2);
            assert_eq!(&sent[7..14], ["0", "10", "100000", "0", "1", "0", "0"]);
            assert_eq!(&sent[14..], ["5", "3", "300000", "1000000", "1", "0", "0"]);
        }
    }

    /// A batch goes as mode 'b': now, then one packed string, per decision its key count and its
    /// server deadline, then per key its place among the batch's distinct keys, limit, interval
    /// and cost; the keys are the distinct ones, in first-seen order.
    #[test]
    fn a_batch_is_sent_as_the_script_reads_it() {
        let later = Instant::now();
        let one = Member {
            keys: vec!["p:a".to_owned()],
            args: vec![10, 100_000, 1],
            deadline: later,
            server_deadline: 7,
        };
        let two = Member {
            keys: vec!["p:b".to_owned(), "p:a".to_owned()],
            args: vec![5, 200_000, 2, 3, 300_000, 0],
            deadline: later,
            server_deadline: 0,
        };
        let args = BatchArgs::new(String::new(), &[&one, &two]);
        assert_eq!(args.key_count(), 2);
        let mut keys = Vec::new();
        args.for_each_key(|k| keys.push(k.to_owned()));
        assert_eq!(keys, ["p:a", "p:b"]);
        let mut cmd = redis::cmd("FCALL");
        args.push_to(&mut cmd);
        let sent: Vec<Vec<u8>> = cmd
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(bytes) => bytes.to_vec(),
                other => panic!("an argument that is not bytes: {other:?}"),
            })
            .collect();
        assert_eq!(sent.len(), 4);
        assert_eq!(sent[1], b"b");
        assert_eq!(sent[2], b"");
        let words: Vec<u64> = sent[3]
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        assert_eq!(sent[3].len(), 8 * words.len());
        assert_eq!(
            words,
            [
                1, 7, 1, 10, 100_000, 1, // one: p:a
                2, 0, 2, 5, 200_000, 2, 1, 3, 300_000, 0, // two: p:b, then p:a again
            ]
        );
    }

    /// A batch's reply splits into each decision's answer by the count before it; one that
    /// overruns, leaves bytes over or has another number of answers is refused.
    #[test]
    fn a_batch_reply_splits_by_its_counts_and_refuses_what_does_not_fit() {
        let words = |w: &[i64]| -> Vec<u8> { w.iter().flat_map(|v| v.to_le_bytes()).collect() };
        let reply = words(&[4, FAST, 9, 1, 0, 2, 7, 8]);
        let answers = split_batch(&reply, 2).expect("two answers");
        assert_eq!(answers, [words(&[FAST, 9, 1, 0]), words(&[7, 8])]);
        for (bad, decisions) in [
            (words(&[5, FAST, 9, 1, 0]), 1),
            (words(&[-1, FAST]), 1),
            (words(&[1, FAST]), 2),
            (words(&[1, FAST, 1, FAST]), 1),
            ([words(&[1, FAST]), vec![0; 3]].concat(), 1),
        ] {
            let e = split_batch(&bad, decisions).expect_err("refused");
            assert!(e.to_string().contains("unexpected script reply"), "{e}");
        }
    }

    #[test]
    fn fast_replies_it_does_not_understand_are_errors() {
        for (values, n) in [
            (vec![FAST, 1, 2, 0], 1),
            (vec![FAST, 1, 1, 0, 0], 1),
            (vec![FAST, -1, 1, 0], 1),
            (vec![FAST, 1, 1, -5], 1),
        ] {
            let e = parse(&values, n).err().expect("refused");
            assert!(
                e.to_string().contains("unexpected script reply"),
                "{values:?}: {e}"
            );
        }
    }
}
