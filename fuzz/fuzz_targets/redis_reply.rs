//! The decoder of the Redis script's packed reply: any bytes, for any number of limits, decode or
//! are a protocol error, never a panic and never a decision the script cannot send.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&n, reply)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 8);
    if let Err(e) = tollgate_redis::decode_reply(reply, n) {
        assert!(!e.is_timeout() && !e.is_unavailable(), "{e}");
    }
    // Sizes that would overflow the expected length are refused, not computed.
    let _ = tollgate_redis::decode_reply(reply, usize::MAX / 4);
});
