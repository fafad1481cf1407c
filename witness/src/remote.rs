//! A witness of remus's own, for sites without S3: `remus witness` keeps
//! each guest's lease in a file of its own and changes it only by
//! compare-and-swap ([`WitnessServer`]), over QUIC with the deployment's
//! mutual TLS; [`RemoteLeases`] is the [`LeaseStore`] that reaches it.
//!
//! One request per bidirectional stream, each side's message JSON ending
//! with its half of the stream (at most [`MAX_MESSAGE`] bytes). A swap is
//! durable before it is answered: the new lease goes to a temporary file,
//! synced, renamed over the old one, and the directory synced. Versions
//! (the tags) only grow, across restarts too (each file records its own).
//!
//! Who may change a lease: a certificate issued for that guest alone
//! (`remus cert issue`), the shared primary certificate, or a backup's
//! (named `remus-backup`; `keygen` issues it for client use too); any
//! other certificate of the CA is refused for that guest.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use remus_types::GuestId;
use remus_wan::tls::{Identity, Speaks, TlsDir};

use crate::lease::{Lease, LeaseStore, Tagged, WitnessError};

/// The most bytes one request or answer may take.
pub const MAX_MESSAGE: usize = 64 << 10;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum Request {
    Read { guest: GuestId },
    Create { lease: Lease },
    Replace { lease: Lease, expected: String },
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum Answer {
    Lease { lease: Lease, tag: String },
    None,
    Lost,
    Refused(String),
}

/// A lease file: the lease and its version.
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    version: u64,
    lease: Lease,
}

/// The leases a witness keeps, in a directory.
pub struct WitnessDir {
    dir: PathBuf,
    leases: Mutex<HashMap<GuestId, Stored>>,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> WitnessError {
    WitnessError::Store(format!("{what} {}: {e}", path.display()))
}

impl WitnessDir {
    /// Opens (creating) `dir` and reads every lease in it.
    ///
    /// # Errors
    /// [`WitnessError::Store`] for a directory or file that cannot be
    /// read; [`WitnessError::Corrupt`] naming a damaged lease file.
    pub fn open(dir: &Path) -> Result<Self, WitnessError> {
        std::fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
        let mut leases = HashMap::new();
        for entry in std::fs::read_dir(dir).map_err(|e| io("reading", dir, e))? {
            let path = entry.map_err(|e| io("reading", dir, e))?.path();
            if path.extension().is_none_or(|x| x != "lease") {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(|e| io("reading", &path, e))?;
            let s: Stored = serde_json::from_slice(&bytes).map_err(|e| WitnessError::Corrupt(format!("{}: {e}", path.display())))?;
            Lease::from_bytes(&s.lease.to_bytes())?;
            if path != Self::path_in(dir, s.lease.guest) {
                return Err(WitnessError::Corrupt(format!("{} holds the lease of {}", path.display(), s.lease.guest)));
            }
            leases.insert(s.lease.guest, s);
        }
        Ok(Self { dir: dir.to_path_buf(), leases: Mutex::new(leases) })
    }

    fn path_in(dir: &Path, guest: GuestId) -> PathBuf {
        dir.join(format!("guest-{}.lease", guest.0))
    }

    /// Writes `s` durably: a synced temporary file renamed over the old.
    fn write(&self, s: &Stored) -> Result<(), WitnessError> {
        use std::io::Write;
        let path = Self::path_in(&self.dir, s.lease.guest);
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("writing", &tmp, e))?;
        f.write_all(&serde_json::to_vec_pretty(s).expect("a lease serialises")).map_err(|e| io("writing", &tmp, e))?;
        f.sync_all().map_err(|e| io("syncing", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io("renaming", &tmp, e))?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| io("syncing", &self.dir, e))
    }

    fn tagged(s: &Stored) -> Tagged {
        Tagged { lease: s.lease.clone(), tag: s.version.to_string() }
    }

    /// Swaps in `lease` when the guest's lease is still `expected`
    /// (`None`: there is none); durable before it returns.
    fn swap(&self, lease: &Lease, expected: Option<&str>) -> Result<Tagged, WitnessError> {
        let mut leases = self.leases.lock();
        let current = leases.get(&lease.guest);
        let version = match (current, expected) {
            (None, None) => 1,
            (Some(cur), Some(tag)) if cur.version.to_string() == tag => cur.version + 1,
            _ => return Err(WitnessError::Lost(lease.guest)),
        };
        let s = Stored { version, lease: lease.clone() };
        self.write(&s)?;
        let t = Self::tagged(&s);
        leases.insert(lease.guest, s);
        Ok(t)
    }
}

impl LeaseStore for WitnessDir {
    fn read(&self, guest: GuestId) -> Result<Option<Tagged>, WitnessError> {
        Ok(self.leases.lock().get(&guest).map(Self::tagged))
    }

    fn create(&self, lease: &Lease) -> Result<Tagged, WitnessError> {
        self.swap(lease, None)
    }

    fn replace(&self, lease: &Lease, expected: &str) -> Result<Tagged, WitnessError> {
        self.swap(lease, Some(expected))
    }
}

/// Whether the client certificate `leaf` may change `guest`'s lease.
fn may_change(leaf: Option<&rustls::pki_types::CertificateDer<'_>>, guest: GuestId) -> bool {
    let Some(leaf) = leaf else { return false };
    matches!(remus_wan::tls::speaks_for(leaf, guest), Speaks::Guest | Speaks::Shared) || remus_wan::tls::is_backup(leaf)
}

/// Answers one request of a client presenting `leaf`.
fn answer(dir: &WitnessDir, leaf: Option<&rustls::pki_types::CertificateDer<'_>>, req: Request) -> Answer {
    let guest = match &req {
        Request::Read { guest } => *guest,
        Request::Create { lease } | Request::Replace { lease, .. } => lease.guest,
    };
    if !may_change(leaf, guest) {
        return Answer::Refused(format!("this client certificate may not read or change the lease of {guest}"));
    }
    let found = |t: Tagged| Answer::Lease { lease: t.lease, tag: t.tag };
    let r = match req {
        Request::Read { guest } => dir.read(guest).map(|t| t.map_or(Answer::None, found)),
        Request::Create { lease } => dir.create(&lease).map(found),
        Request::Replace { lease, expected } => dir.replace(&lease, &expected).map(found),
    };
    match r {
        Ok(a) => a,
        Err(WitnessError::Lost(_)) => Answer::Lost,
        Err(e) => Answer::Refused(e.to_string()),
    }
}

/// A running witness: serves `dir` on a QUIC endpoint until dropped.
pub struct WitnessServer {
    /// The address it listens on.
    pub addr: SocketAddr,
    endpoint: quinn::Endpoint,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WitnessServer {
    /// Serves the leases in `dir` on `listen`, presenting the backup
    /// identity of `tls` and admitting clients with a certificate from
    /// its CA (not revoked by its list).
    ///
    /// # Errors
    /// [`WitnessError::Store`] for unusable TLS material, an address that
    /// cannot be bound, or a lease directory that cannot be read.
    pub fn start(listen: SocketAddr, dir: &Path, tls: &TlsDir) -> Result<Self, WitnessError> {
        let dir = Arc::new(WitnessDir::open(dir)?);
        let server = tls.backup_server().map_err(|e| WitnessError::Store(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| WitnessError::Store(format!("starting the witness runtime: {e}")))?;
        let endpoint = {
            let _guard = rt.enter();
            remus_wan::driver::endpoint(listen, Some(server)).map_err(|e| WitnessError::Store(format!("listening on {listen}: {e}")))?
        };
        let addr = endpoint.local_addr().map_err(|e| WitnessError::Store(e.to_string()))?;
        let ep = endpoint.clone();
        let thread = std::thread::Builder::new()
            .name("remus-witness".into())
            .spawn(move || rt.block_on(serve(ep, dir)))
            .map_err(|e| WitnessError::Store(format!("spawning the witness thread: {e}")))?;
        Ok(Self { addr, endpoint, thread: Some(thread) })
    }
}

impl Drop for WitnessServer {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"witness stopping");
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(ep: quinn::Endpoint, dir: Arc<WitnessDir>) {
    while let Some(incoming) = ep.accept().await {
        let dir = Arc::clone(&dir);
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "witness: refused connection");
                    return;
                }
            };
            let leaf = remus_wan::tls::peer_chain(&conn).into_iter().next();
            let peer = conn.remote_address();
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let (dir, leaf) = (Arc::clone(&dir), leaf.clone());
                tokio::spawn(async move {
                    let Ok(bytes) = recv.read_to_end(MAX_MESSAGE).await else { return };
                    let a = match serde_json::from_slice::<Request>(&bytes) {
                        Ok(req) => tokio::task::spawn_blocking(move || answer(&dir, leaf.as_ref(), req))
                            .await
                            .unwrap_or_else(|e| Answer::Refused(format!("witness: {e}"))),
                        Err(e) => Answer::Refused(format!("not a witness request: {e}")),
                    };
                    if let Answer::Refused(why) = &a {
                        tracing::warn!(%peer, %why, "witness: request refused");
                    }
                    let _ = send.write_all(&serde_json::to_vec(&a).expect("an answer serialises")).await;
                    let _ = send.finish();
                });
            }
        });
    }
}

/// The [`LeaseStore`] of a `remus witness` at an address: each call one
/// request on a connection kept open (and made again when it breaks).
pub struct RemoteLeases {
    rt: tokio::runtime::Runtime,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    addr: SocketAddr,
    timeout: Duration,
    conn: Mutex<Option<quinn::Connection>>,
}

impl RemoteLeases {
    /// A client of the witness at `addr`, presenting `id` and trusting
    /// the CA of `tls`; each request may take `timeout` at most.
    ///
    /// # Errors
    /// [`WitnessError::Store`] for unusable TLS material.
    pub fn new(addr: SocketAddr, tls: &TlsDir, id: Identity, timeout: Duration) -> Result<Self, WitnessError> {
        let store = |e: remus_wan::LinkError| WitnessError::Store(e.to_string());
        let client = remus_wan::tls::client_config(Some(id), tls.roots().map_err(store)?, tls.crls().map_err(store)?).map_err(store)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| WitnessError::Store(format!("starting the witness client's runtime: {e}")))?;
        let bind: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("an address");
        let endpoint = {
            let _guard = rt.enter();
            remus_wan::driver::endpoint(bind, None).map_err(store)?
        };
        Ok(Self { rt, endpoint, client, addr, timeout, conn: Mutex::new(None) })
    }

    fn ask(&self, req: &Request) -> Result<Answer, WitnessError> {
        let unreachable = |e: String| WitnessError::Unreachable(format!("witness {}: {e}", self.addr));
        let mut slot = self.conn.lock();
        let r = self.rt.block_on(async {
            tokio::time::timeout(self.timeout, async {
                let conn = match slot.as_ref().filter(|c| c.close_reason().is_none()) {
                    Some(c) => c.clone(),
                    None => {
                        let c = self
                            .endpoint
                            .connect_with(self.client.clone(), self.addr, remus_wan::tls::SERVER_NAME)
                            .map_err(|e| e.to_string())?
                            .await
                            .map_err(|e| e.to_string())?;
                        *slot = Some(c.clone());
                        c
                    }
                };
                let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                send.write_all(&serde_json::to_vec(req).expect("a request serialises")).await.map_err(|e| e.to_string())?;
                send.finish().map_err(|e| e.to_string())?;
                let bytes = recv.read_to_end(MAX_MESSAGE).await.map_err(|e| e.to_string())?;
                serde_json::from_slice::<Answer>(&bytes).map_err(|e| format!("not a witness answer: {e}"))
            })
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))?
        });
        if r.is_err() {
            *slot = None;
        }
        r.map_err(unreachable)
    }
}

fn tagged(a: Answer, guest: GuestId) -> Result<Option<Tagged>, WitnessError> {
    match a {
        Answer::Lease { lease, tag } if lease.guest == guest => Ok(Some(Tagged { lease, tag })),
        Answer::Lease { lease, .. } => Err(WitnessError::Corrupt(format!("asked for {guest}, got the lease of {}", lease.guest))),
        Answer::None => Ok(None),
        Answer::Lost => Err(WitnessError::Lost(guest)),
        Answer::Refused(why) => Err(WitnessError::Store(why)),
    }
}

impl LeaseStore for RemoteLeases {
    fn read(&self, guest: GuestId) -> Result<Option<Tagged>, WitnessError> {
        tagged(self.ask(&Request::Read { guest })?, guest)
    }

    fn create(&self, lease: &Lease) -> Result<Tagged, WitnessError> {
        let g = lease.guest;
        tagged(self.ask(&Request::Create { lease: lease.clone() })?, g)?.ok_or_else(|| WitnessError::Store("no lease in the answer".into()))
    }

    fn replace(&self, lease: &Lease, expected: &str) -> Result<Tagged, WitnessError> {
        let g = lease.guest;
        tagged(self.ask(&Request::Replace { lease: lease.clone(), expected: expected.to_string() })?, g)?
            .ok_or_else(|| WitnessError::Store("no lease in the answer".into()))
    }
}
