//! The queue between `execute` and an instance's own worker thread, for tasks that run
//! requests after `execute` returns (generation's decode loop, encoders that batch
//! requests of several executions). It holds at most about one full batch: past that,
//! `submit` waits, so further requests stay in Triton's queue, where priorities and
//! queue limits apply.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::error::BackendError;

struct Waiting<R> {
    /// Each item with its rows.
    items: VecDeque<(R, usize)>,
    rows: usize,
    closed: bool,
}

pub struct WorkQueue<R> {
    waiting: Mutex<Waiting<R>>,
    changed: Condvar,
    /// Rows the queue holds before `submit` waits.
    capacity: usize,
}

impl<R> WorkQueue<R> {
    pub fn new(capacity: usize) -> Self {
        WorkQueue {
            waiting: Mutex::new(Waiting {
                items: VecDeque::new(),
                rows: 0,
                closed: false,
            }),
            changed: Condvar::new(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Waiting<R>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'q>(&self, waiting: MutexGuard<'q, Waiting<R>>) -> MutexGuard<'q, Waiting<R>> {
        self.changed
            .wait(waiting)
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `item` of `rows` rows; waits while the queue is full (an item alone always
    /// goes in).
    pub fn submit(&self, item: R, rows: usize) {
        let mut waiting = self.lock();
        while waiting.rows > 0 && waiting.rows + rows > self.capacity && !waiting.closed {
            waiting = self.wait(waiting);
        }
        waiting.rows += rows;
        waiting.items.push_back((item, rows));
        self.changed.notify_all();
    }

    /// The items at the front that `admit` accepts (it sees each item and its rows, in
    /// order, and the first refusal ends the take: no item overtakes another). Unless
    /// `busy`, waits for an item first; `None` once the queue is closed and empty and
    /// the caller is not busy.
    pub fn take(&self, busy: bool, mut admit: impl FnMut(&R, usize) -> bool) -> Option<Vec<R>> {
        let mut waiting = self.lock();
        while !busy && waiting.items.is_empty() && !waiting.closed {
            waiting = self.wait(waiting);
        }
        if !busy && waiting.items.is_empty() {
            return None;
        }
        let mut taken = Vec::new();
        while let Some((item, rows)) = waiting.items.front() {
            if !admit(item, *rows) {
                break;
            }
            let rows = *rows;
            waiting.rows -= rows;
            taken.extend(waiting.items.pop_front().map(|(item, _)| item));
        }
        if !taken.is_empty() {
            self.changed.notify_all();
        }
        Some(taken)
    }

    /// No more waiting: `take` returns `None` once the queue is empty, and `submit`
    /// stops waiting for room.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }
}

/// A thread that takes its work from a [`WorkQueue`] of its own. Dropping it closes the
/// queue, lets the thread finish what is queued, then joins it.
pub struct QueueWorker<R> {
    queue: Arc<WorkQueue<R>>,
    thread: Option<JoinHandle<()>>,
}

impl<R: Send + 'static> QueueWorker<R> {
    /// Starts thread `name` running `work` on a queue of `capacity` rows.
    pub fn start(
        name: String,
        capacity: usize,
        work: impl FnOnce(&WorkQueue<R>) + Send + 'static,
    ) -> Result<Self, BackendError> {
        let queue = Arc::new(WorkQueue::new(capacity));
        let waiting = Arc::clone(&queue);
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || work(&waiting))
            .map_err(|e| BackendError::internal(format!("cannot start thread '{name}': {e}")))?;
        Ok(QueueWorker {
            queue,
            thread: Some(thread),
        })
    }

    /// Queues `item` of `rows` rows (see [`WorkQueue::submit`]).
    pub fn submit(&self, item: R, rows: usize) {
        self.queue.submit(item, rows);
    }
}

impl<R> Drop for QueueWorker<R> {
    fn drop(&mut self) {
        self.queue.close();
        if let Some(thread) = self.thread.take() {
            let _finished = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn takes_in_order_until_the_first_refusal() {
        let queue = WorkQueue::new(10);
        for (item, rows) in [("a", 2), ("b", 5), ("c", 1)] {
            queue.submit(item, rows);
        }
        let mut room = 6;
        let taken = queue.take(false, |_, rows| {
            let fits = rows <= room;
            room = room.saturating_sub(rows);
            fits
        });
        assert_eq!(
            taken,
            Some(vec!["a"]),
            "'b' does not fit, and 'c' may not overtake it"
        );
        assert_eq!(queue.take(true, |_, _| true), Some(vec!["b", "c"]));
        assert_eq!(queue.take(true, |_, _| true), Some(vec![]), "busy: no wait");
        queue.close();
        assert_eq!(queue.take(false, |_, _| true), None);
    }

    #[test]
    fn submit_waits_for_room_until_taken() {
        let queue = Arc::new(WorkQueue::new(3));
        queue.submit(1, 3);
        let producer = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || queue.submit(2, 1))
        };
        // The second item waits for the first to be taken.
        assert_eq!(queue.take(false, |_, _| true), Some(vec![1]));
        producer.join().expect("the producer finishes");
        assert_eq!(queue.take(false, |_, _| true), Some(vec![2]));
    }
}
