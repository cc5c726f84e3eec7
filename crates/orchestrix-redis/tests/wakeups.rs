//! Waiters woken by Redis pub/sub: the owner's finish or release wakes a waiter of another
//! store instance (another process, in effect), a dead subscription connection does not
//! lose the waiter, and a change that publishes nothing is caught by the safety poll.
//!
//! The safety poll is set to an hour where a test shows that only a notification can have
//! woken the waiter within the test's bound (the wait's own `max` is longer still).

mod common;

use std::time::Duration;

use orchestrix::store::{FinalStatus, IdempotencyStore, StartOutcome, Wait};
use orchestrix_conformance::request;
use orchestrix_redis::RedisStore;
use orchestrix_redis::redis::aio::MultiplexedConnection;

/// Longer than any test: a wait that returns did so because it was woken.
const MAX: Duration = Duration::from_secs(120);
/// How long a test gives a woken waiter to return: well within the records' 30 s lease,
/// whose end would wake a waiter too.
const BOUND: Duration = Duration::from_secs(10);
const NEVER: Duration = Duration::from_secs(3600);

async fn store_at(url: &str, prefix: &str, safety_poll: Duration) -> RedisStore {
    RedisStore::builder(url)
        .key_prefix(prefix)
        .safety_poll_interval(safety_poll)
        .connect()
        .await
        .expect("Redis answers")
}

async fn raw_at(url: &str) -> MultiplexedConnection {
    orchestrix_redis::redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("Redis answers")
}

/// How many subscribers the shard channel `channel` has.
async fn subscribers(conn: &mut MultiplexedConnection, channel: &str) -> u64 {
    let reply: (String, u64) = orchestrix_redis::redis::cmd("PUBSUB")
        .arg("SHARDNUMSUB")
        .arg(channel)
        .query_async(conn)
        .await
        .expect("PUBSUB SHARDNUMSUB");
    reply.1
}

/// Waits (up to `BOUND`) until `channel` has `n` subscribers.
async fn until_subscribers(conn: &mut MultiplexedConnection, channel: &str, n: u64) {
    let wait = async {
        while subscribers(conn, channel).await != n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(BOUND, wait)
        .await
        .unwrap_or_else(|_| panic!("{channel} never had {n} subscribers"));
}

/// The owner's key, acquired on `owner`; `waiter` sees it running.
async fn owned(
    owner: &RedisStore,
    waiter: &RedisStore,
    key: &str,
) -> orchestrix::store::FencingToken {
    let StartOutcome::Acquired(token) = owner.start(request(key, None)).await.expect("start")
    else {
        panic!("a fresh key is acquired");
    };
    let seen = waiter.start(request(key, None)).await.expect("start");
    assert!(
        matches!(seen, StartOutcome::Existing(_)),
        "the waiter sees the owner"
    );
    token
}

/// Like the engine: wait until the record is no longer running.
async fn wait_until_finished(store: &RedisStore, key: &str) {
    loop {
        let record = store.get(key).await.expect("get");
        if record.is_none_or(|r| r.status != orchestrix::store::RecordStatus::Running) {
            return;
        }
        store
            .wait_for_change(key, Wait::new(MAX))
            .await
            .expect("wait");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owners_finish_wakes_a_waiter_of_another_store() {
    let url = common::redis_url();
    let prefix = common::unique_prefix("wake-finish");
    let owner = store_at(&url, &prefix, NEVER).await;
    let waiter = store_at(&url, &prefix, NEVER).await;
    let token = owned(&owner, &waiter, "k").await;
    let waiting = tokio::spawn(async move { waiter.wait_for_change("k", Wait::new(MAX)).await });
    let mut raw = raw_at(&url).await;
    until_subscribers(&mut raw, &format!("{prefix}k"), 1).await;
    owner
        .finish("k", token, FinalStatus::Completed, b"done", None)
        .await
        .expect("finish");
    tokio::time::timeout(BOUND, waiting)
        .await
        .expect("the finish's notification wakes the waiter")
        .expect("the waiter task")
        .expect("wait");
    // The last waiter gone, the channel is unsubscribed.
    until_subscribers(&mut raw, &format!("{prefix}k"), 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owners_release_wakes_a_waiter() {
    let url = common::redis_url();
    let prefix = common::unique_prefix("wake-release");
    let owner = store_at(&url, &prefix, NEVER).await;
    let waiter = store_at(&url, &prefix, NEVER).await;
    let token = owned(&owner, &waiter, "k").await;
    let waiting = tokio::spawn(async move { waiter.wait_for_change("k", Wait::new(MAX)).await });
    let mut raw = raw_at(&url).await;
    until_subscribers(&mut raw, &format!("{prefix}k"), 1).await;
    owner.release("k", token).await.expect("release");
    tokio::time::timeout(BOUND, waiting)
        .await
        .expect("the release's notification wakes the waiter")
        .expect("the waiter task")
        .expect("wait");
}

/// Many waiters of many keys share one subscription connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_share_one_subscription_connection() {
    let redis = common::PrivateRedis::start(&[]).await;
    let url = redis.url();
    let owner = store_at(&url, "w:", NEVER).await;
    let waiter = store_at(&url, "w:", NEVER).await;
    let mut tokens = Vec::new();
    let mut waiting = Vec::new();
    for i in 0..20 {
        let key = format!("k{i}");
        tokens.push((key.clone(), owned(&owner, &waiter, &key).await));
        for _ in 0..3 {
            let (waiter, key) = (waiter.clone(), key.clone());
            waiting.push(tokio::spawn(async move {
                wait_until_finished(&waiter, &key).await
            }));
        }
    }
    let mut raw = raw_at(&url).await;
    for (key, _) in &tokens {
        until_subscribers(&mut raw, &format!("w:{key}"), 1).await;
    }
    let clients: String = orchestrix_redis::redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut raw)
        .await
        .expect("CLIENT LIST");
    let subscribers = clients
        .lines()
        .filter(|line| line.contains(&format!("name={}", orchestrix_redis::SUBSCRIBER_NAME)))
        .count();
    assert_eq!(
        subscribers, 1,
        "one subscription connection for 60 waiters:\n{clients}"
    );
    for (key, token) in tokens {
        owner
            .finish(&key, token, FinalStatus::Completed, b"done", None)
            .await
            .expect("finish");
    }
    for waiting in waiting {
        tokio::time::timeout(BOUND, waiting)
            .await
            .expect("every waiter is woken")
            .expect("the waiter task");
    }
}

/// The subscription connection is killed while a waiter waits: the waiter is not lost, the
/// next wait subscribes again on a new connection, and the owner's finish wakes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_subscription_connection_does_not_lose_the_waiter() {
    let redis = common::PrivateRedis::start(&[]).await;
    let url = redis.url();
    let owner = store_at(&url, "w:", NEVER).await;
    let waiter = store_at(&url, "w:", NEVER).await;
    let token = owned(&owner, &waiter, "k").await;
    let waiting = tokio::spawn(async move { wait_until_finished(&waiter, "k").await });
    let mut raw = raw_at(&url).await;
    until_subscribers(&mut raw, "w:k", 1).await;
    let clients: String = orchestrix_redis::redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut raw)
        .await
        .expect("CLIENT LIST");
    let name = format!("name={}", orchestrix_redis::SUBSCRIBER_NAME);
    let id = clients
        .lines()
        .find(|line| line.contains(&name))
        .and_then(|line| line.strip_prefix("id="))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the subscription connection is listed")
        .to_owned();
    let killed: u64 = orchestrix_redis::redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(&id)
        .query_async(&mut raw)
        .await
        .expect("CLIENT KILL");
    assert_eq!(killed, 1, "the subscription connection was killed");
    // The waiter subscribes again by itself, on a new connection.
    until_subscribers(&mut raw, "w:k", 1).await;
    owner
        .finish("k", token, FinalStatus::Completed, b"done", None)
        .await
        .expect("finish");
    tokio::time::timeout(BOUND, waiting)
        .await
        .expect("the waiter is woken after its connection was replaced")
        .expect("the waiter task");
}

/// A change that publishes nothing (the record deleted by someone else) is caught by the
/// safety poll: the waiter returns long before its `max`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_without_a_notification_is_caught_by_the_safety_poll() {
    let url = common::redis_url();
    let prefix = common::unique_prefix("wake-safety");
    let owner = store_at(&url, &prefix, NEVER).await;
    let waiter = store_at(&url, &prefix, Duration::from_millis(200)).await;
    owned(&owner, &waiter, "k").await;
    let waiting = tokio::spawn(async move { wait_until_finished(&waiter, "k").await });
    let mut raw = raw_at(&url).await;
    until_subscribers(&mut raw, &format!("{prefix}k"), 1).await;
    let _: i64 = orchestrix_redis::redis::cmd("DEL")
        .arg(format!("{prefix}k"))
        .query_async(&mut raw)
        .await
        .expect("DEL");
    tokio::time::timeout(BOUND, waiting)
        .await
        .expect("the safety poll finds the record gone")
        .expect("the waiter task");
}
