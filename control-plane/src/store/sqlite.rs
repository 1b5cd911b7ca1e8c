//! SQLite store: WAL with `synchronous=FULL`, so a write is on disk before it is answered.

use super::{Edit, ListQuery, Status, Store, StoreError, TokenRow};
use rand::distributions::{Alphanumeric, DistString};
use rusqlite::{params, Connection, OptionalExtension, Row};
use std::path::Path;
use std::sync::Mutex;
use tokio::sync::watch;

/// Each entry upgrades the schema by one `PRAGMA user_version`; never edit a shipped one.
const MIGRATIONS: &[&str] = &[r#"
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
    "#];

const COLUMNS: &str =
    "id, hash, name, kind, owner, status, max_rps, burst, created_at, updated_at, expires_at, last_used_at, version";

pub struct SqliteStore {
    conn: Mutex<Connection>,
    store_id: String,
    changes: watch::Sender<u64>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn from_row(r: &Row<'_>) -> rusqlite::Result<TokenRow> {
    let kind: String = r.get(3)?;
    let status: String = r.get(5)?;
    let bad = |what: &str, v: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("bad {what} `{v}`").into(),
        )
    };
    Ok(TokenRow {
        id: r.get(0)?,
        hash: r.get(1)?,
        name: r.get(2)?,
        kind: super::parse_kind(&kind).ok_or_else(|| bad("kind", &kind))?,
        owner: r.get(4)?,
        status: Status::parse(&status).ok_or_else(|| bad("status", &status))?,
        max_rps: r.get(6)?,
        burst: r.get(7)?,
        created_at: r.get(8)?,
        updated_at: r.get(9)?,
        expires_at: r.get(10)?,
        last_used_at: r.get(11)?,
        version: r.get::<_, i64>(12)? as u64,
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

fn read_version(conn: &Connection) -> rusqlite::Result<u64> {
    Ok(meta(conn, "version")?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

/// Takes the next version inside the caller's transaction.
fn next_version(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<u64> {
    let v = read_version(tx)? + 1;
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('version', ?1)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [v.to_string()],
    )?;
    Ok(v)
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
        let version = read_version(&conn).map_err(backend)?;
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

    fn publish(&self, version: u64) {
        self.changes.send_replace(version);
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

/// `upsert` is false for a new token: an id collision must fail, never overwrite.
fn write_row(tx: &rusqlite::Transaction<'_>, r: &TokenRow, upsert: bool) -> rusqlite::Result<()> {
    let on_conflict = if upsert {
        "ON CONFLICT(id) DO UPDATE SET name = excluded.name, status = excluded.status,
             max_rps = excluded.max_rps, burst = excluded.burst, updated_at = excluded.updated_at,
             expires_at = excluded.expires_at, last_used_at = excluded.last_used_at,
             version = excluded.version"
    } else {
        ""
    };
    let sql = format!(
        "INSERT INTO tokens ({COLUMNS})
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) {on_conflict}"
    );
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
            r.version as i64
        ],
    )?;
    Ok(())
}

impl Store for SqliteStore {
    fn store_id(&self) -> &str {
        &self.store_id
    }

    fn create(&self, mut row: TokenRow) -> Result<TokenRow, StoreError> {
        let row = self.with(|c| {
            let tx = c.transaction()?;
            row.version = next_version(&tx)?;
            write_row(&tx, &row, false)?;
            tx.commit()?;
            Ok(row)
        })?;
        self.publish(row.version);
        Ok(row)
    }

    fn get(&self, id: &str) -> Result<TokenRow, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM tokens WHERE id = ?1 AND status != 'revoked'");
        self.query(&sql, &[&id])?.pop().ok_or(StoreError::NotFound)
    }

    fn list(&self, q: &ListQuery) -> Result<Vec<TokenRow>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM tokens WHERE status != 'revoked'
               AND (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR owner = ?2)
               AND (?3 IS NULL OR kind = ?3) AND (?4 IS NULL OR id > ?4)
             ORDER BY id LIMIT ?5"
        );
        let status = q.status.map(Status::as_str);
        let kind = q.kind.map(|k| k.as_str());
        self.query(&sql, &[&status, &q.owner, &kind, &q.after, &q.limit])
    }

    fn update(&self, id: &str, now: i64, edit: Edit<'_>) -> Result<TokenRow, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM tokens WHERE id = ?1 AND status != 'revoked'");
        let mut edit_error = None;
        let result = self.with(|c| {
            let tx = c.transaction()?;
            let Some(mut row) = tx.query_row(&sql, [id], from_row).optional()? else {
                return Ok(None);
            };
            match edit(&mut row) {
                Ok(false) => return Ok(Some((row, false))),
                Ok(true) => {}
                Err(e) => {
                    edit_error = Some(e);
                    return Ok(None);
                }
            }
            row.updated_at = now;
            row.version = next_version(&tx)?;
            write_row(&tx, &row, true)?;
            tx.commit()?;
            Ok(Some((row, true)))
        })?;
        if let Some(e) = edit_error {
            return Err(e);
        }
        let (row, changed) = result.ok_or(StoreError::NotFound)?;
        if changed {
            self.publish(row.version);
        }
        Ok(row)
    }

    fn version(&self) -> Result<u64, StoreError> {
        self.with(|c| read_version(c))
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
        }
    }

    fn open() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("t.db")).unwrap();
        (dir, s)
    }

    fn set_status(s: &SqliteStore, id: &str, to: Status) -> Result<TokenRow, StoreError> {
        s.update(id, 2, &move |r: &mut TokenRow| {
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
        assert_eq!(s.create(row("tok_1")).unwrap().version, 1);
        assert_eq!(s.create(row("tok_2")).unwrap().version, 2);
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
        s.create(row("tok_1")).unwrap();
        s.create(row("tok_2")).unwrap();
        set_status(&s, "tok_1", Status::Revoked).unwrap();
        assert_eq!(s.get("tok_1"), Err(StoreError::NotFound));
        assert_eq!(
            set_status(&s, "tok_1", Status::Active),
            Err(StoreError::NotFound)
        );
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
            s.create(r).unwrap();
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
    }

    #[test]
    fn snapshot_pages_cover_every_row_once() {
        let (_d, s) = open();
        for i in 1..=7 {
            s.create(row(&format!("tok_{i}"))).unwrap();
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
            s.create(row("tok_1")).unwrap();
            let refused = s.update("tok_1", 3, &|_r: &mut TokenRow| {
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
        s.create(row("tok_1")).unwrap();
        let mut dup = row("tok_2");
        dup.hash = row("tok_1").hash;
        assert!(matches!(s.create(dup), Err(StoreError::Conflict(_))));
    }
}
