//! A bad plugin configuration, one field wrong at a time, loaded into the real filter (each
//! flavor) by the real Envoy: Envoy refuses it, its log names the field, and the filter never
//! panics.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tokengate_e2e::{flavored, free_ports, random_hex, render_envoy_template, Binaries, Flavor};

/// How long one Envoy run may take. Refusing a configuration takes a second or two; only an
/// Envoy that accepted a bad one and kept serving gets anywhere near this.
const RUN_DEADLINE: Duration = Duration::from_secs(120);

/// The shipped configuration's plugin JSON, as rendered below.
const SHIPPED: &str = r#"{
                      "control_plane_cluster": "tokengate_control_plane",
                      "control_plane_authority": "tokengate",
                      "sync_token": "validate-only-sync-credential",
                      "sync_wait_seconds": 20
                    }"#;

/// The same in the native template, which also names the proxy.
const SHIPPED_NATIVE: &str = r#"{
                    "control_plane_cluster": "tokengate_control_plane",
                    "control_plane_authority": "tokengate",
                    "sync_token": "validate-only-sync-credential",
                    "sync_wait_seconds": 20,
                    "proxy_id": "tokengate-local"
                  }"#;

fn rendered(bins: &Binaries, flavor: Flavor, plugin_json: &str) -> String {
    let (template, shipped, filter_var, indent) = match flavor {
        Flavor::Wasm => (
            "envoy/envoy.yaml",
            SHIPPED,
            "WASM_PATH",
            "\n                      ",
        ),
        Flavor::Native => (
            "envoy/envoy-native.yaml",
            SHIPPED_NATIVE,
            "MODULE_PATH",
            "\n                    ",
        ),
    };
    // Free ports: the real start below binds the listener and the admin port.
    let ports = free_ports(4);
    let config = render_envoy_template(
        template,
        &[
            ("LISTEN_ADDRESS", "127.0.0.1".into()),
            ("LISTEN_PORT", ports[0].to_string()),
            ("ADMIN_ADDRESS", "127.0.0.1".into()),
            ("ADMIN_PORT", ports[1].to_string()),
            ("UPSTREAM_PORT", ports[2].to_string()),
            ("CONTROL_PLANE_PORT", ports[3].to_string()),
            ("UPSTREAM_HOST", "127.0.0.1".into()),
            ("CONTROL_PLANE_HOST", "127.0.0.1".into()),
            (filter_var, bins.filter(flavor).display().to_string()),
            ("SYNC_TOKEN", "validate-only-sync-credential".into()),
        ],
    );
    assert!(
        config.contains(shipped),
        "the template's plugin configuration changed: update this test"
    );
    // The JSON sits in a YAML block scalar: every line keeps its indentation.
    let indented = plugin_json.replace('\n', indent);
    config.replace(shipped, &indented)
}

/// Runs Envoy to its end; kills it and fails the test if it is still running at
/// [`RUN_DEADLINE`].
fn envoy(bins: &Binaries, dir: &Path, name: &str, config: &str, args: &[&str]) -> Output {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, config).unwrap();
    let base_id = 40_000 + u32::from(free_ports(1)[0]) % 20_000;
    let mut child = Command::new(&bins.envoy)
        .args(args)
        .arg("-c")
        .arg(&path)
        .args(["--disable-hot-restart", "--base-id", &base_id.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > RUN_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            let log = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
            panic!(
                "{name}: Envoy still running after {RUN_DEADLINE:?} (it accepted the \
                 configuration?):\n{log}"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

fn log_of(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tokengate-e2e-plugin-config-{}", random_hex(6)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The shipped plugin fields with `field` set to `value` (raw JSON), or removed when
/// `value` is `None`.
fn with_field(field: &str, value: Option<&str>) -> String {
    let mut fields = vec![
        (
            "control_plane_cluster",
            r#""tokengate_control_plane""#.to_string(),
        ),
        (
            "sync_token",
            r#""validate-only-sync-credential""#.to_string(),
        ),
    ];
    fields.retain(|(name, _)| *name != field);
    if let Some(v) = value {
        fields.push((field, v.to_string()));
    }
    let body: Vec<String> = fields
        .iter()
        .map(|(name, v)| format!("\"{name}\": {v}"))
        .collect();
    format!("{{{}}}", body.join(", "))
}

flavored!(each_bad_field_is_refused_at_load_with_the_field_named);
fn each_bad_field_is_refused_at_load_with_the_field_named(flavor: Flavor) {
    let bins = Binaries::locate();
    let dir = temp_dir();

    // The good configuration loads: the cases below fail for their one change only.
    let out = envoy(
        &bins,
        &dir,
        "good",
        &rendered(&bins, flavor, &with_field("x", None)),
        &["--mode", "validate"],
    );
    assert!(
        out.status.success(),
        "the base configuration is refused:\n{}",
        log_of(&out)
    );

    let cases: Vec<(&str, String)> = vec![
        (
            "control_plane_cluster",
            with_field("control_plane_cluster", None),
        ),
        (
            "control_plane_cluster",
            with_field("control_plane_cluster", Some(r#""""#)),
        ),
        (
            "control_plane_cluster",
            with_field("control_plane_cluster", Some("7")),
        ),
        (
            "control_plane_authority",
            with_field("control_plane_authority", Some("[]")),
        ),
        ("sync_token", with_field("sync_token", None)),
        ("sync_token", with_field("sync_token", Some(r#""  ""#))),
        ("sync_path", with_field("sync_path", Some(r#""v1/sync""#))),
        (
            "sync_wait_seconds",
            with_field("sync_wait_seconds", Some(r#""soon""#)),
        ),
        (
            "sync_wait_seconds",
            with_field("sync_wait_seconds", Some("0")),
        ),
        (
            "sync_wait_seconds",
            with_field("sync_wait_seconds", Some("-1")),
        ),
        (
            "sync_wait_seconds",
            with_field("sync_wait_seconds", Some("1.5")),
        ),
        (
            "token_headers",
            with_field("token_headers", Some(r#""x-api-token""#)),
        ),
        (
            "token_headers[0]",
            with_field("token_headers", Some(r#"["X-Api-Token"]"#)),
        ),
        (
            "token_headers[1]",
            with_field("token_headers", Some(r#"["x-api-token", "bad header"]"#)),
        ),
        (
            "token_headers",
            format!(
                "{{{}, \"token_headers\": [], \"bearer\": false}}",
                &with_field("x", None)[1..with_field("x", None).len() - 1]
            ),
        ),
        ("bearer", with_field("bearer", Some(r#""yes""#))),
        (
            "identity_header_prefix",
            with_field("identity_header_prefix", Some(r#""X Token ""#)),
        ),
        ("tick_ms", with_field("tick_ms", Some("5"))),
        ("lease_ms", with_field("lease_ms", Some("100"))),
        (
            "backoff_initial_ms",
            with_field("backoff_initial_ms", Some("0")),
        ),
        (
            "backoff_max_ms",
            with_field("backoff_max_ms", Some("4294967296")),
        ),
        ("cas_retries", with_field("cas_retries", Some("0"))),
        ("proxy_id", with_field("proxy_id", Some("{}"))),
        ("usage_reporting", with_field("usage_reporting", Some("1"))),
        ("usage_path", with_field("usage_path", Some(r#""usage""#))),
        ("usage_report_ms", with_field("usage_report_ms", Some("50"))),
        (
            "usage_max_tokens",
            with_field("usage_max_tokens", Some("0")),
        ),
        (
            "expiry_warning_seconds",
            with_field("expiry_warning_seconds", Some("31536001")),
        ),
        ("sync_tokn", with_field("sync_tokn", Some(r#""typo""#))),
    ];

    let mut failures = Vec::new();
    let start = Instant::now();
    for (i, (field, plugin)) in cases.iter().enumerate() {
        let out = envoy(
            &bins,
            &dir,
            &format!("case{i}"),
            &rendered(&bins, flavor, plugin),
            &["--mode", "validate"],
        );
        let log = log_of(&out);
        let named = log.contains(&format!("invalid tokengate configuration: field `{field}`"));
        if out.status.success() || !named {
            failures.push(format!(
                "{plugin}: accepted={} named `{field}`={named}\n{}",
                out.status.success(),
                log.lines()
                    .filter(|l| l.contains("tokengate") || l.contains("error"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ));
        }
        assert!(
            !log.contains("panicked"),
            "{plugin}: the filter panicked:\n{log}"
        );
    }
    eprintln!(
        "{} bad configurations refused in {:?}",
        cases.len(),
        start.elapsed()
    );

    // Not JSON at all: refused, with no field to name.
    let out = envoy(
        &bins,
        &dir,
        "not-json",
        &rendered(&bins, flavor, "control_plane_cluster = x"),
        &["--mode", "validate"],
    );
    let log = log_of(&out);
    if out.status.success() || !log.contains("invalid tokengate configuration: ") {
        failures.push(format!(
            "not JSON: accepted={}\n{log}",
            out.status.success()
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    // Started for real (not only validated), Envoy refuses to start with the plugin, as
    // its documented policy for a filter that fails to configure, rather than serving
    // without it.
    let plugin = with_field("tick_ms", Some("5"));
    let started = Instant::now();
    let out = envoy(
        &bins,
        &dir,
        "real-start",
        &rendered(&bins, flavor, &plugin),
        &["--concurrency", "1"],
    );
    let log = log_of(&out);
    assert!(
        !out.status.success(),
        "Envoy started with a bad plugin configuration:\n{log}"
    );
    assert!(log.contains("field `tick_ms`"), "{log}");
    eprintln!("Envoy refused to start in {:?}", started.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}
