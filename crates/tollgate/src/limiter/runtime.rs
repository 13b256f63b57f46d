//! [`OwnRuntime`]: the runtime a Limiter's blocking forms run on.

use super::error::LimitError;

/// The runtime of the blocking forms. Dropped, it shuts down in the background: a limiter may be
/// dropped anywhere, an async task included, where dropping a runtime the usual way (waiting for
/// its threads) would panic.
#[derive(Debug)]
pub(super) struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl OwnRuntime {
    pub(super) fn start() -> Result<OwnRuntime, LimitError> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tollgate-limiter")
            .enable_all()
            .build()
            .map(|runtime| OwnRuntime(Some(runtime)))
            .map_err(|e| LimitError::Runtime(e.to_string()))
    }

    pub(super) fn get(&self) -> Result<&tokio::runtime::Runtime, LimitError> {
        self.0
            .as_ref()
            .ok_or_else(|| LimitError::Runtime("the runtime was shut down".into()))
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}
