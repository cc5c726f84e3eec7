//! What the layer reads from a request: its key, its body (bounded) and its fingerprint.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method, Uri, header};
use http_body::Body as HttpBody;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use orchestrix::KeyError;
use orchestrix::idempotency::validate_key;
use sha2::{Digest, Sha256};

use crate::config::MAX_KEY_CHARS;
use crate::problem::Problem;

/// The key under which the request is stored: `prefix` + the header's value.
///
/// `Ok(None)` when the header is absent; a [`Problem::InvalidKey`] when it is repeated,
/// not UTF-8, empty, over [`MAX_KEY_CHARS`], or contains control characters.
pub(crate) fn scoped_key(
    headers: &HeaderMap,
    name: &HeaderName,
    prefix: &str,
) -> Result<Option<String>, Problem> {
    let invalid = |reason: String| Problem::InvalidKey {
        header: name.to_string(),
        reason,
    };
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(invalid("it must appear once".to_owned()));
    }
    let key = std::str::from_utf8(value.as_bytes())
        .map_err(|_| invalid("it is not valid UTF-8".to_owned()))?;
    let chars = key.chars().count();
    if chars > MAX_KEY_CHARS {
        return Err(invalid(format!(
            "it is {chars} characters long; the limit is {MAX_KEY_CHARS}"
        )));
    }
    validate_key(key).map_err(|e| invalid(describe(&e)))?;
    let scoped = format!("{prefix}{key}");
    validate_key(&scoped).map_err(|e| invalid(describe(&e)))?;
    Ok(Some(scoped))
}

fn describe(error: &KeyError) -> String {
    match error {
        KeyError::Empty => "it is empty".to_owned(),
        KeyError::ControlCharacter { .. } => "it contains a control character".to_owned(),
        other => other.to_string(),
    }
}

/// The whole body, or [`Problem::PayloadTooLarge`] as soon as it is known to be over
/// `limit` (from `Content-Length`, before reading anything, or while reading).
pub(crate) async fn read_body<B>(
    headers: &HeaderMap,
    body: B,
    limit: usize,
) -> Result<Bytes, Problem>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(Problem::PayloadTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(Problem::PayloadTooLarge { limit })
        }
        Err(e) => {
            tracing::debug!(error = %e, "idempotent request body could not be read");
            Err(Problem::UnreadableBody)
        }
    }
}

/// SHA-256 over the method, the path and query, and the body, as 64 hex digits: two
/// requests agree exactly when they would do the same thing.
pub(crate) fn fingerprint(method: &Method, uri: &Uri, body: &[u8]) -> String {
    let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let digest = Sha256::new()
        .chain_update(b"orchestrix-http/1\n")
        .chain_update(method.as_str())
        .chain_update(b"\n")
        .chain_update(path)
        .chain_update(b"\n")
        .chain_update(body)
        .finalize();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn key_of(values: &[&[u8]]) -> Result<Option<String>, Problem> {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(crate::IDEMPOTENCY_KEY, HeaderValue::from_bytes(v).unwrap());
        }
        scoped_key(&headers, &crate::IDEMPOTENCY_KEY, "http:")
    }

    #[test]
    fn a_key_is_prefixed() {
        assert_eq!(key_of(&[b"abc"]).unwrap().as_deref(), Some("http:abc"));
        assert_eq!(key_of(&[]).unwrap(), None);
    }

    #[test]
    fn malformed_keys_are_refused() {
        let long = "k".repeat(MAX_KEY_CHARS + 1);
        for bad in [&b""[..], b"a\tb", b"\xff\xfe", long.as_bytes()] {
            assert!(
                matches!(key_of(&[bad]), Err(Problem::InvalidKey { .. })),
                "{bad:?}"
            );
        }
        assert!(
            key_of(&["k".repeat(MAX_KEY_CHARS).as_bytes()])
                .unwrap()
                .is_some()
        );
        assert!(matches!(
            key_of(&[b"a", b"b"]),
            Err(Problem::InvalidKey { .. })
        ));
    }

    #[test]
    fn fingerprints_differ_by_method_path_query_and_body() {
        let uri: Uri = "/a?x=1".parse().unwrap();
        let base = fingerprint(&Method::POST, &uri, b"{}");
        assert_eq!(base.len(), 64);
        assert_eq!(base, fingerprint(&Method::POST, &uri, b"{}"));
        assert_ne!(base, fingerprint(&Method::PATCH, &uri, b"{}"));
        assert_ne!(
            base,
            fingerprint(&Method::POST, &"/a?x=2".parse().unwrap(), b"{}")
        );
        assert_ne!(base, fingerprint(&Method::POST, &uri, b"{ }"));
    }
}
