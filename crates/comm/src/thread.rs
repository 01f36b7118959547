//! Tensor-parallel ranks as threads of one process, exchanging tensors
//! through shared memory.

use std::sync::{Arc, Barrier, Mutex};

use candle_core::{Result, Tensor};

use crate::Communicator;

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
        let out = f(&self.shared.slots.lock().expect("poisoned"));
        self.shared.barrier.wait();
        out
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
            // The same order on every rank, so every rank gets the same bits.
            let mut sum = all[0].clone().expect("rank 0 published");
            for x in &all[1..] {
                sum = (sum + x.as_ref().expect("every rank published"))?;
            }
            Ok(sum)
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
