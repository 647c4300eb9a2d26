//! Decoders from record key / value bytes to the table's types.

use std::fmt;
use std::sync::Arc;

/// Turns the bytes of a record key or value into a `T`, or says why it cannot.
///
/// ```
/// use eventstage::table::Decoder;
///
/// let utf8 = Decoder::utf8();
/// assert_eq!(utf8.decode(b"alice").unwrap(), "alice");
/// assert!(utf8.decode(&[0xff]).is_err());
///
/// #[derive(serde::Deserialize, Debug, PartialEq)]
/// struct Limit { max: u64 }
/// let json = Decoder::<Limit>::json();
/// assert_eq!(json.decode(br#"{"max": 5}"#).unwrap(), Limit { max: 5 });
///
/// let parsed = Decoder::new("u64 text", |b: &[u8]| {
///     std::str::from_utf8(b).map_err(|e| e.to_string())?.parse::<u64>().map_err(|e| e.to_string())
/// });
/// assert_eq!(parsed.decode(b"42").unwrap(), 42);
/// ```
pub struct Decoder<T> {
    name: Arc<str>,
    decode: Arc<DecodeFn<T>>,
    encode: Option<Arc<EncodeFn<T>>>,
}

type DecodeFn<T> = dyn Fn(&[u8]) -> Result<T, String> + Send + Sync;
type EncodeFn<T> = dyn Fn(&T) -> Vec<u8> + Send + Sync;

impl<T> Clone for Decoder<T> {
    fn clone(&self) -> Self {
        Self { name: self.name.clone(), decode: self.decode.clone(), encode: self.encode.clone() }
    }
}

impl<T> fmt::Debug for Decoder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Decoder({})", self.name)
    }
}

impl<T> Decoder<T> {
    /// A decoder from a function; `name` appears in error messages.
    pub fn new(name: &str, decode: impl Fn(&[u8]) -> Result<T, String> + Send + Sync + 'static) -> Self {
        Self { name: name.into(), decode: Arc::new(decode), encode: None }
    }

    /// The same decoder, with the function that gives back the bytes a value was decoded from.
    /// A table with a row cache ([`TableBuilder::cache`](super::TableBuilder::cache)) needs it for
    /// its keys: a key not in memory is looked up in the local store by its record key bytes, so
    /// `encode(decode(bytes))` must give `bytes` back. Range and prefix scans of such a table run
    /// in the order of these bytes. [`Decoder::utf8`] and [`Decoder::bytes`] have it already.
    ///
    /// ```
    /// use eventstage::table::Decoder;
    ///
    /// let ids = Decoder::new("u64 text", |b: &[u8]| {
    ///     std::str::from_utf8(b).map_err(|e| e.to_string())?.parse::<u64>().map_err(|e| e.to_string())
    /// })
    /// .with_encoder(|id: &u64| id.to_string().into_bytes());
    /// assert_eq!(ids.encode(&42).as_deref(), Some(&b"42"[..]));
    /// ```
    #[must_use]
    pub fn with_encoder(mut self, encode: impl Fn(&T) -> Vec<u8> + Send + Sync + 'static) -> Self {
        self.encode = Some(Arc::new(encode));
        self
    }

    /// The bytes `value` was decoded from, when the decoder has an encoder.
    pub fn encode(&self, value: &T) -> Option<Vec<u8>> {
        self.encode.as_ref().map(|e| e(value))
    }

    /// True when the decoder has an encoder.
    pub fn can_encode(&self) -> bool {
        self.encode.is_some()
    }

    /// Decodes `bytes`.
    ///
    /// # Errors
    /// The decoder's message, prefixed with its name.
    pub fn decode(&self, bytes: &[u8]) -> Result<T, String> {
        (self.decode)(bytes).map_err(|e| format!("{}: {e}", self.name))
    }

    /// The decoder's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Decoder<Vec<u8>> {
    /// The bytes as they are.
    pub fn bytes() -> Self {
        Self::new("bytes", |b| Ok(b.to_vec())).with_encoder(Vec::clone)
    }
}

impl Decoder<String> {
    /// UTF-8 text.
    pub fn utf8() -> Self {
        Self::new("utf-8", |b| std::str::from_utf8(b).map(str::to_owned).map_err(|e| e.to_string()))
            .with_encoder(|s: &String| s.as_bytes().to_vec())
    }
}

impl<T: serde::de::DeserializeOwned + 'static> Decoder<T> {
    /// JSON (serde_json).
    pub fn json() -> Self {
        Self::new("json", |b| serde_json::from_slice(b).map_err(|e| e.to_string()))
    }

    /// bincode 2 (serde, standard configuration), as eventstage's default codec writes it.
    pub fn bincode() -> Self {
        Self::new("bincode", |b| crate::Codec::Bincode.decode(b).map_err(|e| e.to_string()))
    }
}
