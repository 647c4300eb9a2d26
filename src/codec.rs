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
                let (value, used) = bincode::serde::decode_from_slice(bytes, bincode::config::standard())
                    .map_err(|e| err(e.to_string()))?;
                if used != bytes.len() {
                    return Err(CodecError::Trailing { codec: self.name(), extra: bytes.len() - used });
                }
                Ok(value)
            }
            Codec::Json => serde_json::from_slice(bytes).map_err(|e| err(e.to_string())),
        }
    }
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
