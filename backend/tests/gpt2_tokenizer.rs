//! The real GPT-2 byte-level BPE through the text-generation task's own tokenizer path
//! (`load_tokenizer` + `Generator::encode`/`decode`) gives the same token ids as
//! OpenAI's reference tokenizer (`tiktoken_rs::r50k_base`, the `gpt2` encoding).
//!
//! The fixture `tests/fixtures/gpt2-tokenizer/tokenizer.json` is built from OpenAI's
//! GPT-2 `encoder.json` + `vocab.bpe` by `tools/fixtures/make_gpt2_tokenizer.py`
//! (provenance in the README beside it). Needs neither ONNX Runtime nor Triton.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;
use triton_rust::generation::Generator;
use triton_rust::generation::params::GenerationParams;
use triton_rust::tokenize::load_tokenizer;

/// GPT-2's `n_positions`: the task's context length for the real model.
const CONTEXT_LENGTH: usize = 1024;
const END_OF_TEXT_ID: u32 = 50256;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gpt2-tokenizer/tokenizer.json")
}

/// The text-generation task's tokenizer, loaded as `TaskLogic` loads it.
fn generator() -> &'static Generator {
    static GENERATOR: OnceLock<Generator> = OnceLock::new();
    GENERATOR.get_or_init(|| {
        let tokenizer = load_tokenizer(&fixture()).expect("the GPT-2 fixture loads");
        Generator::new(tokenizer, None, CONTEXT_LENGTH, GenerationParams::default())
            .expect("a generator over the GPT-2 tokenizer")
    })
}

fn reference() -> &'static CoreBPE {
    tiktoken_rs::r50k_base_singleton()
}

fn ours(text: &str) -> Vec<u32> {
    generator()
        .encode(text)
        .expect("encodes")
        .into_iter()
        .map(|id| u32::try_from(id).expect("GPT-2 ids fit in u32"))
        .collect()
}

fn as_i64(ids: &[u32]) -> Vec<i64> {
    ids.iter().map(|&id| i64::from(id)).collect()
}

const LONG_PARAGRAPH: &str = "Once upon a time, in a small village near the mountains, there \
    lived an old baker named Henri who woke up every morning at 4:30 to prepare bread, \
    croissants and 12 different kinds of pastries for the 250 people of the town. The \
    children loved his chocolate brioche, the farmers preferred the dark rye loaves, and \
    the mayor -- a strict but fair woman called Zoë Müller -- ordered exactly three \
    baguettes every single day, rain or shine. One winter, a terrible storm closed the only \
    road for nearly two weeks; flour ran low, the oven broke twice, and Henri worried that \
    the village would go hungry. Instead, neighbours brought eggs, butter, apples and honey, \
    the blacksmith repaired the oven for free, and together they baked simple cakes that \
    everyone shared in the square. When the road finally reopened on March 3rd, the \
    travellers who arrived found a town that was tired, happy, and surprisingly well fed.";

/// Texts where byte-level BPE tokenizers commonly go wrong.
const TEXTS: &[&str] = &[
    // Empty and plain ASCII.
    "",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "hello",
    "HELLO WORLD",
    // Punctuation.
    "Wait... what?! (Really) -- yes; no: maybe/perhaps.",
    "\"double\" 'single' `back` [brackets] {braces} <angle> @#$%^&*_+=|\\~",
    "!!!!!!!!!!!!???????.......,,,,,;;;;;",
    "https://example.com/path?q=1&r=two#frag and user@example.org",
    "fn main() {\n    println!(\"hi\");\n}\n",
    // Contractions (the GPT-2 pattern only knows lower-case ones).
    "don't",
    "I'll go, we've gone, they're here, she'd know, I'm sure, it's fine.",
    "DON'T I'LL WE'VE",
    "'s 't 're 've 'm 'll 'd",
    "rock 'n' roll, 'quoted', o'clock, ''double'' '",
    // Numbers.
    "1234567890",
    "3.14159 2.71828 -42 +17 1e-9 0x1F 0b1010",
    "1,000,000 and 1.000.000 and 1 000 000",
    "On 2024-03-15 at 09:45:00, order #4521 cost $19.99 (incl. 20% tax).",
    "١٢٣ ४५६ ௭௮௯ 一二三 Ⅻ ½ ²",
    // Leading and trailing spaces.
    " leading",
    "  two leading",
    "trailing ",
    "trailing  ",
    " ",
    "  ",
    "     ",
    " both ",
    // Runs of spaces, tabs and newlines.
    "a    b",
    "tab\tseparated\t\tvalues\t",
    "line1\nline2\n\n\nline5",
    "\n",
    "\n\n\n",
    "\t\t\t",
    "end with newline\n",
    "word   \nnext",
    "\r\nwindows\r\nlines\r\n",
    " \t \n mixed \n\t whitespace \t\n ",
    "indented:\n    four\n        eight\n\ttab",
    // CJK.
    "日本語のテキストです。",
    "中文测试：你好，世界！",
    "한국어 텍스트입니다",
    "東京 Tokyo 2024年3月15日",
    "ｆｕｌｌｗｉｄｔｈ　ＡＢＣ　１２３",
    // Emoji, with ZWJ sequences, skin tones, flags and variation selectors.
    "🙂",
    "I love it 😍😍😍!",
    "👍🏽 👋🏿 🤝🏻",
    "👨‍👩‍👧‍👦 family",
    "🧑🏿‍💻 coding",
    "🏳️‍🌈 ❤️ ☺︎",
    "flags 🇫🇷🇯🇵🇺🇸",
    "🫠🪿🫶",
    // Combining accents, precomposed and decomposed.
    "Zoë Zoe\u{308}",
    "e\u{301} e\u{300}\u{302} n\u{303}",
    "a\u{30a}\u{301}\u{323}",
    "Tiếng Việt có dấu",
    "naïve café résumé façade",
    // Mixed scripts.
    "Привет, мир! Γειά σου κόσμε. Hello!",
    "مرحبا بالعالم. שלום עולם.",
    "नमस्ते दुनिया। สวัสดีชาวโลก",
    "mixed日本語andEnglish123with😀emoji",
    "Ωmega αλφα Ж ж Ǆ ǅ ǆ ß ẞ",
    // Unusual spaces and invisible characters.
    "non\u{a0}breaking\u{a0}\u{a0}space",
    "ideographic\u{3000}space",
    "zero\u{200b}width\u{200c}non\u{200d}joiner",
    "\u{feff}byte order mark",
    "next\u{85}line\u{2028}separator\u{2029}para",
    "control\u{0}\u{1}\u{7}\u{1b}[0m\u{7f}",
    "replacement \u{fffd} char",
    // Text that looks like the special token but is not.
    "<|endoftext",
    "endoftext|>",
    "< |endoftext| >",
    // Long text.
    LONG_PARAGRAPH,
];

#[test]
fn the_fixture_is_the_real_gpt2_vocabulary() {
    let tokenizer = load_tokenizer(&fixture()).expect("loads");
    assert_eq!(tokenizer.get_vocab_size(true), 50257);
    assert_eq!(tokenizer.token_to_id("<|endoftext|>"), Some(END_OF_TEXT_ID));
    // Well-known GPT-2 ids.
    assert_eq!(ours("Hello world"), vec![15496, 995]);
    assert_eq!(ours(" hello"), vec![23748]);
}

#[test]
fn token_ids_equal_tiktoken_r50k_base() {
    let mut mismatches = Vec::new();
    for text in TEXTS {
        let expected = reference().encode_ordinary(text);
        let got = ours(text);
        if got != expected {
            mismatches.push(format!(
                "{text:?}\n  ours:     {got:?}\n  tiktoken: {expected:?}"
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} texts differ:\n{}",
        mismatches.len(),
        TEXTS.len(),
        mismatches.join("\n")
    );
}

#[test]
fn decoding_gives_the_text_back() {
    for text in TEXTS {
        let ids = ours(text);
        assert_eq!(
            generator().decode(&as_i64(&ids)).expect("decodes"),
            *text,
            "our round trip of {text:?}"
        );
        assert_eq!(
            reference().decode(&ids).expect("tiktoken decodes"),
            *text,
            "tiktoken decoding our ids of {text:?}"
        );
    }
}

#[test]
fn decoding_joins_tokens_that_split_a_character() {
    // "🙂" is 4 bytes and 2 GPT-2 tokens; each alone is not valid UTF-8.
    let ids = ours("🙂");
    assert!(ids.len() > 1, "{ids:?}");
    assert_eq!(generator().decode(&as_i64(&ids)).expect("decodes"), "🙂");
}

#[test]
fn an_over_long_prompt_keeps_its_last_tokens() {
    let text = [LONG_PARAGRAPH; 8].join(" ");
    let expected = reference().encode_ordinary(&text);
    assert!(expected.len() > CONTEXT_LENGTH, "{}", expected.len());
    let got = ours(&text);
    assert_eq!(got.len(), CONTEXT_LENGTH - 1);
    assert_eq!(got, expected[expected.len() - (CONTEXT_LENGTH - 1)..]);
}

/// `<|endoftext|>` written in a prompt is the special token to the Hugging Face
/// tokenizer (as `transformers`' GPT2TokenizerFast does: added tokens are matched in the
/// input text), which tiktoken does only when asked to (`encode_with_special_tokens`).
/// Its `encode_ordinary` reads the same characters as plain text. That is the one known
/// difference between the two on GPT-2.
#[test]
fn the_literal_end_of_text_token_is_the_special_id() {
    let samples = [
        "<|endoftext|>",
        "Hello<|endoftext|>world",
        "first document.<|endoftext|> Second one<|endoftext|><|endoftext|>",
        "  <|endoftext|>  \n",
    ];
    for text in samples {
        let got = ours(text);
        assert!(got.contains(&END_OF_TEXT_ID), "{text:?}: {got:?}");
        assert_eq!(
            got,
            reference().encode_with_special_tokens(text),
            "{text:?}"
        );
        let ordinary = reference().encode_ordinary(text);
        assert!(
            !ordinary.contains(&END_OF_TEXT_ID),
            "{text:?}: {ordinary:?}"
        );
        assert_ne!(got, ordinary, "{text:?}");
    }
    assert_eq!(ours("<|endoftext|>"), vec![END_OF_TEXT_ID]);
    assert_eq!(
        reference().encode_ordinary("<|endoftext|>"),
        vec![27, 91, 437, 1659, 5239, 91, 29],
        "'<', '|', 'end', 'of', 'text', '|', '>'"
    );
    assert_eq!(
        ours("Hello<|endoftext|>world"),
        vec![15496, END_OF_TEXT_ID, 6894]
    );
    // Decoding skips special tokens, as the generator does for its output.
    assert_eq!(
        generator()
            .decode(&as_i64(&ours("Hello<|endoftext|>world")))
            .expect("decodes"),
        "Helloworld"
    );
}

/// Every merge is exercised: the text of each vocabulary token (those that are valid
/// UTF-8 on their own) encodes as tiktoken encodes it.
#[test]
fn every_vocabulary_token_encodes_as_tiktoken() {
    let mut checked = 0;
    let mut mismatches = Vec::new();
    for id in 0..END_OF_TEXT_ID {
        let bytes = reference().decode_bytes(&[id]).expect("a GPT-2 rank");
        let Ok(text) = String::from_utf8(bytes) else {
            continue;
        };
        checked += 1;
        let expected = reference().encode_ordinary(&text);
        let got = ours(&text);
        if got != expected {
            mismatches.push(format!(
                "{id} {text:?}: ours {got:?}, tiktoken {expected:?}"
            ));
        }
    }
    assert!(checked > 45_000, "{checked}");
    assert!(
        mismatches.is_empty(),
        "{} of {checked} tokens differ:\n{}",
        mismatches.len(),
        mismatches[..mismatches.len().min(20)].join("\n")
    );
}

#[test]
fn every_one_and_two_byte_character_round_trips() {
    // Byte-level BPE has a token for each byte: every ASCII character alone, and every
    // other code point up to U+07FF (two bytes), encodes and decodes as tiktoken does.
    let mut seen = HashSet::new();
    for c in (0u32..0x800).filter_map(char::from_u32) {
        let text = c.to_string();
        let got = ours(&text);
        assert_eq!(got, reference().encode_ordinary(&text), "{c:?}");
        assert_eq!(
            generator().decode(&as_i64(&got)).expect("decodes"),
            text,
            "{c:?}"
        );
        seen.extend(got);
    }
    assert!(seen.len() > 256, "{}", seen.len());
}

/// The last `CONTEXT_LENGTH - 1` of tiktoken's ids for `text`.
fn reference_tail(text: &str) -> Vec<u32> {
    let ids = reference().encode_ordinary(text);
    ids[ids.len().saturating_sub(CONTEXT_LENGTH - 1)..].to_vec()
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config::with_cases(48))]

    /// Prompts far longer than the context (up to ~400 KB, the texts above joined in
    /// random order) are tokenized only near their end, and keep exactly the tokens of
    /// the whole text.
    #[test]
    fn an_over_long_prompt_keeps_the_tokens_of_the_whole_text(
        pieces in proptest::collection::vec(
            (0..TEXTS.len(), proptest::sample::select(vec!["", " ", "\n", "\t", ". ", "  "])),
            200..4000,
        ),
    ) {
        let text: String = pieces
            .iter()
            .flat_map(|&(index, separator)| [TEXTS[index], separator])
            .collect();
        proptest::prop_assert_eq!(ours(&text), reference_tail(&text));
    }
}

/// Text with no space to cut at near its end: long runs of letters, ideographs, symbols,
/// emoji, and a run of one letter (whose merges pair from the run's start) after words.
#[test]
fn an_over_long_prompt_without_spaces_keeps_the_tokens_of_the_whole_text() {
    let runs = [
        "abcdefghij".repeat(20_000),
        "日本語のテキストです。中文测试：你好，世界！".repeat(2_000),
        "=+-*/<>!?".repeat(20_000),
        "😀🙂👍🏽".repeat(10_000),
        format!("{}{}", "word ".repeat(4_000), "x".repeat(60_000)),
    ];
    for text in &runs {
        assert!(ours(text) == reference_tail(text), "{}", &text[..40]);
    }
}

/// A `tokenizer.json` saved with padding or truncation on (e.g. after
/// `tokenizer.enable_padding(length=1024)`) still gives each prompt its own tokens.
#[test]
fn shipped_padding_and_truncation_are_ignored() {
    let mut tokenizer = load_tokenizer(&fixture()).expect("loads");
    tokenizer.with_padding(Some(tokenizers::PaddingParams {
        strategy: tokenizers::PaddingStrategy::Fixed(CONTEXT_LENGTH),
        pad_id: END_OF_TEXT_ID,
        pad_token: "<|endoftext|>".into(),
        ..tokenizers::PaddingParams::default()
    }));
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length: 16,
            ..tokenizers::TruncationParams::default()
        }))
        .expect("truncation");
    let generator = Generator::new(tokenizer, None, CONTEXT_LENGTH, GenerationParams::default())
        .expect("a generator");
    let long = [LONG_PARAGRAPH; 8].join(" ");
    for text in ["Hello world", long.as_str()] {
        let expected: Vec<i64> = as_i64(&reference_tail(text));
        assert_eq!(
            generator.encode(text).expect("encodes"),
            expected,
            "{text:.40}"
        );
    }
}
