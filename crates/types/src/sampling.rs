use serde::{Deserialize, Serialize};

use crate::TokenId;

/// What the sampler of the last stage needs to turn logits into a token.
///
/// Stop conditions (stop strings, max tokens, eos) are not here: the leader
/// checks those, so stages never see them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 0.0 disables.
    pub min_p: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1.0 disables.
    pub repetition_penalty: f32,
    /// Every request is seeded (the leader picks one when the client did not),
    /// so a stage that replays a request samples the same tokens.
    pub seed: u64,
    /// Return the sampled token's logprob plus this many top alternatives.
    pub logprobs: Option<usize>,
    /// Added to a token's logit before sampling (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(TokenId, f32)>,
    /// When set, only these tokens may be sampled.
    pub allowed_token_ids: Option<Vec<TokenId>>,
    /// Token sequences the output must never complete: where the output
    /// ends with all but the last token of one, that last token is banned.
    pub bad_words: Vec<Vec<TokenId>>,
    /// Until this many tokens are generated, `stop_token_ids` cannot be sampled.
    pub min_tokens: usize,
    /// The tokens that end the sequence (eos and the request's stop tokens),
    /// for `min_tokens`.
    pub stop_token_ids: Vec<TokenId>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
            logprobs: None,
            logit_bias: Vec::new(),
            allowed_token_ids: None,
            bad_words: Vec::new(),
            min_tokens: 0,
            stop_token_ids: Vec::new(),
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
    /// Whether anything but the logits themselves shapes the choice.
    pub fn has_logit_rules(&self) -> bool {
        !self.logit_bias.is_empty()
            || self.allowed_token_ids.is_some()
            || !self.bad_words.is_empty()
            || self.min_tokens > 0
    }

    pub fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
    }
}
