//! dealstream's compiled hot-path pieces.
//!
//! `RecordEncoder` writes a user's feature record in the byte format that
//! `streams/adapters/feature_record.py` defines and decodes. The worker encodes every user a
//! micro-batch touches, and the same loop in Python cost about a sixth of the worker's CPU.
//! What a field name means stays in Python: the encoder asks the module's `field_code` once
//! per distinct name and remembers the answer; the tag numbers and time grains come from the
//! Python module too, so the format is defined in one place.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyFloat, PyString, PyTuple};

/// Integers a double holds exactly: what may be coded as an integer.
const EXACT: f64 = 9_007_199_254_740_992.0; // 2**53

/// The record format's tag numbers, as the Python module declares them.
#[derive(Clone, Copy)]
struct Tags {
    format: u8,
    category: u8,
    count: u8,
    offer: u8,
    lt: u8,
    any: u8,
}

/// FNV-1a: field names are short, and SipHash (the default) cost more than the rest of a
/// field's encoding. The memo's keys are our own field names, so flooding is not a concern.
#[derive(Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut hash = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for &byte in bytes {
            hash = (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = hash;
    }
}

/// Field name -> its code's position in `codes`.
#[derive(Default)]
struct Memo {
    index: HashMap<String, usize, BuildHasherDefault<Fnv>>,
    codes: Vec<Code>,
}

/// How one field name is coded: `field_code(name)` of the Python module.
struct Code {
    tag: u8,
    index: i64,
    slot: usize,
    /// The category of a category field (UTF-8); unused otherwise.
    text: Vec<u8>,
}

/// Encodes feature records; one per process (it memoises field codes).
#[pyclass(unsendable, module = "dealstream_native")]
struct RecordEncoder {
    tags: Tags,
    slot_ms: [i64; 4],
    offer_time_scale: i64,
    memo_max: usize,
    field_code: Py<PyAny>,
    memo: RefCell<Memo>,
}

fn varint(out: &mut Vec<u8>, mut value: u128) {
    while value > 0x7F {
        out.push((value as u8 & 0x7F) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn zvarint(out: &mut Vec<u8>, value: i128) {
    let zigzag = if value >= 0 {
        (value as u128) << 1
    } else {
        (((-value) as u128) << 1) - 1
    };
    varint(out, zigzag);
}

/// An integral double that an i64 holds exactly, and not -0.0.
fn exact_int(value: f64) -> bool {
    value.fract() == 0.0
        && value > -EXACT
        && value < EXACT
        && !(value == 0.0 && value.is_sign_negative())
}

fn number(value: &Bound<'_, PyAny>) -> PyResult<f64> {
    match value.cast::<PyFloat>() {
        Ok(float) => Ok(float.value()),
        Err(_) => value.extract::<f64>(),
    }
}

impl RecordEncoder {
    fn any(&self, out: &mut Vec<u8>, name: &[u8], value: f64) {
        out.push(self.tags.any);
        varint(out, name.len() as u128);
        out.extend_from_slice(name);
        out.extend_from_slice(&value.to_be_bytes());
    }

    fn learn(&self, py: Python<'_>, name: &str) -> PyResult<usize> {
        let code = self.field_code.bind(py).call1((name,))?;
        let code = code.cast::<PyTuple>()?;
        let code = Code {
            tag: code.get_item(0)?.extract()?,
            index: code.get_item(1)?.extract()?,
            slot: code.get_item(2)?.extract()?,
            text: code.get_item(3)?.extract::<String>()?.into_bytes(),
        };
        if code.slot >= self.slot_ms.len() {
            return Err(PyValueError::new_err(format!(
                "field {name:?}: grain slot {} out of range",
                code.slot
            )));
        }
        let mut memo = self.memo.borrow_mut();
        if memo.codes.len() >= self.memo_max {
            memo.index.clear();
            memo.codes.clear();
        }
        let position = memo.codes.len();
        memo.codes.push(code);
        memo.index.insert(name.to_owned(), position);
        Ok(position)
    }
}

#[pymethods]
impl RecordEncoder {
    #[new]
    #[pyo3(signature = (*, tags, slot_ms, offer_time_scale, memo_max, field_code))]
    fn new(
        tags: (u8, u8, u8, u8, u8, u8),
        slot_ms: [i64; 4],
        offer_time_scale: i64,
        memo_max: usize,
        field_code: Py<PyAny>,
    ) -> PyResult<Self> {
        if slot_ms.iter().any(|&ms| ms <= 0) {
            return Err(PyValueError::new_err("slot_ms must be positive"));
        }
        let (format, category, count, offer, lt, any) = tags;
        Ok(Self {
            tags: Tags { format, category, count, offer, lt, any },
            slot_ms,
            offer_time_scale,
            memo_max,
            field_code,
            memo: RefCell::new(Memo::default()),
        })
    }

    /// The record of `state` (field name -> value, in order) and `seen` (digest -> event
    /// time), as bytes. Raises TypeError for a value that is not a number.
    fn encode<'py>(
        &self,
        py: Python<'py>,
        state: &Bound<'py, PyDict>,
        seen: &Bound<'py, PyDict>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let tags = self.tags;
        let lt: i64 = match state.get_item("lt")? {
            Some(value) => {
                let value = number(&value)?;
                if value > 0.0 && value < EXACT && value.fract() == 0.0 {
                    value as i64
                } else {
                    0
                }
            }
            None => 0,
        };
        let refs: [i64; 4] = [
            lt / self.slot_ms[0],
            lt / self.slot_ms[1],
            lt / self.slot_ms[2],
            lt / self.slot_ms[3],
        ];
        let mut categories: Vec<Vec<u8>> = Vec::new();
        let mut body: Vec<u8> = Vec::with_capacity(8 * state.len() + 16);
        let mut memo = self.memo.borrow();
        for (key, value) in state.iter() {
            let name = key.cast::<PyString>()?.to_str()?;
            let position = match memo.index.get(name) {
                Some(&position) => position,
                None => {
                    // A name not seen before (or since the memo was last cleared): rare.
                    drop(memo);
                    let position = self.learn(py, name)?;
                    memo = self.memo.borrow();
                    position
                }
            };
            let code = &memo.codes[position];
            let value = number(&value)?;
            if code.tag == tags.any || !exact_int(value) {
                self.any(&mut body, name.as_bytes(), value);
                continue;
            }
            let integer = value as i128;
            let tag = code.tag;
            if tag < tags.category {
                body.push(tag);
                zvarint(&mut body, (refs[code.slot] - code.index) as i128);
                zvarint(&mut body, integer);
            } else if tag == tags.category {
                let position = match categories.iter().position(|c| *c == code.text) {
                    Some(position) => position,
                    None => {
                        categories.push(code.text.clone());
                        categories.len() - 1
                    }
                };
                body.push(tag);
                varint(&mut body, position as u128);
                zvarint(&mut body, (refs[3] - code.index) as i128);
                zvarint(&mut body, integer);
            } else if tag == tags.lt {
                if value == lt as f64 {
                    body.push(tag);
                } else {
                    self.any(&mut body, name.as_bytes(), value);
                }
            } else if tag < tags.count {
                body.push(tag);
                zvarint(&mut body, lt as i128 - integer);
            } else if tag < tags.offer {
                body.push(tag);
                zvarint(&mut body, integer);
            } else if tag == tags.offer {
                body.push(tag);
                zvarint(&mut body, lt as i128 * self.offer_time_scale as i128 - integer);
            } else {
                return Err(PyValueError::new_err(format!(
                    "field {name:?}: tag {tag} has no coding"
                )));
            }
        }

        let mut out: Vec<u8> = Vec::with_capacity(body.len() + 16 + 9 * seen.len());
        out.push(tags.format);
        varint(&mut out, lt as u128);
        varint(&mut out, categories.len() as u128);
        for category in &categories {
            varint(&mut out, category.len() as u128);
            out.extend_from_slice(category);
        }
        varint(&mut out, state.len() as u128);
        out.extend_from_slice(&body);

        let count = seen.len();
        if count == 0 {
            out.push(0);
            return Ok(PyBytes::new(py, &out));
        }
        let mut ages: Vec<i128> = Vec::with_capacity(count);
        let mut packed = true;
        let mut digests: Vec<u8> = Vec::with_capacity(count * 5);
        for (digest, ts) in seen.iter() {
            digests.extend_from_slice(digest.cast::<PyBytes>()?.as_bytes());
            let age = lt as i128 - ts.extract::<i64>()? as i128;
            packed &= (0..(1i128 << 32)).contains(&age);
            ages.push(age);
        }
        varint(&mut out, ((count as u128) << 1) | packed as u128);
        out.extend_from_slice(&digests);
        if packed {
            for age in ages {
                out.extend_from_slice(&(age as u32).to_be_bytes());
            }
        } else {
            for age in ages {
                zvarint(&mut out, age);
            }
        }
        Ok(PyBytes::new(py, &out))
    }
}

#[pymodule]
fn dealstream_native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<RecordEncoder>()?;
    Ok(())
}
