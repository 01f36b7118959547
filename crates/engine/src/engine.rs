//! The leader loop: `schedule → execute → update` on a dedicated thread, fed
//! by a channel of commands, streaming each request's output on its own
//! channel (vLLM's `EngineCore.step`, TEI's backend thread).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use strata_sched::{Request, Scheduler, SchedulerConfig, SchedulerStats, SpeculativeConfig};
use strata_types::{
    FinishReason, Logprobs, RequestId, SamplingParams, SchedulerOutput, StepMasks, StepResult,
    TokenId, BLOCK_SIZE,
};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::detokenizer::IncrementalDetokenizer;
use crate::error::{EngineError, Result};
use crate::executor::Executor;
use crate::metrics::{RequestMetrics, RequestTimes};
use crate::structured::Guide;
use crate::tokenizer::Tokenizer;

/// Limits the engine is started with.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_model_len: usize,
    pub num_blocks: usize,
    pub enable_prefix_caching: bool,
    /// Requests admitted (waiting or running) before new ones are refused.
    pub max_pending_requests: usize,
    /// How long requests wait for a lost node to come back before they end
    /// with an error (`--recovery-timeout`).
    pub recovery_timeout: Duration,
    /// Draft tokens for decodes (`--speculative-config`).
    pub speculative: Option<SpeculativeConfig>,
}

/// One sequence to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_token_ids: Vec<TokenId>,
    pub sampling: SamplingParams,
    /// `None`: up to the context length.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<TokenId>,
    pub ignore_eos: bool,
    pub skip_special_tokens: bool,
    /// A structured output's matcher, fresh for this sequence.
    pub guide: Option<Guide>,
}

/// What a request produced in one step. The last one has `finish` set.
#[derive(Debug, Clone, Default)]
pub struct RequestOutput {
    pub text: String,
    pub token_ids: Vec<TokenId>,
    /// One entry per token in `token_ids`, when logprobs were asked for.
    pub logprobs: Vec<Logprobs>,
    pub finish: Option<FinishReason>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
}

pub type OutputStream = UnboundedReceiver<std::result::Result<RequestOutput, EngineError>>;
type OutputSender = UnboundedSender<std::result::Result<RequestOutput, EngineError>>;

/// A snapshot of the engine's counters, for `/metrics` and tests.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    pub sched: SchedulerStats,
    pub num_running: usize,
    pub num_waiting: usize,
    pub num_blocks: usize,
    pub num_free_blocks: usize,
    pub num_pending: usize,
    /// Bytes of activations this node sent down the pipeline.
    pub activation_bytes_sent: u64,
    /// Recoveries from a lost node, and what they cost.
    pub recovery: RecoveryStats,
    /// Token masks of structured outputs computed, and the seconds spent.
    pub masks_computed: u64,
    pub mask_seconds: f64,
}

/// What recovering from lost nodes has cost so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecoveryStats {
    /// Times the cluster came back after a node was lost.
    pub recoveries: u64,
    /// Seconds the engine spent paused, waiting for lost nodes.
    pub seconds: f64,
    /// Running requests recomputed after a recovery.
    pub requests_replayed: u64,
    /// Tokens (prompt and generated) those requests recomputed.
    pub tokens_recomputed: u64,
}

enum Command {
    Add(RequestId, Box<GenerateRequest>, OutputSender),
    Abort(RequestId),
}

/// The cheap, cloneable front door to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    next_id: Arc<AtomicU64>,
    pending: Arc<AtomicUsize>,
    stats: Arc<Mutex<EngineStats>>,
    tokenizer: Arc<Tokenizer>,
    config: Arc<EngineConfig>,
    vocab_size: usize,
    alive: Arc<AtomicBool>,
    /// Updated in place by the engine thread as requests progress.
    request_metrics: Arc<Mutex<RequestMetrics>>,
    /// Why new requests are refused: a lost node outlasted the recovery
    /// timeout and has not come back.
    unavailable: Arc<Mutex<Option<String>>>,
}

impl EngineHandle {
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn shared_tokenizer(&self) -> Arc<Tokenizer> {
        self.tokenizer.clone()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The last step's counters, with the live count of pending requests.
    pub fn stats(&self) -> EngineStats {
        let mut s = self.stats.lock().expect("poisoned").clone();
        s.num_pending = self.pending.load(Ordering::SeqCst);
        s
    }

    /// Latency and length histograms and endings of the requests so far.
    pub fn request_metrics(&self) -> RequestMetrics {
        self.request_metrics.lock().expect("poisoned").clone()
    }

    /// True while the engine thread runs.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Checks and queues a request; its outputs arrive on the returned stream.
    /// Dropping the stream aborts the request within one step.
    pub fn generate(&self, req: GenerateRequest) -> Result<(RequestId, OutputStream)> {
        let prompt = req.prompt_token_ids.len();
        if prompt == 0 {
            return Err(EngineError::EmptyPrompt);
        }
        if let Some(&bad) = req
            .prompt_token_ids
            .iter()
            .find(|&&t| t as usize >= self.vocab_size)
        {
            return Err(EngineError::BadTokenId(bad));
        }
        let limit = self.config.max_model_len;
        let max_tokens = match req.max_tokens {
            Some(m) if prompt + m > limit => {
                return Err(EngineError::ContextLength {
                    max_model_len: limit,
                    prompt_tokens: prompt,
                    max_tokens: m,
                })
            }
            Some(m) => m,
            None if prompt >= limit => {
                return Err(EngineError::ContextLength {
                    max_model_len: limit,
                    prompt_tokens: prompt,
                    max_tokens: 1,
                })
            }
            None => limit - prompt,
        };
        let capacity = self.config.num_blocks * BLOCK_SIZE;
        if prompt + max_tokens > capacity {
            return Err(EngineError::KvCacheTooSmall {
                capacity,
                needed: prompt + max_tokens,
            });
        }
        if let Some(why) = &*self.unavailable.lock().expect("poisoned") {
            return Err(EngineError::Unavailable(why.clone()));
        }
        let cap = self.config.max_pending_requests;
        if self
            .pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < cap).then_some(n + 1)
            })
            .is_err()
        {
            return Err(EngineError::Overloaded(cap));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = unbounded_channel();
        let req = GenerateRequest {
            max_tokens: Some(max_tokens),
            ..req
        };
        if self.tx.send(Command::Add(id, Box::new(req), tx)).is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Stopped("the engine thread has exited".into()));
        }
        Ok((id, rx))
    }

    pub fn abort(&self, id: RequestId) {
        let _ = self.tx.send(Command::Abort(id));
    }
}

/// Starts the engine thread.
pub fn start_engine(
    config: EngineConfig,
    executor: Box<dyn Executor>,
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
) -> EngineHandle {
    let (tx, rx) = mpsc::channel();
    let handle = EngineHandle {
        tx,
        next_id: Arc::new(AtomicU64::new(0)),
        pending: Arc::new(AtomicUsize::new(0)),
        stats: Arc::new(Mutex::new(EngineStats::default())),
        tokenizer: tokenizer.clone(),
        config: Arc::new(config.clone()),
        vocab_size,
        alive: Arc::new(AtomicBool::new(true)),
        request_metrics: Arc::new(Mutex::new(RequestMetrics::new(config.max_model_len))),
        unavailable: Arc::new(Mutex::new(None)),
    };
    let sched = Scheduler::new(SchedulerConfig {
        max_num_seqs: config.max_num_seqs,
        max_num_batched_tokens: config.max_num_batched_tokens,
        max_model_len: config.max_model_len,
        num_blocks: config.num_blocks,
        enable_prefix_caching: config.enable_prefix_caching,
        pipeline_depth: executor.max_in_flight(),
        speculative: config.speculative.clone(),
    });
    let core = EngineCore {
        sched,
        executor,
        tokenizer,
        live: HashMap::new(),
        pending: handle.pending.clone(),
        stats: handle.stats.clone(),
        metrics: handle.request_metrics.clone(),
        recovery_timeout: config.recovery_timeout,
        recovery: None,
        recovered: RecoveryStats::default(),
        unavailable: handle.unavailable.clone(),
        masks_computed: 0,
        mask_seconds: 0.0,
    };
    core.publish_stats();
    let alive = handle.alive.clone();
    std::thread::Builder::new()
        .name("strata-engine".into())
        .spawn(move || {
            // Marks the engine dead however the loop ends, panics included.
            struct Alive(Arc<AtomicBool>);
            impl Drop for Alive {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::SeqCst);
                }
            }
            let _alive = Alive(alive);
            core.run(rx)
        })
        .expect("spawning the engine thread");
    handle
}

/// A request's leader-side state beyond what the scheduler holds.
struct Live {
    tx: OutputSender,
    detok: IncrementalDetokenizer,
    want_logprobs: bool,
    /// The structured output's matcher, advanced by every sampled token.
    guide: Option<Guide>,
    prompt_tokens: usize,
    completion_tokens: usize,
    times: RequestTimes,
}

impl Live {
    /// Records an ending that no sampled token brought (abort, error).
    fn end(&self, reason: Option<FinishReason>, metrics: &mut RequestMetrics) {
        let (prompt, generated) = (self.prompt_tokens, self.completion_tokens);
        self.times
            .end(Instant::now(), reason, prompt, generated, metrics);
    }
}

/// The engine paused for a lost node.
struct Recovery {
    since: Instant,
    cause: String,
    /// Why requests end and new ones are refused, once the recovery
    /// timeout has passed.
    expired: Option<String>,
    requests: usize,
    tokens: usize,
}

struct EngineCore {
    sched: Scheduler,
    executor: Box<dyn Executor>,
    tokenizer: Arc<Tokenizer>,
    live: HashMap<RequestId, Live>,
    pending: Arc<AtomicUsize>,
    stats: Arc<Mutex<EngineStats>>,
    metrics: Arc<Mutex<RequestMetrics>>,
    recovery_timeout: Duration,
    /// Set while the engine waits for a lost node.
    recovery: Option<Recovery>,
    recovered: RecoveryStats,
    unavailable: Arc<Mutex<Option<String>>>,
    masks_computed: u64,
    mask_seconds: f64,
}

/// How often a paused engine looks for its lost node.
const RECOVERY_POLL: Duration = Duration::from_millis(100);

impl EngineCore {
    /// Keeps up to the executor's depth of steps in flight: with pipeline
    /// stages on several nodes, step k+1 runs on the first stage while step
    /// k runs on the next (the scheduler gives them disjoint requests).
    fn run(mut self, rx: mpsc::Receiver<Command>) {
        let depth = self.executor.max_in_flight().max(1);
        let mut in_flight: VecDeque<SchedulerOutput> = VecDeque::new();
        loop {
            if self.recovery.is_some() {
                if !self.wait_for_recovery(&rx) {
                    return;
                }
                continue;
            }
            if in_flight.is_empty() && !self.sched.has_work() {
                match rx.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => return,
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                self.handle(cmd);
            }
            self.drop_disconnected();
            let scheduling = Instant::now();
            while in_flight.len() < depth {
                let mut out = self.sched.schedule();
                if out.is_empty() {
                    if in_flight.is_empty()
                        && self.sched.num_running() == 0
                        && self.sched.num_waiting() > 0
                    {
                        // Admission checks make this unreachable; never spin on it.
                        let ids: Vec<RequestId> = self.live.keys().copied().collect();
                        self.fail(&ids, || {
                            EngineError::Execution("the request does not fit the KV cache".into())
                        });
                    }
                    break;
                }
                out.structured_req_ids = self.constrained(&out);
                // The masks are computed while the step's forward pass runs.
                let submitted = self.executor.submit(&out).and_then(|()| {
                    if out.structured_req_ids.is_empty() {
                        return Ok(());
                    }
                    let masks = self.masks(&out);
                    self.executor.post_masks(masks)
                });
                match submitted {
                    Ok(()) => {
                        self.mark_scheduled(&out);
                        in_flight.push_back(out);
                    }
                    Err(e @ EngineError::NodeLost { .. }) => {
                        // (Pausing forgets this step with every other.)
                        self.pause(e, &mut in_flight);
                        break;
                    }
                    Err(e) => self.step_failed(&out, e),
                }
            }
            let scheduled = scheduling.elapsed();
            if let Some(out) = in_flight.pop_front() {
                let waiting = Instant::now();
                match self.executor.collect() {
                    Ok(result) => {
                        let waited = waiting.elapsed();
                        self.apply(&result);
                        // With the runner's line of the same step (worker side).
                        tracing::debug!(
                            target: "strata::step",
                            "engine step {}: scheduled and sent in {:.2} ms, waited {:.2} ms, \
                             applied in {:.2} ms",
                            out.step_id,
                            scheduled.as_secs_f64() * 1e3,
                            waited.as_secs_f64() * 1e3,
                            (waiting.elapsed() - waited).as_secs_f64() * 1e3
                        );
                    }
                    Err(e @ EngineError::NodeLost { .. }) => self.pause(e, &mut in_flight),
                    Err(e) => self.step_failed(&out, e),
                }
            }
            self.publish_stats();
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Add(id, r, tx) => {
                let mut r = *r;
                let mut stop_ids = r.stop_token_ids.clone();
                if !r.ignore_eos {
                    stop_ids.extend(&self.tokenizer.eos_token_ids);
                }
                if r.sampling.min_tokens > 0 {
                    // The sampler holds these back until min_tokens.
                    r.sampling.stop_token_ids = stop_ids.clone();
                }
                self.live.insert(
                    id,
                    Live {
                        tx,
                        detok: IncrementalDetokenizer::new(
                            &r.prompt_token_ids,
                            r.stop,
                            r.skip_special_tokens,
                        ),
                        want_logprobs: r.sampling.logprobs.is_some(),
                        guide: r.guide,
                        prompt_tokens: r.prompt_token_ids.len(),
                        completion_tokens: 0,
                        times: RequestTimes::new(Instant::now()),
                    },
                );
                let mut req = Request::new(
                    id,
                    r.prompt_token_ids,
                    r.sampling,
                    r.max_tokens.expect("resolved in generate"),
                    stop_ids,
                );
                // A structured output's mask covers one token per step.
                req.speculate = self.live[&id].guide.is_none();
                self.sched.add_request(req);
            }
            Command::Abort(id) => {
                if let Some(l) = self.live.remove(&id) {
                    self.sched.finish_requests(&[id]);
                    self.pending.fetch_sub(1, Ordering::SeqCst);
                    l.end(
                        Some(FinishReason::Abort),
                        &mut self.metrics.lock().expect("poisoned"),
                    );
                }
            }
        }
    }

    /// The step's requests whose output follows a structured output.
    fn constrained(&self, out: &SchedulerOutput) -> Vec<RequestId> {
        out.num_scheduled_tokens
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| {
                let guide = self.live.get(id).and_then(|l| l.guide.as_ref());
                guide.is_some_and(Guide::is_active)
            })
            .collect()
    }

    /// The token masks of the step's constrained requests.
    fn masks(&mut self, out: &SchedulerOutput) -> StepMasks {
        let started = Instant::now();
        let masks: Vec<_> = out
            .structured_req_ids
            .iter()
            .filter_map(|id| {
                let guide = self.live.get_mut(id)?.guide.as_mut()?;
                Some((*id, guide.mask()))
            })
            .collect();
        self.masks_computed += masks.len() as u64;
        self.mask_seconds += started.elapsed().as_secs_f64();
        StepMasks {
            step_id: out.step_id,
            masks,
        }
    }

    /// The requests of a step that just started (for their queue time).
    fn mark_scheduled(&mut self, out: &SchedulerOutput) {
        let now = Instant::now();
        let mut metrics = self.metrics.lock().expect("poisoned");
        for (id, _) in &out.num_scheduled_tokens {
            if let Some(live) = self.live.get_mut(id) {
                live.times.scheduled(now, &mut metrics);
            }
        }
    }

    /// Clients that went away free their blocks before the next step.
    fn drop_disconnected(&mut self) {
        let gone: Vec<RequestId> = self
            .live
            .iter()
            .filter(|(_, l)| l.tx.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.handle(Command::Abort(id));
        }
    }

    fn step_failed(&mut self, out: &SchedulerOutput, e: EngineError) {
        tracing::error!("step {} failed: {e}", out.step_id);
        self.sched.step_failed(out);
        let ids: Vec<RequestId> = out.num_scheduled_tokens.iter().map(|(id, _)| *id).collect();
        let msg = e.to_string();
        self.fail(&ids, || EngineError::Execution(msg.clone()));
    }

    /// Stops stepping until the lost node is back: the steps in flight are
    /// dropped, and every running request goes back to the queue, to be
    /// recomputed from its prompt and the tokens its client already has.
    fn pause(&mut self, cause: EngineError, in_flight: &mut VecDeque<SchedulerOutput>) {
        in_flight.clear();
        self.executor.abandon();
        let (requests, tokens) = self.sched.recompute_all();
        tracing::warn!(
            "{cause}; the engine pauses: {requests} running request(s) will be recomputed \
             ({tokens} tokens) and {} wait, for up to --recovery-timeout {} s",
            self.sched.num_waiting() - requests,
            self.recovery_timeout.as_secs()
        );
        self.recovery = Some(Recovery {
            since: Instant::now(),
            cause: cause.to_string(),
            expired: None,
            requests,
            tokens,
        });
        self.publish_stats();
    }

    /// One round of a paused engine: take commands, end what waited past
    /// the recovery timeout, and try to resume. False once the engine is
    /// told to stop.
    fn wait_for_recovery(&mut self, rx: &mpsc::Receiver<Command>) -> bool {
        match rx.recv_timeout(RECOVERY_POLL) {
            Ok(cmd) => self.handle(cmd),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return false,
        }
        while let Ok(cmd) = rx.try_recv() {
            self.handle(cmd);
        }
        self.drop_disconnected();
        let rec = self.recovery.as_mut().expect("paused");
        if rec.expired.is_none() && rec.since.elapsed() >= self.recovery_timeout {
            let why = format!(
                "{}, and the cluster did not recover within --recovery-timeout {} s",
                rec.cause,
                self.recovery_timeout.as_secs()
            );
            tracing::error!(
                "{why}: ending {} request(s); new ones get 503 until it is back",
                self.live.len()
            );
            *self.unavailable.lock().expect("poisoned") = Some(why.clone());
            rec.expired = Some(why);
        }
        // Requests that arrived just before the refusals began end too.
        if let Some(why) = rec.expired.clone() {
            let ids: Vec<RequestId> = self.live.keys().copied().collect();
            self.fail(&ids, || EngineError::Unavailable(why.clone()));
        }
        if self.executor.try_resume() {
            let rec = self.recovery.take().expect("paused");
            *self.unavailable.lock().expect("poisoned") = None;
            let paused = rec.since.elapsed().as_secs_f64();
            self.recovered.recoveries += 1;
            self.recovered.seconds += paused;
            if rec.expired.is_none() {
                self.recovered.requests_replayed += rec.requests as u64;
                self.recovered.tokens_recomputed += rec.tokens as u64;
            }
            tracing::info!(
                "the cluster is back after {paused:.1} s; {} request(s) resume",
                self.live.len()
            );
        }
        self.publish_stats();
        true
    }

    /// Streams a step's sampled tokens to their requests: one output per
    /// request, holding every token it got (several with speculation).
    fn apply(&mut self, result: &StepResult) {
        let updates = self.sched.update_from_output(result);
        let now = Instant::now();
        let mut metrics = self.metrics.lock().expect("poisoned");
        // Sent after the counters are published: a client that sees its
        // last token may read them.
        let mut outputs: Vec<(RequestId, OutputSender, RequestOutput)> =
            Vec::with_capacity(updates.len());
        for u in updates {
            let Some(live) = self.live.get_mut(&u.req_id) else {
                continue;
            };
            live.completion_tokens += 1;
            let mut finish = u.finished;
            let is_stop_token = finish == Some(FinishReason::Stop);
            let output = match outputs.last_mut() {
                Some((id, _, o)) if *id == u.req_id => o,
                _ => {
                    // Tokens that arrive together are one gap for the client.
                    live.times.token(now, &mut metrics);
                    outputs.push((u.req_id, live.tx.clone(), RequestOutput::default()));
                    &mut outputs.last_mut().expect("just pushed").2
                }
            };
            if !is_stop_token {
                // A complete structured output ends the sequence.
                let complete = live.guide.as_mut().is_some_and(|g| g.advance(u.token_id));
                if complete && finish.is_none() {
                    finish = Some(FinishReason::Stop);
                    self.sched.finish_requests(&[u.req_id]);
                }
                match live.detok.push(&self.tokenizer, u.token_id) {
                    Ok(true) => {
                        finish = Some(FinishReason::Stop);
                        self.sched.finish_requests(&[u.req_id]);
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!("request {}: detokenizing: {e}", u.req_id),
                }
                output.token_ids.push(u.token_id);
                if let (true, Some(lp)) = (live.want_logprobs, u.logprobs) {
                    output.logprobs.push(lp);
                }
            }
            if finish.is_some() && live.detok.flush(&self.tokenizer).unwrap_or(false) {
                finish = Some(FinishReason::Stop);
            }
            output
                .text
                .push_str(&live.detok.take_delta(finish.is_some()));
            output.finish = finish;
            output.prompt_tokens = live.prompt_tokens;
            output.completion_tokens = live.completion_tokens;
            output.cached_tokens = u.num_cached_tokens;
            if finish.is_some() {
                live.times.end(
                    now,
                    finish,
                    live.prompt_tokens,
                    live.completion_tokens,
                    &mut metrics,
                );
                self.live.remove(&u.req_id);
                self.pending.fetch_sub(1, Ordering::SeqCst);
            }
        }
        drop(metrics);
        self.publish_stats();
        for (_, tx, output) in outputs {
            let _ = tx.send(Ok(output));
        }
    }

    fn fail(&mut self, ids: &[RequestId], error: impl Fn() -> EngineError) {
        self.sched.finish_requests(ids);
        for id in ids {
            if let Some(l) = self.live.remove(id) {
                let _ = l.tx.send(Err(error()));
                self.pending.fetch_sub(1, Ordering::SeqCst);
                l.end(None, &mut self.metrics.lock().expect("poisoned"));
            }
        }
    }

    fn publish_stats(&self) {
        let mut s = self.stats.lock().expect("poisoned");
        *s = EngineStats {
            sched: self.sched.stats().clone(),
            num_running: self.sched.num_running(),
            num_waiting: self.sched.num_waiting(),
            num_blocks: self.sched.config().num_blocks,
            num_free_blocks: self.sched.num_free_blocks(),
            num_pending: self.pending.load(Ordering::SeqCst),
            activation_bytes_sent: self.executor.activation_bytes_sent(),
            recovery: self.recovered.clone(),
            masks_computed: self.masks_computed,
            mask_seconds: self.mask_seconds,
        };
    }
}
