//! Domain types shared by the tasks and the Triton layer, free of FFI: tensors as the
//! backend reads and writes them, request parameters, and memory usage reports.

use std::borrow::Cow;
use std::fmt;

use crate::error::BackendError;

/// Triton tensor datatypes (the safe layer maps them to and from C by value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
    Bytes,
    Bf16,
}

impl DataType {
    /// The name used in the KServe protocol.
    pub fn name(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
            DataType::Bf16 => "BF16",
        }
    }

    /// The datatype of a model configuration type name (`TYPE_STRING` is BYTES).
    pub fn from_config_name(name: &str) -> Option<Self> {
        Some(match name {
            "TYPE_BOOL" => DataType::Bool,
            "TYPE_UINT8" => DataType::Uint8,
            "TYPE_UINT16" => DataType::Uint16,
            "TYPE_UINT32" => DataType::Uint32,
            "TYPE_UINT64" => DataType::Uint64,
            "TYPE_INT8" => DataType::Int8,
            "TYPE_INT16" => DataType::Int16,
            "TYPE_INT32" => DataType::Int32,
            "TYPE_INT64" => DataType::Int64,
            "TYPE_FP16" => DataType::Fp16,
            "TYPE_FP32" => DataType::Fp32,
            "TYPE_FP64" => DataType::Fp64,
            "TYPE_BF16" => DataType::Bf16,
            "TYPE_STRING" => DataType::Bytes,
            _ => return None,
        })
    }

    /// Bytes per element; BYTES elements have no fixed size (`None`).
    pub fn element_size(self) -> Option<usize> {
        match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => Some(1),
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 | DataType::Bf16 => Some(2),
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => Some(4),
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => Some(8),
            DataType::Bytes => None,
        }
    }
}

/// A request parameter's value, by the type Triton gives it.
#[derive(Debug, Clone, PartialEq)]
pub enum ParameterValue {
    String(String),
    Int(i64),
    Bool(bool),
    Double(f64),
    /// A type this backend does not read (raw bytes).
    Other,
}

impl fmt::Display for ParameterValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParameterValue::String(text) => write!(f, "{text:?}"),
            ParameterValue::Int(value) => write!(f, "{value}"),
            ParameterValue::Bool(value) => write!(f, "{value}"),
            ParameterValue::Double(value) => write!(f, "{value}"),
            ParameterValue::Other => f.write_str("a non-scalar value"),
        }
    }
}

/// One input tensor in host memory: borrowed from Triton's buffer when the request
/// holds it in one piece, else the pieces joined into one copy.
#[derive(Debug, Clone)]
pub struct InputTensor<'a> {
    pub datatype: DataType,
    pub shape: Vec<i64>,
    pub data: Cow<'a, [u8]>,
}

/// A finished output tensor in Triton's byte layout (for outputs whose size is only
/// known once they are computed, e.g. text).
#[derive(Debug, Clone, PartialEq)]
pub struct OutputTensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
    pub data: Vec<u8>,
}

/// Number of elements of a request shape; every dimension must be non-negative.
pub fn element_count(name: &str, shape: &[i64]) -> Result<usize, BackendError> {
    shape.iter().try_fold(1usize, |acc, &d| {
        usize::try_from(d)
            .ok()
            .and_then(|d| acc.checked_mul(d))
            .ok_or_else(|| {
                BackendError::InvalidInput(format!("input '{name}' has shape {shape:?}"))
            })
    })
}

/// Where memory that a model or an instance holds lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MemoryPlace {
    Cpu,
    CpuPinned,
    Gpu { device_id: i64 },
}

/// Bytes held in one place, as reported to `/v2/models/<m>/stats` (`memory_usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryUsage {
    pub place: MemoryPlace,
    pub bytes: u64,
}

impl MemoryUsage {
    /// One entry per place, bytes summed (Triton keeps one entry per place of a report).
    pub fn by_place(usage: &[MemoryUsage]) -> Vec<MemoryUsage> {
        let mut places = std::collections::BTreeMap::<MemoryPlace, u64>::new();
        for entry in usage {
            *places.entry(entry.place).or_default() += entry.bytes;
        }
        places
            .into_iter()
            .map(|(place, bytes)| MemoryUsage { place, bytes })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_usage_sums_per_place() {
        let usage = [
            MemoryUsage {
                place: MemoryPlace::Cpu,
                bytes: 3,
            },
            MemoryUsage {
                place: MemoryPlace::Gpu { device_id: 1 },
                bytes: 5,
            },
            MemoryUsage {
                place: MemoryPlace::Cpu,
                bytes: 4,
            },
        ];
        assert_eq!(
            MemoryUsage::by_place(&usage),
            [
                MemoryUsage {
                    place: MemoryPlace::Cpu,
                    bytes: 7
                },
                MemoryUsage {
                    place: MemoryPlace::Gpu { device_id: 1 },
                    bytes: 5
                },
            ]
        );
    }

    #[test]
    fn element_count_rejects_negative_dims() {
        assert_eq!(element_count("x", &[2, 3]).ok(), Some(6));
        assert_eq!(element_count("x", &[]).ok(), Some(1));
        assert!(element_count("x", &[2, -1]).is_err());
    }

    #[test]
    fn config_names_map_to_datatypes_with_their_sizes() {
        assert_eq!(
            DataType::from_config_name("TYPE_STRING"),
            Some(DataType::Bytes)
        );
        assert_eq!(DataType::Bytes.element_size(), None);
        assert_eq!(
            DataType::from_config_name("TYPE_FP32").and_then(DataType::element_size),
            Some(4)
        );
        assert_eq!(DataType::from_config_name("TYPE_INVALID"), None);
    }
}
