//! What the tokengate filter and control plane must agree on: the token format and the
//! `/v1/sync` messages. Serde only, so it builds for wasm32 and natively alike.

pub mod sync;
pub mod token;

pub use sync::{Kind, SyncRecord, SyncResponse, SyncStatus};
