//! The one safe layer over the raw Triton API (`triton-sys`), and nothing else.
//!
//! Every `unsafe` call into Triton lives in this module. Handles borrow the objects
//! Triton passes to an entry point for as long as that call lasts; they can only be
//! made by the `unsafe fn from_raw` constructors, whose callers promise the pointer is
//! live. Owned objects (requests, responses, response factories, requests sent into the
//! server) release what they hold on drop. Every `TRITONSERVER_Error` that Triton
//! returns is read and deleted here, so none leaks and no message is dropped.

mod handles;
mod inference;
mod memory_report;
mod request;
mod response;
mod server;

pub use handles::{
    BackendHandle, ExecutionTimes, Handle, HandleKind, InstanceHandle, InstanceKind, ModelHandle,
};
pub use inference::{
    InFlight, InferenceRequestBuilder, InferenceResponse, ResponseEvent, ResponseOutput,
};
pub use request::Request;
pub use response::{Response, ResponseFactory};
pub use server::Server;

use std::ffi::{CStr, CString, c_char, c_void};
use std::fmt;
use std::ptr::{self, NonNull};

use triton_sys as sys;

use crate::types::{DataType, ParameterValue};

pub use crate::error::ErrorCode;

impl ErrorCode {
    fn to_raw(self) -> sys::TRITONSERVER_Error_Code {
        match self {
            ErrorCode::Unknown => sys::TRITONSERVER_ERROR_UNKNOWN,
            ErrorCode::Internal => sys::TRITONSERVER_ERROR_INTERNAL,
            ErrorCode::NotFound => sys::TRITONSERVER_ERROR_NOT_FOUND,
            ErrorCode::InvalidArg => sys::TRITONSERVER_ERROR_INVALID_ARG,
            ErrorCode::Unavailable => sys::TRITONSERVER_ERROR_UNAVAILABLE,
            ErrorCode::Unsupported => sys::TRITONSERVER_ERROR_UNSUPPORTED,
            ErrorCode::AlreadyExists => sys::TRITONSERVER_ERROR_ALREADY_EXISTS,
            ErrorCode::Cancelled => sys::TRITONSERVER_ERROR_CANCELLED,
        }
    }

    fn from_raw(code: sys::TRITONSERVER_Error_Code) -> Self {
        match code {
            sys::TRITONSERVER_ERROR_INTERNAL => ErrorCode::Internal,
            sys::TRITONSERVER_ERROR_NOT_FOUND => ErrorCode::NotFound,
            sys::TRITONSERVER_ERROR_INVALID_ARG => ErrorCode::InvalidArg,
            sys::TRITONSERVER_ERROR_UNAVAILABLE => ErrorCode::Unavailable,
            sys::TRITONSERVER_ERROR_UNSUPPORTED => ErrorCode::Unsupported,
            sys::TRITONSERVER_ERROR_ALREADY_EXISTS => ErrorCode::AlreadyExists,
            sys::TRITONSERVER_ERROR_CANCELLED => ErrorCode::Cancelled,
            _ => ErrorCode::Unknown,
        }
    }
}

/// An owned Triton error: a code and a message, converted to a `TRITONSERVER_Error`
/// only at the moment it is handed to Triton.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::Internal, message)
    }

    pub fn invalid_arg(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::InvalidArg, message)
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::Unsupported, message)
    }

    /// Creates the `TRITONSERVER_Error` whose ownership passes to the caller (Triton).
    pub fn into_raw(self) -> *mut sys::TRITONSERVER_Error {
        let message = c_string_lossy(&self.message);
        // SAFETY: ErrorNew copies the NUL-terminated message; the result is owned by the caller.
        unsafe { sys::TRITONSERVER_ErrorNew(self.code.to_raw(), message.as_ptr()) }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Makes a C string, replacing interior NULs so a message is never lost.
pub(crate) fn c_string_lossy(text: &str) -> CString {
    CString::new(text.replace('\0', "\\0")).unwrap_or_default()
}

/// Turns an error returned by a Triton API call into a `Result`, deleting it.
pub(crate) fn check(raw: *mut sys::TRITONSERVER_Error) -> Result<()> {
    let Some(raw) = NonNull::new(raw) else {
        return Ok(());
    };
    // SAFETY: `raw` is a live error just returned by Triton and owned by us; the message
    // is copied before the error is deleted exactly once.
    unsafe {
        let code = ErrorCode::from_raw(sys::TRITONSERVER_ErrorCode(raw.as_ptr()));
        let message_ptr = sys::TRITONSERVER_ErrorMessage(raw.as_ptr());
        let message = if message_ptr.is_null() {
            String::from("(no message)")
        } else {
            CStr::from_ptr(message_ptr).to_string_lossy().into_owned()
        };
        sys::TRITONSERVER_ErrorDelete(raw.as_ptr());
        Err(Error { code, message })
    }
}

/// Copies a C string owned by Triton.
///
/// # Safety
/// `text` must be null or point to a NUL-terminated string live for this call.
pub(crate) unsafe fn copy_c_str(text: *const c_char) -> String {
    if text.is_null() {
        return String::new();
    }
    // SAFETY: guaranteed by the caller.
    unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned()
}

// ---------------------------------------------------------------------------------------
// Logging

#[derive(Debug, Clone, Copy)]
pub enum LogLevel {
    Info,
    Warn,
    Error,
    Verbose,
}

/// Writes one line to Triton's log.
pub fn log(level: LogLevel, file: &str, line: u32, message: &str) {
    let level = match level {
        LogLevel::Info => sys::TRITONSERVER_LOG_INFO,
        LogLevel::Warn => sys::TRITONSERVER_LOG_WARN,
        LogLevel::Error => sys::TRITONSERVER_LOG_ERROR,
        LogLevel::Verbose => sys::TRITONSERVER_LOG_VERBOSE,
    };
    let file = c_string_lossy(file);
    let message = c_string_lossy(message);
    let line = i32::try_from(line).unwrap_or(i32::MAX);
    // SAFETY: both strings are NUL-terminated and outlive the call, which copies them.
    let result = check(unsafe {
        sys::TRITONSERVER_LogMessage(level, file.as_ptr(), line, message.as_ptr())
    });
    if let Err(error) = result {
        eprintln!(
            "triton-rust: could not log ({error}): {}",
            message.to_string_lossy()
        );
    }
}

#[macro_export]
macro_rules! log_info {
    ($($arg:tt)*) => { $crate::triton::log($crate::triton::LogLevel::Info, file!(), line!(), &format!($($arg)*)) };
}
#[macro_export]
macro_rules! log_warn {
    ($($arg:tt)*) => { $crate::triton::log($crate::triton::LogLevel::Warn, file!(), line!(), &format!($($arg)*)) };
}
#[macro_export]
macro_rules! log_error {
    ($($arg:tt)*) => { $crate::triton::log($crate::triton::LogLevel::Error, file!(), line!(), &format!($($arg)*)) };
}
#[macro_export]
macro_rules! log_verbose {
    ($($arg:tt)*) => { $crate::triton::log($crate::triton::LogLevel::Verbose, file!(), line!(), &format!($($arg)*)) };
}

// ---------------------------------------------------------------------------------------
// Server-wide facts

/// The backend API version of the running server, `(major, minor)`.
pub fn server_api_version() -> Result<(u32, u32)> {
    let (mut major, mut minor) = (0u32, 0u32);
    // SAFETY: both out-pointers are valid for writes.
    check(unsafe { sys::TRITONBACKEND_ApiVersion(&mut major, &mut minor) })?;
    Ok((major, minor))
}

/// The backend API version these bindings were generated from.
pub const BUILT_API_VERSION: (u32, u32) = (
    sys::TRITONBACKEND_API_VERSION_MAJOR,
    sys::TRITONBACKEND_API_VERSION_MINOR,
);

/// Monotonic clock in nanoseconds, the clock Triton's statistics use.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is valid for writes; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

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
