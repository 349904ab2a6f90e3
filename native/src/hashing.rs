//! Hashes the engine and the adapters compute for every decision or user, as Python's
//! `hashlib` and `hmac` compute them (the tests compare them on random text):
//! - `stable_id` and `unit_hash` (`engine/decisions.py`): BLAKE2b of the parts joined by
//!   U+001F, as an id (hex) or a uniform draw in [0, 1);
//! - `PseudonymKey` (`streams/adapters/pseudonyms.py`): the key id and the first 16 bytes of
//!   HMAC-SHA256(key, user id) in base64url without padding.
//!
//! In Python each cost about a microsecond, so the worker remembered pseudonyms and holdout
//! groups per user (about 160 bytes a user); compiled they cost less than the memo lookups did.

use blake2::digest::{Update, VariableOutput};
use blake2::Blake2bVar;
use hmac::{Hmac, Mac};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple};
use sha2::Sha256;

const SEPARATOR: &[u8] = b"\x1f";
const HEX: &[u8; 16] = b"0123456789abcdef";
const BASE64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const PSEUDONYM_BYTES: usize = 16;

/// BLAKE2b with a `size`-byte digest (its parameter block says the size, as hashlib's
/// `digest_size` does) of the parts' UTF-8 joined by U+001F.
fn blake2b_joined<const N: usize>(parts: &Bound<'_, PyTuple>) -> PyResult<[u8; N]> {
    let mut hasher = Blake2bVar::new(N).map_err(|_| PyValueError::new_err("bad digest size"))?;
    for (index, part) in parts.iter().enumerate() {
        if index > 0 {
            hasher.update(SEPARATOR);
        }
        hasher.update(part.cast::<PyString>()?.to_str()?.as_bytes());
    }
    let mut digest = [0u8; N];
    hasher
        .finalize_variable(&mut digest)
        .map_err(|_| PyValueError::new_err("bad digest size"))?;
    Ok(digest)
}

/// `prefix` + the hex of a 12-byte BLAKE2b of the parts.
#[pyfunction]
#[pyo3(signature = (prefix, *parts))]
pub fn stable_id(prefix: &str, parts: &Bound<'_, PyTuple>) -> PyResult<String> {
    let digest = blake2b_joined::<12>(parts)?;
    let mut id = String::with_capacity(prefix.len() + 24);
    id.push_str(prefix);
    for byte in digest {
        id.push(HEX[(byte >> 4) as usize] as char);
        id.push(HEX[(byte & 15) as usize] as char);
    }
    Ok(id)
}

/// An 8-byte BLAKE2b of the parts, big-endian, divided by 2**64 (exact: a power of two).
#[pyfunction]
#[pyo3(signature = (*parts))]
pub fn unit_hash(parts: &Bound<'_, PyTuple>) -> PyResult<f64> {
    let digest = blake2b_joined::<8>(parts)?;
    Ok(u64::from_be_bytes(digest) as f64 / 18_446_744_073_709_551_616.0)
}

/// base64url of `data`, without padding.
fn base64url(data: &[u8], out: &mut String) {
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..=chunk.len() {
            out.push(BASE64URL[((n >> (18 - 6 * k)) & 63) as usize] as char);
        }
    }
}

/// A pseudonym key: the HMAC's state after the key, kept so that each user costs only the
/// hashing of its id.
#[pyclass(frozen, module = "dealstream_native")]
pub struct PseudonymKey {
    mac: Hmac<Sha256>,
    key_id: String,
}

#[pymethods]
impl PseudonymKey {
    #[new]
    fn new(key: &[u8], key_id: String) -> PyResult<Self> {
        let mac = Hmac::<Sha256>::new_from_slice(key)
            .map_err(|_| PyValueError::new_err("a pseudonym key cannot be used as an HMAC key"))?;
        Ok(Self { mac, key_id })
    }

    /// `<key id>.` + base64url of the first 16 bytes of HMAC-SHA256(key, user id's UTF-8).
    fn of(&self, user_id: &str) -> String {
        let digest = self
            .mac
            .clone()
            .chain_update(user_id.as_bytes())
            .finalize()
            .into_bytes();
        let mut pseudonym = String::with_capacity(self.key_id.len() + 23);
        pseudonym.push_str(&self.key_id);
        pseudonym.push('.');
        base64url(&digest[..PSEUDONYM_BYTES], &mut pseudonym);
        pseudonym
    }
}
