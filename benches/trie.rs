//! Benchmarks of the router's filter trie and retained store at 100k scale.
//!
//! Run briefly: `cargo bench --bench trie -- --warm-up-time 1 --measurement-time 2`.
//! Before timing, prints the heap estimate and the RSS growth per
//! subscription / retained topic (Linux `/proc/self/status`).

use std::hint::black_box;

use criterion::{criterion_group, Criterion};
use shardmq::router::{FilterTrie, RetainedStore};

const SITES: u32 = 100;
const DEVICES: u32 = 1000;

/// 100,000 device-gateway subscriptions plus 1% wildcard filters.
fn build_trie() -> FilterTrie<u32, u8> {
    let mut trie = FilterTrie::new();
    let mut key = 0u32;
    for site in 0..SITES {
        for dev in 0..DEVICES {
            trie.insert(&format!("site/{site}/device/{dev}/+"), key, 1);
            key += 1;
        }
    }
    for n in 0..500 {
        trie.insert(&format!("site/{n}/#"), key, 2);
        trie.insert(&format!("+/+/device/{n}/status"), key + 1, 3);
        key += 2;
    }
    trie
}

/// 100,000 retained topics `site/{s}/device/{d}/status`.
fn build_retained() -> RetainedStore<u32> {
    let mut store = RetainedStore::new();
    for site in 0..SITES {
        for dev in 0..DEVICES {
            store.insert(&format!("site/{site}/device/{dev}/status"), dev);
        }
    }
    store
}

/// Resident set size in bytes, from /proc/self/status.
fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn report_memory() {
    let before = rss_bytes();
    let trie = build_trie();
    let after = rss_bytes();
    let n = trie.len();
    println!(
        "trie: {n} subscriptions, {} filters, {} nodes; heap estimate {:.0} B/sub, RSS growth {:.0} B/sub",
        trie.filter_count(),
        trie.node_count(),
        trie.heap_bytes() as f64 / n as f64,
        after.saturating_sub(before) as f64 / n as f64,
    );
    drop(trie);
    let before = rss_bytes();
    let store = build_retained();
    let after = rss_bytes();
    println!(
        "retained: {} topics; RSS growth {:.0} B/topic (incl. full topic strings)",
        store.len(),
        after.saturating_sub(before) as f64 / store.len() as f64,
    );
}

fn bench_trie(c: &mut Criterion) {
    let mut trie = build_trie();
    // Matches site/7/device/42/+, site/7/#, +/+/device/42/status.
    let hit = "site/7/device/42/status";
    let mut n = 0;
    trie.for_each_match(hit, |_, _| n += 1);
    assert_eq!(n, 3);
    c.bench_function("trie/for_each_match/3_hits", |b| {
        b.iter(|| {
            let mut sum = 0u32;
            trie.for_each_match(black_box(hit), |k, _| sum += k);
            sum
        })
    });
    let mut small: FilterTrie<u32, u8> = FilterTrie::new();
    for (k, f) in ["site/7/device/42/+", "site/7/#", "+/+/device/42/status"]
        .iter()
        .enumerate()
    {
        small.insert(f, k as u32, 1);
    }
    c.bench_function("trie/for_each_match/3_hits_3_filter_trie", |b| {
        b.iter(|| {
            let mut sum = 0u32;
            small.for_each_match(black_box(hit), |k, _| sum += k);
            sum
        })
    });
    let miss = "other/7/device/42/status/x";
    c.bench_function("trie/for_each_match/no_hit", |b| {
        b.iter(|| {
            let mut sum = 0u32;
            trie.for_each_match(black_box(miss), |k, _| sum += k);
            sum
        })
    });
    c.bench_function("trie/insert+remove/new_filter", |b| {
        b.iter(|| {
            trie.insert(black_box("site/7/device/new/+"), 7, 1);
            trie.remove(black_box("site/7/device/new/+"), &7)
        })
    });
    c.bench_function("trie/insert+remove/existing_filter", |b| {
        b.iter(|| {
            trie.insert(black_box("site/7/device/42/+"), 1_000_000, 1);
            trie.remove(black_box("site/7/device/42/+"), &1_000_000)
        })
    });
}

fn bench_retained(c: &mut Criterion) {
    let store = build_retained();
    let mut n = 0;
    store.for_each_match("site/7/#", |_, _| n += 1);
    assert_eq!(n, DEVICES as usize);
    c.bench_function("retained/for_each_match/site_7_hash_1000_hits", |b| {
        b.iter(|| {
            let mut sum = 0u32;
            store.for_each_match(black_box("site/7/#"), |_, v| sum += v);
            sum
        })
    });
    c.bench_function("retained/for_each_match/exact", |b| {
        b.iter(|| {
            let mut sum = 0u32;
            store.for_each_match(black_box("site/7/device/42/status"), |_, v| sum += v);
            sum
        })
    });
}

criterion_group!(benches, bench_trie, bench_retained);

fn main() {
    report_memory();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
