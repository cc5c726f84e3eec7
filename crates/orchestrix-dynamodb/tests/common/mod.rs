//! What every test file needs: a client for the local DynamoDB-compatible server
//! (`DYNAMODB_ENDPOINT`, started by `scripts/test`) and a store on a table of its own.
#![allow(dead_code)] // each test binary uses its own part of this module

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::interceptors::BeforeDeserializationInterceptorContextMut;
use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::config::{
    BehaviorVersion, ConfigBag, Credentials, Intercept, Region, RuntimeComponents,
};
use aws_sdk_dynamodb::error::BoxError;
use orchestrix_dynamodb::{DynamoOptions, DynamoStore};
use tokio::sync::OnceCell;

/// Names the table a test binary (and the child processes it spawns) shares.
pub const TABLE_ENV: &str = "ORCHESTRIX_DYNAMODB_TABLE";

/// The endpoint of the local server.
pub fn endpoint() -> String {
    std::env::var("DYNAMODB_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "DYNAMODB_ENDPOINT is not set: run the tests through scripts/test, which starts a \
             DynamoDB-compatible server on loopback and exports it"
        )
    })
}

/// A client for `endpoint` with dummy credentials, short timeouts and two attempts: what
/// a production client should also configure, with values fitting its network.
pub fn client_for(endpoint: &str) -> Client {
    Client::from_conf(config_for(endpoint).build())
}

/// A client for the local server whose responses `lose` can lose.
pub fn client_losing(lose: &LoseResponses) -> Client {
    Client::from_conf(config_for(&endpoint()).interceptor(lose.clone()).build())
}

/// Loses a response, as a network can: the server applied the request, the client sees a
/// server error (HTTP 500) instead of the answer, and the SDK sends the same request
/// again. Counts the responses since it was armed.
#[derive(Debug, Clone, Default)]
pub struct LoseResponses {
    /// Which response to lose, counting from 1 since `arm`; 0 for none.
    target: Arc<AtomicUsize>,
    seen: Arc<AtomicUsize>,
}

impl LoseResponses {
    /// Loses the `nth` response from now (1: the next one); 0 loses none, and only counts.
    pub fn arm(&self, nth: usize) {
        self.seen.store(0, Ordering::SeqCst);
        self.target.store(nth, Ordering::SeqCst);
    }

    /// How many responses came back since the last `arm`, the lost one included.
    pub fn seen(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }

    /// Whether the response it was armed to lose was lost.
    pub fn spent(&self) -> bool {
        self.target.load(Ordering::SeqCst) == 0
    }
}

impl Intercept for LoseResponses {
    fn name(&self) -> &'static str {
        "LoseResponses"
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let nth = self.seen.fetch_add(1, Ordering::SeqCst) + 1;
        let lose = self
            .target
            .compare_exchange(nth, 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if lose {
            *context.response_mut().status_mut() = 500u16.try_into()?;
        }
        Ok(())
    }
}

fn config_for(endpoint: &str) -> aws_sdk_dynamodb::config::Builder {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(1))
        .operation_attempt_timeout(Duration::from_secs(10))
        .operation_timeout(Duration::from_secs(20))
        .build();
    let region = std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".to_owned());
    aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region))
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        .endpoint_url(endpoint)
        .timeout_config(timeouts)
        .retry_config(RetryConfig::standard().with_max_attempts(2))
}

/// A client for the local server.
pub fn client() -> Client {
    client_for(&endpoint())
}

/// A table name no other test binary or run uses.
pub fn unique_table(what: &str) -> String {
    format!("orchestrix-{what}-{:016x}", fastrand::u64(..))
}

/// This binary's table: inherited from the parent process, or made up once.
pub fn shared_table() -> &'static str {
    static TABLE: OnceLock<String> = OnceLock::new();
    TABLE.get_or_init(|| std::env::var(TABLE_ENV).unwrap_or_else(|_| unique_table("tests")))
}

/// Options for the shared table, with a small skew allowance: the conformance suite
/// watches 300 ms leases lapse within 800 ms.
pub fn options() -> DynamoOptions {
    DynamoOptions::new(shared_table()).clock_skew(Duration::from_millis(100))
}

/// A store on this binary's table, created on first use. Each test gets its own client,
/// since each `#[tokio::test]` has its own runtime and the client's connections live on
/// the runtime that opened them.
pub async fn store() -> DynamoStore {
    static CREATED: OnceCell<()> = OnceCell::const_new();
    let store = DynamoStore::new(client(), options()).expect("valid options");
    CREATED
        .get_or_init(|| async {
            store
                .create_table_if_missing()
                .await
                .expect("create the test table");
        })
        .await;
    store
}
