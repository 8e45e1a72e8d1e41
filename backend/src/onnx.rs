//! ONNX Runtime: locating the shared library, the one process-wide environment,
//! sessions built with explicit threads and execution provider, and the small graphs that
//! choose tokens where the decoder runs.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ort::editor::{Graph, Model, Node, ONNX_DOMAIN, Opset};
use ort::environment::Environment;
use ort::ep;
use ort::memory::Allocator;
use ort::operator::Attribute;
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::value::{Outlet, Shape, SymbolicDimensions, Tensor, TensorElementType, ValueType};

use crate::error::BackendError;

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
        OnnxRuntimeLibrary::Missing(reason) => return Err(BackendError::Onnx(reason.clone())),
    };
    check_library_file(path, source)?;
    let builder = ort::init_from(path).map_err(|e| {
        BackendError::Onnx(format!(
            "cannot load the ONNX Runtime library {} (from {}): {e}",
            path.display(),
            source.describe()
        ))
    })?;
    let environment = builder.with_name("triton-rust").build().map_err(|e| {
        BackendError::Onnx(format!("cannot create the ONNX Runtime environment: {e}"))
    })?;
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
            return Err(BackendError::Onnx(format!(
                "the ONNX Runtime library {} (from {origin}) does not exist",
                path.display()
            )));
        }
        Err(e) => {
            return Err(BackendError::Onnx(format!(
                "cannot read the ONNX Runtime library {} (from {origin}): {e}",
                path.display()
            )));
        }
    };
    if !is_elf {
        return Err(BackendError::Onnx(format!(
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
    move |e| BackendError::Onnx(format!("{context}: {e}"))
}

/// A session builder with the instance's threads and execution provider. On CUDA,
/// registering the execution provider must succeed: there is no silent fallback to CPU.
fn session_builder(
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

/// Builds a session for `model_path`.
pub fn load_session(
    environment: &Environment,
    model_path: &Path,
    options: SessionOptions,
) -> Result<Session, BackendError> {
    if !model_path.is_file() {
        return Err(BackendError::ModelFile(format!(
            "model file {} does not exist",
            model_path.display()
        )));
    }
    session_builder(environment, options)?
        .commit_from_file(model_path)
        .map_err(|e| BackendError::Onnx(format!("cannot load {}: {e}", model_path.display())))
}

/// Input and output of [`greedy_token_picker`].
pub const PICKER_LOGITS: &str = "logits";
pub const PICKER_TOKEN_IDS: &str = "token_ids";

/// A two-node graph run where the decoder runs: `Gather` the last position of
/// `logits [batch, sequence, vocab]`, then `ArgMax` over the vocabulary, giving
/// `token_ids [batch, 1]`. Greedy decoding then moves only token ids from the device to
/// the host, not the logits.
pub fn greedy_token_picker(
    environment: &Environment,
    options: SessionOptions,
) -> Result<Session, BackendError> {
    let mut graph = Graph::new()?;
    graph.set_inputs([Outlet::new(
        PICKER_LOGITS,
        dynamic_tensor(TensorElementType::Float32, 3),
    )])?;
    graph.set_outputs([Outlet::new(
        PICKER_TOKEN_IDS,
        dynamic_tensor(TensorElementType::Int64, 2),
    )])?;
    add_last_position_logits(&mut graph)?;
    let axis = |name: &str, value: i64| Attribute::new(name, value);
    add_node(
        &mut graph,
        "ArgMax",
        &["last_logits"],
        PICKER_TOKEN_IDS,
        vec![axis("axis", 2)?, axis("keepdims", 0)?],
    )?;
    session_from_graph(graph, environment, options, "the greedy token picker")
}

/// `last_logits [batch, 1, vocab]`: the last position of `logits`, and the constant
/// `last` ([-1]) that picks it.
fn add_last_position_logits(graph: &mut Graph) -> Result<(), BackendError> {
    add_constant(graph, "last", &[1], &[-1i64])?;
    add_node(
        graph,
        "Gather",
        &[PICKER_LOGITS, "last"],
        "last_logits",
        vec![Attribute::new("axis", 1i64)?],
    )
}

/// A tensor type whose `rank` dimensions are all dynamic.
fn dynamic_tensor(ty: TensorElementType, rank: usize) -> ValueType {
    ValueType::Tensor {
        ty,
        shape: Shape::new(vec![-1; rank]),
        dimension_symbols: SymbolicDimensions::empty(rank),
    }
}

/// A session for a graph built here, with the decoder's options (so on its device).
fn session_from_graph(
    graph: Graph,
    environment: &Environment,
    options: SessionOptions,
    what: &str,
) -> Result<Session, BackendError> {
    let mut model = Model::new([Opset::new(ONNX_DOMAIN, 17)?])?;
    model.set_graph(graph)?;
    model
        .into_session(&session_builder(environment, options)?)
        .map_err(|e| BackendError::Onnx(format!("cannot build {what}: {e}")))
}

/// Inputs and output of [`token_sampler`], besides [`PICKER_LOGITS`] and
/// [`PICKER_TOKEN_IDS`]: one row per sequence, `[batch, 1]` each.
pub const SAMPLER_TEMPERATURE: &str = "temperature";
/// How many of the most likely tokens stay (`i64::MAX`: all).
pub const SAMPLER_TOP_K: &str = "top_k";
/// Probability mass of the most likely tokens that stays (`inf`: all).
pub const SAMPLER_TOP_P: &str = "top_p";
/// The draw, uniform in [0, 1), from the request's own random generator.
pub const SAMPLER_UNIFORM: &str = "uniform";
/// Divides positive (multiplies negative) logits of the tokens in the history (1: off).
pub const SAMPLER_REPETITION_PENALTY: &str = "repetition_penalty";
/// Token ids seen so far, `[batch, length]` (rows padded with one of their own ids).
pub const SAMPLER_HISTORY: &str = "history";

/// A constant of the graph.
fn add_constant<T>(
    graph: &mut Graph,
    name: &str,
    shape: &[i64],
    values: &[T],
) -> Result<(), BackendError>
where
    T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug,
{
    let mut tensor = Tensor::<T>::new(&Allocator::default(), Shape::new(shape.to_vec()))?;
    tensor.extract_tensor_mut().1.copy_from_slice(values);
    graph.add_initializer(name, tensor, false)?;
    Ok(())
}

/// One node of the graph: `op` from `inputs` to `output`.
fn add_node(
    graph: &mut Graph,
    op: &str,
    inputs: &[&str],
    output: &str,
    attributes: Vec<Attribute>,
) -> Result<(), BackendError> {
    graph.add_node(Node::new(
        op,
        ONNX_DOMAIN,
        output,
        inputs,
        [output],
        attributes,
    )?)?;
    Ok(())
}

/// The sampler as a graph run where the decoder runs, choosing one token per row from
/// the last position of `logits` in the order Hugging Face applies the same settings:
/// repetition penalty on the `history` tokens, temperature, top-k, top-p over the sorted
/// distribution, then the draw `uniform` against the kept mass (top-k 1 is greedy). A
/// step then moves only token ids to the host. `backend/tests/onnx_sessions.rs` checks
/// it against a plain host implementation.
pub fn token_sampler(
    environment: &Environment,
    options: SessionOptions,
) -> Result<Session, BackendError> {
    let mut graph = Graph::new()?;
    graph.set_inputs([
        Outlet::new(PICKER_LOGITS, dynamic_tensor(TensorElementType::Float32, 3)),
        Outlet::new(
            SAMPLER_TEMPERATURE,
            dynamic_tensor(TensorElementType::Float32, 2),
        ),
        Outlet::new(SAMPLER_TOP_K, dynamic_tensor(TensorElementType::Int64, 2)),
        Outlet::new(SAMPLER_TOP_P, dynamic_tensor(TensorElementType::Float32, 2)),
        Outlet::new(
            SAMPLER_UNIFORM,
            dynamic_tensor(TensorElementType::Float32, 2),
        ),
        Outlet::new(
            SAMPLER_REPETITION_PENALTY,
            dynamic_tensor(TensorElementType::Float32, 2),
        ),
        Outlet::new(SAMPLER_HISTORY, dynamic_tensor(TensorElementType::Int64, 2)),
    ])?;
    graph.set_outputs([Outlet::new(
        PICKER_TOKEN_IDS,
        dynamic_tensor(TensorElementType::Int64, 2),
    )])?;
    add_last_position_logits(&mut graph)?;
    add_constant(&mut graph, "axis_0", &[1], &[0i64])?;
    add_constant(&mut graph, "axis_1", &[1], &[1i64])?;
    add_constant(&mut graph, "axis_1_scalar", &[], &[1i64])?;
    add_constant(&mut graph, "zero", &[], &[0i64])?;
    add_constant(&mut graph, "one", &[], &[1i64])?;
    add_constant(&mut graph, "zero_f", &[], &[0f32])?;
    add_constant(&mut graph, "minus_infinity", &[], &[f32::NEG_INFINITY])?;
    let axis = |name: &str, value: i64| Attribute::new(name, value);
    let g = &mut graph;
    // The last position's logits, the seen tokens' penalized (a token seen twice is
    // written twice with the same value).
    add_node(
        g,
        "Squeeze",
        &["last_logits", "axis_1"],
        "row_logits",
        vec![],
    )?;
    let gather = vec![axis("axis", 1)?];
    add_node(
        g,
        "GatherElements",
        &["row_logits", SAMPLER_HISTORY],
        "seen",
        gather,
    )?;
    add_node(g, "Greater", &["seen", "zero_f"], "seen_positive", vec![])?;
    add_node(
        g,
        "Div",
        &["seen", SAMPLER_REPETITION_PENALTY],
        "seen_divided",
        vec![],
    )?;
    add_node(
        g,
        "Mul",
        &["seen", SAMPLER_REPETITION_PENALTY],
        "seen_multiplied",
        vec![],
    )?;
    add_node(
        g,
        "Where",
        &["seen_positive", "seen_divided", "seen_multiplied"],
        "seen_penalized",
        vec![],
    )?;
    add_node(
        g,
        "ScatterElements",
        &["row_logits", SAMPLER_HISTORY, "seen_penalized"],
        "penalized",
        vec![axis("axis", 1)?],
    )?;
    // Over the temperature, sorted (ties: lower id first).
    add_node(
        g,
        "Div",
        &["penalized", SAMPLER_TEMPERATURE],
        "scaled",
        vec![],
    )?;
    add_node(g, "Shape", &["scaled"], "vocab", vec![axis("start", 1)?])?;
    graph.add_node(Node::new(
        "TopK",
        ONNX_DOMAIN,
        "sort",
        ["scaled", "vocab"],
        ["sorted", "order"],
        [axis("axis", -1)?, axis("largest", 1)?, axis("sorted", 1)?],
    )?)?;
    let g = &mut graph;
    // Top-k: ranks at or past k drop out of the softmax.
    add_node(g, "Squeeze", &["vocab", "axis_0"], "vocab_count", vec![])?;
    add_node(g, "Range", &["zero", "vocab_count", "one"], "rank", vec![])?;
    add_node(
        g,
        "GreaterOrEqual",
        &["rank", SAMPLER_TOP_K],
        "past_k",
        vec![],
    )?;
    add_node(
        g,
        "Where",
        &["past_k", "minus_infinity", "sorted"],
        "top_k_logits",
        vec![],
    )?;
    add_node(
        g,
        "Softmax",
        &["top_k_logits"],
        "probabilities",
        vec![axis("axis", -1)?],
    )?;
    // Top-p: a token stays while the mass before it is below p.
    add_node(
        g,
        "CumSum",
        &["probabilities", "axis_1_scalar"],
        "mass_before",
        vec![axis("exclusive", 1)?],
    )?;
    add_node(
        g,
        "GreaterOrEqual",
        &["mass_before", SAMPLER_TOP_P],
        "past_p",
        vec![],
    )?;
    add_node(
        g,
        "Where",
        &["past_p", "zero_f", "probabilities"],
        "kept",
        vec![],
    )?;
    // The draw: the first token whose cumulative mass passes uniform * kept mass.
    add_node(
        g,
        "CumSum",
        &["kept", "axis_1_scalar"],
        "mass_through",
        vec![],
    )?;
    add_node(
        g,
        "Gather",
        &["mass_through", "last"],
        "kept_mass",
        vec![axis("axis", 1)?],
    )?;
    add_node(g, "Mul", &[SAMPLER_UNIFORM, "kept_mass"], "target", vec![])?;
    add_node(
        g,
        "LessOrEqual",
        &["mass_through", "target"],
        "passed",
        vec![],
    )?;
    add_node(g, "Cast", &["passed"], "passed_count", vec![axis("to", 7)?])?;
    add_node(
        g,
        "ReduceSum",
        &["passed_count", "axis_1"],
        "drawn_rank",
        vec![axis("keepdims", 1)?],
    )?;
    // Rounding can leave the target at the whole mass: keep the rank inside the table.
    add_node(g, "Sub", &["vocab", "one"], "last_rank", vec![])?;
    add_node(g, "Min", &["drawn_rank", "last_rank"], "rank_drawn", vec![])?;
    add_node(
        g,
        "GatherElements",
        &["order", "rank_drawn"],
        PICKER_TOKEN_IDS,
        vec![axis("axis", 1)?],
    )?;
    session_from_graph(graph, environment, options, "the token sampler")
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
