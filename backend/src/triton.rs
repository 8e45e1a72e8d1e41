//! The one safe layer over the raw Triton backend API (`triton-sys`).
//!
//! Every `unsafe` call into Triton lives in this module. Handles are thin wrappers
//! around the pointers Triton passes to an entry point; they can only be made by the
//! `unsafe fn from_raw` constructors, whose callers promise the pointer is live.
//! Every `TRITONSERVER_Error` that Triton returns is read and deleted here, so none
//! leaks and no message is dropped.

use std::cell::Cell;
use std::ffi::{CStr, CString, c_char, c_void};
use std::fmt;
use std::ptr::{self, NonNull};

use triton_sys as sys;

/// Triton's error codes, mapped by value (never transmuted from C).
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
fn c_string_lossy(text: &str) -> CString {
    CString::new(text.replace('\0', "\\0")).unwrap_or_default()
}

/// Turns an error returned by a Triton API call into a `Result`, deleting it.
fn check(raw: *mut sys::TRITONSERVER_Error) -> Result<()> {
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
unsafe fn copy_c_str(text: *const c_char) -> String {
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
unsafe fn message_json(message: *mut sys::TRITONSERVER_Message) -> Result<String> {
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
unsafe fn owned_message_json(message: *mut sys::TRITONSERVER_Message) -> Result<String> {
    // SAFETY: the message is live (caller).
    let json = unsafe { message_json(message) };
    // SAFETY: the message is ours and deleted exactly once, after the copy above.
    let deleted = check(unsafe { sys::TRITONSERVER_MessageDelete(message) });
    let json = json?;
    deleted?;
    Ok(json)
}

// ---------------------------------------------------------------------------------------
// Backend

/// The `TRITONBACKEND_Backend` handle passed to backend-level entry points.
#[derive(Clone, Copy)]
pub struct BackendHandle(NonNull<sys::TRITONBACKEND_Backend>);

impl BackendHandle {
    /// # Safety
    /// `raw` must be the backend handle Triton passed to the current entry point.
    pub unsafe fn from_raw(raw: *mut sys::TRITONBACKEND_Backend) -> Result<Self> {
        NonNull::new(raw)
            .map(BackendHandle)
            .ok_or_else(|| Error::internal("Triton passed a null backend"))
    }

    /// The `--backend-config` settings as JSON (`{"cmdline": {...}}`).
    pub fn config_json(&self) -> Result<String> {
        let mut message = ptr::null_mut();
        // SAFETY: the handle is live; `message` is a valid out-pointer. The message stays
        // owned by Triton: it is read, never deleted.
        check(unsafe { sys::TRITONBACKEND_BackendConfig(self.0.as_ptr(), &mut message) })?;
        // SAFETY: Triton keeps the message live while the backend is.
        unsafe { message_json(message) }
    }

    /// The directory holding this backend's shared library.
    pub fn artifacts_dir(&self) -> Result<String> {
        let mut artifact_type = 0;
        let mut location = ptr::null();
        // SAFETY: the handle is live; out-pointers are valid; `location` is owned by Triton.
        check(unsafe {
            sys::TRITONBACKEND_BackendArtifacts(self.0.as_ptr(), &mut artifact_type, &mut location)
        })?;
        // SAFETY: Triton returns a NUL-terminated string live while the backend is.
        Ok(unsafe { copy_c_str(location) })
    }

    /// Hands a state object to Triton; take it back with [`BackendHandle::take_state`].
    pub fn set_state<T>(&self, state: Box<T>) -> Result<()> {
        let raw = Box::into_raw(state);
        // SAFETY: the handle is live; Triton only stores the pointer.
        let result = check(unsafe {
            sys::TRITONBACKEND_BackendSetState(self.0.as_ptr(), raw.cast::<c_void>())
        });
        if result.is_err() {
            // SAFETY: Triton did not take the pointer, so it is still uniquely ours.
            drop(unsafe { Box::from_raw(raw) });
        }
        result
    }

    /// Borrows the state stored by [`BackendHandle::set_state`].
    ///
    /// # Safety
    /// The state must have been set with the same `T` and not taken yet.
    pub unsafe fn state<'a, T>(&self) -> Result<&'a T> {
        let mut raw = ptr::null_mut();
        // SAFETY: the handle is live; `raw` is a valid out-pointer.
        check(unsafe { sys::TRITONBACKEND_BackendState(self.0.as_ptr(), &mut raw) })?;
        // SAFETY: per the caller, `raw` is null or a live `Box<T>` we leaked in set_state.
        unsafe { raw.cast::<T>().as_ref() }
            .ok_or_else(|| Error::internal("the backend has no state"))
    }

    /// Takes back the state stored by [`BackendHandle::set_state`].
    ///
    /// # Safety
    /// The state must have been set with the same `T`; it must not be used afterwards.
    pub unsafe fn take_state<T>(&self) -> Result<Option<Box<T>>> {
        let mut raw = ptr::null_mut();
        // SAFETY: the handle is live; `raw` is a valid out-pointer.
        check(unsafe { sys::TRITONBACKEND_BackendState(self.0.as_ptr(), &mut raw) })?;
        // SAFETY: per the caller, `raw` is null or the `Box<T>` leaked in set_state.
        Ok((!raw.is_null()).then(|| unsafe { Box::from_raw(raw.cast::<T>()) }))
    }
}

// ---------------------------------------------------------------------------------------
// Model

/// The `TRITONBACKEND_Model` handle: live from ModelInitialize to ModelFinalize.
#[derive(Clone, Copy)]
pub struct ModelHandle(NonNull<sys::TRITONBACKEND_Model>);

impl ModelHandle {
    /// # Safety
    /// `raw` must be a model handle Triton passed to the current entry point.
    pub unsafe fn from_raw(raw: *mut sys::TRITONBACKEND_Model) -> Result<Self> {
        NonNull::new(raw)
            .map(ModelHandle)
            .ok_or_else(|| Error::internal("Triton passed a null model"))
    }

    pub fn name(&self) -> Result<String> {
        let mut name = ptr::null();
        // SAFETY: the handle is live; `name` is a valid out-pointer owned by Triton.
        check(unsafe { sys::TRITONBACKEND_ModelName(self.0.as_ptr(), &mut name) })?;
        // SAFETY: a NUL-terminated string live while the model is.
        Ok(unsafe { copy_c_str(name) })
    }

    pub fn version(&self) -> Result<u64> {
        let mut version = 0u64;
        // SAFETY: the handle is live; `version` is a valid out-pointer.
        check(unsafe { sys::TRITONBACKEND_ModelVersion(self.0.as_ptr(), &mut version) })?;
        Ok(version)
    }

    /// The model's directory in the repository (the version is a subdirectory).
    pub fn repository_path(&self) -> Result<String> {
        let mut artifact_type = 0;
        let mut location = ptr::null();
        // SAFETY: the handle is live; out-pointers are valid.
        check(unsafe {
            sys::TRITONBACKEND_ModelRepository(self.0.as_ptr(), &mut artifact_type, &mut location)
        })?;
        if artifact_type != sys::TRITONBACKEND_ARTIFACT_FILESYSTEM {
            return Err(Error::unsupported(
                "the model repository must be on a local filesystem",
            ));
        }
        // SAFETY: a NUL-terminated string live while the model is.
        Ok(unsafe { copy_c_str(location) })
    }

    /// The model configuration (after auto-complete) as JSON.
    pub fn config_json(&self) -> Result<String> {
        let mut message = ptr::null_mut();
        // SAFETY: the handle is live; `message` is a valid out-pointer and becomes ours.
        check(unsafe { sys::TRITONBACKEND_ModelConfig(self.0.as_ptr(), 1, &mut message) })?;
        // SAFETY: the caller owns the model config message (tritonbackend.h).
        unsafe { owned_message_json(message) }
    }

    /// The backend that owns this model.
    pub fn backend(&self) -> Result<BackendHandle> {
        let mut backend = ptr::null_mut();
        // SAFETY: the handle is live; `backend` is a valid out-pointer.
        check(unsafe { sys::TRITONBACKEND_ModelBackend(self.0.as_ptr(), &mut backend) })?;
        // SAFETY: Triton returns the live backend that owns this live model.
        unsafe { BackendHandle::from_raw(backend) }
    }

    pub fn set_state<T>(&self, state: Box<T>) -> Result<()> {
        let raw = Box::into_raw(state);
        // SAFETY: the handle is live; Triton only stores the pointer.
        let result =
            check(unsafe { sys::TRITONBACKEND_ModelSetState(self.0.as_ptr(), raw.cast()) });
        if result.is_err() {
            // SAFETY: Triton did not take the pointer, so it is still uniquely ours.
            drop(unsafe { Box::from_raw(raw) });
        }
        result
    }

    /// # Safety
    /// The state must have been set with the same `T` and not taken yet.
    pub unsafe fn state<'a, T>(&self) -> Result<&'a T> {
        let mut raw = ptr::null_mut();
        // SAFETY: the handle is live; `raw` is a valid out-pointer.
        check(unsafe { sys::TRITONBACKEND_ModelState(self.0.as_ptr(), &mut raw) })?;
        // SAFETY: per the caller, `raw` is null or the live `Box<T>` leaked in set_state.
        unsafe { raw.cast::<T>().as_ref() }.ok_or_else(|| Error::internal("the model has no state"))
    }

    /// # Safety
    /// The state must have been set with the same `T`; it must not be used afterwards.
    pub unsafe fn take_state<T>(&self) -> Result<Option<Box<T>>> {
        let mut raw = ptr::null_mut();
        // SAFETY: the handle is live; `raw` is a valid out-pointer.
        check(unsafe { sys::TRITONBACKEND_ModelState(self.0.as_ptr(), &mut raw) })?;
        // SAFETY: per the caller, `raw` is null or the `Box<T>` leaked in set_state.
        Ok((!raw.is_null()).then(|| unsafe { Box::from_raw(raw.cast::<T>()) }))
    }
}

// ---------------------------------------------------------------------------------------
// Model instance

/// Where an instance runs, from its `instance_group` kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceKind {
    Cpu,
    Gpu { device_id: i32 },
    Model { device_id: i32 },
    Auto,
}

/// The `TRITONBACKEND_ModelInstance` handle: live from instance initialize to finalize.
#[derive(Clone, Copy)]
pub struct InstanceHandle(NonNull<sys::TRITONBACKEND_ModelInstance>);

impl InstanceHandle {
    /// # Safety
    /// `raw` must be an instance handle Triton passed to the current entry point.
    pub unsafe fn from_raw(raw: *mut sys::TRITONBACKEND_ModelInstance) -> Result<Self> {
        NonNull::new(raw)
            .map(InstanceHandle)
            .ok_or_else(|| Error::internal("Triton passed a null model instance"))
    }

    pub fn name(&self) -> Result<String> {
        let mut name = ptr::null();
        // SAFETY: the handle is live; `name` is a valid out-pointer.
        check(unsafe { sys::TRITONBACKEND_ModelInstanceName(self.0.as_ptr(), &mut name) })?;
        // SAFETY: a NUL-terminated string live while the instance is.
        Ok(unsafe { copy_c_str(name) })
    }

    pub fn kind(&self) -> Result<InstanceKind> {
        let mut kind = 0;
        let mut device_id = 0i32;
        // SAFETY: the handle is live; out-pointers are valid.
        check(unsafe { sys::TRITONBACKEND_ModelInstanceKind(self.0.as_ptr(), &mut kind) })?;
        // SAFETY: as above.
        check(unsafe {
            sys::TRITONBACKEND_ModelInstanceDeviceId(self.0.as_ptr(), &mut device_id)
        })?;
        Ok(match kind {
            sys::TRITONSERVER_INSTANCEGROUPKIND_CPU => InstanceKind::Cpu,
            sys::TRITONSERVER_INSTANCEGROUPKIND_GPU => InstanceKind::Gpu { device_id },
            sys::TRITONSERVER_INSTANCEGROUPKIND_MODEL => InstanceKind::Model { device_id },
            _ => InstanceKind::Auto,
        })
    }

    pub fn model(&self) -> Result<ModelHandle> {
        let mut model = ptr::null_mut();
        // SAFETY: the handle is live; `model` is a valid out-pointer.
        check(unsafe { sys::TRITONBACKEND_ModelInstanceModel(self.0.as_ptr(), &mut model) })?;
        // SAFETY: Triton returns the live model owning this live instance.
        unsafe { ModelHandle::from_raw(model) }
    }

    pub fn set_state<T>(&self, state: Box<T>) -> Result<()> {
        let raw = Box::into_raw(state);
        // SAFETY: the handle is live; Triton only stores the pointer.
        let result =
            check(unsafe { sys::TRITONBACKEND_ModelInstanceSetState(self.0.as_ptr(), raw.cast()) });
        if result.is_err() {
            // SAFETY: Triton did not take the pointer, so it is still uniquely ours.
            drop(unsafe { Box::from_raw(raw) });
        }
        result
    }

    /// # Safety
    /// The state must have been set with the same `T`; it must not be used afterwards.
    pub unsafe fn take_state<T>(&self) -> Result<Option<Box<T>>> {
        let mut raw = ptr::null_mut();
        // SAFETY: the handle is live; `raw` is a valid out-pointer.
        check(unsafe { sys::TRITONBACKEND_ModelInstanceState(self.0.as_ptr(), &mut raw) })?;
        // SAFETY: per the caller, `raw` is null or the `Box<T>` leaked in set_state.
        Ok((!raw.is_null()).then(|| unsafe { Box::from_raw(raw.cast::<T>()) }))
    }

    /// Reports one request's timings to `/v2/models/<m>/stats` and the metrics.
    pub fn report_request_statistics(
        &self,
        request: &Request,
        success: bool,
        times: &ExecutionTimes,
    ) -> Result<()> {
        // SAFETY: both handles are live; the call only reads them.
        check(unsafe {
            sys::TRITONBACKEND_ModelInstanceReportStatistics(
                self.0.as_ptr(),
                request.raw.as_ptr(),
                success,
                times.exec_start_ns,
                times.compute_start_ns,
                times.compute_end_ns,
                times.exec_end_ns,
            )
        })
    }

    /// Reports one batch (one model execution) of `batch_size` items.
    pub fn report_batch_statistics(&self, batch_size: u64, times: &ExecutionTimes) -> Result<()> {
        // SAFETY: the handle is live.
        check(unsafe {
            sys::TRITONBACKEND_ModelInstanceReportBatchStatistics(
                self.0.as_ptr(),
                batch_size,
                times.exec_start_ns,
                times.compute_start_ns,
                times.compute_end_ns,
                times.exec_end_ns,
            )
        })
    }
}

/// The four timestamps Triton's statistics want, from [`now_ns`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ExecutionTimes {
    pub exec_start_ns: u64,
    pub compute_start_ns: u64,
    pub compute_end_ns: u64,
    pub exec_end_ns: u64,
}

// ---------------------------------------------------------------------------------------
// Requests, inputs, responses

/// Triton tensor datatypes, mapped by value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
    Bytes,
    Bf16,
}

impl DataType {
    fn from_raw(raw: sys::TRITONSERVER_DataType) -> Option<Self> {
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

    fn to_raw(self) -> sys::TRITONSERVER_DataType {
        match self {
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

    /// The name used in model configurations and the KServe protocol.
    pub fn name(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
            DataType::Bf16 => "BF16",
        }
    }
}

/// An inference request handed to the backend by `ModelInstanceExecute`.
///
/// Owning: dropping it releases the request back to Triton, so every path releases
/// each request exactly once, and answers it with an error first if nothing created
/// its final response.
pub struct Request {
    raw: NonNull<sys::TRITONBACKEND_Request>,
    /// Whether its final response exists (that response answers it, even when dropped).
    has_final_response: Cell<bool>,
}

impl Request {
    /// # Safety
    /// `raw` must be a request passed to the current execute call, not yet released,
    /// and wrapped only once.
    pub unsafe fn from_raw(raw: *mut sys::TRITONBACKEND_Request) -> Result<Self> {
        NonNull::new(raw)
            .map(|raw| Request {
                raw,
                has_final_response: Cell::new(false),
            })
            .ok_or_else(|| Error::internal("Triton passed a null request"))
    }

    /// The request id given by the client (may be empty).
    pub fn id(&self) -> String {
        let mut id = ptr::null();
        // SAFETY: the request is live; `id` is a valid out-pointer.
        match check(unsafe { sys::TRITONBACKEND_RequestId(self.raw.as_ptr(), &mut id) }) {
            // SAFETY: a NUL-terminated string live while the request is.
            Ok(()) => unsafe { copy_c_str(id) },
            Err(_) => String::new(),
        }
    }

    /// Whether the client cancelled this request (or went away, where the protocol
    /// tells); a failed check counts as not cancelled.
    pub fn is_cancelled(&self) -> bool {
        let mut cancelled = false;
        // SAFETY: the request is live; `cancelled` is a valid out-pointer.
        let result = check(unsafe {
            sys::TRITONBACKEND_RequestIsCancelled(self.raw.as_ptr(), &mut cancelled)
        });
        result.is_ok() && cancelled
    }

    /// Names of the inputs present in this request.
    pub fn input_names(&self) -> Result<Vec<String>> {
        let mut count = 0u32;
        // SAFETY: the request is live; `count` is a valid out-pointer.
        check(unsafe { sys::TRITONBACKEND_RequestInputCount(self.raw.as_ptr(), &mut count) })?;
        (0..count)
            .map(|index| {
                let mut name = ptr::null();
                // SAFETY: `index` < count; `name` is a valid out-pointer.
                check(unsafe {
                    sys::TRITONBACKEND_RequestInputName(self.raw.as_ptr(), index, &mut name)
                })?;
                // SAFETY: a NUL-terminated string live while the request is.
                Ok(unsafe { copy_c_str(name) })
            })
            .collect()
    }

    /// Names of the outputs the client asked for (all outputs when it named none).
    pub fn requested_output_names(&self) -> Result<Vec<String>> {
        let mut count = 0u32;
        // SAFETY: the request is live; `count` is a valid out-pointer.
        check(unsafe { sys::TRITONBACKEND_RequestOutputCount(self.raw.as_ptr(), &mut count) })?;
        (0..count)
            .map(|index| {
                let mut name = ptr::null();
                // SAFETY: `index` < count; `name` is a valid out-pointer.
                check(unsafe {
                    sys::TRITONBACKEND_RequestOutputName(self.raw.as_ptr(), index, &mut name)
                })?;
                // SAFETY: a NUL-terminated string live while the request is.
                Ok(unsafe { copy_c_str(name) })
            })
            .collect()
    }

    /// The request's parameters (KServe `parameters`), in no particular order.
    pub fn parameters(&self) -> Result<Vec<(String, ParameterValue)>> {
        let mut count = 0u32;
        // SAFETY: the request is live; `count` is a valid out-pointer.
        check(unsafe { sys::TRITONBACKEND_RequestParameterCount(self.raw.as_ptr(), &mut count) })?;
        (0..count)
            .map(|index| {
                let mut key = ptr::null();
                let mut kind = 0;
                let mut value = ptr::null();
                // SAFETY: `index` < count; out-pointers are valid; the returned key and
                // value live as long as the request.
                check(unsafe {
                    sys::TRITONBACKEND_RequestParameter(
                        self.raw.as_ptr(),
                        index,
                        &mut key,
                        &mut kind,
                        &mut value,
                    )
                })?;
                // SAFETY: a NUL-terminated key live while the request is.
                let key = unsafe { copy_c_str(key) };
                if value.is_null() {
                    return Err(Error::invalid_arg(format!(
                        "parameter '{key}' has no value"
                    )));
                }
                // SAFETY: `value` points to the type Triton names in `kind` (tritonserver.h):
                // a C string, an int64, a bool or a double, live while the request is.
                let value = unsafe {
                    match kind {
                        sys::TRITONSERVER_PARAMETER_STRING => {
                            ParameterValue::String(copy_c_str(value.cast::<c_char>()))
                        }
                        sys::TRITONSERVER_PARAMETER_INT => {
                            ParameterValue::Int(*value.cast::<i64>())
                        }
                        sys::TRITONSERVER_PARAMETER_BOOL => {
                            ParameterValue::Bool(*value.cast::<bool>())
                        }
                        sys::TRITONSERVER_PARAMETER_DOUBLE => {
                            ParameterValue::Double(*value.cast::<f64>())
                        }
                        _ => ParameterValue::Other,
                    }
                };
                Ok((key, value))
            })
            .collect()
    }

    /// Reads one input into host memory: its datatype, shape and bytes, with every
    /// buffer Triton split it into concatenated in order.
    pub fn read_input(&self, name: &str) -> Result<InputTensor> {
        let c_name = c_string_lossy(name);
        let mut input = ptr::null_mut();
        // SAFETY: the request is live; `c_name` is NUL-terminated; `input` is an out-pointer.
        check(unsafe {
            sys::TRITONBACKEND_RequestInput(self.raw.as_ptr(), c_name.as_ptr(), &mut input)
        })?;
        let mut datatype = 0;
        let mut shape_ptr = ptr::null();
        let mut dims_count = 0u32;
        let mut byte_size = 0u64;
        let mut buffer_count = 0u32;
        // SAFETY: `input` was just returned for this live request; out-pointers are valid;
        // the name out-pointer may be null.
        check(unsafe {
            sys::TRITONBACKEND_InputProperties(
                input,
                ptr::null_mut(),
                &mut datatype,
                &mut shape_ptr,
                &mut dims_count,
                &mut byte_size,
                &mut buffer_count,
            )
        })?;
        let shape = if shape_ptr.is_null() || dims_count == 0 {
            Vec::new()
        } else {
            // SAFETY: Triton guarantees `dims_count` dims at `shape_ptr` while the request lives.
            unsafe { std::slice::from_raw_parts(shape_ptr, dims_count as usize) }.to_vec()
        };
        let datatype = DataType::from_raw(datatype).ok_or_else(|| {
            Error::invalid_arg(format!(
                "input '{name}' has an unknown datatype ({datatype})"
            ))
        })?;
        let total = usize::try_from(byte_size)
            .map_err(|_| Error::invalid_arg(format!("input '{name}' is too large")))?;
        let mut data = Vec::with_capacity(total);
        for index in 0..buffer_count {
            let mut buffer = ptr::null();
            let mut size = 0u64;
            let mut memory_type = sys::TRITONSERVER_MEMORY_CPU;
            let mut memory_type_id = 0i64;
            // SAFETY: `index` < buffer_count; out-pointers are valid; memory_type and id
            // carry our preference (host memory) in and the actual placement out.
            check(unsafe {
                sys::TRITONBACKEND_InputBuffer(
                    input,
                    index,
                    &mut buffer,
                    &mut size,
                    &mut memory_type,
                    &mut memory_type_id,
                )
            })?;
            if memory_type != sys::TRITONSERVER_MEMORY_CPU
                && memory_type != sys::TRITONSERVER_MEMORY_CPU_PINNED
            {
                return Err(Error::unsupported(format!(
                    "input '{name}' is in GPU memory (device {memory_type_id}); this backend reads \
                     text inputs from host memory: send them without CUDA shared memory"
                )));
            }
            let size = usize::try_from(size)
                .map_err(|_| Error::invalid_arg(format!("input '{name}' is too large")))?;
            if size == 0 {
                continue;
            }
            if buffer.is_null() {
                return Err(Error::internal(format!(
                    "input '{name}' buffer {index} is null"
                )));
            }
            // SAFETY: Triton guarantees `size` readable host bytes at `buffer` while the
            // request lives; the memory type was checked above.
            data.extend_from_slice(unsafe {
                std::slice::from_raw_parts(buffer.cast::<u8>(), size)
            });
        }
        if data.len() != total {
            return Err(Error::invalid_arg(format!(
                "input '{name}' holds {} bytes but declares {total}",
                data.len()
            )));
        }
        Ok(InputTensor {
            datatype,
            shape,
            data,
        })
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if !self.has_final_response.get() {
            // Dropping the unsent response answers the client with an internal error.
            if let Err(error) = Response::new(self) {
                crate::log_error!("failed to answer a request before releasing it: {error}");
            }
        }
        // SAFETY: the request is live and released exactly once, here.
        let result = check(unsafe {
            sys::TRITONBACKEND_RequestRelease(
                self.raw.as_ptr(),
                sys::TRITONSERVER_REQUEST_RELEASE_ALL,
            )
        });
        if let Err(error) = result {
            crate::log_error!("failed to release a request: {error}");
        }
    }
}

/// A request parameter's value, by the type Triton gives it.
#[derive(Debug, Clone, PartialEq)]
pub enum ParameterValue {
    String(String),
    Int(i64),
    Bool(bool),
    Double(f64),
    /// A type this backend does not read (raw bytes).
    Other,
}

impl fmt::Display for ParameterValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParameterValue::String(text) => write!(f, "{text:?}"),
            ParameterValue::Int(value) => write!(f, "{value}"),
            ParameterValue::Bool(value) => write!(f, "{value}"),
            ParameterValue::Double(value) => write!(f, "{value}"),
            ParameterValue::Other => f.write_str("a non-scalar value"),
        }
    }
}

/// One input tensor copied into host memory.
#[derive(Debug, Clone)]
pub struct InputTensor {
    pub datatype: DataType,
    pub shape: Vec<i64>,
    pub data: Vec<u8>,
}

/// A response to one request: its final response, or one of the pieces a decoupled
/// model streams before it. Dropping an unsent final response sends an internal error,
/// so a client is always answered; dropping an unsent piece deletes it.
pub struct Response {
    raw: Option<NonNull<sys::TRITONBACKEND_Response>>,
    is_final: bool,
}

impl Response {
    /// The request's final response; once it exists, it is what answers the request.
    pub fn new(request: &Request) -> Result<Self> {
        let response = Self::create(request, true)?;
        request.has_final_response.set(true);
        Ok(response)
    }

    /// A response that a final one will follow (decoupled models).
    pub fn new_partial(request: &Request) -> Result<Self> {
        Self::create(request, false)
    }

    fn create(request: &Request, is_final: bool) -> Result<Self> {
        let mut response = ptr::null_mut();
        // SAFETY: the request is live; `response` is a valid out-pointer and becomes ours.
        check(unsafe { sys::TRITONBACKEND_ResponseNew(&mut response, request.raw.as_ptr()) })?;
        NonNull::new(response)
            .map(|raw| Response {
                raw: Some(raw),
                is_final,
            })
            .ok_or_else(|| Error::internal("Triton returned a null response"))
    }

    /// Adds an output tensor holding `data` (host bytes in Triton's layout).
    pub fn add_output(
        &mut self,
        name: &str,
        datatype: DataType,
        shape: &[i64],
        data: &[u8],
    ) -> Result<()> {
        let response = self
            .raw
            .ok_or_else(|| Error::internal("the response was already sent"))?;
        let c_name = c_string_lossy(name);
        let dims = u32::try_from(shape.len())
            .map_err(|_| Error::internal(format!("output '{name}' has too many dimensions")))?;
        let mut output = ptr::null_mut();
        // SAFETY: the response is live and unsent; name and shape outlive the call.
        check(unsafe {
            sys::TRITONBACKEND_ResponseOutput(
                response.as_ptr(),
                &mut output,
                c_name.as_ptr(),
                datatype.to_raw(),
                shape.as_ptr(),
                dims,
            )
        })?;
        let mut buffer = ptr::null_mut();
        let mut memory_type = sys::TRITONSERVER_MEMORY_CPU;
        let mut memory_type_id = 0i64;
        // SAFETY: `output` belongs to the live response; out-pointers are valid; we ask
        // for host memory and learn where the buffer really is.
        check(unsafe {
            sys::TRITONBACKEND_OutputBuffer(
                output,
                &mut buffer,
                data.len() as u64,
                &mut memory_type,
                &mut memory_type_id,
            )
        })?;
        if memory_type != sys::TRITONSERVER_MEMORY_CPU
            && memory_type != sys::TRITONSERVER_MEMORY_CPU_PINNED
        {
            return Err(Error::unsupported(format!(
                "output '{name}' was placed in GPU memory (device {memory_type_id}); this \
                 backend writes outputs to host memory: request them without CUDA shared memory"
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        if buffer.is_null() {
            return Err(Error::internal(format!("output '{name}' buffer is null")));
        }
        // SAFETY: Triton allocated `data.len()` writable host bytes at `buffer`; the
        // regions cannot overlap.
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), buffer.cast::<u8>(), data.len()) };
        Ok(())
    }

    /// Sends a piece of a stream (see [`Response::new_partial`]).
    pub fn send_partial(mut self) -> Result<()> {
        if self.is_final {
            return Err(Error::internal(
                "a final response was sent as a stream piece",
            ));
        }
        let Some(response) = self.raw.take() else {
            return Ok(());
        };
        // SAFETY: the response is live and sent exactly once; ownership passes to Triton.
        check(unsafe { sys::TRITONBACKEND_ResponseSend(response.as_ptr(), 0, ptr::null_mut()) })
    }

    /// Sends the final response, carrying `error` if the request failed.
    pub fn send(mut self, error: Option<Error>) -> Result<()> {
        match self.raw.take() {
            Some(response) => send_final(response, error),
            None => Ok(()),
        }
    }
}

fn send_final(response: NonNull<sys::TRITONBACKEND_Response>, error: Option<Error>) -> Result<()> {
    let raw_error = error.map_or(ptr::null_mut(), Error::into_raw);
    // SAFETY: the response is live and sent exactly once; Triton does not take
    // ownership of `raw_error`.
    let result = check(unsafe {
        sys::TRITONBACKEND_ResponseSend(
            response.as_ptr(),
            sys::TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            raw_error,
        )
    });
    if !raw_error.is_null() {
        // SAFETY: we still own the error we created and delete it once.
        unsafe { sys::TRITONSERVER_ErrorDelete(raw_error) };
    }
    result
}

impl Drop for Response {
    fn drop(&mut self) {
        let Some(response) = self.raw.take() else {
            return;
        };
        if self.is_final {
            let error = Error::internal("the backend dropped this response without an answer");
            if let Err(send_error) = send_final(response, Some(error)) {
                crate::log_error!("failed to send a response: {send_error}");
            }
        } else {
            // SAFETY: the response is live and unsent; it is deleted exactly once.
            if let Err(error) =
                check(unsafe { sys::TRITONBACKEND_ResponseDelete(response.as_ptr()) })
            {
                crate::log_error!("failed to delete an unsent response: {error}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Memory usage reports

/// Where memory that a model or an instance holds lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MemoryPlace {
    Cpu,
    CpuPinned,
    Gpu { device_id: i64 },
}

/// Bytes held in one place, as reported to `/v2/models/<m>/stats` (`memory_usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryUsage {
    pub place: MemoryPlace,
    pub bytes: u64,
}

/// An owned `TRITONSERVER_BufferAttributes`, deleted on drop.
struct BufferAttributes(NonNull<sys::TRITONSERVER_BufferAttributes>);

impl BufferAttributes {
    fn new(usage: &MemoryUsage) -> Result<Self> {
        let mut raw = ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; the new object becomes ours.
        check(unsafe { sys::TRITONSERVER_BufferAttributesNew(&mut raw) })?;
        let attributes = NonNull::new(raw)
            .map(BufferAttributes)
            .ok_or_else(|| Error::internal("Triton returned null buffer attributes"))?;
        let (memory_type, memory_type_id) = match usage.place {
            MemoryPlace::Cpu => (sys::TRITONSERVER_MEMORY_CPU, 0),
            MemoryPlace::CpuPinned => (sys::TRITONSERVER_MEMORY_CPU_PINNED, 0),
            MemoryPlace::Gpu { device_id } => (sys::TRITONSERVER_MEMORY_GPU, device_id),
        };
        let byte_size = usize::try_from(usage.bytes)
            .map_err(|_| Error::internal("a memory usage does not fit in size_t"))?;
        // On an error below, `attributes` is dropped, which deletes it.
        // SAFETY: the attributes are live and ours; the setter stores a plain value.
        check(unsafe {
            sys::TRITONSERVER_BufferAttributesSetMemoryType(attributes.0.as_ptr(), memory_type)
        })?;
        // SAFETY: as above.
        check(unsafe {
            sys::TRITONSERVER_BufferAttributesSetMemoryTypeId(attributes.0.as_ptr(), memory_type_id)
        })?;
        // SAFETY: as above.
        check(unsafe {
            sys::TRITONSERVER_BufferAttributesSetByteSize(attributes.0.as_ptr(), byte_size)
        })?;
        Ok(attributes)
    }
}

impl Drop for BufferAttributes {
    fn drop(&mut self) {
        // SAFETY: the attributes are ours and deleted exactly once, here.
        let result = check(unsafe { sys::TRITONSERVER_BufferAttributesDelete(self.0.as_ptr()) });
        if let Err(error) = result {
            crate::log_error!("failed to delete buffer attributes: {error}");
        }
    }
}

/// Builds the attribute list for `usage` and hands it to `report`, which Triton copies
/// (the list stays ours and is deleted when this returns).
fn report_memory(
    usage: &[MemoryUsage],
    report: impl FnOnce(
        *mut *mut sys::TRITONSERVER_BufferAttributes,
        u32,
    ) -> *mut sys::TRITONSERVER_Error,
) -> Result<()> {
    let attributes = usage
        .iter()
        .map(BufferAttributes::new)
        .collect::<Result<Vec<_>>>()?;
    let mut raw: Vec<*mut sys::TRITONSERVER_BufferAttributes> =
        attributes.iter().map(|a| a.0.as_ptr()).collect();
    let count =
        u32::try_from(raw.len()).map_err(|_| Error::internal("too many memory usage entries"))?;
    check(report(raw.as_mut_ptr(), count))
}

impl ModelHandle {
    /// Reports the memory this model holds until ModelFinalize (not its instances').
    pub fn report_memory_usage(&self, usage: &[MemoryUsage]) -> Result<()> {
        report_memory(usage, |list, count| {
            // SAFETY: the model is live; `list` holds `count` live attributes that Triton
            // reads during the call only (tritonbackend.h: the backend owns them).
            unsafe { sys::TRITONBACKEND_ModelReportMemoryUsage(self.0.as_ptr(), list, count) }
        })
    }
}

impl InstanceHandle {
    /// Reports the memory this instance holds until ModelInstanceFinalize.
    pub fn report_memory_usage(&self, usage: &[MemoryUsage]) -> Result<()> {
        report_memory(usage, |list, count| {
            // SAFETY: the instance is live; `list` holds `count` live attributes that
            // Triton reads during the call only (tritonbackend.h: the backend owns them).
            unsafe {
                sys::TRITONBACKEND_ModelInstanceReportMemoryUsage(self.0.as_ptr(), list, count)
            }
        })
    }

    /// Borrows the instance state shared by every thread Triton calls this instance from
    /// (execute, and the readiness check, which may run during an execution).
    ///
    /// # Safety
    /// The state must have been set with the same `T` and not taken yet; `T` must be
    /// `Sync`, and nothing may hold a `&mut` to it.
    pub unsafe fn state<'a, T: Sync>(&self) -> Result<&'a T> {
        let mut raw = ptr::null_mut();
        // SAFETY: the handle is live; `raw` is a valid out-pointer.
        check(unsafe { sys::TRITONBACKEND_ModelInstanceState(self.0.as_ptr(), &mut raw) })?;
        // SAFETY: per the caller, `raw` is null or the live `Box<T>` from set_state, only
        // ever shared.
        unsafe { raw.cast::<T>().as_ref() }
            .ok_or_else(|| Error::internal("the model instance has no state"))
    }
}
