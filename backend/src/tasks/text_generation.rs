//! `text-generation`: prompts in, the prompt and its continuation out (one response),
//! or, for decoupled models, the continuation streamed as it is decoded. `execute`
//! hands requests to the instance's decode thread and returns: they join its running
//! batch at the next step (in-flight batching).

use std::sync::Arc;

use serde::Deserialize;

use super::task::{
    Contract, InstanceContext, ModelContext, Pending, RequestData, Task, TensorContract,
};
use crate::error::BackendError;
use crate::generation::decoder::DecoderBinding;
use crate::generation::llm_io::{
    self, EXCLUDE_INPUT_IN_OUTPUT, FINISH_REASON, NUM_INPUT_TOKENS, NUM_OUTPUT_TOKENS,
    RETURN_FINISH_REASON, RETURN_NUM_INPUT_TOKENS, RETURN_NUM_OUTPUT_TOKENS, ResponseOptions,
    SAMPLING_PARAMETERS,
};
use crate::generation::params::{ConfigDefaults, GenerationParams};
use crate::generation::scheduler::{BatchLimits, DecodeLoop};
use crate::generation::{
    DEFAULT_LIMITS, DEFAULT_MAX_PROMPTS, GENERATED_TEXT, GenerationObserver, GenerationRequest,
    Generator, MAX_PROMPTS, MAX_SEQUENCES, ResponseMode, STREAM_INPUT, TEXT_OUTPUT,
};
use crate::generation_metrics::GenerationMetrics;
use crate::memory;
use crate::onnx::{Device, OnnxModel};
use crate::settings::{
    SessionSettings, SettingsGroup, TextSettings, flag, non_empty, positive_at_most,
};
use crate::text::TEXT_INPUT;
use crate::tokenize::{DEFAULT_MAX_SEQUENCE_LENGTH, TOKENIZER_FILE, load_tokenizer};
use crate::types::MemoryUsage;

/// A required tensor.
const fn required(name: &'static str, data_type: &'static str) -> Contract {
    Contract {
        name,
        data_type,
        required: true,
    }
}

/// An optional tensor.
const fn optional(name: &'static str, data_type: &'static str) -> Contract {
    Contract {
        name,
        data_type,
        required: false,
    }
}

/// The inputs of Triton's vLLM backend besides the text, served by both kinds of model.
const LLM_INPUTS: [Contract; 5] = [
    optional(SAMPLING_PARAMETERS, "TYPE_STRING"),
    optional(EXCLUDE_INPUT_IN_OUTPUT, "TYPE_BOOL"),
    optional(RETURN_FINISH_REASON, "TYPE_BOOL"),
    optional(RETURN_NUM_INPUT_TOKENS, "TYPE_BOOL"),
    optional(RETURN_NUM_OUTPUT_TOKENS, "TYPE_BOOL"),
];
const LLM_OUTPUTS: [Contract; 3] = [
    optional(FINISH_REASON, "TYPE_STRING"),
    optional(NUM_INPUT_TOKENS, "TYPE_UINT32"),
    optional(NUM_OUTPUT_TOKENS, "TYPE_UINT32"),
];

const WHOLE_INPUTS: &[Contract] = &[
    required(TEXT_INPUT, "TYPE_STRING"),
    LLM_INPUTS[0],
    LLM_INPUTS[1],
    LLM_INPUTS[2],
    LLM_INPUTS[3],
    LLM_INPUTS[4],
];
const WHOLE_OUTPUTS: &[Contract] = &[
    required(GENERATED_TEXT, "TYPE_STRING"),
    LLM_OUTPUTS[0],
    LLM_OUTPUTS[1],
    LLM_OUTPUTS[2],
];
const STREAMING_INPUTS: &[Contract] = &[
    required(TEXT_INPUT, "TYPE_STRING"),
    optional(STREAM_INPUT, "TYPE_BOOL"),
    LLM_INPUTS[0],
    LLM_INPUTS[1],
    LLM_INPUTS[2],
    LLM_INPUTS[3],
    LLM_INPUTS[4],
];
const STREAMING_OUTPUTS: &[Contract] = &[
    required(TEXT_OUTPUT, "TYPE_STRING"),
    LLM_OUTPUTS[0],
    LLM_OUTPUTS[1],
    LLM_OUTPUTS[2],
];

fn default_max_prompts() -> usize {
    DEFAULT_MAX_PROMPTS
}

fn enabled() -> bool {
    true
}

fn default_max_sequences() -> usize {
    DEFAULT_LIMITS.max_sequences
}

fn default_max_tokens() -> usize {
    DEFAULT_LIMITS.max_tokens
}

/// What the decoder needs besides sampling defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct DecoderSettings {
    /// The token that ends generation (default `<|endoftext|>`).
    #[serde(default, deserialize_with = "non_empty")]
    pub eos_token: Option<String>,
    /// How many prompts one request may hold (each costs its own KV cache).
    #[serde(
        default = "default_max_prompts",
        deserialize_with = "positive_at_most::<4096, _>"
    )]
    pub max_prompts_per_request: usize,
    /// "false" re-runs the whole sequence at every step (a baseline).
    #[serde(default = "enabled", deserialize_with = "flag")]
    pub use_cache: bool,
    /// Sequences (prompts) an instance runs at once; 1 runs one request at a time.
    #[serde(
        default = "default_max_sequences",
        deserialize_with = "positive_at_most::<4096, _>"
    )]
    pub max_sequences_in_flight: usize,
    /// Cache positions an instance's running batch may hold (sequences × the longest
    /// one's reach): the bound on its KV cache memory.
    #[serde(
        default = "default_max_tokens",
        deserialize_with = "positive_at_most::<16777216, _>"
    )]
    pub max_tokens_in_flight: usize,
}

impl SettingsGroup for DecoderSettings {}

/// One instance: the decode thread, which owns the decoder's session.
pub struct GenerationInstance {
    decode: DecodeLoop,
    device: Device,
}

pub struct TextGeneration {
    generator: Arc<Generator>,
    model: OnnxModel,
    /// The version's generation metrics, shared by its decode loops.
    metrics: Option<Arc<dyn GenerationObserver>>,
}

impl Task for TextGeneration {
    const NAME: &'static str = "text-generation";
    type Settings = (
        SessionSettings,
        TextSettings,
        DecoderSettings,
        ConfigDefaults,
    );
    type Instance = GenerationInstance;
    type Request = GenerationRequest;

    fn contract(decoupled: bool) -> Option<TensorContract> {
        Some(if decoupled {
            TensorContract {
                inputs: STREAMING_INPUTS,
                outputs: STREAMING_OUTPUTS,
            }
        } else {
            TensorContract {
                inputs: WHOLE_INPUTS,
                outputs: WHOLE_OUTPUTS,
            }
        })
    }

    fn load(model: &ModelContext<'_>, settings: Self::Settings) -> Result<Self, BackendError> {
        let (session, text, decoder, defaults) = settings;
        if decoder.max_prompts_per_request > decoder.max_sequences_in_flight {
            return Err(BackendError::Config(format!(
                "'{MAX_PROMPTS}' is {} but '{MAX_SEQUENCES}' is {}: a request with that many \
                 prompts could never run",
                decoder.max_prompts_per_request, decoder.max_sequences_in_flight
            )));
        }
        let onnx = model.onnx_model(session)?;
        let context_length = text
            .max_sequence_length
            .unwrap_or(DEFAULT_MAX_SEQUENCE_LENGTH);
        let defaults = GenerationParams::from_config(&defaults.0, context_length)?;
        let mode = if model.config.decoupled() {
            ResponseMode::Decoupled
        } else {
            ResponseMode::Whole
        };
        let generator = Generator::new(
            load_tokenizer(&model.version_dir.join(TOKENIZER_FILE))?,
            decoder.eos_token.as_deref(),
            context_length,
            defaults,
        )?
        .with_mode(mode)
        .with_max_prompts(decoder.max_prompts_per_request)
        .with_max_text_bytes(text.max_text_bytes)
        .with_cache(decoder.use_cache)
        .with_limits(BatchLimits {
            max_sequences: decoder.max_sequences_in_flight,
            max_tokens: decoder.max_tokens_in_flight,
        });
        let metrics = GenerationMetrics::new(model.name, model.version)
            .inspect_err(|error| crate::log_warn!("triton-rust: no generation metrics: {error}"))
            .ok()
            .map(|metrics| Arc::new(metrics) as Arc<dyn GenerationObserver>);
        Ok(TextGeneration {
            generator: Arc::new(generator),
            model: onnx,
            metrics,
        })
    }

    fn instance(&self, instance: &InstanceContext) -> Result<GenerationInstance, BackendError> {
        let mut session = self.model.session(instance.device)?;
        let mut binding = DecoderBinding::new(
            &session,
            &self.model.environment,
            self.model.options(instance.device),
        )?;
        self.generator.probe(&mut session, &mut binding)?;
        Ok(GenerationInstance {
            decode: DecodeLoop::start(
                &instance.name,
                Arc::clone(&self.generator),
                session,
                binding,
                self.metrics.clone(),
            )?,
            device: instance.device,
        })
    }

    fn prepare(&self, mut request: RequestData<'_>) -> Result<GenerationRequest, BackendError> {
        let text = request.inputs.remove(TEXT_INPUT).ok_or_else(|| {
            BackendError::InvalidInput(format!("input '{TEXT_INPUT}' is required"))
        })?;
        let stream = request.inputs.remove(STREAM_INPUT);
        let parameters = match request.inputs.remove(SAMPLING_PARAMETERS) {
            Some(sampling) => {
                let fields = llm_io::sampling_parameters(&sampling)?;
                for field in &fields {
                    self.generator
                        .check_parameters(&field.parameters)
                        .map_err(|error| field.error(error))?;
                }
                llm_io::merge(&request.parameters, fields)?
            }
            None => request.parameters,
        };
        let mut flag = |name: &str| match request.inputs.remove(name) {
            Some(input) => llm_io::read_flag(name, &input),
            None => Ok(false),
        };
        let wanted = |output: &str| request.requested_outputs.iter().any(|o| o == output);
        let options = ResponseOptions {
            exclude_input: flag(EXCLUDE_INPUT_IN_OUTPUT)?,
            finish_reason: flag(RETURN_FINISH_REASON)? && wanted(FINISH_REASON),
            input_tokens: flag(RETURN_NUM_INPUT_TOKENS)? && wanted(NUM_INPUT_TOKENS),
            output_tokens: flag(RETURN_NUM_OUTPUT_TOKENS)? && wanted(NUM_OUTPUT_TOKENS),
        };
        self.generator
            .prepare(&text, stream.as_ref(), &parameters, options)
    }

    fn rows(request: &GenerationRequest) -> usize {
        request.rows()
    }

    fn execute(&self, instance: &mut GenerationInstance, batch: Vec<Pending<GenerationRequest>>) {
        instance.decode.submit(batch);
    }

    fn memory_usage(&self) -> Vec<MemoryUsage> {
        let mut usage = vec![memory::tokenizer_usage(self.generator.tokenizer())];
        usage.extend(self.model.memory_usage());
        usage
    }

    fn instance_memory_usage(
        &self,
        instance: &GenerationInstance,
    ) -> Result<Vec<MemoryUsage>, BackendError> {
        Ok(vec![self.model.instance_memory_usage(instance.device)?])
    }
}
