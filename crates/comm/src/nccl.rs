//! Tensor-parallel ranks on GPUs, exchanging tensors with NCCL (cudarc's
//! bindings), on the same CUDA stream as candle's kernels so collectives
//! are ordered with the compute around them.
//!
//! Ranks in one process form a group with `ncclCommInitAll`; ranks in
//! several processes join with the unique id the leader made and handed out
//! in LoadStage (never through a file). NCCL picks its own summation order
//! (ring or tree), so GPU ranks agree with each other, not bit for bit with
//! the CPU backends' canonical order.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};

use crate::Communicator;

fn err(msg: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(msg.into())
}

/// cudarc's communicator holds a raw NCCL handle, which NCCL allows to be
/// used from any thread as long as calls do not overlap; the mutex in
/// [`NcclComm`] serializes them.
struct Handle(Comm);
// SAFETY: see above; every use goes through NcclComm's mutex.
unsafe impl Send for Handle {}

/// One rank of an NCCL communicator.
pub struct NcclComm {
    comm: Arc<Mutex<Handle>>,
    rank: usize,
    world_size: usize,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclComm(rank {} of {})", self.rank, self.world_size)
    }
}

/// A fresh NCCL unique id (128 bytes). The process that makes it hosts
/// NCCL's bootstrap root, so it must live until every rank has joined.
pub fn nccl_unique_id() -> Result<Vec<u8>> {
    let id = Id::new().map_err(|e| err(format!("ncclGetUniqueId: {e:?}")))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

fn stream_of(
    device: &Device,
) -> Result<Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>> {
    Ok(device.as_cuda_device()?.cuda_stream())
}

impl NcclComm {
    /// One communicator per device, all in this process (distinct GPUs).
    pub fn group(devices: &[Device]) -> Result<Vec<NcclComm>> {
        let streams = devices.iter().map(stream_of).collect::<Result<Vec<_>>>()?;
        let n = streams.len();
        let comms =
            Comm::from_devices(streams).map_err(|e| err(format!("ncclCommInitAll: {e:?}")))?;
        Ok(comms
            .into_iter()
            .enumerate()
            .map(|(rank, c)| NcclComm {
                comm: Arc::new(Mutex::new(Handle(c))),
                rank,
                world_size: n,
            })
            .collect())
    }

    /// Rank `rank` of `world_size` ranks spread over processes, meeting
    /// through `id` (from [`nccl_unique_id`]). Blocks until all have joined.
    pub fn join(device: &Device, rank: usize, world_size: usize, id: &[u8]) -> Result<NcclComm> {
        let raw: [std::ffi::c_char; 128] = id
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| err(format!("an NCCL unique id is 128 bytes, got {}", id.len())))?;
        let c = Comm::from_rank(stream_of(device)?, rank, world_size, Id::uninit(raw)).map_err(
            |e| {
                err(format!(
                    "ncclCommInitRank (rank {rank} of {world_size}): {e:?}"
                ))
            },
        )?;
        Ok(NcclComm {
            comm: Arc::new(Mutex::new(Handle(c))),
            rank,
            world_size,
        })
    }
}

enum Collective {
    AllReduce,
    AllGather,
    Broadcast(usize),
}

struct Op<'a> {
    comm: &'a NcclComm,
    what: Collective,
}

impl CustomOp1 for Op<'_> {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Err(err("NCCL collectives take CUDA tensors"))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr + NcclType>(
            op: &Op,
            s: &CudaStorage,
            l: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let Some((start, end)) = l.contiguous_offsets() else {
                return Err(err("NCCL collectives need contiguous tensors"));
            };
            let dev = s.device().clone();
            let input = s.as_cuda_slice::<T>()?.slice(start..end);
            let n = end - start;
            let ws = op.comm.world_size;
            let comm = op.comm.comm.lock().expect("poisoned");
            let (out, shape) = match op.what {
                Collective::AllReduce => {
                    // SAFETY: NCCL writes every element.
                    let mut out = unsafe { dev.alloc::<T>(n) }?;
                    comm.0
                        .all_reduce(&input, &mut out, &ReduceOp::Sum)
                        .map_err(|e| err(format!("ncclAllReduce: {e:?}")))?;
                    (out, l.shape().clone())
                }
                Collective::AllGather => {
                    // SAFETY: NCCL writes every element.
                    let mut out = unsafe { dev.alloc::<T>(n * ws) }?;
                    comm.0
                        .all_gather(&input, &mut out)
                        .map_err(|e| err(format!("ncclAllGather: {e:?}")))?;
                    let mut dims = vec![ws];
                    dims.extend_from_slice(l.dims());
                    (out, Shape::from(dims))
                }
                Collective::Broadcast(root) => {
                    // SAFETY: NCCL writes every element.
                    let mut out = unsafe { dev.alloc::<T>(n) }?;
                    comm.0
                        .broadcast(Some(&input), &mut out, root as i32)
                        .map_err(|e| err(format!("ncclBroadcast: {e:?}")))?;
                    (out, l.shape().clone())
                }
            };
            Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
        }
        match s.dtype() {
            DType::F32 => run::<f32>(self, s, l),
            DType::F16 => run::<half::f16>(self, s, l),
            DType::BF16 => run::<half::bf16>(self, s, l),
            d => Err(err(format!(
                "NCCL collectives here take f32, f16 or bf16, not {d:?}"
            ))),
        }
    }
}

impl NcclComm {
    fn apply(&self, t: &Tensor, what: Collective) -> Result<Tensor> {
        t.contiguous()?.apply_op1_no_bwd(&Op { comm: self, what })
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.apply(t, Collective::AllReduce)
    }
    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        // NCCL stacks the ranks' tensors along a new first dimension.
        let stacked = self.apply(t, Collective::AllGather)?;
        let parts = (0..self.world_size)
            .map(|r| stacked.get(r))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, dim)
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        self.apply(t, Collective::Broadcast(root))
    }
}
