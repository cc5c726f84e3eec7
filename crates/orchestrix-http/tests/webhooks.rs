//! The `webhooks` example's router, over real HTTP on 127.0.0.1: a redelivered payment
//! event is processed once per sender.

#[path = "../examples/webhooks/app.rs"]
#[allow(dead_code)]
mod app;
mod common;

use std::sync::Arc;

use axum::http::{Method, StatusCode};
use orchestrix::store::MemoryStore;

use common::{Http, Reply, full, serve};

async fn receiver() -> (Http, Arc<app::Ledger>) {
    let (router, ledger) = app::router(Arc::new(MemoryStore::new())).expect("valid layer");
    (Http::new(serve(router).await), ledger)
}

fn event(id: &str, kind: &str, amount: i64) -> String {
    serde_json::json!({ "id": id, "type": kind, "amount": amount }).to_string()
}

const ACME: &[(&str, &str)] = &[
    ("authorization", "Bearer acme-secret"),
    ("content-type", "application/json"),
];
const GLOBEX: &[(&str, &str)] = &[
    ("authorization", "Bearer globex-secret"),
    ("content-type", "application/json"),
];

/// Delivers `body` as `sender` with the event id `key`.
async fn deliver(http: &Http, sender: &[(&str, &str)], key: Option<&str>, body: &str) -> Reply {
    http.post_with("/webhooks/payments", key.map(str::as_bytes), sender, body)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_event_is_processed_once() {
    let (http, ledger) = receiver().await;
    let body = event("evt_1", "payment.succeeded", 4200);
    let first = deliver(&http, ACME, Some("evt_1"), &body).await;
    let redelivery = deliver(&http, ACME, Some("evt_1"), &body).await;

    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.json()["sequence"], 1);
    assert!(redelivery.replayed());
    assert_eq!(redelivery.body, first.body);
    assert_eq!(
        ledger.stats(),
        app::Stats {
            processed: 1,
            balance: 4200
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_redeliveries_are_processed_once_and_all_acknowledged() {
    let (http, ledger) = receiver().await;
    let body = event("evt_storm", "payment.succeeded", 100);
    let deliveries: Vec<_> = (0..20)
        .map(|_| {
            let (http, body) = (http.clone(), body.clone());
            tokio::spawn(async move { deliver(&http, ACME, Some("evt_storm"), &body).await })
        })
        .collect();
    for delivery in deliveries {
        assert_eq!(delivery.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(
        ledger.stats(),
        app::Stats {
            processed: 1,
            balance: 100
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_events_are_each_processed_and_stats_report_them() {
    let (http, _ledger) = receiver().await;
    deliver(
        &http,
        ACME,
        Some("evt_a"),
        &event("evt_a", "payment.succeeded", 500),
    )
    .await;
    deliver(
        &http,
        ACME,
        Some("evt_b"),
        &event("evt_b", "payment.refunded", 200),
    )
    .await;
    let stats = http.send(Method::GET, "/stats", None, full("")).await;
    assert_eq!(stats.status, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<app::Stats>(&stats.body).unwrap(),
        app::Stats {
            processed: 2,
            balance: 300
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_without_a_key_is_refused() {
    let (http, ledger) = receiver().await;
    deliver(&http, ACME, None, &event("evt_x", "payment.succeeded", 1))
        .await
        .problem(StatusCode::BAD_REQUEST);
    assert_eq!(ledger.stats().processed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_senders_with_the_same_event_id_are_each_processed_once() {
    let (http, ledger) = receiver().await;
    let body = event("evt_1", "payment.succeeded", 100);
    let acme = deliver(&http, ACME, Some("evt_1"), &body).await;
    let globex = deliver(&http, GLOBEX, Some("evt_1"), &body).await;
    assert_eq!(
        (acme.status, globex.status),
        (StatusCode::OK, StatusCode::OK)
    );
    assert!(!globex.replayed(), "globex's event is its own");
    assert_eq!(acme.json()["sender"], "acme-pay");
    assert_eq!(globex.json()["sender"], "globex");
    assert_ne!(acme.json()["ledger_key"], globex.json()["ledger_key"]);

    let acme_again = deliver(&http, ACME, Some("evt_1"), &body).await;
    assert!(acme_again.replayed());
    assert_eq!(acme_again.body, acme.body);
    assert_eq!(
        ledger.stats(),
        app::Stats {
            processed: 2,
            balance: 200
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_from_an_unknown_sender_is_refused() {
    let (http, ledger) = receiver().await;
    let body = event("evt_1", "payment.succeeded", 100);
    let stranger = &[
        ("authorization", "Bearer guessed"),
        ("content-type", "application/json"),
    ];
    let reply = deliver(&http, stranger, Some("evt_1"), &body).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let anonymous = deliver(
        &http,
        &[("content-type", "application/json")],
        Some("evt_1"),
        &body,
    )
    .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(ledger.stats().processed, 0);
}
