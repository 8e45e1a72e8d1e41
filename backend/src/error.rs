//! Errors of the model logic (no FFI), mapped to Triton error codes at the boundary.

use crate::triton::{Error, ErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The request is malformed: answered to that request only.
    #[error("{0}")]
    InvalidInput(String),
    /// The model configuration is wrong: the model fails to load.
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// A file the model needs is missing or unreadable.
    #[error("{0}")]
    ModelFile(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("ONNX Runtime: {0}")]
    Onnx(String),
    #[error("{0}")]
    Unsupported(String),
}

impl From<ort::Error> for BackendError {
    fn from(error: ort::Error) -> Self {
        BackendError::Onnx(error.to_string())
    }
}

impl From<BackendError> for Error {
    fn from(error: BackendError) -> Self {
        let code = match &error {
            BackendError::InvalidInput(_) | BackendError::Config(_) => ErrorCode::InvalidArg,
            BackendError::ModelFile(_) => ErrorCode::NotFound,
            BackendError::Unsupported(_) => ErrorCode::Unsupported,
            BackendError::Tokenizer(_) | BackendError::Onnx(_) => ErrorCode::Internal,
        };
        Error::new(code, error.to_string())
    }
}
