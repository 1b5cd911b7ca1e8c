//! Scopes on the request path: the scope set compiled once per change and per worker, and
//! the question a scoped token's request asks of it (does any of the token's scopes cover
//! this method and path?).
//!
//! The sync leader writes the whole set under [`SCOPES_KEY`] before the state that names its
//! [`ScopeStamp`]. A worker's [`ScopeCache`] compiles the set when a request shows it a state
//! whose stamp is past what it holds; every other request only matches. No host types here.

use crate::record::{self, ScopeNames, ScopeStamp, SCOPES_KEY};
use crate::store::SharedStore;
use std::sync::{Mutex, PoisonError};
use tokengate_wire::scope::{self, Compiled, RequestPath};

/// Most names the refusal's `scope="..."` lists, so that the header stays short.
pub const MAX_NEEDED: usize = 8;

/// Every known scope, compiled, sorted by name.
#[derive(Debug, Default)]
pub struct ScopeSet {
    pub stamp: ScopeStamp,
    scopes: Box<[(Box<[u8]>, Compiled)]>,
}

impl ScopeSet {
    /// Compiles a set as the leader wrote it. Scopes with a name that is not a valid scope
    /// name are left out (so no name from here can break a header), as are rules that do not
    /// pass the control plane's checks ([`Compiled::new`]): they match nothing.
    pub fn compile(rec: &record::ScopeSetRecord) -> ScopeSet {
        let mut scopes: Vec<(Box<[u8]>, Compiled)> = rec
            .scopes
            .iter()
            .filter(|s| scope::is_name(s.name.as_bytes()))
            .map(|s| (s.name.as_bytes().into(), Compiled::new(&s.rules)))
            .collect();
        scopes.sort_by(|a, b| a.0.cmp(&b.0));
        scopes.dedup_by(|a, b| a.0 == b.0);
        ScopeSet {
            stamp: rec.stamp,
            scopes: scopes.into_boxed_slice(),
        }
    }

    fn find(&self, name: &[u8]) -> Option<&Compiled> {
        self.scopes
            .binary_search_by(|(n, _)| (**n).cmp(name))
            .ok()
            .and_then(|i| self.scopes.get(i))
            .map(|(_, c)| c)
    }

    /// Whether one of `names` covers the request. `path` is `None` for a path that
    /// [`RequestPath::parse`] refused: nothing covers it.
    fn covers(
        &self,
        names: ScopeNames<'_>,
        method: &[u8],
        path: Option<&RequestPath<'_>>,
    ) -> Cover {
        let Some(path) = path else {
            return Cover::No { unknown: false };
        };
        let mut unknown = false;
        for name in names.iter() {
            match self.find(name) {
                Some(c) if c.allows(method, path) => return Cover::Yes,
                Some(_) => {}
                None => unknown = true,
            }
        }
        Cover::No { unknown }
    }

    /// The names of the known scopes that would cover the request, space-separated, at most
    /// [`MAX_NEEDED`] of them; `None` when none would.
    pub fn needed(&self, method: &[u8], path: Option<&RequestPath<'_>>) -> Option<String> {
        let path = path?;
        let mut out = String::new();
        let covering = self
            .scopes
            .iter()
            .filter(|(_, c)| c.allows(method, path))
            .take(MAX_NEEDED);
        for (name, _) in covering {
            if !out.is_empty() {
                out.push(' ');
            }
            // Checked by `compile`: ASCII.
            out.push_str(std::str::from_utf8(name).unwrap_or_default());
        }
        (!out.is_empty()).then_some(out)
    }

    pub fn len(&self) -> usize {
        self.scopes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cover {
    Yes,
    /// `unknown`: one of the token's names is not in the set.
    No {
        unknown: bool,
    },
}

/// What a scoped token's request gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scoped {
    Allowed,
    /// Refused; the known scopes that would cover the request, for the refusal's challenge.
    Refused {
        needed: Option<String>,
    },
}

/// What a request knows when it asks: the state it read and whether its token record is
/// newer than that state (a worker's state copy may trail the records by a tick).
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    pub stamp: ScopeStamp,
    pub token_newer: bool,
}

struct Slot {
    set: ScopeSet,
    /// The newest stamp a state showed when this set was loaded: a set is not reloaded for
    /// a state that is not past it, even if the stored set were older (it cannot be: the
    /// leader writes the set first).
    checked: ScopeStamp,
}

/// One worker's compiled scope set (wasm: one per VM; native: one per worker thread, so the
/// lock is never contended). Compiled when the state's stamp moves past it, never per
/// request.
#[derive(Default)]
pub struct ScopeCache {
    slot: Mutex<Option<Slot>>,
    compilations: Mutex<u64>,
}

impl ScopeCache {
    pub fn new() -> ScopeCache {
        ScopeCache::default()
    }

    /// How many times this cache compiled a scope set.
    pub fn compilations(&self) -> u64 {
        *self
            .compilations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Loads the stored set into `slot` unless it holds that one already. A set that cannot
    /// be read leaves an empty one: scoped tokens are refused (fail closed) until the state
    /// moves again.
    fn load<S: SharedStore + ?Sized>(&self, store: &S, slot: &mut Option<Slot>, seen: ScopeStamp) {
        let stored = store.get(SCOPES_KEY).ok().and_then(|(v, _)| v);
        let stored = stored.as_ref().map(|v| v.as_ref());
        let stamp = stored.and_then(record::scopes_stamp);
        let checked = |held: ScopeStamp| seen.max(held);
        if let (Some(s), Some(stamp)) = (slot.as_mut(), stamp) {
            if s.set.stamp == stamp {
                s.checked = checked(s.checked).max(stamp);
                return;
            }
        }
        let set = stored
            .and_then(record::decode_scopes)
            .map(|rec| ScopeSet::compile(&rec))
            .unwrap_or_default();
        *self
            .compilations
            .lock()
            .unwrap_or_else(PoisonError::into_inner) += 1;
        let checked = checked(set.stamp);
        *slot = Some(Slot { set, checked });
    }

    /// Whether a token limited to `names` may make this request.
    pub fn judge<S: SharedStore + ?Sized>(
        &self,
        store: &S,
        seen: Seen,
        names: ScopeNames<'_>,
        method: &[u8],
        path: &[u8],
    ) -> Scoped {
        let path = RequestPath::parse(path);
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.as_ref().is_none_or(|s| s.checked < seen.stamp) {
            self.load(store, &mut slot, seen.stamp);
        }
        let covers = |slot: &Option<Slot>| {
            slot.as_ref().map_or(Cover::No { unknown: true }, |s| {
                s.set.covers(names, method, path.as_ref())
            })
        };
        let mut cover = covers(&slot);
        if cover == (Cover::No { unknown: true }) && seen.token_newer {
            // The token may name a scope created with it, in a set this worker's state copy
            // does not point at yet: look at the stored set once more. Only refused requests
            // of a token newer than the state pay this, for at most a tick.
            self.load(store, &mut slot, seen.stamp);
            cover = covers(&slot);
        }
        match cover {
            Cover::Yes => Scoped::Allowed,
            Cover::No { .. } => Scoped::Refused {
                needed: slot
                    .as_ref()
                    .and_then(|s| s.set.needed(method, path.as_ref())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{encode_scopes, ScopeSetRecord};
    use crate::store::fake::MemStore;
    use tokengate_wire::{Rule, SyncScope};

    fn scope(name: &str, rules: &[(Option<&[&str]>, &str)]) -> SyncScope {
        SyncScope {
            name: name.into(),
            rules: rules
                .iter()
                .map(|(ms, p)| Rule {
                    methods: ms.map(|ms| ms.iter().map(|m| m.to_string()).collect()),
                    path: p.to_string(),
                })
                .collect(),
            version: 0,
        }
    }

    fn names(list: &[&str]) -> (u16, Vec<u8>) {
        let mut raw = vec![];
        for n in list {
            raw.extend_from_slice(&(n.len() as u16).to_le_bytes());
            raw.extend_from_slice(n.as_bytes());
        }
        (list.len() as u16, raw)
    }

    fn stamp(generation: u32, version: u64) -> ScopeStamp {
        ScopeStamp {
            generation,
            version,
        }
    }

    fn put(store: &MemStore, at: ScopeStamp, scopes: &[SyncScope]) {
        use crate::store::SharedStore;
        store
            .set(SCOPES_KEY, &encode_scopes(at, scopes), 0)
            .unwrap();
    }

    fn ask(
        cache: &ScopeCache,
        store: &MemStore,
        at: ScopeStamp,
        token: &[&str],
        m: &str,
        p: &str,
    ) -> Scoped {
        let (count, raw) = names(token);
        let seen = Seen {
            stamp: at,
            token_newer: false,
        };
        cache.judge(
            store,
            seen,
            ScopeNames::from_raw(count, &raw),
            m.as_bytes(),
            p.as_bytes(),
        )
    }

    fn standard() -> Vec<SyncScope> {
        vec![
            scope("orders:read", &[(Some(&["GET", "HEAD"]), "/orders/**")]),
            scope(
                "orders:write",
                &[(Some(&["POST"]), "/orders"), (None, "/orders/*")],
            ),
            scope("admin", &[(None, "/**")]),
        ]
    }

    #[test]
    fn a_token_is_held_to_its_scopes_by_method_and_path() {
        let s = MemStore::default();
        let at = stamp(1, 3);
        put(&s, at, &standard());
        let c = ScopeCache::new();
        let read = ["orders:read"];
        assert_eq!(ask(&c, &s, at, &read, "GET", "/orders/7"), Scoped::Allowed);
        assert_eq!(
            ask(&c, &s, at, &read, "GET", "/orders?x=1"),
            Scoped::Allowed
        );
        assert_eq!(
            ask(&c, &s, at, &read, "POST", "/orders"),
            Scoped::Refused {
                needed: Some("admin orders:write".into())
            }
        );
        assert_eq!(
            ask(&c, &s, at, &read, "GET", "/admin"),
            Scoped::Refused {
                needed: Some("admin".into())
            }
        );
        assert_eq!(
            ask(
                &c,
                &s,
                at,
                &["orders:read", "orders:write"],
                "DELETE",
                "/orders/7"
            ),
            Scoped::Allowed
        );
        // Ambiguous paths: nothing covers them, not even `/**`; no scope to suggest.
        for p in [
            "/orders/../admin",
            "//orders",
            "/orders/%2e%2e/admin",
            "/orders%2Fsecret",
            "/orders;a",
        ] {
            assert_eq!(
                ask(&c, &s, at, &["admin"], "GET", p),
                Scoped::Refused { needed: None },
                "{p}"
            );
        }
        assert_eq!(
            ask(&c, &s, at, &read, "GET", "/ORDERS"),
            Scoped::Refused {
                needed: Some("admin".into())
            },
            "case matters"
        );
    }

    #[test]
    fn unknown_names_and_no_names_allow_nothing() {
        let s = MemStore::default();
        let at = stamp(1, 3);
        put(&s, at, &standard());
        let c = ScopeCache::new();
        assert!(matches!(
            ask(&c, &s, at, &["gone"], "GET", "/orders"),
            Scoped::Refused { .. }
        ));
        assert!(matches!(
            ask(&c, &s, at, &[], "GET", "/orders"),
            Scoped::Refused { .. }
        ));
        assert_eq!(
            ask(&c, &s, at, &["gone", "orders:read"], "GET", "/orders"),
            Scoped::Allowed
        );
        // Nothing stored (or unreadable): refused.
        let empty = MemStore::default();
        let c = ScopeCache::new();
        assert!(matches!(
            ask(&c, &empty, at, &["admin"], "GET", "/"),
            Scoped::Refused { .. }
        ));
        put(&empty, stamp(1, 4), &standard());
        assert_eq!(
            ask(&c, &empty, stamp(1, 4), &["admin"], "GET", "/"),
            Scoped::Allowed
        );
    }

    #[test]
    fn compiled_once_per_stamp_not_per_request() {
        let s = MemStore::default();
        put(&s, stamp(1, 3), &standard());
        let c = ScopeCache::new();
        for _ in 0..100 {
            assert_eq!(
                ask(&c, &s, stamp(1, 3), &["admin"], "GET", "/x"),
                Scoped::Allowed
            );
        }
        assert_eq!(c.compilations(), 1);
        // The leader writes an edited set, then the state: requests that still see the old
        // state keep the compiled set; the first to see the new one recompiles.
        put(&s, stamp(1, 9), &[scope("admin", &[(None, "/only")])]);
        assert_eq!(
            ask(&c, &s, stamp(1, 3), &["admin"], "GET", "/x"),
            Scoped::Allowed
        );
        assert_eq!(c.compilations(), 1);
        assert!(matches!(
            ask(&c, &s, stamp(1, 9), &["admin"], "GET", "/x"),
            Scoped::Refused { .. }
        ));
        assert_eq!(
            ask(&c, &s, stamp(1, 9), &["admin"], "GET", "/only"),
            Scoped::Allowed
        );
        assert_eq!(c.compilations(), 2);
        // A new snapshot's generation wins over a higher version of the old one.
        put(&s, stamp(2, 1), &standard());
        assert_eq!(
            ask(&c, &s, stamp(2, 1), &["admin"], "GET", "/x"),
            Scoped::Allowed
        );
        assert_eq!(c.compilations(), 3);
        // A state ahead of the stored set (it cannot happen; if it did) is not reloaded on
        // every request.
        for _ in 0..10 {
            ask(&c, &s, stamp(2, 5), &["admin"], "GET", "/x");
        }
        assert_eq!(c.compilations(), 3);
    }

    #[test]
    fn a_token_newer_than_the_state_looks_for_its_new_scope() {
        let s = MemStore::default();
        put(&s, stamp(1, 3), &standard());
        let c = ScopeCache::new();
        assert_eq!(
            ask(&c, &s, stamp(1, 3), &["admin"], "GET", "/"),
            Scoped::Allowed
        );
        // A scope created, then a token naming it, both written; this worker's state copy
        // still points at the old set.
        let mut more = standard();
        more.push(scope("fresh", &[(None, "/fresh")]));
        put(&s, stamp(1, 10), &more);
        let (count, raw) = names(&["fresh"]);
        let judge = |token_newer| {
            c.judge(
                &s,
                Seen {
                    stamp: stamp(1, 3),
                    token_newer,
                },
                ScopeNames::from_raw(count, &raw),
                b"GET",
                b"/fresh",
            )
        };
        assert!(matches!(judge(false), Scoped::Refused { .. }));
        assert_eq!(c.compilations(), 1);
        assert_eq!(judge(true), Scoped::Allowed);
        assert_eq!(c.compilations(), 2);
        assert_eq!(judge(false), Scoped::Allowed, "kept");
    }

    #[test]
    fn bad_names_are_left_out_and_needed_is_bounded() {
        let mut scopes: Vec<SyncScope> = (0..20)
            .map(|i| scope(&format!("s{i:02}"), &[(None, "/**")]))
            .collect();
        scopes.push(scope("Bad\"Name", &[(None, "/**")]));
        let set = ScopeSet::compile(&ScopeSetRecord {
            stamp: stamp(1, 1),
            scopes,
        });
        assert_eq!(set.len(), 20);
        let p = RequestPath::parse(b"/x");
        let needed = set.needed(b"GET", p.as_ref()).unwrap();
        assert_eq!(needed.split(' ').count(), MAX_NEEDED);
        assert!(needed.starts_with("s00 s01"));
    }
}
