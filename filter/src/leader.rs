//! The sync leader's orchestration, written once for both data-plane flavors: on every tick
//! it renews the lease, starts the long-poll when one is due, gathers the workers' usage
//! counts and sends a report when one is due; on every callout answer it applies what came
//! back. The calls themselves, the clock, the store, the queue and the stats are the
//! [`Host`]'s.

use crate::config::Config;
use crate::fleet;
use crate::host::{Call, Host, Level};
use crate::metrics::{Counter, Gauge};
use crate::store::{compare_and_swap, Step};
use crate::sync::{SyncClient, SyncFailure};
use crate::usage::{self, Reporter, Tally};

/// A body this large is no sync answer (a full page of 100,000 records is ~30 MiB); copying
/// it in could exhaust the filter's memory, so it is refused unread.
pub const MAX_SYNC_BODY_BYTES: usize = 64 << 20;

pub struct Leader {
    sync: SyncClient,
    reporter: Reporter,
    /// The workers' counts gathered by the leader, waiting for the next report.
    pending: Tally,
    fleet: fleet::Reporter,
    /// The workers' fleet demand gathered since the last fleet report.
    demand: Tally,
    /// Whether the last fleet report failed (logged once per outage, not once per second).
    fleet_failing: bool,
    proxy_id: String,
    /// This candidate's lease identity.
    holder: u64,
    authorization: String,
}

/// Where an Envoy that knows no id of its own keeps the one its first leader made up, so
/// that a new leader reports as the same proxy.
pub const PROXY_ID_KEY: &str = "tokengate:proxy_id";

/// A callout's answer as the host received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// `None`: no HTTP answer (reset, timeout).
    pub status: Option<u32>,
    pub body_len: usize,
}

impl Leader {
    /// `holder` is this candidate's lease identity (random per root context); `proxy_id` is
    /// sent with polls and reports.
    pub fn new(cfg: &Config, holder: u64, proxy_id: String) -> Leader {
        Leader {
            sync: SyncClient::new(holder),
            reporter: Reporter::new(),
            pending: Tally::new(cfg.usage_max_tokens),
            fleet: fleet::Reporter::new(),
            demand: Tally::new(cfg.usage_max_tokens),
            fleet_failing: false,
            proxy_id,
            holder,
            authorization: format!("Bearer {}", cfg.sync_token),
        }
    }

    /// Whether this candidate held the lease at its last tick.
    pub fn is_leader(&self) -> bool {
        self.sync.is_leader()
    }

    /// The id sent with polls and reports (empty until one is known).
    pub fn proxy_id(&self) -> &str {
        &self.proxy_id
    }

    /// Names the proxy once the host can tell its id.
    pub fn set_proxy_id(&mut self, id: String) {
        self.proxy_id = id;
    }

    pub fn sync(&self) -> &SyncClient {
        &self.sync
    }

    pub fn on_tick<H: Host>(&mut self, cfg: &Config, host: &H) {
        let now = host.now_ms();
        if self.proxy_id.is_empty() && self.sync.is_leader() {
            self.adopt_proxy_id(host);
        }
        if let Some(path) = self.sync.on_tick(cfg, host.store(), &self.proxy_id, now) {
            self.poll(cfg, host, &path, now);
        }
        if cfg.usage_reporting && self.sync.is_leader() {
            self.report(cfg, host, now);
        }
        if self.sync.is_leader() {
            self.report_fleet(cfg, host, now);
        }
    }

    /// A callout answered. `body` reads its body when it is wanted. Returns false when the
    /// answer belongs to no call in flight (a late answer to an abandoned call).
    pub fn on_answer<H: Host>(
        &mut self,
        cfg: &Config,
        host: &H,
        call: u64,
        answer: Answer,
        body: impl FnOnce() -> Option<Vec<u8>>,
    ) -> bool {
        let now = host.now_ms();
        if self.sync.is_current(call) {
            let body = if answer.body_len > MAX_SYNC_BODY_BYTES {
                None
            } else {
                body()
            };
            let (result, next) = self.sync.on_response(
                cfg,
                host.store(),
                &self.proxy_id,
                now,
                answer.status,
                body.as_deref(),
            );
            match result {
                Ok(applied) => {
                    host.count(Counter::SyncSuccess, 1);
                    if let Some(state) = applied.state {
                        host.record(Gauge::Tokens, state.token_count);
                        host.record(Gauge::StateVersion, state.version);
                    }
                }
                Err(e) => {
                    host.count(Counter::SyncFailure, 1);
                    let why = match e {
                        SyncFailure::Unreachable => "no answer".to_string(),
                        SyncFailure::Status(code) => format!("HTTP {code}"),
                        SyncFailure::Malformed => "malformed answer".to_string(),
                        SyncFailure::Store => "shared data write failed".to_string(),
                    };
                    host.log(
                        Level::Warn,
                        &format!("sync failed ({why}); keeping the current token state, retrying with backoff"),
                    );
                }
            }
            if let Some(path) = next {
                self.poll(cfg, host, &path, now);
            }
            return true;
        }
        if self.fleet.is_current(call) {
            let ok = answer.status.is_some_and(|s| (200..300).contains(&s));
            let applied = match body().filter(|_| ok && answer.body_len <= fleet::MAX_ANSWER_BYTES)
            {
                Some(b) => fleet::apply(host.store(), &b, now).map_err(|e| format!("{e:?}")),
                None => Err(match answer.status {
                    Some(s) => format!("HTTP {s}"),
                    None => "no answer".to_string(),
                }),
            };
            match applied {
                Ok(a) => {
                    self.sync.set_proxies(a.proxies);
                    self.fleet.on_answer(cfg, &a, now);
                    if std::mem::take(&mut self.fleet_failing) {
                        host.log(
                            Level::Info,
                            "fleet report answered again; shares are current",
                        );
                    }
                }
                Err(why) => {
                    if !std::mem::replace(&mut self.fleet_failing, true) {
                        host.log(
                            Level::Warn,
                            &format!("fleet report failed ({why}); keeping the current shares until they expire, then max_rps / proxies, and each quota's last ceiling"),
                        );
                    }
                    self.fleet.on_result(cfg, false, now);
                }
            }
            return true;
        }
        if self.reporter.is_current(call) {
            let ok = answer.status.is_some_and(|s| (200..300).contains(&s));
            host.count(
                if ok {
                    Counter::UsageReports
                } else {
                    Counter::UsageFailures
                },
                1,
            );
            self.reporter.on_result(cfg, &mut self.pending, ok, now);
            return true;
        }
        false
    }

    fn poll<H: Host>(&mut self, cfg: &Config, host: &H, path: &str, now: u64) {
        let call = Call {
            cluster: &cfg.control_plane_cluster,
            method: "GET",
            path,
            authority: &cfg.control_plane_authority,
            authorization: &self.authorization,
            media_type: ("accept", "application/json"),
            body: None,
            timeout_ms: (u64::from(cfg.sync_wait_seconds) + 5) * 1_000,
        };
        match host.send(&call) {
            Ok(id) => self.sync.sent(id),
            Err(why) => {
                host.count(Counter::SyncFailure, 1);
                host.log(
                    Level::Warn,
                    &format!(
                        "cannot call cluster `{}` ({why}); retrying with backoff",
                        cfg.control_plane_cluster
                    ),
                );
                self.sync.on_dispatch_failed(cfg, now);
            }
        }
    }

    /// The control plane counts proxies by id: an Envoy without one (no node id, no
    /// `proxy_id`) gets one made up once and shared by its workers.
    fn adopt_proxy_id<H: Host>(&mut self, host: &H) {
        let made_up = format!("envoy-{:016x}", self.holder);
        let id = compare_and_swap(host.store(), PROXY_ID_KEY, 4, |v| match v {
            Some(v) if !v.is_empty() => Step::Keep(String::from_utf8_lossy(v).into_owned()),
            _ => Step::Write(made_up.as_bytes(), made_up.clone()),
        });
        if let Ok(id) = id {
            self.proxy_id = id;
        }
    }

    fn report_fleet<H: Host>(&mut self, cfg: &Config, host: &H, now: u64) {
        host.gather_fleet(&mut self.demand);
        // Nothing to divide before the first snapshot: the filter refuses every request.
        let Ok(Some(state)) = crate::sync::read_state(host.store()) else {
            return;
        };
        let Some(body) = self.fleet.on_tick(
            cfg,
            host.store(),
            &mut self.demand,
            &self.proxy_id,
            state.proxies,
            now,
        ) else {
            return;
        };
        let call = Call {
            cluster: &cfg.control_plane_cluster,
            method: "POST",
            path: &cfg.fleet_path,
            authority: &cfg.control_plane_authority,
            authorization: &self.authorization,
            media_type: ("content-type", "application/json"),
            body: Some(&body),
            timeout_ms: fleet::report_timeout_ms(cfg),
        };
        match host.send(&call) {
            Ok(id) => self.fleet.sent(id),
            Err(_) => self.fleet.on_result(cfg, false, now),
        }
    }

    fn report<H: Host>(&mut self, cfg: &Config, host: &H, now: u64) {
        host.gather_usage(&mut self.pending);
        host.count(Counter::UsageDropped, self.pending.take_dropped());
        let Some(body) = self
            .reporter
            .on_tick(cfg, &mut self.pending, &self.proxy_id, now)
        else {
            return;
        };
        let call = Call {
            cluster: &cfg.control_plane_cluster,
            method: "POST",
            path: &cfg.usage_path,
            authority: &cfg.control_plane_authority,
            authorization: &self.authorization,
            media_type: ("content-type", "application/json"),
            body: Some(&body),
            timeout_ms: usage::report_timeout_ms(cfg),
        };
        match host.send(&call) {
            Ok(id) => self.reporter.sent(id),
            Err(_) => {
                host.count(Counter::UsageFailures, 1);
                self.reporter.on_result(cfg, &mut self.pending, false, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authorize::{authorize, hash_hex, Denial, Outcome};
    use crate::host::fake::FakeHost;
    use crate::sync::Phase;
    use tokengate_wire::{
        token, Kind, SyncRecord, SyncResponse, SyncStatus, UsageEntry, UsageReport,
    };

    const NOW_MS: u64 = 1_800_000_000_000;

    fn cfg() -> Config {
        Config::parse(
            br#"{"control_plane_cluster":"cp","control_plane_authority":"cp.local","sync_token":"s3cret","sync_wait_seconds":5,"usage_report_ms":1000}"#,
        )
        .unwrap()
    }

    fn host() -> FakeHost {
        let h = FakeHost::default();
        h.now_ms.set(NOW_MS);
        h
    }

    fn secret(c: char) -> String {
        token::compose(&c.to_string().repeat(32)).unwrap()
    }

    fn snapshot(version: u64, status: SyncStatus, secret: &str) -> Vec<u8> {
        serde_json::to_vec(&SyncResponse {
            scopes: None,
            scopes_version: None,
            store_id: "store-a".into(),
            version,
            snapshot: true,
            changes: vec![SyncRecord {
                scopes: None,
                quota: None,
                hash: hash_hex(secret.as_bytes()),
                id: "tok_1".into(),
                name: "n".into(),
                owner: "o".into(),
                kind: Kind::User,
                status,
                max_rps: None,
                burst: None,
                limit_scope: Default::default(),
                expires_at: None,
                version,
            }],
            next_cursor: None,
            token_count: 1,
            proxies: None,
        })
        .unwrap()
    }

    fn ok(body: &[u8]) -> (Answer, Option<Vec<u8>>) {
        (
            Answer {
                status: Some(200),
                body_len: body.len(),
            },
            Some(body.to_vec()),
        )
    }

    fn answer(
        l: &mut Leader,
        h: &FakeHost,
        call: u64,
        (a, body): (Answer, Option<Vec<u8>>),
    ) -> bool {
        l.on_answer(&cfg(), h, call, a, || body)
    }

    #[test]
    fn the_leader_polls_with_the_sync_credential_and_applies_the_answer() {
        let (c, h) = (cfg(), host());
        let mut l = Leader::new(&c, 1, "node-1".into());
        l.on_tick(&c, &h);
        assert!(l.is_leader());
        let poll = h.last();
        assert_eq!(poll.method, "GET");
        assert_eq!(poll.path, "/v1/sync?since=0&wait=5&proxy_id=node-1");
        assert_eq!(poll.timeout_ms, 10_000);
        assert!(poll
            .headers
            .contains(&("authorization".into(), "Bearer s3cret".into())));
        assert!(poll
            .headers
            .contains(&(":authority".into(), "cp.local".into())));
        let a = secret('a');
        h.advance(3_000);
        assert!(answer(
            &mut l,
            &h,
            poll.id,
            ok(&snapshot(4, SyncStatus::Active, &a))
        ));
        assert_eq!(
            authorize(&c, &h.store, Some(a.as_bytes()), h.now_ms() * 1_000_000),
            Outcome::Allow
        );
        assert_eq!(h.counter(Counter::SyncSuccess), 1);
        assert_eq!(
            (h.gauge(Gauge::Tokens), h.gauge(Gauge::StateVersion)),
            (Some(1), Some(4))
        );
        // The next poll went at once, from the loaded version.
        let next = h.last();
        assert_eq!(
            next.path,
            "/v1/sync?since=4&store_id=store-a&wait=5&proxy_id=node-1"
        );
        assert_ne!(next.id, poll.id);
    }

    /// A snapshot of one token limited to `max_rps` (fleet scope), carrying the proxies the
    /// control plane counts.
    fn limited_snapshot(secret: &str, max_rps: u32, proxies: Option<u32>) -> Vec<u8> {
        let mut r: SyncResponse =
            serde_json::from_slice(&snapshot(4, SyncStatus::Active, secret)).unwrap();
        r.changes[0].max_rps = Some(max_rps);
        r.proxies = proxies;
        serde_json::to_vec(&r).unwrap()
    }

    fn admitted(c: &Config, h: &FakeHost, secret: &str, n: u32) -> u32 {
        (0..n)
            .filter(|_| {
                authorize(c, &h.store, Some(secret.as_bytes()), h.now_ms() * 1_000_000)
                    == Outcome::Allow
            })
            .count() as u32
    }

    #[test]
    fn the_leader_reports_fleet_demand_and_applies_its_share_until_it_expires() {
        let (c, h) = (cfg(), host());
        let mut l = Leader::new(&c, 1, "node-1".into());
        l.on_tick(&c, &h);
        let a = secret('a');
        let poll = h.last();
        // The snapshot says three proxies: before any share, a third of the limit.
        assert!(answer(
            &mut l,
            &h,
            poll.id,
            ok(&limited_snapshot(&a, 30, Some(3)))
        ));
        assert_eq!(admitted(&c, &h, &a, 100), 10);
        // The workers counted demand; the next tick reports it.
        h.fleet_queue.borrow_mut().push(vec![UsageEntry {
            id: "tok_1".into(),
            allowed: 10,
            denied: 90,
            last_used_at: 1,
        }]);
        h.advance(1_000);
        l.on_tick(&c, &h);
        let report = h.last();
        assert_eq!((report.method, report.path.as_str()), ("POST", "/v1/fleet"));
        let sent: tokengate_wire::FleetReport =
            serde_json::from_slice(report.body.as_deref().unwrap()).unwrap();
        assert_eq!(sent.proxy_id, "node-1");
        assert_eq!((sent.tokens[0].admitted, sent.tokens[0].refused), (10, 90));
        // The answer: this proxy's share is 20 of the 30, burst 20.
        let share = tokengate_wire::FleetAnswer {
            quotas: vec![],
            proxies: 3,
            ttl_ms: 3_000,
            shares: vec![tokengate_wire::Share {
                hash: hash_hex(a.as_bytes()),
                max_rps: 30,
                burst: 30,
                rate_milli: 20_000,
                share_burst: 20,
            }],
        };
        assert!(answer(
            &mut l,
            &h,
            report.id,
            ok(&serde_json::to_vec(&share).unwrap())
        ));
        assert_eq!(admitted(&c, &h, &a, 100), 20, "the share's burst");
        // The control plane goes away: the share holds until its time to live ends...
        h.advance(1_000);
        assert_eq!(admitted(&c, &h, &a, 100), 20);
        // ...then a third of the limit again, never the whole of it.
        h.advance(3_000);
        assert_eq!(admitted(&c, &h, &a, 100), 10);
    }

    /// A snapshot of one token with a quota of `limit` per 10 s and no rate limit.
    fn quota_snapshot(secret: &str, limit: u64, proxies: u32) -> Vec<u8> {
        let mut r: SyncResponse =
            serde_json::from_slice(&snapshot(4, SyncStatus::Active, secret)).unwrap();
        r.changes[0].quota = Some(tokengate_wire::Quota {
            limit,
            period: tokengate_wire::Period::Seconds(10),
        });
        r.proxies = Some(proxies);
        serde_json::to_vec(&r).unwrap()
    }

    /// What the workers hand over for `allowed` and `denied` requests of a quota secret.
    fn quota_traffic(h: &FakeHost, secret: &str, allowed: u64, denied: u64) {
        let key = crate::fleet::quota_tally_key(&hash_hex(secret.as_bytes()));
        h.fleet_queue.borrow_mut().push(vec![UsageEntry {
            id: String::from_utf8(key.to_vec()).unwrap(),
            allowed,
            denied,
            last_used_at: 1,
        }]);
    }

    fn fleet_report(h: &FakeHost) -> (u64, tokengate_wire::FleetReport) {
        let sent = h.last();
        assert_eq!(sent.path, "/v1/fleet");
        (
            sent.id,
            serde_json::from_slice(sent.body.as_deref().unwrap()).unwrap(),
        )
    }

    fn grant(secret: &str, period_start: i64, allowed: u64) -> Vec<u8> {
        serde_json::to_vec(&tokengate_wire::FleetAnswer {
            proxies: 2,
            ttl_ms: 3_000,
            shares: vec![],
            quotas: vec![tokengate_wire::QuotaGrant {
                hash: hash_hex(secret.as_bytes()),
                period_start,
                limit: 10,
                allowed,
            }],
        })
        .unwrap()
    }

    #[test]
    fn the_leader_reports_quota_state_and_applies_grants() {
        let (c, h) = (cfg(), host());
        let mut l = Leader::new(&c, 1, "node-1".into());
        l.on_tick(&c, &h);
        let a = secret('a');
        let poll = h.last();
        assert!(answer(&mut l, &h, poll.id, ok(&quota_snapshot(&a, 10, 2))));
        // 1_800_000_000 s starts a 10 s period. Two proxies: five each.
        const START: i64 = 1_800_000_000;
        assert_eq!(admitted(&c, &h, &a, 20), 5);
        quota_traffic(&h, &a, 5, 15);
        h.advance(1_000);
        l.on_tick(&c, &h);
        let (id, sent) = fleet_report(&h);
        assert!(sent.tokens.is_empty(), "the quota key is no token's demand");
        let held = |spent, allowed| tokengate_wire::QuotaHeld {
            hash: hash_hex(a.as_bytes()),
            period_start: START,
            spent,
            allowed,
        };
        assert_eq!(sent.quotas, [held(5, 5)]);
        // The control plane grants seven: two more pass.
        assert!(answer(&mut l, &h, id, ok(&grant(&a, START, 7))));
        assert_eq!(admitted(&c, &h, &a, 20), 2);
        // With no traffic since, the next report still names it: the control plane learns
        // the ceiling it granted is in force.
        h.advance(1_000);
        l.on_tick(&c, &h);
        let (id, sent) = fleet_report(&h);
        assert_eq!(sent.quotas, [held(7, 7)]);
        let nothing = serde_json::to_vec(&tokengate_wire::FleetAnswer {
            proxies: 2,
            ttl_ms: 3_000,
            shares: vec![],
            quotas: vec![],
        })
        .unwrap();
        assert!(answer(&mut l, &h, id, ok(&nothing)));
        h.advance(1_000);
        l.on_tick(&c, &h);
        assert!(
            fleet_report(&h).1.quotas.is_empty(),
            "no traffic, no grant: nothing"
        );
        // A lost answer: the next report carries the state again, as it is then.
        quota_traffic(&h, &a, 0, 3);
        let (id, _) = fleet_report(&h);
        assert!(answer(&mut l, &h, id, ok(&nothing)));
        h.advance(1_000);
        l.on_tick(&c, &h);
        let (id, sent) = fleet_report(&h);
        assert_eq!(sent.quotas, [held(7, 7)]);
        let lost = (
            Answer {
                status: None,
                body_len: 0,
            },
            None,
        );
        assert!(answer(&mut l, &h, id, lost));
        h.advance(1_000);
        l.on_tick(&c, &h);
        assert_eq!(fleet_report(&h).1.quotas, [held(7, 7)]);
        // A grant for a past period is ignored.
        let (id, _) = fleet_report(&h);
        assert!(answer(&mut l, &h, id, ok(&grant(&a, START - 10, 10))));
        assert_eq!(admitted(&c, &h, &a, 5), 0);
    }

    #[test]
    fn with_the_control_plane_away_a_proxy_stops_at_its_ceiling_and_starts_each_period_at_its_part()
    {
        let (c, h) = (cfg(), host());
        let mut l = Leader::new(&c, 1, "node-1".into());
        l.on_tick(&c, &h);
        let a = secret('a');
        let poll = h.last();
        assert!(answer(&mut l, &h, poll.id, ok(&quota_snapshot(&a, 10, 2))));
        const START: i64 = 1_800_000_000;
        assert_eq!(admitted(&c, &h, &a, 3), 3);
        quota_traffic(&h, &a, 3, 0);
        h.advance(1_000);
        l.on_tick(&c, &h);
        let (id, _) = fleet_report(&h);
        assert!(answer(&mut l, &h, id, ok(&grant(&a, START, 6))));
        // The control plane goes away: reports fail, the last ceiling holds.
        for _ in 0..5 {
            h.advance(1_000);
            quota_traffic(&h, &a, 1, 1);
            l.on_tick(&c, &h);
            if let Some(last) = h.sent.borrow().last().filter(|s| s.path == "/v1/fleet") {
                let failed = Answer {
                    status: Some(503),
                    body_len: 0,
                };
                l.on_answer(&c, &h, last.id, failed, || None);
            }
        }
        assert!(
            h.now_ms() < (START as u64 + 10) * 1_000,
            "still the first period"
        );
        assert_eq!(
            admitted(&c, &h, &a, 20),
            3,
            "up to the granted six, no more"
        );
        // The next period, still unheard: limit / proxies, five.
        h.now_ms.set((START as u64 + 10) * 1_000);
        assert_eq!(admitted(&c, &h, &a, 20), 5);
        h.now_ms.set((START as u64 + 20) * 1_000 + 500);
        assert_eq!(admitted(&c, &h, &a, 20), 5);
    }

    #[test]
    fn an_envoy_without_an_id_reports_under_one_made_up_for_all_its_leaders() {
        let (c, h) = (cfg(), host());
        let mut l = Leader::new(&c, 0xab, String::new());
        l.on_tick(&c, &h);
        let poll = h.last();
        assert!(answer(
            &mut l,
            &h,
            poll.id,
            ok(&limited_snapshot(&secret('a'), 5, Some(1)))
        ));
        h.advance(1_000);
        l.on_tick(&c, &h);
        let report = h.last();
        let sent: tokengate_wire::FleetReport =
            serde_json::from_slice(report.body.as_deref().unwrap()).unwrap();
        assert_eq!(sent.proxy_id, "envoy-00000000000000ab");
        // The next leader of the same Envoy reports as the same proxy.
        let mut next = Leader::new(&c, 0xcd, String::new());
        h.advance(10_000);
        next.on_tick(&c, &h);
        next.on_tick(&c, &h);
        assert_eq!(next.proxy_id(), "envoy-00000000000000ab");
    }

    #[test]
    fn only_one_candidate_leads() {
        let (c, h) = (cfg(), host());
        let mut a = Leader::new(&c, 1, String::new());
        let mut b = Leader::new(&c, 2, String::new());
        a.on_tick(&c, &h);
        b.on_tick(&c, &h);
        assert!(a.is_leader() && !b.is_leader());
        assert_eq!(h.sent.borrow().len(), 1);
    }

    #[test]
    fn a_late_answer_to_an_abandoned_poll_is_ignored() {
        let (c, h) = (cfg(), host());
        let mut l = Leader::new(&c, 1, String::new());
        l.on_tick(&c, &h);
        let first = h.last();
        // The callback never comes: past the guard, the poll is abandoned.
        h.advance(36_000);
        l.on_tick(&c, &h);
        assert!(matches!(l.sync().phase(), Phase::Backoff { .. }));
        let a = secret('a');
        assert!(!answer(
            &mut l,
            &h,
            first.id,
            ok(&snapshot(4, SyncStatus::Active, &a))
        ));
        assert_eq!(
            authorize(&c, &h.store, Some(a.as_bytes()), h.now_ms() * 1_000_000),
            Outcome::Deny(Denial::StateUnavailable),
            "nothing applied"
        );
        assert_eq!(h.counter(Counter::SyncSuccess), 0);
        // After the backoff, a new poll; its answer counts.
        h.advance(1_000);
        l.on_tick(&c, &h);
        let second = h.last();
        assert_ne!(second.id, first.id);
        assert!(answer(
            &mut l,
            &h,
            second.id,
            ok(&snapshot(4, SyncStatus::Active, &a))
        ));
        assert_eq!(h.counter(Counter::SyncSuccess), 1);
    }

    #[test]
    fn failures_are_counted_logged_and_backed_off() {
        let (c, h) = (cfg(), host());
        let mut l = Leader::new(&c, 1, String::new());
        h.refuse.set(1);
        l.on_tick(&c, &h);
        assert_eq!(h.counter(Counter::SyncFailure), 1);
        assert!(h.logs.borrow()[0].1.contains("cannot call cluster `cp`"));
        assert!(h.sent.borrow().is_empty());
        l.on_tick(&c, &h);
        assert!(h.sent.borrow().is_empty(), "backing off");
        h.advance(1_000);
        l.on_tick(&c, &h);
        let poll = h.last();
        let failed = (
            Answer {
                status: Some(503),
                body_len: 0,
            },
            None,
        );
        assert!(answer(&mut l, &h, poll.id, failed));
        assert_eq!(h.counter(Counter::SyncFailure), 2);
        assert!(h.logs.borrow()[1].1.contains("HTTP 503"));
        assert_eq!(l.sync().failures(), 2);
    }

    #[test]
    fn an_oversized_body_is_not_read() {
        let (c, h) = (cfg(), host());
        let mut l = Leader::new(&c, 1, String::new());
        l.on_tick(&c, &h);
        let big = Answer {
            status: Some(200),
            body_len: MAX_SYNC_BODY_BYTES + 1,
        };
        let mut read = false;
        assert!(l.on_answer(&c, &h, h.last().id, big, || {
            read = true;
            None
        }));
        assert!(!read);
        assert_eq!(h.counter(Counter::SyncFailure), 1);
    }

    #[test]
    fn the_leader_reports_what_the_workers_counted() {
        let (c, h) = (cfg(), host());
        let mut l = Leader::new(&c, 1, "node-1".into());
        l.on_tick(&c, &h);
        let poll = h.last().id;
        let entry = |allowed| UsageEntry {
            id: "tok_1".into(),
            allowed,
            denied: 0,
            last_used_at: 5,
        };
        h.queue.borrow_mut().push(vec![entry(2)]);
        h.queue.borrow_mut().push(vec![entry(3)]);
        l.on_tick(&c, &h);
        let report = h.last();
        assert_ne!(report.id, poll);
        assert_eq!((report.method, report.path.as_str()), ("POST", "/v1/usage"));
        assert!(report
            .headers
            .contains(&("content-type".into(), "application/json".into())));
        let body: UsageReport = serde_json::from_slice(report.body.as_deref().unwrap()).unwrap();
        assert_eq!(body.proxy_id, "node-1");
        assert_eq!(body.entries, [entry(5)]);
        // A failed report puts its counts back; the next one carries them.
        let refused = (
            Answer {
                status: Some(500),
                body_len: 0,
            },
            None,
        );
        assert!(answer(&mut l, &h, report.id, refused));
        assert_eq!(h.counter(Counter::UsageFailures), 1);
        h.queue.borrow_mut().push(vec![entry(1)]);
        h.advance(1_000);
        l.on_tick(&c, &h);
        let again = h.last();
        let body: UsageReport = serde_json::from_slice(again.body.as_deref().unwrap()).unwrap();
        assert_eq!(body.entries, [entry(6)]);
        assert!(answer(&mut l, &h, again.id, ok(b"")));
        assert_eq!(h.counter(Counter::UsageReports), 1);
    }

    #[test]
    fn followers_and_disabled_reporting_send_no_report() {
        let (c, h) = (cfg(), host());
        let mut leader = Leader::new(&c, 1, String::new());
        let mut follower = Leader::new(&c, 2, String::new());
        leader.on_tick(&c, &h);
        h.queue.borrow_mut().push(vec![UsageEntry {
            id: "tok_1".into(),
            allowed: 1,
            denied: 0,
            last_used_at: 1,
        }]);
        follower.on_tick(&c, &h);
        assert_eq!(
            h.sent.borrow().len(),
            1,
            "the follower neither polls nor reports"
        );
        assert_eq!(h.queue.borrow().len(), 1, "nor takes the workers' counts");
        let off = Config::parse(
            br#"{"control_plane_cluster":"cp","sync_token":"x","usage_reporting":false}"#,
        )
        .unwrap();
        let h2 = host();
        let mut l = Leader::new(&off, 1, String::new());
        h2.queue.borrow_mut().push(vec![]);
        l.on_tick(&off, &h2);
        l.on_tick(&off, &h2);
        assert!(h2.sent.borrow().iter().all(|s| s.method == "GET"));
    }
}
