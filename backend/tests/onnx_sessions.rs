//! ONNX Runtime sessions below Triton. The GPU path with the CPU-only ONNX Runtime: a
//! CUDA session (the decoder's, or a token-choosing graph's) must fail with a clear
//! error instead of silently running on the CPU (Triton itself refuses `KIND_GPU`
//! instances on machines without GPUs). On the CPU, the greedy picker takes the arg-max
//! of the last position, and the sampler draws the token the host sampler draws, from
//! float32, float16 and bfloat16 logits alike; rows whose logits are not finite are
//! refused; the cache merger keeps float32 and float16 caches exactly.
//!
//! Needs the ONNX Runtime library that `scripts/setup.sh` installs, or
//! `TRITON_RUST_ORT_LIBRARY` pointing at one.

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use ort::environment::Environment;
use ort::value::{DynValue, Tensor, TensorElementType};
use std::collections::HashSet;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use triton_rust::float_tensor::{FloatType, read_f32};
use triton_rust::generation::cache_rows::{
    self, JOINING, KEEP, MERGED, PAD, STAYING, SidePlan, TRIM,
};
use triton_rust::generation::decoder::{SamplerRow, uniform};
use triton_rust::generation::params::GenerationParams;
use triton_rust::generation::sampler_graphs::{
    self, CHOOSER_ROWS, NON_FINITE_LOGITS, PICKER_LOGITS, PICKER_TOKEN_IDS, SAMPLER_HISTORY,
    SAMPLER_REPETITION_PENALTY, SAMPLER_TEMPERATURE, SAMPLER_TOP_K, SAMPLER_TOP_P, SAMPLER_UNIFORM,
    TokenChooser,
};
use triton_rust::onnx::{self, Device, LibrarySource, OnnxRuntimeLibrary, SessionOptions};
use triton_rust::postprocess::{argmax, softmax};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn onnxruntime_library() -> PathBuf {
    let path = std::env::var_os("TRITON_RUST_ORT_LIBRARY").map_or_else(
        || workspace().join(".deps/onnxruntime/onnxruntime/capi/libonnxruntime.so.1.31.1"),
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "{} is missing: run scripts/setup.sh or set TRITON_RUST_ORT_LIBRARY",
        path.display()
    );
    path
}

fn environment() -> Environment {
    let library = OnnxRuntimeLibrary::Found {
        path: onnxruntime_library(),
        source: LibrarySource::Environment,
    };
    onnx::environment(&library).expect("ONNX Runtime loads")
}

fn options(device: Device) -> SessionOptions {
    SessionOptions {
        intra_op_threads: 1,
        inter_op_threads: 1,
        device,
    }
}

#[test]
fn cuda_sessions_fail_clearly_without_cuda_and_cpu_sessions_load() {
    let environment = environment();
    let model = workspace().join("model-repository/sentiment-classifier/1/model.onnx");

    let error = onnx::load_session(&environment, &model, options(Device::Cuda { device_id: 0 }))
        .expect_err("no CUDA here: the session must not fall back to CPU")
        .to_string();
    assert!(
        error.contains("the CUDA execution provider could not be enabled on GPU 0"),
        "{error}"
    );
    assert!(error.contains("onnxruntime-gpu"), "{error}");

    onnx::load_session(&environment, &model, options(Device::Cpu)).expect("CPU session loads");
}

#[test]
fn greedy_token_picker_takes_the_last_positions_arg_max() {
    let environment = environment();
    let error = sampler_graphs::greedy_token_picker(
        &environment,
        options(Device::Cuda { device_id: 0 }),
        FloatType::F32,
    )
    .expect_err("no CUDA here: the picker must not fall back to CPU")
    .to_string();
    assert!(error.contains("could not be enabled on GPU 0"), "{error}");

    for ty in LOGIT_TYPES {
        let mut picker =
            sampler_graphs::greedy_token_picker(&environment, options(Device::Cpu), ty)
                .expect("CPU picker builds");
        // [batch 2, sequence 2, vocab 3]: only the last position counts; ties go to the
        // first.
        let logits = vec![
            9.0f32, 0.0, 0.0, 0.0, 1.0, 0.5, 0.0, 0.0, 9.0, 2.0, 2.0, 1.0,
        ];
        let logits = float_tensor(ty, &[2, 2, 3], logits);
        // The rows chosen for, in the order asked.
        let rows = Tensor::from_array(([3usize], vec![1i64, 0, 1])).expect("a tensor");
        let outputs = picker
            .run(ort::inputs![PICKER_LOGITS => logits, CHOOSER_ROWS => rows])
            .expect("the picker runs");
        let (shape, ids) = outputs[PICKER_TOKEN_IDS]
            .try_extract_tensor::<i64>()
            .expect("int64 ids");
        assert_eq!(shape[..], [3, 1]);
        assert_eq!(ids, [0, 1, 0], "{ty:?}");
    }
}

/// The logits types of decoders: float32, and a half-precision export's.
const LOGIT_TYPES: [FloatType; 3] = [FloatType::F32, FloatType::F16, FloatType::Bf16];

/// `values` as `ty` (rounded to its precision).
fn float_tensor(ty: FloatType, shape: &[usize], values: Vec<f32>) -> DynValue {
    let shape = shape.to_vec();
    match ty {
        FloatType::F32 => Tensor::from_array((shape, values)).map(Tensor::into_dyn),
        FloatType::F16 => {
            let values: Vec<f16> = values.into_iter().map(f16::from_f32).collect();
            Tensor::from_array((shape, values)).map(Tensor::into_dyn)
        }
        FloatType::Bf16 => {
            let values: Vec<bf16> = values.into_iter().map(bf16::from_f32).collect();
            Tensor::from_array((shape, values)).map(Tensor::into_dyn)
        }
    }
    .expect("a float tensor")
}

/// `value` rounded to what `ty` holds, back in f32.
fn rounded(ty: FloatType, value: f32) -> f32 {
    match ty {
        FloatType::F32 => value,
        FloatType::F16 => f16::from_f32(value).to_f32(),
        FloatType::Bf16 => bf16::from_f32(value).to_f32(),
    }
}

/// The sampler written plainly on the host, step by step as Hugging Face applies the
/// settings: the reference the device graphs must agree with. Without top-k and top-p
/// the draw walks the distribution in id order (no sort), as the plain sampler does.
fn reference_token(
    logits: &mut [f32],
    history: &[i64],
    params: &GenerationParams,
    uniform: f32,
) -> i64 {
    if params.repetition_penalty != 1.0 {
        let seen: HashSet<usize> = history.iter().map(|&t| t as usize).collect();
        for token in seen {
            let logit = &mut logits[token];
            *logit = if *logit > 0.0 {
                *logit / params.repetition_penalty
            } else {
                *logit * params.repetition_penalty
            };
        }
    }
    if !params.do_sample {
        return argmax(logits).expect("logits") as i64;
    }
    for logit in logits.iter_mut() {
        *logit /= params.temperature;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    if SamplerRow::chooser(params) == TokenChooser::Sorted {
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    }
    if params.top_k > 0 {
        order.truncate(params.top_k);
    }
    let kept: Vec<f32> = order.iter().map(|&i| logits[i]).collect();
    let mut probabilities = softmax(&kept);
    if params.top_p < 1.0 {
        let mut total = 0.0;
        let keep = probabilities
            .iter()
            .position(|&p| {
                total += p;
                total >= params.top_p
            })
            .map_or(probabilities.len(), |last| last + 1);
        probabilities.truncate(keep);
    }
    let mut target = uniform * probabilities.iter().sum::<f32>();
    for (rank, p) in probabilities.iter().enumerate() {
        if target < *p {
            return order[rank] as i64;
        }
        target -= p;
    }
    order[probabilities.len() - 1] as i64
}

#[test]
fn token_samplers_choose_what_the_reference_chooses() {
    let environment = environment();
    for build in [
        sampler_graphs::token_sampler,
        sampler_graphs::plain_token_sampler,
    ] {
        let error = build(
            &environment,
            options(Device::Cuda { device_id: 0 }),
            FloatType::F32,
        )
        .expect_err("no CUDA here: a sampler must not fall back to CPU")
        .to_string();
        assert!(error.contains("could not be enabled on GPU 0"), "{error}");
    }
    for ty in LOGIT_TYPES {
        samplers_choose_what_the_reference_chooses(&environment, ty);
    }
}

fn samplers_choose_what_the_reference_chooses(environment: &Environment, ty: FloatType) {
    let mut sorted = sampler_graphs::token_sampler(environment, options(Device::Cpu), ty)
        .expect("CPU sampler builds");
    let mut plain = sampler_graphs::plain_token_sampler(environment, options(Device::Cpu), ty)
        .expect("CPU plain sampler builds");

    const VOCAB: usize = 50;
    const ROWS: usize = 200;
    const HISTORY: usize = 6;
    // (do_sample, temperature, top_k, top_p, repetition_penalty)
    let settings = [
        (true, 0.7, 0, 1.0, 1.0),
        (true, 1.3, 5, 1.0, 1.0),
        (true, 1.0, 0, 0.9, 1.0),
        (true, 0.5, 20, 0.8, 1.0),
        (true, 2.0, 1, 1.0, 1.0),
        (true, 1.0, 10, 0.95, 1.8),
        (true, 0.9, 0, 1.0, 1.5),
        (false, 0.7, 0, 1.0, 1.0),
        (false, 0.7, 0, 1.0, 4.0),
        (false, 0.7, 0, 1.0, 0.5),
    ];
    for (case, (do_sample, temperature, top_k, top_p, repetition_penalty)) in
        settings.into_iter().enumerate()
    {
        let params = GenerationParams {
            do_sample,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            ..Default::default()
        };
        let row = SamplerRow::new(&params);
        let mut noise = ChaCha8Rng::seed_from_u64(case as u64 + 1000);
        // Two positions per row: the sampler must use the last one.
        // What the model's type holds: the reference sees the values the graph sees.
        let logits: Vec<f32> = (0..ROWS * 2 * VOCAB)
            .map(|_| rounded(ty, (uniform(&mut noise) - 0.5) * 8.0))
            .collect();
        // Seen tokens, with repeats (counted once).
        let history: Vec<i64> = (0..ROWS * HISTORY)
            .map(|_| (noise.next_u64() % 12) as i64)
            .collect();
        let uniforms: Vec<f32> = (0..ROWS)
            .map(|r| {
                if row.draws {
                    uniform(&mut ChaCha8Rng::seed_from_u64(r as u64))
                } else {
                    0.0
                }
            })
            .collect();
        // Every other row, last first: the graph gathers the rows it is asked for.
        let rows: Vec<usize> = (0..ROWS).rev().step_by(2).collect();
        let expected: Vec<i64> = rows
            .iter()
            .map(|&r| {
                let start = (r * 2 + 1) * VOCAB;
                reference_token(
                    &mut logits[start..start + VOCAB].to_vec(),
                    &history[r * HISTORY..(r + 1) * HISTORY],
                    &params,
                    uniforms[r],
                )
            })
            .collect();
        let count = rows.len();
        let column = |value: f32| Tensor::from_array(([count, 1], vec![value; count]));
        let picked_uniforms: Vec<f32> = rows.iter().map(|&r| uniforms[r]).collect();
        // The history of the chosen rows only, as the backend sends it.
        let picked_history: Vec<i64> = rows
            .iter()
            .flat_map(|&r| history[r * HISTORY..(r + 1) * HISTORY].iter().copied())
            .collect();
        let picked_rows: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let mut inputs = ort::inputs![
            PICKER_LOGITS => float_tensor(ty, &[ROWS, 2, VOCAB], logits),
            CHOOSER_ROWS => Tensor::from_array(([count], picked_rows)).expect("rows"),
            SAMPLER_TEMPERATURE => column(row.temperature).expect("t"),
            SAMPLER_UNIFORM => Tensor::from_array(([count, 1], picked_uniforms)).expect("u"),
            SAMPLER_REPETITION_PENALTY => column(row.repetition_penalty).expect("r"),
            SAMPLER_HISTORY => Tensor::from_array(([count, HISTORY], picked_history)).expect("h"),
        ];
        let sampler = match SamplerRow::chooser(&params) {
            TokenChooser::Plain => &mut plain,
            TokenChooser::Sorted | TokenChooser::Greedy => {
                inputs.push((
                    SAMPLER_TOP_K.into(),
                    Tensor::from_array(([count, 1], vec![row.top_k; count]))
                        .expect("k")
                        .into(),
                ));
                inputs.push((SAMPLER_TOP_P.into(), column(row.top_p).expect("p").into()));
                &mut sorted
            }
        };
        let outputs = sampler.run(inputs).expect("the sampler runs");
        let (shape, ids) = outputs[PICKER_TOKEN_IDS]
            .try_extract_tensor::<i64>()
            .expect("int64 ids");
        assert_eq!(shape[..], [count as i64, 1]);
        assert_eq!(ids, expected, "{ty:?}, settings {case}: {params:?}");
    }
}

#[test]
fn every_token_chooser_refuses_rows_whose_logits_are_not_finite() {
    let environment = environment();
    for ty in LOGIT_TYPES {
        non_finite_rows_are_refused(&environment, ty);
    }
}

fn non_finite_rows_are_refused(environment: &Environment, ty: FloatType) {
    const VOCAB: usize = 6;
    // One position per row: finite; one NaN; one +inf; -inf for masked tokens (finite
    // otherwise, so a token is chosen); every logit NaN.
    let rows: [[f32; VOCAB]; 5] = [
        [0.1, 3.0, 0.2, 0.0, -1.0, 0.5],
        [0.1, 3.0, f32::NAN, 0.0, -1.0, 0.5],
        [0.1, 3.0, 0.2, f32::INFINITY, -1.0, 0.5],
        [f32::NEG_INFINITY, 3.0, 0.2, f32::NEG_INFINITY, -1.0, 0.5],
        [f32::NAN; VOCAB],
    ];
    let count = rows.len();
    let logits = || float_tensor(ty, &[count, 1, VOCAB], rows.concat());
    let chosen = || Tensor::from_array(([count], (0..count as i64).collect::<Vec<_>>()));
    let column = |value: f32| Tensor::from_array(([count, 1], vec![value; count]));
    let refused = NON_FINITE_LOGITS;

    let mut picker = sampler_graphs::greedy_token_picker(environment, options(Device::Cpu), ty)
        .expect("CPU picker builds");
    let outputs = picker
        .run(ort::inputs![PICKER_LOGITS => logits(), CHOOSER_ROWS => chosen().expect("rows")])
        .expect("the picker runs");
    let (_, ids) = outputs[PICKER_TOKEN_IDS]
        .try_extract_tensor::<i64>()
        .expect("ids");
    assert_eq!(ids, [1, refused, refused, 1, refused], "greedy, {ty:?}");

    for (name, build, sorted) in [
        (
            "plain",
            sampler_graphs::plain_token_sampler as fn(_, _, _) -> _,
            false,
        ),
        ("sorted", sampler_graphs::token_sampler, true),
    ] {
        let mut sampler = build(environment, options(Device::Cpu), ty).expect("sampler builds");
        let mut inputs = ort::inputs![
            PICKER_LOGITS => logits(),
            CHOOSER_ROWS => chosen().expect("rows"),
            SAMPLER_TEMPERATURE => column(1.0).expect("t"),
            SAMPLER_UNIFORM => column(0.999).expect("u"),
            SAMPLER_REPETITION_PENALTY => column(1.3).expect("r"),
            SAMPLER_HISTORY => Tensor::from_array(([count, 1], vec![2i64; count])).expect("h"),
        ];
        if sorted {
            inputs.push((
                SAMPLER_TOP_K.into(),
                Tensor::from_array(([count, 1], vec![2i64; count]))
                    .expect("k")
                    .into(),
            ));
            inputs.push((
                SAMPLER_TOP_P.into(),
                column(f32::INFINITY).expect("p").into(),
            ));
        }
        let outputs = sampler.run(inputs).expect("the sampler runs");
        let (_, ids) = outputs[PICKER_TOKEN_IDS]
            .try_extract_tensor::<i64>()
            .expect("ids");
        for (row, &id) in ids.iter().enumerate() {
            let finite = rows[row]
                .iter()
                .all(|v| v.is_finite() || *v == f32::NEG_INFINITY);
            if finite {
                assert!((0..VOCAB as i64).contains(&id), "{name}, row {row}: {id}");
                assert!(
                    rows[row][id as usize].is_finite(),
                    "{name}, row {row}: {id}"
                );
            } else {
                assert_eq!(id, refused, "{name}, row {row}");
            }
        }
    }
}

/// A cache of `rows` rows, 2 heads, `width` columns and head size 3, every value
/// distinct (`base` + its index).
fn cache(rows: usize, width: usize, base: f32) -> Vec<f32> {
    (0..rows * 2 * width * 3).map(|i| base + i as f32).collect()
}

/// What the merger must give for one side: each kept row's columns after `trim`,
/// behind `pad` zero columns.
fn expected_side(values: &[f32], width: usize, plan: &SidePlan) -> Vec<f32> {
    let row_size = 2 * width * 3;
    let mut out = Vec::new();
    for &row in &plan.keep {
        let row = &values[row as usize * row_size..(row as usize + 1) * row_size];
        for head in row.chunks(width * 3) {
            out.extend(std::iter::repeat_n(0.0, plan.pad * 3));
            out.extend_from_slice(&head[plan.trim * 3..]);
        }
    }
    out
}

#[test]
fn cache_merger_keeps_rows_trims_shared_padding_and_left_pads_to_one_width() {
    let environment = environment();
    // bfloat16 is left out: ONNX Runtime's CPU Pad has no kernel for it (the decoder
    // refuses such a cache on CPU).
    for ty in [FloatType::F32, FloatType::F16] {
        merges_caches(&environment, ty);
    }
}

fn merges_caches(environment: &Environment, ty: FloatType) {
    let mut merger =
        cache_rows::cache_merger(environment, options(Device::Cpu), 2, ty).expect("merger builds");
    /// Each side's (rows, width), and its kept rows with their padding.
    type Case<'a> = ((usize, usize), (usize, usize), [&'a [(usize, usize)]; 2]);
    let cases: [Case<'_>; 3] = [
        // Rows 0 and 2 stay (1 and 2 padding columns), joining row 1 (none) comes in.
        ((3, 4), (2, 5), [&[(0, 1), (2, 2)], &[(1, 0)]]),
        // Sequences leave: nothing joins.
        ((3, 6), (0, 0), [&[(1, 3)], &[]]),
        // The first requests join an empty batch.
        ((0, 0), (2, 3), [&[], &[(0, 1), (1, 0)]]),
    ];
    for ((rows, width), (joining_rows, joining_width), kept) in cases {
        let staying = cache(rows, width, 1.0);
        let joining = cache(joining_rows, joining_width, 1000.0);
        let (plans, merged_width) = cache_rows::plan_merge([width, joining_width], kept);
        // Two cache tensors per side (the second one's values offset), merged in one run.
        let mut inputs: Vec<(String, ort::value::DynValue)> = Vec::new();
        for (side, (rows, width, values)) in [
            (STAYING, (rows, width, &staying)),
            (JOINING, (joining_rows, joining_width, &joining)),
        ] {
            for tensor in 0..2 {
                let offset = tensor as f32 * 0.5;
                let shifted: Vec<f32> = values.iter().map(|v| v + offset).collect();
                inputs.push((
                    cache_rows::cache_tensor(side, tensor),
                    float_tensor(ty, &[rows, 2, width, 3], shifted),
                ));
            }
        }
        for (side, plan) in [STAYING, JOINING].into_iter().zip(&plans) {
            let long = |values: Vec<i64>| {
                Tensor::from_array(([values.len()], values))
                    .expect("tensor")
                    .into_dyn()
            };
            inputs.push((cache_rows::side_input(side, KEEP), long(plan.keep.clone())));
            inputs.push((
                cache_rows::side_input(side, TRIM),
                long(vec![plan.trim as i64]),
            ));
            inputs.push((
                cache_rows::side_input(side, PAD),
                long(vec![plan.pad as i64]),
            ));
        }
        let outputs = merger.run(inputs).expect("the merger runs");
        let merged_rows = plans[0].keep.len() + plans[1].keep.len();
        let mut expected = expected_side(&staying, width, &plans[0]);
        expected.extend(expected_side(&joining, joining_width, &plans[1]));
        for tensor in 0..2 {
            let (shape, merged) =
                read_f32(&outputs[cache_rows::cache_tensor(MERGED, tensor).as_str()])
                    .expect("a float output");
            assert_eq!(shape[..], [merged_rows as i64, 2, merged_width as i64, 3]);
            // Padding stays 0; every kept value carries its tensor's offset.
            let offset = tensor as f32 * 0.5;
            let wanted: Vec<f32> = expected
                .iter()
                .map(|&v| {
                    if v == 0.0 {
                        0.0
                    } else {
                        rounded(ty, v + offset)
                    }
                })
                .collect();
            assert_eq!(
                merged[..],
                wanted[..],
                "{ty:?}, case {kept:?}, tensor {tensor}"
            );
        }
    }
}

#[test]
fn half_tensors_read_as_the_f32_they_hold() {
    let _environment = environment();
    let values = [0.5f32, -2.0, 65504.0, f32::INFINITY];
    let f16s: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
    let bf16s: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
    for value in [
        Tensor::from_array(([2usize, 2], values.to_vec()))
            .expect("f32")
            .into_dyn(),
        Tensor::from_array(([2usize, 2], f16s))
            .expect("f16")
            .into_dyn(),
        Tensor::from_array(([2usize, 2], bf16s))
            .expect("bf16")
            .into_dyn(),
    ] {
        let (shape, read) = read_f32(&value).expect("a float tensor");
        assert_eq!(shape[..], [2, 2]);
        // 65504 (f16's largest) rounds to 65536 in bfloat16's 8-bit mantissa.
        let expected = if value.dtype().tensor_type() == Some(TensorElementType::Bfloat16) {
            [0.5, -2.0, 65536.0, f32::INFINITY]
        } else {
            values
        };
        assert_eq!(read[..], expected);
    }
    let ints = Tensor::from_array(([1usize], vec![1i64]))
        .expect("i64")
        .into_dyn();
    let error = read_f32(&ints).expect_err("not a float tensor").to_string();
    assert!(error.contains("not a float tensor"), "{error}");
}

#[test]
fn empty_tensors_take_the_type() {
    let _environment = environment();
    for ty in [FloatType::F32, FloatType::F16, FloatType::Bf16] {
        let tensor = ty.empty_tensor(vec![2, 3, 0, 4]).expect("an empty tensor");
        assert_eq!(tensor.dtype().tensor_type(), Some(ty.element_type()));
    }
}
