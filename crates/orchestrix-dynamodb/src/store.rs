//! The store: one DynamoDB request per operation.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::client::Waiters;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::create_table::CreateTableError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ReturnValue,
    ReturnValuesOnConditionCheckFailure, ScalarAttributeType, TimeToLiveSpecification,
    TimeToLiveStatus,
};
use orchestrix::store::{
    FencingToken, FinalStatus, IdempotencyStore, Record, RecordStatus, SCHEMA_VERSION,
    StartOutcome, StartRequest, StoreError,
};

use crate::item::{
    self, EXPIRES_AT_MS, FINGERPRINT, MAX_ITEM_BYTES, RELEASED_AT_MS, RESULT, STATUS, TOKEN,
    VERSION, millis, now_ms, number,
};
use crate::options::{DynamoOptions, OptionsError};

/// The record is running, under this token, and its lease has not lapsed: the condition
/// of every owner's write.
const OWNED: &str = "#t = :token AND #s = :running AND #e > :cutoff";

/// How long [`DynamoStore::create_table_if_missing`] waits for a new table to turn active.
const TABLE_ACTIVE_TIMEOUT: Duration = Duration::from_secs(300);

/// An [`IdempotencyStore`] on an Amazon DynamoDB table.
///
/// Every operation is a single request: `start` a conditional `PutItem` that returns the
/// record holding the key when its condition fails; `complete`, `fail`, `renew` a
/// conditional `UpdateItem`; `release` a conditional `UpdateItem` that leaves a tombstone
/// (see the crate documentation); `get` a strongly
/// consistent `GetItem`. See the [crate documentation](crate) for the record layout and
/// the clock it relies on.
///
/// Cloning is cheap (the SDK client is reference-counted).
#[derive(Debug, Clone)]
pub struct DynamoStore {
    client: Client,
    options: DynamoOptions,
}

/// When a record written now stops being live.
struct Expiry {
    /// Exact, checked by every condition and read.
    at_ms: u64,
    /// For DynamoDB's native TTL deletion: never before `at_ms` plus the skew allowance.
    ttl_secs: u64,
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
    fn cutoff_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(millis(self.options.clock_skew_allowance()))
    }

    fn expiry(&self, now_ms: u64, after: Duration) -> Expiry {
        let at_ms = now_ms.saturating_add(millis(after));
        let deletable_ms = at_ms.saturating_add(millis(self.options.clock_skew_allowance()));
        Expiry {
            at_ms,
            ttl_secs: deletable_ms.div_ceil(1000),
        }
    }

    fn key_value(&self, key: &str) -> (String, AttributeValue) {
        (
            self.options.key_attribute_name().to_owned(),
            AttributeValue::S(key.to_owned()),
        )
    }

    /// The conditional `UpdateItem` that finishes the owned record, with `result` or
    /// without one. Without one, it answers the finished item as DynamoDB stored it
    /// (`ReturnValues=ALL_NEW`: the item is small then), from which the room a result had
    /// is computed.
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
        let update = match (result.is_some(), ttl.is_some()) {
            (true, true) => "SET #r = :result, #s = :status, #e = :expires, #ttl = :ttl",
            (false, true) => "SET #s = :status, #e = :expires, #ttl = :ttl",
            (true, false) => "SET #r = :result, #s = :status REMOVE #e, #ttl",
            (false, false) => "SET #s = :status REMOVE #e, #ttl",
        };
        let (key_name, key_value) = self.key_value(key);
        let mut request = self
            .client
            .update_item()
            .table_name(self.options.table())
            .key(key_name, key_value)
            .update_expression(update)
            .condition_expression(OWNED)
            .expression_attribute_names("#s", STATUS)
            .expression_attribute_names("#t", TOKEN)
            .expression_attribute_names("#e", EXPIRES_AT_MS)
            .expression_attribute_names("#ttl", self.options.ttl_attribute_name())
            .expression_attribute_values(":status", AttributeValue::S(status.as_str().into()))
            .expression_attribute_values(":token", AttributeValue::S(token.to_string()))
            .expression_attribute_values(":running", running())
            .expression_attribute_values(":cutoff", number(self.cutoff_ms(now)))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
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
                .and_then(|found| item::decode(found, self.options.key_attribute_name()).ok())
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
        let stored = item::decode(found, self.options.key_attribute_name())?;
        Ok(stored
            .is_live(self.cutoff_ms(now_ms()))
            .then_some(stored.record))
    }

    async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, StoreError> {
        let now = now_ms();
        let token = FencingToken::generate();
        let lease = self.expiry(now, req.lease);
        let (key_name, key_value) = self.key_value(req.key);
        // The free cases, in the order of the decision table: absent; expired (of this
        // schema version only — an unknown layout is never "free"); a failure the caller
        // may re-run, with fingerprints that do not disagree. The type check keeps a
        // malformed expiry from being compared at all (DynamoDB would call it not
        // expired, moto fails the request); the record is then reported and fails to
        // decode.
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
            .item(key_name.clone(), key_value)
            .item(VERSION, number(SCHEMA_VERSION))
            .item(STATUS, running())
            .item(TOKEN, AttributeValue::S(token.to_string()))
            .item(EXPIRES_AT_MS, number(lease.at_ms))
            .item(self.options.ttl_attribute_name(), number(lease.ttl_secs))
            .condition_expression(condition)
            .expression_attribute_names("#k", key_name)
            .expression_attribute_names("#v", VERSION)
            .expression_attribute_names("#e", EXPIRES_AT_MS)
            .expression_attribute_values(":v", number(SCHEMA_VERSION))
            .expression_attribute_values(":number", AttributeValue::S("N".into()))
            .expression_attribute_values(":cutoff", number(self.cutoff_ms(now)))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        if let Some(fingerprint) = req.fingerprint {
            request = request.item(FINGERPRINT, AttributeValue::S(fingerprint.to_owned()));
        }
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
            Ok(_) => return Ok(StartOutcome::Acquired(token)),
            Err(err) => err,
        };
        if let Some(PutItemError::ConditionalCheckFailedException(failed)) = err.as_service_error()
        {
            let Some(existing) = failed.item() else {
                return Err(StoreError::backend(MissingOldItem));
            };
            let stored = item::decode(existing, self.options.key_attribute_name())?;
            // Our own token: an earlier attempt of this very request was applied and the
            // SDK retried it (its response was lost). The key is ours.
            if stored.record.token == token {
                return Ok(StartOutcome::Acquired(token));
            }
            return Ok(StartOutcome::Existing(stored.record));
        }
        Err(request_failed("PutItem", err))
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

    async fn renew(
        &self,
        key: &str,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let expiry = self.expiry(now, lease);
        let (key_name, key_value) = self.key_value(key);
        let renewed = self
            .client
            .update_item()
            .table_name(self.options.table())
            .key(key_name, key_value)
            .update_expression("SET #e = :expires, #ttl = :ttl")
            .condition_expression(OWNED)
            .expression_attribute_names("#s", STATUS)
            .expression_attribute_names("#t", TOKEN)
            .expression_attribute_names("#e", EXPIRES_AT_MS)
            .expression_attribute_names("#ttl", self.options.ttl_attribute_name())
            .expression_attribute_values(":token", AttributeValue::S(token.to_string()))
            .expression_attribute_values(":running", running())
            .expression_attribute_values(":cutoff", number(self.cutoff_ms(now)))
            .expression_attribute_values(":expires", number(expiry.at_ms))
            .expression_attribute_values(":ttl", number(expiry.ttl_secs))
            .send()
            .await;
        match renewed {
            Ok(_) => Ok(()),
            Err(err) if is_conditional_check_failure(&err) => Err(StoreError::StaleToken),
            Err(err) => Err(request_failed("UpdateItem", err)),
        }
    }

    // Not a delete: a tombstone, so that a retry can tell its own applied release from a
    // lost lease (see `item::RELEASED_AT_MS`). Native TTL deletes it.
    async fn release(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        let now = now_ms();
        let deletable = self.expiry(now, Duration::ZERO);
        let (key_name, key_value) = self.key_value(key);
        let released = self
            .client
            .update_item()
            .table_name(self.options.table())
            .key(key_name, key_value)
            .update_expression("SET #e = :released, #ttl = :ttl")
            .condition_expression(OWNED)
            .expression_attribute_names("#s", STATUS)
            .expression_attribute_names("#t", TOKEN)
            .expression_attribute_names("#e", EXPIRES_AT_MS)
            .expression_attribute_names("#ttl", self.options.ttl_attribute_name())
            .expression_attribute_values(":token", AttributeValue::S(token.to_string()))
            .expression_attribute_values(":running", running())
            .expression_attribute_values(":cutoff", number(self.cutoff_ms(now)))
            .expression_attribute_values(":released", number(RELEASED_AT_MS))
            .expression_attribute_values(":ttl", number(deletable.ttl_secs))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        let err = match released {
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
                .and_then(|found| item::decode(found, self.options.key_attribute_name()).ok())
                .is_some_and(|found| found.is_released_by(token));
            return if released {
                Ok(())
            } else {
                Err(StoreError::StaleToken)
            };
        }
        Err(request_failed("UpdateItem", err))
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
}

fn running() -> AttributeValue {
    AttributeValue::S(RecordStatus::Running.as_str().into())
}

fn is_conditional_check_failure<E: ProvideErrorMetadata>(err: &SdkError<E>) -> bool {
    err.code() == Some("ConditionalCheckFailedException")
}

/// DynamoDB refuses an item over 400 KB with a `ValidationException` that only its
/// message tells apart from other invalid requests.
fn is_item_too_large<E: ProvideErrorMetadata>(err: &SdkError<E>) -> bool {
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

fn request_failed(
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
struct MissingOldItem;

/// The table's native TTL is already enabled on another attribute than the store's.
#[derive(Debug, thiserror::Error)]
#[error("table {table:?} has TTL enabled on attribute {found:?}, the store writes {wanted:?}")]
struct TtlOnOtherAttribute {
    table: String,
    found: String,
    wanted: String,
}
