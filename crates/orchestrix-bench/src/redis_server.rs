//! A private `redis-server` on a free loopback port, without persistence, that a scenario
//! can kill and restart, freeze and thaw (`SIGSTOP` / `SIGCONT`: a hung server), or start
//! with limits of its own. It is this process's child and is killed when dropped.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use orchestrix_redis::redis;
use tokio::process::{Child, Command};

/// How long a starting server may take to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct PrivateRedis {
    port: u16,
    dir: tempfile::TempDir,
    /// Configuration beyond the defaults (`--maxmemory 4mb`, ...), kept for restarts.
    config: Vec<String>,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts a server on a free port of 127.0.0.1 and waits until it answers.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(&[]).await
    }

    /// [`start`](Self::start), with `config` (`["--proto-max-bulk-len", "1mb"]`) added to
    /// the server's command line.
    pub async fn start_with(config: &[&str]) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .context("finding a free loopback port")?
            .port();
        let dir = tempfile::Builder::new()
            .prefix("orchestrix-bench-redis-")
            .tempdir()
            .context("creating the private Redis's directory")?;
        let mut server = Self {
            port,
            dir,
            config: config.iter().map(|&arg| arg.to_owned()).collect(),
            child: None,
        };
        server.spawn().await?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server with SIGKILL and waits until it is gone: every record it held is
    /// lost, since it keeps nothing on disk.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child
                .kill()
                .await
                .context("killing the private redis-server")?;
        }
        Ok(())
    }

    /// Freezes the server with `SIGSTOP`: it keeps its connections and its records but
    /// answers nothing (a hung process, a paused VM) until [`resume`](Self::resume).
    pub async fn stop(&self) -> anyhow::Result<()> {
        self.signal("STOP").await
    }

    /// Thaws a server frozen by [`stop`](Self::stop) with `SIGCONT`: it goes on with what
    /// it had read, including requests whose callers have given up on them.
    pub async fn resume(&self) -> anyhow::Result<()> {
        self.signal("CONT").await
    }

    /// Sends `signal` with the `kill` command (this crate has no `unsafe` for `libc::kill`).
    async fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .context("the private redis-server is not running")?;
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .stdin(Stdio::null())
            .status()
            .await
            .with_context(|| format!("running `kill -{signal} {pid}`"))?;
        if !status.success() {
            bail!("`kill -{signal} {pid}` failed ({status})");
        }
        Ok(())
    }

    /// Starts the server again on the same port, empty, and waits until it answers.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await?;
        self.spawn().await
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--protected-mode", "yes", "--logfile", ""])
            .args(&self.config)
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting redis-server (is it installed? scripts/services.sh installs it)")?;
        self.child = Some(child);
        let url = self.url();
        let ready = async {
            loop {
                if ping(&url).await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        if tokio::time::timeout(READY_TIMEOUT, ready).await.is_err() {
            self.kill().await?;
            bail!(
                "the private redis-server on port {} did not answer within {READY_TIMEOUT:?}",
                self.port
            );
        }
        Ok(())
    }
}

async fn ping(url: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(url)?;
    let mut conn = tokio::time::timeout(
        Duration::from_millis(500),
        client.get_multiplexed_async_connection(),
    )
    .await??;
    let _: String = redis::cmd("PING").query_async(&mut conn).await?;
    Ok(())
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // SIGKILL ends a stopped process too.
            let _ = child.start_kill();
        }
    }
}
