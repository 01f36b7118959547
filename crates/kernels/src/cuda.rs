//! What every CUDA launcher needs: the kernel for a dtype, and a tensor's
//! device memory as a typed view starting at its layout's offset.

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaView, DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::{DType, Layout, Result, Storage};

use crate::err;

/// Element types the kernels are instantiated for.
pub(crate) trait KernelType: CudaDType + DeviceRepr {}
impl KernelType for f32 {}
impl KernelType for half::f16 {}
impl KernelType for half::bf16 {}

/// Calls `$f::<T>(args)` with `T` the Rust type of `$dtype`.
macro_rules! by_dtype {
    ($dtype:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::F16 => $f::<half::f16>($($arg),*),
            candle_core::DType::BF16 => $f::<half::bf16>($($arg),*),
            d => Err(crate::err(format!("strata's kernels take f32, f16 or bf16, not {d:?}"))),
        }
    };
}
pub(crate) use by_dtype;

/// `<kernel>_<f32|f16|bf16>` from the module's PTX (loaded once per device).
pub(crate) fn load(
    dev: &CudaDevice,
    kernel: &str,
    dtype: DType,
    module: &str,
    ptx: &str,
) -> Result<CudaFunction> {
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        d => return Err(err(format!("{kernel} does not take {d:?}"))),
    };
    Ok(dev
        .get_or_load_custom_func(&format!("{kernel}_{suffix}"), module, ptx)?
        .into_cuda_function())
}

/// The CUDA storage behind a tensor the op holds (index tensors, tables).
pub(crate) fn cuda<'a>(s: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => Err(err(format!("{what} must be on the CUDA device"))),
    }
}

/// The elements of `s` from `l`'s start offset on.
pub(crate) fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}

/// One thread block of `threads` per token, the grid most kernels here use.
pub(crate) fn per_token(tokens: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (tokens as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}
