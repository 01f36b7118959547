//! `--device`, `--dtype` and `strata check` on a machine without a GPU: the
//! CPU runs the GPU check's comparisons on itself, and asking for CUDA from
//! a CPU-only build fails with a message that says why.

mod common;

use common::{run_strata as strata, tiny_fixture as fixture};

#[test]
fn the_check_subcommands_pass_on_the_cpu() {
    let (ok, out) = strata(&["check", "kernels", "--device", "cpu", "--dtype", "float32"]);
    assert!(ok, "{out}");
    for k in [
        "add_rms_norm",
        "silu_and_mul",
        "rotary",
        "write_kv",
        "paged_attention",
    ] {
        assert!(out.contains(k), "{k} missing from:\n{out}");
    }
    let (ok, out) = strata(&[
        "check",
        "model",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--model",
        &fixture("llama-gqa"),
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("vs transformers"), "{out}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_from_a_cpu_build_and_half_precision_on_the_cpu_are_refused_with_reasons() {
    let (ok, out) = strata(&["check", "kernels", "--device", "cuda"]);
    assert!(!ok && out.contains("built without CUDA"), "{out}");
    let model = fixture("llama-chat");
    let (ok, out) = strata(&[
        "serve", "--model", &model, "--device", "cuda", "--port", "0",
    ]);
    assert!(!ok && out.contains("built without CUDA"), "{out}");
    let (ok, out) = strata(&[
        "serve", "--model", &model, "--device", "cpu", "--dtype", "bfloat16", "--port", "0",
    ]);
    assert!(!ok && out.contains("--device cuda"), "{out}");
    let (ok, out) = strata(&["serve", "--model", &model, "--dtype", "int3"]);
    assert!(!ok && out.contains("unknown dtype"), "{out}");
    let (ok, out) = strata(&[
        "serve",
        "--model",
        &model,
        "--gpu-memory-utilization",
        "1.5",
    ]);
    assert!(!ok && out.contains("--gpu-memory-utilization"), "{out}");
}
