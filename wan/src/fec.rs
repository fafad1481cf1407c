//! Forward error correction for epoch streams.
//!
//! Each epoch travels on its own QUIC stream, which quinn makes reliable by
//! retransmission: a lost packet costs the time to find it lost (a later
//! packet acknowledged and 1.25 round trips passed) plus a round trip for the
//! copy. At 1% loss nearly every epoch of a few hundred packets loses one, so
//! output waits about three round trips instead of one. Parity lets the backup
//! rebuild the missing bytes from what did arrive, without waiting.
//!
//! The primary cuts an epoch's stream bytes into shards of one datagram's
//! payload, deals them round-robin into as few groups of at most
//! [`MAX_DATA_PER_GROUP`] as hold them (the two or three shards one lost
//! packet spans land in different groups), and sends Reed-Solomon parity
//! shards for each group as QUIC datagrams beside the stream. Few large
//! groups rather than many small ones: the parity a group needs grows with
//! the square root of its size, not its size, and each rebuild has a fixed
//! cost (about 0.25 ms) whatever the group's size. The backup reads the
//! stream out of order into a [`Reassembly`]; as soon as every group misses
//! no more shards than it has parity for, it rebuilds the epoch and stops
//! the stream. The stream stays the carrier of record: with too little
//! parity, the epoch completes when quinn's retransmissions arrive, exactly
//! as without parity.
//!
//! A parity datagram's layout (integers little-endian):
//!
//! ```text
//! magic "RMFP" | version u8 | stream u64 | len u64 | shard u16 | groups u32
//!     | parity per group u8 | group u32 | index u8 | shard bytes
//! ```
//!
//! `stream` is the QUIC stream's index, `len` the epoch's byte length and
//! `shard` the shard size (even: the Reed-Solomon code works on 16-bit words).

use std::collections::BTreeMap;

/// First bytes of a parity datagram (a control message copy starts `RMUS`).
pub const PARITY_MAGIC: [u8; 4] = *b"RMFP";
/// Version of the parity datagram layout (2: groups of up to
/// [`MAX_DATA_PER_GROUP`]; version 1 had groups of 32).
pub const PARITY_VERSION: u8 = 2;
/// Bytes before a parity datagram's shard.
pub const PARITY_HEADER_LEN: usize = 4 + 1 + 8 + 8 + 2 + 4 + 1 + 4 + 1;
/// Data shards per group at most. An epoch of the default workload (about
/// 360 shards) is one group: at 1% packet loss (a lost packet erasing two
/// shards) 26 parity shards leave fewer than one in ten thousand short,
/// 7.2% of its size, where groups of 32 need 8 each (25%).
pub const MAX_DATA_PER_GROUP: usize = 512;
/// Parity shards per group at most: a group's parity must fit the
/// link's datagram buffer at once (64 of about 1.2 KB).
pub const MAX_GROUP_PARITY: u8 = 64;
/// A fixed parity rate is given per this many data shards.
pub const PARITY_PER: usize = 32;
/// A fixed parity rate is at most this many shards per [`PARITY_PER`].
pub const MAX_PARITY: u8 = 16;

/// How much parity the primary sends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fec {
    /// No parity: lost packets wait for quinn's retransmission.
    Off,
    /// Parity sized to the loss the link has shown (none while it shows
    /// none).
    #[default]
    Auto,
    /// This many parity shards per [`PARITY_PER`] data shards.
    Parity(u8),
}

impl std::str::FromStr for Fec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "auto" => Ok(Self::Auto),
            n => match n.parse::<u8>() {
                Ok(0) => Ok(Self::Off),
                Ok(p) if p <= MAX_PARITY => Ok(Self::Parity(p)),
                _ => Err(format!("unknown forward error correction {s:?} (auto, off, or 1..={MAX_PARITY} parity shards per {PARITY_PER})")),
            },
        }
    }
}

impl std::fmt::Display for Fec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Auto => f.write_str("auto"),
            Self::Parity(p) => write!(f, "{p}"),
        }
    }
}

impl Fec {
    /// Parity shards for a group of `data` shards on a link that loses
    /// `loss` of its packets (quinn's count, spurious losses included).
    #[must_use]
    pub fn parity_for(self, loss: f64, data: usize) -> u8 {
        match self {
            Self::Off => 0,
            Self::Parity(p) => {
                let n = (usize::from(p) * data).div_ceil(PARITY_PER).clamp(1, usize::from(MAX_GROUP_PARITY));
                u8::try_from(n).unwrap_or(MAX_GROUP_PARITY)
            }
            Self::Auto => auto_parity(loss, data),
        }
    }
}

/// Residual chance that a group stays short, the target of [`Fec::Auto`].
const GROUP_FAILURE: f64 = 1e-4;

/// The fewest parity shards for a group of `data` shards that leave it
/// short with probability below [`GROUP_FAILURE`]; none below 0.05% loss,
/// where a rare retransmission costs less than constant parity.
///
/// Shards and packets are about the same size and not aligned, so a lost
/// packet erases two shards, and `m` parity shards cover `m / 2` lost
/// packets among the group's `data + m`. (Taking each shard as erased on
/// its own with twice the loss, as first done, has the same mean and half
/// the variance: at 1% loss it left about one epoch in a hundred short,
/// not one in ten thousand.)
fn auto_parity(loss: f64, data: usize) -> u8 {
    // NaN (no sample yet) counts as no loss.
    if loss.is_nan() || loss < 0.0005 || data == 0 {
        return 0;
    }
    let p = loss.min(0.5);
    (1..=MAX_GROUP_PARITY)
        .find(|&m| binomial_tail(data + usize::from(m), p, usize::from(m) / 2 + 1) < GROUP_FAILURE)
        .unwrap_or(MAX_GROUP_PARITY)
}

/// P(X ≥ k) for X ~ Binomial(n, q).
fn binomial_tail(n: usize, q: f64, k: usize) -> f64 {
    let mut term = (1.0 - q).powi(i32::try_from(n).unwrap_or(i32::MAX));
    let mut below = 0.0;
    for i in 0..k.min(n + 1) {
        below += term;
        term *= (n - i) as f64 / (i + 1) as f64 * q / (1.0 - q);
    }
    (1.0 - below).max(0.0)
}

/// The shard size for datagrams of at most `max_datagram` bytes.
#[must_use]
pub fn shard_size(max_datagram: usize) -> Option<usize> {
    let s = max_datagram.checked_sub(PARITY_HEADER_LEN)? & !1;
    (s >= 64).then_some(s.min(usize::from(u16::MAX) & !1))
}

/// How an epoch's bytes are cut and grouped; the same in every parity
/// datagram of a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The epoch's length in bytes.
    pub len: u64,
    /// Shard size in bytes (even).
    pub shard: u16,
    /// Number of groups.
    pub groups: u32,
    /// Parity shards per group.
    pub parity: u8,
}

impl Layout {
    /// The layout for `len` bytes in shards of `shard` bytes with `parity`
    /// parity shards per group.
    #[must_use]
    pub fn new(len: u64, shard: u16, parity: u8) -> Self {
        let shards = len.div_ceil(u64::from(shard));
        let groups = u32::try_from(shards.div_ceil(MAX_DATA_PER_GROUP as u64).max(1)).unwrap_or(u32::MAX);
        Self { len, shard, groups, parity }
    }

    /// Data shards in the largest group (groups differ by one at most).
    #[must_use]
    pub fn largest_group(&self) -> usize {
        self.group_len(0)
    }

    fn data_shards(&self) -> u64 {
        self.len.div_ceil(u64::from(self.shard))
    }

    /// Data shards in `group`: shard `i` belongs to group `i % groups`.
    fn group_len(&self, group: u32) -> usize {
        let n = self.data_shards();
        let g = u64::from(self.groups);
        usize::try_from((n + g - 1 - u64::from(group)) / g).unwrap_or(0)
    }

    fn shard_range(&self, shard: u64) -> std::ops::Range<usize> {
        let s = u64::from(self.shard);
        let start = shard * s;
        let end = (start + s).min(self.len);
        usize::try_from(start).unwrap_or(usize::MAX)..usize::try_from(end).unwrap_or(usize::MAX)
    }

    fn check(&self, max_len: u64) -> Result<(), FecError> {
        let ok = self.shard >= 2
            && self.shard % 2 == 0
            && self.len > 0
            && self.len <= max_len
            && self.parity > 0
            && self.parity <= MAX_GROUP_PARITY
            && *self == Self::new(self.len, self.shard, self.parity);
        if ok {
            Ok(())
        } else {
            Err(FecError::BadLayout(*self))
        }
    }
}

/// A parity datagram that cannot be used.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum FecError {
    /// Shorter than its header or its shard.
    #[error("parity datagram of {0} bytes is truncated")]
    Truncated(usize),
    /// Not a parity datagram of this version.
    #[error("not a parity datagram (magic or version)")]
    NotParity,
    /// Impossible sizes.
    #[error("parity datagram with an impossible layout {0:?}")]
    BadLayout(Layout),
    /// A layout other than the stream's first parity datagram said.
    #[error("parity datagram layout {got:?} contradicts {had:?} of the same stream")]
    Contradicts {
        /// What the stream's earlier parity said.
        had: Layout,
        /// What this datagram says.
        got: Layout,
    },
    /// Group or index out of the layout.
    #[error("parity shard {index} of group {group} is outside {layout:?}")]
    OutOfLayout {
        /// The layout.
        layout: Layout,
        /// Group named.
        group: u32,
        /// Index named.
        index: u8,
    },
    /// Stream data past the epoch's length or the size limit.
    #[error("stream data at {offset}..{end} is past the epoch's {limit} bytes")]
    PastEnd {
        /// Start of the data.
        offset: u64,
        /// End of the data.
        end: u64,
        /// The limit it passes.
        limit: u64,
    },
}

/// One parity shard with its place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parity {
    /// The QUIC stream (index) of the epoch.
    pub stream: u64,
    /// The epoch's layout.
    pub layout: Layout,
    /// Group.
    pub group: u32,
    /// Index among the group's parity shards.
    pub index: u8,
    /// The parity shard (`layout.shard` bytes).
    pub bytes: Vec<u8>,
}

impl Parity {
    /// The datagram carrying this shard.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(PARITY_HEADER_LEN + self.bytes.len());
        b.extend_from_slice(&PARITY_MAGIC);
        b.push(PARITY_VERSION);
        b.extend_from_slice(&self.stream.to_le_bytes());
        b.extend_from_slice(&self.layout.len.to_le_bytes());
        b.extend_from_slice(&self.layout.shard.to_le_bytes());
        b.extend_from_slice(&self.layout.groups.to_le_bytes());
        b.push(self.layout.parity);
        b.extend_from_slice(&self.group.to_le_bytes());
        b.push(self.index);
        b.extend_from_slice(&self.bytes);
        b
    }

    /// Whether `datagram` claims to be a parity datagram (its magic).
    #[must_use]
    pub fn is_parity(datagram: &[u8]) -> bool {
        datagram.starts_with(&PARITY_MAGIC)
    }

    /// Decodes and checks a parity datagram for epochs of at most `max_len`
    /// bytes.
    ///
    /// # Errors
    /// A [`FecError`] saying what is wrong with it.
    pub fn decode(d: &[u8], max_len: u64) -> Result<Self, FecError> {
        if d.len() < PARITY_HEADER_LEN {
            return Err(FecError::Truncated(d.len()));
        }
        if d[..4] != PARITY_MAGIC || d[4] != PARITY_VERSION {
            return Err(FecError::NotParity);
        }
        let u64_at = |i: usize| u64::from_le_bytes(d[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(d[i..i + 4].try_into().expect("4 bytes"));
        let stream = u64_at(5);
        let layout = Layout { len: u64_at(13), shard: u16::from_le_bytes([d[21], d[22]]), groups: u32_at(23), parity: d[27] };
        let (group, index) = (u32_at(28), d[32]);
        layout.check(max_len)?;
        if group >= layout.groups || index >= layout.parity {
            return Err(FecError::OutOfLayout { layout, group, index });
        }
        let bytes = &d[PARITY_HEADER_LEN..];
        if bytes.len() != usize::from(layout.shard) {
            return Err(FecError::Truncated(d.len()));
        }
        Ok(Self { stream, layout, group, index, bytes: bytes.to_vec() })
    }
}

/// The parity shards for an epoch's stream bytes: `parity` per group, shards
/// of `shard` bytes (even).
///
/// # Panics
/// When `shard` is odd or zero, or `parity` is zero or above
/// [`MAX_GROUP_PARITY`].
#[must_use]
pub fn encode(stream: u64, bytes: &[u8], shard: u16, parity: u8) -> Vec<Parity> {
    encode_groups(stream, bytes, shard, parity).flatten().collect()
}

/// As [`encode`], a group at a time, so that a sender can stop encoding
/// when it has no room to send more.
///
/// # Panics
/// As [`encode`].
pub fn encode_groups(stream: u64, bytes: &[u8], shard: u16, parity: u8) -> impl Iterator<Item = Vec<Parity>> + '_ {
    assert!(shard >= 2 && shard % 2 == 0 && (1..=MAX_GROUP_PARITY).contains(&parity), "bad FEC parameters");
    let layout = Layout::new(bytes.len() as u64, shard, parity);
    let groups = if bytes.is_empty() { 0 } else { layout.groups };
    (0..groups).map(move |group| {
        let shards: Vec<Vec<u8>> = (0..layout.group_len(group))
            .map(|pos| {
                let i = u64::from(group) + pos as u64 * u64::from(layout.groups);
                padded(&bytes[layout.shard_range(i)], shard)
            })
            .collect();
        let recovery = reed_solomon_simd::encode(shards.len(), usize::from(parity), &shards).expect("supported shard counts");
        recovery
            .into_iter()
            .enumerate()
            .map(|(index, bytes)| Parity { stream, layout, group, index: u8::try_from(index).expect("below MAX_GROUP_PARITY"), bytes })
            .collect()
    })
}

fn padded(data: &[u8], shard: u16) -> Vec<u8> {
    let mut v = data.to_vec();
    v.resize(usize::from(shard), 0);
    v
}

/// Byte ranges received, merged: start → end.
#[derive(Default, Debug)]
struct Ranges(BTreeMap<u64, u64>);

impl Ranges {
    fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        // Merge with a range that starts before and reaches `start`.
        if let Some((&s, &e)) = self.0.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        // Swallow ranges that start inside [start, end].
        let inside: Vec<(u64, u64)> = self.0.range(start..=end).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in inside {
            self.0.remove(&s);
            end = end.max(e);
        }
        self.0.insert(start, end);
    }

    /// The end of the highest range (0 when empty).
    fn end(&self) -> u64 {
        self.0.last_key_value().map_or(0, |(_, &e)| e)
    }

    /// Whether [0, len) is covered.
    fn covers(&self, len: u64) -> bool {
        len == 0 || self.0.first_key_value().is_some_and(|(&s, &e)| s == 0 && e >= len)
    }

    /// Whether [start, end) is covered.
    fn contains(&self, start: u64, end: u64) -> bool {
        start >= end || self.0.range(..=start).next_back().is_some_and(|(_, &e)| e >= end)
    }

    /// The gaps in [0, len).
    fn gaps(&self, len: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = 0;
        for (&s, &e) in &self.0 {
            if s >= len {
                break;
            }
            if s > at {
                out.push((at, s));
            }
            at = at.max(e);
        }
        if at < len {
            out.push((at, len));
        }
        out
    }
}

/// An epoch stream being received out of order, with the parity that came
/// for it.
#[derive(Debug)]
pub struct Reassembly {
    buf: Vec<u8>,
    have: Ranges,
    /// The stream's final length, once its end was read.
    fin: Option<u64>,
    layout: Option<Layout>,
    parity: BTreeMap<u32, BTreeMap<u8, Vec<u8>>>,
    max_len: u64,
    /// Data shards rebuilt from parity.
    rebuilt: usize,
}

impl Reassembly {
    /// An empty reassembly for epochs of at most `max_len` bytes.
    #[must_use]
    pub fn new(max_len: u64) -> Self {
        Self { buf: Vec::new(), have: Ranges::default(), fin: None, layout: None, parity: BTreeMap::new(), max_len, rebuilt: 0 }
    }

    fn limit(&self) -> u64 {
        self.fin.or(self.layout.map(|l| l.len)).unwrap_or(self.max_len)
    }

    /// Stream bytes at `offset`.
    ///
    /// # Errors
    /// [`FecError::PastEnd`] for bytes past the epoch's length.
    pub fn add_data(&mut self, offset: u64, data: &[u8]) -> Result<(), FecError> {
        let end = offset + data.len() as u64;
        let limit = self.limit();
        if end > limit {
            return Err(FecError::PastEnd { offset, end, limit });
        }
        let (o, e) = (usize::try_from(offset).expect("below max_len"), usize::try_from(end).expect("below max_len"));
        if self.buf.len() < e {
            self.buf.resize(e, 0);
        }
        self.buf[o..e].copy_from_slice(data);
        self.have.insert(offset, end);
        Ok(())
    }

    /// The stream's end was read: it is `len` bytes long.
    ///
    /// # Errors
    /// [`FecError::PastEnd`] when data or parity said it was longer.
    pub fn set_final(&mut self, len: u64) -> Result<(), FecError> {
        let limit = self.limit();
        let reached = self.have.end();
        if len > limit || reached > len || self.layout.is_some_and(|l| l.len != len) {
            return Err(FecError::PastEnd { offset: 0, end: len.max(reached), limit: self.layout.map_or(limit, |l| l.len).min(len) });
        }
        self.fin = Some(len);
        Ok(())
    }

    /// The stream's end was read: every byte up to the highest one seen
    /// arrived.
    ///
    /// # Errors
    /// [`FecError::PastEnd`] when parity said the epoch was longer.
    pub fn stream_ended(&mut self) -> Result<(), FecError> {
        let reached = self.have.end();
        self.set_final(reached)
    }

    /// A parity shard for this stream.
    ///
    /// # Errors
    /// [`FecError::Contradicts`] when it disagrees with the stream's earlier
    /// parity or data.
    pub fn add_parity(&mut self, p: Parity) -> Result<(), FecError> {
        match self.layout {
            Some(had) if had != p.layout => return Err(FecError::Contradicts { had, got: p.layout }),
            Some(_) => {}
            None => {
                let reached = self.have.end();
                if reached > p.layout.len || self.fin.is_some_and(|f| f != p.layout.len) {
                    return Err(FecError::PastEnd { offset: 0, end: reached.max(self.fin.unwrap_or(0)), limit: p.layout.len });
                }
                self.layout = Some(p.layout);
            }
        }
        self.parity.entry(p.group).or_default().insert(p.index, p.bytes);
        Ok(())
    }

    /// Data shards rebuilt from parity so far.
    #[must_use]
    pub fn rebuilt(&self) -> usize {
        self.rebuilt
    }

    /// Parity shards received, and the layout they gave (for tracing).
    #[must_use]
    pub fn parity_seen(&self) -> (usize, Option<Layout>) {
        (self.parity.values().map(BTreeMap::len).sum(), self.layout)
    }

    /// The whole epoch when every byte arrived, or when parity can rebuild
    /// the missing ones; `None` while neither holds.
    pub fn take_complete(&mut self) -> Option<Vec<u8>> {
        if let Some(len) = self.fin {
            if self.have.covers(len) {
                return Some(self.take(len));
            }
        }
        let layout = self.layout?;
        // Called for every chunk that arrives: while the shards still
        // missing outnumber all the parity, no group can be rebuilt, and
        // that is found without listing them.
        if self.missing_count(&layout) > self.parity.values().map(BTreeMap::len).sum::<usize>() as u64 {
            return None;
        }
        let missing = self.missing_shards(&layout);
        if missing.iter().any(|(g, shards)| shards.len() > self.parity.get(g).map_or(0, BTreeMap::len)) {
            return None;
        }
        for (group, shards) in missing {
            self.rebuild(&layout, group, &shards)?;
        }
        Some(self.take(layout.len))
    }

    fn take(&mut self, len: u64) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(usize::try_from(len).expect("below max_len"), 0);
        buf
    }

    /// Missing data shards by group.
    /// How many data shards miss a byte (as [`missing_shards`](Self::missing_shards)
    /// lists them).
    fn missing_count(&self, layout: &Layout) -> u64 {
        let s = u64::from(layout.shard);
        let (mut count, mut next) = (0, 0);
        for (a, b) in self.have.gaps(layout.len) {
            let (first, last) = ((a / s).max(next), (b - 1) / s);
            if first <= last {
                count += last - first + 1;
                next = last + 1;
            }
        }
        count
    }

    fn missing_shards(&self, layout: &Layout) -> BTreeMap<u32, Vec<u64>> {
        let s = u64::from(layout.shard);
        let mut out: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        let mut last = None;
        for (a, b) in self.have.gaps(layout.len) {
            for shard in a / s..=(b - 1) / s {
                if last.is_some_and(|l| l >= shard) {
                    continue;
                }
                last = Some(shard);
                let group = u32::try_from(shard % u64::from(layout.groups)).expect("below groups");
                out.entry(group).or_default().push(shard);
            }
        }
        out
    }

    fn rebuild(&mut self, layout: &Layout, group: u32, missing: &[u64]) -> Option<()> {
        let g = u64::from(layout.groups);
        let n = layout.group_len(group);
        let present: Vec<(usize, Vec<u8>)> = (0..n)
            .filter_map(|pos| {
                let i = u64::from(group) + pos as u64 * g;
                let r = layout.shard_range(i);
                self.have.contains(r.start as u64, r.end as u64).then(|| (pos, padded(&self.buf[r], layout.shard)))
            })
            .collect();
        let parity = self.parity.get(&group)?;
        let restored =
            match reed_solomon_simd::decode(n, usize::from(layout.parity), present, parity.iter().map(|(&i, b)| (usize::from(i), b))) {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, group, "parity could not rebuild a group");
                    return None;
                }
            };
        let len = usize::try_from(layout.len).expect("below max_len");
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        for &shard in missing {
            let pos = usize::try_from(shard / g).expect("below group size");
            let r = layout.shard_range(shard);
            let bytes = restored.get(&pos)?;
            let n = r.len();
            self.buf[r.clone()].copy_from_slice(&bytes[..n]);
            self.have.insert(r.start as u64, r.end as u64);
            self.rebuilt += 1;
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn epoch(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.gen()).collect()
    }

    /// Feeds `bytes` as packets of `packet` bytes, dropping those `lost`
    /// says, then the parity (dropping none).
    fn deliver(bytes: &[u8], packet: usize, lost: impl Fn(usize) -> bool, parity: &[Parity]) -> Reassembly {
        let mut r = Reassembly::new(1 << 30);
        for (i, c) in bytes.chunks(packet).enumerate() {
            if !lost(i) {
                r.add_data((i * packet) as u64, c).unwrap();
            }
        }
        for p in parity {
            r.add_parity(Parity::decode(&p.to_bytes(), 1 << 30).unwrap()).unwrap();
        }
        r
    }

    #[test]
    fn complete_stream_needs_no_parity() {
        let bytes = epoch(100_000, 1);
        let mut r = deliver(&bytes, 1200, |_| false, &[]);
        assert_eq!(r.take_complete(), None, "the end is not known yet");
        r.set_final(bytes.len() as u64).unwrap();
        assert_eq!(r.take_complete().as_deref(), Some(&bytes[..]));
    }

    #[test]
    fn lost_packets_are_rebuilt_from_parity() {
        let bytes = epoch(400_000, 2);
        let parity = encode(7, &bytes, 1150, 10);
        // Every 97th packet of 1200 bytes lost: each spans two shards.
        let mut r = deliver(&bytes, 1200, |i| i % 97 == 5, &parity);
        let out = r.take_complete().expect("rebuilt");
        assert_eq!(out, bytes);
        assert!(r.rebuilt() >= 6, "rebuilt {}", r.rebuilt());
    }

    #[test]
    fn a_burst_of_lost_packets_spreads_over_groups() {
        // 1200 shards: three groups, two parity each.
        let bytes = epoch(1_200_000, 3);
        let parity = encode(1, &bytes, 1000, 2);
        assert_eq!(parity[0].layout.groups, 3);
        // Four packets in a row: six shards, two in each group.
        let mut r = deliver(&bytes, 1500, |i| (40..44).contains(&i), &parity);
        assert_eq!(r.take_complete().as_deref(), Some(&bytes[..]));
    }

    #[test]
    fn too_much_loss_waits_for_the_stream() {
        let bytes = epoch(50_000, 4);
        let parity = encode(1, &bytes, 1000, 1);
        let mut r = deliver(&bytes, 1000, |i| i % 2 == 0, &parity);
        assert_eq!(r.take_complete(), None);
        // The retransmissions arrive: complete without parity.
        for (i, c) in bytes.chunks(1000).enumerate().filter(|(i, _)| i % 2 == 0) {
            r.add_data((i * 1000) as u64, c).unwrap();
        }
        assert_eq!(r.take_complete().as_deref(), Some(&bytes[..]), "all data present, parity layout gives the length");
    }

    #[test]
    fn random_loss_random_sizes_rebuild_exactly_or_wait() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for round in 0..60 {
            let len = rng.gen_range(1..200_000);
            let bytes = epoch(len, round);
            let shard = 2 * rng.gen_range(200..700u16);
            let parity = encode(round, &bytes, shard, rng.gen_range(1..=6));
            let packet = rng.gen_range(300..1500);
            let lost: Vec<bool> = (0..len.div_ceil(packet)).map(|_| rng.gen_bool(0.03)).collect();
            let kept: Vec<Parity> = parity.into_iter().filter(|_| !rng.gen_bool(0.03)).collect();
            let mut r = deliver(&bytes, packet, |i| lost[i], &kept);
            match r.take_complete() {
                Some(out) => assert_eq!(out, bytes, "round {round}"),
                None => assert!(lost.iter().any(|&l| l), "round {round}: nothing lost, yet not complete"),
            }
        }
    }

    #[test]
    fn the_missing_count_is_the_number_of_missing_shards() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        for _ in 0..200 {
            let len = rng.gen_range(1..50_000u64);
            let layout = Layout::new(len, 2 * rng.gen_range(50..700u16), 2);
            let mut r = Reassembly::new(1 << 20);
            for _ in 0..rng.gen_range(0..40) {
                let start = rng.gen_range(0..len);
                let end = (start + rng.gen_range(1..3000)).min(len);
                r.add_data(start, &vec![0; (end - start) as usize]).unwrap();
            }
            let listed: usize = r.missing_shards(&layout).values().map(Vec::len).sum();
            assert_eq!(r.missing_count(&layout), listed as u64);
        }
    }

    #[test]
    fn bad_parity_datagrams_are_refused() {
        let bytes = epoch(10_000, 6);
        let p = encode(3, &bytes, 500, 2).remove(0);
        let good = p.to_bytes();
        assert_eq!(Parity::decode(&good, 1 << 20).unwrap(), p);
        assert_eq!(Parity::decode(&good[..20], 1 << 20), Err(FecError::Truncated(20)));
        assert!(matches!(Parity::decode(&good[..good.len() - 1], 1 << 20), Err(FecError::Truncated(_))));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(Parity::decode(&bad, 1 << 20), Err(FecError::NotParity));
        assert!(matches!(Parity::decode(&good, 5_000), Err(FecError::BadLayout(_))), "longer than the epoch limit");
        let mut bad = good.clone();
        bad[23] = 99; // groups
        assert!(matches!(Parity::decode(&bad, 1 << 20), Err(FecError::BadLayout(_))));
        let mut bad = good.clone();
        bad[32] = 2; // index ≥ parity
        assert!(matches!(Parity::decode(&bad, 1 << 20), Err(FecError::OutOfLayout { .. })));

        let mut r = Reassembly::new(1 << 20);
        r.add_parity(p.clone()).unwrap();
        let other = encode(3, &bytes[..9_000], 500, 2).remove(0);
        assert!(matches!(r.add_parity(other), Err(FecError::Contradicts { .. })));
        assert!(matches!(r.add_data(9_990, &[0; 20]), Err(FecError::PastEnd { .. })));
        assert!(r.set_final(9_000).is_err(), "parity said 10 000 bytes");
    }

    #[test]
    fn auto_parity_grows_with_loss() {
        assert_eq!(Fec::Auto.parity_for(0.0, 360), 0);
        assert_eq!(Fec::Auto.parity_for(0.0001, 360), 0);
        let (low, one, five) = (Fec::Auto.parity_for(0.001, 360), Fec::Auto.parity_for(0.01, 360), Fec::Auto.parity_for(0.05, 360));
        assert!(0 < low && low < one && one < five && five <= MAX_GROUP_PARITY, "{low} {one} {five}");
        // As docs/architecture.md states them: a large group needs less
        // parity for its size than a small one.
        assert_eq!((low, one), (8, 26));
        assert_eq!((Fec::Auto.parity_for(0.001, 32), Fec::Auto.parity_for(0.01, 32)), (4, 8));
        assert_eq!(Fec::Auto.parity_for(0.5, MAX_DATA_PER_GROUP), MAX_GROUP_PARITY, "capped");
        assert_eq!(Fec::Off.parity_for(0.5, 360), 0);
        assert_eq!(Fec::Parity(3).parity_for(0.0, 32), 3);
        assert_eq!(Fec::Parity(3).parity_for(0.0, 360), 34, "3 per 32, rounded up");
        assert_eq!(Fec::Parity(16).parity_for(0.0, MAX_DATA_PER_GROUP), MAX_GROUP_PARITY, "capped");
        assert_eq!(Fec::Parity(1).parity_for(0.0, 5), 1);
        assert_eq!("auto".parse(), Ok(Fec::Auto));
        assert_eq!("4".parse(), Ok(Fec::Parity(4)));
        assert_eq!("0".parse(), Ok(Fec::Off));
        assert!("17".parse::<Fec>().is_err());
    }

    #[test]
    fn shard_size_fits_the_datagram() {
        assert_eq!(shard_size(1200), Some((1200 - PARITY_HEADER_LEN) & !1));
        assert_eq!(shard_size(50), None);
        let s = shard_size(1452).unwrap();
        assert!(s % 2 == 0 && s + PARITY_HEADER_LEN <= 1452);
    }
}
