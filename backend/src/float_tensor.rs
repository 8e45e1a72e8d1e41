//! The float types a model's outputs may have: float32, or the float16 and bfloat16 of a
//! half-precision export (its logits, hidden states and KV cache). The host reads them
//! as f32; tensors the backend makes for the model (an empty KV cache) take its type.

use std::borrow::Cow;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use ort::value::{DynValue, Outlet, Shape, Tensor, TensorElementType, ValueType};

use crate::error::BackendError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatType {
    F32,
    F16,
    Bf16,
}

impl FloatType {
    /// The float type of the graph's tensor input or output `outlet` (`what` names its
    /// role in the error when it has another type).
    pub fn of(outlet: &Outlet, what: &str) -> Result<Self, BackendError> {
        let element = match outlet.dtype() {
            ValueType::Tensor { ty, .. } => *ty,
            other => {
                return Err(BackendError::Unsupported(format!(
                    "the ONNX model's {what} '{}' is a {other}, not a tensor",
                    outlet.name()
                )));
            }
        };
        match element {
            TensorElementType::Float32 => Ok(FloatType::F32),
            TensorElementType::Float16 => Ok(FloatType::F16),
            TensorElementType::Bfloat16 => Ok(FloatType::Bf16),
            other => Err(BackendError::Unsupported(format!(
                "the ONNX model's {what} '{}' holds {other}; this backend reads float32, \
                 float16 or bfloat16 there",
                outlet.name()
            ))),
        }
    }

    pub fn element_type(self) -> TensorElementType {
        match self {
            FloatType::F32 => TensorElementType::Float32,
            FloatType::F16 => TensorElementType::Float16,
            FloatType::Bf16 => TensorElementType::Bfloat16,
        }
    }

    /// A tensor of this type and `shape` that holds no values (a dimension is 0).
    pub fn empty_tensor(self, shape: Vec<usize>) -> Result<DynValue, BackendError> {
        debug_assert!(shape.contains(&0), "{shape:?} holds values");
        Ok(match self {
            FloatType::F32 => Tensor::<f32>::from_array((shape, Vec::new()))?.into_dyn(),
            FloatType::F16 => Tensor::<f16>::from_array((shape, Vec::new()))?.into_dyn(),
            FloatType::Bf16 => Tensor::<bf16>::from_array((shape, Vec::new()))?.into_dyn(),
        })
    }
}

/// A float tensor's shape and its values as f32: borrowed when it holds f32, converted
/// when it holds float16 or bfloat16.
pub fn read_f32(value: &DynValue) -> Result<(&Shape, Cow<'_, [f32]>), BackendError> {
    Ok(match value.dtype().tensor_type() {
        Some(TensorElementType::Float32) => {
            let (shape, data) = value.try_extract_tensor::<f32>()?;
            (shape, Cow::Borrowed(data))
        }
        Some(TensorElementType::Float16) => {
            let (shape, data) = value.try_extract_tensor::<f16>()?;
            (
                shape,
                Cow::Owned(widened(data, |d, out| d.convert_to_f32_slice(out))),
            )
        }
        Some(TensorElementType::Bfloat16) => {
            let (shape, data) = value.try_extract_tensor::<bf16>()?;
            (
                shape,
                Cow::Owned(widened(data, |d, out| d.convert_to_f32_slice(out))),
            )
        }
        _ => {
            return Err(BackendError::internal(format!(
                "the model's output is a {}, not a float tensor",
                value.dtype()
            )));
        }
    })
}

fn widened<T>(data: &[T], convert: impl FnOnce(&[T], &mut [f32])) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    convert(data, &mut out);
    out
}
