//! `sentiment-classifier`: texts in, softmax scores and the arg-max label out.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer};

use super::encoder::{BatchSettings, EncodedRequest, Encoder, EncoderInstance};
use super::task::{
    Contract, InstanceContext, ModelContext, Pending, RequestData, Task, TensorContract,
};
use crate::bytes_tensor;
use crate::error::BackendError;
use crate::hf_config;
use crate::postprocess::{argmax, softmax};
use crate::responder::Responder;
use crate::settings::{SessionSettings, SettingsGroup, TextSettings};
use crate::text::TEXT_INPUT;
use crate::types::{DataType, MemoryUsage};

pub const SENTIMENT_SCORE: &str = "sentiment_score";
pub const SENTIMENT_LABEL: &str = "sentiment_label";
/// The graph output read when the graph has several.
pub const LOGITS: &str = "logits";

const INPUTS: &[Contract] = &[Contract {
    name: TEXT_INPUT,
    data_type: "TYPE_STRING",
    required: true,
}];
const OUTPUTS: &[Contract] = &[
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

/// Label names by class index.
#[derive(Debug, Clone, Deserialize)]
pub struct LabelSettings {
    #[serde(default, deserialize_with = "label_list")]
    pub labels: Option<Vec<String>>,
}

impl SettingsGroup for LabelSettings {}

/// Comma-separated, non-empty names.
fn label_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Vec<String>>, D::Error> {
    let text = String::deserialize(deserializer)?;
    let labels: Vec<String> = text.split(',').map(|l| l.trim().to_owned()).collect();
    if labels.iter().any(String::is_empty) {
        return Err(serde::de::Error::custom(format!(
            "must be comma-separated non-empty names, got '{text}'"
        )));
    }
    Ok(Some(labels))
}

pub struct SentimentClassifier {
    encoder: Encoder,
    labels: Option<Vec<String>>,
}

impl Task for SentimentClassifier {
    const NAME: &'static str = "sentiment-classifier";
    type Settings = (SessionSettings, TextSettings, BatchSettings, LabelSettings);
    type Instance = EncoderInstance;
    type Request = EncodedRequest;

    fn contract(_decoupled: bool) -> Option<TensorContract> {
        Some(TensorContract {
            inputs: INPUTS,
            outputs: OUTPUTS,
        })
    }

    fn load(model: &ModelContext<'_>, settings: Self::Settings) -> Result<Self, BackendError> {
        let (session, text, batch, labels) = settings;
        // The config's `labels`, else the exported model's config.json `id2label`.
        let labels = match labels.labels {
            Some(labels) => Some(labels),
            None => match hf_config::read(model.version_dir)? {
                Some(hf) => hf_config::labels(&hf)?,
                None => None,
            },
        };
        Ok(SentimentClassifier {
            encoder: Encoder::load(model, (session, text, batch))?,
            labels,
        })
    }

    fn instance(&self, instance: &InstanceContext) -> Result<EncoderInstance, BackendError> {
        let instance = self
            .encoder
            .instance(instance, LOGITS, &[SENTIMENT_SCORE])?;
        let classes = instance.width;
        if let Some(labels) = &self.labels
            && labels.len() != classes
        {
            return Err(BackendError::Config(format!(
                "the labels (parameter 'labels', else config.json's id2label) name {} classes but the model outputs {classes}",
                labels.len()
            )));
        }
        Ok(instance)
    }

    fn prepare(&self, mut request: RequestData<'_>) -> Result<EncodedRequest, BackendError> {
        let text = request.inputs.remove(TEXT_INPUT);
        if let Some(name) = request.inputs.keys().next() {
            return Err(BackendError::InvalidInput(format!(
                "unexpected input '{name}'"
            )));
        }
        let text = text
            .ok_or_else(|| BackendError::InvalidInput(format!("no input: send '{TEXT_INPUT}'")))?;
        let encoded = self
            .encoder
            .encode_texts(&text, request.requested_outputs)?;
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
            |_| false,
            |requests, responders, shape, logits, _| {
                self.answer(requests, responders, shape, logits)
            },
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

impl SentimentClassifier {
    /// Answers each request from its rows of `logits [rows, classes]`.
    fn answer(
        &self,
        requests: &[EncodedRequest],
        responders: &mut [Box<dyn Responder>],
        shape: &[i64],
        logits: &[f32],
    ) -> Result<(), BackendError> {
        let rows: usize = requests.iter().map(|r| r.rows.len()).sum();
        let [batch, classes] = shape else {
            return Err(BackendError::internal(format!(
                "logits have shape {shape:?}, expected [batch, labels]"
            )));
        };
        let classes = usize::try_from(*classes).unwrap_or(0);
        if usize::try_from(*batch).ok() != Some(rows)
            || classes == 0
            || logits.len() != rows * classes
        {
            return Err(BackendError::internal(format!(
                "logits have shape {shape:?} for a batch of {rows}"
            )));
        }
        let labels: Cow<'_, [String]> = match &self.labels {
            Some(labels) if labels.len() == classes => Cow::Borrowed(labels),
            Some(labels) => {
                return Err(BackendError::Config(format!(
                    "the labels (parameter 'labels', else config.json's id2label) name {} classes but the model outputs {classes}",
                    labels.len()
                )));
            }
            None => Cow::Owned((0..classes).map(|i| format!("LABEL_{i}")).collect()),
        };
        let mut rows_of_request = logits.chunks(classes);
        for (request, responder) in requests.iter().zip(responders.iter_mut()) {
            let probabilities: Vec<Vec<f32>> = rows_of_request
                .by_ref()
                .take(request.rows.len())
                .map(softmax)
                .collect();
            // NaN or +inf logits, or all -inf, give NaN scores: no label can be chosen.
            let broken = probabilities
                .iter()
                .position(|p| p.iter().any(|v| !v.is_finite()));
            if let Some(element) = broken {
                responder.fail(&BackendError::not_finite(format_args!(
                    "the model's logits for element {element} are"
                )));
                continue;
            }
            let _reported = responder.respond(true, &mut |writer| {
                if request.wants(SENTIMENT_SCORE) {
                    let mut shape = request.leading.clone();
                    shape.push(classes as i64);
                    writer.f32s(
                        SENTIMENT_SCORE,
                        &shape,
                        probabilities.iter().flatten().copied(),
                    )?;
                }
                if request.wants(SENTIMENT_LABEL) {
                    let names: Vec<&str> = probabilities
                        .iter()
                        .map(|p| argmax(p).map_or("", |i| labels[i].as_str()))
                        .collect();
                    let data = bytes_tensor::encode_elements(&names);
                    writer
                        .buffer(
                            SENTIMENT_LABEL,
                            DataType::Bytes,
                            &request.text_shape,
                            data.len(),
                        )?
                        .copy_from_slice(&data);
                }
                Ok(())
            });
        }
        Ok(())
    }
}
