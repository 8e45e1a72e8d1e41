//! Is a challenger arm worse than the champion? Two one-sided tests on the arms' recent
//! requests, latency (Mann-Whitney U) and failures (two proportions), each looked at
//! again and again as traffic flows.
//!
//! A p-value recomputed at every look and compared with 0.05 would raise false alarms
//! far more often than 5 % of the time (the test `naive_looks_inflate_false_alarms`
//! shows it). The decision p-values here are *always valid* instead: a mixture
//! sequential probability ratio test (mSPRT; Johari, Pekelis & Walsh, "Always valid
//! inference", 2017) over each test's z statistic, whose running minimum of
//! `1 / likelihood ratio` stays below α with probability at most α however often it is
//! looked at. We chose it over alpha spending because it needs no planned number of
//! looks or maximum sample size: a router looks whenever requests come. The classic
//! fixed-horizon p-values are kept beside it for dashboards.
//!
//! "Worse" means worse by more than an allowed regression ([`Margins`]): two versions
//! of a model on real machines always differ a little (cache, core placement), and
//! with enough requests any difference becomes significant. The tests are
//! non-inferiority tests: latencies divided by `1 + latency` before they are ranked,
//! error rates compared with the champion's plus `error_rate`. Both tests take the
//! requests as independent; requests queueing behind each other on a saturated
//! instance are not, and their p-values come out too small.

use std::collections::VecDeque;

use statrs::distribution::{ContinuousCDF, Normal};

/// The last `capacity` answered requests of one arm: latency (seconds) and whether
/// it failed.
#[derive(Debug, Clone)]
pub struct ArmSamples {
    latencies: VecDeque<f64>,
    failures: VecDeque<bool>,
    failed: usize,
    capacity: usize,
}

impl ArmSamples {
    pub fn new(capacity: usize) -> Self {
        ArmSamples {
            latencies: VecDeque::with_capacity(capacity.min(1 << 16)),
            failures: VecDeque::with_capacity(capacity.min(1 << 16)),
            failed: 0,
            capacity: capacity.max(1),
        }
    }

    pub fn push(&mut self, latency_s: f64, failed: bool) {
        if self.latencies.len() == self.capacity {
            self.latencies.pop_front();
            if self.failures.pop_front() == Some(true) {
                self.failed -= 1;
            }
        }
        self.latencies.push_back(latency_s);
        self.failures.push_back(failed);
        self.failed += usize::from(failed);
    }

    pub fn len(&self) -> usize {
        self.latencies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.latencies.is_empty()
    }
}

/// Mann-Whitney U as a z statistic, positive when `b`'s values tend to be larger than
/// `a`'s (normal approximation with the tie correction); `None` without two samples on
/// each side or with every value tied.
pub fn mann_whitney_z(a: &[f64], b: &[f64]) -> Option<f64> {
    let (n_a, n_b) = (a.len() as f64, b.len() as f64);
    if a.len() < 2 || b.len() < 2 {
        return None;
    }
    let mut all: Vec<(f64, bool)> = a
        .iter()
        .map(|&v| (v, false))
        .chain(b.iter().map(|&v| (v, true)))
        .collect();
    all.sort_by(|x, y| x.0.total_cmp(&y.0));
    let n = all.len() as f64;
    let (mut rank_sum_b, mut ties) = (0.0, 0.0);
    let mut start = 0;
    while start < all.len() {
        let mut end = start + 1;
        while end < all.len() && all[end].0 == all[start].0 {
            end += 1;
        }
        // Ranks start + 1 ..= end share their average.
        let rank = (start + 1 + end) as f64 / 2.0;
        let in_b = all[start..end].iter().filter(|(_, from_b)| *from_b).count() as f64;
        rank_sum_b += rank * in_b;
        let t = (end - start) as f64;
        ties += t * t * t - t;
        start = end;
    }
    let u_b = rank_sum_b - n_b * (n_b + 1.0) / 2.0;
    let variance = n_a * n_b / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    (variance > 0.0).then(|| (u_b - n_a * n_b / 2.0) / variance.sqrt())
}

/// The two-proportion z statistic (unpooled standard error), positive when `b`'s
/// failure rate exceeds `a`'s by more than `margin`; `None` when either side is empty
/// or neither has a failure rate strictly between 0 and 1.
pub fn two_proportion_z(
    failed_a: usize,
    n_a: usize,
    failed_b: usize,
    n_b: usize,
    margin: f64,
) -> Option<f64> {
    if n_a == 0 || n_b == 0 {
        return None;
    }
    let (p_a, p_b) = (failed_a as f64 / n_a as f64, failed_b as f64 / n_b as f64);
    let variance = p_a * (1.0 - p_a) / n_a as f64 + p_b * (1.0 - p_b) / n_b as f64;
    (variance > 0.0).then(|| (p_b - p_a - margin) / variance.sqrt())
}

/// The regressions a challenger is allowed before it counts as worse.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Margins {
    /// Relative latency: 0.2 lets the challenger be 20 % slower.
    pub latency: f64,
    /// Absolute failure rate: 0.01 lets it fail on one more request in a hundred.
    pub error_rate: f64,
}

impl Margins {
    /// No allowance: any difference counts.
    pub const NONE: Margins = Margins {
        latency: 0.0,
        error_rate: 0.0,
    };
}

/// The one-sided fixed-horizon p-value of a z statistic: valid for one look only.
pub fn fixed_p_value(z: f64) -> f64 {
    // The standard normal always exists.
    Normal::standard().sf(z)
}

/// The mSPRT likelihood ratio of a two-sample z statistic, mixing the standardized
/// effect over N(0, `effect`²): with ρ = effect² · n_a·n_b / (n_a + n_b),
/// Λ = (1 + ρ)^-½ · exp(ρ z² / (2 (1 + ρ))).
pub fn msprt_ratio(z: f64, n_a: usize, n_b: usize, effect: f64) -> f64 {
    let (n_a, n_b) = (n_a as f64, n_b as f64);
    let rho = effect * effect * n_a * n_b / (n_a + n_b);
    (1.0 + rho).powf(-0.5) * (rho * z * z / (2.0 * (1.0 + rho))).exp()
}

/// One always-valid p-value, updated at every look.
#[derive(Debug, Clone)]
pub struct SequentialTest {
    p_value: f64,
}

impl Default for SequentialTest {
    fn default() -> Self {
        SequentialTest { p_value: 1.0 }
    }
}

impl SequentialTest {
    /// Takes one look at the z statistic of `n_a` and `n_b` samples; only evidence
    /// that the challenger is worse (z > 0) lowers the p-value.
    pub fn look(&mut self, z: Option<f64>, n_a: usize, n_b: usize, effect: f64) -> f64 {
        if let Some(z) = z.filter(|z| *z > 0.0) {
            let ratio = msprt_ratio(z, n_a, n_b, effect);
            self.p_value = self.p_value.min(1.0 / ratio).min(1.0);
        }
        self.p_value
    }

    pub fn p_value(&self) -> f64 {
        self.p_value
    }
}

/// What one look says about a challenger against the champion.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// Always-valid p-values: the challenger is slower / fails more.
    pub latency_p: f64,
    pub errors_p: f64,
    /// Fixed-horizon p-values of this look alone (`1.0` where a test cannot say).
    pub latency_fixed_p: f64,
    pub errors_fixed_p: f64,
    pub champion_samples: usize,
    pub challenger_samples: usize,
}

/// The running comparison of one challenger with the champion.
#[derive(Debug, Clone, Default)]
pub struct Comparison {
    latency: SequentialTest,
    errors: SequentialTest,
}

impl Comparison {
    /// Looks at the arms' current samples.
    pub fn look(
        &mut self,
        champion: &ArmSamples,
        challenger: &ArmSamples,
        effect: f64,
        margins: Margins,
    ) -> Verdict {
        let (n_a, n_b) = (champion.len(), challenger.len());
        let scale = 1.0 / (1.0 + margins.latency);
        let a: Vec<f64> = champion.latencies.iter().copied().collect();
        let b: Vec<f64> = challenger.latencies.iter().map(|l| l * scale).collect();
        let latency_z = mann_whitney_z(&a, &b);
        let errors_z = two_proportion_z(
            champion.failed,
            n_a,
            challenger.failed,
            n_b,
            margins.error_rate,
        );
        Verdict {
            latency_p: self.latency.look(latency_z, n_a, n_b, effect),
            errors_p: self.errors.look(errors_z, n_a, n_b, effect),
            latency_fixed_p: latency_z.map_or(1.0, fixed_p_value),
            errors_fixed_p: errors_z.map_or(1.0, fixed_p_value),
            champion_samples: n_a,
            challenger_samples: n_b,
        }
    }
}

#[cfg(test)]
mod tests {
    use rand_chacha::ChaCha8Rng;
    use rand_chacha::rand_core::{RngCore, SeedableRng};

    use super::*;

    /// A uniform draw in (0, 1).
    fn uniform(rng: &mut ChaCha8Rng) -> f64 {
        ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// An exponential latency with mean `mean` (inverse transform).
    fn latency(rng: &mut ChaCha8Rng, mean: f64) -> f64 {
        -mean * uniform(rng).ln()
    }

    #[test]
    fn mann_whitney_matches_a_worked_example() {
        // b = [4, 5, 6] above a = [1, 2, 3]: U_b = 9, mean 4.5, variance 5.25.
        let z = mann_whitney_z(&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]).expect("defined");
        assert!((z - 4.5 / 5.25f64.sqrt()).abs() < 1e-12, "{z}");
        let reversed = mann_whitney_z(&[4.0, 5.0, 6.0], &[1.0, 2.0, 3.0]).expect("defined");
        assert!((z + reversed).abs() < 1e-12);
        // Ties share ranks: a = [1, 2, 2], b = [2, 3, 3]: ranks 1, 3, 3, 3 | 5.5, 5.5.
        let z = mann_whitney_z(&[1.0, 2.0, 2.0], &[2.0, 3.0, 3.0]).expect("defined");
        let u_b = (3.0 + 5.5 + 5.5) - 6.0;
        let variance = 9.0 / 12.0 * (7.0 - ((27.0 - 3.0) + (8.0 - 2.0)) / 30.0);
        assert!((z - (u_b - 4.5) / f64::sqrt(variance)).abs() < 1e-12, "{z}");
        assert_eq!(mann_whitney_z(&[1.0, 1.0], &[1.0, 1.0]), None);
        assert_eq!(mann_whitney_z(&[1.0], &[2.0, 3.0]), None);
    }

    #[test]
    fn two_proportions_match_a_worked_example() {
        // 10/100 against 20/100: standard error sqrt(0.1·0.9/100 + 0.2·0.8/100) = 0.05.
        let z = two_proportion_z(10, 100, 20, 100, 0.0).expect("defined");
        assert!((z - 2.0).abs() < 1e-12, "{z}");
        // Allowing 5 points of regression halves the evidence.
        let z = two_proportion_z(10, 100, 20, 100, 0.05).expect("defined");
        assert!((z - 1.0).abs() < 1e-12, "{z}");
        assert_eq!(two_proportion_z(0, 50, 0, 50, 0.0), None);
        assert_eq!(two_proportion_z(3, 0, 1, 10, 0.0), None);
        assert!((fixed_p_value(1.959_963_984_540_054) - 0.025).abs() < 1e-9);
    }

    #[test]
    fn windows_keep_the_last_samples() {
        let mut arm = ArmSamples::new(3);
        for (latency, failed) in [(1.0, true), (2.0, false), (3.0, true), (4.0, false)] {
            arm.push(latency, failed);
        }
        assert_eq!(arm.len(), 3);
        assert_eq!(arm.latencies, [2.0, 3.0, 4.0]);
        assert_eq!(arm.failed, 1);
    }

    /// Runs `experiments` A/A experiments (both arms alike), looking every `every`
    /// requests up to `requests` per arm; the share in which a test ever said p < α.
    fn false_alarm_rates(experiments: usize, requests: usize, every: usize) -> (f64, f64) {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (alpha, effect) = (0.05, 0.1);
        let (mut naive, mut sequential) = (0, 0);
        for _ in 0..experiments {
            let (mut a, mut b) = (ArmSamples::new(requests), ArmSamples::new(requests));
            let mut comparison = Comparison::default();
            let (mut naive_alarm, mut sequential_alarm) = (false, false);
            for i in 1..=requests {
                a.push(latency(&mut rng, 0.01), uniform(&mut rng) < 0.05);
                b.push(latency(&mut rng, 0.01), uniform(&mut rng) < 0.05);
                if i % every == 0 {
                    let verdict = comparison.look(&a, &b, effect, Margins::NONE);
                    naive_alarm |= verdict.latency_fixed_p < alpha;
                    sequential_alarm |= verdict.latency_p < alpha;
                }
            }
            naive += usize::from(naive_alarm);
            sequential += usize::from(sequential_alarm);
        }
        (
            naive as f64 / experiments as f64,
            sequential as f64 / experiments as f64,
        )
    }

    #[test]
    fn naive_looks_inflate_false_alarms_and_sequential_ones_do_not() {
        // 200 A/A experiments, 20 looks each.
        let (naive, sequential) = false_alarm_rates(200, 1000, 50);
        println!("false alarms: naive {naive}, sequential {sequential}");
        assert!(
            naive > 0.10,
            "repeated fixed-horizon looks alarmed in {naive} of experiments"
        );
        assert!(
            sequential <= 0.05,
            "the always-valid p-value alarmed in {sequential}"
        );
    }

    #[test]
    fn a_slower_or_failing_challenger_is_found() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (mut champion, mut challenger) = (ArmSamples::new(5000), ArmSamples::new(5000));
        let mut comparison = Comparison::default();
        let mut verdict = None;
        let margins = Margins {
            latency: 0.2,
            error_rate: 0.01,
        };
        for i in 1..=1000 {
            champion.push(latency(&mut rng, 0.010), uniform(&mut rng) < 0.01);
            // 60 % slower, and failing 8 % of the time.
            challenger.push(latency(&mut rng, 0.016), uniform(&mut rng) < 0.08);
            if i % 50 == 0 {
                verdict = Some(comparison.look(&champion, &challenger, 0.1, margins));
            }
        }
        let verdict = verdict.expect("looked");
        assert!(verdict.latency_p < 0.01, "{verdict:?}");
        assert!(verdict.errors_p < 0.01, "{verdict:?}");
        assert_eq!(
            (verdict.champion_samples, verdict.challenger_samples),
            (1000, 1000)
        );
        // A better challenger never looks worse.
        let mut better = Comparison::default();
        let verdict = better.look(&challenger, &champion, 0.1, margins);
        assert_eq!((verdict.latency_p, verdict.errors_p), (1.0, 1.0));
        // Within the margins, a slightly slower challenger is not worse.
        let (mut a, mut b) = (ArmSamples::new(5000), ArmSamples::new(5000));
        let mut close = Comparison::default();
        for _ in 0..3000 {
            a.push(latency(&mut rng, 0.010), false);
            b.push(latency(&mut rng, 0.0105), false);
        }
        let verdict = close.look(&a, &b, 0.1, margins);
        assert!(verdict.latency_p > 0.05, "{verdict:?}");
    }
}
