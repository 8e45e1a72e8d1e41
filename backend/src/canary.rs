//! Canary releases: a challenger's share of the traffic grows step by step while the
//! statistics find it no worse than the champion, and drops to 0 at once when they find
//! it worse.

use std::fmt;

/// Where a canary stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CanaryState {
    /// At step `index` of the schedule.
    Step(usize),
    /// The challenger takes all the traffic.
    Promoted,
    /// The challenger takes none.
    RolledBack,
}

impl CanaryState {
    /// The state's name in logs and in the `state` label.
    pub fn name(self) -> &'static str {
        match self {
            CanaryState::Step(_) => "progressing",
            CanaryState::Promoted => "promoted",
            CanaryState::RolledBack => "rolled_back",
        }
    }

    /// Every state name, for the metric's series.
    pub const NAMES: [&'static str; 3] = ["progressing", "promoted", "rolled_back"];
}

/// A canary's schedule and where it stands.
#[derive(Debug, Clone)]
pub struct Canary {
    /// The challenger's weight at each step, increasing, the last 100.
    steps: Vec<u32>,
    /// Challenger answers a step needs before the next step.
    min_samples: usize,
    /// Below this always-valid p-value the challenger is worse.
    alpha: f64,
    state: CanaryState,
    /// The challenger's answers when the current step began.
    step_start: usize,
}

/// A change of state, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub from: CanaryState,
    pub to: CanaryState,
    pub reason: String,
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} -> {:?}: {}", self.from, self.to, self.reason)
    }
}

/// The champion's and the challenger's weights when the challenger takes
/// `challenger_weight` percent.
pub fn arm_weights(challenger_weight: u32) -> [u32; 2] {
    [100 - challenger_weight.min(100), challenger_weight.min(100)]
}

/// Parses a schedule such as `5,25,50,100`: weights from 1 to 100, increasing, ending
/// at 100.
pub fn parse_steps(text: &str) -> Result<Vec<u32>, String> {
    let steps = text
        .split(',')
        .map(|step| match step.trim().parse::<u32>() {
            Ok(weight) if (1..=100).contains(&weight) => Ok(weight),
            _ => Err(format!(
                "'{text}' must be challenger weights from 1 to 100, e.g. '5,25,50,100' \
                 (bad step '{}')",
                step.trim()
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if steps.windows(2).any(|pair| pair[0] >= pair[1]) {
        return Err(format!("'{text}' must increase from step to step"));
    }
    if steps.last() != Some(&100) {
        return Err(format!("'{text}' must end at 100 (the promotion)"));
    }
    Ok(steps)
}

impl Canary {
    pub fn new(steps: Vec<u32>, min_samples: usize, alpha: f64) -> Self {
        Canary {
            steps,
            min_samples,
            alpha,
            state: CanaryState::Step(0),
            step_start: 0,
        }
    }

    pub fn state(&self) -> CanaryState {
        self.state
    }

    /// The challenger's share of the traffic now, in percent.
    pub fn challenger_weight(&self) -> u32 {
        match self.state {
            CanaryState::Step(index) => self.steps.get(index).copied().unwrap_or(100),
            CanaryState::Promoted => 100,
            CanaryState::RolledBack => 0,
        }
    }

    /// Takes one look: the challenger's always-valid p-values (latency, errors) and how
    /// many requests it has answered in all. Rolls back as soon as one p-value is below
    /// alpha; moves to the next step once the current one has `min_samples` answers.
    pub fn decide(&mut self, latency_p: f64, errors_p: f64, answered: usize) -> Option<Transition> {
        let CanaryState::Step(index) = self.state else {
            return None;
        };
        let from = self.state;
        if latency_p < self.alpha || errors_p < self.alpha {
            self.state = CanaryState::RolledBack;
            let (test, p) = if latency_p < errors_p {
                ("latency", latency_p)
            } else {
                ("errors", errors_p)
            };
            return Some(Transition {
                from,
                to: self.state,
                reason: format!(
                    "the challenger is worse ({test}: always-valid p = {p:.2e} < {})",
                    self.alpha
                ),
            });
        }
        let in_step = answered.saturating_sub(self.step_start);
        if in_step < self.min_samples {
            return None;
        }
        self.step_start = answered;
        self.state = if index + 1 >= self.steps.len() - 1 {
            CanaryState::Promoted
        } else {
            CanaryState::Step(index + 1)
        };
        Some(Transition {
            from,
            to: self.state,
            reason: format!(
                "{in_step} answers at {}% and not worse (latency p = {latency_p:.3}, errors \
                 p = {errors_p:.3}): {}%",
                self.steps[index],
                self.challenger_weight()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_are_checked() {
        assert_eq!(parse_steps("5, 25,50,100"), Ok(vec![5, 25, 50, 100]));
        assert_eq!(parse_steps("100"), Ok(vec![100]));
        for (text, expected) in [
            ("5,25,50", "must end at 100"),
            ("25,5,100", "must increase"),
            ("0,100", "bad step '0'"),
            ("5,,100", "bad step ''"),
            ("five,100", "bad step 'five'"),
        ] {
            let error = parse_steps(text).expect_err(text);
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn a_healthy_challenger_climbs_every_step_then_is_promoted() {
        let mut canary = Canary::new(vec![5, 25, 50, 100], 100, 0.01);
        assert_eq!(canary.challenger_weight(), 5);
        assert_eq!(canary.decide(0.5, 1.0, 99), None);
        let step = canary.decide(0.5, 1.0, 100).expect("next step");
        assert_eq!(step.to, CanaryState::Step(1));
        assert_eq!(canary.challenger_weight(), 25);
        assert_eq!(canary.decide(0.5, 1.0, 150), None);
        assert_eq!(
            canary.decide(0.5, 1.0, 200).map(|t| t.to),
            Some(CanaryState::Step(2))
        );
        assert_eq!(
            canary.decide(0.5, 1.0, 300).map(|t| t.to),
            Some(CanaryState::Promoted)
        );
        assert_eq!(canary.challenger_weight(), 100);
        // Promoted for good.
        assert_eq!(canary.decide(0.0, 0.0, 1000), None);
        assert_eq!(canary.challenger_weight(), 100);
    }

    #[test]
    fn a_worse_challenger_is_rolled_back_at_once() {
        let mut canary = Canary::new(vec![10, 50, 100], 100, 0.01);
        assert_eq!(
            canary.decide(0.5, 1.0, 100).map(|t| t.to),
            Some(CanaryState::Step(1))
        );
        let rollback = canary.decide(0.5, 0.001, 120).expect("rolled back");
        assert_eq!(
            (rollback.from, rollback.to),
            (CanaryState::Step(1), CanaryState::RolledBack)
        );
        assert!(rollback.reason.contains("errors"), "{}", rollback.reason);
        assert_eq!(canary.challenger_weight(), 0);
        // Rolled back for good.
        assert_eq!(canary.decide(1.0, 1.0, 10_000), None);
        assert_eq!(canary.challenger_weight(), 0);
    }
}
