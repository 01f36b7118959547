//! Times the CPU matmuls of one SmolLM2-135M layer (the fused q/k/v, o, the
//! fused gate/up and down projections) and its lm_head, at a few token
//! counts, on the path `Isa::chosen` picks (`STRATA_CPU_ISA` caps it).
//!
//!     RAYON_NUM_THREADS=2 cargo run --release -p strata-model --example matmul_bench [TOKENS] [FORMAT]
//!
//! TOKENS: comma-separated token counts (default 1,16,64,512). FORMAT: `q4_1`
//! (the demo GGUF: Q4_1 layers, a Q8_0 lm_head; the default), `bf16` or `f16`
//! (dense 16-bit weights, as a Hugging Face checkpoint stores them).
//! `LAYERS=30` times 30 distinct layers per pass, a whole model's working
//! set (213 MB in f16), far beyond the L2 caches; the default, one layer,
//! stays cached.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use half::f16;
use strata_model::{HalfKind, HalfMatrix, Q4_1Matrix, Q8_0Matrix};

/// GGUF bytes of `blocks` blocks of `bytes` each, with plausible scales.
fn gguf(blocks: usize, bytes: usize, with_min: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(blocks * bytes);
    for b in 0..blocks {
        let start = out.len();
        out.extend(f16::from_f32(0.002 + (b % 13) as f32 * 1e-4).to_le_bytes());
        if with_min {
            out.extend(f16::from_f32(-0.01 - (b % 7) as f32 * 1e-3).to_le_bytes());
        }
        let payload = bytes - (out.len() - start);
        out.extend((0..payload).map(|j| ((b * 131 + j * 29) % 251) as u8));
    }
    out
}

fn best_of(runs: usize, mut f: impl FnMut()) -> Duration {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .expect("runs > 0")
}

fn main() {
    let tokens: Vec<usize> = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "1,16,64,512".into())
        .split(',')
        .map(|c| c.trim().parse().expect("a token count"))
        .collect();
    type Forward = Box<dyn Fn(&Tensor) -> Tensor + Send + Sync>;
    let q4 = |rows: usize, cols: usize| -> Forward {
        let w = Q4_1Matrix::from_bytes("w", &gguf(rows * cols / 32, 20, true), rows, cols).unwrap();
        Box::new(move |x| w.forward(x).unwrap())
    };
    let half = |kind: HalfKind| {
        move |rows: usize, cols: usize| -> Forward {
            let bytes: Vec<u8> = (0..rows * cols)
                .flat_map(|i| {
                    let v = ((i * 7919) % 1013) as f32 / 1013.0 - 0.5;
                    match kind {
                        HalfKind::Bf16 => half::bf16::from_f32(v).to_le_bytes(),
                        HalfKind::F16 => f16::from_f32(v).to_le_bytes(),
                    }
                })
                .collect();
            let w = HalfMatrix::from_parts("w", kind, &[&bytes], rows, cols).unwrap();
            Box::new(move |x| w.forward(x).unwrap())
        }
    };
    let format = std::env::args().nth(2).unwrap_or_else(|| "q4_1".into());
    let (matrix, lm_head): (&(dyn Fn(usize, usize) -> Forward + Sync), Forward) = match format
        .as_str()
    {
        "q4_1" => {
            let lm = Q8_0Matrix::from_bytes("lm", &gguf(49152 * 576 / 32, 34, false), 49152, 576)
                .unwrap();
            println!("path: {:?}", lm.isa());
            (&q4, Box::new(move |x| lm.forward(x).unwrap()))
        }
        "bf16" => (&half(HalfKind::Bf16), half(HalfKind::Bf16)(49152, 576)),
        "f16" => (&half(HalfKind::F16), half(HalfKind::F16)(49152, 576)),
        other => panic!("FORMAT is q4_1, bf16 or f16, not {other}"),
    };
    // (name, matrix, rows, input width)
    let layers: usize = std::env::var("LAYERS").map_or(1, |v| v.parse().expect("LAYERS: a count"));
    let layer: Vec<_> = (0..layers)
        .flat_map(|_| {
            [
                ("qkv", matrix(960, 576), 960, 576),
                ("o", matrix(576, 576), 576, 576),
                ("gate_up", matrix(3072, 576), 3072, 576),
                ("down", matrix(576, 1536), 576, 1536),
            ]
        })
        .collect();
    println!("tokens   {layers} layer(s) ms   per token µs   GMAC/s   lm_head ms");
    let input = |m: usize, k: usize| {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1009) as f32 / 1009.0 - 0.5)
            .collect();
        Tensor::from_vec(x, (m, k), &Device::Cpu).unwrap()
    };
    let macs: usize = layer.iter().map(|(_, _, rows, k)| rows * k).sum();
    // On one of rayon's workers, as the server runs a step: the matmuls'
    // parallel loops then split inside the pool rather than each handing a
    // job in from outside.
    rayon::scope(|_| {
        for &m in &tokens {
            let xs: Vec<Tensor> = layer.iter().map(|(_, _, _, k)| input(m, *k)).collect();
            let runs = (2048 / m).clamp(3, 200);
            let t = best_of(runs, || {
                for ((_, w, _, _), x) in layer.iter().zip(&xs) {
                    w(x);
                }
            });
            let x = input(m, 576);
            let lm = best_of((runs / 4).max(2), || {
                lm_head(&x);
            });
            let s = t.as_secs_f64();
            println!(
                "{m:6}   {:8.3}   {:12.1}   {:6.1}   {:10.3}",
                s * 1e3,
                s * 1e6 / m as f64,
                (macs * m) as f64 / s / 1e9,
                lm.as_secs_f64() * 1e3
            );
        }
    });
}
