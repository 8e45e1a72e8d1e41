//! One type per Triton concept: the backend, a model version (its configuration parsed
//! once at load, its task loaded), and a model instance. `execute` reads and prepares
//! each request on its own, hands the batch to the task, and the task answers every
//! request through a [`TritonResponder`].
//!
//! This is the glue between the safe Triton layer and the tasks: it knows no task by
//! name (the registry in `tasks` does).

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use crate::autocomplete;
use crate::config::ModelConfig;
use crate::error::{BackendError, panic_message};
use crate::heap::{self, MmapThreshold};
use crate::onnx::{Device, OnnxRuntimeLibrary};
use crate::request_batcher::{RequestBatcher, SharedQueue, execute_guarded, shared_queue};
use crate::responder::{OutputWriter, Responder, WriteOutputs};
use crate::settings;
use crate::tasks::{self, InstanceContext, ModelContext, Pending, RequestData, Task, TaskVisitor};
use crate::triton::{
    BackendHandle, Error, ErrorCode, ExecutionTimes, InstanceHandle, InstanceKind, ModelHandle,
    Request, Response, ResponseFactory, now_ns,
};
use crate::types::{DataType, MemoryUsage, ParameterValue};
use crate::warmup;
use crate::{log_error, log_info, log_warn};

/// The Triton error a request gets for `error`.
fn triton_error(error: &BackendError) -> Error {
    let code = match error {
        BackendError::InvalidInput(_) | BackendError::Config(_) => ErrorCode::InvalidArg,
        BackendError::ModelFile(_) => ErrorCode::NotFound,
        BackendError::Unsupported(_) => ErrorCode::Unsupported,
        BackendError::Unavailable(_) => ErrorCode::Unavailable,
        BackendError::Relayed { code, .. } => *code,
        BackendError::Tokenizer { .. }
        | BackendError::OnnxRuntimeLibrary(_)
        | BackendError::Onnx(_)
        | BackendError::OnnxContext { .. }
        | BackendError::Internal(_) => ErrorCode::Internal,
    };
    Error::new(code, error.to_string())
}

impl From<BackendError> for Error {
    fn from(error: BackendError) -> Self {
        triton_error(&error)
    }
}

/// Process-wide backend state: where ONNX Runtime comes from, and whether models must
/// run on GPU instances.
pub struct BackendState {
    pub onnxruntime: OnnxRuntimeLibrary,
    /// `--backend-config=rust,require-gpu=true`: a model whose instances would run on
    /// the CPU fails its load (a pod that holds a GPU must not leave it idle).
    pub require_gpu: bool,
}

impl BackendState {
    pub fn new(backend: BackendHandle<'_>) -> Result<Self, Error> {
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
        let threshold = heap::choose(
            config
                .pointer("/cmdline/malloc-mmap-threshold")
                .and_then(serde_json::Value::as_str),
            heap::set_by_environment(),
        )
        .map_err(Error::from)?;
        match threshold {
            MmapThreshold::Fixed(bytes) if heap::fix_mmap_threshold(bytes) => {
                log_info!("triton-rust: malloc mmap threshold fixed at {bytes} bytes")
            }
            MmapThreshold::Fixed(bytes) => {
                log_warn!("triton-rust: malloc did not take an mmap threshold of {bytes} bytes")
            }
            MmapThreshold::Untouched(reason) => {
                log_info!("triton-rust: malloc mmap threshold left as it is ({reason})")
            }
        }
        let require_gpu = match config
            .pointer("/cmdline/require-gpu")
            .and_then(serde_json::Value::as_str)
        {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(Error::new(
                    ErrorCode::InvalidArg,
                    format!("--backend-config=rust,require-gpu={other}: expected true or false"),
                ));
            }
        };
        if require_gpu {
            log_info!("triton-rust: models must run on GPU instances (require-gpu=true)");
        }
        Ok(BackendState {
            onnxruntime,
            require_gpu,
        })
    }
}

/// A loaded model version, whatever its task.
pub trait LoadedModel: Send + Sync {
    /// The memory the version holds for all its instances.
    fn memory_usage(&self) -> Vec<MemoryUsage>;
    /// Builds one instance.
    fn instance(&self, context: &InstanceContext) -> Result<Box<dyn LoadedInstance>, BackendError>;
}

/// A model instance, whatever its task.
pub trait LoadedInstance: Send {
    fn memory_usage(&self) -> Result<Vec<MemoryUsage>, BackendError>;
    /// Answers every request (never fails as a whole).
    fn execute(&mut self, instance: InstanceHandle<'_>, requests: Vec<Request>);
    /// Waits until no request of this instance is still being answered (a task may
    /// answer after `execute` returns).
    fn wait_idle(&self);
}

/// A loaded model version: its name, version and task.
pub struct ModelState {
    pub name: String,
    pub version: u64,
    model: Box<dyn LoadedModel>,
}

impl ModelState {
    pub fn new(model: ModelHandle<'_>, backend: &BackendState) -> Result<Self, Error> {
        let name = model.name()?;
        let version = model.version()?;
        let model_dir = PathBuf::from(model.repository_path()?);
        let version_dir = model_dir.join(version.to_string());
        let config = ModelConfig::from_json(&completed_config(model, &version_dir)?)?;
        config.check_scheduler()?;
        let task_name = config.parameters.get(settings::TASK).ok_or_else(|| {
            BackendError::Config(format!(
                "parameter 'task' is required: one of {}",
                tasks::task_names()
            ))
        })?;
        let context = ModelContext {
            name: &name,
            version,
            config: &config,
            version_dir: &version_dir,
            onnxruntime: &backend.onnxruntime,
            require_gpu: backend.require_gpu,
            server: model.server()?,
        };
        let loaded = tasks::visit_task(
            task_name.trim(),
            Loader {
                context: &context,
                model_dir: &model_dir,
            },
        )
        .ok_or_else(|| {
            BackendError::Config(format!(
                "parameter 'task' is '{task_name}'; expected one of {}",
                tasks::task_names()
            ))
        })??;
        log_info!(
            "triton-rust: model '{name}' version {version}: task {}, max batch size {}",
            task_name.trim(),
            config.max_batch_size
        );
        Ok(ModelState {
            name,
            version,
            model: loaded,
        })
    }

    pub fn memory_usage(&self) -> Vec<MemoryUsage> {
        self.model.memory_usage()
    }
}

/// The model's configuration as JSON, its inputs and outputs filled in first when
/// Triton asks for auto-complete and the config declares none (see `autocomplete`).
fn completed_config(model: ModelHandle<'_>, version_dir: &Path) -> Result<String, Error> {
    let json = model.config_json()?;
    if !model.auto_complete_config()? {
        return Ok(json);
    }
    let config: serde_json::Value = serde_json::from_str(&json)
        .map_err(|e| Error::internal(format!("model config is not JSON: {e}")))?;
    let task = config
        .pointer(&format!("/parameters/{}/string_value", settings::TASK))
        .and_then(serde_json::Value::as_str)
        .map(str::trim);
    let Some(task) = task else {
        return Ok(json);
    };
    match autocomplete::complete(&config, task, version_dir)? {
        Some(completed) => {
            model.set_config(&completed.to_string())?;
            log_info!(
                "triton-rust: model '{}': inputs and outputs auto-completed for task {task}",
                model.name()?
            );
            model.config_json()
        }
        None => Ok(json),
    }
}

/// Loads the task a model names: its settings, its tensors, the task itself, and a
/// check of the warm-up requests Triton will send it.
struct Loader<'a> {
    context: &'a ModelContext<'a>,
    model_dir: &'a Path,
}

impl TaskVisitor for Loader<'_> {
    type Output = Result<Box<dyn LoadedModel>, BackendError>;

    fn visit<T: Task>(self) -> Self::Output {
        let config = self.context.config;
        if self.context.require_gpu && T::RUNS_A_MODEL {
            config.require_gpu_instances()?;
        }
        let settings = tasks::parse_settings::<T>(&config.parameters)?;
        if let Some(contract) = T::contract(config.decoupled()) {
            contract.check(config, T::NAME)?;
        }
        let task = T::load(self.context, settings)?;
        check_warmup(&task, config, self.model_dir)?;
        let batching = task
            .batch_across_executions()
            .map(|rows| (shared_queue::<T>(rows), rows));
        Ok(Box::new(TaskModel {
            task: Arc::new(task),
            max_batch_size: config.max_batch_size,
            batching,
        }))
    }
}

/// Puts each warm-up request Triton will send through the same validation as a client
/// request: the first one the backend would refuse fails the load here, before any
/// instance runs it (see `warmup.rs`).
fn check_warmup<T: Task>(
    task: &T,
    config: &ModelConfig,
    model_dir: &Path,
) -> Result<(), BackendError> {
    let outputs: Vec<String> = config.outputs.iter().map(|o| o.name.clone()).collect();
    for request in warmup::warmup_requests(&config.model_warmup, config.max_batch_size, model_dir)?
    {
        let data = RequestData {
            inputs: request.inputs,
            parameters: Vec::new(),
            requested_outputs: outputs.clone(),
            timeout_us: 0,
        };
        task.prepare(data).map_err(|error| {
            BackendError::Config(format!("model_warmup sample '{}': {error}", request.sample))
        })?;
    }
    Ok(())
}

struct TaskModel<T: Task> {
    task: Arc<T>,
    max_batch_size: i64,
    /// With batching across executions: the queue the instances share, and the most
    /// rows of a batch.
    batching: Option<(SharedQueue<T>, usize)>,
}

impl<T: Task> LoadedModel for TaskModel<T> {
    fn memory_usage(&self) -> Vec<MemoryUsage> {
        self.task.memory_usage()
    }

    fn instance(&self, context: &InstanceContext) -> Result<Box<dyn LoadedInstance>, BackendError> {
        let state = self.task.instance(context)?;
        let memory = self.task.instance_memory_usage(&state)?;
        let runner = match &self.batching {
            Some((queue, rows)) => Runner::Batcher(RequestBatcher::start(
                &context.name,
                Arc::clone(&self.task),
                state,
                Arc::clone(queue),
                *rows,
            )?),
            None => Runner::InExecute(state),
        };
        Ok(Box::new(TaskInstance {
            runner,
            memory,
            task: Arc::clone(&self.task),
            max_batch_size: self.max_batch_size,
            in_flight: InFlight::default(),
        }))
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

/// One model instance.
pub struct InstanceState {
    pub name: String,
    instance: Box<dyn LoadedInstance>,
}

impl InstanceState {
    pub fn new(instance: InstanceHandle<'_>, model: &ModelState) -> Result<Self, Error> {
        let name = instance.name()?;
        let device = match instance.kind()? {
            InstanceKind::Gpu { device_id } => Device::Cuda { device_id },
            InstanceKind::Cpu | InstanceKind::Model { .. } | InstanceKind::Auto => Device::Cpu,
        };
        let context = InstanceContext {
            name: name.clone(),
            device,
        };
        let loaded = model.model.instance(&context)?;
        log_info!(
            "triton-rust: instance '{name}' of '{}' ready on {device:?}",
            model.name
        );
        Ok(InstanceState {
            name,
            instance: loaded,
        })
    }

    pub fn memory_usage(&self) -> Result<Vec<MemoryUsage>, Error> {
        Ok(self.instance.memory_usage()?)
    }

    pub fn execute(&mut self, instance: InstanceHandle<'_>, requests: Vec<Request>) {
        self.instance.execute(instance, requests);
    }

    /// Waits for requests still being answered, before the instance goes away.
    pub fn wait_idle(&self) {
        self.instance.wait_idle();
    }
}

/// Counts the requests of an instance that are still being answered.
#[derive(Default, Clone)]
struct InFlight(Arc<(Mutex<usize>, Condvar)>);

impl InFlight {
    fn enter(&self) -> InFlightGuard {
        let (count, _) = &*self.0;
        *count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        InFlightGuard(self.clone())
    }

    fn wait_idle(&self) {
        let (count, idle) = &*self.0;
        let mut count = count.lock().unwrap_or_else(|e| e.into_inner());
        while *count > 0 {
            count = idle.wait(count).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// One request in flight; dropping it ends that.
struct InFlightGuard(InFlight);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let (count, idle) = &*(self.0).0;
        let mut count = count.lock().unwrap_or_else(|e| e.into_inner());
        *count = count.saturating_sub(1);
        if *count == 0 {
            idle.notify_all();
        }
    }
}

/// Where an instance's batches run.
enum Runner<T: Task> {
    /// In `execute`, on Triton's thread.
    InExecute(T::Instance),
    /// On the instance's own thread, batched across executions with the other
    /// instances' requests.
    Batcher(RequestBatcher<T>),
}

struct TaskInstance<T: Task> {
    task: Arc<T>,
    runner: Runner<T>,
    /// The instance's memory, counted when it was built.
    memory: Vec<MemoryUsage>,
    max_batch_size: i64,
    in_flight: InFlight,
}

/// Reads a request's inputs, parameters and requested outputs.
fn read_request(request: &Request) -> Result<RequestData<'_>, Error> {
    let mut inputs = HashMap::new();
    for name in request.input_names()? {
        let tensor = request.read_input(&name)?;
        inputs.insert(name, tensor);
    }
    Ok(RequestData {
        inputs,
        parameters: request.parameters()?,
        requested_outputs: request.requested_output_names()?,
        timeout_us: request.timeout_us()?,
    })
}

impl<T: Task> LoadedInstance for TaskInstance<T> {
    fn memory_usage(&self) -> Result<Vec<MemoryUsage>, BackendError> {
        Ok(self.memory.clone())
    }

    fn execute(&mut self, instance: InstanceHandle<'_>, requests: Vec<Request>) {
        let exec_start_ns = now_ns();
        let mut prepared = Vec::with_capacity(requests.len());
        let mut failed = Vec::new();
        for request in requests {
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                let data = read_request(&request).map_err(Error::relayed)?;
                self.task.prepare(data)
            }))
            .unwrap_or_else(|panic| {
                Err(BackendError::internal(format!(
                    "panic while reading the request: {}",
                    panic_message(&*panic)
                )))
            });
            match outcome {
                Ok(task_request) => prepared.push((task_request, request)),
                Err(error) => failed.push((request, error)),
            }
        }
        let batch_size: u64 = if self.max_batch_size > 0 {
            prepared.iter().map(|(r, _)| T::rows(r) as u64).sum()
        } else {
            prepared.len() as u64
        };
        let compute_start_ns = now_ns();
        // SAFETY: every responder is done before the instance is finalized: a task
        // answers within `execute` or keeps the responder (and its in-flight guard)
        // until it answers, and ModelInstanceFinalize waits for the guards (wait_idle).
        let statistics = unsafe { instance.extend() };
        let answer = |request: Request| {
            TritonResponder::new(
                request,
                statistics,
                exec_start_ns,
                compute_start_ns,
                self.in_flight.enter(),
            )
        };
        for (request, error) in failed {
            if let Some(mut responder) = answer(request) {
                responder.fail(&error);
            }
        }
        let batch: Vec<Pending<T::Request>> = prepared
            .into_iter()
            .filter_map(|(task_request, request)| {
                Some(Pending {
                    request: task_request,
                    responder: Box::new(answer(request)?),
                })
            })
            .collect();
        match &mut self.runner {
            _ if batch.is_empty() => {}
            Runner::InExecute(state) => execute_guarded(&*self.task, state, batch),
            Runner::Batcher(batcher) => batcher.submit(batch),
        }
        let times = ExecutionTimes {
            exec_start_ns,
            compute_start_ns,
            compute_end_ns: now_ns(),
            exec_end_ns: now_ns(),
        };
        if batch_size > 0
            && let Err(error) = instance.report_batch_statistics(batch_size, &times)
        {
            log_error!("triton-rust: cannot report batch statistics: {error}");
        }
    }

    fn wait_idle(&self) {
        self.in_flight.wait_idle();
    }
}

/// Answers one request through its response factory, reports its statistics when its
/// final response is sent, then releases it.
struct TritonResponder {
    /// Released once the final response is sent.
    request: Option<Request>,
    factory: ResponseFactory,
    instance: InstanceHandle<'static>,
    exec_start_ns: u64,
    compute_start_ns: u64,
    _in_flight: InFlightGuard,
}

/// Triton's output buffers, as a task writes them.
struct ResponseOutputs<'r>(&'r mut Response);

impl OutputWriter for ResponseOutputs<'_> {
    fn buffer(
        &mut self,
        name: &str,
        datatype: DataType,
        shape: &[i64],
        byte_size: usize,
    ) -> Result<&mut [u8], BackendError> {
        self.0
            .output(name, datatype, shape, byte_size)
            .map_err(Error::relayed)
    }

    fn parameter(&mut self, key: &str, value: &ParameterValue) -> Result<(), BackendError> {
        self.0.set_parameter(key, value).map_err(Error::relayed)
    }
}

impl TritonResponder {
    /// `None` when the request cannot get a response factory; it is then answered
    /// with that error and released.
    fn new(
        request: Request,
        instance: InstanceHandle<'static>,
        exec_start_ns: u64,
        compute_start_ns: u64,
        in_flight: InFlightGuard,
    ) -> Option<Self> {
        match request.response_factory() {
            Ok(factory) => Some(TritonResponder {
                request: Some(request),
                factory,
                instance,
                exec_start_ns,
                compute_start_ns,
                _in_flight: in_flight,
            }),
            Err(error) => {
                log_error!("triton-rust: cannot create a response factory: {error}");
                let answered = request.response().and_then(|r| r.send_final(Some(error)));
                match answered {
                    Ok(()) => request.mark_answered(),
                    Err(error) => log_error!("triton-rust: cannot answer a request: {error}"),
                }
                None
            }
        }
    }

    /// Sends the final response (with `error` if the request failed), reports the
    /// request's statistics and releases it.
    fn finish(&mut self, response: Result<Response, Error>, error: Option<Error>) {
        let Some(request) = self.request.take() else {
            return;
        };
        let compute_end_ns = now_ns();
        let success = error.is_none();
        let sent = response.and_then(|response| response.send_final(error));
        match &sent {
            Ok(()) => request.mark_answered(),
            Err(send_error) => log_error!(
                "triton-rust: cannot send the response to '{}': {send_error}",
                request.id()
            ),
        }
        self.report(&request, success && sent.is_ok(), compute_end_ns);
        // Dropping the request releases it.
    }

    fn report(&self, request: &Request, success: bool, compute_end_ns: u64) {
        let times = ExecutionTimes {
            exec_start_ns: self.exec_start_ns,
            compute_start_ns: self.compute_start_ns,
            compute_end_ns,
            exec_end_ns: now_ns(),
        };
        if let Err(error) = self
            .instance
            .report_request_statistics(request, success, &times)
        {
            log_error!("triton-rust: cannot report request statistics: {error}");
        }
    }
}

impl Responder for TritonResponder {
    fn is_cancelled(&self) -> bool {
        self.factory.is_cancelled()
    }

    fn respond(&mut self, last: bool, write: WriteOutputs<'_>) -> Result<(), BackendError> {
        if self.request.is_none() {
            return Err(BackendError::internal(
                "the request already has its final response",
            ));
        }
        let mut response = Response::from_factory(&self.factory).map_err(Error::relayed)?;
        let written = write(&mut ResponseOutputs(&mut response));
        if !last {
            written?;
            return response.send_partial().map_err(|error| {
                log_error!("triton-rust: cannot stream a response: {error}");
                error.relayed()
            });
        }
        let error = if self.is_cancelled() {
            Some(Error::new(
                ErrorCode::Cancelled,
                "the request was cancelled",
            ))
        } else {
            written.err().map(Error::from)
        };
        self.finish(Ok(response), error);
        Ok(())
    }

    fn fail(&mut self, error: &BackendError) {
        if self.request.is_none() {
            return;
        }
        let error = triton_error(error);
        if error.code == ErrorCode::Internal {
            log_error!("triton-rust: request failed: {error}");
        }
        let response = Response::from_factory(&self.factory);
        self.finish(response, Some(error));
    }

    fn end(&mut self) {
        self.end_stream();
    }
}

impl TritonResponder {
    /// Sends the final flag alone, reports the request's statistics, releases it.
    fn end_stream(&mut self) {
        let Some(request) = self.request.take() else {
            return;
        };
        let compute_end_ns = now_ns();
        let sent = self.factory.send_final_flag();
        match &sent {
            Ok(()) => request.mark_answered(),
            Err(error) => log_error!(
                "triton-rust: cannot end the stream of '{}': {error}",
                request.id()
            ),
        }
        self.report(&request, sent.is_ok(), compute_end_ns);
    }
}

impl Drop for TritonResponder {
    fn drop(&mut self) {
        if self.request.is_some() {
            let message = if std::thread::panicking() {
                "a panic interrupted this request; see the server log"
            } else {
                "the backend dropped this request without an answer"
            };
            let response = Response::from_factory(&self.factory);
            self.finish(response, Some(Error::internal(message)));
        }
    }
}

/// Answers every request with `error` (when the instance itself is unusable).
pub fn fail_all(requests: Vec<Request>, error: &Error) {
    for request in requests {
        match request
            .response()
            .and_then(|r| r.send_final(Some(error.clone())))
        {
            Ok(()) => request.mark_answered(),
            Err(send_error) => log_error!("triton-rust: cannot send a response: {send_error}"),
        }
    }
}
