//! In-flight (continuous) batching: the sequences running on one instance's decoder.
//! A request's prompts join at the next step (one prefill over them, their cache rows
//! merged into the batch's cache), every row makes one token per step, and a row
//! leaves as soon as it ends (end of text, `max_new_tokens`, a stop string, the
//! context, or its request cancelled) without holding up the others. A request is
//! answered when its last row ends; a streaming one gets its text as it is decoded.
//!
//! An ended row's cache row stays behind, vacant, while waiting costs less than a
//! merge: the next join's merge drops it, so under steady load a leave costs no cache
//! merge of its own where merges are dear next to a row of a step (a small model), and
//! costs one at once where they are not (a large one).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ort::session::Session;
use ort::value::{DynValue, Tensor};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;

use super::cache_rows::plan_merge;
use super::decoder::DecoderBinding;
use super::delivery::{Letter, Outbox, Recipient};
use super::llm_io::{ResponseOptions, final_outputs};
use super::params::GenerationParams;
use super::row::{FinishReason, GenerationObserver, Row};
use super::sampler_graphs::NON_FINITE_LOGITS;
use super::text_stream::TextStream;
use super::{GenerationRequest, Generator};
use crate::error::BackendError;
use crate::responder::{Pending, Responder};

/// The most steps a vacant cache row waits for a join, whatever the timings say.
const VACANCY_STEPS: u32 = 16;

/// What the batch's runs have taken lately (moving averages), to weigh keeping a
/// vacant cache row against merging it away.
#[derive(Debug, Default, Clone, Copy)]
struct RunTimes {
    /// A step (decoder and choosing) of one row: warm-up and lone requests measure it.
    one_row_step: Duration,
    /// What one more row adds to a step: what a vacant row costs.
    row_step: Duration,
    merge: Duration,
}

impl RunTimes {
    fn record(average: &mut Duration, took: Duration) {
        *average = if average.is_zero() {
            took
        } else {
            (*average * 7 + took) / 8
        };
    }

    /// A step of `rows` rows took `took`. Beyond one row, what a row adds is the
    /// difference from a step of one row (over the rows added), or, while no step of
    /// one row was measured or one took longer, the step's time over its rows.
    fn stepped(&mut self, rows: usize, took: Duration) {
        let rows = u32::try_from(rows).unwrap_or(u32::MAX);
        if rows <= 1 {
            Self::record(&mut self.one_row_step, took);
            return;
        }
        let added = match took.checked_sub(self.one_row_step) {
            Some(added) if !self.one_row_step.is_zero() => added / (rows - 1),
            _ => took / rows,
        };
        Self::record(&mut self.row_step, added);
    }

    /// Whether a vacancy that waited `waited` steps should be merged away now: one
    /// more step of waiting would bring its cost past a merge's (as in ski rental:
    /// wait while what waiting cost stays below what ending it costs).
    fn vacancy_due(&self, waited: usize) -> bool {
        let steps = u32::try_from(waited).unwrap_or(u32::MAX).saturating_add(1);
        steps > VACANCY_STEPS || self.row_step * steps > self.merge
    }
}

/// A request whose rows are running.
struct Active {
    prompts: Vec<String>,
    text_shape: Vec<i64>,
    stream: bool,
    params: Arc<GenerationParams>,
    recipient: Arc<Recipient>,
    /// Each prompt's final text, once its row has ended.
    texts: Vec<Option<String>>,
    /// Rows still running.
    running: usize,
    options: ResponseOptions,
    /// Per prompt, once its row has ended: why, its prompt's tokens and its new ones.
    reasons: Vec<Option<FinishReason>>,
    input_tokens: Vec<usize>,
    output_tokens: Vec<usize>,
}

/// What the decoder is fed for some rows in one run.
struct Feed {
    rows: usize,
    /// `[rows, step]`: the tokens and their positions.
    ids: Vec<i64>,
    positions: Vec<i64>,
    step: usize,
    /// `[rows, columns]`: the cache's columns and the step's.
    mask: Vec<i64>,
    columns: usize,
    past: Vec<DynValue>,
}

/// The rows running on one decoder, and their cache.
pub struct RunningBatch<'g> {
    generator: &'g Generator,
    /// In the order of the cache's rows.
    rows: Vec<Row<'g>>,
    requests: HashMap<u64, Active>,
    next_request: u64,
    /// With the cache on: one tensor per layer and part, `[rows, heads, width,
    /// head_dim]`, every row's part ending at the last column.
    cache: Vec<DynValue>,
    width: usize,
    outbox: Outbox,
    times: RunTimes,
    /// Where the batch's work is counted (not for the load-time probe).
    metrics: Option<&'g dyn GenerationObserver>,
}

impl<'g> RunningBatch<'g> {
    pub(super) fn new(
        generator: &'g Generator,
        outbox: Outbox,
        metrics: Option<&'g dyn GenerationObserver>,
    ) -> Self {
        RunningBatch {
            generator,
            outbox,
            metrics,
            rows: Vec::new(),
            requests: HashMap::new(),
            next_request: 0,
            cache: Vec::new(),
            width: 0,
            times: RunTimes::default(),
        }
    }

    /// Rows (sequences) running.
    pub fn rows(&self) -> usize {
        self.live_rows().count()
    }

    fn live_rows(&self) -> impl Iterator<Item = &Row<'g>> {
        self.rows.iter().filter(|row| !row.is_vacant())
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The most tokens a running row may reach (what its cache may grow to).
    pub fn longest_reach(&self) -> usize {
        self.live_rows()
            .map(|row| self.generator.reach(row.prompt.len(), &row.params))
            .max()
            .unwrap_or(0)
    }

    /// Lets requests join: one prefill over their prompts chooses each one's first
    /// token, and their cache rows join the batch's. A failed prefill fails only them.
    pub fn admit(
        &mut self,
        session: &mut Session,
        binding: &mut DecoderBinding,
        pending: Vec<Pending<GenerationRequest>>,
    ) {
        if pending.is_empty() {
            return;
        }
        let first = self.rows.len();
        let received: Vec<Instant> = pending.iter().map(|p| p.request.received).collect();
        for Pending { request, responder } in pending {
            self.add(request, responder);
        }
        match self.prefill(session, binding, first) {
            Ok(joining) => {
                if let Some(metrics) = self.metrics {
                    let joined = &self.rows[first..];
                    let prompt_tokens = joined.iter().map(|row| row.prompt.len()).sum();
                    metrics.joined(joined.len(), prompt_tokens);
                    for received in received {
                        metrics.first_token(received.elapsed());
                    }
                }
                self.send_pieces();
                if let Err(error) = self.settle(binding, first, joining) {
                    self.fail_all(&error);
                }
            }
            Err(error) => self.fail_joining(first, &error),
        }
    }

    /// One new token for every running row; rows that end are answered.
    pub fn step(&mut self, session: &mut Session, binding: &mut DecoderBinding) {
        for row in self.rows.iter_mut().filter(|row| !row.is_vacant()) {
            let stops = self
                .requests
                .get(&row.request)
                .is_none_or(|active| active.recipient.should_stop());
            row.finished = stops.then_some(FinishReason::Abort);
        }
        let all = self.rows.len();
        let stepped = self.settle(binding, all, None).and_then(|()| {
            if self.rows.is_empty() {
                return Ok(());
            }
            let started = Instant::now();
            self.decode(session, binding)?;
            self.times.stepped(self.rows.len(), started.elapsed());
            Ok(())
        });
        if let Err(error) = stepped {
            self.fail_all(&error);
            return;
        }
        for waited in self
            .rows
            .iter_mut()
            .filter_map(|row| row.vacant_for.as_mut())
        {
            *waited += 1;
        }
        self.send_pieces();
        let all = self.rows.len();
        if let Err(error) = self.settle(binding, all, None) {
            self.fail_all(&error);
        }
    }

    fn add(&mut self, request: GenerationRequest, responder: Box<dyn Responder>) {
        let key = self.next_request;
        self.next_request += 1;
        let GenerationRequest {
            prompts,
            prompt_ids,
            text_shape,
            params,
            stream,
            received: _,
            options,
        } = request;
        let params = Arc::new(params);
        let decodes = stream || !params.stop.is_empty();
        for (index, prompt) in prompt_ids.into_iter().enumerate() {
            let rng = match params.seed {
                Some(seed) => ChaCha8Rng::seed_from_u64(seed.wrapping_add(index as u64)),
                None => ChaCha8Rng::from_os_rng(),
            };
            self.rows.push(Row {
                request: key,
                index,
                prompt,
                params: Arc::clone(&params),
                rng,
                generated: Vec::new(),
                text: decodes.then(|| TextStream::new(self.generator.tokenizer())),
                padding: 0,
                last_token_at: None,
                finished: None,
                vacant_for: None,
            });
        }
        self.requests.insert(
            key,
            Active {
                texts: vec![None; prompts.len()],
                running: prompts.len(),
                options,
                reasons: vec![None; prompts.len()],
                input_tokens: vec![0; prompts.len()],
                output_tokens: vec![0; prompts.len()],
                prompts,
                text_shape,
                stream,
                params,
                recipient: Recipient::new(responder),
            },
        );
    }

    /// Runs the rows from `first` on over their prompts; returns their cache (with the
    /// cache on) and its width.
    fn prefill(
        &mut self,
        session: &mut Session,
        binding: &mut DecoderBinding,
        first: usize,
    ) -> Result<Option<(Vec<DynValue>, usize)>, BackendError> {
        let feed = self.whole_sequences(binding, first)?;
        let width = feed.step;
        let (logits, present) = run_decoder(session, binding, feed)?;
        self.choose_and_accept(binding, &logits, first)?;
        Ok(self.generator.use_cache.then_some((present, width)))
    }

    /// One step for every row: with the cache, each row's newest token; without it,
    /// every row's whole sequence again.
    fn decode(
        &mut self,
        session: &mut Session,
        binding: &mut DecoderBinding,
    ) -> Result<(), BackendError> {
        let feed = if self.generator.use_cache {
            self.newest_tokens()
        } else {
            self.whole_sequences(binding, 0)?
        };
        let (logits, present) = run_decoder(session, binding, feed)?;
        if self.generator.use_cache {
            self.cache = present;
            self.width += 1;
        }
        self.choose_and_accept(binding, &logits, 0)
    }

    /// The rows from `first` on, each whole (prompt and new tokens), left-padded to the
    /// longest, with an empty cache; each row's padding is noted.
    fn whole_sequences(
        &mut self,
        binding: &DecoderBinding,
        first: usize,
    ) -> Result<Feed, BackendError> {
        let rows = &mut self.rows[first..];
        let width = rows.iter().map(Row::length).max().unwrap_or(0);
        let mut feed = Feed {
            rows: rows.len(),
            ids: Vec::with_capacity(rows.len() * width),
            positions: Vec::with_capacity(rows.len() * width),
            step: width,
            mask: Vec::with_capacity(rows.len() * width),
            columns: width,
            past: binding.empty_cache(rows.len())?,
        };
        for row in rows.iter_mut() {
            let length = row.length();
            row.padding = width - length;
            let sequence = row.prompt.iter().chain(&row.generated).copied();
            feed.ids
                .extend(std::iter::repeat_n(self.generator.eos_id, row.padding).chain(sequence));
            feed.mask
                .extend(std::iter::repeat_n(0, row.padding).chain(std::iter::repeat_n(1, length)));
            feed.positions
                .extend(std::iter::repeat_n(0, row.padding).chain(0..length as i64));
        }
        Ok(feed)
    }

    /// Every row's newest token over the batch's cache.
    fn newest_tokens(&mut self) -> Feed {
        let rows = self.rows.len();
        let columns = self.width + 1;
        let mut mask = Vec::with_capacity(rows * columns);
        for row in &self.rows {
            mask.extend(
                std::iter::repeat_n(0, row.padding)
                    .chain(std::iter::repeat_n(1, columns - row.padding)),
            );
        }
        Feed {
            rows,
            ids: self
                .rows
                .iter()
                .map(|row| {
                    row.generated
                        .last()
                        .copied()
                        .unwrap_or(self.generator.eos_id)
                })
                .collect(),
            positions: self
                .rows
                .iter()
                .map(|row| row.length() as i64 - 1)
                .collect(),
            step: 1,
            mask,
            columns,
            past: std::mem::take(&mut self.cache),
        }
    }

    /// Chooses the next token of the rows from `first` on and takes it into each row.
    fn choose_and_accept(
        &mut self,
        binding: &mut DecoderBinding,
        logits: &DynValue,
        first: usize,
    ) -> Result<(), BackendError> {
        let rows = &mut self.rows[first..];
        let chosen = binding.choose(logits, rows)?;
        let generator = self.generator;
        let now = Instant::now();
        for (row, token) in rows.iter_mut().zip(chosen) {
            if row.is_vacant() {
                continue;
            }
            if token == NON_FINITE_LOGITS {
                row.finished = Some(FinishReason::Abort);
                if let Some(active) = self.requests.get(&row.request) {
                    active.recipient.fail(&non_finite_logits(row));
                }
                continue;
            }
            if token == generator.eos_id {
                row.finished = Some(FinishReason::Stop);
                continue;
            }
            row.generated.push(token);
            if let Some(metrics) = self.metrics {
                metrics.token(row.last_token_at.map(|at| now.duration_since(at)));
            }
            row.last_token_at = Some(now);
            let stopped = match &mut row.text {
                Some(text) => text.push(token, &row.params.stop)?,
                None => false,
            };
            row.finished = if stopped {
                Some(FinishReason::Stop)
            } else if row.generated.len() >= row.params.max_new_tokens
                || row.length() >= generator.context_length
            {
                Some(FinishReason::Length)
            } else {
                None
            };
        }
        Ok(())
    }

    /// Sends each streaming request the text its rows decoded since the last step. A
    /// request that cannot take more text stops generating (at the next step).
    fn send_pieces(&mut self) {
        let mut pieces: HashMap<u64, Vec<String>> = HashMap::new();
        for row in self.rows.iter_mut().filter(|row| !row.is_vacant()) {
            let Some(active) = self.requests.get(&row.request) else {
                continue;
            };
            if !active.stream || active.recipient.is_broken() {
                continue;
            }
            let piece = row
                .text
                .as_mut()
                .map(|text| text.take_ready(&row.params.stop))
                .unwrap_or_default();
            pieces
                .entry(row.request)
                .or_insert_with(|| vec![String::new(); active.prompts.len()])[row.index] = piece;
        }
        for (key, pieces) in pieces {
            if pieces.iter().all(String::is_empty) {
                continue;
            }
            let Some(active) = self.requests.get(&key) else {
                continue;
            };
            self.outbox.post(Letter {
                to: Arc::clone(&active.recipient),
                text: self.generator.text_tensor(&active.text_shape, &pieces),
                generated_tokens: None,
                outputs: Vec::new(),
            });
        }
    }

    /// Rows that ended are answered and their cache rows become vacant. Then, if rows
    /// from `first` on join (with their cache, `joining`) or a vacancy waited long
    /// enough, the cache is merged on the decoder's device: the vacant rows leave, the
    /// joining ones are added.
    fn settle(
        &mut self,
        binding: &mut DecoderBinding,
        first: usize,
        joining: Option<(Vec<DynValue>, usize)>,
    ) -> Result<(), BackendError> {
        self.answer_ended();
        if self.live_rows().next().is_none() {
            self.rows.clear();
            self.cache.clear();
            self.width = 0;
            return Ok(());
        }
        let joins = first < self.rows.len();
        // The cache grows a column a step and only a merge trims the padding the live
        // rows share: vacancies go before the next step could pass the context or the
        // cache positions that admission allowed.
        let next_width = self.width + 1;
        let outgrows = next_width > self.generator.context_length
            || self.rows.len().saturating_mul(next_width) > self.generator.limits().max_tokens;
        let vacancy_due = self.rows.iter().any(|row| {
            row.vacant_for.is_some_and(|waited| {
                outgrows || !self.generator.use_cache || self.times.vacancy_due(waited)
            })
        });
        if !joins && !vacancy_due {
            return Ok(());
        }
        if self.generator.use_cache {
            let kept = |rows: &[Row<'_>]| -> Vec<(usize, usize)> {
                rows.iter()
                    .enumerate()
                    .filter(|(_, row)| !row.is_vacant())
                    .map(|(index, row)| (index, row.padding))
                    .collect()
            };
            let staying = kept(&self.rows[..first]);
            let arriving = kept(&self.rows[first..]);
            let (joining, joining_width) = match joining {
                Some(joining) => joining,
                None => (binding.empty_cache(0)?, 0),
            };
            let (plans, width) = plan_merge([self.width, joining_width], [&staying, &arriving]);
            let staying_cache = match std::mem::take(&mut self.cache) {
                cache if cache.is_empty() => binding.empty_cache(0)?,
                cache => cache,
            };
            let started = Instant::now();
            self.cache = binding.merge_caches(staying_cache, joining, &plans)?;
            RunTimes::record(&mut self.times.merge, started.elapsed());
            self.width = width;
            let (staying_rows, joining_rows) = self.rows.split_at_mut(first);
            for (side, rows) in [staying_rows, joining_rows].into_iter().enumerate() {
                for row in rows.iter_mut().filter(|row| !row.is_vacant()) {
                    row.padding = row.padding - plans[side].trim + plans[side].pad;
                }
            }
        }
        self.rows.retain(|row| !row.is_vacant());
        Ok(())
    }

    /// Answers the rows that ended since the last settle; they become vacant.
    fn answer_ended(&mut self) {
        let mut rows = std::mem::take(&mut self.rows);
        for row in rows
            .iter_mut()
            .filter(|row| row.finished.is_some() && !row.is_vacant())
        {
            if let Some(metrics) = self.metrics {
                metrics.left(row.finished);
            }
            self.end_row(row);
            row.vacant_for = Some(0);
        }
        self.rows = rows;
    }

    /// Keeps an ended row's text; answers its request when it was the last.
    fn end_row(&mut self, row: &Row<'_>) {
        let Some(active) = self.requests.get_mut(&row.request) else {
            return;
        };
        active.running = active.running.saturating_sub(1);
        if let Some(slot) = active.reasons.get_mut(row.index) {
            *slot = row.finished;
            active.input_tokens[row.index] = row.prompt.len();
            active.output_tokens[row.index] = row.generated.len();
        }
        if !active.recipient.is_broken() {
            let text = self.generator.final_text(
                row,
                &active.prompts,
                &active.params,
                active.stream,
                active.options.exclude_input,
            );
            match text {
                Ok(text) => active.texts[row.index] = Some(text),
                Err(error) => active.recipient.fail(&error),
            }
        }
        if active.running > 0 {
            return;
        }
        let Some(active) = self.requests.remove(&row.request) else {
            return;
        };
        if active.recipient.is_broken() {
            return;
        }
        let texts: Vec<String> = active
            .texts
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect();
        self.outbox.post(Letter {
            text: self.generator.text_tensor(&active.text_shape, &texts),
            outputs: final_outputs(
                active.options,
                &active.text_shape,
                &active.reasons,
                &active.input_tokens,
                &active.output_tokens,
            ),
            to: active.recipient,
            generated_tokens: Some(active.output_tokens.iter().sum()),
        });
    }

    /// Fails the requests whose rows start at `first` (their prefill failed); the rows
    /// before keep running.
    fn fail_joining(&mut self, first: usize, error: &BackendError) {
        for row in self.rows.drain(first..) {
            if let Some(active) = self.requests.remove(&row.request) {
                active.recipient.fail(error);
            }
        }
    }

    /// Fails every request (the batch's cache is lost).
    pub fn fail_all(&mut self, error: &BackendError) {
        for (_, active) in self.requests.drain() {
            if !active.recipient.is_broken() {
                active.recipient.fail(error);
            }
        }
        if let Some(metrics) = self.metrics {
            for _ in self.rows.drain(..).filter(|row| !row.is_vacant()) {
                metrics.left(None);
            }
        }
        self.rows.clear();
        self.cache.clear();
        self.width = 0;
    }
}

/// The error of a request whose row's next-token logits hold a NaN or infinity: the
/// model is broken, and any token chosen from them would be garbage.
fn non_finite_logits(row: &Row<'_>) -> BackendError {
    BackendError::not_finite(format_args!(
        "the model's logits for prompt {} (choosing its new token {}) are",
        row.index,
        row.generated.len() + 1
    ))
}

/// Runs the decoder on `feed`; returns the logits and the new cache, both left on the
/// decoder's device.
fn run_decoder(
    session: &mut Session,
    binding: &DecoderBinding,
    feed: Feed,
) -> Result<(DynValue, Vec<DynValue>), BackendError> {
    let mut io = session.create_binding()?;
    io.bind_input(
        "input_ids",
        &Tensor::from_array(([feed.rows, feed.step], feed.ids))?,
    )?;
    io.bind_input(
        "attention_mask",
        &Tensor::from_array(([feed.rows, feed.columns], feed.mask))?,
    )?;
    if binding.has_position_ids {
        io.bind_input(
            "position_ids",
            &Tensor::from_array(([feed.rows, feed.step], feed.positions))?,
        )?;
    }
    for (i, value) in feed.past.iter().enumerate() {
        let part = if i % 2 == 0 { "key" } else { "value" };
        io.bind_input(format!("past_key_values.{}.{part}", i / 2), value)?;
    }
    io.bind_output_to_device("logits", &binding.device_memory)?;
    for i in 0..binding.layers {
        for part in ["key", "value"] {
            io.bind_output_to_device(format!("present.{i}.{part}"), &binding.device_memory)?;
        }
    }
    let mut outputs = session.run_binding(&io)?;
    let logits = outputs
        .remove("logits")
        .ok_or_else(|| BackendError::internal("the decoder returned no logits"))?;
    let mut present = Vec::with_capacity(binding.layers * 2);
    for i in 0..binding.layers {
        for part in ["key", "value"] {
            let name = format!("present.{i}.{part}");
            present.push(outputs.remove(&name).ok_or_else(|| {
                BackendError::internal(format!("the decoder returned no '{name}'"))
            })?);
        }
    }
    Ok((logits, present))
}

/// Runs `pending` to its end on this thread, all admitted at once (the load-time probe,
/// benchmarks).
pub fn generate_all(
    generator: &Generator,
    session: &mut Session,
    binding: &mut DecoderBinding,
    pending: Vec<Pending<GenerationRequest>>,
) {
    let mut batch = RunningBatch::new(generator, Outbox::inline(), None);
    batch.admit(session, binding, pending);
    while !batch.is_empty() {
        batch.step(session, binding);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micros(us: u64) -> Duration {
        Duration::from_micros(us)
    }

    #[test]
    fn a_row_costs_what_it_adds_to_a_step_of_one_row() {
        let mut times = RunTimes::default();
        times.stepped(8, micros(400));
        assert_eq!(
            times.row_step,
            micros(50),
            "no step of one row yet: over its rows"
        );
        let mut times = RunTimes::default();
        times.stepped(1, micros(200));
        times.stepped(8, micros(340));
        assert_eq!(times.row_step, micros(20));
        // A step faster than one row's (noise) counts as its time over its rows.
        times.stepped(2, micros(150));
        assert_eq!(times.row_step, (micros(20) * 7 + micros(75)) / 8);
    }

    #[test]
    fn a_vacancy_waits_while_its_cost_stays_within_a_merge() {
        let cheap_rows = RunTimes {
            one_row_step: micros(200),
            row_step: micros(20),
            merge: micros(100),
        };
        let waits = (0..)
            .take_while(|&waited| !cheap_rows.vacancy_due(waited))
            .count();
        assert_eq!(waits, 5, "five steps of 20 µs fit in a 100 µs merge");
        let dear_rows = RunTimes {
            row_step: micros(5_000),
            merge: micros(3_000),
            ..cheap_rows
        };
        assert!(dear_rows.vacancy_due(0), "merged at once");
        let free_rows = RunTimes {
            row_step: Duration::ZERO,
            ..cheap_rows
        };
        assert!(!free_rows.vacancy_due(15));
        assert!(free_rows.vacancy_due(16), "never past VACANCY_STEPS");
    }
}
