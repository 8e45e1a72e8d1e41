//! Triton's BYTES tensor layout: per element a little-endian `u32` length, then the bytes.
//!
//! The server checks datatype, shape and element count but not the length prefixes or
//! the text encoding, so both are checked here.

use crate::error::BackendError;

/// Splits a BYTES buffer into exactly `expected` elements.
pub fn decode_elements(data: &[u8], expected: usize) -> Result<Vec<&[u8]>, BackendError> {
    let mut elements = Vec::with_capacity(expected.min(data.len() / 4 + 1));
    let mut rest = data;
    while !rest.is_empty() {
        let index = elements.len();
        let (prefix, tail) = rest.split_at_checked(4).ok_or_else(|| {
            BackendError::InvalidInput(format!(
                "BYTES element {index} has a truncated length prefix ({} of 4 bytes)",
                rest.len()
            ))
        })?;
        let length = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        let (element, tail) = tail.split_at_checked(length).ok_or_else(|| {
            BackendError::InvalidInput(format!(
                "BYTES element {index} declares {length} bytes but only {} remain",
                tail.len()
            ))
        })?;
        elements.push(element);
        rest = tail;
    }
    if elements.len() != expected {
        return Err(BackendError::InvalidInput(format!(
            "BYTES tensor holds {} elements but its shape says {expected}",
            elements.len()
        )));
    }
    Ok(elements)
}

/// Decodes a BYTES buffer of `expected` elements into non-empty UTF-8 texts.
pub fn decode_texts(
    input_name: &str,
    data: &[u8],
    expected: usize,
) -> Result<Vec<String>, BackendError> {
    decode_elements(data, expected)
        .map_err(|e| BackendError::InvalidInput(format!("input '{input_name}': {e}")))?
        .into_iter()
        .enumerate()
        .map(|(index, bytes)| {
            let text = std::str::from_utf8(bytes).map_err(|e| {
                BackendError::InvalidInput(format!(
                    "input '{input_name}' element {index} is not valid UTF-8 ({e})"
                ))
            })?;
            if text.trim().is_empty() {
                return Err(BackendError::InvalidInput(format!(
                    "input '{input_name}' element {index} is empty"
                )));
            }
            Ok(text.to_owned())
        })
        .collect()
}

/// Encodes elements into one BYTES buffer.
pub fn encode_elements<S: AsRef<[u8]>>(elements: &[S]) -> Vec<u8> {
    let total: usize = elements.iter().map(|e| 4 + e.as_ref().len()).sum();
    let mut out = Vec::with_capacity(total);
    for element in elements {
        let bytes = element.as_ref();
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_elements() {
        let encoded = encode_elements(&["héllo", "", "世界"]);
        let decoded = decode_elements(&encoded, 3).expect("valid buffer");
        assert_eq!(decoded, vec!["héllo".as_bytes(), b"", "世界".as_bytes()]);
    }

    #[test]
    fn rejects_truncated_prefix() {
        let mut encoded = encode_elements(&["ok"]);
        encoded.extend_from_slice(&[5, 0]);
        let error = decode_elements(&encoded, 2).unwrap_err().to_string();
        assert!(error.contains("truncated length prefix"), "{error}");
    }

    #[test]
    fn rejects_length_past_end() {
        let mut encoded = 100u32.to_le_bytes().to_vec();
        encoded.extend_from_slice(b"short");
        let error = decode_elements(&encoded, 1).unwrap_err().to_string();
        assert!(
            error.contains("declares 100 bytes but only 5 remain"),
            "{error}"
        );
    }

    #[test]
    fn rejects_wrong_element_count() {
        let encoded = encode_elements(&["a", "b"]);
        let error = decode_elements(&encoded, 3).unwrap_err().to_string();
        assert!(error.contains("holds 2 elements"), "{error}");
    }

    #[test]
    fn rejects_invalid_utf8_and_empty_text() {
        let bad = encode_elements(&[&b"ok"[..], &[0xff, 0xfe][..]]);
        let error = decode_texts("text_input", &bad, 2).unwrap_err().to_string();
        assert!(error.contains("element 1 is not valid UTF-8"), "{error}");

        let empty = encode_elements(&["fine", "  "]);
        let error = decode_texts("text_input", &empty, 2)
            .unwrap_err()
            .to_string();
        assert!(error.contains("element 1 is empty"), "{error}");
    }

    #[test]
    fn empty_buffer_is_zero_elements() {
        assert!(decode_elements(&[], 0).expect("empty").is_empty());
    }

    proptest! {
        /// Untrusted bytes: any buffer is split or refused, never a panic, and what is
        /// split accounts for every byte.
        #[test]
        fn any_buffer_is_split_or_refused(data in proptest::collection::vec(any::<u8>(), 0..64), expected in 0usize..8) {
            if let Ok(elements) = decode_elements(&data, expected) {
                prop_assert_eq!(elements.len(), expected);
                let total: usize = elements.iter().map(|e| 4 + e.len()).sum();
                prop_assert_eq!(total, data.len());
            }
            let _ = decode_texts("text_input", &data, expected);
        }

        #[test]
        fn encoding_round_trips(elements in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..16), 0..8)) {
            let encoded = encode_elements(&elements);
            let decoded = decode_elements(&encoded, elements.len()).expect("own encoding");
            prop_assert_eq!(decoded, elements.iter().map(Vec::as_slice).collect::<Vec<_>>());
        }
    }
}
