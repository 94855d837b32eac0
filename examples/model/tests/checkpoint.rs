//! Hugging Face checkpoints into the example transformer (`s2attn_model::Checkpoint`): tiny checkpoints
//! written here from `Weights::random` under both naming families (Llama's separate projections in F32
//! over two shards; Phi-3's fused ones in BF16 with tied embeddings) read back exactly and run on the GPU
//! against the CPU reference; `config.json` of both families and of real models; and the errors of a
//! broken checkpoint or of an architecture the model does not compute, each naming the tensor or field.

mod common;

use common::wgpu_context;
use s2attn::{DType, Error};
use s2attn_model::{reference, Checkpoint, HfConfig, Model, ModelConfig, State, Weights};
use safetensors::{Dtype, View};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Family {
    /// `LlamaForCausalLM`: separate Q, K, V and gate, up projections.
    Llama,
    /// `Phi3ForCausalLM`: fused `qkv_proj` and `gate_up_proj`.
    Phi3,
}

/// vocab 64, d_model 32, 4 heads / 2 KV heads of 32 (wider than the residual stream: `head_dim` is
/// explicit), MLP 48, 2 layers; prefill attention in f32.
fn llama_tiny() -> ModelConfig {
    let mut c = ModelConfig::new(64, 32, 4, 2, 32, 2);
    c.ffn = 48;
    c.norm_eps = 1e-6;
    c.rope_theta = 500000.0;
    c.prefill_dtype = Some(DType::F32);
    c
}

/// vocab 64, d_model 64, 2 heads / 1 KV head of 32 (`hidden_size / num_attention_heads`), MLP 48, 2
/// layers, f16 weights; prefill attention in f32.
fn phi3_tiny() -> ModelConfig {
    let mut c = ModelConfig::new(64, 64, 2, 1, 32, 2);
    c.ffn = 48;
    c.weight_dtype = DType::F16;
    c.prefill_dtype = Some(DType::F32);
    c
}

/// The `config.json` Hugging Face writes for `config`.
fn config_json(config: &ModelConfig, family: Family, tied: bool) -> String {
    let (architecture, model_type) = match family {
        Family::Llama => ("LlamaForCausalLM", "llama"),
        Family::Phi3 => ("Phi3ForCausalLM", "phi3"),
    };
    let mut json = serde_json::json!({
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": config.vocab,
        "hidden_size": config.d_model,
        "num_attention_heads": config.heads,
        "num_key_value_heads": config.kv_heads,
        "intermediate_size": config.ffn,
        "num_hidden_layers": config.layers.len(),
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": null,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
    });
    if config.head_dim * config.heads != config.d_model {
        json["head_dim"] = config.head_dim.into();
    }
    json.to_string()
}

/// A tensor as a checkpoint stores it.
struct Tensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Tensor {
    fn new(dtype: Dtype, shape: &[usize], values: &[f32]) -> Self {
        assert_eq!(shape.iter().product::<usize>(), values.len());
        let data = match dtype {
            Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
            Dtype::BF16 => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
            Dtype::I32 => values.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect(),
            other => panic!("no test encoding for {other}"),
        };
        Self { dtype, shape: shape.to_vec(), data }
    }
}

impl View for &Tensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// PyTorch `Linear` rows `[out, in]` of columns `col0 .. col0 + out` of the `[in, cols]` matrix `w`.
fn linear_rows(w: &[f32], cols: usize, col0: usize, out: usize) -> Vec<f32> {
    let inner = w.len() / cols;
    (0..out).flat_map(|o| (0..inner).map(move |k| w[k * cols + col0 + o])).collect()
}

/// The tensors of `w` under `family`'s names in `dtype` (no `lm_head.weight` when `tied`), plus a
/// `rotary_emb.inv_freq` buffer the loader must ignore.
fn hf_tensors(config: &ModelConfig, w: &Weights, family: Family, dtype: Dtype, tied: bool) -> Vec<(String, Tensor)> {
    let [vocab, d, q, kv, ffn] =
        [config.vocab, config.d_model, config.heads * config.head_dim, config.kv_heads * config.head_dim, config.ffn]
            .map(|n| n as usize);
    let qkv = q + 2 * kv;
    let mut tensors = vec![
        ("model.embed_tokens.weight".to_string(), Tensor::new(dtype, &[vocab, d], &w.embed)),
        ("model.norm.weight".to_string(), Tensor::new(dtype, &[d], &w.final_norm)),
    ];
    if !tied {
        tensors.push((
            "lm_head.weight".into(),
            Tensor::new(dtype, &[vocab, d], &linear_rows(&w.lm_head, vocab, 0, vocab)),
        ));
    }
    for (i, l) in w.layers.iter().enumerate() {
        let mut layer = vec![
            ("input_layernorm", Tensor::new(dtype, &[d], &l.attn_norm)),
            ("post_attention_layernorm", Tensor::new(dtype, &[d], &l.mlp_norm)),
            ("self_attn.o_proj", Tensor::new(dtype, &[d, q], &linear_rows(&l.wo, d, 0, d))),
            ("mlp.down_proj", Tensor::new(dtype, &[d, ffn], &linear_rows(&l.wdown, d, 0, d))),
        ];
        match family {
            Family::Llama => layer.extend([
                ("self_attn.q_proj", Tensor::new(dtype, &[q, d], &linear_rows(&l.wqkv, qkv, 0, q))),
                ("self_attn.k_proj", Tensor::new(dtype, &[kv, d], &linear_rows(&l.wqkv, qkv, q, kv))),
                ("self_attn.v_proj", Tensor::new(dtype, &[kv, d], &linear_rows(&l.wqkv, qkv, q + kv, kv))),
                ("mlp.gate_proj", Tensor::new(dtype, &[ffn, d], &linear_rows(&l.wgu, 2 * ffn, 0, ffn))),
                ("mlp.up_proj", Tensor::new(dtype, &[ffn, d], &linear_rows(&l.wgu, 2 * ffn, ffn, ffn))),
            ]),
            Family::Phi3 => layer.extend([
                ("self_attn.qkv_proj", Tensor::new(dtype, &[qkv, d], &linear_rows(&l.wqkv, qkv, 0, qkv))),
                ("mlp.gate_up_proj", Tensor::new(dtype, &[2 * ffn, d], &linear_rows(&l.wgu, 2 * ffn, 0, 2 * ffn))),
            ]),
        }
        tensors.extend(layer.into_iter().map(|(name, t)| (format!("model.layers.{i}.{name}.weight"), t)));
        let inv_freq: Vec<f32> = (0..config.head_dim / 2).map(|p| p as f32).collect();
        tensors.push((
            format!("model.layers.{i}.self_attn.rotary_emb.inv_freq"),
            Tensor::new(Dtype::F32, &[inv_freq.len()], &inv_freq),
        ));
    }
    tensors
}

/// An empty directory of this test's own.
fn fresh_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("checkpoint").join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).expect("clear the test directory");
    }
    std::fs::create_dir_all(&dir).expect("create the test directory");
    dir
}

/// Writes `tensors` as the safetensors file `path`.
fn write_file(path: &Path, tensors: &[(String, Tensor)]) {
    safetensors::serialize_to_file(tensors.iter().map(|(name, t)| (name.as_str(), t)), None, path).expect("write");
}

/// Writes `shards` into `dir` as `model-{i}-of-{n}.safetensors`.
fn write_shards(dir: &Path, shards: &[Vec<(String, Tensor)>]) -> Vec<PathBuf> {
    let n = shards.len();
    (0..n)
        .map(|i| {
            let path = dir.join(format!("model-{:05}-of-{n:05}.safetensors", i + 1));
            write_file(&path, &shards[i]);
            path
        })
        .collect()
}

/// `tensors` in two shards: those `second` picks in the second.
fn split(tensors: Vec<(String, Tensor)>, second: impl Fn(&str) -> bool) -> Vec<Vec<(String, Tensor)>> {
    let (b, a) = tensors.into_iter().partition(|(name, _)| second(name));
    vec![a, b]
}

/// `a` and `b` hold the same values, bit for bit.
fn assert_same_weights(a: &Weights, b: &Weights) {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.embed), bits(&b.embed), "embed");
    assert_eq!(bits(&a.final_norm), bits(&b.final_norm), "final_norm");
    assert_eq!(bits(&a.lm_head), bits(&b.lm_head), "lm_head");
    assert_eq!(a.layers.len(), b.layers.len());
    for (i, (x, y)) in a.layers.iter().zip(&b.layers).enumerate() {
        for (name, u, v) in [
            ("attn_norm", &x.attn_norm, &y.attn_norm),
            ("wqkv", &x.wqkv, &y.wqkv),
            ("wo", &x.wo, &y.wo),
            ("mlp_norm", &x.mlp_norm, &y.mlp_norm),
            ("wgu", &x.wgu, &y.wgu),
            ("wdown", &x.wdown, &y.wdown),
        ] {
            assert_eq!(bits(u), bits(v), "layer {i} {name}");
        }
    }
}

/// Every value of `w` through `f`.
fn map_weights(w: &Weights, f: impl Fn(f32) -> f32) -> Weights {
    let m = |v: &Vec<f32>| v.iter().map(|&x| f(x)).collect::<Vec<_>>();
    let mut out = w.clone();
    out.embed = m(&w.embed);
    out.final_norm = m(&w.final_norm);
    out.lm_head = m(&w.lm_head);
    for (o, l) in out.layers.iter_mut().zip(&w.layers) {
        o.attn_norm = m(&l.attn_norm);
        o.wqkv = m(&l.wqkv);
        o.wo = m(&l.wo);
        o.mlp_norm = m(&l.mlp_norm);
        o.wgu = m(&l.wgu);
        o.wdown = m(&l.wdown);
    }
    out
}

/// The GPU model of `weights` prefills a prompt and steps twice; every logit is held within 1e-4 of
/// the reference's (relative to the largest).
fn check_logits(config: &ModelConfig, weights: &Weights) {
    let model = Model::from_weights(wgpu_context(), config.clone(), weights).expect("model");
    let mut state = State::new(&model, 64).expect("state");
    let mut tokens = vec![3, 17, 42, 8, 63, 0, 29];
    let prompt = tokens.len();
    let mut gpu = Vec::new();
    let first = model.prefill(&mut state, &tokens).expect("prefill");
    tokens.push(first);
    gpu.push(model.logits(&state).expect("logits"));
    for _ in 0..2 {
        tokens.push(model.step(&mut state).expect("step"));
        gpu.push(model.logits(&state).expect("logits"));
    }
    let want = reference::logits(config, weights, &tokens[..tokens.len() - 1]).expect("reference");
    for (i, got) in gpu.iter().enumerate() {
        let want = &want[prompt - 1 + i];
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let err = got.iter().zip(want).fold(0f64, |m, (&g, &r)| m.max((g as f64 - r).abs()));
        assert!(err <= 1e-4 * (1.0 + scale), "position {}: max |logit error| {err:e} (scale {scale})", prompt - 1 + i);
    }
}

#[test]
fn llama_checkpoint_in_f32_over_two_shards_loads_exactly_and_matches_the_reference() {
    let config = llama_tiny();
    let original = Weights::random(&config, 3);
    let dir = fresh_dir("llama");
    std::fs::write(dir.join("config.json"), config_json(&config, Family::Llama, false)).expect("write config");
    let tensors = hf_tensors(&config, &original, Family::Llama, Dtype::F32, false);
    // Layer 1's Q in the first shard, its K and V in the second: the fused QKV matrix spans both.
    write_shards(&dir, &split(tensors, |name| name.starts_with("model.layers.1.") && !name.contains("q_proj")));
    let mut checkpoint = Checkpoint::open(&dir).expect("open");
    assert_eq!(checkpoint.shards.len(), 2);
    checkpoint.config.model.prefill_dtype = config.prefill_dtype;
    assert_eq!(checkpoint.config.model, config);
    let loaded = checkpoint.weights().expect("load");
    assert_same_weights(&loaded, &original);
    check_logits(&config, &loaded);
    // The same F32 checkpoint for f16 weights: each value rounded to f16.
    checkpoint.config.model.weight_dtype = DType::F16;
    let halved = checkpoint.weights().expect("load as f16");
    assert_same_weights(&halved, &map_weights(&original, |v| half::f16::from_f32(v).to_f32()));
    assert!(original.layers[0].wqkv.iter().zip(&halved.layers[0].wqkv).any(|(a, b)| a != b));
}

#[test]
fn phi3_checkpoint_in_bf16_with_tied_embeddings_loads_exactly_and_matches_the_reference() {
    let config = phi3_tiny();
    let mut original = Weights::random(&config, 5);
    // Tied: the LM head is the embedding's transpose.
    let (vocab, d) = (config.vocab as usize, config.d_model as usize);
    original.lm_head = linear_rows(&original.embed, d, 0, d);
    assert_eq!(original.lm_head.len(), vocab * d);
    let dir = fresh_dir("phi3");
    std::fs::write(dir.join("config.json"), config_json(&config, Family::Phi3, true)).expect("write config");
    write_file(&dir.join("model.safetensors"), &hf_tensors(&config, &original, Family::Phi3, Dtype::BF16, true));
    let mut checkpoint = Checkpoint::open(&dir).expect("open");
    assert!(checkpoint.config.tie_word_embeddings);
    assert_eq!(checkpoint.config.model.weight_dtype, DType::F32, "config.json leaves the storage type to the caller");
    checkpoint.config.model.weight_dtype = DType::F16;
    checkpoint.config.model.prefill_dtype = config.prefill_dtype;
    assert_eq!(checkpoint.config.model, config);
    let loaded = checkpoint.weights().expect("load");
    // Stored in BF16, then rounded to the model's f16.
    let expected = map_weights(&original, |v| half::f16::from_f32(half::bf16::from_f32(v).to_f32()).to_f32());
    assert_same_weights(&loaded, &expected);
    // The test means something: BF16 lost bits of the f16 originals.
    assert!(original.embed.iter().zip(&loaded.embed).any(|(a, b)| a != b));
    check_logits(&config, &loaded);
}

#[test]
fn config_json_round_trips_for_both_families() {
    for (config, family, tied) in [(llama_tiny(), Family::Llama, false), (phi3_tiny(), Family::Phi3, true)] {
        let hf = HfConfig::from_json(&config_json(&config, family, tied)).expect("config");
        let mut model = hf.model;
        model.weight_dtype = config.weight_dtype;
        model.prefill_dtype = config.prefill_dtype;
        assert_eq!(model, config, "{family:?}");
        assert_eq!(hf.tie_word_embeddings, tied, "{family:?}");
    }
}

/// `config.json` of Llama 2 7B (as published, less the token ids).
const LLAMA2_7B: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": 4096,
  "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
  "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
  "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": null, "tie_word_embeddings": false,
  "torch_dtype": "float16", "use_cache": true, "vocab_size": 32000
}"#;

/// `config.json` of Phi-3 mini 4k (as published, less the token ids and `auto_map`).
const PHI3_MINI_4K: &str = r#"{
  "architectures": ["Phi3ForCausalLM"], "attention_dropout": 0.0, "embd_pdrop": 0.0, "hidden_act": "silu",
  "hidden_size": 3072, "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 4096,
  "model_type": "phi3", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
  "original_max_position_embeddings": 4096, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05, "rope_scaling": null,
  "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "use_cache": true, "vocab_size": 32064
}"#;

#[test]
fn published_llama_and_phi3_configs_read_as_their_shapes() {
    let llama = HfConfig::from_json(LLAMA2_7B).expect("Llama 2 7B");
    let mut want = ModelConfig::new(32000, 4096, 32, 32, 128, 32);
    want.ffn = 11008;
    assert_eq!(llama.model, want);
    assert!(!llama.tie_word_embeddings);
    let phi3 = HfConfig::from_json(PHI3_MINI_4K).expect("Phi-3 mini");
    let mut want = ModelConfig::new(32064, 3072, 32, 32, 96, 32);
    want.ffn = 8192;
    assert_eq!(phi3.model, want);
}

/// `json` with `key` set to `value` (`null` removes it).
fn with(json: &str, key: &str, value: serde_json::Value) -> String {
    let mut v: serde_json::Value = serde_json::from_str(json).expect("json");
    match value {
        serde_json::Value::Null => {
            v.as_object_mut().expect("object").remove(key);
        }
        value => v[key] = value,
    }
    v.to_string()
}

/// The message of `result`'s error, which must be `Unsupported` (`unsupported`) or `Shape`.
fn message<T: std::fmt::Debug>(result: s2attn::Result<T>, unsupported: bool) -> String {
    match result.expect_err("must be refused") {
        Error::Unsupported(m) if unsupported => m,
        Error::Shape(m) if !unsupported => m,
        e => panic!("unexpected error variant: {e:?}"),
    }
}

#[test]
fn configs_of_other_blocks_are_refused_by_name() {
    use serde_json::json;
    let phi3_small = with(PHI3_MINI_4K, "architectures", json!(["Phi3SmallForCausalLM"]));
    let m = message(HfConfig::from_json(&phi3_small), true);
    assert!(m.contains("Phi3SmallForCausalLM") && m.contains("LayerNorm"), "{m}");
    let m = message(HfConfig::from_json(&with(LLAMA2_7B, "architectures", json!(["GPT2LMHeadModel"]))), true);
    assert!(m.contains("GPT2LMHeadModel"), "{m}");
    for (key, value) in [
        ("hidden_act", json!("gelu_pytorch_tanh")),
        ("rope_scaling", json!({"rope_type": "llama3", "factor": 8.0})),
        ("rope_scaling", json!({"type": "longrope", "long_factor": [1.0]})),
        ("partial_rotary_factor", json!(0.75)),
        ("attention_bias", json!(true)),
    ] {
        let m = message(HfConfig::from_json(&with(LLAMA2_7B, key, value.clone())), true);
        assert!(m.contains(key), "{key} = {value}: {m}");
    }
    // A missing or malformed size names its field.
    for (key, value) in
        [("hidden_size", json!(null)), ("num_key_value_heads", json!(-8)), ("rms_norm_eps", json!("small"))]
    {
        let m = message(HfConfig::from_json(&with(LLAMA2_7B, key, value.clone())), false);
        assert!(m.contains(key), "{key} = {value}: {m}");
    }
    // The same Llama config with the RoPE base in transformers' `rope_parameters`.
    let nested = with(LLAMA2_7B, "rope_parameters", json!({"rope_type": "default", "rope_theta": 500000.0}));
    assert_eq!(HfConfig::from_json(&nested).expect("rope_parameters").model.rope_theta, 500000.0);
}

/// The error of loading the tiny config's Llama tensors from two shards (layer 1 in the second), the
/// shards altered by `edit`.
fn load_error(test: &str, edit: impl FnOnce(&mut [Vec<(String, Tensor)>])) -> Error {
    let config = llama_tiny();
    let tensors = hf_tensors(&config, &Weights::random(&config, 9), Family::Llama, Dtype::F32, false);
    let mut shards = split(tensors, |name| name.starts_with("model.layers.1."));
    edit(&mut shards);
    let paths = write_shards(&fresh_dir(test), &shards);
    let hf = HfConfig { model: config, tie_word_embeddings: false };
    Weights::from_safetensors(&hf, &paths).expect_err("must be refused")
}

/// The tensor `name` of `shards`.
fn tensor<'a>(shards: &'a mut [Vec<(String, Tensor)>], name: &str) -> &'a mut Tensor {
    shards.iter_mut().flatten().find(|(n, _)| n == name).map(|(_, t)| t).expect("tensor")
}

fn shape_message(e: Error) -> String {
    match e {
        Error::Shape(m) => m,
        e => panic!("expected a shape error, got {e:?}"),
    }
}

#[test]
fn a_missing_tensor_is_named() {
    let gone = "model.layers.1.self_attn.v_proj.weight";
    let m = shape_message(load_error("missing", |s| s[1].retain(|(name, _)| name != gone)));
    assert!(m.contains(gone) && m.contains("model.layers.1.self_attn.qkv_proj.weight"), "{m}");
    // Without `tie_word_embeddings` the LM head must be stored.
    let m = shape_message(load_error("missing_lm_head", |s| s[0].retain(|(name, _)| name != "lm_head.weight")));
    assert!(m.contains("lm_head.weight"), "{m}");
}

#[test]
fn a_wrong_shape_is_named_with_the_expected_one() {
    // down_proj stored as `[in, out]`, not PyTorch's `[out, in]`: [48, 32] for [32, 48].
    let name = "model.layers.0.mlp.down_proj.weight";
    let m = shape_message(load_error("shape", |s| tensor(s, name).shape = vec![48, 32]));
    assert!(m.contains(name) && m.contains("[48, 32]") && m.contains("expected [32, 48]"), "{m}");
}

#[test]
fn an_unsupported_dtype_is_named() {
    let name = "model.norm.weight";
    let e = load_error("dtype", |s| *tensor(s, name) = Tensor::new(Dtype::I32, &[32], &[1.0; 32]));
    match e {
        Error::Unsupported(m) => assert!(m.contains(name) && m.contains("I32"), "{m}"),
        e => panic!("expected an unsupported-dtype error, got {e:?}"),
    }
}

#[test]
fn a_tensor_twice_overlapping_projections_a_bias_and_an_extra_layer_are_refused() {
    // Layer 0's K in both shards.
    let k = "model.layers.0.self_attn.k_proj.weight";
    let m = shape_message(load_error("duplicate", |s| {
        let copy = Tensor::new(Dtype::F32, &[64, 32], &[0.0; 64 * 32]);
        s[1].push((k.into(), copy));
    }));
    assert!(m.contains(k) && m.contains("model-00001-of-00002") && m.contains("model-00002-of-00002"), "{m}");
    // Layer 1 with Llama's Q, K, V and Phi-3's fused QKV.
    let fused = "model.layers.1.self_attn.qkv_proj.weight";
    let m = shape_message(load_error("overlap", |s| {
        s[1].push((fused.into(), Tensor::new(Dtype::F32, &[256, 32], &[0.0; 256 * 32])));
    }));
    assert!(m.contains(fused) && ["q_proj", "k_proj", "v_proj"].iter().any(|p| m.contains(p)), "{m}");
    let bias = "model.layers.0.self_attn.q_proj.bias";
    let e = load_error("bias", |s| s[0].push((bias.into(), Tensor::new(Dtype::F32, &[128], &[0.0; 128]))));
    assert!(matches!(&e, Error::Unsupported(m) if m.contains(bias)), "{e:?}");
    // A third layer for a config of two.
    let extra = "model.layers.2.input_layernorm.weight";
    let m = shape_message(load_error("extra_layer", |s| {
        s[1].push((extra.into(), Tensor::new(Dtype::F32, &[32], &[1.0; 32])))
    }));
    assert!(m.contains(extra), "{m}");
}

#[test]
fn an_incomplete_set_of_shards_is_refused() {
    let config = llama_tiny();
    let dir = fresh_dir("incomplete");
    std::fs::write(dir.join("config.json"), config_json(&config, Family::Llama, false)).expect("write config");
    let tensors = hf_tensors(&config, &Weights::random(&config, 1), Family::Llama, Dtype::F32, false);
    let mut shards = split(tensors, |name| name.starts_with("model.layers.1."));
    shards.push(Vec::new());
    let paths = write_shards(&dir, &shards);
    std::fs::remove_file(&paths[1]).expect("remove shard 2");
    let m = message(Checkpoint::open(&dir), false);
    assert!(m.contains("complete set of 3") && m.contains("1 of 3, 3 of 3"), "{m}");
}

#[test]
fn an_unsupported_architecture_is_refused_by_name() {
    let dir = fresh_dir("architecture");
    let json = with(
        &config_json(&llama_tiny(), Family::Llama, false),
        "architectures",
        serde_json::json!(["Phi3SmallForCausalLM"]),
    );
    std::fs::write(dir.join("config.json"), json).expect("write config");
    let m = message(Checkpoint::open(&dir), true);
    assert!(m.contains("Phi3SmallForCausalLM"), "{m}");
}
