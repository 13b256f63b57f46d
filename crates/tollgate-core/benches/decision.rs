//! Micro-benchmark of a keyed token-bucket decision in the `MemoryStore`.
//!
//! `cargo bench -p tollgate-core --bench decision`. The side-by-side comparison with governor
//! lives in `tollgate-bench`.

use std::sync::LazyLock;

use divan::Bencher;
use tollgate_core::{Limit, MemoryStore, Quota};

fn main() {
    divan::main();
}

/// Generous enough that the bucket never runs dry: the benchmark measures the decision, not 429s.
static QUOTA: LazyLock<Quota> = LazyLock::new(|| {
    Quota::per_second(1_000_000)
        .and_then(|q| q.with_burst(1_000_000))
        .expect("a valid quota")
});

static KEYS: LazyLock<Vec<String>> =
    LazyLock::new(|| (0..100_000).map(|i| format!("user:{i:08}")).collect());

#[divan::bench(threads = [1, 2])]
fn hot_key(bencher: Bencher<'_, '_>) {
    let store = MemoryStore::new();
    bencher.bench(|| {
        store
            .decide_now(&[Limit::new(divan::black_box("user:hot"), &QUOTA, 1)])
            .is_allowed()
    });
}

#[divan::bench(threads = [1, 2])]
fn keys_100k(bencher: Bencher<'_, '_>) {
    let store = MemoryStore::new();
    let keys = &*KEYS;
    let mut i = 0usize;
    bencher.bench_local(move || {
        i = (i + 7_919) % keys.len();
        store
            .decide_now(&[Limit::new(&keys[i], &QUOTA, 1)])
            .is_allowed()
    });
}

#[divan::bench]
fn three_limits(bencher: Bencher<'_, '_>) {
    let store = MemoryStore::new();
    let keys = &*KEYS;
    let mut i = 0usize;
    bencher.bench_local(move || {
        i = (i + 7_919) % keys.len();
        let limits = [
            Limit::new(&keys[i], &QUOTA, 1),
            Limit::new("route:/api/search", &QUOTA, 1),
            Limit::new("global", &QUOTA, 1),
        ];
        store.decide_now(&limits).is_allowed()
    });
}
