//! What the bench programs share: the model to serve and free ports.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{ensure, Context, Result};

/// `model`, or strata's demo model where `strata serve` keeps it.
pub fn model_or_demo(strata: &str, model: Option<&str>) -> Result<String> {
    if let Some(m) = model {
        return Ok(m.to_string());
    }
    let out = Command::new(strata)
        .args(["serve", "--help"])
        .output()
        .with_context(|| format!("running {strata}"))?;
    ensure!(out.status.success(), "`{strata} serve --help` failed");
    let cache = std::env::var("STRATA_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            std::env::var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"))
                .join("strata")
        });
    let p = cache.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    ensure!(
        p.exists(),
        "{} missing: run `strata serve` once, or pass --model",
        p.display()
    );
    Ok(p.to_string_lossy().to_string())
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
