//! What an A/B router knows about its arms: the statistics comparing each challenger
//! with the champion (`ab_stats`), and metrics on Triton's own metrics endpoint
//! (`:8002/metrics`), one series per router and arm (labels `router`, `target`, `arm`,
//! `version`):
//!
//! | metric | kind | what |
//! |---|---|---|
//! | `triton_rust_ab_requests_total` | counter | requests forwarded to the arm |
//! | `triton_rust_ab_failures_total` | counter | of those, answered with an error (not counting cancellations) |
//! | `triton_rust_ab_request_duration_seconds` | histogram | from forwarding to the arm's final response |
//! | `triton_rust_ab_arm_weight_percent` | gauge | the arm's current share of the traffic |
//! | `triton_rust_ab_window_samples` | gauge | answered requests in the arm's statistics window |
//! | `triton_rust_ab_p_value` | gauge | challengers only, label `test` (`latency`, `errors`): always-valid p-value that the arm is worse than the champion |
//! | `triton_rust_ab_p_value_fixed_horizon` | gauge | the same tests' classic p-value at the latest look (not valid across looks) |
//! | `triton_rust_ab_canary_state` | gauge | canary routers only (labels `router`, `target`, `state`): 1 for the current state (`progressing`, `promoted`, `rolled_back`), 0 for the others |
//!
//! A router reloaded with the same arms continues the same counters (Triton counts the
//! metrics that share labels), so they survive a weight change; the statistics start
//! afresh with each load.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use crate::ab_stats::{ArmSamples, Comparison, Margins, Verdict};
use crate::canary::{Canary, CanaryState, arm_weights};
use crate::triton::{Error, Metric, MetricFamily, MetricKind};

/// How many answered requests (over all arms) between two looks at the statistics.
const LOOK_EVERY: usize = 50;
/// The mSPRT mixture's scale: standardized effects of about this size are found
/// fastest (see `ab_stats`).
const EFFECT_SIZE: f64 = 0.1;

/// Latency buckets, in seconds: from a tiny classifier's millisecond to a long
/// generation.
const DURATION_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// The families, registered once per process: Triton never removes a family from its
/// registry, so every router shares them.
struct Families {
    requests: Arc<MetricFamily>,
    failures: Arc<MetricFamily>,
    duration: Arc<MetricFamily>,
    weight: Arc<MetricFamily>,
    samples: Arc<MetricFamily>,
    p_value: Arc<MetricFamily>,
    p_value_fixed: Arc<MetricFamily>,
    canary_state: Arc<MetricFamily>,
}

fn families() -> Result<&'static Families, Error> {
    static FAMILIES: OnceLock<Result<Families, Error>> = OnceLock::new();
    FAMILIES
        .get_or_init(|| {
            Ok(Families {
                requests: MetricFamily::new(
                    MetricKind::Counter,
                    "triton_rust_ab_requests_total",
                    "Requests an A/B router forwarded to an arm",
                )?,
                failures: MetricFamily::new(
                    MetricKind::Counter,
                    "triton_rust_ab_failures_total",
                    "Requests an A/B router forwarded to an arm that ended with an error",
                )?,
                duration: MetricFamily::new(
                    MetricKind::Histogram,
                    "triton_rust_ab_request_duration_seconds",
                    "Time from forwarding a request to an arm to the arm's final response",
                )?,
                weight: MetricFamily::new(
                    MetricKind::Gauge,
                    "triton_rust_ab_arm_weight_percent",
                    "An arm's current share of an A/B router's traffic, in percent",
                )?,
                samples: MetricFamily::new(
                    MetricKind::Gauge,
                    "triton_rust_ab_window_samples",
                    "Answered requests in an arm's statistics window",
                )?,
                p_value: MetricFamily::new(
                    MetricKind::Gauge,
                    "triton_rust_ab_p_value",
                    "Always-valid p-value (mixture SPRT) that a challenger arm is worse than the champion",
                )?,
                canary_state: MetricFamily::new(
                    MetricKind::Gauge,
                    "triton_rust_ab_canary_state",
                    "1 for a canary router's current state, 0 for the others",
                )?,
                p_value_fixed: MetricFamily::new(
                    MetricKind::Gauge,
                    "triton_rust_ab_p_value_fixed_horizon",
                    "Fixed-horizon p-value at the latest look that a challenger arm is worse than the champion",
                )?,
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Which router and arm a series belongs to.
struct ArmLabels<'a> {
    router: &'a str,
    target: &'a str,
    arm: &'a str,
    version: i64,
}

/// One arm's series.
struct ArmMetrics {
    requests: Metric,
    failures: Metric,
    duration: Metric,
    samples: Metric,
    /// Challengers only: (latency, errors) × (always valid, fixed horizon).
    tests: Option<TestMetrics>,
    weight: Metric,
}

struct TestMetrics {
    latency: Metric,
    errors: Metric,
    latency_fixed: Metric,
    errors_fixed: Metric,
}

impl ArmMetrics {
    /// The arm's series, with its weight gauge set to `weight`; `challenger`: whether it
    /// is compared with the champion.
    fn new(labels: &ArmLabels<'_>, weight: u32, challenger: bool) -> Result<Self, Error> {
        let families = families()?;
        let version = labels.version.to_string();
        let labels = [
            ("router", labels.router),
            ("target", labels.target),
            ("arm", labels.arm),
            ("version", version.as_str()),
        ];
        let test = |family: &Arc<MetricFamily>, test: &str| {
            let mut with_test = labels.to_vec();
            with_test.push(("test", test));
            let metric = family.metric(&with_test)?;
            metric.set(1.0)?;
            Ok::<_, Error>(metric)
        };
        let tests = if challenger {
            Some(TestMetrics {
                latency: test(&families.p_value, "latency")?,
                errors: test(&families.p_value, "errors")?,
                latency_fixed: test(&families.p_value_fixed, "latency")?,
                errors_fixed: test(&families.p_value_fixed, "errors")?,
            })
        } else {
            None
        };
        let weight_gauge = families.weight.metric(&labels)?;
        weight_gauge.set(f64::from(weight))?;
        Ok(ArmMetrics {
            requests: families.requests.metric(&labels)?,
            failures: families.failures.metric(&labels)?,
            duration: families.duration.histogram(&labels, &DURATION_BUCKETS)?,
            samples: families.samples.metric(&labels)?,
            tests,
            weight: weight_gauge,
        })
    }

    fn show(&self, verdict: &Verdict) {
        report(self.samples.set(verdict.challenger_samples as f64));
        if let Some(tests) = &self.tests {
            report(tests.latency.set(verdict.latency_p));
            report(tests.errors.set(verdict.errors_p));
            report(tests.latency_fixed.set(verdict.latency_fixed_p));
            report(tests.errors_fixed.set(verdict.errors_fixed_p));
        }
    }
}

/// One arm of an experiment.
pub struct ArmSpec<'a> {
    pub name: &'a str,
    pub version: i64,
    pub weight: u32,
}

/// A router's arms: their series on Triton's metrics endpoint (`None` where Triton
/// would not make them: the router serves without) and their statistics, each
/// challenger compared with the champion, the first arm.
pub struct ArmStats {
    router: String,
    metrics: Vec<Option<ArmMetrics>>,
    margins: Margins,
    /// Canary routers: the challenger's current weight, read by every request.
    challenger_weight: Option<AtomicU32>,
    /// Canary routers: `triton_rust_ab_canary_state`, one series per state name.
    canary_states: Vec<(&'static str, Metric)>,
    state: Mutex<ArmStatsState>,
}

struct ArmStatsState {
    samples: Vec<ArmSamples>,
    /// Answers per arm since the load (the samples keep only a window).
    answered: Vec<usize>,
    /// One per arm; the champion's (index 0) is unused.
    comparisons: Vec<Comparison>,
    since_look: usize,
    canary: Option<Canary>,
}

impl ArmStats {
    /// `window`: answered requests kept per arm for the statistics; `margins`: the
    /// regressions a challenger is allowed; `canary`: the schedule of a canary router
    /// (two arms: the champion, then the challenger), which then sets the weights.
    pub fn new(
        router: &str,
        target: &str,
        arms: &[ArmSpec<'_>],
        window: usize,
        margins: Margins,
        canary: Option<Canary>,
    ) -> Self {
        let challenger_weight = canary.as_ref().map(Canary::challenger_weight);
        let metrics = arms
            .iter()
            .enumerate()
            .map(|(index, arm)| {
                let labels = ArmLabels {
                    router,
                    target,
                    arm: arm.name,
                    version: arm.version,
                };
                let weight = match challenger_weight {
                    Some(challenger) => arm_weights(challenger)[index.min(1)],
                    None => arm.weight,
                };
                ArmMetrics::new(&labels, weight, index > 0)
                    .map_err(|error| {
                        crate::log_warn!(
                            "triton-rust: router '{router}' serves arm {} without metrics: {error}",
                            arm.name
                        )
                    })
                    .ok()
            })
            .collect();
        let canary_states = match &canary {
            Some(canary) => {
                let states = canary_state_metrics(router, target);
                show_canary_state(&states, canary.state());
                states
            }
            None => Vec::new(),
        };
        ArmStats {
            router: router.to_owned(),
            metrics,
            margins,
            challenger_weight: challenger_weight.map(AtomicU32::new),
            canary_states,
            state: Mutex::new(ArmStatsState {
                samples: arms.iter().map(|_| ArmSamples::new(window)).collect(),
                answered: vec![0; arms.len()],
                comparisons: arms.iter().map(|_| Comparison::default()).collect(),
                since_look: 0,
                canary,
            }),
        }
    }

    /// Canary routers: the challenger's weight now.
    pub fn canary_weight(&self) -> Option<u32> {
        self.challenger_weight
            .as_ref()
            .map(|weight| weight.load(Ordering::Acquire))
    }

    /// A request was forwarded to arm `arm`.
    pub fn forwarded(&self, arm: usize) {
        if let Some(Some(metrics)) = self.metrics.get(arm) {
            report(metrics.requests.increment(1.0));
        }
    }

    /// A request could not be forwarded to arm `arm` at all.
    pub fn not_sent(&self, arm: usize) {
        if let Some(Some(metrics)) = self.metrics.get(arm) {
            report(metrics.failures.increment(1.0));
        }
    }

    /// Arm `arm` answered a request: its final response came `elapsed` after it was
    /// forwarded, with an error or not. Every [`LOOK_EVERY`] answers, the challengers
    /// are compared with the champion again.
    pub fn answered(&self, arm: usize, elapsed: Duration, failed: bool) {
        if let Some(Some(metrics)) = self.metrics.get(arm) {
            report(metrics.duration.observe(elapsed.as_secs_f64()));
            if failed {
                report(metrics.failures.increment(1.0));
            }
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let ArmStatsState {
            samples,
            answered,
            comparisons,
            since_look,
            canary,
        } = &mut *state;
        let (Some(arm_samples), Some(arm_answered)) = (samples.get_mut(arm), answered.get_mut(arm))
        else {
            return;
        };
        arm_samples.push(elapsed.as_secs_f64(), failed);
        *arm_answered += 1;
        *since_look += 1;
        if *since_look < LOOK_EVERY {
            return;
        }
        *since_look = 0;
        let Some((champion, challengers)) = samples.split_first() else {
            return;
        };
        if let Some(Some(metrics)) = self.metrics.first() {
            report(metrics.samples.set(champion.len() as f64));
        }
        for (index, challenger) in challengers.iter().enumerate() {
            let verdict =
                comparisons[index + 1].look(champion, challenger, EFFECT_SIZE, self.margins);
            if let Some(Some(metrics)) = self.metrics.get(index + 1) {
                metrics.show(&verdict);
            }
            if let (Some(canary), 0) = (canary.as_mut(), index) {
                let transition =
                    canary.decide(verdict.latency_p, verdict.errors_p, answered[index + 1]);
                if let Some(transition) = transition {
                    self.apply(canary, &transition.to_string());
                }
            }
        }
    }

    /// Puts a canary's new state into effect: weights, metrics, log.
    fn apply(&self, canary: &Canary, transition: &str) {
        let weight = canary.challenger_weight();
        if let Some(challenger_weight) = &self.challenger_weight {
            challenger_weight.store(weight, Ordering::Release);
        }
        for (metrics, arm_weight) in self.metrics.iter().zip(arm_weights(weight)) {
            if let Some(metrics) = metrics {
                report(metrics.weight.set(f64::from(arm_weight)));
            }
        }
        show_canary_state(&self.canary_states, canary.state());
        crate::log_info!("triton-rust: canary '{}': {transition}", self.router);
    }
}

/// A canary router's state series, one per state name.
fn canary_state_metrics(router: &str, target: &str) -> Vec<(&'static str, Metric)> {
    let Ok(families) = families() else {
        return Vec::new();
    };
    CanaryState::NAMES
        .iter()
        .filter_map(|&name| {
            let labels = [("router", router), ("target", target), ("state", name)];
            Some((name, families.canary_state.metric(&labels).ok()?))
        })
        .collect()
}

/// Sets the series of `state` to 1 and the others to 0.
fn show_canary_state(states: &[(&'static str, Metric)], state: CanaryState) {
    for (name, metric) in states {
        report(metric.set(if *name == state.name() { 1.0 } else { 0.0 }));
    }
}

/// A metric that cannot be updated is logged, never a failed request.
fn report(result: Result<(), Error>) {
    if let Err(error) = result {
        crate::log_error!("triton-rust: cannot update an A/B metric: {error}");
    }
}
