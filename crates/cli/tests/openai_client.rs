//! The official `openai` Python client against the real server
//! (tests/openai_client.py, tests/openai_structured.py). The client and the
//! `jsonschema` validator are installed into a virtualenv under the target
//! folder on first use.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Server;

/// A python with `openai` and `jsonschema` importable, installing it into a venv if needed
/// (once per test process: the tests here run at the same time).
fn python_with_openai() -> PathBuf {
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PYTHON.get_or_init(install_openai).clone()
}

fn install_openai() -> PathBuf {
    let works = |py: &Path| {
        Command::new(py)
            .args(["-c", "import openai, jsonschema"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let system = PathBuf::from("python3");
    if works(&system) {
        return system;
    }
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("openai-venv");
    let py = venv.join("bin/python");
    if !works(&py) {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 runs");
        assert!(ok.success(), "creating a virtualenv failed");
        let ok = Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "openai",
                "jsonschema",
            ])
            .status()
            .expect("pip runs");
        assert!(ok.success(), "pip install openai failed");
    }
    py
}

/// Runs tests/openai_client.py against a server of `model`.
async fn client_checks(model: &str) {
    run_script("openai_client.py", model).await;
}

/// Runs `tests/<script>` against a server of `model`.
async fn run_script(script: &str, model: &str) {
    let py = python_with_openai();
    let s = Server::start_model(model, &[]).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests")
        .join(script);
    let out = tokio::process::Command::new(py)
        .arg(&script)
        .arg(&s.base)
        .arg("demo")
        .output()
        .await
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{} on {model} failed:\n{log}",
        script.display()
    );
    assert!(log.contains("all checks passed"), "{log}");
}

#[tokio::test]
async fn the_official_openai_python_client_works_unchanged() {
    client_checks(&common::demo_model()).await;
}

/// The tiny DeepSeek-V3 (MLA, MoE), stream and not.
#[tokio::test]
async fn the_openai_client_drives_a_deepseek_model() {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/tiny/deepseek-chat"
    );
    client_checks(dir).await;
}

/// ≥ 20 JSON schemas, pydantic models through `parse()`, json_object,
/// regex, choice and a Lark grammar on the demo model: every output
/// validates (whole, streamed, n = 2), and bad constraints are 400s.
#[tokio::test]
async fn structured_outputs_validate_through_the_openai_client() {
    run_script("openai_structured.py", &common::demo_model()).await;
}
