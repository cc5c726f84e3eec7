//! A loopback TCP proxy in front of a server that counts what clients send, to measure
//! statements, commands and round trips per store operation exactly, on the wire.
//!
//! * **PostgreSQL.** `pg_stat_statements` is usually not loaded, and `pg_stat_database`
//!   counters are flushed lazily and shared with every other session, so the figures come
//!   from the wire instead: in the extended query protocol every statement executed is one
//!   `Execute` message and every round trip ends with one `Sync` (a simple query is one
//!   `Query`). Needs an unencrypted connection (`sslmode=disable`).
//! * **Redis.** `INFO commandstats` also counts the commands that Lua scripts run inside the
//!   server, so it cannot tell what a client sent; the proxy counts the RESP commands
//!   themselves.
//!
//! The proxy parses only the client → server framing and forwards every byte unchanged.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Which protocol the proxied connections speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Postgres,
    Redis,
}

/// What clients sent since the last [`reset`](Counts::reset).
#[derive(Debug)]
pub struct Counts {
    /// PostgreSQL: messages by type byte.
    messages: Vec<AtomicU64>,
    /// Redis: commands (RESP arrays or inline commands).
    commands: AtomicU64,
}

impl Default for Counts {
    fn default() -> Self {
        Self {
            messages: (0..256).map(|_| AtomicU64::new(0)).collect(),
            commands: AtomicU64::new(0),
        }
    }
}

impl Counts {
    pub fn reset(&self) {
        for counter in &self.messages {
            counter.store(0, Ordering::SeqCst);
        }
        self.commands.store(0, Ordering::SeqCst);
    }

    /// PostgreSQL messages of type `tag` (`b'E'` Execute, `b'S'` Sync, …).
    pub fn messages(&self, tag: u8) -> u64 {
        self.messages[usize::from(tag)].load(Ordering::SeqCst)
    }

    /// PostgreSQL statements executed: `Execute` and simple `Query` messages.
    pub fn statements(&self) -> u64 {
        self.messages(b'E') + self.messages(b'Q')
    }

    /// PostgreSQL round trips: every `Sync` and simple `Query` waits for `ReadyForQuery`.
    pub fn round_trips(&self) -> u64 {
        self.messages(b'S') + self.messages(b'Q')
    }

    /// Redis commands.
    pub fn commands(&self) -> u64 {
        self.commands.load(Ordering::SeqCst)
    }

    fn message(&self, tag: u8) {
        self.messages[usize::from(tag)].fetch_add(1, Ordering::SeqCst);
    }

    fn command(&self) {
        self.commands.fetch_add(1, Ordering::SeqCst);
    }
}

/// The running proxy; stops (with every connection through it) when dropped.
#[derive(Debug)]
pub struct CountingProxy {
    pub addr: SocketAddr,
    pub counts: Arc<Counts>,
    task: JoinHandle<()>,
}

impl CountingProxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to `upstream`.
    pub async fn start(protocol: Protocol, upstream: String) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the counting proxy")?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Counts::default());
        let task_counts = Arc::clone(&counts);
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let counts = Arc::clone(&task_counts);
                let upstream = upstream.clone();
                connections.spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        let _ = relay(protocol, client, server, counts).await;
                    }
                });
            }
        });
        Ok(Self { addr, counts, task })
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    protocol: Protocol,
    client: TcpStream,
    server: TcpStream,
    counts: Arc<Counts>,
) -> std::io::Result<()> {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let downstream =
        tokio::spawn(async move { tokio::io::copy(&mut server_read, &mut client_write).await });
    let mut postgres = PgFraming::default();
    let mut redis = RespFraming::default();
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = client_read.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        match protocol {
            Protocol::Postgres => postgres.feed(&buf[..n], &counts),
            Protocol::Redis => redis.feed(&buf[..n], &counts),
        }
        server_write.write_all(&buf[..n]).await?;
    }
    downstream.abort();
    Ok(())
}

/// PostgreSQL's client → server framing: untyped startup messages (a length), then typed
/// messages (a type byte and a length that counts itself but not the type byte).
#[derive(Debug, Default)]
struct PgFraming {
    started: bool,
    header: Vec<u8>,
    skip: usize,
}

/// The length of an `SSLRequest` / `GSSENCRequest`, after which the startup message follows.
const NEGOTIATION_LEN: u32 = 8;

impl PgFraming {
    fn feed(&mut self, mut data: &[u8], counts: &Counts) {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let header_len = if self.started { 5 } else { 4 };
            let n = (header_len - self.header.len()).min(data.len());
            self.header.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.header.len() < header_len {
                continue;
            }
            let (tag, len) = if self.started {
                (Some(self.header[0]), &self.header[1..5])
            } else {
                (None, &self.header[0..4])
            };
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]);
            match tag {
                Some(tag) => counts.message(tag),
                None => self.started = len != NEGOTIATION_LEN,
            }
            self.skip = usize::try_from(len.saturating_sub(4)).unwrap_or(usize::MAX);
            self.header.clear();
        }
    }
}

/// RESP's client → server framing: a command is an array header `*<n>` followed by n bulk
/// strings `$<len>` + `<len>` bytes; a line not starting with `*` is an inline command.
#[derive(Debug, Default)]
struct RespFraming {
    line: Vec<u8>,
    skip: usize,
    bulks_left: u64,
}

impl RespFraming {
    fn feed(&mut self, mut data: &[u8], counts: &Counts) {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let Some(end) = data.iter().position(|&b| b == b'\n') else {
                self.line.extend_from_slice(data);
                return;
            };
            self.line.extend_from_slice(&data[..end]);
            data = &data[end + 1..];
            let line = std::mem::take(&mut self.line);
            let line = line.strip_suffix(b"\r").unwrap_or(&line);
            let number = || {
                std::str::from_utf8(&line[1..])
                    .ok()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            if self.bulks_left > 0 {
                if line.first() == Some(&b'$') {
                    self.bulks_left -= 1;
                    self.skip = usize::try_from(number())
                        .unwrap_or(usize::MAX)
                        .saturating_add(2);
                }
            } else if line.first() == Some(&b'*') {
                counts.command();
                self.bulks_left = number();
            } else if !line.is_empty() {
                counts.command();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_postgres_messages_split_anywhere() {
        let mut wire = Vec::new();
        // StartupMessage: length 9 (4 + protocol 4 + a NUL).
        wire.extend_from_slice(&9u32.to_be_bytes());
        wire.extend_from_slice(&196_608u32.to_be_bytes());
        wire.push(0);
        for tag in [b'P', b'B', b'E', b'S', b'B', b'E', b'S', b'Q'] {
            wire.push(tag);
            wire.extend_from_slice(&6u32.to_be_bytes());
            wire.extend_from_slice(&[1, 2]);
        }
        for chunk in [1, 3, 7, 1000] {
            let counts = Counts::default();
            let mut framing = PgFraming::default();
            for piece in wire.chunks(chunk) {
                framing.feed(piece, &counts);
            }
            let seen = (
                counts.statements(),
                counts.round_trips(),
                counts.messages(b'P'),
            );
            assert_eq!(seen, (3, 3, 1), "chunks of {chunk}");
        }
    }

    #[test]
    fn counts_redis_commands_split_anywhere() {
        let wire = b"*2\r\n$7\r\nEVALSHA\r\n$4\r\n\r\n*\n\r\n*1\r\n$4\r\nPING\r\nPING\r\n";
        for chunk in [1, 2, 5, 1000] {
            let counts = Counts::default();
            let mut framing = RespFraming::default();
            for piece in wire.chunks(chunk) {
                framing.feed(piece, &counts);
            }
            assert_eq!(counts.commands(), 3, "chunks of {chunk}");
        }
    }
}
