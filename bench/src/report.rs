//! Results of `s2attn-bench`: the JSON-lines row (the peer script's fields plus ours), the work a row does
//! (FLOPs on active blocks, compulsory bytes, per mode), reading peer files, and the terminal / markdown
//! tables with the sparse-over-dense speed-up and the ratio of each peer's time to ours.

use crate::grid::Precision;
use s2attn::{Layout, S2Config};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

/// One measurement: a JSON line. The first fields are `torch_peers.py`'s; `offset` is its
/// `head_sliding_offset`; the rest are ours (absent from peer rows).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Row {
    /// `s2attn/<backend>/<variant>`, `s2attn-dense/<backend>/<variant>`, or a peer (`torch-flash`, ...).
    #[serde(rename = "impl")]
    pub implementation: String,
    /// `fwd`, `fwd+bwd` or `decode`.
    pub mode: String,
    /// Sequences per call.
    pub batch: u32,
    /// Tokens per sequence.
    pub seq: u32,
    /// Query heads.
    pub heads: u32,
    /// KV heads.
    pub kv_heads: u32,
    /// Features per head.
    pub head_dim: u32,
    /// Tokens per block.
    pub block: u32,
    /// Local window in blocks.
    pub local: u32,
    /// Vertical stride in blocks.
    pub vert_stride: u32,
    /// Head sliding offset of the stripes.
    pub offset: u32,
    /// `fp32`, `fp16` or `bf16`.
    pub dtype: String,
    /// Causal attention.
    pub causal: bool,
    /// Median time in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ms: Option<f64>,
    /// Fastest sample.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_ms: Option<f64>,
    /// Slowest sample.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_ms: Option<f64>,
    /// Active blocks over the causal triangle (square when bidirectional) of what ran: 1 for dense runs.
    /// Decode: the fraction of the history's KV blocks the last query row reads, averaged over heads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub density: Option<f64>,
    /// Device name.
    pub device: String,
    /// Effective TFLOP/s on active blocks: `4 * head_dim * active query-key pairs * batch / time` for the
    /// forward and decode, 3.5 times that for `fwd+bwd` (FlashAttention's count: backward = 2.5 forwards).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tflops: Option<f64>,
    /// Achieved GB/s on compulsory traffic (see [`work`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gbps: Option<f64>,
    /// The larger of the relative L2 errors of O and LSE against the f64 oracle at `check_seq`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rel_err: Option<f64>,
    /// Sequence length the oracle check ran at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check_seq: Option<u32>,
    /// wgpu adapter or CUDA device name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// `vulkan`, `gl`, `metal`, `dx12`, `cuda`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// `gpu` (timestamps or CUDA events) or `wall` (wall clock around a waited submit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timer: Option<String>,
    /// Timed passes behind the median.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iters: Option<u32>,
    /// `fwd+bwd` with GPU timestamps: the median of the forward pass alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fwd_ms: Option<f64>,
    /// `fwd+bwd` with GPU timestamps: the median of the backward passes (dQ, then dK/dV) alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bwd_ms: Option<f64>,
    /// Input sets the timed passes rotated through (1: the same inputs every pass).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_sets: Option<u32>,
    /// Decode: bytes of KV history the cache holds (resident pages, all sequences).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_bytes: Option<u64>,
    /// Decode: bytes a dense KV cache of the same histories would hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_dense_bytes: Option<u64>,
    /// Why nothing was measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Default for Row {
    fn default() -> Self {
        Self {
            implementation: String::new(),
            mode: "fwd".into(),
            batch: 1,
            seq: 0,
            heads: 0,
            kv_heads: 0,
            head_dim: 0,
            block: 0,
            local: 0,
            vert_stride: 0,
            offset: 0,
            dtype: String::new(),
            causal: true,
            ms: None,
            min_ms: None,
            max_ms: None,
            density: None,
            device: String::new(),
            tflops: None,
            gbps: None,
            max_rel_err: None,
            check_seq: None,
            adapter: None,
            backend: None,
            timer: None,
            iters: None,
            fwd_ms: None,
            bwd_ms: None,
            input_sets: None,
            kv_bytes: None,
            kv_dense_bytes: None,
            error: None,
        }
    }
}

/// The fields two rows must share to be compared (everything but the implementation and device).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    mode: String,
    batch: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    block: u32,
    local: u32,
    vert_stride: u32,
    offset: u32,
    dtype: String,
    causal: bool,
    seq: u32,
}

impl Row {
    /// The comparison key.
    pub fn key(&self) -> Key {
        Key {
            mode: self.mode.clone(),
            batch: self.batch,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            block: self.block,
            local: self.local,
            vert_stride: self.vert_stride,
            offset: self.offset,
            dtype: self.dtype.clone(),
            causal: self.causal,
            seq: self.seq,
        }
    }
    /// The comparison key of a dense implementation's row, whose sparsity fields say nothing about what
    /// it computed: they are zeroed, so one dense peer row serves every sparse setting of its shape.
    pub fn dense_key(&self) -> Key {
        Key { local: 0, vert_stride: 0, offset: 0, ..self.key() }
    }
    /// Whether this row is one of ours (sparse or dense).
    pub fn is_ours(&self) -> bool {
        self.implementation.starts_with("s2attn")
    }
    /// Whether the implementation computes dense attention (ours or a peer's).
    pub fn is_dense(&self) -> bool {
        is_dense_impl(&self.implementation)
    }
    /// Whether the row holds a time.
    pub fn measured(&self) -> bool {
        self.error.is_none() && self.ms.is_some_and(|m| m.is_finite() && m > 0.0)
    }
    /// One JSON line (no newline).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"serialising a row: {e}\"}}"))
    }
}

/// Implementations known to compute dense attention: ours, PyTorch's SDPA backends, and llama.cpp's flash
/// attention (`llama.cpp-vulkan` and its forced paths, `llama_cpp_json.py`).
pub fn is_dense_impl(name: &str) -> bool {
    name.starts_with("s2attn-dense")
        || name.starts_with("llama.cpp")
        || matches!(name, "torch-flash" | "torch-cudnn" | "torch-sdpa" | "torch-math")
}

/// The layout a row ran: dense, or S2 with the row's parameters. Bidirectional rows use a window of
/// `local` blocks on each side.
pub fn row_layout(r: &Row, dense: bool) -> s2attn::Result<Layout> {
    if dense {
        return Layout::dense(r.heads, r.kv_heads, r.block, r.causal);
    }
    let mut c = S2Config::new(r.heads, r.block, r.local, r.vert_stride).kv_heads(r.kv_heads).offset(r.offset);
    if !r.causal {
        c = c.bidirectional(r.local, r.local);
    }
    Layout::s2(c)
}

/// What one call does: FLOPs on active blocks, compulsory bytes, and the bytes of distinct tensors it
/// touches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Work {
    /// `fwd`: `4 * head_dim * active query-key pairs * batch`; `fwd+bwd`: 3.5 times that; `decode`: the
    /// forward's count for the last query row of each sequence.
    pub flops: f64,
    /// Compulsory traffic. `fwd`: Q, K, V read and O written in the storage type, the f32 LSE written.
    /// `fwd+bwd`: that plus the backward's reads of Q, K, V, O, dO, LSE and writes of dQ, dK, dV. `decode`:
    /// the K and V blocks some query head of each KV head reads, once per KV head, plus Q, O and LSE.
    pub bytes: f64,
    /// Bytes of the distinct tensors one call touches (what input-set rotation must exceed the cache
    /// with): the forward's Q, K, V, O, LSE, plus dO, dQ, dK, dV for `fwd+bwd`; `bytes` for decode.
    pub footprint: f64,
    /// Active blocks over possible blocks (decode: KV blocks the last row reads over the history's).
    pub density: f64,
}

/// Bytes per element of the row's storage type.
fn elem_bytes(r: &Row) -> f64 {
    Precision::parse(&r.dtype).map_or(2.0, |p| p.dtype().size() as f64)
}

/// The work of `layout` at the row's sizes and mode.
pub fn work(layout: &Layout, r: &Row) -> Work {
    if r.mode == "decode" {
        return decode_work(layout, r);
    }
    let pairs = layout.active_pairs(r.seq) as f64 * r.batch as f64;
    let elem = elem_bytes(r);
    let tokens = r.batch as f64 * r.seq as f64;
    let qo = 2.0 * tokens * r.heads as f64 * r.head_dim as f64 * elem;
    let kv = 2.0 * tokens * r.kv_heads as f64 * r.head_dim as f64 * elem;
    let lse = tokens * r.heads as f64 * 4.0;
    let fwd = Work {
        flops: 4.0 * r.head_dim as f64 * pairs,
        bytes: qo + kv + lse,
        footprint: qo + kv + lse,
        density: layout.density(r.seq),
    };
    if r.mode != "fwd+bwd" {
        return fwd;
    }
    Work {
        flops: fwd.flops * 3.5,
        bytes: 3.0 * (qo + kv) + 2.0 * lse,
        footprint: 2.0 * (qo + kv) + lse,
        density: fwd.density,
    }
}

/// Decode of one token per sequence at position `seq - 1` against `seq` tokens of history.
fn decode_work(layout: &Layout, r: &Row) -> Work {
    let (bs, seq) = (layout.block_size(), r.seq.max(1));
    let nb = layout.blocks(seq);
    let qb = (seq - 1) / bs;
    let tokens_in = |kb: u32| (seq - kb * bs).min(bs) as f64;
    let (h, hk) = (layout.num_heads(), layout.num_kv_heads());
    let group = (h / hk.max(1)).max(1);
    let (mut pairs, mut blocks, mut kv_tokens) = (0f64, 0f64, 0f64);
    for kvh in 0..hk {
        for kb in 0..=qb {
            let mut read = false;
            for head in kvh * group..(kvh + 1) * group {
                if layout.block_active(layout.pattern_of_head(head), qb, kb) {
                    pairs += tokens_in(kb);
                    blocks += 1.0;
                    read = true;
                }
            }
            if read {
                kv_tokens += tokens_in(kb);
            }
        }
    }
    let elem = elem_bytes(r);
    let d = r.head_dim as f64;
    let per_seq = 2.0 * kv_tokens * d * elem + 2.0 * h as f64 * d * elem + h as f64 * 4.0;
    let bytes = per_seq * r.batch as f64;
    Work { flops: 4.0 * d * pairs * r.batch as f64, bytes, footprint: bytes, density: blocks / (h as f64 * nb as f64) }
}

/// Fills `tflops` and `gbps` from `ms` and the work.
pub fn set_rates(r: &mut Row, w: &Work) {
    if let Some(ms) = r.ms.filter(|m| *m > 0.0) {
        r.tflops = Some(w.flops / (ms * 1e-3) / 1e12);
        r.gbps = Some(w.bytes / (ms * 1e-3) / 1e9);
    }
}

/// Parses peer JSON lines (blank lines and `#` comments skipped). Rows are normalised (dtype spelling);
/// `tflops` and `gbps` are each filled from our own count of the work where the peer did not give them.
pub fn parse_peers(text: &str, source: &str) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || !line.starts_with('{') {
            continue;
        }
        let mut r: Row = serde_json::from_str(line).map_err(|e| format!("{source}:{}: not a peer row: {e}", n + 1))?;
        if r.implementation.is_empty() {
            return Err(format!("{source}:{}: row without `impl`", n + 1));
        }
        if let Some(p) = Precision::parse(&r.dtype) {
            r.dtype = p.name().into();
        }
        if r.mode.is_empty() {
            r.mode = "fwd".into();
        }
        let missing = r.tflops.is_none() || r.gbps.is_none();
        if r.measured() && missing && ["fwd", "fwd+bwd", "decode"].contains(&r.mode.as_str()) {
            if let Ok(layout) = row_layout(&r, r.is_dense()) {
                let given = (r.tflops, r.gbps);
                let w = work(&layout, &r);
                set_rates(&mut r, &w);
                r.tflops = given.0.or(r.tflops);
                r.gbps = given.1.or(r.gbps);
            }
        }
        rows.push(r);
    }
    Ok(rows)
}

/// A table as cells, rendered for the terminal or as markdown.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Table {
    /// Fields shared by every row, said once above the table.
    pub caption: String,
    /// Column names.
    pub header: Vec<String>,
    /// Cells.
    pub rows: Vec<Vec<String>>,
    /// Rows that failed or were skipped.
    pub notes: Vec<String>,
}

fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        "-".into()
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else if x >= 1.0 {
        format!("{x:.2}")
    } else if x >= 0.01 {
        format!("{x:.3}")
    } else {
        format!("{x:.2e}")
    }
}

fn opt(x: Option<f64>, f: impl Fn(f64) -> String) -> String {
    x.map_or_else(|| "-".into(), f)
}

/// A config column: its name, and how a row shows in it.
type Field = (&'static str, fn(&Row) -> String);

const FIELDS: [Field; 10] = [
    ("mode", |r| r.mode.clone()),
    ("batch", |r| r.batch.to_string()),
    ("heads", |r| format!("{}/{}", r.heads, r.kv_heads)),
    ("head_dim", |r| r.head_dim.to_string()),
    ("block", |r| r.block.to_string()),
    ("local", |r| r.local.to_string()),
    ("vs", |r| r.vert_stride.to_string()),
    ("offset", |r| r.offset.to_string()),
    ("dtype", |r| r.dtype.clone()),
    ("causal", |r| if r.causal { "causal".into() } else { "bidirectional".into() }),
];

/// Builds the comparison table: our rows and the peers', grouped by configuration and sequence length,
/// ours first; `×dense` is the time of our dense row of the same shape (any sparsity fields) on the same
/// device over the sparse row's; each
/// `<peer>/ours` column is that peer's time over our row's at the same configuration.
pub fn build_table(ours: &[Row], peers: &[Row]) -> Table {
    let mut notes = Vec::new();
    for r in ours.iter().chain(peers) {
        if let Some(e) = &r.error {
            notes.push(format!("{} {} seq {}: {e}", r.implementation, r.device, r.seq));
        }
    }
    let ours: Vec<&Row> = ours.iter().filter(|r| r.measured()).collect();
    let peers: Vec<&Row> = peers.iter().filter(|r| r.measured()).collect();
    let all: Vec<&Row> = ours.iter().chain(&peers).copied().collect();

    // Peer time per (key, peer impl): the fastest if a peer file repeats a row. Dense peers are keyed
    // without the sparsity fields (see `Row::dense_key`).
    let peer_key = |r: &Row, imp: &str| if is_dense_impl(imp) { r.dense_key() } else { r.key() };
    let mut peer_ms: BTreeMap<(Key, String), f64> = BTreeMap::new();
    for p in &peers {
        let e = peer_ms.entry((peer_key(p, &p.implementation), p.implementation.clone())).or_insert(f64::INFINITY);
        *e = e.min(p.ms.unwrap_or(f64::INFINITY));
    }
    let peer_names: BTreeSet<String> = peers.iter().map(|p| p.implementation.clone()).collect();
    let mut dense_ms: BTreeMap<(Key, Option<String>, Option<String>), f64> = BTreeMap::new();
    for r in ours.iter().filter(|r| r.is_dense()) {
        dense_ms.insert((r.dense_key(), r.backend.clone(), r.adapter.clone()), r.ms.unwrap_or(f64::NAN));
    }

    let varying: Vec<&Field> =
        FIELDS.iter().filter(|(_, f)| all.iter().map(|r| f(r)).collect::<BTreeSet<_>>().len() > 1).collect();
    let devices: BTreeSet<&str> = all.iter().map(|r| r.device.as_str()).collect();
    let mut caption: Vec<String> = FIELDS
        .iter()
        .filter(|(n, _)| !varying.iter().any(|(m, _)| m == n))
        .filter_map(|(n, f)| {
            let v = f(all.first()?);
            match *n {
                "causal" => Some(v),
                "offset" if v == "0" => None,
                _ => Some(format!("{n} {v}")),
            }
        })
        .collect();
    if devices.len() == 1 {
        caption.extend(devices.iter().map(|d| format!("device {d}")));
    }

    let mut header: Vec<String> = vec!["impl".into()];
    if devices.len() > 1 {
        header.push("device".into());
    }
    header.extend(varying.iter().map(|(n, _)| n.to_string()));
    header.extend(
        ["seq", "density", "ms", "min..max", "TFLOP/s", "GB/s", "rel err", "×dense"].iter().map(|s| s.to_string()),
    );
    header.extend(peer_names.iter().map(|p| format!("{p}/ours")));

    let mut sorted = all.clone();
    let rank = |r: &Row| match (r.is_ours(), r.is_dense()) {
        (true, false) => 0,
        (true, true) => 1,
        _ => 2,
    };
    sorted.sort_by(|a, b| {
        let (ka, kb) = (a.key(), b.key());
        (&ka.mode, ka.batch, ka.heads, ka.kv_heads, ka.head_dim, &ka.dtype, ka.causal, ka.block, ka.local)
            .cmp(&(&kb.mode, kb.batch, kb.heads, kb.kv_heads, kb.head_dim, &kb.dtype, kb.causal, kb.block, kb.local))
            .then(ka.vert_stride.cmp(&kb.vert_stride))
            .then(ka.offset.cmp(&kb.offset))
            .then(ka.seq.cmp(&kb.seq))
            .then(rank(a).cmp(&rank(b)))
            .then(a.implementation.cmp(&b.implementation))
            .then(a.device.cmp(&b.device))
    });

    let rows = sorted
        .iter()
        .map(|r| {
            let ms = r.ms.unwrap_or(f64::NAN);
            let mut cells = vec![r.implementation.clone()];
            if devices.len() > 1 {
                cells.push(r.device.clone());
            }
            cells.extend(varying.iter().map(|(_, f)| f(r)));
            cells.push(r.seq.to_string());
            cells.push(opt(r.density, |d| format!("{d:.3}")));
            cells.push(fmt_num(ms));
            cells.push(match (r.min_ms, r.max_ms) {
                (Some(a), Some(b)) => format!("{}..{}", fmt_num(a), fmt_num(b)),
                _ => "-".into(),
            });
            cells.push(opt(r.tflops, fmt_num));
            cells.push(opt(r.gbps, fmt_num));
            cells.push(opt(r.max_rel_err, |e| format!("{e:.1e}")));
            let dense = (r.is_ours() && !r.is_dense())
                .then(|| dense_ms.get(&(r.dense_key(), r.backend.clone(), r.adapter.clone())))
                .flatten();
            cells.push(opt(dense.map(|d| d / ms), fmt_num));
            for p in &peer_names {
                let ratio = r.is_ours().then(|| peer_ms.get(&(peer_key(r, p), p.clone()))).flatten().map(|t| t / ms);
                cells.push(opt(ratio, fmt_num));
            }
            cells
        })
        .collect();
    Table { caption: caption.join(", "), header, rows, notes }
}

/// Aligned columns for the terminal.
pub fn render_text(t: &Table) -> String {
    let mut width: Vec<usize> = t.header.iter().map(|h| h.chars().count()).collect();
    for row in &t.rows {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&width).enumerate() {
            let pad = w - c.chars().count();
            if i == 0 {
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
            } else {
                s.push_str("  ");
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            }
        }
        s.trim_end().to_string()
    };
    let mut out = String::new();
    if !t.caption.is_empty() {
        let _ = writeln!(out, "{}", t.caption);
    }
    let _ = writeln!(out, "{}", line(&t.header));
    let _ = writeln!(out, "{}", "-".repeat(width.iter().sum::<usize>() + 2 * width.len().saturating_sub(1)));
    for r in &t.rows {
        let _ = writeln!(out, "{}", line(r));
    }
    for n in &t.notes {
        let _ = writeln!(out, "note: {n}");
    }
    out
}

/// A markdown table (caption as a paragraph above it), ready for BENCHMARKS.md.
pub fn render_markdown(t: &Table) -> String {
    let esc = |c: &str| c.replace('|', "\\|");
    let mut out = String::new();
    if !t.caption.is_empty() {
        let _ = writeln!(out, "{}\n", t.caption);
    }
    let _ = writeln!(out, "| {} |", t.header.iter().map(|h| esc(h)).collect::<Vec<_>>().join(" | "));
    let align: Vec<&str> = (0..t.header.len()).map(|i| if i == 0 { "---" } else { "---:" }).collect();
    let _ = writeln!(out, "| {} |", align.join(" | "));
    for r in &t.rows {
        let _ = writeln!(out, "| {} |", r.iter().map(|c| esc(c)).collect::<Vec<_>>().join(" | "));
    }
    if !t.notes.is_empty() {
        out.push('\n');
        for n in &t.notes {
            let _ = writeln!(out, "- {}", esc(n));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(imp: &str, seq: u32, vs: u32, ms: f64) -> Row {
        Row {
            implementation: imp.into(),
            seq,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            block: 32,
            local: 2,
            vert_stride: vs,
            dtype: "fp16".into(),
            ms: Some(ms),
            min_ms: Some(ms * 0.9),
            max_ms: Some(ms * 1.1),
            density: Some(0.5),
            device: "llvmpipe".into(),
            max_rel_err: Some(1e-4),
            adapter: Some("llvmpipe".into()),
            backend: Some("vulkan".into()),
            timer: Some("gpu".into()),
            iters: Some(3),
            ..Row::default()
        }
    }

    #[test]
    fn json_round_trips_and_has_the_peer_fields() {
        let r = ours("s2attn/vulkan/portable", 1024, 4, 2.5);
        let line = r.to_json();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        for f in ["impl", "mode", "batch", "seq", "heads", "kv_heads", "head_dim", "block", "local", "vert_stride"] {
            assert!(v.get(f).is_some(), "missing {f} in {line}");
        }
        for f in ["dtype", "causal", "ms", "density", "device", "max_rel_err", "adapter", "backend"] {
            assert!(v.get(f).is_some(), "missing {f} in {line}");
        }
        assert!(v.get("error").is_none() && v.get("tflops").is_none());
        assert_eq!(serde_json::from_str::<Row>(&line).unwrap(), r);
    }

    #[test]
    fn peers_parse_normalise_and_get_rates() {
        let text = r#"
# a comment
{"impl": "torch-flash", "mode": "fwd", "batch": 1, "seq": 1024, "heads": 4, "kv_heads": 2, "head_dim": 64, "block": 32, "local": 2, "vert_stride": 4, "offset": 0, "dtype": "fp16", "causal": true, "density": 0.4, "device": "H100", "ms": 1.0}
{"impl": "flex-s2", "mode": "fwd", "batch": 1, "seq": 1024, "heads": 4, "kv_heads": 2, "head_dim": 64, "block": 32, "local": 2, "vert_stride": 4, "offset": 0, "dtype": "f16", "causal": true, "density": 0.4, "device": "H100", "error": "boom"}
"#;
        let rows = parse_peers(text, "p.jsonl").unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].dtype, "fp16");
        assert!(!rows[1].measured());
        // Dense causal at 1024 tokens, 4 heads: 4 * 64 * (1024 * 1025 / 2 * 4) FLOPs in 1 ms.
        let want = 4.0 * 64.0 * (1024.0 * 1025.0 / 2.0 * 4.0) / 1e-3 / 1e12;
        assert!((rows[0].tflops.unwrap() - want).abs() < 1e-9, "{:?}", rows[0].tflops);
        let e = parse_peers("{\"impl\": 3}", "bad.jsonl").unwrap_err();
        assert!(e.contains("bad.jsonl:1"), "{e}");
    }

    fn with_mode(mode: &str, seq: u32) -> Row {
        Row { mode: mode.into(), ..ours("s2attn/vulkan/portable", seq, 4, 1.0) }
    }

    #[test]
    fn fwd_bwd_counts_three_and_a_half_forwards_and_both_passes_bytes() {
        let layout = row_layout(&with_mode("fwd", 512), false).unwrap();
        let (f, fb) = (work(&layout, &with_mode("fwd", 512)), work(&layout, &with_mode("fwd+bwd", 512)));
        assert!((fb.flops / f.flops - 3.5).abs() < 1e-12);
        assert_eq!(fb.density, f.density);
        // fp16, 512 tokens: Q and O 4 heads, K and V 2 heads, 64 features; LSE f32 over 4 heads.
        let (qo, kv, lse) = (2.0 * 512.0 * 4.0 * 64.0 * 2.0, 2.0 * 512.0 * 2.0 * 64.0 * 2.0, 512.0 * 4.0 * 4.0);
        assert_eq!((f.bytes, f.footprint), (qo + kv + lse, qo + kv + lse));
        assert_eq!((fb.bytes, fb.footprint), (3.0 * (qo + kv) + 2.0 * lse, 2.0 * (qo + kv) + lse));
    }

    #[test]
    fn decode_work_counts_the_last_row_against_brute_force() {
        for seq in [1, 31, 32, 33, 200, 512] {
            for dense in [false, true] {
                let mut r = with_mode("decode", seq);
                r.batch = 3;
                let layout = row_layout(&r, dense).unwrap();
                let w = work(&layout, &r);
                let (mut pairs, mut read) = (0u64, 0u64);
                for kvh in 0..2 {
                    let mut kv_tokens = std::collections::BTreeSet::new();
                    for h in kvh * 2..kvh * 2 + 2 {
                        for j in 0..seq {
                            if layout.element_active(layout.pattern_of_head(h), seq - 1, j) {
                                pairs += 1;
                                kv_tokens.insert(j);
                            }
                        }
                    }
                    read += kv_tokens.len() as u64;
                }
                let want_flops = 4.0 * 64.0 * pairs as f64 * 3.0;
                assert_eq!(w.flops, want_flops, "seq {seq} dense {dense}");
                let want_bytes = 3.0 * (2.0 * read as f64 * 64.0 * 2.0 + 2.0 * 4.0 * 64.0 * 2.0 + 4.0 * 4.0);
                assert_eq!(w.bytes, want_bytes, "seq {seq} dense {dense}");
                assert!(w.density > 0.0 && w.density <= 1.0);
                if dense {
                    assert_eq!(w.density, 1.0);
                    assert_eq!(pairs, 4 * seq as u64);
                }
            }
        }
    }

    #[test]
    fn peer_rows_of_every_mode_get_rates() {
        let line = |mode: &str| {
            format!(
                r#"{{"impl": "flex-s2", "mode": "{mode}", "batch": 2, "seq": 1024, "heads": 4, "kv_heads": 2, "head_dim": 64, "block": 32, "local": 2, "vert_stride": 4, "offset": 0, "dtype": "fp16", "causal": true, "density": 0.4, "device": "H100", "ms": 2.0}}"#
            )
        };
        let text = ["fwd", "fwd+bwd", "decode"].map(line).join("\n");
        let rows = parse_peers(&text, "p.jsonl").unwrap();
        let layout = row_layout(&rows[0], false).unwrap();
        for r in &rows {
            let want = work(&layout, r).flops / 2e-3 / 1e12;
            assert!((r.tflops.unwrap() - want).abs() < 1e-12 * want, "{r:?}");
        }
        assert!((rows[1].tflops.unwrap() / rows[0].tflops.unwrap() - 3.5).abs() < 1e-9);
        assert!(rows[2].tflops.unwrap() < rows[0].tflops.unwrap() / 100.0, "decode is one row per sequence");
    }

    #[test]
    fn llama_cpp_rows_are_dense_peers_with_their_own_rates_kept() {
        // As llama_cpp_json.py prints them (extra fields ignored): 4 query heads on 2 KV heads, head dim 64, 1 ms.
        let pairs = |mode: &str| if mode == "fwd" { 1024.0 * 1025.0 / 2.0 } else { 1024.0 };
        let line = |mode: &str| {
            let tflops = 2.0 * 128.0 * pairs(mode) * 4.0 / 1e-3 / 1e12;
            format!(
                r#"{{"impl": "llama.cpp-vulkan", "mode": "{mode}", "batch": 1, "seq": 1024, "heads": 4, "kv_heads": 2, "head_dim": 64, "block": 32, "local": 2, "vert_stride": 16, "offset": 0, "dtype": "fp16", "causal": true, "density": 1.0, "device": "llvmpipe", "ms": 1.0, "tflops": {tflops:e}, "timer": "wall", "iters": 900, "backend": "vulkan", "fa_path": "coopmat2", "matrix_cores": "NV_coopmat2", "q_dtype": "fp32", "llama_cpp": "0.3.36", "params": "hsk=64,causal=1"}}"#
            )
        };
        let rows = parse_peers(&["fwd", "decode"].map(line).join("\n"), "llama.jsonl").unwrap();
        for r in &rows {
            assert!(r.is_dense() && r.measured(), "{r:?}");
            let own = work(&row_layout(r, true).unwrap(), r);
            assert!((r.tflops.unwrap() / (own.flops / 1e-3 / 1e12) - 1.0).abs() < 1e-4, "{r:?} vs {own:?}");
            assert!((r.gbps.unwrap() - own.bytes / 1e-3 / 1e9).abs() < 1e-9, "GB/s filled from our count: {r:?}");
        }
        // A dense peer measured beside vert_stride 16 serves our rows at vert_stride 4 of the same shape.
        let mut mine = ours("s2attn/vulkan/portable", 1024, 4, 0.5);
        mine.device = "llvmpipe".into();
        let t = build_table(&[mine], &rows[..1]);
        let col = t.header.iter().position(|h| h == "llama.cpp-vulkan/ours").unwrap();
        assert_eq!(t.rows[0][0], "s2attn/vulkan/portable");
        assert_eq!(t.rows[0][col], "2.00");
    }

    #[test]
    fn table_merges_peers_with_ratios_and_dense_speedup() {
        let rows = vec![
            ours("s2attn/vulkan/portable", 1024, 4, 2.0),
            ours("s2attn-dense/vulkan/portable", 1024, 4, 5.0),
            ours("s2attn/vulkan/portable", 256, 4, 1.0),
        ];
        let mut flash = ours("torch-flash", 1024, 4, 3.0);
        flash.device = "llvmpipe".into();
        flash.adapter = None;
        flash.backend = None;
        let mut other = ours("flex-s2", 1024, 8, 1.0); // a different vert_stride: no ratio
        other.device = "llvmpipe".into();
        let t = build_table(&rows, &[flash.clone(), other.clone()]);
        let col = |name: &str| t.header.iter().position(|h| h == name).unwrap();
        assert!(t.header.contains(&"vs".to_string()), "vert_stride varies: {:?}", t.header);
        assert!(t.caption.contains("head_dim 64") && t.caption.contains("device llvmpipe"), "{}", t.caption);
        // Order: seq 256 first, then seq 1024 ours sparse, ours dense, peer.
        let order: Vec<(&str, &str)> = t.rows.iter().map(|r| (r[0].as_str(), r[col("seq")].as_str())).collect();
        assert_eq!(
            order,
            vec![
                ("s2attn/vulkan/portable", "256"),
                ("s2attn/vulkan/portable", "1024"),
                ("s2attn-dense/vulkan/portable", "1024"),
                ("torch-flash", "1024"),
                ("flex-s2", "1024"),
            ]
        );
        let sparse = &t.rows[1];
        assert_eq!(sparse[col("×dense")], "2.50");
        assert_eq!(sparse[col("torch-flash/ours")], "1.50");
        assert_eq!(sparse[col("flex-s2/ours")], "-");
        assert_eq!(t.rows[3][col("torch-flash/ours")], "-", "peers get no ratio to themselves");
        // A dense row (a peer's or ours) measured at one vert_stride serves every sparse setting of its shape.
        let mine = [ours("s2attn/vulkan/portable", 1024, 8, 1.5), ours("s2attn-dense/vulkan/portable", 1024, 4, 5.0)];
        let t = build_table(&mine, &[flash, other]);
        let col = |name: &str| t.header.iter().position(|h| h == name).unwrap();
        let mine = t.rows.iter().find(|r| r[0] == "s2attn/vulkan/portable").unwrap();
        assert_eq!(mine[col("torch-flash/ours")], "2.00");
        assert_eq!(mine[col("flex-s2/ours")], "0.667");
        assert_eq!(mine[col("×dense")], "3.33", "our dense row of the same shape, measured at another stride");
        let text = render_text(&t);
        assert!(text.lines().nth(1).unwrap().starts_with("impl"), "{text}");
    }

    #[test]
    fn markdown_is_a_pipe_table_with_notes() {
        let mut bad = ours("s2attn/gl/portable", 131072, 4, 1.0);
        bad.ms = None;
        bad.error = Some("q|out too big".into());
        let t = build_table(&[ours("s2attn/vulkan/portable", 1024, 4, 2.0), bad], &[]);
        let md = render_markdown(&t);
        let lines: Vec<&str> = md.lines().collect();
        assert!(lines[0].contains("heads 4/2"), "{md}");
        assert!(lines[2].starts_with("| impl | seq | density | ms |"), "{md}");
        assert!(lines[3].starts_with("| --- | ---: |"), "{md}");
        assert!(lines[4].starts_with("| s2attn/vulkan/portable | 1024 | 0.500 | 2.00 | 1.80..2.20 |"), "{md}");
        assert!(md.contains("- s2attn/gl/portable llvmpipe seq 131072: q\\|out too big"), "{md}");
    }
}
