// Y[M, N] = X[M, K] · W[K, N], or Y += X · W (`accumulate`: the residual add, fused), for the chunks of
// rows of a prefill on cooperative matrices (16x16x16 f16 x f16 -> f32, tensor cores): f16 weights
// (W_F16 = 1, rows padded as weights.wgsl says) and f32 activations rounded to f16 on the way in (as the
// attention's f16 operands are), products accumulated in f32.
//
// A workgroup computes a TILE_M x TILE_N = 128 x 128 tile of Y with NSG = 8 subgroups of 32 (the host
// picks this kernel only where the subgroup size is fixed at 32): subgroup g owns rows 32 (g / 2).. and columns 64 (g % 2).. of
// the tile, 2 x 4 accumulator matrices. Per chunk of BK = 32 of K the workgroup stages X and W in
// workgroup memory as f16 (rows padded against bank conflicts); the next chunk's global loads are issued
// into registers before the current chunk's multiply-adds, so they are in flight while the matrices work.
// The sums leave through a 16 x 16 slot of workgroup memory per subgroup; rows past M and columns past N
// are not written.

enable f16;
enable wgpu_cooperative_matrix;

#include matmul_io.wgsl

const TILE_M: u32 = 128u;
const TILE_N: u32 = 128u;
const BK: u32 = 32u;
const NSG: u32 = 8u;                   // subgroups: 4 row blocks of 32 x 2 column blocks of 64
const XS4: u32 = (BK + 8u) / 4u;       // vec4s per staged X row
const WS4: u32 = (TILE_N + 8u) / 4u;   // vec4s per staged W row
const WG: u32 = 256u;                  // NSG subgroups of 32
// Per invocation and chunk: X vec4s (TILE_M * BK / 4 over the workgroup) and W words of 8 f16
// (BK * TILE_N / 8).
const XF: u32 = TILE_M * BK / 4u / WG;
const WF: u32 = BK * TILE_N / 8u / WG;

#include weights.wgsl

alias AM = coop_mat16x16<f16, A>;
alias BM = coop_mat16x16<f16, B>;
alias CM = coop_mat16x16<f32, C>;

var<workgroup> x_s: array<vec4<f16>, 1280>;   // TILE_M * XS4
var<workgroup> w_s: array<vec4<f16>, 1088>;   // BK * WS4
var<workgroup> out_s: array<vec4<f32>, 512>;  // NSG slots of 16 x 16
var<workgroup> subgroups_ok: u32;

// One chunk's global loads, held in registers until they are staged.
struct Fetch {
    xv: array<vec4<f32>, XF>,
    wq: array<vec4<u32>, WF>,
}

// X rows m0.. and W columns n0.. of the K chunk at k0 (zeros past M, K and the padded W row). Invocation
// `lid` loads X vec4 i = lid + j WG (row i / (BK / 4)) and W word i = lid + j WG (row i / (TILE_N / 8)).
fn fetch(lid: u32, m0: u32, n0: u32, k0: u32) -> Fetch {
    var f: Fetch;
    for (var j = 0u; j < XF; j++) {
        let i = lid + j * WG;
        let row = m0 + i / (BK / 4u);
        let k = k0 + 4u * (i % (BK / 4u));
        var v = vec4<f32>(0.0);
        if row < params.m {
            let base = params.x_off + row * params.x_stride + k;
            if k + 3u < params.k {
                v = vec4<f32>(x[base], x[base + 1u], x[base + 2u], x[base + 3u]);
            } else {
                if k < params.k {
                    v.x = x[base];
                }
                if k + 1u < params.k {
                    v.y = x[base + 1u];
                }
                if k + 2u < params.k {
                    v.z = x[base + 2u];
                }
            }
        }
        f.xv[j] = v;
    }
    let ws = row_stride(params.n);
    for (var j = 0u; j < WF; j++) {
        let i = lid + j * WG;
        let k = k0 + i / (TILE_N / 8u);
        let n = n0 + 8u * (i % (TILE_N / 8u));
        var q = vec4<u32>(0u);
        if k < params.k && n < ws {
            q = w[(k * ws + n) / 8u];
        }
        f.wq[j] = q;
    }
    return f;
}

// Stores a fetched chunk to x_s / w_s as f16.
fn stash(lid: u32, f: ptr<function, Fetch>) {
    for (var j = 0u; j < XF; j++) {
        let i = lid + j * WG;
        x_s[(i / (BK / 4u)) * XS4 + i % (BK / 4u)] = vec4<f16>((*f).xv[j]);
    }
    for (var j = 0u; j < WF; j++) {
        let i = lid + j * WG;
        let q = (*f).wq[j];
        let at = (i / (TILE_N / 8u)) * WS4 + 2u * (i % (TILE_N / 8u));
        w_s[at] = vec4<f16>(vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y)));
        w_s[at + 1u] = vec4<f16>(vec4<f32>(unpack2x16float(q.z), unpack2x16float(q.w)));
    }
}

// Staged X rows r0..r0+15, K columns 16kt.. as an A matrix.
fn xmat(r0: u32, kt: u32) -> AM {
    return coopLoadT<AM>(&x_s[r0 * XS4 + 4u * kt], XS4);
}

// Staged W rows 16kt.., columns c0..c0+15 as a B matrix.
fn wmat(kt: u32, c0: u32) -> BM {
    return coopLoadT<BM>(&w_s[16u * kt * WS4 + c0 / 4u], WS4);
}

// Writes accumulator `c` (tile rows r0.., columns c0..) to Y through the subgroup's slot: each lane
// writes 8 of its 256 elements, 16 consecutive lanes one row.
fn emit(c: CM, g: u32, lane: u32, sg_size: u32, row0: u32, col0: u32) {
    coopStoreT(c, &out_s[64u * g], 4u);
    subgroupBarrier();
    for (var e = lane; e < 256u; e += sg_size) {
        let row = row0 + e / 16u;
        let col = col0 + e % 16u;
        if row < params.m && col < params.n {
            var v = out_s[64u * g + e / 4u][e % 4u];
            let yi = params.y_off + row * params.y_stride + col;
            if params.accumulate != 0u {
                v += y[yi];
            }
            y[yi] = v;
        }
    }
    subgroupBarrier();
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(num_subgroups) n_sg: u32,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) sg_size: u32,
) {
    let n0 = wid.x * TILE_N;
    let m0 = wid.y * TILE_M;
    let g = min(sg_id, NSG - 1u);
    // The tile split needs exactly NSG subgroups: any other count writes NaN over the tile rather than
    // wrong sums.
    if lid == 0u {
        subgroups_ok = u32(n_sg == NSG);
    }
    if workgroupUniformLoad(&subgroups_ok) == 0u {
        for (var i = lid; i < TILE_M * TILE_N; i += WG) {
            let row = m0 + i / TILE_N;
            let col = n0 + i % TILE_N;
            if row < params.m && col < params.n {
                y[params.y_off + row * params.y_stride + col] = bitcast<f32>(0x7fc00000u);
            }
        }
        return;
    }
    let r0 = 32u * (g / 2u);
    let c0 = 64u * (g % 2u);
    var a00 = CM();
    var a01 = CM();
    var a02 = CM();
    var a03 = CM();
    var a10 = CM();
    var a11 = CM();
    var a12 = CM();
    var a13 = CM();
    var f = fetch(lid, m0, n0, 0u);
    for (var k0 = 0u; k0 < params.k; k0 += BK) {
        workgroupBarrier();
        stash(lid, &f);
        workgroupBarrier();
        if k0 + BK < params.k {
            f = fetch(lid, m0, n0, k0 + BK);
        }
        for (var kt = 0u; kt < BK / 16u; kt++) {
            let x0 = xmat(r0, kt);
            let x1 = xmat(r0 + 16u, kt);
            let w0 = wmat(kt, c0);
            let w1 = wmat(kt, c0 + 16u);
            let w2 = wmat(kt, c0 + 32u);
            let w3 = wmat(kt, c0 + 48u);
            a00 = coopMultiplyAdd(x0, w0, a00);
            a01 = coopMultiplyAdd(x0, w1, a01);
            a02 = coopMultiplyAdd(x0, w2, a02);
            a03 = coopMultiplyAdd(x0, w3, a03);
            a10 = coopMultiplyAdd(x1, w0, a10);
            a11 = coopMultiplyAdd(x1, w1, a11);
            a12 = coopMultiplyAdd(x1, w2, a12);
            a13 = coopMultiplyAdd(x1, w3, a13);
        }
    }
    let row = m0 + r0;
    let col = n0 + c0;
    emit(a00, g, lane, sg_size, row, col);
    emit(a01, g, lane, sg_size, row, col + 16u);
    emit(a02, g, lane, sg_size, row, col + 32u);
    emit(a03, g, lane, sg_size, row, col + 48u);
    emit(a10, g, lane, sg_size, row + 16u, col);
    emit(a11, g, lane, sg_size, row + 16u, col + 16u);
    emit(a12, g, lane, sg_size, row + 16u, col + 32u);
    emit(a13, g, lane, sg_size, row + 16u, col + 48u);
}
