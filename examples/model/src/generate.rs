//! Prefill and token generation: [`Model::prefill`], [`Model::step`], [`Model::generate`]. Every call
//! records the whole forward pass (all layers: norms, projections, RoPE, KV append, attention, MLP; then
//! the final norm, LM head and argmax) into one encoder and submits it once per prompt chunk or token.
//! Where the KV caches hold f16, each layer's rotated QKV rows are packed into f16 for the append and the
//! decode kernels, and the attention output is unpacked into the f32 activations.

use super::ops::{dispatch, elementwise, pass, Bound};
use super::state::{check_room, LayerOps, State};
use super::transformer::Model;
use s2attn::TensorView;
use s2attn::{Error, Result};

impl Model {
    fn check_state(&self, state: &State, tokens: u32) -> Result<()> {
        check_room(self.id, state.model_id, state.len, state.max_seq_len, tokens)
    }

    /// Records the forward pass of `m` rows at positions `state.len..state.len + m` (their ids already in
    /// `ids`); with `predict`, ending with the last row's logits and their argmax into `ids[state.len + m]`
    /// (a prompt chunk followed by more of the prompt must not overwrite its next id).
    fn encode_rows(&self, state: &mut State, encoder: &mut wgpu::CommandEncoder, m: u32, predict: bool) -> Result<()> {
        let c = &self.config;
        let gpu = &self.gpu;
        let pos0 = state.len;
        let (d, qkv_cols, q) = (c.d_model, c.qkv_cols(), c.heads * c.head_dim);
        let State {
            caches,
            decodes,
            seqs,
            buffers: b,
            packed,
            embed,
            layers,
            final_norm,
            lm_head,
            argmax,
            staging,
            ..
        } = state;
        // The decode kernels' QKV rows and output: the f32 activations, or their copies in the cache's type.
        let (qkv, attn) = packed.as_ref().map_or((&b.qkv, &b.attn), |p| (&p.qkv, &p.attn));
        dispatch(gpu, &mut pass(encoder), staging, embed, &[m, d, pos0, c.vocab], elementwise(m as u64 * d as u64))?;
        for (l, ops) in layers.iter().enumerate() {
            {
                let mut pass = pass(encoder);
                self.encode_pre_attention(&mut pass, staging, ops, m, 0, pos0)?;
                if let Some(p) = packed.as_ref() {
                    let copy = [m, qkv_cols, 0, qkv_cols, 0, qkv_cols];
                    dispatch(gpu, &mut pass, staging, &p.pack, &copy, elementwise(m as u64 * qkv_cols as u64 / 2))?;
                }
            }
            let row = qkv_cols as u64;
            let k = TensorView::strided(qkv, q as u64, row);
            let v = TensorView::strided(qkv, (q + c.kv_heads * c.head_dim) as u64, row);
            caches[l].append_encoded(encoder, seqs[l], &k, &v, m)?;
            let q_view = TensorView::strided(qkv, 0, row);
            let out = TensorView::new(attn);
            decodes[l].encode(encoder, &caches[l], &[seqs[l]], m, &q_view, &out, (&b.lse, 0))?;
            let mut pass = pass(encoder);
            if let Some(p) = packed.as_ref() {
                let copy = [m, q, 0, q, 0, q];
                dispatch(gpu, &mut pass, staging, &p.unpack, &copy, elementwise(m as u64 * q as u64 / 2))?;
            }
            self.encode_post_attention(&mut pass, staging, ops, m, 0)?;
        }
        if predict {
            self.encode_predict(&mut pass(encoder), staging, [final_norm, lm_head, argmax], m - 1, pos0 + m)?;
        }
        state.len += m;
        Ok(())
    }

    /// Records a layer's ops before attention for `m` rows whose residual stream starts at row `x_row` of
    /// the bound `x`, at positions `pos0..`: RMSNorm, the QKV projection and RoPE (into the chunk's QKV).
    pub(super) fn encode_pre_attention(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        staging: &mut [u32],
        ops: &LayerOps,
        m: u32,
        x_row: u32,
        pos0: u32,
    ) -> Result<()> {
        let (c, gpu) = (&self.config, &self.gpu);
        let mode = usize::from(m > 1);
        let groups = |n| self.pipelines.matmul_groups(mode, m, n);
        let (d, qkv_cols) = (c.d_model, c.qkv_cols());
        dispatch(gpu, pass, staging, &ops.attn_norm, &[m, d, x_row, c.norm_eps.to_bits()], (m as u64, 1))?;
        let qkv_params = [m, qkv_cols, d, 0, 0, d, 0, qkv_cols];
        dispatch(gpu, pass, staging, &ops.qkv[mode], &qkv_params, groups(qkv_cols))?;
        let rope = [m, c.heads + c.kv_heads, c.head_dim, qkv_cols, pos0, c.rope_theta.to_bits()];
        let pairs = m as u64 * (c.heads + c.kv_heads) as u64 * (c.head_dim / 2) as u64;
        dispatch(gpu, pass, staging, &ops.rope, &rope, elementwise(pairs))
    }

    /// Records a layer's ops after attention (its output in the chunk's `attn` rows) for `m` rows whose
    /// residual stream starts at row `x_row`: the output projection, the MLP and both residual adds.
    pub(super) fn encode_post_attention(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        staging: &mut [u32],
        ops: &LayerOps,
        m: u32,
        x_row: u32,
    ) -> Result<()> {
        let (c, gpu) = (&self.config, &self.gpu);
        let mode = usize::from(m > 1);
        let groups = |n| self.pipelines.matmul_groups(mode, m, n);
        let (d, q, f) = (c.d_model, c.heads * c.head_dim, c.ffn);
        let x_off = x_row * d;
        let wo = [m, d, q, 1, 0, q, x_off, d];
        dispatch(gpu, pass, staging, &ops.wo[mode], &wo, groups(d))?;
        dispatch(gpu, pass, staging, &ops.mlp_norm, &[m, d, x_row, c.norm_eps.to_bits()], (m as u64, 1))?;
        let gu = [m, 2 * f, d, 0, 0, d, 0, 2 * f];
        dispatch(gpu, pass, staging, &ops.gu[mode], &gu, groups(2 * f))?;
        dispatch(gpu, pass, staging, &ops.swiglu, &[m, f], elementwise(m as u64 * f as u64))?;
        let down = [m, d, f, 1, 0, f, x_off, d];
        dispatch(gpu, pass, staging, &ops.down[mode], &down, groups(d))
    }

    /// Records the final norm of residual row `x_row`, the LM head and the argmax into `ids[id_slot]`.
    pub(super) fn encode_predict(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        staging: &mut [u32],
        [final_norm, lm_head, argmax]: [&Bound; 3],
        x_row: u32,
        id_slot: u32,
    ) -> Result<()> {
        let (c, gpu) = (&self.config, &self.gpu);
        let d = c.d_model;
        dispatch(gpu, pass, staging, final_norm, &[1, d, x_row, c.norm_eps.to_bits()], (1, 1))?;
        let lm = [1, c.vocab, d, 0, 0, d, 0, c.vocab];
        dispatch(gpu, pass, staging, lm_head, &lm, self.pipelines.matmul_groups(0, 1, c.vocab))?;
        dispatch(gpu, pass, staging, argmax, &[c.vocab, id_slot], (1, 1))
    }

    /// Writes the staged params and submits `encoder`.
    fn submit(&self, state: &State, encoder: wgpu::CommandEncoder) {
        self.submit_with(&state.buffers.params, &state.staging, encoder);
    }

    /// Writes `staging` into `params` and submits `encoder`.
    pub(super) fn submit_with(&self, params: &wgpu::Buffer, staging: &[u32], encoder: wgpu::CommandEncoder) {
        let queue = self.gpu.queue();
        queue.write_buffer(params, 0, bytemuck::cast_slice(staging));
        queue.submit([encoder.finish()]);
    }

    /// Reads ids `from..from + n` back (after what was submitted finishes).
    fn read_ids(&self, state: &State, from: u32, n: u32) -> Result<Vec<u32>> {
        let b = &state.buffers;
        let mut encoder = self.gpu.device().create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(&b.ids, from as u64 * 4, &b.read_ids, 0, n as u64 * 4);
        self.gpu.queue().submit([encoder.finish()]);
        Ok(bytemuck::pod_collect_to_vec(&self.gpu.read_buffer(&b.read_ids, n as u64 * 4)?))
    }

    /// Feeds `tokens` (the prompt, or more of it) and returns the greedy next token (also kept on the GPU
    /// for [`Model::step`]). On a fresh state each layer runs its matmuls over the prompt in chunks of
    /// [`State::prefill_rows`] rows and its attention over the whole prompt with the library's forward
    /// op ([`s2attn::Attention`]: the tensor-core kernel where the device has one), K/V going into the
    /// paged caches on the GPU; more prompt after earlier tokens runs in chunks of
    /// [`State::decode_prefill_rows`] rows on the decode kernels over the caches, one submit each.
    pub fn prefill(&self, state: &mut State, tokens: &[u32]) -> Result<u32> {
        let n = self.config.check_prompt(tokens)?;
        self.check_state(state, n)?;
        let start = state.len;
        self.gpu.queue().write_buffer(&state.buffers.ids, start as u64 * 4, bytemuck::cast_slice(tokens));
        if start == 0 {
            self.prefill_forward(state, n)?;
            return Ok(self.read_ids(state, n, 1)?[0]);
        }
        let chunk = state.chunk;
        let mut done = 0;
        while done < n {
            let m = chunk.min(n - done);
            let mut encoder = self.gpu.device().create_command_encoder(&Default::default());
            self.encode_rows(state, &mut encoder, m, done + m == n)?;
            self.submit(state, encoder);
            done += m;
        }
        Ok(self.read_ids(state, start + n, 1)?[0])
    }

    /// Feeds the last predicted token and returns the next one: one submit, then a 4-byte readback.
    pub fn step(&self, state: &mut State) -> Result<u32> {
        self.steps(state, 1)?;
        Ok(self.read_ids(state, state.len, 1)?[0])
    }

    /// `n` steps, one submit each, with no readback in between; returns the `n` tokens generated.
    pub fn generate(&self, state: &mut State, n: u32) -> Result<Vec<u32>> {
        let first = state.len + 1;
        self.steps(state, n)?;
        self.read_ids(state, first, n)
    }

    fn steps(&self, state: &mut State, n: u32) -> Result<()> {
        if state.len == 0 {
            return Err(Error::Shape("step: prefill a prompt first".into()));
        }
        self.check_state(state, n)?;
        for _ in 0..n {
            let mut encoder = self.gpu.device().create_command_encoder(&Default::default());
            self.encode_rows(state, &mut encoder, 1, true)?;
            self.submit(state, encoder);
        }
        Ok(())
    }

    /// The logits `[vocab]` of the last position fed (after the queue drains).
    pub fn logits(&self, state: &State) -> Result<Vec<f32>> {
        let b = &state.buffers;
        let bytes = self.config.vocab as u64 * 4;
        let mut encoder = self.gpu.device().create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(&b.logits, 0, &b.read_logits, 0, bytes);
        self.gpu.queue().submit([encoder.finish()]);
        Ok(bytemuck::pod_collect_to_vec(&self.gpu.read_buffer(&b.read_logits, bytes)?))
    }
}
