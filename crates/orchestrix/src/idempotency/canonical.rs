//! The canonical encoding behind input fingerprints, written straight from a value's
//! `Serialize` implementation.
//!
//! The encoding is defined on the value's JSON form (a `serde_json::Value`): tagged,
//! length-prefixed, object keys sorted ([`encode_value`]). Building that `Value` first costs
//! an allocation per string, key and object, which for a typical struct input is most of the
//! price of a fingerprint. [`Encoder`] writes the same bytes without it. Where the JSON form
//! is not obvious from the serializer call alone (a map key given twice, a float map key,
//! `serde_json`'s own raw values) it gives up with [`Fallback`], and the caller encodes
//! through a `Value` instead: both paths agree on every value JSON can hold, which a test
//! checks on many shapes.
//!
//! Two inputs that differ must never share an encoding, and equal inputs always do, even
//! where JSON is lossy:
//!
//! * `NaN`, `inf` and `-inf` have no JSON form (`serde_json` writes `null`, the same as
//!   `None`); the encoder gives each a tag of its own, so `Some(f64::NAN)` and `None` differ.
//!   In the rare fallback through a `Value` they are still `null`.
//! * `-0.0 == 0.0`, so both encode as `0.0`.
//! * 128-bit integers encode as their decimal digits, like every integer, so one that fits
//!   in 64 bits encodes as the same number in a 64-bit type.

use std::fmt::{self, Write as _};

use serde::ser::{self, Serialize};
use serde_json::Value;

/// Appends the canonical encoding of `value` to `out`.
pub(crate) fn encode_value(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.push(b'n'),
        Value::Bool(b) => out.extend_from_slice(&[b'b', u8::from(*b)]),
        // Integers as serde_json writes them (it uses `itoa` too).
        Value::Number(n) if n.is_u64() || n.is_i64() => {
            let mut digits = itoa::Buffer::new();
            let text = match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => digits.format(u),
                (None, Some(i)) => digits.format(i),
                (None, None) => "",
            };
            tagged(out, b'#', text.as_bytes());
        }
        Value::Number(n) => float(out, n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => tagged(out, b's', s.as_bytes()),
        Value::Array(items) => {
            out.push(b'[');
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            items.iter().for_each(|v| encode_value(v, out));
        }
        Value::Object(map) => {
            out.push(b'{');
            out.extend_from_slice(&(map.len() as u64).to_le_bytes());
            let mut entry = |(k, v): (&String, &Value)| {
                tagged(out, b'k', k.as_bytes());
                encode_value(v, out);
            };
            // serde_json's default map is sorted already; with its `preserve_order` feature
            // (which any crate in the build can turn on) it keeps insertion order instead.
            if map.keys().is_sorted() {
                map.iter().for_each(&mut entry);
            } else {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
                entries.into_iter().for_each(entry);
            }
        }
    }
}

/// A float: its decimal text as `serde_json` writes it, with `-0.0` as `0.0`; the values
/// JSON cannot hold (`NaN`, `inf`, `-inf`) under a tag of their own.
fn float(out: &mut Vec<u8>, v: f64) {
    if !v.is_finite() {
        let text: &[u8] = if v.is_nan() {
            b"NaN"
        } else if v > 0.0 {
            b"inf"
        } else {
            b"-inf"
        };
        tagged(out, b'~', text);
        return;
    }
    // `-0.0 == 0.0`: equal inputs share one encoding.
    let n = serde_json::Number::from_f64(if v == 0.0 { 0.0 } else { v });
    // A float's decimal text, formatted on the stack; a text too long for the buffer falls
    // back to the heap.
    let mut text = StackText::default();
    match n {
        Some(n) if write!(text, "{n}").is_ok() => tagged(out, b'#', text.as_bytes()),
        Some(n) => tagged(out, b'#', n.to_string().as_bytes()),
        None => tagged(out, b'~', b"NaN"),
    }
}

/// A tag, the length as a little-endian `u64`, the bytes.
fn tagged(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Up to 40 bytes of text on the stack: any integer, and most floats, in decimal.
struct StackText {
    buf: [u8; 40],
    len: usize,
}

impl Default for StackText {
    fn default() -> Self {
        Self {
            buf: [0; 40],
            len: 0,
        }
    }
}

impl StackText {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl fmt::Write for StackText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let slot = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        slot.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// The encoder could not be sure of the JSON form: encode through a `serde_json::Value`.
#[derive(Debug)]
pub(crate) struct Fallback;

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("encode through serde_json::Value")
    }
}

impl std::error::Error for Fallback {}

impl ser::Error for Fallback {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Self
    }
}

/// Where one object entry lies in the output, to sort the entries by key afterwards.
#[derive(Clone, Copy)]
struct Entry {
    /// The entry's first byte: its key's tag, then the key's length (8 bytes), the key.
    start: usize,
    /// Where the key's text ends.
    key_end: usize,
}

/// Bytes before an entry's key text: the tag and the length.
const KEY_TEXT: usize = 1 + 8;

/// Writes the canonical encoding of what is serialized into it. Reusable: [`clear`]
/// keeps the buffers' capacity.
///
/// [`clear`]: Encoder::clear
#[derive(Default)]
pub(crate) struct Encoder {
    pub(crate) out: Vec<u8>,
    /// The entries of every object being written, innermost last.
    entries: Vec<Entry>,
    /// Scratch space for sorting one object's entries: each with where it ends.
    spans: Vec<(Entry, usize)>,
    /// Scratch space for sorting one object's entries: its bytes, as written.
    moved: Vec<u8>,
}

impl Encoder {
    pub(crate) fn clear(&mut self) {
        self.out.clear();
        self.entries.clear();
    }

    /// Whether the buffers are small enough to keep for the next value.
    pub(crate) fn worth_keeping(&self) -> bool {
        /// Buffers larger than this are not kept after use.
        const KEEP_BYTES: usize = 64 * 1024;
        self.out.capacity().max(self.moved.capacity()) <= KEEP_BYTES
    }

    /// A count placeholder, filled in by [`finish_count`](Self::finish_count).
    fn open(&mut self, tag: u8) -> usize {
        self.out.push(tag);
        let at = self.out.len();
        self.out.extend_from_slice(&[0; 8]);
        at
    }

    fn finish_count(&mut self, at: usize, count: u64) {
        if let Some(slot) = self.out.get_mut(at..at + 8) {
            slot.copy_from_slice(&count.to_le_bytes());
        }
    }

    /// Closes the object whose count sits at `at` and whose entries start at `first`:
    /// sorts its entries by key (they may come in any order) and writes its count.
    fn close_object(&mut self, at: usize, first: usize) -> Result {
        let Self {
            out,
            entries,
            spans,
            moved,
        } = self;
        let mine = entries.get(first..).unwrap_or_default();
        let count = mine.len() as u64;
        let in_order = mine.windows(2).all(|w| match w {
            [a, b] => key(out, *a) < key(out, *b),
            _ => true,
        });
        if !in_order {
            // Each entry runs to the start of the next one, in the order they were written.
            let end = out.len();
            spans.clear();
            spans.extend(
                mine.iter()
                    .enumerate()
                    .map(|(i, e)| (*e, mine.get(i + 1).map_or(end, |next| next.start))),
            );
            spans.sort_by(|a, b| key(out, a.0).cmp(key(out, b.0)));
            // A key given twice: a JSON object keeps only the last value.
            if spans.windows(2).any(|w| match w {
                [a, b] => key(out, a.0) == key(out, b.0),
                _ => false,
            }) {
                return Err(Fallback);
            }
            let body = at + 8;
            moved.clear();
            moved.extend_from_slice(out.get(body..).unwrap_or_default());
            out.truncate(body);
            for (entry, stop) in spans.iter() {
                let bytes = moved.get(entry.start - body..stop - body).ok_or(Fallback)?;
                out.extend_from_slice(bytes);
            }
        }
        entries.truncate(first);
        self.finish_count(at, count);
        Ok(())
    }

    fn integer(&mut self, text: &str) {
        tagged(&mut self.out, b'#', text.as_bytes());
    }

    /// An object entry's key.
    fn entry_key(&mut self, key: &str) {
        let start = self.out.len();
        tagged(&mut self.out, b'k', key.as_bytes());
        self.entries.push(Entry {
            start,
            key_end: self.out.len(),
        });
    }

    /// Opens `{variant: ` and returns where to close it.
    fn open_variant(&mut self, variant: &str) -> (usize, usize) {
        let at = self.open(b'{');
        let first = self.entries.len();
        self.entry_key(variant);
        (at, first)
    }

    fn compound(&mut self, tag: u8, variant: Option<(usize, usize)>) -> Compound<'_> {
        let at = self.open(tag);
        let first = self.entries.len();
        Compound {
            enc: self,
            at,
            count: 0,
            first,
            variant,
        }
    }
}

/// An entry's key text in `out`.
fn key(out: &[u8], entry: Entry) -> &[u8] {
    out.get(entry.start + KEY_TEXT..entry.key_end)
        .unwrap_or_default()
}

/// `serde_json`'s private names for its raw values: their JSON form is not what they
/// serialize as.
fn is_serde_json_private(name: &str) -> bool {
    name.starts_with("$serde_json::private::")
}

type Result<T = ()> = std::result::Result<T, Fallback>;

/// A sequence, tuple or object being written.
pub(crate) struct Compound<'a> {
    enc: &'a mut Encoder,
    /// Where the count goes.
    at: usize,
    count: u64,
    /// For an object: where its entries begin in `entries`.
    first: usize,
    /// The enclosing `{variant: ...}` object to close after this one, if any.
    variant: Option<(usize, usize)>,
}

impl Compound<'_> {
    fn end_variant(self) -> Result {
        if let Some((at, first)) = self.variant {
            self.enc.close_object(at, first)?;
        }
        Ok(())
    }
}

impl<'a> ser::Serializer for &'a mut Encoder {
    type Ok = ();
    type Error = Fallback;
    type SerializeSeq = Compound<'a>;
    type SerializeTuple = Compound<'a>;
    type SerializeTupleStruct = Compound<'a>;
    type SerializeTupleVariant = Compound<'a>;
    type SerializeMap = Compound<'a>;
    type SerializeStruct = Compound<'a>;
    type SerializeStructVariant = Compound<'a>;

    fn serialize_bool(self, v: bool) -> Result {
        self.out.extend_from_slice(&[b'b', u8::from(v)]);
        Ok(())
    }

    fn serialize_i8(self, v: i8) -> Result {
        self.serialize_i64(i64::from(v))
    }

    fn serialize_i16(self, v: i16) -> Result {
        self.serialize_i64(i64::from(v))
    }

    fn serialize_i32(self, v: i32) -> Result {
        self.serialize_i64(i64::from(v))
    }

    fn serialize_i64(self, v: i64) -> Result {
        self.integer(itoa::Buffer::new().format(v));
        Ok(())
    }

    fn serialize_u8(self, v: u8) -> Result {
        self.serialize_u64(u64::from(v))
    }

    fn serialize_u16(self, v: u16) -> Result {
        self.serialize_u64(u64::from(v))
    }

    fn serialize_u32(self, v: u32) -> Result {
        self.serialize_u64(u64::from(v))
    }

    fn serialize_u64(self, v: u64) -> Result {
        self.integer(itoa::Buffer::new().format(v));
        Ok(())
    }

    fn serialize_i128(self, v: i128) -> Result {
        self.integer(itoa::Buffer::new().format(v));
        Ok(())
    }

    fn serialize_u128(self, v: u128) -> Result {
        self.integer(itoa::Buffer::new().format(v));
        Ok(())
    }

    fn serialize_f32(self, v: f32) -> Result {
        float(&mut self.out, f64::from(v));
        Ok(())
    }

    fn serialize_f64(self, v: f64) -> Result {
        float(&mut self.out, v);
        Ok(())
    }

    fn serialize_char(self, v: char) -> Result {
        self.serialize_str(v.encode_utf8(&mut [0; 4]))
    }

    fn serialize_str(self, v: &str) -> Result {
        tagged(&mut self.out, b's', v.as_bytes());
        Ok(())
    }

    /// As `serde_json` writes bytes: an array of numbers.
    fn serialize_bytes(self, v: &[u8]) -> Result {
        let at = self.open(b'[');
        let mut digits = itoa::Buffer::new();
        for byte in v {
            self.integer(digits.format(*byte));
        }
        self.finish_count(at, v.len() as u64);
        Ok(())
    }

    fn serialize_none(self) -> Result {
        self.serialize_unit()
    }

    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> Result {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result {
        self.out.push(b'n');
        Ok(())
    }

    fn serialize_unit_struct(self, _: &'static str) -> Result {
        self.serialize_unit()
    }

    fn serialize_unit_variant(self, _: &'static str, _: u32, variant: &'static str) -> Result {
        self.serialize_str(variant)
    }

    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result {
        if is_serde_json_private(name) {
            return Err(Fallback);
        }
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Result {
        let (at, first) = self.open_variant(variant);
        value.serialize(&mut *self)?;
        self.close_object(at, first)
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Compound<'a>> {
        Ok(self.compound(b'[', None))
    }

    fn serialize_tuple(self, _: usize) -> Result<Compound<'a>> {
        Ok(self.compound(b'[', None))
    }

    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Compound<'a>> {
        Ok(self.compound(b'[', None))
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Compound<'a>> {
        let outer = self.open_variant(variant);
        Ok(self.compound(b'[', Some(outer)))
    }

    fn serialize_map(self, _: Option<usize>) -> Result<Compound<'a>> {
        Ok(self.compound(b'{', None))
    }

    fn serialize_struct(self, name: &'static str, _: usize) -> Result<Compound<'a>> {
        if is_serde_json_private(name) {
            return Err(Fallback);
        }
        Ok(self.compound(b'{', None))
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Compound<'a>> {
        let outer = self.open_variant(variant);
        Ok(self.compound(b'{', Some(outer)))
    }
}

impl Compound<'_> {
    fn element<T: ?Sized + Serialize>(&mut self, value: &T) -> Result {
        self.count += 1;
        value.serialize(&mut *self.enc)
    }

    fn end_array(self) -> Result {
        self.enc.finish_count(self.at, self.count);
        self.end_variant()
    }

    fn end_object(self) -> Result {
        self.enc.close_object(self.at, self.first)?;
        self.end_variant()
    }
}

/// Sequences, tuples and tuple structs and variants: serde's four traits for one thing.
macro_rules! array_like {
    ($($trait:ident::$method:ident),*) => {$(
        impl ser::$trait for Compound<'_> {
            type Ok = ();
            type Error = Fallback;

            fn $method<T: ?Sized + Serialize>(&mut self, value: &T) -> Result {
                self.element(value)
            }

            fn end(self) -> Result {
                self.end_array()
            }
        }
    )*};
}

array_like!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

impl ser::SerializeMap for Compound<'_> {
    type Ok = ();
    type Error = Fallback;

    fn serialize_key<T: ?Sized + Serialize>(&mut self, key: &T) -> Result {
        key.serialize(KeyEncoder(self.enc))
    }

    fn serialize_value<T: ?Sized + Serialize>(&mut self, value: &T) -> Result {
        value.serialize(&mut *self.enc)
    }

    fn end(self) -> Result {
        self.end_object()
    }
}

/// Structs and struct variants: named fields, as an object.
macro_rules! struct_like {
    ($($trait:ident),*) => {$(
        impl ser::$trait for Compound<'_> {
            type Ok = ();
            type Error = Fallback;

            fn serialize_field<T: ?Sized + Serialize>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> Result {
                self.enc.entry_key(key);
                value.serialize(&mut *self.enc)
            }

            fn end(self) -> Result {
                self.end_object()
            }
        }
    )*};
}

struct_like!(SerializeStruct, SerializeStructVariant);

/// A map key, as JSON writes it: strings, chars and unit variants as they are, integers
/// and booleans as their text (as `serde_json` does); any other key takes the fallback.
struct KeyEncoder<'a>(&'a mut Encoder);

impl ser::Serializer for KeyEncoder<'_> {
    type Ok = ();
    type Error = Fallback;
    type SerializeSeq = ser::Impossible<(), Fallback>;
    type SerializeTuple = ser::Impossible<(), Fallback>;
    type SerializeTupleStruct = ser::Impossible<(), Fallback>;
    type SerializeTupleVariant = ser::Impossible<(), Fallback>;
    type SerializeMap = ser::Impossible<(), Fallback>;
    type SerializeStruct = ser::Impossible<(), Fallback>;
    type SerializeStructVariant = ser::Impossible<(), Fallback>;

    fn serialize_str(self, v: &str) -> Result {
        self.0.entry_key(v);
        Ok(())
    }

    fn serialize_char(self, v: char) -> Result {
        self.serialize_str(v.encode_utf8(&mut [0; 4]))
    }

    fn serialize_unit_variant(self, _: &'static str, _: u32, variant: &'static str) -> Result {
        self.serialize_str(variant)
    }

    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result {
        if is_serde_json_private(name) {
            return Err(Fallback);
        }
        value.serialize(self)
    }

    fn serialize_bool(self, v: bool) -> Result {
        self.serialize_str(if v { "true" } else { "false" })
    }
    fn serialize_i8(self, v: i8) -> Result {
        self.serialize_str(itoa::Buffer::new().format(v))
    }
    fn serialize_i16(self, v: i16) -> Result {
        self.serialize_str(itoa::Buffer::new().format(v))
    }
    fn serialize_i32(self, v: i32) -> Result {
        self.serialize_str(itoa::Buffer::new().format(v))
    }
    fn serialize_i64(self, v: i64) -> Result {
        self.serialize_str(itoa::Buffer::new().format(v))
    }
    fn serialize_u8(self, v: u8) -> Result {
        self.serialize_str(itoa::Buffer::new().format(v))
    }
    fn serialize_u16(self, v: u16) -> Result {
        self.serialize_str(itoa::Buffer::new().format(v))
    }
    fn serialize_u32(self, v: u32) -> Result {
        self.serialize_str(itoa::Buffer::new().format(v))
    }
    fn serialize_u64(self, v: u64) -> Result {
        self.serialize_str(itoa::Buffer::new().format(v))
    }
    fn serialize_i128(self, v: i128) -> Result {
        self.serialize_str(itoa::Buffer::new().format(v))
    }
    fn serialize_u128(self, v: u128) -> Result {
        self.serialize_str(itoa::Buffer::new().format(v))
    }
    fn serialize_f32(self, _: f32) -> Result {
        Err(Fallback)
    }
    fn serialize_f64(self, _: f64) -> Result {
        Err(Fallback)
    }
    fn serialize_bytes(self, _: &[u8]) -> Result {
        Err(Fallback)
    }
    fn serialize_none(self) -> Result {
        Err(Fallback)
    }
    fn serialize_some<T: ?Sized + Serialize>(self, _: &T) -> Result {
        Err(Fallback)
    }
    fn serialize_unit(self) -> Result {
        Err(Fallback)
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result {
        Err(Fallback)
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result {
        Err(Fallback)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq> {
        Err(Fallback)
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple> {
        Err(Fallback)
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct> {
        Err(Fallback)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant> {
        Err(Fallback)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap> {
        Err(Fallback)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeStruct> {
        Err(Fallback)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant> {
        Err(Fallback)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use proptest::prelude::*;
    use serde::Serialize;
    use serde_json::{Value, json};

    use super::{Encoder, encode_value};

    /// The encoding through a `serde_json::Value`: the definition.
    fn via_value<T: Serialize + ?Sized>(value: &T) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        encode_value(&serde_json::to_value(value).ok()?, &mut out);
        Some(out)
    }

    /// The encoding written straight from `Serialize`; `None` when it falls back.
    fn streamed<T: Serialize + ?Sized>(value: &T) -> Option<Vec<u8>> {
        let mut enc = Encoder::default();
        value.serialize(&mut enc).ok()?;
        Some(enc.out)
    }

    fn same<T: Serialize + ?Sized + std::fmt::Debug>(value: &T) {
        let direct = streamed(value);
        assert!(direct.is_some(), "fell back on {value:?}");
        assert_eq!(direct, via_value(value), "{value:?}");
    }

    #[derive(Debug, Serialize)]
    struct Inner {
        z: Option<u8>,
        a: Vec<i32>,
    }

    #[derive(Debug, Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Payment {
        order_id: String,
        amount_cents: i64,
        currency: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        note: Option<String>,
        ratio: f32,
        inner: Inner,
        tags: Vec<char>,
        #[serde(flatten)]
        extra: BTreeMap<String, u64>,
    }

    #[derive(Debug, Serialize)]
    enum Kind {
        Unit,
        Newtype(u64),
        Tuple(u8, String),
        Struct { y: bool, b: () },
    }

    #[derive(Debug, Serialize)]
    struct Unit;

    #[derive(Debug, Serialize)]
    struct Wrapper(String);

    #[derive(Debug, Serialize)]
    struct Pair(i8, u16);

    #[test]
    fn structs_enums_and_collections_encode_as_their_json_form() {
        let mut extra = BTreeMap::new();
        extra.insert("zeta".to_owned(), 1);
        extra.insert("alpha".to_owned(), 2);
        same(&Payment {
            order_id: "order-1".into(),
            amount_cents: -1999,
            currency: "EUR",
            note: None,
            ratio: 0.1,
            inner: Inner {
                z: Some(7),
                a: vec![i32::MIN, 0, i32::MAX],
            },
            tags: vec!['é', 'x'],
            extra,
        });
        same(&[
            Kind::Unit,
            Kind::Newtype(u64::MAX),
            Kind::Tuple(1, "t".into()),
        ]);
        same(&Kind::Struct { y: true, b: () });
        same(&(
            Unit,
            Wrapper("w".into()),
            Pair(-1, 2),
            (),
            None::<u8>,
            Some("s"),
        ));
        same(&[1.5e300, 0.1, -2.0]);
        same(&[3.25f32]);
        let map: HashMap<String, u32> = (0..50).map(|i| (format!("k{i}"), i)).collect();
        same(&map);
        same(&json!({"z": [1, {"y": null, "b": "x"}], "a": 2.5, "m": {}}));
        same(&Vec::<u8>::new());
        same(&"");
    }

    #[test]
    fn wide_integers_byte_strings_and_non_string_keys_encode_as_their_json_form() {
        let int_keys: HashMap<u32, u32> = [(1, 2), (3, 4)].into();
        let bool_keys: BTreeMap<bool, i128> = [(true, -1), (false, 2)].into();
        same(&int_keys);
        same(&bool_keys);
        same(serde_bytes_like());
        same(&u128::from(u64::MAX));
        same(&i128::from(i64::MIN));
        // Beyond 64 bits JSON has no `Value` for them, but they still encode, distinctly.
        let wide = [
            streamed(&u128::MAX),
            streamed(&(u128::MAX - 1)),
            streamed(&i128::MIN),
        ];
        assert!(wide.iter().all(Option::is_some));
        assert!(wide[0] != wide[1] && wide[1] != wide[2] && wide[0] != wide[2]);
    }

    #[test]
    fn non_finite_floats_encode_apart_from_null_and_negative_zero_as_zero() {
        let encodings = [
            streamed(&None::<f64>),
            streamed(&Some(f64::NAN)),
            streamed(&Some(f64::INFINITY)),
            streamed(&Some(f64::NEG_INFINITY)),
        ];
        for (i, a) in encodings.iter().enumerate() {
            assert!(a.is_some());
            for b in &encodings[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(streamed(&-0.0f64), streamed(&0.0f64));
        assert_eq!(streamed(&-0.0f32), streamed(&0.0f64));
        assert_eq!(via_value(&-0.0f64), via_value(&0.0f64));
        assert_eq!(streamed(&f32::NAN), streamed(&f64::NAN));
    }

    /// A value that serializes as a byte string.
    fn serde_bytes_like() -> &'static Bytes {
        &Bytes
    }

    #[derive(Debug)]
    struct Bytes;

    impl Serialize for Bytes {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(b"raw")
        }
    }

    /// A map that gives a key twice: JSON keeps the last value, so this falls back.
    struct Twice;

    impl Serialize for Twice {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap;
            let mut map = s.serialize_map(Some(3))?;
            map.serialize_entry("b", &1)?;
            map.serialize_entry("a", &2)?;
            map.serialize_entry("b", &3)?;
            map.end()
        }
    }

    #[test]
    fn a_key_given_twice_falls_back() {
        assert_eq!(streamed(&Twice), None);
        assert_eq!(via_value(&Twice), via_value(&json!({"a": 2, "b": 3})));
    }

    fn any_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((".{0,6}", inner), 0..6)
                    .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Any JSON value, and the same entries given as an unsorted map, encode the same
        /// both ways.
        #[test]
        fn any_json_value_encodes_the_same_both_ways(value in any_value()) {
            prop_assert_eq!(streamed(&value), via_value(&value));
            if let Value::Object(map) = &value {
                let mut shuffled: Vec<(&String, &Value)> = map.iter().rev().collect();
                prop_assert_eq!(streamed(&ShuffledMap(shuffled.clone())), via_value(&value));
                let half = shuffled.len() / 2;
                shuffled.rotate_left(half);
                prop_assert_eq!(streamed(&ShuffledMap(shuffled)), via_value(&value));
            }
        }
    }

    /// Entries serialized as a map in the order given.
    struct ShuffledMap<'a>(Vec<(&'a String, &'a Value)>);

    impl Serialize for ShuffledMap<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_map(self.0.iter().copied())
        }
    }
}
