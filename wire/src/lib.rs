//! What the tokengate filter and control plane must agree on: the token format and the
//! `/v1/sync` and `/v1/usage` messages. Serde only, so it builds for wasm32 and natively alike.

pub mod sync;
pub mod token;
pub mod usage;

pub use sync::{Kind, SyncRecord, SyncResponse, SyncStatus};
pub use usage::{UsageEntry, UsageReport};
