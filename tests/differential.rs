//! The differential test: random problems over the whole configuration space, each run through the public
//! API on whatever backend `Context::new()` opens (lavapipe in CI; `S2ATTN_BACKEND=vulkan` or `cuda` on a
//! GPU) and judged against the f64 oracle of `tests/oracle`, which computes the token mask straight from the
//! S2 rule or the custom mask's bits and shares no code with the library.
//!
//! - `sample`: a seeded sample (`S2ATTN_FUZZ_SEED`, default 1; `S2ATTN_FUZZ_CASES`, default 300, sized for
//!   CI's lavapipe). A failure is shrunk to the smallest configuration that still fails and printed as a
//!   one-line reproducer for `replay`.
//! - `replay`: runs the configuration in `S2ATTN_FUZZ_REPLAY` (a line `sample` printed).
//! - `regressions`: configurations that once gave wrong answers.
//! - `oracle_gradients_match_finite_differences`: the oracle's analytic gradients.
//!
//! Each case is one mode: the forward (O and LSE), the backward (dQ, dK, dV from the backend's own forward),
//! decode from the paged KV cache (the last token or a speculative window, then a short token loop whose odd steps
//! run on device buffers: `Decode::encode` on wgpu, `Decode::run_cuda` on CUDA), or variable-length (chunked)
//! prefill. Some cases put one NaN or infinity into Q, K or V: the outputs must be non-finite exactly where
//! the oracle's are, on every kernel: the portable WGSL kernels and the CUDA decode kernels compute them
//! directly; the tensor-core forward and backward kernels (WGSL cooperative matrices, CUDA) flag a
//! non-finite output and the op is redone on exact kernels (the portable WGSL ones; `s2_exact.cu`).

#[path = "oracle/mod.rs"]
mod oracle;

use oracle::Rule;
use s2attn::{
    Attention, AttentionGrad, BlockMask, Context, DType, Decode, Element, KernelVariant, KvCache, KvCacheConfig,
    Layout, S2Config, SeqLens, Shape, VarlenAttention,
};
use std::fmt;
use std::sync::OnceLock;

// ---- configurations ----

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Forward,
    Backward,
    /// Decode the last `window` tokens of each sequence from the paged cache.
    Decode {
        window: u32,
    },
    /// Packed sequences, each querying its last tokens.
    Varlen,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Tensor {
    Q,
    K,
    V,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct NonFinite {
    tensor: Tensor,
    value: f32,
}

/// One random problem. `Display` writes it as the line `replay` parses.
#[derive(Clone, Debug, PartialEq)]
struct Case {
    mode: Mode,
    heads: u32,
    kv_heads: u32,
    d: u32,
    block: u32,
    local: u32,
    vs: u32,
    offset: u32,
    dense: u32,
    homo: bool,
    bidir: Option<(u32, u32)>,
    /// A custom block mask instead of the S2 rule: (mask heads, seed of its bits).
    mask: Option<(u32, u64)>,
    batch: u32,
    seq: u32,
    dtype: DType,
    nonfinite: Option<NonFinite>,
    seed: u64,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.mode {
            Mode::Forward => "fwd".to_string(),
            Mode::Backward => "bwd".to_string(),
            Mode::Decode { window } => format!("decode{window}"),
            Mode::Varlen => "varlen".to_string(),
        };
        let bidir = self.bidir.map_or("-".into(), |(l, r)| format!("{l},{r}"));
        let mask = self.mask.map_or("-".into(), |(h, s)| format!("{h},{s}"));
        let nonfinite = self.nonfinite.map_or("-".into(), |n| format!("{:?},{}", n.tensor, n.value));
        write!(
            f,
            "mode={mode} heads={} kv={} d={} block={} local={} vs={} offset={} dense={} homo={} bidir={bidir} \
             mask={mask} batch={} seq={} dtype={} nonfinite={nonfinite} seed={}",
            self.heads,
            self.kv_heads,
            self.d,
            self.block,
            self.local,
            self.vs,
            self.offset,
            self.dense,
            self.homo as u8,
            self.batch,
            self.seq,
            self.dtype,
            self.seed
        )
    }
}

impl Case {
    fn parse(line: &str) -> Result<Case, String> {
        let mut c = Case {
            mode: Mode::Forward,
            heads: 1,
            kv_heads: 1,
            d: 32,
            block: 16,
            local: 1,
            vs: 1,
            offset: 0,
            dense: 0,
            homo: false,
            bidir: None,
            mask: None,
            batch: 1,
            seq: 16,
            dtype: DType::F32,
            nonfinite: None,
            seed: 0,
        };
        let pair = |v: &str| -> Result<(u32, u64), String> {
            let (a, b) = v.split_once(',').ok_or(format!("expected a,b: {v}"))?;
            Ok((a.parse().map_err(|e| format!("{v}: {e}"))?, b.parse().map_err(|e| format!("{v}: {e}"))?))
        };
        for word in line.split_whitespace() {
            let (key, v) = word.split_once('=').ok_or(format!("expected key=value: {word}"))?;
            let num = || v.parse::<u32>().map_err(|e| format!("{word}: {e}"));
            match key {
                "mode" => {
                    c.mode = match v {
                        "fwd" => Mode::Forward,
                        "bwd" => Mode::Backward,
                        "varlen" => Mode::Varlen,
                        w => Mode::Decode {
                            window: w.strip_prefix("decode").and_then(|n| n.parse().ok()).ok_or(format!("mode {w}"))?,
                        },
                    }
                }
                "heads" => c.heads = num()?,
                "kv" => c.kv_heads = num()?,
                "d" => c.d = num()?,
                "block" => c.block = num()?,
                "local" => c.local = num()?,
                "vs" => c.vs = num()?,
                "offset" => c.offset = num()?,
                "dense" => c.dense = num()?,
                "homo" => c.homo = num()? != 0,
                "bidir" => c.bidir = (v != "-").then(|| pair(v).map(|(l, r)| (l, r as u32))).transpose()?,
                "mask" => c.mask = (v != "-").then(|| pair(v)).transpose()?,
                "batch" => c.batch = num()?,
                "seq" => c.seq = num()?,
                "dtype" => {
                    c.dtype = match v {
                        "f32" => DType::F32,
                        "f16" => DType::F16,
                        _ => return Err(format!("dtype {v}")),
                    }
                }
                "nonfinite" if v == "-" => c.nonfinite = None,
                "nonfinite" => {
                    let (t, x) = v.split_once(',').ok_or(format!("nonfinite {v}"))?;
                    let tensor = match t {
                        "Q" => Tensor::Q,
                        "K" => Tensor::K,
                        "V" => Tensor::V,
                        _ => return Err(format!("tensor {t}")),
                    };
                    c.nonfinite = Some(NonFinite { tensor, value: x.parse().map_err(|e| format!("{x}: {e}"))? });
                }
                "seed" => c.seed = v.parse().map_err(|e| format!("{word}: {e}"))?,
                _ => return Err(format!("unknown key {key}")),
            }
        }
        Ok(c)
    }

    fn causal(&self) -> bool {
        self.bidir.is_none()
    }
}

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.next() % n as u64) as u32
    }
    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u32) as usize]
    }
    /// Uniform in [-1, 1), never exactly zero, rounded to `dtype`.
    fn tensor(&mut self, n: usize, dtype: DType) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let x = (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                round_to(dtype, if x == 0.0 { 0.5 } else { x })
            })
            .collect()
    }
}

fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// A random case whose work (query rows x keys x head dim x heads) suits lavapipe: most are small, about
/// one in eight is long (thousands of tokens, the lists the loop-capped device splits). On the CUDA backend
/// the case is one it offers: f16 storage, no variable-length prefill, a backward only at head dims up to
/// 128 (it refuses the others by name).
fn generate(rng: &mut Rng, cuda: bool) -> Case {
    let mode = match rng.below(10) {
        0..=3 => Mode::Forward,
        4..=6 => Mode::Backward,
        7 | 8 => Mode::Decode { window: if rng.chance(0.6) { 1 } else { rng.range(2, 4) } },
        _ => Mode::Varlen,
    };
    let ratio = rng.pick(&[1, 1, 2, 3, 4, 8, 0]);
    let (heads, kv_heads) = match ratio {
        0 => {
            let h = rng.range(1, 8);
            (h, 1) // MQA
        }
        r => {
            let kv = rng.range(1, (32 / r).min(4));
            (kv * r, kv)
        }
    };
    let d = rng.pick(&[32, 64, 96, 128, 256]);
    let block = rng.pick(&[16, 32, 64, 128]);
    let long = rng.chance(0.12);
    let causal_only = matches!(mode, Mode::Decode { .. } | Mode::Varlen);
    let bidir = (!causal_only && rng.chance(0.15)).then(|| (rng.range(1, 3), rng.range(0, 2)));
    let mask = rng.chance(0.15).then(|| (rng.pick(&[1, kv_heads, heads]), rng.next() >> 16));
    let batch = rng.range(1, 3);
    // Work budget per case: rows x keys x d x heads x batch (the oracle's and lavapipe's cost).
    let budget: f64 = if long { 6e8 } else { 4e7 };
    let per_token2 = (d * heads * batch) as f64;
    let max_seq = ((budget / per_token2).sqrt() as u32).clamp(block, 4096);
    let seq = match rng.below(3) {
        0 => rng.range(1, block.min(max_seq)),
        1 => (rng.range(1, max_seq.div_ceil(block)) * block).min(max_seq),
        _ => rng.range(1, max_seq),
    };
    let dtype = if rng.chance(0.5) && !cuda { DType::F32 } else { DType::F16 };
    let mode = if cuda && mode == Mode::Varlen { Mode::Forward } else { mode };
    let d = if cuda && mode == Mode::Backward && d > 128 { 128 } else { d };
    let nonfinite = rng.chance(0.12).then(|| NonFinite {
        tensor: rng.pick(&[Tensor::Q, Tensor::K, Tensor::V]),
        value: rng.pick(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY]),
    });
    let dense = if rng.chance(0.2) { rng.range(1, kv_heads) } else { 0 };
    Case {
        mode,
        heads,
        kv_heads,
        d,
        block,
        local: rng.range(1, 8),
        vs: rng.range(1, 17),
        offset: if rng.chance(0.3) { rng.range(1, 5) } else { 0 },
        dense,
        homo: rng.chance(0.2),
        bidir,
        mask,
        batch,
        seq,
        dtype,
        nonfinite,
        seed: rng.next() >> 16,
    }
}

// ---- running a case ----

fn context() -> &'static Context {
    static CTX: OnceLock<Context> = OnceLock::new();
    CTX.get_or_init(|| {
        Context::new().unwrap_or_else(|e| {
            panic!(
                "the differential test needs a GPU context (lavapipe where there is no GPU: apt-get install \
                 mesa-vulkan-drivers): {e}"
            )
        })
    })
}

fn is_cuda(ctx: &Context) -> bool {
    ctx.wgpu().is_none()
}

/// The layout the library gets and the rule the oracle gets, for a case needing `blocks` query blocks.
fn layouts(c: &Case, blocks: u32) -> Result<(Layout, Rule), String> {
    if let Some((mask_heads, seed)) = c.mask {
        let mut rng = Rng::new(seed);
        let density = 0.2 + 0.5 * rng.chance(0.5) as u32 as f64;
        let bits: Vec<bool> = (0..mask_heads * blocks * blocks)
            .map(|i| {
                let (q, k) = (i / blocks % blocks, i % blocks);
                // Rows left empty now and then: their outputs must be O = 0, LSE = -inf.
                (q == k && !rng.chance(0.05)) || rng.chance(density)
            })
            .collect();
        let mask = BlockMask::new(mask_heads, blocks, blocks, c.block, c.causal(), bits.clone())
            .map_err(|e| format!("BlockMask::new: {e}"))?;
        let layout = Layout::custom(mask, c.heads, c.kv_heads).map_err(|e| format!("Layout::custom: {e}"))?;
        let rule =
            Rule::Mask { block: c.block, mask_heads, q_blocks: blocks, kv_blocks: blocks, causal: c.causal(), bits };
        return Ok((layout, rule));
    }
    let mut cfg = S2Config::new(c.heads, c.block, c.local, c.vs)
        .kv_heads(c.kv_heads)
        .homo_head(c.homo)
        .offset(c.offset)
        .dense_heads(c.dense);
    if let Some((l, r)) = c.bidir {
        cfg = cfg.bidirectional(l, r);
    }
    let layout = Layout::s2(cfg).map_err(|e| format!("Layout::s2: {e}"))?;
    let rule = Rule::S2 {
        block: c.block,
        local: c.local,
        vert_stride: c.vs,
        homo: c.homo,
        offset: c.offset,
        dense_heads: c.dense,
        bidirectional: c.bidir,
    };
    Ok((layout, rule))
}

/// `x` converted to the element type, through the library, and back.
fn run_as<T: Element, R>(x: &[&[f32]], f: impl FnOnce(&[Vec<T>]) -> s2attn::Result<R>) -> Result<R, String> {
    let conv: Vec<Vec<T>> = x.iter().map(|v| v.iter().map(|&a| T::from_f32(a)).collect()).collect();
    f(&conv).map_err(|e| format!("the library refused: {e}"))
}

fn widen<T: Element>(x: &[T]) -> Vec<f32> {
    x.iter().map(|&a| a.to_f32()).collect()
}

/// The relative L2 bound for a result of `dtype`, computed on tensor cores or not.
fn tolerance(dtype: DType, tensor_cores: bool) -> f64 {
    match (dtype, tensor_cores) {
        (DType::F32, _) => 1e-5,
        (_, false) => 2e-3,
        (_, true) => 5e-3,
    }
}

/// `got` against `want`: non-finite exactly where `want` is (NaN for NaN, infinities of the same sign),
/// and ‖got−want‖/‖want‖ over the finite entries under `tol`.
fn judge(name: &str, got: &[f32], want: &[f64], tol: f64) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{name}: {} values, the oracle has {}", got.len(), want.len()));
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = g as f64;
        let same_class = if w.is_nan() {
            g.is_nan()
        } else if w.is_infinite() {
            g == w
        } else {
            g.is_finite()
        };
        if !same_class {
            let nonfinite = want.iter().filter(|x| !x.is_finite()).count();
            return Err(format!(
                "{name}[{i}] = {g}, the oracle has {w} ({nonfinite} non-finite values in the oracle's)"
            ));
        }
        if w.is_finite() {
            num += (g - w) * (g - w);
            den += w * w;
        }
    }
    let err = if den > 0.0 { (num / den).sqrt() } else { num.sqrt() };
    if err >= tol {
        return Err(format!("{name}: ‖got−ref‖/‖ref‖ = {err:.3e} >= {tol:.0e}"));
    }
    Ok(())
}

/// The case's random inputs: `(q, k, v)` of `q_rows` and `kv_rows` tokens, one non-finite value placed where
/// the case says.
fn inputs(c: &Case, rng: &mut Rng, q_rows: u32, kv_rows: u32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = c.d as usize;
    let mut q = rng.tensor(q_rows as usize * c.heads as usize * d, c.dtype);
    let mut k = rng.tensor(kv_rows as usize * c.kv_heads as usize * d, c.dtype);
    let mut v = rng.tensor(kv_rows as usize * c.kv_heads as usize * d, c.dtype);
    if let Some(n) = c.nonfinite {
        let t = match n.tensor {
            Tensor::Q => &mut q,
            Tensor::K => &mut k,
            Tensor::V => &mut v,
        };
        let at = rng.below(t.len() as u32) as usize;
        t[at] = n.value;
    }
    (q, k, v)
}

/// Rows `[tokens, heads, d]` of sequence-major tensors of `n` sequences of `len` tokens.
fn seq_slice(x: &[f32], b: usize, len: usize, row: usize) -> &[f32] {
    &x[b * len * row..(b + 1) * len * row]
}

/// The oracle's problem of one sequence of case `c`: query rows at positions `pos`.
fn oracle_problem<'a>(
    c: &Case,
    rule: &'a Rule,
    pos: &'a [u32],
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
) -> oracle::Problem<'a> {
    oracle::Problem {
        rule,
        heads: c.heads,
        kv_heads: c.kv_heads,
        d: c.d as usize,
        scale: 1.0 / (c.d as f64).sqrt(),
        pos,
        q,
        k,
        v,
    }
}

fn run_case(c: &Case) -> Result<(), String> {
    let ctx = context();
    match c.mode {
        Mode::Forward | Mode::Backward => run_full(ctx, c),
        Mode::Decode { window } => run_decode(ctx, c, window),
        Mode::Varlen => run_varlen(ctx, c),
    }
}

/// The forward (and for `Backward` the backward) over `batch` sequences of `seq` tokens.
fn run_full(ctx: &Context, c: &Case) -> Result<(), String> {
    let (layout, rule) = layouts(c, c.seq.div_ceil(c.block))?;
    let shape = Shape::new(c.batch, c.seq, c.d, c.dtype);
    let op = Attention::new(ctx, &layout, shape).map_err(|e| format!("Attention::new: {e}"))?;
    let tc = op.plan().variant != KernelVariant::Portable;
    let mut rng = Rng::new(c.seed);
    let (q, k, v) = inputs(c, &mut rng, c.batch * c.seq, c.batch * c.seq);
    let (out, lse) = match c.dtype {
        DType::F32 => run_as::<f32, _>(&[&q, &k, &v], |x| op.forward(&x[0], &x[1], &x[2])).map(|o| (o.out, o.lse))?,
        _ => run_as::<half::f16, _>(&[&q, &k, &v], |x| op.forward(&x[0], &x[1], &x[2]))
            .map(|o| (widen(&o.out), o.lse))?,
    };
    let (row_q, row_kv) = ((c.heads * c.d) as usize, (c.kv_heads * c.d) as usize);
    let pos: Vec<u32> = (0..c.seq).collect();
    let d_out = rng.tensor(q.len(), c.dtype);
    let (mut want_o, mut want_lse, mut want_g) = (Vec::new(), Vec::new(), [Vec::new(), Vec::new(), Vec::new()]);
    for b in 0..c.batch as usize {
        let s = c.seq as usize;
        let p = oracle_problem(
            c,
            &rule,
            &pos,
            seq_slice(&q, b, s, row_q),
            seq_slice(&k, b, s, row_kv),
            seq_slice(&v, b, s, row_kv),
        );
        let f = p.forward();
        want_o.extend(f.out);
        want_lse.extend(f.lse);
        if c.mode == Mode::Backward {
            let g = p.backward(seq_slice(&d_out, b, s, row_q));
            want_g[0].extend(g.dq);
            want_g[1].extend(g.dk);
            want_g[2].extend(g.dv);
        }
    }
    let tol = tolerance(c.dtype, tc);
    judge("O", &out, &want_o, tol)?;
    judge("LSE", &lse, &want_lse, tol)?;
    if c.mode != Mode::Backward {
        return Ok(());
    }
    let grad = AttentionGrad::new(ctx, &layout, shape).map_err(|e| format!("AttentionGrad::new: {e}"))?;
    let tc = tc || grad.plan().dq.variant != KernelVariant::Portable;
    // The backward reads the backend's own forward, as training does.
    let out_rounded: Vec<f32> = out.clone();
    let grads = match c.dtype {
        DType::F32 => run_as::<f32, _>(&[&q, &k, &v, &out_rounded, &d_out], |x| {
            grad.backward(&x[0], &x[1], &x[2], &x[3], &lse, &x[4])
        })
        .map(|g| [g.dq, g.dk, g.dv])?,
        _ => run_as::<half::f16, _>(&[&q, &k, &v, &out_rounded, &d_out], |x| {
            grad.backward(&x[0], &x[1], &x[2], &x[3], &lse, &x[4])
        })
        .map(|g| [widen(&g.dq), widen(&g.dk), widen(&g.dv)])?,
    };
    let tol = tolerance(c.dtype, tc);
    for ((name, got), want) in ["dQ", "dK", "dV"].iter().zip(&grads).zip(&want_g) {
        judge(name, got, want, tol)?;
    }
    Ok(())
}

/// Sequence lengths of a decode or varlen case: `batch` lengths up to `seq`, each >= `min`.
fn lengths(c: &Case, rng: &mut Rng, min: u32) -> Vec<u32> {
    (0..c.batch).map(|_| rng.range(min.min(c.seq.max(min)), c.seq.max(min))).collect()
}

/// Decode: `batch` sequences of random lengths appended to the paged cache in up to three chunks, then the
/// last `window` tokens of each queried at once; then a short token loop on the same op (`Loop`), each step
/// judged against the oracle.
fn run_decode(ctx: &Context, c: &Case, window: u32) -> Result<(), String> {
    let mut rng = Rng::new(c.seed);
    let lens = lengths(c, &mut rng, window);
    let max_len = *lens.iter().max().unwrap_or(&window);
    let token_loop = Loop::new(c, window);
    let cap = max_len + token_loop.growth();
    let (layout, rule) = layouts(c, cap.div_ceil(c.block))?;
    let mut config = KvCacheConfig::new(c.d, c.dtype, cap).sequences(c.batch).query_window(window);
    if token_loop.segment_per_sequence {
        let pages = KvCache::pages_per_sequence(&layout, &config).map_err(|e| format!("pages_per_sequence: {e}"))?;
        config = config.segment_pages(pages);
    }
    let mut cache = KvCache::new(ctx, &layout, config).map_err(|e| format!("KvCache::new: {e}"))?;
    let row_kv = (c.kv_heads * c.d) as usize;
    let mut history: Vec<(Vec<f32>, Vec<f32>)> = lens
        .iter()
        .map(|&len| inputs(&Case { nonfinite: None, ..c.clone() }, &mut rng, 0, len))
        .map(|(_, k, v)| (k, v))
        .collect();
    // A non-finite K or V goes into one sequence's history.
    if let Some(n) = c.nonfinite.filter(|n| n.tensor != Tensor::Q) {
        let (k, v) = &mut history[rng.below(c.batch) as usize];
        let t = if n.tensor == Tensor::K { k } else { v };
        let at = rng.below(t.len() as u32) as usize;
        t[at] = n.value;
    }
    let mut seqs = Vec::new();
    for (&len, (k, v)) in lens.iter().zip(history) {
        let id = cache.add_sequence();
        let mut at = 0;
        while at < len {
            let n = if len - at > 1 && rng.chance(0.5) { rng.range(1, len - at) } else { len - at };
            let rows = at as usize * row_kv..(at + n) as usize * row_kv;
            append(&mut cache, c.dtype, id, &k[rows.clone()], &v[rows])?;
            at += n;
        }
        seqs.push((id, k, v));
    }
    let decode = Decode::new(&cache).map_err(|e| format!("Decode::new: {e}"))?;
    // Q holds the case's non-finite value when it names Q.
    let q_case = Case { nonfinite: c.nonfinite.filter(|n| n.tensor == Tensor::Q), ..c.clone() };
    let (q, _, _) = inputs(&q_case, &mut rng, c.batch * window, 0);
    let all: Vec<usize> = (0..seqs.len()).collect();
    decode_step(ctx, c, &rule, &decode, &cache, &seqs, &all, window, &q, false).map_err(|e| format!("step 0: {e}"))?;

    let mut rng = token_loop.rng;
    for step in 1..=token_loop.steps {
        // Every sequence grows by the same tokens (the lists move their key shift), or each by its own
        // (some not at all; the lists are patched or rebuilt), now and then past a block boundary.
        let even = rng.chance(0.6);
        let shared = if rng.chance(0.3) { rng.range(1, c.block) } else { rng.range(1, window) };
        for (id, k, v) in seqs.iter_mut() {
            let grow = match even {
                true => shared,
                false if rng.chance(0.2) => rng.range(1, c.block),
                false => rng.range(0, 3),
            };
            if grow == 0 {
                continue;
            }
            let (_, nk, nv) = inputs(&Case { nonfinite: None, ..c.clone() }, &mut rng, 0, grow);
            append(&mut cache, c.dtype, *id, &nk, &nv)?;
            k.extend(nk);
            v.extend(nv);
        }
        // Mostly every sequence in order; sometimes a subset in another order (a new plan).
        let mut order = all.clone();
        if rng.chance(0.2) {
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u32 + 1) as usize);
            }
            order.truncate(rng.range(1, order.len() as u32) as usize);
        }
        let (q, _, _) = inputs(&Case { nonfinite: None, ..c.clone() }, &mut rng, order.len() as u32 * window, 0);
        // Odd steps through the entry points an app's token loop uses, on device buffers.
        let on_device = step % 2 == 1;
        decode_step(ctx, c, &rule, &decode, &cache, &seqs, &order, window, &q, on_device).map_err(|e| {
            let how = if on_device { ", device buffers" } else { "" };
            format!("token loop step {step} ({}{how}): {e}", if even { "even" } else { "uneven" })
        })?;
    }
    Ok(())
}

/// The token loop a decode case runs after its first call, drawn from its own stream of the case's seed (the
/// first call's inputs are those of a case without it): up to 4 steps, the cache's segments one sequence each
/// in one case of five.
struct Loop {
    steps: u32,
    segment_per_sequence: bool,
    block: u32,
    window: u32,
    rng: Rng,
}

impl Loop {
    fn new(c: &Case, window: u32) -> Self {
        let mut rng = Rng::new(c.seed ^ 0x5eed_100b);
        let steps = if rng.chance(0.3) { 0 } else { rng.range(1, 4) };
        let segment_per_sequence = rng.chance(0.2);
        Self { steps, segment_per_sequence, block: c.block, window, rng }
    }

    /// The most tokens one sequence gains over the loop.
    fn growth(&self) -> u32 {
        self.steps * self.block.max(self.window)
    }
}

/// Appends `k`, `v` (`[tokens, kv_heads, d]`) to `id` in the case's dtype.
fn append(cache: &mut KvCache, dtype: DType, id: s2attn::SeqId, k: &[f32], v: &[f32]) -> Result<(), String> {
    match dtype {
        DType::F32 => run_as::<f32, _>(&[k, v], |x| cache.append(id, &x[0], &x[1])),
        _ => run_as::<half::f16, _>(&[k, v], |x| cache.append(id, &x[0], &x[1])),
    }
}

/// One decode call over the sequences `order` names (indices into `seqs`, whose K and V histories the
/// oracle reads), `q` their last `window` tokens' queries, judged against the oracle; on host data, or
/// with `on_device` on device buffers.
#[allow(clippy::too_many_arguments)]
fn decode_step(
    ctx: &Context,
    c: &Case,
    rule: &Rule,
    decode: &Decode,
    cache: &KvCache,
    seqs: &[(s2attn::SeqId, Vec<f32>, Vec<f32>)],
    order: &[usize],
    window: u32,
    q: &[f32],
    on_device: bool,
) -> Result<(), String> {
    let ids: Vec<_> = order.iter().map(|&i| seqs[i].0).collect();
    let (out, lse) = match (on_device, c.dtype) {
        (true, _) => decode_on_device(ctx, c, decode, cache, &ids, window, q)?,
        (false, DType::F32) => run_as::<f32, _>(&[q], |x| decode.run(cache, &ids, &x[0])).map(|o| (o.out, o.lse))?,
        (false, _) => {
            run_as::<half::f16, _>(&[q], |x| decode.run(cache, &ids, &x[0])).map(|o| (widen(&o.out), o.lse))?
        }
    };
    let row_q = (c.heads * c.d) as usize;
    let row_kv = (c.kv_heads * c.d) as usize;
    let (mut want_o, mut want_lse) = (Vec::new(), Vec::new());
    for (b, &i) in order.iter().enumerate() {
        let (_, k, v) = &seqs[i];
        let len = (k.len() / row_kv) as u32;
        let pos: Vec<u32> = (len - window..len).collect();
        let p = oracle_problem(c, rule, &pos, seq_slice(q, b, window as usize, row_q), k, v);
        let f = p.forward();
        want_o.extend(f.out);
        // Decode's LSE is [sequences, heads, window], as the oracle's per sequence.
        want_lse.extend(f.lse);
    }
    let tol = tolerance(c.dtype, is_cuda(ctx));
    judge("O", &out, &want_o, tol)?;
    judge("LSE", &lse, &want_lse, tol)
}

/// A decode call through the entry points a token loop uses, on device buffers whose outputs start
/// poisoned: `Decode::encode` into a fresh encoder on wgpu, `Decode::run_cuda` on CUDA; (O, LSE) read back.
fn decode_on_device(
    ctx: &Context,
    c: &Case,
    decode: &Decode,
    cache: &KvCache,
    ids: &[s2attn::SeqId],
    window: u32,
    q: &[f32],
) -> Result<(Vec<f32>, Vec<f32>), String> {
    let es = c.dtype.size() as usize;
    let bytes: Vec<u8> = match c.dtype {
        DType::F32 => bytemuck::cast_slice(q).to_vec(),
        _ => q.iter().flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes()).collect(),
    };
    let values = |b: &[u8]| -> Vec<f32> {
        match c.dtype {
            DType::F32 => bytemuck::pod_collect_to_vec(b),
            _ => b.chunks_exact(2).map(|h| half::f16::from_bits(u16::from_le_bytes([h[0], h[1]])).to_f32()).collect(),
        }
    };
    let lse_len = ids.len() * window as usize * c.heads as usize;
    let refused = |e: s2attn::Error| format!("the library refused: {e}");
    #[cfg(feature = "cuda")]
    if let Some(cuda) = ctx.cuda() {
        let stream = cuda.stream().clone();
        let fail = |e: s2attn::cuda::cudarc::driver::DriverError| format!("CUDA buffers: {e}");
        let q_dev = stream.clone_htod(&bytes).map_err(fail)?;
        let mut out = stream.clone_htod(&vec![0xffu8; bytes.len()]).map_err(fail)?;
        let mut lse = stream.clone_htod(&vec![f32::NAN; lse_len]).map_err(fail)?;
        decode.run_cuda(cache, ids, window, &q_dev, &mut out, &mut lse).map_err(refused)?;
        let out = stream.clone_dtoh(&out).map_err(fail)?;
        let lse = stream.clone_dtoh(&lse).map_err(fail)?;
        stream.synchronize().map_err(fail)?;
        return Ok((values(&out), lse));
    }
    let w = ctx.wgpu().ok_or("no wgpu device")?;
    let device = w.device();
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
    let buffer = |contents: &[u8]| {
        use wgpu::util::DeviceExt;
        let mut padded = contents.to_vec();
        padded.resize(contents.len().next_multiple_of(4).max(4), 0);
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some("test"), contents: &padded, usage })
    };
    let readback = |size| {
        let usage = wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST;
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("test readback"),
            size,
            usage,
            mapped_at_creation: false,
        })
    };
    let (q_buf, out, lse) = (buffer(&bytes), buffer(&vec![0xff; bytes.len()]), buffer(&vec![0xff; lse_len * 4]));
    let (read_out, read_lse) = (readback(out.size()), readback(lse.size()));
    let mut encoder = device.create_command_encoder(&Default::default());
    let view = |b| s2attn::TensorView::new(b);
    decode.encode(&mut encoder, cache, ids, window, &view(&q_buf), &view(&out), (&lse, 0)).map_err(refused)?;
    encoder.copy_buffer_to_buffer(&out, 0, &read_out, 0, out.size());
    encoder.copy_buffer_to_buffer(&lse, 0, &read_lse, 0, lse.size());
    w.queue().submit([encoder.finish()]);
    let out = w.read_buffer(&read_out, (q.len() * es) as u64).map_err(refused)?;
    let lse = w.read_buffer(&read_lse, (lse_len * 4) as u64).map_err(refused)?;
    Ok((values(&out), bytemuck::pod_collect_to_vec(&lse)))
}

/// Variable-length prefill: `batch` packed sequences, each querying its last `q_len <= k_len` tokens.
fn run_varlen(ctx: &Context, c: &Case) -> Result<(), String> {
    let mut rng = Rng::new(c.seed);
    let k_lens = lengths(c, &mut rng, 1);
    let q_lens: Vec<u32> = k_lens.iter().map(|&k| if rng.chance(0.5) { k } else { rng.range(1, k) }).collect();
    let max_len = *k_lens.iter().max().unwrap_or(&1);
    let (layout, rule) = layouts(c, max_len.div_ceil(c.block))?;
    let lens = SeqLens::from_lens(&q_lens, &k_lens).map_err(|e| format!("SeqLens: {e}"))?;
    let op = VarlenAttention::new(ctx, &layout, c.d, c.dtype).map_err(|e| format!("VarlenAttention::new: {e}"))?;
    let (q, k, v) = inputs(c, &mut rng, lens.total_q(), lens.total_k());
    let (out, lse) = match c.dtype {
        DType::F32 => {
            run_as::<f32, _>(&[&q, &k, &v], |x| op.forward(&lens, &x[0], &x[1], &x[2])).map(|o| (o.out, o.lse))?
        }
        _ => run_as::<half::f16, _>(&[&q, &k, &v], |x| op.forward(&lens, &x[0], &x[1], &x[2]))
            .map(|o| (widen(&o.out), o.lse))?,
    };
    let (row_q, row_kv) = ((c.heads * c.d) as usize, (c.kv_heads * c.d) as usize);
    let total_q = lens.total_q() as usize;
    let mut want_o = Vec::new();
    let mut want_lse = vec![0f64; c.heads as usize * total_q];
    for i in 0..lens.len() {
        let (qr, kr) = (lens.q_range(i), lens.k_range(i));
        let (nq, nk) = (qr.end - qr.start, kr.end - kr.start);
        let pos: Vec<u32> = (nk - nq..nk).collect();
        let p = oracle_problem(
            c,
            &rule,
            &pos,
            &q[qr.start as usize * row_q..qr.end as usize * row_q],
            &k[kr.start as usize * row_kv..kr.end as usize * row_kv],
            &v[kr.start as usize * row_kv..kr.end as usize * row_kv],
        );
        let f = p.forward();
        want_o.extend(f.out);
        // Varlen's LSE is [heads, total_q].
        for h in 0..c.heads as usize {
            for r in 0..nq as usize {
                want_lse[h * total_q + qr.start as usize + r] = f.lse[h * nq as usize + r];
            }
        }
    }
    let tol = tolerance(c.dtype, is_cuda(ctx));
    judge("O", &out, &want_o, tol)?;
    judge("LSE", &lse, &want_lse, tol)
}

// ---- shrinking ----

/// Smaller variants of `c`, simplest first.
fn smaller(c: &Case) -> Vec<Case> {
    let mut out = Vec::new();
    let mut push = |f: &dyn Fn(&mut Case)| {
        let mut s = c.clone();
        f(&mut s);
        if s != *c {
            out.push(s);
        }
    };
    push(&|s| s.batch = 1);
    push(&|s| s.seq = (s.seq / 2).max(1));
    push(&|s| s.seq = s.seq.saturating_sub(s.block).max(1));
    push(&|s| s.seq -= 1);
    push(&|s| {
        let r = s.heads / s.kv_heads;
        s.kv_heads = (s.kv_heads / 2).max(1);
        s.heads = s.kv_heads * r;
        s.dense = s.dense.min(s.kv_heads);
        if let Some((m, seed)) = s.mask {
            s.mask = Some((
                if m == 1 {
                    1
                } else if m == r * (s.kv_heads * 2).min(m) {
                    s.heads
                } else {
                    s.kv_heads
                },
                seed,
            ));
        }
    });
    push(&|s| {
        let r = s.heads / s.kv_heads;
        if r > 1 && s.mask.is_none() {
            s.heads = s.kv_heads * (r / 2);
        }
    });
    push(&|s| s.d = 32);
    if !is_cuda(context()) {
        push(&|s| s.dtype = DType::F32);
    }
    push(&|s| s.nonfinite = None);
    push(&|s| s.dense = 0);
    push(&|s| s.offset = 0);
    push(&|s| s.homo = false);
    push(&|s| s.bidir = None);
    push(&|s| s.local = 1);
    push(&|s| s.vs = 1);
    push(&|s| {
        if let Mode::Decode { window } = s.mode {
            s.mode = Mode::Decode { window: (window / 2).max(1) };
        }
    });
    out.retain(|s| s.seq >= 1 && s.heads % s.kv_heads == 0 && s.mask.is_none_or(|(m, _)| s.heads % m == 0));
    out
}

/// The smallest variant of a failing case that fails the same way (the same check: the message up to its
/// first ':'), in at most 60 runs.
fn shrink(mut c: Case, mut why: String) -> (Case, String) {
    let kind = |m: &str| m.split(':').next().unwrap_or("").split('[').next().unwrap_or("").to_string();
    let want = kind(&why);
    let mut runs = 0;
    'outer: while runs < 60 {
        for s in smaller(&c) {
            runs += 1;
            if let Err(e) = run_case(&s) {
                if kind(&e) == want {
                    (c, why) = (s, e);
                    continue 'outer;
                }
            }
            if runs >= 60 {
                break;
            }
        }
        break;
    }
    (c, why)
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|e| panic!("{name}={v}: {e}")),
        Err(_) => default,
    }
}

// ---- the tests ----

#[test]
fn sample() {
    let seed = env_u64("S2ATTN_FUZZ_SEED", 1);
    let cases = env_u64("S2ATTN_FUZZ_CASES", 300);
    let backend = format!("{} ({})", context().adapter_name(), context().backend_name());
    eprintln!("differential sample: seed {seed}, {cases} cases on {backend}");
    let mut rng = Rng::new(seed);
    let mut failures = Vec::new();
    let mut tally = Tally::default();
    let started = std::time::Instant::now();
    for i in 0..cases {
        let c = generate(&mut rng, is_cuda(context()));
        tally.add(&c);
        if let Err(why) = run_case(&c) {
            eprintln!("case {i} FAILED: {c}\n  {why}\n  shrinking...");
            let (small, why) = shrink(c, why);
            eprintln!("  smallest: {why}\n  S2ATTN_FUZZ_REPLAY='{small}' cargo test --test differential replay");
            failures.push(format!("S2ATTN_FUZZ_REPLAY='{small}' ({why})"));
            if failures.len() >= 5 {
                break;
            }
        }
        if (i + 1) % 50 == 0 {
            eprintln!("  {} cases, {:.0} s", i + 1, started.elapsed().as_secs_f64());
        }
    }
    eprintln!(
        "differential sample: {cases} cases in {:.0} s, {} failed; {tally}",
        started.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(failures.is_empty(), "{} failing configurations (seed {seed}):\n{}", failures.len(), failures.join("\n"));
}

/// What a sample covers: cases per mode, f16 ones, GQA ones, custom masks, non-finite inputs.
#[derive(Default)]
struct Tally {
    modes: [u32; 4],
    f16: u32,
    gqa: u32,
    masks: u32,
    nonfinite: u32,
}

impl Tally {
    fn add(&mut self, c: &Case) {
        let m = match c.mode {
            Mode::Forward => 0,
            Mode::Backward => 1,
            Mode::Decode { .. } => 2,
            Mode::Varlen => 3,
        };
        self.modes[m] += 1;
        self.f16 += u32::from(c.dtype == DType::F16);
        self.gqa += u32::from(c.kv_heads < c.heads);
        self.masks += u32::from(c.mask.is_some());
        self.nonfinite += u32::from(c.nonfinite.is_some());
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [fwd, bwd, decode, varlen] = self.modes;
        write!(
            f,
            "forward {fwd}, backward {bwd}, decode {decode}, varlen {varlen}; f16 {}, GQA {}, custom masks {}, \
             non-finite inputs {}",
            self.f16, self.gqa, self.masks, self.nonfinite
        )
    }
}

/// Prints what `sample` would run for `S2ATTN_FUZZ_SEED` / `S2ATTN_FUZZ_CASES` (both generators: the one
/// for wgpu and the one restricted to what CUDA offers), without running it.
#[test]
#[ignore = "a listing, not a check: cargo test --test differential composition -- --ignored --nocapture"]
fn composition() {
    let seed = env_u64("S2ATTN_FUZZ_SEED", 1);
    let cases = env_u64("S2ATTN_FUZZ_CASES", 300);
    for cuda in [false, true] {
        let mut rng = Rng::new(seed);
        let mut tally = Tally::default();
        for _ in 0..cases {
            tally.add(&generate(&mut rng, cuda));
        }
        println!("seed {seed}, {cases} cases, {}: {tally}", if cuda { "cuda" } else { "wgpu" });
    }
}

#[test]
fn replay() {
    let Ok(line) = std::env::var("S2ATTN_FUZZ_REPLAY") else {
        // Nothing to replay: the parser still round-trips a generated case.
        let c = generate(&mut Rng::new(7), false);
        assert_eq!(Case::parse(&c.to_string()), Ok(c));
        return;
    };
    let c = Case::parse(&line).unwrap_or_else(|e| panic!("S2ATTN_FUZZ_REPLAY: {e}"));
    if let Err(why) = run_case(&c) {
        panic!("{c}\n{why}");
    }
}

/// Configurations that gave wrong dK and dV on lavapipe (loops past the driver's iteration cap).
#[test]
fn regressions() {
    for line in [
        "mode=bwd heads=4 kv=1 d=128 block=64 local=4 vs=16 seq=2048 dtype=f16 seed=1",
        "mode=bwd heads=4 kv=1 d=128 block=64 local=4 vs=16 seq=1280 dtype=f16 seed=2",
        "mode=bwd heads=4 kv=2 d=128 block=64 local=4 vs=16 seq=3072 dtype=f16 seed=3",
        "mode=bwd heads=32 kv=8 d=128 block=64 local=4 vs=16 seq=3072 dtype=f16 seed=4",
        "mode=bwd heads=4 kv=1 d=128 block=64 local=4 vs=1 seq=3072 dtype=f16 seed=5",
        "mode=bwd heads=4 kv=1 d=256 block=64 local=4 vs=16 seq=2048 dtype=f16 seed=6",
        "mode=bwd heads=4 kv=1 d=96 block=64 local=4 vs=16 seq=3072 dtype=f16 seed=7",
        "mode=bwd heads=32 kv=32 d=128 block=64 local=4 vs=16 seq=3072 dtype=f16 seed=8",
        // The forward of a dense layout at head dim 256 (long row lists).
        "mode=fwd heads=1 kv=1 d=256 block=64 local=1 vs=1 seq=4096 dtype=f32 seed=9",
        // A NaN in one Q element: that row's output is NaN.
        "mode=fwd heads=2 kv=1 d=64 block=16 local=2 vs=3 seq=100 dtype=f16 nonfinite=Q,NaN seed=10",
        // Decode of 16 query rows (4 heads per KV head x 4 tokens) at head dim 256 in f32: more workgroup
        // memory than 32 KiB devices have for one item, so the tokens go into items of fewer.
        "mode=decode4 heads=4 kv=1 d=256 block=32 local=2 vs=4 seq=300 batch=2 dtype=f32 seed=11",
    ] {
        let mut c = Case::parse(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        if is_cuda(context()) {
            c.dtype = DType::F16; // the CUDA backend stores f16 or bf16
            if c.mode == Mode::Backward && c.d > 128 {
                continue; // its backward refuses head dim 256 by name
            }
        }
        if let Err(why) = run_case(&c) {
            panic!("{c}\n{why}");
        }
    }
}

#[test]
fn oracle_gradients_match_finite_differences() {
    let rule =
        Rule::S2 { block: 16, local: 1, vert_stride: 2, homo: false, offset: 0, dense_heads: 0, bidirectional: None };
    let (heads, kv_heads, d, seq) = (4u32, 2u32, 8usize, 40u32);
    let mut rng = Rng::new(3);
    let q = rng.tensor(seq as usize * heads as usize * d, DType::F32);
    let k = rng.tensor(seq as usize * kv_heads as usize * d, DType::F32);
    let v = rng.tensor(seq as usize * kv_heads as usize * d, DType::F32);
    let d_out = rng.tensor(q.len(), DType::F32);
    let pos: Vec<u32> = (0..seq).collect();
    let loss = |q: &[f32], k: &[f32], v: &[f32]| {
        let p = oracle::Problem { rule: &rule, heads, kv_heads, d, scale: 0.5, pos: &pos, q, k, v };
        p.forward().out.iter().zip(&d_out).map(|(&o, &g)| o * g as f64).sum::<f64>()
    };
    let g = oracle::Problem { rule: &rule, heads, kv_heads, d, scale: 0.5, pos: &pos, q: &q, k: &k, v: &v }
        .backward(&d_out);
    let eps = 1e-3f32;
    for (which, grad) in [(0, &g.dq), (1, &g.dk), (2, &g.dv)] {
        for i in (0..grad.len()).step_by(37) {
            let mut t = [q.clone(), k.clone(), v.clone()];
            t[which][i] += eps;
            let up = loss(&t[0], &t[1], &t[2]);
            t[which][i] -= 2.0 * eps;
            let down = loss(&t[0], &t[1], &t[2]);
            let numeric = (up - down) / (2.0 * eps as f64);
            assert!(
                (numeric - grad[i]).abs() < 1e-4 * (1.0 + grad[i].abs()),
                "tensor {which}[{i}]: {numeric} vs {}",
                grad[i]
            );
        }
    }
}

/// The oracle's rule and the library's layout agree on every element of many small configurations (a
/// disagreement would make every kernel look wrong; this names it directly).
#[test]
fn oracle_rule_agrees_with_the_layout() {
    let mut rng = Rng::new(11);
    for _ in 0..300 {
        let mut c = generate(&mut rng, false);
        c.seq = c.seq.min(400);
        let blocks = c.seq.div_ceil(c.block);
        let (layout, rule) = layouts(&c, blocks).unwrap_or_else(|e| panic!("{c}: {e}"));
        for h in 0..c.heads {
            let pattern = layout.pattern_of_head(h);
            for i in (0..c.seq).step_by(7) {
                for j in (0..c.seq).step_by(5) {
                    assert_eq!(
                        layout.element_active(pattern, i, j),
                        rule.attends(c.heads, c.kv_heads, h, i, j),
                        "{c}: head {h}, query {i}, key {j}"
                    );
                }
            }
        }
    }
}
