//! Turning a stored row into a [`Record`], refusing anything this build did not write.

use orchestrix::store::{Record, RecordStatus, StoreError};
use sqlx::{ColumnIndex, Decode, Row, Type};

/// The largest result a store accepts unless configured otherwise. Idempotency records
/// hold responses, not blobs; a larger result still finishes the record (without it).
pub const DEFAULT_MAX_RESULT_BYTES: usize = 64 * 1024 * 1024;

/// How many expired rows one cleanup statement deletes, so a large backlog never holds
/// locks (or SQLite's single writer) for long.
pub(crate) const CLEANUP_BATCH: u64 = 1000;

/// How the record columns are selected by every statement that returns a record.
pub(crate) const RECORD_COLUMNS: &str = "v, status, token, fingerprint, result";

/// A record as the columns hold it: every column is read as nullable, whatever the schema
/// says, so a row written by something else is a typed error rather than a panic.
pub(crate) fn decode_record<'r, R>(row: &'r R, key: &str) -> Result<Record, StoreError>
where
    R: Row,
    &'r str: ColumnIndex<R>,
    Option<i32>: Decode<'r, R::Database> + Type<R::Database>,
    Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    Option<Vec<u8>>: Decode<'r, R::Database> + Type<R::Database>,
{
    let version: Option<i32> = row.try_get("v").map_err(store_error)?;
    let version = required("v", version)?;
    let found = u32::try_from(version)
        .map_err(|_| StoreError::decode(format!("negative schema version {version}")))?;
    Record::check_version(found)?;
    let status: Option<String> = row.try_get("status").map_err(store_error)?;
    let token: Option<String> = row.try_get("token").map_err(store_error)?;
    Ok(Record {
        key: key.to_owned(),
        status: required("status", status)?.parse::<RecordStatus>()?,
        token: required("token", token)?.parse()?,
        fingerprint: row.try_get("fingerprint").map_err(store_error)?,
        result: row.try_get("result").map_err(store_error)?,
    })
}

fn required<T>(column: &str, value: Option<T>) -> Result<T, StoreError> {
    value.ok_or_else(|| StoreError::decode(format!("column {column} is NULL")))
}

/// Maps a driver error: a value that cannot be read is [`StoreError::Decode`], anything
/// else (connection, I/O, timeout, server error) is [`StoreError::Backend`].
pub(crate) fn store_error(err: sqlx::Error) -> StoreError {
    match err {
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::Decode(_)
        | sqlx::Error::TypeNotFound { .. } => StoreError::decode(err),
        other => StoreError::backend(other),
    }
}

/// Applies the store's result limit: the bytes to write, and the error to report once the
/// record is finished without them.
pub(crate) fn fit_result(result: &[u8], limit: usize) -> (Option<&[u8]>, Option<StoreError>) {
    if result.len() <= limit {
        (Some(result), None)
    } else {
        let too_large = StoreError::TooLarge {
            size: result.len(),
            limit,
        };
        (None, Some(too_large))
    }
}

/// What a finish statement found, from its `RETURNING result IS NOT NULL AS stored`.
///
/// The finish statements match the caller's running record, and also a record the caller
/// already finished with the same status (an earlier attempt of this finish was applied,
/// its reply lost or an error reported after it) whose result does not disagree with the
/// one sent. Such a record is left as it is: a finished record is never rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finished {
    /// No row matched: the caller does not own the record (lease lost, taken over,
    /// released, or finished otherwise).
    NotOwned,
    /// The record is finished and holds a result: the one sent, or, for a finish sent
    /// without it, the one an earlier attempt stored.
    WithResult,
    /// The record is finished without a result.
    WithoutResult,
}

impl Finished {
    /// From the `stored` column of the rows a finish statement returned.
    pub(crate) fn from_stored(stored: Option<bool>) -> Self {
        match stored {
            None => Self::NotOwned,
            Some(true) => Self::WithResult,
            Some(false) => Self::WithoutResult,
        }
    }

    /// What `finish` answers. `without_result` is why the result was not sent (the
    /// store's limit, or the backend refused it), or `None` when it was sent; `size` is
    /// the result's size.
    pub(crate) fn answer(
        self,
        size: usize,
        without_result: Option<StoreError>,
    ) -> Result<(), StoreError> {
        match (self, without_result) {
            (Self::NotOwned, _) => Err(StoreError::StaleToken),
            (Self::WithResult, _) => Ok(()),
            (Self::WithoutResult, Some(why)) => Err(why),
            (Self::WithoutResult, None) => Err(StoreError::ResultRefused {
                size,
                source: Box::new(FinishedEarlierWithoutResult),
            }),
        }
    }
}

/// A finish with a result found the record already finished by the same owner, with the
/// same status, without a result: an earlier attempt of the same finish stored that.
#[derive(Debug, thiserror::Error)]
#[error("an earlier attempt of this finish stored the record without its result")]
pub(crate) struct FinishedEarlierWithoutResult;

/// A finish whose result the database refused, and whose second write without the result
/// failed too: the record stays running until its lease lapses.
#[derive(Debug, thiserror::Error)]
#[error(
    "{refused}; finishing the record without it failed too, so it stays running until its lease lapses"
)]
pub(crate) struct NotFinished {
    pub(crate) refused: StoreError,
    #[source]
    pub(crate) source: sqlx::Error,
}
