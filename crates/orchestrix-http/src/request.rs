//! What the layer reads from a request besides its key: its body (bounded) and its
//! fingerprint.

use bytes::Bytes;
use http::{HeaderMap, Method, Uri, header};
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
