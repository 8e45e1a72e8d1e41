//! The kinds of model this backend serves, one module each, behind one trait.
//!
//! A task declares its tensor contract and its settings, builds its per-instance state
//! (an ONNX Runtime session only if it needs one), prepares each request on its own (an
//! error stays with that request), and runs a batch, answering every request through
//! its [`crate::responder::Responder`]. Adding a task is one new module plus one line in [`registry!`].

mod encoder;
pub mod feature_extraction;
pub mod sentiment;
mod task;
pub mod text_generation;
pub mod traffic_split;

pub use task::{
    Contract, InstanceContext, ModelContext, Pending, RequestData, Task, TensorContract, fail_all,
    unzip_batch,
};

use std::collections::BTreeMap;

use crate::error::BackendError;
use crate::settings::{self, KnownParameters, Settings};

/// Does something with the task type a model names (`model.rs` loads it).
pub trait TaskVisitor {
    type Output;
    fn visit<T: Task>(self) -> Self::Output;
}

/// The one list of tasks: one line each.
macro_rules! registry {
    ($($task:ty),+ $(,)?) => {
        /// Hands the task named `name` to `visitor`; `None` for a name no task has.
        pub fn visit_task<V: TaskVisitor>(name: &str, visitor: V) -> Option<V::Output> {
            $(if name == <$task>::NAME {
                return Some(visitor.visit::<$task>());
            })+
            None
        }

        /// Every task's parameters, for naming the task a misplaced parameter belongs to.
        pub fn known_parameters() -> Vec<KnownParameters> {
            vec![$(KnownParameters {
                task: <$task>::NAME,
                names: <<$task as Task>::Settings as Settings>::names(),
            }),+]
        }
    };
}

registry!(
    sentiment::SentimentClassifier,
    feature_extraction::FeatureExtraction,
    text_generation::TextGeneration,
    traffic_split::TrafficSplit,
);

/// The task names, for messages.
pub fn task_names() -> String {
    known_parameters()
        .iter()
        .map(|known| format!("'{}'", known.task))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Task `T`'s settings from a model's `parameters`: a parameter `T` does not read fails
/// (named as another task's when one reads it), as does a bad value.
pub fn parse_settings<T: Task>(
    parameters: &BTreeMap<String, String>,
) -> Result<T::Settings, BackendError> {
    let known = KnownParameters {
        task: T::NAME,
        names: T::Settings::names(),
    };
    let others: Vec<KnownParameters> = known_parameters()
        .into_iter()
        .filter(|other| other.task != T::NAME)
        .collect();
    settings::refuse_unknown(parameters, &known, &others)?;
    T::Settings::parse(parameters)
}

#[cfg(test)]
mod tests {
    use super::*;
    use feature_extraction::FeatureExtraction;
    use sentiment::SentimentClassifier;

    fn parameters(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn rejects_bad_parameters_by_name() {
        type Parse = fn(&BTreeMap<String, String>) -> Result<(), BackendError>;
        type Case<'a> = (Parse, &'a [(&'a str, &'a str)], &'a str);
        let classifier: Parse = |p| parse_settings::<SentimentClassifier>(p).map(|_| ());
        let encoder: Parse = |p| parse_settings::<FeatureExtraction>(p).map(|_| ());
        let cases: &[Case<'_>] = &[
            (
                encoder,
                &[("max_sequence_length", "0")],
                "'max_sequence_length' must be a positive integer",
            ),
            (
                encoder,
                &[("intra_op_thread_count", "x")],
                "'intra_op_thread_count' must be a positive integer",
            ),
            (encoder, &[("labels", "a,b")], "'labels' only applies"),
            (classifier, &[("labels", "a,,b")], "non-empty names"),
            (
                classifier,
                &[("max_seq_len", "8")],
                "unknown parameter 'max_seq_len'",
            ),
            (
                encoder,
                &[("temperature", "0.5")],
                "'temperature' only applies to task 'text-generation'",
            ),
            (classifier, &[("pad_token", "")], "'pad_token' is empty"),
        ];
        for (parse, pairs, expected) in cases {
            let mut pairs = parameters(pairs);
            pairs.insert("task".into(), "ignored here".into());
            let error = parse(&pairs).unwrap_err().to_string();
            assert!(
                error.contains(expected),
                "{error} should contain {expected}"
            );
        }
    }

    #[test]
    fn settings_come_typed_with_their_defaults() {
        let (session, text, batch, labels) = parse_settings::<SentimentClassifier>(&parameters(&[
            ("labels", "negative, neutral,positive"),
            ("intra_op_thread_count", "2"),
        ]))
        .expect("valid parameters");
        assert_eq!(
            labels.labels,
            Some(vec!["negative".into(), "neutral".into(), "positive".into()])
        );
        assert_eq!(session.intra_op_thread_count, 2);
        assert_eq!(session.inter_op_thread_count, 1);
        assert_eq!(text.max_sequence_length, None);
        assert_eq!(batch.pad_token, None);
        assert_eq!(batch.max_texts_per_request, encoder::DEFAULT_MAX_TEXTS);
    }
}
