//! Whether a model instance can serve, for `TRITONBACKEND_ModelInstanceReady`.
//!
//! Newer Triton releases ask an instance whether it is ready from the thread that
//! answers `/v2/models/<m>/ready`, while the instance may be executing on its own
//! thread. So what Triton keeps as the instance's state is an [`InstanceSlot`]: the
//! instance's health, readable from any thread, beside the instance itself behind a
//! mutex that only `execute` takes (Triton runs one execute at a time per instance,
//! so the lock is never contended). The readiness answer never waits for an execution.
//!
//! An instance stops being ready once a panic (a bug in this backend) happened while
//! it executed: whether the panic was caught inside `execute` or escaped it, the
//! instance's state was borrowed mutably at that moment, so it is no longer trusted
//! to be consistent. It keeps answering requests (each one is still validated on its
//! own), but reports itself unhealthy, with the panic's message, until the model is
//! loaded again. Nothing else makes an instance unhealthy: its ONNX Runtime session
//! exists for its whole life (an instance whose session cannot be created never
//! initializes).
//!
//! Free of FFI: the panic hook in `lib.rs` records panics here.

use std::cell::{Cell, RefCell};
use std::sync::{Mutex, MutexGuard, OnceLock};

thread_local! {
    static PANICS: Cell<u64> = const { Cell::new(0) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Records a panic on the current thread; the panic hook calls this for every panic,
/// including the ones `catch_unwind` stops later.
pub fn record_panic(message: &str) {
    PANICS.with(|count| count.set(count.get().wrapping_add(1)));
    LAST_PANIC.with(|last| *last.borrow_mut() = Some(message.to_owned()));
}

/// Watches the current thread for panics from its creation on.
pub struct PanicWatch {
    start: u64,
}

impl PanicWatch {
    pub fn start() -> Self {
        PanicWatch {
            start: PANICS.with(Cell::get),
        }
    }

    /// The message of the last panic on this thread since the watch started, if any.
    pub fn panicked(&self) -> Option<String> {
        if PANICS.with(Cell::get) == self.start {
            return None;
        }
        Some(
            LAST_PANIC
                .with(|last| last.borrow().clone())
                .unwrap_or_else(|| "unknown panic".to_owned()),
        )
    }
}

/// An instance's health: healthy until the first reason to distrust it, which sticks.
#[derive(Debug, Default)]
pub struct InstanceHealth {
    unhealthy: OnceLock<String>,
}

impl InstanceHealth {
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the instance unhealthy; returns false if it already was (the first reason
    /// is kept).
    pub fn mark_unhealthy(&self, reason: impl Into<String>) -> bool {
        self.unhealthy.set(reason.into()).is_ok()
    }

    /// `Ok` when healthy, else why not.
    pub fn check(&self) -> Result<(), &str> {
        match self.unhealthy.get() {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }
}

/// What Triton stores as a model instance's state: its name and health, readable from
/// any thread, and the instance itself, used by one execution at a time.
pub struct InstanceSlot<T> {
    pub name: String,
    pub health: InstanceHealth,
    instance: Mutex<T>,
}

impl<T> InstanceSlot<T> {
    pub fn new(name: String, instance: T) -> Self {
        InstanceSlot {
            name,
            health: InstanceHealth::new(),
            instance: Mutex::new(instance),
        }
    }

    /// The instance, for one execution. A panic that escaped an earlier execution while
    /// holding it leaves the mutex poisoned: that marks the instance unhealthy (if the
    /// execute entry point has not already) and the instance is handed out anyway, so
    /// requests are still answered.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.instance.lock().unwrap_or_else(|poisoned| {
            self.health
                .mark_unhealthy("a panic escaped an execution of this instance");
            poisoned.into_inner()
        })
    }

    /// Marks the instance unhealthy after a panic during one of its executions.
    pub fn mark_panicked(&self, message: &str) -> bool {
        self.health.mark_unhealthy(format!(
            "a panic happened while it executed ({message}); load the model again to \
             replace it"
        ))
    }

    /// `Ok` when the instance can serve, else why it cannot.
    pub fn readiness(&self) -> Result<(), String> {
        if self.instance.is_poisoned() {
            self.health
                .mark_unhealthy("a panic escaped an execution of this instance");
        }
        self.health
            .check()
            .map_err(|reason| format!("instance '{}' is not ready: {reason}", self.name))
    }

    /// The instance, once Triton finalizes it.
    pub fn into_inner(self) -> T {
        self.instance
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Triton asks for readiness from other threads while the instance executes.
const _: () = {
    const fn shared_across_threads<T: Send + Sync>() {}
    shared_across_threads::<InstanceSlot<crate::model::InstanceState>>();
};

#[cfg(test)]
mod tests {
    use super::*;
    use std::panic::{AssertUnwindSafe, catch_unwind};

    #[test]
    fn a_new_instance_is_ready() {
        let slot = InstanceSlot::new("m_0_0".into(), 7);
        assert_eq!(slot.readiness(), Ok(()));
        assert_eq!(*slot.lock(), 7);
        assert_eq!(slot.into_inner(), 7);
    }

    #[test]
    fn a_panic_during_execution_makes_it_unready_for_good() {
        let slot = InstanceSlot::new("m_0_0".into(), 0);
        let watch = PanicWatch::start();
        assert_eq!(watch.panicked(), None);
        // What the panic hook does when a panic is caught inside execute.
        record_panic("index out of bounds");
        let message = watch.panicked().expect("the panic is seen");
        assert_eq!(message, "index out of bounds");
        assert!(slot.mark_panicked(&message));
        let reason = slot.readiness().expect_err("unready");
        assert!(
            reason.contains("instance 'm_0_0' is not ready")
                && reason.contains("index out of bounds"),
            "{reason}"
        );
        // The first reason sticks; the instance still serves.
        assert!(!slot.mark_panicked("another"));
        assert!(!slot.readiness().unwrap_err().contains("another"));
        *slot.lock() += 1;
        assert_eq!(*slot.lock(), 1);
        // A watch started after the panic does not see it.
        assert_eq!(PanicWatch::start().panicked(), None);
    }

    #[test]
    fn panics_on_other_threads_are_not_this_instances() {
        let watch = PanicWatch::start();
        std::thread::spawn(|| record_panic("elsewhere"))
            .join()
            .expect("thread");
        assert_eq!(watch.panicked(), None);
    }

    #[test]
    fn a_panic_escaping_while_locked_poisons_the_instance() {
        let slot = InstanceSlot::new("m_0_0".into(), vec![1]);
        let result = catch_unwind(AssertUnwindSafe(|| {
            let mut instance = slot.lock();
            instance.push(2);
            panic!("escaped");
        }));
        assert!(result.is_err());
        let reason = slot.readiness().expect_err("poisoned");
        assert!(reason.contains("escaped an execution"), "{reason}");
        // Still usable afterwards.
        assert_eq!(*slot.lock(), vec![1, 2]);
        assert_eq!(slot.into_inner(), vec![1, 2]);
    }
}
