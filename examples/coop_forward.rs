//! Times the forward pass on the paper's benchmark shapes (fp16, 32 heads, head dim 128, block 64, local
//! 16; 16k / 64k / 128k tokens at vert_stride 16 and 128k at vert_stride 64) through
//! `Attention::time_forward`, printing the plan, the median ms, the effective TFLOP/s on active pairs and
//! the floor (FLOPs at the H100's dense f16 rate, compulsory bytes at 3.35 TB/s); then the error against
//! the f64 oracle on a small problem of the same kind.
//!
//! `cargo run --release --example coop_forward` (env: `TILES=64x32,128x16` sweeps tiles through
//! `S2ATTN_TILE` instead of the planner's choice; `SIZES=16k,128k/64` picks shapes; `ITERS` timed passes;
//! `ORACLE=0` skips the oracle check; `S2ATTN_ADAPTER`, `S2ATTN_BACKEND` as everywhere).

use half::f16;
use s2attn::cpu::{attention_reference, rel_l2_error};
use s2attn::{Attention, Context, DType, Layout, S2Config, Shape};

/// H100 SXM dense f16 tensor rate and HBM3 bandwidth: the floor's two rates.
const PEAK_TFLOPS: f64 = 989.0;
const PEAK_TBPS: f64 = 3.35;
const HEADS: u32 = 32;
const HEAD_DIM: u32 = 128;
const BLOCK: u32 = 64;
const LOCAL: u32 = 16;

fn main() {
    if let Err(e) = run() {
        eprintln!("coop_forward failed: {e}");
        std::process::exit(1);
    }
}

/// `n` random f16 values in [-1, 1) from a xorshift.
fn random_f16(n: usize, seed: u64) -> Vec<f16> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            f16::from_f32((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
        })
        .collect()
}

/// `16k`, `128k/64` (tokens, optional vert_stride, default 16).
fn parse_size(s: &str) -> Option<(u32, u32)> {
    let (len, stride) = s.split_once('/').unwrap_or((s, "16"));
    let tokens = len.strip_suffix('k').map_or(len.parse().ok(), |k| k.parse::<u32>().ok().map(|k| k * 1024))?;
    Some((tokens, stride.parse().ok()?))
}

fn run() -> s2attn::Result<()> {
    let ctx = Context::new()?;
    println!("{}\n", ctx.describe());
    let sizes: Vec<(u32, u32)> = match std::env::var("SIZES") {
        Ok(s) => s.split(',').filter_map(parse_size).collect(),
        Err(_) => vec![(16 << 10, 16), (64 << 10, 16), (128 << 10, 16), (128 << 10, 64)],
    };
    let tiles: Vec<Option<String>> = match std::env::var("TILES") {
        Ok(t) => t.split(',').map(|s| Some(s.trim().to_string())).collect(),
        Err(_) => vec![None],
    };
    let iters: u32 = std::env::var("ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);

    // One random buffer for the longest problem; Q, K and V are slices of it at different offsets.
    let longest = sizes.iter().map(|s| s.0).max().unwrap_or(0) as usize;
    let n_max = longest * (HEADS * HEAD_DIM) as usize;
    let data = random_f16(n_max + 16, 0x5EED);

    let mut rows = Vec::new();
    for &(seq, stride) in &sizes {
        let layout = Layout::s2(S2Config::new(HEADS, BLOCK, LOCAL, stride))?;
        let shape = Shape::new(1, seq, HEAD_DIM, DType::F16);
        let n = seq as usize * (HEADS * HEAD_DIM) as usize;
        let (q, k, v) = (&data[..n], &data[8..n + 8], &data[16..n + 16]);
        let flops = 4.0 * HEAD_DIM as f64 * layout.active_pairs(seq) as f64;
        let bytes = 4.0 * n as f64 * 2.0;
        let floor_ms = (flops / PEAK_TFLOPS / 1e9).max(bytes / PEAK_TBPS / 1e9);
        for tile in &tiles {
            match tile {
                Some(t) => std::env::set_var("S2ATTN_TILE", t),
                None => std::env::remove_var("S2ATTN_TILE"),
            }
            let op = Attention::new(&ctx, &layout, shape)?;
            println!("{}k vs{stride}: {}", seq >> 10, op.explain());
            let t = op.time_forward(q, k, v, 3, iters)?;
            let ms = t.median_ms();
            let row = format!(
                "{:>5}k  vs{:<3} {:>8} {:>10.3} ms  (min {:.3}, max {:.3})  {:>6.1} TFLOP/s   floor {:.2} ms ({:.0}%)",
                seq >> 10,
                stride,
                format!("{}x{}", op.plan().tile_q, op.plan().tile_kv),
                ms,
                t.min_ms(),
                t.max_ms(),
                flops / ms / 1e9,
                floor_ms,
                100.0 * floor_ms / ms
            );
            println!("{row}");
            rows.push(row);
        }
    }

    // Error against the f64 oracle on a small problem of the same kind (fresh inputs, its own tile).
    std::env::remove_var("S2ATTN_TILE");
    if std::env::var("ORACLE").is_ok_and(|v| v == "0") {
        println!("\nseq     stride   tile      median          spread               effective   floor");
        rows.iter().for_each(|r| println!("{r}"));
        return Ok(());
    }
    let (seq, heads) = (1000, 4);
    let layout = Layout::s2(S2Config::new(heads, BLOCK, 4, 4))?;
    let op = Attention::new(&ctx, &layout, Shape::new(1, seq, HEAD_DIM, DType::F16))?;
    let n = (seq * heads * HEAD_DIM) as usize;
    let (q, k, v) = (random_f16(n, 11), random_f16(n, 12), random_f16(n, 13));
    let out = op.forward(&q, &k, &v)?;
    let wide = |x: &[f16]| x.iter().map(|h| h.to_f32()).collect::<Vec<_>>();
    let scale = 1.0 / (HEAD_DIM as f64).sqrt();
    let want = attention_reference(&layout, 1, seq, HEAD_DIM, scale, &wide(&q), &wide(&k), &wide(&v));
    let err = rel_l2_error(out.out.iter().map(|x| x.to_f64()), &want.out);
    let lse_err = rel_l2_error(out.lse.iter().map(|&x| x as f64), &want.lse);

    println!("\nseq     stride   tile      median          spread               effective   floor");
    for row in rows {
        println!("{row}");
    }
    println!(
        "oracle check ({seq} tokens, {heads} heads, {}): ‖out−ref‖/‖ref‖ = {err:.2e}, lse {lse_err:.2e}",
        op.plan()
    );
    Ok(())
}
