//! Where a node computes: `--device auto|cpu|cuda` and `--dtype`, resolved
//! once per process into one candle device per local rank.
//!
//! A build without the `cuda` feature knows only the CPU: `--device cuda`
//! fails with a message saying so, and `auto` is the CPU. A CUDA build links
//! the NVIDIA driver's libraries (see README, "GPUs"); `auto` picks CUDA when
//! a device is visible (`CUDA_VISIBLE_DEVICES` applies) and the CPU otherwise.

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// What `--device` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    Auto,
    Cpu,
    Cuda,
}

impl std::str::FromStr for DeviceRequest {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda),
            other => Err(format!("unknown device `{other}` (use auto, cpu or cuda)")),
        }
    }
}

/// `--dtype`, in vLLM's words: `auto`, `float32`/`float`, `bfloat16`,
/// `float16`/`half`.
pub fn parse_dtype(s: &str) -> std::result::Result<Option<DType>, String> {
    match s.to_ascii_lowercase().as_str() {
        "auto" => Ok(None),
        "float32" | "float" | "f32" => Ok(Some(DType::F32)),
        "bfloat16" | "bf16" => Ok(Some(DType::BF16)),
        "float16" | "half" | "f16" => Ok(Some(DType::F16)),
        other => Err(format!(
            "unknown dtype `{other}` (use auto, float32, bfloat16 or float16)"
        )),
    }
}

/// The dtype's name as nodes exchange it (LoadStage) and logs print it.
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F8E4M3 => "fp8",
        _ => "unsupported",
    }
}

/// The inverse of [`dtype_name`].
pub fn dtype_from_name(s: &str) -> Option<DType> {
    match s {
        "f32" => Some(DType::F32),
        "bf16" => Some(DType::BF16),
        "f16" => Some(DType::F16),
        "fp8" => Some(DType::F8E4M3),
        _ => None,
    }
}

/// The devices this process computes on (one per local rank; ranks share
/// when there are fewer) and the activation dtype.
#[derive(Debug, Clone)]
pub struct Placement {
    devices: Vec<Device>,
    dtype: DType,
}

impl Placement {
    /// The CPU, in f32.
    pub fn cpu() -> Self {
        Self {
            devices: vec![Device::Cpu],
            dtype: DType::F32,
        }
    }

    /// Resolves `--device` and `--dtype` for `ranks` local ranks.
    pub fn resolve(device: DeviceRequest, dtype: Option<DType>, ranks: usize) -> Result<Self> {
        let cuda = match device {
            DeviceRequest::Cpu => None,
            DeviceRequest::Cuda => Some(cuda_devices(ranks)?),
            DeviceRequest::Auto => match cuda_devices(ranks) {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::info!("no CUDA device ({e}); computing on the CPU");
                    None
                }
            },
        };
        match cuda {
            None => match dtype {
                None | Some(DType::F32) => {
                    // Which matmul path this CPU takes (`STRATA_CPU_ISA` caps it).
                    tracing::info!("CPU matmul kernels: {:?}", crate::quant::Isa::chosen());
                    Ok(Self::cpu())
                }
                Some(d) => Err(Error::Config(format!(
                    "the CPU computes in float32; --dtype {} needs --device cuda",
                    dtype_name(d)
                ))),
            },
            Some(devices) => Ok(Self {
                devices,
                // bf16 keeps f32's range; vLLM's `auto` picks it for f32 checkpoints too.
                dtype: dtype.unwrap_or(DType::BF16),
            }),
        }
    }

    /// A placement with a dtype the leader chose (workers).
    pub fn with_dtype(&self, dtype: DType) -> Result<Self> {
        if self.is_cpu() && dtype != DType::F32 {
            return Err(Error::Config(format!(
                "this node computes on the CPU, in f32; the cluster computes in {}",
                dtype_name(dtype)
            )));
        }
        Ok(Self {
            devices: self.devices.clone(),
            dtype,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn is_cpu(&self) -> bool {
        self.devices[0].is_cpu()
    }

    /// The device of local rank `i`.
    pub fn device(&self, i: usize) -> &Device {
        &self.devices[i % self.devices.len()]
    }

    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// `cuda (NVIDIA H200 ×1), bf16` or `cpu, f32`, for logs.
    pub fn describe(&self) -> String {
        if self.is_cpu() {
            return format!("cpu, {}", dtype_name(self.dtype));
        }
        format!(
            "cuda ({} ×{}), {}",
            device_name(&self.devices[0]),
            self.devices.len(),
            dtype_name(self.dtype)
        )
    }

    /// `(free, total)` bytes of device `i`'s memory; `None` on the CPU.
    pub fn memory(&self, i: usize) -> Result<Option<(u64, u64)>> {
        memory(self.device(i))
    }
}

#[cfg(feature = "cuda")]
fn cuda_devices(ranks: usize) -> Result<Vec<Device>> {
    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    let count =
        CudaContext::device_count().map_err(|e| Error::Config(format!("CUDA: {e}")))? as usize;
    if count == 0 {
        return Err(Error::Config(
            "no CUDA device is visible (check CUDA_VISIBLE_DEVICES)".into(),
        ));
    }
    if count < ranks {
        tracing::warn!(
            "{ranks} local ranks share {count} visible CUDA device(s); each rank gets a device of its own when there are enough"
        );
    }
    (0..ranks.clamp(1, count))
        .map(|i| Device::new_cuda(i).map_err(|e| Error::Config(format!("CUDA device {i}: {e}"))))
        .collect()
}

#[cfg(not(feature = "cuda"))]
fn cuda_devices(_ranks: usize) -> Result<Vec<Device>> {
    Err(Error::Config(
        "this strata binary was built without CUDA (build with --features cuda)".into(),
    ))
}

#[cfg(feature = "cuda")]
fn device_name(d: &Device) -> String {
    d.as_cuda_device()
        .ok()
        .and_then(|c| c.cuda_stream().context().name().ok())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(not(feature = "cuda"))]
fn device_name(_d: &Device) -> String {
    "cpu".into()
}

#[cfg(feature = "cuda")]
fn memory(d: &Device) -> Result<Option<(u64, u64)>> {
    match d {
        Device::Cuda(c) => {
            let (free, total) = c
                .cuda_stream()
                .context()
                .mem_get_info()
                .map_err(|e| Error::Config(format!("CUDA memory info: {e}")))?;
            Ok(Some((free as u64, total as u64)))
        }
        _ => Ok(None),
    }
}

#[cfg(not(feature = "cuda"))]
fn memory(_d: &Device) -> Result<Option<(u64, u64)>> {
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_in_vllm_words_and_the_cpu_refuses_half_precision() {
        assert_eq!(
            "CUDA".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Cuda
        );
        assert!("tpu".parse::<DeviceRequest>().is_err());
        assert_eq!(parse_dtype("half").unwrap(), Some(DType::F16));
        assert_eq!(parse_dtype("bfloat16").unwrap(), Some(DType::BF16));
        assert_eq!(parse_dtype("auto").unwrap(), None);
        assert!(parse_dtype("int4").is_err());
        let cpu = Placement::resolve(DeviceRequest::Cpu, None, 2).unwrap();
        assert!(cpu.is_cpu() && cpu.dtype() == DType::F32);
        let err = Placement::resolve(DeviceRequest::Cpu, Some(DType::BF16), 1).unwrap_err();
        assert!(err.to_string().contains("--device cuda"), "{err}");
        assert!(cpu.with_dtype(DType::BF16).is_err());
        for d in [DType::F32, DType::BF16, DType::F16] {
            assert_eq!(dtype_from_name(dtype_name(d)), Some(d));
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_cuda_auto_is_the_cpu_and_cuda_says_why_not() {
        assert!(Placement::resolve(DeviceRequest::Auto, None, 1)
            .unwrap()
            .is_cpu());
        let err = Placement::resolve(DeviceRequest::Cuda, None, 1).unwrap_err();
        assert!(err.to_string().contains("built without CUDA"), "{err}");
    }
}
