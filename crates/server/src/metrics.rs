//! `/metrics` in Prometheus' text format: strata's own series, and the same
//! quantities under vLLM's names (`vllm:*`, labelled `model_name`), so
//! dashboards and alerts made for vLLM work unchanged.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use strata_engine::{Histogram, FINISHED_REASONS};

use crate::AppState;

/// Appends one metric family.
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = write!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, labels: &str, v: impl std::fmt::Display) {
        self.head(name, kind, help);
        let _ = writeln!(self.out, "{name}{} {v}", braces(labels));
    }

    /// A gauge with one value per node, labelled by node rank.
    fn per_node<V: std::fmt::Display>(
        &mut self,
        name: &str,
        help: &str,
        values: impl IntoIterator<Item = V>,
    ) {
        self.head(name, "gauge", help);
        for (node, v) in values.into_iter().enumerate() {
            let _ = writeln!(self.out, "{name}{{node=\"{node}\"}} {v}");
        }
    }

    fn histogram(&mut self, name: &str, help: &str, labels: &str, h: &Histogram) {
        self.head(name, "histogram", help);
        let sep = if labels.is_empty() { "" } else { "," };
        for (le, n) in h.cumulative() {
            let _ = writeln!(self.out, "{name}_bucket{{{labels}{sep}le=\"{le:?}\"}} {n}");
        }
        let _ = writeln!(
            self.out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(self.out, "{name}_sum{} {}", braces(labels), h.sum);
        let _ = writeln!(self.out, "{name}_count{} {}", braces(labels), h.count);
    }
}

fn braces(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    }
}

/// A label value with Prometheus' escapes.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let s = state.engine.stats();
    let mut out = String::new();
    let mut f = Family { out: &mut out };
    let r = &s.recovery;
    let counters: [(&str, &str, u64); 11] = [
        (
            "strata_recoveries_total",
            "Times the cluster came back after a node was lost.",
            r.recoveries,
        ),
        (
            "strata_requests_replayed_total",
            "Running requests recomputed from their tokens after a recovery.",
            r.requests_replayed,
        ),
        (
            "strata_tokens_recomputed_total",
            "Prompt and generated tokens those requests recomputed.",
            r.tokens_recomputed,
        ),
        (
            "strata_prompt_tokens_total",
            "Prompt tokens submitted.",
            s.sched.prompt_tokens,
        ),
        (
            "strata_computed_tokens_total",
            "Tokens whose KV was computed (prefill and decode).",
            s.sched.computed_tokens,
        ),
        (
            "strata_activation_bytes_sent_total",
            "Activation bytes (frames with headers) the leader sent to the next pipeline node.",
            s.activation_bytes_sent,
        ),
        (
            "strata_prefix_cache_hit_tokens_total",
            "Prompt tokens served from the prefix cache.",
            s.sched.prefix_cache_hit_tokens,
        ),
        (
            "strata_generation_tokens_total",
            "Tokens generated.",
            s.sched.generated_tokens,
        ),
        (
            "strata_preemptions_total",
            "Requests preempted for lack of KV blocks.",
            s.sched.preemptions,
        ),
        (
            "strata_steps_total",
            "Engine steps that ran the model.",
            s.sched.steps,
        ),
        (
            "strata_structured_output_masks_total",
            "Token masks computed for structured outputs (one per constrained sequence per step).",
            s.masks_computed,
        ),
    ];
    for (name, help, v) in counters {
        f.one(name, "counter", help, "", v);
    }
    let gauges: [(&str, &str, usize); 5] = [
        (
            "strata_num_requests_running",
            "Requests running.",
            s.num_running,
        ),
        (
            "strata_num_requests_waiting",
            "Requests waiting.",
            s.num_waiting,
        ),
        (
            "strata_num_requests_pending",
            "Requests admitted and not finished.",
            s.num_pending,
        ),
        ("strata_kv_cache_blocks", "KV cache blocks.", s.num_blocks),
        (
            "strata_kv_cache_free_blocks",
            "KV cache blocks free (cached prefixes included).",
            s.num_free_blocks,
        ),
    ];
    for (name, help, v) in gauges {
        f.one(name, "gauge", help, "", v);
    }
    f.one(
        "strata_recovery_seconds_total",
        "counter",
        "Seconds the engine waited for lost nodes to come back.",
        "",
        r.seconds,
    );
    f.one(
        "strata_structured_output_mask_seconds_total",
        "counter",
        "Seconds the leader spent computing those masks (while the steps' forward passes ran).",
        "",
        s.mask_seconds,
    );
    let up = state.cluster.node_up().into_iter().map(u8::from);
    f.per_node(
        "strata_node_up",
        "1 while the node is joined, loaded, started and answering heartbeats.",
        up,
    );
    f.per_node(
        "strata_node_weight_bytes",
        "Checkpoint bytes each node read for its share of the model.",
        state.cluster.weight_bytes(),
    );

    // vLLM's names (v1's PrometheusStatLogger), labelled by the served model.
    let model = format!("model_name=\"{}\"", escape(&state.served_model_name));
    let usage = if s.num_blocks == 0 {
        0.0
    } else {
        1.0 - s.num_free_blocks as f64 / s.num_blocks as f64
    };
    let series: [(&str, &str, &str, f64); 9] = [
        (
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            s.num_running as f64,
        ),
        (
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            s.num_waiting as f64,
        ),
        (
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            usage,
        ),
        (
            "vllm:gpu_cache_usage_perc",
            "gauge",
            "KV-cache usage (vLLM's name before 0.10). 1 means 100 percent usage.",
            usage,
        ),
        (
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
            s.sched.prompt_tokens as f64,
        ),
        (
            "vllm:prefix_cache_hits_total",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
            s.sched.prefix_cache_hit_tokens as f64,
        ),
        (
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            s.sched.prompt_tokens as f64,
        ),
        (
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            s.sched.generated_tokens as f64,
        ),
        (
            "vllm:num_preemptions_total",
            "counter",
            "Cumulative number of preemption from the engine.",
            s.sched.preemptions as f64,
        ),
    ];
    for (name, kind, help, v) in series {
        f.one(name, kind, help, &model, v);
    }
    // Speculative decoding, only when it is on (as vLLM does).
    let per_pos = &s.sched.spec_accepted_per_pos;
    if !per_pos.is_empty() {
        let spec = [
            (
                "vllm:spec_decode_num_drafts_total",
                "Number of spec decoding drafts.",
                s.sched.spec_drafts,
            ),
            (
                "vllm:spec_decode_num_draft_tokens_total",
                "Number of draft tokens.",
                s.sched.spec_draft_tokens,
            ),
            (
                "vllm:spec_decode_num_accepted_tokens_total",
                "Number of accepted tokens.",
                s.sched.spec_accepted_tokens,
            ),
        ];
        for (name, help, v) in spec {
            f.one(name, "counter", help, &model, v);
        }
        let name = "vllm:spec_decode_num_accepted_tokens_per_pos_total";
        f.head(name, "counter", "Accepted tokens, per draft position.");
        for (pos, n) in per_pos.iter().enumerate() {
            let _ = writeln!(f.out, "{name}{{{model},position=\"{pos}\"}} {n}");
        }
    }
    let r = state.engine.request_metrics();
    let name = "vllm:request_success_total";
    f.head(name, "counter", "Count of successfully processed requests.");
    for (reason, n) in FINISHED_REASONS.iter().zip(r.finished) {
        let _ = writeln!(f.out, "{name}{{{model},finished_reason=\"{reason}\"}} {n}");
    }
    let histograms = [
        (
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            &r.time_to_first_token,
        ),
        (
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            &r.inter_token_latency,
        ),
        (
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds (vLLM's name before 0.11).",
            &r.inter_token_latency,
        ),
        (
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            &r.e2e_latency,
        ),
        (
            "vllm:request_queue_time_seconds",
            "Histogram of time spent waiting before the first step, in seconds.",
            &r.queue_time,
        ),
        (
            "vllm:request_prefill_time_seconds",
            "Histogram of time from the first step to the first token, in seconds.",
            &r.prefill_time,
        ),
        (
            "vllm:request_decode_time_seconds",
            "Histogram of time from the first token to the last, in seconds.",
            &r.decode_time,
        ),
        (
            "vllm:request_inference_time_seconds",
            "Histogram of time from the first step to the last token, in seconds.",
            &r.inference_time,
        ),
        (
            "vllm:request_prompt_tokens",
            "Number of prefill tokens processed, per request.",
            &r.prompt_tokens,
        ),
        (
            "vllm:request_generation_tokens",
            "Number of generation tokens processed, per request.",
            &r.generation_tokens,
        ),
    ];
    for (name, help, h) in histograms {
        f.histogram(name, help, &model, h);
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}
