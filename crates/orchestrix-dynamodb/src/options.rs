//! Where the store keeps its records: table, attribute names, clock-skew allowance.

use std::time::Duration;

use crate::item::{FIXED_ATTRIBUTES, MAX_ITEM_BYTES};

/// The default partition-key attribute.
pub const DEFAULT_KEY_ATTRIBUTE: &str = "key";
/// The default TTL attribute (epoch seconds, read by DynamoDB's native expiry).
pub const DEFAULT_TTL_ATTRIBUTE: &str = "ttl";
/// The default clock-skew allowance.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(1);
/// The largest journal a durable run may keep unless configured otherwise: DynamoDB's
/// item limit, 400 KB (409,600 bytes). The whole item (key, fingerprint, journal and its
/// bookkeeping, and a finished run's result) must fit in that limit too, so in practice
/// DynamoDB refuses first; see [`DynamoOptions::max_journal_bytes`].
pub const DEFAULT_MAX_JOURNAL_BYTES: usize = MAX_ITEM_BYTES;

/// How a [`DynamoStore`](crate::DynamoStore) lays its records out in a table.
///
/// ```
/// use std::time::Duration;
/// use orchestrix_dynamodb::DynamoOptions;
///
/// let options = DynamoOptions::new("idempotency")
///     .key_attribute("pk")
///     .ttl_attribute("expires_at")
///     .clock_skew(Duration::from_millis(500))
///     .max_journal_bytes(256 * 1024);
/// assert_eq!(options.table(), "idempotency");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamoOptions {
    table: String,
    key_attribute: String,
    ttl_attribute: String,
    clock_skew: Duration,
    max_journal_bytes: usize,
}

impl DynamoOptions {
    /// Options for `table`, with the default attribute names (`key`, `ttl`), a
    /// clock-skew allowance of one second and journals up to the item limit.
    pub fn new(table: impl Into<String>) -> Self {
        Self {
            table: table.into(),
            key_attribute: DEFAULT_KEY_ATTRIBUTE.to_owned(),
            ttl_attribute: DEFAULT_TTL_ATTRIBUTE.to_owned(),
            clock_skew: DEFAULT_CLOCK_SKEW,
            max_journal_bytes: DEFAULT_MAX_JOURNAL_BYTES,
        }
    }

    /// The table's partition-key attribute (type `S`). Default `key`.
    #[must_use]
    pub fn key_attribute(mut self, name: impl Into<String>) -> Self {
        self.key_attribute = name.into();
        self
    }

    /// The attribute the table's native TTL is enabled on (type `N`, epoch seconds).
    /// Default `ttl`.
    #[must_use]
    pub fn ttl_attribute(mut self, name: impl Into<String>) -> Self {
        self.ttl_attribute = name.into();
        self
    }

    /// How far apart the clocks of the machines sharing the table may be.
    ///
    /// DynamoDB has no server clock an expression can read, so expiry is decided by the
    /// caller's clock: a lease or TTL counts as lapsed only once `expiry + clock_skew` has
    /// passed. A larger allowance delays takeover of a crashed owner's key by that much;
    /// a smaller one than the real skew lets a fast clock take over a lease that is still
    /// alive on the owner's. Default one second (NTP-synchronised hosts are within
    /// milliseconds).
    #[must_use]
    pub fn clock_skew(mut self, allowance: Duration) -> Self {
        self.clock_skew = allowance;
        self
    }

    /// The largest journal (input and entries, in bytes) a durable run may keep: an
    /// append that would make it larger is
    /// [`StoreError::TooLarge`](orchestrix::store::StoreError::TooLarge) and appends
    /// nothing, as is a durable start whose input alone is larger.
    ///
    /// A durable run's record is one item, and DynamoDB refuses items over 400 KB: the
    /// journal shares them with the key, the fingerprint, 12 bytes of bookkeeping per
    /// entry, and, once the run finished, its result. An append DynamoDB refuses is
    /// `TooLarge` too, whatever this limit. Set it lower to keep room for a result: a
    /// finished run whose result does not fit beside its journal is stored without the
    /// result (`TooLarge`, the run never runs again). Default
    /// [`DEFAULT_MAX_JOURNAL_BYTES`], the item limit; a larger value changes nothing.
    #[must_use]
    pub fn max_journal_bytes(mut self, bytes: usize) -> Self {
        self.max_journal_bytes = bytes;
        self
    }

    /// The journal limit: [`max_journal_bytes`](Self::max_journal_bytes), at most the
    /// item limit.
    pub fn journal_limit(&self) -> usize {
        self.max_journal_bytes.min(MAX_ITEM_BYTES)
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The partition-key attribute name.
    pub fn key_attribute_name(&self) -> &str {
        &self.key_attribute
    }

    /// The TTL attribute name.
    pub fn ttl_attribute_name(&self) -> &str {
        &self.ttl_attribute
    }

    /// The clock-skew allowance.
    pub fn clock_skew_allowance(&self) -> Duration {
        self.clock_skew
    }

    /// Checks that the layout can hold a record: a table name, and attribute names that
    /// are neither empty nor shared with each other or with the store's own attributes.
    pub(crate) fn validate(&self) -> Result<(), OptionsError> {
        if self.table.is_empty() {
            return Err(OptionsError::EmptyTable);
        }
        for name in [&self.key_attribute, &self.ttl_attribute] {
            if name.is_empty() {
                return Err(OptionsError::EmptyAttribute);
            }
            if FIXED_ATTRIBUTES.contains(&name.as_str()) {
                return Err(OptionsError::AttributeClash(name.clone()));
            }
        }
        if self.key_attribute == self.ttl_attribute {
            return Err(OptionsError::AttributeClash(self.key_attribute.clone()));
        }
        Ok(())
    }
}

/// [`DynamoOptions`] that cannot describe a record layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OptionsError {
    /// The table name is empty.
    #[error("the DynamoDB table name is empty")]
    EmptyTable,
    /// The key or TTL attribute name is empty.
    #[error("a DynamoDB attribute name is empty")]
    EmptyAttribute,
    /// Two attributes of the record would share this name (the key and TTL attributes
    /// must differ from each other and from the store's own attributes).
    #[error("attribute name {0:?} is used twice in the record layout")]
    AttributeClash(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(DynamoOptions::new("t").validate(), Ok(()));
    }

    #[test]
    fn empty_names_are_refused() {
        assert_eq!(
            DynamoOptions::new("").validate(),
            Err(OptionsError::EmptyTable)
        );
        assert_eq!(
            DynamoOptions::new("t").key_attribute("").validate(),
            Err(OptionsError::EmptyAttribute)
        );
    }

    #[test]
    fn the_journal_limit_is_at_most_the_item_limit() {
        assert_eq!(DynamoOptions::new("t").journal_limit(), MAX_ITEM_BYTES);
        let small = DynamoOptions::new("t").max_journal_bytes(1024);
        assert_eq!(small.journal_limit(), 1024);
        let large = DynamoOptions::new("t").max_journal_bytes(10 * MAX_ITEM_BYTES);
        assert_eq!(large.journal_limit(), MAX_ITEM_BYTES);
    }

    #[test]
    fn durable_attribute_names_are_taken_too() {
        for name in ["journal", "lease_until_ms", "input"] {
            assert!(matches!(
                DynamoOptions::new("t").ttl_attribute(name).validate(),
                Err(OptionsError::AttributeClash(_))
            ));
        }
    }

    #[test]
    fn clashing_attribute_names_are_refused() {
        assert!(matches!(
            DynamoOptions::new("t").key_attribute("status").validate(),
            Err(OptionsError::AttributeClash(_))
        ));
        assert!(matches!(
            DynamoOptions::new("t")
                .key_attribute("x")
                .ttl_attribute("x")
                .validate(),
            Err(OptionsError::AttributeClash(_))
        ));
    }
}
