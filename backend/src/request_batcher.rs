//! Batching across executions, for models Triton does not batch (`max_batch_size: 0`,
//! so the classic one-text payload keeps its shape): `execute` queues each request for
//! the instance's own thread and returns, and the thread runs all the requests that
//! queued while it was busy as one batch ([`Task::batch_across_executions`]).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::error::{BackendError, panic_message};
use crate::log_error;
use crate::responder::Pending;
use crate::tasks::Task;
use crate::work_queue::WorkQueue;

/// An instance's thread and its queue; dropping it lets the thread finish what is
/// queued, then joins it.
pub struct RequestBatcher<T: Task> {
    queue: Arc<WorkQueue<Pending<T::Request>>>,
    thread: Option<JoinHandle<()>>,
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
        let queue = Arc::new(WorkQueue::new(rows));
        let waiting = Arc::clone(&queue);
        let thread = std::thread::Builder::new()
            .name(format!("batch {instance}"))
            .spawn(move || {
                loop {
                    let mut taken = 0;
                    let batch = waiting.take(false, |_, more| {
                        let fits = taken == 0 || taken + more <= rows;
                        taken += more;
                        fits
                    });
                    let Some(batch) = batch else {
                        return;
                    };
                    // A panic drops the batch's responders, which answer with an
                    // internal error.
                    let ran = catch_unwind(AssertUnwindSafe(|| task.execute(&mut state, batch)));
                    if let Err(panic) = ran {
                        log_error!(
                            "triton-rust: panic while running the model: {}",
                            panic_message(&*panic)
                        );
                    }
                }
            })
            .map_err(|e| BackendError::internal(format!("cannot start the batch thread: {e}")))?;
        Ok(RequestBatcher {
            queue,
            thread: Some(thread),
        })
    }

    /// Queues a batch's requests (waits while a full batch is queued).
    pub fn submit(&self, batch: Vec<Pending<T::Request>>) {
        for pending in batch {
            let rows = T::rows(&pending.request);
            self.queue.submit(pending, rows);
        }
    }
}

impl<T: Task> Drop for RequestBatcher<T> {
    fn drop(&mut self) {
        self.queue.close();
        if let Some(thread) = self.thread.take() {
            let _finished = thread.join();
        }
    }
}
