//! Human-readable output: records as `key: value` lines, lists as aligned tables.

use serde_json::Value;

fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn or(v: &Value, absent: &str) -> String {
    if v.is_null() {
        absent.to_string()
    } else {
        text(v)
    }
}

/// The status as shown: an expired token is `expired`, whatever its stored status.
fn status(r: &Value) -> String {
    if r["expired"] == Value::Bool(true) {
        "expired".to_string()
    } else {
        text(&r["status"])
    }
}

/// A word a POSIX shell reads back as `v`.
pub fn shell_quote(v: &str) -> String {
    let plain = !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:@%+=,".contains(&b));
    if plain {
        v.to_string()
    } else {
        format!("'{}'", v.replace('\'', "'\\''"))
    }
}

pub fn record(r: &Value) -> String {
    let rows = [
        ("id", text(&r["id"])),
        ("name", text(&r["name"])),
        ("kind", text(&r["kind"])),
        ("owner", text(&r["owner"])),
        ("status", status(r)),
        ("max_rps", or(&r["max_rps"], "unlimited")),
        (
            "burst",
            or(
                &r["burst"],
                if r["max_rps"].is_null() {
                    "-"
                } else {
                    "one second's worth"
                },
            ),
        ),
        (
            "limit_scope",
            if r["max_rps"].is_null() {
                "-".to_string()
            } else {
                or(&r["limit_scope"], "fleet")
            },
        ),
        ("expires_at", or(&r["expires_at"], "never")),
        ("created_at", text(&r["created_at"])),
        ("last_used_at", or(&r["last_used_at"], "-")),
        ("requests", requests(r)),
        ("quota", quota(r)),
        ("rotated_at", or(&r["rotated_at"], "-")),
        ("scopes", scopes(&r["scopes"])),
    ];
    let mut out: String = rows.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
    if let Some(t) = r["old_secret_valid_until"].as_str() {
        out.push_str(&format!("old_secret_valid_until: {t}\n"));
    }
    if r["fleet"].is_object() {
        out.push_str(&fleet(r));
    }
    out
}

/// The live fleet view of a fleet-limited token: the total against the limit, then each
/// proxy's demand and share.
fn fleet(r: &Value) -> String {
    let f = &r["fleet"];
    let num = |v: &Value| v.as_f64().unwrap_or(0.0);
    let mut out = format!(
        "fleet: {} proxies live, {} saw the token; admitted {:.1}/s of {} (refused {:.1}/s)\n",
        or(&f["proxies_live"], "0"),
        or(&f["proxies_seen"], "0"),
        num(&f["admitted_rps"]),
        text(&r["max_rps"]),
        num(&f["refused_rps"]),
    );
    let shares = f["shares"].as_array().cloned().unwrap_or_default();
    if shares.is_empty() {
        return out;
    }
    let mut rows = vec![vec![
        "  proxy".to_string(),
        "admitted/s".to_string(),
        "refused/s".to_string(),
        "share/s".to_string(),
        "burst".to_string(),
    ]];
    for s in &shares {
        rows.push(vec![
            format!("  {}", text(&s["proxy_id"])),
            format!("{:.1}", num(&s["admitted_rps"])),
            format!("{:.1}", num(&s["refused_rps"])),
            format!("{:.3}", num(&s["share_rps"])),
            or(&s["share_burst"], "-"),
        ]);
    }
    out.push_str(&columns(rows));
    out
}

/// A token's scopes: `unrestricted` (null), `none` (`[]`), or the names.
fn scopes(v: &Value) -> String {
    match v.as_array() {
        None => "unrestricted".to_string(),
        Some(a) if a.is_empty() => "none (every request refused)".to_string(),
        Some(a) => a.iter().map(text).collect::<Vec<_>>().join(", "),
    }
}

/// A quota and what is left of it: `250 of 1000 per day left, resets 2030-01-02T00:00:00Z`.
fn quota(r: &Value) -> String {
    let (q, u) = (&r["quota"], &r["quota_usage"]);
    if q.is_null() {
        return "-".into();
    }
    format!(
        "{} of {} per {} left, resets {}",
        or(&u["remaining"], "?"),
        text(&q["limit"]),
        text(&q["period"]),
        or(&u["resets_at"], "?")
    )
}

/// A quota's remaining requests and reset, in a table cell.
fn quota_cell(t: &Value) -> String {
    let u = &t["quota_usage"];
    if u.is_null() {
        return "-".into();
    }
    format!(
        "{}/{} until {}",
        or(&u["remaining"], "?"),
        text(&t["quota"]["limit"]),
        or(&u["resets_at"], "?")
    )
}

fn requests(r: &Value) -> String {
    format!(
        "{} allowed, {} denied",
        or(&r["requests_allowed"], "0"),
        or(&r["requests_denied"], "0")
    )
}

/// Aligned columns, the first row being the header.
pub fn columns(rows: Vec<Vec<String>>) -> String {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

pub fn audit_table(entries: &[Value]) -> String {
    if entries.is_empty() {
        return "(no entries)\n".to_string();
    }
    let header = ["AT", "ACTOR", "ACTION", "TOKEN", "NAME", "CHANGE"].map(String::from);
    let mut rows = vec![header.to_vec()];
    for e in entries {
        let change = match (&e["before"], &e["after"]) {
            (Value::Object(b), Value::Object(a)) if !b.is_empty() => a
                .iter()
                .map(|(k, v)| format!("{k}: {} -> {}", or(&b[k], "null"), or(v, "null")))
                .collect::<Vec<_>>()
                .join(", "),
            (_, Value::Null) => "purged".to_string(),
            (_, a) => text(a),
        };
        rows.push(vec![
            text(&e["at"]),
            text(&e["actor"]),
            text(&e["action"]),
            text(&e["token_id"]),
            e["scope"]
                .as_str()
                .map_or_else(|| text(&e["token_name"]), |s| format!("scope {s}")),
            change,
        ]);
    }
    columns(rows)
}

pub fn table(tokens: &[Value]) -> String {
    if tokens.is_empty() {
        return "(no tokens)\n".to_string();
    }
    let header = [
        "ID",
        "NAME",
        "KIND",
        "OWNER",
        "STATUS",
        "MAX_RPS",
        "EXPIRES",
        "LAST_USED",
        "QUOTA_LEFT",
        "ALLOWED",
        "DENIED",
    ]
    .map(String::from);
    let mut rows = vec![header.to_vec()];
    for t in tokens {
        rows.push(vec![
            text(&t["id"]),
            text(&t["name"]),
            text(&t["kind"]),
            text(&t["owner"]),
            status(t),
            or(&t["max_rps"], "-"),
            or(&t["expires_at"], "never"),
            or(&t["last_used_at"], "-"),
            quota_cell(t),
            or(&t["requests_allowed"], "0"),
            or(&t["requests_denied"], "0"),
        ]);
    }
    columns(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_quota_shows_what_is_left_and_when_it_resets() {
        let r = json!({"quota": {"limit": 1000, "period": "day"},
            "quota_usage": {"used": 750, "remaining": 250, "resets_at": "2030-01-02T00:00:00Z"}});
        assert_eq!(
            quota(&r),
            "250 of 1000 per day left, resets 2030-01-02T00:00:00Z"
        );
        assert_eq!(quota_cell(&r), "250/1000 until 2030-01-02T00:00:00Z");
        assert_eq!(quota(&json!({"quota": null})), "-");
        assert!(record(&r).contains("quota: 250 of 1000"));
    }

    #[test]
    fn table_aligns_and_marks_unlimited() {
        let t = table(&[
            json!({"id":"tok_a","name":"short","kind":"user","owner":"al","status":"active","max_rps":null,"expires_at":null}),
            json!({"id":"tok_bb","name":"a longer name","kind":"service","owner":"team","status":"suspended","max_rps":5,"expires_at":"2030-01-01T00:00:00Z"}),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ID      NAME"));
        let col = lines[0].find("MAX_RPS").unwrap();
        assert_eq!(&lines[1][col..col + 1], "-");
        assert_eq!(&lines[2][col..col + 1], "5");
        assert!(lines[0].ends_with("ALLOWED  DENIED"), "{}", lines[0]);
        assert!(lines[1].ends_with("0        0"), "{}", lines[1]);
        let exp = lines[0].find("EXPIRES").unwrap();
        assert_eq!(&lines[1][exp..exp + 5], "never");
        assert_eq!(table(&[]), "(no tokens)\n");
    }

    #[test]
    fn audit_rows_show_what_moved() {
        let t = audit_table(&[
            json!({"at":"2026-01-01T00:00:00Z","actor":"ops","action":"token.suspended","token_id":"tok_a","token_name":"n","before":{"status":"active"},"after":{"status":"suspended"}}),
            json!({"at":"2026-01-01T00:00:00Z","actor":"system","action":"token.purged","token_id":"tok_b","token_name":"m","before":{"status":"revoked"},"after":null}),
        ]);
        assert!(t.contains("status: active -> suspended"), "{t}");
        assert!(t.lines().nth(2).unwrap().ends_with("purged"), "{t}");
    }

    #[test]
    fn expired_tokens_show_as_expired() {
        let t = json!({"id":"tok_a","name":"n","kind":"user","owner":"o","status":"suspended","expired":true});
        assert!(record(&t).contains("status: expired\n"));
        assert!(table(&[t]).lines().nth(1).unwrap().contains(" expired "));
        let t = json!({"id":"tok_a","status":"active","expired":false});
        assert!(record(&t).contains("status: active\n"));
    }

    #[test]
    fn shell_words_are_quoted_when_needed() {
        assert_eq!(shell_quote("tok_Ab-1"), "tok_Ab-1");
        assert_eq!(shell_quote("data eng"), "'data eng'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn record_lines() {
        let r = record(
            &json!({"id":"tok_a","name":"n","kind":"user","owner":"o","status":"active","max_rps":null,"expires_at":null,"created_at":"2026-01-01T00:00:00Z"}),
        );
        assert!(r.contains("max_rps: unlimited\n"));
        assert!(r.contains("expires_at: never\n"));
    }
}
