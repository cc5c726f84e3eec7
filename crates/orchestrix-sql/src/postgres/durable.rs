//! Durable records on PostgreSQL: [`JournalStore`] for [`PgStore`].
//!
//! # Columns
//!
//! A durable record is a row of the same table with `durable = true` and five more
//! columns, added by [`PgStore::migrate`] to tables created by earlier builds:
//!
//! | column | holds |
//! | --- | --- |
//! | `durable boolean NOT NULL DEFAULT false` | whether the row is a durable record |
//! | `lease_until timestamptz` | the owner's lease while a durable record runs; `NULL` otherwise |
//! | `retain interval` | how long a durable record is kept after its lease; `NULL`: until deleted |
//! | `input bytea`, `journal bytea` | the journal: the input, then every entry framed by its length (see `crate::journal`); `journal` is stored uncompressed (see [`COLUMNS`]) |
//! | `resumes integer NOT NULL DEFAULT 0` | how many times the run was handed to a new owner with its journal |
//!
//! `expires_at` keeps meaning "the row is gone after this" for every row: a running durable
//! record's is `lease_until + retain` (`NULL` when kept until deleted), a finished one's its
//! TTL. So `get`, `delete` and `cleanup` treat durable rows like any, an abandoned record
//! reads as running, and the lease is checked against `lease_until` instead
//! ([`OWNER_LEASE`]).
//!
//! A partial index on `lease_until WHERE lease_until IS NOT NULL` holds the running durable
//! records only (finish clears `lease_until`), so [`abandoned`](JournalStore::abandoned)
//! reads the lapsed leases from it and never the rest of the table.
//!
//! # Why each statement is correct under concurrency
//!
//! Every operation is one statement. Under PostgreSQL's default `READ COMMITTED`, an
//! `UPDATE` (or the `DO UPDATE` of an `INSERT … ON CONFLICT`) that finds its row changed by
//! a concurrent transaction waits for it, then re-evaluates its `WHERE` on the *latest*
//! committed version and works on that version, under the row lock. Everything a durable
//! record needs to be fenced — token, status, lease, journal — is in that one row, so each
//! decision below is taken on the latest state, atomically with the write it guards:
//!
//! * **`start_durable`** has the shape of `start` (see the parent module): a CTE reads the
//!   record from the statement's snapshot and returns it untouched when it blocks the
//!   caller; otherwise `INSERT … ON CONFLICT DO UPDATE … WHERE <free or abandoned>`
//!   decides on the latest version under the row lock, so of concurrent callers exactly one
//!   acquires. A takeover keeps `input` and `journal` from that locked version and returns
//!   them, so it resumes from exactly what the previous owner's last successful append
//!   wrote: an append that committed after the snapshot was taken is in the latest
//!   version, and one that had not committed waited for — or was refused by — the takeover.
//!   (A journal in a table of its own could not give this: the statement would read it from
//!   its older snapshot, and could miss an append its previous owner saw succeed.) A
//!   `resumes` count, reset by a fresh acquire and incremented by a takeover, tells the
//!   `RETURNING` clause which of the two happened. When the snapshot missed a row that
//!   wins the conflict, the statement returns nothing and runs again, as `start` does.
//! * **`append`** is `UPDATE … SET journal = journal || $entry WHERE <token, running, lease
//!   alive> AND <size fits>`. A takeover and an append of the same row serialise on its
//!   lock: the append committed first is in the journal the takeover returns; the one that
//!   waited re-checks the token on the taken-over row and changes nothing. A refused
//!   append is classified (stale, or too large) by a second read, on that path only.
//! * **`suspend`, `renew`, `finish`, `release`** are fenced `UPDATE`/`DELETE` on the same
//!   condition, so they too act only for the owner of the latest version.
//! * **`redrive`** is one `UPDATE … WHERE key = $1 AND <live>` whose every column is
//!   `CASE WHEN <failed durable record> THEN <running again> ELSE <unchanged> END`: it
//!   decides on the latest version under the row lock (of concurrent redrives, the first
//!   finds the record failed, the others find it running), and returns the row either way,
//!   so "not failed" is reported in the same round trip. (A redrive that finds nothing to do
//!   still writes an identical row version; redrives are rare.)
//! * **`read_journal`** and **`abandoned`** are plain reads of one snapshot.
//!
//! All comparisons are with `now()` on the server: the database clock decides leases and
//! retention, as it decides expiry.

use std::time::Duration;

use async_trait::async_trait;
use orchestrix::store::{
    DurableStart, DurableStartOutcome, FencingToken, Journal, JournalStore, Redrive,
    SCHEMA_VERSION, StoreError,
};
use sqlx::postgres::PgRow;
use sqlx::{Postgres, Row, SqlStr, Transaction};

use super::{PgStore, START_ATTEMPTS, is_serialization_failure, micros, owned};
use crate::journal::{decode_journal, frame, prefix_successor, sql_limit};
use crate::row::{RECORD_COLUMNS, decode_record, store_error};
use crate::statement;
use crate::table::TableName;

/// The lease check of every fenced write (`finish`, `renew`, `release`): a durable record's
/// lease is `lease_until`, any other's is `expires_at`.
pub(super) const OWNER_LEASE: &str =
    "(CASE WHEN durable THEN lease_until ELSE expires_at END) > now()";

/// What `start` sets when it takes a key over: the row is a plain record again.
pub(super) const NOT_DURABLE: &str = "durable = false, lease_until = NULL, retain = NULL, \
     input = NULL, journal = NULL, resumes = 0";

/// `renew`'s new lease (`$3` microseconds) for any row: a durable record keeps its
/// retention after the lease.
pub(super) const RENEWED: &str = "\
    lease_until = CASE WHEN durable THEN now() + $3::bigint * interval '1 microsecond' END, \
    expires_at = now() + $3::bigint * interval '1 microsecond' \
                 + CASE WHEN durable THEN retain ELSE interval '0' END";

/// The columns of durable records, as `ALTER TABLE` adds them to a table created by an
/// earlier build (in this order).
///
/// `journal` is stored uncompressed (`STORAGE EXTERNAL`): every append rewrites the whole
/// value, and recompressing it each time costs more than the copy. Measured per append on
/// PostgreSQL 15, JSON-like entries: 185 µs instead of 621 µs at 48 KiB, 3.3 ms instead of
/// 12 ms at 780 KiB; the price is the space (and WAL) compression would have saved,
/// about 3.5× on such entries. Below ~2 KiB the value stays in the row either way.
const COLUMNS: [(&str, &str); 6] = [
    ("durable", "boolean NOT NULL DEFAULT false"),
    ("lease_until", "timestamptz"),
    ("retain", "interval"),
    ("input", "bytea"),
    (
        "journal",
        "bytea, ALTER COLUMN journal SET STORAGE EXTERNAL",
    ),
    ("resumes", "integer NOT NULL DEFAULT 0"),
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
        let live = |r: &str| format!("({r}expires_at IS NULL OR {r}expires_at > now())");
        let well_formed = |r: &str| format!("{r}v = {v} AND {r}token ~ '^[0-9a-f]{{32}}$'");
        let agrees = |r: &str| {
            format!("($3::text IS NULL OR {r}fingerprint IS NULL OR {r}fingerprint = $3::text)")
        };
        // `DurableStart::may_take_over`: a failure the caller re-runs, with a fresh journal.
        let rerun = format!(
            "(cur.status = 'failed' AND {} AND $5::boolean AND {})",
            well_formed("cur."),
            agrees("cur.")
        );
        // An abandoned durable run of the same input: taken over with its journal.
        let resume = format!(
            "(cur.durable AND cur.status = 'running' AND cur.lease_until <= now() AND {} \
              AND {} AND {})",
            live("cur."),
            well_formed("cur."),
            agrees("cur.")
        );
        let lease = "now() + $4::bigint * interval '1 microsecond'";
        let retain = "$7::bigint * interval '1 microsecond'";
        let owner = format!(
            "key = $1 AND token = $2 AND status = 'running' AND v = {v} AND durable \
             AND lease_until > now()"
        );
        let journal_size = "octet_length(input)::bigint + octet_length(journal)::bigint";
        let redrivable = format!(
            "(cur.durable AND cur.status = 'failed' AND {})",
            well_formed("cur.")
        );
        let redriven = |new: &str, column: &str| {
            format!("{column} = CASE WHEN {redrivable} THEN {new} ELSE cur.{column} END")
        };
        let redrive_lease = "now() + $3::bigint * interval '1 microsecond'";
        let redrive_retain = "$4::bigint * interval '1 microsecond'";
        Self {
            start: statement(format!(
                "WITH blocking AS ( \
                   SELECT {cols} FROM {t} AS cur \
                   WHERE cur.key = $1 AND {live_cur} AND ({rerun} OR {resume}) IS NOT TRUE \
                 ), acquired AS ( \
                   INSERT INTO {t} AS cur (key, v, status, token, fingerprint, result, \
                     expires_at, durable, lease_until, retain, input, journal, resumes) \
                   SELECT $1, {v}, 'running', $2, $3::text, NULL, {lease} + {retain}, true, \
                          {lease}, {retain}, $6::bytea, ''::bytea, 0 \
                   WHERE NOT EXISTS (SELECT 1 FROM blocking) \
                   ON CONFLICT (key) DO UPDATE SET \
                     v = excluded.v, status = excluded.status, token = excluded.token, \
                     fingerprint = excluded.fingerprint, result = NULL, \
                     expires_at = excluded.expires_at, durable = true, \
                     lease_until = excluded.lease_until, retain = excluded.retain, \
                     input = CASE WHEN {resume} THEN cur.input ELSE excluded.input END, \
                     journal = CASE WHEN {resume} THEN cur.journal ELSE excluded.journal END, \
                     resumes = CASE WHEN {resume} THEN cur.resumes + 1 ELSE 0 END \
                   WHERE cur.expires_at <= now() OR {rerun} OR {resume} \
                   RETURNING {cols}, resumes > 0 AS resumed, \
                     CASE WHEN resumes > 0 THEN input END AS input, \
                     CASE WHEN resumes > 0 THEN journal END AS journal \
                 ) \
                 SELECT true AS acquired, {cols}, resumed, input, journal FROM acquired \
                 UNION ALL \
                 SELECT false AS acquired, {cols}, false, NULL::bytea, NULL::bytea \
                 FROM blocking",
                live_cur = live("cur."),
            )),
            append: statement(format!(
                "UPDATE {t} SET journal = journal || $3::bytea \
                 WHERE {owner} AND {journal_size} + octet_length($3::bytea) <= $4::bigint"
            )),
            refused_append: statement(format!(
                "SELECT ({owner}) IS TRUE AS owned, {journal_size} AS size \
                 FROM {t} WHERE key = $1"
            )),
            suspend: statement(format!(
                "UPDATE {t} SET lease_until = now(), expires_at = now() + retain WHERE {owner} \
                 RETURNING {notify}",
                notify = super::wake::notify_sql(t.as_str()),
            )),
            redrive: statement(format!(
                "UPDATE {t} AS cur SET {} \
                 WHERE cur.key = $1 AND {live_cur} \
                 RETURNING token = $2 AS redriven, {cols}, \
                   CASE WHEN token = $2 THEN input END AS input, \
                   CASE WHEN token = $2 THEN journal END AS journal",
                [
                    redriven("'running'", "status"),
                    redriven("$2", "token"),
                    redriven("NULL", "result"),
                    redriven(redrive_lease, "lease_until"),
                    redriven(redrive_retain, "retain"),
                    redriven(&format!("{redrive_lease} + {redrive_retain}"), "expires_at"),
                    redriven("cur.resumes + 1", "resumes"),
                ]
                .join(", "),
                live_cur = live("cur."),
            )),
            read: statement(format!(
                "SELECT durable, input, journal FROM {t} WHERE key = $1 AND {}",
                live("")
            )),
            // The lease index gives the lapsed leases; the rest is checked row by row.
            abandoned: statement(format!(
                "SELECT key FROM {t} \
                 WHERE lease_until IS NOT NULL AND lease_until <= now() AND durable \
                   AND status = 'running' AND {} \
                   AND key >= $1 AND ($2::text IS NULL OR key < $2::text) \
                   AND ($3::text IS NULL OR key > $3::text) \
                 ORDER BY key LIMIT $4",
                live("")
            )),
            columns: statement(
                "SELECT attname::text AS name FROM pg_attribute \
                 WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped"
                    .to_owned(),
            ),
            add_columns: COLUMNS
                .iter()
                .map(|(name, ty)| {
                    let add = format!("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {name} {ty}");
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
    /// `migrate`'s transaction (which holds its advisory lock). The catalog is read first,
    /// so a table already upgraded takes no `ACCESS EXCLUSIVE` lock: `ALTER TABLE` would
    /// take one even for a column that exists, stalling every operation on the table
    /// behind the longest running one.
    pub(super) async fn upgrade(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        table: &TableName,
    ) -> Result<(), sqlx::Error> {
        let present: Vec<String> = sqlx::query_scalar(self.columns.clone())
            .bind(table.as_str())
            .fetch_all(&mut **tx)
            .await?;
        for (name, add) in &self.add_columns {
            if !present.iter().any(|p| p == name) {
                sqlx::query(add.clone()).execute(&mut **tx).await?;
            }
        }
        sqlx::query(self.lease_index.clone())
            .execute(&mut **tx)
            .await
            .map(drop)
    }
}

impl PgStore {
    /// Runs the `start_durable` statement once: `Some` when it settled, `None` when a
    /// concurrent caller's newer row made it return nothing.
    async fn try_start_durable(
        &self,
        req: &DurableStart<'_>,
        token: FencingToken,
    ) -> Result<Option<DurableStartOutcome>, StoreError> {
        let attempt = sqlx::query(self.sql.journal.start.clone())
            .bind(req.key)
            .bind(token.to_string())
            .bind(req.fingerprint)
            .bind(micros(req.lease))
            .bind(req.rerun_failed)
            .bind(req.input)
            .bind(req.retain.map(micros))
            .fetch_all(&self.pool);
        let rows = match self.bounded(attempt).await {
            Ok(rows) => rows,
            Err(StoreError::Backend(e)) if is_serialization_failure(&*e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(row) = single(rows)? else {
            return Ok(None);
        };
        if !flag(&row, "acquired")? {
            return decode_record(&row, req.key).map(|r| Some(DurableStartOutcome::Existing(r)));
        }
        let resumed = if flag(&row, "resumed")? {
            Some(decode_journal(&row)?)
        } else {
            None
        };
        Ok(Some(DurableStartOutcome::Acquired { token, resumed }))
    }

    /// Why an append touched no row: the caller does not own the record, or the entry
    /// does not fit.
    async fn refused_append(
        &self,
        key: &str,
        token: FencingToken,
        framed: usize,
    ) -> Result<(), StoreError> {
        let select = sqlx::query(self.sql.journal.refused_append.clone())
            .bind(key)
            .bind(token.to_string())
            .fetch_optional(&self.pool);
        let Some(row) = self.bounded(select).await? else {
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
fn flag(row: &PgRow, column: &str) -> Result<bool, StoreError> {
    let value: Option<bool> = row.try_get(column).map_err(store_error)?;
    value.ok_or_else(|| StoreError::decode(format!("column {column} is NULL")))
}

/// The one row a writing statement returned, read to completion (`fetch_all`), so that a
/// failure of the statement's commit is an error rather than a row.
fn single(rows: Vec<PgRow>) -> Result<Option<PgRow>, StoreError> {
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
impl JournalStore for PgStore {
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
        for _ in 0..START_ATTEMPTS {
            if let Some(outcome) = self.try_start_durable(&req, token).await? {
                return Ok(outcome);
            }
        }
        Err(StoreError::backend_msg(format!(
            "start_durable on {:?} did not settle after {START_ATTEMPTS} attempts: \
             the key changed owner during every attempt",
            req.key
        )))
    }

    async fn append(&self, key: &str, token: FencingToken, entry: &[u8]) -> Result<(), StoreError> {
        let framed = frame(entry)?;
        let limit = i64::try_from(self.max_journal_bytes).unwrap_or(i64::MAX);
        let update = sqlx::query(self.sql.journal.append.clone())
            .bind(key)
            .bind(token.to_string())
            .bind(&framed)
            .bind(limit)
            .execute(&self.pool);
        if self.bounded(update).await?.rows_affected() > 0 {
            return Ok(());
        }
        self.refused_append(key, token, framed.len()).await
    }

    async fn suspend(&self, key: &str, token: FencingToken) -> Result<(), StoreError> {
        let update = sqlx::query(self.sql.journal.suspend.clone())
            .bind(key)
            .bind(token.to_string())
            .execute(&self.pool);
        owned(self.bounded(update).await?.rows_affected())
    }

    async fn redrive(
        &self,
        key: &str,
        lease: Duration,
        retain: Option<Duration>,
    ) -> Result<Redrive, StoreError> {
        let token = FencingToken::generate();
        let update = sqlx::query(self.sql.journal.redrive.clone())
            .bind(key)
            .bind(token.to_string())
            .bind(micros(lease))
            .bind(retain.map(micros))
            .fetch_all(&self.pool);
        let Some(row) = single(self.bounded(update).await?)? else {
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
        let select = sqlx::query(self.sql.journal.read.clone())
            .bind(key)
            .fetch_optional(&self.pool);
        let Some(row) = self.bounded(select).await? else {
            return Ok(None);
        };
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
        let select = sqlx::query_scalar(self.sql.journal.abandoned.clone())
            .bind(prefix)
            .bind(prefix_successor(prefix))
            .bind(after)
            .bind(sql_limit(limit))
            .fetch_all(&self.pool);
        self.bounded(select).await
    }
}
