// Backward storage accessors for f32 tensors (after `#include storage`): O read through the forward's
// output binding, dO, and the gradients, one vec4<f32> per 4 elements.
@group(0) @binding(9) var<storage, read> do_buf: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read_write> dk_buf: array<vec4<f32>>;
@group(0) @binding(11) var<storage, read_write> dv_buf: array<vec4<f32>>;
@group(0) @binding(12) var<storage, read_write> dq_buf: array<vec4<f32>>;

fn load_o(i: u32) -> vec4<f32> { return o_buf[i]; }
fn load_do(i: u32) -> vec4<f32> { return do_buf[i]; }
fn store_dq(i: u32, x: vec4<f32>) { dq_buf[i] = x; }
fn store_dk(i: u32, x: vec4<f32>) { dk_buf[i] = x; }
fn store_dv(i: u32, x: vec4<f32>) { dv_buf[i] = x; }
