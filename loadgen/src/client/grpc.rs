//! Triton's gRPC protocol, through the client generated from Triton's own protos
//! (`build.rs`).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use tonic::transport::{Channel, Endpoint};

use super::{
    Answer, ClientError, InferRequest, InputSpec, ModelEntry, ModelSpec, OutputSummary,
    ParameterValue, ServerHealth, TensorData, kserve_datatype,
};

#[allow(clippy::all, clippy::pedantic)]
mod proto {
    tonic::include_proto!("inference");
}

use proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use proto::infer_parameter::ParameterChoice;
use proto::model_infer_request::InferInputTensor;
use proto::{
    DataType, InferParameter, InferTensorContents, ModelConfigRequest, ModelInferRequest,
    ModelInferResponse, RepositoryIndexRequest, ServerLiveRequest, ServerMetadataRequest,
    ServerReadyRequest,
};

/// Asks a decoupled model to flag its last response even when it carries no outputs,
/// so a stream's end is always seen.
const EMPTY_FINAL_RESPONSE: &str = "triton_enable_empty_final_response";
/// Set on the last response of a stream.
const FINAL_RESPONSE: &str = "triton_final_response";
/// Generation outputs and embeddings can be large; Triton allows up to 2 GB.
const MAX_MESSAGE_BYTES: usize = 256 << 20;

#[derive(Debug, Clone)]
pub struct GrpcClient {
    service: GrpcInferenceServiceClient<Channel>,
}

fn grpc_error(call: &'static str) -> impl Fn(tonic::Status) -> ClientError {
    move |source| ClientError::Grpc { call, source }
}

fn parameter_text(parameter: InferParameter) -> String {
    match parameter.parameter_choice {
        Some(ParameterChoice::BoolParam(value)) => value.to_string(),
        Some(ParameterChoice::Int64Param(value)) => value.to_string(),
        Some(ParameterChoice::StringParam(value)) => value,
        Some(ParameterChoice::DoubleParam(value)) => value.to_string(),
        Some(ParameterChoice::Uint64Param(value)) => value.to_string(),
        None => String::new(),
    }
}

fn infer_parameter(value: &ParameterValue) -> InferParameter {
    let choice = match value {
        ParameterValue::Bool(value) => ParameterChoice::BoolParam(*value),
        ParameterValue::Int(value) => ParameterChoice::Int64Param(*value),
        ParameterValue::Text(value) => ParameterChoice::StringParam(value.clone()),
    };
    InferParameter {
        parameter_choice: Some(choice),
    }
}

fn contents(data: &TensorData) -> InferTensorContents {
    let mut contents = InferTensorContents::default();
    match data {
        TensorData::Bytes(values) => {
            contents.bytes_contents = values.iter().map(|v| v.as_bytes().to_vec()).collect();
        }
        TensorData::Bool(values) => contents.bool_contents.clone_from(values),
        TensorData::Int32(values) => contents.int_contents.clone_from(values),
        TensorData::Int64(values) => contents.int64_contents.clone_from(values),
        TensorData::Fp32(values) => contents.fp32_contents.clone_from(values),
        TensorData::Fp64(values) => contents.fp64_contents.clone_from(values),
    }
    contents
}

/// The elements of a raw output buffer as text: BYTES elements are each preceded by
/// their length (4 bytes, little-endian), numbers are little-endian.
fn raw_values(datatype: &str, raw: &[u8]) -> Result<Vec<String>, String> {
    fn numbers<const N: usize, T: ToString>(
        raw: &[u8],
        decode: fn([u8; N]) -> T,
    ) -> Result<Vec<String>, String> {
        let chunks = raw.chunks_exact(N);
        if !chunks.remainder().is_empty() {
            return Err(format!(
                "{} bytes is not a whole number of {N}-byte elements",
                raw.len()
            ));
        }
        Ok(chunks
            .map(|chunk| {
                let mut element = [0; N];
                element.copy_from_slice(chunk);
                decode(element).to_string()
            })
            .collect())
    }
    match datatype {
        "BYTES" => {
            let mut values = Vec::new();
            let mut rest = raw;
            while !rest.is_empty() {
                let (length, tail) = rest
                    .split_first_chunk::<4>()
                    .ok_or("a BYTES element is cut inside its length")?;
                let length = u32::from_le_bytes(*length) as usize;
                if tail.len() < length {
                    return Err(format!("a BYTES element of {length} bytes is cut short"));
                }
                let (element, tail) = tail.split_at(length);
                values.push(String::from_utf8_lossy(element).into_owned());
                rest = tail;
            }
            Ok(values)
        }
        "BOOL" => Ok(raw.iter().map(|byte| (*byte != 0).to_string()).collect()),
        "INT32" => numbers(raw, i32::from_le_bytes),
        "INT64" => numbers(raw, i64::from_le_bytes),
        "FP32" => numbers(raw, f32::from_le_bytes),
        "FP64" => numbers(raw, f64::from_le_bytes),
        _ => Ok(vec![format!("<{} bytes>", raw.len())]),
    }
}

/// A response's outputs and its parameters as text.
type Decoded = (Vec<OutputSummary>, BTreeMap<String, String>);

fn decode(response: ModelInferResponse) -> Result<Decoded, ClientError> {
    let mut raw = response.raw_output_contents.into_iter();
    let outputs = response
        .outputs
        .into_iter()
        .map(|output| {
            let values = match raw.next() {
                Some(buffer) => raw_values(&output.datatype, &buffer).map_err(|detail| {
                    ClientError::Malformed {
                        call: "ModelInfer",
                        detail: format!("output '{}': {detail}", output.name),
                    }
                })?,
                None => Vec::new(),
            };
            Ok(OutputSummary {
                name: output.name,
                datatype: output.datatype,
                shape: output.shape,
                values,
            })
        })
        .collect::<Result<_, ClientError>>()?;
    let parameters = response
        .parameters
        .into_iter()
        .map(|(key, value)| (key, parameter_text(value)))
        .collect();
    Ok((outputs, parameters))
}

impl GrpcClient {
    /// `address` is `host:port` or a URL.
    pub async fn connect(address: &str) -> Result<Self, ClientError> {
        let url = if address.contains("://") {
            address.to_owned()
        } else {
            format!("http://{address}")
        };
        let connect_error = |source| ClientError::Connect {
            url: url.clone(),
            source,
        };
        let channel = Endpoint::from_shared(url.clone())
            .map_err(connect_error)?
            .connect()
            .await
            .map_err(connect_error)?;
        Ok(Self {
            service: GrpcInferenceServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        })
    }

    pub async fn health(&self) -> Result<ServerHealth, ClientError> {
        let mut service = self.service.clone();
        let live = service
            .server_live(ServerLiveRequest {})
            .await
            .map_err(grpc_error("ServerLive"))?
            .into_inner()
            .live;
        let ready = service
            .server_ready(ServerReadyRequest {})
            .await
            .map_err(grpc_error("ServerReady"))?
            .into_inner()
            .ready;
        let metadata = service
            .server_metadata(ServerMetadataRequest {})
            .await
            .map_err(grpc_error("ServerMetadata"))?
            .into_inner();
        Ok(ServerHealth {
            live,
            ready,
            name: metadata.name,
            version: metadata.version,
        })
    }

    pub async fn models(&self) -> Result<Vec<ModelEntry>, ClientError> {
        let index = self
            .service
            .clone()
            .repository_index(RepositoryIndexRequest::default())
            .await
            .map_err(grpc_error("RepositoryIndex"))?
            .into_inner();
        Ok(index
            .models
            .into_iter()
            .map(|row| ModelEntry {
                name: row.name,
                version: row.version,
                state: row.state,
                reason: row.reason,
            })
            .collect())
    }

    pub async fn model_spec(&self, model: &str) -> Result<ModelSpec, ClientError> {
        let config = self
            .service
            .clone()
            .model_config(ModelConfigRequest {
                name: model.to_owned(),
                version: String::new(),
            })
            .await
            .map_err(grpc_error("ModelConfig"))?
            .into_inner()
            .config
            .ok_or_else(|| ClientError::Malformed {
                call: "ModelConfig",
                detail: "no config".into(),
            })?;
        let inputs = config
            .input
            .into_iter()
            .map(|input| {
                let datatype = DataType::try_from(input.data_type)
                    .map(|datatype| kserve_datatype(datatype.as_str_name()))
                    .map_err(|_| ClientError::Malformed {
                        call: "ModelConfig",
                        detail: format!("input '{}' has datatype {}", input.name, input.data_type),
                    })?;
                Ok(InputSpec {
                    name: input.name,
                    datatype,
                    dims: input.dims,
                    optional: input.optional,
                })
            })
            .collect::<Result<_, ClientError>>()?;
        Ok(ModelSpec {
            name: config.name,
            max_batch_size: config.max_batch_size.into(),
            inputs,
            decoupled: config
                .model_transaction_policy
                .is_some_and(|policy| policy.decoupled),
            parameters: config
                .parameters
                .into_iter()
                .map(|(key, value)| (key, value.string_value))
                .collect(),
        })
    }

    fn request(
        request: &InferRequest,
        parameters: HashMap<String, InferParameter>,
    ) -> ModelInferRequest {
        ModelInferRequest {
            model_name: request.model.clone(),
            parameters,
            inputs: request
                .inputs
                .iter()
                .map(|input| InferInputTensor {
                    name: input.name.clone(),
                    datatype: input.data.datatype().to_owned(),
                    shape: input.shape.clone(),
                    contents: Some(contents(&input.data)),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn parameters(request: &InferRequest) -> HashMap<String, InferParameter> {
        request
            .parameters
            .iter()
            .map(|(key, value)| (key.clone(), infer_parameter(value)))
            .collect()
    }

    pub async fn infer(&self, request: &InferRequest) -> Result<Answer, ClientError> {
        let message = Self::request(request, Self::parameters(request));
        let response = self
            .service
            .clone()
            .model_infer(message)
            .await
            .map_err(grpc_error("ModelInfer"))?
            .into_inner();
        let (outputs, parameters) = decode(response)?;
        let mut answer = Answer::default();
        answer.add(outputs, parameters);
        Ok(answer)
    }

    /// Sends one request on a stream and gathers its responses up to the final one.
    pub async fn infer_stream(&self, request: &InferRequest) -> Result<Answer, ClientError> {
        let mut parameters = Self::parameters(request);
        parameters.insert(
            EMPTY_FINAL_RESPONSE.to_owned(),
            infer_parameter(&ParameterValue::Bool(true)),
        );
        let message = Self::request(request, parameters);
        let sent = Instant::now();
        let mut stream = self
            .service
            .clone()
            .model_stream_infer(tokio_stream::once(message))
            .await
            .map_err(grpc_error("ModelStreamInfer"))?
            .into_inner();
        let mut answer = Answer::default();
        loop {
            let Some(message) = stream
                .message()
                .await
                .map_err(grpc_error("ModelStreamInfer"))?
            else {
                return Err(ClientError::Malformed {
                    call: "ModelStreamInfer",
                    detail: "the stream ended before the final response".into(),
                });
            };
            answer
                .first_response_after
                .get_or_insert_with(|| sent.elapsed());
            if !message.error_message.is_empty() {
                return Err(ClientError::Stream {
                    model: request.model.clone(),
                    message: message.error_message,
                });
            }
            let Some(response) = message.infer_response else {
                continue;
            };
            let (outputs, parameters) = decode(response)?;
            let last = parameters
                .get(FINAL_RESPONSE)
                .is_some_and(|flag| flag == "true");
            if !outputs.is_empty() {
                answer.add(outputs, parameters);
            }
            if last {
                // Read on to the stream's end: dropping it now would reset the stream
                // while the server is still closing it.
                while stream
                    .message()
                    .await
                    .map_err(grpc_error("ModelStreamInfer"))?
                    .is_some()
                {}
                return Ok(answer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_bytes_elements_are_length_prefixed() {
        let mut raw = Vec::new();
        for text in ["positive", "", "né"] {
            raw.extend((text.len() as u32).to_le_bytes());
            raw.extend(text.as_bytes());
        }
        assert_eq!(raw_values("BYTES", &raw).unwrap(), ["positive", "", "né"]);
        assert!(raw_values("BYTES", &raw[..raw.len() - 1]).is_err());
        assert!(raw_values("BYTES", &[1, 0]).is_err());
    }

    #[test]
    fn raw_numbers_are_little_endian() {
        let raw: Vec<u8> = [0.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(raw_values("FP32", &raw).unwrap(), ["0.5", "-2"]);
        assert!(raw_values("FP32", &raw[..5]).is_err());
        assert_eq!(raw_values("INT64", &7i64.to_le_bytes()).unwrap(), ["7"]);
        assert_eq!(raw_values("FP16", &[0, 0]).unwrap(), ["<2 bytes>"]);
    }
}
