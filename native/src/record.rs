//! A feature record as Rust values, its bytes, and a micro-batch applied to records held as
//! bytes.
//!
//! `RecordCodec::read` and `RecordCodec::write` are the one reader and the one writer of the
//! byte format (`engine/features/record.py` documents it); the dict-based `encode`/`decode`
//! and `apply_updates` all go through them. `apply_updates` is the store's rules
//! (`engine/features/store.py` says which): a batch's users are decoded here, never into
//! Python dicts, so a user whose state nobody reads costs no Python objects.

use blake2::digest::{Update, VariableOutput};
use blake2::Blake2bVar;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasherDefault;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

use super::{corrupt, exact_int, number, presized_dict, varint, zvarint, Reader, RecordCodec};
use super::{CorruptData, Fnv, EXACT, RECORD};

/// Fields beyond which a record keeps an index of them.
const INDEXED: usize = 48;

/// What a field is, whatever its name looked like: two names that mean the same field give
/// the same key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    /// A time bucket: its tag (below CATEGORY) and index.
    Bucket(u8, i64),
    /// A category-day: the day and the category (UTF-8, interned: `Memos::texts`).
    Category(i64, u32),
    Lt,
    /// `fs` or `l<kind>`: the position in the time fields.
    Time(u8),
    /// `n<kind>`: the position in the count fields.
    Count(u8),
    Offer,
    /// A name no typed entry reproduces (interned).
    Other(u32),
}

pub(crate) struct Field {
    pub(crate) key: Key,
    pub(crate) value: f64,
    pub(crate) expires_at: f64,
}

/// One user's record: its fields in order, the dedup set, and the two bounds derived from
/// them (`UserRecord` in `engine/features/record.py`).
pub(crate) struct Record {
    pub(crate) fields: Vec<Field>,
    /// Key -> position in `fields`, kept once a record has more than `INDEXED` fields (a
    /// user with thousands of categories would otherwise cost a scan per operation).
    index: Option<HashMap<Key, usize, BuildHasherDefault<Fnv>>>,
    /// The event id digests, `seen_key_bytes` each, in the order of `seconds`.
    pub(crate) digests: Vec<u8>,
    pub(crate) seconds: Vec<i64>,
    pub(crate) next_expiry: f64,
    pub(crate) oldest_seen: Option<i64>,
}

impl Record {
    fn empty() -> Self {
        Self {
            fields: Vec::new(),
            index: None,
            digests: Vec::new(),
            seconds: Vec::new(),
            next_expiry: f64::INFINITY,
            oldest_seen: None,
        }
    }

    fn find(&self, key: &Key) -> Option<usize> {
        match &self.index {
            Some(index) => index.get(key).copied(),
            None => self.fields.iter().position(|field| field.key == *key),
        }
    }

    fn push(&mut self, field: Field) {
        if let Some(index) = &mut self.index {
            index.insert(field.key, self.fields.len());
        }
        self.fields.push(field);
        if self.index.is_none() && self.fields.len() > INDEXED {
            self.reindex();
        }
    }

    fn reindex(&mut self) {
        self.index = (self.fields.len() > INDEXED).then(|| {
            self.fields
                .iter()
                .enumerate()
                .map(|(position, field)| (field.key, position))
                .collect()
        });
    }

    /// The value of `lt`, if the record has one.
    fn latest(&self) -> Option<f64> {
        self.fields
            .iter()
            .find(|field| field.key == Key::Lt)
            .map(|field| field.value)
    }

    fn has_seen(&self, digest: &[u8]) -> bool {
        self.digests.chunks_exact(digest.len()).any(|d| d == digest)
    }

    /// Drop the buckets older than their grain's retention at the latest event time (a field
    /// expires at `lt >= expires_at`), then recompute `next_expiry` over what is left.
    fn trim(&mut self, latest: f64) {
        self.fields.retain(|field| field.expires_at > latest);
        if self.index.is_some() {
            self.reindex();
        }
        self.next_expiry = self
            .fields
            .iter()
            .map(|field| field.expires_at)
            .fold(f64::INFINITY, f64::min);
    }

    /// Forget the event ids older than `horizon` (in whole seconds).
    fn prune(&mut self, horizon: i64, width: usize) {
        let mut digests = Vec::with_capacity(self.digests.len());
        let mut seconds = Vec::with_capacity(self.seconds.len());
        for (digest, &second) in self.digests.chunks_exact(width).zip(&self.seconds) {
            if second >= horizon {
                digests.extend_from_slice(digest);
                seconds.push(second);
            }
        }
        self.oldest_seen = seconds.iter().copied().min();
        self.digests = digests;
        self.seconds = seconds;
    }
}

/// A decoded integer as a double (through i64 when it fits: i128's conversion is a slow
/// library call; both round to nearest).
fn whole(value: i128) -> f64 {
    match i64::try_from(value) {
        Ok(value) => value as f64,
        Err(_) => value as f64,
    }
}

/// `-(-x // 1000)` in Python: whole seconds, rounded up (`seen_second`).
fn second_up(ms: i64) -> i64 {
    -((-ms).div_euclid(1000))
}

fn integer_of(value: &Bound<'_, PyAny>, what: &str) -> PyResult<i64> {
    value
        .extract::<i64>()
        .map_err(|_| PyTypeError::new_err(format!("{what} must be an integer")))
}

/// A partition's watermark during a batch: read once, written back at the end if it moved.
struct Mark {
    key: Py<PyTuple>,
    offset: Option<i64>,
    moved: bool,
}

/// The watermarks of the partitions a batch touches.
#[derive(Default)]
struct Marks {
    list: Vec<Mark>,
    index: HashMap<(String, i64), usize, BuildHasherDefault<Fnv>>,
}

impl Marks {
    /// The mark of an update's position (None: no position) and the update's offset.
    fn of<'py>(
        &mut self,
        watermarks: &Bound<'py, PyDict>,
        position: &Bound<'py, PyAny>,
    ) -> PyResult<Option<(&mut Mark, i64)>> {
        if position.is_none() {
            return Ok(None);
        }
        let py = position.py();
        let position = position.cast::<PyTuple>()?;
        let source = position.get_item(0)?;
        let source = source.cast::<PyString>()?;
        let partition = integer_of(&position.get_item(1)?, "a partition")?;
        let offset = integer_of(&position.get_item(2)?, "an offset")?;
        let lookup = (source.to_str()?.to_owned(), partition);
        let at = match self.index.get(&lookup) {
            Some(&at) => at,
            None => {
                let key = PyTuple::new(
                    py,
                    [
                        source.clone().into_any(),
                        partition.into_pyobject(py)?.into_any(),
                    ],
                )?;
                let offset = match watermarks.get_item(&key)? {
                    Some(mark) => Some(integer_of(&mark, "a watermark")?),
                    None => None,
                };
                self.list.push(Mark {
                    key: key.unbind(),
                    offset,
                    moved: false,
                });
                self.index.insert(lookup, self.list.len() - 1);
                self.list.len() - 1
            }
        };
        Ok(Some((&mut self.list[at], offset)))
    }
}

impl Mark {
    /// Whether an update at `offset` was applied before; if not, the mark moves to it.
    fn redelivered(&mut self, offset: i64) -> bool {
        if self.offset.is_some_and(|mark| offset <= mark) {
            return true;
        }
        self.offset = Some(offset);
        self.moved = true;
        false
    }
}

/// One user of a batch: the bytes it had before (None: a new user) and its record.
struct Entry {
    user: Py<PyString>,
    before: Option<Py<PyBytes>>,
    record: Record,
    touched: bool,
}

/// What `apply_updates` gives back: statuses, the users' bytes before the batch, the users
/// whose record changed (their new bytes are in `records`).
type Applied<'py> = (
    Bound<'py, PyList>,
    Bound<'py, PyDict>,
    Bound<'py, PyList>,
    i64,
);

impl RecordCodec {
    /// What a field name means, and when the field expires (asked of the Python module once
    /// per name).
    pub(crate) fn key_of(&self, py: Python<'_>, name: &str) -> PyResult<(Key, f64)> {
        if let Some(&known) = self.memos.borrow().keys.map.get(name) {
            return Ok(known);
        }
        let code = self.learn_code(py, name)?;
        let tags = self.tags;
        let mut memos = self.memos.borrow_mut();
        let key = if code.tag < tags.category && self.tag_slot[code.tag as usize].is_some() {
            Key::Bucket(code.tag, code.index)
        } else if code.tag == tags.category {
            Key::Category(code.index, memos.texts.id(&code.text))
        } else if code.tag == tags.lt {
            Key::Lt
        } else if code.tag >= tags.time && code.tag < tags.count {
            Key::Time(code.tag - tags.time)
        } else if code.tag >= tags.count && code.tag < tags.offer {
            Key::Count(code.tag - tags.count)
        } else if code.tag == tags.offer {
            Key::Offer
        } else if code.tag == tags.any {
            Key::Other(memos.texts.id(name.as_bytes()))
        } else {
            return Err(PyValueError::new_err(format!(
                "field {name:?}: tag {} has no coding",
                code.tag
            )));
        };
        let expires_at = match key {
            Key::Other(_) => {
                drop(memos);
                let expires_at: f64 = self
                    .meanings
                    .expires_at
                    .bind(py)
                    .call1((name,))?
                    .extract()?;
                memos = self.memos.borrow_mut();
                expires_at
            }
            _ => self.expiry(key),
        };
        memos.keys.insert(name.to_owned(), (key, expires_at));
        Ok((key, expires_at))
    }

    /// The bucket index of `lt` in each slot: fields are stored relative to these.
    fn refs(&self, lt: i64) -> [i64; 4] {
        self.slot_ms.map(|ms| lt / ms)
    }

    /// When a typed field expires: a bucket or category-day at `(index + retention) *
    /// slot_ms` of its slot, anything else never (`ParsedField` in `engine/features/state.py`).
    fn expiry(&self, key: Key) -> f64 {
        let (slot, index) = match key {
            Key::Bucket(tag, index) => match self.tag_slot[tag as usize] {
                Some(slot) => (slot, index),
                None => return f64::INFINITY,
            },
            Key::Category(day, _) => (3, day),
            _ => return f64::INFINITY,
        };
        ((index as i128 + self.retention[slot] as i128) * self.slot_ms[slot] as i128) as f64
    }

    /// A field's name as the Python state dict has it.
    fn name_of<'py>(&self, py: Python<'py>, key: Key) -> PyResult<Bound<'py, PyString>> {
        let fixed = match key {
            Key::Lt => &self.lt_field,
            Key::Time(i) => &self.time_fields[i as usize],
            Key::Count(i) => &self.count_fields[i as usize],
            Key::Offer => &self.offer_field,
            Key::Other(id) => {
                let memos = self.memos.borrow();
                let text = std::str::from_utf8(&memos.texts.texts[id as usize])
                    .expect("interned from a str");
                return Ok(PyString::new(py, text));
            }
            Key::Bucket(..) | Key::Category(..) => {
                if let Some(name) = self.memos.borrow().names.map.get(&key) {
                    return Ok(name.bind(py).clone());
                }
                let name = match key {
                    Key::Bucket(tag, index) => self.meanings.bucket.bind(py).call1((tag, index))?,
                    Key::Category(day, id) => {
                        let text = self.memos.borrow().texts.texts[id as usize].clone();
                        let text = std::str::from_utf8(&text).expect("checked when read");
                        self.meanings.category.bind(py).call1((day, text))?
                    }
                    _ => unreachable!("matched above"),
                };
                let name = name.cast_into::<PyString>()?;
                self.memos
                    .borrow_mut()
                    .names
                    .insert(key, name.clone().unbind());
                return Ok(name);
            }
        };
        Ok(fixed.bind(py).clone())
    }

    /// The record in `blob` (whose first byte the caller checked).
    pub(crate) fn read(&self, py: Python<'_>, blob: &[u8]) -> PyResult<Record> {
        let tags = self.tags;
        let mut data = Reader {
            data: blob,
            pos: 1,
            thing: RECORD,
        };
        let lt_raw = data.varint()?;
        let lt = i64::try_from(lt_raw).map_err(|_| corrupt("OverflowError", data.pos))?;
        let refs = self.refs(lt);
        let mut categories: Vec<u32> = Vec::new();
        for _ in 0..data.varint()? {
            let length = data.varint()? as usize;
            let name = data.bytes(length)?;
            let pos = data.pos;
            std::str::from_utf8(name).map_err(|_| corrupt("UnicodeDecodeError", pos))?;
            categories.push(self.memos.borrow_mut().texts.id(name));
        }
        let count = data.varint()?;
        let mut fields: Vec<Field> =
            Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(1 << 16));
        let mut next_expiry = f64::INFINITY;
        for _ in 0..count {
            let at = data.pos;
            let tag = data.byte()?;
            let field = if tag <= tags.category {
                // a bucket or a category-day: where it is relative to lt's, then its count
                let key = if tag < tags.category {
                    let slot =
                        self.tag_slot[tag as usize].ok_or_else(|| corrupt("KeyError", at))?;
                    let index = refs[slot] as i128 - data.zvarint()?;
                    Key::Bucket(
                        tag,
                        i64::try_from(index).map_err(|_| corrupt("OverflowError", at))?,
                    )
                } else {
                    let number = data.varint()? as usize;
                    let category = *categories
                        .get(number)
                        .ok_or_else(|| corrupt("IndexError", at))?;
                    let day = refs[3] as i128 - data.zvarint()?;
                    Key::Category(
                        i64::try_from(day).map_err(|_| corrupt("OverflowError", at))?,
                        category,
                    )
                };
                Field {
                    key,
                    value: whole(data.zvarint()?),
                    expires_at: self.expiry(key),
                }
            } else if tag == tags.lt {
                Field {
                    key: Key::Lt,
                    value: lt as f64,
                    expires_at: f64::INFINITY,
                }
            } else if tag == tags.any {
                let length = data.varint()? as usize;
                let raw = data.bytes(length)?;
                let pos = data.pos;
                let name =
                    std::str::from_utf8(raw).map_err(|_| corrupt("UnicodeDecodeError", pos))?;
                let value = f64::from_be_bytes(data.bytes(8)?.try_into().expect("8 bytes"));
                let (key, expires_at) = self.key_of(py, name)?;
                Field {
                    key,
                    value,
                    expires_at,
                }
            } else {
                let number = data.zvarint()?;
                let (key, value) = if tag >= tags.time && tag < tags.count {
                    let i = tag - tags.time;
                    let known = (i as usize) < self.time_fields.len();
                    (known.then_some(Key::Time(i)), lt as i128 - number)
                } else if tag >= tags.count && tag < tags.offer {
                    let i = tag - tags.count;
                    let known = (i as usize) < self.count_fields.len();
                    (known.then_some(Key::Count(i)), number)
                } else if tag == tags.offer {
                    (
                        Some(Key::Offer),
                        lt as i128 * self.offer_time_scale as i128 - number,
                    )
                } else {
                    (None, 0)
                };
                Field {
                    key: key.ok_or_else(|| corrupt("KeyError", at))?,
                    value: whole(value),
                    expires_at: f64::INFINITY,
                }
            };
            next_expiry = next_expiry.min(field.expires_at);
            fields.push(field);
        }

        let count =
            usize::try_from(data.varint()?).map_err(|_| corrupt("OverflowError", data.pos))?;
        let digests_at = data.pos;
        let width = self.seen_key_bytes.max(1);
        let digests = data.bytes(
            count
                .checked_mul(width)
                .ok_or_else(|| corrupt("IndexError", digests_at))?,
        )?;
        let mut seconds_of: Vec<i64> = Vec::with_capacity(count.min(1 << 16));
        let mut seconds = (lt / 1000) as i128;
        for k in 0..count {
            seconds -= if k == 0 {
                data.zvarint()?
            } else {
                i128::try_from(data.varint()?).map_err(|_| corrupt("OverflowError", data.pos))?
            };
            seconds_of
                .push(i64::try_from(seconds).map_err(|_| corrupt("OverflowError", data.pos))?);
        }
        let distinct: HashSet<&[u8], BuildHasherDefault<Fnv>> =
            digests.chunks_exact(width).collect();
        if distinct.len() != count {
            return Err(CorruptData::new_err(
                "feature record repeats an event id digest",
            ));
        }
        if data.pos != blob.len() {
            return Err(CorruptData::new_err(format!(
                "feature record has {} extra bytes",
                blob.len() - data.pos
            )));
        }
        // Newest first: the last is the oldest.
        let oldest_seen = seconds_of.last().copied();
        let mut record = Record {
            fields,
            index: None,
            digests: digests.to_vec(),
            seconds: seconds_of,
            next_expiry,
            oldest_seen,
        };
        record.reindex();
        Ok(record)
    }

    /// The record's bytes.
    pub(crate) fn write(&self, py: Python<'_>, record: &Record) -> PyResult<Vec<u8>> {
        let tags = self.tags;
        let lt: i64 = match record.latest() {
            Some(value) if value > 0.0 && value < EXACT && value.fract() == 0.0 => value as i64,
            _ => 0,
        };
        let refs = self.refs(lt);
        let mut categories: Vec<u32> = Vec::new();
        let mut body: Vec<u8> = Vec::with_capacity(8 * record.fields.len() + 16);
        for field in &record.fields {
            let value = field.value;
            if let Key::Other(id) = field.key {
                let memos = self.memos.borrow();
                self.any(&mut body, &memos.texts.texts[id as usize], value);
                continue;
            }
            if !exact_int(value) {
                let name = self.name_of(py, field.key)?;
                self.any(&mut body, name.to_str()?.as_bytes(), value);
                continue;
            }
            let integer = value as i128;
            match field.key {
                Key::Bucket(tag, index) => {
                    let slot = self.tag_slot[tag as usize].expect("a bucket's tag");
                    body.push(tag);
                    zvarint(&mut body, (refs[slot] - index) as i128);
                    zvarint(&mut body, integer);
                }
                Key::Category(day, category) => {
                    let position = match categories.iter().position(|&c| c == category) {
                        Some(position) => position,
                        None => {
                            categories.push(category);
                            categories.len() - 1
                        }
                    };
                    body.push(tags.category);
                    varint(&mut body, position as u128);
                    zvarint(&mut body, (refs[3] - day) as i128);
                    zvarint(&mut body, integer);
                }
                Key::Lt => {
                    if value == lt as f64 {
                        body.push(tags.lt);
                    } else {
                        self.any(&mut body, b"lt", value);
                    }
                }
                Key::Time(i) => {
                    body.push(tags.time + i);
                    zvarint(&mut body, lt as i128 - integer);
                }
                Key::Count(i) => {
                    body.push(tags.count + i);
                    zvarint(&mut body, integer);
                }
                Key::Offer => {
                    body.push(tags.offer);
                    zvarint(
                        &mut body,
                        lt as i128 * self.offer_time_scale as i128 - integer,
                    );
                }
                Key::Other(_) => unreachable!("written above"),
            }
        }

        let width = self.seen_key_bytes.max(1);
        let mut out: Vec<u8> = Vec::with_capacity(body.len() + 16 + 7 * record.seconds.len());
        out.push(tags.format);
        varint(&mut out, lt as u128);
        varint(&mut out, categories.len() as u128);
        let memos = self.memos.borrow();
        for &category in &categories {
            let text = &memos.texts.texts[category as usize];
            varint(&mut out, text.len() as u128);
            out.extend_from_slice(text);
        }
        drop(memos);
        varint(&mut out, record.fields.len() as u128);
        out.extend_from_slice(&body);

        // The dedup set, newest first (ties by digest, so that equal sets give equal bytes):
        // the digests, then each time as seconds before the previous one, the first relative
        // to lt's second. Times within the allowed lateness are a few seconds apart, one byte.
        let mut entries: Vec<(i64, &[u8])> = record
            .seconds
            .iter()
            .copied()
            .zip(record.digests.chunks_exact(width))
            .collect();
        entries.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        varint(&mut out, entries.len() as u128);
        for (_, digest) in &entries {
            out.extend_from_slice(digest);
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
        Ok(out)
    }

    /// The state dict of a record, its fields in order.
    fn state_dict<'py>(&self, py: Python<'py>, record: &Record) -> PyResult<Bound<'py, PyDict>> {
        let state = presized_dict(py, record.fields.len())?;
        for field in &record.fields {
            let value = field.value;
            let name = self.name_of(py, field.key)?;
            // whole values through `float` (small ones are shared objects)
            if exact_int(value) {
                state.set_item(name, self.float(py, value as i128))?;
            } else {
                state.set_item(name, value)?;
            }
        }
        Ok(state)
    }

    /// The record of a state dict (names in order) and a dedup set (digest -> seconds).
    pub(crate) fn record_of_dicts(
        &self,
        py: Python<'_>,
        state: &Bound<'_, PyDict>,
        seen: &Bound<'_, PyDict>,
    ) -> PyResult<Record> {
        let mut record = Record::empty();
        record.fields.reserve(state.len());
        for (name, value) in state.iter() {
            let name = name.cast::<PyString>()?.to_str()?;
            let value = number(&value)?;
            let (key, expires_at) = self.key_of(py, name)?;
            record.next_expiry = record.next_expiry.min(expires_at);
            // a key is its name's (`key_of`), so a dict's names give distinct keys
            record.push(Field {
                key,
                value,
                expires_at,
            });
        }
        let width = self.seen_key_bytes;
        for (digest, seconds) in seen.iter() {
            let digest = digest.cast_into::<PyBytes>()?;
            if digest.as_bytes().len() != width {
                return Err(PyValueError::new_err(format!(
                    "an event id digest has {} bytes, not {width}",
                    digest.as_bytes().len(),
                )));
            }
            let seconds = seconds.extract::<i64>()?;
            record.digests.extend_from_slice(digest.as_bytes());
            record.seconds.push(seconds);
            record.oldest_seen = Some(record.oldest_seen.map_or(seconds, |s| s.min(seconds)));
        }
        Ok(record)
    }

    /// The state dict, the dedup set, and the two bounds of a record (`decode`'s answer).
    pub(crate) fn dicts_of<'py>(
        &self,
        py: Python<'py>,
        record: &Record,
    ) -> PyResult<super::Decoded<'py>> {
        let state = self.state_dict(py, record)?;
        let width = self.seen_key_bytes.max(1);
        let seen = presized_dict(py, record.seconds.len())?;
        for (digest, seconds) in record.digests.chunks_exact(width).zip(&record.seconds) {
            seen.set_item(PyBytes::new(py, digest), *seconds)?;
        }
        let oldest_seen: Py<PyAny> = match record.oldest_seen {
            Some(second) => second.into_pyobject(py)?.into_any().unbind(),
            None => f64::INFINITY.into_pyobject(py)?.into_any().unbind(),
        };
        Ok((state, seen, record.next_expiry, oldest_seen))
    }

    /// The first byte is the format this version reads (a record of another version is
    /// refused, not misread).
    pub(crate) fn check_format(&self, blob: &[u8]) -> PyResult<()> {
        match blob.first() {
            Some(&first) if first == self.tags.format => Ok(()),
            first => Err(CorruptData::new_err(format!(
                "not a feature record of format {} (first byte {}); written by another \
                 dealstream version?",
                self.tags.format,
                first.map_or("none: empty".to_owned(), |byte| format!("{byte:#04x}"))
            ))),
        }
    }

    /// Apply one update's operations; returns the earliest expiry of the fields it created.
    fn apply_ops(
        &self,
        py: Python<'_>,
        record: &mut Record,
        ops: &Bound<'_, PyAny>,
    ) -> PyResult<f64> {
        let mut expiry = f64::INFINITY;
        for op in ops.try_iter()? {
            let op = op?;
            let op = op.cast::<PyTuple>()?;
            let kind = op.get_item(0)?;
            let kind = kind.cast::<PyString>()?.to_str()?;
            let name = op.get_item(1)?;
            let name = name.cast::<PyString>()?.to_str()?;
            let value = number(&op.get_item(2)?)?;
            let (key, expires_at) = self.key_of(py, name)?;
            match record.find(&key) {
                Some(position) => {
                    let field = &mut record.fields[position];
                    match kind {
                        // Python's `(current or 0.0) + value`
                        "i" => {
                            field.value = if field.value == 0.0 { 0.0 } else { field.value } + value
                        }
                        "x" => {
                            if value > field.value {
                                field.value = value;
                            }
                        }
                        "n" => {
                            if value < field.value {
                                field.value = value;
                            }
                        }
                        _ => return Err(unknown_operation(kind)),
                    }
                }
                None => {
                    let value = match kind {
                        "i" => 0.0 + value,
                        "x" | "n" => value,
                        _ => return Err(unknown_operation(kind)),
                    };
                    expiry = expiry.min(expires_at);
                    record.push(Field {
                        key,
                        value,
                        expires_at,
                    });
                }
            }
        }
        Ok(expiry)
    }
}

fn unknown_operation(kind: &str) -> PyErr {
    PyValueError::new_err(format!("unknown state operation {kind:?}"))
}

/// The 40-bit (`seen_key_bytes`) BLAKE2b digest of an event id (`seen_key`).
fn seen_digest(event_id: &str, width: usize) -> PyResult<Vec<u8>> {
    let mut hasher =
        Blake2bVar::new(width).map_err(|_| PyValueError::new_err("bad digest width"))?;
    hasher.update(event_id.as_bytes());
    let mut out = vec![0u8; width];
    hasher
        .finalize_variable(&mut out)
        .map_err(|_| PyValueError::new_err("bad digest width"))?;
    Ok(out)
}

#[pymethods]
impl RecordCodec {
    /// `seen_key(event_id)`: what a dedup set remembers of an event id (BLAKE2b, as many
    /// bytes as `seen_key_bytes`).
    fn seen_key<'py>(&self, py: Python<'py>, event_id: &str) -> PyResult<Bound<'py, PyBytes>> {
        Ok(PyBytes::new(
            py,
            &seen_digest(event_id, self.seen_key_bytes)?,
        ))
    }

    /// The state dict alone of a record (no dedup set): what a reader of features needs.
    fn decode_state<'py>(&self, py: Python<'py>, blob: &[u8]) -> PyResult<Bound<'py, PyDict>> {
        self.memos.borrow_mut().bound();
        self.check_format(blob)?;
        let record = self.read(py, blob)?;
        self.state_dict(py, &record)
    }

    /// The latest event time a record's header holds (0: none, or not a whole positive ms).
    fn latest_time(&self, blob: &[u8]) -> PyResult<i64> {
        self.check_format(blob)?;
        let mut data = Reader {
            data: blob,
            pos: 1,
            thing: RECORD,
        };
        i64::try_from(data.varint()?).map_err(|_| corrupt("OverflowError", 1))
    }

    /// The store's rules applied to a micro-batch of records held as bytes
    /// (`engine/features/store.py` states them; `apply_updates` there is the caller).
    ///
    /// `records`: user -> record bytes, updated in place for every user whose record changed
    /// (and moved to the end, so that its order is the order of the last writes);
    /// `watermarks`: (source, partition) -> offset, updated in place; `updates`: the batch's
    /// `StateUpdate`s; `forgotten`: users with a live tombstone; `statuses`: the five status
    /// objects, by code. Returns the statuses, every user's bytes before the batch (None: a
    /// new user; forgotten users are left out), the users whose record changed, in the
    /// order they were first changed, and how many bytes their records grew by in all.
    #[pyo3(signature = (records, watermarks, updates, *, allowed_lateness_ms, forgotten, statuses))]
    #[allow(clippy::too_many_arguments)]
    fn apply_updates<'py>(
        &self,
        py: Python<'py>,
        records: &Bound<'py, PyDict>,
        watermarks: &Bound<'py, PyDict>,
        updates: &Bound<'py, PyAny>,
        allowed_lateness_ms: i64,
        forgotten: &Bound<'py, PyAny>,
        statuses: [Bound<'py, PyAny>; 5],
    ) -> PyResult<Applied<'py>> {
        self.memos.borrow_mut().bound();
        let [applied, redelivered, duplicate, late, forgotten_status] = statuses;
        let check_forgotten = forgotten.is_truthy()?;
        let width = self.seen_key_bytes;
        let out = PyList::empty(py);
        let mut entries: Vec<Entry> = Vec::new();
        let mut index_of: HashMap<String, usize, BuildHasherDefault<Fnv>> = HashMap::default();
        let mut marks = Marks::default();
        let mut order: Vec<usize> = Vec::new();

        for update in updates.try_iter()? {
            let update = update?;
            let update = update.cast::<PyTuple>()?;
            let user = update.get_item(0)?;
            let user = user.cast_into::<PyString>()?;
            let position = update.get_item(4)?;
            if check_forgotten && forgotten.contains(&user)? {
                // redelivered as any other, else forgotten (the watermark moves past it)
                let status = match marks.of(watermarks, &position)? {
                    Some((mark, offset)) => {
                        if mark.redelivered(offset) {
                            &redelivered
                        } else {
                            &forgotten_status
                        }
                    }
                    None => &forgotten_status,
                };
                out.append(status)?;
                continue;
            }
            let name = user.to_str()?;
            let at = match index_of.get(name) {
                Some(&at) => at,
                None => {
                    let (before, record) = match records.get_item(&user)? {
                        Some(blob) => {
                            let blob = blob.cast_into::<PyBytes>()?;
                            self.check_format(blob.as_bytes())?;
                            let record = self.read(py, blob.as_bytes())?;
                            (Some(blob.unbind()), record)
                        }
                        None => (None, Record::empty()),
                    };
                    entries.push(Entry {
                        user: user.clone().unbind(),
                        before,
                        record,
                        touched: false,
                    });
                    index_of.insert(name.to_owned(), entries.len() - 1);
                    entries.len() - 1
                }
            };
            if let Some((mark, offset)) = marks.of(watermarks, &position)? {
                if mark.redelivered(offset) {
                    out.append(&redelivered)?;
                    continue;
                }
            }
            let entry = &mut entries[at];
            let record = &mut entry.record;
            let ts = integer_of(&update.get_item(2)?, "ts")?;
            if !update.get_item(5)?.is_truthy()? {
                if let Some(latest) = record.latest() {
                    if (ts as f64) < latest - allowed_lateness_ms as f64 {
                        out.append(&late)?;
                        continue;
                    }
                }
            }
            let event_id = update.get_item(1)?;
            let digest = seen_digest(event_id.cast::<PyString>()?.to_str()?, width)?;
            if record.has_seen(&digest) {
                out.append(&duplicate)?;
                continue;
            }
            let expiry = self.apply_ops(py, record, &update.get_item(3)?)?;
            record.next_expiry = record.next_expiry.min(expiry);
            let second = second_up(ts);
            record.digests.extend_from_slice(&digest);
            record.seconds.push(second);
            record.oldest_seen = Some(record.oldest_seen.map_or(second, |s| s.min(second)));
            if !entry.touched {
                entry.touched = true;
                order.push(at);
            }
            out.append(&applied)?;
        }

        for mark in &marks.list {
            if mark.moved {
                watermarks.set_item(mark.key.bind(py), mark.offset)?;
            }
        }
        let touched = PyList::empty(py);
        let mut grown: i64 = 0;
        for &at in &order {
            // Trim and prune only when something is due: both scan the whole record, and
            // skipping them when nothing would go leaves exactly the same record.
            let entry = &mut entries[at];
            let record = &mut entry.record;
            let latest = record.latest();
            if let Some(latest) = latest {
                let latest = latest.trunc();
                if latest >= record.next_expiry {
                    record.trim(latest);
                }
            }
            let latest_ms = latest.map_or(0, |latest| latest.trunc() as i64);
            let horizon = second_up(latest_ms - allowed_lateness_ms);
            if record.oldest_seen.is_some_and(|oldest| oldest < horizon) {
                record.prune(horizon, width);
            }
            let written = self.write(py, record)?;
            let old_len = entry
                .before
                .as_ref()
                .map_or(0, |b| b.bind(py).as_bytes().len());
            grown += written.len() as i64 - old_len as i64;
            let blob = PyBytes::new(py, &written);
            let user = entry.user.bind(py);
            if entry.before.is_some() {
                // to the end: the dict's order is the order its records were last written
                records.del_item(user)?;
            }
            records.set_item(user, blob)?;
            touched.append(user)?;
        }
        let before = presized_dict(py, entries.len())?;
        for entry in &entries {
            before.set_item(
                entry.user.bind(py),
                entry.before.as_ref().map(|b| b.bind(py)),
            )?;
        }
        Ok((out, before, touched, grown))
    }
}
