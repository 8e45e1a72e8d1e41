//! Text generation with a GPT-2 style ONNX decoder that takes and returns past key
//! values, with in-flight batching: each instance's decode thread runs one batch that
//! requests join at the next step (one prefill over their prompts) and leave when
//! they end, every step one new token per row over the shared cache. Free of Triton
//! FFI.
//!
//! - [`params`]: sampling settings, from the config and from each request;
//! - [`decoder`]: the decoder's interface, its cache kept on the device (IO binding);
//! - [`sampler_graphs`]: the graphs that choose tokens where the decoder runs;
//! - [`cache_rows`]: the graph that merges cache rows when sequences join or leave;
//! - [`batch`]: the running batch; [`scheduler`]: the decode thread and its queue;
//! - [`delivery`]: the thread that sends the responses;
//! - [`text_stream`]: text decoded as it is generated, with stop strings.

pub mod batch;
pub mod cache_rows;
pub mod decoder;
mod delivery;
pub mod llm_io;
pub mod params;
mod row;
pub use row::{FinishReason, GenerationObserver};
pub mod sampler_graphs;
pub mod scheduler;
mod text_stream;

use std::sync::Arc;
use std::time::Instant;

use ort::session::Session;
use tokenizers::Tokenizer;

use crate::bytes_tensor;
use crate::error::BackendError;
use crate::responder::{CollectingResponder, Pending};
use crate::settings::DEFAULT_MAX_TEXT_BYTES;
use crate::text::read_texts;
use crate::tokenize::{KeptTokens, encode_kept, highest_id, vocabulary_mismatch};
use crate::types::{DataType, InputTensor, OutputTensor, ParameterValue};
use decoder::DecoderBinding;
use llm_io::{ResponseOptions, read_flag};
use params::{GenerationParams, as_bool};
use row::Row;
use scheduler::BatchLimits;
use text_stream::cut_at_stop;

/// Output of whole-response models: each prompt followed by its continuation.
pub const GENERATED_TEXT: &str = "generated_text";
/// Output of decoupled (streaming) models, in the common LLM convention.
pub const TEXT_OUTPUT: &str = "text_output";
/// Optional BOOL input of decoupled models: false asks for one response, not a stream.
pub const STREAM_INPUT: &str = "stream";
/// Config parameter: how many prompts one request may hold.
pub const MAX_PROMPTS: &str = "max_prompts_per_request";
/// The default of [`MAX_PROMPTS`]: each prompt costs its own KV cache.
pub const DEFAULT_MAX_PROMPTS: usize = 64;
/// Config parameters bounding an instance's running batch ([`BatchLimits`]).
pub const MAX_SEQUENCES: &str = "max_sequences_in_flight";
pub const MAX_TOKENS: &str = "max_tokens_in_flight";
/// Their defaults: as many sequences as one request may hold, and a cache of 8192
/// positions (about 600 MiB for GPT-2 124M in FP32).
pub const DEFAULT_LIMITS: BatchLimits = BatchLimits {
    max_sequences: DEFAULT_MAX_PROMPTS,
    max_tokens: 8192,
};
/// Response parameter of the final response: new tokens made for all the request's
/// prompts.
pub const GENERATED_TOKENS: &str = "generated_tokens";

/// How a model answers: one response per request, or a stream of responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseMode {
    /// `generated_text`: each prompt followed by its continuation, in one response.
    Whole,
    /// Decoupled models: `text_output` pieces as they are decoded, then a final one.
    Decoupled,
}

/// One request's prompts, tokenized, and its settings, validated.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    prompts: Vec<String>,
    /// The token ids fed for each prompt.
    prompt_ids: Vec<Vec<i64>>,
    text_shape: Vec<i64>,
    params: GenerationParams,
    /// Send text pieces as they come (decoupled models only).
    stream: bool,
    /// When the backend read the request (for the time to first token).
    received: Instant,
    options: ResponseOptions,
}

impl GenerationRequest {
    pub fn rows(&self) -> usize {
        self.prompts.len()
    }
}

/// The text-generation task shared by all instances of a model.
pub struct Generator {
    tokenizer: Tokenizer,
    eos_id: i64,
    /// The largest id the tokenizer gives: the load probes the model with it.
    highest_id: i64,
    /// Positions the model can attend to: prompt plus new tokens never exceed it.
    context_length: usize,
    defaults: GenerationParams,
    mode: ResponseMode,
    max_prompts: usize,
    max_text_bytes: usize,
    use_cache: bool,
    limits: BatchLimits,
}

impl Generator {
    /// A generator answering whole responses, with the KV cache, at most
    /// [`DEFAULT_MAX_PROMPTS`] prompts per request and [`DEFAULT_MAX_TEXT_BYTES`] bytes
    /// per prompt; the `with_*` methods change that.
    pub fn new(
        mut tokenizer: Tokenizer,
        eos_token: Option<&str>,
        context_length: usize,
        defaults: GenerationParams,
    ) -> Result<Self, BackendError> {
        // A shipped tokenizer may pad or truncate every text; a prompt is fed as it is,
        // and `encode` keeps its end.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| BackendError::tokenizer("cannot switch truncation off", e))?;
        let eos_token = eos_token.unwrap_or("<|endoftext|>");
        let eos_id = tokenizer.token_to_id(eos_token).map(i64::from).ok_or_else(|| {
            BackendError::Config(format!(
                "the end-of-text token '{eos_token}' is not in the tokenizer; set parameter 'eos_token'"
            ))
        })?;
        Ok(Generator {
            highest_id: highest_id(&tokenizer),
            tokenizer,
            eos_id,
            context_length,
            defaults,
            mode: ResponseMode::Whole,
            max_prompts: DEFAULT_MAX_PROMPTS,
            max_text_bytes: DEFAULT_MAX_TEXT_BYTES,
            use_cache: true,
            limits: DEFAULT_LIMITS,
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

    pub fn with_limits(mut self, limits: BatchLimits) -> Self {
        self.limits = limits;
        self
    }

    pub fn limits(&self) -> BatchLimits {
        self.limits
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

    /// Checks request parameters alone (as this model's defaults would take them), so an
    /// error can be traced to where the client sent them.
    pub fn check_parameters(
        &self,
        parameters: &[(String, ParameterValue)],
    ) -> Result<(), BackendError> {
        self.defaults
            .with_request(parameters, self.context_length)
            .map(drop)
    }

    /// Validates one request: its texts, its `stream` flag and its generation parameters.
    pub fn prepare(
        &self,
        text: &InputTensor,
        stream: Option<&InputTensor>,
        parameters: &[(String, ParameterValue)],
        options: ResponseOptions,
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
            Some(flag) => Some(read_flag(STREAM_INPUT, flag)?),
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
        let prompt_ids = prompts
            .iter()
            .map(|prompt| self.encode(prompt))
            .collect::<Result<_, _>>()?;
        let request = GenerationRequest {
            prompts,
            prompt_ids,
            text_shape: text.shape.clone(),
            params,
            stream,
            received: Instant::now(),
            options,
        };
        let (rows, reach) = (request.rows(), self.request_reach(&request));
        if !self.limits.admit(0, 0, rows, reach) {
            return Err(BackendError::InvalidInput(format!(
                "the request needs a cache of {} positions ({rows} prompts, padded to {reach} \
                 tokens); this model holds at most {} sequences and {} positions at once \
                 (parameters '{MAX_SEQUENCES}', '{MAX_TOKENS}'): send fewer prompts or ask \
                 for fewer 'max_new_tokens'",
                rows * reach,
                self.limits.max_sequences,
                self.limits.max_tokens
            )));
        }
        Ok(request)
    }

    /// The token ids the decoder is fed for one prompt (`tokenizer.json`'s own special
    /// tokens added), keeping the last `context_length - 1` of an over-long prompt.
    pub fn encode(&self, prompt: &str) -> Result<Vec<i64>, BackendError> {
        // Keep the end of an over-long prompt, leaving room for one new token.
        let keep = self.context_length - 1;
        let encoding = encode_kept(&self.tokenizer, prompt, KeptTokens::Last(keep))
            .map_err(|e| BackendError::tokenizer("cannot encode a prompt", e))?;
        let ids = encoding.get_ids();
        Ok(ids[ids.len().saturating_sub(keep)..]
            .iter()
            .map(|&id| i64::from(id))
            .collect())
    }

    /// The text of generated ids, special tokens skipped.
    pub fn decode(&self, ids: &[i64]) -> Result<String, BackendError> {
        let ids: Vec<u32> = ids
            .iter()
            .filter_map(|&id| u32::try_from(id).ok())
            .collect();
        self.tokenizer
            .decode(&ids, true)
            .map_err(|e| BackendError::tokenizer("cannot decode the generated tokens", e))
    }

    /// The most tokens the longest of a request's prompts may reach.
    pub fn request_reach(&self, request: &GenerationRequest) -> usize {
        request
            .prompt_ids
            .iter()
            .map(|ids| self.reach(ids.len(), &request.params))
            .max()
            .unwrap_or(0)
    }

    /// The most tokens a prompt of `prompt_length` tokens may reach with `params`.
    pub(super) fn reach(&self, prompt_length: usize, params: &GenerationParams) -> usize {
        (prompt_length + params.max_new_tokens).min(self.context_length)
    }

    /// Runs one greedy step over the tokenizer's highest id, then over a prompt of
    /// `context_length - 1` tokens, the longest a request can make the decoder see: a
    /// tokenizer of another model, or a model whose position table is shorter than
    /// `max_sequence_length`, fails here, at load, instead of on requests.
    pub fn probe(
        &self,
        session: &mut Session,
        binding: &mut DecoderBinding,
    ) -> Result<(), BackendError> {
        let length = self.context_length;
        if length < 2 {
            return Err(BackendError::Config(format!(
                "max_sequence_length (the context) is {length}; text generation needs at least 2"
            )));
        }
        self.probe_prompt(session, binding, vec![self.highest_id])
            .map_err(|error| vocabulary_mismatch(&self.tokenizer, self.highest_id, error))?;
        self.probe_prompt(session, binding, vec![self.eos_id; length - 1])
            .map_err(|error| {
                BackendError::Config(format!(
                    "max_sequence_length (the context) is {length}, but a prompt of {} tokens \
                     fails on this model (is its position table shorter?): {error}",
                    length - 1
                ))
            })
    }

    /// Generates one greedy token after `prompt_ids`, on this thread; the error, if any.
    fn probe_prompt(
        &self,
        session: &mut Session,
        binding: &mut DecoderBinding,
        prompt_ids: Vec<i64>,
    ) -> Result<(), String> {
        let request = GenerationRequest {
            prompts: vec![String::new()],
            prompt_ids: vec![prompt_ids],
            text_shape: vec![1],
            params: GenerationParams {
                do_sample: false,
                max_new_tokens: 1,
                repetition_penalty: 1.0,
                stop: Vec::new(),
                ..self.defaults.clone()
            },
            stream: false,
            received: Instant::now(),
            options: ResponseOptions::default(),
        };
        let responder = CollectingResponder::default();
        let collected = Arc::clone(&responder.collected);
        let pending = Pending {
            request,
            responder: Box::new(responder),
        };
        batch::generate_all(self, session, binding, vec![pending]);
        let error = collected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .error
            .take();
        error.map_or(Ok(()), Err)
    }

    /// A row's final text: for a stream, what it has not sent yet; otherwise its
    /// prompt followed by its continuation (cut before any stop string).
    fn final_text(
        &self,
        row: &Row<'_>,
        prompts: &[String],
        params: &GenerationParams,
        stream: bool,
        exclude_input: bool,
    ) -> Result<String, BackendError> {
        let full = self.decode(&row.generated)?;
        let continuation = cut_at_stop(&full, &params.stop);
        Ok(if stream {
            row.text
                .as_ref()
                .map_or(continuation, |text| text.unsent_part_of(continuation))
                .to_owned()
        } else if exclude_input {
            continuation.to_owned()
        } else {
            let prompt = prompts.get(row.index).map_or("", String::as_str);
            format!("{prompt}{continuation}")
        })
    }

    fn text_tensor(&self, shape: &[i64], texts: &[String]) -> OutputTensor {
        OutputTensor {
            name: match self.mode {
                ResponseMode::Whole => GENERATED_TEXT,
                ResponseMode::Decoupled => TEXT_OUTPUT,
            }
            .to_owned(),
            datatype: DataType::Bytes,
            shape: shape.to_vec(),
            data: bytes_tensor::encode_elements(texts),
        }
    }
}
