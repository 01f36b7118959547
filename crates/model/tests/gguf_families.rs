//! Qwen2 and Qwen3 from GGUF: the safetensors fixtures written as GGUF the
//! way llama.cpp's converter lays them out (its tensor names, `qwen2.*` /
//! `qwen3.*` metadata, q/k in Hugging Face's order since Qwen rotates in
//! halves), loaded back, give transformers' logits.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use serde_json::Value as Json;
use strata_comm::SingleRank;
use strata_model::weights::gguf_name;
use strata_model::Weights;

fn fixture(variant: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny")
        .join(variant)
}

/// Writes `variant`'s weights and config as a GGUF of architecture `arch`.
fn to_gguf(variant: &str, arch: &str) -> PathBuf {
    let dir = fixture(variant);
    let cfg: Json =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let q: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(n, t)| {
            let g = gguf_name(n).unwrap_or_else(|| panic!("no GGUF name for {n}"));
            (g, QTensor::quantize(t, GgmlDType::F32).unwrap())
        })
        .collect();
    let u = |k: &str| Value::U32(cfg[k].as_u64().unwrap() as u32);
    let heads = cfg["num_attention_heads"].as_u64().unwrap();
    let head_dim = cfg["head_dim"]
        .as_u64()
        .unwrap_or(cfg["hidden_size"].as_u64().unwrap() / heads);
    let key = |k: &str| format!("{arch}.{k}");
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (key("embedding_length"), u("hidden_size")),
        (key("feed_forward_length"), u("intermediate_size")),
        (key("block_count"), u("num_hidden_layers")),
        (key("attention.head_count"), u("num_attention_heads")),
        (key("attention.head_count_kv"), u("num_key_value_heads")),
        (key("attention.key_length"), Value::U32(head_dim as u32)),
        (key("vocab_size"), u("vocab_size")),
        (key("context_length"), u("max_position_embeddings")),
        (
            key("rope.freq_base"),
            Value::F32(cfg["rope_parameters"]["rope_theta"].as_f64().unwrap() as f32),
        ),
        (
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
    ];
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{variant}.gguf"));
    let mut f = std::fs::File::create(&path).unwrap();
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = q.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
    path
}

fn check(variant: &str, arch: &str) {
    let reference = candle_core::safetensors::load(
        fixture(variant).join("reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let prompt: Vec<u32> = reference["prompt_ids"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect();
    let want: Vec<Vec<f32>> = reference["prompt_logits"].to_vec2().unwrap();
    let w = Weights::open(&to_gguf(variant, arch), &Device::Cpu).unwrap();
    let arch_cfg = w.architecture().unwrap();
    assert_eq!(
        arch_cfg.config().architecture,
        if arch == "qwen2" {
            "Qwen2ForCausalLM"
        } else {
            "Qwen3ForCausalLM"
        }
    );
    let m = strata_model::load_whole(&w, Arc::new(SingleRank), 64).unwrap();
    let mut kv = m.new_kv_cache(2).unwrap();
    let got: Vec<Vec<f32>> = m
        .forward_sequence(&mut kv, &[1, 0], 0, &prompt, true)
        .unwrap()
        .to_vec2()
        .unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let diff = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff < 2e-5,
            "{variant} as GGUF, position {i}: max |diff| {diff}"
        );
    }
}

#[test]
fn qwen2_gguf_with_biases_and_a_tied_head_matches_transformers() {
    check("qwen2", "qwen2");
}

#[test]
fn qwen3_gguf_with_qk_norms_matches_transformers() {
    check("qwen3", "qwen3");
}
