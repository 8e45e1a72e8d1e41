//! Batching across executions, for models Triton does not batch (`max_batch_size: 0`,
//! so the classic one-text payload keeps its shape): `execute` queues each request in
//! the model version's queue and returns; each instance has a thread that takes its
//! share of the requests that queued while it was busy and runs them as one batch
//! ([`Task::batch_across_executions`]). The instances share the queue, so a request
//! waits for the first instance to be free, not for the one Triton gave it to.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crate::error::{BackendError, panic_message};
use crate::log_error;
use crate::responder::Pending;
use crate::tasks::Task;
use crate::work_queue::{QueueWorker, WorkQueue};

/// The queue a model version's instances share.
pub type SharedQueue<T> = Arc<WorkQueue<Pending<<T as Task>::Request>>>;

/// The queue for batches of at most `rows` rows. About one full batch waits there; the
/// rest in Triton's queue.
pub fn shared_queue<T: Task>(rows: usize) -> SharedQueue<T> {
    Arc::new(WorkQueue::new(rows))
}

/// An instance's thread on the shared queue; dropping it lets the thread finish what
/// it runs and what is queued, then joins it.
pub struct RequestBatcher<T: Task> {
    worker: QueueWorker<Pending<T::Request>>,
}

impl<T: Task> RequestBatcher<T> {
    /// Starts the thread named after `instance`, which owns the instance's state from
    /// now on and runs batches of at most `rows` rows (and at most its share of what is
    /// queued, see `WorkQueue::take_share`) taken from `queue`.
    pub fn start(
        instance: &str,
        task: Arc<T>,
        mut state: T::Instance,
        queue: SharedQueue<T>,
        rows: usize,
    ) -> Result<Self, BackendError> {
        let worker = QueueWorker::join(format!("batch {instance}"), queue, move |queue| {
            while let Some(batch) = queue.take_share(rows) {
                execute_guarded(&*task, &mut state, batch);
            }
        })?;
        Ok(RequestBatcher { worker })
    }

    /// Queues a batch's requests for the first free instance (waits while a full batch
    /// is queued).
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
