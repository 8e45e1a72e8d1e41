//! The memory a model and its instances report to Triton, which shows it in
//! `/v2/models/<m>/stats` (`memory_usage`: per memory type and device, the model's
//! report plus its instances' reports).
//!
//! What is counted — lower bounds, never guesses upward:
//!
//! - **Per instance**: the weights its ONNX Runtime session holds, counted as the size
//!   of `model.onnx` (the initializers dominate the file), on the CPU for CPU instances
//!   or on the instance's GPU for `KIND_GPU`, less the weights CPU instances share
//!   (`shared_weights.rs`). Not counted: ONNX Runtime's arena for activations, which
//!   grows with the requests, and weights it pre-packs or copies during graph
//!   optimization.
//! - **Per model**: the weights its instances share (held once), and the tokenizer's
//!   vocabulary, shared by all instances of the model version: each token is held twice
//!   (token → id and id → token), each time as its UTF-8 bytes, a `String` and a `u32`
//!   id. Not counted: BPE merges, hash-table slack, and the tokenizer's word cache,
//!   which grows with the texts seen.
//!
//! Free of FFI: `lib.rs` hands the results to Triton.

use std::mem::size_of;
use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::BackendError;
use crate::onnx::Device;
use crate::types::{MemoryPlace, MemoryUsage};

/// Where an instance's session keeps its weights.
pub fn place_of(device: Device) -> MemoryPlace {
    match device {
        Device::Cpu => MemoryPlace::Cpu,
        Device::Cuda { device_id } => MemoryPlace::Gpu {
            device_id: i64::from(device_id),
        },
    }
}

/// The weights of a session made from `model_path` on `device` that are its own: all
/// of them on a GPU, the file less the `shared` bytes on the CPU.
pub fn session_weights(
    model_path: &Path,
    device: Device,
    shared: u64,
) -> Result<MemoryUsage, BackendError> {
    let bytes = std::fs::metadata(model_path)
        .map_err(|e| BackendError::ModelFile(format!("cannot read {}: {e}", model_path.display())))?
        .len();
    let own = match device {
        Device::Cpu => bytes.saturating_sub(shared),
        Device::Cuda { .. } => bytes,
    };
    Ok(MemoryUsage {
        place: place_of(device),
        bytes: own,
    })
}

/// The weights the instances of a model version share, held once on the CPU.
pub fn shared_weights(bytes: u64) -> MemoryUsage {
    MemoryUsage {
        place: MemoryPlace::Cpu,
        bytes,
    }
}

/// A lower bound on the heap memory of a tokenizer's vocabulary (see the module docs).
pub fn vocabulary_bytes(tokenizer: &Tokenizer) -> u64 {
    let per_entry = size_of::<String>() + size_of::<u32>();
    tokenizer
        .get_vocab(true)
        .keys()
        .map(|token| 2 * (token.len() + per_entry) as u64)
        .sum()
}

/// The tokenizer's memory, on the CPU.
pub fn tokenizer_usage(tokenizer: &Tokenizer) -> MemoryUsage {
    MemoryUsage {
        place: MemoryPlace::Cpu,
        bytes: vocabulary_bytes(tokenizer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::models::wordlevel::WordLevel;

    #[test]
    fn vocabulary_counts_each_token_twice() {
        let vocab = [("[UNK]", 0), ("hello", 1), ("wörld", 2)]
            .into_iter()
            .map(|(t, i)| (t.to_string(), i))
            .collect();
        let model = WordLevel::builder()
            .vocab(vocab)
            .unk_token("[UNK]".into())
            .build()
            .expect("valid vocab");
        let tokenizer = Tokenizer::new(model);
        let text_bytes = ("[UNK]".len() + "hello".len() + "wörld".len()) as u64;
        let per_entry = (size_of::<String>() + size_of::<u32>()) as u64;
        assert_eq!(
            vocabulary_bytes(&tokenizer),
            2 * (text_bytes + 3 * per_entry)
        );
        assert_eq!(tokenizer_usage(&tokenizer).place, MemoryPlace::Cpu);
    }

    #[test]
    fn weights_are_the_model_file_on_the_instance_device() {
        let path =
            std::env::temp_dir().join(format!("triton-rust-weights-{}.onnx", std::process::id()));
        std::fs::write(&path, vec![0u8; 1234]).expect("write");
        assert_eq!(
            session_weights(&path, Device::Cpu, 0).expect("file"),
            MemoryUsage {
                place: MemoryPlace::Cpu,
                bytes: 1234
            }
        );
        assert_eq!(
            session_weights(&path, Device::Cpu, 1000)
                .expect("file")
                .bytes,
            234,
            "the shared weights are the model's, not the instance's"
        );
        assert_eq!(
            session_weights(&path, Device::Cuda { device_id: 1 }, 1000).expect("file"),
            MemoryUsage {
                place: MemoryPlace::Gpu { device_id: 1 },
                bytes: 1234
            }
        );
        std::fs::remove_file(&path).expect("cleanup");
        let error = session_weights(&path, Device::Cpu, 0)
            .expect_err("gone")
            .to_string();
        assert!(error.contains("cannot read"), "{error}");
    }
}
