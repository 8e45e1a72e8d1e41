//! What text generation does, on Triton's metrics endpoint (`:8002/metrics`), one
//! series per model version (labels `model`, `version`), named after the metrics of
//! Triton's vLLM backend (`vllm:*`) with our prefix (promtool refuses `:` in exported
//! names):
//!
//! | metric | kind | what |
//! |---|---|---|
//! | `triton_rust_prompt_tokens_total` | counter | prompt tokens prefilled |
//! | `triton_rust_generation_tokens_total` | counter | tokens generated (the end-of-text token not counted) |
//! | `triton_rust_time_to_first_token_seconds` | histogram | from the backend receiving a request to its first token |
//! | `triton_rust_time_per_output_token_seconds` | histogram | between two tokens of one sequence (inter-token latency) |
//! | `triton_rust_request_success_total` | counter | sequences (prompts) ended, label `finished_reason`: `stop` (end of text or a stop string), `length` (`max_new_tokens` or the context), `abort` (cancelled) |
//! | `triton_rust_num_requests_running` | gauge | sequences in the running batches |
//!
//! The load-time probe generation is not counted; Triton's `model_warmup` requests are.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::generation::llm_io::finish_reason_name;
use crate::generation::{FinishReason, GenerationObserver};
use crate::triton::{Error, Metric, MetricFamily, MetricKind};

/// Time to first token, in seconds: from a tiny model's millisecond to a long prompt on
/// a CPU.
const FIRST_TOKEN_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
];
/// Inter-token latency, in seconds: a tiny decoder's step is a fraction of a millisecond.
const TOKEN_GAP_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 1.0, 2.5,
];

struct Families {
    prompt_tokens: Arc<MetricFamily>,
    generation_tokens: Arc<MetricFamily>,
    first_token: Arc<MetricFamily>,
    token_gap: Arc<MetricFamily>,
    finished: Arc<MetricFamily>,
    running: Arc<MetricFamily>,
}

/// Registered once per process: Triton never removes a family from its registry.
fn families() -> Result<&'static Families, Error> {
    static FAMILIES: OnceLock<Result<Families, Error>> = OnceLock::new();
    FAMILIES
        .get_or_init(|| {
            Ok(Families {
                prompt_tokens: MetricFamily::new(
                    MetricKind::Counter,
                    "triton_rust_prompt_tokens_total",
                    "Prompt tokens prefilled",
                )?,
                generation_tokens: MetricFamily::new(
                    MetricKind::Counter,
                    "triton_rust_generation_tokens_total",
                    "Tokens generated",
                )?,
                first_token: MetricFamily::new(
                    MetricKind::Histogram,
                    "triton_rust_time_to_first_token_seconds",
                    "Time from the backend receiving a request to its first token",
                )?,
                token_gap: MetricFamily::new(
                    MetricKind::Histogram,
                    "triton_rust_time_per_output_token_seconds",
                    "Time between two tokens of one sequence",
                )?,
                finished: MetricFamily::new(
                    MetricKind::Counter,
                    "triton_rust_request_success_total",
                    "Sequences ended, by finish reason",
                )?,
                running: MetricFamily::new(
                    MetricKind::Gauge,
                    "triton_rust_num_requests_running",
                    "Sequences in the running batches",
                )?,
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// One model version's series.
pub struct GenerationMetrics {
    prompt_tokens: Arc<Metric>,
    generation_tokens: Arc<Metric>,
    first_token: Arc<Metric>,
    token_gap: Arc<Metric>,
    /// By [`FinishReason`]: stop, length, abort.
    finished: [Arc<Metric>; 3],
    running: Arc<Metric>,
}

fn reason_slot(reason: FinishReason) -> usize {
    match reason {
        FinishReason::Stop => 0,
        FinishReason::Length => 1,
        FinishReason::Abort => 2,
    }
}

impl GenerationMetrics {
    pub fn new(model: &str, version: u64) -> Result<Self, Error> {
        let families = families()?;
        let version = version.to_string();
        let labels = [("model", model), ("version", version.as_str())];
        let finished = |reason| {
            let labels = [
                ("model", model),
                ("version", version.as_str()),
                ("finished_reason", finish_reason_name(Some(reason))),
            ];
            families.finished.lasting(&labels, None)
        };
        Ok(Self {
            prompt_tokens: families.prompt_tokens.lasting(&labels, None)?,
            generation_tokens: families.generation_tokens.lasting(&labels, None)?,
            first_token: families
                .first_token
                .lasting(&labels, Some(&FIRST_TOKEN_BUCKETS))?,
            token_gap: families
                .token_gap
                .lasting(&labels, Some(&TOKEN_GAP_BUCKETS))?,
            finished: [
                finished(FinishReason::Stop)?,
                finished(FinishReason::Length)?,
                finished(FinishReason::Abort)?,
            ],
            running: families.running.lasting(&labels, None)?,
        })
    }
}

impl GenerationObserver for GenerationMetrics {
    fn joined(&self, sequences: usize, prompt_tokens: usize) {
        warn_on(self.prompt_tokens.increment(prompt_tokens as f64));
        warn_on(self.running.increment(sequences as f64));
    }

    fn first_token(&self, after: Duration) {
        warn_on(self.first_token.observe(after.as_secs_f64()));
    }

    fn token(&self, gap: Option<Duration>) {
        warn_on(self.generation_tokens.increment(1.0));
        if let Some(gap) = gap {
            warn_on(self.token_gap.observe(gap.as_secs_f64()));
        }
    }

    fn left(&self, reason: Option<FinishReason>) {
        if let Some(reason) = reason {
            warn_on(self.finished[reason_slot(reason)].increment(1.0));
        }
        warn_on(self.running.increment(-1.0));
    }
}

fn warn_on(result: Result<(), Error>) {
    if let Err(error) = result {
        crate::log_warn!("triton-rust: cannot update a generation metric: {error}");
    }
}
