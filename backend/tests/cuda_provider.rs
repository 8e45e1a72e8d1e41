//! The GPU path with the CPU-only ONNX Runtime: a CUDA session (the decoder's, or the
//! greedy token picker's) must fail with a clear error instead of silently running on
//! the CPU. (Triton itself refuses `KIND_GPU` instances on machines without GPUs, so
//! this path is checked below Triton.) On the CPU, the picker takes the arg-max of the
//! last position.
//!
//! Needs the ONNX Runtime library that `scripts/setup.sh` installs, or
//! `TRITON_RUST_ORT_LIBRARY` pointing at one.

use std::path::{Path, PathBuf};

use ort::environment::Environment;
use ort::value::Tensor;
use triton_rust::onnx::{
    self, Device, LibrarySource, OnnxRuntimeLibrary, PICKER_LOGITS, PICKER_TOKEN_IDS,
    SessionOptions,
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
