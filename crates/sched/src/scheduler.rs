//! Continuous batching with chunked prefill, prefix caching and preemption by
//! recompute (vLLM v1's scheduler, reduced to what strata needs).

use std::collections::{HashMap, VecDeque};

use strata_types::{
    CachedRequestData, FinishReason, Logprobs, NewRequestData, RequestId, SampledToken,
    SchedulerOutput, StepResult, TokenId,
};

use crate::kv_cache_manager::KvCacheManager;
use crate::request::{Request, RequestStatus};
use crate::spec::{ngram_propose, Proposer, SpeculativeConfig};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_model_len: usize,
    pub num_blocks: usize,
    pub enable_prefix_caching: bool,
    /// Steps the executor keeps in flight (pipeline stages on different
    /// nodes). Above 1, each step takes about 1/depth of the requests, so
    /// the next step has requests of its own to run while this one is away.
    pub pipeline_depth: usize,
    /// Draft tokens for decodes (`--speculative-config`); `None`: one token
    /// per decode.
    pub speculative: Option<SpeculativeConfig>,
}

/// Counters since start, for `/metrics` and for tests that must see what was
/// computed rather than guess it from timings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    pub steps: u64,
    /// Prompt tokens submitted.
    pub prompt_tokens: u64,
    /// Tokens whose KV was computed (prefill chunks and decodes).
    pub computed_tokens: u64,
    /// Prompt tokens served from the prefix cache instead of computed.
    pub prefix_cache_hit_tokens: u64,
    pub generated_tokens: u64,
    pub preemptions: u64,
    /// Speculative decoding: decodes that carried drafts, their draft
    /// tokens, those the model accepted, and the accepted at each draft
    /// position (vLLM's `spec_decode_*` counters).
    pub spec_drafts: u64,
    pub spec_draft_tokens: u64,
    pub spec_accepted_tokens: u64,
    pub spec_accepted_per_pos: Vec<u64>,
}

/// What one sampled token did to its request.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestUpdate {
    pub req_id: RequestId,
    pub token_id: TokenId,
    pub logprobs: Option<Logprobs>,
    /// Set when this token ended the request (the token is a stop token when
    /// the reason is `Stop`).
    pub finished: Option<FinishReason>,
    /// Prompt tokens that came from the prefix cache.
    pub num_cached_tokens: usize,
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    kv: KvCacheManager,
    requests: HashMap<RequestId, Request>,
    waiting: VecDeque<RequestId>,
    running: Vec<RequestId>,
    /// Requests the stages hold state for that ended or were preempted since
    /// the last step.
    finished_req_ids: Vec<RequestId>,
    next_step_id: u64,
    stats: SchedulerStats,
    /// Steps handed to the stages and not yet answered, oldest first, with
    /// the requests each computes. With pipeline parallelism several are in
    /// flight at once, on disjoint requests.
    steps_in_flight: VecDeque<(u64, Vec<RequestId>)>,
    /// How many steps in flight compute each request.
    in_flight: HashMap<RequestId, usize>,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        assert!(cfg.num_blocks > 0, "the KV cache needs at least one block");
        let stats = SchedulerStats {
            spec_accepted_per_pos: vec![
                0;
                cfg.speculative
                    .as_ref()
                    .map_or(0, |c| c.num_speculative_tokens)
            ],
            ..Default::default()
        };
        Self {
            kv: KvCacheManager::new(cfg.num_blocks, cfg.enable_prefix_caching),
            cfg,
            requests: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            finished_req_ids: Vec::new(),
            next_step_id: 0,
            stats,
            steps_in_flight: VecDeque::new(),
            in_flight: HashMap::new(),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &SchedulerStats {
        &self.stats
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.kv.num_free_blocks()
    }

    pub fn request(&self, id: RequestId) -> Option<&Request> {
        self.requests.get(&id)
    }

    pub fn has_unfinished(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// True when a step must run even with nothing to compute, to tell the
    /// stages which requests to drop.
    pub fn has_work(&self) -> bool {
        self.has_unfinished() || !self.finished_req_ids.is_empty()
    }

    /// Queues a request. The caller has checked that its prompt plus
    /// `max_tokens` fits `max_model_len` and that the prompt fits the cache.
    pub fn add_request(&mut self, req: Request) {
        assert!(!req.token_ids.is_empty(), "a request needs a prompt");
        self.stats.prompt_tokens += req.num_prompt_tokens as u64;
        self.waiting.push_back(req.id);
        self.requests.insert(req.id, req);
    }

    /// Ends requests from outside (stop strings, aborts); the engine tells the
    /// client why. Unknown ids are ignored.
    pub fn finish_requests(&mut self, ids: &[RequestId]) {
        for &id in ids {
            if self.requests.contains_key(&id) {
                self.finish(id);
            }
        }
    }

    /// Picks the next step's work under the token budget: running requests
    /// first (decodes and unfinished prefill chunks), then waiting ones.
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut out = SchedulerOutput {
            step_id: self.next_step_id,
            finished_req_ids: std::mem::take(&mut self.finished_req_ids),
            ..Default::default()
        };
        self.next_step_id += 1;
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut preempted = false;
        let mut seqs_left = match self.cfg.pipeline_depth {
            0 | 1 => usize::MAX,
            d => (self.running.len() + self.waiting.len()).div_ceil(d).max(1),
        };
        let spec = self.cfg.speculative.clone().filter(|c| {
            c.disable_by_batch_size
                .is_none_or(|b| self.running.len() < b)
        });

        let mut i = 0;
        while i < self.running.len() && budget > 0 && seqs_left > 0 {
            let id = self.running[i];
            let req = &self.requests[&id];
            // Zero while a step in flight computes it (drafts included).
            let n = req
                .num_tokens()
                .saturating_sub(req.num_computed_tokens)
                .min(budget);
            if n == 0 {
                i += 1;
                continue;
            }
            // A draft model's proposals hold for this step only.
            let proposed = std::mem::take(
                &mut self
                    .requests
                    .get_mut(&id)
                    .expect("running request exists")
                    .draft_token_ids,
            );
            let req = &self.requests[&id];
            let mut drafts = match &spec {
                Some(c) if n == 1 && req.speculate => {
                    // Room for the drafts and the model's own token after
                    // them, within every limit of the request.
                    let limit = (budget - 1)
                        .min(req.max_tokens.saturating_sub(req.num_output_tokens() + 1))
                        .min(self.cfg.max_model_len.saturating_sub(req.num_tokens() + 1))
                        .min(c.num_speculative_tokens);
                    match &c.proposer {
                        Proposer::Ngram {
                            prompt_lookup_min: min,
                            prompt_lookup_max: max,
                        } => ngram_propose(&req.token_ids, limit, *min, *max),
                        Proposer::DraftModel(_) => {
                            let mut d = proposed;
                            d.truncate(limit);
                            d
                        }
                    }
                }
                _ => Vec::new(),
            };
            // A draft model writes its own drafts' KV past the step's tokens.
            let mut lookahead = self.draft_lookahead();
            // Make room, taking blocks from the newest running requests.
            let scheduled = loop {
                let req = &self.requests[&id];
                let want = n + drafts.len() + lookahead;
                if self
                    .kv
                    .allocate_slots(id, &req.token_ids, req.num_computed_tokens, want, &[])
                    .is_some()
                {
                    break true;
                }
                // Drafts are given up before anything is preempted for them.
                if !drafts.is_empty() || lookahead > 0 {
                    drafts.clear();
                    lookahead = 0;
                    continue;
                }
                // Never a request a step in flight computes: its blocks are
                // being written. With none left to take, wait for the steps.
                let Some(pos) = self
                    .running
                    .iter()
                    .rposition(|r| !self.in_flight.contains_key(r))
                else {
                    break false;
                };
                let victim = self.running.remove(pos);
                self.preempt(victim, &mut out);
                preempted = true;
                if victim == id {
                    break false;
                }
            };
            if !scheduled {
                break;
            }
            let n = n + drafts.len();
            self.emit(id, n, drafts, &mut out);
            budget -= n;
            seqs_left -= 1;
            i += 1;
        }

        // Admitting new work right after preempting would only thrash.
        while !preempted
            && budget > 0
            && seqs_left > 0
            && self.running.len() < self.cfg.max_num_seqs
            && !self.waiting.is_empty()
        {
            let id = self.waiting[0];
            let req = &self.requests[&id];
            let (hits, num_hit) = self.kv.get_computed_blocks(id, &req.token_ids);
            let n = (req.num_tokens() - num_hit).min(budget);
            // Room for the first drafts when the prompt ends in this step,
            // if the cache has it.
            let lookahead = match self.draft_lookahead() {
                l if num_hit + n == req.num_tokens() => l,
                _ => 0,
            };
            let allocated = [lookahead, 0].into_iter().any(|extra| {
                self.kv
                    .allocate_slots(id, &req.token_ids, num_hit, n + extra, &hits)
                    .is_some()
            });
            if !allocated {
                break;
            }
            self.waiting.pop_front();
            let req = self.requests.get_mut(&id).expect("waiting request exists");
            // A resumed request finding its own earlier blocks is not a prompt cache hit.
            if req.status == RequestStatus::Waiting {
                req.num_cached_tokens = num_hit.min(req.num_prompt_tokens);
                self.stats.prefix_cache_hit_tokens += req.num_cached_tokens as u64;
            }
            req.status = RequestStatus::Running;
            req.num_computed_tokens = num_hit;
            self.running.push(id);
            self.emit(id, n, Vec::new(), &mut out);
            budget -= n;
            seqs_left -= 1;
        }

        out.total_num_scheduled_tokens = self.cfg.max_num_batched_tokens - budget;
        self.stats.computed_tokens += out.total_num_scheduled_tokens as u64;
        if out.total_num_scheduled_tokens > 0 {
            self.stats.steps += 1;
        }
        // An empty step is never run, so it never lands.
        if !out.is_empty() {
            let ids: Vec<RequestId> = out.num_scheduled_tokens.iter().map(|(id, _)| *id).collect();
            for id in &ids {
                *self.in_flight.entry(*id).or_default() += 1;
            }
            self.steps_in_flight.push_back((out.step_id, ids));
        }
        out
    }

    /// KV slots past a decode's tokens that a draft model writes while it
    /// proposes (its own drafts but the last); 0 for n-gram drafts.
    fn draft_lookahead(&self) -> usize {
        match &self.cfg.speculative {
            Some(c) if c.draft_model().is_some() => c.num_speculative_tokens,
            _ => 0,
        }
    }

    /// Steps scheduled and not yet answered (by `update_from_output` or
    /// `step_failed`).
    pub fn num_steps_in_flight(&self) -> usize {
        self.steps_in_flight.len()
    }

    /// Marks step `step_id` answered: its requests may be preempted again.
    fn land(&mut self, step_id: u64) {
        let Some(pos) = self.steps_in_flight.iter().position(|(s, _)| *s == step_id) else {
            return;
        };
        let (_, ids) = self.steps_in_flight.remove(pos).expect("found above");
        for id in ids {
            if let Some(n) = self.in_flight.get_mut(&id) {
                *n -= 1;
                if *n == 0 {
                    self.in_flight.remove(&id);
                }
            }
        }
    }

    /// Undoes what a step that failed to run promised: the blocks it was to
    /// fill hold no valid KV, so no prefix may be served from the cache, and
    /// the stages must still be told what it was to drop.
    pub fn step_failed(&mut self, out: &SchedulerOutput) {
        self.land(out.step_id);
        self.kv.reset_prefix_cache();
        self.finished_req_ids.extend(&out.finished_req_ids);
    }

    /// After a node was lost and the stages were reset: forgets every step
    /// in flight and sends every running request back to the front of the
    /// queue, to be recomputed from its prompt plus the tokens it has
    /// generated (preemption by recompute, for all at once). No prefix may
    /// be served from the cache: the replaced node holds none of it. Returns
    /// (requests to recompute, their tokens).
    pub fn recompute_all(&mut self) -> (usize, usize) {
        self.steps_in_flight.clear();
        self.in_flight.clear();
        // The stages were reset: they hold no request to drop.
        self.finished_req_ids.clear();
        self.kv.reset_prefix_cache();
        let running = std::mem::take(&mut self.running);
        let mut tokens = 0;
        // In reverse, so the queue keeps their order ahead of the waiting.
        for &id in running.iter().rev() {
            self.kv.free(id);
            let req = self.requests.get_mut(&id).expect("running request exists");
            req.status = RequestStatus::Preempted;
            req.num_computed_tokens = 0;
            req.num_blocks_sent = 0;
            req.num_tokens_sent = None;
            req.num_drafts_in_flight = 0;
            req.draft_token_ids.clear();
            tokens += req.num_tokens();
            self.waiting.push_front(id);
        }
        for id in &self.waiting {
            // A waiting request the stages were told of (none today) would
            // need telling again.
            if let Some(r) = self.requests.get_mut(id) {
                r.num_tokens_sent = None;
                r.num_blocks_sent = 0;
            }
        }
        (running.len(), tokens)
    }

    /// Applies a step's sampled tokens: appends them, ends requests that hit a
    /// stop token or a length limit, and frees their blocks. A request with
    /// drafts gets the accepted ones and one more; the KV computed for the
    /// rejected is overwritten when real tokens take their positions.
    pub fn update_from_output(&mut self, result: &StepResult) -> Vec<RequestUpdate> {
        self.land(result.step_id);
        let mut updates = Vec::with_capacity(result.sampled.len());
        for group in result.sampled.chunk_by(|a, b| a.req_id == b.req_id) {
            // A request aborted while its step was in flight is simply dropped.
            let Some(req) = self.requests.get_mut(&group[0].req_id) else {
                continue;
            };
            if req.status != RequestStatus::Running {
                continue;
            }
            let drafts = std::mem::take(&mut req.num_drafts_in_flight);
            let group = &group[..group.len().min(drafts + 1)];
            if drafts > 0 {
                let accepted = group.len() - 1;
                req.num_computed_tokens -= drafts - accepted;
                let st = &mut self.stats;
                st.spec_drafts += 1;
                st.spec_draft_tokens += drafts as u64;
                st.spec_accepted_tokens += accepted as u64;
                for n in st.spec_accepted_per_pos.iter_mut().take(accepted) {
                    *n += 1;
                }
            }
            for s in group {
                if self.append(s, &mut updates) {
                    break;
                }
            }
        }
        // A draft model's proposals, for the next step of requests still running.
        for (id, drafts) in &result.draft_token_ids {
            if let Some(req) = self.requests.get_mut(id) {
                if req.status == RequestStatus::Running {
                    req.draft_token_ids.clone_from(drafts);
                }
            }
        }
        updates
    }

    /// Appends one sampled token to its running request; true when it ended
    /// the request.
    fn append(&mut self, s: &SampledToken, updates: &mut Vec<RequestUpdate>) -> bool {
        let req = self.requests.get_mut(&s.req_id).expect("a running request");
        req.token_ids.push(s.token_id);
        self.stats.generated_tokens += 1;
        let finished = if req.stop_token_ids.contains(&s.token_id) {
            Some(FinishReason::Stop)
        } else if req.num_output_tokens() >= req.max_tokens
            || req.num_tokens() >= self.cfg.max_model_len
        {
            Some(FinishReason::Length)
        } else {
            None
        };
        let num_cached_tokens = req.num_cached_tokens;
        if finished.is_some() {
            self.finish(s.req_id);
        }
        updates.push(RequestUpdate {
            req_id: s.req_id,
            token_id: s.token_id,
            logprobs: s.logprobs.clone(),
            finished,
            num_cached_tokens,
        });
        finished.is_some()
    }

    /// Adds `n` tokens of `id` to the step (its `drafts` last among them), as
    /// a new or a cached request.
    fn emit(&mut self, id: RequestId, n: usize, drafts: Vec<TokenId>, out: &mut SchedulerOutput) {
        let req = self
            .requests
            .get_mut(&id)
            .expect("scheduled request exists");
        let blocks = self.kv.blocks(id);
        match req.num_tokens_sent {
            None => out.scheduled_new_reqs.push(NewRequestData {
                req_id: id,
                token_ids: req.token_ids.clone(),
                num_prompt_tokens: req.num_prompt_tokens,
                sampling: req.sampling.clone(),
                block_ids: blocks.to_vec(),
                num_computed_tokens: req.num_computed_tokens,
            }),
            Some(sent) => out.scheduled_cached_reqs.push(CachedRequestData {
                req_id: id,
                new_token_ids: req.token_ids[sent..].to_vec(),
                new_block_ids: blocks[req.num_blocks_sent..].to_vec(),
                num_computed_tokens: req.num_computed_tokens,
            }),
        }
        req.num_tokens_sent = Some(req.num_tokens());
        req.num_blocks_sent = blocks.len();
        // Counted now, so the next schedule sees the tokens as in progress.
        req.num_computed_tokens += n;
        req.num_drafts_in_flight = drafts.len();
        out.num_scheduled_tokens.push((id, n));
        if !drafts.is_empty() {
            out.scheduled_spec_decode_tokens.push((id, drafts));
        }
    }

    fn preempt(&mut self, id: RequestId, out: &mut SchedulerOutput) {
        self.kv.free(id);
        let req = self
            .requests
            .get_mut(&id)
            .expect("preempted request exists");
        req.status = RequestStatus::Preempted;
        req.num_computed_tokens = 0;
        req.num_blocks_sent = 0;
        req.draft_token_ids.clear();
        if req.num_tokens_sent.take().is_some() {
            out.finished_req_ids.push(id);
        }
        self.waiting.push_front(id);
        self.stats.preemptions += 1;
    }

    fn finish(&mut self, id: RequestId) {
        let req = self.requests.remove(&id).expect("finished request exists");
        match req.status {
            RequestStatus::Running => self.running.retain(|r| *r != id),
            RequestStatus::Waiting | RequestStatus::Preempted => self.waiting.retain(|r| *r != id),
            RequestStatus::Finished(_) => {}
        }
        self.kv.remove(id);
        if req.num_tokens_sent.is_some() {
            self.finished_req_ids.push(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_types::{SamplingParams, BLOCK_SIZE};

    fn cfg(num_blocks: usize) -> SchedulerConfig {
        SchedulerConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: 64,
            max_model_len: 1024,
            num_blocks,
            enable_prefix_caching: true,
            pipeline_depth: 1,
            speculative: None,
        }
    }

    fn req(id: RequestId, prompt_len: usize, max_tokens: usize) -> Request {
        let prompt = (0..prompt_len as u32)
            .map(|t| t + 100 * id as u32)
            .collect();
        Request::new(id, prompt, SamplingParams::greedy(), max_tokens, vec![2])
    }

    /// Plays the stages: one sampled token per request that reached its end.
    fn step(s: &mut Scheduler, token: TokenId) -> (SchedulerOutput, Vec<RequestUpdate>) {
        let out = s.schedule();
        let sampled = out
            .num_scheduled_tokens
            .iter()
            .filter(|(id, _)| {
                let r = s.request(*id).unwrap();
                r.num_computed_tokens == r.num_tokens()
            })
            .map(|(id, _)| SampledToken {
                req_id: *id,
                token_id: token,
                logprobs: None,
            })
            .collect();
        let updates = s.update_from_output(&StepResult {
            step_id: out.step_id,
            sampled,
            ..Default::default()
        });
        (out, updates)
    }

    #[test]
    fn long_prompts_are_prefilled_in_chunks_under_the_token_budget() {
        let mut s = Scheduler::new(cfg(64));
        s.add_request(req(1, 100, 4));
        let (out, ups) = step(&mut s, 5);
        assert_eq!(out.num_scheduled_tokens, vec![(1, 64)]);
        assert!(ups.is_empty(), "a partial prefill samples nothing");
        let (out, ups) = step(&mut s, 5);
        assert_eq!(out.num_scheduled_tokens, vec![(1, 36)]);
        assert_eq!(out.scheduled_cached_reqs[0].num_computed_tokens, 64);
        assert_eq!(ups.len(), 1);
        let (out, _) = step(&mut s, 5);
        assert_eq!(out.num_scheduled_tokens, vec![(1, 1)]);
        assert_eq!(out.scheduled_cached_reqs[0].new_token_ids, vec![5]);
    }

    #[test]
    fn decodes_and_prefill_chunks_share_a_step() {
        let mut s = Scheduler::new(cfg(64));
        s.add_request(req(1, 10, 8));
        step(&mut s, 5);
        s.add_request(req(2, 100, 8));
        let (out, _) = step(&mut s, 5);
        assert_eq!(out.num_scheduled_tokens, vec![(1, 1), (2, 63)]);
        assert_eq!(out.total_num_scheduled_tokens, 64);
    }

    #[test]
    fn max_num_seqs_bounds_the_running_set() {
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_seqs: 2,
            ..cfg(64)
        });
        for id in 1..=3 {
            s.add_request(req(id, 4, 8));
        }
        let (out, _) = step(&mut s, 5);
        assert_eq!(out.num_scheduled_tokens.len(), 2);
        assert_eq!(s.num_waiting(), 1);
    }

    #[test]
    fn stop_tokens_and_max_tokens_finish_and_free() {
        let mut s = Scheduler::new(cfg(8));
        s.add_request(req(1, 4, 2));
        s.add_request(req(2, 4, 10));
        let (_, ups) = step(&mut s, 7);
        assert!(ups.iter().all(|u| u.finished.is_none()));
        let out = s.schedule();
        let r = s.update_from_output(&StepResult {
            step_id: out.step_id,
            sampled: vec![
                SampledToken {
                    req_id: 1,
                    token_id: 7,
                    logprobs: None,
                },
                SampledToken {
                    req_id: 2,
                    token_id: 2,
                    logprobs: None,
                },
            ],
            ..Default::default()
        });
        assert_eq!(r[0].finished, Some(FinishReason::Length));
        assert_eq!(r[1].finished, Some(FinishReason::Stop));
        assert!(!s.has_unfinished());
        assert_eq!(s.num_free_blocks(), 8);
        let out = s.schedule();
        let mut f = out.finished_req_ids.clone();
        f.sort();
        assert_eq!(f, vec![1, 2], "stages are told to drop both");
    }

    #[test]
    fn a_shared_prefix_is_not_recomputed() {
        let mut s = Scheduler::new(cfg(64));
        let prompt: Vec<TokenId> = (0..40).collect();
        s.add_request(Request::new(
            1,
            prompt.clone(),
            SamplingParams::greedy(),
            1,
            vec![],
        ));
        step(&mut s, 9);
        let mut p2 = prompt[..35].to_vec();
        p2.extend([77, 78]);
        s.add_request(Request::new(2, p2, SamplingParams::greedy(), 1, vec![]));
        let (out, _) = step(&mut s, 9);
        assert_eq!(out.scheduled_new_reqs[0].num_computed_tokens, 32);
        assert_eq!(out.num_scheduled_tokens, vec![(2, 5)]);
        assert_eq!(s.stats().prefix_cache_hit_tokens, 32);
    }

    #[test]
    fn running_out_of_blocks_preempts_the_newest_and_resumes_it() {
        // 4 blocks = 64 tokens; two requests that grow to 50 tokens each do not fit together.
        let mut s = Scheduler::new(SchedulerConfig {
            enable_prefix_caching: false,
            ..cfg(4)
        });
        s.add_request(req(1, 30, 20));
        s.add_request(req(2, 30, 20));
        let mut preempted_seen = false;
        let mut done = 0;
        for _ in 0..400 {
            if !s.has_unfinished() {
                break;
            }
            let (out, ups) = step(&mut s, 5);
            if out.finished_req_ids.contains(&2) && s.request(2).is_some() {
                preempted_seen = true;
            }
            if let Some(n) = out.scheduled_new_reqs.iter().find(|n| n.req_id == 2) {
                // A resumed request carries the tokens it had generated.
                assert!(n.token_ids.len() >= 30);
                assert_eq!(n.num_prompt_tokens, 30);
            }
            done += ups.iter().filter(|u| u.finished.is_some()).count();
        }
        assert!(preempted_seen, "request 2 must have been preempted");
        assert_eq!(done, 2);
        assert!(s.stats().preemptions > 0);
        assert_eq!(s.num_free_blocks(), 4);
    }

    #[test]
    fn aborting_a_waiting_or_running_request_frees_everything() {
        let mut s = Scheduler::new(cfg(8));
        s.add_request(req(1, 20, 8));
        step(&mut s, 5);
        s.add_request(req(2, 20, 8));
        s.finish_requests(&[1, 2]);
        assert!(!s.has_unfinished());
        assert_eq!(s.num_free_blocks(), 8);
        let out = s.schedule();
        assert_eq!(
            out.finished_req_ids,
            vec![1],
            "only request 1 reached the stages"
        );
    }

    #[test]
    fn recompute_all_replays_every_running_request_from_its_tokens() {
        let mut s = Scheduler::new(cfg(64));
        s.add_request(req(1, 20, 8));
        s.add_request(req(2, 10, 8));
        step(&mut s, 7);
        step(&mut s, 8);
        // A step in flight when the node was lost is forgotten.
        assert!(!s.schedule().is_empty());
        let (replayed, tokens) = s.recompute_all();
        assert_eq!((replayed, tokens), (2, 22 + 12));
        assert_eq!(s.num_running(), 0);
        assert_eq!(s.num_steps_in_flight(), 0);
        let out = s.schedule();
        assert!(out.finished_req_ids.is_empty(), "the stages were reset");
        // Both come back as new requests holding prompt + generated tokens,
        // in their old order, computed from scratch (no prefix from cache).
        let ids: Vec<_> = out.scheduled_new_reqs.iter().map(|r| r.req_id).collect();
        assert_eq!(ids, [1, 2]);
        for r in &out.scheduled_new_reqs {
            assert_eq!(r.num_computed_tokens, 0);
            assert_eq!(&r.token_ids[r.num_prompt_tokens..], &[7, 8]);
        }
        assert_eq!(out.total_num_scheduled_tokens, 22 + 12);
    }

    #[test]
    fn a_failed_step_leaves_no_prefix_to_reuse() {
        let mut s = Scheduler::new(cfg(16));
        let prompt: Vec<TokenId> = (0..40).collect();
        s.add_request(Request::new(
            1,
            prompt.clone(),
            SamplingParams::greedy(),
            4,
            vec![],
        ));
        let out = s.schedule();
        s.step_failed(&out);
        s.finish_requests(&[1]);
        s.add_request(Request::new(2, prompt, SamplingParams::greedy(), 4, vec![]));
        let out = s.schedule();
        assert_eq!(
            out.scheduled_new_reqs[0].num_computed_tokens, 0,
            "nothing was computed"
        );
        assert_eq!(out.finished_req_ids, vec![1]);
    }

    #[test]
    fn steps_in_flight_take_disjoint_requests_and_are_never_preempted() {
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_batched_tokens: 16,
            ..cfg(64)
        });
        s.add_request(req(1, 16, 8));
        s.add_request(req(2, 16, 8));
        // Step A prefills request 1 (the budget holds one prompt) ...
        let a = s.schedule();
        assert_eq!(a.num_scheduled_tokens, vec![(1, 16)]);
        // ... and while it is in flight, step B takes request 2 only: 1 waits
        // for its sampled token.
        let b = s.schedule();
        assert_eq!(b.num_scheduled_tokens, vec![(2, 16)]);
        assert_eq!(s.num_steps_in_flight(), 2);
        // Nothing else can run until a step lands.
        assert!(s.schedule().is_empty());
        let land = |s: &mut Scheduler, out: &SchedulerOutput, id| {
            s.update_from_output(&StepResult {
                step_id: out.step_id,
                sampled: vec![SampledToken {
                    req_id: id,
                    token_id: 7,
                    logprobs: None,
                }],
                ..Default::default()
            })
        };
        assert_eq!(land(&mut s, &a, 1).len(), 1);
        assert_eq!(s.schedule().num_scheduled_tokens, vec![(1, 1)]);
        assert_eq!(land(&mut s, &b, 2).len(), 1);
        assert_eq!(s.num_steps_in_flight(), 1);
    }

    #[test]
    fn a_deep_pipeline_splits_the_requests_between_steps() {
        let mut s = Scheduler::new(SchedulerConfig {
            pipeline_depth: 2,
            ..cfg(64)
        });
        for id in 1..=4 {
            s.add_request(req(id, 8, 8));
        }
        let a = s.schedule();
        let b = s.schedule();
        let ids = |o: &SchedulerOutput| {
            o.num_scheduled_tokens
                .iter()
                .map(|x| x.0)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&a), vec![1, 2]);
        assert_eq!(ids(&b), vec![3, 4]);
    }

    #[test]
    fn a_request_in_flight_is_not_preempted_for_blocks() {
        // Two blocks, one per request. Request 1 needs a second block while
        // request 2 (the newest, the usual victim) is in flight.
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_batched_tokens: 16,
            ..cfg(2)
        });
        s.add_request(req(1, 16, 8));
        s.add_request(req(2, 16, 8));
        let a = s.schedule();
        let b = s.schedule();
        assert_eq!(b.num_scheduled_tokens, vec![(2, 16)]);
        s.update_from_output(&StepResult {
            step_id: a.step_id,
            sampled: vec![SampledToken {
                req_id: 1,
                token_id: 7,
                logprobs: None,
            }],
            ..Default::default()
        });
        let c = s.schedule();
        assert!(c.num_scheduled_tokens.is_empty(), "{c:?}");
        // Request 1 gave way, not request 2, whose step still lands.
        assert_eq!(s.request(1).unwrap().num_computed_tokens, 0);
        let landed = s.update_from_output(&StepResult {
            step_id: b.step_id,
            sampled: vec![SampledToken {
                req_id: 2,
                token_id: 7,
                logprobs: None,
            }],
            ..Default::default()
        });
        assert_eq!(landed.len(), 1);
    }

    fn spec_cfg(num_blocks: usize, k: usize) -> SchedulerConfig {
        SchedulerConfig {
            speculative: Some(SpeculativeConfig::ngram(k, 1, 2)),
            ..cfg(num_blocks)
        }
    }

    fn land(s: &mut Scheduler, out: &SchedulerOutput, tokens: &[(RequestId, TokenId)]) {
        let sampled = tokens
            .iter()
            .map(|&(req_id, token_id)| SampledToken {
                req_id,
                token_id,
                logprobs: None,
            })
            .collect();
        s.update_from_output(&StepResult {
            step_id: out.step_id,
            sampled,
            ..Default::default()
        });
    }

    #[test]
    fn drafts_ride_with_a_decode_and_the_rejected_are_taken_back() {
        let mut s = Scheduler::new(spec_cfg(16, 3));
        s.add_request(Request::new(
            1,
            vec![1, 2, 3, 4, 1, 2],
            SamplingParams::greedy(),
            20,
            vec![],
        ));
        // A prefill carries no drafts.
        let (out, _) = step(&mut s, 3);
        assert!(out.scheduled_spec_decode_tokens.is_empty());
        // "2 3" recurs: what followed it is proposed, after the last token.
        let out = s.schedule();
        assert_eq!(out.scheduled_spec_decode_tokens, vec![(1, vec![4, 1, 2])]);
        assert_eq!(out.num_scheduled_tokens, vec![(1, 4)]);
        assert_eq!(out.total_num_scheduled_tokens, 4);
        // While the step is away the request has nothing more to compute.
        assert!(s.schedule().num_scheduled_tokens.is_empty());
        // The model agreed with two drafts, then chose 9 over the third.
        land(&mut s, &out, &[(1, 4), (1, 1), (1, 9)]);
        let r = s.request(1).unwrap();
        assert_eq!(r.token_ids, [1, 2, 3, 4, 1, 2, 3, 4, 1, 9]);
        assert_eq!(
            r.num_computed_tokens, 9,
            "the rejected draft's KV is not counted"
        );
        let st = s.stats();
        assert_eq!(
            (
                st.spec_drafts,
                st.spec_draft_tokens,
                st.spec_accepted_tokens
            ),
            (1, 3, 2)
        );
        assert_eq!(st.spec_accepted_per_pos, [1, 1, 0]);
        assert_eq!(st.generated_tokens, 4);
        // The stages learn the three tokens; "9" never occurred, so no drafts.
        let out = s.schedule();
        assert_eq!(out.scheduled_cached_reqs[0].new_token_ids, [4, 1, 9]);
        assert_eq!(out.scheduled_cached_reqs[0].num_computed_tokens, 9);
        assert_eq!(out.num_scheduled_tokens, vec![(1, 1)]);
        assert!(out.scheduled_spec_decode_tokens.is_empty());
    }

    #[test]
    fn drafts_stay_within_the_budget_the_length_limits_and_the_blocks() {
        let prompt = || vec![1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3];
        let drafts = |s: &mut Scheduler| {
            step(s, 1);
            s.schedule()
                .scheduled_spec_decode_tokens
                .first()
                .map_or(0, |d| d.1.len())
        };
        // Up to k.
        let mut s = Scheduler::new(spec_cfg(16, 3));
        s.add_request(Request::new(
            1,
            prompt(),
            SamplingParams::greedy(),
            20,
            vec![],
        ));
        assert_eq!(drafts(&mut s), 3);
        // The output may grow by the drafts plus one token: 3 - 1 - 1.
        let mut s = Scheduler::new(spec_cfg(16, 3));
        s.add_request(Request::new(
            1,
            prompt(),
            SamplingParams::greedy(),
            3,
            vec![],
        ));
        assert_eq!(drafts(&mut s), 1);
        // The step's token budget: 3 tokens, so two drafts.
        let mut s = Scheduler::new(SchedulerConfig {
            max_num_batched_tokens: 3,
            ..spec_cfg(16, 3)
        });
        s.add_request(Request::new(
            1,
            prompt(),
            SamplingParams::greedy(),
            20,
            vec![],
        ));
        while s.request(1).unwrap().num_output_tokens() == 0 {
            step(&mut s, 1);
        }
        let out = s.schedule();
        assert_eq!(out.num_scheduled_tokens, vec![(1, 3)]);
        assert_eq!(out.scheduled_spec_decode_tokens, vec![(1, vec![2, 3])]);
        // One block of 16 holds the 16 tokens but not the drafts: they are
        // dropped, and nothing is preempted for them.
        let mut s = Scheduler::new(spec_cfg(1, 3));
        s.add_request(Request::new(
            1,
            prompt(),
            SamplingParams::greedy(),
            20,
            vec![],
        ));
        assert_eq!(drafts(&mut s), 0);
        assert_eq!(s.stats().preemptions, 0);
        // Not for a request that must not speculate, nor past the batch size.
        let mut s = Scheduler::new(spec_cfg(16, 3));
        let mut r = Request::new(1, prompt(), SamplingParams::greedy(), 20, vec![]);
        r.speculate = false;
        s.add_request(r);
        assert_eq!(drafts(&mut s), 0);
        let mut c = spec_cfg(16, 3);
        c.speculative.as_mut().unwrap().disable_by_batch_size = Some(1);
        let mut s = Scheduler::new(c);
        s.add_request(Request::new(
            1,
            prompt(),
            SamplingParams::greedy(),
            20,
            vec![],
        ));
        assert_eq!(drafts(&mut s), 0);
    }

    #[test]
    fn a_draft_models_proposals_ride_with_the_next_step_within_the_limits() {
        let mut c = spec_cfg(16, 3);
        c.speculative.as_mut().unwrap().proposer = Proposer::DraftModel("draft.gguf".into());
        let mut s = Scheduler::new(c);
        // 14 prompt tokens: the prefill's block has room for the token it
        // samples but not for the draft model's KV after it, so the
        // scheduler reserves a second block ahead.
        s.add_request(Request::new(
            1,
            (1..=14).collect(),
            SamplingParams::greedy(),
            8,
            vec![],
        ));
        let out = s.schedule();
        assert_eq!(out.scheduled_new_reqs[0].block_ids.len(), 2);
        let with = |token_id, drafts: Vec<TokenId>| StepResult {
            step_id: 0,
            sampled: vec![SampledToken {
                req_id: 1,
                token_id,
                logprobs: None,
            }],
            draft_token_ids: vec![(1, drafts)],
        };
        s.update_from_output(&StepResult {
            step_id: out.step_id,
            ..with(20, vec![21, 22, 23])
        });
        // No recurring n-gram here: the draft model's proposals are sent.
        let out = s.schedule();
        assert_eq!(
            out.scheduled_spec_decode_tokens,
            vec![(1, vec![21, 22, 23])]
        );
        assert_eq!(out.num_scheduled_tokens, vec![(1, 4)]);
        // Two accepted, then the model's 30 and new proposals, of which
        // `num_speculative_tokens` are sent.
        s.update_from_output(&StepResult {
            step_id: out.step_id,
            sampled: [21, 22, 30]
                .map(|token_id| SampledToken {
                    req_id: 1,
                    token_id,
                    logprobs: None,
                })
                .to_vec(),
            draft_token_ids: vec![(1, vec![31, 32, 33, 34])],
        });
        let out = s.schedule();
        assert_eq!(
            out.scheduled_spec_decode_tokens,
            vec![(1, vec![31, 32, 33])]
        );
        // Proposals are used once: after a step without new ones, none.
        s.update_from_output(&StepResult {
            step_id: out.step_id,
            draft_token_ids: vec![],
            ..with(40, vec![])
        });
        let out = s.schedule();
        assert_eq!(out.num_scheduled_tokens, vec![(1, 1)]);
        assert!(out.scheduled_spec_decode_tokens.is_empty());
    }

    #[test]
    fn a_stop_token_among_accepted_drafts_ends_the_request_there() {
        let mut s = Scheduler::new(spec_cfg(16, 3));
        s.add_request(Request::new(
            1,
            vec![1, 2, 3, 4, 1, 2],
            SamplingParams::greedy(),
            20,
            vec![4],
        ));
        step(&mut s, 3);
        let out = s.schedule();
        assert_eq!(out.scheduled_spec_decode_tokens, vec![(1, vec![4, 1, 2])]);
        let updates = s.update_from_output(&StepResult {
            step_id: out.step_id,
            sampled: [4, 1, 2, 7]
                .map(|token_id| SampledToken {
                    req_id: 1,
                    token_id,
                    logprobs: None,
                })
                .to_vec(),
            ..Default::default()
        });
        assert_eq!(updates.len(), 1);
        assert_eq!(updates[0].finished, Some(FinishReason::Stop));
        assert!(!s.has_unfinished());
        assert_eq!(s.num_free_blocks(), 16);
        assert_eq!(
            s.stats().generated_tokens,
            2,
            "the prefill's token and the stop"
        );
    }

    #[test]
    fn block_tables_grow_as_decodes_cross_block_boundaries() {
        let mut s = Scheduler::new(cfg(8));
        s.add_request(req(1, BLOCK_SIZE, 8));
        let (out, _) = step(&mut s, 5);
        assert_eq!(out.scheduled_new_reqs[0].block_ids.len(), 1);
        let (out, _) = step(&mut s, 5);
        assert_eq!(out.scheduled_cached_reqs[0].new_block_ids.len(), 1);
        let (out, _) = step(&mut s, 5);
        assert!(out.scheduled_cached_reqs[0].new_block_ids.is_empty());
    }
}
