//! Borrowed handles to the backend, a model and a model instance: valid for the entry
//! point call that received them (lifetime `'a`), each able to hold one state object
//! that the backend owns.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::ptr::{self, NonNull};

use triton_sys as sys;

use super::convert::{message_json, owned_message_json};
use super::error::{Error, Result, check, copy_c_str};
use super::request::Request;
use super::server::Server;

/// What differs between Triton's three objects that hold a backend state.
pub trait HandleKind {
    type Raw;
    /// For error messages: "backend", "model", "model instance".
    const WHAT: &'static str;
    /// `TRITONBACKEND_*State`.
    const GET_STATE: unsafe extern "C" fn(
        *mut Self::Raw,
        *mut *mut c_void,
    ) -> *mut sys::TRITONSERVER_Error;
    /// `TRITONBACKEND_*SetState`.
    const SET_STATE: unsafe extern "C" fn(
        *mut Self::Raw,
        *mut c_void,
    ) -> *mut sys::TRITONSERVER_Error;
}

/// A Triton object borrowed for the entry point call that received it.
pub struct Handle<'a, K: HandleKind> {
    raw: NonNull<K::Raw>,
    live: PhantomData<&'a K::Raw>,
}

impl<K: HandleKind> Clone for Handle<'_, K> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K: HandleKind> Copy for Handle<'_, K> {}

// SAFETY: Triton's backend, model and instance objects may be used from any thread (it
// calls one instance's entry points from several); the handle is only a pointer.
unsafe impl<K: HandleKind> Send for Handle<'_, K> {}
// SAFETY: as above.
unsafe impl<K: HandleKind> Sync for Handle<'_, K> {}

impl<'a, K: HandleKind> Handle<'a, K> {
    /// # Safety
    /// `raw` must be null or an object of kind `K` that Triton keeps live for `'a`
    /// (the entry point call that received it, or the life of an object that owns it).
    pub unsafe fn from_raw(raw: *mut K::Raw) -> Result<Self> {
        NonNull::new(raw)
            .map(|raw| Handle {
                raw,
                live: PhantomData,
            })
            .ok_or_else(|| Error::internal(format!("Triton passed a null {}", K::WHAT)))
    }

    /// The same handle, claimed live for `'b`.
    ///
    /// # Safety
    /// The object must stay live for as long as the returned handle is used.
    pub unsafe fn extend<'b>(self) -> Handle<'b, K> {
        Handle {
            raw: self.raw,
            live: PhantomData,
        }
    }

    fn as_ptr(&self) -> *mut K::Raw {
        self.raw.as_ptr()
    }

    fn raw_state(&self) -> Result<*mut c_void> {
        let mut raw = ptr::null_mut();
        // SAFETY: the handle is live for 'a; `raw` is a valid out-pointer.
        check(unsafe { (K::GET_STATE)(self.as_ptr(), &mut raw) })?;
        Ok(raw)
    }

    /// Hands a state object to Triton; borrow it with [`Handle::state`], take it back
    /// with [`Handle::take_state`].
    pub fn set_state<T: Send + Sync + 'static>(&self, state: Box<T>) -> Result<()> {
        let raw = Box::into_raw(state);
        // SAFETY: the handle is live; Triton only stores the pointer.
        let result = check(unsafe { (K::SET_STATE)(self.as_ptr(), raw.cast::<c_void>()) });
        if result.is_err() {
            // SAFETY: Triton did not take the pointer, so it is still uniquely ours.
            drop(unsafe { Box::from_raw(raw) });
        }
        result
    }

    /// Borrows the state stored by [`Handle::set_state`] for as long as the handle is
    /// live. Triton may call entry points of one object from several threads at once,
    /// so the state is only ever shared (`Sync`).
    ///
    /// # Safety
    /// The state must have been set with the same `T` and not taken yet, and must not
    /// be taken while the borrow lasts.
    pub unsafe fn state<T: Sync + 'static>(&self) -> Result<&'a T> {
        let raw = self.raw_state()?;
        // SAFETY: per the caller, `raw` is null or the live `Box<T>` leaked in set_state,
        // which stays until take_state, after every borrow has ended.
        unsafe { raw.cast::<T>().as_ref() }
            .ok_or_else(|| Error::internal(format!("the {} has no state", K::WHAT)))
    }

    /// Takes back the state stored by [`Handle::set_state`].
    ///
    /// # Safety
    /// The state must have been set with the same `T`; no borrow of it may be live.
    pub unsafe fn take_state<T: 'static>(&self) -> Result<Option<Box<T>>> {
        let raw = self.raw_state()?;
        // SAFETY: per the caller, `raw` is null or the `Box<T>` leaked in set_state.
        Ok((!raw.is_null()).then(|| unsafe { Box::from_raw(raw.cast::<T>()) }))
    }
}

// ---------------------------------------------------------------------------------------
// Backend

pub enum BackendKind {}

impl HandleKind for BackendKind {
    type Raw = sys::TRITONBACKEND_Backend;
    const WHAT: &'static str = "backend";
    const GET_STATE: unsafe extern "C" fn(
        *mut Self::Raw,
        *mut *mut c_void,
    ) -> *mut sys::TRITONSERVER_Error = sys::TRITONBACKEND_BackendState;
    const SET_STATE: unsafe extern "C" fn(
        *mut Self::Raw,
        *mut c_void,
    ) -> *mut sys::TRITONSERVER_Error = sys::TRITONBACKEND_BackendSetState;
}

/// The `TRITONBACKEND_Backend`: live from Initialize to Finalize.
pub type BackendHandle<'a> = Handle<'a, BackendKind>;

impl BackendHandle<'_> {
    /// The `--backend-config` settings as JSON (`{"cmdline": {...}}`).
    pub fn config_json(&self) -> Result<String> {
        let mut message = ptr::null_mut();
        // SAFETY: the handle is live; `message` is a valid out-pointer. The message stays
        // owned by Triton: it is read, never deleted.
        check(unsafe { sys::TRITONBACKEND_BackendConfig(self.as_ptr(), &mut message) })?;
        // SAFETY: Triton keeps the message live while the backend is.
        unsafe { message_json(message) }
    }

    /// The directory holding this backend's shared library.
    pub fn artifacts_dir(&self) -> Result<String> {
        let mut artifact_type = 0;
        let mut location = ptr::null();
        // SAFETY: the handle is live; out-pointers are valid; `location` is owned by Triton.
        check(unsafe {
            sys::TRITONBACKEND_BackendArtifacts(self.as_ptr(), &mut artifact_type, &mut location)
        })?;
        // SAFETY: Triton returns a NUL-terminated string live while the backend is.
        Ok(unsafe { copy_c_str(location) })
    }
}

// ---------------------------------------------------------------------------------------
// Model

pub enum ModelKind {}

impl HandleKind for ModelKind {
    type Raw = sys::TRITONBACKEND_Model;
    const WHAT: &'static str = "model";
    const GET_STATE: unsafe extern "C" fn(
        *mut Self::Raw,
        *mut *mut c_void,
    ) -> *mut sys::TRITONSERVER_Error = sys::TRITONBACKEND_ModelState;
    const SET_STATE: unsafe extern "C" fn(
        *mut Self::Raw,
        *mut c_void,
    ) -> *mut sys::TRITONSERVER_Error = sys::TRITONBACKEND_ModelSetState;
}

/// The `TRITONBACKEND_Model`: live from ModelInitialize to ModelFinalize.
pub type ModelHandle<'a> = Handle<'a, ModelKind>;

impl<'a> ModelHandle<'a> {
    pub fn name(&self) -> Result<String> {
        let mut name = ptr::null();
        // SAFETY: the handle is live; `name` is a valid out-pointer owned by Triton.
        check(unsafe { sys::TRITONBACKEND_ModelName(self.as_ptr(), &mut name) })?;
        // SAFETY: a NUL-terminated string live while the model is.
        Ok(unsafe { copy_c_str(name) })
    }

    pub fn version(&self) -> Result<u64> {
        let mut version = 0u64;
        // SAFETY: the handle is live; `version` is a valid out-pointer.
        check(unsafe { sys::TRITONBACKEND_ModelVersion(self.as_ptr(), &mut version) })?;
        Ok(version)
    }

    /// The model's directory in the repository (the version is a subdirectory).
    pub fn repository_path(&self) -> Result<String> {
        let mut artifact_type = 0;
        let mut location = ptr::null();
        // SAFETY: the handle is live; out-pointers are valid.
        check(unsafe {
            sys::TRITONBACKEND_ModelRepository(self.as_ptr(), &mut artifact_type, &mut location)
        })?;
        if artifact_type != sys::TRITONBACKEND_ARTIFACT_FILESYSTEM {
            return Err(Error::unsupported(
                "the model repository must be on a local filesystem",
            ));
        }
        // SAFETY: a NUL-terminated string live while the model is.
        Ok(unsafe { copy_c_str(location) })
    }

    /// Whether Triton asks the backend to complete the configuration (its default;
    /// `--disable-auto-complete-config` turns it off).
    pub fn auto_complete_config(&self) -> Result<bool> {
        // Read as a byte, not as a Rust bool: the C++ side writes its own bool.
        let mut flag: u8 = 0;
        // SAFETY: the handle is live; `flag` is a valid one-byte out-pointer.
        check(unsafe {
            sys::TRITONBACKEND_ModelAutoCompleteConfig(self.as_ptr(), (&raw mut flag).cast())
        })?;
        Ok(flag != 0)
    }

    /// Gives Triton the completed configuration (only inputs, outputs, max batch size
    /// and scheduling are taken); read it back with [`Self::config_json`].
    pub fn set_config(&self, json: &str) -> Result<()> {
        let mut message = ptr::null_mut();
        // SAFETY: `json` is valid for `json.len()` bytes during the call; `message` is a
        // valid out-pointer and becomes ours.
        check(unsafe {
            sys::TRITONSERVER_MessageNewFromSerializedJson(
                &mut message,
                json.as_ptr().cast(),
                json.len(),
            )
        })?;
        // SAFETY: the handle is live and `message` is a live message; Triton does not
        // take ownership of it (tritonbackend.h).
        let set = check(unsafe { sys::TRITONBACKEND_ModelSetConfig(self.as_ptr(), 1, message) });
        // SAFETY: the message is ours and deleted exactly once, after the call.
        let deleted = check(unsafe { sys::TRITONSERVER_MessageDelete(message) });
        set?;
        deleted
    }

    /// The model configuration (after auto-complete) as JSON.
    pub fn config_json(&self) -> Result<String> {
        let mut message = ptr::null_mut();
        // SAFETY: the handle is live; `message` is a valid out-pointer and becomes ours.
        check(unsafe { sys::TRITONBACKEND_ModelConfig(self.as_ptr(), 1, &mut message) })?;
        // SAFETY: the caller owns the model config message (tritonbackend.h).
        unsafe { owned_message_json(message) }
    }

    /// The backend that owns this model (live at least as long as the model).
    pub fn backend(&self) -> Result<BackendHandle<'a>> {
        let mut backend = ptr::null_mut();
        // SAFETY: the handle is live; `backend` is a valid out-pointer.
        check(unsafe { sys::TRITONBACKEND_ModelBackend(self.as_ptr(), &mut backend) })?;
        // SAFETY: Triton returns the live backend that owns this live model.
        unsafe { BackendHandle::from_raw(backend) }
    }

    /// The server this model runs in, to send requests into it.
    pub fn server(&self) -> Result<Server> {
        let mut server = ptr::null_mut();
        // SAFETY: the handle is live; `server` is a valid out-pointer.
        check(unsafe { sys::TRITONBACKEND_ModelServer(self.as_ptr(), &mut server) })?;
        // SAFETY: Triton returns the server, which outlives every model it loads.
        unsafe { Server::from_raw(server) }
    }

    /// Reports the memory this model holds until ModelFinalize (not its instances').
    pub fn report_memory_usage(&self, usage: &[crate::types::MemoryUsage]) -> Result<()> {
        super::memory_report::report(usage, |list, count| {
            // SAFETY: the model is live; `list` holds `count` live attributes that Triton
            // reads during the call only (tritonbackend.h: the backend owns them).
            unsafe { sys::TRITONBACKEND_ModelReportMemoryUsage(self.as_ptr(), list, count) }
        })
    }
}

// ---------------------------------------------------------------------------------------
// Model instance

pub enum InstanceKindTag {}

impl HandleKind for InstanceKindTag {
    type Raw = sys::TRITONBACKEND_ModelInstance;
    const WHAT: &'static str = "model instance";
    const GET_STATE: unsafe extern "C" fn(
        *mut Self::Raw,
        *mut *mut c_void,
    ) -> *mut sys::TRITONSERVER_Error = sys::TRITONBACKEND_ModelInstanceState;
    const SET_STATE: unsafe extern "C" fn(
        *mut Self::Raw,
        *mut c_void,
    ) -> *mut sys::TRITONSERVER_Error = sys::TRITONBACKEND_ModelInstanceSetState;
}

/// The `TRITONBACKEND_ModelInstance`: live from instance initialize to finalize.
pub type InstanceHandle<'a> = Handle<'a, InstanceKindTag>;

/// Where an instance runs, from its `instance_group` kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceKind {
    Cpu,
    Gpu { device_id: i32 },
    Model { device_id: i32 },
    Auto,
}

impl<'a> InstanceHandle<'a> {
    pub fn name(&self) -> Result<String> {
        let mut name = ptr::null();
        // SAFETY: the handle is live; `name` is a valid out-pointer.
        check(unsafe { sys::TRITONBACKEND_ModelInstanceName(self.as_ptr(), &mut name) })?;
        // SAFETY: a NUL-terminated string live while the instance is.
        Ok(unsafe { copy_c_str(name) })
    }

    pub fn kind(&self) -> Result<InstanceKind> {
        let mut kind = 0;
        let mut device_id = 0i32;
        // SAFETY: the handle is live; out-pointers are valid.
        check(unsafe { sys::TRITONBACKEND_ModelInstanceKind(self.as_ptr(), &mut kind) })?;
        // SAFETY: as above.
        check(unsafe { sys::TRITONBACKEND_ModelInstanceDeviceId(self.as_ptr(), &mut device_id) })?;
        Ok(match kind {
            sys::TRITONSERVER_INSTANCEGROUPKIND_CPU => InstanceKind::Cpu,
            sys::TRITONSERVER_INSTANCEGROUPKIND_GPU => InstanceKind::Gpu { device_id },
            sys::TRITONSERVER_INSTANCEGROUPKIND_MODEL => InstanceKind::Model { device_id },
            _ => InstanceKind::Auto,
        })
    }

    /// The model that owns this instance (live at least as long as the instance).
    pub fn model(&self) -> Result<ModelHandle<'a>> {
        let mut model = ptr::null_mut();
        // SAFETY: the handle is live; `model` is a valid out-pointer.
        check(unsafe { sys::TRITONBACKEND_ModelInstanceModel(self.as_ptr(), &mut model) })?;
        // SAFETY: Triton returns the live model owning this live instance.
        unsafe { ModelHandle::from_raw(model) }
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
                self.as_ptr(),
                request.as_ptr(),
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
                self.as_ptr(),
                batch_size,
                times.exec_start_ns,
                times.compute_start_ns,
                times.compute_end_ns,
                times.exec_end_ns,
            )
        })
    }

    /// Reports the memory this instance holds until ModelInstanceFinalize.
    pub fn report_memory_usage(&self, usage: &[crate::types::MemoryUsage]) -> Result<()> {
        super::memory_report::report(usage, |list, count| {
            // SAFETY: the instance is live; `list` holds `count` live attributes that
            // Triton reads during the call only (tritonbackend.h: the backend owns them).
            unsafe { sys::TRITONBACKEND_ModelInstanceReportMemoryUsage(self.as_ptr(), list, count) }
        })
    }
}

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

/// The four timestamps Triton's statistics want, from [`super::now_ns`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ExecutionTimes {
    pub exec_start_ns: u64,
    pub compute_start_ns: u64,
    pub compute_end_ns: u64,
    pub exec_end_ns: u64,
}
