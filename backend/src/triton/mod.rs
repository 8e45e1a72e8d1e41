//! The one safe layer over the raw Triton API (`triton-sys`), and nothing else.
//!
//! Every `unsafe` call into Triton lives in this module. Handles borrow the objects
//! Triton passes to an entry point for as long as that call lasts; they can only be
//! made by the `unsafe fn from_raw` constructors, whose callers promise the pointer is
//! live. Owned objects (requests, responses, response factories, requests sent into the
//! server) release what they hold on drop. Every `TRITONSERVER_Error` that Triton
//! returns is read and deleted here, so none leaks and no message is dropped.

mod convert;
mod error;
mod handles;
mod inference;
mod log;
mod memory_report;
mod metrics;
mod request;
mod response;
mod server;

pub use crate::error::ErrorCode;
pub use error::{Error, Result};
pub use handles::{
    BackendHandle, ExecutionTimes, Handle, HandleKind, InstanceHandle, InstanceKind, ModelHandle,
    now_ns,
};
pub use inference::{
    InFlight, InferenceRequestBuilder, InferenceResponse, ResponseEvent, ResponseOutput,
};
pub use log::{LogLevel, log};
pub use metrics::{Metric, MetricFamily, MetricKind};
pub use request::Request;
pub use response::{Response, ResponseFactory};
pub use server::{BUILT_API_VERSION, Server, server_api_version};
