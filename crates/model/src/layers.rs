//! Tensor-parallel building blocks. Each owns a matmul (dense or quantized,
//! the layer does not care) and the collective its split needs; with world
//! size 1 the collectives are no-ops and the same code runs on one device.

use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Tensor};

use strata_comm::Communicator;

use crate::error::Result;
use crate::fp8::Fp8Matrix;
use crate::half_matrix::HalfMatrix;
use crate::quant::{Q4_1Matrix, Q8_0Matrix};
use crate::weights::{Shard, Weights};

/// A weight matrix `[out, in]` and the kernel that multiplies by it: candle's
/// (dense in the activations' dtype, or a GGUF type it has a fast kernel
/// for) or strata's own (16-bit dense on the CPU, Q4_1, Q8_0, FP8).
#[derive(Debug, Clone)]
pub enum Matmul {
    Candle(QMatMul),
    /// Block-scaled FP8 (DeepSeek's checkpoints), dequantized inside the matmul.
    Fp8(Arc<Fp8Matrix>),
    /// bf16 or f16 kept 16-bit on the CPU, widened inside the matmul.
    Half(Arc<HalfMatrix>),
    Q4_1(Arc<Q4_1Matrix>),
    Q8_0(Arc<Q8_0Matrix>),
}

impl Matmul {
    /// `x [tokens, in] → [tokens, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Matmul::Candle(m) => Ok(m.forward(x)?),
            Matmul::Q4_1(m) => m.forward(x),
            Matmul::Q8_0(m) => m.forward(x),
            Matmul::Fp8(m) => m.forward(x),
            Matmul::Half(m) => m.forward(x),
        }
    }

    /// The matrix as a dense tensor (embedding lookups): quantized ones in
    /// f32 on the CPU, dense ones as they are.
    pub fn dense(&self) -> Result<Tensor> {
        Ok(match self {
            Matmul::Candle(QMatMul::QTensor(q)) => q.dequantize(&candle_core::Device::Cpu)?,
            // Dense weights are already in the activation dtype.
            Matmul::Candle(QMatMul::Tensor(t)) => t.clone(),
            Matmul::Candle(QMatMul::TensorF16(t)) => t.to_dtype(DType::F32)?,
            Matmul::Q4_1(q) => q.dequantize()?,
            Matmul::Q8_0(q) => q.dequantize()?,
            Matmul::Fp8(q) => q.dequantize()?,
            Matmul::Half(h) => h.dequantize()?,
        })
    }

    /// One matrix from several with the same input size, when their storage
    /// allows it (so q/k/v or gate/up run as one matmul).
    fn stack(parts: &[Matmul]) -> Result<Option<Matmul>> {
        if let Some(q) = parts
            .iter()
            .map(|p| match p {
                Matmul::Q4_1(q) => Some(q.as_ref()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
        {
            return Ok(Some(Matmul::Q4_1(Arc::new(Q4_1Matrix::concat_rows(&q)))));
        }
        if let Some(h) = parts
            .iter()
            .map(|p| match p {
                Matmul::Half(h) => Some(h.as_ref()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .filter(|h| h.iter().all(|m| m.kind() == h[0].kind()))
        {
            return Ok(Some(Matmul::Half(Arc::new(HalfMatrix::concat_rows(&h)))));
        }
        if let Some(t) = parts
            .iter()
            .map(|p| match p {
                Matmul::Candle(QMatMul::Tensor(t)) => Some(t.clone()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
        {
            return Ok(Some(Matmul::Candle(QMatMul::Tensor(Tensor::cat(&t, 0)?))));
        }
        Ok(None)
    }
}

/// The activations of a CPU matmul by a `[_, cols]` weight (`what` names
/// it in the error): their token count and their values in f32, row-major.
pub(crate) fn matmul_input(x: &Tensor, cols: usize, what: &str) -> Result<(usize, Vec<f32>)> {
    let (tokens, k) = x.dims2()?;
    if k != cols {
        return Err(crate::error::Error::Config(format!(
            "{what} matmul: input has {k} features, weight expects {cols}"
        )));
    }
    let x = x.to_dtype(DType::F32)?.contiguous()?.flatten_all()?;
    Ok((tokens, x.to_vec1::<f32>()?))
}

fn shard(comm: &dyn Communicator, dim: usize) -> Option<Shard> {
    (comm.world_size() > 1).then(|| Shard::new(dim, comm.rank(), comm.world_size()))
}

/// `y = x W^T + b` with W's output rows split across ranks; each rank gets its
/// slice of `y` (no communication). Several projections of the same input
/// (q/k/v, gate/up) can be loaded as one, each sharded on its own, and run as
/// a single matmul whose output is split back.
#[derive(Debug)]
pub struct ColumnParallelLinear {
    /// One stacked matrix, or the parts when their storage cannot stack.
    weights: Vec<Matmul>,
    bias: Option<Tensor>,
    /// Output width of each projection on this rank.
    splits: Vec<usize>,
}

impl ColumnParallelLinear {
    pub fn load(w: &Weights, prefix: &str, comm: &dyn Communicator, bias: bool) -> Result<Self> {
        Self::load_merged(w, &[prefix], comm, bias)
    }

    pub fn load_merged(
        w: &Weights,
        prefixes: &[&str],
        comm: &dyn Communicator,
        bias: bool,
    ) -> Result<Self> {
        let s = shard(comm, 0);
        let mut parts = Vec::with_capacity(prefixes.len());
        let mut splits = Vec::with_capacity(prefixes.len());
        let mut biases = Vec::new();
        for p in prefixes {
            let name = format!("{p}.weight");
            splits.push(w.shape(&name)?[0] / s.map_or(1, |s| s.world_size));
            parts.push(w.matmul(&name, s)?);
            if bias {
                biases.push(w.tensor(&format!("{p}.bias"), s)?);
            }
        }
        let weights = match Matmul::stack(&parts)? {
            Some(m) if parts.len() > 1 => vec![m],
            _ => parts,
        };
        let bias = if bias {
            Some(Tensor::cat(&biases, 0)?)
        } else {
            None
        };
        Ok(Self {
            weights,
            bias,
            splits,
        })
    }

    /// The whole output `[tokens, sum of the projections' widths]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = if self.weights.len() == 1 {
            self.weights[0].forward(x)?
        } else {
            let ys = self
                .weights
                .iter()
                .map(|m| m.forward(x))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&ys, 1)?
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// The output split back into the merged projections.
    pub fn forward_split(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let y = self.forward(x)?;
        let mut at = 0;
        self.splits
            .iter()
            .map(|&n| {
                let part = y.narrow(1, at, n)?;
                at += n;
                Ok(part)
            })
            .collect()
    }
}

/// `y = x W^T + b` with W's input columns split across ranks: each rank
/// multiplies its slice of `x`, one all-reduce sums the partial results, and
/// the bias is added once, after the reduce.
#[derive(Debug)]
pub struct RowParallelLinear {
    weight: Matmul,
    bias: Option<Tensor>,
    comm: Arc<dyn Communicator>,
}

impl RowParallelLinear {
    /// This rank's partial product, before the all-reduce and the bias: for
    /// a caller that sums several partial results and reduces them once.
    pub fn forward_partial(&self, x: &Tensor) -> Result<Tensor> {
        debug_assert!(self.bias.is_none(), "a partial product leaves the bias out");
        self.weight.forward(x)
    }

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
/// Ranks own `ceil(vocab / world_size)` ids each (the last may own fewer).
#[derive(Debug)]
pub struct VocabEmbedding {
    weight: Tensor,
    vocab_start: u32,
    comm: Arc<dyn Communicator>,
}

impl VocabEmbedding {
    /// `weight` is this rank's slice of the `[vocab, hidden]` table.
    pub fn new(weight: Tensor, vocab_size: usize, comm: Arc<dyn Communicator>) -> Result<Self> {
        let chunk = vocab_size.div_ceil(comm.world_size());
        Ok(Self {
            vocab_start: (chunk * comm.rank()) as u32,
            weight,
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
        let owned = |i: u32| (self.vocab_start..self.vocab_start + rows).contains(&i);
        let local: Vec<u32> = ids
            .iter()
            .map(|&i| if owned(i) { i - self.vocab_start } else { 0 })
            .collect();
        let mask: Vec<f32> = ids.iter().map(|&i| f32::from(u8::from(owned(i)))).collect();
        let x = self.weight.index_select(&Tensor::new(local, dev)?, 0)?;
        let mask = Tensor::from_vec(mask, (ids.len(), 1), dev)?.to_dtype(x.dtype())?;
        Ok(self.comm.all_reduce_sum(&x.broadcast_mul(&mask)?)?)
    }
}

/// The output projection with the vocabulary split across ranks like
/// [`VocabEmbedding`]: each rank's logits are padded to the common width, all
/// gathered, and the padding cut off, so every rank holds the full row.
#[derive(Debug)]
pub struct ParallelLmHead {
    weight: Matmul,
    vocab_size: usize,
    comm: Arc<dyn Communicator>,
}

impl ParallelLmHead {
    pub fn new(weight: Matmul, vocab_size: usize, comm: Arc<dyn Communicator>) -> Self {
        Self {
            weight,
            vocab_size,
            comm,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let logits = self.weight.forward(x)?;
        let ws = self.comm.world_size();
        if ws == 1 {
            return Ok(logits);
        }
        let chunk = self.vocab_size.div_ceil(ws);
        let have = logits.dim(1)?;
        let logits = if have < chunk {
            logits.pad_with_zeros(1, 0, chunk - have)?
        } else {
            logits
        };
        Ok(self
            .comm
            .all_gather(&logits, 1)?
            .narrow(1, 0, self.vocab_size)?)
    }
}

/// RMSNorm through strata's kernel, alone or fused with the residual add
/// before it.
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
        Ok(strata_kernels::rms_norm(x, &self.weight, self.eps)?)
    }

    /// `(residual + x, norm(residual + x))`.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok(strata_kernels::add_rms_norm(
            x,
            residual,
            &self.weight,
            self.eps,
        )?)
    }
}
