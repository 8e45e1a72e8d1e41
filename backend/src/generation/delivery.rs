//! Responses sent from a thread of their own, so the decode loop does not wait on the
//! server's response path: a streamed piece costs a response, its output buffer and
//! the frontend's serialization, and a batch sends one per row at every step. Each
//! request's responses leave in the order the loop produced them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::GENERATED_TOKENS;
use crate::error::BackendError;
use crate::responder::Responder;
use crate::types::{OutputTensor, ParameterValue};

/// Who answers one request, shared by the decode loop and the delivery thread.
pub(super) struct Recipient {
    responder: Mutex<Box<dyn Responder>>,
    /// The request was answered with an error (a piece that could not be sent, or a
    /// failure): it generates no further.
    broken: AtomicBool,
}

impl Recipient {
    pub fn new(responder: Box<dyn Responder>) -> Arc<Self> {
        Arc::new(Recipient {
            responder: Mutex::new(responder),
            broken: AtomicBool::new(false),
        })
    }

    fn responder(&self) -> MutexGuard<'_, Box<dyn Responder>> {
        self.responder.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the request should stop: cancelled by its client, or already failed.
    pub fn should_stop(&self) -> bool {
        self.is_broken() || self.responder().is_cancelled()
    }

    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Ends the request with `error`, at once.
    pub fn fail(&self, error: &BackendError) {
        self.broken.store(true, Ordering::Release);
        self.responder().fail(error);
    }

    /// Sends one response: a piece of a stream, or the final one (with the count of
    /// generated tokens). A piece that cannot be sent fails the request.
    fn deliver(&self, letter: &Letter) {
        let mut responder = self.responder();
        let tokens = letter
            .generated_tokens
            .map(|tokens| ParameterValue::Int(i64::try_from(tokens).unwrap_or(i64::MAX)));
        let sent = responder.respond(letter.generated_tokens.is_some(), &mut |writer| {
            writer.tensor(&letter.text)?;
            for output in &letter.outputs {
                writer.tensor(output)?;
            }
            match &tokens {
                Some(tokens) => writer.parameter(GENERATED_TOKENS, tokens),
                None => Ok(()),
            }
        });
        if let (Err(error), None) = (sent, letter.generated_tokens) {
            self.broken.store(true, Ordering::Release);
            responder.fail(&error);
        }
    }
}

/// One response to send.
pub(super) struct Letter {
    pub to: Arc<Recipient>,
    pub text: OutputTensor,
    /// Set on the final response: new tokens made for all the request's prompts.
    pub generated_tokens: Option<usize>,
    /// More outputs of the final response (see `llm_io`).
    pub outputs: Vec<OutputTensor>,
}

/// Where the decode loop posts responses: to the delivery thread, or (for a probe run
/// on the caller's thread) sent at once.
pub(super) struct Outbox {
    queue: Option<Sender<Letter>>,
    thread: Option<JoinHandle<()>>,
}

impl Outbox {
    /// Starts the delivery thread named after `instance`.
    pub fn threaded(instance: &str) -> Result<Self, BackendError> {
        let (queue, letters) = mpsc::channel::<Letter>();
        let thread = std::thread::Builder::new()
            .name(format!("respond {instance}"))
            .spawn(move || {
                for letter in letters {
                    letter.to.deliver(&letter);
                }
            })
            .map_err(|e| {
                BackendError::internal(format!("cannot start the response thread: {e}"))
            })?;
        Ok(Outbox {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    /// Sends every response on the caller's thread.
    pub fn inline() -> Self {
        Outbox {
            queue: None,
            thread: None,
        }
    }

    pub fn post(&self, letter: Letter) {
        match &self.queue {
            Some(queue) => {
                if let Err(mpsc::SendError(letter)) = queue.send(letter) {
                    letter.to.deliver(&letter);
                }
            }
            None => letter.to.deliver(&letter),
        }
    }
}

impl Drop for Outbox {
    /// Sends what is queued, then stops the thread.
    fn drop(&mut self) {
        self.queue = None;
        if let Some(thread) = self.thread.take() {
            let _finished = thread.join();
        }
    }
}
