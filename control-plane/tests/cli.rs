//! The real `tokengate` CLI against a real `tokengate serve`: what it prints, its exit
//! codes, its help and its shell completions.

mod common;

use common::process::*;
use common::ADMIN;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn tokengate(url: &str, admin: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tokengate"));
    cmd.args(args).env("TOKENGATE_URL", url);
    match admin {
        Some(a) => cmd.env("TOKENGATE_ADMIN_TOKEN", a),
        None => cmd.env_remove("TOKENGATE_ADMIN_TOKEN"),
    };
    cmd.output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a command that must succeed; its standard output.
fn ok(s: &Server, args: &[&str]) -> String {
    let o = tokengate(&s.url, Some(ADMIN), args);
    assert!(o.status.success(), "{args:?}: {o:?}");
    stdout(&o)
}

fn server() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let s = serve(dir.path().join("t.db"), free_port());
    (dir, s)
}

fn id_in(record: &str) -> String {
    record
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .unwrap()
        .to_string()
}

#[test]
fn exit_codes_tell_usage_refusal_credential_and_unreachable_apart() {
    let (_dir, s) = server();
    // 2: the command line is wrong.
    let o = tokengate(
        &s.url,
        Some(ADMIN),
        &["token", "update", "tok_x", "--max-rps", "fast"],
    );
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let o = tokengate(&s.url, Some(ADMIN), &["token", "update", "tok_x"]);
    assert_eq!(o.status.code(), Some(2), "nothing to update: {o:?}");
    let o = tokengate(&s.url, Some(ADMIN), &["token", "list", "--status", "gone"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    // 1: the control plane refused it; the message names the field once.
    let o = tokengate(
        &s.url,
        Some(ADMIN),
        &["token", "create", "--name", "x", "--kind", "service"],
    );
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert_eq!(
        stderr(&o),
        "error: owner is required for service tokens: name the group that owns the automation.\n"
    );
    // 3: nothing listening.
    let o = tokengate("http://127.0.0.1:9", Some(ADMIN), &["token", "list"]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert!(stderr(&o).contains("cannot reach the control plane at http://127.0.0.1:9"));
    // 4: no credential, or a refused one; the message names the setting that was used.
    let o = tokengate(&s.url, None, &["token", "list"]);
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    assert!(stderr(&o).contains("set TOKENGATE_ADMIN_TOKEN"), "{o:?}");
    let wrong = "wrong-credential-5f2b8c1d";
    let o = tokengate(&s.url, Some(wrong), &["token", "list"]);
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    assert!(
        stderr(&o).contains("refused the admin credential from TOKENGATE_ADMIN_TOKEN"),
        "{o:?}"
    );
    let o = tokengate(
        &s.url,
        Some(ADMIN),
        &["token", "list", "--admin-token", wrong],
    );
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    assert!(
        stderr(&o).contains("refused the admin credential from --admin-token"),
        "{o:?}"
    );
    let o = tokengate(
        &s.url,
        Some(ADMIN),
        &["token", "--admin-token", wrong, "list"],
    );
    assert!(stderr(&o).contains("from --admin-token"), "{o:?}");
    assert!(!stderr(&o).contains(wrong) && !stderr(&o).contains(ADMIN));
    // The codes are in the help.
    let help = stdout(&tokengate(&s.url, None, &["token", "--help"]));
    assert!(help.contains("Exit codes: 0 done; 1 refused"), "{help}");
}

#[test]
fn expired_tokens_show_as_expired_and_are_found_by_status() {
    let (_dir, s) = server();
    let short = id_in(&ok(
        &s,
        &["token", "create", "--name", "short", "--expires-in", "1s"],
    ));
    let long = id_in(&ok(&s, &["token", "create", "--name", "long"]));
    let start = Instant::now();
    loop {
        let got = ok(&s, &["token", "get", &short]);
        if got.contains("status: expired\n") {
            break;
        }
        assert!(got.contains("status: active\n"), "{got}");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never expired: {got}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let expired = ok(&s, &["token", "list", "--status", "expired"]);
    assert!(
        expired.contains(&short) && !expired.contains(&long),
        "{expired}"
    );
    let row = expired.lines().find(|l| l.contains(&short)).unwrap();
    assert!(row.contains(" expired "), "{row}");
    let active = ok(&s, &["token", "list", "--status", "active"]);
    assert!(
        active.contains(&long) && !active.contains(&short),
        "{active}"
    );
}

#[test]
fn pages_keep_the_filters_and_the_limit_and_names_can_be_searched() {
    let (_dir, s) = server();
    for name in ["api-a", "api-b", "API-c", "web"] {
        ok(
            &s,
            &[
                "token", "create", "--name", name, "--kind", "service", "--owner", "data eng",
            ],
        );
    }
    ok(&s, &["token", "create", "--name", "api-user"]);
    let args = [
        "token", "list", "--name", "api", "--owner", "data eng", "--limit", "2",
    ];
    let first = ok(&s, &args);
    let lines: Vec<&str> = first.lines().collect();
    assert!(
        lines[0].contains("ALLOWED") && lines[0].contains("DENIED"),
        "{first}"
    );
    assert_eq!(lines.len(), 4, "{first}");
    let more = lines[3].strip_prefix("more: ").expect("a next-page hint");
    assert!(
        more.starts_with("tokengate token list --name api --owner 'data eng' --limit 2 --cursor "),
        "{more}"
    );
    // The printed command, run by a shell as printed, brings the rest: same filters.
    let o = Command::new("sh")
        .args([
            "-c",
            &format!("\"$0\" {}", more.strip_prefix("tokengate ").unwrap()),
        ])
        .arg(env!("CARGO_BIN_EXE_tokengate"))
        .env("TOKENGATE_URL", &s.url)
        .env("TOKENGATE_ADMIN_TOKEN", ADMIN)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let second = stdout(&o);
    let names: Vec<&str> = first
        .lines()
        .chain(second.lines())
        .filter(|l| l.starts_with("tok_"))
        .map(|l| l.split_whitespace().nth(1).unwrap())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, ["API-c", "api-a", "api-b"], "{first}{second}");
    assert!(!second.contains("more:"), "{second}");
}

#[test]
fn revoking_twice_says_it_was_already_revoked() {
    let (_dir, s) = server();
    let id = id_in(&ok(&s, &["token", "create", "--name", "once"]));
    assert_eq!(ok(&s, &["token", "revoke", &id]), format!("revoked {id}\n"));
    let again = ok(&s, &["token", "revoke", &id]);
    assert!(
        again.starts_with(&format!("{id} was already revoked at 20")),
        "{again}"
    );
    let o = tokengate(&s.url, Some(ADMIN), &["token", "get", &id]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("was revoked at"), "{o:?}");
}

/// Every option has a description; the connection options are apart from the command's,
/// and the usage line does not present them as required.
#[test]
fn help_describes_every_option_and_keeps_global_options_apart() {
    let commands: &[&[&str]] = &[
        &["serve"],
        &["token", "create"],
        &["token", "list"],
        &["token", "get"],
        &["token", "update"],
        &["token", "suspend"],
        &["token", "reactivate"],
        &["token", "rotate"],
        &["token", "revoke"],
        &["audit"],
        &["completions"],
    ];
    for cmd in commands {
        let mut args = cmd.to_vec();
        args.push("--help");
        let help = stdout(&tokengate("http://127.0.0.1:9", None, &args));
        let lines: Vec<&str> = help.lines().collect();
        let indent = |l: &str| l.len() - l.trim_start().len();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim_start();
            let is_option = t.starts_with('-') && t.len() > 1 && indent(line) <= 6;
            let is_argument = line.starts_with("  <") || line.starts_with("  [");
            if !(is_option || is_argument) {
                continue;
            }
            // `--flag <VALUE>  description` on one line, or the description indented on
            // the next (clap's long form, when descriptions are long).
            let inline = t
                .split_once("  ")
                .is_some_and(|(_, d)| !d.trim().is_empty());
            let below = lines
                .get(i + 1)
                .is_some_and(|next| indent(next) > indent(line) + 2 && !next.trim().is_empty());
            assert!(inline || below, "{cmd:?}: no description: {line}\n{help}");
        }
        if cmd[0] != "serve" && cmd[0] != "completions" {
            let usage = help.lines().find(|l| l.starts_with("Usage:")).unwrap();
            assert!(
                !usage.contains("--url") && !usage.contains("--admin-token"),
                "{usage}"
            );
            let global = help
                .find("Global options:")
                .expect("a Global options section");
            assert!(help[global..].contains("--url <URL>"), "{help}");
            let own = help.find("Options:").unwrap();
            assert!(
                own < global && !help[own..global].contains("--url"),
                "{help}"
            );
        }
    }
}

#[test]
fn shell_completions_for_bash_zsh_and_fish() {
    for (shell, marker) in [
        ("bash", "complete -F _tokengate"),
        ("zsh", "#compdef tokengate"),
        ("fish", "complete -c tokengate"),
    ] {
        let o = tokengate("http://127.0.0.1:9", None, &["completions", shell]);
        assert!(o.status.success(), "{shell}: {o:?}");
        let script = stdout(&o);
        assert!(script.contains(marker), "{shell}");
        assert!(
            script.contains("expiring-within"),
            "{shell}: token list options missing"
        );
    }
    // bash reads the script without a syntax error.
    let script = stdout(&tokengate(
        "http://127.0.0.1:9",
        None,
        &["completions", "bash"],
    ));
    let check = Command::new("bash")
        .args(["-n", "-c", &script])
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    let o = tokengate("http://127.0.0.1:9", None, &["completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn scopes_are_managed_and_given_to_tokens_from_the_command_line() {
    let (_dir, s) = server();
    let created = ok(
        &s,
        &[
            "scope",
            "create",
            "orders:read",
            "--rule",
            "GET,HEAD /orders/**",
            "--rule",
            "/health",
            "--description",
            "Read orders",
        ],
    );
    assert!(created.contains("name: orders:read\n"), "{created}");
    assert!(
        created.contains("rule: GET,HEAD /orders/**\nrule: /health\n"),
        "{created}"
    );
    assert!(created.contains("description: Read orders\n"), "{created}");
    let list = ok(&s, &["scope", "list"]);
    assert!(list.starts_with("NAME"), "{list}");
    assert!(list.contains("GET,HEAD /orders/**; /health"), "{list}");
    let got = ok(&s, &["scope", "get", "orders:read", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&got).unwrap();
    assert_eq!(v["rules"][1], serde_json::json!({"path": "/health"}));
    let updated = ok(
        &s,
        &["scope", "update", "orders:read", "--rule", "GET /orders/*"],
    );
    assert!(updated.contains("rule: GET /orders/*\n") && !updated.contains("/health"));

    // Tokens: a list of scopes, none at all, or unrestricted again.
    let t = ok(
        &s,
        &["token", "create", "--name", "t", "--scopes", "orders:read"],
    );
    assert!(t.contains("scopes: orders:read\n"), "{t}");
    let id = id_in(t.split("\n\n").nth(2).unwrap());
    let none = ok(&s, &["token", "update", &id, "--scopes", ""]);
    assert!(none.contains("scopes: none"), "{none}");
    let back = ok(&s, &["token", "update", &id, "--scopes", "orders:read"]);
    assert!(back.contains("scopes: orders:read\n"), "{back}");
    let plain = ok(&s, &["token", "create", "--name", "u"]);
    assert!(plain.contains("scopes: unrestricted\n"), "{plain}");

    // Refusals: in use, unknown, a bad rule (named), usage.
    let o = tokengate(&s.url, Some(ADMIN), &["scope", "delete", "orders:read"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        stderr(&o).contains("still named by 1 token"),
        "{}",
        stderr(&o)
    );
    let o = tokengate(
        &s.url,
        Some(ADMIN),
        &["token", "update", &id, "--scopes", "nope"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("nope"), "{}", stderr(&o));
    let o = tokengate(
        &s.url,
        Some(ADMIN),
        &["scope", "create", "x", "--rule", "GET orders"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("rules[0].path"), "{}", stderr(&o));
    let o = tokengate(&s.url, Some(ADMIN), &["scope", "create", "x"]);
    assert_eq!(o.status.code(), Some(2), "a rule is required: {o:?}");
    let o = tokengate(
        &s.url,
        Some(ADMIN),
        &["token", "update", &id, "--scopes", "a", "--unrestricted"],
    );
    assert_eq!(o.status.code(), Some(2), "{o:?}");

    let lifted = ok(&s, &["token", "update", &id, "--unrestricted"]);
    assert!(lifted.contains("scopes: unrestricted\n"), "{lifted}");
    assert_eq!(
        ok(&s, &["scope", "delete", "orders:read"]),
        "deleted orders:read\n"
    );
    assert_eq!(ok(&s, &["scope", "list"]), "(no scopes)\n");
    let audit = ok(&s, &["audit", "--action", "scope.deleted"]);
    assert!(audit.contains("scope orders:read"), "{audit}");
}
