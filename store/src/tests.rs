//! Store tests on a real RocksDB in a temporary directory.

use std::collections::BTreeMap;
use std::io::Write;

use remus_types::{ChunkId, EpochId, GuestId, Pfn, PAGE_SIZE};

use crate::*;
use remus_types::{content_id, FormatError};

fn page(seed: u8) -> Vec<u8> {
    (0..PAGE_SIZE).map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed)).collect()
}

fn commit_of(guest: GuestId, epoch: u64, pages: &[(u64, u8)]) -> EpochCommit {
    let mut c = EpochCommit { guest, epoch: EpochId(epoch), instance: 5, page_count: 64, ..EpochCommit::default() };
    for &(pfn, seed) in pages {
        let p = page(seed);
        let id = content_id(&p);
        c.pages.push((Pfn(pfn), id));
        let chunk = if seed % 2 == 0 { StoredChunk::Zstd(zstd::bulk::compress(&p, 1).unwrap()) } else { StoredChunk::Plain(p) };
        c.chunks.push((id, chunk));
    }
    c
}

#[test]
fn commits_chain_and_index_every_version() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(1);
    let history: Vec<Vec<(u64, u8)>> = vec![vec![(1, 1), (2, 2)], vec![(2, 3)], vec![(1, 2), (9, 2)], vec![(2, 4)]];
    let mut model: BTreeMap<u64, u8> = BTreeMap::new();
    let mut states = Vec::new();
    let mut prev = ChunkId::default();
    for (i, pages) in history.iter().enumerate() {
        let out = store.commit(commit_of(g, i as u64 + 1, pages)).unwrap();
        assert_eq!(out.manifest.parent, prev, "hash chain");
        prev = out.id;
        for &(p, s) in pages {
            model.insert(p, s);
        }
        states.push(model.clone());
    }
    // Epoch 3 re-wrote seed 2, which epoch 1 already stored.
    assert_eq!(store.manifest(g, EpochId(3)).unwrap().new_chunk_bytes, 0);
    drop(store);
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(store.head(g).unwrap().unwrap().epoch, EpochId(4));
    for (i, want) in states.iter().enumerate() {
        let e = EpochId(i as u64 + 1);
        let mut got = BTreeMap::new();
        store
            .for_each_page_at(g, e, |pfn, id| {
                let data = store.chunk(&id)?;
                let seed = (1..=4).find(|&s| page(s) == data).expect("known page");
                got.insert(pfn.0, seed);
                Ok(())
            })
            .unwrap();
        assert_eq!(&got, want, "epoch {e}");
        for (&pfn, &seed) in want {
            assert_eq!(store.page_at(g, Pfn(pfn), e).unwrap(), Some(content_id(&page(seed))));
        }
        assert_eq!(store.page_at(g, Pfn(5), e).unwrap(), None);
    }
    let ms = store.manifests(g).unwrap();
    assert_eq!(ms.len(), 4);
    for w in ms.windows(2) {
        assert_eq!(w[1].parent, w[0].id());
    }
}

#[test]
fn out_of_order_commit_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(2);
    store.commit(commit_of(g, 1, &[(1, 1)])).unwrap();
    let err = store.commit(commit_of(g, 3, &[(1, 7)])).unwrap_err();
    assert!(matches!(err, StoreError::OutOfOrder { epoch: EpochId(3), head: EpochId(1), .. }));
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(!store.has_chunk(&content_id(&page(7))).unwrap());
    assert_eq!(store.head(g).unwrap().unwrap().epoch, EpochId(1));
    assert!(matches!(store.manifest(g, EpochId(2)), Err(StoreError::NoEpoch { .. })));
}

#[test]
fn a_chunk_offered_under_an_id_its_bytes_do_not_have_is_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(1);
    store.commit(commit_of(g, 1, &[(1, 1)])).unwrap();
    // Plain and compressed alike: bytes of one page under the id of another.
    for seed in [3u8, 4] {
        let mut c = commit_of(g, 2, &[(2, seed)]);
        let lie = content_id(&page(99));
        c.pages[0].1 = lie;
        c.chunks[0].0 = lie;
        let err = store.commit(c).unwrap_err();
        assert!(matches!(err, StoreError::Mismatch { epoch: EpochId(2), id, .. } if id == lie), "{err}");
        assert!(!store.has_chunk(&lie).unwrap(), "nothing stored under the false id");
        assert_eq!(store.head(g).unwrap().unwrap().epoch, EpochId(1), "the epoch was not committed");
    }
    store.commit(commit_of(g, 2, &[(2, 3)])).unwrap();
}

#[test]
fn a_flipped_byte_in_a_chunk_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    store.commit(commit_of(GuestId(1), 1, &[(1, 1), (2, 2)])).unwrap();
    for seed in [1u8, 2] {
        let id = content_id(&page(seed));
        store.corrupt_chunk_for_test(&id, 100).unwrap();
        let err = store.chunk(&id).unwrap_err();
        assert!(matches!(err, StoreError::ChunkCorrupt(x) if x == id), "{err}");
        assert_eq!(err.kind(), ErrorKind::Corrupt);
    }
    let missing = ChunkId([9; 32]);
    assert!(matches!(store.chunk(&missing), Err(StoreError::ChunkMissing(x)) if x == missing));
}

#[test]
fn the_last_manifests_are_read_from_the_end_and_never_another_guests() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    for g in [GuestId(1), GuestId(2), GuestId(3)] {
        for e in 1..=5 {
            store.commit(commit_of(g, e, &[(e, e as u8)])).unwrap();
        }
    }
    let all = store.manifests(GuestId(2)).unwrap();
    assert_eq!(store.last_manifests(GuestId(2), 3).unwrap(), all[2..]);
    assert_eq!(store.last_manifests(GuestId(2), 9).unwrap(), all, "no more than the guest has");
    assert!(store.last_manifests(GuestId(2), 0).unwrap().is_empty());
    assert!(store.last_manifests(GuestId(4), 3).unwrap().is_empty());
}

#[test]
fn guests_are_kept_apart() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    store.commit(commit_of(GuestId(1), 1, &[(1, 1)])).unwrap();
    store.commit(commit_of(GuestId(2), 1, &[(1, 3)])).unwrap();
    store.commit(commit_of(GuestId(2), 2, &[(4, 3)])).unwrap();
    let gs = store.guests().unwrap();
    assert_eq!(gs.iter().map(|(g, h)| (g.0, h.epoch.0)).collect::<Vec<_>>(), vec![(1, 1), (2, 2)]);
    let mut n = 0;
    store
        .for_each_page_at(GuestId(1), EpochId(1), |_, _| {
            n += 1;
            Ok(())
        })
        .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn a_commit_group_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(3);
    let outs = store.commit_many(vec![commit_of(g, 1, &[(1, 1)]), commit_of(g, 2, &[(2, 2)])]).unwrap();
    assert_eq!(outs[1].manifest.parent, outs[0].id, "chained inside the group");
    assert_eq!(store.head(g).unwrap().unwrap().epoch, EpochId(2));
    // Epoch 4 does not follow 3: the whole group is refused, 3 included.
    let err = store.commit_many(vec![commit_of(g, 3, &[(3, 5)]), commit_of(g, 5, &[(4, 6)])]).unwrap_err();
    assert!(matches!(err, StoreError::OutOfOrder { epoch: EpochId(5), head: EpochId(3), .. }));
    assert_eq!(store.head(g).unwrap().unwrap().epoch, EpochId(2));
    assert!(!store.has_chunk(&content_id(&page(5))).unwrap());
}

fn store_with_history(dir: &std::path::Path) -> Store {
    let store = Store::open(dir, StoreOptions::default()).unwrap();
    let g = GuestId(1);
    store.commit(commit_of(g, 1, &[(3, 1), (1, 2)])).unwrap();
    store.commit(commit_of(g, 2, &[(2, 3)])).unwrap();
    store.commit(commit_of(g, 3, &[(1, 4)])).unwrap();
    store
}

#[test]
fn verify_passes_a_sound_store_and_names_a_flipped_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_history(dir.path());
    let r = store.verify(|_| {}).unwrap();
    assert_eq!(r.damage, vec![], "sound store");
    assert_eq!(r.manifests, 3);
    assert_eq!(r.pages, 4);
    let id = content_id(&page(3));
    store.corrupt_chunk_for_test(&id, 7).unwrap();
    let r = store.verify(|_| {}).unwrap();
    assert_eq!(r.damage, vec![Damage::ChunkCorrupt { chunk: id.to_hex() }]);
}

#[test]
fn verify_names_a_flipped_manifest_byte_and_a_broken_chain() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_history(dir.path());
    let g = GuestId(1);
    let mut m = store.manifest(g, EpochId(2)).unwrap().encode().to_vec();
    m[60] ^= 1;
    store.corrupt_manifest_for_test(g, EpochId(2), &m).unwrap();
    let r = store.verify(|_| {}).unwrap();
    assert!(
        matches!(&r.damage[..], [Damage::ManifestCorrupt { guest: 1, epoch: 2, reason }] if reason.starts_with("corrupt manifest: checksum mismatch")),
        "{:?}",
        r.damage
    );
    // A well-formed manifest with the wrong parent breaks the chain.
    let mut forged = store.manifest(g, EpochId(3)).unwrap();
    forged.parent = ChunkId([5; 32]);
    let dir2 = tempfile::tempdir().unwrap();
    let store2 = store_with_history(dir2.path());
    store2.corrupt_manifest_for_test(g, EpochId(3), &forged.encode()).unwrap();
    let r = store2.verify(|_| {}).unwrap();
    assert!(r.damage.contains(&Damage::ChainBroken { guest: 1, epoch: 3 }), "{:?}", r.damage);
    assert!(r.damage.contains(&Damage::HeadMismatch { guest: 1 }), "{:?}", r.damage);
}

#[test]
fn a_read_only_open_reads_everything_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    drop(store_with_history(dir.path()));
    let ro = Store::open(dir.path(), StoreOptions::read_only()).unwrap();
    assert_eq!(ro.head(GuestId(1)).unwrap().unwrap().epoch, EpochId(3));
    assert_eq!(ro.verify(|_| {}).unwrap().damage, vec![]);
    assert!(ro.commit(commit_of(GuestId(1), 4, &[(1, 9)])).is_err(), "a read-only store refuses commits");
    assert!(Store::open(&dir.path().join("absent"), StoreOptions::read_only()).is_err());
}

/// An epoch writing `n` pages of random content from `seed` (compressed
/// or not, alternately): large enough to go to a pack file.
fn random_epoch(guest: GuestId, epoch: u64, n: u64, seed: u64) -> (EpochCommit, Vec<Vec<u8>>) {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut c = EpochCommit { guest, epoch: EpochId(epoch), page_count: n, time_unix_ns: epoch, ..EpochCommit::default() };
    let mut pages = Vec::new();
    for pfn in 0..n {
        let mut p = vec![0u8; PAGE_SIZE];
        rng.fill_bytes(&mut p[..PAGE_SIZE / 2]);
        let id = content_id(&p);
        c.pages.push((Pfn(pfn), id));
        let chunk = if pfn % 2 == 0 { StoredChunk::Zstd(zstd::bulk::compress(&p, 1).unwrap()) } else { StoredChunk::Plain(p.clone()) };
        c.chunks.push((id, chunk));
        pages.push(p);
    }
    (c, pages)
}

fn pack_files(store_dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(store_dir.join("packs")).map_or_else(|_| Vec::new(), |d| d.map(|e| e.unwrap().path()).collect());
    v.sort();
    v
}

#[test]
fn a_commit_of_a_page_or_more_goes_to_a_pack_file_and_reads_back_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let g = GuestId(1);
    let (c, pages) = random_epoch(g, 1, 2048, 1);
    {
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        // Less than a page of new bytes (one compressed page) stays in
        // RocksDB: no pack file yet.
        store.commit(commit_of(GuestId(9), 1, &[(1, 2)])).unwrap();
        assert!(pack_files(dir.path()).is_empty());
        let out = store.commit(c).unwrap();
        assert_eq!(out.new_chunks, 2048);
    }
    let packs = pack_files(dir.path());
    assert_eq!(packs.len(), 1, "{packs:?}");
    let pack_len = std::fs::metadata(&packs[0]).unwrap().len();
    assert!(pack_len > 2048 * 2048, "the chunks are in the pack ({pack_len} bytes)");
    // Bytes a crashed commit appended without reaching the index: ignored,
    // and the next append goes after them.
    std::fs::OpenOptions::new().append(true).open(&packs[0]).unwrap().write_all(&[0xAB; 1000]).unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let (c2, pages2) = random_epoch(g, 2, 2048, 2);
    store.commit(c2).unwrap();
    for (e, want) in [(1, &pages), (2, &pages2)] {
        store
            .for_each_page_at(g, EpochId(e), |pfn, id| {
                assert_eq!(&store.chunk(&id)?, &want[pfn.0 as usize], "epoch {e} pfn {}", pfn.0);
                let v = store.chunk_value(&id)?;
                assert_eq!(decode_chunk_value(&id, &v)?, want[pfn.0 as usize], "the value S3 packs");
                Ok(())
            })
            .unwrap();
    }
    assert_eq!(store.verify(|_| {}).unwrap().damage, vec![]);
    drop(store);
    let ro = Store::open(dir.path(), StoreOptions::read_only()).unwrap();
    assert_eq!(ro.chunk(&content_id(&pages2[7])).unwrap(), pages2[7]);
    let err = ro.commit(random_epoch(g, 3, 2048, 3).0).unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
    // A reader maps the packs: every chunk through the map.
    assert_eq!(ro.verify(|_| {}).unwrap().damage, vec![]);
}

#[test]
fn a_flipped_or_truncated_pack_names_the_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let (c, pages) = random_epoch(GuestId(1), 1, 2048, 3);
    store.commit(c).unwrap();
    let flipped = content_id(&pages[10]);
    store.corrupt_chunk_for_test(&flipped, 33).unwrap();
    assert!(matches!(store.chunk(&flipped), Err(StoreError::ChunkCorrupt(x)) if x == flipped));
    assert_eq!(store.verify(|_| {}).unwrap().damage, vec![Damage::ChunkCorrupt { chunk: flipped.to_hex() }]);
    // Cut the pack in the middle of the last page's record.
    let pack = &pack_files(dir.path())[0];
    let len = std::fs::metadata(pack).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(pack).unwrap().set_len(len - 100).unwrap();
    let last = content_id(&pages[2047]);
    let err = store.chunk(&last).unwrap_err();
    assert!(matches!(err, StoreError::ChunkCorrupt(x) if x == last), "{err}");
    // Verify names exactly the flipped chunk and the two records the cut
    // reached: the last page's and the (empty) device state's after it.
    let mut damage = store.verify(|_| {}).unwrap().damage;
    let mut want: Vec<Damage> = [flipped, last, content_id(&[])].iter().map(|id| Damage::ChunkCorrupt { chunk: id.to_hex() }).collect();
    damage.sort_by_key(|d| format!("{d:?}"));
    want.sort_by_key(|d| format!("{d:?}"));
    assert_eq!(damage, want);
}

#[test]
fn gc_frees_the_pack_space_of_dropped_epochs() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(1);
    // Epochs 1 and 2 share pack 1 (packs roll at 8 MiB in tests); epoch 3
    // starts pack 2. Each rewrites pages 0.. with new content.
    let s = 1_000_000_000;
    for (e, n, t) in [(1, 1500, 1), (2, 1500, 9 * s + s / 2), (3, 4096, 10 * s)] {
        let (mut c, _) = random_epoch(g, e, n, 10 + e);
        (c.time_unix_ns, c.commit_unix_ns) = (t, t);
        c.device_state = vec![e as u8; 16];
        store.commit(c).unwrap();
    }
    let (_, pages3) = random_epoch(g, 3, 4096, 13);
    let packs = pack_files(dir.path());
    assert_eq!(packs.len(), 2, "{packs:?}");
    let before = std::fs::metadata(&packs[0]).unwrap().blocks();
    let keep = |within_ms: u64| RetentionPolicy {
        rules: vec![KeepRule { within: std::time::Duration::from_millis(within_ms), every: std::time::Duration::ZERO }],
    };
    // Epoch 1 goes: its records are punched out of pack 1, which keeps
    // epoch 2's.
    assert_eq!(store.thin(g, &keep(1000), EpochId(3)).unwrap().epochs_dropped, 1);
    assert_eq!(store.gc().unwrap().deleted, 1501, "epoch 1's pages and device state");
    let after = std::fs::metadata(&packs[0]).unwrap().blocks();
    assert!(after < before * 6 / 10, "pack blocks {before} -> {after}");
    // Epoch 2 goes too: pack 1 holds nothing any more and is deleted;
    // pack 2 (appended to) stays.
    assert_eq!(store.thin(g, &keep(100), EpochId(3)).unwrap().epochs_dropped, 1);
    assert_eq!(store.gc().unwrap().deleted, 1501);
    assert_eq!(pack_files(dir.path()), vec![packs[1].clone()]);
    for (pfn, p) in pages3.iter().enumerate() {
        assert_eq!(&store.chunk(&content_id(p)).unwrap(), p, "pfn {pfn}");
    }
    assert_eq!(store.verify(|_| {}).unwrap().damage, vec![]);
    drop(store);
    let ro = Store::open(dir.path(), StoreOptions::read_only()).unwrap();
    assert_eq!(ro.verify(|_| {}).unwrap().damage, vec![]);
}

/// An epoch naming chunks that are not stored is refused whole, with
/// every such chunk named once, and nothing of its group is written.
#[test]
fn a_commit_naming_unstored_chunks_names_them_all_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(1);
    store.commit(commit_of(g, 1, &[(1, 1), (2, 2)])).unwrap();
    // Epoch 2 names seeds 1 and 2 (stored), 5 and 6 (never sent, 6 twice)
    // without their bytes; epoch 3 is fine but in the same group.
    let mut c = commit_of(g, 2, &[(3, 1), (4, 2), (5, 5), (6, 6), (7, 6)]);
    c.chunks.clear();
    let ok = commit_of(g, 3, &[(8, 8)]);
    let mut want = vec![content_id(&page(5)), content_id(&page(6))];
    want.sort_unstable();
    match store.commit_many(vec![c, ok]) {
        Err(e @ StoreError::Unstored { .. }) => {
            assert_eq!(e.kind(), ErrorKind::NotFound);
            let StoreError::Unstored { guest, epoch, ids } = e else { unreachable!() };
            assert_eq!((guest, epoch, ids), (g, EpochId(2), want));
        }
        r => panic!("expected Unstored, got {r:?}"),
    }
    assert_eq!(store.head(g).unwrap().unwrap().epoch, EpochId(1));
    assert!(!store.has_chunk(&content_id(&page(8))).unwrap(), "nothing of the group is written");
}

#[test]
fn a_damaged_manifest_names_the_kind_of_damage() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(1);
    let mut c = EpochCommit { guest: g, epoch: EpochId(1), page_count: 4, ..Default::default() };
    c.memory_root = remus_types::MemoryDigest::zeroed(4).root();
    store.commit(c).unwrap();
    let good = store.manifest(g, EpochId(1)).unwrap().encode().to_vec();
    let cause = |bytes: &[u8]| match Manifest::decode(bytes) {
        Err(StoreError::Corrupt { cause, .. }) => cause,
        other => panic!("not a corrupt manifest: {other:?}"),
    };
    let mut flipped = good.clone();
    flipped[60] ^= 1;
    assert!(matches!(cause(&flipped), FormatError::ChecksumMismatch { .. }));
    let mut magic = good.clone();
    magic[0] = b'X';
    assert!(matches!(cause(&magic), FormatError::BadMagic { .. }));
    let mut version = good.clone();
    version[4] = 99;
    assert!(matches!(cause(&version), FormatError::UnsupportedVersion { found: 99, .. }));
    assert!(matches!(cause(&good[..100]), FormatError::Truncated { need: MANIFEST_LEN, have: 100 }));
    // Read through the store, the record names the guest and epoch.
    store.corrupt_manifest_for_test(g, EpochId(1), &flipped).unwrap();
    let err = store.manifest(g, EpochId(1)).unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { record, cause: FormatError::ChecksumMismatch { .. } } if record == "guest-1 epoch 1 manifest"),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Corrupt);
}

#[test]
fn a_fence_survives_reopening_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let g = GuestId(5);
    {
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(store.fenced(g).unwrap(), None);
        store.fence(g, crate::Fence { epoch: EpochId(41), since_unix_ms: 1_700_000_000_000 }).unwrap();
        store.fence(g, crate::Fence { epoch: EpochId(42), since_unix_ms: 1_700_000_000_500 }).unwrap();
    }
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(store.fenced(g).unwrap(), Some(crate::Fence { epoch: EpochId(42), since_unix_ms: 1_700_000_000_500 }));
    assert_eq!(store.fenced(GuestId(6)).unwrap(), None, "fences are per guest");
    assert!(store.guests().unwrap().is_empty(), "a fence is not history");
}

#[test]
fn a_grafted_history_continues_a_chain_kept_elsewhere_and_verifies() {
    let (elsewhere, here) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let g = GuestId(4);
    // The history so far, in another store: epochs 1..=3.
    let a = Store::open(elsewhere.path(), StoreOptions::default()).unwrap();
    for e in 1..=3 {
        a.commit(commit_of(g, e, &[(e, e as u8)])).unwrap();
    }
    let head = a.head(g).unwrap().unwrap();
    // Here it continues after epoch 3, in a new run and generation.
    let b = Store::open(here.path(), StoreOptions::default()).unwrap();
    b.graft(g, Head { instance: 9, generation: 2, ..head }).unwrap();
    assert!(matches!(b.commit(commit_of(g, 3, &[(1, 1)])), Err(StoreError::OutOfOrder { .. })), "epoch 4 comes next");
    let mut c = commit_of(g, 4, &[(0, 7), (1, 8)]);
    (c.instance, c.generation) = (9, 2);
    let out = b.commit(c).unwrap();
    assert_eq!(out.manifest.parent, head.manifest, "the chain goes on from the other store's head");
    b.commit(commit_of(g, 5, &[(2, 9)])).unwrap();
    assert_eq!(b.manifests(g).unwrap().iter().map(|m| m.epoch.0).collect::<Vec<_>>(), [4, 5]);
    let report = b.verify(|_| {}).unwrap();
    assert!(report.damage.is_empty(), "{:?}", report.damage);
    assert_eq!(report.manifests, 2);
    assert!(matches!(b.graft(g, head), Err(StoreError::OutOfOrder { .. })), "only a guest with no history here");
}

#[test]
fn a_guest_that_comes_back_continues_its_history_here_across_what_it_did_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(6);
    // Epochs 1..=3 here; then the guest moved away and ran epochs 4..=8
    // elsewhere (manifest of 8 there: `there`); it comes back after 8.
    for e in 1..=3 {
        store.commit(commit_of(g, e, &[(e, e as u8)])).unwrap();
    }
    let here = store.head(g).unwrap().unwrap();
    let there = ChunkId([8; 32]);
    let back = Head { epoch: EpochId(8), manifest: there, instance: 9, page_count: 64, generation: 3 };
    assert!(matches!(store.graft(g, Head { epoch: EpochId(3), ..back }), Err(StoreError::OutOfOrder { .. })), "not behind what is here");
    store.graft(g, Head { epoch: EpochId(6), ..back }).unwrap();
    // Grafted again before anything was committed after it: one bridge.
    store.graft(g, back).unwrap();
    assert_eq!(store.head(g).unwrap(), Some(back));
    assert_eq!(
        store.bridges(g).unwrap(),
        vec![Bridge { first: EpochId(4), last: EpochId(8), first_parent: here.manifest, last_id: there }]
    );
    let mut c = commit_of(g, 9, &[(1, 9), (2, 10)]);
    (c.instance, c.generation) = (9, 3);
    assert_eq!(store.commit(c).unwrap().manifest.parent, there, "the chain goes on from the other store's epoch 8");
    assert_eq!(store.manifests(g).unwrap().iter().map(|m| m.epoch.0).collect::<Vec<_>>(), [1, 2, 3, 9]);
    let report = store.verify(|_| {}).unwrap();
    assert!(report.damage.is_empty(), "{:?}", report.damage);
    // The epochs before the move are still here to restore.
    assert_eq!(seeds_at(&store, g, 3), BTreeMap::from([(1, 1), (2, 2), (3, 3)]));
    assert_eq!(seeds_at(&store, g, 9), BTreeMap::from([(1, 9), (2, 10), (3, 3)]), "what epoch 9 does not name reads as before");
}

#[test]
fn the_change_walk_names_exactly_the_pages_whose_tables_differ() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(3);
    // Pages rewritten, rewritten with their old content, written late, and
    // another guest's pages around them in the index.
    let epochs: [&[(u64, u8)]; 6] =
        [&[(0, 1), (1, 2), (5, 3)], &[(1, 4)], &[(1, 2), (7, 5)], &[], &[(0, 6), (63, 7)], &[(5, 3), (0, 1), (2, 8)]];
    for (i, pages) in epochs.iter().enumerate() {
        store.commit(commit_of(g, i as u64 + 1, pages)).unwrap();
        store.commit(commit_of(GuestId(4), i as u64 + 1, &[(1, 9), (2, 10)])).unwrap();
    }
    let table = |e: u64| {
        let mut t = BTreeMap::new();
        store
            .for_each_page_at(g, EpochId(e), |p, id| {
                t.insert(p, id);
                Ok(())
            })
            .unwrap();
        t
    };
    for a in 0..=6u64 {
        for b in a + 1..=6 {
            let (ta, tb) = (table(a), table(b));
            let expected: Vec<(Pfn, Option<ChunkId>, ChunkId)> =
                tb.iter().filter(|(p, id)| ta.get(p) != Some(id)).map(|(p, id)| (*p, ta.get(p).copied(), *id)).collect();
            let mut got = Vec::new();
            store
                .for_each_change(g, EpochId(a), EpochId(b), |p, before, after| {
                    got.push((p, before, after));
                    Ok(())
                })
                .unwrap();
            assert_eq!(got, expected, "epochs {a} and {b}");
        }
    }
}

#[test]
fn a_guest_may_name_by_hash_only_what_it_holds_so_no_answer_tells_of_other_guests() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let (a, b) = (GuestId(1), GuestId(2));
    store.commit(commit_of(a, 1, &[(1, 7)])).unwrap();
    let h = content_id(&page(7));
    let unheld = content_id(&page(99));
    let holds = |g: GuestId| store.held(g, &[h]).unwrap()[0];
    assert!(holds(a) && !holds(b));
    // B names A's chunk by hash, and one no one stored: the same refusal.
    let by_ref = |epoch: u64, id: ChunkId| EpochCommit {
        guest: b,
        epoch: EpochId(epoch),
        page_count: 64,
        pages: vec![(Pfn(3), id)],
        ..EpochCommit::default()
    };
    let err = |r: Result<CommitOutcome, StoreError>| match r {
        Err(StoreError::Unstored { ids, .. }) => ids,
        other => panic!("{other:?}"),
    };
    assert_eq!(err(store.commit(by_ref(1, h))), vec![h]);
    assert_eq!(err(store.commit(by_ref(1, unheld))), vec![unheld]);
    // Wrong bytes under A's id are refused as under an id no one stored.
    let mut forged = commit_of(b, 1, &[]);
    forged.pages.push((Pfn(3), h));
    forged.chunks.push((h, StoredChunk::Plain(page(8))));
    assert!(matches!(store.commit(forged), Err(StoreError::Mismatch { id, .. }) if id == h));
    // Its bytes make it B's too (stored once), and then a reference will do.
    let out = store.commit(commit_of(b, 1, &[(3, 7)])).unwrap();
    assert_eq!((out.new_chunks, out.manifest.new_chunk_bytes), (0, 0), "stored once");
    assert!(holds(b));
    store.commit(by_ref(2, h)).unwrap();
    // What GC deletes no guest holds any more.
    let policy = RetentionPolicy { rules: vec![KeepRule { within: std::time::Duration::ZERO, every: std::time::Duration::ZERO }] };
    store.commit(commit_of(a, 2, &[(1, 5)])).unwrap();
    store.commit(commit_of(b, 3, &[(3, 5)])).unwrap();
    for g in [a, b] {
        store.thin(g, &policy, EpochId(u64::MAX)).unwrap();
    }
    assert!(store.gc().unwrap().deleted > 0);
    assert!(!holds(a) && !holds(b));
}

/// The pages of `g` at `e`, as seeds.
fn seeds_at(store: &Store, g: GuestId, e: u64) -> BTreeMap<u64, u8> {
    let mut got = BTreeMap::new();
    store
        .for_each_page_at(g, EpochId(e), |pfn, id| {
            let data = store.chunk(&id)?;
            got.insert(pfn.0, (1..=40).find(|&s| page(s) == data).expect("known page"));
            Ok(())
        })
        .unwrap();
    got
}

#[test]
fn a_commit_that_follows_an_earlier_epoch_bridges_the_skipped_ones_and_stays_verifiable() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(1);
    let at = |c: EpochCommit, secs: u64| EpochCommit { commit_unix_ns: secs * 1_000_000_000, ..c };
    store.commit(at(commit_of(g, 1, &[(1, 1), (2, 2)]), 1)).unwrap();
    store.commit(at(commit_of(g, 2, &[(2, 3)]), 2)).unwrap();
    // Epochs 3..=6 merged by the primary into 7: it follows 2.
    let skipped = at(EpochCommit { follows: Some(EpochId(2)), ..commit_of(g, 7, &[(1, 4), (5, 5)]) }, 100);
    // Anything else is out of order: following another epoch than the
    // head, or the head itself.
    for (epoch, follows) in [(7, 1), (7, 3), (2, 2)] {
        let bad = EpochCommit { follows: Some(EpochId(follows)), ..commit_of(g, epoch, &[(1, 4)]) };
        assert!(matches!(store.commit(bad), Err(StoreError::OutOfOrder { .. })), "{epoch} following {follows}");
    }
    assert!(matches!(store.commit(commit_of(g, 7, &[(1, 4)])), Err(StoreError::OutOfOrder { .. })), "a gap needs follows");
    let out = store.commit(skipped).unwrap();
    assert_eq!(out.manifest.parent, store.manifest(g, EpochId(2)).unwrap().id(), "the chain goes on from the epoch it follows");
    store.commit(at(commit_of(g, 8, &[(2, 6)]), 101)).unwrap();
    assert_eq!(
        store.bridges(g).unwrap(),
        vec![Bridge { first: EpochId(3), last: EpochId(6), first_parent: out.manifest.parent, last_id: out.manifest.parent }]
    );
    assert!(matches!(store.manifest(g, EpochId(4)), Err(StoreError::NoEpoch { .. })));
    assert_eq!(seeds_at(&store, g, 7), BTreeMap::from([(1, 4), (2, 3), (5, 5)]));
    assert_eq!(seeds_at(&store, g, 8), BTreeMap::from([(1, 4), (2, 6), (5, 5)]));
    assert_eq!(store.verify(|_| {}).unwrap().damage, vec![], "the chain crosses the bridge");
    // Thinning epoch 2 (every epoch of the last 5 s, then the oldest of
    // each 1000 s) merges the dropped run with the skipped one.
    let secs = std::time::Duration::from_secs;
    let policy =
        RetentionPolicy { rules: vec![KeepRule { within: secs(5), every: secs(0) }, KeepRule { within: secs(1000), every: secs(1000) }] };
    assert_eq!(store.thin(g, &policy, EpochId(8)).unwrap().epochs_dropped, 1);
    assert_eq!(store.bridges(g).unwrap().iter().map(|b| (b.first.0, b.last.0)).collect::<Vec<_>>(), vec![(2, 6)]);
    assert_eq!(seeds_at(&store, g, 7), BTreeMap::from([(1, 4), (2, 3), (5, 5)]), "epoch 2's version of page 2 survives for 7");
    assert_eq!(store.verify(|_| {}).unwrap().damage, vec![]);
}

#[test]
fn a_grafted_history_whose_first_commit_skips_epochs_extends_the_graft() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(2);
    let manifest = ChunkId([7; 32]);
    store.graft(g, Head { epoch: EpochId(10), manifest, instance: 5, page_count: 64, generation: 0 }).unwrap();
    let out = store.commit(EpochCommit { follows: Some(EpochId(10)), ..commit_of(g, 14, &[(1, 1)]) }).unwrap();
    assert_eq!(out.manifest.parent, manifest);
    assert_eq!(
        store.bridges(g).unwrap(),
        vec![Bridge { first: EpochId(1), last: EpochId(13), first_parent: ChunkId::default(), last_id: manifest }]
    );
    assert_eq!(store.verify(|_| {}).unwrap().damage, vec![]);
}

/// Version `k` of an incompressible page: a few bytes differ from the
/// version before.
fn version(k: u8) -> Vec<u8> {
    let mut p = noise(0x9e37_79b9_7f4a_7c15);
    p[..usize::from(k) * 8].fill(k);
    p
}

/// An incompressible page, a xorshift stream from `seed` (non-zero).
fn noise(mut x: u64) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `to` as a delta over `from`, as the wire carries one.
fn delta_between(from: &[u8], to: &[u8]) -> StoredChunk {
    let x: Vec<u8> = from.iter().zip(to).map(|(a, b)| a ^ b).collect();
    StoredChunk::delta(&content_id(from), &zstd::bulk::compress(&x, 1).unwrap())
}

/// An epoch writing page 0 as `to`, stored as a delta over `from`.
fn delta_commit(g: GuestId, epoch: u64, from: &[u8], to: &[u8], secs: u64) -> EpochCommit {
    let id = content_id(to);
    EpochCommit {
        guest: g,
        epoch: EpochId(epoch),
        page_count: 64,
        pages: vec![(Pfn(0), id)],
        chunks: vec![(id, delta_between(from, to))],
        commit_unix_ns: secs * 1_000_000_000,
        ..EpochCommit::default()
    }
}

/// With the recently committed pages in memory (the default) and
/// without (every base read back from disk), alike.
#[test]
fn deltas_are_kept_as_deltas_up_to_the_depth_bound_read_exact_and_their_bases_outlive_gc() {
    for recent_pages in [StoreOptions::default().recent_pages, 0] {
        deltas_kept_as_deltas(StoreOptions { recent_pages, ..StoreOptions::default() });
    }
}

fn deltas_kept_as_deltas(opts: StoreOptions) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts).unwrap();
    let g = GuestId(1);
    let v1 = version(1);
    let first = EpochCommit {
        guest: g,
        epoch: EpochId(1),
        page_count: 64,
        pages: vec![(Pfn(0), content_id(&v1))],
        chunks: vec![(content_id(&v1), StoredChunk::Plain(v1.clone()))],
        commit_unix_ns: 1_000_000_000,
        ..EpochCommit::default()
    };
    store.commit(first).unwrap();
    // 2 over 1, 3 over 2, 4 over 3: three deep; 5 over 4 would be four.
    for k in 2..=5u8 {
        let out = store.commit(delta_commit(g, u64::from(k), &version(k - 1), &version(k), u64::from(k))).unwrap();
        let stored = out.manifest.new_chunk_bytes;
        if k < 5 {
            assert!(stored < 200, "epoch {k}: the delta stored, {stored} bytes");
        } else {
            assert!(stored > 4000, "epoch {k}: the page stored whole, {stored} bytes");
        }
    }
    let id = |k: u8| content_id(&version(k));
    let codec = |k: u8| store.chunk_value(&id(k)).unwrap()[0];
    assert_eq!([codec(2), codec(3), codec(4)], [3, 3, 3], "kept as deltas");
    assert_eq!(codec(5), 1, "past the depth bound: stored whole (zstd)");
    for k in 1..=5 {
        assert_eq!(store.chunk(&id(k)).unwrap(), version(k), "version {k}");
    }
    // The S3 tier gets a delta made whole when it lacks the base, as is
    // when it holds it.
    let for_s3 = |held: bool| store.chunk_value_for_s3(&id(4), |b| held && *b == id(3)).unwrap();
    assert_eq!((for_s3(false).0[0], for_s3(false).1), (1, None));
    assert_eq!(for_s3(true), (store.chunk_value(&id(4)).unwrap(), Some((id(3), None))));
    assert_eq!(store.verify(|_| {}).unwrap().damage, vec![]);
    // Keep only epochs 4 and 5 (the newest second): version 4 is a delta
    // over 3 over 2 over 1, which no kept epoch names; GC keeps them all.
    let secs = std::time::Duration::from_secs;
    let policy = RetentionPolicy { rules: vec![KeepRule { within: secs(1), every: secs(0) }] };
    assert_eq!(store.thin(g, &policy, EpochId(5)).unwrap().epochs_dropped, 3);
    store.gc().unwrap();
    assert_eq!(store.chunk(&id(4)).unwrap(), version(4), "the chain under a kept delta survives GC");
    assert_eq!(store.verify(|_| {}).unwrap().damage, vec![]);
    // Once no kept epoch names version 4, its chain goes with it.
    let newest_only = RetentionPolicy { rules: vec![KeepRule { within: secs(0), every: secs(0) }] };
    store.thin(g, &newest_only, EpochId(5)).unwrap();
    let gone = store.gc().unwrap().deleted;
    assert!(gone >= 4, "versions 1..=4 deleted: {gone}");
    assert!(matches!(store.chunk(&id(2)), Err(StoreError::ChunkMissing(_))));
    assert_eq!(store.chunk(&id(5)).unwrap(), version(5));
    assert_eq!(store.verify(|_| {}).unwrap().damage, vec![]);
    // A delta over a base GC deleted is refused naming it, though the
    // base was committed moments ago: the primary sends it again.
    match store.commit(delta_commit(g, 6, &version(4), &version(6), 6)) {
        Err(StoreError::Unstored { ids, .. }) => assert_eq!(ids, vec![id(4)]),
        other => panic!("{other:?}"),
    }
    store.commit(delta_commit(g, 6, &version(5), &version(6), 6)).unwrap();
    assert_eq!(store.chunk(&id(6)).unwrap(), version(6));
}

#[test]
fn a_delta_that_does_not_undo_to_its_id_or_names_a_missing_base_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(1);
    store.commit(commit_of(g, 1, &[(0, 1)])).unwrap();
    // The delta of 1 → 2 handed in under the id of page 3.
    let mut wrong = delta_commit(g, 2, &page(1), &page(2), 0);
    let id3 = content_id(&page(3));
    (wrong.pages[0].1, wrong.chunks[0].0) = (id3, id3);
    assert!(matches!(store.commit(wrong), Err(StoreError::Mismatch { .. })));
    // Over a base the store never had: named, so it can be sent again.
    let missing = delta_commit(g, 2, &page(9), &page(2), 0);
    match store.commit(missing) {
        Err(StoreError::Unstored { ids, .. }) => assert_eq!(ids, vec![content_id(&page(9))]),
        other => panic!("{other:?}"),
    }
    assert_eq!(store.head(g).unwrap().unwrap().epoch, EpochId(1), "nothing of either was written");
    store.commit(delta_commit(g, 2, &page(1), &page(2), 0)).unwrap();
    assert_eq!(store.chunk(&content_id(&page(2))).unwrap(), page(2));
}

/// Two guests hand in the same new page at once, one whole and one as a
/// delta three deep (in a large epoch, long to check), while the first
/// guest goes on to a delta over it. Whatever order the commits run in,
/// every version reads back: a chunk once stored is never replaced by
/// another guest's encoding of it (which a delta over it, sized by the
/// first encoding's depth, could not survive).
#[test]
fn the_same_new_page_from_two_guests_at_once_keeps_every_delta_over_it_readable() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(Store::open(dir.path(), StoreOptions::default()).unwrap());
    let (one, two) = (GuestId(1), GuestId(2));
    // Round r's versions differ from every other round's.
    let ver = |r: u8, k: u8| {
        let mut p = version(k);
        p[PAGE_SIZE - 1] = r;
        p
    };
    let whole = |g: GuestId, epoch: u64, p: &[u8]| EpochCommit {
        guest: g,
        epoch: EpochId(epoch),
        page_count: 64,
        pages: vec![(Pfn(0), content_id(p))],
        chunks: vec![(content_id(p), StoredChunk::Plain(p.to_vec()))],
        commit_unix_ns: epoch * 1_000_000_000,
        ..EpochCommit::default()
    };
    let (mut e1, mut e2) = (0u64, 0u64);
    for r in 0..40u8 {
        // Guest 2: version 1 whole, then 2 and 3 as deltas (two deep).
        e2 += 1;
        store.commit(whole(two, e2, &ver(r, 1))).unwrap();
        for k in 2..=3 {
            e2 += 1;
            store.commit(delta_commit(two, e2, &ver(r, k - 1), &ver(r, k), e2)).unwrap();
        }
        // At once: guest 1 stores version 4 whole and then 5 as a delta
        // over it; guest 2 stores 4 as a delta over 3, in an epoch of
        // 2000 more new pages.
        let mut c2 = delta_commit(two, e2 + 1, &ver(r, 3), &ver(r, 4), e2 + 1);
        for i in 1..=2000u64 {
            let p = noise(u64::from(r) << 32 | i);
            c2.pages.push((Pfn(i), content_id(&p)));
            c2.chunks.push((content_id(&p), StoredChunk::Plain(p)));
        }
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let (s, b) = (store.clone(), barrier.clone());
        let t = std::thread::spawn(move || {
            b.wait();
            s.commit(c2).unwrap();
        });
        barrier.wait();
        store.commit(whole(one, e1 + 1, &ver(r, 4))).unwrap();
        store.commit(delta_commit(one, e1 + 2, &ver(r, 4), &ver(r, 5), e1 + 2)).unwrap();
        t.join().unwrap();
        e1 += 2;
        e2 += 1;
        for k in 1..=5 {
            assert_eq!(store.chunk(&content_id(&ver(r, k))).unwrap(), ver(r, k), "round {r}, version {k}");
        }
    }
}

#[test]
fn page_lists_keep_pfns_only_and_read_back_the_index_hashes() {
    use crate::db::{decode_pfns, encode_pfns};
    let lists: [&[u64]; 5] = [&[], &[0], &[0, 1, 2, 127, 128, 16_511, 16_512], &[5, 1 << 40, u64::MAX - 1], &[u64::MAX]];
    for list in lists {
        let bytes = encode_pfns(list.iter().map(|p| Pfn(*p)));
        assert_eq!(decode_pfns(&bytes), Some(list.iter().map(|p| Pfn(*p)).collect()), "{list:?}");
    }
    assert_eq!(encode_pfns([0, 1, 2, 3].into_iter().map(Pfn)).len(), 4, "neighbours take a byte each");
    // Not such a list: a varint cut short, one too long, a pfn past u64::MAX.
    let past_max = [&encode_pfns([Pfn(u64::MAX)].into_iter())[..], &[0x00]].concat();
    for bad in [&[0x80u8][..], &[0xff; 11][..], &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02][..], &past_max[..]] {
        assert_eq!(decode_pfns(bad), None, "{bad:?}");
    }

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(1);
    store.commit(commit_of(g, 1, &[(9, 1), (2, 2), (40, 3)])).unwrap();
    store.commit(commit_of(g, 2, &[(2, 4)])).unwrap();
    let want = |pages: &[(u64, u8)]| pages.iter().map(|&(p, s)| (Pfn(p), content_id(&page(s)))).collect::<Vec<_>>();
    assert_eq!(store.epoch_pages(g, EpochId(1)).unwrap(), want(&[(2, 2), (9, 1), (40, 3)]));
    assert_eq!(store.epoch_pages(g, EpochId(2)).unwrap(), want(&[(2, 4)]));
    // An epoch that names a page twice is refused, and nothing of it written.
    let err = store.commit(commit_of(g, 3, &[(7, 1), (7, 2)])).unwrap_err();
    assert!(err.to_string().contains("names page 7 twice"), "{err}");
    assert_eq!(store.head(g).unwrap().unwrap().epoch, EpochId(2));
    // A list naming a page the index does not hold at its epoch is named.
    store.corrupt_page_list_for_test(g, EpochId(2), &crate::db::encode_pfns([Pfn(2), Pfn(3)].into_iter())).unwrap();
    let err = store.epoch_pages(g, EpochId(2)).unwrap_err();
    assert!(err.to_string().contains("names page 3 the page index does not hold"), "{err}");
    let mismatch = vec![Damage::PageIndexMismatch { guest: 1, epoch: 2 }];
    assert_eq!(store.verify(|_| {}).unwrap().damage, mismatch, "verify names it");
    store.corrupt_page_list_for_test(g, EpochId(2), &[0x80]).unwrap();
    assert!(store.epoch_pages(g, EpochId(2)).unwrap_err().to_string().contains("not a list of ascending page numbers"));
    assert_eq!(store.verify(|_| {}).unwrap().damage, mismatch);
    // A list that misses a page the index holds.
    store.corrupt_page_list_for_test(g, EpochId(1), &crate::db::encode_pfns([Pfn(2), Pfn(9)].into_iter())).unwrap();
    store.corrupt_page_list_for_test(g, EpochId(2), &crate::db::encode_pfns([Pfn(2)].into_iter())).unwrap();
    assert_eq!(store.verify(|_| {}).unwrap().damage, vec![Damage::PageIndexMismatch { guest: 1, epoch: 1 }]);
}
