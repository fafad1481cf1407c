//! The lease on a real S3 server (moto_server, started by
//! `scripts/test.sh`, which exports its URL as `REMUS_TEST_S3_ENDPOINT`):
//! compare-and-swap semantics, and that of many takers racing for the
//! same lease exactly one wins, every round.

use std::sync::{Arc, Barrier};

use remus_s3::{S3Client, S3Config};
use remus_types::GuestId;
use remus_witness::{Lease, LeaseStore, S3Leases, WitnessError};

fn leases(bucket: &str) -> S3Leases {
    let endpoint = std::env::var("REMUS_TEST_S3_ENDPOINT").unwrap_or_else(|_| {
        panic!("REMUS_TEST_S3_ENDPOINT is not set: run `bash scripts/test.sh`, which starts moto_server, or start one and export its URL")
    });
    let mut c = S3Config::new(&format!("{bucket}-{}", std::process::id()), "witness");
    c.endpoint = Some(endpoint);
    c.region = Some("us-east-1".into());
    c.access_key_id = Some("test".into());
    c.secret_access_key = Some("test".into());
    let client = S3Client::new(&c).unwrap();
    match client.create_bucket(false) {
        Ok(()) | Err(remus_s3::S3Error::Exists(_)) => {}
        Err(e) => panic!("bucket: {e}"),
    }
    S3Leases::new(client)
}

#[test]
fn the_lease_changes_only_from_the_version_read() {
    let s = leases("lease-cas");
    let g = GuestId(7);
    assert_eq!(s.read(g).unwrap(), None);
    let first = s.create(&Lease::new(g, 1, "site-a", 500, None)).unwrap();
    assert!(matches!(s.create(&Lease::new(g, 1, "site-b", 500, None)), Err(WitnessError::Lost(_))), "only one first lease");
    let renewed = s.replace(&first.lease.renewed(), &first.tag).unwrap();
    assert_ne!(renewed.tag, first.tag, "a renewal is a new version");
    // A writer holding the old version loses, whatever it writes.
    assert!(matches!(s.replace(&Lease::new(g, 2, "site-b", 500, Some(40)), &first.tag), Err(WitnessError::Lost(_))));
    let read = s.read(g).unwrap().unwrap();
    assert_eq!(read, renewed);
    let taken = s.replace(&Lease::new(g, 2, "site-b", 500, Some(40)), &read.tag).unwrap();
    assert!(matches!(s.replace(&renewed.lease.renewed(), &renewed.tag), Err(WitnessError::Lost(_))), "the old owner's renewal fails");
    assert_eq!(s.read(g).unwrap().unwrap().lease.generation, taken.lease.generation);
}

#[test]
fn of_racing_takers_exactly_one_wins() {
    let s = Arc::new(leases("lease-race"));
    const TAKERS: usize = 8;
    for round in 0..15u64 {
        let g = GuestId(100 + round);
        let start = s.create(&Lease::new(g, 1, "owner", 500, None)).unwrap();
        let barrier = Arc::new(Barrier::new(TAKERS));
        let handles: Vec<_> = (0..TAKERS)
            .map(|i| {
                let (s, barrier, tag) = (Arc::clone(&s), Arc::clone(&barrier), start.tag.clone());
                std::thread::spawn(move || {
                    let lease = Lease::new(g, 2, &format!("taker-{i}"), 500, Some(round));
                    barrier.wait();
                    s.replace(&lease, &tag).map(|t| t.lease.owner)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let winners: Vec<&String> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        assert!(results.iter().all(|r| matches!(r, Ok(_) | Err(WitnessError::Lost(_)))), "round {round}: {results:?}");
        assert_eq!(&s.read(g).unwrap().unwrap().lease.owner, winners[0], "the witness names the winner");
    }
}
