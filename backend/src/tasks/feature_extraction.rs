//! `feature-extraction`: texts or token ids in, hidden states and a pooled embedding out.

use ndarray::{ArrayView2, ArrayView3, Axis, s};

use super::encoder::{
    ATTENTION_MASK, EncodedRequest, Encoder, EncoderInstance, EncoderSettings, INPUT_IDS,
};
use super::task::{
    Contract, InstanceContext, ModelContext, Pending, RequestData, Task, TensorContract,
};
use crate::error::BackendError;
use crate::postprocess::mean_pool_normalized;
use crate::responder::Responder;
use crate::text::TEXT_INPUT;
use crate::tokenize::{PaddedBatch, TokenRow};
use crate::types::{DataType, InputTensor, MemoryUsage, element_count};

pub const LAST_HIDDEN_STATE: &str = "last_hidden_state";
pub const EMBEDDING: &str = "embedding";

const INPUTS: &[Contract] = &[
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
const OUTPUTS: &[Contract] = &[
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

pub struct FeatureExtraction {
    encoder: Encoder,
}

impl Task for FeatureExtraction {
    const NAME: &'static str = "feature-extraction";
    type Settings = EncoderSettings;
    type Instance = EncoderInstance;
    type Request = EncodedRequest;

    fn contract(_decoupled: bool) -> Option<TensorContract> {
        Some(TensorContract {
            inputs: INPUTS,
            outputs: OUTPUTS,
        })
    }

    fn load(model: &ModelContext<'_>, settings: Self::Settings) -> Result<Self, BackendError> {
        let config = model.config;
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
        Ok(FeatureExtraction {
            encoder: Encoder::load(model, settings)?,
        })
    }

    fn instance(&self, instance: &InstanceContext) -> Result<EncoderInstance, BackendError> {
        self.encoder
            .instance(instance, LAST_HIDDEN_STATE, &[LAST_HIDDEN_STATE, EMBEDDING])
    }

    fn prepare(&self, mut request: RequestData<'_>) -> Result<EncodedRequest, BackendError> {
        let text = request.inputs.remove(TEXT_INPUT);
        let ids = request.inputs.remove(INPUT_IDS);
        let mask = request.inputs.remove(ATTENTION_MASK);
        if let Some(name) = request.inputs.keys().next() {
            return Err(BackendError::InvalidInput(format!(
                "unexpected input '{name}'"
            )));
        }
        let wanted = request.requested_outputs;
        let encoded = match (text, ids, mask) {
            (Some(text), None, None) => self.encoder.encode_texts(&text, wanted)?,
            (None, Some(ids), Some(mask)) => self.encode_ids(&ids, &mask, wanted)?,
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
        if encoded.rows.is_empty() {
            return Err(BackendError::InvalidInput(
                "the request holds no sequence".into(),
            ));
        }
        Ok(encoded)
    }

    fn rows(request: &EncodedRequest) -> usize {
        request.rows.len()
    }

    fn execute(&self, instance: &mut EncoderInstance, batch: Vec<Pending<EncodedRequest>>) {
        self.encoder.execute(
            instance,
            batch,
            |request| request.wants(LAST_HIDDEN_STATE),
            answer,
        );
    }

    fn batch_across_executions(&self) -> Option<usize> {
        self.encoder.batch_across_executions()
    }

    fn memory_usage(&self) -> Vec<MemoryUsage> {
        self.encoder.memory_usage()
    }

    fn instance_memory_usage(
        &self,
        instance: &EncoderInstance,
    ) -> Result<Vec<MemoryUsage>, BackendError> {
        self.encoder.instance_memory_usage(instance)
    }
}

impl FeatureExtraction {
    /// Token ids and their mask as sent: INT64 of one shape `[..., sequence]`, ids in
    /// the vocabulary, mask values 0 and 1.
    fn encode_ids(
        &self,
        ids: &InputTensor<'_>,
        mask: &InputTensor<'_>,
        wanted: Vec<String>,
    ) -> Result<EncodedRequest, BackendError> {
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
        let text = &self.encoder.text;
        if sequence > text.max_length() {
            return Err(BackendError::InvalidInput(format!(
                "'input_ids' has {sequence} tokens per sequence; this model accepts at most {}",
                text.max_length()
            )));
        }
        let count = element_count(INPUT_IDS, &ids.shape)?;
        self.encoder
            .check_count(count / sequence, "sequences of 'input_ids'")?;
        let id_values = read_i64(INPUT_IDS, &ids.data, count)?;
        let mask_values = read_i64(ATTENTION_MASK, &mask.data, count)?;
        let vocab = i64::try_from(text.vocab_size()).unwrap_or(i64::MAX);
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
        // A row that attends to nothing has no embedding (its mean is 0/0).
        if let Some(row) = mask_values
            .chunks(sequence)
            .position(|row| !row.contains(&1))
        {
            return Err(BackendError::InvalidInput(format!(
                "'attention_mask' row {row} is all zeros: every sequence needs at least one \
                 token to attend to"
            )));
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
        Ok(EncodedRequest {
            rows,
            leading: leading.to_vec(),
            text_shape: Vec::new(),
            wanted,
        })
    }
}

/// Answers each request from its rows of `hidden [batch, sequence, width]`: the hidden
/// states cut to the request's own longest sequence, and the masked mean, L2-normalised.
fn answer(
    requests: &[EncodedRequest],
    responders: &mut [Box<dyn Responder>],
    shape: &[i64],
    hidden: &[f32],
    padded: &PaddedBatch,
) -> Result<(), BackendError> {
    let dims: Vec<usize> = shape
        .iter()
        .map(|&d| usize::try_from(d).unwrap_or(0))
        .collect();
    let [batch, sequence, width] = dims[..] else {
        return Err(BackendError::internal(format!(
            "last_hidden_state has shape {shape:?}, expected [batch, sequence, hidden]"
        )));
    };
    if (batch, sequence) != (padded.batch, padded.sequence) {
        return Err(BackendError::internal(format!(
            "last_hidden_state has shape {shape:?} for a batch of {:?}",
            (padded.batch, padded.sequence)
        )));
    }
    let hidden = ArrayView3::from_shape((batch, sequence, width), hidden)
        .map_err(|e| BackendError::internal(format!("last_hidden_state: {e}")))?;
    let mask = ArrayView2::from_shape((batch, sequence), &padded.attention_mask)
        .map_err(|e| BackendError::internal(format!("attention mask: {e}")))?;
    let pooled = mean_pool_normalized(hidden, mask);
    let mut offset = 0;
    for (request, responder) in requests.iter().zip(responders.iter_mut()) {
        let range = offset..offset + request.rows.len();
        offset = range.end;
        // A NaN or infinity at any of a text's positions makes its mean NaN.
        let broken = pooled
            .slice(s![range.clone(), ..])
            .axis_iter(Axis(0))
            .position(|embedding| embedding.iter().any(|v| !v.is_finite()));
        if let Some(element) = broken {
            responder.fail(&BackendError::not_finite(format_args!(
                "the model's hidden states for element {element} are"
            )));
            continue;
        }
        let _reported = responder.respond(true, &mut |writer| {
            if request.wants(LAST_HIDDEN_STATE) {
                // Cut the batch padding back to this request's own longest sequence.
                let own = request.rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
                let mut shape = request.leading.clone();
                shape.extend([own as i64, width as i64]);
                let values = hidden.slice(s![range.clone(), ..own, ..]);
                writer.f32s(LAST_HIDDEN_STATE, &shape, values.iter().copied())?;
            }
            if request.wants(EMBEDDING) {
                let mut shape = request.leading.clone();
                shape.push(width as i64);
                let values = pooled.slice(s![range.clone(), ..]);
                writer.f32s(EMBEDDING, &shape, values.iter().copied())?;
            }
            Ok(())
        });
    }
    Ok(())
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
    use crate::responder::CollectingResponder;

    #[test]
    fn read_i64_checks_length() {
        let data: Vec<u8> = [7i64, -2].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(read_i64("ids", &data, 2).ok(), Some(vec![7, -2]));
        assert!(read_i64("ids", &data[..15], 2).is_err());
    }

    fn request(rows: &[usize], wanted: &[&str]) -> EncodedRequest {
        EncodedRequest {
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

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn encoder_outputs_are_cut_per_request() {
        // Two requests: one row of 1 token, one row of 2 tokens; batch padded to 2.
        let requests = [
            request(&[1], &[LAST_HIDDEN_STATE, EMBEDDING]),
            request(&[2], &[EMBEDDING]),
        ];
        let hidden = [1.0, 0.0, 9.0, 9.0, 0.0, 3.0, 0.0, 1.0];
        let padded = PaddedBatch {
            batch: 2,
            sequence: 2,
            ids: vec![5, 0, 5, 5],
            attention_mask: vec![1, 0, 1, 1],
            type_ids: vec![0; 4],
        };
        let collectors = [
            CollectingResponder::default(),
            CollectingResponder::default(),
        ];
        let mut responders: Vec<Box<dyn Responder>> = collectors
            .iter()
            .map(|c| Box::new(c.clone()) as Box<dyn Responder>)
            .collect();
        answer(&requests, &mut responders, &[2, 2, 2], &hidden, &padded).expect("answers");
        let first = collectors[0].collected.lock().expect("lock");
        let outputs = &first.responses[0];
        assert!(first.finished);
        assert_eq!(outputs.len(), 2);
        assert_eq!(
            outputs[0].shape,
            vec![1, 1, 2],
            "padding cut to the request's length"
        );
        assert_eq!(outputs[0].data, f32_bytes(&[1.0, 0.0]));
        assert_eq!(outputs[1].shape, vec![1, 2]);
        let second = collectors[1].collected.lock().expect("lock");
        assert_eq!(second.responses[0].len(), 1, "only requested outputs");
        assert_eq!(second.responses[0][0].data, f32_bytes(&[0.0, 1.0]));
    }
}
