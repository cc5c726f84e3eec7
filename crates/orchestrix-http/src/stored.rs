//! What the layer keeps in the store for a key: a small, versioned binary encoding of a
//! response.
//!
//! The store treats results as opaque bytes, so this module owns the format. It is binary
//! (bodies are arbitrary bytes, often not UTF-8) and starts with a magic and a version, so
//! a record written by something else, or by a future version of this crate, is a typed
//! [`DecodeError`] — which the layer turns into a 503 — never a panic and never a replay
//! of garbage.
//!
//! ```text
//! "OXHR" version:u8 kind:u8 status:u16
//! kind 1 (response):  header-count:u32 { name-len:u32 name value-len:u32 value }* body-len:u64 body
//! kind 2 (not kept):  nothing more — the response was not kept (too large, too slow, broken)
//! ```
//! All integers are big-endian.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};

const MAGIC: &[u8; 4] = b"OXHR";
const VERSION: u8 = 1;
const KIND_RESPONSE: u8 = 1;
const KIND_NOT_KEPT: u8 = 2;

/// The outcome of a handler, as kept for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stored {
    /// The response: status, the allow-listed headers (in order, repeats kept) and body.
    Response {
        status: StatusCode,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Bytes,
    },
    /// The handler ran and answered `status`, but its body was not kept (over the size
    /// limit, past the time limit, or it failed), so it cannot be replayed. The operation
    /// must still never run again under this key.
    NotKept { status: StatusCode },
}

/// Why stored bytes are not a response this crate can replay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum DecodeError {
    #[error("not a stored response (bad magic)")]
    BadMagic,
    #[error("stored response has format version {found}; this build reads {VERSION}")]
    UnsupportedVersion { found: u8 },
    #[error("unknown stored response kind {0}")]
    UnknownKind(u8),
    #[error("truncated stored response: {wanted} more bytes needed, {left} left")]
    Truncated { wanted: u64, left: usize },
    #[error("invalid status code {0}")]
    InvalidStatus(u16),
    #[error("invalid header name")]
    InvalidHeaderName,
    #[error("invalid value for header {0}")]
    InvalidHeaderValue(HeaderName),
    #[error("{0} unexpected bytes after the stored response")]
    TrailingBytes(usize),
}

impl Stored {
    /// The bytes to hand to the store.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len_hint());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        match self {
            Self::Response {
                status,
                headers,
                body,
            } => {
                out.push(KIND_RESPONSE);
                out.extend_from_slice(&status.as_u16().to_be_bytes());
                put_len32(&mut out, headers.len());
                for (name, value) in headers {
                    put_bytes32(&mut out, name.as_str().as_bytes());
                    put_bytes32(&mut out, value.as_bytes());
                }
                out.extend_from_slice(&(body.len() as u64).to_be_bytes());
                out.extend_from_slice(body);
            }
            Self::NotKept { status } => {
                out.push(KIND_NOT_KEPT);
                out.extend_from_slice(&status.as_u16().to_be_bytes());
            }
        }
        out
    }

    fn encoded_len_hint(&self) -> usize {
        match self {
            Self::Response { headers, body, .. } => {
                24 + body.len()
                    + headers
                        .iter()
                        .map(|(n, v)| 8 + n.as_str().len() + v.len())
                        .sum::<usize>()
            }
            Self::NotKept { .. } => 8,
        }
    }

    /// Reads bytes written by [`encode`](Self::encode).
    ///
    /// # Errors
    /// A [`DecodeError`] naming the first thing that is wrong.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader(bytes);
        if r.take(4)? != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(DecodeError::UnsupportedVersion { found: version });
        }
        let kind = r.u8()?;
        let raw_status = r.u16()?;
        let status =
            StatusCode::from_u16(raw_status).map_err(|_| DecodeError::InvalidStatus(raw_status))?;
        let stored = match kind {
            KIND_RESPONSE => {
                let count = r.u32()?;
                // Every header takes at least 8 bytes, which bounds the allocation by the
                // input's size whatever the count claims.
                let mut headers = Vec::with_capacity((count as usize).min(r.0.len() / 8));
                for _ in 0..count {
                    let name = r.bytes32()?;
                    let name =
                        HeaderName::from_bytes(name).map_err(|_| DecodeError::InvalidHeaderName)?;
                    let value = HeaderValue::from_bytes(r.bytes32()?)
                        .map_err(|_| DecodeError::InvalidHeaderValue(name.clone()))?;
                    headers.push((name, value));
                }
                let body_len = r.u64()?;
                let body = Bytes::copy_from_slice(r.take_u64(body_len)?);
                Self::Response {
                    status,
                    headers,
                    body,
                }
            }
            KIND_NOT_KEPT => Self::NotKept { status },
            other => return Err(DecodeError::UnknownKind(other)),
        };
        if !r.0.is_empty() {
            return Err(DecodeError::TrailingBytes(r.0.len()));
        }
        Ok(stored)
    }
}

fn put_len32(out: &mut Vec<u8>, len: usize) {
    // Header names, values and counts are bounded far below 4 GiB by `http` itself.
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
}

fn put_bytes32(out: &mut Vec<u8>, bytes: &[u8]) {
    put_len32(out, bytes.len());
    out.extend_from_slice(bytes);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.0.len() {
            return Err(DecodeError::Truncated {
                wanted: n as u64,
                left: self.0.len(),
            });
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn take_u64(&mut self, n: u64) -> Result<&'a [u8], DecodeError> {
        let left = self.0.len();
        let n = usize::try_from(n).map_err(|_| DecodeError::Truncated { wanted: n, left })?;
        self.take(n)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_be_bytes)
    }

    fn bytes32(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()?;
        self.take_u64(u64::from(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Stored {
        Stored::Response {
            status: StatusCode::CREATED,
            headers: vec![
                (
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
                (http::header::LINK, HeaderValue::from_static("</a>")),
                (http::header::LINK, HeaderValue::from_static("</b>")),
            ],
            body: Bytes::from_static(b"{\"id\":1}\0\xff"),
        }
    }

    #[test]
    fn a_response_round_trips_byte_for_byte() {
        let stored = sample();
        assert_eq!(Stored::decode(&stored.encode()), Ok(stored));
    }

    #[test]
    fn a_not_kept_marker_round_trips() {
        let stored = Stored::NotKept {
            status: StatusCode::OK,
        };
        assert_eq!(Stored::decode(&stored.encode()), Ok(stored));
    }

    #[test]
    fn every_truncation_is_a_typed_error() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert!(
                Stored::decode(&bytes[..len]).is_err(),
                "prefix of {len} bytes"
            );
        }
    }

    #[test]
    fn garbage_is_a_typed_error() {
        assert_eq!(
            Stored::decode(b"not a response"),
            Err(DecodeError::BadMagic)
        );
        let mut bytes = sample().encode();
        bytes[4] = 9;
        assert_eq!(
            Stored::decode(&bytes),
            Err(DecodeError::UnsupportedVersion { found: 9 })
        );
        let mut bytes = sample().encode();
        bytes.push(0);
        assert_eq!(Stored::decode(&bytes), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn huge_claimed_lengths_do_not_allocate_or_panic() {
        let mut bytes = b"OXHR\x01\x01\x00\xc8".to_vec();
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Stored::decode(&bytes),
            Err(DecodeError::Truncated { .. })
        ));
    }
}
