//! The store: one DynamoDB request per operation.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::client::Waiters;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::create_table::CreateTableError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ReturnValue,
    ReturnValuesOnConditionCheckFailure, ScalarAttributeType, TimeToLiveSpecification,
    TimeToLiveStatus,
};
use orchestrix::store::{
    FencingToken, FinalStatus, IdempotencyStore, JournalStore, Record, RecordAdmin, RecordStatus,
    SCHEMA_VERSION, StartOutcome, StartRequest, StoreError,
};

use crate::item::{
    self, APPEND_IDS, EXPIRES_AT_MS, FINGERPRINT, INPUT, JOURNAL, JOURNAL_BYTES, LEASE_UNTIL_MS,
    Layout, MAX_ITEM_BYTES, RELEASED_AT_MS, RESULT, RETAIN_MS, RETAIN_SECS, RETAIN_UNTIL_DELETED,
    STATUS, TOKEN, VERSION, millis, now_ms, number,
};
use crate::options::{DynamoOptions, OptionsError};

mod admin;

/// The record is running, under this token, and its lease has not lapsed: the condition
/// of every owner's write on a plain record, whose lease is its expiry.
const OWNED: &str = "#t = :token AND #s = :running AND #e > :cutoff";
/// The same on a durable record, whose lease is an attribute of its own.
const OWNED_DURABLE: &str = "#t = :token AND #s = :running AND #l > :cutoff";

/// How long [`DynamoStore::create_table_if_missing`] waits for a new table to turn active.
const TABLE_ACTIVE_TIMEOUT: Duration = Duration::from_secs(300);

/// An [`IdempotencyStore`] on an Amazon DynamoDB table.
///
/// Every operation is a single request: `start` a conditional `PutItem` that returns the
/// record holding the key when its condition fails; `complete`, `fail`, `renew` a
/// conditional `UpdateItem`; `release` a conditional `UpdateItem` that leaves a tombstone
/// (see the crate documentation); `get` a strongly
/// consistent `GetItem`. It keeps the journals of durable flows too
/// ([`JournalStore`]): one request per operation, but two for the takeover of an
/// abandoned run, and a `Scan` of the table to list abandoned runs. See the
/// [crate documentation](crate) for the record layout, the durable requests and their
/// costs, and the clock it relies on.
///
/// Cloning is cheap (the SDK client is reference-counted).
#[derive(Debug, Clone)]
pub struct DynamoStore {
    client: Client,
    options: DynamoOptions,
}

/// When a record written now stops being live.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expiry {
    /// Exact, checked by every condition and read.
    pub(crate) at_ms: u64,
    /// For DynamoDB's native TTL deletion: never before `at_ms` plus the skew allowance.
    pub(crate) ttl_secs: u64,
}

/// How long a durable record is kept once its lease lapsed, in the two units its item
/// stores it in (see [`RETAIN_MS`]); `None` is [`RETAIN_UNTIL_DELETED`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retention {
    pub(crate) ms: u64,
    pub(crate) secs: u64,
}

impl Retention {
    pub(crate) fn of(retain: Option<Duration>) -> Self {
        let ms = millis(retain.unwrap_or(RETAIN_UNTIL_DELETED));
        Self {
            ms,
            secs: ms.div_ceil(1000),
        }
    }

    /// When a durable record whose lease ends at `lease` goes: the lease end plus the
    /// retention, in both units. The same sums the renewal's update expression makes
    /// (`:lease + retain_ms`, `:lease_ttl + retain_secs`), and no earlier than the exact
    /// sum: seconds rounded up twice are never fewer than rounded up once.
    pub(crate) fn after(self, lease: Expiry) -> Expiry {
        Expiry {
            at_ms: lease.at_ms.saturating_add(self.ms),
            ttl_secs: lease.ttl_secs.saturating_add(self.secs),
        }
    }
}

/// What a conditional `PutItem` of a running record found.
pub(crate) enum Put {
    /// The item was written (by this request, or by an earlier attempt of it).
    Acquired,
    /// The condition failed: this item holds the key.
    Held(HashMap<String, AttributeValue>),
    /// DynamoDB refused the item for its size.
    TooLarge(Box<SdkError<PutItemError, HttpResponse>>),
}

impl DynamoStore {
    /// A store on the table described by `options`, sending its requests through `client`
    /// (your own SDK configuration: region, credentials, endpoint, timeouts, retries).
    ///
    /// The table must exist with a string partition key named
    /// [`key_attribute`](DynamoOptions::key_attribute);
    /// [`create_table_if_missing`](Self::create_table_if_missing) makes one.
    ///
    /// # Errors
    /// [`OptionsError`] when the options cannot describe a record layout (empty names,
    /// an attribute name used twice).
    pub fn new(client: Client, options: DynamoOptions) -> Result<Self, OptionsError> {
        options.validate()?;
        Ok(Self { client, options })
    }

    /// The options the store was built with.
    pub fn options(&self) -> &DynamoOptions {
        &self.options
    }

    /// Creates the table (on-demand billing, string partition key) if it does not exist,
    /// waits until it is active, and enables native TTL on the TTL attribute.
    ///
    /// Meant for development and tests; in production create the table with your
    /// infrastructure tooling (see the README for the layout and IAM permissions). Takes
    /// several requests, unlike the store's operations.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when a request fails, or when the table already has TTL
    /// enabled on another attribute.
    pub async fn create_table_if_missing(&self) -> Result<(), StoreError> {
        let table = self.options.table();
        let key = self.options.key_attribute_name();
        let created = self
            .client
            .create_table()
            .table_name(table)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(key)
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .map_err(StoreError::backend)?,
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(key)
                    .key_type(KeyType::Hash)
                    .build()
                    .map_err(StoreError::backend)?,
            )
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await;
        match created {
            Ok(_) => {}
            Err(err)
                if matches!(
                    err.as_service_error(),
                    Some(CreateTableError::ResourceInUseException(_))
                ) => {}
            Err(err) => return Err(request_failed("CreateTable", err)),
        }
        self.client
            .wait_until_table_exists()
            .table_name(table)
            .wait(TABLE_ACTIVE_TIMEOUT)
            .await
            .map_err(|err| request_failed("DescribeTable", err))?;
        self.enable_ttl().await
    }

    async fn enable_ttl(&self) -> Result<(), StoreError> {
        let table = self.options.table();
        let wanted = self.options.ttl_attribute_name();
        let described = self
            .client
            .describe_time_to_live()
            .table_name(table)
            .send()
            .await
            .map_err(|err| request_failed("DescribeTimeToLive", err))?;
        if let Some(ttl) = described.time_to_live_description() {
            if matches!(
                ttl.time_to_live_status(),
                Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)
            ) {
                return match ttl.attribute_name() {
                    Some(name) if name == wanted => Ok(()),
                    other => Err(StoreError::backend(TtlOnOtherAttribute {
                        table: table.to_owned(),
                        found: other.unwrap_or_default().to_owned(),
                        wanted: wanted.to_owned(),
                    })),
                };
            }
        }
        self.client
            .update_time_to_live()
            .table_name(table)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .enabled(true)
                    .attribute_name(wanted)
                    .build()
                    .map_err(StoreError::backend)?,
            )
            .send()
            .await
            .map_err(|err| request_failed("UpdateTimeToLive", err))?;
        Ok(())
    }

    /// Expiry is lapsed when it is at or before this instant: now, minus the allowance
    /// for clocks that run ahead of the writer's.
    pub(crate) fn cutoff_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(millis(self.options.clock_skew_allowance()))
    }

    pub(crate) fn expiry(&self, now_ms: u64, after: Duration) -> Expiry {
        let at_ms = now_ms.saturating_add(millis(after));
        let deletable_ms = at_ms.saturating_add(millis(self.options.clock_skew_allowance()));
        Expiry {
            at_ms,
            ttl_secs: deletable_ms.div_ceil(1000),
        }
    }

    pub(crate) fn key_value(&self, key: &str) -> (String, AttributeValue) {
        (
            self.options.key_attribute_name().to_owned(),
            AttributeValue::S(key.to_owned()),
        )
    }

    /// The client the store sends its requests through.
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// Decodes an item read back from the table.
    pub(crate) fn decode(
        &self,
        found: &HashMap<String, AttributeValue>,
    ) -> Result<item::StoredRecord, StoreError> {
        item::decode(found, self.options.key_attribute_name())
    }

    /// An `UpdateItem` of the record `token` owns, conditioned on the owner's test for the
    /// layout the token was issued for ([`Layout`]); see [`owner_update`](Self::owner_update).
    pub(crate) fn owned_update(
        &self,
        key: &str,
        token: FencingToken,
        now_ms: u64,
    ) -> UpdateItemFluentBuilder {
        self.owner_update(key, token, now_ms, Layout::of(token))
    }

    /// An `UpdateItem` of the record `token` owns, if it is a record of `layout`:
    /// conditioned on the owner's test for that layout, with the names and values the test
    /// uses (`#t`, `#s`, and `#e` or `#l`; `:token`, `:running`, `:cutoff`). The caller
    /// adds its update expression and what that uses.
    pub(crate) fn owner_update(
        &self,
        key: &str,
        token: FencingToken,
        now_ms: u64,
        layout: Layout,
    ) -> UpdateItemFluentBuilder {
        let (key_name, key_value) = self.key_value(key);
        let request = self
            .client
            .update_item()
            .table_name(self.options.table())
            .key(key_name, key_value)
            .expression_attribute_names("#t", TOKEN)
            .expression_attribute_names("#s", STATUS)
            .expression_attribute_values(":token", AttributeValue::S(token.to_string()))
            .expression_attribute_values(":running", running())
            .expression_attribute_values(":cutoff", number(self.cutoff_ms(now_ms)));
        match layout {
            Layout::Plain => request
                .condition_expression(OWNED)
                .expression_attribute_names("#e", EXPIRES_AT_MS),
            Layout::Durable => request
                .condition_expression(OWNED_DURABLE)
                .expression_attribute_names("#l", LEASE_UNTIL_MS),
        }
    }

    /// The attributes every running record starts with: key, version, status, token,
    /// fingerprint, and when it stops being live.
    pub(crate) fn running_item(
        &self,
        req: &StartRequest<'_>,
        token: FencingToken,
        expiry: Expiry,
    ) -> HashMap<String, AttributeValue> {
        let (key_name, key_value) = self.key_value(req.key);
        let mut item = HashMap::from([
            (key_name, key_value),
            (VERSION.to_owned(), number(SCHEMA_VERSION)),
            (STATUS.to_owned(), running()),
            (TOKEN.to_owned(), AttributeValue::S(token.to_string())),
            (EXPIRES_AT_MS.to_owned(), number(expiry.at_ms)),
            (
                self.options.ttl_attribute_name().to_owned(),
                number(expiry.ttl_secs),
            ),
        ]);
        if let Some(fingerprint) = req.fingerprint {
            item.insert(
                FINGERPRINT.to_owned(),
                AttributeValue::S(fingerprint.to_owned()),
            );
        }
        item
    }

    /// Writes `item`, the running record `token` acquires, if the key is free for `req`:
    /// one conditional `PutItem` that returns the item in the way when the key is not.
    ///
    /// The free cases, in the order of the decision table: absent; expired (of this
    /// schema version only — an unknown layout is never "free"); a failure the caller may
    /// re-run, with fingerprints that do not disagree. The type check keeps a malformed
    /// expiry from being compared at all (DynamoDB would call it not expired, moto fails
    /// the request); the record is then reported and fails to decode.
    pub(crate) async fn put_running(
        &self,
        req: &StartRequest<'_>,
        token: FencingToken,
        item: HashMap<String, AttributeValue>,
        now_ms: u64,
    ) -> Result<Put, StoreError> {
        let condition = match (req.rerun_failed, req.fingerprint.is_some()) {
            (false, _) => {
                "attribute_not_exists(#k) OR (#v = :v \
                 AND (attribute_type(#e, :number) AND #e <= :cutoff))"
            }
            (true, false) => {
                "attribute_not_exists(#k) OR (#v = :v \
                 AND ((attribute_type(#e, :number) AND #e <= :cutoff) OR #s = :failed))"
            }
            (true, true) => {
                "attribute_not_exists(#k) OR (#v = :v \
                 AND ((attribute_type(#e, :number) AND #e <= :cutoff) \
                 OR (#s = :failed AND (attribute_not_exists(#f) OR #f = :fp))))"
            }
        };
        let mut request = self
            .client
            .put_item()
            .table_name(self.options.table())
            .set_item(Some(item))
            .condition_expression(condition)
            .expression_attribute_names("#k", self.options.key_attribute_name())
            .expression_attribute_names("#v", VERSION)
            .expression_attribute_names("#e", EXPIRES_AT_MS)
            .expression_attribute_values(":v", number(SCHEMA_VERSION))
            .expression_attribute_values(":number", AttributeValue::S("N".into()))
            .expression_attribute_values(":cutoff", number(self.cutoff_ms(now_ms)))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        if req.rerun_failed {
            request = request
                .expression_attribute_names("#s", STATUS)
                .expression_attribute_values(
                    ":failed",
                    AttributeValue::S(RecordStatus::Failed.as_str().into()),
                );
            if let Some(fingerprint) = req.fingerprint {
                request = request
                    .expression_attribute_names("#f", FINGERPRINT)
                    .expression_attribute_values(":fp", AttributeValue::S(fingerprint.to_owned()));
            }
        }
        let err = match request.send().await {
            Ok(_) => return Ok(Put::Acquired),
            Err(err) => err,
        };
        if let Some(PutItemError::ConditionalCheckFailedException(failed)) = err.as_service_error()
        {
            let Some(existing) = failed.item() else {
                return Err(StoreError::backend(MissingOldItem));
            };
            // Our own token: an earlier attempt of this very request was applied and the
            // SDK retried it (its response was lost). The key is ours.
            if self.decode(existing)?.record.token == token {
                return Ok(Put::Acquired);
            }
            return Ok(Put::Held(existing.clone()));
        }
        if is_item_too_large(&err) {
            return Ok(Put::TooLarge(Box::new(err)));
        }
        Err(request_failed("PutItem", err))
    }

    /// The conditional `UpdateItem` that finishes the owned record, with `result` or
    /// without one. Without one, it answers the finished item as DynamoDB stored it
    /// (`ReturnValues=ALL_NEW`: the item is small then), from which the room a result had
    /// is computed. A durable record keeps its input and journal, and drops its lease and
    /// retention (it is no longer running).
    async fn write_finished(
        &self,
        key: &str,
        token: FencingToken,
        status: RecordStatus,
        result: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> Result<Option<HashMap<String, AttributeValue>>, StoreError> {
        let now = now_ms();
        // The result is set first: a server that applies an update piecemeal (moto) fails
        // on it before touching anything else.
        let mut set = Vec::new();
        let mut remove = Vec::new();
        if result.is_some() {
            set.push("#r = :result");
        }
        set.push("#s = :status");
        if ttl.is_some() {
            set.extend(["#e = :expires", "#ttl = :ttl"]);
        } else {
            remove.extend(["#e", "#ttl"]);
        }
        let durable = Layout::of(token) == Layout::Durable;
        if durable {
            remove.extend(["#l", "#rm", "#rs", "#ids"]);
        }
        let mut update = format!("SET {}", set.join(", "));
        if !remove.is_empty() {
            update.push_str(&format!(" REMOVE {}", remove.join(", ")));
        }
        let mut request = self
            .owned_update(key, token, now)
            .update_expression(update)
            .expression_attribute_names("#e", EXPIRES_AT_MS)
            .expression_attribute_names("#ttl", self.options.ttl_attribute_name())
            .expression_attribute_values(":status", AttributeValue::S(status.as_str().into()))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        if durable {
            request = request
                .expression_attribute_names("#l", LEASE_UNTIL_MS)
                .expression_attribute_names("#rm", RETAIN_MS)
                .expression_attribute_names("#rs", RETAIN_SECS)
                .expression_attribute_names("#ids", APPEND_IDS);
        }
        match result {
            Some(result) => {
                request = request
                    .expression_attribute_names("#r", RESULT)
                    .expression_attribute_values(":result", AttributeValue::B(Blob::new(result)));
            }
            None => request = request.return_values(ReturnValue::AllNew),
        }
        if let Some(ttl) = ttl {
            let expiry = self.expiry(now, ttl);
            request = request
                .expression_attribute_values(":expires", number(expiry.at_ms))
                .expression_attribute_values(":ttl", number(expiry.ttl_secs));
        }
        let err = match request.send().await {
            Ok(output) => return Ok(output.attributes),
            Err(err) => err,
        };
        if let Some(UpdateItemError::ConditionalCheckFailedException(failed)) =
            err.as_service_error()
        {
            let found = failed
                .item()
                .and_then(|found| self.decode(found).ok())
                .filter(|found| found.record.token == token && found.record.status == status);
            // Finished by our token with this status: an earlier attempt of this finish
            // was applied (the SDK retried it after losing its response, or the caller
            // retried after an error). A finished record is never rewritten.
            return match (found.map(|found| found.record.result), result) {
                // Exactly what this write makes; or the result, where this write is the
                // status-only fallback of a write of it.
                (Some(Some(stored)), Some(sent)) if stored == sent => Ok(failed.item().cloned()),
                (Some(Some(_)), None) | (Some(None), None) => Ok(failed.item().cloned()),
                (Some(None), Some(sent)) => Err(StoreError::ResultRefused {
                    size: sent.len(),
                    source: Box::new(FinishedEarlierWithoutResult),
                }),
                _ => Err(StoreError::StaleToken),
            };
        }
        if is_item_too_large(&err) {
            return Err(StoreError::TooLarge {
                size: result.map_or(0, <[u8]>::len),
                limit: MAX_ITEM_BYTES,
            });
        }
        Err(request_failed("UpdateItem", err))
    }
}

#[async_trait]
impl IdempotencyStore for DynamoStore {
    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
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
        let Some(found) = output.item() else {
            return Ok(None);
        };
        // Native TTL deletes lazily (typically within days): an expired item may still be
        // there, and reads as absent.
        let stored = self.decode(found)?;
        Ok(stored
            .is_live(self.cutoff_ms(now_ms()))
            .then_some(stored.record))
    }

    async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, StoreError> {
        let now = now_ms();
        let token = Layout::Plain.issue();
        let item = self.running_item(&req, token, self.expiry(now, req.lease));
        match self.put_running(&req, token, item, now).await? {
            Put::Acquired => Ok(StartOutcome::Acquired(token)),
            Put::Held(existing) => Ok(StartOutcome::Existing(self.decode(&existing)?.record)),
            Put::TooLarge(err) => Err(request_failed("PutItem", err)),
        }
    }

    // Marks the owned record finished, storing the result if the item can hold it and
    // otherwise storing the status alone (so the operation never runs again) and
    // returning `StoreError::TooLarge`.
    //
    // A result that cannot fit by size alone is caught before sending, still in one
    // request. One that fits only by this estimate (the item's fingerprint is not known
    // here) is refused by DynamoDB, and then a second request stores the status: the
    // only case where an operation takes two round trips. Either way the request that
    // stores the status answers the item as stored, and `TooLarge` quotes the room a
    // result really had in it.
    async fn finish(
        &self,
        key: &str,
        token: FencingToken,
        status: FinalStatus,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let status = RecordStatus::from(status);
        let room = MAX_ITEM_BYTES.saturating_sub(item::finished_item_overhead(
            self.options.key_attribute_name(),
            key,
            self.options.ttl_attribute_name(),
            status,
        ));
        if result.len() <= room {
            match self
                .write_finished(key, token, status, Some(result), ttl)
                .await
            {
                Err(StoreError::TooLarge { .. }) => {}
                stored => return stored.map(drop),
            }
        }
        tracing::warn!(
            key,
            size = result.len(),
            "result too large for DynamoDB; record kept finished without it"
        );
        let finished = self.write_finished(key, token, status, None, ttl).await?;
        if finished
            .as_ref()
            .is_some_and(|item| item.contains_key(RESULT))
        {
            // An earlier write of the result was applied after all.
            return Ok(());
        }
        // The room the result really had, fingerprint included, from the item as stored;
        // the estimate above only when DynamoDB did not return it.
        Err(StoreError::TooLarge {
            size: result.len(),
            limit: finished.map_or(room, |finished| item::room_for_result(&finished)),
        })
    }

    // A durable record's retention end moves with its lease: computed from its stored
    // retention in the same request.
    async fn renew(
        &self,
        key: &str,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let expiry = self.expiry(now, lease);
        let request = self
            .owned_update(key, token, now)
            .expression_attribute_names("#e", EXPIRES_AT_MS)
            .expression_attribute_names("#ttl", self.options.ttl_attribute_name());
        let request = match Layout::of(token) {
            Layout::Plain => request
                .update_expression("SET #e = :expires, #ttl = :ttl")
                .expression_attribute_values(":expires", number(expiry.at_ms))
                .expression_attribute_values(":ttl", number(expiry.ttl_secs)),
            Layout::Durable => request
                .update_expression("SET #l = :lease, #e = :lease + #rm, #ttl = :lease_ttl + #rs")
                .expression_attribute_names("#rm", RETAIN_MS)
                .expression_attribute_names("#rs", RETAIN_SECS)
                .expression_attribute_values(":lease", number(expiry.at_ms))
                .expression_attribute_values(":lease_ttl", number(expiry.ttl_secs)),
        };
        match request.send().await {
            Ok(_) => Ok(()),
            Err(err) if is_conditional_check_failure(&err) => Err(StoreError::StaleToken),
            Err(err) => Err(request_failed("UpdateItem", err)),
        }
    }

    // Not a delete: a tombstone, so that a retry can tell its own applied release from a
    // lost lease (see `item::RELEASED_AT_MS`). Native TTL deletes it. A durable record's
    // tombstone is a plain one: its journal and everything durable goes.
    async fn release(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        let now = now_ms();
        let deletable = self.expiry(now, Duration::ZERO);
        let request = self
            .owned_update(key, token, now)
            .expression_attribute_names("#e", EXPIRES_AT_MS)
            .expression_attribute_names("#ttl", self.options.ttl_attribute_name())
            .expression_attribute_values(":released", number(RELEASED_AT_MS))
            .expression_attribute_values(":ttl", number(deletable.ttl_secs))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        let request = match Layout::of(token) {
            Layout::Plain => request.update_expression("SET #e = :released, #ttl = :ttl"),
            Layout::Durable => request
                .update_expression(
                    "SET #e = :released, #ttl = :ttl \
                     REMOVE #l, #rm, #rs, #in, #j, #jb, #ids",
                )
                .expression_attribute_names("#rm", RETAIN_MS)
                .expression_attribute_names("#rs", RETAIN_SECS)
                .expression_attribute_names("#in", INPUT)
                .expression_attribute_names("#j", JOURNAL)
                .expression_attribute_names("#jb", JOURNAL_BYTES)
                .expression_attribute_names("#ids", APPEND_IDS),
        };
        let err = match request.send().await {
            Ok(_) => return Ok(()),
            Err(err) => err,
        };
        if let Some(UpdateItemError::ConditionalCheckFailedException(failed)) =
            err.as_service_error()
        {
            // Our own tombstone: an earlier attempt of this very request was applied and
            // the SDK retried it (its response was lost).
            let released = failed
                .item()
                .and_then(|found| self.decode(found).ok())
                .is_some_and(|found| found.is_released_by(token));
            return if released {
                Ok(())
            } else {
                Err(StoreError::StaleToken)
            };
        }
        Err(request_failed("UpdateItem", err))
    }

    fn admin(&self) -> Option<&dyn RecordAdmin> {
        Some(self)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let (key_name, key_value) = self.key_value(key);
        self.client
            .delete_item()
            .table_name(self.options.table())
            .key(key_name, key_value)
            .send()
            .await
            .map_err(|err| request_failed("DeleteItem", err))?;
        Ok(())
    }

    fn journal_store(&self) -> Option<&dyn JournalStore> {
        Some(self)
    }

    fn kind(&self) -> &'static str {
        "dynamodb"
    }
}

pub(crate) fn running() -> AttributeValue {
    AttributeValue::S(RecordStatus::Running.as_str().into())
}

pub(crate) fn is_conditional_check_failure<E: ProvideErrorMetadata>(err: &SdkError<E>) -> bool {
    err.code() == Some("ConditionalCheckFailedException")
}

/// DynamoDB refuses an item over 400 KB with a `ValidationException` that only its
/// message tells apart from other invalid requests.
pub(crate) fn is_item_too_large<E: ProvideErrorMetadata>(err: &SdkError<E>) -> bool {
    err.code() == Some("ValidationException")
        && err
            .message()
            .is_some_and(|m| m.contains("exceeded the maximum allowed size"))
}

/// A request that failed for a reason other than its condition: the server is
/// unreachable, timed out, throttled us, or refused the request.
#[derive(Debug, thiserror::Error)]
#[error("DynamoDB {operation} request failed")]
struct RequestFailed {
    operation: &'static str,
    #[source]
    source: Box<dyn StdError + Send + Sync>,
}

pub(crate) fn request_failed(
    operation: &'static str,
    err: impl StdError + Send + Sync + 'static,
) -> StoreError {
    StoreError::backend(RequestFailed {
        operation,
        source: Box::new(err),
    })
}

/// A finish with a result found the record already finished by the same owner, with the
/// same status, without a result: an earlier attempt stored the status alone.
#[derive(Debug, thiserror::Error)]
#[error("an earlier attempt of this finish stored the record without its result")]
struct FinishedEarlierWithoutResult;

/// The server refused a conditional `PutItem` without returning the item in the way,
/// which a DynamoDB honouring `ReturnValuesOnConditionCheckFailure` never does.
#[derive(Debug, thiserror::Error)]
#[error("DynamoDB refused PutItem on its condition but returned no existing item")]
pub(crate) struct MissingOldItem;

/// The table's native TTL is already enabled on another attribute than the store's.
#[derive(Debug, thiserror::Error)]
#[error("table {table:?} has TTL enabled on attribute {found:?}, the store writes {wanted:?}")]
struct TtlOnOtherAttribute {
    table: String,
    found: String,
    wanted: String,
}
