//! The load driver: streamed completions against one OpenAI-compatible
//! server, closed-loop concurrency levels, and the single-stream context sweep.

use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use indicatif::ProgressBar;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::report::{ContextPoint, Level, Percentiles};

/// Output tokens of each context-sweep request.
pub const CONTEXT_OUTPUT_TOKENS: usize = 64;
/// Context-sweep and prefill prompts draw their seeds from here on, so they
/// never repeat a concurrency-level prompt (which the prefix cache would serve).
const SWEEP_SEED: u64 = 1 << 40;

/// Where the prompts of the concurrency levels come from.
pub enum Prompts {
    /// Distinct filler text of about this many tokens per request.
    Random { tokens: usize },
    /// A file's prompts, in turn.
    File(Vec<String>),
}

impl Prompts {
    /// Reads a JSONL file of `{"prompt": "..."}` (or `{"text": "..."}`) lines.
    pub fn from_jsonl(path: &str) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        let mut prompts = Vec::new();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let at = || format!("{path}:{}", n + 1);
            let v: Value = serde_json::from_str(line).with_context(at)?;
            let prompt = v
                .get("prompt")
                .or_else(|| v.get("text"))
                .and_then(Value::as_str);
            prompts.push(prompt.with_context(at)?.to_string());
        }
        ensure!(!prompts.is_empty(), "{path} holds no prompts");
        Ok(Prompts::File(prompts))
    }

    /// The prompt of the `index`-th request a target is sent. Every target
    /// gets the same sequence, so they all do the same work.
    fn get(&self, index: u64) -> String {
        match self {
            Prompts::Random { tokens } => filler(*tokens, index),
            Prompts::File(all) => all[index as usize % all.len()].clone(),
        }
    }
}

/// Text of roughly `n` tokens (one word is about one token), different for
/// every seed, so no prompt cache can serve one request from another.
pub fn filler(n: usize, seed: u64) -> String {
    const WORDS: &[&str] = &[
        "river", "stone", "window", "garden", "silver", "quiet", "market", "cloud", "letter",
        "bridge", "orange", "forest", "candle", "harbor", "winter", "paper", "engine", "valley",
        "thunder", "meadow",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let words: Vec<&str> = (0..n)
        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
        .collect();
    words.join(" ")
}

/// What one streamed completion gave; times in seconds from sending it.
struct Sample {
    first_token: f64,
    last_token: f64,
    elapsed: f64,
    /// Gaps between consecutive non-empty chunks.
    gaps: Vec<f64>,
    completion_tokens: usize,
    /// From the usage chunk, when the server sent one.
    prompt_tokens: Option<usize>,
}

impl Sample {
    /// Tokens per second after the first; None with fewer than two tokens.
    fn decode_rate(&self) -> Option<f64> {
        let span = self.last_token - self.first_token;
        (self.completion_tokens >= 2 && span > 0.0)
            .then(|| (self.completion_tokens - 1) as f64 / span)
    }
}

/// One server under load.
pub struct Driver<'a> {
    pub client: reqwest::Client,
    pub base: String,
    pub model: String,
    pub prompts: &'a Prompts,
    pub progress: ProgressBar,
    /// Index of the next concurrency-level prompt.
    pub next_prompt: u64,
    /// Whether concurrency-level requests end at EOS rather than always
    /// generating `output_len` tokens.
    pub stop_at_eos: bool,
}

impl Driver<'_> {
    /// One streamed greedy completion of at most `max_tokens` tokens;
    /// exactly that many where EOS is ignored.
    async fn stream_one(
        &self,
        prompt: &str,
        max_tokens: usize,
        ignore_eos: bool,
    ) -> Result<Sample> {
        let body = json!({
            "model": self.model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": ignore_eos, "stream": true,
            "stream_options": {"include_usage": true},
        });
        let start = Instant::now();
        let url = format!("{}/v1/completions", self.base);
        let response = self.client.post(url).json(&body).send().await?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            let text: String = text.trim().chars().take(300).collect();
            bail!("HTTP {status}: {text}");
        }
        let mut events = response.bytes_stream().eventsource();
        let (mut first, mut last) = (None, 0.0);
        let (mut gaps, mut chunks, mut usage) = (Vec::new(), 0, Value::Null);
        while let Some(event) = events.next().await {
            let event = event.context("reading the event stream")?;
            if event.data.trim() == "[DONE]" {
                break;
            }
            let v: Value =
                serde_json::from_str(&event.data).context("a stream chunk is not JSON")?;
            if let Some(error) = v.get("error") {
                bail!("error in the stream: {error}");
            }
            // The last usage seen is the whole request's (servers send it at the end).
            if v.get("usage").is_some_and(|u| !u.is_null()) {
                usage = v["usage"].clone();
            }
            if v["choices"][0]["text"].as_str().is_none_or(str::is_empty) {
                continue;
            }
            let now = start.elapsed().as_secs_f64();
            match first {
                None => first = Some(now),
                Some(_) => gaps.push(now - last),
            }
            last = now;
            chunks += 1;
        }
        let first_token = first.context("the stream ended without any text")?;
        let count = |field: &str| usage[field].as_u64().map(|n| n as usize);
        Ok(Sample {
            first_token,
            last_token: last,
            elapsed: start.elapsed().as_secs_f64(),
            gaps,
            // Chunks undercount when a server packs several tokens in one.
            completion_tokens: count("completion_tokens").unwrap_or(chunks),
            prompt_tokens: count("prompt_tokens"),
        })
    }

    /// A short request, so lazy start-up work is not charged to the first level.
    pub async fn warm_up(&self) -> Result<()> {
        self.progress.set_message("warm-up");
        let sample = self.stream_one("Hello", 8, true).await;
        sample.map(drop).context("warm-up request")
    }

    /// `requests` requests, at most `concurrency` in flight at once (closed loop).
    pub async fn level(&mut self, concurrency: usize, requests: usize, output_len: usize) -> Level {
        self.progress.set_message(format!("{concurrency} streams"));
        let first_index = self.next_prompt;
        self.next_prompt += requests as u64;
        let start = Instant::now();
        let this = &*self;
        let samples: Vec<Result<Sample>> = futures::stream::iter(0..requests as u64)
            .map(|i| async move {
                let prompt = this.prompts.get(first_index + i);
                let result = this
                    .stream_one(&prompt, output_len, !this.stop_at_eos)
                    .await;
                this.progress.inc(1);
                result
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        summarize(concurrency, samples, start.elapsed().as_secs_f64())
    }

    /// One stream on a fresh prompt of about `tokens` tokens: best prefill
    /// (prompt tokens / TTFT) and best decode rate of two tries.
    pub async fn context_point(&self, tokens: usize) -> ContextPoint {
        self.progress.set_message(format!("context {tokens}"));
        let mut point = ContextPoint {
            requested_tokens: tokens,
            prompt_tokens: tokens,
            prefill_tok_s: f64::NAN,
            decode_tok_s: f64::NAN,
            error: None,
        };
        for attempt in 0..2 {
            let prompt = filler(tokens, SWEEP_SEED + 16 * tokens as u64 + attempt);
            match self.stream_one(&prompt, CONTEXT_OUTPUT_TOKENS, true).await {
                Ok(s) => {
                    point.prompt_tokens = s.prompt_tokens.unwrap_or(tokens);
                    let prefill = point.prompt_tokens as f64 / s.first_token;
                    point.prefill_tok_s = point.prefill_tok_s.max(prefill);
                    let decode = s.decode_rate().unwrap_or(f64::NAN);
                    point.decode_tok_s = point.decode_tok_s.max(decode);
                }
                Err(e) => point.error = Some(format!("{e:#}")),
            }
            self.progress.inc(1);
        }
        point
    }

    /// Prefill of a 512-token prompt with one token out: best of three of
    /// prompt tokens / elapsed. NaN when every try failed.
    pub async fn prefill_512(&self) -> f64 {
        self.progress.set_message("prefill 512");
        let mut best = f64::NAN;
        for attempt in 0..3 {
            let prompt = filler(512, SWEEP_SEED - 1 - attempt);
            if let Ok(s) = self.stream_one(&prompt, 1, true).await {
                best = best.max(s.prompt_tokens.unwrap_or(512) as f64 / s.elapsed);
            }
            self.progress.inc(1);
        }
        best
    }
}

/// The figures of one concurrency level from its requests' samples.
fn summarize(concurrency: usize, samples: Vec<Result<Sample>>, duration_s: f64) -> Level {
    let requests = samples.len();
    let (mut ok, mut first_error) = (Vec::new(), None);
    for sample in samples {
        match sample {
            Ok(s) => ok.push(s),
            Err(e) if first_error.is_none() => first_error = Some(format!("{e:#}")),
            Err(_) => {}
        }
    }
    let output_tokens: usize = ok.iter().map(|s| s.completion_tokens).sum();
    let rates: Vec<f64> = ok.iter().filter_map(Sample::decode_rate).collect();
    let mut ttfts: Vec<f64> = ok.iter().map(|s| s.first_token).collect();
    let mut gaps: Vec<f64> = ok.iter().flat_map(|s| s.gaps.iter().copied()).collect();
    Level {
        concurrency,
        requests,
        errors: requests - ok.len(),
        first_error,
        output_tokens,
        prompt_tokens: ok.iter().filter_map(|s| s.prompt_tokens).sum(),
        duration_s,
        throughput: output_tokens as f64 / duration_s,
        per_stream: rates.iter().sum::<f64>() / rates.len() as f64,
        ttft_ms: percentiles_ms(&mut ttfts),
        itl_ms: percentiles_ms(&mut gaps),
    }
}

/// p50/p90/p99 of times in seconds, in milliseconds; NaN without samples.
fn percentiles_ms(seconds: &mut [f64]) -> Percentiles {
    seconds.sort_by(f64::total_cmp);
    let at = |p: f64| match seconds.len() {
        0 => f64::NAN,
        n => seconds[((n - 1) as f64 * p).round() as usize] * 1e3,
    };
    let (p50, p90, p99) = (at(0.5), at(0.9), at(0.99));
    Percentiles { p50, p90, p99 }
}
