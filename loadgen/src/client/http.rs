//! Triton's HTTP/REST protocol (KServe v2 with Triton's extensions), JSON bodies.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{
    Answer, ClientError, InferRequest, InputSpec, ModelEntry, ModelSpec, OutputSummary,
    ServerHealth, TensorData, kserve_datatype,
};

#[derive(Debug, Clone)]
pub struct HttpClient {
    base: String,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct ServerMetadata {
    name: String,
    version: String,
}

#[derive(Deserialize)]
struct Config {
    name: String,
    #[serde(default)]
    max_batch_size: i64,
    #[serde(default)]
    input: Vec<ConfigInput>,
    #[serde(default)]
    model_transaction_policy: TransactionPolicy,
    #[serde(default)]
    parameters: BTreeMap<String, ConfigParameter>,
}

#[derive(Deserialize)]
struct ConfigInput {
    name: String,
    data_type: String,
    #[serde(default)]
    dims: Vec<i64>,
    #[serde(default)]
    optional: bool,
}

#[derive(Deserialize, Default)]
struct TransactionPolicy {
    #[serde(default)]
    decoupled: bool,
}

#[derive(Deserialize)]
struct ConfigParameter {
    string_value: String,
}

#[derive(Deserialize)]
struct InferResponse {
    #[serde(default)]
    outputs: Vec<OutputTensor>,
    #[serde(default)]
    parameters: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct OutputTensor {
    name: String,
    datatype: String,
    shape: Vec<i64>,
    #[serde(default)]
    data: Vec<Value>,
}

/// A JSON scalar as text: strings without quotes.
fn scalar_text(value: Value) -> String {
    match value {
        Value::String(text) => text,
        other => other.to_string(),
    }
}

impl HttpClient {
    /// `address` is `host:port` or a URL.
    pub fn new(address: &str, connections: usize) -> Result<Self, ClientError> {
        let base = if address.contains("://") {
            address.trim_end_matches('/').to_owned()
        } else {
            format!("http://{address}")
        };
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(connections)
            .build()
            .map_err(|source| ClientError::Http {
                url: base.clone(),
                source,
            })?;
        Ok(Self { base, http })
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::Response, ClientError> {
        let http_error = |source| ClientError::Http {
            url: url.to_owned(),
            source,
        };
        let response = request.send().await.map_err(http_error)?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        // Triton's errors are `{"error": "..."}`.
        let body = response.text().await.map_err(http_error)?;
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|value| {
                value
                    .get("error")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .unwrap_or(body);
        Err(ClientError::HttpStatus {
            url: url.to_owned(),
            status: status.as_u16(),
            message,
        })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<T, ClientError> {
        self.send(request, url)
            .await?
            .json()
            .await
            .map_err(|source| ClientError::Http {
                url: url.to_owned(),
                source,
            })
    }

    async fn probe(&self, path: &str) -> Result<bool, ClientError> {
        let url = format!("{}{path}", self.base);
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|source| ClientError::Http { url, source })?;
        Ok(response.status().is_success())
    }

    pub async fn health(&self) -> Result<ServerHealth, ClientError> {
        let live = self.probe("/v2/health/live").await?;
        let ready = self.probe("/v2/health/ready").await?;
        let url = format!("{}/v2", self.base);
        let metadata: ServerMetadata = self.json(self.http.get(&url), &url).await?;
        Ok(ServerHealth {
            live,
            ready,
            name: metadata.name,
            version: metadata.version,
        })
    }

    pub async fn models(&self) -> Result<Vec<ModelEntry>, ClientError> {
        let url = format!("{}/v2/repository/index", self.base);
        self.json(self.http.post(&url).json(&json!({})), &url).await
    }

    pub async fn model_spec(&self, model: &str) -> Result<ModelSpec, ClientError> {
        let url = format!("{}/v2/models/{model}/config", self.base);
        let config: Config = self.json(self.http.get(&url), &url).await?;
        Ok(ModelSpec {
            name: config.name,
            max_batch_size: config.max_batch_size,
            inputs: config
                .input
                .into_iter()
                .map(|input| InputSpec {
                    name: input.name,
                    datatype: kserve_datatype(&input.data_type),
                    dims: input.dims,
                    optional: input.optional,
                })
                .collect(),
            decoupled: config.model_transaction_policy.decoupled,
            parameters: config
                .parameters
                .into_iter()
                .map(|(key, value)| (key, value.string_value))
                .collect(),
        })
    }

    pub async fn infer(&self, request: &InferRequest) -> Result<Answer, ClientError> {
        let url = format!("{}/v2/models/{}/infer", self.base, request.model);
        let inputs: Vec<Value> = request
            .inputs
            .iter()
            .map(|input| {
                let data = match &input.data {
                    TensorData::Bytes(values) => json!(values),
                    TensorData::Bool(values) => json!(values),
                    TensorData::Int32(values) => json!(values),
                    TensorData::Int64(values) => json!(values),
                    TensorData::Fp32(values) => json!(values),
                    TensorData::Fp64(values) => json!(values),
                };
                json!({
                    "name": input.name,
                    "datatype": input.data.datatype(),
                    "shape": input.shape,
                    "data": data,
                })
            })
            .collect();
        let body = json!({ "inputs": inputs, "parameters": request.parameters });
        let response: InferResponse = self.json(self.http.post(&url).json(&body), &url).await?;
        let mut answer = Answer::default();
        answer.add(
            response
                .outputs
                .into_iter()
                .map(|output| OutputSummary {
                    name: output.name,
                    datatype: output.datatype,
                    shape: output.shape,
                    values: output.data.into_iter().map(scalar_text).collect(),
                })
                .collect(),
            response
                .parameters
                .into_iter()
                .map(|(key, value)| (key, scalar_text(value)))
                .collect(),
        );
        Ok(answer)
    }
}
