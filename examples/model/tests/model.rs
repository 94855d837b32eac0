//! The example transformer (`s2attn_model`) against its CPU f64 reference at a tiny size: logits after
//! the prefill and after every generated token, greedy tokens, the pipelined `generate` path against
//! step-by-step decoding, with f32 and f16 weights and a hybrid (dense + S2) stack whose S2 layer masks
//! part of the context and evicts pages. The prompt (40 tokens) is longer than a prefill chunk (16
//! rows): a fresh state prefills through the forward attention op, a prompt fed in two parts runs its
//! second part on the decode kernels over the caches; attention (forward op, KV caches, decode
//! kernels) in f32 and in f16.

mod common;

use common::{judge_logits, wgpu_context};
use s2attn::DType;
use s2attn_model::{reference, DenseLayers, Model, ModelConfig, State, Weights};

const PROMPT: usize = 40;
const STEPS: usize = 5;
const SEED: u64 = 11;

/// 2 layers (dense, S2), d_model 64, 4 heads / 2 KV heads of 32, vocab 97; block 16 so the S2 layer's
/// mask leaves blocks out at 45 tokens; prefill in chunks of 16 (16, 16, 8: a partial chunk too);
/// prefill attention in f32.
fn tiny(weights: DType) -> ModelConfig {
    let mut c = ModelConfig::new(97, 64, 4, 2, 32, 2);
    c.ffn = 96;
    c.block_size = 16;
    c.local_blocks = 1;
    c.vert_stride = 2;
    c.prefill_chunk = 16;
    c.weight_dtype = weights;
    c.prefill_dtype = Some(DType::F32);
    c
}

fn prompt(vocab: u32) -> Vec<u32> {
    let mut rng = Rng::new(5);
    (0..PROMPT).map(|_| (rng.next_u64() % vocab as u64) as u32).collect()
}

/// Prefills the prompt (in one call, or split at `split`: the rest fed after), steps, and holds every
/// logit within `rel` (relative to the largest logit) of the reference.
fn check_against_reference(config: ModelConfig, split: Option<usize>, rel: f64) {
    let weights = config.weight_dtype;
    let s2 = config.layout(1).expect("layout");
    assert!(s2.density((PROMPT + STEPS) as u32) < 1.0, "the S2 layer must mask something at this size");
    let ctx = wgpu_context();
    let w = Weights::random(&config, SEED);
    let model = Model::from_weights(ctx, config.clone(), &w).expect("model");
    let mut state = State::new(&model, 64).expect("state");
    let prompt = prompt(config.vocab);
    let mut tokens = prompt.clone();
    let mut gpu_logits = Vec::new();
    let first = match split {
        None => model.prefill(&mut state, &prompt).expect("prefill"),
        Some(at) => {
            model.prefill(&mut state, &prompt[..at]).expect("prefill");
            model.prefill(&mut state, &prompt[at..]).expect("prefill, continued")
        }
    };
    tokens.push(first);
    gpu_logits.push(model.logits(&state).expect("logits"));
    for _ in 0..STEPS {
        tokens.push(model.step(&mut state).expect("step"));
        gpu_logits.push(model.logits(&state).expect("logits"));
    }
    assert_eq!(state.len() as usize, PROMPT + STEPS);
    // The S2 layer's cache holds fewer pages than the dense layer's.
    let mem = state.memory_report();
    assert!(mem[1].resident_pages < mem[0].resident_pages, "S2 eviction: {mem:?}");
    // The reference reads every fed token; position PROMPT - 1 + i predicts token PROMPT + i.
    let fed = &tokens[..PROMPT + STEPS];
    let reference = reference::logits(&config, &w, fed).expect("reference");
    let decided = judge_logits(&reference, PROMPT - 1, &tokens, &gpu_logits, rel, &format!("{weights} weights"));
    assert!(decided > STEPS / 2, "too few clear argmaxes ({decided}) to judge greedy sampling");
}

#[test]
fn logits_and_greedy_tokens_match_the_reference_f32_weights() {
    check_against_reference(tiny(DType::F32), None, 1e-4);
}

#[test]
fn logits_and_greedy_tokens_match_the_reference_f16_weights() {
    check_against_reference(tiny(DType::F16), None, 1e-4);
}

/// The tiny model with its attention in f16: the forward op's Q/K/V, the KV caches and the decode
/// kernels' operands.
fn tiny_f16_attention() -> ModelConfig {
    let mut config = tiny(DType::F32);
    config.prefill_dtype = Some(DType::F16);
    config
}

#[test]
fn prefill_through_the_forward_op_in_f16_matches_the_reference() {
    let config = tiny_f16_attention();
    let model = Model::random(wgpu_context(), config.clone(), SEED).expect("model");
    assert_eq!(model.prefill_dtype(), DType::F16);
    // A page holds block_size tokens of K and V in f16.
    let state = State::new(&model, 64).expect("state");
    let page = (config.block_size * config.head_dim * 2 * 2) as u64;
    assert!(state.memory_report().iter().all(|r| r.page_bytes == page), "{:?}", state.memory_report());
    // f16 Q/K/V (10-bit mantissas) in the prompt's attention, the caches and the decode steps.
    check_against_reference(config, None, 5e-3);
}

#[test]
fn f16_weights_with_f16_attention_match_the_reference() {
    // The prefill's chunks of rows run on the cooperative-matrix matmul where the device has it
    // (activations rounded to f16 on the way in).
    let mut config = tiny(DType::F16);
    config.prefill_dtype = Some(DType::F16);
    check_against_reference(config, None, 5e-3);
}

#[test]
fn prompt_fed_in_two_parts_with_an_f16_kv_cache_matches_the_reference() {
    // The second part's chunks run on the f16 decode kernels over the f16 caches.
    check_against_reference(tiny_f16_attention(), Some(24), 5e-3);
}

#[test]
fn prompt_fed_in_two_parts_matches_the_reference() {
    // 24 tokens through the forward op, then 16 more on the decode kernels (chunks of 16, 8).
    let config = tiny(DType::F32);
    let model = Model::random(wgpu_context(), config.clone(), SEED).expect("model");
    let state = State::new(&model, 64).expect("state");
    assert_eq!((state.prefill_rows(), state.decode_prefill_rows()), (16, 16));
    check_against_reference(config, Some(24), 1e-4);
}

#[test]
fn generate_matches_step_by_step_and_reuses_buffers() {
    let config = tiny(DType::F32);
    let model = Model::random(wgpu_context(), config.clone(), SEED).expect("model");
    let prompt = prompt(config.vocab);
    let mut a = State::new(&model, 64).expect("state");
    let first_a = model.prefill(&mut a, &prompt).expect("prefill");
    // Each step waits for its token, so the next one finds the last one's buffers free again.
    let mut stepped: Vec<u32> = (0..2).map(|_| model.step(&mut a).expect("step")).collect();
    let created = a.buffers_created();
    stepped.extend((2..STEPS).map(|_| model.step(&mut a).expect("step")));
    assert_eq!(a.buffers_created(), created, "decode steps created buffers");
    // `generate` does not wait between tokens: how many tokens' work is in flight at once, and so how many
    // sets of uploads its decode calls hold, follows the device's pace (no buffer count to hold it to).
    let mut b = State::new(&model, 64).expect("state");
    let first_b = model.prefill(&mut b, &prompt).expect("prefill");
    let generated = model.generate(&mut b, 2).expect("generate");
    let rest = model.generate(&mut b, STEPS as u32 - 2).expect("generate");
    assert_eq!(first_a, first_b);
    assert_eq!(stepped, [generated, rest].concat());
    // Past max_seq_len: refused without a change.
    let err = model.generate(&mut b, 64).expect_err("over max_seq_len");
    assert!(matches!(err, s2attn::Error::Shape(_)), "{err}");
    assert_eq!(b.len() as usize, PROMPT + STEPS);
    // A token outside the vocabulary is refused.
    let mut c = State::new(&model, 64).expect("state");
    assert!(model.prefill(&mut c, &[config.vocab]).is_err());
    assert!(c.is_empty());
}

/// xorshift64: deterministic per seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The model-shape presets and hybrid patterns: Phi-3-small's dense attention on every other layer
/// (1, 3, ...), the 7B Llama shape's layer 0, every 4th layer from 0; both presets valid.
#[test]
fn presets_and_hybrid_patterns() {
    let phi = ModelConfig::phi3_small();
    assert_eq!(phi.pattern(), "SD".repeat(16));
    assert_eq!((phi.heads, phi.kv_heads, phi.head_dim, phi.d_model), (32, 8, 128, 4096));
    assert_eq!((phi.block_size, phi.local_blocks, phi.vert_stride), (64, 16, 8));
    let llama = ModelConfig::llama_7b();
    assert_eq!(llama.pattern(), format!("D{}", "S".repeat(31)));
    assert_eq!((llama.heads, llama.kv_heads, llama.ffn), (32, 32, 11_008));
    let every4 = llama.clone().with_dense_layers(DenseLayers::Every { period: 4, phase: 0 });
    assert_eq!(every4.pattern(), "DSSS".repeat(8));
    assert_eq!(llama.clone().all_dense().pattern(), "D".repeat(32));
    assert_eq!(llama.clone().with_dense_layers(DenseLayers::None).pattern(), "S".repeat(32));
    for c in [phi, llama, every4] {
        c.validate().expect("a preset is valid");
    }
}
