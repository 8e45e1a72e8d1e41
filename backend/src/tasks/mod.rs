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

use crate::settings::{KnownParameters, Settings};

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
