//! What the lease stores' tests share: compare-and-swap from the version
//! read, and the race of many takers for one version.

use std::sync::{Arc, Barrier};

use remus_types::GuestId;
use remus_witness::{Lease, LeaseStore, Tagged, WitnessError};

/// Guest `g`'s first lease is created once; its renewal is a new version;
/// a writer holding the old version loses. Returns (first, renewed).
pub fn swaps_only_from_the_version_read(s: &dyn LeaseStore, g: GuestId) -> (Tagged, Tagged) {
    assert_eq!(s.read(g).unwrap(), None);
    let first = s.create(&Lease::new(g, 1, "site-a", 500, None)).unwrap();
    assert!(matches!(s.create(&Lease::new(g, 1, "site-b", 500, None)), Err(WitnessError::Lost(_))), "only one first lease");
    let renewed = s.replace(&first.lease.renewed(), &first.tag).unwrap();
    assert_ne!(renewed.tag, first.tag, "a renewal is a new version");
    // A writer holding the old version loses, whatever it writes.
    assert!(matches!(s.replace(&Lease::new(g, 2, "site-b", 500, Some(40)), &first.tag), Err(WitnessError::Lost(_))));
    assert_eq!(s.read(g).unwrap().unwrap(), renewed);
    (first, renewed)
}

/// For `rounds` rounds, a fresh guest's lease is created by the first of
/// `takers`, then every taker at once tries to replace it from the version
/// created: exactly one wins each round, the others lose, and a read names
/// the winner.
pub fn exactly_one_of_racing_takers_wins(takers: &[Arc<dyn LeaseStore>], rounds: u64) {
    for round in 0..rounds {
        let g = GuestId(100 + round);
        let start = takers[0].create(&Lease::new(g, 1, "owner", 500, None)).unwrap();
        let barrier = Arc::new(Barrier::new(takers.len()));
        let handles: Vec<_> = takers
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let (s, barrier, tag) = (Arc::clone(s), Arc::clone(&barrier), start.tag.clone());
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
        assert_eq!(&takers[takers.len() - 1].read(g).unwrap().unwrap().lease.owner, winners[0], "the witness names the winner");
    }
}
