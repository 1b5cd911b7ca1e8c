//! The picture of the variants side by side: an SVG of two bar panels, throughput and the
//! Envoy CPU each variant adds per request. Plain SVG text, so that the chart needs no
//! plotting library and renders wherever the markdown does.

/// One bar group: the variant's label, its requests per second, and the CPU microseconds
/// per request it adds over no check.
pub type Bar = (String, f64, f64);

const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 360.0;
const PANEL: f64 = 380.0;
const TOP: f64 = 60.0;
const BOTTOM: f64 = 300.0;
const COLOURS: [&str; 6] = [
    "#9aa5b1", "#2f6fdf", "#5b8def", "#e08a2c", "#b5485d", "#4c9a6a",
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A rounded-up axis maximum: 1, 2 or 5 times a power of ten.
fn nice_max(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    for step in [1.0, 2.0, 5.0, 10.0] {
        if v <= step * magnitude {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

fn panel(out: &mut String, x0: f64, title: &str, unit: &str, values: &[(String, f64)]) {
    let max = nice_max(values.iter().map(|(_, v)| *v).fold(0.0, f64::max));
    let plot_h = BOTTOM - TOP;
    out.push_str(&format!(
        r#"<text x="{:.1}" y="{:.1}" font-size="15" font-weight="600">{}</text>"#,
        x0,
        TOP - 28.0,
        escape(title)
    ));
    for i in 0..=4 {
        let v = max * f64::from(i) / 4.0;
        let y = BOTTOM - plot_h * f64::from(i) / 4.0;
        out.push_str(&format!(
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e3e7eb"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end" fill="#52606d">{}</text>"##,
            x0 + 50.0,
            x0 + PANEL,
            x0 + 45.0,
            y + 4.0,
            format_value(v)
        ));
    }
    let slot = (PANEL - 60.0) / values.len().max(1) as f64;
    for (i, (label, v)) in values.iter().enumerate() {
        let h = if max > 0.0 { plot_h * v / max } else { 0.0 };
        let x = x0 + 60.0 + slot * i as f64 + slot * 0.15;
        let w = slot * 0.7;
        out.push_str(&format!(
            r#"<rect x="{x:.1}" y="{:.1}" width="{w:.1}" height="{h:.1}" fill="{}"/>"#,
            BOTTOM - h,
            COLOURS[i % COLOURS.len()]
        ));
        out.push_str(&format!(
            r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"#,
            x + w / 2.0,
            BOTTOM - h - 5.0,
            format_value(*v)
        ));
        out.push_str(&format!(
            r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"#,
            x + w / 2.0,
            BOTTOM + 16.0,
            escape(label)
        ));
    }
    out.push_str(&format!(
        r##"<text x="{:.1}" y="{:.1}" font-size="11" fill="#52606d">{}</text>"##,
        x0 + 50.0,
        BOTTOM + 36.0,
        escape(unit)
    ));
}

fn format_value(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v >= 10_000.0 {
        let k = format!("{:.1}", v / 1000.0);
        format!("{}k", k.trim_end_matches(".0"))
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The chart as an SVG document.
pub fn svg(title: &str, bars: &[Bar]) -> String {
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/><text x="20" y="24" font-size="17" font-weight="700">{}</text>"#,
        escape(title)
    );
    let rps: Vec<(String, f64)> = bars.iter().map(|(l, r, _)| (l.clone(), *r)).collect();
    let cpu: Vec<(String, f64)> = bars.iter().map(|(l, _, c)| (l.clone(), *c)).collect();
    panel(
        &mut out,
        20.0,
        "Throughput (closed loop)",
        "requests per second, higher is better",
        &rps,
    );
    panel(
        &mut out,
        40.0 + PANEL + 20.0,
        "Envoy CPU added per request",
        "microseconds over no check, lower is better",
        &cpu,
    );
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_maxima_are_round_and_cover_the_data() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(7.0), 10.0);
        assert_eq!(nice_max(12_345.0), 20_000.0);
        assert_eq!(nice_max(3.0), 5.0);
        assert_eq!(nice_max(100.0), 100.0);
    }

    #[test]
    fn the_chart_has_a_bar_and_a_label_per_variant_in_each_panel() {
        let bars = vec![
            ("A <none>".to_string(), 20_000.0, 0.0),
            ("B".to_string(), 15_000.0, 12.5),
        ];
        let s = svg("t", &bars);
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert_eq!(s.matches("<rect x=").count(), 4);
        assert!(s.contains("A &lt;none&gt;"));
        assert!(s.contains(">12.5<"));
    }
}
