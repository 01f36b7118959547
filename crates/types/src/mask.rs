//! Which tokens a sequence may take next: a bit per vocabulary entry.

use serde::{Deserialize, Serialize};

use crate::{RequestId, TokenId};

/// Bit `i % 32` of word `i / 32` set: token `i` is allowed. Tokens past the
/// end (a model's padded vocabulary) are not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenMask {
    words: Vec<u32>,
}

impl TokenMask {
    pub fn from_words(words: Vec<u32>) -> Self {
        Self { words }
    }

    /// Allows `token` alone.
    pub fn only(token: TokenId) -> Self {
        let mut words = vec![0; token as usize / 32 + 1];
        words[token as usize / 32] |= 1 << (token % 32);
        Self { words }
    }

    pub fn words(&self) -> &[u32] {
        &self.words
    }

    pub fn allows(&self, token: TokenId) -> bool {
        self.words
            .get(token as usize / 32)
            .is_some_and(|w| w & (1 << (token % 32)) != 0)
    }

    /// Sets every disallowed logit to minus infinity.
    pub fn apply(&self, logits: &mut [f32]) {
        for (i, chunk) in logits.chunks_mut(32).enumerate() {
            let w = self.words.get(i).copied().unwrap_or(0);
            if w == u32::MAX {
                continue;
            }
            for (b, l) in chunk.iter_mut().enumerate() {
                if w & (1 << b) == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// The masks of a step's constrained requests. They travel beside the step,
/// not in it: the leader computes them while the step's forward pass runs,
/// and the sampling stage waits for them only when it is ready to sample.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMasks {
    pub step_id: u64,
    pub masks: Vec<(RequestId, TokenMask)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_keeps_exactly_the_allowed_tokens() {
        let mut words = vec![0u32; 3];
        for t in [0u32, 31, 32, 70] {
            words[t as usize / 32] |= 1 << (t % 32);
        }
        let mask = TokenMask::from_words(words);
        // 100 logits: more than the mask covers, which must end up disallowed.
        let mut logits = vec![1.0f32; 100];
        mask.apply(&mut logits);
        let kept: Vec<usize> = (0..100).filter(|&i| logits[i].is_finite()).collect();
        assert_eq!(kept, vec![0, 31, 32, 70]);
        assert!(mask.allows(70) && !mask.allows(71) && !mask.allows(1000));
        assert!(TokenMask::only(40).allows(40) && !TokenMask::only(40).allows(8));
    }
}
