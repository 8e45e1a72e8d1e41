//! `libtriton_rust.so`: a Triton Inference Server backend that serves transformer text
//! models through ONNX Runtime, with tokenization and pre/post-processing in Rust.
//!
//! Select it with `backend: "rust"` in `config.pbtxt`. This file holds only the
//! `TRITONBACKEND_*` entry points: each one catches panics (a panic must never cross the
//! FFI boundary) and turns errors into `TRITONSERVER_Error`s for Triton.

pub mod ab_metrics;
pub mod ab_stats;
pub mod autocomplete;
pub mod bytes_tensor;
pub mod canary;
pub mod config;
pub mod encoder_metrics;
pub mod error;
pub mod float_tensor;
pub mod generation;
pub mod generation_metrics;
pub mod health;
pub mod heap;
pub mod hf_config;
pub mod memory;
pub mod model;
pub mod onnx;
pub mod onnx_proto;
pub mod postprocess;
pub mod request_batcher;
pub mod responder;
pub mod settings;
pub mod shared_weights;
pub mod tasks;
pub mod text;
pub mod tokenize;
pub mod triton;
pub mod types;
pub mod warmup;
pub mod work_queue;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;

use triton_sys as sys;

use crate::health::{InstanceSlot, PanicWatch};
use crate::model::{BackendState, InstanceState, ModelState};
use crate::triton::{BackendHandle, Error, ErrorCode, InstanceHandle, ModelHandle, Request};

/// What Triton keeps as a model instance's state (see `health.rs`).
type Instance = InstanceSlot<InstanceState>;

/// Routes panic messages to the Triton log (stderr stays as a fallback).
fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = crate::error::panic_message(info.payload());
            match info.location() {
                Some(at) => health::record_panic(&format!("{message} at {at}")),
                None => health::record_panic(&message),
            }
            log_error!("triton-rust: panic: {info}");
            previous(info);
        }));
    });
}

/// Runs an entry point body; a panic becomes an internal error instead of unwinding.
fn guarded(name: &str, body: impl FnOnce() -> Result<(), Error>) -> Result<(), Error> {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|_| {
        Err(Error::internal(format!(
            "triton-rust: panic in {name}; see the server log"
        )))
    })
}

/// Runs an entry point body and hands any error to Triton.
fn entry_point(
    name: &str,
    body: impl FnOnce() -> Result<(), Error>,
) -> *mut sys::TRITONSERVER_Error {
    match guarded(name, body) {
        Ok(()) => std::ptr::null_mut(),
        Err(error) => error.into_raw(),
    }
}

/// # Safety
/// Called by Triton with a live backend handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn TRITONBACKEND_Initialize(
    backend: *mut sys::TRITONBACKEND_Backend,
) -> *mut sys::TRITONSERVER_Error {
    install_panic_hook();
    entry_point("TRITONBACKEND_Initialize", || {
        // SAFETY: Triton passes the live backend to this entry point.
        let backend = unsafe { BackendHandle::from_raw(backend) }?;
        let (major, minor) = triton::server_api_version()?;
        let (built_major, built_minor) = triton::BUILT_API_VERSION;
        log_info!(
            "triton-rust: backend API version {major}.{minor} (built for {built_major}.{built_minor})"
        );
        if major != built_major || minor < built_minor {
            return Err(Error::unsupported(format!(
                "triton-rust needs Triton backend API {built_major}.{built_minor} or a newer \
                 {built_major}.x; this server has {major}.{minor}"
            )));
        }
        backend.set_state(Box::new(BackendState::new(backend)?))
    })
}

/// # Safety
/// Called by Triton with the live backend handle, after all models are finalized.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn TRITONBACKEND_Finalize(
    backend: *mut sys::TRITONBACKEND_Backend,
) -> *mut sys::TRITONSERVER_Error {
    entry_point("TRITONBACKEND_Finalize", || {
        // SAFETY: Triton passes the live backend to this entry point.
        let backend = unsafe { BackendHandle::from_raw(backend) }?;
        // SAFETY: the state was set as BackendState in Initialize and is not used again.
        drop(unsafe { backend.take_state::<BackendState>() }?);
        Ok(())
    })
}

/// # Safety
/// Called by Triton with a live model handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn TRITONBACKEND_ModelInitialize(
    model: *mut sys::TRITONBACKEND_Model,
) -> *mut sys::TRITONSERVER_Error {
    entry_point("TRITONBACKEND_ModelInitialize", || {
        // SAFETY: Triton passes the live model to this entry point.
        let model = unsafe { ModelHandle::from_raw(model) }?;
        // SAFETY: the backend state was set as BackendState in Initialize and lives until
        // Finalize, which runs after every model is finalized.
        let backend = unsafe { model.backend()?.state::<BackendState>() }?;
        let state = ModelState::new(model, backend).map_err(|error| {
            let name = model.name().unwrap_or_default();
            Error::new(error.code, format!("model '{name}': {}", error.message))
        })?;
        if let Err(error) = model.report_memory_usage(&state.memory_usage()) {
            log_warn!(
                "triton-rust: model '{}': cannot report memory usage: {error}",
                state.name
            );
        }
        model.set_state(Box::new(state))
    })
}

/// # Safety
/// Called by Triton with a live model handle, after its instances are finalized.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn TRITONBACKEND_ModelFinalize(
    model: *mut sys::TRITONBACKEND_Model,
) -> *mut sys::TRITONSERVER_Error {
    entry_point("TRITONBACKEND_ModelFinalize", || {
        // SAFETY: Triton passes the live model to this entry point.
        let model = unsafe { ModelHandle::from_raw(model) }?;
        // SAFETY: the state was set as ModelState in ModelInitialize and is not used again.
        if let Some(state) = unsafe { model.take_state::<ModelState>() }? {
            log_info!(
                "triton-rust: model '{}' version {} finalized",
                state.name,
                state.version
            );
        }
        Ok(())
    })
}

/// # Safety
/// Called by Triton with a live model instance handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceInitialize(
    instance: *mut sys::TRITONBACKEND_ModelInstance,
) -> *mut sys::TRITONSERVER_Error {
    entry_point("TRITONBACKEND_ModelInstanceInitialize", || {
        // SAFETY: Triton passes the live instance to this entry point.
        let instance = unsafe { InstanceHandle::from_raw(instance) }?;
        // SAFETY: the model state was set as ModelState in ModelInitialize and outlives
        // its instances.
        let model = unsafe { instance.model()?.state::<ModelState>() }?;
        let state = InstanceState::new(instance, model).map_err(|error| {
            let name = instance.name().unwrap_or_default();
            Error::new(
                error.code,
                format!(
                    "instance '{name}' of model '{}': {}",
                    model.name, error.message
                ),
            )
        })?;
        if let Err(error) = state
            .memory_usage()
            .and_then(|usage| instance.report_memory_usage(&usage))
        {
            log_warn!(
                "triton-rust: instance '{}': cannot report memory usage: {error}",
                state.name
            );
        }
        instance.set_state(Box::new(Instance::new(state.name.clone(), state)))
    })
}

/// # Safety
/// Called by Triton with a live model instance handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceFinalize(
    instance: *mut sys::TRITONBACKEND_ModelInstance,
) -> *mut sys::TRITONSERVER_Error {
    entry_point("TRITONBACKEND_ModelInstanceFinalize", || {
        // SAFETY: Triton passes the live instance to this entry point.
        let instance = unsafe { InstanceHandle::from_raw(instance) }?;
        // SAFETY: the state was set as an `Instance` and is not used again (Triton neither
        // executes nor asks for readiness during finalize); dropping it releases the ONNX
        // Runtime session, once no request of the instance is still being answered.
        if let Some(slot) = unsafe { instance.take_state::<Instance>() }? {
            let state = slot.into_inner();
            state.wait_idle();
            log_info!("triton-rust: instance '{}' finalized", state.name);
        }
        Ok(())
    })
}

/// # Safety
/// Called by Triton with a live instance and `request_count` live requests, whose
/// ownership passes to the backend.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceExecute(
    instance: *mut sys::TRITONBACKEND_ModelInstance,
    requests: *mut *mut sys::TRITONBACKEND_Request,
    request_count: u32,
) -> *mut sys::TRITONSERVER_Error {
    let raw_requests: &[*mut sys::TRITONBACKEND_Request] = if requests.is_null() {
        &[]
    } else {
        // SAFETY: Triton passes an array of `request_count` request pointers.
        unsafe { std::slice::from_raw_parts(requests, request_count as usize) }
    };
    // Take ownership of every request first: from here on each one is answered and
    // released by its own `Request`/`Response` guards, even if something panics, so
    // this function must not return an error.
    let owned: Vec<Request> = raw_requests
        .iter()
        // SAFETY: each pointer is a distinct live request owned by us from now on.
        .filter_map(|&raw| unsafe { Request::from_raw(raw) }.ok())
        .collect();
    let watch = PanicWatch::start();
    let result = catch_unwind(AssertUnwindSafe(move || {
        let states = (|| {
            // SAFETY: Triton passes the live instance to this entry point.
            let instance = unsafe { InstanceHandle::from_raw(instance) }?;
            // SAFETY: the state was set as an `Instance` in ModelInstanceInitialize and is
            // only ever shared; its mutex gives this execution the instance alone.
            let slot = unsafe { instance.state::<Instance>() }?;
            Ok::<_, Error>((instance, slot))
        })();
        match states {
            Ok((instance, slot)) => slot.lock().execute(instance, owned),
            Err(error) => {
                log_error!("triton-rust: execute failed: {error}");
                model::fail_all(owned, &error);
            }
        }
    }));
    if result.is_err() {
        log_error!("triton-rust: panic in execute; its requests were answered with errors");
    }
    if let Some(message) = watch.panicked() {
        mark_panicked(instance, &message);
    }
    std::ptr::null_mut()
}

/// After a panic during an execution: the instance stops reporting itself ready.
fn mark_panicked(instance: *mut sys::TRITONBACKEND_ModelInstance, message: &str) {
    let marked = guarded("TRITONBACKEND_ModelInstanceExecute", || {
        // SAFETY: Triton passed this live instance to the execute call still running.
        let instance = unsafe { InstanceHandle::from_raw(instance) }?;
        // SAFETY: set as an `Instance` in ModelInstanceInitialize; only ever shared.
        let slot = unsafe { instance.state::<Instance>() }?;
        if slot.mark_panicked(message) {
            log_error!(
                "triton-rust: instance '{}' is no longer ready after a panic: {message}",
                slot.name
            );
        }
        Ok(())
    });
    if let Err(error) = marked {
        log_error!("triton-rust: cannot mark the instance unhealthy: {error}");
    }
}

/// Optional entry point, called by newer Triton releases (not 2.51) when a client asks
/// whether the model is ready: `nullptr` when the instance can serve, else an
/// `UNAVAILABLE` error saying why. It may run while the instance executes, so it reads
/// only the instance's health, never the instance itself. Not in the r24.10 headers:
/// declared here with the signature of newer `tritonbackend.h`.
///
/// # Safety
/// Called by Triton with a live model instance handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceReady(
    instance: *mut sys::TRITONBACKEND_ModelInstance,
) -> *mut sys::TRITONSERVER_Error {
    entry_point("TRITONBACKEND_ModelInstanceReady", || {
        // SAFETY: Triton passes the live instance to this entry point.
        let instance = unsafe { InstanceHandle::from_raw(instance) }?;
        // SAFETY: set as an `Instance` in ModelInstanceInitialize; only ever shared, and
        // its health is readable from any thread.
        let slot = unsafe { instance.state::<Instance>() }?;
        slot.readiness()
            .map_err(|reason| Error::new(ErrorCode::Unavailable, reason))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::triton::ErrorCode;

    #[test]
    fn a_panic_becomes_an_internal_error() {
        let result = guarded("TRITONBACKEND_Test", || panic!("boom"));
        let error = result.expect_err("the panic is caught");
        assert_eq!(error.code, ErrorCode::Internal);
        assert!(
            error.message.contains("panic in TRITONBACKEND_Test"),
            "{}",
            error.message
        );
    }

    #[test]
    fn errors_pass_through_unchanged() {
        let result = guarded("TRITONBACKEND_Test", || Err(Error::invalid_arg("bad")));
        assert_eq!(result, Err(Error::invalid_arg("bad")));
        assert_eq!(guarded("TRITONBACKEND_Test", || Ok(())), Ok(()));
    }
}
