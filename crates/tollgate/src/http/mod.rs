//! What any HTTP front end needs, used by both layers and usable on its own.
//!
//! * [`headers`]: the rate-limit headers of a response (`RateLimit`, `RateLimit-Policy`,
//!   `X-RateLimit-*`, `Retry-After`);
//! * [`problem`]: the `application/problem+json` bodies of a 429 and the other answers;
//! * [`forwarded`]: the client behind trusted proxies (`X-Forwarded-For`, `Forwarded`);
//! * [`key`]: rate-limit keys of an address, and keys of bounded length;
//! * [`body`]: the response body of a layer that may answer without calling its service.
//!
//! Nothing here depends on the layers or the limiter above it.

pub mod body;
pub mod forwarded;
pub mod headers;
pub mod key;
pub mod problem;

pub use forwarded::{ForwardedHeader, TrustedProxies};
pub use headers::{HeaderMode, RateLimitInfo};
