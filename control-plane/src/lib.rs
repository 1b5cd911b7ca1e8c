//! tokengate control plane: token API, `/v1/sync` for the filters, and the CLI client.

pub mod api;
pub mod app;
pub mod client;
pub mod connections;
pub mod console;
pub mod domain;
pub mod duration;
pub mod metrics;
pub mod migrate;
pub mod policy;
pub mod rotation;
pub mod secrets;
pub mod serve;
pub mod store;
pub mod strength;
pub mod text;
pub mod throttle;
pub mod webhook;
