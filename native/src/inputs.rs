//! The purchase model's input row from a feature vector (`engine/model/inputs.py` says what
//! each input is and why; this file only computes it).
//!
//! Computed for every decision (its scorer) and every training example, where the Python
//! version built the row from about forty dict lookups and `float` calls. The operations are
//! Python's, in Python's order: each value read as `float(features.get(name, 0.0))`, the
//! rates divided by the observed days, `log1p` (the C library's, as CPython's `math.log1p`
//! calls it) of what is not negative, ratios over a denominator of at least one, scaled
//! values divided by their divisor; the discount as `d / 100` and its products with the
//! interacting inputs. `tests/unit/test_engine_fast_paths.py` holds it to a Python reference
//! bit for bit.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyFloat, PyInt, PyString};

/// `float(value)`: a float as it is, an int (or bool) converted as CPython converts it, and
/// anything else through `float` itself (a numeric string, an object with `__float__`).
fn as_float(value: &Bound<'_, PyAny>) -> PyResult<f64> {
    if let Ok(number) = value.cast_exact::<PyFloat>() {
        return Ok(number.value());
    }
    if value.is_instance_of::<PyInt>() {
        return value.extract::<f64>();
    }
    value
        .py()
        .get_type::<PyFloat>()
        .call1((value,))?
        .extract::<f64>()
}

/// `log1p(max(value, 0))` as `base_inputs` spells it: `0.0 if value < 0.0 else log1p(value)`
/// (NaN is not below 0 and stays NaN; -0.0 stays -0.0, as CPython's `log1p` keeps it).
fn log1p_of_positive(value: f64) -> f64 {
    if value < 0.0 {
        0.0
    } else if value == 0.0 {
        value
    } else {
        value.ln_1p()
    }
}

/// The discount's inputs at `discount_pct`, in the model's order: `x = discount_pct / 100`,
/// then `x * value` for each input it interacts with (`interacting`, in `INTERACTIONS` order).
/// The one spelling of them: the row the model learns from and the scorer's terms use it.
pub(crate) fn discount_inputs(
    discount_pct: f64,
    interacting: impl ExactSizeIterator<Item = f64>,
) -> Vec<f64> {
    let x = discount_pct / 100.0;
    let mut values = Vec::with_capacity(1 + interacting.len());
    values.push(x);
    values.extend(interacting.map(|value| x * value));
    values
}

/// Which features make which inputs, with the names held as Python strings (the catalogue's
/// dicts share them, so a lookup mostly compares pointers).
#[pyclass(frozen, module = "dealstream_native")]
pub struct InputPlan {
    days: Py<PyString>,
    days_max: f64,
    rates: Vec<Py<PyString>>,
    logs: Vec<Py<PyString>>,
    ratios: Vec<(Py<PyString>, Py<PyString>)>,
    plain: Vec<Py<PyString>>,
    scaled: Vec<(Py<PyString>, f64)>,
    interactions: Vec<usize>,
    width: usize,
}

impl InputPlan {
    fn read(&self, features: &Bound<'_, PyDict>, name: &Py<PyString>) -> PyResult<f64> {
        match features.get_item(name.bind(features.py()))? {
            Some(value) => as_float(&value),
            None => Ok(0.0),
        }
    }

    fn base_of(&self, features: &Bound<'_, PyDict>, extra: usize) -> PyResult<Vec<f64>> {
        let mut row = Vec::with_capacity(self.width + extra);
        let days = self.read(features, &self.days)?;
        // `1.0 if not days > 1.0 else min(days, days_max)`
        let days = if days > 1.0 {
            if self.days_max < days {
                self.days_max
            } else {
                days
            }
        } else {
            1.0
        };
        for name in &self.rates {
            row.push(log1p_of_positive(self.read(features, name)? / days));
        }
        for name in &self.logs {
            row.push(log1p_of_positive(self.read(features, name)?));
        }
        for (numerator, denominator) in &self.ratios {
            let count = self.read(features, denominator)?;
            let count = if count < 1.0 { 1.0 } else { count };
            row.push(self.read(features, numerator)? / count);
        }
        for name in &self.plain {
            row.push(self.read(features, name)?);
        }
        for (name, divisor) in &self.scaled {
            row.push(self.read(features, name)? / divisor);
        }
        Ok(row)
    }
}

#[pymethods]
impl InputPlan {
    #[new]
    #[pyo3(signature = (*, days, days_max, rates, logs, ratios, plain, scaled, interactions))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        days: String,
        days_max: f64,
        rates: Vec<String>,
        logs: Vec<String>,
        ratios: Vec<(String, String)>,
        plain: Vec<String>,
        scaled: Vec<(String, f64)>,
        interactions: Vec<usize>,
    ) -> PyResult<Self> {
        let name = |text: &String| PyString::intern(py, text).unbind();
        let width = rates.len() + logs.len() + ratios.len() + plain.len() + scaled.len();
        if let Some(slot) = interactions.iter().find(|&&slot| slot >= width) {
            return Err(PyValueError::new_err(format!(
                "interaction slot {slot} is not one of the {width} base inputs"
            )));
        }
        Ok(InputPlan {
            days: name(&days),
            days_max,
            rates: rates.iter().map(name).collect(),
            logs: logs.iter().map(name).collect(),
            ratios: ratios.iter().map(|(n, d)| (name(n), name(d))).collect(),
            plain: plain.iter().map(name).collect(),
            scaled: scaled
                .iter()
                .map(|(n, divisor)| (name(n), *divisor))
                .collect(),
            interactions,
            width,
        })
    }

    /// The behavioural inputs of `features`, in the model's order.
    fn base(&self, features: &Bound<'_, PyDict>) -> PyResult<Vec<f64>> {
        self.base_of(features, 0)
    }

    /// The whole row at `discount_pct`: the behavioural inputs, the discount `d / 100`, then
    /// its products with the interacting inputs.
    fn row(&self, features: &Bound<'_, PyDict>, discount_pct: f64) -> PyResult<Vec<f64>> {
        let mut row = self.base_of(features, 1 + self.interactions.len())?;
        let discount = discount_inputs(discount_pct, self.interactions.iter().map(|&i| row[i]));
        row.extend(discount);
        Ok(row)
    }
}
