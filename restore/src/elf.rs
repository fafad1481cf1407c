//! An epoch as an ELF core file, for debuggers: `remus-restore --format
//! elf-core`.
//!
//! Layout (ELF64, little-endian, `ET_CORE`):
//! ```text
//! ELF header | program headers: one PT_NOTE, one PT_LOAD per memory range, then
//!              (with a kernel's note) one per range's part in the kernel image's mapping
//! note "REMUS" (type NT_REMUS): JSON naming guest, epoch, time, manifest, memory root
//! note "CORE" (NT_PRSTATUS) per vCPU of a QEMU guest: its registers
//! note "VMCOREINFO" (type 0), when the guest's memory holds a Linux kernel's
//! padding to a page (room for the largest notes and loads is kept whether or not)
//! each range's pages, in order, page-aligned (pages never written are holes)
//! ```
//! Each `PT_LOAD` has `p_paddr` = `p_vaddr` = the range's address: for a
//! QEMU guest its guest-physical address (RAM below 4 GiB, and the rest
//! from 4 GiB, as `dump-guest-memory` lays it out and as `remus-vm` knows
//! the machine's map), for the arena guest its offset in the arena. So
//! `gdb -c FILE` reads any byte of the guest at the address it had, and
//! `readelf -l` lists the ranges. The disk and device-state pages of a
//! VM's page space are not memory and stay out.
//!
//! A Linux guest's kernel keeps its own crash-dump note in memory (the
//! `vmcoreinfo_note` of `kernel/crash_core.c`, page-aligned: its release,
//! the addresses of the symbols a dump reader needs, `phys_base` and the
//! KASLR offset). The core carries a copy of it, found by its header at
//! the start of a page, so the `crash` utility opens the core with the
//! kernel's `vmlinux` and nothing else. `p_align` of every `PT_LOAD` is 0,
//! as in the kernel's own `/proc/vmcore`: `crash` takes a core laid out so
//! for a kdump and then relocates the kernel's symbols by the note's
//! KASLR offset (with a page alignment it reads a "netdump" and needs
//! `--kaslr`). A guest could forge such a page; two different notes found
//! leave both out (the core still opens in gdb), and a forged one only
//! misleads a reader of that guest's own dump.
//!
//! The pages are written and verified by the one restore plan (every page
//! against its id, the memory root over the whole page space), into the
//! segments of the one file.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use remus_types::{ChunkId, Pfn, PAGE_SIZE};

use crate::{RestoreError, RestorePlan, RestoreReport, RestoreSource, Segment};

/// Note type of the note that names the epoch ("REMU").
pub const NT_REMUS: u32 = 0x554d_4552;
const NOTE_NAME: &[u8] = b"REMUS";
/// The kernel's crash-dump note: its name ...
const VMCOREINFO: &[u8] = b"VMCOREINFO";
/// ... as it lies in a note (its NUL and padding) ...
const VMCOREINFO_NAME: &[u8; 12] = b"VMCOREINFO\0\0";
/// ... the first key of its text ...
const VMCOREINFO_FIRST: &[u8] = b"OSRELEASE=";
/// ... and the most text it holds (the kernel's `VMCOREINFO_BYTES`).
const VMCOREINFO_MAX: usize = PAGE_SIZE;
/// A note's header: name size, description size, type.
const NOTE_HEADER: usize = 12;
/// Note type of a thread's (here a vCPU's) registers.
const NT_PRSTATUS: u32 = 1;
/// `struct elf_prstatus` on x86-64.
const PRSTATUS_LEN: usize = 336;
/// An `NT_PRSTATUS` note: header, "CORE" padded, the structure.
const PRSTATUS_NOTE: usize = NOTE_HEADER + 8 + PRSTATUS_LEN;
const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const ET_CORE: u16 = 4;
/// Read, write, execute: guest memory holds code and data alike.
const PF_RWX: u32 = 7;
const PF_R: u32 = 4;

#[cfg(target_arch = "aarch64")]
const MACHINE: u16 = 183; // EM_AARCH64
#[cfg(not(target_arch = "aarch64"))]
const MACHINE: u16 = 62; // EM_X86_64

/// A range of guest memory in the core: `pages` pages of the page space
/// from `first`, at guest address `address`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRange {
    /// First page of the page space.
    pub first: u64,
    /// Pages.
    pub pages: u64,
    /// The guest address of its first byte.
    pub address: u64,
}

/// What a core of the plan's epoch holds: its memory as ranges of the
/// page space, and for a QEMU guest where its device-state stream lies
/// (the vCPUs' registers are read from it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreLayout {
    /// The memory.
    pub ranges: Vec<MemoryRange>,
    /// QEMU's device state: its first page, its length in bytes, and the
    /// vCPUs it holds.
    pub device_stream: Option<DeviceStream>,
}

/// Where a QEMU guest's device-state stream lies in its page space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStream {
    /// First page.
    pub first: u64,
    /// Length in bytes.
    pub len: u64,
    /// vCPUs of the machine.
    pub cpus: u32,
}

/// The layout of a core of the plan's epoch: a QEMU guest's RAM at its
/// guest-physical addresses (its machine's map, see `remus-vm`) and its
/// device-state stream, any other guest's whole page space from address 0.
///
/// # Errors
/// The tier's errors; a device state that names a QEMU guest but does not
/// decode.
pub fn layout<S: RestoreSource + ?Sized>(plan: &RestorePlan, source: &S) -> Result<CoreLayout, RestoreError> {
    Ok(match remus_vm::QemuState::decode(&source.device_state(&plan.manifest)?)? {
        Some(s) => CoreLayout {
            ranges: s.machine.ram_ranges().into_iter().map(|(first, pages, address)| MemoryRange { first, pages, address }).collect(),
            device_stream: Some(DeviceStream { first: s.vmstate_pfn(), len: s.vmstate_len, cpus: s.machine.cpus }),
        },
        None => CoreLayout { ranges: vec![MemoryRange { first: 0, pages: plan.manifest.page_count, address: 0 }], device_stream: None },
    })
}

/// What [`write_core`] did.
#[derive(Debug, Clone)]
pub struct CoreReport {
    /// The pages written and the memory root verified.
    pub restore: RestoreReport,
    /// The guest kernel's crash-dump note, copied into the core or not.
    pub vmcoreinfo: Vmcoreinfo,
    /// vCPUs whose registers the core carries (`NT_PRSTATUS`): all of a
    /// QEMU guest's when its device state holds them as expected, else 0.
    pub registers: usize,
}

/// The guest kernel's crash-dump note (VMCOREINFO) in a core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vmcoreinfo {
    /// No page of the guest starts with one (not a Linux guest, or a
    /// kernel built without crash support).
    Absent,
    /// Copied into the core; the kernel's release, from the note.
    Kept {
        /// `OSRELEASE` of the note.
        release: String,
    },
    /// Pages holding different notes: none copied, since which is the
    /// running kernel's cannot be told.
    Ambiguous {
        /// Different notes found.
        notes: usize,
    },
}

/// Writes the plan's epoch as an ELF core at `path` as `layout` says;
/// `progress(done, total)` as pages are written.
///
/// # Errors
/// As [`RestorePlan::execute`]; [`RestoreError::Io`] for a range outside
/// the page space.
pub fn write_core<S: RestoreSource + ?Sized>(
    plan: &RestorePlan,
    source: &S,
    layout: &CoreLayout,
    path: &Path,
    progress: impl FnMut(u64, u64),
) -> Result<CoreReport, RestoreError> {
    let m = &plan.manifest;
    let ranges = &layout.ranges;
    let stream = layout.device_stream.map(|d| MemoryRange { first: d.first, pages: d.len.div_ceil(PAGE_SIZE as u64), address: 0 });
    if let Some(r) = ranges.iter().chain(&stream).find(|r| r.first.checked_add(r.pages).is_none_or(|end| end > m.page_count)) {
        return Err(RestoreError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("memory range of {} pages from page {} lies beyond the guest's {} pages", r.pages, r.first, m.page_count),
        )));
    }
    let mut notes = note(plan);
    // Room for a second load of each range: its part in the kernel image's
    // mapping, when a Linux kernel's note says where that is.
    let headers = EHDR_LEN + PHDR_LEN * (1 + 2 * ranges.len());
    let cpus = layout.device_stream.map_or(0, |d| d.cpus as usize);
    let room = cpus * PRSTATUS_NOTE + NOTE_HEADER + VMCOREINFO_NAME.len() + VMCOREINFO_MAX;
    let data_start = (headers + notes.len() + room).next_multiple_of(PAGE_SIZE) as u64;
    let mut offsets = Vec::with_capacity(ranges.len());
    let mut at = data_start;
    for r in ranges {
        offsets.push(at);
        at += r.pages * PAGE_SIZE as u64;
    }
    let mut segments: Vec<Segment<'_>> =
        ranges.iter().zip(&offsets).map(|(r, &offset)| Segment { first: r.first, pages: r.pages, path, offset }).collect();
    // The device state goes after the memory for a moment: read back for
    // the registers, then cut off (it is not memory).
    let end = at;
    if let Some(r) = stream {
        segments.push(Segment { first: r.first, pages: r.pages, path, offset: end });
    }
    let (restore, table) = plan.write_segments(source, &segments, progress)?;
    let f = OpenOptions::new().read(true).write(true).open(path)?;
    let mut registers = 0;
    if let Some(d) = layout.device_stream {
        let mut bytes = vec![0u8; usize::try_from(d.len).expect("a device state in memory")];
        f.read_exact_at(&mut bytes, end)?;
        f.set_len(end)?;
        segments.pop();
        if let Some(vcpus) = remus_vm::cpu::x86_registers(&bytes, cpus) {
            for (i, r) in vcpus.iter().enumerate() {
                notes.extend_from_slice(&prstatus_note(i, r));
            }
            registers = vcpus.len();
        }
    }
    let mut loads: Vec<Load> = ranges
        .iter()
        .zip(&offsets)
        .map(|(r, &offset)| Load { offset, vaddr: r.address, paddr: r.address, len: r.pages * PAGE_SIZE as u64 })
        .collect();
    let vmcoreinfo = match find_vmcoreinfo(&f, &segments, &table)?.as_slice() {
        [] => Vmcoreinfo::Absent,
        [text] => {
            // As the kernel writes it.
            notes.extend_from_slice(&elf_note(VMCOREINFO, 0, text));
            if let Some(image) = KernelImage::of(text) {
                let image_loads: Vec<_> = loads.iter().filter_map(|&l| image.load(l)).collect();
                loads.extend(image_loads);
            }
            let release = text[VMCOREINFO_FIRST.len()..].split(|&b| b == b'\n').next().unwrap_or_default();
            Vmcoreinfo::Kept { release: String::from_utf8_lossy(release).into_owned() }
        }
        several => Vmcoreinfo::Ambiguous { notes: several.len() },
    };
    let mut head = Vec::with_capacity(headers + notes.len());
    ehdr(&mut head, 1 + loads.len());
    phdr(&mut head, PT_NOTE, PF_R, headers as u64, 0, 0, notes.len() as u64, 0, 1);
    for l in &loads {
        phdr(&mut head, PT_LOAD, PF_RWX, l.offset, l.vaddr, l.paddr, l.len, l.len, 0);
    }
    head.resize(headers, 0);
    head.extend_from_slice(&notes);
    f.write_all_at(&head, 0)?;
    if plan.sync {
        f.sync_all()?;
    }
    Ok(CoreReport { restore, vmcoreinfo, registers })
}

/// A `PT_LOAD`: `len` bytes of the file from `offset`, at virtual address
/// `vaddr` and guest-physical `paddr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Load {
    offset: u64,
    vaddr: u64,
    paddr: u64,
    len: u64,
}

/// Where an x86-64 Linux kernel maps its own image: virtual
/// `__START_KERNEL_map` (0xffffffff80000000) + physical − `phys_base`, for
/// `KERNEL_IMAGE_SIZE` bytes (both from its VMCOREINFO). A second load of
/// guest RAM at those addresses lets gdb read the kernel's text and data
/// by their symbols (`p jiffies`, a backtrace on a stack in the image)
/// where the first load gives it guest-physical addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KernelImage {
    phys_base: i128,
    size: i128,
}

impl KernelImage {
    const START: i128 = 0xffff_ffff_8000_0000;

    /// From a VMCOREINFO text; `None` without `NUMBER(phys_base)`.
    fn of(text: &[u8]) -> Option<Self> {
        let number = |key: &str| {
            text.split(|&b| b == b'\n')
                .find_map(|l| l.strip_prefix(key.as_bytes()))
                .and_then(|v| std::str::from_utf8(v).ok()?.parse::<i64>().ok())
        };
        let phys_base = number("NUMBER(phys_base)=")?;
        let size = number("NUMBER(KERNEL_IMAGE_SIZE)=").unwrap_or(1 << 30);
        Some(Self { phys_base: i128::from(phys_base), size: i128::from(size) })
    }

    /// The part of `load` the image mapping covers, as a load at the
    /// image's virtual addresses.
    fn load(self, load: Load) -> Option<Load> {
        let (start, end) = (i128::from(load.paddr), i128::from(load.paddr) + i128::from(load.len));
        let lo = start.max(self.phys_base);
        let hi = end.min(self.phys_base + self.size);
        (lo < hi).then(|| Load {
            offset: load.offset + u64::try_from(lo - start).expect("within the load"),
            vaddr: u64::try_from(lo - self.phys_base + Self::START).expect("in the top 2 GiB"),
            paddr: u64::try_from(lo).expect("physical"),
            len: u64::try_from(hi - lo).expect("a length"),
        })
    }
}

/// An `NT_PRSTATUS` note for vCPU `index` (x86-64 `struct elf_prstatus`,
/// 336 bytes: `pr_pid` at 32 is the vCPU's index + 1, so gdb shows one
/// thread per vCPU; `pr_reg`, a `user_regs_struct`, at 112).
fn prstatus_note(index: usize, r: &remus_vm::cpu::X86Registers) -> Vec<u8> {
    let g = &r.gpr;
    let [es, cs, ss, ds, fs, gs] = r.segments;
    // user_regs_struct: r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx
    // rsi rdi orig_rax rip cs eflags rsp ss fs_base gs_base ds es fs gs;
    // QEMU's order is rax rcx rdx rbx rsp rbp rsi rdi r8..r15.
    let regs = [
        g[15],
        g[14],
        g[13],
        g[12],
        g[5],
        g[3],
        g[11],
        g[10],
        g[9],
        g[8],
        g[0],
        g[1],
        g[2],
        g[6],
        g[7],
        u64::MAX,
        r.rip,
        u64::from(cs.0),
        r.rflags,
        g[4],
        u64::from(ss.0),
        fs.1,
        gs.1,
        u64::from(ds.0),
        u64::from(es.0),
        u64::from(fs.0),
        u64::from(gs.0),
    ];
    let mut desc = vec![0u8; PRSTATUS_LEN];
    desc[32..36].copy_from_slice(&u32::try_from(index + 1).unwrap_or(u32::MAX).to_le_bytes());
    for (i, v) in regs.iter().enumerate() {
        desc[112 + i * 8..120 + i * 8].copy_from_slice(&v.to_le_bytes());
    }
    elf_note(b"CORE", NT_PRSTATUS, &desc)
}

/// The texts of the distinct VMCOREINFO notes that start a page of the
/// core's ranges (`table`: the pages written, read back from `f`), each
/// whole within its range and well formed: `OSRELEASE=` first, printable
/// lines, at most [`VMCOREINFO_MAX`] bytes.
fn find_vmcoreinfo(f: &std::fs::File, segments: &[Segment<'_>], table: &[(Pfn, ChunkId)]) -> std::io::Result<Vec<Vec<u8>>> {
    let mut found: Vec<Vec<u8>> = Vec::new();
    let mut head = [0u8; NOTE_HEADER + 12 + 10];
    for &(pfn, _) in table {
        let Some(s) = segments.iter().find(|s| s.holds(pfn.0)) else { continue };
        let at = s.offset + (pfn.0 - s.first) * PAGE_SIZE as u64;
        f.read_exact_at(&mut head, at)?;
        let word = |i: usize| u32::from_le_bytes(head[i * 4..i * 4 + 4].try_into().expect("4 bytes")) as usize;
        let (name, desc, kind) = (word(0), word(1), word(2));
        if name != 11
            || kind != 0
            || &head[NOTE_HEADER..NOTE_HEADER + 12] != VMCOREINFO_NAME
            || !head[NOTE_HEADER + 12..].starts_with(VMCOREINFO_FIRST)
        {
            continue;
        }
        let start = at + (NOTE_HEADER + VMCOREINFO_NAME.len()) as u64;
        if desc > VMCOREINFO_MAX || start + desc as u64 > s.end() {
            continue;
        }
        let mut text = vec![0u8; desc];
        f.read_exact_at(&mut text, start)?;
        if text.iter().all(|&b| b == b'\n' || (b' '..=b'~').contains(&b)) && !found.contains(&text) {
            found.push(text);
        }
    }
    Ok(found)
}

/// An ELF note: name size (with its NUL), description size, type, then
/// `name` and `desc`, each padded to four bytes with zeros.
fn elf_note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(NOTE_HEADER + name.len() + desc.len() + 8);
    out.extend_from_slice(&u32::try_from(name.len() + 1).expect("a short name").to_le_bytes());
    out.extend_from_slice(&u32::try_from(desc.len()).expect("a note under 4 GiB").to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(name);
    out.push(0);
    out.resize(out.len().next_multiple_of(4), 0);
    out.extend_from_slice(desc);
    out.resize(out.len().next_multiple_of(4), 0);
    out
}

fn ehdr(out: &mut Vec<u8>, phnum: usize) {
    out.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&ET_CORE.to_le_bytes());
    out.extend_from_slice(&MACHINE.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes()); // e_version
    out.extend_from_slice(&0u64.to_le_bytes()); // e_entry
    out.extend_from_slice(&(EHDR_LEN as u64).to_le_bytes()); // e_phoff
    out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    out.extend_from_slice(&(EHDR_LEN as u16).to_le_bytes());
    out.extend_from_slice(&(PHDR_LEN as u16).to_le_bytes());
    out.extend_from_slice(&u16::try_from(phnum).expect("fewer than 65535 ranges").to_le_bytes());
    out.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
}

#[allow(clippy::too_many_arguments)] // the eight fields of an ELF program header
fn phdr(out: &mut Vec<u8>, kind: u32, flags: u32, offset: u64, vaddr: u64, paddr: u64, filesz: u64, memsz: u64, align: u64) {
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    for v in [offset, vaddr, paddr, filesz, memsz, align] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// The note naming the epoch: its JSON.
fn note(plan: &RestorePlan) -> Vec<u8> {
    let m = &plan.manifest;
    let desc = serde_json::json!({
        "guest": plan.guest.0, "epoch": m.epoch.0, "time_unix_ns": m.time_unix_ns, "generation": m.generation,
        "manifest": m.id().to_hex(), "memory_root": m.memory_root.to_hex(), "page_count": m.page_count,
    })
    .to_string();
    elf_note(NOTE_NAME, NT_REMUS, desc.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Target;
    use remus_store::{Store, StoreOptions};
    use remus_types::{EpochId, GuestId};

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// The program headers of a core: (type, offset, address, size); every
    /// load has `p_align` 0 (read by `crash` as a kdump).
    fn headers(core: &[u8]) -> Vec<(u32, u64, u64, u64)> {
        assert_eq!(&core[..6], &[0x7f, b'E', b'L', b'F', 2, 1], "64-bit little-endian ELF");
        assert_eq!(u16_at(core, 16), ET_CORE);
        let (phoff, phnum) = (u64_at(core, 32) as usize, usize::from(u16_at(core, 56)));
        (0..phnum)
            .map(|i| {
                let h = &core[phoff + i * PHDR_LEN..][..PHDR_LEN];
                if u64_at(h, 16) < 0xffff_ffff_8000_0000 {
                    assert_eq!(u64_at(h, 16), u64_at(h, 24), "paddr = vaddr outside the kernel image's mapping");
                }
                if u32::from_le_bytes(h[..4].try_into().unwrap()) == PT_LOAD {
                    assert_eq!(u64_at(h, 48), 0, "p_align of a load");
                }
                (u32::from_le_bytes(h[..4].try_into().unwrap()), u64_at(h, 8), u64_at(h, 16), u64_at(h, 32))
            })
            .collect()
    }

    #[test]
    fn a_core_holds_each_range_at_its_address_byte_exact_and_names_the_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), StoreOptions::default()).unwrap();
        let images = crate::tests::history(&store);
        let plan = RestorePlan::new(&store, GuestId(1), Target::Epoch(EpochId(4))).unwrap();
        let image = &images[3];
        // Two ranges, the second at an address of its own (as RAM above 4 GiB).
        let ranges = [MemoryRange { first: 0, pages: 60, address: 0 }, MemoryRange { first: 60, pages: 40, address: 1 << 32 }];
        let path = dir.path().join("core");
        let report = write_core(&plan, &store, &CoreLayout { ranges: ranges.to_vec(), device_stream: None }, &path, |_, _| {}).unwrap();
        assert_eq!(report.restore.root, plan.manifest.memory_root, "verified over the whole page space");
        assert_eq!(report.vmcoreinfo, Vmcoreinfo::Absent);
        let core = std::fs::read(&path).unwrap();
        let h = headers(&core);
        assert_eq!(h.len(), 3);
        let (kind, note_at, _, note_len) = h[0];
        assert_eq!(kind, PT_NOTE);
        let note = &core[note_at as usize..][..note_len as usize];
        assert_eq!(&note[12..17], b"REMUS");
        let desc: serde_json::Value =
            serde_json::from_slice(&note[20..20 + u32::from_le_bytes(note[4..8].try_into().unwrap()) as usize]).unwrap();
        assert_eq!((desc["epoch"].as_u64(), desc["manifest"].as_str()), (Some(4), Some(plan.manifest.id().to_hex().as_str())));
        for (range, &(kind, offset, address, len)) in ranges.iter().zip(&h[1..]) {
            assert_eq!((kind, address, len), (PT_LOAD, range.address, range.pages * PAGE_SIZE as u64));
            assert_eq!(offset % PAGE_SIZE as u64, 0, "page-aligned");
            let want = &image[range.first as usize * PAGE_SIZE..][..len as usize];
            assert!(core[offset as usize..][..len as usize] == *want, "range at {address:#x} byte-exact");
        }
        // A range beyond the guest is refused before anything is written.
        let beyond = [MemoryRange { first: 90, pages: 20, address: 0 }];
        let beyond = CoreLayout { ranges: beyond.to_vec(), device_stream: None };
        assert!(write_core(&plan, &store, &beyond, &dir.path().join("bad"), |_, _| {}).is_err());
        assert!(!dir.path().join("bad").exists());
    }

    /// The notes of a core's PT_NOTE: (name, type, description).
    fn notes(core: &[u8]) -> Vec<(Vec<u8>, u32, Vec<u8>)> {
        let (_, at, _, len) = headers(core)[0];
        let mut b = &core[at as usize..][..len as usize];
        let mut out = Vec::new();
        while !b.is_empty() {
            let word = |i: usize| u32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().unwrap()) as usize;
            let (name, desc, kind) = (word(0), word(1), word(2) as u32);
            let desc_at = 12 + name.next_multiple_of(4);
            out.push((b[12..12 + name].to_vec(), kind, b[desc_at..desc_at + desc].to_vec()));
            b = &b[desc_at + desc.next_multiple_of(4)..];
        }
        out
    }

    /// A page holding a kernel's VMCOREINFO note with `text`, `at` bytes in.
    fn kernel_note(text: &str, at: usize) -> Vec<u8> {
        let mut page = vec![0u8; PAGE_SIZE];
        page[at..at + 12].copy_from_slice(&[11, 0, 0, 0, text.len() as u8, (text.len() >> 8) as u8, 0, 0, 0, 0, 0, 0]);
        page[at + 12..at + 24].copy_from_slice(b"VMCOREINFO\0\0");
        page[at + 24..at + 24 + text.len()].copy_from_slice(text.as_bytes());
        page
    }

    /// Commits epoch `epoch` of a 64-page guest writing `pages` into `mem`.
    fn commit(store: &Store, epoch: u64, mem: &mut [u8], pages: &[(u64, Vec<u8>)]) {
        let mut c = remus_store::EpochCommit {
            guest: GuestId(1),
            epoch: EpochId(epoch),
            page_count: 64,
            time_unix_ns: epoch,
            ..Default::default()
        };
        for (pfn, content) in pages {
            mem[*pfn as usize * PAGE_SIZE..][..PAGE_SIZE].copy_from_slice(content);
            let id = remus_types::content_id(content);
            c.pages.push((Pfn(*pfn), id));
            c.chunks.push((id, remus_store::StoredChunk::Plain(content.clone())));
        }
        c.memory_root = remus_types::MemoryDigest::of_image(mem);
        store.commit(c).unwrap();
    }

    #[test]
    fn the_kernel_image_mapping_covers_the_part_of_a_load_inside_it() {
        let image = KernelImage { phys_base: 0x400_0000, size: 0x100_0000 };
        // A load from physical 0 of 128 MiB at file offset 8192: its part
        // from 64 MiB for 16 MiB, at the image's start.
        let at = |offset, vaddr, paddr, len| Load { offset, vaddr, paddr, len };
        assert_eq!(image.load(at(8192, 0, 0, 128 << 20)), Some(at(8192 + 0x400_0000, 0xffff_ffff_8000_0000, 0x400_0000, 0x100_0000)));
        assert_eq!(image.load(at(8192, 0x1_0000_0000, 0x1_0000_0000, 1 << 20)), None, "above the image");
        let low = KernelImage { phys_base: -0xc60_0000, size: 1 << 30 };
        assert_eq!(low.load(at(4096, 0, 0, 1 << 20)), Some(at(4096, 0xffff_ffff_8c60_0000, 0, 1 << 20)));
        assert_eq!(
            KernelImage::of(b"OSRELEASE=x\nNUMBER(phys_base)=-207618048\n"),
            Some(KernelImage { phys_base: -207_618_048, size: 1 << 30 })
        );
        assert_eq!(KernelImage::of(b"OSRELEASE=x\n"), None);
    }

    #[test]
    fn a_kernels_vmcoreinfo_note_at_a_page_start_is_carried_and_two_different_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), StoreOptions::default()).unwrap();
        let text = "OSRELEASE=6.1.0-test\nPAGESIZE=4096\nNUMBER(phys_base)=-1048576\nKERNELOFFSET=fa00000\n";
        let mut mem = vec![0u8; 64 * PAGE_SIZE];
        // The kernel's note at the start of page 5; the same bytes 24 bytes
        // into page 9 (not a page start: not a note the kernel keeps); a
        // note whose text would run past the end of the last range.
        let mut spill = kernel_note("OSRELEASE=spill\n", 0);
        spill[4..8].copy_from_slice(&3000u32.to_le_bytes());
        commit(&store, 1, &mut mem, &[(5, kernel_note(text, 0)), (9, kernel_note("OSRELEASE=elsewhere\n", 24)), (63, spill)]);
        let ranges = [MemoryRange { first: 0, pages: 64, address: 0 }];
        let path = dir.path().join("core");
        let plan = RestorePlan::new(&store, GuestId(1), Target::Epoch(EpochId(1))).unwrap();
        let report = write_core(&plan, &store, &CoreLayout { ranges: ranges.to_vec(), device_stream: None }, &path, |_, _| {}).unwrap();
        assert_eq!(report.vmcoreinfo, Vmcoreinfo::Kept { release: "6.1.0-test".into() });
        let core = std::fs::read(&path).unwrap();
        let n = notes(&core);
        assert_eq!(n.len(), 2, "REMUS and VMCOREINFO");
        assert_eq!((n[1].0.as_slice(), n[1].1, n[1].2.as_slice()), (&b"VMCOREINFO\0"[..], 0, text.as_bytes()));
        let h = headers(&core);
        let (_, offset, _, _) = h[1];
        assert!(core[offset as usize..] == mem[..], "memory byte-exact after the larger header");
        // The kernel image's mapping, from phys_base: the same bytes again at
        // 0xffffffff80000000 + physical + 1 MiB.
        assert_eq!(h.len(), 3, "{h:?}");
        assert_eq!(h[2], (PT_LOAD, offset, 0xffff_ffff_8010_0000, 64 * PAGE_SIZE as u64));

        // A second, different note elsewhere: which one the kernel runs
        // with cannot be told, so neither is carried.
        commit(&store, 2, &mut mem, &[(20, kernel_note("OSRELEASE=forged\n", 0))]);
        let plan = RestorePlan::new(&store, GuestId(1), Target::Epoch(EpochId(2))).unwrap();
        let report = write_core(&plan, &store, &CoreLayout { ranges: ranges.to_vec(), device_stream: None }, &path, |_, _| {}).unwrap();
        assert_eq!(report.vmcoreinfo, Vmcoreinfo::Ambiguous { notes: 2 });
        let core = std::fs::read(&path).unwrap();
        assert_eq!(notes(&core).len(), 1, "the REMUS note alone");
        assert_eq!(headers(&core).len(), 2, "no kernel image mapping without the note");
    }
}
