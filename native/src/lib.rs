//! dealstream's compiled hot-path pieces.
//!
//! `RecordCodec` writes and reads a user's feature record in the byte format that
//! `streams/adapters/feature_record.py` defines. The worker encodes every user a micro-batch
//! touches (the same loop in Python cost about a sixth of the worker's CPU) and decodes the
//! records it keeps encoded between batches. What a field name means stays in Python: the
//! codec asks the module's functions once per distinct name (or bucket, or category-day) and
//! remembers the answer; the tag numbers, time grains and field names come from the Python
//! module too, so the format is defined in one place.
//!
//! `logistic` holds the purchase model's arithmetic (River's learning step and linear score);
//! `values` packs a feature vector into the short text pending decisions and outbox entries
//! keep in Redis;
//! `partition` is Kafka's default partitioner.

mod logistic;
mod partition;
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

/// A field name as decoding gives it back, and when the field expires.
struct Named {
    name: Py<PyString>,
    expires_at: f64,
}

/// The Python module's functions the codec asks (once per distinct key).
struct Meanings {
    field_code: Py<PyAny>,
    bucket: Py<PyAny>,
    category: Py<PyAny>,
    expires_at: Py<PyAny>,
}

struct Memos {
    codes: Memo<String, Code>,
    buckets: Memo<(u8, i64), Named>,
    categories: Memo<(i64, Vec<u8>), Named>,
    expiries: Memo<String, f64>,
}

/// What `decode` returns: `(state, seen, next_expiry, oldest_seen)`.
type Decoded<'py> = (Bound<'py, PyDict>, Bound<'py, PyDict>, f64, Py<PyAny>);

/// Encodes and decodes feature records; one per process (it memoises what names mean).
#[pyclass(unsendable, module = "dealstream_native")]
struct RecordCodec {
    tags: Tags,
    slot_ms: [i64; 4],
    tag_slot: Vec<usize>,
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

/// Why bytes are not the `thing` they should be.
fn invalid(thing: &str, what: &str, pos: usize) -> PyErr {
    PyValueError::new_err(format!("{thing} is corrupt ({what} at byte {pos})"))
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

    /// `(name, expires_at)` as the Python function gives it, or a corrupt-record error.
    fn named(entry: PyResult<Bound<'_, PyAny>>, what: &str, pos: usize) -> PyResult<Named> {
        let entry = entry.map_err(|_| corrupt(what, pos))?;
        let entry = entry.cast::<PyTuple>()?;
        Ok(Named {
            name: entry.get_item(0)?.cast_into::<PyString>()?.unbind(),
            expires_at: entry.get_item(1)?.extract()?,
        })
    }
}

#[pymethods]
impl RecordCodec {
    #[new]
    #[pyo3(signature = (
        *, tags, slot_ms, tag_slot, offer_time_scale, seen_key_bytes, time_fields,
        count_fields, offer_field, memo_max, field_code, bucket, category, expires_at
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        tags: (u8, u8, u8, u8, u8, u8, u8),
        slot_ms: [i64; 4],
        tag_slot: Vec<usize>,
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
    ) -> PyResult<Self> {
        if slot_ms.iter().any(|&ms| ms <= 0) {
            return Err(PyValueError::new_err("slot_ms must be positive"));
        }
        let (format, category_tag, time, count, offer, lt, any) = tags;
        if tag_slot.len() != category_tag as usize || tag_slot.iter().any(|&s| s >= 3) {
            return Err(PyValueError::new_err(
                "tag_slot: one grain slot (0-2) per tag below CATEGORY",
            ));
        }
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
            tag_slot,
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
            },
            memos: RefCell::new(Memos {
                codes: Memo::new(memo_max),
                buckets: Memo::new(memo_max),
                categories: Memo::new(memo_max),
                expiries: Memo::new(memo_max),
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
        let mut memos = self.memos.borrow_mut();
        for (key, value) in state.iter() {
            let name = key.cast::<PyString>()?.to_str()?;
            if !memos.codes.map.contains_key(name) {
                // A name not seen before (or since the memo was last cleared): rare.
                let code = self.learn_code(py, name)?;
                memos.codes.insert(name.to_owned(), code);
            }
            let code = &memos.codes.map[name];
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
                zvarint(
                    &mut body,
                    lt as i128 * self.offer_time_scale as i128 - integer,
                );
            } else {
                return Err(PyValueError::new_err(format!(
                    "field {name:?}: tag {tag} has no coding"
                )));
            }
        }
        drop(memos);

        let mut out: Vec<u8> = Vec::with_capacity(body.len() + 16 + 7 * seen.len());
        out.push(tags.format);
        varint(&mut out, lt as u128);
        varint(&mut out, categories.len() as u128);
        for category in &categories {
            varint(&mut out, category.len() as u128);
            out.extend_from_slice(category);
        }
        varint(&mut out, state.len() as u128);
        out.extend_from_slice(&body);

        // The dedup set, newest first (ties by digest, so that equal sets give equal bytes):
        // the digests, then each time as seconds before the previous one, the first relative
        // to lt's second. Times within the allowed lateness are a few seconds apart, one byte.
        let mut entries: Vec<(i64, Bound<'py, PyBytes>)> = Vec::with_capacity(seen.len());
        for (digest, seconds) in seen.iter() {
            let digest = digest.cast_into::<PyBytes>()?;
            if digest.as_bytes().len() != self.seen_key_bytes {
                return Err(PyValueError::new_err(format!(
                    "an event id digest has {} bytes, not {}",
                    digest.as_bytes().len(),
                    self.seen_key_bytes
                )));
            }
            entries.push((seconds.extract::<i64>()?, digest));
        }
        entries.sort_unstable_by(|a, b| {
            b.0.cmp(&a.0)
                .then_with(|| a.1.as_bytes().cmp(b.1.as_bytes()))
        });
        varint(&mut out, entries.len() as u128);
        for (_, digest) in &entries {
            out.extend_from_slice(digest.as_bytes());
        }
        let mut previous = (lt / 1000) as i128;
        for (k, (seconds, _)) in entries.iter().enumerate() {
            let seconds = *seconds as i128;
            if k == 0 {
                zvarint(&mut out, previous - seconds);
            } else {
                varint(&mut out, (previous - seconds) as u128);
            }
            previous = seconds;
        }
        Ok(PyBytes::new(py, &out))
    }

    /// `(state, seen, next_expiry, oldest_seen)` of a record `encode` wrote (its first byte
    /// already checked by the caller); ValueError, saying where, for anything else.
    fn decode<'py>(&self, py: Python<'py>, blob: &[u8]) -> PyResult<Decoded<'py>> {
        let tags = self.tags;
        let mut data = Reader {
            data: blob,
            pos: 1,
            thing: RECORD,
        };
        let lt_raw = data.varint()?;
        let lt = i64::try_from(lt_raw).map_err(|_| corrupt("OverflowError", data.pos))?;
        let refs: [i64; 4] = [
            lt / self.slot_ms[0],
            lt / self.slot_ms[1],
            lt / self.slot_ms[2],
            lt / self.slot_ms[3],
        ];
        let mut categories: Vec<&[u8]> = Vec::new();
        for _ in 0..data.varint()? {
            let length = data.varint()? as usize;
            let name = data.bytes(length)?;
            let pos = data.pos;
            std::str::from_utf8(name).map_err(|_| corrupt("UnicodeDecodeError", pos))?;
            categories.push(name);
        }
        let fields = data.varint()?;
        let state = presized_dict(py, usize::try_from(fields).unwrap_or(0).min(1 << 16))?;
        let mut next_expiry = f64::INFINITY;
        let mut memos = self.memos.borrow_mut();
        for _ in 0..fields {
            let at = data.pos;
            let tag = data.byte()?;
            if tag < tags.category {
                let index = refs[self.tag_slot[tag as usize]] as i128 - data.zvarint()?;
                let index = i64::try_from(index).map_err(|_| corrupt("OverflowError", at))?;
                if !memos.buckets.map.contains_key(&(tag, index)) {
                    let entry = self.meanings.bucket.bind(py).call1((tag, index));
                    let named = Self::named(entry, "KeyError", at)?;
                    memos.buckets.insert((tag, index), named);
                }
                let named = &memos.buckets.map[&(tag, index)];
                let value = self.float(py, data.zvarint()?);
                state.set_item(named.name.bind(py), value)?;
                next_expiry = next_expiry.min(named.expires_at);
            } else if tag == tags.category {
                let number = data.varint()? as usize;
                let category = *categories
                    .get(number)
                    .ok_or_else(|| corrupt("IndexError", at))?;
                let day = refs[3] as i128 - data.zvarint()?;
                let day = i64::try_from(day).map_err(|_| corrupt("OverflowError", at))?;
                let key = (day, category.to_vec());
                if !memos.categories.map.contains_key(&key) {
                    let text = std::str::from_utf8(category).expect("checked above");
                    let entry = self.meanings.category.bind(py).call1((day, text));
                    let named = Self::named(entry, "ValueError", at)?;
                    memos.categories.insert(key.clone(), named);
                }
                let named = &memos.categories.map[&key];
                let value = self.float(py, data.zvarint()?);
                state.set_item(named.name.bind(py), value)?;
                next_expiry = next_expiry.min(named.expires_at);
            } else if tag == tags.lt {
                state.set_item(self.lt_field.bind(py), lt as f64)?;
            } else if tag == tags.any {
                let length = data.varint()? as usize;
                let raw = data.bytes(length)?;
                let pos = data.pos;
                let name =
                    std::str::from_utf8(raw).map_err(|_| corrupt("UnicodeDecodeError", pos))?;
                let value = f64::from_be_bytes(data.bytes(8)?.try_into().expect("8 bytes"));
                if !memos.expiries.map.contains_key(name) {
                    let expires_at: f64 = self
                        .meanings
                        .expires_at
                        .bind(py)
                        .call1((name,))?
                        .extract()?;
                    memos.expiries.insert(name.to_owned(), expires_at);
                }
                next_expiry = next_expiry.min(memos.expiries.map[name]);
                state.set_item(name, value)?;
            } else {
                let number = data.zvarint()?;
                let (field, value) = if tag >= tags.time && tag < tags.count {
                    let field = self.time_fields.get((tag - tags.time) as usize);
                    (field, lt as i128 - number)
                } else if tag >= tags.count && tag < tags.offer {
                    let field = self.count_fields.get((tag - tags.count) as usize);
                    (field, number)
                } else if tag == tags.offer {
                    (
                        Some(&self.offer_field),
                        lt as i128 * self.offer_time_scale as i128 - number,
                    )
                } else {
                    (None, 0)
                };
                let field = field.ok_or_else(|| corrupt("KeyError", at))?;
                let value = self.float(py, value);
                state.set_item(field.bind(py), value)?;
            }
        }
        drop(memos);

        let count =
            usize::try_from(data.varint()?).map_err(|_| corrupt("OverflowError", data.pos))?;
        let digests_at = data.pos;
        let digests = data.bytes(
            count
                .checked_mul(self.seen_key_bytes)
                .ok_or_else(|| corrupt("IndexError", digests_at))?,
        )?;
        let seen = presized_dict(py, count.min(1 << 16))?;
        let mut seconds = (lt / 1000) as i128;
        for (k, digest) in digests.chunks_exact(self.seen_key_bytes.max(1)).enumerate() {
            seconds -= if k == 0 {
                data.zvarint()?
            } else {
                i128::try_from(data.varint()?).map_err(|_| corrupt("OverflowError", data.pos))?
            };
            let value = i64::try_from(seconds).map_err(|_| corrupt("OverflowError", data.pos))?;
            seen.set_item(PyBytes::new(py, digest), value)?;
        }
        // Newest first: the last is the oldest.
        let oldest = if count > 0 { Some(seconds) } else { None };
        if seen.len() != count {
            return Err(PyValueError::new_err(
                "feature record repeats an event id digest",
            ));
        }
        if data.pos != blob.len() {
            return Err(PyValueError::new_err(format!(
                "feature record has {} extra bytes",
                blob.len() - data.pos
            )));
        }
        let oldest_seen: Py<PyAny> = match oldest {
            Some(ts) => ts.into_pyobject(py)?.into_any().unbind(),
            None => PyFloat::new(py, f64::INFINITY).into_any().unbind(),
        };
        Ok((state, seen, next_expiry, oldest_seen))
    }
}

#[pymodule]
fn dealstream_native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<RecordCodec>()?;
    module.add_class::<logistic::LinearTerms>()?;
    module.add_class::<logistic::LogisticStep>()?;
    module.add_function(wrap_pyfunction!(partition::default_partition, module)?)?;
    module.add_function(wrap_pyfunction!(values::pack_features, module)?)?;
    module.add_function(wrap_pyfunction!(values::unpack_features, module)?)?;
    Ok(())
}
