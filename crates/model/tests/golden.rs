//! strata's Llama against Hugging Face transformers on tiny random-weight
//! checkpoints (tests/fixtures/make_golden.py): f32 logits within 2e-5 and
//! identical greedy tokens, through the paged KV cache.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;
use strata_comm::SingleRank;
use strata_model::{
    BatchInput, HalfKind, KvCache, Matmul, SeqInfo, StageModel, StageOutput, Weights,
};
use strata_types::{LayerRange, BLOCK_SIZE};

/// Observed differences are at most 3e-6 (summation order); a wrong
/// epsilon in one norm of DeepSeek's attention gave 3e-5, so the bound sits
/// between.
const TOL: f32 = 2e-5;

fn fixture(variant: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny")
        .join(variant)
}

struct Reference {
    prompt: Vec<u32>,
    prompt_logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
    decode_logits: Vec<Vec<f32>>,
}

fn reference(variant: &str) -> Reference {
    let t = candle_core::safetensors::load(
        fixture(variant).join("reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let ids = |n: &str| -> Vec<u32> {
        t[n].to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&x| x as u32)
            .collect()
    };
    Reference {
        prompt: ids("prompt_ids"),
        greedy: ids("greedy_ids"),
        prompt_logits: t["prompt_logits"].to_vec2().unwrap(),
        decode_logits: t["decode_logits"].to_vec2().unwrap(),
    }
}

fn load(variant: &str, range: Option<LayerRange>) -> (Box<dyn StageModel>, Weights) {
    let w = Weights::open(&fixture(variant), &Device::Cpu).unwrap();
    let arch = w.architecture().unwrap();
    let range = range.unwrap_or(LayerRange::full(arch.config().num_layers));
    let m = arch
        .load_stage(&w, range, Arc::new(SingleRank), 512, &mut |_, _| {})
        .unwrap();
    (m, w)
}

/// Feeds `tokens` at positions `start..` of one sequence stored in `table`.
fn run(
    m: &dyn StageModel,
    kv: &mut KvCache,
    table: &[u32],
    start: usize,
    tokens: &[u32],
    all_logits: bool,
) -> Vec<Vec<f32>> {
    m.forward_sequence(kv, table, start, tokens, all_logits)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    let diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < TOL, "{what}: max |diff| {diff} >= {TOL}");
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0 as u32
}

fn check_variant(variant: &str) {
    check_variant_with(variant, Layout::Host);
}

/// Which KV-cache layout, and so which attention code, a check runs.
#[derive(Clone, Copy)]
enum Layout {
    /// The CPU's own cache and attention.
    Host,
    /// The GPU's layout and kernels, through their CPU references.
    Kernels,
}

fn new_cache(m: &dyn StageModel, layout: Layout, blocks: usize) -> KvCache {
    match layout {
        Layout::Host => m.new_kv_cache(blocks).unwrap(),
        Layout::Kernels => m.new_device_kv_cache(blocks).unwrap(),
    }
}

fn check_variant_with(variant: &str, layout: Layout) {
    let r = reference(variant);
    let (m, _) = load(variant, None);
    let mut kv = new_cache(&*m, layout, 8);
    let table = [5u32, 2, 7]; // scattered blocks
    let logits = run(&*m, &mut kv, &table, 0, &r.prompt, true);
    for (i, (g, w)) in logits.iter().zip(&r.prompt_logits).enumerate() {
        assert_close(g, w, &format!("{variant} prompt position {i}"));
    }
    assert_eq!(
        argmax(logits.last().unwrap()),
        r.greedy[0],
        "{variant}: first greedy token"
    );
    for i in 0..r.decode_logits.len() {
        let pos = r.prompt.len() + i;
        let l = run(&*m, &mut kv, &table, pos, &[r.greedy[i]], false);
        assert_close(
            &l[0],
            &r.decode_logits[i],
            &format!("{variant} decode step {i}"),
        );
        assert_eq!(
            argmax(&l[0]),
            r.greedy[i + 1],
            "{variant}: greedy token {}",
            i + 1
        );
    }
}

#[test]
fn llama_gqa_matches_transformers() {
    check_variant("llama-gqa");
}

#[test]
fn tied_embeddings_and_mqa_match_transformers() {
    check_variant("llama-tied");
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    check_variant("llama3-rope");
}

#[test]
fn mistral_with_explicit_head_dim_matches_transformers() {
    check_variant("mistral");
}

#[test]
fn bf16_and_f16_checkpoints_match_transformers() {
    check_variant("llama-bf16");
    check_variant("llama-f16");
    // On the CPU their projections stay 16-bit (HalfMatrix), not f32.
    for (variant, kind) in [("llama-bf16", HalfKind::Bf16), ("llama-f16", HalfKind::F16)] {
        let w = Weights::open(&fixture(variant), &Device::Cpu).unwrap();
        let m = w
            .matmul("model.layers.0.mlp.down_proj.weight", None)
            .unwrap();
        assert!(
            matches!(&m, Matmul::Half(h) if h.kind() == kind),
            "{variant}: the projection is not a {kind:?} HalfMatrix"
        );
    }
}

#[test]
fn qwen2_with_qkv_biases_and_tied_embeddings_matches_transformers() {
    check_variant("qwen2");
}

#[test]
fn qwen3_with_qk_norm_and_explicit_head_dim_matches_transformers() {
    check_variant("qwen3");
}

#[test]
fn qwen3_moe_matches_transformers() {
    // Top-2 of 8 renormalised, a dense layer between sparse ones; then
    // unnormalised, with every other layer sparse.
    check_variant("qwen3-moe");
    check_variant("qwen3-moe-step2");
    chunked_and_batched("qwen3-moe", Layout::Host);
}

#[test]
fn deepseek_v3_matches_transformers() {
    // MLA with q_lora, v != nope, interleaved YaRN rope, grouped routing
    // with a correction bias and shared experts; then every switch the
    // other way.
    check_variant("deepseek-v3");
    check_variant("deepseek-v3-plain");
    chunked_and_batched("deepseek-v3", Layout::Host);
}

#[test]
fn deepseek_v3_bf16_and_fp8_checkpoints_match_transformers() {
    check_variant("deepseek-v3-bf16");
    // The reference is transformers on the dequantized weights.
    check_variant("deepseek-v3-fp8");
}

#[test]
fn sharded_checkpoints_match_transformers() {
    check_variant("llama-sharded");
}

/// The code path a GPU runs (the kernels' cache layout, fused RMSNorm,
/// write_kv and paged_attention ops), run on the CPU through the kernels'
/// references, matches transformers like the CPU's own path does.
#[test]
fn the_kernels_code_path_matches_transformers() {
    for v in ["llama-gqa", "llama-tied", "llama3-rope", "mistral"] {
        check_variant_with(v, Layout::Kernels);
    }
    chunked_and_batched("llama-gqa", Layout::Kernels);
}

#[test]
fn chunked_prefill_and_batching_give_the_same_logits() {
    chunked_and_batched("llama-gqa", Layout::Host);
}

fn chunked_and_batched(variant: &str, layout: Layout) {
    let r = reference(variant);
    let (m, _) = load(variant, None);
    // Prompt in chunks of 3, 3 and 1 tokens.
    let mut kv = new_cache(&*m, layout, 8);
    let table = [1u32];
    let mut last = Vec::new();
    for (start, chunk) in [
        (0, &r.prompt[0..3]),
        (3, &r.prompt[3..6]),
        (6, &r.prompt[6..]),
    ] {
        last = run(&*m, &mut kv, &table, start, chunk, false);
    }
    assert_close(&last[0], r.prompt_logits.last().unwrap(), "chunked prefill");

    // Two sequences in one forward: a decode of sequence A and the prompt of B.
    let mut kv = new_cache(&*m, layout, 8);
    run(&*m, &mut kv, &[3], 0, &r.prompt, false);
    let p = r.prompt.len();
    let tokens: Vec<u32> = std::iter::once(r.greedy[0])
        .chain(r.prompt.iter().copied())
        .collect();
    let mut positions = vec![p as u32];
    positions.extend(0..p as u32);
    let mut slots = vec![3 * BLOCK_SIZE as u32 + p as u32];
    slots.extend((0..p as u32).map(|i| 6 * BLOCK_SIZE as u32 + i));
    let seqs = [
        SeqInfo {
            query_len: 1,
            block_table: &[3],
        },
        SeqInfo {
            query_len: p,
            block_table: &[6],
        },
    ];
    let idx = [0u32, p as u32];
    let input = BatchInput {
        token_ids: &tokens,
        positions: &positions,
        slot_mapping: &slots,
        seqs: &seqs,
        logits_indices: &idx,
    };
    let StageOutput::Logits(l) = m.forward(&input, None, &mut kv).unwrap() else {
        panic!()
    };
    let l: Vec<Vec<f32>> = l.to_vec2().unwrap();
    assert_close(&l[0], &r.decode_logits[0], "batched decode");
    assert_close(&l[1], r.prompt_logits.last().unwrap(), "batched prefill");
}

#[test]
fn a_stage_reads_only_its_own_layers() {
    let (_, w) = load("llama-gqa", Some(LayerRange::new(1, 2)));
    let names = w.names_read();
    assert!(!names.is_empty());
    for n in &names {
        assert!(n.starts_with("model.layers.1."), "stage [1, 2) read {n}");
    }
    let layer_bytes: usize = names
        .iter()
        .map(|n| w.shape(n).unwrap().iter().product::<usize>() * 4)
        .sum();
    assert_eq!(w.bytes_read() as usize, layer_bytes);

    // The first stage adds the embedding, the last the norm and lm_head.
    let (_, w) = load("llama-gqa", Some(LayerRange::new(0, 1)));
    assert!(w
        .names_read()
        .contains(&"model.embed_tokens.weight".to_string()));
    assert!(!w
        .names_read()
        .iter()
        .any(|n| n.contains("lm_head") || n == "model.norm.weight" || n.contains("layers.1.")));
    let (_, w) = load("llama-gqa", Some(LayerRange::new(2, 3)));
    let names = w.names_read();
    assert!(
        names.contains(&"lm_head.weight".to_string())
            && names.contains(&"model.norm.weight".to_string())
    );
    assert!(!names
        .iter()
        .any(|n| n.contains("embed_tokens") || n.contains("layers.0.")));
}

#[test]
fn stages_chained_by_hidden_states_equal_the_whole_model() {
    stages_chained("llama-gqa");
    stages_chained("deepseek-v3");
}

/// A DeepSeek cache keeps the latent and the rope key per token and layer:
/// (32 + 16) values of 4 bytes, 3 layers, BLOCK_SIZE tokens a block; a
/// Llama cache of the same attention width would keep 2 x 4 heads x 32.
#[test]
fn a_deepseek_cache_holds_the_latent_and_rope_key_only() {
    let (m, _) = load("deepseek-v3", None);
    let per_block = 3 * BLOCK_SIZE * (32 + 16) * 4;
    assert_eq!(m.kv_bytes_per_block(), per_block);
    let kv = m.new_kv_cache(5).unwrap();
    assert_eq!(kv.bytes(), 5 * per_block);
    assert_eq!(m.config().kv_bytes_per_token(3, 4), 3 * (32 + 16) * 4);
    let expanded = 3 * 2 * 4 * (16 + 16) * 4;
    assert!(m.config().kv_bytes_per_token(3, 4) * 2 < expanded);
}

/// FP8 weights stay a byte each in memory (and are counted so by the
/// planner): the FP8 folder's served bytes are the bf16 folder's less one
/// byte per FP8 weight, plus 4 per block scale.
#[test]
fn fp8_weights_are_counted_as_stored() {
    let fp8 = Weights::open(&fixture("deepseek-v3-fp8"), &Device::Cpu).unwrap();
    let bf16 = Weights::open(&fixture("deepseek-v3-bf16"), &Device::Cpu).unwrap();
    assert!(fp8.has_fp8() && !bf16.has_fp8());
    let (mut fp8_elems, mut scales) = (0u64, 0u64);
    for n in fp8.names() {
        let elems = fp8.shape(&n).unwrap().iter().product::<usize>() as u64;
        if n.ends_with("_scale_inv") {
            scales += elems;
        } else if fp8.contains(&format!("{n}_scale_inv")) {
            fp8_elems += elems;
        }
    }
    assert!(fp8_elems > 0 && scales > 0);
    assert_eq!(
        fp8.dense_bytes(2),
        bf16.dense_bytes(2) - fp8_elems + 4 * scales
    );
}

/// DeepSeek's multi-token-prediction layer (`num_nextn_predict_layers`,
/// stored as layer `num_hidden_layers`) is never read.
#[test]
fn deepseek_mtp_layers_are_skipped_on_load() {
    let src = fixture("deepseek-v3");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("deepseek-mtp");
    std::fs::create_dir_all(&dir).unwrap();
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mtp: Vec<(String, candle_core::Tensor)> = tensors
        .iter()
        .filter_map(|(n, t)| Some((n.strip_prefix("model.layers.2.")?, t)))
        .map(|(rest, t)| (format!("model.layers.3.{rest}"), t.clone()))
        .collect();
    assert!(!mtp.is_empty());
    tensors.extend(mtp);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(src.join("config.json"))
        .unwrap()
        .replace(
            "\"num_nextn_predict_layers\": 0",
            "\"num_nextn_predict_layers\": 1",
        );
    assert!(cfg.contains("\"num_nextn_predict_layers\": 1"));
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let w = Weights::open(&dir, &Device::Cpu).unwrap();
    let m = strata_model::load_whole(&w, Arc::new(SingleRank), 64).unwrap();
    assert_eq!(m.layer_range(), LayerRange::new(0, 3));
    assert!(!w.names_read().iter().any(|n| n.contains("layers.3.")));
}

fn stages_chained(variant: &str) {
    let r = reference(variant);
    let (a, _) = load(variant, Some(LayerRange::new(0, 2)));
    let (b, _) = load(variant, Some(LayerRange::new(2, 3)));
    let (mut ka, mut kb) = (a.new_kv_cache(2).unwrap(), b.new_kv_cache(2).unwrap());
    let p = r.prompt.len();
    let positions: Vec<u32> = (0..p as u32).collect();
    let seqs = [SeqInfo {
        query_len: p,
        block_table: &[0],
    }];
    let idx: Vec<u32> = (0..p as u32).collect();
    let input = BatchInput {
        token_ids: &r.prompt,
        positions: &positions,
        slot_mapping: &positions,
        seqs: &seqs,
        logits_indices: &idx,
    };
    let StageOutput::Hidden(h) = a.forward(&input, None, &mut ka).unwrap() else {
        panic!("stage 0 returns hidden states")
    };
    let StageOutput::Logits(l) = b.forward(&input, Some(h), &mut kb).unwrap() else {
        panic!("the last stage returns logits")
    };
    let l: Vec<Vec<f32>> = l.to_vec2().unwrap();
    for (g, w) in l.iter().zip(&r.prompt_logits) {
        assert_close(g, w, &format!("{variant}: two stages"));
    }
}

#[test]
fn a_transformers_written_chat_model_matches_transformers() {
    check_variant("llama-chat");
}
