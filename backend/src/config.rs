//! The parts of a Triton model configuration this backend reads, parsed once at load.
//!
//! Triton hands the configuration over as JSON (protobuf JSON mapping, where 64-bit
//! integers may arrive as strings and every `parameters` value is a `string_value`).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

use crate::error::BackendError;
use crate::types::DataType;

/// Reads a protobuf-JSON integer, which Triton may write as a number or a string.
fn proto_int<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ProtoInt {
        Number(i64),
        Text(String),
    }
    match ProtoInt::deserialize(deserializer)? {
        ProtoInt::Number(n) => Ok(n),
        ProtoInt::Text(text) => text
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("'{text}' is not an integer"))),
    }
}

fn proto_ints<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<i64>, D::Error> {
    #[derive(Deserialize)]
    struct Int(#[serde(deserialize_with = "proto_int")] i64);
    Ok(Vec::<Int>::deserialize(deserializer)?
        .into_iter()
        .map(|Int(n)| n)
        .collect())
}

/// `parameters { key: "k" value: { string_value: "v" } }` as a map `k -> v`.
fn string_parameters<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    struct Parameter {
        string_value: String,
    }
    Ok(BTreeMap::<String, Parameter>::deserialize(deserializer)?
        .into_iter()
        .map(|(key, value)| (key, value.string_value))
        .collect())
}

/// An input or output declared in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    /// As written in the configuration, e.g. `TYPE_STRING`.
    #[serde(default = "invalid_type")]
    pub data_type: String,
    #[serde(default, deserialize_with = "proto_ints")]
    pub dims: Vec<i64>,
    #[serde(default)]
    pub optional: bool,
}

fn invalid_type() -> String {
    "TYPE_INVALID".into()
}

#[derive(Debug, Clone, Default, Deserialize)]
struct TransactionPolicy {
    #[serde(default)]
    decoupled: bool,
}

/// One `model_warmup` sample.
#[derive(Debug, Clone, Deserialize)]
pub struct WarmupSample {
    #[serde(default)]
    pub name: String,
    /// How many identical requests Triton sends (0: the sample is skipped).
    #[serde(default, deserialize_with = "proto_int")]
    pub batch_size: i64,
    #[serde(default)]
    pub inputs: BTreeMap<String, WarmupInput>,
}

/// One input of a warm-up sample, and where Triton takes its data from.
#[derive(Debug, Clone, Deserialize)]
pub struct WarmupInput {
    pub data_type: String,
    #[serde(default, deserialize_with = "proto_ints")]
    pub dims: Vec<i64>,
    #[serde(default)]
    pub zero_data: bool,
    #[serde(default)]
    pub random_data: bool,
    /// A file under `<model>/warmup/`.
    pub input_data_file: Option<String>,
}

impl WarmupInput {
    pub fn datatype(&self) -> Option<DataType> {
        DataType::from_config_name(&self.data_type)
    }
}

/// One `instance_group`: `count` instances, on each GPU listed (else once).
#[derive(Debug, Clone, Default, Deserialize)]
struct InstanceGroup {
    #[serde(default, deserialize_with = "proto_int")]
    count: i64,
    #[serde(default, deserialize_with = "proto_ints")]
    gpus: Vec<i64>,
    /// As Triton resolved it (`KIND_AUTO` becomes `KIND_GPU` where GPUs are visible).
    #[serde(default)]
    kind: String,
}

/// The `instance_group` kind of instances that run on a GPU.
pub const KIND_GPU: &str = "KIND_GPU";

/// The model configuration fields the backend uses.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelConfig {
    #[serde(default)]
    pub name: String,
    #[serde(default, deserialize_with = "proto_int")]
    pub max_batch_size: i64,
    #[serde(default, rename = "input")]
    pub inputs: Vec<TensorSpec>,
    #[serde(default, rename = "output")]
    pub outputs: Vec<TensorSpec>,
    #[serde(default, deserialize_with = "string_parameters")]
    pub parameters: BTreeMap<String, String>,
    #[serde(default)]
    model_transaction_policy: TransactionPolicy,
    #[serde(default)]
    pub model_warmup: Vec<WarmupSample>,
    #[serde(default)]
    instance_group: Vec<InstanceGroup>,
    /// Only whether it is there (see [`ModelConfig::check_scheduler`]).
    #[serde(default)]
    sequence_batching: Option<serde::de::IgnoredAny>,
}

impl ModelConfig {
    pub fn from_json(json: &str) -> Result<Self, BackendError> {
        serde_json::from_str(json)
            .map_err(|e| BackendError::Config(format!("cannot read the model configuration: {e}")))
    }

    /// How many instances Triton creates of each version.
    pub fn instance_count(&self) -> usize {
        self.instance_group
            .iter()
            .map(|group| {
                let count = usize::try_from(group.count).unwrap_or(0);
                count * group.gpus.len().max(1)
            })
            .sum()
    }

    /// Ok when every instance group runs on a GPU; else an error naming the first one
    /// that does not, for servers that must not leave a GPU they hold idle.
    pub fn require_gpu_instances(&self) -> Result<(), BackendError> {
        match self
            .instance_group
            .iter()
            .find(|group| group.kind != KIND_GPU)
        {
            Some(group) => Err(BackendError::Config(format!(
                "this server takes GPU instances only (--backend-config=rust,require-gpu=true), \
                 but an instance_group has kind {}: set kind: {KIND_GPU} \
                 (tools/export/export_models.py --instance-kind gpu writes such configs)",
                if group.kind.is_empty() {
                    "unset"
                } else {
                    &group.kind
                }
            ))),
            None => Ok(()),
        }
    }

    /// Refuses `sequence_batching`: no task keeps state between requests (correlation
    /// IDs, START/END controls), and Triton's sequence batcher aborts the whole server
    /// allocating its slots when `max_batch_size` is large (2^31 - 1: `std::bad_alloc`).
    pub fn check_scheduler(&self) -> Result<(), BackendError> {
        if self.sequence_batching.is_some() {
            return Err(BackendError::Config(
                "sequence_batching is not supported: this backend's tasks keep no state \
                 between requests; use dynamic_batching (and, to keep a user on one version, \
                 a traffic-split router's 'user_id' request parameter)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// `model_transaction_policy { decoupled: true }`: responses stream.
    pub fn decoupled(&self) -> bool {
        self.model_transaction_policy.decoupled
    }

    pub fn input(&self, name: &str) -> Option<&TensorSpec> {
        self.inputs.iter().find(|t| t.name == name)
    }

    pub fn output(&self, name: &str) -> Option<&TensorSpec> {
        self.outputs.iter().find(|t| t.name == name)
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
                       "intra_op_thread_count": {"string_value": "2"}},
        "model_transaction_policy": {"decoupled": true},
        "model_warmup": [{"name": "w", "batch_size": "1", "inputs": {"text_input":
            {"data_type": "TYPE_STRING", "dims": ["2"], "input_data_file": "t.bin"}}}]
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
        assert_eq!(config.parameters["intra_op_thread_count"], "2");
        assert!(config.decoupled());
        let sample = &config.model_warmup[0];
        assert_eq!((sample.name.as_str(), sample.batch_size), ("w", 1));
        let input = &sample.inputs["text_input"];
        assert_eq!(input.dims, vec![2]);
        assert_eq!(input.datatype(), Some(DataType::Bytes));
        assert_eq!(input.input_data_file.as_deref(), Some("t.bin"));
    }

    #[test]
    fn sequence_batching_is_refused() {
        assert!(
            ModelConfig::from_json(CONFIG)
                .expect("valid config")
                .check_scheduler()
                .is_ok()
        );
        for scheduler in [r#"{}"#, r#"{"max_sequence_idle_microseconds": "1000"}"#] {
            let json = format!(r#"{{"max_batch_size": 8, "sequence_batching": {scheduler}}}"#);
            let error = ModelConfig::from_json(&json)
                .expect("valid config")
                .check_scheduler()
                .expect_err("no task keeps state")
                .to_string();
            assert!(
                error.contains("sequence_batching is not supported")
                    && error.contains("dynamic_batching"),
                "{error}"
            );
        }
    }

    #[test]
    fn instances_count_every_group_on_every_gpu() {
        let config = ModelConfig::from_json(
            r#"{"instance_group": [{"count": 2, "kind": "KIND_CPU"},
                {"count": "3", "kind": "KIND_GPU", "gpus": [0, 1]}]}"#,
        )
        .expect("valid config");
        assert_eq!(config.instance_count(), 8);
        assert_eq!(
            ModelConfig::from_json("{}")
                .expect("valid")
                .instance_count(),
            0
        );
    }

    #[test]
    fn gpu_only_servers_refuse_other_instance_kinds() {
        let config = |groups: &str| {
            ModelConfig::from_json(&format!(r#"{{"instance_group": {groups}}}"#)).expect("valid")
        };
        let on_gpu = config(r#"[{"count": 1, "kind": "KIND_GPU", "gpus": [0]}]"#);
        assert!(on_gpu.require_gpu_instances().is_ok());
        let mixed = config(r#"[{"kind": "KIND_GPU"}, {"count": 2, "kind": "KIND_CPU"}]"#);
        let error = mixed
            .require_gpu_instances()
            .expect_err("a CPU group")
            .to_string();
        assert!(
            error.contains("an instance_group has kind KIND_CPU: set kind: KIND_GPU"),
            "{error}"
        );
        let model = config(r#"[{"kind": "KIND_MODEL"}]"#);
        assert!(model.require_gpu_instances().is_err());
    }

    #[test]
    fn a_parameter_without_a_string_value_is_refused() {
        let error = ModelConfig::from_json(r#"{"parameters": {"task": {"int_value": 3}}}"#)
            .expect_err("not a string parameter")
            .to_string();
        assert!(error.contains("string_value"), "{error}");
    }
}
