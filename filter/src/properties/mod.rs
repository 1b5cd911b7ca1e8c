//! Property tests over the filter's parsers and decisions: header extraction, shared-data
//! records, sync answers, plugin configuration and GCRA. `make test` runs them with
//! proptest's default case count, `make fuzz` with many more (`PROPTEST_CASES`). They live in
//! the crate because the in-memory store they drive (`store::fake`) is test-only.

mod config;
mod gcra;
mod headers;
mod records;
mod sync;

use crate::config::Config;
use proptest::prelude::*;
use tokengate_wire::token;

fn cfg() -> Config {
    Config::parse(br#"{"control_plane_cluster":"cp","sync_token":"x","sync_wait_seconds":5}"#)
        .unwrap()
}

/// A well-formed token secret.
fn secret() -> impl Strategy<Value = String> + Clone {
    "[0-9A-Za-z]{32}".prop_map(|r| token::compose(&r).unwrap())
}
