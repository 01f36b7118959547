//! Where a node keeps the token masks the leader sends beside its steps:
//! the leader posts a step's masks while the step's forward pass runs, and
//! the sampling stage waits for them only when it has logits to mask.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use strata_types::StepMasks;

/// Masks are kept for at most this many steps: a node that does not sample
/// never takes them, and a pipeline holds only a few steps in flight.
const KEPT_STEPS: usize = 64;

#[derive(Default)]
pub struct MaskBoard {
    board: Mutex<Board>,
    posted: Condvar,
}

#[derive(Default)]
struct Board {
    steps: BTreeMap<u64, Arc<StepMasks>>,
    /// Bumped by `interrupt`, which ends every wait in progress.
    epoch: u64,
}

impl MaskBoard {
    pub fn post(&self, masks: StepMasks) {
        let mut b = self.board.lock().expect("poisoned");
        b.steps.insert(masks.step_id, Arc::new(masks));
        while b.steps.len() > KEPT_STEPS {
            b.steps.pop_first();
        }
        self.posted.notify_all();
    }

    /// Blocks until step `step_id`'s masks arrive, for up to `timeout`.
    /// Masks of earlier steps are dropped: steps finish in order.
    pub fn wait(&self, step_id: u64, timeout: Duration) -> Result<Arc<StepMasks>, String> {
        let deadline = Instant::now() + timeout;
        let mut b = self.board.lock().expect("poisoned");
        let epoch = b.epoch;
        loop {
            b.steps.retain(|&s, _| s >= step_id);
            if let Some(m) = b.steps.get(&step_id) {
                return Ok(m.clone());
            }
            if b.epoch != epoch {
                return Err(format!(
                    "the wait for step {step_id}'s token masks was interrupted"
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "step {step_id}'s token masks did not arrive within {timeout:?}"
                ));
            }
            b = self.posted.wait_timeout(b, left).expect("poisoned").0;
        }
    }

    /// Ends every wait in progress with an error (the step is being abandoned).
    pub fn interrupt(&self) {
        let mut b = self.board.lock().expect("poisoned");
        b.epoch += 1;
        b.steps.clear();
        self.posted.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_ends_when_its_step_is_posted_and_drops_older_steps() {
        let board = Arc::new(MaskBoard::default());
        board.post(StepMasks {
            step_id: 3,
            ..Default::default()
        });
        let waiter = {
            let board = board.clone();
            std::thread::spawn(move || board.wait(4, Duration::from_secs(30)))
        };
        board.post(StepMasks {
            step_id: 4,
            ..Default::default()
        });
        assert_eq!(waiter.join().unwrap().unwrap().step_id, 4);
        // Step 3 went when step 4 was taken.
        assert!(board.wait(3, Duration::ZERO).is_err());
        assert_eq!(board.wait(4, Duration::ZERO).unwrap().step_id, 4);
    }

    #[test]
    fn interrupt_ends_a_wait_with_an_error() {
        let board = Arc::new(MaskBoard::default());
        let waiter = {
            let board = board.clone();
            std::thread::spawn(move || board.wait(1, Duration::from_secs(60)))
        };
        // Interrupt until the waiter has seen it (it may not be waiting yet).
        while !waiter.is_finished() {
            board.interrupt();
            std::thread::yield_now();
        }
        assert!(waiter.join().unwrap().unwrap_err().contains("interrupted"));
    }
}
