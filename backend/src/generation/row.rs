//! A prompt on its way through the running batch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand_chacha::ChaCha8Rng;

use super::params::GenerationParams;
use super::text_stream::TextStream;

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The end-of-text token or a stop string.
    Stop,
    /// `max_new_tokens`, or the model's context.
    Length,
    /// Its request was cancelled, or failed.
    Abort,
}

/// What a running batch reports as it goes (Triton's metrics, in the server).
pub trait GenerationObserver: Send + Sync {
    /// Sequences joined the running batch with `prompt_tokens` tokens in all.
    fn joined(&self, sequences: usize, prompt_tokens: usize);
    /// A request's first token came `after` the backend received it.
    fn first_token(&self, after: Duration);
    /// A sequence made a token; `gap`: the time since its previous one (none for its
    /// first).
    fn token(&self, gap: Option<Duration>);
    /// A sequence left the running batch: it ended for `reason`, or failed (`None`).
    fn left(&self, reason: Option<FinishReason>);
}

pub(super) struct Row<'g> {
    /// The request this prompt came from, and the prompt's index in it.
    pub request: u64,
    pub index: usize,
    pub prompt: Vec<i64>,
    pub params: Arc<GenerationParams>,
    /// The request's own generator: seeded by its `seed` (plus the prompt's index), or
    /// from the operating system.
    pub rng: ChaCha8Rng,
    pub generated: Vec<i64>,
    /// Only rows that stream or watch for stop strings decode as they go; the others
    /// decode their tokens once, at the end.
    pub text: Option<TextStream<'g>>,
    /// Masked columns on the left of this row's part of the batch's cache.
    pub padding: usize,
    /// When its latest token was chosen.
    pub last_token_at: Option<Instant>,
    /// Set once the row has ended; it is answered at the next settle.
    pub finished: Option<FinishReason>,
    /// Steps since the row ended and was answered, while its cache row waits for the
    /// next merge to drop it (see [`super::batch`]); `None` while it runs.
    pub vacant_for: Option<usize>,
}

impl Row<'_> {
    /// The tokens the decoder has seen or will see next: prompt, then generated.
    pub fn length(&self) -> usize {
        self.prompt.len() + self.generated.len()
    }

    pub fn is_vacant(&self) -> bool {
        self.vacant_for.is_some()
    }
}
