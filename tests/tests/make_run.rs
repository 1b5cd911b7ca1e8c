//! `make run` (envoy/run.sh) and `make help`, run for real: which process gets which
//! credential, what a busy port says, and what `make help` lists.
//!
//! run.sh is started with every port moved to a free one and its state in a temporary
//! directory, so it never touches a developer's own `make run` or `.run/`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokengate_e2e::{
    flavored, free_ports, http, random_hex, workspace_root, Binaries, Flavor, READY_TIMEOUT,
};

const PORT_VARS: [&str; 4] = [
    "LISTEN_PORT",
    "ADMIN_PORT",
    "UPSTREAM_PORT",
    "CONTROL_PLANE_PORT",
];

fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tokengate-{what}-{}-{}",
        std::process::id(),
        random_hex(4)
    ));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// `bash envoy/run.sh` with the tests' binaries, the given ports and a private state dir,
/// running the filter of `flavor` (`make run FLAVOR=...`).
fn run_sh(bins: &Binaries, ports: &BTreeMap<&str, u16>, run_dir: &Path, flavor: Flavor) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(workspace_root().join("envoy/run.sh"))
        .current_dir(workspace_root())
        .env("ENVOY_BIN", &bins.envoy)
        .env("FLAVOR", flavor.name())
        .env("WASM", bins.filter(Flavor::Wasm))
        .env("TOKENGATE_BIN", &bins.tokengate)
        .env("DEMO_UPSTREAM_BIN", &bins.demo_upstream)
        .env("RUN_DIR", run_dir)
        .env("BASE_ID", ports["ADMIN_PORT"].to_string())
        .env_remove("TOKENGATE_SYNC_TOKEN")
        .stdin(Stdio::null());
    if flavor == Flavor::Native {
        cmd.env("MODULE", bins.module());
    }
    for (var, port) in ports {
        cmd.env(var, port.to_string());
    }
    cmd
}

fn free_port_map() -> BTreeMap<&'static str, u16> {
    PORT_VARS
        .into_iter()
        .zip(free_ports(PORT_VARS.len()))
        .collect()
}

/// A running run.sh; stopped with SIGTERM (its trap stops the three processes) when dropped.
struct Running {
    child: Child,
    dir: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for pid in children_of(self.child.id()) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("run.sh state kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Pids whose parent is `parent`, from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // The command name is in parentheses and may hold spaces: read after the last ')'.
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = &stat[stat.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// A process's command line and environment, NUL-separated fields split.
fn process(pid: u32) -> (Vec<String>, Vec<String>) {
    let split = |path: String| -> Vec<String> {
        fs::read(&path)
            .unwrap_or_default()
            .split(|b| *b == 0)
            .filter(|f| !f.is_empty())
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .collect()
    };
    (
        split(format!("/proc/{pid}/cmdline")),
        split(format!("/proc/{pid}/environ")),
    )
}

flavored!(make_run_hands_each_credential_only_to_the_process_that_needs_it);
fn make_run_hands_each_credential_only_to_the_process_that_needs_it(flavor: Flavor) {
    let bins = Binaries::locate();
    let ports = free_port_map();
    let dir = temp_dir("make-run");
    // As a user who exported their admin token before `make run`.
    let admin = random_hex(32);
    let mut child = run_sh(&bins, &ports, &dir, flavor)
        .env("TOKENGATE_ADMIN_TOKEN", &admin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start envoy/run.sh");
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let running = Running { child, dir };
    let printed = Arc::new(Mutex::new(String::new()));
    for stream in [
        Box::new(stdout) as Box<dyn std::io::Read + Send>,
        Box::new(stderr),
    ] {
        let printed = printed.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let mut p = printed.lock().expect("lock");
                p.push_str(&line);
                p.push('\n');
            }
        });
    }
    let mut running = running;
    let start = Instant::now();
    while !printed
        .lock()
        .expect("lock")
        .contains("Press Ctrl-C to stop.")
    {
        if let Ok(Some(status)) = running.child.try_wait() {
            panic!(
                "run.sh exited ({status}):\n{}",
                printed.lock().expect("lock")
            );
        }
        assert!(
            start.elapsed() < READY_TIMEOUT * 2,
            "run.sh not ready after {:?}:\n{}",
            READY_TIMEOUT * 2,
            printed.lock().expect("lock")
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // It runs on the moved ports: Envoy refuses a request without a token.
    let envoy = SocketAddr::from(([127, 0, 0, 1], ports["LISTEN_PORT"]));
    let r = http(envoy, "GET", "/hello", &[], None).expect("request through make run's Envoy");
    assert_eq!(r.status, 401, "{r:?}");
    // ... and it is the filter of the flavor asked for.
    assert!(
        printed
            .lock()
            .expect("lock")
            .contains(&format!("tokengate is running ({} filter)", flavor.name())),
        "{}",
        printed.lock().expect("lock")
    );

    let mut seen = BTreeMap::new();
    for pid in children_of(running.child.id()) {
        let (cmdline, environ) = process(pid);
        let Some(program) = cmdline.first() else {
            continue;
        };
        let name = Path::new(program)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        seen.insert(name, (cmdline, environ));
    }
    let names: Vec<&String> = seen.keys().collect();
    for wanted in ["envoy", "demo-upstream", "tokengate"] {
        assert!(
            seen.contains_key(wanted),
            "no {wanted} among run.sh's children {names:?}"
        );
    }
    let var = |environ: &[String], name: &str| -> Option<String> {
        environ
            .iter()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(str::to_string))
    };
    let (_, cp_env) = &seen["tokengate"];
    assert_eq!(
        var(cp_env, "TOKENGATE_ADMIN_TOKEN").as_deref(),
        Some(admin.as_str())
    );
    let sync =
        var(cp_env, "TOKENGATE_SYNC_TOKEN").expect("the control plane has the sync credential");
    for other in ["envoy", "demo-upstream"] {
        let (cmdline, environ) = &seen[other];
        for secret in [&admin, &sync] {
            assert!(
                !environ.iter().any(|kv| kv.contains(secret.as_str())),
                "{other}'s environment holds a credential: {environ:?}"
            );
            assert!(
                !cmdline.iter().any(|a| a.contains(secret.as_str())),
                "{other}'s command line holds a credential"
            );
        }
        for name in ["TOKENGATE_ADMIN_TOKEN", "TOKENGATE_SYNC_TOKEN"] {
            assert_eq!(var(environ, name), None, "{other} has {name}");
        }
    }
    // The sync credential reaches Envoy through its rendered configuration alone.
    let rendered = fs::read_to_string(running.dir.join("envoy.yaml")).expect("rendered envoy.yaml");
    assert!(rendered.contains(&sync));
    assert!(!rendered.contains(&admin));
    drop(running);
}

#[test]
fn a_busy_port_names_the_variable_that_moves_it() {
    let bins = Binaries::locate();
    for var in PORT_VARS {
        let mut ports = free_port_map();
        let busy = TcpListener::bind("127.0.0.1:0").expect("bind a port to occupy");
        ports.insert(var, busy.local_addr().expect("addr").port());
        let dir = temp_dir("make-run-busy");
        let out: Output = run_sh(&bins, &ports, &dir, Flavor::Wasm)
            .env("TOKENGATE_ADMIN_TOKEN", random_hex(32))
            .output()
            .expect("run envoy/run.sh");
        let _ = fs::remove_dir_all(&dir);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}: run.sh started: {stderr}");
        assert!(
            stderr.contains(&format!("({var}) is already in use"))
                && stderr.contains(&format!("make run {var}=")),
            "{var}: the message does not name the variable: {stderr}"
        );
    }
}

fn make(args: &[&str]) -> String {
    let out = Command::new("make")
        .args(args)
        .current_dir(workspace_root())
        // Run as a fresh `make`, not as part of the `make test` that may have started us.
        .env_remove("MAKEFLAGS")
        .env_remove("MAKELEVEL")
        .env_remove("MFLAGS")
        .env_remove("ENVOY_BIN")
        .output()
        .expect("run make (GNU make is needed)");
    assert!(out.status.success(), "make {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn make_help_aligns_the_targets_and_lists_make_runs_variables() {
    let help = make(&["-s", "help"]);
    let targets: Vec<&str> = help.lines().filter(|l| l.starts_with("  make ")).collect();
    assert!(targets.len() > 10, "{help}");
    let text_column = |l: &str| {
        let name_end = 7 + l[7..].find(' ').expect("a description after the name");
        name_end + l[name_end..].find(|c| c != ' ').expect("a description")
    };
    let columns: Vec<usize> = targets.iter().map(|l| text_column(l)).collect();
    assert!(
        columns.iter().all(|c| *c == columns[0]),
        "descriptions do not start in one column:\n{help}"
    );
    for l in &targets {
        let name_end = 7 + l[7..].find(' ').expect("a description");
        assert!(
            l[name_end..].starts_with("  "),
            "a target name runs into its text: {l}"
        );
    }
    for var in PORT_VARS
        .iter()
        .chain(&["BASE_ID", "TOKENGATE_ADMIN_TOKEN", "ENVOY_BIN"])
    {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(var)),
            "make help does not list {var}:\n{help}"
        );
    }
}

#[test]
fn pip_installs_do_not_warn_about_running_as_root() {
    // Every pip install the Makefile would run, printed by `make -n` with the install
    // directories moved so that each one is due.
    let mut lines: Vec<String> = Vec::new();
    for args in [
        vec!["-n", "tools", "ENVOY_DIR=/nonexistent/envoy"],
        vec![
            "-n",
            "/nonexistent/py/.kubernetes-validate-1.37.0",
            "PYTOOLS=/nonexistent/py",
        ],
    ] {
        lines.extend(
            make(&args)
                .lines()
                .filter(|l| l.contains("pip install"))
                .map(str::to_string),
        );
    }
    assert_eq!(lines.len(), 2, "{lines:?}");
    for l in &lines {
        assert!(l.contains("--root-user-action=ignore"), "{l}");
    }
    // And this pip knows the option (an unknown option is an error even with --help).
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(python)
        .args([
            "-m",
            "pip",
            "install",
            "--root-user-action=ignore",
            "--help",
        ])
        .stdout(Stdio::null())
        .status()
        .expect("run pip")
        .success();
    assert!(ok, "pip does not accept --root-user-action=ignore");
}

#[test]
fn make_test_says_it_skips_the_manifest_check_without_kubectl() {
    let without = make(&["-n", "test", "KUBECTL="]);
    assert!(
        without.contains("kubectl not found") && without.contains("SKIPPED"),
        "{without}"
    );
    assert!(!without.contains("deploy/kubernetes/check.py"));
    let with = make(&["-n", "test", "KUBECTL=/usr/bin/kubectl"]);
    assert!(with.contains("deploy/kubernetes/check.py"));
    // (`make -n` prints every recipe, the browser target's own SKIPPED messages included.)
    assert!(!with.contains("kubectl not found"), "{with}");
}

/// `make run-ha` (envoy/run-ha.sh) for real, on free ports and a private state directory: it
/// comes up with two replicas on its own PostgreSQL, Envoy carries on when one replica is
/// killed as its printed instructions say, and Ctrl-C stops everything, PostgreSQL included.
#[test]
fn make_run_ha_survives_killing_a_replica_and_stops_its_database() {
    let bins = Binaries::locate();
    let vars = [
        "LISTEN_PORT",
        "ADMIN_PORT",
        "UPSTREAM_PORT",
        "CONTROL_PLANE_PORT",
        "CONTROL_PLANE_PORT_2",
        "PG_PORT",
    ];
    let ports: BTreeMap<&str, u16> = vars.into_iter().zip(free_ports(vars.len())).collect();
    let dir = temp_dir("make-run-ha");
    let mut cmd = Command::new("bash");
    cmd.arg(workspace_root().join("envoy/run-ha.sh"))
        .current_dir(workspace_root())
        .env("ENVOY_BIN", &bins.envoy)
        .env("WASM", &bins.wasm)
        .env("TOKENGATE_BIN", &bins.tokengate)
        .env("DEMO_UPSTREAM_BIN", &bins.demo_upstream)
        .env("RUN_DIR", &dir)
        .env("BASE_ID", ports["ADMIN_PORT"].to_string())
        .env_remove("TOKENGATE_ADMIN_TOKEN")
        .env_remove("TOKENGATE_SYNC_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (var, port) in &ports {
        cmd.env(var, port.to_string());
    }
    let mut child = cmd.spawn().expect("start envoy/run-ha.sh");
    let printed = Arc::new(Mutex::new(String::new()));
    for stream in [
        Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().expect("stderr")),
    ] {
        let printed = printed.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let mut p = printed.lock().expect("lock");
                p.push_str(&line);
                p.push('\n');
            }
        });
    }
    let mut running = Running { child, dir };
    let start = Instant::now();
    while !printed
        .lock()
        .expect("lock")
        .contains("Press Ctrl-C to stop")
    {
        if let Ok(Some(status)) = running.child.try_wait() {
            panic!(
                "run-ha.sh exited ({status}):\n{}",
                printed.lock().expect("lock")
            );
        }
        assert!(
            start.elapsed() < READY_TIMEOUT * 3,
            "run-ha.sh not ready:\n{}",
            printed.lock().expect("lock")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = printed.lock().expect("lock").clone();
    let admin = out
        .lines()
        .skip_while(|l| !l.starts_with("Admin token"))
        .nth(1)
        .expect("the admin token is printed")
        .trim()
        .to_string();
    let auth = format!("Bearer {admin}");
    let replica = |i: &str| SocketAddr::from(([127, 0, 0, 1], ports[i]));
    let envoy = SocketAddr::from(([127, 0, 0, 1], ports["LISTEN_PORT"]));
    let r = http(
        replica("CONTROL_PLANE_PORT"),
        "POST",
        "/v1/tokens",
        &[("Authorization", &auth)],
        Some(r#"{"name":"demo"}"#),
    )
    .expect("create on replica 1");
    assert_eq!(r.status, 201, "{r:?}");
    let v = r.json();
    let (id, token) = (v["id"].as_str().unwrap(), v["token"].as_str().unwrap());
    let status_through_envoy =
        || http(envoy, "GET", "/hello", &[("X-API-Token", token)], None).map(|r| r.status);
    let wait_for = |want: u16| {
        let start = Instant::now();
        while status_through_envoy().ok() != Some(want) {
            assert!(
                start.elapsed() < READY_TIMEOUT,
                "never {want} through Envoy"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for(200);

    // As printed: kill replica 1 the hard way, then suspend through replica 2.
    assert!(out.contains("kill -9 $(cat "), "{out}");
    let pid = fs::read_to_string(running.dir.join("replica-1.pid")).expect("replica-1.pid");
    let killed = Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let r = http(
        replica("CONTROL_PLANE_PORT_2"),
        "POST",
        &format!("/v1/tokens/{id}/suspend"),
        &[("Authorization", &auth)],
        None,
    )
    .expect("suspend on replica 2");
    assert_eq!(r.status, 200, "{r:?}");
    wait_for(403);
    assert!(
        running.child.try_wait().expect("wait").is_none(),
        "run-ha.sh exited"
    );

    let pg = SocketAddr::from(([127, 0, 0, 1], ports["PG_PORT"]));
    assert!(std::net::TcpStream::connect(pg).is_ok(), "PostgreSQL is up");
    drop(running);
    assert!(
        std::net::TcpStream::connect(pg).is_err(),
        "PostgreSQL still answers after run-ha.sh stopped"
    );
}
