//! Tokenization and batch padding, independent of Triton and ONNX Runtime.

use std::path::Path;

use tokenizers::{Encoding, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::BackendError;

/// The tokenizer file of a model version.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Used when neither the configuration nor `tokenizer.json` bounds the length.
pub const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 512;

/// Pad tokens tried, in order, when neither the configuration nor the tokenizer's own
/// padding names one.
const WELL_KNOWN_PAD_TOKENS: &[&str] = &["<pad>", "[PAD]", "<|endoftext|>"];

/// Loads a `tokenizer.json`, naming the file in every error.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, BackendError> {
    if !path.is_file() {
        return Err(BackendError::ModelFile(format!(
            "tokenizer file {} does not exist",
            path.display()
        )));
    }
    Tokenizer::from_file(path)
        .map_err(|e| BackendError::tokenizer(format!("cannot load {}", path.display()), e))
}

/// One tokenized sequence: ids, attention mask and token type ids of equal length.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenRow {
    pub ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub type_ids: Vec<i64>,
}

/// Rows padded on the right to a common length, row-major `[batch, sequence]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaddedBatch {
    pub batch: usize,
    pub sequence: usize,
    pub ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub type_ids: Vec<i64>,
}

/// Pads rows to the longest one with `pad_id` (mask 0, type 0).
pub fn pad_batch(rows: &[&TokenRow], pad_id: i64) -> PaddedBatch {
    let sequence = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    let mut batch = PaddedBatch {
        batch: rows.len(),
        sequence,
        ids: Vec::with_capacity(rows.len() * sequence),
        attention_mask: Vec::with_capacity(rows.len() * sequence),
        type_ids: Vec::with_capacity(rows.len() * sequence),
    };
    for row in rows {
        let pad = sequence - row.ids.len();
        batch.ids.extend_from_slice(&row.ids);
        batch.ids.extend(std::iter::repeat_n(pad_id, pad));
        batch.attention_mask.extend_from_slice(&row.attention_mask);
        batch.attention_mask.extend(std::iter::repeat_n(0, pad));
        batch.type_ids.extend_from_slice(&row.type_ids);
        batch.type_ids.extend(std::iter::repeat_n(0, pad));
    }
    batch
}

/// Tokens an extra ONNX Runtime run is taken to cost when rows are grouped by length.
pub const RUN_COST_TOKENS: usize = 64;

/// Rows grouped by length so that padding does not dominate: in order of length, a row
/// starts a new group when padding the current group up to it would add more tokens
/// than `run_cost` (what one more run costs). Returns the row indices of each group,
/// shortest first; rows of similar lengths stay in one group.
pub fn length_groups(lengths: &[usize], run_cost: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&row| lengths[row]);
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for row in order {
        match groups.last_mut() {
            Some(group)
                if group.len() * (lengths[row] - lengths[group[group.len() - 1]]) <= run_cost =>
            {
                group.push(row);
            }
            _ => groups.push(vec![row]),
        }
    }
    groups
}

/// Which tokens of an over-long text a model keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeptTokens {
    /// The first ones, as the tokenizer's truncation keeps them (encoders).
    First(usize),
    /// The last ones (generation keeps the end of a prompt).
    Last(usize),
}

/// Bytes first tokenized per kept token: several times what English, code or CJK text
/// takes per token (2 to 5 bytes), so one pass nearly always suffices.
const WINDOW_BYTES_PER_TOKEN: usize = 16;

impl KeptTokens {
    fn count(self) -> usize {
        match self {
            KeptTokens::First(count) | KeptTokens::Last(count) => count,
        }
    }

    /// The kept end of `text`, at most `window` bytes of it (`window < text.len()`), cut
    /// where a word ends; `None` when no word ends within them.
    fn window(self, text: &str, window: usize) -> Option<&str> {
        match self {
            KeptTokens::First(_) => (1..=window)
                .rev()
                .find(|&at| word_ends_at(text, at))
                .map(|at| &text[..at]),
            KeptTokens::Last(_) => (text.len() - window..text.len())
                .find(|&at| word_ends_at(text, at))
                .map(|at| &text[at..]),
        }
    }
}

/// Whether `text[at]` is an ASCII whitespace right after a character that is neither
/// whitespace nor a control: whitespace-splitting pre-tokenizers (GPT-2's byte-level
/// regex, BERT's) split there whatever surrounds it, so the tokens on either side are
/// those of the whole text. Inside a word they are not: byte-pair merges of a run such
/// as "xxxx…" pair from its start.
fn word_ends_at(text: &str, at: usize) -> bool {
    text.as_bytes().get(at).is_some_and(u8::is_ascii_whitespace)
        && text[..at]
            .chars()
            .next_back()
            .is_some_and(|c| !c.is_whitespace() && !c.is_control())
}

/// Tokens that came from the text (not added by the post-processor), truncated ones
/// included.
fn text_tokens(encoding: &Encoding) -> usize {
    std::iter::once(encoding)
        .chain(encoding.get_overflowing())
        .map(|part| {
            part.get_special_tokens_mask()
                .iter()
                .filter(|&&special| special == 0)
                .count()
        })
        .sum()
}

/// Encodes `text` with special tokens, tokenizing only the end of it that `kept` tokens
/// come from: a request of 64 texts of 1 MiB would otherwise hold the instance's thread
/// for many seconds (about half a second per MiB on this project's CI machine) when only
/// a few kilobytes of each matter.
///
/// The window starts at [`WINDOW_BYTES_PER_TOKEN`] bytes per kept token and doubles
/// until, cut where a word ends, it holds twice the kept tokens (a margin against added
/// tokens that absorb the space at the cut); the kept ones then come out as from the
/// whole text. A text with no word end near its kept end is tokenized whole.
pub fn encode_kept(
    tokenizer: &Tokenizer,
    text: &str,
    kept: KeptTokens,
) -> tokenizers::Result<Encoding> {
    let needed = kept.count().saturating_mul(2);
    let mut window = kept.count().saturating_mul(WINDOW_BYTES_PER_TOKEN).max(1);
    while window < text.len() {
        if let Some(part) = kept.window(text, window) {
            let encoding = tokenizer.encode(part, true)?;
            if text_tokens(&encoding) >= needed {
                return Ok(encoding);
            }
        }
        window = window.saturating_mul(2);
    }
    tokenizer.encode(text, true)
}

/// The largest id `tokenizer` gives, added tokens included: the model's embedding table
/// must hold it (a `tokenizer.json` of another model often has more tokens).
pub fn highest_id(tokenizer: &Tokenizer) -> i64 {
    tokenizer
        .get_vocab(true)
        .into_values()
        .max()
        .map_or(0, i64::from)
}

/// The error of a load whose model fails on the tokenizer's `highest` id.
pub fn vocabulary_mismatch(
    tokenizer: &Tokenizer,
    highest: i64,
    error: impl std::fmt::Display,
) -> BackendError {
    let token = u32::try_from(highest)
        .ok()
        .and_then(|id| tokenizer.id_to_token(id))
        .unwrap_or_default();
    BackendError::Config(format!(
        "tokenizer.json gives ids up to {highest} ('{token}'), but a sequence holding it fails \
         on this model (is tokenizer.json another model's? the model's embedding table must \
         hold every id the tokenizer gives): {error}"
    ))
}

/// A `tokenizer.json` with the padding and truncation this backend needs.
///
/// Padding in the file is switched off (a shipped tokenizer may pad every text to a fixed
/// length); the backend pads each batch to its longest row instead. Truncation keeps the
/// first `max_length` tokens, special tokens included.
pub struct TextEncoder {
    tokenizer: Tokenizer,
    max_length: usize,
    pad_id: i64,
    vocab_size: usize,
    highest_id: i64,
}

impl TextEncoder {
    pub fn from_file(
        path: &Path,
        max_length: Option<usize>,
        pad_token: Option<&str>,
    ) -> Result<Self, BackendError> {
        Self::new(load_tokenizer(path)?, max_length, pad_token)
    }

    pub fn new(
        mut tokenizer: Tokenizer,
        max_length: Option<usize>,
        pad_token: Option<&str>,
    ) -> Result<Self, BackendError> {
        let pad_id = Self::find_pad_id(&tokenizer, pad_token)?;
        let max_length = max_length
            .or_else(|| tokenizer.get_truncation().map(|t| t.max_length))
            .unwrap_or(DEFAULT_MAX_SEQUENCE_LENGTH);
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| BackendError::tokenizer("cannot set truncation", e))?;
        let vocab_size = tokenizer.get_vocab_size(true);
        let highest_id = highest_id(&tokenizer);
        Ok(TextEncoder {
            tokenizer,
            max_length,
            pad_id,
            vocab_size,
            highest_id,
        })
    }

    fn find_pad_id(tokenizer: &Tokenizer, pad_token: Option<&str>) -> Result<i64, BackendError> {
        if let Some(token) = pad_token {
            return tokenizer.token_to_id(token).map(i64::from).ok_or_else(|| {
                BackendError::Config(format!(
                    "parameter 'pad_token' is '{token}', which is not in the tokenizer's vocabulary"
                ))
            });
        }
        if let Some(padding) = tokenizer.get_padding() {
            return Ok(i64::from(padding.pad_id));
        }
        WELL_KNOWN_PAD_TOKENS
            .iter()
            .find_map(|token| tokenizer.token_to_id(token))
            .map(i64::from)
            .ok_or_else(|| {
                BackendError::Config(format!(
                    "cannot tell the padding token: the tokenizer has none of {WELL_KNOWN_PAD_TOKENS:?}; \
                     set parameter 'pad_token'"
                ))
            })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The largest id the tokenizer gives (added tokens included).
    pub fn highest_id(&self) -> i64 {
        self.highest_id
    }

    /// The tokenizer itself (for memory accounting).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Tokenizes one text with special tokens, truncated to `max_length`.
    pub fn encode(&self, text: &str) -> Result<TokenRow, BackendError> {
        let encoding = encode_kept(&self.tokenizer, text, KeptTokens::First(self.max_length))
            .map_err(|e| BackendError::tokenizer("cannot encode a text", e))?;
        Ok(TokenRow {
            ids: encoding.get_ids().iter().map(|&id| i64::from(id)).collect(),
            attention_mask: encoding
                .get_attention_mask()
                .iter()
                .map(|&m| i64::from(m))
                .collect(),
            type_ids: encoding
                .get_type_ids()
                .iter()
                .map(|&t| i64::from(t))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::{PaddingParams, PaddingStrategy};

    fn word_tokenizer() -> Tokenizer {
        let vocab = [
            ("[PAD]", 0),
            ("[UNK]", 1),
            ("hello", 2),
            ("world", 3),
            ("again", 4),
        ]
        .into_iter()
        .map(|(t, i)| (t.to_string(), i))
        .collect();
        let model = WordLevel::builder()
            .vocab(vocab)
            .unk_token("[UNK]".into())
            .build()
            .expect("valid vocab");
        let mut tokenizer = Tokenizer::new(model);
        tokenizer.with_pre_tokenizer(Some(Whitespace {}));
        tokenizer
    }

    fn bundled(model: &str) -> Tokenizer {
        let path = format!(
            "{}/../model-repository/{model}/1/tokenizer.json",
            env!("CARGO_MANIFEST_DIR")
        );
        load_tokenizer(Path::new(&path)).expect("a bundled tokenizer loads")
    }

    const PIECES: &[&str] = &[
        "word",
        "Hello",
        "don't",
        "3.14",
        "naïve café",
        "日本語のテキスト。",
        "中文，世界！",
        "😀👍🏽",
        "e\u{301}",
        "<mask>",
        "[SEP]",
        "<|endoftext|>",
        "x",
        "----",
        "\u{a0}",
        "\u{1}",
        "ＡＢＣ",
        " ",
        "  ",
        "\n",
        "\t",
        ". ",
        "\n\n",
    ];

    fn mixed_text() -> impl Strategy<Value = String> {
        proptest::collection::vec(proptest::sample::select(PIECES), 1000..6000)
            .prop_map(|pieces| pieces.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Encoders keep an over-long text's first tokens, from a few kilobytes of it.
        #[test]
        fn an_over_long_text_keeps_its_first_tokens(text in mixed_text()) {
            for model in ["bert-base", "sentiment-classifier"] {
                let encoder = TextEncoder::new(bundled(model), Some(128), None).expect("encoder");
                let whole = encoder.tokenizer().encode(text.as_str(), true).expect("encodes");
                let row = encoder.encode(&text).expect("encodes");
                prop_assert_eq!(&row.ids, &whole.get_ids().iter().map(|&id| i64::from(id)).collect::<Vec<_>>());
                prop_assert_eq!(row.attention_mask, vec![1; row.ids.len()]);
                let part = encode_kept(encoder.tokenizer(), &text, KeptTokens::First(128)).expect("encodes");
                prop_assert!(text_tokens(&whole) > 4 * 256 && text_tokens(&part) < text_tokens(&whole) / 2);
            }
        }

        /// Generation keeps an over-long prompt's last tokens, from a few kilobytes of it.
        #[test]
        fn an_over_long_text_keeps_its_last_tokens(text in mixed_text()) {
            let tokenizer = bundled("gpt2-small");
            let whole = tokenizer.encode(text.as_str(), true).expect("encodes");
            let part = encode_kept(&tokenizer, &text, KeptTokens::Last(127)).expect("encodes");
            let tail = |ids: &[u32]| ids[ids.len().saturating_sub(127)..].to_vec();
            prop_assert_eq!(tail(part.get_ids()), tail(whole.get_ids()));
            prop_assert!(text_tokens(&whole) > 4 * 254 && text_tokens(&part) < text_tokens(&whole) / 2);
        }
    }

    #[test]
    fn windows_are_cut_where_a_word_ends() {
        // Bytes: "ab" 0-1, ' ' 2, "cd" 3-4, 'é' 5-6, ' ' 7, "ef" 8-9, U+0001 10, ' ' 11,
        // "gh" 12-13, "  " 14-15, "ij" 16-17.
        let text = "ab cd\u{e9} ef\u{1} gh  ij";
        let first = KeptTokens::First(1);
        assert_eq!(first.window(text, 2), Some("ab"));
        assert_eq!(first.window(text, 1), None, "no word ends in 'a'");
        // Not after a control character, nor inside a run of spaces.
        assert_eq!(first.window(text, 12), Some("ab cd\u{e9}"));
        assert_eq!(first.window(text, 17), Some("ab cd\u{e9} ef\u{1} gh"));
        let last = KeptTokens::Last(1);
        assert_eq!(last.window(text, 4), Some("  ij"));
        assert_eq!(
            last.window(text, 3),
            None,
            "the space before 'ij' follows a space"
        );
        assert_eq!(
            last.window(text, 10),
            Some("  ij"),
            "not after a control character"
        );
        // A window that starts inside a character.
        assert_eq!(last.window(text, 12), Some(" ef\u{1} gh  ij"));
        assert_eq!(last.window(text, 17), Some(" cd\u{e9} ef\u{1} gh  ij"));
        assert_eq!(last.window("xxxxxx", 3), None);
    }

    #[test]
    fn a_text_without_word_ends_is_tokenized_whole() {
        // A run of one letter pairs its merges from the run's start: its last tokens
        // depend on all of it, so no window is cut inside it.
        let tokenizer = bundled("gpt2-small");
        let text = "x".repeat(100_000);
        let whole = tokenizer.encode(text.as_str(), true).expect("encodes");
        let part = encode_kept(&tokenizer, &text, KeptTokens::Last(127)).expect("encodes");
        assert_eq!(part.get_ids(), whole.get_ids());
        let short = encode_kept(&tokenizer, "a few words", KeptTokens::Last(127)).expect("encodes");
        assert_eq!(
            short.get_ids(),
            tokenizer
                .encode("a few words", true)
                .expect("encodes")
                .get_ids()
        );
    }

    #[test]
    fn truncates_to_max_length_and_ignores_shipped_fixed_padding() {
        let mut tokenizer = word_tokenizer();
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(16),
            pad_id: 0,
            pad_token: "[PAD]".into(),
            ..PaddingParams::default()
        }));
        let encoder = TextEncoder::new(tokenizer, Some(3), None).expect("encoder");
        assert_eq!(encoder.pad_id(), 0);
        let row = encoder.encode("hello world again hello").expect("encodes");
        assert_eq!(row.ids, vec![2, 3, 4]);
        assert_eq!(row.attention_mask, vec![1, 1, 1]);
        let short = encoder.encode("world").expect("encodes");
        assert_eq!(short.ids, vec![3], "no fixed padding may survive");
    }

    #[test]
    fn finds_pad_token_from_config_or_well_known_names() {
        let encoder = TextEncoder::new(word_tokenizer(), None, None).expect("encoder");
        assert_eq!(encoder.pad_id(), 0);
        assert_eq!(encoder.max_length(), DEFAULT_MAX_SEQUENCE_LENGTH);
        let encoder = TextEncoder::new(word_tokenizer(), None, Some("again")).expect("encoder");
        assert_eq!(encoder.pad_id(), 4);
        let error = TextEncoder::new(word_tokenizer(), None, Some("<nope>"))
            .err()
            .expect("unknown pad token")
            .to_string();
        assert!(
            error.contains("'<nope>', which is not in the tokenizer"),
            "{error}"
        );
    }

    #[test]
    fn pads_rows_to_the_longest() {
        let rows = [
            TokenRow {
                ids: vec![5, 6, 7],
                attention_mask: vec![1, 1, 1],
                type_ids: vec![0, 0, 0],
            },
            TokenRow {
                ids: vec![8],
                attention_mask: vec![1],
                type_ids: vec![0],
            },
        ];
        let batch = pad_batch(&[&rows[0], &rows[1]], 1);
        assert_eq!((batch.batch, batch.sequence), (2, 3));
        assert_eq!(batch.ids, vec![5, 6, 7, 8, 1, 1]);
        assert_eq!(batch.attention_mask, vec![1, 1, 1, 1, 0, 0]);
        assert_eq!(batch.type_ids, vec![0; 6]);
    }

    #[test]
    fn missing_tokenizer_file_names_the_path() {
        let error = TextEncoder::from_file(Path::new("/nonexistent/tokenizer.json"), None, None)
            .err()
            .expect("missing file")
            .to_string();
        assert!(
            error.contains("/nonexistent/tokenizer.json does not exist"),
            "{error}"
        );
    }

    #[test]
    fn rows_of_very_different_lengths_are_grouped_apart() {
        // Short texts and long ones: two groups, each padded to its own longest row.
        let lengths = [8, 120, 9, 128, 7, 10];
        let groups = length_groups(&lengths, RUN_COST_TOKENS);
        assert_eq!(groups, vec![vec![4, 0, 2, 5], vec![1, 3]]);
        let fed: usize = groups
            .iter()
            .map(|g| g.len() * g.iter().map(|&r| lengths[r]).max().unwrap())
            .sum();
        assert_eq!(fed, 4 * 10 + 2 * 128);
        assert!(fed < lengths.len() * 128);
    }

    #[test]
    fn similar_lengths_stay_in_one_group() {
        assert_eq!(length_groups(&[30, 32, 31, 40], RUN_COST_TOKENS).len(), 1);
        assert_eq!(length_groups(&[5], RUN_COST_TOKENS), vec![vec![0]]);
        assert!(length_groups(&[], RUN_COST_TOKENS).is_empty());
        // Without a run cost, every new length is its own group.
        assert_eq!(
            length_groups(&[1, 2, 2, 3], 0),
            vec![vec![0], vec![1, 2], vec![3]]
        );
    }
}
