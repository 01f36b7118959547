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
