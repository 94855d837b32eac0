//! The oracle for variable-length attention and decode, and the CPU twin of the decode kernels.
//!
//! [`varlen_reference`] runs [`attention_reference`] per sequence over its whole KV history with the
//! sequence's queries placed at its end, so block positions count from the sequence's start exactly as
//! in the dense oracle. [`attend_worklist`] follows a [`WorkList`] as `shaders/decode_split.wgsl` and
//! `shaders/decode_combine.wgsl` do (per-item online softmax in base 2, partials merged by LSE), in f32.

use super::reference::{attention_reference, Reference};
use crate::inference::{SeqLens, WorkItem, WorkList};
use crate::layout::Layout;

/// f64 attention for packed sequences: `q` `[total_q, heads, head_dim]`, `k` and `v` `[total_k,
/// kv_heads, head_dim]`, sequence `i`'s queries at the last positions of its KV history. Returns O
/// `[total_q, heads, head_dim]` and LSE `[heads, total_q]`.
pub fn varlen_reference(
    layout: &Layout,
    lens: &SeqLens,
    head_dim: u32,
    scale: f64,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Reference {
    let (h_n, hk_n, d) = (layout.num_heads() as usize, layout.num_kv_heads() as usize, head_dim as usize);
    let total_q = lens.total_q() as usize;
    let mut out = vec![0f64; total_q * h_n * d];
    let mut lse = vec![f64::NEG_INFINITY; h_n * total_q];
    for i in 0..lens.len() {
        let (qr, kr) = (lens.q_range(i), lens.k_range(i));
        let (q0, q_len, k_len) = (qr.start as usize, qr.len(), kr.len());
        if q_len == 0 {
            continue;
        }
        let first = k_len - q_len;
        let mut padded = vec![0f32; k_len * h_n * d];
        padded[first * h_n * d..].copy_from_slice(&q[q0 * h_n * d..(q0 + q_len) * h_n * d]);
        let kv = kr.start as usize * hk_n * d..kr.end as usize * hk_n * d;
        let r = attention_reference(layout, 1, k_len as u32, head_dim, scale, &padded, &k[kv.clone()], &v[kv]);
        out[q0 * h_n * d..(q0 + q_len) * h_n * d].copy_from_slice(&r.out[first * h_n * d..]);
        for h in 0..h_n {
            lse[h * total_q + q0..][..q_len].copy_from_slice(&r.lse[h * k_len + first..][..q_len]);
        }
    }
    Reference { out, lse }
}

/// Online-softmax state of one query row.
#[derive(Clone)]
struct Row {
    m: f32,
    l: f32,
    acc: Vec<f32>,
}

/// The decode kernels on the CPU: follows `list` over contiguous `q` `[tokens, heads, head_dim]` and flat
/// `k` / `v` addressed as the list's entries say (vec4 offsets, `kv_tok_stride` vec4s per key). Returns O
/// (as `q`) and LSE (`lse_len` values, natural log, indexed as the kernel indexes them).
pub fn attend_worklist(
    list: &WorkList,
    head_dim: u32,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    lse_len: usize,
) -> (Vec<f32>, Vec<f32>) {
    let sh = *list.shape();
    let (d, n_tok, rows) = (head_dim as usize, sh.n_tok, sh.rows());
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![f32::NEG_INFINITY; lse_len];
    let mut partials =
        vec![Row { m: f32::NEG_INFINITY, l: 0.0, acc: vec![0.0; d] }; (list.partial_slots().end * rows) as usize];
    let o_at = |it: &WorkItem, r: u32| ((it.tok0 + r % n_tok) * sh.num_heads + it.head0 + r / n_tok) as usize * d;
    let lse_at = |it: &WorkItem, r: u32| (it.lse0 + (r / n_tok) * sh.lse_head_stride + r % n_tok) as usize;
    // Items and combine records as the kernels read them: the list's key shift added.
    let shift = list.key_shift();
    let run = |it: &WorkItem| WorkItem { kv_len: it.kv_len + shift, pos0: it.pos0 + shift, ..*it };
    for it in list.items().iter().map(run) {
        let it = &it;
        for r in (0..rows).filter(|r| r % n_tok < it.n_valid) {
            let pos = it.pos0 + r % n_tok;
            let qrow = &q[o_at(it, r)..][..d];
            let mut row = Row { m: f32::NEG_INFINITY, l: 0.0, acc: vec![0.0; d] };
            for e in &list.entries()[it.e0 as usize..it.e1 as usize] {
                if (e.mask[(r / 32) as usize] >> (r % 32)) & 1 == 0 {
                    continue;
                }
                for j in 0..sh.block_size {
                    let kpos = e.key0 + j;
                    if kpos >= it.kv_len || (sh.causal && kpos > pos) {
                        break;
                    }
                    let at = 4 * (e.base + j * sh.kv_tok_stride) as usize;
                    let s = qrow.iter().zip(&k[at..at + d]).map(|(a, b)| a * b).sum::<f32>() * scale_log2;
                    let m = row.m.max(s);
                    let alpha = (row.m - m).exp2();
                    let p = (s - m).exp2();
                    row.l = row.l * alpha + p;
                    row.acc.iter_mut().zip(&v[at..at + d]).for_each(|(a, &x)| *a = *a * alpha + p * x);
                    row.m = m;
                }
            }
            let lse2 = if row.l > 0.0 { row.m + row.l.log2() } else { f32::NEG_INFINITY };
            let o: Vec<f32> = row.acc.iter().map(|&a| if row.l > 0.0 { a / row.l } else { 0.0 }).collect();
            if it.nsplit == 1 {
                out[o_at(it, r)..][..d].copy_from_slice(&o);
                lse[lse_at(it, r)] = lse2 * std::f32::consts::LN_2;
            } else {
                partials[(it.slot * rows + r) as usize] = Row { m: lse2, l: 0.0, acc: o };
            }
        }
    }
    for fam in list.split_families().iter().map(run) {
        let fam = &fam;
        for r in (0..rows).filter(|r| r % n_tok < fam.n_valid) {
            let parts = &partials[((fam.slot * rows + r) as usize)..];
            let parts: Vec<&Row> = (0..fam.nsplit as usize).map(|s| &parts[s * rows as usize]).collect();
            let m = parts.iter().map(|p| p.m).fold(f32::NEG_INFINITY, f32::max);
            let o = &mut out[o_at(fam, r)..][..d];
            o.iter_mut().for_each(|x| *x = 0.0);
            if m == f32::NEG_INFINITY {
                continue;
            }
            let lse2 = m + parts.iter().map(|p| (p.m - m).exp2()).sum::<f32>().log2();
            for p in &parts {
                let w = (p.m - lse2).exp2();
                o.iter_mut().zip(&p.acc).for_each(|(x, &a)| *x += w * a);
            }
            lse[lse_at(fam, r)] = lse2 * std::f32::consts::LN_2;
        }
    }
    (out, lse)
}
