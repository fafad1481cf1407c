//! The backup's memory budget over real QUIC on loopback: a primary sends
//! epochs much faster than a slow store commits them. The backup holds no
//! more than its budget for epochs it has not committed (the primary is
//! held back by flow control instead), and every epoch still commits,
//! once and in order: the epoch the next commit waits for is never held
//! back behind later ones.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::{RngCore, SeedableRng};
use remus_types::{Checkpoint, ChunkId, EpochId, GuestId, Pfn, PAGE_SIZE};
use remus_wan::budget::Budget;
use remus_wan::driver::{endpoint, run_primary, serve_backup, BackupLinkConfig, LinkEvent, LinkTuning, PrimaryLinkConfig, Replica};
use remus_wan::tls::{client_config, keygen, server_config, TlsDir};
use remus_wan::{CommitError, ReceivedEpoch, SenderConfig};

const PAGES: u64 = 1024;
const EPOCHS: u64 = 40;
/// Pages each epoch writes: 128 incompressible pages, half a MiB.
const DIRTY: u64 = 128;

/// Commits slowly and records what it committed.
#[derive(Default)]
struct SlowReplica {
    committed: Mutex<Vec<EpochId>>,
}

impl Replica for SlowReplica {
    fn hand_over(&self, _: GuestId, _: EpochId) -> Result<(), String> {
        Err("not here".into())
    }

    fn welcome(&self, _: GuestId, _: u64, _: u64, _: u64, _: Option<(EpochId, ChunkId)>) -> Result<(EpochId, ChunkId), String> {
        Ok((EpochId(0), ChunkId::default()))
    }

    fn commit(&self, group: Vec<ReceivedEpoch>) -> Result<ChunkId, CommitError> {
        std::thread::sleep(Duration::from_millis(40));
        self.committed.lock().extend(group.iter().map(|e| e.header.epoch));
        Ok(ChunkId::default())
    }

    fn primary_lost(&self, _: GuestId, _: EpochId, _: &remus_wan::Silence) {}
    fn disconnected(&self, _: GuestId) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_store_holds_the_primary_back_within_the_budget_and_every_epoch_commits_in_order() {
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path()).unwrap();
    let tls = TlsDir(dir.path().to_path_buf());
    let replica = Arc::new(SlowReplica::default());
    let server = server_config(tls.identity("backup").unwrap(), tls.roots().unwrap(), Vec::new()).unwrap();
    let ep = endpoint("127.0.0.1:0".parse().unwrap(), Some(server)).unwrap();
    let addr = ep.local_addr().unwrap();
    // Room for about four epochs per connection.
    let per_connection = 2 << 20;
    let budget = Arc::new(Budget::new(per_connection, 4 << 20));
    tokio::spawn(serve_backup(ep.clone(), Arc::clone(&replica), BackupLinkConfig::default(), Arc::clone(&budget)));

    let cfg = PrimaryLinkConfig {
        backup: addr,
        client: {
            let tls = tls.clone();
            Arc::new(move || client_config(Some(tls.identity("primary")?), tls.roots()?, Vec::new()))
        },
        sender: SenderConfig::default(),
        tuning: LinkTuning::default(),
        guest: GuestId(1),
        instance: 7,
        generation: 0,
        page_count: PAGES,
        continues: None,
        start_after: None,
        page_pool: None,
        shared_frames: None,
        handover: Arc::default(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(EPOCHS as usize);
    let (etx, mut erx) = tokio::sync::mpsc::unbounded_channel();
    let link = tokio::spawn(run_primary(cfg, rx, etx));
    let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
    for e in 1..=EPOCHS {
        let mut pages = vec![0u8; (DIRTY as usize) * PAGE_SIZE];
        rng.fill_bytes(&mut pages);
        let pfns =
            (0..DIRTY).map(|i| Pfn((e * 7 + i * 5) % PAGES)).collect::<std::collections::BTreeSet<_>>().into_iter().collect::<Vec<_>>();
        pages.truncate(pfns.len() * PAGE_SIZE);
        tx.send(Checkpoint { guest: GuestId(1), epoch: EpochId(e), page_count: PAGES, pfns, pages, ..Checkpoint::default() })
            .await
            .unwrap();
    }
    drop(tx);
    let done = tokio::time::timeout(Duration::from_secs(120), link).await.expect("the link ends by itself").unwrap();
    done.expect("every epoch acknowledged");
    let mut acked = 0;
    while let Ok(ev) = erx.try_recv() {
        if let LinkEvent::Acked { epoch, .. } = ev {
            acked = acked.max(epoch.0);
        }
    }
    assert_eq!(acked, EPOCHS);
    assert_eq!(*replica.committed.lock(), (1..=EPOCHS).map(EpochId).collect::<Vec<_>>(), "each once, in order");
    // Readers were held back (the budget was used) and never past it.
    let peak = budget.peak_bytes();
    assert!(peak > per_connection / 2, "the budget was used: peak {peak}");
    assert!(peak <= per_connection, "peak {peak} exceeds the {per_connection} budget of the connection");
}
