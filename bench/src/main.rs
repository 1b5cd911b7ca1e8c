//! `tokengate-bench [--quick] [section ...]`: runs the benchmark sections (all by default:
//! variants, waterfall, accuracy and propagation for each flavor, scale, fleet, fleet
//! accuracy, scopes and quotas; `report`
//! only rewrites the results from the figures of earlier runs), keeps each one's figures in
//! `target/bench/<section>.json`, and writes the tables of `docs/benchmarks.md` and the
//! chart `docs/benchmarks.svg` from every section's latest figures.

use std::time::Instant;
use tokengate_bench::{
    accuracy, fleet, fleet_accuracy, out_dir, propagation, report, scale, scopes_quotas, variants,
    waterfall, Depth,
};
use tokengate_e2e::Flavor;

const SECTIONS: [&str; 10] = [
    "variants",
    "waterfall",
    "accuracy",
    "accuracy-native",
    "propagation",
    "propagation-native",
    "scale",
    "fleet",
    "fleet-accuracy",
    "scopes-quotas",
];

fn main() {
    // Every process the bench starts is stopped by a destructor, which an aborting panic
    // skips: `make bench` builds this with the unwinding `bench-driver` profile.
    #[cfg(panic = "abort")]
    eprintln!(
        "warning: built with panic = \"abort\": a failing section would leave its Envoys and \
         control planes running; build with --profile bench-driver (make bench does)"
    );
    let mut depth = Depth::Full;
    let mut chosen = Vec::new();
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--quick" => depth = Depth::Quick,
            "-h" | "--help" => {
                println!(
                    "usage: tokengate-bench [--quick] [{}]...",
                    SECTIONS.join("|")
                );
                return;
            }
            s if SECTIONS.contains(&s) => chosen.push(s.to_string()),
            // Only the write-up, from the figures already in target/bench/.
            "report" => {
                report::write(depth);
                return;
            }
            other => {
                eprintln!(
                    "unknown argument `{other}`; sections: {}",
                    SECTIONS.join(", ")
                );
                std::process::exit(2);
            }
        }
    }
    if chosen.is_empty() {
        chosen = SECTIONS.iter().map(|s| s.to_string()).collect();
    }
    for section in &chosen {
        let started = Instant::now();
        eprintln!("== {section} ({depth:?}) ==");
        let figures = match section.as_str() {
            "variants" => variants::run(depth),
            "waterfall" => waterfall::run(depth),
            "accuracy" => accuracy::run(depth, Flavor::Wasm),
            "accuracy-native" => accuracy::run(depth, Flavor::Native),
            "propagation" => propagation::run(depth, Flavor::Wasm),
            "propagation-native" => propagation::run(depth, Flavor::Native),
            "scale" => scale::run(depth),
            "fleet-accuracy" => fleet_accuracy::run(depth),
            "scopes-quotas" => scopes_quotas::run(depth),
            _ => fleet::run(depth),
        };
        let path = out_dir().join(format!("{section}.json"));
        let text = serde_json::to_string_pretty(&figures).expect("figures are JSON");
        std::fs::write(&path, text).expect("write the figures");
        eprintln!(
            "== {section}: {:?}, figures in {}",
            started.elapsed(),
            path.display()
        );
    }
    report::write(depth);
}
