//! Text generation with a GPT-2 style ONNX decoder that takes and returns past key
//! values: one prefill over the left-padded prompts, then one step per new token that
//! reuses the cache. Free of Triton FFI.
//!
//! - [`params`]: sampling settings, from the config and from each request;
//! - [`decoder`]: the decoder's interface, its cache kept on the device (IO binding);
//! - [`sampler_graphs`]: the graphs that choose tokens where the decoder runs;
//! - [`text_stream`]: text decoded as it is generated, with stop strings.

pub mod decoder;
pub mod params;
mod row;
pub mod sampler_graphs;
mod text_stream;

use ort::session::Session;
use ort::value::{DynValue, Tensor};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;
use tokenizers::Tokenizer;

use crate::bytes_tensor;
use crate::error::BackendError;
use crate::responder::{CollectingResponder, Responder};
use crate::settings::DEFAULT_MAX_TEXT_BYTES;
use crate::text::read_texts;
use crate::types::{DataType, InputTensor, OutputTensor, ParameterValue};
use decoder::{Columns, DecoderBinding};
use params::{GenerationParams, as_bool};
use row::Row;
use text_stream::{TextStream, cut_at_stop};

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
        let prompt_ids = prompts
            .iter()
            .map(|prompt| self.encode(prompt))
            .collect::<Result<_, _>>()?;
        Ok(GenerationRequest {
            prompts,
            prompt_ids,
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
            .map_err(|e| BackendError::tokenizer("cannot encode a prompt", e))?;
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
            .map_err(|e| BackendError::tokenizer("cannot decode the generated tokens", e))
    }

    /// Generates for every prompt of every request in one batch. `responders[i]`
    /// answers `requests[i]`: a request it reports cancelled stops at once, and a
    /// streaming request gets its text as it is decoded. The result holds each
    /// request's final outputs (for a stream: the text not sent yet).
    pub fn run(
        &self,
        session: &mut Session,
        binding: &mut DecoderBinding,
        requests: &[GenerationRequest],
        responders: &mut [&mut dyn Responder],
    ) -> Result<Vec<Vec<OutputTensor>>, BackendError> {
        let rows = self.generate(session, binding, requests, responders)?;
        self.outputs(requests, rows)
    }

    /// Runs one greedy step over a prompt of `context_length - 1` tokens, the longest a
    /// request can make the decoder see: a model whose position table is shorter than
    /// `max_sequence_length` fails here, at load, instead of on every long request.
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
        let request = GenerationRequest {
            prompts: vec![String::new()],
            prompt_ids: vec![vec![self.eos_id; length - 1]],
            text_shape: vec![1],
            params: GenerationParams {
                do_sample: false,
                max_new_tokens: 1,
                repetition_penalty: 1.0,
                stop: Vec::new(),
                ..self.defaults.clone()
            },
            stream: false,
        };
        let mut nobody = CollectingResponder::default();
        self.generate(
            session,
            binding,
            std::slice::from_ref(&request),
            &mut [&mut nobody],
        )
        .map(|_| ())
        .map_err(|error| {
            BackendError::Config(format!(
                "max_sequence_length (the context) is {length}, but a prompt of {} tokens \
                 fails on this model (is its position table shorter?): {error}",
                length - 1
            ))
        })
    }

    /// The new token ids of each prompt, request after request (what benchmarks count).
    pub fn generate_ids(
        &self,
        session: &mut Session,
        binding: &mut DecoderBinding,
        requests: &[GenerationRequest],
        responders: &mut [&mut dyn Responder],
    ) -> Result<Vec<Vec<i64>>, BackendError> {
        let rows = self.generate(session, binding, requests, responders)?;
        Ok(rows.into_iter().map(|row| row.generated).collect())
    }

    fn generate<'g>(
        &'g self,
        session: &mut Session,
        binding: &mut DecoderBinding,
        requests: &'g [GenerationRequest],
        responders: &mut [&mut dyn Responder],
    ) -> Result<Vec<Row<'g>>, BackendError> {
        if responders.len() != requests.len() {
            return Err(BackendError::internal(format!(
                "{} responders for {} requests",
                responders.len(),
                requests.len()
            )));
        }
        let mut rows = Vec::new();
        for (request_index, request) in requests.iter().enumerate() {
            for (index, prompt) in request.prompt_ids.iter().enumerate() {
                let rng = match request.params.seed {
                    Some(seed) => ChaCha8Rng::seed_from_u64(seed.wrapping_add(index as u64)),
                    None => ChaCha8Rng::from_os_rng(),
                };
                rows.push(Row {
                    request: request_index,
                    prompt,
                    params: &request.params,
                    rng,
                    generated: Vec::new(),
                    text: (request.stream || !request.params.stop.is_empty())
                        .then(|| TextStream::new(&self.tokenizer)),
                    finished: false,
                });
            }
        }
        self.decode_loop(session, binding, &mut rows, requests, responders)?;
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
                    .ok_or_else(|| BackendError::internal("a generated row went missing"))?;
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
            }
            .to_owned(),
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
        responders: &mut [&mut dyn Responder],
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
            let piece = self.text_tensor(&request.text_shape, &pieces);
            let Some(responder) = responders.get_mut(index) else {
                continue;
            };
            if let Err(error) = responder.respond(false, &mut |writer| writer.tensor(&piece)) {
                responder.fail(&error);
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
        responders: &mut [&mut dyn Responder],
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
                row.finished = responders
                    .get(row.request)
                    .is_some_and(|responder| responder.is_cancelled());
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
                .ok_or_else(|| BackendError::internal("the decoder returned no logits"))?;
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
            self.send_pieces(rows, requests, responders);
            if rows.iter().all(|r| r.finished) {
                return Ok(());
            }
            if self.use_cache {
                for i in 0..binding.layers {
                    for part in ["key", "value"] {
                        let name = format!("present.{i}.{part}");
                        past.push(outputs.remove(&name).ok_or_else(|| {
                            BackendError::internal(format!("the decoder returned no '{name}'"))
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

/// Reads the one-element BOOL `stream` input.
fn read_stream_flag(flag: &InputTensor) -> Result<bool, BackendError> {
    match (flag.datatype, &flag.data[..]) {
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
