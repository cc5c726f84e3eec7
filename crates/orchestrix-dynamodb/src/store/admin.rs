//! The record admin of [`DynamoStore`]: [`RecordAdmin`] over `GetItem`, a paginated
//! `Scan` and a conditional `DeleteItem`.
//!
//! | call | requests | cost |
//! | --- | --- | --- |
//! | `inspect` | one strongly consistent `GetItem` | one read of the item |
//! | `list` | strongly consistent `Scan`s with a filter (`begins_with` on the key, the status), `Limit` = what the page lacks, from the cursor's `ExclusiveStartKey`; at most [`SCANS_PER_PAGE`] per page | **a listing reads the table**: DynamoDB charges every item a `Scan` evaluates, filtered out or not, so listing one flow's records costs a read of every item in the table (a prefix cannot narrow a `Scan` of a hash-keyed table) |
//! | `release` | a `GetItem`, then a `DeleteItem` conditioned on the token it read | two requests; the condition makes it act only on the record it decoded |
//!
//! The cursor is the last evaluated key, which in this layout is the record's key itself.
//! A page holds at most the records asked for (each `Scan` evaluates no more items than
//! the page lacks), and may hold fewer, or none, with a next cursor. Items are decoded by
//! the store's own decoding (`item::decode`), so an item that is not a record is an
//! undecodable row; expiry is judged on this machine's clock with the store's skew
//! allowance, as every other operation judges it: a lease or TTL "left" is what is left
//! before another caller may take the key.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue;
use orchestrix::store::{
    Lease, ListRequest, Listed, Page, RecordAdmin, RecordInfo, RecordStatus, Released,
    SCHEMA_VERSION, StoreError,
};

use super::{DynamoStore, is_conditional_check_failure, request_failed, running};
use crate::item::{self, STATUS, StoredRecord, TOKEN, now_ms};

/// The most `Scan` requests one page makes: a page over a table the prefix rarely matches
/// ends there, with a cursor to go on from.
pub(crate) const SCANS_PER_PAGE: usize = 16;

/// How often `release` reads and deletes when the record changed in between.
const RELEASE_ATTEMPTS: usize = 3;

/// The attribute in which builds that keep journals on DynamoDB keep a durable run's
/// input: a record that has one holds a journal, which a release must keep.
const JOURNAL_INPUT: &str = "input";

impl DynamoStore {
    /// What the store's clock rules say of `stored` now: its [`RecordInfo`], or `None` when
    /// it has expired (it reads as absent).
    fn info(&self, stored: StoredRecord) -> Option<RecordInfo> {
        let cutoff = self.cutoff_ms(now_ms());
        if !stored.is_live(cutoff) {
            return None;
        }
        let left = |at: u64| Duration::from_millis(at.saturating_sub(cutoff));
        let record = stored.record;
        let running = record.status == RecordStatus::Running;
        Some(RecordInfo {
            result_bytes: record.result.as_ref().map(|r| r.len() as u64),
            key: record.key,
            status: record.status,
            token: record.token,
            fingerprint: record.fingerprint,
            schema_version: SCHEMA_VERSION,
            durable: false,
            // A live running record's expiry is its lease.
            lease: stored
                .expires_at_ms
                .filter(|_| running)
                .map(|at| Lease::Held { left: left(at) }),
            expires_in: stored.expires_at_ms.map(left),
            journal: None,
        })
    }

    /// The item under `key`, strongly consistent.
    async fn read_item(
        &self,
        key: &str,
    ) -> Result<Option<HashMap<String, AttributeValue>>, StoreError> {
        let (key_name, key_value) = self.key_value(key);
        let output = self
            .client
            .get_item()
            .table_name(self.options.table())
            .key(key_name, key_value)
            .consistent_read(true)
            .send()
            .await
            .map_err(|err| request_failed("GetItem", err))?;
        Ok(output.item)
    }

    /// One `Scan` from `start` evaluating at most `limit` items: the items that passed the
    /// filter, and the key to go on from.
    async fn scan_page(
        &self,
        req: &ListRequest<'_>,
        start: Option<String>,
        limit: usize,
    ) -> Result<(Vec<HashMap<String, AttributeValue>>, Option<String>), StoreError> {
        let key_name = self.options.key_attribute_name();
        let mut filters = Vec::new();
        let mut request = self
            .client
            .scan()
            .table_name(self.options.table())
            .consistent_read(true)
            .limit(i32::try_from(limit).unwrap_or(i32::MAX));
        if !req.prefix.is_empty() {
            filters.push("begins_with(#k, :prefix)");
            request = request
                .expression_attribute_names("#k", key_name)
                .expression_attribute_values(":prefix", AttributeValue::S(req.prefix.to_owned()));
        }
        if let Some(status) = req.filter.status() {
            filters.push("#s = :status");
            request = request
                .expression_attribute_names("#s", STATUS)
                .expression_attribute_values(":status", AttributeValue::S(status.as_str().into()));
        }
        if !filters.is_empty() {
            request = request.filter_expression(filters.join(" AND "));
        }
        if let Some(start) = start {
            request = request.exclusive_start_key(key_name, AttributeValue::S(start));
        }
        let output = request
            .send()
            .await
            .map_err(|err| request_failed("Scan", err))?;
        let next = match output.last_evaluated_key {
            None => None,
            Some(last) => match last.get(key_name) {
                Some(AttributeValue::S(key)) => Some(key.clone()),
                _ => {
                    return Err(StoreError::backend_msg(
                        "DynamoDB's last evaluated key is not the table's string key",
                    ));
                }
            },
        };
        Ok((output.items.unwrap_or_default(), next))
    }
}

#[async_trait]
impl RecordAdmin for DynamoStore {
    async fn inspect(&self, key: &str) -> Result<Option<RecordInfo>, StoreError> {
        let Some(found) = self.read_item(key).await? else {
            return Ok(None);
        };
        let stored = item::decode(&found, self.options.key_attribute_name())?;
        Ok(self.info(stored))
    }

    async fn list(&self, req: ListRequest<'_>) -> Result<Page, StoreError> {
        let page_size = req.page_size();
        let key_name = self.options.key_attribute_name();
        let mut records = Vec::new();
        let mut cursor = req.cursor.map(str::to_owned);
        for _ in 0..SCANS_PER_PAGE {
            let lacking = page_size.saturating_sub(records.len()).max(1);
            let (items, next) = self.scan_page(&req, cursor.take(), lacking).await?;
            cursor = next;
            for found in items {
                match item::decode(&found, key_name) {
                    Ok(stored) => {
                        if let Some(info) = self.info(stored)
                            && req.filter.matches(&info)
                        {
                            records.push(Listed::Record(info));
                        }
                    }
                    Err(error) => {
                        let key = match found.get(key_name) {
                            Some(AttributeValue::S(key)) => key.clone(),
                            _ => String::new(),
                        };
                        records.push(Listed::Undecodable { key, error });
                    }
                }
            }
            if cursor.is_none() || records.len() >= page_size {
                break;
            }
        }
        Ok(Page {
            records,
            next: cursor,
        })
    }

    async fn release(&self, key: &str) -> Result<Released, StoreError> {
        for _ in 0..RELEASE_ATTEMPTS {
            let Some(found) = self.read_item(key).await? else {
                return Ok(Released::Absent);
            };
            let stored = item::decode(&found, self.options.key_attribute_name())?;
            let Some(info) = self.info(stored) else {
                return Ok(Released::Absent);
            };
            if info.status != RecordStatus::Running {
                return Ok(Released::NotRunning(info.status));
            }
            if found.contains_key(JOURNAL_INPUT) {
                return Err(StoreError::backend_msg(format!(
                    "the record under {key:?} holds a durable run's journal, which this \
                     build of the DynamoDB store does not keep: it does not release it"
                )));
            }
            // Only the record just decoded: same token, still running, no journal.
            let (key_name, key_value) = self.key_value(key);
            let deleted = self
                .client
                .delete_item()
                .table_name(self.options.table())
                .key(key_name, key_value)
                .condition_expression("#t = :token AND #s = :running AND attribute_not_exists(#in)")
                .expression_attribute_names("#t", TOKEN)
                .expression_attribute_names("#s", STATUS)
                .expression_attribute_names("#in", JOURNAL_INPUT)
                .expression_attribute_values(":token", AttributeValue::S(info.token.to_string()))
                .expression_attribute_values(":running", running())
                .send()
                .await;
            match deleted {
                Ok(_) => return Ok(Released::Deleted),
                Err(err) if is_conditional_check_failure(&err) => {}
                Err(err) => return Err(request_failed("DeleteItem", err)),
            }
        }
        Err(StoreError::backend_msg(format!(
            "the record under {key:?} changed during every release attempt"
        )))
    }
}
