//! Shared by the test binaries: the real Redis they talk to, and per-test isolation.
#![allow(dead_code)] // each test binary uses a different part

use orchestrix_redis::RedisStore;
use orchestrix_redis::redis::aio::MultiplexedConnection;

/// `REDIS_URL`, or the machine's Redis on loopback.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A key prefix no other test (or run) uses.
pub fn unique_prefix(test: &str) -> String {
    format!("orchestrix-test:{test}:{:016x}:", fastrand::u64(..))
}

/// A connected store under `prefix`.
pub async fn store_with_prefix(prefix: &str) -> RedisStore {
    RedisStore::builder(redis_url())
        .key_prefix(prefix)
        .connect()
        .await
        .expect("Redis must answer at REDIS_URL (scripts/test starts one)")
}

/// A connected store under a fresh prefix.
pub async fn store(test: &str) -> RedisStore {
    store_with_prefix(&unique_prefix(test)).await
}

/// A plain connection, for writing what another program might and for looking at keys.
pub async fn raw() -> MultiplexedConnection {
    orchestrix_redis::redis::Client::open(redis_url())
        .expect("valid REDIS_URL")
        .get_multiplexed_async_connection()
        .await
        .expect("Redis must answer at REDIS_URL")
}

/// A `redis-server` of this test's own, on a free loopback port, started with extra
/// settings (limits a test wants to hit without touching the shared Redis). Killed when
/// dropped.
pub struct PrivateRedis {
    port: u16,
    child: std::process::Child,
}

impl PrivateRedis {
    /// Starts `redis-server` without persistence plus `settings` (e.g.
    /// `["--maxmemory", "4mb"]`) and waits until it answers `PING`.
    pub async fn start(settings: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free loopback port")
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--logfile", ""])
            .arg("--dir")
            .arg(std::env::temp_dir())
            .args(settings)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/services.sh installs it)");
        let server = Self { port, child };
        let url = server.url();
        let ready = async {
            loop {
                let client = orchestrix_redis::redis::Client::open(url.as_str()).expect("url");
                if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                    let pong: Result<String, _> = orchestrix_redis::redis::cmd("PING")
                        .query_async(&mut conn)
                        .await;
                    if pong.is_ok() {
                        return;
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), ready)
            .await
            .expect("the private redis-server must answer within 10 s");
        server
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A store on it.
    pub async fn store(&self) -> RedisStore {
        RedisStore::builder(self.url())
            .key_prefix(unique_prefix("private"))
            .connect()
            .await
            .expect("the private redis-server answers")
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `REDIS_CLUSTER_NODES` (comma-separated URLs), or the cluster `scripts/services.sh`
/// starts on loopback ports 7101-7106.
pub fn cluster_nodes() -> Vec<String> {
    std::env::var("REDIS_CLUSTER_NODES")
        .unwrap_or_else(|_| {
            (7101..=7106)
                .map(|port| format!("redis://127.0.0.1:{port}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// A store on the test cluster under `prefix`.
pub async fn cluster_store_with_prefix(prefix: &str) -> RedisStore {
    RedisStore::cluster(cluster_nodes())
        .key_prefix(prefix)
        .connect()
        .await
        .expect("the Redis Cluster must answer at REDIS_CLUSTER_NODES (scripts/test starts one)")
}

/// A store on the test cluster under a fresh prefix.
pub async fn cluster_store(test: &str) -> RedisStore {
    cluster_store_with_prefix(&unique_prefix(test)).await
}
