//! Order-preserving, prefix-free encoding of keys inside a storage key.
//!
//! A key's bytes are written with 0x00 escaped as 0x00 0xFF and ended by 0x00 0x00. Encoded keys
//! sort like the raw keys, and no encoded key is a prefix of another, so `prefix | enc(key) | seq`
//! ranges never bleed into a neighbouring key.

/// Appends the escaped `key` and its terminator to `out`.
pub(crate) fn encode_key_into(key: &[u8], out: &mut Vec<u8>) {
    out.reserve(key.len() + 2);
    for &b in key {
        out.push(b);
        if b == 0 {
            out.push(0xFF);
        }
    }
    out.extend_from_slice(&[0, 0]);
}

/// Decodes an escaped key at the start of `bytes`; returns the key and the rest after the terminator.
pub(crate) fn decode_key(bytes: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    // Fast path: keys without zero bytes (text keys) are one copy.
    let first_zero = bytes.iter().position(|&b| b == 0)?;
    if bytes.get(first_zero + 1) == Some(&0) {
        return Some((bytes[..first_zero].to_vec(), &bytes[first_zero + 2..]));
    }
    let mut key = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != 0 {
            key.push(b);
            i += 1;
            continue;
        }
        match bytes.get(i + 1)? {
            0xFF => {
                key.push(0);
                i += 2;
            }
            0 => return Some((key, &bytes[i + 2..])),
            _ => return None,
        }
    }
    None
}

/// A key as people read it: the UTF-8 text when it is printable, else `0x` and hex.
pub fn printable_key(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(s) if !s.is_empty() && !s.chars().any(char::is_control) => s.to_owned(),
        _ => {
            let mut out = String::with_capacity(2 + key.len() * 2);
            out.push_str("0x");
            for b in key {
                out.push_str(&format!("{b:02x}"));
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips_and_preserves_order(a in proptest::collection::vec(any::<u8>(), 0..20),
                                           b in proptest::collection::vec(any::<u8>(), 0..20)) {
            let (mut ea, mut eb) = (Vec::new(), Vec::new());
            encode_key_into(&a, &mut ea);
            encode_key_into(&b, &mut eb);
            ea.push(7);
            let (da, rest) = decode_key(&ea).unwrap();
            prop_assert_eq!(&da, &a);
            prop_assert_eq!(rest, &[7u8][..]);
            eb.pop(); eb.pop();
            let mut eb2 = Vec::new();
            encode_key_into(&b, &mut eb2);
            let mut ea2 = Vec::new();
            encode_key_into(&a, &mut ea2);
            prop_assert_eq!(a.cmp(&b), ea2.cmp(&eb2));
        }
    }

    #[test]
    fn printable() {
        assert_eq!(printable_key(b"acct-1"), "acct-1");
        assert_eq!(printable_key(&[0, 255]), "0x00ff");
        assert_eq!(printable_key(b""), "0x");
    }
}
