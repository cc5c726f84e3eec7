//! Durable records: the store's [`JournalStore`], on the same items as plain records.
//!
//! A durable record is a plain record's item plus its journal (`input`, `journal`,
//! `journal_bytes`) and, while running, its own lease attribute and retention
//! (`lease_until_ms`, `retain_ms`, `retain_secs`) and the ids of the appends applied
//! (`append_ids`). Its `expires_at_ms` is when the record goes: lease end plus retention
//! while running, so an abandoned run outlives its lease; the TTL end once finished.
//!
//! Every request here is conditional, so DynamoDB's serialisation of writes on one item is
//! what makes each decision atomic; and each recognises its own applied write in the item
//! a refused retry returns (`ReturnValuesOnConditionCheckFailure=ALL_OLD`), since the SDK
//! retries a request whose response it lost.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue, ReturnValuesOnConditionCheckFailure};
use orchestrix::store::{
    DurableStart, DurableStartOutcome, FencingToken, Journal, JournalStore, RecordStatus, Redrive,
    SCHEMA_VERSION, StartRequest, StoreError, fingerprints_agree,
};

use crate::item::{
    self, APPEND_IDS, EXPIRES_AT_MS, FINGERPRINT, INPUT, JOURNAL, JOURNAL_BYTES, LEASE_UNTIL_MS,
    Layout, MAX_ITEM_BYTES, RESULT, RETAIN_MS, RETAIN_SECS, STATUS, SUSPENDED_AT_MS, TOKEN,
    VERSION, item_size, now_ms, number,
};
use crate::store::{DynamoStore, Put, Retention, is_item_too_large, request_failed, running};

/// How many times [`JournalStore::start_durable`] looks again at a key whose item changed
/// under it (a takeover lost to another caller, a record that expired meanwhile) before it
/// gives up. Each look is decided by a conditional write, so more than two means the key
/// is being rewritten continuously.
const START_ROUNDS: usize = 4;

/// What a takeover of an abandoned run found.
enum TakeOver {
    /// The caller owns the run now, with its journal.
    Acquired(Journal),
    /// The item changed since it was read: this is what holds the key now (`None`: no
    /// item).
    Changed(Option<HashMap<String, AttributeValue>>),
}

impl DynamoStore {
    /// The item of a fresh durable run: a running record, its lease and retention, and a
    /// journal that holds only `input`.
    fn durable_item(
        &self,
        req: &DurableStart<'_>,
        token: FencingToken,
        now_ms: u64,
    ) -> HashMap<String, AttributeValue> {
        let lease = self.expiry(now_ms, req.lease);
        let retention = Retention::of(req.retain);
        let mut item = self.running_item(&plain(req), token, retention.after(lease));
        item.extend([
            (LEASE_UNTIL_MS.to_owned(), number(lease.at_ms)),
            (RETAIN_MS.to_owned(), number(retention.ms)),
            (RETAIN_SECS.to_owned(), number(retention.secs)),
            (INPUT.to_owned(), AttributeValue::B(Blob::new(req.input))),
            (JOURNAL.to_owned(), AttributeValue::L(Vec::new())),
            (JOURNAL_BYTES.to_owned(), number(req.input.len())),
        ]);
        item
    }

    /// One conditional `PutItem` of a fresh durable run under `token`: `None` when it
    /// acquired the key, else the item that holds it.
    async fn put_durable(
        &self,
        req: &DurableStart<'_>,
        token: FencingToken,
    ) -> Result<Option<HashMap<String, AttributeValue>>, StoreError> {
        let now = now_ms();
        let item = self.durable_item(req, token, now);
        // What the item leaves for the journal, should DynamoDB find it too large.
        let room = MAX_ITEM_BYTES.saturating_sub(item_size(&item).saturating_sub(req.input.len()));
        match self.put_running(&plain(req), token, item, now).await? {
            Put::Acquired => Ok(None),
            Put::Held(found) => Ok(Some(found)),
            Put::TooLarge(_) => Err(StoreError::TooLarge {
                size: req.input.len(),
                limit: room.min(self.options().journal_limit()),
            }),
        }
    }

    /// Takes over the abandoned run `old` owned, if it still is: one conditional
    /// `UpdateItem` on the old token, the running status, a lease still lapsed and a
    /// record still live, so that of concurrent takers exactly one wins. The new owner's
    /// token, lease, retention and fingerprint replace the old, and the old owner's append
    /// ids go (no retry of its appends can pass the new token); the journal stays, and
    /// comes back in the same response (`ReturnValues=ALL_NEW`): an owner whose clock runs
    /// behind may have appended between the read and this write, and the journal returned
    /// is the one this write took over, appends included.
    async fn take_over(
        &self,
        req: &DurableStart<'_>,
        old: FencingToken,
        token: FencingToken,
    ) -> Result<TakeOver, StoreError> {
        let now = now_ms();
        let lease = self.expiry(now, req.lease);
        let retention = Retention::of(req.retain);
        let expiry = retention.after(lease);
        let (key_name, key_value) = self.key_value(req.key);
        let update = match req.fingerprint {
            Some(_) => {
                "SET #t = :token, #l = :lease, #rm = :rm, #rs = :rs, \
                 #e = :expires, #ttl = :ttl, #f = :fp REMOVE #ids"
            }
            None => {
                "SET #t = :token, #l = :lease, #rm = :rm, #rs = :rs, \
                 #e = :expires, #ttl = :ttl REMOVE #f, #ids"
            }
        };
        let mut request = self
            .client()
            .update_item()
            .table_name(self.options().table())
            .key(key_name, key_value)
            .update_expression(update)
            .condition_expression("#t = :old AND #s = :running AND #l <= :cutoff AND #e > :cutoff")
            .expression_attribute_names("#t", TOKEN)
            .expression_attribute_names("#s", STATUS)
            .expression_attribute_names("#l", LEASE_UNTIL_MS)
            .expression_attribute_names("#rm", RETAIN_MS)
            .expression_attribute_names("#rs", RETAIN_SECS)
            .expression_attribute_names("#e", EXPIRES_AT_MS)
            .expression_attribute_names("#ttl", self.options().ttl_attribute_name())
            .expression_attribute_names("#f", FINGERPRINT)
            .expression_attribute_names("#ids", APPEND_IDS)
            .expression_attribute_values(":old", AttributeValue::S(old.to_string()))
            .expression_attribute_values(":token", AttributeValue::S(token.to_string()))
            .expression_attribute_values(":running", running())
            .expression_attribute_values(":cutoff", number(self.cutoff_ms(now)))
            .expression_attribute_values(":lease", number(lease.at_ms))
            .expression_attribute_values(":rm", number(retention.ms))
            .expression_attribute_values(":rs", number(retention.secs))
            .expression_attribute_values(":expires", number(expiry.at_ms))
            .expression_attribute_values(":ttl", number(expiry.ttl_secs))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        if let Some(fingerprint) = req.fingerprint {
            request =
                request.expression_attribute_values(":fp", AttributeValue::S(fingerprint.into()));
        }
        let err = match request.send().await {
            Ok(output) => {
                let taken = output
                    .attributes()
                    .ok_or_else(|| StoreError::backend(MissingNewItem))?;
                return Ok(TakeOver::Acquired(item::journal(taken)?));
            }
            Err(err) => err,
        };
        if let Some(UpdateItemError::ConditionalCheckFailedException(failed)) =
            err.as_service_error()
        {
            return match failed.item() {
                // An earlier attempt of this very request took the run over (the SDK
                // retried it after its response was lost): the item is ours.
                Some(found) if self.decode(found)?.record.token == token => {
                    Ok(TakeOver::Acquired(item::journal(found)?))
                }
                found => Ok(TakeOver::Changed(found.cloned())),
            };
        }
        Err(request_failed("UpdateItem", err))
    }

    /// Quotes a `TooLarge` for an append DynamoDB refused for the item's size: the journal
    /// it would have made, and what the item had room for, from the item as it is now (one
    /// more request, on this failure only), counted as DynamoDB documents it. The refusal
    /// itself proves the room was less than the journal it would have made, whatever a
    /// server's own accounting. Without the item, what is known: the entry, and the
    /// configured limit.
    async fn refused_append(&self, key: &str, entry: usize) -> StoreError {
        let (key_name, key_value) = self.key_value(key);
        let read = self
            .client()
            .get_item()
            .table_name(self.options().table())
            .key(key_name, key_value)
            .consistent_read(true)
            .send()
            .await;
        let quoted = read.ok().and_then(|output| {
            let found = output.item()?;
            let bytes = self.decode(found).ok()?.durable?.journal_bytes;
            let size = usize::try_from(bytes).ok()?.saturating_add(entry);
            let room = item::journal_room(found, bytes).min(size.saturating_sub(1));
            Some((size, room))
        });
        let (size, limit) = quoted.unwrap_or((entry, self.options().journal_limit()));
        StoreError::TooLarge {
            size,
            limit: limit.min(self.options().journal_limit()),
        }
    }
}

#[async_trait]
impl JournalStore for DynamoStore {
    // A fresh run is one conditional `PutItem`, like a plain `start`. A takeover is two
    // requests: the `PutItem` that finds the abandoned run (in the item its failed
    // condition returns), then the conditional `UpdateItem` that takes it over. DynamoDB
    // cannot do both in one: a `PutItem` replaces the whole item, journal included, and an
    // `UpdateItem` on a free key cannot tell "absent" from "abandoned" while writing a
    // fresh journal into one and keeping the other's. Every other outcome is one request.
    async fn start_durable(
        &self,
        req: DurableStart<'_>,
    ) -> Result<DurableStartOutcome, StoreError> {
        let limit = self.options().journal_limit();
        if req.input.len() > limit {
            return Err(StoreError::TooLarge {
                size: req.input.len(),
                limit,
            });
        }
        let mut held = None;
        for _ in 0..START_ROUNDS {
            let found = match held.take() {
                Some(found) => found,
                None => {
                    let token = Layout::Durable.issue();
                    match self.put_durable(&req, token).await? {
                        Some(found) => found,
                        None => {
                            return Ok(DurableStartOutcome::Acquired {
                                token,
                                resumed: None,
                            });
                        }
                    }
                }
            };
            let cutoff = self.cutoff_ms(now_ms());
            let stored = self.decode(&found)?;
            if !stored.is_live(cutoff) {
                // Expired since the put saw it: the next put takes the key.
                continue;
            }
            let agree = fingerprints_agree(req.fingerprint, stored.record.fingerprint.as_deref());
            if !(stored.is_abandoned(cutoff) && agree) {
                return Ok(DurableStartOutcome::Existing(stored.record));
            }
            // A journal that cannot be read is never taken over: the record stays as it is.
            item::journal_parts(&found)?;
            let token = Layout::Durable.issue();
            match self.take_over(&req, stored.record.token, token).await? {
                TakeOver::Acquired(journal) => {
                    return Ok(DurableStartOutcome::Acquired {
                        token,
                        resumed: Some(journal),
                    });
                }
                TakeOver::Changed(now_held) => held = now_held,
            }
        }
        Err(StoreError::backend(KeptChanging {
            key: req.key.to_owned(),
        }))
    }

    // One conditional `UpdateItem`: `list_append` of the entry, the journal's size kept in
    // `journal_bytes` and held to the limit by the condition, and the append's id added to
    // `append_ids` so that the SDK's retry of an applied append is recognised, not applied
    // twice (an append, unlike the other writes, would still pass its condition).
    async fn append(&self, key: &str, token: FencingToken, entry: &[u8]) -> Result<(), StoreError> {
        let limit = self.options().journal_limit();
        let Some(room) = limit.checked_sub(entry.len()) else {
            return Err(StoreError::TooLarge {
                size: entry.len(),
                limit,
            });
        };
        let now = now_ms();
        let id = item::append_id();
        let err = match self
            .owner_update(key, token, now, Layout::Durable)
            .update_expression("SET #j = list_append(#j, :entry), #jb = #jb + :size ADD #ids :ids")
            .condition_expression(
                "#t = :token AND #s = :running AND #l > :cutoff \
                 AND #jb <= :room AND NOT contains(#ids, :id)",
            )
            .expression_attribute_names("#l", LEASE_UNTIL_MS)
            .expression_attribute_names("#j", JOURNAL)
            .expression_attribute_names("#jb", JOURNAL_BYTES)
            .expression_attribute_names("#ids", APPEND_IDS)
            .expression_attribute_values(
                ":entry",
                AttributeValue::L(vec![AttributeValue::B(Blob::new(entry))]),
            )
            .expression_attribute_values(":size", number(entry.len()))
            .expression_attribute_values(":room", number(room))
            .expression_attribute_values(":ids", AttributeValue::Ns(vec![id.to_string()]))
            .expression_attribute_values(":id", number(id))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await
        {
            Ok(_) => return Ok(()),
            Err(err) => err,
        };
        if let Some(UpdateItemError::ConditionalCheckFailedException(failed)) =
            err.as_service_error()
        {
            let Some(found) = failed.item() else {
                return Err(StoreError::StaleToken);
            };
            let stored = self.decode(found)?;
            let durable = stored.durable.as_ref();
            if stored.record.token == token && durable.is_some_and(|d| d.has_appended(id)) {
                // An earlier attempt of this very append was applied.
                return Ok(());
            }
            if !stored.is_durable_owned_by(token, self.cutoff_ms(now)) {
                return Err(StoreError::StaleToken);
            }
            let bytes = durable.map_or(0, |d| d.journal_bytes);
            return Err(StoreError::TooLarge {
                size: usize::try_from(bytes)
                    .unwrap_or(usize::MAX)
                    .saturating_add(entry.len()),
                limit,
            });
        }
        if is_item_too_large(&err) {
            return Err(self.refused_append(key, entry.len()).await);
        }
        Err(request_failed("UpdateItem", err))
    }

    // The lease ends at the epoch (see `item::SUSPENDED_AT_MS`); the record is kept for its
    // retention from now.
    async fn suspend(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        let now = now_ms();
        let from = self.expiry(now, Duration::ZERO);
        let err = match self
            .owner_update(key, token, now, Layout::Durable)
            .update_expression("SET #l = :suspended, #e = :now + #rm, #ttl = :now_ttl + #rs")
            .expression_attribute_names("#l", LEASE_UNTIL_MS)
            .expression_attribute_names("#e", EXPIRES_AT_MS)
            .expression_attribute_names("#ttl", self.options().ttl_attribute_name())
            .expression_attribute_names("#rm", RETAIN_MS)
            .expression_attribute_names("#rs", RETAIN_SECS)
            .expression_attribute_values(":suspended", number(SUSPENDED_AT_MS))
            .expression_attribute_values(":now", number(from.at_ms))
            .expression_attribute_values(":now_ttl", number(from.ttl_secs))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await
        {
            Ok(_) => return Ok(()),
            Err(err) => err,
        };
        if let Some(UpdateItemError::ConditionalCheckFailedException(failed)) =
            err.as_service_error()
        {
            // Our own suspension: an earlier attempt of this very request was applied.
            let suspended = failed
                .item()
                .and_then(|found| self.decode(found).ok())
                .is_some_and(|found| found.is_suspended_by(token));
            return if suspended {
                Ok(())
            } else {
                Err(StoreError::StaleToken)
            };
        }
        Err(request_failed("UpdateItem", err))
    }

    // One conditional `UpdateItem` on a live, failed, durable record of this schema
    // version: running again under a new token, its result dropped, its journal kept and
    // returned (`ALL_NEW`). Anything else is told apart in the item the failed condition
    // returns.
    async fn redrive(
        &self,
        key: &str,
        lease: Duration,
        retain: Option<Duration>,
    ) -> Result<Redrive, StoreError> {
        let now = now_ms();
        let token = Layout::Durable.issue();
        let lease = self.expiry(now, lease);
        let retention = Retention::of(retain);
        let expiry = retention.after(lease);
        let (key_name, key_value) = self.key_value(key);
        let err = match self
            .client()
            .update_item()
            .table_name(self.options().table())
            .key(key_name, key_value)
            .update_expression(
                "SET #s = :running, #t = :token, #l = :lease, #rm = :rm, #rs = :rs, \
                 #e = :expires, #ttl = :ttl REMOVE #r",
            )
            .condition_expression(
                "#v = :v AND #s = :failed AND attribute_exists(#in) \
                 AND (attribute_not_exists(#e) OR #e > :cutoff)",
            )
            .expression_attribute_names("#v", VERSION)
            .expression_attribute_names("#s", STATUS)
            .expression_attribute_names("#t", TOKEN)
            .expression_attribute_names("#l", LEASE_UNTIL_MS)
            .expression_attribute_names("#rm", RETAIN_MS)
            .expression_attribute_names("#rs", RETAIN_SECS)
            .expression_attribute_names("#e", EXPIRES_AT_MS)
            .expression_attribute_names("#ttl", self.options().ttl_attribute_name())
            .expression_attribute_names("#r", RESULT)
            .expression_attribute_names("#in", INPUT)
            .expression_attribute_values(":v", number(SCHEMA_VERSION))
            .expression_attribute_values(":running", running())
            .expression_attribute_values(
                ":failed",
                AttributeValue::S(RecordStatus::Failed.as_str().into()),
            )
            .expression_attribute_values(":token", AttributeValue::S(token.to_string()))
            .expression_attribute_values(":cutoff", number(self.cutoff_ms(now)))
            .expression_attribute_values(":lease", number(lease.at_ms))
            .expression_attribute_values(":rm", number(retention.ms))
            .expression_attribute_values(":rs", number(retention.secs))
            .expression_attribute_values(":expires", number(expiry.at_ms))
            .expression_attribute_values(":ttl", number(expiry.ttl_secs))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await
        {
            Ok(output) => {
                let redriven = output
                    .attributes()
                    .ok_or_else(|| StoreError::backend(MissingNewItem))?;
                let journal = item::journal(redriven)?;
                return Ok(Redrive::Acquired { token, journal });
            }
            Err(err) => err,
        };
        if let Some(UpdateItemError::ConditionalCheckFailedException(failed)) =
            err.as_service_error()
        {
            let Some(found) = failed.item() else {
                return Ok(Redrive::Absent);
            };
            let stored = self.decode(found)?;
            if !stored.is_live(self.cutoff_ms(now)) {
                return Ok(Redrive::Absent);
            }
            if stored.record.token == token {
                // An earlier attempt of this very request was applied.
                let journal = item::journal(found)?;
                return Ok(Redrive::Acquired { token, journal });
            }
            return Ok(Redrive::NotFailed(stored.record));
        }
        Err(request_failed("UpdateItem", err))
    }

    async fn read_journal(&self, key: &str) -> Result<Option<Journal>, StoreError> {
        let (key_name, key_value) = self.key_value(key);
        let output = self
            .client()
            .get_item()
            .table_name(self.options().table())
            .key(key_name, key_value)
            .consistent_read(true)
            .send()
            .await
            .map_err(|err| request_failed("GetItem", err))?;
        let Some(found) = output.item() else {
            return Ok(None);
        };
        let stored = self.decode(found)?;
        if !stored.is_live(self.cutoff_ms(now_ms())) || stored.durable.is_none() {
            return Ok(None);
        }
        item::journal(found).map(Some)
    }

    // DynamoDB has no index of lease deadlines unless the table is given one, so this is a
    // `Scan` of the whole table, in pages of up to 1 MB, filtered by the server: every
    // call reads (and is billed for) every item, strongly consistent. Scan pages come in
    // hash order, not key order, so the matches are collected, sorted and cut to `limit`
    // here. See the crate documentation for the cost and the sparse-index alternative.
    async fn abandoned(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let key_attribute = self.options().key_attribute_name();
        let cutoff = self.cutoff_ms(now_ms());
        let mut filter =
            String::from("#v = :v AND #s = :running AND #l <= :cutoff AND #e > :cutoff");
        // Empty strings are left out of the expression: they filter nothing.
        if !prefix.is_empty() {
            filter.push_str(" AND begins_with(#k, :prefix)");
        }
        let after = after.filter(|after| !after.is_empty());
        if after.is_some() {
            filter.push_str(" AND #k > :after");
        }
        let mut keys = Vec::new();
        let mut start = None;
        loop {
            let mut scan = self
                .client()
                .scan()
                .table_name(self.options().table())
                .consistent_read(true)
                .filter_expression(&filter)
                .projection_expression("#k")
                .expression_attribute_names("#k", key_attribute)
                .expression_attribute_names("#v", VERSION)
                .expression_attribute_names("#s", STATUS)
                .expression_attribute_names("#l", LEASE_UNTIL_MS)
                .expression_attribute_names("#e", EXPIRES_AT_MS)
                .expression_attribute_values(":v", number(SCHEMA_VERSION))
                .expression_attribute_values(":running", running())
                .expression_attribute_values(":cutoff", number(cutoff))
                .set_exclusive_start_key(start.take());
            if !prefix.is_empty() {
                scan =
                    scan.expression_attribute_values(":prefix", AttributeValue::S(prefix.into()));
            }
            if let Some(after) = after {
                scan = scan.expression_attribute_values(":after", AttributeValue::S(after.into()));
            }
            let page = scan
                .send()
                .await
                .map_err(|err| request_failed("Scan", err))?;
            keys.extend(
                page.items()
                    .iter()
                    .filter_map(|found| match found.get(key_attribute) {
                        Some(AttributeValue::S(key)) => Some(key.clone()),
                        _ => None,
                    }),
            );
            match page.last_evaluated_key() {
                Some(last) if !last.is_empty() => start = Some(last.clone()),
                _ => break,
            }
        }
        // The server filtered already; the same test again costs nothing and keeps the
        // answer right whatever the server's string comparison.
        keys.retain(|key| {
            key.starts_with(prefix) && after.is_none_or(|after| key.as_str() > after)
        });
        keys.sort_unstable();
        keys.dedup();
        keys.truncate(limit);
        Ok(keys)
    }
}

/// The plain start a durable one extends.
fn plain<'a>(req: &DurableStart<'a>) -> StartRequest<'a> {
    StartRequest {
        key: req.key,
        fingerprint: req.fingerprint,
        lease: req.lease,
        rerun_failed: req.rerun_failed,
    }
}

/// A write with `ReturnValues=ALL_NEW` succeeded without returning the item, which a
/// DynamoDB honouring the parameter never does.
#[derive(Debug, thiserror::Error)]
#[error("DynamoDB applied an UpdateItem but returned no item")]
struct MissingNewItem;

/// `start_durable` found the key's item changed under it every time it looked.
#[derive(Debug, thiserror::Error)]
#[error("the record under {key:?} kept changing during a durable start; try again")]
struct KeptChanging {
    key: String,
}
