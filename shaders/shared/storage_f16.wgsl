// Storage accessors for f16 tensors, packed two halves per u32 so that no `enable f16` is needed and the
// kernel runs on adapters without shader-f16 support. Arithmetic stays f32.
@group(0) @binding(1) var<storage, read> q_buf: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read> k_buf: array<vec2<u32>>;
@group(0) @binding(3) var<storage, read> v_buf: array<vec2<u32>>;
@group(0) @binding(4) var<storage, read_write> o_buf: array<vec2<u32>>;

fn unpack4(w: vec2<u32>) -> vec4<f32> { return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)); }
fn load_q(i: u32) -> vec4<f32> { return unpack4(q_buf[i]); }
fn load_k(i: u32) -> vec4<f32> { return unpack4(k_buf[i]); }
fn load_v(i: u32) -> vec4<f32> { return unpack4(v_buf[i]); }
fn store_o(i: u32, x: vec4<f32>) { o_buf[i] = vec2<u32>(pack2x16float(x.xy), pack2x16float(x.zw)); }
