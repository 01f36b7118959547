//! Every GGUF weight type strata accepts computes what its own dequantized
//! weights compute: the quantized model and an f32 copy of the same (already
//! rounded) weights give the same logits, up to the 8-bit activation
//! quantization the integer kernels use.

use std::sync::Arc;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use strata_comm::SingleRank;
use strata_model::{BatchInput, SeqInfo, StageOutput, Weights};

const HIDDEN: usize = 256; // K-quants need rows of 256
const FFN: usize = 512;
const VOCAB: usize = 512;
const LAYERS: usize = 2;

/// Deterministic pseudo-random weights.
fn weights() -> Vec<(String, Tensor)> {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rand = |n: usize, scale: f32, offset: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                offset + scale * ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            })
            .collect()
    };
    let mut t = |name: &str, shape: &[usize], scale: f32, offset: f32| {
        let v = rand(shape.iter().product(), scale, offset);
        (
            name.to_string(),
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap(),
        )
    };
    let mut out = vec![
        t("token_embd.weight", &[VOCAB, HIDDEN], 1.0, 0.0),
        t("output_norm.weight", &[HIDDEN], 0.2, 1.0),
        t("output.weight", &[VOCAB, HIDDEN], 0.5, 0.0),
    ];
    for l in 0..LAYERS {
        let p = |n: &str| format!("blk.{l}.{n}.weight");
        out.push(t(&p("attn_norm"), &[HIDDEN], 0.2, 1.0));
        out.push(t(&p("ffn_norm"), &[HIDDEN], 0.2, 1.0));
        out.push(t(&p("attn_q"), &[HIDDEN, HIDDEN], 0.3, 0.0));
        out.push(t(&p("attn_k"), &[HIDDEN / 2, HIDDEN], 0.3, 0.0));
        out.push(t(&p("attn_v"), &[HIDDEN / 2, HIDDEN], 0.3, 0.0));
        out.push(t(&p("attn_output"), &[HIDDEN, HIDDEN], 0.3, 0.0));
        out.push(t(&p("ffn_gate"), &[FFN, HIDDEN], 0.3, 0.0));
        out.push(t(&p("ffn_up"), &[FFN, HIDDEN], 0.3, 0.0));
        out.push(t(&p("ffn_down"), &[HIDDEN, FFN], 0.2, 0.0));
    }
    out
}

/// Writes a GGUF with 2-D weights in `dtype` (norms stay f32); returns the
/// path and the dequantized weights.
fn write_gguf(
    dir: &std::path::Path,
    dtype: GgmlDType,
    ws: &[(String, Tensor)],
) -> (std::path::PathBuf, Vec<(String, Tensor)>) {
    let q: Vec<(String, QTensor)> = ws
        .iter()
        .map(|(n, t)| {
            let d = if t.rank() == 2 { dtype } else { GgmlDType::F32 };
            (n.clone(), QTensor::quantize(t, d).unwrap())
        })
        .collect();
    let dequant = q
        .iter()
        .map(|(n, t)| (n.clone(), t.dequantize(&Device::Cpu).unwrap()))
        .collect();
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", Value::U32(FFN as u32)),
        ("llama.block_count", Value::U32(LAYERS as u32)),
        ("llama.attention.head_count", Value::U32(4)),
        ("llama.attention.head_count_kv", Value::U32(2)),
        ("llama.vocab_size", Value::U32(VOCAB as u32)),
        ("llama.context_length", Value::U32(128)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
    ];
    let path = dir.join(format!("{dtype:?}.gguf"));
    let mut f = std::fs::File::create(&path).unwrap();
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = q.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
    (path, dequant)
}

fn logits(path: &std::path::Path, prompt: &[u32]) -> Vec<Vec<f32>> {
    let w = Weights::open(path, &Device::Cpu).unwrap();
    let m = strata_model::load_whole(&w, Arc::new(SingleRank), 128).unwrap();
    let mut kv = m.new_kv_cache(2).unwrap();
    let positions: Vec<u32> = (0..prompt.len() as u32).collect();
    let seqs = [SeqInfo {
        query_len: prompt.len(),
        block_table: &[0, 1],
    }];
    let input = BatchInput {
        token_ids: prompt,
        positions: &positions,
        slot_mapping: &positions,
        seqs: &seqs,
        logits_indices: &positions,
    };
    match m.forward(&input, None, &mut kv).unwrap() {
        StageOutput::Logits(l) => l.to_vec2().unwrap(),
        StageOutput::Hidden(_) => unreachable!(),
    }
}

#[test]
fn every_gguf_type_matches_its_dequantized_weights() {
    let dir = std::env::temp_dir().join(format!("strata-gguf-types-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ws = weights();
    let prompt: Vec<u32> = vec![3, 141, 59, 265, 35, 89, 79, 323, 84, 62, 64, 338];
    for dtype in [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let (qpath, dequant) = write_gguf(&dir, dtype, &ws);
        let ref_dir = dir.join("ref");
        std::fs::create_dir_all(&ref_dir).unwrap();
        let (rpath, _) = write_gguf(&ref_dir, GgmlDType::F32, &dequant);
        let got = logits(&qpath, &prompt);
        let want = logits(&rpath, &prompt);
        let scale = want.iter().flatten().fold(0f32, |a, v| a.max(v.abs()));
        let diff = got
            .iter()
            .flatten()
            .zip(want.iter().flatten())
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        // Dense types compute exactly; integer kernels round activations to 8 bits.
        let tol = match dtype {
            GgmlDType::F32 => 1e-4 * scale,
            GgmlDType::F16 => 1e-3 * scale,
            _ => 0.05 * scale,
        };
        assert!(
            diff <= tol,
            "{dtype:?}: max |logit diff| {diff} > {tol} (logit scale {scale})"
        );
        let argmax = |r: &Vec<f32>| {
            r.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0
        };
        let agree = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| argmax(a) == argmax(b))
            .count();
        assert!(
            agree + 1 >= prompt.len(),
            "{dtype:?}: argmax agrees at only {agree}/{} positions",
            prompt.len()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
