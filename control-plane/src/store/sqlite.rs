//! SQLite store: WAL with `synchronous=FULL`, so a write is on disk before it is answered.
//! Every change and its audit entry commit in one transaction.

use super::audit::{self, AuditEntry, AuditQuery};
use super::{
    Change, Delivery, DeliveryOutcome, Edit, ListQuery, Status, Store, StoreError, TokenRow,
    Warning, WebhookEvent,
};
use rand::distributions::{Alphanumeric, DistString};
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};
use serde_json::Value;
use std::path::Path;
use std::sync::Mutex;
use tokengate_wire::UsageEntry;
use tokio::sync::watch;

/// Each entry upgrades the schema by one `PRAGMA user_version`; never edit a shipped one.
const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        owner TEXT NOT NULL,
        status TEXT NOT NULL,
        max_rps INTEGER,
        burst INTEGER,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        expires_at INTEGER,
        last_used_at INTEGER,
        version INTEGER NOT NULL
    );
    CREATE INDEX tokens_by_version ON tokens(version);
    "#,
    r#"
    ALTER TABLE tokens ADD COLUMN requests_allowed INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tokens ADD COLUMN requests_denied INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tokens ADD COLUMN rotated_at INTEGER;
    ALTER TABLE tokens ADD COLUMN retired TEXT NOT NULL DEFAULT '[]';
    CREATE INDEX tokens_by_expiry ON tokens(expires_at);
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        token_id TEXT NOT NULL,
        token_name TEXT NOT NULL,
        before TEXT,
        after TEXT
    );
    CREATE INDEX audit_by_token ON audit(token_id, seq);
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
    CREATE TABLE expiry_warnings (
        token_id TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        lead INTEGER NOT NULL,
        issued_at INTEGER NOT NULL,
        PRIMARY KEY (token_id, expires_at, lead)
    );
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL UNIQUE,
        event_type TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL,
        delivered_at INTEGER,
        failed_at INTEGER,
        last_error TEXT
    );
    CREATE INDEX outbox_due ON outbox(next_attempt_at)
        WHERE delivered_at IS NULL AND failed_at IS NULL;
    "#,
    // Creation order for newest-first listings; rowid is not stable across VACUUM.
    r#"
    ALTER TABLE tokens ADD COLUMN created_seq INTEGER;
    UPDATE tokens SET created_seq = rowid;
    CREATE INDEX tokens_by_created_seq ON tokens(created_seq);
    "#,
];

const COLUMNS: &str =
    "id, hash, name, kind, owner, status, max_rps, burst, created_at, updated_at, \
     expires_at, last_used_at, version, requests_allowed, requests_denied, rotated_at, retired";

/// Who the store names as the actor of its own jobs.
pub const SYSTEM: &str = "system";

pub struct SqliteStore {
    conn: Mutex<Connection>,
    store_id: String,
    changes: watch::Sender<u64>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn conversion(what: &str, v: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("bad {what} `{v}`").into(),
    )
}

fn from_row(r: &Row<'_>) -> rusqlite::Result<TokenRow> {
    let kind: String = r.get(3)?;
    let status: String = r.get(5)?;
    let retired: String = r.get(16)?;
    Ok(TokenRow {
        id: r.get(0)?,
        hash: r.get(1)?,
        name: r.get(2)?,
        kind: super::parse_kind(&kind).ok_or_else(|| conversion("kind", &kind))?,
        owner: r.get(4)?,
        status: Status::parse(&status).ok_or_else(|| conversion("status", &status))?,
        max_rps: r.get(6)?,
        burst: r.get(7)?,
        created_at: r.get(8)?,
        updated_at: r.get(9)?,
        expires_at: r.get(10)?,
        last_used_at: r.get(11)?,
        version: r.get::<_, i64>(12)? as u64,
        requests_allowed: r.get::<_, i64>(13)?.max(0) as u64,
        requests_denied: r.get::<_, i64>(14)?.max(0) as u64,
        rotated_at: r.get(15)?,
        retired: serde_json::from_str(&retired).map_err(|_| conversion("retired", &retired))?,
    })
}

fn json_column(v: Option<String>) -> Option<Value> {
    v.and_then(|s| serde_json::from_str(&s).ok())
}

fn audit_from_row(r: &Row<'_>) -> rusqlite::Result<AuditEntry> {
    Ok(AuditEntry {
        seq: r.get::<_, i64>(0)? as u64,
        at: r.get(1)?,
        actor: r.get(2)?,
        action: r.get(3)?,
        token_id: r.get(4)?,
        token_name: r.get(5)?,
        before: json_column(r.get(6)?),
        after: json_column(r.get(7)?),
    })
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let current: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

fn meta(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

fn set_meta(tx: &Transaction<'_>, key: &str, value: u64) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value.to_string()],
    )?;
    Ok(())
}

fn meta_number(conn: &Connection, key: &str) -> rusqlite::Result<u64> {
    Ok(meta(conn, key)?.and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// Takes the next version inside the caller's transaction.
fn next_version(tx: &Transaction<'_>) -> rusqlite::Result<u64> {
    let v = meta_number(tx, "version")? + 1;
    set_meta(tx, "version", v)?;
    Ok(v)
}

fn append_audit(
    tx: &Transaction<'_>,
    at: i64,
    change: Change<'_>,
    row: &TokenRow,
    before: Option<Value>,
    after: Option<Value>,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO audit (at, actor, action, token_id, token_name, before, after)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            at,
            change.actor,
            change.action,
            row.id,
            row.name,
            before.map(|v| v.to_string()),
            after.map(|v| v.to_string())
        ],
    )?;
    Ok(())
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let mut conn = Connection::open(path).map_err(backend)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(backend)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(backend)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(backend)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(backend)?;
        migrate(&mut conn).map_err(backend)?;
        let store_id = match meta(&conn, "store_id").map_err(backend)? {
            Some(id) => id,
            None => {
                let id = format!(
                    "st_{}",
                    Alphanumeric.sample_string(&mut rand::rngs::OsRng, 16)
                );
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('store_id', ?1)",
                    [&id],
                )
                .map_err(backend)?;
                id
            }
        };
        let version = meta_number(&conn, "version").map_err(backend)?;
        let (changes, _) = watch::channel(version);
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            store_id,
            changes,
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| StoreError::Backend("store lock poisoned".into()))?;
        f(&mut conn).map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, msg)
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                StoreError::Conflict(msg.unwrap_or_else(|| "constraint violation".into()))
            }
            e => backend(e),
        })
    }

    /// Call right after the commit, with the connection lock still held. A reader needs
    /// that lock, so none can see the new row before the signal (a long-poll would then
    /// hear of a version "newer than the store's" and answer a full snapshot at the older
    /// one); and writers signal in commit order, so the signalled version never goes back.
    fn publish(&self, version: u64) {
        self.changes.send_if_modified(|current| {
            let newer = version > *current;
            if newer {
                *current = version;
            }
            newer
        });
    }

    fn query(&self, sql: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Vec<TokenRow>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(sql)?;
            let rows = stmt
                .query_map(args, from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }
}

/// `upsert` is false for a new token: an id collision must fail, never overwrite. Usage
/// counters are never written here: they only ever grow through `record_usage`.
fn write_row(tx: &Transaction<'_>, r: &TokenRow, upsert: bool) -> rusqlite::Result<()> {
    let on_conflict = if upsert {
        "ON CONFLICT(id) DO UPDATE SET hash = excluded.hash, name = excluded.name,
             status = excluded.status, max_rps = excluded.max_rps, burst = excluded.burst,
             updated_at = excluded.updated_at, expires_at = excluded.expires_at,
             version = excluded.version, rotated_at = excluded.rotated_at,
             retired = excluded.retired"
    } else {
        ""
    };
    let sql = format!(
        "INSERT INTO tokens ({COLUMNS})
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)
         {on_conflict}"
    );
    let retired = serde_json::to_string(&r.retired)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    tx.execute(
        &sql,
        params![
            r.id,
            r.hash,
            r.name,
            r.kind.as_str(),
            r.owner,
            r.status.as_str(),
            r.max_rps,
            r.burst,
            r.created_at,
            r.updated_at,
            r.expires_at,
            r.last_used_at,
            r.version as i64,
            r.requests_allowed.min(i64::MAX as u64) as i64,
            r.requests_denied.min(i64::MAX as u64) as i64,
            r.rotated_at,
            retired
        ],
    )?;
    Ok(())
}

/// A row the admin API may see: a revoked one is a tombstone, kept for the filters.
fn live(row: Option<TokenRow>) -> Result<TokenRow, StoreError> {
    match row {
        None => Err(StoreError::NotFound),
        Some(r) if r.status == Status::Revoked => Err(StoreError::Revoked { at: r.updated_at }),
        Some(r) => Ok(r),
    }
}

/// Whether a change leaves out a secret hash that the row carried. A poller that has not
/// seen the row's previous version may hold that hash as valid and would never hear of it
/// again, so such a change raises the horizon, as a purge does.
fn drops_a_secret(before: &TokenRow, after: &TokenRow) -> bool {
    let kept = |h: &str| after.hash == h || after.retired.iter().any(|s| s.hash == h);
    !kept(&before.hash) || before.retired.iter().any(|s| !kept(&s.hash))
}

fn clamp(n: u64) -> i64 {
    n.min(i64::MAX as u64) as i64
}

impl Store for SqliteStore {
    fn store_id(&self) -> &str {
        &self.store_id
    }

    fn create(&self, mut row: TokenRow, change: Change<'_>) -> Result<TokenRow, StoreError> {
        let row = self.with(|c| {
            let tx = c.transaction()?;
            row.version = next_version(&tx)?;
            write_row(&tx, &row, false)?;
            tx.execute(
                "UPDATE tokens SET created_seq =
                   (SELECT COALESCE(MAX(created_seq), 0) + 1 FROM tokens) WHERE id = ?1",
                [&row.id],
            )?;
            let after = Value::Object(audit::fields(&row));
            append_audit(&tx, row.created_at, change, &row, None, Some(after))?;
            tx.commit()?;
            self.publish(row.version);
            Ok(row)
        })?;
        Ok(row)
    }

    fn get(&self, id: &str) -> Result<TokenRow, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM tokens WHERE id = ?1");
        live(self.query(&sql, &[&id])?.pop())
    }

    fn list(&self, q: &ListQuery) -> Result<Vec<TokenRow>, StoreError> {
        let order = if q.newest_first {
            "created_seq DESC"
        } else {
            "id"
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM tokens WHERE status != 'revoked'
               AND (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR owner = ?2)
               AND (?3 IS NULL OR kind = ?3) AND (?4 IS NULL OR id > ?4)
               AND (?5 IS NULL OR (expires_at > ?5 AND expires_at <= ?6))
               AND (?8 IS NULL OR instr(lower(name), lower(?8)) > 0)
               AND (?9 IS NULL OR created_seq < (SELECT created_seq FROM tokens WHERE id = ?9))
               AND (?10 IS NULL OR ?10 = (expires_at IS NOT NULL AND expires_at <= ?11))
             ORDER BY {order} LIMIT ?7"
        );
        let status = q.status.map(Status::as_str);
        let kind = q.kind.map(|k| k.as_str());
        let (from, to) = (q.expiring.map(|e| e.0), q.expiring.map(|e| e.1));
        let (expired, at) = (q.expired.map(|e| e.0), q.expired.map(|e| e.1));
        self.query(
            &sql,
            &[
                &status,
                &q.owner,
                &kind,
                &q.after,
                &from,
                &to,
                &q.limit,
                &q.name_contains,
                &q.before,
                &expired,
                &at,
            ],
        )
    }

    fn update(
        &self,
        id: &str,
        now: i64,
        change: Change<'_>,
        edit: Edit<'_>,
    ) -> Result<TokenRow, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM tokens WHERE id = ?1");
        let mut edit_error = None;
        let result = self.with(|c| {
            let tx = c.transaction()?;
            let mut row = match live(tx.query_row(&sql, [id], from_row).optional()?) {
                Ok(row) => row,
                Err(e) => {
                    edit_error = Some(e);
                    return Ok(None);
                }
            };
            let before = row.clone();
            match edit(&mut row) {
                Ok(false) => return Ok(Some(row)),
                Ok(true) => {}
                Err(e) => {
                    edit_error = Some(e);
                    return Ok(None);
                }
            }
            row.updated_at = now;
            row.version = next_version(&tx)?;
            if drops_a_secret(&before, &row) {
                let horizon = meta_number(&tx, "horizon")?.max(before.version);
                set_meta(&tx, "horizon", horizon)?;
            }
            write_row(&tx, &row, true)?;
            let (old, new) = audit::diff(&before, &row);
            append_audit(&tx, now, change, &row, Some(old), Some(new))?;
            tx.commit()?;
            self.publish(row.version);
            Ok(Some(row))
        })?;
        if let Some(e) = edit_error {
            return Err(e);
        }
        result.ok_or(StoreError::NotFound)
    }

    fn version(&self) -> Result<u64, StoreError> {
        self.with(|c| meta_number(c, "version"))
    }

    fn changes_since(&self, since: u64, limit: u32) -> Result<Vec<TokenRow>, StoreError> {
        let sql =
            format!("SELECT {COLUMNS} FROM tokens WHERE version > ?1 ORDER BY version LIMIT ?2");
        self.query(&sql, &[&(since as i64), &limit])
    }

    fn snapshot_page(
        &self,
        after_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<TokenRow>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM tokens WHERE (?1 IS NULL OR id > ?1) ORDER BY id LIMIT ?2"
        );
        self.query(&sql, &[&after_id, &limit])
    }

    fn live_count(&self) -> Result<u64, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT count(*) FROM tokens WHERE status != 'revoked'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
        })
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn horizon(&self) -> Result<u64, StoreError> {
        self.with(|c| meta_number(c, "horizon"))
    }

    fn record_usage(&self, now: i64, entries: &[UsageEntry]) -> Result<usize, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let mut matched = 0;
            {
                let mut stmt = tx.prepare_cached(
                    "UPDATE tokens SET
                         requests_allowed = min(requests_allowed + ?2, 9223372036854775807),
                         requests_denied = min(requests_denied + ?3, 9223372036854775807),
                         last_used_at = max(coalesce(last_used_at, 0), ?4)
                     WHERE id = ?1",
                )?;
                for e in entries {
                    let seen = e.last_used_at.min(now);
                    matched +=
                        stmt.execute(params![e.id, clamp(e.allowed), clamp(e.denied), seen])?;
                }
            }
            tx.commit()?;
            Ok(matched)
        })
    }

    fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT seq, at, actor, action, token_id, token_name, before, after FROM audit
                 WHERE (?1 IS NULL OR token_id = ?1) AND (?2 IS NULL OR actor = ?2)
                   AND (?3 IS NULL OR action = ?3) AND (?4 IS NULL OR at >= ?4)
                   AND (?5 IS NULL OR at < ?5) AND (?6 IS NULL OR seq < ?6)
                 ORDER BY seq DESC LIMIT ?7",
            )?;
            let before_seq = q.before_seq.map(clamp);
            let rows = stmt
                .query_map(
                    params![q.token_id, q.actor, q.action, q.since, q.until, before_seq, q.limit],
                    audit_from_row,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn purge(&self, now: i64, cutoff: i64) -> Result<Vec<TokenRow>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM tokens
             WHERE (status = 'revoked' AND updated_at <= ?1) OR expires_at <= ?1"
        );
        self.with(|c| {
            let tx = c.transaction()?;
            let rows = {
                let mut stmt = tx.prepare_cached(&sql)?;
                let rows = stmt
                    .query_map([cutoff], from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                rows
            };
            let change = Change {
                actor: SYSTEM,
                action: "token.purged",
            };
            let mut horizon = meta_number(&tx, "horizon")?;
            for r in &rows {
                let before = Value::Object(audit::fields(r));
                append_audit(&tx, now, change, r, Some(before), None)?;
                tx.execute("DELETE FROM tokens WHERE id = ?1", [&r.id])?;
                tx.execute("DELETE FROM expiry_warnings WHERE token_id = ?1", [&r.id])?;
                horizon = horizon.max(r.version);
            }
            set_meta(&tx, "horizon", horizon)?;
            tx.execute(
                "DELETE FROM outbox WHERE coalesce(delivered_at, failed_at) <= ?1",
                [cutoff],
            )?;
            tx.commit()?;
            Ok(rows)
        })
    }

    fn warn_expiring(
        &self,
        now: i64,
        leads: &[i64],
        webhook: WebhookEvent<'_>,
    ) -> Result<Vec<Warning>, StoreError> {
        let Some(&widest) = leads.iter().max() else {
            return Ok(vec![]);
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM tokens WHERE status != 'revoked'
               AND expires_at > ?1 AND expires_at <= ?2 ORDER BY id"
        );
        self.with(|c| {
            let tx = c.transaction()?;
            let rows = {
                let mut stmt = tx.prepare_cached(&sql)?;
                let rows = stmt
                    .query_map(params![now, now.saturating_add(widest)], from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                rows
            };
            let mut issued = vec![];
            for token in rows {
                let Some(expires_at) = token.expires_at else {
                    continue;
                };
                // Only the tightest lead that applies: a token created an hour before
                // expiry gets one warning, not one per lead time.
                let remaining = expires_at - now;
                let Some(lead) = leads.iter().copied().filter(|l| *l >= remaining).min() else {
                    continue;
                };
                let done: bool = tx.query_row(
                    "SELECT EXISTS (SELECT 1 FROM expiry_warnings
                         WHERE token_id = ?1 AND expires_at = ?2 AND lead <= ?3)",
                    params![token.id, expires_at, lead],
                    |r| r.get(0),
                )?;
                if done {
                    continue;
                }
                tx.execute(
                    "INSERT INTO expiry_warnings (token_id, expires_at, lead, issued_at)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![token.id, expires_at, lead, now],
                )?;
                let after = serde_json::json!({
                    "expires_at": audit::rfc3339(expires_at),
                    "warning_lead_seconds": lead,
                });
                let change = Change {
                    actor: SYSTEM,
                    action: "token.expiry_warning",
                };
                append_audit(&tx, now, change, &token, None, Some(after))?;
                let warning = Warning {
                    token,
                    lead_seconds: lead,
                };
                if let Some(make) = webhook {
                    let (event_id, event_type, payload) = make(&warning);
                    tx.execute(
                        "INSERT INTO outbox (event_id, event_type, payload, created_at, next_attempt_at)
                         VALUES (?1, ?2, ?3, ?4, ?4)",
                        params![event_id, event_type, payload, now],
                    )?;
                }
                issued.push(warning);
            }
            tx.commit()?;
            Ok(issued)
        })
    }

    fn due_deliveries(&self, now: i64, limit: u32) -> Result<Vec<Delivery>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, event_id, event_type, payload, attempts FROM outbox
                 WHERE delivered_at IS NULL AND failed_at IS NULL AND next_attempt_at <= ?1
                 ORDER BY id LIMIT ?2",
            )?;
            let rows = stmt
                .query_map(params![now, limit], |r| {
                    Ok(Delivery {
                        id: r.get(0)?,
                        event_id: r.get(1)?,
                        event_type: r.get(2)?,
                        payload: r.get(3)?,
                        attempts: r.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn delivery_result(&self, id: i64, outcome: &DeliveryOutcome) -> Result<(), StoreError> {
        self.with(|c| {
            match outcome {
                DeliveryOutcome::Delivered { at } => c.execute(
                    "UPDATE outbox SET attempts = attempts + 1, delivered_at = ?2,
                         last_error = NULL WHERE id = ?1",
                    params![id, at],
                )?,
                DeliveryOutcome::Retry {
                    next_attempt_at,
                    error,
                } => c.execute(
                    "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?2,
                         last_error = ?3 WHERE id = ?1",
                    params![id, next_attempt_at, error],
                )?,
                DeliveryOutcome::GaveUp { error } => c.execute(
                    "UPDATE outbox SET attempts = attempts + 1, failed_at = next_attempt_at,
                         last_error = ?2 WHERE id = ?1",
                    params![id, error],
                )?,
            };
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokengate_wire::Kind;

    fn row(id: &str) -> TokenRow {
        TokenRow {
            id: id.into(),
            hash: format!("{:0>64}", id.trim_start_matches("tok_")),
            name: format!("name-{id}"),
            kind: Kind::User,
            owner: "alice".into(),
            status: Status::Active,
            max_rps: None,
            burst: None,
            created_at: 1,
            updated_at: 1,
            expires_at: None,
            last_used_at: None,
            version: 0,
            requests_allowed: 0,
            requests_denied: 0,
            rotated_at: None,
            retired: vec![],
        }
    }

    const ADMIN: Change<'static> = Change {
        actor: "admin",
        action: "token.updated",
    };

    fn open() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("t.db")).unwrap();
        (dir, s)
    }

    fn set_status(s: &SqliteStore, id: &str, to: Status) -> Result<TokenRow, StoreError> {
        s.update(id, 2, ADMIN, &move |r: &mut TokenRow| {
            let changed = r.status != to;
            r.status = to;
            Ok(changed)
        })
    }

    #[test]
    fn every_change_takes_the_next_version_and_signals_it() {
        let (_d, s) = open();
        let rx = s.subscribe();
        assert_eq!(s.version().unwrap(), 0);
        assert_eq!(s.create(row("tok_1"), ADMIN).unwrap().version, 1);
        assert_eq!(s.create(row("tok_2"), ADMIN).unwrap().version, 2);
        assert_eq!(
            set_status(&s, "tok_1", Status::Suspended).unwrap().version,
            3
        );
        // No change, no version.
        assert_eq!(
            set_status(&s, "tok_1", Status::Suspended).unwrap().version,
            3
        );
        assert_eq!(s.version().unwrap(), 3);
        assert_eq!(*rx.borrow(), 3);
        let ids: Vec<_> = s
            .changes_since(1, 10)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, vec!["tok_2", "tok_1"]);
    }

    #[test]
    fn revoked_rows_are_tombstones_for_sync_but_gone_for_the_api() {
        let (_d, s) = open();
        s.create(row("tok_1"), ADMIN).unwrap();
        s.create(row("tok_2"), ADMIN).unwrap();
        set_status(&s, "tok_1", Status::Revoked).unwrap();
        let revoked_at = s.changes_since(2, 10).unwrap()[0].updated_at;
        let gone = Err(StoreError::Revoked { at: revoked_at });
        assert_eq!(s.get("tok_1"), gone);
        assert_eq!(set_status(&s, "tok_1", Status::Active), gone);
        assert_eq!(s.get("tok_9"), Err(StoreError::NotFound));
        assert_eq!(
            s.list(&ListQuery {
                limit: 10,
                ..Default::default()
            })
            .unwrap()
            .len(),
            1
        );
        assert_eq!(s.live_count().unwrap(), 1);
        let changes = s.changes_since(2, 10).unwrap();
        assert_eq!(
            (changes[0].id.as_str(), changes[0].status),
            ("tok_1", Status::Revoked)
        );
        assert_eq!(s.snapshot_page(None, 10).unwrap().len(), 2);
    }

    #[test]
    fn list_filters_and_pages_by_id() {
        let (_d, s) = open();
        for i in 1..=5 {
            let mut r = row(&format!("tok_{i}"));
            if i % 2 == 0 {
                r.kind = Kind::Service;
                r.owner = "team".into();
            }
            s.create(r, ADMIN).unwrap();
        }
        set_status(&s, "tok_3", Status::Suspended).unwrap();
        let ids = |q: ListQuery| {
            s.list(&q)
                .unwrap()
                .into_iter()
                .map(|r| r.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ids(ListQuery {
                limit: 2,
                ..Default::default()
            }),
            ["tok_1", "tok_2"]
        );
        assert_eq!(
            ids(ListQuery {
                limit: 2,
                after: Some("tok_2".into()),
                ..Default::default()
            }),
            ["tok_3", "tok_4"]
        );
        assert_eq!(
            ids(ListQuery {
                limit: 9,
                kind: Some(Kind::Service),
                ..Default::default()
            }),
            ["tok_2", "tok_4"]
        );
        assert_eq!(
            ids(ListQuery {
                limit: 9,
                owner: Some("team".into()),
                ..Default::default()
            }),
            ["tok_2", "tok_4"]
        );
        assert_eq!(
            ids(ListQuery {
                limit: 9,
                status: Some(Status::Suspended),
                ..Default::default()
            }),
            ["tok_3"]
        );
        assert_eq!(
            ids(ListQuery {
                limit: 9,
                name_contains: Some("NAME-TOK_5".into()),
                ..Default::default()
            }),
            ["tok_5"]
        );
        assert_eq!(
            ids(ListQuery {
                limit: 2,
                newest_first: true,
                before: Some("tok_4".into()),
                ..Default::default()
            }),
            ["tok_3", "tok_2"],
            "in creation order, newest first"
        );
        assert_eq!(
            ids(ListQuery {
                limit: 9,
                name_contains: Some("%".into()),
                ..Default::default()
            }),
            Vec::<String>::new(),
            "no pattern characters"
        );
    }

    #[test]
    fn snapshot_pages_cover_every_row_once() {
        let (_d, s) = open();
        for i in 1..=7 {
            s.create(row(&format!("tok_{i}")), ADMIN).unwrap();
        }
        let mut seen = vec![];
        let mut after: Option<String> = None;
        loop {
            let page = s.snapshot_page(after.as_deref(), 3).unwrap();
            if page.is_empty() {
                break;
            }
            after = page.last().map(|r| r.id.clone());
            seen.extend(page.into_iter().map(|r| r.id));
        }
        assert_eq!(seen.len(), 7);
    }

    #[test]
    fn edits_can_refuse_and_state_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store_id;
        {
            let s = SqliteStore::open(&path).unwrap();
            store_id = s.store_id().to_string();
            s.create(row("tok_1"), ADMIN).unwrap();
            let refused = s.update("tok_1", 3, ADMIN, &|_r: &mut TokenRow| {
                Err(StoreError::Invalid {
                    field: "burst",
                    message: "no".into(),
                })
            });
            assert!(matches!(
                refused,
                Err(StoreError::Invalid { field: "burst", .. })
            ));
            assert_eq!(s.version().unwrap(), 1);
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.store_id(), store_id);
        assert_eq!(s.version().unwrap(), 1);
        assert_eq!(*s.subscribe().borrow(), 1);
        assert_eq!(s.get("tok_1").unwrap().name, "name-tok_1");
    }

    #[test]
    fn duplicate_hash_is_a_conflict() {
        let (_d, s) = open();
        s.create(row("tok_1"), ADMIN).unwrap();
        let mut dup = row("tok_2");
        dup.hash = row("tok_1").hash;
        assert!(matches!(s.create(dup, ADMIN), Err(StoreError::Conflict(_))));
    }

    fn all_audit(s: &SqliteStore) -> Vec<AuditEntry> {
        s.audit(&AuditQuery {
            limit: 100,
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn every_change_is_audited_with_the_fields_that_moved() {
        let (_d, s) = open();
        s.create(row("tok_1"), ADMIN).unwrap();
        set_status(&s, "tok_1", Status::Suspended).unwrap();
        // No change, no entry.
        set_status(&s, "tok_1", Status::Suspended).unwrap();
        let trail = all_audit(&s);
        assert_eq!(trail.len(), 2);
        let (newest, created) = (&trail[0], &trail[1]);
        assert!(newest.seq > created.seq);
        assert_eq!(newest.before, Some(serde_json::json!({"status": "active"})));
        assert_eq!(
            newest.after,
            Some(serde_json::json!({"status": "suspended"}))
        );
        assert_eq!(created.before, None);
        assert_eq!(created.after.as_ref().unwrap()["name"], "name-tok_1");
        assert!(!format!("{trail:?}").contains(&row("tok_1").hash));
        let by_actor = s
            .audit(&AuditQuery {
                actor: Some("nobody".into()),
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert!(by_actor.is_empty());
        let paged = s
            .audit(&AuditQuery {
                before_seq: Some(newest.seq),
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(paged, vec![created.clone()]);
    }

    #[test]
    fn the_audit_trail_is_append_only() {
        let (_d, s) = open();
        s.create(row("tok_1"), ADMIN).unwrap();
        let conn = s.conn.lock().unwrap();
        assert!(conn.execute("DELETE FROM audit", []).is_err());
        assert!(conn.execute("UPDATE audit SET actor = 'x'", []).is_err());
    }

    #[test]
    fn usage_adds_up_without_a_new_version() {
        let (_d, s) = open();
        s.create(row("tok_1"), ADMIN).unwrap();
        let entry = |allowed, last_used_at| UsageEntry {
            id: "tok_1".into(),
            allowed,
            denied: 1,
            last_used_at,
        };
        let unknown = UsageEntry {
            id: "tok_x".into(),
            ..entry(1, 1)
        };
        assert_eq!(s.record_usage(100, &[entry(3, 50), unknown]).unwrap(), 1);
        // An older report never moves last use back; a future one is clamped to now.
        s.record_usage(100, &[entry(2, 40)]).unwrap();
        let r = s.get("tok_1").unwrap();
        assert_eq!((r.requests_allowed, r.requests_denied), (5, 2));
        assert_eq!(r.last_used_at, Some(50));
        s.record_usage(100, &[entry(0, 500)]).unwrap();
        assert_eq!(s.get("tok_1").unwrap().last_used_at, Some(100));
        assert_eq!(s.version().unwrap(), 1);
        // An edit keeps the counters.
        set_status(&s, "tok_1", Status::Suspended).unwrap();
        assert_eq!(s.get("tok_1").unwrap().requests_allowed, 5);
    }

    #[test]
    fn purge_removes_old_revoked_and_expired_tokens_and_raises_the_horizon() {
        let (_d, s) = open();
        let mut expired = row("tok_1");
        expired.expires_at = Some(10);
        s.create(expired, ADMIN).unwrap();
        s.create(row("tok_2"), ADMIN).unwrap();
        s.create(row("tok_3"), ADMIN).unwrap();
        set_status(&s, "tok_2", Status::Revoked).unwrap(); // updated_at = 2, version 4
        let mut fresh = row("tok_4");
        fresh.expires_at = Some(1_000);
        s.create(fresh, ADMIN).unwrap();
        assert!(s.purge(50, 1).unwrap().is_empty());
        let purged: Vec<_> = s.purge(50, 20).unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(purged, ["tok_1", "tok_2"]);
        assert_eq!(s.horizon().unwrap(), 4);
        let left: Vec<_> = s
            .snapshot_page(None, 10)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(left, ["tok_3", "tok_4"]);
        let purges = s
            .audit(&AuditQuery {
                action: Some("token.purged".into()),
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(purges.len(), 2);
        assert_eq!(purges[0].actor, "system");
        assert!(purges[0].after.is_none());
    }

    #[test]
    fn expiry_warnings_are_issued_once_per_lead_even_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let day = 86_400;
        let leads = [7 * day, day];
        let event = |w: &Warning| {
            (
                format!("evt_{}_{}", w.token.id, w.lead_seconds),
                "token.expiring".to_string(),
                "{}".to_string(),
            )
        };
        {
            let s = SqliteStore::open(&path).unwrap();
            let mut far = row("tok_far");
            far.expires_at = Some(10 * day);
            s.create(far, ADMIN).unwrap();
            let mut near = row("tok_near");
            near.expires_at = Some(3_600);
            s.create(near, ADMIN).unwrap();
            let mut none = row("tok_none");
            none.expires_at = None;
            s.create(none, ADMIN).unwrap();
            let w = s.warn_expiring(0, &leads, Some(&event)).unwrap();
            // The near one gets only its tightest lead.
            assert_eq!(
                w.iter()
                    .map(|w| (w.token.id.as_str(), w.lead_seconds))
                    .collect::<Vec<_>>(),
                [("tok_near", day)]
            );
            assert!(s
                .warn_expiring(10, &leads, Some(&event))
                .unwrap()
                .is_empty());
            let w = s.warn_expiring(3 * day, &leads, Some(&event)).unwrap();
            assert_eq!(w.len(), 1);
            assert_eq!(w[0].lead_seconds, 7 * day);
        }
        let s = SqliteStore::open(&path).unwrap();
        assert!(s
            .warn_expiring(4 * day, &leads, Some(&event))
            .unwrap()
            .is_empty());
        let w = s.warn_expiring(9 * day + 1, &leads, Some(&event)).unwrap();
        assert_eq!(
            (w[0].token.id.as_str(), w[0].lead_seconds),
            ("tok_far", day)
        );
        // A new expiry time warns again.
        s.update("tok_far", 9 * day + 2, ADMIN, &|r: &mut TokenRow| {
            r.expires_at = Some(9 * day + 3_600);
            Ok(true)
        })
        .unwrap();
        assert_eq!(s.warn_expiring(9 * day + 3, &leads, None).unwrap().len(), 1);
        let warned = s
            .audit(&AuditQuery {
                action: Some("token.expiry_warning".into()),
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(warned.len(), 4);
        // Only the three issued with a webhook builder are queued.
        assert_eq!(s.due_deliveries(i64::MAX, 10).unwrap().len(), 3);
    }

    #[test]
    fn deliveries_retry_then_finish() {
        let (_d, s) = open();
        let mut near = row("tok_1");
        near.expires_at = Some(100);
        s.create(near, ADMIN).unwrap();
        let event = |_: &Warning| {
            (
                "evt_1".to_string(),
                "token.expiring".to_string(),
                "{}".to_string(),
            )
        };
        s.warn_expiring(50, &[86_400], Some(&event)).unwrap();
        let due = s.due_deliveries(50, 10).unwrap();
        assert_eq!((due.len(), due[0].attempts), (1, 0));
        s.delivery_result(
            due[0].id,
            &DeliveryOutcome::Retry {
                next_attempt_at: 60,
                error: "HTTP 500".into(),
            },
        )
        .unwrap();
        assert!(s.due_deliveries(59, 10).unwrap().is_empty());
        let due = s.due_deliveries(60, 10).unwrap();
        assert_eq!(due[0].attempts, 1);
        s.delivery_result(due[0].id, &DeliveryOutcome::Delivered { at: 61 })
            .unwrap();
        assert!(s.due_deliveries(i64::MAX, 10).unwrap().is_empty());
    }
}
