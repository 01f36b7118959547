//! Per-request latency histograms and finish counts, kept by the engine
//! thread. The buckets are vLLM's (v1 `PrometheusStatLogger`), so
//! dashboards and alerts written for vLLM read strata's `/metrics` as is.

use strata_types::FinishReason;

/// Seconds from arrival to the first generated token.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// Seconds between consecutive tokens of one request.
pub const INTER_TOKEN_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// Seconds from arrival to the last token.
pub const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// A Prometheus histogram: counts per upper bound (not cumulative; the
/// `+Inf` bucket is `count`).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub bounds: &'static [f64],
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
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
    /// Requests finished, by [`FINISHED_REASONS`].
    pub finished: [u64; 4],
}

impl Default for RequestMetrics {
    fn default() -> Self {
        Self {
            time_to_first_token: Histogram::new(TTFT_BUCKETS),
            inter_token_latency: Histogram::new(INTER_TOKEN_BUCKETS),
            e2e_latency: Histogram::new(E2E_BUCKETS),
            finished: [0; 4],
        }
    }
}

impl RequestMetrics {
    /// A request ended `seconds` after it arrived: with `reason`, or with
    /// an error (`None`).
    pub fn record_end(&mut self, reason: Option<FinishReason>, seconds: f64) {
        let i = match reason {
            Some(FinishReason::Stop) => 0,
            Some(FinishReason::Length) => 1,
            Some(FinishReason::Abort) => 2,
            None => 3,
        };
        self.finished[i] += 1;
        self.e2e_latency.observe(seconds);
    }
}

#[cfg(test)]
mod tests {
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
    fn endings_are_counted_by_reason() {
        let mut m = RequestMetrics::default();
        m.record_end(Some(FinishReason::Length), 2.0);
        m.record_end(Some(FinishReason::Abort), 0.2);
        m.record_end(Some(FinishReason::Abort), 0.4);
        m.record_end(None, 0.1);
        assert_eq!(m.finished, [0, 1, 2, 1]);
        assert_eq!(m.e2e_latency.count, 4);
    }
}
