//! Where the S3 tier lives and how to reach it.

use std::time::Duration;

use crate::S3Error;

/// The `[s3]` table of the remus configuration (kebab-case keys).
///
/// Only `bucket` is required. Region and credentials not given here come
/// from the usual AWS environment and files (`AWS_REGION`,
/// `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`,
/// `~/.aws/config`, `AWS_ENDPOINT_URL`, ...).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct S3Config {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket (default none), without leading `/`.
    #[serde(default)]
    pub prefix: String,
    /// Endpoint URL of an S3-compatible service, `http://` or `https://`
    /// (default: AWS, or `AWS_ENDPOINT_URL`).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Region (default: the AWS environment's, else `us-east-1`).
    #[serde(default)]
    pub region: Option<String>,
    /// Access key id; with `secret-access-key`, overrides the environment.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// Secret access key.
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`; default true, which
    /// every S3-compatible server accepts).
    #[serde(default = "yes")]
    pub force_path_style: bool,
    /// Pack files are closed at this size (default 32 MiB).
    #[serde(default = "default_pack_kib")]
    pub pack_size_kib: u64,
    /// How often the uploader looks for newly committed epochs and puts
    /// them as one segment per guest (default 20 000 ms: 180 segments, and
    /// at most 180 partial packs with their indexes, per guest-hour; also
    /// about how far S3 lags the store).
    #[serde(default = "default_interval_ms")]
    pub upload_interval_ms: u64,
    /// Timeout of one request attempt (default 30 s).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Allow a plain `http://` endpoint on another host than this one
    /// (default false: credentials, history and leases would cross the
    /// network in the clear). Loopback endpoints need no permission.
    #[serde(default)]
    pub allow_http: bool,
    /// Key file that encrypts the history before it leaves this host
    /// (`remus key new` writes one; default none: objects are stored as
    /// they are, checksummed but readable by whoever can read the bucket).
    /// Every key in it decrypts, the newest encrypts.
    #[serde(default)]
    pub encryption_keys: Option<std::path::PathBuf>,
    /// With `encryption-keys`, also read objects that are not encrypted
    /// (a tier written before encryption was turned on; default false:
    /// such an object is refused, since anyone who can write the bucket
    /// could have put it there).
    #[serde(default)]
    pub accept_plaintext: bool,
    /// Server-side encryption asked of S3 on every put: `AES256` or
    /// `aws:kms` (default none). On top of `encryption-keys`, not instead:
    /// the provider holds those keys.
    #[serde(default)]
    pub server_side_encryption: Option<String>,
    /// KMS key for `server-side-encryption = "aws:kms"` (default: the
    /// bucket's).
    #[serde(default)]
    pub sse_kms_key_id: Option<String>,
}

fn yes() -> bool {
    true
}

fn default_pack_kib() -> u64 {
    32 << 10
}

fn default_interval_ms() -> u64 {
    20_000
}

fn default_timeout_ms() -> u64 {
    30_000
}

/// Whether the authority of a URL (`host[:port][/...]`) names this host.
fn is_loopback(authority: &str) -> bool {
    let authority = authority.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl S3Config {
    /// A configuration for `bucket` and `prefix` with every default.
    #[must_use]
    pub fn new(bucket: &str, prefix: &str) -> Self {
        Self {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            force_path_style: true,
            pack_size_kib: default_pack_kib(),
            upload_interval_ms: default_interval_ms(),
            timeout_ms: default_timeout_ms(),
            allow_http: false,
            encryption_keys: None,
            accept_plaintext: false,
            server_side_encryption: None,
            sse_kms_key_id: None,
        }
    }

    /// Parses `s3://BUCKET/PREFIX` into bucket and prefix, keeping the
    /// other settings of `self`.
    ///
    /// # Errors
    /// [`S3Error::Config`] when it is not such a URL.
    pub fn with_url(mut self, url: &str) -> Result<Self, S3Error> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| S3Error::Config(format!("{url:?} is not an s3://BUCKET/PREFIX URL")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        self.bucket = bucket.to_string();
        self.prefix = prefix.trim_matches('/').to_string();
        self.validate()?;
        Ok(self)
    }

    /// Checks every value.
    ///
    /// # Errors
    /// [`S3Error::Config`] naming the bad key.
    pub fn validate(&self) -> Result<(), S3Error> {
        let bad = |m: String| Err(S3Error::Config(m));
        let b = &self.bucket;
        if !(3..=63).contains(&b.len())
            || !b.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
            || b.starts_with(['-', '.'])
        {
            return bad(format!("s3.bucket {b:?} is not a valid bucket name (3-63 of a-z, 0-9, '-', '.')"));
        }
        if self.prefix.starts_with('/') || self.prefix.ends_with('/') || self.prefix.contains("//") {
            return bad(format!("s3.prefix {:?} must not start or end with '/' or contain '//'", self.prefix));
        }
        if let Some(e) = &self.endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) || e.len() < 10 {
                return bad(format!("s3.endpoint {e:?} must be an http:// or https:// URL"));
            }
        }
        let from_env = std::env::var("AWS_ENDPOINT_URL").ok();
        if let Some(e) = self.endpoint.as_ref().or(from_env.as_ref()) {
            if let Some(rest) = e.strip_prefix("http://") {
                if !self.allow_http && !is_loopback(rest) {
                    return bad(format!(
                        "s3 endpoint {e:?} is plain http to another host: credentials, history and leases would cross the network \
                         in the clear; use https://, or set s3.allow-http = true"
                    ));
                }
            }
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return bad("s3.access-key-id and s3.secret-access-key go together".into());
        }
        if !(64..=(1 << 20)).contains(&self.pack_size_kib) {
            return bad(format!("s3.pack-size-kib must be in 64..=1048576, got {}", self.pack_size_kib));
        }
        if !(10..=3_600_000).contains(&self.upload_interval_ms) {
            return bad(format!("s3.upload-interval-ms must be in 10..=3600000, got {}", self.upload_interval_ms));
        }
        match self.server_side_encryption.as_deref() {
            None | Some("AES256" | "aws:kms" | "aws:kms:dsse") => {}
            Some(other) => return bad(format!("s3.server-side-encryption must be AES256, aws:kms or aws:kms:dsse, got {other:?}")),
        }
        if self.sse_kms_key_id.is_some() && !self.server_side_encryption.as_deref().is_some_and(|s| s.starts_with("aws:kms")) {
            return bad("s3.sse-kms-key-id needs s3.server-side-encryption = \"aws:kms\"".into());
        }
        if self.accept_plaintext && self.encryption_keys.is_none() {
            return bad("s3.accept-plaintext is for a tier with s3.encryption-keys set".into());
        }
        if self.timeout_ms < 100 {
            return bad(format!("s3.timeout-ms must be at least 100, got {}", self.timeout_ms));
        }
        Ok(())
    }

    /// Pack size in bytes.
    #[must_use]
    pub fn pack_bytes(&self) -> usize {
        (self.pack_size_kib as usize) << 10
    }

    /// Pause between upload passes.
    #[must_use]
    pub fn upload_interval(&self) -> Duration {
        Duration::from_millis(self.upload_interval_ms)
    }

    /// Where the history lives, as `s3://BUCKET/PREFIX`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_refused_off_this_host_unless_allowed() {
        let with =
            |endpoint: &str, allow_http: bool| S3Config { endpoint: Some(endpoint.into()), allow_http, ..S3Config::new("bucket", "p") };
        for local in ["http://127.0.0.1:9000", "http://localhost:9000/", "http://[::1]:9000", "https://s3.example.com"] {
            with(local, false).validate().unwrap_or_else(|e| panic!("{local}: {e}"));
        }
        let err = with("http://10.0.0.5:9000", false).validate().unwrap_err().to_string();
        assert!(err.contains("plain http to another host") && err.contains("allow-http"), "{err}");
        assert!(with("http://s3.example.com", false).validate().is_err());
        with("http://10.0.0.5:9000", true).validate().unwrap();
        assert!(with("ftp://x.example.com", true).validate().is_err());
    }
}
