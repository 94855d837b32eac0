//! `Weights`: the model's parameters on the host, drawn from a seeded generator (shared by the GPU model
//! and the CPU reference, so both run exactly the same numbers).

use super::config::ModelConfig;
use s2attn::DType;

/// One layer's parameters; matrices row-major `[in, out]`.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    /// RMSNorm weight before attention `[d_model]`.
    pub attn_norm: Vec<f32>,
    /// Fused Q, K, V projection `[d_model, qkv_cols]`.
    pub wqkv: Vec<f32>,
    /// Output projection `[heads * head_dim, d_model]`.
    pub wo: Vec<f32>,
    /// RMSNorm weight before the MLP `[d_model]`.
    pub mlp_norm: Vec<f32>,
    /// Fused gate and up projections `[d_model, 2 ffn]` (gate columns first).
    pub wgu: Vec<f32>,
    /// Down projection `[ffn, d_model]`.
    pub wdown: Vec<f32>,
}

/// Every parameter of the model (values already rounded to the weight storage type).
#[derive(Clone, Debug)]
pub struct Weights {
    /// Token embedding `[vocab, d_model]`.
    pub embed: Vec<f32>,
    /// Per layer.
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm weight `[d_model]`.
    pub final_norm: Vec<f32>,
    /// LM head `[d_model, vocab]`.
    pub lm_head: Vec<f32>,
}

/// xorshift64* numbers in [-1, 1), from the seed in the field.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    /// The next number.
    pub(crate) fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// The next `n` numbers.
    #[cfg(test)]
    pub(crate) fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

impl Weights {
    /// Whether these weights fit `config`: a valid configuration with as many layers as these weights
    /// (each tensor's length is checked where it is uploaded).
    pub fn check(&self, config: &ModelConfig) -> s2attn::Result<()> {
        config.validate()?;
        if self.layers.len() != config.layers.len() {
            return Err(s2attn::Error::Shape(format!(
                "weights of {} layers for a model of {}",
                self.layers.len(),
                config.layers.len()
            )));
        }
        Ok(())
    }

    /// Weights from `seed`: matrices uniform with variance 1 / fan-in, embeddings uniform in [-1, 1),
    /// norm weights near 1; rounded to `config.weight_dtype`. Each tensor draws from a stream of its own,
    /// so the layers are drawn in parallel (a 7B model's weights in seconds).
    pub fn random(config: &ModelConfig, seed: u64) -> Self {
        let round = rounding(config.weight_dtype);
        let draw = |stream: u64, n: u32, scale: f32, offset: f32| -> Vec<f32> {
            let mixed = (seed ^ stream.wrapping_mul(0xd1b5_4a32_d192_ed03)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let mut rng = Rng(mixed | 1);
            (0..n).map(|_| round(offset + scale * rng.next())).collect()
        };
        let fan = |fan_in: u32| (3.0 / fan_in as f32).sqrt();
        let (d, q) = (config.d_model, config.heads * config.head_dim);
        let layer = |l: u64| {
            let stream = 8 * (l + 1);
            LayerWeights {
                attn_norm: draw(stream, d, 0.1, 1.0),
                wqkv: draw(stream + 1, d * config.qkv_cols(), fan(d), 0.0),
                wo: draw(stream + 2, q * d, fan(q), 0.0),
                mlp_norm: draw(stream + 3, d, 0.1, 1.0),
                wgu: draw(stream + 4, d * 2 * config.ffn, fan(d), 0.0),
                wdown: draw(stream + 5, config.ffn * d, fan(config.ffn), 0.0),
            }
        };
        std::thread::scope(|s| {
            let embed = s.spawn(|| draw(0, config.vocab * d, 1.0, 0.0));
            let lm_head = s.spawn(|| draw(1, d * config.vocab, fan(d), 0.0));
            let layers: Vec<_> = (0..config.layers.len() as u64).map(|l| s.spawn(move || layer(l))).collect();
            Self {
                embed: join(embed),
                layers: layers.into_iter().map(join).collect(),
                final_norm: draw(2, d, 0.1, 1.0),
                lm_head: join(lm_head),
            }
        })
    }
}

/// The value of a drawing thread (its panic goes on in the caller).
fn join<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// The rounding of a weight to its storage type (what [`Weights`] hold: values of `dtype` as f32).
pub(crate) fn rounding(dtype: DType) -> fn(f32) -> f32 {
    match dtype {
        DType::F16 => |v| half::f16::from_f32(v).to_f32(),
        _ => |v| v,
    }
}
