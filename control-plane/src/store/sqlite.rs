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

/// The schema version this binary migrates to.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

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

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: usize = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(backend)?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::Backend(super::newer_schema(
            current,
            SCHEMA_VERSION,
        )));
    }
    migrate_from(conn, current).map_err(backend)
}

fn migrate_from(conn: &mut Connection, current: usize) -> rusqlite::Result<()> {
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
        migrate(&mut conn)?;
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
        let sql = format!("SELECT {COLUMNS} FROM tokens WHERE id = ?1 AND status != 'revoked'");
        self.query(&sql, &[&id])?.pop().ok_or(StoreError::NotFound)
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
             ORDER BY {order} LIMIT ?7"
        );
        let status = q.status.map(Status::as_str);
        let kind = q.kind.map(|k| k.as_str());
        let (from, to) = (q.expiring.map(|e| e.0), q.expiring.map(|e| e.1));
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
        let sql = format!("SELECT {COLUMNS} FROM tokens WHERE id = ?1 AND status != 'revoked'");
        let mut edit_error = None;
        let result = self.with(|c| {
            let tx = c.transaction()?;
            let Some(mut row) = tx.query_row(&sql, [id], from_row).optional()? else {
                return Ok(None);
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

    #[test]
    fn the_audit_trail_is_append_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("t.db")).unwrap();
        let conn = s.conn.lock().unwrap();
        conn.execute(
            "INSERT INTO audit (at, actor, action, token_id, token_name) VALUES (1, 'a', 'b', 'c', 'd')",
            [],
        )
        .unwrap();
        assert!(conn.execute("DELETE FROM audit", []).is_err());
        assert!(conn.execute("UPDATE audit SET actor = 'x'", []).is_err());
    }
}
