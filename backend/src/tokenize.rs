//! Tokenization and batch padding, independent of Triton and ONNX Runtime.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

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
        Ok(TextEncoder {
            tokenizer,
            max_length,
            pad_id,
            vocab_size,
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

    /// The tokenizer itself (for memory accounting).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Tokenizes one text with special tokens, truncated to `max_length`.
    pub fn encode(&self, text: &str) -> Result<TokenRow, BackendError> {
        let encoding = self
            .tokenizer
            .encode(text, true)
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
