//! `strata plan` on KAITO's worked cases: the layout it prints, and the
//! refusal that says what is short.

mod common;

fn plan(args: &[&str]) -> (bool, String) {
    common::run_strata(&[&["plan"], args].concat())
}

#[test]
fn llama_70b_on_two_a100_nodes_is_laid_out_over_both() {
    let (ok, out) = plan(&[
        "--model",
        "meta-llama/Llama-3.3-70B-Instruct",
        "--nodes",
        "3",
        "--gpus-per-node",
        "2",
        "--gpu-memory",
        "80GiB",
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains(
            "--tensor-parallel-size 2 --pipeline-parallel-size 2 on 2 node(s) (of the 3 given"
        ),
        "{out}"
    );
    assert!(out.contains("KAITO's estimator: 2 node(s)"), "{out}");
}

#[test]
fn deepseek_r1_on_too_few_h100_nodes_is_refused_with_the_shortfall() {
    let (ok, out) = plan(&[
        "--model",
        "deepseek-r1-0528",
        "--nodes",
        "4",
        "--gpus-per-node",
        "2",
        "--gpu-memory",
        "94GiB",
        "--gpu-memory-utilization",
        "0.84",
    ]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("GiB short per GPU") && out.contains("5 nodes would do"),
        "{out}"
    );
    assert!(out.contains("KAITO's estimator: 5 node(s)"), "{out}");
    let (ok, out) = plan(&[
        "--model",
        "no-such-model",
        "--gpus-per-node",
        "1",
        "--gpu-memory",
        "8GiB",
    ]);
    assert!(!ok && out.contains("neither a preset"), "{out}");
}

fn tiny(variant: &str) -> String {
    format!(
        "{}/../../tests/fixtures/tiny/{variant}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A DeepSeek folder is planned with its own cache: MLA keeps
/// (kv_lora_rank 32 + rope 16) values per token in each of 3 layers, 2
/// bytes each, whatever the heads; its FP8 weights count a byte each.
#[test]
fn a_deepseek_folder_is_planned_with_its_latent_cache_and_fp8_weights() {
    let (ok, out) = plan(&[
        "--model",
        &tiny("deepseek-v3-fp8"),
        "--gpus-per-node",
        "2",
        "--gpu-memory",
        "8GiB",
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("DeepseekV3ForCausalLM") && out.contains("MLA"),
        "{out}"
    );
    assert!(
        out.contains(&format!("{} KV bytes per token", (32 + 16) * 2 * 3)),
        "{out}"
    );
    assert!(out.contains("fp8"), "{out}");
    // The presets say the same of the real model: 61 layers of 512 + 64.
    let (ok, out) = plan(&[
        "--model",
        "deepseek-v3-0324",
        "--nodes",
        "2",
        "--gpus-per-node",
        "8",
        "--gpu-memory",
        "141GiB",
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("{} KV bytes per token", (512 + 64) * 2 * 61)),
        "{out}"
    );
}

/// An architecture or a switch strata does not implement is refused before
/// anything loads, naming it and what is supported.
#[test]
fn unsupported_architectures_and_switches_are_refused_before_loading() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("refusals");
    for (what, edit, want) in [
        (
            "architecture",
            ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM"),
            "DeepseekV2ForCausalLM; strata supports LlamaForCausalLM",
        ),
        (
            "routing",
            (
                "\"topk_group\"",
                "\"scoring_func\": \"softmax\", \"topk_group\"",
            ),
            "scoring_func `softmax` (supported: sigmoid)",
        ),
        (
            "quantization",
            ("\"quant_method\": \"fp8\"", "\"quant_method\": \"awq\""),
            "quantization `awq`",
        ),
    ] {
        let d = dir.join(what);
        std::fs::create_dir_all(&d).unwrap();
        let src = std::path::PathBuf::from(tiny("deepseek-v3-fp8"));
        std::fs::copy(src.join("model.safetensors"), d.join("model.safetensors")).unwrap();
        let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
        assert!(cfg.contains(edit.0), "{what}: {}", edit.0);
        std::fs::write(d.join("config.json"), cfg.replace(edit.0, edit.1)).unwrap();
        let (ok, out) =
            common::run_strata(&["serve", "--model", d.to_str().unwrap(), "--port", "0"]);
        assert!(!ok && out.contains(want), "{what}: {out}");
        assert!(
            !out.contains("loading "),
            "{what}: refused after loading began: {out}"
        );
    }
}
