//! The web console in a real headless Chromium, against a real control plane and a real
//! Envoy: every change made by clicking in the page is checked where it matters, in what a
//! client calling through Envoy gets back.
//!
//! Needs Chromium and ChromeDriver (`make browser`, which `make test` runs). Where they are
//! not installed the test prints `SKIPPED` with the reason and passes, so the rest of `make
//! test` still runs where no browser can be installed; an installed browser that fails to
//! start fails the test.

use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;
use tokengate_e2e::browser::{Browser, NotInstalled};
use tokengate_e2e::{wait_until, workspace_root, Stack};

const PROPAGATION: Duration = Duration::from_secs(10);
const STATE_LOAD: Duration = Duration::from_secs(40);

fn browser(stack: &Stack) -> Option<Browser> {
    match Browser::start(&stack.dir) {
        Ok(b) => Some(b),
        Err(NotInstalled(why)) => {
            // Straight to stderr: the test harness would swallow `eprintln!` of a pass.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: the web console browser test needs Chromium: {why}"
            );
            None
        }
    }
}

fn artifact(name: &str) -> PathBuf {
    workspace_root().join("target/console").join(name)
}

/// The id of the row showing the token named `name`, if it is listed.
fn row_id(b: &Browser, name: &str) -> Option<String> {
    b.run(
        "const r = [...document.querySelectorAll('#tokens tbody tr')]
             .find((r) => r.querySelector('.name').textContent === arguments[0]);
         return r ? r.dataset.id : null;",
        json!([name]),
    )
    .as_str()
    .map(str::to_string)
}

fn row_names(b: &Browser) -> Vec<String> {
    let v = b.run(
        "return [...document.querySelectorAll('#tokens tbody .name')].map((n) => n.textContent);",
        json!([]),
    );
    serde_json::from_value(v).unwrap_or_default()
}

fn row_button(id: &str, action: &str) -> String {
    format!("#tokens tr[data-id=\"{id}\"] button[data-action=\"{action}\"]")
}

fn sign_in(b: &Browser, stack: &Stack) {
    b.fill("#credential", &stack.admin_token);
    b.click("#signin-form button[type=submit]");
    b.find("#tokens-view");
}

#[test]
fn the_console_drives_a_token_through_its_life_and_envoy_follows() {
    let stack = Stack::start();
    let Some(b) = browser(&stack) else { return };
    // Some tokens made elsewhere, so the list has paging, a warning and a suspension.
    for i in 0..20 {
        stack.create_token(json!({"name": format!("batch-{i:02}"), "max_rps": 10}));
    }
    let (soon, _) = stack.create_token(json!({
        "name": "nightly-export", "kind": "service", "owner": "data-eng",
        "max_rps": 50, "expires_in_seconds": 3 * 86_400
    }));
    let (paused, _) =
        stack.create_token(json!({"name": "ci-deploy", "kind": "service", "owner": "platform"}));
    stack.token_action(&paused, "suspend");

    b.goto(&stack.control_plane_url());
    // A wrong credential is refused in the page.
    b.fill("#credential", "not-the-admin-credential");
    b.click("#signin-form button[type=submit]");
    b.wait_text("#signin-error", "a refusal", |t| t.contains("not an admin"));
    sign_in(&b, &stack);
    assert_eq!(b.text("#actor"), "admin");

    // Paging: 22 tokens, newest first, 20 a page.
    b.wait_text("#page-no", "page 1", |t| t == "Page 1");
    let first = row_names(&b);
    assert_eq!(first.len(), 20);
    assert_eq!(first[..3], ["ci-deploy", "nightly-export", "batch-19"]);
    b.click("#next");
    b.wait_text("#page-no", "page 2", |t| t == "Page 2");
    assert_eq!(row_names(&b), ["batch-01", "batch-00"]);
    b.click("#prev");
    b.wait_text("#page-no", "page 1", |t| t == "Page 1");
    // Search by name, and filters.
    b.fill("#f-name", "EXPORT");
    let done = tokengate_e2e::try_wait_until(PROPAGATION, || row_names(&b) == ["nightly-export"]);
    assert!(done.is_some(), "search: {:?}", row_names(&b));
    let expiry = b.run(
        "return document.querySelector(`#tokens tr[data-id='${arguments[0]}'] td.expiry-cell`).classList.contains('warn');",
        json!([soon]),
    );
    assert_eq!(
        expiry, true,
        "3 days left is inside the 7-day warning window"
    );
    assert!(b
        .text(&format!("#tokens tr[data-id=\"{soon}\"]"))
        .contains("expires in 3 days"));
    b.fill("#f-name", "");
    b.choose("#f-status", "suspended");
    let done = tokengate_e2e::try_wait_until(PROPAGATION, || row_names(&b) == ["ci-deploy"]);
    assert!(done.is_some(), "status filter: {:?}", row_names(&b));
    b.choose("#f-status", "");
    b.choose("#f-kind", "service");
    b.fill("#f-owner", "data-eng");
    let done = tokengate_e2e::try_wait_until(PROPAGATION, || row_names(&b) == ["nightly-export"]);
    assert!(done.is_some(), "kind and owner filter: {:?}", row_names(&b));
    b.fill("#f-owner", "");
    b.choose("#f-kind", "");

    // A policy error is shown next to its field: a service token needs an owner.
    b.click("#generate");
    b.fill("#g-name", "console-e2e");
    b.click("#generate-form input[name=kind][value=service]");
    b.click("#generate-form button[type=submit]");
    b.wait_text("#g-owner-error", "the owner error", |t| t.contains("owner"));
    // Generate a user token limited to 50 requests/s, valid 30 days (outside the warning
    // window, so its trail holds only what the page did).
    b.click("#generate-form input[name=kind][value=user]");
    b.fill("#g-rps", "50");
    // Each Envoy's limit, not the fleet's (the default).
    b.choose("#g-scope", "proxy");
    b.choose("#g-expiry", "2592000");
    assert!(b.text("#g-expiry-hint").contains("will expire on"));
    b.screenshot(&artifact("generate.png"));
    b.click("#generate-form button[type=submit]");
    let secret = b.wait_text("#secret-value", "the new secret", |t| !t.is_empty());
    assert!(b
        .text("#secret-panel")
        .contains("won’t be able to see it again"));
    b.click("#copy-secret");
    b.wait_text("#copy-secret", "copied", |t| t == "Copied");
    b.fill("#f-name", "console-e2e");
    let mut id = None;
    tokengate_e2e::try_wait_until(PROPAGATION, || {
        id = row_id(&b, "console-e2e");
        id.is_some()
    });
    let id = id.expect("the new token is listed");
    let row = format!("#tokens tr[data-id=\"{id}\"]");
    let text = b.text(&row);
    assert!(
        text.contains("50")
            && text.contains("per Envoy")
            && text.contains("active")
            && text.contains("expires in 30 days"),
        "{text}"
    );
    let api = stack.admin("GET", &format!("/v1/tokens/{id}"), None).json();
    assert_eq!(api["limit_scope"], "proxy", "{api}");
    // A per-Envoy limit has no fleet view to show.
    assert!(b.text(&row).contains("Edit") && !b.text(&row).contains("Fleet"));
    // The token works through Envoy.
    stack.wait_for_status(&secret, 200, STATE_LOAD);
    // Once hidden, the secret is gone from the page.
    b.click("#secret-done");
    b.wait_gone("#secret-panel");
    let html = b.run("return document.documentElement.outerHTML;", json!([]));
    assert!(!html.as_str().unwrap().contains(&secret));

    // Suspend in the page: the row says so and Envoy refuses the token.
    b.click(&row_button(&id, "suspend"));
    b.wait_text(&format!("{row} .status-cell"), "suspended", |t| {
        t == "suspended"
    });
    stack.wait_for_status(&secret, 403, PROPAGATION);
    b.click(&row_button(&id, "reactivate"));
    b.wait_text(&format!("{row} .status-cell"), "active", |t| t == "active");
    stack.wait_for_status(&secret, 200, PROPAGATION);

    // Make the limit the fleet's: the row says so, the API too, and its fleet view answers.
    b.click(&row_button(&id, "edit"));
    b.choose("#e-scope", "fleet");
    b.click("#edit-form button[type=submit]");
    b.wait_text(&format!("{row} td.num"), "the fleet scope", |t| {
        t.contains("whole fleet")
    });
    let api = stack.admin("GET", &format!("/v1/tokens/{id}"), None).json();
    assert_eq!(api["limit_scope"], "fleet", "{api}");
    b.click(&row_button(&id, "fleet"));
    b.wait_text("#status", "the fleet view", |t| {
        t.contains("admitted of 50/s across")
    });

    // Edit the name and maxRPS.
    b.click(&row_button(&id, "edit"));
    b.fill("#e-name", "console-e2e-renamed");
    b.fill("#e-rps", "");
    b.click("#edit-form button[type=submit]");
    b.wait_text(&format!("{row} td.num"), "unlimited", |t| t == "Unlimited");
    let api = stack.admin("GET", &format!("/v1/tokens/{id}"), None).json();
    assert_eq!(
        (api["name"].as_str(), &api["max_rps"]),
        (Some("console-e2e-renamed"), &Value::Null)
    );

    // Rotate with no grace: the page shows the new secret once; Envoy takes it, not the old.
    b.click(&row_button(&id, "rotate"));
    b.choose("#r-grace", "0");
    b.click("#rotate-form button[type=submit]");
    let rotated = b.wait_text("#secret-value", "the rotated secret", |t| {
        !t.is_empty() && t != secret
    });
    stack.wait_for_status(&rotated, 200, PROPAGATION);
    stack.wait_for_status(&secret, 401, PROPAGATION);
    b.click("#secret-done");

    // Envoy reports the token's use; the row shows it once the list is reloaded.
    wait_until(Duration::from_secs(30), "usage reported", || {
        !stack.admin("GET", &format!("/v1/tokens/{id}"), None).json()["last_used_at"].is_null()
    });
    // The list, for the README and as a test artifact.
    b.fill("#f-name", "");
    b.wait_text("#page-no", "page 1", |t| t == "Page 1");
    tokengate_e2e::try_wait_until(PROPAGATION, || row_names(&b).len() == 20);
    let used = b.text(&format!("{row} td.used-cell"));
    assert!(
        used.ends_with("ago") || used.ends_with("now"),
        "last used: {used:?}"
    );
    b.screenshot(&artifact("tokens.png"));

    // This token's audit trail, from its row.
    b.fill("#f-name", "renamed");
    tokengate_e2e::try_wait_until(PROPAGATION, || row_id(&b, "console-e2e-renamed").is_some());
    b.click(&row_button(&id, "audit"));
    b.find("#audit-view");
    let actions = || {
        let v = b.run(
            "return [...document.querySelectorAll('#audit tbody tr td:nth-child(3)')].map((c) => c.textContent);",
            json!([]),
        );
        serde_json::from_value::<Vec<String>>(v).unwrap_or_default()
    };
    let expected = [
        "token.rotated",
        "token.updated",
        "token.updated",
        "token.reactivated",
        "token.suspended",
        "token.created",
    ];
    let done = tokengate_e2e::try_wait_until(PROPAGATION, || actions() == expected);
    assert!(done.is_some(), "audit for the token: {:?}", actions());
    assert!(b.text("#audit tbody").contains("max_rps: 50 → —"));
    assert!(b
        .text("#audit tbody")
        .contains("limit_scope: proxy → fleet"));
    b.screenshot(&artifact("audit.png"));
    // The whole trail has the other tokens' creation too.
    b.fill("#a-token", "");
    let done = tokengate_e2e::try_wait_until(PROPAGATION, || actions().len() > expected.len());
    assert!(done.is_some());

    // Revoke, after a confirmation that can be cancelled.
    b.click("#nav-tokens");
    b.fill("#f-name", "renamed");
    b.click(&row_button(&id, "revoke"));
    b.click("#confirm-form .cancel");
    b.wait_gone("#confirm-dialog");
    assert_eq!(
        stack.call_with_token(&rotated).status,
        200,
        "cancelled: still valid"
    );
    b.click(&row_button(&id, "revoke"));
    assert!(b.text("#confirm-text").contains("cannot be undone"));
    b.click("#confirm-form button[type=submit]");
    b.wait_text("#status", "revoked", |t| t.starts_with("Revoked"));
    assert!(row_id(&b, "console-e2e-renamed").is_none());
    stack.wait_for_status(&rotated, 401, PROPAGATION);

    // Every change was made by the signed-in admin, from the page.
    let audit = stack
        .admin("GET", &format!("/v1/audit?token={id}"), None)
        .json();
    for e in audit["entries"].as_array().unwrap() {
        assert_eq!(e["actor"], "admin", "{e}");
    }
    // Nothing secret is kept by the browser: the cookie is HttpOnly, no storage is used.
    let kept = b.run(
        "return document.cookie + JSON.stringify(localStorage) + JSON.stringify(sessionStorage);",
        json!([]),
    );
    assert_eq!(kept, "{}{}", "cookies readable by script or storage used");

    // Sign out: back to the sign-in form, and a reload does not sign back in.
    b.click("#sign-out");
    b.find("#signin-view");
    b.refresh();
    b.find("#signin-view");
    assert!(!b.is_shown("#tokens-view"));
}

fn scope_row(name: &str) -> String {
    format!("#scopes tr[data-name=\"{name}\"]")
}

/// Scopes made in the console hold a token generated in the console to them, in Envoy; the
/// token's row shows its scopes (and its quota, where the control plane has quotas).
#[test]
fn the_console_makes_scopes_and_envoy_holds_a_token_to_them() {
    let stack = Stack::start();
    let Some(b) = browser(&stack) else { return };
    b.goto(&stack.control_plane_url());
    sign_in(&b, &stack);

    b.click("#nav-scopes");
    b.find("#scopes-view");
    b.find("#scopes-empty");
    // A rule the API refuses is shown at the rules, with its line.
    b.click("#new-scope");
    b.fill("#s-name", "orders:read");
    b.fill("#s-description", "Read orders");
    b.fill("#s-rules", "GET,HEAD /orders/**\n\nget /health");
    b.click("#scope-form button[type=submit]");
    let error = b.wait_text("#s-rules-error", "the rule's error", |t| !t.is_empty());
    assert!(
        error.starts_with("Line 3: rules[1].methods must be upper-case"),
        "{error}"
    );
    b.fill("#s-rules", "GET,HEAD /orders/**\n/health");
    b.click("#scope-form button[type=submit]");
    let row = scope_row("orders:read");
    let text = b.wait_text(&row, "the new scope", |t| t.contains("/health"));
    assert!(
        text.contains("Read orders")
            && text.contains("GET,HEAD /orders/**")
            && text.contains("version"),
        "{text}"
    );
    let api = stack.admin("GET", "/v1/scopes/orders:read", None).json();
    assert_eq!(
        api["rules"],
        json!([{"methods": ["GET", "HEAD"], "path": "/orders/**"}, {"path": "/health"}]),
        "{api}"
    );
    // A taken name is shown at the name.
    b.click("#new-scope");
    b.fill("#s-name", "orders:read");
    b.fill("#s-rules", "/x");
    b.click("#scope-form button[type=submit]");
    b.wait_text("#s-name-error", "the conflict", |t| !t.is_empty());
    b.click("#scope-form .cancel");
    // Another scope, edited in the page.
    b.click("#new-scope");
    b.fill("#s-name", "admin");
    b.fill("#s-rules", "/admin/**");
    b.click("#scope-form button[type=submit]");
    b.find(&scope_row("admin"));
    b.click(&format!(
        "{} button[data-action=\"edit\"]",
        scope_row("admin")
    ));
    b.fill("#s-description", "Everything under /admin");
    b.click("#scope-form button[type=submit]");
    b.wait_text(&scope_row("admin"), "the description", |t| {
        t.contains("Everything under /admin")
    });
    b.screenshot(&artifact("scopes.png"));

    // A token limited to orders:read, generated in the page.
    b.click("#nav-tokens");
    b.find("#tokens-view");
    b.click("#generate");
    b.fill("#g-name", "orders-reader");
    b.click("#generate-form input[name=access][value=scoped]");
    b.click("#g-scope-list input[value=\"orders:read\"]");
    b.wait_text("#g-scopes-hint", "the scoped hint", |t| {
        t.contains("ticked scopes")
    });
    b.screenshot(&artifact("generate-scoped.png"));
    b.click("#generate-form button[type=submit]");
    let secret = b.wait_text("#secret-value", "the new secret", |t| !t.is_empty());
    b.click("#secret-done");
    let mut id = None;
    tokengate_e2e::try_wait_until(PROPAGATION, || {
        id = row_id(&b, "orders-reader");
        id.is_some()
    });
    let id = id.expect("the new token is listed");
    let row = format!("#tokens tr[data-id=\"{id}\"]");
    assert_eq!(b.text(&format!("{row} td.scopes-cell")), "orders:read");
    let api = stack.admin("GET", &format!("/v1/tokens/{id}"), None).json();
    assert_eq!(api["scopes"], json!(["orders:read"]), "{api}");

    // Through Envoy: in scope 200, out of scope 403 insufficient_scope.
    let token = [("X-API-Token", secret.as_str())];
    let done = tokengate_e2e::try_wait_until(STATE_LOAD, || {
        stack.call_path("/orders/42", &token).status == 200
    });
    assert!(
        done.is_some(),
        "{:?}",
        stack.call_path("/orders/42", &token)
    );
    let out = stack.call_path("/hello", &token);
    assert_eq!(
        (out.status, out.error_code().as_deref()),
        (403, Some("insufficient_scope")),
        "{out:?}"
    );

    // The scope cannot be deleted while the token names it: the page says so.
    b.click("#nav-scopes");
    b.click(&format!(
        "{row} button[data-action=\"delete\"]",
        row = scope_row("orders:read")
    ));
    b.click("#confirm-form button[type=submit]");
    let why = b.wait_text("#c-error", "in use", |t| !t.is_empty());
    assert!(why.contains("in use") && why.contains("1 token"), "{why}");
    b.click("#confirm-form .cancel");

    // Unrestricted again from the edit dialog: the row says so and Envoy lets /hello through.
    b.click("#nav-tokens");
    b.click(&row_button(&id, "edit"));
    b.click("#edit-form input[name=access][value=unrestricted]");
    b.click("#edit-form button[type=submit]");
    b.wait_text(&format!("{row} td.scopes-cell"), "unrestricted", |t| {
        t == "unrestricted"
    });
    assert_eq!(
        stack.admin("GET", &format!("/v1/tokens/{id}"), None).json()["scopes"],
        Value::Null
    );
    tokengate_e2e::wait_until(PROPAGATION, "unrestricted in Envoy", || {
        stack.call_path("/hello", &token).status == 200
    });
    // Now it goes, after the confirmation.
    b.click("#nav-scopes");
    b.click(&format!(
        "{} button[data-action=\"delete\"]",
        scope_row("orders:read")
    ));
    b.click("#confirm-form button[type=submit]");
    b.wait_text("#status", "deleted", |t| {
        t.starts_with("Deleted orders:read")
    });
    assert!(!b.is_shown(&scope_row("orders:read")));

    // Quotas, where the control plane has them (the token record carries `quota`).
    if api.get("quota").is_none() {
        let _ = writeln!(
            std::io::stderr(),
            "NOTE: this control plane has no quotas; the console's quota fields were not driven"
        );
        return;
    }
    b.click("#nav-tokens");
    b.click(&row_button(&id, "edit"));
    b.fill("#e-quota-limit", "1");
    b.choose("#e-quota-period", "day");
    b.click("#edit-form button[type=submit]");
    b.wait_text(&format!("{row} td.quota-cell"), "the quota", |t| {
        t.starts_with("0/1 today") && t.contains("resets in")
    });
    let api = stack.admin("GET", &format!("/v1/tokens/{id}"), None).json();
    assert_eq!(api["quota"], json!({"limit": 1, "period": "day"}), "{api}");
    // Used up through Envoy: the row says so, in the warning colour.
    tokengate_e2e::wait_until(PROPAGATION, "the quota used up", || {
        stack.call_path("/hello", &token).status == 429
    });
    tokengate_e2e::wait_until(Duration::from_secs(30), "the use reported", || {
        stack.admin("GET", &format!("/v1/tokens/{id}"), None).json()["quota_usage"]["remaining"]
            == 0
    });
    b.fill("#f-name", "orders-reader");
    let done = tokengate_e2e::try_wait_until(PROPAGATION, || {
        b.text(&format!("{row} td.quota-cell"))
            .starts_with("1/1 today")
    });
    assert!(
        done.is_some(),
        "{}",
        b.text(&format!("{row} td.quota-cell"))
    );
    let warn = b.run(
        "return document.querySelector(arguments[0]).classList.contains('warn');",
        json!([format!("{row} td.quota-cell")]),
    );
    assert_eq!(warn, true);
    b.screenshot(&artifact("tokens-quota.png"));
}

/// Everything in a row of the token list, as the user sees it at this width: each cell's
/// box and whether it is clipped by the table's scroll container or the page.
const NARROW_CHECK: &str = "
    const vw = document.documentElement.clientWidth;
    const wrap = document.querySelector('#tokens').closest('.table-wrap');
    const problems = [];
    if (document.documentElement.scrollWidth > vw)
        problems.push(`the page scrolls sideways: ${document.documentElement.scrollWidth} > ${vw}`);
    if (wrap.scrollWidth > wrap.clientWidth)
        problems.push(`the table scrolls sideways: ${wrap.scrollWidth} > ${wrap.clientWidth}`);
    const rows = [...document.querySelectorAll('#tokens tbody tr')];
    for (const row of rows) {
        for (const cell of row.querySelectorAll('.status-cell, .row-actions button, .name')) {
            const r = cell.getBoundingClientRect();
            const w = wrap.getBoundingClientRect();
            if (r.width === 0 || r.left < Math.max(0, w.left) - 0.5 || r.right > Math.min(vw, w.right) + 0.5)
                problems.push(`${row.dataset.id} ${cell.className || cell.textContent}: ${r.left}..${r.right} outside 0..${Math.min(vw, w.right)}`);
        }
        // Either the Status column heading is on screen, or the cell carries its label.
        const status = row.querySelector('.status-cell');
        const heading = [...document.querySelectorAll('#tokens thead th')].find((th) => th.textContent === 'Status');
        const h = heading.getBoundingClientRect();
        const headed = h.width > 1 && h.height > 1 && h.left >= 0 && h.right <= vw;
        const label = getComputedStyle(status, '::before').content;
        if (!headed && !label.includes('Status'))
            problems.push(`the status of ${row.dataset.id} has neither a heading nor a label (${label})`);
    }
    return { rows: rows.length, problems };";

#[test]
fn the_token_list_is_usable_420_px_wide() {
    let stack = Stack::start_with(tokengate_e2e::Options {
        envoy: false,
        ..Default::default()
    });
    let Some(b) = browser(&stack) else { return };
    stack.create_token(
        json!({"name": "mobile-checkout", "max_rps": 25, "expires_in_seconds": 2 * 86_400}),
    );
    let (paused, _) = stack.create_token(json!({
        "name": "nightly-warehouse-export", "kind": "service", "owner": "data-engineering-team"
    }));
    stack.token_action(&paused, "suspend");
    stack.create_token(json!({"name": "a-token-name-of-fifty-characters-no-spaces-at-all"}));

    let width = b.set_window_size(420, 900);
    assert!(
        (400..=420).contains(&width),
        "the viewport is {width} px wide, not about 420"
    );
    b.goto(&stack.control_plane_url());
    sign_in(&b, &stack);
    tokengate_e2e::try_wait_until(PROPAGATION, || row_names(&b).len() == 3);
    assert_eq!(row_names(&b).len(), 3);
    let v = b.run(NARROW_CHECK, json!([]));
    b.screenshot(&artifact("tokens-420.png"));
    let problems: Vec<String> = serde_json::from_value(v["problems"].clone()).unwrap_or_default();
    assert!(
        problems.is_empty(),
        "at {width} px (screenshot target/console/tokens-420.png):\n{}",
        problems.join("\n")
    );
    // The row actions still work at this width.
    b.click(&row_button(&paused, "reactivate"));
    b.wait_text(
        &format!("#tokens tr[data-id=\"{paused}\"] .status-cell"),
        "active",
        |t| t.contains("active"),
    );
    // The audit trail does not scroll sideways either.
    b.click("#nav-audit");
    b.find("#audit tbody tr");
    let sideways = b.run(
        "const vw = document.documentElement.clientWidth;
         const wrap = document.querySelector('#audit').closest('.table-wrap');
         return [document.documentElement.scrollWidth - vw, wrap.scrollWidth - wrap.clientWidth];",
        json!([]),
    );
    b.screenshot(&artifact("audit-420.png"));
    assert_eq!(sideways, json!([0, 0]), "the audit trail scrolls sideways");
}
