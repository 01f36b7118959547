use strata_types::{FinishReason, RequestId, SamplingParams, TokenId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestStatus {
    Waiting,
    Running,
    /// Lost its blocks to a running request; waits to be recomputed.
    Preempted,
    Finished(FinishReason),
}

/// One sequence as the scheduler sees it. Only the scheduler mutates it.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: RequestId,
    /// The prompt followed by every generated token.
    pub token_ids: Vec<TokenId>,
    pub num_prompt_tokens: usize,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// Tokens that end the sequence (eos and `stop_token_ids`), not returned as text.
    pub stop_token_ids: Vec<TokenId>,
    pub num_computed_tokens: usize,
    pub status: RequestStatus,
    /// Prompt tokens found in the prefix cache at (the last) admission.
    pub num_cached_tokens: usize,
    /// How many of `token_ids` the stages have been sent; `None` when the
    /// stages hold no state for it (never scheduled, or preempted).
    pub(crate) num_tokens_sent: Option<usize>,
    pub(crate) num_blocks_sent: usize,
    /// Whether the scheduler may propose draft tokens for it (not for a
    /// structured output, whose masks cover one token per step).
    pub speculate: bool,
    /// Draft tokens in the step in flight, to take back those rejected.
    pub(crate) num_drafts_in_flight: usize,
    /// A draft model's proposals for the next step (after the last token).
    pub(crate) draft_token_ids: Vec<TokenId>,
}

impl Request {
    pub fn new(
        id: RequestId,
        prompt: Vec<TokenId>,
        sampling: SamplingParams,
        max_tokens: usize,
        stop_token_ids: Vec<TokenId>,
    ) -> Self {
        Self {
            id,
            num_prompt_tokens: prompt.len(),
            token_ids: prompt,
            sampling,
            max_tokens,
            stop_token_ids,
            num_computed_tokens: 0,
            status: RequestStatus::Waiting,
            num_cached_tokens: 0,
            num_tokens_sent: None,
            num_blocks_sent: 0,
            speculate: true,
            num_drafts_in_flight: 0,
            draft_token_ids: Vec::new(),
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    pub fn output_token_ids(&self) -> &[TokenId] {
        &self.token_ids[self.num_prompt_tokens..]
    }

    pub fn num_output_tokens(&self) -> usize {
        self.token_ids.len() - self.num_prompt_tokens
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.status, RequestStatus::Finished(_))
    }
}
