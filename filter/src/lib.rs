//! tokengate's filter: the host-agnostic core of both data-plane flavors, and the proxy-wasm
//! flavor's glue.
//!
//! The core is plain Rust with no host types, unit-tested natively: the decisions
//! (`authorize`, `gcra`, `record`, `config`, `response`, `grpc`, `forward`, `timefmt`), the
//! stats (`metrics`), the per-request flow (`request`), the sync and usage machines (`sync`,
//! `usage`, on the one `callout` machine) and the leader's orchestration (`leader`), written against small host
//! traits (`store`, `host`); `abi` holds the proxy-wasm ABI's encodings. `wasm` binds them to
//! the proxy-wasm ABI through status-checked host calls and is only built for wasm32; the
//! native flavor (the `tokengate-native` crate) binds them to Envoy's dynamic-module ABI.

pub mod abi;
pub mod authorize;
pub mod callout;
pub mod config;
pub mod fleet;
pub mod forward;
pub mod gcra;
pub mod grpc;
pub mod host;
pub mod leader;
pub mod metrics;
pub mod record;
pub mod request;
pub mod response;
pub mod scopes;
pub mod store;
pub mod sync;
pub mod timefmt;
pub mod usage;

#[cfg(test)]
mod properties;

#[cfg(target_arch = "wasm32")]
mod wasm;
