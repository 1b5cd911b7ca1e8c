//! Tokens: what a creation, an edit, a status change or a rotation may do, and what it
//! becomes. Every change is a read, a decision here, and a write that succeeds only if the
//! token is still as read (another replica may have changed it meanwhile; then the decision
//! is taken again on the new state).

use super::{audit, scopes, DomainError};
use crate::policy::{Policy, Refusal};
use crate::rotation;
use crate::secrets;
use crate::store::{AuditEntry, AuditQuery, ListQuery, Status, Store, StoreError, TokenRow};
use std::ops::RangeInclusive;
use std::sync::Arc;
use tokengate_wire::quota::{Period, Quota, MAX_LIMIT};
use tokengate_wire::{Kind, LimitScope, UsageEntry};

/// Requests per second a limited token may be given (null: unlimited).
pub const MAX_RPS: RangeInclusive<u32> = 1..=1_000_000;
/// Requests a limited token may make at once.
pub const BURST: RangeInclusive<u32> = 1..=10_000_000;
/// `expires_in_seconds` at creation: a positive number of seconds, at most 100 years (further
/// is as good as never, and stays clear of the latest expiry for the next 7,800 years).
pub const EXPIRES_IN_SECONDS: RangeInclusive<u64> = 1..=36_500 * 86_400;
/// The latest expiry RFC 3339 can write with its four-digit year: 9999-12-31T23:59:59Z.
pub const MAX_EXPIRY: i64 = 253_402_300_799;
/// Attempts at a change that keeps meeting concurrent changes before giving up (409).
const ATTEMPTS: usize = 16;

impl From<Refusal> for DomainError {
    fn from(r: Refusal) -> DomainError {
        DomainError::Invalid {
            field: r.field,
            message: r.message,
        }
    }
}

/// A name or owner (see `crate::text`).
pub fn check_text(field: &'static str, v: &str) -> Result<(), DomainError> {
    crate::text::check(v).map_err(|m| DomainError::invalid(field, m))
}

pub fn check_max_rps(v: Option<u32>) -> Result<(), DomainError> {
    match v {
        Some(n) if !MAX_RPS.contains(&n) => Err(DomainError::invalid(
            "max_rps",
            format!(
                "must be between {} and {}, or null for unlimited",
                MAX_RPS.start(),
                MAX_RPS.end()
            ),
        )),
        _ => Ok(()),
    }
}

pub fn check_burst(burst: Option<u32>) -> Result<(), DomainError> {
    match burst {
        Some(n) if !BURST.contains(&n) => Err(DomainError::invalid(
            "burst",
            format!("must be between {} and {}", BURST.start(), BURST.end()),
        )),
        _ => Ok(()),
    }
}

/// A quota as a client gives it: the period is checked here, as it depends on whether the
/// server takes test periods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaInput {
    pub limit: u64,
    pub period: String,
}

/// The periods a quota may have: the shipped three, and `"<n>s"` when `test_periods`.
pub fn check_quota(q: &QuotaInput, test_periods: bool) -> Result<Quota, DomainError> {
    if !(1..=MAX_LIMIT).contains(&q.limit) {
        return Err(DomainError::invalid(
            "quota.limit",
            format!("must be between 1 and {MAX_LIMIT}"),
        ));
    }
    let period = Period::parse(&q.period)
        .filter(|p| test_periods || !matches!(p, Period::Seconds(_)))
        .ok_or_else(|| {
            DomainError::invalid("quota.period", "must be \"hour\", \"day\" or \"month\"")
        })?;
    Ok(Quota {
        limit: q.limit,
        period,
    })
}

const BURST_NEEDS_MAX_RPS: &str = "needs max_rps: an unlimited token has no burst";

/// An expiry being set at `now`, named by the field the client used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    pub at: Option<i64>,
    /// `expires_at` or `expires_in_seconds`.
    pub field: &'static str,
}

fn check_expiry(e: Expiry, now: i64) -> Result<(), DomainError> {
    let Some(t) = e.at else { return Ok(()) };
    if t <= now {
        return Err(DomainError::invalid(e.field, "must be in the future"));
    }
    if t > MAX_EXPIRY {
        let message = if e.field == "expires_in_seconds" {
            "must end by 9999-12-31T23:59:59Z"
        } else {
            "must be at most 9999-12-31T23:59:59Z"
        };
        return Err(DomainError::invalid(e.field, message));
    }
    Ok(())
}

/// A token to create.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub name: String,
    pub kind: Kind,
    /// `None`: the actor, for a user token; a service token must name its owner.
    pub owner: Option<String>,
    pub max_rps: Option<u32>,
    pub burst: Option<u32>,
    pub limit_scope: LimitScope,
    pub expiry: Expiry,
    /// Scope names; `None`: unrestricted.
    pub scopes: Option<Vec<String>>,
    pub quota: Option<QuotaInput>,
}

/// An edit: `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct Patch {
    pub name: Option<String>,
    /// `Some(None)`: unlimited (which also clears the burst).
    pub max_rps: Option<Option<u32>>,
    pub burst: Option<Option<u32>>,
    pub limit_scope: Option<LimitScope>,
    /// `Some(None)`: never (where the policy allows it).
    pub expires_at: Option<Option<i64>>,
    /// `Some(None)`: unrestricted.
    pub scopes: Option<Option<Vec<String>>>,
    /// `Some(None)`: no quota.
    pub quota: Option<Option<QuotaInput>>,
}

/// A token with its secret, which exists only in this answer.
#[derive(Debug, Clone)]
pub struct WithSecret {
    pub token: TokenRow,
    pub secret: String,
}

/// Whether a change leaves out a secret hash that the token carried (its `hash` or a
/// `retired` one). A poller that has not seen the token's previous version may hold that hash
/// as valid and would never hear of it again, so such a change raises the horizon, as a
/// purge does: a poller that far behind starts over from a snapshot.
fn drops_a_secret(before: &TokenRow, after: &TokenRow) -> bool {
    let kept = |h: &str| after.hash == h || after.retired.iter().any(|s| s.hash == h);
    !kept(&before.hash) || before.retired.iter().any(|s| !kept(&s.hash))
}

pub struct Tokens {
    store: Arc<dyn Store>,
    policy: Policy,
    /// Whether quotas may have a period of seconds (tests only).
    test_periods: bool,
}

impl Tokens {
    pub fn new(store: Arc<dyn Store>, policy: Policy) -> Tokens {
        Tokens {
            store,
            policy,
            test_periods: false,
        }
    }

    /// Takes quota periods of `"<n>s"` (for tests: the shipped periods are too long).
    pub fn with_test_quota_periods(mut self, on: bool) -> Tokens {
        self.test_periods = on;
        self
    }

    /// What each of `rows` used of its quota in the current period; tokens without a quota
    /// are left out.
    pub async fn quota_usage(
        &self,
        rows: &[TokenRow],
        now: i64,
    ) -> Result<std::collections::HashMap<String, super::quota::Usage>, DomainError> {
        let ids: Vec<String> = rows
            .iter()
            .filter(|r| r.quota.is_some())
            .map(|r| r.id.clone())
            .collect();
        if ids.is_empty() {
            return Ok(Default::default());
        }
        let spent = self.store.quota_spent(&ids, now).await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let q = r.quota?;
                Some((r.id.clone(), super::quota::usage(&r.id, q, &spent, now)))
            })
            .collect())
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    pub async fn create(
        &self,
        actor: &str,
        t: NewToken,
        now: i64,
    ) -> Result<WithSecret, DomainError> {
        check_text("name", &t.name)?;
        let owner = match (t.owner, t.kind) {
            (Some(o), _) => o,
            (None, Kind::User) => actor.to_string(),
            (None, Kind::Service) => {
                return Err(DomainError::invalid(
                    "owner",
                    "is required for service tokens: name the group that owns the automation",
                ))
            }
        };
        check_text("owner", &owner)?;
        check_max_rps(t.max_rps)?;
        check_burst(t.burst)?;
        if t.burst.is_some() && t.max_rps.is_none() {
            return Err(DomainError::invalid("burst", BURST_NEEDS_MAX_RPS));
        }
        check_expiry(t.expiry, now)?;
        let quota = t
            .quota
            .as_ref()
            .map(|q| check_quota(q, self.test_periods))
            .transpose()?;
        self.policy
            .check(t.kind, now, t.expiry.at, t.expiry.field)?;
        let scopes = t.scopes.map(scopes::token_scopes).transpose()?;
        if let Some(names) = &scopes {
            scopes::check_exist(self.store.as_ref(), names).await?;
        }
        let secret = secrets::new_token();
        let row = TokenRow {
            id: secrets::new_id(),
            hash: secrets::sha256_hex(secret.as_bytes()),
            name: t.name,
            kind: t.kind,
            owner,
            status: Status::Active,
            max_rps: t.max_rps,
            burst: t.burst,
            limit_scope: t.limit_scope,
            created_at: now,
            updated_at: now,
            expires_at: t.expiry.at,
            last_used_at: None,
            version: 0,
            requests_allowed: 0,
            requests_denied: 0,
            rotated_at: None,
            retired: vec![],
            scopes,
            quota,
        };
        let entry = audit::change(now, actor, audit::CREATED, None, &row);
        let token = self.store.insert(row, &entry).await?;
        Ok(WithSecret { token, secret })
    }

    /// A live token; a revoked one (kept only for the filters) says when it was revoked.
    pub async fn get(&self, id: &str) -> Result<TokenRow, DomainError> {
        match self.store.token(id).await? {
            None => Err(DomainError::NotFound),
            Some(r) if r.status == Status::Revoked => {
                Err(DomainError::Revoked { at: r.updated_at })
            }
            Some(r) => Ok(r),
        }
    }

    pub async fn list(&self, q: &ListQuery) -> Result<Vec<TokenRow>, DomainError> {
        Ok(self.store.list(q).await?)
    }

    pub async fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, DomainError> {
        Ok(self.store.audit(q).await?)
    }

    /// Adds reported request counts; returns how many entries named a known token.
    pub async fn record_usage(
        &self,
        entries: &[UsageEntry],
        now: i64,
    ) -> Result<usize, DomainError> {
        Ok(self.store.record_usage(now, entries).await?)
    }

    /// Reads the live token, lets `decide` change a copy, and writes it if it changed and
    /// nobody changed the token meanwhile; otherwise decides again on what is stored now.
    async fn change(
        &self,
        actor: &str,
        action: &'static str,
        id: &str,
        now: i64,
        decide: impl Fn(&mut TokenRow) -> Result<(), DomainError>,
    ) -> Result<TokenRow, DomainError> {
        for _ in 0..ATTEMPTS {
            let before = self.get(id).await?;
            let mut after = before.clone();
            decide(&mut after)?;
            if after == before {
                // Nothing changed: no version, no audit entry.
                return Ok(before);
            }
            after.updated_at = now;
            let entry = audit::change(now, actor, action, Some(&before), &after);
            let dropped = drops_a_secret(&before, &after);
            match self
                .store
                .replace(after, before.version, &entry, dropped)
                .await
            {
                Err(StoreError::Stale) => continue,
                other => return Ok(other?),
            }
        }
        Err(DomainError::Conflict(
            "The token keeps changing concurrently; try again.".into(),
        ))
    }

    pub async fn update(
        &self,
        actor: &str,
        id: &str,
        patch: Patch,
        now: i64,
    ) -> Result<TokenRow, DomainError> {
        if let Some(name) = &patch.name {
            check_text("name", name)?;
        }
        if let Some(max_rps) = patch.max_rps {
            check_max_rps(max_rps)?;
        }
        if let Some(burst) = patch.burst {
            check_burst(burst)?;
            if burst.is_some() && patch.max_rps == Some(None) {
                return Err(DomainError::invalid("burst", BURST_NEEDS_MAX_RPS));
            }
        }
        if let Some(Some(t)) = patch.expires_at {
            check_expiry(
                Expiry {
                    at: Some(t),
                    field: "expires_at",
                },
                now,
            )?;
        }
        let scopes = match patch.scopes.clone() {
            Some(Some(names)) => {
                let names = scopes::token_scopes(names)?;
                scopes::check_exist(self.store.as_ref(), &names).await?;
                Some(Some(names))
            }
            other => other,
        };
        let quota = match &patch.quota {
            Some(Some(q)) => Some(Some(check_quota(q, self.test_periods)?)),
            Some(None) => Some(None),
            None => None,
        };
        let policy = self.policy;
        self.change(actor, audit::UPDATED, id, now, |row| {
            if let Some(s) = &scopes {
                row.scopes = s.clone();
            }
            if let Some(q) = quota {
                row.quota = q;
            }
            if let Some(name) = &patch.name {
                row.name = name.clone();
            }
            if let Some(max_rps) = patch.max_rps {
                row.max_rps = max_rps;
                if max_rps.is_none() {
                    row.burst = None;
                }
            }
            if let Some(burst) = patch.burst {
                row.burst = burst;
            }
            if let Some(scope) = patch.limit_scope {
                row.limit_scope = scope;
            }
            if let Some(e) = patch.expires_at {
                row.expires_at = e;
                policy.check(row.kind, now, e, "expires_at")?;
            }
            // Only the token as stored can have made this burst unlimited: the request
            // alone was fine, so this is a conflict with the token rather than bad input.
            if row.burst.is_some() && row.max_rps.is_none() {
                return Err(DomainError::StateConflict {
                    field: "burst",
                    message: format!(
                        "{BURST_NEEDS_MAX_RPS}; give max_rps with it, or set max_rps first"
                    ),
                });
            }
            Ok(())
        })
        .await
    }

    /// Suspends, reactivates or revokes. Setting the status a token already has changes
    /// nothing and takes no version.
    pub async fn set_status(
        &self,
        actor: &str,
        id: &str,
        to: Status,
        now: i64,
    ) -> Result<TokenRow, DomainError> {
        let action = match to {
            Status::Active => audit::REACTIVATED,
            Status::Suspended => audit::SUSPENDED,
            Status::Revoked => audit::REVOKED,
        };
        self.change(actor, action, id, now, |row| {
            row.status = to;
            Ok(())
        })
        .await
    }

    /// Issues a new secret for the token; the old one works for `grace` seconds more.
    pub async fn rotate(
        &self,
        actor: &str,
        id: &str,
        grace: u64,
        now: i64,
    ) -> Result<WithSecret, DomainError> {
        if grace > rotation::MAX_GRACE_SECONDS {
            return Err(DomainError::invalid(
                "grace_seconds",
                format!("must be at most {} (30 days)", rotation::MAX_GRACE_SECONDS),
            ));
        }
        let secret = secrets::new_token();
        let hash = secrets::sha256_hex(secret.as_bytes());
        let token = self
            .change(actor, audit::ROTATED, id, now, |row| {
                rotation::rotate(row, hash.clone(), now, grace);
                Ok(())
            })
            .await?;
        Ok(WithSecret { token, secret })
    }
}
