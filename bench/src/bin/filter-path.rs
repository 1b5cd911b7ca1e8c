//! The filter's per-request decision path run natively, for a profiler: `valgrind
//! --tool=callgrind target/release/filter-path` counts the instructions one request costs in
//! the filter's own code (header extraction, shape check, hashing, record decoding, GCRA),
//! which is what runs inside each Envoy worker's wasm VM besides the host calls. The store
//! copies on every read, as Envoy's shared data does.
//!
//! `filter-path [requests] [tokens]` (default 200,000 requests over a 1,000-token state).

use tokengate_filter::authorize::{extract, judge, Outcome};
use tokengate_filter::config::Config;
use tokengate_filter::store::fake::MemStore;
use tokengate_filter::sync::SyncClient;
use tokengate_wire::{token, Kind, SyncRecord, SyncResponse, SyncStatus};

fn secret(i: usize) -> String {
    let alphabet = token::BASE62;
    let random: String = (0..token::RANDOM_LEN)
        .map(|j| alphabet[(i * 7919 + j * 104_729) % alphabet.len()] as char)
        .collect();
    token::compose(&random).expect("a token")
}

fn main() {
    let mut args = std::env::args().skip(1);
    let requests: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let tokens: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let cfg = Config::parse(br#"{"control_plane_cluster":"cp","sync_token":"x"}"#).expect("config");
    let store = MemStore::default();
    let secrets: Vec<String> = (0..tokens).map(secret).collect();
    let changes = secrets
        .iter()
        .enumerate()
        .map(|(i, s)| SyncRecord {
            scopes: None,
            quota: None,
            hash: tokengate_filter::authorize::hash_hex(s.as_bytes()),
            id: format!("tok_{i:016}"),
            name: format!("token number {i}"),
            owner: "team-bench".into(),
            kind: Kind::Service,
            status: SyncStatus::Active,
            // Every other token is limited, far above what this loop asks of it.
            max_rps: (i % 2 == 1).then_some(1_000_000),
            burst: None,
            limit_scope: Default::default(),
            expires_at: None,
            version: i as u64 + 1,
        })
        .collect();
    let snapshot = SyncResponse {
        scopes: None,
        scopes_version: None,
        store_id: "bench".into(),
        version: tokens as u64,
        snapshot: true,
        changes,
        next_cursor: None,
        token_count: tokens as u64,
        proxies: None,
    };
    let body = serde_json::to_vec(&snapshot).expect("json");
    let mut sync = SyncClient::new(1);
    sync.on_tick(&cfg, &store, "", 0);
    let (applied, _) = sync.on_response(&cfg, &store, "", 0, Some(200), Some(&body));
    applied.expect("the snapshot loads");

    let (unlimited, limited) = (&secrets[0], &secrets[1]);
    let mut allowed = 0usize;
    let mut now: u64 = 1_800_000_000_000_000_000;
    for i in 0..requests {
        let token = if i % 2 == 0 { unlimited } else { limited };
        let header = |name: &str| (name == "x-api-token").then(|| token.as_bytes().to_vec());
        let credential = extract(&cfg, header);
        now += 1_000_000;
        let presented = credential.as_ref().map(|c| c.bytes());
        if judge(&cfg, &store, presented, now).outcome == Outcome::Allow {
            allowed += 1;
        }
    }
    assert_eq!(allowed, requests, "every request is admitted");
    println!("{requests} requests (half on a limited token) over {tokens} tokens: all admitted");
}
