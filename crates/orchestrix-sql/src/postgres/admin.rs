//! The record admin of [`PgStore`]: [`RecordAdmin`] in one statement per call.
//!
//! | call | statement | cost |
//! | --- | --- | --- |
//! | `inspect` | one `SELECT` by primary key; the journal's columns for a durable record | one round trip |
//! | `list` | one keyset `SELECT … WHERE key >= prefix AND key < successor(prefix) AND key > cursor … ORDER BY key LIMIT page + 1` | one round trip; reads the primary key's range from the cursor on, skipping what the status filter leaves out |
//! | `release` | one statement of two data-modifying CTEs: `DELETE` a plain running record, or lapse a durable one's lease as `suspend` does | one round trip; a second `SELECT` says why nothing was released |
//!
//! Leases and expiries are measured on the server's `now()`, as the store decides them.
//! Every record is decoded by the store's own decoding (`row::decode_record`, and
//! `journal::decode_journal` for a durable one's journal), with the result's bytes left in
//! the table: `octet_length(result)` is all a listing reads of a result.

use std::time::Duration;

use async_trait::async_trait;
use orchestrix::store::{
    Lease, ListRequest, Listed, Page, RecordAdmin, RecordInfo, RecordStatus, Released,
    SCHEMA_VERSION, StoreError,
};
use sqlx::Row;
use sqlx::postgres::PgRow;

use super::PgStore;
use crate::journal::{decode_journal, prefix_successor, sql_limit};
use crate::row::{decode_record, store_error};
use crate::statement;

/// How often `release` runs its statement when the record changed under it (it found a
/// running record it did not act on: one acquired a moment before).
const RELEASE_ATTEMPTS: usize = 3;

/// The columns every admin read selects, computed on the server's clock: the record's own
/// (its result left out), the result's size, and the lease and expiry left in
/// microseconds (negative once lapsed).
const INFO_COLUMNS: &str = "key, v, status, token, fingerprint, NULL::bytea AS result, \
     octet_length(result)::bigint AS result_bytes, durable, \
     CASE WHEN status = 'running' THEN (EXTRACT(EPOCH FROM \
       (CASE WHEN durable THEN lease_until ELSE expires_at END) - now()) * 1000000)::bigint \
     END AS lease_left_us, \
     (EXTRACT(EPOCH FROM expires_at - now()) * 1000000)::bigint AS expires_in_us";

/// A row is live: what `get` reads.
const LIVE: &str = "(expires_at IS NULL OR expires_at > now())";

/// A row this build can act on without decoding it first: what release checks in SQL.
const WELL_FORMED: &str = "token ~ '^[0-9a-f]{32}$'";

impl PgStore {
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
            "NULL::bytea AS input, NULL::bytea AS journal"
        };
        let select = statement(format!(
            "SELECT {INFO_COLUMNS}, {journal} FROM {} WHERE key = $1 AND {LIVE}",
            self.table
        ));
        let row: Option<PgRow> = self
            .bounded(sqlx::query(select).bind(key).fetch_optional(&self.pool))
            .await?;
        row.map(|row| info(&row, key, with_journal)).transpose()
    }
}

/// The record in `row` (selected with [`INFO_COLUMNS`]) under `key`, with its journal when
/// `with_journal` says so and it is durable.
fn info(row: &PgRow, key: &str, with_journal: bool) -> Result<RecordInfo, StoreError> {
    let record = decode_record(row, key)?;
    let result_bytes: Option<i64> = row.try_get("result_bytes").map_err(store_error)?;
    let durable: Option<bool> = row.try_get("durable").map_err(store_error)?;
    let durable = durable.ok_or_else(|| StoreError::decode("column durable is NULL"))?;
    let lease_left: Option<i64> = row.try_get("lease_left_us").map_err(store_error)?;
    let expires_in: Option<i64> = row.try_get("expires_in_us").map_err(store_error)?;
    let lease = match (record.status, lease_left) {
        (RecordStatus::Running, Some(us)) => Some(lease_of(us)),
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
        expires_in: expires_in.map(|us| micros(us.max(0))),
        journal,
    })
}

/// A lease with `us` microseconds left (negative: lapsed that long ago).
fn lease_of(us: i64) -> Lease {
    if us > 0 {
        Lease::Held { left: micros(us) }
    } else {
        Lease::Lapsed {
            ago: micros(us.saturating_neg()),
        }
    }
}

fn micros(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

#[async_trait]
impl RecordAdmin for PgStore {
    async fn inspect(&self, key: &str) -> Result<Option<RecordInfo>, StoreError> {
        self.read_info(key, true).await
    }

    async fn list(&self, req: ListRequest<'_>) -> Result<Page, StoreError> {
        let page_size = req.page_size();
        let select = statement(format!(
            "SELECT {INFO_COLUMNS} FROM {} \
             WHERE key >= $1 AND ($2::text IS NULL OR key < $2::text) \
               AND ($3::text IS NULL OR key > $3::text) AND {LIVE} \
               AND ($4::text IS NULL OR status = $4::text) \
               AND (NOT $5::boolean OR (durable AND lease_until <= now())) \
             ORDER BY key LIMIT $6",
            self.table
        ));
        let expired_lease = req.filter == orchestrix::store::StatusFilter::ExpiredLease;
        let rows: Vec<PgRow> = self
            .bounded(
                sqlx::query(select)
                    .bind(req.prefix)
                    .bind(prefix_successor(req.prefix))
                    .bind(req.cursor)
                    .bind(req.filter.status().map(RecordStatus::as_str))
                    .bind(expired_lease)
                    // One more than the page: whether a next page exists.
                    .bind(sql_limit(page_size.saturating_add(1)))
                    .fetch_all(&self.pool),
            )
            .await?;
        let more = rows.len() > page_size;
        let mut records = Vec::with_capacity(page_size);
        for row in rows.iter().take(page_size) {
            let key: String = row.try_get("key").map_err(store_error)?;
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
        // The two cases exclude each other (`durable`), so at most one CTE acts. A durable
        // record's lease lapses as `suspend` lapses it: the retention counts from now.
        let release = statement(format!(
            "WITH deleted AS ( \
               DELETE FROM {t} WHERE key = $1 AND status = 'running' AND NOT durable \
                 AND v = {v} AND {WELL_FORMED} AND {LIVE} \
               RETURNING 1 \
             ), lapsed AS ( \
               UPDATE {t} SET lease_until = now(), expires_at = now() + retain \
               WHERE key = $1 AND status = 'running' AND durable AND v = {v} AND {WELL_FORMED} \
                 AND lease_until > now() AND {LIVE} \
               RETURNING 1 \
             ) \
             SELECT (SELECT count(*) FROM deleted) AS deleted, \
                    (SELECT count(*) FROM lapsed) AS lapsed"
        ));
        for _ in 0..RELEASE_ATTEMPTS {
            let row: PgRow = self
                .bounded(sqlx::query(release.clone()).bind(key).fetch_one(&self.pool))
                .await?;
            let deleted: i64 = row.try_get("deleted").map_err(store_error)?;
            let lapsed: i64 = row.try_get("lapsed").map_err(store_error)?;
            if deleted > 0 {
                return Ok(Released::Deleted);
            }
            if lapsed > 0 {
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
                // Running under a live lease: acquired after the statement looked.
                Some(_) => {}
            }
        }
        Err(StoreError::backend_msg(format!(
            "the record under {key:?} changed owner during every release attempt"
        )))
    }
}
