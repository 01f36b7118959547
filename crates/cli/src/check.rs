//! `strata check ...`: the parts of the GPU check that need strata itself
//! (scripts/gpu-check.sh runs them on the GPU machine, where there is no
//! Rust): every kernel against its CPU reference, a model's logits on the
//! device against the CPU and transformers' fixtures, and NCCL.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Subcommand};
use strata_model::{dtype_name, parse_dtype, DeviceRequest, Placement, StageModel, Weights};
use strata_types::{LayerRange, BLOCK_SIZE};

#[derive(Subcommand)]
pub enum Check {
    /// Runs every kernel on the device and compares it with its CPU reference.
    Kernels(Target),
    /// Runs a model's prompt and greedy decode on the device and compares the
    /// logits with the CPU's and, when the folder holds transformers'
    /// `reference.safetensors` (tests/fixtures/make_golden.py), with those.
    Model {
        #[command(flatten)]
        target: Target,
        /// A Hugging Face model folder.
        #[arg(long)]
        model: PathBuf,
    },
    /// All-reduce, all-gather and broadcast through the NCCL communicator
    /// (world size 1 on one GPU: in-process and joined by unique id).
    Nccl(Target),
}

#[derive(Args)]
pub struct Target {
    #[arg(long, default_value = "cuda")]
    device: DeviceRequest,
    /// Dtypes to check, comma-separated.
    #[arg(long, default_value = "float32,bfloat16,float16")]
    dtype: String,
}

impl Target {
    fn placements(&self) -> Result<Vec<Placement>> {
        self.dtype
            .split(',')
            .map(|d| {
                let dtype = parse_dtype(d.trim()).map_err(anyhow::Error::msg)?;
                Ok(Placement::resolve(self.device, dtype, 1)?)
            })
            .collect()
    }
}

pub fn run(check: Check) -> Result<()> {
    match check {
        Check::Kernels(t) => kernels(&t),
        Check::Model { target, model } => model_logits(&target, &model),
        Check::Nccl(t) => nccl(&t),
    }
}

fn kernels(t: &Target) -> Result<()> {
    let mut failed = 0;
    for p in t.placements()? {
        println!("kernels on {}:", p.describe());
        for r in strata_kernels::check::check_kernels(p.device(0), p.dtype())? {
            let ok = r.passed();
            failed += usize::from(!ok);
            println!(
                "  {:<24} max |err| {:.3e}  (tolerance {:.1e})  {}",
                r.kernel,
                r.max_abs_err,
                r.tolerance,
                if ok { "ok" } else { "FAILED" }
            );
        }
    }
    if failed > 0 {
        bail!("{failed} kernel check(s) failed");
    }
    Ok(())
}

/// Prompt and decode logits of one greedy run.
struct Run {
    prompt: Vec<Vec<f32>>,
    decode: Vec<Vec<f32>>,
    greedy: Vec<u32>,
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}

/// Runs `prompt` through `m`, then `steps` greedy decodes (following
/// `follow` when given, so two runs see the same tokens).
fn greedy(m: &dyn StageModel, prompt: &[u32], steps: usize, follow: Option<&[u32]>) -> Result<Run> {
    let blocks = (prompt.len() + steps).div_ceil(BLOCK_SIZE) + 1;
    let mut kv = m.new_kv_cache(blocks + 2)?;
    // Scattered blocks, as a long-running server has them.
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let mut forward = |start: usize, tokens: &[u32], all: bool| -> Result<Vec<Vec<f32>>> {
        Ok(m.forward_sequence(&mut kv, &table, start, tokens, all)?
            .to_vec2::<f32>()?)
    };
    let prompt_logits = forward(0, prompt, true)?;
    let mut greedy = vec![argmax(prompt_logits.last().context("an empty prompt")?)];
    let mut decode = Vec::new();
    for i in 0..steps {
        let token = follow.map_or(greedy[i], |f| f[i]);
        let l = forward(prompt.len() + i, &[token], false)?.remove(0);
        greedy.push(argmax(&l));
        decode.push(l);
    }
    Ok(Run {
        prompt: prompt_logits,
        decode,
        greedy,
    })
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn model_logits(t: &Target, dir: &Path) -> Result<()> {
    let weights = Weights::open(dir, &Device::Cpu)?;
    let arch = weights.architecture()?;
    let cfg = arch.config().clone();
    let reference = dir.join("reference.safetensors");
    let fixture = if reference.exists() {
        Some(candle_core::safetensors::load(&reference, &Device::Cpu)?)
    } else {
        None
    };
    let prompt: Vec<u32> = match &fixture {
        Some(f) => f["prompt_ids"]
            .to_vec1::<i64>()?
            .iter()
            .map(|&x| x as u32)
            .collect(),
        None => (1..=24)
            .map(|i| (i * 7919) % cfg.vocab_size as u32)
            .collect(),
    };
    let steps = match &fixture {
        Some(f) => f["decode_logits"].dim(0)?,
        None => 8,
    };
    let load = |w: &Weights| {
        arch.load_stage(
            w,
            LayerRange::full(cfg.num_layers),
            Arc::new(strata_comm::SingleRank),
            prompt.len() + steps + 1,
            &mut |_, _| {},
        )
    };
    let cpu = greedy(&*load(&weights)?, &prompt, steps, None)?;
    let scale = cpu
        .prompt
        .iter()
        .flatten()
        .fold(0f32, |m, x| m.max(x.abs()))
        .max(1.0);
    let mut failed = Vec::new();
    if let Some(f) = &fixture {
        let want: Vec<Vec<f32>> = f["prompt_logits"].to_vec2()?;
        println!(
            "cpu f32 vs transformers: max |diff| {:.3e}",
            max_diff(&cpu.prompt, &want)
        );
    }
    for p in t.placements()? {
        let m = load(&weights.on(p.device(0), p.dtype()))?;
        let got = greedy(&*m, &prompt, steps, Some(&cpu.greedy))?;
        let vs_cpu = max_diff(&got.prompt, &cpu.prompt).max(max_diff(&got.decode, &cpu.decode));
        // f32 differs from the CPU only in summation order; half precision
        // rounds activations, so it is held to the logit scale.
        let tol = match p.dtype() {
            DType::F32 => 1e-3 * scale,
            DType::F16 => 2e-2 * scale,
            _ => 8e-2 * scale,
        };
        let agree = got
            .greedy
            .iter()
            .zip(&cpu.greedy)
            .filter(|(a, b)| a == b)
            .count();
        let mut line = format!(
            "{}: vs cpu f32 max |diff| {vs_cpu:.3e} (tolerance {tol:.1e}), greedy tokens {agree}/{} equal",
            p.describe(),
            cpu.greedy.len()
        );
        if let Some(f) = &fixture {
            let want: Vec<Vec<f32>> = f["prompt_logits"].to_vec2()?;
            line += &format!(
                "; vs transformers max |diff| {:.3e}",
                max_diff(&got.prompt, &want)
            );
        }
        let ok = vs_cpu <= tol && (p.dtype() != DType::F32 || agree == cpu.greedy.len());
        println!("{line}  {}", if ok { "ok" } else { "FAILED" });
        if !ok {
            failed.push(dtype_name(p.dtype()));
        }
    }
    if !failed.is_empty() {
        bail!("the model's logits on the device differ from the CPU's in {failed:?}");
    }
    Ok(())
}

#[cfg(feature = "nccl")]
fn nccl(t: &Target) -> Result<()> {
    use candle_core::Tensor;
    use strata_comm::{nccl_unique_id, Communicator, NcclComm};
    for p in t.placements()? {
        let dev = p.device(0);
        let x = Tensor::arange(0f32, 24.0, dev)?
            .reshape((4, 6))?
            .to_dtype(p.dtype())?;
        let want = x.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let group = NcclComm::group(std::slice::from_ref(dev))?;
        let joined = NcclComm::join(dev, 0, 1, &nccl_unique_id()?)?;
        for (how, c) in [("group", &group[0]), ("unique id", &joined)] {
            let same = |t: Tensor| -> Result<bool> {
                Ok(t.to_dtype(DType::F32)?.to_vec2::<f32>()? == want)
            };
            let ok = same(c.all_reduce_sum(&x)?)?
                && same(c.all_gather(&x, 1)?)?
                && same(c.broadcast(&x, 0)?)?;
            println!(
                "nccl ({how}, world size 1) on {}: all_reduce, all_gather, broadcast {}",
                p.describe(),
                if ok { "ok" } else { "FAILED" }
            );
            if !ok {
                bail!("an NCCL collective changed its input at world size 1");
            }
        }
    }
    Ok(())
}

#[cfg(not(feature = "nccl"))]
fn nccl(_: &Target) -> Result<()> {
    bail!("this strata binary was built without NCCL (--features nccl)")
}
