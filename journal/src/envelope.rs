//! The record envelope: every record a journal stores is wrapped in one.
//!
//! ```text
//! offset size field
//!      0    2 magic            b"ES"
//!      2    1 format version   FORMAT_VERSION
//!      3    1 kind             1 = event, 2 = snapshot, 3 = Kafka journal entry
//!      4    1 codec id         0 = raw bytes, 1 = bincode 2, 2 = JSON, others: user codecs
//!      5    1 reserved         0 (anything else is refused)
//!      6    2 type version     u16 LE, the payload type's schema version (for upcasting)
//!      8    8 timestamp        u64 LE, milliseconds since the Unix epoch
//!     16    4 payload length   u32 LE
//!     20    4 CRC32            u32 LE over bytes 0..20 and the payload
//!     24    n payload
//! ```
//!
//! The CRC covers the header too, so a flipped codec id or length is caught just like a flipped payload
//! byte. Decoding checks everything before it hands out a payload.

use crate::error::EnvelopeError;

/// The two bytes every envelope starts with.
pub const MAGIC: [u8; 2] = *b"ES";
/// The newest envelope format this build reads and the one it writes.
pub const FORMAT_VERSION: u8 = 1;
/// Length of the fixed header in front of the payload.
pub const HEADER_LEN: usize = 24;

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// One event of one entity.
    Event = 1,
    /// The whole state of one entity after some sequence number.
    Snapshot = 2,
    /// A Kafka journal entry: a key's new events and its state after them.
    Entry = 3,
    /// Consecutive events of one entity written in one batch, as one record (the sled journal's
    /// grouped appends): `u64 LE` first seq, `u32 LE` count, then per event `u32 LE` length and
    /// its event envelope.
    Events = 4,
}

impl RecordKind {
    fn from_byte(b: u8) -> Result<Self, EnvelopeError> {
        match b {
            1 => Ok(Self::Event),
            2 => Ok(Self::Snapshot),
            3 => Ok(Self::Entry),
            4 => Ok(Self::Events),
            other => Err(EnvelopeError::UnknownKind(other)),
        }
    }
}

/// Identifies how a payload is encoded. The journal never looks inside payloads; the id lets readers
/// (the stage runtime, the CLI) pick a decoder, or fall back to showing raw bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CodecId(pub u8);

impl CodecId {
    /// Opaque bytes.
    pub const RAW: CodecId = CodecId(0);
    /// serde through bincode 2 (standard config). The default for stages.
    pub const BINCODE: CodecId = CodecId(1);
    /// serde through JSON.
    pub const JSON: CodecId = CodecId(2);

    /// A short human name: `raw`, `bincode`, `json` or `codec-N`.
    pub fn name(self) -> String {
        match self {
            Self::RAW => "raw".into(),
            Self::BINCODE => "bincode".into(),
            Self::JSON => "json".into(),
            CodecId(n) => format!("codec-{n}"),
        }
    }
}

/// The header of an envelope: magic, format version, kind, codec, type version, timestamp,
/// payload length, and the CRC-32 of those 20 bytes and the payload.
///
/// # Panics
/// If the payload is 4 GiB or larger (the length field is 32 bits); the stage runtime rejects such
/// payloads with an error before they get here.
fn header(kind: RecordKind, codec: CodecId, type_version: u16, timestamp_ms: u64, payload: &[u8]) -> [u8; HEADER_LEN] {
    let len = u32::try_from(payload.len()).expect("envelope payloads are limited to 4 GiB");
    let mut h = [0u8; HEADER_LEN];
    h[..2].copy_from_slice(&MAGIC);
    h[2] = FORMAT_VERSION;
    h[3] = kind as u8;
    h[4] = codec.0;
    h[6..8].copy_from_slice(&type_version.to_le_bytes());
    h[8..16].copy_from_slice(&timestamp_ms.to_le_bytes());
    h[16..20].copy_from_slice(&len.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[..20]);
    crc.update(payload);
    h[20..].copy_from_slice(&crc.finalize().to_le_bytes());
    h
}

/// A decoded envelope: metadata plus the payload bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Event or snapshot.
    pub kind: RecordKind,
    /// How the payload is encoded.
    pub codec: CodecId,
    /// Schema version of the payload type, for upcasting old records.
    pub type_version: u16,
    /// When the record was written, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The encoded payload.
    pub payload: Vec<u8>,
}

impl Envelope {
    /// An event envelope.
    pub fn event(codec: CodecId, type_version: u16, timestamp_ms: u64, payload: Vec<u8>) -> Self {
        Self { kind: RecordKind::Event, codec, type_version, timestamp_ms, payload }
    }

    /// A snapshot envelope.
    pub fn snapshot(codec: CodecId, type_version: u16, timestamp_ms: u64, payload: Vec<u8>) -> Self {
        Self { kind: RecordKind::Snapshot, codec, type_version, timestamp_ms, payload }
    }

    /// The encoded length of this envelope.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// Appends the encoded envelope to `out`.
    ///
    /// # Panics
    /// If the payload is 4 GiB or larger (the length field is 32 bits); the stage runtime rejects
    /// such payloads with an error before they get here.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.extend_from_slice(&header(self.kind, self.codec, self.type_version, self.timestamp_ms, &self.payload));
        out.extend_from_slice(&self.payload);
    }

    /// An envelope's encoding built in place: `buf` holds [`HEADER_LEN`] bytes of any value, then
    /// the payload; the header is written over the first bytes (the payload is not copied).
    ///
    /// # Panics
    /// If `buf` is shorter than [`HEADER_LEN`], or the payload is 4 GiB or larger.
    pub fn seal(kind: RecordKind, codec: CodecId, type_version: u16, timestamp_ms: u64, mut buf: Vec<u8>) -> Vec<u8> {
        let h = header(kind, codec, type_version, timestamp_ms, &buf[HEADER_LEN..]);
        buf[..HEADER_LEN].copy_from_slice(&h);
        buf
    }

    /// The encoded envelope.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// Decodes and checks an envelope: magic, version, length and CRC.
    ///
    /// # Errors
    /// An [`EnvelopeError`] saying what is wrong with the bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let header = Self::check(bytes)?;
        Ok(Self {
            kind: header.kind,
            codec: header.codec,
            type_version: header.type_version,
            timestamp_ms: header.timestamp_ms,
            payload: bytes[HEADER_LEN..].to_vec(),
        })
    }

    /// Checks an envelope and returns its header without copying the payload
    /// (which is `&bytes[HEADER_LEN..]`).
    ///
    /// # Errors
    /// An [`EnvelopeError`] saying what is wrong with the bytes.
    pub fn check(bytes: &[u8]) -> Result<Header, EnvelopeError> {
        if bytes.len() < HEADER_LEN {
            return Err(EnvelopeError::Truncated { len: bytes.len(), needed: HEADER_LEN });
        }
        if bytes[0..2] != MAGIC {
            return Err(EnvelopeError::BadMagic { found: [bytes[0], bytes[1]] });
        }
        if bytes[2] > FORMAT_VERSION {
            return Err(EnvelopeError::NewerFormat { found: bytes[2], supported: FORMAT_VERSION });
        }
        if bytes[2] == 0 {
            return Err(EnvelopeError::BadFormat { found: bytes[2] });
        }
        let declared = u32::from_le_bytes(le4(&bytes[16..20])) as usize;
        let actual = bytes.len() - HEADER_LEN;
        if declared != actual {
            return Err(EnvelopeError::LengthMismatch { declared, actual });
        }
        let stored = u32::from_le_bytes(le4(&bytes[20..24]));
        let mut crc = crc32fast::Hasher::new();
        crc.update(&bytes[0..20]);
        crc.update(&bytes[HEADER_LEN..]);
        let computed = crc.finalize();
        if stored != computed {
            return Err(EnvelopeError::CrcMismatch { stored, computed });
        }
        // Checked after the CRC: a damaged byte is reported as damage.
        if bytes[5] != 0 {
            return Err(EnvelopeError::Reserved { found: bytes[5] });
        }
        Ok(Header {
            kind: RecordKind::from_byte(bytes[3])?,
            codec: CodecId(bytes[4]),
            type_version: u16::from_le_bytes([bytes[6], bytes[7]]),
            timestamp_ms: u64::from_le_bytes(le8(&bytes[8..16])),
        })
    }
}

/// The metadata of a checked envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Event or snapshot.
    pub kind: RecordKind,
    /// How the payload is encoded.
    pub codec: CodecId,
    /// Schema version of the payload type.
    pub type_version: u16,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

fn le4(b: &[u8]) -> [u8; 4] {
    let mut a = [0; 4];
    a.copy_from_slice(b);
    a
}

fn le8(b: &[u8]) -> [u8; 8] {
    let mut a = [0; 8];
    a.copy_from_slice(b);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Envelope {
        Envelope::event(CodecId::JSON, 3, 1_700_000_000_000, b"{\"x\":1}".to_vec())
    }

    #[test]
    fn round_trips() {
        let env = sample();
        assert_eq!(Envelope::decode(&env.encode()).unwrap(), env);
    }

    #[test]
    fn detects_every_single_bit_flip() {
        let bytes = sample().encode();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut damaged = bytes.clone();
                damaged[i] ^= 1 << bit;
                assert!(Envelope::decode(&damaged).is_err(), "flip of bit {bit} in byte {i} went unnoticed");
            }
        }
    }

    #[test]
    fn detects_truncation_and_newer_versions() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert!(Envelope::decode(&bytes[..len]).is_err());
        }
        let mut newer = bytes;
        newer[2] = FORMAT_VERSION + 1;
        assert!(matches!(Envelope::decode(&newer), Err(EnvelopeError::NewerFormat { .. })));
    }

    /// Re-seals `bytes` (an encoded envelope) with a correct CRC, as a writer would.
    fn reseal(bytes: &mut [u8]) {
        let mut crc = crc32fast::Hasher::new();
        crc.update(&bytes[0..20]);
        crc.update(&bytes[HEADER_LEN..]);
        let sum = crc.finalize().to_le_bytes();
        bytes[20..24].copy_from_slice(&sum);
    }

    #[test]
    fn refuses_a_reserved_byte_other_than_zero_even_with_a_valid_crc() {
        for found in [1u8, 0x80, 0xff] {
            let mut bytes = sample().encode();
            bytes[5] = found;
            reseal(&mut bytes);
            assert_eq!(Envelope::decode(&bytes), Err(EnvelopeError::Reserved { found }));
        }
        let mut bytes = sample().encode();
        reseal(&mut bytes);
        assert_eq!(Envelope::decode(&bytes).unwrap(), sample());
    }

    proptest! {
        #[test]
        fn any_envelope_round_trips(codec in any::<u8>(), version in any::<u16>(), ts in any::<u64>(),
                                    payload in proptest::collection::vec(any::<u8>(), 0..300), snap in any::<bool>()) {
            let env = if snap {
                Envelope::snapshot(CodecId(codec), version, ts, payload)
            } else {
                Envelope::event(CodecId(codec), version, ts, payload)
            };
            prop_assert_eq!(Envelope::decode(&env.encode()).unwrap(), env);
        }
    }
}
