//! loadgen: what the platform's proxy test script did, against Triton's own endpoints
//! and the A/B router models: health and the model list, one request per model, an A/B
//! distribution check of a router against its weights, and a load test, over HTTP or
//! gRPC. Exit status: 0 when every check passed, 1 when one failed, 2 on an error that
//! stopped the run.

mod client;
mod distribution;
mod load;
mod payload;
mod report;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use client::{Client, ClientError, GrpcClient, HttpClient, ModelEntry, ModelSpec, ParameterValue};
use distribution::{DistributionCheck, Weights};
use load::{LoadReport, Plan, Stop};
use payload::{Payload, UnsupportedInput};
use report::{AbCheckReport, AllReport, HealthReport, InferReport, emit};

/// A router model's task, and the config parameters loadgen reads from it.
const ROUTER_TASK: &str = "traffic-split";
const ARMS_PARAMETER: &str = "arms";
const CANARY_PARAMETER: &str = "canary_steps";

#[derive(Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Health, smoke, A/B distribution and load checks for a Triton server and its A/B router models, over HTTP or gRPC"
)]
struct Cli {
    /// Triton's HTTP endpoint (host:port or URL).
    #[arg(long, default_value = "localhost:8000", global = true)]
    http_url: String,
    /// Triton's gRPC endpoint (host:port or URL).
    #[arg(long, default_value = "localhost:8001", global = true)]
    grpc_url: String,
    /// Protocol for every call. Decoupled (streaming) models answer over gRPC only.
    #[arg(long, value_enum, default_value_t = Protocol::Http, global = true)]
    protocol: Protocol,
    /// Print one JSON report on stdout instead of text (and no progress bar).
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for each answer.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600), global = true)]
    timeout_s: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Protocol {
    Http,
    Grpc,
}

#[derive(Args, Clone)]
struct PayloadArgs {
    /// The text of each BYTES input; repeat for several texts in one request.
    #[arg(long = "text", default_value = "I love this product")]
    texts: Vec<String>,
    /// A KServe request parameter, KEY=VALUE (true, false and integers are typed);
    /// repeatable, e.g. --param max_new_tokens=8 --param user_id=alice.
    #[arg(long = "param", value_parser = parse_parameter)]
    parameters: Vec<(String, ParameterValue)>,
}

impl PayloadArgs {
    fn payload(&self) -> Payload {
        Payload {
            texts: self.texts.clone(),
            parameters: self.parameters.iter().cloned().collect(),
        }
    }
}

fn parse_parameter(text: &str) -> Result<(String, ParameterValue), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), ParameterValue::parse(value))),
        _ => Err(format!("'{text}' is not KEY=VALUE")),
    }
}

#[derive(Args, Clone, Copy)]
struct ConcurrencyArgs {
    /// Requests in flight at once.
    #[arg(short = 'c', long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
    concurrency: u64,
}

#[derive(Args, Clone, Copy)]
struct DistributionArgs {
    /// Requests to send (the check needs about 5 expected per arm; 2000 or more gives
    /// it power).
    #[arg(short = 'n', long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    requests: u64,
    /// The check fails when the chi-square p-value is below this: the chance that a
    /// router splitting exactly by its weights fails it.
    #[arg(long, default_value_t = 0.001, value_parser = probability)]
    alpha: f64,
}

fn probability(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value > 0.0 && value < 1.0 => Ok(value),
        _ => Err(format!("'{text}' is not a probability between 0 and 1")),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Server liveness, readiness and identity, and the models in its repository.
    Health,
    /// One request to each ready model (or to the named ones), with its answer.
    Infer {
        /// A model to ask; repeatable. Default: every ready model.
        #[arg(long = "model")]
        models: Vec<String>,
        #[command(flatten)]
        payload: PayloadArgs,
    },
    /// N requests to an A/B router: answers counted per arm and tested against the
    /// router's weights (chi-square goodness of fit), with the load report.
    AbCheck {
        /// The router model.
        #[arg(long)]
        model: String,
        /// Expected weights as version:percent pairs (default: the router's `arms`).
        /// Needed for a canary, whose weights move: read them from
        /// triton_rust_ab_arm_weight_percent on the metrics endpoint.
        #[arg(long)]
        weights: Option<String>,
        #[command(flatten)]
        distribution: DistributionArgs,
        #[command(flatten)]
        concurrency: ConcurrencyArgs,
        #[command(flatten)]
        payload: PayloadArgs,
    },
    /// Concurrent requests to one model for N requests or D seconds.
    Load {
        #[arg(long)]
        model: String,
        /// Requests to send in all.
        #[arg(short = 'n', long, value_parser = clap::value_parser!(u64).range(1..), conflicts_with = "duration_s", required_unless_present = "duration_s")]
        requests: Option<u64>,
        /// Seconds to keep sending.
        #[arg(short = 'd', long, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        duration_s: Option<u64>,
        #[command(flatten)]
        concurrency: ConcurrencyArgs,
        #[command(flatten)]
        payload: PayloadArgs,
    },
    /// Everything the proxy's test script did: health and models, one request per
    /// ready model, and an A/B check of every ready router.
    All {
        #[command(flatten)]
        distribution: DistributionArgs,
        #[command(flatten)]
        concurrency: ConcurrencyArgs,
        #[command(flatten)]
        payload: PayloadArgs,
    },
}

#[derive(Debug, thiserror::Error)]
enum LoadgenError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Payload(#[from] UnsupportedInput),
    #[error("weights: {0}")]
    Weights(String),
    #[error("model '{0}' is not an A/B router: its config has no task '{ROUTER_TASK}'")]
    NotRouter(String),
    #[error(
        "router '{0}' runs a canary, so its weights move: pass the current ones with --weights (triton_rust_ab_arm_weight_percent on the metrics endpoint)"
    )]
    CanaryWeights(String),
    #[error("cannot write the JSON report: {0}")]
    Json(#[from] serde_json::Error),
}

struct Session {
    client: Client,
    json: bool,
    timeout: Duration,
}

impl Session {
    async fn health(&self) -> Result<HealthReport, LoadgenError> {
        Ok(HealthReport {
            server: self.client.health().await?,
            models: self.client.models().await?,
        })
    }

    /// The ready models, each once.
    async fn ready_models(&self) -> Result<Vec<String>, LoadgenError> {
        let mut names: Vec<String> = self
            .client
            .models()
            .await?
            .into_iter()
            .filter(ModelEntry::is_ready)
            .map(|model| model.name)
            .collect();
        names.dedup();
        Ok(names)
    }

    async fn infer_one(&self, model: &str, payload: &Payload) -> InferReport {
        let mut report = InferReport {
            model: model.to_owned(),
            passed: false,
            latency_ms: None,
            answer: None,
            error: None,
            skipped: None,
        };
        let spec = match self.client.model_spec(model).await {
            Ok(spec) => spec,
            Err(error) => {
                report.error = Some(client::describe(&error));
                return report;
            }
        };
        if spec.decoupled && matches!(self.client, Client::Http(_)) {
            report.passed = true;
            report.skipped =
                Some("decoupled models stream over gRPC only (use --protocol grpc)".into());
            return report;
        }
        let request = match payload.request_for(&spec) {
            Ok(request) => request,
            Err(error) => {
                report.error = Some(error.to_string());
                return report;
            }
        };
        let sent = Instant::now();
        match self
            .client
            .infer(&request, spec.decoupled, self.timeout)
            .await
        {
            Ok(answer) => {
                report.passed = true;
                report.latency_ms = Some(sent.elapsed().as_secs_f64() * 1000.0);
                report.answer = Some(answer);
            }
            Err(error) => report.error = Some(client::describe(&error)),
        }
        report
    }

    async fn infer(
        &self,
        models: &[String],
        payload: &Payload,
    ) -> Result<Vec<InferReport>, LoadgenError> {
        let models = if models.is_empty() {
            self.ready_models().await?
        } else {
            models.to_vec()
        };
        let mut reports = Vec::with_capacity(models.len());
        for model in &models {
            reports.push(self.infer_one(model, payload).await);
        }
        Ok(reports)
    }

    fn progress(&self, label: &str, stop: Stop) -> ProgressBar {
        if self.json {
            return ProgressBar::hidden();
        }
        let (bar, template) = match stop {
            Stop::AfterRequests(total) => (
                ProgressBar::new(total),
                "{prefix} {bar:30} {pos}/{len} · {per_sec} · {elapsed}",
            ),
            Stop::After(duration) => (
                ProgressBar::new_spinner().with_message(format!("{}s", duration.as_secs())),
                "{prefix} {spinner} {pos} requests · {per_sec} · {elapsed} of {msg}",
            ),
        };
        bar.enable_steady_tick(Duration::from_millis(200));
        bar.with_style(ProgressStyle::with_template(template).expect("a valid constant template"))
            .with_prefix(label.to_owned())
    }

    async fn load(
        &self,
        spec: &ModelSpec,
        payload: &Payload,
        concurrency: u64,
        stop: Stop,
    ) -> Result<LoadReport, LoadgenError> {
        let request = payload.request_for(spec)?;
        let plan = Plan {
            concurrency: usize::try_from(concurrency).unwrap_or(usize::MAX),
            stop,
            timeout: self.timeout,
        };
        let progress = self.progress(&spec.name, stop);
        Ok(load::run(&self.client, request, spec.decoupled, plan, progress).await)
    }

    /// The weights an A/B check expects of a router.
    fn router_weights(spec: &ModelSpec, given: Option<&str>) -> Result<Weights, LoadgenError> {
        if spec.parameters.get("task").map(String::as_str) != Some(ROUTER_TASK) {
            return Err(LoadgenError::NotRouter(spec.name.clone()));
        }
        let text = match given {
            Some(text) => text,
            None if spec.parameters.contains_key(CANARY_PARAMETER) => {
                return Err(LoadgenError::CanaryWeights(spec.name.clone()));
            }
            None => spec
                .parameters
                .get(ARMS_PARAMETER)
                .map(String::as_str)
                .unwrap_or_default(),
        };
        Weights::parse(text).map_err(LoadgenError::Weights)
    }

    async fn ab_check(
        &self,
        spec: &ModelSpec,
        weights: &Weights,
        distribution: DistributionArgs,
        concurrency: u64,
        payload: &Payload,
    ) -> Result<AbCheckReport, LoadgenError> {
        let load = self
            .load(
                spec,
                payload,
                concurrency,
                Stop::AfterRequests(distribution.requests),
            )
            .await?;
        let distribution = DistributionCheck::new(weights, &load.arms, distribution.alpha);
        Ok(AbCheckReport { load, distribution })
    }

    async fn all(
        &self,
        distribution: DistributionArgs,
        concurrency: u64,
        payload: &Payload,
    ) -> Result<AllReport, LoadgenError> {
        let health = self.health().await?;
        let models = self.ready_models().await?;
        let inference = self.infer(&models, payload).await?;
        let mut ab_checks = Vec::new();
        let mut skipped = Vec::new();
        for model in &models {
            let spec = self.client.model_spec(model).await?;
            if spec.parameters.get("task").map(String::as_str) != Some(ROUTER_TASK) {
                continue;
            }
            if spec.decoupled && matches!(self.client, Client::Http(_)) {
                skipped.push(format!(
                    "{model}: decoupled, streams over gRPC only (use --protocol grpc)"
                ));
                continue;
            }
            match Self::router_weights(&spec, None) {
                Ok(weights) => ab_checks.push(
                    self.ab_check(&spec, &weights, distribution, concurrency, payload)
                        .await?,
                ),
                Err(error) => skipped.push(format!("{model}: {error}")),
            }
        }
        Ok(AllReport {
            health,
            inference,
            ab_checks,
            skipped,
        })
    }
}

async fn run(cli: Cli) -> Result<bool, LoadgenError> {
    let connections = match &cli.command {
        Command::AbCheck { concurrency, .. }
        | Command::Load { concurrency, .. }
        | Command::All { concurrency, .. } => {
            usize::try_from(concurrency.concurrency).unwrap_or(usize::MAX)
        }
        Command::Health | Command::Infer { .. } => 1,
    };
    let client = match cli.protocol {
        Protocol::Http => Client::Http(HttpClient::new(&cli.http_url, connections)?),
        Protocol::Grpc => Client::Grpc(GrpcClient::connect(&cli.grpc_url).await?),
    };
    let session = Session {
        client,
        json: cli.json,
        timeout: Duration::from_secs(cli.timeout_s),
    };
    match &cli.command {
        Command::Health => emit(&session.health().await?, cli.json),
        Command::Infer { models, payload } => {
            emit(&session.infer(models, &payload.payload()).await?, cli.json)
        }
        Command::AbCheck {
            model,
            weights,
            distribution,
            concurrency,
            payload,
        } => {
            let spec = session.client.model_spec(model).await?;
            let weights = Session::router_weights(&spec, weights.as_deref())?;
            let report = session
                .ab_check(
                    &spec,
                    &weights,
                    *distribution,
                    concurrency.concurrency,
                    &payload.payload(),
                )
                .await?;
            emit(&report, cli.json)
        }
        Command::Load {
            model,
            requests,
            duration_s,
            concurrency,
            payload,
        } => {
            let stop = match (requests, duration_s) {
                (Some(requests), _) => Stop::AfterRequests(*requests),
                (None, Some(seconds)) => Stop::After(Duration::from_secs(*seconds)),
                (None, None) => unreachable!("clap requires --requests or --duration-s"),
            };
            let spec = session.client.model_spec(model).await?;
            emit(
                &session
                    .load(&spec, &payload.payload(), concurrency.concurrency, stop)
                    .await?,
                cli.json,
            )
        }
        Command::All {
            distribution,
            concurrency,
            payload,
        } => emit(
            &session
                .all(*distribution, concurrency.concurrency, &payload.payload())
                .await?,
            cli.json,
        ),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("loadgen: {}", client::describe(&error));
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::collections::BTreeMap;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parameters_need_a_key() {
        assert_eq!(
            parse_parameter("max_new_tokens=8").unwrap(),
            ("max_new_tokens".into(), ParameterValue::Int(8))
        );
        assert_eq!(
            parse_parameter("user_id=a=b").unwrap().1,
            ParameterValue::Text("a=b".into())
        );
        assert!(parse_parameter("=1").is_err());
        assert!(parse_parameter("x").is_err());
    }

    #[test]
    fn router_weights_come_from_arms_unless_given_and_never_guessed_for_a_canary() {
        let mut spec = ModelSpec {
            name: "r".into(),
            parameters: BTreeMap::from([
                ("task".into(), ROUTER_TASK.into()),
                ("arms".into(), "1:70,2:30".into()),
            ]),
            ..Default::default()
        };
        assert_eq!(
            Session::router_weights(&spec, None).unwrap(),
            Weights::parse("1:70,2:30").unwrap()
        );
        assert_eq!(
            Session::router_weights(&spec, Some("1:50,2:50")).unwrap(),
            Weights::parse("1:50,2:50").unwrap()
        );
        spec.parameters
            .insert(CANARY_PARAMETER.into(), "5,50,100".into());
        assert!(matches!(
            Session::router_weights(&spec, None),
            Err(LoadgenError::CanaryWeights(_))
        ));
        spec.parameters
            .insert("task".into(), "text-classification".into());
        assert!(matches!(
            Session::router_weights(&spec, None),
            Err(LoadgenError::NotRouter(_))
        ));
    }
}
