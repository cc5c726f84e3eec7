//! The journal as both stores keep it: in the record's own row, so that the statement that
//! takes a run over reads the journal under the same row lock that fences it.
//!
//! Two columns: `input` (the bytes of [`Journal::input`], as given) and `journal` (every
//! entry appended since, each as a 4-byte big-endian length and then its bytes, one after
//! another). An append is `journal = journal || <framed entry>`, so the database never
//! looks inside an entry, and a stale owner's append is refused by the same `UPDATE`
//! that would write it.
//!
//! The size a store limits ([`DEFAULT_MAX_JOURNAL_BYTES`]) is what the row holds: the
//! input plus the framed entries (4 bytes more per entry than
//! [`Journal::len_bytes`]).

use orchestrix::store::{Journal, StoreError};
use sqlx::{ColumnIndex, Decode, Row, Type};

/// The largest journal (input and framed entries) a store keeps unless configured
/// otherwise; an append past it is [`StoreError::TooLarge`].
pub const DEFAULT_MAX_JOURNAL_BYTES: usize = 64 * 1024 * 1024;

/// Bytes of the length before each entry.
const FRAME: usize = 4;

/// `entry` as it is appended to the `journal` column: its length, then its bytes.
///
/// # Errors
/// [`StoreError::TooLarge`] for an entry whose length does not fit the frame.
pub(crate) fn frame(entry: &[u8]) -> Result<Vec<u8>, StoreError> {
    let len = u32::try_from(entry.len()).map_err(|_| StoreError::TooLarge {
        size: entry.len(),
        limit: u32::MAX as usize,
    })?;
    let mut framed = Vec::with_capacity(FRAME + entry.len());
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(entry);
    Ok(framed)
}

/// The entries of a `journal` column, oldest first.
///
/// # Errors
/// [`StoreError::Decode`] unless the bytes are whole frames, end to end.
pub(crate) fn entries(mut framed: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
    let mut entries = Vec::new();
    while !framed.is_empty() {
        let Some((len, rest)) = framed.split_first_chunk::<FRAME>() else {
            return Err(StoreError::decode(format!(
                "journal ends inside an entry's length ({} bytes left)",
                framed.len()
            )));
        };
        let len = u32::from_be_bytes(*len) as usize;
        let Some((entry, rest)) = rest.split_at_checked(len) else {
            return Err(StoreError::decode(format!(
                "journal entry of {len} bytes is cut short at {} bytes",
                rest.len()
            )));
        };
        entries.push(entry.to_vec());
        framed = rest;
    }
    Ok(entries)
}

/// The journal in the columns `input` and `journal` of `row`.
///
/// # Errors
/// [`StoreError::Decode`] if either is NULL, of another type, or the entries are not whole
/// frames: a durable row without a readable journal is never treated as an empty one.
pub(crate) fn decode_journal<'r, R>(row: &'r R) -> Result<Journal, StoreError>
where
    R: Row,
    &'r str: ColumnIndex<R>,
    Option<Vec<u8>>: Decode<'r, R::Database> + Type<R::Database>,
{
    let input: Option<Vec<u8>> = row.try_get("input").map_err(crate::row::store_error)?;
    let journal: Option<Vec<u8>> = row.try_get("journal").map_err(crate::row::store_error)?;
    match (input, journal) {
        (Some(input), Some(journal)) => Ok(Journal {
            input,
            entries: entries(&journal)?,
        }),
        _ => Err(StoreError::decode(
            "durable record without its input or journal",
        )),
    }
}

/// The smallest string greater than every string that starts with `prefix`, in byte order
/// (which for UTF-8 is code-point order): `prefix` with its last character incremented,
/// after dropping trailing `char::MAX`. `None` when there is no such bound (an empty prefix,
/// or one made only of `char::MAX`): every key at or after `prefix` matches.
///
/// `abandoned` selects `key >= prefix AND key < successor` rather than `LIKE`, so `%`, `_`
/// and `\` in keys are plain characters.
pub(crate) fn prefix_successor(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match last {
            // The surrogates are not characters: the next one after U+D7FF is U+E000.
            '\u{D7FF}' => Some('\u{E000}'),
            c => char::from_u32(u32::from(c) + 1),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// A page size for `LIMIT`: at most `i64::MAX`.
pub(crate) fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(items: &[&[u8]]) -> Vec<u8> {
        items
            .iter()
            .flat_map(|e| frame(e).unwrap_or_default())
            .collect()
    }

    #[test]
    fn entries_round_trip_through_frames() {
        let binary: Vec<u8> = (0..=255).collect();
        let items: [&[u8]; 4] = [b"step 0", b"", &binary, &[0, 0, 0, 0]];
        assert_eq!(
            entries(&framed(&items)).ok(),
            Some(items.iter().map(|e| e.to_vec()).collect())
        );
        assert_eq!(entries(&[]).ok(), Some(vec![]));
    }

    #[test]
    fn a_cut_journal_is_a_decode_error() {
        let whole = framed(&[b"abc", b"defg"]);
        for cut in 1..whole.len() {
            if cut == 7 {
                // The end of the first frame: a shorter journal, still whole.
                assert_eq!(entries(&whole[..cut]).ok(), Some(vec![b"abc".to_vec()]));
                continue;
            }
            assert!(
                matches!(entries(&whole[..cut]), Err(StoreError::Decode(_))),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn successor_bounds_exactly_the_keys_with_the_prefix() {
        assert_eq!(prefix_successor("flow:").as_deref(), Some("flow;"));
        assert_eq!(prefix_successor("a%_").as_deref(), Some("a%`"));
        assert_eq!(prefix_successor("é").as_deref(), Some("ê"));
        assert_eq!(prefix_successor("x\u{D7FF}").as_deref(), Some("x\u{E000}"));
        assert_eq!(prefix_successor("ab\u{10FFFF}").as_deref(), Some("ac"));
        assert_eq!(prefix_successor("\u{10FFFF}\u{10FFFF}"), None);
        assert_eq!(prefix_successor(""), None);
        for (prefix, key) in [("flow:", "flow:🔑"), ("é", "é\u{10FFFF}"), ("a", "a")] {
            let upper = prefix_successor(prefix).unwrap_or_default();
            assert!(key.as_bytes() >= prefix.as_bytes() && key.as_bytes() < upper.as_bytes());
        }
        for (prefix, key) in [("flow:", "flow;"), ("é", "ê"), ("ab", "ac")] {
            let upper = prefix_successor(prefix).unwrap_or_default();
            assert!(key.as_bytes() >= upper.as_bytes(), "{key} is past {prefix}");
        }
    }
}
