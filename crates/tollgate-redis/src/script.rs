//! The Lua code: the files of `lua/` joined into one source, served two ways.
//!
//! * As an `EVAL` script ([`SCRIPT`], run with `EVALSHA`, loaded with `SCRIPT LOAD` and retried
//!   once on `NOSCRIPT`): the chunk runs on every call, so every `local function` of it is
//!   created again each time. The fast path therefore comes right after the helpers it needs,
//!   and answers before the rest of the chunk defines the general path.
//! * As a function library ([`LIBRARY`], run with `FCALL`, loaded with `FUNCTION LOAD REPLACE`
//!   and retried once when the server does not have it): the chunk runs once, at load, and
//!   registers one function; a call runs only that function.
//!
//! Both run the same functions on the same arguments (the entry points take `KEYS` and `ARGV` as
//! parameters), so both answer the same.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// The files of `lua/`, in order: helpers, the token bucket, the token-bucket fast path, the
/// other four algorithms, then the general entry point.
macro_rules! lua {
    (common) => {
        concat!(
            include_str!("../lua/common.lua"),
            "\n",
            include_str!("../lua/token_bucket.lua"),
            "\n",
            include_str!("../lua/fast_path.lua"),
            "\n",
        )
    };
    (rest) => {
        concat!(
            include_str!("../lua/leaky_bucket.lua"),
            "\n",
            include_str!("../lua/fixed_window.lua"),
            "\n",
            include_str!("../lua/sliding_window_counter.lua"),
            "\n",
            include_str!("../lua/sliding_window_log.lua"),
            "\n",
            include_str!("../lua/tollgate.lua"),
            "\n",
        )
    };
}

/// The `EVAL` script: the fast path answers as soon as it is defined, the general path at the
/// end.
pub(crate) const SOURCE: &str = concat!(
    lua!(common),
    "do\n  local fast = fast_decide(KEYS, ARGV)\n  if fast then\n    return fast\n  end\nend\n",
    lua!(rest),
    "return tollgate(KEYS, ARGV)\n",
);

/// The function library's code, without its name (the `#!lua` line and the registration, which
/// carry it): the same functions, registered as one callback.
const LIBRARY_BODY: &str = concat!(lua!(common), lua!(rest));

/// The library's callback, after `function_name=`.
const CALLBACK: &str =
    "callback = function(keys, args) return fast_decide(keys, args) or tollgate(keys, args) end";

/// Built once: hashing the source for `EVALSHA` is not free.
pub(crate) static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(SOURCE));

/// The function library: its name (also its one function's name) and its source.
pub(crate) struct Library {
    pub(crate) name: String,
    pub(crate) source: String,
}

/// Built once. The name carries a hash of the code, `tollgate_<8 hex digits>`, so two versions
/// of tollgate sharing a server each load and call their own library instead of replacing or
/// calling the other's.
pub(crate) static LIBRARY: LazyLock<Library> = LazyLock::new(|| {
    let name = format!("tollgate_{:08x}", fnv1a32(&[LIBRARY_BODY, CALLBACK]));
    let source = format!(
        "#!lua name={name}\n{LIBRARY_BODY}redis.register_function{{ function_name = '{name}', \
         {CALLBACK} }}\n"
    );
    Library { name, source }
});

/// 32-bit FNV-1a over `parts`, in order: a stable, dependency-free hash for the library's name
/// (not a security measure: it tells versions apart, nothing else).
fn fnv1a32(parts: &[&str]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for part in parts {
        for &byte in part.as_bytes() {
            h ^= u32::from(byte);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

/// How a [`RedisStore`](crate::RedisStore) runs its Lua code on the server: see
/// [`RedisStoreBuilder::scripting`](crate::RedisStoreBuilder::scripting) and "Functions or
/// EVALSHA" in the [crate docs](crate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Scripting {
    /// Redis Functions where the server has them, else `EVALSHA` (the default). The first call
    /// that a server refuses `FCALL` or `FUNCTION LOAD` as a command it does not know (Redis
    /// before 7) or a user may not run (`NOPERM`) switches the store to `EVALSHA` for good.
    #[default]
    Auto,
    /// Always `FCALL` of tollgate's function library, loaded with `FUNCTION LOAD REPLACE`
    /// (Redis 7 or later). A server without Functions fails every call.
    Functions,
    /// Always `EVALSHA` of the script, loaded with `SCRIPT LOAD`, as before Redis 7.
    Eval,
}

/// A store's [`Scripting`], and whether `Auto` found the server without Functions.
#[derive(Debug)]
pub(crate) struct ScriptingState {
    chosen: Scripting,
    eval_only: AtomicBool,
}

impl ScriptingState {
    pub(crate) fn new(chosen: Scripting) -> Self {
        ScriptingState {
            chosen,
            eval_only: AtomicBool::new(chosen == Scripting::Eval),
        }
    }

    /// Whether the next call tries `FCALL`.
    pub(crate) fn uses_functions(&self) -> bool {
        !self.eval_only.load(Ordering::Relaxed)
    }

    /// Whether a call whose `FCALL` (or `FUNCTION LOAD`) failed with `error` goes on with
    /// `EVALSHA`: only with `Auto`, and only when the server says it has no Functions or will
    /// not let this user run them; the store then stays on `EVALSHA`. Any other error (a
    /// timeout, a dropped connection, a script error) is the call's error: the call may have
    /// run, and is never sent again.
    pub(crate) fn falls_back(&self, error: &redis::RedisError) -> bool {
        if self.chosen != Scripting::Auto || !refuses_functions(error) {
            return false;
        }
        if !self.eval_only.swap(true, Ordering::Relaxed) {
            tracing::info!(%error, "redis: no Functions on this server; using EVALSHA");
        }
        true
    }
}

/// Whether the server refused `FCALL` / `FUNCTION` themselves (the call did not run): a command
/// it does not know, or one the user may not run. A `NOPERM` for anything else (a command the
/// code runs inside, a key) is not: the call may have written part of its work already, so it is
/// the call's error, never a reason to run it again through `EVALSHA`.
fn refuses_functions(error: &redis::RedisError) -> bool {
    match error.code() {
        Some("NOPERM") => error.detail().is_some_and(|d| {
            let d = d.to_ascii_lowercase();
            d.contains("'fcall'") || d.contains("'function")
        }),
        Some("ERR") => error.detail().is_some_and(|d| {
            let d = d.to_ascii_lowercase();
            d.starts_with("unknown command") || d.starts_with("unknown subcommand")
        }),
        _ => false,
    }
}

/// What the script is asked to do (`ARGV[1]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Decide,
    /// A decision that also takes a concurrency lease (the call's last key).
    Lease,
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
            Mode::Lease => "lease",
            Mode::Peek => "peek",
            Mode::Earliest => "earliest",
            Mode::Reserve => "reserve",
            Mode::Cancel => "cancel",
            Mode::Undo => "undo",
            Mode::Pause => "pause",
        }
    }
}

/// The script's code for a concurrency lease, in the algorithm slot of its key's arguments.
pub(crate) const LEASE_CODE: u8 = 5;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_name_is_versioned_by_its_code() {
        let name = &LIBRARY.name;
        assert_eq!(name.len(), "tollgate_".len() + 8, "{name}");
        assert!(name.starts_with("tollgate_"), "{name}");
        assert!(
            name["tollgate_".len()..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit())
        );
        assert!(LIBRARY.source.starts_with(&format!("#!lua name={name}\n")));
        // Any change to the code changes the name.
        assert_ne!(
            fnv1a32(&[LIBRARY_BODY, CALLBACK]),
            fnv1a32(&[LIBRARY_BODY, " "])
        );
        assert_ne!(fnv1a32(&["ab"]), fnv1a32(&["ba"]));
    }

    #[test]
    fn no_code_reads_the_eval_globals_outside_the_entry_points() {
        // A function library has no KEYS/ARGV globals: only the entry points' parameters, and
        // the EVAL chunk's own glue, may name them.
        for (file, text) in [
            ("common.lua", include_str!("../lua/common.lua")),
            ("token_bucket.lua", include_str!("../lua/token_bucket.lua")),
            ("leaky_bucket.lua", include_str!("../lua/leaky_bucket.lua")),
            ("fixed_window.lua", include_str!("../lua/fixed_window.lua")),
            (
                "sliding_window_counter.lua",
                include_str!("../lua/sliding_window_counter.lua"),
            ),
            (
                "sliding_window_log.lua",
                include_str!("../lua/sliding_window_log.lua"),
            ),
        ] {
            for line in text.lines().filter(|l| !l.trim_start().starts_with("--")) {
                assert!(
                    !line.contains("KEYS") && !line.contains("ARGV"),
                    "{file}: {line}"
                );
            }
        }
    }
}
