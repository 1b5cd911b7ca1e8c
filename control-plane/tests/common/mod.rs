//! Shared by the API test files: `spawn_app` serves `app(state)` on a real socket.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};
use tokengate::api::{app, Admin, AppState, ConsoleSettings};
use tokengate::policy::Policy;
use tokengate::sessions::{Limits, Sessions};
use tokengate::store::{SqliteStore, Store};
use tokio::sync::watch;

pub const ADMIN: &str = "admin-credential-0123456789";
/// A second named admin credential, `ops`.
pub const OPS: &str = "ops-credential-0123456789";
pub const SYNC: &str = "sync-credential-0123456789";

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
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("t.db")).unwrap());
    let (shutdown, rx) = watch::channel(false);
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
        sessions: Arc::new(Sessions::new(Limits::default())),
        console: ConsoleSettings::default(),
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
            axum::serve(l, app(state)).await.unwrap();
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
        let mut req = ureq::request(method, &format!("{}{path}", self.url));
        if let Some(c) = cred {
            req = req.set("authorization", &format!("Bearer {c}"));
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
        let text = resp.into_string().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
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
