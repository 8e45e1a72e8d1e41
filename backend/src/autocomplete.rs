//! Config auto-complete (Triton's default, off with `--disable-auto-complete-config`): a
//! model directory whose `config.pbtxt` names only `backend: "rust"` and its `task` gets
//! the task's inputs and outputs filled in, as `onnxruntime_backend` does from the
//! graph. Sizes come from the Hugging Face `config.json` beside the model when there is
//! one (`id2label` for a classifier's labels, `hidden_size` for an encoder's width), else
//! stay variable (-1). A config that declares any input or output is left as written:
//! the task checks it against the model at load, and nothing is silently overridden.

use std::path::Path;

use serde_json::{Value, json};

use crate::error::BackendError;

/// The Hugging Face config that export tools leave beside `model.onnx`.
pub const HF_CONFIG: &str = "config.json";

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
    let hf = read_hf_config(version_dir)?;
    let (inputs, outputs) = match task {
        "sentiment-classifier" => {
            let classes = hf
                .as_ref()
                .and_then(|hf| hf.get("id2label"))
                .and_then(Value::as_object)
                .map_or(-1, |labels| labels.len() as i64);
            (
                vec![tensor("text_input", "TYPE_STRING", &[-1], false)],
                vec![
                    tensor("sentiment_score", "TYPE_FP32", &[-1, classes], false),
                    tensor("sentiment_label", "TYPE_STRING", &[-1], false),
                ],
            )
        }
        "feature-extraction" => {
            let hidden = hf
                .as_ref()
                .and_then(|hf| hf.get("hidden_size"))
                .and_then(Value::as_i64)
                .unwrap_or(-1);
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

/// `config.json` of the version, if there is one.
pub fn read_hf_config(version_dir: &Path) -> Result<Option<Value>, BackendError> {
    let path = version_dir.join(HF_CONFIG);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|error| {
        BackendError::Config(format!("cannot read {}: {error}", path.display()))
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|error| BackendError::Config(format!("{} is not JSON: {error}", path.display())))
}

/// A classifier's label names from `config.json`'s `id2label`, in class order.
pub fn hf_labels(hf: &Value) -> Result<Option<Vec<String>>, BackendError> {
    let Some(map) = hf.get("id2label").and_then(Value::as_object) else {
        return Ok(None);
    };
    let mut labels = vec![None; map.len()];
    for (id, name) in map {
        let slot = id
            .parse::<usize>()
            .ok()
            .and_then(|index| labels.get_mut(index))
            .ok_or_else(|| {
                BackendError::Config(format!(
                    "{HF_CONFIG}: id2label has id '{id}'; expected 0 to {}",
                    map.len().saturating_sub(1)
                ))
            })?;
        *slot = name.as_str().map(str::to_owned);
    }
    labels
        .into_iter()
        .collect::<Option<Vec<String>>>()
        .map(Some)
        .ok_or_else(|| BackendError::Config(format!("{HF_CONFIG}: id2label names must be strings")))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_classifier_takes_its_width_from_id2label_else_stays_variable() {
        let dir = std::env::temp_dir().join(format!("autocomplete-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = minimal("sentiment-classifier");
        let unknown = complete(&config, "sentiment-classifier", &dir)
            .unwrap()
            .unwrap();
        assert_eq!(unknown["output"][0]["dims"], json!([-1, -1]));
        std::fs::write(dir.join(HF_CONFIG), r#"{"id2label": {"1": "b", "0": "a"}}"#).unwrap();
        let known = complete(&config, "sentiment-classifier", &dir)
            .unwrap()
            .unwrap();
        assert_eq!(known["output"][0]["dims"], json!([-1, 2]));
        assert_eq!(known["input"][0]["name"], "text_input");
        let hf = read_hf_config(&dir).unwrap().unwrap();
        assert_eq!(
            hf_labels(&hf).unwrap(),
            Some(vec!["a".to_string(), "b".to_string()])
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_id2label_is_a_clear_error() {
        for bad in [r#"{"id2label": {"5": "x"}}"#, r#"{"id2label": {"0": 3}}"#] {
            let hf: Value = serde_json::from_str(bad).unwrap();
            let error = hf_labels(&hf).expect_err(bad).to_string();
            assert!(error.contains("id2label"), "{bad}: {error}");
        }
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
