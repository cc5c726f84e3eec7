//! The record admin of [`DynamoStore`]: [`RecordAdmin`] over `GetItem`, a paginated
//! `Scan` and a conditional `DeleteItem`.
//!
//! | call | requests | cost |
//! | --- | --- | --- |
//! | `inspect` | one strongly consistent `GetItem` | one read of the item |
//! | `list` | strongly consistent `Scan`s with a filter (`begins_with` on the key, the status), `Limit` = what the page lacks, from the cursor's `ExclusiveStartKey`; at most [`SCANS_PER_PAGE`] per page | **a listing reads the table**: DynamoDB charges every item a `Scan` evaluates, filtered out or not, so listing one flow's records costs a read of every item in the table (a prefix cannot narrow a `Scan` of a hash-keyed table) |
//! | `release` | a `GetItem`, then, for a plain record, a `DeleteItem` conditioned on the token it read; for a durable one, the `suspend` of that token (its lease ends, its journal stays) | two requests; the conditions make it act only on the record it decoded |
//!
//! The cursor is the last evaluated key, which in this layout is the record's key itself.
//! A page holds at most the records asked for (each `Scan` evaluates no more items than
//! the page lacks), and may hold fewer, or none, with a next cursor. Items are decoded by
//! the store's own decoding (`item::decode`, `item::journal`), so an item that is not a
//! record is an undecodable row; expiry is judged on this machine's clock with the store's
//! skew allowance, as every other operation judges it: a lease or TTL "left" is what is
//! left before another caller may take the key. A durable run that was suspended or
//! released has its lease end at the epoch, so how long ago it lapsed is not known: it is
//! shown as lapsed 0 s ago.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue;
use orchestrix::store::{
    Journal, JournalStore, Lease, ListRequest, Listed, Page, RecordAdmin, RecordInfo, RecordStatus,
    Released, SCHEMA_VERSION, StoreError,
};

use super::{DynamoStore, is_conditional_check_failure, request_failed, running};
use crate::item::{self, INPUT, STATUS, SUSPENDED_AT_MS, StoredRecord, TOKEN, now_ms};

/// The most `Scan` requests one page makes: a page over a table the prefix rarely matches
/// ends there, with a cursor to go on from.
pub(crate) const SCANS_PER_PAGE: usize = 16;

/// How often `release` reads and writes when the record changed in between.
const RELEASE_ATTEMPTS: usize = 3;

impl DynamoStore {
    /// What the store's clock rules say of `stored` now, with `journal` (inspect reads it
    /// for a durable record): its [`RecordInfo`], or `None` when it has expired (it reads
    /// as absent).
    fn info(&self, stored: StoredRecord, journal: Option<Journal>) -> Option<RecordInfo> {
        let cutoff = self.cutoff_ms(now_ms());
        if !stored.is_live(cutoff) {
            return None;
        }
        let left = |at: u64| Duration::from_millis(at.saturating_sub(cutoff));
        let record = stored.record;
        let running = record.status == RecordStatus::Running;
        // A plain record's lease is its expiry; a durable one's an attribute of its own.
        let lease_end = match &stored.durable {
            Some(durable) => durable.lease_until_ms,
            None => stored.expires_at_ms,
        };
        let lease = lease_end.filter(|_| running).map(|at| match at {
            at if at > cutoff => Lease::Held { left: left(at) },
            SUSPENDED_AT_MS => Lease::Lapsed {
                ago: Duration::ZERO,
            },
            at => Lease::Lapsed {
                ago: Duration::from_millis(cutoff - at),
            },
        });
        Some(RecordInfo {
            result_bytes: record.result.as_ref().map(|r| r.len() as u64),
            key: record.key,
            status: record.status,
            token: record.token,
            fingerprint: record.fingerprint,
            schema_version: SCHEMA_VERSION,
            durable: stored.durable.is_some(),
            lease,
            expires_in: stored.expires_at_ms.map(left),
            journal,
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
        let stored = self.decode(&found)?;
        let journal = match stored.durable {
            Some(_) => Some(item::journal(&found)?),
            None => None,
        };
        Ok(self.info(stored, journal))
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
                        if let Some(info) = self.info(stored, None)
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
            let stored = self.decode(&found)?;
            let durable = stored.durable.is_some();
            let Some(info) = self.info(stored, None) else {
                return Ok(Released::Absent);
            };
            if info.status != RecordStatus::Running {
                return Ok(Released::NotRunning(info.status));
            }
            if durable {
                if info.is_abandoned() {
                    return Ok(Released::LeaseLapsed);
                }
                // The owner's own suspend, under the token just read: the lease ends, the
                // journal stays, fenced like any owner's write.
                match self.suspend(key, info.token).await {
                    Ok(()) => return Ok(Released::LeaseLapsed),
                    Err(StoreError::StaleToken) => continue,
                    Err(err) => return Err(err),
                }
            }
            // Only the plain record just decoded: same token, still running, no journal.
            let (key_name, key_value) = self.key_value(key);
            let deleted = self
                .client
                .delete_item()
                .table_name(self.options.table())
                .key(key_name, key_value)
                .condition_expression("#t = :token AND #s = :running AND attribute_not_exists(#in)")
                .expression_attribute_names("#t", TOKEN)
                .expression_attribute_names("#s", STATUS)
                .expression_attribute_names("#in", INPUT)
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
