//! Applies step messages to per-request state and runs one forward pass.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use rayon::prelude::*;
use strata_model::{BatchInput, KvCache, SeqInfo, StageModel, StageOutput};
use strata_types::{
    BlockId, RequestId, SampledToken, SamplingParams, SchedulerOutput, StepResult, TokenId,
    BLOCK_SIZE,
};

use crate::drafter::{DraftSeq, Drafter};
use crate::masks::MaskBoard;
use crate::sampler::sample;

/// How long the sampling stage waits for a step's token masks. The leader
/// posts them moments after the step, so only a leader that is gone makes
/// this wait run out.
const MASK_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Model(#[from] strata_model::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("step {step}: {msg}")]
    Protocol { step: u64, msg: String },
    #[error("{0}")]
    Setup(String),
    /// The data plane to a neighbouring node broke: that node is gone or
    /// being replaced, and the leader recovers the cluster.
    #[error("data plane {0}")]
    Link(String),
}

/// What a stage hands on after a step.
#[derive(Debug)]
pub enum StageResult {
    /// Hidden states for the next stage (`None` when nothing was scheduled).
    Hidden(Option<Tensor>),
    /// The last stage's sampled tokens.
    Sampled(StepResult),
}

/// What a stage remembers about a request between steps.
#[derive(Debug)]
struct CachedRequest {
    token_ids: Vec<TokenId>,
    num_prompt_tokens: usize,
    block_ids: Vec<BlockId>,
    num_computed_tokens: usize,
    sampling: SamplingParams,
    /// Tokens whose KV the draft model holds (with a drafter).
    num_drafted_tokens: usize,
}

/// A stage's model, KV cache and per-request state.
pub struct ModelRunner {
    model: Box<dyn StageModel>,
    kv: KvCache,
    requests: HashMap<RequestId, CachedRequest>,
    /// The token masks of constrained requests, posted beside each step.
    masks: Arc<MaskBoard>,
    /// The draft model proposing the next step's drafts (last stage only).
    drafter: Option<Drafter>,
}

impl ModelRunner {
    pub fn new(
        model: Box<dyn StageModel>,
        num_blocks: usize,
        kv_dtype: DType,
        masks: Arc<MaskBoard>,
    ) -> Result<Self, RunnerError> {
        let kv = model.new_kv_cache_in(num_blocks, kv_dtype)?;
        Ok(Self {
            model,
            kv,
            requests: HashMap::new(),
            masks,
            drafter: None,
        })
    }

    /// Proposes drafts with `drafter` after each step (on the last stage).
    pub fn with_drafter(mut self, drafter: Drafter) -> Self {
        self.drafter = Some(drafter);
        self
    }

    pub fn model(&self) -> &dyn StageModel {
        &*self.model
    }

    pub fn num_requests(&self) -> usize {
        self.requests.len()
    }

    /// Drops every request (the leader restarted or asked for a reset).
    pub fn reset(&mut self) {
        self.requests.clear();
    }

    /// Runs one step: updates state from `out`, computes the scheduled tokens
    /// (from their ids on the first stage, from `hidden` on the others) and,
    /// on the last stage, samples a token for each request that reached its
    /// end. Every stage must see every step, even an empty one, so that all
    /// drop finished requests together.
    pub fn execute(
        &mut self,
        out: &SchedulerOutput,
        hidden: Option<Tensor>,
    ) -> Result<StageResult, RunnerError> {
        let is_last = self.model.is_last();
        let empty = || {
            if is_last {
                StageResult::Sampled(StepResult {
                    step_id: out.step_id,
                    ..Default::default()
                })
            } else {
                StageResult::Hidden(None)
            }
        };
        let step = out.step_id;
        let protocol = |msg: String| RunnerError::Protocol { step, msg };
        for id in &out.finished_req_ids {
            self.requests.remove(id);
        }
        for n in &out.scheduled_new_reqs {
            self.requests.insert(
                n.req_id,
                CachedRequest {
                    token_ids: n.token_ids.clone(),
                    num_prompt_tokens: n.num_prompt_tokens,
                    block_ids: n.block_ids.clone(),
                    num_computed_tokens: n.num_computed_tokens,
                    sampling: n.sampling.clone(),
                    num_drafted_tokens: n.num_computed_tokens,
                },
            );
        }
        for c in &out.scheduled_cached_reqs {
            let r = self
                .requests
                .get_mut(&c.req_id)
                .ok_or_else(|| protocol(format!("diff for unknown request {}", c.req_id)))?;
            r.token_ids.extend_from_slice(&c.new_token_ids);
            r.block_ids.extend_from_slice(&c.new_block_ids);
            r.num_computed_tokens = c.num_computed_tokens;
        }
        if out.total_num_scheduled_tokens == 0 {
            return Ok(empty());
        }

        // Flatten the batch in scheduling order, each request's drafts after
        // its known tokens.
        let drafts_of = |id: RequestId| {
            out.scheduled_spec_decode_tokens
                .iter()
                .find(|(r, _)| *r == id)
                .map_or(&[][..], |(_, d)| d.as_slice())
        };
        let total = out.total_num_scheduled_tokens;
        let mut token_ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut slots = Vec::with_capacity(total);
        let mut logits_indices = Vec::new();
        let mut sampled_ids = Vec::new();
        for &(id, n) in &out.num_scheduled_tokens {
            let r = self
                .requests
                .get(&id)
                .ok_or_else(|| protocol(format!("request {id} scheduled but unknown")))?;
            let start = r.num_computed_tokens;
            let drafts = drafts_of(id);
            let known = n.saturating_sub(drafts.len());
            if start + known > r.token_ids.len()
                || (start + n).div_ceil(BLOCK_SIZE) > r.block_ids.len()
                || !drafts.is_empty() && (known == 0 || start + known != r.token_ids.len())
            {
                return Err(protocol(format!(
                    "request {id}: {n} tokens ({} drafts) from {start} do not fit its {} tokens \
                     or {} blocks",
                    drafts.len(),
                    r.token_ids.len(),
                    r.block_ids.len()
                )));
            }
            token_ids.extend_from_slice(&r.token_ids[start..start + known]);
            token_ids.extend_from_slice(drafts);
            for p in start..start + n {
                positions.push(p as u32);
                slots.push(
                    r.block_ids[p / BLOCK_SIZE] * BLOCK_SIZE as u32 + (p % BLOCK_SIZE) as u32,
                );
            }
            if start + known == r.token_ids.len() {
                // The last known token's row and each draft's.
                let end = token_ids.len() as u32;
                logits_indices.extend(end - 1 - drafts.len() as u32..end);
                sampled_ids.push(id);
            }
        }
        let seqs: Vec<SeqInfo> = out
            .num_scheduled_tokens
            .iter()
            .map(|(id, n)| SeqInfo {
                query_len: *n,
                block_table: &self.requests[id].block_ids,
            })
            .collect();
        let input = BatchInput {
            token_ids: &token_ids,
            positions: &positions,
            slot_mapping: &slots,
            seqs: &seqs,
            logits_indices: &logits_indices,
        };
        // Where a step's time goes (RUST_LOG=strata::step=debug): queuing the
        // forward pass, waiting for its logits on the host, and sampling.
        let started = Instant::now();
        let logits = match self.model.forward(&input, hidden, &mut self.kv)? {
            StageOutput::Hidden(h) => return Ok(StageResult::Hidden(Some(h))),
            StageOutput::Logits(l) => l,
        };
        if sampled_ids.is_empty() {
            // Prefill chunks only: the drafter still catches up.
            self.propose(out, &[])?;
            return Ok(empty());
        }
        let vocab = logits.dim(1)?;
        let queued = started.elapsed();
        let constrained = |id: &RequestId| out.structured_req_ids.contains(id);
        // When every request decodes greedily and asks nothing else of its
        // logits, the choice is made where the logits are: one id per row
        // comes back instead of the rows (33 MB a step at 64 rows of a
        // 128k vocabulary). Same rule as the sampler's, ties included.
        let plain = |id: &RequestId| {
            let s = &self.requests[id].sampling;
            s.is_greedy()
                && s.logprobs.is_none()
                && !s.has_penalties()
                && !s.has_logit_rules()
                && !constrained(id)
        };
        let mut choice = if sampled_ids.iter().all(plain) {
            Choice::Greedy(strata_kernels::argmax_rows(&logits)?.to_vec1::<u32>()?)
        } else {
            Choice::Logits(logits.flatten_all()?.to_vec1::<f32>()?)
        };
        let on_host = started.elapsed();
        // The masks were computed while the forward pass ran.
        let masks = if sampled_ids.iter().any(constrained) {
            Some(self.masks.wait(step, MASK_TIMEOUT).map_err(protocol)?)
        } else {
            None
        };
        // Each request's rows (its last known token's, then each draft's),
        // sampled in parallel: a row of a 128k vocabulary took an H100's
        // host a third of a millisecond (greedy; more with top-p), and a
        // step may have hundreds.
        let counts: Vec<usize> = sampled_ids
            .iter()
            .map(|id| drafts_of(*id).len() + 1)
            .collect();
        let num_rows: usize = counts.iter().sum();
        let rows: Vec<Rows> = match &mut choice {
            Choice::Greedy(ids) if ids.len() == num_rows => {
                let mut left = ids.as_slice();
                counts
                    .iter()
                    .map(|&n| {
                        let (these, rest) = left.split_at(n);
                        left = rest;
                        Rows::Greedy(these)
                    })
                    .collect()
            }
            Choice::Logits(l) if l.len() == num_rows * vocab => {
                let mut left = l.as_mut_slice();
                counts
                    .iter()
                    .map(|&n| {
                        let (these, rest) = std::mem::take(&mut left).split_at_mut(n * vocab);
                        left = rest;
                        Rows::Logits(these)
                    })
                    .collect()
            }
            _ => {
                return Err(protocol(format!(
                    "{num_rows} rows to sample, but the forward pass returned others"
                )))
            }
        };
        let requests = &self.requests;
        let picked: Vec<Result<Vec<SampledToken>, RunnerError>> = sampled_ids
            .par_iter()
            .zip(rows)
            .map(|(id, mut rows)| {
                let drafts = drafts_of(*id);
                let mask = match &masks {
                    Some(m) if constrained(id) => Some(
                        m.masks
                            .iter()
                            .find(|(r, _)| r == id)
                            .map(|(_, mask)| mask)
                            .ok_or_else(|| protocol(format!("no token mask for request {id}")))?,
                    ),
                    _ => None,
                };
                if mask.is_some() && !drafts.is_empty() {
                    return Err(protocol(format!(
                        "request {id}: drafts beside a token mask"
                    )));
                }
                // Each draft is kept while the token sampled before it is
                // that draft: the sampler draws by seed and output position,
                // so the tokens are exactly those decoding one at a time
                // would give, greedy or not (rejection sampling for a
                // one-hot proposal).
                let r = &requests[id];
                let mut history = Cow::Borrowed(r.token_ids.as_slice());
                let mut tokens = Vec::with_capacity(drafts.len() + 1);
                for i in 0..=drafts.len() {
                    let (token_id, logprobs) = match &mut rows {
                        Rows::Greedy(ids) => (ids[i], None),
                        Rows::Logits(l) => sample(
                            &mut l[i * vocab..(i + 1) * vocab],
                            &r.sampling,
                            &history,
                            r.num_prompt_tokens,
                            mask,
                        ),
                    };
                    tokens.push(SampledToken {
                        req_id: *id,
                        token_id,
                        logprobs,
                    });
                    if drafts.get(i) != Some(&token_id) {
                        break;
                    }
                    history.to_mut().push(token_id);
                }
                Ok(tokens)
            })
            .collect();
        let mut sampled = Vec::with_capacity(num_rows);
        let mut known_lens = Vec::with_capacity(sampled_ids.len());
        for (id, tokens) in sampled_ids.iter().zip(picked) {
            let tokens = tokens?;
            let r = self.requests.get_mut(id).expect("checked above");
            let known = r.token_ids.len();
            // The kept drafts: every token but the last.
            let (last, kept) = tokens.split_last().expect("one token at least");
            r.token_ids.extend(kept.iter().map(|t| t.token_id));
            if self.drafter.is_some() {
                // Until the leader sends them with the next step, the kept
                // tokens stay only for the drafter.
                r.token_ids.push(last.token_id);
            }
            known_lens.push((*id, known));
            sampled.extend(tokens);
        }
        let sampled_at = started.elapsed();
        let draft_token_ids = self.propose(out, &sampled_ids)?;
        tracing::debug!(
            target: "strata::step",
            "step {step}: {total} tokens, {} rows sampled; forward queued {:.2} ms, logits on host \
             {:.2} ms, sampled {:.2} ms, drafts {:.2} ms",
            sampled_ids.len(),
            ms(queued),
            ms(on_host),
            ms(sampled_at),
            ms(started.elapsed())
        );
        for (id, known) in known_lens {
            if let Some(r) = self.requests.get_mut(&id) {
                r.token_ids.truncate(known);
            }
        }
        Ok(StageResult::Sampled(StepResult {
            step_id: step,
            sampled,
            draft_token_ids,
        }))
    }

    /// With a drafter: catches its KV up with what the step computed (and
    /// the tokens it sampled), then proposes drafts for the requests that
    /// sampled, unless their next token is constrained. `token_ids` holds
    /// the sampled tokens of `sampled_ids` at this point.
    fn propose(
        &mut self,
        out: &SchedulerOutput,
        sampled_ids: &[RequestId],
    ) -> Result<Vec<(RequestId, Vec<TokenId>)>, RunnerError> {
        let Some(drafter) = &mut self.drafter else {
            return Ok(Vec::new());
        };
        let mut seqs = Vec::with_capacity(out.num_scheduled_tokens.len());
        let mut ends = Vec::with_capacity(out.num_scheduled_tokens.len());
        for &(id, n) in &out.num_scheduled_tokens {
            let r = &self.requests[&id];
            let sampled = sampled_ids.contains(&id);
            // A prefill chunk made its tokens real; a sampling step, every
            // token up to the one just sampled (a rejected draft's KV slot is
            // overwritten later, as the model's own is).
            let real = if sampled {
                r.token_ids.len()
            } else {
                r.num_computed_tokens + n
            };
            let end = real.min(r.block_ids.len() * BLOCK_SIZE);
            let start = r.num_drafted_tokens.min(end);
            seqs.push(DraftSeq {
                id,
                tokens: &r.token_ids[start..end],
                start,
                block_ids: &r.block_ids,
                propose: sampled && end == real && !out.structured_req_ids.contains(&id),
            });
            ends.push((id, end));
        }
        let drafts = drafter.step(&seqs)?;
        for (id, end) in ends {
            self.requests
                .get_mut(&id)
                .expect("scheduled above")
                .num_drafted_tokens = end;
        }
        Ok(drafts)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// What a step brings back from its logits.
enum Choice {
    /// Each row's greedy token.
    Greedy(Vec<u32>),
    /// The rows, `[rows * vocab]`, for the sampler.
    Logits(Vec<f32>),
}

/// One request's share of a [`Choice`].
enum Rows<'a> {
    Greedy(&'a [u32]),
    Logits(&'a mut [f32]),
}
