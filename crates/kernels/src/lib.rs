//! strata's CUDA kernels and their CPU references.
//!
//! With the `cuda` feature the build script compiles `kernels/*.cu` to PTX
//! and [`ptx`] embeds it; launchers load each function by its name
//! (`<kernel>_<f32|f16|bf16>`) through candle's CUDA device. Without the
//! feature nothing here needs CUDA, and the references below are what the
//! GPU check compares each kernel with. The references for rotary
//! embeddings, the KV-cache write and paged attention are the CPU model's own
//! (`strata_model::Rope::apply`, `write_kv`, `paged_attention`), so the GPU
//! is held to what the CPU path serves.

mod ops;

pub use ops::silu_and_mul;

/// The PTX of each `kernels/*.cu`, by module name.
#[cfg(feature = "cuda")]
pub mod ptx {
    macro_rules! module {
        ($name:ident, $file:literal) => {
            pub const $name: &str = include_str!(concat!(env!("OUT_DIR"), "/", $file, ".ptx"));
        };
    }
    module!(ACTIVATION, "activation");
    module!(KV_CACHE, "kv_cache");
    module!(PAGED_ATTENTION, "paged_attention");
    module!(RMS_NORM, "rms_norm");
    module!(ROTARY, "rotary");
}

/// Tokens per KV-cache block the kernels assume (`STRATA_BLOCK_SIZE` in
/// `kernels/common.cuh`); the model crate checks it equals its own.
pub const KERNEL_BLOCK_SIZE: usize = 16;

/// CPU references, one per kernel that has no CPU twin in the model.
pub mod reference {
    /// `kernels/rms_norm.cu`: `residual += x` (when `x` is given), then
    /// `out = residual / sqrt(mean(residual²) + eps) * weight`, per row of
    /// `weight.len()` elements.
    pub fn add_rms_norm(
        x: Option<&[f32]>,
        residual: &mut [f32],
        weight: &[f32],
        eps: f32,
        out: &mut [f32],
    ) {
        let hidden = weight.len();
        for (row, (r, o)) in residual
            .chunks_mut(hidden)
            .zip(out.chunks_mut(hidden))
            .enumerate()
        {
            if let Some(x) = x {
                for (r, x) in r.iter_mut().zip(&x[row * hidden..(row + 1) * hidden]) {
                    *r += x;
                }
            }
            let mean = r.iter().map(|v| v * v).sum::<f32>() / hidden as f32;
            let inv = 1.0 / (mean + eps).sqrt();
            for ((o, r), w) in o.iter_mut().zip(r.iter()).zip(weight) {
                *o = r * inv * w;
            }
        }
    }

    /// `kernels/activation.cu`: rows of `[gate | up]` (each `inter` wide) to
    /// `silu(gate) * up`.
    pub fn silu_and_mul(gate_up: &[f32], inter: usize, out: &mut [f32]) {
        for (gu, o) in gate_up.chunks(2 * inter).zip(out.chunks_mut(inter)) {
            let (g, u) = gu.split_at(inter);
            for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::reference::*;

    #[test]
    fn add_rms_norm_updates_the_residual_and_normalizes_each_row() {
        let x = [1.0, 1.0, -2.0, 0.0];
        let mut residual = [1.0, 3.0, 2.0, 2.0];
        let weight = [1.0, 0.5];
        let mut out = [0.0; 4];
        add_rms_norm(Some(&x), &mut residual, &weight, 0.0, &mut out);
        assert_eq!(residual, [2.0, 4.0, 0.0, 2.0]);
        // Row 0: rms = sqrt((4 + 16) / 2) = sqrt(10).
        let r = 10f32.sqrt();
        let want = [2.0 / r, 4.0 / r * 0.5, 0.0, 2.0 / 2f32.sqrt() * 0.5];
        for (o, w) in out.iter().zip(want) {
            assert!((o - w).abs() < 1e-6, "{out:?}");
        }
        // Without x it is a plain RMSNorm and leaves the residual alone.
        let before = residual;
        add_rms_norm(None, &mut residual, &weight, 0.0, &mut out);
        assert_eq!(residual, before);
    }

    #[test]
    fn silu_and_mul_gates_the_up_projection() {
        let gate_up = [0.0, 2.0, 3.0, 5.0];
        let mut out = [0.0; 2];
        silu_and_mul(&gate_up, 2, &mut out);
        assert_eq!(out[0], 0.0);
        let silu2 = 2.0 / (1.0 + (-2f32).exp());
        assert!((out[1] - silu2 * 5.0).abs() < 1e-6);
    }
}
