//! The Hugging Face `config.json` that export tools leave beside `model.onnx`: where a
//! classifier's label names and a model's sizes come from when the config does not say.

use std::path::Path;

use serde_json::Value;

use crate::error::BackendError;

/// Its file name in a version directory.
pub const HF_CONFIG: &str = "config.json";

/// `config.json` of the version, if there is one.
pub fn read(version_dir: &Path) -> Result<Option<Value>, BackendError> {
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
pub fn labels(hf: &Value) -> Result<Option<Vec<String>>, BackendError> {
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

    #[test]
    fn bad_id2label_is_a_clear_error() {
        for bad in [r#"{"id2label": {"5": "x"}}"#, r#"{"id2label": {"0": 3}}"#] {
            let hf: Value = serde_json::from_str(bad).unwrap();
            let error = labels(&hf).expect_err(bad).to_string();
            assert!(error.contains("id2label"), "{bad}: {error}");
        }
    }
}
