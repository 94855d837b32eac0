// Shared by the decode split kernels (decode_split.wgsl, decode_split_narrow.wgsl), after
// shared/decode.wgsl and their `override HALF` (1: f16 storage, 0: f32): Q and O bound as 32-bit words,
// K and V as 16-byte words (8 halves or 4 floats, so that each load is one wide coalesced access), their
// accessors, and the entries' row masks. The combine pass keeps the plain storage accessors.

@group(0) @binding(1) var<storage, read> q_buf: array<u32>;
@group(0) @binding(2) var<storage, read> k_buf: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> v_buf: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read_write> o_buf: array<u32>;

// Whether row r (of 64) attends an entry with row mask `mask`.
fn row_attends(mask: vec2<u32>, r: u32) -> bool {
    let word = select(mask.x, mask.y, r >= 32u);
    return ((word >> (r % 32u)) & 1u) == 1u;
}

// Four elements of Q at vec4 unit u (element 4u).
fn load_q4(u: u32) -> vec4<f32> {
    if HALF == 1u {
        return vec4<f32>(unpack2x16float(q_buf[2u * u]), unpack2x16float(q_buf[2u * u + 1u]));
    }
    return bitcast<vec4<f32>>(vec4<u32>(q_buf[4u * u], q_buf[4u * u + 1u], q_buf[4u * u + 2u], q_buf[4u * u + 3u]));
}

// Stores four elements of O at vec4 unit u.
fn store_o4(u: u32, x: vec4<f32>) {
    if HALF == 1u {
        o_buf[2u * u] = pack2x16float(x.xy);
        o_buf[2u * u + 1u] = pack2x16float(x.zw);
    } else {
        let b = bitcast<vec4<u32>>(x);
        o_buf[4u * u] = b.x;
        o_buf[4u * u + 1u] = b.y;
        o_buf[4u * u + 2u] = b.z;
        o_buf[4u * u + 3u] = b.w;
    }
}

// A 16-byte word of K or V as its first and last four elements (f32 storage: all four in `lo4`, `hi4`
// zero).
fn lo4(x: vec4<u32>) -> vec4<f32> {
    if HALF == 1u {
        return vec4<f32>(unpack2x16float(x.x), unpack2x16float(x.y));
    }
    return bitcast<vec4<f32>>(x);
}
fn hi4(x: vec4<u32>) -> vec4<f32> {
    if HALF == 1u {
        return vec4<f32>(unpack2x16float(x.z), unpack2x16float(x.w));
    }
    return vec4<f32>(0.0);
}

// K offset, V offset and key stride in 16-byte words (the parameters give them in 4-element units).
fn kv_words() -> vec3<u32> {
    let per = (8u - 4u * (1u - HALF)) / 4u;
    return vec3<u32>(params.k_off / per, params.v_off / per, params.kv_tok_stride / per);
}
