//! Lifecycle hooks: plugins observe a run; they can never break or change it.
//!
//! A [`Plugin`] receives every [`Event`] of every run of the flows it is attached to. A
//! plugin that panics is caught and logged through `tracing`; the run goes on as if the
//! plugin were not there. Any `Fn(&Event)` closure is a plugin. The [`ConsoleLogger`] is
//! the built-in, opt-in human-readable log.

use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::result::{FlowError, Status};

/// Something that happened during a run.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Event<'a> {
    /// The run started executing steps.
    FlowStart {
        /// The flow.
        flow: &'a str,
    },
    /// The run completed.
    FlowComplete {
        /// The flow.
        flow: &'a str,
        /// How long it took.
        duration: Duration,
    },
    /// The run failed or was cancelled (including validation failures).
    FlowFail {
        /// The flow.
        flow: &'a str,
        /// `Failed` or `Cancelled`.
        status: Status,
        /// Why.
        error: &'a FlowError,
        /// How long it took.
        duration: Duration,
    },
    /// An attempt of a step started.
    StepStart {
        /// The flow.
        flow: &'a str,
        /// The step.
        step: &'a str,
        /// 1 for the first attempt.
        attempt: u32,
    },
    /// A step completed.
    StepComplete {
        /// The flow.
        flow: &'a str,
        /// The step.
        step: &'a str,
        /// Attempts it took.
        attempts: u32,
        /// Time across all attempts.
        duration: Duration,
    },
    /// An attempt of a step failed.
    StepFail {
        /// The flow.
        flow: &'a str,
        /// The step.
        step: &'a str,
        /// The failed attempt, 1-based.
        attempt: u32,
        /// The attempt's error.
        error: &'a str,
        /// The delay before the next attempt, or `None` when retries are exhausted.
        retry_in: Option<Duration>,
    },
    /// A durable run skipped a step because an earlier run of the same key completed it:
    /// its state was restored from the journal, and it did not run again.
    StepRestored {
        /// The flow.
        flow: &'a str,
        /// The step.
        step: &'a str,
        /// The attempts it took in the run that completed it.
        attempts: u32,
    },
    /// A step's compensation started.
    CompensateStart {
        /// The flow.
        flow: &'a str,
        /// The step being compensated.
        step: &'a str,
    },
    /// A step's compensation finished.
    CompensateComplete {
        /// The flow.
        flow: &'a str,
        /// The step compensated.
        step: &'a str,
        /// The compensation's error, if it failed.
        error: Option<&'a str>,
    },
}

/// Observes runs. Attach with [`FlowBuilder::plugin`](crate::FlowBuilder::plugin).
///
/// ```
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use orchestrix::hooks::{Event, Plugin};
///
/// #[derive(Default)]
/// struct FailureCounter(AtomicUsize);
///
/// impl Plugin for FailureCounter {
///     fn on_event(&self, event: &Event<'_>) {
///         if let Event::StepFail { .. } = event {
///             self.0.fetch_add(1, Ordering::Relaxed);
///         }
///     }
/// }
/// ```
pub trait Plugin: Send + Sync + 'static {
    /// Called for every event, on the task running the flow. Keep it quick.
    fn on_event(&self, event: &Event<'_>);
}

impl<F> Plugin for F
where
    F: Fn(&Event<'_>) + Send + Sync + 'static,
{
    fn on_event(&self, event: &Event<'_>) {
        self(event);
    }
}

/// The plugins of one flow, called so that none of them can affect the run.
#[derive(Clone, Default)]
pub(crate) struct Hooks {
    plugins: Arc<[Arc<dyn Plugin>]>,
}

impl Hooks {
    pub(crate) fn new(plugins: Vec<Arc<dyn Plugin>>) -> Self {
        Self {
            plugins: plugins.into(),
        }
    }

    #[inline]
    pub(crate) fn emit(&self, event: Event<'_>) {
        if self.plugins.is_empty() {
            return;
        }
        for plugin in self.plugins.iter() {
            if catch_unwind(AssertUnwindSafe(|| plugin.on_event(&event))).is_err() {
                tracing::warn!(?event, "an orchestrix plugin panicked; the run goes on");
            }
        }
    }
}

/// How much a [`ConsoleLogger`] prints: each event has a level, and the logger prints
/// the events at its minimum level and above.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[non_exhaustive]
pub enum LogLevel {
    /// Everything, including each attempt's start (the default).
    #[default]
    Debug,
    /// Runs starting and completing, steps completing or restored, compensations.
    Info,
    /// Only what went wrong: failed attempts, failed or cancelled runs, failed
    /// compensations.
    Warn,
}

impl LogLevel {
    /// The level of `event`.
    pub fn of(event: &Event<'_>) -> Self {
        match event {
            Event::StepStart { .. } => Self::Debug,
            Event::StepFail { .. } | Event::FlowFail { .. } => Self::Warn,
            Event::CompensateComplete { error: Some(_), .. } => Self::Warn,
            _ => Self::Info,
        }
    }
}

/// The built-in console logger: one human-readable line per event.
///
/// ```text
/// [orchestrix] checkout: started
/// [orchestrix] checkout › charge: attempt 1 failed: card declined (retry in 100ms)
/// [orchestrix] checkout › charge: completed in 103ms after 2 attempts
/// [orchestrix] checkout: completed in 104ms
/// ```
///
/// A small builder sets where it writes (standard error, standard output, or any
/// `Write + Send`), the prefix of its lines, the least [`LogLevel`] it prints, and whether
/// it prints at all:
///
/// ```
/// use orchestrix::hooks::{ConsoleLogger, LogLevel};
/// use orchestrix::Flow;
///
/// let verbose = std::env::var_os("CHECKOUT_LOG").is_some();
/// let flow = Flow::<u64>::builder("checkout")
///     .step("charge", |_ctx| async { Ok(()) })
///     .plugin(
///         ConsoleLogger::stdout()
///             .prefix("[checkout]")
///             .level(LogLevel::Info)
///             .enabled(verbose),
///     )
///     .build();
/// # assert!(flow.is_ok());
/// ```
pub struct ConsoleLogger {
    out: Mutex<Box<dyn Write + Send>>,
    prefix: String,
    level: LogLevel,
    enabled: bool,
}

/// What every line starts with unless [`ConsoleLogger::prefix`] says otherwise.
const DEFAULT_PREFIX: &str = "[orchestrix]";

impl ConsoleLogger {
    /// Logs to standard error.
    pub fn stderr() -> Self {
        Self::to_writer(std::io::stderr())
    }

    /// Logs to standard output.
    pub fn stdout() -> Self {
        Self::to_writer(std::io::stdout())
    }

    /// Logs to any writer (a file, a buffer, a pipe): every line is written then flushed.
    /// A write that fails drops the line; it never affects the run.
    pub fn to_writer(out: impl Write + Send + 'static) -> Self {
        Self {
            out: Mutex::new(Box::new(out)),
            prefix: DEFAULT_PREFIX.to_owned(),
            level: LogLevel::Debug,
            enabled: true,
        }
    }

    /// What every line starts with, followed by a space (default `[orchestrix]`); an
    /// empty prefix starts lines with the flow's name.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Prints only events at `level` and above (default [`LogLevel::Debug`]: all).
    #[must_use]
    pub fn level(mut self, level: LogLevel) -> Self {
        self.level = level;
        self
    }

    /// Whether the logger prints at all (default `true`): attach it always, and switch it
    /// from configuration. A disabled logger formats nothing.
    #[must_use]
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// The line logged for `event`.
    pub fn format(event: &Event<'_>) -> String {
        let ms = |d: &Duration| format!("{:.0?}", d);
        match event {
            Event::FlowStart { flow } => format!("{flow}: started"),
            Event::FlowComplete { flow, duration } => {
                format!("{flow}: completed in {}", ms(duration))
            }
            Event::FlowFail {
                flow,
                status,
                error,
                duration,
            } => {
                let verb = if *status == Status::Cancelled {
                    "cancelled"
                } else {
                    "failed"
                };
                format!("{flow}: {verb} in {}: {error}", ms(duration))
            }
            Event::StepStart {
                flow,
                step,
                attempt,
            } => format!("{flow} › {step}: attempt {attempt} started"),
            Event::StepComplete {
                flow,
                step,
                attempts,
                duration,
            } => {
                let plural = if *attempts == 1 { "" } else { "s" };
                format!(
                    "{flow} › {step}: completed in {} after {attempts} attempt{plural}",
                    ms(duration)
                )
            }
            Event::StepFail {
                flow,
                step,
                attempt,
                error,
                retry_in,
            } => match retry_in {
                Some(delay) => format!(
                    "{flow} › {step}: attempt {attempt} failed: {error} (retry in {})",
                    ms(delay)
                ),
                None => format!("{flow} › {step}: attempt {attempt} failed: {error} (giving up)"),
            },
            Event::StepRestored {
                flow,
                step,
                attempts,
            } => {
                let plural = if *attempts == 1 { "" } else { "s" };
                format!(
                    "{flow} › {step}: restored from the journal (completed earlier after {attempts} attempt{plural})"
                )
            }
            Event::CompensateStart { flow, step } => {
                format!("{flow} › {step}: compensating")
            }
            Event::CompensateComplete { flow, step, error } => match error {
                None => format!("{flow} › {step}: compensated"),
                Some(e) => format!("{flow} › {step}: compensation failed: {e}"),
            },
        }
    }
}

impl Plugin for ConsoleLogger {
    fn on_event(&self, event: &Event<'_>) {
        if !self.enabled || LogLevel::of(event) < self.level {
            return;
        }
        let line = Self::format(event);
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        // A logger that cannot write must not fail the run; the line is dropped.
        let _ = if self.prefix.is_empty() {
            writeln!(out, "{line}")
        } else {
            writeln!(out, "{} {line}", self.prefix)
        };
        let _ = out.flush();
    }
}

impl std::fmt::Debug for ConsoleLogger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleLogger")
            .field("prefix", &self.prefix)
            .field("level", &self.level)
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}
