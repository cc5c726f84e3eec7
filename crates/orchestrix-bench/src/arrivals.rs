//! Arrivals: a barrier shared by every process of a storm, in files.
//!
//! Each caller appends one byte to the key's file (opened with `O_APPEND`) when its run of
//! the key returned, and a step executing the key appends one to the key's `.executing`
//! file; the executing step holds until every other caller has returned or is executing
//! the key itself. It lets a race with `cache_result(false)` be judged by "exactly once":
//! the winner frees the key when it ends, so a caller arriving after that would be right
//! to run the key again — with the barrier, every other caller has met the winner while it
//! ran. (Counting the other executing steps keeps a broken store, which lets several
//! callers execute at once, from making them all wait for each other.) It knows nothing of
//! the stores: it only counts calls.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

/// How often a waiting step looks at the file again.
const POLL: Duration = Duration::from_millis(2);

#[derive(Debug, Clone)]
pub struct Arrivals {
    dir: PathBuf,
    /// Callers other than the executing one, in every process.
    others: u64,
}

impl Arrivals {
    pub fn new(dir: &Path, others: u64) -> Self {
        Self {
            dir: dir.to_owned(),
            others,
        }
    }

    /// Notes that one caller's run of `key` returned.
    pub fn arrive(&self, key: &str) -> io::Result<()> {
        self.append(key)
    }

    /// Notes that a step executes `key`.
    pub fn executing(&self, key: &str) -> io::Result<()> {
        self.append(&format!("{key}.executing"))
    }

    fn append(&self, name: &str) -> io::Result<()> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(name))?;
        file.write_all(b".")
    }

    /// Waits, for at most `max`, until every caller of `key` but the one executing it
    /// here has returned or executes it too. `false` if they did not.
    pub async fn wait_for_others(&self, key: &str, max: Duration) -> bool {
        let count = |name: &str| std::fs::metadata(self.dir.join(name)).map_or(0, |m| m.len());
        let deadline = Instant::now() + max;
        loop {
            let met = count(key) + count(&format!("{key}.executing")).saturating_sub(1);
            if met >= self.others {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_step_waits_for_every_other_caller() {
        let dir = tempfile::tempdir().unwrap();
        let arrivals = Arrivals::new(dir.path(), 2);
        arrivals.executing("k").unwrap();
        assert!(
            !arrivals
                .wait_for_others("k", Duration::from_millis(10))
                .await
        );
        arrivals.arrive("k").unwrap();
        assert!(
            !arrivals
                .wait_for_others("k", Duration::from_millis(10))
                .await
        );
        arrivals.arrive("k").unwrap();
        assert!(
            arrivals
                .wait_for_others("k", Duration::from_millis(10))
                .await
        );
    }

    #[tokio::test]
    async fn steps_executing_together_do_not_wait_for_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let arrivals = Arrivals::new(dir.path(), 2);
        for _ in 0..3 {
            arrivals.executing("k").unwrap();
        }
        assert!(
            arrivals
                .wait_for_others("k", Duration::from_millis(10))
                .await
        );
    }
}
