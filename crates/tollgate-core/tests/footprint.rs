//! Measures the memory a `MemoryStore` key costs, with a counting allocator, and checks that a
//! flood of distinct keys stays within the cap in bytes too.
//!
//! Run `cargo test -p tollgate-core --test footprint -- --nocapture` to see the figures.

// A global allocator is an `unsafe impl`; it only forwards to the system allocator and counts.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use tollgate_core::{Limit, ManualClock, MemoryStore, Quota, Timestamp};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// The resident set of this process, in bytes (Linux; 0 elsewhere).
fn resident() -> isize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<isize>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Bytes per key of `keys` in a fresh store, as the allocator counts them (what was asked for)
/// and as the resident set grows (what the allocator's bookkeeping and rounding add).
fn cost_per_key(keys: &[String], quota: &Quota) -> (f64, f64) {
    let (heap, rss) = (live(), resident());
    let store = MemoryStore::builder()
        .clock(ManualClock::new(Timestamp::from_micros(1)))
        .max_keys(1_000_000)
        .build();
    for key in keys {
        assert!(store.decide_now(&[Limit::new(key, quota, 1)]).is_allowed());
    }
    assert_eq!(store.len(), keys.len());
    let n = keys.len() as f64;
    let per_key = ((live() - heap) as f64 / n, (resident() - rss) as f64 / n);
    drop(store);
    per_key
}

/// One test only: the allocator counts the whole process, so nothing may run beside it.
#[test]
fn bytes_per_key_and_a_bounded_flood() {
    let quota = Quota::per_hour(10).unwrap();
    // The keys the inbound layer really writes: a caller's tier bucket, `{<identity>}:t:<tier>`.
    for (what, keys) in [
        (
            "IPv4 caller, `{ip:10.0.3.57}:t:anonymous` (25-26 bytes)",
            (0..400_000u32)
                .map(|i| {
                    format!(
                        "{{ip:10.{}.{}.{}}}:t:anonymous",
                        i >> 16,
                        (i >> 8) & 255,
                        i & 255
                    )
                })
                .collect::<Vec<_>>(),
        ),
        (
            "IPv6 caller, `{ip:2001:db8:0:1a2b::/64}:t:anonymous` (36 bytes)",
            (0..400_000u32)
                .map(|i| {
                    format!(
                        "{{ip:2001:db8:{:x}:{:x}::/64}}:t:anonymous",
                        i >> 16,
                        i & 0xffff
                    )
                })
                .collect::<Vec<_>>(),
        ),
    ] {
        let (heap, rss) = cost_per_key(&keys, &quota);
        // The resident set only grows for the first store: later ones reuse its freed pages.
        println!(
            "MemoryStore: {heap:.0} bytes per key allocated ({rss:.0} more resident) for {what}, \
             400k keys"
        );
        assert!(heap < 160.0, "{what}: {heap:.0} bytes per key");
    }
    // Keys of 16 bytes, like "user:0000001234".
    let keys: Vec<String> = (0..200_000u32).map(|i| format!("user:{i:010}")).collect();
    assert!(keys.iter().all(|k| k.len() == 15));

    let before = live();
    let store = MemoryStore::builder()
        .clock(ManualClock::new(Timestamp::from_micros(1)))
        .max_keys(1_000_000)
        .build();
    for key in &keys {
        assert!(store.decide_now(&[Limit::new(key, &quota, 1)]).is_allowed());
    }
    let per_key = (live() - before) as f64 / keys.len() as f64;
    println!("MemoryStore: {per_key:.0} bytes per token-bucket key (15-byte keys, 200k keys)");
    assert_eq!(store.len(), keys.len());
    assert!(per_key < 160.0, "{per_key:.0} bytes per key");
    drop(store);

    // 1,000,000 distinct keys into a store capped at 50,000: memory stays at the cap's size.
    let before = live();
    let capped = MemoryStore::builder()
        .clock(ManualClock::new(Timestamp::from_micros(1)))
        .max_keys(50_000)
        .build();
    let mut peak = 0;
    let mut key = String::new();
    for i in 0..1_000_000u32 {
        use std::fmt::Write;
        key.clear();
        let _ = write!(key, "flood:{i:09}");
        capped.decide_now(&[Limit::new(&key, &quota, 1)]);
        if i % 1_000 == 0 {
            peak = peak.max(live() - before);
        }
    }
    println!(
        "flood: 1,000,000 keys into a cap of {}: {} kept, peak {} KiB",
        capped.max_keys(),
        capped.len(),
        peak / 1024
    );
    assert!(capped.len() <= capped.max_keys());
    let bound = (capped.max_keys() as f64 * per_key * 2.0) as isize;
    assert!(peak < bound, "peak {peak} bytes over {bound}");
}
