//! The key a request is stored under: the client's key from the header, scoped to the
//! client who sent it, digested to a fixed length.
//!
//! Keys are chosen by clients, so two clients may well pick the same one. The store key
//! therefore names the client too ([`Scope`]): one client can never replay, or learn of,
//! another's key. And because it is a digest, its length does not depend on the client's
//! key or on the scope: every key the header accepts fits the core's key limit.

use http::request::Parts;
use http::{HeaderMap, HeaderName, header};
use orchestrix::KeyError;
use orchestrix::idempotency::validate_key;
use sha2::{Digest, Sha256};

use crate::config::{MAX_KEY_CHARS, Scope};
use crate::problem::Problem;

/// The key the client sent in `name`, bare (`order-123`) or in the structured-field string
/// form of the IETF draft (`"order-123"`): both forms of a key are the same key.
///
/// `Ok(None)` when the header is absent; a [`Problem::InvalidKey`] when it is repeated,
/// not UTF-8, badly quoted, empty, over [`MAX_KEY_CHARS`] characters, or contains control
/// characters.
pub(crate) fn client_key(
    headers: &HeaderMap,
    name: &HeaderName,
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
    let raw = std::str::from_utf8(value.as_bytes())
        .map_err(|_| invalid("it is not valid UTF-8".to_owned()))?;
    let key = match raw.strip_prefix('"') {
        Some(quoted) => unquote(quoted).map_err(|why| invalid(why.to_owned()))?,
        None => raw.to_owned(),
    };
    let chars = key.chars().count();
    if chars > MAX_KEY_CHARS {
        return Err(invalid(format!(
            "it is {chars} characters long; the limit is {MAX_KEY_CHARS}"
        )));
    }
    validate_key(&key).map_err(|e| invalid(describe(&e)))?;
    Ok(Some(key))
}

/// The content of a structured-field string (RFC 8941 §3.3.3) after its opening quote:
/// up to the closing quote, which must end the value, with `\"` and `\\` the only escapes.
/// Characters beyond ASCII are accepted, as in a bare key.
fn unquote(quoted: &str) -> Result<String, &'static str> {
    let mut key = String::with_capacity(quoted.len());
    let mut chars = quoted.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(escaped @ ('"' | '\\')) => key.push(escaped),
                _ => return Err("its quoted form has an escape other than \\\" or \\\\"),
            },
            '"' if chars.as_str().is_empty() => return Ok(key),
            '"' => return Err("its quoted form goes on after the closing quote"),
            c => key.push(c),
        }
    }
    Err("its quoted form has no closing quote")
}

fn describe(error: &KeyError) -> String {
    match error {
        KeyError::Empty => "it is empty".to_owned(),
        KeyError::ControlCharacter { .. } => "it contains a control character".to_owned(),
        other => other.to_string(),
    }
}

/// The key in the store: `prefix`, then the SHA-256 of the client's scope and `key`, in hex.
///
/// Its length is the prefix's plus 64, whatever the key and the scope.
pub(crate) fn store_key(prefix: &str, scope: &Scope, parts: &Parts, key: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"orchestrix-http/key/1\0")
        .chain_update(client_scope(scope, parts))
        .chain_update(key.as_bytes())
        .finalize();
    let mut stored = String::with_capacity(prefix.len() + 64);
    stored.push_str(prefix);
    push_hex(&mut stored, &digest);
    stored
}

/// Who sent the request, as a fixed-length value: what kind of scope, then a digest of it.
fn client_scope(scope: &Scope, parts: &Parts) -> [u8; 33] {
    const NONE: u8 = 0;
    const AUTHORIZATION: u8 = 1;
    const COOKIE: u8 = 2;
    const CUSTOM: u8 = 3;
    let (kind, digest) = match scope {
        Scope::Unscoped => (NONE, None),
        Scope::Credentials => {
            let headers = &parts.headers;
            if headers.contains_key(header::AUTHORIZATION) {
                (
                    AUTHORIZATION,
                    Some(digest_all(headers, &header::AUTHORIZATION)),
                )
            } else if headers.contains_key(header::COOKIE) {
                (COOKIE, Some(digest_all(headers, &header::COOKIE)))
            } else {
                (NONE, None)
            }
        }
        Scope::Custom(of) => match of(parts) {
            Some(principal) => (CUSTOM, Some(Sha256::digest(principal.as_bytes()).into())),
            None => (NONE, None),
        },
    };
    let mut out = [0; 33];
    out[0] = kind;
    if let Some(digest) = digest {
        out[1..].copy_from_slice(&digest);
    }
    out
}

/// SHA-256 of every value of `name`, in order, each length-prefixed.
fn digest_all(headers: &HeaderMap, name: &HeaderName) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for value in headers.get_all(name) {
        hasher.update((value.len() as u64).to_be_bytes());
        hasher.update(value.as_bytes());
    }
    hasher.finalize().into()
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, Request};
    use std::sync::Arc;

    fn key_of(values: &[&[u8]]) -> Result<Option<String>, Problem> {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(crate::IDEMPOTENCY_KEY, HeaderValue::from_bytes(v).unwrap());
        }
        client_key(&headers, &crate::IDEMPOTENCY_KEY)
    }

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut request = Request::post("/orders");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn a_key_is_read_as_sent() {
        assert_eq!(key_of(&[b"abc"]).unwrap().as_deref(), Some("abc"));
        assert_eq!(key_of(&[]).unwrap(), None);
    }

    #[test]
    fn quoted_keys_are_unquoted() {
        assert_eq!(key_of(&[br#""abc""#]).unwrap().as_deref(), Some("abc"));
        assert_eq!(
            key_of(&[br#""a\"b\\c""#]).unwrap().as_deref(),
            Some(r#"a"b\c"#)
        );
        assert_eq!(key_of(&["\"é\"".as_bytes()]).unwrap().as_deref(), Some("é"));
        // Only a leading quote starts the quoted form.
        assert_eq!(key_of(&[br#"a"b""#]).unwrap().as_deref(), Some(r#"a"b""#));
        let quoted_longest = format!("\"{}\"", "k".repeat(MAX_KEY_CHARS));
        assert!(key_of(&[quoted_longest.as_bytes()]).unwrap().is_some());
    }

    #[test]
    fn badly_quoted_keys_are_refused() {
        for bad in [
            &br#"""#[..],
            br#""abc"#,
            br#""ab"c""#,
            br#""abc"x"#,
            br#""a\bc""#,
            br#""abc\""#,
            br#""""#,
        ] {
            assert!(
                matches!(key_of(&[bad]), Err(Problem::InvalidKey { .. })),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
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
        assert!(matches!(
            key_of(&[b"a", b"b"]),
            Err(Problem::InvalidKey { .. })
        ));
    }

    #[test]
    fn the_longest_keys_are_accepted_and_stored_at_a_fixed_length() {
        for longest in ["k".repeat(MAX_KEY_CHARS), "😀".repeat(MAX_KEY_CHARS)] {
            let key = key_of(&[longest.as_bytes()]).unwrap().unwrap();
            let stored = store_key("http:", &Scope::Credentials, &parts(&[]), &key);
            assert_eq!(stored.len(), "http:".len() + 64);
            assert!(validate_key(&stored).is_ok());
        }
    }

    #[test]
    fn credentials_scope_the_key() {
        let stored = |headers: &[(&str, &str)]| {
            store_key("http:", &Scope::Credentials, &parts(headers), "k")
        };
        let alice = stored(&[("authorization", "Bearer alice")]);
        assert_eq!(alice, stored(&[("authorization", "Bearer alice")]));
        assert_ne!(alice, stored(&[("authorization", "Bearer bob")]));
        assert_ne!(alice, stored(&[]));
        // Authorization wins over Cookie, and the two never collide.
        assert_eq!(
            alice,
            stored(&[("authorization", "Bearer alice"), ("cookie", "s=1")])
        );
        assert_ne!(
            stored(&[("cookie", "Bearer alice")]),
            alice,
            "a cookie equal to a credential is another scope"
        );
        assert_ne!(stored(&[("cookie", "s=1")]), stored(&[("cookie", "s=2")]));
    }

    #[test]
    fn a_custom_scope_reads_the_request_and_unscoped_ignores_credentials() {
        let tenant: Scope = Scope::Custom(Arc::new(|parts: &Parts| {
            parts
                .headers
                .get("x-tenant")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        }));
        let stored = |scope: &Scope, headers: &[(&str, &str)]| {
            store_key("http:", scope, &parts(headers), "k")
        };
        assert_ne!(
            stored(&tenant, &[("x-tenant", "a")]),
            stored(&tenant, &[("x-tenant", "b")])
        );
        assert_eq!(
            stored(&tenant, &[("x-tenant", "a"), ("authorization", "x")]),
            stored(&tenant, &[("x-tenant", "a"), ("authorization", "y")])
        );
        assert_eq!(
            stored(&Scope::Unscoped, &[("authorization", "x")]),
            stored(&Scope::Unscoped, &[("authorization", "y")])
        );
        assert_eq!(
            stored(&Scope::Unscoped, &[]),
            stored(&Scope::Credentials, &[]),
            "a request without credentials has no client scope"
        );
    }
}
