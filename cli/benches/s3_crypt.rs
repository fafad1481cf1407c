//! The cost of encrypting the S3 tier (`s3.encryption-keys`): the same
//! history uploaded to a tier without keys and to a sealed one, and the
//! newest epoch restored from each, alternated in one run.
//!
//! The guest: `REMUS_BENCH_PAGES` pages (default 16 384: 64 MiB); each
//! epoch writes `REMUS_BENCH_DIRTY` pages (default 512) at random, a third
//! of them random bytes (incompressible), the rest a few random words in
//! a repeated pattern, for `REMUS_BENCH_EPOCHS` epochs (default 200),
//! committed to two stores alike. Upload passes every 40 epochs (1 s at
//! 40 Hz), timed per tier, the tier going first alternating; then
//! `REMUS_BENCH_ROUNDS` (default 3) rounds of a whole-memory restore of
//! the newest epoch from each tier alone, alternated. Beside them, the
//! sealing alone: AES-256-GCM over the chunk values in memory against
//! zstd over the same pages, one core.
//!
//! Needs an S3 server: `bash -c 'source scripts/s3-server.sh && cargo bench
//! -p remus-cli --bench s3_crypt'`.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use remus_restore::{RestorePlan, S3Source, Target};
use remus_store::s3::{Keyring, S3Client, S3Config, S3Tier};
use remus_store::{EpochCommit, Store, StoreOptions, StoredChunk};
use remus_types::{content_id, EpochId, GuestId, MemoryDigest, Pfn, PAGE_SIZE};

mod common;

const GUEST: GuestId = GuestId(1);

fn page(rng: &mut rand::rngs::SmallRng, incompressible: bool) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    if incompressible {
        rng.fill(&mut p[..]);
    } else {
        let word: [u8; 16] = rng.gen();
        for (i, b) in p.iter_mut().enumerate() {
            *b = word[i % 16] ^ (i / 512) as u8;
        }
        rng.fill(&mut p[..64]);
    }
    p
}

fn range(v: &[f64]) -> String {
    let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
    format!("{lo:.3}-{hi:.3}")
}

fn main() {
    let Ok(endpoint) = std::env::var("REMUS_TEST_S3_ENDPOINT") else {
        eprintln!("s3_crypt needs an S3 server: bash -c 'source scripts/s3-server.sh && cargo bench -p remus-cli --bench s3_crypt'");
        std::process::exit(2);
    };
    let setting = |name: &str, default: &str| common::env_list::<u64>(name, default)[0];
    let (epochs, pages, dirty, rounds) = (
        setting("REMUS_BENCH_EPOCHS", "200"),
        setting("REMUS_BENCH_PAGES", "16384"),
        setting("REMUS_BENCH_DIRTY", "512"),
        setting("REMUS_BENCH_ROUNDS", "3"),
    );
    let bucket = format!("s3-crypt-bench-{}", std::process::id());
    S3Client::new(&common::s3_config(&endpoint, &bucket, "")).expect("client").create_bucket(false).expect("bucket");
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("s3.keys");
    Keyring::add_key(&keys).expect("key file");
    // (name, store, tier, upload seconds per pass)
    let mut runs: Vec<(&str, Store, S3Tier, Vec<f64>)> = [("plain", None), ("sealed", Some(keys.clone()))]
        .into_iter()
        .map(|(name, keys)| {
            let store = Store::open(&dir.path().join(name), StoreOptions::default()).expect("store");
            let cfg = S3Config { encryption_keys: keys, ..common::s3_config(&endpoint, &bucket, name) };
            (name, store, S3Tier::connect(&cfg).expect("s3"), Vec::new())
        })
        .collect();
    println!("s3-crypt benchmark: {epochs} epochs of a {pages}-page guest, {dirty} pages written per epoch (a third incompressible)");

    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let mut digest = MemoryDigest::zeroed(pages);
    let mut batch = Vec::with_capacity(40);
    let mut sample: Vec<Vec<u8>> = Vec::new();
    for epoch in 1..=epochs {
        let mut c = EpochCommit { guest: GUEST, epoch: EpochId(epoch), page_count: pages, ..EpochCommit::default() };
        c.time_unix_ns = epoch * 25_000_000;
        c.commit_unix_ns = c.time_unix_ns;
        for (k, pfn) in rand::seq::index::sample(&mut rng, pages as usize, dirty as usize).into_iter().enumerate() {
            let p = page(&mut rng, k % 3 == 0);
            let id = content_id(&p);
            digest.set(Pfn(pfn as u64), id);
            c.pages.push((Pfn(pfn as u64), id));
            c.chunks.push((id, StoredChunk::Zstd(remus_types::zstd_compress(&p, 1).expect("zstd"))));
            if sample.len() < 8192 {
                sample.push(p);
            }
        }
        c.pages.sort_unstable_by_key(|(p, _)| *p);
        c.memory_root = digest.root();
        c.device_state = format!("device state {epoch}").into_bytes();
        batch.push(c);
        if epoch % 40 != 0 && epoch != epochs {
            continue;
        }
        // The tier that goes first alternates, so noise falls on both alike.
        let order: Vec<usize> = if (epoch / 40) % 2 == 0 { vec![0, 1] } else { vec![1, 0] };
        for i in order {
            let (_, store, tier, times) = &mut runs[i];
            store.commit_many(batch.clone()).expect("commit");
            let t0 = Instant::now();
            tier.upload_pending(store, &|| false).expect("upload");
            times.push(t0.elapsed().as_secs_f64());
        }
        batch.clear();
    }
    let up: Vec<f64> = runs.iter().map(|r| r.3.iter().sum::<f64>()).collect();
    let mib = |t: &S3Tier| t.client().list("packs/").expect("list").iter().map(|l| l.size).sum::<u64>() as f64 / f64::from(1 << 20);
    println!(
        "upload: plain {:.2} s ({:.1} MiB of packs), sealed {:.2} s ({:.1} MiB of packs): sealed / plain = {:.3}; per pass plain {} s, sealed {} s",
        up[0],
        mib(&runs[0].2),
        up[1],
        mib(&runs[1].2),
        up[1] / up[0],
        range(&runs[0].3),
        range(&runs[1].3)
    );

    let img = dir.path().join("restored.img");
    let want = digest.root();
    let restore = |tier: &S3Tier| {
        let t0 = Instant::now();
        let source = S3Source::read(tier, GUEST, Target::Epoch(EpochId(epochs)), &mut |_, _| {}).expect("read");
        let plan = RestorePlan::new(&source, GUEST, Target::Epoch(EpochId(epochs))).expect("plan");
        plan.execute(&source, &img, |_, _| {}).expect("restore");
        let s = t0.elapsed().as_secs_f64();
        assert_eq!(MemoryDigest::of_image(&std::fs::read(&img).expect("image")), want, "a byte-exact restore");
        s
    };
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let (a, b) = if round % 2 == 0 {
            (restore(&runs[0].2), restore(&runs[1].2))
        } else {
            let b = restore(&runs[1].2);
            (restore(&runs[0].2), b)
        };
        ratios.push(b / a);
        println!("restore round {round}: plain {a:.3} s, sealed {b:.3} s (sealed / plain = {:.3})", b / a);
    }
    println!("restore sealed / plain over {rounds} rounds: {}", range(&ratios));

    // The sealing alone, against the compression it sits beside.
    let ring = Keyring::load(&keys).expect("keys");
    let values: Vec<Vec<u8>> = sample.iter().map(|p| remus_types::zstd_compress(p, 1).expect("zstd")).collect();
    let bytes = values.iter().map(Vec::len).sum::<usize>() as f64;
    let raw = (sample.len() * PAGE_SIZE) as f64;
    for round in 0..rounds {
        let t0 = Instant::now();
        for p in &sample {
            std::hint::black_box(remus_types::zstd_compress(p, 1).expect("zstd"));
        }
        let zstd = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let mut pack = remus_store::s3::format::PackBuilder::new(Some(ring.pack_sealer()));
        for v in &values {
            pack.push(remus_types::ChunkId::default(), v);
        }
        std::hint::black_box(pack.finish());
        let seal = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let mut plain = remus_store::s3::format::PackBuilder::new(None);
        for v in &values {
            plain.push(remus_types::ChunkId::default(), v);
        }
        std::hint::black_box(plain.finish());
        let unsealed = t0.elapsed().as_secs_f64();
        println!(
            "in memory round {round}: {} pages: zstd {:.0} MiB/s of pages; pack + hash {:.0} MiB/s of values plain, {:.0} MiB/s sealed",
            sample.len(),
            raw / zstd / f64::from(1 << 20),
            bytes / unsealed / f64::from(1 << 20),
            bytes / seal / f64::from(1 << 20)
        );
    }
}
