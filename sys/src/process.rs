//! Process and thread settings std does not offer.

use std::sync::atomic::{AtomicBool, Ordering};

/// Asks for real-time (`SCHED_FIFO`) priority for the calling thread, so
/// that a guest's pause is not stretched by preemption; false where it is
/// not permitted (the thread runs on as it was).
pub fn raise_priority() -> bool {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: plain syscall on the calling thread with a valid parameter.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
}

/// Keeps memory the process frees for reuse rather than handing it back
/// to the kernel at once (glibc unmaps blocks above a threshold and trims
/// the heap top on free). Epochs allocate and free buffers of similar
/// sizes over and over; returned memory comes back as fresh zeroed pages,
/// one fault per 4 KiB, which measured costlier than the copying itself
/// (see docs/benchmarks.md, history). Call first thing in `main`, before
/// other threads start.
pub fn keep_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; it is called before
    // other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// Lets a write to a closed pipe end the process quietly, as it does for
/// other command-line tools (`remus log | head`), instead of a panic in
/// `println!`. Call first thing in `main`.
pub fn die_on_closed_pipe() {
    // SAFETY: restores the default disposition of one signal; no handler
    // code runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Makes SIGINT and SIGTERM set a flag ([`stop_requested`]) instead of
/// ending the process, so it can stop cleanly.
pub fn install_stop_handler() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// True once SIGINT or SIGTERM arrived (after [`install_stop_handler`]).
pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// Has `cmd`'s process killed when the thread that spawns it ends
/// (`PR_SET_PDEATHSIG`), so a child never outlives its parent.
pub fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only
    // makes one async-signal-safe syscall.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The real user and group ids of this process.
#[must_use]
pub fn ids() -> (u32, u32) {
    // SAFETY: getuid and getgid have no preconditions and cannot fail.
    unsafe { (libc::getuid(), libc::getgid()) }
}

/// Sends `signal` to process `pid`.
///
/// # Errors
/// The OS error (no such process, not permitted).
pub fn signal(pid: u32, signal: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: kill takes plain integers.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// CPU time (user and system, all threads) the process `pid` has used so
/// far, from `/proc/PID/stat`.
///
/// # Errors
/// When the process is gone or its stat line cannot be read.
pub fn process_cpu_time(pid: u32) -> std::io::Result<std::time::Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("unreadable /proc/{pid}/stat"));
    // Fields after the command name (which may hold spaces) in parentheses:
    // state is field 3, utime 14 and stime 15.
    let rest = stat.rsplit_once(')').ok_or_else(bad)?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<u64>().ok()).ok_or_else(bad);
    let total = ticks(14)? + ticks(15)?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0).unwrap_or(100);
    Ok(std::time::Duration::from_nanos(total * 1_000_000_000 / hz))
}

/// CPU time (user and system, all threads) this process has used so far.
#[must_use]
pub fn cpu_time() -> std::time::Duration {
    process_cpu_time(std::process::id()).unwrap_or_default()
}

/// CPU time (user and system) the calling thread has used so far.
#[must_use]
pub fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(u64::try_from(ts.tv_sec).unwrap_or(0), u32::try_from(ts.tv_nsec).unwrap_or(0))
}

/// The most memory this process has held resident so far (`VmHWM`), in
/// bytes; 0 where the kernel does not say.
#[must_use]
pub fn peak_resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_time_grows_with_work_and_a_missing_process_is_an_error() {
        let before = super::cpu_time();
        let mut x = 0u64;
        let t0 = std::time::Instant::now();
        while t0.elapsed() < std::time::Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
        assert!(super::cpu_time() > before, "300 ms of spinning shows as CPU time");
        assert!(super::process_cpu_time(u32::MAX).is_err());
        let held = vec![1u8; 64 << 20];
        assert!(super::peak_resident_bytes() >= 64 << 20, "64 MiB touched shows in the peak");
        drop(std::hint::black_box(held));
    }
}
