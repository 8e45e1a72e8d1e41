//! One type per Triton concept: the backend, a model (config parsed once at load), and a
//! model instance (one ONNX Runtime session). `execute` gathers the inputs of all
//! requests into one batch, runs it, and answers each request on its own.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use ort::session::Session;

use crate::config::{ModelConfig, ModelSettings};
use crate::error::BackendError;
use crate::generation::GenerationProgress;
use crate::memory;
use crate::onnx::{self, Device, OnnxRuntimeLibrary, SessionOptions};
use crate::pipeline::OutputTensor;
use crate::task::{TaskBinding, TaskLogic, TaskRequest};
use crate::triton::{
    BackendHandle, Error, ErrorCode, ExecutionTimes, InstanceHandle, InstanceKind, MemoryUsage,
    ModelHandle, Request, Response, now_ns,
};
use crate::warmup;
use crate::{log_error, log_info};

pub const MODEL_FILE: &str = "model.onnx";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Process-wide backend state: where ONNX Runtime comes from.
pub struct BackendState {
    pub onnxruntime: OnnxRuntimeLibrary,
}

impl BackendState {
    pub fn new(backend: BackendHandle) -> Result<Self, Error> {
        let config: serde_json::Value = serde_json::from_str(&backend.config_json()?)
            .map_err(|e| Error::internal(format!("backend config is not JSON: {e}")))?;
        let configured = config
            .pointer("/cmdline/onnxruntime-library")
            .and_then(serde_json::Value::as_str);
        let env_path = std::env::var("ORT_DYLIB_PATH").ok();
        let backend_dir = PathBuf::from(backend.artifacts_dir()?);
        let onnxruntime =
            OnnxRuntimeLibrary::resolve(configured, env_path.as_deref(), &backend_dir);
        match &onnxruntime {
            OnnxRuntimeLibrary::Found { path, .. } => {
                log_info!("triton-rust: ONNX Runtime library: {}", path.display())
            }
            OnnxRuntimeLibrary::Missing(reason) => log_error!("triton-rust: {reason}"),
        }
        Ok(BackendState { onnxruntime })
    }
}

/// A loaded model version: its settings, tokenizer and task logic, shared by instances.
pub struct ModelState {
    pub name: String,
    pub version: u64,
    settings: ModelSettings,
    max_batch_size: i64,
    model_path: PathBuf,
    task: TaskLogic,
    environment: ort::environment::Environment,
}

impl ModelState {
    pub fn new(model: ModelHandle, backend: &BackendState) -> Result<Self, Error> {
        let name = model.name()?;
        let version = model.version()?;
        let config_json = model.config_json()?;
        let config = ModelConfig::from_json(&config_json)?;
        let settings = ModelSettings::from_parameters(&config.parameters)?;
        let model_dir = PathBuf::from(model.repository_path()?);
        let version_dir = model_dir.join(version.to_string());
        let model_path = version_dir.join(MODEL_FILE);
        if !model_path.is_file() {
            return Err(BackendError::ModelFile(format!(
                "model file {} does not exist",
                model_path.display()
            ))
            .into());
        }
        let task = TaskLogic::new(&config, &settings, &version_dir.join(TOKENIZER_FILE))?;
        let environment = onnx::environment(&backend.onnxruntime)?;
        log_info!(
            "triton-rust: model '{name}' version {version}: task {:?}, max batch size {}",
            settings.task,
            config.max_batch_size
        );
        let state = ModelState {
            name,
            version,
            settings,
            max_batch_size: config.max_batch_size,
            model_path,
            task,
            environment,
        };
        state.check_warmup(&config_json, &config, &model_dir)?;
        Ok(state)
    }

    /// The memory this model version holds for all its instances: its tokenizer.
    pub fn memory_usage(&self) -> Vec<MemoryUsage> {
        vec![memory::tokenizer_usage(self.task.tokenizer())]
    }

    /// Puts each warm-up request Triton will send through the same input validation as a
    /// client request: the first one the backend would refuse fails the load here, before
    /// any instance runs it.
    fn check_warmup(
        &self,
        config_json: &str,
        config: &ModelConfig,
        model_dir: &Path,
    ) -> Result<(), Error> {
        let outputs: Vec<String> = config.outputs.iter().map(|o| o.name.clone()).collect();
        for request in warmup::warmup_requests(config_json, self.max_batch_size, model_dir)? {
            self.task
                .prepare(request.inputs, &[], outputs.clone())
                .map_err(|error| {
                    BackendError::Config(format!(
                        "model_warmup sample '{}': {error}",
                        request.sample
                    ))
                })?;
        }
        Ok(())
    }
}

/// Triton calls instances of one model from several threads at once, all reading the
/// shared model state, and may run an instance's executions on different threads.
const _: () = {
    const fn shared_across_threads<T: Send + Sync>() {}
    const fn moved_across_threads<T: Send>() {}
    shared_across_threads::<BackendState>();
    shared_across_threads::<ModelState>();
    moved_across_threads::<InstanceState>();
};

/// One model instance: an ONNX Runtime session bound to the model's task.
pub struct InstanceState {
    pub name: String,
    session: Session,
    binding: TaskBinding,
    device: Device,
}

impl InstanceState {
    pub fn new(instance: InstanceHandle, model: &ModelState) -> Result<Self, Error> {
        let name = instance.name()?;
        let device = match instance.kind()? {
            InstanceKind::Gpu { device_id } => Device::Cuda { device_id },
            InstanceKind::Cpu | InstanceKind::Model { .. } | InstanceKind::Auto => Device::Cpu,
        };
        let options = SessionOptions {
            intra_op_threads: model.settings.intra_op_threads,
            inter_op_threads: model.settings.inter_op_threads,
            device,
        };
        let session = onnx::load_session(&model.environment, &model.model_path, options)?;
        let binding = model.task.bind(&session, &model.environment, options)?;
        log_info!(
            "triton-rust: instance '{name}' of '{}' ready on {device:?}",
            model.name
        );
        Ok(InstanceState {
            name,
            session,
            binding,
            device,
        })
    }

    /// The memory this instance holds: its session's weights, on its device.
    pub fn memory_usage(&self, model: &ModelState) -> Result<Vec<MemoryUsage>, Error> {
        Ok(vec![memory::session_weights(
            &model.model_path,
            self.device,
        )?])
    }
}

/// Reads a request's inputs and requested outputs into host memory.
fn read_request(request: &Request, model: &ModelState) -> Result<TaskRequest, Error> {
    let mut inputs = HashMap::new();
    for name in request.input_names()? {
        let tensor = request.read_input(&name)?;
        inputs.insert(name, tensor);
    }
    let wanted = request.requested_output_names()?;
    let parameters = request.parameters()?;
    Ok(model.task.prepare(inputs, &parameters, wanted)?)
}

/// The message a panic carries (a `&str` or a `String`), for logs and errors.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

/// Executes one batch of requests. Never fails as a whole: every error is answered to
/// the request that caused it (or to every request of the batch, if the batch failed).
pub fn execute(
    instance: InstanceHandle,
    state: &mut InstanceState,
    model: &ModelState,
    requests: Vec<Request>,
) {
    let exec_start_ns = now_ns();
    let mut batched: Vec<Request> = Vec::with_capacity(requests.len());
    let mut prepared: Vec<TaskRequest> = Vec::with_capacity(requests.len());
    let mut failed: Vec<(Request, Error)> = Vec::new();
    for request in requests {
        let read = catch_unwind(AssertUnwindSafe(|| read_request(&request, model))).unwrap_or_else(
            |panic| {
                Err(Error::internal(format!(
                    "panic while reading the request: {}",
                    panic_message(&*panic)
                )))
            },
        );
        match read {
            Ok(task_request) => {
                batched.push(request);
                prepared.push(task_request);
            }
            Err(error) => failed.push((request, error)),
        }
    }

    let batch_size: u64 = if model.max_batch_size > 0 {
        prepared.iter().map(|p| p.rows() as u64).sum()
    } else {
        prepared.len() as u64
    };
    let compute_start_ns = now_ns();
    let outcome = if prepared.is_empty() {
        Ok(Vec::new())
    } else {
        catch_unwind(AssertUnwindSafe(|| {
            let mut progress = BatchProgress::new(&batched);
            let outputs = model.task.run(
                &mut state.session,
                &mut state.binding,
                prepared,
                &mut progress,
            )?;
            Ok(outputs
                .into_iter()
                .zip(progress.stream_errors)
                .map(|(outputs, error)| error.map_or(Ok(outputs), Err))
                .collect::<Vec<_>>())
        }))
        .unwrap_or_else(|panic| {
            Err(BackendError::Onnx(format!(
                "panic while running the model: {}",
                panic_message(&*panic)
            )))
        })
    };
    let compute_end_ns = now_ns();

    let mut finished: Vec<(Request, Result<Vec<OutputTensor>, Error>)> = Vec::new();
    match outcome {
        Ok(outputs) => {
            for (request, outputs) in batched.into_iter().zip(outputs) {
                finished.push((request, outputs));
            }
        }
        Err(error) => {
            let error = Error::from(error);
            log_error!("triton-rust: '{}' execution failed: {error}", model.name);
            for request in batched {
                finished.push((request, Err(error.clone())));
            }
        }
    }
    finished.extend(
        failed
            .into_iter()
            .map(|(request, error)| (request, Err(error))),
    );

    let answered: Vec<(Request, bool)> = finished
        .into_iter()
        .map(|(request, result)| answer(request, result))
        .collect();
    let times = ExecutionTimes {
        exec_start_ns,
        compute_start_ns,
        compute_end_ns,
        exec_end_ns: now_ns(),
    };
    for (request, success) in answered {
        if let Err(error) = instance.report_request_statistics(&request, success, &times) {
            log_error!("triton-rust: cannot report request statistics: {error}");
        }
        // Dropping the request releases it back to Triton.
    }
    if batch_size > 0
        && let Err(error) = instance.report_batch_statistics(batch_size, &times)
    {
        log_error!("triton-rust: cannot report batch statistics: {error}");
    }
}

/// Lets a running batch see cancellations and stream responses to its requests.
struct BatchProgress<'b> {
    requests: &'b [Request],
    /// Per request: why its stream broke off; its final response reports it.
    stream_errors: Vec<Option<Error>>,
}

impl<'b> BatchProgress<'b> {
    fn new(requests: &'b [Request]) -> Self {
        BatchProgress {
            requests,
            stream_errors: vec![None; requests.len()],
        }
    }

    fn stream(request: &Request, outputs: &[OutputTensor]) -> Result<(), Error> {
        let mut response = Response::new_partial(request)?;
        for output in outputs {
            response.add_output(output.name, output.datatype, &output.shape, &output.data)?;
        }
        response.send_partial()
    }
}

impl GenerationProgress for BatchProgress<'_> {
    fn is_cancelled(&self, index: usize) -> bool {
        self.requests.get(index).is_some_and(Request::is_cancelled)
    }

    fn send_partial(&mut self, index: usize, outputs: Vec<OutputTensor>) -> bool {
        let Some(request) = self.requests.get(index) else {
            return false;
        };
        match Self::stream(request, &outputs) {
            Ok(()) => true,
            Err(error) => {
                log_error!(
                    "triton-rust: cannot stream to '{}', stopping it: {error}",
                    request.id()
                );
                if let Some(slot) = self.stream_errors.get_mut(index) {
                    *slot = Some(error);
                }
                false
            }
        }
    }
}

/// Sends one request's outputs or error; returns the request and whether it succeeded.
fn answer(request: Request, result: Result<Vec<OutputTensor>, Error>) -> (Request, bool) {
    let result = if request.is_cancelled() {
        Err(Error::new(
            ErrorCode::Cancelled,
            "the request was cancelled",
        ))
    } else {
        result
    };
    let mut response = match Response::new(&request) {
        Ok(response) => response,
        Err(error) => {
            log_error!(
                "triton-rust: cannot create a response for '{}': {error}",
                request.id()
            );
            return (request, false);
        }
    };
    let written = result.and_then(|outputs| {
        outputs.iter().try_for_each(|output| {
            response.add_output(output.name, output.datatype, &output.shape, &output.data)
        })
    });
    let success = written.is_ok();
    match response.send(written.err()) {
        Ok(()) => (request, success),
        Err(error) => {
            log_error!("triton-rust: cannot send a response: {error}");
            (request, false)
        }
    }
}

/// Answers every request with `error` (when the instance itself is unusable).
pub fn fail_all(requests: Vec<Request>, error: &Error) {
    for request in requests {
        match Response::new(&request) {
            Ok(response) => {
                if let Err(send_error) = response.send(Some(error.clone())) {
                    log_error!("triton-rust: cannot send a response: {send_error}");
                }
            }
            Err(new_error) => log_error!("triton-rust: cannot create a response: {new_error}"),
        }
    }
}
