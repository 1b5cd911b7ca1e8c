//! Every Envoy configuration the benchmarks use, rendered and loaded by the pinned Envoy in
//! `--mode validate` (with the real filter, either flavor, for the tokengate variants), so that `make test`
//! catches a configuration that `make bench` would only find broken a quarter of an hour in.

use std::process::Command;
use tokengate_bench::render;
use tokengate_e2e::{free_ports, workspace_root, Binaries};

/// A plausible value for each placeholder the templates use.
fn dummy(name: &str, wasm: &str, module: &str) -> Option<String> {
    Some(match name {
        "LISTEN_PORT" | "ADMIN_PORT" | "CONTROL_PLANE_PORT" | "AUTHZ_PORT" => "10001".into(),
        "WASM_PATH" => wasm.into(),
        "MODULE_PATH" => module.into(),
        "SYNC_TOKEN" => "validate-only-sync-credential".into(),
        "PLUGIN_EXTRA" => r#""tick_ms": 200,"#.into(),
        "CREDENTIALS" => r#"[{key: "tg_key", client: "tok_a"}]"#.into(),
        "DESCRIPTORS" => "[{entries: [{key: client, value: tok_a}], token_bucket: {max_tokens: 10, tokens_per_fill: 10, fill_interval: 1s}}]".into(),
        _ => return None,
    })
}

#[test]
fn every_bench_configuration_loads_in_envoy() {
    let bins = Binaries::locate();
    let wasm = bins.wasm.display().to_string();
    let module = bins.module().display().to_string();
    let dir = workspace_root().join("bench/envoy");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("bench/envoy")
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".yaml")
                .map(str::to_string)
        })
        .collect();
    names.sort();
    assert!(names.len() >= 4, "bench configurations missing: {names:?}");
    let out_dir =
        std::env::temp_dir().join(format!("tokengate-bench-validate-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    for name in &names {
        let text = std::fs::read_to_string(dir.join(format!("{name}.yaml"))).unwrap();
        let mut vars = Vec::new();
        let mut rest = text.as_str();
        while let Some(start) = rest.find("${") {
            let end = rest[start..].find('}').expect("a closed placeholder") + start;
            let var = &rest[start + 2..end];
            let value = dummy(var, &wasm, &module)
                .unwrap_or_else(|| panic!("{name}.yaml: no dummy value for ${{{var}}}: add one"));
            vars.push((var.to_string(), value));
            rest = &rest[end..];
        }
        let vars: Vec<(&str, String)> = vars.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let path = out_dir.join(format!("{name}.yaml"));
        std::fs::write(&path, render(name, &vars)).unwrap();
        let base_id = 40_000 + u32::from(free_ports(1)[0]) % 20_000;
        let out = Command::new(&bins.envoy)
            .args([
                "--mode",
                "validate",
                "--disable-hot-restart",
                "-l",
                "warning",
                "-c",
            ])
            .arg(&path)
            .args(["--base-id", &base_id.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bench/envoy/{name}.yaml does not load:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&out_dir);
}
