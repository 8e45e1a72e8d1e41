//! The model logic of the two encoder tasks, free of Triton FFI: request inputs are
//! validated and tokenized, all requests of one execution run as one padded ONNX batch,
//! and the outputs are cut back into per-request tensors.

use std::borrow::Cow;
use std::collections::HashMap;

use ndarray::{ArrayView2, ArrayView3};
use ort::session::{Session, SessionInputValue};
use ort::value::{Tensor, ValueType};

use crate::bytes_tensor;
use crate::config::{ModelConfig, ModelSettings, TaskKind};
use crate::error::BackendError;
use crate::postprocess::{argmax, mean_pool_normalized, softmax};
use crate::tokenize::{TextEncoder, TokenRow, pad_batch};
use crate::triton::{DataType, InputTensor};

pub const TEXT_INPUT: &str = "text_input";
pub const INPUT_IDS: &str = "input_ids";
pub const ATTENTION_MASK: &str = "attention_mask";
pub const SENTIMENT_SCORE: &str = "sentiment_score";
pub const SENTIMENT_LABEL: &str = "sentiment_label";
pub const LAST_HIDDEN_STATE: &str = "last_hidden_state";
pub const EMBEDDING: &str = "embedding";

/// ONNX graph inputs this backend knows how to feed.
const TOKEN_TYPE_IDS: &str = "token_type_ids";
/// The ONNX output each task reads when the graph has several.
const LOGITS: &str = "logits";

/// A tensor as the configuration must declare it for a task.
pub(crate) struct Contract {
    pub name: &'static str,
    pub data_type: &'static str,
    pub required: bool,
}

const CLASSIFIER_INPUTS: &[Contract] = &[Contract {
    name: TEXT_INPUT,
    data_type: "TYPE_STRING",
    required: true,
}];
const CLASSIFIER_OUTPUTS: &[Contract] = &[
    Contract {
        name: SENTIMENT_SCORE,
        data_type: "TYPE_FP32",
        required: false,
    },
    Contract {
        name: SENTIMENT_LABEL,
        data_type: "TYPE_STRING",
        required: false,
    },
];
const ENCODER_INPUTS: &[Contract] = &[
    Contract {
        name: TEXT_INPUT,
        data_type: "TYPE_STRING",
        required: false,
    },
    Contract {
        name: INPUT_IDS,
        data_type: "TYPE_INT64",
        required: false,
    },
    Contract {
        name: ATTENTION_MASK,
        data_type: "TYPE_INT64",
        required: false,
    },
];
const ENCODER_OUTPUTS: &[Contract] = &[
    Contract {
        name: LAST_HIDDEN_STATE,
        data_type: "TYPE_FP32",
        required: false,
    },
    Contract {
        name: EMBEDDING,
        data_type: "TYPE_FP32",
        required: false,
    },
];

pub(crate) fn check_contracts(
    kind: &str,
    declared: &[crate::config::TensorSpec],
    contracts: &[Contract],
    task: &str,
) -> Result<(), BackendError> {
    for spec in declared {
        let contract = contracts
            .iter()
            .find(|c| c.name == spec.name)
            .ok_or_else(|| {
                let names: Vec<_> = contracts.iter().map(|c| c.name).collect();
                BackendError::Config(format!(
                    "{kind} '{}' is not served by task '{task}'; its {kind}s are {names:?}",
                    spec.name
                ))
            })?;
        if spec.data_type != contract.data_type {
            return Err(BackendError::Config(format!(
                "{kind} '{}' must be {}, not {}",
                spec.name, contract.data_type, spec.data_type
            )));
        }
    }
    for contract in contracts.iter().filter(|c| c.required) {
        if !declared.iter().any(|spec| spec.name == contract.name) {
            return Err(BackendError::Config(format!(
                "task '{task}' needs {kind} '{}' ({})",
                contract.name, contract.data_type
            )));
        }
    }
    if declared.is_empty() {
        return Err(BackendError::Config(format!(
            "the configuration declares no {kind}"
        )));
    }
    Ok(())
}

/// The ONNX inputs a graph declares, in the order the session wants them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GraphInput {
    InputIds,
    AttentionMask,
    TokenTypeIds,
}

/// How one instance's session maps onto the task, checked when the instance loads.
#[derive(Debug, Clone)]
pub struct SessionBinding {
    inputs: Vec<(String, GraphInput)>,
    output: String,
}

/// Token rows, the outputs' leading shape and the text shape of a `text_input`.
type TokenizedTexts = (Vec<TokenRow>, Vec<i64>, Vec<i64>);

/// One request's inputs, validated and tokenized.
#[derive(Debug, Clone)]
pub struct PreparedRequest {
    rows: Vec<TokenRow>,
    /// Shape of the per-text outputs' leading dimensions (`[N]` for N texts).
    leading: Vec<i64>,
    /// Shape of `sentiment_label`: the shape of `text_input`.
    text_shape: Vec<i64>,
    wanted: Vec<String>,
}

impl PreparedRequest {
    /// Number of sequences this request adds to the batch.
    pub fn rows(&self) -> usize {
        self.rows.len()
    }
}

/// A finished output tensor in Triton's byte layout.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputTensor {
    pub name: &'static str,
    pub datatype: DataType,
    pub shape: Vec<i64>,
    pub data: Vec<u8>,
}

fn f32_bytes(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    values.into_iter().flat_map(f32::to_le_bytes).collect()
}

/// The encoder tasks this pipeline serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EncoderTask {
    SentimentClassifier,
    FeatureExtraction,
}

/// The task-specific model logic shared by all instances of an encoder model.
pub struct Pipeline {
    task: EncoderTask,
    labels: Option<Vec<String>>,
    text: TextEncoder,
    /// Batched configs declare `text_input` with dims `[1]`: a `[B, 1]` request is B texts
    /// and its per-text outputs lead with `[B]`.
    drops_text_unit_dim: bool,
    max_text_bytes: usize,
}

impl Pipeline {
    pub fn new(
        config: &ModelConfig,
        settings: &ModelSettings,
        text: TextEncoder,
    ) -> Result<Self, BackendError> {
        let task_name = settings.task.name();
        let (task, inputs, outputs) = match settings.task {
            TaskKind::SentimentClassifier => (
                EncoderTask::SentimentClassifier,
                CLASSIFIER_INPUTS,
                CLASSIFIER_OUTPUTS,
            ),
            TaskKind::FeatureExtraction => (
                EncoderTask::FeatureExtraction,
                ENCODER_INPUTS,
                ENCODER_OUTPUTS,
            ),
            TaskKind::TextGeneration => {
                return Err(BackendError::Config(format!(
                    "task '{task_name}' is not an encoder task"
                )));
            }
        };
        check_contracts("input", &config.inputs, inputs, task_name)?;
        check_contracts("output", &config.outputs, outputs, task_name)?;
        if task == EncoderTask::FeatureExtraction {
            let has_ids = config.input(INPUT_IDS).is_some();
            let has_mask = config.input(ATTENTION_MASK).is_some();
            if has_ids != has_mask {
                return Err(BackendError::Config(
                    "inputs 'input_ids' and 'attention_mask' must be declared together".into(),
                ));
            }
            if config.input(TEXT_INPUT).is_none() && !has_ids {
                return Err(BackendError::Config(
                    "declare 'text_input' and/or 'input_ids' + 'attention_mask'".into(),
                ));
            }
        }
        let drops_text_unit_dim = config.max_batch_size > 0
            && config
                .input(TEXT_INPUT)
                .is_some_and(|spec| spec.dims == [1]);
        Ok(Pipeline {
            task,
            labels: settings.labels.clone(),
            text,
            drops_text_unit_dim,
            max_text_bytes: settings.max_text_bytes,
        })
    }

    /// The tokenizer of this model version.
    pub fn text_encoder(&self) -> &TextEncoder {
        &self.text
    }

    /// Checks that a session's graph fits the task and records how to feed it.
    pub fn bind_session(&self, session: &Session) -> Result<SessionBinding, BackendError> {
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
        let wanted = match self.task {
            EncoderTask::SentimentClassifier => LOGITS,
            EncoderTask::FeatureExtraction => LAST_HIDDEN_STATE,
        };
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
        if let (Some(labels), Some(classes)) = (&self.labels, static_last_dim(session, &output))
            && labels.len() != classes
        {
            return Err(BackendError::Config(format!(
                "parameter 'labels' names {} labels but the model outputs {classes}",
                labels.len()
            )));
        }
        Ok(SessionBinding { inputs, output })
    }

    /// Validates and tokenizes one request's inputs.
    pub fn prepare(
        &self,
        mut inputs: HashMap<String, InputTensor>,
        wanted: Vec<String>,
    ) -> Result<PreparedRequest, BackendError> {
        let text = inputs.remove(TEXT_INPUT);
        let ids = inputs.remove(INPUT_IDS);
        let mask = inputs.remove(ATTENTION_MASK);
        if let Some(name) = inputs.keys().next() {
            return Err(BackendError::InvalidInput(format!(
                "unexpected input '{name}'"
            )));
        }
        let (rows, leading, text_shape) = match (text, ids, mask) {
            (Some(text), None, None) => self.prepare_texts(&text)?,
            (None, Some(ids), Some(mask)) => {
                let (rows, leading) = self.prepare_ids(&ids, &mask)?;
                (rows, leading, Vec::new())
            }
            (Some(_), _, _) => {
                return Err(BackendError::InvalidInput(
                    "send either 'text_input' or 'input_ids' + 'attention_mask', not both".into(),
                ));
            }
            (None, None, None) => {
                return Err(BackendError::InvalidInput(
                    "no input: send 'text_input' or 'input_ids' + 'attention_mask'".into(),
                ));
            }
            (None, _, _) => {
                return Err(BackendError::InvalidInput(
                    "'input_ids' and 'attention_mask' must be sent together".into(),
                ));
            }
        };
        if rows.is_empty() {
            return Err(BackendError::InvalidInput(
                "the request holds no sequence".into(),
            ));
        }
        Ok(PreparedRequest {
            rows,
            leading,
            text_shape,
            wanted,
        })
    }

    fn prepare_texts(&self, input: &InputTensor) -> Result<TokenizedTexts, BackendError> {
        let rows = read_texts(input, self.max_text_bytes)?
            .iter()
            .map(|text| self.text.encode(text))
            .collect::<Result<Vec<_>, _>>()?;
        let leading = if self.drops_text_unit_dim && input.shape.last() == Some(&1) {
            input.shape[..input.shape.len() - 1].to_vec()
        } else {
            input.shape.clone()
        };
        Ok((rows, leading, input.shape.clone()))
    }

    fn prepare_ids(
        &self,
        ids: &InputTensor,
        mask: &InputTensor,
    ) -> Result<(Vec<TokenRow>, Vec<i64>), BackendError> {
        for (name, tensor) in [(INPUT_IDS, ids), (ATTENTION_MASK, mask)] {
            if tensor.datatype != DataType::Int64 {
                return Err(BackendError::InvalidInput(format!(
                    "input '{name}' must be INT64, not {}",
                    tensor.datatype.name()
                )));
            }
        }
        if ids.shape != mask.shape {
            return Err(BackendError::InvalidInput(format!(
                "'input_ids' has shape {:?} but 'attention_mask' has {:?}",
                ids.shape, mask.shape
            )));
        }
        let Some((&sequence, leading)) = ids.shape.split_last() else {
            return Err(BackendError::InvalidInput(
                "'input_ids' must have a sequence dimension".into(),
            ));
        };
        let sequence = usize::try_from(sequence).unwrap_or(0);
        if sequence == 0 {
            return Err(BackendError::InvalidInput(
                "'input_ids' holds no tokens".into(),
            ));
        }
        if sequence > self.text.max_length() {
            return Err(BackendError::InvalidInput(format!(
                "'input_ids' has {sequence} tokens per sequence; this model accepts at most {}",
                self.text.max_length()
            )));
        }
        let count = element_count(INPUT_IDS, &ids.shape)?;
        let id_values = read_i64(INPUT_IDS, &ids.data, count)?;
        let mask_values = read_i64(ATTENTION_MASK, &mask.data, count)?;
        let vocab = i64::try_from(self.text.vocab_size()).unwrap_or(i64::MAX);
        if let Some(bad) = id_values.iter().find(|&&id| id < 0 || id >= vocab) {
            return Err(BackendError::InvalidInput(format!(
                "'input_ids' holds {bad}, outside the vocabulary [0, {vocab})"
            )));
        }
        if mask_values.iter().any(|&m| m != 0 && m != 1) {
            return Err(BackendError::InvalidInput(
                "'attention_mask' must hold only 0 and 1".into(),
            ));
        }
        let rows = id_values
            .chunks(sequence)
            .zip(mask_values.chunks(sequence))
            .map(|(ids, mask)| TokenRow {
                ids: ids.to_vec(),
                attention_mask: mask.to_vec(),
                type_ids: vec![0; sequence],
            })
            .collect();
        Ok((rows, leading.to_vec()))
    }

    /// Runs all prepared requests as one batch and returns each request's outputs.
    pub fn run(
        &self,
        session: &mut Session,
        binding: &SessionBinding,
        requests: &[PreparedRequest],
    ) -> Result<Vec<Vec<OutputTensor>>, BackendError> {
        let rows: Vec<TokenRow> = requests
            .iter()
            .flat_map(|r| r.rows.iter().cloned())
            .collect();
        let mut batch = pad_batch(&rows, self.text.pad_id());
        let shape = [batch.batch as i64, batch.sequence as i64];
        let mut feeds: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::new();
        for (name, role) in &binding.inputs {
            // The mask is read again for pooling; ids and type ids are moved out.
            let values = match role {
                GraphInput::InputIds => std::mem::take(&mut batch.ids),
                GraphInput::AttentionMask => batch.attention_mask.clone(),
                GraphInput::TokenTypeIds => std::mem::take(&mut batch.type_ids),
            };
            feeds.push((
                Cow::Borrowed(name.as_str()),
                Tensor::from_array((shape, values))?.into(),
            ));
        }
        let outputs = session.run(feeds)?;
        let value = outputs.get(&binding.output).ok_or_else(|| {
            BackendError::Onnx(format!("the model returned no '{}'", binding.output))
        })?;
        let (out_shape, data) = value.try_extract_tensor::<f32>()?;
        match self.task {
            EncoderTask::SentimentClassifier => self.split_classifier(requests, out_shape, data),
            EncoderTask::FeatureExtraction => {
                let mask =
                    ArrayView2::from_shape((batch.batch, batch.sequence), &batch.attention_mask)
                        .map_err(|e| BackendError::Onnx(e.to_string()))?;
                split_encoder(requests, out_shape, data, mask)
            }
        }
    }

    fn split_classifier(
        &self,
        requests: &[PreparedRequest],
        shape: &[i64],
        logits: &[f32],
    ) -> Result<Vec<Vec<OutputTensor>>, BackendError> {
        let rows: usize = requests.iter().map(PreparedRequest::rows).sum();
        let [batch, classes] = shape else {
            return Err(BackendError::Onnx(format!(
                "logits have shape {shape:?}, expected [batch, labels]"
            )));
        };
        let classes = usize::try_from(*classes).unwrap_or(0);
        if usize::try_from(*batch).ok() != Some(rows)
            || classes == 0
            || logits.len() != rows * classes
        {
            return Err(BackendError::Onnx(format!(
                "logits have shape {shape:?} for a batch of {rows}"
            )));
        }
        let labels: Cow<'_, [String]> = match &self.labels {
            Some(labels) if labels.len() == classes => Cow::Borrowed(labels),
            Some(labels) => {
                return Err(BackendError::Config(format!(
                    "parameter 'labels' names {} labels but the model outputs {classes}",
                    labels.len()
                )));
            }
            None => Cow::Owned((0..classes).map(|i| format!("LABEL_{i}")).collect()),
        };
        let mut offset = 0;
        let mut results = Vec::with_capacity(requests.len());
        for request in requests {
            let mut outputs = Vec::new();
            let probabilities: Vec<Vec<f32>> = logits
                [offset * classes..(offset + request.rows()) * classes]
                .chunks(classes)
                .map(softmax)
                .collect();
            offset += request.rows();
            if request.wants(SENTIMENT_SCORE) {
                let mut shape = request.leading.clone();
                shape.push(classes as i64);
                outputs.push(OutputTensor {
                    name: SENTIMENT_SCORE,
                    datatype: DataType::Fp32,
                    shape,
                    data: f32_bytes(probabilities.iter().flatten().copied()),
                });
            }
            if request.wants(SENTIMENT_LABEL) {
                let names: Vec<&str> = probabilities
                    .iter()
                    .map(|p| argmax(p).map_or("", |i| labels[i].as_str()))
                    .collect();
                outputs.push(OutputTensor {
                    name: SENTIMENT_LABEL,
                    datatype: DataType::Bytes,
                    shape: request.text_shape.clone(),
                    data: bytes_tensor::encode_elements(&names),
                });
            }
            results.push(outputs);
        }
        Ok(results)
    }
}

impl PreparedRequest {
    fn wants(&self, name: &str) -> bool {
        self.wanted.iter().any(|w| w == name)
    }
}

fn split_encoder(
    requests: &[PreparedRequest],
    shape: &[i64],
    hidden: &[f32],
    mask: ArrayView2<i64>,
) -> Result<Vec<Vec<OutputTensor>>, BackendError> {
    let dims: Vec<usize> = shape
        .iter()
        .map(|&d| usize::try_from(d).unwrap_or(0))
        .collect();
    let [batch, sequence, width] = dims[..] else {
        return Err(BackendError::Onnx(format!(
            "last_hidden_state has shape {shape:?}, expected [batch, sequence, hidden]"
        )));
    };
    if (batch, sequence) != mask.dim() {
        return Err(BackendError::Onnx(format!(
            "last_hidden_state has shape {shape:?} for a batch of {:?}",
            mask.dim()
        )));
    }
    let hidden = ArrayView3::from_shape((batch, sequence, width), hidden)
        .map_err(|e| BackendError::Onnx(format!("last_hidden_state: {e}")))?;
    let pooled = mean_pool_normalized(hidden, mask);
    let mut offset = 0;
    let mut results = Vec::with_capacity(requests.len());
    for request in requests {
        let range = offset..offset + request.rows();
        offset = range.end;
        let mut outputs = Vec::new();
        if request.wants(LAST_HIDDEN_STATE) {
            // Cut the batch padding back to this request's own longest sequence.
            let own = request.rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
            let mut shape = request.leading.clone();
            shape.extend([own as i64, width as i64]);
            let values = hidden
                .slice(ndarray::s![range.clone(), ..own, ..])
                .iter()
                .copied()
                .collect::<Vec<_>>();
            outputs.push(OutputTensor {
                name: LAST_HIDDEN_STATE,
                datatype: DataType::Fp32,
                shape,
                data: f32_bytes(values),
            });
        }
        if request.wants(EMBEDDING) {
            let mut shape = request.leading.clone();
            shape.push(width as i64);
            outputs.push(OutputTensor {
                name: EMBEDDING,
                datatype: DataType::Fp32,
                shape,
                data: f32_bytes(pooled.slice(ndarray::s![range, ..]).iter().copied()),
            });
        }
        results.push(outputs);
    }
    Ok(results)
}

/// The last dimension of a session output when the graph fixes it.
fn static_last_dim(session: &Session, output: &str) -> Option<usize> {
    let outlet = session.outputs().iter().find(|o| o.name() == output)?;
    match outlet.dtype() {
        ValueType::Tensor { shape, .. } => shape.last().and_then(|&d| usize::try_from(d).ok()),
        _ => None,
    }
}

/// The texts of a `text_input` tensor: BYTES, one non-empty UTF-8 text of at most
/// `max_bytes` bytes per element.
pub(crate) fn read_texts(
    input: &InputTensor,
    max_bytes: usize,
) -> Result<Vec<String>, BackendError> {
    if input.datatype != DataType::Bytes {
        return Err(BackendError::InvalidInput(format!(
            "input '{TEXT_INPUT}' must be BYTES, not {}",
            input.datatype.name()
        )));
    }
    let count = element_count(TEXT_INPUT, &input.shape)?;
    let texts = bytes_tensor::decode_texts(TEXT_INPUT, &input.data, count)?;
    if let Some((index, text)) = texts.iter().enumerate().find(|(_, t)| t.len() > max_bytes) {
        return Err(BackendError::InvalidInput(format!(
            "input '{TEXT_INPUT}' element {index} holds {} bytes; this model takes at most \
             {max_bytes} per text (parameter 'max_text_bytes')",
            text.len()
        )));
    }
    Ok(texts)
}

/// Number of elements of a request shape; every dimension must be non-negative.
fn element_count(name: &str, shape: &[i64]) -> Result<usize, BackendError> {
    shape.iter().try_fold(1usize, |acc, &d| {
        usize::try_from(d)
            .ok()
            .and_then(|d| acc.checked_mul(d))
            .ok_or_else(|| {
                BackendError::InvalidInput(format!("input '{name}' has shape {shape:?}"))
            })
    })
}

fn read_i64(name: &str, data: &[u8], count: usize) -> Result<Vec<i64>, BackendError> {
    if data.len() != count * 8 {
        return Err(BackendError::InvalidInput(format!(
            "input '{name}' holds {} bytes; {count} INT64 values need {}",
            data.len(),
            count * 8
        )));
    }
    Ok(data
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_count_rejects_negative_dims() {
        assert_eq!(element_count("x", &[2, 3]).ok(), Some(6));
        assert_eq!(element_count("x", &[]).ok(), Some(1));
        assert!(element_count("x", &[2, -1]).is_err());
    }

    #[test]
    fn read_i64_checks_length() {
        let data: Vec<u8> = [7i64, -2].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(read_i64("ids", &data, 2).ok(), Some(vec![7, -2]));
        assert!(read_i64("ids", &data[..15], 2).is_err());
    }

    fn request(rows: &[usize], wanted: &[&str]) -> PreparedRequest {
        PreparedRequest {
            rows: rows
                .iter()
                .map(|&n| TokenRow {
                    ids: vec![5; n],
                    attention_mask: vec![1; n],
                    type_ids: vec![0; n],
                })
                .collect(),
            leading: vec![rows.len() as i64],
            text_shape: vec![rows.len() as i64],
            wanted: wanted.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn encoder_outputs_are_cut_per_request() {
        // Two requests: one row of 1 token, one row of 2 tokens; batch padded to 2.
        let requests = [
            request(&[1], &[LAST_HIDDEN_STATE, EMBEDDING]),
            request(&[2], &[EMBEDDING]),
        ];
        let hidden = [1.0, 0.0, 9.0, 9.0, 0.0, 3.0, 0.0, 1.0];
        let mask = [1i64, 0, 1, 1];
        let mask = ArrayView2::from_shape((2, 2), &mask).expect("shape");
        let outputs = split_encoder(&requests, &[2, 2, 2], &hidden, mask).expect("splits");
        assert_eq!(outputs[0].len(), 2);
        assert_eq!(
            outputs[0][0].shape,
            vec![1, 1, 2],
            "padding cut to the request's length"
        );
        assert_eq!(outputs[0][0].data, f32_bytes([1.0, 0.0]));
        assert_eq!(outputs[0][1].shape, vec![1, 2]);
        assert_eq!(outputs[1].len(), 1, "only requested outputs");
        assert_eq!(outputs[1][0].data, f32_bytes([0.0, 1.0]));
    }
}
