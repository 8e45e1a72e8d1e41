//! ONNX Runtime: locating the shared library, the one process-wide environment, and
//! sessions built with explicit threads and execution provider.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ort::environment::Environment;
use ort::ep;
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};

use crate::error::BackendError;
use crate::memory;
use crate::settings::SessionSettings;
use crate::shared_weights::SharedWeights;
use crate::types::MemoryUsage;

/// Where the ONNX Runtime library came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LibrarySource {
    BackendConfig,
    Environment,
    BesideBackend,
}

impl LibrarySource {
    fn describe(&self) -> &'static str {
        match self {
            LibrarySource::BackendConfig => "--backend-config=rust,onnxruntime-library",
            LibrarySource::Environment => "ORT_DYLIB_PATH",
            LibrarySource::BesideBackend => "the backend directory",
        }
    }
}

/// The ONNX Runtime library chosen at backend initialization, or why none was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnnxRuntimeLibrary {
    Found {
        path: PathBuf,
        source: LibrarySource,
    },
    Missing(String),
}

impl OnnxRuntimeLibrary {
    /// Resolves the library: the backend config setting, then `ORT_DYLIB_PATH`, then a
    /// `libonnxruntime.so*` in the directory holding `libtriton_rust.so`.
    pub fn resolve(configured: Option<&str>, env_path: Option<&str>, backend_dir: &Path) -> Self {
        if let Some(path) = configured.filter(|p| !p.is_empty()) {
            return OnnxRuntimeLibrary::Found {
                path: PathBuf::from(path),
                source: LibrarySource::BackendConfig,
            };
        }
        if let Some(path) = env_path.filter(|p| !p.is_empty()) {
            return OnnxRuntimeLibrary::Found {
                path: PathBuf::from(path),
                source: LibrarySource::Environment,
            };
        }
        match find_beside(backend_dir) {
            Some(path) => OnnxRuntimeLibrary::Found {
                path,
                source: LibrarySource::BesideBackend,
            },
            None => OnnxRuntimeLibrary::Missing(format!(
                "no ONNX Runtime library: set --backend-config=rust,onnxruntime-library=PATH, \
                 set ORT_DYLIB_PATH, or place libonnxruntime.so beside libtriton_rust.so in {}",
                backend_dir.display()
            )),
        }
    }
}

/// `libonnxruntime.so` if present, else the highest versioned `libonnxruntime.so.X.Y.Z`.
fn find_beside(dir: &Path) -> Option<PathBuf> {
    let exact = dir.join("libonnxruntime.so");
    if exact.is_file() {
        return Some(exact);
    }
    let entries = std::fs::read_dir(dir).ok()?;
    entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.is_file())
        .filter_map(|path| {
            let version = path
                .file_name()?
                .to_str()?
                .strip_prefix("libonnxruntime.so.")?
                .split('.')
                .map(|part| part.parse::<u64>().ok())
                .collect::<Option<Vec<u64>>>()?;
            Some((version, path))
        })
        .max()
        .map(|(_, path)| path)
}

/// ONNX Runtime allows one environment per process; it lives here from the first
/// successful model load until the process exits. A failed load is not cached, so a
/// later load can succeed once the library is fixed.
static ENVIRONMENT: Mutex<Option<Environment>> = Mutex::new(None);

/// The shared environment, loading the library on first use.
pub fn environment(library: &OnnxRuntimeLibrary) -> Result<Environment, BackendError> {
    let mut slot = ENVIRONMENT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(environment) = slot.as_ref() {
        return Ok(environment.clone());
    }
    let (path, source) = match library {
        OnnxRuntimeLibrary::Found { path, source } => (path, source),
        OnnxRuntimeLibrary::Missing(reason) => {
            return Err(BackendError::OnnxRuntimeLibrary(reason.clone()));
        }
    };
    check_library_file(path, source)?;
    let builder = ort::init_from(path).map_err(|e| {
        BackendError::OnnxRuntimeLibrary(format!(
            "cannot load the ONNX Runtime library {} (from {}): {e}",
            path.display(),
            source.describe()
        ))
    })?;
    let environment = builder
        .with_name("triton-rust")
        .build()
        .map_err(|e| BackendError::onnx("cannot create the ONNX Runtime environment", e))?;
    *slot = Some(environment.clone());
    Ok(environment)
}

/// Explains the common mistakes (a wrong path, a file that is not a library) before
/// the loader's terse "dlopen failed".
fn check_library_file(path: &Path, source: &LibrarySource) -> Result<(), BackendError> {
    let origin = source.describe();
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(path).and_then(|mut file| {
        use std::io::Read;
        file.read_exact(&mut magic)
    });
    let is_elf = match read {
        Ok(()) => magic == *b"\x7fELF",
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(BackendError::OnnxRuntimeLibrary(format!(
                "the ONNX Runtime library {} (from {origin}) does not exist",
                path.display()
            )));
        }
        Err(e) => {
            return Err(BackendError::OnnxRuntimeLibrary(format!(
                "cannot read the ONNX Runtime library {} (from {origin}): {e}",
                path.display()
            )));
        }
    };
    if !is_elf {
        return Err(BackendError::OnnxRuntimeLibrary(format!(
            "the ONNX Runtime library {} (from {origin}) is not a shared library",
            path.display()
        )));
    }
    Ok(())
}

/// Where a session runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda { device_id: i32 },
}

/// Options for one session (one model instance).
#[derive(Debug, Clone, Copy)]
pub struct SessionOptions {
    pub intra_op_threads: usize,
    pub inter_op_threads: usize,
    pub device: Device,
}

fn onnx_error(
    context: &str,
) -> impl Fn(ort::Error<ort::session::builder::SessionBuilder>) -> BackendError + '_ {
    move |e| BackendError::onnx(context, e)
}

/// A session builder with the instance's threads and execution provider. On CUDA,
/// registering the execution provider must succeed: there is no silent fallback to CPU.
pub(crate) fn session_builder(
    environment: &Environment,
    options: SessionOptions,
) -> Result<SessionBuilder, BackendError> {
    let builder = Session::builder(environment)?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(onnx_error("setting the optimization level"))?
        .with_intra_threads(options.intra_op_threads)
        .map_err(onnx_error("setting intra-op threads"))?
        .with_inter_threads(options.inter_op_threads)
        .map_err(onnx_error("setting inter-op threads"))?;
    let Device::Cuda { device_id } = options.device else {
        return Ok(builder);
    };
    builder
        .with_execution_providers([ep::CUDA::default()
            .with_device_id(device_id)
            .build()
            .error_on_failure()])
        .map_err(|e| {
            BackendError::Unsupported(format!(
                "the CUDA execution provider could not be enabled on GPU {device_id}: {e}. \
                 GPU instances need the CUDA build of ONNX Runtime (onnxruntime-gpu) and a \
                 CUDA device; use KIND_CPU otherwise"
            ))
        })
}

/// The file of an ONNX model version: `model.onnx` in the version directory.
pub const MODEL_FILE: &str = "model.onnx";

/// A model version's `model.onnx`, found at load, from which each instance builds its
/// own session.
#[derive(Debug, Clone)]
pub struct OnnxModel {
    pub path: PathBuf,
    pub environment: Environment,
    pub threads: SessionSettings,
    /// With more than one instance: the weights their sessions share.
    shared: Option<Arc<SharedWeights>>,
}

impl OnnxModel {
    /// Finds `model.onnx` in `version_dir` and loads ONNX Runtime; for more than one
    /// `instances`, reads the weights they will share.
    pub fn open(
        library: &OnnxRuntimeLibrary,
        version_dir: &Path,
        threads: SessionSettings,
        instances: usize,
    ) -> Result<Self, BackendError> {
        let path = version_dir.join(MODEL_FILE);
        if !path.is_file() {
            return Err(BackendError::ModelFile(format!(
                "model file {} does not exist",
                path.display()
            )));
        }
        let environment = environment(library)?;
        let shared = (instances > 1)
            .then(|| SharedWeights::read(&path).map(Arc::new))
            .transpose()?;
        Ok(OnnxModel {
            path,
            environment,
            threads,
            shared,
        })
    }

    /// Bytes of the weights the instances share (0 without sharing).
    pub fn shared_bytes(&self) -> u64 {
        self.shared
            .as_ref()
            .map_or(0, |shared| shared.bytes() as u64)
    }

    /// The model-level memory: the shared weights, if any.
    pub fn memory_usage(&self) -> Option<MemoryUsage> {
        (self.shared_bytes() > 0).then(|| memory::shared_weights(self.shared_bytes()))
    }

    /// An instance's own weights on `device`.
    pub fn instance_memory_usage(&self, device: Device) -> Result<MemoryUsage, BackendError> {
        memory::session_weights(&self.path, device, self.shared_bytes())
    }

    /// The session options of an instance on `device`.
    pub fn options(&self, device: Device) -> SessionOptions {
        SessionOptions {
            intra_op_threads: self.threads.intra_op_thread_count,
            inter_op_threads: self.threads.inter_op_thread_count,
            device,
        }
    }

    /// A new session on `device`, on the shared weights if there are.
    pub fn session(&self, device: Device) -> Result<Session, BackendError> {
        let builder = session_builder(&self.environment, self.options(device))?;
        let mut builder = match &self.shared {
            Some(shared) => shared.apply(builder)?,
            None => builder,
        };
        builder
            .commit_from_file(&self.path)
            .map_err(|e| BackendError::onnx(format!("cannot load {}", self.path.display()), e))
    }
}

/// Builds a session for `model_path`.
pub fn load_session(
    environment: &Environment,
    model_path: &Path,
    options: SessionOptions,
) -> Result<Session, BackendError> {
    session_builder(environment, options)?
        .commit_from_file(model_path)
        .map_err(|e| BackendError::onnx(format!("cannot load {}", model_path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_resolution_order() {
        let dir = std::env::temp_dir().join(format!("triton-rust-ort-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let missing = OnnxRuntimeLibrary::resolve(None, None, &dir);
        assert!(
            matches!(missing, OnnxRuntimeLibrary::Missing(ref m) if m.contains("ORT_DYLIB_PATH"))
        );

        std::fs::write(dir.join("libonnxruntime.so.1.31.1"), b"").expect("write");
        std::fs::write(dir.join("libonnxruntime.so.1.9.0"), b"").expect("write");
        assert_eq!(
            OnnxRuntimeLibrary::resolve(None, None, &dir),
            OnnxRuntimeLibrary::Found {
                path: dir.join("libonnxruntime.so.1.31.1"),
                source: LibrarySource::BesideBackend
            },
            "the highest version wins when there is no plain libonnxruntime.so"
        );
        std::fs::write(dir.join("libonnxruntime.so"), b"").expect("write");
        assert_eq!(
            OnnxRuntimeLibrary::resolve(None, None, &dir),
            OnnxRuntimeLibrary::Found {
                path: dir.join("libonnxruntime.so"),
                source: LibrarySource::BesideBackend
            }
        );
        assert_eq!(
            OnnxRuntimeLibrary::resolve(None, Some("/env/lib.so"), &dir),
            OnnxRuntimeLibrary::Found {
                path: "/env/lib.so".into(),
                source: LibrarySource::Environment
            }
        );
        assert_eq!(
            OnnxRuntimeLibrary::resolve(Some("/cfg/lib.so"), Some("/env/lib.so"), &dir),
            OnnxRuntimeLibrary::Found {
                path: "/cfg/lib.so".into(),
                source: LibrarySource::BackendConfig
            }
        );
        let fake = dir.join("libonnxruntime.so");
        let error = check_library_file(&fake, &LibrarySource::BesideBackend)
            .expect_err("an empty file is no library")
            .to_string();
        assert!(error.contains("is not a shared library"), "{error}");
        let error = check_library_file(&dir.join("absent.so"), &LibrarySource::Environment)
            .expect_err("missing")
            .to_string();
        assert!(
            error.contains("absent.so (from ORT_DYLIB_PATH) does not exist"),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
