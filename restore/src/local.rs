//! Restoring from the local store: the page index walked in page order on
//! two threads (reading, checking and decoding pages is CPU work), each
//! page decoded straight into a write buffer, consecutive pages written
//! in one positioned write of up to 1 MiB by one writer thread (writers
//! of one file serialize on its inode lock in the kernel, and two of them
//! spend more time contending than writing).

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::{Receiver, Sender};
use remus_store::{Manifest, Store, StoreError};
use remus_types::{ChunkId, GuestId, Pfn, PAGE_SIZE};

use crate::{PagesWritten, RestoreError, RestoreSource, SegmentFiles, Target};

impl RestoreSource for Store {
    fn resolve(&self, guest: GuestId, target: Target) -> Result<Manifest, RestoreError> {
        let no = || RestoreError::NoMatch { guest, target };
        let epoch = match target {
            Target::Epoch(e) => e,
            Target::At(t) => self.epoch_at(guest, t)?.ok_or_else(no)?,
            Target::Latest => self.head(guest)?.ok_or_else(no)?.epoch,
        };
        match self.manifest(guest, epoch) {
            Err(StoreError::NoEpoch { .. }) => Err(no()),
            r => Ok(r?),
        }
    }

    fn device_state(&self, m: &Manifest) -> Result<Vec<u8>, RestoreError> {
        Ok(self.chunk(&m.device_state)?)
    }

    fn write_pages(
        &self,
        guest: GuestId,
        m: &Manifest,
        files: &SegmentFiles<'_>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<PagesWritten, RestoreError> {
        let done = AtomicU64::new(0);
        let half = m.page_count / 2;
        let (filled, to_write) = crossbeam_channel::bounded::<(usize, u64, Vec<u8>)>(4);
        let (emptied, pool) = crossbeam_channel::unbounded::<Vec<u8>>();
        let work = |range: std::ops::Range<u64>,
                    out: Sender<(usize, u64, Vec<u8>)>,
                    report: &mut dyn FnMut(u64, u64)|
         -> Result<Vec<(Pfn, ChunkId)>, StoreError> {
            let zero = remus_types::zero_page_hash();
            let mut ids = Vec::new();
            // Consecutive pages go out in one write of up to 1 MiB: a write
            // per page costs more in the kernel than reading and checking it.
            let mut run = RunWriter { files, seg: 0, start: 0, buf: Vec::with_capacity(RunWriter::MAX), out, pool: pool.clone() };
            self.for_each_page_in(guest, m.epoch, range, |pfn, id| {
                if pfn.0 >= m.page_count {
                    return Err(StoreError::malformed("page index", format!("names pfn {} beyond memory", pfn.0)));
                }
                ids.push((pfn, id));
                if id != zero {
                    // Decoded straight into the write buffer.
                    run.put_with(pfn.0, |buf| self.chunk_into(&id, buf))?;
                }
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if n % 4096 == 0 {
                    report(n, m.page_count);
                }
                Ok(())
            })?;
            run.flush().map_err(|cause| StoreError::Io { what: "writing the restored image", cause })?;
            Ok(ids)
        };
        let (low, high, wrote) = std::thread::scope(|s| {
            let writer = s.spawn(move || -> std::io::Result<()> {
                for (seg, start, mut buf) in to_write {
                    files.write(seg, start, &buf)?;
                    buf.clear();
                    // The pool outlives the writer only while decoders run.
                    let _ = emptied.send(buf);
                }
                Ok(())
            });
            let out = filled.clone();
            let high = s.spawn(|| work(half..u64::MAX, out, &mut |_, _| {}));
            let low = work(0..half, filled, progress);
            let high = high.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            (low, high, writer.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        });
        // A failed write stops the writer; decoders then fail to hand it
        // buffers, so its own error is the one to report.
        wrote?;
        let mut table = low?;
        table.extend(high?);
        let written = done.load(Ordering::Relaxed);
        progress(written, m.page_count);
        Ok(PagesWritten { written, table })
    }
}

/// Gathers consecutive pages of one segment into one buffer of up to
/// 1 MiB, handed to the writer thread as one positioned write.
struct RunWriter<'a, 'p> {
    files: &'a SegmentFiles<'p>,
    /// Segment of the run, and the run's first byte in its file.
    seg: usize,
    start: u64,
    buf: Vec<u8>,
    out: Sender<(usize, u64, Vec<u8>)>,
    /// Buffers the writer is done with, for reuse.
    pool: Receiver<Vec<u8>>,
}

impl RunWriter<'_, '_> {
    const MAX: usize = 1 << 20;

    /// Adds page `pfn`, which `fill` appends to the buffer (nothing when
    /// the page is in no segment).
    fn put_with(&mut self, pfn: u64, fill: impl FnOnce(&mut Vec<u8>) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let Some((seg, at)) = self.files.locate(pfn) else { return Ok(()) };
        let contiguous = seg == self.seg && self.start + self.buf.len() as u64 == at;
        if self.buf.len() >= Self::MAX || (!self.buf.is_empty() && !contiguous) {
            self.flush().map_err(|cause| StoreError::Io { what: "writing the restored image", cause })?;
        }
        if self.buf.is_empty() {
            self.seg = seg;
            self.start = at;
        }
        let before = self.buf.len();
        fill(&mut self.buf)?;
        if self.buf.len() - before != PAGE_SIZE {
            let got = self.buf.len() - before;
            self.buf.truncate(before);
            return Err(StoreError::malformed(format!("page {pfn}"), format!("content of {got} bytes, not a page")));
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let next = self.pool.try_recv().unwrap_or_else(|_| Vec::with_capacity(Self::MAX));
            let full = std::mem::replace(&mut self.buf, next);
            self.out.send((self.seg, self.start, full)).map_err(|_| std::io::Error::other("the image writer stopped"))?;
        }
        Ok(())
    }
}
