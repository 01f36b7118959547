//! Per-request latency and length histograms and finish counts, kept by
//! the engine thread. Names, meanings and buckets are vLLM's (v1
//! `PrometheusStatLogger`), so dashboards and alerts written for vLLM read
//! strata's `/metrics` as is.

use std::time::Instant;

use strata_types::FinishReason;

/// Seconds from arrival to the first generated token.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// Seconds between consecutive tokens of one request.
const INTER_TOKEN_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// Whole-request phases: end to end, queue, prefill, decode, inference.
const REQUEST_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// 1, 2, 5, 10, 20, 50, ... up to `max` (vLLM's token-count buckets).
fn one_two_five(max: usize) -> Vec<f64> {
    let mut out = Vec::new();
    let mut scale = 1usize;
    loop {
        for m in [1, 2, 5] {
            let b = m * scale;
            if b > max {
                return out;
            }
            out.push(b as f64);
        }
        scale *= 10;
    }
}

/// A Prometheus histogram: counts per upper bound (not cumulative; the
/// `+Inf` bucket is `count`).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    /// `(upper bound, observations at or below it)`, as Prometheus' `le`
    /// buckets list them; `+Inf` is `count`.
    pub fn cumulative(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        self.bounds
            .iter()
            .zip(&self.counts)
            .scan(0, |acc, (&b, &c)| {
                *acc += c;
                Some((b, *acc))
            })
    }
}

/// How requests ended, in vLLM's `finished_reason` words.
pub const FINISHED_REASONS: [&str; 4] = ["stop", "length", "abort", "error"];

#[derive(Debug, Clone, PartialEq)]
pub struct RequestMetrics {
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_latency: Histogram,
    /// Arrival to first scheduled.
    pub queue_time: Histogram,
    /// First scheduled to first token.
    pub prefill_time: Histogram,
    /// First token to last token.
    pub decode_time: Histogram,
    /// First scheduled to last token.
    pub inference_time: Histogram,
    pub prompt_tokens: Histogram,
    pub generation_tokens: Histogram,
    /// Requests finished, by [`FINISHED_REASONS`].
    pub finished: [u64; 4],
}

impl RequestMetrics {
    pub fn new(max_model_len: usize) -> Self {
        let lengths = one_two_five(max_model_len.max(1));
        Self {
            time_to_first_token: Histogram::new(TTFT_BUCKETS),
            inter_token_latency: Histogram::new(INTER_TOKEN_BUCKETS),
            e2e_latency: Histogram::new(REQUEST_BUCKETS),
            queue_time: Histogram::new(REQUEST_BUCKETS),
            prefill_time: Histogram::new(REQUEST_BUCKETS),
            decode_time: Histogram::new(REQUEST_BUCKETS),
            inference_time: Histogram::new(REQUEST_BUCKETS),
            prompt_tokens: Histogram::new(&lengths),
            generation_tokens: Histogram::new(&lengths),
            finished: [0; 4],
        }
    }
}

/// When one request reached each point of its life.
#[derive(Debug, Clone)]
pub(crate) struct RequestTimes {
    arrived: Instant,
    scheduled: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

fn secs(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64()
}

impl RequestTimes {
    pub fn new(arrived: Instant) -> Self {
        Self {
            arrived,
            scheduled: None,
            first_token: None,
            last_token: None,
        }
    }

    /// The request ran in a step at `now` (only its first time counts).
    pub fn scheduled(&mut self, now: Instant, m: &mut RequestMetrics) {
        if self.scheduled.is_none() {
            self.scheduled = Some(now);
            m.queue_time.observe(secs(self.arrived, now));
        }
    }

    /// A token of this request was sampled at `now`.
    pub fn token(&mut self, now: Instant, m: &mut RequestMetrics) {
        match self.last_token {
            None => {
                m.time_to_first_token.observe(secs(self.arrived, now));
                m.prefill_time
                    .observe(secs(self.scheduled.unwrap_or(self.arrived), now));
                self.first_token = Some(now);
            }
            Some(last) => m.inter_token_latency.observe(secs(last, now)),
        }
        self.last_token = Some(now);
    }

    /// The request ended at `now` with `reason`, or with an error (`None`).
    pub fn end(
        &self,
        now: Instant,
        reason: Option<FinishReason>,
        prompt_tokens: usize,
        generation_tokens: usize,
        m: &mut RequestMetrics,
    ) {
        let i = match reason {
            Some(FinishReason::Stop) => 0,
            Some(FinishReason::Length) => 1,
            Some(FinishReason::Abort) => 2,
            None => 3,
        };
        m.finished[i] += 1;
        m.e2e_latency.observe(secs(self.arrived, now));
        if let (Some(scheduled), Some(first), Some(last)) =
            (self.scheduled, self.first_token, self.last_token)
        {
            m.inference_time.observe(secs(scheduled, last));
            m.decode_time.observe(secs(first, last));
        }
        m.prompt_tokens.observe(prompt_tokens as f64);
        m.generation_tokens.observe(generation_tokens as f64);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 3.0] {
            h.observe(v);
        }
        // `le` is inclusive; 3.0 is only in +Inf.
        assert_eq!(h.cumulative().collect::<Vec<_>>(), vec![(0.1, 2), (1.0, 3)]);
        assert_eq!(h.count, 4);
        assert!((h.sum - 3.65).abs() < 1e-12);
    }

    #[test]
    fn token_buckets_go_one_two_five_up_to_the_context() {
        assert_eq!(
            one_two_five(100),
            vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
        );
        assert_eq!(one_two_five(8192).last(), Some(&5000.0));
    }

    #[test]
    fn a_request_s_phases_add_up() {
        let mut m = RequestMetrics::new(100);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut r = RequestTimes::new(t0);
        r.scheduled(at(100), &mut m);
        r.scheduled(at(150), &mut m); // a later step: not queued again
        r.token(at(400), &mut m);
        r.token(at(450), &mut m);
        r.token(at(520), &mut m);
        r.end(at(520), Some(FinishReason::Length), 7, 3, &mut m);
        let close = |h: &Histogram, want: f64| (h.sum - want).abs() < 1e-9 && h.count >= 1;
        assert!(close(&m.queue_time, 0.1) && m.queue_time.count == 1);
        assert!(close(&m.time_to_first_token, 0.4));
        assert!(close(&m.prefill_time, 0.3));
        assert!(close(&m.inter_token_latency, 0.12) && m.inter_token_latency.count == 2);
        assert!(close(&m.decode_time, 0.12));
        assert!(close(&m.inference_time, 0.42));
        assert!(close(&m.e2e_latency, 0.52));
        assert_eq!((m.prompt_tokens.sum, m.generation_tokens.sum), (7.0, 3.0));
        assert_eq!(m.finished, [0, 1, 0, 0]);
    }

    #[test]
    fn endings_are_counted_by_reason() {
        let mut m = RequestMetrics::new(100);
        let r = RequestTimes::new(Instant::now());
        r.end(Instant::now(), Some(FinishReason::Abort), 3, 0, &mut m);
        r.end(Instant::now(), Some(FinishReason::Abort), 3, 0, &mut m);
        r.end(Instant::now(), None, 3, 0, &mut m);
        assert_eq!(m.finished, [0, 0, 2, 1]);
        // Never scheduled: no phase times, but the end-to-end latency.
        assert_eq!((m.e2e_latency.count, m.decode_time.count), (3, 0));
    }
}
