//! The SQLite store: the durable embedded default for one machine.
//!
//! # Layout
//!
//! One `STRICT` table, one row per key: `key TEXT PRIMARY KEY`, schema version `v`,
//! `status`, `token` (32 hex digits), `fingerprint`, `result BLOB`, and `expires_at REAL`
//! (Unix seconds by SQLite's own clock: when the row goes — the lease of a running record,
//! the TTL of a finished one, `NULL` = kept forever). `sweep_at`, indexed, tells
//! [`cleanup`](IdempotencyStore::cleanup) where to look (see below).
//!
//! Durable records (the [`JournalStore`] side) are rows
//! of the same table with a few more columns: a lease of their own (`lease_until`), so
//! that `expires_at` can outlive it, and the journal. See the `durable` module, also for
//! how they are swept and what a blocked durable start writes.
//!
//! # One statement per operation
//!
//! SQLite has a single writer, and a writing statement takes the write lock before it
//! reads anything, so each statement decides on the latest data. `start` is one
//! `INSERT … ON CONFLICT (key) DO UPDATE SET col = iif(<free>, new, old) … RETURNING`:
//! it always returns the row, rewritten when the key was free (absent, expired, or a
//! re-runnable failure) and left as it was otherwise, and the returned token tells which.
//! (SQLite's `RETURNING` reports only rows the statement touched, so the "leave it as it
//! was" update is what lets one statement answer both ways.)
//!
//! Every statement that returns rows is read with `fetch_all`: sqlx stops stepping a
//! statement once it has the rows it was asked for, and a statement left unfinished commits
//! only when it is reset, where a failed commit is lost (and the write rolled back). So an
//! acquire is reported only after its commit succeeded.
//!
//! `complete`/`fail` is one `UPDATE … RETURNING` that also matches a record the caller
//! already finished with the same status (a retry after a lost reply; it is left as it is
//! and reported). When SQLite refuses the result (`SQLITE_FULL`, `SQLITE_TOOBIG`,
//! `SQLITE_NOMEM`), a second statement finishes the record without it.
//!
//! Rewriting a row with identical values writes no page, but rewriting an *indexed*
//! column always does — which would make every replay a commit with an `fsync`. So the
//! expiry index is not on `expires_at` but on `sweep_at`, a column `start` never assigns:
//! every other write sets it equal to `expires_at`, and cleanup deletes the rows with
//! `sweep_at` and `expires_at` both past. A replay writes nothing. The price: a takeover
//! keeps the previous `sweep_at` until the new owner's first renew or finish. If that
//! owner dies first, cleanup finds its row at the old sweep time instead of at the end of
//! the lease — or, for a re-run of a failed record kept forever, not at all: that row
//! stays in the file (absent to every operation) until its key is used again.
//!
//! # Durability and concurrency
//!
//! [`SqliteStore::open`] uses WAL mode with `synchronous = FULL`: a finished `start` or
//! `complete` survives a process crash and a power loss. Writes go through one pooled
//! connection (queueing in the pool is cheaper than SQLite's sleeping busy handler);
//! reads use a few more. Several processes may share the file: they serialise on
//! SQLite's lock, waiting up to the busy timeout.
//!
//! # Waiting
//!
//! SQLite cannot tell another process that a row changed. `OnRunning::Wait` is woken at
//! once when the owner finishes or releases through the same store (or a clone of it) in
//! this process, and otherwise polls with a backoff from 2 ms to 50 ms
//! ([`Wait::poll_interval`]).

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use orchestrix::store::{
    FencingToken, FinalStatus, IdempotencyStore, JournalStore, Record, RecordAdmin, RecordStatus,
    SCHEMA_VERSION, StartOutcome, StartRequest, StoreError, Wait, Waiters,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, SqlStr};

use crate::journal::DEFAULT_MAX_JOURNAL_BYTES;
use crate::row::{
    CLEANUP_BATCH, DEFAULT_MAX_RESULT_BYTES, Finished, NotFinished, RECORD_COLUMNS, decode_record,
    fit_result, store_error,
};
use crate::statement;
use crate::table::{InvalidTableName, TableName};

mod admin;
mod durable;

/// How long a statement waits for another connection or process to release the write
/// lock before failing with [`StoreError::Backend`].
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// SQLite's default limit for one value (`SQLITE_MAX_LENGTH`).
const SQLITE_MAX_LENGTH: usize = 1_000_000_000;

/// Connections [`SqliteStore::open`] keeps for `get`.
const READ_CONNECTIONS: u32 = 4;

/// SQLite's clock, in Unix seconds with millisecond precision. SQLite evaluates `'now'`
/// once per statement, so every comparison within a statement agrees.
const NOW: &str = "unixepoch('subsec')";

/// An [`IdempotencyStore`] in a SQLite database file.
///
/// ```no_run
/// use std::sync::Arc;
/// use orchestrix::{Flow, RunOptions};
/// use orchestrix_sql::SqliteStore;
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let store = SqliteStore::open("/var/lib/myapp/idempotency.db").await?;
/// store.migrate().await?;
/// let flow = Flow::<u64, ()>::builder("payment")
///     .store(Arc::new(store))
///     .step("charge", |_ctx| async { Ok(()) })
///     .build()?;
/// flow.run(4200, RunOptions::key("order_123")).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    table: TableName,
    sql: Arc<Statements>,
    max_result_bytes: usize,
    max_journal_bytes: usize,
    /// Waiters in this process, woken by this store's (and its clones') finishes and
    /// releases.
    waiters: Waiters,
}

/// The SQL of every operation, built once per table name. sqlx prepares each text once per
/// connection and reuses the prepared statement afterwards.
struct Statements {
    get: SqlStr,
    start: SqlStr,
    finish: SqlStr,
    renew: SqlStr,
    release: SqlStr,
    delete: SqlStr,
    cleanup: SqlStr,
    migrate: [SqlStr; 2],
    journal: durable::Statements,
}

impl SqliteStore {
    /// Opens (creating it if missing) the database file at `path` in WAL mode, with
    /// `synchronous = FULL` and a busy timeout of [`DEFAULT_BUSY_TIMEOUT`]. The records
    /// go in the table `orchestrix_idempotency`; call [`migrate`](Self::migrate) once.
    ///
    /// # Errors
    /// [`StoreError::Backend`] if the file cannot be opened or created.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(DEFAULT_BUSY_TIMEOUT);
        Self::open_with(options).await
    }

    /// Opens a database with your connection options (for example
    /// `synchronous(SqliteSynchronous::Normal)`: commits without an `fsync`, surviving
    /// process crashes but possibly losing the last commits on power loss). Writes use
    /// one connection, reads up to four.
    ///
    /// # Errors
    /// [`StoreError::Backend`] if the database cannot be opened.
    pub async fn open_with(options: SqliteConnectOptions) -> Result<Self, StoreError> {
        let pool = |connections| {
            SqlitePoolOptions::new()
                .max_connections(connections)
                .acquire_timeout(DEFAULT_BUSY_TIMEOUT * 2)
        };
        // Connecting the writer eagerly creates the file and switches it to WAL before
        // any reader opens it.
        let writer = pool(1)
            .connect_with(options.clone())
            .await
            .map_err(store_error)?;
        let reader = pool(READ_CONNECTIONS).connect_lazy_with(options);
        Ok(Self::with_pools(writer, reader))
    }

    /// A store over a pool you configured yourself; it serves reads and writes. Prefer
    /// WAL mode, a busy timeout, and `max_connections(1)` unless writes are rare:
    /// concurrent writers on several connections wait in SQLite's sleeping busy handler.
    pub fn from_pool(pool: SqlitePool) -> Self {
        Self::with_pools(pool.clone(), pool)
    }

    fn with_pools(writer: SqlitePool, reader: SqlitePool) -> Self {
        let table = TableName::default_table();
        Self {
            writer,
            reader,
            sql: Arc::new(Statements::for_table(&table)),
            table,
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
            max_journal_bytes: DEFAULT_MAX_JOURNAL_BYTES,
            waiters: Waiters::default(),
        }
    }

    /// Keeps the records in `table` instead.
    ///
    /// # Errors
    /// [`InvalidTableName`] unless `table` is a plain identifier (ASCII letters, digits and
    /// `_`, not starting with a digit, at most 48 bytes).
    pub fn with_table(mut self, table: &str) -> Result<Self, InvalidTableName> {
        self.table = TableName::new(table)?;
        self.sql = Arc::new(Statements::for_table(&self.table));
        Ok(self)
    }

    /// Results larger than `bytes` are not stored: the record is still finished, and
    /// `complete`/`fail` return [`StoreError::TooLarge`]. Default 64 MiB; capped at
    /// SQLite's own limit of 10⁹ bytes.
    pub fn with_max_result_bytes(mut self, bytes: usize) -> Self {
        self.max_result_bytes = bytes.min(SQLITE_MAX_LENGTH);
        self
    }

    /// Keeps durable runs' journals up to `bytes` each: the input and the entries, each
    /// entry with its 4-byte length. An append past it is [`StoreError::TooLarge`] and
    /// appends nothing. Default [`DEFAULT_MAX_JOURNAL_BYTES`] (64 MiB); capped at SQLite's
    /// own limit of 10⁹ bytes.
    pub fn with_max_journal_bytes(mut self, bytes: usize) -> Self {
        self.max_journal_bytes = bytes.min(SQLITE_MAX_LENGTH);
        self
    }

    /// The table holding the records.
    pub fn table(&self) -> &str {
        self.table.as_str()
    }

    /// Creates the table and its indexes if they do not exist, and adds the columns of
    /// durable records to a table created by an earlier build. One `BEGIN IMMEDIATE`
    /// transaction, so processes migrating the same file at once take turns.
    ///
    /// # Errors
    /// [`StoreError::Backend`] if the database cannot be written.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let migrate = async {
            let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
            for ddl in &self.sql.migrate {
                sqlx::query(ddl.clone()).execute(&mut *tx).await?;
            }
            self.sql.journal.upgrade(&mut tx, &self.table).await?;
            tx.commit().await
        };
        migrate.await.map_err(store_error)
    }

    /// Closes the store's connections, checkpointing the WAL into the database file.
    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }

    /// The finish statement, run to completion (see `start`): what it found.
    async fn write_finish(
        &self,
        key: &str,
        token: FencingToken,
        status: RecordStatus,
        result: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> Result<Finished, sqlx::Error> {
        let rows = sqlx::query(self.sql.finish.clone())
            .bind(key)
            .bind(token.to_string())
            .bind(status.as_str())
            .bind(result)
            .bind(ttl.map(|t| t.as_secs_f64()))
            .fetch_all(&self.writer)
            .await?;
        let stored = rows.first().map(|row| row.try_get("stored")).transpose()?;
        Ok(Finished::from_stored(stored))
    }

    /// Runs a fenced write and reports whether the caller owned the record.
    async fn fenced(&self, query: FencedQuery<'_>) -> Result<(), StoreError> {
        let done = query.execute(&self.writer).await.map_err(store_error)?;
        if done.rows_affected() == 0 {
            Err(StoreError::StaleToken)
        } else {
            Ok(())
        }
    }
}

/// Whether SQLite refused a write for its size or for resources: `SQLITE_FULL` (the disk,
/// or `max_page_count`), `SQLITE_TOOBIG` (a value or row over `SQLITE_MAX_LENGTH`) or
/// `SQLITE_NOMEM`. Extended result codes keep the primary code in their low byte.
fn refused_result(err: &sqlx::Error) -> bool {
    const SQLITE_NOMEM: i32 = 7;
    const SQLITE_FULL: i32 = 13;
    const SQLITE_TOOBIG: i32 = 18;
    let sqlx::Error::Database(db) = err else {
        return false;
    };
    let code = db.code().and_then(|code| code.parse::<i32>().ok());
    matches!(
        code.map(|code| code & 0xff),
        Some(SQLITE_NOMEM | SQLITE_FULL | SQLITE_TOOBIG)
    )
}

type FencedQuery<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>;

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("table", &self.table)
            .field("max_result_bytes", &self.max_result_bytes)
            .field("max_journal_bytes", &self.max_journal_bytes)
            .finish_non_exhaustive()
    }
}

impl Statements {
    fn for_table(table: &TableName) -> Self {
        let t = table;
        let v = SCHEMA_VERSION;
        let cols = RECORD_COLUMNS;
        let live = format!("(expires_at IS NULL OR expires_at > {NOW})");
        let owned = format!(
            "key = ?1 AND token = ?2 AND status = 'running' AND v = {v} AND {}",
            durable::owner_lease()
        );
        // Expired, or StartRequest::may_take_over in SQL. NULL (a damaged row) is not free,
        // and neither is a failed row whose token or fingerprint would not decode.
        let free = format!(
            "(cur.expires_at <= {NOW} OR (cur.status = 'failed' AND cur.v = {v} AND ?5 \
              AND typeof(cur.token) = 'text' AND length(cur.token) = 32 \
              AND cur.token NOT GLOB '*[^0-9a-f]*' \
              AND (cur.fingerprint IS NULL OR typeof(cur.fingerprint) = 'text') \
              AND (?3 IS NULL OR cur.fingerprint IS NULL OR cur.fingerprint = ?3)))"
        );
        let keep_or_take =
            |column: &str, new: &str| format!("{column} = iif({free}, {new}, cur.{column})");
        let take_over = [
            keep_or_take("v", "excluded.v"),
            keep_or_take("status", "excluded.status"),
            keep_or_take("token", "excluded.token"),
            keep_or_take("fingerprint", "excluded.fingerprint"),
            keep_or_take("result", "NULL"),
            keep_or_take("expires_at", "excluded.expires_at"),
        ]
        .into_iter()
        .chain(durable::NOT_DURABLE.map(|(column, plain)| keep_or_take(column, plain)))
        .collect::<Vec<_>>()
        .join(", ");
        Self {
            get: statement(format!("SELECT {cols} FROM {t} WHERE key = ?1 AND {live}")),
            start: statement(format!(
                "INSERT INTO {t} AS cur \
                   (key, v, status, token, fingerprint, result, expires_at, sweep_at) \
                 VALUES (?1, {v}, 'running', ?2, ?3, NULL, {NOW} + ?4, {NOW} + ?4) \
                 ON CONFLICT (key) DO UPDATE SET {take_over} \
                 RETURNING token IS ?2 AS acquired, {cols}"
            )),
            // The caller's running record, or one it already finished with this status
            // and a result that does not disagree (see `row::Finished`), left as it is.
            // A durable record is owned under `lease_until` (`durable::owner_lease`); once
            // finished it leaves the lease index, its journal kept.
            finish: statement(format!(
                "UPDATE {t} SET status = ?3, lease_until = NULL, \
                   result = iif(status = 'running', ?4, result), \
                   expires_at = iif(status = 'running', {NOW} + ?5, expires_at), \
                   sweep_at = iif(status = 'running', {NOW} + ?5, sweep_at) \
                 WHERE key = ?1 AND token = ?2 AND v = {v} AND ( \
                   (status = 'running' AND {owner_lease}) \
                   OR (status = ?3 AND {live} \
                       AND (result IS NULL OR ?4 IS NULL OR result = ?4))) \
                 RETURNING result IS NOT NULL AS stored",
                owner_lease = durable::owner_lease(),
            )),
            renew: statement(format!(
                "UPDATE {t} SET {} WHERE {owned}",
                durable::renewed()
            )),
            release: statement(format!("DELETE FROM {t} WHERE {owned}")),
            delete: statement(format!("DELETE FROM {t} WHERE key = ?1")),
            cleanup: statement(format!(
                "DELETE FROM {t} WHERE rowid IN ( \
                   SELECT rowid FROM {t} WHERE sweep_at <= {NOW} AND expires_at <= {NOW} \
                   LIMIT {CLEANUP_BATCH})"
            )),
            migrate: [
                statement(format!(
                    "CREATE TABLE IF NOT EXISTS {t} ( \
                       key TEXT PRIMARY KEY NOT NULL, \
                       v INTEGER NOT NULL, \
                       status TEXT NOT NULL, \
                       token TEXT NOT NULL, \
                       fingerprint TEXT, \
                       result BLOB, \
                       expires_at REAL, \
                       sweep_at REAL \
                     ) STRICT"
                )),
                statement(format!(
                    "CREATE INDEX IF NOT EXISTS {t}_sweep_at_idx ON {t} (sweep_at) \
                     WHERE sweep_at IS NOT NULL"
                )),
            ],
            journal: durable::Statements::for_table(table),
        }
    }
}

#[async_trait]
impl IdempotencyStore for SqliteStore {
    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        let row = sqlx::query(self.sql.get.clone())
            .bind(key)
            .fetch_optional(&self.reader)
            .await
            .map_err(store_error)?;
        row.map(|row| decode_record(&row, key)).transpose()
    }

    async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, StoreError> {
        let token = FencingToken::generate();
        // `fetch_all`, never `fetch_one`: sqlx stops stepping a statement after the row it
        // was asked for, and a statement left unfinished commits only when it is reset,
        // where a failed commit (busy lock, full disk, I/O error) is lost. The write is
        // rolled back then, so the acquire must be reported only after the statement ran
        // to completion.
        let rows = sqlx::query(self.sql.start.clone())
            .bind(req.key)
            .bind(token.to_string())
            .bind(req.fingerprint)
            .bind(req.lease.as_secs_f64())
            .bind(req.rerun_failed)
            .fetch_all(&self.writer)
            .await
            .map_err(store_error)?;
        // An upsert always returns its row; without one nothing can be said of the key.
        let row = rows
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::backend_msg("SQLite's start returned no row"))?;
        let acquired: bool = row.try_get("acquired").map_err(store_error)?;
        if acquired {
            Ok(StartOutcome::Acquired(token))
        } else {
            decode_record(&row, req.key).map(StartOutcome::Existing)
        }
    }

    async fn finish(
        &self,
        key: &str,
        token: FencingToken,
        status: FinalStatus,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let status = RecordStatus::from(status);
        let (sent, too_large) = fit_result(result, self.max_result_bytes);
        let size = result.len();
        let _wake = WakeOnDrop(&self.waiters, key);
        match self.write_finish(key, token, status, sent, ttl).await {
            Ok(finished) => finished.answer(size, too_large),
            Err(err) if sent.is_some() && refused_result(&err) => {
                let refused = StoreError::ResultRefused {
                    size,
                    source: Box::new(err),
                };
                match self.write_finish(key, token, status, None, ttl).await {
                    Ok(finished) => finished.answer(size, Some(refused)),
                    Err(source) => Err(StoreError::backend(NotFinished { refused, source })),
                }
            }
            Err(err) => Err(store_error(err)),
        }
    }

    async fn renew(
        &self,
        key: &str,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let update = sqlx::query(self.sql.renew.clone())
            .bind(key)
            .bind(token.to_string())
            .bind(lease.as_secs_f64());
        self.fenced(update).await
    }

    async fn release(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        let delete = sqlx::query(self.sql.release.clone())
            .bind(key)
            .bind(token.to_string());
        let _wake = WakeOnDrop(&self.waiters, key);
        self.fenced(delete).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let _wake = WakeOnDrop(&self.waiters, key);
        sqlx::query(self.sql.delete.clone())
            .bind(key)
            .execute(&self.writer)
            .await
            .map(drop)
            .map_err(store_error)
    }

    /// Deletes expired rows, at most 1000 per statement, until a batch comes back short.
    async fn cleanup(&self) -> Result<u64, StoreError> {
        let mut removed = 0;
        loop {
            let deleted = sqlx::query(self.sql.cleanup.clone())
                .execute(&self.writer)
                .await
                .map_err(store_error)?
                .rows_affected();
            removed += deleted;
            if deleted < CLEANUP_BATCH {
                return Ok(removed);
            }
        }
    }

    /// Woken at once by a finish or release through this store in this process; polls
    /// with the default backoff for changes made by other processes.
    async fn wait_for_change(&self, key: &str, wait: Wait) -> Result<(), StoreError> {
        let watch = self.waiters.watch(key);
        let _ = tokio::time::timeout(wait.poll_interval(), watch.changed()).await;
        Ok(())
    }

    fn journal_store(&self) -> Option<&dyn JournalStore> {
        Some(self)
    }

    fn admin(&self) -> Option<&dyn RecordAdmin> {
        Some(self)
    }

    fn kind(&self) -> &'static str {
        "sqlite"
    }
}

/// Wakes the waiters of a key when dropped: after the statement that may have ended its
/// record, whatever it answered (a waiter woken for nothing simply looks again), and also
/// when the operation was cancelled after its statement ran.
struct WakeOnDrop<'a>(&'a Waiters, &'a str);

impl Drop for WakeOnDrop<'_> {
    fn drop(&mut self) {
        self.0.wake(self.1);
    }
}
