//! Embedding in an application that owns the GPU: `Attention::encode` records into the caller's
//! encoder without submitting and gives the host path's outputs; Q/K/V interleaved per token in one QKV
//! buffer (several layers of it, filled by the app earlier in the same encoder) are read in place, one
//! submit for a hybrid dense + S2 stack; a device the app opened itself, with its own limits, is adopted;
//! steady-state encodes create no buffers. Fresh random inputs, outputs poisoned with NaN, every result held
//! against the f64 oracle.

mod common;

use common::{
    assert_matches, device, from_bytes, poisoned, read_back, scatter, to_bytes, upload, wgpu_context, Got, Inputs,
    Placement, Problem,
};
use s2attn::inference::{Decode, KvCache, KvCacheConfig, VarlenAttention};
use s2attn::{Attention, Context, DType, Layout, S2Config, TensorView};
use wgpu::util::DeviceExt;

const F32_F16: [DType; 2] = [DType::F32, DType::F16];

fn s2(c: S2Config) -> Layout {
    Layout::s2(c).expect("valid S2 config")
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Uploads `x` as the problem's dtype into three contiguous buffers.
fn upload_inputs(p: &Problem, x: &Inputs) -> [wgpu::Buffer; 3] {
    [&x.q, &x.k, &x.v].map(|t| upload(&to_bytes(p.dtype, t)))
}

#[test]
fn encode_records_without_submitting_and_matches_the_host_path() {
    let l = s2(S2Config::new(4, 16, 2, 3).kv_heads(2).offset(1));
    for (i, dtype) in F32_F16.into_iter().enumerate() {
        let p = Problem::new(&l, 2, 77, 64, dtype);
        let op = p.op(wgpu_context());
        let x = p.inputs(10_000 + i as u64);
        let host = common::run_host_op(&op, &p, &x);

        let [q, k, v] = upload_inputs(&p, &x);
        let out = poisoned(p.q_len() as u64 * dtype.size());
        let lse = poisoned(p.lse_len() as u64 * 4);
        let (dev, queue) = device();
        let mut encoder = dev.create_command_encoder(&Default::default());
        let views = [&q, &k, &v, &out].map(TensorView::new);
        op.encode(&mut encoder, &views[0], &views[1], &views[2], &views[3], (&lse, 0)).expect("encode");
        // `read_back` submits and waits: had `encode` submitted anything, O would be written by now.
        assert!(from_bytes(dtype, &read_back(&out)).iter().all(|x| x.is_nan()), "encode ran work before the submit");
        queue.submit([encoder.finish()]);

        let got = Got { out: from_bytes(dtype, &read_back(&out)), lse: bytemuck::pod_collect_to_vec(&read_back(&lse)) };
        assert_matches(&format!("encode {dtype}"), &p, &got, &p.reference(&x));
        assert!(bits(&got.out) == bits(&host.out), "{dtype}: encode and host outputs differ");
        assert!(bits(&got.lse) == bits(&host.lse), "{dtype}: encode and host LSE differ");
    }
}

#[test]
fn hybrid_layers_read_one_interleaved_qkv_buffer_in_one_submit() {
    // As an app lays them out: a fused QKV projection writes, per layer, [batch, seq, (heads + 2 kv_heads) *
    // head_dim], the layers one after another in one buffer; O likewise into one buffer, LSE at offsets.
    // Layer 0 is dense, layer 1 S2, as the paper recommends.
    let (heads, kv_heads, batch, seq, d) = (4u32, 2u32, 2u32, 70u32, 32u32);
    let layers = [
        Layout::dense(heads, kv_heads, 16, true).expect("dense"),
        s2(S2Config::new(heads, 16, 1, 4).kv_heads(kv_heads).offset(1)),
    ];
    let tokens = (batch * seq) as usize;
    let (qrow, kvrow) = ((heads * d) as usize, (kv_heads * d) as usize);
    let stride = qrow + 2 * kvrow;
    let (dev, queue) = device();
    for (t, dtype) in F32_F16.into_iter().enumerate() {
        let problems: Vec<Problem> = layers.iter().map(|l| Problem::new(l, batch, seq, d, dtype)).collect();
        let inputs: Vec<Inputs> =
            (0..layers.len()).map(|i| problems[i].inputs(11_000 + 10 * t as u64 + i as u64)).collect();
        let ops: Vec<Attention> = problems.iter().map(|p| p.op(wgpu_context())).collect();
        let lse_len = problems[0].lse_len();

        let mut qkv = vec![0f32; layers.len() * tokens * stride];
        for (i, x) in inputs.iter().enumerate() {
            let base = i * tokens * stride;
            scatter(&mut qkv, &x.q, qrow, Placement { offset: base, stride });
            scatter(&mut qkv, &x.k, kvrow, Placement { offset: base + qrow, stride });
            scatter(&mut qkv, &x.v, kvrow, Placement { offset: base + qrow + kvrow, stride });
        }
        // The app's "projection": QKV arrives by a copy recorded earlier in the same encoder.
        let projected = upload(&to_bytes(dtype, &qkv));
        let qkv_buf = poisoned(projected.size());
        let out = poisoned((layers.len() * tokens * qrow) as u64 * dtype.size());
        let lse = poisoned((layers.len() * lse_len) as u64 * 4);

        let mut encoder = dev.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(&projected, 0, &qkv_buf, 0, projected.size());
        for (i, op) in ops.iter().enumerate() {
            let base = (i * tokens * stride) as u64;
            let view = |at: usize| TensorView::strided(&qkv_buf, base + at as u64, stride as u64);
            let o = TensorView::strided(&out, (i * tokens * qrow) as u64, qrow as u64);
            op.encode(&mut encoder, &view(0), &view(qrow), &view(qrow + kvrow), &o, (&lse, (i * lse_len) as u64))
                .unwrap_or_else(|e| panic!("layer {i} {dtype}: {e}"));
        }
        queue.submit([encoder.finish()]);

        let out_all = from_bytes(dtype, &read_back(&out));
        let lse_all: Vec<f32> = bytemuck::pod_collect_to_vec(&read_back(&lse));
        for (i, (p, x)) in problems.iter().zip(&inputs).enumerate() {
            let got = Got {
                out: out_all[i * tokens * qrow..][..tokens * qrow].to_vec(),
                lse: lse_all[i * lse_len..][..lse_len].to_vec(),
            };
            assert_matches(&format!("layer {i} {dtype}"), p, &got, &p.reference(x));
        }
    }
}

/// Reads `buffer` on an arbitrary device (the app's), after everything submitted so far.
fn read_on(device: &wgpu::Device, queue: &wgpu::Queue, buffer: &wgpu::Buffer) -> Vec<u8> {
    let (tx, rx) = std::sync::mpsc::channel();
    wgpu::util::DownloadBuffer::read_buffer(device, queue, &buffer.slice(..), move |r| {
        let _ = tx.send(r.map(|b| b.to_vec()));
    });
    device.poll(wgpu::PollType::wait_indefinitely()).expect("app device poll");
    rx.recv().expect("download callback ran").expect("download maps")
}

#[test]
fn an_app_owned_device_is_adopted() {
    // The app's own instance, adapter and device: WebGPU default limits, no optional features (no
    // SHADER_F16, no subgroups, no timestamps), and it keeps the instance alive itself.
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default()))
        .unwrap_or_else(|e| panic!("the app test needs a wgpu adapter (lavapipe: mesa-vulkan-drivers): {e}"));
    let (app_device, app_queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("app device"),
        required_limits: wgpu::Limits::default(),
        ..Default::default()
    }))
    .expect("the app's device");
    let ctx = Context::from_wgpu_device(adapter.get_info(), app_device.clone(), app_queue.clone(), &[]);
    let wgpu_ctx = ctx.wgpu().expect("an adopted device is a wgpu context");
    assert!(
        wgpu_ctx.device() == &app_device && wgpu_ctx.queue() == &app_queue,
        "the context must use the app's device"
    );
    assert_eq!(ctx.caps().max_workgroup_storage, wgpu::Limits::default().max_compute_workgroup_storage_size);

    let l = s2(S2Config::new(4, 32, 2, 4).kv_heads(2).dense_heads(1));
    for (i, dtype) in F32_F16.into_iter().enumerate() {
        let p = Problem::new(&l, 1, 90, 64, dtype);
        let op = p.op(&ctx);
        let x = p.inputs(12_000 + i as u64);
        let want = p.reference(&x);
        assert_matches(&format!("app device, host path, {dtype}"), &p, &common::run_host_op(&op, &p, &x), &want);

        let mk = |bytes: &[u8]| {
            app_device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("app tensor"),
                contents: bytes,
                usage: common::USAGE,
            })
        };
        let [q, k, v] = [&x.q, &x.k, &x.v].map(|t| mk(&to_bytes(dtype, t)));
        let out = mk(&vec![0xFF; p.q_len() * dtype.size() as usize]);
        let lse = mk(&vec![0xFF; p.lse_len() * 4]);
        let mut encoder = app_device.create_command_encoder(&Default::default());
        let views = [&q, &k, &v, &out].map(TensorView::new);
        op.encode(&mut encoder, &views[0], &views[1], &views[2], &views[3], (&lse, 0))
            .expect("encode on the app device");
        app_queue.submit([encoder.finish()]);
        let got = Got {
            out: from_bytes(dtype, &read_on(&app_device, &app_queue, &out)),
            lse: bytemuck::pod_collect_to_vec(&read_on(&app_device, &app_queue, &lse)),
        };
        assert_matches(&format!("app device, encode, {dtype}"), &p, &got, &want);
    }
}

#[test]
fn steady_state_encodes_create_no_buffers() {
    // An app alternating between as many sets of views as the op caches (8): here one output buffer at eight
    // offsets, e.g. a ring of per-frame slots. After the first round, 100 encodes create nothing.
    const SETS: usize = 8;
    let l = s2(S2Config::new(2, 16, 1, 3));
    let p = Problem::new(&l, 1, 64, 32, DType::F32);
    let op = p.op(wgpu_context());
    let x = p.inputs(13_000);
    let [q, k, v] = upload_inputs(&p, &x);
    let slot = p.q_len();
    let out = poisoned((SETS * slot) as u64 * 4);
    let lse = poisoned((SETS * p.lse_len()) as u64 * 4);
    let row = (l.num_heads() * p.head_dim) as u64;
    let (dev, queue) = device();
    let encode_set = |set: usize| {
        let mut encoder = dev.create_command_encoder(&Default::default());
        let o = TensorView::strided(&out, (set * slot) as u64, row);
        let (qv, kv, vv) = (TensorView::new(&q), TensorView::new(&k), TensorView::new(&v));
        op.encode(&mut encoder, &qv, &kv, &vv, &o, (&lse, (set * p.lse_len()) as u64)).expect("encode");
        queue.submit([encoder.finish()]);
    };
    (0..SETS).for_each(encode_set);
    let created = op.buffers_created();
    (0..100).for_each(|i| encode_set(i % SETS));
    assert_eq!(op.buffers_created(), created, "steady-state encodes created buffers");
    // The same views again and again, too.
    (0..100).for_each(|_| encode_set(3));
    assert_eq!(op.buffers_created(), created, "repeated encodes with the same views created buffers");

    let want = p.reference(&x);
    let out_all: Vec<f32> = bytemuck::pod_collect_to_vec(&read_back(&out));
    let lse_all: Vec<f32> = bytemuck::pod_collect_to_vec(&read_back(&lse));
    for set in 0..SETS {
        let got = Got {
            out: out_all[set * slot..][..slot].to_vec(),
            lse: lse_all[set * p.lse_len()..][..p.lse_len()].to_vec(),
        };
        assert_matches(&format!("view set {set}"), &p, &got, &want);
    }
}

#[test]
fn a_device_below_the_kernels_limits_is_refused_by_name() {
    // WebGPU's downlevel limits allow 4 storage buffers per stage; the kernels bind more. Creating the ops
    // fails with Error::DeviceLimit naming the limit (not a bare wgpu validation error); a wider storage
    // limit on the same adapter is accepted, so the check is the limit and not the adapter.
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default()))
        .unwrap_or_else(|e| panic!("the test needs a wgpu adapter (lavapipe: mesa-vulkan-drivers): {e}"));
    let open = |storage: u32| {
        let limits =
            wgpu::Limits { max_storage_buffers_per_shader_stage: storage, ..wgpu::Limits::downlevel_defaults() };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("low-limit app device"),
            required_limits: limits,
            ..Default::default()
        }))
        .expect("a downlevel device");
        Context::from_wgpu_device(adapter.get_info(), device, queue, &[])
    };
    let l = s2(S2Config::new(4, 16, 2, 3).kv_heads(2));
    let p = Problem::new(&l, 1, 64, 32, DType::F32);
    let low = open(4);
    let named = |what: &str, r: Result<(), s2attn::Error>| match r {
        Err(s2attn::Error::DeviceLimit { limit, needed, max, .. }) => {
            assert_eq!(limit, "max_storage_buffers_per_shader_stage", "{what}");
            assert!(needed > max && max == 4, "{what}: needed {needed}, max {max}");
        }
        other => panic!("{what}: expected DeviceLimit, got {other:?}"),
    };
    named("Attention::new", Attention::new(&low, &l, p.shape()).map(|_| ()));
    let cache = KvCache::new(&low, &l, KvCacheConfig::new(32, DType::F32, 64)).expect("the cache needs no kernel");
    named("Decode::new", Decode::new(&cache).map(|_| ()));
    named("VarlenAttention::new", VarlenAttention::new(&low, &l, 32, DType::F32).map(|_| ()));

    let wide = open(10);
    let op = Attention::new(&wide, &l, p.shape()).expect("10 storage buffers per stage suffice");
    let x = p.inputs(14_000);
    assert_matches("downlevel device with 10 storage buffers", &p, &common::run_host_op(&op, &p, &x), &p.reference(&x));
}
