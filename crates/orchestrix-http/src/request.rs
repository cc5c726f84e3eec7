//! What the layer reads from a request besides its key: its body (bounded) and its
//! fingerprint.

use bytes::Bytes;
use http::{HeaderMap, header, request};
use http_body::Body as HttpBody;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use sha2::{Digest, Sha256};

use crate::problem::Problem;

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

/// SHA-256 over the method, the path and query, the media type of the body
/// (`Content-Type` lower-cased, without parameters) and the body, as 64 hex digits: two
/// requests agree exactly when they would do the same thing.
pub(crate) fn fingerprint(parts: &request::Parts, body: &[u8]) -> String {
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let media_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .map(|value| media_type(value.as_bytes()))
        .unwrap_or_default();
    let digest = Sha256::new()
        .chain_update(b"orchestrix-http/2\n")
        .chain_update(parts.method.as_str())
        .chain_update(b"\n")
        .chain_update(path)
        .chain_update(b"\n")
        .chain_update(media_type)
        .chain_update(b"\n")
        .chain_update(body)
        .finalize();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// `Application/JSON; charset=utf-8` → `application/json`.
fn media_type(content_type: &[u8]) -> Vec<u8> {
    let end = content_type
        .iter()
        .position(|&b| b == b';')
        .unwrap_or(content_type.len());
    content_type[..end].trim_ascii().to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    fn parts(method: Method, uri: &str, content_type: Option<&str>) -> request::Parts {
        let mut request = http::Request::builder().method(method).uri(uri);
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn fingerprints_differ_by_method_path_query_media_type_and_body() {
        let json = Some("application/json");
        let base = fingerprint(&parts(Method::POST, "/a?x=1", json), b"{}");
        assert_eq!(base.len(), 64);
        assert_eq!(
            base,
            fingerprint(&parts(Method::POST, "/a?x=1", json), b"{}")
        );
        for other in [
            fingerprint(&parts(Method::PATCH, "/a?x=1", json), b"{}"),
            fingerprint(&parts(Method::POST, "/a?x=2", json), b"{}"),
            fingerprint(&parts(Method::POST, "/a?x=1", Some("text/plain")), b"{}"),
            fingerprint(&parts(Method::POST, "/a?x=1", None), b"{}"),
            fingerprint(&parts(Method::POST, "/a?x=1", json), b"{ }"),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn the_media_type_is_compared_without_case_or_parameters() {
        let json = fingerprint(&parts(Method::POST, "/", Some("application/json")), b"{}");
        for same in [
            "Application/JSON",
            "application/json; charset=utf-8",
            " application/json ;charset=UTF-8",
        ] {
            assert_eq!(
                json,
                fingerprint(&parts(Method::POST, "/", Some(same)), b"{}"),
                "{same}"
            );
        }
    }
}
