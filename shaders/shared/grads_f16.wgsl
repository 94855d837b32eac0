// Backward storage accessors for f16 tensors (after `#include storage`, whose `unpack4` they use): O read
// through the forward's output binding, dO, and the gradients, packed two halves per u32.
@group(0) @binding(9) var<storage, read> do_buf: array<vec2<u32>>;
@group(0) @binding(10) var<storage, read_write> dk_buf: array<vec2<u32>>;
@group(0) @binding(11) var<storage, read_write> dv_buf: array<vec2<u32>>;
@group(0) @binding(12) var<storage, read_write> dq_buf: array<vec2<u32>>;

fn pack4(x: vec4<f32>) -> vec2<u32> { return vec2<u32>(pack2x16float(x.xy), pack2x16float(x.zw)); }
fn load_o(i: u32) -> vec4<f32> { return unpack4(o_buf[i]); }
fn load_do(i: u32) -> vec4<f32> { return unpack4(do_buf[i]); }
fn store_dq(i: u32, x: vec4<f32>) { dq_buf[i] = pack4(x); }
fn store_dk(i: u32, x: vec4<f32>) { dk_buf[i] = pack4(x); }
fn store_dv(i: u32, x: vec4<f32>) { dv_buf[i] = pack4(x); }
