//! Hand-written SVG plot for `s2attn-bench --plot`: median time (log axis) against sequence length (log2
//! axis), one line per implementation (and per configuration when several are in the grid), with a
//! legend. Dense implementations are dashed.

use crate::report::Row;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

const PLOT_W: f64 = 600.0;
const H: f64 = 540.0;
const LEFT: f64 = 70.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 10] =
    ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn seq_label(s: u32) -> String {
    if s >= 1024 && s % 1024 == 0 {
        format!("{}k", s / 1024)
    } else {
        s.to_string()
    }
}

/// A line: its legend label, whether it is dense, and (seq, ms) points sorted by seq.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Dashed when dense.
    pub dense: bool,
    /// Points.
    pub points: Vec<(u32, f64)>,
}

/// Groups measured rows into lines. Configuration fields that vary across rows (other than seq) go into the
/// label; dense implementations ignore the sparsity fields, so their repeated rows collapse into one line.
pub fn series(rows: &[Row]) -> Vec<Series> {
    let rows: Vec<&Row> = rows.iter().filter(|r| r.measured()).collect();
    type F = (&'static str, fn(&Row) -> String, bool);
    let fields: [F; 10] = [
        ("", |r| r.mode.clone(), false),
        ("b", |r| r.batch.to_string(), false),
        ("h", |r| format!("{}/{}", r.heads, r.kv_heads), false),
        ("d", |r| r.head_dim.to_string(), false),
        ("blk", |r| r.block.to_string(), false),
        ("local", |r| r.local.to_string(), true),
        ("vs", |r| r.vert_stride.to_string(), true),
        ("off", |r| r.offset.to_string(), true),
        ("", |r| r.dtype.clone(), false),
        ("", |r| if r.causal { "causal".into() } else { "bidir".into() }, false),
    ];
    let varies = |f: &fn(&Row) -> String| rows.iter().map(|r| f(r)).collect::<BTreeSet<_>>().len() > 1;
    let varying: Vec<&F> = fields.iter().filter(|(_, f, _)| varies(f)).collect();
    let devices = rows.iter().map(|r| r.device.as_str()).collect::<BTreeSet<_>>().len();
    let mut lines: BTreeMap<String, Series> = BTreeMap::new();
    for r in rows {
        let dense = r.is_dense();
        let mut label = r.implementation.clone();
        if devices > 1 {
            // "llvmpipe (LLVM 15.0.6, 256 bits)" -> "llvmpipe"
            let _ = write!(label, " @ {}", r.device.split(" (").next().unwrap_or_default());
        }
        for (name, f, sparse_only) in &varying {
            if !(dense && *sparse_only) {
                let _ = write!(label, " {name}{}", f(r));
            }
        }
        let s = lines.entry(label.clone()).or_insert(Series { label, dense, points: Vec::new() });
        if !s.points.iter().any(|(seq, _)| *seq == r.seq) {
            s.points.push((r.seq, r.ms.unwrap_or(f64::NAN)));
        }
    }
    let mut out: Vec<Series> = lines.into_values().collect();
    for s in &mut out {
        s.points.sort_by_key(|p| p.0);
    }
    // Ours first, then peers; sparse before dense.
    out.sort_by_key(|s| (!s.label.starts_with("s2attn"), s.dense, s.label.clone()));
    out
}

/// The SVG document for `rows` (an empty plot with a message when nothing was measured).
pub fn svg(rows: &[Row], title: &str) -> String {
    let lines = series(rows);
    // Legend width from the longest label (about 7 px a character at 12 px).
    let longest = lines.iter().map(|s| s.label.chars().count()).max().unwrap_or(0) as f64;
    let right = (longest * 7.0 + 70.0).max(200.0);
    let w = LEFT + PLOT_W + right;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{H}" viewBox="0 0 {w} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="{w}" height="{H}" fill="white"/>"#);
    let _ = writeln!(out, r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#, w / 2.0, esc(title));
    let points: Vec<(u32, f64)> = lines.iter().flat_map(|s| s.points.iter().copied()).collect();
    if points.is_empty() {
        let _ = writeln!(out, r#"<text x="{}" y="{}" text-anchor="middle">no measurements</text>"#, w / 2.0, H / 2.0);
        out.push_str("</svg>\n");
        return out;
    }
    let (pw, ph) = (PLOT_W, H - TOP - BOTTOM);
    let seqs: BTreeSet<u32> = points.iter().map(|p| p.0).collect();
    let (smin, smax) = (*seqs.first().unwrap_or(&1) as f64, *seqs.last().unwrap_or(&1) as f64);
    let (mut x0, mut x1) = (smin.log2(), smax.log2());
    if x1 - x0 < 1e-9 {
        x0 -= 0.5;
        x1 += 0.5;
    }
    let ms: Vec<f64> = points.iter().map(|p| p.1).filter(|m| *m > 0.0).collect();
    let lo = ms.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ms.iter().copied().fold(0.0, f64::max);
    let (y0, mut y1) = (lo.log10().floor(), hi.log10().ceil());
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let px = |seq: f64| LEFT + (seq.log2() - x0) / (x1 - x0) * pw;
    let py = |ms: f64| TOP + ph - (ms.log10() - y0) / (y1 - y0) * ph;

    // Grid: decades (labelled) and 2x/5x minor lines; one vertical line per measured length.
    for e in (y0 as i32)..=(y1 as i32) {
        let base = 10f64.powi(e);
        let y = py(base);
        let _ = writeln!(out, r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ccc"/>"##, LEFT + pw);
        let label = if base >= 1.0 { format!("{base:.0}") } else { format!("{base}") };
        let _ = writeln!(out, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"#, LEFT - 6.0, y + 4.0);
        for m in [2.0, 5.0] {
            if (e as f64) < y1 {
                let y = py(base * m);
                let _ = writeln!(
                    out,
                    r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#eee"/>"##,
                    LEFT + pw
                );
            }
        }
    }
    for &s in &seqs {
        let x = px(s as f64);
        let _ = writeln!(out, r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#eee"/>"##, TOP + ph);
        let _ = writeln!(
            out,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            TOP + ph + 16.0,
            seq_label(s)
        );
    }
    let _ =
        writeln!(out, r##"<rect x="{LEFT}" y="{TOP}" width="{pw:.1}" height="{ph:.1}" fill="none" stroke="#333"/>"##);
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">sequence length (tokens, log scale)</text>"#,
        LEFT + pw / 2.0,
        H - 10.0
    );
    let _ = writeln!(
        out,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">median time (ms, log scale)</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0
    );

    // Lines and legend.
    for (i, s) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let dash = if s.dense { r#" stroke-dasharray="6 4""# } else { "" };
        let pts: Vec<String> = s
            .points
            .iter()
            .filter(|p| p.1 > 0.0)
            .map(|&(seq, ms)| format!("{:.1},{:.1}", px(seq as f64), py(ms)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
            pts.join(" ")
        );
        for p in &pts {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(out, r#"<circle cx="{x}" cy="{y}" r="3" fill="{color}"/>"#);
        }
        let ly = TOP + 10.0 + i as f64 * 18.0;
        let lx = LEFT + PLOT_W + 16.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"{dash}/>"#,
            lx + 24.0
        );
        let _ = writeln!(out, r#"<text x="{:.1}" y="{:.1}">{}</text>"#, lx + 30.0, ly + 4.0, esc(&s.label));
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(imp: &str, seq: u32, vs: u32, ms: f64) -> Row {
        Row {
            implementation: imp.into(),
            seq,
            heads: 32,
            kv_heads: 32,
            head_dim: 128,
            block: 64,
            local: 16,
            vert_stride: vs,
            dtype: "fp16".into(),
            ms: Some(ms),
            device: "H100".into(),
            ..Row::default()
        }
    }

    #[test]
    fn dense_lines_collapse_and_sparse_lines_split_by_stride() {
        let rows = vec![
            row("s2attn/cuda/mma", 4096, 16, 1.0),
            row("s2attn/cuda/mma", 8192, 16, 2.0),
            row("s2attn/cuda/mma", 4096, 64, 0.5),
            row("s2attn-dense/cuda/mma", 4096, 16, 3.0),
            row("s2attn-dense/cuda/mma", 4096, 64, 3.0),
            row("torch-flash", 8192, 16, 4.0),
        ];
        let s = series(&rows);
        let labels: Vec<&str> = s.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(
            labels,
            vec!["s2attn/cuda/mma vs16", "s2attn/cuda/mma vs64", "s2attn-dense/cuda/mma", "torch-flash"]
        );
        assert_eq!(s[0].points, vec![(4096, 1.0), (8192, 2.0)]);
        assert_eq!(s[2].points.len(), 1);
        assert!(s[2].dense && s[3].dense && !s[0].dense);
    }

    #[test]
    fn svg_has_a_line_and_legend_entry_per_series() {
        let rows = vec![row("s2attn/vulkan/portable", 4096, 16, 1.0), row("s2attn/vulkan/portable", 131072, 16, 900.0)];
        let doc = svg(&rows, "t <1>");
        assert!(doc.starts_with("<svg") && doc.trim_end().ends_with("</svg>"));
        assert_eq!(doc.matches("<polyline").count(), 1);
        assert!(doc.contains(">128k<") && doc.contains(">4k<") && doc.contains(">1000<"));
        assert!(doc.contains("t &lt;1&gt;"));
        assert!(svg(&[], "empty").contains("no measurements"));
    }
}
