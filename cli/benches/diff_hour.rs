//! Diff benchmark: `remus diff` of two epochs an hour apart over a 1 GiB
//! guest, from the page index (no image restored).
//!
//! The guest: `REMUS_BENCH_PAGES` pages (default 262 144: 1 GiB), all
//! written in epoch 1 (64 random bytes a page, the rest zero); then
//! `REMUS_BENCH_EPOCHS` epochs (default 144 000: an hour at 40 Hz) each
//! write `REMUS_BENCH_DIRTY` pages (default 4) at random within a hot set
//! of `REMUS_BENCH_HOT_PERCENT` of memory (default 10), committed in
//! synced batches of 1000.
//!
//! Measured, three rounds alternated: the diff of epoch 1 and the last
//! (the changed pages, each with its byte ranges, both contents read and
//! verified); the change walk alone (which pages changed); and beside it,
//! as the baseline in the same run, what the diff did before the change
//! walk to find them: reading both page tables whole and comparing them.
//!
//! `cargo build --release -p remus-cli --bench diff_hour` and run the
//! binary it names (or `cargo bench -p remus-cli --bench diff_hour`).

use std::time::Instant;

use rand::{Rng, SeedableRng};
use remus_restore::inspect;
use remus_store::{EpochCommit, Store, StoreOptions, StoredChunk};
use remus_types::{content_id, EpochId, GuestId, MemoryDigest, Pfn, PAGE_SIZE};

mod common;

const GUEST: GuestId = GuestId(1);

fn page(rng: &mut rand::rngs::SmallRng, epoch: u64) -> Vec<u8> {
    let mut page = vec![0u8; PAGE_SIZE];
    page[..8].copy_from_slice(&epoch.to_le_bytes());
    rng.fill(&mut page[8..64]);
    page
}

fn main() {
    remus_sys::keep_freed_memory();
    let setting = |name: &str, default: &str| common::env_list::<u64>(name, default)[0];
    let (pages, epochs, dirty, hot_percent) = (
        setting("REMUS_BENCH_PAGES", "262144"),
        setting("REMUS_BENCH_EPOCHS", "144000"),
        setting("REMUS_BENCH_DIRTY", "4"),
        setting("REMUS_BENCH_HOT_PERCENT", "10"),
    );
    let hot = (pages * hot_percent / 100).max(dirty);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("store"), StoreOptions::default()).expect("store");
    println!("diff benchmark: a {pages}-page guest, then {epochs} epochs of {dirty} pages within a hot set of {hot} pages");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
    let mut digest = MemoryDigest::zeroed(pages);
    let commit = |epoch: u64, pfns: &mut dyn Iterator<Item = u64>, rng: &mut rand::rngs::SmallRng, digest: &mut MemoryDigest| {
        let mut c = EpochCommit { guest: GUEST, epoch: EpochId(epoch), page_count: pages, ..EpochCommit::default() };
        for pfn in pfns {
            let p = page(rng, epoch);
            let id = content_id(&p);
            digest.set(Pfn(pfn), id);
            c.pages.push((Pfn(pfn), id));
            c.chunks.push((id, StoredChunk::Zstd(remus_types::zstd_compress(&p, 1).expect("zstd"))));
        }
        c.pages.sort_unstable_by_key(|(p, _)| *p);
        c.memory_root = digest.root();
        c
    };
    let t0 = Instant::now();
    store.commit(commit(1, &mut (0..pages), &mut rng, &mut digest)).expect("commit");
    let mut batch = Vec::with_capacity(1000);
    for epoch in 2..=epochs + 1 {
        let pfns: Vec<u64> = rand::seq::index::sample(&mut rng, hot as usize, dirty as usize).into_iter().map(|p| p as u64).collect();
        batch.push(commit(epoch, &mut pfns.into_iter(), &mut rng, &mut digest));
        if batch.len() == 1000 || epoch == epochs + 1 {
            store.commit_many(std::mem::take(&mut batch)).expect("commit");
        }
    }
    println!("history built in {:.0} s", t0.elapsed().as_secs_f64());

    let (a, b) = (EpochId(1), EpochId(epochs + 1));
    for round in 0..3 {
        let t = Instant::now();
        let d = inspect::diff(&store, GUEST, a, b).expect("diff");
        let diff_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut walked = 0;
        store
            .for_each_change(GUEST, a, b, |_, _, _| {
                walked += 1;
                Ok(())
            })
            .expect("walk");
        let walk_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut tables = [Vec::new(), Vec::new()];
        for (table, e) in tables.iter_mut().zip([a, b]) {
            store
                .for_each_page_at(GUEST, e, |p, id| {
                    table.push((p, id));
                    Ok(())
                })
                .expect("table");
        }
        let differ = tables[0].iter().zip(&tables[1]).filter(|(x, y)| x != y).count();
        let tables_s = t.elapsed().as_secs_f64();
        assert_eq!((differ, walked), (d.pages.len(), d.pages.len()), "every way finds the same pages");
        println!(
            "round {round}: diff of epochs {a} and {b}: {} pages changed, {diff_s:.2} s with their byte ranges; \
             finding them: change walk {walk_s:.2} s, both page tables (the baseline) {tables_s:.2} s",
            d.pages.len()
        );
    }
}
