//! A payment-webhook receiver that processes every event once per sender, however often
//! it is delivered.
//!
//! ```text
//! cargo run -p orchestrix-http --example webhooks [-- [--port N | N] [--store redis://HOST:PORT]]
//! ```
//!
//! The port comes from the argument, else `PORT`, else 3000; the store is in memory unless
//! `--store` or `ORCHESTRIX_STORE` names a Redis URL. Try:
//!
//! ```text
//! curl -i -X POST localhost:3000/webhooks/payments -H 'Authorization: Bearer acme-secret' \
//!      -H 'Idempotency-Key: evt_1' -H 'content-type: application/json' \
//!      -d '{"id":"evt_1","type":"payment.succeeded","amount":4200}'
//! # the same delivery again: the first answer, with `idempotency-replayed: true`
//! # the same event id from another sender (Bearer globex-secret): processed, for globex
//! curl localhost:3000/stats   # {"processed":2,"balance":8400}
//! ```

mod app;

use std::sync::Arc;

use anyhow::{Context, bail};
use orchestrix::store::{IdempotencyStore, MemoryStore};
use orchestrix_redis::RedisStore;

struct Args {
    port: u16,
    store: Option<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut port = std::env::var("PORT").ok();
    let mut store = std::env::var("ORCHESTRIX_STORE")
        .ok()
        .filter(|s| !s.is_empty());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--store" => store = Some(args.next().context("--store needs a URL")?),
            "--port" => port = Some(args.next().context("--port needs a number")?),
            "-h" | "--help" => {
                println!("usage: webhooks [--port N | N] [--store redis://HOST:PORT]");
                std::process::exit(0);
            }
            other if other.starts_with("--store=") => {
                store = Some(other["--store=".len()..].to_owned())
            }
            other if other.starts_with("--port=") => {
                port = Some(other["--port=".len()..].to_owned())
            }
            other if !other.starts_with('-') => port = Some(other.to_owned()),
            other => bail!(
                "unknown argument {other:?}; usage: webhooks [--port N | N] [--store redis://HOST:PORT]"
            ),
        }
    }
    let port = match port {
        Some(p) => p.parse().with_context(|| format!("invalid port {p:?}"))?,
        None => 3000,
    };
    Ok(Args { port, store })
}

async fn open_store(url: Option<&str>) -> anyhow::Result<(Arc<dyn IdempotencyStore>, String)> {
    match url {
        None => Ok((Arc::new(MemoryStore::new()), "in-memory store".to_owned())),
        Some(url) if url.starts_with("redis://") || url.starts_with("rediss://") => {
            let store = RedisStore::builder(url)
                .connect()
                .await
                .with_context(|| format!("connecting to {url}"))?;
            Ok((Arc::new(store), format!("Redis store at {url}")))
        }
        Some(other) => {
            bail!("unsupported store {other:?}: use redis://HOST:PORT, or nothing for memory")
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,orchestrix_http=debug".into()),
        )
        .init();
    let args = parse_args()?;
    let (store, described) = open_store(args.store.as_deref()).await?;
    let (router, _ledger) = app::router(store)?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port))
        .await
        .with_context(|| format!("binding 127.0.0.1:{}", args.port))?;
    let addr = listener.local_addr()?;
    println!("webhooks: listening on http://{addr} with the {described}");
    println!(
        "  POST /webhooks/payments  (Idempotency-Key: <event id>, body {{\"id\",\"type\",\"amount\"}})   GET /stats"
    );
    let senders: Vec<String> = app::SENDERS
        .iter()
        .map(|(name, token)| format!("{name} (Authorization: Bearer {token})"))
        .collect();
    println!(
        "  keys are scoped per verified sender: {}",
        senders.join(", ")
    );
    println!(
        "  usage: webhooks [--port N | N] [--store redis://HOST:PORT]   (or PORT, ORCHESTRIX_STORE)"
    );
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
