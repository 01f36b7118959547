//! Tensor-parallel ranks as threads of one process, exchanging tensors
//! through shared memory.

use std::sync::{Arc, Barrier, Mutex};

use candle_core::{Result, Tensor};

use crate::tcp::to_f32;
use crate::{last_dim, ring_chunk, Communicator};

#[derive(Debug)]
struct Shared {
    barrier: Barrier,
    slots: Mutex<Vec<Option<Tensor>>>,
}

/// One rank of a [`ThreadComm::group`].
#[derive(Debug, Clone)]
pub struct ThreadComm {
    rank: usize,
    world_size: usize,
    shared: Arc<Shared>,
}

impl ThreadComm {
    /// `world_size` communicators, one per thread; every rank must call each
    /// collective, in the same order.
    pub fn group(world_size: usize) -> Vec<ThreadComm> {
        assert!(world_size > 0, "a group needs at least one rank");
        let shared = Arc::new(Shared {
            barrier: Barrier::new(world_size),
            slots: Mutex::new(vec![None; world_size]),
        });
        (0..world_size)
            .map(|rank| ThreadComm {
                rank,
                world_size,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Publishes this rank's tensor, waits for all, applies `f` to every
    /// rank's tensor (in rank order), and waits again so no slot is reused
    /// while another rank still reads it.
    fn exchange<R>(&self, t: Option<&Tensor>, f: impl FnOnce(&[Option<Tensor>]) -> R) -> R {
        self.shared.slots.lock().expect("poisoned")[self.rank] = t.cloned();
        self.shared.barrier.wait();
        // Tensors are shared handles: copy them out so ranks work in parallel.
        let all = self.shared.slots.lock().expect("poisoned").clone();
        self.shared.barrier.wait();
        f(&all)
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.contiguous()?;
        self.exchange(Some(&t), |all| {
            // The TCP ring's order (see `ring_chunk`), the same on every rank.
            let parts = all
                .iter()
                .map(|x| to_f32(x.as_ref().expect("every rank published")).map(|p| p.0))
                .collect::<Result<Vec<_>>>()?;
            let n = parts.len();
            let cols = last_dim(&t);
            let mut sum = vec![0f32; parts[0].len()];
            for (row, out) in sum.chunks_mut(cols).enumerate() {
                for c in 0..n {
                    for j in ring_chunk(cols, n, c) {
                        let i = row * cols + j;
                        let mut acc = parts[c][i];
                        for k in 1..n {
                            acc += parts[(c + k) % n][i];
                        }
                        out[j] = acc;
                    }
                }
            }
            Tensor::from_vec(sum, t.shape(), t.device())?.to_dtype(t.dtype())
        })
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        let t = t.contiguous()?;
        self.exchange(Some(&t), |all| {
            let parts: Vec<Tensor> = all
                .iter()
                .map(|x| x.clone().expect("every rank published"))
                .collect();
            Tensor::cat(&parts, dim)
        })
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let mine = (self.rank == root).then_some(t);
        self.exchange(mine, |all| {
            Ok(all[root].clone().expect("the root published"))
        })
    }
}
