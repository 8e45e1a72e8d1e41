//! A closed-loop load: C workers each send a request, wait for its answer and send the
//! next, until N requests are sent or D seconds have passed. Latencies go to HDR
//! histograms, answers are counted per A/B arm.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use serde::Serialize;

use crate::client::{Client, InferRequest, describe};

/// The response parameter that names the arm of an A/B router.
pub const ARM_PARAMETER: &str = "ab_test_group";
/// Distinct error messages kept; later ones are counted under one entry.
const MAX_DISTINCT_ERRORS: usize = 20;
const OTHER_ERRORS: &str = "(other errors)";
/// Latencies are recorded in microseconds, up to an hour, to 3 significant digits.
const MAX_LATENCY_US: u64 = 3_600_000_000;

#[derive(Debug, Clone, Copy)]
pub enum Stop {
    AfterRequests(u64),
    After(Duration),
}

#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub concurrency: usize,
    pub stop: Stop,
    /// The longest wait for one answer.
    pub timeout: Duration,
}

/// What one worker saw.
struct Tally {
    latency: Histogram<u64>,
    first_response: Histogram<u64>,
    succeeded: u64,
    failed: u64,
    arms: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("the bounds are valid constants")
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

impl Tally {
    fn new() -> Self {
        Self {
            latency: histogram(),
            first_response: histogram(),
            succeeded: 0,
            failed: 0,
            arms: BTreeMap::new(),
            errors: BTreeMap::new(),
        }
    }

    fn error(&mut self, message: String, count: u64) {
        let key = if self.errors.len() < MAX_DISTINCT_ERRORS || self.errors.contains_key(&message) {
            message
        } else {
            OTHER_ERRORS.to_owned()
        };
        *self.errors.entry(key).or_default() += count;
    }

    fn merge(&mut self, other: Self) {
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.first_response.add(&other.first_response);
        self.succeeded += other.succeeded;
        self.failed += other.failed;
        for (arm, count) in other.arms {
            *self.arms.entry(arm).or_default() += count;
        }
        for (message, count) in other.errors {
            self.error(message, count);
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct LatencySummary {
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl LatencySummary {
    fn of(histogram: &Histogram<u64>) -> Option<Self> {
        let ms = |us: u64| us as f64 / 1000.0;
        (!histogram.is_empty()).then(|| Self {
            mean: histogram.mean() / 1000.0,
            p50: ms(histogram.value_at_quantile(0.50)),
            p95: ms(histogram.value_at_quantile(0.95)),
            p99: ms(histogram.value_at_quantile(0.99)),
            max: ms(histogram.max()),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub model: String,
    pub protocol: &'static str,
    pub concurrency: usize,
    pub requests: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub success_rate: f64,
    pub duration_s: f64,
    /// Successful requests per second.
    pub requests_per_s: f64,
    /// Send to last response, successful requests only.
    pub latency_ms: Option<LatencySummary>,
    /// Send to first response, for streams.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_response_ms: Option<LatencySummary>,
    /// Successful answers per A/B arm (routers only).
    pub arms: BTreeMap<String, u64>,
    /// Failures by message.
    pub errors: BTreeMap<String, u64>,
}

async fn worker(
    client: Client,
    request: Arc<InferRequest>,
    decoupled: bool,
    plan: Plan,
    tickets: Arc<AtomicU64>,
    deadline: Option<Instant>,
    progress: ProgressBar,
) -> Tally {
    let mut tally = Tally::new();
    loop {
        let more = match plan.stop {
            Stop::AfterRequests(total) => tickets.fetch_add(1, Ordering::Relaxed) < total,
            Stop::After(_) => deadline.is_some_and(|deadline| Instant::now() < deadline),
        };
        if !more {
            return tally;
        }
        let sent = Instant::now();
        match client.infer(&request, decoupled, plan.timeout).await {
            Ok(answer) => {
                tally.succeeded += 1;
                tally.latency.saturating_record(micros(sent.elapsed()));
                if let Some(first) = answer.first_response_after {
                    tally.first_response.saturating_record(micros(first));
                }
                if let Some(arm) = answer.parameters.get(ARM_PARAMETER) {
                    *tally.arms.entry(arm.clone()).or_default() += 1;
                }
            }
            Err(error) => {
                tally.failed += 1;
                tally.error(describe(&error), 1);
            }
        }
        progress.inc(1);
    }
}

/// Runs the plan and reports what happened.
pub async fn run(
    client: &Client,
    request: InferRequest,
    decoupled: bool,
    plan: Plan,
    progress: ProgressBar,
) -> LoadReport {
    let request = Arc::new(request);
    let tickets = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = match plan.stop {
        Stop::After(duration) => Some(started + duration),
        Stop::AfterRequests(_) => None,
    };
    let workers: Vec<_> = (0..plan.concurrency)
        .map(|_| {
            tokio::spawn(worker(
                client.clone(),
                Arc::clone(&request),
                decoupled,
                plan,
                Arc::clone(&tickets),
                deadline,
                progress.clone(),
            ))
        })
        .collect();
    let mut total = Tally::new();
    for handle in workers {
        match handle.await {
            Ok(tally) => total.merge(tally),
            Err(error) => total.error(format!("a load worker stopped: {error}"), 1),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    let requests = total.succeeded + total.failed;
    LoadReport {
        model: request.model.clone(),
        protocol: client.protocol(),
        concurrency: plan.concurrency,
        requests,
        succeeded: total.succeeded,
        failed: total.failed,
        success_rate: if requests == 0 {
            0.0
        } else {
            total.succeeded as f64 / requests as f64
        },
        duration_s: elapsed,
        requests_per_s: total.succeeded as f64 / elapsed.max(f64::EPSILON),
        latency_ms: LatencySummary::of(&total.latency),
        first_response_ms: LatencySummary::of(&total.first_response),
        arms: total.arms,
        errors: total.errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_merge_counts_arms_and_latencies() {
        let mut a = Tally::new();
        a.succeeded = 2;
        a.arms.insert("v1".into(), 2);
        a.latency.record(1_000).unwrap();
        a.latency.record(3_000).unwrap();
        let mut b = Tally::new();
        b.succeeded = 1;
        b.failed = 1;
        b.arms.insert("v2".into(), 1);
        b.latency.record(2_000).unwrap();
        b.error("boom".into(), 1);
        a.merge(b);
        assert_eq!((a.succeeded, a.failed), (3, 1));
        assert_eq!(a.arms, BTreeMap::from([("v1".into(), 2), ("v2".into(), 1)]));
        assert_eq!(a.errors, BTreeMap::from([("boom".into(), 1)]));
        let summary = LatencySummary::of(&a.latency).unwrap();
        assert!((summary.mean - 2.0).abs() < 0.01, "{summary:?}");
        assert!((summary.p50 - 2.0).abs() < 0.01, "{summary:?}");
        assert!((summary.max - 3.0).abs() < 0.01, "{summary:?}");
        assert!(LatencySummary::of(&a.first_response).is_none());
    }

    #[test]
    fn distinct_errors_are_capped() {
        let mut tally = Tally::new();
        for i in 0..MAX_DISTINCT_ERRORS + 5 {
            tally.error(format!("error {i}"), 1);
        }
        tally.error("error 0".into(), 1);
        assert_eq!(tally.errors.len(), MAX_DISTINCT_ERRORS + 1);
        assert_eq!(tally.errors[OTHER_ERRORS], 5);
        assert_eq!(tally.errors["error 0"], 2);
    }
}
