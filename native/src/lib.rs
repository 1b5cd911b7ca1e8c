//! tokengate as an Envoy dynamic module: the same filter as the proxy-wasm flavor (same
//! plugin configuration, answers, headers, stats, sync and usage protocol), built on the same
//! core (`tokengate-filter`), loaded in process by `envoy.filters.http.dynamic_modules`.
//!
//! `abi` holds the bindings and every `unsafe` of the crate; `plugin` is the glue; `store`
//! keeps token records and rate state in memory shared by the workers.

// The hooks catch panics so that none unwinds into Envoy; under `panic = "abort"` a panic
// would take Envoy down instead. Build with `--profile native` (see the workspace manifest).
#[cfg(all(panic = "abort", not(test)))]
compile_error!(
    "tokengate-native needs unwinding to catch panics at the ABI boundary: build it with `cargo build --profile native -p tokengate-native` (make build)"
);

mod abi;
mod plugin;
mod store;
#[cfg(test)]
mod tests;

/// The plugin Envoy's hooks (in `abi`) drive.
type Module = plugin::Tokengate;
