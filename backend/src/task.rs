//! One enum over the tasks, so the execute loop in `model.rs` stays task-agnostic.

use std::collections::HashMap;
use std::path::Path;

use ort::environment::Environment;
use ort::session::Session;
use tokenizers::Tokenizer;

use crate::config::{EOS_TOKEN, ModelConfig, ModelSettings, TaskKind};
use crate::error::BackendError;
use crate::generation::{
    DEFAULT_MAX_PROMPTS, DecoderBinding, GENERATED_TEXT, GenerationParams, GenerationProgress,
    GenerationRequest, Generator, MAX_PROMPTS, ResponseMode, STREAM_INPUT, TEXT_OUTPUT, USE_CACHE,
};
use crate::onnx::SessionOptions;
use crate::pipeline::{
    Contract, OutputTensor, Pipeline, PreparedRequest, SessionBinding, TEXT_INPUT, check_contracts,
};
use crate::tokenize::{DEFAULT_MAX_SEQUENCE_LENGTH, TextEncoder, load_tokenizer};
use crate::triton::{InputTensor, ParameterValue};

const GENERATION_INPUTS: &[Contract] = &[Contract {
    name: TEXT_INPUT,
    data_type: "TYPE_STRING",
    required: true,
}];
const GENERATION_OUTPUTS: &[Contract] = &[Contract {
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

/// The model logic of a loaded model version.
pub enum TaskLogic {
    Encoder(Pipeline),
    Generation(Generator),
}

/// How one instance's session feeds its task.
pub enum TaskBinding {
    Encoder(SessionBinding),
    Generation(DecoderBinding),
}

/// One request, validated for its task.
pub enum TaskRequest {
    Encoder(PreparedRequest),
    Generation(GenerationRequest),
}

impl TaskRequest {
    /// Sequences this request adds to the batch.
    pub fn rows(&self) -> usize {
        match self {
            TaskRequest::Encoder(request) => request.rows(),
            TaskRequest::Generation(request) => request.rows(),
        }
    }
}

fn mismatch() -> BackendError {
    BackendError::Onnx("a request was prepared for another task".into())
}

impl TaskLogic {
    pub fn new(
        config: &ModelConfig,
        settings: &ModelSettings,
        tokenizer_path: &Path,
    ) -> Result<Self, BackendError> {
        if settings.task != TaskKind::TextGeneration {
            let text = TextEncoder::from_file(
                tokenizer_path,
                settings.max_sequence_length,
                settings.pad_token.as_deref(),
            )?;
            return Ok(TaskLogic::Encoder(Pipeline::new(config, settings, text)?));
        }
        let task = settings.task.name();
        let (mode, inputs, outputs) = if config.decoupled {
            (ResponseMode::Decoupled, STREAMING_INPUTS, STREAMING_OUTPUTS)
        } else {
            (ResponseMode::Whole, GENERATION_INPUTS, GENERATION_OUTPUTS)
        };
        check_contracts("input", &config.inputs, inputs, task)?;
        check_contracts("output", &config.outputs, outputs, task)?;
        let max_prompts = match config.parameters.get(MAX_PROMPTS) {
            None => DEFAULT_MAX_PROMPTS,
            Some(text) => text.trim().parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                BackendError::Config(format!(
                    "parameter '{MAX_PROMPTS}' must be a positive integer, got '{text}'"
                ))
            })?,
        };
        let context_length = settings
            .max_sequence_length
            .unwrap_or(DEFAULT_MAX_SEQUENCE_LENGTH);
        let defaults = GenerationParams::from_config(&config.parameters, context_length)?;
        let eos_token = config.parameters.get(EOS_TOKEN).map(String::as_str);
        let use_cache = match config.parameters.get(USE_CACHE).map(|v| v.trim()) {
            None | Some("true") => true,
            Some("false") => false,
            Some(other) => {
                return Err(BackendError::Config(format!(
                    "parameter '{USE_CACHE}' must be true or false, got '{other}'"
                )));
            }
        };
        Ok(TaskLogic::Generation(
            Generator::new(
                load_tokenizer(tokenizer_path)?,
                eos_token,
                context_length,
                defaults,
            )?
            .with_mode(mode)
            .with_max_prompts(max_prompts)
            .with_max_text_bytes(settings.max_text_bytes)
            .with_cache(use_cache),
        ))
    }

    /// The tokenizer of this model version.
    pub fn tokenizer(&self) -> &Tokenizer {
        match self {
            TaskLogic::Encoder(pipeline) => pipeline.text_encoder().tokenizer(),
            TaskLogic::Generation(generator) => generator.tokenizer(),
        }
    }

    /// How an instance's session (built with `options`) feeds this task.
    pub fn bind(
        &self,
        session: &Session,
        environment: &Environment,
        options: SessionOptions,
    ) -> Result<TaskBinding, BackendError> {
        Ok(match self {
            TaskLogic::Encoder(pipeline) => TaskBinding::Encoder(pipeline.bind_session(session)?),
            TaskLogic::Generation(_) => {
                TaskBinding::Generation(DecoderBinding::new(session, environment, options)?)
            }
        })
    }

    pub fn prepare(
        &self,
        mut inputs: HashMap<String, InputTensor>,
        parameters: &[(String, ParameterValue)],
        wanted: Vec<String>,
    ) -> Result<TaskRequest, BackendError> {
        match self {
            TaskLogic::Encoder(pipeline) => {
                Ok(TaskRequest::Encoder(pipeline.prepare(inputs, wanted)?))
            }
            TaskLogic::Generation(generator) => {
                let text = inputs.remove(TEXT_INPUT).ok_or_else(|| {
                    BackendError::InvalidInput(format!("input '{TEXT_INPUT}' is required"))
                })?;
                let stream = inputs.remove(STREAM_INPUT);
                Ok(TaskRequest::Generation(generator.prepare(
                    &text,
                    stream.as_ref(),
                    parameters,
                )?))
            }
        }
    }

    /// Runs all requests of one execution as one batch; generation stops work for
    /// cancelled requests and streams text through `progress`.
    pub fn run(
        &self,
        session: &mut Session,
        binding: &mut TaskBinding,
        requests: Vec<TaskRequest>,
        progress: &mut dyn GenerationProgress,
    ) -> Result<Vec<Vec<OutputTensor>>, BackendError> {
        match (self, binding) {
            (TaskLogic::Encoder(pipeline), TaskBinding::Encoder(binding)) => {
                let requests = requests
                    .into_iter()
                    .map(|r| match r {
                        TaskRequest::Encoder(r) => Ok(r),
                        TaskRequest::Generation(_) => Err(mismatch()),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                pipeline.run(session, binding, &requests)
            }
            (TaskLogic::Generation(generator), TaskBinding::Generation(binding)) => {
                let requests = requests
                    .into_iter()
                    .map(|r| match r {
                        TaskRequest::Generation(r) => Ok(r),
                        TaskRequest::Encoder(_) => Err(mismatch()),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                generator.run(session, binding, &requests, progress)
            }
            _ => Err(mismatch()),
        }
    }
}
