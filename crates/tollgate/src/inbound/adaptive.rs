//! Temporary stand-in for the adaptive controller (replaced by the real module).
#![allow(missing_docs, dead_code, unused_variables)]

use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveConfig {
    pub target_latency: Option<Duration>,
    pub max_in_flight: Option<u32>,
    pub quantile: f64,
    pub interval: Duration,
    pub decrease: f64,
    pub increase: f64,
    pub min_factor: f64,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        AdaptiveConfig {
            target_latency: Some(Duration::from_millis(250)),
            max_in_flight: None,
            quantile: 0.9,
            interval: Duration::from_secs(1),
            decrease: 0.7,
            increase: 0.1,
            min_factor: 0.1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AdaptiveError(&'static str);

impl AdaptiveError {
    pub fn field(&self) -> &'static str {
        self.0
    }
}

impl AdaptiveConfig {
    pub fn validate(&self) -> Result<(), AdaptiveError> {
        Ok(())
    }
}

pub struct Controller {
    config: AdaptiveConfig,
}

#[must_use]
pub struct InFlight(Arc<Controller>);

impl Controller {
    pub fn new(config: AdaptiveConfig, tiers: usize, priority: Vec<usize>) -> Controller {
        Controller { config }
    }
    pub fn start(self: &Arc<Self>) -> InFlight {
        InFlight(Arc::clone(self))
    }
    pub fn factor(&self, tier: usize) -> f64 {
        1.0
    }
    pub fn factor_ppm(&self, tier: usize) -> u32 {
        1_000_000
    }
    pub fn tick(&self, now: Instant) -> bool {
        false
    }
    pub fn spawn(
        self: &Arc<Self>,
        on_change: impl Fn(&Controller) + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async {})
    }
    pub fn config(&self) -> &AdaptiveConfig {
        &self.config
    }
    pub fn in_flight(&self) -> u32 {
        0
    }
}
