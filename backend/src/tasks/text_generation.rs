//! `text-generation`: prompts in, the prompt and its continuation out (one response),
//! or, for decoupled models, the continuation streamed as it is decoded.

use ort::session::Session;
use serde::Deserialize;

use super::task::{
    Contract, InstanceContext, ModelContext, Pending, RequestData, Task, TensorContract, fail_all,
    unzip_batch,
};
use crate::error::BackendError;
use crate::generation::decoder::DecoderBinding;
use crate::generation::params::{ConfigDefaults, GenerationParams};
use crate::generation::{
    DEFAULT_MAX_PROMPTS, GENERATED_TEXT, GenerationRequest, Generator, ResponseMode, STREAM_INPUT,
    TEXT_OUTPUT,
};
use crate::memory;
use crate::onnx::{Device, OnnxModel};
use crate::responder::{Responder, respond_with};
use crate::settings::{
    SessionSettings, SettingsGroup, TextSettings, flag, non_empty, positive_at_most,
};
use crate::text::TEXT_INPUT;
use crate::tokenize::{DEFAULT_MAX_SEQUENCE_LENGTH, TOKENIZER_FILE, load_tokenizer};
use crate::types::MemoryUsage;

const WHOLE_INPUTS: &[Contract] = &[Contract {
    name: TEXT_INPUT,
    data_type: "TYPE_STRING",
    required: true,
}];
const WHOLE_OUTPUTS: &[Contract] = &[Contract {
    name: GENERATED_TEXT,
    data_type: "TYPE_STRING",
    required: true,
}];
const STREAMING_INPUTS: &[Contract] = &[
    Contract {
        name: TEXT_INPUT,
        data_type: "TYPE_STRING",
        required: true,
    },
    Contract {
        name: STREAM_INPUT,
        data_type: "TYPE_BOOL",
        required: false,
    },
];
const STREAMING_OUTPUTS: &[Contract] = &[Contract {
    name: TEXT_OUTPUT,
    data_type: "TYPE_STRING",
    required: true,
}];

fn default_max_prompts() -> usize {
    DEFAULT_MAX_PROMPTS
}

fn enabled() -> bool {
    true
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
}

impl SettingsGroup for DecoderSettings {}

/// One instance: the decoder's session and its binding.
pub struct GenerationInstance {
    session: Session,
    binding: DecoderBinding,
    device: Device,
}

pub struct TextGeneration {
    generator: Generator,
    model: OnnxModel,
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
        let onnx = OnnxModel::open(model.onnxruntime, model.version_dir, session)?;
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
        .with_cache(decoder.use_cache);
        Ok(TextGeneration {
            generator,
            model: onnx,
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
            session,
            binding,
            device: instance.device,
        })
    }

    fn prepare(&self, mut request: RequestData<'_>) -> Result<GenerationRequest, BackendError> {
        let text = request.inputs.remove(TEXT_INPUT).ok_or_else(|| {
            BackendError::InvalidInput(format!("input '{TEXT_INPUT}' is required"))
        })?;
        let stream = request.inputs.remove(STREAM_INPUT);
        self.generator
            .prepare(&text, stream.as_ref(), &request.parameters)
    }

    fn rows(request: &GenerationRequest) -> usize {
        request.rows()
    }

    fn execute(&self, instance: &mut GenerationInstance, batch: Vec<Pending<GenerationRequest>>) {
        let (requests, mut responders) = unzip_batch(batch);
        let mut answering: Vec<&mut dyn Responder> = responders
            .iter_mut()
            .map(|r| &mut **r as &mut dyn Responder)
            .collect();
        let generated = self.generator.run(
            &mut instance.session,
            &mut instance.binding,
            &requests,
            &mut answering,
        );
        match generated {
            Ok(outputs) => {
                for (responder, outputs) in answering.into_iter().zip(outputs) {
                    respond_with(responder, &outputs);
                }
            }
            Err(error) => fail_all(&mut responders, &error),
        }
    }

    fn memory_usage(&self) -> Vec<MemoryUsage> {
        vec![memory::tokenizer_usage(self.generator.tokenizer())]
    }

    fn instance_memory_usage(
        &self,
        instance: &GenerationInstance,
    ) -> Result<Vec<MemoryUsage>, BackendError> {
        Ok(vec![memory::session_weights(
            &self.model.path,
            instance.device,
        )?])
    }
}
