//! A virtual machine's checkpoint as the files QEMU resumes from (memory,
//! disk image, device state, `machine.json`), written or served lazily:
//! what failover, `remus-restore --run` and `--mount` share, for a local
//! store or the S3 tier alike.

use std::path::{Path, PathBuf};

use remus_types::PAGE_SIZE;
use remus_vm::{QemuState, RunDir, VmError};

use crate::{MountContent, MountFile, RestoreError, RestorePlan, RestoreReport, RestoreSource, Segment};

/// A restored VM: its state, run directory, and what the restore did.
pub type RestoredVm = (QemuState, RunDir, RestoreReport);

/// Writes the checkpoint `plan` names into `dir` as the files QEMU resumes
/// from (memory, disk image, device state) when it is a QEMU guest's;
/// `None` for other guests.
///
/// # Errors
/// Store damage, a failed write, or a memory root that does not verify.
pub fn restore_vm<S: RestoreSource + ?Sized>(
    source: &S,
    plan: &RestorePlan,
    dir: &Path,
    progress: impl FnMut(u64, u64),
) -> Result<Option<RestoredVm>, RestoreError> {
    let ds = source.device_state(&plan.manifest)?;
    let Some(state) = QemuState::decode(&ds)? else { return Ok(None) };
    let run = RunDir::create(dir)?;
    let segs = state.segments(&run);
    let segments: Vec<Segment<'_>> =
        segs.iter().map(|(first, pages, path)| Segment { first: *first, pages: *pages, path, offset: 0 }).collect();
    let report = plan.execute_segments(source, &segments, progress)?;
    state.finish_files(&run)?;
    Ok(Some((state, run, report)))
}

/// The files of an epoch served lazily (see [`RestorePlan::mount`]): for a
/// QEMU guest the same files [`restore_vm`] writes, with its state;
/// for any other guest its memory image as `memory`.
///
/// # Errors
/// A damaged device state header.
pub fn mount_files(device_state: &[u8], page_count: u64) -> Result<(Option<QemuState>, Vec<MountFile>), VmError> {
    let page = PAGE_SIZE as u64;
    let Some(state) = QemuState::decode(device_state)? else {
        let memory = MountFile { name: "memory".into(), content: MountContent::Pages { first: 0, len: page_count * page } };
        return Ok((None, vec![memory]));
    };
    let names = RunDir { dir: PathBuf::new() };
    let mut files: Vec<MountFile> = state
        .segments(&names)
        .into_iter()
        .map(|(first, pages, path)| {
            let len = if path == names.vmstate() { state.vmstate_len } else { pages * page };
            MountFile { name: path.to_string_lossy().into_owned(), content: MountContent::Pages { first, len } }
        })
        .collect();
    files.push(MountFile { name: names.machine().to_string_lossy().into_owned(), content: MountContent::Bytes(state.machine_json()) });
    Ok((Some(state), files))
}
