//! `tokengate token ...` and `tokengate audit`: the admin CLI, a thin client of the REST API.

mod http;
mod output;
mod scope;

pub use http::Origin;
pub use scope::{ScopeArgs, ScopeCommand};

use chrono::{SecondsFormat, Utc};
use clap::{Args, Subcommand};
use http::{Client, Refusal};
use serde_json::{json, Map, Value};
use std::process::ExitCode;

/// Exit codes of `tokengate token` and `tokengate audit`.
pub mod exit {
    /// The control plane refused the request (bad input, no such token, ...).
    pub const REFUSED: u8 = 1;
    /// The command line is wrong (clap's own code for usage errors).
    pub const USAGE: u8 = 2;
    /// Nothing answers at the URL, or what answers is not the control plane.
    pub const UNREACHABLE: u8 = 3;
    /// No admin credential, or the control plane refused it (or throttles its address).
    pub const CREDENTIAL: u8 = 4;
}

/// Shown under the help of `token` and `audit`.
pub const EXIT_CODES: &str = "Exit codes: 0 done; 1 refused by the control plane (bad \
input, no such token, ...); 2 usage error; 3 control plane unreachable, or the URL is not \
one (e.g. Envoy's port); 4 admin credential missing, refused or throttled.";

/// How to reach the control plane; shared by `token` and `audit`.
#[derive(Args, Debug)]
#[command(next_help_heading = "Global options")]
pub struct Connection {
    /// Control plane URL
    #[arg(
        long,
        env = "TOKENGATE_URL",
        default_value = "http://127.0.0.1:8081",
        hide_env_values = true,
        value_name = "URL",
        global = true
    )]
    pub url: String,
    /// Admin credential (prefer the environment variable: a flag shows in `ps`)
    #[arg(
        long,
        env = "TOKENGATE_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "CREDENTIAL",
        global = true
    )]
    pub admin_token: Option<String>,
    /// Print the API's JSON instead of text
    #[arg(long, global = true)]
    pub json: bool,
    /// Where `admin_token` came from; set after parsing.
    #[arg(skip)]
    pub admin_token_from: Option<Origin>,
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    #[command(flatten)]
    pub conn: Connection,
    #[command(subcommand)]
    pub command: TokenCommand,
}

/// `tokengate audit`: the audit trail, newest first.
#[derive(Args, Debug)]
pub struct AuditArgs {
    #[command(flatten)]
    pub conn: Connection,
    /// Only this token's entries
    #[arg(long, value_name = "ID")]
    pub token: Option<String>,
    /// Only this admin credential's (or `system`'s) entries
    #[arg(long, value_name = "NAME")]
    pub actor: Option<String>,
    /// Only this action
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(crate::domain::audit::ACTIONS.iter().copied()))]
    pub action: Option<String>,
    /// From this time on (RFC 3339, e.g. 2030-01-31T00:00:00Z)
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Before this time (RFC 3339)
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Entries per page, 1 to 1000 [default: 100]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: Option<u32>,
    /// Continue a listing from the cursor it printed
    #[arg(long)]
    pub cursor: Option<String>,
}

/// A number, or `none` (unlimited, or the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumberOrNone {
    Number(u32),
    None,
}

fn number_or_none(v: &str) -> Result<NumberOrNone, String> {
    if v.eq_ignore_ascii_case("none") {
        return Ok(NumberOrNone::None);
    }
    v.parse::<u32>()
        .map(NumberOrNone::Number)
        .map_err(|_| "takes a whole number or `none`".to_string())
}

/// A duration such as `30d`, or `never`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry(pub Option<u64>);

fn expiry(v: &str) -> Result<Expiry, String> {
    crate::duration::parse(v).map(Expiry)
}

/// Scope names given as `a,b`; the empty string is none at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeNames(pub Vec<String>);

fn scope_names(v: &str) -> Result<ScopeNames, String> {
    Ok(ScopeNames(
        v.split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect(),
    ))
}

/// `--quota`: `LIMIT/PERIOD` such as `1000/day`, or `none` (no quota).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaArg(pub Option<tokengate_wire::Quota>);

fn quota_arg(v: &str) -> Result<QuotaArg, String> {
    if v == "none" {
        return Ok(QuotaArg(None));
    }
    let bad =
        || format!("`{v}`: write LIMIT/PERIOD with a period of hour, day or month, e.g. 1000/day");
    let (limit, period) = v.split_once('/').ok_or_else(bad)?;
    Ok(QuotaArg(Some(tokengate_wire::Quota {
        limit: limit.trim().parse().map_err(|_| bad())?,
        period: tokengate_wire::Period::parse(period.trim()).ok_or_else(bad)?,
    })))
}

/// A duration such as `7d`; `never` is not one.
fn span(v: &str) -> Result<u64, String> {
    crate::duration::parse(v)?.ok_or_else(|| "`never` is not allowed here".to_string())
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token; its secret is printed this once
    Create {
        /// Name shown in lists, the audit trail and the upstream's identity header
        #[arg(long)]
        name: String,
        /// `user` acts for a person; `service` acts for an automation owned by a group
        #[arg(long, value_parser = ["user", "service"])]
        kind: Option<String>,
        /// The person (user tokens; default: the admin credential's name) or the owning
        /// group (service tokens; required)
        #[arg(long)]
        owner: Option<String>,
        /// Requests per second [default: unlimited]
        #[arg(long, value_name = "N")]
        max_rps: Option<u32>,
        /// Requests allowed at once, with --max-rps [default: one second's worth]
        #[arg(long, value_name = "N")]
        burst: Option<u32>,
        /// `fleet`: --max-rps and --burst hold for all Envoys together; `proxy`: for each
        /// Envoy [default: fleet]
        #[arg(long, value_name = "SCOPE", value_parser = ["fleet", "proxy"])]
        limit_scope: Option<String>,
        /// Expiry from now: 1h, 1d, 7d, 30d, 60d, 90d (any number of s, m, h or d), or never
        #[arg(long, value_name = "DURATION", value_parser = expiry, conflicts_with = "expires_at")]
        expires_in: Option<Expiry>,
        /// Expiry as an RFC 3339 time, e.g. 2030-01-31T00:00:00Z
        #[arg(long, value_name = "TIME")]
        expires_at: Option<String>,
        /// Limit the token to these scopes (comma-separated names; '' for none: every
        /// request refused) [default: unrestricted]
        #[arg(long, value_name = "NAMES", value_parser = scope_names)]
        scopes: Option<ScopeNames>,
        /// At most LIMIT requests per UTC hour, day or month across the fleet, e.g. 1000/day
        /// [default: none]
        #[arg(long, value_name = "LIMIT/PERIOD", value_parser = quota_arg)]
        quota: Option<QuotaArg>,
    },
    /// List tokens, a page at a time
    List {
        /// Only tokens with this status (an expired token is `expired`, not `active` or
        /// `suspended`)
        #[arg(long, value_parser = ["active", "suspended", "expired"])]
        status: Option<String>,
        /// Only tokens whose name contains this (ASCII letters in either case)
        #[arg(long, value_name = "TEXT")]
        name: Option<String>,
        /// Only tokens of this owner
        #[arg(long)]
        owner: Option<String>,
        /// Only tokens of this kind
        #[arg(long, value_parser = ["user", "service"])]
        kind: Option<String>,
        /// Only tokens that expire within this time from now, e.g. 7d
        #[arg(long, value_name = "DURATION", value_parser = span)]
        expiring_within: Option<u64>,
        /// Tokens per page, 1 to 1000 [default: 100]
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: Option<u32>,
        /// Continue a listing from the cursor it printed
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show one token
    Get {
        /// Token id, tok_...
        id: String,
    },
    /// Change a token's name, limit, expiry or scopes
    #[command(group(clap::ArgGroup::new("change").required(true).multiple(true)
        .args(["name", "max_rps", "burst", "limit_scope", "expires_in", "expires_at", "scopes",
               "unrestricted", "quota"])))]
    Update {
        /// Token id, tok_...
        id: String,
        /// New name
        #[arg(long)]
        name: Option<String>,
        /// Requests per second, or `none` for unlimited
        #[arg(long, value_name = "N|none", value_parser = number_or_none)]
        max_rps: Option<NumberOrNone>,
        /// Requests allowed at once, or `none` for one second's worth
        #[arg(long, value_name = "N|none", value_parser = number_or_none)]
        burst: Option<NumberOrNone>,
        /// `fleet` (the limit holds for all Envoys together) or `proxy` (for each Envoy)
        #[arg(long, value_name = "SCOPE", value_parser = ["fleet", "proxy"])]
        limit_scope: Option<String>,
        /// New expiry from now (1h, 30d ...), or never
        #[arg(long, value_name = "DURATION", value_parser = expiry, conflicts_with = "expires_at")]
        expires_in: Option<Expiry>,
        /// New expiry as an RFC 3339 time
        #[arg(long, value_name = "TIME")]
        expires_at: Option<String>,
        /// Limit the token to these scopes, replacing its own (comma-separated names; ''
        /// for none: every request refused)
        #[arg(long, value_name = "NAMES", value_parser = scope_names, conflicts_with = "unrestricted")]
        scopes: Option<ScopeNames>,
        /// Lift the token's scopes: it may call every route again
        #[arg(long)]
        unrestricted: bool,
        /// A new quota, LIMIT/PERIOD (e.g. 1000/day), or `none` to lift it
        #[arg(long, value_name = "LIMIT/PERIOD|none", value_parser = quota_arg)]
        quota: Option<QuotaArg>,
    },
    /// Refuse the token until it is reactivated
    Suspend {
        /// Token id, tok_...
        id: String,
    },
    /// Admit a suspended token again
    Reactivate {
        /// Token id, tok_...
        id: String,
    },
    /// Issue a new secret for the token (printed this once); same id and settings
    Rotate {
        /// Token id, tok_...
        id: String,
        /// How long the old secret keeps working, e.g. 1h (at most 30d) [default: refused at
        /// once]
        #[arg(long, value_name = "DURATION", value_parser = span)]
        grace: Option<u64>,
    },
    /// Revoke the token for good
    Revoke {
        /// Token id, tok_...
        id: String,
    },
}

/// Why a command failed, and so its exit code (see `exit`).
pub enum Failure {
    /// The control plane refused the request.
    Api(Refusal),
    /// Nothing answers at the URL, or not the control plane.
    Unreachable(String),
    /// No admin credential, or a refused one.
    Credential(String),
}

fn create_body(cmd: &TokenCommand) -> Value {
    let TokenCommand::Create {
        name,
        kind,
        owner,
        max_rps,
        burst,
        limit_scope,
        expires_in,
        expires_at,
        scopes,
        quota,
    } = cmd
    else {
        return Value::Null;
    };
    let mut b = Map::new();
    b.insert("name".into(), json!(name));
    if let Some(ScopeNames(names)) = scopes {
        b.insert("scopes".into(), json!(names));
    }
    if let Some(QuotaArg(Some(q))) = quota {
        b.insert("quota".into(), json!(q));
    }
    let optional = [
        ("kind", kind.clone().map(Value::from)),
        ("owner", owner.clone().map(Value::from)),
        ("max_rps", max_rps.map(Value::from)),
        ("burst", burst.map(Value::from)),
        ("limit_scope", limit_scope.clone().map(Value::from)),
        ("expires_at", expires_at.clone().map(Value::from)),
        (
            "expires_in_seconds",
            expires_in.and_then(|e| e.0).map(Value::from),
        ),
    ];
    for (k, v) in optional {
        if let Some(v) = v {
            b.insert(k.into(), v);
        }
    }
    Value::Object(b)
}

fn update_body(cmd: &TokenCommand, now: chrono::DateTime<Utc>) -> Value {
    let TokenCommand::Update {
        name,
        max_rps,
        burst,
        limit_scope,
        expires_in,
        expires_at,
        scopes,
        unrestricted,
        quota,
        ..
    } = cmd
    else {
        return Value::Null;
    };
    let number = |v: NumberOrNone| match v {
        NumberOrNone::Number(n) => json!(n),
        NumberOrNone::None => Value::Null,
    };
    let mut b = Map::new();
    if let Some(n) = name {
        b.insert("name".into(), json!(n));
    }
    if let Some(v) = max_rps {
        b.insert("max_rps".into(), number(*v));
    }
    if let Some(v) = burst {
        b.insert("burst".into(), number(*v));
    }
    if let Some(v) = limit_scope {
        b.insert("limit_scope".into(), json!(v));
    }
    match expires_in {
        Some(Expiry(None)) => {
            b.insert("expires_at".into(), Value::Null);
        }
        Some(Expiry(Some(secs))) => {
            let at =
                now + chrono::Duration::seconds(i64::try_from(*secs).unwrap_or(i64::MAX / 1000));
            b.insert(
                "expires_at".into(),
                json!(at.to_rfc3339_opts(SecondsFormat::Secs, true)),
            );
        }
        None => {}
    }
    if let Some(t) = expires_at {
        b.insert("expires_at".into(), json!(t));
    }
    if let Some(ScopeNames(names)) = scopes {
        b.insert("scopes".into(), json!(names));
    } else if *unrestricted {
        b.insert("scopes".into(), Value::Null);
    }
    if let Some(QuotaArg(q)) = quota {
        b.insert("quota".into(), json!(q));
    }
    Value::Object(b)
}

fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn client(conn: &Connection) -> Result<Client, Failure> {
    let admin = conn
        .admin_token
        .as_deref()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Failure::Credential(
                "no admin credential: set TOKENGATE_ADMIN_TOKEN (or pass --admin-token)".into(),
            )
        })?;
    Ok(Client {
        url: conn.url.clone(),
        auth: format!("Bearer {admin}"),
        origin: conn.admin_token_from.unwrap_or(Origin::Env),
    })
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

/// `?k=v&...` of the parameters that are set.
fn query(params: &[(&str, Option<&str>)]) -> String {
    let q: Vec<String> = params
        .iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={}", encode(v))))
        .collect();
    if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    }
}

/// The command that fetches the next page: the same filters and limit, and the cursor.
fn next_page(command: &str, flags: &[(&str, Option<&str>)], cursor: &str) -> String {
    let mut words = vec![command.to_string()];
    for (flag, value) in flags {
        if let Some(v) = value {
            words.push(format!("--{flag} {}", output::shell_quote(v)));
        }
    }
    words.push(format!("--cursor {}", output::shell_quote(cursor)));
    format!("more: {}\n", words.join(" "))
}

fn with_secret(v: &Value, json: bool) -> String {
    if json {
        return pretty(v);
    }
    let secret = v["token"].as_str().unwrap_or_default();
    format!(
        "Copy this token now; it will not be shown again:\n\n    {secret}\n\n{}",
        output::record(v)
    )
}

fn execute(args: &TokenArgs) -> Result<String, Failure> {
    let client = client(&args.conn)?;
    let json = args.conn.json;
    let shown = |v: Option<Value>| -> String {
        let v = v.unwrap_or(Value::Null);
        if json {
            pretty(&v)
        } else {
            output::record(&v)
        }
    };
    let token_path = |id: &str| format!("/v1/tokens/{}", encode(id));
    match &args.command {
        cmd @ TokenCommand::Create { .. } => {
            let v = client
                .send("POST", "/v1/tokens", Some(&create_body(cmd)), "token")?
                .unwrap_or(Value::Null);
            Ok(with_secret(&v, json))
        }
        TokenCommand::List {
            status,
            name,
            owner,
            kind,
            expiring_within,
            limit,
            cursor,
        } => {
            let limit = limit.map(|l| l.to_string());
            let within = expiring_within.map(crate::duration::format);
            let filters = [
                ("status", status.as_deref()),
                ("name", name.as_deref()),
                ("owner", owner.as_deref()),
                ("kind", kind.as_deref()),
                ("expiring-within", within.as_deref()),
                ("limit", limit.as_deref()),
            ];
            let path = format!(
                "/v1/tokens{}",
                query(&[
                    ("status", status.as_deref()),
                    ("name_contains", name.as_deref()),
                    ("owner", owner.as_deref()),
                    ("kind", kind.as_deref()),
                    ("expiring_within", within.as_deref()),
                    ("cursor", cursor.as_deref()),
                    ("limit", limit.as_deref()),
                ])
            );
            let v = client
                .send("GET", &path, None, "tokens")?
                .unwrap_or(Value::Null);
            if json {
                return Ok(pretty(&v));
            }
            let mut out = output::table(
                v["tokens"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
            );
            if let Some(c) = v["next_cursor"].as_str() {
                out.push_str(&next_page("tokengate token list", &filters, c));
            }
            Ok(out)
        }
        TokenCommand::Get { id } => Ok(shown(client.send("GET", &token_path(id), None, "id")?)),
        cmd @ TokenCommand::Update { id, .. } => {
            let body = update_body(cmd, Utc::now());
            Ok(shown(client.send(
                "PATCH",
                &token_path(id),
                Some(&body),
                "id",
            )?))
        }
        TokenCommand::Suspend { id } => Ok(shown(client.send(
            "POST",
            &format!("{}/suspend", token_path(id)),
            None,
            "id",
        )?)),
        TokenCommand::Reactivate { id } => Ok(shown(client.send(
            "POST",
            &format!("{}/reactivate", token_path(id)),
            None,
            "id",
        )?)),
        TokenCommand::Rotate { id, grace } => {
            let mut body = Map::new();
            if let Some(secs) = grace {
                body.insert("grace_seconds".into(), json!(secs));
            }
            let v = client
                .send(
                    "POST",
                    &format!("{}/rotate", token_path(id)),
                    Some(&Value::Object(body)),
                    "token",
                )?
                .unwrap_or(Value::Null);
            Ok(with_secret(&v, json))
        }
        TokenCommand::Revoke { id } => {
            // Revoking twice reaches what was asked for; say so rather than fail.
            let already = match client.send("DELETE", &token_path(id), None, "id") {
                Ok(_) => None,
                Err(Failure::Api(r)) if r.error == "already_revoked" => {
                    Some(r.body["revoked_at"].as_str().unwrap_or("?").to_string())
                }
                Err(e) => return Err(e),
            };
            Ok(match (json, already) {
                (true, None) => pretty(&json!({"revoked": id})),
                (true, Some(at)) => pretty(&json!({"revoked": id, "already_revoked_at": at})),
                (false, None) => format!("revoked {id}\n"),
                (false, Some(at)) => format!("{id} was already revoked at {at}\n"),
            })
        }
    }
}

fn execute_audit(args: &AuditArgs) -> Result<String, Failure> {
    let client = client(&args.conn)?;
    let limit = args.limit.map(|l| l.to_string());
    let filters = [
        ("token", args.token.as_deref()),
        ("actor", args.actor.as_deref()),
        ("action", args.action.as_deref()),
        ("since", args.since.as_deref()),
        ("until", args.until.as_deref()),
        ("limit", limit.as_deref()),
    ];
    let mut params = filters.to_vec();
    params.push(("cursor", args.cursor.as_deref()));
    let path = format!("/v1/audit{}", query(&params));
    let v = client
        .send("GET", &path, None, "entries")?
        .unwrap_or(Value::Null);
    if args.conn.json {
        return Ok(pretty(&v));
    }
    let mut out = output::audit_table(
        v["entries"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default(),
    );
    if let Some(c) = v["next_cursor"].as_str() {
        out.push_str(&next_page("tokengate audit", &filters, c));
    }
    Ok(out)
}

pub fn run_scope(args: ScopeArgs) -> ExitCode {
    finish(scope::execute(&args))
}

pub fn run(args: TokenArgs) -> ExitCode {
    finish(execute(&args))
}

pub fn run_audit(args: AuditArgs) -> ExitCode {
    finish(execute_audit(&args))
}

fn finish(result: Result<String, Failure>) -> ExitCode {
    let (msg, code) = match result {
        Ok(out) => {
            print!("{out}");
            return ExitCode::SUCCESS;
        }
        Err(Failure::Api(r)) => (r.message, exit::REFUSED),
        Err(Failure::Unreachable(m)) => (m, exit::UNREACHABLE),
        Err(Failure::Credential(m)) => (m, exit::CREDENTIAL),
    };
    eprintln!("error: {msg}");
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(max_rps: Option<u32>, expires_in: Option<&str>) -> TokenCommand {
        TokenCommand::Create {
            name: "n".into(),
            kind: Some("service".into()),
            owner: None,
            max_rps,
            burst: None,
            limit_scope: max_rps.map(|_| "proxy".into()),
            expires_in: expires_in.map(|e| expiry(e).unwrap()),
            expires_at: None,
            scopes: None,
            quota: None,
        }
    }

    fn update(max_rps: Option<&str>, expires_in: Option<&str>) -> TokenCommand {
        TokenCommand::Update {
            id: "tok_1".into(),
            name: None,
            max_rps: max_rps.map(|v| number_or_none(v).unwrap()),
            burst: None,
            limit_scope: None,
            expires_in: expires_in.map(|e| expiry(e).unwrap()),
            expires_at: None,
            scopes: None,
            unrestricted: false,
            quota: None,
        }
    }

    #[test]
    fn a_quota_is_limit_over_period_or_none() {
        let q = quota_arg("1000/day").unwrap();
        let mut c = create(None, None);
        if let TokenCommand::Create { quota, .. } = &mut c {
            *quota = Some(q);
        }
        assert_eq!(
            create_body(&c),
            json!({"name":"n","kind":"service","quota":{"limit":1000,"period":"day"}})
        );
        let mut u = update(None, None);
        if let TokenCommand::Update { quota, .. } = &mut u {
            *quota = Some(quota_arg("none").unwrap());
        }
        assert_eq!(update_body(&u, Utc::now()), json!({"quota": null}));
        for bad in ["1000", "x/day", "10/week", "/day", "-1/hour"] {
            assert!(quota_arg(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn scopes_are_a_list_none_or_lifted() {
        assert_eq!(
            scope_names("a, b,").unwrap(),
            ScopeNames(vec!["a".into(), "b".into()])
        );
        assert_eq!(scope_names("").unwrap(), ScopeNames(vec![]));
        let mut c = create(None, None);
        if let TokenCommand::Create { scopes, .. } = &mut c {
            *scopes = Some(ScopeNames(vec![]));
        }
        assert_eq!(
            create_body(&c),
            json!({"name":"n","kind":"service","scopes":[]})
        );
        let now = Utc::now();
        let mut u = update(None, None);
        if let TokenCommand::Update { unrestricted, .. } = &mut u {
            *unrestricted = true;
        }
        assert_eq!(update_body(&u, now), json!({"scopes": null}));
    }

    #[test]
    fn create_sends_only_what_was_given() {
        let b = create_body(&create(Some(5), Some("30d")));
        assert_eq!(
            b,
            json!({"name":"n","kind":"service","max_rps":5,"limit_scope":"proxy","expires_in_seconds":2_592_000})
        );
        let b = create_body(&create(None, Some("never")));
        assert_eq!(b, json!({"name":"n","kind":"service"}));
        assert!(expiry("soon").is_err());
    }

    #[test]
    fn update_tells_null_from_absent() {
        let now = chrono::DateTime::parse_from_rfc3339("2030-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            update_body(&update(Some("none"), None), now),
            json!({"max_rps": null})
        );
        assert_eq!(
            update_body(&update(Some("7"), Some("never")), now),
            json!({"max_rps": 7, "expires_at": null})
        );
        assert_eq!(
            update_body(&update(None, Some("1d")), now),
            json!({"expires_at": "2030-01-02T00:00:00Z"})
        );
        assert!(number_or_none("fast").is_err());
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode("a b&c"), "a%20b%26c");
        assert_eq!(encode("tok_Ab-1"), "tok_Ab-1");
    }

    #[test]
    fn the_next_page_keeps_the_filters_and_the_limit() {
        assert_eq!(
            next_page(
                "tokengate token list",
                &[
                    ("status", Some("active")),
                    ("owner", Some("data eng")),
                    ("kind", None),
                    ("limit", Some("20"))
                ],
                "tok_X"
            ),
            "more: tokengate token list --status active --owner 'data eng' --limit 20 --cursor tok_X\n"
        );
    }
}
