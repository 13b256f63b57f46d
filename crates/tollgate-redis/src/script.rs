//! The Lua script: the files of `lua/` joined into one, loaded once per server (`EVALSHA`, with
//! `SCRIPT LOAD` and one retry on `NOSCRIPT`).

use std::sync::LazyLock;

/// The whole script: helpers, the token bucket, the token-bucket fast path, the other four
/// algorithms, then the entry point.
pub(crate) const SOURCE: &str = concat!(
    include_str!("../lua/common.lua"),
    "\n",
    include_str!("../lua/token_bucket.lua"),
    "\n",
    include_str!("../lua/fast_path.lua"),
    "\n",
    include_str!("../lua/leaky_bucket.lua"),
    "\n",
    include_str!("../lua/fixed_window.lua"),
    "\n",
    include_str!("../lua/sliding_window_counter.lua"),
    "\n",
    include_str!("../lua/sliding_window_log.lua"),
    "\n",
    include_str!("../lua/tollgate.lua"),
);

/// Built once: hashing the source for `EVALSHA` is not free.
pub(crate) static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(SOURCE));

/// What the script is asked to do (`ARGV[1]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Decide,
    Peek,
    Earliest,
    Reserve,
    Cancel,
    Undo,
    Pause,
}

impl Mode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Mode::Decide => "decide",
            Mode::Peek => "peek",
            Mode::Earliest => "earliest",
            Mode::Reserve => "reserve",
            Mode::Cancel => "cancel",
            Mode::Undo => "undo",
            Mode::Pause => "pause",
        }
    }
}

/// The script's algorithm codes.
pub(crate) fn algorithm_code(algorithm: tollgate_core::Algorithm) -> u8 {
    use tollgate_core::Algorithm::*;
    match algorithm {
        TokenBucket => 0,
        LeakyBucket => 1,
        FixedWindow => 2,
        SlidingWindowLog => 3,
        SlidingWindowCounter => 4,
    }
}
