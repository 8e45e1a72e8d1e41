//! The requests Triton will build from a model's `model_warmup` samples, rebuilt at
//! model load so the backend can check them before any instance exists.
//!
//! Why check them early: Triton runs the warm-up on each new instance's thread, and
//! when a warm-up request fails there, Triton 2.51 tears the instance down while that
//! thread may still be touching it (`TritonBackendThread::StopBackendThread` reads the
//! thread's instance list unlocked), which can crash the whole server. Warm-up data the
//! backend would refuse is therefore refused at `ModelInitialize`, with the same
//! message a client request would get, and the load fails cleanly instead.
//!
//! What Triton hands the backend, per sample and per unit of `batch_size`: for each input,
//! shape `dims` (with a leading 1 when `max_batch_size > 0`), and data from
//! `<model>/warmup/<input_data_file>` (a `TYPE_STRING` input takes the whole file as its
//! serialized BYTES tensor, other types the first `dims` elements' bytes) or zeros
//! (`zero_data`, and `random_data` of a `TYPE_STRING` input: empty strings). Samples whose
//! data Triton itself rejects (a short file, a variable dimension) are left to Triton,
//! which fails them before any instance runs.
//!
//! Free of FFI.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use crate::config::{WarmupInput, WarmupSample};
use crate::error::BackendError;
use crate::types::{DataType, InputTensor};

/// Where Triton keeps warm-up data files: `<model>/warmup/`.
pub const WARMUP_DIR: &str = "warmup";

/// Samples with more fixed-size data than this are left unchecked.
const MAX_SYNTHETIC_BYTES: usize = 64 << 20;

/// One warm-up request, as the backend will receive it.
#[derive(Debug)]
pub struct WarmupRequest {
    pub sample: String,
    pub inputs: HashMap<String, InputTensor<'static>>,
}

fn warmup_error(sample: &str, message: impl std::fmt::Display) -> BackendError {
    BackendError::Config(format!("model_warmup sample '{sample}': {message}"))
}

/// One input of a sample, or `None` when Triton will reject the sample itself.
fn warmup_input(
    sample: &str,
    name: &str,
    spec: &WarmupInput,
    max_batch_size: i64,
    model_dir: &Path,
) -> Result<Option<InputTensor<'static>>, BackendError> {
    let Some(datatype) = spec.datatype() else {
        return Ok(None);
    };
    // BYTES elements have no fixed size; Triton counts 4 bytes (a length) each.
    let element_size = datatype.element_size().unwrap_or(4);
    // Variable dimensions are Triton's to refuse; absurd sizes are not worth copying here.
    let Some(byte_size) = spec
        .dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
        .and_then(|count| count.checked_mul(element_size))
        .filter(|&size| size <= MAX_SYNTHETIC_BYTES)
    else {
        return Ok(None);
    };
    let data = if let Some(file) = &spec.input_data_file {
        let path = model_dir.join(WARMUP_DIR).join(file);
        let mut bytes = std::fs::read(&path).map_err(|e| {
            warmup_error(
                sample,
                format_args!("cannot read input '{name}' from {}: {e}", path.display()),
            )
        })?;
        if datatype != DataType::Bytes {
            if bytes.len() < byte_size {
                return Ok(None);
            }
            bytes.truncate(byte_size);
        }
        bytes
    } else if spec.random_data && datatype != DataType::Bytes {
        return Err(warmup_error(
            sample,
            format_args!(
                "input '{name}' uses random_data, which this backend cannot serve (random \
                 token ids, masks or lengths); use input_data_file or zero_data"
            ),
        ));
    } else {
        // zero_data, and random_data of a string input: zeros, that is empty strings.
        vec![0; byte_size]
    };
    let mut shape = if max_batch_size > 0 {
        vec![1]
    } else {
        Vec::new()
    };
    shape.extend(&spec.dims);
    Ok(Some(InputTensor {
        datatype,
        shape,
        data: Cow::Owned(data),
    }))
}

/// The warm-up requests of a model configuration's samples, one per sample with a
/// non-zero `batch_size` (Triton sends that many identical requests).
pub fn warmup_requests(
    samples: &[WarmupSample],
    max_batch_size: i64,
    model_dir: &Path,
) -> Result<Vec<WarmupRequest>, BackendError> {
    let mut requests = Vec::new();
    'samples: for sample in samples.iter().filter(|s| s.batch_size != 0) {
        let mut inputs = HashMap::new();
        for (input, spec) in &sample.inputs {
            match warmup_input(&sample.name, input, spec, max_batch_size, model_dir)? {
                Some(tensor) => {
                    inputs.insert(input.clone(), tensor);
                }
                None => continue 'samples,
            }
        }
        requests.push(WarmupRequest {
            sample: sample.name.clone(),
            inputs,
        });
    }
    Ok(requests)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bytes_tensor::encode_elements;
    use crate::config::ModelConfig;
    use proptest::prelude::*;

    fn model_dir(test: &str, files: &[(&str, &[u8])]) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("triton-rust-warmup-{}-{test}", std::process::id()));
        std::fs::create_dir_all(dir.join(WARMUP_DIR)).expect("dir");
        for (name, data) in files {
            std::fs::write(dir.join(WARMUP_DIR).join(name), data).expect("write");
        }
        dir
    }

    fn config(samples: &str) -> Vec<WarmupSample> {
        ModelConfig::from_json(&format!(r#"{{"name": "m", "model_warmup": {samples}}}"#))
            .expect("valid config")
            .model_warmup
    }

    #[test]
    fn string_files_are_passed_whole_with_the_batch_dimension() {
        let texts = encode_elements(&["one", "two"]);
        let dir = model_dir("strings", &[("text.bin", &texts)]);
        let json = config(
            r#"[{"name": "s", "batch_size": 1, "inputs": {"text_input":
                {"data_type": "TYPE_STRING", "dims": ["2"], "input_data_file": "text.bin"}}}]"#,
        );
        let requests = warmup_requests(&json, 0, &dir).expect("requests");
        assert_eq!(requests.len(), 1);
        let input = &requests[0].inputs["text_input"];
        assert_eq!(requests[0].sample, "s");
        assert_eq!(input.datatype, DataType::Bytes);
        assert_eq!(input.shape, vec![2]);
        assert_eq!(input.data, texts);

        let batched = warmup_requests(&json, 8, &dir).expect("requests");
        assert_eq!(batched[0].inputs["text_input"].shape, vec![1, 2]);
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    #[test]
    fn zero_data_is_zeros_and_empty_strings() {
        let dir = model_dir("zeros", &[]);
        let json = config(
            r#"[{"name": "z", "batch_size": 1, "inputs": {
                "input_ids": {"data_type": "TYPE_INT64", "dims": [1, 3], "zero_data": true},
                "text_input": {"data_type": "TYPE_STRING", "dims": [2], "random_data": true}}}]"#,
        );
        let requests = warmup_requests(&json, 0, &dir).expect("requests");
        assert_eq!(requests[0].inputs["input_ids"].data, vec![0; 24]);
        assert_eq!(requests[0].inputs["input_ids"].shape, vec![1, 3]);
        assert_eq!(
            requests[0].inputs["text_input"].data,
            encode_elements(&["", ""])
        );
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    #[test]
    fn random_numbers_are_refused() {
        let dir = model_dir("random", &[]);
        let json = config(
            r#"[{"name": "r", "batch_size": 1, "inputs": {
                "input_ids": {"data_type": "TYPE_INT64", "dims": [1, 3], "random_data": true}}}]"#,
        );
        let error = warmup_requests(&json, 0, &dir).unwrap_err().to_string();
        assert!(
            error.contains("model_warmup sample 'r'") && error.contains("random_data"),
            "{error}"
        );
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    #[test]
    fn what_triton_rejects_itself_is_left_to_it() {
        let dir = model_dir("left-to-triton", &[("short.bin", &[1, 2, 3])]);
        let json = config(
            r#"[{"name": "skipped", "batch_size": 0, "inputs": {}},
                {"name": "variable", "batch_size": 1, "inputs": {"text_input":
                    {"data_type": "TYPE_STRING", "dims": [-1], "zero_data": true}}},
                {"name": "huge", "batch_size": 1, "inputs": {"input_ids":
                    {"data_type": "TYPE_INT64", "dims": ["4000000000", "4000000000"],
                     "zero_data": true}}},
                {"name": "short", "batch_size": 1, "inputs": {"input_ids":
                    {"data_type": "TYPE_INT64", "dims": [1, 2], "input_data_file": "short.bin"}}}]"#,
        );
        assert!(warmup_requests(&json, 0, &dir).expect("ok").is_empty());
        assert!(warmup_requests(&[], 0, &dir).expect("ok").is_empty());
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    #[test]
    fn a_missing_file_is_named() {
        let dir = model_dir("missing", &[]);
        let json = config(
            r#"[{"name": "f", "batch_size": 1, "inputs": {"text_input":
                {"data_type": "TYPE_STRING", "dims": [1], "input_data_file": "absent.bin"}}}]"#,
        );
        let error = warmup_requests(&json, 0, &dir).unwrap_err().to_string();
        assert!(error.contains("absent.bin"), "{error}");
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    proptest! {
        /// Untrusted warm-up files: any bytes as any sample's data are rebuilt into a
        /// request or left to Triton, never a panic.
        #[test]
        fn any_warmup_file_is_rebuilt_or_left(
            data in proptest::collection::vec(any::<u8>(), 0..48),
            dims in proptest::collection::vec(-2i64..4, 0..3),
            string in any::<bool>(),
        ) {
            let dir = model_dir("prop", &[("data.bin", &data)]);
            let data_type = if string { "TYPE_STRING" } else { "TYPE_INT64" };
            let json = config(&format!(
                r#"[{{"name": "p", "batch_size": 1, "inputs": {{"x":
                    {{"data_type": "{data_type}", "dims": {dims:?}, "input_data_file": "data.bin"}}}}}}]"#
            ));
            if let Ok(requests) = warmup_requests(&json, 0, &dir) {
                for request in requests {
                    prop_assert_eq!(&request.inputs["x"].shape, &dims);
                }
            }
        }
    }
}
