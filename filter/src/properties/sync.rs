//! Sync answers from a control plane that is broken, hostile or merely late: whatever comes
//! back, the filter neither panics nor loses the state it has, and its versions only move
//! forward.

use super::records::{kind, status};
use super::{cfg, secret};
use crate::authorize::{authorize, hash_hex, Denial, Outcome};
use crate::record::LEASE_KEY;
use crate::store::fake::MemStore;
use crate::sync::{read_state, SyncClient};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use tokengate_wire::{SyncRecord, SyncResponse, SyncStatus};

const STORE: &str = "store-a";
const NOW_S: i64 = 1_800_000_000;
const NOW_NS: u64 = NOW_S as u64 * 1_000_000_000;

type Map = HashMap<String, (Vec<u8>, u32)>;

fn record(secret: &str, status: SyncStatus, version: u64) -> SyncRecord {
    SyncRecord {
        scopes: None,
        quota: None,
        hash: hash_hex(secret.as_bytes()),
        id: format!("tok_{version}"),
        name: "n".into(),
        owner: "o".into(),
        kind: tokengate_wire::Kind::User,
        status,
        max_rps: None,
        burst: None,
        limit_scope: Default::default(),
        expires_at: None,
        version,
    }
}

fn body(store_id: &str, version: u64, snapshot: bool, changes: Vec<SyncRecord>) -> Vec<u8> {
    paged(store_id, version, snapshot, changes, None)
}

fn paged(
    store_id: &str,
    version: u64,
    snapshot: bool,
    changes: Vec<SyncRecord>,
    next_cursor: Option<String>,
) -> Vec<u8> {
    let token_count = changes.len() as u64;
    serde_json::to_vec(&SyncResponse {
        scopes: None,
        scopes_version: None,
        store_id: store_id.into(),
        version,
        snapshot,
        changes,
        next_cursor,
        token_count,
        proxies: None,
    })
    .unwrap()
}

/// A copy to ask `authorize` on, since asking about a limited token updates its rate state.
fn copy(store: &MemStore) -> MemStore {
    let c = MemStore::default();
    *c.map.borrow_mut() = store.map.borrow().clone();
    c
}

fn outcomes(store: &MemStore, secrets: &[String]) -> Vec<Outcome> {
    let c = copy(store);
    let config = cfg();
    secrets
        .iter()
        .map(|s| authorize(&config, &c, Some(s.as_bytes()), NOW_NS))
        .collect()
}

fn without_lease(store: &MemStore) -> Map {
    let mut m = store.map.borrow().clone();
    m.remove(LEASE_KEY);
    m
}

/// What a loaded filter holds: tokens of every kind, one snapshot's worth.
#[derive(Debug, Clone)]
struct Setup {
    secrets: Vec<String>,
    records: Vec<SyncRecord>,
    version: u64,
}

fn setup() -> impl Strategy<Value = Setup> {
    prop::collection::vec(
        (
            secret(),
            status(),
            kind(),
            prop::option::of(1..1_000u32),
            prop::option::of(prop_oneof![
                Just(NOW_S - 1),
                Just(NOW_S + 3_600),
                any::<i64>()
            ]),
            1..1_000_000u64,
        ),
        1..6,
    )
    .prop_map(|tokens| {
        let mut secrets = Vec::new();
        let mut records = Vec::new();
        for (s, status, kind, max_rps, expires_at, version) in tokens {
            let mut r = record(&s, status, version);
            r.kind = kind;
            r.max_rps = max_rps;
            r.expires_at = expires_at;
            secrets.push(s);
            records.push(r);
        }
        let version = records.iter().map(|r| r.version).max().unwrap_or(1);
        Setup {
            secrets,
            records,
            version,
        }
    })
}

fn load(s: &Setup) -> (MemStore, SyncClient) {
    let c = cfg();
    let store = MemStore::default();
    let mut client = SyncClient::new(1);
    assert!(client.on_tick(&c, &store, "", 0).is_some());
    let snap = body(STORE, s.version, true, s.records.clone());
    let (r, _) = client.on_response(&c, &store, "", 0, Some(200), Some(&snap));
    assert_eq!(r.unwrap().state.unwrap().version, s.version);
    (store, client)
}

/// A good delta for the loaded state: every known token changes status.
fn good_delta(s: &Setup) -> Value {
    let changes: Vec<SyncRecord> = s
        .records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut r = r.clone();
            r.status = match r.status {
                SyncStatus::Active => SyncStatus::Suspended,
                _ => SyncStatus::Active,
            };
            r.version = s.version + 1 + i as u64;
            r
        })
        .collect();
    serde_json::from_slice(&body(
        STORE,
        s.version + changes.len() as u64,
        false,
        changes,
    ))
    .unwrap()
}

/// Values of the wrong type, or out of the type's range, for each field of an answer.
fn wrong_values(field: &str) -> Vec<Value> {
    let too_big_u64: Value = serde_json::from_str("18446744073709551616").unwrap();
    let too_big_i64: Value = serde_json::from_str("9223372036854775808").unwrap();
    match field {
        "store_id" | "hash" | "id" | "name" | "owner" => {
            vec![json!(1), Value::Null, json!(true), json!([]), json!({})]
        }
        "version" | "token_count" => vec![
            json!(-1),
            json!(1.5),
            json!("1"),
            Value::Null,
            too_big_u64,
            json!(1e300),
        ],
        "snapshot" => vec![json!("true"), json!(1), Value::Null],
        "changes" => vec![json!({}), json!("x"), Value::Null, json!(1), json!([1])],
        "next_cursor" => vec![json!(1), json!(true), json!([]), json!({})],
        "kind" => vec![json!("admin"), json!("User"), json!(0), Value::Null],
        "status" => vec![json!("deleted"), json!("Active"), json!(0), Value::Null],
        "max_rps" | "burst" => vec![
            json!(-1),
            json!(4_294_967_296u64),
            json!(1.5),
            json!("5"),
            json!(true),
        ],
        "expires_at" => vec![too_big_i64, json!(-1.5), json!("1"), json!(true), json!([])],
        _ => unreachable!("{field}"),
    }
}

const TOP_FIELDS: [&str; 6] = [
    "store_id",
    "version",
    "snapshot",
    "changes",
    "next_cursor",
    "token_count",
];
const RECORD_FIELDS: [&str; 10] = [
    "hash",
    "id",
    "name",
    "owner",
    "kind",
    "status",
    "max_rps",
    "burst",
    "expires_at",
    "version",
];
const REQUIRED_TOP: [&str; 5] = ["store_id", "version", "snapshot", "changes", "token_count"];
const REQUIRED_RECORD: [&str; 7] = ["hash", "id", "name", "owner", "kind", "status", "version"];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("JSON has no NaN", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        "\\PC{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::hash_map(
                prop_oneof![
                    prop::sample::select(&TOP_FIELDS[..]).prop_map(str::to_string),
                    prop::sample::select(&RECORD_FIELDS[..]).prop_map(str::to_string),
                    "\\PC{0,8}",
                ],
                inner,
                0..8,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// An answer the filter must refuse as a whole: (HTTP status, body).
fn refused(s: &Setup) -> impl Strategy<Value = (Option<u32>, Vec<u8>)> {
    let delta = good_delta(s);
    let text = serde_json::to_vec(&delta).unwrap();
    let n_changes = s.records.len();
    let d1 = delta.clone();
    let d2 = delta.clone();
    let d3 = delta.clone();
    let d4 = delta.clone();
    let ok = |b: Vec<u8>| (Some(200), b);
    prop_oneof![
        // The transport failed, or the control plane said no, whatever the body.
        (
            prop_oneof![
                Just(None),
                (0..1_000u32)
                    .prop_filter("200", |c| *c != 200)
                    .prop_map(Some)
            ],
            prop_oneof![
                Just(text.clone()),
                prop::collection::vec(any::<u8>(), 0..64)
            ]
        ),
        prop::collection::vec(any::<u8>(), 0..256).prop_map(ok),
        json_value().prop_map(move |v| ok(serde_json::to_vec(&v).unwrap())),
        (0..text.len()).prop_map({
            let text = text.clone();
            move |k| ok(text[..k].to_vec())
        }),
        // One field of the answer or of one record holds a wrong value.
        (
            prop::sample::select(&TOP_FIELDS[..]),
            any::<prop::sample::Index>()
        )
            .prop_map(move |(f, i)| {
                let mut v = d1.clone();
                let wrong = wrong_values(f);
                v[f] = wrong[i.index(wrong.len())].clone();
                ok(serde_json::to_vec(&v).unwrap())
            }),
        (
            0..n_changes,
            prop::sample::select(&RECORD_FIELDS[..]),
            any::<prop::sample::Index>()
        )
            .prop_map(move |(r, f, i)| {
                let mut v = d2.clone();
                let wrong = wrong_values(f);
                v["changes"][r][f] = wrong[i.index(wrong.len())].clone();
                ok(serde_json::to_vec(&v).unwrap())
            }),
        // A required field is missing.
        (prop::option::of(0..n_changes), any::<prop::sample::Index>()).prop_map(move |(r, i)| {
            let mut v = d3.clone();
            match r {
                None => v
                    .as_object_mut()
                    .unwrap()
                    .remove(REQUIRED_TOP[i.index(REQUIRED_TOP.len())]),
                Some(r) => v["changes"][r]
                    .as_object_mut()
                    .unwrap()
                    .remove(REQUIRED_RECORD[i.index(REQUIRED_RECORD.len())]),
            };
            ok(serde_json::to_vec(&v).unwrap())
        }),
        // A record whose hash could not be a key: wrong case, length or alphabet.
        (
            0..n_changes,
            prop_oneof![
                "[0-9A-F]{64}".prop_filter("has a letter", |h| h
                    .bytes()
                    .any(|b| b.is_ascii_uppercase())),
                "[0-9a-f]{0,63}",
                "[0-9a-f]{65,80}",
                "[0-9a-f]{0,30}[^0-9a-f][0-9a-f]{0,33}",
                Just("../../etc/passwd".to_string()),
            ]
        )
            .prop_map(move |(r, h)| {
                let mut v = d4.clone();
                v["changes"][r]["hash"] = json!(h);
                ok(serde_json::to_vec(&v).unwrap())
            }),
        // Changes from another store cannot build on this one's snapshot.
        "\\PC{0,16}"
            .prop_filter("same store", |id| id != STORE)
            .prop_map(move |id| {
                let mut v = delta.clone();
                v["store_id"] = json!(id);
                ok(serde_json::to_vec(&v).unwrap())
            }),
    ]
}

/// A well-formed but late answer: older than what is loaded, about the same tokens.
fn stale(s: &Setup) -> impl Strategy<Value = Vec<u8>> {
    let s = s.clone();
    (
        0..s.version,
        prop::collection::vec((any::<bool>(), status()), s.records.len()),
    )
        .prop_map(move |(version, picks)| {
            let changes = s
                .records
                .iter()
                .zip(picks)
                .filter(|(r, (pick, _))| *pick && r.version > 1)
                .map(|(r, (_, status))| {
                    let mut r = r.clone();
                    r.status = status;
                    r.version = r.version.min(version + 1) - 1;
                    r
                })
                .collect();
            body(STORE, version, false, changes)
        })
}

proptest! {
    #[test]
    fn refused_answers_change_nothing(
        (s, (status, answer)) in setup().prop_flat_map(|s| (Just(s.clone()), refused(&s)))
    ) {
        let c = cfg();
        let (store, mut client) = load(&s);
        let before = store.map.borrow().clone();
        let answers = outcomes(&store, &s.secrets);
        let (r, next) = client.on_response(&c, &store, "", 1_000, status, Some(&answer));
        prop_assert!(r.is_err(), "accepted {:?}", String::from_utf8_lossy(&answer));
        prop_assert_eq!(next, None);
        prop_assert!(
            *store.map.borrow() == before,
            "a refused answer changed shared data: {}", String::from_utf8_lossy(&answer)
        );
        prop_assert_eq!(outcomes(&store, &s.secrets), answers);
        prop_assert_eq!(client.failures(), 1);
    }

    #[test]
    fn late_answers_change_no_token_and_no_version(
        (s, answer) in setup().prop_flat_map(|s| (Just(s.clone()), stale(&s)))
    ) {
        let c = cfg();
        let (store, mut client) = load(&s);
        let before = without_lease(&store);
        let answers = outcomes(&store, &s.secrets);
        let (r, _) = client.on_response(&c, &store, "", 1_000, Some(200), Some(&answer));
        prop_assert!(r.is_ok(), "{:?}", r);
        prop_assert!(without_lease(&store) == before, "a late answer changed shared data");
        prop_assert_eq!(read_state(&store).unwrap().unwrap().version, s.version);
        prop_assert_eq!(outcomes(&store, &s.secrets), answers);
    }

    /// A run of answers as a real control plane would give them, mixed with failures: after
    /// every step the versions have only moved forward and every token the filter is sure
    /// about is judged as the control plane last said.
    #[test]
    fn a_run_of_answers_keeps_the_state_the_control_plane_sent(
        secrets in prop::collection::vec(secret(), 4),
        steps in prop::collection::vec(step(), 1..24),
    ) {
        run(&secrets, &steps)?;
    }
}

#[derive(Debug, Clone)]
enum Step {
    /// These tokens change status, one version each.
    Delta(Vec<(usize, SyncStatus)>),
    /// A full snapshot of these tokens in pages of `page` records, from store `store`; when
    /// `abort_after` is set the answer after that many pages fails.
    Snapshot {
        tokens: Vec<(usize, SyncStatus)>,
        page: usize,
        store: u8,
        abort_after: Option<usize>,
    },
    /// An answer that must be refused.
    Garbage(Vec<u8>),
}

fn step() -> impl Strategy<Value = Step> {
    let changes = prop::collection::vec((0..4usize, status()), 0..4);
    prop_oneof![
        3 => changes.clone().prop_map(Step::Delta),
        2 => (changes, 1..3usize, 0..2u8, prop::option::of(0..3usize)).prop_map(
            |(tokens, page, store, abort_after)| Step::Snapshot { tokens, page, store, abort_after }
        ),
        1 => prop::collection::vec(any::<u8>(), 0..32).prop_map(Step::Garbage),
    ]
}

fn expected(status: Option<SyncStatus>) -> Outcome {
    match status {
        Some(SyncStatus::Suspended) => Outcome::Deny(Denial::TokenSuspended),
        Some(SyncStatus::Active) => Outcome::Allow,
        Some(SyncStatus::Revoked) | None => Outcome::Deny(Denial::InvalidToken),
    }
}

fn same(got: &Outcome, want: &Outcome) -> bool {
    got == want
}

fn accepted(client: &mut SyncClient, store: &MemStore, body: &[u8]) -> bool {
    client
        .on_response(&cfg(), store, "", 0, Some(200), Some(body))
        .0
        .is_ok()
}

fn run(secrets: &[String], steps: &[Step]) -> Result<(), TestCaseError> {
    let store = MemStore::default();
    let mut client = SyncClient::new(1);
    client.on_tick(&cfg(), &store, "", 0);
    // The control plane: one version counter per store, and which store answers now.
    let mut versions = [0u64; 2];
    let mut server: Option<u8> = None;
    let mut loaded_from: Option<u8> = None;
    let mut flipped = false;
    // What the filter should answer per token; `None`: not sure (a snapshot in progress).
    let mut model: Vec<Option<Option<SyncStatus>>> = vec![Some(None); secrets.len()];
    for step in steps {
        let state_before = read_state(&store).unwrap();
        let map_before = store.map.borrow().clone();
        match step {
            Step::Delta(changes) => {
                // Changes only go to a filter holding the answering store's snapshot. A control
                // plane that flips back to its old database after part of a snapshot from
                // another one is left out: that part's records carry the other database's
                // versions, which the old one's changes cannot be compared with.
                let Some(sid) = loaded_from.filter(|l| Some(*l) == server && !flipped) else {
                    continue;
                };
                let v = &mut versions[usize::from(sid)];
                let mut recs = Vec::new();
                for (i, st) in changes {
                    *v += 1;
                    recs.push(record(&secrets[*i], *st, *v));
                }
                let b = body(&format!("store-{sid}"), *v, false, recs);
                prop_assert!(accepted(&mut client, &store, &b));
                for (i, st) in changes {
                    model[*i] = Some(Some(*st));
                }
            }
            Step::Snapshot {
                tokens,
                page,
                store: sid,
                abort_after,
            } => {
                server = Some(*sid);
                // A snapshot holds each token once, at the version of its last change.
                let v = &mut versions[usize::from(*sid)];
                let mut latest: Vec<Option<SyncRecord>> = vec![None; secrets.len()];
                for (i, st) in tokens {
                    *v += 1;
                    latest[*i] = Some(record(&secrets[*i], *st, *v));
                }
                let recs: Vec<SyncRecord> = latest.iter().flatten().cloned().collect();
                let pages: Vec<Vec<SyncRecord>> = if recs.is_empty() {
                    vec![Vec::new()]
                } else {
                    recs.chunks(*page).map(<[SyncRecord]>::to_vec).collect()
                };
                let mut aborted = false;
                for (n, p) in pages.iter().enumerate() {
                    if *abort_after == Some(n) {
                        let (r, _) = client.on_response(&cfg(), &store, "", 0, Some(503), None);
                        prop_assert!(r.is_err());
                        aborted = true;
                        break;
                    }
                    let cursor = (n + 1 < pages.len()).then(|| format!("c{n}"));
                    let b = paged(&format!("store-{sid}"), *v, true, p.clone(), cursor);
                    prop_assert!(accepted(&mut client, &store, &b));
                    // Records of a snapshot being written are trusted at once.
                    for r in p {
                        let i = secrets
                            .iter()
                            .position(|s| hash_hex(s.as_bytes()) == r.hash)
                            .unwrap();
                        model[i] = None;
                    }
                }
                if aborted {
                    flipped |= loaded_from != Some(*sid);
                } else {
                    flipped = false;
                    loaded_from = Some(*sid);
                    for (slot, r) in model.iter_mut().zip(&latest) {
                        *slot = Some(r.as_ref().map(|r| r.status));
                    }
                }
            }
            Step::Garbage(bytes) => {
                prop_assert!(!accepted(&mut client, &store, bytes));
                prop_assert!(*store.map.borrow() == map_before);
            }
        }
        let state_after = read_state(&store).unwrap();
        if let Some(b) = &state_before {
            let Some(a) = &state_after else {
                return Err(TestCaseError::fail("state lost"));
            };
            // A new snapshot may restart the version (another database), never the generation.
            prop_assert!(
                a.generation > b.generation
                    || (a.generation == b.generation && a.version >= b.version),
                "state went back from {:?} to {:?} after {:?}",
                b,
                a,
                step
            );
        }
        if loaded_from.is_some() {
            let got = outcomes(&store, secrets);
            for (i, want) in model.iter().enumerate() {
                if let Some(want) = want {
                    prop_assert!(
                        same(&got[i], &expected(*want)),
                        "token {} after {:?}: got {:?}, want {:?}",
                        i,
                        step,
                        got[i],
                        want
                    );
                }
            }
        }
    }
    Ok(())
}
