//! An Amazon DynamoDB [`IdempotencyStore`](orchestrix::store::IdempotencyStore) for
//! Orchestrix: idempotent runs shared by every process that can reach one table, with no
//! server of your own to run; and the journals of durable flows
//! ([`FlowBuilder::durable`](orchestrix::FlowBuilder::durable)), in the same items.
//!
//! ```no_run
//! use std::sync::Arc;
//! use orchestrix::{Flow, RunOptions};
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
//!     .step("charge", |ctx| async move {
//!         let _amount = ctx.input(); // charge the card once, whoever calls
//!         Ok(())
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
//!   `start`, `complete` / `fail` or `release` (and each durable operation: see *Durable
//!   flows*) recognises its own applied write in the item
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
//! | `expires_at_ms` | `N`, optional | when the record goes, epoch ms: lease end (plain running), lease end + retention (durable running), TTL end (finished) |
//! | *TTL attribute* (default `ttl`) | `N`, optional | the same instant plus the skew allowance, epoch seconds rounded up, for DynamoDB's native deletion |
//!
//! `expires_at_ms` is what every condition and read checks, to the millisecond; the TTL
//! attribute only lets DynamoDB delete the item eventually. A finished record kept
//! forever has neither. A released record is its running record with `expires_at_ms`
//! set to 0 (see *Retries are safe* above). A durable run's record has more attributes;
//! see the next section.
//!
//! # Durable flows
//!
//! The store keeps journals for durable flows
//! ([`JournalStore`](orchestrix::store::JournalStore)) in the record's own item:
//!
//! | attribute | type | meaning |
//! | --- | --- | --- |
//! | `input` | `B` | the run's journaled input; its presence makes the record durable |
//! | `journal` | `L` of `B` | the entries, oldest first |
//! | `journal_bytes` | `N` | input and entries, in bytes: held to the journal limit by the append's condition |
//! | `lease_until_ms` | `N` | running only: the owner's lease end, epoch ms |
//! | `retain_ms`, `retain_secs` | `N` | running only: how long the record is kept once the lease lapsed (seconds rounded up, for the TTL attribute) |
//! | `append_ids` | `NS` | running only: ids of the appends applied, so a retried append is recognised |
//!
//! A durable record outlives its lease: `expires_at_ms` is lease end + retention, so an
//! abandoned run (running, lease lapsed) is kept, and read as running by `get` and by
//! plain `start`, by this build and older ones alike. A retention of `None` ("until
//! deleted") is stored as 1,000 years, because a renewal computes the retention end from
//! the stored retention in the same request, and an update expression cannot compute
//! "no expiry". Finishing keeps `input` and `journal` and drops the running-only
//! attributes; `release` and `delete` remove everything.
//!
//! Requests:
//!
//! * **`start_durable`**: one conditional `PutItem` with the acquire rule of `start`,
//!   which returns the item in the way when its condition fails. Taking over an abandoned
//!   run is **a second request**, a conditional `UpdateItem` on the *old* token, the
//!   running status, a lease still lapsed and a record still live, so that of concurrent
//!   takers exactly one wins; it returns the journal it took over
//!   (`ReturnValues=ALL_NEW`, so appends an owner with a slow clock made before the
//!   takeover are included). One request cannot do both: a `PutItem` replaces the whole
//!   item, journal included, and an `UpdateItem` cannot write a fresh journal into an
//!   absent key while keeping an abandoned key's. The takeover happens once per crash;
//!   every other outcome is one request.
//! * **`append`**: one conditional `UpdateItem` (`list_append`), fenced on the token, the
//!   running status and the durable lease, and held to the journal limit through
//!   `journal_bytes`. Its random id goes into `append_ids` and its condition requires the
//!   id to be absent, so the SDK's retry of an applied append is refused and recognised
//!   as applied, never appended twice.
//! * **`renew`, `complete` / `fail`, `release`, `suspend`, `redrive`**: one conditional
//!   `UpdateItem` each. DynamoDB cannot branch on what the item holds, and a durable
//!   record's owner writes differ from a plain one's (its lease is its own attribute; a
//!   renewal moves the retention end too), so **a fencing token's lowest bit says which
//!   layout its record has**: the store issues plain tokens with the bit clear and durable
//!   ones with it set, and sends the request for that layout. Plain runs send exactly the
//!   requests they did before. A suspended run's lease ends at the epoch, so the next
//!   start takes it over at once whatever the skew allowance.
//! * **`read_journal`**: one strongly consistent `GetItem`.
//! * **`abandoned`**: a `Scan` of the whole table, strongly consistent, in pages of up to
//!   1 MB, filtered by the server (running, lease lapsed, live, key prefix, after the
//!   given key); the matches are sorted and cut to `limit` here, since a scan returns
//!   items in hash order. **Every call reads, and is billed for, every item in the table**
//!   (one read unit per 4 KB), and [`Flow::recover`](orchestrix::Flow::recover) calls it
//!   once per 100 abandoned runs. Run recovery every few minutes, not every second, on a
//!   large table. A sparse global secondary index (a small hash-sharded partition key and
//!   `lease_until_ms` as sort key, written only while a durable run is running) would let
//!   it query lapsed leases alone; this store does not create or use one yet.
//!
//! **The journal limit.** A durable run's record is one item, and DynamoDB refuses items
//! over 400 KB (409,600 bytes: names and values, counted as DynamoDB documents). The
//! journal shares it with the key, the fingerprint, 12 bytes of bookkeeping per entry
//! (the list element and its id) and, once finished, the result. A journal (input and
//! entries) larger than [`DynamoOptions::max_journal_bytes`] (default: 400 KB), and an
//! append or start DynamoDB refuses for the item's size, is
//! [`StoreError::TooLarge`](orchestrix::store::StoreError::TooLarge), and nothing is
//! written; the quoted `limit` is the room the journal had in that item. A result that
//! does not fit beside its journal is left out (`TooLarge`, the record finished without
//! it, the journal kept), so set `max_journal_bytes` below 400 KB less your largest
//! result to keep results replayable.
//!
//! **Capacity.** DynamoDB bills an `UpdateItem` by the larger of the item's sizes before
//! and after it (one write unit per KB), so an append costs as many write units as the
//! whole journal has KB: checkpoints of a long journal are dearer than of a short one.
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
