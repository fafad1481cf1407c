//! S3 tier tests against a real S3 server (`moto_server`, started by
//! `scripts/test.sh`, which exports its URL as `REMUS_TEST_S3_ENDPOINT`).

use std::sync::atomic::{AtomicU32, Ordering};

use remus_types::{ChunkId, EpochId, GuestId, Pfn, PAGE_SIZE};

use super::format::{pack_key, SegmentObject};
use super::*;
use crate::{Damage, EpochCommit, Store, StoreError, StoreOptions, StoredChunk};
use remus_types::content_id;

/// A fresh bucket on the test server.
pub(crate) fn test_config(name: &str) -> S3Config {
    let endpoint = std::env::var("REMUS_TEST_S3_ENDPOINT").unwrap_or_else(|_| {
        panic!("REMUS_TEST_S3_ENDPOINT is not set: run `bash scripts/test.sh`, which starts moto_server, or start one and export its URL")
    });
    static N: AtomicU32 = AtomicU32::new(0);
    let bucket = format!("{name}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    let mut cfg = S3Config::new(&bucket, "hist/a");
    cfg.endpoint = Some(endpoint);
    cfg.region = Some("us-east-1".into());
    cfg.access_key_id = Some("test".into());
    cfg.secret_access_key = Some("test".into());
    cfg.pack_size_kib = 64;
    S3Client::new(&cfg).unwrap().create_bucket(false).unwrap();
    cfg
}

fn page(seed: u64) -> Vec<u8> {
    (0..PAGE_SIZE).map(|i| ((i as u64).wrapping_mul(seed | 1) >> 3) as u8 ^ seed as u8).collect()
}

/// Commits `epochs` epochs of 12 changing pages each over 64 pages.
pub(crate) fn fill(store: &Store, guest: GuestId, from: u64, epochs: u64) {
    fill_following(store, guest, from - 1, from, epochs);
}

/// As [`fill`], the first epoch following epoch `follows` (the epochs
/// between skipped).
fn fill_following(store: &Store, guest: GuestId, follows: u64, from: u64, epochs: u64) {
    // Memory roots as a primary records them: over the whole page table.
    let mut digest = remus_types::MemoryDigest::zeroed(64);
    if follows > 0 {
        store
            .for_each_page_at(guest, EpochId(follows), |p, id| {
                digest.set(p, id);
                Ok(())
            })
            .unwrap();
    }
    for e in from..from + epochs {
        let mut c = EpochCommit {
            guest,
            epoch: EpochId(e),
            page_count: 64,
            time_unix_ns: e * 1000,
            commit_unix_ns: e * 1000,
            follows: Some(EpochId(follows)).filter(|_| e == from && follows + 1 != from),
            ..Default::default()
        };
        for k in 0..12 {
            let pfn = (e * 5 + k * 7) % 64;
            let p = page(e * 100 + k % 9);
            let id = content_id(&p);
            c.pages.push((Pfn(pfn), id));
            c.chunks.push((id, StoredChunk::Zstd(zstd::bulk::compress(&p, 1).unwrap())));
        }
        c.pages.sort_unstable_by_key(|(p, _)| *p);
        for (p, id) in &c.pages {
            digest.set(*p, *id);
        }
        c.memory_root = digest.root();
        c.device_state = format!("dev {e}").into_bytes();
        store.commit(c).unwrap();
    }
}

/// The local page table of `g` at `e`.
fn local_table(store: &Store, g: GuestId, e: EpochId) -> std::collections::BTreeMap<Pfn, ChunkId> {
    let mut table = std::collections::BTreeMap::new();
    store
        .for_each_page_at(g, e, |p, id| {
            table.insert(p, id);
            Ok(())
        })
        .unwrap();
    table
}

/// The key of the segment whose span starts at `first`.
fn segment_key(g: GuestId, first: u64) -> String {
    format!("{}{first:020}", format::segments_prefix(g))
}

/// A fresh bucket whose history is sealed with a new key file in `dir`.
fn sealed_config(name: &str, dir: &std::path::Path) -> S3Config {
    let mut cfg = test_config(name);
    let keys = dir.join("s3.keys");
    Keyring::add_key(&keys).unwrap();
    cfg.encryption_keys = Some(keys);
    cfg
}

/// Every object under the tier's prefix, as the bucket holds it.
fn raw_objects(tier: &S3Tier) -> Vec<(String, Vec<u8>)> {
    let keys: Vec<String> = tier.client().list("").unwrap().into_iter().map(|l| l.key).collect();
    keys.iter().cloned().zip(tier.client().get_many(&keys).unwrap()).collect()
}

/// How many of `needles` appear anywhere in `objects`.
fn found_in(objects: &[(String, Vec<u8>)], needles: &[Vec<u8>]) -> usize {
    needles.iter().filter(|n| objects.iter().any(|(_, b)| b.windows(n.len()).any(|w| w == &n[..]))).count()
}

fn flip(client: &S3Client, key: &str, at: usize) {
    let mut b = client.get(key).unwrap();
    b[at] ^= 1;
    client.delete(key, None).unwrap();
    client.put_new(key, b).unwrap();
}

#[test]
fn epochs_upload_in_packs_and_read_back_exactly_from_s3_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(3);
    fill(&store, g, 1, 30);
    let tier = S3Tier::connect(&test_config("upload")).unwrap();
    let r = tier.upload_pending(&store, &|| false).unwrap();
    assert_eq!((r.epochs, r.segments, r.checkpoints), (30, 1, 0), "one segment for the pass: {r:?}");
    assert!(r.packs >= 2, "64 KiB packs: {r:?}");
    assert_eq!(r.requests, 2 * r.packs + 1, "packs and indexes, one segment: {r:?}");
    assert_eq!(store.s3_cursor(g).unwrap(), EpochId(30));
    // Nothing left: a second pass puts nothing.
    assert_eq!(tier.upload_pending(&store, &|| false).unwrap(), UploadReport::default());
    fill(&store, g, 31, 5);
    let r = tier.upload_pending(&store, &|| false).unwrap();
    assert_eq!((r.epochs, r.segments, r.checkpoints), (5, 1, 0), "{r:?}");

    // Every epoch's page table and chunk content, from S3 alone.
    assert_eq!(tier.guests().unwrap(), [g], "one entry for the guest, whatever its epochs");
    let h = tier.history(g, Reach::ALL, &mut |_, _| {}).unwrap();
    assert_eq!(h.epochs.len(), 35);
    assert_eq!(h.objects_read, 2);
    for e in [1u64, 17, 35] {
        let table = h.page_table(EpochId(e));
        let local = local_table(&store, g, EpochId(e));
        assert_eq!(table, local, "epoch {e}");
        let mut got = 0;
        tier.fetch_chunks(table.values().copied().collect::<std::collections::HashSet<_>>(), |id, data| {
            assert_eq!(data, store.chunk(&id).unwrap());
            got += 1;
            Ok(())
        })
        .unwrap();
        assert!(got > 0);
    }
    assert_eq!(h.get(EpochId(7)).unwrap().manifest, store.manifest(g, EpochId(7)).unwrap());
    let report = tier.verify(&mut |_| {}).unwrap();
    assert_eq!(report.damage, vec![]);
    assert_eq!(report.manifests, 35);
}

#[test]
fn epochs_a_commit_skipped_are_bridged_in_s3_and_the_history_reads_and_verifies_across_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(5);
    let tier = S3Tier::connect(&test_config("skipped")).unwrap();
    fill(&store, g, 1, 10);
    tier.upload_pending(&store, &|| false).unwrap();
    // 11..=14 merged into 15 by the primary; then 21 follows 16.
    fill_following(&store, g, 10, 15, 2);
    fill_following(&store, g, 16, 21, 3);
    let r = tier.upload_pending(&store, &|| false).unwrap();
    assert_eq!(r.epochs, 5, "{r:?}");
    let spans: Vec<(u64, u64)> = tier.bridges(g, EpochId(0)).unwrap().iter().map(|b| (b.bridge.first.0, b.bridge.last.0)).collect();
    assert_eq!(spans, vec![(11, 14), (17, 20)]);
    let h = tier.history(g, Reach::ALL, &mut |_, _| {}).unwrap();
    assert_eq!(h.epochs.len(), 15);
    for e in [10u64, 15, 16, 21, 23] {
        assert_eq!(h.page_table(EpochId(e)), local_table(&store, g, EpochId(e)), "epoch {e}");
    }
    assert!(h.get(EpochId(12)).is_none());
    let report = tier.verify(&mut |_| {}).unwrap();
    assert_eq!(report.damage, vec![], "the chain crosses both bridges in S3");
    assert_eq!(report.manifests, 15);
}

#[test]
fn a_guest_that_comes_back_is_bridged_in_s3_once_an_epoch_follows_its_graft() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(6);
    let tier = S3Tier::connect(&test_config("comes-back")).unwrap();
    fill(&store, g, 1, 10);
    // It ran epochs 11..=18 elsewhere and comes back after 18, before
    // this store uploaded its epochs.
    let head = store.head(g).unwrap().unwrap();
    store.graft(g, crate::Head { epoch: EpochId(18), manifest: ChunkId([8; 32]), ..head }).unwrap();
    tier.upload_pending(&store, &|| false).unwrap();
    assert_eq!(store.s3_cursor(g).unwrap(), EpochId(10), "the epochs here, not past the graft: nothing follows it yet");
    assert!(tier.bridges(g, EpochId(0)).unwrap().is_empty());
    fill_following(&store, g, 18, 19, 3);
    let r = tier.upload_pending(&store, &|| false).unwrap();
    assert_eq!(r.epochs, 3, "{r:?}");
    let spans: Vec<(u64, u64)> = tier.bridges(g, EpochId(0)).unwrap().iter().map(|b| (b.bridge.first.0, b.bridge.last.0)).collect();
    assert_eq!(spans, vec![(11, 18)]);
    let h = tier.history(g, Reach::ALL, &mut |_, _| {}).unwrap();
    for e in [10u64, 19, 21] {
        assert_eq!(h.page_table(EpochId(e)), local_table(&store, g, EpochId(e)), "epoch {e}");
    }
    let report = tier.verify(&mut |_| {}).unwrap();
    assert_eq!(report.damage, vec![], "the chain crosses the epochs run elsewhere in S3");
    assert_eq!(report.manifests, 13);
}

#[test]
fn a_read_near_the_start_or_the_end_of_a_long_history_reads_a_bounded_number_of_objects() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(4);
    let tier = S3Tier::connect(&test_config("bounded")).unwrap();
    // 40 passes of 5 epochs, 60 pages each: a checkpoint every fifth pass
    // (over 4 times this 64-page guest's size, after at least 4 segments).
    let mut checkpoints = 0;
    for pass in 0..40 {
        fill(&store, g, 1 + pass * 5, 5);
        checkpoints += tier.upload_pending(&store, &|| false).unwrap().checkpoints;
    }
    assert_eq!(tier.segment_keys(g).unwrap().len(), 40);
    assert_eq!(checkpoints, 8);
    assert_eq!(tier.checkpoint_epochs(g).unwrap(), (1..=8).map(|k| EpochId(k * 25)).collect::<Vec<_>>());
    for target in [3u64, 24, 101, 196, 200] {
        let h = tier.history(g, Reach::epoch(EpochId(target)), &mut |_, _| {}).unwrap();
        // At most a checkpoint and the six segments from it to the target,
        // however long the history.
        assert!(h.objects_read <= 7, "epoch {target}: {} objects", h.objects_read);
        assert_eq!(h.page_table(EpochId(target)), local_table(&store, g, EpochId(target)), "epoch {target}");
        assert_eq!(h.epochs.last().unwrap().manifest, store.manifest(g, EpochId(target)).unwrap());
    }
    // The newest epochs, from the newest segments back.
    assert_eq!(tier.last_manifests(g, 7).unwrap(), store.last_manifests(g, 7).unwrap());
    assert_eq!(tier.last_manifests(g, 500).unwrap(), store.manifests(g).unwrap());
    // A time, by bisecting the segments.
    assert_eq!(tier.epoch_at(g, 137_500).unwrap(), Some(EpochId(137)));
    assert_eq!(tier.epoch_at(g, 5_000).unwrap(), Some(EpochId(5)));
    assert_eq!(tier.epoch_at(g, 999).unwrap(), None, "before the first epoch");
    assert_eq!(tier.epoch_at(g, u64::MAX).unwrap(), Some(EpochId(200)));
    let latest = tier.history(g, Reach::LATEST, &mut |_, _| {}).unwrap();
    assert_eq!(latest.objects_read, 2, "the checkpoint at 200 and the segment ending there");
    assert_eq!(latest.epochs.last().unwrap().manifest.epoch, EpochId(200));
    // A damaged checkpoint is passed over for the one before it.
    flip(tier.client(), &format::checkpoint_key(g, EpochId(200)), 300);
    let h = tier.history(g, Reach::epoch(EpochId(200)), &mut |_, _| {}).unwrap();
    assert_eq!(h.base.as_ref().map(|c| c.manifest.epoch), Some(EpochId(175)));
    assert_eq!(h.page_table(EpochId(200)), local_table(&store, g, EpochId(200)));
    let damage = tier.verify(&mut |_| {}).unwrap().damage;
    assert!(matches!(&damage[..], [Damage::ObjectCorrupt { key, .. }] if *key == format::checkpoint_key(g, EpochId(200))), "{damage:?}");
}

/// A guest that rewrites one page per epoch, cycling through its 64
/// pages, uploaded a pass every 5 epochs: each page table lies across the
/// packs of the last 13 passes. Before each checkpoint the uploader
/// gathers the table's chunks from the sparsest packs, so a checkpoint
/// names at most `spread_limit` packs and a restore from S3 near the end
/// reads about as many packs as one near the start; every epoch still
/// reads back exactly, and verify finds nothing wrong.
#[test]
fn a_checkpoints_page_table_is_gathered_into_few_packs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(6);
    let tier = S3Tier::connect(&test_config("gather")).unwrap();
    let mut digest = remus_types::MemoryDigest::zeroed(64);
    let mut gathered = 0;
    for e in 1..=350u64 {
        let p = page(e * 7 + 1);
        let id = content_id(&p);
        let pfn = Pfn((e - 1) % 64);
        digest.set(pfn, id);
        let c = EpochCommit {
            guest: g,
            epoch: EpochId(e),
            page_count: 64,
            time_unix_ns: e * 1000,
            commit_unix_ns: e * 1000,
            pages: vec![(pfn, id)],
            chunks: vec![(id, StoredChunk::Zstd(zstd::bulk::compress(&p, 1).unwrap()))],
            memory_root: digest.root(),
            device_state: b"dev".to_vec(),
            ..Default::default()
        };
        store.commit(c).unwrap();
        if e % 5 == 0 {
            gathered += tier.upload_pending(&store, &|| false).unwrap().chunks_gathered;
        }
    }
    let checkpoints = tier.checkpoint_epochs(g).unwrap();
    assert!(checkpoints.len() >= 2, "{checkpoints:?}");
    assert!(gathered > 0, "nothing gathered");
    let limit = spread_limit(64, tier.cfg.pack_bytes());
    for e in &checkpoints {
        let h = tier.history(g, Reach::epoch(*e), &mut |_, _| {}).unwrap();
        let c = h.base.as_ref().expect("read from its checkpoint");
        assert!(c.packs.len() <= limit, "checkpoint at {e} names {} packs (limit {limit})", c.packs.len());
    }
    for target in [20u64, 330, 350] {
        let (h, locs) = read_back_from_s3(&tier, &store, g, EpochId(target));
        // The packs a restore reads, those holding the table's chunks: at
        // most the checkpoint's and one per segment after it.
        let read: std::collections::BTreeSet<ChunkId> = h.page_table(EpochId(target)).values().map(|id| locs[id].0).collect();
        let segments = h.objects_read as usize - usize::from(h.base.is_some());
        assert!(read.len() <= limit + segments, "epoch {target}: {} packs, {segments} segments", read.len());
    }
    assert_eq!(tier.verify(&mut |_| {}).unwrap().damage, vec![]);
}

/// Reads epoch `e` of `g` from S3 alone: its page table, checked against
/// the local store's, and every chunk of it through the packs its history
/// names, each checked against its id. Returns the history and where
/// those packs hold each chunk.
fn read_back_from_s3(tier: &S3Tier, store: &Store, g: GuestId, e: EpochId) -> (S3History, ChunkLocations) {
    let h = tier.history(g, Reach::epoch(e), &mut |_, _| {}).unwrap();
    let table = h.page_table(e);
    assert_eq!(table, local_table(store, g, e), "epoch {e}");
    let locs = tier.pack_locations(&h.packs).unwrap().expect("the history's packs are there");
    let mut got = 0;
    tier.fetch_located(&locs, table.values().copied(), |id, data| {
        assert_eq!(content_id(&data), id);
        got += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(got, table.len(), "epoch {e}");
    (h, locs)
}

#[test]
fn an_outage_leaves_a_backlog_that_drains_and_a_second_writer_cannot_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(1);
    fill(&store, g, 1, 10);
    let cfg = test_config("outage");
    // S3 away: a port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut down = cfg.clone();
    down.endpoint = Some(format!("http://{}", closed.local_addr().unwrap()));
    drop(closed);
    down.timeout_ms = 2000;
    let err = S3Tier::new(&down).unwrap().upload_pending(&store, &|| false).unwrap_err();
    assert!(matches!(err, StoreError::S3(S3Error::Unreachable { .. })), "{err}");
    assert_eq!(err.kind(), crate::ErrorKind::Unavailable);
    assert_eq!(store.s3_cursor(g).unwrap(), EpochId(0), "nothing counted as uploaded");
    fill(&store, g, 11, 5);
    // S3 back: the whole backlog drains.
    let tier = S3Tier::connect(&cfg).unwrap();
    assert_eq!(tier.upload_pending(&store, &|| false).unwrap().epochs, 15);
    assert_eq!(tier.segment_keys(g).unwrap().len(), 1);

    // A pass that stopped before its cursor moved (here: another store
    // with the same history, and more of it) finds its segment in place
    // and puts only what follows.
    let dir3 = tempfile::tempdir().unwrap();
    let same = Store::open(dir3.path(), StoreOptions::default()).unwrap();
    fill(&same, g, 1, 20);
    let r = tier.upload_pending(&same, &|| false).unwrap();
    assert_eq!((r.epochs, r.segments), (20, 1), "{r:?}");
    assert_eq!(tier.segment_keys(g).unwrap().iter().map(|s| s.first.0).collect::<Vec<_>>(), [1, 16]);
    assert_eq!(tier.history(g, Reach::ALL, &mut |_, _| {}).unwrap().epochs.len(), 20);

    // Another store with different history under the same prefix and guest
    // must not overwrite ours.
    let dir2 = tempfile::tempdir().unwrap();
    let other = Store::open(dir2.path(), StoreOptions::default()).unwrap();
    fill(&other, g, 1, 3);
    let mut c = EpochCommit { guest: g, epoch: EpochId(4), page_count: 64, time_unix_ns: 1, ..Default::default() };
    c.device_state = b"other".to_vec();
    other.commit(c).unwrap();
    let s = tier.upload_pending(&other, &|| false);
    // Epochs 1..3 are byte-identical (same content, same chain): fine;
    // epoch 4 differs and is refused.
    assert!(matches!(s, Err(StoreError::S3(S3Error::Conflict(_)))), "{s:?}");
    assert_eq!(other.s3_cursor(g).unwrap(), EpochId(0));
    let seg = SegmentObject::decode(&tier.client().get(&segment_key(g, 1)).unwrap()).unwrap();
    assert_eq!(seg.epochs[3].0, store.manifest(g, EpochId(4)).unwrap(), "the first writer's epoch stands");

    // A bucket that is not there is a clear error.
    let mut missing = cfg.clone();
    missing.bucket = "no-such-bucket-here".into();
    assert!(matches!(S3Tier::connect(&missing), Err(S3Error::NoSuchBucket(_))));
}

#[test]
fn verify_names_the_damaged_pack_chunk_and_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(2);
    fill(&store, g, 1, 8);
    let tier = S3Tier::connect(&test_config("verify")).unwrap();
    tier.upload_pending(&store, &|| false).unwrap();
    assert_eq!(tier.verify(&mut |_| {}).unwrap().damage, vec![]);

    // One byte inside a chunk of a pack.
    let ix_key = tier.client().list("index/").unwrap()[0].key.clone();
    let ix = format::decode_index(&tier.client().get(&ix_key).unwrap()).unwrap();
    let victim = ix.entries[1];
    flip(tier.client(), &pack_key(&ix.pack), victim.offset as usize + victim.len as usize / 2);
    // One byte of a manifest in the segment.
    let seg_key = segment_key(g, 1);
    flip(tier.client(), &seg_key, 200);
    let report = tier.verify(&mut |_| {}).unwrap();
    assert_eq!(report.damage.len(), 2, "{:?}", report.damage);
    assert_eq!(report.damage[0], Damage::PackChunkCorrupt { pack: ix.pack.to_hex(), chunk: victim.id.to_hex() });
    assert!(
        matches!(&report.damage[1], Damage::ObjectCorrupt { key, reason } if *key == seg_key && reason.starts_with("corrupt segment: checksum mismatch")),
        "{:?}",
        report.damage
    );
    // Restore-side reads refuse the damage, naming it.
    let err = tier.history(g, Reach::ALL, &mut |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("segments/0000000000000002/00000000000000000001") && err.contains("checksum"), "{err}");
    let err = tier.fetch_chunks([victim.id], |_, _| Ok(())).unwrap_err().to_string();
    assert!(err.contains(&ix.pack.to_hex()) && err.contains(&victim.id.to_hex()), "{err}");
    let _ = ChunkId::default();
}

/// Every pack in S3 holds at least as many live chunks (ones the local
/// store's kept epochs reference) as dead ones.
fn assert_no_pack_mostly_dead(tier: &S3Tier, store: &Store) {
    let live = store.referenced().unwrap();
    for l in tier.client().list("index/").unwrap() {
        let ix = format::decode_index(&tier.get_object(&l.key).unwrap()).unwrap();
        let n = ix.entries.iter().filter(|e| live.contains(&e.id)).count();
        assert!(n * 2 >= ix.entries.len(), "{}: {n} of {} chunks live", l.key, ix.entries.len());
    }
}

fn assert_s3_matches_local(tier: &S3Tier, store: &Store, g: GuestId) {
    let h = tier.history(g, Reach::ALL, &mut |_, _| {}).unwrap();
    let local = store.manifests(g).unwrap();
    assert_eq!(h.epochs.iter().map(|e| e.manifest.clone()).collect::<Vec<_>>(), local, "S3 keeps exactly the local epochs");
    let mut wanted = std::collections::HashSet::new();
    for m in &local {
        let table = local_table(store, g, m.epoch);
        assert_eq!(h.page_table(m.epoch), table, "epoch {}", m.epoch);
        // And read from the checkpoint before it.
        let from_checkpoint = tier.history(g, Reach::epoch(m.epoch), &mut |_, _| {}).unwrap();
        assert_eq!(from_checkpoint.page_table(m.epoch), table, "epoch {} from a checkpoint", m.epoch);
        // Its time finds it among the segments.
        assert_eq!(tier.epoch_at(g, m.time_unix_ns).unwrap(), Some(m.epoch));
        wanted.extend(table.into_values());
    }
    for e in tier.checkpoint_epochs(g).unwrap() {
        assert!(local.iter().any(|m| m.epoch == e), "a checkpoint at dropped epoch {e}");
    }
    tier.fetch_chunks(wanted, |id, data| {
        assert_eq!(content_id(&data), id);
        Ok(())
    })
    .unwrap();
    assert_eq!(tier.verify(&mut |_| {}).unwrap().damage, vec![]);
    assert_eq!(store.verify(|_| {}).unwrap().damage, vec![], "the local store verifies too");
}

#[test]
fn thinning_and_gc_are_mirrored_in_s3_and_every_kept_epoch_stays_restorable() {
    thinning_and_gc_mirrored(&test_config("thin"));
}

#[test]
fn thinning_and_gc_are_mirrored_in_a_sealed_tier_too() {
    let keys = tempfile::tempdir().unwrap();
    thinning_and_gc_mirrored(&sealed_config("thin-sealed", keys.path()));
}

fn thinning_and_gc_mirrored(cfg: &S3Config) {
    use crate::{KeepRule, RetentionPolicy};
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(6);
    let tier = S3Tier::connect(cfg).unwrap();
    // Six passes: a checkpoint after the fourth (480 pages over 64).
    for pass in 0..6 {
        fill(&store, g, 1 + pass * 10, 10);
        tier.upload_pending(&store, &|| false).unwrap();
    }
    assert_eq!(tier.checkpoint_epochs(g).unwrap(), [EpochId(40)]);
    let us = Duration::from_micros;
    let policy = RetentionPolicy { rules: vec![KeepRule { within: us(10), every: us(0) }, KeepRule { within: us(1000), every: us(7) }] };
    let run = apply_retention(&store, Some(&tier), &policy).unwrap();
    assert!(run.epochs_dropped > 30, "{run:?}");
    assert_eq!(run.s3.epochs_deleted, run.epochs_dropped);
    assert!(run.s3.segments_rewritten > 0 && run.s3.checkpoints_moved > 0, "{run:?}");
    assert_no_pack_mostly_dead(&tier, &store);
    assert_s3_matches_local(&tier, &store, g);
    // More history, a coarser policy: bridges merge, the replaced ones go.
    fill(&store, g, 61, 40);
    // Epochs not yet in S3 are never thinned.
    let coarse = RetentionPolicy { rules: vec![KeepRule { within: us(5), every: us(0) }, KeepRule { within: us(1000), every: us(25) }] };
    let before = store.manifests(g).unwrap().len();
    apply_retention(&store, Some(&tier), &coarse).unwrap();
    assert!(store.manifests(g).unwrap().iter().filter(|m| m.epoch.0 > 60).count() == 40);
    tier.upload_pending(&store, &|| false).unwrap();
    let run = apply_retention(&store, Some(&tier), &coarse).unwrap();
    assert!(run.epochs_dropped > 0 && store.manifests(g).unwrap().len() < before + 40);
    assert_s3_matches_local(&tier, &store, g);
    assert_eq!(tier.client().list(&format::bridges_prefix(g)).unwrap().len(), store.bridges(g).unwrap().len());
    // Drop everything but the newest: whole packs become garbage.
    let last_only = RetentionPolicy { rules: vec![KeepRule { within: us(0), every: us(0) }] };
    let run = apply_retention(&store, Some(&tier), &last_only).unwrap();
    assert!(run.s3.packs_deleted > 0, "{run:?}");
    // Packs that kept a few live chunks are rewritten with those alone,
    // and none is left more dead than live.
    assert!(run.s3.packs_repacked > 0 && run.s3.chunks_moved > 0, "{run:?}");
    assert_no_pack_mostly_dead(&tier, &store);
    assert_eq!(store.manifests(g).unwrap().len(), 1);
    assert_s3_matches_local(&tier, &store, g);
    // New content that equals collected content is uploaded again.
    fill(&store, g, 101, 3);
    tier.upload_pending(&store, &|| false).unwrap();
    assert_s3_matches_local(&tier, &store, g);
}

#[test]
fn an_archive_is_locked_in_compliance_mode_and_restorable() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(1);
    fill(&store, g, 1, 6);
    let tier = S3Tier::connect(&test_config("src")).unwrap();
    tier.upload_pending(&store, &|| false).unwrap();
    // A bucket without Object Lock refuses to hold an archive.
    let plain = S3Tier::connect(&test_config("plain")).unwrap();
    let err = tier.archive_to(&plain, 1, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("Object Lock"), "{err}");
    let mut cfg = test_config("locked");
    cfg.bucket.push_str("-x");
    S3Client::new(&cfg).unwrap().create_bucket(true).unwrap();
    let archive = S3Tier::connect(&cfg).unwrap();
    let r = tier.archive_to(&archive, 1, &mut |_, _| {}).unwrap();
    let objects = tier.client().list("").unwrap().len() as u64;
    assert_eq!((r.copied, r.present), (objects, 0));
    assert_eq!(tier.archive_to(&archive, 1, &mut |_, _| {}).unwrap().copied, 0, "idempotent");
    // The server refuses to delete a locked version.
    let versions = archive.client().list_versions("segments/").unwrap();
    assert_eq!(versions.len(), 1);
    let v = &versions[0];
    let err = archive.client().delete(&v.key, Some(&v.version)).unwrap_err();
    assert!(matches!(&err, S3Error::Locked { version, .. } if *version == v.version), "{err}");
    assert_eq!(archive.client().list_versions("segments/").unwrap().len(), 1);
    // And the archive alone restores.
    let h = archive.history(g, Reach::ALL, &mut |_, _| {}).unwrap();
    assert_eq!(h.epochs.len(), 6);
    assert_eq!(archive.verify(&mut |_| {}).unwrap().damage, vec![]);
}

#[test]
fn truncated_objects_are_named_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(9);
    fill(&store, g, 1, 4);
    let tier = S3Tier::connect(&test_config("trunc")).unwrap();
    tier.upload_pending(&store, &|| false).unwrap();
    let ix_key = tier.client().list("index/").unwrap()[0].key.clone();
    let ix = format::decode_index(&tier.client().get(&ix_key).unwrap()).unwrap();
    let cut = |key: &str, keep: usize| {
        let b = tier.client().get(key).unwrap();
        tier.client().delete(key, None).unwrap();
        tier.client().put_new(key, b[..keep].to_vec()).unwrap();
    };
    let last = *ix.entries.last().unwrap();
    cut(&pack_key(&ix.pack), last.offset as usize + 3);
    let seg_key = segment_key(g, 1);
    cut(&seg_key, 200);
    let damage = tier.verify(&mut |_| {}).unwrap().damage;
    assert!(damage.contains(&Damage::PackCorrupt { pack: ix.pack.to_hex(), reason: "truncated or bad header".into() }), "{damage:?}");
    assert!(damage.contains(&Damage::PackChunkCorrupt { pack: ix.pack.to_hex(), chunk: last.id.to_hex() }), "{damage:?}");
    assert!(
        damage.iter().any(|d| matches!(d, Damage::ObjectCorrupt { key, reason } if *key == seg_key && reason.starts_with("corrupt segment: checksum mismatch"))),
        "{damage:?}"
    );
    let err = tier.fetch_chunks([last.id], |_, _| Ok(())).unwrap_err().to_string();
    assert!(err.contains("truncated") && err.contains(&ix.pack.to_hex()), "{err}");
    let err = tier.history(g, Reach::ALL, &mut |_, _| {}).unwrap_err().to_string();
    assert!(err.contains(&seg_key), "{err}");
}

/// An epoch object as tiers were written before segments.
fn legacy_epoch_object(m: &crate::Manifest, pages: &[(Pfn, ChunkId)]) -> Vec<u8> {
    let mut v = remus_types::format::start_trailed(b"RMEP", 1);
    v.extend_from_slice(&m.encode());
    v.extend_from_slice(&(pages.len() as u64).to_le_bytes());
    for (pfn, id) in pages {
        v.extend_from_slice(&pfn.0.to_le_bytes());
        v.extend_from_slice(&id.0);
    }
    remus_types::format::seal_trailed(v)
}

#[test]
fn a_tier_written_before_segments_is_read_and_continued() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(8);
    let tier = S3Tier::connect(&test_config("legacy")).unwrap();
    // Epochs 1..=10 as the old layout left them: packs, indexes, and one
    // epoch object each (no segment, no checkpoint).
    fill(&store, g, 1, 10);
    tier.upload_pending(&store, &|| false).unwrap();
    tier.client().delete(&segment_key(g, 1), None).unwrap();
    for e in 1..=10 {
        let (m, pages) = (store.manifest(g, EpochId(e)).unwrap(), store.epoch_pages(g, EpochId(e)).unwrap());
        tier.client().put_new(&format!("{}{e:020}", format::legacy_epochs_prefix(g)), legacy_epoch_object(&m, &pages)).unwrap();
    }
    // The new uploader goes on from its cursor in segments.
    fill(&store, g, 11, 10);
    assert_eq!(tier.upload_pending(&store, &|| false).unwrap().epochs, 10);
    assert_eq!(tier.guests().unwrap(), [g]);
    assert_s3_matches_local(&tier, &store, g);
    assert_eq!(tier.last_manifests(g, 3).unwrap(), store.last_manifests(g, 3).unwrap());
    // Thinning deletes the epoch objects of dropped epochs.
    let us = std::time::Duration::from_micros;
    let policy = crate::RetentionPolicy {
        rules: vec![crate::KeepRule { within: us(3), every: us(0) }, crate::KeepRule { within: us(1000), every: us(4) }],
    };
    let run = apply_retention(&store, Some(&tier), &policy).unwrap();
    assert!(run.epochs_dropped > 5, "{run:?}");
    assert_s3_matches_local(&tier, &store, g);
    assert!(tier.client().list(&format::legacy_epochs_prefix(g)).unwrap().len() < 10);
}

#[test]
fn a_sealed_tier_shows_the_bucket_no_chunk_id_or_content_and_reads_verifies_and_archives_with_its_key_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(9);
    let keys = tempfile::tempdir().unwrap();
    let cfg = sealed_config("sealed", keys.path());
    let tier = S3Tier::connect(&cfg).unwrap();
    // The control: the same history in a tier without keys (from a store
    // of its own, as upload marks belong to one tier).
    let plain = S3Tier::connect(&test_config("unsealed")).unwrap();
    let plain_dir = tempfile::tempdir().unwrap();
    let plain_store = Store::open(plain_dir.path(), StoreOptions::default()).unwrap();
    for pass in 0..5 {
        for (s, t) in [(&store, &tier), (&plain_store, &plain)] {
            fill(s, g, 1 + pass * 8, 8);
            t.upload_pending(s, &|| false).unwrap();
        }
    }
    assert_eq!(tier.checkpoint_epochs(g).unwrap().len(), 1, "a checkpoint too");

    // What a reader of the bucket sees: no chunk id, no stored value, no
    // manifest; the same search finds them all in an unsealed tier.
    let mut ids = std::collections::BTreeSet::new();
    let mut manifests = Vec::new();
    for m in store.manifests(g).unwrap() {
        ids.extend(store.epoch_pages(g, m.epoch).unwrap().into_iter().map(|(_, id)| id));
        manifests.push(m.encode()[..64].to_vec());
    }
    let id_bytes: Vec<Vec<u8>> = ids.iter().map(|id| id.0.to_vec()).collect();
    let values: Vec<Vec<u8>> = ids.iter().map(|id| store.chunk_value(id).unwrap()[1..33].to_vec()).collect();
    let (sealed_raw, plain_raw) = (raw_objects(&tier), raw_objects(&plain));
    assert_eq!(sealed_raw.len(), plain_raw.len(), "the same objects");
    assert_eq!(found_in(&plain_raw, &id_bytes), ids.len(), "the control finds every id in the clear");
    assert_eq!(found_in(&plain_raw, &values), ids.len());
    assert_eq!(found_in(&plain_raw, &manifests), manifests.len());
    assert_eq!(found_in(&sealed_raw, &id_bytes), 0, "no chunk id in the sealed tier");
    assert_eq!(found_in(&sealed_raw, &values), 0, "no chunk content");
    assert_eq!(found_in(&sealed_raw, &manifests), 0, "no manifest");

    // With the key: every epoch and chunk exactly, and verify is exact.
    assert_s3_matches_local(&tier, &store, g);
    let report = tier.verify(&mut |_| {}).unwrap();
    assert_eq!((report.damage.len(), report.chunks), (0, ids.len() as u64 + 40), "pages and device states");

    // Without it, or with another file's key 1: refused, naming why.
    let unkeyed = S3Tier::new(&S3Config { encryption_keys: None, ..cfg.clone() }).unwrap();
    let err = unkeyed.history(g, Reach::ALL, &mut |_, _| {}).unwrap_err();
    assert!(matches!(&err, StoreError::Keys(m) if m.contains("is encrypted") && m.contains("s3.encryption-keys")), "{err}");
    assert!(unkeyed.verify(&mut |_| {}).is_err());
    let elsewhere = tempfile::tempdir().unwrap();
    let wrong = S3Tier::new(&sealed_config("other-keys", elsewhere.path()).with_url(&cfg.url()).unwrap()).unwrap();
    let err = wrong.history(g, Reach::ALL, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("does not decrypt with key 1"), "{err}");

    // An object put in the clear by whoever can write the bucket is refused.
    let seg = tier.segment_keys(g).unwrap().pop().unwrap();
    let forged = plain.client().get(&seg.key).unwrap();
    tier.client().delete(&seg.key, None).unwrap();
    tier.client().put_new(&seg.key, forged.clone()).unwrap();
    let err = tier.history(g, Reach::ALL, &mut |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("not encrypted, but s3.encryption-keys is set"), "{err}");
    let report = tier.verify(&mut |_| {}).unwrap();
    assert!(
        matches!(&report.damage[..], [Damage::ObjectCorrupt { key, reason }] if *key == seg.key && reason.contains("not encrypted")),
        "{:?}",
        report.damage
    );
    // ... unless the tier says it was written before encryption.
    let mixed = S3Tier::new(&S3Config { accept_plaintext: true, ..cfg.clone() }).unwrap();
    assert_eq!(mixed.history(g, Reach::ALL, &mut |_, _| {}).unwrap().epochs.len(), 40);
    tier.client().delete(&seg.key, None).unwrap();
    let original = sealed_raw.iter().find(|(k, _)| *k == seg.key).unwrap().1.clone();
    tier.client().put_new(&seg.key, original).unwrap();

    // One flipped byte in a sealed chunk, one in a sealed segment: named.
    let ix_key = tier.client().list("index/").unwrap()[0].key.clone();
    let ix = format::decode_index(&tier.get_object(&ix_key).unwrap()).unwrap();
    let victim = ix.entries[1];
    flip(tier.client(), &pack_key(&ix.pack), victim.offset as usize + 3);
    let first = segment_key(g, 1);
    flip(tier.client(), &first, 100);
    let report = tier.verify(&mut |_| {}).unwrap();
    assert_eq!(report.damage.len(), 2, "{:?}", report.damage);
    assert_eq!(report.damage[0], Damage::PackChunkCorrupt { pack: ix.pack.to_hex(), chunk: victim.id.to_hex() });
    assert!(matches!(&report.damage[1], Damage::ObjectCorrupt { key, reason } if *key == first && reason.contains("does not decrypt")));
    flip(tier.client(), &pack_key(&ix.pack), victim.offset as usize + 3);
    flip(tier.client(), &first, 100);

    // A compliance archive of it: locked, and restorable and verifiable
    // with the key alone.
    let mut locked = test_config("sealed-archive");
    locked.bucket.push_str("-x");
    S3Client::new(&locked).unwrap().create_bucket(true).unwrap();
    locked.encryption_keys = cfg.encryption_keys.clone();
    let archive = S3Tier::connect(&locked).unwrap();
    tier.archive_to(&archive, 1, &mut |_, _| {}).unwrap();
    assert_eq!(archive.history(g, Reach::ALL, &mut |_, _| {}).unwrap().epochs.len(), 40);
    assert_eq!(archive.verify(&mut |_| {}).unwrap().damage, vec![]);
    let unkeyed = S3Tier::new(&S3Config { encryption_keys: None, ..locked }).unwrap();
    assert!(matches!(unkeyed.history(g, Reach::ALL, &mut |_, _| {}), Err(StoreError::Keys(_))));
}

#[test]
fn server_side_encryption_is_asked_on_every_put() {
    let mut cfg = test_config("sse");
    cfg.server_side_encryption = Some("AES256".into());
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    fill(&store, GuestId(4), 1, 5);
    let tier = S3Tier::connect(&cfg).unwrap();
    tier.upload_pending(&store, &|| false).unwrap();
    assert_eq!(tier.history(GuestId(4), Reach::ALL, &mut |_, _| {}).unwrap().epochs.len(), 5);
    for l in tier.client().list("").unwrap() {
        assert_eq!(tier.client().server_side_encryption(&l.key).unwrap().as_deref(), Some("AES256"), "{}", l.key);
    }
    let bad = S3Config { server_side_encryption: Some("rot13".into()), ..cfg };
    assert!(bad.validate().unwrap_err().to_string().contains("server-side-encryption"));
}

/// Commits epoch `epoch` of `g` rewriting the page at `pfn` as a few
/// bytes changed from what the epoch before left there, sent as a delta
/// over it; returns the new content's id.
fn commit_edit(store: &Store, g: GuestId, epoch: u64, pfn: Pfn) -> ChunkId {
    let table = local_table(store, g, EpochId(epoch - 1));
    let before = table[&pfn];
    let old = store.chunk(&before).unwrap();
    let mut new = old.clone();
    new[100 + epoch as usize..108 + epoch as usize].copy_from_slice(b"changed!");
    let xor: Vec<u8> = old.iter().zip(&new).map(|(a, b)| a ^ b).collect();
    let id = content_id(&new);
    let mut digest = remus_types::MemoryDigest::zeroed(64);
    for (p, c) in table {
        digest.set(p, c);
    }
    digest.set(pfn, id);
    let c = EpochCommit {
        guest: g,
        epoch: EpochId(epoch),
        page_count: 64,
        time_unix_ns: epoch * 1000,
        commit_unix_ns: epoch * 1000,
        memory_root: digest.root(),
        pages: vec![(pfn, id)],
        chunks: vec![(id, StoredChunk::delta(&before, &zstd::bulk::compress(&xor, 1).unwrap()))],
        ..Default::default()
    };
    store.commit(c).unwrap();
    id
}

/// The codec byte of chunk `id` as S3 holds it (the tier unsealed).
fn s3_codec(tier: &S3Tier, id: &ChunkId) -> u8 {
    let (pack, e) = tier.chunk_locations().unwrap()[id];
    tier.client().get_range(&pack_key(&pack), e.offset, 1).unwrap()[0]
}

/// A guest editing one page an epoch (kept as XOR deltas, chains up to
/// three deep), uploaded a pass every 5 epochs: the checkpoints gather
/// the tables' scattered chunks, and a gathered delta goes again as a
/// delta (its base is among the table's chains): more deltas are put
/// than there are distinct deltas. Every checkpoint still names at most
/// `spread_limit` packs, every epoch reads back exactly, and verify
/// finds nothing wrong.
#[test]
fn gathered_deltas_stay_deltas_and_every_checkpoint_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(6);
    let tier = S3Tier::connect(&test_config("gather-deltas")).unwrap();
    fill(&store, g, 1, 6);
    let pfns: Vec<Pfn> = local_table(&store, g, EpochId(6)).keys().copied().collect();
    let (mut gathered, mut deltas_put, mut edits) = (0, 0, Vec::new());
    for e in 7..=400u64 {
        edits.push(commit_edit(&store, g, e, pfns[e as usize % pfns.len()]));
        if e % 5 == 0 {
            let r = tier.upload_pending(&store, &|| false).unwrap();
            gathered += r.chunks_gathered;
            deltas_put += r.deltas;
        }
    }
    let r = tier.upload_pending(&store, &|| false).unwrap();
    deltas_put += r.deltas;
    let deltas = edits.iter().filter(|id| store.chunk_value(id).unwrap()[0] == 3).count() as u64;
    assert!(gathered > 0 && deltas > 0, "gathered {gathered}, deltas {deltas}");
    assert!(deltas_put > deltas, "{deltas_put} deltas put for {deltas} distinct: none gathered as a delta");
    let checkpoints = tier.checkpoint_epochs(g).unwrap();
    assert!(checkpoints.len() >= 2, "{checkpoints:?}");
    let limit = spread_limit(64, tier.cfg.pack_bytes());
    for e in checkpoints.iter().copied().chain([EpochId(6), EpochId(203), EpochId(400)]) {
        let (h, _) = read_back_from_s3(&tier, &store, g, e);
        if let Some(c) = h.base.as_ref().filter(|c| c.manifest.epoch == e) {
            assert!(c.packs.len() <= limit, "checkpoint at {e} names {} packs (limit {limit})", c.packs.len());
        }
    }
    assert_eq!(tier.verify(&mut |_| {}).unwrap().damage, vec![]);

    // A gathered delta has two copies; the one readers do not locate,
    // damaged, is named with its own pack.
    let mut copies: std::collections::HashMap<ChunkId, Vec<(ChunkId, format::PackEntry)>> = std::collections::HashMap::new();
    for l in tier.client().list("index/").unwrap() {
        let ix = format::decode_index(&tier.get_object(&l.key).unwrap()).unwrap();
        for e in ix.entries {
            copies.entry(e.id).or_default().push((ix.pack, e));
        }
    }
    let locs = tier.chunk_locations().unwrap();
    let codec = |pack: &ChunkId, e: &format::PackEntry| tier.client().get_range(&pack_key(pack), e.offset, 1).unwrap()[0];
    let (id, pack, e) = copies
        .iter()
        .filter(|(_, c)| c.len() > 1)
        .find_map(|(id, c)| c.iter().find(|(p, e)| *p != locs[id].0 && codec(p, e) == 3).map(|(p, e)| (*id, *p, *e)))
        .expect("a delta with two copies");
    flip(tier.client(), &pack_key(&pack), (e.offset + u64::from(e.len) - 2) as usize);
    let damage = tier.verify(&mut |_| {}).unwrap().damage;
    assert!(damage.contains(&Damage::PackChunkCorrupt { pack: pack.to_hex(), chunk: id.to_hex() }), "{damage:?}");
}

#[test]
fn a_delta_goes_to_s3_as_a_delta_over_the_base_s3_holds_and_reads_back_through_its_chain() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(6);
    let tier = S3Tier::connect(&test_config("delta")).unwrap();
    fill(&store, g, 1, 2);
    let first = tier.upload_pending(&store, &|| false).unwrap();
    assert_eq!(first.deltas, 0, "{first:?}");
    // Four edits of one page: deltas 1, 2 and 3 deep, then one the store
    // keeps whole (its base is as deep as a chain may go).
    let pfn = *local_table(&store, g, EpochId(2)).keys().next().unwrap();
    let base = local_table(&store, g, EpochId(2))[&pfn];
    let edits: Vec<ChunkId> = (3..=6).map(|e| commit_edit(&store, g, e, pfn)).collect();
    let codecs: Vec<u8> = edits.iter().map(|id| store.chunk_value(id).unwrap()[0]).collect();
    assert_eq!(codecs, [3, 3, 3, 1], "kept locally as deltas, the fourth whole");
    // Uploaded in two passes: the first delta's base is in an earlier
    // pass's pack, the later ones' in the same pack as themselves.
    let r = tier.upload_pending(&store, &|| false).unwrap();
    assert_eq!((r.epochs, r.deltas), (4, 3), "{r:?}");
    let in_s3: Vec<u8> = edits.iter().map(|id| s3_codec(&tier, id)).collect();
    assert_eq!(in_s3, codecs, "S3 keeps the deltas as deltas");

    // Read back from S3 alone, through the chains.
    let wanted: Vec<ChunkId> = edits.iter().rev().copied().collect();
    let mut got = std::collections::HashMap::new();
    tier.fetch_chunks(wanted.clone(), |id, data| {
        got.insert(id, data);
        Ok(())
    })
    .unwrap();
    assert_eq!(got.len(), 4);
    for id in &edits {
        assert_eq!(content_id(&got[id]), *id);
    }
    assert_eq!(got[&edits[2]], store.chunk(&edits[2]).unwrap());
    // A reader of the last epoch finds every base of the chain in the
    // packs its history names, without reading every index.
    let h = tier.history(g, Reach::epoch(EpochId(6)), &mut |_, _| {}).unwrap();
    let locs = tier.pack_locations(&h.packs).unwrap().unwrap();
    for id in [base, edits[0], edits[1], edits[2]] {
        assert!(locs.contains_key(&id), "{id} is in a pack the history names");
    }
    assert_eq!(tier.verify(&mut |_| {}).unwrap().damage, vec![]);

    // A checkpoint names the packs of the bases of its page table's deltas.
    let c = store.s3_checkpoint(&store.manifest(g, EpochId(5)).unwrap()).unwrap();
    let (pack_of_base, _) = tier.chunk_locations().unwrap()[&base];
    assert!(c.packs.contains(&pack_of_base), "{:?}", c.packs);

    // The middle delta damaged: it and the one over it are named, and a
    // read through it says which pack and chunk.
    let (pack, e) = tier.chunk_locations().unwrap()[&edits[1]];
    flip(tier.client(), &pack_key(&pack), (e.offset + u64::from(e.len) - 2) as usize);
    let damage = tier.verify(&mut |_| {}).unwrap().damage;
    for id in &edits[1..3] {
        assert!(damage.contains(&Damage::PackChunkCorrupt { pack: pack.to_hex(), chunk: id.to_hex() }), "{id}: {damage:?}");
    }
    assert!(!damage.iter().any(|d| matches!(d, Damage::PackChunkCorrupt { chunk, .. } if *chunk == edits[0].to_hex())), "{damage:?}");
    let err = tier.fetch_chunks([edits[2]], |_, _| Ok(())).unwrap_err().to_string();
    assert!(err.contains(&pack.to_hex()) && err.contains("does not match its hash"), "{err}");
}

#[test]
fn gc_repacks_deltas_as_deltas_and_every_kept_epoch_reads_back() {
    use crate::{KeepRule, RetentionPolicy};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let g = GuestId(7);
    let tier = S3Tier::connect(&test_config("delta-gc")).unwrap();
    // A chain at page 15 in a pack of its own, then epochs that leave page
    // 15 alone and overwrite most of the rest: that pack ends mostly dead.
    fill(&store, g, 1, 3);
    let edits: Vec<ChunkId> = (4..=6).map(|e| commit_edit(&store, g, e, Pfn(15))).collect();
    assert_eq!(tier.upload_pending(&store, &|| false).unwrap().packs, 1);
    fill_following(&store, g, 6, 7, 6);
    assert_eq!(local_table(&store, g, EpochId(12))[&Pfn(15)], edits[2]);
    tier.upload_pending(&store, &|| false).unwrap();
    let packs_before: Vec<ChunkId> = edits.iter().map(|id| tier.chunk_locations().unwrap()[id].0).collect();
    // Only the last epoch kept: its table and the chain under its edit live.
    let last_only = RetentionPolicy { rules: vec![KeepRule { within: std::time::Duration::ZERO, every: std::time::Duration::ZERO }] };
    let run = apply_retention(&store, Some(&tier), &last_only).unwrap();
    assert!(run.s3.packs_repacked > 0 && run.s3.chunks_moved > 0, "{run:?}");
    let packs_after: Vec<ChunkId> = edits.iter().map(|id| tier.chunk_locations().unwrap()[id].0).collect();
    assert!(packs_before.iter().zip(&packs_after).all(|(a, b)| a != b), "the deltas were repacked");
    assert_eq!(edits.iter().map(|id| s3_codec(&tier, id)).collect::<Vec<_>>(), [3, 3, 3], "and are deltas still");
    assert_no_pack_mostly_dead(&tier, &store);
    assert_s3_matches_local(&tier, &store, g);
}
