//! The PostgreSQL store: one statement per operation, `now()` of the server decides expiry.
//!
//! # Layout
//!
//! One row per key: `key text COLLATE "C" PRIMARY KEY`, schema version `v`, `status`,
//! `token` (32 hex digits), `fingerprint`, `result bytea` and `expires_at timestamptz`
//! (when the row goes: the lease of a running record, the TTL of a finished one, `NULL` =
//! kept forever). A partial index on `expires_at` serves
//! [`cleanup`](IdempotencyStore::cleanup).
//!
//! Durable records (the [`JournalStore`] side) are rows
//! of the same table with a few more columns: a lease of their own (`lease_until`), so
//! that `expires_at` can outlive it, and the journal. See the `durable` module.
//!
//! # Why `start` is correct under concurrency
//!
//! `start` is one statement. A CTE first reads the live record from the statement's
//! snapshot; when it blocks the caller (alive and not re-runnable) it is returned as is,
//! and nothing is written, locked or assigned a transaction id: a replay costs what a
//! `SELECT` costs. Otherwise the same statement runs
//! `INSERT … ON CONFLICT (key) DO UPDATE … WHERE <expired or re-runnable>`, which
//! PostgreSQL decides on the *latest committed* row under a row lock, so of any number of
//! concurrent callers exactly one inserts or takes over.
//!
//! The one gap: a row committed by a concurrent caller after this statement's snapshot
//! was taken is invisible to the read but wins the conflict, and the statement returns no
//! row. The statement is then simply run again (a new statement, a new snapshot that sees
//! that row); this happens only under a race on the same key and is bounded.
//!
//! The statement is read to its end (`fetch_all`), through the implicit transaction's
//! commit: a commit that fails after the row was sent (a deferred constraint, a full disk)
//! is an error, never an acquire.
//!
//! # Finishing
//!
//! `complete`/`fail` is one `UPDATE … RETURNING` that also matches a record the caller
//! already finished with the same status (a retry after a lost reply or a timeout; it is
//! left as it is and reported). When PostgreSQL refuses the result for size or resources
//! (SQLSTATE classes 53 and 54, "invalid memory alloc request size"), a second statement
//! finishes the record without it, so the operation never runs again.
//!
//! # Waiting
//!
//! `OnRunning::Wait` is woken by `LISTEN`/`NOTIFY`: the statements that end a running
//! record notify on commit, and one listening connection per store wakes its waiters,
//! with a slow safety poll behind it (see the `wake` module and
//! [`PgStore::with_wait_safety_poll`]).
//!
//! # Clock
//!
//! Leases and TTLs are stored as `now() + interval` and compared with `now()`: the server
//! decides expiry, so skewed client clocks cannot break exclusivity. Expired rows are
//! treated as absent by every statement and deleted by `cleanup` in batches.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use orchestrix::store::{
    FencingToken, FinalStatus, IdempotencyStore, JournalStore, Record, RecordAdmin, RecordStatus,
    SCHEMA_VERSION, StartOutcome, StartRequest, StoreError, Wait,
};
use sqlx::postgres::{PgPool, PgRow};
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
mod wake;

/// The largest result limit a store accepts: PostgreSQL refuses a `bytea` value, and a
/// protocol message, of 1 GiB or more, and a finish's message carries the key, token and
/// status besides the result (a message over the limit is not refused for size but closes
/// the connection). 1 MiB below it leaves room for all of them.
const POSTGRES_MAX_RESULT: usize = (1 << 30) - (1 << 20);

/// How many times `start` runs its statement when a concurrent caller's row was newer than
/// the statement's snapshot. Each retry sees every row committed before it began, so a
/// second attempt settles unless the key keeps changing owner in the meantime.
const START_ATTEMPTS: usize = 8;

/// The default bound on one operation, connection wait included.
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// SQLSTATE `serialization_failure`: an `ON CONFLICT` met a row its snapshot cannot see
/// under `REPEATABLE READ`/`SERIALIZABLE` default isolation. Retried like an empty result.
const SERIALIZATION_FAILURE: &str = "40001";

/// An [`IdempotencyStore`] in a PostgreSQL table.
///
/// Built from a [`PgPool`] you configure (give it an `acquire_timeout` of a few seconds, so
/// an unreachable server fails fast); call [`migrate`](Self::migrate) once at startup.
///
/// ```no_run
/// use std::sync::Arc;
/// use std::time::Duration;
/// use orchestrix::{Flow, RunOptions};
/// use orchestrix_sql::PgStore;
/// use sqlx::postgres::PgPoolOptions;
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = PgPoolOptions::new()
///     .max_connections(16)
///     .acquire_timeout(Duration::from_secs(3))
///     .connect("postgres://app@127.0.0.1/app")
///     .await?;
/// let store = PgStore::new(pool).with_table("payments_idempotency")?;
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
pub struct PgStore {
    pool: PgPool,
    table: TableName,
    sql: Arc<Statements>,
    max_result_bytes: usize,
    max_journal_bytes: usize,
    operation_timeout: Duration,
    wake: Arc<wake::Wake>,
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

impl PgStore {
    /// A store over `pool`, in the table `orchestrix_idempotency`.
    pub fn new(pool: PgPool) -> Self {
        let table = TableName::default_table();
        let wake = wake::Wake::new(pool.clone(), table.as_str(), wake::DEFAULT_SAFETY_POLL);
        Self {
            pool,
            sql: Arc::new(Statements::for_table(&table)),
            table,
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
            max_journal_bytes: DEFAULT_MAX_JOURNAL_BYTES,
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
            wake: Arc::new(wake),
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
        let safety_poll = self.wake.safety_poll();
        self.wake = Arc::new(wake::Wake::new(self.pool.clone(), table, safety_poll));
        Ok(self)
    }

    /// How long a waiter (`OnRunning::Wait`) waits for a notification before looking at
    /// the record again anyway: the safety net for a notification that was lost. Default
    /// 1 s. Waiters are woken by `LISTEN`/`NOTIFY` the moment the owner's finish or release
    /// commits, through one listening connection per store (taken from the pool the first
    /// time anyone waits, and kept: size the pool one connection larger), and poll with a
    /// backoff from 2 ms to 50 ms while that connection is down.
    pub fn with_wait_safety_poll(mut self, interval: Duration) -> Self {
        self.wake = Arc::new(wake::Wake::new(
            self.pool.clone(),
            self.table.as_str(),
            interval,
        ));
        self
    }

    /// Results larger than `bytes` are not stored: the record is still finished, and
    /// `complete`/`fail` return [`StoreError::TooLarge`]. Default 64 MiB; capped 1 MiB
    /// below PostgreSQL's own limit of 1 GiB.
    pub fn with_max_result_bytes(mut self, bytes: usize) -> Self {
        self.max_result_bytes = bytes.min(POSTGRES_MAX_RESULT);
        self
    }

    /// Keeps durable runs' journals up to `bytes` each: the input and the entries, each
    /// entry with its 4-byte length. An append past it is [`StoreError::TooLarge`] and
    /// appends nothing. Default [`DEFAULT_MAX_JOURNAL_BYTES`] (64 MiB); capped 1 MiB below
    /// PostgreSQL's own limit of 1 GiB for one value (and one message).
    pub fn with_max_journal_bytes(mut self, bytes: usize) -> Self {
        self.max_journal_bytes = bytes.min(POSTGRES_MAX_RESULT);
        self
    }

    /// Bounds every operation, waiting for a pooled connection included; past it the
    /// operation fails with [`StoreError::Backend`]. Default 10 s.
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// The table holding the records.
    pub fn table(&self) -> &str {
        self.table.as_str()
    }

    /// The pool the store runs on.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the table and its indexes if they do not exist, and adds the columns of
    /// durable records to a table created by an earlier build. Safe to call from many
    /// instances at once (they serialise on an advisory lock). The catalog is read first,
    /// so an up-to-date table is never altered: no `ACCESS EXCLUSIVE` lock, no queueing
    /// behind long readers.
    ///
    /// # Errors
    /// [`StoreError::Backend`] if the server is unreachable or refuses the DDL.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            // Concurrent `CREATE TABLE IF NOT EXISTS` can still collide in the catalog.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext('orchestrix:' || $1))")
                .bind(self.table.as_str())
                .execute(&mut *tx)
                .await?;
            for ddl in &self.sql.migrate {
                sqlx::query(ddl.clone()).execute(&mut *tx).await?;
            }
            self.sql.journal.upgrade(&mut tx, &self.table).await?;
            tx.commit().await
        })
        .await
    }

    /// Runs one operation under the operation timeout, mapping driver errors.
    async fn bounded<T>(
        &self,
        op: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.operation_timeout, op).await {
            Ok(result) => result.map_err(store_error),
            Err(_) => Err(self.timed_out()),
        }
    }

    /// Runs the `start` statement once: `Some` when it settled, `None` when a concurrent
    /// caller's newer row made it return nothing.
    async fn try_start(
        &self,
        req: &StartRequest<'_>,
        token: FencingToken,
    ) -> Result<Option<StartOutcome>, StoreError> {
        let token_text = token.to_string();
        let attempt = sqlx::query(self.sql.start.clone())
            .bind(req.key)
            .bind(&token_text)
            .bind(req.fingerprint)
            .bind(micros(req.lease))
            .bind(req.rerun_failed)
            // Every row, to the statement's end: the acquire counts only once the implicit
            // transaction committed (a deferred constraint, a full disk or a lost
            // connection can still fail it after the row was sent).
            .fetch_all(&self.pool);
        let rows = match self.bounded(attempt).await {
            Ok(rows) => rows,
            Err(StoreError::Backend(e)) if is_serialization_failure(&*e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(row) = rows.into_iter().next() else {
            return Ok(None);
        };
        let acquired: bool = row.try_get("acquired").map_err(store_error)?;
        if acquired {
            Ok(Some(StartOutcome::Acquired(token)))
        } else {
            decode_record(&row, req.key).map(|r| Some(StartOutcome::Existing(r)))
        }
    }

    /// The finish statement under the operation timeout: what it found. A result refused
    /// for size or resources is told apart from other failures, since only it is followed
    /// by a finish without the result.
    async fn write_finish(
        &self,
        key: &str,
        token: FencingToken,
        status: RecordStatus,
        result: Option<&[u8]>,
        ttl: Option<Duration>,
    ) -> Result<Finished, WriteError> {
        let update = sqlx::query(self.sql.finish.clone())
            .bind(key)
            .bind(token.to_string())
            .bind(status.as_str())
            .bind(result)
            .bind(ttl.map(micros))
            .fetch_all(&self.pool);
        let rows = match tokio::time::timeout(self.operation_timeout, update).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(err)) if result.is_some() && refused_result(&err) => {
                return Err(WriteError::Refused(err));
            }
            Ok(Err(err)) => return Err(WriteError::Failed(store_error(err))),
            Err(_) => return Err(WriteError::Failed(self.timed_out())),
        };
        let stored = rows.first().map(|row| row.try_get("stored")).transpose();
        let stored = stored.map_err(|err| WriteError::Failed(store_error(err)))?;
        Ok(Finished::from_stored(stored))
    }

    fn timed_out(&self) -> StoreError {
        StoreError::backend_msg(format!(
            "PostgreSQL did not answer within {:?}",
            self.operation_timeout
        ))
    }
}

/// Why a finish statement failed.
enum WriteError {
    /// PostgreSQL refused the result it carried, for size or resources.
    Refused(sqlx::Error),
    /// Anything else.
    Failed(StoreError),
}

/// Whether PostgreSQL refused a write for its size or for resources: SQLSTATE class 53,
/// insufficient resources (53100 disk full, 53200 out of memory, 53400 a configured limit;
/// not 53300, too many connections, which is about reaching the server), class 54, program
/// limit exceeded (an index row, a tuple, an expression too large), and an allocation over
/// PostgreSQL's 1 GB limit ("invalid memory alloc request size", SQLSTATE XX000).
fn refused_result(err: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = err else {
        return false;
    };
    let Some(code) = db.code() else {
        return false;
    };
    (code.starts_with("53") && code != "53300")
        || code.starts_with("54")
        || (code == "XX000" && db.message().contains("invalid memory alloc request size"))
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("table", &self.table)
            .field("max_result_bytes", &self.max_result_bytes)
            .field("max_journal_bytes", &self.max_journal_bytes)
            .field("operation_timeout", &self.operation_timeout)
            .finish_non_exhaustive()
    }
}

impl Statements {
    fn for_table(table: &TableName) -> Self {
        let t = table;
        let v = SCHEMA_VERSION;
        let cols = RECORD_COLUMNS;
        let notify = wake::notify_sql(t.as_str());
        let live = "(expires_at IS NULL OR expires_at > now())";
        let owned = format!(
            "key = $1 AND token = $2 AND status = 'running' AND v = {v} AND {}",
            durable::OWNER_LEASE
        );
        // StartRequest::may_take_over, in SQL: a failed record of this schema with a
        // well-formed token (a damaged row is reported, never freed), the caller re-runs
        // failures, and the fingerprints do not disagree.
        let rerunnable = |r: &str| {
            format!(
                "({r}.status = 'failed' AND {r}.v = {v} AND $5::boolean AND \
                 {r}.token ~ '^[0-9a-f]{{32}}$' AND \
                 ($3::text IS NULL OR {r}.fingerprint IS NULL OR {r}.fingerprint = $3::text))"
            )
        };
        Self {
            get: statement(format!("SELECT {cols} FROM {t} WHERE key = $1 AND {live}")),
            start: statement(format!(
                "WITH blocking AS ( \
                   SELECT {cols} FROM {t} AS cur \
                   WHERE cur.key = $1 AND {live} AND {rerun_cur} IS NOT TRUE \
                 ), acquired AS ( \
                   INSERT INTO {t} AS cur (key, v, status, token, fingerprint, result, expires_at) \
                   SELECT $1, {v}, 'running', $2, $3::text, NULL, \
                          now() + $4::bigint * interval '1 microsecond' \
                   WHERE NOT EXISTS (SELECT 1 FROM blocking) \
                   ON CONFLICT (key) DO UPDATE SET \
                     v = excluded.v, status = excluded.status, token = excluded.token, \
                     fingerprint = excluded.fingerprint, result = NULL, \
                     expires_at = excluded.expires_at, {not_durable} \
                   WHERE cur.expires_at <= now() OR {rerun_cur} \
                   RETURNING {cols} \
                 ) \
                 SELECT true AS acquired, {cols} FROM acquired \
                 UNION ALL \
                 SELECT false AS acquired, {cols} FROM blocking",
                rerun_cur = rerunnable("cur"),
                not_durable = durable::NOT_DURABLE,
            )),
            // The caller's running record, or one it already finished with this status
            // and a result that does not disagree (see `row::Finished`), left as it is.
            // OR evaluates left to right: a running record never compares results. A
            // durable record is owned under `lease_until` (`durable::OWNER_LEASE`); once
            // finished it leaves the lease index, its journal kept.
            finish: statement(format!(
                "UPDATE {t} SET status = $3, lease_until = NULL, \
                   result = CASE WHEN status = 'running' THEN $4::bytea ELSE result END, \
                   expires_at = CASE WHEN status = 'running' \
                     THEN now() + $5::bigint * interval '1 microsecond' ELSE expires_at END \
                 WHERE key = $1 AND token = $2 AND v = {v} AND ( \
                   (status = 'running' AND {owner_lease}) \
                   OR (status = $3 AND {live} \
                       AND (result IS NULL OR $4::bytea IS NULL OR result = $4::bytea))) \
                 RETURNING result IS NOT NULL AS stored, {notify}",
                owner_lease = durable::OWNER_LEASE,
            )),
            renew: statement(format!("UPDATE {t} SET {} WHERE {owned}", durable::RENEWED)),
            release: statement(format!("DELETE FROM {t} WHERE {owned} RETURNING {notify}")),
            delete: statement(format!("DELETE FROM {t} WHERE key = $1 RETURNING {notify}")),
            // SKIP LOCKED: rows being taken over right now are left to their new owner,
            // and concurrent cleaners split the work instead of queueing.
            cleanup: statement(format!(
                "DELETE FROM {t} WHERE key IN ( \
                   SELECT key FROM {t} WHERE expires_at <= now() \
                   LIMIT {CLEANUP_BATCH} FOR UPDATE SKIP LOCKED \
                 ) AND expires_at <= now()"
            )),
            migrate: [
                statement(format!(
                    "CREATE TABLE IF NOT EXISTS {t} ( \
                       key text COLLATE \"C\" PRIMARY KEY, \
                       v integer NOT NULL, \
                       status text NOT NULL, \
                       token text NOT NULL, \
                       fingerprint text, \
                       result bytea, \
                       expires_at timestamptz \
                     )"
                )),
                statement(format!(
                    "CREATE INDEX IF NOT EXISTS {t}_expires_at_idx ON {t} (expires_at) \
                     WHERE expires_at IS NOT NULL"
                )),
            ],
            journal: durable::Statements::for_table(table),
        }
    }
}

/// A duration in whole microseconds (PostgreSQL's resolution), rounded up so a non-zero
/// lease never becomes zero.
fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_nanos().div_ceil(1000)).unwrap_or(i64::MAX)
}

/// A fenced write touched no row: the caller does not own the record.
fn owned(rows_affected: u64) -> Result<(), StoreError> {
    if rows_affected == 0 {
        Err(StoreError::StaleToken)
    } else {
        Ok(())
    }
}

fn is_serialization_failure(err: &(dyn std::error::Error + 'static)) -> bool {
    match err.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(db)) => db.code().as_deref() == Some(SERIALIZATION_FAILURE),
        _ => false,
    }
}

#[async_trait]
impl IdempotencyStore for PgStore {
    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        let select: Result<Option<PgRow>, StoreError> = self
            .bounded(
                sqlx::query(self.sql.get.clone())
                    .bind(key)
                    .fetch_optional(&self.pool),
            )
            .await;
        select?.map(|row| decode_record(&row, key)).transpose()
    }

    async fn start(&self, req: StartRequest<'_>) -> Result<StartOutcome, StoreError> {
        let token = FencingToken::generate();
        for _ in 0..START_ATTEMPTS {
            if let Some(outcome) = self.try_start(&req, token).await? {
                return Ok(outcome);
            }
        }
        Err(StoreError::backend_msg(format!(
            "start on {:?} did not settle after {START_ATTEMPTS} attempts: \
             the key changed owner during every attempt",
            req.key
        )))
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
        match self.write_finish(key, token, status, sent, ttl).await {
            Ok(finished) => finished.answer(size, too_large),
            Err(WriteError::Refused(err)) => {
                let refused = StoreError::ResultRefused {
                    size,
                    source: Box::new(err),
                };
                match self.write_finish(key, token, status, None, ttl).await {
                    Ok(finished) => finished.answer(size, Some(refused)),
                    Err(WriteError::Refused(source)) => {
                        Err(StoreError::backend(NotFinished { refused, source }))
                    }
                    Err(WriteError::Failed(err)) => Err(err),
                }
            }
            Err(WriteError::Failed(err)) => Err(err),
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
            .bind(micros(lease))
            .execute(&self.pool);
        owned(self.bounded(update).await?.rows_affected())
    }

    async fn release(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        let delete = sqlx::query(self.sql.release.clone())
            .bind(key)
            .bind(token.to_string())
            .execute(&self.pool);
        owned(self.bounded(delete).await?.rows_affected())
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let delete = sqlx::query(self.sql.delete.clone())
            .bind(key)
            .execute(&self.pool);
        self.bounded(delete).await.map(drop)
    }

    /// Deletes expired rows, at most 1000 per statement, until a batch comes back short.
    async fn cleanup(&self) -> Result<u64, StoreError> {
        let mut removed = 0;
        loop {
            let batch = sqlx::query(self.sql.cleanup.clone()).execute(&self.pool);
            let deleted = self.bounded(batch).await?.rows_affected();
            removed += deleted;
            if deleted < CLEANUP_BATCH {
                return Ok(removed);
            }
        }
    }

    /// Woken by `LISTEN`/`NOTIFY` when the record finishes or is released, at most the
    /// safety poll later otherwise; see [`PgStore::with_wait_safety_poll`].
    async fn wait_for_change(&self, key: &str, wait: Wait) -> Result<(), StoreError> {
        self.wake.wait(key, wait).await;
        Ok(())
    }

    fn journal_store(&self) -> Option<&dyn JournalStore> {
        Some(self)
    }

    fn admin(&self) -> Option<&dyn RecordAdmin> {
        Some(self)
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }
}
