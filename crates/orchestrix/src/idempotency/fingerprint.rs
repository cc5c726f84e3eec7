//! Input fingerprints: a stable hash of the canonical input.

use std::cell::Cell;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::canonical::{Encoder, encode_value};

/// How a flow fingerprints its input, to detect a key reused with a different payload.
#[derive(Default)]
pub enum Fingerprint<I> {
    /// SHA-256 of the input's canonical JSON (object keys sorted). The default.
    ///
    /// Inputs are told apart by what serde makes of them, not by their Rust type:
    /// non-finite floats and 128-bit integers get forms of their own and `-0.0` equals
    /// `0.0`, but two values that serde itself writes alike share a fingerprint — `None`
    /// and `Some(None)` of an `Option<Option<T>>` are both `null`, a unit struct and `()`
    /// are both `null`. Where such inputs mean different operations, use
    /// [`Fingerprint::custom`].
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

    pub(crate) fn of(&self, input: &I) -> Result<Option<Computed>, serde_json::Error>
    where
        I: Serialize,
    {
        match self {
            Self::Input => digest_hex(input).map(|hex| Some(Computed::Hex(hex))),
            Self::Off => Ok(None),
            Self::Custom(f) => Ok(Some(Computed::Custom(f(input)))),
        }
    }
}

/// A fingerprint as computed for one run: the default one stays on the stack.
pub(crate) enum Computed {
    Hex([u8; 32]),
    Custom(String),
}

impl Computed {
    pub(crate) fn as_str(&self) -> &str {
        match self {
            // Hex digits are ASCII: the check cannot fail.
            Self::Hex(hex) => std::str::from_utf8(hex).unwrap_or_default(),
            Self::Custom(text) => text,
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
    digest_hex(value).map(|hex| hex.iter().copied().map(char::from).collect())
}

/// [`fingerprint_of`], as its 32 ASCII hex digits.
fn digest_hex<T: Serialize + ?Sized>(value: &T) -> Result<[u8; 32], serde_json::Error> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digest = with_encoder(|enc| {
        if value.serialize(&mut *enc).is_err() {
            // The encoder was not sure of the JSON form: go through `serde_json::Value`,
            // which also reports inputs that have no JSON form at all.
            enc.clear();
            encode_value(&serde_json::to_value(value)?, &mut enc.out);
        }
        Ok::<_, serde_json::Error>(Sha256::digest(&enc.out))
    })?;
    let mut hex = [0; 32];
    for (pair, byte) in hex.chunks_exact_mut(2).zip(&digest[..16]) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0xf)];
    }
    Ok(hex)
}

/// Runs `f` with this thread's (cleared) encoder, so that fingerprinting reuses its buffers
/// instead of allocating them for every run. A nested call gets a fresh encoder.
fn with_encoder<T>(f: impl FnOnce(&mut Encoder) -> T) -> T {
    thread_local! {
        static ENCODER: Cell<Encoder> = Cell::default();
    }
    let mut enc = ENCODER.with(Cell::take);
    enc.clear();
    let out = f(&mut enc);
    if enc.worth_keeping() {
        ENCODER.with(|cell| cell.set(enc));
    }
    out
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

    /// Fingerprints are stored with records: a build that computed them differently would
    /// report `KeyReused` for every replay of a record an earlier build wrote. These values
    /// were computed by the first released encoding.
    #[test]
    fn fingerprints_are_stable_across_builds() {
        #[derive(Serialize)]
        struct Payment {
            order: u64,
            amount_cents: i64,
            currency: &'static str,
            tags: Vec<&'static str>,
            note: Option<String>,
            ratio: f64,
        }
        let payment = Payment {
            order: 42,
            amount_cents: -1999,
            currency: "EUR",
            tags: vec!["a", "b"],
            note: None,
            ratio: 0.25,
        };
        let object = serde_json::json!({"z": 1, "a": [true, null, "x"]});
        let pinned = [
            (
                fingerprint_of(&payment).ok(),
                "629cb95a399aa4d9a83cf44ed759679a",
            ),
            (
                fingerprint_of(&7u64).ok(),
                "d68ebc60e56a5c340c09e921dc9b0beb",
            ),
            (
                fingerprint_of(&u64::MAX).ok(),
                "02d3c10ded88e6b5fc60e180a4b57723",
            ),
            (
                fingerprint_of(&1.5e300f64).ok(),
                "e7ebf1fb1524316c67c466b2e62124e4",
            ),
            (
                fingerprint_of(&object).ok(),
                "806d253ccfaf3bb1ebb6dac00d07f701",
            ),
            // Pinned when non-finite floats got encodings of their own and -0.0 became 0.0
            // (before, `Some(NaN)` was `None`'s 1b16b1df538ba12dc3f97edbb85caa70 and -0.0
            // was aa96057dda02940edd3d5f225f69040d): a record an earlier build wrote for such
            // an input answers `KeyReused` after the upgrade. `0.0` itself is unchanged.
            (
                fingerprint_of(&Some(f64::NAN)).ok(),
                "e72f1e3bdd98fefdaa6b1fecbdfa1cc4",
            ),
            (
                fingerprint_of(&-0.0f64).ok(),
                "1814b2802d9120acbfab76b78959ed7a",
            ),
            (
                fingerprint_of(&0.0f64).ok(),
                "1814b2802d9120acbfab76b78959ed7a",
            ),
            (
                fingerprint_of(&u128::MAX).ok(),
                "891a828d5b6b769c4a17d8fabeee0c40",
            ),
        ];
        for (computed, expected) in pinned {
            assert_eq!(computed.as_deref(), Some(expected));
        }
    }

    #[test]
    fn nan_infinities_and_none_never_share_a_fingerprint() {
        #[derive(Serialize)]
        struct Input {
            amount: Option<f64>,
        }
        let fps: Vec<_> = [
            None,
            Some(f64::NAN),
            Some(f64::INFINITY),
            Some(f64::NEG_INFINITY),
        ]
        .into_iter()
        .map(|amount| fingerprint_of(&Input { amount }).ok())
        .collect();
        assert!(fps.iter().all(Option::is_some));
        for (i, a) in fps.iter().enumerate() {
            for b in &fps[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn negative_zero_and_zero_share_a_fingerprint() {
        assert_eq!(fingerprint_of(&-0.0f64).ok(), fingerprint_of(&0.0f64).ok());
        assert!(fingerprint_of(&-0.0f64).is_ok());
    }

    #[test]
    fn integers_of_128_bits_are_fingerprinted_like_any_integer() {
        assert!(fingerprint_of(&u128::MAX).is_ok());
        assert_ne!(
            fingerprint_of(&u128::MAX).ok(),
            fingerprint_of(&(u128::MAX - 1)).ok()
        );
        assert_ne!(
            fingerprint_of(&i128::MIN).ok(),
            fingerprint_of(&i128::MAX).ok()
        );
        // The same number in a narrower type is the same input.
        assert_eq!(fingerprint_of(&5u128).ok(), fingerprint_of(&5u64).ok());
    }

    #[test]
    fn unrepresentable_input_is_an_error() {
        let mut m = std::collections::HashMap::new();
        m.insert((1, 2), 3);
        assert!(fingerprint_of(&m).is_err());
    }
}
