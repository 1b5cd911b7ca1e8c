//! The Prometheus names that the README documents for the filter's stats are the ones a
//! real Envoy serves at `/stats/prometheus`, with the documented types, and every
//! `tokengate_` metric Envoy serves is documented.

use std::collections::BTreeMap;
use tokengate_e2e::{flavored, workspace_root, Flavor, Stack};

/// `(prometheus name, type)` from the README's "Envoy stats" table.
fn documented() -> BTreeMap<String, String> {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("README.md");
    let section = readme
        .split("### Envoy stats")
        .nth(1)
        .expect("README has an \"Envoy stats\" section");
    let mut names = BTreeMap::new();
    for row in section.lines().take_while(|l| !l.starts_with("## ")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        // | `/stats` | `/stats/prometheus` | type | what |
        if cells.len() == 6 && cells[1].starts_with("`wasmcustom.") {
            names.insert(cells[2].trim_matches('`').to_string(), cells[3].to_string());
        }
    }
    names
}

flavored!(the_readme_names_the_stats_envoy_serves_to_prometheus);
fn the_readme_names_the_stats_envoy_serves_to_prometheus(flavor: Flavor) {
    let docs = documented();
    assert!(docs.len() >= 14, "the README's stats table: {docs:?}");
    // The native module's names carry Envoy's prefix and namespace for modules, as the
    // README says below the table.
    let prefix = match flavor {
        Flavor::Wasm => "",
        Flavor::Native => "envoy_dynamicmodulescustom_",
    };
    let docs: BTreeMap<String, String> = docs
        .into_iter()
        .map(|(name, kind)| (format!("{prefix}{name}"), kind))
        .collect();
    let stack = Stack::start_flavor(flavor);
    let r = stack.envoy_admin("/stats/prometheus");
    assert_eq!(r.status, 200);
    let served: BTreeMap<String, String> = r
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .filter(|(name, _)| name.starts_with(&format!("{prefix}tokengate_")))
        .map(|(name, kind)| (name.to_string(), kind.to_string()))
        .collect();
    assert_eq!(
        docs, served,
        "README (left) and Envoy's /stats/prometheus (right) disagree"
    );
}
