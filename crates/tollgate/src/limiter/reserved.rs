//! [`Reserved`]: a place in line, given back when dropped unused.

use std::time::{Duration, Instant};

use super::wait::Place;

/// A place in line ([`Limiter::reserve`](super::Limiter::reserve)): the call may go [`delay`](Self::delay) from now.
/// [`wait`](Self::wait) for it, or [`commit`](Self::commit) to keep it and time the call
/// yourself; [`cancel`](Self::cancel) it, or drop it unused, and the place is given back (when
/// nobody reserved after it).
#[must_use = "a reservation holds a place: wait for it, commit it, or cancel it"]
pub struct Reserved {
    /// `None` when the failure policy granted without a store (`fail_open`).
    pub(super) place: Option<Place>,
    /// When the place comes.
    pub(super) at: Instant,
}

impl std::fmt::Debug for Reserved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reserved")
            .field("delay", &self.delay())
            .finish_non_exhaustive()
    }
}

impl Reserved {
    /// How long from now until the call may go (zero when it may go now).
    pub fn delay(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Sleeps until the place comes, and uses it.
    pub async fn wait(mut self) {
        tokio::time::sleep(self.delay()).await;
        if let Some(place) = self.place.take() {
            place.keep();
        }
    }

    /// Keeps the place without waiting for it: the caller goes at [`delay`](Self::delay).
    pub fn commit(mut self) {
        if let Some(place) = self.place.take() {
            place.keep();
        }
    }

    /// Gives the place back now (when nobody reserved after it, the next caller takes it).
    pub async fn cancel(mut self) {
        if let Some(place) = self.place.take() {
            place.give_back().await;
        }
    }
}
