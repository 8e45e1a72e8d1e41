//! One copy of a model's weights for all its instances. Each instance has its own ONNX
//! Runtime session, and a session loads its own copy of every initializer (and of the
//! prepacked form ONNX Runtime makes of a MatMul's weights), so `count: 4` held four
//! copies. Here the weights are read from `model.onnx` once per model version and
//! handed to every session as user-provided initializers, with one prepacked-weights
//! container: ONNX Runtime's own way to share initializers and their prepacked forms
//! between sessions.

use std::path::Path;
use std::sync::Arc;

use ort::session::builder::{PrepackedWeights, SessionBuilder};
use ort::value::{DynValue, Tensor};

use crate::error::BackendError;
use crate::onnx_proto::{FLOAT, ModelProto};

/// Initializers smaller than this stay in the model: scalars and shapes cost nothing,
/// and graph optimizations fold them as constants.
const MIN_SHARED_ELEMENTS: usize = 1024;

/// The shared initializers of one model version and the container of their prepacked
/// forms.
pub struct SharedWeights {
    initializers: Vec<(String, Arc<DynValue>)>,
    prepacked: PrepackedWeights,
    bytes: usize,
}

impl std::fmt::Debug for SharedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedWeights")
            .field("initializers", &self.initializers.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl SharedWeights {
    /// Reads the FP32 weights stored inside `model_path` (external data and small
    /// constants stay with ONNX Runtime).
    pub fn read(model_path: &Path) -> Result<Self, BackendError> {
        let cannot = |what: String| {
            BackendError::ModelFile(format!(
                "cannot read the weights of {} to share them: {what}",
                model_path.display()
            ))
        };
        let model = ModelProto::read(model_path).map_err(cannot)?;
        let mut initializers = Vec::new();
        let mut bytes = 0;
        for tensor in model.graph.map(|g| g.initializer).unwrap_or_default() {
            if tensor.data_type != FLOAT || tensor.data_location == 1 {
                continue;
            }
            let shape: Vec<usize> = tensor
                .dims
                .iter()
                .map(|&d| usize::try_from(d))
                .collect::<Result<_, _>>()
                .map_err(|_| cannot(format!("'{}' has dims {:?}", tensor.name, tensor.dims)))?;
            let count: usize = shape.iter().product();
            if count < MIN_SHARED_ELEMENTS {
                continue;
            }
            let values = if tensor.raw_data.is_empty() {
                tensor.float_data
            } else {
                tensor
                    .raw_data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            };
            if values.len() != count {
                return Err(cannot(format!(
                    "'{}' has {} values for dims {:?}",
                    tensor.name,
                    values.len(),
                    tensor.dims
                )));
            }
            bytes += count * 4;
            let value = Tensor::from_array((shape, values))?.into_dyn();
            initializers.push((tensor.name, Arc::new(value)));
        }
        Ok(SharedWeights {
            initializers,
            prepacked: PrepackedWeights::new(),
            bytes,
        })
    }

    /// Bytes of the shared weights.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// `builder`, told to use the shared weights and prepacked forms.
    pub fn apply(&self, mut builder: SessionBuilder) -> Result<SessionBuilder, BackendError> {
        for (name, value) in &self.initializers {
            builder = builder
                .with_initializer(name, Arc::clone(value))
                .map_err(|e| BackendError::onnx(format!("cannot share initializer '{name}'"), e))?;
        }
        builder
            .with_prepacked_weights(&self.prepacked)
            .map_err(|e| BackendError::onnx("cannot share prepacked weights", e))
    }
}
