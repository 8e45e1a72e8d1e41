//! The calls loadgen makes to a Triton server, over HTTP/REST or gRPC, with answers in
//! protocol-neutral types.

mod grpc;
mod http;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use grpc::GrpcClient;
pub use http::HttpClient;

/// Response parameters a response carries about itself (Triton's own; not reported).
const TRITON_PARAMETER_PREFIX: &str = "triton_";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("HTTP request to {url} failed: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}: {message}")]
    HttpStatus {
        url: String,
        status: u16,
        message: String,
    },
    #[error("cannot connect to the gRPC endpoint {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("gRPC {call} failed ({code:?}): {message}", code = .source.code(), message = .source.message())]
    Grpc {
        call: &'static str,
        #[source]
        source: tonic::Status,
    },
    #[error("{model} answered with an error: {message}")]
    Stream { model: String, message: String },
    #[error("the server's answer to {call} is malformed: {detail}")]
    Malformed { call: &'static str, detail: String },
    #[error("model '{0}' is decoupled: its responses stream over gRPC only (use --protocol grpc)")]
    DecoupledOverHttp(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// An error with the causes its message leaves out (reqwest and tonic say "error
/// sending request" and keep "connection refused" in their sources).
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(source) = cause {
        let detail = source.to_string();
        if !text.contains(&detail) {
            text = format!("{text}: {detail}");
        }
        cause = source.source();
    }
    text
}

/// A server's health and identity.
#[derive(Debug, Clone, Serialize)]
pub struct ServerHealth {
    pub live: bool,
    pub ready: bool,
    pub name: String,
    pub version: String,
}

/// One row of the repository index (HTTP leaves out what a model without versions
/// lacks).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelEntry {
    pub name: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

impl ModelEntry {
    pub fn is_ready(&self) -> bool {
        self.state == "READY"
    }
}

/// What loadgen needs from a model's configuration.
#[derive(Debug, Clone, Default)]
pub struct ModelSpec {
    pub name: String,
    pub max_batch_size: i64,
    pub inputs: Vec<InputSpec>,
    pub decoupled: bool,
    /// The config's `parameters`, as strings.
    pub parameters: BTreeMap<String, String>,
}

/// A declared input: KServe datatype (`BYTES`, `FP32`, ...) and dims (-1 = any).
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    pub name: String,
    pub datatype: String,
    pub dims: Vec<i64>,
    pub optional: bool,
}

/// The KServe datatype of a model configuration's `TYPE_*` name.
fn kserve_datatype(config_type: &str) -> String {
    match config_type.strip_prefix("TYPE_").unwrap_or(config_type) {
        "STRING" => "BYTES".to_owned(),
        other => other.to_owned(),
    }
}

/// One input tensor of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct InputTensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub data: TensorData,
}

/// Row-major elements of an input.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Bytes(Vec<String>),
    Bool(Vec<bool>),
    Int32(Vec<i32>),
    Int64(Vec<i64>),
    Fp32(Vec<f32>),
    Fp64(Vec<f64>),
}

impl TensorData {
    pub fn datatype(&self) -> &'static str {
        match self {
            Self::Bytes(_) => "BYTES",
            Self::Bool(_) => "BOOL",
            Self::Int32(_) => "INT32",
            Self::Int64(_) => "INT64",
            Self::Fp32(_) => "FP32",
            Self::Fp64(_) => "FP64",
        }
    }
}

/// A KServe request parameter.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ParameterValue {
    Bool(bool),
    Int(i64),
    Text(String),
}

impl ParameterValue {
    /// `true`/`false`, an integer, else text.
    pub fn parse(text: &str) -> Self {
        match text {
            "true" => Self::Bool(true),
            "false" => Self::Bool(false),
            _ => text
                .parse()
                .map(Self::Int)
                .unwrap_or_else(|_| Self::Text(text.to_owned())),
        }
    }
}

/// One inference request.
#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    pub model: String,
    pub inputs: Vec<InputTensor>,
    pub parameters: BTreeMap<String, ParameterValue>,
}

/// A model's answer to one request: every response of a stream, put together.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Answer {
    pub outputs: Vec<OutputSummary>,
    /// Response parameters (e.g. the A/B arm), as text.
    pub parameters: BTreeMap<String, String>,
    /// Responses received (more than one from a decoupled model).
    pub responses: usize,
    /// Time from sending to the first response of a stream.
    #[serde(skip)]
    pub first_response_after: Option<Duration>,
}

impl Answer {
    /// Adds one response's outputs: text pieces of a stream are joined, other outputs
    /// keep their latest value.
    fn add(&mut self, outputs: Vec<OutputSummary>, parameters: BTreeMap<String, String>) {
        self.responses += 1;
        for output in outputs {
            match self.outputs.iter_mut().find(|o| o.name == output.name) {
                Some(seen) if seen.datatype == "BYTES" && output.datatype == "BYTES" => {
                    seen.values.extend(output.values);
                    seen.shape = vec![seen.values.len() as i64];
                }
                Some(seen) => *seen = output,
                None => self.outputs.push(output),
            }
        }
        self.parameters.extend(
            parameters
                .into_iter()
                .filter(|(key, _)| !key.starts_with(TRITON_PARAMETER_PREFIX)),
        );
    }
}

/// An output tensor, with its values as text (what a report shows).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputSummary {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    pub values: Vec<String>,
}

/// A connection to one server over one protocol. Cheap to clone: clones share the
/// connection pool.
#[derive(Debug, Clone)]
pub enum Client {
    Http(HttpClient),
    Grpc(GrpcClient),
}

impl Client {
    pub fn protocol(&self) -> &'static str {
        match self {
            Self::Http(_) => "http",
            Self::Grpc(_) => "grpc",
        }
    }

    pub async fn health(&self) -> Result<ServerHealth, ClientError> {
        match self {
            Self::Http(client) => client.health().await,
            Self::Grpc(client) => client.health().await,
        }
    }

    pub async fn models(&self) -> Result<Vec<ModelEntry>, ClientError> {
        match self {
            Self::Http(client) => client.models().await,
            Self::Grpc(client) => client.models().await,
        }
    }

    pub async fn model_spec(&self, model: &str) -> Result<ModelSpec, ClientError> {
        match self {
            Self::Http(client) => client.model_spec(model).await,
            Self::Grpc(client) => client.model_spec(model).await,
        }
    }

    /// Sends one request and waits for its answer (every response, for a decoupled
    /// model), at most `timeout`.
    pub async fn infer(
        &self,
        request: &InferRequest,
        decoupled: bool,
        timeout: Duration,
    ) -> Result<Answer, ClientError> {
        let call = async {
            match (self, decoupled) {
                (Self::Http(client), false) => client.infer(request).await,
                (Self::Http(_), true) => Err(ClientError::DecoupledOverHttp(request.model.clone())),
                (Self::Grpc(client), false) => client.infer(request).await,
                (Self::Grpc(client), true) => client.infer_stream(request).await,
            }
        };
        tokio::time::timeout(timeout, call)
            .await
            .unwrap_or(Err(ClientError::Timeout(timeout)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Outer(#[source] Inner);
    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner(#[source] std::io::Error);

    #[test]
    fn descriptions_add_causes_not_already_said() {
        let error = Outer(Inner(std::io::Error::other("refused")));
        assert_eq!(describe(&error), "outer: inner: refused");
    }

    #[test]
    fn config_types_become_kserve_datatypes() {
        assert_eq!(kserve_datatype("TYPE_STRING"), "BYTES");
        assert_eq!(kserve_datatype("TYPE_FP32"), "FP32");
        assert_eq!(kserve_datatype("BOOL"), "BOOL");
    }

    #[test]
    fn parameters_parse_as_bool_int_or_text() {
        assert_eq!(ParameterValue::parse("true"), ParameterValue::Bool(true));
        assert_eq!(ParameterValue::parse("-8"), ParameterValue::Int(-8));
        assert_eq!(
            ParameterValue::parse("alice"),
            ParameterValue::Text("alice".into())
        );
    }

    fn text(name: &str, values: &[&str]) -> OutputSummary {
        OutputSummary {
            name: name.into(),
            datatype: "BYTES".into(),
            shape: vec![values.len() as i64],
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn streamed_text_is_joined_and_triton_parameters_dropped() {
        let mut answer = Answer::default();
        let arm = BTreeMap::from([
            ("ab_test_group".to_owned(), "v1".to_owned()),
            ("triton_final_response".to_owned(), "false".to_owned()),
        ]);
        answer.add(vec![text("text_output", &["Hel"])], arm.clone());
        answer.add(vec![text("text_output", &["lo"])], arm);
        assert_eq!(answer.responses, 2);
        assert_eq!(answer.outputs, vec![text("text_output", &["Hel", "lo"])]);
        assert_eq!(
            answer.parameters,
            BTreeMap::from([("ab_test_group".to_owned(), "v1".to_owned())])
        );
    }
}
