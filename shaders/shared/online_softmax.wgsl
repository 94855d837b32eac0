// The online-softmax step of the flash-style kernels, for one query row per invocation: folds the row's
// BK scores p_s[r * BK ..] (base 2; NEG_BIG = masked) into its running max m_s[r] and sum l_s[r], turns
// them into probabilities in place, and leaves the factor that rescales the row's accumulator in
// alpha_s[r]. The including kernel declares p_s, m_s, l_s, alpha_s and the override BK.
fn online_softmax_row(r: u32) {
    let m_old = m_s[r];
    var m_new = m_old;
    for (var kk = 0u; kk < BK; kk++) {
        m_new = max(m_new, p_s[r * BK + kk]);
    }
    var alpha = 1.0;
    var sum = 0.0;
    if m_new > NEG_BIG {
        alpha = exp2(m_old - m_new);
        for (var kk = 0u; kk < BK; kk++) {
            let s = p_s[r * BK + kk];
            var p = 0.0;
            if s > NEG_BIG {
                p = exp2(s - m_new);
            }
            p_s[r * BK + kk] = p;
            sum += p;
        }
    } else {
        for (var kk = 0u; kk < BK; kk++) {
            p_s[r * BK + kk] = 0.0;
        }
    }
    l_s[r] = l_s[r] * alpha + sum;
    m_s[r] = m_new;
    alpha_s[r] = alpha;
}
