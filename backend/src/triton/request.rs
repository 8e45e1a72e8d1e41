//! A request handed to the backend by `ModelInstanceExecute`: its inputs, parameters
//! and requested outputs, and its release.

use std::borrow::Cow;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, Ordering};

use triton_sys as sys;

use super::convert::{data_type_from_raw, is_host_memory, read_bool, read_parameters};
use super::error::{Error, Result, c_string_lossy, check, copy_c_str};
use super::response::{Response, ResponseFactory};
use crate::types::{InputTensor, ParameterValue};

/// An inference request handed to the backend by `ModelInstanceExecute`.
///
/// Owning: dropping it releases the request back to Triton, so every path releases
/// each request exactly once, and answers it with an error first if its final response
/// was never sent.
pub struct Request {
    raw: NonNull<sys::TRITONBACKEND_Request>,
    /// Whether its final response was sent (by [`Response::send_final`] on a response
    /// made for it, or through its response factory, which [`Request::mark_answered`]
    /// records).
    answered: AtomicBool,
}

// SAFETY: Triton lets a backend read, answer and release a request from any thread
// (decoupled backends release them from their own threads); it is used by one thread
// at a time.
unsafe impl Send for Request {}

impl Request {
    /// # Safety
    /// `raw` must be a request passed to the current execute call, not yet released,
    /// and wrapped only once.
    pub unsafe fn from_raw(raw: *mut sys::TRITONBACKEND_Request) -> Result<Self> {
        NonNull::new(raw)
            .map(|raw| Request {
                raw,
                answered: AtomicBool::new(false),
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

    pub(crate) fn as_ptr(&self) -> *mut sys::TRITONBACKEND_Request {
        self.raw.as_ptr()
    }

    /// A response made straight from the request (which must still be live when it is
    /// sent).
    pub fn response(&self) -> Result<Response> {
        let mut response = ptr::null_mut();
        // SAFETY: the request is live; `response` is a valid out-pointer and becomes ours.
        check(unsafe { sys::TRITONBACKEND_ResponseNew(&mut response, self.raw.as_ptr()) })?;
        // SAFETY: Triton just made this response for us.
        unsafe { Response::wrap(response) }
    }

    /// The factory that makes this request's responses, from any thread, before or
    /// after the request is released.
    pub fn response_factory(&self) -> Result<ResponseFactory> {
        let mut factory = ptr::null_mut();
        // SAFETY: the request is live; `factory` is a valid out-pointer and becomes ours.
        check(unsafe { sys::TRITONBACKEND_ResponseFactoryNew(&mut factory, self.raw.as_ptr()) })?;
        // SAFETY: Triton just made this factory for us.
        unsafe { ResponseFactory::from_raw(factory) }
    }

    /// Records that the request's final response was sent.
    pub fn mark_answered(&self) {
        self.answered.store(true, Ordering::Release);
    }

    /// Whether the client cancelled this request (or went away, where the protocol
    /// tells); a failed check counts as not cancelled.
    pub fn is_cancelled(&self) -> bool {
        // SAFETY: the request is live; the out-pointer is valid for the call.
        read_bool(|cancelled| unsafe {
            sys::TRITONBACKEND_RequestIsCancelled(self.raw.as_ptr(), cancelled)
        })
        .unwrap_or(false)
    }

    /// The request's timeout in microseconds (0: none), as the client set it.
    pub fn timeout_us(&self) -> Result<u64> {
        let mut timeout = 0u64;
        // SAFETY: the request is live; `timeout` is a valid out-pointer.
        check(unsafe {
            sys::TRITONBACKEND_InferenceRequestTimeoutMicroseconds(self.raw.as_ptr(), &mut timeout)
        })?;
        Ok(timeout)
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
        read_parameters(count, |index, key, kind, value| {
            // SAFETY: the request is live and `index` < count; the out-pointers are
            // valid, and what they receive lives as long as the request.
            unsafe {
                sys::TRITONBACKEND_RequestParameter(self.raw.as_ptr(), index, key, kind, value)
            }
        })
    }

    /// Reads one input in host memory: its datatype, shape and bytes, borrowed from
    /// Triton's buffer when the input is in one piece, else its pieces joined in order.
    pub fn read_input(&self, name: &str) -> Result<InputTensor<'_>> {
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
        let datatype = data_type_from_raw(datatype).ok_or_else(|| {
            Error::invalid_arg(format!(
                "input '{name}' has an unknown datatype ({datatype})"
            ))
        })?;
        let total = usize::try_from(byte_size)
            .map_err(|_| Error::invalid_arg(format!("input '{name}' is too large")))?;
        let mut pieces: Vec<&[u8]> = Vec::with_capacity(buffer_count as usize);
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
            if !is_host_memory(memory_type) {
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
            // request lives (as long as `&self`); the memory type was checked above.
            pieces.push(unsafe { std::slice::from_raw_parts(buffer.cast::<u8>(), size) });
        }
        let data: Cow<'_, [u8]> = match pieces[..] {
            [] => Cow::Borrowed(&[]),
            [one] => Cow::Borrowed(one),
            _ => Cow::Owned(pieces.concat()),
        };
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
        if !self.answered.load(Ordering::Acquire) {
            let error = Error::internal("the backend released this request without an answer");
            if let Err(send_error) = self.response().and_then(|r| r.send_final(Some(error))) {
                crate::log_error!("failed to answer a request before releasing it: {send_error}");
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
