//! The model's CUDA twin (`CudaModel`) against the CPU f64 reference at a tiny size: logits after a prefill
//! through the CUDA forward op (and after a prompt fed in two parts, whose second part runs token by token on
//! the decode path) and after every generated token (KV append and decode on device buffers), greedy tokens,
//! `generate` against step-by-step decoding, and the S2 layer's cache holding fewer pages. f16 weights and
//! activations: logits within 1e-2 of the largest. Needs a CUDA device; skips with a message without one.
#![cfg(feature = "cuda")]

mod common;

use common::judge_logits;
use s2attn::{Backend, Context, ContextOptions, DType};
use s2attn_model::{reference, CudaModel, CudaState, ModelConfig, Weights};
use std::sync::OnceLock;

const PROMPT: usize = 40;
const STEPS: usize = 5;
const SEED: u64 = 11;

fn cuda_context() -> Option<&'static Context> {
    static CTX: OnceLock<Option<Context>> = OnceLock::new();
    CTX.get_or_init(|| {
        let options = ContextOptions { backend: Backend::Cuda, ..ContextOptions::from_env().unwrap_or_default() };
        match Context::with_options(&options) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("skipping the CUDA model tests: no CUDA device ({e})");
                None
            }
        }
    })
    .as_ref()
}

/// 2 layers (dense, S2), d_model 64, 4 heads / 2 KV heads of 32, vocab 97, block 16 (the S2 layer masks
/// part of the context at 45 tokens), f16 weights and attention, the MLP in chunks of 16 rows.
fn tiny() -> ModelConfig {
    let mut c = ModelConfig::new(97, 64, 4, 2, 32, 2);
    c.ffn = 96;
    c.block_size = 16;
    c.local_blocks = 1;
    c.vert_stride = 2;
    c.prefill_chunk = 16;
    c.weight_dtype = DType::F16;
    c.prefill_dtype = Some(DType::F16);
    c
}

fn prompt(vocab: u32) -> Vec<u32> {
    (0..PROMPT as u64).map(|i| ((i * 2_654_435_761 + 7) % vocab as u64) as u32).collect()
}

fn check_against_reference(split: Option<usize>) {
    let Some(ctx) = cuda_context() else { return };
    let config = tiny();
    assert!(config.layout(1).expect("layout").density((PROMPT + STEPS) as u32) < 1.0);
    let w = Weights::random(&config, SEED);
    let model = CudaModel::from_weights(ctx, config.clone(), &w).expect("CUDA model");
    let mut state = CudaState::new(&model, 64).expect("state");
    let prompt = prompt(config.vocab);
    let first = match split {
        None => model.prefill(&mut state, &prompt).expect("prefill"),
        Some(at) => {
            model.prefill(&mut state, &prompt[..at]).expect("prefill");
            model.prefill(&mut state, &prompt[at..]).expect("prefill, continued")
        }
    };
    let mut tokens = prompt.clone();
    tokens.push(first);
    let mut logits = vec![model.logits(&state).expect("logits")];
    for _ in 0..STEPS {
        tokens.push(model.step(&mut state).expect("step"));
        logits.push(model.logits(&state).expect("logits"));
    }
    assert_eq!(state.len() as usize, PROMPT + STEPS);
    let mem = state.memory_report();
    assert!(mem[1].resident_pages < mem[0].resident_pages, "S2 eviction: {mem:?}");
    let reference = reference::logits(&config, &w, &tokens[..PROMPT + STEPS]).expect("reference");
    let decided = judge_logits(&reference, PROMPT - 1, &tokens, &logits, 1e-2, "CUDA model");
    assert!(decided > STEPS / 2, "too few clear argmaxes ({decided}) to judge greedy sampling");
}

#[test]
fn cuda_model_logits_and_greedy_tokens_match_the_reference() {
    check_against_reference(None);
}

#[test]
fn cuda_model_prompt_fed_in_two_parts_matches_the_reference() {
    check_against_reference(Some(24));
}

#[test]
fn cuda_model_generate_matches_step_by_step() {
    let Some(ctx) = cuda_context() else { return };
    let config = tiny();
    let model = CudaModel::from_weights(ctx, config.clone(), &Weights::random(&config, SEED)).expect("CUDA model");
    let prompt = prompt(config.vocab);
    let mut a = CudaState::new(&model, 64).expect("state");
    let first_a = model.prefill(&mut a, &prompt).expect("prefill");
    let stepped: Vec<u32> = (0..STEPS).map(|_| model.step(&mut a).expect("step")).collect();
    let mut b = CudaState::new(&model, 64).expect("state");
    let first_b = model.prefill(&mut b, &prompt).expect("prefill");
    let generated = model.generate(&mut b, STEPS as u32).expect("generate");
    assert_eq!((first_a, stepped), (first_b, generated));
    // Past max_seq_len, and a token outside the vocabulary: refused without a change.
    assert!(matches!(model.generate(&mut b, 64), Err(s2attn::Error::Shape(_))));
    assert_eq!(b.len() as usize, PROMPT + STEPS);
    let mut c = CudaState::new(&model, 64).expect("state");
    assert!(model.prefill(&mut c, &[config.vocab]).is_err());
    assert!(c.is_empty());
    // f32 weights are refused by name.
    let mut f32_config = config;
    f32_config.weight_dtype = DType::F32;
    let refused = CudaModel::from_weights(ctx, f32_config.clone(), &Weights::random(&f32_config, SEED));
    assert!(matches!(refused, Err(s2attn::Error::Unsupported(_))));
}
