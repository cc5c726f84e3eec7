//! Operator access to a store's records: [`RecordAdmin`], whose documentation gives the
//! guarantees every store's admin keeps.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use super::{FencingToken, Journal, RecordStatus, StoreError};

/// How many records a [`ListRequest`] asks for unless told otherwise.
pub const DEFAULT_PAGE_SIZE: usize = 50;

/// Operator access to a store's records: inspect one, list them page by page, release a stuck
/// one.
///
/// A service that runs payments through this library has to answer, at 3 a.m.: which key
/// is locked, by whom and for how long; which runs are abandoned; and how to free one. The
/// engine never needs any of this, so it is a capability of its own, like the journal: a
/// store that offers it returns itself from
/// [`IdempotencyStore::admin`](super::IdempotencyStore::admin). The `orchestrix`
/// command-line tool is built on it; so can an admin endpoint of your own.
///
/// ```
/// use orchestrix::store::{IdempotencyStore, ListRequest, MemoryStore, StatusFilter};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryStore::new();
/// let admin = store.admin().ok_or("this store offers no record admin")?;
/// // Every running record of the flow `checkout`, one page at a time.
/// let prefix = orchestrix::idempotency::scoped_key("checkout", "");
/// let mut cursor = None;
/// loop {
///     let request = ListRequest::new(&prefix)
///         .filter(StatusFilter::Running)
///         .limit(100)
///         .cursor(cursor.as_deref());
///     let page = admin.list(request).await?;
///     for listed in &page.records {
///         println!("{}", listed.key());
///     }
///     match page.next {
///         Some(next) => cursor = Some(next),
///         None => break,
///     }
/// }
/// # Ok(()) }
/// ```
///
/// # Guarantees a record admin must give
///
/// * **The store's own decoding.** A record is read as the store reads it for `get`: one
///   that cannot be decoded is [`StoreError::Decode`] (or
///   [`StoreError::UnsupportedVersion`]) from [`inspect`](RecordAdmin::inspect), a
///   [`Listed::Undecodable`] row in a [`list`](RecordAdmin::list) page (never a page
///   aborted, never a record skipped), and never a panic.
/// * **Live records only.** What `get` would find: a record past its TTL, and a plain
///   running record past its lease (its key is free), are neither inspected nor listed. A
///   durable run whose lease lapsed is live: it is *abandoned*
///   ([`Lease::Lapsed`]) until it is resumed or its retention ends.
/// * **Bounded.** Every call takes a bounded number of round trips (a page of `list` too,
///   whatever the number of records) and never loads every record into memory. A `list`
///   page may hold fewer records than asked, or none, and still have a
///   [`next`](Page::next) cursor: a store that bounds the work of one page (a Redis
///   `SCAN`, a DynamoDB `Scan`) stops there. Only `next: None` means the end.
/// * **Release never loses work.** [`release`](RecordAdmin::release) frees a *running*
///   record without its owner's token: a plain one is deleted, so the next run of the key
///   starts over; a durable one keeps its journal and only has its lease lapsed, so the
///   next run of the key resumes it. Its old owner is fenced out either way (its next
///   write is `StaleToken`). A finished record is refused: removing one is a
///   [`delete`](super::IdempotencyStore::delete), a decision of another weight (the
///   operation may then run again). A record that cannot be decoded is refused too.
///
/// The shared conformance suite (`orchestrix-conformance`, module `admin`) checks this
/// for every store of this workspace.
#[async_trait]
pub trait RecordAdmin: Send + Sync {
    /// Everything the store holds about the live record under `key` (the full, stored
    /// key: scoped by its flow, see
    /// [`idempotency::scoped_key`](crate::idempotency::scoped_key)), with the journal of a
    /// durable record; `None` when no live record is there.
    ///
    /// # Errors
    /// [`StoreError::Decode`] / [`StoreError::UnsupportedVersion`] for a record the store
    /// cannot read; [`StoreError::Backend`] when the store is unreachable.
    async fn inspect(&self, key: &str) -> Result<Option<RecordInfo>, StoreError>;

    /// One page of the live records whose keys start with `req.prefix` and that match
    /// `req.filter`, after `req.cursor`. Journals are left out (`journal: None`); inspect
    /// a record for its journal.
    ///
    /// Keyset stores (memory, SQL) list in ascending byte order of the keys; stores that
    /// scan (Redis, DynamoDB) in their own order, and may list a record twice when it
    /// moves during the scan (Redis rehashing): each live record present for the whole
    /// listing is listed at least once. A page holds at most `req.limit` records, but on
    /// Redis, whose `SCAN` cursor cannot stop inside the batch it returns: there a page
    /// ends with its last batch whole, which asks for no more keys than the page lacks
    /// (a few more records at most, from one hash bucket).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the store is unreachable, or when `req.cursor` is not
    /// a cursor this store gave. An undecodable record is a row of the page, not an error.
    async fn list(&self, req: ListRequest<'_>) -> Result<Page, StoreError>;

    /// Frees the running record under `key` without its owner's token: a plain record is
    /// deleted ([`Released::Deleted`]); a durable one keeps its journal and has its lease
    /// lapsed now ([`Released::LeaseLapsed`]), so the next run of the key resumes it. The
    /// old owner's next write is refused with [`StoreError::StaleToken`], so it can never
    /// overwrite the run that takes the key next.
    ///
    /// A finished record is left alone ([`Released::NotRunning`]): use
    /// [`delete`](super::IdempotencyStore::delete) for it.
    ///
    /// # Errors
    /// As for [`inspect`](Self::inspect): a record the store cannot decode is left alone
    /// and reported.
    async fn release(&self, key: &str) -> Result<Released, StoreError>;
}

/// What a store holds about one record: what [`RecordAdmin::inspect`] and
/// [`RecordAdmin::list`] show.
///
/// Durations are measured on the store's clock when it has one (Redis `TIME`, SQL `now()`;
/// the caller's clock for DynamoDB), at the moment the record was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordInfo {
    /// The full, stored key.
    pub key: String,
    /// Where the operation stands.
    pub status: RecordStatus,
    /// The token of the owner that acquired the record (for a running record: the owner
    /// now, unless its lease lapsed).
    pub token: FencingToken,
    /// Fingerprint of the input that acquired the record, if fingerprinting was on.
    pub fingerprint: Option<String>,
    /// Size of the stored result in bytes; `None` while running, and for a finished record
    /// whose result was not stored (too large, refused).
    pub result_bytes: Option<u64>,
    /// The record's schema version (this build reads only
    /// [`SCHEMA_VERSION`](super::SCHEMA_VERSION)).
    pub schema_version: u32,
    /// Whether this is a durable run's record, with a journal.
    pub durable: bool,
    /// The owner's lease, for a running record; `None` once finished.
    pub lease: Option<Lease>,
    /// How long until the record goes (it expires and its key is free); `None`: kept
    /// until deleted. For a plain running record this is its lease; for a durable one,
    /// its lease plus its retention; for a finished record, what is left of its TTL.
    pub expires_in: Option<Duration>,
    /// The journal of a durable record, from [`RecordAdmin::inspect`] only.
    pub journal: Option<Journal>,
}

impl RecordInfo {
    /// Whether this is an abandoned durable run: running, its lease lapsed, kept so that
    /// the next run of its key (or a recovery) resumes it.
    pub fn is_abandoned(&self) -> bool {
        self.status == RecordStatus::Running && matches!(self.lease, Some(Lease::Lapsed { .. }))
    }
}

/// A running record's lease, at the moment it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lease {
    /// The owner holds the key for `left` more (unless it renews: a live owner does).
    Held {
        /// What is left of the lease.
        left: Duration,
    },
    /// The lease lapsed `ago` (a durable run, abandoned: the next run of its key resumes
    /// it).
    Lapsed {
        /// How long ago the lease lapsed.
        ago: Duration,
    },
}

/// Which records a [`ListRequest`] asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StatusFilter {
    /// Every live record, undecodable ones included.
    #[default]
    Any,
    /// Running records, abandoned durable runs included.
    Running,
    /// Completed records.
    Completed,
    /// Failed records.
    Failed,
    /// Running records whose lease lapsed: abandoned durable runs.
    ExpiredLease,
}

impl StatusFilter {
    /// Whether `info` is one of the records this filter asks for.
    pub fn matches(self, info: &RecordInfo) -> bool {
        match self {
            Self::Any => true,
            Self::Running => info.status == RecordStatus::Running,
            Self::Completed => info.status == RecordStatus::Completed,
            Self::Failed => info.status == RecordStatus::Failed,
            Self::ExpiredLease => info.is_abandoned(),
        }
    }

    /// The one status every record this filter asks for has, if there is one.
    pub fn status(self) -> Option<RecordStatus> {
        match self {
            Self::Any => None,
            Self::Running | Self::ExpiredLease => Some(RecordStatus::Running),
            Self::Completed => Some(RecordStatus::Completed),
            Self::Failed => Some(RecordStatus::Failed),
        }
    }
}

/// Arguments of [`RecordAdmin::list`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListRequest<'a> {
    /// Only keys that start with this (empty: every key).
    pub prefix: &'a str,
    /// Which records.
    pub filter: StatusFilter,
    /// Where to go on: the [`next`](Page::next) cursor of the previous page, as the store
    /// gave it (opaque); `None` for the first page.
    pub cursor: Option<&'a str>,
    /// At most this many records (at least 1 is asked for, whatever this says).
    pub limit: usize,
}

impl<'a> ListRequest<'a> {
    /// The first page of every live record under `prefix`, [`DEFAULT_PAGE_SIZE`] records.
    pub fn new(prefix: &'a str) -> Self {
        Self {
            prefix,
            filter: StatusFilter::Any,
            cursor: None,
            limit: DEFAULT_PAGE_SIZE,
        }
    }

    /// Only the records `filter` asks for.
    #[must_use]
    pub fn filter(mut self, filter: StatusFilter) -> Self {
        self.filter = filter;
        self
    }

    /// The page after `cursor` (a previous page's [`next`](Page::next)).
    #[must_use]
    pub fn cursor(mut self, cursor: Option<&'a str>) -> Self {
        self.cursor = cursor;
        self
    }

    /// At most `limit` records.
    #[must_use]
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// The page size stores work with: `limit`, at least 1.
    pub fn page_size(&self) -> usize {
        self.limit.max(1)
    }
}

/// One page of [`RecordAdmin::list`].
#[derive(Debug)]
pub struct Page {
    /// The records of this page.
    pub records: Vec<Listed>,
    /// The cursor of the next page; `None` when there is none.
    pub next: Option<String>,
}

/// One row of a [`Page`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Listed {
    /// A record, decoded.
    Record(RecordInfo),
    /// A value under a key of the store that is not a record it can read (another schema
    /// version, garbage written by something else): listed so that it is seen, with why.
    Undecodable {
        /// The full key (lossily converted when it is not UTF-8).
        key: String,
        /// Why it cannot be read.
        error: StoreError,
    },
}

impl Listed {
    /// The row's key.
    pub fn key(&self) -> &str {
        match self {
            Self::Record(info) => &info.key,
            Self::Undecodable { key, .. } => key,
        }
    }
}

/// What [`RecordAdmin::release`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Released {
    /// A plain running record was deleted: the key is free, and its next run starts over.
    Deleted,
    /// A durable running record's lease lapsed now (or had lapsed already): its journal is
    /// kept, and the next run of the key (or a recovery) resumes it.
    LeaseLapsed,
    /// The record is finished, and was left alone.
    NotRunning(RecordStatus),
    /// No live record is under the key.
    Absent,
}

impl fmt::Display for Released {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Deleted => f.write_str("deleted (the next run of the key starts over)"),
            Self::LeaseLapsed => {
                f.write_str("lease lapsed, journal kept (the next run of the key resumes the run)")
            }
            Self::NotRunning(status) => write!(f, "not running: the record is {status}"),
            Self::Absent => f.write_str("no record"),
        }
    }
}
