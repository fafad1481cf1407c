//! A `remus witness` of remus's own on loopback, over QUIC with the
//! deployment's mutual TLS: compare-and-swap semantics as on S3, one
//! winner of many racing takers, leases and their versions kept across a
//! restart, a guest's certificate confined to its own lease, and clear
//! errors for a witness that is away or a client it does not trust.

mod common;

use std::sync::Arc;
use std::time::Duration;

use remus_types::GuestId;
use remus_wan::tls::{issue_guest, keygen, TlsDir};
use remus_witness::{Lease, LeaseStore, RemoteLeases, WitnessError, WitnessServer};

const TIMEOUT: Duration = Duration::from_secs(10);

fn new_ca() -> (tempfile::TempDir, TlsDir) {
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path()).unwrap();
    let tls = TlsDir(dir.path().to_path_buf());
    (dir, tls)
}

fn as_backup(server: &WitnessServer, tls: &TlsDir) -> RemoteLeases {
    RemoteLeases::new(server.addr, tls, tls.identity("backup").unwrap(), TIMEOUT).unwrap()
}

#[test]
fn the_lease_changes_only_from_the_version_read_and_survives_a_restart() {
    let (_ca, tls) = new_ca();
    let state = tempfile::tempdir().unwrap();
    let server = WitnessServer::start("127.0.0.1:0".parse().unwrap(), state.path(), &tls).unwrap();
    let s = as_backup(&server, &tls);
    let g = GuestId(7);
    let (first, renewed) = common::swaps_only_from_the_version_read(&s, g);

    // Restarted on the same directory: the lease and its version are
    // there, the old versions still lose, the current one still wins.
    drop(server);
    let server = WitnessServer::start("127.0.0.1:0".parse().unwrap(), state.path(), &tls).unwrap();
    let s = as_backup(&server, &tls);
    assert_eq!(s.read(g).unwrap().unwrap(), renewed);
    assert!(matches!(s.replace(&Lease::new(g, 2, "site-b", 500, Some(40)), &first.tag), Err(WitnessError::Lost(_))));
    let taken = s.replace(&Lease::new(g, 2, "site-b", 500, Some(40)), &renewed.tag).unwrap();
    assert!(matches!(s.replace(&renewed.lease.renewed(), &renewed.tag), Err(WitnessError::Lost(_))), "the old owner's renewal fails");
    assert_eq!(s.read(g).unwrap().unwrap(), taken);
}

#[test]
fn of_racing_takers_exactly_one_wins() {
    let (_ca, tls) = new_ca();
    let state = tempfile::tempdir().unwrap();
    let server = WitnessServer::start("127.0.0.1:0".parse().unwrap(), state.path(), &tls).unwrap();
    // Each taker a client of its own, as on its own host.
    let takers: Vec<Arc<dyn LeaseStore>> = (0..6).map(|_| Arc::new(as_backup(&server, &tls)) as Arc<dyn LeaseStore>).collect();
    common::exactly_one_of_racing_takers_wins(&takers, 15);
}

#[test]
fn a_guests_certificate_reaches_its_own_lease_alone_and_strangers_and_absence_are_errors() {
    let (ca, tls) = new_ca();
    let state = tempfile::tempdir().unwrap();
    let server = WitnessServer::start("127.0.0.1:0".parse().unwrap(), state.path(), &tls).unwrap();
    issue_guest(ca.path(), GuestId(7), 30, ca.path()).unwrap();
    let g7 = RemoteLeases::new(server.addr, &tls, tls.primary_identity(GuestId(7)).unwrap(), TIMEOUT).unwrap();
    let mine = g7.create(&Lease::new(GuestId(7), 1, "site-a", 500, None)).unwrap();
    assert_eq!(g7.read(GuestId(7)).unwrap().unwrap(), mine);
    let err = g7.create(&Lease::new(GuestId(8), 1, "site-a", 500, None)).unwrap_err();
    assert!(matches!(&err, WitnessError::Store(m) if m.contains("may not read or change the lease of guest-8")), "{err}");
    assert!(g7.read(GuestId(8)).is_err(), "nor read it");
    // The shared primary certificate and a backup's may.
    let shared = RemoteLeases::new(server.addr, &tls, tls.identity("primary").unwrap(), TIMEOUT).unwrap();
    shared.create(&Lease::new(GuestId(8), 1, "site-a", 500, None)).unwrap();

    // A client of another CA is refused in the handshake.
    let (_other_ca, other) = new_ca();
    let stranger = RemoteLeases::new(server.addr, &tls, other.identity("primary").unwrap(), TIMEOUT).unwrap();
    assert!(matches!(stranger.read(GuestId(7)), Err(WitnessError::Unreachable(_))));
    // A witness that is away: an error within the request's time, not a hang.
    let addr = server.addr;
    drop(server);
    let away = RemoteLeases::new(addr, &tls, tls.identity("backup").unwrap(), Duration::from_millis(500)).unwrap();
    let err = away.read(GuestId(7)).unwrap_err();
    assert!(matches!(&err, WitnessError::Unreachable(m) if m.contains(&addr.to_string())), "{err}");
}
