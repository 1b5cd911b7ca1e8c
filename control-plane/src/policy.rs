//! Expiry policy per token kind, set by the operator at `tokengate serve`.

use crate::duration;
use tokengate_wire::Kind;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindPolicy {
    /// Longest a token may stay valid, counted from when its expiry is set (seconds).
    pub max_lifetime: Option<u64>,
    /// A token must have an expiry (implied by `max_lifetime`).
    pub require_expiry: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    pub user: KindPolicy,
    pub service: KindPolicy,
}

/// A policy refusal: the API field it is about and a phrase, following the field's name,
/// that states the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub field: &'static str,
    pub message: String,
}

impl Policy {
    pub fn for_kind(&self, kind: Kind) -> KindPolicy {
        match kind {
            Kind::User => self.user,
            Kind::Service => self.service,
        }
    }

    /// Checks an expiry being set at `now`; `field` is the field the client used.
    pub fn check(
        &self,
        kind: Kind,
        now: i64,
        expires_at: Option<i64>,
        field: &'static str,
    ) -> Result<(), Refusal> {
        let p = self.for_kind(kind);
        let kind = kind.as_str();
        match (expires_at, p.max_lifetime) {
            (None, Some(max)) => Err(Refusal {
                field,
                message: format!(
                    "is required: {kind} tokens must expire within {} ({max} seconds), `never` is not allowed",
                    duration::format(max)
                ),
            }),
            (None, None) if p.require_expiry => Err(Refusal {
                field,
                message: format!("is required: {kind} tokens must have an expiry, `never` is not allowed"),
            }),
            (Some(t), Some(max))
                if t.saturating_sub(now) > i64::try_from(max).unwrap_or(i64::MAX) =>
            {
                Err(Refusal {
                    field,
                    message: format!(
                        "is too far ahead: {kind} tokens may be valid for at most {} ({max} seconds) from now",
                        duration::format(max)
                    ),
                })
            }
            _ => Ok(()),
        }
    }

    /// Whether `never` may be offered (the CLI and console show it only then).
    pub fn allows_never(&self, kind: Kind) -> bool {
        let p = self.for_kind(kind);
        p.max_lifetime.is_none() && !p.require_expiry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    fn policy() -> Policy {
        Policy {
            user: KindPolicy {
                max_lifetime: Some(90 * DAY),
                require_expiry: false,
            },
            service: KindPolicy {
                max_lifetime: None,
                require_expiry: true,
            },
        }
    }

    #[test]
    fn limits_are_enforced_and_stated() {
        let p = policy();
        assert!(p.check(Kind::User, 0, Some(90 * DAY as i64), "f").is_ok());
        let e = p
            .check(Kind::User, 0, Some(90 * DAY as i64 + 1), "expires_at")
            .unwrap_err();
        assert_eq!(e.field, "expires_at");
        assert!(e.message.contains("90d"), "{}", e.message);
        assert!(p.check(Kind::User, 0, None, "f").is_err());
        assert!(p.check(Kind::Service, 0, None, "f").is_err());
        assert!(p.check(Kind::Service, 0, Some(i64::MAX), "f").is_ok());
        assert!(Policy::default().check(Kind::User, 0, None, "f").is_ok());
        assert!(!p.allows_never(Kind::User) && !p.allows_never(Kind::Service));
        assert!(Policy::default().allows_never(Kind::Service));
    }
}
