//! `tokengate scope ...`: scopes through the REST API.
//!
//! A rule on the command line is `[METHODS ]PATH`: `GET,HEAD /orders/**` (those methods on
//! that path) or `/health` (any method). The path grammar is the API's (see
//! `tokengate_wire::scope`); the control plane checks it and names the rule it refuses.

use super::{client, encode, output, pretty, Connection, Failure};
use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};
use tokengate_wire::Rule;

#[derive(Args, Debug)]
pub struct ScopeArgs {
    #[command(flatten)]
    pub conn: Connection,
    #[command(subcommand)]
    pub command: ScopeCommand,
}

/// Reads `[METHODS ]PATH`: methods comma-separated, then whitespace, then the path.
pub fn rule(v: &str) -> Result<Rule, String> {
    let v = v.trim();
    if v.starts_with('/') {
        return Ok(Rule {
            methods: None,
            path: v.to_string(),
        });
    }
    let (methods, path) = v
        .split_once(char::is_whitespace)
        .ok_or("is `[METHODS ]PATH`, e.g. 'GET,HEAD /orders/**' or '/health'")?;
    Ok(Rule {
        methods: Some(methods.split(',').map(str::to_string).collect()),
        path: path.trim().to_string(),
    })
}

#[derive(Subcommand, Debug)]
pub enum ScopeCommand {
    /// Create a scope
    Create {
        /// Scope name: a-z, 0-9, ':', '.', '_' and '-', e.g. orders:read
        name: String,
        /// A rule, `[METHODS ]PATH`, e.g. 'GET,HEAD /orders/**' or '/health' (any method);
        /// give --rule once per rule. A path segment is a literal, `*` (one segment) or, last,
        /// `**` (any rest, none included)
        #[arg(long = "rule", value_name = "RULE", value_parser = rule, required = true)]
        rules: Vec<Rule>,
        /// What the scope is for
        #[arg(long)]
        description: Option<String>,
    },
    /// List every scope
    List,
    /// Show one scope
    Get {
        /// Scope name
        name: String,
    },
    /// Change a scope's rules (all of them, replaced) or description
    #[command(group(clap::ArgGroup::new("change").required(true).multiple(true)
        .args(["rules", "description"])))]
    Update {
        /// Scope name
        name: String,
        /// The new rules, replacing every rule: --rule once per rule, as for create
        #[arg(long = "rule", value_name = "RULE", value_parser = rule)]
        rules: Vec<Rule>,
        /// New description ('' for none)
        #[arg(long)]
        description: Option<String>,
    },
    /// Delete a scope (refused while a token still names it)
    Delete {
        /// Scope name
        name: String,
    },
}

fn create_body(name: &str, rules: &[Rule], description: Option<&str>) -> Value {
    let mut b = Map::new();
    b.insert("name".into(), json!(name));
    if let Some(d) = description {
        b.insert("description".into(), json!(d));
    }
    b.insert("rules".into(), json!(rules));
    Value::Object(b)
}

fn update_body(rules: &[Rule], description: Option<&str>) -> Value {
    let mut b = Map::new();
    if let Some(d) = description {
        b.insert("description".into(), json!(d));
    }
    if !rules.is_empty() {
        b.insert("rules".into(), json!(rules));
    }
    Value::Object(b)
}

/// A rule as the command line writes it.
fn rule_text(r: &Value) -> String {
    let path = r["path"].as_str().unwrap_or_default();
    match r["methods"].as_array() {
        Some(ms) => {
            let ms: Vec<&str> = ms.iter().filter_map(Value::as_str).collect();
            format!("{} {path}", ms.join(","))
        }
        None => path.to_string(),
    }
}

fn record(s: &Value) -> String {
    let mut out = format!(
        "name: {}\ndescription: {}\n",
        s["name"].as_str().unwrap_or_default(),
        s["description"]
            .as_str()
            .filter(|d| !d.is_empty())
            .unwrap_or("-"),
    );
    for r in s["rules"].as_array().into_iter().flatten() {
        out.push_str(&format!("rule: {}\n", rule_text(r)));
    }
    out.push_str(&format!(
        "created_at: {}\nupdated_at: {}\nversion: {}\n",
        s["created_at"].as_str().unwrap_or_default(),
        s["updated_at"].as_str().unwrap_or_default(),
        s["version"]
    ));
    out
}

fn table(scopes: &[Value]) -> String {
    if scopes.is_empty() {
        return "(no scopes)\n".to_string();
    }
    let mut rows = vec![["NAME", "RULES", "DESCRIPTION"].map(String::from).to_vec()];
    for s in scopes {
        let rules: Vec<String> = s["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .map(rule_text)
            .collect();
        rows.push(vec![
            s["name"].as_str().unwrap_or_default().to_string(),
            rules.join("; "),
            s["description"].as_str().unwrap_or_default().to_string(),
        ]);
    }
    output::columns(rows)
}

pub(super) fn execute(args: &ScopeArgs) -> Result<String, Failure> {
    let client = client(&args.conn)?;
    let json = args.conn.json;
    let shown = |v: Option<Value>| -> String {
        let v = v.unwrap_or(Value::Null);
        if json {
            pretty(&v)
        } else {
            record(&v)
        }
    };
    let path = |name: &str| format!("/v1/scopes/{}", encode(name));
    match &args.command {
        ScopeCommand::Create {
            name,
            rules,
            description,
        } => {
            let body = create_body(name, rules, description.as_deref());
            Ok(shown(client.send(
                "POST",
                "/v1/scopes",
                Some(&body),
                "name",
            )?))
        }
        ScopeCommand::List => {
            let v = client
                .send("GET", "/v1/scopes", None, "scopes")?
                .unwrap_or(Value::Null);
            if json {
                return Ok(pretty(&v));
            }
            Ok(table(
                v["scopes"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
            ))
        }
        ScopeCommand::Get { name } => Ok(shown(client.send("GET", &path(name), None, "name")?)),
        ScopeCommand::Update {
            name,
            rules,
            description,
        } => {
            let body = update_body(rules, description.as_deref());
            Ok(shown(client.send(
                "PATCH",
                &path(name),
                Some(&body),
                "name",
            )?))
        }
        ScopeCommand::Delete { name } => {
            client.send("DELETE", &path(name), None, "name")?;
            Ok(if json {
                pretty(&json!({"deleted": name}))
            } else {
                format!("deleted {name}\n")
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_read_as_methods_and_a_path() {
        assert_eq!(
            rule("GET,HEAD /orders/**").unwrap(),
            Rule {
                methods: Some(vec!["GET".into(), "HEAD".into()]),
                path: "/orders/**".into()
            }
        );
        assert_eq!(rule(" /health ").unwrap().methods, None);
        assert!(rule("GET").is_err());
        let r = json!({"methods": ["GET", "HEAD"], "path": "/orders/**"});
        assert_eq!(rule_text(&r), "GET,HEAD /orders/**");
        assert_eq!(rule_text(&json!({"path": "/"})), "/");
    }

    #[test]
    fn bodies_carry_only_what_was_given() {
        let r = [rule("/a").unwrap()];
        assert_eq!(
            create_body("s", &r, None),
            json!({"name": "s", "rules": [{"path": "/a"}]})
        );
        assert_eq!(update_body(&[], Some("")), json!({"description": ""}));
        assert_eq!(update_body(&r, None), json!({"rules": [{"path": "/a"}]}));
    }
}
