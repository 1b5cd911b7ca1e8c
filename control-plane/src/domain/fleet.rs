//! Fleet-wide limits, the control plane's side: which proxies are live, what each asks of
//! each fleet-limited token, and the share of the token's limit each gets. Reports and
//! proxies live in the store, so that every replica computes the same shares.
//!
//! A token's limit is split among the live proxies that reported it recently: each gets a
//! floor (a tenth of an equal share while it has demand; a thousandth while it has none, so
//! that a client that comes back is admitted at once, its burst of at least 1, without
//! idle proxies holding back much of the limit), then the rest is water-filled by demand
//! (admitted plus refused per second: no proxy gets more than it asks while another asks
//! for more), and what nobody asks for is split equally as headroom. The shares add up to
//! the limit exactly; the burst is split in the same proportions (at least 1 each).
//!
//! Each replica reads every proxy's demand at most every [`REFRESH_MS`] and answers reports
//! from that read, with the reporting proxy's own demand taken fresh from its report: a
//! report costs its writes and a computation, not a read of every other proxy's rows.

use super::audit::{self, QUOTA_EXHAUSTED, SYSTEM};
use super::quota::{self, TokenInput};
use super::DomainError;
use crate::store::{
    AuditRecord, DemandOf, DemandRow, Event, Exhaustion, QuotaState, QuotaWrite, Status, Store,
    TokenRow,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use tokengate_wire::fleet::{
    FleetAnswer, FleetReport, QuotaGrant, QuotaHeld, Share, TokenDemand, MAX_INTERVAL_MS,
    MAX_PROXY_ID, MAX_TOKENS, MIN_INTERVAL_MS,
};
use tokengate_wire::LimitScope;

/// A proxy is live while seen within this many of its report intervals.
pub const LIVE_INTERVALS: i64 = 3;
/// A share holds this many of the proxy's report intervals without a newer answer.
pub const TTL_INTERVALS: u32 = 3;
/// A proxy that reported a token this recently holds at least the floor of it.
pub const RECENT_MS: i64 = 30_000;
/// Reports and proxies older than this are forgotten.
pub const FORGET_MS: i64 = 10 * 60_000;
/// The floor of a proxy with demand is an equal share divided by this...
const FLOOR_DIVISOR: u64 = 10;
/// ...and of a proxy without.
const IDLE_FLOOR_DIVISOR: u64 = 1_000;
/// How old the read of every proxy's demand may be when a report is answered.
pub const REFRESH_MS: i64 = 250;
/// More requests per second than any one proxy can see: a claim above it counts as this much.
pub const MAX_REPORTED_RPS: u64 = 100_000_000;
/// The most one count of a report may say (`MAX_REPORTED_RPS` over the longest interval); a
/// count above it is refused. A bound that does not depend on the interval, so that the
/// OpenAPI document can state it.
pub const MAX_COUNT: u64 = MAX_REPORTED_RPS * MAX_INTERVAL_MS as u64 / 1_000;
/// Longest token id a report may name.
pub const MAX_TOKEN_ID: usize = 64;

/// What one proxy asks of a token.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub proxy: String,
    /// Requests per second (admitted and refused) over its last interval; 0 when it has
    /// not reported the token in its last two intervals.
    pub demand: f64,
}

/// One proxy's part of a token's limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub proxy: String,
    /// Thousandths of a request per second.
    pub rate_milli: u64,
    pub burst: u32,
}

/// Splits `max_rps` and `burst` among `claims` (see the module's documentation). Every
/// claimant gets a non-zero rate and a burst of at least 1; the rates add up to `max_rps`.
pub fn split(max_rps: u32, burst: u32, claims: &[Claim]) -> Vec<Part> {
    let n = claims.len() as u64;
    if n == 0 {
        return vec![];
    }
    let total = u64::from(max_rps) * 1_000;
    let floors: Vec<u64> = claims
        .iter()
        .map(|c| {
            let divisor = if c.demand > 0.0 {
                FLOOR_DIVISOR
            } else {
                IDLE_FLOOR_DIVISOR
            };
            (total / (n * divisor)).max(1)
        })
        .collect();
    let mut rest = total.saturating_sub(floors.iter().sum());
    let want: Vec<u64> = claims
        .iter()
        .zip(&floors)
        .map(|(c, f)| ((c.demand.max(0.0) * 1_000.0).min(total as f64) as u64).saturating_sub(*f))
        .collect();
    let mut order: Vec<usize> = (0..claims.len()).collect();
    order.sort_by_key(|&i| (want[i], i));
    let mut give = vec![0u64; claims.len()];
    for (k, &i) in order.iter().enumerate() {
        let left = n - k as u64;
        give[i] = want[i].min(rest / left);
        rest -= give[i];
    }
    // Headroom nobody asked for, split equally (the remainder to the first ones).
    for (k, &i) in order.iter().enumerate() {
        let left = n - k as u64;
        let extra = rest / left + u64::from(rest % left != 0);
        give[i] += extra;
        rest -= extra;
    }
    let burst = u64::from(burst.max(1));
    claims
        .iter()
        .zip(give)
        .zip(floors)
        .map(|((c, g), floor)| {
            let rate_milli = floor + g;
            Part {
                proxy: c.proxy.clone(),
                rate_milli,
                burst: (u128::from(burst) * u128::from(rate_milli) / u128::from(total.max(1)))
                    .clamp(1, u128::from(burst)) as u32,
            }
        })
        .collect()
}

/// `part`, cut to what `live` proxies leave when all but `claimants` of them run at
/// `max_rps / live` (and `burst / live`) each.
pub fn first_share(part: Part, max_rps: u32, burst: u32, live: usize, claimants: usize) -> Part {
    let live = live.max(claimants).max(1) as u64;
    let others = live - claimants as u64;
    let total = u64::from(max_rps) * 1_000;
    let left = total - total / live * others;
    let burst_left = u64::from(burst) - u64::from(burst) / live * others;
    Part {
        rate_milli: part.rate_milli.min(left).max(1),
        burst: part.burst.min(burst_left.max(1) as u32).max(1),
        ..part
    }
}

/// The demand a report row stands for at `now_ms`: its rate if it is from the proxy's last
/// two intervals (reports come every interval and a tick, and are read up to
/// [`REFRESH_MS`] late), else none (the proxy had no traffic since). Taking a busy proxy
/// for an idle one would hand its share to the others while it still holds it.
pub fn demand(row: &DemandRow, now_ms: i64) -> f64 {
    let interval = i64::from(row.interval_ms.max(1));
    if now_ms - row.seen_at_ms > 2 * interval + REFRESH_MS {
        return 0.0;
    }
    row.admitted.saturating_add(row.refused) as f64 * 1_000.0 / interval as f64
}

/// Whether a proxy seen at `seen_at_ms`, reporting every `interval_ms`, is live at `now_ms`.
pub fn is_live(seen_at_ms: i64, interval_ms: u32, now_ms: i64) -> bool {
    now_ms - seen_at_ms <= LIVE_INTERVALS * i64::from(interval_ms.max(MIN_INTERVAL_MS))
}

/// A token whose limit is shared by the fleet.
fn fleet_limited(t: &TokenRow) -> Option<(u32, u32)> {
    let max_rps = t.max_rps?;
    (t.status == Status::Active && t.limit_scope == LimitScope::Fleet)
        .then(|| (max_rps, t.burst.unwrap_or(max_rps)))
}

/// The claims on one token by live proxies.
fn claims(rows: &[&DemandRow], live: &BTreeSet<String>, now_ms: i64) -> Vec<Claim> {
    rows.iter()
        .filter(|r| live.contains(&r.proxy_id))
        .map(|r| Claim {
            proxy: r.proxy_id.clone(),
            demand: demand(r, now_ms),
        })
        .collect()
}

/// One proxy's part of a token, as the API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyPart {
    pub proxy_id: String,
    pub admitted_rps: f64,
    pub refused_rps: f64,
    pub share_rps: f64,
    pub share_burst: u32,
    /// Unix milliseconds of its last report of the token.
    pub seen_at_ms: i64,
}

/// The live fleet view of a fleet-limited token.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetView {
    /// Proxies live now, whether they saw the token or not.
    pub proxies_live: u32,
    /// Live proxies that reported the token recently.
    pub proxies_seen: u32,
    pub admitted_rps: f64,
    pub refused_rps: f64,
    pub parts: Vec<ProxyPart>,
}

pub struct Fleet {
    store: Arc<dyn Store>,
    /// Whether quota exhaustions also go out as webhook events.
    quota_events: bool,
    /// Every proxy's demand as last read, shared by the reports answered meanwhile.
    snapshot: tokio::sync::Mutex<Option<Arc<Snapshot>>>,
}

/// Every live proxy and every recent report, read at `at_ms`, with the tokens they name.
struct Snapshot {
    at_ms: i64,
    live: BTreeSet<String>,
    by_token: HashMap<String, Vec<DemandRow>>,
    /// The tokens each proxy reported recently.
    by_proxy: HashMap<String, Vec<String>>,
    tokens: HashMap<String, TokenRow>,
}

/// A report's refusal: a field, or more tokens than a report may carry.
fn invalid(field: &'static str, message: impl Into<String>) -> DomainError {
    DomainError::invalid(field, message)
}

/// Checks a report and merges tokens named twice.
pub fn check(report: &FleetReport) -> Result<Vec<TokenDemand>, DomainError> {
    let id = &report.proxy_id;
    if id.is_empty() || id.chars().count() > MAX_PROXY_ID {
        return Err(invalid(
            "proxy_id",
            format!("must be 1 to {MAX_PROXY_ID} characters long"),
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(invalid("proxy_id", "must not contain control characters"));
    }
    if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&report.interval_ms) {
        return Err(invalid(
            "interval_ms",
            format!("must be between {MIN_INTERVAL_MS} and {MAX_INTERVAL_MS}"),
        ));
    }
    let mut merged: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for t in &report.tokens {
        if t.id.is_empty()
            || t.id.chars().count() > MAX_TOKEN_ID
            || t.id.chars().any(char::is_control)
        {
            return Err(invalid(
                "tokens.id",
                format!(
                    "must be a token id (1 to {MAX_TOKEN_ID} characters, no control characters)"
                ),
            ));
        }
        for (field, count) in [
            ("tokens.admitted", t.admitted),
            ("tokens.refused", t.refused),
        ] {
            if count > MAX_COUNT {
                return Err(invalid(field, format!("must be at most {MAX_COUNT}")));
            }
        }
        let e = merged.entry(&t.id).or_default();
        e.0 = e.0.saturating_add(t.admitted);
        e.1 = e.1.saturating_add(t.refused);
    }
    // No proxy sees more than MAX_REPORTED_RPS for one token: a claim of more (a token
    // named twice, counts beyond the interval) weighs as that much, so that it cannot take
    // the other proxies' shares.
    let most = MAX_REPORTED_RPS * u64::from(report.interval_ms) / 1_000;
    for e in merged.values_mut() {
        e.0 = e.0.min(most);
        e.1 = e.1.min(most.saturating_sub(e.0));
    }
    if merged.len() > MAX_TOKENS {
        return Err(invalid(
            "tokens",
            format!("may name at most {MAX_TOKENS} tokens"),
        ));
    }
    Ok(merged
        .into_iter()
        .map(|(id, (admitted, refused))| TokenDemand {
            id: id.to_string(),
            admitted,
            refused,
        })
        .collect())
}

/// Checks a report's quota entries (at most [`MAX_TOKENS`], each naming a secret by its
/// sha256) and merges a secret named twice for one period (the larger counts).
pub fn check_quotas(report: &FleetReport) -> Result<Vec<QuotaHeld>, DomainError> {
    if report.quotas.len() > MAX_TOKENS {
        return Err(invalid(
            "quotas",
            format!("may name at most {MAX_TOKENS} secrets"),
        ));
    }
    let mut merged: BTreeMap<(&str, i64), (u64, u64)> = BTreeMap::new();
    for q in &report.quotas {
        if q.hash.len() != 64
            || !q
                .hash
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(invalid(
                "quotas.hash",
                "must be the sha256 of a secret, 64 lower-case hex digits",
            ));
        }
        let e = merged.entry((&q.hash, q.period_start)).or_default();
        e.0 = e.0.max(q.spent.min(quota::MAX_COUNT));
        e.1 = e.1.max(q.allowed.min(quota::MAX_COUNT));
    }
    Ok(merged
        .into_iter()
        .map(|((hash, period_start), (spent, allowed))| QuotaHeld {
            hash: hash.to_string(),
            period_start,
            spent,
            allowed,
        })
        .collect())
}

/// The quota exchange's decision on what the store read: every quota token in `state`
/// decided for `proxy` (see `super::quota`); the rows and exhaustions to write, and the
/// grants to answer.
pub fn decide_quotas(
    state: &QuotaState,
    proxy: &str,
    interval_ms: u32,
    held: &[QuotaHeld],
    now_ms: i64,
    events: bool,
) -> (QuotaWrite, Vec<QuotaGrant>) {
    let now_s = now_ms.div_euclid(1_000);
    let mut live: BTreeMap<String, u32> = state
        .proxies
        .iter()
        .filter(|p| is_live(p.seen_at_ms, p.interval_ms, now_ms))
        .map(|p| (p.proxy_id.clone(), p.interval_ms))
        .collect();
    live.insert(proxy.to_string(), interval_ms);
    let mut write = QuotaWrite::default();
    let mut grants = vec![];
    for token in &state.tokens {
        let Some(q) = token.quota.filter(|_| token.status != Status::Revoked) else {
            continue;
        };
        let period = q.period.window(now_s);
        let valid: BTreeSet<String> = std::iter::once(token.hash.clone())
            .chain(
                token
                    .retired
                    .iter()
                    .filter(|s| s.until > now_s)
                    .map(|s| s.hash.clone()),
            )
            .collect();
        let known = |h: &str| token.hash == h || token.retired.iter().any(|s| s.hash == h);
        let reported: Vec<QuotaHeld> = held
            .iter()
            .filter(|h| h.period_start == period.0 && known(&h.hash))
            .cloned()
            .collect();
        let holders: Vec<_> = state
            .holders
            .iter()
            .filter(|h| h.token_id == token.id && h.period_start == period.0)
            .cloned()
            .collect();
        let out = quota::decide(&TokenInput {
            token_id: &token.id,
            limit: q.limit,
            period,
            current_hash: &token.hash,
            valid_hashes: &valid,
            holders: &holders,
            live: &live,
            proxy,
            interval_ms,
            reported: &reported,
            now_ms,
        });
        for r in &out.rows {
            if valid.contains(&r.hash) {
                grants.push(QuotaGrant {
                    hash: r.hash.clone(),
                    period_start: period.0,
                    limit: q.limit,
                    allowed: r.granted,
                });
            }
        }
        if out.exhausted {
            let detail = serde_json::json!({
                "quota": q,
                "period_start": audit::rfc3339(period.0),
                "resets_at": audit::rfc3339(period.1),
                "used": out.used,
            });
            let event = events.then(|| {
                let (id, kind, payload) =
                    crate::webhook::quota_exhausted_event(token, q, period, out.used, now_s);
                Event {
                    id,
                    kind,
                    payload,
                    at: now_s,
                }
            });
            write.exhausted.push(Exhaustion {
                token_id: token.id.clone(),
                period_start: period.0,
                period_end: period.1,
                audit: AuditRecord {
                    at: now_s,
                    actor: SYSTEM.to_string(),
                    action: QUOTA_EXHAUSTED,
                    token_id: token.id.clone(),
                    token_name: token.name.clone(),
                    before: None,
                    after: Some(detail),
                },
                event,
            });
        }
        write.holders.extend(out.rows);
    }
    (write, grants)
}

impl Fleet {
    pub fn new(store: Arc<dyn Store>) -> Fleet {
        Fleet {
            store,
            quota_events: false,
            snapshot: tokio::sync::Mutex::new(None),
        }
    }

    /// Quota exhaustions also put a `token.quota_exhausted` event in the webhook outbox.
    pub fn with_quota_events(mut self, on: bool) -> Fleet {
        self.quota_events = on;
        self
    }

    /// The quota exchange of a report: records what the proxy holds and answers its new
    /// ceilings (see `super::quota`), in one store transaction.
    async fn quotas(
        &self,
        proxy: &str,
        interval_ms: u32,
        held: Vec<QuotaHeld>,
        now_ms: i64,
    ) -> Result<Vec<QuotaGrant>, DomainError> {
        let hashes: Vec<String> = held.iter().map(|h| h.hash.clone()).collect();
        let grants = Arc::new(Mutex::new(Vec::new()));
        let answer = grants.clone();
        let (proxy, events) = (proxy.to_string(), self.quota_events);
        let decide = move |state: &QuotaState| {
            let (write, decided) = decide_quotas(state, &proxy, interval_ms, &held, now_ms, events);
            // The last decision is the one committed (a retried transaction decides again).
            if let Ok(mut g) = answer.lock() {
                *g = decided;
            }
            write
        };
        let since = now_ms - LIVE_INTERVALS * i64::from(MAX_INTERVAL_MS);
        let written = self
            .store
            .quota_exchange(&hashes, now_ms / 1_000, since, MAX_TOKENS, Arc::new(decide))
            .await?;
        for e in &written.exhausted {
            tracing::info!(token = %e.token_id, period_start = e.period_start, "quota used up");
        }
        let grants = grants.lock().map(|g| g.clone()).unwrap_or_default();
        Ok(grants)
    }

    /// The snapshot, read again when it is older than [`REFRESH_MS`].
    async fn snapshot(&self, now_ms: i64) -> Result<Arc<Snapshot>, DomainError> {
        let mut held = self.snapshot.lock().await;
        if let Some(s) = held.as_ref().filter(|s| now_ms - s.at_ms < REFRESH_MS) {
            return Ok(s.clone());
        }
        let live = self.live(now_ms).await?;
        let rows = self
            .store
            .fleet_demand(DemandOf::All, now_ms - RECENT_MS)
            .await?;
        let mut by_token: HashMap<String, Vec<DemandRow>> = HashMap::new();
        let mut by_proxy: HashMap<String, Vec<String>> = HashMap::new();
        for r in rows {
            by_proxy
                .entry(r.proxy_id.clone())
                .or_default()
                .push(r.token_id.clone());
            by_token.entry(r.token_id.clone()).or_default().push(r);
        }
        let ids: Vec<String> = by_token.keys().cloned().collect();
        let tokens = self
            .store
            .tokens_by_id(&ids)
            .await?
            .into_iter()
            .map(|t| (t.id.clone(), t))
            .collect();
        let fresh = Arc::new(Snapshot {
            at_ms: now_ms,
            live,
            by_token,
            by_proxy,
            tokens,
        });
        *held = Some(fresh.clone());
        Ok(fresh)
    }

    /// The proxies live at `now_ms`.
    async fn live(&self, now_ms: i64) -> Result<BTreeSet<String>, DomainError> {
        let since = now_ms - LIVE_INTERVALS * i64::from(MAX_INTERVAL_MS);
        Ok(self
            .store
            .fleet_proxies(since)
            .await?
            .into_iter()
            .filter(|p| is_live(p.seen_at_ms, p.interval_ms, now_ms))
            .map(|p| p.proxy_id)
            .collect())
    }

    /// How many proxies are live, counting `poller` (a proxy about to report) among them.
    pub async fn live_count(&self, poller: Option<&str>, now_ms: i64) -> Result<u32, DomainError> {
        let mut live = self.live(now_ms).await?;
        if let Some(p) = poller.filter(|p| !p.is_empty()) {
            live.insert(p.to_string());
        }
        Ok(u32::try_from(live.len().max(1)).unwrap_or(u32::MAX))
    }

    /// Records a report and answers the reporting proxy's shares.
    pub async fn report(
        &self,
        report: &FleetReport,
        now_ms: i64,
    ) -> Result<FleetAnswer, DomainError> {
        let tokens = check(report)?;
        let held = check_quotas(report)?;
        let proxy = report.proxy_id.as_str();
        self.store
            .fleet_report(
                proxy,
                report.interval_ms,
                now_ms,
                now_ms - FORGET_MS,
                &tokens,
            )
            .await?;
        let snap = self.snapshot(now_ms).await?;
        let mut live = snap.live.clone();
        live.insert(proxy.to_string());
        // This proxy's demand as it just reported it; everyone else's as last read.
        let own: HashMap<&str, DemandRow> = tokens
            .iter()
            .map(|t| {
                let row = DemandRow {
                    token_id: t.id.clone(),
                    proxy_id: proxy.to_string(),
                    admitted: t.admitted,
                    refused: t.refused,
                    interval_ms: report.interval_ms,
                    seen_at_ms: now_ms,
                };
                (t.id.as_str(), row)
            })
            .collect();
        let mut ids: BTreeSet<&str> = own.keys().copied().collect();
        ids.extend(
            snap.by_proxy
                .get(proxy)
                .into_iter()
                .flatten()
                .map(String::as_str),
        );
        let missing: Vec<String> = ids
            .iter()
            .filter(|id| !snap.tokens.contains_key(**id))
            .map(|id| id.to_string())
            .collect();
        let fetched = if missing.is_empty() {
            vec![]
        } else {
            self.store.tokens_by_id(&missing).await?
        };
        let fetched: HashMap<&str, &TokenRow> =
            fetched.iter().map(|t| (t.id.as_str(), t)).collect();
        let now_s = now_ms / 1_000;
        let mut shares = vec![];
        for id in ids {
            let Some(token) = snap.tokens.get(id).or(fetched.get(id).copied()) else {
                continue;
            };
            let Some((max_rps, burst)) = fleet_limited(token) else {
                continue;
            };
            let mut rows: Vec<&DemandRow> = snap
                .by_token
                .get(id)
                .into_iter()
                .flatten()
                .filter(|r| r.proxy_id != proxy)
                .collect();
            match (own.get(id), snap.by_token.get(id)) {
                (Some(fresh), _) => rows.push(fresh),
                (None, Some(old)) => rows.extend(old.iter().filter(|r| r.proxy_id == proxy)),
                (None, None) => {}
            }
            let claims = claims(&rows, &live, now_ms);
            let Some(mut part) = split(max_rps, burst, &claims)
                .into_iter()
                .find(|p| p.proxy == proxy)
            else {
                continue;
            };
            // A proxy's first report of a token may come before the others' (a token new
            // to the fleet): it gets no more than what the live proxies that have not
            // reported it leave, as they run at max_rps / live proxies meanwhile.
            let first = !snap
                .by_token
                .get(id)
                .is_some_and(|rows| rows.iter().any(|r| r.proxy_id == proxy));
            if first {
                part = first_share(part, max_rps, burst, live.len(), claims.len());
            }
            let hashes = std::iter::once(token.hash.as_str()).chain(
                token
                    .retired
                    .iter()
                    .filter(|s| s.until > now_s)
                    .map(|s| s.hash.as_str()),
            );
            for hash in hashes {
                shares.push(Share {
                    hash: hash.to_string(),
                    max_rps,
                    burst,
                    rate_milli: part.rate_milli,
                    share_burst: part.burst,
                });
            }
        }
        let quotas = self.quotas(proxy, report.interval_ms, held, now_ms).await?;
        Ok(FleetAnswer {
            proxies: u32::try_from(live.len().max(1)).unwrap_or(u32::MAX),
            ttl_ms: report.interval_ms.saturating_mul(TTL_INTERVALS),
            shares,
            quotas,
        })
    }

    /// The live fleet view of `token`; `None` unless its limit is the fleet's.
    pub async fn view(
        &self,
        token: &TokenRow,
        now_ms: i64,
    ) -> Result<Option<FleetView>, DomainError> {
        let Some((max_rps, burst)) = fleet_limited(token) else {
            return Ok(None);
        };
        let live = self.live(now_ms).await?;
        let rows = self
            .store
            .fleet_demand(DemandOf::Token(&token.id), now_ms - RECENT_MS)
            .await?;
        let rows: Vec<&DemandRow> = rows.iter().filter(|r| live.contains(&r.proxy_id)).collect();
        let parts = split(max_rps, burst, &claims(&rows, &live, now_ms));
        let rate = |r: &DemandRow, n: u64| {
            if demand(r, now_ms) == 0.0 {
                0.0
            } else {
                n as f64 * 1_000.0 / f64::from(r.interval_ms.max(1))
            }
        };
        let parts: Vec<ProxyPart> = rows
            .iter()
            .zip(parts)
            .map(|(r, p)| ProxyPart {
                proxy_id: r.proxy_id.clone(),
                admitted_rps: rate(r, r.admitted),
                refused_rps: rate(r, r.refused),
                share_rps: p.rate_milli as f64 / 1_000.0,
                share_burst: p.burst,
                seen_at_ms: r.seen_at_ms,
            })
            .collect();
        Ok(Some(FleetView {
            proxies_live: u32::try_from(live.len()).unwrap_or(u32::MAX),
            proxies_seen: u32::try_from(parts.len()).unwrap_or(u32::MAX),
            admitted_rps: parts.iter().map(|p| p.admitted_rps).sum(),
            refused_rps: parts.iter().map(|p| p.refused_rps).sum(),
            parts,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(proxy: &str, demand: f64) -> Claim {
        Claim {
            proxy: proxy.into(),
            demand,
        }
    }

    #[test]
    fn a_first_report_leaves_room_for_the_live_proxies_that_have_not_reported_yet() {
        let whole = Part {
            proxy: "a".into(),
            rate_milli: 100_000,
            burst: 100,
        };
        // Three live, one claimant: at most a third, as the other two run at a third each.
        let cut = first_share(whole.clone(), 100, 100, 3, 1);
        assert_eq!((cut.rate_milli, cut.burst), (33_334, 34));
        // Everyone has reported: nothing to leave.
        let kept = first_share(whole.clone(), 100, 100, 3, 3);
        assert_eq!((kept.rate_milli, kept.burst), (100_000, 100));
        // Never zero.
        let tiny = first_share(whole, 1, 1, 50, 1);
        assert!(tiny.rate_milli >= 1 && tiny.burst >= 1);
    }

    fn rates(parts: &[Part]) -> Vec<u64> {
        parts.iter().map(|p| p.rate_milli).collect()
    }

    #[test]
    fn shares_follow_demand_and_add_up_to_the_limit() {
        // 80/15/5 of twice the limit: the small ones get what they ask, the big one the rest.
        let parts = split(
            100,
            100,
            &[claim("a", 160.0), claim("b", 30.0), claim("c", 10.0)],
        );
        assert_eq!(rates(&parts), [60_000, 30_000, 10_000]);
        assert_eq!(
            parts.iter().map(|p| p.burst).collect::<Vec<_>>(),
            [60, 30, 10]
        );
        // Even demand above the limit: equal shares.
        let parts = split(
            10,
            10,
            &[claim("a", 20.0), claim("b", 20.0), claim("c", 20.0)],
        );
        assert_eq!(parts.iter().map(|p| p.rate_milli).sum::<u64>(), 10_000);
        assert!(rates(&parts).iter().all(|r| (3_333..=3_334).contains(r)));
        // One proxy alone: the whole limit.
        assert_eq!(
            rates(&split(1_000, 50, &[claim("a", 5_000.0)])),
            [1_000_000]
        );
        assert_eq!(split(1_000, 50, &[claim("a", 5_000.0)])[0].burst, 50);
        assert!(split(5, 5, &[]).is_empty());
    }

    #[test]
    fn unused_capacity_is_headroom_split_equally() {
        // Asking 10 of 100 between them: each gets what it asks (b: its floor, 5) plus half
        // of what is left.
        let parts = split(100, 100, &[claim("a", 6.0), claim("b", 4.0)]);
        assert_eq!(parts.iter().map(|p| p.rate_milli).sum::<u64>(), 100_000);
        assert_eq!(rates(&parts), [50_500, 49_500]);
    }

    #[test]
    fn an_idle_proxy_keeps_a_floor_and_nobody_gets_zero() {
        // An idle proxy (no demand in its last report) holds a thousandth of an equal share
        // and a burst of 1: its next client is admitted at once, and it holds back little.
        let parts = split(100, 100, &[claim("busy", 500.0), claim("idle", 0.0)]);
        assert_eq!(rates(&parts), [99_950, 50]);
        assert_eq!(parts[1].burst, 1);
        // With demand, the floor is a tenth of an equal share.
        let parts = split(100, 100, &[claim("busy", 500.0), claim("small", 0.001)]);
        assert_eq!(rates(&parts), [95_000, 5_000]);
        // More proxies than requests per second: still a non-zero rate and a burst of 1.
        let many: Vec<Claim> = (0..7).map(|i| claim(&format!("p{i}"), 1.0)).collect();
        let parts = split(1, 1, &many);
        assert!(parts.iter().all(|p| p.rate_milli >= 1 && p.burst == 1));
        assert_eq!(parts.iter().map(|p| p.rate_milli).sum::<u64>(), 1_000);
    }

    #[test]
    fn hostile_demands_neither_overflow_nor_break_the_sum() {
        for d in [f64::MAX, f64::INFINITY, f64::NAN, -5.0, 1e30] {
            let parts = split(u32::MAX, u32::MAX, &[claim("a", d), claim("b", 1.0)]);
            assert_eq!(
                parts.iter().map(|p| p.rate_milli).sum::<u64>(),
                u64::from(u32::MAX) * 1_000,
                "{d}"
            );
        }
    }

    fn row(proxy: &str, admitted: u64, refused: u64, seen_at_ms: i64) -> DemandRow {
        DemandRow {
            token_id: "tok_1".into(),
            proxy_id: proxy.into(),
            admitted,
            refused,
            interval_ms: 1_000,
            seen_at_ms,
        }
    }

    #[test]
    fn demand_is_a_rate_that_lapses_when_reports_stop() {
        assert_eq!(demand(&row("a", 30, 70, 10_000), 10_500), 100.0);
        assert_eq!(demand(&row("a", 30, 70, 10_000), 12_250), 100.0);
        assert_eq!(demand(&row("a", 30, 70, 10_000), 12_251), 0.0);
        assert!(is_live(10_000, 1_000, 13_000));
        assert!(!is_live(10_000, 1_000, 13_001));
    }

    fn report(proxy_id: &str, interval_ms: u32, tokens: Vec<TokenDemand>) -> FleetReport {
        FleetReport {
            quotas: vec![],
            proxy_id: proxy_id.into(),
            interval_ms,
            tokens,
        }
    }

    fn t(id: &str, admitted: u64, refused: u64) -> TokenDemand {
        TokenDemand {
            id: id.into(),
            admitted,
            refused,
        }
    }

    fn field(r: Result<Vec<TokenDemand>, DomainError>) -> &'static str {
        match r {
            Err(DomainError::Invalid { field, .. }) => field,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn hostile_reports_are_refused_naming_the_field() {
        assert_eq!(field(check(&report("", 1_000, vec![]))), "proxy_id");
        assert_eq!(
            field(check(&report(&"p".repeat(MAX_PROXY_ID + 1), 1_000, vec![]))),
            "proxy_id"
        );
        assert_eq!(field(check(&report("envoy\n1", 1_000, vec![]))), "proxy_id");
        assert_eq!(
            field(check(&report("envoy\u{7f}", 1_000, vec![]))),
            "proxy_id"
        );
        assert_eq!(field(check(&report("p", 0, vec![]))), "interval_ms");
        assert_eq!(field(check(&report("p", 600_000, vec![]))), "interval_ms");
        assert_eq!(
            field(check(&report("p", 1_000, vec![t("tok_1", u64::MAX, 1)]))),
            "tokens.admitted"
        );
        assert_eq!(
            field(check(&report(
                "p",
                1_000,
                vec![t("tok_1", 1, MAX_COUNT + 1)]
            ))),
            "tokens.refused"
        );
        assert_eq!(
            check(&report(
                "p",
                1_000,
                vec![t("tok_1", MAX_REPORTED_RPS / 2 + 1, 7); 2]
            ))
            .unwrap(),
            [t("tok_1", MAX_REPORTED_RPS, 0)],
            "a token named twice is one claim, of at most MAX_REPORTED_RPS"
        );
        assert_eq!(
            field(check(&report("p", 1_000, vec![t("", 1, 1)]))),
            "tokens.id"
        );
        // Named twice: merged.
        assert_eq!(
            check(&report(
                "p",
                1_000,
                vec![t("tok_1", 1, 2), t("tok_1", 3, 4)]
            ))
            .unwrap(),
            [t("tok_1", 4, 6)]
        );
    }

    async fn fleet_with_token(max_rps: u32) -> (Fleet, tempfile::TempDir, TokenRow) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::SqliteStore::open(&dir.path().join("t.db")).unwrap());
        let tokens = super::super::Tokens::new(store.clone(), crate::policy::Policy::default());
        let created = tokens
            .create(
                "admin",
                super::super::tokens::NewToken {
                    name: "shared".into(),
                    kind: tokengate_wire::Kind::User,
                    owner: None,
                    max_rps: Some(max_rps),
                    burst: None,
                    limit_scope: LimitScope::Fleet,
                    expiry: super::super::tokens::Expiry {
                        at: None,
                        field: "expires_at",
                    },
                    scopes: None,
                    quota: None,
                },
                1,
            )
            .await
            .unwrap();
        (Fleet::new(store), dir, created.token)
    }

    fn rate_of(a: &FleetAnswer) -> u64 {
        a.shares.iter().map(|s| s.rate_milli).sum()
    }

    #[tokio::test]
    async fn reports_get_shares_by_demand_with_their_own_demand_fresh() {
        let (fleet, _dir, token) = fleet_with_token(100).await;
        let now = 1_800_000_000_000;
        let busy = report("busy", 1_000, vec![t(&token.id, 100, 60)]);
        let small = report("small", 1_000, vec![t(&token.id, 20, 0)]);
        // Alone, the busy proxy gets the whole limit, for the token's secret.
        let a = fleet.report(&busy, now).await.unwrap();
        assert_eq!((a.proxies, a.ttl_ms, rate_of(&a)), (1, 3_000, 100_000));
        assert_eq!(a.shares[0].hash, token.hash);
        // The small one reports within the snapshot's age: its own demand counts at once,
        // the busy one's as last read.
        let b = fleet.report(&small, now + 100).await.unwrap();
        assert_eq!((b.proxies, rate_of(&b)), (2, 20_000));
        // Past the snapshot's age the busy one sees the small one and gets the rest.
        let a = fleet.report(&busy, now + 1_000).await.unwrap();
        assert_eq!((a.proxies, rate_of(&a)), (2, 80_000));
        // A heartbeat keeps a recent token's share, with the demand it last reported.
        let a = fleet
            .report(&report("busy", 1_000, vec![]), now + 1_400)
            .await
            .unwrap();
        assert_eq!(rate_of(&a), 80_000);
        // A proxy scope token gets no share.
        let view = fleet.view(&token, now + 1_400).await.unwrap().unwrap();
        assert_eq!((view.proxies_live, view.proxies_seen), (2, 2));
        let mut per_proxy = token.clone();
        per_proxy.limit_scope = LimitScope::Proxy;
        assert!(fleet.view(&per_proxy, now).await.unwrap().is_none());
        // The small proxy stops reporting: after three intervals it is gone, and the busy
        // one gets the whole limit again.
        let a = fleet.report(&busy, now + 4_200).await.unwrap();
        assert_eq!((a.proxies, rate_of(&a)), (1, 100_000));
    }
}
