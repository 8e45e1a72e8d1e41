//! The GPU path with the CPU-only ONNX Runtime: a CUDA session must fail with a clear
//! error instead of silently running on the CPU. (Triton itself refuses `KIND_GPU`
//! instances on machines without GPUs, so this path is checked below Triton.)
//!
//! Needs the ONNX Runtime library that `scripts/setup.sh` installs, or
//! `TRITON_RUST_ORT_LIBRARY` pointing at one.

use std::path::{Path, PathBuf};

use triton_rust::onnx::{self, Device, LibrarySource, OnnxRuntimeLibrary, SessionOptions};

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

#[test]
fn cuda_sessions_fail_clearly_without_cuda_and_cpu_sessions_load() {
    let library = OnnxRuntimeLibrary::Found {
        path: onnxruntime_library(),
        source: LibrarySource::Environment,
    };
    let environment = onnx::environment(&library).expect("ONNX Runtime loads");
    let model = workspace().join("model-repository/sentiment-classifier/1/model.onnx");
    let options = |device| SessionOptions {
        intra_op_threads: 1,
        inter_op_threads: 1,
        device,
    };

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
