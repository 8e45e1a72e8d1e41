//! Text generation with a GPT-2 style ONNX decoder that takes and returns past key
//! values: one prefill over the left-padded prompts, then one step per new token that
//! reuses the cache. Free of Triton FFI.

use std::collections::BTreeMap;

use ort::environment::Environment;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{DynValue, Tensor, ValueType};
use tokenizers::{
    DecodeStream, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, Tokenizer,
};

use crate::bytes_tensor;
use crate::config::DEFAULT_MAX_TEXT_BYTES;
use crate::error::BackendError;
use crate::onnx::{
    self, Device, PICKER_LOGITS, PICKER_TOKEN_IDS, SAMPLER_HISTORY, SAMPLER_REPETITION_PENALTY,
    SAMPLER_TEMPERATURE, SAMPLER_TOP_K, SAMPLER_TOP_P, SAMPLER_UNIFORM, SessionOptions,
};
use crate::pipeline::{OutputTensor, read_texts};
use crate::triton::{DataType, InputTensor, ParameterValue};

pub const GENERATED_TEXT: &str = "generated_text";
/// Output of decoupled (streaming) models, in the common LLM convention.
pub const TEXT_OUTPUT: &str = "text_output";
/// Optional BOOL input of decoupled models: false asks for one response, not a stream.
pub const STREAM_INPUT: &str = "stream";
/// Config parameter: how many prompts one request may hold.
pub const MAX_PROMPTS: &str = "max_prompts_per_request";
/// Config parameter: "false" re-runs the whole sequence at every step (a baseline).
pub const USE_CACHE: &str = "use_cache";
/// The default of [`MAX_PROMPTS`]: each prompt costs its own KV cache.
pub const DEFAULT_MAX_PROMPTS: usize = 64;

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

fn as_bool(key: &str, value: &ParameterValue) -> Result<bool, BackendError> {
    match value {
        ParameterValue::Bool(v) => Ok(*v),
        ParameterValue::String(s) if s.trim().eq_ignore_ascii_case("true") => Ok(true),
        ParameterValue::String(s) if s.trim().eq_ignore_ascii_case("false") => Ok(false),
        _ => Err(invalid(key, "true or false", value)),
    }
}

/// `stop` is one string, or a JSON list of strings (request parameters are scalars).
fn as_stop_list(value: &ParameterValue) -> Result<Vec<String>, BackendError> {
    let ParameterValue::String(text) = value else {
        return Err(invalid("stop", "a string or a JSON list of strings", value));
    };
    let list = if text.trim_start().starts_with('[') {
        serde_json::from_str::<Vec<String>>(text)
            .map_err(|_| invalid("stop", "a string or a JSON list of strings", value))?
    } else {
        vec![text.clone()]
    };
    if list.iter().any(String::is_empty) {
        return Err(invalid("stop", "non-empty strings", value));
    }
    if list.len() > MAX_STOP_STRINGS || list.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(BackendError::InvalidInput(format!(
            "parameter 'stop' takes at most {MAX_STOP_STRINGS} strings of at most \
             {MAX_STOP_BYTES} bytes each"
        )));
    }
    Ok(list)
}

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
            "stop" => self.stop = as_stop_list(value)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Greedy decoding with nothing that changes the logits: the arg-max is the token.
    fn is_plain_greedy(&self) -> bool {
        !self.do_sample && self.repetition_penalty == 1.0
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
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(format!(
                "parameter 'temperature' must be a number > 0, got {}",
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
        let mut params = self.clone();
        for (key, value) in parameters {
            params.apply(key, value)?;
        }
        params.validate(context_length)?;
        Ok(params)
    }
}

/// SplitMix64: small, fast and reproducible; enough to draw tokens.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// The decoder's cache layout, read from the graph when an instance loads, where the
/// cache lives between steps, and the graphs that choose tokens on its device.
#[derive(Debug)]
pub struct DecoderBinding {
    layers: usize,
    heads: usize,
    head_dim: usize,
    has_position_ids: bool,
    /// The session's device: `present.*` outputs stay there and come back as the next
    /// step's `past_key_values.*` (IO binding), so on a GPU the cache never crosses to
    /// the host; the logits stay there too.
    device_memory: MemoryInfo<'static>,
    /// Host memory: where the chosen token ids are read.
    host_memory: MemoryInfo<'static>,
    /// [`onnx::greedy_token_picker`] and [`onnx::token_sampler`] on the decoder's
    /// device: the logits stay there and only the chosen ids come back.
    picker: Session,
    sampler: Session,
}

fn memory_info(device: Device) -> Result<MemoryInfo<'static>, BackendError> {
    let (allocation_device, device_id) = match device {
        Device::Cpu => (AllocationDevice::CPU, 0),
        Device::Cuda { device_id } => (AllocationDevice::CUDA, device_id),
    };
    Ok(MemoryInfo::new(
        allocation_device,
        device_id,
        AllocatorType::Device,
        MemoryType::Default,
    )?)
}

impl DecoderBinding {
    /// Checks the decoder's inputs and outputs, and builds the token-choosing graphs
    /// with the decoder's session `options` (so on its device).
    pub fn new(
        session: &Session,
        environment: &Environment,
        options: SessionOptions,
    ) -> Result<Self, BackendError> {
        let unsupported = |m: String| Err(BackendError::Unsupported(m));
        let names: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
        for required in ["input_ids", "attention_mask"] {
            if !names.contains(&required) {
                return unsupported(format!("the decoder has no '{required}' input"));
            }
        }
        let layers = names
            .iter()
            .filter(|n| n.starts_with("past_key_values.") && n.ends_with(".key"))
            .count();
        if layers == 0 {
            return unsupported(
                "the decoder has no 'past_key_values.{i}.key/value' inputs: export it with past key values".into(),
            );
        }
        for name in &names {
            let known = matches!(*name, "input_ids" | "attention_mask" | "position_ids")
                || (0..layers).any(|i| {
                    *name == format!("past_key_values.{i}.key")
                        || *name == format!("past_key_values.{i}.value")
                });
            if !known {
                return unsupported(format!(
                    "the decoder has an input this backend cannot feed: '{name}'"
                ));
            }
        }
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        for i in 0..layers {
            for part in ["key", "value"] {
                if !names.contains(&format!("past_key_values.{i}.{part}").as_str()) {
                    return unsupported(format!(
                        "the decoder lacks input 'past_key_values.{i}.{part}'"
                    ));
                }
                if !outputs.contains(&format!("present.{i}.{part}").as_str()) {
                    return unsupported(format!("the decoder lacks output 'present.{i}.{part}'"));
                }
            }
        }
        if !outputs.contains(&"logits") {
            return unsupported("the decoder has no 'logits' output".into());
        }
        let cache_shape = session
            .inputs()
            .iter()
            .find(|o| o.name() == "past_key_values.0.key")
            .and_then(|o| match o.dtype() {
                ValueType::Tensor { shape, .. } => Some(shape.to_vec()),
                _ => None,
            });
        let (heads, head_dim) = match cache_shape.as_deref() {
            Some([_, heads, _, head_dim]) if *heads > 0 && *head_dim > 0 => {
                (*heads as usize, *head_dim as usize)
            }
            other => {
                return unsupported(format!(
                    "'past_key_values.0.key' must be [batch, heads, past, head_dim] with fixed heads \
                     and head_dim, got {other:?}"
                ));
            }
        };
        Ok(DecoderBinding {
            layers,
            heads,
            head_dim,
            has_position_ids: names.contains(&"position_ids"),
            device_memory: memory_info(options.device)?,
            host_memory: memory_info(Device::Cpu)?,
            picker: onnx::greedy_token_picker(environment, options)?,
            sampler: onnx::token_sampler(environment, options)?,
        })
    }

    /// The greedy token of each row's last position, from logits left on the device.
    fn pick_greedy(&mut self, logits: &DynValue, batch: usize) -> Result<Vec<i64>, BackendError> {
        choose_on_device(
            &mut self.picker,
            &self.host_memory,
            logits,
            Vec::new(),
            batch,
        )
    }

    /// Each row's token chosen on the device with its own settings ([`onnx::token_sampler`]):
    /// sampling rows draw the next number of their random generator; greedy rows take the
    /// most likely token after the repetition penalty, and finished rows draw nothing.
    fn sample(
        &mut self,
        logits: &DynValue,
        rows: &mut [Row<'_>],
    ) -> Result<Vec<i64>, BackendError> {
        let batch = rows.len();
        let (mut temperature, mut top_k, mut top_p, mut uniform, mut penalty) = (
            Vec::with_capacity(batch),
            Vec::with_capacity(batch),
            Vec::with_capacity(batch),
            Vec::with_capacity(batch),
            Vec::with_capacity(batch),
        );
        for row in rows.iter_mut() {
            let settings = SamplerRow::new(row.params, row.finished);
            temperature.push(settings.temperature);
            top_k.push(settings.top_k);
            top_p.push(settings.top_p);
            penalty.push(settings.repetition_penalty);
            uniform.push(if settings.draws {
                row.rng.next_unit()
            } else {
                0.0
            });
        }
        // Each row's prompt and new tokens, padded with its first token (a repeat is
        // harmless: the penalty applies once per distinct token).
        let length = rows
            .iter()
            .map(|r| r.prompt.len() + r.generated.len())
            .max()
            .unwrap_or(0);
        let mut history = Vec::with_capacity(batch * length);
        for row in rows.iter() {
            let seen = row.prompt.iter().chain(&row.generated).copied();
            let pad = row.prompt.first().copied().unwrap_or(0);
            history.extend(seen.chain(std::iter::repeat(pad)).take(length));
        }
        let column = |values: Vec<f32>| Tensor::from_array(([batch, 1], values));
        let settings = vec![
            (SAMPLER_TEMPERATURE, column(temperature)?.into_dyn()),
            (
                SAMPLER_TOP_K,
                Tensor::from_array(([batch, 1], top_k))?.into_dyn(),
            ),
            (SAMPLER_TOP_P, column(top_p)?.into_dyn()),
            (SAMPLER_UNIFORM, column(uniform)?.into_dyn()),
            (SAMPLER_REPETITION_PENALTY, column(penalty)?.into_dyn()),
            (
                SAMPLER_HISTORY,
                Tensor::from_array(([batch, length], history))?.into_dyn(),
            ),
        ];
        choose_on_device(
            &mut self.sampler,
            &self.host_memory,
            logits,
            settings,
            batch,
        )
    }
}

/// What [`onnx::token_sampler`] is fed for one row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerRow {
    pub temperature: f32,
    /// `i64::MAX` keeps every token; 1 is greedy.
    pub top_k: i64,
    /// Infinite keeps every token.
    pub top_p: f32,
    pub repetition_penalty: f32,
    /// Whether the row draws a number from its random generator for this step.
    pub draws: bool,
}

impl SamplerRow {
    /// A sampling row's settings; a greedy row keeps only its most likely token, and a
    /// finished row (which only rides along) is left unchanged.
    pub fn new(params: &GenerationParams, finished: bool) -> Self {
        let draws = !finished && params.do_sample;
        SamplerRow {
            temperature: if draws { params.temperature } else { 1.0 },
            top_k: match params.top_k {
                _ if !draws => 1,
                0 => i64::MAX,
                k => i64::try_from(k).unwrap_or(i64::MAX),
            },
            top_p: if draws && params.top_p < 1.0 {
                params.top_p
            } else {
                f32::INFINITY
            },
            repetition_penalty: if finished {
                1.0
            } else {
                params.repetition_penalty
            },
            draws,
        }
    }
}

/// Runs a token-choosing graph on `logits` (left where the decoder put them) and the
/// per-row `settings`; returns one token id per row, read in host memory.
fn choose_on_device(
    chooser: &mut Session,
    host_memory: &MemoryInfo<'static>,
    logits: &DynValue,
    settings: Vec<(&str, DynValue)>,
    batch: usize,
) -> Result<Vec<i64>, BackendError> {
    let mut io = chooser.create_binding()?;
    io.bind_input(PICKER_LOGITS, logits)?;
    for (name, value) in &settings {
        io.bind_input(*name, value)?;
    }
    io.bind_output_to_device(PICKER_TOKEN_IDS, host_memory)?;
    let outputs = chooser.run_binding(&io)?;
    let (shape, ids) = outputs[PICKER_TOKEN_IDS].try_extract_tensor::<i64>()?;
    if shape[..] != [batch as i64, 1] {
        return Err(BackendError::Onnx(format!(
            "choosing tokens gave shape {shape:?} for {batch} rows"
        )));
    }
    Ok(ids.to_vec())
}

/// How a model answers: one response per request, or a stream of responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseMode {
    /// `generated_text`: each prompt followed by its continuation, in one response.
    Whole,
    /// Decoupled models: `text_output` pieces as they are decoded, then a final one.
    Decoupled,
}

/// One request's prompts and settings, validated.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    prompts: Vec<String>,
    text_shape: Vec<i64>,
    params: GenerationParams,
    /// Send text pieces as they come (decoupled models only).
    stream: bool,
}

impl GenerationRequest {
    pub fn rows(&self) -> usize {
        self.prompts.len()
    }
}

/// What the decode loop needs from whoever runs it.
pub trait GenerationProgress {
    /// Whether request `request` was cancelled; its prompts stop at once.
    fn is_cancelled(&self, request: usize) -> bool;
    /// Hands a streaming request its newest text; false when it cannot take more.
    fn send_partial(&mut self, request: usize, outputs: Vec<OutputTensor>) -> bool;
}

/// The text-generation task shared by all instances of a model.
pub struct Generator {
    tokenizer: Tokenizer,
    eos_id: i64,
    /// Positions the model can attend to: prompt plus new tokens never exceed it.
    context_length: usize,
    defaults: GenerationParams,
    mode: ResponseMode,
    max_prompts: usize,
    max_text_bytes: usize,
    use_cache: bool,
}

impl Generator {
    /// A generator answering whole responses, with the KV cache, at most
    /// [`DEFAULT_MAX_PROMPTS`] prompts per request and [`DEFAULT_MAX_TEXT_BYTES`] bytes
    /// per prompt; the `with_*` methods change that.
    pub fn new(
        tokenizer: Tokenizer,
        eos_token: Option<&str>,
        context_length: usize,
        defaults: GenerationParams,
    ) -> Result<Self, BackendError> {
        let eos_token = eos_token.unwrap_or("<|endoftext|>");
        let eos_id = tokenizer.token_to_id(eos_token).map(i64::from).ok_or_else(|| {
            BackendError::Config(format!(
                "the end-of-text token '{eos_token}' is not in the tokenizer; set parameter 'eos_token'"
            ))
        })?;
        Ok(Generator {
            tokenizer,
            eos_id,
            context_length,
            defaults,
            mode: ResponseMode::Whole,
            max_prompts: DEFAULT_MAX_PROMPTS,
            max_text_bytes: DEFAULT_MAX_TEXT_BYTES,
            use_cache: true,
        })
    }

    pub fn with_mode(mut self, mode: ResponseMode) -> Self {
        self.mode = mode;
        self
    }

    pub fn with_max_prompts(mut self, max_prompts: usize) -> Self {
        self.max_prompts = max_prompts;
        self
    }

    pub fn with_max_text_bytes(mut self, max_text_bytes: usize) -> Self {
        self.max_text_bytes = max_text_bytes;
        self
    }

    /// Without the cache every step re-runs the whole sequence (same tokens, much
    /// slower): a baseline for benchmarks and a check of the cached path.
    pub fn with_cache(mut self, use_cache: bool) -> Self {
        self.use_cache = use_cache;
        self
    }

    /// The tokenizer itself (for memory accounting).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Validates one request: its texts, its `stream` flag and its generation parameters.
    pub fn prepare(
        &self,
        text: &InputTensor,
        stream: Option<&InputTensor>,
        parameters: &[(String, ParameterValue)],
    ) -> Result<GenerationRequest, BackendError> {
        let prompts = read_texts(text, self.max_text_bytes)?;
        if prompts.is_empty() {
            return Err(BackendError::InvalidInput(
                "the request holds no prompt".into(),
            ));
        }
        if prompts.len() > self.max_prompts {
            return Err(BackendError::InvalidInput(format!(
                "the request holds {} prompts; this model takes at most {} per request \
                 (parameter '{MAX_PROMPTS}')",
                prompts.len(),
                self.max_prompts
            )));
        }
        // The `stream` input wins over a `stream` request parameter (the older convention).
        let wanted = match stream {
            Some(flag) => Some(read_stream_flag(flag)?),
            None => parameters
                .iter()
                .find(|(key, _)| key == STREAM_INPUT)
                .map(|(key, value)| as_bool(key, value))
                .transpose()?,
        };
        let stream = match (self.mode, wanted) {
            (ResponseMode::Whole, Some(true)) => {
                return Err(BackendError::InvalidInput(format!(
                    "this model answers with one response; '{STREAM_INPUT}' needs a decoupled \
                     model (e.g. gpt2-small-stream)"
                )));
            }
            (ResponseMode::Whole, _) => false,
            (ResponseMode::Decoupled, wanted) => wanted.unwrap_or(true),
        };
        let params = self
            .defaults
            .with_request(parameters, self.context_length)?;
        Ok(GenerationRequest {
            prompts,
            text_shape: text.shape.clone(),
            params,
            stream,
        })
    }

    /// The token ids the decoder is fed for one prompt (`tokenizer.json`'s own special
    /// tokens added), keeping the last `context_length - 1` of an over-long prompt.
    pub fn encode(&self, prompt: &str) -> Result<Vec<i64>, BackendError> {
        let encoding = self
            .tokenizer
            .encode(prompt, true)
            .map_err(|e| BackendError::Tokenizer(e.to_string()))?;
        let ids: Vec<i64> = encoding.get_ids().iter().map(|&id| i64::from(id)).collect();
        // Keep the end of an over-long prompt, leaving room for one new token.
        let keep = self.context_length - 1;
        Ok(ids[ids.len().saturating_sub(keep)..].to_vec())
    }

    /// The text of generated ids, special tokens skipped.
    pub fn decode(&self, ids: &[i64]) -> Result<String, BackendError> {
        let ids: Vec<u32> = ids
            .iter()
            .filter_map(|&id| u32::try_from(id).ok())
            .collect();
        self.tokenizer
            .decode(&ids, true)
            .map_err(|e| BackendError::Tokenizer(e.to_string()))
    }

    /// Generates for every prompt of every request in one batch. Streaming requests
    /// get their text through `progress` as it is decoded; the result holds each
    /// request's final outputs (for a stream: the text not sent yet).
    pub fn run(
        &self,
        session: &mut Session,
        binding: &mut DecoderBinding,
        requests: &[GenerationRequest],
        progress: &mut dyn GenerationProgress,
    ) -> Result<Vec<Vec<OutputTensor>>, BackendError> {
        let rows = self.generate(session, binding, requests, progress)?;
        self.outputs(requests, rows)
    }

    /// The new token ids of each prompt, request after request (what benchmarks count).
    pub fn generate_ids(
        &self,
        session: &mut Session,
        binding: &mut DecoderBinding,
        requests: &[GenerationRequest],
        progress: &mut dyn GenerationProgress,
    ) -> Result<Vec<Vec<i64>>, BackendError> {
        let rows = self.generate(session, binding, requests, progress)?;
        Ok(rows.into_iter().map(|row| row.generated).collect())
    }

    fn generate<'g>(
        &'g self,
        session: &mut Session,
        binding: &mut DecoderBinding,
        requests: &'g [GenerationRequest],
        progress: &mut dyn GenerationProgress,
    ) -> Result<Vec<Row<'g>>, BackendError> {
        let mut rows = Vec::new();
        for (request_index, request) in requests.iter().enumerate() {
            for (index, prompt) in request.prompts.iter().enumerate() {
                let seed = request
                    .params
                    .seed
                    .map_or_else(fresh_seed, |s| s.wrapping_add(index as u64));
                rows.push(Row {
                    request: request_index,
                    prompt: self.encode(prompt)?,
                    params: &request.params,
                    rng: Rng::new(seed),
                    generated: Vec::new(),
                    text: (request.stream || !request.params.stop.is_empty())
                        .then(|| TextStream::new(&self.tokenizer)),
                    finished: false,
                });
            }
        }
        self.decode_loop(session, binding, &mut rows, requests, progress)?;
        Ok(rows)
    }

    /// Each request's final outputs from its generated rows.
    fn outputs(
        &self,
        requests: &[GenerationRequest],
        rows: Vec<Row<'_>>,
    ) -> Result<Vec<Vec<OutputTensor>>, BackendError> {
        let mut finished = rows.into_iter();
        let mut results = Vec::with_capacity(requests.len());
        for request in requests {
            let mut texts = Vec::with_capacity(request.rows());
            for prompt in &request.prompts {
                let row = finished
                    .next()
                    .ok_or_else(|| BackendError::Onnx("a generated row went missing".into()))?;
                let full = self.decode(&row.generated)?;
                let continuation = cut_at_stop(&full, &request.params.stop);
                texts.push(if request.stream {
                    row.text
                        .as_ref()
                        .map_or(continuation, |text| text.unsent_part_of(continuation))
                        .to_owned()
                } else {
                    format!("{prompt}{continuation}")
                });
            }
            results.push(vec![self.text_tensor(&request.text_shape, &texts)]);
        }
        Ok(results)
    }

    fn text_tensor(&self, shape: &[i64], texts: &[String]) -> OutputTensor {
        OutputTensor {
            name: match self.mode {
                ResponseMode::Whole => GENERATED_TEXT,
                ResponseMode::Decoupled => TEXT_OUTPUT,
            },
            datatype: DataType::Bytes,
            shape: shape.to_vec(),
            data: bytes_tensor::encode_elements(texts),
        }
    }

    /// Sends each streaming request the text its prompts decoded since the last step.
    /// A request that cannot take more text stops generating.
    fn send_pieces(
        &self,
        rows: &mut [Row<'_>],
        requests: &[GenerationRequest],
        progress: &mut dyn GenerationProgress,
    ) {
        let mut first = 0;
        for (index, request) in requests.iter().enumerate() {
            let request_rows = &mut rows[first..first + request.rows()];
            first += request.rows();
            if !request.stream {
                continue;
            }
            let pieces: Vec<String> = request_rows
                .iter_mut()
                .map(|row| {
                    row.text
                        .as_mut()
                        .map(|text| text.take_ready(&row.params.stop))
                        .unwrap_or_default()
                })
                .collect();
            if pieces.iter().all(String::is_empty) {
                continue;
            }
            if !progress.send_partial(index, vec![self.text_tensor(&request.text_shape, &pieces)]) {
                request_rows.iter_mut().for_each(|row| row.finished = true);
            }
        }
    }

    fn decode_loop(
        &self,
        session: &mut Session,
        binding: &mut DecoderBinding,
        rows: &mut [Row<'_>],
        requests: &[GenerationRequest],
        progress: &mut dyn GenerationProgress,
    ) -> Result<(), BackendError> {
        let batch = rows.len();
        let width = rows.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
        // Left padding: every prompt ends at the same column, so one step feeds all rows.
        let mut ids = Columns::new(batch);
        let mut mask = Columns::new(batch);
        let mut positions = Columns::new(batch);
        for row in rows.iter() {
            let pad = width - row.prompt.len();
            ids.extend_row(std::iter::repeat_n(self.eos_id, pad).chain(row.prompt.iter().copied()));
            mask.extend_row(
                std::iter::repeat_n(0i64, pad).chain(std::iter::repeat_n(1, row.prompt.len())),
            );
            positions.extend_row(std::iter::repeat_n(0i64, pad).chain(0..row.prompt.len() as i64));
        }
        let (layers, heads, head_dim) = (binding.layers, binding.heads, binding.head_dim);
        let empty_past = || -> Result<Vec<DynValue>, BackendError> {
            (0..layers * 2)
                .map(|_| {
                    let empty =
                        Tensor::<f32>::from_array(([batch, heads, 0, head_dim], Vec::new()))?;
                    Ok(empty.into_dyn())
                })
                .collect()
        };
        let mut past = empty_past()?;
        let mut io = session.create_binding()?;
        // Columns fed this step: the whole prompt first; then, with the cache, only
        // the newest column.
        let mut step_width = width;
        loop {
            for row in rows.iter_mut().filter(|r| !r.finished) {
                row.finished = progress.is_cancelled(row.request);
            }
            if rows.iter().all(|r| r.finished) {
                return Ok(());
            }
            // Rebound at every step: the shapes change, and an output left bound from
            // the last run would be reused at its old shape.
            io.clear();
            io.bind_input(
                "input_ids",
                &Tensor::from_array(([batch, step_width], ids.last(step_width)))?,
            )?;
            io.bind_input(
                "attention_mask",
                &Tensor::from_array(([batch, mask.width()], mask.last(mask.width())))?,
            )?;
            if binding.has_position_ids {
                io.bind_input(
                    "position_ids",
                    &Tensor::from_array(([batch, step_width], positions.last(step_width)))?,
                )?;
            }
            for (i, value) in past.drain(..).enumerate() {
                let part = if i % 2 == 0 { "key" } else { "value" };
                io.bind_input(format!("past_key_values.{}.{part}", i / 2), &value)?;
            }
            // The logits stay on the device, where the tokens are chosen.
            io.bind_output_to_device("logits", &binding.device_memory)?;
            for i in 0..binding.layers {
                for part in ["key", "value"] {
                    io.bind_output_to_device(
                        format!("present.{i}.{part}"),
                        &binding.device_memory,
                    )?;
                }
            }
            let mut outputs = session.run_binding(&io)?;
            let logits = outputs
                .remove("logits")
                .ok_or_else(|| BackendError::Onnx("the decoder returned no logits".into()))?;
            let chosen = if rows
                .iter()
                .all(|r| r.finished || r.params.is_plain_greedy())
            {
                binding.pick_greedy(&logits, batch)?
            } else {
                binding.sample(&logits, rows)?
            };
            let mut next = Vec::with_capacity(batch);
            for (row, token) in rows.iter_mut().zip(chosen) {
                if row.finished {
                    next.push(self.eos_id);
                    continue;
                }
                next.push(token);
                if token == self.eos_id {
                    row.finished = true;
                    continue;
                }
                row.generated.push(token);
                let stopped = match &mut row.text {
                    Some(text) => text.push(token, &row.params.stop)?,
                    None => false,
                };
                row.finished = stopped
                    || row.generated.len() >= row.params.max_new_tokens
                    || row.prompt.len() + row.generated.len() >= self.context_length;
            }
            self.send_pieces(rows, requests, progress);
            if rows.iter().all(|r| r.finished) {
                return Ok(());
            }
            if self.use_cache {
                for i in 0..binding.layers {
                    for part in ["key", "value"] {
                        let name = format!("present.{i}.{part}");
                        past.push(outputs.remove(&name).ok_or_else(|| {
                            BackendError::Onnx(format!("the decoder returned no '{name}'"))
                        })?);
                    }
                }
                step_width = 1;
            } else {
                past = empty_past()?;
                step_width += 1;
            }
            drop(outputs);
            // Each active row's next position follows its own last one. A finished row
            // only rides along (its logits are ignored) and keeps its position, which
            // must stay inside the model's position table.
            let next_positions: Vec<i64> = positions
                .last(1)
                .into_iter()
                .zip(rows.iter())
                .map(|(last, row)| if row.finished { last } else { last + 1 })
                .collect();
            positions.push_column(&next_positions);
            ids.push_column(&next);
            mask.push_column(&vec![1; batch]);
        }
    }
}

/// A batch of equally long rows (row-major) that grows by one column per step.
struct Columns {
    rows: usize,
    values: Vec<i64>,
}

impl Columns {
    fn new(rows: usize) -> Self {
        Columns {
            rows,
            values: Vec::new(),
        }
    }

    fn width(&self) -> usize {
        self.values.len().checked_div(self.rows).unwrap_or(0)
    }

    /// Appends the next row while the columns are being filled row by row.
    fn extend_row(&mut self, row: impl IntoIterator<Item = i64>) {
        self.values.extend(row);
    }

    fn push_column(&mut self, column: &[i64]) {
        let width = self.width();
        let mut values = Vec::with_capacity(self.values.len() + self.rows);
        for (row, &value) in column.iter().enumerate() {
            values.extend_from_slice(&self.values[row * width..(row + 1) * width]);
            values.push(value);
        }
        self.values = values;
    }

    /// The last `count` columns, row-major.
    fn last(&self, count: usize) -> Vec<i64> {
        let width = self.width();
        if width == 0 {
            return Vec::new();
        }
        self.values
            .chunks(width)
            .flat_map(|row| row[width - count.min(width)..].iter().copied())
            .collect()
    }
}

/// Reads the one-element BOOL `stream` input.
fn read_stream_flag(flag: &InputTensor) -> Result<bool, BackendError> {
    match (flag.datatype, flag.data.as_slice()) {
        (DataType::Bool, [value]) => Ok(*value != 0),
        (DataType::Bool, _) => Err(BackendError::InvalidInput(format!(
            "input '{STREAM_INPUT}' must hold one value, got shape {:?}",
            flag.shape
        ))),
        (other, _) => Err(BackendError::InvalidInput(format!(
            "input '{STREAM_INPUT}' must be BOOL, not {}",
            other.name()
        ))),
    }
}

/// A prompt on its way through the decode loop.
struct Row<'g> {
    /// Index of the request this prompt came from.
    request: usize,
    prompt: Vec<i64>,
    params: &'g GenerationParams,
    rng: Rng,
    generated: Vec<i64>,
    /// Only rows that stream or watch for stop strings decode as they go; the others
    /// decode their tokens once, at the end.
    text: Option<TextStream<'g>>,
    finished: bool,
}

type TokenDecoder<'t> = DecodeStream<
    't,
    ModelWrapper,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// A row's continuation as text, decoded token by token so that a multi-byte character
/// is never split, with stop strings searched only in the text each token adds.
struct TextStream<'t> {
    decoder: TokenDecoder<'t>,
    text: String,
    /// Bytes of `text` already sent to the client.
    sent: usize,
    /// Where the first stop string begins, once one has appeared.
    stop_at: Option<usize>,
}

impl<'t> TextStream<'t> {
    fn new(tokenizer: &'t Tokenizer) -> Self {
        TextStream {
            decoder: tokenizer.decode_stream(true),
            text: String::new(),
            sent: 0,
            stop_at: None,
        }
    }

    /// Adds one generated token; returns whether a stop string has appeared.
    fn push(&mut self, token: i64, stop: &[String]) -> Result<bool, BackendError> {
        let token = u32::try_from(token)
            .map_err(|_| BackendError::Onnx(format!("the model chose token id {token}")))?;
        let piece = self
            .decoder
            .step(token)
            .map_err(|e| BackendError::Tokenizer(e.to_string()))?;
        if let Some(piece) = piece {
            let searched = self.text.len();
            self.text.push_str(&piece);
            if self.stop_at.is_none() {
                self.stop_at = find_stop(&self.text, searched, stop);
            }
        }
        Ok(self.stop_at.is_some())
    }

    /// The text that can be sent now: not sent yet, before any stop string, and not
    /// the possible beginning of one.
    fn take_ready(&mut self, stop: &[String]) -> String {
        let end = self
            .stop_at
            .unwrap_or_else(|| self.text.len() - possible_stop_start(&self.text, stop))
            .max(self.sent);
        let ready = self.text[self.sent..end].to_owned();
        self.sent = end;
        ready
    }

    /// What `continuation` (the row's final text) adds to the text already sent.
    fn unsent_part_of<'c>(&self, continuation: &'c str) -> &'c str {
        continuation
            .get(self.sent..)
            .filter(|_| continuation.starts_with(&self.text[..self.sent]))
            .unwrap_or_default()
    }
}

/// Where the first stop string in `text` begins, looking only at matches that end in
/// `text[searched..]` (earlier text was searched before).
fn find_stop(text: &str, searched: usize, stop: &[String]) -> Option<usize> {
    stop.iter()
        .filter_map(|s| {
            let mut from = searched.saturating_sub(s.len().saturating_sub(1));
            while !text.is_char_boundary(from) {
                from -= 1;
            }
            text[from..].find(s.as_str()).map(|at| from + at)
        })
        .min()
}

/// Length of the longest end of `text` that a stop string starts with: that text is
/// held back until the next tokens show whether it stops the generation.
fn possible_stop_start(text: &str, stop: &[String]) -> usize {
    stop.iter()
        .filter_map(|s| {
            (1..s.len().min(text.len() + 1))
                .rev()
                .filter(|&k| s.is_char_boundary(k))
                .find(|&k| text.ends_with(&s[..k]))
        })
        .max()
        .unwrap_or(0)
}

/// The text before the first stop string.
fn cut_at_stop<'t>(text: &'t str, stop: &[String]) -> &'t str {
    let end = stop
        .iter()
        .filter_map(|s| text.find(s.as_str()))
        .min()
        .unwrap_or(text.len());
    &text[..end]
}

/// A seed for requests that give none: time and a counter, so two requests differ.
fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            ("stop", ParameterValue::String(r#"["\n", "."]"#.into())),
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
                "stop",
                ParameterValue::String("[1, 2]".into()),
                "'stop' must be a string or a JSON list",
            ),
            (
                "stop",
                ParameterValue::String("x".repeat(MAX_STOP_BYTES + 1)),
                "'stop' takes at most 16 strings of at most 256 bytes",
            ),
            (
                "stop",
                ParameterValue::String(serde_json::json!(vec!["x"; 17]).to_string()),
                "'stop' takes at most 16 strings",
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

    #[test]
    fn columns_grow_one_column_at_a_time() {
        let mut columns = Columns::new(2);
        columns.extend_row([1, 2]);
        columns.extend_row([3, 4]);
        columns.push_column(&[5, 6]);
        assert_eq!(columns.width(), 3);
        assert_eq!(columns.last(3), [1, 2, 5, 3, 4, 6]);
        assert_eq!(columns.last(1), [5, 6]);
        let mut empty = Columns::new(2);
        empty.push_column(&[7, 8]);
        assert_eq!(empty.last(1), [7, 8]);
    }

    fn demo_tokenizer() -> Tokenizer {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../model-repository/gpt2-small/1/tokenizer.json"
        );
        Tokenizer::from_file(path).expect("the bundled tokenizer loads")
    }

    fn stream_pieces(tokenizer: &Tokenizer, text: &str, stop: &[String]) -> (Vec<String>, bool) {
        let ids = tokenizer
            .encode(text, false)
            .expect("encodes")
            .get_ids()
            .to_vec();
        let mut stream = TextStream::new(tokenizer);
        let mut pieces = Vec::new();
        for id in ids {
            let stopped = stream.push(i64::from(id), stop).expect("decodes");
            pieces.push(stream.take_ready(stop));
            if stopped {
                return (pieces, true);
            }
        }
        (pieces, false)
    }

    #[test]
    fn streamed_pieces_never_split_a_character() {
        let tokenizer = demo_tokenizer();
        let text = "Grüße aus 東京 🎉👩‍👩‍👧 naïve café";
        let ids = tokenizer.encode(text, false).expect("encodes");
        // The small vocabulary spells these characters in several byte tokens.
        assert!(ids.get_ids().len() > text.chars().count() / 2);
        let (pieces, stopped) = stream_pieces(&tokenizer, text, &[]);
        assert!(!stopped);
        assert_eq!(pieces.concat(), text);
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    }

    #[test]
    fn stream_holds_back_a_possible_stop_string_and_ends_before_it() {
        let tokenizer = demo_tokenizer();
        let stop = vec!["東京".to_string(), "xyz".to_string()];
        let (pieces, stopped) = stream_pieces(&tokenizer, "Grüße aus 東京 und mehr", &stop);
        assert!(stopped);
        assert_eq!(pieces.concat(), "Grüße aus ");
        // A text that only starts like a stop string is released once it cannot match.
        let (pieces, stopped) = stream_pieces(&tokenizer, "abc xy z", &stop);
        assert!(!stopped);
        assert_eq!(pieces.concat(), "abc xy z");
        assert!(pieces.iter().all(|p| !p.ends_with("xy")), "{pieces:?}");
    }

    #[test]
    fn stop_search_covers_matches_across_pieces() {
        let stop = vec!["END".to_string()];
        assert_eq!(find_stop("the EN", 4, &stop), None);
        assert_eq!(find_stop("the END", 6, &stop), Some(4));
        assert_eq!(find_stop("ENDthe", 0, &stop), Some(0));
        assert_eq!(possible_stop_start("the EN", &stop), 2);
        assert_eq!(possible_stop_start("the E", &stop), 1);
        assert_eq!(possible_stop_start("the", &stop), 0);
        // Multi-byte stop strings are only cut at character boundaries.
        let stop = vec!["é!".to_string()];
        assert_eq!(possible_stop_start("café", &stop), "é".len());
        assert_eq!(find_stop("caf\u{e9}!", 4, &stop), Some(3));
    }

    #[test]
    fn output_stops_before_the_first_stop_string() {
        assert_eq!(
            cut_at_stop("one. two\nthree", &["\n".into(), ".".into()]),
            "one"
        );
        assert_eq!(cut_at_stop("no stop", &["END".into()]), "no stop");
    }
}
