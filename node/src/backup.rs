//! The backup at run time: a store, a QUIC endpoint and the replica that
//! commits what arrives, on a thread with its own runtime.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use remus_store::s3::{S3Config, Uploader};
use remus_store::{RetentionPolicy, Store, StoreOptions};
use remus_wan::driver::{endpoint, run_backup_revoking, BackupLinkConfig, Endpoint};
use remus_wan::tls::TlsDir;

use crate::error::NodeError;
use crate::events::BackupEvent;
use crate::failover::FailoverAction;
use crate::replica::StoreReplica;

/// Everything a backup needs.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// Store directory.
    pub store: PathBuf,
    /// TLS material.
    pub tls: TlsDir,
    /// Heartbeat timing.
    pub link: BackupLinkConfig,
    /// What to do when a primary goes silent.
    pub failover: FailoverAction,
    /// Upload committed epochs to this S3 tier in the background.
    pub s3: Option<S3Config>,
    /// Thin and collect by this policy, this often.
    pub retention: Option<(RetentionPolicy, std::time::Duration)>,
    /// The witness whose lease a failover must win (none: fail over on
    /// silence alone).
    pub witness: Option<crate::WitnessOptions>,
    /// Where every event is also delivered.
    pub hooks: crate::HookConfig,
    /// What each guest may use of this backup.
    pub quota: crate::GuestQuota,
}

/// A running backup.
pub struct Backup {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its store.
    pub store: Arc<Store>,
    /// Its replica (for statistics).
    pub replica: Arc<StoreReplica>,
    /// Its history worker (S3 upload, retention), when configured.
    pub uploader: Option<Uploader>,
    /// What it reports as it runs (failovers above all).
    pub events: crossbeam_channel::Receiver<BackupEvent>,
    endpoint: Endpoint,
    thread: Option<JoinHandle<()>>,
}

impl Backup {
    /// Opens the store and starts listening.
    ///
    /// # Errors
    /// When the store cannot be opened, the TLS material is unusable or
    /// the address cannot be bound.
    pub fn start(opts: BackupOptions) -> Result<Self, NodeError> {
        let store = Arc::new(
            Store::open(&opts.store, StoreOptions::default()).map_err(|cause| NodeError::Store { path: opts.store.clone(), cause })?,
        );
        let uploader = if opts.s3.is_some() || opts.retention.is_some() {
            Some(Uploader::start_with(Arc::clone(&store), opts.s3.clone(), opts.retention.clone()).map_err(NodeError::Uploader)?)
        } else {
            None
        };
        let server = opts.tls.backup_server()?;
        let (events_tx, events) = crossbeam_channel::unbounded();
        // Every event goes to the hooks too, on its way out.
        let (inner_tx, inner) = crossbeam_channel::unbounded::<BackupEvent>();
        let hooks = crate::hooks::Hooks::start(opts.hooks.clone());
        std::thread::Builder::new()
            .name("remus-events".into())
            .spawn(move || {
                for ev in inner {
                    hooks.notify(ev.to_json());
                    let _ = events_tx.send(ev);
                }
            })
            .map_err(NodeError::io("spawning the events thread"))?;
        let replica = StoreReplica::new(Arc::clone(&store), opts.failover.clone(), opts.witness.clone(), opts.quota, inner_tx);
        let r2 = Arc::clone(&replica);
        let (tx, rx) = std::sync::mpsc::channel();
        let link = opts.link;
        let listen = opts.listen;
        let tls = opts.tls.clone();
        let thread = std::thread::Builder::new()
            .name("remus-backup".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(NodeError::io("starting the backup's runtime")(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let ep = match endpoint(listen, Some(server)) {
                        Ok(ep) => ep,
                        Err(e) => {
                            let _ = tx.send(Err(NodeError::Listen { addr: listen, cause: e }));
                            return;
                        }
                    };
                    let _ = tx.send(Ok(ep.clone()));
                    run_backup_revoking(ep, r2, link, tls).await;
                });
            })
            .map_err(NodeError::io("spawning the backup thread"))?;
        let endpoint = rx.recv().map_err(|_| NodeError::Panicked("backup"))??;
        let addr = endpoint.local_addr().map_err(NodeError::io("reading the bound address"))?;
        Ok(Self { addr, store, replica, uploader, events, endpoint, thread: Some(thread) })
    }

    /// Stops accepting, waits for the backup thread, and flushes the
    /// store's memtables so the next open need not replay the WAL.
    pub fn stop(mut self) {
        self.replica.shutdown();
        self.endpoint.close(0u32.into(), b"backup stopping");
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(u) = self.uploader.take() {
            u.stop();
        }
        if let Err(e) = self.store.flush() {
            tracing::warn!(error = %e, "flushing the store on stop failed; the next open replays the WAL");
        }
    }
}
