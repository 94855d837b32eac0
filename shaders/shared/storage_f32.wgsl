// Storage accessors for f32 tensors: one vec4<f32> per 4 elements.
@group(0) @binding(1) var<storage, read> q_buf: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k_buf: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v_buf: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> o_buf: array<vec4<f32>>;

fn load_q(i: u32) -> vec4<f32> { return q_buf[i]; }
fn load_k(i: u32) -> vec4<f32> { return k_buf[i]; }
fn load_v(i: u32) -> vec4<f32> { return v_buf[i]; }
fn store_o(i: u32, x: vec4<f32>) { o_buf[i] = x; }
