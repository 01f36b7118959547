//! Collectives between the tensor-parallel ranks of one stage, and the data
//! plane that carries activations from one pipeline stage to the next.
//!
//! Model code calls a [`Communicator`] and never knows the backend. World size
//! 1 ([`SingleRank`]) makes every collective the identity, so one code path
//! serves one device and many.

mod hello;
#[cfg(feature = "nccl")]
mod nccl;
mod tcp;
mod thread;
mod transport;

use std::fmt::Debug;

use candle_core::{Result, Tensor};

pub use hello::Wait;
#[cfg(feature = "nccl")]
pub use nccl::{nccl_unique_id, NcclComm};
pub use tcp::TcpComm;
pub use thread::ThreadComm;
pub use transport::TcpTransport;

/// Columns of chunk `c` of `n`, for a tensor whose last dimension is `cols`.
/// All-reduce sums chunk `c` around the ring starting at rank `c`,
/// `((x_c + x_c+1) + x_c+2) + ...`: the TCP ring does so by construction and
/// the thread backend copies the order, so ranks as threads and ranks as
/// processes give identical bits. Chunks are column ranges, not slices of the
/// flattened tensor, so a token's sum does not depend on how many other
/// tokens share the batch.
pub(crate) fn ring_chunk(cols: usize, n: usize, c: usize) -> std::ops::Range<usize> {
    c * cols / n..(c + 1) * cols / n
}

/// The last dimension of `t` (1 for a scalar): all-reduce chunks split it.
pub(crate) fn last_dim(t: &Tensor) -> usize {
    t.dims().last().copied().unwrap_or(1).max(1)
}

pub trait Communicator: Debug + Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum of `t` over all ranks; every rank gets the result.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Concatenation of every rank's `t` (all of one shape) along `dim`, in rank order.
    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor>;
    /// `root`'s `t` on every rank (the others pass a tensor of the same
    /// shape, whose values are ignored).
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;
}

/// World size 1: nothing to exchange.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn all_gather(&self, t: &Tensor, _dim: usize) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn broadcast(&self, t: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(t.clone())
    }
}
