//! Metrics and spans: what a run reports to a recorder and to a `tracing` subscriber.
//!
//! Both are captured on the test's own thread (a thread-local recorder, a default
//! subscriber), with a current-thread runtime, so the tests never see each other.
//!
//! One thing is process-wide: `tracing` caches whether a span callsite is enabled the first
//! time any thread reaches it. A test running without a subscriber would cache "never" for
//! the engine's spans and blind a parallel test that captures them, so every test that
//! captures spans first installs a global default subscriber ([`capture_spans`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{
    Counter, CounterFn, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use orchestrix::store::MemoryStore;
use orchestrix::{Flow, RetryPolicy, RunOptions, Step, StepError};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{Layer, Registry};

/// A metric's name and labels, as `name{k=v,...}` with labels sorted.
fn id(key: &Key) -> String {
    let mut labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

#[derive(Default)]
struct Value(AtomicU64);

impl CounterFn for Value {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::SeqCst);
    }
}

impl metrics::GaugeFn for Value {
    fn increment(&self, _value: f64) {}
    fn decrement(&self, _value: f64) {}
    fn set(&self, value: f64) {
        self.0.store(value as u64, Ordering::SeqCst);
    }
}

impl HistogramFn for Value {
    fn record(&self, _value: f64) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Counters (their totals) and histograms (how many values) by `id`.
#[derive(Default, Clone)]
struct Captured(Arc<Mutex<BTreeMap<String, Arc<Value>>>>);

impl Captured {
    fn handle(&self, key: &Key) -> Arc<Value> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(map.entry(id(key)).or_default())
    }
    fn get(&self, id: &str) -> u64 {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(id).map_or(0, |v| v.0.load(Ordering::SeqCst))
    }
    fn ids(&self) -> Vec<String> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.keys().cloned().collect()
    }
}

impl Recorder for Captured {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.handle(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.handle(key))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.handle(key))
    }
}

/// Sends this thread's spans to `spans` until the guard drops. A global default subscriber
/// is installed once so that no callsite is ever cached as disabled (see the module docs).
fn capture_spans(spans: &Spans) -> tracing::subscriber::DefaultGuard {
    static GLOBAL: std::sync::Once = std::sync::Once::new();
    GLOBAL.call_once(|| {
        let _ = tracing::subscriber::set_global_default(Registry::default());
    });
    tracing::callsite::rebuild_interest_cache();
    tracing::subscriber::set_default(Registry::default().with(spans.clone()))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `charge` (fails when the input is 0, once first when it is 1) then `ship`.
fn flow() -> Flow<u64, u64> {
    let flaky = Arc::new(AtomicU64::new(0));
    Flow::<u64, u64>::builder("checkout")
        .store(Arc::new(MemoryStore::new()))
        .then(
            Step::new("charge", move |ctx| {
                let flaky = Arc::clone(&flaky);
                async move {
                    match *ctx.input() {
                        0 => Err(StepError::msg("declined")),
                        1 if flaky.fetch_add(1, Ordering::SeqCst) == 0 => {
                            Err(StepError::msg("gateway busy"))
                        }
                        _ => Ok(()),
                    }
                }
            })
            .retry(RetryPolicy::retries(1).fixed(Duration::from_millis(1))),
        )
        .step("ship", |_ctx| async { Ok(()) })
        .output(|ctx| Ok(*ctx.input()))
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn runs_are_counted_by_outcome_with_flow_and_step_labels_only() {
    let captured = Captured::default();
    let _recorder = metrics::set_default_local_recorder(&captured);
    let flow = flow();
    runtime().block_on(async {
        let _ = flow.run(7, RunOptions::key("order-7")).await;
        let _ = flow.run(7, RunOptions::key("order-7")).await;
        let _ = flow.run(8, RunOptions::key("order-7")).await;
        let _ = flow.run(0, RunOptions::key("order-0")).await;
        let _ = flow.run(1, RunOptions::new()).await;
    });
    let runs = |outcome: &str| {
        captured.get(&format!(
            "orchestrix_runs_total{{flow=checkout,outcome={outcome}}}"
        ))
    };
    assert_eq!(
        runs("executed"),
        3,
        "order-7, order-0 (failed) and the unkeyed run"
    );
    assert_eq!(runs("replayed"), 1);
    assert_eq!(runs("key_reused"), 1);
    assert_eq!(runs("running"), 0);
    assert_eq!(
        captured.get("orchestrix_flow_duration_seconds{flow=checkout,status=completed}"),
        2
    );
    assert_eq!(
        captured.get("orchestrix_flow_duration_seconds{flow=checkout,status=failed}"),
        1
    );
    // 1 (order-7) + 2 (order-0: declined, retried, declined) + 2 (the flaky unkeyed run).
    assert_eq!(
        captured.get("orchestrix_step_attempts_total{flow=checkout,step=charge}"),
        5
    );
    assert_eq!(
        captured.get("orchestrix_step_retries_total{flow=checkout,step=charge}"),
        2
    );
    assert_eq!(
        captured.get("orchestrix_step_duration_seconds{flow=checkout,status=failed,step=charge}"),
        1
    );
    // Labels are fixed words and names: never a key or a payload.
    for id in captured.ids() {
        assert!(!id.contains("order-"), "a key leaked into {id}");
    }
}

#[test]
fn a_flow_built_without_a_recorder_records_nothing_even_under_one_later() {
    let flow = flow();
    let captured = Captured::default();
    let _recorder = metrics::set_default_local_recorder(&captured);
    runtime().block_on(async {
        let _ = flow.run(7, RunOptions::key("order-7")).await;
    });
    assert!(
        captured
            .ids()
            .iter()
            .all(|id| !id.starts_with("orchestrix_runs_total")),
        "{:?}",
        captured.ids()
    );
}

#[test]
fn a_run_that_could_not_store_its_outcome_is_counted_as_such() {
    let captured = Captured::default();
    let _recorder = metrics::set_default_local_recorder(&captured);
    let flow = Flow::<f64, f64>::builder("nan")
        .step("s", |_ctx| async { Ok(()) })
        .output(|_ctx| Ok(f64::NAN))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    runtime().block_on(async {
        let _ = flow.run(1.0, RunOptions::key("k")).await;
    });
    assert_eq!(
        captured.get("orchestrix_runs_total{flow=nan,outcome=not_persisted}"),
        1
    );
}

/// One span: its name, its fields, and the events recorded in it.
#[derive(Debug, Clone, Default)]
struct CapturedSpan {
    name: String,
    fields: BTreeMap<String, String>,
    events: Vec<BTreeMap<String, String>>,
}

#[derive(Default, Clone)]
struct Spans(Arc<Mutex<Vec<CapturedSpan>>>);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

/// The index of a span in `Spans`, kept in the span's extensions.
struct Index(usize);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Spans {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
        let mut span = CapturedSpan {
            name: attrs.metadata().name().to_owned(),
            ..CapturedSpan::default()
        };
        attrs.record(&mut Fields(&mut span.fields));
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.push(span);
        if let Some(s) = ctx.span(id) {
            s.extensions_mut().insert(Index(all.len() - 1));
        }
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: LayerContext<'_, S>) {
        let Some(s) = ctx.span(id) else { return };
        let Some(Index(i)) = s.extensions().get::<Index>().map(|i| Index(i.0)) else {
            return;
        };
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(span) = all.get_mut(i) {
            values.record(&mut Fields(&mut span.fields));
        }
    }
    fn on_event(&self, event: &Event<'_>, ctx: LayerContext<'_, S>) {
        let Some(s) = ctx.event_span(event) else {
            return;
        };
        let Some(Index(i)) = s.extensions().get::<Index>().map(|i| Index(i.0)) else {
            return;
        };
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(span) = all.get_mut(i) {
            span.events.push(fields);
        }
    }
}

impl Spans {
    fn named(&self, name: &str) -> Vec<CapturedSpan> {
        let all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.iter().filter(|s| s.name == name).cloned().collect()
    }
    fn clear(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

#[test]
fn spans_carry_the_workflow_attributes_and_retries_are_events() {
    let spans = Spans::default();
    let _subscriber = capture_spans(&spans);
    let flow = flow();
    runtime().block_on(async {
        let _ = flow.run(1, RunOptions::key("order-1")).await;
    });
    let flows = spans.named("flow");
    assert_eq!(flows.len(), 1);
    let f = &flows[0].fields;
    assert_eq!(f.get("workflow.name").map(String::as_str), Some("checkout"));
    assert_eq!(
        f.get("workflow.execution.id").map(String::as_str),
        Some("checkout:order-1")
    );
    assert_eq!(
        f.get("workflow.execution.result").map(String::as_str),
        Some("success")
    );
    assert_eq!(f.get("replayed").map(String::as_str), Some("false"));
    let steps = spans.named("step");
    let task = |s: &CapturedSpan, k: &str| s.fields.get(k).cloned().unwrap_or_default();
    let names: Vec<_> = steps
        .iter()
        .map(|s| task(s, "workflow.task.name"))
        .collect();
    assert_eq!(names, ["charge", "ship"]);
    assert!(
        steps
            .iter()
            .all(|s| task(s, "workflow.task.run.result") == "success")
    );
    assert_eq!(task(&steps[0], "attempts"), "2");
    // The failed first attempt is an event of charge's span, with the attempt and delay.
    let retry = steps[0]
        .events
        .iter()
        .find(|e| e.get("attempt").map(String::as_str) == Some("1"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(retry.get("retry_in_ms").map(String::as_str), Some("1"));

    // A replay is one flow span, marked, with no step span.
    spans.clear();
    runtime().block_on(async {
        let _ = flow.run(1, RunOptions::key("order-1")).await;
    });
    let flows = spans.named("flow");
    assert_eq!(flows.len(), 1);
    assert_eq!(
        flows[0].fields.get("replayed").map(String::as_str),
        Some("true")
    );
    assert!(spans.named("step").is_empty());
}

#[test]
fn a_failing_step_is_a_failure_and_a_panicking_one_an_error() {
    let spans = Spans::default();
    let _subscriber = capture_spans(&spans);
    let panicking = Flow::<u64, ()>::builder("p")
        .step("boom", |_ctx| async { panic!("bug") })
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let flow = flow();
    runtime().block_on(async {
        let _ = flow.run(0, RunOptions::new()).await;
        let _ = panicking.run(0, RunOptions::new()).await;
    });
    let results: Vec<_> = spans
        .named("step")
        .iter()
        .map(|s| {
            s.fields
                .get("workflow.task.run.result")
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(results, ["failure", "error"]);
    let flows = spans.named("flow");
    assert!(flows.iter().all(|f| {
        f.fields
            .get("workflow.execution.result")
            .map(String::as_str)
            == Some("failure")
    }));
    // A run without a key gets a run id as its execution id.
    assert!(flows.iter().all(|f| {
        f.fields
            .get("workflow.execution.id")
            .is_some_and(|id| id.len() == 32)
    }));
}

/// A memory store that says it is some other kind of store (so its calls are timed), and
/// whose `start` fails while `down` is set.
#[derive(Debug, Default)]
struct Elsewhere {
    inner: MemoryStore,
    down: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl orchestrix::store::IdempotencyStore for Elsewhere {
    async fn get(
        &self,
        key: &str,
    ) -> Result<Option<orchestrix::store::Record>, orchestrix::store::StoreError> {
        self.inner.get(key).await
    }
    async fn start(
        &self,
        req: orchestrix::store::StartRequest<'_>,
    ) -> Result<orchestrix::store::StartOutcome, orchestrix::store::StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(orchestrix::store::StoreError::backend_msg(
                "connection refused",
            ));
        }
        self.inner.start(req).await
    }
    async fn finish(
        &self,
        key: &str,
        token: orchestrix::store::FencingToken,
        status: orchestrix::store::FinalStatus,
        result: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), orchestrix::store::StoreError> {
        self.inner.finish(key, token, status, result, ttl).await
    }
    async fn renew(
        &self,
        key: &str,
        token: orchestrix::store::FencingToken,
        lease: Duration,
    ) -> Result<(), orchestrix::store::StoreError> {
        self.inner.renew(key, token, lease).await
    }
    async fn release(
        &self,
        key: &str,
        token: orchestrix::store::FencingToken,
    ) -> Result<(), orchestrix::store::StoreError> {
        self.inner.release(key, token).await
    }
    async fn delete(&self, key: &str) -> Result<(), orchestrix::store::StoreError> {
        self.inner.delete(key).await
    }
}

#[test]
fn store_calls_are_timed_and_their_failures_counted_by_kind() {
    let captured = Captured::default();
    let _recorder = metrics::set_default_local_recorder(&captured);
    let store = Arc::new(Elsewhere::default());
    let flow = Flow::<u64, ()>::builder("remote")
        .store(Arc::clone(&store) as Arc<dyn orchestrix::store::IdempotencyStore>)
        .step("s", |_ctx| async { Ok(()) })
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    runtime().block_on(async {
        let _ = flow.run(1, RunOptions::key("a")).await;
        store.down.store(true, Ordering::SeqCst);
        let _ = flow.run(1, RunOptions::key("b")).await;
    });
    let op = |name: &str| {
        captured.get(&format!(
            "orchestrix_store_operation_duration_seconds{{operation={name},store=custom}}"
        ))
    };
    assert_eq!((op("start"), op("finish")), (2, 1));
    assert_eq!(
        captured.get("orchestrix_store_errors_total{kind=backend,operation=start,store=custom}"),
        1
    );
    assert_eq!(
        captured.get("orchestrix_runs_total{flow=remote,outcome=error}"),
        1
    );
}
