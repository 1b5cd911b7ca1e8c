//! PostgreSQL store: several `tokengate serve` replicas share one database.
//!
//! Versions. Every change takes the next version by incrementing the single row of
//! `tokengate_sync` inside its own transaction. That `UPDATE` locks the row until the
//! transaction ends, so a second writer waits for the first to commit (or roll back) before
//! it can take a version, and then reads the committed value. Versions are therefore taken
//! and committed in the same order, and PostgreSQL makes a transaction visible before it
//! releases its locks: whenever version V is visible to a reader, so is every version below
//! V, whichever replica wrote it. A reader asking for "rows with a version above S" can never
//! see V and later learn of a smaller version it skipped. (A sequence would not do: `nextval`
//! is not transactional, so version 8 could commit and be read before version 7 commits.)
//! The price is that writers take turns on one row, which bounds writes per second by the
//! commit latency; changes to tokens are rare next to reads.
//!
//! Change signal. A write sends `NOTIFY tokengate_changes` in its transaction (delivered at
//! commit). One connection per replica LISTENs, and a notification only wakes it: it then
//! reads the version from the database (on its own connection) and publishes that.
//! Notifications sent while the listening connection is down are lost, so the listener
//! re-reads the version after every (re)connection and every `recheck` interval as well.
//!
//! Migrations run at start under a session advisory lock, so replicas that start at once
//! migrate one after the other; a database whose schema is newer than this binary knows is
//! refused, naming both versions.

use super::{
    AuditEntry, AuditQuery, AuditRecord, Changes, Delivery, DeliveryOutcome, DemandOf, DemandRow,
    Dump, Event, Expiring, ListQuery, OutboxRow, Page, ProxySeen, Published, QuotaDecision,
    QuotaHolder, QuotaSpent, QuotaState, QuotaWrite, ScopeDeletion, ScopeRow, ScopeSet, SessionRow,
    Status, Store, StoreError, TokenRow, WarningRecord,
};
use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use rand::distributions::{Alphanumeric, DistString};
use serde_json::Value;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;
use tokengate_wire::{TokenDemand, UsageEntry};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, IsolationLevel, NoTls, Row};

/// Each entry upgrades the schema by one version (`tokengate_schema.version`); never edit a
/// shipped one. A newer release's migrations must keep the previous release working, since
/// replicas of both run side by side during a rolling update.
const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE tokengate_meta (key text PRIMARY KEY, value text NOT NULL);
    CREATE TABLE tokengate_sync (
        one boolean PRIMARY KEY DEFAULT true CHECK (one),
        version bigint NOT NULL,
        horizon bigint NOT NULL
    );
    INSERT INTO tokengate_sync (version, horizon) VALUES (0, 0);
    CREATE TABLE tokens (
        id text PRIMARY KEY,
        hash text NOT NULL UNIQUE,
        name text NOT NULL,
        kind text NOT NULL,
        owner text NOT NULL,
        status text NOT NULL,
        max_rps bigint,
        burst bigint,
        created_at bigint NOT NULL,
        updated_at bigint NOT NULL,
        expires_at bigint,
        last_used_at bigint,
        version bigint NOT NULL,
        requests_allowed bigint NOT NULL DEFAULT 0,
        requests_denied bigint NOT NULL DEFAULT 0,
        rotated_at bigint,
        retired jsonb NOT NULL DEFAULT '[]',
        created_seq bigint NOT NULL
    );
    CREATE INDEX tokens_by_version ON tokens (version);
    CREATE INDEX tokens_by_expiry ON tokens (expires_at);
    CREATE INDEX tokens_by_created_seq ON tokens (created_seq);
    CREATE TABLE audit (
        seq bigserial PRIMARY KEY,
        at bigint NOT NULL,
        actor text NOT NULL,
        action text NOT NULL,
        token_id text NOT NULL,
        token_name text NOT NULL,
        before jsonb,
        after jsonb
    );
    CREATE INDEX audit_by_token ON audit (token_id, seq);
    CREATE FUNCTION tokengate_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'the audit trail is append-only'; END $$;
    CREATE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON audit
        FOR EACH ROW EXECUTE FUNCTION tokengate_audit_append_only();
    CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
        FOR EACH STATEMENT EXECUTE FUNCTION tokengate_audit_append_only();
    CREATE TABLE expiry_warnings (
        token_id text NOT NULL,
        expires_at bigint NOT NULL,
        lead bigint NOT NULL,
        issued_at bigint NOT NULL,
        PRIMARY KEY (token_id, expires_at, lead)
    );
    CREATE TABLE outbox (
        id bigserial PRIMARY KEY,
        event_id text NOT NULL UNIQUE,
        event_type text NOT NULL,
        payload text NOT NULL,
        created_at bigint NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        next_attempt_at bigint NOT NULL,
        delivered_at bigint,
        failed_at bigint,
        last_error text
    );
    CREATE INDEX outbox_due ON outbox (next_attempt_at)
        WHERE delivered_at IS NULL AND failed_at IS NULL;
    CREATE TABLE sessions (
        key text PRIMARY KEY,
        actor text NOT NULL,
        started_at bigint NOT NULL,
        last_used_at bigint NOT NULL
    );
    CREATE INDEX sessions_by_use ON sessions (last_used_at);
    CREATE TABLE job_runs (
        name text PRIMARY KEY,
        last_run bigint NOT NULL,
        runs bigint NOT NULL
    );
"#,
    // Fleet-wide limits: each token's scope, the proxies' reports.
    r#"
    ALTER TABLE tokens ADD COLUMN limit_scope text NOT NULL DEFAULT 'fleet';
    CREATE TABLE fleet_proxies (
        proxy_id text PRIMARY KEY,
        interval_ms integer NOT NULL,
        seen_at_ms bigint NOT NULL
    );
    CREATE TABLE fleet_demand (
        token_id text NOT NULL,
        proxy_id text NOT NULL,
        admitted bigint NOT NULL,
        refused bigint NOT NULL,
        interval_ms integer NOT NULL,
        seen_at_ms bigint NOT NULL,
        PRIMARY KEY (token_id, proxy_id)
    );
    CREATE INDEX fleet_demand_by_proxy ON fleet_demand (proxy_id, seen_at_ms);
    CREATE INDEX fleet_demand_by_age ON fleet_demand (seen_at_ms);
"#,
    // Scopes, the scopes each token is limited to (NULL: unrestricted), and the version of
    // the last scope change (a deletion included).
    r#"
    CREATE TABLE scopes (
        name text PRIMARY KEY,
        description text NOT NULL,
        rules jsonb NOT NULL,
        created_at bigint NOT NULL,
        updated_at bigint NOT NULL,
        version bigint NOT NULL
    );
    ALTER TABLE tokens ADD COLUMN scopes jsonb;
    ALTER TABLE tokengate_sync ADD COLUMN scopes_version bigint NOT NULL DEFAULT 0;
    "#,
    // Quotas: each token's, and what each proxy holds of it per period.
    r#"
    ALTER TABLE tokens ADD COLUMN quota_limit bigint;
    ALTER TABLE tokens ADD COLUMN quota_period text;
    CREATE INDEX tokens_with_quota ON tokens (id) WHERE quota_limit IS NOT NULL;
    CREATE TABLE quota_holders (
        token_id text NOT NULL,
        period_start bigint NOT NULL,
        proxy_id text NOT NULL,
        hash text NOT NULL,
        period_end bigint NOT NULL,
        spent bigint NOT NULL,
        carried bigint NOT NULL,
        held bigint NOT NULL,
        granted bigint NOT NULL,
        rate_milli bigint NOT NULL,
        seen_at_ms bigint NOT NULL,
        PRIMARY KEY (token_id, period_start, proxy_id, hash)
    );
    CREATE INDEX quota_holders_by_end ON quota_holders (period_end);
    CREATE TABLE quota_exhausted (
        token_id text NOT NULL,
        period_start bigint NOT NULL,
        period_end bigint NOT NULL,
        at bigint NOT NULL,
        PRIMARY KEY (token_id, period_start)
    );
"#,
];

/// The schema version this binary migrates to.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// The advisory lock key that serialises migrations across replicas ("tokengat" in ASCII).
const MIGRATION_LOCK: i64 = 0x746f_6b65_6e67_6174;
/// The NOTIFY channel of committed changes; the payload (the version) is not trusted.
const CHANNEL: &str = "tokengate_changes";

const COLUMNS: &str =
    "id, hash, name, kind, owner, status, max_rps, burst, created_at, updated_at, \
     expires_at, last_used_at, version, requests_allowed, requests_denied, rotated_at, retired, \
     limit_scope, scopes, quota_limit, quota_period";
/// How many columns `COLUMNS` names: a query's own columns follow them.
const AFTER_COLUMNS: usize = 21;

const SCOPE_COLUMNS: &str = "name, description, rules, created_at, updated_at, version";

/// Connection settings beyond the URL.
#[derive(Debug, Clone, Copy)]
pub struct PgSettings {
    /// Most connections to PostgreSQL from this replica (the listener's is extra).
    pub pool_size: usize,
    /// Longest a store call may take (waiting for a connection included) before it fails as
    /// "store unavailable".
    pub timeout: Duration,
    /// How often the version is re-read even without a notification.
    pub recheck: Duration,
}

impl Default for PgSettings {
    fn default() -> PgSettings {
        PgSettings {
            pool_size: 16,
            timeout: Duration::from_secs(5),
            recheck: Duration::from_secs(5),
        }
    }
}

/// What a query can fail with: the database's error, or a store decision (an edit refused,
/// a row that does not decode).
enum PgError {
    Db(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> PgError {
        PgError::Db(e)
    }
}

impl From<StoreError> for PgError {
    fn from(e: StoreError) -> PgError {
        PgError::Store(e)
    }
}

/// Whether the database is unreachable rather than refusing this query.
fn connection_lost(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        None => true,
        Some(c) => {
            *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || *c == SqlState::CONNECTION_FAILURE
                || *c == SqlState::CONNECTION_EXCEPTION
                || *c == SqlState::TOO_MANY_CONNECTIONS
                || *c == SqlState::READ_ONLY_SQL_TRANSACTION
        }
    }
}

fn retryable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    })
}

/// The error with the server's own words, when it said any ("db error" alone says nothing).
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} ({})", d.message(), d.code().code()),
        None => e.to_string(),
    }
}

/// A pool error, described like a query's.
fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Unavailable(match e {
        deadpool_postgres::PoolError::Backend(e) => format!("cannot connect: {}", describe(&e)),
        other => other.to_string(),
    })
}

fn classify(e: tokio_postgres::Error) -> StoreError {
    if connection_lost(&e) {
        return StoreError::Unavailable(describe(&e));
    }
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        let detail = e
            .as_db_error()
            .map_or_else(|| e.to_string(), |d| d.message().to_string());
        return StoreError::Conflict(detail);
    }
    StoreError::Backend(describe(&e))
}

fn decode(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("bad row in the database: {e}"))
}

fn from_row(r: &Row) -> Result<TokenRow, StoreError> {
    from_row_at(r, 0)
}

/// A token from `COLUMNS` starting at column `at` of a row.
fn from_row_at(r: &Row, at: usize) -> Result<TokenRow, StoreError> {
    let text = |i: usize| r.try_get::<_, String>(at + i).map_err(decode);
    let int = |i: usize| r.try_get::<_, i64>(at + i).map_err(decode);
    let opt = |i: usize| r.try_get::<_, Option<i64>>(at + i).map_err(decode);
    let small = |i: usize| -> Result<Option<u32>, StoreError> {
        opt(i)?
            .map(|v| u32::try_from(v).map_err(decode))
            .transpose()
    };
    let kind = text(3)?;
    let status = text(5)?;
    let retired: Value = r.try_get(at + 16).map_err(decode)?;
    let scope = text(17)?;
    let scopes: Option<Value> = r.try_get(at + 18).map_err(decode)?;
    let quota_period: Option<String> = r.try_get(at + 20).map_err(decode)?;
    let quota = super::quota_from_columns(opt(19)?, quota_period.as_deref()).map_err(decode)?;
    Ok(TokenRow {
        id: text(0)?,
        hash: text(1)?,
        name: text(2)?,
        kind: super::parse_kind(&kind).ok_or_else(|| decode(format!("kind `{kind}`")))?,
        owner: text(4)?,
        status: Status::parse(&status).ok_or_else(|| decode(format!("status `{status}`")))?,
        max_rps: small(6)?,
        burst: small(7)?,
        limit_scope: super::parse_scope(&scope)
            .ok_or_else(|| decode(format!("limit_scope `{scope}`")))?,
        created_at: int(8)?,
        updated_at: int(9)?,
        expires_at: opt(10)?,
        last_used_at: opt(11)?,
        version: int(12)?.max(0) as u64,
        requests_allowed: int(13)?.max(0) as u64,
        requests_denied: int(14)?.max(0) as u64,
        rotated_at: opt(15)?,
        retired: serde_json::from_value(retired).map_err(decode)?,
        scopes: scopes
            .map(serde_json::from_value)
            .transpose()
            .map_err(decode)?,
        quota,
    })
}

/// A scope from `SCOPE_COLUMNS` starting at column `at` of a row.
fn scope_at(r: &Row, at: usize) -> Result<ScopeRow, StoreError> {
    let rules: Value = r.try_get(at + 2).map_err(decode)?;
    Ok(ScopeRow {
        name: r.try_get(at).map_err(decode)?,
        description: r.try_get(at + 1).map_err(decode)?,
        rules: serde_json::from_value(rules).map_err(decode)?,
        created_at: r.try_get(at + 3).map_err(decode)?,
        updated_at: r.try_get(at + 4).map_err(decode)?,
        version: r.try_get::<_, i64>(at + 5).map_err(decode)?.max(0) as u64,
    })
}

/// Every scope and the last scope change's version, in one statement (one snapshot).
async fn scope_set<C: GenericClient + Sync>(c: &C) -> Result<ScopeSet, PgError> {
    let found = c
        .query(
            &format!(
                "SELECT s.scopes_version, sc.* FROM tokengate_sync s
                 LEFT JOIN LATERAL (SELECT {SCOPE_COLUMNS} FROM scopes ORDER BY name) sc ON true"
            ),
            &[],
        )
        .await?;
    let mut set = ScopeSet::default();
    for r in &found {
        set.version = r.get::<_, i64>(0).max(0) as u64;
        if r.try_get::<_, Option<String>>(1).map_err(decode)?.is_some() {
            set.scopes.push(scope_at(r, 1)?);
        }
    }
    Ok(set)
}

fn json(v: &impl serde::Serialize) -> Result<Value, PgError> {
    serde_json::to_value(v).map_err(|e| PgError::Store(StoreError::Backend(e.to_string())))
}

fn scopes_json(r: &TokenRow) -> Result<Option<Value>, PgError> {
    r.scopes.as_ref().map(json).transpose()
}

/// `Conflict` when a live token would name a scope that is not there (see `Store::insert`).
/// The scopes it names stay share-locked to the end of the transaction: a deletion waits for
/// it, and then counts this token among the scope's users.
async fn check_scopes_exist(
    tx: &deadpool_postgres::Transaction<'_>,
    r: &TokenRow,
) -> Result<(), PgError> {
    let Some(wanted) = r.scopes.as_ref().filter(|_| r.status != Status::Revoked) else {
        return Ok(());
    };
    let stmt = tx
        .prepare_cached("SELECT name FROM scopes WHERE name = ANY($1) ORDER BY name FOR SHARE")
        .await?;
    let found: Vec<String> = tx
        .query(&stmt, &[wanted])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    match super::missing_scopes(wanted, &found) {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// Like `next_version`, for a scope change: the version taken is also the last scope
/// change's.
fn next_scope_version() -> String {
    format!(
        "WITH v AS (
             UPDATE tokengate_sync SET version = version + 1, scopes_version = version + 1
             RETURNING version),
         n AS (SELECT pg_notify('{CHANNEL}', version::text) FROM v)"
    )
}

fn rows(rs: &[Row]) -> Result<Vec<TokenRow>, PgError> {
    rs.iter()
        .map(|r| from_row(r).map_err(PgError::Store))
        .collect()
}

fn clamp(n: u64) -> i64 {
    n.min(i64::MAX as u64) as i64
}

/// `postgres://user:secret@host/db?password=...` as `postgres://user@host/db`: fit for a
/// log line or an error message.
pub fn redacted(url: &str) -> String {
    let url = url.split('?').next().unwrap_or_default();
    let Some((scheme, rest)) = url.split_once("://") else {
        return "(a PostgreSQL connection string)".into();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}@{host}{path}")
        }
        None => format!("{scheme}://{authority}{path}"),
    }
}

fn config(url: &str, settings: &PgSettings) -> Result<tokio_postgres::Config, StoreError> {
    let mut cfg = tokio_postgres::Config::from_str(url).map_err(|e| {
        StoreError::Backend(format!("not a PostgreSQL URL ({}): {e}", redacted(url)))
    })?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(settings.timeout);
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name("tokengate");
    }
    // A peer that vanishes without a reset (a cut cable, a dropped route) must not hold a
    // connection forever: unacknowledged data fails the socket after the user timeout, and
    // an idle one fails its keepalive probes (10 s idle, then 3 probes 2 s apart) rather
    // than after the kernel's default of about eleven minutes.
    cfg.keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(2))
        .keepalives_retries(3)
        .tcp_user_timeout(settings.timeout.max(Duration::from_secs(2)) * 2);
    Ok(cfg)
}

async fn migrate(client: &mut tokio_postgres::Client) -> Result<String, PgError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = migrate_locked(client).await;
    // Ending the session releases the lock too; this only hands it over sooner.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result
}

async fn migrate_locked(client: &mut tokio_postgres::Client) -> Result<String, PgError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS tokengate_schema (
                 one boolean PRIMARY KEY DEFAULT true CHECK (one),
                 version integer NOT NULL
             )",
        )
        .await?;
    let current = client
        .query_opt("SELECT version FROM tokengate_schema", &[])
        .await?
        .map_or(0, |r| r.get::<_, i32>(0));
    let known = SCHEMA_VERSION;
    let current = usize::try_from(current).unwrap_or(0);
    if current > known {
        return Err(StoreError::Backend(super::newer_schema(current, known)).into());
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.execute(
            "INSERT INTO tokengate_schema (version) VALUES ($1)
             ON CONFLICT (one) DO UPDATE SET version = excluded.version",
            &[&version],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(schema_version = i + 1, "database migrated");
    }
    let id = format!(
        "st_{}",
        Alphanumeric.sample_string(&mut rand::rngs::OsRng, 16)
    );
    client
        .execute(
            "INSERT INTO tokengate_meta (key, value) VALUES ('store_id', $1)
             ON CONFLICT (key) DO NOTHING",
            &[&id],
        )
        .await?;
    let row = client
        .query_one(
            "SELECT value FROM tokengate_meta WHERE key = 'store_id'",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

async fn read_version(pool: &Pool) -> Result<u64, StoreError> {
    let client = pool.get().await.map_err(pool_error)?;
    let row = client
        .query_one("SELECT version FROM tokengate_sync", &[])
        .await
        .map_err(classify)?;
    Ok(row.get::<_, i64>(0).max(0) as u64)
}

/// LISTENs on its own connection; each notification, each (re)connection and each `recheck`
/// re-reads the version and publishes it.
async fn listen(
    cfg: tokio_postgres::Config,
    published: Published,
    settings: PgSettings,
    mut stop: watch::Receiver<bool>,
) {
    let (recheck, timeout) = (settings.recheck, settings.timeout);
    // Told apart from the pool's connections in pg_stat_activity.
    let mut cfg = cfg;
    let name = format!(
        "{} listener",
        cfg.get_application_name().unwrap_or("tokengate")
    );
    cfg.application_name(name);
    let mut backoff = Duration::from_millis(100);
    loop {
        if *stop.borrow() {
            return;
        }
        // The connect timeout covers the socket only; a server that accepts and then says
        // nothing must not hold the listener either.
        let connected = tokio::select! {
            c = tokio::time::timeout(timeout, cfg.connect(NoTls)) => c,
            _ = stop.changed() => return,
        };
        let (client, mut connection) = match connected {
            Ok(Ok(c)) => c,
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {timeout:?}"),
                };
                tracing::warn!(%error, "change listener cannot connect to PostgreSQL; retrying");
                published.set_hearing(false);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let (wake_tx, mut wake) = tokio::sync::mpsc::unbounded_channel::<()>();
        let driver = tokio::spawn(async move {
            while let Some(m) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                match m {
                    Ok(AsyncMessage::Notification(_)) => {
                        if wake_tx.send(()).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "change listener lost its connection");
                        return;
                    }
                }
            }
        });
        let listening =
            tokio::time::timeout(timeout, client.batch_execute(&format!("LISTEN {CHANNEL}"))).await;
        if !matches!(listening, Ok(Ok(()))) {
            tracing::warn!("change listener cannot LISTEN; retrying");
            published.set_hearing(false);
            driver.abort();
            tokio::time::sleep(backoff).await;
            continue;
        }
        backoff = Duration::from_millis(100);
        tracing::debug!("change listener connected");
        let mut ticker = tokio::time::interval(recheck);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The first tick is immediate: re-read after every (re)connection.
            tokio::select! {
                _ = ticker.tick() => {}
                w = wake.recv() => if w.is_none() { break },
                _ = stop.changed() => { driver.abort(); return; }
            }
            // Coalesce a burst of notifications into one read.
            while wake.try_recv().is_ok() {}
            // Read on the listening connection itself: one round trip, and a check that it
            // still answers (one cut off without a reset, a silent partition, looks alive and
            // hears nothing), else connect again.
            let read = tokio::time::timeout(
                timeout,
                client.query_one("SELECT version FROM tokengate_sync", &[]),
            )
            .await;
            match read {
                Ok(Ok(row)) => {
                    published.publish(row.get::<_, i64>(0).max(0) as u64);
                    published.set_hearing(true);
                }
                _ => {
                    tracing::warn!("change listener's connection does not answer; reconnecting");
                    published.set_hearing(false);
                    break;
                }
            }
        }
        drop(client);
        driver.abort();
    }
}

/// Runs `$body` (an async block's contents yielding `Result<T, PgError>`, with `$c` the
/// connection) on a pooled connection within the store's timeout, as many times as
/// `PostgresStore::settle` says. A macro rather than a function taking an async closure, so
/// that the futures stay `Send` for `async_trait`.
macro_rules! pg {
    ($store:expr, |$c:ident| $body:block) => {{
        let store: &PostgresStore = $store;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let mut client = match store.pool.get().await {
                Ok(c) => c,
                Err(e) => break Err(pool_error(e)),
            };
            let outcome = {
                let $c = &mut client;
                tokio::time::timeout(store.timeout, async {
                    let r: Result<_, PgError> = async { $body }.await;
                    r
                })
                .await
            };
            if let Some(done) = store.settle(outcome, client, attempts) {
                break done;
            }
        }
    }};
}

pub struct PostgresStore {
    pool: Pool,
    store_id: String,
    published: Published,
    timeout: Duration,
    stop: watch::Sender<bool>,
    listener: Mutex<Option<JoinHandle<()>>>,
}

impl PostgresStore {
    /// Connects, migrates (under the migration lock) and starts listening for changes.
    pub async fn open(url: &str, settings: PgSettings) -> Result<PostgresStore, StoreError> {
        let cfg = config(url, &settings)?;
        let (mut client, connection) = tokio::time::timeout(settings.timeout, cfg.connect(NoTls))
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!("no answer within {:?}", settings.timeout))
            })?
            .map_err(|e| StoreError::Unavailable(describe(&e)))?;
        let driver = tokio::spawn(connection);
        let store_id = migrate(&mut client).await.map_err(|e| match e {
            PgError::Db(e) => classify(e),
            PgError::Store(e) => e,
        })?;
        drop(client);
        let _ = driver.await;
        let manager = Manager::from_config(
            cfg.clone(),
            NoTls,
            ManagerConfig {
                // A connection cut off silently looks open: check each one as it leaves
                // the pool (a round trip), so that calls after a partition do not meet it.
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(settings.timeout))
            .create_timeout(Some(settings.timeout))
            .recycle_timeout(Some(settings.timeout))
            .build()
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let published = Published::new(read_version(&pool).await?);
        let (stop, stop_rx) = watch::channel(false);
        let listener = tokio::spawn(listen(cfg, published.clone(), settings, stop_rx));
        Ok(PostgresStore {
            pool,
            store_id,
            published,
            timeout: settings.timeout,
            stop,
            listener: Mutex::new(Some(listener)),
        })
    }

    /// After an attempt at a store call: its result, or a retry (a deadlock or a
    /// serialisation failure). A connection that failed or timed out goes, rather than back
    /// to the pool.
    fn settle<T>(
        &self,
        outcome: Result<Result<T, PgError>, tokio::time::error::Elapsed>,
        client: deadpool_postgres::Client,
        attempts: u32,
    ) -> Option<Result<T, StoreError>> {
        match outcome {
            Ok(Ok(v)) => Some(Ok(v)),
            Ok(Err(PgError::Store(e))) => Some(Err(e)),
            Ok(Err(PgError::Db(e))) if retryable(&e) && attempts < 8 => None,
            Ok(Err(PgError::Db(e))) => {
                if connection_lost(&e) {
                    drop(deadpool_postgres::Object::take(client));
                }
                Some(Err(classify(e)))
            }
            Err(_) => {
                drop(deadpool_postgres::Object::take(client));
                Some(Err(StoreError::Unavailable(format!(
                    "no answer from PostgreSQL within {:?}",
                    self.timeout
                ))))
            }
        }
    }

    async fn token_rows(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<TokenRow>, StoreError> {
        pg!(self, |c| {
            let stmt = c.prepare_cached(sql).await?;
            rows(&c.query(&stmt, params).await?)
        })
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// The start of a write's last statement: takes the next version (raising the horizon to
/// `$horizon` when `$raise`) and announces it at commit. The counter row stays locked from
/// here to the end of the transaction (see the module comment), so every write does all
/// else first: the lock is held for this one statement and the commit.
fn next_version() -> String {
    format!(
        "WITH v AS (
             UPDATE tokengate_sync SET version = version + 1,
                 horizon = CASE WHEN $1 THEN GREATEST(horizon, $2) ELSE horizon END
             RETURNING version),
         n AS (SELECT pg_notify('{CHANNEL}', version::text) FROM v)"
    )
}

async fn append_audit(
    tx: &deadpool_postgres::Transaction<'_>,
    a: &AuditRecord,
) -> Result<(), PgError> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO audit (at, actor, action, token_id, token_name, before, after)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &a.at,
            &a.actor,
            &a.action,
            &a.token_id,
            &a.token_name,
            &a.before,
            &a.after,
        ],
    )
    .await?;
    Ok(())
}

fn retired_json(r: &TokenRow) -> Result<Value, PgError> {
    serde_json::to_value(&r.retired).map_err(|e| PgError::Store(StoreError::Backend(e.to_string())))
}

fn deliveries(found: &[Row]) -> Vec<Delivery> {
    found
        .iter()
        .map(|r| Delivery {
            id: r.get(0),
            event_id: r.get(1),
            event_type: r.get(2),
            payload: r.get(3),
            attempts: r.get::<_, i32>(4).max(0) as u32,
        })
        .collect()
}

#[async_trait]
impl Store for PostgresStore {
    fn store_id(&self) -> &str {
        &self.store_id
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.published.subscribe()
    }

    fn hearing(&self) -> watch::Receiver<bool> {
        self.published.hearing()
    }

    fn pool(&self) -> Option<(usize, usize, usize, usize)> {
        let s = self.pool.status();
        Some((s.size, s.available, s.waiting, s.max_size))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        pg!(self, |c| {
            c.simple_query("SELECT 1").await?;
            Ok(())
        })
    }

    async fn close(&self) {
        let _ = self.stop.send(true);
        let listener = self.listener.lock().ok().and_then(|mut l| l.take());
        if let Some(l) = listener {
            let _ = l.await;
        }
        self.pool.close();
    }

    async fn insert(&self, row: TokenRow, audit: &AuditRecord) -> Result<TokenRow, StoreError> {
        let created = pg!(self, |c| {
            let mut row = row.clone();
            let tx = c.transaction().await?;
            check_scopes_exist(&tx, &row).await?;
            append_audit(&tx, audit).await?;
            let retired = retired_json(&row)?;
            let scopes = scopes_json(&row)?;
            let (quota_limit, quota_period) = super::quota_columns(row.quota);
            // The version doubles as the creation order: it is taken in commit order.
            let stmt = tx
                .prepare_cached(&format!(
                    "{}
                     INSERT INTO tokens ({COLUMNS}, created_seq)
                     SELECT $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, v.version,
                            0, 0, $15, $16, $17, $18, $19, $20, v.version
                     FROM v, n RETURNING version",
                    next_version()
                ))
                .await?;
            let version: i64 = tx
                .query_one(
                    &stmt,
                    &[
                        &false,
                        &0i64,
                        &row.id,
                        &row.hash,
                        &row.name,
                        &row.kind.as_str(),
                        &row.owner,
                        &row.status.as_str(),
                        &row.max_rps.map(i64::from),
                        &row.burst.map(i64::from),
                        &row.created_at,
                        &row.updated_at,
                        &row.expires_at,
                        &row.last_used_at,
                        &row.rotated_at,
                        &retired,
                        &row.limit_scope.as_str(),
                        &scopes,
                        &quota_limit,
                        &quota_period,
                    ],
                )
                .await?
                .get(0);
            tx.commit().await?;
            row.version = version.max(0) as u64;
            Ok(row)
        })?;
        self.published.publish(created.version);
        Ok(created)
    }

    async fn token(&self, id: &str) -> Result<Option<TokenRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM tokens WHERE id = $1");
        Ok(self.token_rows(&sql, &[&id]).await?.pop())
    }

    async fn list(&self, q: &ListQuery) -> Result<Vec<TokenRow>, StoreError> {
        let order = if q.newest_first {
            "created_seq DESC"
        } else {
            "id"
        };
        // strpos on lower(): a plain substring, no pattern characters.
        let sql = format!(
            "SELECT {COLUMNS} FROM tokens WHERE status <> 'revoked'
               AND ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR owner = $2)
               AND ($3::text IS NULL OR kind = $3) AND ($4::text IS NULL OR id > $4)
               AND ($5::bigint IS NULL OR (expires_at > $5 AND expires_at <= $6))
               AND ($8::text IS NULL OR strpos(lower(name), lower($8)) > 0)
               AND ($9::text IS NULL OR created_seq < (SELECT created_seq FROM tokens WHERE id = $9))
               AND ($10::boolean IS NULL OR $10 = (expires_at IS NOT NULL AND expires_at <= $11))
             ORDER BY {order} LIMIT $7"
        );
        let status = q.status.map(Status::as_str);
        let kind = q.kind.map(|k| k.as_str());
        let (from, to) = (q.expiring.map(|e| e.0), q.expiring.map(|e| e.1));
        let limit = i64::from(q.limit);
        self.token_rows(
            &sql,
            &[
                &status,
                &q.owner,
                &kind,
                &q.after,
                &from,
                &to,
                &limit,
                &q.name_contains,
                &q.before,
                &q.expired.map(|e| e.0),
                &q.expired.map(|e| e.1),
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
        let written = pg!(self, |c| {
            let mut row = row.clone();
            let tx = c.transaction().await?;
            let lock = tx
                .prepare_cached(
                    "SELECT version, requests_allowed, requests_denied, last_used_at
                     FROM tokens WHERE id = $1 FOR UPDATE",
                )
                .await?;
            let Some(current) = tx.query_opt(&lock, &[&row.id]).await? else {
                return Err(StoreError::NotFound.into());
            };
            if current.get::<_, i64>(0) as u64 != expected_version {
                return Err(StoreError::Stale.into());
            }
            row.requests_allowed = current.get::<_, i64>(1).max(0) as u64;
            row.requests_denied = current.get::<_, i64>(2).max(0) as u64;
            row.last_used_at = current.get(3);
            check_scopes_exist(&tx, &row).await?;
            append_audit(&tx, audit).await?;
            let retired = retired_json(&row)?;
            let scopes = scopes_json(&row)?;
            let (quota_limit, quota_period) = super::quota_columns(row.quota);
            let stmt = tx
                .prepare_cached(&format!(
                    "{}
                     UPDATE tokens SET hash = $4, name = $5, status = $6, max_rps = $7,
                         burst = $8, updated_at = $9, expires_at = $10, version = v.version,
                         rotated_at = $11, retired = $12, limit_scope = $13, scopes = $14,
                         quota_limit = $15, quota_period = $16
                     FROM v, n WHERE id = $3 RETURNING tokens.version",
                    next_version()
                ))
                .await?;
            let version: i64 = tx
                .query_one(
                    &stmt,
                    &[
                        &raise_horizon,
                        &clamp(expected_version),
                        &row.id,
                        &row.hash,
                        &row.name,
                        &row.status.as_str(),
                        &row.max_rps.map(i64::from),
                        &row.burst.map(i64::from),
                        &row.updated_at,
                        &row.expires_at,
                        &row.rotated_at,
                        &retired,
                        &row.limit_scope.as_str(),
                        &scopes,
                        &quota_limit,
                        &quota_period,
                    ],
                )
                .await?
                .get(0);
            tx.commit().await?;
            row.version = version.max(0) as u64;
            Ok(row)
        })?;
        self.published.publish(written.version);
        Ok(written)
    }

    async fn fleet_report(
        &self,
        proxy_id: &str,
        interval_ms: u32,
        now_ms: i64,
        forget_ms: i64,
        tokens: &[TokenDemand],
    ) -> Result<(), StoreError> {
        let ids: Vec<&str> = tokens.iter().map(|t| t.id.as_str()).collect();
        let admitted: Vec<i64> = tokens.iter().map(|t| clamp(t.admitted)).collect();
        let refused: Vec<i64> = tokens.iter().map(|t| clamp(t.refused)).collect();
        let interval = i32::try_from(interval_ms).unwrap_or(i32::MAX);
        pg!(self, |c| {
            // One statement per table; a report names each token once (the domain merges
            // duplicates), so the upsert never meets the same row twice.
            let seen = c
                .prepare_cached(
                    "INSERT INTO fleet_proxies (proxy_id, interval_ms, seen_at_ms)
                     VALUES ($1, $2, $3)
                     ON CONFLICT (proxy_id) DO UPDATE SET interval_ms = $2,
                         seen_at_ms = GREATEST(fleet_proxies.seen_at_ms, $3)",
                )
                .await?;
            c.execute(&seen, &[&proxy_id, &interval, &now_ms]).await?;
            if !ids.is_empty() {
                let demand = c
                    .prepare_cached(
                        "INSERT INTO fleet_demand
                             (token_id, proxy_id, admitted, refused, interval_ms, seen_at_ms)
                         SELECT id, $4, a, r, $5, $6
                         FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS e(id, a, r)
                         ON CONFLICT (token_id, proxy_id) DO UPDATE SET
                             admitted = EXCLUDED.admitted, refused = EXCLUDED.refused,
                             interval_ms = EXCLUDED.interval_ms, seen_at_ms = EXCLUDED.seen_at_ms
                         WHERE fleet_demand.seen_at_ms <= EXCLUDED.seen_at_ms",
                    )
                    .await?;
                c.execute(
                    &demand,
                    &[&ids, &admitted, &refused, &proxy_id, &interval, &now_ms],
                )
                .await?;
            }
            let forget = c
                .prepare_cached(
                    "WITH d AS (DELETE FROM fleet_demand WHERE seen_at_ms < $1)
                     DELETE FROM fleet_proxies WHERE seen_at_ms < $1",
                )
                .await?;
            c.execute(&forget, &[&forget_ms]).await?;
            Ok(())
        })
    }

    async fn fleet_proxies(&self, since_ms: i64) -> Result<Vec<ProxySeen>, StoreError> {
        pg!(self, |c| {
            let stmt = c
                .prepare_cached(
                    "SELECT proxy_id, interval_ms, seen_at_ms FROM fleet_proxies
                     WHERE seen_at_ms >= $1 ORDER BY proxy_id",
                )
                .await?;
            let rows = c.query(&stmt, &[&since_ms]).await?;
            Ok(rows
                .iter()
                .map(|r| ProxySeen {
                    proxy_id: r.get(0),
                    interval_ms: r.get::<_, i32>(1).max(0) as u32,
                    seen_at_ms: r.get(2),
                })
                .collect())
        })
    }

    async fn fleet_demand(
        &self,
        of: DemandOf<'_>,
        since_ms: i64,
    ) -> Result<Vec<DemandRow>, StoreError> {
        let (sql, key) = match of {
            DemandOf::Token(t) => (
                "SELECT token_id, proxy_id, admitted, refused, interval_ms, seen_at_ms
                 FROM fleet_demand WHERE token_id = $1 AND seen_at_ms >= $2
                 ORDER BY token_id, proxy_id",
                t,
            ),
            DemandOf::All => (
                "SELECT token_id, proxy_id, admitted, refused, interval_ms, seen_at_ms
                 FROM fleet_demand WHERE $1 = '' AND seen_at_ms >= $2
                 ORDER BY token_id, proxy_id",
                "",
            ),
        };
        pg!(self, |c| {
            let stmt = c.prepare_cached(sql).await?;
            let rows = c.query(&stmt, &[&key, &since_ms]).await?;
            Ok(rows
                .iter()
                .map(|r| DemandRow {
                    token_id: r.get(0),
                    proxy_id: r.get(1),
                    admitted: r.get::<_, i64>(2).max(0) as u64,
                    refused: r.get::<_, i64>(3).max(0) as u64,
                    interval_ms: r.get::<_, i32>(4).max(0) as u32,
                    seen_at_ms: r.get(5),
                })
                .collect())
        })
    }

    async fn insert_scope(
        &self,
        row: ScopeRow,
        audit: &AuditRecord,
    ) -> Result<ScopeRow, StoreError> {
        let created = pg!(self, |c| {
            let mut row = row.clone();
            let tx = c.transaction().await?;
            append_audit(&tx, audit).await?;
            let stmt = tx
                .prepare_cached(&format!(
                    "{}
                     INSERT INTO scopes ({SCOPE_COLUMNS})
                     SELECT $1, $2, $3, $4, $5, v.version FROM v, n RETURNING version",
                    next_scope_version()
                ))
                .await?;
            let version: i64 = tx
                .query_one(
                    &stmt,
                    &[
                        &row.name,
                        &row.description,
                        &json(&row.rules)?,
                        &row.created_at,
                        &row.updated_at,
                    ],
                )
                .await?
                .get(0);
            tx.commit().await?;
            row.version = version.max(0) as u64;
            Ok(row)
        })?;
        self.published.publish(created.version);
        Ok(created)
    }

    async fn scope(&self, name: &str) -> Result<Option<ScopeRow>, StoreError> {
        pg!(self, |c| {
            let stmt = c
                .prepare_cached(&format!(
                    "SELECT {SCOPE_COLUMNS} FROM scopes WHERE name = $1"
                ))
                .await?;
            match c.query_opt(&stmt, &[&name]).await? {
                Some(r) => Ok(Some(scope_at(&r, 0)?)),
                None => Ok(None),
            }
        })
    }

    async fn scopes(&self) -> Result<ScopeSet, StoreError> {
        pg!(self, |c| { scope_set(c).await })
    }

    async fn replace_scope(
        &self,
        row: ScopeRow,
        expected_version: u64,
        audit: &AuditRecord,
    ) -> Result<ScopeRow, StoreError> {
        let written = pg!(self, |c| {
            let mut row = row.clone();
            let tx = c.transaction().await?;
            let Some(current) = tx
                .query_opt(
                    "SELECT version FROM scopes WHERE name = $1 FOR UPDATE",
                    &[&row.name],
                )
                .await?
            else {
                return Err(StoreError::NotFound.into());
            };
            if current.get::<_, i64>(0) as u64 != expected_version {
                return Err(StoreError::Stale.into());
            }
            append_audit(&tx, audit).await?;
            let stmt = tx
                .prepare_cached(&format!(
                    "{}
                     UPDATE scopes SET description = $2, rules = $3, updated_at = $4,
                         version = v.version
                     FROM v, n WHERE name = $1 RETURNING scopes.version",
                    next_scope_version()
                ))
                .await?;
            let version: i64 = tx
                .query_one(
                    &stmt,
                    &[
                        &row.name,
                        &row.description,
                        &json(&row.rules)?,
                        &row.updated_at,
                    ],
                )
                .await?
                .get(0);
            tx.commit().await?;
            row.version = version.max(0) as u64;
            Ok(row)
        })?;
        self.published.publish(written.version);
        Ok(written)
    }

    async fn delete_scope(
        &self,
        name: &str,
        expected_version: u64,
        audit: &AuditRecord,
    ) -> Result<ScopeDeletion, StoreError> {
        let done = pg!(self, |c| {
            let tx = c.transaction().await?;
            // Locked first: a token write naming the scope holds it share-locked until it
            // commits, so the count below sees that token.
            let Some(current) = tx
                .query_opt(
                    "SELECT version FROM scopes WHERE name = $1 FOR UPDATE",
                    &[&name],
                )
                .await?
            else {
                return Err(StoreError::NotFound.into());
            };
            if current.get::<_, i64>(0) as u64 != expected_version {
                return Err(StoreError::Stale.into());
            }
            let users: i64 = tx
                .query_one(
                    "SELECT count(*) FROM tokens WHERE status <> 'revoked'
                       AND scopes @> jsonb_build_array($1::text)",
                    &[&name],
                )
                .await?
                .get(0);
            if users > 0 {
                return Ok(ScopeDeletion::InUse(users as u64));
            }
            append_audit(&tx, audit).await?;
            let stmt = tx
                .prepare_cached(&format!(
                    "{}
                     DELETE FROM scopes USING v, n WHERE name = $1 RETURNING v.version",
                    next_scope_version()
                ))
                .await?;
            let version: i64 = tx.query_one(&stmt, &[&name]).await?.get(0);
            tx.commit().await?;
            Ok(ScopeDeletion::Deleted(version.max(0) as u64))
        })?;
        if let ScopeDeletion::Deleted(v) = done {
            self.published.publish(v);
        }
        Ok(done)
    }

    async fn quota_exchange(
        &self,
        hashes: &[String],
        now_s: i64,
        proxies_since_ms: i64,
        max_tokens: usize,
        decide: std::sync::Arc<QuotaDecision>,
    ) -> Result<QuotaWrite, StoreError> {
        let max = i64::try_from(max_tokens).unwrap_or(i64::MAX);
        pg!(self, |c| {
            let tx = c.transaction().await?;
            let named: Vec<String> = tx
                .query(
                    "SELECT id FROM tokens WHERE quota_limit IS NOT NULL
                       AND (hash = ANY($1)
                            OR (retired <> '[]'::jsonb AND EXISTS (
                                SELECT 1 FROM jsonb_array_elements(retired) r
                                WHERE r->>'hash' = ANY($1))))
                     ORDER BY id LIMIT $2",
                    &[&hashes, &max],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let room = max - named.len() as i64;
            let active: Vec<String> = if room > 0 {
                tx.query(
                    "SELECT id FROM tokens WHERE quota_limit IS NOT NULL
                       AND id IN (SELECT token_id FROM quota_holders WHERE period_end > $1)
                       AND NOT (id = ANY($2))
                     ORDER BY id LIMIT $3",
                    &[&now_s, &named, &room],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect()
            } else {
                vec![]
            };
            let ids: Vec<String> = named.into_iter().chain(active).collect();
            // The lock that serialises exchanges on a token, across replicas; taken in id
            // order, so that two exchanges never wait for each other's.
            let locked = tx
                .query(
                    &format!(
                        "SELECT {COLUMNS} FROM tokens WHERE id = ANY($1) AND quota_limit IS NOT NULL
                         ORDER BY id FOR UPDATE"
                    ),
                    &[&ids],
                )
                .await?;
            let tokens = rows(&locked)?;
            let ids: Vec<&str> = tokens.iter().map(|t| t.id.as_str()).collect();
            let holders = tx
                .query(
                    "SELECT token_id, proxy_id, hash, period_start, period_end, spent, carried,
                            held, granted, rate_milli, seen_at_ms
                     FROM quota_holders WHERE token_id = ANY($1) AND period_end > $2
                     ORDER BY token_id, period_start, proxy_id, hash",
                    &[&ids, &now_s],
                )
                .await?
                .iter()
                .map(|r| {
                    let n = |i: usize| r.get::<_, i64>(i).max(0) as u64;
                    QuotaHolder {
                        token_id: r.get(0),
                        proxy_id: r.get(1),
                        hash: r.get(2),
                        period_start: r.get(3),
                        period_end: r.get(4),
                        spent: n(5),
                        carried: n(6),
                        held: n(7),
                        granted: n(8),
                        rate_milli: n(9),
                        seen_at_ms: r.get(10),
                    }
                })
                .collect();
            let proxies = tx
                .query(
                    "SELECT proxy_id, interval_ms, seen_at_ms FROM fleet_proxies
                     WHERE seen_at_ms >= $1 ORDER BY proxy_id",
                    &[&proxies_since_ms],
                )
                .await?
                .iter()
                .map(|r| ProxySeen {
                    proxy_id: r.get(0),
                    interval_ms: r.get::<_, i32>(1).max(0) as u32,
                    seen_at_ms: r.get(2),
                })
                .collect();
            let write = decide(&QuotaState {
                tokens,
                holders,
                proxies,
            });
            if !write.holders.is_empty() {
                let h = &write.holders;
                let text = |f: fn(&QuotaHolder) -> &str| h.iter().map(f).collect::<Vec<&str>>();
                let int = |f: fn(&QuotaHolder) -> i64| h.iter().map(f).collect::<Vec<i64>>();
                let upsert = tx
                    .prepare_cached(
                        "INSERT INTO quota_holders (token_id, period_start, proxy_id, hash,
                             period_end, spent, carried, held, granted, rate_milli, seen_at_ms)
                         SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[],
                             $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[],
                             $10::bigint[], $11::bigint[])
                         ON CONFLICT (token_id, period_start, proxy_id, hash) DO UPDATE SET
                             period_end = EXCLUDED.period_end, spent = EXCLUDED.spent,
                             carried = EXCLUDED.carried, held = EXCLUDED.held,
                             granted = EXCLUDED.granted, rate_milli = EXCLUDED.rate_milli,
                             seen_at_ms = EXCLUDED.seen_at_ms",
                    )
                    .await?;
                tx.execute(
                    &upsert,
                    &[
                        &text(|h| &h.token_id),
                        &int(|h| h.period_start),
                        &text(|h| &h.proxy_id),
                        &text(|h| &h.hash),
                        &int(|h| h.period_end),
                        &int(|h| clamp(h.spent)),
                        &int(|h| clamp(h.carried)),
                        &int(|h| clamp(h.held)),
                        &int(|h| clamp(h.granted)),
                        &int(|h| clamp(h.rate_milli)),
                        &int(|h| h.seen_at_ms),
                    ],
                )
                .await?;
            }
            let mut recorded = Vec::new();
            for e in &write.exhausted {
                let inserted = tx
                    .execute(
                        "INSERT INTO quota_exhausted (token_id, period_start, period_end, at)
                         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                        &[&e.token_id, &e.period_start, &e.period_end, &e.audit.at],
                    )
                    .await?;
                if inserted == 0 {
                    continue;
                }
                append_audit(&tx, &e.audit).await?;
                if let Some(ev) = &e.event {
                    tx.execute(
                        "INSERT INTO outbox (event_id, event_type, payload, created_at, next_attempt_at)
                         VALUES ($1, $2, $3, $4, $4)",
                        &[&ev.id, &ev.kind, &ev.payload, &ev.at],
                    )
                    .await?;
                }
                recorded.push(e.clone());
            }
            tx.commit().await?;
            Ok(QuotaWrite {
                holders: write.holders,
                exhausted: recorded,
            })
        })
    }

    async fn quota_spent(
        &self,
        token_ids: &[String],
        now_s: i64,
    ) -> Result<Vec<QuotaSpent>, StoreError> {
        pg!(self, |c| {
            let stmt = c
                .prepare_cached(
                    "SELECT token_id, period_start, sum(spent + carried)::bigint FROM quota_holders
                     WHERE token_id = ANY($1) AND period_end > $2
                     GROUP BY token_id, period_start ORDER BY token_id, period_start",
                )
                .await?;
            Ok(c.query(&stmt, &[&token_ids, &now_s])
                .await?
                .iter()
                .map(|r| QuotaSpent {
                    token_id: r.get(0),
                    period_start: r.get(1),
                    spent: r.get::<_, i64>(2).max(0) as u64,
                })
                .collect())
        })
    }

    async fn forget_quotas(&self, now_s: i64) -> Result<u64, StoreError> {
        pg!(self, |c| {
            let stmt = c
                .prepare_cached(
                    "WITH e AS (DELETE FROM quota_exhausted WHERE period_end <= $1)
                     DELETE FROM quota_holders WHERE period_end <= $1",
                )
                .await?;
            Ok(c.execute(&stmt, &[&now_s]).await?)
        })
    }

    async fn tokens_by_id(&self, ids: &[String]) -> Result<Vec<TokenRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM tokens WHERE id = ANY($1) ORDER BY id");
        self.token_rows(&sql, &[&ids]).await
    }

    async fn record_usage(&self, now: i64, entries: &[UsageEntry]) -> Result<usize, StoreError> {
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let allowed: Vec<i64> = entries.iter().map(|e| clamp(e.allowed)).collect();
        let denied: Vec<i64> = entries.iter().map(|e| clamp(e.denied)).collect();
        let seen: Vec<i64> = entries.iter().map(|e| e.last_used_at.min(now)).collect();
        pg!(self, |c| {
            // One statement (a deadlock with another report is retried by `run`: the
            // statement rolled back whole). Sums are numeric and capped: no overflow.
            let stmt = c
                .prepare_cached(
                    "UPDATE tokens t SET
                         requests_allowed = LEAST(t.requests_allowed + u.allowed, 9223372036854775807)::bigint,
                         requests_denied = LEAST(t.requests_denied + u.denied, 9223372036854775807)::bigint,
                         last_used_at = GREATEST(COALESCE(t.last_used_at, 0), u.seen)
                     FROM (SELECT id, sum(allowed) AS allowed, sum(denied) AS denied,
                                  max(seen) AS seen, count(*) AS n
                           FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[])
                                AS e(id, allowed, denied, seen)
                           GROUP BY id) u
                     WHERE t.id = u.id
                     RETURNING u.n",
                )
                .await?;
            let matched = c.query(&stmt, &[&ids, &allowed, &denied, &seen]).await?;
            Ok(matched
                .iter()
                .map(|r| r.get::<_, i64>(0).max(0) as usize)
                .sum())
        })
    }

    async fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let before_seq = q.before_seq.map(clamp);
        let limit = i64::from(q.limit);
        pg!(self, |c| {
            let stmt = c
                .prepare_cached(
                    "SELECT seq, at, actor, action, token_id, token_name, before, after FROM audit
                     WHERE ($1::text IS NULL OR token_id = $1) AND ($2::text IS NULL OR actor = $2)
                       AND ($3::text IS NULL OR action = $3) AND ($4::bigint IS NULL OR at >= $4)
                       AND ($5::bigint IS NULL OR at < $5) AND ($6::bigint IS NULL OR seq < $6)
                     ORDER BY seq DESC LIMIT $7",
                )
                .await?;
            let found = c
                .query(
                    &stmt,
                    &[
                        &q.token_id,
                        &q.actor,
                        &q.action,
                        &q.since,
                        &q.until,
                        &before_seq,
                        &limit,
                    ],
                )
                .await?;
            Ok(found
                .iter()
                .map(|r| AuditEntry {
                    seq: r.get::<_, i64>(0).max(0) as u64,
                    at: r.get(1),
                    actor: r.get(2),
                    action: r.get(3),
                    token_id: r.get(4),
                    token_name: r.get(5),
                    before: r.get(6),
                    after: r.get(7),
                })
                .collect())
        })
    }

    async fn version(&self) -> Result<u64, StoreError> {
        let v = pg!(self, |c| {
            let stmt = c
                .prepare_cached("SELECT version FROM tokengate_sync")
                .await?;
            let v: i64 = c.query_one(&stmt, &[]).await?.get(0);
            Ok(v.max(0) as u64)
        })?;
        self.published.publish(v);
        Ok(v)
    }

    async fn changes_since(&self, since: u64, limit: u32) -> Result<Changes, StoreError> {
        // One statement, so one snapshot, for the rows, the horizon and the count: one round
        // trip per read (the feed makes one per version for every poll it wakes).
        let sql = format!(
            "SELECT s.horizon, c.live, s.scopes_version, t.* FROM
                 (SELECT horizon, scopes_version FROM tokengate_sync) s
                 CROSS JOIN (SELECT count(*) AS live FROM tokens WHERE status <> 'revoked') c
                 LEFT JOIN LATERAL (SELECT {COLUMNS} FROM tokens WHERE version > $1
                                    ORDER BY version LIMIT $2) t ON true"
        );
        let read = |found: &[Row]| -> Result<(Changes, u64), StoreError> {
            let mut changes = Changes {
                rows: Vec::with_capacity(found.len()),
                horizon: 0,
                live: 0,
                scopes: None,
            };
            let mut scopes_version = 0;
            for r in found {
                changes.horizon = r.get::<_, i64>(0).max(0) as u64;
                changes.live = r.get::<_, i64>(1).max(0) as u64;
                scopes_version = r.get::<_, i64>(2).max(0) as u64;
                if r.try_get::<_, Option<String>>(3).map_err(decode)?.is_some() {
                    changes.rows.push(from_row_at(r, 3)?);
                }
            }
            Ok((changes, scopes_version))
        };
        pg!(self, |c| {
            let stmt = c.prepare_cached(&sql).await?;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
                [&clamp(since), &i64::from(limit)];
            let (changes, scopes_version) = read(&c.query(&stmt, &params).await?)?;
            if scopes_version <= since {
                return Ok(changes);
            }
            // A scope changed (rarely so): read again with the scopes in one snapshot, so
            // that the answer's version never passes a token change it does not hold.
            let tx = c
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let (mut changes, _) = read(&tx.query(&stmt, &params).await?)?;
            changes.scopes = Some(scope_set(&tx).await?);
            tx.commit().await?;
            Ok(changes)
        })
    }

    async fn snapshot_page(&self, after_id: Option<&str>, limit: u32) -> Result<Page, StoreError> {
        let sql = format!(
            "SELECT c.live, t.* FROM
                 (SELECT count(*) AS live FROM tokens WHERE status <> 'revoked') c
                 LEFT JOIN LATERAL (SELECT {COLUMNS} FROM tokens
                                    WHERE ($1::text IS NULL OR id > $1)
                                    ORDER BY id LIMIT $2) t ON true"
        );
        pg!(self, |c| {
            let stmt = c.prepare_cached(&sql).await?;
            let found = c.query(&stmt, &[&after_id, &i64::from(limit)]).await?;
            let mut page = Page {
                rows: Vec::with_capacity(found.len()),
                live: 0,
                scopes: scope_set(c).await?,
            };
            for r in &found {
                page.live = r.get::<_, i64>(0).max(0) as u64;
                if r.try_get::<_, Option<String>>(1).map_err(decode)?.is_some() {
                    page.rows.push(from_row_at(r, 1)?);
                }
            }
            Ok(page)
        })
    }

    async fn claim_period(&self, job: &str, now: i64, period: i64) -> Result<bool, StoreError> {
        pg!(self, |c| {
            // A concurrent claimant waits for the row and re-checks the condition against
            // the committed claim, so one wins.
            let n = c
                .execute(
                    "INSERT INTO job_runs (name, last_run, runs) VALUES ($1, $2, 1)
                     ON CONFLICT (name) DO UPDATE
                         SET last_run = excluded.last_run, runs = job_runs.runs + 1
                     WHERE job_runs.last_run <= excluded.last_run - $3",
                    &[&job, &now, &period],
                )
                .await?;
            Ok(n == 1)
        })
    }

    async fn period_runs(&self, job: &str) -> Result<u64, StoreError> {
        pg!(self, |c| {
            let n = c
                .query_opt("SELECT runs FROM job_runs WHERE name = $1", &[&job])
                .await?
                .map_or(0, |r| r.get::<_, i64>(0));
            Ok(n.max(0) as u64)
        })
    }

    async fn expiring(&self, now: i64, until: i64) -> Result<Vec<Expiring>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS},
                    (SELECT min(lead) FROM expiry_warnings w
                     WHERE w.token_id = t.id AND w.expires_at = t.expires_at)
             FROM tokens t WHERE status <> 'revoked' AND expires_at > $1 AND expires_at <= $2
             ORDER BY id"
        );
        pg!(self, |c| {
            let found = c.query(&sql, &[&now, &until]).await?;
            found
                .iter()
                .map(|r| {
                    Ok(Expiring {
                        token: from_row(r)?,
                        warned_lead: r.try_get(AFTER_COLUMNS).map_err(decode)?,
                    })
                })
                .collect()
        })
    }

    async fn record_warning(
        &self,
        warning: &WarningRecord,
        audit: &AuditRecord,
        event: Option<&Event>,
    ) -> Result<bool, StoreError> {
        pg!(self, |c| {
            let tx = c.transaction().await?;
            let inserted = tx
                .execute(
                    "INSERT INTO expiry_warnings (token_id, expires_at, lead, issued_at)
                     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    &[
                        &warning.token_id,
                        &warning.expires_at,
                        &warning.lead,
                        &warning.at,
                    ],
                )
                .await?;
            if inserted == 0 {
                return Ok(false);
            }
            append_audit(&tx, audit).await?;
            if let Some(e) = event {
                tx.execute(
                    "INSERT INTO outbox (event_id, event_type, payload, created_at, next_attempt_at)
                     VALUES ($1, $2, $3, $4, $4)",
                    &[&e.id, &e.kind, &e.payload, &e.at],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(true)
        })
    }

    async fn purgeable(&self, cutoff: i64, limit: u32) -> Result<Vec<TokenRow>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM tokens
             WHERE (status = 'revoked' AND updated_at <= $1) OR expires_at <= $1
             ORDER BY id LIMIT $2"
        );
        self.token_rows(&sql, &[&cutoff, &i64::from(limit)]).await
    }

    async fn purge(&self, row: &TokenRow, audit: &AuditRecord) -> Result<bool, StoreError> {
        let version = clamp(row.version);
        pg!(self, |c| {
            let tx = c.transaction().await?;
            let deleted = tx
                .execute(
                    "DELETE FROM tokens WHERE id = $1 AND version = $2",
                    &[&row.id, &version],
                )
                .await?;
            if deleted == 0 {
                return Ok(false);
            }
            tx.execute(
                "DELETE FROM expiry_warnings WHERE token_id = $1",
                &[&row.id],
            )
            .await?;
            append_audit(&tx, audit).await?;
            tx.execute(
                "UPDATE tokengate_sync SET horizon = GREATEST(horizon, $1)",
                &[&version],
            )
            .await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    async fn prune_outbox(&self, cutoff: i64) -> Result<u64, StoreError> {
        pg!(self, |c| {
            Ok(c.execute(
                "DELETE FROM outbox WHERE COALESCE(delivered_at, failed_at) <= $1",
                &[&cutoff],
            )
            .await?)
        })
    }

    async fn claim_deliveries(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError> {
        let limit = i64::from(limit);
        pg!(self, |c| {
            // SKIP LOCKED: a replica claiming at the same moment takes other events.
            let found = c
                .query(
                    "UPDATE outbox SET next_attempt_at = $2
                     WHERE id IN (
                         SELECT id FROM outbox
                         WHERE delivered_at IS NULL AND failed_at IS NULL
                           AND next_attempt_at <= $1
                         ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED)
                     RETURNING id, event_id, event_type, payload, attempts",
                    &[&now, &lease_until, &limit],
                )
                .await?;
            let mut due = deliveries(&found);
            due.sort_by_key(|d| d.id);
            Ok(due)
        })
    }

    async fn delivery_result(&self, id: i64, outcome: &DeliveryOutcome) -> Result<(), StoreError> {
        pg!(self, |c| {
            match outcome {
                DeliveryOutcome::Delivered { at } => {
                    c.execute(
                        "UPDATE outbox SET attempts = attempts + 1, delivered_at = $2,
                             last_error = NULL WHERE id = $1",
                        &[&id, at],
                    )
                    .await?
                }
                DeliveryOutcome::Retry {
                    next_attempt_at,
                    error,
                } => {
                    c.execute(
                        "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = $2,
                             last_error = $3 WHERE id = $1",
                        &[&id, next_attempt_at, error],
                    )
                    .await?
                }
                DeliveryOutcome::GaveUp { error } => {
                    c.execute(
                        "UPDATE outbox SET attempts = attempts + 1, failed_at = next_attempt_at,
                             last_error = $2 WHERE id = $1",
                        &[&id, error],
                    )
                    .await?
                }
            };
            Ok(())
        })
    }

    async fn insert_session(&self, s: &SessionRow, max: usize) -> Result<(), StoreError> {
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        pg!(self, |c| {
            let tx = c.transaction().await?;
            let held: i64 = tx
                .query_one("SELECT count(*) FROM sessions", &[])
                .await?
                .get(0);
            let over = (held + 1 - max).max(0);
            if over > 0 {
                tx.execute(
                    "DELETE FROM sessions WHERE key IN
                       (SELECT key FROM sessions ORDER BY last_used_at LIMIT $1)",
                    &[&over],
                )
                .await?;
            }
            tx.execute(
                "INSERT INTO sessions (key, actor, started_at, last_used_at)
                 VALUES ($1, $2, $3, $4)",
                &[&s.key, &s.actor, &s.started_at, &s.last_used_at],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    async fn touch_session(
        &self,
        key: &str,
        now: i64,
        idle_after: i64,
        started_after: i64,
    ) -> Result<Option<SessionRow>, StoreError> {
        pg!(self, |c| {
            let stmt = c
                .prepare_cached(
                    "UPDATE sessions SET last_used_at = GREATEST(last_used_at, $2)
                     WHERE key = $1 AND last_used_at > $3 AND started_at > $4
                     RETURNING actor, started_at, last_used_at",
                )
                .await?;
            let found = c
                .query_opt(&stmt, &[&key, &now, &idle_after, &started_after])
                .await?;
            match found {
                Some(r) => Ok(Some(SessionRow {
                    key: key.to_string(),
                    actor: r.get(0),
                    started_at: r.get(1),
                    last_used_at: r.get(2),
                })),
                None => {
                    c.execute("DELETE FROM sessions WHERE key = $1", &[&key])
                        .await?;
                    Ok(None)
                }
            }
        })
    }

    async fn delete_session(&self, key: &str) -> Result<(), StoreError> {
        pg!(self, |c| {
            c.execute("DELETE FROM sessions WHERE key = $1", &[&key])
                .await?;
            Ok(())
        })
    }

    async fn session_count(&self) -> Result<u64, StoreError> {
        pg!(self, |c| {
            let n: i64 = c
                .query_one("SELECT count(*) FROM sessions", &[])
                .await?
                .get(0);
            Ok(n.max(0) as u64)
        })
    }

    async fn export(&self) -> Result<Dump, StoreError> {
        let store_id = self.store_id.clone();
        pg!(self, |c| {
            let tx = c
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let tokens = tx
                .query(
                    &format!("SELECT {COLUMNS}, created_seq FROM tokens ORDER BY id"),
                    &[],
                )
                .await?
                .iter()
                .map(|r| {
                    Ok((
                        from_row(r)?,
                        r.try_get::<_, i64>(AFTER_COLUMNS).map_err(decode)?,
                    ))
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            let audit = tx
                .query(
                    "SELECT seq, at, actor, action, token_id, token_name, before, after
                     FROM audit ORDER BY seq",
                    &[],
                )
                .await?
                .iter()
                .map(|r| AuditEntry {
                    seq: r.get::<_, i64>(0).max(0) as u64,
                    at: r.get(1),
                    actor: r.get(2),
                    action: r.get(3),
                    token_id: r.get(4),
                    token_name: r.get(5),
                    before: r.get(6),
                    after: r.get(7),
                })
                .collect();
            let warnings = tx
                .query(
                    "SELECT token_id, expires_at, lead, issued_at FROM expiry_warnings
                     ORDER BY token_id, expires_at, lead",
                    &[],
                )
                .await?
                .iter()
                .map(|r| WarningRecord {
                    token_id: r.get(0),
                    expires_at: r.get(1),
                    lead: r.get(2),
                    at: r.get(3),
                })
                .collect();
            let outbox = tx
                .query(
                    "SELECT id, event_id, event_type, payload, created_at, attempts,
                            next_attempt_at, delivered_at, failed_at, last_error
                     FROM outbox ORDER BY id",
                    &[],
                )
                .await?
                .iter()
                .map(|r| OutboxRow {
                    id: r.get(0),
                    event_id: r.get(1),
                    event_type: r.get(2),
                    payload: r.get(3),
                    created_at: r.get(4),
                    attempts: r.get::<_, i32>(5).max(0) as u32,
                    next_attempt_at: r.get(6),
                    delivered_at: r.get(7),
                    failed_at: r.get(8),
                    last_error: r.get(9),
                })
                .collect();
            let jobs = tx
                .query(
                    "SELECT name, last_run, runs FROM job_runs ORDER BY name",
                    &[],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get::<_, i64>(2).max(0) as u64))
                .collect();
            let sync = tx
                .query_one("SELECT version, horizon FROM tokengate_sync", &[])
                .await?;
            let scopes = scope_set(&tx).await?;
            tx.commit().await?;
            Ok(Dump {
                store_id: store_id.clone(),
                version: sync.get::<_, i64>(0).max(0) as u64,
                horizon: sync.get::<_, i64>(1).max(0) as u64,
                tokens,
                audit,
                warnings,
                outbox,
                jobs,
                scopes,
            })
        })
    }

    async fn import(&self, dump: &Dump) -> Result<(), StoreError> {
        pg!(self, |c| {
            let tx = c.transaction().await?;
            // Lock the version row first: no replica may write while the dump goes in.
            let version: i64 = tx
                .query_one("SELECT version FROM tokengate_sync FOR UPDATE", &[])
                .await?
                .get(0);
            let used: i64 = tx
                .query_one(
                    "SELECT (SELECT count(*) FROM tokens) + (SELECT count(*) FROM audit)
                          + (SELECT count(*) FROM scopes)",
                    &[],
                )
                .await?
                .get(0);
            if used > 0 || version > 0 {
                return Err(StoreError::Conflict(
                    "the target database already holds tokens; migrate into an empty one".into(),
                )
                .into());
            }
            let insert_token = tx
                .prepare(&format!(
                    "INSERT INTO tokens ({COLUMNS}, created_seq) VALUES
                     ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                      $17, $18, $19, $20, $21, $22)"
                ))
                .await?;
            for (r, created_seq) in &dump.tokens {
                tx.execute(
                    &insert_token,
                    &[
                        &r.id,
                        &r.hash,
                        &r.name,
                        &r.kind.as_str(),
                        &r.owner,
                        &r.status.as_str(),
                        &r.max_rps.map(i64::from),
                        &r.burst.map(i64::from),
                        &r.created_at,
                        &r.updated_at,
                        &r.expires_at,
                        &r.last_used_at,
                        &clamp(r.version),
                        &clamp(r.requests_allowed),
                        &clamp(r.requests_denied),
                        &r.rotated_at,
                        &retired_json(r)?,
                        &r.limit_scope.as_str(),
                        &scopes_json(r)?,
                        &super::quota_columns(r.quota).0,
                        &super::quota_columns(r.quota).1,
                        created_seq,
                    ],
                )
                .await?;
            }
            let insert_audit = tx
                .prepare(
                    "INSERT INTO audit (seq, at, actor, action, token_id, token_name, before, after)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .await?;
            for a in &dump.audit {
                tx.execute(
                    &insert_audit,
                    &[
                        &clamp(a.seq),
                        &a.at,
                        &a.actor,
                        &a.action,
                        &a.token_id,
                        &a.token_name,
                        &a.before,
                        &a.after,
                    ],
                )
                .await?;
            }
            for w in &dump.warnings {
                tx.execute(
                    "INSERT INTO expiry_warnings (token_id, expires_at, lead, issued_at)
                     VALUES ($1, $2, $3, $4)",
                    &[&w.token_id, &w.expires_at, &w.lead, &w.at],
                )
                .await?;
            }
            for o in &dump.outbox {
                tx.execute(
                    "INSERT INTO outbox (id, event_id, event_type, payload, created_at, attempts,
                         next_attempt_at, delivered_at, failed_at, last_error)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                    &[
                        &o.id,
                        &o.event_id,
                        &o.event_type,
                        &o.payload,
                        &o.created_at,
                        &i32::try_from(o.attempts).unwrap_or(i32::MAX),
                        &o.next_attempt_at,
                        &o.delivered_at,
                        &o.failed_at,
                        &o.last_error,
                    ],
                )
                .await?;
            }
            for (name, last_run, runs) in &dump.jobs {
                tx.execute(
                    "INSERT INTO job_runs (name, last_run, runs) VALUES ($1, $2, $3)
                     ON CONFLICT (name) DO UPDATE
                         SET last_run = excluded.last_run, runs = excluded.runs",
                    &[name, last_run, &clamp(*runs)],
                )
                .await?;
            }
            // The sequences continue after the imported rows.
            tx.batch_execute(
                "SELECT setval(pg_get_serial_sequence('audit', 'seq'),
                               GREATEST((SELECT max(seq) FROM audit), 1));
                 SELECT setval(pg_get_serial_sequence('outbox', 'id'),
                               GREATEST((SELECT max(id) FROM outbox), 1));",
            )
            .await?;
            for sc in &dump.scopes.scopes {
                tx.execute(
                    &format!(
                        "INSERT INTO scopes ({SCOPE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"
                    ),
                    &[
                        &sc.name,
                        &sc.description,
                        &json(&sc.rules)?,
                        &sc.created_at,
                        &sc.updated_at,
                        &clamp(sc.version),
                    ],
                )
                .await?;
            }
            tx.execute(
                "UPDATE tokengate_sync SET version = $1, horizon = $2, scopes_version = $3",
                &[
                    &clamp(dump.version),
                    &clamp(dump.horizon),
                    &clamp(dump.scopes.version),
                ],
            )
            .await?;
            tx.execute(
                "UPDATE tokengate_meta SET value = $1 WHERE key = 'store_id'",
                &[&dump.store_id],
            )
            .await?;
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[&CHANNEL, &dump.version.to_string()],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })?;
        self.published.publish(dump.version);
        Ok(())
    }
}
