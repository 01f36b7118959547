//! Rotary position embeddings, precomputed per position.

use std::sync::OnceLock;

use strata_kernels::RopeTables;
use strata_types::RopeStyle;

/// How positions are rotated into a head: everything [`Rope`] is built from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    /// Dimensions of a head that rotate.
    pub dim: usize,
    pub theta: f32,
    pub scaling: Option<RopeScaling>,
    pub style: RopeStyle,
}

/// Rope scaling for contexts past the one a model was trained on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Llama 3's frequency-dependent scaling (`rope_type: "llama3"`).
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// YaRN (`rope_type: "yarn"`, DeepSeek-V3): frequencies between
    /// interpolated and extrapolated by a ramp over the dimensions, and
    /// cos/sin scaled by `attention_factor`.
    Yarn {
        factor: f32,
        original_max_position_embeddings: usize,
        beta_fast: f32,
        beta_slow: f32,
        /// Round the ramp's ends outward (transformers' `truncate`, default on).
        truncate: bool,
        attention_factor: f32,
    },
}

/// YaRN's magnitude correction for a context `scale` times longer.
pub fn yarn_mscale(scale: f32, mscale: f32) -> f32 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// cos/sin tables `[positions, head_dim / 2]` and how dimensions pair up.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    style: RopeStyle,
    max_positions: usize,
    /// The same tables on the kernels' device, made on first use.
    device_tables: OnceLock<RopeTables>,
}

impl Rope {
    /// `freq_factors` divides each frequency (GGUF's `rope_freqs` tensor,
    /// how llama.cpp stores Llama 3 scaling).
    pub fn new(cfg: &RopeConfig, freq_factors: Option<&[f32]>, max_positions: usize) -> Self {
        let dim = cfg.dim;
        let half = dim / 2;
        let mut inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / cfg.theta.powf((2 * i) as f32 / dim as f32))
            .collect();
        let mut magnitude = 1.0;
        match cfg.scaling {
            None => {}
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                // Leave high frequencies, divide low ones by `factor`,
                // interpolate smoothly in between.
                let old = original_max_position_embeddings as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
            Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                attention_factor,
            }) => {
                // transformers' _compute_yarn_parameters, step for step.
                let (d, base) = (dim as f64, cfg.theta as f64);
                let old = original_max_position_embeddings as f64;
                let correction_dim = |rotations: f64| {
                    d * (old / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
                };
                let mut low = correction_dim(beta_fast as f64);
                let mut high = correction_dim(beta_slow as f64);
                if truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0) as f32, high.min(d - 1.0) as f32);
                if low == high {
                    high += 0.001;
                }
                for (i, f) in inv_freq.iter_mut().enumerate() {
                    let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolation = 1.0 - ramp;
                    *f = (*f / factor) * (1.0 - extrapolation) + *f * extrapolation;
                }
                magnitude = attention_factor;
            }
        }
        if let Some(ff) = freq_factors {
            for (f, d) in inv_freq.iter_mut().zip(ff) {
                *f /= d;
            }
        }
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos() * magnitude);
                sin.push(a.sin() * magnitude);
            }
        }
        Self {
            cos,
            sin,
            half,
            style: cfg.style,
            max_positions,
            device_tables: OnceLock::new(),
        }
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// The same tables on `device`, as strata's kernels read them (made
    /// once: a stage runs on one device).
    pub fn tables(&self, device: &candle_core::Device) -> candle_core::Result<&RopeTables> {
        if let Some(t) = self.device_tables.get() {
            return Ok(t);
        }
        let t = RopeTables::new(&self.cos, &self.sin, self.half, self.style, device)?;
        Ok(self.device_tables.get_or_init(|| t))
    }

    /// Rotates one head vector `x` for position `pos` into `out`.
    #[inline]
    pub fn apply(&self, x: &[f32], pos: usize, out: &mut [f32]) {
        let h = self.half;
        let cos = &self.cos[pos * h..(pos + 1) * h];
        let sin = &self.sin[pos * h..(pos + 1) * h];
        match self.style {
            RopeStyle::Half => {
                let (x0, x1) = x.split_at(h);
                let (o0, o1) = out.split_at_mut(h);
                for i in 0..h {
                    o0[i] = x0[i] * cos[i] - x1[i] * sin[i];
                    o1[i] = x0[i] * sin[i] + x1[i] * cos[i];
                }
            }
            RopeStyle::Interleaved => {
                for i in 0..h {
                    let (a, b) = (x[2 * i], x[2 * i + 1]);
                    out[2 * i] = a * cos[i] - b * sin[i];
                    out[2 * i + 1] = a * sin[i] + b * cos[i];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(style: RopeStyle) -> RopeConfig {
        RopeConfig {
            dim: 4,
            theta: 10_000.0,
            scaling: None,
            style,
        }
    }

    #[test]
    fn position_zero_is_the_identity_and_norms_are_kept() {
        for style in [RopeStyle::Half, RopeStyle::Interleaved] {
            let r = Rope::new(&cfg(style), None, 16);
            let x = [1.0, 2.0, 3.0, 4.0];
            let mut out = [0.0; 4];
            r.apply(&x, 0, &mut out);
            assert_eq!(out, x);
            r.apply(&x, 7, &mut out);
            let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
            assert!((n(&out) - n(&x)).abs() < 1e-4);
            assert_ne!(out, x);
        }
    }

    #[test]
    fn the_two_styles_agree_up_to_a_permutation() {
        // Interleaved pairs (0,1),(2,3) are Half pairs (0,2),(1,3).
        let h = Rope::new(&cfg(RopeStyle::Half), None, 16);
        let i = Rope::new(&cfg(RopeStyle::Interleaved), None, 16);
        let x = [0.5, -1.0, 2.0, 0.25];
        let (mut a, mut b) = ([0.0; 4], [0.0; 4]);
        h.apply(&[x[0], x[2], x[1], x[3]], 5, &mut a);
        i.apply(&x, 5, &mut b);
        assert_eq!([a[0], a[2], a[1], a[3]], b);
    }
}
