//! The independent execution counter: a file opened with `O_APPEND`, one line per
//! execution of a side effect, shared by every process of a scenario.
//!
//! Each line is written with a single `write` of a few bytes; on Linux, appends of one
//! `write` to a local file never interleave, so the file holds exactly one whole line per
//! execution, whichever process made it. It knows nothing of the stores, which is the
//! point: it counts what really ran, not what a store believes.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct ExecutionLog {
    file: Arc<File>,
}

impl ExecutionLog {
    /// Opens (creating if needed) the log at `path` for appending.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            file: Arc::new(file),
        })
    }

    /// Records one execution of `what`.
    pub fn record(&self, what: &str) -> io::Result<()> {
        let line = format!("{what}\n");
        let written = (&*self.file).write(line.as_bytes())?;
        if written != line.len() {
            return Err(io::Error::other(format!(
                "short append to the execution log ({written} of {} bytes)",
                line.len()
            )));
        }
        Ok(())
    }
}

/// A fresh, empty log file in a temporary directory, removed on drop.
#[derive(Debug)]
pub struct LogFile {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl LogFile {
    pub fn new() -> io::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("orchestrix-bench-log-")
            .tempdir()?;
        let path = dir.path().join("executions.log");
        File::create(&path)?;
        Ok(Self { _dir: dir, path })
    }

    /// How many times each line was recorded.
    pub fn counts(&self) -> io::Result<BTreeMap<String, u64>> {
        let mut counts = BTreeMap::new();
        for line in std::fs::read_to_string(&self.path)?.lines() {
            *counts.entry(line.to_owned()).or_insert(0) += 1;
        }
        Ok(counts)
    }

    /// Every line, in the order written.
    pub fn lines(&self) -> io::Result<Vec<String>> {
        Ok(std::fs::read_to_string(&self.path)?
            .lines()
            .map(str::to_owned)
            .collect())
    }
}
