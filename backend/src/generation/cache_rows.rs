//! The graph that reshapes the running batch's KV cache when sequences join or leave,
//! run where the decoder runs (on a GPU the cache never crosses to the host). Every
//! row's cache ends at the same column, with masked padding on its left: the rows that
//! stay keep their values, the padding they all share is trimmed, and the two sides
//! are padded on the left to one width, the joining rows after the staying ones.

use ort::editor::Graph;
use ort::environment::Environment;
use ort::operator::Attribute;
use ort::session::Session;
use ort::value::{Outlet, TensorElementType};

use super::sampler_graphs::{add_constant, add_node, dynamic_tensor, session_from_graph};
use crate::error::BackendError;
use crate::float_tensor::FloatType;
use crate::onnx::SessionOptions;

/// The two sides of a merge: per cache tensor `t` (layer by layer, key then value),
/// `staying.{t}` and `joining.{t}`, each `[rows, heads, width, head_dim]`.
pub const STAYING: &str = "staying";
pub const JOINING: &str = "joining";
/// Per side: the rows kept (`[n]` indices), the leading columns dropped (`[1]`) and
/// the columns added on the left (`[1]`), the same for every tensor.
pub const KEEP: &str = "keep";
pub const TRIM: &str = "trim";
pub const PAD: &str = "pad";
/// The merged cache, `merged.{t}`: the staying side's kept rows, then the joining side's.
pub const MERGED: &str = "merged";

/// The name of a side's setting, e.g. `staying_keep`.
pub fn side_input(side: &str, setting: &str) -> String {
    format!("{side}_{setting}")
}

/// The name of cache tensor `tensor` of a side or of the merged cache, e.g. `merged.3`.
pub fn cache_tensor(part: &str, tensor: usize) -> String {
    format!("{part}.{tensor}")
}

/// Builds the merge graph for a cache of `tensors` tensors of type `cache` (all merged
/// in one run), with the decoder's session `options`.
pub fn cache_merger(
    environment: &Environment,
    options: SessionOptions,
    tensors: usize,
    cache: FloatType,
) -> Result<Session, BackendError> {
    let mut graph = Graph::new()?;
    let mut inputs = Vec::new();
    for side in [STAYING, JOINING] {
        for setting in [KEEP, TRIM, PAD] {
            inputs.push(Outlet::new(
                side_input(side, setting),
                dynamic_tensor(TensorElementType::Int64, 1),
            ));
        }
        for tensor in 0..tensors {
            inputs.push(Outlet::new(
                cache_tensor(side, tensor),
                dynamic_tensor(cache.element_type(), 4),
            ));
        }
    }
    graph.set_inputs(inputs)?;
    graph.set_outputs((0..tensors).map(|tensor| {
        Outlet::new(
            cache_tensor(MERGED, tensor),
            dynamic_tensor(cache.element_type(), 4),
        )
    }))?;
    let g = &mut graph;
    add_constant(g, "end", &[1], &[i64::MAX])?;
    add_constant(g, "width_axis", &[1], &[2i64])?;
    add_constant(g, "before_width", &[2], &[0i64, 0])?;
    add_constant(g, "after_width", &[5], &[0i64; 5])?;
    for side in [STAYING, JOINING] {
        // Pad's pads: the beginnings of the four axes, then their ends; only the
        // width axis (2) gets columns, on its left.
        let pads = format!("{side}_pads");
        add_node(
            g,
            "Concat",
            &["before_width", &side_input(side, PAD), "after_width"],
            &pads,
            vec![Attribute::new("axis", 0i64)?],
        )?;
        for tensor in 0..tensors {
            let input = cache_tensor(side, tensor);
            let name = |step: &str| format!("{input}_{step}");
            add_node(
                g,
                "Gather",
                &[&input, &side_input(side, KEEP)],
                &name("rows"),
                vec![Attribute::new("axis", 0i64)?],
            )?;
            add_node(
                g,
                "Slice",
                &[&name("rows"), &side_input(side, TRIM), "end", "width_axis"],
                &name("trimmed"),
                vec![],
            )?;
            add_node(
                g,
                "Pad",
                &[&name("trimmed"), &pads],
                &name("padded"),
                vec![],
            )?;
        }
    }
    for tensor in 0..tensors {
        let padded = |side: &str| format!("{}_padded", cache_tensor(side, tensor));
        add_node(
            g,
            "Concat",
            &[&padded(STAYING), &padded(JOINING)],
            &cache_tensor(MERGED, tensor),
            vec![Attribute::new("axis", 0i64)?],
        )?;
    }
    session_from_graph(graph, environment, options, "the KV cache merger")
}

/// How one side's rows go into a merged cache of `width` columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidePlan {
    /// The rows kept, in order.
    pub keep: Vec<i64>,
    /// Leading columns every kept row has as padding, dropped.
    pub trim: usize,
    /// Columns added on the left.
    pub pad: usize,
}

/// Plans a merge of two sides of `widths` columns, given the left padding of each
/// side's kept rows (`kept[side]`: `(row index, padding)`); returns each side's plan and
/// the merged width, which is the longest kept row's length.
pub fn plan_merge(widths: [usize; 2], kept: [&[(usize, usize)]; 2]) -> ([SidePlan; 2], usize) {
    let lengths = [0, 1].map(|side| {
        let trim = kept[side].iter().map(|&(_, pad)| pad).min().unwrap_or(0);
        let length = if kept[side].is_empty() {
            0
        } else {
            widths[side] - trim
        };
        (trim, length)
    });
    let width = lengths[0].1.max(lengths[1].1);
    let plans = [0, 1].map(|side| SidePlan {
        keep: kept[side].iter().map(|&(row, _)| row as i64).collect(),
        trim: if kept[side].is_empty() {
            widths[side]
        } else {
            lengths[side].0
        },
        pad: width - lengths[side].1,
    });
    (plans, width)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_merged_width_is_the_longest_kept_row() {
        // Staying: width 6, rows 0 and 2 kept with 2 and 3 padding columns (lengths 4, 3).
        // Joining: width 5, row 1 kept with 0 padding (length 5).
        let (plans, width) = plan_merge([6, 5], [&[(0, 2), (2, 3)], &[(1, 0)]]);
        assert_eq!(width, 5);
        assert_eq!(
            plans,
            [
                SidePlan {
                    keep: vec![0, 2],
                    trim: 2,
                    pad: 1
                },
                SidePlan {
                    keep: vec![1],
                    trim: 0,
                    pad: 0
                },
            ]
        );
    }

    #[test]
    fn an_empty_side_keeps_nothing_and_adds_only_padding() {
        let (plans, width) = plan_merge([7, 0], [&[(1, 4)], &[]]);
        assert_eq!(width, 3);
        assert_eq!(
            plans[0],
            SidePlan {
                keep: vec![1],
                trim: 4,
                pad: 0
            }
        );
        assert_eq!(
            plans[1],
            SidePlan {
                keep: vec![],
                trim: 0,
                pad: 3
            }
        );
    }
}
