//! Numeric post-processing of model outputs: softmax, arg-max, masked mean pooling.

use ndarray::{Array2, ArrayView2, ArrayView3, Axis};

/// Numerically stable softmax of one row of logits.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Index of the largest value (the first one on ties); `None` for an empty row.
pub fn argmax(values: &[f32]) -> Option<usize> {
    values
        .iter()
        .enumerate()
        .fold(None, |best: Option<(usize, f32)>, (i, &v)| match best {
            Some((_, b)) if b >= v => best,
            _ => Some((i, v)),
        })
        .map(|(i, _)| i)
}

/// Mean of the hidden states over positions where the mask is set, then scaled to unit
/// L2 norm, as sentence-transformers does: `[batch, seq, hidden]` → `[batch, hidden]`.
pub fn mean_pool_normalized(hidden: ArrayView3<f32>, mask: ArrayView2<i64>) -> Array2<f32> {
    let (batch, _, width) = hidden.dim();
    let mut pooled = Array2::<f32>::zeros((batch, width));
    for (b, mut out) in pooled.axis_iter_mut(Axis(0)).enumerate() {
        let mut count = 0f32;
        for (s, row) in hidden.index_axis(Axis(0), b).axis_iter(Axis(0)).enumerate() {
            if mask[[b, s]] != 0 {
                out += &row;
                count += 1.0;
            }
        }
        out /= count.max(1e-9);
        let norm = out.dot(&out).sqrt().max(1e-12);
        out /= norm;
    }
    pooled
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array3, array};

    #[test]
    fn softmax_is_stable_and_sums_to_one() {
        let probs = softmax(&[1000.0, 1000.0, 998.0]);
        let sum: f32 = probs.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6);
        assert!((probs[0] - probs[1]).abs() < 1e-7);
        // e^0 / (2 e^0 + e^-2)
        assert!((probs[0] - 0.468_311_4).abs() < 1e-5, "{probs:?}");
    }

    #[test]
    fn argmax_picks_first_maximum() {
        assert_eq!(argmax(&[0.1, 0.7, 0.7, 0.2]), Some(1));
        assert_eq!(argmax(&[]), None);
    }

    #[test]
    fn mean_pooling_ignores_masked_positions_and_normalizes() {
        let hidden = Array3::from_shape_vec(
            (2, 3, 2),
            vec![
                3.0, 0.0, 1.0, 4.0, 100.0, 100.0, 0.0, 2.0, 9.0, 9.0, 9.0, 9.0,
            ],
        )
        .expect("shape");
        let mask = array![[1i64, 1, 0], [1, 0, 0]];
        let pooled = mean_pool_normalized(hidden.view(), mask.view());
        // Row 0: mean of (3,0) and (1,4) = (2,2) → (0.7071, 0.7071); row 1: (0,2) → (0,1).
        let half = std::f32::consts::FRAC_1_SQRT_2;
        let expected = array![[half, half], [0.0, 1.0]];
        for (a, b) in pooled.iter().zip(expected.iter()) {
            assert!((a - b).abs() < 1e-6, "{pooled:?}");
        }
    }
}
