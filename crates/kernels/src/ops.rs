//! The kernels as candle ops: one call works on CPU tensors (through the
//! reference) and on CUDA tensors (through the kernel), so model code does
//! not branch on the device.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use crate::reference;

/// `silu(gate) * up` over a `[tokens, 2 * inter]` tensor holding `[gate | up]`.
pub fn silu_and_mul(gate_up: &Tensor) -> Result<Tensor> {
    gate_up.apply_op1_no_bwd(&SiluAndMul)
}

struct SiluAndMul;

fn dims2(shape: &Shape) -> Result<(usize, usize)> {
    match shape.dims() {
        [t, w] if w % 2 == 0 => Ok((*t, w / 2)),
        d => Err(candle_core::Error::Msg(format!(
            "silu_and_mul needs [tokens, 2 * inter], got {d:?}"
        ))),
    }
}

impl CustomOp1 for SiluAndMul {
    fn name(&self) -> &'static str {
        "silu_and_mul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (tokens, inter) = dims2(layout.shape())?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(candle_core::Error::Msg(
                "silu_and_mul needs a contiguous input".into(),
            ));
        };
        let CpuStorage::F32(data) = storage else {
            return Err(candle_core::Error::Msg(
                "silu_and_mul on CPU takes f32".into(),
            ));
        };
        let mut out = vec![0f32; tokens * inter];
        reference::silu_and_mul(&data[start..end], inter, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((tokens, inter))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
        use candle_core::DType;

        fn run<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
            storage: &CudaStorage,
            layout: &Layout,
            suffix: &str,
        ) -> Result<CudaStorage> {
            let (tokens, inter) = dims2(layout.shape())?;
            let Some((start, end)) = layout.contiguous_offsets() else {
                return Err(candle_core::Error::Msg(
                    "silu_and_mul needs a contiguous input".into(),
                ));
            };
            let dev = storage.device().clone();
            let input = storage.as_cuda_slice::<T>()?.slice(start..end);
            // SAFETY: every element is written by the kernel before it is read.
            let out = unsafe { dev.alloc::<T>(tokens * inter) }?;
            let func = dev.get_or_load_custom_func(
                &format!("silu_and_mul_{suffix}"),
                "activation",
                crate::ptx::ACTIVATION,
            )?;
            let inter_arg = inter as i32;
            let mut b = func.builder();
            b.arg(&input);
            b.arg(&out);
            b.arg(&inter_arg);
            let cfg = LaunchConfig {
                grid_dim: (tokens as u32, 1, 1),
                block_dim: (inter.min(1024) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match the kernel's signature in activation.cu.
            unsafe { b.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }

        let shape = Shape::from(dims2(layout.shape())?);
        let out = match storage.dtype() {
            DType::F32 => run::<f32>(storage, layout, "f32")?,
            DType::F16 => run::<half::f16>(storage, layout, "f16")?,
            DType::BF16 => run::<half::bf16>(storage, layout, "bf16")?,
            d => {
                return Err(candle_core::Error::Msg(format!(
                    "silu_and_mul does not take {d:?}"
                )))
            }
        };
        Ok((out, shape))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    #[test]
    fn the_op_on_cpu_is_the_reference() {
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
}
