//! Inputs of `s2attn-bench`: fresh random tensors (uniform in [-1, 1), never zeros) in the problem's
//! storage type, and how many input sets a grid point rotates through so that a timed pass does not find
//! its inputs still in the GPU's cache from the pass before.

use s2attn::Element;

/// Element types the benchmark generates (the library's [`Element`] types).
pub trait Sample: Element + Send + Sync + 'static {
    /// Rounds an f32 to this type.
    fn quantize(x: f32) -> Self;
}
impl Sample for f32 {
    fn quantize(x: f32) -> Self {
        x
    }
}
impl Sample for half::f16 {
    fn quantize(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}
impl Sample for half::bf16 {
    fn quantize(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

/// `n` values uniform in [-1, 1) from a xorshift stream per seed, filled on every core (large tensors are
/// GBs).
pub fn random<T: Sample>(n: usize, seed: u64) -> Vec<T> {
    let mut out = vec![T::quantize(0.0); n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(16);
    let chunk = n.div_ceil(threads).max(1 << 16);
    std::thread::scope(|s| {
        for (i, part) in out.chunks_mut(chunk).enumerate() {
            s.spawn(move || {
                let mut x = (seed ^ 0x9e37_79b9_7f4a_7c15).wrapping_mul(i as u64 * 2 + 1) | 1;
                for v in part {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *v = T::quantize((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0);
                }
            });
        }
    });
    out
}

/// Widens to f32 (the oracle's input type).
pub fn widen<T: Element>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// Widens to f64 (to compare with the oracle).
pub fn widen64<T: Element>(x: &[T]) -> Vec<f64> {
    x.iter().map(|v| v.to_f32() as f64).collect()
}

/// One input set: the tensors of one call, each a fresh random vector (`[q, k, v]`, plus `d_out` for the
/// backward).
pub type Set<T> = Vec<Vec<T>>;

/// `count` input sets of tensors with `lens` elements each, every tensor from its own seed.
pub fn sets<T: Sample>(count: usize, lens: &[usize], seed: u64) -> Vec<Set<T>> {
    (0..count)
        .map(|s| {
            lens.iter()
                .enumerate()
                .map(|(i, &n)| random(n, seed.wrapping_add((s * lens.len() + i) as u64 * 0x1_0000)))
                .collect()
        })
        .collect()
}

/// Input sets a grid point rotates through. A call that touches `footprint` bytes gets one set when
/// `footprint >= threshold` (or the threshold is 0); otherwise enough sets that, between two uses of a set,
/// the other sets' passes touch at least `threshold` bytes (`1 + ceil(threshold / footprint)`), but no
/// more than the `runs` (warm-up plus timed) passes that use them. Memory stays below `threshold + 2 *
/// footprint`.
pub fn set_count(footprint: u64, threshold: u64, runs: u32) -> usize {
    if threshold == 0 || footprint >= threshold {
        return 1;
    }
    let needed = 1 + threshold.div_ceil(footprint.max(1));
    needed.min(runs.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_is_nonzero_bounded_and_seeded() {
        let a: Vec<f32> = random(1000, 7);
        assert!(a.iter().all(|&x| (-1.0..1.0).contains(&x)));
        assert!(a.iter().filter(|&&x| x == 0.0).count() < 3);
        assert_eq!(a, random::<f32>(1000, 7));
        assert_ne!(a, random::<f32>(1000, 8));
    }

    #[test]
    fn sets_are_distinct() {
        let s = sets::<half::f16>(3, &[64, 32], 1);
        assert_eq!((s.len(), s[0].len(), s[0][0].len(), s[0][1].len()), (3, 2, 64, 32));
        assert_ne!(s[0][0], s[1][0]);
        assert_ne!(s[0][0][..32], s[0][1][..]);
    }

    #[test]
    fn set_count_rotates_only_what_fits_in_cache() {
        let mib = 1 << 20;
        assert_eq!(set_count(200 * mib, 128 * mib, 13), 1);
        assert_eq!(set_count(128 * mib, 128 * mib, 13), 1);
        assert_eq!(set_count(64 * mib, 128 * mib, 13), 3);
        assert_eq!(set_count(37 * mib, 128 * mib, 13), 5);
        assert_eq!(set_count(mib, 128 * mib, 13), 13, "capped at the passes that use them");
        assert_eq!(set_count(mib, 0, 13), 1, "threshold 0: no rotation");
        assert_eq!(set_count(0, 128 * mib, 0), 1);
    }
}
