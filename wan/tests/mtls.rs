//! Mutual TLS over real QUIC on loopback: a primary with a certificate
//! from the deployment's CA is welcomed; one without a certificate, or
//! with one from another CA, is refused before it can say Hello; a
//! certificate issued for one guest speaks for that guest alone, and an
//! expired or revoked one is refused.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use remus_types::{ChunkId, EpochId, GuestId};
use remus_wan::driver::{endpoint, run_backup, run_backup_revoking, BackupLinkConfig, Replica};
use remus_wan::tls::{client_config, issue_guest, keygen, revoke_guest, revoke_serial, serial_of, server_config, TlsDir, SERVER_NAME};
use remus_wan::{CommitError, FrameReader, Message, ReceivedEpoch};

/// Counts Hellos; commits nothing (the store is tested elsewhere).
#[derive(Default)]
struct CountingReplica {
    welcomed: AtomicU64,
}

impl Replica for CountingReplica {
    fn hand_over(&self, _: GuestId, _: EpochId) -> Result<(), String> {
        Err("not here".into())
    }

    fn welcome(&self, _: GuestId, _: u64, _: u64, _: u64, _: Option<(EpochId, ChunkId)>) -> Result<(EpochId, ChunkId), String> {
        self.welcomed.fetch_add(1, Ordering::SeqCst);
        Ok((EpochId(0), ChunkId::default()))
    }
    fn commit(&self, _: Vec<ReceivedEpoch>) -> Result<ChunkId, CommitError> {
        Err(CommitError::Rejected("not in this test"))
    }
    fn primary_lost(&self, _: GuestId, _: EpochId, _: &remus_wan::Silence) {}
    fn disconnected(&self, _: GuestId) {}
}

/// A new CA with keygen's certificates, in a directory of its own.
fn new_ca() -> (tempfile::TempDir, TlsDir) {
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path()).unwrap();
    let tls = TlsDir(dir.path().to_path_buf());
    (dir, tls)
}

/// Connects with `client`, sends Hello for guest 1, and returns the first
/// message the backup answers, or the error that ended the attempt.
async fn hello(client: quinn::ClientConfig, addr: std::net::SocketAddr) -> Result<Message, String> {
    hello_as(client, addr, GuestId(1)).await
}

/// A fresh primary run's Hello for `guest` (instance 7, 16 pages).
fn hello_frame(guest: GuestId) -> Vec<u8> {
    Message::Hello { guest, instance: 7, page_count: 16, generation: 0, continues: (EpochId(0), ChunkId::default()), wants_holds: false }
        .to_bytes()
}

/// As [`hello`], for `guest`.
async fn hello_as(client: quinn::ClientConfig, addr: std::net::SocketAddr, guest: GuestId) -> Result<Message, String> {
    let ep = endpoint("127.0.0.1:0".parse().unwrap(), None).map_err(|e| e.to_string())?;
    let conn = ep.connect_with(client, addr, SERVER_NAME).map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(&hello_frame(guest)).await.map_err(|e| e.to_string())?;
    let mut rd = FrameReader::default();
    let mut buf = vec![0u8; 4096];
    loop {
        if let Some(m) = rd.next_message().map_err(|e| e.to_string())? {
            return Ok(m);
        }
        match recv.read(&mut buf).await.map_err(|e| e.to_string())? {
            Some(n) => rd.push(&buf[..n]),
            None => return Err("stream closed".into()),
        }
    }
}

#[tokio::test]
async fn only_primaries_with_a_certificate_from_our_ca_are_admitted() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    keygen(ours.path()).unwrap();
    keygen(theirs.path()).unwrap();
    let ours = TlsDir(ours.path().to_path_buf());
    let theirs = TlsDir(theirs.path().to_path_buf());

    let replica = Arc::new(CountingReplica::default());
    let server = server_config(ours.identity("backup").unwrap(), ours.roots().unwrap(), Vec::new()).unwrap();
    let ep = endpoint("127.0.0.1:0".parse().unwrap(), Some(server)).unwrap();
    let addr = ep.local_addr().unwrap();
    tokio::spawn(run_backup(ep.clone(), Arc::clone(&replica), BackupLinkConfig::default()));
    let limit = Duration::from_secs(10);

    // No client certificate at all.
    let anon = client_config(None, ours.roots().unwrap(), Vec::new()).unwrap();
    let r = tokio::time::timeout(limit, hello(anon, addr)).await.expect("attempt ends by itself");
    assert!(r.is_err(), "a client without a certificate got {r:?}");

    // A certificate from another CA.
    let foreign = client_config(Some(theirs.identity("primary").unwrap()), ours.roots().unwrap(), Vec::new()).unwrap();
    let r = tokio::time::timeout(limit, hello(foreign, addr)).await.expect("attempt ends by itself");
    assert!(r.is_err(), "a client with a foreign certificate got {r:?}");
    assert_eq!(replica.welcomed.load(Ordering::SeqCst), 0, "refused clients never reach the replica");

    // Control: our own primary certificate is welcomed.
    let good = client_config(Some(ours.identity("primary").unwrap()), ours.roots().unwrap(), Vec::new()).unwrap();
    let r = tokio::time::timeout(limit, hello(good, addr)).await.expect("attempt ends by itself");
    assert!(matches!(r, Ok(Message::Welcome { guest: GuestId(1), committed: EpochId(0), .. })), "{r:?}");
    assert_eq!(replica.welcomed.load(Ordering::SeqCst), 1);

    // A primary that does not trust the backup's CA refuses the backup.
    let wrong_roots = client_config(Some(ours.identity("primary").unwrap()), theirs.roots().unwrap(), Vec::new()).unwrap();
    let r = tokio::time::timeout(limit, hello(wrong_roots, addr)).await.expect("attempt ends by itself");
    assert!(r.is_err());
    ep.close(0u32.into(), b"done");
}

#[tokio::test]
async fn a_guest_certificate_speaks_for_its_guest_alone_and_expired_or_revoked_ones_are_refused() {
    let (ca, tls) = new_ca();
    // Each primary's directory holds its own certificate and the CA's.
    let primary = |guest: u64, days: u32| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(tls.ca(), dir.path().join("ca.pem")).unwrap();
        issue_guest(ca.path(), GuestId(guest), days, dir.path()).unwrap();
        let own = TlsDir(dir.path().to_path_buf());
        assert!(!own.pair("primary").0.exists() && !dir.path().join("ca.key").exists(), "only its own key and the CA certificate");
        client_config(Some(own.primary_identity(GuestId(guest)).unwrap()), own.roots().unwrap(), Vec::new()).unwrap()
    };
    let (g7, g8, expired) = (primary(7, 30), primary(8, 30), primary(9, 0));
    let limit = Duration::from_secs(10);
    let start = |crls, shared| {
        let replica = Arc::new(CountingReplica::default());
        let server = server_config(tls.identity("backup").unwrap(), tls.roots().unwrap(), crls).unwrap();
        let ep = endpoint("127.0.0.1:0".parse().unwrap(), Some(server)).unwrap();
        let cfg = BackupLinkConfig { shared_primary_cert: shared, ..BackupLinkConfig::default() };
        tokio::spawn(run_backup(ep.clone(), Arc::clone(&replica), cfg));
        (ep, replica)
    };

    let (ep, replica) = start(Vec::new(), false);
    let addr = ep.local_addr().unwrap();
    let r = tokio::time::timeout(limit, hello_as(g7.clone(), addr, GuestId(7))).await.unwrap();
    assert!(matches!(r, Ok(Message::Welcome { guest: GuestId(7), .. })), "{r:?}");
    let r = tokio::time::timeout(limit, hello_as(g7.clone(), addr, GuestId(8))).await.unwrap();
    assert!(matches!(&r, Ok(Message::Error(why)) if why.contains("not issued for guest-8")), "{r:?}");
    let r = tokio::time::timeout(limit, hello_as(g8.clone(), addr, GuestId(8))).await.unwrap();
    assert!(matches!(r, Ok(Message::Welcome { guest: GuestId(8), .. })), "{r:?}");
    // The shared certificate, where it may not speak for guests.
    let shared = client_config(Some(tls.identity("primary").unwrap()), tls.roots().unwrap(), Vec::new()).unwrap();
    let r = tokio::time::timeout(limit, hello(shared.clone(), addr)).await.unwrap();
    assert!(matches!(&r, Ok(Message::Error(why)) if why.contains("shared primary certificate")), "{r:?}");
    // Expired: refused in the handshake.
    let r = tokio::time::timeout(limit, hello_as(expired, addr, GuestId(9))).await.unwrap();
    assert!(r.is_err(), "an expired certificate got {r:?}");
    assert_eq!(replica.welcomed.load(Ordering::SeqCst), 2, "only the two rightful Hellos reach the replica");
    ep.close(0u32.into(), b"done");

    // Guest 7 revoked: a backup loading the list refuses it, guest 8 still speaks.
    assert_eq!(revoke_guest(ca.path(), GuestId(7)).unwrap().len(), 1);
    assert!(revoke_guest(ca.path(), GuestId(7)).unwrap().is_empty(), "revoking twice adds nothing");
    assert!(revoke_guest(ca.path(), GuestId(99)).is_err(), "nothing was issued for guest 99");
    let (ep, replica) = start(tls.crls().unwrap(), true);
    let addr = ep.local_addr().unwrap();
    let r = tokio::time::timeout(limit, hello_as(g7, addr, GuestId(7))).await.unwrap();
    assert!(r.is_err(), "a revoked certificate got {r:?}");
    let r = tokio::time::timeout(limit, hello_as(g8, addr, GuestId(8))).await.unwrap();
    assert!(matches!(r, Ok(Message::Welcome { guest: GuestId(8), .. })), "{r:?}");
    let r = tokio::time::timeout(limit, hello(shared, addr)).await.unwrap();
    assert!(matches!(r, Ok(Message::Welcome { guest: GuestId(1), .. })), "the shared certificate where allowed: {r:?}");
    assert_eq!(replica.welcomed.load(Ordering::SeqCst), 2);
    ep.close(0u32.into(), b"done");
}

/// Connects with `client` as `guest` and stays connected once welcomed.
async fn connected_as(client: quinn::ClientConfig, addr: std::net::SocketAddr, guest: GuestId) -> (quinn::Endpoint, quinn::Connection) {
    let ep = endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let conn = ep.connect_with(client, addr, SERVER_NAME).unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&hello_frame(guest)).await.unwrap();
    let mut rd = FrameReader::default();
    let mut buf = vec![0u8; 4096];
    loop {
        if let Some(m) = rd.next_message().unwrap() {
            assert!(matches!(m, Message::Welcome { .. }), "{m:?}");
            // Kept open: the stream halves live as long as the connection.
            std::mem::forget((send, recv));
            return (ep, conn);
        }
        let n = recv.read(&mut buf).await.unwrap().expect("the backup answers");
        rd.push(&buf[..n]);
    }
}

#[tokio::test]
async fn a_primary_connected_with_a_certificate_revoked_since_is_disconnected_and_others_stay() {
    let (ca, tls) = new_ca();
    let client = |guest: u64| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(tls.ca(), dir.path().join("ca.pem")).unwrap();
        issue_guest(ca.path(), GuestId(guest), 30, dir.path()).unwrap();
        let own = TlsDir(dir.path().to_path_buf());
        client_config(Some(own.primary_identity(GuestId(guest)).unwrap()), own.roots().unwrap(), Vec::new()).unwrap()
    };
    let (c7, c8) = (client(7), client(8));
    let replica = Arc::new(CountingReplica::default());
    let ep = endpoint("127.0.0.1:0".parse().unwrap(), Some(tls.backup_server().unwrap())).unwrap();
    let addr = ep.local_addr().unwrap();
    // Primaries that send no heartbeat here are not declared lost.
    let cfg =
        BackupLinkConfig { primary_timeout: Duration::from_secs(120), primary_timeout_max: Duration::from_secs(120), ..Default::default() };
    tokio::spawn(run_backup_revoking(ep.clone(), Arc::clone(&replica), cfg, tls.clone()));
    let (_e7, conn7) = connected_as(c7.clone(), addr, GuestId(7)).await;
    let (_e8, conn8) = connected_as(c8, addr, GuestId(8)).await;

    // The list changes while both are connected: guest 7's connection is
    // closed saying why, within a few polls; guest 8's stays.
    revoke_guest(ca.path(), GuestId(7)).unwrap();
    let closed = tokio::time::timeout(remus_wan::driver::REVOCATION_POLL * 10, conn7.closed()).await.expect("guest 7 is disconnected");
    let quinn::ConnectionError::ApplicationClosed(c) = &closed else { panic!("{closed:?}") };
    let why = String::from_utf8_lossy(&c.reason);
    assert!(why.contains("no longer valid") && why.contains("Revoked"), "{why}");
    assert!(conn8.close_reason().is_none(), "guest 8 stays connected: {:?}", conn8.close_reason());
    // And its next handshake is refused.
    let r = tokio::time::timeout(Duration::from_secs(10), hello_as(c7, addr, GuestId(7))).await.unwrap();
    assert!(r.is_err(), "a revoked certificate got {r:?}");
    assert_eq!(replica.welcomed.load(Ordering::SeqCst), 2);
    ep.close(0u32.into(), b"done");
}

#[tokio::test]
async fn a_primary_holding_the_revocation_list_refuses_a_revoked_backup() {
    let (ca, tls) = new_ca();
    let replica = Arc::new(CountingReplica::default());
    let ep = endpoint("127.0.0.1:0".parse().unwrap(), Some(tls.backup_server().unwrap())).unwrap();
    let addr = ep.local_addr().unwrap();
    tokio::spawn(run_backup(ep.clone(), Arc::clone(&replica), BackupLinkConfig::default()));
    let limit = Duration::from_secs(10);
    let primary = |crls| client_config(Some(tls.identity("primary").unwrap()), tls.roots().unwrap(), crls).unwrap();

    let serial = serial_of(&tls.pair("backup").0).unwrap();
    assert!(revoke_serial(ca.path(), "not hex").is_err());
    assert_eq!(revoke_serial(ca.path(), &serial).unwrap(), std::slice::from_ref(&serial));
    // The list names the backup's serial: a primary holding it refuses
    // that backup in the handshake; one without it still connects.
    let r = tokio::time::timeout(limit, hello(primary(tls.crls().unwrap()), addr)).await.unwrap();
    assert!(matches!(&r, Err(e) if e.contains("Revoked")), "{r:?}");
    let r = tokio::time::timeout(limit, hello(primary(Vec::new()), addr)).await.unwrap();
    assert!(matches!(r, Ok(Message::Welcome { .. })), "{r:?}");
    // A guest's serial, as issued and as read back from its certificate.
    let issued = issue_guest(ca.path(), GuestId(3), 30, ca.path()).unwrap();
    assert_eq!(serial_of(&tls.pair("guest-3").0).unwrap(), issued.serial);
    ep.close(0u32.into(), b"done");
}

/// A primary reads its TLS files again before each connection attempt: a
/// revocation list naming its backup, written while it was connected, is
/// honoured at its next connection: it refuses that backup and stops.
#[tokio::test]
async fn a_running_primary_honours_a_revocation_list_written_since_it_started() {
    use remus_wan::driver::{run_primary, LinkTuning, PrimaryLinkConfig};
    let (ca, tls) = new_ca();
    let replica = Arc::new(CountingReplica::default());
    let ep = endpoint("127.0.0.1:0".parse().unwrap(), Some(tls.backup_server().unwrap())).unwrap();
    let addr = ep.local_addr().unwrap();
    let backup = tokio::spawn(run_backup(ep.clone(), Arc::clone(&replica), BackupLinkConfig::default()));
    let cfg = PrimaryLinkConfig {
        backup: addr,
        client: {
            let tls = tls.clone();
            Arc::new(move || client_config(Some(tls.identity("primary")?), tls.roots()?, tls.crls()?))
        },
        sender: remus_wan::SenderConfig::default(),
        tuning: LinkTuning::default(),
        guest: GuestId(1),
        instance: 7,
        generation: 0,
        page_count: 16,
        continues: None,
        start_after: None,
        page_pool: None,
        shared_frames: None,
        handover: Arc::default(),
    };
    let (_checkpoints, rx) = tokio::sync::mpsc::channel(1);
    let (etx, _erx) = tokio::sync::mpsc::unbounded_channel();
    let link = tokio::spawn(run_primary(cfg, rx, etx));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while replica.welcomed.load(Ordering::SeqCst) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the primary never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Connected. The backup's certificate is revoked, the backup goes
    // away and comes back on the same address.
    revoke_serial(ca.path(), &serial_of(&tls.pair("backup").0).unwrap()).unwrap();
    ep.close(0u32.into(), b"restarting");
    ep.wait_idle().await;
    backup.abort();
    drop(ep);
    let ep = loop {
        match endpoint(addr, Some(tls.backup_server().unwrap())) {
            Ok(ep) => break ep,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "rebinding {addr}: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    tokio::spawn(run_backup(ep.clone(), Arc::clone(&replica), BackupLinkConfig::default()));
    let ended = tokio::time::timeout(Duration::from_secs(30), link).await.expect("the primary stops").unwrap();
    let err = ended.expect_err("a revoked backup is refused").to_string();
    assert!(err.contains("certificate") && err.contains("Revoked"), "{err}");
    assert_eq!(replica.welcomed.load(Ordering::SeqCst), 1, "it never said Hello to the revoked backup");
    ep.close(0u32.into(), b"done");
}

#[test]
fn unreadable_tls_material_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let tls = TlsDir(dir.path().to_path_buf());
    let err = tls.identity("primary").err().expect("missing files are an error").to_string();
    assert!(err.contains("primary.pem"), "{err}");
    std::fs::write(dir.path().join("ca.pem"), "not a certificate").unwrap();
    let err = tls.roots().expect_err("garbage is an error").to_string();
    assert!(err.contains("ca.pem"), "{err}");
}

/// A garbage epoch stream from an authenticated primary: the backup closes
/// the connection naming the fault, and commits nothing.
#[tokio::test]
async fn a_corrupt_epoch_stream_closes_the_connection_with_the_reason() {
    let (_dir, tls) = new_ca();
    let replica = Arc::new(CountingReplica::default());
    let server = server_config(tls.identity("backup").unwrap(), tls.roots().unwrap(), Vec::new()).unwrap();
    let ep = endpoint("127.0.0.1:0".parse().unwrap(), Some(server)).unwrap();
    let addr = ep.local_addr().unwrap();
    tokio::spawn(run_backup(ep.clone(), Arc::clone(&replica), BackupLinkConfig::default()));

    let client = client_config(Some(tls.identity("primary").unwrap()), tls.roots().unwrap(), Vec::new()).unwrap();
    let cep = endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let conn = cep.connect_with(client, addr, SERVER_NAME).unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&hello_frame(GuestId(1))).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = recv.read(&mut buf).await.unwrap().unwrap();
    assert!(matches!(Message::decode(&buf[..n]), Ok(Some((Message::Welcome { .. }, _)))));

    // A frame with a flipped payload byte.
    let mut bad = Message::Heartbeat { epoch: EpochId(1) }.to_bytes();
    bad[20] ^= 0xff;
    let mut s = conn.open_uni().await.unwrap();
    s.write_all(&bad).await.unwrap();
    s.finish().unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await.expect("backup closes the connection");
    let text = reason.to_string();
    assert!(text.contains("checksum"), "close reason: {text}");
    ep.close(0u32.into(), b"done");
}
