//! Payload codecs. Payloads are serde types; bincode 2 is the default, JSON exists for debugging and
//! tools. The codec id travels in every record's envelope, so a journal may mix codecs and readers
//! always know how to decode.

use eventstage_journal::CodecId;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why a payload did not encode or decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// serde / bincode / JSON failure.
    #[error("{codec}: {message}")]
    Serde {
        /// Codec name.
        codec: &'static str,
        /// The library's message.
        message: String,
    },
    /// Bytes left over after the value: the payload is not exactly one value of this type.
    #[error("{codec}: {extra} trailing bytes after the value")]
    Trailing {
        /// Codec name.
        codec: &'static str,
        /// Bytes left.
        extra: usize,
    },
    /// A value encoded, but its type does not decode what the codec wrote for it: replay could
    /// never read it back. Refused before anything is persisted.
    #[error(
        "`{type_name}` does not read back what {codec} writes for it ({message}). {}",
        unreadable_hint(codec, message)
    )]
    Unreadable {
        /// The Rust type, as `std::any::type_name` gives it.
        type_name: &'static str,
        /// Codec name.
        codec: &'static str,
        /// The decoder's message.
        message: String,
    },
    /// The codec id is not one this build knows.
    #[error("unknown codec id {0}")]
    UnknownCodec(u8),
    /// The payload's type version has no upcast.
    #[error(
        "type version {found} is not readable by this stage (it writes version {current}); implement `upcast` for it"
    )]
    UnknownVersion {
        /// Version in the record.
        found: u16,
        /// Version the stage writes.
        current: u16,
    },
}

/// What makes a type unreadable in `codec`, and the fix, from the decoder's message.
fn unreadable_hint(codec: &str, message: &str) -> &'static str {
    if codec != "bincode" {
        return "Its Serialize and Deserialize disagree: make them agree (`eventstage::testkit::StageTest` checks every event it produces). Nothing was persisted";
    }
    if message.contains("AnyNotSupported") || message.contains("deserialize_any") {
        "Its Deserialize asks the data to describe itself (`deserialize_any`), which `#[serde(tag = \"..\")]` \
         (internally or adjacently tagged enums), `#[serde(untagged)]`, `#[serde(flatten)]` and hand-written \
         `deserialize_any` impls do; bincode stores neither field names nor types. Fix: drop the attribute \
         (externally tagged enums, the serde default, and plain fields read back in bincode), or journal the \
         stage with `Codec::Json` (`RuntimeConfig::codec`, `FlowBuilder::codec`), which reads every serde shape. \
         Nothing was persisted"
    } else {
        "bincode reads fields by position: a field written only sometimes (`#[serde(skip_serializing_if = \"..\")]`, \
         `skip_serializing`) or a Serialize and Deserialize that disagree leave it reading the wrong bytes. Fix: write \
         every field (drop `skip_serializing_if`), or journal the stage with `Codec::Json` (`RuntimeConfig::codec`, \
         `FlowBuilder::codec`), which reads every serde shape. Nothing was persisted"
    }
}

/// A payload codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Codec {
    /// bincode 2, standard configuration (varint integers). Compact and fast; the default.
    #[default]
    Bincode,
    /// JSON. Readable; larger and slower.
    Json,
}

impl Codec {
    /// The id stored in envelopes.
    pub fn id(self) -> CodecId {
        match self {
            Codec::Bincode => CodecId::BINCODE,
            Codec::Json => CodecId::JSON,
        }
    }

    /// The codec of an envelope's id.
    ///
    /// # Errors
    /// [`CodecError::UnknownCodec`] for ids this build does not know.
    pub fn from_id(id: CodecId) -> Result<Self, CodecError> {
        match id {
            CodecId::BINCODE => Ok(Codec::Bincode),
            CodecId::JSON => Ok(Codec::Json),
            CodecId(other) => Err(CodecError::UnknownCodec(other)),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Codec::Bincode => "bincode",
            Codec::Json => "json",
        }
    }

    /// Encodes a value.
    ///
    /// # Errors
    /// When serde fails (e.g. a map with non-string keys in JSON).
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>, CodecError> {
        let err = |message: String| CodecError::Serde { codec: self.name(), message };
        match self {
            Codec::Bincode => {
                bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(|e| err(e.to_string()))
            }
            Codec::Json => serde_json::to_vec(value).map_err(|e| err(e.to_string())),
        }
    }

    /// Decodes a value; the bytes must hold exactly one.
    ///
    /// # Errors
    /// When the bytes are not a value of type `T`.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, CodecError> {
        let err = |message: String| CodecError::Serde { codec: self.name(), message };
        match self {
            Codec::Bincode => {
                let (value, used) = decode_bincode(bytes).map_err(|e| err(e.to_string()))?;
                if used != bytes.len() {
                    return Err(CodecError::Trailing { codec: self.name(), extra: bytes.len() - used });
                }
                Ok(value)
            }
            Codec::Json => serde_json::from_slice(bytes).map_err(|e| err(e.to_string())),
        }
    }
}

impl Codec {
    /// Encodes `value` for storage and proves that `read` gets a value back from the bytes: what
    /// replay cannot read is never persisted. A type whose serde shape the codec cannot decode
    /// (bincode and `#[serde(tag = "..")]`, `untagged`, `flatten`, `skip_serializing_if`) is
    /// refused with [`CodecError::Unreadable`], which names the type and the fix. Costs one decode
    /// of what was encoded (see the `append` bench's `codec_check` group).
    ///
    /// # Errors
    /// When the value does not encode, or does not read back.
    pub(crate) fn encode_readable<T: Serialize, U>(
        self,
        value: &T,
        read: impl FnOnce(&[u8]) -> Result<U, CodecError>,
    ) -> Result<Vec<u8>, CodecError> {
        let bytes = self.encode(value)?;
        match read(&bytes) {
            Ok(_) => Ok(bytes),
            // An upcast that refuses the version the stage writes is the stage's own mistake: said as it is.
            Err(e @ CodecError::UnknownVersion { .. }) => Err(e),
            Err(e) => Err(CodecError::Unreadable {
                type_name: std::any::type_name::<T>(),
                codec: self.name(),
                message: match e {
                    CodecError::Serde { message, .. } => message,
                    other => other.to_string(),
                },
            }),
        }
    }
}

/// bincode 2 decoding bounded by the bytes available.
///
/// bincode allocates a container's length as read, before reading its contents: a record of a few
/// bytes with a string length of 2^40 made the process abort ("memory allocation of 1099511627776
/// bytes failed"), one of 2^64-1 panicked ("capacity overflow"). bincode claims every allocation
/// (and every primitive, at its size in memory) against the configuration's limit first. A valid
/// value claims at most 16 bytes per encoded byte (a `u128` in a one-byte varint), so a limit of
/// 16 times the input never refuses one, and a lying length becomes a decode error. bincode takes
/// the limit as a constant: the input's size picks the smallest of a few.
fn decode_bincode<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), bincode::error::DecodeError> {
    let claims = bytes.len().saturating_mul(16).saturating_add(64);
    macro_rules! within {
        ($($shift:literal),*) => {$(
            if claims <= 1usize << $shift {
                let config = bincode::config::standard().with_limit::<{ 1usize << $shift }>();
                return bincode::serde::decode_from_slice(bytes, config);
            }
        )*};
    }
    within!(12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34, 36, 38);
    bincode::serde::decode_from_slice(bytes, bincode::config::standard().with_limit::<{ 1usize << 40 }>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    enum Ev {
        A { x: u64, s: String },
        B(Vec<i32>),
        C,
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Stock {
        on_hand: u64,
        reservations: std::collections::BTreeMap<String, u64>,
    }

    #[test]
    fn a_lying_length_is_a_decode_error_not_an_allocation() {
        // on_hand 0, one reservation whose key claims 2^40 bytes (a 1 TiB allocation before).
        let tib = hex::decode("0001fd0000000000010000").unwrap();
        // ... and one claiming 2^64-1 bytes (a capacity overflow panic before).
        let max = hex::decode("0001ffffffffffffffffff").unwrap();
        // A byte vector and a sequence claiming 2^40 elements.
        let bytes = hex::decode("fd0000000000010000").unwrap();
        for input in [&tib, &max] {
            let e = Codec::Bincode.decode::<Stock>(input).unwrap_err();
            assert!(e.to_string().contains("bincode"), "{e}");
        }
        assert!(Codec::Bincode.decode::<Vec<u8>>(&bytes).is_err());
        assert!(Codec::Bincode.decode::<Vec<u64>>(&bytes).is_err());
        assert!(Codec::Bincode.decode::<String>(&bytes).is_err());
    }

    #[test]
    fn values_claiming_the_most_per_byte_still_decode() {
        // u128 zeros: one byte each, 16 bytes claimed each.
        let zeros = vec![0u128; 100_000];
        let bytes = Codec::Bincode.encode(&zeros).unwrap();
        assert_eq!(Codec::Bincode.decode::<Vec<u128>>(&bytes).unwrap(), zeros);
        let big = vec![7u8; 3 << 20];
        let bytes = Codec::Bincode.encode(&big).unwrap();
        assert_eq!(Codec::Bincode.decode::<Vec<u8>>(&bytes).unwrap(), big);
        let stock = Stock { on_hand: 3, reservations: [("o-1".to_string(), 2)].into() };
        assert_eq!(Codec::Bincode.decode::<Stock>(&Codec::Bincode.encode(&stock).unwrap()).unwrap(), stock);
    }

    proptest! {
        #[test]
        fn round_trips(x in any::<u64>(), s in ".*", v in proptest::collection::vec(any::<i32>(), 0..10)) {
            for codec in [Codec::Bincode, Codec::Json] {
                for ev in [Ev::A { x, s: s.clone() }, Ev::B(v.clone()), Ev::C] {
                    let bytes = codec.encode(&ev).unwrap();
                    prop_assert_eq!(codec.decode::<Ev>(&bytes).unwrap(), ev);
                    prop_assert_eq!(Codec::from_id(codec.id()).unwrap(), codec);
                }
            }
        }
    }

    #[test]
    fn rejects_garbage_and_trailing_bytes() {
        let mut bytes = Codec::Bincode.encode(&Ev::C).unwrap();
        bytes.push(0);
        assert!(matches!(Codec::Bincode.decode::<Ev>(&bytes), Err(CodecError::Trailing { .. })));
        assert!(Codec::Bincode.decode::<Ev>(&[0xff, 0xff, 0xff]).is_err());
        assert!(Codec::Json.decode::<Ev>(b"{").is_err());
        assert!(matches!(Codec::from_id(CodecId(77)), Err(CodecError::UnknownCodec(77))));
    }
}
