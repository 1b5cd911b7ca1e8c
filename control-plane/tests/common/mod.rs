//! Shared by the API test files: `spawn_app` serves `app(state)` on a real socket;
//! `process` runs the real binary.
#![allow(dead_code)]

pub mod process;

use std::sync::Arc;
use std::time::Duration;
use tokengate::api::{app, Admin, AppState, ConsoleSettings};
use tokengate::connections;
use tokengate::metrics::Metrics;
use tokengate::policy::Policy;
use tokengate::sessions::{Limits, Sessions};
use tokengate::store::{SqliteStore, Store};
use tokengate::throttle::{self, Throttle};
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

pub fn spawn_app_console(
    page_size: u32,
    policy: Policy,
    console: ConsoleSettings,
    limits: Limits,
) -> TestApp {
    spawn_app_full(page_size, policy, console, limits, lenient_throttle())
}

/// Serves with these credential-throttle settings.
pub fn spawn_app_throttled(settings: throttle::Settings) -> TestApp {
    spawn_app_full(
        100,
        Policy::default(),
        ConsoleSettings::default(),
        Limits::default(),
        settings,
    )
}

/// Serves `app(state)` the way `tokengate serve` does (`connections::serve`, with client
/// addresses), on 127.0.0.1 and a free port.
pub fn spawn_app_full(
    page_size: u32,
    policy: Policy,
    console: ConsoleSettings,
    limits: Limits,
    throttle: throttle::Settings,
) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("t.db")).unwrap());
    let (shutdown, rx) = watch::channel(false);
    let metrics = Arc::new(Metrics::default());
    let state = AppState {
        store: store.clone(),
        admins: vec![
            Admin {
                name: "admin".into(),
                secret: ADMIN.into(),
            },
            Admin {
                name: "ops".into(),
                secret: OPS.into(),
            },
        ]
        .into(),
        sync_token: SYNC.into(),
        policy,
        sync_max_wait: Duration::from_secs(5),
        sync_page_size: page_size,
        shutdown: rx,
        sessions: Arc::new(Sessions::new(limits)),
        console,
        throttle: Arc::new(Throttle::new(throttle)),
        metrics: metrics.clone(),
    };
    let (tx, addr) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            connections::serve(
                l,
                app(state),
                connections::Limits::default(),
                metrics,
                std::future::pending(),
            )
            .await;
        });
    });
    TestApp {
        url: format!("http://{}", addr.recv().unwrap()),
        shutdown,
        store,
        _dir: dir,
    }
}

impl TestApp {
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

    pub fn sync(&self, query: &str) -> serde_json::Value {
        let (s, v) = self.call("GET", &format!("/v1/sync?{query}"), Some(SYNC), None);
        assert_eq!(s, 200, "{v}");
        v
    }
}
