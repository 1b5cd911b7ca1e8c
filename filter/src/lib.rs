//! tokengate's proxy-wasm filter.
//!
//! The decisions live in plain Rust modules with no proxy-wasm types (`authorize`, `gcra`,
//! `metrics`, `record`, `sync`, `usage`, `config`, `response`, `grpc`, `forward`, `timefmt`,
//! and `abi`, the ABI's encodings) and are unit-tested natively; `glue` binds them to the
//! proxy-wasm ABI through `host`'s status-checked calls and is only built for wasm32.

pub mod abi;
pub mod authorize;
pub mod config;
pub mod forward;
pub mod gcra;
pub mod grpc;
pub mod metrics;
pub mod record;
pub mod response;
pub mod store;
pub mod sync;
pub mod timefmt;
pub mod usage;

#[cfg(test)]
mod properties;

#[cfg(target_arch = "wasm32")]
mod glue;
#[cfg(target_arch = "wasm32")]
mod host;
