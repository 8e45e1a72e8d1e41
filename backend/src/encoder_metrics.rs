//! How much padding the encoder tasks feed ONNX Runtime, on Triton's metrics endpoint
//! (`:8002/metrics`), one series per model version (labels `model`, `version`):
//!
//! | metric | kind | what |
//! |---|---|---|
//! | `triton_rust_encoder_tokens_total` | counter | tokens of the texts (or `input_ids` rows) run |
//! | `triton_rust_encoder_fed_tokens_total` | counter | tokens fed to ONNX Runtime, padding included |
//! | `triton_rust_encoder_runs_total` | counter | ONNX Runtime runs |
//!
//! `fed / tokens` is the padding overhead: 1 when no row is padded.

use std::sync::{Arc, OnceLock};

use crate::triton::{Error, Metric, MetricFamily, MetricKind};

struct Families {
    tokens: Arc<MetricFamily>,
    fed: Arc<MetricFamily>,
    runs: Arc<MetricFamily>,
}

/// Registered once per process: Triton never removes a family from its registry.
fn families() -> Result<&'static Families, Error> {
    static FAMILIES: OnceLock<Result<Families, Error>> = OnceLock::new();
    FAMILIES
        .get_or_init(|| {
            Ok(Families {
                tokens: MetricFamily::new(
                    MetricKind::Counter,
                    "triton_rust_encoder_tokens_total",
                    "Tokens of the rows an encoder ran",
                )?,
                fed: MetricFamily::new(
                    MetricKind::Counter,
                    "triton_rust_encoder_fed_tokens_total",
                    "Tokens an encoder fed to ONNX Runtime, padding included",
                )?,
                runs: MetricFamily::new(
                    MetricKind::Counter,
                    "triton_rust_encoder_runs_total",
                    "ONNX Runtime runs of an encoder",
                )?,
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// One model version's series.
pub struct EncoderMetrics {
    tokens: Arc<Metric>,
    fed: Arc<Metric>,
    runs: Arc<Metric>,
}

impl EncoderMetrics {
    pub fn new(model: &str, version: u64) -> Result<Self, Error> {
        let families = families()?;
        let version = version.to_string();
        let labels = [("model", model), ("version", version.as_str())];
        Ok(Self {
            tokens: families.tokens.lasting(&labels, None)?,
            fed: families.fed.lasting(&labels, None)?,
            runs: families.runs.lasting(&labels, None)?,
        })
    }

    /// One run of `rows` rows padded to `sequence` tokens, holding `tokens` real ones.
    pub fn ran(&self, tokens: usize, rows: usize, sequence: usize) {
        for (metric, value) in [
            (&self.tokens, tokens),
            (&self.fed, rows * sequence),
            (&self.runs, 1),
        ] {
            if let Err(error) = metric.increment(value as f64) {
                crate::log_warn!("triton-rust: cannot count encoder tokens: {error}");
            }
        }
    }
}
