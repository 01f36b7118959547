//! The element-wise kernels as candle ops: fused residual add + RMSNorm,
//! SiLU-and-mul, rotary embedding.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, InplaceOp1, Layout, Result, Shape, Tensor};

use crate::attention::RopeTables;
use crate::{err, reference};

/// The f32 elements of a CPU storage from `l`'s start offset on.
pub(crate) fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(&v[l.start_offset()..]),
        _ => Err(err(format!("{what} on CPU takes f32"))),
    }
}

pub(crate) fn cpu_f32_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<&'a mut [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(&mut v[l.start_offset()..]),
        _ => Err(err(format!("{what} on CPU takes f32"))),
    }
}

/// `(rows, width, row stride)` of a 2-D layout whose rows are contiguous.
pub(crate) fn rows(l: &Layout, what: &str) -> Result<(usize, usize, usize)> {
    match (l.dims(), l.stride()) {
        ([r, w], [s, 1]) => Ok((*r, *w, *s)),
        ([r, 1], [s, _]) => Ok((*r, 1, *s)),
        (d, s) => Err(err(format!(
            "{what} needs [rows, width] with contiguous rows, got dims {d:?} strides {s:?}"
        ))),
    }
}

fn contiguous(l: &Layout, what: &str) -> Result<()> {
    if l.is_contiguous() {
        Ok(())
    } else {
        Err(err(format!("{what} needs a contiguous input")))
    }
}

/// `silu(gate) * up` over a `[tokens, 2 * inter]` tensor holding `[gate | up]`.
pub fn silu_and_mul(gate_up: &Tensor) -> Result<Tensor> {
    gate_up.apply_op1_no_bwd(&SiluAndMul)
}

/// RMSNorm of each row of `x` (`[tokens, hidden]`).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&RmsNorm {
        weight: weight.clone(),
        eps,
    })
}

/// `residual + x` and its RMSNorm, in one pass: returns `(new residual,
/// normed)`, both `[tokens, hidden]`.
pub fn add_rms_norm(
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let both = x.contiguous()?.apply_op2_no_bwd(
        &residual.contiguous()?,
        &RmsNorm {
            weight: weight.clone(),
            eps,
        },
    )?;
    Ok((both.get(0)?, both.get(1)?))
}

/// Rotates `x` (`[tokens, heads, head_dim]`, contiguous) in place, token `t`
/// at `positions[t]` (u32 on `x`'s device).
pub fn rotary(x: &Tensor, positions: &Tensor, rope: &RopeTables) -> Result<()> {
    x.inplace_op1(&Rotary { positions, rope })
}

struct SiluAndMul;

fn gate_up_dims(l: &Layout) -> Result<(usize, usize)> {
    match l.dims() {
        [t, w] if w % 2 == 0 => Ok((*t, w / 2)),
        d => Err(err(format!(
            "silu_and_mul needs [tokens, 2 * inter], got {d:?}"
        ))),
    }
}

impl CustomOp1 for SiluAndMul {
    fn name(&self) -> &'static str {
        "silu_and_mul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (tokens, inter) = gate_up_dims(l)?;
        contiguous(l, "silu_and_mul")?;
        let mut out = vec![0f32; tokens * inter];
        reference::silu_and_mul(cpu_f32(s, l, "silu_and_mul")?, inter, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((tokens, inter))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{by_dtype, load, per_token, view, KernelType};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::{CudaStorage, WrapErr};

        fn run<T: KernelType>(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
            let (tokens, inter) = gate_up_dims(l)?;
            contiguous(l, "silu_and_mul")?;
            let dev = s.device().clone();
            let input = view::<T>(s, l)?;
            // SAFETY: the kernel writes every element before anything reads it.
            let out = unsafe { dev.alloc::<T>((tokens * inter).max(1)) }?;
            if tokens == 0 {
                return Ok(CudaStorage::wrap_cuda_slice(out, dev));
            }
            let f = load(
                &dev,
                "silu_and_mul",
                s.dtype(),
                "activation",
                crate::ptx::ACTIVATION,
            )?;
            let stream = dev.cuda_stream();
            let inter_arg = inter as i32;
            let mut b = stream.launch_builder(&f);
            b.arg(&input).arg(&out).arg(&inter_arg);
            // A block per 256 elements of a token's row (activation.cu).
            let cfg = per_token(tokens * inter.div_ceil(256), 256);
            // SAFETY: the arguments match silu_and_mul in activation.cu.
            unsafe { b.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        let shape = Shape::from(gate_up_dims(l)?);
        Ok((by_dtype!(s.dtype(), run(s, l))?, shape))
    }
}

/// RMSNorm as a unary op (`rms_norm`) and fused with the residual add as a
/// binary one (`add_rms_norm`: `x`, `residual` → `[2, tokens, hidden]`).
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn dims(&self, l: &Layout) -> Result<(usize, usize)> {
        let hidden = self.weight.elem_count();
        match l.dims() {
            [t, h] if *h == hidden => Ok((*t, *h)),
            d => Err(err(format!("rms_norm needs [tokens, {hidden}], got {d:?}"))),
        }
    }

    fn cpu(
        &self,
        x: Option<(&CpuStorage, &Layout)>,
        r: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (tokens, hidden) = self.dims(rl)?;
        contiguous(rl, "rms_norm")?;
        // The weight is read where it lies (this runs per layer per step).
        let (ws, wl) = self.weight.storage_and_layout();
        let candle_core::Storage::Cpu(ws) = &*ws else {
            return Err(err("rms_norm on CPU needs its weight on the CPU"));
        };
        let weight = &cpu_f32(ws, wl, "rms_norm's weight")?[..hidden];
        let n = tokens * hidden;
        let residual = &cpu_f32(r, rl, "rms_norm")?[..n];
        match x {
            None => {
                let mut out = vec![0f32; n];
                reference::add_rms_norm(None, &mut residual.to_vec(), weight, self.eps, &mut out);
                Ok((CpuStorage::F32(out), Shape::from((tokens, hidden))))
            }
            Some((xs, xl)) => {
                check_x(xl, rl)?;
                let x = cpu_f32(xs, xl, "add_rms_norm")?;
                // [new residual | normed] in one buffer.
                let mut both = residual.to_vec();
                both.resize(2 * n, 0.0);
                let (sum, out) = both.split_at_mut(n);
                reference::add_rms_norm(Some(x), sum, weight, self.eps, out);
                Ok((CpuStorage::F32(both), Shape::from((2, tokens, hidden))))
            }
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        x: Option<(&candle_core::CudaStorage, &Layout)>,
        r: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{by_dtype, cuda, load, per_token, view, KernelType};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::{CudaStorage, WrapErr};

        fn run<T: KernelType>(
            op: &RmsNorm,
            x: Option<(&CudaStorage, &Layout)>,
            r: &CudaStorage,
            rl: &Layout,
        ) -> Result<CudaStorage> {
            let (tokens, hidden) = op.dims(rl)?;
            contiguous(rl, "rms_norm")?;
            let dev = r.device().clone();
            let weight = op.weight.to_dtype(r.dtype())?;
            let (ws, wl) = weight.storage_and_layout();
            let w = view::<T>(cuda(&ws, "the norm weight")?, wl)?;
            let residual = view::<T>(r, rl)?;
            let n = tokens * hidden;
            // SAFETY: every element is written by the kernel before it is read.
            let out = unsafe { dev.alloc::<T>((if x.is_some() { 2 * n } else { n }).max(1)) }?;
            if tokens == 0 {
                return Ok(CudaStorage::wrap_cuda_slice(out, dev));
            }
            let stream = dev.cuda_stream();
            let (hidden_arg, eps) = (hidden as i32, op.eps);
            // Block sums need whole warps.
            let threads = hidden.div_ceil(32).clamp(1, 32) as u32 * 32;
            let cfg = per_token(tokens, threads);
            match x {
                None => {
                    let f = load(
                        &dev,
                        "rms_norm",
                        r.dtype(),
                        "rms_norm",
                        crate::ptx::RMS_NORM,
                    )?;
                    let mut b = stream.launch_builder(&f);
                    b.arg(&residual)
                        .arg(&w)
                        .arg(&out)
                        .arg(&hidden_arg)
                        .arg(&eps);
                    // SAFETY: the arguments match rms_norm in rms_norm.cu.
                    unsafe { b.launch(cfg) }.w()?;
                }
                Some((xs, xl)) => {
                    check_x(xl, rl)?;
                    let xv = view::<T>(xs, xl)?;
                    let (res_out, normed) = (out.slice(..n), out.slice(n..));
                    let f = load(
                        &dev,
                        "add_rms_norm",
                        r.dtype(),
                        "rms_norm",
                        crate::ptx::RMS_NORM,
                    )?;
                    let mut b = stream.launch_builder(&f);
                    b.arg(&xv)
                        .arg(&residual)
                        .arg(&res_out)
                        .arg(&w)
                        .arg(&normed)
                        .arg(&hidden_arg)
                        .arg(&eps);
                    // SAFETY: the arguments match add_rms_norm in rms_norm.cu.
                    unsafe { b.launch(cfg) }.w()?;
                }
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        let (tokens, hidden) = self.dims(rl)?;
        let shape = match x {
            None => Shape::from((tokens, hidden)),
            Some(_) => Shape::from((2, tokens, hidden)),
        };
        Ok((by_dtype!(r.dtype(), run(self, x, r, rl))?, shape))
    }
}

/// `add_rms_norm`'s `x` must be a contiguous tensor shaped like the residual.
fn check_x(xl: &Layout, rl: &Layout) -> Result<()> {
    if xl.dims() != rl.dims() {
        return Err(err(format!(
            "add_rms_norm: x is {:?} but the residual {:?}",
            xl.dims(),
            rl.dims()
        )));
    }
    contiguous(xl, "add_rms_norm")
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms_norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu(None, s, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda(None, s, l)
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "add_rms_norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        r: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu(Some((x, xl)), r, rl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        r: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda(Some((x, xl)), r, rl)
    }
}

struct Rotary<'a> {
    positions: &'a Tensor,
    rope: &'a RopeTables,
}

impl Rotary<'_> {
    fn dims(&self, l: &Layout) -> Result<(usize, usize, usize)> {
        match l.dims() {
            [t, h, d] if d % 2 == 0 && *t == self.positions.elem_count() => Ok((*t, *h, *d)),
            d => Err(err(format!(
                "rotary needs [tokens, heads, even head_dim] with one position per token, got {d:?} and {} positions",
                self.positions.elem_count()
            ))),
        }
    }
}

impl InplaceOp1 for Rotary<'_> {
    fn name(&self) -> &'static str {
        "rotary"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let (t, h, d) = self.dims(l)?;
        contiguous(l, "rotary")?;
        let positions = self.positions.to_vec1::<u32>()?;
        let (cos, sin) = self.rope.host()?;
        let x = &mut cpu_f32_mut(s, l, "rotary")?[..t * h * d];
        reference::rotary(x, &positions, self.rope.rotation(&cos, &sin), d);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        use crate::cuda::{by_dtype, cuda, load, per_token, view, KernelType};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::{CudaStorage, WrapErr};

        fn run<T: KernelType>(op: &Rotary, s: &mut CudaStorage, l: &Layout) -> Result<()> {
            let (t, h, d) = op.dims(l)?;
            contiguous(l, "rotary")?;
            if t == 0 {
                return Ok(());
            }
            let dev = s.device().clone();
            let f = load(&dev, "rotary", s.dtype(), "rotary", crate::ptx::ROTARY)?;
            let (ps, pl) = op.positions.storage_and_layout();
            let pos = view::<u32>(cuda(&ps, "positions")?, pl)?;
            let (cs, cl) = op.rope.cos.storage_and_layout();
            let cos = view::<f32>(cuda(&cs, "the rotary tables")?, cl)?;
            let (ss, sl) = op.rope.sin.storage_and_layout();
            let sin = view::<f32>(cuda(&ss, "the rotary tables")?, sl)?;
            let mut x = s.as_cuda_slice_mut::<T>()?.slice_mut(l.start_offset()..);
            let (heads, head_dim, style) = (h as i32, d as i32, op.rope.style_code());
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&mut x)
                .arg(&pos)
                .arg(&cos)
                .arg(&sin)
                .arg(&heads)
                .arg(&head_dim)
                .arg(&style);
            let cfg = per_token(t, 256);
            // SAFETY: the arguments match rotary in rotary.cu.
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        }
        by_dtype!(s.dtype(), run(self, s, l))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    #[test]
    fn silu_and_mul_on_cpu_is_the_reference_and_refuses_strided_input() {
        let v: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 3.0).collect();
        let t = Tensor::from_vec(v.clone(), (2, 6), &Device::Cpu).unwrap();
        let got = super::silu_and_mul(&t).unwrap();
        assert_eq!(got.dims(), &[2, 3]);
        let mut want = vec![0f32; 6];
        crate::reference::silu_and_mul(&v, 3, &mut want);
        assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        // A narrowed (non-contiguous) input is refused, not misread.
        let wide = Tensor::from_vec(
            (0..24).map(|i| i as f32).collect::<Vec<_>>(),
            (2, 12),
            &Device::Cpu,
        )
        .unwrap();
        assert!(super::silu_and_mul(&wide.narrow(1, 0, 6).unwrap()).is_err());
    }

    #[test]
    fn add_rms_norm_returns_the_sum_and_its_norm_and_matches_candle() {
        let dev = Device::Cpu;
        let x = Tensor::from_vec((0..8).map(|i| i as f32 - 3.5).collect(), (2, 4), &dev).unwrap();
        let r =
            Tensor::from_vec((0..8).map(|i| (i * i) as f32 * 0.1).collect(), (2, 4), &dev).unwrap();
        let w = Tensor::from_vec(vec![1.0f32, 0.5, 2.0, -1.0], 4, &dev).unwrap();
        let (sum, normed) = super::add_rms_norm(&x, &r, &w, 1e-5).unwrap();
        let want_sum = (&x + &r).unwrap();
        assert_eq!(
            sum.to_vec2::<f32>().unwrap(),
            want_sum.to_vec2::<f32>().unwrap()
        );
        let want =
            candle_core::Tensor::to_vec2::<f32>(&candle_nn_rms_norm(&want_sum, &w, 1e-5)).unwrap();
        for (a, b) in normed
            .to_vec2::<f32>()
            .unwrap()
            .iter()
            .flatten()
            .zip(want.iter().flatten())
        {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        let alone = super::rms_norm(&want_sum, &w, 1e-5).unwrap();
        assert_eq!(
            alone.to_vec2::<f32>().unwrap(),
            normed.to_vec2::<f32>().unwrap()
        );
    }

    /// RMSNorm written with candle's tensor ops.
    fn candle_nn_rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let ms = x.sqr().unwrap().mean_keepdim(1).unwrap();
        x.broadcast_div(&(ms + eps).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w)
            .unwrap()
    }
}
