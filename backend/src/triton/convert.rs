//! Values read from and written to Triton by value: datatypes, C++ bools, messages,
//! parameters (never transmuted from C).

use std::ffi::{c_char, c_void};
use std::ptr;

use triton_sys as sys;

use super::error::{Error, Result, check, copy_c_str};
use crate::types::{DataType, ParameterValue};

/// Copies a Triton message out as JSON.
///
/// # Safety
/// `message` must be a live message for the duration of the call.
pub(crate) unsafe fn message_json(message: *mut sys::TRITONSERVER_Message) -> Result<String> {
    let (mut base, mut size) = (ptr::null::<c_char>(), 0usize);
    // SAFETY: `message` is live (caller); base/size are valid out-pointers.
    check(unsafe { sys::TRITONSERVER_MessageSerializeToJson(message, &mut base, &mut size) })?;
    if base.is_null() {
        return Ok(String::new());
    }
    // SAFETY: Triton guarantees `size` readable bytes at `base` while the message lives.
    let bytes = unsafe { std::slice::from_raw_parts(base.cast::<u8>(), size) };
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

/// Copies out a message the caller owns, then deletes it.
///
/// # Safety
/// `message` must be a live message owned by the caller, not used afterwards.
pub(crate) unsafe fn owned_message_json(message: *mut sys::TRITONSERVER_Message) -> Result<String> {
    // SAFETY: the message is live (caller).
    let json = unsafe { message_json(message) };
    // SAFETY: the message is ours and deleted exactly once, after the copy above.
    let deleted = check(unsafe { sys::TRITONSERVER_MessageDelete(message) });
    let json = json?;
    deleted?;
    Ok(json)
}

// ---------------------------------------------------------------------------------------
// Datatypes, mapped by value (never transmuted from C)

/// The datatype Triton names by `raw`; `None` for one this backend does not know.
pub(crate) fn data_type_from_raw(raw: sys::TRITONSERVER_DataType) -> Option<DataType> {
    Some(match raw {
        sys::TRITONSERVER_TYPE_BOOL => DataType::Bool,
        sys::TRITONSERVER_TYPE_UINT8 => DataType::Uint8,
        sys::TRITONSERVER_TYPE_UINT16 => DataType::Uint16,
        sys::TRITONSERVER_TYPE_UINT32 => DataType::Uint32,
        sys::TRITONSERVER_TYPE_UINT64 => DataType::Uint64,
        sys::TRITONSERVER_TYPE_INT8 => DataType::Int8,
        sys::TRITONSERVER_TYPE_INT16 => DataType::Int16,
        sys::TRITONSERVER_TYPE_INT32 => DataType::Int32,
        sys::TRITONSERVER_TYPE_INT64 => DataType::Int64,
        sys::TRITONSERVER_TYPE_FP16 => DataType::Fp16,
        sys::TRITONSERVER_TYPE_FP32 => DataType::Fp32,
        sys::TRITONSERVER_TYPE_FP64 => DataType::Fp64,
        sys::TRITONSERVER_TYPE_BYTES => DataType::Bytes,
        sys::TRITONSERVER_TYPE_BF16 => DataType::Bf16,
        _ => return None,
    })
}

/// Triton's value for `datatype`.
pub(crate) fn data_type_to_raw(datatype: DataType) -> sys::TRITONSERVER_DataType {
    match datatype {
        DataType::Bool => sys::TRITONSERVER_TYPE_BOOL,
        DataType::Uint8 => sys::TRITONSERVER_TYPE_UINT8,
        DataType::Uint16 => sys::TRITONSERVER_TYPE_UINT16,
        DataType::Uint32 => sys::TRITONSERVER_TYPE_UINT32,
        DataType::Uint64 => sys::TRITONSERVER_TYPE_UINT64,
        DataType::Int8 => sys::TRITONSERVER_TYPE_INT8,
        DataType::Int16 => sys::TRITONSERVER_TYPE_INT16,
        DataType::Int32 => sys::TRITONSERVER_TYPE_INT32,
        DataType::Int64 => sys::TRITONSERVER_TYPE_INT64,
        DataType::Fp16 => sys::TRITONSERVER_TYPE_FP16,
        DataType::Fp32 => sys::TRITONSERVER_TYPE_FP32,
        DataType::Fp64 => sys::TRITONSERVER_TYPE_FP64,
        DataType::Bytes => sys::TRITONSERVER_TYPE_BYTES,
        DataType::Bf16 => sys::TRITONSERVER_TYPE_BF16,
    }
}

/// Whether Triton placed a buffer in host memory (plain or pinned), the only memory
/// this backend reads and writes.
pub(crate) fn is_host_memory(memory_type: sys::TRITONSERVER_MemoryType) -> bool {
    memory_type == sys::TRITONSERVER_MEMORY_CPU
        || memory_type == sys::TRITONSERVER_MEMORY_CPU_PINNED
}

/// Calls a Triton getter whose out-parameter is a C++ `bool` and reads it as a byte:
/// any non-zero byte is true (a Rust `bool` holding another value would be undefined
/// behaviour).
pub(crate) fn read_bool(
    get: impl FnOnce(*mut bool) -> *mut sys::TRITONSERVER_Error,
) -> Result<bool> {
    let mut byte = 0u8;
    check(get((&raw mut byte).cast::<bool>()))?;
    Ok(byte != 0)
}

/// Reads `count` parameters through `get(index, key, kind, value)`, the shape of
/// Triton's request and response parameter getters. A C++ bool is read as a byte.
pub(crate) fn read_parameters(
    count: u32,
    get: impl Fn(
        u32,
        *mut *const c_char,
        *mut sys::TRITONSERVER_ParameterType,
        *mut *const c_void,
    ) -> *mut sys::TRITONSERVER_Error,
) -> Result<Vec<(String, ParameterValue)>> {
    (0..count)
        .map(|index| {
            let mut key = ptr::null();
            let mut kind = 0;
            let mut value = ptr::null();
            check(get(index, &mut key, &mut kind, &mut value))?;
            // SAFETY: Triton returned a NUL-terminated key, live as long as its owner.
            let key = unsafe { copy_c_str(key) };
            // SAFETY: Triton returned the value of the type it names in `kind`
            // (tritonserver.h), live as long as its owner.
            let value = unsafe { read_parameter(kind, value) }
                .ok_or_else(|| Error::invalid_arg(format!("parameter '{key}' has no value")))?;
            Ok((key, value))
        })
        .collect()
}

/// One parameter value of the type `kind` names; `None` when it is null.
///
/// # Safety
/// `value` must be null or point to what `kind` names: a NUL-terminated string, an
/// `int64_t`, a C++ `bool` (read as a byte: any non-zero byte is true) or a `double`.
unsafe fn read_parameter(
    kind: sys::TRITONSERVER_ParameterType,
    value: *const c_void,
) -> Option<ParameterValue> {
    if value.is_null() {
        return None;
    }
    // SAFETY: per the caller.
    Some(unsafe {
        match kind {
            sys::TRITONSERVER_PARAMETER_STRING => {
                ParameterValue::String(copy_c_str(value.cast::<c_char>()))
            }
            sys::TRITONSERVER_PARAMETER_INT => ParameterValue::Int(*value.cast::<i64>()),
            sys::TRITONSERVER_PARAMETER_BOOL => ParameterValue::Bool(*value.cast::<u8>() != 0),
            sys::TRITONSERVER_PARAMETER_DOUBLE => ParameterValue::Double(*value.cast::<f64>()),
            _ => ParameterValue::Other,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_read_by_kind() {
        let number = 42i64;
        let flag = 2u8; // any non-zero byte of a C++ bool is true
        let real = 1.5f64;
        let text = c"hi";
        // SAFETY: each pointer points to the type its kind names, live here.
        unsafe {
            assert_eq!(
                read_parameter(sys::TRITONSERVER_PARAMETER_INT, (&raw const number).cast()),
                Some(ParameterValue::Int(42))
            );
            assert_eq!(
                read_parameter(sys::TRITONSERVER_PARAMETER_BOOL, (&raw const flag).cast()),
                Some(ParameterValue::Bool(true))
            );
            assert_eq!(
                read_parameter(sys::TRITONSERVER_PARAMETER_DOUBLE, (&raw const real).cast()),
                Some(ParameterValue::Double(1.5))
            );
            assert_eq!(
                read_parameter(sys::TRITONSERVER_PARAMETER_STRING, text.as_ptr().cast()),
                Some(ParameterValue::String("hi".into()))
            );
            assert_eq!(
                read_parameter(sys::TRITONSERVER_PARAMETER_BYTES, text.as_ptr().cast()),
                Some(ParameterValue::Other)
            );
            assert_eq!(
                read_parameter(sys::TRITONSERVER_PARAMETER_INT, ptr::null()),
                None
            );
        }
    }
}
