//! Errors of the capture engine.

/// Why a checkpoint or guest set-up failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureError {
    /// Guest memory could not be created or mapped.
    #[error("guest memory: {0}")]
    Memory(std::io::Error),
    /// The dirty-page tracker failed.
    #[error("dirty tracking: {0}")]
    Tracking(std::io::Error),
    /// The configuration is unusable.
    #[error("invalid capture config: {0}")]
    Config(String),
    /// QEMU refused a command, failed, or is gone.
    #[error("qemu: {0}")]
    Qemu(String),
    /// The guest's disk or network plumbing failed.
    #[error("{0}")]
    Io(String),
    /// The guest stopped (its workload failed or was shut down).
    #[error("guest stopped: {0}")]
    Stopped(String),
}
