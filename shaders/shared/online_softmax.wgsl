// The online-softmax step of the flash-style kernels, for one query row per invocation: folds the row's
// BK scores (p_s[r * BK / 4 ..], four per vec4, base 2, NEG_BIG = masked) into its running max m_s[r]
// and sum l_s[r], turns them into probabilities in place, and leaves the factor that rescales the row's
// accumulator in alpha_s[r]. The including kernel declares p_s (vec4s), m_s, l_s, alpha_s and the
// override BK (a multiple of 4).
fn online_softmax_row(r: u32) {
    let b = r * BK / 4u;
    let m_old = m_s[r];
    var mv = vec4<f32>(m_old);
    for (var c = 0u; c < BK / 4u; c++) {
        mv = max(mv, p_s[b + c]);
    }
    let m_new = max(max(mv.x, mv.y), max(mv.z, mv.w));
    var alpha = 1.0;
    var sum = vec4<f32>(0.0);
    let live = m_new > NEG_BIG;
    if live {
        alpha = exp2(m_old - m_new);
    }
    for (var c = 0u; c < BK / 4u; c++) {
        let s = p_s[b + c];
        let p = select(vec4<f32>(0.0), exp2(s - m_new), s > vec4<f32>(NEG_BIG) & vec4<bool>(live));
        p_s[b + c] = p;
        sum += p;
    }
    l_s[r] = l_s[r] * alpha + sum.x + sum.y + sum.z + sum.w;
    m_s[r] = m_new;
    alpha_s[r] = alpha;
}
