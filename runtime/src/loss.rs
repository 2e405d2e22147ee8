//! Softmax cross-entropy with optional label smoothing (PyTorch's
//! `CrossEntropyLoss(label_smoothing=eps)`, mean over the batch).
//!
//! With `K` classes the target distribution is `q = (1 - eps) onehot(y) + eps / K`; the loss
//! of a sample is `-sum_j q_j log softmax(z)_j` and `dL/dz = (softmax(z) - q) / N`. Computed in
//! `f64` whatever the tensor type.

use crate::cpu::Error;
use crate::ops::Float;
use crate::tensor::Tensor;

/// The loss of one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct LossOutput<T> {
    /// Mean loss over the batch (NaN if a logit is not finite).
    pub loss: f64,
    /// `dL/dlogits`, shaped like the logits.
    pub dlogits: Tensor<T>,
    /// Samples whose arg-max logit (the first one on ties) is the label.
    pub correct: usize,
}

/// Mean softmax cross-entropy of `logits` (`[N, K]`, or any shape whose first dimension is
/// `N`) against `labels` (`N` class indices). `smoothing` must lie in `[0, 1]`.
///
/// Errors (never panics) when the labels do not match the batch or a label is out of range.
pub fn softmax_cross_entropy<T: Float>(
    logits: &Tensor<T>,
    labels: &[u32],
    smoothing: f64,
) -> Result<LossOutput<T>, Error> {
    let n = logits.shape.first().copied().unwrap_or(0);
    if n == 0 || !logits.data.len().is_multiple_of(n) || labels.len() != n {
        return Err(Error::Loss(format!(
            "{} labels for logits of shape {:?}",
            labels.len(),
            logits.shape
        )));
    }
    let k = logits.data.len() / n;
    if k == 0 {
        return Err(Error::Loss("logits have no classes".into()));
    }
    if !(0.0..=1.0).contains(&smoothing) {
        return Err(Error::Loss(format!(
            "label smoothing {smoothing} is outside [0, 1]"
        )));
    }
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= k) {
        return Err(Error::Loss(format!(
            "label {bad} is out of range for {k} classes"
        )));
    }
    let mut dlogits = Tensor::zeros(&logits.shape);
    let mut total = 0.0;
    let mut correct = 0;
    let inv_n = 1.0 / n as f64;
    let off = smoothing / k as f64;
    for (i, (&label, z)) in labels.iter().zip(logits.data.chunks(k)).enumerate() {
        let label = label as usize;
        let z: Vec<f64> = z.iter().map(|v| v.to_f64()).collect();
        let mut best = 0;
        for j in 1..k {
            if z[j] > z[best] {
                best = j;
            }
        }
        correct += usize::from(best == label);
        let max = z[best];
        let lse = max + z.iter().map(|&v| (v - max).exp()).sum::<f64>().ln();
        let mut loss = 0.0;
        for (j, &zj) in z.iter().enumerate() {
            let logp = zj - lse;
            let q = off + if j == label { 1.0 - smoothing } else { 0.0 };
            loss -= q * logp;
            dlogits.data[i * k + j] = T::from_f64((logp.exp() - q) * inv_n);
        }
        total += loss;
    }
    Ok(LossOutput {
        loss: total * inv_n,
        dlogits,
        correct,
    })
}
