//! The feed-forward blocks: a dense gated MLP, and a sparse mixture of
//! experts whose experts are split across the tensor-parallel ranks of a
//! stage (expert parallelism inside the stage).
//!
//! Why experts and not each expert's intermediate dimension: a rank then
//! reads, holds and multiplies whole experts, and only for the tokens routed
//! to them, so its share of the weights and of the work is `1 / tp` with
//! matmuls as large as the routing allows; splitting every expert's
//! intermediate dimension instead would make each rank run every active
//! expert on a slice `1 / tp` as wide. Both need one all-reduce per layer.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use strata_comm::{Communicator, SingleRank};

use crate::error::Result;
use crate::layers::{ColumnParallelLinear, Matmul, RowParallelLinear};
use crate::weights::Weights;

/// `down(silu(gate(x)) * up(x))`, its intermediate dimension split across
/// the ranks of `comm`.
#[derive(Debug)]
pub(crate) struct DenseMlp {
    /// gate and up projections, run as one matmul.
    gate_up_proj: ColumnParallelLinear,
    down_proj: RowParallelLinear,
}

impl DenseMlp {
    /// `prefix` holds `gate_proj`, `up_proj` and `down_proj`.
    pub fn load(w: &Weights, prefix: &str, comm: &Arc<dyn Communicator>) -> Result<Self> {
        Ok(Self {
            gate_up_proj: ColumnParallelLinear::load_merged(
                w,
                &[&format!("{prefix}.gate_proj"), &format!("{prefix}.up_proj")],
                &**comm,
                false,
            )?,
            down_proj: RowParallelLinear::load(
                w,
                &format!("{prefix}.down_proj"),
                comm.clone(),
                false,
            )?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let m = strata_kernels::silu_and_mul(&self.gate_up_proj.forward(x)?)?;
        self.down_proj.forward(&m)
    }

    /// This rank's share of the output, before the all-reduce.
    fn forward_partial(&self, x: &Tensor) -> Result<Tensor> {
        let m = strata_kernels::silu_and_mul(&self.gate_up_proj.forward(x)?)?;
        self.down_proj.forward_partial(&m)
    }
}

/// How a token's router scores pick its experts and weigh them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Routing {
    /// Qwen-MoE, Mixtral: softmax over all experts, the top k, optionally
    /// renormalised to sum to 1.
    Softmax { top_k: usize, norm_topk_prob: bool },
    /// DeepSeek-V3: sigmoid scores; experts chosen by score plus a
    /// correction bias, within the `topk_group` of `n_group` groups whose
    /// two best experts score highest; weighted by the scores without the
    /// bias, optionally renormalised, times `routed_scaling_factor`.
    Grouped {
        top_k: usize,
        n_group: usize,
        topk_group: usize,
        norm_topk_prob: bool,
        routed_scaling_factor: f32,
    },
}

/// One expert: a gated MLP whole on one rank.
#[derive(Debug)]
struct Expert {
    gate_up: ColumnParallelLinear,
    down: Matmul,
}

/// Routed experts, this rank holding `experts[first..first + len]`, and
/// the shared experts every token passes through.
#[derive(Debug)]
pub(crate) struct SparseMoe {
    /// `[num_experts, hidden]` in f32, on every rank: routing decides which
    /// weights a token meets, so it is computed at full precision.
    router: Tensor,
    /// DeepSeek's `e_score_correction_bias`, for choosing only.
    correction_bias: Option<Vec<f32>>,
    num_experts: usize,
    routing: Routing,
    first: usize,
    experts: Vec<Expert>,
    /// Split by their intermediate dimension like a dense MLP; summed
    /// unweighted with the routed experts.
    shared: Option<DenseMlp>,
    comm: Arc<dyn Communicator>,
}

/// The experts rank `rank` of `ranks` holds: a contiguous range.
pub(crate) fn expert_range(num_experts: usize, rank: usize, ranks: usize) -> (usize, usize) {
    let per = num_experts / ranks;
    (rank * per, per)
}

impl SparseMoe {
    /// `prefix` holds `gate.weight` (the router, and DeepSeek's
    /// `gate.e_score_correction_bias`), `experts.{e}.{gate,up,down}_proj`
    /// as Hugging Face saves them, and `shared_experts` when `shared`.
    pub fn load(
        w: &Weights,
        prefix: &str,
        num_experts: usize,
        routing: Routing,
        shared: bool,
        comm: &Arc<dyn Communicator>,
    ) -> Result<Self> {
        let (first, len) = expert_range(num_experts, comm.rank(), comm.world_size());
        let whole: &dyn Communicator = &SingleRank;
        let experts = (first..first + len)
            .map(|e| {
                let p = format!("{prefix}.experts.{e}");
                Ok(Expert {
                    gate_up: ColumnParallelLinear::load_merged(
                        w,
                        &[&format!("{p}.gate_proj"), &format!("{p}.up_proj")],
                        whole,
                        false,
                    )?,
                    down: w.matmul(&format!("{p}.down_proj.weight"), None)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let correction_bias = match routing {
            Routing::Grouped { .. } => Some(
                w.tensor(&format!("{prefix}.gate.e_score_correction_bias"), None)?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?,
            ),
            Routing::Softmax { .. } => None,
        };
        Ok(Self {
            router: w
                .tensor(&format!("{prefix}.gate.weight"), None)?
                .to_dtype(DType::F32)?,
            correction_bias,
            num_experts,
            routing,
            first,
            experts,
            shared: shared
                .then(|| DenseMlp::load(w, &format!("{prefix}.shared_experts"), comm))
                .transpose()?,
            comm: comm.clone(),
        })
    }

    /// For each token, its experts and their weights.
    fn route(&self, x: &Tensor) -> Result<Vec<Vec<(usize, f32)>>> {
        let scores = x
            .to_dtype(DType::F32)?
            .matmul(&self.router.t()?)?
            .to_device(&candle_core::Device::Cpu)?
            .to_vec2::<f32>()?;
        Ok(scores
            .iter()
            .map(|row| match self.routing {
                Routing::Grouped {
                    top_k,
                    n_group,
                    topk_group,
                    norm_topk_prob,
                    routed_scaling_factor,
                } => {
                    let bias = self.correction_bias.as_deref().unwrap_or(&[]);
                    let sig: Vec<f32> = row.iter().map(|s| 1.0 / (1.0 + (-s).exp())).collect();
                    let choice: Vec<f32> = sig
                        .iter()
                        .enumerate()
                        .map(|(e, s)| s + bias.get(e).copied().unwrap_or(0.0))
                        .collect();
                    let per = self.num_experts / n_group;
                    let group_scores: Vec<f32> = choice
                        .chunks(per)
                        .map(|g| top_k_of(g, 2).iter().map(|&(_, s)| s).sum())
                        .collect();
                    let groups = top_k_of(&group_scores, topk_group);
                    let masked: Vec<f32> = choice
                        .iter()
                        .enumerate()
                        .map(|(e, &s)| {
                            if groups.iter().any(|&(g, _)| g == e / per) {
                                s
                            } else {
                                f32::NEG_INFINITY
                            }
                        })
                        .collect();
                    let mut top: Vec<(usize, f32)> = top_k_of(&masked, top_k)
                        .into_iter()
                        .map(|(e, _)| (e, sig[e]))
                        .collect();
                    let norm = if norm_topk_prob {
                        top.iter().map(|&(_, p)| p).sum::<f32>() + 1e-20
                    } else {
                        1.0
                    };
                    for (_, p) in top.iter_mut() {
                        *p = *p / norm * routed_scaling_factor;
                    }
                    top
                }
                Routing::Softmax {
                    top_k,
                    norm_topk_prob,
                } => {
                    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let exp: Vec<f32> = row.iter().map(|s| (s - max).exp()).collect();
                    let sum: f32 = exp.iter().sum();
                    let mut top = top_k_of(&exp, top_k);
                    let norm = if norm_topk_prob {
                        top.iter().map(|&(_, p)| p).sum::<f32>()
                    } else {
                        sum
                    };
                    for (_, p) in top.iter_mut() {
                        *p /= norm;
                    }
                    top
                }
            })
            .collect())
    }

    /// The shared experts' partial products join the routed ones in one
    /// all-reduce.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let routes = self.route(x)?;
        let mut out = match &self.shared {
            Some(s) => s.forward_partial(x)?.to_dtype(DType::F32)?,
            None => Tensor::zeros(x.dims2()?, DType::F32, x.device())?,
        };
        for (local, expert) in self.experts.iter().enumerate() {
            let e = self.first + local;
            let (mut rows, mut weights) = (Vec::new(), Vec::new());
            for (t, r) in routes.iter().enumerate() {
                if let Some(&(_, p)) = r.iter().find(|(i, _)| *i == e) {
                    rows.push(t as u32);
                    weights.push(p);
                }
            }
            if rows.is_empty() {
                continue;
            }
            let n = rows.len();
            let rows = Tensor::from_vec(rows, n, x.device())?;
            let h = x.index_select(&rows, 0)?;
            let m = strata_kernels::silu_and_mul(&expert.gate_up.forward(&h)?)?;
            let y = expert.down.forward(&m)?.to_dtype(DType::F32)?;
            let y = y.broadcast_mul(&Tensor::from_vec(weights, (n, 1), x.device())?)?;
            out = out.index_add(&rows, &y, 0)?;
        }
        Ok(self.comm.all_reduce_sum(&out.to_dtype(x.dtype())?)?)
    }
}

/// The `k` largest of `scores` with their indices, largest first (ties to
/// the lower index, as `torch.topk` on the CPU).
fn top_k_of(scores: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx.into_iter().map(|i| (i, scores[i])).collect()
}

/// A layer's feed-forward block.
#[derive(Debug)]
pub(crate) enum Mlp {
    Dense(DenseMlp),
    Sparse(SparseMoe),
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Mlp::Dense(m) => m.forward(x),
            Mlp::Sparse(m) => m.forward(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_picks_the_largest_in_order() {
        let s = [0.1, 0.7, 0.3, 0.7, 0.05];
        assert_eq!(top_k_of(&s, 3), vec![(1, 0.7), (3, 0.7), (2, 0.3)]);
    }

    #[test]
    fn experts_split_into_contiguous_equal_ranges() {
        assert_eq!(expert_range(8, 0, 2), (0, 4));
        assert_eq!(expert_range(8, 1, 2), (4, 4));
        assert_eq!(expert_range(8, 3, 4), (6, 2));
    }
}
