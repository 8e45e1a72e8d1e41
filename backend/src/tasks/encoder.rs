//! What the two encoder tasks share: texts tokenized per request, all requests of one
//! execution run as right-padded ONNX batches on the instance's session (rows of very
//! different lengths in separate batches, so padding does not dominate), and the
//! outputs cut back per request.

use std::borrow::Cow;

use ort::session::{Session, SessionInputValue};
use ort::value::Tensor;
use serde::Deserialize;

use super::task::{InstanceContext, ModelContext, Pending, fail_all, unzip_batch};
use crate::encoder_metrics::EncoderMetrics;
use crate::error::BackendError;
use crate::float_tensor::{FloatType, read_f32};
use crate::memory;
use crate::onnx::{Device, OnnxModel};
use crate::responder::Responder;
use crate::settings::{
    SessionSettings, SettingsGroup, TextSettings, flag, non_empty, positive_at_most,
};
use crate::text::{TEXT_INPUT, read_texts};
use crate::tokenize::{
    PaddedBatch, RUN_COST_TOKENS, TOKENIZER_FILE, TextEncoder, TokenRow, length_groups, pad_batch,
    vocabulary_mismatch,
};
use crate::types::{InputTensor, MemoryUsage, element_count};

pub const INPUT_IDS: &str = "input_ids";
pub const ATTENTION_MASK: &str = "attention_mask";
/// ONNX graph input fed when the graph has it.
const TOKEN_TYPE_IDS: &str = "token_type_ids";

/// The default of `max_texts_per_request`.
pub const DEFAULT_MAX_TEXTS: usize = 256;

fn default_max_texts() -> usize {
    DEFAULT_MAX_TEXTS
}

fn enabled() -> bool {
    true
}

/// How requests are batched: the padding token, for tokenizers that do not name one,
/// and how many sequences one request may hold (each costs its own output rows: 100,000
/// tiny texts once made a 636 MB response).
#[derive(Debug, Clone, Deserialize)]
pub struct BatchSettings {
    #[serde(default, deserialize_with = "non_empty")]
    pub pad_token: Option<String>,
    #[serde(
        default = "default_max_texts",
        deserialize_with = "positive_at_most::<65536, _>"
    )]
    pub max_texts_per_request: usize,
    /// Rows of very different lengths run as separate batches (`false`: one batch
    /// padded to the longest row, which a GPU may prefer).
    #[serde(default = "enabled", deserialize_with = "flag")]
    pub group_by_length: bool,
    /// With `max_batch_size: 0` (Triton does not batch): the requests that queue while
    /// an execution runs go into the next one together (`false`: one at a time).
    #[serde(default = "enabled", deserialize_with = "flag")]
    pub batch_requests: bool,
}

impl SettingsGroup for BatchSettings {}

/// The settings both encoder tasks read.
pub type EncoderSettings = (SessionSettings, TextSettings, BatchSettings);

/// The ONNX inputs a graph declares, in the order the session wants them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GraphInput {
    InputIds,
    AttentionMask,
    TokenTypeIds,
}

/// One instance: its session, and how its graph is fed and read.
pub struct EncoderInstance {
    session: Session,
    inputs: Vec<(String, GraphInput)>,
    /// The graph output the task reads.
    output: String,
    device: Device,
    /// The last dimension of the graph's output (labels, or hidden size), measured at
    /// load.
    pub width: usize,
}

/// One request's sequences, tokenized.
#[derive(Debug, Clone)]
pub struct EncodedRequest {
    pub rows: Vec<TokenRow>,
    /// Leading shape of the per-text outputs (`[N]` for N texts).
    pub leading: Vec<i64>,
    /// The shape of `text_input` (empty for token ids).
    pub text_shape: Vec<i64>,
    /// The outputs the client asked for.
    pub wanted: Vec<String>,
}

impl EncodedRequest {
    pub fn wants(&self, name: &str) -> bool {
        self.wanted.iter().any(|w| w == name)
    }
}

/// A model version of an encoder task.
pub struct Encoder {
    pub text: TextEncoder,
    model: OnnxModel,
    /// Batched configs declare `text_input` with dims `[1]`: a `[B, 1]` request is B
    /// texts and its per-text outputs lead with `[B]`.
    drops_text_unit_dim: bool,
    max_text_bytes: usize,
    max_texts: usize,
    group_by_length: bool,
    batch_requests: bool,
    /// Tokens and padding fed to ONNX Runtime (`None` where Triton's metrics are off).
    metrics: Option<EncoderMetrics>,
    /// The configuration's outputs and their dims, checked against the model.
    declared_outputs: Vec<(String, Vec<i64>)>,
}

impl Encoder {
    pub fn load(model: &ModelContext<'_>, settings: EncoderSettings) -> Result<Self, BackendError> {
        let (session, text, batch) = settings;
        let onnx = model.onnx_model(session)?;
        let encoder = TextEncoder::from_file(
            &model.version_dir.join(TOKENIZER_FILE),
            text.max_sequence_length,
            batch.pad_token.as_deref(),
        )?;
        let drops_text_unit_dim = model.config.max_batch_size > 0
            && model
                .config
                .input(TEXT_INPUT)
                .is_some_and(|spec| spec.dims == [1]);
        Ok(Encoder {
            text: encoder,
            model: onnx,
            drops_text_unit_dim,
            max_text_bytes: text.max_text_bytes,
            max_texts: batch.max_texts_per_request,
            group_by_length: batch.group_by_length,
            batch_requests: batch.batch_requests,
            metrics: EncoderMetrics::new(model.name, model.version)
                .inspect_err(|error| {
                    crate::log_warn!("triton-rust: no encoder token metrics: {error}");
                })
                .ok(),
            declared_outputs: model
                .config
                .outputs
                .iter()
                .map(|spec| (spec.name.clone(), spec.dims.clone()))
                .collect(),
        })
    }

    /// Builds an instance's session and checks that its graph fits: token inputs only,
    /// `wanted` among its outputs (or its only output), a sequence of the longest length
    /// runs, and the configuration's `width_outputs` are as wide as the model's output.
    pub fn instance(
        &self,
        instance: &InstanceContext,
        wanted: &str,
        width_outputs: &[&str],
    ) -> Result<EncoderInstance, BackendError> {
        let session = self.model.session(instance.device)?;
        let mut inputs = Vec::new();
        for outlet in session.inputs() {
            let role = match outlet.name() {
                INPUT_IDS => GraphInput::InputIds,
                ATTENTION_MASK => GraphInput::AttentionMask,
                TOKEN_TYPE_IDS => GraphInput::TokenTypeIds,
                other => {
                    return Err(BackendError::Unsupported(format!(
                        "the ONNX model has input '{other}'; this backend feeds only \
                         'input_ids', 'attention_mask' and 'token_type_ids'"
                    )));
                }
            };
            inputs.push((outlet.name().to_owned(), role));
        }
        if !inputs.iter().any(|(_, role)| *role == GraphInput::InputIds) {
            return Err(BackendError::Unsupported(
                "the ONNX model has no 'input_ids' input".into(),
            ));
        }
        let outputs = session.outputs();
        let output = match outputs.iter().find(|o| o.name() == wanted) {
            Some(outlet) => outlet,
            None if outputs.len() == 1 => &outputs[0],
            None => {
                let names: Vec<_> = outputs.iter().map(|o| o.name().to_owned()).collect();
                return Err(BackendError::Unsupported(format!(
                    "the ONNX model has no '{wanted}' output (it has {names:?})"
                )));
            }
        };
        // float16 and bfloat16 (a half-precision export) are read as f32.
        FloatType::of(output, "output")?;
        let output = output.name().to_owned();
        let mut instance = EncoderInstance {
            session,
            inputs,
            output,
            device: instance.device,
            width: 0,
        };
        instance.width = self.probe(&mut instance)?;
        let declared = self
            .declared_outputs
            .iter()
            .filter(|(name, _)| width_outputs.contains(&name.as_str()));
        for (name, dims) in declared {
            if dims
                .last()
                .is_some_and(|&d| d > 0 && d != instance.width as i64)
            {
                return Err(BackendError::Config(format!(
                    "output '{name}' has dims {dims:?}, but the model's outputs are {} wide",
                    instance.width
                )));
            }
        }
        Ok(instance)
    }

    /// Tokenizes the texts of one request.
    pub fn encode_texts(
        &self,
        input: &InputTensor<'_>,
        wanted: Vec<String>,
    ) -> Result<EncodedRequest, BackendError> {
        // Counted before decoding: a request of 100,000 texts costs nothing more.
        self.check_count(element_count(TEXT_INPUT, &input.shape)?, "texts")?;
        let rows = read_texts(input, self.max_text_bytes)?
            .iter()
            .map(|text| self.text.encode(text))
            .collect::<Result<Vec<_>, _>>()?;
        let leading = if self.drops_text_unit_dim && input.shape.last() == Some(&1) {
            input.shape[..input.shape.len() - 1].to_vec()
        } else {
            input.shape.clone()
        };
        Ok(EncodedRequest {
            rows,
            leading,
            text_shape: input.shape.clone(),
            wanted,
        })
    }

    /// Refuses a request of more than `max_texts_per_request` sequences.
    pub fn check_count(&self, count: usize, what: &str) -> Result<(), BackendError> {
        if count > self.max_texts {
            return Err(BackendError::InvalidInput(format!(
                "the request holds {count} {what}; this model takes at most {} per request \
                 (parameter 'max_texts_per_request')",
                self.max_texts
            )));
        }
        Ok(())
    }

    /// Runs the rows of `padded` as one batch and hands the graph's output (shape,
    /// values) to `read`.
    fn run_padded<R>(
        &self,
        instance: &mut EncoderInstance,
        mut padded: PaddedBatch,
        read: impl FnOnce(&[i64], &[f32]) -> Result<R, BackendError>,
    ) -> Result<R, BackendError> {
        let shape = [padded.batch as i64, padded.sequence as i64];
        let tokens = self
            .metrics
            .as_ref()
            .map(|_| padded.attention_mask.iter().filter(|&&m| m != 0).count());
        let mut feeds: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::new();
        for (name, role) in &instance.inputs {
            let values = match role {
                GraphInput::InputIds => std::mem::take(&mut padded.ids),
                GraphInput::AttentionMask => std::mem::take(&mut padded.attention_mask),
                GraphInput::TokenTypeIds => std::mem::take(&mut padded.type_ids),
            };
            feeds.push((
                Cow::Borrowed(name.as_str()),
                Tensor::from_array((shape, values))?.into(),
            ));
        }
        let outputs = instance.session.run(feeds)?;
        if let (Some(metrics), Some(tokens)) = (&self.metrics, tokens) {
            metrics.ran(tokens, padded.batch, padded.sequence);
        }
        let value = outputs.get(&instance.output).ok_or_else(|| {
            BackendError::internal(format!("the model returned no '{}'", instance.output))
        })?;
        let (out_shape, data) = read_f32(value)?;
        read(out_shape, &data)
    }

    /// Runs every request's rows and hands the graph's output for the whole batch
    /// (shape, values, as if run as one batch padded to its longest row) and that
    /// padded batch to `split`, which answers the requests. Rows of very different
    /// lengths run as separate batches, unless `regroup` is false; the positions past a
    /// row's own group's length are then 0.
    fn run<R>(
        &self,
        instance: &mut EncoderInstance,
        requests: &[EncodedRequest],
        regroup: bool,
        split: impl FnOnce(&[i64], &[f32], &PaddedBatch) -> Result<R, BackendError>,
    ) -> Result<R, BackendError> {
        let rows: Vec<&TokenRow> = requests.iter().flat_map(|r| &r.rows).collect();
        let pad_id = self.text.pad_id();
        let mut padded = pad_batch(&rows, pad_id);
        let groups = if regroup && self.group_by_length {
            let lengths: Vec<usize> = rows.iter().map(|row| row.ids.len()).collect();
            length_groups(&lengths, RUN_COST_TOKENS)
        } else {
            Vec::new()
        };
        if groups.len() < 2 {
            // The run takes the ids; `split` reads the mask again.
            let fed = PaddedBatch {
                batch: padded.batch,
                sequence: padded.sequence,
                ids: std::mem::take(&mut padded.ids),
                attention_mask: padded.attention_mask.clone(),
                type_ids: std::mem::take(&mut padded.type_ids),
            };
            return self.run_padded(instance, fed, |shape, data| split(shape, data, &padded));
        }
        // Each group's output rows go where the rows sit in the whole batch; a row's
        // output is [sequence, width] (token outputs) or [width].
        let mut whole: Vec<f32> = Vec::new();
        let mut whole_shape: Vec<i64> = Vec::new();
        for group in groups {
            let members: Vec<&TokenRow> = group.iter().map(|&row| rows[row]).collect();
            self.run_padded(instance, pad_batch(&members, pad_id), |shape, data| {
                let dims: Vec<usize> = shape
                    .iter()
                    .map(|&d| usize::try_from(d).unwrap_or(0))
                    .collect();
                // A row's output in this group, and its place in the whole batch's.
                let (own, row_dims) = match dims[..] {
                    [_, sequence, width] => (sequence * width, vec![padded.sequence, width]),
                    [_, width] => (width, vec![width]),
                    _ => {
                        return Err(BackendError::internal(format!(
                            "the model's output has shape {shape:?}"
                        )));
                    }
                };
                let stride: usize = row_dims.iter().product();
                if whole.is_empty() {
                    whole = vec![0.0; padded.batch * stride];
                    whole_shape = std::iter::once(padded.batch)
                        .chain(row_dims)
                        .map(|d| d as i64)
                        .collect();
                }
                if whole.len() != padded.batch * stride || data.len() != group.len() * own {
                    return Err(BackendError::internal(format!(
                        "the model's output has shape {shape:?} for a group of {} rows",
                        group.len()
                    )));
                }
                for (slot, &row) in group.iter().enumerate() {
                    whole[row * stride..row * stride + own]
                        .copy_from_slice(&data[slot * own..(slot + 1) * own]);
                }
                Ok(())
            })?;
        }
        split(&whole_shape, &whole, &padded)
    }

    /// Runs the batch, and answers its requests with `answer(requests, responders,
    /// output shape, output values, padded batch)`; a failure fails every request not
    /// answered yet. `keeps_padding` says which requests are answered with the padded
    /// positions of the graph's output: a batch with one runs as one padded batch.
    pub fn execute(
        &self,
        instance: &mut EncoderInstance,
        batch: Vec<Pending<EncodedRequest>>,
        keeps_padding: fn(&EncodedRequest) -> bool,
        answer: impl FnOnce(
            &[EncodedRequest],
            &mut [Box<dyn Responder>],
            &[i64],
            &[f32],
            &PaddedBatch,
        ) -> Result<(), BackendError>,
    ) {
        let (requests, mut responders) = unzip_batch(batch);
        let regroup = !requests.iter().any(keeps_padding);
        let run = self.run(instance, &requests, regroup, |shape, values, padded| {
            answer(&requests, &mut responders, shape, values, padded)
        });
        if let Err(error) = run {
            fail_all(&mut responders, &error);
        }
    }

    /// Runs a short sequence of the tokenizer's highest id, then one sequence of
    /// `max_sequence_length` tokens, the longest a request can send: a tokenizer of
    /// another model, or a model whose position table is shorter, fails here, at load,
    /// instead of on requests. Returns the width of the graph's output (labels or hidden
    /// size), which the configuration's output dimensions must match.
    fn probe(&self, instance: &mut EncoderInstance) -> Result<usize, BackendError> {
        let highest = self.text.highest_id();
        let row = TokenRow {
            ids: vec![highest; 2],
            attention_mask: vec![1; 2],
            type_ids: vec![0; 2],
        };
        self.run_padded(instance, pad_batch(&[&row], self.text.pad_id()), |_, _| {
            Ok(())
        })
        .map_err(|error| vocabulary_mismatch(self.text.tokenizer(), highest, error))?;
        let length = self.text.max_length();
        let row = TokenRow {
            ids: vec![self.text.pad_id(); length],
            attention_mask: vec![1; length],
            type_ids: vec![0; length],
        };
        let shape = self
            .run_padded(
                instance,
                pad_batch(&[&row], self.text.pad_id()),
                |shape, _| Ok(shape.to_vec()),
            )
            .map_err(|error| {
                BackendError::Config(format!(
                    "max_sequence_length is {length}, but a sequence of {length} tokens fails \
                     on this model (is its position table shorter?): {error}"
                ))
            })?;
        shape
            .last()
            .and_then(|&width| usize::try_from(width).ok())
            .filter(|&width| width > 0)
            .ok_or_else(|| {
                BackendError::Unsupported(format!(
                    "the model's output '{}' has shape {shape:?}",
                    instance.output
                ))
            })
    }

    /// The model version's memory: its tokenizer.
    /// Rows per batch of requests from several executions ([`super::Task::batch_across_executions`]):
    /// a request's worth of texts, where Triton does not batch and `batch_requests` is on.
    pub fn batch_across_executions(&self) -> Option<usize> {
        (self.batch_requests && !self.drops_text_unit_dim).then_some(self.max_texts)
    }

    pub fn memory_usage(&self) -> Vec<MemoryUsage> {
        let mut usage = vec![memory::tokenizer_usage(self.text.tokenizer())];
        usage.extend(self.model.memory_usage());
        usage
    }

    /// An instance's memory: its session's weights, on its device.
    pub fn instance_memory_usage(
        &self,
        instance: &EncoderInstance,
    ) -> Result<Vec<MemoryUsage>, BackendError> {
        Ok(vec![self.model.instance_memory_usage(instance.device)?])
    }
}
