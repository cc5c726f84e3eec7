//! The name of the table a store keeps its records in.

use std::fmt;

/// The longest accepted table name. PostgreSQL truncates identifiers at 63 bytes; the
/// index is named after the table with a suffix, so the table name leaves room for it.
pub const MAX_TABLE_NAME_LEN: usize = 48;

/// The table used when none is configured.
pub const DEFAULT_TABLE: &str = "orchestrix_idempotency";

/// A table name that was refused: it must start with an ASCII letter or `_`, continue with
/// ASCII letters, digits or `_`, and be at most [`MAX_TABLE_NAME_LEN`] bytes long.
///
/// The name is spliced into SQL (identifiers cannot be bound as parameters), so only
/// plain identifiers are accepted; nothing is quoted or escaped. Accepted names are
/// lowercased, as PostgreSQL does with unquoted identifiers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid table name {name:?}: use 1 to {MAX_TABLE_NAME_LEN} ASCII letters, digits or \
     underscores, not starting with a digit"
)]
pub struct InvalidTableName {
    name: String,
}

impl InvalidTableName {
    /// The name that was refused.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A validated table name, safe to splice into SQL text.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct TableName(String);

impl TableName {
    pub(crate) fn new(name: &str) -> Result<Self, InvalidTableName> {
        let mut chars = name.chars();
        let starts_well = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        let continues_well = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if starts_well && continues_well && name.len() <= MAX_TABLE_NAME_LEN {
            Ok(Self(name.to_ascii_lowercase()))
        } else {
            Err(InvalidTableName {
                name: name.to_owned(),
            })
        }
    }

    pub(crate) fn default_table() -> Self {
        Self(DEFAULT_TABLE.to_owned())
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_identifiers_are_accepted() {
        for name in ["orx", "_orx", "Orx_2", DEFAULT_TABLE, &"a".repeat(48)] {
            assert!(TableName::new(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn names_are_lowercased_like_unquoted_identifiers() {
        assert_eq!(
            TableName::new("Orx_Records").ok().map(|t| t.0),
            Some("orx_records".into())
        );
    }

    #[test]
    fn anything_that_would_need_quoting_is_refused() {
        for name in [
            "",
            "2orx",
            "orx-table",
            "orx table",
            "orx;drop table x",
            "public.orx",
            "\"orx\"",
            "tablé",
            &"a".repeat(49),
        ] {
            let err = TableName::new(name).err();
            assert_eq!(err.as_ref().map(InvalidTableName::name), Some(name));
        }
    }
}
