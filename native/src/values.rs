//! A feature vector as short text: how pending decisions and outbox entries keep their
//! features in Redis (`stored_features`, `engine/features/catalogue.py`).
//!
//! Most of a vector's values are small counts, zeros, or the same cap repeated (a recency
//! never seen), which JSON spells out one by one. Here the values go in runs of bitwise
//! equal values. A run is a varint header `(length - 1) << 2 | kind`, then by kind:
//! - `INTEGRAL`: the value as a zig-zag varint of its difference from the previous integral
//!   run's (the first from 0);
//! - `DECIMAL`: a fraction as its shortest decimal that reads back to the same double, `m`
//!   times ten to the `e`: zig-zag varints `e`, then `m` (0.541 takes three bytes);
//! - `DOUBLE`: anything else (-0.0, NaN, infinities), its 8-byte little-endian IEEE double.
//!
//! The bytes are written as base64url without padding, so the text needs no escaping in
//! JSON. Every vector comes back bit for bit.
//!
//! Python sees a vector as the dict the catalogue computes (names in catalogue order):
//! `pack_features` checks its names and packs its values in one pass, `unpack_features` builds
//! the dict back (each about 2.5 µs in Python, where they ran twice per decision and once per
//! label event).

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::{exact_int, invalid, presized_dict, varint, zvarint, Reader, EXACT};

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const PACKED: &str = "packed feature values";
const INTEGRAL: u128 = 0;
const DECIMAL: u128 = 1;
const DOUBLE: u128 = 2;
/// More values than any feature catalogue has: a corrupt run length cannot take the memory.
const MAX_VALUES: usize = 1 << 16;

/// The values of `features` packed (the module docstring) when its names are `names`, in that
/// order; None when they are not (the caller keeps such a vector by name). A value that is
/// not a number is a TypeError.
#[pyfunction]
pub fn pack_features(
    features: &Bound<'_, PyDict>,
    names: &Bound<'_, PyTuple>,
) -> PyResult<Option<String>> {
    if features.len() != names.len() {
        return Ok(None);
    }
    let mut values = Vec::with_capacity(names.len());
    for (index, (name, value)) in features.iter().enumerate() {
        let expected = names.get_item(index)?;
        // The catalogue's dicts share its name objects: identity settles nearly every name.
        if !name.is(&expected) && !name.eq(&expected)? {
            return Ok(None);
        }
        values.push(value.extract::<f64>()?);
    }
    Ok(Some(pack_values(&values)))
}

/// The dict `pack_features` packed: `names` with the values `text` holds (a text with fewer
/// values, written before names were added at the catalogue's end, gives the names it has);
/// ValueError, saying where, for text that was not packed.
#[pyfunction]
pub fn unpack_features<'py>(
    py: Python<'py>,
    text: &str,
    names: &Bound<'py, PyTuple>,
) -> PyResult<Bound<'py, PyDict>> {
    let values = unpack_values(text)?;
    let features = presized_dict(py, values.len().min(names.len()))?;
    for (name, value) in names.iter().zip(values) {
        features.set_item(name, value)?;
    }
    Ok(features)
}

/// `values` packed into base64url text (see the module docstring).
fn pack_values(values: &[f64]) -> String {
    let mut out = Vec::with_capacity(values.len() + 8);
    let mut previous: i128 = 0;
    let mut i = 0;
    while i < values.len() {
        let value = values[i];
        let bits = value.to_bits();
        let mut run = 1;
        while i + run < values.len() && values[i + run].to_bits() == bits {
            run += 1;
        }
        let header = ((run - 1) as u128) << 2;
        if exact_int(value) {
            varint(&mut out, header | INTEGRAL);
            let integral = value as i128;
            zvarint(&mut out, integral - previous);
            previous = integral;
        } else if let Some((mantissa, exponent)) = shortest_decimal(value) {
            varint(&mut out, header | DECIMAL);
            zvarint(&mut out, exponent as i128);
            zvarint(&mut out, mantissa as i128);
        } else {
            varint(&mut out, header | DOUBLE);
            out.extend_from_slice(&value.to_le_bytes());
        }
        i += run;
    }
    base64url(&out)
}

/// The values `pack_values` packed; ValueError, saying where, for any other text.
fn unpack_values(text: &str) -> PyResult<Vec<f64>> {
    let data = from_base64url(text)?;
    let mut reader = Reader {
        data: &data,
        pos: 0,
        thing: PACKED,
    };
    let mut values = Vec::with_capacity(64);
    let mut previous: i128 = 0;
    while reader.pos < data.len() {
        let at = reader.pos;
        let header = reader.varint()?;
        let run = usize::try_from(header >> 2)
            .ok()
            .and_then(|extra| extra.checked_add(1))
            .filter(|&run| values.len() + run <= MAX_VALUES)
            .ok_or_else(|| invalid(PACKED, "OverflowError", at))?;
        let value = match header & 3 {
            INTEGRAL => {
                let at = reader.pos;
                let integral = previous
                    .checked_add(reader.zvarint()?)
                    .filter(|value| value.unsigned_abs() < 1 << 53)
                    .ok_or_else(|| invalid(PACKED, "OverflowError", at))?;
                previous = integral;
                integral as f64
            }
            DECIMAL => {
                let at = reader.pos;
                let exponent = reader.zvarint()?;
                let mantissa = reader.zvarint()?;
                if exponent.unsigned_abs() > 400 || mantissa.unsigned_abs() >= 1 << 64 {
                    return Err(invalid(PACKED, "OverflowError", at));
                }
                decimal(mantissa, exponent).ok_or_else(|| invalid(PACKED, "ValueError", at))?
            }
            DOUBLE => {
                let raw: [u8; 8] = reader.bytes(8)?.try_into().expect("8 bytes");
                f64::from_le_bytes(raw)
            }
            _ => return Err(invalid(PACKED, "unknown run kind", at)),
        };
        values.extend(std::iter::repeat_n(value, run));
    }
    Ok(values)
}

/// Powers of ten a double holds exactly.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// `m * 10**e` as a double. For `-22 <= e <= 0` and `|m| < 2**53` both `m` and `10**-e` are
/// exact, so the division is the correctly rounded value of the decimal, as parsing its text
/// would give (and is one operation, not a formatted string and a parse).
fn decimal(mantissa: i128, exponent: i128) -> Option<f64> {
    if (-22..=0).contains(&exponent) && mantissa.unsigned_abs() < 1 << 53 {
        return Some(mantissa as f64 / POW10[exponent.unsigned_abs() as usize]);
    }
    format!("{mantissa}e{exponent}").parse::<f64>().ok()
}

/// `(m, e)` with `m * 10**e` the shortest decimal that reads back as `value` (Rust prints
/// floats that way), when it reads back bit for bit; None for -0.0, NaN and infinities.
/// A fraction of up to 9 decimals (most features) is found by scaling, without formatting.
fn shortest_decimal(value: f64) -> Option<(i64, i32)> {
    if !value.is_finite() || value == 0.0 {
        return None;
    }
    for (digits, power) in POW10.iter().enumerate().take(10).skip(1) {
        let mantissa = (value * power).round();
        if mantissa.abs() < EXACT && (mantissa / power).to_bits() == value.to_bits() {
            return Some((mantissa as i64, -(digits as i32)));
        }
    }
    let text = format!("{value:e}");
    let (digits, exponent) = text.split_once('e')?;
    let exponent: i32 = exponent.parse().ok()?;
    let fraction = digits.split_once('.').map_or(0, |(_, f)| f.len());
    let mantissa: i64 = digits.replace('.', "").parse().ok()?;
    let exponent = exponent - i32::try_from(fraction).ok()?;
    let back: f64 = format!("{mantissa}e{exponent}").parse().ok()?;
    (back.to_bits() == value.to_bits()).then_some((mantissa, exponent))
}

fn base64url(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let group = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (k, &byte)| acc | (byte as u32) << (16 - 8 * k));
        for k in 0..=chunk.len() {
            text.push(ALPHABET[(group >> (18 - 6 * k) & 0x3F) as usize] as char);
        }
    }
    text
}

fn from_base64url(text: &str) -> PyResult<Vec<u8>> {
    let mut bytes = Vec::with_capacity(text.len() * 3 / 4);
    let (mut group, mut bits) = (0u32, 0u32);
    for (pos, &char) in text.as_bytes().iter().enumerate() {
        let sextet = match char {
            b'A'..=b'Z' => char - b'A',
            b'a'..=b'z' => char - b'a' + 26,
            b'0'..=b'9' => char - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return Err(invalid(PACKED, "not base64url", pos)),
        };
        group = (group << 6) | sextet as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            bytes.push((group >> bits) as u8);
            group &= (1 << bits) - 1;
        }
    }
    if bits >= 6 || group != 0 {
        return Err(invalid(PACKED, "not base64url", text.len()));
    }
    Ok(bytes)
}
