//! Which store a URL names, and with what options: parsed before anything connects, so a
//! bad URL is a one-line error of its own.

use std::path::PathBuf;

use anyhow::{Context as _, bail};

/// A store, as the command line describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// `redis://` or `rediss://`: the URL as the `redis` crate takes it, and the key prefix.
    Redis { url: String, prefix: Option<String> },
    /// `postgres://` or `postgresql://`: the URL as sqlx takes it, and the table.
    Postgres { url: String, table: Option<String> },
    /// `sqlite://PATH`: the database file, and the table.
    Sqlite {
        path: PathBuf,
        table: Option<String>,
    },
    /// `dynamodb://TABLE?…`.
    Dynamo(DynamoSpec),
}

/// A DynamoDB table and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamoSpec {
    pub table: String,
    /// A DynamoDB-compatible endpoint (`?endpoint=`); AWS's own when absent.
    pub endpoint: Option<String>,
    /// `?region=`, else `AWS_REGION` / `AWS_DEFAULT_REGION`.
    pub region: Option<String>,
    /// `?key_attribute=`, `?ttl_attribute=`: as the store was configured.
    pub key_attribute: Option<String>,
    pub ttl_attribute: Option<String>,
}

impl StoreSpec {
    /// The store `url` names, with the `--prefix` and `--table` given.
    ///
    /// # Errors
    /// An unknown scheme, a URL without what its store needs, or an option that the
    /// store does not take (`--prefix` anywhere but Redis, `--table` on Redis).
    pub fn parse(url: &str, prefix: Option<&str>, table: Option<&str>) -> anyhow::Result<Self> {
        let scheme = url
            .split_once("://")
            .map(|(scheme, _)| scheme.to_ascii_lowercase())
            .with_context(|| {
                format!(
                    "{:?} is not a store URL: use redis://, rediss://, postgres://, \
                     sqlite://PATH or dynamodb://TABLE",
                    redacted(url)
                )
            })?;
        let no_prefix = || match prefix {
            Some(_) => {
                bail!("--prefix is a Redis option; {scheme}:// stores have tables (--table)")
            }
            None => Ok(()),
        };
        let spec = match scheme.as_str() {
            "redis" | "rediss" => {
                if table.is_some() {
                    bail!(
                        "--table is not a Redis option; Redis stores have a key prefix (--prefix)"
                    );
                }
                Self::Redis {
                    url: url.to_owned(),
                    prefix: prefix.map(str::to_owned),
                }
            }
            "postgres" | "postgresql" => {
                no_prefix()?;
                Self::Postgres {
                    url: url.to_owned(),
                    table: table.map(str::to_owned),
                }
            }
            "sqlite" => {
                no_prefix()?;
                let path = &url["sqlite://".len()..];
                let path = path.split_once('?').map_or(path, |(path, _)| path);
                if path.is_empty() {
                    bail!(
                        "sqlite:// needs the database file's path: sqlite://PATH or sqlite:///ABSOLUTE/PATH"
                    );
                }
                Self::Sqlite {
                    path: PathBuf::from(path),
                    table: table.map(str::to_owned),
                }
            }
            "dynamodb" => {
                no_prefix()?;
                Self::Dynamo(DynamoSpec::parse(&url["dynamodb://".len()..], table)?)
            }
            other => bail!(
                "unknown store scheme {other}://: use redis://, rediss://, postgres://, \
                 sqlite://PATH or dynamodb://TABLE"
            ),
        };
        Ok(spec)
    }
}

impl DynamoSpec {
    fn parse(rest: &str, table: Option<&str>) -> anyhow::Result<Self> {
        let (name, query) = rest.split_once('?').unwrap_or((rest, ""));
        let name = name.trim_end_matches('/');
        let table = match (name, table) {
            ("", None) => bail!("dynamodb:// needs the table: dynamodb://TABLE?region=REGION"),
            ("", Some(table)) => table.to_owned(),
            (name, Some(table)) if name != table => {
                bail!("the URL names table {name:?} and --table names {table:?}")
            }
            (name, _) => name.to_owned(),
        };
        let mut spec = Self {
            table,
            endpoint: None,
            region: None,
            key_attribute: None,
            ttl_attribute: None,
        };
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            let value = Some(value.into_owned());
            match name.as_ref() {
                "endpoint" => spec.endpoint = value,
                "region" => spec.region = value,
                "key_attribute" => spec.key_attribute = value,
                "ttl_attribute" => spec.ttl_attribute = value,
                other => bail!(
                    "unknown dynamodb:// option {other:?}: use endpoint, region, \
                     key_attribute or ttl_attribute"
                ),
            }
        }
        Ok(spec)
    }
}

/// `url` with any password replaced, for error messages.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Only fails for URLs that cannot have a password, which this one has.
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_scheme_names_its_store() {
        assert_eq!(
            StoreSpec::parse("redis://127.0.0.1:6379/0", Some("billing:"), None).ok(),
            Some(StoreSpec::Redis {
                url: "redis://127.0.0.1:6379/0".into(),
                prefix: Some("billing:".into())
            })
        );
        assert!(matches!(
            StoreSpec::parse("rediss://h", None, None),
            Ok(StoreSpec::Redis { .. })
        ));
        for url in ["postgres://u@h/db", "postgresql://u@h/db"] {
            assert!(matches!(
                StoreSpec::parse(url, None, Some("t")),
                Ok(StoreSpec::Postgres { table: Some(_), .. })
            ));
        }
        assert_eq!(
            StoreSpec::parse("sqlite:///var/lib/app/x.db", None, None).ok(),
            Some(StoreSpec::Sqlite {
                path: "/var/lib/app/x.db".into(),
                table: None
            })
        );
        assert_eq!(
            StoreSpec::parse("sqlite://rel/x.db", None, None).ok(),
            Some(StoreSpec::Sqlite {
                path: "rel/x.db".into(),
                table: None
            })
        );
    }

    #[test]
    fn dynamodb_urls_carry_their_options() {
        let spec = StoreSpec::parse(
            "dynamodb://Orders-1?endpoint=http://127.0.0.1:8000&region=eu-west-1&key_attribute=pk",
            None,
            None,
        );
        assert_eq!(
            spec.ok(),
            Some(StoreSpec::Dynamo(DynamoSpec {
                table: "Orders-1".into(),
                endpoint: Some("http://127.0.0.1:8000".into()),
                region: Some("eu-west-1".into()),
                key_attribute: Some("pk".into()),
                ttl_attribute: None,
            }))
        );
        let from_option = StoreSpec::parse("dynamodb://?region=x", None, Some("t"));
        assert!(
            matches!(from_option, Ok(StoreSpec::Dynamo(DynamoSpec { table, .. })) if table == "t")
        );
    }

    #[test]
    fn bad_urls_and_misplaced_options_are_errors() {
        for (url, prefix, table) in [
            ("127.0.0.1:6379", None, None),
            ("ftp://host", None, None),
            ("memory://", None, None),
            ("sqlite://", None, None),
            ("dynamodb://", None, None),
            ("dynamodb://t?color=blue", None, None),
            ("dynamodb://a", None, Some("b")),
            ("postgres://h/db", Some("p:"), None),
            ("redis://h", None, Some("t")),
        ] {
            assert!(StoreSpec::parse(url, prefix, table).is_err(), "{url}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redacted("redis://:hunter2@127.0.0.1:6379"),
            "redis://:***@127.0.0.1:6379"
        );
        assert_eq!(redacted("postgres://u@h/db"), "postgres://u@h/db");
    }
}
