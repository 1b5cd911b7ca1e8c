//! demo-upstream: the service that tokengate protects in `make run` and in the end-to-end
//! tests. It answers every method and path with 200 and a JSON echo of what it received, so
//! a user sees who called and a test sees exactly which headers made it past Envoy.
//!
//! Usage: `demo-upstream --listen 127.0.0.1:8080` (or env `DEMO_UPSTREAM_LISTEN`).
//!
//! It logs one line per request (method, path, token id), never header values: the whole
//! point of the suite's log check is that no token secret reaches any log.

use axum::extract::Request;
use axum::Json;
use serde_json::{json, Map, Value};
use std::net::SocketAddr;
use std::process::ExitCode;

const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

fn listen_address() -> Result<SocketAddr, String> {
    let mut args = std::env::args().skip(1);
    let mut listen = std::env::var("DEMO_UPSTREAM_LISTEN").ok();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                listen = Some(
                    args.next()
                        .ok_or("--listen needs an address, e.g. 127.0.0.1:8080")?,
                )
            }
            s if s.starts_with("--listen=") => listen = Some(s["--listen=".len()..].to_string()),
            "-h" | "--help" => {
                println!(
                    "demo-upstream: echoes every request as JSON\n\n\
                     usage: demo-upstream [--listen ADDR]   (default {DEFAULT_LISTEN}, env DEMO_UPSTREAM_LISTEN)"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument `{other}` (try --help)")),
        }
    }
    let listen = listen.unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    listen
        .parse()
        .map_err(|e| format!("invalid listen address `{listen}`: {e}"))
}

fn header(req: &Request, name: &str) -> Value {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map_or(Value::Null, |s| Value::String(s.to_string()))
}

async fn echo(req: Request) -> Json<Value> {
    let mut headers = Map::new();
    for (name, value) in req.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers.get_mut(name.as_str()) {
            // Repeated headers are folded the way HTTP allows, so none is hidden from a test.
            Some(Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(&value);
            }
            _ => {
                headers.insert(name.as_str().to_string(), Value::String(value));
            }
        }
    }
    let identity = json!({
        "token_id": header(&req, "x-tokengate-token-id"),
        "token_name": header(&req, "x-tokengate-token-name"),
        "token_owner": header(&req, "x-tokengate-token-owner"),
        "token_kind": header(&req, "x-tokengate-token-kind"),
    });
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string());
    eprintln!(
        "demo-upstream: {} {} token_id={}",
        req.method(),
        req.uri().path(),
        identity["token_id"].as_str().unwrap_or("-")
    );
    Json(json!({
        "message": "hello from the demo upstream",
        "method": req.method().as_str(),
        "path": path,
        "identity": identity,
        "headers": headers,
    }))
}

async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let addr = match listen_address() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("demo-upstream: {e}");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("demo-upstream: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("demo-upstream: listening on http://{addr}");
    let app = axum::Router::new().fallback(echo);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown())
        .await
    {
        eprintln!("demo-upstream: server error: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
