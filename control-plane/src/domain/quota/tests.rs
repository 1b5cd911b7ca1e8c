use super::*;
use proptest::prelude::*;

const PERIOD: (i64, i64) = (1_800_000_000, 1_800_003_600);
const HASH: &str = "aa";
const OLD: &str = "bb";

fn live(proxies: &[&str]) -> BTreeMap<String, u32> {
    proxies.iter().map(|p| (p.to_string(), 1_000)).collect()
}

fn valid(hashes: &[&str]) -> BTreeSet<String> {
    hashes.iter().map(|h| h.to_string()).collect()
}

fn held(hash: &str, spent: u64, allowed: u64) -> QuotaHeld {
    QuotaHeld {
        hash: hash.into(),
        period_start: PERIOD.0,
        spent,
        allowed,
    }
}

struct Exchange {
    limit: u64,
    live: BTreeMap<String, u32>,
    valid: BTreeSet<String>,
    holders: Vec<QuotaHolder>,
}

impl Exchange {
    fn report(&self, proxy: &str, reported: &[QuotaHeld], now_ms: i64) -> TokenOutcome {
        decide(&TokenInput {
            token_id: "tok_1",
            limit: self.limit,
            period: PERIOD,
            current_hash: HASH,
            valid_hashes: &self.valid,
            holders: &self.holders,
            live: &self.live,
            proxy,
            interval_ms: 1_000,
            reported,
            now_ms,
        })
    }
}

/// Replaces a proxy's rows by the outcome's.
fn apply(rows: &mut Vec<QuotaHolder>, out: &TokenOutcome) {
    for r in &out.rows {
        rows.retain(|h| !(h.proxy_id == r.proxy_id && h.hash == r.hash));
        rows.push(r.clone());
    }
}

fn granted(out: &TokenOutcome, hash: &str) -> u64 {
    out.rows.iter().find(|r| r.hash == hash).unwrap().granted
}

fn reserved(rows: &[QuotaHolder], valid: &BTreeSet<String>) -> u64 {
    rows.iter().map(|h| reservation(h, valid)).sum()
}

const T0: i64 = PERIOD.0 * 1_000 + 10_000;

#[test]
fn floors_and_fallbacks() {
    assert_eq!(fallback(1_000, 3), 334);
    assert_eq!(fallback(1_000, 0), 1_000);
    assert_eq!(floor(1_000, 3), 3);
    assert_eq!(floor(10, 3), 1);
    assert_eq!(water_fill(10, &[2, 100, 100]), [2, 4, 4]);
    assert_eq!(water_fill(100, &[2, 3]), [2, 3]);
    assert_eq!(water_fill(1, &[5, 5, 5]), [0, 0, 1]);
}

#[test]
fn a_busy_proxy_grows_while_the_others_are_counted_at_the_fallback_then_at_their_floors() {
    let mut rows = vec![];
    let valid = valid(&[HASH]);
    let ex = |rows: &[QuotaHolder]| Exchange {
        limit: 3_000,
        live: live(&["a", "b", "c"]),
        valid: valid.clone(),
        holders: rows.to_vec(),
    };
    // a spent 500 of its fallback (1000) in its first second: it keeps to what b and c
    // (at their fallback, 1000 each) leave it.
    let out = ex(&rows).report("a", &[held(HASH, 500, 1_000)], T0);
    assert_eq!(granted(&out, HASH), 1_000);
    assert!(!out.exhausted);
    apply(&mut rows, &out);
    // b and c report nothing: each gets an explicit small ceiling.
    for p in ["b", "c"] {
        let out = ex(&rows).report(p, &[], T0 + 100);
        let g = granted(&out, HASH);
        assert!(g < 1_000, "{p}: {g}");
        assert_eq!(
            out.rows[0].held, 1_000,
            "counted at the fallback until it confirms"
        );
        apply(&mut rows, &out);
    }
    assert!(reserved(&rows, &valid) <= 3_000);
    // They confirm their floor.
    for p in ["b", "c"] {
        let g = rows.iter().find(|h| h.proxy_id == p).unwrap().granted;
        let out = ex(&rows).report(p, &[held(HASH, 0, g)], T0 + 1_000);
        apply(&mut rows, &out);
    }
    // Now a gets what its rate asks, ahead by several intervals, within the limit.
    let out = ex(&rows).report("a", &[held(HASH, 1_000, 1_000)], T0 + 1_000);
    let g = granted(&out, HASH);
    assert!(g > 2_500, "{g}");
    apply(&mut rows, &out);
    assert!(reserved(&rows, &valid) <= 3_000);
}

#[test]
fn an_idle_holder_is_lowered_toward_the_floor_and_counts_high_until_it_confirms() {
    let valid = valid(&[HASH]);
    let mut rows = vec![];
    let ex = |rows: &[QuotaHolder]| Exchange {
        limit: 10_000,
        live: live(&["a", "b"]),
        valid: valid.clone(),
        holders: rows.to_vec(),
    };
    // b was busy and holds 6000; it has spent 2000 and stops spending.
    let out = ex(&rows).report("b", &[held(HASH, 2_000, 5_000)], T0);
    apply(&mut rows, &out);
    let mut t = T0;
    let mut last = u64::MAX;
    for _ in 0..8 {
        t += 1_000;
        let g = rows.iter().find(|h| h.proxy_id == "b").unwrap().granted;
        let out = ex(&rows).report("b", &[held(HASH, 2_000, g)], t);
        let now = granted(&out, HASH);
        assert!(now <= last.max(g));
        last = now;
        apply(&mut rows, &out);
    }
    assert!(last <= 2_000 + floor(10_000, 2) * 2, "{last}");
    // Lowered but not confirmed (the answer lost): still counted at what it holds.
    let b = rows.iter().find(|h| h.proxy_id == "b").unwrap().clone();
    let mut unconfirmed = b.clone();
    unconfirmed.held = 5_000;
    assert_eq!(reservation(&unconfirmed, &valid), 5_000);
}

#[test]
fn a_lost_answer_keeps_counting_the_higher_ceiling() {
    let valid = valid(&[HASH]);
    let mut rows = vec![];
    let ex = |rows: &[QuotaHolder]| Exchange {
        limit: 1_000,
        live: live(&["a", "b"]),
        valid: valid.clone(),
        holders: rows.to_vec(),
    };
    // a is raised to g; the answer is lost, so it reports its old ceiling again.
    let out = ex(&rows).report("a", &[held(HASH, 500, 500)], T0);
    let g = granted(&out, HASH);
    apply(&mut rows, &out);
    let out = ex(&rows).report("a", &[held(HASH, 500, 500)], T0 + 1_000);
    apply(&mut rows, &out);
    // Meanwhile b asks: a counts at what it was granted or holds, whichever is higher.
    let out = ex(&rows).report("b", &[held(HASH, 0, 500)], T0 + 1_100);
    let a = rows.iter().find(|h| h.proxy_id == "a").unwrap();
    assert!(granted(&out, HASH) + a.granted.max(a.held) <= 1_000);
    assert!(g >= 500);
}

#[test]
fn a_proxy_that_starts_over_keeps_what_it_spent() {
    let valid = valid(&[HASH]);
    let mut rows = vec![];
    let ex = |rows: &[QuotaHolder]| Exchange {
        limit: 1_000,
        live: live(&["a"]),
        valid: valid.clone(),
        holders: rows.to_vec(),
    };
    let out = ex(&rows).report("a", &[held(HASH, 600, 1_000)], T0);
    apply(&mut rows, &out);
    // Restarted: its count is 0 again, the 600 still count.
    let out = ex(&rows).report("a", &[held(HASH, 0, 1_000)], T0 + 1_000);
    assert_eq!(out.used, 600);
    assert_eq!(out.rows[0].carried, 600);
    assert!(granted(&out, HASH) <= 400);
}

#[test]
fn rotation_counts_both_secrets_and_a_dropped_one_at_what_it_spent() {
    let both = valid(&[HASH, OLD]);
    let mut rows = vec![];
    let ex = |rows: &[QuotaHolder], valid: &BTreeSet<String>| {
        decide(&TokenInput {
            token_id: "tok_1",
            limit: 1_000,
            period: PERIOD,
            current_hash: HASH,
            valid_hashes: valid,
            holders: rows,
            live: &live(&["a"]),
            proxy: "a",
            interval_ms: 1_000,
            reported: &[held(OLD, 300, 900), held(HASH, 100, 100)],
            now_ms: T0,
        })
    };
    let out = ex(&rows, &both);
    assert_eq!(out.used, 400);
    let total: u64 = out.rows.iter().map(|h| h.granted.max(h.held)).sum();
    assert!(total <= 1_000, "{total}");
    apply(&mut rows, &out);
    // The old secret's grace is over: it admits no more, and counts at what it spent.
    let only = valid(&[HASH]);
    let out = ex(&rows, &only);
    assert_eq!(granted(&out, OLD), 300);
    let old = out.rows.iter().find(|h| h.hash == OLD).unwrap();
    assert_eq!(reservation(old, &only), 300);
    assert!(granted(&out, HASH) > 100);
}

#[test]
fn exhaustion_when_spent_or_when_nothing_is_free() {
    let valid = valid(&[HASH]);
    let ex = |rows: &[QuotaHolder], live_: &[&str]| Exchange {
        limit: 100,
        live: live(live_),
        valid: valid.clone(),
        holders: rows.to_vec(),
    };
    let out = ex(&[], &["a"]).report("a", &[held(HASH, 100, 100)], T0);
    assert!(out.exhausted);
    assert_eq!(granted(&out, HASH), 100);
    // a spent all it holds, b holds the rest: nothing to give a.
    let mut rows = vec![];
    let out = ex(&rows, &["a", "b"]).report("b", &[held(HASH, 10, 60)], T0);
    apply(&mut rows, &out);
    let out = ex(&rows, &["a", "b"]).report("a", &[held(HASH, 40, 40)], T0 + 10);
    assert!(out.exhausted);
    // Not at its ceiling: not exhausted.
    let out = ex(&rows, &["a", "b"]).report("a", &[held(HASH, 10, 40)], T0 + 10);
    assert!(!out.exhausted);
}

#[test]
fn a_new_period_starts_from_the_fallbacks() {
    // Rows of the last period are not the caller's to pass; with none, every live proxy
    // counts at the fallback and the reporter keeps to its own.
    let valid = valid(&[HASH]);
    let out = Exchange {
        limit: 900,
        live: live(&["a", "b", "c"]),
        valid,
        holders: vec![],
    }
    .report("a", &[held(HASH, 50, 300)], T0);
    // b and c hold 300 each: a keeps to the rest, and to what its rate asks for.
    let g = granted(&out, HASH);
    assert!((250..=300).contains(&g), "{g}");
}

#[test]
fn hostile_counts_neither_overflow_nor_take_the_others_room() {
    let valid = valid(&[HASH]);
    let mut rows = vec![];
    let ex = |rows: &[QuotaHolder]| Exchange {
        limit: tokengate_wire::quota::MAX_LIMIT,
        live: live(&["a", "b"]),
        valid: valid.clone(),
        holders: rows.to_vec(),
    };
    let out = ex(&rows).report("a", &[held(HASH, u64::MAX, u64::MAX)], T0);
    assert!(out.exhausted);
    apply(&mut rows, &out);
    let out = ex(&rows).report("b", &[held(HASH, 0, 0)], T0 + 1);
    assert_eq!(granted(&out, HASH), 0);
}

/// A proxy as the filter keeps a secret's quota: nothing until its first request or
/// grant, then its count and ceiling.
#[derive(Debug, Clone, Default)]
struct Sim {
    state: Option<(u64, u64)>,
}

#[derive(Debug, Clone)]
enum Step {
    Admit(usize, u64),
    Report(usize, bool),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..3usize, 0..400u64).prop_map(|(p, n)| Step::Admit(p, n)),
        (0..3usize, any::<bool>()).prop_map(|(p, lost)| Step::Report(p, lost)),
    ]
}

proptest! {
    /// The ceilings the proxies enforce (what they were granted, or the fallback before a
    /// first grant) never add up to more than the limit, whatever answers are lost, and
    /// the proxies never admit more than the limit between them.
    #[test]
    fn the_ceilings_stay_within_the_limit(
        limit in 1u64..5_000,
        steps in proptest::collection::vec(step(), 1..120),
    ) {
        let names = ["a", "b", "c"];
        let valid = valid(&[HASH]);
        let live = live(&names);
        let per_proxy = limit / names.len() as u64;
        let mut proxies = vec![Sim::default(); names.len()];
        let mut rows: Vec<QuotaHolder> = vec![];
        let mut now = T0;
        for s in steps {
            now += 137;
            match s {
                Step::Admit(p, n) => {
                    let (spent, allowed) = proxies[p].state.get_or_insert((0, per_proxy));
                    *spent += n.min(allowed.saturating_sub(*spent));
                }
                Step::Report(p, lost) => {
                    let reported: Vec<QuotaHeld> = proxies[p]
                        .state
                        .iter()
                        .map(|(spent, allowed)| held(HASH, *spent, *allowed))
                        .collect();
                    let out = decide(&TokenInput {
                        token_id: "tok_1",
                        limit,
                        period: PERIOD,
                        current_hash: HASH,
                        valid_hashes: &valid,
                        holders: &rows,
                        live: &live,
                        proxy: names[p],
                        interval_ms: 1_000,
                        reported: &reported,
                        now_ms: now,
                    });
                    apply(&mut rows, &out);
                    if !lost {
                        let g = granted(&out, HASH);
                        let spent = proxies[p].state.map_or(0, |s| s.0);
                        proxies[p].state = Some((spent, g));
                    }
                }
            }
            let ceilings: u64 = proxies
                .iter()
                .map(|s| s.state.map_or(per_proxy, |(spent, allowed)| spent.max(allowed)))
                .sum();
            prop_assert!(ceilings <= limit, "ceilings {} > {}", ceilings, limit);
            prop_assert!(reserved(&rows, &valid) <= limit + names.len() as u64 * fallback(limit, 3));
        }
    }
}
