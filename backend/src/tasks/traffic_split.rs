//! `traffic-split`: a router model that splits traffic between versions of another
//! model inside the server. Each request goes, with its inputs, parameters and
//! requested outputs, to one version (an arm, chosen by weight) through
//! `TRITONSERVER_ServerInferAsync`; that version's responses (a stream, for decoupled
//! models) come back to the client with response parameters naming the arm.
//!
//! Arms own contiguous ranges of 100 buckets, as wide as their weights. A request with
//! a user (request parameter `user_id`, or `x-user-id` from a forwarded header) lands
//! in the bucket its user hashes to, salted with the experiment name, so a user keeps
//! their arm, and growing the last arm only moves users into it; other requests land
//! in a random bucket.
//!
//! Each arm's requests, failures and latencies go to Triton's metrics endpoint, and each
//! challenger (every arm after the first, the champion) is compared with the champion
//! by sequential tests (`ab_metrics`, `ab_stats`).
//!
//! The router has no files of its own: its configuration names the target model and
//! the arms, and declares the target's inputs and outputs. A load checks that each
//! arm's version directory exists and, once the server can answer (Triton refuses
//! every query while it starts up, so a router loaded at startup checks at its first
//! request instead), that the arm's version is ready and serves exactly the router's
//! inputs and outputs.

use std::borrow::Cow;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Deserializer};

use super::task::{
    InstanceContext, ModelContext, Pending, RequestData, Task, TensorContract, fail_all,
    unzip_batch,
};
use crate::ab_metrics::{ArmSpec, ArmStats};
use crate::ab_stats::Margins;
use crate::canary::{Canary, arm_weights, parse_steps};
use crate::config::{ModelConfig, TensorSpec};
use crate::error::{BackendError, ErrorCode};
use crate::responder::{OutputWriter, Responder};
use crate::settings::{SettingsGroup, at_most, positive_at_most};
use crate::triton::{
    Error, InFlight, InferenceRequestBuilder, InferenceResponse, ResponseEvent, Server,
};
use crate::types::{InputTensor, MemoryUsage, ParameterValue};

/// Response parameter: the arm that served the request.
pub const ARM_PARAMETER: &str = "ab_test_group";
/// Response parameter: the version of the target model that served the request.
pub const VERSION_PARAMETER: &str = "ab_model_version";

/// Weights are percentages: they sum to this.
const TOTAL_WEIGHT: u32 = 100;

/// Request parameters that name the user, in the order they are looked for: KServe's
/// own, and the header a client sends through `--http-header-forward-pattern` /
/// `--grpc-header-forward-pattern` (header names compare without case).
pub const USER_PARAMETERS: [&str; 2] = ["user_id", "x-user-id"];

/// One version of the target and its share of the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arm {
    pub version: i64,
    /// Percent of the requests, 0 to 100.
    pub weight: u32,
}

impl Arm {
    /// The arm's name in responses.
    fn name(&self) -> String {
        format!("v{}", self.version)
    }
}

/// `version:weight` pairs, e.g. `1:70,2:30`: positive versions, each once, weights
/// summing to 100.
fn arm_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Vec<Arm>>, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_arms(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn parse_arms(text: &str) -> Result<Vec<Arm>, String> {
    let malformed = || {
        format!(
            "must be version:weight pairs with weights summing to {TOTAL_WEIGHT}, e.g. '1:70,2:30'; got '{text}'"
        )
    };
    let mut arms = Vec::new();
    for pair in text.split(',') {
        let (version, weight) = pair.split_once(':').ok_or_else(malformed)?;
        let version: i64 = version.trim().parse().map_err(|_| malformed())?;
        let weight: u32 = weight.trim().parse().map_err(|_| malformed())?;
        if version < 1 || weight > TOTAL_WEIGHT {
            return Err(malformed());
        }
        if arms.iter().any(|arm: &Arm| arm.version == version) {
            return Err(format!("names version {version} twice; got '{text}'"));
        }
        arms.push(Arm { version, weight });
    }
    let total: u32 = arms.iter().map(|arm| arm.weight).sum();
    if total != TOTAL_WEIGHT {
        return Err(format!(
            "has weights summing to {total}; they must sum to {TOTAL_WEIGHT} (got '{text}')"
        ));
    }
    Ok(arms)
}

fn default_ready_timeout() -> usize {
    30
}

fn default_stats_window() -> usize {
    5000
}

fn default_latency_regression() -> usize {
    20
}

fn default_error_regression() -> usize {
    1
}

/// The router's parameters.
#[derive(Debug, Clone, Deserialize)]
pub struct RouterSettings {
    /// The model whose versions the arms are.
    #[serde(default)]
    pub target_model: Option<String>,
    /// The arms: `version:weight` pairs.
    #[serde(default, deserialize_with = "arm_list")]
    pub arms: Option<Vec<Arm>>,
    /// How long a load waits for the target's versions to be ready (the server may
    /// load the router and its target at the same time).
    #[serde(
        default = "default_ready_timeout",
        deserialize_with = "positive_at_most::<600, _>"
    )]
    pub target_ready_timeout_s: usize,
    /// Salt of the sticky assignment (default: the router's name): another experiment
    /// name assigns the users afresh.
    #[serde(default)]
    pub experiment: Option<String>,
    /// Answered requests per arm that the statistics between arms look at.
    #[serde(
        default = "default_stats_window",
        deserialize_with = "positive_at_most::<100000, _>"
    )]
    pub stats_window: usize,
    /// How much slower than the champion (percent) a challenger may be before the
    /// latency test counts it as worse.
    #[serde(
        default = "default_latency_regression",
        deserialize_with = "at_most::<1000, _>"
    )]
    pub latency_regression_percent: usize,
    /// How many percentage points a challenger's error rate may exceed the champion's
    /// before the error test counts it as worse.
    #[serde(
        default = "default_error_regression",
        deserialize_with = "at_most::<100, _>"
    )]
    pub error_rate_regression_points: usize,
    /// Canary mode: the challenger's weight at each step, e.g. `5,25,50,100`.
    #[serde(default, deserialize_with = "canary_steps")]
    pub canary_steps: Option<Vec<u32>>,
    /// Canary mode: challenger answers a step needs before the next.
    #[serde(
        default = "default_canary_min_samples",
        deserialize_with = "positive_at_most::<100000, _>"
    )]
    pub canary_min_samples: usize,
    /// Canary mode: below this always-valid p-value the challenger is rolled back.
    #[serde(default = "default_canary_alpha", deserialize_with = "probability")]
    pub canary_alpha: f64,
}

fn canary_steps<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Vec<u32>>, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_steps(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// Reads a significance level in (0, 0.5].
fn probability<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    let text = String::deserialize(deserializer)?;
    match text.trim().parse::<f64>() {
        Ok(level) if level > 0.0 && level <= 0.5 => Ok(level),
        _ => Err(serde::de::Error::custom(format!(
            "must be a number above 0 and at most 0.5, got '{text}'"
        ))),
    }
}

fn default_canary_min_samples() -> usize {
    200
}

fn default_canary_alpha() -> f64 {
    0.01
}

impl SettingsGroup for RouterSettings {}

/// A request on its way to an arm: its inputs (copied once, out of the client's
/// request, which is released before the target answers), parameters and outputs.
pub struct ForwardedRequest {
    inputs: Vec<(String, InputTensor<'static>)>,
    parameters: Vec<(String, ParameterValue)>,
    outputs: Vec<String>,
    /// The client's timeout, in microseconds (0: none).
    timeout_us: u64,
    /// The bucket of the request's user, if it names one.
    user_bucket: Option<u32>,
}

pub struct TrafficSplit {
    server: Server,
    target: String,
    arms: Vec<Arm>,
    /// Salt of the users' buckets.
    experiment: String,
    /// The router's own configuration, to check the target's against.
    config: ModelConfig,
    /// Set once the arms were found ready and serving the router's tensors.
    verified: OnceLock<()>,
    cancel_watch: CancelWatch,
    /// The arms' metrics and statistics, in the order of `arms`.
    arm_stats: Arc<ArmStats>,
}

impl Task for TrafficSplit {
    const NAME: &'static str = "traffic-split";
    type Settings = RouterSettings;
    /// Each instance draws arms from its own generator.
    type Instance = ChaCha8Rng;
    type Request = ForwardedRequest;
    const RUNS_A_MODEL: bool = false;

    fn contract(_decoupled: bool) -> Option<TensorContract> {
        None
    }

    fn load(model: &ModelContext<'_>, settings: RouterSettings) -> Result<Self, BackendError> {
        let target = settings
            .target_model
            .filter(|name| !name.trim().is_empty())
            .ok_or_else(|| BackendError::Config("parameter 'target_model' is required".into()))?;
        if target == model.name {
            return Err(BackendError::Config(format!(
                "parameter 'target_model' names the router '{target}' itself"
            )));
        }
        let arms = settings.arms.ok_or_else(|| {
            BackendError::Config(
                "parameter 'arms' is required: version:weight pairs, e.g. '1:70,2:30'".into(),
            )
        })?;
        // The repository holds the router and its target side by side.
        if let Some(repository) = model.version_dir.parent().and_then(Path::parent) {
            for arm in &arms {
                let version_dir = repository.join(&target).join(arm.version.to_string());
                if !version_dir.is_dir() {
                    return Err(BackendError::Config(format!(
                        "arm version {} of '{target}' does not exist: {} is not a directory",
                        arm.version,
                        version_dir.display()
                    )));
                }
            }
        }
        let experiment = settings
            .experiment
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| model.name.to_owned());
        let canary = match settings.canary_steps {
            Some(_) if arms.len() != 2 => {
                return Err(BackendError::Config(format!(
                    "parameter 'canary_steps' needs exactly two arms, the champion then the \
                     challenger (got {})",
                    arms.len()
                )));
            }
            Some(steps) => Some(Canary::new(
                steps,
                settings.canary_min_samples,
                settings.canary_alpha,
            )),
            None => None,
        };
        let names: Vec<String> = arms.iter().map(Arm::name).collect();
        let specs: Vec<ArmSpec<'_>> = arms
            .iter()
            .zip(&names)
            .map(|(arm, name)| ArmSpec {
                name,
                version: arm.version,
                weight: arm.weight,
            })
            .collect();
        let arm_stats = Arc::new(ArmStats::new(
            model.name,
            &target,
            &specs,
            settings.stats_window,
            Margins {
                latency: settings.latency_regression_percent as f64 / 100.0,
                error_rate: settings.error_rate_regression_points as f64 / 100.0,
            },
            canary,
        ));
        let router = TrafficSplit {
            server: model.server,
            target,
            arms,
            experiment,
            arm_stats,
            config: model.config.clone(),
            verified: OnceLock::new(),
            cancel_watch: CancelWatch::start(),
        };
        // While the server starts up it answers no query (UNAVAILABLE): the first
        // request checks instead.
        let first = router.arms[0].version;
        let starting_up = matches!(
            model.server.model_is_ready(&router.target, first),
            Err(error) if error.code == ErrorCode::Unavailable
        );
        if !starting_up {
            let timeout = Duration::from_secs(settings.target_ready_timeout_s as u64);
            router.verify(timeout)?;
        }
        Ok(router)
    }

    fn instance(&self, _instance: &InstanceContext) -> Result<ChaCha8Rng, BackendError> {
        Ok(ChaCha8Rng::from_os_rng())
    }

    fn prepare(&self, request: RequestData<'_>) -> Result<ForwardedRequest, BackendError> {
        let inputs = request
            .inputs
            .into_iter()
            .map(|(name, tensor)| {
                let owned = InputTensor {
                    datatype: tensor.datatype,
                    shape: tensor.shape,
                    data: Cow::Owned(tensor.data.into_owned()),
                };
                (name, owned)
            })
            .collect();
        let user_bucket =
            user_of(&request.parameters)?.map(|user| user_bucket(&self.experiment, &user));
        Ok(ForwardedRequest {
            inputs,
            parameters: request.parameters,
            outputs: request.requested_outputs,
            timeout_us: request.timeout_us,
            user_bucket,
        })
    }

    fn rows(_request: &ForwardedRequest) -> usize {
        1
    }

    fn execute(&self, rng: &mut ChaCha8Rng, batch: Vec<Pending<ForwardedRequest>>) {
        if let Err(error) = self.verify(Duration::ZERO) {
            let (_, mut responders) = unzip_batch(batch);
            return fail_all(&mut responders, &error);
        }
        for pending in batch {
            let bucket = pending
                .request
                .user_bucket
                .unwrap_or_else(|| random_bucket(rng));
            let index = match self.arm_stats.canary_weight() {
                Some(weight) => choose_arm(&canary_arms(&self.arms, weight), bucket),
                None => choose_arm(&self.arms, bucket),
            };
            self.arm_stats.forwarded(index);
            if let Err((responder, error)) = self.forward(pending, index) {
                self.arm_stats.not_sent(index);
                if let Some(mut responder) = responder {
                    responder.fail(&self.refused(self.arms[index], error));
                }
            }
        }
    }

    fn memory_usage(&self) -> Vec<MemoryUsage> {
        Vec::new()
    }

    fn instance_memory_usage(
        &self,
        _instance: &ChaCha8Rng,
    ) -> Result<Vec<MemoryUsage>, BackendError> {
        Ok(Vec::new())
    }
}

/// A request that could not be sent, with its responder back.
type Unsent = (Option<Box<dyn Responder>>, BackendError);

impl TrafficSplit {
    /// Checks, once it succeeds, that every arm's version is ready (waiting up to
    /// `timeout`) and serves exactly the router's inputs and outputs.
    fn verify(&self, timeout: Duration) -> Result<(), BackendError> {
        if self.verified.get().is_some() {
            return Ok(());
        }
        let target = &self.target;
        for arm in &self.arms {
            wait_until_ready(self.server, target, arm.version, timeout)?;
            if let Some(problem) = self.mismatch(*arm)? {
                return Err(BackendError::Config(format!(
                    "the router must serve what '{target}' version {} serves: {problem}",
                    arm.version
                )));
            }
        }
        let _first = self.verified.set(());
        Ok(())
    }

    /// How `arm`'s version no longer serves the router's inputs and outputs, if so.
    fn mismatch(&self, arm: Arm) -> Result<Option<String>, BackendError> {
        let json = self
            .server
            .model_config_json(&self.target, arm.version)
            .map_err(Error::relayed)?;
        Ok(check_same_tensors(&self.config, &ModelConfig::from_json(&json)?).err())
    }

    /// The error for a request `arm` refused: a target reloaded since with other inputs
    /// or outputs refuses what the router sends (e.g. an output it no longer has), which
    /// is the server's fault (503 naming the change), not the client's (the target's
    /// 400). Other refusals (a full queue) pass on as they are, without the check.
    fn refused(&self, arm: Arm, error: BackendError) -> BackendError {
        let invalid = matches!(
            error,
            BackendError::Relayed {
                code: ErrorCode::InvalidArg,
                ..
            }
        );
        match invalid.then(|| self.mismatch(arm)) {
            Some(Ok(Some(problem))) => BackendError::Unavailable(format!(
                "arm version {} of '{}' no longer serves what this router serves ({problem}): \
                 load the router again, or that version with its former inputs and outputs \
                 (refused with: {error})",
                arm.version, self.target
            )),
            _ => error,
        }
    }

    /// Sends the request to `arm`; its responses are relayed by [`Relay`].
    fn forward(&self, pending: Pending<ForwardedRequest>, index: usize) -> Result<(), Unsent> {
        let Pending { request, responder } = pending;
        let arm = self.arms[index];
        let builder = (|| {
            let mut builder = InferenceRequestBuilder::new(self.server, &self.target, arm.version)?;
            for (name, tensor) in request.inputs {
                let data = tensor.data.into_owned();
                builder.add_input(&name, tensor.datatype, &tensor.shape, data)?;
            }
            for (key, value) in &request.parameters {
                builder.parameter(key, value)?;
            }
            for name in &request.outputs {
                builder.add_requested_output(name)?;
            }
            if request.timeout_us > 0 {
                builder.timeout_us(request.timeout_us)?;
            }
            Ok::<_, Error>(builder)
        })();
        let builder = match builder {
            Ok(builder) => builder,
            Err(error) => return Err((Some(responder), error.relayed())),
        };
        let responder = Arc::new(Mutex::new(Some(responder)));
        let upstream = builder.cancel_handle();
        self.cancel_watch
            .watch(Arc::downgrade(&responder), upstream.clone());
        let relay = Relay {
            responder: Arc::clone(&responder),
            upstream,
            arm,
            index,
            arm_stats: Arc::clone(&self.arm_stats),
            forwarded_at: Instant::now(),
        };
        builder
            .send(move |event| relay.deliver(event))
            .map_err(|error| {
                // The relay never ran, so the responder is still there.
                let responder = responder
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                (responder, error.relayed())
            })
            .map(|_in_flight| ())
    }
}

/// Passes the target's responses on to the client.
struct Relay {
    responder: Arc<ResponderSlot>,
    /// Cancels the forwarded request when the client cancels.
    upstream: InFlight,
    arm: Arm,
    /// The arm's place in `arms`, for the experiment.
    index: usize,
    arm_stats: Arc<ArmStats>,
    forwarded_at: Instant,
}

impl Relay {
    fn deliver(&self, event: ResponseEvent) {
        let mut slot = self
            .responder
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(responder) = slot.as_mut() else {
            return;
        };
        // Whether the request is over, and if so whether it failed (a cancellation is
        // not the arm's failure).
        let ended = match event {
            ResponseEvent::Final => {
                responder.end();
                Some(false)
            }
            ResponseEvent::Response(response) => {
                let last = response.is_final();
                if let Some(error) = response.error() {
                    let cancelled = error.code == ErrorCode::Cancelled;
                    responder.fail(&error.relayed());
                    Some(!cancelled)
                } else {
                    let sent = responder.respond(last, &mut |writer| self.copy(&response, writer));
                    match sent {
                        // A piece that cannot go out ends the stream.
                        Err(error) if !last => {
                            responder.fail(&error);
                            let _ignored = self.upstream.cancel();
                            Some(true)
                        }
                        Err(_) => Some(true),
                        Ok(()) => last.then_some(false),
                    }
                }
            }
        };
        if let Some(failed) = ended {
            *slot = None;
            self.arm_stats
                .answered(self.index, self.forwarded_at.elapsed(), failed);
        }
    }

    /// The target's outputs and parameters, and the arm's.
    fn copy(
        &self,
        response: &InferenceResponse,
        writer: &mut dyn OutputWriter,
    ) -> Result<(), BackendError> {
        for output in response.outputs().map_err(Error::relayed)? {
            writer
                .buffer(
                    &output.name,
                    output.datatype,
                    &output.shape,
                    output.data.len(),
                )?
                .copy_from_slice(output.data);
        }
        for (key, value) in response.parameters().map_err(Error::relayed)? {
            writer.parameter(&key, &value)?;
        }
        writer.parameter(ARM_PARAMETER, &ParameterValue::String(self.arm.name()))?;
        writer.parameter(
            VERSION_PARAMETER,
            &ParameterValue::String(self.arm.version.to_string()),
        )
    }
}

/// Who answers a client's request that was forwarded: taken once it is answered.
type ResponderSlot = Mutex<Option<Box<dyn Responder>>>;

/// Cancels forwarded requests whose client went away or cancelled. Triton tells a
/// backend about a cancellation only when asked, and the relay is only called when the
/// target answers, so a thread asks every few milliseconds while requests are in flight
/// (and sleeps otherwise).
struct CancelWatch {
    shared: Arc<(Mutex<Watched>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Watched {
    requests: Vec<(Weak<ResponderSlot>, InFlight)>,
    /// The router is going away.
    stop: bool,
}

/// How often a client's cancellation is looked for.
const CANCEL_POLL: Duration = Duration::from_millis(10);

impl CancelWatch {
    fn start() -> Self {
        let shared = Arc::new((Mutex::new(Watched::default()), Condvar::new()));
        let watched = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("router-cancel".into())
            .spawn(move || Self::run(&watched))
            .ok();
        CancelWatch { shared, thread }
    }

    /// Watches a client's request until it is answered.
    fn watch(&self, responder: Weak<ResponderSlot>, upstream: InFlight) {
        let (watched, wake) = &*self.shared;
        watched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .requests
            .push((responder, upstream));
        wake.notify_one();
    }

    fn run(shared: &(Mutex<Watched>, Condvar)) {
        let (watched, wake) = shared;
        let mut state = watched.lock().unwrap_or_else(PoisonError::into_inner);
        while !state.stop {
            if state.requests.is_empty() {
                state = wake.wait(state).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            state.requests.retain(|(responder, upstream)| {
                let Some(responder) = responder.upgrade() else {
                    return false;
                };
                // A relay busy with this request is asked again next time.
                let Ok(slot) = responder.try_lock() else {
                    return true;
                };
                match slot.as_ref() {
                    None => false,
                    Some(client) if client.is_cancelled() => {
                        // Best effort: the target may finish anyway, and its answer is relayed.
                        let _ignored = upstream.cancel();
                        false
                    }
                    Some(_) => true,
                }
            });
            state = wake
                .wait_timeout(state, CANCEL_POLL)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for CancelWatch {
    fn drop(&mut self) {
        let (watched, wake) = &*self.shared;
        watched.lock().unwrap_or_else(PoisonError::into_inner).stop = true;
        wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _finished = thread.join();
        }
    }
}

/// A bucket in `0..100` for a request without a user.
fn random_bucket(rng: &mut ChaCha8Rng) -> u32 {
    (rng.next_u64() % u64::from(TOTAL_WEIGHT)) as u32
}

/// The bucket in `0..100` of `user` in `experiment`: the same on every instance,
/// server and build (xxh3 is specified; std's hasher is not stable across releases).
fn user_bucket(experiment: &str, user: &str) -> u32 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(experiment.as_bytes());
    hasher.update(&[0]);
    hasher.update(user.as_bytes());
    (hasher.digest() % u64::from(TOTAL_WEIGHT)) as u32
}

/// The request's user, from the first of [`USER_PARAMETERS`] it carries: a non-empty
/// string or an integer.
fn user_of(parameters: &[(String, ParameterValue)]) -> Result<Option<String>, BackendError> {
    for name in USER_PARAMETERS {
        let Some((key, value)) = parameters
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
        else {
            continue;
        };
        return match value {
            ParameterValue::String(user) if !user.is_empty() => Ok(Some(user.clone())),
            ParameterValue::Int(user) => Ok(Some(user.to_string())),
            other => Err(BackendError::InvalidInput(format!(
                "parameter '{key}' must be a non-empty string or an integer naming the \
                 user, got {other}"
            ))),
        };
    }
    Ok(None)
}

/// A canary router's two arms (checked at load) with the challenger at `weight`, so
/// growing it moves users only into the challenger, as any last arm.
fn canary_arms(arms: &[Arm], weight: u32) -> [Arm; 2] {
    let [champion, challenger] = arm_weights(weight);
    [
        Arm {
            weight: champion,
            ..arms[0]
        },
        Arm {
            weight: challenger,
            ..arms[1]
        },
    ]
}

/// The index of the arm owning `bucket`: arms own contiguous ranges of `0..100`, in
/// order, as wide as their weights.
fn choose_arm(arms: &[Arm], bucket: u32) -> usize {
    let mut end = 0;
    for (index, arm) in arms.iter().enumerate() {
        end += arm.weight;
        if bucket < end {
            return index;
        }
    }
    // Unreachable with weights summing to 100; the last arm keeps it total.
    arms.len().saturating_sub(1)
}

/// Waits for `target` version `version` to be ready, up to `timeout`.
fn wait_until_ready(
    server: Server,
    target: &str,
    version: i64,
    timeout: Duration,
) -> Result<(), BackendError> {
    let started = Instant::now();
    loop {
        let ready = server.model_is_ready(target, version);
        if matches!(ready, Ok(true)) {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            let why = match ready {
                Ok(_) => "it is not ready".to_owned(),
                Err(error) => error.message,
            };
            let waited = if timeout.is_zero() {
                String::new()
            } else {
                format!(
                    " after {}s (parameter 'target_ready_timeout_s')",
                    timeout.as_secs()
                )
            };
            return Err(BackendError::Unavailable(format!(
                "arm version {version} of '{target}' is not available{waited}: {why}"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the router declares exactly the target's batching, transaction policy,
/// inputs and outputs; else what differs.
fn check_same_tensors(router: &ModelConfig, target: &ModelConfig) -> Result<(), String> {
    if router.max_batch_size != target.max_batch_size {
        return Err(format!(
            "max_batch_size is {} here but {} there",
            router.max_batch_size, target.max_batch_size
        ));
    }
    if router.decoupled() != target.decoupled() {
        return Err(format!(
            "decoupled is {} here but {} there",
            router.decoupled(),
            target.decoupled()
        ));
    }
    for (kind, ours, theirs) in [
        ("input", &router.inputs, &target.inputs),
        ("output", &router.outputs, &target.outputs),
    ] {
        let describe = |specs: &[TensorSpec]| -> Vec<String> {
            let mut described: Vec<String> = specs
                .iter()
                .map(|s| format!("{} {} {:?}", s.name, s.data_type, s.dims))
                .collect();
            described.sort();
            described
        };
        let (ours, theirs) = (describe(ours), describe(theirs));
        if ours != theirs {
            return Err(format!("{kind}s are {ours:?} here but {theirs:?} there"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Settings;
    use proptest::prelude::*;

    #[test]
    fn arms_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse_arms("1:70, 2:30"),
            Ok(vec![
                Arm {
                    version: 1,
                    weight: 70
                },
                Arm {
                    version: 2,
                    weight: 30
                }
            ])
        );
        for (text, expected) in [
            ("1:70,2:20", "summing to 90"),
            ("1:70,1:30", "names version 1 twice"),
            ("1:-5,2:105", "version:weight pairs"),
            ("0:100", "version:weight pairs"),
            ("one:100", "version:weight pairs"),
            ("1=100", "version:weight pairs"),
        ] {
            let error = parse_arms(text).expect_err(text);
            assert!(error.contains(expected), "{text}: {error}");
        }
        let parameters = [("arms".to_string(), "1:50,2:49".to_string())].into();
        let error = RouterSettings::parse(&parameters)
            .expect_err("bad weights")
            .to_string();
        assert!(
            error.contains("parameter 'arms' has weights summing to 99"),
            "{error}"
        );
    }

    #[test]
    fn arms_own_contiguous_buckets() {
        let arms = parse_arms("1:70,2:30").expect("valid");
        assert_eq!(arms[choose_arm(&arms, 0)].version, 1);
        assert_eq!(arms[choose_arm(&arms, 69)].version, 1);
        assert_eq!(arms[choose_arm(&arms, 70)].version, 2);
        assert_eq!(arms[choose_arm(&arms, 99)].version, 2);
        let zero = parse_arms("1:100,2:0").expect("valid");
        assert!((0..100).all(|b| zero[choose_arm(&zero, b)].version == 1));
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let second = (0..10_000)
            .filter(|_| arms[choose_arm(&arms, random_bucket(&mut rng))].version == 2)
            .count();
        assert!((2_700..3_300).contains(&second), "{second} of 10000");
    }

    #[test]
    fn users_hash_to_fixed_buckets_per_experiment() {
        // Pinned: a user's arm must not change with a rebuild or another machine.
        let pinned: Vec<u32> = ["alice", "bob", "carol"]
            .iter()
            .map(|user| user_bucket("exp", user))
            .collect();
        assert_eq!(pinned, PINNED_BUCKETS);
        // The salt separates experiments; the separator keeps ("ab", "c") and
        // ("a", "bc") apart.
        let moved = (0..1000)
            .filter(|i| user_bucket("one", &i.to_string()) != user_bucket("two", &i.to_string()))
            .count();
        assert!(moved > 900, "{moved}");
        assert_ne!(user_bucket("ab", "c"), user_bucket("a", "bc"));
        // Users spread evenly over the buckets.
        let mut counts = [0u32; TOTAL_WEIGHT as usize];
        for i in 0..100_000 {
            counts[user_bucket("exp", &format!("user-{i}")) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn the_user_comes_from_user_id_or_a_forwarded_header() {
        let named = |key: &str, value: ParameterValue| vec![(key.to_owned(), value)];
        let user = |parameters: Vec<(String, ParameterValue)>| user_of(&parameters).expect("valid");
        assert_eq!(
            user(named("user_id", ParameterValue::String("u1".into()))),
            Some("u1".into())
        );
        assert_eq!(
            user(named("user_id", ParameterValue::Int(42))),
            Some("42".into())
        );
        assert_eq!(
            user(named("X-User-Id", ParameterValue::String("h".into()))),
            Some("h".into())
        );
        assert_eq!(user(named("seed", ParameterValue::Int(1))), None);
        let both = vec![
            (
                "x-user-id".to_owned(),
                ParameterValue::String("header".into()),
            ),
            ("user_id".to_owned(), ParameterValue::String("param".into())),
        ];
        assert_eq!(
            user(both),
            Some("param".into()),
            "the KServe parameter wins"
        );
        for bad in [
            ParameterValue::String(String::new()),
            ParameterValue::Bool(true),
            ParameterValue::Double(1.5),
        ] {
            let error = user_of(&named("user_id", bad)).expect_err("refused");
            assert!(error.to_string().contains("'user_id'"), "{error}");
        }
    }

    #[test]
    fn the_router_must_declare_the_targets_tensors() {
        let config = |dims: &str, decoupled: bool| {
            ModelConfig::from_json(&format!(
                r#"{{"max_batch_size": 0,
                    "model_transaction_policy": {{"decoupled": {decoupled}}},
                    "input": [{{"name": "text_input", "data_type": "TYPE_STRING", "dims": {dims}}}],
                    "output": [{{"name": "out", "data_type": "TYPE_FP32", "dims": [-1, 3]}}]}}"#
            ))
            .expect("valid")
        };
        assert_eq!(
            check_same_tensors(&config("[-1]", false), &config("[\"-1\"]", false)),
            Ok(())
        );
        let error = check_same_tensors(&config("[1]", false), &config("[-1]", false))
            .expect_err("dims differ");
        assert!(error.starts_with("inputs are"), "{error}");
        let error = check_same_tensors(&config("[-1]", true), &config("[-1]", false))
            .expect_err("decoupled differs");
        assert!(error.contains("decoupled"), "{error}");
    }

    /// `user_bucket("exp", _)` of alice, bob and carol.
    const PINNED_BUCKETS: [u32; 3] = [54, 11, 69];

    proptest! {
        /// Growing the last arm moves users only into it: a user of any other arm
        /// either stays or moves to the last one.
        #[test]
        fn growing_the_last_arm_only_moves_users_into_it(
            first in 0u32..=100, grow in 0u32..=100, user in "[a-z0-9]{1,12}",
        ) {
            let grow = grow.min(first);
            let before = parse_arms(&format!("1:{first},2:{}", 100 - first)).expect("valid");
            let after = parse_arms(&format!("1:{},2:{}", first - grow, 100 - first + grow)).expect("valid");
            let bucket = user_bucket("exp", &user);
            let (was, is) = (before[choose_arm(&before, bucket)].version, after[choose_arm(&after, bucket)].version);
            prop_assert!(was == is || is == 2, "{} -> {}", was, is);
        }

        /// Untrusted router configuration: any `arms` text is taken or refused, and
        /// what is taken splits exactly 100 buckets among distinct versions.
        #[test]
        fn any_arms_text_is_taken_or_refused(text in "[0-9:,= a-z-]{0,20}") {
            if let Ok(arms) = parse_arms(&text) {
                prop_assert_eq!(arms.iter().map(|a| a.weight).sum::<u32>(), TOTAL_WEIGHT);
                let mut versions: Vec<i64> = arms.iter().map(|a| a.version).collect();
                versions.dedup();
                prop_assert_eq!(versions.len(), arms.len());
                for bucket in 0..TOTAL_WEIGHT {
                    prop_assert!(choose_arm(&arms, bucket) < arms.len());
                }
            }
        }

        /// Well-formed pairs are taken exactly when their versions are distinct and
        /// their weights sum to 100, and each arm then owns as many buckets as its weight.
        #[test]
        fn arms_are_taken_exactly_when_valid(
            pairs in proptest::collection::vec((1i64..5, 0u32..=100), 1..4),
        ) {
            let text = pairs
                .iter()
                .map(|(version, weight)| format!("{version}:{weight}"))
                .collect::<Vec<_>>()
                .join(",");
            let mut versions: Vec<i64> = pairs.iter().map(|(v, _)| *v).collect();
            versions.sort_unstable();
            versions.dedup();
            let valid = versions.len() == pairs.len()
                && pairs.iter().map(|(_, w)| w).sum::<u32>() == TOTAL_WEIGHT;
            let parsed = parse_arms(&text);
            prop_assert_eq!(parsed.is_ok(), valid, "{}: {:?}", text, parsed);
            if let Ok(arms) = parsed {
                for arm in &arms {
                    let owned = (0..TOTAL_WEIGHT)
                        .filter(|&b| arms[choose_arm(&arms, b)].version == arm.version)
                        .count();
                    prop_assert_eq!(owned as u32, arm.weight);
                }
            }
        }
    }
}
