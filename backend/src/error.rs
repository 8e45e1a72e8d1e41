//! Errors of the model logic (no FFI), mapped to Triton error codes at the boundary.

/// Triton's error codes (the safe layer maps them to and from C by value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Unknown,
    Internal,
    NotFound,
    InvalidArg,
    Unavailable,
    Unsupported,
    AlreadyExists,
    Cancelled,
}

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
    /// The tokenizer failed doing `context`.
    #[error("tokenizer: {context}: {source}")]
    Tokenizer {
        context: String,
        #[source]
        source: tokenizers::Error,
    },
    /// The ONNX Runtime library cannot be found or loaded.
    #[error("ONNX Runtime: {0}")]
    OnnxRuntimeLibrary(String),
    /// An ONNX Runtime call failed.
    #[error("ONNX Runtime: {0}")]
    Onnx(#[from] ort::Error),
    /// An ONNX Runtime call failed doing `context`.
    #[error("ONNX Runtime: {context}: {source}")]
    OnnxContext {
        context: String,
        #[source]
        source: ort::Error,
    },
    /// The model or the server cannot do what was asked.
    #[error("{0}")]
    Unsupported(String),
    /// Something this request needs is not available now (e.g. another model).
    #[error("{0}")]
    Unavailable(String),
    /// An error another model of the server answered, passed on with its code.
    #[error("{message}")]
    Relayed { code: ErrorCode, message: String },
    /// A bug in this backend, or a model that breaks what it promised at load (e.g. an
    /// output of the wrong shape); panics end up here too.
    #[error("internal error: {0}")]
    Internal(String),
}

impl BackendError {
    /// An ONNX Runtime error with what was being done.
    pub fn onnx(context: impl Into<String>, source: impl Into<ort::Error>) -> Self {
        BackendError::OnnxContext {
            context: context.into(),
            source: source.into(),
        }
    }

    /// A tokenizer error with what was being done.
    pub fn tokenizer(context: impl Into<String>, source: tokenizers::Error) -> Self {
        BackendError::Tokenizer {
            context: context.into(),
            source,
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        BackendError::Internal(message.into())
    }

    /// `what` the model computed holds a NaN or infinity: answering from it would be a
    /// wrong answer with a 200.
    pub fn not_finite(what: impl std::fmt::Display) -> Self {
        BackendError::Internal(format!(
            "{what} not finite (NaN or infinity): the model's weights or its export are \
             broken, e.g. a float16 export that overflows"
        ))
    }
}

/// The message a panic carries (a `&str` or a `String`), for logs and errors.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn errors_keep_their_source() {
        let source: tokenizers::Error = "bad merges".into();
        let error = BackendError::tokenizer("cannot load tokenizer.json", source);
        assert_eq!(
            error.to_string(),
            "tokenizer: cannot load tokenizer.json: bad merges"
        );
        assert_eq!(
            error.source().map(ToString::to_string).as_deref(),
            Some("bad merges")
        );
        assert_eq!(
            BackendError::internal("panic while running the model: boom").to_string(),
            "internal error: panic while running the model: boom"
        );
    }
}
