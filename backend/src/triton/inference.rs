//! Requests a backend sends into the server it runs in (what Triton calls BLS), and
//! the responses that come back.
//!
//! Ownership:
//! - [`InferenceRequestBuilder`] owns a `TRITONSERVER_InferenceRequest` and the input
//!   buffers it points into; dropped unsent, it deletes both.
//! - [`InferenceRequestBuilder::send`] hands the request to Triton. From then on two
//!   boxes travel with it: the response context (the user's callback), freed after the
//!   callback has seen the final flag, and the release context (the input buffers and
//!   the cancel slot), freed by Triton's release callback, which also deletes the
//!   request. The two callbacks come in either order and possibly on different
//!   threads; neither touches what the other frees.
//! - Each [`InferenceResponse`] is owned by whoever holds it and deleted on drop, which
//!   frees its output buffers (host memory from this module's allocator).
//! - [`InFlight`] never owns the request: it reaches it only through the cancel slot,
//!   which the release callback empties (under its lock) before deleting the request.
//!
//! Relaying another model's (possibly decoupled) stream back to a client:
//!
//! ```ignore
//! let mut builder = InferenceRequestBuilder::new(server, "generator", 2)?;
//! builder.add_input("TEXT", DataType::Bytes, &[1, 1], tensor.data.into_owned())?;
//! let upstream = builder.cancel_handle();
//! let factory = ResponseFactory::new(&request)?;
//! builder.send(move |event| {
//!     if factory.is_cancelled() {
//!         let _ = upstream.cancel();
//!     }
//!     match event {
//!         ResponseEvent::Response(response) => { /* copy outputs into a Response */ }
//!         ResponseEvent::Final => { let _ = factory.send_final_flag(); }
//!     }
//! })?;
//! request.mark_answered(); // the factory answers it; release it now
//! ```

use std::ffi::{CString, c_char, c_void};
use std::mem::ManuallyDrop;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::{self, NonNull};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use triton_sys as sys;

use super::convert::{data_type_from_raw, data_type_to_raw, is_host_memory, read_parameters};
use super::error::{Error, Result, c_string, check, copy_c_str, error_code_from_raw};
use super::server::Server;
use crate::error::ErrorCode;
use crate::types::{DataType, ParameterValue};

// ---------------------------------------------------------------------------------------
// Building a request

/// A request being filled, owned until [`InferenceRequestBuilder::send`] hands it to
/// Triton (dropped unsent, it is deleted). `Send`: it can be built on one thread and
/// sent from another.
pub struct InferenceRequestBuilder {
    server: Server,
    request: OwnedRequest,
    /// Owners of the memory the request's inputs point into; kept until Triton
    /// releases the request.
    inputs: Vec<InputBuffer>,
    slot: Arc<CancelSlot>,
    model: String,
}

/// An input's bytes, boxed so the address Triton was given never moves.
type InputBuffer = Box<dyn AsRef<[u8]> + Send>;

impl InferenceRequestBuilder {
    /// Starts a request to `model` version `version` (`-1`: the one the version policy
    /// picks) in `server`; fill it, then [`InferenceRequestBuilder::send`] it.
    pub fn new(server: Server, model: &str, version: i64) -> Result<Self> {
        let c_model = c_string("model name", model)?;
        let mut raw = ptr::null_mut();
        // SAFETY: the server is live; `c_model` outlives the call (Triton copies it);
        // `raw` is a valid out-pointer and the request it receives becomes ours.
        check(unsafe {
            sys::TRITONSERVER_InferenceRequestNew(
                &mut raw,
                server.as_ptr(),
                c_model.as_ptr(),
                version,
            )
        })?;
        let request = NonNull::new(raw)
            .map(OwnedRequest)
            .ok_or_else(|| Error::internal("Triton returned a null inference request"))?;
        Ok(InferenceRequestBuilder {
            server,
            request,
            inputs: Vec::new(),
            slot: Arc::new(CancelSlot::new()),
            model: model.to_owned(),
        })
    }

    fn raw(&self) -> *mut sys::TRITONSERVER_InferenceRequest {
        self.request.0.as_ptr()
    }

    /// Adds input `name` whose bytes (Triton's layout; BYTES elements each prefixed by
    /// a u32 little-endian length) are `data`. Not copied: Triton reads `data` in place,
    /// so the request keeps it until Triton releases the request. Any owner works:
    /// `Arc<[u8]>`, `Vec<u8>`, `Box<[u8]>`, `&'static [u8]`.
    pub fn add_input<T>(
        &mut self,
        name: &str,
        datatype: DataType,
        shape: &[i64],
        data: T,
    ) -> Result<&mut Self>
    where
        T: AsRef<[u8]> + Send + 'static,
    {
        let c_name = c_string("input name", name)?;
        let dims = u64::try_from(shape.len())
            .map_err(|_| Error::invalid_arg(format!("input '{name}' has too many dimensions")))?;
        // SAFETY: the request is ours and unsent; name and shape outlive the call and
        // Triton copies both.
        check(unsafe {
            sys::TRITONSERVER_InferenceRequestAddInput(
                self.raw(),
                c_name.as_ptr(),
                data_type_to_raw(datatype),
                shape.as_ptr(),
                dims,
            )
        })?;
        let owner: InputBuffer = Box::new(data);
        let bytes = (*owner).as_ref();
        let (base, byte_size) = (bytes.as_ptr(), bytes.len());
        // SAFETY: the request is ours; `base` points to `byte_size` bytes of host memory
        // owned by `owner`, which is boxed (its address never moves) and kept in
        // `self.inputs` until the request is deleted: by us when unsent, else by the
        // release callback, which drops the inputs only after Triton released them.
        let appended = check(unsafe {
            sys::TRITONSERVER_InferenceRequestAppendInputData(
                self.raw(),
                c_name.as_ptr(),
                base.cast::<c_void>(),
                byte_size,
                sys::TRITONSERVER_MEMORY_CPU,
                0,
            )
        });
        // Kept even when appending failed: Triton may hold part of the input.
        self.inputs.push(owner);
        appended?;
        Ok(self)
    }

    /// Asks for output `name`; a request that names none gets all the model's outputs.
    pub fn add_requested_output(&mut self, name: &str) -> Result<&mut Self> {
        let c_name = c_string("output name", name)?;
        // SAFETY: the request is ours and unsent; Triton copies the name.
        check(unsafe {
            sys::TRITONSERVER_InferenceRequestAddRequestedOutput(self.raw(), c_name.as_ptr())
        })?;
        Ok(self)
    }

    /// Sets request parameter `key`; [`ParameterValue::Other`] cannot be sent.
    pub fn parameter(&mut self, key: &str, value: &ParameterValue) -> Result<&mut Self> {
        let c_key = c_string("parameter name", key)?;
        let raw = self.raw();
        let setting = ParameterSetting::from_value(key, value)?;
        // SAFETY: the request is ours and unsent; key and value outlive the call and
        // Triton copies them.
        let result = unsafe {
            match setting {
                ParameterSetting::String(text) => {
                    sys::TRITONSERVER_InferenceRequestSetStringParameter(
                        raw,
                        c_key.as_ptr(),
                        text.as_ptr(),
                    )
                }
                ParameterSetting::Int(number) => {
                    sys::TRITONSERVER_InferenceRequestSetIntParameter(raw, c_key.as_ptr(), number)
                }
                ParameterSetting::Bool(flag) => {
                    sys::TRITONSERVER_InferenceRequestSetBoolParameter(raw, c_key.as_ptr(), flag)
                }
                ParameterSetting::Double(number) => {
                    sys::TRITONSERVER_InferenceRequestSetDoubleParameter(
                        raw,
                        c_key.as_ptr(),
                        number,
                    )
                }
            }
        };
        check(result)?;
        Ok(self)
    }

    /// Sets the request's timeout in microseconds (0: none): a request still queued
    /// in the target's scheduler that long fails with a timeout, where the target's queue
    /// policy allows timeout overrides.
    pub fn timeout_us(&mut self, timeout_us: u64) -> Result<&mut Self> {
        // SAFETY: the request is ours and unsent.
        check(unsafe {
            sys::TRITONSERVER_InferenceRequestSetTimeoutMicroseconds(self.raw(), timeout_us)
        })?;
        Ok(self)
    }

    /// A handle to cancel this request, usable before it is sent (e.g. to move into
    /// the response callback): a cancel made before sending takes effect once Triton
    /// has the request. The same handle [`InferenceRequestBuilder::send`] returns.
    pub fn cancel_handle(&self) -> InFlight {
        InFlight {
            slot: Arc::clone(&self.slot),
        }
    }

    /// Sends the request. `on_response` sees every response in order, then nothing
    /// after the event whose [`ResponseEvent::is_final`] is true (exactly one such
    /// event once this returns `Ok`).
    ///
    /// `on_response` runs on Triton's threads (the target model's, or the calling
    /// thread itself before `send` returns, e.g. on a response-cache hit), one call at a
    /// time: keep it short, never block waiting on this request's own responses, and
    /// do not hold a lock it takes while calling `send`. A panic in it is caught and
    /// logged; later events are still delivered.
    ///
    /// On error nothing was sent, no callback runs, and the request, its inputs and
    /// `on_response` are dropped here.
    pub fn send<F>(self, on_response: F) -> Result<InFlight>
    where
        F: FnMut(ResponseEvent) + Send + 'static,
    {
        let allocator = response_allocator()?;
        let InferenceRequestBuilder {
            server,
            request,
            inputs,
            slot,
            model,
        } = self;
        let sent_request = RequestPtr(request.0);
        let raw = request.0.as_ptr();
        let response_context = Box::into_raw(Box::new(ResponseContext {
            on_response: Mutex::new(Box::new(on_response)),
        }));
        let release_context = Box::into_raw(Box::new(ReleaseContext {
            slot: Arc::clone(&slot),
            inputs,
        }));
        // SAFETY: the request is ours and unsent; both contexts are live boxes leaked
        // just above, each passed to the callback that frees it.
        let sent = unsafe { hand_over(server, raw, allocator, response_context, release_context) };
        match sent {
            Ok(()) => {
                request.disown();
                if let Err(error) = slot.mark_sent(sent_request, cancel_request) {
                    crate::log_error!("could not cancel the request to '{model}': {error}");
                }
                Ok(InFlight { slot })
            }
            Err(error) => {
                slot.mark_done();
                // Triton kept nothing: delete the request first (it points into the
                // inputs), then free both contexts.
                drop(request);
                // SAFETY: both boxes were leaked above and, the send having failed, no
                // callback will ever receive them: they are still uniquely ours.
                drop(unsafe { Box::from_raw(release_context) });
                // SAFETY: as above.
                drop(unsafe { Box::from_raw(response_context) });
                Err(Error::new(
                    error.code,
                    format!("could not send a request to '{model}': {}", error.message),
                ))
            }
        }
    }
}

/// Sets the request's callbacks and sends it; on error the request and both contexts
/// are still the caller's (no callback will run).
///
/// # Safety
/// `raw` must be an unsent request the caller owns, `allocator` live for the process,
/// and both contexts boxes leaked by the caller, not used by it again unless this fails.
unsafe fn hand_over(
    server: Server,
    raw: *mut sys::TRITONSERVER_InferenceRequest,
    allocator: *mut sys::TRITONSERVER_ResponseAllocator,
    response_context: *mut ResponseContext,
    release_context: *mut ReleaseContext,
) -> Result<()> {
    // SAFETY: per the caller; Triton hands `response_context` only to
    // `response_complete`, which frees it after the final flag.
    check(unsafe {
        sys::TRITONSERVER_InferenceRequestSetResponseCallback(
            raw,
            allocator,
            ptr::null_mut(),
            Some(response_complete),
            response_context.cast::<c_void>(),
        )
    })?;
    // SAFETY: per the caller; Triton hands `release_context` only to `request_release`,
    // which frees it with the request.
    check(unsafe {
        sys::TRITONSERVER_InferenceRequestSetReleaseCallback(
            raw,
            Some(request_release),
            release_context.cast::<c_void>(),
        )
    })?;
    // SAFETY: the server is live and the request fully set up; on success Triton owns
    // the request until the release callback, on failure it stays the caller's
    // (tritonserver.h, TRITONSERVER_ServerInferAsync).
    check(unsafe { sys::TRITONSERVER_ServerInferAsync(server.as_ptr(), raw, ptr::null_mut()) })
}

/// A request that is ours to delete.
struct OwnedRequest(NonNull<sys::TRITONSERVER_InferenceRequest>);

// SAFETY: an unsent request is used by one thread at a time; Triton's request API has
// no thread affinity.
unsafe impl Send for OwnedRequest {}

impl OwnedRequest {
    /// Forgets the request without deleting it: Triton owns it now.
    fn disown(self) {
        let _ = ManuallyDrop::new(self);
    }
}

impl Drop for OwnedRequest {
    fn drop(&mut self) {
        // SAFETY: the request is ours (never sent, or sent and failed) and deleted once.
        let deleted = check(unsafe { sys::TRITONSERVER_InferenceRequestDelete(self.0.as_ptr()) });
        if let Err(error) = deleted {
            crate::log_error!("failed to delete an unsent inference request: {error}");
        }
    }
}

/// A parameter value in the form one of Triton's setters takes.
#[derive(Debug, PartialEq)]
enum ParameterSetting {
    String(CString),
    Int(i64),
    Bool(bool),
    Double(f64),
}

impl ParameterSetting {
    fn from_value(key: &str, value: &ParameterValue) -> Result<Self> {
        Ok(match value {
            ParameterValue::String(text) => {
                ParameterSetting::String(c_string(&format!("parameter '{key}'"), text)?)
            }
            ParameterValue::Int(number) => ParameterSetting::Int(*number),
            ParameterValue::Bool(flag) => ParameterSetting::Bool(*flag),
            ParameterValue::Double(number) => ParameterSetting::Double(*number),
            ParameterValue::Other => {
                return Err(Error::unsupported(format!(
                    "parameter '{key}' has a type that cannot be sent (only string, int, \
                     bool and double)"
                )));
            }
        })
    }
}

// ---------------------------------------------------------------------------------------
// Cancelling

/// A handle to a sent request (or one about to be sent), to cancel it.
///
/// Thread-safety: `Send + Sync + Clone`; any thread may cancel at any time. The raw
/// request is reached only through a shared slot under a lock, and the release callback
/// empties the slot under that lock before it deletes the request, so a cancel either
/// runs while the request is certainly live or finds nothing to do.
#[derive(Clone)]
pub struct InFlight {
    slot: Arc<CancelSlot>,
}

impl InFlight {
    /// Asks Triton to cancel the request (best effort: the model may still finish it,
    /// and the final event still comes). Does nothing once Triton released the
    /// request; before it is sent, the cancel is applied as soon as it is.
    pub fn cancel(&self) -> Result<()> {
        self.slot.cancel(cancel_request)
    }
}

fn cancel_request(request: RequestPtr) -> Result<()> {
    // SAFETY: the slot calls this only while it holds the request as live, under the
    // lock the release callback must take before deleting it.
    check(unsafe { sys::TRITONSERVER_InferenceRequestCancel(request.0.as_ptr()) })
}

/// A request in Triton's hands, usable only under the slot's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RequestPtr(NonNull<sys::TRITONSERVER_InferenceRequest>);

// SAFETY: the pointer is only used (to cancel) under the slot's lock while Triton holds
// the request; Triton allows cancelling from any thread while a request is in flight.
unsafe impl Send for RequestPtr {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// Not sent yet, or being sent: a cancel is remembered and applied once Triton
    /// has the request (Triton resets a cancel made before `ServerInferAsync`).
    Pending { cancel_requested: bool },
    /// In Triton's hands and not released.
    Live(RequestPtr),
    /// Released by Triton, or never sent: nothing to cancel.
    Done,
}

/// Where a request can be reached for cancelling, shared by the [`InFlight`] handles and
/// the release callback.
#[derive(Debug)]
struct CancelSlot {
    state: Mutex<SlotState>,
}

impl CancelSlot {
    fn new() -> Self {
        CancelSlot {
            state: Mutex::new(SlotState::Pending {
                cancel_requested: false,
            }),
        }
    }

    /// Nothing panics while holding the lock, but a poisoned lock must not stop a
    /// release: the state is always consistent.
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Cancels the live request under the lock, or records the wish while pending.
    fn cancel(&self, cancel: impl FnOnce(RequestPtr) -> Result<()>) -> Result<()> {
        let mut state = self.lock();
        match *state {
            SlotState::Pending { .. } => {
                *state = SlotState::Pending {
                    cancel_requested: true,
                };
                Ok(())
            }
            SlotState::Live(request) => cancel(request),
            SlotState::Done => Ok(()),
        }
    }

    /// After `ServerInferAsync` succeeded: the request becomes cancellable, unless the
    /// release callback already ran (it may, even before `ServerInferAsync` returns). A
    /// cancel asked for meanwhile is applied now.
    fn mark_sent(
        &self,
        request: RequestPtr,
        cancel: impl FnOnce(RequestPtr) -> Result<()>,
    ) -> Result<()> {
        let mut state = self.lock();
        match *state {
            SlotState::Pending { cancel_requested } => {
                *state = SlotState::Live(request);
                if cancel_requested {
                    return cancel(request);
                }
                Ok(())
            }
            SlotState::Live(_) | SlotState::Done => Ok(()),
        }
    }

    /// The request is released (or will never be sent): after this returns, no cancel
    /// touches it, so it may be deleted.
    fn mark_done(&self) {
        *self.lock() = SlotState::Done;
    }

    #[cfg(test)]
    fn is_live(&self) -> bool {
        matches!(*self.lock(), SlotState::Live(_))
    }
}

// ---------------------------------------------------------------------------------------
// Callbacks

/// What the response callback owns: the user's callback, behind a lock because a
/// decoupled model may send responses from several threads.
struct ResponseContext {
    on_response: Mutex<Box<dyn FnMut(ResponseEvent) + Send>>,
}

/// What the release callback owns: the inputs' memory and the cancel slot.
struct ReleaseContext {
    slot: Arc<CancelSlot>,
    #[allow(
        dead_code,
        reason = "held only to be dropped once Triton stops reading them"
    )]
    inputs: Vec<InputBuffer>,
}

/// What a response callback carries, by its response pointer and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    Response {
        is_final: bool,
    },
    /// The final flag without a response (decoupled models).
    FinalOnly,
    /// Neither a response nor the final flag: nothing to deliver.
    Nothing,
}

impl Delivery {
    fn of(has_response: bool, flags: u32) -> Self {
        let is_final = flags & sys::TRITONSERVER_RESPONSE_COMPLETE_FINAL != 0;
        match (has_response, is_final) {
            (true, is_final) => Delivery::Response { is_final },
            (false, true) => Delivery::FinalOnly,
            (false, false) => Delivery::Nothing,
        }
    }
}

/// Triton's `TRITONSERVER_InferenceResponseCompleteFn_t`: hands the response to the user
/// callback and, after the final flag, frees the response context.
unsafe extern "C" fn response_complete(
    response: *mut sys::TRITONSERVER_InferenceResponse,
    flags: u32,
    userp: *mut c_void,
) {
    let caught = catch_unwind(AssertUnwindSafe(|| {
        let delivery = Delivery::of(!response.is_null(), flags);
        // Owned from here, so it is deleted even if nobody takes it.
        let event = match (NonNull::new(response), delivery) {
            (Some(raw), Delivery::Response { is_final }) => {
                Some(ResponseEvent::Response(InferenceResponse { raw, is_final }))
            }
            (_, Delivery::FinalOnly) => Some(ResponseEvent::Final),
            _ => None,
        };
        let context = userp.cast::<ResponseContext>();
        if context.is_null() {
            crate::log_error!("an inference response arrived without its context");
            return;
        }
        if let Some(event) = event {
            // SAFETY: `context` is the live box leaked in `send`; it is freed only below,
            // after the final flag, which per tritonserver.h is the last call.
            let context_ref = unsafe { &*context };
            let mut on_response = context_ref
                .on_response
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let delivered = catch_unwind(AssertUnwindSafe(|| on_response(event)));
            drop(on_response);
            if delivered.is_err() {
                crate::log_error!("the callback for an inference response panicked");
            }
        }
        if matches!(
            delivery,
            Delivery::FinalOnly | Delivery::Response { is_final: true }
        ) {
            // SAFETY: the box leaked in `send`; Triton calls no more after the final
            // flag, so this is its last use and it is freed once.
            drop(unsafe { Box::from_raw(context) });
        }
    }));
    if caught.is_err() {
        crate::log_error!("panic while handling an inference response");
    }
}

/// Triton's `TRITONSERVER_InferenceRequestReleaseFn_t`: takes the request back, makes
/// it unreachable for cancels, deletes it and drops the inputs.
unsafe extern "C" fn request_release(
    request: *mut sys::TRITONSERVER_InferenceRequest,
    flags: u32,
    userp: *mut c_void,
) {
    if flags & sys::TRITONSERVER_REQUEST_RELEASE_ALL == 0 {
        // Not a release that hands the request back (tritonserver.h: check the flag).
        return;
    }
    let caught = catch_unwind(AssertUnwindSafe(|| {
        let context = userp.cast::<ReleaseContext>();
        let context = if context.is_null() {
            crate::log_error!("an inference request was released without its context");
            None
        } else {
            // SAFETY: the box leaked in `send`; Triton releases a request once, so this
            // takes it back exactly once.
            Some(unsafe { Box::from_raw(context) })
        };
        if let Some(context) = &context {
            context.slot.mark_done();
        }
        if !request.is_null() {
            // SAFETY: RELEASE_ALL passes the request back to us; the slot no longer
            // hands it out, so it is deleted once, here.
            if let Err(error) = check(unsafe { sys::TRITONSERVER_InferenceRequestDelete(request) })
            {
                crate::log_error!("failed to delete a released inference request: {error}");
            }
        }
        // The inputs are dropped only now: Triton no longer reads them.
        drop(context);
    }));
    if caught.is_err() {
        crate::log_error!("panic while releasing an inference request");
    }
}

// ---------------------------------------------------------------------------------------
// The response allocator: host memory, one allocator for the process

struct Allocator(NonNull<sys::TRITONSERVER_ResponseAllocator>);

// SAFETY: the allocator is immutable after creation and its callbacks are thread-safe
// (they touch no shared state); Triton uses it from any thread.
unsafe impl Send for Allocator {}
// SAFETY: as above.
unsafe impl Sync for Allocator {}

/// Never deleted: responses made with it may outlive any one model.
static ALLOCATOR: OnceLock<Allocator> = OnceLock::new();

fn response_allocator() -> Result<*mut sys::TRITONSERVER_ResponseAllocator> {
    if let Some(allocator) = ALLOCATOR.get() {
        return Ok(allocator.0.as_ptr());
    }
    let mut raw = ptr::null_mut();
    // SAFETY: `raw` is a valid out-pointer; both functions match Triton's signatures and
    // live for the process.
    check(unsafe {
        sys::TRITONSERVER_ResponseAllocatorNew(
            &mut raw,
            Some(allocate_host_buffer),
            Some(release_host_buffer),
            None,
        )
    })?;
    let ours = NonNull::new(raw)
        .ok_or_else(|| Error::internal("Triton returned a null response allocator"))?;
    if let Err(Allocator(lost)) = ALLOCATOR.set(Allocator(ours)) {
        // Another thread made one first: ours was never used.
        // SAFETY: `lost` is the allocator made above, unused and deleted once.
        let deleted = check(unsafe { sys::TRITONSERVER_ResponseAllocatorDelete(lost.as_ptr()) });
        if let Err(error) = deleted {
            crate::log_warn!("failed to delete a spare response allocator: {error}");
        }
    }
    ALLOCATOR
        .get()
        .map(|allocator| allocator.0.as_ptr())
        .ok_or_else(|| Error::internal("the response allocator was not kept"))
}

/// `byte_size` bytes of host memory from `malloc` (16-byte aligned), or null for an
/// empty output (Triton passes null back to [`release_host_buffer`]). `Err` when out of
/// memory.
fn host_alloc(byte_size: usize) -> std::result::Result<*mut c_void, ()> {
    if byte_size == 0 {
        return Ok(ptr::null_mut());
    }
    // SAFETY: malloc has no preconditions; null is checked.
    let buffer = unsafe { libc::malloc(byte_size) };
    if buffer.is_null() {
        Err(())
    } else {
        Ok(buffer)
    }
}

/// Frees what [`host_alloc`] returned (null is fine).
///
/// # Safety
/// `buffer` must be null or from [`host_alloc`], not freed yet.
unsafe fn host_free(buffer: *mut c_void) {
    // SAFETY: per the caller, a malloc'd pointer freed once, or null.
    unsafe { libc::free(buffer) }
}

/// Triton's `TRITONSERVER_ResponseAllocatorAllocFn_t`: host memory whatever was
/// preferred (this backend reads outputs on the CPU).
#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn allocate_host_buffer(
    _allocator: *mut sys::TRITONSERVER_ResponseAllocator,
    tensor_name: *const c_char,
    byte_size: usize,
    _memory_type: sys::TRITONSERVER_MemoryType,
    _memory_type_id: i64,
    _userp: *mut c_void,
    buffer: *mut *mut c_void,
    buffer_userp: *mut *mut c_void,
    actual_memory_type: *mut sys::TRITONSERVER_MemoryType,
    actual_memory_type_id: *mut i64,
) -> *mut sys::TRITONSERVER_Error {
    let caught = catch_unwind(AssertUnwindSafe(|| {
        if buffer.is_null()
            || buffer_userp.is_null()
            || actual_memory_type.is_null()
            || actual_memory_type_id.is_null()
        {
            return Error::internal("the response allocator got a null out-pointer").into_raw();
        }
        let Ok(memory) = host_alloc(byte_size) else {
            // SAFETY: Triton passes a NUL-terminated name (or null) live for the call.
            let name = unsafe { copy_c_str(tensor_name) };
            return Error::new(
                ErrorCode::Unavailable,
                format!("out of host memory for output '{name}' ({byte_size} bytes)"),
            )
            .into_raw();
        };
        // SAFETY: the four out-pointers were checked non-null and Triton makes them
        // valid for writes during the call.
        unsafe {
            *buffer = memory;
            *buffer_userp = ptr::null_mut();
            *actual_memory_type = sys::TRITONSERVER_MEMORY_CPU;
            *actual_memory_type_id = 0;
        }
        ptr::null_mut()
    }));
    caught.unwrap_or_else(|_| Error::internal("panic in the response allocator").into_raw())
}

/// Triton's `TRITONSERVER_ResponseAllocatorReleaseFn_t`: frees a buffer
/// [`allocate_host_buffer`] made, when its response is deleted.
unsafe extern "C" fn release_host_buffer(
    _allocator: *mut sys::TRITONSERVER_ResponseAllocator,
    buffer: *mut c_void,
    _buffer_userp: *mut c_void,
    _byte_size: usize,
    _memory_type: sys::TRITONSERVER_MemoryType,
    _memory_type_id: i64,
) -> *mut sys::TRITONSERVER_Error {
    // SAFETY: Triton returns each buffer from `allocate_host_buffer` once (or null).
    let caught = catch_unwind(|| unsafe { host_free(buffer) });
    match caught {
        Ok(()) => ptr::null_mut(),
        Err(_) => Error::internal("panic while freeing a response buffer").into_raw(),
    }
}

// ---------------------------------------------------------------------------------------
// Responses

/// What the response callback receives.
#[derive(Debug)]
pub enum ResponseEvent {
    /// A response; [`InferenceResponse::is_final`] says whether more follow.
    Response(InferenceResponse),
    /// No more responses, and none with this event (decoupled models end a stream
    /// this way).
    Final,
}

impl ResponseEvent {
    /// Whether this is the last event of the request.
    pub fn is_final(&self) -> bool {
        match self {
            ResponseEvent::Response(response) => response.is_final(),
            ResponseEvent::Final => true,
        }
    }
}

/// One response of a sent request; deleted on drop (which frees its output buffers).
/// Holding it also holds the model that made it: drop it once copied out.
pub struct InferenceResponse {
    raw: NonNull<sys::TRITONSERVER_InferenceResponse>,
    is_final: bool,
}

// SAFETY: a response is owned by one thread at a time; Triton's response getters have
// no thread affinity.
unsafe impl Send for InferenceResponse {}

impl std::fmt::Debug for InferenceResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InferenceResponse")
            .field("is_final", &self.is_final)
            .finish_non_exhaustive()
    }
}

/// One output tensor of an [`InferenceResponse`], borrowing its host bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseOutput<'a> {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
    /// Triton's layout (BYTES: u32 little-endian length before each element).
    pub data: &'a [u8],
}

impl InferenceResponse {
    fn raw(&self) -> *mut sys::TRITONSERVER_InferenceResponse {
        self.raw.as_ptr()
    }

    /// Whether no responses follow this one.
    pub fn is_final(&self) -> bool {
        self.is_final
    }

    /// The error the model answered with, if any (a copy: the response owns the
    /// original).
    pub fn error(&self) -> Option<Error> {
        // SAFETY: the response is live; the error returned is owned by the response and
        // only read here, never deleted.
        let raw = NonNull::new(unsafe { sys::TRITONSERVER_InferenceResponseError(self.raw()) })?;
        // SAFETY: `raw` lives as long as the response; the message is copied at once.
        let (code, message) = unsafe {
            (
                sys::TRITONSERVER_ErrorCode(raw.as_ptr()),
                copy_c_str(sys::TRITONSERVER_ErrorMessage(raw.as_ptr())),
            )
        };
        Some(Error::new(error_code_from_raw(code), message))
    }

    /// The response's parameters; BYTES values come back as [`ParameterValue::Other`].
    pub fn parameters(&self) -> Result<Vec<(String, ParameterValue)>> {
        let mut count = 0u32;
        // SAFETY: the response is live; `count` is a valid out-pointer.
        check(unsafe {
            sys::TRITONSERVER_InferenceResponseParameterCount(self.raw(), &mut count)
        })?;
        read_parameters(count, |index, key, kind, value| {
            // SAFETY: the response is live and `index` < count; the out-pointers are
            // valid, and what they receive lives as long as the response.
            unsafe {
                sys::TRITONSERVER_InferenceResponseParameter(self.raw(), index, key, kind, value)
            }
        })
    }

    /// The output tensors, borrowing their bytes from the response.
    pub fn outputs(&self) -> Result<Vec<ResponseOutput<'_>>> {
        let mut count = 0u32;
        // SAFETY: the response is live; `count` is a valid out-pointer.
        check(unsafe { sys::TRITONSERVER_InferenceResponseOutputCount(self.raw(), &mut count) })?;
        (0..count).map(|index| self.output_at(index)).collect()
    }

    fn output_at(&self, index: u32) -> Result<ResponseOutput<'_>> {
        let mut name = ptr::null();
        let mut datatype = 0;
        let mut shape = ptr::null();
        let mut dims = 0u64;
        let mut base = ptr::null();
        let mut byte_size = 0usize;
        let mut memory_type = sys::TRITONSERVER_MEMORY_CPU;
        let mut memory_type_id = 0i64;
        let mut userp = ptr::null_mut();
        // SAFETY: the response is live; `index` < the output count; all out-pointers are
        // valid; what they receive lives as long as the response.
        check(unsafe {
            sys::TRITONSERVER_InferenceResponseOutput(
                self.raw(),
                index,
                &mut name,
                &mut datatype,
                &mut shape,
                &mut dims,
                &mut base,
                &mut byte_size,
                &mut memory_type,
                &mut memory_type_id,
                &mut userp,
            )
        })?;
        // SAFETY: a NUL-terminated name live as long as the response.
        let name = unsafe { copy_c_str(name) };
        let datatype = data_type_from_raw(datatype).ok_or_else(|| {
            Error::unsupported(format!(
                "output '{name}' has an unknown datatype ({datatype})"
            ))
        })?;
        let dims = usize::try_from(dims)
            .map_err(|_| Error::internal(format!("output '{name}' has too many dimensions")))?;
        let shape = match (shape.is_null(), dims) {
            (_, 0) => Vec::new(),
            (true, _) => return Err(Error::internal(format!("output '{name}' has no shape"))),
            // SAFETY: Triton gives `dims` dims at `shape`, live as long as the response.
            (false, _) => unsafe { std::slice::from_raw_parts(shape, dims) }.to_vec(),
        };
        if !is_host_memory(memory_type) {
            return Err(Error::unsupported(format!(
                "output '{name}' is not in host memory (type {memory_type}, device \
                 {memory_type_id})"
            )));
        }
        let data: &[u8] = match (base.is_null(), byte_size) {
            (_, 0) => &[],
            (true, _) => return Err(Error::internal(format!("output '{name}' has no data"))),
            // SAFETY: `byte_size` host bytes (memory type checked above) at `base`, owned
            // by the response, which `&self` borrows for as long as the slice lives.
            (false, _) => unsafe { std::slice::from_raw_parts(base.cast::<u8>(), byte_size) },
        };
        Ok(ResponseOutput {
            name,
            datatype,
            shape,
            data,
        })
    }
}

impl Drop for InferenceResponse {
    fn drop(&mut self) {
        // SAFETY: the response is ours (the callback passed it on) and deleted once.
        if let Err(error) = check(unsafe { sys::TRITONSERVER_InferenceResponseDelete(self.raw()) })
        {
            crate::log_error!("failed to delete an inference response: {error}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::thread;
    use std::time::Duration;

    fn fake_request() -> RequestPtr {
        RequestPtr(NonNull::dangling())
    }

    #[test]
    fn parameters_map_to_their_setters_and_other_is_refused() {
        let set = |value| ParameterSetting::from_value("k", &value);
        assert_eq!(
            set(ParameterValue::String("v".into())),
            Ok(ParameterSetting::String(CString::from(c"v")))
        );
        assert_eq!(set(ParameterValue::Int(-3)), Ok(ParameterSetting::Int(-3)));
        assert_eq!(
            set(ParameterValue::Bool(true)),
            Ok(ParameterSetting::Bool(true))
        );
        assert_eq!(
            set(ParameterValue::Double(0.5)),
            Ok(ParameterSetting::Double(0.5))
        );
        assert_eq!(
            set(ParameterValue::Other).map_err(|e| e.code),
            Err(ErrorCode::Unsupported)
        );
        assert_eq!(
            set(ParameterValue::String("a\0b".into())).map_err(|e| e.code),
            Err(ErrorCode::InvalidArg)
        );
    }

    #[test]
    fn callback_flags_map_to_deliveries() {
        let final_flag = sys::TRITONSERVER_RESPONSE_COMPLETE_FINAL;
        assert_eq!(
            Delivery::of(true, 0),
            Delivery::Response { is_final: false }
        );
        assert_eq!(
            Delivery::of(true, final_flag),
            Delivery::Response { is_final: true }
        );
        assert_eq!(Delivery::of(false, final_flag), Delivery::FinalOnly);
        assert_eq!(Delivery::of(false, 0), Delivery::Nothing);
    }

    #[test]
    fn cancel_reaches_only_a_live_request() {
        let calls = AtomicUsize::new(0);
        let count = |_: RequestPtr| {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(())
        };
        let slot = CancelSlot::new();
        assert!(!slot.is_live());
        slot.mark_sent(fake_request(), count).unwrap();
        assert!(slot.is_live());
        slot.cancel(count).unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        slot.mark_done();
        assert!(!slot.is_live());
        slot.cancel(count).unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn cancel_before_sending_is_applied_once_sent() {
        let calls = AtomicUsize::new(0);
        let count = |_: RequestPtr| {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(())
        };
        let slot = CancelSlot::new();
        slot.cancel(count).unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        slot.mark_sent(fake_request(), count).unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_release_before_send_returns_leaves_nothing_to_cancel() {
        let slot = CancelSlot::new();
        slot.cancel(|_| Ok(())).unwrap();
        slot.mark_done(); // the release callback ran inside ServerInferAsync
        slot.mark_sent(fake_request(), |_| panic!("cancelled a released request"))
            .unwrap();
        assert!(!slot.is_live());
        slot.cancel(|_| panic!("cancelled a released request"))
            .unwrap();
    }

    #[test]
    fn cancel_errors_are_returned() {
        let slot = CancelSlot::new();
        slot.mark_sent(fake_request(), |_| Ok(())).unwrap();
        let result = slot.cancel(|_| Err(Error::internal("nope")));
        assert_eq!(result.map_err(|e| e.message), Err("nope".to_owned()));
    }

    /// The release must wait for a cancel in progress, so the request is never deleted
    /// under it; and no cancel may reach the request once the release marked it done.
    #[test]
    fn release_waits_for_a_running_cancel() {
        let slot = Arc::new(CancelSlot::new());
        slot.mark_sent(fake_request(), |_| Ok(())).unwrap();
        let in_cancel = Arc::new(Barrier::new(2));
        let deleted = Arc::new(AtomicUsize::new(0));
        let canceller = {
            let (slot, in_cancel, deleted) = (slot.clone(), in_cancel.clone(), deleted.clone());
            thread::spawn(move || {
                slot.cancel(|_| {
                    in_cancel.wait();
                    thread::sleep(Duration::from_millis(50));
                    assert_eq!(deleted.load(Ordering::SeqCst), 0, "deleted during cancel");
                    Ok(())
                })
            })
        };
        in_cancel.wait();
        slot.mark_done();
        deleted.store(1, Ordering::SeqCst);
        canceller.join().unwrap().unwrap();
        slot.cancel(|_| panic!("cancelled a deleted request"))
            .unwrap();
    }

    #[test]
    fn many_threads_cancel_while_the_request_is_released() {
        let slot = Arc::new(CancelSlot::new());
        slot.mark_sent(fake_request(), |_| Ok(())).unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (slot, done) = (slot.clone(), done.clone());
                thread::spawn(move || {
                    for _ in 0..1000 {
                        slot.cancel(|_| {
                            assert_eq!(done.load(Ordering::SeqCst), 0, "cancel after release");
                            Ok(())
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(1));
        slot.mark_done();
        done.store(1, Ordering::SeqCst);
        for thread in threads {
            thread.join().unwrap();
        }
    }

    #[test]
    fn host_buffers_are_null_when_empty_and_freeable() {
        assert_eq!(host_alloc(0), Ok(ptr::null_mut()));
        let buffer = host_alloc(64).unwrap();
        assert!(!buffer.is_null());
        assert_eq!(buffer as usize % 16, 0);
        // SAFETY: from host_alloc, freed once; null is allowed.
        unsafe {
            host_free(buffer);
            host_free(ptr::null_mut());
        }
    }

    #[test]
    fn boxed_inputs_keep_their_address() {
        let owner: InputBuffer = Box::new(vec![1u8, 2, 3]);
        let before = (*owner).as_ref().as_ptr();
        let moved = [owner];
        assert_eq!(moved[0].as_ref().as_ref().as_ptr(), before);
        // Inline owners (arrays) are boxed first, so they do not move either.
        let inline: InputBuffer = Box::new([7u8; 4]);
        let before = (*inline).as_ref().as_ptr();
        let moved = Some(inline);
        assert_eq!(moved.map(|b| (*b).as_ref().as_ptr()), Some(before));
    }

    #[test]
    fn handles_and_responses_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<InFlight>();
        send::<InferenceRequestBuilder>();
        send::<InferenceResponse>();
        send::<ResponseEvent>();
    }
}
