//! What serve-bench found: the records (also its JSON), the tables and
//! ratios it prints, and the SVG plot.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::{Deserialize, Deserializer, Serialize};

/// serde_json writes NaN (no sample) as null; read it back as NaN.
fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

#[derive(Serialize, Deserialize)]
pub struct Results {
    pub runs: Vec<Run>,
}

/// One target measured: a launched server or a given URL.
#[derive(Serialize, Deserialize, Clone)]
pub struct Run {
    pub label: String,
    pub url: String,
    pub model: String,
    /// Threads it was launched with; None for a server given by URL.
    pub threads: Option<usize>,
    pub started_unix: u64,
    pub levels: Vec<Level>,
    pub context: Vec<ContextPoint>,
    pub prefill_512: Option<f64>,
    pub llama_bench: Option<LlamaBench>,
    /// Peak RSS of a launched server's (leader) process.
    #[serde(default)]
    pub peak_rss_mib: Option<f64>,
    /// Whether the levels' requests ended at EOS (`--stop-at-eos`).
    #[serde(default)]
    pub stop_at_eos: bool,
}

/// One concurrency level: `requests` requests, at most `concurrency` at once.
#[derive(Serialize, Deserialize, Clone)]
pub struct Level {
    pub concurrency: usize,
    pub requests: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    pub output_tokens: usize,
    pub prompt_tokens: usize,
    pub duration_s: f64,
    /// Output tokens of all requests per second of the level's wall time.
    #[serde(deserialize_with = "nan_if_null")]
    pub throughput: f64,
    /// Mean over requests of their decode rate after the first token.
    #[serde(deserialize_with = "nan_if_null")]
    pub per_stream: f64,
    pub ttft_ms: Percentiles,
    /// Gaps between streamed chunks, pooled over all requests.
    pub itl_ms: Percentiles,
}

#[derive(Serialize, Deserialize, Clone)]
pub struct Percentiles {
    #[serde(deserialize_with = "nan_if_null")]
    pub p50: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub p90: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub p99: f64,
}

/// One single-stream point of the context sweep.
#[derive(Serialize, Deserialize, Clone)]
pub struct ContextPoint {
    /// The length asked for (--context); prompt_tokens is what the server counted.
    #[serde(default)]
    pub requested_tokens: usize,
    pub prompt_tokens: usize,
    #[serde(deserialize_with = "nan_if_null")]
    pub prefill_tok_s: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub decode_tok_s: f64,
    #[serde(default)]
    pub error: Option<String>,
}

/// llama.cpp's own kernel benchmark, next to the server's figures.
#[derive(Serialize, Deserialize, Clone)]
pub struct LlamaBench {
    pub pp512: f64,
    pub tg128: f64,
}

/// Prints one target's figures.
pub fn print_run(run: &Run) {
    let threads = run
        .threads
        .map_or(String::new(), |t| format!(", {t} threads"));
    let eos = if run.stop_at_eos {
        ", requests end at EOS"
    } else {
        ""
    };
    println!(
        "\n== {}  ({}, model {}{threads}{eos})",
        run.label, run.url, run.model
    );
    println!(
        "streams  reqs  err      tok/s per-stream    TTFT p50/p90/p99 ms     ITL p50/p90/p99 ms"
    );
    for l in &run.levels {
        let (t, i) = (&l.ttft_ms, &l.itl_ms);
        println!(
            "{:>7} {:>5} {:>4} {:>10.1} {:>10.1} {:>22} {:>22}",
            l.concurrency,
            l.requests,
            l.errors,
            l.throughput,
            l.per_stream,
            format!("{:.0}/{:.0}/{:.0}", t.p50, t.p90, t.p99),
            format!("{:.1}/{:.1}/{:.1}", i.p50, i.p90, i.p99),
        );
    }
    for p in &run.context {
        println!(
            "context {:>6} tokens: prefill {:>8.1} tok/s, decode {:>6.1} tok/s",
            p.prompt_tokens, p.prefill_tok_s, p.decode_tok_s
        );
    }
    if let Some(p) = run.prefill_512 {
        println!("prefill 512: {p:.1} tok/s");
    }
    if let Some(LlamaBench { pp512, tg128 }) = &run.llama_bench {
        println!("llama-bench: pp512 {pp512:.1} tok/s, tg128 {tg128:.1} tok/s");
    }
    if let Some(rss) = run.peak_rss_mib {
        println!("peak RSS: {rss:.0} MiB");
    }
    for l in &run.levels {
        if let Some(e) = &l.first_error {
            println!("first error at {} streams: {e}", l.concurrency);
        }
    }
    for p in &run.context {
        if let Some(e) = &p.error {
            println!("error at context {}: {e}", p.requested_tokens);
        }
    }
}

/// Ratio lines, `what: a 390.1 tok/s / b 155.0 = 2.52x`; missing figures give none.
#[derive(Default)]
struct Ratios(Vec<String>);

impl Ratios {
    fn add(&mut self, what: &str, (a_label, a): (&str, f64), (b_label, b): (&str, f64)) {
        if a.is_finite() && b.is_finite() && b > 0.0 {
            let times = a / b;
            let line = format!("{what}: {a_label} {a:.1} tok/s / {b_label} {b:.1} = {times:.2}x");
            self.0.push(line);
        }
    }
}

/// The first run against each other run, then the first run's own scaling.
pub fn print_ratios(runs: &[Run]) {
    let Some((first, others)) = runs.split_first() else {
        return;
    };
    let mut ratios = Ratios::default();
    let a = |v: f64| (first.label.as_str(), v);
    for other in others {
        let b = |v: f64| (other.label.as_str(), v);
        for l in &first.levels {
            if let Some(o) = level(other, l.concurrency) {
                let streams = if l.concurrency == 1 {
                    "stream"
                } else {
                    "streams"
                };
                let what = format!("{} {streams}", l.concurrency);
                ratios.add(&what, a(l.throughput), b(o.throughput));
            }
        }
        let prefill = a(first.prefill_512.unwrap_or(f64::NAN));
        ratios.add(
            "prefill 512",
            prefill,
            b(other.prefill_512.unwrap_or(f64::NAN)),
        );
        if let Some(bench) = &other.llama_bench {
            let (pp512, tg128) = (("llama-bench", bench.pp512), ("llama-bench", bench.tg128));
            ratios.add("prefill 512 vs llama-bench pp512", prefill, pp512);
            if let Some(one) = level(first, 1) {
                ratios.add(
                    "1 stream decode vs llama-bench tg128",
                    a(one.per_stream),
                    tg128,
                );
            }
        }
        for p in &first.context {
            let same = |o: &&ContextPoint| o.requested_tokens == p.requested_tokens;
            if let Some(o) = other.context.iter().find(same) {
                let what = |kind| format!("context {} {kind}", p.requested_tokens);
                ratios.add(&what("decode"), a(p.decode_tok_s), b(o.decode_tok_s));
                ratios.add(&what("prefill"), a(p.prefill_tok_s), b(o.prefill_tok_s));
            }
        }
    }
    if let (Some(x64), Some(x16)) = (level(first, 64), level(first, 16)) {
        ratios.add(
            "64 streams / 16 streams",
            a(x64.throughput),
            a(x16.throughput),
        );
    }
    if !ratios.0.is_empty() {
        println!("\nRATIOS\n{}", ratios.0.join("\n"));
    }
}

fn level(run: &Run, concurrency: usize) -> Option<&Level> {
    run.levels.iter().find(|l| l.concurrency == concurrency)
}

pub fn write_json(path: &str, runs: &[Run]) -> Result<()> {
    let json = serde_json::to_string_pretty(&Results {
        runs: runs.to_vec(),
    })?;
    std::fs::write(path, json).with_context(|| format!("writing {path}"))
}

/// The runs of earlier `--out` files; a label already taken gets the file's
/// name appended.
pub fn load_compare(paths: &[String], runs: &mut Vec<Run>) -> Result<()> {
    for path in paths {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        let results: Results =
            serde_json::from_str(&text).with_context(|| format!("parsing {path}"))?;
        let stem = Path::new(path).file_stem().map(|s| s.to_string_lossy());
        let name = stem.map_or(path.clone(), String::from);
        for mut run in results.runs {
            if runs.iter().any(|r| r.label == run.label) {
                run.label = format!("{} ({name})", run.label);
            }
            runs.push(run);
        }
    }
    Ok(())
}

/// Two panels side by side, one line per run: aggregate tok/s and ITL p50
/// against the number of concurrent streams (log2 axis).
pub fn plot(path: &str, runs: &[Run]) -> Result<()> {
    let root = SVGBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(600);
    panel(&left, runs, ("aggregate output tok/s", "tok/s"), |l| {
        l.throughput
    })?;
    panel(&right, runs, ("inter-token latency p50", "ms"), |l| {
        l.itl_ms.p50
    })?;
    root.present().with_context(|| format!("writing {path}"))?;
    Ok(())
}

fn panel(
    area: &DrawingArea<SVGBackend, Shift>,
    runs: &[Run],
    (title, unit): (&str, &str),
    value: fn(&Level) -> f64,
) -> Result<()> {
    let point = |l: &Level| ((l.concurrency as f64).log2(), value(l));
    let line = |r: &Run| {
        r.levels
            .iter()
            .map(point)
            .filter(|p| p.1.is_finite())
            .collect()
    };
    let lines: Vec<Vec<(f64, f64)>> = runs.iter().map(line).collect();
    let points = || lines.iter().flatten();
    let x_min = points().map(|p| p.0).fold(0.0, f64::min);
    let x_max = points().map(|p| p.0).fold(0.0, f64::max).max(x_min + 1.0);
    let y_max = points().map(|p| p.1).fold(1e-3, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(x_min - 0.3..x_max + 0.3, 0.0..y_max)?;
    // Ticks at whole powers of two only, labelled with the stream count.
    let stream_count = |x: &f64| match (x - x.round()).abs() < 1e-6 {
        true => format!("{}", 2f64.powf(x.round())),
        false => String::new(),
    };
    chart
        .configure_mesh()
        .x_labels((x_max - x_min).round() as usize + 1)
        .x_label_formatter(&stream_count)
        .x_desc("concurrent streams")
        .y_desc(unit)
        .draw()?;
    for (i, (run, points)) in runs.iter().zip(&lines).enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(run.label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
