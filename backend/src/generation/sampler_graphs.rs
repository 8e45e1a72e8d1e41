//! The small graphs that choose tokens where the decoder runs (ONNX Runtime's model
//! editor API, built at load): only the chosen ids cross to the host, never the logits.
//! Each takes the rows of the batch it chooses for, so every row goes through the graph
//! its own settings need ([`TokenChooser`]), whatever the other rows need.

use ort::editor::{Graph, Model, Node, ONNX_DOMAIN, Opset};
use ort::environment::Environment;
use ort::memory::Allocator;
use ort::operator::Attribute;
use ort::session::Session;
use ort::value::{Outlet, Shape, SymbolicDimensions, Tensor, TensorElementType, ValueType};

use crate::error::BackendError;
use crate::float_tensor::FloatType;
use crate::onnx::{SessionOptions, session_builder};

/// Inputs and output of every graph here: the decoder's `logits [batch, sequence,
/// vocab]`, the rows to choose for (`[n]` indices into the batch), one id per row.
pub const PICKER_LOGITS: &str = "logits";
pub const CHOOSER_ROWS: &str = "rows";
pub const PICKER_TOKEN_IDS: &str = "token_ids";

/// The id every graph here gives a row whose logits are not all finite (a NaN or +inf:
/// broken weights, or an export that overflows in float16). Arg-max and the draw would
/// otherwise pick some token from them, and the text would be garbage with a 200.
pub const NON_FINITE_LOGITS: i64 = -1;

/// Which graph chooses a row's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenChooser {
    /// Greedy without a repetition penalty: [`greedy_token_picker`].
    Greedy,
    /// Sampling without top-k or top-p: [`plain_token_sampler`], no sort.
    Plain,
    /// Everything else: [`token_sampler`], over the sorted distribution.
    Sorted,
}

/// A small graph run where the decoder runs: `Gather` the last position of `logits`,
/// then the rows, then `ArgMax` over the vocabulary (unless the row's logits are not
/// finite), giving `token_ids [n, 1]`. Greedy decoding then moves only token ids from
/// the device to the host, not the logits.
pub fn greedy_token_picker(
    environment: &Environment,
    options: SessionOptions,
    logits: FloatType,
) -> Result<Session, BackendError> {
    let mut graph = Graph::new()?;
    graph.set_inputs([
        Outlet::new(PICKER_LOGITS, dynamic_tensor(logits.element_type(), 3)),
        Outlet::new(CHOOSER_ROWS, dynamic_tensor(TensorElementType::Int64, 1)),
    ])?;
    graph.set_outputs([Outlet::new(
        PICKER_TOKEN_IDS,
        dynamic_tensor(TensorElementType::Int64, 2),
    )])?;
    add_last_position_logits(&mut graph, logits)?;
    let axis = |name: &str, value: i64| Attribute::new(name, value);
    add_node(
        &mut graph,
        "ArgMax",
        &["last_logits"],
        "most_likely",
        vec![axis("axis", 2)?, axis("keepdims", 0)?],
    )?;
    add_logit_sum(&mut graph, "last_logits", false)?;
    add_non_finite_check(&mut graph, "logit_sum", "most_likely")?;
    session_from_graph(graph, environment, options, "the greedy token picker")
}

/// `logit_sum [n, 1]`: the sum of each row of `logits` (`[n, vocab]` with `keep_dims`,
/// else `[n, 1, vocab]`), NaN or +inf where the row holds a NaN or +inf (while -inf
/// logits, masked tokens, only make it -inf): what [`add_non_finite_check`] looks at.
fn add_logit_sum(graph: &mut Graph, logits: &str, keep_dims: bool) -> Result<(), BackendError> {
    add_constant(graph, "last_axis", &[1], &[-1i64])?;
    add_node(
        graph,
        "ReduceSum",
        &[logits, "last_axis"],
        "logit_sum",
        vec![Attribute::new("keepdims", i64::from(keep_dims))?],
    )
}

/// `token_ids [n, 1]`: `chosen [n, 1]`, or [`NON_FINITE_LOGITS`] where `probe [n, 1]`
/// (a sum over the row's logits or probabilities) is NaN or +inf: where it is not
/// below +inf (two nodes: a run costs each node's overhead).
fn add_non_finite_check(graph: &mut Graph, probe: &str, chosen: &str) -> Result<(), BackendError> {
    add_constant(graph, "non_finite_id", &[], &[NON_FINITE_LOGITS])?;
    add_constant(graph, "infinity", &[], &[f32::INFINITY])?;
    add_node(
        graph,
        "Less",
        &[probe, "infinity"],
        "probe_is_finite",
        vec![],
    )?;
    add_node(
        graph,
        "Where",
        &["probe_is_finite", chosen, "non_finite_id"],
        PICKER_TOKEN_IDS,
        vec![],
    )
}

/// `last_logits [n, 1, vocab]`, float32: the last position of the chosen rows of
/// `logits` (that position first: a prefill's logits hold every position; half-precision
/// logits are widened after the gathers, on the rows' last position only), and the
/// constant `last` ([-1]) that picks it.
fn add_last_position_logits(graph: &mut Graph, logits: FloatType) -> Result<(), BackendError> {
    add_constant(graph, "last", &[1], &[-1i64])?;
    add_node(
        graph,
        "Gather",
        &[PICKER_LOGITS, "last"],
        "every_last_logits",
        vec![Attribute::new("axis", 1i64)?],
    )?;
    let gathered = if logits == FloatType::F32 {
        "last_logits"
    } else {
        "last_logits_narrow"
    };
    add_node(
        graph,
        "Gather",
        &["every_last_logits", CHOOSER_ROWS],
        gathered,
        vec![Attribute::new("axis", 0i64)?],
    )?;
    if logits != FloatType::F32 {
        // 1: ONNX's FLOAT.
        let to_float = Attribute::new("to", 1i64)?;
        add_node(graph, "Cast", &[gathered], "last_logits", vec![to_float])?;
    }
    Ok(())
}

/// A tensor type whose `rank` dimensions are all dynamic.
pub(super) fn dynamic_tensor(ty: TensorElementType, rank: usize) -> ValueType {
    ValueType::Tensor {
        ty,
        shape: Shape::new(vec![-1; rank]),
        dimension_symbols: SymbolicDimensions::empty(rank),
    }
}

/// A session for a graph built here, with the decoder's options (so on its device).
pub(super) fn session_from_graph(
    graph: Graph,
    environment: &Environment,
    options: SessionOptions,
    what: &str,
) -> Result<Session, BackendError> {
    let mut model = Model::new([Opset::new(ONNX_DOMAIN, 17)?])?;
    model.set_graph(graph)?;
    model
        .into_session(&session_builder(environment, options)?)
        .map_err(|e| BackendError::onnx(format!("cannot build {what}"), e))
}

/// Inputs and output of [`token_sampler`], besides [`PICKER_LOGITS`] and
/// [`PICKER_TOKEN_IDS`]: one row per sequence, `[batch, 1]` each.
pub const SAMPLER_TEMPERATURE: &str = "temperature";
/// How many of the most likely tokens stay (`i64::MAX`: all).
pub const SAMPLER_TOP_K: &str = "top_k";
/// Probability mass of the most likely tokens that stays (`inf`: all).
pub const SAMPLER_TOP_P: &str = "top_p";
/// The draw, uniform in [0, 1), from the request's own random generator.
pub const SAMPLER_UNIFORM: &str = "uniform";
/// Divides positive (multiplies negative) logits of the tokens in the history (1: off).
pub const SAMPLER_REPETITION_PENALTY: &str = "repetition_penalty";
/// Token ids seen so far, `[batch, length]` (rows padded with one of their own ids).
pub const SAMPLER_HISTORY: &str = "history";

/// A constant of the graph.
pub(super) fn add_constant<T>(
    graph: &mut Graph,
    name: &str,
    shape: &[i64],
    values: &[T],
) -> Result<(), BackendError>
where
    T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug,
{
    let mut tensor = Tensor::<T>::new(&Allocator::default(), Shape::new(shape.to_vec()))?;
    tensor.extract_tensor_mut().1.copy_from_slice(values);
    graph.add_initializer(name, tensor, false)?;
    Ok(())
}

/// One node of the graph: `op` from `inputs` to `output`.
pub(super) fn add_node(
    graph: &mut Graph,
    op: &str,
    inputs: &[&str],
    output: &str,
    attributes: Vec<Attribute>,
) -> Result<(), BackendError> {
    graph.add_node(Node::new(
        op,
        ONNX_DOMAIN,
        output,
        inputs,
        [output],
        attributes,
    )?)?;
    Ok(())
}

/// The sampler as a graph run where the decoder runs, choosing one token per row from
/// the last position of `logits` in the order Hugging Face applies the same settings:
/// repetition penalty on the `history` tokens, temperature, top-k, top-p over the sorted
/// distribution, then the draw `uniform` against the kept mass (top-k 1 is greedy). A
/// step then moves only token ids to the host. `backend/tests/onnx_sessions.rs` checks
/// it against a plain host implementation.
pub fn token_sampler(
    environment: &Environment,
    options: SessionOptions,
    logits: FloatType,
) -> Result<Session, BackendError> {
    let mut graph = sampler_graph(
        logits,
        &[
            (SAMPLER_TOP_K, TensorElementType::Int64),
            (SAMPLER_TOP_P, TensorElementType::Float32),
        ],
    )?;
    let axis = |name: &str, value: i64| Attribute::new(name, value);
    let g = &mut graph;
    add_constant(g, "axis_0", &[1], &[0i64])?;
    add_constant(g, "zero", &[], &[0i64])?;
    add_constant(g, "minus_infinity", &[], &[f32::NEG_INFINITY])?;
    // Sorted (ties: lower id first).
    add_node(g, "Shape", &["scaled"], "vocab", vec![axis("start", 1)?])?;
    graph.add_node(Node::new(
        "TopK",
        ONNX_DOMAIN,
        "sort",
        ["scaled", "vocab"],
        ["sorted", "order"],
        [axis("axis", -1)?, axis("largest", 1)?, axis("sorted", 1)?],
    )?)?;
    let g = &mut graph;
    // Top-k: ranks at or past k drop out of the softmax.
    add_node(g, "Squeeze", &["vocab", "axis_0"], "vocab_count", vec![])?;
    add_node(g, "Range", &["zero", "vocab_count", "one"], "rank", vec![])?;
    add_node(
        g,
        "GreaterOrEqual",
        &["rank", SAMPLER_TOP_K],
        "past_k",
        vec![],
    )?;
    add_node(
        g,
        "Where",
        &["past_k", "minus_infinity", "sorted"],
        "top_k_logits",
        vec![],
    )?;
    add_node(
        g,
        "Softmax",
        &["top_k_logits"],
        "probabilities",
        vec![axis("axis", -1)?],
    )?;
    // Top-p: a token stays while the mass before it is below p.
    add_cumulative_sum(g, "probabilities", "mass_before", true)?;
    add_node(
        g,
        "GreaterOrEqual",
        &["mass_before", SAMPLER_TOP_P],
        "past_p",
        vec![],
    )?;
    add_node(
        g,
        "Where",
        &["past_p", "zero_f", "probabilities"],
        "kept",
        vec![],
    )?;
    // The draw: the first token whose cumulative mass passes uniform * kept mass.
    add_draw(g, "kept")?;
    // Rounding can leave the target at the whole mass: keep the rank inside the table.
    add_node(g, "Sub", &["vocab", "one"], "last_rank", vec![])?;
    add_node(g, "Min", &["drawn_rank", "last_rank"], "rank_drawn", vec![])?;
    add_node(
        g,
        "GatherElements",
        &["order", "rank_drawn"],
        "drawn",
        vec![axis("axis", 1)?],
    )?;
    // Top-k can drop a NaN from the draw: the check looks at every logit.
    add_logit_sum(g, "row_logits", true)?;
    add_non_finite_check(g, "logit_sum", "drawn")?;
    session_from_graph(graph, environment, options, "the token sampler")
}

/// A sampler graph's inputs (the settings every sampler takes, then `extra` ones, all
/// `[n, 1]`), its output, and the nodes every sampler shares: the rows' last position,
/// the repetition penalty on the `history` tokens, then the temperature, giving
/// `scaled [n, vocab]`; plus the constants `axis_1`, `axis_0_scalar`, `one`, `zero_f`.
fn sampler_graph(
    logits: FloatType,
    extra: &[(&str, TensorElementType)],
) -> Result<Graph, BackendError> {
    let mut graph = Graph::new()?;
    let mut inputs = vec![
        Outlet::new(PICKER_LOGITS, dynamic_tensor(logits.element_type(), 3)),
        Outlet::new(CHOOSER_ROWS, dynamic_tensor(TensorElementType::Int64, 1)),
        Outlet::new(
            SAMPLER_TEMPERATURE,
            dynamic_tensor(TensorElementType::Float32, 2),
        ),
        Outlet::new(
            SAMPLER_UNIFORM,
            dynamic_tensor(TensorElementType::Float32, 2),
        ),
        Outlet::new(
            SAMPLER_REPETITION_PENALTY,
            dynamic_tensor(TensorElementType::Float32, 2),
        ),
        Outlet::new(SAMPLER_HISTORY, dynamic_tensor(TensorElementType::Int64, 2)),
    ];
    inputs.extend(
        extra
            .iter()
            .map(|&(name, ty)| Outlet::new(name, dynamic_tensor(ty, 2))),
    );
    graph.set_inputs(inputs)?;
    graph.set_outputs([Outlet::new(
        PICKER_TOKEN_IDS,
        dynamic_tensor(TensorElementType::Int64, 2),
    )])?;
    add_last_position_logits(&mut graph, logits)?;
    add_constant(&mut graph, "axis_1", &[1], &[1i64])?;
    add_constant(&mut graph, "axis_0_scalar", &[], &[0i64])?;
    add_constant(&mut graph, "one", &[], &[1i64])?;
    add_constant(&mut graph, "zero_f", &[], &[0f32])?;
    let axis = |name: &str, value: i64| Attribute::new(name, value);
    let g = &mut graph;
    // The last position's logits, the seen tokens' penalized (a token seen twice is
    // written twice with the same value).
    add_node(
        g,
        "Squeeze",
        &["last_logits", "axis_1"],
        "row_logits",
        vec![],
    )?;
    let gather = vec![axis("axis", 1)?];
    add_node(
        g,
        "GatherElements",
        &["row_logits", SAMPLER_HISTORY],
        "seen",
        gather,
    )?;
    add_node(g, "Greater", &["seen", "zero_f"], "seen_positive", vec![])?;
    add_node(
        g,
        "Div",
        &["seen", SAMPLER_REPETITION_PENALTY],
        "seen_divided",
        vec![],
    )?;
    add_node(
        g,
        "Mul",
        &["seen", SAMPLER_REPETITION_PENALTY],
        "seen_multiplied",
        vec![],
    )?;
    add_node(
        g,
        "Where",
        &["seen_positive", "seen_divided", "seen_multiplied"],
        "seen_penalized",
        vec![],
    )?;
    add_node(
        g,
        "ScatterElements",
        &["row_logits", SAMPLER_HISTORY, "seen_penalized"],
        "penalized",
        vec![axis("axis", 1)?],
    )?;
    // Over the temperature.
    add_node(
        g,
        "Div",
        &["penalized", SAMPLER_TEMPERATURE],
        "scaled",
        vec![],
    )?;
    Ok(graph)
}

/// Sampling without top-k or top-p, as [`token_sampler`] does it but without sorting
/// the vocabulary (the sort is most of that graph's time): the repetition penalty, the
/// temperature, then the draw `uniform` against the cumulative probabilities in id
/// order. The same distribution as [`token_sampler`], though not the same token for the
/// same draw.
pub fn plain_token_sampler(
    environment: &Environment,
    options: SessionOptions,
    logits: FloatType,
) -> Result<Session, BackendError> {
    let mut graph = sampler_graph(logits, &[])?;
    let axis = |name: &str, value: i64| Attribute::new(name, value);
    let g = &mut graph;
    add_node(
        g,
        "Softmax",
        &["scaled"],
        "probabilities",
        vec![axis("axis", -1)?],
    )?;
    add_draw(g, "probabilities")?;
    add_node(g, "Shape", &["scaled"], "vocab", vec![axis("start", 1)?])?;
    add_node(g, "Sub", &["vocab", "one"], "last_id", vec![])?;
    add_node(g, "Min", &["drawn_rank", "last_id"], "drawn", vec![])?;
    // A NaN or +inf logit (or all -inf) makes every probability NaN, and so the mass.
    add_non_finite_check(g, "kept_mass", "drawn")?;
    session_from_graph(graph, environment, options, "the plain token sampler")
}

/// `output [n, vocab]`: the running sums of `input [n, vocab]` along each row
/// (`exclusive`: each place without its own value). ONNX Runtime's CPU `CumSum` along
/// the last axis goes element by element (34 µs for 8 × 2,000 here); along the first
/// axis it adds whole rows at once, so the sums run over the transpose (10 µs with both
/// transposes), in the same order and with the same results.
fn add_cumulative_sum(
    g: &mut Graph,
    input: &str,
    output: &str,
    exclusive: bool,
) -> Result<(), BackendError> {
    let transpose = || Attribute::new("perm", vec![1i64, 0]);
    let (by_id, sums_by_id) = (format!("{input}_by_id"), format!("{output}_by_id"));
    add_node(g, "Transpose", &[input], &by_id, vec![transpose()?])?;
    add_node(
        g,
        "CumSum",
        &[by_id.as_str(), "axis_0_scalar"],
        &sums_by_id,
        vec![Attribute::new("exclusive", i64::from(exclusive))?],
    )?;
    add_node(
        g,
        "Transpose",
        &[sums_by_id.as_str()],
        output,
        vec![transpose()?],
    )
}

/// `drawn_rank [n, 1]`: the first place whose cumulative mass of `kept` passes
/// `uniform` times the row's whole kept mass. The places at or below the target are
/// counted as floats (exact up to 2^24 places): ONNX Runtime's CPU `ReduceSum` over
/// int64 takes ten times as long as over floats.
fn add_draw(g: &mut Graph, kept: &str) -> Result<(), BackendError> {
    let axis = |name: &str, value: i64| Attribute::new(name, value);
    add_cumulative_sum(g, kept, "mass_through", false)?;
    add_node(
        g,
        "Gather",
        &["mass_through", "last"],
        "kept_mass",
        vec![axis("axis", 1)?],
    )?;
    add_node(g, "Mul", &[SAMPLER_UNIFORM, "kept_mass"], "target", vec![])?;
    add_node(
        g,
        "LessOrEqual",
        &["mass_through", "target"],
        "passed",
        vec![],
    )?;
    add_node(g, "Cast", &["passed"], "passed_count", vec![axis("to", 1)?])?;
    add_node(
        g,
        "ReduceSum",
        &["passed_count", "axis_1"],
        "drawn_count",
        vec![axis("keepdims", 1)?],
    )?;
    add_node(
        g,
        "Cast",
        &["drawn_count"],
        "drawn_rank",
        vec![axis("to", 7)?],
    )
}
