//! Triton errors: read (and deleted) from every call into Triton, and made for Triton.

use std::ffi::{CStr, CString, c_char};
use std::fmt;
use std::ptr::NonNull;

use triton_sys as sys;

use crate::error::{BackendError, ErrorCode};

/// Triton's value for `code`.
fn error_code_to_raw(code: ErrorCode) -> sys::TRITONSERVER_Error_Code {
    match code {
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

/// The code Triton names by `code` (an unknown value is `Unknown`).
pub(super) fn error_code_from_raw(code: sys::TRITONSERVER_Error_Code) -> ErrorCode {
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
        unsafe { sys::TRITONSERVER_ErrorNew(error_code_to_raw(self.code), message.as_ptr()) }
    }
}

impl Error {
    /// This error as the model logic's, keeping its code (e.g. another model's answer
    /// passed on to a client).
    pub fn relayed(self) -> BackendError {
        BackendError::Relayed {
            code: self.code,
            message: self.message,
        }
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

/// A C string for an argument to Triton; an interior NUL is refused rather than altered.
pub(crate) fn c_string(what: &str, text: &str) -> Result<CString> {
    CString::new(text)
        .map_err(|_| Error::invalid_arg(format!("{what} {text:?} contains a NUL byte")))
}

/// Turns an error returned by a Triton API call into a `Result`, deleting it.
pub(crate) fn check(raw: *mut sys::TRITONSERVER_Error) -> Result<()> {
    let Some(raw) = NonNull::new(raw) else {
        return Ok(());
    };
    // SAFETY: `raw` is a live error just returned by Triton and owned by us; the message
    // is copied before the error is deleted exactly once.
    unsafe {
        let code = error_code_from_raw(sys::TRITONSERVER_ErrorCode(raw.as_ptr()));
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
