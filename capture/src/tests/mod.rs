//! The capture crate's suites: the engine on a virtual clock with a fake
//! guest, and real arena guests.

mod arena;
mod engine;
