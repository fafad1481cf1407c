//! Long-history benchmark: a store holding a long synthetic history of
//! one guest (a 40 Hz day is 3.5 million epochs), and what it costs to
//! keep and to look into as it grows. The baseline is the same store in
//! the same run: each operation at the far end of the history against
//! the same operation near its start, and the ingest rate of the last
//! tenth of the epochs against the first tenth. None of them should grow
//! faster than the work it does.
//!
//! The guest: `REMUS_BENCH_PAGES` pages (default 4096: 16 MiB); each epoch
//! writes `REMUS_BENCH_DIRTY` pages (default 4) of new content at random
//! (64 bytes of a page, the rest zero: stored compressed, as the backup
//! stores pages);
//! at 60% of the history it writes a marker into a page no other epoch
//! writes (what `bisect` looks for). Epochs are 25 ms apart by their
//! times and committed in synced batches of 1000, as a busy backup does.
//!
//! Measured: ingest (epochs/s, first and last tenth), store bytes per
//! epoch, listing every manifest (`remus log`), `show`, a restore of the
//! whole memory, `bisect` for the marker (epochs read and seconds), near
//! the start and at the end; then thinning to one epoch per second and
//! GC.
//!
//! `cargo bench -p remus-cli --bench long_history` (`REMUS_BENCH_EPOCHS`,
//! default 100000; the figures in docs/benchmarks.md also at 1000000;
//! `REMUS_BENCH_DIR` for the store's directory).

use std::path::Path;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use remus_restore::inspect::{self, Predicate};
use remus_restore::{RestorePlan, Target};
use remus_store::{EpochCommit, KeepRule, RetentionPolicy, Store, StoreOptions, StoredChunk};
use remus_types::{content_id, EpochId, GuestId, MemoryDigest, Pfn, PAGE_SIZE};

mod common;

const GUEST: GuestId = GuestId(1);
const MARKER: &[u8] = b"remus-long-history-marker";
const BATCH: u64 = 1000;
const PERIOD_NS: u64 = 25_000_000;

/// Bytes of every file under `p`, RocksDB's write-ahead log included:
/// the history is measured as ingest leaves it, before any flush (unlike
/// the history bench's `dir_bytes`, which measures a compacted store and
/// leaves the logs out; at 100 000 epochs everything is still in the log).
fn dir_bytes(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let m = e.metadata().expect("metadata");
            if m.is_dir() {
                dir_bytes(&e.path())
            } else {
                m.len()
            }
        })
        .sum()
}

/// Seconds of `f`, and its result.
fn timed<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let t0 = Instant::now();
    let r = f();
    (t0.elapsed().as_secs_f64(), r)
}

fn main() {
    remus_sys::keep_freed_memory();
    let setting = |name: &str, default: &str| common::env_list::<u64>(name, default)[0];
    let (epochs, pages, dirty) =
        (setting("REMUS_BENCH_EPOCHS", "100000"), setting("REMUS_BENCH_PAGES", "4096"), setting("REMUS_BENCH_DIRTY", "4"));
    let base = std::env::var_os("REMUS_BENCH_DIR").map_or_else(std::env::temp_dir, std::path::PathBuf::from);
    let dir = tempfile::tempdir_in(base).expect("tempdir");
    let store_dir = dir.path().join("store");
    let store = Store::open(&store_dir, StoreOptions::default()).expect("store");
    let marker_epoch = epochs * 6 / 10;
    let marker_pfn = pages - 1;
    println!(
        "long-history benchmark: {epochs} epochs of a {pages}-page guest, {dirty} pages written per epoch, a marker at epoch {marker_epoch}"
    );

    // Ingest.
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    let mut digest = MemoryDigest::zeroed(pages);
    let t_start = 1_700_000_000_000_000_000u64;
    let mut rates = Vec::new();
    let mut e = 1u64;
    let t_all = Instant::now();
    while e <= epochs {
        let mut batch = Vec::with_capacity(BATCH as usize);
        let t0 = Instant::now();
        for epoch in e..=(e + BATCH - 1).min(epochs) {
            let mut c = EpochCommit {
                guest: GUEST,
                epoch: EpochId(epoch),
                page_count: pages,
                time_unix_ns: t_start + epoch * PERIOD_NS,
                commit_unix_ns: t_start + epoch * PERIOD_NS,
                ..EpochCommit::default()
            };
            let mut write = |pfn: u64, page: Vec<u8>| {
                let id = content_id(&page);
                digest.set(Pfn(pfn), id);
                c.pages.push((Pfn(pfn), id));
                c.chunks.push((id, StoredChunk::Zstd(remus_types::zstd_compress(&page, 1).expect("zstd"))));
            };
            for pfn in rand::seq::index::sample(&mut rng, (pages - 1) as usize, dirty as usize) {
                let mut page = vec![0u8; PAGE_SIZE];
                page[..8].copy_from_slice(&epoch.to_le_bytes());
                rng.fill(&mut page[8..64]);
                write(pfn as u64, page);
            }
            if epoch == marker_epoch {
                let mut page = vec![0u8; PAGE_SIZE];
                page[..MARKER.len()].copy_from_slice(MARKER);
                write(marker_pfn, page);
            }
            c.pages.sort_unstable_by_key(|(p, _)| *p);
            c.memory_root = digest.root();
            batch.push(c);
        }
        let n = batch.len() as u64;
        store.commit_many(batch).expect("commit");
        rates.push(n as f64 / t0.elapsed().as_secs_f64());
        e += n;
    }
    let ingest_s = t_all.elapsed().as_secs_f64();
    let tenth = (rates.len() / 10).max(1);
    let mean = |r: &[f64]| r.iter().sum::<f64>() / r.len() as f64;
    let (first, last) = (mean(&rates[..tenth]), mean(&rates[rates.len() - tenth..]));
    let bytes = dir_bytes(&store_dir);
    println!("ingest: {:.0} epochs/s overall ({ingest_s:.1} s)", epochs as f64 / ingest_s);
    println!("ingest rate, first tenth {first:.0} epochs/s, last tenth {last:.0} epochs/s (last / first = {:.2})", last / first);
    println!("store: {:.1} MB, {:.0} bytes per epoch", bytes as f64 / 1e6, bytes as f64 / epochs as f64);

    // Looking into it: near the start against the far end.
    let near = EpochId((epochs / 100).max(2));
    let far = EpochId(epochs);
    let (log_s, ms) = timed(|| store.manifests(GUEST).expect("manifests"));
    assert_eq!(ms.len() as u64, epochs);
    println!("log: every manifest listed in {log_s:.2} s ({:.1} µs per epoch)", log_s * 1e6 / epochs as f64);
    let (tail_s, tail) = timed(|| store.last_manifests(GUEST, 10).expect("last manifests"));
    assert_eq!(tail.last().map(|m| m.epoch), Some(EpochId(epochs)));
    println!("log --last 10: {:.3} ms", tail_s * 1e3);
    println!("{:<28} {:>12} {:>12} {:>10}", "operation", "near (ms)", "far (ms)", "far/near");
    let row = |what: &str, a: f64, b: f64| println!("{what:<28} {:>12.3} {:>12.3} {:>10.2}", a * 1e3, b * 1e3, b / a);
    let show = |e: EpochId| timed(|| inspect::show(&store, GUEST, e).expect("show")).0;
    row("show", show(near), show(far));
    let img = dir.path().join("restore.img");
    let restore = |e: EpochId| {
        let (s, report) = timed(|| {
            let plan = RestorePlan::new(&store, GUEST, Target::Epoch(e)).expect("plan");
            plan.execute(&store, &img, |_, _| {}).expect("restore")
        });
        (s, report.pages_written)
    };
    // Each once to warm the caches, then alternated, the best of three.
    let (_, _) = (restore(near), restore(far));
    let best = |e: EpochId| (0..3).map(|_| restore(e)).min_by(|a, b| a.0.total_cmp(&b.0)).expect("three runs");
    let ((r_near, p_near), (r_far, p_far)) = (best(near), best(far));
    row("restore (whole memory)", r_near, r_far);
    row("restore, per 1000 pages", r_near * 1e3 / p_near as f64, r_far * 1e3 / p_far as f64);
    let marker = Predicate::Equals { address: marker_pfn * PAGE_SIZE as u64, value: MARKER.to_vec() };
    let bisect = |from: EpochId, to: EpochId| {
        let (s, b) = timed(|| inspect::bisect(&store, GUEST, from, to, &marker).expect("bisect"));
        assert_eq!(b.first, Some(EpochId(marker_epoch)), "bisect finds the marker's epoch");
        (s, b.probes.len())
    };
    // Over a window of about 1% of the history, and over all of it.
    let window = (epochs / 100).max(4);
    let ((s_small, n_small), (s_all, n_all)) =
        (bisect(EpochId(marker_epoch - window / 2), EpochId(marker_epoch + window / 2)), bisect(EpochId(1), far));
    row("bisect", s_small, s_all);
    println!(
        "bisect: {n_small} epochs read over {window} epochs, {n_all} over {epochs} (log2 n + 2 = {})",
        (epochs as f64).log2().ceil() as u64 + 2
    );

    // Thinning to one epoch per second (every 40th), then GC.
    let policy = RetentionPolicy { rules: vec![KeepRule { within: Duration::from_secs(u64::MAX / 4), every: Duration::from_secs(1) }] };
    let (thin_s, report) = timed(|| store.thin(GUEST, &policy, far).expect("thin"));
    let (gc_s, gc) = timed(|| store.gc().expect("gc"));
    println!("thin to 1/s: {thin_s:.2} s ({} epochs dropped, {} page versions dropped)", report.epochs_dropped, report.pages_dropped);
    println!("gc: {gc_s:.2} s ({} chunks live, {} deleted)", gc.live, gc.deleted);
    store.compact().expect("compact");
    println!("store after thinning, GC and compaction: {:.1} MB", dir_bytes(&store_dir) as f64 / 1e6);
}
