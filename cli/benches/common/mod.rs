//! What the benchmarks share.

/// A comma-separated list from the environment variable `name`, else
/// from `default`.
///
/// # Panics
/// When an item does not parse (a benchmark's settings are its input).
pub fn env_list<T: std::str::FromStr>(name: &str, default: &str) -> Vec<T> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().parse().unwrap_or_else(|_| panic!("{name}: cannot parse {s:?}")))
        .collect()
}

/// An S3 configuration for `bucket` and `prefix` on the test server at
/// `endpoint` (any key; the region it expects).
#[allow(dead_code)]
pub fn s3_config(endpoint: &str, bucket: &str, prefix: &str) -> remus_store::s3::S3Config {
    let mut cfg = remus_store::s3::S3Config::new(bucket, prefix);
    cfg.endpoint = Some(endpoint.into());
    cfg.region = Some("us-east-1".into());
    cfg.access_key_id = Some("test".into());
    cfg.secret_access_key = Some("test".into());
    cfg
}
