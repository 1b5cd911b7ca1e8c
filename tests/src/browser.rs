//! A headless Chromium driven through ChromeDriver over the W3C WebDriver protocol (plain
//! HTTP and JSON), for the web console's end-to-end test.
//!
//! Found at `$CHROMIUM` / `$CHROMEDRIVER`, else Debian's `/usr/bin/chromium` and
//! `/usr/bin/chromedriver` (`make browser` installs them where apt is available). Only a
//! browser that is not installed is a reason not to run; one that is installed and does not
//! start is a failure.

use crate::{free_ports, http, try_wait_until, Response};
use base64::Engine;
use serde_json::{json, Value};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The key under which WebDriver names an element.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// How long a lookup waits for its element to appear and be shown: generous, for a busy
/// machine.
const FIND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long ChromeDriver may take to answer `/status` as ready.
const DRIVER_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Chromium or ChromeDriver is not installed: the one reason the browser test does not run.
#[derive(Debug)]
pub struct NotInstalled(pub String);

pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
}

fn program(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

impl Browser {
    /// Starts ChromeDriver and a headless Chromium with a fresh profile under `dir`. Says so
    /// when either is not installed; panics when an installed one fails to start.
    pub fn start(dir: &Path) -> Result<Browser, NotInstalled> {
        let chromium = program("CHROMIUM", "/usr/bin/chromium");
        let chromedriver = program("CHROMEDRIVER", "/usr/bin/chromedriver");
        for p in [&chromium, &chromedriver] {
            if !p.exists() {
                return Err(NotInstalled(format!(
                    "{} is not installed (run `make browser`, or set CHROMIUM and CHROMEDRIVER)",
                    p.display()
                )));
            }
        }
        let port = free_ports(1)[0];
        let log_path = dir.join("chromedriver.log");
        let log = fs::File::create(&log_path)
            .unwrap_or_else(|e| panic!("create {}: {e}", log_path.display()));
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(log.try_clone().expect("clone the log file handle"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", chromedriver.display()));
        let mut browser = Browser {
            driver,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            session: String::new(),
        };
        let mut exited = None;
        let ready = try_wait_until(DRIVER_READY_TIMEOUT, || {
            exited = browser.driver.try_wait().ok().flatten();
            exited.is_some()
                || browser
                    .raw("GET", "/status", None)
                    .is_ok_and(|r| r.json()["value"]["ready"] == true)
        });
        if ready.is_none() || exited.is_some() {
            panic!(
                "{} did not become ready ({}); its log:\n{}",
                chromedriver.display(),
                exited.map_or(format!("not in {DRIVER_READY_TIMEOUT:?}"), |s| format!(
                    "it exited: {s}"
                )),
                fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        let profile = dir.join("chromium-profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                // Headless as root in a sandbox with no network beyond loopback: no
                // sandbox, GPU, or any call home (which this machine refuses).
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", "--disable-extensions", "--window-size=1400,1000",
                         format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let r = browser
            .raw("POST", "/session", Some(&caps))
            .unwrap_or_else(|e| panic!("ChromeDriver: new session: {e}"));
        browser.session = serde_json::from_str::<Value>(&r.body)
            .ok()
            .and_then(|v| v["value"]["sessionId"].as_str().map(str::to_string))
            .unwrap_or_else(|| {
                panic!(
                    "ChromeDriver refused a Chromium session ({}): {}",
                    chromium.display(),
                    r.body
                )
            });
        Ok(browser)
    }

    fn raw(&self, method: &str, path: &str, body: Option<&Value>) -> std::io::Result<Response> {
        let body = body.map(Value::to_string);
        http(self.addr, method, path, &[], body.as_deref())
    }

    /// One WebDriver command; its `value`, or the WebDriver error as text.
    pub fn command(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let path = format!("/session/{}{path}", self.session);
        let body = body.or_else(|| (method == "POST").then(|| json!({})));
        let r = self
            .raw(method, &path, body.as_ref())
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let v: Value = serde_json::from_str(&r.body).map_err(|e| format!("{e}: {}", r.body))?;
        if r.status != 200 {
            return Err(format!(
                "{method} {path}: {} {}",
                v["value"]["error"], v["value"]["message"]
            ));
        }
        Ok(v["value"].clone())
    }

    pub fn goto(&self, url: &str) {
        self.command("POST", "/url", Some(json!({ "url": url })))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn refresh(&self) {
        self.command("POST", "/refresh", None)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page.
    pub fn run(&self, script: &str, args: Value) -> Value {
        self.command(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    fn find_now(&self, css: &str) -> Result<String, String> {
        let v = self.command(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        )?;
        let id = v[ELEMENT]
            .as_str()
            .ok_or_else(|| format!("no element id in {v}"))?
            .to_string();
        match self.command("GET", &format!("/element/{id}/displayed"), None)? {
            Value::Bool(true) => Ok(id),
            _ => Err("present but hidden".into()),
        }
    }

    /// The element `css` selects once it is shown; panics after a while.
    pub fn find(&self, css: &str) -> String {
        let mut found = Err(String::new());
        try_wait_until(FIND_TIMEOUT, || {
            found = self.find_now(css);
            found.is_ok()
        });
        found.unwrap_or_else(|e| panic!("no visible element matches {css:?}: {e}"))
    }

    pub fn is_shown(&self, css: &str) -> bool {
        self.find_now(css).is_ok()
    }

    pub fn click(&self, css: &str) {
        // Retried: a click can land while the page replaces the element (a re-rendered row).
        let mut last = String::new();
        let done = try_wait_until(FIND_TIMEOUT, || {
            let id = self.find(css);
            match self.command("POST", &format!("/element/{id}/click"), None) {
                Ok(_) => true,
                Err(e) => {
                    last = e;
                    false
                }
            }
        });
        assert!(done.is_some(), "cannot click {css:?}: {last}");
    }

    /// Replaces the text of the input `css` selects.
    pub fn fill(&self, css: &str, text: &str) {
        let id = self.find(css);
        self.command("POST", &format!("/element/{id}/clear"), None)
            .unwrap_or_else(|e| panic!("{e}"));
        if !text.is_empty() {
            self.command(
                "POST",
                &format!("/element/{id}/value"),
                Some(json!({ "text": text })),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// Chooses the option with `value` in the `<select>` that `css` selects.
    pub fn choose(&self, css: &str, value: &str) {
        // Clicking the option alone selects it (and fires `change`) without leaving the
        // native drop-down drawn open in screenshots.
        self.click(&format!("{css} option[value=\"{value}\"]"));
    }

    pub fn text(&self, css: &str) -> String {
        let id = self.find(css);
        self.command("GET", &format!("/element/{id}/text"), None)
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    }

    /// Waits until `css`'s text satisfies `ok`, and returns that text.
    pub fn wait_text(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let mut seen = String::new();
        let done = try_wait_until(FIND_TIMEOUT, || {
            seen = self
                .find_now(css)
                .map(|_| self.text(css))
                .unwrap_or_default();
            ok(&seen)
        });
        assert!(done.is_some(), "{css}: waited for {what}, text is {seen:?}");
        seen
    }

    pub fn wait_gone(&self, css: &str) {
        let done = try_wait_until(FIND_TIMEOUT, || !self.is_shown(css));
        assert!(done.is_some(), "{css} is still shown");
    }

    /// Resizes the window; returns the page's viewport width, as CSS sees it.
    pub fn set_window_size(&self, width: u32, height: u32) -> u64 {
        self.command(
            "POST",
            "/window/rect",
            Some(json!({ "width": width, "height": height })),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        self.run("return window.innerWidth;", json!([]))
            .as_u64()
            .unwrap_or_default()
    }

    /// Saves a PNG of the window.
    pub fn screenshot(&self, path: &Path) {
        let v = self
            .command("GET", "/screenshot", None)
            .unwrap_or_else(|e| panic!("{e}"));
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .expect("screenshot is base64");
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("create screenshot folder");
        }
        fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.raw("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
