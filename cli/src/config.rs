//! The TOML configuration file. Every key is optional; flags on the
//! command line override it. Example (all defaults shown):
//!
//! ```toml
//! data-dir = "remus-data"
//!
//! [protect]
//! guest = 1
//! backup = "127.0.0.1:7400"
//! epoch-ms = 25
//! max-epoch-ms = 200             # epochs lengthen up to it while output waits, then the guest is slowed (= epoch-ms: fixed)
//! output-delay-target-ms = 1000   # ... to keep output delay under this
//! max-in-flight = 256
//! # encode-threads = 2       # threads compressing a large epoch (a first copy); default: the cores, at most 4
//! heartbeat-ms = 50
//! backup-timeout-ms = 500     # at the least; longer when the link is irregular
//! backup-timeout-max-ms = 5000 # at the most
//! congestion = "bbr"        # or cubic, newreno
//! fec = "auto"               # parity beside each epoch: auto (sized to the loss seen), off, or 1..16 per 32
//! max-rate-mbit = 0          # a bandwidth cap for the link, Mbit/s (0: none)
//! far = []                   # far backups replicated to beside `backup`, e.g. ["203.0.113.7:7400"]
//! release = "near"           # whose acks release output: near, all, or a count of backups
//! far-retained-mib = 256     # unacknowledged epochs kept per far backup before merging the rest
//! release-first-copy = true  # a new guest's output flows while its first copy is made (false: held until committed)
//!
//! [protect.arena]
//! memory-mib = 1024
//! tracking = "auto"          # auto | write-protect | hash
//!
//! [protect.arena.workload]
//! pages-per-sec = 20000
//! hot-fraction = 0.02
//! hot-probability = 0.9
//! seed = 1
//! output-interval-ms = 25
//! mix = { zero = 10, text = 25, random = 10, duplicate = 20, edit = 35, recycle = 0 }
//! # recycle: one of 1024 fixed contents, so pages return to content they held before
//! # marker = { after-ms = 1000, address = 12304, value = "remus-marker" }   # written once, for remus bisect
//!
//! [protect.qemu]            # used by `remus protect qemu`
//! memory-mib = 128
//! disk-mib = 64
//! accel = "tcg"              # or kvm
//! append = "console=ttyS0 quiet"
//! # kernel, initrd: default to what scripts/qemu-deps.sh and guest/build.sh made
//! # tap = "remus0"           # the guest's network; none by default
//!
//! [backup]
//! listen = "127.0.0.1:7400"
//! heartbeat-ms = 50
//! primary-timeout-ms = 500     # at the least; longer when the link is irregular
//! primary-timeout-max-ms = 5000 # at the most
//! buffer-mib-per-primary = 1024 # epochs received, not yet committed: memory for each primary ...
//! buffer-mib = 4096          # ... and for all of them
//! shared-primary-cert = true  # keygen's primary.pem may speak for any guest
//! guest-store-mib = 0         # store bytes each guest's kept epochs may charge (0: no limit); beyond, its commits are refused
//! guest-epoch-hz = 0          # epochs a second each guest may commit on average (0: no limit); beyond, commits wait
//! # qemu-images = ["/var/lib/remus/images"]   # kernels and initrds a failed-over guest may boot (default ~/.cache/remus-guest)
//!
//! # Optional: the S3 history tier (no defaults for bucket; the rest as
//! # shown or from the AWS environment: AWS_REGION, AWS_ACCESS_KEY_ID, ...).
//! [s3]
//! bucket = "remus-history"
//! prefix = "site-a"
//! endpoint = "http://127.0.0.1:9000"
//! region = "us-east-1"
//! force-path-style = true
//! pack-size-kib = 32768
//! upload-interval-ms = 20000
//! timeout-ms = 30000
//! allow-http = false         # plain http:// to another host (loopback needs no permission)
//! # encryption-keys = "/etc/remus/s3.keys"   # `remus key new` writes it: every object sealed (AES-256-GCM) before upload
//! # accept-plaintext = false  # with keys: also read objects put before encryption was turned on
//! # server-side-encryption = "AES256"        # or "aws:kms" (with sse-kms-key-id): asked of S3 as well
//!
//! # Optional: a witness, so that a failover needs a majority: the backup
//! # takes a guest over only by winning its lease, and a primary that can
//! # confirm its lease with neither the witness nor the backup holds its
//! # guest still (self-fencing). Endpoint and credentials as for [s3].
//! [witness]
//! url = "s3://remus-witness/leases"
//! # endpoint, access-key-id, secret-access-key: the witness's own (default [s3]'s); a primary
//! # needs keys for the lease prefix alone, never the history's
//! node = "site-a"            # this node's name in a lease (default: <hostname>/primary or /backup)
//! lease-ms = 500
//! drift = 0.01               # clock rate error allowed each side
//! margin-ms = 20             # added to a taker's wait
//!
//! # Optional: notifications of failover, fence, self-fence, takeover and
//! # generation changes: a command run with the event as JSON on stdin,
//! # and/or an HTTP POST of it.
//! [hooks]
//! command = "logger -t remus"
//! url = "http://127.0.0.1:9099/remus"
//!
//! # Optional: thinning and GC, applied by the backup every `interval`
//! # (and by `remus gc`). Ages count back from the newest epoch; older
//! # than the last `within` is dropped; the newest epoch is always kept.
//! [retention]
//! interval = "1h"
//! keep = [
//!   { within = "1h", every = "0s" },
//!   { within = "1day", every = "1s" },
//!   { within = "30days", every = "1m" },
//!   { within = "365days", every = "1day" },
//! ]
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use remus_capture::{ArenaConfig, CadenceConfig};
use remus_wan::driver::{BackupLinkConfig, LinkTuning};
use remus_wan::SenderConfig;

/// The whole file.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Config {
    /// Data directory (TLS material, store).
    pub data_dir: Option<PathBuf>,
    /// The primary.
    pub protect: ProtectConfig,
    /// The backup.
    pub backup: BackupConfig,
    /// The S3 history tier (off when absent).
    pub s3: Option<remus_store::s3::S3Config>,
    /// Thinning and GC (off when absent: every epoch is kept).
    pub retention: Option<RetentionConfig>,
    /// The witness (off when absent).
    pub witness: Option<WitnessConfig>,
    /// Notifications (none when absent).
    pub hooks: Option<remus_node::HookConfig>,
}

/// `[witness]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct WitnessConfig {
    /// Where the leases are kept: `s3://BUCKET/PREFIX` (endpoint and
    /// credentials from the keys below, else `[s3]` or the AWS
    /// environment), or `remus://HOST:PORT`, a `remus witness` (reached
    /// with this host's certificate).
    pub url: String,
    /// Endpoint of the witness's S3 service, when not `[s3]`'s.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Credentials of the witness's own (with `secret-access-key`): give a
    /// primary keys that reach the lease prefix alone, not the history.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// Secret of `access-key-id`.
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// This node's name in a lease (default `<hostname>/primary` or
    /// `<hostname>/backup`).
    #[serde(default)]
    pub node: Option<String>,
    /// The lease period, ms (default 500).
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// Clock rate error allowed each side (default 0.01).
    #[serde(default = "default_drift")]
    pub drift: f64,
    /// Added to a taker's wait, ms (default 20).
    #[serde(default = "default_margin_ms")]
    pub margin_ms: u64,
}

impl WitnessConfig {
    /// A witness at `url` with every default.
    #[must_use]
    pub fn at(url: &str) -> Self {
        Self {
            url: url.to_string(),
            endpoint: None,
            access_key_id: None,
            secret_access_key: None,
            node: None,
            lease_ms: default_lease_ms(),
            drift: default_drift(),
            margin_ms: default_margin_ms(),
        }
    }

    /// The lease timing.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn timing(&self) -> Result<remus_witness::Timing> {
        let t = remus_witness::Timing {
            lease: Duration::from_millis(self.lease_ms),
            drift: self.drift,
            margin: Duration::from_millis(self.margin_ms),
        };
        t.validate().map_err(|e| anyhow::anyhow!("witness: {e}"))?;
        Ok(t)
    }
}

fn default_lease_ms() -> u64 {
    ms(remus_witness::Timing::default().lease)
}

fn default_drift() -> f64 {
    remus_witness::Timing::default().drift
}

fn default_margin_ms() -> u64 {
    ms(remus_witness::Timing::default().margin)
}

/// `[retention]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RetentionConfig {
    /// How often the backup applies the policy (default "1h").
    #[serde(default = "default_retention_interval")]
    pub interval: String,
    /// Tiers: epochs up to `within` old are kept one per `every` ("0s": all).
    pub keep: Vec<KeepConfig>,
}

/// One `[[retention.keep]]` tier.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct KeepConfig {
    /// Age limit, e.g. "1h", "30days".
    pub within: String,
    /// Spacing of kept epochs, e.g. "1s"; "0s" keeps every epoch.
    pub every: String,
}

fn default_retention_interval() -> String {
    "1h".into()
}

impl RetentionConfig {
    /// The policy and how often to apply it.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn policy(&self) -> Result<(remus_store::RetentionPolicy, std::time::Duration)> {
        let d = |key: String, v: &str| humantime::parse_duration(v).with_context(|| format!("{key} = {v:?} is not a duration"));
        let interval = d("retention.interval".into(), &self.interval)?;
        anyhow::ensure!(!interval.is_zero(), "retention.interval must be positive");
        anyhow::ensure!(!self.keep.is_empty(), "retention.keep needs at least one tier");
        let mut rules = Vec::new();
        for (i, k) in self.keep.iter().enumerate() {
            rules.push(remus_store::KeepRule {
                within: d(format!("retention.keep[{i}].within"), &k.within)?,
                every: d(format!("retention.keep[{i}].every"), &k.every)?,
            });
        }
        Ok((remus_store::RetentionPolicy { rules }, interval))
    }
}

/// `[protect]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ProtectConfig {
    /// Guest id (default 1).
    pub guest: u64,
    /// Backup address (default 127.0.0.1:7400).
    pub backup: SocketAddr,
    /// Epoch length in ms (default 25, i.e. 40 Hz).
    pub epoch_ms: u64,
    /// Longest epoch in ms while output waits past half the target
    /// (default 200; beyond it the guest is slowed). Equal to `epoch-ms`:
    /// a fixed period, never throttled.
    pub max_epoch_ms: u64,
    /// Output delay to stay under, ms (default 1000): epochs lengthen
    /// while the oldest unacknowledged output waits longer than half this.
    pub output_delay_target_ms: u64,
    /// Epochs in flight at most (default 256).
    pub max_in_flight: usize,
    /// Threads that compress a large epoch's pages (a first copy, a
    /// burst) side by side (default: the machine's cores, at most 4; 1:
    /// one thread).
    pub encode_threads: Option<usize>,
    /// Heartbeat period (default 50 ms).
    pub heartbeat_ms: u64,
    /// Silence after which the backup counts as lost, at the least
    /// (default 500 ms; longer on a link where it is heard irregularly).
    pub backup_timeout_ms: u64,
    /// ... and at the most (default 5000 ms).
    pub backup_timeout_max_ms: u64,
    /// Congestion control of the link: bbr (default), cubic or newreno.
    pub congestion: String,
    /// Parity sent beside each epoch: auto (default: sized to the loss the
    /// link shows), off, or 1..=16 parity shards per 32 data shards.
    pub fec: String,
    /// A bandwidth cap for the link in Mbit/s (default 0: none).
    pub max_rate_mbit: u64,
    /// Far backups, replicated to beside `backup` (default none).
    pub far: Vec<SocketAddr>,
    /// Whose acknowledgements release output: `near` (default: the far
    /// backups never hold output back), `all`, or a count of backups.
    pub release: String,
    /// MiB of unacknowledged epochs kept for each far backup that does not
    /// pace the guest; beyond it, epochs are merged (default 256).
    pub far_retained_mib: usize,
    /// A guest new to every backup releases its output while its first
    /// copy is made, before any backup could resume it (default true, as
    /// Remus did during its initial migration; a backup does not fail
    /// such a guest over until an epoch whose output was held is
    /// committed). False: held until the first copy is committed, cutting
    /// the guest off for as long as the copy takes. A guest continuing a
    /// history always holds it.
    pub release_first_copy: bool,
    /// The arena guest.
    pub arena: ArenaConfig,
    /// A QEMU guest.
    pub qemu: crate::qemu_settings::QemuSettings,
}

impl Default for ProtectConfig {
    /// The libraries' own defaults, in the file's units.
    fn default() -> Self {
        let (sender, cadence, link) = (SenderConfig::default(), CadenceConfig::default(), LinkTuning::default());
        Self {
            guest: 1,
            backup: default_listen(),
            epoch_ms: ms(cadence.base),
            max_epoch_ms: ms(cadence.max),
            output_delay_target_ms: ms(cadence.target),
            max_in_flight: sender.max_in_flight,
            encode_threads: None,
            heartbeat_ms: ms(sender.heartbeat),
            backup_timeout_ms: ms(sender.peer_timeout),
            backup_timeout_max_ms: ms(sender.peer_timeout_max),
            congestion: link.congestion.to_string(),
            fec: link.fec.to_string(),
            max_rate_mbit: link.max_rate.map_or(0, |bytes| bytes / BYTES_PER_MBIT),
            far: Vec::new(),
            release: "near".into(),
            release_first_copy: true,
            far_retained_mib: remus_node::fanout::FAR_RETAINED_BYTES >> 20,
            arena: ArenaConfig::default(),
            qemu: crate::qemu_settings::QemuSettings::default(),
        }
    }
}

impl ProtectConfig {
    /// The sender's tuning these keys set (the rest at its defaults).
    #[must_use]
    pub fn sender(&self) -> SenderConfig {
        let encoder = remus_wan::EncoderConfig::default();
        SenderConfig {
            max_in_flight: self.max_in_flight,
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            peer_timeout: Duration::from_millis(self.backup_timeout_ms),
            peer_timeout_max: Duration::from_millis(self.backup_timeout_max_ms),
            // The encoder takes at least one thread, whatever it is told.
            encoder: remus_wan::EncoderConfig { threads: self.encode_threads.unwrap_or(encoder.threads), ..encoder },
            ..SenderConfig::default()
        }
    }

    /// The epoch cadence for a base period of `epoch` (the file's
    /// `epoch-ms` unless a flag set another); the longest epoch is never
    /// below it.
    #[must_use]
    pub fn cadence(&self, epoch: Duration) -> CadenceConfig {
        CadenceConfig {
            base: epoch,
            max: Duration::from_millis(self.max_epoch_ms).max(epoch),
            target: Duration::from_millis(self.output_delay_target_ms),
        }
    }
}

/// Bytes per second in one Mbit/s.
pub const BYTES_PER_MBIT: u64 = 125_000;

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `[backup]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct BackupConfig {
    /// Listen address (default 127.0.0.1:7400).
    pub listen: SocketAddr,
    /// Store directory (default `<data-dir>/store`).
    pub store: Option<PathBuf>,
    /// Heartbeat period (default 50 ms).
    pub heartbeat_ms: u64,
    /// Silence after which a primary counts as lost (default 500 ms).
    pub primary_timeout_ms: u64,
    /// ... and at the most (default 5000 ms).
    pub primary_timeout_max_ms: u64,
    /// Memory for epochs received from one primary and not yet committed,
    /// MiB (default 1024); beyond it the primary is held back.
    pub buffer_mib_per_primary: u64,
    /// ... and for all primaries together (default 4096).
    pub buffer_mib: u64,
    /// Whether `keygen`'s `primary.pem`, shared by every guest, may speak
    /// for any guest (default true); a certificate from `remus cert issue`
    /// speaks for its own guest only, whatever this says.
    pub shared_primary_cert: bool,
    /// Directories whose kernels and initrds a failed-over QEMU guest may
    /// boot from here (default: where scripts/qemu-deps.sh and
    /// guest/build.sh put them, `~/.cache/remus-guest`).
    pub qemu_images: Option<Vec<PathBuf>>,
    /// Store bytes each guest's kept epochs may charge, MiB (default 0:
    /// no limit); beyond it the guest's commits are refused, saying so.
    pub guest_store_mib: u64,
    /// Epochs a second each guest's commits may average (default 0: no
    /// limit); beyond it they wait.
    pub guest_epoch_hz: u32,
}

impl Default for BackupConfig {
    /// The link's own defaults, in the file's units.
    fn default() -> Self {
        let link = BackupLinkConfig::default();
        Self {
            listen: default_listen(),
            store: None,
            heartbeat_ms: ms(link.heartbeat),
            primary_timeout_ms: ms(link.primary_timeout),
            primary_timeout_max_ms: ms(link.primary_timeout_max),
            buffer_mib_per_primary: link.max_buffered_per_connection >> 20,
            buffer_mib: link.max_buffered >> 20,
            shared_primary_cert: link.shared_primary_cert,
            qemu_images: None,
            guest_store_mib: 0,
            guest_epoch_hz: 0,
        }
    }
}

impl BackupConfig {
    /// The link timing these keys set.
    #[must_use]
    pub fn link(&self) -> BackupLinkConfig {
        BackupLinkConfig {
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            primary_timeout: Duration::from_millis(self.primary_timeout_ms),
            primary_timeout_max: Duration::from_millis(self.primary_timeout_max_ms),
            max_buffered_per_connection: self.buffer_mib_per_primary << 20,
            max_buffered: self.buffer_mib << 20,
            shared_primary_cert: self.shared_primary_cert,
        }
    }

    /// What each guest may use of the backup.
    #[must_use]
    pub fn quota(&self) -> remus_node::GuestQuota {
        remus_node::GuestQuota {
            store_bytes: (self.guest_store_mib > 0).then_some(self.guest_store_mib << 20),
            epoch_hz: (self.guest_epoch_hz > 0).then_some(self.guest_epoch_hz),
        }
    }

    /// The trusted guest image directories.
    #[must_use]
    pub fn qemu_images(&self) -> Vec<PathBuf> {
        self.qemu_images.clone().unwrap_or_else(|| vec![crate::qemu_settings::guest_cache()])
    }
}

fn default_listen() -> SocketAddr {
    "127.0.0.1:7400".parse().expect("valid address")
}

impl Config {
    /// Reads `path`, or the defaults when `None`.
    ///
    /// # Errors
    /// When the file cannot be read, is not TOML, has an unknown key or a
    /// value out of range.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let Some(path) = path else { return Ok(Self::default()) };
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        let cfg: Self = toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))?;
        cfg.validate().with_context(|| format!("config {}", path.display()))?;
        Ok(cfg)
    }

    /// Checks ranges.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn validate(&self) -> Result<()> {
        let p = &self.protect;
        anyhow::ensure!((1..=10_000).contains(&p.epoch_ms), "protect.epoch-ms must be in 1..=10000, got {}", p.epoch_ms);
        anyhow::ensure!(p.max_in_flight >= 1, "protect.max-in-flight must be at least 1");
        anyhow::ensure!(p.heartbeat_ms >= 1, "protect.heartbeat-ms must be at least 1");
        anyhow::ensure!(p.output_delay_target_ms >= 1, "protect.output-delay-target-ms must be at least 1");
        anyhow::ensure!(p.backup_timeout_ms > p.heartbeat_ms, "protect.backup-timeout-ms must exceed heartbeat-ms");
        anyhow::ensure!(p.backup_timeout_max_ms >= p.backup_timeout_ms, "protect.backup-timeout-max-ms must be at least backup-timeout-ms");
        p.congestion.parse::<remus_wan::Congestion>().map_err(|e| anyhow::anyhow!("protect.congestion: {e}"))?;
        p.fec.parse::<remus_wan::fec::Fec>().map_err(|e| anyhow::anyhow!("protect.fec: {e}"))?;
        remus_node::Release::parse(&p.release).map_err(|e| anyhow::anyhow!("protect.release: {e}"))?;
        anyhow::ensure!(!p.far.contains(&p.backup), "protect.far must not name the near backup ({})", p.backup);
        anyhow::ensure!((1..=1 << 20).contains(&p.far_retained_mib), "protect.far-retained-mib must be in 1..=1048576");
        p.arena.workload.validate().map_err(|e| anyhow::anyhow!("protect.arena.workload: {e}"))?;
        let b = &self.backup;
        anyhow::ensure!(b.heartbeat_ms >= 1, "backup.heartbeat-ms must be at least 1");
        anyhow::ensure!(b.primary_timeout_ms > b.heartbeat_ms, "backup.primary-timeout-ms must exceed heartbeat-ms");
        anyhow::ensure!(
            b.primary_timeout_max_ms >= b.primary_timeout_ms,
            "backup.primary-timeout-max-ms must be at least primary-timeout-ms"
        );
        anyhow::ensure!(
            (1..=1 << 20).contains(&b.buffer_mib_per_primary) && (1..=1 << 22).contains(&b.buffer_mib),
            "backup.buffer-mib-per-primary and backup.buffer-mib must be at least 1 (and at most 1 TiB and 4 TiB)"
        );
        anyhow::ensure!(b.guest_store_mib <= 1 << 30, "backup.guest-store-mib must be at most 1 PiB (0: no limit)");
        anyhow::ensure!(b.guest_epoch_hz <= 100_000, "backup.guest-epoch-hz must be at most 100000 (0: no limit)");
        if let Some(s3) = &self.s3 {
            s3.validate()?;
        }
        if let Some(r) = &self.retention {
            r.policy()?;
        }
        if let Some(h) = &self.hooks {
            h.validate().map_err(|e| anyhow::anyhow!(e))?;
        }
        if let Some(w) = &self.witness {
            w.timing()?;
            anyhow::ensure!(
                w.url.starts_with("s3://") || w.url.strip_prefix("remus://").is_some_and(|a| a.contains(':')),
                "witness.url {:?} is neither s3://BUCKET/PREFIX nor remus://HOST:PORT (a remus witness)",
                w.url
            );
            anyhow::ensure!(w.node.as_deref().is_none_or(|n| !n.is_empty()), "witness.node must not be empty");
        }
        Ok(())
    }

    /// The data directory: the flag, else the file's, else `remus-data`.
    #[must_use]
    pub fn data_dir(&self, flag: Option<&Path>) -> PathBuf {
        flag.map(Path::to_path_buf).or_else(|| self.data_dir.clone()).unwrap_or_else(|| PathBuf::from("remus-data"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses_and_unknown_keys_are_refused() {
        let doc = include_str!("config.rs");
        let start = doc.find("```toml").unwrap() + 7;
        let end = doc[start..].find("```").unwrap() + start;
        let example: String = doc[start..end].lines().map(|l| l.trim_start_matches("//!").trim_start()).collect::<Vec<_>>().join("\n");
        let cfg: Config = toml::from_str(&example).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.protect.arena.memory_mib, 1024);
        assert!(toml::from_str::<Config>("[protect]\nepoch = 3\n").is_err());
        let bad: Config = toml::from_str("[protect]\nepoch-ms = 0\n").unwrap();
        assert!(bad.validate().is_err());
        assert_eq!(cfg.s3.as_ref().unwrap().pack_size_kib, 32768);
        // S3: a missing bucket, an unknown key and a bad value are refused, naming the key.
        assert!(toml::from_str::<Config>("[s3]\nprefix = \"x\"\n").unwrap_err().to_string().contains("bucket"));
        assert!(toml::from_str::<Config>("[s3]\nbucket = \"abc\"\nendpoints = \"x\"\n").is_err());
        let bad: Config = toml::from_str("[s3]\nbucket = \"abc\"\nendpoint = \"localhost:9000\"\n").unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("s3.endpoint"));
        let bad: Config = toml::from_str("[s3]\nbucket = \"Bad_Name\"\n").unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("s3.bucket"));
        // The example shows every default: what it sets is what the
        // libraries default to.
        let defaults = Config::default();
        assert_eq!(format!("{:?}", cfg.protect.sender()), format!("{:?}", SenderConfig::default()));
        assert_eq!(format!("{:?}", defaults.protect.sender()), format!("{:?}", SenderConfig::default()));
        assert_eq!(cfg.protect.cadence(Duration::from_millis(cfg.protect.epoch_ms)), CadenceConfig::default());
        assert_eq!(format!("{:?}", cfg.backup.link()), format!("{:?}", BackupLinkConfig::default()));
        assert_eq!(
            (cfg.protect.congestion.as_str(), cfg.protect.fec.as_str()),
            (defaults.protect.congestion.as_str(), defaults.protect.fec.as_str())
        );
        let (policy, every) = cfg.retention.as_ref().unwrap().policy().unwrap();
        assert_eq!((policy.rules.len(), every.as_secs()), (4, 3600));
        assert_eq!(policy.rules[3].every.as_secs(), 86_400);
        let bad: Config = toml::from_str("[retention]\nkeep = [{ within = \"soon\", every = \"0s\" }]\n").unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("retention.keep[0].within"));
        let w = cfg.witness.as_ref().unwrap();
        assert_eq!((w.lease_ms, w.node.as_deref()), (500, Some("site-a")));
        let bad: Config = toml::from_str("[witness]\nurl = \"s3://w/x\"\nlease-ms = 5\n").unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("lease"));
        let bad: Config = toml::from_str("[witness]\nurl = \"http://w/x\"\n").unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("witness.url"));
    }
}
