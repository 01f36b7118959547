//! Which node runs which layers on which tensor-parallel ranks.
//!
//! The model is cut into `pp` stages of `tp` ranks each: `pp × tp` ranks,
//! numbered stage-major, spread evenly over `nnodes` processes. A node holds
//! either whole stages (its ranks are threads sharing memory) or exactly one
//! rank of a stage whose ranks span nodes (joined by a TCP ring).

use crate::LayerRange;

/// A contiguous layer range run by some tensor-parallel ranks of one stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageSlot {
    pub stage: usize,
    pub layers: LayerRange,
    pub tp_size: usize,
    /// The ranks of the stage this node runs: `tp_ranks.start..tp_ranks.end`.
    pub tp_rank_begin: usize,
    pub tp_rank_count: usize,
}

impl StageSlot {
    /// True when the stage's ranks span several nodes.
    pub fn spans_nodes(&self) -> bool {
        self.tp_rank_count < self.tp_size
    }
}

/// One node's share of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    /// The stages this node runs, in pipeline order.
    pub slots: Vec<StageSlot>,
    /// The node this one sends its activations to (`None` for the last stage).
    pub next: Option<usize>,
    /// Whether a previous node sends activations to this one.
    pub has_previous: bool,
    /// When the stage spans nodes: the nodes of its ring, in rank order.
    pub ring: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterLayout {
    pub pp: usize,
    pub tp: usize,
    pub nodes: Vec<NodePlan>,
}

impl ClusterLayout {
    /// `head_cost` is the last stage's extra work in layers
    /// ([`ModelConfig::head_cost_in_layers`](crate::ModelConfig::head_cost_in_layers)):
    /// it gets fewer layers to make up for it.
    pub fn new(
        nnodes: usize,
        pp: usize,
        tp: usize,
        num_layers: usize,
        head_cost: f64,
    ) -> Result<Self, String> {
        if nnodes == 0 || pp == 0 || tp == 0 {
            return Err(
                "--nnodes, --pipeline-parallel-size and --tensor-parallel-size must be at least 1"
                    .into(),
            );
        }
        if pp > num_layers {
            return Err(format!(
                "--pipeline-parallel-size {pp} must be between 1 and the model's {num_layers} layers"
            ));
        }
        let ranks = pp * tp;
        if !ranks.is_multiple_of(nnodes) {
            return Err(format!(
                "{pp} stages × {tp} tensor-parallel ranks = {ranks} ranks cannot be spread evenly over {nnodes} nodes"
            ));
        }
        let per_node = ranks / nnodes;
        let ranges = LayerRange::split(num_layers, pp, head_cost);
        let nodes = if per_node.is_multiple_of(tp) {
            // Whole stages per node; the next stage lives on the next node.
            let stages = per_node / tp;
            (0..nnodes)
                .map(|n| NodePlan {
                    slots: (n * stages..(n + 1) * stages)
                        .map(|s| StageSlot {
                            stage: s,
                            layers: ranges[s],
                            tp_size: tp,
                            tp_rank_begin: 0,
                            tp_rank_count: tp,
                        })
                        .collect(),
                    next: (n + 1 < nnodes).then_some(n + 1),
                    has_previous: n > 0,
                    ring: Vec::new(),
                })
                .collect()
        } else if per_node == 1 {
            // One rank per node; rank t of stage s feeds rank t of stage s+1.
            (0..nnodes)
                .map(|n| {
                    let (s, t) = (n / tp, n % tp);
                    NodePlan {
                        slots: vec![StageSlot {
                            stage: s,
                            layers: ranges[s],
                            tp_size: tp,
                            tp_rank_begin: t,
                            tp_rank_count: 1,
                        }],
                        next: (s + 1 < pp).then_some((s + 1) * tp + t),
                        has_previous: s > 0,
                        ring: (s * tp..(s + 1) * tp).collect(),
                    }
                })
                .collect()
        } else {
            return Err(format!(
                "{ranks} ranks over {nnodes} nodes puts {per_node} on each, which is neither whole \
                 stages of {tp} ranks nor one rank per node; choose sizes where nodes hold whole \
                 stages or single ranks"
            ));
        };
        Ok(Self { pp, tp, nodes })
    }

    /// Steps that can run at once: one per group of nodes along the
    /// pipeline (each node when nodes hold whole stages, each stage when its
    /// ranks span nodes).
    pub fn pipeline_depth(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.slots[0].tp_rank_begin == 0)
            .count()
    }

    /// The node whose result speaks for a step: rank 0 of the last stage.
    pub fn result_node(&self) -> usize {
        self.nodes
            .iter()
            .position(|n| {
                n.slots
                    .iter()
                    .any(|s| s.stage == self.pp - 1 && s.tp_rank_begin == 0)
            })
            .expect("some node runs the last stage's rank 0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_node_runs_every_stage() {
        let l = ClusterLayout::new(1, 3, 2, 30, 0.0).unwrap();
        assert_eq!(l.nodes.len(), 1);
        let n = &l.nodes[0];
        assert_eq!(n.slots.len(), 3);
        assert_eq!(n.slots[2].layers, LayerRange::new(20, 30));
        assert!(n.slots.iter().all(|s| !s.spans_nodes()));
        assert_eq!((n.next, n.has_previous), (None, false));
        assert_eq!(l.result_node(), 0);
    }

    #[test]
    fn whole_stages_chain_node_to_node() {
        let l = ClusterLayout::new(2, 2, 2, 30, 0.0).unwrap();
        assert_eq!(l.nodes[0].slots[0].layers, LayerRange::new(0, 15));
        assert_eq!(l.nodes[0].next, Some(1));
        assert!(l.nodes[1].has_previous && l.nodes[1].next.is_none());
        assert_eq!(l.nodes[1].slots[0].tp_rank_count, 2);
        assert_eq!(l.result_node(), 1);
        assert_eq!(l.pipeline_depth(), 2);
    }

    #[test]
    fn single_ranks_pair_up_across_stages() {
        // PP=2 × TP=2 on four nodes: node 1 is stage 0 rank 1 and feeds node 3.
        let l = ClusterLayout::new(4, 2, 2, 30, 0.0).unwrap();
        assert_eq!(l.nodes[1].slots[0].tp_rank_begin, 1);
        assert_eq!(l.nodes[1].next, Some(3));
        assert_eq!(l.nodes[3].ring, vec![2, 3]);
        assert!(l.nodes[3].slots[0].spans_nodes());
        assert_eq!(l.result_node(), 2);
        assert_eq!(l.pipeline_depth(), 2);
        // TP=2 over two nodes, one stage.
        let l = ClusterLayout::new(2, 1, 2, 30, 0.0).unwrap();
        assert_eq!(l.nodes[0].ring, vec![0, 1]);
        assert!(l.nodes.iter().all(|n| n.next.is_none() && !n.has_previous));
    }

    #[test]
    fn the_last_stage_gets_fewer_layers_for_its_lm_head() {
        // SmolLM2-135M: the lm_head costs about 8 layers.
        let l = ClusterLayout::new(2, 2, 1, 30, 8.0).unwrap();
        assert_eq!(l.nodes[0].slots[0].layers, LayerRange::new(0, 19));
        assert_eq!(l.nodes[1].slots[0].layers, LayerRange::new(19, 30));
        // Never an empty stage, however heavy the head.
        let r = LayerRange::split(3, 3, 100.0);
        assert!(r.iter().all(|r| r.len() == 1), "{r:?}");
    }

    #[test]
    fn uneven_spreads_are_refused_with_the_arithmetic() {
        let e = ClusterLayout::new(3, 2, 2, 30, 0.0).unwrap_err();
        assert!(
            e.contains("4 ranks cannot be spread evenly over 3 nodes"),
            "{e}"
        );
        let e = ClusterLayout::new(2, 1, 4, 30, 0.0).unwrap_err();
        assert!(e.contains("puts 2 on each"), "{e}");
        assert!(ClusterLayout::new(1, 31, 1, 30, 0.0).is_err());
    }
}
