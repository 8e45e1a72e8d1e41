//! The generation inputs and outputs of Triton's vLLM backend, which LLM clients
//! (genai-perf, Triton's OpenAI frontend) already send and read: `sampling_parameters`
//! (one JSON string of vLLM `SamplingParams` fields), `exclude_input_in_output`, and the
//! `return_*` flags that ask for `finish_reason`, `num_input_tokens` and
//! `num_output_tokens` on the final response.

use serde_json::Value;

use super::FinishReason;
use crate::bytes_tensor;
use crate::error::BackendError;
use crate::text::read_texts;
use crate::types::{DataType, InputTensor, OutputTensor, ParameterValue};

pub const SAMPLING_PARAMETERS: &str = "sampling_parameters";
pub const EXCLUDE_INPUT_IN_OUTPUT: &str = "exclude_input_in_output";
pub const RETURN_FINISH_REASON: &str = "return_finish_reason";
pub const RETURN_NUM_INPUT_TOKENS: &str = "return_num_input_tokens";
pub const RETURN_NUM_OUTPUT_TOKENS: &str = "return_num_output_tokens";
pub const FINISH_REASON: &str = "finish_reason";
pub const NUM_INPUT_TOKENS: &str = "num_input_tokens";
pub const NUM_OUTPUT_TOKENS: &str = "num_output_tokens";

/// The most bytes of a `sampling_parameters` string.
const MAX_SAMPLING_PARAMETERS_BYTES: usize = 16 * 1024;

/// vLLM fields this backend applies, and the request parameter each one becomes.
const APPLIED: &[(&str, &str)] = &[
    ("max_tokens", "max_new_tokens"),
    ("temperature", "temperature"),
    ("top_k", "top_k"),
    ("top_p", "top_p"),
    ("seed", "seed"),
    ("repetition_penalty", "repetition_penalty"),
    ("stop", "stop_sequences"),
];

/// vLLM fields accepted only at the value that changes nothing here.
const NEUTRAL: &[(&str, &str)] = &[
    ("n", "1"),
    ("best_of", "1"),
    ("min_tokens", "0"),
    ("presence_penalty", "0"),
    ("frequency_penalty", "0"),
    ("ignore_eos", "false"),
    ("skip_special_tokens", "true"),
];

fn invalid(message: String) -> BackendError {
    BackendError::InvalidInput(format!("input '{SAMPLING_PARAMETERS}': {message}"))
}

/// What the final response carries besides the text, and whether the text holds the
/// prompt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponseOptions {
    /// The whole (not streamed) text without the prompt in front.
    pub exclude_input: bool,
    pub finish_reason: bool,
    pub input_tokens: bool,
    pub output_tokens: bool,
}

/// A one-element BOOL input, e.g. `stream` or `exclude_input_in_output`.
pub fn read_flag(name: &str, flag: &InputTensor) -> Result<bool, BackendError> {
    match (flag.datatype, &flag.data[..]) {
        (DataType::Bool, [value]) => Ok(*value != 0),
        (DataType::Bool, _) => Err(BackendError::InvalidInput(format!(
            "input '{name}' must hold one value, got shape {:?}",
            flag.shape
        ))),
        (other, _) => Err(BackendError::InvalidInput(format!(
            "input '{name}' must be BOOL, not {}",
            other.name()
        ))),
    }
}

/// One field of a `sampling_parameters` input and the request parameters it becomes.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingField {
    /// The vLLM name the client sent, e.g. `max_tokens`.
    pub field: String,
    pub parameters: Vec<(String, ParameterValue)>,
}

impl SamplingField {
    /// `error` (about the request parameters this field became) as the client's error:
    /// it names the field the client sent as well.
    pub fn error(&self, error: BackendError) -> BackendError {
        match error {
            BackendError::InvalidInput(message) => {
                invalid(format!("field '{}': {message}", self.field))
            }
            other => other,
        }
    }
}

/// The fields of a `sampling_parameters` input, each with the request parameters it
/// stands for. A field this backend cannot honour is an error that names it, not
/// ignored.
pub fn sampling_parameters(input: &InputTensor) -> Result<Vec<SamplingField>, BackendError> {
    let texts = read_texts(input, MAX_SAMPLING_PARAMETERS_BYTES)?;
    let [text] = texts.as_slice() else {
        return Err(invalid(format!(
            "expected one JSON string, got {} elements",
            texts.len()
        )));
    };
    let fields: serde_json::Map<String, Value> = serde_json::from_str(text)
        .map_err(|error| invalid(format!("not a JSON object: {error}")))?;
    let mut applied_fields = Vec::new();
    for (field, value) in &fields {
        if value.is_null() {
            continue;
        }
        if let Some((_, neutral)) = NEUTRAL.iter().find(|(name, _)| name == field) {
            if !is_neutral(value, neutral) {
                return Err(invalid(format!(
                    "'{field}' is not supported here (only {neutral}), got {value}"
                )));
            }
            continue;
        }
        let Some((_, parameter)) = APPLIED.iter().find(|(name, _)| name == field) else {
            let known: Vec<&str> = APPLIED.iter().chain(NEUTRAL).map(|(n, _)| *n).collect();
            return Err(invalid(format!(
                "'{field}' is not supported; supported fields: {}",
                known.join(", ")
            )));
        };
        applied_fields.push(SamplingField {
            field: field.clone(),
            parameters: applied(field, parameter, value)?,
        });
    }
    Ok(applied_fields)
}

/// Whether `value` is the neutral value `neutral` (a number or a boolean, as text).
fn is_neutral(value: &Value, neutral: &str) -> bool {
    match (neutral.parse::<f64>(), neutral.parse::<bool>()) {
        (Ok(number), _) => value.as_f64() == Some(number),
        (_, Ok(flag)) => value.as_bool() == Some(flag),
        _ => false,
    }
}

/// One applied field as request parameters.
fn applied(
    field: &str,
    parameter: &str,
    value: &Value,
) -> Result<Vec<(String, ParameterValue)>, BackendError> {
    let scalar = match value {
        Value::Number(n) if n.is_i64() => n.as_i64().map(ParameterValue::Int),
        Value::Number(n) => n.as_f64().map(ParameterValue::Double),
        Value::String(s) if field == "stop" => Some(ParameterValue::String(
            serde_json::to_string(&[s]).unwrap_or_default(),
        )),
        Value::Array(_) if field == "stop" => Some(ParameterValue::String(value.to_string())),
        // genai-perf sends {"max_tokens": "20"}, and Triton's vLLM backend takes it.
        Value::String(s) => match (s.trim().parse::<i64>(), s.trim().parse::<f64>()) {
            (Ok(n), _) => Some(ParameterValue::Int(n)),
            (_, Ok(x)) => Some(ParameterValue::Double(x)),
            _ => None,
        },
        _ => None,
    }
    .ok_or_else(|| invalid(format!("'{field}' has the wrong type: {value}")))?;
    Ok(match (field, &scalar) {
        // vLLM: temperature 0 is greedy decoding; above it, sampling.
        ("temperature", ParameterValue::Int(0)) => {
            vec![("do_sample".into(), ParameterValue::Bool(false))]
        }
        ("temperature", ParameterValue::Double(t)) if *t == 0.0 => {
            vec![("do_sample".into(), ParameterValue::Bool(false))]
        }
        ("temperature", _) => vec![
            ("do_sample".into(), ParameterValue::Bool(true)),
            (parameter.into(), scalar),
        ],
        // vLLM: top_k -1 keeps every token, as 0 does here.
        ("top_k", ParameterValue::Int(-1)) => vec![(parameter.into(), ParameterValue::Int(0))],
        _ => vec![(parameter.into(), scalar)],
    })
}

/// Request parameters with a `sampling_parameters` input's added; a setting given both
/// ways is an error.
pub fn merge(
    parameters: &[(String, ParameterValue)],
    sampling: Vec<SamplingField>,
) -> Result<Vec<(String, ParameterValue)>, BackendError> {
    let sampling: Vec<_> = sampling.into_iter().flat_map(|f| f.parameters).collect();
    let stop_keys = ["stop", "stop_sequences"];
    for (key, _) in &sampling {
        let clash = parameters.iter().find(|(given, _)| {
            given == key
                || (stop_keys.contains(&key.as_str()) && stop_keys.contains(&given.as_str()))
        });
        if let Some((given, _)) = clash {
            return Err(BackendError::InvalidInput(format!(
                "'{given}' is set both as a request parameter and in '{SAMPLING_PARAMETERS}': \
                 send it once"
            )));
        }
    }
    Ok(parameters.iter().cloned().chain(sampling).collect())
}

/// vLLM's name for why a sequence ended.
pub fn finish_reason_name(reason: Option<FinishReason>) -> &'static str {
    match reason {
        Some(FinishReason::Stop) => "stop",
        Some(FinishReason::Length) => "length",
        Some(FinishReason::Abort) | None => "abort",
    }
}

/// The final response's optional outputs, each of `shape` (one element per prompt).
pub fn final_outputs(
    options: ResponseOptions,
    shape: &[i64],
    reasons: &[Option<FinishReason>],
    input_tokens: &[usize],
    output_tokens: &[usize],
) -> Vec<OutputTensor> {
    let counts = |name: &str, values: &[usize]| OutputTensor {
        name: name.to_owned(),
        datatype: DataType::Uint32,
        shape: shape.to_vec(),
        data: values
            .iter()
            .flat_map(|&n| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes())
            .collect(),
    };
    let mut outputs = Vec::new();
    if options.finish_reason {
        let names: Vec<&str> = reasons.iter().map(|&r| finish_reason_name(r)).collect();
        outputs.push(OutputTensor {
            name: FINISH_REASON.to_owned(),
            datatype: DataType::Bytes,
            shape: shape.to_vec(),
            data: bytes_tensor::encode_elements(&names),
        });
    }
    if options.input_tokens {
        outputs.push(counts(NUM_INPUT_TOKENS, input_tokens));
    }
    if options.output_tokens {
        outputs.push(counts(NUM_OUTPUT_TOKENS, output_tokens));
    }
    outputs
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn json_input(text: &str) -> InputTensor<'static> {
        InputTensor {
            datatype: DataType::Bytes,
            shape: vec![1],
            data: Cow::Owned(bytes_tensor::encode_elements(&[text])),
        }
    }

    fn parsed(text: &str) -> Result<Vec<(String, ParameterValue)>, BackendError> {
        sampling_parameters(&json_input(text))
            .map(|fields| fields.into_iter().flat_map(|f| f.parameters).collect())
    }

    #[test]
    fn vllm_fields_become_request_parameters() {
        let got = parsed(
            r#"{"max_tokens": 8, "temperature": 0.5, "top_k": -1, "top_p": 0.9, "seed": 3,
                "stop": "\n", "n": 1, "min_tokens": 0, "presence_penalty": 0.0,
                "ignore_eos": false, "logprobs": null}"#,
        )
        .expect("valid");
        let has = |key: &str, value: ParameterValue| got.contains(&(key.to_string(), value));
        assert!(has("max_new_tokens", ParameterValue::Int(8)));
        assert!(has("do_sample", ParameterValue::Bool(true)));
        assert!(has("temperature", ParameterValue::Double(0.5)));
        assert!(has("top_k", ParameterValue::Int(0)));
        assert!(has("top_p", ParameterValue::Double(0.9)));
        assert!(has("seed", ParameterValue::Int(3)));
        assert!(has(
            "stop_sequences",
            ParameterValue::String(r#"["\n"]"#.into())
        ));
        assert_eq!(got.len(), 7, "{got:?}");
    }

    #[test]
    fn numbers_may_come_as_strings() {
        let got = parsed(r#"{"max_tokens": "20", "top_p": " 0.5"}"#).expect("valid");
        assert!(got.contains(&("max_new_tokens".into(), ParameterValue::Int(20))));
        assert!(got.contains(&("top_p".into(), ParameterValue::Double(0.5))));
    }

    #[test]
    fn temperature_zero_is_greedy() {
        for zero in ["0", "0.0"] {
            let got = parsed(&format!(r#"{{"temperature": {zero}}}"#)).expect("valid");
            assert_eq!(
                got,
                vec![("do_sample".to_string(), ParameterValue::Bool(false))]
            );
        }
    }

    #[test]
    fn fields_that_would_change_nothing_silently_are_refused() {
        for (text, named) in [
            (r#"{"min_tokens": 5}"#, "min_tokens"),
            (r#"{"n": 2}"#, "'n'"),
            (r#"{"ignore_eos": true}"#, "ignore_eos"),
            (r#"{"logit_bias": {}}"#, "logit_bias"),
            (r#"{"max_tokens": "many"}"#, "wrong type"),
            (r#"{"max_tokens": true}"#, "wrong type"),
            ("[1, 2]", "JSON object"),
            ("{", "JSON object"),
        ] {
            let error = parsed(text).expect_err(text).to_string();
            assert!(
                error.contains(named) && error.contains(SAMPLING_PARAMETERS),
                "{text}: {error}"
            );
        }
    }

    #[test]
    fn a_setting_sent_twice_is_refused() {
        let given = vec![("stop".to_string(), ParameterValue::String("x".into()))];
        let sampling = sampling_parameters(&json_input(r#"{"stop": ["y"]}"#)).expect("valid");
        let error = merge(&given, sampling).expect_err("twice");
        assert!(error.to_string().contains("send it once"), "{error}");
    }

    #[test]
    fn an_error_about_a_field_names_the_field_the_client_sent() {
        let fields = sampling_parameters(&json_input(r#"{"max_tokens": 100000}"#)).expect("parsed");
        let error = fields[0].error(BackendError::InvalidInput(
            "parameter 'max_new_tokens' must be at most 128".into(),
        ));
        assert_eq!(
            error.to_string(),
            "input 'sampling_parameters': field 'max_tokens': parameter 'max_new_tokens' \
             must be at most 128"
        );
    }

    #[test]
    fn final_outputs_hold_one_element_per_prompt() {
        let options = ResponseOptions {
            exclude_input: false,
            finish_reason: true,
            input_tokens: false,
            output_tokens: true,
        };
        let outputs = final_outputs(
            options,
            &[2],
            &[Some(FinishReason::Length), Some(FinishReason::Stop)],
            &[4, 5],
            &[7, 300],
        );
        assert_eq!(outputs.len(), 2);
        assert_eq!(outputs[0].name, FINISH_REASON);
        assert_eq!(
            outputs[0].data,
            bytes_tensor::encode_elements(&["length", "stop"])
        );
        assert_eq!(outputs[1].name, NUM_OUTPUT_TOKENS);
        assert_eq!(outputs[1].data, [7, 0, 0, 0, 44, 1, 0, 0]);
    }
}
