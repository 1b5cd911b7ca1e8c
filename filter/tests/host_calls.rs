//! No proxy-wasm SDK wrapper that panics on an unexpected host status may be called by the
//! filter: a panic traps the VM, and a trapped VM answers 503 to every request. The filter
//! uses its own status-checked calls (`src/host.rs`) instead. `make lint` enforces the
//! list in `clippy.toml` (`disallowed-methods`); this test keeps the list itself honest and
//! checks the sources with `make test` too.

// Test code: a missing file should fail the test loudly.
#![allow(clippy::expect_used)]

use std::fs;
use std::path::Path;

/// SDK wrappers that panic on a status they do not expect and that a request reaches:
/// header reads and edits, the local reply, shared data, the clock and logging.
const REQUEST_PATH_SDK_CALLS: [&str; 11] = [
    "get_map_value_bytes",
    "get_map_bytes",
    "remove_map_value",
    "set_map_value_bytes",
    "add_map_value",
    "send_http_response",
    "send_grpc_response",
    "get_shared_data",
    "set_shared_data",
    "get_current_time",
    "log",
];

fn disallowed() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let clippy = fs::read_to_string(root.join("clippy.toml")).expect("read clippy.toml");
    clippy
        .lines()
        .filter_map(|l| l.split_once("path = \"proxy_wasm::hostcalls::"))
        .filter_map(|(_, rest)| rest.split_once('"'))
        .map(|(name, _)| name.to_string())
        .collect()
}

#[test]
fn clippy_disallows_every_panicking_sdk_call_on_the_request_path() {
    let listed = disallowed();
    for call in REQUEST_PATH_SDK_CALLS {
        assert!(
            listed.iter().any(|l| l == call),
            "clippy.toml does not disallow proxy_wasm::hostcalls::{call}"
        );
    }
}

/// Every Rust source under `dir`, in subdirectories too (the glue lives in `src/wasm/`).
fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).expect("read a source directory") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn the_filter_calls_none_of_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let listed = disallowed();
    let mut found = Vec::new();
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(
        files.iter().any(|p| p.ends_with("wasm/request.rs")),
        "the glue's sources are not found"
    );
    for path in files {
        let text = fs::read_to_string(&path).expect("read a source file");
        for call in &listed {
            let needle = format!("hostcalls::{call}(");
            if text.contains(&needle) {
                found.push(format!("{}: {needle}", path.display()));
            }
        }
        assert!(
            !text.contains("use proxy_wasm::hostcalls::{") && !text.contains("hostcalls as "),
            "{}: import hostcalls by path, so that this check sees every call",
            path.display()
        );
    }
    assert!(
        found.is_empty(),
        "panicking SDK calls in the filter:\n{}",
        found.join("\n")
    );
}
