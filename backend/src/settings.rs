//! Typed settings from a model's `parameters`, parsed once at load.
//!
//! Each task declares its settings as groups of `serde` structs ([`Settings`]); the
//! groups' field names are the task's one list of known parameters, so a parameter no
//! group of the task knows (a typo in `config.pbtxt`) fails the load and names itself.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use crate::error::BackendError;

/// The parameter that selects the task; every model has it.
pub const TASK: &str = "task";

/// Settings a task reads from the model's `parameters`.
pub trait Settings: Sized {
    /// The parameters these settings read.
    fn names() -> Vec<&'static str>;
    /// Parses them; absent parameters take their defaults.
    fn parse(parameters: &BTreeMap<String, String>) -> Result<Self, BackendError>;
}

/// One group of settings with `serde` derives: its field names are its parameters.
pub trait SettingsGroup: DeserializeOwned {}

impl<G: SettingsGroup> Settings for G {
    fn names() -> Vec<&'static str> {
        serde_aux::serde_introspection::serde_introspect::<G>().to_vec()
    }

    fn parse(parameters: &BTreeMap<String, String>) -> Result<Self, BackendError> {
        let values: serde_json::Map<String, serde_json::Value> = parameters
            .iter()
            .map(|(key, value)| (key.clone(), serde_json::Value::String(value.clone())))
            .collect();
        serde_path_to_error::deserialize(serde_json::Value::Object(values)).map_err(|error| {
            BackendError::Config(format!("parameter '{}' {}", error.path(), error.inner()))
        })
    }
}

macro_rules! settings_tuple {
    ($($group:ident),+) => {
        impl<$($group: Settings),+> Settings for ($($group,)+) {
            fn names() -> Vec<&'static str> {
                [$($group::names()),+].concat()
            }

            fn parse(parameters: &BTreeMap<String, String>) -> Result<Self, BackendError> {
                Ok(($($group::parse(parameters)?,)+))
            }
        }
    };
}

settings_tuple!(A, B);
settings_tuple!(A, B, C);
settings_tuple!(A, B, C, D);

/// A task's name and the parameters it knows, for refusing unknown ones.
pub struct KnownParameters {
    pub task: &'static str,
    pub names: Vec<&'static str>,
}

/// Fails on the first parameter `known` (the model's task) does not read: named with
/// every other task that reads it, else as unknown.
pub fn refuse_unknown(
    parameters: &BTreeMap<String, String>,
    known: &KnownParameters,
    others: &[KnownParameters],
) -> Result<(), BackendError> {
    let Some(unknown) = parameters
        .keys()
        .find(|key| key.as_str() != TASK && !known.names.contains(&key.as_str()))
    else {
        return Ok(());
    };
    let owners: Vec<String> = others
        .iter()
        .filter(|o| o.names.contains(&unknown.as_str()))
        .map(|o| format!("'{}'", o.task))
        .collect();
    if !owners.is_empty() {
        let tasks = if owners.len() == 1 { "task" } else { "tasks" };
        return Err(BackendError::Config(format!(
            "parameter '{unknown}' only applies to {tasks} {}",
            owners.join(", ")
        )));
    }
    Err(BackendError::Config(format!(
        "unknown parameter '{unknown}'; known parameters for task '{}': {TASK}, {}",
        known.task,
        known.names.join(", ")
    )))
}

/// Reads a positive integer parameter (written as a string in `config.pbtxt`) of at
/// most `MAX`: every number a configuration can ask for is bounded.
pub fn positive_at_most<'de, const MAX: usize, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<usize, D::Error> {
    let text = String::deserialize(deserializer)?;
    bounded_positive(&text, MAX, "").map_err(serde::de::Error::custom)
}

/// Reads an integer parameter from 0 to `MAX`.
pub fn at_most<'de, const MAX: usize, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<usize, D::Error> {
    let text = String::deserialize(deserializer)?;
    match text.trim().parse::<usize>() {
        Ok(value) if value <= MAX => Ok(value),
        Ok(_) => Err(format!("must be at most {MAX}, got '{text}'")),
        Err(_) => Err(format!("must be an integer from 0 to {MAX}, got '{text}'")),
    }
    .map_err(serde::de::Error::custom)
}

/// [`positive_at_most`] for a parameter without a default.
pub fn optional_positive_at_most<'de, const MAX: usize, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<usize>, D::Error> {
    positive_at_most::<MAX, D>(deserializer).map(Some)
}

/// Threads per session: at most 4 per core of this machine (more only costs memory and
/// start-up time; ONNX Runtime allocates per thread).
pub fn thread_count<'de, D: Deserializer<'de>>(deserializer: D) -> Result<usize, D::Error> {
    let text = String::deserialize(deserializer)?;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let why = format!(" (4 per core, {cores} cores here)");
    bounded_positive(&text, 4 * cores, &why).map_err(serde::de::Error::custom)
}

fn bounded_positive(text: &str, max: usize, why: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(value) if value > 0 && value <= max => Ok(value),
        Ok(value) if value > max => Err(format!("must be at most {max}{why}, got '{text}'")),
        _ => Err(format!("must be a positive integer, got '{text}'")),
    }
}

/// Reads `true` or `false`.
pub fn flag<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    let text = String::deserialize(deserializer)?;
    match text.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(serde::de::Error::custom(format!(
            "must be true or false, got '{text}'"
        ))),
    }
}

/// Reads a non-empty string.
pub fn non_empty<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    let text = String::deserialize(deserializer)?;
    if text.is_empty() {
        return Err(serde::de::Error::custom("is empty"));
    }
    Ok(Some(text))
}

fn one() -> usize {
    1
}

/// Threads of the ONNX Runtime session of each instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct SessionSettings {
    #[serde(default = "one", deserialize_with = "thread_count")]
    pub intra_op_thread_count: usize,
    #[serde(default = "one", deserialize_with = "thread_count")]
    pub inter_op_thread_count: usize,
}

impl SettingsGroup for SessionSettings {}

/// The default of `max_text_bytes`: far above any text a model's context can hold,
/// low enough that tokenizing an abusive request cannot stall an instance for long.
pub const DEFAULT_MAX_TEXT_BYTES: usize = 1 << 20;
/// The most `max_text_bytes` may be.
const MAX_TEXT_BYTES: usize = 64 << 20;
/// The most `max_sequence_length` may be (the model's own table is checked at load).
const MAX_SEQUENCE_LENGTH: usize = 1 << 20;

fn default_max_text_bytes() -> usize {
    DEFAULT_MAX_TEXT_BYTES
}

/// How texts are read and tokenized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct TextSettings {
    /// Tokens per text, special tokens included; longer texts are truncated.
    #[serde(
        default,
        deserialize_with = "optional_positive_at_most::<MAX_SEQUENCE_LENGTH, _>"
    )]
    pub max_sequence_length: Option<usize>,
    /// UTF-8 bytes per text at most; longer texts are refused before tokenization.
    #[serde(
        default = "default_max_text_bytes",
        deserialize_with = "positive_at_most::<MAX_TEXT_BYTES, _>"
    )]
    pub max_text_bytes: usize,
}

impl SettingsGroup for TextSettings {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn parameters(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn groups_parse_with_defaults_and_name_bad_values() {
        let (session, text) = <(SessionSettings, TextSettings)>::parse(&parameters(&[(
            "intra_op_thread_count",
            "2",
        )]))
        .expect("valid");
        assert_eq!(
            (session.intra_op_thread_count, session.inter_op_thread_count),
            (2, 1)
        );
        assert_eq!(text.max_sequence_length, None);
        assert_eq!(text.max_text_bytes, DEFAULT_MAX_TEXT_BYTES);
        for (key, value) in [
            ("max_sequence_length", "0"),
            ("intra_op_thread_count", "x"),
            ("max_text_bytes", "-3"),
        ] {
            let error = <(SessionSettings, TextSettings)>::parse(&parameters(&[(key, value)]))
                .expect_err(key)
                .to_string();
            assert!(
                error.contains(&format!(
                    "'{key}' must be a positive integer, got '{value}'"
                )),
                "{error}"
            );
        }
    }

    #[test]
    fn numbers_are_bounded() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let too_many = (4 * cores + 1).to_string();
        for (key, value, expected) in [
            (
                "intra_op_thread_count",
                "100000",
                format!("must be at most {} (4 per core", 4 * cores),
            ),
            (
                "inter_op_thread_count",
                too_many.as_str(),
                "must be at most".into(),
            ),
            (
                "max_text_bytes",
                "67108865",
                "must be at most 67108864".into(),
            ),
            (
                "max_sequence_length",
                "1000000000000",
                "must be at most 1048576".into(),
            ),
        ] {
            let error = <(SessionSettings, TextSettings)>::parse(&parameters(&[(key, value)]))
                .expect_err(key)
                .to_string();
            assert!(
                error.contains(&format!("parameter '{key}' {expected}")),
                "{error}"
            );
        }
        let (session, _) = <(SessionSettings, TextSettings)>::parse(&parameters(&[(
            "intra_op_thread_count",
            &(4 * cores).to_string(),
        )]))
        .expect("4 per core is allowed");
        assert_eq!(session.intra_op_thread_count, 4 * cores);
    }

    #[test]
    fn names_come_from_the_fields() {
        assert_eq!(
            <(SessionSettings, TextSettings)>::names(),
            [
                "intra_op_thread_count",
                "inter_op_thread_count",
                "max_sequence_length",
                "max_text_bytes"
            ]
        );
    }

    #[test]
    fn unknown_parameters_are_named_with_their_owner() {
        let known = KnownParameters {
            task: "a",
            names: vec!["x"],
        };
        let others = [
            KnownParameters {
                task: "b",
                names: vec!["y", "w"],
            },
            KnownParameters {
                task: "c",
                names: vec!["w"],
            },
        ];
        assert!(refuse_unknown(&parameters(&[("task", "a"), ("x", "1")]), &known, &others).is_ok());
        let error = refuse_unknown(&parameters(&[("y", "1")]), &known, &others)
            .expect_err("y is b's")
            .to_string();
        assert!(error.contains("'y' only applies to task 'b'"), "{error}");
        let error = refuse_unknown(&parameters(&[("w", "1")]), &known, &others)
            .expect_err("w is b's and c's")
            .to_string();
        assert!(
            error.contains("'w' only applies to tasks 'b', 'c'"),
            "{error}"
        );
        let error = refuse_unknown(&parameters(&[("z", "1")]), &known, &others)
            .expect_err("z is nobody's")
            .to_string();
        assert!(error.contains("unknown parameter 'z'"), "{error}");
    }

    proptest! {
        /// Untrusted configuration values: any text for any parameter is taken within
        /// its bound or refused, naming the parameter.
        #[test]
        fn any_values_are_bounded_or_refused(
            key in proptest::sample::select(<(SessionSettings, TextSettings)>::names()),
            value in "\\PC{0,8}|[0-9]{1,24}",
        ) {
            match <(SessionSettings, TextSettings)>::parse(&parameters(&[(key, value.as_str())])) {
                Ok((session, text)) => {
                    let cores = std::thread::available_parallelism().map_or(1, usize::from);
                    prop_assert!((1..=4 * cores).contains(&session.intra_op_thread_count));
                    prop_assert!((1..=4 * cores).contains(&session.inter_op_thread_count));
                    prop_assert!((1..=MAX_TEXT_BYTES).contains(&text.max_text_bytes));
                    prop_assert!(text.max_sequence_length.is_none_or(|n| (1..=MAX_SEQUENCE_LENGTH).contains(&n)));
                }
                Err(error) => {
                    let named = format!("parameter '{key}'");
                    prop_assert!(error.to_string().contains(&named), "{}", error);
                }
            }
        }
    }
}
