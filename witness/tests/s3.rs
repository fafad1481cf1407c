//! The lease on a real S3 server (moto_server, started by
//! `scripts/test.sh`, which exports its URL as `REMUS_TEST_S3_ENDPOINT`):
//! compare-and-swap semantics, and that of many takers racing for the
//! same lease exactly one wins, every round.

mod common;

use std::sync::Arc;

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
    let (_, renewed) = common::swaps_only_from_the_version_read(&s, g);
    let taken = s.replace(&Lease::new(g, 2, "site-b", 500, Some(40)), &renewed.tag).unwrap();
    assert!(matches!(s.replace(&renewed.lease.renewed(), &renewed.tag), Err(WitnessError::Lost(_))), "the old owner's renewal fails");
    assert_eq!(s.read(g).unwrap().unwrap().lease.generation, taken.lease.generation);
}

#[test]
fn of_racing_takers_exactly_one_wins() {
    let s: Arc<dyn LeaseStore> = Arc::new(leases("lease-race"));
    common::exactly_one_of_racing_takers_wins(&vec![s; 8], 15);
}
