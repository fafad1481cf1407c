//! Compliance archives: a copy of the tier in a bucket with Object Lock,
//! every object version locked in COMPLIANCE mode until a date, so no
//! one (not even the bucket's owner) can delete or overwrite it before.

use std::collections::HashSet;

use super::{S3Error, S3Tier};
use crate::error::StoreError;

/// What an archive run copied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArchiveReport {
    /// Objects copied.
    pub copied: u64,
    /// Objects the archive already held.
    pub present: u64,
    /// Bytes copied.
    pub bytes: u64,
    /// The lock's end (Unix seconds).
    pub retain_until_unix_s: i64,
}

impl S3Tier {
    /// Copies every object of this tier that `archive` lacks into it,
    /// locked in COMPLIANCE mode for `retain_days` days. The archive's
    /// bucket must have Object Lock enabled.
    ///
    /// # Errors
    /// S3 errors (a bucket without Object Lock refuses the locked puts).
    pub fn archive_to(&self, archive: &S3Tier, retain_days: u32, progress: &mut dyn FnMut(u64, u64)) -> Result<ArchiveReport, StoreError> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let until = i64::try_from(now).unwrap_or(i64::MAX) + i64::from(retain_days) * 86_400;
        let mut r = ArchiveReport { retain_until_unix_s: until, ..ArchiveReport::default() };
        let mut have = HashSet::new();
        let mut todo = Vec::new();
        // Packs and indexes first, the history's objects last: whatever
        // part of the archive exists is restorable.
        for dir in ["packs/", "index/", "bridges/", "checkpoints/", "epochs/", "segments/"] {
            have.extend(archive.client.list(dir)?.into_iter().map(|l| l.key));
            todo.extend(self.client.list(dir)?.into_iter().map(|l| l.key));
        }
        let total = todo.len() as u64;
        for (i, key) in todo.iter().enumerate() {
            if have.contains(key) {
                r.present += 1;
            } else {
                let body = self.client.get(key)?;
                r.bytes += body.len() as u64;
                archive.client.put_locked(key, body, until).map_err(|e| match e {
                    S3Error::Service { detail, .. } if detail.contains("InvalidRequest") => S3Error::Config(format!(
                        "archive bucket {} refused a locked object (is Object Lock enabled on it?): {detail}",
                        archive.client.bucket()
                    )),
                    e => e,
                })?;
                r.copied += 1;
            }
            progress(i as u64 + 1, total);
        }
        Ok(r)
    }
}
