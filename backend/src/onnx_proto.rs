//! The few `onnx.proto` messages the backend reads from `model.onnx` itself: the
//! initializers (to share weights between instances) and the graph's outputs (to
//! auto-complete a config's sizes). Tags are as in `onnx.proto`; prost skips the rest.

use std::path::Path;

use bytes::Bytes;
use prost::Message;

#[derive(Clone, PartialEq, Message)]
pub struct ModelProto {
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    #[prost(float, repeated, tag = "4")]
    pub float_data: Vec<f32>,
    #[prost(string, tag = "8")]
    pub name: String,
    #[prost(bytes = "bytes", tag = "9")]
    pub raw_data: Bytes,
    /// 1: the data is in another file (ONNX Runtime reads those itself).
    #[prost(int32, tag = "14")]
    pub data_location: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct ValueInfoProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TypeProto {
    #[prost(message, optional, tag = "1")]
    pub tensor_type: Option<TensorTypeProto>,
}

/// `TypeProto.Tensor`.
#[derive(Clone, PartialEq, Message)]
pub struct TensorTypeProto {
    #[prost(message, optional, tag = "2")]
    pub shape: Option<TensorShapeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<Dimension>,
}

/// `TensorShapeProto.Dimension`: a size, or a name for a size known only at run time.
#[derive(Clone, PartialEq, Message)]
pub struct Dimension {
    #[prost(int64, optional, tag = "1")]
    pub dim_value: Option<i64>,
    #[prost(string, optional, tag = "2")]
    pub dim_param: Option<String>,
}

/// `TensorProto.DataType.FLOAT`.
pub const FLOAT: i32 = 1;

impl ModelProto {
    /// Reads and decodes `path`; the initializers' bytes stay in the file's buffer.
    pub fn read(path: &Path) -> Result<Self, String> {
        let file = std::fs::read(path).map_err(|e| e.to_string())?;
        ModelProto::decode(Bytes::from(file)).map_err(|e| e.to_string())
    }

    /// The size of the last dimension of the graph output `name` (or of its only
    /// output), when the graph fixes it.
    pub fn output_width(&self, name: &str) -> Option<i64> {
        let outputs = &self.graph.as_ref()?.output;
        let output = match outputs.iter().find(|o| o.name == name) {
            Some(output) => output,
            None if outputs.len() == 1 => &outputs[0],
            None => return None,
        };
        let shape = output
            .r#type
            .as_ref()?
            .tensor_type
            .as_ref()?
            .shape
            .as_ref()?;
        shape.dim.last()?.dim_value.filter(|&width| width > 0)
    }
}

/// A graph with only outputs, as `(name, dims)` with `None` for a named dimension.
#[cfg(test)]
pub(crate) fn graph_with_outputs(outputs: &[(&str, &[Option<i64>])]) -> ModelProto {
    let output = outputs
        .iter()
        .map(|&(name, dims)| ValueInfoProto {
            name: name.to_owned(),
            r#type: Some(TypeProto {
                tensor_type: Some(TensorTypeProto {
                    shape: Some(TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|&d| Dimension {
                                dim_value: d,
                                dim_param: d.is_none().then(|| "batch".to_owned()),
                            })
                            .collect(),
                    }),
                }),
            }),
        })
        .collect();
    ModelProto {
        graph: Some(GraphProto {
            initializer: Vec::new(),
            output,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(outputs: &[(&str, &[Option<i64>])]) -> ModelProto {
        let encoded = graph_with_outputs(outputs).encode_to_vec();
        ModelProto::decode(encoded.as_slice()).expect("decodes what it encoded")
    }

    #[test]
    fn the_width_is_the_named_outputs_last_fixed_dimension() {
        let two = decoded(&[
            ("logits", &[None, Some(3)]),
            ("hidden", &[None, None, Some(64)]),
        ]);
        assert_eq!(two.output_width("logits"), Some(3));
        assert_eq!(two.output_width("hidden"), Some(64));
        assert_eq!(two.output_width("missing"), None);
        let only = decoded(&[("scores", &[None, Some(5)])]);
        assert_eq!(only.output_width("logits"), Some(5));
        let variable = decoded(&[("logits", &[None, None])]);
        assert_eq!(variable.output_width("logits"), None);
        assert_eq!(ModelProto::default().output_width("logits"), None);
    }
}
