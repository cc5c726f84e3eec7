//! Run options and the validation of keys and durations.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Longest key accepted, in bytes (before scoping).
pub const MAX_KEY_BYTES: usize = 1024;

/// Default lease of a running record.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
const MIN_LEASE: Duration = Duration::from_millis(10);
const MAX_LEASE: Duration = Duration::from_secs(24 * 3600);
const MAX_TTL: Duration = Duration::from_secs(10 * 366 * 24 * 3600);
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

/// What a run does when another caller is running the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnRunning {
    /// Return a result with status `Running` at once (the original's default).
    #[default]
    ReturnRunning,
    /// Return `Err(AlreadyRunning)` (the original's `throwIfRunning`).
    Error,
    /// Wait up to `timeout` for the owner to finish, then return its result (or, if the
    /// owner gave the key up, run). Waiting longer returns `Err(WaitTimedOut)`.
    ///
    /// The memory and PostgreSQL stores wake waiters the moment the record changes; stores
    /// that cannot notify are re-checked with a backoff from 2 ms to 50 ms
    /// ([`DEFAULT_POLL_INTERVAL`](crate::store::DEFAULT_POLL_INTERVAL); see
    /// [`store::wait`](crate::store::wait)), so give records a TTL well above that: one that
    /// expires between two checks looks free to the waiter, which then runs the operation
    /// itself.
    ///
    /// With `cache_result(false)` the owner's record is deleted when it ends, so there is no
    /// result to share: waiters take the key **one after another**, each running the
    /// operation once in turn. That is what `cache_result(false)` asks for (in-flight
    /// exclusion only); use the default `cache_result(true)` for waiters to get the owner's
    /// result.
    Wait {
        /// The longest wait.
        timeout: Duration,
    },
}

/// How a run's key is namespaced in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum KeyScope {
    /// `flow-name:key`: two flows never collide (default).
    #[default]
    Flow,
    /// The key as given, shared by every flow using the store. Global keys share the
    /// store's namespace with scoped keys (`flow:key`): give them a shape of their own
    /// (for example a prefix no flow name has) so that they never equal one.
    Global,
}

/// Why a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key is empty.
    #[error("key is empty")]
    Empty,
    /// The key is longer than [`MAX_KEY_BYTES`].
    #[error("key is {len} bytes long; the limit is {MAX_KEY_BYTES}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The key contains a control character.
    #[error("key contains a control character at byte {at}")]
    ControlCharacter {
        /// Byte offset of the first one.
        at: usize,
    },
}

/// A duration option that is zero or out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{option} of {value:?} is out of range ({allowed})")]
pub struct OptionError {
    /// Which option: `ttl`, `lease` or `wait timeout`.
    pub option: &'static str,
    /// The value given.
    pub value: Duration,
    /// The accepted range.
    pub allowed: &'static str,
}

/// Checks a key: non-empty, at most [`MAX_KEY_BYTES`], no control characters.
///
/// # Errors
/// The first rule the key breaks.
pub fn validate_key(key: &str) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(KeyError::TooLong { len: key.len() });
    }
    // The common key is printable ASCII, checked a byte at a time; anything else gets the
    // full Unicode check.
    if key.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Ok(());
    }
    match key.char_indices().find(|(_, c)| c.is_control()) {
        Some((at, _)) => Err(KeyError::ControlCharacter { at }),
        None => Ok(()),
    }
}

/// Checks a TTL: 1 ms to 10 years.
///
/// # Errors
/// [`OptionError`] naming `ttl` when out of range.
pub fn validate_ttl(ttl: Duration) -> Result<(), OptionError> {
    check(
        "ttl",
        ttl,
        Duration::from_millis(1),
        MAX_TTL,
        "1 ms to 10 years",
    )
}

/// Checks a lease: 10 ms to 24 h.
///
/// # Errors
/// [`OptionError`] naming `lease` when out of range.
pub fn validate_lease(lease: Duration) -> Result<(), OptionError> {
    check("lease", lease, MIN_LEASE, MAX_LEASE, "10 ms to 24 h")
}

/// Checks the wait timeout of [`OnRunning::Wait`]: 1 ms to 24 h.
///
/// # Errors
/// [`OptionError`] naming `wait timeout` when out of range.
pub fn validate_on_running(on_running: OnRunning) -> Result<(), OptionError> {
    match on_running {
        OnRunning::Wait { timeout } => check(
            "wait timeout",
            timeout,
            Duration::from_millis(1),
            MAX_WAIT,
            "1 ms to 24 h",
        ),
        _ => Ok(()),
    }
}

fn check(
    option: &'static str,
    value: Duration,
    min: Duration,
    max: Duration,
    allowed: &'static str,
) -> Result<(), OptionError> {
    if value < min || value > max || value.is_zero() {
        Err(OptionError {
            option,
            value,
            allowed,
        })
    } else {
        Ok(())
    }
}

/// Options of one run: the idempotency key and how it behaves, and cancellation.
///
/// ```
/// use std::time::Duration;
/// use orchestrix::{OnRunning, RunOptions};
///
/// let plain = RunOptions::new();
/// let payment = RunOptions::key("payment:order_123")
///     .ttl(Duration::from_secs(3600))
///     .on_running(OnRunning::Wait { timeout: Duration::from_secs(10) });
/// # let _ = (plain, payment);
/// ```
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub(crate) key: Option<String>,
    pub(crate) ttl: Option<Duration>,
    pub(crate) lease: Duration,
    pub(crate) cache_result: bool,
    pub(crate) on_running: OnRunning,
    pub(crate) scope: KeyScope,
    pub(crate) cancel: Option<CancellationToken>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl RunOptions {
    /// A plain run: no key, never touches the store.
    pub fn new() -> Self {
        Self {
            key: None,
            ttl: None,
            lease: DEFAULT_LEASE,
            cache_result: true,
            on_running: OnRunning::ReturnRunning,
            scope: KeyScope::Flow,
            cancel: None,
        }
    }

    /// An idempotent run under `key`: the key should name the business operation
    /// (`payment:order_123`), not the request.
    pub fn key(key: impl Into<String>) -> Self {
        Self {
            key: Some(key.into()),
            ..Self::new()
        }
    }

    /// How long the finished record is kept (default: until deleted).
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// The lease of the running record (default 30 s). A crashed owner frees the key
    /// after this long; a live one renews it every third of it.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Whether finished results are kept for replay (default `true`). With `false`, the
    /// key still prevents duplicate in-flight runs, but the record is deleted afterwards.
    #[must_use]
    pub fn cache_result(mut self, cache: bool) -> Self {
        self.cache_result = cache;
        self
    }

    /// What to do while another caller runs the key (default: return a `Running` result).
    #[must_use]
    pub fn on_running(mut self, on_running: OnRunning) -> Self {
        self.on_running = on_running;
        self
    }

    /// The original's `throwIfRunning`: `true` is `OnRunning::Error`, `false` the default.
    #[must_use]
    pub fn throw_if_running(self, throw: bool) -> Self {
        self.on_running(if throw {
            OnRunning::Error
        } else {
            OnRunning::ReturnRunning
        })
    }

    /// How the key is namespaced (default: by flow name).
    #[must_use]
    pub fn scope(mut self, scope: KeyScope) -> Self {
        self.scope = scope;
        self
    }

    /// Cancels the run when `token` fires.
    #[must_use]
    pub fn cancellation(mut self, token: CancellationToken) -> Self {
        self.cancel = Some(token);
        self
    }

    /// Checks the key and every duration. Called by the run before anything else.
    pub(crate) fn validate(&self) -> Result<(), super::IdempotencyError> {
        if let Some(key) = &self.key {
            validate_key(key)?;
        }
        if let Some(ttl) = self.ttl {
            validate_ttl(ttl)?;
        }
        validate_lease(self.lease)?;
        validate_on_running(self.on_running)?;
        Ok(())
    }

    /// The run's own cancellation token: a child of the caller's (it fires when the
    /// caller's does), or a fresh one. The library cancels only this token (a lost lease),
    /// never the caller's, which may be shared by other runs.
    pub(crate) fn cancel_token(&self) -> CancellationToken {
        self.cancel
            .as_ref()
            .map_or_else(CancellationToken::new, CancellationToken::child_token)
    }

    /// The key as stored: after `flow_prefix` (see [`flow_prefix`]) unless global.
    pub(crate) fn scoped_key(&self, flow_prefix: &str) -> Option<String> {
        let key = self.key.as_deref()?;
        Some(match self.scope {
            KeyScope::Flow => {
                let mut scoped = String::with_capacity(flow_prefix.len() + key.len());
                scoped.push_str(flow_prefix);
                scoped.push_str(key);
                scoped
            }
            KeyScope::Global => key.to_owned(),
        })
    }
}

/// The prefix of a flow's scoped keys: the flow's name with `%` and `:` escaped (as `%25`
/// and `%3A`), then `:`. The name's part never holds a `:`, so the first `:` of a scoped
/// key ends it, and two different (flow, key) pairs never make the same stored key. A name
/// without either character is used as it is (keys stored by earlier builds still match).
pub(crate) fn flow_prefix(flow: &str) -> String {
    let mut prefix = String::with_capacity(flow.len() + 1);
    for c in flow.chars() {
        match c {
            '%' => prefix.push_str("%25"),
            ':' => prefix.push_str("%3A"),
            c => prefix.push(c),
        }
    }
    prefix.push(':');
    prefix
}

/// The key a flow named `flow` stores a run of `key` under (with the default
/// [`KeyScope::Flow`]): the flow's name with `%` and `:` escaped as `%25` and `%3A`, a
/// `:`, then `key` as given. What tools outside the flow use to find its records, such as
/// the `orchestrix` command-line tool's `--flow`; `scoped_key(flow, "")` is the prefix
/// every key of the flow starts with.
///
/// ```
/// use orchestrix::idempotency::scoped_key;
///
/// assert_eq!(scoped_key("billing", "order_123"), "billing:order_123");
/// assert_eq!(scoped_key("orders:refund", "1"), "orders%3Arefund:1");
/// assert_eq!(scoped_key("billing", ""), "billing:");
/// ```
pub fn scoped_key(flow: &str, key: &str) -> String {
    let mut scoped = flow_prefix(flow);
    scoped.push_str(key);
    scoped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        assert_eq!(validate_key(""), Err(KeyError::Empty));
        assert_eq!(
            validate_key(&"k".repeat(1025)),
            Err(KeyError::TooLong { len: 1025 })
        );
        assert!(validate_key(&"k".repeat(1024)).is_ok());
        assert_eq!(
            validate_key("pay\nment"),
            Err(KeyError::ControlCharacter { at: 3 })
        );
        assert!(validate_key("payment:order_123 ✓").is_ok());
    }

    #[test]
    fn scope_prefixes_the_flow_name_by_default() {
        let opts = RunOptions::key("k");
        assert_eq!(
            opts.scoped_key(&flow_prefix("pay")).as_deref(),
            Some("pay:k")
        );
        let global = opts.scope(KeyScope::Global);
        assert_eq!(global.scoped_key(&flow_prefix("pay")).as_deref(), Some("k"));
        assert_eq!(RunOptions::new().scoped_key(&flow_prefix("pay")), None);
    }

    #[test]
    fn scoped_key_is_the_key_a_flow_run_stores() {
        for (flow, key) in [
            ("pay", "k"),
            ("orders:refund", "1001"),
            ("a%3A", "b:c"),
            ("", ""),
        ] {
            assert_eq!(
                RunOptions::key(key).scoped_key(&flow_prefix(flow)),
                Some(scoped_key(flow, key))
            );
        }
        assert_eq!(scoped_key("50%:off", "x"), "50%25%3Aoff:x");
        assert!(scoped_key("pay", "k").starts_with(&scoped_key("pay", "")));
    }

    #[test]
    fn flow_scoping_is_injective() {
        let scoped = |flow: &str, key: &str| RunOptions::key(key).scoped_key(&flow_prefix(flow));
        assert_ne!(
            scoped("orders:refund", "1001"),
            scoped("orders", "refund:1001")
        );
        assert_ne!(scoped("a%3A", "b"), scoped("a:", "b"));
        assert_eq!(
            scoped("orders:refund", "1").as_deref(),
            Some("orders%3Arefund:1")
        );
        assert_eq!(scoped("50%", "1").as_deref(), Some("50%25:1"));
    }

    #[test]
    fn a_run_cancels_only_its_own_child_of_the_callers_token() {
        let caller = CancellationToken::new();
        let options = RunOptions::key("k").cancellation(caller.clone());
        let run = options.cancel_token();
        run.cancel();
        assert!(!caller.is_cancelled());
        let other = options.cancel_token();
        caller.cancel();
        assert!(other.is_cancelled());
    }
}
