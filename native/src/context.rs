//! The one pass over a user's state that every feature vector starts from
//! (`build_context` in `engine/features/catalogue.py`): window sums per code, the current
//! session's events, the days with a purchase, category activity over 7 and 30 days.
//!
//! It runs for every trigger event over every field of the user's state (dozens for a shopper
//! with history), which in Python was most of a feature vector's cost. The fields are read in
//! the dict's order and every sum is taken in the same order as the Python loop was, so the
//! results are the same doubles.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use super::record::Key;
use super::{number, Fnv, RecordCodec};

/// What the pass needs to know of the catalogue's windows (`engine/features/state.py`).
pub(crate) struct ContextConfig {
    /// Per window, in `WINDOWS` order: its grain slot (0 minute, 1 hour, 2 day) and buckets.
    pub(crate) windows: Vec<(usize, i64)>,
    /// The record's bucket codes (`v`, `$`, ...): the keys of the window sums. Codes the
    /// record has no tag for (a field stored verbatim) follow them (`Memos::extra_codes`).
    pub(crate) codes: Vec<Py<PyString>>,
    /// Per code of `codes`: whether it is an activity kind (counted in sessions).
    pub(crate) activity: Vec<bool>,
    /// Per bucket tag: its code's position in `codes` (0 for a tag that is not a bucket's).
    pub(crate) code_of_tag: Vec<usize>,
    /// The purchase code's position in `codes`.
    pub(crate) purchase: usize,
    pub(crate) session_gap_minutes: i64,
    /// Days of category activity: the short and the long window.
    pub(crate) category_days: (i64, i64),
    /// Days over which days with a purchase are counted.
    pub(crate) purchase_days: i64,
}

/// `(sums, session_events, purchase_days, categories_short, categories_long)`.
pub(crate) type Context<'py> = (
    Bound<'py, PyDict>,
    f64,
    i64,
    Bound<'py, PyDict>,
    Bound<'py, PyDict>,
);

/// How one field of the state counts.
#[derive(Clone, Copy)]
pub(crate) enum Kind {
    /// A bucket: its code (a position in `ContextConfig::codes`, then `Memos::extra_codes`),
    /// grain slot, index.
    Bucket(usize, usize, i64),
    /// A category-day: the day and the category (interned).
    Category(i64, u32),
    Neither,
}

impl RecordCodec {
    /// What a state field is for the pass.
    fn kind_of(&self, py: Python<'_>, name: &Bound<'_, PyString>) -> PyResult<Kind> {
        let (key, _) = self.key_of(py, name.to_str()?)?;
        Ok(match key {
            Key::Bucket(tag, index) => match self.tag_slot[tag as usize] {
                Some(slot) => Kind::Bucket(self.context.code_of_tag[tag as usize], slot, index),
                None => Kind::Neither,
            },
            Key::Category(day, id) => Kind::Category(day, id),
            // A name that parses as a bucket without spelling one exactly (`vm007`) counts as
            // that bucket, as `parsed_field` says; anything else is a scalar.
            Key::Other(id) => self.other_kind(py, id, name)?,
            Key::Lt | Key::Time(_) | Key::Count(_) | Key::Offer => Kind::Neither,
        })
    }

    /// The parse of an odd name (asked of `parsed_field` once per name).
    fn other_kind(&self, py: Python<'_>, id: u32, name: &Bound<'_, PyString>) -> PyResult<Kind> {
        if let Some(&kind) = self.memos.borrow().parsed.map.get(&id) {
            return Ok(kind);
        }
        let parsed = self.meanings.parsed.bind(py).call1((name,))?;
        let (slot, index, code, _): (i64, i64, String, f64) = parsed.extract()?;
        let kind = match slot {
            0..=2 => {
                let known = &self.context.codes;
                let position = known
                    .iter()
                    .position(|c| c.bind(py).to_str().ok() == Some(&code));
                let position = match position {
                    Some(position) => position,
                    None => {
                        let mut memos = self.memos.borrow_mut();
                        let extra = &mut memos.extra_codes;
                        let at = extra
                            .iter()
                            .position(|c| c.bind(py).to_str().ok() == Some(&code));
                        known.len()
                            + at.unwrap_or_else(|| {
                                extra.push(PyString::new(py, &code).unbind());
                                extra.len() - 1
                            })
                    }
                };
                Kind::Bucket(position, slot as usize, index)
            }
            3 => Kind::Category(index, self.memos.borrow_mut().texts.id(code.as_bytes())),
            _ => Kind::Neither,
        };
        self.memos.borrow_mut().parsed.insert(id, kind);
        Ok(kind)
    }

    /// Events in the run of active minutes ending at `minute` with no gap of
    /// `session_gap_minutes` or more, newest first (`_session_events` said the same).
    fn session_events(
        &self,
        minutes: &HashMap<i64, f64, BuildHasherDefault<Fnv>>,
        minute: i64,
    ) -> f64 {
        let config = &self.context;
        let mut active: Vec<(i64, f64)> = minutes.iter().map(|(&m, &c)| (m, c)).collect();
        active.sort_unstable_by_key(|entry| std::cmp::Reverse(entry.0));
        let mut total = 0.0;
        let mut previous = minute + 1;
        let oldest = minute - self.retention[0];
        for (index, count) in active {
            if index > minute {
                continue;
            }
            if index <= oldest || previous - index > config.session_gap_minutes {
                break;
            }
            if count != 0.0 {
                total += count;
                previous = index;
            }
        }
        total
    }

    /// An interned text as a Python string (remembered per text).
    fn text_name(&self, py: Python<'_>, id: u32) -> Py<PyString> {
        if let Some(name) = self.memos.borrow().text_names.map.get(&id) {
            return name.clone_ref(py);
        }
        let name = {
            let memos = self.memos.borrow();
            let text =
                std::str::from_utf8(&memos.texts.texts[id as usize]).expect("interned from a str");
            PyString::new(py, text).unbind()
        };
        self.memos
            .borrow_mut()
            .text_names
            .insert(id, name.clone_ref(py));
        name
    }
}

#[pymethods]
impl RecordCodec {
    /// The one pass over a state dict a feature vector reads, as of event time `now`:
    /// `(sums, session_events, purchase_days, categories_short, categories_long)`.
    fn context<'py>(
        &self,
        py: Python<'py>,
        state: &Bound<'py, PyDict>,
        now: i64,
    ) -> PyResult<Context<'py>> {
        self.memos.borrow_mut().bound();
        let config = &self.context;
        let current = [
            now.div_euclid(self.slot_ms[0]),
            now.div_euclid(self.slot_ms[1]),
            now.div_euclid(self.slot_ms[2]),
        ];
        let today = now.div_euclid(self.slot_ms[3]);
        let (short_days, long_days) = config.category_days;
        let windows = config.windows.len();
        // code (`code_of_tag`) -> its sums, in the order of their first field
        let mut sums: Vec<(usize, Vec<f64>)> = Vec::new();
        let mut minutes: HashMap<i64, f64, BuildHasherDefault<Fnv>> = HashMap::default();
        // category (interned) -> (short sum, long sum, seen in the short window), in the order
        // of their first field in the long window; and the order of their first in the short
        let mut categories: Vec<(u32, f64, f64, bool)> = Vec::new();
        let mut short_order: Vec<usize> = Vec::new();
        let mut purchase_days: i64 = 0;
        for (name, value) in state.iter() {
            let name = name.cast_into::<PyString>()?;
            let kind = self.kind_of(py, &name)?;
            match kind {
                Kind::Neither => {}
                Kind::Category(day, category) => {
                    let age = today - day;
                    if (0..long_days).contains(&age) {
                        let value = number(&value)?;
                        let at = match categories.iter().position(|entry| entry.0 == category) {
                            Some(at) => at,
                            None => {
                                categories.push((category, 0.0, 0.0, false));
                                categories.len() - 1
                            }
                        };
                        let entry = &mut categories[at];
                        entry.2 += value;
                        if age < short_days {
                            entry.1 += value;
                            if !entry.3 {
                                entry.3 = true;
                                short_order.push(at);
                            }
                        }
                    }
                }
                Kind::Bucket(code, slot, index) => {
                    let age = current[slot] - index;
                    if age < 0 {
                        continue;
                    }
                    let value = number(&value)?;
                    for (window, &(window_slot, buckets)) in config.windows.iter().enumerate() {
                        if window_slot == slot && age < buckets {
                            let at = match sums.iter().position(|(known, _)| *known == code) {
                                Some(at) => at,
                                None => {
                                    sums.push((code, vec![0.0; windows]));
                                    sums.len() - 1
                                }
                            };
                            sums[at].1[window] += value;
                        }
                    }
                    if slot == 0 {
                        if config.activity.get(code).copied().unwrap_or(false) {
                            *minutes.entry(index).or_insert(0.0) += value;
                        }
                    } else if slot == 2
                        && code == config.purchase
                        && age < config.purchase_days
                        && value > 0.0
                    {
                        purchase_days += 1;
                    }
                }
            }
        }
        let sums_dict = PyDict::new(py);
        let memos = self.memos.borrow();
        for &(code, ref totals) in &sums {
            let name = match config.codes.get(code) {
                Some(name) => name,
                None => &memos.extra_codes[code - config.codes.len()],
            };
            sums_dict.set_item(name.bind(py), PyList::new(py, totals)?)?;
        }
        drop(memos);
        let short = PyDict::new(py);
        let long = PyDict::new(py);
        for &(category, _, long_sum, _) in &categories {
            long.set_item(self.text_name(py, category).bind(py), long_sum)?;
        }
        for &at in &short_order {
            let (category, short_sum, ..) = categories[at];
            short.set_item(self.text_name(py, category).bind(py), short_sum)?;
        }
        Ok((
            sums_dict,
            self.session_events(&minutes, current[0]),
            purchase_days,
            short,
            long,
        ))
    }
}
