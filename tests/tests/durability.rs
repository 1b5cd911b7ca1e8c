//! Faults and load, end to end: the control plane SIGKILLed at random points of a write
//! stream (durability), and many API clients writing at once while filters long-poll
//! (concurrency).
//!
//! Run with `cargo test -p tokengate-e2e --test durability -- --nocapture` after
//! `make build` to see the figures. `TOKENGATE_KILLS=200` runs a longer durability test;
//! `TOKENGATE_CLIENTS` and `TOKENGATE_OPS` (default 8 x 40) a heavier concurrency test;
//! `TOKENGATE_SEED=n` replays a run's choices (the seed is printed; thread timing is not
//! replayable).
//!
//! What the durability test proves: a change acknowledged with a 2xx answer survives a
//! process crash. SIGKILL leaves the OS page cache intact, so this says nothing about power
//! loss; that rests on SQLite's WAL with `synchronous=FULL`.

use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokengate_e2e::{http, try_wait_until, wait_until, Options, Response, Stack};

/// How long a change may take to reach Envoy. Generous: after a control-plane restart the
/// filter first waits out its retry backoff.
const PROPAGATION: Duration = Duration::from_secs(30);
const STATE_LOAD: Duration = Duration::from_secs(40);
/// Small sync pages, so that the filter and the observer page through every snapshot and
/// change batches are cut short, as on a large fleet.
const SYNC_PAGE_SIZE: u32 = 7;

/// Both tests load the machine (Envoy, fsyncs, many threads); run one at a time so that
/// neither starves the other into a false timeout.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---- randomness ---------------------------------------------------------------------------

/// SplitMix64: a replayable stream from a printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// In `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.range(0, 100) < percent
    }
}

/// A knob for longer runs by hand.
fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn seed() -> u64 {
    std::env::var("TOKENGATE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

// ---- control plane calls without borrowing the Stack --------------------------------------

/// What a writer thread needs to reach the control plane while the main thread owns the
/// `Stack` (to kill and restart it).
#[derive(Clone)]
struct Api {
    addr: SocketAddr,
    admin: String,
    sync: String,
}

impl Api {
    fn of(stack: &Stack) -> Api {
        Api {
            addr: stack.control_plane_addr(),
            admin: format!("Bearer {}", stack.admin_token),
            sync: format!("Bearer {}", stack.sync_token),
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> io::Result<Response> {
        let body = body.map(Value::to_string);
        http(
            self.addr,
            method,
            path,
            &[
                ("Accept", "application/json"),
                ("Authorization", &self.admin),
            ],
            body.as_deref(),
        )
    }

    fn sync(&self, query: &str) -> io::Result<Response> {
        http(
            self.addr,
            "GET",
            &format!("/v1/sync?{query}"),
            &[("Authorization", &self.sync)],
            None,
        )
    }

    /// A full snapshot through every page: the answer's `version` and every record by id.
    fn snapshot(&self) -> (u64, BTreeMap<String, Record>) {
        let mut records = BTreeMap::new();
        let mut cursor: Option<String> = None;
        loop {
            let query = match &cursor {
                Some(c) => format!("since=0&cursor={c}"),
                None => "since=0".to_string(),
            };
            let r = self
                .sync(&query)
                .unwrap_or_else(|e| panic!("GET /v1/sync?{query}: {e}"));
            assert_eq!(r.status, 200, "GET /v1/sync?{query}: {}", r.body);
            let v = r.json();
            assert_eq!(
                v["snapshot"], true,
                "since=0 must answer a snapshot: {}",
                r.body
            );
            for rec in v["changes"].as_array().expect("changes") {
                let rec = Record::from_sync(rec);
                records.insert(rec.id.clone(), rec);
            }
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return (v["version"].as_u64().expect("version"), records),
            }
        }
    }

    /// `GET /v1/tokens/{id}`: the record, or `revoked` when it answers 404.
    fn get(&self, id: &str) -> Option<Record> {
        let r = self
            .call("GET", &format!("/v1/tokens/{id}"), None)
            .unwrap_or_else(|e| panic!("GET /v1/tokens/{id}: {e}"));
        match r.status {
            200 => Some(Record::from_api(&r.json())),
            404 => None,
            s => panic!("GET /v1/tokens/{id}: {s} {}", r.body),
        }
    }
}

/// The fields a change can move, as the API and the sync stream both carry them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct State {
    /// `active`, `suspended` or `revoked`.
    status: String,
    max_rps: Option<u64>,
    name: String,
}

#[derive(Debug, Clone)]
struct Record {
    id: String,
    state: State,
    version: u64,
}

impl Record {
    fn from_api(v: &Value) -> Record {
        Record {
            id: v["id"].as_str().expect("id").to_string(),
            state: State {
                status: v["status"].as_str().expect("status").to_string(),
                max_rps: v["max_rps"].as_u64(),
                name: v["name"].as_str().expect("name").to_string(),
            },
            version: v["version"].as_u64().expect("version"),
        }
    }

    fn from_sync(v: &Value) -> Record {
        // Same field names; a sync record may also say `revoked`.
        Record::from_api(v)
    }
}

/// What a request through Envoy must answer for a token in `status`.
fn expected_answer(status: &str) -> u16 {
    match status {
        "active" => 200,
        "suspended" => 403,
        "revoked" => 401,
        other => panic!("unexpected status {other}"),
    }
}

/// A stack whose control plane pages sync answers by [`SYNC_PAGE_SIZE`]. The harness passes
/// no extra flags, so a wrapper sets the page size; it `exec`s, so the harness's SIGKILL
/// still reaches the control plane itself.
fn paged_stack(plugin_extra: &str) -> Stack {
    let mut stack = Stack::start_with(Options {
        control_plane: false,
        envoy: false,
        ..Options::default()
    });
    let wrapper = stack.dir.join("tokengate-paged.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nTOKENGATE_SYNC_PAGE_SIZE={SYNC_PAGE_SIZE} exec '{}' \"$@\"\n",
            stack.bins.tokengate.display()
        ),
    )
    .expect("write wrapper");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
            .expect("chmod wrapper");
    }
    stack.bins.tokengate = wrapper;
    stack.plugin_extra = plugin_extra.to_string();
    stack.start_control_plane();
    stack.start_envoy();
    stack
}

/// Waits until Envoy holds `version` and answers every `(secret, status)` as its status
/// says. A single call per token once the version is there: a limited token must pass one.
fn assert_envoy_serves(stack: &Stack, version: u64, tokens: &[(String, String, String)]) {
    let mut last = 0;
    let reached = try_wait_until(PROPAGATION, || {
        last = stack.filter_stat("tokengate.state_version");
        last == version
    });
    assert!(
        reached.is_some(),
        "Envoy's tokengate.state_version is {last}, the database's version is {version}"
    );
    for (id, secret, status) in tokens {
        let want = expected_answer(status);
        let mut got = None;
        let ok = try_wait_until(PROPAGATION, || {
            let r = stack.call_with_token(secret);
            let ok = r.status == want;
            got = Some(r);
            ok
        });
        assert!(
            ok.is_some(),
            "token {id} is {status} in the database: Envoy should answer {want}, \
             last answer {got:?}"
        );
    }
}

// ---- durability -----------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Op {
    Suspend,
    Reactivate,
    MaxRps(Option<u64>),
    Rename(u64),
    Revoke,
}

impl Op {
    fn apply(self, s: &State) -> State {
        let mut s = s.clone();
        if s.status == "revoked" {
            return s;
        }
        match self {
            Op::Suspend => s.status = "suspended".into(),
            Op::Reactivate => s.status = "active".into(),
            Op::MaxRps(m) => s.max_rps = m,
            Op::Rename(n) => s.name = format!("renamed-{n}"),
            Op::Revoke => s.status = "revoked".into(),
        }
        s
    }
}

/// What the writer knows of one token.
#[derive(Debug, Clone)]
struct Known {
    id: String,
    /// `None` for a token whose create answer was lost (adopted later from the database).
    secret: Option<String>,
    /// Every state the database may hold: one after an acknowledged call, more after calls
    /// whose outcome is unknown.
    candidates: HashSet<State>,
    /// The version of the last acknowledged answer (or of the last verification).
    version: u64,
    /// A call since then may have moved the version without an answer saying so.
    version_floor_only: bool,
}

impl Known {
    fn maybe_live(&self) -> bool {
        self.candidates.iter().any(|s| s.status != "revoked")
    }
}

#[derive(Default)]
struct Model {
    tokens: Vec<Known>,
    /// Names of creates whose answer never came.
    pending_creates: Vec<String>,
    acked: u64,
    unknown: u64,
    refused: u64,
    /// Creates whose answer was lost but which had committed.
    adopted: u64,
    /// Contradictions seen by the writer (a 404 for a token that cannot have been revoked).
    violations: Vec<String>,
}

/// One random call against the model; updates the model from the answer.
fn write_once(api: &Api, rng: &mut Rng, model: &Mutex<Model>, seq: u64, highest: &AtomicU64) {
    let (target, op) = {
        let m = model.lock().unwrap();
        let live: Vec<usize> = (0..m.tokens.len())
            .filter(|&i| m.tokens[i].maybe_live())
            .collect();
        if live.len() < 4 || rng.chance(10) {
            (None, None)
        } else {
            let i = live[rng.range(0, live.len() as u64) as usize];
            let op = match rng.range(0, 100) {
                0..=29 => Op::Suspend,
                30..=59 => Op::Reactivate,
                60..=79 => Op::MaxRps(if rng.chance(25) {
                    None
                } else {
                    Some(rng.range(5, 200))
                }),
                80..=95 => Op::Rename(seq),
                _ if live.len() > 8 => Op::Revoke,
                _ => Op::Suspend,
            };
            (Some(m.tokens[i].id.clone()), Some(op))
        }
    };
    let (Some(id), Some(op)) = (target, op) else {
        let name = format!("created-{seq}");
        let mut body = json!({ "name": name });
        if rng.chance(40) {
            body["max_rps"] = json!(rng.range(5, 200));
        }
        let answer = api.call("POST", "/v1/tokens", Some(&body));
        let mut m = model.lock().unwrap();
        match answer {
            Ok(r) if r.status == 201 => {
                let v = r.json();
                let rec = Record::from_api(&v);
                highest.fetch_max(rec.version, Ordering::SeqCst);
                m.acked += 1;
                m.tokens.push(Known {
                    id: rec.id,
                    secret: Some(v["token"].as_str().expect("token").to_string()),
                    candidates: HashSet::from([rec.state]),
                    version: rec.version,
                    version_floor_only: false,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => m.refused += 1,
            Ok(r) if (400..500).contains(&r.status) => m
                .violations
                .push(format!("create {body}: {} {}", r.status, r.body)),
            _ => {
                m.unknown += 1;
                m.pending_creates.push(name);
            }
        }
        return;
    };
    let answer = match op {
        Op::Suspend => api.call("POST", &format!("/v1/tokens/{id}/suspend"), None),
        Op::Reactivate => api.call("POST", &format!("/v1/tokens/{id}/reactivate"), None),
        Op::MaxRps(m) => api.call(
            "PATCH",
            &format!("/v1/tokens/{id}"),
            Some(&json!({ "max_rps": m })),
        ),
        Op::Rename(n) => api.call(
            "PATCH",
            &format!("/v1/tokens/{id}"),
            Some(&json!({ "name": format!("renamed-{n}") })),
        ),
        Op::Revoke => api.call("DELETE", &format!("/v1/tokens/{id}"), None),
    };
    let mut m = model.lock().unwrap();
    let Model {
        tokens,
        violations,
        acked,
        unknown,
        refused,
        ..
    } = &mut *m;
    let t = tokens.iter_mut().find(|t| t.id == id).expect("known token");
    match answer {
        Ok(r) if r.status == 200 => {
            *acked += 1;
            let rec = Record::from_api(&r.json());
            highest.fetch_max(rec.version, Ordering::SeqCst);
            let expected = t
                .candidates
                .iter()
                .map(|s| op.apply(s))
                .any(|s| s == rec.state);
            if !expected {
                violations.push(format!(
                    "{op:?} on {id} answered {:?}, not one of {:?} with the change applied",
                    rec.state, t.candidates
                ));
            }
            t.candidates = HashSet::from([rec.state]);
            t.version = rec.version;
            t.version_floor_only = false;
        }
        Ok(r) if r.status == 204 => {
            *acked += 1;
            t.candidates = t.candidates.iter().map(|s| op.apply(s)).collect();
            // A revoke answers without the record, so its version is unknown here.
            t.version_floor_only = true;
        }
        // 409 `already_revoked` answers a second revoke.
        Ok(r) if r.status == 404 || (r.status == 409 && matches!(op, Op::Revoke)) => {
            *acked += 1;
            if !t.candidates.iter().any(|s| s.status == "revoked") {
                violations.push(format!(
                    "{op:?} on {id}: 404, but no revoke of it can have happened; \
                     it was one of {:?}",
                    t.candidates
                ));
            }
            t.candidates = t.candidates.iter().map(|s| Op::Revoke.apply(s)).collect();
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => *refused += 1,
        Ok(r) if (400..500).contains(&r.status) => {
            violations.push(format!("{op:?} on {id}: {} {}", r.status, r.body))
        }
        // No answer, or a server error while going down: applied or not.
        _ => {
            *unknown += 1;
            let applied: Vec<State> = t.candidates.iter().map(|s| op.apply(s)).collect();
            t.candidates.extend(applied);
            t.version_floor_only = true;
        }
    }
}

/// Compares the database with the model after a restart; then the model holds exactly what
/// the database holds. Returns the database's version.
fn verify_after_restart(api: &Api, model: &mut Model, highest: u64, round: usize) -> u64 {
    let (version, records) = api.snapshot();
    assert!(
        version >= highest,
        "round {round}: the sync version went back from {highest} to {version} after a restart"
    );
    let newest = records.values().map(|r| r.version).max().unwrap_or(0);
    assert_eq!(
        version, newest,
        "round {round}: the sync version is not the newest record's version"
    );
    for t in &mut model.tokens {
        let rec = records
            .get(&t.id)
            .unwrap_or_else(|| panic!("round {round}: token {} is gone from sync", t.id));
        match api.get(&t.id) {
            Some(got) => {
                assert_eq!(got.state, rec.state, "round {round}: API and sync differ");
                assert_eq!(
                    got.version, rec.version,
                    "round {round}: API and sync differ"
                );
            }
            None => assert_eq!(
                rec.state.status, "revoked",
                "round {round}: {} answers 404 but sync says {:?}",
                t.id, rec.state
            ),
        }
        assert!(
            t.candidates.contains(&rec.state),
            "round {round}: token {} is {:?} in the database, but the acknowledged calls \
             leave only {:?}",
            t.id,
            rec.state,
            t.candidates
        );
        if t.version_floor_only {
            assert!(
                rec.version >= t.version,
                "round {round}: token {} is at version {} below its acknowledged {}",
                t.id,
                rec.version,
                t.version
            );
        } else {
            assert_eq!(
                rec.version, t.version,
                "round {round}: token {} is not at the version its last answer gave",
                t.id
            );
        }
        t.candidates = HashSet::from([rec.state.clone()]);
        t.version = rec.version;
        t.version_floor_only = false;
    }
    // Creates whose answer was lost may or may not have committed; adopt those that did.
    let known: HashSet<String> = model.tokens.iter().map(|t| t.id.clone()).collect();
    for rec in records.values().filter(|r| !known.contains(&r.id)) {
        let pos = model
            .pending_creates
            .iter()
            .position(|n| *n == rec.state.name)
            .unwrap_or_else(|| panic!("round {round}: sync has a token nobody created: {rec:?}"));
        model.pending_creates.remove(pos);
        model.adopted += 1;
        model.tokens.push(Known {
            id: rec.id.clone(),
            secret: None,
            candidates: HashSet::from([rec.state.clone()]),
            version: rec.version,
            version_floor_only: false,
        });
    }
    model.pending_creates.clear();
    version
}

#[test]
fn acknowledged_changes_survive_sigkill_and_reach_the_filter() {
    let _serial = serial();
    let started = Instant::now();
    let kills = env_number("TOKENGATE_KILLS", 25) as usize;
    let seed = seed();
    println!("durability: seed {seed} (TOKENGATE_SEED={seed} replays the schedule), {kills} kills");
    // Quick retries, so Envoy catches up soon after each restart.
    let mut stack = paged_stack(r#""backoff_initial_ms": 50, "backoff_max_ms": 500"#);
    let api = Api::of(&stack);
    let model = Arc::new(Mutex::new(Model::default()));
    let highest = Arc::new(AtomicU64::new(0));
    let pause = Arc::new(AtomicBool::new(false));
    let paused = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (api, model, highest) = (api.clone(), model.clone(), highest.clone());
        let (pause, paused, stop) = (pause.clone(), paused.clone(), stop.clone());
        let mut rng = Rng(seed);
        thread::spawn(move || {
            let mut seq = 0;
            while !stop.load(Ordering::SeqCst) {
                if pause.load(Ordering::SeqCst) {
                    paused.store(true, Ordering::SeqCst);
                    while pause.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
                        thread::sleep(Duration::from_millis(1));
                    }
                    paused.store(false, Ordering::SeqCst);
                    continue;
                }
                seq += 1;
                let before = model.lock().unwrap().refused;
                write_once(&api, &mut rng, &model, seq, &highest);
                // Connection refused while the control plane is down: do not spin.
                if model.lock().unwrap().refused > before {
                    thread::sleep(Duration::from_millis(2));
                }
            }
        })
    };
    let mut rng = Rng(seed ^ 0x5EED);
    let mut db_version = 0;
    let mut envoy_checks = 0;
    for round in 1..=kills {
        thread::sleep(Duration::from_millis(rng.range(20, 400)));
        stack.stop_control_plane();
        pause.store(true, Ordering::SeqCst);
        wait_until(Duration::from_secs(60), "the writer to pause", || {
            paused.load(Ordering::SeqCst)
        });
        stack.start_control_plane();
        let mut m = model.lock().unwrap();
        assert!(
            m.violations.is_empty(),
            "round {round}: {:#?}",
            m.violations
        );
        db_version = verify_after_restart(&api, &mut m, highest.load(Ordering::SeqCst), round);
        highest.fetch_max(db_version, Ordering::SeqCst);
        if round % 5 == 0 || round == kills {
            let expect: Vec<(String, String, String)> = m
                .tokens
                .iter()
                .filter_map(|t| {
                    let state = t.candidates.iter().next()?;
                    Some((t.id.clone(), t.secret.clone()?, state.status.clone()))
                })
                .collect();
            assert_envoy_serves(&stack, db_version, &expect);
            envoy_checks += 1;
        }
        drop(m);
        if round < kills {
            pause.store(false, Ordering::SeqCst);
        }
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer thread");
    let m = model.lock().unwrap();
    let revoked = m
        .tokens
        .iter()
        .filter(|t| t.candidates.iter().all(|s| s.status == "revoked"))
        .count();
    println!(
        "durability: {kills} SIGKILLs survived; {} acknowledged writes checked ({} answers \
         lost to a kill, {} of them creates found committed; {} refused while down); {} tokens ({revoked} revoked); final version \
         {db_version}; Envoy checked {envoy_checks} times; {:.1?}",
        m.acked,
        m.unknown,
        m.adopted,
        m.refused,
        m.tokens.len(),
        started.elapsed()
    );
    assert!(
        m.acked > kills as u64,
        "too few acknowledged writes for the test to mean anything"
    );
}

// ---- concurrency ----------------------------------------------------------------------------

/// What the observer learned, shared with the main thread.
#[derive(Default)]
struct Observed {
    /// Each token's newest record.
    latest: HashMap<String, Record>,
    /// The version held after the last complete answer.
    held: Option<u64>,
    changes: u64,
    polls: u64,
    violations: Vec<String>,
}

/// Long-polls `/v1/sync` the way the filter does and checks the stream as it goes: after
/// the first snapshot, no re-snapshot, no record twice, no record older than one already
/// held, and the held version never going back.
fn observe(api: &Api, seen: &Mutex<Observed>, stop: &AtomicBool) {
    let mut held: Option<(u64, String)> = None;
    let mut cursor: Option<String> = None;
    while !stop.load(Ordering::SeqCst) {
        let query = match (&cursor, &held) {
            (Some(c), _) => format!("since=0&cursor={c}&wait=2&proxy_id=observer"),
            (None, Some((v, store))) => {
                format!("since={v}&store_id={store}&wait=2&proxy_id=observer")
            }
            (None, None) => "since=0&wait=2&proxy_id=observer".to_string(),
        };
        let r = match api.sync(&query) {
            Ok(r) if r.status == 200 => r.json(),
            other => {
                seen.lock()
                    .unwrap()
                    .violations
                    .push(format!("GET /v1/sync?{query}: {other:?}"));
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let mut s = seen.lock().unwrap();
        s.polls += 1;
        let initial = held.is_none();
        let snapshot = r["snapshot"].as_bool().expect("snapshot");
        let version = r["version"].as_u64().expect("version");
        let store = r["store_id"].as_str().expect("store_id").to_string();
        if !initial && snapshot {
            s.violations.push(format!(
                "a snapshot at version {version} for a client holding {held:?}: it resends \
                 everything and can move the client back"
            ));
        }
        let mut previous_in_answer = 0;
        for rec in r["changes"].as_array().expect("changes") {
            let rec = Record::from_sync(rec);
            if !initial {
                s.changes += 1;
                let since = held.as_ref().map_or(0, |h| h.0);
                if !snapshot && (rec.version <= since || rec.version <= previous_in_answer) {
                    s.violations.push(format!(
                        "changes after {since} carried {} at version {} (after {previous_in_answer})",
                        rec.id, rec.version
                    ));
                }
                previous_in_answer = rec.version;
                let old = s.latest.get(&rec.id).map_or(0, |o| o.version);
                if rec.version <= old {
                    s.violations.push(format!(
                        "{} arrived at version {} while version {old} was already held",
                        rec.id, rec.version
                    ));
                }
            }
            let newer = s
                .latest
                .get(&rec.id)
                .is_none_or(|old| rec.version > old.version);
            if newer {
                s.latest.insert(rec.id.clone(), rec);
            }
        }
        if let Some(c) = r["next_cursor"].as_str() {
            cursor = Some(c.to_string());
            continue;
        }
        cursor = None;
        if let Some((v, old_store)) = &held {
            if version < *v {
                s.violations
                    .push(format!("the sync version went back from {v} to {version}"));
            }
            if store != *old_store {
                s.violations
                    .push(format!("store id changed from {old_store} to {store}"));
            }
        }
        s.held = Some(version);
        held = Some((version, store));
    }
}

/// A change a client saw acknowledged: the token, and its version (`None` for a revoke,
/// which answers 204 without the record).
type Ack = (String, Option<u64>);

/// One API client: random changes on the shared tokens. Returns its acknowledged changes
/// and the ids it got 404 for (must be revoked by then).
fn client(
    api: &Api,
    tokens: &Mutex<Vec<(String, String)>>,
    seed: u64,
    n: u64,
    ops: u64,
) -> (Vec<Ack>, Vec<String>) {
    let mut rng = Rng(seed);
    let mut acks = vec![];
    let mut gone = vec![];
    for i in 0..ops {
        let label = format!("c{n}-{i}");
        if rng.chance(5) {
            let mut body = json!({ "name": label });
            if rng.chance(50) {
                body["max_rps"] = json!(rng.range(5, 200));
            }
            let r = api
                .call("POST", "/v1/tokens", Some(&body))
                .unwrap_or_else(|e| panic!("create: {e}"));
            assert_eq!(r.status, 201, "create: {}", r.body);
            let v = r.json();
            let rec = Record::from_api(&v);
            tokens.lock().unwrap().push((
                rec.id.clone(),
                v["token"].as_str().expect("token").to_string(),
            ));
            acks.push((rec.id, Some(rec.version)));
            continue;
        }
        let id = {
            let t = tokens.lock().unwrap();
            t[rng.range(0, t.len() as u64) as usize].0.clone()
        };
        let (method, path, body) = match rng.range(0, 100) {
            0..=29 => ("POST", format!("/v1/tokens/{id}/suspend"), None),
            30..=59 => ("POST", format!("/v1/tokens/{id}/reactivate"), None),
            60..=79 => {
                let m = if rng.chance(20) {
                    Value::Null
                } else {
                    json!(rng.range(5, 200))
                };
                (
                    "PATCH",
                    format!("/v1/tokens/{id}"),
                    Some(json!({ "max_rps": m })),
                )
            }
            80..=96 => (
                "PATCH",
                format!("/v1/tokens/{id}"),
                Some(json!({ "name": label })),
            ),
            _ => ("DELETE", format!("/v1/tokens/{id}"), None),
        };
        let r = api
            .call(method, &path, body.as_ref())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        match r.status {
            200 => acks.push((id, Some(Record::from_api(&r.json()).version))),
            204 => acks.push((id, None)),
            // 409 `already_revoked` answers a second revoke.
            404 | 409 if method == "DELETE" || r.status == 404 => gone.push(id),
            s => panic!("{method} {path} {body:?}: {s} {}", r.body),
        }
    }
    (acks, gone)
}

#[test]
fn concurrent_changes_reach_the_filter_once_and_in_order() {
    const TOKENS: usize = 20;
    let _serial = serial();
    let started = Instant::now();
    let clients = env_number("TOKENGATE_CLIENTS", 8);
    let ops = env_number("TOKENGATE_OPS", 40);
    let seed = seed();
    println!("concurrency: seed {seed}, {clients} clients x {ops} changes on {TOKENS} tokens");
    let stack = paged_stack("");
    let api = Api::of(&stack);
    let mut initial = vec![];
    for i in 0..TOKENS {
        let body = if i % 4 == 0 {
            json!({ "name": format!("shared-{i}"), "max_rps": 50 })
        } else {
            json!({ "name": format!("shared-{i}") })
        };
        initial.push(stack.create_token(body));
    }
    stack.wait_for_status(&initial[TOKENS - 1].1, 200, STATE_LOAD);
    let tokens = Arc::new(Mutex::new(initial));

    let seen = Arc::new(Mutex::new(Observed::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let observer = {
        let (api, seen, stop) = (api.clone(), seen.clone(), stop.clone());
        thread::spawn(move || observe(&api, &seen, &stop))
    };
    wait_until(STATE_LOAD, "the observer's first snapshot", || {
        seen.lock().unwrap().held.is_some()
    });

    let threads: Vec<_> = (0..clients)
        .map(|n| {
            let (api, tokens) = (api.clone(), tokens.clone());
            let seed = seed.wrapping_add(n.wrapping_mul(0x9E37_79B9));
            thread::spawn(move || client(&api, &tokens, seed, n, ops))
        })
        .collect();
    let mut acks = vec![];
    let mut gone = vec![];
    for c in threads {
        let (a, g) = c.join().expect("client thread");
        acks.extend(a);
        gone.extend(g);
    }
    let writes_done = started.elapsed();

    // The database, read without the change signal: the newest record's version.
    let (snapshot_version, db) = api.snapshot();
    let db_version = db.values().map(|r| r.version).max().unwrap_or(0);
    assert_eq!(
        snapshot_version, db_version,
        "with no write in flight, a snapshot's version must be the newest record's"
    );
    let caught_up = try_wait_until(PROPAGATION, || {
        seen.lock().unwrap().held == Some(db_version)
    });
    stop.store(true, Ordering::SeqCst);
    observer.join().expect("observer thread");
    let seen = seen.lock().unwrap();
    assert!(
        seen.violations.is_empty(),
        "{} violations in the sync stream; the first ones: {:#?}",
        seen.violations.len(),
        &seen.violations[..seen.violations.len().min(30)]
    );
    assert!(
        caught_up.is_some(),
        "the observer holds {:?}, the database is at {db_version}",
        seen.held
    );

    // The observer's view equals the database, token by token.
    let tokens = tokens.lock().unwrap();
    let mut expect = vec![];
    for (id, secret) in tokens.iter() {
        let obs = seen
            .latest
            .get(id)
            .unwrap_or_else(|| panic!("the observer never saw {id}"));
        let rec = &db[id];
        match api.get(id) {
            Some(got) => {
                assert_eq!(got.state, obs.state, "{id}: observer and database differ");
                assert_eq!(
                    got.version, obs.version,
                    "{id}: observer and database differ"
                );
            }
            None => assert_eq!(obs.state.status, "revoked", "{id} answers 404"),
        }
        assert_eq!(rec.version, obs.version, "{id}: observer and sync differ");
        expect.push((id.clone(), secret.clone(), obs.state.status.clone()));
    }
    assert_eq!(
        seen.latest.len(),
        tokens.len(),
        "the observer saw tokens nobody created"
    );
    // No acknowledged change was skipped.
    for (id, version) in &acks {
        let obs = &seen.latest[id];
        match version {
            Some(v) => assert!(
                obs.version >= *v,
                "{id} was acknowledged at version {v}; the observer's newest is {}",
                obs.version
            ),
            None => assert_eq!(obs.state.status, "revoked", "{id} was revoked"),
        }
    }
    for id in &gone {
        assert_eq!(seen.latest[id].state.status, "revoked", "{id} answered 404");
    }
    assert_envoy_serves(&stack, db_version, &expect);
    println!(
        "concurrency: {} acknowledged changes ({} refused as revoked) by {clients} clients in \
         {writes_done:.1?}; observer: {} polls, {} records after its first snapshot; {} \
         tokens; final version {db_version}; {:.1?} in all",
        acks.len(),
        gone.len(),
        seen.polls,
        seen.changes,
        tokens.len(),
        started.elapsed()
    );
}
