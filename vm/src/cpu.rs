//! The vCPUs' registers, read from QEMU's device-state stream: what an ELF
//! core's `NT_PRSTATUS` notes carry, so that gdb and `crash` see where each
//! vCPU was when the epoch was taken.
//!
//! The stream (`QEVM`, version 3) is a run of sections with no lengths, so
//! it cannot be walked without decoding every device; an x86 vCPU is a
//! full section (`0x04`, section id u32, name length u8, `cpu`, instance
//! u32 = the vCPU's index, version u32 = 12), found by that header, vCPU
//! after vCPU. Its first fields (`vmstate_x86_cpu` in QEMU's
//! `target/i386/machine.c`), all big-endian:
//! ```text
//! regs[16] u64 (RAX RCX RDX RBX RSP RBP RSI RDI R8..R15) | rip u64 | rflags u64
//! hflags u32 | fpuc fpus fptag fpregs_format u16 | fpregs[8] (u64 + u16)
//! segs[6] (ES CS SS DS FS GS): selector u32, base u64, limit u32, flags u32
//! ```
//! Only these are read; what follows (system segments, control and debug
//! registers, vector state, subsections) is left alone.

/// The vmstate version of an x86 vCPU section this layout is read from.
const X86_CPU_VERSION: u32 = 12;
/// Where the segments start in the section: after the registers, rip,
/// rflags, hflags, the FPU words and registers.
const SEGMENTS_AT: usize = 16 * 8 + 8 + 8 + 4 + 4 * 2 + 8 * 10;
const SEGMENT: usize = 4 + 8 + 4 + 4;
/// Bytes of the section read: up to the end of the six segments.
const READ: usize = SEGMENTS_AT + 6 * SEGMENT;

/// One x86-64 vCPU's general registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct X86Registers {
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8 … R15 (QEMU's order).
    pub gpr: [u64; 16],
    /// Instruction pointer.
    pub rip: u64,
    /// Flags.
    pub rflags: u64,
    /// ES, CS, SS, DS, FS, GS: selector and base.
    pub segments: [(u32, u64); 6],
}

/// The registers of each vCPU in `stream` (QEMU's device state), in vCPU
/// order; `None` unless exactly `cpus` x86 vCPU sections of the version
/// this layout is read from are found whole.
#[must_use]
pub fn x86_registers(stream: &[u8], cpus: usize) -> Option<Vec<X86Registers>> {
    if stream.get(..4) != Some(b"QEVM") {
        return None;
    }
    let be32 = |at: usize| stream.get(at..at + 4).map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")));
    let mut found = Vec::with_capacity(cpus);
    let mut at = 8;
    while found.len() < cpus && at + 17 <= stream.len() {
        let header = stream[at] == 0x04
            && stream[at + 5] == 3
            && &stream[at + 6..at + 9] == b"cpu"
            && be32(at + 9) == u32::try_from(found.len()).ok()
            && be32(at + 13) == Some(X86_CPU_VERSION);
        if !header {
            at += 1;
            continue;
        }
        let fields = stream.get(at + 17..at + 17 + READ)?;
        found.push(decode(fields));
        at += 17 + READ;
    }
    (found.len() == cpus).then_some(found)
}

fn decode(f: &[u8]) -> X86Registers {
    let be64 = |at: usize| u64::from_be_bytes(f[at..at + 8].try_into().expect("8 bytes"));
    let be32 = |at: usize| u32::from_be_bytes(f[at..at + 4].try_into().expect("4 bytes"));
    let mut r = X86Registers { rip: be64(128), rflags: be64(136), ..X86Registers::default() };
    for (i, g) in r.gpr.iter_mut().enumerate() {
        *g = be64(i * 8);
    }
    for (i, s) in r.segments.iter_mut().enumerate() {
        let at = SEGMENTS_AT + i * SEGMENT;
        *s = (be32(at), be64(at + 4));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream: a timer section, then a vCPU section per entry of `cpus`
    /// (its registers, then some bytes of the rest), then a device whose
    /// data happens to hold the word "cpu".
    fn stream(cpus: &[X86Registers]) -> Vec<u8> {
        let mut s = b"QEVM\0\0\0\x03".to_vec();
        s.extend_from_slice(&[4, 0, 0, 0, 0, 5, b't', b'i', b'm', b'e', b'r', 0, 0, 0, 0, 0, 0, 0, 2]);
        s.extend_from_slice(&[0x11; 24]);
        s.extend_from_slice(&[0x7e, 0, 0, 0, 0]);
        for (i, r) in cpus.iter().enumerate() {
            s.extend_from_slice(&[4, 0, 0, 0, 4 + i as u8, 3, b'c', b'p', b'u']);
            s.extend_from_slice(&(i as u32).to_be_bytes());
            s.extend_from_slice(&X86_CPU_VERSION.to_be_bytes());
            for g in r.gpr {
                s.extend_from_slice(&g.to_be_bytes());
            }
            s.extend_from_slice(&r.rip.to_be_bytes());
            s.extend_from_slice(&r.rflags.to_be_bytes());
            s.extend_from_slice(&[0xAB; 4 + 8 + 80]);
            for (sel, base) in r.segments {
                s.extend_from_slice(&sel.to_be_bytes());
                s.extend_from_slice(&base.to_be_bytes());
                s.extend_from_slice(&[0xCD; 8]);
            }
            s.extend_from_slice(&[0xEF; 300]);
        }
        s.extend_from_slice(&[4, 0, 0, 0, 40, 6, b's', b'e', b'r', b'i', b'a', b'l', 0, 0, 0, 0, 0, 0, 0, 1, b'c', b'p', b'u']);
        s
    }

    fn vcpu(seed: u64) -> X86Registers {
        let mut r = X86Registers { rip: 0xffff_ffff_8100_0000 + seed, rflags: 0x246, ..X86Registers::default() };
        for (i, g) in r.gpr.iter_mut().enumerate() {
            *g = seed << 8 | i as u64;
        }
        for (i, s) in r.segments.iter_mut().enumerate() {
            *s = (i as u32 * 8, seed << 32 | i as u64);
        }
        r
    }

    #[test]
    fn each_vcpus_registers_are_read_from_its_section() {
        let cpus = [vcpu(1), vcpu(2)];
        let s = stream(&cpus);
        assert_eq!(x86_registers(&s, 2), Some(cpus.to_vec()));
        assert_eq!(x86_registers(&s, 1), Some(cpus[..1].to_vec()), "the first vCPUs");
        // Fewer sections than vCPUs, a stream cut inside a vCPU's fields,
        // an unknown version, not a QEMU stream: nothing.
        assert_eq!(x86_registers(&s, 3), None);
        let cut = s.iter().position(|&b| b == b'c').unwrap() + 20;
        assert_eq!(x86_registers(&s[..cut], 1), None);
        let mut other = s.clone();
        let v = cut - 20 + 3 + 4;
        other[v..v + 4].copy_from_slice(&11u32.to_be_bytes());
        assert_eq!(x86_registers(&other, 1), None);
        assert_eq!(x86_registers(&s[8..], 1), None);
    }
}
