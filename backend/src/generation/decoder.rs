//! The decoder with past key values: its inputs and outputs checked when an instance
//! loads, the cache kept on the session's device between steps (IO binding), and the
//! token-choosing graphs run on the logits where the decoder left them.

use ort::environment::Environment;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{DynValue, Tensor, ValueType};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::RngCore;

use super::params::GenerationParams;
use super::row::Row;
use super::sampler_graphs::{
    self, PICKER_LOGITS, PICKER_TOKEN_IDS, SAMPLER_HISTORY, SAMPLER_REPETITION_PENALTY,
    SAMPLER_TEMPERATURE, SAMPLER_TOP_K, SAMPLER_TOP_P, SAMPLER_UNIFORM,
};
use crate::error::BackendError;
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
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        for i in 0..layers {
            for part in ["key", "value"] {
                if !names.contains(&format!("past_key_values.{i}.{part}").as_str()) {
                    return unsupported(format!(
                        "the decoder lacks input 'past_key_values.{i}.{part}'"
                    ));
                }
                if !outputs.contains(&format!("present.{i}.{part}").as_str()) {
                    return unsupported(format!("the decoder lacks output 'present.{i}.{part}'"));
                }
            }
        }
        if !outputs.contains(&"logits") {
            return unsupported("the decoder has no 'logits' output".into());
        }
        let cache_shape = session
            .inputs()
            .iter()
            .find(|o| o.name() == "past_key_values.0.key")
            .and_then(|o| match o.dtype() {
                ValueType::Tensor { shape, .. } => Some(shape.to_vec()),
                _ => None,
            });
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
        Ok(DecoderBinding {
            layers,
            heads,
            head_dim,
            has_position_ids: names.contains(&"position_ids"),
            device_memory: memory_info(options.device)?,
            host_memory: memory_info(Device::Cpu)?,
            picker: sampler_graphs::greedy_token_picker(environment, options)?,
            sampler: sampler_graphs::token_sampler(environment, options)?,
        })
    }

    /// The greedy token of each row's last position, from logits left on the device.
    pub(super) fn pick_greedy(
        &mut self,
        logits: &DynValue,
        batch: usize,
    ) -> Result<Vec<i64>, BackendError> {
        choose_on_device(
            &mut self.picker,
            &self.host_memory,
            logits,
            Vec::new(),
            batch,
        )
    }

    /// Each row's token chosen on the device with its own settings ([`sampler_graphs::token_sampler`]):
    /// sampling rows draw the next number of their random generator; greedy rows take the
    /// most likely token after the repetition penalty, and finished rows draw nothing.
    pub(super) fn sample(
        &mut self,
        logits: &DynValue,
        rows: &mut [Row<'_>],
    ) -> Result<Vec<i64>, BackendError> {
        let batch = rows.len();
        let (mut temperature, mut top_k, mut top_p, mut draws, mut penalty) = (
            Vec::with_capacity(batch),
            Vec::with_capacity(batch),
            Vec::with_capacity(batch),
            Vec::with_capacity(batch),
            Vec::with_capacity(batch),
        );
        for row in rows.iter_mut() {
            let settings = SamplerRow::new(row.params, row.finished);
            temperature.push(settings.temperature);
            top_k.push(settings.top_k);
            top_p.push(settings.top_p);
            penalty.push(settings.repetition_penalty);
            draws.push(if settings.draws {
                uniform(&mut row.rng)
            } else {
                0.0
            });
        }
        // Each row's prompt and new tokens, padded with its first token (a repeat is
        // harmless: the penalty applies once per distinct token).
        let length = rows
            .iter()
            .map(|r| r.prompt.len() + r.generated.len())
            .max()
            .unwrap_or(0);
        let mut history = Vec::with_capacity(batch * length);
        for row in rows.iter() {
            let seen = row.prompt.iter().chain(&row.generated).copied();
            let pad = row.prompt.first().copied().unwrap_or(0);
            history.extend(seen.chain(std::iter::repeat(pad)).take(length));
        }
        let column = |values: Vec<f32>| Tensor::from_array(([batch, 1], values));
        let settings = vec![
            (SAMPLER_TEMPERATURE, column(temperature)?.into_dyn()),
            (
                SAMPLER_TOP_K,
                Tensor::from_array(([batch, 1], top_k))?.into_dyn(),
            ),
            (SAMPLER_TOP_P, column(top_p)?.into_dyn()),
            (SAMPLER_UNIFORM, column(draws)?.into_dyn()),
            (SAMPLER_REPETITION_PENALTY, column(penalty)?.into_dyn()),
            (
                SAMPLER_HISTORY,
                Tensor::from_array(([batch, length], history))?.into_dyn(),
            ),
        ];
        choose_on_device(
            &mut self.sampler,
            &self.host_memory,
            logits,
            settings,
            batch,
        )
    }
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
    /// A sampling row's settings; a greedy row keeps only its most likely token, and a
    /// finished row (which only rides along) is left unchanged.
    pub fn new(params: &GenerationParams, finished: bool) -> Self {
        let draws = !finished && params.do_sample;
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
            repetition_penalty: if finished {
                1.0
            } else {
                params.repetition_penalty
            },
            draws,
        }
    }
}

/// Runs a token-choosing graph on `logits` (left where the decoder put them) and the
/// per-row `settings`; returns one token id per row, read in host memory.
fn choose_on_device(
    chooser: &mut Session,
    host_memory: &MemoryInfo<'static>,
    logits: &DynValue,
    settings: Vec<(&str, DynValue)>,
    batch: usize,
) -> Result<Vec<i64>, BackendError> {
    let mut io = chooser.create_binding()?;
    io.bind_input(PICKER_LOGITS, logits)?;
    for (name, value) in &settings {
        io.bind_input(*name, value)?;
    }
    io.bind_output_to_device(PICKER_TOKEN_IDS, host_memory)?;
    let outputs = chooser.run_binding(&io)?;
    let (shape, ids) = outputs[PICKER_TOKEN_IDS].try_extract_tensor::<i64>()?;
    if shape[..] != [batch as i64, 1] {
        return Err(BackendError::internal(format!(
            "choosing tokens gave shape {shape:?} for {batch} rows"
        )));
    }
    Ok(ids.to_vec())
}

/// A batch of equally long rows (row-major) that grows by one column per step.
pub(super) struct Columns {
    rows: usize,
    values: Vec<i64>,
}

impl Columns {
    pub(super) fn new(rows: usize) -> Self {
        Columns {
            rows,
            values: Vec::new(),
        }
    }

    pub(super) fn width(&self) -> usize {
        self.values.len().checked_div(self.rows).unwrap_or(0)
    }

    /// Appends the next row while the columns are being filled row by row.
    pub(super) fn extend_row(&mut self, row: impl IntoIterator<Item = i64>) {
        self.values.extend(row);
    }

    pub(super) fn push_column(&mut self, column: &[i64]) {
        let width = self.width();
        let mut values = Vec::with_capacity(self.values.len() + self.rows);
        for (row, &value) in column.iter().enumerate() {
            values.extend_from_slice(&self.values[row * width..(row + 1) * width]);
            values.push(value);
        }
        self.values = values;
    }

    /// The last `count` columns, row-major.
    pub(super) fn last(&self, count: usize) -> Vec<i64> {
        let width = self.width();
        if width == 0 {
            return Vec::new();
        }
        self.values
            .chunks(width)
            .flat_map(|row| row[width - count.min(width)..].iter().copied())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_grow_one_column_at_a_time() {
        let mut columns = Columns::new(2);
        columns.extend_row([1, 2]);
        columns.extend_row([3, 4]);
        columns.push_column(&[5, 6]);
        assert_eq!(columns.width(), 3);
        assert_eq!(columns.last(3), [1, 2, 5, 3, 4, 6]);
        assert_eq!(columns.last(1), [5, 6]);
        let mut empty = Columns::new(2);
        empty.push_column(&[7, 8]);
        assert_eq!(empty.last(1), [7, 8]);
    }
}
