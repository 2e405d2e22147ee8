//! SGD with momentum (optionally Nesterov) and weight decay, with PyTorch's exact update
//! (`torch.optim.SGD`, dampening 0), and the learning-rate schedules.
//!
//! Update for each parameter `p` with gradient `g` (weight decay applies to every parameter,
//! as in the WRN authors' code):
//! ```text
//! g = g + wd * p
//! buf = g                          (first step)
//! buf = momentum * buf + g         (later steps)
//! g = g + momentum * buf   if nesterov,  else  g = buf
//! p = p - lr * g
//! ```
//! With `momentum == 0` there is no buffer and `p = p - lr * g`.

use std::collections::BTreeMap;

use wrnc_compiler::ast::Schedule;

use crate::cpu::Error;
use crate::ops::Float;
use crate::tensor::Tensor;

/// The optimiser and its state.
#[derive(Debug, Clone, PartialEq)]
pub struct Sgd<T = f32> {
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    /// Momentum buffers by parameter name; a parameter is absent until its first step
    /// (PyTorch's `momentum_buffer is None`). Checkpoint this to resume exactly.
    pub state: BTreeMap<String, Tensor<T>>,
}

impl<T: Float> Sgd<T> {
    pub fn new(momentum: f64, nesterov: bool, weight_decay: f64) -> Sgd<T> {
        Sgd {
            momentum,
            nesterov,
            weight_decay,
            state: BTreeMap::new(),
        }
    }

    /// One update of every parameter in `params` with learning rate `lr`. Every parameter
    /// must have a gradient of its shape in `grads` (checked before anything is changed).
    pub fn step(
        &mut self,
        params: &mut BTreeMap<String, Tensor<T>>,
        grads: &BTreeMap<String, Tensor<T>>,
        lr: f64,
    ) -> Result<(), Error> {
        for (name, p) in params.iter() {
            match grads.get(name) {
                Some(g) if g.shape == p.shape && g.data.len() == p.data.len() => {}
                Some(g) => {
                    return Err(Error::State(format!(
                        "gradient of `{name}` has shape {:?}, the parameter {:?}",
                        g.shape, p.shape
                    )))
                }
                None => return Err(Error::State(format!("no gradient for `{name}`"))),
            }
            if let Some(b) = self.state.get(name) {
                if b.data.len() != p.data.len() {
                    return Err(Error::State(format!(
                        "momentum buffer of `{name}` has shape {:?}, the parameter {:?}",
                        b.shape, p.shape
                    )));
                }
            }
        }
        let (wd, mom, lr) = (
            T::from_f64(self.weight_decay),
            T::from_f64(self.momentum),
            T::from_f64(lr),
        );
        for (name, p) in params.iter_mut() {
            let g = &grads[name];
            let mut d: Vec<T> = g
                .data
                .iter()
                .zip(&p.data)
                .map(|(&g, &p)| if wd != T::ZERO { g + wd * p } else { g })
                .collect();
            if self.momentum != 0.0 {
                match self.state.get_mut(name) {
                    Some(buf) => {
                        for (b, &d) in buf.data.iter_mut().zip(&d) {
                            *b = *b * mom + d;
                        }
                    }
                    None => {
                        self.state
                            .insert(name.clone(), Tensor::from_vec(&p.shape, d.clone()));
                    }
                }
                let buf = &self.state[name];
                if self.nesterov {
                    for (d, &b) in d.iter_mut().zip(&buf.data) {
                        *d += mom * b;
                    }
                } else {
                    d.copy_from_slice(&buf.data);
                }
            }
            for (p, &d) in p.data.iter_mut().zip(&d) {
                *p -= lr * d;
            }
        }
        Ok(())
    }
}

/// One-cycle parameters (PyTorch's `OneCycleLR` defaults: `max_lr` = the base rate).
pub const ONECYCLE_PCT_START: f64 = 0.3;
pub const ONECYCLE_DIV_FACTOR: f64 = 25.0;
pub const ONECYCLE_FINAL_DIV_FACTOR: f64 = 1e4;

fn cos_anneal(start: f64, end: f64, pct: f64) -> f64 {
    end + (start - end) / 2.0 * ((std::f64::consts::PI * pct).cos() + 1.0)
}

/// The learning rate for step `step_in_epoch` of epoch `epoch` (both from 0).
///
/// - `Step { at, gamma }`: `base * gamma^m`, `m` = number of fractions `f` in `at` with
///   `epoch >= f * total_epochs` (so the drop happens at the first epoch at or past the
///   fraction; 1e-9 tolerance for decimal fractions). Constant within an epoch.
/// - `Cosine`: `base * (1 + cos(pi t)) / 2`, `t = (epoch + step/steps_per_epoch) / total`,
///   updated every step, reaching 0 at the end.
/// - `OneCycle`: PyTorch's `OneCycleLR(max_lr=base)` with cosine annealing, 30% warm-up from
///   `base/25`, down to `base/25/1e4`, over `steps_per_epoch * total_epochs` steps (momentum
///   is not cycled).
///
/// With `steps_per_epoch == 0` or `total_epochs == 0` the base rate is returned.
pub fn lr_at(
    schedule: &Schedule,
    base_lr: f64,
    epoch: u64,
    step_in_epoch: u64,
    steps_per_epoch: u64,
    total_epochs: u64,
) -> f64 {
    if steps_per_epoch == 0 || total_epochs == 0 {
        return base_lr;
    }
    match schedule {
        Schedule::Step { at, gamma } => {
            let e = epoch as f64;
            let total = total_epochs as f64;
            let drops = at.iter().filter(|&&f| e >= f * total - 1e-9).count();
            base_lr * gamma.powi(drops as i32)
        }
        Schedule::Cosine => {
            let t = (epoch as f64 + step_in_epoch as f64 / steps_per_epoch as f64)
                / total_epochs as f64;
            base_lr * 0.5 * (1.0 + (std::f64::consts::PI * t.clamp(0.0, 1.0)).cos())
        }
        Schedule::OneCycle => {
            let total = steps_per_epoch.saturating_mul(total_epochs) as f64;
            let step = (epoch
                .saturating_mul(steps_per_epoch)
                .saturating_add(step_in_epoch) as f64)
                .min(total - 1.0);
            let initial = base_lr / ONECYCLE_DIV_FACTOR;
            let min = initial / ONECYCLE_FINAL_DIV_FACTOR;
            let warm_end = ONECYCLE_PCT_START * total - 1.0;
            let pct = |s: f64, e: f64| {
                if e > s {
                    ((step - s) / (e - s)).clamp(0.0, 1.0)
                } else {
                    1.0
                }
            };
            if step <= warm_end {
                cos_anneal(initial, base_lr, pct(0.0, warm_end))
            } else {
                cos_anneal(base_lr, min, pct(warm_end, total - 1.0))
            }
        }
    }
}
