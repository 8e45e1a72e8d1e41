//! A prompt on its way through the decode loop.

use rand_chacha::ChaCha8Rng;

use super::params::GenerationParams;
use super::text_stream::TextStream;

pub(super) struct Row<'g> {
    /// Index of the request this prompt came from.
    pub request: usize,
    pub prompt: &'g [i64],
    pub params: &'g GenerationParams,
    /// The request's own generator: seeded by its `seed` (plus the prompt's index), or
    /// from the operating system.
    pub rng: ChaCha8Rng,
    pub generated: Vec<i64>,
    /// Only rows that stream or watch for stop strings decode as they go; the others
    /// decode their tokens once, at the end.
    pub text: Option<TextStream<'g>>,
    pub finished: bool,
}
