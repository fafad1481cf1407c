//! Epoch benchmark: pause time and wire bytes per dirty page of remus's
//! capture + encoding, against baselines measured in the same run on the
//! same guest and workload:
//! - pause: write-protect scanning (remus) vs page-hash scanning vs a
//!   full copy of guest memory at every epoch (no dirty tracking);
//! - wire: remus encodings vs raw pages (4096 bytes + page number each);
//! - a first copy (128 MiB of text-like pages, a tenth random) encoded on
//!   one thread vs the default threads, alternated.
//!
//! `cargo bench -p remus-cli --bench epoch` (set REMUS_BENCH_MIB and
//! REMUS_BENCH_EPOCHS to change the 1024 MiB / 200 epoch defaults).

use std::sync::Arc;
use std::time::{Duration, Instant};

use remus_capture::{ArenaConfig, ArenaGuest, EpochEngine, OutputBuffer, TrackingMode};
use remus_types::GuestId;
use remus_wan::{EncoderConfig, PageEncoder, PageRecord, Writer};

fn pct(v: &mut [u64], p: f64) -> f64 {
    v.sort_unstable();
    let i = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[i.clamp(1, v.len()) - 1] as f64 / 1e6
}

struct Run {
    pauses: Vec<u64>,
    dirty: u64,
    wire: u64,
}

fn run(mib: u64, epochs: usize, tracking: Option<TrackingMode>) -> Run {
    let out = Arc::new(OutputBuffer::default());
    let cfg = ArenaConfig { memory_mib: mib, tracking: tracking.unwrap_or(TrackingMode::WriteProtect), ..ArenaConfig::default() };
    let guest = ArenaGuest::start(&cfg, Arc::clone(&out)).expect("arena guest");
    let mut engine = EpochEngine::new(GuestId(1), guest, out, Duration::from_millis(25), Instant::now());
    remus_sys::raise_priority();
    let mut enc = PageEncoder::new(EncoderConfig::default());
    let mut r = Run { pauses: Vec::new(), dirty: 0, wire: 0 };
    let period = Duration::from_millis(25);
    // The full-copy baseline copies into one buffer, faulted in up front.
    let mut copy = if tracking.is_none() { vec![1u8; (mib << 20) as usize] } else { Vec::new() };
    let mut next = Instant::now() + period;
    for _ in 0..epochs {
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        next += period;
        if tracking.is_none() {
            // Baseline: no dirty tracking, copy all of memory in the pause.
            let t0 = Instant::now();
            engine.guest().snapshot_into(&mut copy);
            r.pauses.push(t0.elapsed().as_nanos() as u64);
            std::hint::black_box(&copy);
            continue;
        }
        let cp = engine.seal(remus_types::now_unix_nanos()).expect("seal");
        r.pauses.push(cp.pause_ns);
        r.dirty += cp.pfns.len() as u64;
        let mut w = Writer::default();
        for (i, pfn) in cp.pfns.iter().enumerate() {
            let rec: PageRecord = enc.encode(cp.epoch, *pfn, cp.page(i));
            rec.encode(&mut w);
        }
        r.wire += w.len() as u64;
    }
    r
}

/// A first copy's encoding time on `threads` threads, ms.
fn first_copy(pages: &[Vec<u8>], threads: usize) -> f64 {
    let mut enc = PageEncoder::new(EncoderConfig { threads, ..EncoderConfig::default() });
    let pfns: Vec<remus_types::Pfn> = (0..pages.len() as u64).map(remus_types::Pfn).collect();
    let t0 = Instant::now();
    let hashes: Vec<remus_types::ChunkId> = pages.iter().map(|p| remus_types::content_id(p)).collect();
    let records = enc.encode_pages(remus_types::EpochId(1), &pfns, |i| &pages[i], &hashes);
    std::hint::black_box(records);
    t0.elapsed().as_secs_f64() * 1e3
}

/// 128 MiB of pages: words from a small vocabulary (as text compresses),
/// every tenth page random.
fn first_copy_pages() -> Vec<Vec<u8>> {
    let words: [&[u8]; 8] = [b"remus ", b"epoch ", b"page ", b"backup ", b"guest ", b"commit ", b"the ", b"of "];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..32_768)
        .map(|i| {
            let mut p = Vec::with_capacity(4096);
            if i % 10 == 9 {
                while p.len() < 4096 {
                    p.extend_from_slice(&next().to_le_bytes());
                }
            } else {
                while p.len() < 4096 {
                    p.extend_from_slice(words[(next() % 8) as usize]);
                }
            }
            p.truncate(4096);
            p
        })
        .collect()
}

fn main() {
    let mib: u64 = std::env::var("REMUS_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let epochs: usize = std::env::var("REMUS_BENCH_EPOCHS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    println!("epoch benchmark: {mib} MiB arena guest, default workload, 40 Hz; {epochs} epochs for remus, {} per baseline", epochs.min(40));
    let mut wp = run(mib, epochs, Some(TrackingMode::WriteProtect));
    let mut hash = run(mib, epochs.min(40), Some(TrackingMode::Hash));
    let mut full = run(mib, epochs.min(40), None);
    println!("{:<34} {:>10} {:>10} {:>10}", "pause (ms)", "p50", "p99", "max");
    for (name, r) in
        [("remus: uffd-wp + PAGEMAP_SCAN", &mut wp), ("baseline: page-hash scan", &mut hash), ("baseline: full copy per epoch", &mut full)]
    {
        let max = *r.pauses.iter().max().unwrap_or(&0) as f64 / 1e6;
        println!("{:<34} {:>10.3} {:>10.3} {:>10.3}", name, pct(&mut r.pauses, 50.0), pct(&mut r.pauses, 99.0), max);
    }
    let wp50 = pct(&mut wp.pauses, 50.0);
    println!(
        "pause p50 ratio: page-hash / remus = {:.1}x, full-copy / remus = {:.1}x",
        pct(&mut hash.pauses, 50.0) / wp50,
        pct(&mut full.pauses, 50.0) / wp50
    );
    let raw = 4096.0 + 8.0;
    let per_page = wp.wire as f64 / wp.dirty.max(1) as f64;
    println!("dirty pages per epoch: {:.0}", wp.dirty as f64 / epochs as f64);
    println!(
        "wire bytes per dirty page: remus {per_page:.1}, raw copy {raw:.0} (ratio {:.3}, {:.1}x smaller)",
        per_page / raw,
        raw / per_page
    );
    let pages = first_copy_pages();
    let threads = EncoderConfig::default().threads;
    let (mut one, mut many) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        one.push(first_copy(&pages, 1));
        many.push(first_copy(&pages, threads));
    }
    let range = |v: &[f64]| (v.iter().copied().fold(f64::MAX, f64::min), v.iter().copied().fold(0.0, f64::max));
    let ((a, b), (c, d)) = (range(&one), range(&many));
    println!("first copy (32768 pages) encoded: one thread {a:.0}-{b:.0} ms, {threads} threads {c:.0}-{d:.0} ms (best {:.2}x)", a / c);
}
