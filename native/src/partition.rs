//! The partition Kafka's default partitioner gives a keyed record: murmur2 of the key (Java's
//! `Utils.murmur2`), made positive, modulo the partition count. Every Kafka client computes
//! it the same way; the worker checks each event record's partition against it
//! (co-partitioned topics) and the outbox replays records to it.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

const SEED: u32 = 0x9747_B28C;
const M: u32 = 0x5BD1_E995;
const R: u32 = 24;

/// Java's `Utils.murmur2` as an unsigned 32-bit value.
fn murmur2(data: &[u8]) -> u32 {
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition of `partitions` that Kafka's default partitioner gives `key`.
#[pyfunction]
pub fn default_partition(key: &[u8], partitions: u32) -> PyResult<u32> {
    if partitions == 0 {
        return Err(PyValueError::new_err("a topic has at least one partition"));
    }
    Ok((murmur2(key) & 0x7FFF_FFFF) % partitions)
}
