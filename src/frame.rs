//! Checksummed record framing shared by every persistent structure.
//!
//! One frame on disk, all integers little-endian:
//!
//! ```text
//! 0       4        8         12              20
//! | magic | len u32 | crc32c | sequence u64 | payload (len bytes) |
//! ```
//!
//! `crc32c` covers the length, the sequence and the payload, so a torn or
//! misdirected frame is rejected. Payloads are `postcard`-encoded records.

use serde::{de::DeserializeOwned, Serialize};

/// Size of the frame header in bytes.
pub const FRAME_HEADER_BYTES: usize = 20;
/// Upper bound of one payload, so a corrupt length can never make us allocate wildly.
pub const FRAME_PAYLOAD_BYTES_MAX: usize = 16 << 20;

const _: () = assert!(FRAME_HEADER_BYTES == 4 + 4 + 4 + 8);

/// Why a frame was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// Fewer bytes than a header, or than the header's length says.
    Truncated,
    /// The magic does not match: not a frame, or a different structure.
    BadMagic { found: u32 },
    /// Length above [`FRAME_PAYLOAD_BYTES_MAX`].
    TooLong { len: u32 },
    /// Checksum mismatch: torn or corrupted.
    BadChecksum { stored: u32, computed: u32 },
    /// The payload did not decode.
    Decode(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Truncated => write!(f, "frame truncated"),
            FrameError::BadMagic { found } => write!(f, "bad frame magic {found:#010x}"),
            FrameError::TooLong { len } => write!(f, "frame length {len} above limit"),
            FrameError::BadChecksum { stored, computed } => {
                write!(
                    f,
                    "frame crc32c mismatch: stored {stored:#010x}, computed {computed:#010x}"
                )
            }
            FrameError::Decode(e) => write!(f, "frame payload does not decode: {e}"),
        }
    }
}

impl std::error::Error for FrameError {}

fn frame_crc(len: u32, seq: u64, payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc, &seq.to_le_bytes());
    crc32c::crc32c_append(crc, payload)
}

/// Appends one frame holding `payload` to `out`.
pub fn encode_raw(magic: u32, seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    assert!(
        payload.len() <= FRAME_PAYLOAD_BYTES_MAX,
        "frame payload too large"
    );
    let len = payload.len() as u32;
    out.extend_from_slice(&magic.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&frame_crc(len, seq, payload).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
}

/// Appends one frame holding the postcard encoding of `record` to `out`.
pub fn encode<T: Serialize>(magic: u32, seq: u64, record: &T, out: &mut Vec<u8>) {
    let payload = postcard::to_allocvec(record)
        .expect("postcard encoding of an in-memory record cannot fail");
    encode_raw(magic, seq, &payload, out);
}

/// Decodes the frame at the start of `buf`. Returns `(sequence, payload, frame_len)`.
pub fn decode_raw(magic: u32, buf: &[u8]) -> Result<(u64, &[u8], usize), FrameError> {
    if buf.len() < FRAME_HEADER_BYTES {
        return Err(FrameError::Truncated);
    }
    let word = |at: usize| u32::from_le_bytes(buf[at..at + 4].try_into().unwrap());
    let found = word(0);
    if found != magic {
        return Err(FrameError::BadMagic { found });
    }
    let len = word(4);
    if len as usize > FRAME_PAYLOAD_BYTES_MAX {
        return Err(FrameError::TooLong { len });
    }
    let stored = word(8);
    let seq = u64::from_le_bytes(buf[12..20].try_into().unwrap());
    let end = FRAME_HEADER_BYTES + len as usize;
    if buf.len() < end {
        return Err(FrameError::Truncated);
    }
    let payload = &buf[FRAME_HEADER_BYTES..end];
    let computed = frame_crc(len, seq, payload);
    if computed != stored {
        return Err(FrameError::BadChecksum { stored, computed });
    }
    Ok((seq, payload, end))
}

/// Decodes the frame at the start of `buf` into a record. Returns `(sequence, record, frame_len)`.
pub fn decode<T: DeserializeOwned>(magic: u32, buf: &[u8]) -> Result<(u64, T, usize), FrameError> {
    let (seq, payload, used) = decode_raw(magic, buf)?;
    let record = postcard::from_bytes(payload).map_err(|e| FrameError::Decode(e.to_string()))?;
    Ok((seq, record, used))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let mut out = Vec::new();
        encode(0x4b4c_4e4a, 7, &(1u64, "chunk".to_string()), &mut out);
        let (seq, rec, used): (u64, (u64, String), usize) = decode(0x4b4c_4e4a, &out).unwrap();
        assert_eq!(
            (seq, rec.0, rec.1.as_str(), used),
            (7, 1, "chunk", out.len())
        );
        assert!(matches!(
            decode_raw(0x1234, &out),
            Err(FrameError::BadMagic { .. })
        ));
        assert_eq!(
            decode_raw(0x4b4c_4e4a, &out[..out.len() - 1]).unwrap_err(),
            FrameError::Truncated
        );
        let mut torn = out.clone();
        *torn.last_mut().unwrap() ^= 1;
        assert!(matches!(
            decode_raw(0x4b4c_4e4a, &torn),
            Err(FrameError::BadChecksum { .. })
        ));
    }
}
