//! S3 history benchmark: what a guest-hour at 40 Hz costs in S3 requests,
//! and what a restore from S3 alone reads near the start and near the end
//! of that history.
//!
//! The guest: `REMUS_BENCH_PAGES` pages (default 4096: 16 MiB); each epoch
//! writes `REMUS_BENCH_DIRTY` pages (default 4) of new content at random
//! (64 bytes of a page, the rest zero), epochs 25 ms apart, for
//! `REMUS_BENCH_EPOCHS` epochs (default 144 000: one hour at 40 Hz). The
//! same history is committed to two stores and uploaded in passes as the
//! backup's uploader makes them: every 800 epochs (the default
//! `upload-interval-ms` of 20 s at 40 Hz) and, as the baseline in the
//! same run, every 40 epochs (1 s, the interval before segments). The
//! layout before segments (one object per epoch) is counted beside them
//! from the same run: one put per epoch plus the same packs.
//!
//! Then, from the 20 s tier alone: the objects read and the seconds to
//! restore the epoch 1000 epochs after the start and 1000 before the end
//! (a whole-memory restore to a file, every page verified), and the same
//! end epoch read from the first segment on (no checkpoint: what a reader
//! without checkpoints reads).
//!
//! Needs an S3 server: `bash -c 'source scripts/s3-server.sh && cargo bench
//! -p remus-cli --bench s3_history'`.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use remus_restore::{RestorePlan, S3Source, Target};
use remus_store::s3::{Reach, S3Client, S3Tier, UploadReport};
use remus_store::{EpochCommit, Store, StoreOptions, StoredChunk};
use remus_types::{content_id, EpochId, GuestId, MemoryDigest, Pfn, PAGE_SIZE};

mod common;

const GUEST: GuestId = GuestId(1);
const PERIOD_NS: u64 = 25_000_000;

fn add(total: &mut UploadReport, r: UploadReport) {
    total.epochs += r.epochs;
    total.segments += r.segments;
    total.checkpoints += r.checkpoints;
    total.packs += r.packs;
    total.chunk_bytes += r.chunk_bytes;
    total.requests += r.requests;
    total.chunks_gathered += r.chunks_gathered;
}

fn main() {
    let Ok(endpoint) = std::env::var("REMUS_TEST_S3_ENDPOINT") else {
        eprintln!("s3_history needs an S3 server: bash -c 'source scripts/s3-server.sh && cargo bench -p remus-cli --bench s3_history'");
        std::process::exit(2);
    };
    let setting = |name: &str, default: &str| common::env_list::<u64>(name, default)[0];
    let (epochs, pages, dirty) =
        (setting("REMUS_BENCH_EPOCHS", "144000"), setting("REMUS_BENCH_PAGES", "4096"), setting("REMUS_BENCH_DIRTY", "4"));
    let bucket = format!("s3-history-bench-{}", std::process::id());
    S3Client::new(&common::s3_config(&endpoint, &bucket, "")).expect("client").create_bucket(false).expect("bucket");
    let dir = tempfile::tempdir().expect("tempdir");
    // (store, tier, epochs per pass, requests so far)
    let mut runs: Vec<(Store, S3Tier, u64, UploadReport)> = [800u64, 40]
        .into_iter()
        .map(|every| {
            let store = Store::open(&dir.path().join(format!("store-{every}")), StoreOptions::default()).expect("store");
            let tier = S3Tier::connect(&common::s3_config(&endpoint, &bucket, &format!("every-{every}"))).expect("s3");
            (store, tier, every, UploadReport::default())
        })
        .collect();
    println!("s3-history benchmark: {epochs} epochs of a {pages}-page guest, {dirty} pages written per epoch");

    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    let mut digest = MemoryDigest::zeroed(pages);
    let t_start = 1_700_000_000_000_000_000u64;
    let t_all = Instant::now();
    // Committed in synced batches of 40 (one baseline pass), as a busy backup does.
    let mut batch = Vec::with_capacity(40);
    for epoch in 1..=epochs {
        let mut c = EpochCommit {
            guest: GUEST,
            epoch: EpochId(epoch),
            page_count: pages,
            time_unix_ns: t_start + epoch * PERIOD_NS,
            commit_unix_ns: t_start + epoch * PERIOD_NS,
            ..EpochCommit::default()
        };
        for pfn in rand::seq::index::sample(&mut rng, pages as usize, dirty as usize) {
            let mut page = vec![0u8; PAGE_SIZE];
            page[..8].copy_from_slice(&epoch.to_le_bytes());
            rng.fill(&mut page[8..64]);
            let id = content_id(&page);
            digest.set(Pfn(pfn as u64), id);
            c.pages.push((Pfn(pfn as u64), id));
            c.chunks.push((id, StoredChunk::Zstd(remus_types::zstd_compress(&page, 1).expect("zstd"))));
        }
        c.pages.sort_unstable_by_key(|(p, _)| *p);
        c.memory_root = digest.root();
        c.device_state = format!("device state {}", epoch % 7).into_bytes();
        batch.push(c);
        if epoch % 40 != 0 && epoch != epochs {
            continue;
        }
        for (store, tier, every, total) in &mut runs {
            store.commit_many(batch.clone()).expect("commit");
            if epoch % *every == 0 || epoch == epochs {
                add(total, tier.upload_pending(store, &|| false).expect("upload"));
            }
        }
        batch.clear();
        if epoch % 14_400 == 0 {
            eprintln!("  {epoch} epochs committed and uploaded ({:.0} s)", t_all.elapsed().as_secs_f64());
        }
    }
    let hours = epochs as f64 * PERIOD_NS as f64 / 3.6e12;
    for (_, _, every, r) in &runs {
        println!(
            "pass every {every} epochs ({} ms at 40 Hz): {} requests per guest-hour ({} segments, {} checkpoints, {} packs and their indexes; {} chunks gathered for checkpoints)",
            every * 25,
            (r.requests as f64 / hours).round(),
            (r.segments as f64 / hours).round(),
            (r.checkpoints as f64 / hours).round(),
            (r.packs as f64 / hours).round(),
            r.chunks_gathered,
        );
    }
    let r = &runs[0].3;
    println!(
        "one object per epoch (the layout before segments, counted from the same packs): {} requests per guest-hour",
        ((r.epochs + 2 * r.packs) as f64 / hours).round()
    );

    // Restore from the 20 s tier alone, near the start and near the end.
    let tier = &runs[0].1;
    let img = dir.path().join("restored.img");
    let restore = |target: u64, reach: Option<Reach>| {
        let t0 = Instant::now();
        let source = match reach {
            Some(reach) => S3Source::reach(tier, GUEST, reach, &mut |_, _| {}),
            None => S3Source::read(tier, GUEST, Target::Epoch(EpochId(target)), &mut |_, _| {}),
        }
        .expect("read");
        let read = source.history().objects_read;
        let named = source.history().packs.len();
        let history = t0.elapsed().as_secs_f64();
        let plan = RestorePlan::new(&source, GUEST, Target::Epoch(EpochId(target))).expect("plan");
        plan.execute(&source, &img, |_, _| {}).expect("restore");
        let all = t0.elapsed().as_secs_f64();
        println!(
            "  restore of epoch {target}: history read in {history:.2} s ({named} packs named), then packs and pages in {:.2} s",
            all - history
        );
        (read, all)
    };
    let (near_start, near_end) = (1000.min(epochs), epochs.saturating_sub(1000).max(1));
    for round in 0..3 {
        // Alternated, so the machine's noise falls on both alike.
        let (a_read, a_s) = restore(near_start, None);
        let (b_read, b_s) = restore(near_end, None);
        println!(
            "restore round {round}: epoch {near_start}: {a_read} objects, {a_s:.2} s; epoch {near_end}: {b_read} objects, {b_s:.2} s (end / start = {:.2})",
            b_s / a_s
        );
    }
    // The same place in the history's structure (1000 epochs after a
    // checkpoint, so the same objects to read and a page table as full)
    // near the start and near the end: what the length of the history
    // alone costs.
    let checkpoints = tier.checkpoint_epochs(GUEST).expect("checkpoints");
    if let (Some(first), Some(last)) = (checkpoints.first(), checkpoints.iter().rev().find(|c| c.0 + 1000 <= epochs)) {
        let (a, b) = (first.0 + 1000, last.0 + 1000);
        for round in 0..3 {
            let (a_read, a_s) = restore(a, None);
            let (b_read, b_s) = restore(b, None);
            println!(
                "restore 1000 epochs after a checkpoint, round {round}: epoch {a}: {a_read} objects, {a_s:.2} s; epoch {b}: {b_read} objects, {b_s:.2} s (end / start = {:.2})",
                b_s / a_s
            );
        }
    }
    let (all_read, all_s) = restore(near_end, Some(Reach { from: None, upto: Some(EpochId(near_end)) }));
    println!("restore of epoch {near_end} from the first segment on (no checkpoint): {all_read} objects, {all_s:.2} s");
}
