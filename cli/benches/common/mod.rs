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
