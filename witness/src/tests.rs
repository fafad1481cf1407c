//! The lease's safety by simulation: an owner and a taker with clocks
//! drifting within the allowance, a witness whose requests are slow or
//! lost, and partitions cutting the owner from the witness, the backup,
//! or both. Whenever a takeover has succeeded the owner must not be
//! running; when the owner is cut off from both, the taker must take over
//! within a bounded time.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use remus_types::GuestId;

use crate::{Claimant, Lease, LeaseHolder, LeaseStore, MemoryLeases, Standing, Takeover, Timing};

const MS: u64 = 1000; // µs

/// A minimal random generator (the scenario is the proptest input).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below.max(1)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Renew,
    Read,
    Take { generation: u64 },
}

struct Request {
    from_owner: bool,
    op: Op,
    expected: Option<String>,
    sent_local: Instant,
    linearize_at: u64,
    answer_at: Option<u64>,
    result: Option<Result<Option<(String, Lease)>, bool>>, // Ok(state) or Err(lost?)
}

#[derive(Debug, Clone)]
struct Scenario {
    owner_rate: f64,
    taker_rate: f64,
    /// Real time (µs) the owner loses the witness, and the link.
    cut_witness_at: Option<u64>,
    cut_link_at: Option<u64>,
    /// Whether the owner process dies at the link cut (nothing more sent).
    owner_dies: bool,
    seed: u64,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let rate = 1.0 / 1.01..=1.01f64;
    (rate.clone(), rate, prop::option::of(0..3000u64), prop::option::of(0..3000u64), any::<bool>(), any::<u64>()).prop_map(
        |(owner_rate, taker_rate, w, l, owner_dies, seed)| Scenario {
            owner_rate,
            taker_rate,
            cut_witness_at: w.map(|ms| ms * MS),
            cut_link_at: l.map(|ms| ms * MS),
            owner_dies,
            seed,
        },
    )
}

/// Runs 6 s of real time in 1 ms steps; returns (takeover time, owner's
/// last running time) and panics if both ran at once.
fn run(s: &Scenario) -> (Option<u64>, u64) {
    let timing = Timing::default();
    let base = Instant::now();
    let owner_clock = |t: u64| base + Duration::from_micros((t as f64 * s.owner_rate) as u64);
    let taker_clock = |t: u64| base + Duration::from_micros((t as f64 * s.taker_rate) as u64);
    let mut rng = Lcg(s.seed);
    let guest = GuestId(1);

    // The witness register: tag counter and lease.
    let mut tag_n = 1u64;
    let mut state: (String, Lease) = ("t1".into(), Lease::new(guest, 1, "owner", 500, None));
    let mut owner_tag = state.0.clone();
    let mut holder = LeaseHolder::new(timing, 1, owner_clock(0));
    let mut claimant = Claimant::new(timing, taker_clock(0));
    let mut requests: Vec<Request> = Vec::new();
    let mut took_over: Option<u64> = None;
    let mut owner_last_running = 0;
    let mut owner_dead = false;
    // Epochs: sealed every 25 ms by the owner while it runs, heard by the
    // taker 5..40 ms later, acknowledged back 5..40 ms after that.
    let mut epochs: Vec<(Instant, u64, u64)> = Vec::new(); // (sealed local, arrives at taker, ack arrives at owner)

    for step in 0..6000u64 {
        let t = step * MS;
        let witness_cut = s.cut_witness_at.is_some_and(|c| t >= c);
        let link_cut = s.cut_link_at.is_some_and(|c| t >= c);
        if link_cut && s.owner_dies {
            owner_dead = true;
        }

        // The witness applies requests at their linearization points.
        for r in requests.iter_mut().filter(|r| r.linearize_at <= t && r.result.is_none()) {
            r.result = Some(match r.op {
                Op::Read => Ok(Some(state.clone())),
                Op::Renew | Op::Take { .. } if r.expected.as_deref() != Some(state.0.as_str()) => Err(true),
                Op::Renew => {
                    tag_n += 1;
                    state = (format!("t{tag_n}"), state.1.renewed());
                    Ok(Some(state.clone()))
                }
                Op::Take { generation } => {
                    tag_n += 1;
                    state = (format!("t{tag_n}"), Lease::new(guest, generation, "taker", 500, None));
                    took_over.get_or_insert(t);
                    Ok(Some(state.clone()))
                }
            });
        }
        // Answers.
        let mut answered = Vec::new();
        requests.retain_mut(|r| {
            if r.answer_at == Some(t) {
                answered.push((r.from_owner, r.op, r.sent_local, r.result.clone().expect("linearized before answered")));
                false
            } else {
                r.answer_at.is_some_and(|a| a > t)
            }
        });
        for (from_owner, op, sent_local, result) in answered {
            if from_owner {
                if owner_dead {
                    continue;
                }
                match result {
                    Ok(Some((tag, _))) => {
                        owner_tag = tag;
                        holder.on_renewed(sent_local);
                    }
                    Err(true) => holder.on_superseded(state.1.clone()),
                    _ => holder.on_renewal_failed(sent_local),
                }
            } else {
                match (op, result) {
                    (Op::Read, Ok(Some((tag, lease)))) => {
                        claimant.observe(taker_clock(t), Some(&crate::Tagged { lease, tag }));
                    }
                    (Op::Take { .. }, Err(true)) => claimant.on_lost(),
                    _ => {}
                }
            }
        }

        // The owner.
        if !owner_dead {
            let now = owner_clock(t);
            for e in epochs.iter().filter(|e| e.2 == t && !link_cut) {
                holder.on_backup_heard(e.0);
            }
            if holder.poll_renewal(now) {
                let lat = 1 + rng.next(60);
                let lost = witness_cut || rng.next(20) == 0;
                requests.push(Request {
                    from_owner: true,
                    op: Op::Renew,
                    expected: Some(owner_tag.clone()),
                    sent_local: now,
                    linearize_at: if witness_cut { u64::MAX } else { t + lat * MS / 2 },
                    answer_at: if lost { Some(t + 200 * MS) } else { Some(t + lat * MS) },
                    result: if witness_cut { Some(Err(false)) } else { None },
                });
                if lost && !witness_cut {
                    // Applied but the answer lost: it reports failure.
                    let r = requests.last_mut().expect("pushed");
                    r.linearize_at = t + lat * MS / 2;
                }
            }
            match holder.may_run(now) {
                Standing::Owner => {
                    owner_last_running = t;
                    assert!(took_over.is_none(), "owner runs at {t} µs after a takeover at {took_over:?} µs ({s:?})");
                    if step % 25 == 0 && !link_cut {
                        let arrive = t + (5 + rng.next(35)) * MS;
                        epochs.push((now, arrive, arrive + (5 + rng.next(35)) * MS));
                    }
                }
                Standing::SelfFenced { .. } | Standing::Superseded(_) => {}
            }
        }

        // The taker hears epochs that arrive before the cut.
        if epochs.iter().any(|e| e.1 == t && s.cut_link_at.is_none_or(|c| e.1 < c)) {
            claimant.on_owner_heard(taker_clock(t));
        }
        if took_over.is_none() && !requests.iter().any(|r| !r.from_owner) {
            let now = taker_clock(t);
            let op = match claimant.poll(now) {
                Takeover::Read => Some((Op::Read, None)),
                Takeover::Attempt { expected, generation, .. } => Some((Op::Take { generation }, expected)),
                Takeover::Wait(_) => None,
            };
            if let Some((op, expected)) = op {
                let lat = 1 + rng.next(60);
                requests.push(Request {
                    from_owner: false,
                    op,
                    expected,
                    sent_local: now,
                    linearize_at: t + lat * MS / 2,
                    answer_at: Some(t + lat * MS),
                    result: None,
                });
            }
        }
    }
    (took_over, owner_last_running)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn never_two_owners_and_a_cut_off_owner_is_replaced(s in scenario()) {
        let (took_over, last_running) = run(&s);
        if let Some(t) = took_over {
            prop_assert!(last_running < t);
        }
        // Cut from both before the last 2.5 s: taken over, within a lease
        // period and the allowances of the later cut (plus a read and a
        // swap of at most 60 ms each, and a read period).
        if let (Some(w), Some(l)) = (s.cut_witness_at, s.cut_link_at) {
            let cut = w.max(l);
            if cut + 2_500 * MS < 6_000 * MS {
                let t = took_over.expect("an owner cut off from both is replaced");
                prop_assert!(t <= cut + 1_000 * MS, "took over {} ms after the cut", (t - cut) / MS);
            }
        }
        // An owner that keeps its link and the witness is never replaced.
        if s.cut_witness_at.is_none() && s.cut_link_at.is_none() {
            prop_assert!(took_over.is_none());
        }
    }
}

#[test]
fn an_owner_confirmed_by_the_backup_alone_keeps_running() {
    let timing = Timing::default();
    let t0 = Instant::now();
    let mut h = LeaseHolder::new(timing, 3, t0);
    // The witness never answers again; acknowledged epochs keep coming.
    let mut now = t0;
    for i in 1..200u64 {
        now = t0 + Duration::from_millis(25 * i);
        if h.poll_renewal(now) {
            h.on_renewal_failed(now);
        }
        h.on_backup_heard(now - Duration::from_millis(40));
        assert_eq!(h.may_run(now), Standing::Owner, "at {i}");
    }
    // Both silent: fenced after the validity, and back after a renewal.
    let later = now + timing.owner_valid();
    assert!(matches!(h.may_run(later), Standing::SelfFenced { .. }));
    h.on_renewed(later);
    assert_eq!(h.may_run(later + Duration::from_millis(1)), Standing::Owner);
    let l = Lease::new(GuestId(1), 4, "b", 500, Some(9));
    h.on_superseded(l.clone());
    assert_eq!(h.may_run(later), Standing::Superseded(Box::new(l)));
    assert!(!h.poll_renewal(later + Duration::from_secs(1)), "a superseded owner renews no more");
}

#[test]
fn a_released_lease_is_taken_at_once_and_only_in_the_version_read() {
    let timing = Timing::default();
    let leases = MemoryLeases::default();
    let owned = leases.create(&Lease::new(GuestId(1), 3, "a", 500, None)).unwrap();
    let t0 = Instant::now();
    // The owner is still heard (its link carries the hand-over) and the
    // lease was renewed a moment ago: a taker waits a lease period out.
    let mut c = Claimant::new(timing, t0);
    c.observe(t0, Some(&owned));
    assert!(matches!(c.poll(t0), Takeover::Wait(_)));
    // Released by its owner: taken at once, in the next generation.
    let released = leases.replace(&owned.lease.released(), &owned.tag).unwrap();
    assert!(Lease::from_bytes(&released.lease.to_bytes()).unwrap().released, "the release survives the object's bytes");
    let mut c = Claimant::new(timing, t0);
    c.observe(t0, Some(&released));
    let Takeover::Attempt { expected, generation, released: true } = c.poll(t0) else { panic!("a released lease is taken at once") };
    assert_eq!((expected.as_deref(), generation), (Some(released.tag.as_str()), 4));
    // A lease not released is never taken at once, however it was read.
    let renewed = leases.replace(&released.lease.renewed(), &released.tag).unwrap();
    assert!(renewed.lease.released, "a renewal keeps what it renews");
    let fresh = leases.replace(&Lease::new(GuestId(1), 4, "b", 500, None), &renewed.tag).unwrap();
    let mut c = Claimant::new(timing, t0);
    c.observe(t0, Some(&fresh));
    assert!(matches!(c.poll(t0), Takeover::Wait(_)), "generation 4 is not released");
    // A stale release does not win: the swap needs the version read.
    assert!(leases.replace(&Lease::new(GuestId(1), 5, "c", 500, None), &released.tag).is_err());
}
