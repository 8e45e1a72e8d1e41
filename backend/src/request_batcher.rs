//! Batching across executions, for models Triton does not batch (`max_batch_size: 0`,
//! so the classic one-text payload keeps its shape): `execute` queues each request for
//! the instance's own thread and returns, and the thread runs all the requests that
//! queued while it was busy as one batch ([`Task::batch_across_executions`]).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crate::error::{BackendError, panic_message};
use crate::log_error;
use crate::responder::Pending;
use crate::tasks::Task;
use crate::work_queue::QueueWorker;

/// An instance's thread and its queue; dropping it lets the thread finish what is
/// queued, then joins it.
pub struct RequestBatcher<T: Task> {
    worker: QueueWorker<Pending<T::Request>>,
}

impl<T: Task> RequestBatcher<T> {
    /// Starts the thread named after `instance`, which owns the instance's state from
    /// now on and runs batches of at most `rows` rows.
    pub fn start(
        instance: &str,
        task: Arc<T>,
        mut state: T::Instance,
        rows: usize,
    ) -> Result<Self, BackendError> {
        // About one full batch waits here; the rest in Triton's queue.
        let worker = QueueWorker::start(format!("batch {instance}"), rows, move |queue| {
            loop {
                let mut taken = 0;
                let batch = queue.take(false, |_, more| {
                    let fits = taken == 0 || taken + more <= rows;
                    taken += more;
                    fits
                });
                let Some(batch) = batch else {
                    return;
                };
                execute_guarded(&*task, &mut state, batch);
            }
        })?;
        Ok(RequestBatcher { worker })
    }

    /// Queues a batch's requests (waits while a full batch is queued).
    pub fn submit(&self, batch: Vec<Pending<T::Request>>) {
        for pending in batch {
            let rows = T::rows(&pending.request);
            self.worker.submit(pending, rows);
        }
    }
}

/// Runs one batch, a panic logged: it drops the batch's responders, which answer with
/// an internal error.
pub fn execute_guarded<T: Task>(
    task: &T,
    state: &mut T::Instance,
    batch: Vec<Pending<T::Request>>,
) {
    let ran = catch_unwind(AssertUnwindSafe(|| task.execute(state, batch)));
    if let Err(panic) = ran {
        log_error!(
            "triton-rust: panic while running the model: {}",
            panic_message(&*panic)
        );
    }
}
