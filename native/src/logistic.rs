//! The purchase model's arithmetic: River 0.26.1's `StandardScaler | LogisticRegression`
//! learning step and its linear score, in River's order of operations.
//!
//! `engine/model/logistic.py` (the learning step) and `engine/model/scoring.py` (scores and
//! their terms) say what each step is and keep the River pipeline this mirrors; this file only
//! computes. `tests/unit/test_logistic_step.py` and `tests/unit/test_engine_fast_paths.py` hold
//! it to River's `learn_one` and `predict_proba_one` bit for bit. Every operation is a plain
//! IEEE double operation in the same order as Python's, and the two transcendental calls
//! (`powf(0.5)` for the standard deviation, `exp`) are the C library's `pow` and `exp`, which
//! CPython's `float.__pow__` and `math.exp` call too.

use std::cmp::Ordering;
use std::hint::black_box;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple};

use crate::inputs::discount_inputs;

/// `var ** 0.5` as CPython computes it: the C library's `pow`. LLVM would turn a visible
/// `pow(x, 0.5)` into `sqrt(x)`, which can differ in the last bit.
#[inline]
fn standard_deviation(var: f64) -> f64 {
    var.powf(black_box(0.5))
}

/// A model's parameters per input, frozen: the linear score's terms.
#[pyclass(frozen, module = "dealstream_native")]
pub struct LinearTerms {
    means: Vec<f64>,
    /// `var ** 0.5`, or `None` where the variance is 0 (the input then scales to 0).
    sds: Vec<Option<f64>>,
    weights: Vec<f64>,
    #[pyo3(get)]
    intercept: f64,
}

impl LinearTerms {
    fn check(&self, start: usize, count: usize) -> PyResult<()> {
        if start + count > self.weights.len() {
            return Err(PyValueError::new_err(format!(
                "{} values from input {} pass the model's {} inputs",
                count,
                start,
                self.weights.len()
            )));
        }
        Ok(())
    }

    #[inline]
    fn term(&self, i: usize, x: f64) -> f64 {
        let scaled = match self.sds[i] {
            Some(sd) => (x - self.means[i]) / sd,
            None => 0.0,
        };
        self.weights[i] * scaled
    }
}

#[pymethods]
impl LinearTerms {
    #[new]
    fn new(
        means: Vec<f64>,
        sds: Vec<Option<f64>>,
        weights: Vec<f64>,
        intercept: f64,
    ) -> PyResult<Self> {
        if means.len() != weights.len() || sds.len() != weights.len() {
            return Err(PyValueError::new_err(
                "means, sds and weights must have one value per input",
            ));
        }
        Ok(Self {
            means,
            sds,
            weights,
            intercept,
        })
    }

    /// `total` plus the terms `weight * scaled value` of inputs `start, start + 1, ...`,
    /// added left to right.
    fn total(&self, values: Vec<f64>, start: usize, total: f64) -> PyResult<f64> {
        self.check(start, values.len())?;
        let mut total = total;
        for (offset, x) in values.into_iter().enumerate() {
            total += self.term(start + offset, x);
        }
        Ok(total)
    }

    /// The terms of `total`, and the same sum.
    fn products(&self, values: Vec<f64>, start: usize, total: f64) -> PyResult<(Vec<f64>, f64)> {
        self.check(start, values.len())?;
        let mut total = total;
        let mut products = Vec::with_capacity(values.len());
        for (offset, x) in values.into_iter().enumerate() {
            let product = self.term(start + offset, x);
            products.push(product);
            total += product;
        }
        Ok((products, total))
    }

    /// `total` plus the terms of the discount's inputs at `discount_pct` (inputs `start`,
    /// `start + 1, ...`; `interacting`: the base inputs the discount interacts with).
    fn discount_total(
        &self,
        interacting: Vec<f64>,
        discount_pct: f64,
        start: usize,
        total: f64,
    ) -> PyResult<f64> {
        self.total(
            discount_inputs(discount_pct, interacting.into_iter()),
            start,
            total,
        )
    }

    /// `products` of the discount's inputs at `discount_pct` (as `discount_total` takes them).
    fn discount_products(
        &self,
        interacting: Vec<f64>,
        discount_pct: f64,
        start: usize,
        total: f64,
    ) -> PyResult<(Vec<f64>, f64)> {
        self.products(
            discount_inputs(discount_pct, interacting.into_iter()),
            start,
            total,
        )
    }

    #[getter]
    fn weights<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.weights)
    }
}

/// The model's input names, held once: ranks a score's terms by magnitude (an offer's reasons).
#[pyclass(frozen, module = "dealstream_native")]
pub struct TermNames {
    names: Vec<String>,
    objects: Vec<Py<PyString>>,
}

/// `round(x, 6)` as CPython computes it: the decimal correctly rounded (ties to even on the
/// exact binary value), read back as the nearest double. Rust's fixed-precision formatting
/// rounds the exact value the same way.
fn round6(x: f64) -> f64 {
    format!("{x:.6}").parse().unwrap_or(x)
}

#[pymethods]
impl TermNames {
    #[new]
    fn new(py: Python<'_>, names: Vec<String>) -> Self {
        let objects = names
            .iter()
            .map(|name| PyString::new(py, name).unbind())
            .collect();
        TermNames { names, objects }
    }

    /// The `top` largest terms (one per name, in the names' order) by magnitude, then by name,
    /// each `(name, round(term, 6))`: what `sorted(..., key=lambda t: (-abs(t[1]), t[0]))`
    /// gives.
    fn top(
        &self,
        py: Python<'_>,
        products: Vec<f64>,
        top: usize,
    ) -> PyResult<Vec<(Py<PyString>, f64)>> {
        if products.len() != self.names.len() {
            return Err(PyValueError::new_err(format!(
                "{} terms for {} names",
                products.len(),
                self.names.len()
            )));
        }
        let mut order: Vec<usize> = (0..products.len()).collect();
        order.sort_by(|&a, &b| {
            products[b]
                .abs()
                .partial_cmp(&products[a].abs())
                .unwrap_or(Ordering::Equal)
                .then_with(|| self.names[a].cmp(&self.names[b]))
        });
        Ok(order
            .into_iter()
            .take(top)
            .map(|i| (self.objects[i].clone_ref(py), round6(products[i])))
            .collect())
    }
}

/// The running scaler's statistics and the classifier's parameters, and the learning step.
#[pyclass(module = "dealstream_native")]
pub struct LogisticStep {
    counts: Vec<f64>,
    means: Vec<f64>,
    variances: Vec<f64>,
    sds: Vec<Option<f64>>,
    weights: Vec<f64>,
    #[pyo3(get)]
    intercept: f64,
    #[pyo3(get)]
    n_iterations: u64,
    lr: f64,
    intercept_lr: f64,
    l2: f64,
    clip: f64,
    weight_pos: f64,
    weight_neg: f64,
}

#[pymethods]
impl LogisticStep {
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (*, counts, means, variances, weights, intercept, n_iterations, lr, intercept_lr, l2, clip, weight_pos, weight_neg))]
    fn new(
        counts: Vec<f64>,
        means: Vec<f64>,
        variances: Vec<f64>,
        weights: Vec<f64>,
        intercept: f64,
        n_iterations: u64,
        lr: f64,
        intercept_lr: f64,
        l2: f64,
        clip: f64,
        weight_pos: f64,
        weight_neg: f64,
    ) -> PyResult<Self> {
        let inputs = weights.len();
        if counts.len() != inputs || means.len() != inputs || variances.len() != inputs {
            return Err(PyValueError::new_err(
                "counts, means, variances and weights must have one value per input",
            ));
        }
        let sds = variances
            .iter()
            .map(|&var| {
                if var != 0.0 {
                    Some(standard_deviation(var))
                } else {
                    None
                }
            })
            .collect();
        Ok(Self {
            counts,
            means,
            variances,
            sds,
            weights,
            intercept,
            n_iterations,
            lr,
            intercept_lr,
            l2,
            clip,
            weight_pos,
            weight_neg,
        })
    }

    /// One step on input row `x` with label `y` and sample weight `w`.
    fn learn(&mut self, x: Vec<f64>, y: bool, w: f64) -> PyResult<()> {
        let inputs = self.weights.len();
        if x.len() != inputs {
            return Err(PyValueError::new_err(format!(
                "an input row has {} values, not {}",
                inputs,
                x.len()
            )));
        }
        // The scaler learns first, then transforms with the updated statistics.
        let mut scaled = Vec::with_capacity(inputs);
        let mut dot = 0.0_f64;
        for (i, &xi) in x.iter().enumerate() {
            let n = self.counts[i] + 1.0;
            self.counts[i] = n;
            let old = self.means[i];
            let delta = xi - old;
            let mean = old + delta / n;
            self.means[i] = mean;
            let var = self.variances[i];
            let var = var + (delta * (xi - mean) - var) / n;
            self.variances[i] = var;
            let value = if var != 0.0 {
                let sd = standard_deviation(var);
                self.sds[i] = Some(sd);
                (xi - mean) / sd
            } else {
                self.sds[i] = None;
                0.0
            };
            scaled.push(value);
            dot += self.weights[i] * value;
        }
        // optim.losses.Log.gradient(y_true, y_pred=raw) with its cut-offs at |z| = 18.
        let (sign, weight) = if y {
            (1.0_f64, self.weight_pos)
        } else {
            (-1.0_f64, self.weight_neg)
        };
        let z = (dot + self.intercept) * sign;
        let mut gradient = if z > 18.0 {
            weight * (-z).exp() * -sign
        } else if z < -18.0 {
            weight * -sign
        } else {
            weight * -sign / (z.exp() + 1.0)
        };
        gradient *= w;
        let clip = self.clip;
        if clip < gradient {
            gradient = clip;
        }
        if -clip > gradient {
            gradient = -clip;
        }
        self.intercept -= self.intercept_lr * gradient;
        let (lr, l2) = (self.lr, self.l2);
        if l2 != 0.0 {
            for (wi, value) in self.weights.iter_mut().zip(&scaled) {
                *wi -= lr * (value * gradient + l2 * *wi);
            }
        } else {
            for (wi, value) in self.weights.iter_mut().zip(&scaled) {
                *wi -= lr * (value * gradient);
            }
        }
        self.n_iterations += 1;
        Ok(())
    }

    /// The parameters as they stand, frozen.
    fn terms(&self) -> LinearTerms {
        LinearTerms {
            means: self.means.clone(),
            sds: self.sds.clone(),
            weights: self.weights.clone(),
            intercept: self.intercept,
        }
    }

    #[getter]
    fn counts(&self) -> Vec<f64> {
        self.counts.clone()
    }

    #[getter]
    fn means(&self) -> Vec<f64> {
        self.means.clone()
    }

    #[getter]
    fn variances(&self) -> Vec<f64> {
        self.variances.clone()
    }

    #[getter]
    fn weights(&self) -> Vec<f64> {
        self.weights.clone()
    }
}
