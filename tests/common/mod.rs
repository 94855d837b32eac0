//! Shared by the integration tests: a small xorshift for fresh random inputs, the tolerance constants, the
//! shared GPU context (a clear failure when no adapter exists), and the functions that run a problem three
//! ways (host slices, caller-owned buffers poisoned with NaN, interleaved QKV views) and judge the result
//! against the f64 oracle.
#![allow(dead_code)]

pub mod coop;
pub mod nonfinite;
#[path = "../oracle/mod.rs"]
pub mod oracle;

use s2attn::cpu::{attention_reference, rel_l2_error, Reference};
use s2attn::{Attention, BlockMask, Context, ContextOptions, DType, Layout, Shape, TensorView};
use std::sync::OnceLock;
use wgpu::util::DeviceExt;

/// ‖out−ref‖/‖ref‖ bound for f32 storage (observed errors are near 1e-7).
pub const F32_TOL: f64 = 1e-5;
/// Bound for f16 storage with f32 accumulation (the f16 rounding of O alone is ~3e-4).
pub const F16_TOL: f64 = 2e-3;

/// The tolerance for a storage type.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => F32_TOL,
        _ => F16_TOL,
    }
}

/// xorshift64: deterministic per seed, different per test.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u32) -> u32 {
        (self.next_u64() % n as u64) as u32
    }
    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
    /// `n` values uniform in [-1, 1), rounded to what `dtype` can store.
    pub fn tensor(&mut self, n: usize, dtype: DType) -> Vec<f32> {
        (0..n).map(|_| round_to(dtype, self.uniform())).collect()
    }
}

/// A random custom mask (diagonal always on, so every row attends something) with row `empty_row`, if
/// any, left empty.
pub fn random_mask(seed: u64, heads: u32, blocks: u32, bs: u32, causal: bool, empty_row: Option<u32>) -> BlockMask {
    let mut rng = Rng::new(seed);
    let bits = (0..heads * blocks * blocks)
        .map(|i| {
            let (q, k) = (i / blocks % blocks, i % blocks);
            Some(q) != empty_row && (q == k || rng.chance(0.4))
        })
        .collect();
    BlockMask::new(heads, blocks, blocks, bs, causal, bits).expect("mask")
}

/// `x` as stored in `dtype` and read back.
pub fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F32 => x,
        DType::F16 => half::f16::from_f32(x).to_f32(),
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
    }
}

/// `values` as raw bytes of `dtype`.
pub fn to_bytes(dtype: DType, values: &[f32]) -> Vec<u8> {
    match dtype {
        DType::F32 => bytemuck::cast_slice(values).to_vec(),
        DType::F16 => {
            let h: Vec<half::f16> = values.iter().map(|&x| half::f16::from_f32(x)).collect();
            bytemuck::cast_slice(&h).to_vec()
        }
        DType::BF16 => {
            let h: Vec<half::bf16> = values.iter().map(|&x| half::bf16::from_f32(x)).collect();
            bytemuck::cast_slice(&h).to_vec()
        }
    }
}

/// Raw bytes of `dtype` widened to f32.
pub fn from_bytes(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytemuck::pod_collect_to_vec(bytes),
        DType::F16 => bytemuck::pod_collect_to_vec::<u8, half::f16>(bytes).iter().map(|x| x.to_f32()).collect(),
        DType::BF16 => bytemuck::pod_collect_to_vec::<u8, half::bf16>(bytes).iter().map(|x| x.to_f32()).collect(),
    }
}

const NO_ADAPTER_HELP: &str = "the GPU tests need a wgpu adapter; on a machine without a GPU install lavapipe \
     (`apt-get install mesa-vulkan-drivers`) - these tests never skip silently";

/// The context every GPU test shares, opened once per test binary: `Context::new()` (the environment's
/// choice: lavapipe in CI). These tests are about the WGSL kernels, so in a `cuda` build on a CUDA machine,
/// where `Context::new()` opens CUDA, the best wgpu adapter is taken instead (the CUDA backend has its own
/// tests). Panics with an explanation when no adapter exists.
pub fn context() -> &'static Context {
    static CTX: OnceLock<Context> = OnceLock::new();
    CTX.get_or_init(|| {
        let ctx = Context::new().unwrap_or_else(|e| panic!("{NO_ADAPTER_HELP}: {e}"));
        if ctx.wgpu().is_some() {
            return ctx;
        }
        let mut options = ContextOptions::from_env().unwrap_or_else(|e| panic!("{e}"));
        options.backend = s2attn::Backend::Wgpu;
        Context::with_options(&options).unwrap_or_else(|e| panic!("{NO_ADAPTER_HELP}: {e}"))
    })
}

/// The CUDA context the CUDA tests share (the environment's options with the CUDA backend, so
/// `S2ATTN_WAIT_TIMEOUT` holds), opened once per test binary; `None`, after saying why, on machines without
/// a usable CUDA device (or a build without the `cuda` feature).
pub fn cuda_context() -> Option<&'static Context> {
    static CTX: OnceLock<Option<Context>> = OnceLock::new();
    CTX.get_or_init(|| {
        let options =
            ContextOptions { backend: s2attn::Backend::Cuda, ..ContextOptions::from_env().unwrap_or_default() };
        match Context::with_options(&options) {
            Ok(c) => {
                eprintln!("CUDA device:\n{}", c.describe());
                Some(c)
            }
            Err(e) => {
                eprintln!("skipping the CUDA tests: no usable CUDA device ({e})");
                None
            }
        }
    })
    .as_ref()
}

/// The same context as [`context`] (always a wgpu one), under the name the caller-owned-buffer tests use.
pub fn wgpu_context() -> &'static Context {
    context()
}

/// The wgpu device and queue of [`context`].
pub fn device() -> (&'static wgpu::Device, &'static wgpu::Queue) {
    let ctx = context().wgpu().expect("the test context is a wgpu context");
    (ctx.device(), ctx.queue())
}

/// One attention problem: a layout at a shape.
#[derive(Clone, Debug)]
pub struct Problem {
    pub layout: Layout,
    pub batch: u32,
    pub seq_len: u32,
    pub head_dim: u32,
    pub dtype: DType,
    pub scale: Option<f32>,
}

/// Fresh random inputs, already rounded to the storage type (so the oracle sees what the kernel sees).
pub struct Inputs {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl Problem {
    pub fn new(layout: &Layout, batch: u32, seq_len: u32, head_dim: u32, dtype: DType) -> Self {
        Self { layout: layout.clone(), batch, seq_len, head_dim, dtype, scale: None }
    }
    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }
    pub fn shape(&self) -> Shape {
        let s = Shape::new(self.batch, self.seq_len, self.head_dim, self.dtype);
        match self.scale {
            Some(x) => s.with_scale(x),
            None => s,
        }
    }
    /// Elements of Q (and O).
    pub fn q_len(&self) -> usize {
        (self.batch * self.seq_len * self.layout.num_heads() * self.head_dim) as usize
    }
    /// Elements of K (and V).
    pub fn kv_len(&self) -> usize {
        (self.batch * self.seq_len * self.layout.num_kv_heads() * self.head_dim) as usize
    }
    /// Elements of the LSE.
    pub fn lse_len(&self) -> usize {
        (self.batch * self.layout.num_heads() * self.seq_len) as usize
    }
    pub fn inputs(&self, seed: u64) -> Inputs {
        let mut rng = Rng::new(seed);
        Inputs {
            q: rng.tensor(self.q_len(), self.dtype),
            k: rng.tensor(self.kv_len(), self.dtype),
            v: rng.tensor(self.kv_len(), self.dtype),
        }
    }
    pub fn reference(&self, x: &Inputs) -> Reference {
        let scale = self.shape().softmax_scale() as f64;
        attention_reference(&self.layout, self.batch, self.seq_len, self.head_dim, scale, &x.q, &x.k, &x.v)
    }
    pub fn op(&self, ctx: &Context) -> Attention {
        Attention::new(ctx, &self.layout, self.shape()).unwrap_or_else(|e| panic!("Attention::new({self:?}): {e}"))
    }
}

/// Output and LSE of one run, widened to f32.
pub struct Got {
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
}

/// Judges a run against the oracle: relative L2 error of O and of the LSE under the dtype's tolerance, no
/// NaN anywhere, and exact agreement where the oracle is not finite (rows with no key: LSE -inf).
pub fn assert_matches(what: &str, p: &Problem, got: &Got, want: &Reference) {
    assert_eq!(got.out.len(), want.out.len(), "{what}: output length");
    assert_eq!(got.lse.len(), want.lse.len(), "{what}: lse length");
    if let Some(i) = got.out.iter().position(|x| x.is_nan()) {
        panic!("{what}: output element {i} is NaN (never written?) for {p:?}");
    }
    for (i, (&g, &w)) in got.lse.iter().zip(&want.lse).enumerate() {
        assert!(
            g.is_finite() == w.is_finite() && (w.is_finite() || g as f64 == w),
            "{what}: lse[{i}] = {g}, oracle {w} for {p:?}"
        );
    }
    let tol = tolerance(p.dtype);
    let err = rel_l2_error(got.out.iter().map(|&x| x as f64), &want.out);
    let lse_err = rel_l2_error(got.lse.iter().map(|&x| x as f64), &want.lse);
    println!(
        "{what}: out {err:.2e}, lse {lse_err:.2e} ({} x {} tokens, d {}, {})",
        p.batch, p.seq_len, p.head_dim, p.dtype
    );
    assert!(err < tol, "{what}: ‖out−ref‖/‖ref‖ = {err:.3e} >= {tol:.0e} for {p:?}");
    assert!(lse_err < tol, "{what}: LSE error {lse_err:.3e} >= {tol:.0e} for {p:?}");
}

/// Runs through `Attention::forward` on host slices of the problem's element type.
pub fn run_host(ctx: &Context, p: &Problem, x: &Inputs) -> Got {
    let op = p.op(ctx);
    run_host_op(&op, p, x)
}

/// As [`run_host`] on an existing op.
pub fn run_host_op(op: &Attention, p: &Problem, x: &Inputs) -> Got {
    let fail = |e: s2attn::Error| -> ! { panic!("forward({p:?}): {e}") };
    match p.dtype {
        DType::F32 => {
            let o = op.forward(&x.q, &x.k, &x.v).unwrap_or_else(|e| fail(e));
            Got { out: o.out, lse: o.lse }
        }
        DType::F16 => {
            let h = |v: &[f32]| v.iter().map(|&x| half::f16::from_f32(x)).collect::<Vec<_>>();
            let o = op.forward(&h(&x.q), &h(&x.k), &h(&x.v)).unwrap_or_else(|e| fail(e));
            Got { out: o.out.iter().map(|x| x.to_f32()).collect(), lse: o.lse }
        }
        DType::BF16 => {
            let h = |v: &[f32]| v.iter().map(|&x| half::bf16::from_f32(x)).collect::<Vec<_>>();
            let o = op.forward(&h(&x.q), &h(&x.k), &h(&x.v)).unwrap_or_else(|e| fail(e));
            Got { out: o.out.iter().map(|x| x.to_f32()).collect(), lse: o.lse }
        }
    }
}

/// Usage of every test buffer: bindable, writable from the host, copyable out.
pub const USAGE: wgpu::BufferUsages =
    wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::COPY_SRC).union(wgpu::BufferUsages::COPY_DST);

/// A buffer holding `bytes` (padded to a multiple of 4).
pub fn upload(bytes: &[u8]) -> wgpu::Buffer {
    let mut contents = bytes.to_vec();
    contents.resize(bytes.len().next_multiple_of(4), 0);
    device().0.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("test"),
        contents: &contents,
        usage: USAGE,
    })
}

/// A buffer of `bytes` bytes of 0xFF: NaN as f32 and as f16, so any element the kernel leaves unwritten
/// shows up.
pub fn poisoned(bytes: u64) -> wgpu::Buffer {
    upload(&vec![0xFF; bytes as usize])
}

/// Copies `buffer` back to the host after everything submitted so far.
pub fn read_back(buffer: &wgpu::Buffer) -> Vec<u8> {
    let (device, queue) = device();
    let size = buffer.size();
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("test readback"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, size);
    queue.submit([encoder.finish()]);
    let (tx, rx) = std::sync::mpsc::channel();
    staging.map_async(wgpu::MapMode::Read, .., move |r| tx.send(r).expect("receiver alive"));
    context().wait().expect("device wait");
    rx.recv().expect("map callback ran").expect("buffer maps");
    let bytes = staging.get_mapped_range(..).expect("mapped range").to_vec();
    staging.unmap();
    bytes
}

/// Records `op` with `encode` into a fresh encoder and submits it.
pub fn encode_and_submit(
    op: &Attention,
    q: &TensorView<'_>,
    k: &TensorView<'_>,
    v: &TensorView<'_>,
    out: &TensorView<'_>,
    lse: (&wgpu::Buffer, u64),
) -> s2attn::Result<()> {
    let (device, queue) = device();
    let mut encoder = device.create_command_encoder(&Default::default());
    op.encode(&mut encoder, q, k, v, out, lse)?;
    queue.submit([encoder.finish()]);
    Ok(())
}

/// Runs through `Attention::encode` on caller-owned contiguous buffers; O and LSE start out as NaN.
pub fn run_encode(p: &Problem, x: &Inputs) -> Got {
    let op = p.op(context());
    let es = p.dtype.size();
    let (q, k, v) =
        (upload(&to_bytes(p.dtype, &x.q)), upload(&to_bytes(p.dtype, &x.k)), upload(&to_bytes(p.dtype, &x.v)));
    let out = poisoned(p.q_len() as u64 * es);
    let lse = poisoned(p.lse_len() as u64 * 4);
    encode_and_submit(
        &op,
        &TensorView::new(&q),
        &TensorView::new(&k),
        &TensorView::new(&v),
        &TensorView::new(&out),
        (&lse, 0),
    )
    .unwrap_or_else(|e| panic!("encode({p:?}): {e}"));
    Got { out: from_bytes(p.dtype, &read_back(&out)), lse: bytemuck::pod_collect_to_vec(&read_back(&lse)) }
}

/// Where one tensor lives inside a larger buffer, in elements.
#[derive(Clone, Copy, Debug)]
pub struct Placement {
    pub offset: usize,
    pub stride: usize,
}

/// Scatters contiguous `[tokens, row]` values into `dst` at `at`.
pub fn scatter(dst: &mut [f32], src: &[f32], row: usize, at: Placement) {
    for (t, chunk) in src.chunks(row).enumerate() {
        dst[at.offset + t * at.stride..][..row].copy_from_slice(chunk);
    }
}

/// Gathers `[tokens, row]` values from `src` at `at`.
pub fn gather(src: &[f32], tokens: usize, row: usize, at: Placement) -> Vec<f32> {
    (0..tokens).flat_map(|t| src[at.offset + t * at.stride..][..row].iter().copied()).collect()
}

/// Runs through `Attention::encode` with Q, K and V interleaved per token in one QKV buffer (as a fused
/// projection writes them) and O at an offset with a padded token stride inside a NaN-poisoned buffer;
/// the LSE is written at an offset too. Checks that the padding and the LSE's neighbours stay untouched.
pub fn run_strided(p: &Problem, x: &Inputs) -> Got {
    let op = p.op(context());
    let d = p.head_dim as usize;
    let tokens = (p.batch * p.seq_len) as usize;
    let (qrow, kvrow) = (p.layout.num_heads() as usize * d, p.layout.num_kv_heads() as usize * d);
    let qkv_stride = qrow + 2 * kvrow + 4;
    let q_at = Placement { offset: 4, stride: qkv_stride };
    let k_at = Placement { offset: 4 + qrow, stride: qkv_stride };
    let v_at = Placement { offset: 4 + qrow + kvrow, stride: qkv_stride };
    let mut qkv = vec![f32::NAN; 4 + tokens * qkv_stride];
    scatter(&mut qkv, &x.q, qrow, q_at);
    scatter(&mut qkv, &x.k, kvrow, k_at);
    scatter(&mut qkv, &x.v, kvrow, v_at);
    let o_at = Placement { offset: 8, stride: qrow + 12 };
    let o_len = o_at.offset + tokens * o_at.stride + 16;
    let lse_off = 13usize; // any element offset: the LSE is f32 words
    let lse_len = lse_off + p.lse_len() + 8;

    let es = p.dtype.size();
    let qkv_buf = upload(&to_bytes(p.dtype, &qkv));
    let out = poisoned(o_len as u64 * es);
    let lse = poisoned(lse_len as u64 * 4);
    let view = |b, at: Placement| TensorView::strided(b, at.offset as u64, at.stride as u64);
    encode_and_submit(
        &op,
        &view(&qkv_buf, q_at),
        &view(&qkv_buf, k_at),
        &view(&qkv_buf, v_at),
        &view(&out, o_at),
        (&lse, lse_off as u64),
    )
    .unwrap_or_else(|e| panic!("strided encode({p:?}): {e}"));

    let out_all = from_bytes(p.dtype, &read_back(&out));
    let lse_all: Vec<f32> = bytemuck::pod_collect_to_vec(&read_back(&lse));
    // Everything outside the O rows and the LSE range must still be poison.
    let mut inside = vec![false; o_len];
    for t in 0..tokens {
        inside[o_at.offset + t * o_at.stride..][..qrow].iter_mut().for_each(|b| *b = true);
    }
    for (i, (&x, &written)) in out_all.iter().zip(&inside).enumerate() {
        assert!(written || x.is_nan(), "strided encode wrote O padding element {i} ({x}) for {p:?}");
    }
    for (i, &x) in lse_all.iter().enumerate() {
        let written = (lse_off..lse_off + p.lse_len()).contains(&i);
        assert!(written || x.is_nan(), "strided encode wrote LSE element {i} outside its range for {p:?}");
    }
    Got { out: gather(&out_all, tokens, qrow, o_at), lse: lse_all[lse_off..lse_off + p.lse_len()].to_vec() }
}

/// The three ways to run a problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// `Attention::forward` on host slices (on [`context`]).
    Host,
    /// `Attention::encode` on caller-owned NaN-poisoned buffers.
    Encode,
    /// `Attention::encode` on interleaved QKV views.
    Strided,
}

/// Runs `p` on fresh inputs from `seed` along `path` and checks it against the oracle.
pub fn check(path: Path, p: &Problem, seed: u64) {
    let x = p.inputs(seed);
    let got = match path {
        Path::Host => run_host(context(), p, &x),
        Path::Encode => run_encode(p, &x),
        Path::Strided => run_strided(p, &x),
    };
    assert_matches(&format!("{path:?}"), p, &got, &p.reference(&x));
}
