//! What the tokengate filter and control plane must agree on: the token format and the
//! `/v1/sync`, `/v1/usage` and `/v1/fleet` messages. Serde only, so it builds for wasm32 and natively alike.

pub mod fleet;
pub mod sync;
pub mod token;
pub mod usage;

pub use fleet::{FleetAnswer, FleetReport, Share, TokenDemand};
pub use sync::{Kind, LimitScope, SyncRecord, SyncResponse, SyncStatus};
pub use usage::{UsageEntry, UsageReport};
