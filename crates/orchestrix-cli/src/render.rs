//! How records are shown: durations and instants for people, and the JSON shape of a
//! record.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use orchestrix::store::{Journal, JournalDescription, Lease, RecordInfo};
use serde::Serialize;

/// `d` for people: `850ms`, `27.9s`, `3m12s`, `2h05m`, `4d03h`.
pub fn duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0 => format!("{}ms", d.as_millis()),
        1..60 => format!("{:.1}s", d.as_secs_f64()),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86_400 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{:02}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

/// This machine's clock `after` from now, as RFC 3339 UTC to the second.
pub fn instant_after(after: Duration) -> String {
    utc(SystemTime::now() + after)
}

/// This machine's clock `ago` before now, as RFC 3339 UTC to the second.
pub fn instant_before(ago: Duration) -> String {
    utc(SystemTime::now().checked_sub(ago).unwrap_or(UNIX_EPOCH))
}

/// `at` as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The proleptic Gregorian date of `days` since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// A lease for people: `held, 27.9s left (until …)` or `lapsed 3m12s ago (at …)`.
pub fn lease(lease: Lease) -> String {
    match lease {
        Lease::Held { left } => format!(
            "held, {} left (until {} by this machine's clock)",
            duration(left),
            instant_after(left)
        ),
        Lease::Lapsed { ago } => format!(
            "lapsed {} ago (at {}): abandoned, the next run of the key resumes it",
            duration(ago),
            instant_before(ago)
        ),
        _ => "unknown".to_owned(),
    }
}

/// A lease in a table cell: `27.9s` left, or `lapsed 3m12s`.
pub fn lease_cell(lease: Option<Lease>) -> String {
    match lease {
        Some(Lease::Held { left }) => duration(left),
        Some(Lease::Lapsed { ago }) => format!("lapsed {}", duration(ago)),
        _ => "-".to_owned(),
    }
}

/// What is left before the record expires, in a cell.
pub fn expires_cell(expires_in: Option<Duration>) -> String {
    expires_in.map_or_else(|| "never".to_owned(), duration)
}

/// A result's size, in a cell.
pub fn result_cell(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "-".to_owned(), |b| format!("{b} B"))
}

/// A record as JSON.
#[derive(Debug, Serialize)]
pub struct RecordJson {
    pub key: String,
    pub status: &'static str,
    pub token: String,
    pub fingerprint: Option<String>,
    pub result_bytes: Option<u64>,
    pub schema_version: u32,
    pub durable: bool,
    pub lease: Option<LeaseJson>,
    /// Milliseconds until the record expires; `null`: kept until deleted.
    pub expires_in_ms: Option<u128>,
    pub journal: Option<JournalDescription>,
}

/// A lease as JSON; `deadline` is by this machine's clock.
#[derive(Debug, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LeaseJson {
    Held { left_ms: u128, deadline: String },
    Lapsed { ago_ms: u128, lapsed_at: String },
}

impl RecordJson {
    pub fn of(info: &RecordInfo) -> Self {
        Self {
            key: info.key.clone(),
            status: info.status.as_str(),
            token: info.token.to_string(),
            fingerprint: info.fingerprint.clone(),
            result_bytes: info.result_bytes,
            schema_version: info.schema_version,
            durable: info.durable,
            lease: info.lease.and_then(|lease| match lease {
                Lease::Held { left } => Some(LeaseJson::Held {
                    left_ms: left.as_millis(),
                    deadline: instant_after(left),
                }),
                Lease::Lapsed { ago } => Some(LeaseJson::Lapsed {
                    ago_ms: ago.as_millis(),
                    lapsed_at: instant_before(ago),
                }),
                _ => None,
            }),
            expires_in_ms: info.expires_in.map(|d| d.as_millis()),
            journal: info.journal.as_ref().map(Journal::describe),
        }
    }
}

/// An error on one line, with its causes: `what: why: why`.
pub fn error_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let cause = cause.to_string();
        // Client libraries often repeat their source in their own message.
        if !parts.iter().any(|part| part.contains(&cause)) {
            parts.push(cause);
        }
    }
    parts.join(": ").replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(duration(Duration::from_millis(850)), "850ms");
        assert_eq!(duration(Duration::from_millis(27_940)), "27.9s");
        assert_eq!(duration(Duration::from_secs(192)), "3m12s");
        assert_eq!(duration(Duration::from_secs(7500)), "2h05m");
        assert_eq!(
            duration(Duration::from_secs(4 * 86_400 + 3 * 3600)),
            "4d03h"
        );
    }

    #[test]
    fn instants_are_utc_dates() {
        assert_eq!(utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            utc(UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661)),
            "2000-02-29T01:01:01Z"
        );
        assert_eq!(
            utc(UNIX_EPOCH + Duration::from_secs(1_735_689_599)),
            "2024-12-31T23:59:59Z"
        );
    }
}
