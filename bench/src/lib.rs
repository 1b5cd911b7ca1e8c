//! `make bench`: tokengate measured against what users would otherwise run, on the same
//! pinned Envoy, with ratios taken inside one run because the machine is shared and noisy.
//!
//! Each section (`variants`, `waterfall`, `accuracy`, `propagation`, `scale`, `fleet`,
//! `fleet-accuracy`, `scopes-quotas`) returns its figures as
//! JSON; `report` turns them into the tables of `docs/benchmarks.md` and `chart` into the
//! picture beside them.

pub mod accuracy;
pub mod chart;
pub mod client;
pub mod fleet;
pub mod fleet_accuracy;
pub mod load;
pub mod procstat;
pub mod propagation;
pub mod report;
pub mod scale;
pub mod scopes_quotas;
pub mod variants;
pub mod waterfall;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokengate_e2e::{free_ports, http, workspace_root, Binaries};

/// How long the run is: `Full` for `make bench`, `Quick` for `make bench-quick` (about a
/// minute in all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    Full,
    Quick,
}

/// Where a run writes its rendered configurations, logs and results.
pub fn out_dir() -> PathBuf {
    let dir = workspace_root().join("target/bench");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// Renders `bench/envoy/<name>.yaml` by replacing every `${NAME}`.
pub fn render(name: &str, vars: &[(&str, String)]) -> String {
    let path = workspace_root().join(format!("bench/envoy/{name}.yaml"));
    let mut text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    for (var, value) in vars {
        text = text.replace(&format!("${{{var}}}"), value);
    }
    if let Some(pos) = text.find("${") {
        let rest: String = text[pos..].chars().take(40).collect();
        panic!("{name}.yaml: placeholder left unfilled: {rest}");
    }
    text
}

/// An Envoy started for a bench, killed when dropped.
pub struct Envoy {
    pub name: String,
    pub port: u16,
    pub admin_port: u16,
    child: Child,
}

impl Envoy {
    /// Starts Envoy on `bench/envoy/<template>.yaml` with `workers` worker threads and waits
    /// for its admin `/ready`. `vars` fills the template; `LISTEN_PORT`, `ADMIN_PORT`,
    /// `WASM_PATH` and `MODULE_PATH` are filled here (`vars` may give another `WASM_PATH`).
    pub fn start(label: &str, template: &str, workers: u32, vars: &[(&str, String)]) -> Envoy {
        Envoy::start_under(label, template, workers, vars, &[], Duration::from_secs(60))
    }

    /// [`Envoy::start`] under `wrapper` (a command and its arguments, Envoy's command line
    /// appended: `valgrind --tool=callgrind ...`), ready within `ready_within`.
    pub fn start_under(
        label: &str,
        template: &str,
        workers: u32,
        vars: &[(&str, String)],
        wrapper: &[String],
        ready_within: Duration,
    ) -> Envoy {
        let bins = Binaries::locate();
        let ports = free_ports(2);
        let (port, admin_port) = (ports[0], ports[1]);
        // The caller's first: the first value given for a placeholder is the one used.
        let mut all: Vec<(&str, String)> = vars.to_vec();
        all.extend([
            ("LISTEN_PORT", port.to_string()),
            ("ADMIN_PORT", admin_port.to_string()),
            ("WASM_PATH", bins.wasm.display().to_string()),
        ]);
        if template == "tokengate-native" {
            all.push(("MODULE_PATH", bins.module().display().to_string()));
        }
        let config = render(template, &all);
        let dir = out_dir().join("run");
        fs::create_dir_all(&dir).expect("create target/bench/run");
        let config_path = dir.join(format!("{label}.yaml"));
        fs::write(&config_path, config).expect("write the rendered config");
        let log = fs::File::create(dir.join(format!("{label}.log"))).expect("create the log");
        let (program, prefix): (&Path, &[String]) = match wrapper.split_first() {
            Some((first, rest)) => (Path::new(first), rest),
            None => (&bins.envoy, &[]),
        };
        let mut command = Command::new(program);
        command.args(prefix);
        if !wrapper.is_empty() {
            command.arg(&bins.envoy);
        }
        let child = command
            .arg("-c")
            .arg(&config_path)
            .args(["--concurrency", &workers.to_string()])
            .args(["--base-id", &admin_port.to_string()])
            .arg("--disable-hot-restart")
            .args(["-l", "warning"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bins.envoy.display()));
        let mut envoy = Envoy {
            name: label.to_string(),
            port,
            admin_port,
            child,
        };
        let start = Instant::now();
        loop {
            let admin = ([127, 0, 0, 1], admin_port).into();
            if http(admin, "GET", "/ready", &[], None).is_ok_and(|r| r.status == 200) {
                break;
            }
            if let Ok(Some(status)) = envoy.child.try_wait() {
                panic!(
                    "Envoy {label} exited ({status}) during start-up; see {}",
                    dir.join(format!("{label}.log")).display()
                );
            }
            assert!(
                start.elapsed() < ready_within,
                "Envoy {label} not ready after {ready_within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        envoy
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// One counter or gauge from the admin `/stats` (0 when absent).
    pub fn stat(&self, name: &str) -> u64 {
        let admin = ([127, 0, 0, 1], self.admin_port).into();
        http(admin, "GET", &format!("/stats?filter={name}"), &[], None)
            .ok()
            .and_then(|r| {
                r.body.lines().find_map(|l| {
                    let (n, v) = l.split_once(": ")?;
                    (n == name).then(|| v.trim().parse().ok())?
                })
            })
            .unwrap_or(0)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A helper process of the bench (the ext_authz service), killed when dropped.
pub struct Helper(pub Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The path of a binary built next to this one (`target/release/<name>`).
pub fn sibling_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().unwrap_or(Path::new("."));
    dir.join(name)
}

/// The median of `values` (sorted in place); 0 when empty.
pub fn median(values: &mut [f64]) -> f64 {
    percentile(values, 0.5)
}

/// The `p`-quantile (0..=1) of `values` by nearest rank (sorted in place); 0 when empty.
pub fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}
