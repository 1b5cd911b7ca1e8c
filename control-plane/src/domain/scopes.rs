//! Scopes: named sets of method and path rules that a token may be limited to. What a rule
//! and a name may be is `tokengate_wire::scope`'s (the filter compiles the same rules);
//! this module decides what a creation, an edit or a deletion may do.
//!
//! A scope that a live (not revoked) token still names cannot be deleted (409
//! `scope_in_use`): deleting it would silently take from the token what it was given,
//! whereas the admin who takes the scope off those tokens first sees what changes. The
//! check is made in the deleting transaction, and a token write checks in its own that the
//! scopes it names exist, so that no token can come to name a deleted scope.

use super::{audit, DomainError};
use crate::store::{ScopeDeletion, ScopeRow, Store, StoreError};
use std::sync::Arc;
use tokengate_wire::scope::{self, Rule, MAX_DESCRIPTION, MAX_RULES, MAX_TOKEN_SCOPES};

/// Attempts at a change that keeps meeting concurrent changes before giving up (409).
const ATTEMPTS: usize = 16;

/// A scope to create.
#[derive(Debug, Clone)]
pub struct NewScope {
    pub name: String,
    pub description: Option<String>,
    pub rules: Vec<Rule>,
}

/// An edit: `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct ScopePatch {
    pub description: Option<String>,
    pub rules: Option<Vec<Rule>>,
}

pub fn check_name(name: &str) -> Result<(), DomainError> {
    scope::check_name(name).map_err(|m| DomainError::invalid("name", m))
}

pub fn check_description(d: &str) -> Result<(), DomainError> {
    crate::text::check_optional(d, MAX_DESCRIPTION)
        .map_err(|m| DomainError::invalid("description", m))
}

/// 1 to `MAX_RULES` rules, each checked; a refusal names the rule's field (`rules[2].path`).
pub fn check_rules(rules: &[Rule]) -> Result<(), DomainError> {
    if rules.is_empty() || rules.len() > MAX_RULES {
        return Err(DomainError::invalid(
            "rules",
            format!("must hold 1 to {MAX_RULES} rules"),
        ));
    }
    for (i, r) in rules.iter().enumerate() {
        scope::check_rule(r).map_err(|(field, message)| DomainError::InvalidAt {
            field: format!("rules[{i}].{field}"),
            message,
        })?;
    }
    Ok(())
}

/// A token's scope names as given: each a scope name, at most `MAX_TOKEN_SCOPES` of them;
/// a name given twice is kept once, where it first stood.
pub fn token_scopes(names: Vec<String>) -> Result<Vec<String>, DomainError> {
    let mut kept: Vec<String> = Vec::with_capacity(names.len());
    for n in names {
        if scope::check_name(&n).is_err() {
            return Err(DomainError::invalid(
                "scopes",
                format!(
                    "must hold scope names: {:?} is not one (1 to {} characters of a-z, 0-9, \
                     ':', '.', '_' or '-')",
                    n.chars().take(80).collect::<String>(),
                    scope::MAX_NAME
                ),
            ));
        }
        if !kept.contains(&n) {
            kept.push(n);
        }
    }
    if kept.len() > MAX_TOKEN_SCOPES {
        return Err(DomainError::invalid(
            "scopes",
            format!("must hold at most {MAX_TOKEN_SCOPES} scopes"),
        ));
    }
    Ok(kept)
}

/// A 400 naming the first of `names` that is no scope.
pub async fn check_exist(store: &dyn Store, names: &[String]) -> Result<(), DomainError> {
    if names.is_empty() {
        return Ok(());
    }
    let set = store.scopes().await?;
    match names
        .iter()
        .find(|n| !set.scopes.iter().any(|s| &s.name == *n))
    {
        Some(n) => Err(DomainError::invalid(
            "scopes",
            format!("names `{n}`, which is no scope: create it first (POST /v1/scopes)"),
        )),
        None => Ok(()),
    }
}

pub struct Scopes {
    store: Arc<dyn Store>,
}

impl Scopes {
    pub fn new(store: Arc<dyn Store>) -> Scopes {
        Scopes { store }
    }

    pub async fn create(
        &self,
        actor: &str,
        s: NewScope,
        now: i64,
    ) -> Result<ScopeRow, DomainError> {
        check_name(&s.name)?;
        let description = s.description.unwrap_or_default();
        check_description(&description)?;
        check_rules(&s.rules)?;
        let row = ScopeRow {
            name: s.name,
            description,
            rules: s.rules,
            created_at: now,
            updated_at: now,
            version: 0,
        };
        let entry = audit::scope_change(now, actor, audit::SCOPE_CREATED, None, Some(&row));
        match self.store.insert_scope(row.clone(), &entry).await {
            Err(StoreError::Conflict(_)) => Err(DomainError::Conflict(format!(
                "A scope named `{}` exists already.",
                row.name
            ))),
            other => Ok(other?),
        }
    }

    pub async fn list(&self) -> Result<Vec<ScopeRow>, DomainError> {
        Ok(self.store.scopes().await?.scopes)
    }

    pub async fn get(&self, name: &str) -> Result<ScopeRow, DomainError> {
        // No scope has a name that is not one; the store is not asked (it may not take it).
        if scope::check_name(name).is_err() {
            return Err(DomainError::NoScope);
        }
        self.store.scope(name).await?.ok_or(DomainError::NoScope)
    }

    pub async fn update(
        &self,
        actor: &str,
        name: &str,
        patch: ScopePatch,
        now: i64,
    ) -> Result<ScopeRow, DomainError> {
        if let Some(d) = &patch.description {
            check_description(d)?;
        }
        if let Some(r) = &patch.rules {
            check_rules(r)?;
        }
        for _ in 0..ATTEMPTS {
            let before = self.get(name).await?;
            let mut after = before.clone();
            if let Some(d) = &patch.description {
                after.description = d.clone();
            }
            if let Some(r) = &patch.rules {
                after.rules = r.clone();
            }
            if after == before {
                // Nothing changed: no version, no audit entry.
                return Ok(before);
            }
            after.updated_at = now;
            let entry = audit::scope_change(
                now,
                actor,
                audit::SCOPE_UPDATED,
                Some(&before),
                Some(&after),
            );
            match self
                .store
                .replace_scope(after, before.version, &entry)
                .await
            {
                Err(StoreError::Stale) => continue,
                Err(StoreError::NotFound) => return Err(DomainError::NoScope),
                other => return Ok(other?),
            }
        }
        Err(DomainError::Conflict(
            "The scope keeps changing concurrently; try again.".into(),
        ))
    }

    /// Deletes a scope that no live token names (see the module comment).
    pub async fn delete(&self, actor: &str, name: &str, now: i64) -> Result<(), DomainError> {
        for _ in 0..ATTEMPTS {
            let before = self.get(name).await?;
            let entry = audit::scope_change(now, actor, audit::SCOPE_DELETED, Some(&before), None);
            match self.store.delete_scope(name, before.version, &entry).await {
                Ok(ScopeDeletion::Deleted(_)) => return Ok(()),
                Ok(ScopeDeletion::InUse(tokens)) => {
                    return Err(DomainError::ScopeInUse {
                        name: name.to_string(),
                        tokens,
                    })
                }
                Err(StoreError::Stale) => continue,
                Err(StoreError::NotFound) => return Err(DomainError::NoScope),
                Err(e) => return Err(e.into()),
            }
        }
        Err(DomainError::Conflict(
            "The scope keeps changing concurrently; try again.".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(path: &str) -> Rule {
        Rule {
            methods: None,
            path: path.into(),
        }
    }

    fn field(e: DomainError) -> String {
        match e {
            DomainError::Invalid { field, .. } => field.to_string(),
            DomainError::InvalidAt { field, .. } => field,
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn rules_are_counted_and_each_is_named_when_refused() {
        assert_eq!(field(check_rules(&[]).unwrap_err()), "rules");
        let many = vec![rule("/"); MAX_RULES + 1];
        assert_eq!(field(check_rules(&many).unwrap_err()), "rules");
        assert!(check_rules(&vec![rule("/"); MAX_RULES]).is_ok());
        let bad = [rule("/a"), rule("/b"), rule("no-slash")];
        assert_eq!(field(check_rules(&bad).unwrap_err()), "rules[2].path");
        let bad_method = [Rule {
            methods: Some(vec!["get".into()]),
            path: "/".into(),
        }];
        assert_eq!(
            field(check_rules(&bad_method).unwrap_err()),
            "rules[0].methods"
        );
    }

    #[test]
    fn token_scopes_are_names_without_duplicates_and_bounded() {
        assert_eq!(
            token_scopes(vec!["b".into(), "a".into(), "b".into()]).unwrap(),
            ["b", "a"]
        );
        assert!(token_scopes(vec![]).unwrap().is_empty());
        assert_eq!(
            field(token_scopes(vec!["Bad".into()]).unwrap_err()),
            "scopes"
        );
        let many: Vec<String> = (0..=MAX_TOKEN_SCOPES).map(|i| format!("s{i}")).collect();
        assert_eq!(field(token_scopes(many).unwrap_err()), "scopes");
        let same: Vec<String> = (0..100).map(|_| "s".to_string()).collect();
        assert_eq!(token_scopes(same).unwrap(), ["s"]);
    }

    #[test]
    fn descriptions_are_bounded_text() {
        assert!(check_description("").is_ok());
        assert!(check_description(&"é".repeat(MAX_DESCRIPTION)).is_ok());
        assert!(check_description(&"é".repeat(MAX_DESCRIPTION + 1)).is_err());
        assert!(check_description("a\u{202e}b").is_err());
        assert!(check_description(" padded").is_err());
    }
}
