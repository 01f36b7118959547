//! Every kernel run on a device and compared with its CPU reference on the
//! same inputs: the first part of the GPU check (`strata check-kernels`).
//! On the CPU it compares the CPU paths with themselves, which keeps the
//! harness itself tested.

use candle_core::{DType, Device, Result, Tensor};
use strata_types::{RopeStyle, BLOCK_SIZE};

use crate::{
    add_rms_norm, argmax_rows, paged_attention, rms_norm, rotary, silu_and_mul, write_kv,
    RopeTables,
};

/// One kernel's largest difference from its reference.
#[derive(Debug, Clone)]
pub struct KernelReport {
    pub kernel: &'static str,
    pub max_abs_err: f32,
    /// Allowed error: the dtype's rounding, scaled by the output's magnitude.
    pub tolerance: f32,
}

impl KernelReport {
    pub fn passed(&self) -> bool {
        self.max_abs_err <= self.tolerance
    }
}

/// Deterministic values in [-1, 1) (no RNG dependency; any spread will do).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn relative_tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 2e-2,
        DType::F16 => 4e-3,
        _ => 1e-5,
    }
}

/// Compares `got` (any device, any dtype) with `want` (CPU f32).
fn report(kernel: &'static str, got: &Tensor, want: &Tensor, dtype: DType) -> Result<KernelReport> {
    let got = got
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?;
    let want = want.flatten_all()?;
    let scale = want.abs()?.max(0)?.to_scalar::<f32>()?.max(1.0);
    let err = (got - want)?.abs()?.max(0)?.to_scalar::<f32>()?;
    Ok(KernelReport {
        kernel,
        max_abs_err: err,
        tolerance: relative_tolerance(dtype) * scale,
    })
}

/// Runs every kernel on `device` in `dtype` and on the CPU in f32.
pub fn check_kernels(device: &Device, dtype: DType) -> Result<Vec<KernelReport>> {
    let cpu = Device::Cpu;
    let on = |t: &Tensor| -> Result<Tensor> { t.to_device(device)?.to_dtype(dtype) };
    let mut out = Vec::new();

    let (tokens, hidden, inter) = (37, 320, 384);
    let x = Tensor::from_vec(values(tokens * hidden, 1), (tokens, hidden), &cpu)?;
    let r = Tensor::from_vec(values(tokens * hidden, 2), (tokens, hidden), &cpu)?;
    let w = Tensor::from_vec(values(hidden, 3), hidden, &cpu)?;
    let (want_sum, want_norm) = add_rms_norm(&x, &r, &w, 1e-5)?;
    let (sum, norm) = add_rms_norm(&on(&x)?, &on(&r)?, &on(&w)?, 1e-5)?;
    out.push(report("add_rms_norm (sum)", &sum, &want_sum, dtype)?);
    out.push(report("add_rms_norm (norm)", &norm, &want_norm, dtype)?);
    out.push(report(
        "rms_norm",
        &rms_norm(&on(&r)?, &on(&w)?, 1e-5)?,
        &rms_norm(&r, &w, 1e-5)?,
        dtype,
    )?);

    let gu = Tensor::from_vec(values(tokens * 2 * inter, 4), (tokens, 2 * inter), &cpu)?;
    out.push(report(
        "silu_and_mul",
        &silu_and_mul(&on(&gu)?)?,
        &silu_and_mul(&gu)?,
        dtype,
    )?);

    // Greedy choice: rows with the maximum twice (the first must win), a
    // NaN, all -inf, and a row wider than a block's threads. Compared with
    // the reference on the same values rounded to `dtype`.
    let (n, vocab) = (6, 3000);
    let mut logits = values(n * vocab, 7);
    logits[5] = 2.0; // row 0: 2.0 at 5 and at 2900
    logits[2900] = 2.0;
    logits[vocab + 7] = f32::NAN; // row 1: a NaN, then the maximum
    logits[vocab + 100] = 3.0;
    logits[2 * vocab..3 * vocab].fill(f32::NEG_INFINITY); // row 2
    logits[4 * vocab + 2999] = 5.0; // row 4: the last column
    let logits = Tensor::from_vec(logits, (n, vocab), &cpu)?;
    let rounded = logits.to_dtype(dtype)?.to_dtype(DType::F32)?;
    let got = argmax_rows(&on(&logits)?)?.to_dtype(DType::F32)?;
    let want = argmax_rows(&rounded)?.to_dtype(DType::F32)?;
    out.push(KernelReport {
        kernel: "argmax_rows",
        max_abs_err: report("argmax_rows", &got, &want, DType::F32)?.max_abs_err,
        tolerance: 0.0,
    });

    // Attention geometry: GQA 8 query heads over 2 KV heads of 128, two
    // sequences (a prefill chunk after cached tokens, and a decode) in
    // scattered blocks.
    let (heads, kv_heads, d) = (8, 2, 128);
    let max_pos = 256;
    let half = d / 2;
    let mut cos = Vec::with_capacity(max_pos * half);
    let mut sin = Vec::with_capacity(max_pos * half);
    for p in 0..max_pos {
        for i in 0..half {
            let a = p as f32 / 10_000f32.powf(2.0 * i as f32 / d as f32);
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    for style in [RopeStyle::Half, RopeStyle::Interleaved] {
        let rope_cpu = RopeTables::new(&cos, &sin, half, style, &cpu)?;
        let rope_dev = RopeTables::new(&cos, &sin, half, style, device)?;
        let positions: Vec<u32> = (0..tokens as u32)
            .map(|t| (t * 5) % max_pos as u32)
            .collect();
        let pos_cpu = Tensor::new(positions.as_slice(), &cpu)?;
        let pos_dev = Tensor::new(positions.as_slice(), device)?;
        let xr = Tensor::from_vec(values(tokens * heads * d, 5), (tokens, heads, d), &cpu)?;
        let xd = on(&xr)?;
        rotary(&xr, &pos_cpu, &rope_cpu)?;
        rotary(&xd, &pos_dev, &rope_dev)?;
        out.push(report(
            if style == RopeStyle::Half {
                "rotary (half)"
            } else {
                "rotary (interleaved)"
            },
            &xd,
            &xr,
            dtype,
        )?);

        // Sequence 0: 40 cached tokens + 30 new; sequence 1: 90 cached + 1 new.
        let tables: [&[u32]; 2] = [&[7, 2, 9, 4, 0], &[1, 3, 5, 6, 8, 10]];
        let max_blocks = 6;
        let mut flat = vec![0u32; 2 * max_blocks];
        for (s, t) in tables.iter().enumerate() {
            flat[s * max_blocks..s * max_blocks + t.len()].copy_from_slice(t);
        }
        let lens = [70usize, 91];
        let (mut pos, mut slots, mut seq) = (Vec::new(), Vec::new(), Vec::new());
        for (s, &n) in lens.iter().enumerate() {
            for p in 0..n {
                pos.push(p as u32);
                slots.push(tables[s][p / BLOCK_SIZE] * BLOCK_SIZE as u32 + (p % BLOCK_SIZE) as u32);
                seq.push(s as u32);
            }
        }
        let all = pos.len();
        let row = (heads + 2 * kv_heads) * d;
        let qkv = Tensor::from_vec(values(all * row, 6), (all, row), &cpu)?;
        let num_slots = 11 * BLOCK_SIZE;
        let cache_cpu = Tensor::zeros((2, num_slots, kv_heads, d), DType::F32, &cpu)?;
        let cache_dev = Tensor::zeros((2, num_slots, kv_heads, d), dtype, device)?;
        let qkv_dev = on(&qkv)?;
        let u32s = |v: &[u32], dev: &Device| Tensor::new(v, dev);
        for (qkv, cache, dev) in [(&qkv, &cache_cpu, &cpu), (&qkv_dev, &cache_dev, device)] {
            let k = qkv.narrow(1, heads * d, kv_heads * d)?;
            let v = qkv.narrow(1, (heads + kv_heads) * d, kv_heads * d)?;
            let rope = if dev.is_cpu() { &rope_cpu } else { &rope_dev };
            write_kv(cache, &k, &v, &u32s(&pos, dev)?, &u32s(&slots, dev)?, rope)?;
        }
        out.push(report("write_kv", &cache_dev, &cache_cpu, dtype)?);

        // Attend from the last 30 tokens of sequence 0 and the last of 1
        // (a chunk after cached tokens, and a decode); then from all of
        // sequence 1 and the last of 0 (a prompt from position 0, in tiles
        // of 16 and a partial one, beside a decode). The prefill plan sends
        // the long chunks to the tensor-core kernel where it applies.
        let chunks: [(&str, Vec<usize>, [usize; 2]); 3] = [
            (
                "paged_attention",
                (40..70).chain([all - 1]).collect(),
                [30, 1],
            ),
            (
                "prefill_attention (after cached tokens)",
                (40..70).chain([all - 1]).collect(),
                [30, 1],
            ),
            (
                "prefill_attention (from position 0)",
                (70..all).chain([69]).collect(),
                [91, 1],
            ),
        ];
        for (name, picks, lens) in chunks {
            let plan = (name != "paged_attention")
                .then(|| crate::PrefillPlan::new(&lens).expect("a long chunk"));
            let idx = |dev: &Device| {
                Tensor::new(picks.iter().map(|&i| i as u32).collect::<Vec<_>>(), dev)
            };
            let sel = |v: &[u32], dev: &Device| {
                u32s(&picks.iter().map(|&i| v[i]).collect::<Vec<_>>(), dev)
            };
            let mut results = Vec::new();
            for (qkv, cache, dev) in [(&qkv, &cache_cpu, &cpu), (&qkv_dev, &cache_dev, device)] {
                let q = qkv.index_select(&idx(dev)?, 0)?;
                let rope = if dev.is_cpu() { &rope_cpu } else { &rope_dev };
                let tables = Tensor::from_slice(&flat, (2, max_blocks), dev)?;
                let tiles = plan.as_ref().map(|p| p.upload(dev)).transpose()?;
                results.push(paged_attention(
                    &q.narrow(1, 0, heads * d)?,
                    cache,
                    &sel(&pos, dev)?,
                    &sel(&seq, dev)?,
                    &tables,
                    rope,
                    heads,
                    tiles.as_ref(),
                )?);
            }
            out.push(report(name, &results[1], &results[0], dtype)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_check_runs_every_kernel_and_passes_on_the_cpu() {
        let reports =
            super::check_kernels(&candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
        let names: Vec<_> = reports.iter().map(|r| r.kernel).collect();
        for k in [
            "add_rms_norm (sum)",
            "rms_norm",
            "silu_and_mul",
            "rotary (half)",
            "write_kv",
            "paged_attention",
            "prefill_attention (from position 0)",
            "argmax_rows",
        ] {
            assert!(names.contains(&k), "{k} missing from {names:?}");
        }
        assert!(
            reports.iter().all(|r| r.passed() && r.max_abs_err == 0.0),
            "{reports:?}"
        );
    }
}
