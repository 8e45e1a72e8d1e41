//! What the two encoder tasks share: texts tokenized per request, all requests of one
//! execution run as one right-padded ONNX batch on the instance's session, and the
//! outputs cut back per request.

use std::borrow::Cow;

use ort::session::{Session, SessionInputValue};
use ort::value::Tensor;
use serde::Deserialize;

use super::task::{InstanceContext, ModelContext, Pending, fail_all, unzip_batch};
use crate::error::BackendError;
use crate::memory;
use crate::onnx::{Device, OnnxModel};
use crate::responder::Responder;
use crate::settings::{SessionSettings, SettingsGroup, TextSettings, non_empty, positive_at_most};
use crate::text::{TEXT_INPUT, read_texts};
use crate::tokenize::{PaddedBatch, TOKENIZER_FILE, TextEncoder, TokenRow, pad_batch};
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
    /// The configuration's outputs and their dims, checked against the model.
    declared_outputs: Vec<(String, Vec<i64>)>,
}

impl Encoder {
    pub fn load(model: &ModelContext<'_>, settings: EncoderSettings) -> Result<Self, BackendError> {
        let (session, text, batch) = settings;
        let onnx = OnnxModel::open(model.onnxruntime, model.version_dir, session)?;
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
            Some(outlet) => outlet.name().to_owned(),
            None if outputs.len() == 1 => outputs[0].name().to_owned(),
            None => {
                let names: Vec<_> = outputs.iter().map(|o| o.name().to_owned()).collect();
                return Err(BackendError::Unsupported(format!(
                    "the ONNX model has no '{wanted}' output (it has {names:?})"
                )));
            }
        };
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

    /// Runs every request as one padded ONNX batch and hands the graph's output
    /// (shape, values) and the padded batch to `split`, which answers the requests.
    fn run<R>(
        &self,
        instance: &mut EncoderInstance,
        requests: &[EncodedRequest],
        split: impl FnOnce(&[i64], &[f32], &PaddedBatch) -> Result<R, BackendError>,
    ) -> Result<R, BackendError> {
        let rows: Vec<&TokenRow> = requests.iter().flat_map(|r| &r.rows).collect();
        let mut padded = pad_batch(&rows, self.text.pad_id());
        let shape = [padded.batch as i64, padded.sequence as i64];
        let mut feeds: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::new();
        for (name, role) in &instance.inputs {
            // The mask is read again for pooling; ids and type ids are moved out.
            let values = match role {
                GraphInput::InputIds => std::mem::take(&mut padded.ids),
                GraphInput::AttentionMask => padded.attention_mask.clone(),
                GraphInput::TokenTypeIds => std::mem::take(&mut padded.type_ids),
            };
            feeds.push((
                Cow::Borrowed(name.as_str()),
                Tensor::from_array((shape, values))?.into(),
            ));
        }
        let outputs = instance.session.run(feeds)?;
        let value = outputs.get(&instance.output).ok_or_else(|| {
            BackendError::internal(format!("the model returned no '{}'", instance.output))
        })?;
        let (out_shape, data) = value.try_extract_tensor::<f32>()?;
        split(out_shape, data, &padded)
    }

    /// Runs the batch, and answers its requests with `answer(requests, responders,
    /// output shape, output values, padded batch)`; a failure fails every request not
    /// answered yet.
    pub fn execute(
        &self,
        instance: &mut EncoderInstance,
        batch: Vec<Pending<EncodedRequest>>,
        answer: impl FnOnce(
            &[EncodedRequest],
            &mut [Box<dyn Responder>],
            &[i64],
            &[f32],
            &PaddedBatch,
        ) -> Result<(), BackendError>,
    ) {
        let (requests, mut responders) = unzip_batch(batch);
        let run = self.run(instance, &requests, |shape, values, padded| {
            answer(&requests, &mut responders, shape, values, padded)
        });
        if let Err(error) = run {
            fail_all(&mut responders, &error);
        }
    }

    /// Runs one sequence of `max_sequence_length` tokens, the longest a request can
    /// send: a model whose position table is shorter fails here, at load, instead of on
    /// every long request. Returns the width of the graph's output (labels or hidden
    /// size), which the configuration's output dimensions must match.
    fn probe(&self, instance: &mut EncoderInstance) -> Result<usize, BackendError> {
        let length = self.text.max_length();
        let row = TokenRow {
            ids: vec![self.text.pad_id(); length],
            attention_mask: vec![1; length],
            type_ids: vec![0; length],
        };
        let request = EncodedRequest {
            rows: vec![row],
            leading: vec![1],
            text_shape: vec![1],
            wanted: Vec::new(),
        };
        let shape = self
            .run(instance, std::slice::from_ref(&request), |shape, _, _| {
                Ok(shape.to_vec())
            })
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
    pub fn memory_usage(&self) -> Vec<MemoryUsage> {
        vec![memory::tokenizer_usage(self.text.tokenizer())]
    }

    /// An instance's memory: its session's weights, on its device.
    pub fn instance_memory_usage(
        &self,
        instance: &EncoderInstance,
    ) -> Result<Vec<MemoryUsage>, BackendError> {
        Ok(vec![memory::session_weights(
            &self.model.path,
            instance.device,
        )?])
    }
}
