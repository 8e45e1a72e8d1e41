//! Config auto-complete (Triton's default, off with `--disable-auto-complete-config`): a
//! model directory whose `config.pbtxt` names only `backend: "rust"` and its `task` gets
//! the task's inputs and outputs filled in, as `onnxruntime_backend` does from the
//! graph. Sizes come from `model.onnx` (the last dimension of a classifier's `logits`, of
//! an encoder's `last_hidden_state`), else from the Hugging Face `config.json` beside it
//! (`id2label`, `hidden_size`), else stay variable (-1); when both give one and they
//! differ, the load fails naming both. A config that declares any input or output is
//! left as written: the task checks it against the model at load, and nothing is
//! silently overridden.

use std::path::Path;

use serde_json::{Value, json};

use crate::error::BackendError;
use crate::hf_config::{self, HF_CONFIG};
use crate::onnx::MODEL_FILE;
use crate::onnx_proto::ModelProto;
use crate::tasks::feature_extraction::LAST_HIDDEN_STATE;
use crate::tasks::sentiment::LOGITS;

/// The config with inputs and outputs filled for `task`, or `None` when it already
/// declares some (or the task has no fixed tensors: a router takes its target's).
pub fn complete(
    config: &Value,
    task: &str,
    version_dir: &Path,
) -> Result<Option<Value>, BackendError> {
    let declared = |key: &str| {
        config
            .get(key)
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
    };
    if declared("input") || declared("output") {
        return Ok(None);
    }
    let decoupled = config
        .pointer("/model_transaction_policy/decoupled")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let hf = hf_config::read(version_dir)?;
    let (inputs, outputs) = match task {
        "sentiment-classifier" => {
            let labels = hf
                .as_ref()
                .and_then(|hf| hf.get("id2label"))
                .and_then(Value::as_object)
                .map(|labels| labels.len() as i64);
            let classes = size(version_dir, LOGITS, labels, "id2label")?;
            (
                vec![tensor("text_input", "TYPE_STRING", &[-1], false)],
                vec![
                    tensor("sentiment_score", "TYPE_FP32", &[-1, classes], false),
                    tensor("sentiment_label", "TYPE_STRING", &[-1], false),
                ],
            )
        }
        "feature-extraction" => {
            let hidden_size = hf
                .as_ref()
                .and_then(|hf| hf.get("hidden_size"))
                .and_then(Value::as_i64);
            let hidden = size(version_dir, LAST_HIDDEN_STATE, hidden_size, "hidden_size")?;
            (
                vec![
                    tensor("text_input", "TYPE_STRING", &[-1], true),
                    tensor("input_ids", "TYPE_INT64", &[-1, -1], true),
                    tensor("attention_mask", "TYPE_INT64", &[-1, -1], true),
                ],
                vec![
                    tensor("last_hidden_state", "TYPE_FP32", &[-1, -1, hidden], false),
                    tensor("embedding", "TYPE_FP32", &[-1, hidden], false),
                ],
            )
        }
        "text-generation" => generation_tensors(decoupled),
        _ => return Ok(None),
    };
    let mut completed = config.clone();
    completed["input"] = Value::Array(inputs);
    completed["output"] = Value::Array(outputs);
    Ok(Some(completed))
}

/// The width of the graph output `output`, else what `config.json`'s `hf_key` says
/// (`hf_size`), else -1 (any).
fn size(
    version_dir: &Path,
    output: &str,
    hf_size: Option<i64>,
    hf_key: &str,
) -> Result<i64, BackendError> {
    match (graph_width(version_dir, output)?, hf_size) {
        (Some(graph), Some(hf)) if graph != hf => Err(BackendError::Config(format!(
            "{MODEL_FILE}'s output '{output}' is {graph} wide, but {HF_CONFIG} says {hf} \
             ({hf_key})"
        ))),
        (Some(width), _) | (None, Some(width)) => Ok(width),
        (None, None) => Ok(-1),
    }
}

/// The fixed width of `output` in the version's `model.onnx` (None without the file:
/// the load then says it is missing).
fn graph_width(version_dir: &Path, output: &str) -> Result<Option<i64>, BackendError> {
    let path = version_dir.join(MODEL_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let model = ModelProto::read(&path).map_err(|error| {
        BackendError::ModelFile(format!(
            "cannot read the outputs of {}: {error}",
            path.display()
        ))
    })?;
    Ok(model.output_width(output))
}

/// The generation models' tensors, as shipped: one prompt per request when decoupled
/// (as Triton's vLLM backend), N otherwise; the vLLM-style inputs and outputs optional.
fn generation_tensors(decoupled: bool) -> (Vec<Value>, Vec<Value>) {
    let (text, output) = if decoupled {
        (
            tensor("text_input", "TYPE_STRING", &[1], false),
            "text_output",
        )
    } else {
        (
            tensor("text_input", "TYPE_STRING", &[-1], false),
            "generated_text",
        )
    };
    let mut inputs = vec![text];
    if decoupled {
        inputs.push(tensor("stream", "TYPE_BOOL", &[1], true));
    }
    inputs.push(tensor("sampling_parameters", "TYPE_STRING", &[1], true));
    for flag in [
        "exclude_input_in_output",
        "return_finish_reason",
        "return_num_input_tokens",
        "return_num_output_tokens",
    ] {
        inputs.push(tensor(flag, "TYPE_BOOL", &[1], true));
    }
    let outputs = vec![
        tensor(output, "TYPE_STRING", &[-1], false),
        tensor("finish_reason", "TYPE_STRING", &[-1], false),
        tensor("num_input_tokens", "TYPE_UINT32", &[-1], false),
        tensor("num_output_tokens", "TYPE_UINT32", &[-1], false),
    ];
    (inputs, outputs)
}

fn tensor(name: &str, data_type: &str, dims: &[i64], optional: bool) -> Value {
    let mut spec = json!({ "name": name, "data_type": data_type, "dims": dims });
    if optional {
        spec["optional"] = Value::Bool(true);
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx_proto;
    use prost::Message;

    fn minimal(task: &str) -> Value {
        json!({ "name": "m", "backend": "rust", "parameters": { "task": { "string_value": task } } })
    }

    #[test]
    fn a_declared_tensor_leaves_the_config_alone() {
        let mut config = minimal("sentiment-classifier");
        config["output"] =
            json!([{ "name": "sentiment_label", "data_type": "TYPE_STRING", "dims": [-1] }]);
        assert_eq!(
            complete(&config, "sentiment-classifier", Path::new("/nowhere")).unwrap(),
            None
        );
    }

    #[test]
    fn a_classifier_takes_its_width_from_the_graph_else_id2label_else_stays_variable() {
        let dir = std::env::temp_dir().join(format!("autocomplete-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = minimal("sentiment-classifier");
        let width = |dir: &Path| {
            complete(&config, "sentiment-classifier", dir)
                .map(|completed| completed.unwrap()["output"][0]["dims"].clone())
        };
        assert_eq!(width(&dir).unwrap(), json!([-1, -1]));
        std::fs::write(dir.join(HF_CONFIG), r#"{"id2label": {"1": "b", "0": "a"}}"#).unwrap();
        assert_eq!(width(&dir).unwrap(), json!([-1, 2]));

        let graph = onnx_proto::graph_with_outputs(&[(LOGITS, &[None, Some(3)])]);
        std::fs::write(dir.join(MODEL_FILE), graph.encode_to_vec()).unwrap();
        let error = width(&dir).unwrap_err().to_string();
        assert!(
            error.contains("output 'logits' is 3 wide, but config.json says 2 (id2label)"),
            "{error}"
        );
        std::fs::remove_file(dir.join(HF_CONFIG)).unwrap();
        assert_eq!(width(&dir).unwrap(), json!([-1, 3]));
        assert_eq!(
            complete(&config, "sentiment-classifier", &dir)
                .unwrap()
                .unwrap()["input"][0]["name"],
            "text_input"
        );

        std::fs::write(dir.join(MODEL_FILE), b"not a model").unwrap();
        let error = width(&dir).unwrap_err().to_string();
        assert!(error.contains("cannot read the outputs of"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_streaming_generator_takes_one_prompt_like_vllm() {
        let mut config = minimal("text-generation");
        config["model_transaction_policy"] = json!({ "decoupled": true });
        let completed = complete(&config, "text-generation", Path::new("/nowhere"))
            .unwrap()
            .unwrap();
        assert_eq!(completed["input"][0]["dims"], json!([1]));
        assert_eq!(completed["input"][1]["name"], "stream");
        assert_eq!(completed["output"][0]["name"], "text_output");
        let whole = complete(
            &minimal("text-generation"),
            "text-generation",
            Path::new("/nowhere"),
        )
        .unwrap()
        .unwrap();
        assert_eq!(whole["output"][0]["name"], "generated_text");
        assert_eq!(whole["input"][0]["dims"], json!([-1]));
    }
}
