//! The guest's disk, served by remus over NBD on a unix socket, so that
//! every write is seen and belongs to an epoch.
//!
//! QEMU's `nbd` block driver connects here; writes go to the raw image at
//! once (the primary runs ahead speculatively, as its memory does) and mark
//! their 4 KiB blocks dirty. QEMU's `stop` drains all block I/O before it
//! returns, and a write is acknowledged only after it is marked, so the
//! dirty set taken while the guest is paused holds exactly the writes of
//! the epoch. The backup applies them with the epoch's memory, never
//! before it commits.
//!
//! Protocol: fixed newstyle handshake with `NBD_OPT_GO` (and the old
//! `NBD_OPT_EXPORT_NAME`), simple replies only; commands READ, WRITE,
//! FLUSH (with FUA) and DISC. Anything else gets a clear NBD error.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use remus_types::PAGE_SIZE;

use remus_capture::CaptureError;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const INFO_EXPORT: u16 = 0;
const TX_HAS_FLAGS: u16 = 1;
const TX_SEND_FLUSH: u16 = 1 << 2;
const TX_SEND_FUA: u16 = 1 << 3;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_FLAG_FUA: u16 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
/// Largest request accepted (QEMU sends at most 32 MiB).
const MAX_REQUEST: u32 = 32 << 20;

/// Which 4 KiB blocks were written since the last [`DirtyBlocks::take`].
struct DirtyBlocks {
    words: Vec<u64>,
}

impl DirtyBlocks {
    fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / PAGE_SIZE as u64;
        let last = (offset + len - 1) / PAGE_SIZE as u64;
        for b in first..=last {
            self.words[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    fn take(&mut self, out: &mut Vec<u64>) {
        for (i, w) in self.words.iter_mut().enumerate() {
            let mut bits = std::mem::take(w);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                out.push(i as u64 * 64 + b);
                bits &= bits - 1;
            }
        }
    }
}

struct Shared {
    image: File,
    size: u64,
    dirty: Mutex<DirtyBlocks>,
    stop: AtomicBool,
}

/// An NBD server for one raw disk image.
pub struct DiskServer {
    shared: Arc<Shared>,
}

impl DiskServer {
    /// Serves `image` (its size must be whole 4 KiB blocks) on a new unix
    /// socket at `socket`, one client at a time, from a thread of its own.
    ///
    /// # Errors
    /// [`CaptureError::Io`] when the image or socket is unusable.
    pub fn start(image: File, socket: &Path) -> Result<Self, CaptureError> {
        let size = image.metadata().map_err(|e| CaptureError::Io(format!("disk image: {e}")))?.len();
        if size == 0 || size % PAGE_SIZE as u64 != 0 {
            return Err(CaptureError::Config(format!("disk image size {size} is not a positive multiple of 4096")));
        }
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).map_err(|e| CaptureError::Io(format!("NBD socket {}: {e}", socket.display())))?;
        let blocks = size / PAGE_SIZE as u64;
        let shared = Arc::new(Shared {
            image,
            size,
            dirty: Mutex::new(DirtyBlocks { words: vec![0; blocks.div_ceil(64) as usize] }),
            stop: AtomicBool::new(false),
        });
        let s2 = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("remus-nbd".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if s2.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match conn {
                        Ok(c) => {
                            if let Err(e) = serve(&s2, c) {
                                tracing::warn!(error = %e, "NBD client failed");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "NBD accept failed"),
                    }
                }
            })
            .map_err(|e| CaptureError::Io(e.to_string()))?;
        Ok(Self { shared })
    }

    /// Size of the disk in 4 KiB blocks.
    #[must_use]
    pub fn blocks(&self) -> u64 {
        self.shared.size / PAGE_SIZE as u64
    }

    /// Appends the blocks written since the last call, ascending, and
    /// starts a new set. Call with the guest stopped (its I/O drained).
    pub fn take_dirty(&self, out: &mut Vec<u64>) {
        self.shared.dirty.lock().take(out);
    }

    /// Reads block `block` into `buf` (4 KiB).
    ///
    /// # Errors
    /// The read error.
    pub fn read_block(&self, block: u64, buf: &mut [u8]) -> io::Result<()> {
        self.shared.image.read_exact_at(buf, block * PAGE_SIZE as u64)
    }
}

impl Drop for DiskServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(s: &Shared, mut c: UnixStream) -> io::Result<()> {
    c.write_all(&NBDMAGIC.to_be_bytes())?;
    c.write_all(&IHAVEOPT.to_be_bytes())?;
    c.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
    let client_flags = read_u32(&mut c)?;
    let no_zeroes = client_flags & u32::from(FLAG_NO_ZEROES) != 0;
    let tx_flags = TX_HAS_FLAGS | TX_SEND_FLUSH | TX_SEND_FUA;
    // Option haggling.
    loop {
        if read_u64(&mut c)? != IHAVEOPT {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "NBD client sent a bad option magic"));
        }
        let opt = read_u32(&mut c)?;
        let len = read_u32(&mut c)?;
        if len > 65536 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("NBD option {opt} of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        c.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                c.write_all(&s.size.to_be_bytes())?;
                c.write_all(&tx_flags.to_be_bytes())?;
                if !no_zeroes {
                    c.write_all(&[0u8; 124])?;
                }
                break;
            }
            OPT_ABORT => {
                option_reply(&mut c, opt, REP_ACK, &[])?;
                return Ok(());
            }
            OPT_INFO | OPT_GO => {
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&s.size.to_be_bytes());
                info.extend_from_slice(&tx_flags.to_be_bytes());
                option_reply(&mut c, opt, REP_INFO, &info)?;
                option_reply(&mut c, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    break;
                }
            }
            _ => option_reply(&mut c, opt, REP_ERR_UNSUP, &[])?,
        }
    }
    // Transmission.
    let mut hdr = [0u8; 28];
    let mut buf = Vec::new();
    loop {
        match c.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let magic = u32::from_be_bytes(hdr[0..4].try_into().expect("4 bytes"));
        if magic != REQUEST_MAGIC {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("NBD request magic {magic:#x}")));
        }
        let flags = u16::from_be_bytes(hdr[4..6].try_into().expect("2 bytes"));
        let cmd = u16::from_be_bytes(hdr[6..8].try_into().expect("2 bytes"));
        let cookie = &hdr[8..16];
        let offset = u64::from_be_bytes(hdr[16..24].try_into().expect("8 bytes"));
        let len = u32::from_be_bytes(hdr[24..28].try_into().expect("4 bytes"));
        let in_range = len <= MAX_REQUEST && offset.checked_add(u64::from(len)).is_some_and(|end| end <= s.size);
        match cmd {
            CMD_READ => {
                if !in_range {
                    simple_reply(&mut c, cookie, EINVAL, &[])?;
                    continue;
                }
                buf.resize(len as usize, 0);
                match s.image.read_exact_at(&mut buf, offset) {
                    Ok(()) => simple_reply(&mut c, cookie, 0, &buf)?,
                    Err(_) => simple_reply(&mut c, cookie, EIO, &[])?,
                }
            }
            CMD_WRITE => {
                if len > MAX_REQUEST {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, format!("NBD write of {len} bytes")));
                }
                buf.resize(len as usize, 0);
                c.read_exact(&mut buf)?;
                if !in_range {
                    simple_reply(&mut c, cookie, ENOSPC, &[])?;
                    continue;
                }
                let mut r = s.image.write_all_at(&buf, offset);
                // Marked before the reply: once QEMU's `stop` has drained
                // its I/O, every acknowledged write is in the dirty set.
                s.dirty.lock().mark(offset, u64::from(len));
                if r.is_ok() && flags & CMD_FLAG_FUA != 0 {
                    r = s.image.sync_data();
                }
                simple_reply(&mut c, cookie, if r.is_ok() { 0 } else { EIO }, &[])?;
            }
            CMD_FLUSH => {
                let r = s.image.sync_data();
                simple_reply(&mut c, cookie, if r.is_ok() { 0 } else { EIO }, &[])?;
            }
            CMD_DISC => return Ok(()),
            _ => simple_reply(&mut c, cookie, EINVAL, &[])?,
        }
    }
}

fn option_reply(c: &mut UnixStream, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    c.write_all(&out)
}

fn simple_reply(c: &mut UnixStream, cookie: &[u8], error: u32, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(cookie);
    out.extend_from_slice(data);
    c.write_all(&out)
}

fn read_u32(c: &mut UnixStream) -> io::Result<u32> {
    let mut b = [0u8; 4];
    c.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(c: &mut UnixStream) -> io::Result<u64> {
    let mut b = [0u8; 8];
    c.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal NBD client: enough to prove the server against the
    /// protocol (QEMU's own client is exercised by the VM tests).
    fn handshake(c: &mut UnixStream) -> u64 {
        assert_eq!(read_u64(c).unwrap(), NBDMAGIC);
        assert_eq!(read_u64(c).unwrap(), IHAVEOPT);
        let mut f = [0u8; 2];
        c.read_exact(&mut f).unwrap();
        c.write_all(&u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes()).unwrap();
        // An unknown option first: refused, the session goes on.
        for (opt, data) in [(99u32, Vec::new()), (OPT_GO, vec![0, 0, 0, 0, 0, 0])] {
            c.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
            c.write_all(&opt.to_be_bytes()).unwrap();
            c.write_all(&(data.len() as u32).to_be_bytes()).unwrap();
            c.write_all(&data).unwrap();
        }
        let mut size = 0;
        loop {
            assert_eq!(read_u64(c).unwrap(), REPLY_MAGIC);
            let _opt = read_u32(c).unwrap();
            let kind = read_u32(c).unwrap();
            let len = read_u32(c).unwrap();
            let mut d = vec![0u8; len as usize];
            c.read_exact(&mut d).unwrap();
            match kind {
                REP_ERR_UNSUP => {}
                REP_INFO => size = u64::from_be_bytes(d[2..10].try_into().unwrap()),
                REP_ACK => return size,
                k => panic!("unexpected reply {k:#x}"),
            }
        }
    }

    fn request(c: &mut UnixStream, cmd: u16, offset: u64, data: &[u8], read_len: u32) -> (u32, Vec<u8>) {
        let mut r = Vec::new();
        r.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&cmd.to_be_bytes());
        r.extend_from_slice(&7u64.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&(if cmd == CMD_WRITE { data.len() as u32 } else { read_len }).to_be_bytes());
        r.extend_from_slice(data);
        c.write_all(&r).unwrap();
        assert_eq!(read_u32(c).unwrap(), SIMPLE_REPLY_MAGIC);
        let err = read_u32(c).unwrap();
        assert_eq!(read_u64(c).unwrap(), 7);
        let mut out = vec![0u8; if cmd == CMD_READ && err == 0 { read_len as usize } else { 0 }];
        c.read_exact(&mut out).unwrap();
        (err, out)
    }

    #[test]
    fn writes_are_stored_and_marked_dirty_by_block() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&img).unwrap();
        f.set_len(64 * PAGE_SIZE as u64).unwrap();
        let sock = dir.path().join("nbd.sock");
        let srv = DiskServer::start(f, &sock).unwrap();
        let mut c = UnixStream::connect(&sock).unwrap();
        assert_eq!(handshake(&mut c), 64 * PAGE_SIZE as u64);
        // A 512-byte write straddling blocks 2 and 3, and one in block 10.
        assert_eq!(request(&mut c, CMD_WRITE, 3 * 4096 - 256, &[0xab; 512], 0).0, 0);
        assert_eq!(request(&mut c, CMD_WRITE, 10 * 4096, &[0xcd; 4096], 0).0, 0);
        let (err, back) = request(&mut c, CMD_READ, 3 * 4096 - 256, &[], 512);
        assert_eq!((err, back), (0, vec![0xab; 512]));
        assert_eq!(request(&mut c, CMD_FLUSH, 0, &[], 0).0, 0);
        // Out of range: an error reply, the session goes on.
        assert_eq!(request(&mut c, CMD_READ, 64 * 4096 - 1, &[], 2).0, EINVAL);
        assert_eq!(request(&mut c, CMD_WRITE, 64 * 4096, &[1], 0).0, ENOSPC);
        let mut dirty = Vec::new();
        srv.take_dirty(&mut dirty);
        assert_eq!(dirty, vec![2, 3, 10]);
        dirty.clear();
        srv.take_dirty(&mut dirty);
        assert!(dirty.is_empty(), "a new set after take");
        let mut block = vec![0u8; PAGE_SIZE];
        srv.read_block(10, &mut block).unwrap();
        assert!(block.iter().all(|&b| b == 0xcd));
        let mut disc = Vec::new();
        disc.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        disc.extend_from_slice(&[0, 0, 0, CMD_DISC as u8]);
        disc.extend_from_slice(&[0u8; 20]);
        c.write_all(&disc).unwrap();
        let mut rest = Vec::new();
        assert_eq!(c.read_to_end(&mut rest).unwrap(), 0, "closed after DISC without a reply");
    }
}
