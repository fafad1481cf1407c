//! History benchmark: the store against restic and borg on the same
//! images in the same run.
//!
//! 1. An image of `REMUS_BENCH_MIB` (default 1024) MiB of mixed pages
//!    (zero, text-like, random, duplicated) is ingested by each: remus
//!    hashes (blake3) and compresses (zstd 1) every page on two threads and
//!    commits it to a fresh store as one epoch (synced); restic and borg
//!    back up the same image file.
//! 2. 1% of the 4 KiB pages change at random (new random content); each
//!    ingests again and the growth of its repository is measured.
//! 3. The second version is restored: remus (store opened read-only, as
//!    `remus-restore` does) writes the image of its epoch (verifying every
//!    chunk and the memory root); `restic restore` and `borg extract`
//!    write the file. Two times each: until the tool returns (the image in
//!    the page cache, which is what restic and borg give by default), and
//!    until the image is synced to disk as well (`remus-restore` syncs
//!    before it reports success). Then served lazily instead
//!    (`remus-restore --mount`): the time until it is mounted, until one
//!    page is read through the mount, and until all of it is.
//!
//! `cargo bench -p remus-cli --bench history` (needs `restic` and `borg`
//! on PATH; Debian: `apt-get install restic borgbackup`; baselines that
//! are missing are skipped with a note; `REMUS_BENCH_TOOLS=restic` runs
//! only that baseline beside remus).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use rand::{Rng, RngCore, SeedableRng};
use remus_restore::{MountContent, MountFile, RestorePlan, Target};
use remus_store::{EpochCommit, Store, StoreOptions, StoredChunk};
use remus_types::{EpochId, GuestId, MemoryDigest, Pfn, PAGE_SIZE};

/// Bytes of the files under `p`, leaving out RocksDB's write-ahead logs
/// (`*.log`, obsolete once flushed) and its info logs (`LOG*`).
fn dir_bytes(p: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        let m = e.metadata().expect("metadata");
        let name = e.file_name().to_string_lossy().into_owned();
        if m.is_dir() {
            n += dir_bytes(&e.path());
        } else if !(name.ends_with(".log") || name.starts_with("LOG")) {
            n += m.len();
        }
    }
    n
}

fn make_image(pages: usize, rng: &mut rand::rngs::SmallRng) -> Vec<u8> {
    let mut img = vec![0u8; pages * PAGE_SIZE];
    const WORDS: &[&str] = &["remus ", "epoch ", "commit ", "page ", "guest ", "backup ", "the ", "of ", "and ", "memory "];
    for p in 0..pages {
        let kind = rng.gen_range(0..100);
        let (head, page) = img.split_at_mut(p * PAGE_SIZE);
        let page = &mut page[..PAGE_SIZE];
        match kind {
            0..=29 => {} // zero
            30..=59 => {
                let mut i = 0;
                while i < PAGE_SIZE {
                    let w = WORDS[rng.gen_range(0..WORDS.len())].as_bytes();
                    let n = w.len().min(PAGE_SIZE - i);
                    page[i..i + n].copy_from_slice(&w[..n]);
                    i += n;
                }
            }
            60..=79 => rng.fill_bytes(page),
            _ if p > 0 => {
                let src = rng.gen_range(0..p);
                page.copy_from_slice(&head[src * PAGE_SIZE..][..PAGE_SIZE]);
            }
            _ => {}
        }
    }
    img
}

/// Pages per epoch of the first full copy, as the backup receives it.
const EPOCH_PAGES: usize = 16384;

/// Ingests `img` (or its `changed` pages) as consecutive epochs from
/// `epoch`, as the backup receives a first full copy: two workers hash and
/// compress epochs in turn (as the primary's encoder does: zero pages and
/// repeated content sent as such, the rest zstd 1), while this thread
/// commits each epoch as it completes (several per synced write when they
/// queue up). The memory root is the primary's work (kept incrementally
/// there), so it is computed before the clock starts.
///
/// With `store_alone`, every epoch is encoded first and only the commits
/// are timed: the backup's own work per byte (at a real backup the
/// primary encodes, on its own host), which bounds how many primaries one
/// backup can absorb.
fn ingest(store: &Store, epoch: u64, img: &[u8], changed: Option<&[usize]>, store_alone: bool) -> (f64, EpochId) {
    const WORKERS: usize = 2;
    let memory_root = MemoryDigest::of_image(img);
    let t0 = Instant::now();
    let pfns: Vec<usize> = changed.map_or_else(|| (0..img.len() / PAGE_SIZE).collect(), <[usize]>::to_vec);
    let page_count = (img.len() / PAGE_SIZE) as u64;
    let epochs: Vec<&[usize]> = pfns.chunks(EPOCH_PAGES).collect();
    let last = EpochId(epoch + epochs.len() as u64 - 1);
    let zero = remus_types::zero_page_hash();
    let encode = |i: usize, z: &mut zstd::bulk::Compressor, seen: &mut std::collections::HashSet<remus_types::ChunkId>| {
        let e = EpochId(epoch + i as u64);
        let mut c = EpochCommit { guest: GuestId(1), epoch: e, page_count, time_unix_ns: e.0, ..EpochCommit::default() };
        for &p in epochs[i] {
            let page = &img[p * PAGE_SIZE..][..PAGE_SIZE];
            let id = remus_types::page_id(page);
            if id != zero && seen.insert(id) {
                c.chunks.push((id, StoredChunk::Zstd(z.compress(page).expect("zstd"))));
            }
            c.pages.push((Pfn(p as u64), id));
        }
        // Only the last epoch's root is the image's; the others are
        // partial states this benchmark never restores.
        if e == last {
            c.memory_root = memory_root;
        }
        c
    };
    let mut commit_s = 0.0;
    let mut encoded = Vec::new();
    std::thread::scope(|s| {
        let queues: Vec<_> = (0..WORKERS)
            .map(|w| {
                let (tx, rx) = std::sync::mpsc::sync_channel(2);
                let (encode, epochs) = (&encode, &epochs);
                s.spawn(move || {
                    let mut z = zstd::bulk::Compressor::new(1).expect("zstd");
                    let mut seen = std::collections::HashSet::new();
                    for i in (w..epochs.len()).step_by(WORKERS) {
                        if tx.send(encode(i, &mut z, &mut seen)).is_err() {
                            break;
                        }
                    }
                });
                rx
            })
            .collect();
        let mut next = 0;
        while next < epochs.len() {
            let mut group = vec![queues[next % WORKERS].recv().expect("worker")];
            next += 1;
            while next < epochs.len() && group.len() < 4 {
                match queues[next % WORKERS].try_recv() {
                    Ok(c) => group.push(c),
                    Err(_) => break,
                }
                next += 1;
            }
            if store_alone {
                encoded.push(group);
                continue;
            }
            let t = Instant::now();
            store.commit_many(group).expect("commit");
            commit_s += t.elapsed().as_secs_f64();
        }
    });
    let t0 = if store_alone { Instant::now() } else { t0 };
    // As a backup that has them all at hand: four epochs per synced write.
    let encoded: Vec<EpochCommit> = encoded.into_iter().flatten().collect();
    let mut encoded = encoded.into_iter().peekable();
    while encoded.peek().is_some() {
        let group: Vec<EpochCommit> = encoded.by_ref().take(4).collect();
        let t = Instant::now();
        store.commit_many(group).expect("commit");
        commit_s += t.elapsed().as_secs_f64();
    }
    let t_flush = Instant::now();
    store.flush().expect("flush");
    commit_s += t_flush.elapsed().as_secs_f64();
    let total = t0.elapsed().as_secs_f64();
    eprintln!(
        "remus ingest from epoch {epoch}{}: {total:.2} s, of which {commit_s:.2} s committing",
        if store_alone { " (store alone)" } else { "" }
    );
    (total, last)
}

fn timed(cmd: &mut Command) -> f64 {
    let t0 = Instant::now();
    let out = cmd.output().expect("spawn");
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    t0.elapsed().as_secs_f64()
}

/// Writes back everything dirty before a restore is timed, so no tool's
/// restore shares the disk with the writeback of what ran before it.
fn settle() {
    remus_sys::sync_all();
}

/// Syncs a restored image (the second restore time of each tool).
fn durable(p: &Path) {
    std::fs::File::open(p).and_then(|f| f.sync_all()).expect("sync restored file");
}

/// `REMUS_BENCH_TOOLS` (comma-separated, default all) picks the baselines.
fn have(tool: &str) -> bool {
    if std::env::var("REMUS_BENCH_TOOLS").is_ok_and(|t| !t.split(',').any(|t| t.trim() == tool)) {
        return false;
    }
    let arg = if tool == "restic" { "version" } else { "--version" };
    Command::new(tool).arg(arg).output().is_ok_and(|o| o.status.success())
}

/// The second version served lazily (`remus-restore --mount`): time until
/// the image is mounted (its page index read and checked against the
/// memory root), until one changed page is read through the mount, and
/// until the whole image is, each from the start.
fn lazy(store: &std::sync::Arc<Store>, epoch: EpochId, image: &[u8], changed: &[usize], d: &Path) {
    use std::os::unix::fs::FileExt;
    let at = d.join("mnt");
    std::fs::create_dir(&at).expect("mkdir");
    settle();
    let t0 = Instant::now();
    let plan = RestorePlan::new(&**store, GuestId(1), Target::Epoch(epoch)).expect("plan");
    let len = plan.manifest.page_count * PAGE_SIZE as u64;
    let file = MountFile { name: "memory".into(), content: MountContent::Pages { first: 0, len } };
    let mounted = match plan.mount(store.clone(), vec![file], &at) {
        Ok(m) => m,
        Err(e) => return println!("  lazy   skipped: {e}"),
    };
    let t_mount = t0.elapsed().as_secs_f64();
    let page = changed[changed.len() / 2];
    let mut buf = vec![0u8; PAGE_SIZE];
    std::fs::File::open(at.join("memory")).expect("open").read_exact_at(&mut buf, (page * PAGE_SIZE) as u64).expect("read a page");
    let t_page = t0.elapsed().as_secs_f64();
    assert!(buf == image[page * PAGE_SIZE..][..PAGE_SIZE], "a page read through the mount differs");
    let all = std::fs::read(at.join("memory")).expect("read the image");
    let t_all = t0.elapsed().as_secs_f64();
    assert!(all == image, "the image read through the mount differs");
    mounted.unmount().expect("unmount");
    println!(
        "  lazy   mounted {t_mount:.3} s, a changed page read {:.1} ms later, the whole image read through the mount {t_all:.2} s",
        (t_page - t_mount) * 1e3
    );
}

fn main() {
    remus_sys::keep_freed_memory();
    let mib: usize = std::env::var("REMUS_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let pages = mib << 20 >> 12;
    let base = std::env::var_os("REMUS_BENCH_DIR").map_or_else(std::env::temp_dir, std::path::PathBuf::from);
    let dir = tempfile::tempdir_in(base).expect("tempdir");
    let d = dir.path();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let v1 = make_image(pages, &mut rng);
    let mut changed: Vec<usize> = (0..pages).filter(|_| rng.gen_ratio(1, 100)).collect();
    changed.dedup();
    let src = d.join("src");
    std::fs::create_dir(&src).expect("mkdir");
    let file = src.join("guest.img");
    std::fs::write(&file, &v1).expect("write image");
    let mib_f = mib as f64;
    println!(
        "history benchmark: {mib} MiB image (30% zero, 30% text, 20% random, 20% duplicate pages), then {} pages (1%) rewritten",
        changed.len()
    );
    println!(
        "{:<8} {:>12} {:>10} {:>10} {:>12} {:>10} {:>10}",
        "tool", "ingest MB/s", "repo MB", "growth MB", "re-ingest s", "restore s", "durable s"
    );
    let row = |tool: &str, ingest: f64, repo: f64, growth: f64, reingest: f64, restore: f64, durable: f64| {
        println!("{tool:<8} {ingest:>12.1} {repo:>10.1} {growth:>10.1} {reingest:>12.2} {restore:>10.2} {durable:>10.2}");
    };

    // remus
    let store_dir = d.join("store");
    let store = Store::open(&store_dir, StoreOptions::default()).expect("store");
    // The backup's part alone first, in a store of its own.
    let alone_dir = d.join("store-alone");
    let alone = Store::open(&alone_dir, StoreOptions::default()).expect("store");
    let (t_alone, _) = ingest(&alone, 1, &v1, None, true);
    drop(alone);
    std::fs::remove_dir_all(&alone_dir).expect("rm");
    let (t1, e1) = ingest(&store, 1, &v1, None, false);
    // Sizes after a full compaction (not timed): live data only.
    store.compact().expect("compact");
    let size1 = dir_bytes(&store_dir);
    let mut v2 = v1.clone();
    for &p in &changed {
        rng.fill_bytes(&mut v2[p * PAGE_SIZE..][..PAGE_SIZE]);
    }
    let (t2, e2) = ingest(&store, e1.0 + 1, &v2, Some(&changed), false);
    store.compact().expect("compact");
    let size2 = dir_bytes(&store_dir);
    // Restore as `remus-restore` does: a read-only open of the store.
    drop(store);
    let store = std::sync::Arc::new(Store::open(&store_dir, StoreOptions::read_only()).expect("store"));
    let out = d.join("remus.img");
    settle();
    let t0 = Instant::now();
    let mut plan = RestorePlan::new(&*store, GuestId(1), Target::Epoch(e2)).expect("plan");
    plan.sync = false;
    plan.execute(&*store, &out, |_, _| {}).expect("restore");
    let tr = t0.elapsed().as_secs_f64();
    durable(&out);
    let td = t0.elapsed().as_secs_f64();
    assert!(std::fs::read(&out).expect("read") == v2, "remus restore is not byte-exact");
    std::fs::remove_file(&out).expect("rm");
    let mb = |b: u64| b as f64 / 1e6;
    let growth = |a: u64, b: u64| (b as f64 - a as f64) / 1e6;
    let changed_mb = mb((changed.len() * PAGE_SIZE) as u64);
    row("remus", mib_f * 1.048_576 / t1, mb(size1), growth(size1, size2), t2, tr, td);
    println!("{:<8} {:>12.1}   (the backup's commits alone: the primary encodes on its own host)", "  store", mib_f * 1.048_576 / t_alone);
    lazy(&store, e2, &v2, &changed, d);
    drop(store);

    // restic
    if have("restic") {
        let repo = d.join("restic");
        let restic = || {
            let mut c = Command::new("restic");
            c.env("RESTIC_PASSWORD", "bench").env("RESTIC_CACHE_DIR", d.join("restic-cache")).arg("-r").arg(&repo).arg("-q");
            c
        };
        std::fs::write(&file, &v1).expect("write");
        timed(restic().arg("init"));
        let t1 = timed(restic().arg("backup").arg(&src));
        let s1 = dir_bytes(&repo);
        std::fs::write(&file, &v2).expect("write v2");
        let t2 = timed(restic().arg("backup").arg(&src));
        let s2 = dir_bytes(&repo);
        let target = d.join("restic-out");
        settle();
        let t0 = Instant::now();
        timed(restic().args(["restore", "latest", "--target"]).arg(&target));
        let tr = t0.elapsed().as_secs_f64();
        let restored = target.join(file.strip_prefix("/").expect("absolute"));
        durable(&restored);
        let td = t0.elapsed().as_secs_f64();
        assert!(std::fs::read(&restored).expect("restic output") == v2, "restic restore differs");
        std::fs::remove_dir_all(&target).expect("rm");
        row("restic", mib_f * 1.048_576 / t1, mb(s1), growth(s1, s2), t2, tr, td);
    } else {
        println!("restic: not installed, skipped");
    }

    // borg
    if have("borg") {
        let repo = d.join("borg");
        let borg = || {
            let mut c = Command::new("borg");
            c.env("BORG_BASE_DIR", d.join("borg-base")).env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes");
            c
        };
        std::fs::write(&file, &v1).expect("write");
        timed(borg().args(["init", "-e", "none"]).arg(&repo));
        let archive = |n: &str| format!("{}::{n}", repo.display());
        let t1 = timed(borg().args(["create", "--compression", "lz4", &archive("v1")]).arg(&src));
        let s1 = dir_bytes(&repo);
        std::fs::write(&file, &v2).expect("write v2");
        let t2 = timed(borg().args(["create", "--compression", "lz4", &archive("v2")]).arg(&src));
        let s2 = dir_bytes(&repo);
        let target = d.join("borg-out");
        std::fs::create_dir(&target).expect("mkdir");
        settle();
        let t0 = Instant::now();
        timed(borg().current_dir(&target).args(["extract", &archive("v2")]));
        let tr = t0.elapsed().as_secs_f64();
        let restored = target.join(file.strip_prefix("/").expect("absolute"));
        durable(&restored);
        let td = t0.elapsed().as_secs_f64();
        assert!(std::fs::read(&restored).expect("borg output") == v2, "borg extract differs");
        row("borg", mib_f * 1.048_576 / t1, mb(s1), growth(s1, s2), t2, tr, td);
    } else {
        println!("borg: not installed, skipped");
    }
    println!("changed bytes: {changed_mb:.1} MB ({} pages x 4096)", changed.len());
    if std::env::var_os("REMUS_BENCH_KEEP").is_some() {
        println!("kept {}", dir.keep().display());
    }
}
