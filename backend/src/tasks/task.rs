//! The `Task` trait, what a task is given (model and instance context, request data)
//! and how its tensors are checked.

use std::collections::HashMap;
use std::path::Path;

use crate::config::{ModelConfig, TensorSpec};
use crate::error::BackendError;
use crate::onnx::{Device, OnnxModel, OnnxRuntimeLibrary};
pub use crate::responder::Pending;
use crate::responder::Responder;
use crate::settings::{SessionSettings, Settings};
use crate::triton::Server;
use crate::types::{InputTensor, MemoryUsage, ParameterValue};

/// A kind of model.
pub trait Task: Sized + Send + Sync + 'static {
    /// The `task` parameter that selects it.
    const NAME: &'static str;
    /// What it reads from the model's `parameters`.
    type Settings: Settings;
    /// What each model instance holds (e.g. an ONNX Runtime session).
    type Instance: Send + 'static;
    /// One request, validated and ready to run.
    type Request: Send + 'static;
    /// Whether its instances run a model on their device; a router only forwards.
    const RUNS_A_MODEL: bool = true;

    /// The inputs and outputs a configuration may declare for this task; `None` for a
    /// task that checks them itself when it loads (against another model's).
    fn contract(decoupled: bool) -> Option<TensorContract>;

    /// Loads one model version (shared by its instances).
    fn load(model: &ModelContext<'_>, settings: Self::Settings) -> Result<Self, BackendError>;

    /// Builds one instance's state.
    fn instance(&self, instance: &InstanceContext) -> Result<Self::Instance, BackendError>;

    /// Validates one request's data.
    fn prepare(&self, request: RequestData<'_>) -> Result<Self::Request, BackendError>;

    /// The batch rows (sequences) a request adds, for batch statistics.
    fn rows(request: &Self::Request) -> usize;

    /// Runs one batch and answers each request through its responder.
    fn execute(&self, instance: &mut Self::Instance, batch: Vec<Pending<Self::Request>>);

    /// For models Triton does not batch (`max_batch_size: 0`): `Some(rows)` has
    /// `execute` queue requests for a worker thread of the instance, which runs all the
    /// requests that queued while it was busy as one batch of at most `rows` rows (a
    /// request alone may have more). `None`: each execution runs on Triton's thread.
    fn batch_across_executions(&self) -> Option<usize> {
        None
    }

    /// The memory the model version holds for all its instances.
    fn memory_usage(&self) -> Vec<MemoryUsage>;

    /// The memory one instance holds.
    fn instance_memory_usage(
        &self,
        instance: &Self::Instance,
    ) -> Result<Vec<MemoryUsage>, BackendError>;
}

/// What a task needs to load a model version.
pub struct ModelContext<'a> {
    pub name: &'a str,
    pub version: u64,
    pub config: &'a ModelConfig,
    /// `<repository>/<model>/<version>/`: the version's files.
    pub version_dir: &'a Path,
    pub onnxruntime: &'a OnnxRuntimeLibrary,
    /// `--backend-config=rust,require-gpu=true`: models run on GPU instances only.
    pub require_gpu: bool,
    /// The server, for tasks that send requests into it.
    pub server: Server,
}

impl ModelContext<'_> {
    /// The version's `model.onnx`, for sessions with `threads`, its weights shared when
    /// the version has more than one instance.
    pub fn onnx_model(&self, threads: SessionSettings) -> Result<OnnxModel, BackendError> {
        OnnxModel::open(
            self.onnxruntime,
            self.version_dir,
            threads,
            self.config.instance_count(),
        )
    }
}

/// What a task needs to build an instance.
#[derive(Debug, Clone)]
pub struct InstanceContext {
    pub name: String,
    pub device: Device,
}

/// One request's data, read from Triton (inputs borrowed where they are in one piece).
#[derive(Debug, Default)]
pub struct RequestData<'r> {
    pub inputs: HashMap<String, InputTensor<'r>>,
    /// KServe request parameters.
    pub parameters: Vec<(String, ParameterValue)>,
    /// The outputs the client asked for (all the model's outputs when it named none).
    pub requested_outputs: Vec<String>,
    /// The request's timeout in microseconds (0: none).
    pub timeout_us: u64,
}

/// The batch's requests and, in the same order, their responders.
pub fn unzip_batch<R>(batch: Vec<Pending<R>>) -> (Vec<R>, Vec<Box<dyn Responder>>) {
    batch
        .into_iter()
        .map(|pending| (pending.request, pending.responder))
        .unzip()
}

/// Fails every request of a batch with `error` (when the batch as a whole failed);
/// requests already answered keep their answer.
pub fn fail_all(responders: &mut [Box<dyn Responder>], error: &BackendError) {
    for responder in responders {
        responder.fail(error);
    }
}

/// A tensor as the configuration must declare it for a task.
#[derive(Debug, Clone, Copy)]
pub struct Contract {
    pub name: &'static str,
    pub data_type: &'static str,
    pub required: bool,
}

/// A task's inputs and outputs.
#[derive(Debug, Clone, Copy)]
pub struct TensorContract {
    pub inputs: &'static [Contract],
    pub outputs: &'static [Contract],
}

impl TensorContract {
    /// Checks the configuration's declared inputs and outputs against the contract.
    pub fn check(&self, config: &ModelConfig, task: &str) -> Result<(), BackendError> {
        check_contracts("input", &config.inputs, self.inputs, task)?;
        check_contracts("output", &config.outputs, self.outputs, task)
    }
}

fn check_contracts(
    kind: &str,
    declared: &[TensorSpec],
    contracts: &[Contract],
    task: &str,
) -> Result<(), BackendError> {
    for spec in declared {
        let contract = contracts
            .iter()
            .find(|c| c.name == spec.name)
            .ok_or_else(|| {
                let names: Vec<_> = contracts.iter().map(|c| c.name).collect();
                BackendError::Config(format!(
                    "{kind} '{}' is not served by task '{task}'; its {kind}s are {names:?}",
                    spec.name
                ))
            })?;
        if spec.data_type != contract.data_type {
            return Err(BackendError::Config(format!(
                "{kind} '{}' must be {}, not {}",
                spec.name, contract.data_type, spec.data_type
            )));
        }
    }
    for contract in contracts.iter().filter(|c| c.required) {
        if !declared.iter().any(|spec| spec.name == contract.name) {
            return Err(BackendError::Config(format!(
                "task '{task}' needs {kind} '{}' ({})",
                contract.name, contract.data_type
            )));
        }
    }
    if declared.is_empty() {
        return Err(BackendError::Config(format!(
            "the configuration declares no {kind}"
        )));
    }
    Ok(())
}
