//! How a task answers one request, without knowing Triton: whole responses, or a
//! stream of responses (decoupled models) ended by a final one. `model.rs` implements
//! [`Responder`] over Triton's response factories; [`CollectingResponder`] keeps the
//! responses in memory (unit tests, benchmarks).

use std::sync::{Arc, Mutex};

use crate::error::BackendError;
use crate::types::{DataType, OutputTensor, ParameterValue, element_count};

/// Where a task writes the outputs of one response.
pub trait OutputWriter {
    /// Adds output `name` of `byte_size` bytes and returns its buffer, for the task to
    /// fill in place (in Triton's response memory, without a second copy).
    fn buffer(
        &mut self,
        name: &str,
        datatype: DataType,
        shape: &[i64],
        byte_size: usize,
    ) -> Result<&mut [u8], BackendError>;

    /// Adds a response parameter (KServe `parameters` of the response).
    fn parameter(&mut self, key: &str, value: &ParameterValue) -> Result<(), BackendError>;
}

impl dyn OutputWriter + '_ {
    /// Adds a finished tensor (outputs whose size is known only once computed).
    pub fn tensor(&mut self, tensor: &OutputTensor) -> Result<(), BackendError> {
        self.buffer(
            &tensor.name,
            tensor.datatype,
            &tensor.shape,
            tensor.data.len(),
        )?
        .copy_from_slice(&tensor.data);
        Ok(())
    }

    /// Adds an FP32 output of `shape` holding `values`, which must be as many as the
    /// shape says.
    pub fn f32s(
        &mut self,
        name: &str,
        shape: &[i64],
        values: impl IntoIterator<Item = f32>,
    ) -> Result<(), BackendError> {
        let count = element_count(name, shape)
            .map_err(|_| BackendError::internal(format!("output '{name}' has shape {shape:?}")))?;
        let buffer = self.buffer(name, DataType::Fp32, shape, count * 4)?;
        let mut written = 0;
        for (slot, value) in buffer.chunks_exact_mut(4).zip(values) {
            slot.copy_from_slice(&value.to_le_bytes());
            written += 1;
        }
        if written != count {
            return Err(BackendError::internal(format!(
                "output '{name}' of shape {shape:?} got {written} values"
            )));
        }
        Ok(())
    }
}

/// Writes one response's outputs.
pub type WriteOutputs<'w> = &'w mut dyn FnMut(&mut dyn OutputWriter) -> Result<(), BackendError>;

/// Answers one request. Implementations log their own failures (the task only learns
/// that a stream cannot go on).
pub trait Responder: Send {
    /// Whether the client cancelled the request (or went away).
    fn is_cancelled(&self) -> bool;

    /// Sends one response with the outputs `write` adds; `last` ends the request. When
    /// `write` fails, a last response carries that error instead; a piece of a stream
    /// that fails is not sent, and the error is returned (the caller ends the stream).
    fn respond(&mut self, last: bool, write: WriteOutputs<'_>) -> Result<(), BackendError>;

    /// Ends the request with an error.
    fn fail(&mut self, error: &BackendError);

    /// Ends a stream without one more response (decoupled models whose last piece was
    /// already sent).
    fn end(&mut self);
}

/// A prepared request waiting in a batch, and who answers it.
pub struct Pending<R> {
    pub request: R,
    pub responder: Box<dyn Responder>,
}

/// Sends a final response holding `outputs` (a responder reports its own failures:
/// there is nothing more the task can do about them).
pub fn respond_with(responder: &mut dyn Responder, outputs: &[OutputTensor]) {
    let _reported = responder.respond(true, &mut |writer| {
        outputs.iter().try_for_each(|output| writer.tensor(output))
    });
}

/// What a [`CollectingResponder`] received.
#[derive(Debug, Default)]
pub struct Collected {
    /// Every response, in order; the last one ends the request.
    pub responses: Vec<Vec<OutputTensor>>,
    /// Every response's parameters, in the same order.
    pub parameters: Vec<Vec<(String, ParameterValue)>>,
    pub error: Option<String>,
    pub finished: bool,
}

/// A responder that keeps what it is sent (for tests and benchmarks).
#[derive(Debug, Clone, Default)]
pub struct CollectingResponder {
    pub collected: Arc<Mutex<Collected>>,
    pub cancelled: bool,
}

#[derive(Default)]
struct MemoryWriter {
    outputs: Vec<OutputTensor>,
    parameters: Vec<(String, ParameterValue)>,
}

impl OutputWriter for MemoryWriter {
    fn buffer(
        &mut self,
        name: &str,
        datatype: DataType,
        shape: &[i64],
        byte_size: usize,
    ) -> Result<&mut [u8], BackendError> {
        self.outputs.push(OutputTensor {
            name: name.to_owned(),
            datatype,
            shape: shape.to_vec(),
            data: vec![0; byte_size],
        });
        Ok(self
            .outputs
            .last_mut()
            .map_or(&mut [], |t| t.data.as_mut_slice()))
    }

    fn parameter(&mut self, key: &str, value: &ParameterValue) -> Result<(), BackendError> {
        self.parameters.push((key.to_owned(), value.clone()));
        Ok(())
    }
}

impl Responder for CollectingResponder {
    fn is_cancelled(&self) -> bool {
        self.cancelled
    }

    fn respond(&mut self, last: bool, write: WriteOutputs<'_>) -> Result<(), BackendError> {
        let mut writer = MemoryWriter::default();
        let written = write(&mut writer);
        let mut collected = self.collected.lock().unwrap_or_else(|e| e.into_inner());
        if collected.finished {
            return Err(BackendError::internal(
                "the request already has its final response",
            ));
        }
        match written {
            Ok(()) => {
                collected.responses.push(writer.outputs);
                collected.parameters.push(writer.parameters);
            }
            Err(error) if last => collected.error = Some(error.to_string()),
            Err(error) => return Err(error),
        }
        collected.finished = last;
        Ok(())
    }

    fn fail(&mut self, error: &BackendError) {
        let mut collected = self.collected.lock().unwrap_or_else(|e| e.into_inner());
        collected.error = Some(error.to_string());
        collected.finished = true;
    }

    fn end(&mut self) {
        self.collected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .finished = true;
    }
}
