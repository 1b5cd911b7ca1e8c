//! The native module as a shared object: it binds every Envoy callback when it is loaded, so
//! an Envoy whose ABI lacks one refuses it at load with Envoy's own error instead of crashing
//! on the first request that would have called it.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;
use tokengate_e2e::{free_ports, random_hex, render_envoy_template, Binaries, READY_TIMEOUT};

/// A callback the module calls on the request path (every refusal).
const CALLBACK: &[u8] = b"envoy_dynamic_module_callback_http_send_response";
/// The same name with its last byte changed: a symbol no Envoy exports.
const MISSING: &[u8] = b"envoy_dynamic_module_callback_http_send_responsX";

fn rendered(module: &Path, ports: &[u16]) -> String {
    render_envoy_template(
        "envoy/envoy-native.yaml",
        &[
            ("LISTEN_ADDRESS", "127.0.0.1".into()),
            ("LISTEN_PORT", ports[0].to_string()),
            ("ADMIN_ADDRESS", "127.0.0.1".into()),
            ("ADMIN_PORT", ports[1].to_string()),
            ("UPSTREAM_PORT", ports[2].to_string()),
            ("CONTROL_PLANE_PORT", ports[3].to_string()),
            ("UPSTREAM_HOST", "127.0.0.1".into()),
            ("CONTROL_PLANE_HOST", "127.0.0.1".into()),
            ("MODULE_PATH", module.display().to_string()),
            ("SYNC_TOKEN", "unused-sync-credential".into()),
        ],
    )
}

fn run_envoy(bins: &Binaries, config: &Path, args: &[&str], base_id: u16) -> Output {
    Command::new(&bins.envoy)
        .args(args)
        .arg("-c")
        .arg(config)
        .args(["--disable-hot-restart", "--base-id", &base_id.to_string()])
        .args(["--concurrency", "1"])
        .output()
        .expect("run envoy")
}

/// `module` with the callback's name changed wherever the file holds it.
fn without_callback(module: &[u8]) -> Vec<u8> {
    let mut out = module.to_vec();
    let mut found = 0;
    let mut i = 0;
    while let Some(at) = out[i..].windows(CALLBACK.len()).position(|w| w == CALLBACK) {
        let at = i + at;
        out[at..at + CALLBACK.len()].copy_from_slice(MISSING);
        found += 1;
        i = at + CALLBACK.len();
    }
    assert!(found > 0, "the module does not name {CALLBACK:?}");
    out
}

#[test]
fn a_module_needing_a_callback_envoy_lacks_is_refused_at_load() {
    let bins = Binaries::locate();
    let module = std::fs::read(bins.module()).expect("read the module");
    let dir = std::env::temp_dir().join(format!("tokengate-e2e-abi-{}", random_hex(6)));
    std::fs::create_dir_all(&dir).unwrap();
    let broken = dir.join("libtokengate_native.so");
    std::fs::write(&broken, without_callback(&module)).unwrap();
    let ports = free_ports(4);
    let config = dir.join("envoy.yaml");
    std::fs::write(&config, rendered(&broken, &ports)).unwrap();

    // Started for real: Envoy stops at configuration with its dlopen error. A module bound
    // lazily would load, serve, and take Envoy down on the first refusal instead.
    let started = Instant::now();
    let out = run_envoy(&bins, &config, &[], ports[1]);
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "Envoy started:\n{log}");
    assert!(
        started.elapsed() < READY_TIMEOUT,
        "Envoy did not stop at configuration"
    );
    assert!(log.contains("Failed to load dynamic module"), "{log}");
    assert!(
        log.contains("undefined symbol: envoy_dynamic_module_callback_http_send_responsX"),
        "{log}"
    );
    // `--mode validate` says the same.
    let out = run_envoy(&bins, &config, &["--mode", "validate"], ports[2]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("undefined symbol")
            || String::from_utf8_lossy(&out.stdout).contains("undefined symbol")
    );

    // The unmodified module loads with the same configuration.
    std::fs::write(&config, rendered(&bins.module(), &ports)).unwrap();
    let out = run_envoy(&bins, &config, &["--mode", "validate"], ports[3]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The dynamic section of an ELF64 little-endian shared object, as (tag, value) pairs.
fn dynamic_entries(elf: &[u8]) -> Vec<(u64, u64)> {
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!((elf[4], elf[5]), (2, 1), "ELF64, little-endian");
    let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36), u16_at(0x38));
    const PT_DYNAMIC: u32 = 2;
    let dynamic = (0..phnum)
        .map(|i| phoff + i * phentsize)
        .find(|&ph| u32_at(ph) == PT_DYNAMIC)
        .expect("a PT_DYNAMIC segment");
    let (offset, size) = (u64_at(dynamic + 8) as usize, u64_at(dynamic + 32) as usize);
    (0..size / 16)
        .map(|i| (u64_at(offset + i * 16), u64_at(offset + i * 16 + 8)))
        .take_while(|(tag, _)| *tag != 0)
        .collect()
}

#[test]
fn the_module_is_linked_for_immediate_binding() {
    let module = std::fs::read(Binaries::locate().module()).expect("read the module");
    let entries = dynamic_entries(&module);
    const DT_FLAGS: u64 = 30;
    const DF_BIND_NOW: u64 = 0x8;
    const DT_FLAGS_1: u64 = 0x6fff_fffb;
    const DF_1_NOW: u64 = 0x1;
    let bind_now = entries.iter().any(|(tag, value)| {
        (*tag == DT_FLAGS && value & DF_BIND_NOW != 0)
            || (*tag == DT_FLAGS_1 && value & DF_1_NOW != 0)
    });
    assert!(
        bind_now,
        "no BIND_NOW in the module's dynamic section: {entries:x?}"
    );
}
