//! The results as markdown: every section's tables from its latest figures, with the
//! machine and the commands. A full run (`make bench`) writes them into
//! `docs/benchmarks.md` between the result markers and the chart beside it; a quick run
//! (`make bench-quick`) only into `target/bench/`, since a minute's figures are not the ones
//! to publish.

use crate::{
    accuracy, chart, fleet, fleet_accuracy, out_dir, propagation, scale, scopes_quotas, variants,
    waterfall, Depth,
};
use serde_json::Value;
use std::fs;
use std::process::Command;
use tokengate_e2e::{workspace_root, Binaries};

const BEGIN: &str = "<!-- bench:results:begin (written by make bench; edit outside) -->";
const END: &str = "<!-- bench:results:end -->";

/// A command's trimmed standard output, or "" if it cannot run.
pub(crate) fn command_output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// A target's verdict as the results tables write it.
pub(crate) fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = command_output("nproc", &[]);
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map(|kib| format!("{:.0} GiB", kib as f64 / 1024.0 / 1024.0))
        .unwrap_or_default();
    let kernel = command_output("uname", &["-sr"]);
    let envoy = command_output(
        &Binaries::locate().envoy.display().to_string(),
        &["--version"],
    );
    let envoy = envoy
        .split("version: ")
        .nth(1)
        .unwrap_or(&envoy)
        .to_string();
    let oha = command_output(
        &crate::load::oha_path().display().to_string(),
        &["--version"],
    );
    let commit = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    format!(
        "Machine: {model}, {cores} cores, {mem}, {kernel}. Envoy {envoy}. Load: {oha}. \
         Commit {commit}, {date}.\n"
    )
}

fn load(section: &str) -> Option<Value> {
    let text = fs::read_to_string(out_dir().join(format!("{section}.json"))).ok()?;
    serde_json::from_str(&text).ok()
}

/// The chart of the fleet's admitted rate during a load shift, if that section ran.
pub fn fleet_shift_chart() -> Option<String> {
    fleet_accuracy::shift_chart(&load("fleet-accuracy")?)
}

/// The markdown of every section that has figures, and the chart's SVG if the variants ran.
pub fn render() -> (String, Option<String>) {
    let mut md = String::new();
    md.push_str(&machine());
    md.push('\n');
    let mut svg = None;
    if let Some(v) = load("variants") {
        md.push_str(&variants::markdown(&v));
        md.push('\n');
        let bars = variants::chart_data(&v);
        if !bars.is_empty() {
            svg = Some(chart::svg(
                "tokengate against the alternatives (one Envoy worker each)",
                &bars,
            ));
            md.push_str("![the variants side by side](benchmarks.svg)\n\n");
        }
    }
    if let Some(v) = load("waterfall") {
        md.push_str(&waterfall::markdown(&v));
        md.push('\n');
    }
    for section in ["accuracy", "accuracy-native"] {
        if let Some(v) = load(section) {
            md.push_str(&accuracy::markdown(&v));
            md.push('\n');
        }
    }
    for section in ["propagation", "propagation-native"] {
        if let Some(v) = load(section) {
            md.push_str(&propagation::markdown(&v));
            md.push('\n');
        }
    }
    if let Some(v) = load("scale") {
        md.push_str(&scale::markdown(&v));
        md.push('\n');
    }
    if let Some(v) = load("fleet") {
        md.push_str(&fleet::markdown(&v));
        md.push('\n');
    }
    if let Some(v) = load("fleet-accuracy") {
        md.push_str(&fleet_accuracy::markdown(&v));
        md.push('\n');
    }
    if let Some(v) = load("scopes-quotas") {
        md.push_str(&scopes_quotas::markdown(&v));
        md.push('\n');
    }
    (md, svg)
}

/// Replaces what lies between the markers of `doc` with `results` (appending the markers
/// when the document has none).
pub fn splice(doc: &str, results: &str) -> String {
    match (doc.find(BEGIN), doc.find(END)) {
        (Some(b), Some(e)) if b < e => format!("{}{BEGIN}\n{results}{}", &doc[..b], &doc[e..]),
        _ => format!("{doc}\n{BEGIN}\n{results}{END}\n"),
    }
}

pub fn write(depth: Depth) {
    let (md, svg) = render();
    let out = out_dir();
    fs::write(out.join("results.md"), &md).expect("write target/bench/results.md");
    if let Some(svg) = &svg {
        fs::write(out.join("benchmarks.svg"), svg).expect("write the chart");
    }
    let shift = fleet_shift_chart();
    if let Some(svg) = &shift {
        fs::write(out.join("benchmarks-fleet-shift.svg"), svg).expect("write the shift chart");
    }
    eprintln!("results: {}", out.join("results.md").display());
    if depth == Depth::Full {
        let docs = workspace_root().join("docs");
        let path = docs.join("benchmarks.md");
        let doc = fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".into());
        fs::write(&path, splice(&doc, &md)).expect("write docs/benchmarks.md");
        if let Some(svg) = svg {
            fs::write(docs.join("benchmarks.svg"), svg).expect("write docs/benchmarks.svg");
        }
        if let Some(svg) = shift {
            fs::write(docs.join("benchmarks-fleet-shift.svg"), svg)
                .expect("write docs/benchmarks-fleet-shift.svg");
        }
        eprintln!("updated {}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_replace_only_what_lies_between_the_markers() {
        let doc = format!("# B\nintro\n{BEGIN}\nold\n{END}\noutro\n");
        let out = splice(&doc, "new\n");
        assert_eq!(out, format!("# B\nintro\n{BEGIN}\nnew\n{END}\noutro\n"));
        assert_eq!(splice(&out, "new\n"), out, "idempotent");
        let fresh = splice("# B\n", "x\n");
        assert!(
            fresh.contains(BEGIN) && fresh.contains("x\n") && fresh.ends_with(&format!("{END}\n"))
        );
    }
}
