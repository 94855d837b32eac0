//! Multi-device tests: a call split across two devices equals the single-device output and the f64 oracle,
//! for even and uneven head counts; a failing device gives an error naming it, and the set re-plans without
//! it. In CI the two devices are lavapipe (Vulkan) and llvmpipe (GL), or two devices on one adapter.

use s2attn::cpu::{attention_reference, rel_l2_error};
use s2attn::{Attention, Context, ContextOptions, DType, Error, Layout, MultiDevice, S2Config, Shape, Split};
use std::sync::OnceLock;

/// The two devices every test splits across, opened once for the whole binary (as tests/common's context):
/// the tests run in parallel, and opening a pair per test put a dozen devices (and GL probes) on one GPU at once.
fn two_devices() -> Vec<Context> {
    static PAIR: OnceLock<Vec<Context>> = OnceLock::new();
    PAIR.get_or_init(|| {
        let vulkan = Context::with_options(&ContextOptions::wgpu(Some("vulkan"), None));
        let gl = Context::with_options(&ContextOptions::wgpu(Some("gl"), None));
        match (vulkan, gl) {
            (Ok(a), Ok(b)) => vec![a, b],
            (Ok(a), Err(_)) | (Err(_), Ok(a)) => {
                eprintln!("one API only: using two devices on one adapter");
                let b = Context::with_options(&ContextOptions::wgpu(Some(a.backend_name()), Some(a.adapter_name())))
                    .expect("a second device on the same adapter");
                vec![a, b]
            }
            (Err(e), Err(_)) => panic!("no wgpu adapter (install mesa-vulkan-drivers): {e}"),
        }
    })
    .clone()
}

/// The single device the split outputs are compared with: the best wgpu adapter, opened once.
fn single_device() -> &'static Context {
    static ONE: OnceLock<Context> = OnceLock::new();
    ONE.get_or_init(|| Context::with_options(&ContextOptions::wgpu(None, None)).expect("a wgpu adapter"))
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

fn check_split(config: S2Config, seq: u32, speeds: Vec<f64>, seed: u64) -> Split {
    let set = MultiDevice::new(two_devices()).unwrap();
    let layout = Layout::s2(config).unwrap();
    let shape = Shape::new(2, seq, 32, DType::F32);
    set.set_speeds(&layout, &shape, speeds).unwrap();
    let plan = set.plan(&layout, shape).unwrap();
    println!("{plan}");
    assert_eq!(plan.assignments().len(), 2, "equal speeds share the work: {plan}");
    // Every (KV head, row) is assigned exactly once.
    let covered: u32 =
        plan.assignments().iter().map(|a| (a.kv_heads.end - a.kv_heads.start) * (a.rows.end - a.rows.start)).sum();
    assert_eq!(covered, layout.num_kv_heads() * seq, "every KV head and row is assigned once: {plan}");
    let (h, hk) = (layout.num_heads() as usize, layout.num_kv_heads() as usize);
    let tokens = 2 * seq as usize;
    let q = random(tokens * h * 32, seed);
    let k = random(tokens * hk * 32, seed + 1);
    let v = random(tokens * hk * 32, seed + 2);
    let split = set.forward(&plan, &q, &k, &v).unwrap();
    let single = Attention::new(single_device(), &layout, shape).unwrap().forward(&q, &k, &v).unwrap();
    let reference = attention_reference(&layout, 2, seq, 32, shape.softmax_scale() as f64, &q, &k, &v);
    let err = rel_l2_error(split.out.iter().map(|&x| x as f64), &reference.out);
    let lse_err = rel_l2_error(split.lse.iter().map(|&x| x as f64), &reference.lse);
    let vs_single =
        rel_l2_error(split.out.iter().map(|&x| x as f64), &single.out.iter().map(|&x| x as f64).collect::<Vec<_>>());
    assert!(err < 1e-5 && lse_err < 1e-5, "split vs oracle: out {err:.2e}, lse {lse_err:.2e}");
    assert!(vs_single < 1e-5, "split vs single device: {vs_single:.2e}");
    plan.split()
}

#[test]
fn one_kv_group_is_split_by_query_rows() {
    // A single KV group cannot be split by heads: the planner splits the rows (sequence parallel), and
    // each share reads only the keys up to its last row.
    let split = check_split(S2Config::new(2, 16, 2, 3).kv_heads(1), 700, vec![1.0, 1.0], 11);
    assert_eq!(split, Split::Rows);
}

#[test]
fn split_by_kv_groups_matches_single_device_and_oracle() {
    // 4 KV heads in groups of 2 query heads, equal speeds: two heads each.
    check_split(S2Config::new(8, 16, 2, 4).kv_heads(4), 200, vec![1.0, 1.0], 1);
}

#[test]
fn uneven_heads_and_speeds() {
    // 3 KV heads over two equally fast devices, with a dense head and an offset.
    check_split(S2Config::new(3, 32, 1, 3).dense_heads(1).offset(1), 161, vec![1.0, 1.0], 7);
}

#[test]
fn slow_device_gets_nothing() {
    let set = MultiDevice::new(two_devices()).unwrap();
    let layout = Layout::s2(S2Config::new(2, 16, 2, 4)).unwrap();
    let shape = Shape::new(1, 128, 32, DType::F32);
    set.set_speeds(&layout, &shape, vec![1000.0, 1.0]).unwrap();
    let plan = set.plan(&layout, shape).unwrap();
    assert_eq!(plan.assignments().len(), 1, "{plan}");
    assert_eq!(plan.assignments()[0].device, 0);
}

#[test]
fn failing_device_is_named_and_replanned_without() {
    let set = MultiDevice::new(two_devices()).unwrap();
    let layout = Layout::s2(S2Config::new(4, 16, 2, 4)).unwrap();
    let shape = Shape::new(1, 96, 32, DType::F32);
    set.set_speeds(&layout, &shape, vec![1.0, 1.0]).unwrap();
    let plan = set.plan(&layout, shape).unwrap();
    let n = 96 * 4 * 32;
    let (q, k, v) = (random(n, 3), random(n, 4), random(n, 5));
    set.inject_failure(1, true);
    match set.forward(&plan, &q, &k, &v) {
        Err(Error::DeviceFailed { index, device, .. }) => {
            assert_eq!(index, 1);
            assert_eq!(device, set.device_names()[1]);
        }
        other => panic!("expected DeviceFailed for device 1, got {:?}", other.map(|o| o.out.len())),
    }
    let rest = set.without(1).unwrap();
    let plan = rest.plan(&layout, shape).unwrap();
    assert!(plan.assignments().iter().all(|a| a.device == 0));
    let out = rest.forward(&plan, &q, &k, &v).unwrap();
    let reference = attention_reference(&layout, 1, 96, 32, shape.softmax_scale() as f64, &q, &k, &v);
    assert!(rel_l2_error(out.out.iter().map(|&x| x as f64), &reference.out) < 1e-5);
}

#[test]
fn measured_speeds_are_positive_and_cached() {
    let set = MultiDevice::new(two_devices()).unwrap();
    let layout = Layout::s2(S2Config::new(2, 16, 2, 4)).unwrap();
    let shape = Shape::new(1, 64, 32, DType::F32);
    let a = set.speeds(&layout, &shape).unwrap();
    assert!(a.iter().all(|&s| s > 0.0), "{a:?}");
    assert_eq!(a, set.speeds(&layout, &shape).unwrap(), "the second call reads the cache");
}
