//! Durable records on SQLite: [`JournalStore`] for [`SqliteStore`].
//!
//! # Columns
//!
//! A durable record is a row of the same table with `durable = 1` and five more columns,
//! added by [`SqliteStore::migrate`] to tables created by earlier builds:
//!
//! | column | holds |
//! | --- | --- |
//! | `durable INTEGER NOT NULL DEFAULT 0` | whether the row is a durable record |
//! | `lease_until REAL` | the owner's lease while a durable record runs (Unix seconds) |
//! | `retain REAL` | seconds a durable record is kept after its lease; `NULL`: until deleted |
//! | `input BLOB`, `journal BLOB` | the journal: the input, then every entry framed by its length (see `crate::journal`) |
//! | `resumes INTEGER NOT NULL DEFAULT 0` | how many times the run was handed to a new owner with its journal |
//!
//! `expires_at` keeps meaning "the row is gone after this" for every row: a running durable
//! record's is `lease_until + retain` (`NULL` when kept until deleted), a finished one's its
//! TTL. So `get`, `delete` and `cleanup` treat durable rows like any, an abandoned record
//! reads as running, and the lease is checked against `lease_until` instead
//! ([`owner_lease`]).
//!
//! # One statement per operation
//!
//! As for every operation of this store, SQLite's single writer makes each writing
//! statement decide on the latest data: it holds the write lock from its first read to its
//! commit. `start_durable` is `start`'s `INSERT … ON CONFLICT DO UPDATE SET col =
//! iif(<acquire>, new, old) … RETURNING`, with two acquiring cases: a fresh journal
//! (absent, expired, or a failure re-run) and a takeover of an abandoned run of the same
//! input, which keeps `input` and `journal` and returns them. A `resumes` count (reset by a
//! fresh acquire, incremented by a takeover) tells `RETURNING` which one happened.
//! `append` is one fenced `UPDATE … SET journal = journal || ?entry` that also checks the
//! size; a refused append is classified (stale, or too large) by a second read, on that
//! path only. `redrive` is one `UPDATE … WHERE key = ?1` rewriting each column with
//! `iif(<failed durable record>, new, old)`, so it returns the record in both cases.
//!
//! # Indexes, and what a replay writes
//!
//! A partial index on `lease_until WHERE lease_until IS NOT NULL` lists running durable
//! records by lease deadline (`finish` clears `lease_until`), so `abandoned` reads the
//! lapsed leases from it (`INDEXED BY`), never the whole table. `start` never assigns
//! `lease_until`, so a replay of any record — and a `start_durable` blocked by a finished
//! record, whose `lease_until` is `NULL` and so is in no index — still writes nothing to
//! the file. A `start_durable` blocked by a *running* durable record rewrites that record's
//! index entry with the same value, which costs one page and a commit: that is a concurrent
//! duplicate of a live durable run (or a waiter polling it), not a replay. A plain `start`
//! that takes over an expired durable record leaves its stale `lease_until` in the index
//! until the new owner's first renew or finish; `abandoned` checks `durable`, status,
//! lease and expiry on every row the index gives, so such an entry is never listed.
//!
//! Durable rows are swept like any: every write that sets `expires_at` sets `sweep_at` with
//! it (renew, suspend, redrive, finish, and the first insert of a key), except
//! `start_durable`'s takeover of an existing row, which — like `start`'s — leaves
//! `sweep_at` as it was, so that a blocked start writes nothing. The taken-over row is
//! swept at its old time if it has expired by then, else after the new owner's first
//! renew, suspend or finish.

use std::time::Duration;

use async_trait::async_trait;
use orchestrix::store::{
    DurableStart, DurableStartOutcome, FencingToken, Journal, JournalStore, Redrive,
    SCHEMA_VERSION, StoreError,
};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqlStr, Sqlite, Transaction};

use super::{NOW, SqliteStore};
use crate::journal::{decode_journal, frame, prefix_successor, sql_limit};
use crate::row::{RECORD_COLUMNS, decode_record, store_error};
use crate::statement;
use crate::table::TableName;

/// The lease check of every fenced write (`finish`, `renew`, `release`): a durable record's
/// lease is `lease_until`, any other's is `expires_at`.
pub(super) fn owner_lease() -> String {
    format!("iif(durable = 1, lease_until, expires_at) > {NOW}")
}

/// The columns `start` resets (with their plain-record values) when it takes a key over.
/// `lease_until` is not among them: `start` assigns no indexed column (see the module
/// docs).
pub(super) const NOT_DURABLE: [(&str, &str); 4] = [
    ("durable", "0"),
    ("retain", "NULL"),
    ("input", "NULL"),
    ("journal", "NULL"),
];

/// `renew`'s new lease (`?3` seconds) for any row: a durable record keeps its retention
/// after the lease; `sweep_at` follows `expires_at`.
pub(super) fn renewed() -> String {
    let expires = format!("{NOW} + ?3 + iif(durable = 1, retain, 0)");
    format!(
        "lease_until = iif(durable = 1, {NOW} + ?3, NULL), expires_at = {expires}, \
         sweep_at = {expires}"
    )
}

/// The columns of durable records, as `ALTER TABLE … ADD COLUMN` adds them to a table
/// created by an earlier build (in this order).
const COLUMNS: [(&str, &str); 6] = [
    ("durable", "INTEGER NOT NULL DEFAULT 0"),
    ("lease_until", "REAL"),
    ("retain", "REAL"),
    ("input", "BLOB"),
    ("journal", "BLOB"),
    ("resumes", "INTEGER NOT NULL DEFAULT 0"),
];

/// The SQL of the journal's operations, built once per table name.
pub(super) struct Statements {
    start: SqlStr,
    append: SqlStr,
    refused_append: SqlStr,
    suspend: SqlStr,
    redrive: SqlStr,
    read: SqlStr,
    abandoned: SqlStr,
    columns: SqlStr,
    add_columns: Vec<(&'static str, SqlStr)>,
    lease_index: SqlStr,
}

impl Statements {
    pub(super) fn for_table(table: &TableName) -> Self {
        let t = table;
        let v = SCHEMA_VERSION;
        let cols = RECORD_COLUMNS;
        let live = |r: &str| format!("({r}expires_at IS NULL OR {r}expires_at > {NOW})");
        // A row whose decision columns would not decode is never acquired: it is reported.
        let well_formed = |r: &str| {
            format!(
                "{r}v = {v} AND typeof({r}token) = 'text' AND length({r}token) = 32 \
                 AND {r}token NOT GLOB '*[^0-9a-f]*' \
                 AND ({r}fingerprint IS NULL OR typeof({r}fingerprint) = 'text') \
                 AND (?3 IS NULL OR {r}fingerprint IS NULL OR {r}fingerprint = ?3)"
            )
        };
        // Expired, or `DurableStart::may_take_over`: a fresh journal.
        let fresh = format!(
            "(cur.expires_at <= {NOW} OR (cur.status = 'failed' AND ?5 AND {}))",
            well_formed("cur.")
        );
        // An abandoned durable run of the same input: taken over with its journal.
        let resume = format!(
            "(cur.durable = 1 AND cur.status = 'running' AND cur.lease_until <= {NOW} \
              AND {} AND {})",
            live("cur."),
            well_formed("cur.")
        );
        let takes = format!("({fresh} OR {resume})");
        let when = |test: &str, column: &str, new: &str| {
            format!("{column} = iif({test}, {new}, cur.{column})")
        };
        let start_sets = [
            when(&takes, "v", "excluded.v"),
            when(&takes, "status", "excluded.status"),
            when(&takes, "token", "excluded.token"),
            when(&takes, "fingerprint", "excluded.fingerprint"),
            when(&takes, "result", "NULL"),
            when(&takes, "expires_at", "excluded.expires_at"),
            when(&takes, "durable", "1"),
            when(&takes, "lease_until", "excluded.lease_until"),
            when(&takes, "retain", "excluded.retain"),
            when(&fresh, "input", "excluded.input"),
            when(&fresh, "journal", "excluded.journal"),
            format!("resumes = iif({resume}, cur.resumes + 1, iif({fresh}, 0, cur.resumes))"),
        ]
        .join(", ");
        let owner = format!(
            "key = ?1 AND token = ?2 AND status = 'running' AND v = {v} AND durable = 1 \
             AND lease_until > {NOW}"
        );
        let journal_size = "octet_length(input) + octet_length(journal)";
        let redrivable = format!(
            "(cur.durable = 1 AND cur.status = 'failed' AND cur.v = {v} \
              AND typeof(cur.token) = 'text' AND length(cur.token) = 32 \
              AND cur.token NOT GLOB '*[^0-9a-f]*')"
        );
        let redrive_lease = format!("{NOW} + ?3");
        let redrive_expires = format!("{NOW} + ?3 + ?4");
        let redrive_sets = [
            when(&redrivable, "status", "'running'"),
            when(&redrivable, "token", "?2"),
            when(&redrivable, "result", "NULL"),
            when(&redrivable, "lease_until", &redrive_lease),
            when(&redrivable, "retain", "?4"),
            when(&redrivable, "expires_at", &redrive_expires),
            when(&redrivable, "sweep_at", &redrive_expires),
            when(&redrivable, "resumes", "cur.resumes + 1"),
        ]
        .join(", ");
        Self {
            start: statement(format!(
                "INSERT INTO {t} AS cur (key, v, status, token, fingerprint, result, \
                   expires_at, sweep_at, durable, lease_until, retain, input, journal, resumes) \
                 VALUES (?1, {v}, 'running', ?2, ?3, NULL, {NOW} + ?4 + ?7, {NOW} + ?4 + ?7, \
                   1, {NOW} + ?4, ?7, ?6, X'', 0) \
                 ON CONFLICT (key) DO UPDATE SET {start_sets} \
                 RETURNING token IS ?2 AS acquired, resumes > 0 AS resumed, {cols}, \
                   iif(token IS ?2 AND resumes > 0, input, NULL) AS input, \
                   iif(token IS ?2 AND resumes > 0, journal, NULL) AS journal"
            )),
            // `||` makes text of its operands' bytes, unchanged; the cast makes it a blob.
            append: statement(format!(
                "UPDATE {t} SET journal = CAST(journal || ?3 AS BLOB) \
                 WHERE {owner} AND {journal_size} + octet_length(?3) <= ?4"
            )),
            refused_append: statement(format!(
                "SELECT ({owner}) IS 1 AS owned, {journal_size} AS size FROM {t} WHERE key = ?1"
            )),
            suspend: statement(format!(
                "UPDATE {t} SET lease_until = {NOW}, expires_at = {NOW} + retain, \
                   sweep_at = {NOW} + retain \
                 WHERE {owner}"
            )),
            redrive: statement(format!(
                "UPDATE {t} AS cur SET {redrive_sets} WHERE cur.key = ?1 AND {} \
                 RETURNING token IS ?2 AS redriven, {cols}, \
                   iif(token IS ?2, input, NULL) AS input, \
                   iif(token IS ?2, journal, NULL) AS journal",
                live("cur.")
            )),
            read: statement(format!(
                "SELECT durable, input, journal FROM {t} WHERE key = ?1 AND {}",
                live("")
            )),
            // The lease index gives the lapsed leases; the rest is checked row by row.
            // Named, so that the planner never prefers a scan of the key range (every
            // record of a flow) to it.
            abandoned: statement(format!(
                "SELECT key FROM {t} INDEXED BY {t}_lease_idx \
                 WHERE lease_until IS NOT NULL AND lease_until <= {NOW} AND durable = 1 \
                   AND status = 'running' AND {} \
                   AND key >= ?1 AND (?2 IS NULL OR key < ?2) AND (?3 IS NULL OR key > ?3) \
                 ORDER BY key LIMIT ?4",
                live("")
            )),
            columns: statement("SELECT name FROM pragma_table_info(?1)".to_owned()),
            add_columns: COLUMNS
                .iter()
                .map(|(name, ty)| {
                    let add = format!("ALTER TABLE {t} ADD COLUMN {name} {ty}");
                    (*name, statement(add))
                })
                .collect(),
            lease_index: statement(format!(
                "CREATE INDEX IF NOT EXISTS {t}_lease_idx ON {t} (lease_until) \
                 WHERE lease_until IS NOT NULL"
            )),
        }
    }

    /// Adds the columns of durable records that `table` lacks, and the lease index, inside
    /// `migrate`'s `BEGIN IMMEDIATE` transaction: it holds the write lock from the start, so
    /// two processes migrating the same file never both see a column missing (SQLite has no
    /// `ADD COLUMN IF NOT EXISTS`).
    pub(super) async fn upgrade(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        table: &TableName,
    ) -> Result<(), sqlx::Error> {
        let present: Vec<String> = sqlx::query_scalar(self.columns.clone())
            .bind(table.as_str())
            .fetch_all(&mut **tx)
            .await?;
        for (name, add) in &self.add_columns {
            if !present.iter().any(|p| p.eq_ignore_ascii_case(name)) {
                sqlx::query(add.clone()).execute(&mut **tx).await?;
            }
        }
        sqlx::query(self.lease_index.clone())
            .execute(&mut **tx)
            .await
            .map(drop)
    }
}

impl SqliteStore {
    /// Why an append touched no row: the caller does not own the record, or the entry
    /// does not fit.
    async fn refused_append(
        &self,
        key: &str,
        token: FencingToken,
        framed: usize,
    ) -> Result<(), StoreError> {
        let row = sqlx::query(self.sql.journal.refused_append.clone())
            .bind(key)
            .bind(token.to_string())
            .fetch_optional(&self.reader)
            .await
            .map_err(store_error)?;
        let Some(row) = row else {
            return Err(StoreError::StaleToken);
        };
        if !flag(&row, "owned")? {
            return Err(StoreError::StaleToken);
        }
        let size: Option<i64> = row.try_get("size").map_err(store_error)?;
        let Some(size) = size.and_then(|s| usize::try_from(s).ok()) else {
            return Err(StoreError::decode(
                "durable record without its input or journal",
            ));
        };
        let size = size.saturating_add(framed);
        if size > self.max_journal_bytes {
            Err(StoreError::TooLarge {
                size,
                limit: self.max_journal_bytes,
            })
        } else {
            // Owned and fitting now, yet refused: the lease lapsed and was renewed in
            // between, which only the owner can do. Nothing was appended either way.
            Err(StoreError::StaleToken)
        }
    }
}

/// A boolean column the statement computes (never NULL in a row it returns).
fn flag(row: &SqliteRow, column: &str) -> Result<bool, StoreError> {
    let value: Option<bool> = row.try_get(column).map_err(store_error)?;
    value.ok_or_else(|| StoreError::decode(format!("column {column} is NULL")))
}

/// The one row a writing statement returned. It was read to completion (`fetch_all`), so
/// the statement's commit has succeeded.
fn single(rows: Vec<SqliteRow>) -> Result<Option<SqliteRow>, StoreError> {
    let mut rows = rows.into_iter();
    let first = rows.next();
    if rows.next().is_some() {
        return Err(StoreError::backend_msg(
            "a statement on one key returned several rows",
        ));
    }
    Ok(first)
}

#[async_trait]
impl JournalStore for SqliteStore {
    async fn start_durable(
        &self,
        req: DurableStart<'_>,
    ) -> Result<DurableStartOutcome, StoreError> {
        if req.input.len() > self.max_journal_bytes {
            return Err(StoreError::TooLarge {
                size: req.input.len(),
                limit: self.max_journal_bytes,
            });
        }
        let token = FencingToken::generate();
        let rows = sqlx::query(self.sql.journal.start.clone())
            .bind(req.key)
            .bind(token.to_string())
            .bind(req.fingerprint)
            .bind(req.lease.as_secs_f64())
            .bind(req.rerun_failed)
            .bind(req.input)
            .bind(req.retain.map(|r| r.as_secs_f64()))
            .fetch_all(&self.writer)
            .await
            .map_err(store_error)?;
        let Some(row) = single(rows)? else {
            return Err(StoreError::backend_msg(
                "start_durable returned no row: an upsert always returns one",
            ));
        };
        if !flag(&row, "acquired")? {
            return decode_record(&row, req.key).map(DurableStartOutcome::Existing);
        }
        let resumed = if flag(&row, "resumed")? {
            Some(decode_journal(&row)?)
        } else {
            None
        };
        Ok(DurableStartOutcome::Acquired { token, resumed })
    }

    async fn append(&self, key: &str, token: FencingToken, entry: &[u8]) -> Result<(), StoreError> {
        let framed = frame(entry)?;
        let limit = i64::try_from(self.max_journal_bytes).unwrap_or(i64::MAX);
        let done = sqlx::query(self.sql.journal.append.clone())
            .bind(key)
            .bind(token.to_string())
            .bind(&framed)
            .bind(limit)
            .execute(&self.writer)
            .await
            .map_err(store_error)?;
        if done.rows_affected() > 0 {
            return Ok(());
        }
        self.refused_append(key, token, framed.len()).await
    }

    async fn suspend(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        let update = sqlx::query(self.sql.journal.suspend.clone())
            .bind(key)
            .bind(token.to_string());
        self.fenced(update).await
    }

    async fn redrive(
        &self,
        key: &str,
        lease: Duration,
        retain: Option<Duration>,
    ) -> Result<Redrive, StoreError> {
        let token = FencingToken::generate();
        let rows = sqlx::query(self.sql.journal.redrive.clone())
            .bind(key)
            .bind(token.to_string())
            .bind(lease.as_secs_f64())
            .bind(retain.map(|r| r.as_secs_f64()))
            .fetch_all(&self.writer)
            .await
            .map_err(store_error)?;
        let Some(row) = single(rows)? else {
            return Ok(Redrive::Absent);
        };
        if flag(&row, "redriven")? {
            let journal = decode_journal(&row)?;
            Ok(Redrive::Acquired { token, journal })
        } else {
            decode_record(&row, key).map(Redrive::NotFailed)
        }
    }

    async fn read_journal(&self, key: &str) -> Result<Option<Journal>, StoreError> {
        let row = sqlx::query(self.sql.journal.read.clone())
            .bind(key)
            .fetch_optional(&self.reader)
            .await
            .map_err(store_error)?;
        let Some(row) = row else { return Ok(None) };
        if flag(&row, "durable")? {
            decode_journal(&row).map(Some)
        } else {
            Ok(None)
        }
    }

    async fn abandoned(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(self.sql.journal.abandoned.clone())
            .bind(prefix)
            .bind(prefix_successor(prefix))
            .bind(after)
            .bind(sql_limit(limit))
            .fetch_all(&self.reader)
            .await
            .map_err(store_error)
    }
}
