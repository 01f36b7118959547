//! `strata serve` as a drop-in for vLLM's command line, as KAITO launches it:
//! before clap reads the arguments, this pass
//! - spells flags with dashes (`--load_format` is `--load-format`);
//! - reads `--kaito-config-file` (KAITO's `inference_config.yaml`) and
//!   appends its `vllm:` section as flags, after the command line's, so the
//!   file wins, as KAITO's wrapper does; keys strata does not know are
//!   warned about, never fatal;
//! - drops the vLLM flags strata has no use for, with a log line saying why;
//! - takes `--max-model-len auto` as strata's default (the model's context,
//!   capped by the KV cache);
//! - finds a Hugging Face id given as `--model` under `--download-dir`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use yaml_rust2::{Yaml, YamlLoader};

/// Whether an ignored flag is followed by a value.
#[derive(Clone, Copy, PartialEq)]
enum Takes {
    Value,
    /// A switch; a `true`/`false` after it belongs to it.
    Switch,
}

/// vLLM (and KAITO wrapper) flags strata accepts and ignores, and why.
const IGNORED: &[(&str, Takes, &str)] = &[
    (
        "distributed-executor-backend",
        Takes::Value,
        "strata needs no Ray: workers join the leader over gRPC",
    ),
    (
        "load-format",
        Takes::Value,
        "strata reads safetensors and GGUF as they are",
    ),
    (
        "config-format",
        Takes::Value,
        "config.json is read as it is",
    ),
    (
        "tokenizer-mode",
        Takes::Value,
        "tokenizer.json is read as it is",
    ),
    (
        "trust-remote-code",
        Takes::Switch,
        "strata runs no code from checkpoints",
    ),
    ("download-dir", Takes::Value, "used only to find --model"),
    ("code-revision", Takes::Value, "no model code is run"),
    (
        "allow-remote-files",
        Takes::Switch,
        "models are read from local files",
    ),
    (
        "kv-events-config",
        Takes::Value,
        "KV-cache events are not published",
    ),
    (
        "compilation-config",
        Takes::Value,
        "strata compiles no graphs",
    ),
    ("performance-mode", Takes::Value, "strata has one mode"),
    (
        "model-loader-extra-config",
        Takes::Value,
        "each node reads its own share of the checkpoint",
    ),
    (
        "enable-lora",
        Takes::Switch,
        "LoRA adapters are not supported yet",
    ),
    (
        "swap-space",
        Takes::Value,
        "preempted requests are recomputed, not swapped",
    ),
    (
        "cpu-offload-gb",
        Takes::Value,
        "weights are not offloaded to the CPU",
    ),
    (
        "max-seq-len-to-capture",
        Takes::Value,
        "no CUDA graphs are captured",
    ),
    (
        "num-scheduler-steps",
        Takes::Value,
        "one step is scheduled at a time per pipeline group",
    ),
    (
        "enable-chunked-prefill",
        Takes::Switch,
        "prefill is always chunked (--max-num-batched-tokens)",
    ),
    (
        "data-parallel-size",
        Takes::Value,
        "run one strata per replica",
    ),
    (
        "attention-backend",
        Takes::Value,
        "strata has its own attention kernels",
    ),
    (
        "kaito-kv-cache-cpu-memory-utilization",
        Takes::Value,
        "no KV cache on the CPU beside the GPU's",
    ),
    (
        "kaito-adapters-dir",
        Takes::Value,
        "LoRA adapters are not supported yet",
    ),
    (
        "kaito-max-probe-steps",
        Takes::Value,
        "strata sizes its KV cache without probing",
    ),
    (
        "kaito-disable-rate-limit",
        Takes::Switch,
        "the admission bound is --max-pending-requests",
    ),
];

/// Top-level keys of KAITO's inference_config.yaml besides `vllm`.
const IGNORED_CONFIG: &[&str] = &["max_probe_steps", "kv_cache_cpu_memory_utilization"];

fn ignored(name: &str) -> Option<(Takes, &'static str)> {
    // `--compilation-config.pass_config.x=...` is one of a family.
    let base = name.split('.').next().unwrap_or(name);
    IGNORED
        .iter()
        .find(|(n, ..)| *n == base)
        .map(|(_, t, why)| (*t, *why))
}

fn yaml_to_json(v: &Yaml) -> Option<serde_json::Value> {
    use serde_json::Value as J;
    Some(match v {
        Yaml::Boolean(b) => J::Bool(*b),
        Yaml::Integer(n) => J::from(*n),
        Yaml::Real(r) => J::from(r.parse::<f64>().ok()?),
        Yaml::String(s) => J::String(s.clone()),
        Yaml::Null => J::Null,
        Yaml::Array(a) => J::Array(a.iter().map(yaml_to_json).collect::<Option<_>>()?),
        Yaml::Hash(h) => J::Object(
            h.iter()
                .map(|(k, v)| Some((k.as_str()?.to_string(), yaml_to_json(v)?)))
                .collect::<Option<_>>()?,
        ),
        _ => return None,
    })
}

fn is_bool(s: &str) -> bool {
    s.eq_ignore_ascii_case("true") || s.eq_ignore_ascii_case("false")
}

/// `--name[=value]` with the name's underscores as dashes.
fn split_flag(arg: &str) -> Option<(String, Option<String>)> {
    let rest = arg.strip_prefix("--")?;
    let (name, value) = match rest.split_once('=') {
        Some((n, v)) => (n, Some(v.to_string())),
        None => (rest, None),
    };
    Some((name.replace('_', "-"), value))
}

/// Rewrites `strata serve` arguments (everything after `serve`); `known`
/// are the long flags `strata serve` takes.
pub fn translate(args: Vec<String>, known: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut from_file = Vec::new();
    let mut download_dir = None;
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let Some((name, inline)) = split_flag(arg) else {
            out.push(arg.clone());
            i += 1;
            continue;
        };
        let next = args.get(i + 1).filter(|n| !n.starts_with("--")).cloned();
        // The flag's value, and how many arguments it used.
        let (value, used) = match (&inline, &next) {
            (Some(v), _) => (Some(v.clone()), 1),
            (None, Some(n)) => (Some(n.clone()), 2),
            (None, None) => (None, 1),
        };
        if name == "kaito-config-file" {
            let path = value.context("--kaito-config-file needs a path")?;
            from_file = config_args(Path::new(&path), known)?;
            i += used;
            continue;
        }
        if name == "max-model-len" && value.as_deref() == Some("auto") {
            tracing::info!("--max-model-len auto: the model's context, capped by the KV cache");
            i += used;
            continue;
        }
        if let Some((takes, why)) = ignored(&name) {
            let used = match takes {
                Takes::Value => used,
                Takes::Switch if inline.is_none() && next.as_deref().is_some_and(is_bool) => 2,
                Takes::Switch => 1,
            };
            if name == "download-dir" {
                download_dir = value.clone();
            }
            tracing::info!("ignoring vLLM's --{name}: {why}");
            i += used;
            continue;
        }
        out.push(match inline {
            Some(v) => format!("--{name}={v}"),
            None => format!("--{name}"),
        });
        i += 1;
    }
    out.extend(from_file);
    if let Some(dir) = download_dir {
        resolve_model(&mut out, Path::new(&dir));
    }
    Ok(out)
}

/// The `vllm:` section of KAITO's inference_config.yaml as flags.
fn config_args(path: &Path, known: &[String]) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --kaito-config-file {}", path.display()))?;
    let docs = YamlLoader::load_from_str(&text)
        .with_context(|| format!("{} is not valid YAML", path.display()))?;
    let mut args = Vec::new();
    let Some(Yaml::Hash(top)) = docs.first() else {
        return Ok(args);
    };
    for (key, value) in top {
        let key = key.as_str().unwrap_or_default();
        match key {
            "vllm" => {}
            k if IGNORED_CONFIG.contains(&k) => {
                tracing::info!(
                    "{}: ignoring `{k}` (KAITO's wrapper setting; strata has no use for it)",
                    path.display()
                );
                continue;
            }
            k => {
                tracing::warn!("{}: unknown key `{k}`, ignored", path.display());
                continue;
            }
        }
        let Yaml::Hash(vllm) = value else { continue };
        for (k, v) in vllm {
            let name = k.as_str().unwrap_or_default().replace('_', "-");
            let v = match v {
                Yaml::Boolean(b) => b.to_string(),
                Yaml::Integer(n) => n.to_string(),
                Yaml::Real(r) | Yaml::String(r) => r.clone(),
                // A JSON-valued flag (`structured-outputs-config`) as a mapping.
                Yaml::Hash(_) | Yaml::Array(_) => match yaml_to_json(v) {
                    Some(json) => json.to_string(),
                    None => {
                        tracing::warn!(
                            "{}: vllm.{name} has values JSON cannot hold, ignored",
                            path.display()
                        );
                        continue;
                    }
                },
                other => {
                    tracing::warn!(
                        "{}: vllm.{name} = {other:?} is not a plain value, ignored",
                        path.display()
                    );
                    continue;
                }
            };
            if name == "max-model-len" && v == "auto" {
                continue;
            }
            if let Some((_, why)) = ignored(&name) {
                tracing::info!("{}: ignoring vllm.{name}: {why}", path.display());
            } else if known.contains(&name) {
                tracing::info!("{}: --{name} {v}", path.display());
                args.push(format!("--{name}={v}"));
            } else {
                tracing::warn!(
                    "{}: vllm.{name} is not a setting strata knows, ignored",
                    path.display()
                );
            }
        }
    }
    Ok(args)
}

/// A Hugging Face id as `--model` (`org/name`, any case) becomes its folder
/// under `dir`: the hub cache's `models--org--name/snapshots/<rev>`, or
/// `dir/org/name`.
fn resolve_model(args: &mut [String], dir: &Path) {
    let Some(pos) = args
        .iter()
        .position(|a| a == "--model" || a.starts_with("--model="))
    else {
        return;
    };
    let (value_at, id) = match args[pos].strip_prefix("--model=") {
        Some(v) => (pos, v.to_string()),
        None => match args.get(pos + 1) {
            Some(v) => (pos + 1, v.clone()),
            None => return,
        },
    };
    if Path::new(&id).exists() {
        return;
    }
    let Some(found) = find_in(dir, &id) else {
        return;
    };
    tracing::info!(
        "--model {id}: found under --download-dir at {}",
        found.display()
    );
    let path = found.display().to_string();
    args[value_at] = if value_at == pos {
        format!("--model={path}")
    } else {
        path
    };
}

fn find_in(dir: &Path, id: &str) -> Option<PathBuf> {
    let same = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
    let entries = |d: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(d)
            .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    };
    let hub = format!("models--{}", id.replace('/', "--"));
    for e in entries(dir) {
        let name = e.file_name()?.to_string_lossy().to_string();
        if same(&name, &hub) {
            let mut snaps = entries(&e.join("snapshots"));
            snaps.sort();
            if let Some(s) = snaps
                .into_iter()
                .rev()
                .find(|s| s.join("config.json").exists())
            {
                return Some(s);
            }
        }
    }
    let (org, name) = id.split_once('/')?;
    let org_dir = entries(dir).into_iter().find(|e| {
        e.file_name()
            .is_some_and(|n| same(&n.to_string_lossy(), org))
    })?;
    entries(&org_dir)
        .into_iter()
        .find(|e| {
            e.file_name()
                .is_some_and(|n| same(&n.to_string_lossy(), name))
        })
        .filter(|p| p.join("config.json").exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> Vec<String> {
        [
            "model",
            "port",
            "max-model-len",
            "gpu-memory-utilization",
            "max-num-seqs",
            "enable-prefix-caching",
            "served-model-name",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn kaitos_command_line_keeps_what_strata_uses_and_drops_the_rest() {
        // As KAITO builds it: --key=value, random order, mixed spellings.
        let got = translate(
            args(&[
                "--load_format=auto",
                "--trust-remote-code",
                "--served-model-name=llama",
                "--max-model-len=auto",
                "--distributed-executor-backend=ray",
                "--gpu-memory-utilization=0.84",
                "--compilation-config.pass_config.fuse_allreduce_rms=False",
                "--tokenizer_mode",
                "auto",
                "--enable-chunked-prefill",
                "false",
                "--port=5000",
            ]),
            &known(),
        )
        .unwrap();
        assert_eq!(
            got,
            args(&[
                "--served-model-name=llama",
                "--gpu-memory-utilization=0.84",
                "--port=5000"
            ])
        );
    }

    #[test]
    fn the_config_files_vllm_section_is_appended_and_unknown_keys_are_not_fatal() {
        let dir = std::env::temp_dir().join(format!("strata-kaito-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("inference_config.yaml");
        std::fs::write(
            &file,
            "max_probe_steps: 6\nkv_cache_cpu_memory_utilization: 0.5\nsurprise: 1\nvllm:\n  cpu-offload-gb: 0\n  gpu-memory-utilization: 0.9\n  max-model-len: 4096\n  max_num_seqs: 32\n  enable-prefix-caching: false\n  mystery-knob: 3\n",
        )
        .unwrap();
        let got = translate(
            args(&[
                "--gpu-memory-utilization=0.84",
                "--kaito-config-file",
                file.to_str().unwrap(),
            ]),
            &known(),
        )
        .unwrap();
        assert_eq!(
            got,
            args(&[
                "--gpu-memory-utilization=0.84",
                "--gpu-memory-utilization=0.9",
                "--max-model-len=4096",
                "--max-num-seqs=32",
                "--enable-prefix-caching=false",
            ])
        );
        assert!(translate(args(&["--kaito-config-file=/no/such/file"]), &known()).is_err());
    }

    #[test]
    fn a_hugging_face_id_is_found_under_the_download_dir() {
        let dir = std::env::temp_dir().join(format!("strata-dl-{}", std::process::id()));
        let snap = dir.join("models--meta-llama--Llama-3.3-70B-Instruct/snapshots/abc");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        let got = translate(
            args(&[
                "--model=meta-llama/llama-3.3-70b-instruct",
                "--download-dir=".to_string().as_str(),
            ]),
            &known(),
        )
        .unwrap();
        assert_eq!(got, args(&["--model=meta-llama/llama-3.3-70b-instruct"]));
        let got = translate(
            args(&[
                "--model",
                "meta-llama/llama-3.3-70b-instruct",
                "--download-dir",
                dir.to_str().unwrap(),
            ]),
            &known(),
        )
        .unwrap();
        assert_eq!(got, args(&["--model", &snap.display().to_string()]));
    }
}
