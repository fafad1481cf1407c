//! A small blocking face over aws-sdk-s3: the few calls the tier makes,
//! with errors sorted into what callers branch on.
//!
//! The client owns a current-thread tokio runtime and blocks on it, so the
//! store stays synchronous; it must not be called from inside another
//! runtime's worker thread (the uploader and the commands run it on their
//! own threads).

use std::sync::OnceLock;
use std::time::Duration;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, ProvideCredentials, Region, SharedCredentialsProvider};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::{ObjectLockMode, ServerSideEncryption};
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};

use crate::S3Config;

/// Requests of one batch in flight at once (a restore reads an index and a
/// range from each of the packs it needs, in rounds of this many; 64
/// measured no faster than 16 against moto_server, which answers one
/// request at a time).
pub const PARALLEL: usize = 16;

/// An S3 failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum S3Error {
    /// The configuration is unusable.
    #[error("s3 configuration: {0}")]
    Config(String),
    /// The service could not be reached (connection refused, timeout, DNS).
    #[error("s3 unreachable ({op}): {detail}")]
    Unreachable {
        /// Operation.
        op: &'static str,
        /// What the client said.
        detail: String,
    },
    /// Credentials were refused or the caller may not do this.
    #[error("s3 access denied for access key id {access_key} on {op} {key} (check the credentials and their permissions): {detail}")]
    Denied {
        /// Operation.
        op: &'static str,
        /// Object key or bucket.
        key: String,
        /// Error code and message.
        detail: String,
        /// The access key id the request was signed with (the first
        /// thing to check: credentials may come from the config or from
        /// any of the AWS environment's sources).
        access_key: String,
    },
    /// A version under Object Lock retention: the service refuses to
    /// delete it until its retain-until date (COMPLIANCE mode: nobody can).
    #[error("s3 object {key} version {version} is locked (Object Lock retention): {detail}")]
    Locked {
        /// Object key.
        key: String,
        /// The version refused.
        version: String,
        /// Error code and message.
        detail: String,
    },
    /// The bucket does not exist.
    #[error("s3 bucket {0:?} does not exist")]
    NoSuchBucket(String),
    /// The object does not exist.
    #[error("s3 object {0} does not exist")]
    NotFound(String),
    /// A conditional put found the key taken (HTTP 412).
    #[error("s3 object {0} already exists")]
    Exists(String),
    /// Another writer holds a key this writer needs.
    #[error("s3 conflict: {0}")]
    Conflict(String),
    /// Anything else the service answered.
    #[error("s3 {op} {key}: {detail}")]
    Service {
        /// Operation.
        op: &'static str,
        /// Object key.
        key: String,
        /// Error code and message.
        detail: String,
    },
}

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Key relative to the tier's prefix.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
}

/// One version of an object (versioned buckets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedVersion {
    /// Key relative to the tier's prefix.
    pub key: String,
    /// Version id.
    pub version: String,
}

/// A blocking S3 client bound to one bucket and prefix.
pub struct S3Client {
    rt: tokio::runtime::Runtime,
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    credentials: Option<SharedCredentialsProvider>,
    /// Resolved on the first denial, for its message.
    access_key: OnceLock<String>,
    /// Server-side encryption asked on every put, and its KMS key.
    sse: Option<(ServerSideEncryption, Option<String>)>,
}

/// A put of `key` to `bucket` with the client's server-side encryption,
/// for the caller to add its condition and body to.
fn put(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    sse: &Option<(ServerSideEncryption, Option<String>)>,
) -> aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder {
    let p = client.put_object().bucket(bucket).key(key);
    match sse {
        None => p,
        Some((mode, kms)) => p.server_side_encryption(mode.clone()).set_ssekms_key_id(kms.clone()),
    }
}

impl std::fmt::Debug for S3Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Client(s3://{}/{})", self.bucket, self.prefix)
    }
}

fn classify<E: ProvideErrorMetadata + std::error::Error + 'static, R>(op: &'static str, key: &str, e: SdkError<E, R>) -> S3Error
where
    R: std::fmt::Debug,
{
    match &e {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            S3Error::Unreachable { op, detail: chain(&e) }
        }
        SdkError::ServiceError(se) => {
            let err = se.err();
            let code = err.code().unwrap_or("").to_string();
            let detail = format!("{code}: {}", err.message().unwrap_or(""));
            let status = format!("{:?}", se.raw());
            match code.as_str() {
                "NoSuchBucket" => S3Error::NoSuchBucket(key.to_string()),
                "NoSuchKey" | "NotFound" => S3Error::NotFound(key.to_string()),
                "PreconditionFailed" => S3Error::Exists(key.to_string()),
                "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "InvalidToken" | "ExpiredToken" => {
                    S3Error::Denied { op, key: key.to_string(), detail, access_key: String::new() }
                }
                _ if status.contains("StatusCode(412)") => S3Error::Exists(key.to_string()),
                _ if status.contains("StatusCode(404)") => S3Error::NotFound(key.to_string()),
                // A HEAD answer has no body, so no code either.
                "" if status.contains("StatusCode(403)") => {
                    S3Error::Denied { op, key: key.to_string(), detail: "HTTP 403 Forbidden".into(), access_key: String::new() }
                }
                _ if status.contains("StatusCode(403)") => S3Error::Denied { op, key: key.to_string(), detail, access_key: String::new() },
                _ => S3Error::Service { op, key: key.to_string(), detail },
            }
        }
        _ => S3Error::Service { op, key: key.to_string(), detail: chain(&e) },
    }
}

/// An error and its sources, one line: "dispatch failure: io error: ...".
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let m = s.to_string();
        if !msg.ends_with(&m) {
            msg.push_str(": ");
            msg.push_str(&m);
        }
        src = s.source();
    }
    msg
}

impl S3Client {
    /// Builds a client for `cfg` (no request is made yet).
    ///
    /// # Errors
    /// [`S3Error::Config`] for an invalid configuration.
    pub fn new(cfg: &S3Config) -> Result<Self, S3Error> {
        cfg.validate()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| S3Error::Config(format!("starting the s3 runtime: {e}")))?;
        let http = aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https();
        let timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_attempt_timeout(Duration::from_millis(cfg.timeout_ms))
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http).timeout_config(timeouts);
        if let Some(r) = &cfg.region {
            loader = loader.region(Region::new(r.clone()));
        }
        if let (Some(id), Some(secret)) = (&cfg.access_key_id, &cfg.secret_access_key) {
            loader = loader.credentials_provider(Credentials::new(id, secret, None, None, "remus-config"));
        }
        if let Some(ep) = &cfg.endpoint {
            loader = loader.endpoint_url(ep);
        }
        let sdk = rt.block_on(loader.load());
        let mut b = aws_sdk_s3::config::Builder::from(&sdk).force_path_style(cfg.force_path_style);
        if sdk.region().is_none() {
            b = b.region(Region::new("us-east-1"));
        }
        let client = aws_sdk_s3::Client::from_conf(b.build());
        Ok(Self {
            rt,
            client,
            bucket: cfg.bucket.clone(),
            prefix: cfg.prefix.clone(),
            credentials: sdk.credentials_provider(),
            access_key: OnceLock::new(),
            sse: cfg.server_side_encryption.as_deref().map(|m| (ServerSideEncryption::from(m), cfg.sse_kms_key_id.clone())),
        })
    }

    /// Names the access key in a denial: which credentials the request
    /// carried is the first question, and they may come from the config
    /// or from any source of the AWS environment. Called outside the
    /// runtime (it blocks on it to resolve the credentials once).
    fn named(&self, e: S3Error) -> S3Error {
        match e {
            S3Error::Denied { op, key, detail, .. } => {
                let access_key = self.access_key.get_or_init(|| {
                    let Some(p) = &self.credentials else { return "(none: anonymous)".into() };
                    match self.rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), p.provide_credentials()).await }) {
                        Ok(Ok(c)) => c.access_key_id().to_string(),
                        Ok(Err(e)) => format!("(unresolved: {e})"),
                        Err(_) => "(unresolved: timed out)".into(),
                    }
                });
                S3Error::Denied { op, key, detail, access_key: access_key.clone() }
            }
            other => other,
        }
    }

    /// The bucket.
    #[must_use]
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Full key of `rel` under the prefix.
    #[must_use]
    pub fn key(&self, rel: &str) -> String {
        if self.prefix.is_empty() {
            rel.to_string()
        } else {
            format!("{}/{rel}", self.prefix)
        }
    }

    fn rel(&self, full: &str) -> String {
        if self.prefix.is_empty() {
            full.to_string()
        } else {
            full.strip_prefix(&self.prefix).map_or(full, |r| r.trim_start_matches('/')).to_string()
        }
    }

    /// Checks that the bucket is reachable with these credentials.
    ///
    /// # Errors
    /// [`S3Error::Unreachable`], [`S3Error::Denied`], [`S3Error::NoSuchBucket`].
    pub fn check(&self) -> Result<(), S3Error> {
        self.rt.block_on(self.client.head_bucket().bucket(&self.bucket).send()).map_err(|e| {
            match classify("head-bucket", &self.bucket, e) {
                S3Error::NotFound(_) => S3Error::NoSuchBucket(self.bucket.clone()),
                other => self.named(other),
            }
        })?;
        Ok(())
    }

    /// Creates the bucket (with Object Lock enabled when `object_lock`,
    /// which also turns on versioning); an existing bucket of ours is fine.
    ///
    /// # Errors
    /// As the service answers.
    pub fn create_bucket(&self, object_lock: bool) -> Result<(), S3Error> {
        let r = self.rt.block_on(self.client.create_bucket().bucket(&self.bucket).object_lock_enabled_for_bucket(object_lock).send());
        match r {
            Ok(_) => Ok(()),
            Err(e) => match classify("create-bucket", &self.bucket, e) {
                S3Error::Service { detail, .. } if detail.starts_with("BucketAlreadyOwnedByYou") => Ok(()),
                other => Err(self.named(other)),
            },
        }
    }

    /// Puts `body` at `rel` only if no object is there (`If-None-Match: *`).
    ///
    /// # Errors
    /// [`S3Error::Exists`] when the key is taken; others as the service answers.
    pub fn put_new(&self, rel: &str, body: Vec<u8>) -> Result<(), S3Error> {
        let key = self.key(rel);
        self.rt
            .block_on(put(&self.client, &self.bucket, &key, &self.sse).if_none_match("*").body(ByteStream::from(body)).send())
            .map_err(|e| self.named(classify("put", &key, e)))?;
        Ok(())
    }

    /// Reads `rel` with its entity tag, for a later [`put_if_match`](Self::put_if_match).
    ///
    /// # Errors
    /// [`S3Error::NotFound`]; others as the service answers.
    pub fn get_tagged(&self, rel: &str) -> Result<(Vec<u8>, String), S3Error> {
        let key = self.key(rel);
        self.rt
            .block_on(async {
                let r = self.client.get_object().bucket(&self.bucket).key(&key).send().await.map_err(|e| classify("get", &key, e))?;
                let etag = r.e_tag().map(str::to_string).ok_or_else(|| S3Error::Service {
                    op: "get",
                    key: key.clone(),
                    detail: "no ETag in the answer".into(),
                })?;
                let body = r.body.collect().await.map_err(|e| S3Error::Unreachable { op: "get", detail: format!("{key}: {e}") })?;
                Ok((body.into_bytes().to_vec(), etag))
            })
            .map_err(|e| self.named(e))
    }

    /// As [`put_new`](Self::put_new), returning the new object's entity tag.
    ///
    /// # Errors
    /// [`S3Error::Exists`] when the key is taken; others as the service answers.
    pub fn put_new_tagged(&self, rel: &str, body: Vec<u8>) -> Result<String, S3Error> {
        let key = self.key(rel);
        let r = self
            .rt
            .block_on(put(&self.client, &self.bucket, &key, &self.sse).if_none_match("*").body(ByteStream::from(body)).send())
            .map_err(|e| self.named(classify("put", &key, e)))?;
        r.e_tag().map(str::to_string).ok_or_else(|| S3Error::Service { op: "put", key, detail: "no ETag in the answer".into() })
    }

    /// Replaces `rel` only if it still has entity tag `etag` (`If-Match`):
    /// a compare-and-swap. Returns the new entity tag.
    ///
    /// # Errors
    /// [`S3Error::Conflict`] when the object changed (or is gone) since
    /// `etag` was read; others as the service answers.
    pub fn put_if_match(&self, rel: &str, body: Vec<u8>, etag: &str) -> Result<String, S3Error> {
        let key = self.key(rel);
        let r = self
            .rt
            .block_on(put(&self.client, &self.bucket, &key, &self.sse).if_match(etag).body(ByteStream::from(body)).send())
            .map_err(|e| match classify("put", &key, e) {
                // 412 (changed) or 404 (deleted): the precondition failed.
                S3Error::Exists(_) | S3Error::NotFound(_) => S3Error::Conflict(format!("{key} is no longer {etag}")),
                e => self.named(e),
            })?;
        r.e_tag().map(str::to_string).ok_or_else(|| S3Error::Service { op: "put", key, detail: "no ETag in the answer".into() })
    }

    /// Conditional puts of many objects, up to [`PARALLEL`] requests at a time (an
    /// epoch object per epoch would otherwise cost one round trip each);
    /// one result per object, in order.
    #[must_use]
    pub fn put_many_new(&self, objects: Vec<(String, Vec<u8>)>) -> Vec<Result<(), S3Error>> {
        let results = self.rt.block_on(async {
            let n = objects.len();
            let mut out: Vec<Option<Result<(), S3Error>>> = (0..n).map(|_| None).collect();
            let mut set = tokio::task::JoinSet::new();
            let mut todo = objects.into_iter().enumerate();
            loop {
                while set.len() < PARALLEL {
                    let Some((i, (rel, body))) = todo.next() else { break };
                    let req = put(&self.client, &self.bucket, &self.key(&rel), &self.sse).if_none_match("*").body(ByteStream::from(body));
                    let key = self.key(&rel);
                    set.spawn(async move {
                        let r = req.send().await;
                        (i, r.map(|_| ()).map_err(|e| classify("put", &key, e)))
                    });
                }
                let Some(done) = set.join_next().await else { break };
                match done {
                    Ok((i, r)) => out[i] = Some(r),
                    Err(e) => return vec![Err(S3Error::Config(format!("s3 task failed: {e}")))],
                }
            }
            out.into_iter().map(|o| o.unwrap_or_else(|| Err(S3Error::Config("s3 put not run".into())))).collect::<Vec<_>>()
        });
        results.into_iter().map(|r| r.map_err(|e| self.named(e))).collect()
    }

    /// Puts `body` at `rel` under Object Lock in COMPLIANCE mode until
    /// `retain_until_unix_s`: no one can delete that version before then.
    ///
    /// # Errors
    /// As the service answers.
    pub fn put_locked(&self, rel: &str, body: Vec<u8>, retain_until_unix_s: i64) -> Result<(), S3Error> {
        let key = self.key(rel);
        self.rt
            .block_on(
                put(&self.client, &self.bucket, &key, &self.sse)
                    .object_lock_mode(ObjectLockMode::Compliance)
                    .object_lock_retain_until_date(DateTime::from_secs(retain_until_unix_s))
                    .body(ByteStream::from(body))
                    .send(),
            )
            .map_err(|e| self.named(classify("put-locked", &key, e)))?;
        Ok(())
    }

    /// The server-side encryption S3 reports for the object at `rel`.
    ///
    /// # Errors
    /// [`S3Error::NotFound`]; others as the service answers.
    pub fn server_side_encryption(&self, rel: &str) -> Result<Option<String>, S3Error> {
        let key = self.key(rel);
        let r = self
            .rt
            .block_on(self.client.head_object().bucket(&self.bucket).key(&key).send())
            .map_err(|e| self.named(classify("head", &key, e)))?;
        Ok(r.server_side_encryption().map(|s| s.as_str().to_string()))
    }

    /// Reads the whole object at `rel`.
    ///
    /// # Errors
    /// [`S3Error::NotFound`]; others as the service answers.
    pub fn get(&self, rel: &str) -> Result<Vec<u8>, S3Error> {
        let key = self.key(rel);
        self.rt.block_on(get_async(&self.client, &self.bucket, key)).map_err(|e| self.named(e))
    }

    /// Reads `len` bytes at `offset` of the object at `rel` (a ranged
    /// GET): one chunk of a pack without fetching the pack.
    ///
    /// # Errors
    /// [`S3Error::NotFound`]; [`S3Error::Unreachable`] for an answer of
    /// another length; others as the service answers.
    pub fn get_range(&self, rel: &str, offset: u64, len: u64) -> Result<Vec<u8>, S3Error> {
        let key = self.key(rel);
        let bytes = self.rt.block_on(get_range_async(&self.client, &self.bucket, key.clone(), offset, len)).map_err(|e| self.named(e))?;
        if bytes.len() as u64 != len {
            return Err(S3Error::Unreachable { op: "get", detail: format!("{key}: {} bytes answered for a range of {len}", bytes.len()) });
        }
        Ok(bytes)
    }

    /// Ranged reads of many objects (`(rel, offset, len)`), up to [`PARALLEL`]
    /// requests at a time; results in order. A range that runs past the
    /// end of its object answers what there is (the caller judges it).
    ///
    /// # Errors
    /// The first failure, as [`get_range`](Self::get_range).
    pub fn get_ranges(&self, ranges: &[(String, u64, u64)]) -> Result<Vec<Vec<u8>>, S3Error> {
        self.gets(ranges.iter().map(|(rel, offset, len)| (rel.as_str(), Some((*offset, *len)))).collect())
    }

    /// Reads many objects, up to [`PARALLEL`] requests at a time; results in order.
    ///
    /// # Errors
    /// The first failure.
    pub fn get_many(&self, rels: &[String]) -> Result<Vec<Vec<u8>>, S3Error> {
        self.gets(rels.iter().map(|rel| (rel.as_str(), None)).collect())
    }

    /// Reads each `(rel, range)` (the whole object without one), up to [`PARALLEL`]
    /// requests at a time; results in order.
    fn gets(&self, requests: Vec<(&str, Option<(u64, u64)>)>) -> Result<Vec<Vec<u8>>, S3Error> {
        let r = self.rt.block_on(async {
            let mut out: Vec<Option<Vec<u8>>> = vec![None; requests.len()];
            let mut set = tokio::task::JoinSet::new();
            let mut next = 0;
            while next < requests.len() || !set.is_empty() {
                while next < requests.len() && set.len() < PARALLEL {
                    let (rel, range) = requests[next];
                    let (c, b, k, i) = (self.client.clone(), self.bucket.clone(), self.key(rel), next);
                    set.spawn(async move {
                        let r = match range {
                            Some((offset, len)) => get_range_async(&c, &b, k, offset, len).await,
                            None => get_async(&c, &b, k).await,
                        };
                        (i, r)
                    });
                    next += 1;
                }
                if let Some(done) = set.join_next().await {
                    let (i, r) = done.map_err(|e| S3Error::Config(format!("s3 task failed: {e}")))?;
                    out[i] = Some(r?);
                }
            }
            Ok(out.into_iter().map(|o| o.expect("every request answered")).collect())
        });
        r.map_err(|e| self.named(e))
    }

    /// The "folders" directly under `rel_prefix` (which ends in `/`): the
    /// distinct key prefixes up to the next `/`, each once, in key order,
    /// without listing the objects below them.
    ///
    /// # Errors
    /// As the service answers.
    pub fn list_folders(&self, rel_prefix: &str) -> Result<Vec<String>, S3Error> {
        let mut out = Vec::new();
        self.list_pages(rel_prefix, Some("/"), |r| {
            out.extend(r.common_prefixes().iter().filter_map(|p| p.prefix()).map(|p| self.rel(p)));
        })?;
        Ok(out)
    }

    /// Every object under `rel_prefix`, in key order.
    ///
    /// # Errors
    /// As the service answers.
    pub fn list(&self, rel_prefix: &str) -> Result<Vec<Listed>, S3Error> {
        let mut out = Vec::new();
        self.list_pages(rel_prefix, None, |r| {
            for o in r.contents() {
                if let Some(k) = o.key() {
                    out.push(Listed { key: self.rel(k), size: o.size().unwrap_or(0).max(0) as u64 });
                }
            }
        })?;
        Ok(out)
    }

    /// Hands each page of a listing of `rel_prefix` (grouped at
    /// `delimiter`, if any) to `each`, following continuation tokens.
    fn list_pages(
        &self,
        rel_prefix: &str,
        delimiter: Option<&str>,
        mut each: impl FnMut(&aws_sdk_s3::operation::list_objects_v2::ListObjectsV2Output),
    ) -> Result<(), S3Error> {
        let full = self.key(rel_prefix);
        let mut token = None;
        loop {
            let request = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&full)
                .set_delimiter(delimiter.map(str::to_string))
                .set_continuation_token(token.take());
            let r = self.rt.block_on(request.send()).map_err(|e| self.named(classify("list", &full, e)))?;
            each(&r);
            match r.next_continuation_token() {
                Some(t) if r.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => return Ok(()),
            }
        }
    }

    /// Every object version under `rel_prefix` (versioned buckets).
    ///
    /// # Errors
    /// As the service answers.
    pub fn list_versions(&self, rel_prefix: &str) -> Result<Vec<ListedVersion>, S3Error> {
        let full = self.key(rel_prefix);
        let mut out = Vec::new();
        let (mut km, mut vm) = (None, None);
        loop {
            let r = self
                .rt
                .block_on(
                    self.client
                        .list_object_versions()
                        .bucket(&self.bucket)
                        .prefix(&full)
                        .set_key_marker(km.take())
                        .set_version_id_marker(vm.take())
                        .send(),
                )
                .map_err(|e| self.named(classify("list-versions", &full, e)))?;
            for v in r.versions() {
                if let (Some(k), Some(id)) = (v.key(), v.version_id()) {
                    out.push(ListedVersion { key: self.rel(k), version: id.to_string() });
                }
            }
            if r.is_truncated() != Some(true) {
                break;
            }
            km = r.next_key_marker().map(str::to_string);
            vm = r.next_version_id_marker().map(str::to_string);
        }
        Ok(out)
    }

    /// Deletes the object at `rel` (or one version of it).
    ///
    /// # Errors
    /// As the service answers; [`S3Error::Denied`] for a locked version.
    pub fn delete(&self, rel: &str, version: Option<&str>) -> Result<(), S3Error> {
        let key = self.key(rel);
        self.rt
            .block_on(self.client.delete_object().bucket(&self.bucket).key(&key).set_version_id(version.map(str::to_string)).send())
            .map_err(|e| match (classify("delete", &key, e), version) {
                // A version under retention is refused for Object Lock, not
                // for the credentials: say so rather than blame the keys.
                (S3Error::Denied { key, detail, op, access_key }, Some(v)) => match self.retention(&key, v) {
                    Some(until) => S3Error::Locked { key, version: v.to_string(), detail: format!("{detail}; retained until {until}") },
                    None => self.named(S3Error::Denied { op, key, detail, access_key }),
                },
                (e, _) => self.named(e),
            })?;
        Ok(())
    }

    /// The retain-until date of a version under Object Lock retention, if
    /// the service reports one (read from the version's head, which every
    /// Object Lock implementation tested here reports).
    fn retention(&self, key: &str, version: &str) -> Option<String> {
        let r = self.rt.block_on(self.client.head_object().bucket(&self.bucket).key(key).version_id(version).send()).ok()?;
        r.object_lock_mode()?;
        r.object_lock_retain_until_date().map(|d| d.to_string())
    }
}

async fn get_range_async(client: &aws_sdk_s3::Client, bucket: &str, key: String, offset: u64, len: u64) -> Result<Vec<u8>, S3Error> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let range = format!("bytes={offset}-{}", offset + len - 1);
    let r = match client.get_object().bucket(bucket).key(&key).range(range).send().await.map_err(|e| classify("get", &key, e)) {
        Ok(r) => r,
        // A range that starts past the end: nothing there.
        Err(S3Error::Service { detail, .. }) if detail.contains("InvalidRange") => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let body = r.body.collect().await.map_err(|e| S3Error::Unreachable { op: "get", detail: format!("{key}: {e}") })?;
    Ok(body.into_bytes().to_vec())
}

async fn get_async(client: &aws_sdk_s3::Client, bucket: &str, key: String) -> Result<Vec<u8>, S3Error> {
    let r = client.get_object().bucket(bucket).key(&key).send().await.map_err(|e| classify("get", &key, e))?;
    let body = r.body.collect().await.map_err(|e| S3Error::Unreachable { op: "get", detail: format!("{key}: {e}") })?;
    Ok(body.into_bytes().to_vec())
}
