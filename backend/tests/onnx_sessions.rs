//! ONNX Runtime sessions below Triton. The GPU path with the CPU-only ONNX Runtime: a
//! CUDA session (the decoder's, or a token-choosing graph's) must fail with a clear
//! error instead of silently running on the CPU (Triton itself refuses `KIND_GPU`
//! instances on machines without GPUs). On the CPU, the greedy picker takes the arg-max
//! of the last position, and the sampler draws the token the host sampler draws.
//!
//! Needs the ONNX Runtime library that `scripts/setup.sh` installs, or
//! `TRITON_RUST_ORT_LIBRARY` pointing at one.

use std::path::{Path, PathBuf};

use ort::environment::Environment;
use ort::value::Tensor;
use std::collections::HashSet;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use triton_rust::generation::decoder::{SamplerRow, uniform};
use triton_rust::generation::params::GenerationParams;
use triton_rust::generation::sampler_graphs::{
    self, PICKER_LOGITS, PICKER_TOKEN_IDS, SAMPLER_HISTORY, SAMPLER_REPETITION_PENALTY,
    SAMPLER_TEMPERATURE, SAMPLER_TOP_K, SAMPLER_TOP_P, SAMPLER_UNIFORM,
};
use triton_rust::onnx::{self, Device, LibrarySource, OnnxRuntimeLibrary, SessionOptions};
use triton_rust::postprocess::{argmax, softmax};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn onnxruntime_library() -> PathBuf {
    let path = std::env::var_os("TRITON_RUST_ORT_LIBRARY").map_or_else(
        || workspace().join(".deps/onnxruntime/onnxruntime/capi/libonnxruntime.so.1.31.1"),
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "{} is missing: run scripts/setup.sh or set TRITON_RUST_ORT_LIBRARY",
        path.display()
    );
    path
}

fn environment() -> Environment {
    let library = OnnxRuntimeLibrary::Found {
        path: onnxruntime_library(),
        source: LibrarySource::Environment,
    };
    onnx::environment(&library).expect("ONNX Runtime loads")
}

fn options(device: Device) -> SessionOptions {
    SessionOptions {
        intra_op_threads: 1,
        inter_op_threads: 1,
        device,
    }
}

#[test]
fn cuda_sessions_fail_clearly_without_cuda_and_cpu_sessions_load() {
    let environment = environment();
    let model = workspace().join("model-repository/sentiment-classifier/1/model.onnx");

    let error = onnx::load_session(&environment, &model, options(Device::Cuda { device_id: 0 }))
        .expect_err("no CUDA here: the session must not fall back to CPU")
        .to_string();
    assert!(
        error.contains("the CUDA execution provider could not be enabled on GPU 0"),
        "{error}"
    );
    assert!(error.contains("onnxruntime-gpu"), "{error}");

    onnx::load_session(&environment, &model, options(Device::Cpu)).expect("CPU session loads");
}

#[test]
fn greedy_token_picker_takes_the_last_positions_arg_max() {
    let environment = environment();
    let error =
        sampler_graphs::greedy_token_picker(&environment, options(Device::Cuda { device_id: 0 }))
            .expect_err("no CUDA here: the picker must not fall back to CPU")
            .to_string();
    assert!(error.contains("could not be enabled on GPU 0"), "{error}");

    let mut picker = sampler_graphs::greedy_token_picker(&environment, options(Device::Cpu))
        .expect("CPU picker builds");
    // [batch 2, sequence 2, vocab 3]: only the last position counts; ties go to the first.
    let logits = vec![
        9.0f32, 0.0, 0.0, 0.0, 1.0, 0.5, 0.0, 0.0, 9.0, 2.0, 2.0, 1.0,
    ];
    let logits = Tensor::from_array(([2usize, 2, 3], logits)).expect("a tensor");
    let outputs = picker
        .run(ort::inputs![PICKER_LOGITS => logits])
        .expect("the picker runs");
    let (shape, ids) = outputs[PICKER_TOKEN_IDS]
        .try_extract_tensor::<i64>()
        .expect("int64 ids");
    assert_eq!(shape[..], [2, 1]);
    assert_eq!(ids, [1, 0]);
}

/// The sampler written plainly on the host, step by step as Hugging Face applies the
/// settings: the reference the device graph must agree with.
fn reference_token(
    logits: &mut [f32],
    history: &[i64],
    params: &GenerationParams,
    uniform: f32,
) -> i64 {
    if params.repetition_penalty != 1.0 {
        let seen: HashSet<usize> = history.iter().map(|&t| t as usize).collect();
        for token in seen {
            let logit = &mut logits[token];
            *logit = if *logit > 0.0 {
                *logit / params.repetition_penalty
            } else {
                *logit * params.repetition_penalty
            };
        }
    }
    if !params.do_sample {
        return argmax(logits).expect("logits") as i64;
    }
    for logit in logits.iter_mut() {
        *logit /= params.temperature;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if params.top_k > 0 {
        order.truncate(params.top_k);
    }
    let kept: Vec<f32> = order.iter().map(|&i| logits[i]).collect();
    let mut probabilities = softmax(&kept);
    if params.top_p < 1.0 {
        let mut total = 0.0;
        let keep = probabilities
            .iter()
            .position(|&p| {
                total += p;
                total >= params.top_p
            })
            .map_or(probabilities.len(), |last| last + 1);
        probabilities.truncate(keep);
    }
    let mut target = uniform * probabilities.iter().sum::<f32>();
    for (rank, p) in probabilities.iter().enumerate() {
        if target < *p {
            return order[rank] as i64;
        }
        target -= p;
    }
    order[probabilities.len() - 1] as i64
}

#[test]
fn token_sampler_chooses_what_the_reference_chooses() {
    let environment = environment();
    let error = sampler_graphs::token_sampler(&environment, options(Device::Cuda { device_id: 0 }))
        .expect_err("no CUDA here: the sampler must not fall back to CPU")
        .to_string();
    assert!(error.contains("could not be enabled on GPU 0"), "{error}");
    let mut sampler = sampler_graphs::token_sampler(&environment, options(Device::Cpu))
        .expect("CPU sampler builds");

    const VOCAB: usize = 50;
    const ROWS: usize = 200;
    const HISTORY: usize = 6;
    // (do_sample, temperature, top_k, top_p, repetition_penalty)
    let settings = [
        (true, 0.7, 0, 1.0, 1.0),
        (true, 1.3, 5, 1.0, 1.0),
        (true, 1.0, 0, 0.9, 1.0),
        (true, 0.5, 20, 0.8, 1.0),
        (true, 2.0, 1, 1.0, 1.0),
        (true, 1.0, 10, 0.95, 1.8),
        (false, 0.7, 0, 1.0, 1.0),
        (false, 0.7, 0, 1.0, 4.0),
        (false, 0.7, 0, 1.0, 0.5),
    ];
    for (case, (do_sample, temperature, top_k, top_p, repetition_penalty)) in
        settings.into_iter().enumerate()
    {
        let params = GenerationParams {
            do_sample,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            ..Default::default()
        };
        let row = SamplerRow::new(&params, false);
        let mut noise = ChaCha8Rng::seed_from_u64(case as u64 + 1000);
        // Two positions per row: the sampler must use the last one.
        let logits: Vec<f32> = (0..ROWS * 2 * VOCAB)
            .map(|_| (uniform(&mut noise) - 0.5) * 8.0)
            .collect();
        // Seen tokens, with repeats (counted once).
        let history: Vec<i64> = (0..ROWS * HISTORY)
            .map(|_| (noise.next_u64() % 12) as i64)
            .collect();
        let uniforms: Vec<f32> = (0..ROWS)
            .map(|r| {
                if row.draws {
                    uniform(&mut ChaCha8Rng::seed_from_u64(r as u64))
                } else {
                    0.0
                }
            })
            .collect();
        let expected: Vec<i64> = (0..ROWS)
            .map(|r| {
                let start = (r * 2 + 1) * VOCAB;
                reference_token(
                    &mut logits[start..start + VOCAB].to_vec(),
                    &history[r * HISTORY..(r + 1) * HISTORY],
                    &params,
                    uniforms[r],
                )
            })
            .collect();
        let column = |value: f32| Tensor::from_array(([ROWS, 1], vec![value; ROWS]));
        let outputs = sampler
            .run(ort::inputs![
                PICKER_LOGITS => Tensor::from_array(([ROWS, 2, VOCAB], logits)).expect("logits"),
                SAMPLER_TEMPERATURE => column(row.temperature).expect("t"),
                SAMPLER_TOP_K => Tensor::from_array(([ROWS, 1], vec![row.top_k; ROWS])).expect("k"),
                SAMPLER_TOP_P => column(row.top_p).expect("p"),
                SAMPLER_UNIFORM => Tensor::from_array(([ROWS, 1], uniforms)).expect("u"),
                SAMPLER_REPETITION_PENALTY => column(row.repetition_penalty).expect("r"),
                SAMPLER_HISTORY => Tensor::from_array(([ROWS, HISTORY], history)).expect("h"),
            ])
            .expect("the sampler runs");
        let (shape, ids) = outputs[PICKER_TOKEN_IDS]
            .try_extract_tensor::<i64>()
            .expect("int64 ids");
        assert_eq!(shape[..], [ROWS as i64, 1]);
        assert_eq!(ids, expected, "settings {case}: {params:?}");
    }
}

#[test]
fn finished_rows_ride_along_unchanged() {
    let params = GenerationParams {
        temperature: 0.3,
        top_k: 4,
        top_p: 0.5,
        repetition_penalty: 2.0,
        ..Default::default()
    };
    let finished = SamplerRow::new(&params, true);
    assert!(!finished.draws);
    assert_eq!(
        (
            finished.temperature,
            finished.top_k,
            finished.repetition_penalty
        ),
        (1.0, 1, 1.0)
    );
    let active = SamplerRow::new(&params, false);
    assert!(active.draws);
    assert_eq!(
        (active.temperature, active.top_k, active.top_p),
        (0.3, 4, 0.5)
    );
}
