//! `tokengate migrate --from DB --to DB`: copies everything a store holds (tokens with their
//! versions and usage, the audit trail, expiry warnings, the webhook outbox, job claims and
//! the store id) into an empty store, e.g. from a SQLite install to PostgreSQL. Console
//! sessions are not copied. Filters keep their state across the move: the store id and the
//! versions are the same on the other side.

use crate::app::Database;
use crate::store::PgSettings;
use clap::Args;

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The database to copy from: a SQLite file (a path or sqlite://PATH) or postgres://...
    /// Stop the control plane that uses it first.
    #[arg(long)]
    pub from: String,
    /// The database to copy into: created and migrated if need be, and refused unless empty
    #[arg(long)]
    pub to: String,
}

pub async fn run(args: MigrateArgs) -> Result<String, String> {
    let (from, to) = (Database::parse(&args.from)?, Database::parse(&args.to)?);
    if from == to {
        return Err("--from and --to name the same database".into());
    }
    if let Database::Sqlite(path) = &from {
        // Opening a missing file would create an empty store and copy nothing.
        if !path.is_file() {
            return Err(format!("--from {}: no such file", path.display()));
        }
    }
    let settings = PgSettings::default();
    let source = from.open(settings).await?;
    let target = to.open(settings).await?;
    let dump = source
        .export()
        .await
        .map_err(|e| format!("cannot read {from}: {e}"))?;
    target
        .import(&dump)
        .await
        .map_err(|e| format!("cannot write {to}: {e}"))?;
    source.close().await;
    target.close().await;
    Ok(format!(
        "copied {} tokens (version {}), {} audit entries, {} expiry warnings and {} webhook \
         events from {from} to {to}.\nThe store id {} moved with them: running filters keep \
         their state. Console sessions were not copied: sign in again.",
        dump.tokens.len(),
        dump.version,
        dump.audit.len(),
        dump.warnings.len(),
        dump.outbox.len(),
        dump.store_id,
    ))
}
