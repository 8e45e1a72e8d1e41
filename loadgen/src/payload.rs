//! A request for a model built from its configuration: each required input, and each
//! optional text input (a model that takes either texts or token ids declares both
//! optional), filled with the given texts (BYTES) or with zeros (numbers) and `false`
//! (BOOL).

use std::collections::BTreeMap;

use crate::client::{InferRequest, InputTensor, ModelSpec, ParameterValue, TensorData};

#[derive(Debug, thiserror::Error)]
#[error(
    "model '{model}' needs input '{input}' of datatype {datatype}: loadgen fills BYTES, BOOL, INT32, INT64, FP32 and FP64 inputs"
)]
pub struct UnsupportedInput {
    model: String,
    input: String,
    datatype: String,
}

/// The input the texts go into when it is optional.
const TEXT_INPUT: &str = "text_input";

/// What goes into every request.
#[derive(Debug, Clone)]
pub struct Payload {
    /// The texts of each BYTES input: its first variable dimension is their number.
    pub texts: Vec<String>,
    /// KServe request parameters.
    pub parameters: BTreeMap<String, ParameterValue>,
}

impl Payload {
    pub fn request_for(&self, spec: &ModelSpec) -> Result<InferRequest, UnsupportedInput> {
        let inputs = spec
            .inputs
            .iter()
            // Optional inputs stay out, but for the texts' own input (an encoder's
            // text_input beside its optional input_ids); a generation model's optional
            // sampling_parameters is JSON, not text.
            .filter(|input| !input.optional || input.name == TEXT_INPUT)
            .map(|input| {
                let is_text = input.datatype == "BYTES";
                let mut texts_placed = !is_text;
                let mut shape: Vec<i64> = input
                    .dims
                    .iter()
                    .map(|&dim| match dim {
                        -1 if !texts_placed => {
                            texts_placed = true;
                            self.texts.len() as i64
                        }
                        -1 => 1,
                        fixed => fixed,
                    })
                    .collect();
                if spec.max_batch_size > 0 {
                    shape.insert(0, 1);
                }
                let count = shape.iter().product::<i64>().max(0) as usize;
                let data = match input.datatype.as_str() {
                    "BYTES" => {
                        TensorData::Bytes(self.texts.iter().cycle().take(count).cloned().collect())
                    }
                    "BOOL" => TensorData::Bool(vec![false; count]),
                    "INT32" => TensorData::Int32(vec![0; count]),
                    "INT64" => TensorData::Int64(vec![0; count]),
                    "FP32" => TensorData::Fp32(vec![0.0; count]),
                    "FP64" => TensorData::Fp64(vec![0.0; count]),
                    other => {
                        return Err(UnsupportedInput {
                            model: spec.name.clone(),
                            input: input.name.clone(),
                            datatype: other.to_owned(),
                        });
                    }
                };
                Ok(InputTensor {
                    name: input.name.clone(),
                    shape,
                    data,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(InferRequest {
            model: spec.name.clone(),
            inputs,
            parameters: self.parameters.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::InputSpec;

    fn input(name: &str, datatype: &str, dims: &[i64], optional: bool) -> InputSpec {
        InputSpec {
            name: name.into(),
            datatype: datatype.into(),
            dims: dims.to_vec(),
            optional,
        }
    }

    fn payload(texts: &[&str]) -> Payload {
        Payload {
            texts: texts.iter().map(|t| t.to_string()).collect(),
            parameters: BTreeMap::from([("max_new_tokens".into(), ParameterValue::Int(4))]),
        }
    }

    #[test]
    fn texts_fill_the_first_variable_dimension_and_other_optional_inputs_are_left_out() {
        let spec = ModelSpec {
            name: "gpt2-small-stream-ab".into(),
            inputs: vec![
                input("text_input", "BYTES", &[-1], false),
                input("stream", "BOOL", &[1], true),
                input("sampling_parameters", "BYTES", &[1], true),
                input("input_ids", "INT64", &[-1], true),
            ],
            ..Default::default()
        };
        let request = payload(&["a", "b"]).request_for(&spec).unwrap();
        assert_eq!(request.model, "gpt2-small-stream-ab");
        assert_eq!(
            request.inputs,
            vec![InputTensor {
                name: "text_input".into(),
                shape: vec![2],
                data: TensorData::Bytes(vec!["a".into(), "b".into()]),
            }]
        );
        assert_eq!(request.parameters["max_new_tokens"], ParameterValue::Int(4));
    }

    #[test]
    fn optional_texts_are_sent() {
        let spec = ModelSpec {
            name: "bert-base".into(),
            inputs: vec![
                input("text_input", "BYTES", &[-1], true),
                input("input_ids", "INT64", &[-1, -1], true),
            ],
            ..Default::default()
        };
        let request = payload(&["a"]).request_for(&spec).unwrap();
        assert_eq!(request.inputs.len(), 1);
        assert_eq!(request.inputs[0].name, "text_input");
    }

    #[test]
    fn batching_models_get_a_batch_of_one_and_numbers_get_zeros() {
        let spec = ModelSpec {
            name: "m".into(),
            max_batch_size: 8,
            inputs: vec![
                input("text", "BYTES", &[-1, -1], false),
                input("ids", "INT64", &[-1, 3], false),
            ],
            ..Default::default()
        };
        let request = payload(&["x", "y", "z"]).request_for(&spec).unwrap();
        assert_eq!(request.inputs[0].shape, [1, 3, 1]);
        assert_eq!(
            request.inputs[0].data,
            TensorData::Bytes(vec!["x".into(), "y".into(), "z".into()])
        );
        assert_eq!(request.inputs[1].shape, [1, 1, 3]);
        assert_eq!(request.inputs[1].data, TensorData::Int64(vec![0; 3]));
    }

    #[test]
    fn unsupported_datatypes_are_named() {
        let spec = ModelSpec {
            name: "m".into(),
            inputs: vec![input("x", "FP16", &[2], false)],
            ..Default::default()
        };
        let error = payload(&["a"]).request_for(&spec).unwrap_err().to_string();
        assert!(error.contains("'x'") && error.contains("FP16"), "{error}");
    }
}
