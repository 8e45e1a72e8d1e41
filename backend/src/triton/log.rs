//! Lines in Triton's log, and the `log_*!` macros the backend writes them with.

use triton_sys as sys;

use super::error::{c_string_lossy, check};

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
