//! The sync client: one root context per Envoy holds a lease in shared data and long-polls
//! the control plane; what it learns it writes into shared data for every worker to read.
//!
//! An explicit state machine driven by the root context's tick and the callout's response:
//! `Idle` → (tick, lease held) → `Polling` → (answer) → `Polling` again at once, or
//! (failure) → `Backoff` → (tick after the delay) → `Idle`.

use crate::callout::{self, Backoff, Callout};
use crate::config::Config;
use crate::record::{
    self, Lease, ScopeStamp, State, GENERATION_KEY, LEASE_KEY, SCOPES_KEY, STATE_KEY,
};
use crate::store::{compare_and_swap, CasError, SharedStore, Step, StoreError};
use tokengate_wire::{SyncRecord, SyncResponse, SyncStatus};

/// Where the sync client is, as its callout machine says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Idle,
    Polling { since_ms: u64 },
    Backoff { until_ms: u64 },
}

/// A full snapshot whose pages are still arriving.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SnapshotProgress {
    cursor: String,
    generation: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncFailure {
    /// The callout could not be sent or got no answer.
    Unreachable,
    /// The control plane answered with this status.
    Status(u32),
    /// The body was not a sync response.
    Malformed,
    /// Shared data refused a write.
    Store,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub changes: usize,
    /// Set once a snapshot is complete or changes were applied.
    pub state: Option<State>,
}

#[derive(Debug)]
pub struct SyncClient {
    poll: Callout,
    snapshot: Option<SnapshotProgress>,
    /// This root context's lease identity.
    holder: u64,
    leader: bool,
    /// The proxies the control plane last counted (0: not heard yet), for the state.
    proxies: u32,
}

/// Attempts to take or renew the sync lease; true while this holder leads.
pub fn hold_lease<S: SharedStore + ?Sized>(
    store: &S,
    holder: u64,
    now_ms: u64,
    ttl_ms: u32,
) -> bool {
    let lease = Lease {
        holder,
        expires_ms: now_ms.saturating_add(u64::from(ttl_ms)),
    };
    // One attempt: whoever lost the race is not the leader this tick.
    compare_and_swap(store, LEASE_KEY, 1, |current| {
        match current.and_then(record::decode_lease) {
            Some(l) if l.holder != holder && l.expires_ms > now_ms => Step::Keep(false),
            _ => Step::Write(record::encode_lease(lease), true),
        }
    })
    .unwrap_or(false)
}

pub fn read_state<S: SharedStore + ?Sized>(store: &S) -> Result<Option<State>, StoreError> {
    let (value, _) = store.get(STATE_KEY)?;
    Ok(value
        .as_ref()
        .and_then(|v| record::decode_state(v.as_ref())))
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn push_param(path: &mut String, name: &str, value: &str) {
    path.push(if path.contains('?') { '&' } else { '?' });
    path.push_str(name);
    path.push('=');
    for b in value.bytes() {
        if is_unreserved(b) {
            path.push(b as char);
        } else {
            path.push_str(&format!("%{b:02X}"));
        }
    }
}

impl SyncClient {
    pub fn new(holder: u64) -> SyncClient {
        SyncClient {
            poll: Callout::new(),
            snapshot: None,
            holder,
            leader: false,
            proxies: 0,
        }
    }

    /// The proxies the control plane counted in its last fleet answer.
    pub fn set_proxies(&mut self, proxies: u32) {
        self.proxies = proxies;
    }

    pub fn phase(&self) -> Phase {
        match self.poll.phase() {
            callout::Phase::Idle => Phase::Idle,
            callout::Phase::InFlight { since_ms, .. } => Phase::Polling { since_ms },
            callout::Phase::Backoff { until_ms } => Phase::Backoff { until_ms },
        }
    }

    pub fn failures(&self) -> u32 {
        self.poll.failures()
    }

    /// Whether this root context held the lease at its last tick.
    pub fn is_leader(&self) -> bool {
        self.leader
    }

    /// The host accepted the poll that began and named it `call`.
    pub fn sent(&mut self, call: u64) {
        self.poll.sent(call);
    }

    /// Whether an answer to `call` answers the poll in flight (not one abandoned earlier).
    pub fn is_current(&self, call: u64) -> bool {
        self.poll.is_current(call)
    }

    fn backoff(&self, cfg: &Config) -> Backoff {
        Backoff {
            initial_ms: u64::from(cfg.backoff_initial_ms),
            max_ms: u64::from(cfg.backoff_max_ms),
            // Spread a fleet's retries after a control-plane outage.
            spread: Some(self.holder),
        }
    }

    /// Called on every tick. Returns the path to poll when a poll should start now.
    pub fn on_tick<S: SharedStore + ?Sized>(
        &mut self,
        cfg: &Config,
        store: &S,
        proxy_id: &str,
        now_ms: u64,
    ) -> Option<String> {
        let leader = hold_lease(store, self.holder, now_ms, cfg.lease_ms);
        self.leader = leader;
        // The host always answers a callout (at worst with its timeout); this only guards
        // against a lost callback leaving the leader silent for ever.
        let limit = u64::from(cfg.sync_wait_seconds) * 1_000 + 30_000;
        if self.poll.overdue(now_ms, limit) {
            self.fail(cfg, now_ms);
            return None;
        }
        if !self.poll.ready(now_ms) || !leader {
            return None;
        }
        self.start(cfg, store, proxy_id, now_ms)
    }

    fn start<S: SharedStore + ?Sized>(
        &mut self,
        cfg: &Config,
        store: &S,
        proxy_id: &str,
        now_ms: u64,
    ) -> Option<String> {
        let Ok(state) = read_state(store) else {
            self.fail(cfg, now_ms);
            return None;
        };
        let mut path = cfg.sync_path.clone();
        match (&self.snapshot, &state) {
            (Some(progress), _) => {
                push_param(&mut path, "since", "0");
                push_param(&mut path, "cursor", &progress.cursor);
            }
            (None, Some(s)) => {
                push_param(&mut path, "since", &s.version.to_string());
                push_param(&mut path, "store_id", &s.store_id);
            }
            (None, None) => push_param(&mut path, "since", "0"),
        }
        push_param(&mut path, "wait", &cfg.sync_wait_seconds.to_string());
        if !proxy_id.is_empty() {
            push_param(&mut path, "proxy_id", proxy_id);
        }
        self.poll.begin(now_ms);
        Some(path)
    }

    /// The callout could not be dispatched.
    pub fn on_dispatch_failed(&mut self, cfg: &Config, now_ms: u64) {
        self.fail(cfg, now_ms);
    }

    fn fail(&mut self, cfg: &Config, now_ms: u64) {
        let backoff = self.backoff(cfg);
        self.poll.fail(&backoff, now_ms);
        // A snapshot cut short restarts from the first page: the cursor may have aged out.
        self.snapshot = None;
    }

    /// The callout answered (`status` is `None` when it failed without an HTTP answer).
    /// Returns what was applied, and the path of the next poll when it should start at once.
    pub fn on_response<S: SharedStore + ?Sized>(
        &mut self,
        cfg: &Config,
        store: &S,
        proxy_id: &str,
        now_ms: u64,
        status: Option<u32>,
        body: Option<&[u8]>,
    ) -> (Result<Applied, SyncFailure>, Option<String>) {
        let mut advanced = false;
        let result = match status {
            None => Err(SyncFailure::Unreachable),
            Some(200) => match body.map(serde_json::from_slice::<SyncResponse>) {
                Some(Ok(resp)) => {
                    let before = read_state(store).ok().flatten();
                    advanced = resp.snapshot
                        || before.is_none_or(|b| {
                            b.store_id != resp.store_id || resp.version > b.version
                        });
                    self.apply(store, &resp)
                }
                _ => Err(SyncFailure::Malformed),
            },
            Some(code) => Err(SyncFailure::Status(code)),
        };
        // A control plane should hold a poll that has nothing new; one that answers at once
        // with nothing new (broken, or replaying an old version) would otherwise be polled
        // in a tight loop. Such answers are paced, without counting as failures.
        let answered_early = self.poll.in_flight_since().is_some_and(|since_ms| {
            now_ms.saturating_sub(since_ms) < u64::from(cfg.sync_wait_seconds) * 500
        });
        match result {
            Ok(applied) if !advanced && answered_early => {
                self.poll
                    .pause_until(now_ms.saturating_add(u64::from(cfg.backoff_initial_ms)));
                (Ok(applied), None)
            }
            Ok(applied) => {
                self.poll.succeed();
                let next = if hold_lease(store, self.holder, now_ms, cfg.lease_ms) {
                    self.start(cfg, store, proxy_id, now_ms)
                } else {
                    None
                };
                (Ok(applied), next)
            }
            Err(e) => {
                self.fail(cfg, now_ms);
                (Err(e), None)
            }
        }
    }

    fn apply<S: SharedStore + ?Sized>(
        &mut self,
        store: &S,
        resp: &SyncResponse,
    ) -> Result<Applied, SyncFailure> {
        // Checked before anything is written, so that a refused answer changes nothing.
        if !resp.changes.iter().all(|r| is_hash(&r.hash)) {
            return Err(SyncFailure::Malformed);
        }
        let current = read_state(store).map_err(|_| SyncFailure::Store)?;
        let generation = if resp.snapshot {
            match &self.snapshot {
                Some(p) => p.generation,
                None => take_generation(store, current.as_ref())?,
            }
        } else {
            match &current {
                Some(c) if c.store_id == resp.store_id => c.generation,
                // Changes can only build on a loaded snapshot of the same store.
                _ => return Err(SyncFailure::Malformed),
            }
        };
        // The scope set first: a worker that reads a token naming a new scope finds it.
        let scopes_version = match (&resp.scopes, resp.snapshot) {
            (Some(scopes), _) => {
                let version = resp.scopes_version.unwrap_or(0);
                let stamp = ScopeStamp {
                    generation,
                    version,
                };
                write_scopes(store, stamp, scopes)?;
                version
            }
            // A snapshot replaces everything: one without scopes (a control plane from
            // before them) leaves none.
            (None, true) => {
                let stamp = ScopeStamp {
                    generation,
                    version: 0,
                };
                write_scopes(store, stamp, &[])?;
                0
            }
            (None, false) => current.as_ref().map_or(0, |c| c.scopes_version),
        };
        for rec in &resp.changes {
            write_record(store, rec, generation)?;
        }
        if resp.snapshot {
            if let Some(cursor) = &resp.next_cursor {
                self.snapshot = Some(SnapshotProgress {
                    cursor: cursor.clone(),
                    generation,
                });
                return Ok(Applied {
                    changes: resp.changes.len(),
                    state: None,
                });
            }
        }
        self.snapshot = None;
        if let Some(p) = resp.proxies.filter(|p| *p > 0) {
            self.proxies = p;
        }
        let state = State {
            version: resp.version,
            generation,
            proxies: self.proxies,
            store_id: resp.store_id.clone(),
            token_count: resp.token_count,
            scopes_version,
        };
        let state = commit_state(store, state, resp.snapshot)?;
        Ok(Applied {
            changes: resp.changes.len(),
            state: Some(state),
        })
    }
}

fn is_hash(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

const WRITE_RETRIES: u32 = 16;

/// A shared-data write that failed, whether a host error or out of retries.
fn store_failure(_: CasError) -> SyncFailure {
    SyncFailure::Store
}

/// A generation for a snapshot that starts now, never one an earlier start took: the records
/// of a snapshot cut short carry its generation, and had the next snapshot the same one they
/// would pass for part of it even when it no longer lists them (a revoked, purged token would
/// come back). Kept in shared data so that a new leader does not reuse one either.
fn take_generation<S: SharedStore + ?Sized>(
    store: &S,
    current: Option<&State>,
) -> Result<u32, SyncFailure> {
    let loaded = current.map_or(0, |c| c.generation);
    compare_and_swap(store, GENERATION_KEY, WRITE_RETRIES, |value| {
        let taken = value
            .and_then(|v| v.try_into().ok())
            .map_or(0, u32::from_le_bytes);
        let generation = taken.max(loaded).wrapping_add(1).max(1);
        Step::Write(generation.to_le_bytes(), generation)
    })
    .map_err(store_failure)
}

/// Writes one record unless a newer one of the same generation is already there (a slower,
/// older answer must not undo a newer change). A record's generation never goes down: the
/// late page of a snapshot that another leader's newer snapshot superseded must not make a
/// record of the newer one look stale.
fn write_record<S: SharedStore + ?Sized>(
    store: &S,
    rec: &SyncRecord,
    generation: u32,
) -> Result<(), SyncFailure> {
    if !is_hash(&rec.hash) {
        return Err(SyncFailure::Malformed);
    }
    let key = record::token_key(&rec.hash);
    let written = compare_and_swap(store, &key, WRITE_RETRIES, |existing| {
        match existing.and_then(record::decode_token) {
            Some(old) if old.generation >= generation && old.version > rec.version => {
                Step::Keep(false)
            }
            old => {
                let generation = old.map_or(generation, |o| o.generation.max(generation));
                Step::Write(record::encode_token(rec, generation), true)
            }
        }
    })
    .map_err(store_failure)?;
    // Create the rate state now so that requests always update it with compare-and-swap.
    let metered = rec.max_rps.is_some() || rec.quota.is_some();
    if written && metered && rec.status != SyncStatus::Revoked {
        let rate_key = record::rate_key(&rec.hash);
        let (existing, _) = store.get(&rate_key).map_err(|_| SyncFailure::Store)?;
        if existing.is_none() {
            store
                .set(&rate_key, &crate::gcra::encode_tat(0), 0)
                .map_err(|_| SyncFailure::Store)?;
        }
    }
    Ok(())
}

/// Writes the scope set unless a later one is already there (a slower, older answer, or the
/// late page of a superseded snapshot, must not undo it).
fn write_scopes<S: SharedStore + ?Sized>(
    store: &S,
    stamp: ScopeStamp,
    scopes: &[tokengate_wire::SyncScope],
) -> Result<(), SyncFailure> {
    compare_and_swap(store, SCOPES_KEY, WRITE_RETRIES, |existing| match existing
        .and_then(record::scopes_stamp)
    {
        Some(held) if held >= stamp => Step::Keep(()),
        _ => Step::Write(record::encode_scopes(stamp, scopes), ()),
    })
    .map_err(store_failure)
}

/// Publishes the state, never moving the version backwards within a generation. Returns
/// the state in force afterwards (the one already there when it is newer).
fn commit_state<S: SharedStore + ?Sized>(
    store: &S,
    state: State,
    snapshot: bool,
) -> Result<State, SyncFailure> {
    compare_and_swap(store, STATE_KEY, WRITE_RETRIES, |existing| {
        let mut state = state.clone();
        if let Some(old) = existing.and_then(record::decode_state) {
            let newer_already = old.generation > state.generation
                || (old.generation == state.generation
                    && old.version >= state.version
                    && !snapshot);
            if newer_already {
                return Step::Keep(old);
            }
            // A leader that has not heard a count yet keeps the one on record.
            if state.proxies == 0 {
                state.proxies = old.proxies;
            }
        }
        Step::Write(record::encode_state(&state), state)
    })
    .map_err(store_failure)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authorize::{authorize, hash_hex, Denial, Outcome};
    use crate::store::fake::MemStore;
    use tokengate_wire::{token, Kind};

    const NOW_NS: u64 = 1_800_000_000 * 1_000_000_000;

    fn cfg() -> Config {
        Config::parse(br#"{"control_plane_cluster":"cp","sync_token":"x","sync_wait_seconds":5}"#)
            .unwrap()
    }

    fn secret(c: char) -> String {
        token::compose(&c.to_string().repeat(32)).unwrap()
    }

    fn rec(secret: &str, version: u64, status: SyncStatus) -> SyncRecord {
        SyncRecord {
            scopes: None,
            quota: None,
            hash: hash_hex(secret.as_bytes()),
            id: format!("tok_{version}"),
            name: "n".into(),
            owner: "o".into(),
            kind: Kind::User,
            status,
            max_rps: None,
            burst: None,
            limit_scope: Default::default(),
            expires_at: None,
            version,
        }
    }

    fn resp(
        version: u64,
        snapshot: bool,
        changes: Vec<SyncRecord>,
        cursor: Option<&str>,
    ) -> Vec<u8> {
        serde_json::to_vec(&SyncResponse {
            scopes: None,
            scopes_version: None,
            store_id: "store-a".into(),
            version,
            snapshot,
            changes,
            next_cursor: cursor.map(str::to_string),
            token_count: 1,
            proxies: None,
        })
        .unwrap()
    }

    fn allows(store: &MemStore, secret: &str) -> Outcome {
        authorize(&cfg(), store, Some(secret.as_bytes()), NOW_NS)
    }

    #[test]
    fn only_one_holder_leads_until_the_lease_lapses() {
        let s = MemStore::default();
        assert!(hold_lease(&s, 1, 1_000, 2_000));
        assert!(!hold_lease(&s, 2, 1_500, 2_000));
        assert!(hold_lease(&s, 1, 2_500, 2_000), "renewal");
        assert!(!hold_lease(&s, 2, 4_000, 2_000));
        assert!(hold_lease(&s, 2, 4_501, 2_000), "takeover after expiry");
        assert!(!hold_lease(&s, 1, 4_600, 2_000));
    }

    #[test]
    fn first_tick_of_the_leader_polls_for_a_snapshot_followers_wait() {
        let c = cfg();
        let s = MemStore::default();
        let mut leader = SyncClient::new(1);
        let mut follower = SyncClient::new(2);
        assert_eq!(
            leader.on_tick(&c, &s, "node-1", 1_000).as_deref(),
            Some("/v1/sync?since=0&wait=5&proxy_id=node-1")
        );
        assert_eq!(leader.phase(), Phase::Polling { since_ms: 1_000 });
        assert_eq!(follower.on_tick(&c, &s, "node-1", 1_000), None);
        assert_eq!(follower.phase(), Phase::Idle);
        // While polling, ticks only renew the lease.
        assert_eq!(leader.on_tick(&c, &s, "node-1", 1_200), None);
    }

    #[test]
    fn paged_snapshot_is_only_trusted_when_complete_then_changes_follow() {
        let c = cfg();
        let s = MemStore::default();
        let (a, b) = (secret('a'), secret('b'));
        let mut sc = SyncClient::new(1);
        sc.on_tick(&c, &s, "", 0);
        let page1 = resp(
            10,
            true,
            vec![rec(&a, 3, SyncStatus::Active)],
            Some("10:tok_3"),
        );
        let (applied, next) = sc.on_response(&c, &s, "", 10, Some(200), Some(&page1));
        assert_eq!(
            applied.unwrap(),
            Applied {
                changes: 1,
                state: None
            }
        );
        assert_eq!(
            next.as_deref(),
            Some("/v1/sync?since=0&cursor=10%3Atok_3&wait=5")
        );
        assert_eq!(
            allows(&s, &a),
            Outcome::Deny(Denial::StateUnavailable),
            "snapshot incomplete"
        );

        let page2 = resp(10, true, vec![rec(&b, 10, SyncStatus::Suspended)], None);
        let (applied, next) = sc.on_response(&c, &s, "", 20, Some(200), Some(&page2));
        assert_eq!(applied.unwrap().state.unwrap().version, 10);
        assert_eq!(
            next.as_deref(),
            Some("/v1/sync?since=10&store_id=store-a&wait=5")
        );
        assert!(allows(&s, &a) == Outcome::Allow);
        assert_eq!(allows(&s, &b), Outcome::Deny(Denial::TokenSuspended));

        let change = resp(11, false, vec![rec(&a, 11, SyncStatus::Revoked)], None);
        let (applied, next) = sc.on_response(&c, &s, "", 30, Some(200), Some(&change));
        assert_eq!(applied.unwrap().state.unwrap().version, 11);
        assert_eq!(
            next.as_deref(),
            Some("/v1/sync?since=11&store_id=store-a&wait=5")
        );
        assert_eq!(allows(&s, &a), Outcome::Deny(Denial::InvalidToken));
    }

    #[test]
    fn a_new_snapshot_drops_records_it_does_not_mention() {
        let c = cfg();
        let s = MemStore::default();
        let (a, b) = (secret('a'), secret('b'));
        let mut sc = SyncClient::new(1);
        sc.on_tick(&c, &s, "", 0);
        let first = resp(
            2,
            true,
            vec![
                rec(&a, 1, SyncStatus::Active),
                rec(&b, 2, SyncStatus::Active),
            ],
            None,
        );
        sc.on_response(&c, &s, "", 0, Some(200), Some(&first))
            .0
            .unwrap();
        assert!(allows(&s, &b) == Outcome::Allow);
        // The control plane's database was replaced: it answers with a snapshot without `b`.
        let again = resp(1, true, vec![rec(&a, 1, SyncStatus::Active)], None);
        sc.on_response(&c, &s, "", 0, Some(200), Some(&again))
            .0
            .unwrap();
        assert!(allows(&s, &a) == Outcome::Allow);
        assert_eq!(allows(&s, &b), Outcome::Deny(Denial::InvalidToken));
    }

    #[test]
    fn older_answers_never_undo_newer_changes() {
        let c = cfg();
        let s = MemStore::default();
        let a = secret('a');
        let mut sc = SyncClient::new(1);
        sc.on_tick(&c, &s, "", 0);
        let snap = resp(5, true, vec![rec(&a, 5, SyncStatus::Suspended)], None);
        sc.on_response(&c, &s, "", 0, Some(200), Some(&snap))
            .0
            .unwrap();
        let stale = resp(4, false, vec![rec(&a, 4, SyncStatus::Active)], None);
        sc.on_response(&c, &s, "", 0, Some(200), Some(&stale))
            .0
            .unwrap();
        assert_eq!(allows(&s, &a), Outcome::Deny(Denial::TokenSuspended));
        assert_eq!(read_state(&s).unwrap().unwrap().version, 5);
    }

    #[test]
    fn failures_back_off_exponentially_and_keep_the_last_state() {
        let c = cfg();
        let s = MemStore::default();
        let a = secret('a');
        let mut sc = SyncClient::new(7);
        sc.on_tick(&c, &s, "", 0);
        let snap = resp(1, true, vec![rec(&a, 1, SyncStatus::Active)], None);
        sc.on_response(&c, &s, "", 0, Some(200), Some(&snap))
            .0
            .unwrap();

        let mut delays = vec![];
        let mut now = 1_000;
        for status in [
            None,
            Some(503),
            Some(200),
            Some(401),
            None,
            None,
            None,
            None,
            None,
            None,
        ] {
            let body: &[u8] = b"not json";
            let (r, next) = sc.on_response(&c, &s, "", now, status, Some(body));
            assert!(r.is_err());
            assert_eq!(next, None);
            let Phase::Backoff { until_ms } = sc.phase() else {
                panic!("expected backoff")
            };
            delays.push(until_ms - now);
            // Before the delay: nothing; after it: a new poll.
            assert_eq!(sc.on_tick(&c, &s, "", until_ms - 1), None);
            assert!(sc.on_tick(&c, &s, "", until_ms).is_some());
            now = until_ms;
        }
        assert!(delays[0] >= 200 && delays[0] <= 300, "{delays:?}");
        assert!(delays[1] > delays[0] && delays[2] > delays[1], "{delays:?}");
        assert!(
            delays.iter().all(|d| *d <= 10_000 + 10_000 / 8),
            "{delays:?}"
        );
        assert!(*delays.last().unwrap() >= 8_000, "{delays:?}");
        assert_eq!(sc.failures(), 10);
        assert!(
            allows(&s, &a) == Outcome::Allow,
            "last known state still serves"
        );

        // "No change" after the control plane held the poll for its wait.
        let ok = resp(1, false, vec![], None);
        let (r, next) = sc.on_response(&c, &s, "", now + 5_000, Some(200), Some(&ok));
        assert!(r.is_ok() && next.is_some());
        assert_eq!(sc.failures(), 0);
    }

    #[test]
    fn changes_without_a_loaded_snapshot_are_refused() {
        let c = cfg();
        let s = MemStore::default();
        let mut sc = SyncClient::new(1);
        sc.on_tick(&c, &s, "", 0);
        let body = resp(3, false, vec![], None);
        let (r, _) = sc.on_response(&c, &s, "", 0, Some(200), Some(&body));
        assert_eq!(r, Err(SyncFailure::Malformed));
    }

    #[test]
    fn bad_hashes_are_refused_and_limited_tokens_get_rate_state() {
        let c = cfg();
        let s = MemStore::default();
        let mut sc = SyncClient::new(1);
        sc.on_tick(&c, &s, "", 0);
        let mut bad = rec("x", 1, SyncStatus::Active);
        bad.hash = "../etc".into();
        let body = resp(1, true, vec![bad], None);
        assert_eq!(
            sc.on_response(&c, &s, "", 0, Some(200), Some(&body)).0,
            Err(SyncFailure::Malformed)
        );

        let a = secret('a');
        let mut limited = rec(&a, 1, SyncStatus::Active);
        limited.max_rps = Some(5);
        sc.on_tick(&c, &s, "", 100_000);
        let body = resp(1, true, vec![limited.clone()], None);
        sc.on_response(&c, &s, "", 100_000, Some(200), Some(&body))
            .0
            .unwrap();
        assert!(s
            .map
            .borrow()
            .contains_key(record::rate_key(&limited.hash).as_str()));
        // A quota without a rate limit is counted in the rate state too.
        let q = secret('q');
        let mut quota = rec(&q, 2, SyncStatus::Active);
        quota.quota = Some(tokengate_wire::Quota {
            limit: 5,
            period: tokengate_wire::Period::Day,
        });
        sc.on_tick(&c, &s, "", 200_000);
        let body = resp(2, false, vec![quota.clone()], None);
        sc.on_response(&c, &s, "", 200_000, Some(200), Some(&body))
            .0
            .unwrap();
        assert!(s
            .map
            .borrow()
            .contains_key(record::rate_key(&quota.hash).as_str()));
    }

    #[test]
    fn answers_with_nothing_new_that_come_at_once_are_paced() {
        let c = cfg();
        let s = MemStore::default();
        let a = secret('a');
        let mut sc = SyncClient::new(1);
        sc.on_tick(&c, &s, "", 0);
        let snapshot = resp(5, true, vec![rec(&a, 5, SyncStatus::Active)], None);
        let (_, next) = sc.on_response(&c, &s, "", 10, Some(200), Some(&snapshot));
        assert!(next.is_some(), "a snapshot is followed by a poll at once");

        // A replay of an old version, answered at once: applied (it changes nothing), but
        // the next poll waits for the pacing delay.
        let stale = resp(1, false, vec![rec(&a, 1, SyncStatus::Suspended)], None);
        let (applied, next) = sc.on_response(&c, &s, "", 20, Some(200), Some(&stale));
        assert_eq!(
            applied.unwrap().state.map(|st| st.version),
            Some(5),
            "in force: 5"
        );
        assert_eq!(next, None);
        assert_eq!(sc.failures(), 0, "pacing is not a failure");
        assert_eq!(sc.on_tick(&c, &s, "", 20 + 100), None, "still paced");
        assert!(sc
            .on_tick(&c, &s, "", 20 + u64::from(c.backoff_initial_ms))
            .is_some());
        assert!(
            allows(&s, &a) == Outcome::Allow,
            "the replay changed nothing"
        );

        // "No change" after the control plane held the poll: the next poll goes at once.
        let held = resp(5, false, vec![], None);
        let (_, next) = sc.on_response(&c, &s, "", 20_000, Some(200), Some(&held));
        assert!(next.is_some());
        // Something new, however fast it came: at once too.
        let fresh = resp(6, false, vec![rec(&a, 6, SyncStatus::Suspended)], None);
        let (_, next) = sc.on_response(&c, &s, "", 20_001, Some(200), Some(&fresh));
        assert!(next.is_some());
        assert_eq!(allows(&s, &a), Outcome::Deny(Denial::TokenSuspended));
    }

    #[test]
    fn an_answer_with_one_bad_hash_is_refused_whole() {
        // Found by the property tests: the records before the bad one used to be written.
        let c = cfg();
        let s = MemStore::default();
        let a = secret('a');
        let mut sc = SyncClient::new(1);
        sc.on_tick(&c, &s, "", 0);
        let snap = resp(5, true, vec![rec(&a, 5, SyncStatus::Suspended)], None);
        sc.on_response(&c, &s, "", 0, Some(200), Some(&snap))
            .0
            .unwrap();
        let before = s.map.borrow().clone();
        let mut bad = rec(&a, 7, SyncStatus::Active);
        bad.hash = bad.hash.to_uppercase();
        let body = resp(7, false, vec![rec(&a, 6, SyncStatus::Active), bad], None);
        let (r, _) = sc.on_response(&c, &s, "", 0, Some(200), Some(&body));
        assert_eq!(r, Err(SyncFailure::Malformed));
        assert!(*s.map.borrow() == before);
        assert_eq!(allows(&s, &a), Outcome::Deny(Denial::TokenSuspended));
    }

    #[test]
    fn records_of_a_snapshot_cut_short_are_not_part_of_the_next() {
        // Found by the property tests: both snapshots took generation 1, so `a`, written by
        // the first and absent from the second, stayed valid.
        let c = cfg();
        let s = MemStore::default();
        let (a, b) = (secret('a'), secret('b'));
        let mut sc = SyncClient::new(1);
        sc.on_tick(&c, &s, "", 0);
        let page1 = resp(3, true, vec![rec(&a, 1, SyncStatus::Active)], Some("c1"));
        sc.on_response(&c, &s, "", 0, Some(200), Some(&page1))
            .0
            .unwrap();
        assert!(sc.on_response(&c, &s, "", 0, Some(503), None).0.is_err());
        let again = resp(4, true, vec![rec(&b, 4, SyncStatus::Active)], None);
        sc.on_response(&c, &s, "", 0, Some(200), Some(&again))
            .0
            .unwrap();
        assert!(allows(&s, &b) == Outcome::Allow);
        assert_eq!(allows(&s, &a), Outcome::Deny(Denial::InvalidToken));
        // A new leader, which never saw the first attempt, does not reuse its generation.
        let mut other = SyncClient::new(2);
        let page1 = resp(5, true, vec![rec(&a, 5, SyncStatus::Active)], Some("c1"));
        other
            .on_response(&c, &s, "", 0, Some(200), Some(&page1))
            .0
            .unwrap();
        assert!(other.on_response(&c, &s, "", 0, None, None).0.is_err());
        let third = resp(6, true, vec![rec(&b, 4, SyncStatus::Active)], None);
        sc.on_response(&c, &s, "", 0, Some(200), Some(&third))
            .0
            .unwrap();
        assert_eq!(allows(&s, &a), Outcome::Deny(Denial::InvalidToken));
    }

    #[test]
    fn a_stuck_poll_is_abandoned() {
        let c = cfg();
        let s = MemStore::default();
        let mut sc = SyncClient::new(1);
        assert!(sc.on_tick(&c, &s, "", 0).is_some());
        assert_eq!(sc.on_tick(&c, &s, "", 34_000), None);
        assert_eq!(sc.phase(), Phase::Polling { since_ms: 0 });
        // The wait (5 s) plus 30 s, and not a millisecond sooner.
        sc.on_tick(&c, &s, "", 35_000);
        assert_eq!(sc.phase(), Phase::Polling { since_ms: 0 });
        sc.on_tick(&c, &s, "", 35_001);
        assert!(matches!(sc.phase(), Phase::Backoff { .. }));
        assert_eq!(sc.failures(), 1);
    }

    #[test]
    fn a_lease_lapses_at_its_expiry() {
        let s = MemStore::default();
        assert!(hold_lease(&s, 1, 1_000, 2_000));
        assert!(!hold_lease(&s, 2, 2_999, 2_000));
        assert!(hold_lease(&s, 2, 3_000, 2_000), "expired at 3 000");
    }

    #[test]
    fn leadership_follows_the_lease() {
        let c = cfg();
        let s = MemStore::default();
        let (mut a, mut b) = (SyncClient::new(1), SyncClient::new(2));
        assert!(!a.is_leader(), "no tick yet");
        a.on_tick(&c, &s, "", 0);
        b.on_tick(&c, &s, "", 0);
        assert!(a.is_leader());
        assert!(!b.is_leader());
        // `a` stops ticking; once its lease lapses `b` leads, and `a` learns it at its tick.
        b.on_tick(&c, &s, "", u64::from(c.lease_ms));
        assert!(b.is_leader());
        a.on_tick(&c, &s, "", u64::from(c.lease_ms) + 1);
        assert!(!a.is_leader());
    }

    #[test]
    fn a_callout_that_cannot_be_sent_backs_off() {
        let c = cfg();
        let s = MemStore::default();
        let mut sc = SyncClient::new(1);
        assert!(sc.on_tick(&c, &s, "", 1_000).is_some());
        sc.on_dispatch_failed(&c, 1_000);
        assert_eq!(sc.failures(), 1);
        let Phase::Backoff { until_ms } = sc.phase() else {
            panic!("expected backoff, got {:?}", sc.phase())
        };
        let delay = until_ms - 1_000;
        let initial = u64::from(c.backoff_initial_ms);
        assert!(
            (initial - initial / 8..=initial).contains(&delay),
            "{delay}"
        );
        assert_eq!(sc.on_tick(&c, &s, "", until_ms - 1), None);
        assert!(sc.on_tick(&c, &s, "", until_ms).is_some());
    }

    #[test]
    fn jitter_spreads_a_fleet_over_the_whole_window() {
        // After the same failures, holders wait between 7/8 of the exponential delay and
        // all of it, and between them they cover that window end to end.
        let c = cfg();
        for failures in 1..=8u32 {
            let base = (u64::from(c.backoff_initial_ms) << (failures - 1))
                .min(u64::from(c.backoff_max_ms));
            let mut delays = std::collections::BTreeSet::new();
            for holder in 0..4_096u64 {
                let mut sc = SyncClient::new(holder.wrapping_mul(0x2545_F491_4F6C_DD1D));
                for _ in 0..failures {
                    sc.on_dispatch_failed(&c, 0);
                }
                let Phase::Backoff { until_ms } = sc.phase() else {
                    panic!("expected backoff")
                };
                delays.insert(until_ms);
            }
            let (least, most) = (delays.first().copied(), delays.last().copied());
            assert_eq!(
                (least, most),
                (Some(base - base / 8), Some(base)),
                "after {failures} failures"
            );
            assert!(
                delays.len() as u64 > base / 16,
                "after {failures} failures only {} different delays",
                delays.len()
            );
        }
    }

    #[test]
    fn an_early_answer_at_the_same_version_is_paced() {
        let c = cfg();
        let s = MemStore::default();
        let a = secret('a');
        let mut sc = SyncClient::new(1);
        sc.on_tick(&c, &s, "", 0);
        let snapshot = resp(5, true, vec![rec(&a, 5, SyncStatus::Active)], None);
        let (_, next) = sc.on_response(&c, &s, "", 10, Some(200), Some(&snapshot));
        assert!(next.is_some());
        // "Nothing new" at the version held, long before half the wait: paced.
        let same = resp(5, false, vec![], None);
        let (r, next) = sc.on_response(&c, &s, "", 20, Some(200), Some(&same));
        assert!(r.is_ok());
        assert_eq!(next, None);
        assert_eq!(
            sc.phase(),
            Phase::Backoff {
                until_ms: 20 + u64::from(c.backoff_initial_ms)
            }
        );
    }

    #[test]
    fn an_answer_is_early_before_half_the_wait() {
        // The wait is 5 s: an empty answer 2 499 ms into the poll is early, 2 500 ms is not.
        let c = cfg();
        let s = MemStore::default();
        let a = secret('a');
        let mut sc = SyncClient::new(1);
        sc.on_tick(&c, &s, "", 0);
        let snapshot = resp(5, true, vec![rec(&a, 5, SyncStatus::Active)], None);
        sc.on_response(&c, &s, "", 0, Some(200), Some(&snapshot))
            .0
            .unwrap();
        let same = resp(5, false, vec![], None);
        let (_, next) = sc.on_response(&c, &s, "", 2_499, Some(200), Some(&same));
        assert_eq!(next, None, "early: paced");
        assert!(sc.on_tick(&c, &s, "", 2_499 + 250).is_some());
        let (_, next) = sc.on_response(&c, &s, "", 2_749 + 2_500, Some(200), Some(&same));
        assert!(
            next.is_some(),
            "held for half the wait: polled again at once"
        );
    }

    #[test]
    fn only_limited_live_tokens_get_rate_state() {
        let c = cfg();
        let s = MemStore::default();
        let (a, b, d) = (secret('a'), secret('b'), secret('d'));
        let mut limited = rec(&a, 1, SyncStatus::Active);
        limited.max_rps = Some(5);
        let unlimited = rec(&b, 2, SyncStatus::Active);
        let mut revoked = rec(&d, 3, SyncStatus::Revoked);
        revoked.max_rps = Some(5);
        let mut sc = SyncClient::new(1);
        sc.on_tick(&c, &s, "", 0);
        let body = resp(3, true, vec![limited, unlimited, revoked], None);
        sc.on_response(&c, &s, "", 0, Some(200), Some(&body))
            .0
            .unwrap();
        let has_rate_state = |t: &str| {
            s.map
                .borrow()
                .contains_key(&*record::rate_key(&hash_hex(t.as_bytes())))
        };
        assert!(has_rate_state(&a));
        assert!(!has_rate_state(&b), "unlimited");
        assert!(!has_rate_state(&d), "revoked");
    }

    #[test]
    fn a_late_page_of_a_superseded_snapshot_hides_nothing() {
        // Leader `a` is part-way through a paged snapshot when its lease lapses; `b` loads a
        // whole snapshot (a newer generation). `a`'s late second page lists a token of that
        // snapshot again: it must stay part of it.
        let c = cfg();
        let s = MemStore::default();
        let (x, y) = (secret('x'), secret('y'));
        let mut a = SyncClient::new(1);
        let mut b = SyncClient::new(2);
        assert!(a.on_tick(&c, &s, "", 0).is_some());
        let page1 = resp(10, true, vec![rec(&x, 3, SyncStatus::Active)], Some("c1"));
        a.on_response(&c, &s, "", 0, Some(200), Some(&page1))
            .0
            .unwrap();
        let later = u64::from(c.lease_ms) + 1;
        assert!(b.on_tick(&c, &s, "", later).is_some(), "b takes over");
        let whole = resp(
            10,
            true,
            vec![
                rec(&x, 3, SyncStatus::Active),
                rec(&y, 5, SyncStatus::Active),
            ],
            None,
        );
        b.on_response(&c, &s, "", later, Some(200), Some(&whole))
            .0
            .unwrap();
        let page2 = resp(10, true, vec![rec(&y, 5, SyncStatus::Active)], None);
        a.on_response(&c, &s, "", later + 1, Some(200), Some(&page2))
            .0
            .unwrap();
        assert!(matches!(allows(&s, &x), Outcome::Allow));
        assert!(
            matches!(allows(&s, &y), Outcome::Allow),
            "{:?}",
            allows(&s, &y)
        );
    }

    fn scoped_resp(
        version: u64,
        snapshot: bool,
        changes: Vec<SyncRecord>,
        scopes: Option<(u64, Vec<tokengate_wire::SyncScope>)>,
    ) -> Vec<u8> {
        let (scopes_version, scopes) = match scopes {
            Some((v, s)) => (Some(v), Some(s)),
            None => (None, None),
        };
        serde_json::to_vec(&SyncResponse {
            scopes,
            scopes_version,
            store_id: "store-a".into(),
            version,
            snapshot,
            changes,
            next_cursor: None,
            token_count: 1,
            proxies: None,
        })
        .unwrap()
    }

    fn one_scope(name: &str, path: &str) -> tokengate_wire::SyncScope {
        tokengate_wire::SyncScope {
            name: name.into(),
            rules: vec![tokengate_wire::Rule {
                methods: Some(vec!["GET".into()]),
                path: path.into(),
            }],
            version: 1,
        }
    }

    fn scoped_judge(
        s: &MemStore,
        cache: &crate::scopes::ScopeCache,
        secret: &str,
        path: &str,
    ) -> Outcome {
        let target = crate::authorize::Target {
            method: Some(b"GET"),
            path: Some(path.as_bytes()),
        };
        crate::authorize::judge(&cfg(), s, cache, Some(secret.as_bytes()), NOW_NS, || target)
            .outcome
    }

    fn cas_of(s: &MemStore, key: &str) -> u32 {
        s.map.borrow().get(key).map(|(_, cas)| *cas).unwrap()
    }

    #[test]
    fn the_scope_set_is_written_before_the_tokens_and_the_state() {
        let c = cfg();
        let s = MemStore::default();
        let a = secret('a');
        let mut sc = SyncClient::new(1);
        sc.on_tick(&c, &s, "", 0);
        let snap = scoped_resp(3, true, vec![], Some((2, vec![one_scope("r", "/r/**")])));
        sc.on_response(&c, &s, "", 0, Some(200), Some(&snap))
            .0
            .unwrap();
        // A scope created and a token naming it, in one answer.
        let mut t = rec(&a, 5, SyncStatus::Active);
        t.scopes = Some(vec!["new".into()]);
        let body = scoped_resp(
            5,
            false,
            vec![t.clone()],
            Some((4, vec![one_scope("r", "/r/**"), one_scope("new", "/n")])),
        );
        let (applied, _) = sc.on_response(&c, &s, "", 10_000, Some(200), Some(&body));
        assert_eq!(applied.unwrap().state.unwrap().scopes_version, 4);
        let (scopes, token, state) = (
            cas_of(&s, SCOPES_KEY),
            cas_of(&s, &record::token_key(&t.hash)),
            cas_of(&s, STATE_KEY),
        );
        assert!(scopes < token && token < state, "{scopes} {token} {state}");
        let cache = crate::scopes::ScopeCache::new();
        assert_eq!(scoped_judge(&s, &cache, &a, "/n"), Outcome::Allow);
        assert_eq!(
            scoped_judge(&s, &cache, &a, "/r/x"),
            Outcome::Deny(Denial::InsufficientScope)
        );

        // A scope edited: the next answer carries the whole set; the same cache sees it.
        let edited = scoped_resp(6, false, vec![], Some((6, vec![one_scope("new", "/m")])));
        sc.on_response(&c, &s, "", 20_000, Some(200), Some(&edited))
            .0
            .unwrap();
        assert_eq!(
            scoped_judge(&s, &cache, &a, "/n"),
            Outcome::Deny(Denial::InsufficientScope)
        );
        assert_eq!(scoped_judge(&s, &cache, &a, "/m"), Outcome::Allow);
        assert_eq!(cache.compilations(), 2);

        // Changes without scopes keep the set and its version; an older answer's set does not
        // undo the newer one.
        let plain = scoped_resp(
            7,
            false,
            vec![rec(&secret('b'), 7, SyncStatus::Active)],
            None,
        );
        let (applied, _) = sc.on_response(&c, &s, "", 30_000, Some(200), Some(&plain));
        assert_eq!(applied.unwrap().state.unwrap().scopes_version, 6);
        let stale = scoped_resp(5, false, vec![], Some((4, vec![one_scope("new", "/n")])));
        sc.on_response(&c, &s, "", 40_000, Some(200), Some(&stale))
            .0
            .unwrap();
        assert_eq!(scoped_judge(&s, &cache, &a, "/m"), Outcome::Allow);
        assert_eq!(
            read_state(&s).unwrap().unwrap().scopes_version,
            6,
            "in force: 6"
        );
    }

    #[test]
    fn a_snapshot_without_scopes_leaves_none() {
        let c = cfg();
        let s = MemStore::default();
        let a = secret('a');
        let mut t = rec(&a, 2, SyncStatus::Active);
        t.scopes = Some(vec!["r".into()]);
        let mut sc = SyncClient::new(1);
        sc.on_tick(&c, &s, "", 0);
        let snap = scoped_resp(
            3,
            true,
            vec![t.clone()],
            Some((2, vec![one_scope("r", "/**")])),
        );
        sc.on_response(&c, &s, "", 0, Some(200), Some(&snap))
            .0
            .unwrap();
        let cache = crate::scopes::ScopeCache::new();
        assert_eq!(scoped_judge(&s, &cache, &a, "/x"), Outcome::Allow);
        // Another store, from before scopes: its snapshot says nothing of them.
        let mut other = SyncClient::new(1);
        let snap = scoped_resp(1, true, vec![t], None);
        other
            .on_response(&c, &s, "", 1, Some(200), Some(&snap))
            .0
            .unwrap();
        assert_eq!(
            scoped_judge(&s, &cache, &a, "/x"),
            Outcome::Deny(Denial::InsufficientScope)
        );
    }

    #[test]
    fn a_state_of_an_older_format_is_resnapshotted() {
        // What a filter of the previous release left in Envoy's shared data (format 2: no
        // scope stamp), as after a hot upgrade of the module.
        let c = cfg();
        let s = MemStore::default();
        let mut old = vec![2u8];
        old.extend_from_slice(&9u64.to_le_bytes());
        old.extend_from_slice(&1u32.to_le_bytes());
        old.extend_from_slice(&0u32.to_le_bytes());
        old.extend_from_slice(&1u64.to_le_bytes());
        old.extend_from_slice(&7u16.to_le_bytes());
        old.extend_from_slice(b"store-a");
        s.set(STATE_KEY, &old, 0).unwrap();
        let a = secret('a');
        assert_eq!(allows(&s, &a), Outcome::Deny(Denial::StateUnavailable));
        let mut sc = SyncClient::new(1);
        assert_eq!(
            sc.on_tick(&c, &s, "", 0).as_deref(),
            Some("/v1/sync?since=0&wait=5"),
            "a snapshot, not changes since 9"
        );
        let snap = resp(9, true, vec![rec(&a, 9, SyncStatus::Active)], None);
        sc.on_response(&c, &s, "", 0, Some(200), Some(&snap))
            .0
            .unwrap();
        assert_eq!(allows(&s, &a), Outcome::Allow);
    }
}
