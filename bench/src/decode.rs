//! `--mode decode` for `s2attn-bench`: one query token per sequence against a KV history, as the peer
//! script's `--mode decode` times it (`--batch` sequences, `--seq` tokens of history each).
//!
//! Each input set is a [`KvCache`] of the problem's layout holding `batch` sequences of `seq` random
//! tokens (one random chunk appended repeatedly, so the cache keeps only the pages the layout's eviction rule retains) and a
//! random query `[batch, 1, heads, head_dim]`. What is timed is [`Decode::time`]: the decode kernels alone
//! (split passes and the LSE combine) on device-resident inputs. With several sets the calls rotate
//! through the caches, one timed call each, so a call does not find its pages in cache from the last.

use crate::data::{random, Sample};
use crate::grid::Problem;
use s2attn::{Context, Decode, KvCache, KvCacheConfig, Layout, SeqId, Timing};

/// Tokens appended per call while filling a cache (bounds the host memory of long histories).
const CHUNK: u32 = 8192;

/// A timed decode configuration.
pub struct DecodeRun {
    /// Samples of the timed calls.
    pub timing: Timing,
    /// Bytes the cache holds for the KV history (resident pages) and what a dense cache would hold.
    pub kv_bytes: (u64, u64),
    /// The first call's plan, for `--verbose`.
    pub explain: String,
}

fn msg(e: s2attn::Error) -> String {
    e.to_string()
}

/// A cache holding `p.batch` sequences of `p.seq` random tokens.
fn filled<T: Sample>(ctx: &Context, layout: &Layout, p: &Problem, seed: u64) -> Result<(KvCache, Vec<SeqId>), String> {
    let config = KvCacheConfig::new(p.head_dim, p.dtype.dtype(), p.seq).sequences(p.batch);
    let mut cache = KvCache::new(ctx, layout, config).map_err(msg)?;
    let row = layout.num_kv_heads() as usize * p.head_dim as usize;
    let mut seqs = Vec::with_capacity(p.batch as usize);
    // One random chunk per cache, appended over and over: the timed kernels read every resident page
    // whatever it holds, and generating 128k x 32 KV heads x 16 sequences of fresh rows takes minutes.
    let n = CHUNK.min(p.seq) as usize;
    let (k, v) = (random::<T>(n * row, seed), random::<T>(n * row, seed.wrapping_add(1)));
    for _ in 0..p.batch {
        let id = cache.add_sequence();
        let mut done = 0;
        while done < p.seq {
            let n = CHUNK.min(p.seq - done) as usize;
            cache.append(id, &k[..n * row], &v[..n * row]).map_err(msg)?;
            done += n as u32;
        }
        seqs.push(id);
    }
    Ok((cache, seqs))
}

/// Times decode of `p` under `layout` on `ctx`, rotating through `sets` caches: `warmup` untimed calls,
/// then `iters` timed ones.
pub fn time<T: Sample>(
    ctx: &Context,
    layout: &Layout,
    p: &Problem,
    sets: usize,
    (warmup, iters): (u32, u32),
    seed: u64,
) -> Result<DecodeRun, String> {
    let mut caches = Vec::with_capacity(sets);
    for s in 0..sets {
        caches.push(filled::<T>(ctx, layout, p, seed.wrapping_add(s as u64 * 0x100_0000))?);
    }
    let ops = caches.iter().map(|(c, _)| Decode::new(c)).collect::<Result<Vec<_>, _>>().map_err(msg)?;
    let nq = p.batch as usize * p.heads as usize * p.head_dim as usize;
    let qs: Vec<Vec<T>> = (0..sets).map(|s| random(nq, seed.wrapping_add(0xd0 + s as u64))).collect();
    let explain = ops[0].explain(&caches[0].0, &caches[0].1, 1).map_err(msg)?;
    let timing = if sets == 1 {
        ops[0].time(&caches[0].0, &caches[0].1, &qs[0], warmup, iters).map_err(msg)?
    } else {
        let mut timing = Timing { samples_ms: Vec::with_capacity(iters as usize), gpu_timestamps: true };
        for call in 0..warmup + iters {
            let s = call as usize % sets;
            let t = ops[s].time(&caches[s].0, &caches[s].1, &qs[s], 0, 1).map_err(msg)?;
            if call >= warmup {
                timing.samples_ms.extend(t.samples_ms);
                timing.gpu_timestamps &= t.gpu_timestamps;
            }
        }
        timing
    };
    let report = caches[0].0.memory_report();
    Ok(DecodeRun { timing, kv_bytes: (report.resident_bytes(), report.dense_bytes), explain })
}
