//! A small S3 client for remus: the aws-sdk-s3 client (rustls on ring,
//! the crypto stack quinn uses; path-style addressing) behind blocking
//! calls, with the conditional puts (`If-None-Match: *`, `If-Match`),
//! versioned deletes and Object Lock that remus relies on, and one error
//! type whose variants callers branch on (not found, exists, conflict,
//! locked, unreachable, refused credentials).
//!
//! Its own crate so that what needs S3 alone (the history tier in
//! `remus-store`, a lease witness) does not pull in the rest, and so that
//! the SDK compiles beside RocksDB rather than before the store.

mod client;
mod config;

pub use client::{Listed, ListedVersion, S3Client, S3Error, PARALLEL};
pub use config::S3Config;
