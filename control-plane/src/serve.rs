//! `tokengate serve`: options, their checks, and the process around the `Application`
//! (listening, signals).

use crate::api::{Admin, ConsoleSettings};
use crate::app::{Application, Config, Database};
use crate::connections::{self, Limits as ConnectionLimits};
use crate::domain::housekeeping::Jobs;
use crate::domain::sessions::Limits;
use crate::duration;
use crate::policy::{KindPolicy, Policy};
use crate::secrets::same_secret;
use crate::store::PgSettings;
use crate::strength;
use crate::throttle;
use crate::webhook::Webhook;
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on
    #[arg(long, env = "TOKENGATE_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: String,
    /// The database: a SQLite file (a path or `sqlite://PATH`; created and migrated at
    /// start), or `postgres://USER[:PASSWORD]@HOST:PORT/DB` shared by several replicas
    #[arg(
        long,
        env = "TOKENGATE_DB",
        default_value = "tokengate.db",
        hide_env_values = true
    )]
    pub db: String,
    /// PostgreSQL: most connections this replica opens (plus one that listens for changes)
    #[arg(long, env = "TOKENGATE_DB_POOL_SIZE", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_pool_size: u32,
    /// PostgreSQL: longest a database call may take before the API answers 503
    /// `store_unavailable` (e.g. 5s)
    #[arg(long, env = "TOKENGATE_DB_TIMEOUT", default_value = "5s", value_parser = span)]
    pub db_timeout: Span,
    /// Admin credential for the token API (its audit actor name is `admin`)
    #[arg(long, env = "TOKENGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// File holding the admin credential (used when --admin-token is not given)
    #[arg(long, env = "TOKENGATE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// File of named admin credentials, one `name:secret` per line (`#` comments); each
    /// name is the actor in the audit trail. Combines with --admin-token.
    #[arg(long, env = "TOKENGATE_ADMIN_CREDENTIALS_FILE")]
    pub admin_credentials_file: Option<PathBuf>,
    /// Sync credential: lets the filters read /v1/sync and nothing else
    #[arg(long, env = "TOKENGATE_SYNC_TOKEN", hide_env_values = true)]
    pub sync_token: Option<String>,
    /// File holding the sync credential (used when --sync-token is not given)
    #[arg(long, env = "TOKENGATE_SYNC_TOKEN_FILE")]
    pub sync_token_file: Option<PathBuf>,
    /// Longest time a /v1/sync long-poll is held before answering "no change"
    #[arg(long, env = "TOKENGATE_SYNC_MAX_WAIT_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub sync_max_wait_seconds: u64,
    /// Records per /v1/sync answer (snapshot pages and change batches)
    #[arg(long, env = "TOKENGATE_SYNC_PAGE_SIZE", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub sync_page_size: u32,
    /// Longest lifetime of a user token (e.g. 90d; `never`: no limit). Implies an expiry.
    #[arg(long, env = "TOKENGATE_USER_MAX_LIFETIME", default_value = "never", value_parser = lifetime)]
    pub user_max_lifetime: Lifetime,
    /// User tokens must have an expiry
    #[arg(long, env = "TOKENGATE_USER_REQUIRE_EXPIRY", default_value_t = false)]
    pub user_require_expiry: bool,
    /// Longest lifetime of a service token (e.g. 365d; `never`: no limit). Implies an expiry.
    #[arg(long, env = "TOKENGATE_SERVICE_MAX_LIFETIME", default_value = "never", value_parser = lifetime)]
    pub service_max_lifetime: Lifetime,
    /// Service tokens must have an expiry
    #[arg(
        long,
        env = "TOKENGATE_SERVICE_REQUIRE_EXPIRY",
        default_value_t = false
    )]
    pub service_require_expiry: bool,
    /// Lead times before expiry at which a warning is issued, comma-separated; `none`: off
    #[arg(long, env = "TOKENGATE_EXPIRY_WARNINGS", default_value = "7d,1d", value_parser = leads)]
    pub expiry_warnings: Leads,
    /// How long revoked and expired tokens are kept before they are purged
    #[arg(long, env = "TOKENGATE_RETENTION", default_value = "30d", value_parser = lifetime)]
    pub retention: Lifetime,
    /// How often to purge; `never` switches purging off
    #[arg(long, env = "TOKENGATE_PURGE_INTERVAL", default_value = "1h", value_parser = lifetime)]
    pub purge_interval: Lifetime,
    /// How often expiry warnings and webhook deliveries are checked
    #[arg(long, env = "TOKENGATE_JOBS_INTERVAL", default_value = "10s", value_parser = lifetime)]
    pub jobs_interval: Lifetime,
    /// URL that receives expiry-warning webhooks (JSON POST, HMAC-signed)
    #[arg(long, env = "TOKENGATE_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// Secret for the webhook signature (required with --webhook-url)
    #[arg(long, env = "TOKENGATE_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// File holding the webhook secret
    #[arg(long, env = "TOKENGATE_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,
    /// Attempts per webhook event before giving up (1 s, 2 s, 4 s ... apart, at most 10 min)
    #[arg(long, env = "TOKENGATE_WEBHOOK_MAX_ATTEMPTS", default_value_t = 12,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub webhook_max_attempts: u32,
    /// Serve the web console at `/` (`false`: API only)
    #[arg(long, env = "TOKENGATE_CONSOLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub console: bool,
    /// A console session unused this long ends (e.g. 30m)
    #[arg(long, env = "TOKENGATE_SESSION_IDLE_TIMEOUT", default_value = "30m", value_parser = lifetime)]
    pub session_idle_timeout: Lifetime,
    /// A console session ends this long after sign-in, however busy (e.g. 12h)
    #[arg(long, env = "TOKENGATE_SESSION_MAX_AGE", default_value = "12h", value_parser = lifetime)]
    pub session_max_age: Lifetime,
    /// Mark the console's session cookie `Secure` (set it when browsers reach tokengate
    /// over HTTPS, e.g. behind a TLS-terminating proxy)
    #[arg(long, env = "TOKENGATE_SECURE_COOKIES", default_value_t = false)]
    pub secure_cookies: bool,
    /// A client must send a whole request head within this time of connecting, or of its
    /// first byte on a kept-alive connection; else it is disconnected
    #[arg(long, env = "TOKENGATE_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = span)]
    pub header_read_timeout: Span,
    /// A kept-alive connection with no request for this long is closed (keep it longer
    /// than the idle timeout of the proxies in front, e.g. Envoy's 60s in envoy/)
    #[arg(long, env = "TOKENGATE_IDLE_TIMEOUT", default_value = "75s", value_parser = span)]
    pub idle_timeout: Span,
    /// A request body must arrive within this time of its head; else 408
    #[arg(long, env = "TOKENGATE_BODY_READ_TIMEOUT", default_value = "30s", value_parser = span)]
    pub body_read_timeout: Span,
    /// Most client connections open at once; at the cap, the connection idle longest is
    /// closed for a new one [default: the open-file limit less 64]
    #[arg(long, env = "TOKENGATE_MAX_CONNECTIONS",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,
    /// Refused credentials a client address may present at once before it is answered 429
    #[arg(long, env = "TOKENGATE_AUTH_FAILURE_BURST", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub auth_failure_burst: u32,
    /// After the burst, one more refused credential is allowed per this interval
    #[arg(long, env = "TOKENGATE_AUTH_FAILURE_INTERVAL", default_value = "6s", value_parser = span)]
    pub auth_failure_interval: Span,
    /// Log format: `text` (plain when stderr is not a terminal) or `json` (one object per
    /// line, for log collectors)
    #[arg(long, env = "TOKENGATE_LOG_FORMAT", default_value = "text", value_enum)]
    pub log_format: LogFormat,
    /// Test only: quotas may also have a period of seconds ("<n>s"), so that tests see a
    /// period end. Hidden: the shipped periods are hour, day and month.
    #[arg(long, env = "TOKENGATE_TEST_QUOTA_PERIODS", default_value_t = false, hide = true,
          action = clap::ArgAction::Set)]
    pub test_quota_periods: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A duration option that must be longer than zero and cannot be `never`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span(pub Duration);

fn span(s: &str) -> Result<Span, String> {
    match duration::parse(s)? {
        None => Err("`never` is not allowed here".into()),
        Some(0) => Err("must be longer than 0s".into()),
        Some(secs) => Ok(Span(Duration::from_secs(secs))),
    }
}

/// A duration option: seconds, or `None` for `never`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime(pub Option<u64>);

fn lifetime(s: &str) -> Result<Lifetime, String> {
    duration::parse(s).map(Lifetime)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leads(pub Vec<i64>);

fn leads(s: &str) -> Result<Leads, String> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(Leads(vec![]));
    }
    let mut out = vec![];
    for part in s.split(',') {
        let secs = duration::parse(part)?
            .ok_or("`never` is not a lead time; use `none` to switch warnings off")?;
        out.push(i64::try_from(secs).map_err(|_| format!("`{part}` is too long"))?);
    }
    out.sort_unstable();
    out.dedup();
    Ok(Leads(out))
}

/// Reads `name:secret` lines.
fn admin_file(path: &Path) -> Result<Vec<Admin>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read --admin-credentials-file {}: {e}",
            path.display()
        )
    })?;
    let mut admins = vec![];
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = format!("--admin-credentials-file line {}", i + 1);
        let (name, secret) = line
            .split_once(':')
            .ok_or_else(|| format!("{at}: expected `name:secret`"))?;
        let name = name.trim();
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b))
        {
            return Err(format!(
                "{at}: the name must be 1 to 64 letters, digits or . _ @ -"
            ));
        }
        check_secret(&format!("{at}: the secret"), secret.trim())?;
        admins.push(Admin {
            name: name.into(),
            secret: secret.trim().to_string(),
        });
    }
    Ok(admins)
}

fn admins(args: &ServeArgs) -> Result<Vec<Admin>, String> {
    let mut admins = vec![];
    if args.admin_token.is_some() || args.admin_token_file.is_some() {
        admins.push(Admin {
            name: "admin".into(),
            secret: credential("admin-token", &args.admin_token, &args.admin_token_file)?,
        });
    }
    if let Some(path) = &args.admin_credentials_file {
        admins.extend(admin_file(path)?);
    }
    if admins.is_empty() {
        return Err(
            "an admin credential is required: set TOKENGATE_ADMIN_TOKEN, \
             TOKENGATE_ADMIN_TOKEN_FILE or TOKENGATE_ADMIN_CREDENTIALS_FILE"
                .into(),
        );
    }
    for (i, a) in admins.iter().enumerate() {
        if admins[..i].iter().any(|b| b.name == a.name) {
            return Err(format!("the admin name `{}` is given twice", a.name));
        }
        if admins[..i]
            .iter()
            .any(|b| same_secret(b.secret.as_bytes(), a.secret.as_bytes()))
        {
            return Err(format!(
                "the admin credentials `{}` and another share a secret",
                a.name
            ));
        }
    }
    Ok(admins)
}

fn policy(args: &ServeArgs) -> Policy {
    Policy {
        user: KindPolicy {
            max_lifetime: args.user_max_lifetime.0,
            require_expiry: args.user_require_expiry,
        },
        service: KindPolicy {
            max_lifetime: args.service_max_lifetime.0,
            require_expiry: args.service_require_expiry,
        },
    }
}

fn session_limits(args: &ServeArgs) -> Result<Limits, String> {
    let idle = args
        .session_idle_timeout
        .0
        .ok_or("--session-idle-timeout cannot be `never`")?;
    let absolute = args
        .session_max_age
        .0
        .ok_or("--session-max-age cannot be `never`")?;
    if idle == 0 || absolute == 0 {
        return Err("console session limits must be longer than 0s".into());
    }
    Ok(Limits {
        idle: Duration::from_secs(idle),
        absolute: Duration::from_secs(absolute),
    })
}

fn jobs(args: &ServeArgs) -> Result<Jobs, String> {
    let webhook = match &args.webhook_url {
        None => None,
        Some(url) => {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err("--webhook-url must be an http:// or https:// URL".into());
            }
            let secret = credential(
                "webhook-secret",
                &args.webhook_secret,
                &args.webhook_secret_file,
            )?;
            Some(Webhook {
                url: url.clone(),
                secret,
                max_attempts: args.webhook_max_attempts,
                timeout: Duration::from_secs(10),
            })
        }
    };
    let secs = |v: Option<u64>| v.map(|s| i64::try_from(s).unwrap_or(i64::MAX));
    Ok(Jobs {
        warning_leads: args.expiry_warnings.0.clone(),
        retention: secs(args.purge_interval.0).and(secs(args.retention.0)),
        purge_interval: secs(args.purge_interval.0).unwrap_or(i64::MAX),
        webhook,
    })
}

fn credential(
    name: &str,
    value: &Option<String>,
    file: &Option<PathBuf>,
) -> Result<String, String> {
    let env = name.to_uppercase().replace('-', "_");
    let (secret, source) = match (value, file) {
        (Some(v), _) => (v.clone(), format!("--{name} (TOKENGATE_{env})")),
        (None, Some(path)) => (
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read --{name}-file {}: {e}", path.display()))?,
            format!("the {name} in --{name}-file {}", path.display()),
        ),
        (None, None) => {
            return Err(format!(
                "the {name} is required: set TOKENGATE_{env} or TOKENGATE_{env}_FILE"
            ));
        }
    };
    let secret = secret.trim().to_string();
    check_secret(&source, &secret)?;
    Ok(secret)
}

fn pg_settings(args: &ServeArgs) -> PgSettings {
    PgSettings {
        pool_size: args.db_pool_size as usize,
        timeout: args.db_timeout.0,
        ..PgSettings::default()
    }
}

/// At least 16 characters and not easily guessed.
fn check_secret(what: &str, secret: &str) -> Result<(), String> {
    if secret.chars().count() < 16 {
        return Err(format!(
            "{what} must be at least 16 characters: {}",
            strength::HOW_TO_GENERATE
        ));
    }
    strength::check(what, secret)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Checks every option and builds the configuration.
pub fn config(args: &ServeArgs) -> Result<Config, String> {
    let admins = admins(args)?;
    let sync_token = credential("sync-token", &args.sync_token, &args.sync_token_file)?;
    if admins
        .iter()
        .any(|a| same_secret(a.secret.as_bytes(), sync_token.as_bytes()))
    {
        return Err("the admin and sync credentials must differ".into());
    }
    let jobs_interval = args
        .jobs_interval
        .0
        .ok_or("--jobs-interval cannot be `never`")?;
    Ok(Config {
        database: Database::parse(&args.db)?,
        postgres: pg_settings(args),
        admins,
        sync_token,
        policy: policy(args),
        sync_max_wait: Duration::from_secs(args.sync_max_wait_seconds),
        sync_page_size: args.sync_page_size,
        jobs: jobs(args)?,
        jobs_interval: Duration::from_secs(jobs_interval.max(1)),
        console: ConsoleSettings {
            enabled: args.console,
            secure_cookies: args.secure_cookies,
            expiry_warning_seconds: args.expiry_warnings.0.iter().copied().max().unwrap_or(0),
        },
        sessions: session_limits(args)?,
        connections: ConnectionLimits {
            header_read: args.header_read_timeout.0,
            idle: args.idle_timeout.0,
            body_read: args.body_read_timeout.0,
            max_connections: args
                .max_connections
                .map_or_else(connections::default_max_connections, |n| {
                    usize::try_from(n).unwrap_or(usize::MAX)
                }),
        },
        throttle: throttle::Settings {
            burst: args.auth_failure_burst,
            interval: args.auth_failure_interval.0,
        },
        test_quota_periods: args.test_quota_periods,
    })
}

pub async fn run(args: ServeArgs) -> Result<(), String> {
    let config = config(&args)?;
    let db = config.database.to_string();
    let max_connections = config.connections.max_connections;
    let app = Application::build(config).await?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(%addr, %db, max_connections, "listening");
    app.serve(listener, shutdown_signal()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_admin_credentials_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admins");
        std::fs::write(
            &path,
            "# platform team\n\nalice: alice-secret-0123456789 \nci-bot@team:bot-secret-7f3a9c01d2\n",
        )
        .unwrap();
        let admins = admin_file(&path).unwrap();
        let names: Vec<&str> = admins.iter().map(|a| a.name.as_ref()).collect();
        assert_eq!(names, ["alice", "ci-bot@team"]);
        assert_eq!(admins[0].secret, "alice-secret-0123456789");
        std::fs::write(&path, "al ice:alice-secret-0123456789\n").unwrap();
        assert!(admin_file(&path).unwrap_err().contains("line 1"));
        std::fs::write(&path, "alice:short\n").unwrap();
        assert!(admin_file(&path).unwrap_err().contains("at least 16"));
        std::fs::write(&path, "alice:aaaaaaaaaaaaaaaaaaaaaaaa\n").unwrap();
        let e = admin_file(&path).unwrap_err();
        assert!(e.contains("line 1: the secret is too easy to guess"), "{e}");
    }

    #[test]
    fn lead_times_parse_sorted() {
        assert_eq!(leads("7d,1d").unwrap(), Leads(vec![86_400, 604_800]));
        assert_eq!(leads("none").unwrap(), Leads(vec![]));
        assert!(leads("1d,never").is_err());
    }
}
