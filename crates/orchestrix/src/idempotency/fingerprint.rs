//! Input fingerprints: a stable hash of the canonical input.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// How a flow fingerprints its input, to detect a key reused with a different payload.
#[derive(Default)]
pub enum Fingerprint<I> {
    /// SHA-256 of the input's canonical JSON (object keys sorted). The default.
    #[default]
    Input,
    /// No fingerprint: any input under the key counts as the same operation.
    Off,
    /// A function of the input, e.g. a hash of only the fields that define the operation.
    Custom(Arc<dyn Fn(&I) -> String + Send + Sync>),
}

impl<I> Fingerprint<I> {
    /// A custom fingerprint function.
    pub fn custom(f: impl Fn(&I) -> String + Send + Sync + 'static) -> Self {
        Self::Custom(Arc::new(f))
    }

    pub(crate) fn of(&self, input: &I) -> Result<Option<String>, serde_json::Error>
    where
        I: Serialize,
    {
        match self {
            Self::Input => fingerprint_of(input).map(Some),
            Self::Off => Ok(None),
            Self::Custom(f) => Ok(Some(f(input))),
        }
    }
}

impl<I> fmt::Debug for Fingerprint<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Input => "Input",
            Self::Off => "Off",
            Self::Custom(_) => "Custom",
        })
    }
}

/// The canonical fingerprint of any serializable value: the first 128 bits of SHA-256
/// over a canonical encoding of its JSON form (object keys sorted, so field order and map
/// iteration order do not matter), as 32 hex digits.
///
/// # Errors
/// When the value cannot be represented as JSON (e.g. a map with non-string keys).
///
/// ```
/// use std::collections::HashMap;
/// let a: HashMap<_, _> = [("x", 1), ("y", 2)].into();
/// let b: HashMap<_, _> = [("y", 2), ("x", 1)].into();
/// assert_eq!(orchestrix::fingerprint_of(&a)?, orchestrix::fingerprint_of(&b)?);
/// assert_ne!(orchestrix::fingerprint_of(&a)?, orchestrix::fingerprint_of(&[1, 2])?);
/// # Ok::<(), serde_json::Error>(())
/// ```
pub fn fingerprint_of<T: Serialize + ?Sized>(value: &T) -> Result<String, serde_json::Error> {
    let value = serde_json::to_value(value)?;
    let mut hasher = Sha256::new();
    feed(&value, &mut hasher);
    let digest = hasher.finalize();
    let mut hex = String::with_capacity(32);
    for byte in &digest[..16] {
        hex.push(char::from_digit(u32::from(byte >> 4), 16).unwrap_or('0'));
        hex.push(char::from_digit(u32::from(byte & 0xf), 16).unwrap_or('0'));
    }
    Ok(hex)
}

/// Feeds a tagged, length-prefixed encoding, so that no two values share a byte stream.
fn feed(value: &Value, h: &mut Sha256) {
    let bytes = |h: &mut Sha256, tag: u8, b: &[u8]| {
        h.update([tag]);
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    match value {
        Value::Null => h.update([b'n']),
        Value::Bool(b) => h.update([b'b', u8::from(*b)]),
        Value::Number(n) => bytes(h, b'#', n.to_string().as_bytes()),
        Value::String(s) => bytes(h, b's', s.as_bytes()),
        Value::Array(items) => {
            h.update([b'[']);
            h.update((items.len() as u64).to_le_bytes());
            items.iter().for_each(|v| feed(v, h));
        }
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            h.update([b'{']);
            h.update((entries.len() as u64).to_le_bytes());
            for (k, v) in entries {
                bytes(h, b'k', k.as_bytes());
                feed(v, h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Ab {
        a: u32,
        b: &'static str,
    }
    #[derive(Serialize)]
    struct Ba {
        b: &'static str,
        a: u32,
    }

    #[test]
    fn field_order_does_not_change_the_fingerprint() {
        let one = fingerprint_of(&Ab { a: 1, b: "x" }).ok();
        let two = fingerprint_of(&Ba { b: "x", a: 1 }).ok();
        assert!(one.is_some());
        assert_eq!(one, two);
    }

    #[test]
    fn different_values_have_different_fingerprints() {
        let one = fingerprint_of(&Ab { a: 1, b: "x" }).ok();
        let two = fingerprint_of(&Ab { a: 2, b: "x" }).ok();
        assert_ne!(one, two);
        // Structure matters, not just the concatenated text.
        assert_ne!(
            fingerprint_of(&["ab", "c"]).ok(),
            fingerprint_of(&["a", "bc"]).ok()
        );
    }

    #[test]
    fn fingerprint_is_32_hex_digits() {
        let fp = fingerprint_of(&42).unwrap_or_default();
        assert_eq!(fp.len(), 32);
        assert!(fp.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn unrepresentable_input_is_an_error() {
        let mut m = std::collections::HashMap::new();
        m.insert((1, 2), 3);
        assert!(fingerprint_of(&m).is_err());
    }
}
