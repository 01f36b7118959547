//! Tensor-parallel building blocks. Each owns a matmul (dense or quantized,
//! the layer does not care) and the collective its split needs; with world
//! size 1 the collectives are no-ops and the same code runs on one device.

use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Tensor};
use strata_comm::Communicator;

use crate::error::Result;
use crate::weights::{Shard, Weights};

fn shard(comm: &dyn Communicator, dim: usize) -> Option<Shard> {
    (comm.world_size() > 1).then(|| Shard::new(dim, comm.rank(), comm.world_size()))
}

/// `y = x W^T + b` with W's output rows split across ranks; each rank gets its
/// slice of `y` (no communication).
#[derive(Debug)]
pub struct ColumnParallelLinear {
    weight: QMatMul,
    bias: Option<Tensor>,
}

impl ColumnParallelLinear {
    pub fn load(w: &Weights, prefix: &str, comm: &dyn Communicator, bias: bool) -> Result<Self> {
        let s = shard(comm, 0);
        Ok(Self {
            weight: w.matmul(&format!("{prefix}.weight"), s)?,
            bias: bias
                .then(|| w.tensor(&format!("{prefix}.bias"), s))
                .transpose()?,
        })
    }

    pub fn from_matmul(weight: QMatMul) -> Self {
        Self { weight, bias: None }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// `y = x W^T + b` with W's input columns split across ranks: each rank
/// multiplies its slice of `x`, one all-reduce sums the partial results, and
/// the bias is added once, after the reduce.
#[derive(Debug)]
pub struct RowParallelLinear {
    weight: QMatMul,
    bias: Option<Tensor>,
    comm: Arc<dyn Communicator>,
}

impl RowParallelLinear {
    pub fn load(
        w: &Weights,
        prefix: &str,
        comm: Arc<dyn Communicator>,
        bias: bool,
    ) -> Result<Self> {
        Ok(Self {
            weight: w.matmul(&format!("{prefix}.weight"), shard(&*comm, 1))?,
            bias: bias
                .then(|| w.tensor(&format!("{prefix}.bias"), None))
                .transpose()?,
            comm,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.comm.all_reduce_sum(&self.weight.forward(x)?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Token embedding with the vocabulary split across ranks: a rank looks up
/// the ids it owns, zeroes the rest, and an all-reduce assembles the rows.
#[derive(Debug)]
pub struct VocabEmbedding {
    weight: Tensor,
    vocab_start: u32,
    comm: Arc<dyn Communicator>,
}

impl VocabEmbedding {
    /// `weight` is this rank's `[vocab / world_size, hidden]` slice.
    pub fn new(weight: Tensor, comm: Arc<dyn Communicator>) -> Result<Self> {
        let rows = weight.dim(0)? as u32;
        Ok(Self {
            vocab_start: rows * comm.rank() as u32,
            weight: weight.to_dtype(DType::F32)?,
            comm,
        })
    }

    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        let dev = self.weight.device();
        if self.comm.world_size() == 1 {
            let ids = Tensor::new(ids, dev)?;
            return Ok(self.weight.index_select(&ids, 0)?);
        }
        let rows = self.weight.dim(0)? as u32;
        let local: Vec<u32> = ids
            .iter()
            .map(|&i| i.wrapping_sub(self.vocab_start).min(rows - 1))
            .collect();
        let owned: Vec<f32> = ids
            .iter()
            .map(|&i| {
                f32::from(u8::from(
                    (self.vocab_start..self.vocab_start + rows).contains(&i),
                ))
            })
            .collect();
        let x = self.weight.index_select(&Tensor::new(local, dev)?, 0)?;
        let mask = Tensor::from_vec(owned, (ids.len(), 1), dev)?;
        Ok(self.comm.all_reduce_sum(&x.broadcast_mul(&mask)?)?)
    }
}

#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(w: &Weights, name: &str, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.tensor(name, None)?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}
