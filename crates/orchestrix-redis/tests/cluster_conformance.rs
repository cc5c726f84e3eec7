//! The shared conformance suites (store, journal, record admin) against a real Redis
//! Cluster of three primaries and three replicas (`REDIS_CLUSTER_NODES`, started by
//! `scripts/services.sh`), and the admin's listing across every primary.

mod common;

mod store {
    use super::common;
    orchestrix_conformance::store_conformance_tests!(async {
        common::cluster_store("cluster-conformance").await
    });
}

mod journal {
    use super::common;
    orchestrix_conformance::journal_conformance_tests!(async {
        common::cluster_store("cluster-journal").await
    });
}

mod admin {
    use super::common;
    orchestrix_conformance::admin_conformance_tests!(common::cluster_store("cluster-admin"));
    orchestrix_conformance::admin_journal_conformance_tests!(common::cluster_store(
        "cluster-admin-journal"
    ));
}

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use orchestrix::store::{IdempotencyStore, ListRequest, Listed, StartOutcome, Wait};
use orchestrix_conformance::request;
use orchestrix_redis::redis::{Value, from_redis_value_ref};

/// A plain connection to one node of the cluster, to ask it about the cluster.
async fn one_node() -> orchestrix_redis::redis::aio::MultiplexedConnection {
    orchestrix_redis::redis::Client::open(common::cluster_nodes()[0].as_str())
        .expect("a node URL")
        .get_multiplexed_async_connection()
        .await
        .expect("a cluster node answers")
}

/// The primaries by the first slot of each range they serve, as the cluster reports them.
async fn primaries() -> BTreeMap<u16, String> {
    let mut conn = one_node().await;
    let slots: Vec<Vec<Value>> = orchestrix_redis::redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut conn)
        .await
        .expect("CLUSTER SLOTS");
    slots
        .into_iter()
        .map(|range| {
            let first: u16 = from_redis_value_ref(&range[0]).expect("a slot");
            let (ip, port): (String, u16) = match &range[2] {
                Value::Array(node) => (
                    from_redis_value_ref(&node[0]).expect("an address"),
                    from_redis_value_ref(&node[1]).expect("a port"),
                ),
                other => panic!("CLUSTER SLOTS names the primary, got {other:?}"),
            };
            (first, format!("{ip}:{port}"))
        })
        .collect()
}

/// The listing walks every primary: keys spread over all three show up, each exactly once,
/// through pages small enough that the listing must carry its cursor from node to node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_walks_every_primary_of_the_cluster() {
    let store = common::cluster_store("cluster-list").await;
    let keys: Vec<String> = (0..60).map(|i| format!("order-{i}")).collect();
    for key in &keys {
        let acquired = store.start(request(key, None)).await.expect("start");
        let StartOutcome::Acquired(token) = acquired else {
            panic!("a fresh key is acquired, got {acquired:?}");
        };
        store
            .finish(
                key,
                token,
                orchestrix::store::FinalStatus::Completed,
                b"ok",
                Some(Duration::from_secs(600)),
            )
            .await
            .expect("complete");
    }
    let nodes = primaries().await;
    let mut conn = one_node().await;
    let mut spread = BTreeSet::new();
    for key in &keys {
        let slot: u16 = orchestrix_redis::redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(format!("{}{key}", store.key_prefix()))
            .query_async(&mut conn)
            .await
            .expect("CLUSTER KEYSLOT");
        if let Some((_, node)) = nodes.range(..=slot).next_back() {
            spread.insert(node.clone());
        }
    }
    assert_eq!(
        spread.len(),
        3,
        "the test's keys must live on all three primaries"
    );

    let admin = store.admin().expect("the Redis store offers an admin");
    let mut listed = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = admin
            .list(ListRequest::new("").limit(7).cursor(cursor.as_deref()))
            .await
            .expect("list");
        pages += 1;
        for row in page.records {
            match row {
                Listed::Record(info) => listed.push(info.key),
                other => panic!("only well-formed records were written, got {other:?}"),
            }
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
        assert!(pages < 1_000, "the listing must end");
    }
    listed.sort();
    let mut expected = keys.clone();
    expected.sort();
    assert_eq!(listed, expected, "every record listed exactly once");
}

/// A store on the cluster that waits for `replicas` replicas after acquires and finishes.
async fn waiting_store(test: &str, replicas: u32) -> orchestrix_redis::RedisStore {
    orchestrix_redis::RedisStore::cluster(common::cluster_nodes())
        .key_prefix(common::unique_prefix(test))
        .wait_for_replicas(replicas, Duration::from_millis(500))
        .connect()
        .await
        .expect("the cluster answers")
}

/// Each primary has one replica: waiting for it lets runs acquire and finish as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_the_replica_acquires_and_finishes() {
    let store = waiting_store("cluster-wait", 1).await;
    let StartOutcome::Acquired(token) = store.start(request("k", None)).await.expect("start")
    else {
        panic!("a fresh key is acquired");
    };
    store
        .finish(
            "k",
            token,
            orchestrix::store::FinalStatus::Completed,
            b"ok",
            None,
        )
        .await
        .expect("the finish reached the replica");
    let record = store.get("k").await.expect("get").expect("the record");
    assert_eq!(record.result.as_deref(), Some(&b"ok"[..]));
}

/// Two replicas never confirm (each primary has one): the acquire is refused with a backend
/// error, and the key is given back rather than left running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_the_replicas_do_not_confirm_is_refused_and_released() {
    let store = waiting_store("cluster-wait-refused", 2).await;
    let started = store.start(request("k", None)).await;
    assert!(
        matches!(started, Err(orchestrix::store::StoreError::Backend(_))),
        "an unconfirmed acquire is a backend error, got {started:?}"
    );
    assert!(
        store.get("k").await.expect("get").is_none(),
        "the unconfirmed acquire is released"
    );
}

/// On a cluster the finish publishes on the key's shard (`SPUBLISH`), and the waiter of
/// another store instance, subscribed there (`SSUBSCRIBE`), is woken by it: its safety poll
/// is an hour, its `max` two minutes, and the test gives it ten seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owners_finish_wakes_a_waiter_on_the_cluster() {
    let prefix = common::unique_prefix("cluster-wake");
    let store = || async {
        orchestrix_redis::RedisStore::cluster(common::cluster_nodes())
            .key_prefix(&prefix)
            .safety_poll_interval(Duration::from_secs(3600))
            .connect()
            .await
            .expect("the cluster answers")
    };
    let (owner, waiter) = (store().await, store().await);
    let mut keys = Vec::new();
    // Keys on every shard.
    for i in 0..12 {
        let key = format!("k{i}");
        let StartOutcome::Acquired(token) = owner.start(request(&key, None)).await.expect("start")
        else {
            panic!("a fresh key is acquired");
        };
        keys.push((key, token));
    }
    let mut waiting = Vec::new();
    for (key, _) in &keys {
        let (waiter, key) = (waiter.clone(), key.clone());
        waiting.push(tokio::spawn(async move {
            waiter
                .wait_for_change(&key, Wait::new(Duration::from_secs(120)))
                .await
        }));
    }
    // Every channel subscribed on its shard's primary before the owner finishes.
    let cluster = orchestrix_redis::redis::cluster::ClusterClient::new(common::cluster_nodes())
        .expect("nodes");
    let mut conn = cluster
        .get_async_connection()
        .await
        .expect("the cluster answers");
    for (key, _) in &keys {
        let channel = format!("{prefix}{key}");
        let subscribed = async {
            loop {
                let (_, n): (String, u64) = orchestrix_redis::redis::cmd("PUBSUB")
                    .arg("SHARDNUMSUB")
                    .arg(&channel)
                    .query_async(&mut conn)
                    .await
                    .expect("PUBSUB SHARDNUMSUB");
                if n == 1 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), subscribed)
            .await
            .expect("the waiter subscribes on the key's shard");
    }
    for (key, token) in &keys {
        owner
            .finish(
                key,
                *token,
                orchestrix::store::FinalStatus::Completed,
                b"ok",
                None,
            )
            .await
            .expect("finish");
    }
    for waiting in waiting {
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the finish's notification wakes the waiter")
            .expect("the waiter task")
            .expect("wait");
    }
}
