//! Generation throughput: tokens per second with the KV cache against the uncached
//! baseline (every step re-runs the whole sequence), for batches of 1 and 8 prompts, on
//! the same model, session and settings, in one run. Greedy decoding, so both paths
//! must produce the same tokens; the benchmark checks that before it reports.
//!
//! Run: `scripts/bench-generation.sh` (builds, finds ONNX Runtime, runs this).
//! Environment:
//!   ORT_DYLIB_PATH        libonnxruntime.so to load (the script sets it)
//!   BENCH_MODEL_DIR       a version directory with model.onnx + tokenizer.json
//!                         (default: model-repository/gpt2-small/1)
//!   BENCH_CONTEXT         the model's context length (default 128, the demo model's)
//!   BENCH_NEW_TOKENS      new tokens per prompt (default 64)
//!   BENCH_ROUNDS          timed rounds per case; the median is reported (default 5)
//!   BENCH_THREADS         intra-op threads (default 1)
//!   BENCH_DEVICE          "cpu" (default) or "cuda" (needs the CUDA build of ORT)
//!   BENCH_SAMPLE          1: sample as the shipped models do (temperature 0.7, a fixed
//!                         seed) instead of greedy decoding (default 0)

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use triton_rust::bytes_tensor;
use triton_rust::generation::batch::generate_all;
use triton_rust::generation::decoder::DecoderBinding;
use triton_rust::generation::llm_io::ResponseOptions;
use triton_rust::generation::params::GenerationParams;
use triton_rust::generation::{GENERATED_TOKENS, GenerationRequest, Generator};
use triton_rust::onnx::{self, Device, OnnxRuntimeLibrary, SessionOptions};
use triton_rust::responder::{CollectingResponder, Pending};
use triton_rust::tokenize::load_tokenizer;
use triton_rust::types::{DataType, InputTensor, OutputTensor, ParameterValue};

const PROMPTS: [&str; 8] = [
    "The weather today is",
    "Once upon a time",
    "My favourite food is",
    "In the beginning the",
    "Hello",
    "The quick brown fox jumps over",
    "Machine learning models",
    "A long time ago in a galaxy",
];

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not valid")),
        Err(_) => default,
    }
}

fn request(
    generator: &Generator,
    batch: usize,
    new_tokens: usize,
    sample: bool,
) -> GenerationRequest {
    let prompts: Vec<&str> = PROMPTS.iter().copied().cycle().take(batch).collect();
    let text = InputTensor {
        datatype: DataType::Bytes,
        shape: vec![batch as i64],
        data: bytes_tensor::encode_elements(&prompts).into(),
    };
    let mut parameters = vec![
        ("do_sample".to_string(), ParameterValue::Bool(sample)),
        (
            "max_new_tokens".to_string(),
            ParameterValue::Int(new_tokens as i64),
        ),
    ];
    if sample {
        // A fixed seed: both paths draw the same numbers, so they must agree.
        parameters.push(("temperature".to_string(), ParameterValue::Double(0.7)));
        parameters.push(("seed".to_string(), ParameterValue::Int(1)));
    }
    generator
        .prepare(&text, None, &parameters, ResponseOptions::default())
        .expect("a valid benchmark request")
}

/// One timed generation: its duration, the texts it made and how many tokens.
fn timed(
    generator: &Generator,
    session: &mut ort::session::Session,
    binding: &mut DecoderBinding,
    request: &GenerationRequest,
) -> (Duration, Vec<OutputTensor>, i64) {
    // Nothing is cancelled and nothing streams.
    let responder = CollectingResponder::default();
    let collected = Arc::clone(&responder.collected);
    let pending = Pending {
        request: request.clone(),
        responder: Box::new(responder),
    };
    let started = Instant::now();
    generate_all(generator, session, binding, vec![pending]);
    let elapsed = started.elapsed();
    let mut collected = collected.lock().expect("not poisoned");
    assert_eq!(collected.error, None, "generation runs");
    let tokens = collected
        .parameters
        .last()
        .and_then(|parameters| parameters.iter().find(|(key, _)| key == GENERATED_TOKENS))
        .map(|(_, value)| match value {
            ParameterValue::Int(tokens) => *tokens,
            other => panic!("{GENERATED_TOKENS} is {other:?}"),
        })
        .expect("the final response counts its tokens");
    (
        elapsed,
        collected.responses.pop().expect("a response"),
        tokens,
    )
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let model_dir = std::env::var("BENCH_MODEL_DIR").map_or_else(
        |_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../model-repository/gpt2-small/1"),
        PathBuf::from,
    );
    let context: usize = env_or("BENCH_CONTEXT", 128);
    let new_tokens: usize = env_or("BENCH_NEW_TOKENS", 64);
    let rounds: usize = env_or("BENCH_ROUNDS", 5);
    let threads: usize = env_or("BENCH_THREADS", 1);
    let sample = env_or("BENCH_SAMPLE", 0) == 1;
    let device = match std::env::var("BENCH_DEVICE").as_deref() {
        Ok("cuda") => Device::Cuda { device_id: 0 },
        Ok("cpu") | Err(_) => Device::Cpu,
        Ok(other) => panic!("BENCH_DEVICE={other}: use cpu or cuda"),
    };

    let env_path = std::env::var("ORT_DYLIB_PATH").ok();
    let library = OnnxRuntimeLibrary::resolve(None, env_path.as_deref(), Path::new("."));
    let environment = onnx::environment(&library).expect("ONNX Runtime loads (set ORT_DYLIB_PATH)");
    let options = SessionOptions {
        intra_op_threads: threads,
        inter_op_threads: 1,
        device,
    };
    let mut session = onnx::load_session(&environment, &model_dir.join("model.onnx"), options)
        .expect("the model loads");
    let mut binding = DecoderBinding::new(&session, &environment, options)
        .expect("a decoder with past key values");
    let tokenizer = load_tokenizer(&model_dir.join("tokenizer.json")).expect("tokenizer loads");
    let cached =
        Generator::new(tokenizer, None, context, GenerationParams::default()).expect("generator");
    let tokenizer = load_tokenizer(&model_dir.join("tokenizer.json")).expect("tokenizer loads");
    let uncached = Generator::new(tokenizer, None, context, GenerationParams::default())
        .expect("generator")
        .with_cache(false);

    println!(
        "model {} on {device:?}, {threads} intra-op thread(s), {new_tokens} new tokens per prompt, \
         {}, median of {rounds} rounds",
        model_dir.display(),
        if sample {
            "sampling (temperature 0.7)"
        } else {
            "greedy"
        }
    );
    println!("| batch | tokens | with KV cache (tok/s) | without cache (tok/s) | speed-up |");
    println!("|---:|---:|---:|---:|---:|");
    for batch in [1, 8] {
        let request = request(&cached, batch, new_tokens, sample);
        // Untimed first runs: ONNX Runtime plans its kernels on the first shapes it sees.
        let (_, reference, tokens) = timed(&cached, &mut session, &mut binding, &request);
        let (_, baseline, _) = timed(&uncached, &mut session, &mut binding, &request);
        assert_eq!(
            reference, baseline,
            "the uncached path must make the same text"
        );
        let (mut with_cache, mut without_cache) = (Vec::new(), Vec::new());
        // Alternate the two paths so that drift in the machine's speed hits both.
        for _ in 0..rounds {
            let (elapsed, _, _) = timed(&cached, &mut session, &mut binding, &request);
            with_cache.push(tokens as f64 / elapsed.as_secs_f64());
            let (elapsed, _, _) = timed(&uncached, &mut session, &mut binding, &request);
            without_cache.push(tokens as f64 / elapsed.as_secs_f64());
        }
        let (with_cache, without_cache) = (median(with_cache), median(without_cache));
        println!(
            "| {batch} | {tokens} | {with_cache:.0} | {without_cache:.0} | {:.2}x |",
            with_cache / without_cache
        );
    }
}
