//! dealstream's compiled hot-path pieces.
//!
//! `RecordCodec` holds what the feature records' format means (this file: its
//! configuration and memos); `record` reads and writes a user's record in the byte format
//! that `engine/features/record.py` defines and applies a micro-batch to records held as
//! bytes (the feature store's step); `context` is the pass over a user's state that a
//! feature vector starts from. What a field name means stays in Python: the codec asks the
//! module's functions once per distinct name and remembers the answer; the tag numbers, time
//! grains, retention, windows and field names come from the Python module too, so the format
//! is defined in one place.
//!
//! `logistic` holds the purchase model's arithmetic (River's learning step and linear score);
//! `inputs` builds its input row from a feature vector;
//! `values` packs a feature vector into the short text pending decisions and outbox entries
//! keep in Redis;
//! `partition` is Kafka's default partitioner;
//! `hashing` holds the BLAKE2b ids and draws of decisions and the users' keyed pseudonyms.

mod context;
mod hashing;
mod inputs;
mod logistic;
mod partition;
mod record;
mod values;

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyFloat, PyString, PyTuple};

/// Integral values decoding hands out as shared float objects (counts and most sums are small).
const SHARED_FLOATS: usize = 1024;

/// An empty dict with room for `count` items: a record's fields would otherwise grow it two
/// or three times while they are set.
pub(crate) fn presized_dict(py: Python<'_>, count: usize) -> PyResult<Bound<'_, PyDict>> {
    let size = pyo3::ffi::Py_ssize_t::try_from(count).unwrap_or(0);
    // SAFETY: the GIL is held (`py`); the call returns a new reference or NULL with an error set.
    unsafe {
        Bound::from_owned_ptr_or_err(py, pyo3::ffi::_PyDict_NewPresized(size))
            .map(|dict| dict.cast_into_unchecked())
    }
}

/// Integers a double holds exactly: what may be coded as an integer.
pub(crate) const EXACT: f64 = 9_007_199_254_740_992.0; // 2**53

/// FNV-1a: the memos' keys are short, and SipHash (the default) cost more than the rest of a
/// field's encoding. The keys are our own field names and numbers, so flooding is no concern.
#[derive(Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut hash = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for &byte in bytes {
            hash = (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = hash;
    }
}

/// A bounded memo: cleared when full (bucket indices move with time, so old entries die out
/// and the memo refills in one pass over the active users).
struct Memo<K, V> {
    map: HashMap<K, V, BuildHasherDefault<Fnv>>,
    max: usize,
}

impl<K: Hash + Eq, V> Memo<K, V> {
    fn new(max: usize) -> Self {
        Self {
            map: HashMap::default(),
            max,
        }
    }

    fn insert(&mut self, key: K, value: V) {
        if self.map.len() >= self.max {
            self.map.clear();
        }
        self.map.insert(key, value);
    }
}

/// The record format's tag numbers, as the Python module declares them.
#[derive(Clone, Copy)]
struct Tags {
    format: u8,
    category: u8,
    time: u8,
    count: u8,
    offer: u8,
    lt: u8,
    any: u8,
}

/// How one field name is coded: `field_code(name)` of the Python module.
#[derive(Clone)]
struct Code {
    tag: u8,
    index: i64,
    slot: usize,
    /// The category of a category field (UTF-8); empty otherwise.
    text: Vec<u8>,
}

/// The Python module's functions the codec asks (once per distinct key).
struct Meanings {
    field_code: Py<PyAny>,
    bucket: Py<PyAny>,
    category: Py<PyAny>,
    expires_at: Py<PyAny>,
    /// `parsed_field`: what an odd name counts as in a feature vector
    parsed: Py<PyAny>,
}

/// Byte strings (category names, odd field names) as small numbers, so that a record's keys
/// are plain values. Cleared with the memos that hold its numbers, between calls.
#[derive(Default)]
struct Interner {
    ids: HashMap<Box<[u8]>, u32, BuildHasherDefault<Fnv>>,
    texts: Vec<Box<[u8]>>,
}

impl Interner {
    fn id(&mut self, text: &[u8]) -> u32 {
        if let Some(&id) = self.ids.get(text) {
            return id;
        }
        let id = self.texts.len() as u32;
        self.texts.push(text.into());
        self.ids.insert(text.into(), id);
        id
    }
}

struct Memos {
    /// field name -> what it is and when it expires
    keys: Memo<String, (record::Key, f64)>,
    /// the names of buckets and category-days, as the state dicts have them
    names: Memo<record::Key, Py<PyString>>,
    texts: Interner,
    /// interned text -> it as a Python string (category names in feature contexts)
    text_names: Memo<u32, Py<PyString>>,
    /// an odd name (interned) -> how a feature context counts it
    parsed: Memo<u32, context::Kind>,
    /// bucket codes the record has no tag for, as odd names use them
    extra_codes: Vec<Py<PyString>>,
    max: usize,
}

impl Memos {
    /// Everything forgotten once the memos outgrow their bound (bucket indices move with
    /// time): called where no record is alive, since records hold interned numbers.
    fn bound(&mut self) {
        if self.keys.map.len() >= self.max
            || self.names.map.len() >= self.max
            || self.texts.texts.len() >= self.max
        {
            self.keys.map.clear();
            self.names.map.clear();
            self.text_names.map.clear();
            self.parsed.map.clear();
            self.extra_codes.clear();
            self.texts = Interner::default();
        }
    }
}

/// What `decode` returns: `(state, seen, next_expiry, oldest_seen)`.
type Decoded<'py> = (Bound<'py, PyDict>, Bound<'py, PyDict>, f64, Py<PyAny>);

/// Encodes and decodes feature records; one per process (it memoises what names mean).
#[pyclass(unsendable, module = "dealstream_native")]
struct RecordCodec {
    tags: Tags,
    slot_ms: [i64; 4],
    /// Buckets kept per slot (minute, hour, day, category-day), counted back from the
    /// bucket of the latest event: a field expires at `(index + retention) * slot_ms`.
    retention: [i64; 4],
    tag_slot: Vec<Option<usize>>,
    /// The feature context's windows (`context.rs`).
    context: context::ContextConfig,
    offer_time_scale: i64,
    seen_key_bytes: usize,
    time_fields: Vec<Py<PyString>>,
    count_fields: Vec<Py<PyString>>,
    offer_field: Py<PyString>,
    lt_field: Py<PyString>,
    /// `0.0, 1.0, ...`: decoding shares these instead of allocating a float per field.
    floats: Vec<Py<PyFloat>>,
    meanings: Meanings,
    memos: RefCell<Memos>,
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

/// Why bytes are not a record: the Python module turns it into its own error.
fn corrupt(what: &str, pos: usize) -> PyErr {
    invalid(RECORD, what, pos)
}

const RECORD: &str = "feature record";

pyo3::create_exception!(
    dealstream_native,
    CorruptData,
    PyValueError,
    "Bytes that are not what they should be (a feature record, packed values)."
);

/// Why bytes are not the `thing` they should be.
fn invalid(thing: &str, what: &str, pos: usize) -> PyErr {
    CorruptData::new_err(format!("{thing} is corrupt ({what} at byte {pos})"))
}

/// Reads a record's (or packed values') bytes front to back.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    /// What the bytes are, for the errors.
    thing: &'static str,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> PyResult<u8> {
        let byte = *self
            .data
            .get(self.pos)
            .ok_or_else(|| invalid(self.thing, "IndexError", self.pos))?;
        self.pos += 1;
        Ok(byte)
    }

    fn varint(&mut self) -> PyResult<u128> {
        let mut value: u128 = 0;
        let mut shift = 0;
        loop {
            let byte = self.byte()?;
            if shift >= 126 {
                return Err(invalid(self.thing, "OverflowError", self.pos));
            }
            value |= ((byte & 0x7F) as u128) << shift;
            if byte < 0x80 {
                return Ok(value);
            }
            shift += 7;
        }
    }

    fn zvarint(&mut self) -> PyResult<i128> {
        let value = self.varint()?;
        Ok(if value & 1 == 0 {
            (value >> 1) as i128
        } else {
            -(((value + 1) >> 1) as i128)
        })
    }

    fn bytes(&mut self, length: usize) -> PyResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(length)
            .filter(|&end| end <= self.data.len());
        let end = end.ok_or_else(|| invalid(self.thing, "IndexError", self.pos))?;
        let slice = &self.data[self.pos..end];
        self.pos = end;
        Ok(slice)
    }
}

impl RecordCodec {
    /// A decoded integral value as a Python float (a shared one when it is small).
    fn float<'py>(&self, py: Python<'py>, value: i128) -> Bound<'py, PyFloat> {
        match usize::try_from(value) {
            Ok(small) if small < self.floats.len() => self.floats[small].bind(py).clone(),
            _ => PyFloat::new(py, value as f64),
        }
    }

    fn any(&self, out: &mut Vec<u8>, name: &[u8], value: f64) {
        out.push(self.tags.any);
        varint(out, name.len() as u128);
        out.extend_from_slice(name);
        out.extend_from_slice(&value.to_be_bytes());
    }

    fn learn_code(&self, py: Python<'_>, name: &str) -> PyResult<Code> {
        let code = self.meanings.field_code.bind(py).call1((name,))?;
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
        Ok(code)
    }
}

#[pymethods]
impl RecordCodec {
    #[new]
    #[pyo3(signature = (
        *, tags, slot_ms, retention, buckets, offer_time_scale, seen_key_bytes, time_fields,
        count_fields, offer_field, memo_max, field_code, bucket, category, expires_at,
        windows, activity_codes, purchase_code, session_gap_minutes, category_days,
        purchase_days, parsed
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        tags: (u8, u8, u8, u8, u8, u8, u8),
        slot_ms: [i64; 4],
        retention: [i64; 4],
        buckets: Vec<Option<(String, usize)>>,
        offer_time_scale: i64,
        seen_key_bytes: usize,
        time_fields: Vec<String>,
        count_fields: Vec<String>,
        offer_field: String,
        memo_max: usize,
        field_code: Py<PyAny>,
        bucket: Py<PyAny>,
        category: Py<PyAny>,
        expires_at: Py<PyAny>,
        windows: Vec<(usize, i64)>,
        activity_codes: Vec<String>,
        purchase_code: String,
        session_gap_minutes: i64,
        category_days: (i64, i64),
        purchase_days: i64,
        parsed: Py<PyAny>,
    ) -> PyResult<Self> {
        if slot_ms.iter().any(|&ms| ms <= 0) {
            return Err(PyValueError::new_err("slot_ms must be positive"));
        }
        let (format, category_tag, time, count, offer, lt, any) = tags;
        if buckets.len() != category_tag as usize
            || buckets.iter().flatten().any(|(_, slot)| *slot >= 3)
            || windows.iter().any(|(slot, _)| *slot >= 3)
        {
            return Err(PyValueError::new_err(
                "buckets: per tag below CATEGORY, its (code, grain slot 0-2) or None; windows: \
                 (grain slot 0-2, buckets)",
            ));
        }
        let tag_slot: Vec<Option<usize>> =
            buckets.iter().map(|b| b.as_ref().map(|b| b.1)).collect();
        let mut codes: Vec<String> = Vec::new();
        let code_of_tag = buckets
            .iter()
            .map(|b| match b {
                Some((code, _)) => match codes.iter().position(|known| known == code) {
                    Some(at) => at,
                    None => {
                        codes.push(code.clone());
                        codes.len() - 1
                    }
                },
                None => 0,
            })
            .collect();
        let purchase = codes
            .iter()
            .position(|code| *code == purchase_code)
            .ok_or_else(|| PyValueError::new_err("no bucket has the purchase code"))?;
        let context = context::ContextConfig {
            windows,
            activity: codes
                .iter()
                .map(|code| activity_codes.contains(code))
                .collect(),
            codes: codes
                .iter()
                .map(|code| PyString::intern(py, code).unbind())
                .collect(),
            code_of_tag,
            purchase,
            session_gap_minutes,
            category_days,
            purchase_days,
        };
        let strings = |names: Vec<String>| -> Vec<Py<PyString>> {
            names
                .iter()
                .map(|name| PyString::intern(py, name).unbind())
                .collect()
        };
        Ok(Self {
            tags: Tags {
                format,
                category: category_tag,
                time,
                count,
                offer,
                lt,
                any,
            },
            slot_ms,
            retention,
            tag_slot,
            context,
            offer_time_scale,
            seen_key_bytes,
            time_fields: strings(time_fields),
            count_fields: strings(count_fields),
            offer_field: PyString::intern(py, &offer_field).unbind(),
            lt_field: PyString::intern(py, "lt").unbind(),
            floats: (0..SHARED_FLOATS)
                .map(|value| PyFloat::new(py, value as f64).unbind())
                .collect(),
            meanings: Meanings {
                field_code,
                bucket,
                category,
                expires_at,
                parsed,
            },
            memos: RefCell::new(Memos {
                keys: Memo::new(memo_max),
                names: Memo::new(memo_max),
                texts: Interner::default(),
                text_names: Memo::new(memo_max),
                parsed: Memo::new(memo_max),
                extra_codes: Vec::new(),
                max: memo_max.max(1),
            }),
        })
    }

    /// The record of `state` (field name -> value, in order) and `seen` (digest -> event
    /// time in whole seconds), as bytes. Raises TypeError for a value that is not a number.
    fn encode<'py>(
        &self,
        py: Python<'py>,
        state: &Bound<'py, PyDict>,
        seen: &Bound<'py, PyDict>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        self.memos.borrow_mut().bound();
        let record = self.record_of_dicts(py, state, seen)?;
        Ok(PyBytes::new(py, &self.write(py, &record)?))
    }

    /// `(state, seen, next_expiry, oldest_seen)` of a record `encode` wrote (its first byte
    /// already checked by the caller); ValueError, saying where, for anything else.
    fn decode<'py>(&self, py: Python<'py>, blob: &[u8]) -> PyResult<Decoded<'py>> {
        self.memos.borrow_mut().bound();
        self.check_format(blob)?;
        let record = self.read(py, blob)?;
        self.dicts_of(py, &record)
    }
}

#[pymodule]
fn dealstream_native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add("CorruptData", module.py().get_type::<CorruptData>())?;
    module.add_class::<RecordCodec>()?;
    module.add_class::<logistic::LinearTerms>()?;
    module.add_class::<logistic::LogisticStep>()?;
    module.add_class::<logistic::TermNames>()?;
    module.add_class::<inputs::InputPlan>()?;
    module.add_function(wrap_pyfunction!(partition::default_partition, module)?)?;
    module.add_function(wrap_pyfunction!(hashing::stable_id, module)?)?;
    module.add_function(wrap_pyfunction!(hashing::unit_hash, module)?)?;
    module.add_class::<hashing::PseudonymKey>()?;
    module.add_function(wrap_pyfunction!(values::pack_features, module)?)?;
    module.add_function(wrap_pyfunction!(values::unpack_features, module)?)?;
    Ok(())
}
