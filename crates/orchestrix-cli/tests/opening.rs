//! Opening a store: bad URLs, unreachable stores and misplaced options fail on one line
//! with exit status 1, quickly, and never panic.

mod common;

use std::time::{Duration, Instant};

use common::{Run, orchestrix};

/// A port on loopback nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address").port()
}

async fn cli(args: &[&str]) -> (Run, Duration) {
    let started = Instant::now();
    let envs = [("AWS_ACCESS_KEY_ID", "x"), ("AWS_SECRET_ACCESS_KEY", "y")]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let run = orchestrix(args.iter().map(|a| (*a).to_owned()).collect(), &envs, "").await;
    (run, started.elapsed())
}

/// The run failed quickly, on one line that starts with the tool's name.
fn one_line_error(run: &Run, elapsed: Duration) -> String {
    let line = run.failed(1).to_owned();
    assert_eq!(line.lines().count(), 1, "{run:#?}");
    assert!(line.starts_with("orchestrix: "), "{run:#?}");
    assert!(
        elapsed < Duration::from_secs(20),
        "took {elapsed:?}: {run:#?}"
    );
    line
}

#[tokio::test]
async fn a_url_of_no_store_is_a_one_line_error() {
    for url in [
        "ftp://example.invalid",
        "127.0.0.1:6379",
        "memory://",
        "sqlite://",
    ] {
        let (run, elapsed) = cli(&["--store", url, "list"]).await;
        one_line_error(&run, elapsed);
    }
    let (run, elapsed) = cli(&["--store", "postgres://:5432:x", "list"]).await;
    one_line_error(&run, elapsed);
}

#[tokio::test]
async fn options_of_another_store_are_refused() {
    let (run, elapsed) = cli(&[
        "--store",
        "postgres://u@127.0.0.1/db",
        "--prefix",
        "p:",
        "list",
    ])
    .await;
    assert!(one_line_error(&run, elapsed).contains("--prefix is a Redis option"));
    let (run, elapsed) = cli(&["--store", "redis://127.0.0.1", "--table", "t", "list"]).await;
    assert!(one_line_error(&run, elapsed).contains("--table is not a Redis option"));
}

#[tokio::test]
async fn no_store_at_all_is_a_one_line_error() {
    let (run, elapsed) = cli(&["list"]).await;
    assert!(one_line_error(&run, elapsed).contains("no store"));
}

#[tokio::test]
async fn an_unreachable_store_is_a_one_line_error_within_the_connect_timeout() {
    let port = closed_port();
    let urls = [
        format!("redis://127.0.0.1:{port}"),
        format!("postgres://postgres@127.0.0.1:{port}/test"),
        format!("dynamodb://t?endpoint=http://127.0.0.1:{port}&region=us-east-1"),
    ];
    for url in &urls {
        let (run, elapsed) = cli(&[
            "--store",
            url,
            "--connect-timeout",
            "2s",
            "--timeout",
            "2s",
            "inspect",
            "k",
        ])
        .await;
        let line = one_line_error(&run, elapsed);
        assert!(line.to_lowercase().contains("refused"), "{url}: {line}");
    }
}

#[tokio::test]
async fn a_missing_sqlite_file_is_not_created() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("absent.db");
    let url = format!("sqlite://{}", path.display());
    let (run, elapsed) = cli(&["--store", &url, "list"]).await;
    assert!(one_line_error(&run, elapsed).contains("no SQLite database"));
    assert!(!path.exists());
}

#[tokio::test]
async fn a_password_in_the_url_is_never_printed() {
    let port = closed_port();
    let url = format!("redis://:hunter2@127.0.0.1:{port}");
    let (run, elapsed) = cli(&["--store", &url, "list"]).await;
    let line = one_line_error(&run, elapsed);
    assert!(!line.contains("hunter2"), "{line}");
}

#[tokio::test]
async fn dynamodb_without_a_region_or_credentials_says_what_is_missing() {
    let run = orchestrix(
        vec!["--store".into(), "dynamodb://t".into(), "list".into()],
        &[],
        "",
    )
    .await;
    let line = run.failed(1);
    assert!(
        line.contains("region") || line.contains("credentials"),
        "{line}"
    );
}

#[tokio::test]
async fn bad_usage_is_exit_2() {
    let run = orchestrix(vec!["inspect".into()], &[], "").await;
    assert_eq!(run.code, 2, "{run:#?}");
    let run = orchestrix(
        vec![
            "--store".into(),
            "redis://x".into(),
            "list".into(),
            "--running".into(),
            "--failed".into(),
        ],
        &[],
        "",
    )
    .await;
    assert_eq!(run.code, 2, "{run:#?}");
}
