//! The parts of a Triton model configuration this backend reads, parsed once at load.
//!
//! Triton hands the configuration over as JSON (protobuf JSON mapping, where 64-bit
//! integers may arrive as strings). Parameters are validated here so a typo in
//! `config.pbtxt` is a load error that names the parameter, not a silent default.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::error::BackendError;
use crate::generation::{GENERATION_PARAMETERS, MAX_PROMPTS, USE_CACHE};

/// An input or output declared in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    /// As written in the configuration, e.g. `TYPE_STRING`.
    pub data_type: String,
    pub dims: Vec<i64>,
    pub optional: bool,
}

/// The model configuration fields the backend uses.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub name: String,
    pub max_batch_size: i64,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub parameters: BTreeMap<String, String>,
    /// `model_transaction_policy { decoupled: true }`: responses stream.
    pub decoupled: bool,
}

fn config_error(message: impl Into<String>) -> BackendError {
    BackendError::Config(message.into())
}

/// Reads a protobuf-JSON integer, which Triton may write as a number or a string.
pub(crate) fn json_int(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn parse_tensors(config: &Value, key: &str) -> Result<Vec<TensorSpec>, BackendError> {
    let Some(list) = config.get(key) else {
        return Ok(Vec::new());
    };
    let list = list
        .as_array()
        .ok_or_else(|| config_error(format!("'{key}' is not a list")))?;
    list.iter()
        .map(|tensor| {
            let name = tensor
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| config_error(format!("an entry of '{key}' has no name")))?;
            let data_type = tensor
                .get("data_type")
                .and_then(Value::as_str)
                .unwrap_or("TYPE_INVALID");
            let dims = match tensor.get("dims") {
                None => Vec::new(),
                Some(dims) => dims
                    .as_array()
                    .ok_or_else(|| config_error(format!("dims of '{name}' are not a list")))?
                    .iter()
                    .map(|d| {
                        json_int(d).ok_or_else(|| {
                            config_error(format!("dims of '{name}' are not integers"))
                        })
                    })
                    .collect::<Result<_, _>>()?,
            };
            let optional = tensor
                .get("optional")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            Ok(TensorSpec {
                name: name.to_owned(),
                data_type: data_type.to_owned(),
                dims,
                optional,
            })
        })
        .collect()
}

impl ModelConfig {
    pub fn from_json(json: &str) -> Result<Self, BackendError> {
        let config: Value = serde_json::from_str(json)
            .map_err(|e| config_error(format!("model configuration is not JSON: {e}")))?;
        let name = config
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let max_batch_size = config.get("max_batch_size").and_then(json_int).unwrap_or(0);
        let mut parameters = BTreeMap::new();
        if let Some(map) = config.get("parameters").and_then(Value::as_object) {
            for (key, value) in map {
                let text = value
                    .get("string_value")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        config_error(format!("parameter '{key}' has no string_value"))
                    })?;
                parameters.insert(key.clone(), text.to_owned());
            }
        }
        let decoupled = config
            .pointer("/model_transaction_policy/decoupled")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(ModelConfig {
            name,
            max_batch_size,
            inputs: parse_tensors(&config, "input")?,
            outputs: parse_tensors(&config, "output")?,
            parameters,
            decoupled,
        })
    }

    pub fn input(&self, name: &str) -> Option<&TensorSpec> {
        self.inputs.iter().find(|t| t.name == name)
    }

    pub fn output(&self, name: &str) -> Option<&TensorSpec> {
        self.outputs.iter().find(|t| t.name == name)
    }
}

/// What a model serves, from the `task` parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    /// Text in, softmax scores and the arg-max label out.
    SentimentClassifier,
    /// Text or token ids in, hidden states and a pooled embedding out.
    FeatureExtraction,
    /// A prompt in, the prompt and its continuation out (decoder with a KV cache).
    TextGeneration,
}

impl TaskKind {
    pub const NAMES: &'static str =
        "'sentiment-classifier', 'feature-extraction', 'text-generation'";

    pub fn name(self) -> &'static str {
        match self {
            TaskKind::SentimentClassifier => "sentiment-classifier",
            TaskKind::FeatureExtraction => "feature-extraction",
            TaskKind::TextGeneration => "text-generation",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        match name {
            "sentiment-classifier" => Some(TaskKind::SentimentClassifier),
            "feature-extraction" => Some(TaskKind::FeatureExtraction),
            "text-generation" => Some(TaskKind::TextGeneration),
            _ => None,
        }
    }
}

/// Parameter names this backend accepts in `config.pbtxt`, besides the generation
/// defaults ([`GENERATION_PARAMETERS`]), `eos_token`, `max_prompts_per_request` and
/// `use_cache` of `text-generation` models.
pub const KNOWN_PARAMETERS: &[&str] = &[
    "task",
    "max_sequence_length",
    "labels",
    "pad_token",
    "intra_op_thread_count",
    "inter_op_thread_count",
    "max_text_bytes",
];

/// The default of `max_text_bytes`: far above any text a model's context can hold,
/// low enough that tokenizing an abusive request cannot stall an instance for long.
pub const DEFAULT_MAX_TEXT_BYTES: usize = 1 << 20;

/// Token that ends generation, for `text-generation` models.
pub const EOS_TOKEN: &str = "eos_token";

/// Validated backend settings from the model's `parameters`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSettings {
    pub task: TaskKind,
    /// Tokens per text, special tokens included; longer texts are truncated.
    pub max_sequence_length: Option<usize>,
    /// Label names by class index (classifier only).
    pub labels: Option<Vec<String>>,
    /// Token used for padding when the tokenizer does not name one.
    pub pad_token: Option<String>,
    pub intra_op_threads: usize,
    pub inter_op_threads: usize,
    /// UTF-8 bytes per text at most; longer texts are refused before tokenization.
    pub max_text_bytes: usize,
}

fn positive_int(
    parameters: &BTreeMap<String, String>,
    key: &str,
) -> Result<Option<usize>, BackendError> {
    parameters
        .get(key)
        .map(|text| match text.trim().parse::<usize>() {
            Ok(value) if value > 0 => Ok(value),
            _ => Err(config_error(format!(
                "parameter '{key}' must be a positive integer, got '{text}'"
            ))),
        })
        .transpose()
}

impl ModelSettings {
    pub fn from_parameters(parameters: &BTreeMap<String, String>) -> Result<Self, BackendError> {
        let is_generation_setting = |key: &str| {
            [EOS_TOKEN, MAX_PROMPTS, USE_CACHE].contains(&key)
                || GENERATION_PARAMETERS.contains(&key)
        };
        if let Some(unknown) = parameters
            .keys()
            .find(|key| !KNOWN_PARAMETERS.contains(&key.as_str()) && !is_generation_setting(key))
        {
            return Err(config_error(format!(
                "unknown parameter '{unknown}'; known parameters: {}, and for text-generation {}, {EOS_TOKEN}, {MAX_PROMPTS}, {USE_CACHE}",
                KNOWN_PARAMETERS.join(", "),
                GENERATION_PARAMETERS.join(", ")
            )));
        }
        let task_name = parameters.get("task").ok_or_else(|| {
            config_error(format!(
                "parameter 'task' is required: one of {}",
                TaskKind::NAMES
            ))
        })?;
        let task = TaskKind::parse(task_name.trim()).ok_or_else(|| {
            config_error(format!(
                "parameter 'task' is '{task_name}'; expected one of {}",
                TaskKind::NAMES
            ))
        })?;
        let labels = match parameters.get("labels") {
            None => None,
            Some(text) => {
                let labels: Vec<String> = text.split(',').map(|l| l.trim().to_owned()).collect();
                if labels.iter().any(String::is_empty) {
                    return Err(config_error(format!(
                        "parameter 'labels' must be comma-separated non-empty names, got '{text}'"
                    )));
                }
                Some(labels)
            }
        };
        if task != TaskKind::TextGeneration
            && let Some(key) = parameters.keys().find(|key| is_generation_setting(key))
        {
            return Err(config_error(format!(
                "parameter '{key}' only applies to task 'text-generation'"
            )));
        }
        if labels.is_some() && task != TaskKind::SentimentClassifier {
            return Err(config_error(
                "parameter 'labels' only applies to task 'sentiment-classifier'",
            ));
        }
        let pad_token = match parameters.get("pad_token") {
            Some(token) if token.is_empty() => {
                return Err(config_error("parameter 'pad_token' is empty"));
            }
            other => other.cloned(),
        };
        Ok(ModelSettings {
            task,
            max_sequence_length: positive_int(parameters, "max_sequence_length")?,
            labels,
            pad_token,
            intra_op_threads: positive_int(parameters, "intra_op_thread_count")?.unwrap_or(1),
            inter_op_threads: positive_int(parameters, "inter_op_thread_count")?.unwrap_or(1),
            max_text_bytes: positive_int(parameters, "max_text_bytes")?
                .unwrap_or(DEFAULT_MAX_TEXT_BYTES),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{
        "name": "sentiment-classifier", "max_batch_size": "8",
        "input": [{"name": "text_input", "data_type": "TYPE_STRING", "dims": ["1"]}],
        "output": [{"name": "sentiment_score", "data_type": "TYPE_FP32", "dims": [-1]}],
        "parameters": {"task": {"string_value": "sentiment-classifier"},
                       "labels": {"string_value": "negative, neutral,positive"},
                       "intra_op_thread_count": {"string_value": "2"}}
    }"#;

    #[test]
    fn parses_config_json_with_string_integers() {
        let config = ModelConfig::from_json(CONFIG).expect("valid config");
        assert_eq!(config.max_batch_size, 8);
        assert_eq!(
            config.input("text_input").map(|t| t.dims.clone()),
            Some(vec![1])
        );
        assert_eq!(
            config.output("sentiment_score").map(|t| t.dims.clone()),
            Some(vec![-1])
        );
        let settings =
            ModelSettings::from_parameters(&config.parameters).expect("valid parameters");
        assert_eq!(settings.task, TaskKind::SentimentClassifier);
        assert_eq!(
            settings.labels,
            Some(vec!["negative".into(), "neutral".into(), "positive".into()])
        );
        assert_eq!(settings.intra_op_threads, 2);
        assert_eq!(settings.inter_op_threads, 1);
    }

    fn parameters(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn rejects_bad_parameters_by_name() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[], "parameter 'task' is required"),
            (&[("task", "translate")], "parameter 'task' is 'translate'"),
            (
                &[("task", "feature-extraction"), ("max_sequence_length", "0")],
                "'max_sequence_length' must be a positive integer",
            ),
            (
                &[
                    ("task", "feature-extraction"),
                    ("intra_op_thread_count", "x"),
                ],
                "'intra_op_thread_count' must be a positive integer",
            ),
            (
                &[("task", "feature-extraction"), ("labels", "a,b")],
                "'labels' only applies",
            ),
            (
                &[("task", "sentiment-classifier"), ("labels", "a,,b")],
                "non-empty names",
            ),
            (
                &[("task", "sentiment-classifier"), ("max_seq_len", "8")],
                "unknown parameter 'max_seq_len'",
            ),
            (
                &[("task", "feature-extraction"), ("temperature", "0.5")],
                "'temperature' only applies to task 'text-generation'",
            ),
        ];
        for (pairs, expected) in cases {
            let error = ModelSettings::from_parameters(&parameters(pairs))
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(expected),
                "{error} should contain {expected}"
            );
        }
    }
}
