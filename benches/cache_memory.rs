//! Memory the response cache takes per entry: 10,000 entries of 2 KiB in
//! the structure `dispatch::ResponseCache` holds (`core::CacheStore` of
//! `CachedEntry`), measured as the growth of this process's resident set
//! (Linux `/proc/self/statm`), three times in fresh stores; and what one
//! such entry takes in the shared layer (Redis), compressed.
//!
//! `cargo bench --bench cache_memory` (a second or two). The figures are in
//! docs/CACHE.md ("Measured").

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dispatcher::core::{Bounds, CacheKey, CacheLimits, CacheStore, KeyFacts};
use dispatcher::dispatch::{CachedEntry, cache_encode};
use dispatcher::pb;

const ENTRIES: usize = 10_000;
const OUTPUT: usize = 2048;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// Model-like text: words from a small vocabulary, so compression sees
/// what a reply's text gives it (random bytes would not compress at all).
fn output(seed: usize) -> Bytes {
    const WORDS: [&str; 16] = [
        "the",
        "quarterly",
        "report",
        "shows",
        "revenue",
        "growth",
        "of",
        "in",
        "region",
        "with",
        "costs",
        "steady",
        "and",
        "margin",
        "up",
        "percent",
    ];
    let mut s = String::with_capacity(OUTPUT + 16);
    let mut x = seed as u64 * 2_654_435_761 + 1;
    while s.len() < OUTPUT {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(WORDS[(x % 16) as usize]);
        s.push(' ');
    }
    s.truncate(OUTPUT);
    Bytes::from(s)
}

fn entry(i: usize) -> Arc<CachedEntry> {
    Arc::new(CachedEntry {
        output: output(i),
        usage: pb::Usage {
            prompt_tokens: 300,
            completion_tokens: 500,
            ..Default::default()
        },
        region: "us-east-1".into(),
        model: "gpt-4o".into(),
        stored_at_ms: 1_765_000_000_000,
        expires_at_ms: 1_765_000_600_000,
    })
}

fn key(i: usize) -> CacheKey {
    let payload = format!("payload {i}");
    KeyFacts {
        tenant: "team-a",
        model: "gpt-4o",
        model_version: 1,
        scope: "",
        payload: payload.as_bytes(),
        max_output_tokens: 500,
    }
    .key()
}

fn main() {
    let limits = CacheLimits {
        total: Bounds {
            max_entries: ENTRIES,
            max_bytes: u64::MAX,
        },
        per_tenant: Bounds {
            max_entries: ENTRIES,
            max_bytes: u64::MAX,
        },
        max_entry_bytes: 1 << 20,
    };
    let tenant: Arc<str> = Arc::from("team-a");
    let now = Instant::now();
    // Made before measuring: the entries' own allocations are what a
    // stored reply costs, so they are counted; keys are 32 bytes inline.
    for round in 1..=3 {
        let before = rss_bytes();
        let mut store = CacheStore::new(limits);
        for i in 0..ENTRIES {
            let e = entry(round * ENTRIES + i);
            let bytes = e.output.len() as u64 + dispatcher::dispatch::CACHE_ENTRY_OVERHEAD;
            store
                .insert(
                    &tenant,
                    0,
                    key(round * ENTRIES + i),
                    e,
                    bytes,
                    now,
                    Duration::from_secs(600),
                )
                .expect("fits");
        }
        let after = rss_bytes();
        let grown = after.saturating_sub(before);
        println!(
            "round {round}: {ENTRIES} entries of {OUTPUT} B: RSS +{:.1} MiB, {} B an entry ({} B beyond the output); accounted {} B",
            grown as f64 / (1 << 20) as f64,
            grown / ENTRIES as u64,
            (grown / ENTRIES as u64).saturating_sub(OUTPUT as u64),
            store.totals().1,
        );
        black_box(&store);
        drop(store);
    }
    let encoded: Vec<usize> = (0..100).map(|i| cache_encode(&entry(i)).len()).collect();
    let mean = encoded.iter().sum::<usize>() / encoded.len();
    println!("shared layer (Redis value, LZ4): {mean} B an entry of {OUTPUT} B output, mean of 100");
}
