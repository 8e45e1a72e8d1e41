//! Texts sent as a BYTES `text_input` tensor, as every text task reads them.

use crate::bytes_tensor;
use crate::error::BackendError;
use crate::types::{DataType, InputTensor, element_count};

/// The input that carries texts.
pub const TEXT_INPUT: &str = "text_input";

/// The texts of a `text_input` tensor: BYTES, one non-empty UTF-8 text of at most
/// `max_bytes` bytes per element.
pub fn read_texts(input: &InputTensor<'_>, max_bytes: usize) -> Result<Vec<String>, BackendError> {
    if input.datatype != DataType::Bytes {
        return Err(BackendError::InvalidInput(format!(
            "input '{TEXT_INPUT}' must be BYTES, not {}",
            input.datatype.name()
        )));
    }
    let count = element_count(TEXT_INPUT, &input.shape)?;
    let texts = bytes_tensor::decode_texts(TEXT_INPUT, &input.data, count)?;
    if let Some((index, text)) = texts.iter().enumerate().find(|(_, t)| t.len() > max_bytes) {
        return Err(BackendError::InvalidInput(format!(
            "input '{TEXT_INPUT}' element {index} holds {} bytes; this model takes at most \
             {max_bytes} per text (parameter 'max_text_bytes')",
            text.len()
        )));
    }
    Ok(texts)
}
