//! Byte encodings shared by the stores: big-endian index keys and
//! checksummed bincode values.
//!
//! Every value the stores write carries a CRC32 of its bytes, so a flipped bit
//! on disk is reported as corruption (and stops the node) instead of being
//! decoded into a wrong but plausible entry.

use std::io;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Encodes a log index so that byte order equals numeric order.
pub fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// Decodes a key written by [`index_key`].
pub fn key_index(key: &[u8]) -> io::Result<u64> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("log key of {} bytes, want 8", key.len()),
        )
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// Serializes `value` as `crc32 (LE) ++ bincode(value)`.
pub fn encode<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    // One pass into a buffer that already holds room for the checksum:
    // `bincode::serialize` would walk the value once more to size its own
    // buffer, and the body would then be copied behind the checksum.
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&[0; 4]);
    bincode::serialize_into(&mut out, value).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let crc = crc32fast::hash(&out[4..]);
    out[..4].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Verifies the checksum and deserializes a value written by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> io::Result<T> {
    if bytes.len() < 4 {
        return Err(corrupt(what, "shorter than its checksum"));
    }
    let (crc, body) = bytes.split_at(4);
    let want = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32fast::hash(body) != want {
        return Err(corrupt(what, "checksum mismatch"));
    }
    bincode::deserialize(body).map_err(|e| corrupt(what, &e.to_string()))
}

/// An `InvalidData` error naming what was found corrupt.
pub fn corrupt(what: &str, why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("corrupt {what}: {why}"))
}

/// Converts a RocksDB error into an I/O error.
#[cfg(feature = "rocksdb")]
pub fn db_err(e: rocksdb::Error) -> io::Error {
    io::Error::other(e.into_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bit_flip_detection() {
        let v = (7u64, "hello".to_string());
        let mut bytes = encode(&v).unwrap();
        assert_eq!(decode::<(u64, String)>(&bytes, "x").unwrap(), v);
        for i in 0..bytes.len() {
            bytes[i] ^= 0x10;
            assert!(
                decode::<(u64, String)>(&bytes, "x").is_err(),
                "flip at byte {i} undetected"
            );
            bytes[i] ^= 0x10;
        }
        assert!(decode::<u64>(&[1, 2], "x").is_err());
    }

    #[test]
    fn one_pass_encoding_matches_bincode() {
        // Stored data written by earlier versions must keep decoding, and
        // theirs must match ours byte for byte.
        for n in [0usize, 1, 508, 509, 5000] {
            let v = (n as u64, vec![3u8; n]);
            let bytes = encode(&v).unwrap();
            let body = bincode::serialize(&v).unwrap();
            assert_eq!(&bytes[4..], &body[..]);
            assert_eq!(&bytes[..4], &crc32fast::hash(&body).to_le_bytes());
        }
    }

    #[test]
    fn index_keys_sort_numerically() {
        assert!(index_key(255) < index_key(256));
        assert_eq!(key_index(&index_key(42)).unwrap(), 42);
        assert!(key_index(&[1, 2, 3]).is_err());
    }
}
