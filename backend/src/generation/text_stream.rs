//! A row's continuation as text while it is generated: decoded token by token so a
//! multi-byte character is never split, with stop strings found as soon as they appear
//! and text that could begin one held back from the stream.

use tokenizers::{
    DecodeStream, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, Tokenizer,
};

use crate::error::BackendError;

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
pub(super) struct TextStream<'t> {
    decoder: TokenDecoder<'t>,
    text: String,
    /// Bytes of `text` already sent to the client.
    sent: usize,
    /// Where the first stop string begins, once one has appeared.
    stop_at: Option<usize>,
}

impl<'t> TextStream<'t> {
    pub(super) fn new(tokenizer: &'t Tokenizer) -> Self {
        TextStream {
            decoder: tokenizer.decode_stream(true),
            text: String::new(),
            sent: 0,
            stop_at: None,
        }
    }

    /// Adds one generated token; returns whether a stop string has appeared.
    pub(super) fn push(&mut self, token: i64, stop: &[String]) -> Result<bool, BackendError> {
        let token = u32::try_from(token)
            .map_err(|_| BackendError::internal(format!("the model chose token id {token}")))?;
        let piece = self
            .decoder
            .step(token)
            .map_err(|e| BackendError::tokenizer("cannot decode a generated token", e))?;
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
    pub(super) fn take_ready(&mut self, stop: &[String]) -> String {
        let end = self
            .stop_at
            .unwrap_or_else(|| self.text.len() - possible_stop_start(&self.text, stop))
            .max(self.sent);
        let ready = self.text[self.sent..end].to_owned();
        self.sent = end;
        ready
    }

    /// What `continuation` (the row's final text) adds to the text already sent.
    pub(super) fn unsent_part_of<'c>(&self, continuation: &'c str) -> &'c str {
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
pub(super) fn cut_at_stop<'t>(text: &'t str, stop: &[String]) -> &'t str {
    let end = stop
        .iter()
        .filter_map(|s| text.find(s.as_str()))
        .min()
        .unwrap_or(text.len());
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    proptest! {
        /// Untrusted stop strings over generated text (any Unicode): the incremental
        /// search finds what a plain search finds, and nothing panics on a character
        /// boundary.
        #[test]
        fn stop_search_agrees_with_a_plain_search(
            // A small alphabet, with multi-byte characters, so that matches are common.
            text in "[aé東 ]{0,24}",
            stop in proptest::collection::vec("[aé東]{1,3}", 1..4),
            searched in 0usize..32,
        ) {
            // A match that ends in the searched part is found wherever it starts.
            let searched = (0..=searched.min(text.len()))
                .rev()
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(0);
            let ends_after = stop.iter().any(|s| {
                text.match_indices(s.as_str()).any(|(at, _)| at + s.len() > searched)
            });
            let found = find_stop(&text, searched, &stop);
            if ends_after {
                prop_assert!(found.is_some());
            }
            if let Some(at) = found {
                prop_assert!(stop.iter().any(|s| text[at..].starts_with(s.as_str())));
            }
            let held = possible_stop_start(&text, &stop);
            prop_assert!(text.is_char_boundary(text.len() - held));
            let plain = stop.iter().filter_map(|s| text.find(s.as_str())).min();
            prop_assert_eq!(find_stop(&text, 0, &stop), plain);
            let cut = cut_at_stop(&text, &stop);
            prop_assert!(text.starts_with(cut));
            prop_assert!(!stop.iter().any(|s| cut.contains(s.as_str())));
        }
    }
}
