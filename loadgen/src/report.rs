//! What each command reports: a serializable record for `--json`, a text rendering,
//! and whether its checks passed.

use std::fmt::Write as _;

use serde::Serialize;

use crate::LoadgenError;
use crate::client::{Answer, ModelEntry, ServerHealth};
use crate::distribution::DistributionCheck;
use crate::load::LoadReport;

/// Prints a report as JSON or text; says whether its checks passed.
pub trait Report: Serialize {
    fn passed(&self) -> bool;
    fn text(&self) -> String;
}

pub fn emit(report: &impl Report, json: bool) -> Result<bool, LoadgenError> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(report.passed())
}

#[derive(Serialize)]
pub struct HealthReport {
    pub server: ServerHealth,
    pub models: Vec<ModelEntry>,
}

impl Report for HealthReport {
    fn passed(&self) -> bool {
        self.server.live && self.server.ready
    }

    fn text(&self) -> String {
        let yes_no = |flag: bool, word: &str| {
            if flag {
                word.to_owned()
            } else {
                format!("not {word}")
            }
        };
        let mut text = format!(
            "server {} {}: {}, {}\n",
            self.server.name,
            self.server.version,
            yes_no(self.server.live, "live"),
            yes_no(self.server.ready, "ready")
        );
        let width = self.models.iter().map(|m| m.name.len()).max().unwrap_or(0);
        for model in &self.models {
            let _ = writeln!(
                text,
                "  {:width$}  {:>7}  {}{}",
                model.name,
                model.version,
                model.state,
                if model.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", model.reason)
                }
            );
        }
        text
    }
}

#[derive(Serialize)]
pub struct InferReport {
    pub model: String,
    pub passed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<Answer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why the model was not asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// At most this many values of an output are shown, each at most this many characters.
const SHOWN_VALUES: usize = 4;
const SHOWN_CHARS: usize = 60;

fn show_values(values: &[String]) -> String {
    let mut shown: Vec<String> = values
        .iter()
        .take(SHOWN_VALUES)
        .map(|value| match value.char_indices().nth(SHOWN_CHARS) {
            Some((cut, _)) => format!("{:?}…", &value[..cut]),
            None => format!("{value:?}"),
        })
        .collect();
    if values.len() > SHOWN_VALUES {
        shown.push(format!("… {} in all", values.len()));
    }
    shown.join(", ")
}

impl Report for Vec<InferReport> {
    fn passed(&self) -> bool {
        self.iter().all(|report| report.passed)
    }

    fn text(&self) -> String {
        let mut text = String::new();
        for report in self {
            if let Some(reason) = &report.skipped {
                let _ = writeln!(text, "{}: skipped: {reason}", report.model);
            } else if let Some(error) = &report.error {
                let _ = writeln!(text, "{}: FAILED: {error}", report.model);
            }
            let (Some(answer), Some(latency)) = (&report.answer, report.latency_ms) else {
                continue;
            };
            let _ = write!(text, "{}: ok in {latency:.1} ms", report.model);
            if answer.responses > 1 {
                let _ = write!(text, ", {} responses", answer.responses);
            }
            for (key, value) in &answer.parameters {
                let _ = write!(text, ", {key}={value}");
            }
            text.push('\n');
            for output in &answer.outputs {
                let _ = writeln!(
                    text,
                    "  {} {} {:?}: {}",
                    output.name,
                    output.datatype,
                    output.shape,
                    show_values(&output.values)
                );
            }
        }
        text
    }
}

#[derive(Serialize)]
pub struct AbCheckReport {
    #[serde(flatten)]
    pub load: LoadReport,
    pub distribution: DistributionCheck,
}

impl Report for AbCheckReport {
    fn passed(&self) -> bool {
        self.load.passed() && self.distribution.passed
    }

    fn text(&self) -> String {
        let check = &self.distribution;
        let weights: Vec<String> = check
            .expected_percent
            .iter()
            .map(|(arm, percent)| format!("{arm} {percent} %"))
            .collect();
        let verdict = match &check.problem {
            Some(problem) => format!("FAILED: {problem}"),
            None if check.passed => format!(
                "p = {:.4} ≥ alpha {}: consistent with the weights",
                check.p_value, check.alpha
            ),
            None => format!(
                "p = {:.4} < alpha {}: FAILED, not the configured weights",
                check.p_value, check.alpha
            ),
        };
        format!(
            "{}  weights {}: chi-square {:.3} ({} df), {verdict}\n",
            self.load.text(),
            weights.join(", "),
            check.chi_square,
            check.degrees_of_freedom
        )
    }
}

impl Report for LoadReport {
    fn passed(&self) -> bool {
        self.requests > 0 && self.failed == 0
    }

    fn text(&self) -> String {
        let mut text = format!(
            "{} over {}, concurrency {}: {} requests in {:.2} s\n  succeeded {} ({:.2} %), failed {}, {:.1} requests/s\n",
            self.model,
            self.protocol,
            self.concurrency,
            self.requests,
            self.duration_s,
            self.succeeded,
            self.success_rate * 100.0,
            self.failed,
            self.requests_per_s
        );
        for (label, latency) in [
            ("latency", &self.latency_ms),
            ("first response", &self.first_response_ms),
        ] {
            if let Some(l) = latency {
                let _ = writeln!(
                    text,
                    "  {label} ms: mean {:.2}  p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}",
                    l.mean, l.p50, l.p95, l.p99, l.max
                );
            }
        }
        if !self.arms.is_empty() {
            let total: u64 = self.arms.values().sum();
            let arms: Vec<String> = self
                .arms
                .iter()
                .map(|(arm, n)| format!("{arm} {n} ({:.1} %)", *n as f64 * 100.0 / total as f64))
                .collect();
            let _ = writeln!(text, "  arms: {}", arms.join(", "));
        }
        for (message, count) in &self.errors {
            let _ = writeln!(text, "  {count} × {message}");
        }
        text
    }
}

#[derive(Serialize)]
pub struct AllReport {
    pub health: HealthReport,
    pub inference: Vec<InferReport>,
    pub ab_checks: Vec<AbCheckReport>,
    /// Routers not checked, and why.
    pub skipped: Vec<String>,
}

impl Report for AllReport {
    fn passed(&self) -> bool {
        self.health.passed() && self.inference.passed() && self.ab_checks.iter().all(Report::passed)
    }

    fn text(&self) -> String {
        let mut text = self.health.text();
        text.push_str(&self.inference.text());
        for check in &self.ab_checks {
            text.push_str(&check.text());
        }
        for reason in &self.skipped {
            let _ = writeln!(text, "A/B check skipped: {reason}");
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_cut_for_display() {
        let values: Vec<String> = (0..6).map(|i| "x".repeat(i * 30)).collect();
        let shown = show_values(&values);
        assert!(
            shown.contains(&format!("{:?}…", "x".repeat(SHOWN_CHARS))),
            "{shown}"
        );
        assert!(shown.ends_with("… 6 in all"), "{shown}");
    }
}
