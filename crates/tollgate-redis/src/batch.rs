//! Batching of decisions: while one script call of a connection (of a slot, on a cluster) is in
//! flight, the decisions that arrive for it wait in a queue; when it completes, everything queued
//! (up to [`MAX_BATCH`] decisions and [`MAX_BATCH_KEYS`] keys) goes out as **one** script call,
//! mode `b` of `lua/fast_path.lua`, which decides each of them in turn, each all or nothing on
//! its own keys. A decision that finds nothing in flight goes out at once, in a call of its own:
//! there is no timer and no linger, a lone request never waits for company.
//!
//! Only decisions the fast path answers (token buckets on distinct keys, one slot) are batched;
//! see "Batching" in the [crate docs](crate).
//!
//! The one in flight is sent by whoever found the lane idle, from its own task; the batches after
//! it by a task spawned when that call completes with decisions queued, which sends batch after
//! batch until the queue is empty. Each decision keeps its own deadline: it stops waiting when
//! that passes (a timeout), and a decision whose deadline passed while queued is never sent. A
//! batch that fails gives every decision in it the error, and none is sent again.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use redis::cluster_routing::Slot;
use tokio::sync::oneshot;
use tollgate_core::{StoreError, StoreErrorKind};

use crate::protocol::protocol;
use crate::store::RedisStore;

/// The most decisions one batch call carries.
pub(crate) const MAX_BATCH: usize = 64;

/// The most keys one batch call carries (a decision with more goes alone).
pub(crate) const MAX_BATCH_KEYS: usize = 256;

/// One decision as a batch sends it: its keys (under their Redis names), per key the limit, the
/// interval (µs) and the cost, and its deadlines.
pub(crate) struct Member {
    pub(crate) keys: Vec<String>,
    /// Per key: limit, interval (µs), cost.
    pub(crate) args: Vec<u64>,
    /// When the caller stops waiting (local clock).
    pub(crate) deadline: Instant,
    /// The same deadline on the server's clock, or 0 for none (see `crate::deadline`).
    pub(crate) server_deadline: u64,
}

/// A decision's reply out of its batch's: its packed answer, and when the call was sent and its
/// reply received (for the clock offset).
pub(crate) struct Delivered {
    pub(crate) reply: Vec<u8>,
    pub(crate) sent: Instant,
    pub(crate) received: Instant,
}

/// What a batch call returns: each member's packed answer, in order, and its send and receive
/// times.
pub(crate) struct BatchReply {
    pub(crate) replies: Vec<Vec<u8>>,
    pub(crate) sent: Instant,
    pub(crate) received: Instant,
}

/// A queued decision and where its answer goes.
struct Waiting {
    member: Member,
    answer: oneshot::Sender<Result<Delivered, StoreError>>,
}

#[derive(Default)]
struct LaneState {
    /// A call of this lane is in flight (or being assembled).
    busy: bool,
    queue: VecDeque<Waiting>,
}

/// The queue of one connection (one slot on a cluster).
#[derive(Default)]
pub(crate) struct Lane {
    state: Mutex<LaneState>,
}

impl Lane {
    fn lock(&self) -> MutexGuard<'_, LaneState> {
        // The state is a flag and a queue, consistent at every point a panic could leave it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A store's lanes: one for a standalone server or a Sentinel master, one per slot (made on
/// first use) on a cluster, since one call's keys must share a slot.
pub(crate) enum Lanes {
    One(Arc<Lane>),
    PerSlot(Mutex<HashMap<Slot, Arc<Lane>>>),
}

impl Lanes {
    pub(crate) fn new(cluster: bool) -> Lanes {
        if cluster {
            Lanes::PerSlot(Mutex::new(HashMap::new()))
        } else {
            Lanes::One(Arc::default())
        }
    }

    /// The lane of the connection holding `key`.
    pub(crate) fn of(&self, key: &str) -> Arc<Lane> {
        match self {
            Lanes::One(lane) => Arc::clone(lane),
            Lanes::PerSlot(slots) => Arc::clone(
                slots
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(Slot::for_key(key))
                    .or_default(),
            ),
        }
    }
}

/// The error every member of a failed batch gets: the batch's, shared, with its size.
#[derive(Debug)]
struct BatchFailed {
    error: Arc<StoreError>,
    size: usize,
}

impl fmt::Display for BatchFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the batch call of {} decisions failed: {}",
            self.size, self.error
        )
    }
}

impl std::error::Error for BatchFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.error)
    }
}

fn shared(error: &Arc<StoreError>, size: usize) -> StoreError {
    StoreError::new(
        error.kind(),
        BatchFailed {
            error: Arc::clone(error),
            size,
        },
    )
}

/// The lane's turn to send, held by whoever sends its calls; given up on drop (also when that
/// caller stops waiting, or panics): the decisions queued meanwhile then go out from a task of
/// their own, or the lane goes idle.
struct Turn {
    lane: Arc<Lane>,
    store: RedisStore,
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut state = self.lane.lock();
        if state.queue.is_empty() {
            state.busy = false;
            return;
        }
        match tokio::runtime::Handle::try_current() {
            // The lane stays busy: the new task holds the turn.
            Ok(runtime) => {
                drop(state);
                runtime.spawn(drive(Arc::clone(&self.lane), self.store.clone()));
            }
            Err(_) => {
                state.busy = false;
                for waiting in state.queue.drain(..) {
                    // Its caller may have stopped waiting already; nothing else to tell.
                    let _ = waiting.answer.send(Err(StoreError::new(
                        StoreErrorKind::Other,
                        "no Tokio runtime to send the queued decisions on; they were not sent",
                    )));
                }
            }
        }
    }
}

/// Sends `member` as soon as the lane allows: at once if nothing is in flight, else in the batch
/// after the call in flight. Answers within the member's deadline.
pub(crate) async fn submit(
    lane: Arc<Lane>,
    store: &RedisStore,
    member: Member,
) -> Result<Delivered, StoreError> {
    let deadline = member.deadline;
    let queued = {
        let mut state = lane.lock();
        if state.busy {
            let (answer, receiver) = oneshot::channel();
            state.queue.push_back(Waiting { member, answer });
            Err(receiver)
        } else {
            state.busy = true;
            Ok(member)
        }
    };
    match queued {
        Ok(member) => {
            let _turn = Turn {
                lane,
                store: store.clone(),
            };
            let BatchReply {
                mut replies,
                sent,
                received,
            } = store.within(deadline, store.send_batch(&[&member])).await?;
            let count = replies.len();
            match replies.pop() {
                Some(reply) if count == 1 => Ok(Delivered {
                    reply,
                    sent,
                    received,
                }),
                _ => Err(protocol(format!(
                    "unexpected script reply: {count} answers for a batch of one decision"
                ))),
            }
        }
        Err(receiver) => {
            store
                .within(deadline, async {
                    receiver.await.unwrap_or_else(|_| {
                        Err(StoreError::new(
                            StoreErrorKind::Other,
                            "the batch this decision was queued for was dropped before answering",
                        ))
                    })
                })
                .await
        }
    }
}

/// Sends the lane's queued decisions, batch after batch, until the queue is empty.
async fn drive(lane: Arc<Lane>, store: RedisStore) {
    let _turn = Turn {
        lane: Arc::clone(&lane),
        store: store.clone(),
    };
    loop {
        let batch = next_batch(&lane);
        if batch.is_empty() {
            // The turn's drop makes the lane idle, or starts another driver if a decision
            // arrived in between.
            return;
        }
        let Some(deadline) = batch.iter().map(|w| w.member.deadline).max() else {
            return;
        };
        let members: Vec<&Member> = batch.iter().map(|w| &w.member).collect();
        let result = store.within(deadline, store.send_batch(&members)).await;
        let size = batch.len();
        match result {
            Ok(reply) => {
                for (waiting, answer) in batch.into_iter().zip(reply.replies) {
                    // A caller that stopped waiting (its deadline passed) already has its
                    // timeout.
                    let _ = waiting.answer.send(Ok(Delivered {
                        reply: answer,
                        sent: reply.sent,
                        received: reply.received,
                    }));
                }
            }
            Err(error) => {
                // Never sent again: the outcome of a timeout or a lost connection is unknown.
                let error = Arc::new(error);
                for waiting in batch {
                    let _ = waiting.answer.send(Err(shared(&error, size)));
                }
            }
        }
    }
}

/// Takes the next batch off the queue: the decisions still waited for, in order, up to the
/// bounds. One whose caller stopped waiting, or whose deadline has passed, is dropped unsent.
fn next_batch(lane: &Lane) -> Vec<Waiting> {
    let mut state = lane.lock();
    let now = Instant::now();
    let (mut batch, mut keys) = (Vec::new(), 0);
    while let Some(front) = state.queue.front() {
        let expired = front.answer.is_closed() || front.member.deadline <= now;
        let full = !batch.is_empty()
            && (batch.len() >= MAX_BATCH || keys + front.member.keys.len() > MAX_BATCH_KEYS);
        if full && !expired {
            break;
        }
        let Some(waiting) = state.queue.pop_front() else {
            break;
        };
        if expired {
            let _ = waiting.answer.send(Err(StoreError::new(
                StoreErrorKind::Timeout,
                "the decision's deadline passed while it was queued for a batch; it was not sent",
            )));
            continue;
        }
        keys += waiting.member.keys.len();
        batch.push(waiting);
    }
    batch
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A queued decision over `keys` keys with its deadline, and its answer's
    /// receiver.
    fn waiting(
        keys: usize,
        deadline: Instant,
    ) -> (Waiting, oneshot::Receiver<Result<Delivered, StoreError>>) {
        let (answer, receiver) = oneshot::channel();
        let member = Member {
            keys: (0..keys).map(|i| format!("k{i}")).collect(),
            args: vec![1; 3 * keys],
            deadline,
            server_deadline: 0,
        };
        (Waiting { member, answer }, receiver)
    }

    fn lane_of(members: Vec<Waiting>) -> Lane {
        let lane = Lane::default();
        lane.lock().queue.extend(members);
        lane
    }

    #[test]
    fn a_batch_is_bounded_by_decisions_and_by_keys() {
        let later = Instant::now() + Duration::from_secs(60);
        let (members, _receivers): (Vec<_>, Vec<_>) = (0..150).map(|_| waiting(1, later)).unzip();
        let lane = lane_of(members);
        let sizes: Vec<usize> = std::iter::from_fn(|| {
            let batch = next_batch(&lane);
            (!batch.is_empty()).then_some(batch.len())
        })
        .collect();
        assert_eq!(sizes, [MAX_BATCH, MAX_BATCH, 150 - 2 * MAX_BATCH]);

        // 100 keys each: two fit the key budget, not three; a decision above the budget goes
        // alone.
        let (members, _receivers): (Vec<_>, Vec<_>) = [100, 100, 100, MAX_BATCH_KEYS + 1, 1]
            .into_iter()
            .map(|keys| waiting(keys, later))
            .unzip();
        let lane = lane_of(members);
        let sizes: Vec<usize> = std::iter::from_fn(|| {
            let batch = next_batch(&lane);
            (!batch.is_empty()).then_some(batch.len())
        })
        .collect();
        assert_eq!(sizes, [2, 1, 1, 1]);
    }

    #[test]
    fn decisions_past_their_deadline_or_given_up_are_answered_and_left_out() {
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let (expired, mut expired_rx) = waiting(1, now);
        let (given_up, given_up_rx) = waiting(1, later);
        drop(given_up_rx);
        let (live, _live_rx) = waiting(1, later);
        let lane = lane_of(vec![expired, given_up, live]);
        let batch = next_batch(&lane);
        assert_eq!(batch.len(), 1, "only the live decision is sent");
        assert_eq!(batch[0].member.deadline, later);
        match expired_rx.try_recv() {
            Ok(Err(e)) => assert!(e.is_timeout(), "{e}"),
            Ok(Ok(_)) => panic!("an expired decision was answered as decided"),
            Err(e) => panic!("an expired decision was not answered: {e}"),
        }
        assert!(lane.lock().queue.is_empty());
    }
}
