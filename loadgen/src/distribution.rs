//! Whether the arms that answered match a router's weights: Pearson's chi-square
//! goodness of fit (statrs for the distribution).

use std::collections::BTreeMap;

use serde::Serialize;
use statrs::distribution::{ChiSquared, ContinuousCDF};

/// Pearson's test is only trusted when every arm expects at least this many answers.
const MIN_EXPECTED: f64 = 5.0;

/// Percent of the traffic per arm, keyed by the name a router's responses give the arm
/// in `ab_test_group` (`v<version>`).
#[derive(Debug, Clone, PartialEq)]
pub struct Weights(BTreeMap<String, u32>);

impl Weights {
    /// A router's `arms` parameter: `version:weight` pairs summing to 100, e.g. `1:70,2:30`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut arms = BTreeMap::new();
        for pair in text.split(',') {
            let parsed = pair.split_once(':').and_then(|(version, weight)| {
                Some((
                    version.trim().parse::<u32>().ok()?,
                    weight.trim().parse::<u32>().ok()?,
                ))
            });
            let Some((version, weight)) = parsed else {
                return Err(format!(
                    "'{text}' is not version:weight pairs such as '1:70,2:30'"
                ));
            };
            if arms.insert(format!("v{version}"), weight).is_some() {
                return Err(format!("'{text}' names version {version} twice"));
            }
        }
        let total: u32 = arms.values().sum();
        if total != 100 {
            return Err(format!("the weights of '{text}' sum to {total}, not 100"));
        }
        Ok(Self(arms))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DistributionCheck {
    pub expected_percent: BTreeMap<String, u32>,
    pub observed: BTreeMap<String, u64>,
    pub chi_square: f64,
    pub degrees_of_freedom: u64,
    pub p_value: f64,
    pub alpha: f64,
    /// The counts are consistent with the weights (p ≥ alpha) and nothing else is wrong.
    pub passed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

impl DistributionCheck {
    pub fn new(weights: &Weights, observed: &BTreeMap<String, u64>, alpha: f64) -> Self {
        let total: u64 = observed.values().sum();
        let mut problem = None;
        if let Some((arm, count)) = observed
            .iter()
            .find(|(arm, count)| **count > 0 && weights.0.get(*arm).copied().unwrap_or(0) == 0)
        {
            problem = Some(format!(
                "arm {arm} answered {count} requests but has no weight"
            ));
        }
        let mut chi_square = 0.0;
        let mut arms = 0u64;
        for (arm, &weight) in weights.0.iter().filter(|(_, weight)| **weight > 0) {
            let expected = total as f64 * f64::from(weight) / 100.0;
            if expected < MIN_EXPECTED && problem.is_none() {
                problem = Some(format!(
                    "arm {arm} expects {expected:.1} answers: send more requests (at least {MIN_EXPECTED} expected per arm)"
                ));
            }
            let seen = observed.get(arm).copied().unwrap_or(0) as f64;
            if expected > 0.0 {
                chi_square += (seen - expected).powi(2) / expected;
            }
            arms += 1;
        }
        let degrees_of_freedom = arms.saturating_sub(1);
        let p_value = if degrees_of_freedom == 0 {
            1.0
        } else {
            ChiSquared::new(degrees_of_freedom as f64)
                .map(|distribution| distribution.sf(chi_square))
                .unwrap_or(f64::NAN)
        };
        Self {
            expected_percent: weights.0.clone(),
            observed: observed.clone(),
            chi_square,
            degrees_of_freedom,
            p_value,
            alpha,
            passed: problem.is_none() && p_value >= alpha,
            problem,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(arm, n)| (arm.to_string(), *n)).collect()
    }

    #[test]
    fn weights_parse_like_the_router_arms() {
        let weights = Weights::parse("1:70, 2:30").unwrap();
        assert_eq!(
            weights.0,
            BTreeMap::from([("v1".into(), 70), ("v2".into(), 30)])
        );
        assert!(
            Weights::parse("1:70,2:20")
                .unwrap_err()
                .contains("sum to 90")
        );
        assert!(Weights::parse("1:50,1:50").unwrap_err().contains("twice"));
        assert!(Weights::parse("v1=70").is_err());
    }

    #[test]
    fn chi_square_matches_a_hand_computed_value() {
        // 2000 answers, 70/30 expected 1400/600: (50²/1400 + 50²/600) = 5.952, p = 0.0147.
        let weights = Weights::parse("1:70,2:30").unwrap();
        let check = DistributionCheck::new(&weights, &counts(&[("v1", 1450), ("v2", 550)]), 0.01);
        assert!(
            (check.chi_square - 5.9524).abs() < 1e-3,
            "{}",
            check.chi_square
        );
        assert_eq!(check.degrees_of_freedom, 1);
        assert!((check.p_value - 0.0147).abs() < 1e-3, "{}", check.p_value);
        assert!(check.passed);
        let strict = DistributionCheck::new(&weights, &counts(&[("v1", 1450), ("v2", 550)]), 0.05);
        assert!(!strict.passed);
    }

    #[test]
    fn answers_from_an_arm_without_weight_fail() {
        let weights = Weights::parse("1:100,2:0").unwrap();
        let check = DistributionCheck::new(&weights, &counts(&[("v1", 99), ("v2", 1)]), 0.001);
        assert!(!check.passed);
        assert!(check.problem.unwrap().contains("v2 answered 1"));
        let check = DistributionCheck::new(&weights, &counts(&[("v1", 100)]), 0.001);
        assert!(check.passed && check.p_value == 1.0);
        let check = DistributionCheck::new(&weights, &counts(&[("v1", 90), ("v3", 10)]), 0.001);
        assert!(check.problem.unwrap().contains("v3"));
    }

    #[test]
    fn too_few_answers_are_not_judged() {
        let weights = Weights::parse("1:95,2:5").unwrap();
        let check = DistributionCheck::new(&weights, &counts(&[("v1", 19), ("v2", 1)]), 0.001);
        assert!(!check.passed);
        assert!(check.problem.unwrap().contains("send more"));
    }
}
