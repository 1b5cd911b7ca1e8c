//! Compact binary values kept in Envoy shared data. Shared data sits behind one process-wide
//! mutex and every read copies the value, so values are small and decoding borrows.

use tokengate_wire::{Kind, LimitScope, Period, Quota, Rule, SyncRecord, SyncScope, SyncStatus};

/// 3: with scopes and quota.
const TOKEN_FORMAT: u8 = 3;
/// 3: with the scope set's stamp. A state of another format reads as no state, so a leader
/// loaded into an Envoy that still holds an older one takes a fresh snapshot instead of
/// misreading it (and requests wait for it with 503s rather than be judged on it).
const STATE_FORMAT: u8 = 3;
const SCOPES_FORMAT: u8 = 1;

/// Shared-data keys. The token hash is the lower-hex sha256 of the secret.
pub const STATE_KEY: &str = "tokengate:state";
pub const LEASE_KEY: &str = "tokengate:lease";
/// The last snapshot generation a sync leader took (u32, little-endian).
pub const GENERATION_KEY: &str = "tokengate:generation";
/// Every scope there is, in one value ([`encode_scopes`]): read by a worker only when the
/// state's scope stamp moves past what it compiled.
pub const SCOPES_KEY: &str = "tokengate:scopes";

pub fn token_key(hash_hex: &str) -> Key {
    Key::new("tg:t:", hash_hex)
}

pub fn rate_key(hash_hex: &str) -> Key {
    Key::new("tg:r:", hash_hex)
}

/// A shared-data key, built on the stack for the hex hash of a token so that the request
/// path allocates nothing.
#[derive(Clone)]
pub enum Key {
    Inline { buf: [u8; KEY_INLINE], len: usize },
    Heap(String),
}

/// A prefix of five bytes and a lower-hex SHA-256.
const KEY_INLINE: usize = 5 + 64;

impl Key {
    fn new(prefix: &str, rest: &str) -> Key {
        let len = prefix.len() + rest.len();
        if len > KEY_INLINE {
            return Key::Heap(format!("{prefix}{rest}"));
        }
        let mut buf = [0u8; KEY_INLINE];
        buf[..prefix.len()].copy_from_slice(prefix.as_bytes());
        buf[prefix.len()..len].copy_from_slice(rest.as_bytes());
        Key::Inline { buf, len }
    }

    pub fn as_str(&self) -> &str {
        match self {
            // Two whole `str`s side by side: always UTF-8.
            Key::Inline { buf, len } => std::str::from_utf8(&buf[..*len]).unwrap_or_default(),
            Key::Heap(s) => s,
        }
    }
}

impl std::ops::Deref for Key {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

impl PartialEq<String> for Key {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

/// A token record as the request path reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenView<'a> {
    /// Snapshot generation the record was written in; older than the state's: stale.
    pub generation: u32,
    pub version: u64,
    pub status: SyncStatus,
    pub kind: Kind,
    /// 0: unlimited.
    pub max_rps: u32,
    /// 0: the default (one second's worth).
    pub burst: u32,
    pub limit_scope: LimitScope,
    /// Unix seconds.
    pub expires_at: Option<i64>,
    pub id: &'a [u8],
    pub name: &'a [u8],
    pub owner: &'a [u8],
    /// `None`: unrestricted.
    pub scopes: Option<ScopeNames<'a>>,
    pub quota: Option<Quota>,
}

/// A token's scope names as stored: a count, then each name with its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScopeNames<'a> {
    count: u16,
    raw: &'a [u8],
}

impl<'a> ScopeNames<'a> {
    /// Names as [`ScopeNames::raw`] holds them.
    pub(crate) fn from_raw(count: u16, raw: &'a [u8]) -> ScopeNames<'a> {
        ScopeNames { count, raw }
    }

    /// The names' bytes in the record (for a reader that keeps the record, not the view).
    pub(crate) fn raw(&self) -> (u16, &'a [u8]) {
        (self.count, self.raw)
    }

    pub fn len(&self) -> usize {
        usize::from(self.count)
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> {
        let mut r = Reader { buf: self.raw };
        (0..self.count).map_while(move |_| r.bytes())
    }
}

fn status_byte(s: SyncStatus) -> u8 {
    match s {
        SyncStatus::Active => 0,
        SyncStatus::Suspended => 1,
        SyncStatus::Revoked => 2,
    }
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    // Names are capped far below this by the control plane; clamp rather than fail.
    let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
}

/// Encodes a synced record. Revoked tokens keep only what the request path needs.
pub fn encode_token(r: &SyncRecord, generation: u32) -> Vec<u8> {
    let revoked = r.status == SyncStatus::Revoked;
    let mut out = Vec::with_capacity(40 + r.id.len() + r.name.len() + r.owner.len());
    out.push(TOKEN_FORMAT);
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&r.version.to_le_bytes());
    out.push(status_byte(r.status));
    out.push(match r.kind {
        Kind::User => 0,
        Kind::Service => 1,
    });
    out.extend_from_slice(&r.max_rps.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&r.burst.unwrap_or(0).to_le_bytes());
    out.push(match r.limit_scope {
        LimitScope::Fleet => 0,
        LimitScope::Proxy => 1,
    });
    match r.expires_at {
        Some(t) => {
            out.push(1);
            out.extend_from_slice(&t.to_le_bytes());
        }
        None => out.push(0),
    }
    for s in [&r.id, &r.name, &r.owner] {
        push_str(&mut out, if revoked { "" } else { s });
    }
    match r.scopes.as_ref().filter(|_| !revoked) {
        Some(names) => {
            out.push(1);
            let names = &names[..names.len().min(usize::from(u16::MAX))];
            out.extend_from_slice(&(names.len() as u16).to_le_bytes());
            for n in names {
                push_str(&mut out, n);
            }
        }
        None => out.push(0),
    }
    match r.quota.filter(|_| !revoked) {
        Some(q) => {
            out.push(1);
            out.extend_from_slice(&q.limit.to_le_bytes());
            let (code, seconds) = match q.period {
                Period::Hour => (0, 0),
                Period::Day => (1, 0),
                Period::Month => (2, 0),
                Period::Seconds(n) => (3, n),
            };
            out.push(code);
            out.extend_from_slice(&seconds.to_le_bytes());
        }
        None => out.push(0),
    }
    out
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2)?.try_into().ok().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()? as usize;
        self.take(n)
    }
}

/// Decodes a token record; `None` for anything malformed (the caller fails closed).
pub fn decode_token(buf: &[u8]) -> Option<TokenView<'_>> {
    let mut r = Reader { buf };
    if r.u8()? != TOKEN_FORMAT {
        return None;
    }
    let generation = r.u32()?;
    let version = r.u64()?;
    let status = match r.u8()? {
        0 => SyncStatus::Active,
        1 => SyncStatus::Suspended,
        2 => SyncStatus::Revoked,
        _ => return None,
    };
    let kind = match r.u8()? {
        0 => Kind::User,
        1 => Kind::Service,
        _ => return None,
    };
    let max_rps = r.u32()?;
    let burst = r.u32()?;
    let limit_scope = match r.u8()? {
        0 => LimitScope::Fleet,
        1 => LimitScope::Proxy,
        _ => return None,
    };
    let expires_at = match r.u8()? {
        0 => None,
        1 => Some(r.u64()? as i64),
        _ => return None,
    };
    let id = r.bytes()?;
    let name = r.bytes()?;
    let owner = r.bytes()?;
    let scopes = read_scopes(&mut r)?;
    let quota = read_quota(&mut r)?;
    if !r.buf.is_empty() {
        return None;
    }
    Some(TokenView {
        generation,
        version,
        status,
        kind,
        max_rps,
        burst,
        limit_scope,
        expires_at,
        id,
        name,
        owner,
        scopes,
        quota,
    })
}

fn read_scopes<'a>(r: &mut Reader<'a>) -> Option<Option<ScopeNames<'a>>> {
    match r.u8()? {
        0 => Some(None),
        1 => {
            let count = r.u16()?;
            let start = r.buf;
            for _ in 0..count {
                r.bytes()?;
            }
            let raw = &start[..start.len() - r.buf.len()];
            Some(Some(ScopeNames { count, raw }))
        }
        _ => None,
    }
}

fn read_quota(r: &mut Reader<'_>) -> Option<Option<Quota>> {
    match r.u8()? {
        0 => Some(None),
        1 => {
            let limit = r.u64()?;
            // Seconds only with code 3: any other byte would read back as what no encoder
            // writes.
            let period = match (r.u8()?, r.u32()?) {
                (0, 0) => Period::Hour,
                (1, 0) => Period::Day,
                (2, 0) => Period::Month,
                (3, n) if n > 0 => Period::Seconds(n),
                _ => return None,
            };
            Some(Some(Quota { limit, period }))
        }
        _ => None,
    }
}

/// What the sync leader has loaded: absent until the first complete snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub version: u64,
    pub generation: u32,
    /// The proxies the control plane last counted as live (0: not heard yet), which divide
    /// a fleet limit when a proxy holds no share of it.
    pub proxies: u32,
    pub store_id: String,
    pub token_count: u64,
    /// The version of the last scope change the control plane reported (0: none yet). With
    /// `generation`, the [`ScopeStamp`] of the scope set written before this state.
    pub scopes_version: u64,
}

impl State {
    pub fn scope_stamp(&self) -> ScopeStamp {
        ScopeStamp {
            generation: self.generation,
            version: self.scopes_version,
        }
    }
}

/// Which scope set a state goes with: the snapshot generation it was written in, then the
/// version of the last scope change. Ordered so that a later set is greater, across
/// snapshots too (a new store's scope versions may start lower than the old one's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ScopeStamp {
    pub generation: u32,
    pub version: u64,
}

pub fn encode_state(s: &State) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + s.store_id.len());
    out.push(STATE_FORMAT);
    out.extend_from_slice(&s.version.to_le_bytes());
    out.extend_from_slice(&s.generation.to_le_bytes());
    out.extend_from_slice(&s.proxies.to_le_bytes());
    out.extend_from_slice(&s.scopes_version.to_le_bytes());
    out.extend_from_slice(&s.token_count.to_le_bytes());
    push_str(&mut out, &s.store_id);
    out
}

pub fn decode_state(buf: &[u8]) -> Option<State> {
    let mut r = Reader { buf };
    if r.u8()? != STATE_FORMAT {
        return None;
    }
    let version = r.u64()?;
    let generation = r.u32()?;
    let proxies = r.u32()?;
    let scopes_version = r.u64()?;
    let token_count = r.u64()?;
    let store_id = String::from_utf8(r.bytes()?.to_vec()).ok()?;
    if !r.buf.is_empty() {
        return None;
    }
    Some(State {
        version,
        generation,
        proxies,
        store_id,
        token_count,
        scopes_version,
    })
}

/// Only the generation, for the request path (no allocation).
pub fn state_generation(buf: &[u8]) -> Option<u32> {
    if buf.len() < 13 || buf[0] != STATE_FORMAT {
        return None;
    }
    buf[9..13].try_into().ok().map(u32::from_le_bytes)
}

/// Only the proxies last counted, for the request path (0 when unknown or unreadable).
pub fn state_proxies(buf: &[u8]) -> u32 {
    buf.get(13..17)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

/// Only the version and the scope stamp, for a scoped token's request (`None` when
/// unreadable).
pub fn state_scopes(buf: &[u8]) -> Option<(u64, ScopeStamp)> {
    let generation = state_generation(buf)?;
    let word = |at: usize| {
        buf.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let stamp = ScopeStamp {
        generation,
        version: word(17)?,
    };
    Some((word(1)?, stamp))
}

/// The scope set as a worker reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeSetRecord {
    pub stamp: ScopeStamp,
    pub scopes: Vec<SyncScope>,
}

fn clamp_u16<T>(items: &[T]) -> &[T] {
    &items[..items.len().min(usize::from(u16::MAX))]
}

/// Encodes every scope there is (the per-scope version is not kept: the stamp covers the
/// set). Read rarely (once per worker per change), so compact rather than in-place.
pub fn encode_scopes(stamp: ScopeStamp, scopes: &[SyncScope]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + scopes.len() * 64);
    out.push(SCOPES_FORMAT);
    out.extend_from_slice(&stamp.generation.to_le_bytes());
    out.extend_from_slice(&stamp.version.to_le_bytes());
    let scopes = clamp_u16(scopes);
    out.extend_from_slice(&(scopes.len() as u16).to_le_bytes());
    for s in scopes {
        push_str(&mut out, &s.name);
        let rules = clamp_u16(&s.rules);
        out.extend_from_slice(&(rules.len() as u16).to_le_bytes());
        for r in rules {
            match &r.methods {
                Some(ms) => {
                    let ms = clamp_u16(ms);
                    out.push(1);
                    out.extend_from_slice(&(ms.len() as u16).to_le_bytes());
                    for m in ms {
                        push_str(&mut out, m);
                    }
                }
                None => out.push(0),
            }
            push_str(&mut out, &r.path);
        }
    }
    out
}

/// Only the stamp of an encoded scope set.
pub fn scopes_stamp(buf: &[u8]) -> Option<ScopeStamp> {
    let mut r = Reader { buf };
    if r.u8()? != SCOPES_FORMAT {
        return None;
    }
    Some(ScopeStamp {
        generation: r.u32()?,
        version: r.u64()?,
    })
}

/// Decodes a scope set; `None` for anything malformed.
pub fn decode_scopes(buf: &[u8]) -> Option<ScopeSetRecord> {
    let stamp = scopes_stamp(buf)?;
    let mut r = Reader {
        buf: buf.get(13..)?,
    };
    let text = |r: &mut Reader<'_>| String::from_utf8(r.bytes()?.to_vec()).ok();
    let count = r.u16()?;
    let mut scopes = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let name = text(&mut r)?;
        let n = r.u16()?;
        let mut rules = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let methods = match r.u8()? {
                0 => None,
                1 => {
                    let m = r.u16()?;
                    Some((0..m).map(|_| text(&mut r)).collect::<Option<Vec<_>>>()?)
                }
                _ => return None,
            };
            let path = text(&mut r)?;
            rules.push(Rule { methods, path });
        }
        scopes.push(SyncScope {
            name,
            rules,
            version: 0,
        });
    }
    if !r.buf.is_empty() {
        return None;
    }
    Some(ScopeSetRecord { stamp, scopes })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub holder: u64,
    pub expires_ms: u64,
}

pub fn encode_lease(l: Lease) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&l.holder.to_le_bytes());
    out[8..].copy_from_slice(&l.expires_ms.to_le_bytes());
    out
}

pub fn decode_lease(buf: &[u8]) -> Option<Lease> {
    let mut r = Reader { buf };
    let holder = r.u64()?;
    let expires_ms = r.u64()?;
    Some(Lease { holder, expires_ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn record(status: SyncStatus) -> SyncRecord {
        SyncRecord {
            scopes: None,
            quota: None,
            hash: "0f".repeat(32),
            id: "tok_abc".into(),
            name: "ci pipeline".into(),
            owner: "data-team".into(),
            kind: Kind::Service,
            status,
            max_rps: Some(10),
            burst: Some(25),
            limit_scope: Default::default(),
            expires_at: Some(1_900_000_000),
            version: 42,
        }
    }

    #[test]
    fn token_round_trips() {
        let enc = encode_token(&record(SyncStatus::Active), 3);
        let v = decode_token(&enc).unwrap();
        assert_eq!(v.generation, 3);
        assert_eq!(v.version, 42);
        assert_eq!(v.status, SyncStatus::Active);
        assert_eq!(v.kind, Kind::Service);
        assert_eq!((v.max_rps, v.burst), (10, 25));
        assert_eq!(v.limit_scope, LimitScope::Fleet);
        let mut per_proxy = record(SyncStatus::Active);
        per_proxy.limit_scope = LimitScope::Proxy;
        let enc2 = encode_token(&per_proxy, 3);
        assert_eq!(decode_token(&enc2).unwrap().limit_scope, LimitScope::Proxy);
        let mut bad_scope = enc2.clone();
        bad_scope[23] = 7;
        assert!(decode_token(&bad_scope).is_none());
        assert_eq!(v.expires_at, Some(1_900_000_000));
        assert_eq!(
            (v.id, v.name, v.owner),
            (&b"tok_abc"[..], &b"ci pipeline"[..], &b"data-team"[..])
        );
    }

    #[test]
    fn unlimited_never_expiring_round_trips() {
        let mut r = record(SyncStatus::Suspended);
        r.max_rps = None;
        r.burst = None;
        r.expires_at = None;
        r.kind = Kind::User;
        let enc = encode_token(&r, 1);
        let v = decode_token(&enc).unwrap();
        assert_eq!((v.max_rps, v.burst, v.expires_at), (0, 0, None));
        assert_eq!((v.status, v.kind), (SyncStatus::Suspended, Kind::User));
    }

    #[test]
    fn scopes_and_quota_round_trip() {
        let mut r = record(SyncStatus::Active);
        r.scopes = Some(vec!["orders:read".into(), "b".into()]);
        r.quota = Some(Quota {
            limit: 1_000,
            period: Period::Seconds(10),
        });
        let enc = encode_token(&r, 1);
        let v = decode_token(&enc).unwrap();
        let names: Vec<&[u8]> = v.scopes.unwrap().iter().collect();
        assert_eq!(names, [&b"orders:read"[..], b"b"]);
        assert_eq!(v.quota, r.quota);
        r.scopes = Some(vec![]);
        let none = encode_token(&r, 1);
        let v = decode_token(&none).map(|v| v.scopes);
        assert!(
            v.unwrap().is_some_and(|s| s.is_empty()),
            "no scope: nothing allowed"
        );
    }

    #[test]
    fn revoked_records_are_tombstones() {
        let enc = encode_token(&record(SyncStatus::Revoked), 1);
        let v = decode_token(&enc).unwrap();
        assert_eq!(v.status, SyncStatus::Revoked);
        assert!(v.id.is_empty() && v.name.is_empty() && v.owner.is_empty());
    }

    #[test]
    fn truncated_or_padded_records_are_refused() {
        let enc = encode_token(&record(SyncStatus::Active), 1);
        for n in 0..enc.len() {
            assert!(decode_token(&enc[..n]).is_none(), "prefix of {n} bytes");
        }
        let mut longer = enc.clone();
        longer.push(0);
        assert!(decode_token(&longer).is_none());
        let mut bad_status = enc.clone();
        bad_status[13] = 9;
        assert!(decode_token(&bad_status).is_none());
        let mut bad_format = enc;
        bad_format[0] = 1;
        assert!(decode_token(&bad_format).is_none());
    }

    #[test]
    fn state_round_trips_and_generation_reads_in_place() {
        let s = State {
            version: 99,
            generation: 7,
            proxies: 3,
            store_id: "store-1".into(),
            token_count: 12,
            scopes_version: 5,
        };
        let enc = encode_state(&s);
        assert_eq!(decode_state(&enc), Some(s));
        assert_eq!(state_generation(&enc), Some(7));
        assert_eq!(state_proxies(&enc), 3);
        assert_eq!(
            state_scopes(&enc),
            Some((
                99,
                ScopeStamp {
                    generation: 7,
                    version: 5
                }
            ))
        );
        assert_eq!(state_scopes(&enc[..24]), None);
        let mut older = enc.clone();
        older[0] = 2;
        assert_eq!(decode_state(&older), None, "an older format is no state");
        assert_eq!(state_generation(&older), None);
        assert_eq!(state_proxies(&enc[..16]), 0);
        assert_eq!(state_generation(&enc[..5]), None);
        // The generation is read from the first 13 bytes alone.
        assert_eq!(state_generation(&enc[..13]), Some(7));
        assert_eq!(state_generation(&enc[..12]), None);
        assert_eq!(decode_state(&enc[..enc.len() - 1]), None);
    }

    #[test]
    fn lease_round_trips() {
        let l = Lease {
            holder: u64::MAX - 1,
            expires_ms: 123,
        };
        assert_eq!(decode_lease(&encode_lease(l)), Some(l));
        assert_eq!(decode_lease(&[1, 2, 3]), None);
    }

    #[test]
    fn keys_are_distinct_per_purpose() {
        let h = "ab".repeat(32);
        assert_eq!(token_key(&h), format!("tg:t:{h}"));
        assert_eq!(rate_key(&h), format!("tg:r:{h}"));
        assert!(matches!(token_key(&h), Key::Inline { .. }));
        let long = "x".repeat(100);
        assert_eq!(token_key(&long), format!("tg:t:{long}"));
    }

    #[test]
    fn scope_sets_round_trip_and_refuse_damage() {
        let stamp = ScopeStamp {
            generation: 4,
            version: 77,
        };
        let scopes = vec![
            SyncScope {
                name: "orders:read".into(),
                rules: vec![
                    Rule {
                        methods: Some(vec!["GET".into(), "HEAD".into()]),
                        path: "/orders/**".into(),
                    },
                    Rule {
                        methods: None,
                        path: "/items/*".into(),
                    },
                ],
                version: 0,
            },
            SyncScope {
                name: "none".into(),
                rules: vec![],
                version: 0,
            },
        ];
        let enc = encode_scopes(stamp, &scopes);
        assert_eq!(scopes_stamp(&enc), Some(stamp));
        let back = decode_scopes(&enc).unwrap();
        assert_eq!((back.stamp, back.scopes), (stamp, scopes));
        for n in 0..enc.len() {
            assert!(decode_scopes(&enc[..n]).is_none(), "prefix of {n} bytes");
        }
        let mut longer = enc.clone();
        longer.push(0);
        assert!(decode_scopes(&longer).is_none());
        let mut other = enc;
        other[0] = 9;
        assert!(decode_scopes(&other).is_none() && scopes_stamp(&other).is_none());
        assert_eq!(
            decode_scopes(&encode_scopes(stamp, &[])).unwrap().scopes,
            vec![]
        );
    }
}
