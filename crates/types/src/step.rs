//! Step messages between the scheduler and the stages (vLLM v1's names).

use serde::{Deserialize, Serialize};

use crate::{BlockId, RequestId, SamplingParams, TokenId};

/// A request a stage has not seen (or must rebuild after preemption).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewRequestData {
    pub req_id: RequestId,
    /// Every token known so far: the prompt, then tokens generated before a
    /// preemption (so a resumed request is recomputed, not resampled).
    pub token_ids: Vec<TokenId>,
    /// How many of `token_ids` are prompt; the rest count as output for penalties.
    pub num_prompt_tokens: usize,
    pub sampling: SamplingParams,
    pub block_ids: Vec<BlockId>,
    /// Tokens whose KV is already in the cache (prefix-cache hits).
    pub num_computed_tokens: usize,
}

/// The diff for a request the stage already holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedRequestData {
    pub req_id: RequestId,
    /// Tokens appended since the last step (the sampled token of a decode).
    pub new_token_ids: Vec<TokenId>,
    pub new_block_ids: Vec<BlockId>,
    pub num_computed_tokens: usize,
}

/// One step of work: what to compute, for which requests.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SchedulerOutput {
    pub step_id: u64,
    pub scheduled_new_reqs: Vec<NewRequestData>,
    pub scheduled_cached_reqs: Vec<CachedRequestData>,
    /// Tokens to compute this step per request, in batch order.
    pub num_scheduled_tokens: Vec<(RequestId, usize)>,
    pub total_num_scheduled_tokens: usize,
    /// Requests that ended or were preempted: stages drop their state.
    pub finished_req_ids: Vec<RequestId>,
    /// Requests whose sampling waits for a token mask ([`crate::StepMasks`]).
    pub structured_req_ids: Vec<RequestId>,
    /// Draft tokens to verify, per request: they follow its known tokens in
    /// this step (and count in `num_scheduled_tokens`); the last stage keeps
    /// those its own sampling agrees with.
    pub scheduled_spec_decode_tokens: Vec<(RequestId, Vec<TokenId>)>,
}

impl SchedulerOutput {
    pub fn is_empty(&self) -> bool {
        self.total_num_scheduled_tokens == 0 && self.finished_req_ids.is_empty()
    }
}

/// The sampled token's logprob and the top alternatives, from the raw logits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Logprobs {
    pub logprob: f32,
    pub top: Vec<(TokenId, f32)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampledToken {
    pub req_id: RequestId,
    pub token_id: TokenId,
    pub logprobs: Option<Logprobs>,
}

/// What the last stage returns for a step: one token per request that reached
/// the end of its known tokens (prefill chunks in the middle sample nothing),
/// and for a request with drafts, the drafts accepted and then one more, in
/// order, one entry each.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    pub step_id: u64,
    pub sampled: Vec<SampledToken>,
    /// A draft model's proposals for each request's next step, made after
    /// its tokens above (empty without a draft model).
    pub draft_token_ids: Vec<(RequestId, Vec<TokenId>)>,
}
