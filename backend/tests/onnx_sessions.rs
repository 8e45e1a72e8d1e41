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
use triton_rust::generation::{GenerationParams, Rng, choose_token};
use triton_rust::onnx::{
    self, Device, LibrarySource, OnnxRuntimeLibrary, PICKER_LOGITS, PICKER_TOKEN_IDS,
    SAMPLER_TEMPERATURE, SAMPLER_TOP_K, SAMPLER_TOP_P, SAMPLER_UNIFORM, SessionOptions,
};

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
    let error = onnx::greedy_token_picker(&environment, options(Device::Cuda { device_id: 0 }))
        .expect_err("no CUDA here: the picker must not fall back to CPU")
        .to_string();
    assert!(error.contains("could not be enabled on GPU 0"), "{error}");

    let mut picker =
        onnx::greedy_token_picker(&environment, options(Device::Cpu)).expect("CPU picker builds");
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

#[test]
fn token_sampler_draws_what_the_host_sampler_draws() {
    let environment = environment();
    let error = onnx::token_sampler(&environment, options(Device::Cuda { device_id: 0 }))
        .expect_err("no CUDA here: the sampler must not fall back to CPU")
        .to_string();
    assert!(error.contains("could not be enabled on GPU 0"), "{error}");
    let mut sampler =
        onnx::token_sampler(&environment, options(Device::Cpu)).expect("CPU sampler builds");

    const VOCAB: usize = 50;
    const ROWS: usize = 200;
    let settings = [
        (0.7, 0, 1.0),
        (1.3, 5, 1.0),
        (1.0, 0, 0.9),
        (0.5, 20, 0.8),
        (2.0, 1, 1.0),
    ];
    for (temperature, top_k, top_p) in settings {
        let params = GenerationParams {
            temperature,
            top_k,
            top_p,
            do_sample: true,
            ..Default::default()
        };
        // Two positions per row: the sampler must use the last one.
        let mut noise = Rng::new(top_k as u64 + 1000);
        let logits: Vec<f32> = (0..ROWS * 2 * VOCAB)
            .map(|_| (noise.next_unit() - 0.5) * 8.0)
            .collect();
        let mut expected = Vec::new();
        let mut uniforms = Vec::new();
        for row in 0..ROWS {
            let start = (row * 2 + 1) * VOCAB;
            let mut row_logits = logits[start..start + VOCAB].to_vec();
            expected
                .push(choose_token(&mut row_logits, [], &params, &mut Rng::new(row as u64)) as i64);
            uniforms.push(Rng::new(row as u64).next_unit());
        }
        let top_k = if top_k == 0 { i64::MAX } else { top_k as i64 };
        let top_p = if top_p >= 1.0 { f32::INFINITY } else { top_p };
        let outputs = sampler
            .run(ort::inputs![
                PICKER_LOGITS => Tensor::from_array(([ROWS, 2, VOCAB], logits)).expect("logits"),
                SAMPLER_TEMPERATURE => Tensor::from_array(([ROWS, 1], vec![temperature; ROWS])).expect("t"),
                SAMPLER_TOP_K => Tensor::from_array(([ROWS, 1], vec![top_k; ROWS])).expect("k"),
                SAMPLER_TOP_P => Tensor::from_array(([ROWS, 1], vec![top_p; ROWS])).expect("p"),
                SAMPLER_UNIFORM => Tensor::from_array(([ROWS, 1], uniforms)).expect("u"),
            ])
            .expect("the sampler runs");
        let (shape, ids) = outputs[PICKER_TOKEN_IDS]
            .try_extract_tensor::<i64>()
            .expect("int64 ids");
        assert_eq!(shape[..], [ROWS as i64, 1]);
        assert_eq!(
            ids, expected,
            "temperature {temperature}, top_k {top_k}, top_p {top_p}"
        );
    }
}
