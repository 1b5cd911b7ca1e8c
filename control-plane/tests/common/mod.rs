//! Shared by the API test files: `spawn_app` serves `app(state)` on a real socket;
//! `process` runs the real binary.
#![allow(dead_code)]

pub mod process;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokengate::api::{Admin, ConsoleSettings};
use tokengate::app::{Application, Config, Database};
use tokengate::connections;
use tokengate::domain::housekeeping::Jobs;
use tokengate::domain::sessions::Limits;
use tokengate::policy::Policy;
use tokengate::store::{PgSettings, Store};
use tokengate::throttle;
use tokio::sync::watch;

pub const ADMIN: &str = "admin-credential-0123456789";
/// A second named admin credential, `ops`.
pub const OPS: &str = "ops-credential-0123456789";
pub const SYNC: &str = "sync-credential-0123456789";

pub struct Answer {
    pub status: u16,
    /// Names in lower case; a header sent twice appears twice.
    pub headers: Vec<(String, String)>,
    pub text: String,
    /// The body as JSON, or null.
    pub json: serde_json::Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A console session: `name=value` for the Cookie header, and its CSRF token.
pub struct ConsoleSession {
    pub cookie: String,
    pub csrf: String,
}

pub struct TestApp {
    pub url: String,
    pub shutdown: watch::Sender<bool>,
    pub store: Arc<dyn Store>,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

pub fn spawn_app(page_size: u32) -> TestApp {
    spawn_app_with(page_size, Policy::default())
}

pub fn spawn_app_with(page_size: u32, policy: Policy) -> TestApp {
    spawn_app_console(
        page_size,
        policy,
        ConsoleSettings::default(),
        Limits::default(),
    )
}

/// Generous enough that tests sending wrong credentials on purpose are not throttled.
pub fn lenient_throttle() -> throttle::Settings {
    throttle::Settings {
        burst: 1000,
        interval: Duration::from_millis(1),
    }
}

/// Serves with these credential-throttle settings.
pub fn spawn_app_throttled(settings: throttle::Settings) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), 100, Policy::default());
    config.throttle = settings;
    spawn(config, dir)
}

/// The configuration the API tests run with: SQLite in `dir`, no background jobs to speak
/// of (they run on the test's own clock, through `run_once`).
pub fn config(dir: &std::path::Path, page_size: u32, policy: Policy) -> Config {
    Config {
        database: Database::Sqlite(dir.join("t.db")),
        postgres: PgSettings::default(),
        admins: vec![
            Admin {
                name: "admin".into(),
                secret: ADMIN.into(),
            },
            Admin {
                name: "ops".into(),
                secret: OPS.into(),
            },
        ],
        sync_token: SYNC.into(),
        policy,
        sync_max_wait: Duration::from_secs(5),
        sync_page_size: page_size,
        jobs: Jobs {
            warning_leads: vec![],
            retention: None,
            purge_interval: i64::MAX,
            webhook: None,
        },
        jobs_interval: Duration::from_secs(3600),
        console: ConsoleSettings::default(),
        sessions: Limits::default(),
        connections: connections::Limits::default(),
        throttle: lenient_throttle(),
        test_quota_periods: true,
    }
}

pub fn spawn_app_console(
    page_size: u32,
    policy: Policy,
    console: ConsoleSettings,
    limits: Limits,
) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), page_size, policy);
    config.console = console;
    config.sessions = limits;
    spawn(config, dir)
}

/// Builds the application exactly as `tokengate serve` does and serves it on a free port.
pub fn spawn(config: Config, dir: tempfile::TempDir) -> TestApp {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (shutdown, mut rx) = watch::channel(false);
    let (app, listener) = rt.block_on(async {
        let app = Application::build(config).await.unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        (app, l)
    });
    let url = format!("http://{}", listener.local_addr().unwrap());
    let store = app.store();
    rt.spawn(app.serve(listener, async move {
        let _ = rx.wait_for(|stop| *stop).await;
    }));
    TestApp {
        url,
        shutdown,
        store,
        rt,
        _dir: dir,
    }
}

impl TestApp {
    /// Runs a future (a store or domain call) to completion on the app's runtime.
    pub fn block_on<T>(&self, f: impl Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    pub fn call(
        &self,
        method: &str,
        path: &str,
        cred: Option<&str>,
        body: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let bearer = cred.map(|c| format!("Bearer {c}"));
        let headers: Vec<(&str, &str)> = bearer
            .as_deref()
            .map(|b| ("authorization", b))
            .into_iter()
            .collect();
        let r = self.request(method, path, &headers, body);
        (r.status, r.json)
    }

    /// Any request; the answer with its headers.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Answer {
        let mut req = ureq::request(method, &format!("{}{path}", self.url));
        for (name, value) in headers {
            req = req.set(name, value);
        }
        let res = match body {
            Some(b) => req.set("content-type", "application/json").send_string(b),
            None => req.call(),
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        let headers = resp
            .headers_names()
            .into_iter()
            .flat_map(|n| {
                resp.all(&n)
                    .into_iter()
                    .map(|v| (n.clone(), v.to_string()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let text = resp.into_string().unwrap();
        Answer {
            status,
            headers,
            json: serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
            text,
        }
    }

    /// Signs in to the console as `credential`: the session cookie and CSRF token.
    pub fn sign_in(&self, credential: &str) -> ConsoleSession {
        let body = serde_json::json!({ "credential": credential }).to_string();
        let r = self.request("POST", "/v1/session", &[], Some(&body));
        assert_eq!(r.status, 201, "{}", r.text);
        let set = r.header("set-cookie").expect("a session cookie");
        let cookie = set.split(';').next().unwrap().to_string();
        ConsoleSession {
            cookie,
            csrf: r.json["csrf_token"].as_str().unwrap().to_string(),
        }
    }

    /// A request in a console session; `csrf` adds the session's CSRF token.
    pub fn in_session(
        &self,
        session: &ConsoleSession,
        csrf: bool,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Answer {
        let mut headers = vec![("cookie", session.cookie.as_str())];
        if csrf {
            headers.push(("x-csrf-token", session.csrf.as_str()));
        }
        self.request(method, path, &headers, body)
    }

    pub fn admin(&self, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        self.call(method, path, Some(ADMIN), body)
    }

    pub fn create(&self, body: &str) -> serde_json::Value {
        let (s, v) = self.admin("POST", "/v1/tokens", Some(body));
        assert_eq!(s, 201, "{v}");
        v
    }

    /// Starts a sync long-poll on another thread; joining gives its duration and answer.
    pub fn poll_in_background(
        &self,
        query: &str,
    ) -> std::thread::JoinHandle<(Duration, serde_json::Value)> {
        let url = format!("{}/v1/sync?{query}", self.url);
        std::thread::spawn(move || {
            let t = Instant::now();
            let r = ureq::get(&url)
                .set("authorization", &format!("Bearer {SYNC}"))
                .call()
                .unwrap();
            (t.elapsed(), r.into_json().unwrap())
        })
    }

    pub fn sync(&self, query: &str) -> serde_json::Value {
        let (s, v) = self.call("GET", &format!("/v1/sync?{query}"), Some(SYNC), None);
        assert_eq!(s, 200, "{v}");
        v
    }
}
