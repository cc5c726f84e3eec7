//! The memory store against the shared store conformance suite.

use orchestrix::store::MemoryStore;

orchestrix_conformance::store_conformance_tests!(async { MemoryStore::new() });

mod journal {
    use orchestrix::store::MemoryStore;

    orchestrix_conformance::journal_conformance_tests!(async { MemoryStore::new() });

    #[tokio::test]
    async fn oversize_append_is_refused_and_appends_nothing() {
        let store = MemoryStore::new().with_max_journal_bytes(4096);
        orchestrix_conformance::journal::oversize_append_is_refused_and_appends_nothing(
            &store, 4096,
        )
        .await;
    }
}

mod admin {
    use orchestrix::store::MemoryStore;

    orchestrix_conformance::admin_conformance_tests!(async { MemoryStore::new() });
    orchestrix_conformance::admin_journal_conformance_tests!(async { MemoryStore::new() });

    #[tokio::test]
    async fn keyset_pages_hold_limit_records_in_key_order() {
        orchestrix_conformance::admin::keyset_pages_hold_limit_records_in_key_order(
            &MemoryStore::new(),
        )
        .await;
    }
}

mod memory_only {
    use std::time::Duration;

    use orchestrix::store::{
        FencingToken, IdempotencyStore, MemoryStore, RecordStatus, StartOutcome, StartRequest, Wait,
    };

    fn request<'a>(key: &'a str, fingerprint: &'a str) -> StartRequest<'a> {
        StartRequest {
            key,
            fingerprint: Some(fingerprint),
            lease: Duration::from_secs(60),
            rerun_failed: false,
        }
    }

    async fn acquire(store: &MemoryStore, key: &str, fingerprint: &str) -> Option<FencingToken> {
        match store.start(request(key, fingerprint)).await {
            Ok(StartOutcome::Acquired(token)) => Some(token),
            _ => None,
        }
    }

    /// The table is rebuilt several times while 20,000 records go in; every one must still
    /// be found afterwards, with its own status, fingerprint and result.
    #[tokio::test]
    async fn records_stay_reachable_as_the_table_grows() {
        let store = MemoryStore::new();
        for i in 0..20_000u32 {
            let (key, fp) = (format!("grow-{i}"), format!("fp-{i}"));
            let token = acquire(&store, &key, &fp).await;
            assert!(token.is_some(), "{key} was not free");
            let Some(token) = token else { return };
            let result = i.to_le_bytes();
            let finished = match i % 3 {
                0 => store.complete(&key, token, &result, None).await,
                1 => store.fail(&key, token, &result, None).await,
                _ => Ok(()), // left running
            };
            assert!(finished.is_ok(), "{key}: {finished:?}");
        }
        assert_eq!(store.len(), 20_000);
        for i in 0..20_000u32 {
            let (key, fp) = (format!("grow-{i}"), format!("fp-{i}"));
            let record = match store.start(request(&key, &fp)).await {
                Ok(StartOutcome::Existing(record)) => record,
                other => panic!("{key}: expected the stored record, got {other:?}"),
            };
            let (status, result) = match i % 3 {
                0 => (RecordStatus::Completed, Some(i.to_le_bytes().to_vec())),
                1 => (RecordStatus::Failed, Some(i.to_le_bytes().to_vec())),
                _ => (RecordStatus::Running, None),
            };
            assert_eq!(record.key, key);
            assert_eq!(record.status, status, "{key}");
            assert_eq!(record.fingerprint.as_deref(), Some(fp.as_str()));
            assert_eq!(record.result, result, "{key}");
        }
        assert_eq!(store.len(), 20_000);
    }

    /// Bounded memory with a TTL: expired records are removed a couple per operation, by
    /// whatever operations follow, without a scan of the whole table.
    #[tokio::test(start_paused = true)]
    async fn expired_records_are_swept_by_later_operations() {
        let store = MemoryStore::new();
        let ttl = Some(Duration::from_secs(1));
        for i in 0..1_000 {
            let key = format!("old-{i}");
            if let Some(token) = acquire(&store, &key, "fp").await {
                assert!(store.complete(&key, token, b"r", ttl).await.is_ok());
            }
        }
        assert_eq!(store.len(), 1_000);
        tokio::time::advance(Duration::from_secs(2)).await;
        // 500 operations on other keys (each also schedules its own expiry) remove the
        // 1,000 expired records: two per operation.
        for i in 0..500 {
            let key = format!("new-{i}");
            if let Some(token) = acquire(&store, &key, "fp").await {
                assert!(store.complete(&key, token, b"r", ttl).await.is_ok());
            }
        }
        assert_eq!(store.len(), 500, "only the live records remain");
        for i in 0..1_000 {
            assert!(matches!(store.get(&format!("old-{i}")).await, Ok(None)));
        }
    }

    /// A record whose lease was renewed is not removed by its earlier, outdated expiry.
    #[tokio::test(start_paused = true)]
    async fn a_renewed_record_outlives_its_first_deadline() {
        let store = MemoryStore::new();
        let token = acquire(&store, "renewed", "fp").await;
        let Some(token) = token else {
            panic!("key not acquired")
        };
        tokio::time::advance(Duration::from_secs(50)).await;
        assert!(
            store
                .renew("renewed", token, Duration::from_secs(60))
                .await
                .is_ok()
        );
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(matches!(store.cleanup().await, Ok(0)));
        let record = store.get("renewed").await.ok().flatten();
        assert_eq!(
            record.map(|r| (r.status, r.token)),
            Some((RecordStatus::Running, token))
        );
    }

    /// How long `wait_for_change` on `key` takes (on tokio's paused clock) while `act`
    /// runs beside it.
    async fn waited_while(
        store: &MemoryStore,
        key: &str,
        act: impl std::future::Future<Output = ()>,
    ) -> Duration {
        let started = tokio::time::Instant::now();
        let waiter = async {
            assert!(
                store
                    .wait_for_change(key, Wait::new(Duration::from_secs(600)))
                    .await
                    .is_ok()
            );
            started.elapsed()
        };
        tokio::join!(waiter, act).0
    }

    /// Waiters are woken by every way a running record ends — finish, release, delete —
    /// at that moment, not at their timeout; and each wake-up leaves the next wait working.
    #[tokio::test(start_paused = true)]
    async fn waiters_wake_when_the_record_finishes_is_released_or_deleted() {
        let store = MemoryStore::new();
        let second = Duration::from_secs(1);
        for round in 0..2 {
            let Some(token) = acquire(&store, "w", "fp").await else {
                panic!("round {round}: key not acquired")
            };
            let waited = waited_while(&store, "w", async {
                tokio::time::sleep(second).await;
                assert!(store.release("w", token).await.is_ok());
            })
            .await;
            assert_eq!(waited, second, "round {round}: release");
        }
        let Some(token) = acquire(&store, "w", "fp").await else {
            panic!("key not acquired")
        };
        let waited = waited_while(&store, "w", async {
            tokio::time::sleep(second).await;
            assert!(store.delete("w").await.is_ok());
        })
        .await;
        assert_eq!(waited, second, "delete");
        let Some(token2) = acquire(&store, "w", "fp").await else {
            panic!("key not acquired after delete")
        };
        assert_ne!(token, token2);
        let waited = waited_while(&store, "w", async {
            tokio::time::sleep(second).await;
            assert!(store.complete("w", token2, b"r", None).await.is_ok());
        })
        .await;
        assert_eq!(waited, second, "complete");
        // A finished record is not waited on at all.
        let waited = waited_while(&store, "w", async {}).await;
        assert_eq!(waited, Duration::ZERO);
    }

    /// An owner that never finishes (a crash) still frees its waiters: when its lease
    /// lapses, not at their timeout.
    #[tokio::test(start_paused = true)]
    async fn waiters_wake_when_a_crashed_owners_lease_lapses() {
        let store = MemoryStore::new();
        assert!(acquire(&store, "crashed", "fp").await.is_some());
        let waited = waited_while(&store, "crashed", async {}).await;
        assert_eq!(waited, Duration::from_secs(60), "the lease of `request`");
        assert!(matches!(store.get("crashed").await, Ok(None)));
    }
}
