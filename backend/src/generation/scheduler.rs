//! The thread that runs one instance's decoder. `execute` queues requests and returns;
//! between steps the thread lets queued requests join the running batch as far as the
//! limits allow, and answers them through their responders.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use ort::session::Session;

use super::batch::RunningBatch;
use super::decoder::DecoderBinding;
use super::delivery::Outbox;
use super::{GenerationObserver, GenerationRequest, Generator};
use crate::error::{BackendError, panic_message};
use crate::responder::Pending;
use crate::work_queue::{Intake, QueueWorker};

/// How much one instance runs at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Sequences (prompts) in the running batch.
    pub max_sequences: usize,
    /// Cache positions the running batch may hold: sequences × the most tokens the
    /// longest of them may reach (every row is padded to the longest).
    pub max_tokens: usize,
}

impl BatchLimits {
    /// Whether `rows` more sequences that may reach `reach` tokens fit beside `running`
    /// sequences that may reach `longest`.
    pub fn admit(&self, running: usize, longest: usize, rows: usize, reach: usize) -> bool {
        let sequences = running + rows;
        sequences <= self.max_sequences
            && sequences.saturating_mul(longest.max(reach)) <= self.max_tokens
    }
}

/// One instance's decode thread and its queue; dropping it lets the thread finish
/// what it holds, then joins it.
pub struct DecodeLoop {
    worker: QueueWorker<Pending<GenerationRequest>>,
}

impl DecodeLoop {
    /// Starts the thread named after `instance`, which owns the decoder from now on.
    pub fn start(
        instance: &str,
        generator: Arc<Generator>,
        mut session: Session,
        mut binding: DecoderBinding,
        metrics: Option<Arc<dyn GenerationObserver>>,
    ) -> Result<Self, BackendError> {
        let outbox = Outbox::threaded(instance)?;
        // About one full batch waits here; the rest in Triton's queue.
        let capacity = generator.limits().max_sequences;
        let worker = QueueWorker::start(format!("decode {instance}"), capacity, move |queue| {
            run(
                &generator,
                &mut session,
                &mut binding,
                queue,
                outbox,
                metrics.as_deref(),
            )
        })?;
        Ok(DecodeLoop { worker })
    }

    /// Queues requests for the decode thread (waits while a full batch is queued).
    pub fn submit(&self, batch: Vec<Pending<GenerationRequest>>) {
        for pending in batch {
            let rows = pending.request.rows();
            self.worker.submit(pending, rows);
        }
    }
}

/// The decode thread: admits what fits, steps the batch, until closed and empty.
fn run(
    generator: &Generator,
    session: &mut Session,
    binding: &mut DecoderBinding,
    queue: &Intake<Pending<GenerationRequest>>,
    outbox: Outbox,
    metrics: Option<&dyn GenerationObserver>,
) {
    let limits = generator.limits();
    let mut batch = RunningBatch::new(generator, outbox, metrics);
    loop {
        let (mut rows, mut longest) = (batch.rows(), batch.longest_reach());
        // First come, first served: a request that does not fit yet holds the ones
        // behind it (no starvation).
        let admitted = queue.take(!batch.is_empty(), |pending, more| {
            let reach = generator.request_reach(&pending.request);
            let fits = rows == 0 || limits.admit(rows, longest, more, reach);
            if fits {
                rows += more;
                longest = longest.max(reach);
            }
            fits
        });
        let Some(admitted) = admitted else {
            return;
        };
        let stepped = catch_unwind(AssertUnwindSafe(|| {
            batch.admit(session, binding, admitted);
            batch.step(session, binding);
        }));
        if let Err(panic) = stepped {
            batch.fail_all(&BackendError::internal(format!(
                "panic while generating: {}",
                panic_message(&*panic)
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_bound_sequences_and_the_padded_cache() {
        let limits = BatchLimits {
            max_sequences: 4,
            max_tokens: 400,
        };
        assert!(limits.admit(0, 0, 4, 100));
        assert!(!limits.admit(0, 0, 5, 10), "five sequences");
        assert!(limits.admit(2, 100, 2, 50));
        // Four rows padded to the longest newcomer's 120 tokens: 480 positions.
        assert!(!limits.admit(2, 50, 2, 120));
        assert!(
            !limits.admit(1, 500, 1, 10),
            "the running row alone is past it"
        );
    }
}
