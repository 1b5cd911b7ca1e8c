//! SQLite store: WAL with `synchronous=FULL`, so a write is on disk before it is answered.
//! Every change and its audit entry commit in one transaction. One process owns the file:
//! calls take turns on one connection, off the async workers.

use super::{
    AuditEntry, AuditQuery, AuditRecord, Changes, Delivery, DeliveryOutcome, DemandOf, DemandRow,
    Dump, Event, Expiring, ListQuery, OutboxRow, Page, ProxySeen, Published, QuotaDecision,
    QuotaHolder, QuotaSpent, QuotaState, QuotaWrite, ScopeDeletion, ScopeRow, ScopeSet, SessionRow,
    Status, Store, StoreError, TokenRow, WarningRecord,
};
use async_trait::async_trait;
use rand::distributions::{Alphanumeric, DistString};
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};
use serde_json::Value;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokengate_wire::{TokenDemand, UsageEntry};
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
    // Fleet-safe console sessions and once-per-period jobs, shared with PostgreSQL.
    r#"
    CREATE TABLE sessions (
        key TEXT PRIMARY KEY,
        actor TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        last_used_at INTEGER NOT NULL
    );
    CREATE INDEX sessions_by_use ON sessions(last_used_at);
    CREATE TABLE job_runs (
        name TEXT PRIMARY KEY,
        last_run INTEGER NOT NULL,
        runs INTEGER NOT NULL
    );
    "#,
    // Fleet-wide limits: each token's scope, the proxies' reports.
    r#"
    ALTER TABLE tokens ADD COLUMN limit_scope TEXT NOT NULL DEFAULT 'fleet';
    CREATE TABLE fleet_proxies (
        proxy_id TEXT PRIMARY KEY,
        interval_ms INTEGER NOT NULL,
        seen_at_ms INTEGER NOT NULL
    );
    CREATE TABLE fleet_demand (
        token_id TEXT NOT NULL,
        proxy_id TEXT NOT NULL,
        admitted INTEGER NOT NULL,
        refused INTEGER NOT NULL,
        interval_ms INTEGER NOT NULL,
        seen_at_ms INTEGER NOT NULL,
        PRIMARY KEY (token_id, proxy_id)
    );
    CREATE INDEX fleet_demand_by_proxy ON fleet_demand(proxy_id, seen_at_ms);
    CREATE INDEX fleet_demand_by_age ON fleet_demand(seen_at_ms);
    "#,
    // Scopes, and the scopes each token is limited to (a JSON array; NULL: unrestricted).
    // The last scope change's version is `meta.scopes_version`.
    r#"
    CREATE TABLE scopes (
        name TEXT PRIMARY KEY,
        description TEXT NOT NULL,
        rules TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        version INTEGER NOT NULL
    );
    ALTER TABLE tokens ADD COLUMN scopes TEXT;
    "#,
    // Quotas: each token's, and what each proxy holds of it per period.
    r#"
    ALTER TABLE tokens ADD COLUMN quota_limit INTEGER;
    ALTER TABLE tokens ADD COLUMN quota_period TEXT;
    CREATE INDEX tokens_with_quota ON tokens(id) WHERE quota_limit IS NOT NULL;
    CREATE TABLE quota_holders (
        token_id TEXT NOT NULL,
        period_start INTEGER NOT NULL,
        proxy_id TEXT NOT NULL,
        hash TEXT NOT NULL,
        period_end INTEGER NOT NULL,
        spent INTEGER NOT NULL,
        carried INTEGER NOT NULL,
        held INTEGER NOT NULL,
        granted INTEGER NOT NULL,
        rate_milli INTEGER NOT NULL,
        seen_at_ms INTEGER NOT NULL,
        PRIMARY KEY (token_id, period_start, proxy_id, hash)
    );
    CREATE INDEX quota_holders_by_end ON quota_holders(period_end);
    CREATE TABLE quota_exhausted (
        token_id TEXT NOT NULL,
        period_start INTEGER NOT NULL,
        period_end INTEGER NOT NULL,
        at INTEGER NOT NULL,
        PRIMARY KEY (token_id, period_start)
    );
    "#,
];

/// The schema version this binary migrates to.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

const COLUMNS: &str =
    "id, hash, name, kind, owner, status, max_rps, burst, created_at, updated_at, \
     expires_at, last_used_at, version, requests_allowed, requests_denied, rotated_at, retired, \
     limit_scope, scopes, quota_limit, quota_period";
/// How many columns `COLUMNS` names: a query's own columns follow them.
const AFTER_COLUMNS: usize = 21;

const SCOPE_COLUMNS: &str = "name, description, rules, created_at, updated_at, version";

struct Inner {
    conn: Mutex<Connection>,
    store_id: String,
    published: Published,
}

pub struct SqliteStore {
    inner: Arc<Inner>,
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
    let scope: String = r.get(17)?;
    let scopes: Option<String> = r.get(18)?;
    let quota_period: Option<String> = r.get(20)?;
    let quota = super::quota_from_columns(r.get(19)?, quota_period.as_deref())
        .map_err(|e| conversion("quota", &e))?;
    Ok(TokenRow {
        id: r.get(0)?,
        hash: r.get(1)?,
        name: r.get(2)?,
        kind: super::parse_kind(&kind).ok_or_else(|| conversion("kind", &kind))?,
        owner: r.get(4)?,
        status: Status::parse(&status).ok_or_else(|| conversion("status", &status))?,
        max_rps: r.get(6)?,
        burst: r.get(7)?,
        limit_scope: super::parse_scope(&scope).ok_or_else(|| conversion("limit_scope", &scope))?,
        created_at: r.get(8)?,
        updated_at: r.get(9)?,
        expires_at: r.get(10)?,
        last_used_at: r.get(11)?,
        version: r.get::<_, i64>(12)? as u64,
        requests_allowed: r.get::<_, i64>(13)?.max(0) as u64,
        requests_denied: r.get::<_, i64>(14)?.max(0) as u64,
        rotated_at: r.get(15)?,
        retired: serde_json::from_str(&retired).map_err(|_| conversion("retired", &retired))?,
        scopes: scopes
            .map(|s| serde_json::from_str(&s).map_err(|_| conversion("scopes", &s)))
            .transpose()?,
        quota,
    })
}

fn scope_from_row(r: &Row<'_>) -> rusqlite::Result<ScopeRow> {
    let rules: String = r.get(2)?;
    Ok(ScopeRow {
        name: r.get(0)?,
        description: r.get(1)?,
        rules: serde_json::from_str(&rules).map_err(|_| conversion("rules", &rules))?,
        created_at: r.get(3)?,
        updated_at: r.get(4)?,
        version: r.get::<_, i64>(5)?.max(0) as u64,
    })
}

fn to_text<T: serde::Serialize>(v: &T) -> rusqlite::Result<String> {
    serde_json::to_string(v).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn scopes_text(r: &TokenRow) -> rusqlite::Result<Option<String>> {
    r.scopes.as_ref().map(to_text).transpose()
}

fn scope_set(c: &Connection) -> rusqlite::Result<ScopeSet> {
    let mut stmt =
        c.prepare_cached(&format!("SELECT {SCOPE_COLUMNS} FROM scopes ORDER BY name"))?;
    let scopes = stmt
        .query_map([], scope_from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(ScopeSet {
        scopes,
        version: meta_number(c, "scopes_version")?,
    })
}

/// `Conflict` when a live token would name a scope that is not there (see `Store::insert`).
fn check_scopes_exist(
    tx: &Transaction<'_>,
    r: &TokenRow,
) -> rusqlite::Result<Result<(), StoreError>> {
    let Some(wanted) = r.scopes.as_ref().filter(|_| r.status != Status::Revoked) else {
        return Ok(Ok(()));
    };
    let mut stmt = tx.prepare_cached(
        "SELECT name FROM scopes WHERE name IN (SELECT value FROM json_each(?1))",
    )?;
    let found = stmt
        .query_map([to_text(wanted)?], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(super::missing_scopes(wanted, &found).map_or(Ok(()), Err))
}

/// Live tokens naming the scope.
fn scope_users(c: &Connection, name: &str) -> rusqlite::Result<u64> {
    c.query_row(
        "SELECT count(*) FROM tokens WHERE status != 'revoked' AND scopes IS NOT NULL
           AND EXISTS (SELECT 1 FROM json_each(tokens.scopes) WHERE value = ?1)",
        [name],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n.max(0) as u64)
}

/// Takes the next version for a scope change, which also becomes the last scope change's.
fn next_scope_version(tx: &Transaction<'_>) -> rusqlite::Result<u64> {
    let v = next_version(tx)?;
    set_meta(tx, "scopes_version", v)?;
    Ok(v)
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
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction().map_err(backend)?;
        tx.execute_batch(sql).map_err(backend)?;
        tx.pragma_update(None, "user_version", i + 1)
            .map_err(backend)?;
        tx.commit().map_err(backend)?;
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

/// Takes the next version inside the caller's transaction. SQLite has one writer at a time,
/// so versions commit in the order they are taken.
fn next_version(tx: &Transaction<'_>) -> rusqlite::Result<u64> {
    let v = meta_number(tx, "version")? + 1;
    set_meta(tx, "version", v)?;
    Ok(v)
}

fn append_audit(tx: &Transaction<'_>, a: &AuditRecord) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO audit (at, actor, action, token_id, token_name, before, after)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            a.at,
            a.actor,
            a.action,
            a.token_id,
            a.token_name,
            a.before.as_ref().map(Value::to_string),
            a.after.as_ref().map(Value::to_string)
        ],
    )?;
    Ok(())
}

fn retired_text(r: &TokenRow) -> rusqlite::Result<String> {
    serde_json::to_string(&r.retired)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn clamp(n: u64) -> i64 {
    n.min(i64::MAX as u64) as i64
}

fn query_rows(
    c: &Connection,
    sql: &str,
    args: &[&dyn rusqlite::ToSql],
) -> rusqlite::Result<Vec<TokenRow>> {
    let mut stmt = c.prepare_cached(sql)?;
    let rows = stmt
        .query_map(args, from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

fn live_count(c: &Connection) -> rusqlite::Result<u64> {
    c.query_row(
        "SELECT count(*) FROM tokens WHERE status != 'revoked'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n.max(0) as u64)
}

impl SqliteStore {
    /// Opens (creating and migrating) the file. Blocking.
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
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                store_id,
                published: Published::new(version),
            }),
        })
    }

    /// Runs `f` on the connection off the async workers (SQLite fsyncs on every write). It
    /// gets the publisher too: a write publishes its version right after the commit, with
    /// the connection still held, so no reader sees the new row before the signal, and the
    /// signalled version never goes back.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, &Published) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = inner
                .conn
                .lock()
                .map_err(|_| StoreError::Backend("store lock poisoned".into()))?;
            f(&mut conn, &inner.published).map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, msg)
                    if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    StoreError::Conflict(msg.unwrap_or_else(|| "constraint violation".into()))
                }
                rusqlite::Error::SqliteFailure(f, msg)
                    if matches!(
                        f.code,
                        rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                    ) =>
                {
                    StoreError::Unavailable(msg.unwrap_or_else(|| "database busy".into()))
                }
                e => backend(e),
            })
        })
        .await
        .map_err(backend)?
    }

    async fn rows(
        &self,
        sql: String,
        args: Vec<Box<dyn rusqlite::ToSql + Send>>,
    ) -> Result<Vec<TokenRow>, StoreError> {
        self.with(move |c, _| {
            let args: Vec<&dyn rusqlite::ToSql> = args.iter().map(|a| a.as_ref() as _).collect();
            query_rows(c, &sql, &args)
        })
        .await
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn store_id(&self) -> &str {
        &self.inner.store_id
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.published.subscribe()
    }

    fn hearing(&self) -> watch::Receiver<bool> {
        self.inner.published.hearing()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.with(|c, _| c.query_row("SELECT 1", [], |_| Ok(())))
            .await
    }

    async fn insert(&self, row: TokenRow, audit: &AuditRecord) -> Result<TokenRow, StoreError> {
        let audit = audit.clone();
        self.with(move |c, published| {
            let mut row = row;
            let tx = c.transaction()?;
            if let Err(e) = check_scopes_exist(&tx, &row)? {
                return Ok(Err(e));
            }
            row.version = next_version(&tx)?;
            let sql = format!(
                "INSERT INTO tokens ({COLUMNS}, created_seq)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, 0, 0, ?14, ?15,
                         ?16, ?17, ?18, ?19, (SELECT COALESCE(MAX(created_seq), 0) + 1 FROM tokens))"
            );
            let (quota_limit, quota_period) = super::quota_columns(row.quota);
            tx.execute(
                &sql,
                params![
                    row.id,
                    row.hash,
                    row.name,
                    row.kind.as_str(),
                    row.owner,
                    row.status.as_str(),
                    row.max_rps,
                    row.burst,
                    row.created_at,
                    row.updated_at,
                    row.expires_at,
                    row.last_used_at,
                    row.version as i64,
                    row.rotated_at,
                    retired_text(&row)?,
                    row.limit_scope.as_str(),
                    scopes_text(&row)?,
                    quota_limit,
                    quota_period
                ],
            )?;
            append_audit(&tx, &audit)?;
            tx.commit()?;
            published.publish(row.version);
            Ok(Ok(row))
        })
        .await?
    }

    async fn token(&self, id: &str) -> Result<Option<TokenRow>, StoreError> {
        let id = id.to_string();
        let sql = format!("SELECT {COLUMNS} FROM tokens WHERE id = ?1");
        Ok(self.rows(sql, vec![Box::new(id)]).await?.pop())
    }

    async fn list(&self, q: &ListQuery) -> Result<Vec<TokenRow>, StoreError> {
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
        let q = q.clone();
        self.rows(
            sql,
            vec![
                Box::new(q.status.map(Status::as_str)),
                Box::new(q.owner),
                Box::new(q.kind.map(|k| k.as_str())),
                Box::new(q.after),
                Box::new(q.expiring.map(|e| e.0)),
                Box::new(q.expiring.map(|e| e.1)),
                Box::new(q.limit),
                Box::new(q.name_contains),
                Box::new(q.before),
                Box::new(q.expired.map(|e| e.0)),
                Box::new(q.expired.map(|e| e.1)),
            ],
        )
        .await
    }

    async fn replace(
        &self,
        row: TokenRow,
        expected_version: u64,
        audit: &AuditRecord,
        raise_horizon: bool,
    ) -> Result<TokenRow, StoreError> {
        let audit = audit.clone();
        self.with(move |c, published| {
            let mut row = row;
            let tx = c.transaction()?;
            let current: Option<i64> = tx
                .query_row("SELECT version FROM tokens WHERE id = ?1", [&row.id], |r| {
                    r.get(0)
                })
                .optional()?;
            match current {
                None => return Ok(Err(StoreError::NotFound)),
                Some(v) if v as u64 != expected_version => return Ok(Err(StoreError::Stale)),
                Some(_) => {}
            }
            if let Err(e) = check_scopes_exist(&tx, &row)? {
                return Ok(Err(e));
            }
            row.version = next_version(&tx)?;
            let (quota_limit, quota_period) = super::quota_columns(row.quota);
            if raise_horizon {
                let horizon = meta_number(&tx, "horizon")?.max(expected_version);
                set_meta(&tx, "horizon", horizon)?;
            }
            tx.execute(
                "UPDATE tokens SET hash = ?2, name = ?3, status = ?4, max_rps = ?5,
                         burst = ?6, updated_at = ?7, expires_at = ?8, version = ?9,
                         rotated_at = ?10, retired = ?11, limit_scope = ?12, scopes = ?13,
                         quota_limit = ?14, quota_period = ?15
                     WHERE id = ?1",
                params![
                    row.id,
                    row.hash,
                    row.name,
                    row.status.as_str(),
                    row.max_rps,
                    row.burst,
                    row.updated_at,
                    row.expires_at,
                    row.version as i64,
                    row.rotated_at,
                    retired_text(&row)?,
                    row.limit_scope.as_str(),
                    scopes_text(&row)?,
                    quota_limit,
                    quota_period
                ],
            )?;
            append_audit(&tx, &audit)?;
            let (allowed, denied, last_used): (i64, i64, Option<i64>) = tx.query_row(
                "SELECT requests_allowed, requests_denied, last_used_at FROM tokens WHERE id = ?1",
                [&row.id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            tx.commit()?;
            published.publish(row.version);
            row.requests_allowed = allowed.max(0) as u64;
            row.requests_denied = denied.max(0) as u64;
            row.last_used_at = last_used;
            Ok(Ok(row))
        })
        .await?
    }

    async fn record_usage(&self, now: i64, entries: &[UsageEntry]) -> Result<usize, StoreError> {
        let entries = entries.to_vec();
        self.with(move |c, _| {
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
                for e in &entries {
                    let seen = e.last_used_at.min(now);
                    matched +=
                        stmt.execute(params![e.id, clamp(e.allowed), clamp(e.denied), seen])?;
                }
            }
            tx.commit()?;
            Ok(matched)
        })
        .await
    }

    async fn fleet_report(
        &self,
        proxy_id: &str,
        interval_ms: u32,
        now_ms: i64,
        forget_ms: i64,
        tokens: &[TokenDemand],
    ) -> Result<(), StoreError> {
        let (proxy_id, tokens) = (proxy_id.to_string(), tokens.to_vec());
        self.with(move |c, _| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO fleet_proxies (proxy_id, interval_ms, seen_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (proxy_id) DO UPDATE SET interval_ms = ?2,
                     seen_at_ms = max(seen_at_ms, ?3)",
                params![proxy_id, interval_ms, now_ms],
            )?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO fleet_demand
                         (token_id, proxy_id, admitted, refused, interval_ms, seen_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (token_id, proxy_id) DO UPDATE SET admitted = ?3,
                         refused = ?4, interval_ms = ?5, seen_at_ms = ?6
                     WHERE seen_at_ms <= ?6",
                )?;
                for t in &tokens {
                    stmt.execute(params![
                        t.id,
                        proxy_id,
                        clamp(t.admitted),
                        clamp(t.refused),
                        interval_ms,
                        now_ms
                    ])?;
                }
            }
            tx.execute(
                "DELETE FROM fleet_demand WHERE seen_at_ms < ?1",
                [forget_ms],
            )?;
            tx.execute(
                "DELETE FROM fleet_proxies WHERE seen_at_ms < ?1",
                [forget_ms],
            )?;
            tx.commit()
        })
        .await
    }

    async fn fleet_proxies(&self, since_ms: i64) -> Result<Vec<ProxySeen>, StoreError> {
        self.with(move |c, _| {
            let mut stmt = c.prepare_cached(
                "SELECT proxy_id, interval_ms, seen_at_ms FROM fleet_proxies
                 WHERE seen_at_ms >= ?1 ORDER BY proxy_id",
            )?;
            let rows = stmt
                .query_map([since_ms], |r| {
                    Ok(ProxySeen {
                        proxy_id: r.get(0)?,
                        interval_ms: r.get(1)?,
                        seen_at_ms: r.get(2)?,
                    })
                })?
                .collect();
            rows
        })
        .await
    }

    async fn fleet_demand(
        &self,
        of: DemandOf<'_>,
        since_ms: i64,
    ) -> Result<Vec<DemandRow>, StoreError> {
        let (sql, key) = match of {
            DemandOf::Token(t) => (
                "SELECT token_id, proxy_id, admitted, refused, interval_ms, seen_at_ms
                 FROM fleet_demand WHERE token_id = ?1 AND seen_at_ms >= ?2
                 ORDER BY token_id, proxy_id",
                t.to_string(),
            ),
            DemandOf::All => (
                "SELECT token_id, proxy_id, admitted, refused, interval_ms, seen_at_ms
                 FROM fleet_demand WHERE ?1 = '' AND seen_at_ms >= ?2
                 ORDER BY token_id, proxy_id",
                String::new(),
            ),
        };
        self.with(move |c, _| {
            let mut stmt = c.prepare_cached(sql)?;
            let rows = stmt
                .query_map(params![key, since_ms], |r| {
                    Ok(DemandRow {
                        token_id: r.get(0)?,
                        proxy_id: r.get(1)?,
                        admitted: r.get::<_, i64>(2)?.max(0) as u64,
                        refused: r.get::<_, i64>(3)?.max(0) as u64,
                        interval_ms: r.get(4)?,
                        seen_at_ms: r.get(5)?,
                    })
                })?
                .collect();
            rows
        })
        .await
    }

    async fn insert_scope(
        &self,
        row: ScopeRow,
        audit: &AuditRecord,
    ) -> Result<ScopeRow, StoreError> {
        let audit = audit.clone();
        self.with(move |c, published| {
            let mut row = row;
            let tx = c.transaction()?;
            row.version = next_scope_version(&tx)?;
            tx.execute(
                &format!("INSERT INTO scopes ({SCOPE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"),
                params![
                    row.name,
                    row.description,
                    to_text(&row.rules)?,
                    row.created_at,
                    row.updated_at,
                    clamp(row.version)
                ],
            )?;
            append_audit(&tx, &audit)?;
            tx.commit()?;
            published.publish(row.version);
            Ok(row)
        })
        .await
    }

    async fn scope(&self, name: &str) -> Result<Option<ScopeRow>, StoreError> {
        let name = name.to_string();
        self.with(move |c, _| {
            c.query_row(
                &format!("SELECT {SCOPE_COLUMNS} FROM scopes WHERE name = ?1"),
                [&name],
                scope_from_row,
            )
            .optional()
        })
        .await
    }

    async fn scopes(&self) -> Result<ScopeSet, StoreError> {
        self.with(|c, _| {
            let tx = c.transaction()?;
            let set = scope_set(&tx)?;
            tx.commit()?;
            Ok(set)
        })
        .await
    }

    async fn replace_scope(
        &self,
        row: ScopeRow,
        expected_version: u64,
        audit: &AuditRecord,
    ) -> Result<ScopeRow, StoreError> {
        let audit = audit.clone();
        self.with(move |c, published| {
            let mut row = row;
            let tx = c.transaction()?;
            let current: Option<i64> = tx
                .query_row(
                    "SELECT version FROM scopes WHERE name = ?1",
                    [&row.name],
                    |r| r.get(0),
                )
                .optional()?;
            match current {
                None => return Ok(Err(StoreError::NotFound)),
                Some(v) if v as u64 != expected_version => return Ok(Err(StoreError::Stale)),
                Some(_) => {}
            }
            row.version = next_scope_version(&tx)?;
            tx.execute(
                "UPDATE scopes SET description = ?2, rules = ?3, updated_at = ?4, version = ?5
                 WHERE name = ?1",
                params![
                    row.name,
                    row.description,
                    to_text(&row.rules)?,
                    row.updated_at,
                    clamp(row.version)
                ],
            )?;
            append_audit(&tx, &audit)?;
            tx.commit()?;
            published.publish(row.version);
            Ok(Ok(row))
        })
        .await?
    }

    async fn delete_scope(
        &self,
        name: &str,
        expected_version: u64,
        audit: &AuditRecord,
    ) -> Result<ScopeDeletion, StoreError> {
        let (name, audit) = (name.to_string(), audit.clone());
        self.with(move |c, published| {
            let tx = c.transaction()?;
            let current: Option<i64> = tx
                .query_row("SELECT version FROM scopes WHERE name = ?1", [&name], |r| {
                    r.get(0)
                })
                .optional()?;
            match current {
                None => return Ok(Err(StoreError::NotFound)),
                Some(v) if v as u64 != expected_version => return Ok(Err(StoreError::Stale)),
                Some(_) => {}
            }
            let users = scope_users(&tx, &name)?;
            if users > 0 {
                return Ok(Ok(ScopeDeletion::InUse(users)));
            }
            let version = next_scope_version(&tx)?;
            tx.execute("DELETE FROM scopes WHERE name = ?1", [&name])?;
            append_audit(&tx, &audit)?;
            tx.commit()?;
            published.publish(version);
            Ok(Ok(ScopeDeletion::Deleted(version)))
        })
        .await?
    }

    async fn quota_exchange(
        &self,
        hashes: &[String],
        now_s: i64,
        proxies_since_ms: i64,
        max_tokens: usize,
        decide: Arc<QuotaDecision>,
    ) -> Result<QuotaWrite, StoreError> {
        let hashes = serde_json::to_string(hashes).map_err(backend)?;
        let max = i64::try_from(max_tokens).unwrap_or(i64::MAX);
        self.with(move |c, _| {
            // One writer at a time: the exchange reads and writes with no other in between.
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut tokens = query_rows(
                &tx,
                &format!(
                    "SELECT {COLUMNS} FROM tokens WHERE quota_limit IS NOT NULL
                       AND (hash IN (SELECT value FROM json_each(?1))
                            OR (retired <> '[]' AND EXISTS (
                                SELECT 1 FROM json_each(tokens.retired) r
                                WHERE json_extract(r.value, '$.hash')
                                      IN (SELECT value FROM json_each(?1)))))
                     ORDER BY id LIMIT ?2"
                ),
                &[&hashes, &max],
            )?;
            let named: Vec<String> = tokens.iter().map(|t| t.id.clone()).collect();
            let room = max - tokens.len() as i64;
            if room > 0 {
                let named = serde_json::to_string(&named)
                    .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
                tokens.extend(query_rows(
                    &tx,
                    &format!(
                        "SELECT {COLUMNS} FROM tokens WHERE quota_limit IS NOT NULL
                           AND id IN (SELECT token_id FROM quota_holders WHERE period_end > ?1)
                           AND id NOT IN (SELECT value FROM json_each(?2))
                         ORDER BY id LIMIT ?3"
                    ),
                    &[&now_s, &named, &room],
                )?);
                tokens.sort_by(|a, b| a.id.cmp(&b.id));
            }
            let ids: Vec<&str> = tokens.iter().map(|t| t.id.as_str()).collect();
            let ids = serde_json::to_string(&ids)
                .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
            let holders = {
                let mut stmt = tx.prepare_cached(
                    "SELECT token_id, proxy_id, hash, period_start, period_end, spent, carried,
                            held, granted, rate_milli, seen_at_ms
                     FROM quota_holders
                     WHERE token_id IN (SELECT value FROM json_each(?1)) AND period_end > ?2
                     ORDER BY token_id, period_start, proxy_id, hash",
                )?;
                let rows = stmt
                    .query_map(params![ids, now_s], |r| {
                        let n = |i: usize| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
                        Ok(QuotaHolder {
                            token_id: r.get(0)?,
                            proxy_id: r.get(1)?,
                            hash: r.get(2)?,
                            period_start: r.get(3)?,
                            period_end: r.get(4)?,
                            spent: n(5)?,
                            carried: n(6)?,
                            held: n(7)?,
                            granted: n(8)?,
                            rate_milli: n(9)?,
                            seen_at_ms: r.get(10)?,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                rows
            };
            let proxies = {
                let mut stmt = tx.prepare_cached(
                    "SELECT proxy_id, interval_ms, seen_at_ms FROM fleet_proxies
                     WHERE seen_at_ms >= ?1 ORDER BY proxy_id",
                )?;
                let rows = stmt
                    .query_map([proxies_since_ms], |r| {
                        Ok(ProxySeen {
                            proxy_id: r.get(0)?,
                            interval_ms: r.get(1)?,
                            seen_at_ms: r.get(2)?,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                rows
            };
            let write = decide(&QuotaState {
                tokens,
                holders,
                proxies,
            });
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO quota_holders (token_id, period_start, proxy_id, hash, period_end,
                         spent, carried, held, granted, rate_milli, seen_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                     ON CONFLICT (token_id, period_start, proxy_id, hash) DO UPDATE SET
                         period_end = ?5, spent = ?6, carried = ?7, held = ?8, granted = ?9,
                         rate_milli = ?10, seen_at_ms = ?11",
                )?;
                for h in &write.holders {
                    stmt.execute(params![
                        h.token_id,
                        h.period_start,
                        h.proxy_id,
                        h.hash,
                        h.period_end,
                        clamp(h.spent),
                        clamp(h.carried),
                        clamp(h.held),
                        clamp(h.granted),
                        clamp(h.rate_milli),
                        h.seen_at_ms
                    ])?;
                }
            }
            let mut recorded = Vec::new();
            for e in &write.exhausted {
                let inserted = tx.execute(
                    "INSERT INTO quota_exhausted (token_id, period_start, period_end, at)
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                    params![e.token_id, e.period_start, e.period_end, e.audit.at],
                )?;
                if inserted == 0 {
                    continue;
                }
                append_audit(&tx, &e.audit)?;
                if let Some(ev) = &e.event {
                    tx.execute(
                        "INSERT INTO outbox (event_id, event_type, payload, created_at, next_attempt_at)
                         VALUES (?1, ?2, ?3, ?4, ?4)",
                        params![ev.id, ev.kind, ev.payload, ev.at],
                    )?;
                }
                recorded.push(e.clone());
            }
            tx.commit()?;
            Ok(QuotaWrite {
                holders: write.holders,
                exhausted: recorded,
            })
        })
        .await
    }

    async fn quota_spent(
        &self,
        token_ids: &[String],
        now_s: i64,
    ) -> Result<Vec<QuotaSpent>, StoreError> {
        let ids = serde_json::to_string(token_ids).map_err(backend)?;
        self.with(move |c, _| {
            let mut stmt = c.prepare_cached(
                "SELECT token_id, period_start, sum(spent + carried) FROM quota_holders
                 WHERE token_id IN (SELECT value FROM json_each(?1)) AND period_end > ?2
                 GROUP BY token_id, period_start ORDER BY token_id, period_start",
            )?;
            let rows = stmt
                .query_map(params![ids, now_s], |r| {
                    Ok(QuotaSpent {
                        token_id: r.get(0)?,
                        period_start: r.get(1)?,
                        spent: r.get::<_, i64>(2)?.max(0) as u64,
                    })
                })?
                .collect();
            rows
        })
        .await
    }

    async fn forget_quotas(&self, now_s: i64) -> Result<u64, StoreError> {
        self.with(move |c, _| {
            let tx = c.transaction()?;
            let n = tx.execute("DELETE FROM quota_holders WHERE period_end <= ?1", [now_s])?;
            tx.execute(
                "DELETE FROM quota_exhausted WHERE period_end <= ?1",
                [now_s],
            )?;
            tx.commit()?;
            Ok(n as u64)
        })
        .await
    }

    async fn tokens_by_id(&self, ids: &[String]) -> Result<Vec<TokenRow>, StoreError> {
        let ids = serde_json::to_string(ids).map_err(backend)?;
        let sql = format!(
            "SELECT {COLUMNS} FROM tokens WHERE id IN (SELECT value FROM json_each(?1)) ORDER BY id"
        );
        self.rows(sql, vec![Box::new(ids)]).await
    }

    async fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let q = q.clone();
        self.with(move |c, _| {
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
        .await
    }

    async fn version(&self) -> Result<u64, StoreError> {
        self.with(|c, _| meta_number(c, "version")).await
    }

    async fn changes_since(&self, since: u64, limit: u32) -> Result<Changes, StoreError> {
        self.with(move |c, _| {
            let tx = c.transaction()?;
            let rows = query_rows(
                &tx,
                &format!(
                    "SELECT {COLUMNS} FROM tokens WHERE version > ?1 ORDER BY version LIMIT ?2"
                ),
                &[&clamp(since), &limit],
            )?;
            let scopes = if meta_number(&tx, "scopes_version")? > since {
                Some(scope_set(&tx)?)
            } else {
                None
            };
            let changes = Changes {
                rows,
                horizon: meta_number(&tx, "horizon")?,
                live: live_count(&tx)?,
                scopes,
            };
            tx.commit()?;
            Ok(changes)
        })
        .await
    }

    async fn snapshot_page(&self, after_id: Option<&str>, limit: u32) -> Result<Page, StoreError> {
        let after = after_id.map(str::to_string);
        self.with(move |c, _| {
            let tx = c.transaction()?;
            let rows = query_rows(
                &tx,
                &format!(
                    "SELECT {COLUMNS} FROM tokens WHERE (?1 IS NULL OR id > ?1) ORDER BY id LIMIT ?2"
                ),
                &[&after, &limit],
            )?;
            let page = Page {
                rows,
                live: live_count(&tx)?,
                scopes: scope_set(&tx)?,
            };
            tx.commit()?;
            Ok(page)
        })
        .await
    }

    async fn claim_period(&self, job: &str, now: i64, period: i64) -> Result<bool, StoreError> {
        let job = job.to_string();
        self.with(move |c, _| {
            let n = c.execute(
                "INSERT INTO job_runs (name, last_run, runs) VALUES (?1, ?2, 1)
                 ON CONFLICT(name) DO UPDATE SET last_run = excluded.last_run, runs = runs + 1
                 WHERE job_runs.last_run <= excluded.last_run - ?3",
                params![job, now, period],
            )?;
            Ok(n == 1)
        })
        .await
    }

    async fn period_runs(&self, job: &str) -> Result<u64, StoreError> {
        let job = job.to_string();
        self.with(move |c, _| {
            let n: Option<i64> = c
                .query_row("SELECT runs FROM job_runs WHERE name = ?1", [&job], |r| {
                    r.get(0)
                })
                .optional()?;
            Ok(n.unwrap_or(0).max(0) as u64)
        })
        .await
    }

    async fn expiring(&self, now: i64, until: i64) -> Result<Vec<Expiring>, StoreError> {
        self.with(move |c, _| {
            let tokens = query_rows(
                c,
                &format!(
                    "SELECT {COLUMNS} FROM tokens WHERE status != 'revoked'
                       AND expires_at > ?1 AND expires_at <= ?2 ORDER BY id"
                ),
                &[&now, &until],
            )?;
            let mut stmt = c.prepare_cached(
                "SELECT min(lead) FROM expiry_warnings WHERE token_id = ?1 AND expires_at = ?2",
            )?;
            let mut out = Vec::with_capacity(tokens.len());
            for token in tokens {
                let warned_lead: Option<i64> =
                    stmt.query_row(params![token.id, token.expires_at], |r| r.get(0))?;
                out.push(Expiring { token, warned_lead });
            }
            Ok(out)
        })
        .await
    }

    async fn record_warning(
        &self,
        warning: &WarningRecord,
        audit: &AuditRecord,
        event: Option<&Event>,
    ) -> Result<bool, StoreError> {
        let (w, audit, event) = (warning.clone(), audit.clone(), event.cloned());
        self.with(move |c, _| {
            let tx = c.transaction()?;
            let inserted = tx.execute(
                "INSERT INTO expiry_warnings (token_id, expires_at, lead, issued_at)
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                params![w.token_id, w.expires_at, w.lead, w.at],
            )?;
            if inserted == 0 {
                return Ok(false);
            }
            append_audit(&tx, &audit)?;
            if let Some(e) = event {
                tx.execute(
                    "INSERT INTO outbox (event_id, event_type, payload, created_at, next_attempt_at)
                     VALUES (?1, ?2, ?3, ?4, ?4)",
                    params![e.id, e.kind, e.payload, e.at],
                )?;
            }
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    async fn purgeable(&self, cutoff: i64, limit: u32) -> Result<Vec<TokenRow>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM tokens
             WHERE (status = 'revoked' AND updated_at <= ?1) OR expires_at <= ?1
             ORDER BY id LIMIT ?2"
        );
        self.rows(sql, vec![Box::new(cutoff), Box::new(limit)])
            .await
    }

    async fn purge(&self, row: &TokenRow, audit: &AuditRecord) -> Result<bool, StoreError> {
        let (id, version, audit) = (row.id.clone(), row.version, audit.clone());
        self.with(move |c, _| {
            let tx = c.transaction()?;
            let deleted = tx.execute(
                "DELETE FROM tokens WHERE id = ?1 AND version = ?2",
                params![id, version as i64],
            )?;
            if deleted == 0 {
                return Ok(false);
            }
            tx.execute("DELETE FROM expiry_warnings WHERE token_id = ?1", [&id])?;
            append_audit(&tx, &audit)?;
            let horizon = meta_number(&tx, "horizon")?.max(version);
            set_meta(&tx, "horizon", horizon)?;
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    async fn prune_outbox(&self, cutoff: i64) -> Result<u64, StoreError> {
        self.with(move |c, _| {
            let n = c.execute(
                "DELETE FROM outbox WHERE coalesce(delivered_at, failed_at) <= ?1",
                [cutoff],
            )?;
            Ok(n as u64)
        })
        .await
    }

    async fn claim_deliveries(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.with(move |c, _| {
            let tx = c.transaction()?;
            let due = {
                let mut stmt = tx.prepare_cached(
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
                rows
            };
            for d in &due {
                tx.execute(
                    "UPDATE outbox SET next_attempt_at = ?2 WHERE id = ?1",
                    params![d.id, lease_until],
                )?;
            }
            tx.commit()?;
            Ok(due)
        })
        .await
    }

    async fn delivery_result(&self, id: i64, outcome: &DeliveryOutcome) -> Result<(), StoreError> {
        let outcome = outcome.clone();
        self.with(move |c, _| {
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
        .await
    }

    async fn insert_session(&self, s: &SessionRow, max: usize) -> Result<(), StoreError> {
        let s = s.clone();
        self.with(move |c, _| {
            let tx = c.transaction()?;
            let held: i64 = tx.query_row("SELECT count(*) FROM sessions", [], |r| r.get(0))?;
            let over = (held.max(0) as usize + 1).saturating_sub(max);
            if over > 0 {
                tx.execute(
                    "DELETE FROM sessions WHERE key IN
                       (SELECT key FROM sessions ORDER BY last_used_at LIMIT ?1)",
                    [over as i64],
                )?;
            }
            tx.execute(
                "INSERT INTO sessions (key, actor, started_at, last_used_at) VALUES (?1, ?2, ?3, ?4)",
                params![s.key, s.actor, s.started_at, s.last_used_at],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn touch_session(
        &self,
        key: &str,
        now: i64,
        idle_after: i64,
        started_after: i64,
    ) -> Result<Option<SessionRow>, StoreError> {
        let key = key.to_string();
        self.with(move |c, _| {
            let tx = c.transaction()?;
            let found = tx
                .query_row(
                    "SELECT actor, started_at, last_used_at FROM sessions WHERE key = ?1",
                    [&key],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, i64>(2)?,
                        ))
                    },
                )
                .optional()?;
            let Some((actor, started_at, last_used_at)) = found else {
                return Ok(None);
            };
            if last_used_at <= idle_after || started_at <= started_after {
                tx.execute("DELETE FROM sessions WHERE key = ?1", [&key])?;
                tx.commit()?;
                return Ok(None);
            }
            let last_used_at = last_used_at.max(now);
            tx.execute(
                "UPDATE sessions SET last_used_at = ?2 WHERE key = ?1",
                params![key, last_used_at],
            )?;
            tx.commit()?;
            Ok(Some(SessionRow {
                key,
                actor,
                started_at,
                last_used_at,
            }))
        })
        .await
    }

    async fn delete_session(&self, key: &str) -> Result<(), StoreError> {
        let key = key.to_string();
        self.with(move |c, _| {
            c.execute("DELETE FROM sessions WHERE key = ?1", [&key])?;
            Ok(())
        })
        .await
    }

    async fn session_count(&self) -> Result<u64, StoreError> {
        self.with(|c, _| {
            c.query_row("SELECT count(*) FROM sessions", [], |r| r.get::<_, i64>(0))
                .map(|n| n.max(0) as u64)
        })
        .await
    }

    async fn export(&self) -> Result<Dump, StoreError> {
        let store_id = self.inner.store_id.clone();
        self.with(move |c, _| {
            let tx = c.transaction()?;
            let mut stmt = tx.prepare(&format!(
                "SELECT {COLUMNS}, coalesce(created_seq, 0) FROM tokens ORDER BY id"
            ))?;
            let tokens = stmt
                .query_map([], |r| Ok((from_row(r)?, r.get::<_, i64>(AFTER_COLUMNS)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            drop(stmt);
            let mut stmt = tx.prepare(
                "SELECT seq, at, actor, action, token_id, token_name, before, after FROM audit
                 ORDER BY seq",
            )?;
            let audit = stmt
                .query_map([], audit_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            drop(stmt);
            let mut stmt = tx.prepare(
                "SELECT token_id, expires_at, lead, issued_at FROM expiry_warnings
                 ORDER BY token_id, expires_at, lead",
            )?;
            let warnings = stmt
                .query_map([], |r| {
                    Ok(WarningRecord {
                        token_id: r.get(0)?,
                        expires_at: r.get(1)?,
                        lead: r.get(2)?,
                        at: r.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            drop(stmt);
            let mut stmt = tx.prepare(
                "SELECT id, event_id, event_type, payload, created_at, attempts, next_attempt_at,
                        delivered_at, failed_at, last_error FROM outbox ORDER BY id",
            )?;
            let outbox = stmt
                .query_map([], |r| {
                    Ok(OutboxRow {
                        id: r.get(0)?,
                        event_id: r.get(1)?,
                        event_type: r.get(2)?,
                        payload: r.get(3)?,
                        created_at: r.get(4)?,
                        attempts: r.get(5)?,
                        next_attempt_at: r.get(6)?,
                        delivered_at: r.get(7)?,
                        failed_at: r.get(8)?,
                        last_error: r.get(9)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            drop(stmt);
            let mut stmt = tx.prepare("SELECT name, last_run, runs FROM job_runs ORDER BY name")?;
            let jobs = stmt
                .query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)?.max(0) as u64))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            drop(stmt);
            let dump = Dump {
                store_id,
                version: meta_number(&tx, "version")?,
                horizon: meta_number(&tx, "horizon")?,
                tokens,
                audit,
                warnings,
                outbox,
                jobs,
                scopes: scope_set(&tx)?,
            };
            tx.commit()?;
            Ok(dump)
        })
        .await
    }

    async fn import(&self, dump: &Dump) -> Result<(), StoreError> {
        let dump = dump.clone();
        self.with(move |c, published| {
            let tx = c.transaction()?;
            let used: i64 = tx.query_row(
                "SELECT (SELECT count(*) FROM tokens) + (SELECT count(*) FROM audit)
                      + (SELECT count(*) FROM scopes)",
                [],
                |r| r.get(0),
            )?;
            if used > 0 || meta_number(&tx, "version")? > 0 {
                return Ok(Err(StoreError::Conflict(
                    "the target database already holds tokens; migrate into an empty one".into(),
                )));
            }
            for (r, created_seq) in &dump.tokens {
                tx.execute(
                    &format!(
                        "INSERT INTO tokens ({COLUMNS}, created_seq) VALUES
                         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                          ?17, ?18, ?19, ?20, ?21, ?22)"
                    ),
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
                        clamp(r.requests_allowed),
                        clamp(r.requests_denied),
                        r.rotated_at,
                        retired_text(r)?,
                        r.limit_scope.as_str(),
                        scopes_text(r)?,
                        super::quota_columns(r.quota).0,
                        super::quota_columns(r.quota).1,
                        created_seq
                    ],
                )?;
            }
            for a in &dump.audit {
                tx.execute(
                    "INSERT INTO audit (seq, at, actor, action, token_id, token_name, before, after)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![
                        clamp(a.seq),
                        a.at,
                        a.actor,
                        a.action,
                        a.token_id,
                        a.token_name,
                        a.before.as_ref().map(Value::to_string),
                        a.after.as_ref().map(Value::to_string)
                    ],
                )?;
            }
            for w in &dump.warnings {
                tx.execute(
                    "INSERT INTO expiry_warnings (token_id, expires_at, lead, issued_at)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![w.token_id, w.expires_at, w.lead, w.at],
                )?;
            }
            for o in &dump.outbox {
                tx.execute(
                    "INSERT INTO outbox (id, event_id, event_type, payload, created_at, attempts,
                         next_attempt_at, delivered_at, failed_at, last_error)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                    params![
                        o.id,
                        o.event_id,
                        o.event_type,
                        o.payload,
                        o.created_at,
                        o.attempts,
                        o.next_attempt_at,
                        o.delivered_at,
                        o.failed_at,
                        o.last_error
                    ],
                )?;
            }
            for (name, last_run, runs) in &dump.jobs {
                tx.execute(
                    "INSERT INTO job_runs (name, last_run, runs) VALUES (?1, ?2, ?3)
                     ON CONFLICT(name) DO UPDATE SET last_run = excluded.last_run, runs = excluded.runs",
                    params![name, last_run, clamp(*runs)],
                )?;
            }
            for sc in &dump.scopes.scopes {
                tx.execute(
                    &format!("INSERT INTO scopes ({SCOPE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"),
                    params![
                        sc.name,
                        sc.description,
                        to_text(&sc.rules)?,
                        sc.created_at,
                        sc.updated_at,
                        clamp(sc.version)
                    ],
                )?;
            }
            set_meta(&tx, "version", dump.version)?;
            set_meta(&tx, "horizon", dump.horizon)?;
            set_meta(&tx, "scopes_version", dump.scopes.version)?;
            tx.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'store_id'",
                [&dump.store_id],
            )?;
            tx.commit()?;
            published.publish(dump.version);
            Ok(Ok(()))
        })
        .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audit_trail_is_append_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("t.db")).unwrap();
        let conn = s.inner.conn.lock().unwrap();
        conn.execute(
            "INSERT INTO audit (at, actor, action, token_id, token_name) VALUES (1, 'a', 'b', 'c', 'd')",
            [],
        )
        .unwrap();
        assert!(conn.execute("DELETE FROM audit", []).is_err());
        assert!(conn.execute("UPDATE audit SET actor = 'x'", []).is_err());
    }
}
