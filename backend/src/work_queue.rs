//! The queue between `execute` and worker threads, for tasks that run requests after
//! `execute` returns: generation's decode loop (one queue per instance), and encoders
//! that batch requests of several executions (one queue per model version, shared by
//! its instances, so a request waits only until the first worker is free). It holds at
//! most about one full batch: past that, `submit` waits, so further requests stay in
//! Triton's queue, where priorities and queue limits apply.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::error::BackendError;

struct Waiting<R> {
    /// Each item with its rows.
    items: VecDeque<(R, usize)>,
    rows: usize,
    /// Workers taking from the queue that have not been told to leave.
    workers: usize,
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
                workers: 0,
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
    /// goes in) and a worker is there to empty it.
    pub fn submit(&self, item: R, rows: usize) {
        let mut waiting = self.lock();
        while waiting.rows > 0 && waiting.rows + rows > self.capacity && waiting.workers > 0 {
            waiting = self.wait(waiting);
        }
        waiting.rows += rows;
        waiting.items.push_back((item, rows));
        self.changed.notify_all();
    }

    /// The items at the front that `admit` accepts (it sees each item and its rows, in
    /// order, and the first refusal ends the take: no item overtakes another). Unless
    /// `busy`, waits for an item first; `None` once the worker is `leaving`, the queue
    /// is empty and the worker is not busy.
    fn take(
        &self,
        busy: bool,
        leaving: &AtomicBool,
        admit: impl FnMut(&R, usize) -> bool,
    ) -> Option<Vec<R>> {
        self.take_with(busy, leaving, |_| admit)
    }

    /// The items at the front, at most `max_rows` rows (at least one item) and at most a
    /// fair share of what is queued: its rows divided among the queue's workers, rounded
    /// up. A worker free while the others are busy then leaves the rest to the next one
    /// free instead of running everything in one long batch. Waits as `take` does.
    fn take_share(&self, leaving: &AtomicBool, max_rows: usize) -> Option<Vec<R>> {
        self.take_with(false, leaving, |waiting| {
            let share = waiting.rows.div_ceil(waiting.workers.max(1)).min(max_rows);
            let mut taken = 0;
            move |_, rows| {
                let fits = taken == 0 || taken + rows <= share;
                taken += rows;
                fits
            }
        })
    }

    /// `take`, with the admitting function made from the queue as the take finds it.
    fn take_with<A: FnMut(&R, usize) -> bool>(
        &self,
        busy: bool,
        leaving: &AtomicBool,
        admit_for: impl FnOnce(&Waiting<R>) -> A,
    ) -> Option<Vec<R>> {
        let mut waiting = self.lock();
        while !busy && waiting.items.is_empty() && !leaving.load(Ordering::Relaxed) {
            waiting = self.wait(waiting);
        }
        if !busy && waiting.items.is_empty() {
            return None;
        }
        let mut admit = admit_for(&waiting);
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

    /// One more worker takes from the queue.
    fn arrive(&self) {
        self.lock().workers += 1;
    }

    /// Tells the worker whose flag is `leaving` to stop waiting for items.
    fn leave(&self, leaving: &AtomicBool) {
        let mut waiting = self.lock();
        if !leaving.swap(true, Ordering::Relaxed) {
            waiting.workers = waiting.workers.saturating_sub(1);
        }
        self.changed.notify_all();
    }
}

/// A worker thread's side of its queue.
pub struct Intake<R> {
    queue: Arc<WorkQueue<R>>,
    leaving: Arc<AtomicBool>,
}

impl<R> Intake<R> {
    /// See [`WorkQueue::take`]: `None` once the worker is told to leave, the queue is
    /// empty and the worker is not `busy`.
    pub fn take(&self, busy: bool, admit: impl FnMut(&R, usize) -> bool) -> Option<Vec<R>> {
        self.queue.take(busy, &self.leaving, admit)
    }

    /// See [`WorkQueue::take_share`].
    pub fn take_share(&self, max_rows: usize) -> Option<Vec<R>> {
        self.queue.take_share(&self.leaving, max_rows)
    }
}

/// A thread that takes its work from a [`WorkQueue`], alone or beside other workers.
/// Dropping it tells the thread to leave, lets it finish what it holds and what is
/// queued, then joins it.
pub struct QueueWorker<R> {
    queue: Arc<WorkQueue<R>>,
    leaving: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl<R: Send + 'static> QueueWorker<R> {
    /// Starts thread `name` running `work` on a queue of `capacity` rows of its own.
    pub fn start(
        name: String,
        capacity: usize,
        work: impl FnOnce(&Intake<R>) + Send + 'static,
    ) -> Result<Self, BackendError> {
        Self::join(name, Arc::new(WorkQueue::new(capacity)), work)
    }

    /// Starts thread `name` running `work` on `queue`, beside its other workers.
    pub fn join(
        name: String,
        queue: Arc<WorkQueue<R>>,
        work: impl FnOnce(&Intake<R>) + Send + 'static,
    ) -> Result<Self, BackendError> {
        let leaving = Arc::new(AtomicBool::new(false));
        let intake = Intake {
            queue: Arc::clone(&queue),
            leaving: Arc::clone(&leaving),
        };
        queue.arrive();
        let spawned = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || work(&intake));
        match spawned {
            Ok(thread) => Ok(QueueWorker {
                queue,
                leaving,
                thread: Some(thread),
            }),
            Err(e) => {
                queue.leave(&leaving);
                Err(BackendError::internal(format!(
                    "cannot start thread '{name}': {e}"
                )))
            }
        }
    }

    /// Queues `item` of `rows` rows (see [`WorkQueue::submit`]).
    pub fn submit(&self, item: R, rows: usize) {
        self.queue.submit(item, rows);
    }
}

impl<R> Drop for QueueWorker<R> {
    fn drop(&mut self) {
        self.queue.leave(&self.leaving);
        if let Some(thread) = self.thread.take() {
            let _finished = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn takes_in_order_until_the_first_refusal() {
        let queue = WorkQueue::new(10);
        let leaving = AtomicBool::new(false);
        queue.arrive();
        for (item, rows) in [("a", 2), ("b", 5), ("c", 1)] {
            queue.submit(item, rows);
        }
        let mut room = 6;
        let taken = queue.take(false, &leaving, |_, rows| {
            let fits = rows <= room;
            room = room.saturating_sub(rows);
            fits
        });
        assert_eq!(
            taken,
            Some(vec!["a"]),
            "'b' does not fit, and 'c' may not overtake it"
        );
        assert_eq!(
            queue.take(true, &leaving, |_, _| true),
            Some(vec!["b", "c"])
        );
        assert_eq!(
            queue.take(true, &leaving, |_, _| true),
            Some(vec![]),
            "busy: no wait"
        );
        queue.leave(&leaving);
        assert_eq!(queue.take(false, &leaving, |_, _| true), None);
    }

    #[test]
    fn a_worker_takes_its_share_of_what_is_queued() {
        let queue = WorkQueue::new(64);
        let leaving = AtomicBool::new(false);
        queue.arrive();
        queue.arrive();
        for item in 0..7 {
            queue.submit(item, 1);
        }
        // Two workers: 7 rows queued, 4 for the one that takes first.
        assert_eq!(queue.take_share(&leaving, 64), Some(vec![0, 1, 2, 3]));
        assert_eq!(queue.take_share(&leaving, 64), Some(vec![4, 5]));
        // At most max_rows, and an item larger than the share still goes alone.
        queue.submit(7, 1);
        queue.submit(8, 9);
        assert_eq!(queue.take_share(&leaving, 1), Some(vec![6]));
        assert_eq!(queue.take_share(&leaving, 64), Some(vec![7]));
        assert_eq!(queue.take_share(&leaving, 64), Some(vec![8]));
        queue.leave(&leaving);
        assert_eq!(queue.take_share(&leaving, 64), None);
    }

    #[test]
    fn submit_waits_for_room_until_taken() {
        let queue = Arc::new(WorkQueue::new(3));
        let leaving = AtomicBool::new(false);
        queue.arrive();
        queue.submit(1, 3);
        let producer = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || queue.submit(2, 1))
        };
        // The second item waits for the first to be taken.
        assert_eq!(queue.take(false, &leaving, |_, _| true), Some(vec![1]));
        producer.join().expect("the producer finishes");
        assert_eq!(queue.take(false, &leaving, |_, _| true), Some(vec![2]));
    }

    #[test]
    fn workers_of_one_queue_leave_one_by_one() {
        let queue = Arc::new(WorkQueue::new(1));
        let (done, finished) = mpsc::channel();
        let start = |name: &str| {
            let done = done.clone();
            let name = name.to_string();
            QueueWorker::join(name.clone(), Arc::clone(&queue), move |intake| {
                while let Some(items) = intake.take(false, |_, _| true) {
                    for item in items {
                        done.send((name.clone(), item)).expect("the test listens");
                    }
                }
            })
            .expect("the worker starts")
        };
        let first = start("first");
        let second = start("second");
        drop(first);
        // The second worker still takes what is queued.
        second.submit(7, 1);
        assert_eq!(
            finished.recv().expect("an item is done"),
            ("second".to_string(), 7)
        );
        drop(second);
        // No worker left: a full queue no longer holds `submit` back.
        queue.submit(8, 1);
        queue.submit(9, 1);
    }
}
