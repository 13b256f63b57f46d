//! The wait loop: reserve a place in every limit, sleep until it, give it back if the wait is
//! dropped, and honour pauses that arrive while waiting. The outbound layer and
//! [`Limiter::acquire`](super::Limiter::acquire) both wait here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate_core::{Limit, Quota, Reservation, Reserve};

use super::guarded::{Guarded, GuardedStore};

/// Why a wait ended without a place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// No room within the wait allowed: a call of the same cost could pass after `retry_after`
    /// (`None`: the cost is more than the limit can ever hold).
    Limited { retry_after: Option<Duration> },
    /// The store is unavailable and the failure policy refuses (`fail_closed`).
    Unavailable,
}

/// Waits up to `max_wait` for room in every limit, all or nothing; returns how long it waited.
/// Dropping the future while it sleeps gives the place back. A pause that starts while it sleeps
/// (here or in another process sharing the store) sends it back for a place after the pause.
pub(crate) async fn acquire(
    store: &Arc<GuardedStore>,
    limits: &[Limit<'_>],
    max_wait: Duration,
) -> Result<Duration, Refused> {
    let started = Instant::now();
    if limits.is_empty() {
        return Ok(Duration::ZERO);
    }
    let deadline = started + max_wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (reserve, local) = match store.reserve(limits, left).await {
            Guarded::Store(reserve) => (reserve, false),
            Guarded::Local(reserve) => (reserve, true),
            Guarded::Open => return Ok(started.elapsed()),
            Guarded::Closed => return Err(Refused::Unavailable),
        };
        match reserve {
            Reserve::Granted(reservation) => {
                let wait = reservation.wait();
                let place = Place::new(store, reservation, local);
                if wait.is_zero() {
                    place.keep();
                    return Ok(started.elapsed());
                }
                tokio::time::sleep(wait).await;
                // The place's time has come: it is not given back from here on.
                place.keep();
                if paused(store, limits).await {
                    // A pause started while this call waited (here or in another process): its
                    // place is before the pause end, so it must not be used. Forget it (giving
                    // it back could undo part of the pause) and take a place after the pause.
                    continue;
                }
                return Ok(started.elapsed());
            }
            Reserve::Retry { after } if after <= left => tokio::time::sleep(after).await,
            Reserve::Retry { after } => {
                return Err(Refused::Limited {
                    retry_after: Some(after),
                });
            }
            Reserve::WouldExceed { retry_after } => {
                return Err(Refused::Limited {
                    retry_after: Some(retry_after),
                });
            }
            Reserve::Never => return Err(Refused::Limited { retry_after: None }),
        }
    }
}

/// Whether any of the limits is paused now (its pause marker has no room), as a wait that held
/// a place while it slept checks before it is used.
pub(crate) async fn paused(store: &GuardedStore, limits: &[Limit<'_>]) -> bool {
    let markers: Vec<String> = limits.iter().map(|l| pause_marker(l.key)).collect();
    let peeks: Vec<Limit<'_>> = markers
        .iter()
        .zip(limits)
        .map(|(key, l)| Limit::new(key, l.quota, 1))
        .collect();
    match store.peek(&peeks).await {
        // A shaping (leaky) bucket admits with a delay what a token bucket refuses.
        Guarded::Store(verdict) | Guarded::Local(verdict) => {
            !verdict.is_allowed() || !verdict.delay().is_zero()
        }
        Guarded::Open => false,
        Guarded::Closed => true,
    }
}

/// Pauses `key` for `duration`: nobody passes it until then, fleet-wide through a shared store.
/// The key itself is paused, so new waits take places after the pause, and so is its marker, so
/// that waits already holding a place before the pause end see it ([`paused`]) and wait too.
pub(crate) async fn pause(store: &GuardedStore, key: &str, quota: &Quota, duration: Duration) {
    store.pause(key, quota, duration).await;
    store.pause(&pause_marker(key), quota, duration).await;
}

/// The key marking a limit's pause: only [`pause`] writes it, so a peek of one unit is refused
/// exactly until the pause ends (a token bucket paused until `t` lets its first unit through at
/// `t`). The suffix keeps any `{hash tag}` of the key, so on Redis Cluster the marker lives in
/// the key's slot.
fn pause_marker(key: &str) -> String {
    format!("{key}:paused")
}

/// A place in line that is given back when dropped before it is kept: a wait dropped while it
/// sleeps, a [`Reserved`](super::Reserved) dropped unused.
pub(crate) struct Place {
    store: Arc<GuardedStore>,
    reservation: Option<Reservation>,
    /// Taken in the local fallback (given back there).
    local: bool,
}

impl Place {
    pub(crate) fn new(store: &Arc<GuardedStore>, reservation: Reservation, local: bool) -> Place {
        Place {
            store: Arc::clone(store),
            reservation: Some(reservation),
            local,
        }
    }

    /// Uses the place: it is not given back.
    pub(crate) fn keep(mut self) {
        self.reservation = None;
    }

    /// Gives the place back now.
    pub(crate) async fn give_back(mut self) {
        if let Some(reservation) = self.reservation.take() {
            self.store.cancel(&reservation, self.local).await;
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let Some(reservation) = self.reservation.take() else {
            return;
        };
        if reservation.held().is_empty() {
            return;
        }
        let store = Arc::clone(&self.store);
        let local = self.local;
        // A place that cannot be given back stays taken until its time passes: later calls wait
        // longer than they need to. Said and counted, never dropped in silence.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move { store.cancel(&reservation, local).await });
            }
            Err(e) => store.compensation_failed("cancel", &e),
        }
    }
}
