//! An Amazon DynamoDB [`IdempotencyStore`](orchestrix::store::IdempotencyStore) for
//! Orchestrix: idempotent runs shared by every process that can reach one table, with no
//! server of your own to run.
//!
//! ```no_run
//! use std::sync::Arc;
//! use orchestrix::{Context, Flow, RunOptions, StepError};
//! use orchestrix_dynamodb::{DynamoOptions, DynamoStore};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! // Your own SDK configuration (region, credentials, endpoint, timeouts, retries),
//! // e.g. from `aws_config::load_from_env().await`.
//! let config = aws_sdk_dynamodb::Config::builder()
//!     .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
//!     .region(aws_sdk_dynamodb::config::Region::new("eu-west-1"))
//!     .build();
//! let client = aws_sdk_dynamodb::Client::from_conf(config);
//!
//! let store = DynamoStore::new(client, DynamoOptions::new("orchestrix-idempotency"))?;
//! store.create_table_if_missing().await?; // development only
//!
//! let flow = Flow::<u64>::builder("payment")
//!     .store(Arc::new(store))
//!     .step("charge", |ctx: Context<u64>| async move {
//!         let _amount = ctx.input(); // charge the card once, whoever calls
//!         Ok::<_, StepError>(())
//!     })
//!     .build()?;
//! let result = flow.run(4200, RunOptions::key("order_123")).await?;
//! # let _ = result;
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//!
//! * **One request per operation.** `start` is a conditional `PutItem` whose condition
//!   encodes the whole acquire rule (absent; expired; a failure the caller may re-run with
//!   agreeing fingerprints). When it fails, `ReturnValuesOnConditionCheckFailure=ALL_OLD`
//!   hands back the record in the way in the same response. `complete`, `fail`, `renew`
//!   and `release` are one conditional `UpdateItem` on the fencing token, the running
//!   status and a live lease. `get` is one strongly consistent `GetItem`.
//!   DynamoDB serialises conditional writes on one item, so exactly one concurrent
//!   `start` acquires a free key, and a stale owner can never overwrite a newer run.
//! * **Expiry.** Every record carries its exact expiry in epoch milliseconds, checked by
//!   every condition and read, and the same instant in epoch seconds in the table's
//!   native TTL attribute so that DynamoDB deletes it eventually without a sweep
//!   ([`cleanup`](orchestrix::store::IdempotencyStore::cleanup) does nothing). Native TTL
//!   deletion is lazy, so an expired item still in the table is treated as absent.
//! * **Typed failures.** An item that is not a record of this schema version is
//!   [`StoreError::Decode`](orchestrix::store::StoreError::Decode) or
//!   `UnsupportedVersion`, for `get` and `start` alike; such an item is never taken over.
//!   A result over DynamoDB's 400 KB item limit leaves the record finished without its
//!   result and returns `TooLarge`, whose `limit` is the room the result had in that item,
//!   fingerprint included (a second request only when DynamoDB alone can tell the item is
//!   too large). Every request failure is `Backend`.
//! * **Retries are safe.** The SDK retries a request whose response was lost. A retried
//!   `start`, `complete` / `fail` or `release` recognises its own applied write in the item
//!   the refused retry returns (`ReturnValuesOnConditionCheckFailure=ALL_OLD`) and
//!   succeeds. A finish that finds the record finished by its token and status without a
//!   result (an earlier attempt stored the status alone) answers `ResultRefused` and
//!   rewrites nothing; the status-only write that finds the result stored answers `Ok`.
//!   So that `release` can be recognised too, it does not delete the item: it leaves a
//!   tombstone, the running record with its lease ended at the epoch (`expires_at_ms =
//!   0`) and the TTL attribute set to now, which every read treats as absent, `start`
//!   takes over, and native TTL deletes. Builds before the tombstone read it the same way
//!   (an expired lease), so they can share the table; their own `release` still deletes,
//!   and a retry of it answers `StaleToken`.
//!
//! # Record layout
//!
//! One item per key:
//!
//! | attribute | type | meaning |
//! | --- | --- | --- |
//! | *key attribute* (default `key`) | `S` | the full key (partition key) |
//! | `version` | `N` | [`SCHEMA_VERSION`](orchestrix::store::SCHEMA_VERSION) |
//! | `status` | `S` | `running`, `completed` or `failed` |
//! | `token` | `S` | the owner's fencing token, 32 hex digits |
//! | `fingerprint` | `S`, optional | the input fingerprint |
//! | `result` | `B`, optional | the encoded result of a finished record |
//! | `expires_at_ms` | `N`, optional | lease end (running) or TTL end (finished), epoch ms |
//! | *TTL attribute* (default `ttl`) | `N`, optional | the same instant plus the skew allowance, epoch seconds rounded up, for DynamoDB's native deletion |
//!
//! `expires_at_ms` is what every condition and read checks, to the millisecond; the TTL
//! attribute only lets DynamoDB delete the item eventually. A finished record kept
//! forever has neither. A released record is its running record with `expires_at_ms`
//! set to 0 (see *Retries are safe* above).
//!
//! # The clock
//!
//! DynamoDB offers no server time to a condition expression, so expiry is decided by the
//! caller's clock: each request sends "now" and the condition compares stored expiries
//! with it. Hosts sharing a table must keep their clocks synchronised (NTP). A lease
//! counts as lapsed only once `lease end + clock_skew` has passed on the caller's clock
//! ([`DynamoOptions::clock_skew`], default one second), so a host whose clock runs ahead
//! by less than that allowance cannot take over a live lease.
//!
//! # Timeouts
//!
//! The store uses the client as given. Configure its timeouts and retries so that an
//! unreachable endpoint fails fast instead of stalling a run: a connect timeout, an
//! operation-attempt timeout and a bounded number of attempts (see the README).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod durable;
mod item;
mod options;
mod store;

pub use options::{
    DEFAULT_CLOCK_SKEW, DEFAULT_KEY_ATTRIBUTE, DEFAULT_MAX_JOURNAL_BYTES, DEFAULT_TTL_ATTRIBUTE,
    DynamoOptions, OptionsError,
};
pub use store::DynamoStore;
