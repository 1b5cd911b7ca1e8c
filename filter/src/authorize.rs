//! The per-request decision: which credential, which record, which outcome. No host types
//! here; each flavor's glue feeds header bytes in and acts on the `Outcome`.

use crate::config::Config;
use crate::fleet;
use crate::gcra::{self, Decision, Limit};
use crate::record::{self, ScopeNames, STATE_KEY};
use crate::scopes::{ScopeCache, Scoped, Seen};
use crate::store::{compare_and_swap, CasError, SharedStore, Step};
use sha2::{Digest, Sha256};
use std::ops::Range;
use tokengate_wire::{token, Kind, LimitScope, Quota, SyncStatus};

/// Returns the token carried by `Authorization: Bearer <token>`, if that is its scheme.
/// The scheme with nothing after it is an empty (so invalid) token, as an empty
/// `X-API-Token` is: the client meant to present one.
pub fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    if value.len() < 6 || !value[..6].eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    match value.get(6) {
        None => Some(&[]),
        Some(b' ') => Some(value[7..].trim_ascii()),
        Some(_) => None,
    }
}

/// The credential a request presents: part of the header value that carried it, which is
/// kept as the host handed it over (borrowed from Envoy by the native module, so reading it
/// allocates nothing).
pub struct Credential<V> {
    value: V,
    range: Range<usize>,
}

impl<V: AsRef<[u8]>> Credential<V> {
    fn within(value: V, part: impl FnOnce(&[u8]) -> Option<&[u8]>) -> Option<Credential<V>> {
        let range = part(value.as_ref()).map(|p| span(value.as_ref(), p))?;
        Some(Credential { value, range })
    }

    pub fn bytes(&self) -> &[u8] {
        self.value
            .as_ref()
            .get(self.range.clone())
            .unwrap_or_default()
    }
}

/// Where `part`, a sub-slice of `whole`, sits in it.
fn span(whole: &[u8], part: &[u8]) -> Range<usize> {
    let start = (part.as_ptr() as usize).saturating_sub(whole.as_ptr() as usize);
    start..start + part.len()
}

/// The credential a request presents: the first configured token header that is present,
/// else a Bearer authorization. `None`: the request carries no token at all.
pub fn extract<V: AsRef<[u8]>>(
    cfg: &Config,
    mut header: impl FnMut(&str) -> Option<V>,
) -> Option<Credential<V>> {
    for name in &cfg.token_headers {
        if let Some(v) = header(name) {
            return Credential::within(v, |b| Some(b.trim_ascii()));
        }
    }
    if cfg.bearer {
        if let Some(v) = header("authorization") {
            return Credential::within(v, bearer_token);
        }
    }
    None
}

/// The lower-hex SHA-256 of a token, on the stack.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HashHex([u8; 64]);

impl HashHex {
    pub fn as_str(&self) -> &str {
        // Hex digits only: always UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::ops::Deref for HashHex {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for HashHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

/// The key under which a token's record is found: SHA-256 (with the CPU's instructions where
/// it has them), lower hex.
pub fn hash(token: &[u8]) -> HashHex {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(token);
    let mut out = [0u8; 64];
    for (pair, b) in out.chunks_exact_mut(2).zip(digest) {
        pair[0] = HEX[(b >> 4) as usize];
        pair[1] = HEX[(b & 0xf) as usize];
    }
    HashHex(out)
}

pub fn hash_hex(token: &[u8]) -> String {
    hash(token).as_str().to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    MissingToken,
    InvalidToken,
    TokenExpired,
    TokenSuspended,
    /// None of the token's scopes covers the request's method and path.
    InsufficientScope,
    RateLimited {
        retry_after_secs: u64,
        max_rps: u32,
        burst: u32,
    },
    /// This proxy's ceiling of the token's quota for the period is reached.
    QuotaExceeded {
        retry_after_secs: u64,
        limit: u64,
        /// The period's length in seconds.
        window_secs: u64,
    },
    StateUnavailable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Let the request through, with the identity of [`Verdict::token`].
    Allow,
    Deny(Denial),
}

/// A known token's record as the request found it: the identity sent upstream, the facts
/// for usage counting and the expiry header. Holds the stored value and reads its fields in
/// place.
pub struct Token<V> {
    record: V,
    id: Range<usize>,
    name: Range<usize>,
    owner: Range<usize>,
    pub kind: Kind,
    /// Unix seconds.
    pub expires_at: Option<i64>,
    /// The scope names' count and bytes; `None`: unrestricted.
    scopes: Option<(u16, Range<usize>)>,
}

impl<V: AsRef<[u8]>> Token<V> {
    /// The token's scope names; `None`: unrestricted.
    pub fn scopes(&self) -> Option<ScopeNames<'_>> {
        let (count, r) = self.scopes.as_ref()?;
        Some(ScopeNames::from_raw(*count, self.field(r)))
    }

    fn field(&self, r: &Range<usize>) -> &[u8] {
        self.record.as_ref().get(r.clone()).unwrap_or_default()
    }
    pub fn id(&self) -> &[u8] {
        self.field(&self.id)
    }
    pub fn name(&self) -> &[u8] {
        self.field(&self.name)
    }
    pub fn owner(&self) -> &[u8] {
        self.field(&self.owner)
    }
}

impl<V: AsRef<[u8]>> std::fmt::Debug for Token<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("id", &String::from_utf8_lossy(self.id()))
            .field("name", &String::from_utf8_lossy(self.name()))
            .field("owner", &String::from_utf8_lossy(self.owner()))
            .field("kind", &self.kind)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

pub struct Verdict<V> {
    pub outcome: Outcome,
    /// Set when the credential matched a live record (not for unknown or revoked tokens),
    /// whatever the outcome; always set when the request is allowed.
    pub token: Option<Token<V>>,
    /// The request met a fleet-limited token's bucket: it counts as that token's demand on
    /// this proxy.
    pub fleet: bool,
    /// The request met a quota: the secret's hash, under which it is counted so that the
    /// leader reports that quota's state.
    pub quota: Option<HashHex>,
    /// With [`Denial::InsufficientScope`]: the known scopes that would cover the request
    /// (space-separated), for the refusal's `WWW-Authenticate`.
    pub needed_scopes: Option<String>,
}

/// What a request asks for, as scoped tokens are judged: its `:method` and `:path` as the
/// host hands them over (`None`: absent, which no scope covers).
#[derive(Debug, Clone, Copy, Default)]
pub struct Target<'a> {
    pub method: Option<&'a [u8]>,
    pub path: Option<&'a [u8]>,
}

/// Decides a `GET /` that presented `credential` (see [`extract`]) at `now_nanos`, with a
/// scope set compiled for this call alone (for tests and tools; a filter keeps a
/// [`ScopeCache`] per worker and calls [`judge`]).
pub fn authorize<S: SharedStore + ?Sized>(
    cfg: &Config,
    store: &S,
    credential: Option<&[u8]>,
    now_nanos: u64,
) -> Outcome {
    let target = Target {
        method: Some(b"GET"),
        path: Some(b"/"),
    };
    judge(
        cfg,
        store,
        &ScopeCache::new(),
        credential,
        now_nanos,
        || target,
    )
    .outcome
}

/// The decision on a request that presented `credential` at `now_nanos`, also telling which
/// token it was. `target` is only asked for a scoped token's request.
pub fn judge<'t, S: SharedStore + ?Sized>(
    cfg: &Config,
    store: &S,
    scopes: &ScopeCache,
    credential: Option<&[u8]>,
    now_nanos: u64,
    target: impl FnOnce() -> Target<'t>,
) -> Verdict<S::Value> {
    let deny = |d| Verdict {
        outcome: Outcome::Deny(d),
        token: None,
        fleet: false,
        quota: None,
        needed_scopes: None,
    };
    let Some(credential) = credential else {
        return deny(Denial::MissingToken);
    };
    if !token::is_well_formed(credential) {
        return deny(Denial::InvalidToken);
    }
    // Until a full snapshot is loaded no answer is trustworthy: fail closed.
    let state = match store.get(STATE_KEY) {
        Ok((Some(v), _)) => v,
        _ => return deny(Denial::StateUnavailable),
    };
    let Some(generation) = record::state_generation(state.as_ref()) else {
        return deny(Denial::StateUnavailable);
    };
    let proxies = record::state_proxies(state.as_ref());
    let hash = hash(credential);
    let value = match store.get(&record::token_key(&hash)) {
        Ok((Some(v), _)) => v,
        Ok((None, _)) => return deny(Denial::InvalidToken),
        Err(_) => return deny(Denial::StateUnavailable),
    };
    let Some(rec) = record::decode_token(value.as_ref()) else {
        return deny(Denial::InvalidToken);
    };
    // Written before the latest full snapshot and not in it: the token is gone.
    if rec.generation < generation || rec.status == SyncStatus::Revoked {
        return deny(Denial::InvalidToken);
    }
    let (status, limit, scope, expires_at, quota, version) = (
        rec.status,
        Limit::new(rec.max_rps, rec.burst),
        rec.limit_scope,
        rec.expires_at,
        rec.quota,
        rec.version,
    );
    let whole = value.as_ref();
    let token = Token {
        id: span(whole, rec.id),
        name: span(whole, rec.name),
        owner: span(whole, rec.owner),
        kind: rec.kind,
        expires_at,
        scopes: rec.scopes.map(|s| {
            let (count, raw) = s.raw();
            (count, span(whole, raw))
        }),
        record: value,
    };
    let fleet = limit.is_some() && scope == LimitScope::Fleet;
    let expired = expires_at.is_some_and(|exp| (now_nanos / 1_000_000_000) as i64 >= exp);
    let suspended = status == SyncStatus::Suspended;
    // After expiry and suspension, before the rate: a request outside the token's scopes
    // consumes nothing.
    let out_of_scope = if expired || suspended {
        None
    } else {
        token.scopes().and_then(|names| {
            let Some((state_version, stamp)) = record::state_scopes(state.as_ref()) else {
                return Some((Denial::StateUnavailable, None));
            };
            let seen = Seen {
                stamp,
                token_newer: version > state_version,
            };
            let t = target();
            let (method, path) = (t.method.unwrap_or_default(), t.path.unwrap_or_default());
            match scopes.judge(store, seen, names, method, path) {
                Scoped::Allowed => None,
                Scoped::Refused { needed } => Some((Denial::InsufficientScope, needed)),
            }
        })
    };
    let verdict = |outcome, fleet, quota, needed_scopes| Verdict {
        outcome,
        token: Some(token),
        fleet,
        quota,
        needed_scopes,
    };
    if expired {
        return verdict(Outcome::Deny(Denial::TokenExpired), false, None, None);
    }
    if suspended {
        return verdict(Outcome::Deny(Denial::TokenSuspended), false, None, None);
    }
    if let Some((denial, needed)) = out_of_scope {
        return verdict(Outcome::Deny(denial), false, None, needed);
    }
    if limit.is_none() && quota.is_none() {
        return verdict(Outcome::Allow, false, None, None);
    }
    let bucket = Bucket {
        limit,
        scope,
        proxies,
        quota,
    };
    let counted = quota.map(|_| hash);
    match take(cfg, store, &record::rate_key(&hash), bucket, now_nanos) {
        Ok(()) => verdict(Outcome::Allow, fleet, counted, None),
        Err(d) => verdict(Outcome::Deny(d), fleet, counted, None),
    }
}

/// A token's limits as this proxy enforces them (see [`fleet::pace`] and
/// [`fleet::quota_now`]).
#[derive(Clone, Copy)]
struct Bucket {
    limit: Option<Limit>,
    scope: LimitScope,
    /// The proxies the control plane last counted.
    proxies: u32,
    quota: Option<Quota>,
}

/// When the response should carry the token's expiry: inside the warning window.
pub fn expiry_to_announce<V>(
    cfg: &Config,
    token: Option<&Token<V>>,
    now_nanos: u64,
) -> Option<i64> {
    let exp = token?.expires_at?;
    let now = (now_nanos / 1_000_000_000) as i64;
    // A window of 0 s (announcing off) holds no expiry that is still ahead.
    (exp > now && exp - now <= i64::from(cfg.expiry_warning_seconds)).then_some(exp)
}

/// One admission with compare-and-swap: the quota first (a refused request consumes no
/// rate), then GCRA at the pace the rate state's share (if any) sets (a refused request
/// consumes no quota); the share is written back as read. Out of retries means refused,
/// never admitted.
fn take<S: SharedStore + ?Sized>(
    cfg: &Config,
    store: &S,
    key: &str,
    bucket: Bucket,
    now: u64,
) -> Result<(), Denial> {
    // Clients see the token's own limit in the refusal's headers, whichever bucket refused.
    let limited = |retry_after_secs| match bucket.limit {
        Some(limit) => Denial::RateLimited {
            retry_after_secs,
            max_rps: limit.rate_per_sec,
            burst: limit.burst,
        },
        // Only a quota here: out of retries, its requests are refused as over it.
        None => quota_denial(cfg, bucket.quota, None, now, retry_after_secs),
    };
    let now_ms = now / 1_000_000;
    let now_s = (now / 1_000_000_000) as i64;
    let admitted = compare_and_swap(store, key, cfg.cas_retries, |value| {
        let stored = fleet::decode(value);
        let mut state = stored.unwrap_or_default();
        let mut changed = false;
        if let Some(quota) = bucket.quota {
            let (q, fresh) =
                fleet::quota_now(stored.map(|s| s.quota), quota, now_s, bucket.proxies);
            state.quota = Some(q);
            changed = fresh;
            if q.spent >= q.allowed {
                let d = quota_denial(cfg, Some(quota), Some(q), now, 0);
                // A new period's state is written even so, for the leader to report.
                return match changed {
                    true => Step::Write(fleet::encode(&state), Err(d)),
                    false => Step::Keep(Err(d)),
                };
            }
        } else if state.quota.take().is_some() {
            // The token lost its quota.
            changed = true;
        }
        if let Some(limit) = bucket.limit {
            let pace = fleet::pace(limit, bucket.scope, state.share, bucket.proxies, now_ms);
            if bucket.scope == LimitScope::Fleet
                && state.share.is_some_and(|s| !fleet::holds(s, limit, now_ms))
            {
                // The share lapsed: the fallback's bucket, from no further ahead than it holds.
                state.tat = fleet::rebase(state.tat, pace, now);
            }
            match gcra::decide_paced(pace, state.tat, now) {
                Decision::Deny { retry_after_nanos } => {
                    let d = limited(gcra::retry_after_secs(retry_after_nanos));
                    // Nothing consumed; the TAT as it was read.
                    let mut keep = stored.unwrap_or_default();
                    keep.quota = state.quota;
                    return match changed {
                        true => Step::Write(fleet::encode(&keep), Err(d)),
                        false => Step::Keep(Err(d)),
                    };
                }
                Decision::Allow { new_tat, .. } => state.tat = new_tat,
            }
        }
        if let Some(q) = state.quota.as_mut() {
            q.spent = q.spent.saturating_add(1);
        }
        Step::Write(fleet::encode(&state), Ok(()))
    });
    match admitted {
        Ok(decided) => decided,
        Err(CasError::Exhausted) => Err(limited(1)),
        Err(CasError::Host) => Err(Denial::StateUnavailable),
    }
}

/// The refusal of a request over this proxy's ceiling `q` of `quota`. Its `Retry-After`:
/// the period's end when this proxy alone has spent the whole quota; else the next fleet
/// report (rounded up to whole seconds), at which the control plane may raise the ceiling,
/// but never past the period's end. `fallback_secs` when no state was read (out of
/// retries).
fn quota_denial(
    cfg: &Config,
    quota: Option<Quota>,
    q: Option<fleet::QuotaState>,
    now: u64,
    fallback_secs: u64,
) -> Denial {
    let now_s = (now / 1_000_000_000) as i64;
    let Some(quota) = quota else {
        return Denial::StateUnavailable;
    };
    let (start, end) = quota.period.window(now_s);
    let to_end = (end - now_s).max(1) as u64;
    let retry_after_secs = match q {
        Some(q) if q.spent >= quota.limit => to_end,
        Some(_) => u64::from(cfg.fleet_report_ms)
            .div_ceil(1_000)
            .clamp(1, to_end),
        None => fallback_secs.clamp(1, to_end),
    };
    Denial::QuotaExceeded {
        retry_after_secs,
        limit: quota.limit,
        window_secs: (end - start).max(1) as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{encode_state, encode_token, State};
    use crate::store::fake::MemStore;
    use tokengate_wire::SyncRecord;

    const NOW: u64 = 1_800_000_000 * 1_000_000_000;

    fn cfg() -> Config {
        Config::parse(br#"{"control_plane_cluster":"cp","sync_token":"x"}"#).unwrap()
    }

    fn secret(c: char) -> String {
        token::compose(&c.to_string().repeat(32)).unwrap()
    }

    fn loaded(generation: u32) -> MemStore {
        let s = MemStore::default();
        let state = State {
            version: 1,
            generation,
            proxies: 0,
            store_id: "s".into(),
            token_count: 0,
            scopes_version: 1,
        };
        s.set(STATE_KEY, &encode_state(&state), 0).unwrap();
        s
    }

    fn put(s: &MemStore, secret: &str, generation: u32, edit: impl FnOnce(&mut SyncRecord)) {
        let mut r = SyncRecord {
            scopes: None,
            quota: None,
            hash: hash_hex(secret.as_bytes()),
            id: "tok_1".into(),
            name: "reporting".into(),
            owner: "alice".into(),
            kind: Kind::User,
            status: SyncStatus::Active,
            max_rps: None,
            burst: None,
            limit_scope: Default::default(),
            expires_at: None,
            version: 1,
        };
        edit(&mut r);
        s.set(
            &record::token_key(&r.hash),
            &encode_token(&r, generation),
            0,
        )
        .unwrap();
    }

    fn decide(s: &MemStore, t: &str) -> Outcome {
        authorize(&cfg(), s, Some(t.as_bytes()), NOW)
    }

    #[test]
    fn known_tokens_are_seen_whatever_the_outcome() {
        let s = loaded(1);
        let (ok, sus) = (secret('a'), secret('b'));
        put(&s, &ok, 1, |r| r.expires_at = Some(1_800_003_600));
        put(&s, &sus, 1, |r| {
            r.status = SyncStatus::Suspended;
            r.id = "tok_2".into();
        });
        let v = judge(
            &cfg(),
            &s,
            &ScopeCache::new(),
            Some(ok.as_bytes()),
            NOW,
            Target::default,
        );
        assert_eq!(v.outcome, Outcome::Allow);
        let seen = v.token.unwrap();
        assert_eq!(
            (seen.id(), seen.expires_at),
            (&b"tok_1"[..], Some(1_800_003_600))
        );
        let v = judge(
            &cfg(),
            &s,
            &ScopeCache::new(),
            Some(sus.as_bytes()),
            NOW,
            Target::default,
        );
        assert_eq!(v.outcome, Outcome::Deny(Denial::TokenSuspended));
        assert_eq!(v.token.unwrap().id(), b"tok_2");
        let unknown = judge(
            &cfg(),
            &s,
            &ScopeCache::new(),
            Some(secret('z').as_bytes()),
            NOW,
            Target::default,
        );
        assert_eq!(unknown.outcome, Outcome::Deny(Denial::InvalidToken));
        assert!(unknown.token.is_none());
    }

    #[test]
    fn expiry_is_announced_inside_the_window_only() {
        let c = cfg();
        let now_s = (NOW / 1_000_000_000) as i64;
        let seen = |exp: Option<i64>| Token {
            record: b"tok_1".to_vec(),
            id: 0..5,
            name: 0..0,
            owner: 0..0,
            kind: Kind::User,
            expires_at: exp,
            scopes: None,
        };
        let in_an_hour = seen(Some(now_s + 3_600));
        assert_eq!(
            expiry_to_announce(&c, Some(&in_an_hour), NOW),
            Some(now_s + 3_600)
        );
        assert_eq!(
            expiry_to_announce(&c, Some(&seen(Some(now_s + 8 * 86_400))), NOW),
            None
        );
        assert_eq!(expiry_to_announce(&c, Some(&seen(None)), NOW), None);
        assert_eq!(expiry_to_announce::<Vec<u8>>(&c, None, NOW), None);
        let off = Config::parse(
            br#"{"control_plane_cluster":"cp","sync_token":"x","expiry_warning_seconds":0}"#,
        )
        .unwrap();
        assert_eq!(expiry_to_announce(&off, Some(&in_an_hour), NOW), None);
        // The window's ends: seven days ahead is inside; expiring now has nothing to say.
        let week = now_s + 7 * 86_400;
        assert_eq!(
            expiry_to_announce(&c, Some(&seen(Some(week))), NOW),
            Some(week)
        );
        assert_eq!(
            expiry_to_announce(&c, Some(&seen(Some(week + 1))), NOW),
            None
        );
        assert_eq!(expiry_to_announce(&c, Some(&seen(Some(now_s))), NOW), None);
    }

    #[test]
    fn extract_prefers_the_token_header_then_bearer() {
        let c = cfg();
        let got = |c: &Config, h: &dyn Fn(&str) -> Option<Vec<u8>>| {
            extract(c, h).map(|cred| cred.bytes().to_vec())
        };
        let both = |n: &str| match n {
            "x-api-token" => Some(b" tg_a ".to_vec()),
            "authorization" => Some(b"Bearer tg_b".to_vec()),
            _ => None,
        };
        assert_eq!(got(&c, &both), Some(b"tg_a".to_vec()));
        let bearer = |n: &str| (n == "authorization").then(|| b"bearer   tg_b ".to_vec());
        assert_eq!(got(&c, &bearer), Some(b"tg_b".to_vec()));
        let basic = |n: &str| (n == "authorization").then(|| b"Basic dXNlcg==".to_vec());
        assert_eq!(got(&c, &basic), None);
        assert_eq!(got(&c, &|_| None), None);
        let mut no_bearer = cfg();
        no_bearer.bearer = false;
        assert_eq!(got(&no_bearer, &bearer), None);
        // Borrowed values work as well as owned ones (the native module lends Envoy's).
        let lent: &[u8] = b"  tg_c";
        let cred = extract(&c, |n: &str| (n == "x-api-token").then_some(lent)).unwrap();
        assert_eq!(cred.bytes(), b"tg_c");
    }

    #[test]
    fn bearer_parsing_is_strict_about_the_scheme() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"BEARER abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Bearerabc"), None);
        assert_eq!(bearer_token(b"Bearer"), Some(&b""[..]));
        assert_eq!(bearer_token(b"Bearer    "), Some(&b""[..]));
        assert_eq!(bearer_token(b"Token abc"), None);
        assert_eq!(bearer_token(&[0xff, 0xfe]), None);
    }

    #[test]
    fn hash_is_lower_hex_sha256() {
        assert_eq!(
            hash_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hash(b"abc").as_str(), hash_hex(b"abc"));
    }

    #[test]
    fn every_denial_reason() {
        let s = loaded(1);
        let t = secret('a');
        assert_eq!(
            authorize(&cfg(), &s, None, NOW),
            Outcome::Deny(Denial::MissingToken)
        );
        assert_eq!(decide(&s, "tg_short"), Outcome::Deny(Denial::InvalidToken));
        assert_eq!(
            decide(&s, &t),
            Outcome::Deny(Denial::InvalidToken),
            "unknown"
        );
        put(&s, &t, 1, |r| r.status = SyncStatus::Revoked);
        assert_eq!(
            decide(&s, &t),
            Outcome::Deny(Denial::InvalidToken),
            "revoked"
        );
        put(&s, &t, 1, |r| {
            r.expires_at = Some((NOW / 1_000_000_000) as i64)
        });
        assert_eq!(decide(&s, &t), Outcome::Deny(Denial::TokenExpired));
        put(&s, &t, 1, |r| r.status = SyncStatus::Suspended);
        assert_eq!(decide(&s, &t), Outcome::Deny(Denial::TokenSuspended));
        let unloaded = MemStore::default();
        assert_eq!(
            decide(&unloaded, &t),
            Outcome::Deny(Denial::StateUnavailable)
        );
    }

    #[test]
    fn records_from_before_the_last_snapshot_are_gone() {
        let s = loaded(2);
        let t = secret('b');
        put(&s, &t, 1, |_| {});
        assert_eq!(decide(&s, &t), Outcome::Deny(Denial::InvalidToken));
        put(&s, &t, 2, |_| {});
        assert_eq!(decide(&s, &t), Outcome::Allow);
        // A snapshot being written (generation ahead of the state) is already trusted.
        put(&s, &t, 3, |_| {});
        assert_eq!(decide(&s, &t), Outcome::Allow);
    }

    #[test]
    fn allowed_requests_carry_the_identity() {
        let s = loaded(1);
        let t = secret('c');
        put(&s, &t, 1, |r| {
            r.kind = Kind::Service;
            r.expires_at = Some((NOW / 1_000_000_000) as i64 + 1);
        });
        let v = judge(
            &cfg(),
            &s,
            &ScopeCache::new(),
            Some(t.as_bytes()),
            NOW,
            Target::default,
        );
        assert_eq!(v.outcome, Outcome::Allow);
        let token = v.token.unwrap();
        assert_eq!(
            (token.id(), token.name(), token.owner(), token.kind),
            (
                &b"tok_1"[..],
                &b"reporting"[..],
                &b"alice"[..],
                Kind::Service
            )
        );
    }

    #[test]
    fn rate_limit_admits_the_burst_then_refuses_with_retry_after() {
        let s = loaded(1);
        let t = secret('d');
        put(&s, &t, 1, |r| r.max_rps = Some(3));
        let outcomes: Vec<_> = (0..5).map(|_| decide(&s, &t)).collect();
        assert_eq!(outcomes.iter().filter(|o| **o == Outcome::Allow).count(), 3);
        assert_eq!(
            outcomes[4],
            Outcome::Deny(Denial::RateLimited {
                retry_after_secs: 1,
                max_rps: 3,
                burst: 3
            })
        );
    }

    #[test]
    fn cas_conflicts_are_retried_and_exhaustion_refuses() {
        let s = loaded(1);
        let t = secret('e');
        put(&s, &t, 1, |r| r.max_rps = Some(100));
        assert_eq!(decide(&s, &t), Outcome::Allow, "creates the rate key");
        s.fail_cas.set(3);
        assert_eq!(
            decide(&s, &t),
            Outcome::Allow,
            "three conflicts, then success"
        );
        s.fail_cas.set(1_000);
        assert!(matches!(
            decide(&s, &t),
            Outcome::Deny(Denial::RateLimited {
                retry_after_secs: 1,
                ..
            })
        ));
    }

    #[test]
    fn garbage_records_fail_closed() {
        let s = loaded(1);
        let t = secret('f');
        s.set(
            &record::token_key(&hash_hex(t.as_bytes())),
            b"\x01garbage",
            0,
        )
        .unwrap();
        assert_eq!(decide(&s, &t), Outcome::Deny(Denial::InvalidToken));
        let bad_state = MemStore::default();
        bad_state.set(STATE_KEY, b"x", 0).unwrap();
        assert_eq!(
            decide(&bad_state, &t),
            Outcome::Deny(Denial::StateUnavailable)
        );
    }

    mod quotas {
        use super::*;
        use crate::fleet::{self, RateState};
        use tokengate_wire::fleet::QuotaGrant;
        use tokengate_wire::{Period, Quota};

        /// 1_800_000_000 is 08:00:00Z; NOW is the first second of a 10 s period.
        const START: i64 = 1_800_000_000;
        const SEC: u64 = 1_000_000_000;

        fn with_proxies(proxies: u32) -> MemStore {
            let s = MemStore::default();
            let state = State {
                version: 1,
                generation: 1,
                proxies,
                store_id: "s".into(),
                token_count: 0,
                scopes_version: 0,
            };
            s.set(STATE_KEY, &encode_state(&state), 0).unwrap();
            s
        }

        fn quota(limit: u64) -> Option<Quota> {
            Some(Quota {
                limit,
                period: Period::Seconds(10),
            })
        }

        fn stored(s: &MemStore, t: &str) -> RateState {
            let (v, _) = s.get(&record::rate_key(&hash_hex(t.as_bytes()))).unwrap();
            fleet::decode(v.as_deref()).unwrap()
        }

        fn at(s: &MemStore, t: &str, now: u64) -> Outcome {
            authorize(&cfg(), s, Some(t.as_bytes()), now)
        }

        fn judge_get(s: &MemStore, t: &str) -> Verdict<Vec<u8>> {
            let target = Target {
                method: Some(b"GET"),
                path: Some(b"/"),
            };
            judge(
                &cfg(),
                s,
                &ScopeCache::new(),
                Some(t.as_bytes()),
                NOW,
                || target,
            )
        }

        fn admitted(s: &MemStore, t: &str, now: u64, n: u32) -> u32 {
            (0..n).filter(|_| at(s, t, now) == Outcome::Allow).count() as u32
        }

        #[test]
        fn a_proxy_admits_its_part_of_the_quota_then_refuses_until_the_period_ends() {
            let s = with_proxies(2);
            let t = secret('q');
            put(&s, &t, 1, |r| r.quota = quota(10));
            // Two proxies: five each until the control plane says otherwise.
            assert_eq!(admitted(&s, &t, NOW, 20), 5);
            let q = stored(&s, &t).quota.unwrap();
            assert_eq!(
                (q.period_start, q.spent, q.allowed, q.limit),
                (START, 5, 5, 10)
            );
            // Refused: the ceiling, not the whole quota, is spent; Retry-After is the next
            // report (1 s by default), when the ceiling may rise.
            assert_eq!(
                at(&s, &t, NOW + 3 * SEC),
                Outcome::Deny(Denial::QuotaExceeded {
                    retry_after_secs: 1,
                    limit: 10,
                    window_secs: 10
                })
            );
            assert_eq!(
                stored(&s, &t).quota.unwrap().spent,
                5,
                "refusals spend nothing"
            );
            // The next period: spent 0, five more.
            assert_eq!(admitted(&s, &t, NOW + 10 * SEC, 20), 5);
            let q = stored(&s, &t).quota.unwrap();
            assert_eq!((q.period_start, q.spent), (START + 10, 5));
        }

        #[test]
        fn the_whole_quota_spent_here_points_at_the_period_end() {
            let s = with_proxies(1);
            let t = secret('q');
            put(&s, &t, 1, |r| r.quota = quota(3));
            assert_eq!(admitted(&s, &t, NOW + 2 * SEC, 5), 3);
            assert_eq!(
                at(&s, &t, NOW + 2 * SEC),
                Outcome::Deny(Denial::QuotaExceeded {
                    retry_after_secs: 8,
                    limit: 3,
                    window_secs: 10
                })
            );
        }

        #[test]
        fn a_quota_refusal_consumes_no_rate_and_a_rate_refusal_no_quota() {
            let s = with_proxies(1);
            let t = secret('r');
            put(&s, &t, 1, |r| {
                r.max_rps = Some(2);
                r.burst = Some(2);
                r.limit_scope = LimitScope::Proxy;
                r.quota = quota(3);
            });
            // The burst of 2 passes; the third is refused by the rate and spends nothing.
            assert_eq!(admitted(&s, &t, NOW, 3), 2);
            assert!(matches!(
                at(&s, &t, NOW),
                Outcome::Deny(Denial::RateLimited { .. })
            ));
            assert_eq!(stored(&s, &t).quota.unwrap().spent, 2);
            // A second later: one more passes (the quota's third), then the quota refuses...
            let later = NOW + SEC;
            assert_eq!(admitted(&s, &t, later, 1), 1);
            let tat = stored(&s, &t).tat;
            assert!(matches!(
                at(&s, &t, later + SEC),
                Outcome::Deny(Denial::QuotaExceeded { .. })
            ));
            // ...and the TAT did not move: no rate was consumed.
            assert_eq!(stored(&s, &t).tat, tat);
            assert_eq!(stored(&s, &t).quota.unwrap().spent, 3);
        }

        #[test]
        fn a_quota_only_token_uses_its_rate_key_and_counts_as_quota_traffic() {
            let s = with_proxies(1);
            let t = secret('o');
            put(&s, &t, 1, |r| r.quota = quota(2));
            let v = judge_get(&s, &t);
            assert_eq!(v.outcome, Outcome::Allow);
            assert!(!v.fleet, "no rate limit: no fleet demand");
            assert_eq!(v.quota, Some(hash(t.as_bytes())));
            assert_eq!(stored(&s, &t).tat, 0, "no GCRA without max_rps");
            // Refused requests are quota traffic too: the leader reports the state.
            at(&s, &t, NOW);
            let v = judge_get(&s, &t);
            assert!(matches!(
                v.outcome,
                Outcome::Deny(Denial::QuotaExceeded { .. })
            ));
            assert!(v.quota.is_some());
            // No quota: nothing counted under one.
            let plain = secret('p');
            put(&s, &plain, 1, |_| {});
            assert_eq!(judge_get(&s, &plain).quota, None);
        }

        #[test]
        fn more_proxies_than_the_quota_start_at_nothing_and_the_state_is_written_anyway() {
            let s = with_proxies(5);
            let t = secret('m');
            put(&s, &t, 1, |r| r.quota = quota(3));
            assert!(matches!(
                at(&s, &t, NOW),
                Outcome::Deny(Denial::QuotaExceeded { .. })
            ));
            // Written though refused, so that the leader reports it and a grant follows.
            let q = stored(&s, &t).quota.unwrap();
            assert_eq!((q.period_start, q.spent, q.allowed), (START, 0, 0));
        }

        #[test]
        fn grants_raise_or_lower_the_ceiling_for_the_current_period_and_limit_only() {
            let s = with_proxies(2);
            let t = secret('g');
            let h = hash_hex(t.as_bytes());
            put(&s, &t, 1, |r| r.quota = quota(10));
            assert_eq!(admitted(&s, &t, NOW, 3), 3);
            let now_s = START + 1;
            let grant = |period_start, limit, allowed| QuotaGrant {
                hash: h.clone(),
                period_start,
                limit,
                allowed,
            };
            assert_eq!(
                fleet::apply_grant(&s, &grant(START, 10, 8), now_s),
                Ok(true)
            );
            assert_eq!(admitted(&s, &t, NOW + SEC, 20), 5, "up to 8 in all");
            // Stale: another period, another limit. Ignored.
            assert_eq!(
                fleet::apply_grant(&s, &grant(START - 10, 10, 10), now_s),
                Ok(false)
            );
            assert_eq!(
                fleet::apply_grant(&s, &grant(START, 9, 10), now_s),
                Ok(false)
            );
            assert_eq!(admitted(&s, &t, NOW + SEC, 5), 0);
            // A lower ceiling than spent: nothing more, and what was spent stays.
            assert_eq!(
                fleet::apply_grant(&s, &grant(START, 10, 2), now_s),
                Ok(true)
            );
            let q = stored(&s, &t).quota.unwrap();
            assert_eq!((q.spent, q.allowed), (8, 2));
            // Never above the whole quota.
            assert_eq!(
                fleet::apply_grant(&s, &grant(START, 10, 99), now_s),
                Ok(true)
            );
            assert_eq!(stored(&s, &t).quota.unwrap().allowed, 10);
            // A secret with no state yet gets one for the period.
            let fresh = secret('n');
            put(&s, &fresh, 1, |r| r.quota = quota(10));
            let g = QuotaGrant {
                hash: hash_hex(fresh.as_bytes()),
                ..grant(START, 10, 7)
            };
            assert_eq!(fleet::apply_grant(&s, &g, now_s), Ok(true));
            let q = stored(&s, &fresh).quota.unwrap();
            assert_eq!((q.period_start, q.spent, q.allowed), (START, 0, 7));
            // A secret this proxy does not hold, or one without a quota: nothing written.
            let unknown = QuotaGrant {
                hash: "c".repeat(64),
                ..grant(START, 10, 7)
            };
            assert_eq!(fleet::apply_grant(&s, &unknown, now_s), Ok(false));
            assert!(s
                .get(&record::rate_key(&"c".repeat(64)))
                .unwrap()
                .0
                .is_none());
        }

        #[test]
        fn a_damaged_rate_state_fails_closed_then_heals() {
            let s = with_proxies(2);
            let t = secret('d');
            put(&s, &t, 1, |r| r.quota = quota(10));
            let key = record::rate_key(&hash_hex(t.as_bytes()));
            s.set(&key, b"\x01\x02\x03", 0).unwrap();
            assert!(matches!(
                at(&s, &t, NOW),
                Outcome::Deny(Denial::QuotaExceeded { .. })
            ));
            // Rewritten as this proxy's ceiling spent; a grant raises it...
            let q = stored(&s, &t).quota.unwrap();
            assert_eq!((q.spent, q.allowed), (5, 5));
            let g = QuotaGrant {
                hash: hash_hex(t.as_bytes()),
                period_start: START,
                limit: 10,
                allowed: 7,
            };
            assert_eq!(fleet::apply_grant(&s, &g, START), Ok(true));
            assert_eq!(admitted(&s, &t, NOW, 5), 2);
            // ...and the next period starts afresh.
            assert_eq!(admitted(&s, &t, NOW + 10 * SEC, 10), 5);
        }

        #[test]
        fn a_changed_limit_keeps_the_spent_count() {
            let s = with_proxies(1);
            let t = secret('c');
            put(&s, &t, 1, |r| r.quota = quota(10));
            assert_eq!(admitted(&s, &t, NOW, 6), 6);
            put(&s, &t, 1, |r| r.quota = quota(8));
            assert_eq!(admitted(&s, &t, NOW, 5), 2);
            // The quota removed: no longer counted; a rate-limited token's state forgets it.
            put(&s, &t, 1, |_| {});
            assert_eq!(admitted(&s, &t, NOW, 5), 5);
            put(&s, &t, 1, |r| r.max_rps = Some(100));
            assert_eq!(admitted(&s, &t, NOW, 5), 5);
            assert_eq!(stored(&s, &t).quota, None);
        }
    }

    fn with_scopes(s: &MemStore) {
        use tokengate_wire::{Rule, SyncScope};
        let scope = |name: &str, methods: Option<&[&str]>, path: &str| SyncScope {
            name: name.into(),
            rules: vec![Rule {
                methods: methods.map(|ms| ms.iter().map(|m| m.to_string()).collect()),
                path: path.into(),
            }],
            version: 1,
        };
        let stamp = record::ScopeStamp {
            generation: 1,
            version: 1,
        };
        let set = [
            scope("orders:read", Some(&["GET"]), "/orders/**"),
            scope("orders:write", Some(&["POST"]), "/orders"),
        ];
        s.set(record::SCOPES_KEY, &record::encode_scopes(stamp, &set), 0)
            .unwrap();
    }

    fn asked(
        s: &MemStore,
        cache: &ScopeCache,
        t: &str,
        method: &str,
        path: &str,
    ) -> Verdict<Vec<u8>> {
        let target = Target {
            method: Some(method.as_bytes()),
            path: Some(path.as_bytes()),
        };
        judge(&cfg(), s, cache, Some(t.as_bytes()), NOW, || target)
    }

    #[test]
    fn a_scoped_token_goes_only_where_its_scopes_allow() {
        let s = loaded(1);
        with_scopes(&s);
        let cache = ScopeCache::new();
        let t = secret('g');
        put(&s, &t, 1, |r| r.scopes = Some(vec!["orders:read".into()]));
        assert_eq!(
            asked(&s, &cache, &t, "GET", "/orders/1").outcome,
            Outcome::Allow
        );
        let v = asked(&s, &cache, &t, "POST", "/orders");
        assert_eq!(v.outcome, Outcome::Deny(Denial::InsufficientScope));
        assert_eq!(v.needed_scopes.as_deref(), Some("orders:write"));
        assert_eq!(v.token.unwrap().id(), b"tok_1", "a known token's refusal");
        let v = asked(&s, &cache, &t, "GET", "/admin");
        assert_eq!(v.outcome, Outcome::Deny(Denial::InsufficientScope));
        assert_eq!(v.needed_scopes, None, "no scope covers it");
        for p in [
            "/orders/../admin",
            "//orders",
            "/orders/%2e%2e/x",
            "/ORDERS",
        ] {
            assert_eq!(
                asked(&s, &cache, &t, "GET", p).outcome,
                Outcome::Deny(Denial::InsufficientScope),
                "{p}"
            );
        }
        // No method or path from the host: nothing covers it.
        let v = judge(&cfg(), &s, &cache, Some(t.as_bytes()), NOW, Target::default);
        assert_eq!(v.outcome, Outcome::Deny(Denial::InsufficientScope));

        put(&s, &t, 1, |r| r.scopes = Some(vec!["deleted".into()]));
        assert_eq!(
            asked(&s, &cache, &t, "GET", "/orders").outcome,
            Outcome::Deny(Denial::InsufficientScope),
            "an unknown scope covers nothing"
        );
        put(&s, &t, 1, |r| r.scopes = Some(vec![]));
        assert_eq!(
            asked(&s, &cache, &t, "GET", "/orders").outcome,
            Outcome::Deny(Denial::InsufficientScope),
            "no scope: nothing"
        );
        put(&s, &t, 1, |r| r.scopes = None);
        let v = asked(&s, &cache, &t, "DELETE", "/anything/../at/all");
        assert_eq!(v.outcome, Outcome::Allow, "unrestricted");
        assert!(v.token.unwrap().scopes().is_none());
        assert_eq!(cache.compilations(), 1);
    }

    #[test]
    fn scopes_are_checked_after_expiry_and_suspension_and_before_the_rate() {
        let s = loaded(1);
        with_scopes(&s);
        let cache = ScopeCache::new();
        let t = secret('h');
        put(&s, &t, 1, |r| {
            r.scopes = Some(vec!["orders:read".into()]);
            r.status = SyncStatus::Suspended;
        });
        assert_eq!(
            asked(&s, &cache, &t, "POST", "/orders").outcome,
            Outcome::Deny(Denial::TokenSuspended)
        );
        put(&s, &t, 1, |r| {
            r.scopes = Some(vec!["orders:read".into()]);
            r.expires_at = Some((NOW / 1_000_000_000) as i64);
        });
        assert_eq!(
            asked(&s, &cache, &t, "POST", "/orders").outcome,
            Outcome::Deny(Denial::TokenExpired)
        );
        put(&s, &t, 1, |r| {
            r.scopes = Some(vec!["orders:read".into()]);
            r.max_rps = Some(1);
            r.burst = Some(1);
        });
        for _ in 0..5 {
            assert_eq!(
                asked(&s, &cache, &t, "POST", "/orders").outcome,
                Outcome::Deny(Denial::InsufficientScope)
            );
        }
        assert_eq!(
            asked(&s, &cache, &t, "GET", "/orders").outcome,
            Outcome::Allow,
            "the refusals took nothing from the bucket"
        );
        assert!(matches!(
            asked(&s, &cache, &t, "GET", "/orders").outcome,
            Outcome::Deny(Denial::RateLimited { .. })
        ));
    }
}
