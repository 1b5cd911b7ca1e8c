//! What the tokengate filter and control plane must agree on: the token format and the
//! `/v1/sync`, `/v1/usage` and `/v1/fleet` messages, and the scope and quota
//! rules both sides apply. Serde only, so it builds for wasm32 and natively alike.

pub mod fleet;
pub mod quota;
pub mod scope;
pub mod sync;
pub mod token;
pub mod usage;

pub use fleet::{FleetAnswer, FleetReport, QuotaGrant, QuotaHeld, Share, TokenDemand};
pub use quota::{Period, Quota};
pub use scope::{Rule, SyncScope};
pub use sync::{Kind, LimitScope, SyncRecord, SyncResponse, SyncStatus};
pub use usage::{UsageEntry, UsageReport};
