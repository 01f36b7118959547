//! Cluster membership as the leader sees it: one state machine per node
//! (joining → loading → ready → lost → rejoining → ready), what `/health`
//! reports, and one log line per state change.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A ready node whose heartbeats stop for this long is lost.
pub const HEARTBEAT_LOST: Duration = Duration::from_secs(2);

/// Where one node stands.
#[derive(Debug, Clone, PartialEq)]
pub enum NodePhase {
    /// Not joined yet.
    Joining,
    /// Joined; its stages are loading.
    Loading,
    /// Loaded, started, and answering heartbeats.
    Ready,
    /// Gone: its connection broke, its heartbeats stopped, or a new process
    /// took its rank. The engine holds every request until it is back.
    Lost { since: Instant, why: String },
    /// Back after being lost (the same process answering again, or a new
    /// one that joined); being loaded and restarted with the others.
    Rejoining { since: Instant },
}

#[derive(Debug, Clone)]
struct NodeStatus {
    phase: NodePhase,
    last_heartbeat: Option<Instant>,
    /// Checkpoint bytes the node read for its stages.
    weight_bytes: u64,
    /// Why the leader last refused a worker claiming this rank, until one joins.
    refused: Option<String>,
}

/// Every node's state, shared by the leader's cluster code, its engine and
/// its HTTP server: ready only when every node is.
#[derive(Debug)]
pub struct ClusterState {
    nodes: Mutex<Vec<NodeStatus>>,
}

fn who(node: usize) -> String {
    if node == 0 {
        "node 0 (leader)".to_string()
    } else {
        format!("node {node}")
    }
}

impl ClusterState {
    pub fn new(nnodes: usize) -> std::sync::Arc<Self> {
        let mut nodes = vec![
            NodeStatus {
                phase: NodePhase::Joining,
                last_heartbeat: None,
                weight_bytes: 0,
                refused: None,
            };
            nnodes.max(1)
        ];
        // The leader has joined itself.
        nodes[0].phase = NodePhase::Loading;
        std::sync::Arc::new(Self {
            nodes: Mutex::new(nodes),
        })
    }

    fn with<R>(&self, node: usize, f: impl FnOnce(&mut NodeStatus) -> R) -> Option<R> {
        self.nodes.lock().expect("poisoned").get_mut(node).map(f)
    }

    pub fn nnodes(&self) -> usize {
        self.nodes.lock().expect("poisoned").len()
    }

    pub fn phase(&self, node: usize) -> Option<NodePhase> {
        self.with(node, |n| n.phase.clone())
    }

    /// Moves `node` to `phase`, saying so once (never for a repeat).
    pub fn set_phase(&self, node: usize, phase: NodePhase) {
        let old = self.with(node, |n| std::mem::replace(&mut n.phase, phase.clone()));
        let Some(old) = old else { return };
        if std::mem::discriminant(&old) == std::mem::discriminant(&phase) {
            return;
        }
        match (&old, &phase) {
            (_, NodePhase::Lost { why, .. }) => tracing::warn!(
                "{} lost: {why}; /health is 503 and requests wait until it is back",
                who(node)
            ),
            (NodePhase::Lost { since, .. }, NodePhase::Rejoining { .. }) => tracing::info!(
                "{} is back {:.1} s after it was lost; reloading and restarting",
                who(node),
                since.elapsed().as_secs_f32()
            ),
            (NodePhase::Rejoining { since }, NodePhase::Ready) => tracing::info!(
                "{} ready again {:.1} s after it came back",
                who(node),
                since.elapsed().as_secs_f32()
            ),
            _ => tracing::debug!("{}: {old:?} -> {phase:?}", who(node)),
        }
    }

    /// Marks `node` lost unless it already is, or has never been in.
    /// Returns whether this call lost it.
    pub fn lose(&self, node: usize, why: impl Into<String>) -> bool {
        let lose = matches!(
            self.phase(node),
            Some(NodePhase::Ready | NodePhase::Loading | NodePhase::Rejoining { .. })
        );
        if lose {
            self.set_phase(
                node,
                NodePhase::Lost {
                    since: Instant::now(),
                    why: why.into(),
                },
            );
        }
        lose
    }

    /// The lowest-numbered lost node and why.
    pub fn first_lost(&self) -> Option<(usize, String)> {
        let nodes = self.nodes.lock().expect("poisoned");
        nodes.iter().enumerate().find_map(|(i, n)| match &n.phase {
            NodePhase::Lost { why, .. } => Some((i, why.clone())),
            _ => None,
        })
    }

    /// Nodes lost or coming back.
    pub fn recovering(&self) -> Vec<usize> {
        let nodes = self.nodes.lock().expect("poisoned");
        (0..nodes.len())
            .filter(|&i| {
                matches!(
                    nodes[i].phase,
                    NodePhase::Lost { .. } | NodePhase::Rejoining { .. }
                )
            })
            .collect()
    }

    /// A heartbeat sent at `sent` and answered by the process the leader
    /// knows as `node`. The send time, not the answer's, is what counts: a
    /// beat the node answered just before it died can be read after its
    /// loss was noticed, and must not pass for an answer since the loss.
    pub fn beat(&self, node: usize, sent: Instant) {
        self.with(node, |n| {
            n.last_heartbeat = n.last_heartbeat.max(Some(sent));
        });
    }

    /// A heartbeat that went unanswered: a ready node silent for
    /// [`HEARTBEAT_LOST`] is lost.
    pub fn missed(&self, node: usize) {
        let silent = self.with(node, |n| match (&n.phase, n.last_heartbeat) {
            (NodePhase::Ready, Some(t)) => Some(t.elapsed()),
            _ => None,
        });
        if let Some(Some(silent)) = silent {
            if silent >= HEARTBEAT_LOST {
                self.lose(
                    node,
                    format!("no heartbeat for {:.1} s", silent.as_secs_f32()),
                );
            }
        }
    }

    /// Whether a lost `node` answers heartbeats again (since it was lost).
    pub fn answers_since_lost(&self, node: usize) -> bool {
        self.with(node, |n| match (&n.phase, n.last_heartbeat) {
            (NodePhase::Lost { since, .. }, Some(t)) => t > *since,
            (NodePhase::Rejoining { .. }, _) => true,
            _ => false,
        })
        .unwrap_or(false)
    }

    /// A worker claiming `node` was refused (shown on `/health` until one
    /// joins). Returns whether the reason is new.
    pub fn refused(&self, node: usize, why: &str) -> bool {
        self.with(node, |n| {
            let new = n.refused.as_deref() != Some(why);
            n.refused = Some(why.to_string());
            new
        })
        .unwrap_or(true)
    }

    /// A worker joined as `node`.
    pub fn joined(&self, node: usize) {
        let first = self.with(node, |n| {
            n.refused = None;
            n.last_heartbeat = Some(Instant::now());
            n.phase == NodePhase::Joining
        });
        if first == Some(true) {
            self.set_phase(node, NodePhase::Loading);
        }
    }

    /// Marks `node` loaded, having read `weight_bytes` of the checkpoint.
    pub fn set_loaded(&self, node: usize, weight_bytes: u64) {
        self.with(node, |n| {
            n.weight_bytes = weight_bytes;
            n.last_heartbeat = Some(Instant::now());
        });
    }

    /// Every node joined, loaded and started: the cluster can step.
    pub fn set_all_ready(&self) {
        for node in 0..self.nnodes() {
            self.beat(node, Instant::now());
            self.set_phase(node, NodePhase::Ready);
        }
    }

    /// What keeps the cluster from serving; empty when it is ready.
    pub fn problems(&self) -> Vec<String> {
        let nodes = self.nodes.lock().expect("poisoned");
        let mut out = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            let who = who(i);
            match &n.phase {
                NodePhase::Joining => match &n.refused {
                    Some(why) => out.push(format!("{who}: not joined (refused: {why})")),
                    None => out.push(format!("{who}: not joined")),
                },
                NodePhase::Loading => out.push(format!("{who}: joined, stage not loaded yet")),
                NodePhase::Ready => {}
                NodePhase::Lost { since, why } => out.push(format!(
                    "{who}: lost {:.1} s ago ({why}); waiting for it to come back",
                    since.elapsed().as_secs_f32()
                )),
                NodePhase::Rejoining { .. } => {
                    out.push(format!("{who}: back; reloading and restarting"))
                }
            }
        }
        out
    }

    /// Whether each node can step now (`strata_node_up`), by node rank.
    pub fn node_up(&self) -> Vec<bool> {
        let nodes = self.nodes.lock().expect("poisoned");
        nodes.iter().map(|n| n.phase == NodePhase::Ready).collect()
    }

    /// Checkpoint bytes each node read (0 until it has loaded), by node rank.
    pub fn weight_bytes(&self) -> Vec<u64> {
        let nodes = self.nodes.lock().expect("poisoned");
        nodes.iter().map(|n| n.weight_bytes).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_goes_through_its_states_and_health_names_it() {
        let s = ClusterState::new(2);
        assert_eq!(s.problems().len(), 2);
        s.joined(1);
        assert_eq!(s.phase(1), Some(NodePhase::Loading));
        s.set_all_ready();
        assert!(s.problems().is_empty());
        assert_eq!(s.node_up(), [true, true]);

        assert!(s.lose(1, "the step stream broke"));
        assert!(!s.lose(1, "again"), "a lost node is lost once");
        let p = s.problems();
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("node 1: lost") && p[0].contains("step stream"),
            "{p:?}"
        );
        assert_eq!(s.first_lost().map(|(n, _)| n), Some(1));
        assert_eq!(s.node_up(), [true, false]);
        assert_eq!(s.recovering(), [1]);

        assert!(!s.answers_since_lost(1));
        // A beat sent before the loss, its answer read after it: the old
        // process may be dead by now, so it proves nothing.
        s.beat(1, Instant::now() - Duration::from_millis(50));
        assert!(!s.answers_since_lost(1));
        s.beat(1, Instant::now());
        assert!(s.answers_since_lost(1));
        s.set_phase(
            1,
            NodePhase::Rejoining {
                since: Instant::now(),
            },
        );
        assert!(!s.problems().is_empty());
        s.set_all_ready();
        assert!(s.problems().is_empty() && s.recovering().is_empty());
    }

    #[test]
    fn missed_heartbeats_lose_only_a_ready_node_and_only_after_the_bound() {
        let s = ClusterState::new(2);
        s.missed(1);
        assert_eq!(
            s.phase(1),
            Some(NodePhase::Joining),
            "not joined: nothing to lose"
        );
        s.joined(1);
        s.set_all_ready();
        s.missed(1);
        assert_eq!(
            s.phase(1),
            Some(NodePhase::Ready),
            "one miss within the bound"
        );
        s.with(1, |n| {
            n.last_heartbeat = Some(Instant::now() - HEARTBEAT_LOST)
        });
        s.missed(1);
        assert!(matches!(s.phase(1), Some(NodePhase::Lost { .. })));
    }
}
