//! One request through the filter, written once for both flavors: read the credential, judge
//! it, count it, then either rewrite the headers that go upstream or name the refusal. Each
//! flavor supplies the header map ([`RequestHeaders`]) and sends what [`Reply`] says.

use crate::authorize::{self, Denial, Outcome, Target, Token};
use crate::config::Config;
use crate::fleet;
use crate::forward;
use crate::grpc;
use crate::metrics::Counter;
use crate::response;
use crate::scopes::ScopeCache;
use crate::store::SharedStore;
use crate::timefmt;
use tokengate_wire::scope::{self, MAX_NAME, MAX_TOKEN_SCOPES};

/// The request headers of one stream. Edits report the host's refusal as `Err(why)`: the
/// request is then refused rather than sent upstream half-edited.
pub trait RequestHeaders {
    /// A header value as the host hands it over (borrowed from Envoy by the native module).
    type Value: AsRef<[u8]>;
    /// The value of request header `name` (lower case), `Some(empty)` for a header sent
    /// empty. A header sent more than once must read as something that is no token (joined
    /// with `,`), never as one of its copies: a later hop could read another.
    fn get(&self, name: &str) -> Option<Self::Value>;
    /// Removes every copy of every header whose name, as the host holds it, `doomed` picks.
    fn remove_where(&mut self, doomed: &dyn Fn(&[u8]) -> bool) -> Result<(), String>;
    /// Replaces every value of `name`.
    fn set(&mut self, name: &str, value: &[u8]) -> Result<(), String>;
}

/// The names of the identity headers (token id, name, owner, kind; and the scopes of a
/// scoped token), built once from the configured prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityHeaders {
    pub names: [String; 4],
    /// Set to a scoped token's scope names, space-separated; never sent for an unrestricted
    /// token (a client-sent copy is removed like every identity header).
    pub scopes: String,
}

impl IdentityHeaders {
    pub fn new(cfg: &Config) -> IdentityHeaders {
        let p = &cfg.identity_header_prefix;
        IdentityHeaders {
            names: [
                format!("{p}token-id"),
                format!("{p}token-name"),
                format!("{p}token-owner"),
                format!("{p}token-kind"),
            ],
            scopes: format!("{p}scopes"),
        }
    }
}

/// Readies an admitted request for the upstream: removes the credential headers and every
/// client-sent tokengate header in any spelling (see [`forward`]), then sets the identity
/// headers.
fn forward_upstream<H: RequestHeaders, V: AsRef<[u8]>>(
    cfg: &Config,
    ids: &IdentityHeaders,
    headers: &mut H,
    token: &Token<V>,
) -> Result<(), String> {
    let scopes = token.scopes();
    // A scoped token's header is replaced by setting it; otherwise any copy goes.
    let keep_scopes = scopes.is_some();
    headers.remove_where(&|name| {
        forward::to_remove(cfg, name, &ids.names) && !(keep_scopes && name == ids.scopes.as_bytes())
    })?;
    if let Some(names) = scopes {
        // Room for the most names a token carries at their longest: no allocation.
        let mut buf = [0u8; MAX_TOKEN_SCOPES * (MAX_NAME + 1)];
        let mut len = 0;
        for name in names.iter().filter(|n| scope::is_name(n)) {
            let sep = usize::from(len > 0);
            let Some(slot) = buf.get_mut(len..len + sep + name.len()) else {
                break;
            };
            slot[..sep].copy_from_slice(&b" "[..sep]);
            slot[sep..].copy_from_slice(name);
            len += sep + name.len();
        }
        headers.set(&ids.scopes, buf.get(..len).unwrap_or_default())?;
    }
    let values: [&[u8]; 4] = [
        token.id(),
        token.name(),
        token.owner(),
        token.kind.as_str().as_bytes(),
    ];
    for (name, value) in ids.names.iter().zip(values) {
        headers.set(name, value)?;
    }
    Ok(())
}

/// Announces the token's expiry on a response, inside the warning window.
pub const EXPIRES_HEADER: &str = "x-tokengate-token-expires";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// On its way upstream; the response announces `expires_at` (Unix seconds) if set.
    Allow { expires_at: Option<i64> },
    /// Answer with [`answer`], announcing `expires_at` if set.
    Refuse {
        denial: Denial,
        expires_at: Option<i64>,
        /// With [`Denial::InsufficientScope`]: the scopes that would cover the request.
        needed_scopes: Option<String>,
    },
}

/// A request of a known token, to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted<'a> {
    pub id: &'a [u8],
    pub allowed: bool,
    /// Unix seconds.
    pub at: i64,
    /// Count it for `POST /v1/usage`.
    pub usage: bool,
    /// Count it as fleet demand (`POST /v1/fleet`).
    pub fleet: bool,
}

/// What [`handle`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handled {
    pub reply: Reply,
    /// The counter the request goes to.
    pub counter: Counter,
    /// Something for the log: an allowed request whose headers the host would not edit,
    /// refused for that.
    pub trouble: Option<String>,
}

/// Decides one request at `now_nanos` (0: the host has no clock, so nothing can be trusted)
/// and, when it may pass, rewrites its headers (see [`forward`]). `usage` counts the request
/// for a known token: when usage is reported, or when it met a fleet-limited bucket (its
/// [`Counted::fleet`] says so; the glue counts it as fleet demand then); a request that met
/// a quota is counted once more, as fleet demand under [`fleet::quota_tally_key`].
pub fn handle<S, H>(
    cfg: &Config,
    ids: &IdentityHeaders,
    store: &S,
    scopes: &ScopeCache,
    headers: &mut H,
    now_nanos: u64,
    mut usage: impl FnMut(Counted<'_>),
) -> Handled
where
    S: SharedStore + ?Sized,
    H: RequestHeaders,
{
    let verdict = {
        // The credential borrows the header map: it is done with before the map changes.
        let credential = authorize::extract(cfg, |name| headers.get(name));
        if now_nanos == 0 {
            authorize::Verdict {
                outcome: Outcome::Deny(Denial::StateUnavailable),
                token: None,
                fleet: false,
                quota: None,
                needed_scopes: None,
            }
        } else {
            // Only a scoped token's request reads them.
            let (mut method, mut path) = (None, None);
            let (m, p) = (&mut method, &mut path);
            let h: &H = headers;
            authorize::judge(
                cfg,
                store,
                scopes,
                credential.as_ref().map(|c| c.bytes()),
                now_nanos,
                move || {
                    *m = h.get(":method");
                    *p = h.get(":path");
                    let (m, p): (&Option<H::Value>, &Option<H::Value>) = (m, p);
                    Target {
                        method: m.as_ref().map(AsRef::as_ref),
                        path: p.as_ref().map(AsRef::as_ref),
                    }
                },
            )
        }
    };
    let mut expires_at = None;
    if let Some(token) = &verdict.token {
        let allowed = verdict.outcome == Outcome::Allow;
        let at = (now_nanos / 1_000_000_000) as i64;
        if cfg.usage_reporting || verdict.fleet {
            usage(Counted {
                id: token.id(),
                allowed,
                at,
                usage: cfg.usage_reporting,
                fleet: verdict.fleet,
            });
        }
        if let Some(hash) = &verdict.quota {
            // Fleet demand under the secret's quota key: the leader reports its state.
            usage(Counted {
                id: &fleet::quota_tally_key(hash),
                allowed,
                at,
                usage: false,
                fleet: true,
            });
        }
        expires_at = authorize::expiry_to_announce(cfg, Some(token), now_nanos);
    }
    let mut trouble = None;
    let reply = match (verdict.outcome, &verdict.token) {
        (Outcome::Allow, Some(token)) => match forward_upstream(cfg, ids, headers, token) {
            Ok(()) => Reply::Allow { expires_at },
            Err(why) => {
                // The upstream could see a secret or a spoofed identity: refuse instead.
                trouble = Some(format!(
                    "cannot edit the request's headers ({why}); refusing it"
                ));
                Reply::Refuse {
                    denial: Denial::StateUnavailable,
                    expires_at: None,
                    needed_scopes: None,
                }
            }
        },
        (Outcome::Allow, None) => Reply::Refuse {
            // Unreachable: an allowed request always has its token. Fail closed regardless.
            denial: Denial::StateUnavailable,
            expires_at: None,
            needed_scopes: None,
        },
        (Outcome::Deny(denial), _) => Reply::Refuse {
            denial,
            // Only a caller who may retry later learns when its token ends.
            expires_at: match denial {
                Denial::RateLimited { .. } | Denial::QuotaExceeded { .. } => expires_at,
                _ => None,
            },
            needed_scopes: verdict.needed_scopes,
        },
    };
    let counter = match &reply {
        Reply::Allow { .. } => Counter::Allowed,
        Reply::Refuse { denial, .. } => Counter::denied(*denial),
    };
    Handled {
        reply,
        counter,
        trouble,
    }
}

/// A refusal as its client gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The HTTP status of the refusal (for a gRPC client, the one it stands for: the host
    /// may log it or hand it to Envoy, which then answers gRPC itself).
    pub status: u32,
    /// `Some` for a gRPC client: a trailers-only answer (HTTP 200, `content-type:
    /// application/grpc`, no body) with this `grpc-status`.
    pub grpc: Option<grpc::Code>,
    /// The headers (gRPC: the metadata), the expiry announcement among them.
    pub headers: Vec<(&'static str, String)>,
    /// The JSON body (empty for gRPC).
    pub body: String,
    /// The JSON body's `error`, for the host's response details.
    pub code: &'static str,
}

/// The answer to a request refused with `denial`, in the client's protocol: gRPC clients
/// (by the request's `content-type`, see [`grpc::is_grpc`]) get gRPC statuses, others the
/// JSON refusal. `expires_at` (Unix seconds) is announced if set; `needed_scopes` (see
/// [`Reply::Refuse`]) goes in the `WWW-Authenticate` challenge's `scope`.
pub fn answer<H: RequestHeaders + ?Sized>(
    headers: &H,
    denial: Denial,
    expires_at: Option<i64>,
    needed_scopes: Option<&str>,
) -> Answer {
    let content_type = headers.get("content-type");
    let refusal = response::refusal(denial);
    let mut answer = if grpc::is_grpc(content_type.as_ref().map(|v| v.as_ref())) {
        let g = grpc::refusal(denial);
        Answer {
            status: g.http_status,
            grpc: Some(g.code),
            headers: g.metadata,
            body: String::new(),
            code: refusal.code,
        }
    } else {
        Answer {
            status: refusal.status,
            grpc: None,
            headers: refusal.headers,
            body: refusal.body,
            code: refusal.code,
        }
    };
    if denial == Denial::InsufficientScope && needed_scopes.is_some() {
        for (name, value) in &mut answer.headers {
            if *name == "www-authenticate" {
                *value = response::insufficient_scope_challenge(needed_scopes);
            }
        }
    }
    if let Some(t) = expires_at {
        answer.headers.push((EXPIRES_HEADER, timefmt::rfc3339(t)));
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authorize::hash_hex;
    use crate::record::{encode_state, encode_token, token_key, State, STATE_KEY};
    use crate::store::fake::MemStore;
    use std::collections::BTreeMap;
    use tokengate_wire::{token, Kind, SyncRecord, SyncStatus};

    const NOW: u64 = 1_800_000_000 * 1_000_000_000;

    #[derive(Default)]
    struct Map(BTreeMap<String, Vec<u8>>);

    impl RequestHeaders for Map {
        type Value = Vec<u8>;
        fn get(&self, name: &str) -> Option<Vec<u8>> {
            self.0.get(name).cloned()
        }
        fn remove_where(&mut self, doomed: &dyn Fn(&[u8]) -> bool) -> Result<(), String> {
            if self.0.contains_key("refuse-edits") {
                return Err("host status 2".into());
            }
            self.0.retain(|name, _| !doomed(name.as_bytes()));
            Ok(())
        }
        fn set(&mut self, name: &str, value: &[u8]) -> Result<(), String> {
            self.0.insert(name.to_string(), value.to_vec());
            Ok(())
        }
    }

    fn run(
        c: &Config,
        s: &MemStore,
        h: &mut Map,
        now: u64,
        mut usage: impl FnMut(&[u8], bool, i64),
    ) -> (Reply, Counter) {
        let usage = |c: Counted<'_>| usage(c.id, c.allowed, c.at);
        let handled = handle(
            c,
            &IdentityHeaders::new(c),
            s,
            &ScopeCache::new(),
            h,
            now,
            usage,
        );
        (handled.reply, handled.counter)
    }

    fn cfg() -> Config {
        Config::parse(br#"{"control_plane_cluster":"cp","sync_token":"x"}"#).unwrap()
    }

    fn setup(edit: impl FnOnce(&mut SyncRecord)) -> (MemStore, String) {
        let s = MemStore::default();
        let state = State {
            version: 1,
            generation: 1,
            proxies: 0,
            store_id: "s".into(),
            token_count: 1,
            scopes_version: 0,
        };
        s.set(STATE_KEY, &encode_state(&state), 0).unwrap();
        let secret = token::compose(&"a".repeat(32)).unwrap();
        let mut r = SyncRecord {
            scopes: None,
            quota: None,
            hash: hash_hex(secret.as_bytes()),
            id: "tok_1".into(),
            name: "reporting".into(),
            owner: "alice".into(),
            kind: Kind::Service,
            status: SyncStatus::Active,
            max_rps: None,
            burst: None,
            limit_scope: Default::default(),
            expires_at: None,
            version: 1,
        };
        edit(&mut r);
        s.set(&token_key(&r.hash), &encode_token(&r, 1), 0).unwrap();
        (s, secret)
    }

    fn headers(pairs: &[(&str, &str)]) -> Map {
        Map(pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect())
    }

    #[test]
    fn an_allowed_request_goes_up_with_its_identity_and_without_its_credential() {
        let (c, (s, secret)) = (cfg(), setup(|_| {}));
        let bearer = format!("Bearer {secret}");
        let mut h = headers(&[
            ("authorization", &bearer),
            ("x-tokengate-token-id", "tok_SPOOF"),
            ("x_tokengate_token_owner", "root"),
            (
                "x_api_token",
                "a spelling the upstream may read as X-API-Token",
            ),
            ("x-other", "kept"),
        ]);
        let mut counted = vec![];
        let (reply, counter) = run(&c, &s, &mut h, NOW, |id, allowed, at| {
            counted.push((id.to_vec(), allowed, at))
        });
        assert_eq!(reply, Reply::Allow { expires_at: None });
        assert_eq!(counter, Counter::Allowed);
        assert_eq!(counted, [(b"tok_1".to_vec(), true, 1_800_000_000)]);
        let want = headers(&[
            ("x-tokengate-token-id", "tok_1"),
            ("x-tokengate-token-name", "reporting"),
            ("x-tokengate-token-owner", "alice"),
            ("x-tokengate-token-kind", "service"),
            ("x-other", "kept"),
        ]);
        assert_eq!(h.0, want.0);
    }

    #[test]
    fn a_refused_request_keeps_its_headers_and_names_the_refusal() {
        let (c, (s, secret)) = (cfg(), setup(|r| r.status = SyncStatus::Suspended));
        let mut h = headers(&[("x-api-token", &secret)]);
        let before = h.0.clone();
        let mut counted = vec![];
        let (reply, counter) = run(&c, &s, &mut h, NOW, |id, allowed, _| {
            counted.push((id.to_vec(), allowed))
        });
        assert_eq!(
            (reply, counter),
            (
                Reply::Refuse {
                    denial: Denial::TokenSuspended,
                    expires_at: None,
                    needed_scopes: None,
                },
                Counter::TokenSuspended
            )
        );
        assert_eq!(
            counted,
            [(b"tok_1".to_vec(), false)],
            "known tokens count when refused"
        );
        assert_eq!(h.0, before);
        let (reply, counter) = run(&c, &s, &mut Map::default(), NOW, |_, _, _| {
            panic!("an unknown caller is no token's usage")
        });
        assert_eq!(
            (reply, counter),
            (
                Reply::Refuse {
                    denial: Denial::MissingToken,
                    expires_at: None,
                    needed_scopes: None,
                },
                Counter::MissingToken
            )
        );
    }

    #[test]
    fn expiry_is_announced_on_allowed_and_rate_limited_answers_only() {
        let soon = 1_800_000_000 + 3_600;
        let c = cfg();
        let (s, secret) = setup(|r| {
            r.expires_at = Some(soon);
            r.max_rps = Some(1);
        });
        let mut h = headers(&[("x-api-token", &secret)]);
        let (reply, _) = run(&c, &s, &mut h, NOW, |_, _, _| {});
        assert_eq!(
            reply,
            Reply::Allow {
                expires_at: Some(soon)
            }
        );
        let mut h = headers(&[("x-api-token", &secret)]);
        let (reply, _) = run(&c, &s, &mut h, NOW, |_, _, _| {});
        assert!(matches!(
            reply,
            Reply::Refuse {
                denial: Denial::RateLimited { .. },
                expires_at: Some(e),
                needed_scopes: None,
            } if e == soon
        ));
        let (s, secret) = setup(|r| {
            r.expires_at = Some(soon);
            r.status = SyncStatus::Suspended;
        });
        let mut h = headers(&[("x-api-token", &secret)]);
        let (reply, _) = run(&c, &s, &mut h, NOW, |_, _, _| {});
        assert_eq!(
            reply,
            Reply::Refuse {
                denial: Denial::TokenSuspended,
                expires_at: None,
                needed_scopes: None,
            }
        );
    }

    #[test]
    fn a_quota_request_counts_as_usage_and_under_its_secrets_quota_key() {
        let (s, secret) = setup(|r| {
            r.max_rps = Some(100);
            r.quota = Some(tokengate_wire::Quota {
                limit: 1,
                period: tokengate_wire::Period::Hour,
            });
        });
        let c = cfg();
        let mut counted = vec![];
        for _ in 0..2 {
            let mut h = headers(&[("x-api-token", &secret)]);
            handle(
                &c,
                &IdentityHeaders::new(&c),
                &s,
                &ScopeCache::new(),
                &mut h,
                NOW,
                |c| counted.push((c.id.to_vec(), c.allowed, c.usage, c.fleet)),
            );
        }
        let key = fleet::quota_tally_key(&hash_hex(secret.as_bytes())).to_vec();
        assert!(key.starts_with(b"q:") && key.len() == 66);
        assert_eq!(
            counted,
            [
                (b"tok_1".to_vec(), true, true, true),
                (key.clone(), true, false, true),
                (b"tok_1".to_vec(), false, true, true),
                (key, false, false, true),
            ]
        );
        // Refused over the quota: the expiry is announced as for a rate refusal.
        let (s, secret) = setup(|r| {
            r.expires_at = Some(1_800_000_000 + 60);
            r.quota = Some(tokengate_wire::Quota {
                limit: 1,
                period: tokengate_wire::Period::Hour,
            });
        });
        run(
            &c,
            &s,
            &mut headers(&[("x-api-token", &secret)]),
            NOW,
            |_, _, _| {},
        );
        let (reply, counter) = run(
            &c,
            &s,
            &mut headers(&[("x-api-token", &secret)]),
            NOW,
            |_, _, _| {},
        );
        assert!(matches!(
            reply,
            Reply::Refuse {
                denial: Denial::QuotaExceeded {
                    limit: 1,
                    window_secs: 3_600,
                    ..
                },
                expires_at: Some(_),
                ..
            }
        ));
        assert_eq!(counter, Counter::QuotaExceeded);
    }

    #[test]
    fn no_clock_no_trust_and_no_usage_when_reporting_is_off() {
        let (s, secret) = setup(|_| {});
        let c = cfg();
        let mut h = headers(&[("x-api-token", &secret)]);
        let (reply, _) = run(&c, &s, &mut h, 0, |_, _, _| {});
        assert!(matches!(
            reply,
            Reply::Refuse {
                denial: Denial::StateUnavailable,
                ..
            }
        ));
        let off = Config::parse(
            br#"{"control_plane_cluster":"cp","sync_token":"x","usage_reporting":false}"#,
        )
        .unwrap();
        let mut h = headers(&[("x-api-token", &secret)]);
        let (reply, _) = run(&off, &s, &mut h, NOW, |_, _, _| panic!("reporting is off"));
        assert_eq!(reply, Reply::Allow { expires_at: None });
    }

    #[test]
    fn a_request_whose_headers_cannot_be_edited_is_refused() {
        let (c, (s, secret)) = (cfg(), setup(|_| {}));
        let mut h = headers(&[("x-api-token", &secret), ("refuse-edits", "1")]);
        let handled = handle(
            &c,
            &IdentityHeaders::new(&c),
            &s,
            &ScopeCache::new(),
            &mut h,
            NOW,
            |_| {},
        );
        assert_eq!(
            (handled.reply, handled.counter),
            (
                Reply::Refuse {
                    denial: Denial::StateUnavailable,
                    expires_at: None,
                    needed_scopes: None,
                },
                Counter::StateUnavailable
            )
        );
        assert!(handled.trouble.unwrap().contains("host status 2"));
        assert_eq!(
            h.0.get("x-api-token").map(Vec::as_slice),
            Some(secret.as_bytes())
        );
    }

    #[test]
    fn grpc_clients_get_a_grpc_answer_and_others_the_json_refusal() {
        let limited = Denial::RateLimited {
            retry_after_secs: 2,
            max_rps: 5,
            burst: 5,
        };
        let json = answer(
            &headers(&[("content-type", "application/json")]),
            limited,
            None,
            None,
        );
        assert_eq!(
            (json.status, json.grpc, json.code),
            (429, None, "rate_limited")
        );
        assert_eq!(json.body, response::refusal(limited).body);
        assert_eq!(json.headers, response::refusal(limited).headers);

        let g = answer(
            &headers(&[("content-type", "application/grpc+proto")]),
            limited,
            Some(1_800_000_000),
            None,
        );
        assert_eq!(
            (g.status, g.grpc, g.code, g.body.as_str()),
            (429, Some(grpc::Code::ResourceExhausted), "rate_limited", "")
        );
        let mut expected = grpc::refusal(limited).metadata;
        expected.push((EXPIRES_HEADER, timefmt::rfc3339(1_800_000_000)));
        assert_eq!(g.headers, expected);

        // No content-type, or gRPC-Web: the JSON answer.
        for h in [
            headers(&[]),
            headers(&[("content-type", "application/grpc-web")]),
        ] {
            let a = answer(&h, Denial::MissingToken, None, None);
            assert_eq!((a.status, a.grpc), (401, None));
        }
    }

    fn scoped_setup(scopes: Option<Vec<String>>) -> (MemStore, String) {
        use crate::record::{encode_scopes, ScopeStamp, SCOPES_KEY};
        use tokengate_wire::{Rule, SyncScope};
        let (s, secret) = setup(|r| r.scopes = scopes);
        let set = [SyncScope {
            name: "orders:read".into(),
            rules: vec![Rule {
                methods: Some(vec!["GET".into()]),
                path: "/orders/**".into(),
            }],
            version: 1,
        }];
        let stamp = ScopeStamp {
            generation: 1,
            version: 0,
        };
        s.set(SCOPES_KEY, &encode_scopes(stamp, &set), 0).unwrap();
        (s, secret)
    }

    #[test]
    fn a_scoped_token_sends_its_scopes_upstream_and_nobody_else_can() {
        let c = cfg();
        let cache = ScopeCache::new();
        let names = Some(vec!["orders:read".into(), "Bad Name".into(), "gone".into()]);
        let (s, secret) = scoped_setup(names);
        let mut h = headers(&[
            ("x-api-token", &secret),
            (":method", "GET"),
            (":path", "/orders/7?x=1"),
            ("x-tokengate-scopes", "admin"),
            ("x_tokengate_scopes", "admin"),
        ]);
        let handled = handle(
            &c,
            &IdentityHeaders::new(&c),
            &s,
            &cache,
            &mut h,
            NOW,
            |_| {},
        );
        assert_eq!(handled.reply, Reply::Allow { expires_at: None });
        assert_eq!(
            h.0.get("x-tokengate-scopes").map(Vec::as_slice),
            Some(&b"orders:read gone"[..]),
            "the token's names, those that are no scope name left out"
        );
        assert!(!h.0.contains_key("x_tokengate_scopes"));

        // Unrestricted: no scopes header, and a client's copy goes.
        let (s, secret) = scoped_setup(None);
        let mut h = headers(&[
            ("x-api-token", &secret),
            ("x-tokengate-scopes", "admin"),
            ("X-Tokengate-Scopes", "admin"),
        ]);
        let handled = handle(
            &c,
            &IdentityHeaders::new(&c),
            &s,
            &cache,
            &mut h,
            NOW,
            |_| {},
        );
        assert_eq!(handled.reply, Reply::Allow { expires_at: None });
        assert!(
            h.0.keys()
                .all(|k| !k.to_ascii_lowercase().contains("scopes")),
            "{:?}",
            h.0.keys()
        );
    }

    #[test]
    fn a_request_outside_the_scopes_is_refused_with_the_scope_challenge() {
        let c = cfg();
        let cache = ScopeCache::new();
        let (s, secret) = scoped_setup(Some(vec![]));
        let mut h = headers(&[
            ("x-api-token", &secret),
            (":method", "GET"),
            (":path", "/orders"),
        ]);
        let handled = handle(
            &c,
            &IdentityHeaders::new(&c),
            &s,
            &cache,
            &mut h,
            NOW,
            |_| {},
        );
        assert_eq!(handled.counter, Counter::InsufficientScope);
        let Reply::Refuse {
            denial,
            needed_scopes,
            ..
        } = handled.reply
        else {
            panic!("refused")
        };
        assert_eq!(needed_scopes.as_deref(), Some("orders:read"));
        assert_eq!(
            h.0.get("x-api-token").map(Vec::as_slice),
            Some(secret.as_bytes()),
            "untouched"
        );
        let a = answer(&h, denial, None, needed_scopes.as_deref());
        assert_eq!((a.status, a.code), (403, "insufficient_scope"));
        assert!(a.headers.contains(&(
            "www-authenticate",
            r#"Bearer error="insufficient_scope", scope="orders:read""#.to_string()
        )));
        let a = answer(&h, denial, None, None);
        assert!(a.headers.contains(&(
            "www-authenticate",
            r#"Bearer error="insufficient_scope""#.to_string()
        )));
        let g = answer(
            &headers(&[("content-type", "application/grpc")]),
            denial,
            None,
            Some("orders:read"),
        );
        assert_eq!(g.grpc, Some(grpc::Code::PermissionDenied));
        assert!(g.headers.contains(&(
            "www-authenticate",
            r#"Bearer error="insufficient_scope", scope="orders:read""#.to_string()
        )));
    }
}
