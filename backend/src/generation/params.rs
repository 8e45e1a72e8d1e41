//! Sampling settings: config defaults, overridden by each request's parameters, both
//! parsed by the same code.

use std::collections::BTreeMap;

use crate::error::BackendError;
use crate::settings::Settings;
use crate::types::ParameterValue;

/// Sampling settings of one request: config defaults, overridden per request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub max_new_tokens: usize,
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    pub do_sample: bool,
    /// Fixes the random choices; without it each request draws a fresh seed.
    pub seed: Option<u64>,
    pub repetition_penalty: f32,
    /// Generation stops when the text contains one of these; the output ends before it.
    pub stop: Vec<String>,
}

impl Default for GenerationParams {
    /// The seed's Python model: 50 new tokens, temperature 0.7, sampling on.
    fn default() -> Self {
        GenerationParams {
            max_new_tokens: 50,
            temperature: 0.7,
            top_k: 0,
            top_p: 1.0,
            do_sample: true,
            seed: None,
            repetition_penalty: 1.0,
            stop: Vec::new(),
        }
    }
}

/// The lowest temperature: below it the logits divided by it overflow `f32` (a
/// temperature of 1e-38 gave garbage text); it is greedy decoding in all but name.
pub const MIN_TEMPERATURE: f32 = 1e-4;

/// Names of the generation settings, in config parameters and request parameters.
pub const GENERATION_PARAMETERS: &[&str] = &[
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "do_sample",
    "seed",
    "repetition_penalty",
    "stop",
    "stop_sequences",
];

fn invalid(key: &str, expected: &str, value: &ParameterValue) -> BackendError {
    BackendError::InvalidInput(format!("parameter '{key}' must be {expected}, got {value}"))
}

fn as_f64(key: &str, expected: &str, value: &ParameterValue) -> Result<f64, BackendError> {
    let number = match value {
        ParameterValue::Double(v) => Some(*v),
        ParameterValue::Int(v) => Some(*v as f64),
        ParameterValue::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    number
        .filter(|v| v.is_finite())
        .ok_or_else(|| invalid(key, expected, value))
}

fn as_u64(key: &str, expected: &str, value: &ParameterValue) -> Result<u64, BackendError> {
    let number = match value {
        ParameterValue::Int(v) => u64::try_from(*v).ok(),
        ParameterValue::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    number.ok_or_else(|| invalid(key, expected, value))
}

pub(super) fn as_bool(key: &str, value: &ParameterValue) -> Result<bool, BackendError> {
    match value {
        ParameterValue::Bool(v) => Ok(*v),
        ParameterValue::String(s) if s.trim().eq_ignore_ascii_case("true") => Ok(true),
        ParameterValue::String(s) if s.trim().eq_ignore_ascii_case("false") => Ok(false),
        _ => Err(invalid(key, "true or false", value)),
    }
}

/// `stop`: one stop string, taken as it is (`"[INST]"` is a string, not a list).
fn as_stop_string(value: &ParameterValue) -> Result<Vec<String>, BackendError> {
    let ParameterValue::String(text) = value else {
        return Err(invalid(STOP, "a string", value));
    };
    checked_stops(STOP, vec![text.clone()], value)
}

/// `stop_sequences`: several stop strings, as a JSON list of strings (request
/// parameters are scalars, so the list travels as one string).
fn as_stop_list(value: &ParameterValue) -> Result<Vec<String>, BackendError> {
    let ParameterValue::String(text) = value else {
        return Err(invalid(STOP_SEQUENCES, "a JSON list of strings", value));
    };
    let list = serde_json::from_str::<Vec<String>>(text)
        .map_err(|_| invalid(STOP_SEQUENCES, "a JSON list of strings", value))?;
    checked_stops(STOP_SEQUENCES, list, value)
}

fn checked_stops(
    key: &str,
    list: Vec<String>,
    value: &ParameterValue,
) -> Result<Vec<String>, BackendError> {
    if list.iter().any(String::is_empty) {
        return Err(invalid(key, "non-empty strings", value));
    }
    if list.len() > MAX_STOP_STRINGS || list.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(BackendError::InvalidInput(format!(
            "parameter '{key}' takes at most {MAX_STOP_STRINGS} strings of at most \
             {MAX_STOP_BYTES} bytes each"
        )));
    }
    Ok(list)
}

/// One stop string.
const STOP: &str = "stop";
/// Several stop strings, as a JSON list.
const STOP_SEQUENCES: &str = "stop_sequences";

/// Bounds on `stop`: every new token is checked against each stop string.
const MAX_STOP_STRINGS: usize = 16;
const MAX_STOP_BYTES: usize = 256;

impl GenerationParams {
    /// Applies one setting; returns false for a key that is not a generation setting.
    fn apply(&mut self, key: &str, value: &ParameterValue) -> Result<bool, BackendError> {
        match key {
            "max_new_tokens" => {
                self.max_new_tokens = usize::try_from(as_u64(key, "a positive integer", value)?)
                    .unwrap_or(usize::MAX);
            }
            "temperature" => self.temperature = as_f64(key, "a number > 0", value)? as f32,
            "top_k" => {
                self.top_k = usize::try_from(as_u64(key, "an integer >= 0", value)?).unwrap_or(0)
            }
            "top_p" => self.top_p = as_f64(key, "a number in (0, 1]", value)? as f32,
            "do_sample" => self.do_sample = as_bool(key, value)?,
            "seed" => self.seed = Some(as_u64(key, "an integer >= 0", value)?),
            "repetition_penalty" => {
                self.repetition_penalty = as_f64(key, "a number > 0", value)? as f32
            }
            STOP => self.stop = as_stop_string(value)?,
            STOP_SEQUENCES => self.stop = as_stop_list(value)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn validate(&self, context_length: usize) -> Result<(), BackendError> {
        let bad = |message: String| Err(BackendError::InvalidInput(message));
        if self.max_new_tokens == 0 || self.max_new_tokens > context_length {
            return bad(format!(
                "parameter 'max_new_tokens' must be between 1 and the context length \
                 {context_length}, got {}",
                self.max_new_tokens
            ));
        }
        if !(self.temperature >= MIN_TEMPERATURE && self.temperature.is_finite()) {
            return bad(format!(
                "parameter 'temperature' must be a number > 0, at least {MIN_TEMPERATURE} (send \
                 do_sample=false for greedy decoding), got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!(
                "parameter 'top_p' must be in (0, 1], got {}",
                self.top_p
            ));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!(
                "parameter 'repetition_penalty' must be a number > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }

    /// Defaults from the model's config parameters (strings), over the seed's defaults.
    pub fn from_config(
        parameters: &BTreeMap<String, String>,
        context_length: usize,
    ) -> Result<Self, BackendError> {
        let mut params = GenerationParams::default();
        for (key, value) in parameters {
            params.apply(key, &ParameterValue::String(value.clone()))?;
        }
        if params.seed.is_some() {
            return Err(BackendError::Config(
                "parameter 'seed' is per request; it cannot be a model default".into(),
            ));
        }
        params
            .validate(context_length)
            .map_err(|e| BackendError::Config(e.to_string()))?;
        Ok(params)
    }

    /// These defaults with a request's parameters applied; other parameters are ignored.
    pub fn with_request(
        &self,
        parameters: &[(String, ParameterValue)],
        context_length: usize,
    ) -> Result<Self, BackendError> {
        let named = |name: &str| parameters.iter().any(|(key, _)| key == name);
        if named(STOP) && named(STOP_SEQUENCES) {
            return Err(BackendError::InvalidInput(format!(
                "send either '{STOP}' (one string) or '{STOP_SEQUENCES}' (a JSON list of \
                 strings), not both"
            )));
        }
        let mut params = self.clone();
        for (key, value) in parameters {
            params.apply(key, value)?;
        }
        params.validate(context_length)?;
        Ok(params)
    }
}

/// The generation defaults a model's `parameters` set: the same names as request
/// parameters, parsed by [`GenerationParams::from_config`] once the context length is
/// known.
#[derive(Debug, Clone, Default)]
pub struct ConfigDefaults(pub BTreeMap<String, String>);

impl Settings for ConfigDefaults {
    fn names() -> Vec<&'static str> {
        GENERATION_PARAMETERS.to_vec()
    }

    fn parse(parameters: &BTreeMap<String, String>) -> Result<Self, BackendError> {
        Ok(ConfigDefaults(
            parameters
                .iter()
                .filter(|(key, _)| GENERATION_PARAMETERS.contains(&key.as_str()))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params(pairs: &[(&str, ParameterValue)]) -> Result<GenerationParams, BackendError> {
        let pairs: Vec<(String, ParameterValue)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        GenerationParams::default().with_request(&pairs, 128)
    }

    #[test]
    fn request_parameters_override_defaults() {
        let p = params(&[
            ("max_new_tokens", ParameterValue::Int(7)),
            ("temperature", ParameterValue::Double(0.5)),
            ("do_sample", ParameterValue::Bool(false)),
            ("seed", ParameterValue::Int(42)),
            (
                "stop_sequences",
                ParameterValue::String(r#"["\n", "."]"#.into()),
            ),
            ("binary_data_output", ParameterValue::Bool(true)),
        ])
        .expect("valid");
        assert_eq!(p.max_new_tokens, 7);
        assert_eq!(p.temperature, 0.5);
        assert!(!p.do_sample);
        assert_eq!(p.seed, Some(42));
        assert_eq!(p.stop, vec!["\n".to_string(), ".".to_string()]);
        assert_eq!(
            params(&[("stop", ParameterValue::String("END".into()))])
                .expect("valid")
                .stop,
            vec!["END"]
        );
        // A plain string is one stop string, even when it looks like a list.
        for marker in ["[INST]", "[1, 2]", "[\"a\""] {
            let p = params(&[("stop", ParameterValue::String(marker.into()))]).expect(marker);
            assert_eq!(p.stop, vec![marker]);
        }
    }

    #[test]
    fn invalid_parameters_are_named() {
        let cases = [
            (
                "temperature",
                ParameterValue::Double(-1.0),
                "'temperature' must be a number > 0",
            ),
            (
                "temperature",
                ParameterValue::Double(f64::NAN),
                "'temperature' must be a number > 0",
            ),
            (
                "temperature",
                ParameterValue::Double(1e-38),
                "at least 0.0001 (send do_sample=false for greedy decoding), got 0.00000",
            ),
            (
                "temperature",
                ParameterValue::Double(1e-45),
                "'temperature' must be a number > 0, at least 0.0001",
            ),
            (
                "top_p",
                ParameterValue::Double(1.5),
                "'top_p' must be in (0, 1]",
            ),
            (
                "top_p",
                ParameterValue::Double(0.0),
                "'top_p' must be in (0, 1]",
            ),
            (
                "max_new_tokens",
                ParameterValue::Int(1_000_000),
                "'max_new_tokens' must be between 1",
            ),
            (
                "max_new_tokens",
                ParameterValue::Int(-5),
                "'max_new_tokens' must be a positive integer",
            ),
            (
                "top_k",
                ParameterValue::String("many".into()),
                "'top_k' must be an integer >= 0",
            ),
            (
                "do_sample",
                ParameterValue::Int(3),
                "'do_sample' must be true or false",
            ),
            (
                "repetition_penalty",
                ParameterValue::Double(0.0),
                "'repetition_penalty' must be a number > 0",
            ),
            (
                "stop_sequences",
                ParameterValue::String("[1, 2]".into()),
                "'stop_sequences' must be a JSON list of strings",
            ),
            (
                "stop_sequences",
                ParameterValue::String("END".into()),
                "'stop_sequences' must be a JSON list of strings",
            ),
            ("stop", ParameterValue::Int(7), "'stop' must be a string"),
            (
                "stop",
                ParameterValue::String("x".repeat(MAX_STOP_BYTES + 1)),
                "'stop' takes at most 16 strings of at most 256 bytes",
            ),
            (
                "stop_sequences",
                ParameterValue::String(serde_json::json!(vec!["x"; 17]).to_string()),
                "'stop_sequences' takes at most 16 strings",
            ),
        ];
        for (key, value, expected) in cases {
            let error = params(&[(key, value)]).expect_err(key).to_string();
            assert!(
                error.contains(expected),
                "{error} should contain {expected}"
            );
        }
    }

    #[test]
    fn config_defaults_are_strings_and_seed_is_per_request() {
        let config: BTreeMap<String, String> = [("max_new_tokens", "12"), ("do_sample", "false")]
            .map(|(k, v)| (k.into(), v.into()))
            .into();
        let p = GenerationParams::from_config(&config, 128).expect("valid");
        assert_eq!(
            (p.max_new_tokens, p.do_sample, p.temperature),
            (12, false, 0.7)
        );
        let config: BTreeMap<String, String> = [("seed".to_string(), "1".to_string())].into();
        assert!(GenerationParams::from_config(&config, 128).is_err());
    }

    fn parameter_value() -> impl Strategy<Value = ParameterValue> {
        prop_oneof![
            any::<i64>().prop_map(ParameterValue::Int),
            any::<f64>().prop_map(ParameterValue::Double),
            any::<bool>().prop_map(ParameterValue::Bool),
            "\\PC{0,12}".prop_map(ParameterValue::String),
            Just(ParameterValue::String("[\"a\", \"\"]".into())),
            Just(ParameterValue::Other),
        ]
    }

    proptest! {
        /// Untrusted request parameters: any values are taken or refused with a 400,
        /// never a panic, and what is taken keeps every documented bound.
        #[test]
        fn any_request_parameters_keep_the_bounds(
            pairs in proptest::collection::vec(
                (proptest::sample::select(GENERATION_PARAMETERS.to_vec()), parameter_value()),
                0..6,
            ),
        ) {
            let pairs: Vec<(String, ParameterValue)> =
                pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            match GenerationParams::default().with_request(&pairs, 128) {
                Ok(p) => {
                    prop_assert!((1..=128).contains(&p.max_new_tokens));
                    prop_assert!(p.temperature >= MIN_TEMPERATURE && p.temperature.is_finite());
                    prop_assert!(p.top_p > 0.0 && p.top_p <= 1.0);
                    prop_assert!(p.repetition_penalty > 0.0 && p.repetition_penalty.is_finite());
                    prop_assert!(p.stop.len() <= MAX_STOP_STRINGS);
                    prop_assert!(p.stop.iter().all(|s| !s.is_empty() && s.len() <= MAX_STOP_BYTES));
                }
                Err(error) => prop_assert!(matches!(error, BackendError::InvalidInput(_))),
            }
        }
    }
}
