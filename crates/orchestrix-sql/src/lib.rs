//! PostgreSQL and SQLite idempotency stores for Orchestrix.
//!
//! Both implement [`IdempotencyStore`](orchestrix::store::IdempotencyStore) with the same
//! guarantees as every Orchestrix store (atomic acquire, fencing, expiry, typed decode
//! errors), and both keep them in the database:
//!
//! * **One statement per operation.** `start` decides and writes in a single statement
//!   (`INSERT … ON CONFLICT (key) DO UPDATE … RETURNING`), returning the record that
//!   blocks the caller when it does not acquire; `complete`, `fail`, `renew` and `release`
//!   are one fenced `UPDATE`/`DELETE … WHERE token = …`.
//! * **The database's clock decides expiry.** Leases and TTLs are stored as timestamps
//!   computed by the database (`now()` on PostgreSQL, `unixepoch('subsec')` on SQLite) and
//!   compared with the same clock; expired rows count as absent in every statement, and
//!   [`cleanup`](orchestrix::store::IdempotencyStore::cleanup) deletes them in batches of
//!   1000.
//! * **An acquire is reported only once it is committed.** `start` reads its row with
//!   `fetch_all`, so the statement runs to its end and a commit that fails (a busy lock, a
//!   full disk, a deferred constraint) is an error, never an acquire of a record that was
//!   rolled back.
//! * **A refused result still finishes the record.** A result over the store's limit is
//!   not sent ([`StoreError::TooLarge`](orchestrix::store::StoreError::TooLarge)); one the
//!   database refuses for size or resources (PostgreSQL SQLSTATE classes 53 and 54, SQLite
//!   `SQLITE_FULL`, `SQLITE_TOOBIG`, `SQLITE_NOMEM`) is followed by a second fenced
//!   statement that finishes the record without it
//!   ([`StoreError::ResultRefused`](orchestrix::store::StoreError::ResultRefused)). Either
//!   way the operation never runs again; only a database that refuses the small write too
//!   leaves the record running until its lease lapses.
//! * **A finish may be retried.** `complete`/`fail` that finds the record already finished
//!   by the same token, with the same status and a result that does not disagree, answers
//!   what is stored (`Ok`, or `ResultRefused` when it holds no result) and rewrites
//!   nothing, so a retry after a lost reply is not mistaken for a lost lease.
//! * **Durable records in the same row.** Both are
//!   [`JournalStore`](orchestrix::store::JournalStore)s for durable flows: a durable
//!   record keeps its lease apart from its expiry (so it outlives the lease, resumable),
//!   and its journal in its own row, so the statement that takes an abandoned run over
//!   returns the journal it fenced. Every journal operation is one statement too.
//! * **Prepared once.** Each store builds its SQL once (the table name is configurable,
//!   so the text is not static); sqlx prepares each statement once per connection.
//!
//! Which to choose: [`PgStore`] when the service already runs PostgreSQL and several
//! instances share keys; [`SqliteStore`] for a single machine that needs records to
//! survive restarts without running a server. See the crate's README.
//!
//! ```no_run
//! use std::sync::Arc;
//! use orchestrix::{Flow, RunOptions};
//! use orchestrix_sql::SqliteStore;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store = SqliteStore::open("idempotency.db").await?;
//! store.migrate().await?;
//! let flow = Flow::<u64, ()>::builder("charge")
//!     .store(Arc::new(store))
//!     .step("charge", |_ctx| async { Ok(()) })
//!     .build()?;
//! flow.run(4200, RunOptions::key("order_123")).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Features
//! `postgres` ([`PgStore`]) and `sqlite` ([`SqliteStore`]), both on by default.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// Without a backend feature only the shared pieces remain, and nothing uses them.
#![cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]

mod journal;
#[cfg(feature = "postgres")]
mod postgres;
mod row;
#[cfg(feature = "sqlite")]
mod sqlite;
mod table;

pub use journal::DEFAULT_MAX_JOURNAL_BYTES;
#[cfg(feature = "postgres")]
pub use postgres::{DEFAULT_OPERATION_TIMEOUT, PgStore};
pub use row::DEFAULT_MAX_RESULT_BYTES;
#[cfg(feature = "sqlite")]
pub use sqlite::{DEFAULT_BUSY_TIMEOUT, SqliteStore};
pub use table::{DEFAULT_TABLE, InvalidTableName, MAX_TABLE_NAME_LEN};

/// SQL text built at construction from a validated table name and constants of this crate,
/// never from input, so it is safe to hand to sqlx as a statement.
fn statement(text: String) -> sqlx::SqlStr {
    use sqlx::SqlSafeStr;
    sqlx::AssertSqlSafe(std::sync::Arc::<str>::from(text)).into_sql_str()
}

/// The README's examples, compiled as doctests.
#[cfg(all(doctest, feature = "postgres", feature = "sqlite"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
