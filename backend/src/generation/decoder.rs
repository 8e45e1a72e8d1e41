//! The decoder with past key values: its inputs and outputs checked when an instance
//! loads, the cache kept on the session's device between steps (IO binding), and the
//! token-choosing graphs run on the logits where the decoder left them.

use ort::environment::Environment;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{DynValue, Outlet, Tensor, ValueType};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::RngCore;

use super::cache_rows::{
    self, JOINING, KEEP, MERGED, PAD, STAYING, SidePlan, TRIM, cache_tensor, side_input,
};
use super::params::GenerationParams;
use super::row::Row;
use super::sampler_graphs::{
    self, CHOOSER_ROWS, PICKER_LOGITS, PICKER_TOKEN_IDS, SAMPLER_HISTORY,
    SAMPLER_REPETITION_PENALTY, SAMPLER_TEMPERATURE, SAMPLER_TOP_K, SAMPLER_TOP_P, SAMPLER_UNIFORM,
    TokenChooser,
};
use crate::error::BackendError;
use crate::float_tensor::FloatType;
use crate::onnx::{Device, SessionOptions};

/// A draw uniform in [0, 1) (24 bits, what an `f32` holds exactly).
pub fn uniform(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32
}

/// The decoder's cache layout, read from the graph when an instance loads, where the
/// cache lives between steps, and the graphs that choose tokens on its device.
#[derive(Debug)]
pub struct DecoderBinding {
    pub(super) layers: usize,
    pub(super) heads: usize,
    pub(super) head_dim: usize,
    pub(super) has_position_ids: bool,
    /// The type of the cache's tensors.
    cache: FloatType,
    /// The session's device: `present.*` outputs stay there and come back as the next
    /// step's `past_key_values.*` (IO binding), so on a GPU the cache never crosses to
    /// the host; the logits stay there too.
    pub(super) device_memory: MemoryInfo<'static>,
    /// Host memory: where the chosen token ids are read.
    host_memory: MemoryInfo<'static>,
    /// [`sampler_graphs::greedy_token_picker`] and [`sampler_graphs::token_sampler`] on the decoder's
    /// device: the logits stay there and only the chosen ids come back.
    picker: Session,
    sampler: Session,
    /// [`sampler_graphs::plain_token_sampler`]: sampling rows that need no sort.
    plain_sampler: Session,
    /// [`cache_rows::cache_merger`] on the decoder's device: sequences join and leave
    /// the running batch's cache there.
    merger: Session,
}

fn memory_info(device: Device) -> Result<MemoryInfo<'static>, BackendError> {
    let (allocation_device, device_id) = match device {
        Device::Cpu => (AllocationDevice::CPU, 0),
        Device::Cuda { device_id } => (AllocationDevice::CUDA, device_id),
    };
    Ok(MemoryInfo::new(
        allocation_device,
        device_id,
        AllocatorType::Device,
        MemoryType::Default,
    )?)
}

/// The shape the graph declares for its tensor input or output `name` (-1 where a
/// dimension is not fixed).
fn declared_shape(outlets: &[Outlet], name: &str) -> Option<Vec<i64>> {
    outlets
        .iter()
        .find(|o| o.name() == name)
        .and_then(|o| match o.dtype() {
            ValueType::Tensor { shape, .. } => Some(shape.to_vec()),
            _ => None,
        })
}

/// The samplers count vocabulary places as `f32`, exact up to 2^24: a decoder whose
/// `logits` declare a larger vocabulary (`size`, -1 where it is not fixed) is refused.
fn check_vocabulary(size: Option<i64>) -> Result<(), BackendError> {
    match size {
        Some(size) if size > 1 << 24 => Err(BackendError::Unsupported(format!(
            "the decoder's vocabulary has {size} tokens; the samplers take at most 2^24"
        ))),
        _ => Ok(()),
    }
}

impl DecoderBinding {
    /// Checks the decoder's inputs and outputs, and builds the token-choosing graphs
    /// with the decoder's session `options` (so on its device).
    pub fn new(
        session: &Session,
        environment: &Environment,
        options: SessionOptions,
    ) -> Result<Self, BackendError> {
        let unsupported = |m: String| Err(BackendError::Unsupported(m));
        let names: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
        for required in ["input_ids", "attention_mask"] {
            if !names.contains(&required) {
                return unsupported(format!("the decoder has no '{required}' input"));
            }
        }
        let layers = names
            .iter()
            .filter(|n| n.starts_with("past_key_values.") && n.ends_with(".key"))
            .count();
        if layers == 0 {
            return unsupported(
                "the decoder has no 'past_key_values.{i}.key/value' inputs: export it with past key values".into(),
            );
        }
        for name in &names {
            let known = matches!(*name, "input_ids" | "attention_mask" | "position_ids")
                || (0..layers).any(|i| {
                    *name == format!("past_key_values.{i}.key")
                        || *name == format!("past_key_values.{i}.value")
                });
            if !known {
                return unsupported(format!(
                    "the decoder has an input this backend cannot feed: '{name}'"
                ));
            }
        }
        // float32, or a half-precision export's float16 or bfloat16; every cache tensor,
        // in and out, of one type (the merger and the fed-back cache need one).
        let float_type = |outlets: &[Outlet], what: &str, name: &str| {
            let found = outlets.iter().find(|o| o.name() == name).ok_or_else(|| {
                BackendError::Unsupported(format!("the decoder lacks {what} '{name}'"))
            })?;
            FloatType::of(found, what)
        };
        let cache = float_type(session.inputs(), "input", "past_key_values.0.key")?;
        if cache == FloatType::Bf16 && options.device == Device::Cpu {
            return unsupported(
                "the decoder's KV cache is bfloat16, which ONNX Runtime's CPU kernels cannot \
                 pad (the cache merger needs to): export it in float16 or float32 for \
                 KIND_CPU instances"
                    .into(),
            );
        }
        for i in 0..layers {
            for part in ["key", "value"] {
                for (outlets, what, name) in [
                    (
                        session.inputs(),
                        "input",
                        format!("past_key_values.{i}.{part}"),
                    ),
                    (session.outputs(), "output", format!("present.{i}.{part}")),
                ] {
                    let ty = float_type(outlets, what, &name)?;
                    if ty != cache {
                        return unsupported(format!(
                            "the decoder's '{name}' is {ty:?} but 'past_key_values.0.key' is \
                             {cache:?}: the cache must have one type"
                        ));
                    }
                }
            }
        }
        if !session.outputs().iter().any(|o| o.name() == "logits") {
            return unsupported("the decoder has no 'logits' output".into());
        }
        let cache_shape = declared_shape(session.inputs(), "past_key_values.0.key");
        let (heads, head_dim) = match cache_shape.as_deref() {
            Some([_, heads, _, head_dim]) if *heads > 0 && *head_dim > 0 => {
                (*heads as usize, *head_dim as usize)
            }
            other => {
                return unsupported(format!(
                    "'past_key_values.0.key' must be [batch, heads, past, head_dim] with fixed heads \
                     and head_dim, got {other:?}"
                ));
            }
        };
        check_vocabulary(
            declared_shape(session.outputs(), "logits").and_then(|s| s.last().copied()),
        )?;
        let logits = float_type(session.outputs(), "output", "logits")?;
        Ok(DecoderBinding {
            layers,
            heads,
            head_dim,
            has_position_ids: names.contains(&"position_ids"),
            device_memory: memory_info(options.device)?,
            host_memory: memory_info(Device::Cpu)?,
            cache,
            picker: sampler_graphs::greedy_token_picker(environment, options, logits)?,
            sampler: sampler_graphs::token_sampler(environment, options, logits)?,
            plain_sampler: sampler_graphs::plain_token_sampler(environment, options, logits)?,
            merger: cache_rows::cache_merger(environment, options, layers * 2, cache)?,
        })
    }

    /// A cache of `rows` rows and no columns, one tensor per layer and part.
    pub(super) fn empty_cache(&self, rows: usize) -> Result<Vec<DynValue>, BackendError> {
        (0..self.layers * 2)
            .map(|_| {
                self.cache
                    .empty_tensor(vec![rows, self.heads, 0, self.head_dim])
            })
            .collect()
    }

    /// Merges two caches (one tensor per layer and part each) as `plans` say: the
    /// staying side's kept rows, then the joining side's, on the decoder's device, in
    /// one run.
    pub(super) fn merge_caches(
        &mut self,
        staying: Vec<DynValue>,
        joining: Vec<DynValue>,
        plans: &[SidePlan; 2],
    ) -> Result<Vec<DynValue>, BackendError> {
        let mut io = self.merger.create_binding()?;
        for (side, plan) in [STAYING, JOINING].into_iter().zip(plans) {
            let scalar = |value: usize| Tensor::from_array(([1], vec![value as i64]));
            io.bind_input(
                side_input(side, KEEP),
                &Tensor::from_array(([plan.keep.len()], plan.keep.clone()))?,
            )?;
            io.bind_input(side_input(side, TRIM), &scalar(plan.trim)?)?;
            io.bind_input(side_input(side, PAD), &scalar(plan.pad)?)?;
        }
        for (side, cache) in [(STAYING, &staying), (JOINING, &joining)] {
            for (tensor, value) in cache.iter().enumerate() {
                io.bind_input(cache_tensor(side, tensor), value)?;
            }
        }
        let tensors = self.layers * 2;
        for tensor in 0..tensors {
            io.bind_output_to_device(cache_tensor(MERGED, tensor), &self.device_memory)?;
        }
        let mut outputs = self.merger.run_binding(&io)?;
        (0..tensors)
            .map(|tensor| {
                outputs
                    .remove(cache_tensor(MERGED, tensor))
                    .ok_or_else(|| BackendError::internal("the cache merger returned too little"))
            })
            .collect()
    }

    /// Each row's next token, chosen on the device from logits left there, by the graph
    /// its own settings need ([`SamplerRow::chooser`]): sampling rows draw the next
    /// number of their random generator; greedy rows take the most likely token (after
    /// the repetition penalty). Vacant rows get none (their entry is 0).
    pub(super) fn choose(
        &mut self,
        logits: &DynValue,
        rows: &mut [Row<'_>],
    ) -> Result<Vec<i64>, BackendError> {
        let mut chosen = vec![0; rows.len()];
        for chooser in [
            TokenChooser::Greedy,
            TokenChooser::Plain,
            TokenChooser::Sorted,
        ] {
            let selected: Vec<usize> = rows
                .iter()
                .enumerate()
                .filter(|(_, row)| !row.is_vacant() && SamplerRow::chooser(&row.params) == chooser)
                .map(|(index, _)| index)
                .collect();
            if selected.is_empty() {
                continue;
            }
            let (graph, settings) = match chooser {
                TokenChooser::Greedy => (&mut self.picker, Vec::new()),
                TokenChooser::Plain => (
                    &mut self.plain_sampler,
                    sampler_settings(rows, &selected, false)?,
                ),
                TokenChooser::Sorted => {
                    (&mut self.sampler, sampler_settings(rows, &selected, true)?)
                }
            };
            let ids = choose_on_device(graph, &self.host_memory, logits, &selected, settings)?;
            for (index, id) in selected.into_iter().zip(ids) {
                chosen[index] = id;
            }
        }
        Ok(chosen)
    }
}

/// What a sampler graph is fed for the `selected` rows (`sorted`: with top-k and top-p,
/// for [`sampler_graphs::token_sampler`]); each sampling row draws its number here.
fn sampler_settings(
    rows: &mut [Row<'_>],
    selected: &[usize],
    sorted: bool,
) -> Result<Vec<(&'static str, DynValue)>, BackendError> {
    let count = selected.len();
    let (mut temperature, mut top_k, mut top_p, mut draws, mut penalty) = (
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
    );
    // Each row's prompt and new tokens, padded with its first token (a repeat is
    // harmless: the penalty applies once per distinct token).
    let length = selected
        .iter()
        .map(|&index| rows[index].length())
        .max()
        .unwrap_or(0);
    let mut history = Vec::with_capacity(count * length);
    for &index in selected {
        let row = &mut rows[index];
        let settings = SamplerRow::new(&row.params);
        temperature.push(settings.temperature);
        top_k.push(settings.top_k);
        top_p.push(settings.top_p);
        penalty.push(settings.repetition_penalty);
        draws.push(if settings.draws {
            uniform(&mut row.rng)
        } else {
            0.0
        });
        let seen = row.prompt.iter().chain(&row.generated).copied();
        let pad = row.prompt.first().copied().unwrap_or(0);
        history.extend(seen.chain(std::iter::repeat(pad)).take(length));
    }
    let column = |values: Vec<f32>| Tensor::from_array(([count, 1], values));
    let mut settings = vec![
        (SAMPLER_TEMPERATURE, column(temperature)?.into_dyn()),
        (SAMPLER_UNIFORM, column(draws)?.into_dyn()),
        (SAMPLER_REPETITION_PENALTY, column(penalty)?.into_dyn()),
        (
            SAMPLER_HISTORY,
            Tensor::from_array(([count, length], history))?.into_dyn(),
        ),
    ];
    if sorted {
        settings.push((
            SAMPLER_TOP_K,
            Tensor::from_array(([count, 1], top_k))?.into_dyn(),
        ));
        settings.push((SAMPLER_TOP_P, column(top_p)?.into_dyn()));
    }
    Ok(settings)
}

/// What [`sampler_graphs::token_sampler`] is fed for one row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerRow {
    pub temperature: f32,
    /// `i64::MAX` keeps every token; 1 is greedy.
    pub top_k: i64,
    /// Infinite keeps every token.
    pub top_p: f32,
    pub repetition_penalty: f32,
    /// Whether the row draws a number from its random generator for this step.
    pub draws: bool,
}

impl SamplerRow {
    /// The graph that chooses a row's tokens: the sort only where top-k or top-p need it.
    pub fn chooser(params: &GenerationParams) -> TokenChooser {
        match (params.do_sample, params.top_k, params.top_p) {
            (false, _, _) if params.repetition_penalty == 1.0 => TokenChooser::Greedy,
            (true, 0, top_p) if top_p >= 1.0 => TokenChooser::Plain,
            _ => TokenChooser::Sorted,
        }
    }

    /// A sampling row's settings; a greedy row keeps only its most likely token.
    pub fn new(params: &GenerationParams) -> Self {
        let draws = params.do_sample;
        SamplerRow {
            temperature: if draws { params.temperature } else { 1.0 },
            top_k: match params.top_k {
                _ if !draws => 1,
                0 => i64::MAX,
                k => i64::try_from(k).unwrap_or(i64::MAX),
            },
            top_p: if draws && params.top_p < 1.0 {
                params.top_p
            } else {
                f32::INFINITY
            },
            repetition_penalty: params.repetition_penalty,
            draws,
        }
    }
}

/// Runs a token-choosing graph on the `rows` of `logits` (left where the decoder put
/// them) and their `settings`; returns one token id per row, read in host memory.
fn choose_on_device(
    chooser: &mut Session,
    host_memory: &MemoryInfo<'static>,
    logits: &DynValue,
    rows: &[usize],
    settings: Vec<(&str, DynValue)>,
) -> Result<Vec<i64>, BackendError> {
    let count = rows.len();
    let indices =
        Tensor::from_array(([count], rows.iter().map(|&r| r as i64).collect::<Vec<_>>()))?;
    let mut io = chooser.create_binding()?;
    io.bind_input(PICKER_LOGITS, logits)?;
    io.bind_input(CHOOSER_ROWS, &indices)?;
    for (name, value) in &settings {
        io.bind_input(*name, value)?;
    }
    io.bind_output_to_device(PICKER_TOKEN_IDS, host_memory)?;
    let outputs = chooser.run_binding(&io)?;
    let (shape, ids) = outputs[PICKER_TOKEN_IDS].try_extract_tensor::<i64>()?;
    if shape[..] != [count as i64, 1] {
        return Err(BackendError::internal(format!(
            "choosing tokens gave shape {shape:?} for {count} rows"
        )));
    }
    Ok(ids.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocabularies_past_what_an_f32_counts_exactly_are_refused() {
        for fine in [None, Some(-1), Some(2000), Some(50257), Some(1 << 24)] {
            assert!(check_vocabulary(fine).is_ok(), "{fine:?}");
        }
        let error = check_vocabulary(Some((1 << 24) + 1)).expect_err("too large");
        assert!(error.to_string().contains("at most 2^24"), "{error}");
    }
}
