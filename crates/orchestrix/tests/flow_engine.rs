//! The flow engine's behaviour: order, state, retries, timeouts, compensation, parallel
//! groups, cancellation, validation, hooks and the logger. Delays run on tokio's paused
//! clock, so no test depends on wall time.

use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orchestrix::{
    BuildError, CancellationToken, ConsoleLogger, Event, Flow, FlowError, FlowResult, LogLevel,
    Parallel, RetryPolicy, RunOptions, Status, Step, StepError,
};
use tokio::time::Instant;

type Log = Arc<Mutex<Vec<String>>>;

fn log() -> Log {
    Arc::default()
}

fn entries(log: &Log) -> Vec<String> {
    log.lock().map(|l| l.clone()).unwrap_or_default()
}

/// A step that appends `name` to `log` and succeeds.
fn record(log: &Log, name: &'static str) -> Step<u32> {
    let log = Arc::clone(log);
    Step::new(name, move |_ctx| {
        let log = Arc::clone(&log);
        async move {
            log.lock()
                .map_err(|_| StepError::msg("poisoned"))?
                .push(name.to_owned());
            Ok(())
        }
    })
}

/// A step that always fails with `message`.
fn failing(name: &'static str, message: &'static str) -> Step<u32> {
    Step::new(
        name,
        move |_ctx| async move { Err(StepError::msg(message)) },
    )
}

/// A compensation that appends `undo:<name>` to `log`.
fn undo(log: &Log, step: Step<u32>) -> Step<u32> {
    let log = Arc::clone(log);
    let name = step.name().to_owned();
    step.compensate(move |_ctx| {
        let log = Arc::clone(&log);
        let name = name.clone();
        async move {
            log.lock()
                .map_err(|_| StepError::msg("poisoned"))?
                .push(format!("undo:{name}"));
            Ok(())
        }
    })
}

async fn run(flow: &Flow<u32>, options: RunOptions) -> FlowResult<()> {
    match flow.run(7, options).await {
        Ok(result) => result,
        Err(e) => panic!("run failed: {e}"),
    }
}

fn statuses(result: &FlowResult<()>) -> Vec<(String, Status)> {
    result
        .steps
        .iter()
        .map(|s| (s.name.to_string(), s.status))
        .collect()
}

fn build(builder: orchestrix::FlowBuilder<u32, ()>) -> Flow<u32> {
    match builder.build() {
        Ok(flow) => flow,
        Err(e) => panic!("build failed: {e}"),
    }
}

#[tokio::test]
async fn steps_run_in_declaration_order() {
    let log = log();
    let flow = build(
        Flow::builder("order")
            .then(record(&log, "a"))
            .then(record(&log, "b"))
            .then(record(&log, "c")),
    );
    let result = run(&flow, RunOptions::new()).await;
    assert_eq!(result.status, Status::Completed);
    assert_eq!(entries(&log), ["a", "b", "c"]);
    assert!(
        result
            .steps
            .iter()
            .all(|s| s.status == Status::Completed && s.attempts == 1)
    );
}

#[tokio::test]
async fn state_set_by_one_step_is_read_by_the_next_and_by_the_output() {
    let flow = Flow::<u32, String>::builder("state")
        .step("reserve", |ctx| async move {
            ctx.set("reservation", format!("rsv-{}", ctx.input()))?;
            Ok(())
        })
        .step("confirm", |ctx| async move {
            let rsv: Option<String> = ctx.get("reservation")?;
            if !ctx.has("reservation") || rsv.as_deref() != Some("rsv-7") {
                return Err(StepError::msg("reservation missing"));
            }
            ctx.set("confirmed", true)?;
            Ok(())
        })
        .output(|ctx| {
            let confirmed: bool = ctx.get("confirmed")?.unwrap_or(false);
            Ok(format!(
                "{}:{confirmed}",
                ctx.get::<String>("reservation")?.unwrap_or_default()
            ))
        })
        .build();
    let Ok(flow) = flow else {
        panic!("build failed")
    };
    let result = flow.run(7, RunOptions::new()).await.ok();
    assert_eq!(result.and_then(|r| r.output).as_deref(), Some("rsv-7:true"));
}

/// Records the instant of every attempt, failing all but the last `succeed_on`-th.
fn flaky(attempts: &Arc<Mutex<Vec<Instant>>>, succeed_on: usize) -> Step<u32> {
    let attempts = Arc::clone(attempts);
    Step::new("flaky", move |_ctx| {
        let attempts = Arc::clone(&attempts);
        async move {
            let mut at = attempts.lock().map_err(|_| StepError::msg("poisoned"))?;
            at.push(Instant::now());
            if at.len() < succeed_on {
                Err(StepError::msg("not yet"))
            } else {
                Ok(())
            }
        }
    })
}

fn gaps(attempts: &Arc<Mutex<Vec<Instant>>>) -> Vec<Duration> {
    let at = attempts.lock().map(|a| a.clone()).unwrap_or_default();
    at.windows(2).map(|w| w[1] - w[0]).collect()
}

#[tokio::test(start_paused = true)]
async fn retries_wait_the_policy_delays_between_attempts() {
    let ms = Duration::from_millis;
    for (policy, expected) in [
        (RetryPolicy::retries(3).fixed(ms(100)), [100, 100, 100]),
        (RetryPolicy::retries(3).linear(ms(100)), [100, 200, 300]),
        (
            RetryPolicy::retries(3).exponential(ms(100)),
            [100, 200, 400],
        ),
        (
            RetryPolicy::retries(3)
                .exponential(ms(100))
                .max_delay(ms(250)),
            [100, 200, 250],
        ),
    ] {
        let attempts = Arc::default();
        let flow = build(Flow::builder("retry").then(flaky(&attempts, 4).retry(policy)));
        let result = run(&flow, RunOptions::new()).await;
        assert_eq!(result.status, Status::Completed, "{policy:?}");
        assert_eq!(result.steps[0].attempts, 4);
        assert_eq!(gaps(&attempts), expected.map(ms), "{policy:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn jittered_retry_delays_stay_within_zero_and_the_delay() {
    let ms = Duration::from_millis;
    let attempts = Arc::default();
    let policy = RetryPolicy::retries(5).exponential(ms(100)).with_jitter();
    let flow = build(Flow::builder("jitter").then(flaky(&attempts, 6).retry(policy)));
    run(&flow, RunOptions::new()).await;
    let gaps = gaps(&attempts);
    assert_eq!(gaps.len(), 5);
    for (n, gap) in gaps.iter().enumerate() {
        assert!(*gap <= policy.delay(n as u32), "retry {n}: {gap:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_attempt_is_retried_and_can_succeed() {
    let calls = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&calls);
    let step = Step::new("slow-then-fast", move |_ctx| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            Ok(())
        }
    })
    .timeout(Duration::from_secs(1))
    .retry(RetryPolicy::retries(1));
    let flow = build(Flow::builder("timeout").then(step));
    let started = Instant::now();
    let result = run(&flow, RunOptions::new()).await;
    assert_eq!(result.status, Status::Completed);
    assert_eq!(result.steps[0].attempts, 2);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the slow attempt was cut"
    );
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_last_attempt_fails_the_step() {
    let step = Step::new("hang", |_ctx| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(())
    })
    .timeout(Duration::from_millis(50));
    let flow = build(Flow::builder("timeout").then(step));
    let result = run(&flow, RunOptions::new()).await;
    assert_eq!(result.status, Status::Failed);
    let message = result.steps[0].error.clone().unwrap_or_default();
    assert!(message.contains("timed out"), "{message}");
}

#[tokio::test(start_paused = true)]
async fn exhausted_retries_fail_the_run_with_attempts_counted() {
    let log = log();
    let flow = build(
        Flow::builder("exhaust")
            .then(failing("charge", "card declined").retry(RetryPolicy::retries(2)))
            .then(record(&log, "never")),
    );
    let result = run(&flow, RunOptions::new()).await;
    assert_eq!(result.status, Status::Failed);
    assert_eq!(result.steps[0].attempts, 3);
    assert_eq!(result.steps[0].status, Status::Failed);
    assert_eq!(result.steps[1].status, Status::Pending);
    assert_eq!(
        result.error,
        Some(FlowError::Step {
            step: "charge".into(),
            attempts: 3,
            message: "card declined".into(),
            transient: false,
            source: None,
        })
    );
    assert!(entries(&log).is_empty());
}

#[tokio::test]
async fn failure_compensates_completed_steps_in_reverse_order() {
    let log = log();
    let flow = build(
        Flow::builder("saga")
            .then(undo(&log, record(&log, "reserve")))
            .then(record(&log, "no-compensation"))
            .then(undo(&log, record(&log, "charge")))
            .then(failing("ship", "no courier")),
    );
    let result = run(&flow, RunOptions::new()).await;
    assert_eq!(result.status, Status::Failed);
    assert_eq!(
        entries(&log),
        [
            "reserve",
            "no-compensation",
            "charge",
            "undo:charge",
            "undo:reserve"
        ]
    );
    assert_eq!(
        statuses(&result),
        [
            ("reserve".into(), Status::Cancelled),
            ("no-compensation".into(), Status::Completed),
            ("charge".into(), Status::Cancelled),
            ("ship".into(), Status::Failed),
        ]
    );
}

#[tokio::test]
async fn a_failing_compensation_is_reported_but_keeps_the_original_error() {
    let log = log();
    let flow = build(
        Flow::builder("saga")
            .then(undo(&log, record(&log, "reserve")))
            .then(
                record(&log, "charge")
                    .compensate(|_ctx| async { Err(StepError::msg("refund API down")) }),
            )
            .then(failing("ship", "no courier")),
    );
    let result = run(&flow, RunOptions::new()).await;
    assert!(matches!(&result.error, Some(FlowError::Step { step, .. }) if step == "ship"));
    assert_eq!(result.compensation_failures.len(), 1);
    assert_eq!(result.compensation_failures[0].step, "charge");
    assert_eq!(result.compensation_failures[0].message, "refund API down");
    // The other compensation still ran.
    assert!(entries(&log).contains(&"undo:reserve".to_owned()));
    assert_eq!(
        result.step("charge").map(|s| s.status),
        Some(Status::Completed)
    );
}

#[tokio::test]
async fn a_parallel_group_fails_only_if_all_its_steps_fail() {
    let log = log();
    let flow = build(
        Flow::builder("fanout")
            .parallel(
                Parallel::new()
                    .with(failing("sms", "no signal"))
                    .with(record(&log, "email")),
            )
            .then(record(&log, "after")),
    );
    let result = run(&flow, RunOptions::new()).await;
    assert_eq!(result.status, Status::Completed);
    assert_eq!(result.step("sms").map(|s| s.status), Some(Status::Failed));
    assert_eq!(entries(&log), ["email", "after"]);

    let all_fail = build(
        Flow::builder("fanout").parallel(
            Parallel::new()
                .with(failing("sms", "no signal"))
                .with(failing("email", "bounced")),
        ),
    );
    let result = run(&all_fail, RunOptions::new()).await;
    assert_eq!(result.status, Status::Failed);
}

#[tokio::test]
async fn parallel_steps_start_together() {
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let step = |name: &'static str| {
        let barrier = Arc::clone(&barrier);
        Step::new(name, move |_ctx| {
            let barrier = Arc::clone(&barrier);
            async move {
                // Deadlocks unless both steps run at the same time.
                barrier.wait().await;
                Ok(())
            }
        })
    };
    let flow =
        build(Flow::builder("together").parallel(Parallel::new().with(step("a")).with(step("b"))));
    let result = tokio::time::timeout(Duration::from_secs(10), run(&flow, RunOptions::new())).await;
    assert_eq!(result.map(|r| r.status).ok(), Some(Status::Completed));
}

#[tokio::test(start_paused = true)]
async fn fail_fast_cancels_siblings_and_compensates_the_group_first() {
    let log = log();
    let slow_log = Arc::clone(&log);
    let slow = Step::new("slow", move |ctx| {
        let log = Arc::clone(&slow_log);
        async move {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(60)) => {}
                () = ctx.cancellation().cancelled() => return Err(StepError::msg("cancelled")),
            }
            log.lock()
                .map_err(|_| StepError::msg("poisoned"))?
                .push("slow".into());
            Ok(())
        }
    });
    let late_failure = Step::new("payment", |_ctx| async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Err(StepError::msg("declined"))
    });
    let flow = build(
        Flow::builder("fail-fast")
            .then(undo(&log, record(&log, "reserve")))
            .parallel(
                Parallel::new()
                    .with(undo(&log, slow))
                    .with(late_failure)
                    .with(undo(&log, record(&log, "invoice")))
                    .fail_fast(),
            ),
    );
    let started = Instant::now();
    let result = run(&flow, RunOptions::new()).await;
    assert_eq!(result.status, Status::Failed);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "siblings were not awaited"
    );
    assert_eq!(
        entries(&log),
        ["reserve", "invoice", "undo:invoice", "undo:reserve"],
        "the slow sibling never completed; the group's completed step is compensated first"
    );
    assert_eq!(
        result.step("slow").map(|s| s.status),
        Some(Status::Cancelled)
    );
    assert_eq!(
        result.step("payment").map(|s| s.status),
        Some(Status::Failed)
    );
}

#[tokio::test]
async fn cancellation_before_a_step_stops_the_run_and_compensates() {
    let log = log();
    let token = CancellationToken::new();
    let canceller = token.clone();
    let cancel_step = Step::new("cancel", move |_ctx| {
        let canceller = canceller.clone();
        async move {
            canceller.cancel();
            Ok(())
        }
    });
    let flow = build(
        Flow::builder("cancel")
            .then(undo(&log, record(&log, "reserve")))
            .then(cancel_step)
            .then(record(&log, "charge")),
    );
    let result = run(&flow, RunOptions::new().cancellation(token)).await;
    assert_eq!(result.status, Status::Cancelled);
    assert_eq!(result.error, Some(FlowError::Cancelled));
    assert_eq!(entries(&log), ["reserve", "undo:reserve"]);
    assert_eq!(
        result.step("charge").map(|s| s.status),
        Some(Status::Pending)
    );
}

#[tokio::test]
async fn compensation_on_cancel_can_be_turned_off() {
    let log = log();
    let token = CancellationToken::new();
    token.cancel();
    let flow = build(
        Flow::builder("cancel")
            .then(undo(&log, record(&log, "reserve")))
            .compensate_on_cancel(false),
    );
    let result = run(&flow, RunOptions::new().cancellation(token)).await;
    assert_eq!(result.status, Status::Cancelled);
    assert!(entries(&log).is_empty(), "cancelled before the first step");
}

#[tokio::test(start_paused = true)]
async fn cancellation_interrupts_a_retry_delay_at_once() {
    let token = CancellationToken::new();
    let canceller = token.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        canceller.cancel();
    });
    let flow = build(
        Flow::builder("cancel-retry").then(
            failing("charge", "declined")
                .retry(RetryPolicy::retries(5).fixed(Duration::from_secs(3600))),
        ),
    );
    let started = Instant::now();
    let result = run(&flow, RunOptions::new().cancellation(token)).await;
    assert_eq!(result.status, Status::Cancelled);
    assert_eq!(result.steps[0].status, Status::Cancelled);
    assert_eq!(result.steps[0].attempts, 1);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn validation_failure_runs_no_step_and_lists_every_issue() {
    let log = log();
    let flow = build(
        Flow::builder("validated")
            .then(record(&log, "a"))
            .validate(|n: &u32| {
                let mut issues = Vec::new();
                if *n > 5 {
                    issues.push(format!("{n} is more than 5"));
                }
                if n % 2 == 1 {
                    issues.push(format!("{n} is odd"));
                }
                if issues.is_empty() {
                    Ok(())
                } else {
                    Err(issues)
                }
            }),
    );
    let result = run(&flow, RunOptions::new()).await;
    assert_eq!(result.status, Status::Failed);
    assert_eq!(
        result.error,
        Some(FlowError::Validation {
            issues: vec!["7 is more than 5".into(), "7 is odd".into()]
        })
    );
    assert!(entries(&log).is_empty());
    assert_eq!(result.steps[0].status, Status::Pending);
}

fn event_log(log: &Log) -> impl Fn(&Event<'_>) + Send + Sync + 'static {
    let log = Arc::clone(log);
    move |event: &Event<'_>| {
        let line = match event {
            Event::FlowStart { .. } => "flow:start".to_owned(),
            Event::FlowComplete { .. } => "flow:complete".to_owned(),
            Event::FlowFail { .. } => "flow:fail".to_owned(),
            Event::StepStart { step, attempt, .. } => format!("step:start:{step}:{attempt}"),
            Event::StepComplete { step, .. } => format!("step:complete:{step}"),
            Event::StepFail { step, attempt, .. } => format!("step:fail:{step}:{attempt}"),
            Event::CompensateStart { step, .. } => format!("compensate:start:{step}"),
            Event::CompensateComplete { step, .. } => format!("compensate:complete:{step}"),
            _ => "other".to_owned(),
        };
        if let Ok(mut l) = log.lock() {
            l.push(line);
        }
    }
}

#[tokio::test]
async fn hooks_fire_in_order_for_a_successful_run() {
    let events = log();
    let steps = log();
    let flow = build(
        Flow::builder("hooks")
            .then(record(&steps, "a"))
            .then(record(&steps, "b"))
            .plugin(event_log(&events)),
    );
    run(&flow, RunOptions::new()).await;
    assert_eq!(
        entries(&events),
        [
            "flow:start",
            "step:start:a:1",
            "step:complete:a",
            "step:start:b:1",
            "step:complete:b",
            "flow:complete"
        ]
    );
}

#[tokio::test]
async fn hooks_fire_in_order_for_a_failed_run() {
    let events = log();
    let steps = log();
    let flow = build(
        Flow::builder("hooks")
            .then(undo(&steps, record(&steps, "a")))
            .then(failing("b", "boom").retry(RetryPolicy::retries(1)))
            .plugin(event_log(&events)),
    );
    run(&flow, RunOptions::new()).await;
    assert_eq!(
        entries(&events),
        [
            "flow:start",
            "step:start:a:1",
            "step:complete:a",
            "step:start:b:1",
            "step:fail:b:1",
            "step:start:b:2",
            "step:fail:b:2",
            "compensate:start:a",
            "compensate:complete:a",
            "flow:fail"
        ]
    );
}

#[tokio::test]
async fn a_panicking_hook_does_not_break_the_run() {
    let events = log();
    let steps = log();
    let flow = build(
        Flow::builder("hooks")
            .then(record(&steps, "a"))
            .plugin(|_: &Event<'_>| panic!("plugin bug"))
            .plugin(event_log(&events)),
    );
    let result = run(&flow, RunOptions::new()).await;
    assert_eq!(result.status, Status::Completed);
    assert_eq!(entries(&steps), ["a"]);
    assert_eq!(
        entries(&events).len(),
        4,
        "later plugins still see every event"
    );
}

#[tokio::test]
async fn a_panicking_step_fails_its_attempt_instead_of_unwinding() {
    let flow = build(
        Flow::builder("panic")
            .step("boom", |_ctx| async { panic!("step bug") })
            .then(failing("unused", "x")),
    );
    let result = run(&flow, RunOptions::new()).await;
    assert_eq!(result.status, Status::Failed);
    let message = result.steps[0].error.clone().unwrap_or_default();
    assert_eq!(message, "panicked: step bug");
}

#[derive(Clone, Default)]
struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut b) = self.0.lock() {
            b.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn the_console_logger_prints_a_readable_account_of_the_run() {
    let buffer = SharedBuffer::default();
    let sleepy = |name: &'static str, ms: u64| {
        Step::new(name, move |_ctx| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(())
        })
    };
    let flow = build(
        Flow::builder("checkout")
            .then(sleepy("reserve", 5))
            .then(
                flaky(&Arc::default(), 2)
                    .retry(RetryPolicy::retries(1).fixed(Duration::from_millis(100))),
            )
            .plugin(ConsoleLogger::to_writer(buffer.clone())),
    );
    run(&flow, RunOptions::new()).await;
    let text = String::from_utf8(buffer.0.lock().map(|b| b.clone()).unwrap_or_default());
    assert_eq!(
        text.ok().as_deref(),
        Some(
            "[orchestrix] checkout: started\n\
             [orchestrix] checkout › reserve: attempt 1 started\n\
             [orchestrix] checkout › reserve: completed in 5ms after 1 attempt\n\
             [orchestrix] checkout › flaky: attempt 1 started\n\
             [orchestrix] checkout › flaky: attempt 1 failed: not yet (retry in 100ms)\n\
             [orchestrix] checkout › flaky: attempt 2 started\n\
             [orchestrix] checkout › flaky: completed in 100ms after 2 attempts\n\
             [orchestrix] checkout: completed in 105ms\n"
        )
    );
}

/// The text a logger wrote into `buffer`.
fn written(buffer: &SharedBuffer) -> String {
    let bytes = buffer.0.lock().map(|b| b.clone()).unwrap_or_default();
    String::from_utf8(bytes).unwrap_or_default()
}

/// A flow whose one step fails its first attempt, logged by `logger`.
fn logged(logger: ConsoleLogger) -> Flow<u32> {
    let failures = Arc::new(AtomicU32::new(0));
    build(
        Flow::builder("checkout")
            .then(
                Step::new("flaky", move |_ctx| {
                    let first = failures.fetch_add(1, Ordering::SeqCst) == 0;
                    async move {
                        if first {
                            return Err(StepError::msg("not yet"));
                        }
                        Ok(())
                    }
                })
                .retry(RetryPolicy::retries(1).fixed(Duration::from_millis(100))),
            )
            .plugin(logger),
    )
}

#[tokio::test(start_paused = true)]
async fn the_console_logger_writes_its_prefix_to_the_writer_it_was_given() {
    let buffer = SharedBuffer::default();
    let flow = logged(ConsoleLogger::to_writer(buffer.clone()).prefix("billing |"));
    run(&flow, RunOptions::new()).await;
    let text = written(&buffer);
    assert!(!text.is_empty());
    assert!(
        text.lines().all(|l| l.starts_with("billing | checkout")),
        "{text}"
    );
    let bare = SharedBuffer::default();
    run(
        &logged(ConsoleLogger::to_writer(bare.clone()).prefix("")),
        RunOptions::new(),
    )
    .await;
    assert!(written(&bare).starts_with("checkout: started\n"));
}

#[tokio::test(start_paused = true)]
async fn the_console_logger_prints_only_events_at_its_level_and_above() {
    let info = SharedBuffer::default();
    run(
        &logged(ConsoleLogger::to_writer(info.clone()).level(LogLevel::Info)),
        RunOptions::new(),
    )
    .await;
    assert_eq!(
        written(&info),
        "[orchestrix] checkout: started\n\
         [orchestrix] checkout › flaky: attempt 1 failed: not yet (retry in 100ms)\n\
         [orchestrix] checkout › flaky: completed in 100ms after 2 attempts\n\
         [orchestrix] checkout: completed in 100ms\n"
    );
    let warn = SharedBuffer::default();
    run(
        &logged(ConsoleLogger::to_writer(warn.clone()).level(LogLevel::Warn)),
        RunOptions::new(),
    )
    .await;
    assert_eq!(
        written(&warn),
        "[orchestrix] checkout › flaky: attempt 1 failed: not yet (retry in 100ms)\n"
    );
}

#[tokio::test(start_paused = true)]
async fn a_disabled_console_logger_writes_nothing() {
    let buffer = SharedBuffer::default();
    let flow = logged(ConsoleLogger::to_writer(buffer.clone()).enabled(false));
    let result = run(&flow, RunOptions::new()).await;
    assert_eq!(result.status, Status::Completed);
    assert_eq!(written(&buffer), "");
}

#[test]
fn a_duplicate_step_name_is_a_build_error() {
    let log = log();
    let built = Flow::<u32>::builder("dup")
        .then(record(&log, "a"))
        .parallel(
            Parallel::new()
                .with(record(&log, "b"))
                .with(record(&log, "a")),
        )
        .build();
    assert_eq!(
        built.err(),
        Some(BuildError::DuplicateStep {
            flow: "dup".into(),
            step: "a".into()
        })
    );
}

#[test]
fn empty_definitions_are_build_errors() {
    let log = log();
    assert_eq!(
        Flow::<u32>::builder("")
            .then(record(&log, "a"))
            .build()
            .err(),
        Some(BuildError::EmptyName)
    );
    assert!(matches!(
        Flow::<u32>::builder("f").build().err(),
        Some(BuildError::NoSteps { .. })
    ));
    assert!(matches!(
        Flow::<u32>::builder("f")
            .parallel(Parallel::new())
            .build()
            .err(),
        Some(BuildError::EmptyParallelGroup { .. })
    ));
    assert!(matches!(
        Flow::<u32>::builder("f")
            .then(record(&log, "a").timeout(Duration::ZERO))
            .build()
            .err(),
        Some(BuildError::ZeroTimeout { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_flow_runs_concurrently_from_many_tasks() {
    let count = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&count);
    let flow = Flow::<u32, u32>::builder("shared")
        .step("count", move |_ctx| {
            let counter = Arc::clone(&counter);
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
                Ok(())
            }
        })
        .output(|ctx| Ok(ctx.input() * 2))
        .build();
    let Ok(flow) = flow else {
        panic!("build failed")
    };
    let tasks: Vec<_> = (0..200u32)
        .map(|n| {
            let flow = flow.clone();
            tokio::spawn(async move {
                flow.run(n, RunOptions::new())
                    .await
                    .ok()
                    .and_then(|r| r.output)
            })
        })
        .collect();
    for (n, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.ok().flatten(), Some(n as u32 * 2));
    }
    assert_eq!(count.load(Ordering::SeqCst), 200);
}
