// Shared by the cooperative-matrix kernels (forward_coop.wgsl, backward_coop_dq.wgsl,
// backward_coop_dkdv.wgsl): how an op hands its outputs to the portable kernels when a non-finite value
// shows up. The matrix units cannot keep the IEEE rules of shared/nonfinite.wgsl (a masked P of 0 times
// an infinite V is NaN inside the product; a NaN row's sum fails `l > 0`), so these kernels only notice, in
// their epilogues, that something they write is non-finite (or, in the forward, that a row with an active
// key has no positive sum) and arm the redo: the host records the portable kernels after them with
// `dispatch_workgroups_indirect` from `redo_args`, whose dispatch sizes are zero (nothing runs) until a
// kernel arms them. The portable kernels then overwrite every output with the IEEE answer.
//
// `redo_args` holds 2n words: n words of indirect dispatch arguments (x, y, z per portable dispatch),
// cleared by the host before each op, then the n words they take when armed, written once by the host.

@group(0) @binding(14) var<storage, read_write> redo_args: array<atomic<u32>>;

// Whether any component of `x` is NaN or infinite (exponent bits all set). Bit tests, so that no
// compiler's float assumptions can drop a NaN.
fn nonfinite4(x: vec4<f32>) -> bool {
    let e = vec4<u32>(0x7f800000u);
    return any((bitcast<vec4<u32>>(x) & e) == e);
}

// Arms the portable redo: every dispatch size takes its armed value. Any number of invocations may call
// it; they all store the same words.
fn arm_redo() {
    let n = arrayLength(&redo_args) / 2u;
    for (var i = 0u; i < n; i++) {
        atomicStore(&redo_args[i], atomicLoad(&redo_args[n + i]));
    }
}
