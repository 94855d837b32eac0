//! Inference against the f64 oracle on whatever wgpu adapter the tests find (lavapipe in CI): the paged
//! KV cache (appends across page boundaries, eviction checked against every future query, memory report,
//! clear errors that change nothing), decode (after prefill, token by token, speculative, mixed lengths,
//! split-KV with combine, GQA, custom per-head masks, caller-owned NaN-poisoned buffers) and
//! variable-length / chunked prefill (packed sequences, CPU twin of the work list). Sizes are tiny:
//! lavapipe runs ~2 GFLOP/s and the oracle is O(history^2) per sequence.

mod common;

use common::{from_bytes, poisoned, read_back, tolerance, upload, wgpu_context, Rng, F32_TOL};
use s2attn::cpu::{attend_worklist, rel_l2_error, varlen_reference, Reference};
use s2attn::inference::SplitPolicy;
use s2attn::{
    Attention, BlockMask, DType, Decode, EncodedAppend, Error, KvCache, KvCacheConfig, Layout, S2Config, SeqId,
    SeqLens, Shape, TensorView, VarlenAttention,
};

const D: u32 = 32;
const F32_F16: [DType; 2] = [DType::F32, DType::F16];

fn s2(c: S2Config) -> Layout {
    Layout::s2(c).expect("valid S2 config")
}

/// Per-query-head random block patterns, so the heads of one GQA group differ: the diagonal, random
/// blocks within 5 blocks back, and random far blocks on a per-head stride (holes make them non-monotone).
fn custom(blocks: u32, seed: u64) -> Layout {
    let coin = |h: u32, qb: u32, kb: u32| Rng::new(seed * 1_000_003 + ((h * 64 + qb) * 64 + kb) as u64).chance(0.5);
    let mask = BlockMask::from_fn(4, blocks, blocks, 16, true, |h, qb, kb| {
        let near = qb >= kb && qb - kb < 5 && coin(h, qb, kb);
        qb == kb || near || (kb % (3 + h) == 0 && (qb + h) % 2 == 0)
    });
    Layout::custom(mask.expect("mask"), 4, 2).expect("layout")
}

/// Host values converted to the element type and back through the op.
fn as_f16(x: &[f32]) -> Vec<half::f16> {
    x.iter().map(|&v| half::f16::from_f32(v)).collect()
}

/// One sequence of a cache with its full K/V history (`[len, kv_heads, D]`, rounded to the dtype).
struct Seq {
    id: SeqId,
    k: Vec<f32>,
    v: Vec<f32>,
}

struct Fixture {
    layout: Layout,
    dtype: DType,
    cache: KvCache,
    decode: Decode,
    rng: Rng,
}

impl Fixture {
    fn new(layout: &Layout, dtype: DType, config: KvCacheConfig, seed: u64) -> Self {
        let cache = KvCache::new(wgpu_context(), layout, config).unwrap_or_else(|e| panic!("KvCache::new: {e}"));
        let decode = Decode::new(&cache).unwrap_or_else(|e| panic!("Decode::new: {e}"));
        Self { layout: layout.clone(), dtype, cache, decode, rng: Rng::new(seed) }
    }

    fn kv_row(&self) -> usize {
        (self.layout.num_kv_heads() * D) as usize
    }

    fn add(&mut self) -> Seq {
        Seq { id: self.cache.add_sequence(), k: Vec::new(), v: Vec::new() }
    }

    /// Appends `n` fresh random tokens to `seq`, in the cache and in its history.
    fn append(&mut self, seq: &mut Seq, n: u32) {
        let len = n as usize * self.kv_row();
        let (k, v) = (self.rng.tensor(len, self.dtype), self.rng.tensor(len, self.dtype));
        let r = match self.dtype {
            DType::F32 => self.cache.append(seq.id, &k, &v),
            _ => self.cache.append(seq.id, &as_f16(&k), &as_f16(&v)),
        };
        r.unwrap_or_else(|e| panic!("append {n} tokens to {}: {e}", seq.id));
        seq.k.extend(k);
        seq.v.extend(v);
    }

    fn len(&self, seq: &Seq) -> u32 {
        (seq.k.len() / self.kv_row()) as u32
    }

    /// Decodes the last `q_len` tokens of every sequence with fresh queries; judges O and LSE against the
    /// oracle on the full histories.
    fn check_decode(&mut self, seqs: &[&Seq], q_len: u32, what: &str) {
        let h = self.layout.num_heads();
        let q = self.rng.tensor((seqs.len() as u32 * q_len * h * D) as usize, self.dtype);
        let ids: Vec<SeqId> = seqs.iter().map(|s| s.id).collect();
        let (out, lse) = match self.dtype {
            DType::F32 => {
                let o = self.decode.run(&self.cache, &ids, &q).unwrap_or_else(|e| panic!("{what}: decode: {e}"));
                (o.out, o.lse)
            }
            _ => {
                let o = self.decode.run(&self.cache, &ids, &as_f16(&q)).unwrap_or_else(|e| panic!("{what}: {e}"));
                (o.out.iter().map(|x| x.to_f32()).collect(), o.lse)
            }
        };
        let want = self.oracle(seqs, q_len, &q);
        // Decode's LSE is [sequences, heads, q_len]; the oracle's [heads, total_q].
        let n = seqs.len() as u32;
        let lse_packed: Vec<f32> = (0..h)
            .flat_map(|hd| (0..n * q_len).map(move |t| (hd, t)))
            .map(|(hd, t)| lse[((t / q_len * h + hd) * q_len + t % q_len) as usize])
            .collect();
        judge(what, self.dtype, &out, &lse_packed, &want);
    }

    fn oracle(&self, seqs: &[&Seq], q_len: u32, q: &[f32]) -> Reference {
        let lens = SeqLens::from_lens(&vec![q_len; seqs.len()], &seqs.iter().map(|s| self.len(s)).collect::<Vec<_>>())
            .expect("lens");
        let k: Vec<f32> = seqs.iter().flat_map(|s| s.k.iter().copied()).collect();
        let v: Vec<f32> = seqs.iter().flat_map(|s| s.v.iter().copied()).collect();
        varlen_reference(&self.layout, &lens, D, 1.0 / (D as f64).sqrt(), q, &k, &v)
    }

    /// Every block some query at a position >= `len - window` (up to the page table's capacity) attends is
    /// resident, found by brute force over the layout; returns the resident count that minimum implies.
    fn check_residency(&self, seq: &Seq) -> u64 {
        let cfg = self.cache.config();
        let (bs, group) = (self.layout.block_size(), self.layout.num_heads() / self.layout.num_kv_heads());
        let len = self.len(seq);
        let first_q = len.saturating_sub(cfg.query_window) / bs;
        let last_q = self.layout.blocks(cfg.max_seq_len);
        let mut needed = 0;
        for kvh in 0..self.layout.num_kv_heads() {
            let table = self.cache.page_table(seq.id, kvh).expect("page table");
            for kb in 0..self.layout.blocks(len) {
                let need = (first_q.max(kb)..last_q).any(|qb| {
                    (kvh * group..(kvh + 1) * group)
                        .any(|h| self.layout.block_active(self.layout.pattern_of_head(h), qb, kb))
                });
                if need {
                    needed += 1;
                    assert!(
                        table.get(kb).is_some(),
                        "{}: KV head {kvh} block {kb} was evicted at length {len}",
                        seq.id
                    );
                }
            }
        }
        needed
    }
}

/// O within the dtype's tolerance, LSE within f32's, no NaN, -inf exactly where the oracle has it.
fn judge(what: &str, dtype: DType, out: &[f32], lse: &[f32], want: &Reference) {
    assert_eq!(out.len(), want.out.len(), "{what}: output length");
    assert!(!out.iter().any(|x| x.is_nan()), "{what}: NaN in the output");
    let err = rel_l2_error(out.iter().map(|&x| x as f64), &want.out);
    let lse_err = rel_l2_error(lse.iter().map(|&x| x as f64), &want.lse);
    assert!(err < tolerance(dtype), "{what}: ‖out−ref‖/‖ref‖ = {err:.3e} ({dtype})");
    assert!(lse_err < F32_TOL * 10.0, "{what}: lse error {lse_err:.3e}");
}

#[test]
fn decode_after_prefill_equals_the_last_rows_of_a_full_forward() {
    let layout = s2(S2Config::new(4, 16, 2, 3).kv_heads(2));
    for (i, dtype) in F32_F16.into_iter().enumerate() {
        let len = 150;
        let mut f = Fixture::new(&layout, dtype, KvCacheConfig::new(D, dtype, 256), 10 + i as u64);
        let mut seq = f.add();
        f.append(&mut seq, len);
        // The full forward over the same history with random queries; decode queries its last row.
        let h = layout.num_heads() as usize;
        let q = f.rng.tensor(len as usize * h * D as usize, dtype);
        let op = Attention::new(wgpu_context(), &layout, Shape::new(1, len, D, dtype)).expect("forward op");
        let last_q = &q[(len as usize - 1) * h * D as usize..];
        let (fwd_out, fwd_lse, dec_out, dec_lse) = match dtype {
            DType::F32 => {
                let fwd = op.forward(&q, &seq.k, &seq.v).expect("forward");
                let dec = f.decode.run(&f.cache, &[seq.id], last_q).expect("decode");
                (fwd.out, fwd.lse, dec.out, dec.lse)
            }
            _ => {
                let fwd = op.forward(&as_f16(&q), &as_f16(&seq.k), &as_f16(&seq.v)).expect("forward");
                let dec = f.decode.run(&f.cache, &[seq.id], &as_f16(last_q)).expect("decode");
                let w = |x: Vec<half::f16>| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
                (w(fwd.out), fwd.lse, w(dec.out), dec.lse)
            }
        };
        let row = (len as usize - 1) * h * D as usize;
        let fwd_last_lse: Vec<f32> = (0..h).map(|hd| fwd_lse[hd * len as usize + len as usize - 1]).collect();
        let want = f.oracle(&[&seq], 1, last_q);
        judge("decode vs oracle", dtype, &dec_out, &dec_lse, &want);
        judge("forward's last row vs oracle", dtype, &fwd_out[row..], &fwd_last_lse, &want);
        let diff = rel_l2_error(
            dec_out.iter().map(|&x| x as f64),
            &fwd_out[row..].iter().map(|&x| x as f64).collect::<Vec<_>>(),
        );
        assert!(diff < tolerance(dtype), "decode and the forward's last row differ by {diff:.3e} ({dtype})");
    }
}

#[test]
fn appends_across_page_boundaries_and_eviction_keeps_what_later_queries_need() {
    let layouts = [
        ("S2 GQA", s2(S2Config::new(4, 16, 2, 3).kv_heads(2))),
        ("S2 dense KV head + offset", s2(S2Config::new(4, 16, 1, 4).kv_heads(2).dense_heads(1).offset(1))),
        ("S2 homo_head", s2(S2Config::new(4, 16, 2, 3).homo_head(true))),
        ("custom per-head masks", custom(20, 7)),
        ("dense", Layout::dense(4, 2, 16, true).expect("dense")),
    ];
    // Chunks crossing page boundaries at odd places: one token at a time across a boundary, a whole
    // page, a page and a bit, a long prompt.
    let chunks = [1, 3, 12, 1, 1, 16, 17, 1, 40, 1, 1, 1, 90, 2, 1];
    for (li, (name, layout)) in layouts.iter().enumerate() {
        let dtype = F32_F16[li % 2];
        let config = KvCacheConfig::new(D, dtype, 320).sequences(1).query_window(2);
        let mut f = Fixture::new(layout, dtype, config, 100 + li as u64);
        let mut seq = f.add();
        let mut evicted = false;
        for (ci, &n) in chunks.iter().enumerate() {
            f.append(&mut seq, n);
            let needed = f.check_residency(&seq);
            let report = f.cache.memory_report();
            // Nothing beyond what some future query needs stays resident either.
            assert_eq!(report.resident_pages, needed, "{name}: resident pages after chunk {ci}");
            evicted |= report.resident_pages < report.dense_pages;
            let q_len = if ci % 2 == 0 { 1 } else { 2.min(f.len(&seq)) };
            f.check_decode(&[&seq], q_len, &format!("{name} ({dtype}) after chunk {ci}, length {}", f.len(&seq)));
        }
        if *name == "dense" {
            assert!(!evicted, "a dense layout evicted a page");
        } else {
            assert!(evicted, "{name}: nothing was ever evicted, the test checks no eviction");
        }
    }
}

#[test]
fn memory_report_counts_resident_and_dense_bytes() {
    let layout = s2(S2Config::new(4, 16, 2, 4).kv_heads(2));
    let mut f = Fixture::new(&layout, DType::F16, KvCacheConfig::new(D, DType::F16, 1024).sequences(2), 300);
    let (mut a, mut b) = (f.add(), f.add());
    f.append(&mut a, 700);
    f.append(&mut b, 100);
    let r = f.cache.memory_report();
    let (hk, es) = (layout.num_kv_heads() as u64, 2);
    assert_eq!(r.sequences, 2);
    assert_eq!(r.tokens, 800);
    assert_eq!(r.page_bytes, 2 * 16 * D as u64 * es);
    assert_eq!(r.dense_bytes, 800 * hk * D as u64 * 2 * es);
    assert_eq!(r.dense_pages, (layout.blocks(700) + layout.blocks(100)) as u64 * hk);
    assert_eq!(r.resident_pages, f.check_residency(&a) + f.check_residency(&b));
    assert_eq!(r.resident_bytes(), r.resident_pages * r.page_bytes);
    assert!(r.fraction() < 0.5, "S2 with stride 4 should hold well under half of dense: {r}");
    // The pool was sized from the eviction rule for two sequences at their peak; both fit.
    let per_seq = KvCache::pages_per_sequence(&layout, f.cache.config()).expect("pages");
    assert_eq!(r.pool_pages, 2 * per_seq as u64);
    f.append(&mut a, 324);
    f.append(&mut b, 924);
    // Removing a sequence frees its pages.
    let before = f.cache.free_pages();
    let held = f.cache.page_table(a.id, 0).expect("table").len() + f.cache.page_table(a.id, 1).expect("table").len();
    f.cache.remove_sequence(a.id).expect("remove");
    assert_eq!(f.cache.free_pages() as usize, before as usize + held);
    println!("{}", f.cache.memory_report());
}

#[test]
fn mixed_lengths_in_one_batch_and_speculative_queries() {
    let layout = s2(S2Config::new(4, 16, 2, 3).kv_heads(2));
    for (i, dtype) in F32_F16.into_iter().enumerate() {
        let config = KvCacheConfig::new(D, dtype, 256).sequences(5).query_window(3);
        let per_seq = KvCache::pages_per_sequence(&layout, &config).expect("pages");
        // f16 spreads the five sequences over three segments.
        let config = if dtype == DType::F16 { config.segment_pages(2 * per_seq) } else { config };
        let mut f = Fixture::new(&layout, dtype, config, 400 + i as u64);
        assert_eq!(f.cache.segments(), if dtype == DType::F16 { 3 } else { 1 });
        let mut seqs: Vec<Seq> = (0..5).map(|_| f.add()).collect();
        for (s, n) in seqs.iter_mut().zip([3, 16, 33, 130, 77]) {
            f.append(s, n);
        }
        let all: Vec<&Seq> = seqs.iter().collect();
        f.check_decode(&all, 1, &format!("mixed lengths, 1 token ({dtype})"));
        f.check_decode(&all, 3, &format!("mixed lengths, 3 tokens ({dtype})"));
        // A subset in another order, one sequence twice.
        f.check_decode(&[all[3], all[0], all[3]], 2, &format!("subset ({dtype})"));
    }
}

#[test]
fn long_histories_split_over_workgroups_and_combine_across_cache_segments() {
    let layout = s2(S2Config::new(8, 16, 2, 2).kv_heads(2));
    let config = KvCacheConfig::new(D, DType::F32, 640).sequences(2);
    let per_seq = KvCache::pages_per_sequence(&layout, &config).expect("pages");
    // One segment for both sequences, then one segment each (one pass per segment in one call).
    for (segments, config) in [(1, config.clone()), (2, config.segment_pages(per_seq))] {
        let mut f = Fixture::new(&layout, DType::F32, config, 500 + segments);
        assert_eq!(f.cache.segments(), segments as usize);
        let (mut a, mut b) = (f.add(), f.add());
        f.append(&mut a, 600);
        f.append(&mut b, 45);
        for (name, policy) in [
            ("never split", SplitPolicy::never()),
            ("split to 2 blocks", SplitPolicy::split_to(2)),
            ("split to 1 block", SplitPolicy::split_to(1)),
            ("default", SplitPolicy::default()),
        ] {
            f.decode = Decode::new(&f.cache).expect("decode").with_split_policy(policy);
            let lists = f.decode.work_lists(&f.cache, &[b.id, a.id], 1).expect("work lists");
            assert_eq!(lists.len(), segments as usize, "one work list per segment");
            let split = lists.iter().any(|(_, l)| !l.split_families().is_empty());
            let explain = f.decode.explain(&f.cache, &[a.id, b.id], 1).expect("explain");
            assert_eq!(split, policy.min_blocks_per_split != u32::MAX, "{name}: {explain}");
            let what = format!("{name}, {segments} segments");
            f.check_decode(&[&b, &a], 1, &what);
            f.check_decode(&[&a, &b, &a], 1, &what);
        }
    }
}

#[test]
fn varlen_prefill_packed_and_chunked_against_the_oracle_and_the_cpu_twin() {
    let cases = [
        ("S2 GQA", s2(S2Config::new(4, 16, 2, 3).kv_heads(2))),
        ("custom per-head masks", custom(8, 11)),
        ("S2 bidirectional", s2(S2Config::new(4, 16, 1, 3).kv_heads(2).bidirectional(1, 1))),
    ];
    // Full prefills, chunks at the end of longer histories, an empty query chunk, a single query.
    let q_lens = [5, 0, 33, 17, 1, 40];
    let k_lens = [5, 9, 70, 100, 64, 40];
    let lens = SeqLens::from_lens(&q_lens, &k_lens).expect("lens");
    for (ci, (name, layout)) in cases.iter().enumerate() {
        for (di, dtype) in F32_F16.into_iter().enumerate() {
            let mut rng = Rng::new(600 + 2 * ci as u64 + di as u64);
            let (h, hk) = (layout.num_heads(), layout.num_kv_heads());
            let q = rng.tensor((lens.total_q() * h * D) as usize, dtype);
            let k = rng.tensor((lens.total_k() * hk * D) as usize, dtype);
            let v = rng.tensor((lens.total_k() * hk * D) as usize, dtype);
            let want = varlen_reference(layout, &lens, D, 1.0 / (D as f64).sqrt(), &q, &k, &v);
            for policy in [SplitPolicy::never(), SplitPolicy::split_to(1)] {
                let op = VarlenAttention::new(wgpu_context(), layout, D, dtype)
                    .expect("varlen op")
                    .with_split_policy(policy);
                let what = format!("{name} ({dtype}, {policy:?})");
                let (out, lse) = match dtype {
                    DType::F32 => {
                        let o = op.forward(&lens, &q, &k, &v).unwrap_or_else(|e| panic!("{what}: {e}"));
                        (o.out, o.lse)
                    }
                    _ => {
                        let o = op
                            .forward(&lens, &as_f16(&q), &as_f16(&k), &as_f16(&v))
                            .unwrap_or_else(|e| panic!("{what}: {e}"));
                        (o.out.iter().map(|x| x.to_f32()).collect(), o.lse)
                    }
                };
                judge(&what, dtype, &out, &lse, &want);
                let list = op.work_list(&lens, None).expect("work list");
                let (twin_out, twin_lse) =
                    attend_worklist(&list, D, 1.0 / (D as f32).sqrt(), &q, &k, &v, want.lse.len());
                judge(&format!("CPU twin, {what}"), DType::F32, &twin_out, &twin_lse, &want);
            }
        }
    }
}

#[test]
fn varlen_of_whole_sequences_matches_the_forward() {
    let layout = s2(S2Config::new(4, 32, 2, 2).kv_heads(1));
    let mut rng = Rng::new(700);
    let len = 97;
    let (h, hk) = (layout.num_heads(), layout.num_kv_heads());
    let q = rng.tensor((len * h * D) as usize, DType::F32);
    let k = rng.tensor((len * hk * D) as usize, DType::F32);
    let v = rng.tensor((len * hk * D) as usize, DType::F32);
    let lens = SeqLens::new(&[0, len], &[0, len]).expect("lens");
    let got = s2attn::varlen_forward(wgpu_context(), &layout, &lens, &q, &k, &v).expect("varlen");
    let op = Attention::new(wgpu_context(), &layout, Shape::new(1, len, D, DType::F32)).expect("forward op");
    let fwd = op.forward(&q, &k, &v).expect("forward");
    let want = varlen_reference(&layout, &lens, D, 1.0 / (D as f64).sqrt(), &q, &k, &v);
    judge("varlen", DType::F32, &got.out, &got.lse, &want);
    // Batch 1's [batch, heads, seq] LSE is varlen's [heads, total_q].
    let diff = rel_l2_error(got.out.iter().map(|&x| x as f64), &fwd.out.iter().map(|&x| x as f64).collect::<Vec<_>>());
    let lse_diff =
        rel_l2_error(got.lse.iter().map(|&x| x as f64), &fwd.lse.iter().map(|&x| x as f64).collect::<Vec<_>>());
    assert!(diff < F32_TOL && lse_diff < F32_TOL, "varlen vs forward: out {diff:.3e}, lse {lse_diff:.3e}");
}

#[test]
fn decode_and_varlen_encode_into_poisoned_caller_buffers() {
    let layout = s2(S2Config::new(4, 16, 2, 3).kv_heads(2));
    let (device, queue) = common::device();
    for (i, dtype) in F32_F16.into_iter().enumerate() {
        let es = dtype.size();
        let mut f = Fixture::new(&layout, dtype, KvCacheConfig::new(D, dtype, 128).sequences(2), 800 + i as u64);
        let (mut a, mut b) = (f.add(), f.add());
        f.append(&mut a, 70);
        f.append(&mut b, 19);
        let h = layout.num_heads();
        let q = f.rng.tensor((2 * h * D) as usize, dtype);
        let row = (h * D) as u64;
        // Q at an offset, O at an offset with a padded token stride, LSE at an offset: all else poison.
        let mut q_padded = vec![f32::NAN; 8 + q.len()];
        q_padded[8..].copy_from_slice(&q);
        let q_buf = upload(&common::to_bytes(dtype, &q_padded));
        let out = poisoned((4 + 2 * (row + 8)) * es);
        let lse = poisoned((6 + 2 * h as u64) * 4);
        let mut encoder = device.create_command_encoder(&Default::default());
        f.decode
            .encode(
                &mut encoder,
                &f.cache,
                &[a.id, b.id],
                1,
                &TensorView::strided(&q_buf, 8, row),
                &TensorView::strided(&out, 4, row + 8),
                (&lse, 6),
            )
            .expect("decode encode");
        queue.submit([encoder.finish()]);
        let out_all = from_bytes(dtype, &read_back(&out));
        let lse_all: Vec<f32> = bytemuck::pod_collect_to_vec(&read_back(&lse));
        let mut got = Vec::new();
        for t in 0..2 {
            let at = 4 + t * (row as usize + 8);
            got.extend_from_slice(&out_all[at..at + row as usize]);
            assert!(out_all[at + row as usize..at + row as usize + 8].iter().all(|x| x.is_nan()), "O padding written");
        }
        assert!(lse_all[..6].iter().all(|x| x.is_nan()) && lse_all[6 + 2 * h as usize..].iter().all(|x| x.is_nan()));
        let lse_dec = &lse_all[6..6 + 2 * h as usize];
        let lse_packed: Vec<f32> = (0..h as usize).flat_map(|hd| [lse_dec[hd], lse_dec[h as usize + hd]]).collect();
        judge(&format!("Decode::encode ({dtype})"), dtype, &got, &lse_packed, &f.oracle(&[&a, &b], 1, &q));

        // Varlen on caller buffers: K and V interleaved per token in one buffer.
        let lens = SeqLens::from_lens(&[3, 20], &[9, 20]).expect("lens");
        let op = VarlenAttention::new(wgpu_context(), &layout, D, dtype).expect("varlen op");
        let hk = layout.num_kv_heads() as usize;
        let kv_row = hk * D as usize;
        let q = f.rng.tensor(lens.total_q() as usize * row as usize, dtype);
        let k = f.rng.tensor(lens.total_k() as usize * kv_row, dtype);
        let v = f.rng.tensor(lens.total_k() as usize * kv_row, dtype);
        let kv: Vec<f32> =
            k.chunks(kv_row).zip(v.chunks(kv_row)).flat_map(|(a, b)| a.iter().chain(b).copied()).collect();
        let (q_buf, kv_buf) = (upload(&common::to_bytes(dtype, &q)), upload(&common::to_bytes(dtype, &kv)));
        let out = poisoned(lens.total_q() as u64 * row * es);
        let lse = poisoned(lens.total_q() as u64 * h as u64 * 4);
        let mut encoder = device.create_command_encoder(&Default::default());
        op.encode(
            &mut encoder,
            &lens,
            &TensorView::new(&q_buf),
            &TensorView::strided(&kv_buf, 0, 2 * kv_row as u64),
            &TensorView::strided(&kv_buf, kv_row as u64, 2 * kv_row as u64),
            &TensorView::new(&out),
            (&lse, 0),
        )
        .expect("varlen encode");
        queue.submit([encoder.finish()]);
        let want = varlen_reference(&layout, &lens, D, 1.0 / (D as f64).sqrt(), &q, &k, &v);
        let lse_got: Vec<f32> = bytemuck::pod_collect_to_vec(&read_back(&lse));
        judge(
            &format!("VarlenAttention::encode ({dtype})"),
            dtype,
            &from_bytes(dtype, &read_back(&out)),
            &lse_got,
            &want,
        );
    }
}

#[test]
fn bad_inputs_give_clear_errors_and_change_nothing() {
    let layout = s2(S2Config::new(4, 16, 2, 3).kv_heads(2));
    let config = KvCacheConfig::new(D, DType::F32, 64).max_pages(6).query_window(2);
    let mut f = Fixture::new(&layout, DType::F32, config, 900);
    let mut a = f.add();
    f.append(&mut a, 20);
    let row = f.kv_row();
    let tokens = |n: usize| vec![0.5f32; n * row];

    // Unknown sequences: never added, or removed.
    let ghost = f.cache.add_sequence();
    f.cache.remove_sequence(ghost).expect("remove");
    for err in [
        f.cache.append(ghost, &tokens(1), &tokens(1)).err(),
        f.cache.remove_sequence(ghost).err(),
        f.cache.seq_len(ghost).err(),
        f.decode.run(&f.cache, &[a.id, ghost], &vec![0f32; 2 * 4 * D as usize]).err(),
    ] {
        assert_eq!(err, Some(Error::UnknownSequence(ghost.get())));
    }
    let msg = Error::UnknownSequence(ghost.get()).to_string();
    assert!(msg.contains(&ghost.get().to_string()) && msg.contains("not in the KV cache"), "{msg}");

    // Page table overflow: 20 + 45 > 64 tokens; nothing changes.
    let before = (f.cache.memory_report(), f.cache.page_table(a.id, 0).expect("table").clone());
    match f.cache.append(a.id, &tokens(45), &tokens(45)) {
        Err(Error::PageTableOverflow { seq, tokens, capacity }) => {
            assert_eq!((seq, tokens, capacity), (a.id.get(), 65, 64))
        }
        other => panic!("expected PageTableOverflow, got {other:?}"),
    }
    // Pool exhaustion: a second sequence of 40 tokens needs more than the 6 pages; nothing changes.
    let b = f.cache.add_sequence();
    match f.cache.append(b, &tokens(40), &tokens(40)) {
        Err(Error::CacheFull { needed, free, capacity, .. }) => {
            assert!(needed > free && capacity == 6, "{needed} {free}")
        }
        other => panic!("expected CacheFull, got {other:?}"),
    }
    assert_eq!(f.cache.seq_len(b), Ok(0));
    assert_eq!(f.cache.seq_len(a.id), Ok(20));
    assert_eq!(
        (f.cache.memory_report().resident_pages, f.cache.page_table(a.id, 0).expect("table").clone()),
        (before.0.resident_pages, before.1)
    );
    f.check_decode(&[&a], 2, "after refused appends");

    // Wrong lengths and types.
    assert!(matches!(f.cache.append(a.id, &tokens(1)[1..], &tokens(1)), Err(Error::Length { tensor: "k", .. })));
    assert!(matches!(f.cache.append(a.id, &tokens(2), &tokens(1)), Err(Error::Length { tensor: "v", .. })));
    assert!(matches!(f.cache.append::<f32>(a.id, &[], &[]), Err(Error::Length { tensor: "k", .. })));
    let h16 = vec![half::f16::ZERO; row];
    assert!(matches!(f.cache.append(a.id, &h16, &h16), Err(Error::DType { .. })));
    assert!(matches!(
        f.decode.run(&f.cache, &[a.id], &vec![0f32; 4 * D as usize + 4]),
        Err(Error::Length { tensor: "q", .. })
    ));
    // More queried tokens than the query window; an empty sequence; no sequence.
    let e = f.decode.run(&f.cache, &[a.id], &vec![0f32; 3 * 4 * D as usize]).expect_err("q_len 3 > window 2");
    assert!(e.to_string().contains("q_len 3"), "{e}");
    let e = f.decode.run(&f.cache, &[b], &vec![0f32; 4 * D as usize]).expect_err("empty sequence");
    assert!(e.to_string().contains("holds 0 tokens"), "{e}");
    assert!(matches!(f.decode.run::<f32>(&f.cache, &[], &[]), Err(Error::Shape(_))));
    // A decode op built for another cache; a cache for a non-causal layout.
    let other = KvCache::new(wgpu_context(), &layout, KvCacheConfig::new(D, DType::F32, 64)).expect("cache");
    let e = f.decode.run(&other, &[a.id], &vec![0f32; 4 * D as usize]).expect_err("other cache");
    assert!(e.to_string().contains("another KvCache"), "{e}");
    let bidir = s2(S2Config::new(4, 16, 2, 3).bidirectional(1, 1));
    assert!(matches!(
        KvCache::new(wgpu_context(), &bidir, KvCacheConfig::new(D, DType::F32, 64)),
        Err(Error::Unsupported(_))
    ));
    assert!(matches!(
        KvCache::new(wgpu_context(), &layout, KvCacheConfig::new(D, DType::F32, 64).query_window(0)),
        Err(Error::Shape(_))
    ));
    // A segment smaller than one sequence's peak; a segment that does not exist.
    let e = KvCache::new(wgpu_context(), &layout, KvCacheConfig::new(D, DType::F32, 64).segment_pages(1))
        .expect_err("segment below a sequence's peak");
    assert!(e.to_string().contains("segment_pages 1 is below one sequence's peak"), "{e}");
    assert!(matches!(f.cache.pools(1), Err(Error::Shape(_))) && f.cache.pools(0).is_ok());

    // cu_seqlens that do not describe packed sequences.
    for (q, k, needle) in [
        (&[0, 3][..], &[0, 2][..], "3 queries but 2 keys"),
        (&[1, 3], &[0, 3], "cu_seqlens_q must start at 0"),
        (&[0, 3, 2], &[0, 3, 4], "cu_seqlens_q decreases at index 2"),
        (&[0, 3], &[0, 3, 4], "cu_seqlens_q has 2 offsets, cu_seqlens_k 3"),
    ] {
        let e = SeqLens::new(q, k).expect_err(needle);
        assert!(matches!(e, Error::Shape(_)) && e.to_string().contains(needle), "{e}");
    }
    let op = VarlenAttention::new(wgpu_context(), &layout, D, DType::F32).expect("varlen");
    let lens = SeqLens::from_lens(&[2], &[4]).expect("lens");
    let e = op.forward(&lens, &vec![0f32; 2 * 4 * D as usize], &tokens(3), &tokens(4)).expect_err("short k");
    assert!(
        matches!(e, Error::Length { tensor: "k", got, expected, .. } if got == 3 * row && expected == 4 * row),
        "{e}"
    );
}

#[test]
fn steady_state_decode_creates_no_buffers() {
    // Two sequences decoded one token at a time for 100 steps after a short warm-up, alternating the host
    // path and `encode` into caller buffers; every step judged against the oracle, and the op creates no
    // device buffer after the warm-up (the work list goes into reused buffers).
    let layout = s2(S2Config::new(4, 16, 2, 3).kv_heads(2));
    let dtype = DType::F32;
    let mut f = Fixture::new(&layout, dtype, KvCacheConfig::new(D, dtype, 320).sequences(2), 900);
    let (mut a, mut b) = (f.add(), f.add());
    f.append(&mut a, 150);
    f.append(&mut b, 37);
    let (device, queue) = common::device();
    let h = layout.num_heads();
    let row = (h * D) as usize;
    let q_buf = poisoned((2 * row * 4) as u64);
    let out = poisoned((2 * row * 4) as u64);
    let lse = poisoned((2 * h * 4) as u64);
    let step = |f: &mut Fixture, a: &mut Seq, b: &mut Seq, i: u32| {
        f.append(a, 1);
        f.append(b, 1);
        if i % 2 == 0 {
            f.check_decode(&[a, b], 1, &format!("steady-state host step {i}"));
            return;
        }
        let q = f.rng.tensor(2 * row, dtype);
        queue.write_buffer(&q_buf, 0, bytemuck::cast_slice(&q));
        let mut encoder = device.create_command_encoder(&Default::default());
        let (qv, ov) = (TensorView::new(&q_buf), TensorView::new(&out));
        f.decode.encode(&mut encoder, &f.cache, &[a.id, b.id], 1, &qv, &ov, (&lse, 0)).expect("decode encode");
        queue.submit([encoder.finish()]);
        let got: Vec<f32> = bytemuck::pod_collect_to_vec(&read_back(&out));
        let lse_dec: Vec<f32> = bytemuck::pod_collect_to_vec(&read_back(&lse));
        let lse_packed: Vec<f32> = (0..h as usize).flat_map(|hd| [lse_dec[hd], lse_dec[h as usize + hd]]).collect();
        judge(&format!("steady-state encode step {i}"), dtype, &got, &lse_packed, &f.oracle(&[a, b], 1, &q));
    };
    for i in 0..2 {
        step(&mut f, &mut a, &mut b, i);
    }
    let warm = f.decode.buffers_created();
    assert!(warm > 0, "the op reports the buffers it created");
    for i in 2..102 {
        step(&mut f, &mut a, &mut b, i);
        assert_eq!(f.decode.buffers_created(), warm, "step {i} created device buffers");
    }
}

#[test]
fn token_loops_patch_their_work_lists_between_query_blocks() {
    // GQA with stripes and a local window, two sequences out of phase, one token per step and speculative
    // windows of 3 (their tokens straddle block boundaries at some steps): every step judged against the
    // oracle, the work lists rebuilt only when a sequence's queried tokens enter another block, and then
    // only that sequence's page tables walked (in debug builds each list is also held to a fresh build).
    let layout = s2(S2Config::new(4, 16, 2, 3).kv_heads(2));
    for (dtype, q_len, window) in [(DType::F32, 1, 1), (DType::F16, 3, 3), (DType::F32, 1, 3)] {
        let config = KvCacheConfig::new(D, dtype, 400).sequences(2).query_window(window);
        let mut f = Fixture::new(&layout, dtype, config, 950 + q_len as u64);
        let (mut a, mut b) = (f.add(), f.add());
        f.append(&mut a, 100);
        f.append(&mut b, 41);
        let steps: u64 = 96;
        let mut per_build = 0;
        for i in 0..steps {
            f.append(&mut a, 1);
            f.append(&mut b, 1);
            f.check_decode(&[&a, &b], q_len, &format!("{dtype} q_len {q_len}: step {i}"));
            if i == 0 {
                per_build = f.decode.page_walks();
            }
        }
        // Per sequence and 16 steps: each queried token enters a new block once (the last one's step also
        // allocates the new page), and pages are freed once (when the window's first token moves on).
        let per_seq = steps.div_ceil(16) * (q_len as u64 + 1);
        let builds = f.decode.work_list_builds();
        assert!((2..=2 * per_seq + 1).contains(&builds), "{dtype} q_len {q_len}: {builds} builds in {steps} steps");
        // The sequences cross blocks at different steps: each rebuild after the first walks the page tables
        // of the one that crossed; the other's families keep their entries.
        let walks = f.decode.page_walks();
        assert!(walks <= per_build / 2 * (builds + 1), "{dtype} q_len {q_len}: {walks} page walks in {builds} builds");
        // Another order of the same sequences is another call: built afresh, and right.
        f.check_decode(&[&b, &a], q_len, &format!("{dtype} q_len {q_len}: swapped"));
        assert_eq!(f.decode.work_list_builds(), builds + 1);
    }
}

#[test]
fn a_token_loop_step_moves_the_key_shift_not_the_work_list() {
    // Two sequences, one token per step, inside their query blocks: each step patches the lists by their
    // key shift alone, which the kernels add, so the device copy of the items serves again; a step in
    // which the sequences grow by different counts rewrites the items. Every step judged against the
    // oracle, in debug builds each list also held to a fresh build.
    let layout = s2(S2Config::new(4, 16, 2, 3).kv_heads(2));
    for dtype in [DType::F32, DType::F16] {
        let mut f = Fixture::new(&layout, dtype, KvCacheConfig::new(D, dtype, 400).sequences(2), 990);
        let (mut a, mut b) = (f.add(), f.add());
        // The next queried tokens, 97.. and 33.., lie in blocks 6 (96..112) and 2 (32..48).
        f.append(&mut a, 97);
        f.append(&mut b, 33);
        f.check_decode(&[&a, &b], 1, &format!("{dtype}: first call"));
        let (builds, uploads) = (f.decode.work_list_builds(), f.decode.work_list_uploads());
        assert_eq!(uploads, 1, "{dtype}: the first call writes its items");
        for i in 0..5 {
            f.append(&mut a, 1);
            f.append(&mut b, 1);
            f.check_decode(&[&a, &b], 1, &format!("{dtype}: step {i}"));
        }
        assert_eq!(f.decode.work_list_builds(), builds, "{dtype}: steps inside the blocks patch the lists");
        assert_eq!(f.decode.work_list_uploads(), uploads, "{dtype}: the key shift moves them, not the items");
        f.append(&mut a, 2);
        f.append(&mut b, 1);
        f.check_decode(&[&a, &b], 1, &format!("{dtype}: uneven step"));
        assert_eq!(f.decode.work_list_builds(), builds, "{dtype}: an uneven step still patches");
        assert_eq!(f.decode.work_list_uploads(), uploads + 1, "{dtype}: an uneven step writes the items");
        for i in 0..3 {
            f.append(&mut a, 1);
            f.append(&mut b, 1);
            f.check_decode(&[&a, &b], 1, &format!("{dtype}: step {i} after the uneven one"));
        }
        assert_eq!(f.decode.work_list_uploads(), uploads + 1, "{dtype}: even steps again move the key shift");
    }
}

#[test]
fn append_encoded_from_device_buffers_equals_the_host_append() {
    // One cache filled by the host path, one by `append_encoded` from an interleaved [K | V | pad] buffer
    // (strided views at an offset), with the same rows: a prompt in one call (some of its blocks are never
    // needed), a chunk, then single tokens, each submitted. The pools end up byte for byte equal, and
    // decoding the encoded cache matches the oracle.
    let layout = s2(S2Config::new(4, 16, 2, 3).kv_heads(2));
    let (device, queue) = common::device();
    for (i, dtype) in F32_F16.into_iter().enumerate() {
        let config = KvCacheConfig::new(D, dtype, 256);
        let mut host = Fixture::new(&layout, dtype, config.clone(), 1_000 + i as u64);
        let mut dev = Fixture::new(&layout, dtype, config, 0);
        let mut seq = host.add();
        let dev_seq = dev.cache.add_sequence();
        let row = host.kv_row();
        for (step, n) in [150u32, 7].into_iter().chain(std::iter::repeat_n(1, 20)).enumerate() {
            let before = seq.k.len();
            host.append(&mut seq, n);
            let (k, v) = (&seq.k[before..], &seq.v[before..]);
            let stride = 2 * row + 4;
            let mut inter = vec![f32::NAN; 4 + n as usize * stride];
            for t in 0..n as usize {
                inter[4 + t * stride..][..row].copy_from_slice(&k[t * row..][..row]);
                inter[4 + t * stride + row..][..row].copy_from_slice(&v[t * row..][..row]);
            }
            let buf = upload(&common::to_bytes(dtype, &inter));
            let kv = TensorView::strided(&buf, 4, stride as u64);
            let vv = TensorView::strided(&buf, 4 + row as u64, stride as u64);
            let mut encoder = device.create_command_encoder(&Default::default());
            dev.cache.append_encoded(&mut encoder, dev_seq, &kv, &vv, n).unwrap_or_else(|e| panic!("step {step}: {e}"));
            queue.submit([encoder.finish()]);
            assert_eq!(dev.cache.seq_len(dev_seq).expect("len"), host.len(&seq));
        }
        let (hk, hv) = host.cache.pools(0).expect("host pools");
        let (dk, dv) = dev.cache.pools(0).expect("device pools");
        assert!(read_back(hk) == read_back(dk), "K pools differ ({dtype})");
        assert!(read_back(hv) == read_back(dv), "V pools differ ({dtype})");
        let dev_view = Seq { id: dev_seq, k: seq.k.clone(), v: seq.v.clone() };
        dev.check_decode(&[&dev_view], 1, &format!("decode after append_encoded ({dtype})"));
    }
}

#[test]
fn append_encoded_refuses_bad_views_and_changes_nothing() {
    let layout = s2(S2Config::new(4, 16, 2, 3).kv_heads(2));
    let (device, _) = common::device();
    let mut f = Fixture::new(&layout, DType::F16, KvCacheConfig::new(D, DType::F16, 64), 1_100);
    let mut seq = f.add();
    f.append(&mut seq, 10);
    let row = f.kv_row() as u64;
    let small = upload(&vec![0u8; (row * 2) as usize]);
    let big = upload(&vec![0u8; (row * 2 * 70) as usize]);
    let mut encoder = device.create_command_encoder(&Default::default());
    let cases: [(&str, TensorView, u32); 4] = [
        ("too small", TensorView::new(&small), 2),
        ("odd f16 offset", TensorView::strided(&big, 1, row), 1),
        ("stride below a row", TensorView::strided(&big, 0, row - 4), 1),
        ("past max_seq_len", TensorView::new(&big), 60),
    ];
    for (what, view, n) in cases {
        let r = f.cache.append_encoded(&mut encoder, seq.id, &view, &view, n);
        assert!(r.is_err(), "{what}: accepted");
        assert_eq!(f.cache.seq_len(seq.id).expect("len"), 10, "{what}: the sequence changed");
    }
}

/// Decodes the last `q_len` tokens of fresh histories of `lens` tokens at head dim `d` in f16 and judges
/// them against the oracle; returns the kernel's plan as `explain` says it.
fn decode_f16_at(layout: &Layout, d: u32, lens: &[u32], q_len: u32, policy: SplitPolicy, seed: u64) -> String {
    let ctx = wgpu_context();
    let (h, hk) = (layout.num_heads(), layout.num_kv_heads());
    let max = *lens.iter().max().expect("lens");
    let config = KvCacheConfig::new(d, DType::F16, max).sequences(lens.len() as u32).query_window(q_len);
    let mut cache = KvCache::new(ctx, layout, config).expect("cache");
    let mut rng = Rng::new(seed);
    let row = (hk * d) as usize;
    let (mut ks, mut vs, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    for &len in lens {
        let (k, v) = (rng.tensor(len as usize * row, DType::F16), rng.tensor(len as usize * row, DType::F16));
        let id = cache.add_sequence();
        // Two appends, the second across a page boundary.
        let cut = (len as usize / 2).max(1).min(len as usize);
        for r in [0..cut * row, cut * row..len as usize * row] {
            if !r.is_empty() {
                cache.append(id, &as_f16(&k[r.clone()]), &as_f16(&v[r])).expect("append");
            }
        }
        ks.extend(k);
        vs.extend(v);
        ids.push(id);
    }
    let q = rng.tensor((lens.len() as u32 * q_len * h * d) as usize, DType::F16);
    let op = Decode::new(&cache).expect("decode").with_split_policy(policy);
    let o = op.run(&cache, &ids, &as_f16(&q)).expect("run");
    let out: Vec<f32> = o.out.iter().map(|x| x.to_f32()).collect();
    let lens_q = SeqLens::from_lens(&vec![q_len; lens.len()], lens).expect("lens");
    let want = varlen_reference(layout, &lens_q, d, 1.0 / (d as f64).sqrt(), &q, &ks, &vs);
    let n = lens.len() as u32;
    let lse: Vec<f32> = (0..h)
        .flat_map(|hd| (0..n * q_len).map(move |t| (hd, t)))
        .map(|(hd, t)| o.lse[((t / q_len * h + hd) * q_len + t % q_len) as usize])
        .collect();
    let explain = op.explain(&cache, &ids, q_len).expect("explain");
    judge(&explain, DType::F16, &out, &lse, &want);
    explain
}

#[test]
fn decode_at_head_dim_128_f16_on_the_narrow_and_the_general_kernel() {
    let policies = [SplitPolicy::never(), SplitPolicy::split_to(1), SplitPolicy::default()];
    // GQA groups of 1, 4 and 8, block 64 and 16. Group 4: one token is narrow; windows of 2 and 4 tokens
    // (8 and 16 rows) run as 2 and 4 one-token families on the narrow kernel; 5 tokens would need 5 such
    // families and run as one family of 20 rows on the general kernel, as group 8 (8 rows a token) does.
    let cases = [
        (4, 4, 64, 1, true),
        (8, 2, 64, 1, true),
        (8, 2, 64, 2, true),
        (8, 2, 64, 4, true),
        (8, 2, 64, 5, false),
        (8, 1, 16, 1, false),
        (4, 2, 16, 2, true),
    ];
    for (i, (heads, kv, block, q_len, narrow)) in cases.into_iter().enumerate() {
        let layout = s2(S2Config::new(heads, block, 2, 3).kv_heads(kv));
        for (j, policy) in policies.into_iter().enumerate() {
            let lens = [q_len.max(2), 200, 131];
            let explain = decode_f16_at(&layout, 128, &lens, q_len, policy, 900 + (10 * i + j) as u64);
            assert_eq!(explain.contains("narrow"), narrow, "{explain}");
        }
    }
    // A history of 130 attended blocks split one block per item: the combine folds more partials than
    // its lanes (four loads at a time per lane).
    let layout = s2(S2Config::new(4, 16, 2, 1).kv_heads(2));
    let policy = SplitPolicy::split_to(1);
    decode_f16_at(&layout, 128, &[2080], 1, policy, 990);
}

#[test]
fn sequences_fill_segments_of_unequal_size_to_their_peak() {
    // 7 sequences in segments of at most 3: 3 + 3 + 1. Every sequence must find room at its peak (handing
    // sequences out by fewest-held would give the 1-sequence segment a second one).
    let layout = s2(S2Config::new(4, 16, 2, 3).kv_heads(2));
    let config = KvCacheConfig::new(D, DType::F32, 256).sequences(7);
    let per_seq = KvCache::pages_per_sequence(&layout, &config).expect("pages");
    let mut cache = KvCache::new(wgpu_context(), &layout, config.segment_pages(3 * per_seq)).expect("cache");
    assert_eq!(cache.segments(), 3);
    let row = (layout.num_kv_heads() * D) as usize;
    let kv = vec![0.5f32; 256 * row];
    for i in 0..7 {
        let id = cache.add_sequence();
        cache.append(id, &kv, &kv).unwrap_or_else(|e| panic!("sequence {i}: {e}"));
    }
    let per_segment: Vec<usize> = (0..3)
        .map(|g| cache.sequences().iter().filter(|&&s| cache.segment_of(s).expect("segment") == g).count())
        .collect();
    assert_eq!(per_segment.iter().sum::<usize>(), 7);
    assert!(per_segment.iter().all(|&n| n <= 3), "{per_segment:?}");
}

/// -inf scores (a K element +inf against a negative Q element) contribute nothing, and the NaN V of
/// those keys does not leak, also when whole splits of a family hold only such keys; a row whose keys
/// all score -inf, or whose Q holds a NaN, is NaN (O and LSE). On the general kernel (f32, head dim 32)
/// and the narrow one (f16, head dim 128, 4 heads per KV head), unsplit and one block per split.
#[test]
fn decode_minus_inf_scores_contribute_nothing_and_all_minus_inf_rows_are_nan() {
    let kernels = [(2, D, DType::F32), (4, 128, DType::F16)];
    if let Err(e) = common::nonfinite::judge_minus_inf_decodes(wgpu_context(), &kernels) {
        panic!("{e}");
    }
}

/// Records an append of `n` fresh random tokens to `seq` into `encoder` from a device buffer (K and V rows
/// interleaved per token) and extends its history; returns the buffer, to keep it alive until the submit.
fn append_recorded(f: &mut Fixture, encoder: &mut wgpu::CommandEncoder, seq: &mut Seq, n: u32) -> wgpu::Buffer {
    let row = f.kv_row();
    let (k, v) = (f.rng.tensor(n as usize * row, f.dtype), f.rng.tensor(n as usize * row, f.dtype));
    let kv: Vec<f32> = k.chunks(row).zip(v.chunks(row)).flat_map(|(a, b)| a.iter().chain(b).copied()).collect();
    let buf = upload(&common::to_bytes(f.dtype, &kv));
    let (kv_view, v_view) =
        (TensorView::strided(&buf, 0, 2 * row as u64), TensorView::strided(&buf, row as u64, 2 * row as u64));
    f.cache.append_encoded(encoder, seq.id, &kv_view, &v_view, n).unwrap_or_else(|e| panic!("append_encoded: {e}"));
    seq.k.extend(k);
    seq.v.extend(v);
    buf
}

/// A decode or varlen call recorded into a shared encoder, judged after the one submit.
struct Recorded {
    what: String,
    tokens: usize,
    out: wgpu::Buffer,
    lse: wgpu::Buffer,
    want: Reference,
    /// Decode's LSE is `[sequences, heads, q_len]` (q_len 1 here); varlen's `[heads, total_q]` like the oracle's.
    per_token_lse: bool,
}

#[test]
fn one_encoder_holds_several_appends_and_calls_of_each_op() {
    // Appends of one cache and calls of one Decode and one VarlenAttention op, all recorded into one encoder
    // and submitted once: each recorded call keeps its own parameters and work lists, so every output
    // matches the oracle on the history as it stood when the call was recorded.
    let layout = s2(S2Config::new(4, 16, 2, 3).kv_heads(2));
    let (device, queue) = common::device();
    for (i, dtype) in F32_F16.into_iter().enumerate() {
        let es = dtype.size();
        let mut f = Fixture::new(&layout, dtype, KvCacheConfig::new(D, dtype, 256).sequences(2), 1_300 + i as u64);
        let (mut a, mut b) = (f.add(), f.add());
        f.append(&mut a, 70);
        f.append(&mut b, 19);
        let h = layout.num_heads();
        let row = (h * D) as u64;
        let mut encoder = device.create_command_encoder(&Default::default());
        let mut keep = Vec::new();
        let mut calls = Vec::new();
        // Appends to both sequences, decodes, more appends (a's crosses a block and evicts), decodes again
        // (the same sequences, then the other order), and two varlen calls of different shapes.
        for (step, (na, nb)) in [(1u32, 3u32), (10, 1), (0, 0)].into_iter().enumerate() {
            if na > 0 {
                keep.push(append_recorded(&mut f, &mut encoder, &mut a, na));
                keep.push(append_recorded(&mut f, &mut encoder, &mut b, nb));
            }
            let order: [&Seq; 2] = if step < 2 { [&a, &b] } else { [&b, &a] };
            let q = f.rng.tensor((2 * row) as usize, dtype);
            let q_buf = upload(&common::to_bytes(dtype, &q));
            let (out, lse) = (poisoned(2 * row * es), poisoned(2 * h as u64 * 4));
            f.decode
                .encode(
                    &mut encoder,
                    &f.cache,
                    &[order[0].id, order[1].id],
                    1,
                    &TensorView::new(&q_buf),
                    &TensorView::new(&out),
                    (&lse, 0),
                )
                .unwrap_or_else(|e| panic!("decode encode, step {step}: {e}"));
            let want = f.oracle(&order, 1, &q);
            calls.push(Recorded {
                what: format!("decode {step} ({dtype})"),
                tokens: 2,
                out,
                lse,
                want,
                per_token_lse: true,
            });
            keep.push(q_buf);
        }
        let op = VarlenAttention::new(wgpu_context(), &layout, D, dtype).expect("varlen op");
        let kv_row = f.kv_row();
        for (j, (q_lens, k_lens)) in [([3u32, 20u32], [9u32, 20u32]), ([1, 5], [40, 5])].into_iter().enumerate() {
            let lens = SeqLens::from_lens(&q_lens, &k_lens).expect("lens");
            let q = f.rng.tensor(lens.total_q() as usize * row as usize, dtype);
            let k = f.rng.tensor(lens.total_k() as usize * kv_row, dtype);
            let v = f.rng.tensor(lens.total_k() as usize * kv_row, dtype);
            let (q_buf, k_buf, v_buf) = (
                upload(&common::to_bytes(dtype, &q)),
                upload(&common::to_bytes(dtype, &k)),
                upload(&common::to_bytes(dtype, &v)),
            );
            let out = poisoned(lens.total_q() as u64 * row * es);
            let lse = poisoned(lens.total_q() as u64 * h as u64 * 4);
            op.encode(
                &mut encoder,
                &lens,
                &TensorView::new(&q_buf),
                &TensorView::new(&k_buf),
                &TensorView::new(&v_buf),
                &TensorView::new(&out),
                (&lse, 0),
            )
            .unwrap_or_else(|e| panic!("varlen encode {j}: {e}"));
            let want = varlen_reference(&layout, &lens, D, 1.0 / (D as f64).sqrt(), &q, &k, &v);
            let tokens = lens.total_q() as usize;
            calls.push(Recorded {
                what: format!("varlen {j} ({dtype})"),
                tokens,
                out,
                lse,
                want,
                per_token_lse: false,
            });
            keep.extend([q_buf, k_buf, v_buf]);
        }
        queue.submit([encoder.finish()]);
        for c in &calls {
            let out = from_bytes(dtype, &read_back(&c.out));
            let lse: Vec<f32> = bytemuck::pod_collect_to_vec(&read_back(&c.lse));
            let lse = if c.per_token_lse {
                (0..h as usize)
                    .flat_map(|hd| (0..c.tokens).map(move |t| (hd, t)))
                    .map(|(hd, t)| lse[t * h as usize + hd])
                    .collect()
            } else {
                lse
            };
            judge(&c.what, dtype, &out, &lse, &c.want);
        }
        // The pools hold what the host path would have written: decoding now matches the oracle too.
        f.check_decode(&[&a, &b], 1, &format!("decode after the recorded appends ({dtype})"));
        // The same call recorded many times into one encoder (as a timing loop does) shares one upload set.
        let (q_buf, out, lse) = (poisoned(2 * row * es), poisoned(2 * row * es), poisoned(2 * h as u64 * 4));
        let record = |f: &Fixture, n: usize| {
            let mut encoder = device.create_command_encoder(&Default::default());
            for _ in 0..n {
                let (qv, ov) = (TensorView::new(&q_buf), TensorView::new(&out));
                f.decode.encode(&mut encoder, &f.cache, &[a.id, b.id], 1, &qv, &ov, (&lse, 0)).expect("decode encode");
            }
            queue.submit([encoder.finish()]);
            f.decode.buffers_created()
        };
        let once = record(&f, 1);
        assert_eq!(record(&f, 20), once, "identical calls in one encoder created buffers ({dtype})");
    }
}

#[test]
fn a_batch_of_appends_is_one_call_and_all_or_nothing() {
    // Three sequences appended in one call per step from one interleaved [K | V] buffer (prompt chunks for
    // some, single tokens for others): the pools equal those the host path fills with the same rows, and
    // decoding matches the oracle. A batch with a sequence twice, a bad member, or more pages than the pool
    // has for all of its members fails and changes nothing.
    let layout = s2(S2Config::new(4, 16, 2, 3).kv_heads(2));
    let (device, queue) = common::device();
    for (i, dtype) in F32_F16.into_iter().enumerate() {
        let config = KvCacheConfig::new(D, dtype, 256).sequences(3);
        let mut host = Fixture::new(&layout, dtype, config.clone(), 1_400 + i as u64);
        let mut dev = Fixture::new(&layout, dtype, config, 0);
        let mut seqs: Vec<Seq> = (0..3).map(|_| host.add()).collect();
        let ids: Vec<SeqId> = (0..3).map(|_| dev.cache.add_sequence()).collect();
        let row = host.kv_row();
        let stride = 2 * row as u64;
        for (step, counts) in [[40u32, 1, 17], [1, 1, 1], [1, 30, 1], [1, 1, 1]].into_iter().enumerate() {
            // The host path appends the rows; the same rows, sequence after sequence, go into one buffer.
            let mut inter = Vec::new();
            let mut starts = Vec::new();
            for (s, &n) in seqs.iter_mut().zip(&counts) {
                let before = s.k.len();
                host.append(s, n);
                starts.push((inter.len() / (2 * row)) as u64);
                for t in 0..n as usize {
                    inter.extend_from_slice(&s.k[before + t * row..][..row]);
                    inter.extend_from_slice(&s.v[before + t * row..][..row]);
                }
            }
            let buf = upload(&common::to_bytes(dtype, &inter));
            let batch: Vec<EncodedAppend> = (0..3)
                .map(|j| EncodedAppend {
                    seq: ids[j],
                    k: TensorView::strided(&buf, starts[j] * stride, stride),
                    v: TensorView::strided(&buf, starts[j] * stride + row as u64, stride),
                    tokens: counts[j],
                })
                .collect();
            let mut encoder = device.create_command_encoder(&Default::default());
            dev.cache.append_encoded_batch(&mut encoder, &batch).unwrap_or_else(|e| panic!("step {step}: {e}"));
            queue.submit([encoder.finish()]);
        }
        let (hk, hv) = host.cache.pools(0).expect("host pools");
        let (dk, dv) = dev.cache.pools(0).expect("device pools");
        assert!(read_back(hk) == read_back(dk), "K pools differ ({dtype})");
        assert!(read_back(hv) == read_back(dv), "V pools differ ({dtype})");
        let views: Vec<Seq> =
            seqs.iter().zip(&ids).map(|(s, &id)| Seq { id, k: s.k.clone(), v: s.v.clone() }).collect();
        dev.check_decode(&views.iter().collect::<Vec<_>>(), 1, &format!("decode after batched appends ({dtype})"));

        // Failing batches change nothing.
        let lens = |f: &Fixture| ids.iter().map(|&id| f.cache.seq_len(id).expect("len")).collect::<Vec<_>>();
        let before = (lens(&dev), dev.cache.free_pages());
        let rows = upload(&common::to_bytes(dtype, &vec![0.5; 4 * row]));
        let small = upload(&common::to_bytes(dtype, &vec![0.5; row]));
        let view = |b| TensorView::new(b);
        let good = |seq| EncodedAppend { seq, k: view(&rows), v: view(&rows), tokens: 2 };
        let cases: [(&str, Vec<EncodedAppend>); 3] = [
            ("a sequence twice", vec![good(ids[0]), good(ids[1]), good(ids[0])]),
            (
                "a view too small",
                vec![good(ids[0]), EncodedAppend { seq: ids[1], k: view(&small), v: view(&small), tokens: 2 }],
            ),
            ("no tokens", vec![good(ids[2]), EncodedAppend { tokens: 0, ..good(ids[1]) }]),
        ];
        for (what, batch) in cases {
            let mut encoder = device.create_command_encoder(&Default::default());
            assert!(dev.cache.append_encoded_batch(&mut encoder, &batch).is_err(), "{what}: accepted");
            assert_eq!((lens(&dev), dev.cache.free_pages()), before, "{what}: the cache changed");
        }
    }
    // Room for one sequence's append but not for two: the batch of both fails whole; one alone fits.
    let dtype = DType::F32;
    let mut probe = Fixture::new(&layout, dtype, KvCacheConfig::new(D, dtype, 256), 1_500);
    let mut s = probe.add();
    probe.append(&mut s, 100);
    let need = probe.cache.memory_report().resident_pages as u32;
    let config = KvCacheConfig::new(D, dtype, 256).sequences(2).max_pages(need + need / 2);
    let mut f = Fixture::new(&layout, dtype, config, 1_501);
    let (a, b) = (f.cache.add_sequence(), f.cache.add_sequence());
    let rows = upload(&common::to_bytes(dtype, &vec![0.5; 100 * f.kv_row()]));
    let append = |seq| EncodedAppend { seq, k: TensorView::new(&rows), v: TensorView::new(&rows), tokens: 100 };
    let free = f.cache.free_pages();
    let mut encoder = device.create_command_encoder(&Default::default());
    match f.cache.append_encoded_batch(&mut encoder, &[append(a), append(b)]) {
        Err(Error::CacheFull { .. }) => {}
        other => panic!("two appends past the pool: {other:?}"),
    }
    assert_eq!((f.cache.seq_len(a).ok(), f.cache.seq_len(b).ok(), f.cache.free_pages()), (Some(0), Some(0), free));
    f.cache.append_encoded_batch(&mut encoder, &[append(a)]).expect("one append fits");
    queue.submit([encoder.finish()]);
    assert_eq!(f.cache.seq_len(a).ok(), Some(100));

    // A full pool where one member's new pages are those another member frees: with a window of 3 queried
    // tokens, A's next token moves its first future query block on (two pages freed, none needed) while B's
    // starts a block (two needed). The batch [B, A] fits because every member's pages are freed first.
    let config = |pages| KvCacheConfig::new(D, dtype, 256).sequences(2).query_window(3).max_pages(pages);
    let (len_a, len_b) = (16 * 6 + 2, 16 * 3);
    let setup = |pages| {
        let mut f = Fixture::new(&layout, dtype, config(pages), 1_502);
        let (mut a, mut b) = (f.add(), f.add());
        f.append(&mut a, len_a);
        f.append(&mut b, len_b);
        (f, a, b)
    };
    let (mut probe, mut pa, mut pb) = setup(64);
    let used = probe.cache.memory_report().resident_pages as u32;
    let free = probe.cache.free_pages();
    probe.append(&mut pa, 1);
    assert_eq!(probe.cache.free_pages(), free + 2, "A's token frees two pages and takes none");
    probe.append(&mut pb, 1);
    assert_eq!(probe.cache.free_pages(), free, "B's token takes two pages");
    let (mut f, mut a, mut b) = setup(used);
    assert_eq!(f.cache.free_pages(), 0);
    let row = f.kv_row();
    let rows = upload(&common::to_bytes(dtype, &f.rng.tensor(row, dtype)));
    let one = |seq| EncodedAppend { seq, k: TensorView::new(&rows), v: TensorView::new(&rows), tokens: 1 };
    let mut encoder = device.create_command_encoder(&Default::default());
    f.cache.append_encoded_batch(&mut encoder, &[one(b.id), one(a.id)]).expect("B's pages are the ones A frees");
    queue.submit([encoder.finish()]);
    let token: Vec<f32> = from_bytes(dtype, &read_back(&rows));
    for s in [&mut a, &mut b] {
        s.k.extend_from_slice(&token);
        s.v.extend_from_slice(&token);
    }
    f.check_decode(&[&a, &b], 1, "decode after a batch that reused freed pages");
}
