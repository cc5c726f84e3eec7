//! The record admin of [`SqliteStore`]: [`RecordAdmin`] in one statement per call.
//!
//! | call | statement | cost |
//! | --- | --- | --- |
//! | `inspect` | one `SELECT` by primary key; the journal's columns for a durable record | one statement, on a reader connection |
//! | `list` | one keyset `SELECT … WHERE key >= prefix AND key < successor(prefix) AND key > cursor … ORDER BY key LIMIT page + 1` | one statement; reads the primary key's range from the cursor on |
//! | `release` | `DELETE` of a plain running record, else an `UPDATE` that lapses a durable one's lease as `suspend` does | one or two statements on the writer (each decides on the latest row: SQLite has one writer); a `SELECT` says why nothing was released |
//!
//! Leases and expiries are measured on SQLite's clock (`unixepoch('subsec')`), as the store
//! decides them. Every record is decoded by the store's own decoding, with the result's
//! bytes left in the file: `length(result)` is all a listing reads of a result. Keys are
//! read as bytes, so a key that is not UTF-8 (written by something else) is listed, lossily,
//! rather than failing its page.

use std::time::Duration;

use async_trait::async_trait;
use orchestrix::store::{
    Lease, ListRequest, Listed, Page, RecordAdmin, RecordInfo, RecordStatus, Released,
    SCHEMA_VERSION, StatusFilter, StoreError,
};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use super::{NOW, SqliteStore};
use crate::journal::{decode_journal, prefix_successor, sql_limit};
use crate::row::{decode_record, store_error};
use crate::statement;

/// A row this build can act on without decoding it first: what release checks in SQL.
const WELL_FORMED: &str = "typeof(token) = 'text' AND length(token) = 32 \
     AND token NOT GLOB '*[^0-9a-f]*'";

/// How often `release` runs its statements when the record changed under them.
const RELEASE_ATTEMPTS: usize = 3;

/// The columns every admin read selects, computed on SQLite's clock: the key as bytes, the
/// record's own columns (its result left out), the result's size, and the lease and expiry
/// left in seconds (negative once lapsed).
fn info_columns() -> String {
    format!(
        "CAST(key AS BLOB) AS key_bytes, v, status, token, fingerprint, NULL AS result, \
         length(result) AS result_bytes, durable, \
         iif(status = 'running', iif(durable = 1, lease_until, expires_at) - {NOW}, NULL) \
           AS lease_left, \
         expires_at - {NOW} AS expires_in"
    )
}

fn live() -> String {
    format!("(expires_at IS NULL OR expires_at > {NOW})")
}

impl SqliteStore {
    /// The live record under `key` with everything [`RecordInfo`] shows; its journal too
    /// when `with_journal` says so and the record is durable.
    async fn read_info(
        &self,
        key: &str,
        with_journal: bool,
    ) -> Result<Option<RecordInfo>, StoreError> {
        let journal = if with_journal {
            "input, journal"
        } else {
            "NULL AS input, NULL AS journal"
        };
        let select = statement(format!(
            "SELECT {}, {journal} FROM {} WHERE key = ?1 AND {}",
            info_columns(),
            self.table,
            live()
        ));
        let row = sqlx::query(select)
            .bind(key)
            .fetch_optional(&self.reader)
            .await
            .map_err(store_error)?;
        row.map(|row| info(&row, key, with_journal)).transpose()
    }
}

/// The row's key, as UTF-8 (lossily when it is not).
fn key_of(row: &SqliteRow) -> Result<String, StoreError> {
    let bytes: Vec<u8> = row.try_get("key_bytes").map_err(store_error)?;
    Ok(String::from_utf8(bytes)
        .unwrap_or_else(|not_utf8| String::from_utf8_lossy(not_utf8.as_bytes()).into_owned()))
}

/// The record in `row` (selected with [`info_columns`]) under `key`, with its journal when
/// `with_journal` says so and it is durable.
fn info(row: &SqliteRow, key: &str, with_journal: bool) -> Result<RecordInfo, StoreError> {
    let record = decode_record(row, key)?;
    let result_bytes: Option<i64> = row.try_get("result_bytes").map_err(store_error)?;
    let durable: Option<i64> = row.try_get("durable").map_err(store_error)?;
    let durable = durable.ok_or_else(|| StoreError::decode("column durable is NULL"))? != 0;
    let lease_left: Option<f64> = row.try_get("lease_left").map_err(store_error)?;
    let expires_in: Option<f64> = row.try_get("expires_in").map_err(store_error)?;
    let lease = match (record.status, lease_left) {
        (RecordStatus::Running, Some(secs)) => Some(lease_of(secs)),
        (RecordStatus::Running, None) => {
            return Err(StoreError::decode("running record without a lease"));
        }
        _ => None,
    };
    let journal = if durable && with_journal {
        Some(decode_journal(row)?)
    } else {
        None
    };
    Ok(RecordInfo {
        key: record.key,
        status: record.status,
        token: record.token,
        fingerprint: record.fingerprint,
        result_bytes: result_bytes.and_then(|n| u64::try_from(n).ok()),
        schema_version: SCHEMA_VERSION,
        durable,
        lease,
        expires_in: expires_in.map(seconds),
        journal,
    })
}

/// A lease with `secs` seconds left (negative: lapsed that long ago).
fn lease_of(secs: f64) -> Lease {
    if secs > 0.0 {
        Lease::Held {
            left: seconds(secs),
        }
    } else {
        Lease::Lapsed {
            ago: seconds(-secs),
        }
    }
}

/// `secs` as a duration; nothing for a negative or unrepresentable span.
fn seconds(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs).unwrap_or_default()
}

#[async_trait]
impl RecordAdmin for SqliteStore {
    async fn inspect(&self, key: &str) -> Result<Option<RecordInfo>, StoreError> {
        self.read_info(key, true).await
    }

    async fn list(&self, req: ListRequest<'_>) -> Result<Page, StoreError> {
        let page_size = req.page_size();
        let select = statement(format!(
            "SELECT {} FROM {} \
             WHERE key >= ?1 AND (?2 IS NULL OR key < ?2) AND (?3 IS NULL OR key > ?3) \
               AND {} AND (?4 IS NULL OR status = ?4) \
               AND (?5 = 0 OR (durable = 1 AND lease_until <= {NOW})) \
             ORDER BY key LIMIT ?6",
            info_columns(),
            self.table,
            live()
        ));
        let rows = sqlx::query(select)
            .bind(req.prefix)
            .bind(prefix_successor(req.prefix))
            .bind(req.cursor)
            .bind(req.filter.status().map(RecordStatus::as_str))
            .bind(req.filter == StatusFilter::ExpiredLease)
            // One more than the page: whether a next page exists.
            .bind(sql_limit(page_size.saturating_add(1)))
            .fetch_all(&self.reader)
            .await
            .map_err(store_error)?;
        let more = rows.len() > page_size;
        let mut records = Vec::with_capacity(page_size);
        for row in rows.iter().take(page_size) {
            let key = key_of(row)?;
            records.push(match info(row, &key, false) {
                Ok(info) => Listed::Record(info),
                Err(error) => Listed::Undecodable { key, error },
            });
        }
        let next = more
            .then(|| records.last().map(|listed| listed.key().to_owned()))
            .flatten();
        Ok(Page { records, next })
    }

    async fn release(&self, key: &str) -> Result<Released, StoreError> {
        let t = &self.table;
        let v = SCHEMA_VERSION;
        let live = live();
        let delete = statement(format!(
            "DELETE FROM {t} WHERE key = ?1 AND status = 'running' AND durable = 0 \
               AND v = {v} AND {WELL_FORMED} AND {live}"
        ));
        // As `suspend` lapses a lease: the retention counts from now.
        let lapse = statement(format!(
            "UPDATE {t} SET lease_until = {NOW}, expires_at = {NOW} + retain, \
               sweep_at = {NOW} + retain \
             WHERE key = ?1 AND status = 'running' AND durable = 1 AND v = {v} \
               AND {WELL_FORMED} AND lease_until > {NOW} AND {live}"
        ));
        for _ in 0..RELEASE_ATTEMPTS {
            let deleted = sqlx::query(delete.clone())
                .bind(key)
                .execute(&self.writer)
                .await
                .map_err(store_error)?;
            if deleted.rows_affected() > 0 {
                return Ok(Released::Deleted);
            }
            let lapsed = sqlx::query(lapse.clone())
                .bind(key)
                .execute(&self.writer)
                .await
                .map_err(store_error)?;
            if lapsed.rows_affected() > 0 {
                return Ok(Released::LeaseLapsed);
            }
            // Nothing released: say why, from the record as it is now (a record that
            // cannot be decoded is reported here).
            match self.read_info(key, false).await? {
                None => return Ok(Released::Absent),
                Some(info) if info.status != RecordStatus::Running => {
                    return Ok(Released::NotRunning(info.status));
                }
                Some(info) if info.is_abandoned() => return Ok(Released::LeaseLapsed),
                // Running under a live lease: acquired after the statements looked.
                Some(_) => {}
            }
        }
        Err(StoreError::backend_msg(format!(
            "the record under {key:?} changed owner during every release attempt"
        )))
    }
}
