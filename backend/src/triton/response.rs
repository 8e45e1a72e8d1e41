//! Responses and the response factories that make them after `execute` returns or from
//! other threads (decoupled models, requests answered asynchronously).

use std::ptr::{self, NonNull};

use triton_sys as sys;

use super::convert::{data_type_to_raw, is_host_memory, read_bool};
use super::error::{Error, Result, c_string_lossy, check};
use crate::types::{DataType, ParameterValue};

/// One response to a request: the final one or one of the pieces a decoupled model
/// streams before it. Dropping an unsent response deletes it (the request's own guard
/// answers a request that never got its final response).
pub struct Response {
    raw: Option<NonNull<sys::TRITONBACKEND_Response>>,
}

// SAFETY: a response is owned by one thread at a time; Triton lets any thread fill and
// send it.
unsafe impl Send for Response {}

impl Response {
    /// A response made by a request's factory (valid after the request is released).
    pub fn from_factory(factory: &ResponseFactory) -> Result<Self> {
        let mut response = ptr::null_mut();
        // SAFETY: the factory is live; `response` is a valid out-pointer and becomes ours.
        check(unsafe { sys::TRITONBACKEND_ResponseNewFromFactory(&mut response, factory.raw()) })?;
        // SAFETY: Triton just made this response for us.
        unsafe { Self::wrap(response) }
    }

    /// # Safety
    /// `raw` must be null or a new response the caller owns, not wrapped twice.
    pub(super) unsafe fn wrap(raw: *mut sys::TRITONBACKEND_Response) -> Result<Self> {
        NonNull::new(raw)
            .map(|raw| Response { raw: Some(raw) })
            .ok_or_else(|| Error::internal("Triton returned a null response"))
    }

    /// Adds output `name` of `byte_size` bytes in host memory and returns its buffer,
    /// for the caller to fill in place.
    pub fn output(
        &mut self,
        name: &str,
        datatype: DataType,
        shape: &[i64],
        byte_size: usize,
    ) -> Result<&mut [u8]> {
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
                data_type_to_raw(datatype),
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
                byte_size as u64,
                &mut memory_type,
                &mut memory_type_id,
            )
        })?;
        if !is_host_memory(memory_type) {
            return Err(Error::unsupported(format!(
                "output '{name}' was placed in GPU memory (device {memory_type_id}); this \
                 backend writes outputs to host memory: request them without CUDA shared memory"
            )));
        }
        if byte_size == 0 {
            return Ok(&mut []);
        }
        if buffer.is_null() {
            return Err(Error::internal(format!("output '{name}' buffer is null")));
        }
        // SAFETY: Triton allocated `byte_size` writable host bytes at `buffer`, owned by
        // the response, which `&mut self` borrows for as long as the slice lives.
        Ok(unsafe { std::slice::from_raw_parts_mut(buffer.cast::<u8>(), byte_size) })
    }

    /// Adds output `name` holding a copy of `data` (host bytes in Triton's layout).
    pub fn add_output(
        &mut self,
        name: &str,
        datatype: DataType,
        shape: &[i64],
        data: &[u8],
    ) -> Result<()> {
        self.output(name, datatype, shape, data.len())?
            .copy_from_slice(data);
        Ok(())
    }

    /// Adds a response parameter (KServe `parameters` of the response).
    pub fn set_parameter(&mut self, key_name: &str, value: &ParameterValue) -> Result<()> {
        let response = self
            .raw
            .ok_or_else(|| Error::internal("the response was already sent"))?;
        let c_key = c_string_lossy(key_name);
        let response = response.as_ptr();
        let key = c_key.as_ptr();
        check(match value {
            ParameterValue::String(text) => {
                let c_text = c_string_lossy(text);
                // SAFETY: the response is live and unsent; key and value are
                // NUL-terminated and copied by Triton during the call.
                unsafe {
                    sys::TRITONBACKEND_ResponseSetStringParameter(response, key, c_text.as_ptr())
                }
            }
            // SAFETY: the response is live and unsent; the key is NUL-terminated and
            // copied by Triton during the call.
            ParameterValue::Int(number) => unsafe {
                sys::TRITONBACKEND_ResponseSetIntParameter(response, key, *number)
            },
            // SAFETY: as above.
            ParameterValue::Bool(flag) => unsafe {
                sys::TRITONBACKEND_ResponseSetBoolParameter(response, key, *flag)
            },
            // SAFETY: as above.
            ParameterValue::Double(number) => unsafe {
                sys::TRITONBACKEND_ResponseSetDoubleParameter(response, key, *number)
            },
            ParameterValue::Other => {
                return Err(Error::unsupported(format!(
                    "response parameter '{key_name}' has a type that cannot be sent"
                )));
            }
        })
    }

    /// Sends a piece of a stream: a final response follows later.
    pub fn send_partial(mut self) -> Result<()> {
        let Some(raw) = self.raw.take() else {
            return Ok(());
        };
        // SAFETY: the response is live and sent exactly once; ownership passes to Triton.
        check(unsafe { sys::TRITONBACKEND_ResponseSend(raw.as_ptr(), 0, ptr::null_mut()) })
    }

    /// Sends the request's final response, carrying `error` if the request failed.
    pub fn send_final(mut self, error: Option<Error>) -> Result<()> {
        let Some(raw) = self.raw.take() else {
            return Ok(());
        };
        let raw_error = error.map_or(ptr::null_mut(), Error::into_raw);
        // SAFETY: the response is live and sent exactly once; Triton does not take
        // ownership of `raw_error`.
        let result = check(unsafe {
            sys::TRITONBACKEND_ResponseSend(
                raw.as_ptr(),
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
}

impl Drop for Response {
    fn drop(&mut self) {
        if let Some(raw) = self.raw.take() {
            // SAFETY: the response is live and unsent; it is deleted exactly once.
            if let Err(error) = check(unsafe { sys::TRITONBACKEND_ResponseDelete(raw.as_ptr()) }) {
                crate::log_error!("failed to delete an unsent response: {error}");
            }
        }
    }
}

/// Makes the responses of one request, from any thread, before or after the request
/// is released. Deleted on drop.
pub struct ResponseFactory(NonNull<sys::TRITONBACKEND_ResponseFactory>);

// SAFETY: Triton lets a backend use a response factory from any thread; it is used by
// one thread at a time (it is not `Sync`).
unsafe impl Send for ResponseFactory {}

impl ResponseFactory {
    /// # Safety
    /// `raw` must be a response factory the caller owns, not wrapped twice.
    pub(super) unsafe fn from_raw(raw: *mut sys::TRITONBACKEND_ResponseFactory) -> Result<Self> {
        NonNull::new(raw)
            .map(ResponseFactory)
            .ok_or_else(|| Error::internal("Triton returned a null response factory"))
    }

    fn raw(&self) -> *mut sys::TRITONBACKEND_ResponseFactory {
        self.0.as_ptr()
    }

    /// Ends the request's responses without one more response (decoupled models whose
    /// last piece was already sent).
    pub fn send_final_flag(&self) -> Result<()> {
        // SAFETY: the factory is live.
        check(unsafe {
            sys::TRITONBACKEND_ResponseFactorySendFlags(
                self.raw(),
                sys::TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
        })
    }

    /// Whether the client cancelled the request; a failed check counts as not cancelled.
    pub fn is_cancelled(&self) -> bool {
        // SAFETY: the factory is live; the out-pointer is valid for the call.
        read_bool(|cancelled| unsafe {
            sys::TRITONBACKEND_ResponseFactoryIsCancelled(self.raw(), cancelled)
        })
        .unwrap_or(false)
    }
}

impl Drop for ResponseFactory {
    fn drop(&mut self) {
        // SAFETY: the factory is ours and deleted exactly once, here.
        if let Err(error) = check(unsafe { sys::TRITONBACKEND_ResponseFactoryDelete(self.raw()) }) {
            crate::log_error!("failed to delete a response factory: {error}");
        }
    }
}
