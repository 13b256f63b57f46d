//! [`BuildError`]: what [`RateLimitLayerBuilder::build`](super::RateLimitLayerBuilder::build)
//! refuses.

/// A mistake [`RateLimitLayerBuilder::build`](super::RateLimitLayerBuilder::build) finds: the layer would answer some requests wrongly
/// on every call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The key extractor puts callers in a tier the policy does not define.
    #[error("tier `{tier}` (of {used_by}) is not in the policy")]
    UnknownTier {
        /// The tier.
        tier: String,
        /// Who would be put in it.
        used_by: String,
    },
    /// An API key that a request could never present as meant.
    #[error("the API key of user `{user}` is invalid: {reason}")]
    InvalidApiKey {
        /// The key's user.
        user: String,
        /// Why.
        reason: &'static str,
    },
}
