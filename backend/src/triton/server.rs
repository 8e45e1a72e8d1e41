//! The server a model runs in: facts about the other models in it, and the entry point
//! for requests a backend sends into it (see [`super::inference`]).

use std::ptr::{self, NonNull};

use triton_sys as sys;

use super::convert::{owned_message_json, read_bool};
use super::error::{Error, Result, c_string, check};

/// The `TRITONSERVER_Server` this backend runs in: live as long as any model is.
#[derive(Clone, Copy)]
pub struct Server(NonNull<sys::TRITONSERVER_Server>);

// SAFETY: Triton's server API is thread-safe; the handle is a plain pointer to the
// server, which outlives every model and so every state that holds it.
unsafe impl Send for Server {}
// SAFETY: as above.
unsafe impl Sync for Server {}

impl Server {
    /// # Safety
    /// `raw` must be null or the live server, which must outlive this handle's use.
    pub(crate) unsafe fn from_raw(raw: *mut sys::TRITONSERVER_Server) -> Result<Self> {
        NonNull::new(raw)
            .map(Server)
            .ok_or_else(|| Error::internal("Triton returned a null server"))
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::TRITONSERVER_Server {
        self.0.as_ptr()
    }

    /// The configuration of model `name` (version `-1`: the one the version policy
    /// picks) as JSON, e.g. to check a target's inputs before routing to it.
    pub fn model_config_json(&self, name: &str, version: i64) -> Result<String> {
        let c_name = c_string("model name", name)?;
        let mut message = ptr::null_mut();
        // SAFETY: the server is live; `c_name` is NUL-terminated and outlives the call;
        // `message` is a valid out-pointer and the message it receives becomes ours.
        check(unsafe {
            sys::TRITONSERVER_ServerModelConfig(
                self.as_ptr(),
                c_name.as_ptr(),
                version,
                1,
                &mut message,
            )
        })?;
        if message.is_null() {
            return Err(Error::internal(format!(
                "Triton returned no configuration for model '{name}'"
            )));
        }
        // SAFETY: the message is live, owned by us and not used after this call.
        unsafe { owned_message_json(message) }
    }

    /// Whether model `name` (version `-1`: the policy's pick) is loaded and ready; an
    /// unknown model is an error (NOT_FOUND), not `false`.
    pub fn model_is_ready(&self, name: &str, version: i64) -> Result<bool> {
        let c_name = c_string("model name", name)?;
        // SAFETY: the server is live; `c_name` outlives the call; the out-pointer is
        // valid for the call.
        read_bool(|ready| unsafe {
            sys::TRITONSERVER_ServerModelIsReady(self.as_ptr(), c_name.as_ptr(), version, ready)
        })
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::triton::ErrorCode;

    #[test]
    fn model_names_with_a_nul_are_refused_before_reaching_triton() {
        assert_eq!(
            c_string("model name", "gpt2").map(|c| c.into_bytes()),
            Ok(b"gpt2".to_vec())
        );
        let error = c_string("model name", "gp\0t2").err().map(|e| e.code);
        assert_eq!(error, Some(ErrorCode::InvalidArg));
    }
}
