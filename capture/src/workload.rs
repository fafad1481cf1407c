//! The built-in guest workload: writes pages of an arena at a set rate with
//! a set locality and content mix, so that every page encoding of the wire
//! format is exercised, and emits one line of output per tick for output
//! commit to hold.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use remus_types::PAGE_SIZE;

use crate::arena::Shared;

/// Shape of the built-in workload.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct WorkloadConfig {
    /// Page writes per second (default 20 000, about 500 per 25 ms epoch).
    pub pages_per_sec: u64,
    /// Fraction of memory that forms the hot set (default 0.02).
    pub hot_fraction: f64,
    /// Probability that a write goes to the hot set (default 0.9).
    pub hot_probability: f64,
    /// Relative weights of the written content.
    pub mix: ContentMix,
    /// Seed of the workload's random generator (default 1).
    pub seed: u64,
    /// Interval between two output lines, in milliseconds (default 25).
    pub output_interval_ms: u64,
    /// A marker written once, to be found in the history later (`remus
    /// bisect`); none by default.
    pub marker: Option<Marker>,
}

/// A value the workload writes once into memory, `after-ms` after it
/// starts, at byte `address`; its own writes never touch that page, so
/// once there the value stays.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Marker {
    /// When, after the workload starts.
    pub after_ms: u64,
    /// Where, as a byte offset into memory.
    pub address: u64,
    /// What (its UTF-8 bytes).
    pub value: String,
}

/// Relative weights of what a page write stores.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ContentMix {
    /// An all-zero page (default 10).
    pub zero: u32,
    /// English-like text (default 25).
    pub text: u32,
    /// Incompressible random bytes (default 10).
    pub random: u32,
    /// A copy of another page of the hot set (default 20).
    pub duplicate: u32,
    /// A few bytes changed in place (default 35).
    pub edit: u32,
    /// One of [`RECYCLE_POOL`] fixed contents (default 0): pages return to
    /// content they held before, as a guest refilling freed buffers does,
    /// so the backup is asked for content its retention may have dropped.
    pub recycle: u32,
}

/// Distinct contents the `recycle` writes choose among.
pub const RECYCLE_POOL: u64 = 1024;

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            pages_per_sec: 20_000,
            hot_fraction: 0.02,
            hot_probability: 0.9,
            mix: ContentMix::default(),
            seed: 1,
            output_interval_ms: 25,
            marker: None,
        }
    }
}

impl Default for ContentMix {
    fn default() -> Self {
        Self { zero: 10, text: 25, random: 10, duplicate: 20, edit: 35, recycle: 0 }
    }
}

impl WorkloadConfig {
    /// Checks the ranges of every field.
    ///
    /// # Errors
    /// A message naming the first bad field.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.hot_fraction > 0.0 && self.hot_fraction <= 1.0) {
            return Err(format!("hot-fraction must be in (0, 1], got {}", self.hot_fraction));
        }
        if !(0.0..=1.0).contains(&self.hot_probability) {
            return Err(format!("hot-probability must be in [0, 1], got {}", self.hot_probability));
        }
        let m = self.mix;
        if m.zero + m.text + m.random + m.duplicate + m.edit + m.recycle == 0 {
            return Err("content mix weights are all zero".into());
        }
        if self.output_interval_ms == 0 {
            return Err("output-interval-ms must be positive".into());
        }
        if let Some(m) = &self.marker {
            if m.value.is_empty() || m.value.len() > PAGE_SIZE || (m.address % PAGE_SIZE as u64) as usize + m.value.len() > PAGE_SIZE {
                return Err(format!(
                    "marker: a value of 1..={PAGE_SIZE} bytes that stays within the page at its address (address {}, {} bytes)",
                    m.address,
                    m.value.len()
                ));
            }
        }
        Ok(())
    }
}

const WORDS: &[&str] = &[
    "the",
    "epoch",
    "of",
    "a",
    "guest",
    "backup",
    "primary",
    "page",
    "memory",
    "and",
    "is",
    "to",
    "checkpoint",
    "commit",
    "replica",
    "network",
    "disk",
    "write",
    "read",
    "state",
    "in",
    "on",
    "failover",
    "history",
    "log",
    "with",
    "for",
    "that",
    "it",
    "was",
    "as",
    "at",
    "by",
    "kernel",
];

/// Pages written per lock hold: short enough that a pause request waits
/// only microseconds for the batch to finish.
const BATCH: u64 = 8;

/// Waits while the guest is held still (nothing written, no output);
/// returns how long, so that the write rate and the output ticks resume
/// from where they were, with no catch-up.
fn wait_while_held(shared: &Shared) -> Duration {
    let held_at = Instant::now();
    while shared.held.load(Ordering::Acquire) && !shared.stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(1));
    }
    held_at.elapsed()
}

pub(crate) fn run(shared: &Arc<Shared>, cfg: &WorkloadConfig) {
    let pages = shared.page_count;
    let hot = ((pages as f64 * cfg.hot_fraction) as u64).clamp(1, pages);
    let m = cfg.mix;
    let weights = [m.zero, m.text, m.random, m.duplicate, m.edit, m.recycle];
    let total: u32 = weights.iter().sum();
    let mut rng = SmallRng::seed_from_u64(cfg.seed);
    let mut start = Instant::now();
    // The marker: its page (left alone by the writes below) and deadline.
    let marker_pfn = cfg.marker.as_ref().map(|m| m.address / PAGE_SIZE as u64).filter(|p| *p < pages);
    let mut marker = cfg.marker.as_ref().filter(|_| marker_pfn.is_some()).map(|m| (start + Duration::from_millis(m.after_ms), m));
    let tick = Duration::from_millis(cfg.output_interval_ms);
    let mut next_line = start + tick;
    let mut written = 0u64;
    let mut lines = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        if shared.held.load(Ordering::Acquire) {
            let held = wait_while_held(shared);
            start += held;
            next_line += held;
            continue;
        }
        let now = Instant::now();
        if now >= next_line {
            lines += 1;
            let line = format!("tick {lines}: {written} pages written\n");
            shared.output.push(line.into_bytes());
            next_line += tick;
            record_cpu(shared);
        }
        let due = (cfg.pages_per_sec as f64 * now.duration_since(start).as_secs_f64()) as u64;
        if written >= due {
            std::thread::sleep(Duration::from_micros(500));
            continue;
        }
        // Sleep, not spin, while paused: a running thread of this process
        // would take TLB-shootdown interrupts for every page the scan
        // re-protects, which multiplies the pause.
        while shared.pause.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_micros(100));
        }
        let mut mem = shared.memory.lock();
        if shared.held.load(Ordering::Acquire) || shared.pause.load(Ordering::Acquire) {
            // Checked under the lock as well: once a pause has taken the
            // lock after setting its flag (or a checkpoint after the hold),
            // nothing more is written until it is cleared.
            drop(mem);
            continue;
        }
        let bytes = mem.as_mut_slice();
        if let Some((_, m)) = marker.filter(|(at, _)| Instant::now() >= *at) {
            let at = m.address as usize;
            bytes[at..at + m.value.len()].copy_from_slice(m.value.as_bytes());
            marker = None;
        }
        for _ in 0..BATCH {
            let mut pfn = if rng.gen_bool(cfg.hot_probability) { rng.gen_range(0..hot) } else { rng.gen_range(0..pages) };
            if Some(pfn) == marker_pfn {
                pfn = (pfn + 1) % pages;
            }
            let off = pfn as usize * PAGE_SIZE;
            let mut pick = rng.gen_range(0..total);
            let kind = weights
                .iter()
                .position(|&w| {
                    if pick < w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
                .unwrap_or(0);
            match kind {
                0 => bytes[off..off + PAGE_SIZE].fill(0),
                1 => fill_text(&mut rng, &mut bytes[off..off + PAGE_SIZE]),
                2 => rng.fill_bytes(&mut bytes[off..off + PAGE_SIZE]),
                3 => {
                    let src = rng.gen_range(0..hot) as usize * PAGE_SIZE;
                    if src != off {
                        bytes.copy_within(src..src + PAGE_SIZE, off);
                    }
                }
                5 => fill_recycled(rng.gen_range(0..RECYCLE_POOL), &mut bytes[off..off + PAGE_SIZE]),
                _ => {
                    let at = off + rng.gen_range(0..PAGE_SIZE / 8) * 8;
                    let v = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
                    bytes[at..at + 8].copy_from_slice(&(v.wrapping_add(written | 1)).to_le_bytes());
                }
            }
            written += 1;
        }
        drop(mem);
        shared.written.store(written, Ordering::Relaxed);
    }
    record_cpu(shared);
}

fn record_cpu(shared: &Shared) {
    let ns = u64::try_from(remus_sys::thread_cpu_time().as_nanos()).unwrap_or(u64::MAX);
    shared.cpu_ns.store(ns, Ordering::Relaxed);
}

/// Content `i` of the recycle pool: the same bytes every time.
fn fill_recycled(i: u64, page: &mut [u8]) {
    let stamp = format!("recycled content {i:04} ");
    for (d, s) in page.iter_mut().zip(stamp.bytes().cycle()) {
        *d = s;
    }
}

fn fill_text(rng: &mut SmallRng, page: &mut [u8]) {
    let mut i = 0;
    while i < page.len() {
        let w = WORDS[rng.gen_range(0..WORDS.len())].as_bytes();
        let n = w.len().min(page.len() - i);
        page[i..i + n].copy_from_slice(&w[..n]);
        i += n;
        if i < page.len() {
            page[i] = if rng.gen_ratio(1, 12) { b'\n' } else { b' ' };
            i += 1;
        }
    }
}
