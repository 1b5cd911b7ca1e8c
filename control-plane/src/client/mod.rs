//! `tokengate token ...`: the admin CLI, a thin client of the REST API.

mod output;

use chrono::{SecondsFormat, Utc};
use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};
use std::process::ExitCode;

/// How to reach the control plane; shared by `token` and `audit`.
#[derive(Args, Debug)]
pub struct Connection {
    /// Control plane URL
    #[arg(
        long,
        env = "TOKENGATE_URL",
        default_value = "http://127.0.0.1:8081",
        global = true
    )]
    pub url: String,
    /// Admin credential
    #[arg(
        long,
        env = "TOKENGATE_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub admin_token: Option<String>,
    /// Print the API's JSON instead of text
    #[arg(long, global = true)]
    pub json: bool,
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
    #[arg(long)]
    pub token: Option<String>,
    /// Only this admin credential's (or `system`'s) entries
    #[arg(long)]
    pub actor: Option<String>,
    /// Only this action, e.g. token.suspended
    #[arg(long)]
    pub action: Option<String>,
    /// From this RFC 3339 time
    #[arg(long)]
    pub since: Option<String>,
    /// Before this RFC 3339 time
    #[arg(long)]
    pub until: Option<String>,
    #[arg(long)]
    pub limit: Option<u32>,
    #[arg(long)]
    pub cursor: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token; its secret is printed this once
    Create {
        #[arg(long)]
        name: String,
        /// user (acts for a person) or service (acts for an automation)
        #[arg(long)]
        kind: Option<String>,
        #[arg(long)]
        owner: Option<String>,
        #[arg(long)]
        max_rps: Option<u32>,
        #[arg(long)]
        burst: Option<u32>,
        /// 1h, 1d, 7d, 30d, 60d, 90d (any number of s, m, h or d) or never
        #[arg(long, conflicts_with = "expires_at")]
        expires_in: Option<String>,
        /// RFC 3339 time, e.g. 2030-01-31T00:00:00Z
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// List tokens
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        owner: Option<String>,
        #[arg(long)]
        kind: Option<String>,
        /// Only tokens that expire within this time from now, e.g. 7d
        #[arg(long)]
        expiring_within: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show one token
    Get { id: String },
    /// Change a token's name, limit or expiry
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        /// a number, or `none` for unlimited
        #[arg(long)]
        max_rps: Option<String>,
        /// a number, or `none` for the default
        #[arg(long)]
        burst: Option<String>,
        /// 1h, 30d ... from now, or never
        #[arg(long, conflicts_with = "expires_at")]
        expires_in: Option<String>,
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// Refuse the token until it is reactivated
    Suspend { id: String },
    /// Admit a suspended token again
    Reactivate { id: String },
    /// Issue a new secret for the token (printed this once); same id and settings
    Rotate {
        id: String,
        /// How long the old secret keeps working, e.g. 1h (default: refused at once)
        #[arg(long)]
        grace: Option<String>,
    },
    /// Revoke the token for good
    Revoke { id: String },
}

/// Why a command failed, and so its exit code.
enum Failure {
    /// Bad arguments or an API refusal: exit 1.
    Refused(String),
    /// No credential or no control plane: exit 2.
    Setup(String),
}

fn number_or_none(flag: &str, v: &str) -> Result<Value, Failure> {
    if v.eq_ignore_ascii_case("none") {
        return Ok(Value::Null);
    }
    v.parse::<u32>()
        .map(Value::from)
        .map_err(|_| Failure::Refused(format!("--{flag} takes a number or `none`, not `{v}`")))
}

fn expiry_from(expires_in: Option<&str>) -> Result<Option<Option<u64>>, Failure> {
    expires_in
        .map(crate::duration::parse)
        .transpose()
        .map_err(Failure::Refused)
}

fn create_body(cmd: &TokenCommand) -> Result<Value, Failure> {
    let TokenCommand::Create {
        name,
        kind,
        owner,
        max_rps,
        burst,
        expires_in,
        expires_at,
    } = cmd
    else {
        return Ok(Value::Null);
    };
    let mut b = Map::new();
    b.insert("name".into(), json!(name));
    let optional = [
        ("kind", kind.clone().map(Value::from)),
        ("owner", owner.clone().map(Value::from)),
    ];
    for (k, v) in optional.into_iter().chain([
        ("max_rps", max_rps.map(Value::from)),
        ("burst", burst.map(Value::from)),
        ("expires_at", expires_at.clone().map(Value::from)),
    ]) {
        if let Some(v) = v {
            b.insert(k.into(), v);
        }
    }
    if let Some(Some(secs)) = expiry_from(expires_in.as_deref())? {
        b.insert("expires_in_seconds".into(), json!(secs));
    }
    Ok(Value::Object(b))
}

fn update_body(cmd: &TokenCommand, now: chrono::DateTime<Utc>) -> Result<Value, Failure> {
    let TokenCommand::Update {
        name,
        max_rps,
        burst,
        expires_in,
        expires_at,
        ..
    } = cmd
    else {
        return Ok(Value::Null);
    };
    let mut b = Map::new();
    if let Some(n) = name {
        b.insert("name".into(), json!(n));
    }
    if let Some(v) = max_rps {
        b.insert("max_rps".into(), number_or_none("max-rps", v)?);
    }
    if let Some(v) = burst {
        b.insert("burst".into(), number_or_none("burst", v)?);
    }
    match expiry_from(expires_in.as_deref())? {
        Some(None) => {
            b.insert("expires_at".into(), Value::Null);
        }
        Some(Some(secs)) => {
            let at =
                now + chrono::Duration::seconds(i64::try_from(secs).unwrap_or(i64::MAX / 1000));
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
    if b.is_empty() {
        return Err(Failure::Refused(
            "nothing to update: give --name, --max-rps, --burst, --expires-in or --expires-at"
                .into(),
        ));
    }
    Ok(Value::Object(b))
}

struct Client {
    url: String,
    auth: String,
}

impl Client {
    /// Sends one admin call; `Ok(None)` for an empty (204) answer.
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Option<Value>, Failure> {
        let req = ureq::request(method, &format!("{}{path}", self.url.trim_end_matches('/')))
            .set("authorization", &self.auth)
            .timeout(std::time::Duration::from_secs(30));
        let result = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let resp = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => {
                let v: Value = r.into_json().unwrap_or(Value::Null);
                let mut msg = v["message"]
                    .as_str()
                    .unwrap_or("the control plane refused the request")
                    .to_string();
                if let Some(f) = v["field"].as_str() {
                    msg.push_str(&format!(" (field: {f})"));
                }
                return Err(Failure::Refused(msg));
            }
            Err(e) => {
                return Err(Failure::Setup(format!(
                    "cannot reach the control plane at {}: {e}",
                    self.url
                )));
            }
        };
        if resp.status() == 204 {
            return Ok(None);
        }
        resp.into_json().map(Some).map_err(|e| {
            Failure::Refused(format!("the control plane sent an unreadable answer: {e}"))
        })
    }
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
            Failure::Setup(
                "no admin credential: set TOKENGATE_ADMIN_TOKEN or pass --admin-token".into(),
            )
        })?;
    Ok(Client {
        url: conn.url.clone(),
        auth: format!("Bearer {admin}"),
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
    match &args.command {
        cmd @ TokenCommand::Create { .. } => {
            let v = client
                .send("POST", "/v1/tokens", Some(&create_body(cmd)?))?
                .unwrap_or(Value::Null);
            Ok(with_secret(&v, json))
        }
        TokenCommand::List {
            status,
            owner,
            kind,
            expiring_within,
            limit,
            cursor,
        } => {
            let limit = limit.map(|l| l.to_string());
            let path = format!(
                "/v1/tokens{}",
                query(&[
                    ("status", status.as_deref()),
                    ("owner", owner.as_deref()),
                    ("kind", kind.as_deref()),
                    ("expiring_within", expiring_within.as_deref()),
                    ("cursor", cursor.as_deref()),
                    ("limit", limit.as_deref()),
                ])
            );
            let v = client.send("GET", &path, None)?.unwrap_or(Value::Null);
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
                out.push_str(&format!("more: tokengate token list --cursor {c}\n"));
            }
            Ok(out)
        }
        TokenCommand::Get { id } => Ok(shown(client.send(
            "GET",
            &format!("/v1/tokens/{}", encode(id)),
            None,
        )?)),
        cmd @ TokenCommand::Update { id, .. } => {
            let body = update_body(cmd, Utc::now())?;
            Ok(shown(client.send(
                "PATCH",
                &format!("/v1/tokens/{}", encode(id)),
                Some(&body),
            )?))
        }
        TokenCommand::Suspend { id } => Ok(shown(client.send(
            "POST",
            &format!("/v1/tokens/{}/suspend", encode(id)),
            None,
        )?)),
        TokenCommand::Reactivate { id } => Ok(shown(client.send(
            "POST",
            &format!("/v1/tokens/{}/reactivate", encode(id)),
            None,
        )?)),
        TokenCommand::Rotate { id, grace } => {
            let mut body = Map::new();
            if let Some(g) = grace {
                let secs = crate::duration::parse(g)
                    .map_err(Failure::Refused)?
                    .ok_or_else(|| Failure::Refused("--grace cannot be `never`".into()))?;
                body.insert("grace_seconds".into(), json!(secs));
            }
            let v = client
                .send(
                    "POST",
                    &format!("/v1/tokens/{}/rotate", encode(id)),
                    Some(&Value::Object(body)),
                )?
                .unwrap_or(Value::Null);
            Ok(with_secret(&v, json))
        }
        TokenCommand::Revoke { id } => {
            client.send("DELETE", &format!("/v1/tokens/{}", encode(id)), None)?;
            Ok(if json {
                pretty(&json!({"revoked": id}))
            } else {
                format!("revoked {id}\n")
            })
        }
    }
}

fn execute_audit(args: &AuditArgs) -> Result<String, Failure> {
    let client = client(&args.conn)?;
    let limit = args.limit.map(|l| l.to_string());
    let path = format!(
        "/v1/audit{}",
        query(&[
            ("token", args.token.as_deref()),
            ("actor", args.actor.as_deref()),
            ("action", args.action.as_deref()),
            ("since", args.since.as_deref()),
            ("until", args.until.as_deref()),
            ("cursor", args.cursor.as_deref()),
            ("limit", limit.as_deref()),
        ])
    );
    let v = client.send("GET", &path, None)?.unwrap_or(Value::Null);
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
        out.push_str(&format!("more: tokengate audit --cursor {c}\n"));
    }
    Ok(out)
}

pub fn run(args: TokenArgs) -> ExitCode {
    finish(execute(&args))
}

pub fn run_audit(args: AuditArgs) -> ExitCode {
    finish(execute_audit(&args))
}

fn finish(result: Result<String, Failure>) -> ExitCode {
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(Failure::Refused(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
        Err(Failure::Setup(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
    }
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
            expires_in: expires_in.map(str::to_string),
            expires_at: None,
        }
    }

    fn update(max_rps: Option<&str>, expires_in: Option<&str>) -> TokenCommand {
        TokenCommand::Update {
            id: "tok_1".into(),
            name: None,
            max_rps: max_rps.map(str::to_string),
            burst: None,
            expires_in: expires_in.map(str::to_string),
            expires_at: None,
        }
    }

    #[test]
    fn create_sends_only_what_was_given() {
        let b = create_body(&create(Some(5), Some("30d"))).ok().unwrap();
        assert_eq!(
            b,
            json!({"name":"n","kind":"service","max_rps":5,"expires_in_seconds":2_592_000})
        );
        let b = create_body(&create(None, Some("never"))).ok().unwrap();
        assert_eq!(b, json!({"name":"n","kind":"service"}));
        assert!(create_body(&create(None, Some("soon"))).is_err());
    }

    #[test]
    fn update_tells_null_from_absent() {
        let now = chrono::DateTime::parse_from_rfc3339("2030-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            update_body(&update(Some("none"), None), now).ok().unwrap(),
            json!({"max_rps": null})
        );
        assert_eq!(
            update_body(&update(Some("7"), Some("never")), now)
                .ok()
                .unwrap(),
            json!({"max_rps": 7, "expires_at": null})
        );
        assert_eq!(
            update_body(&update(None, Some("1d")), now).ok().unwrap(),
            json!({"expires_at": "2030-01-02T00:00:00Z"})
        );
        assert!(update_body(&update(None, None), now).is_err());
        assert!(update_body(&update(Some("fast"), None), now).is_err());
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode("a b&c"), "a%20b%26c");
        assert_eq!(encode("tok_Ab-1"), "tok_Ab-1");
    }
}
