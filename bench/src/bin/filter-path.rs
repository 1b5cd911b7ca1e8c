//! The filter's per-request decision path run natively, for a profiler: `valgrind
//! --tool=callgrind target/release/filter-path` counts the instructions one request costs in
//! the filter's own code (header extraction, shape check, hashing, record decoding, GCRA),
//! which is what runs inside each Envoy worker's wasm VM besides the host calls. The store
//! copies on every read, as Envoy's shared data does.
//!
//! `filter-path [requests] [tokens] [rules]` (default 200,000 requests over a 1,000-token
//! state). With `rules` (0, 10 or 50), every request is a scoped token's: its scope holds
//! `rules` rules that do not cover the request, then the one that does (so all are tried);
//! `unrestricted` instead: every request is the same unlimited, unscoped token's (the
//! baseline).
//!
//! `filter-path scopes [requests]` prices scope matching in one run: the same decisions for
//! an unrestricted token and for scoped ones with 0, 10 and 50 rules before the covering
//! one, in nanoseconds per request (wall clock, this machine; compare the rows, not runs).

use std::time::Instant;
use tokengate_filter::authorize::{extract, judge, Outcome, Target};
use tokengate_filter::config::Config;
use tokengate_filter::scopes::ScopeCache;
use tokengate_filter::store::fake::MemStore;
use tokengate_filter::sync::SyncClient;
use tokengate_wire::{token, Kind, Rule, SyncRecord, SyncResponse, SyncScope, SyncStatus};

fn secret(i: usize) -> String {
    let alphabet = token::BASE62;
    let random: String = (0..token::RANDOM_LEN)
        .map(|j| alphabet[(i * 7919 + j * 104_729) % alphabet.len()] as char)
        .collect();
    token::compose(&random).expect("a token")
}

/// The scope `bench:<rules>`: `rules` rules that miss `GET /orders/42/lines` only at its last
/// segment (the worst case: an API's rules share their leading segments), then the one that
/// covers it.
fn scope(rules: usize) -> SyncScope {
    let mut list: Vec<Rule> = (0..rules)
        .map(|i| Rule {
            methods: Some(vec!["GET".into(), "POST".into()]),
            path: format!("/orders/*/lines-{i}"),
        })
        .collect();
    list.push(Rule {
        methods: Some(vec!["GET".into()]),
        path: "/orders/**".into(),
    });
    SyncScope {
        name: format!("bench:{rules}"),
        rules: list,
        version: 1,
    }
}

const RULE_COUNTS: [usize; 3] = [0, 10, 50];

/// A store loaded with `tokens` tokens through the sync client, as the leader loads it.
/// Token `tokens + k` is limited to the scope of `RULE_COUNTS[k]` rules; the others are
/// unrestricted, every other one rate-limited far above what is asked of it.
fn load(cfg: &Config, tokens: usize, secrets: &[String]) -> MemStore {
    let store = MemStore::default();
    let changes = secrets
        .iter()
        .enumerate()
        .map(|(i, s)| SyncRecord {
            scopes: (i >= tokens).then(|| vec![format!("bench:{}", RULE_COUNTS[i - tokens])]),
            quota: None,
            hash: tokengate_filter::authorize::hash_hex(s.as_bytes()),
            id: format!("tok_{i:016}"),
            name: format!("token number {i}"),
            owner: "team-bench".into(),
            kind: Kind::Service,
            status: SyncStatus::Active,
            // Every other token is limited, far above what this loop asks of it.
            max_rps: (i % 2 == 1 && i < tokens).then_some(1_000_000),
            burst: None,
            limit_scope: Default::default(),
            expires_at: None,
            version: i as u64 + 1,
        })
        .collect();
    let snapshot = SyncResponse {
        scopes: Some(RULE_COUNTS.iter().map(|n| scope(*n)).collect()),
        scopes_version: Some(1),
        store_id: "bench".into(),
        version: secrets.len() as u64,
        snapshot: true,
        changes,
        next_cursor: None,
        token_count: secrets.len() as u64,
        proxies: None,
    };
    let body = serde_json::to_vec(&snapshot).expect("json");
    let mut sync = SyncClient::new(1);
    sync.on_tick(cfg, &store, "", 0);
    let (applied, _) = sync.on_response(cfg, &store, "", 0, Some(200), Some(&body));
    applied.expect("the snapshot loads");
    store
}

/// One decision as the filter makes it: the credential read, then judged.
fn decide(cfg: &Config, store: &MemStore, cache: &ScopeCache, token: &str, now: u64) -> bool {
    let header = |name: &str| (name == "x-api-token").then(|| token.as_bytes().to_vec());
    let credential = extract(cfg, header);
    let presented = credential.as_ref().map(|c| c.bytes());
    let target = Target {
        method: Some(b"GET"),
        path: Some(b"/orders/42/lines?page=2"),
    };
    judge(cfg, store, cache, presented, now, || target).outcome == Outcome::Allow
}

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    let compare = args.peek().map(String::as_str) == Some("scopes");
    if compare {
        args.next();
    }
    let requests: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let tokens: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000);
    // `unrestricted`: the unlimited, unscoped token only (the A of an A/B with `rules`).
    let third = args.next();
    let unrestricted = third.as_deref() == Some("unrestricted");
    let rules: Option<usize> = third.and_then(|a| a.parse().ok());
    let cfg = Config::parse(br#"{"control_plane_cluster":"cp","sync_token":"x"}"#).expect("config");
    let secrets: Vec<String> = (0..tokens + RULE_COUNTS.len()).map(secret).collect();
    let store = load(&cfg, tokens, &secrets);
    let cache = ScopeCache::new();
    let scoped = |n: usize| {
        let k = RULE_COUNTS.iter().position(|r| *r == n);
        &secrets[tokens + k.expect("rules: one of 0, 10, 50")]
    };
    let mut now: u64 = 1_800_000_000_000_000_000;

    if compare {
        // Each row on the unlimited path, so that only the scope check differs. Rows take
        // turns over several rounds and each keeps its best, which irons out a busy machine.
        let rows: Vec<(String, &String)> =
            std::iter::once(("unrestricted".to_string(), &secrets[0]))
                .chain(
                    RULE_COUNTS
                        .iter()
                        .map(|n| (format!("scoped, {n} rules + 1"), scoped(*n))),
                )
                .collect();
        let mut best = vec![f64::MAX; rows.len()];
        for _round in 0..7 {
            for ((label, token), best) in rows.iter().zip(best.iter_mut()) {
                let start = Instant::now();
                for _ in 0..requests {
                    now += 1_000;
                    assert!(decide(&cfg, &store, &cache, token, now), "{label}");
                }
                *best = best.min(start.elapsed().as_nanos() as f64 / requests as f64);
            }
        }
        for ((label, _), ns) in rows.iter().zip(&best) {
            println!(
                "{label:<22} {ns:>8.0} ns/request  ({:+.0} ns for the scope check)",
                ns - best[0]
            );
        }
        println!(
            "scope set compiled {} time(s) for {} requests",
            cache.compilations(),
            7 * rows.len() * requests
        );
        return;
    }

    let mut allowed = 0usize;
    for i in 0..requests {
        let token = match rules {
            Some(n) => scoped(n),
            None if unrestricted => &secrets[0],
            None => &secrets[i % 2],
        };
        now += 1_000_000;
        if decide(&cfg, &store, &cache, token, now) {
            allowed += 1;
        }
    }
    assert_eq!(allowed, requests, "every request is admitted");
    match rules {
        Some(n) => println!("{requests} requests of a token scoped to {n} rules + 1: all admitted"),
        None => println!(
            "{requests} requests (half on a limited token) over {tokens} tokens: all admitted"
        ),
    }
}
