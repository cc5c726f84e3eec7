//! Input fingerprints: nanoseconds per `fingerprint_of` for a bare id, a typical payment
//! struct and a JSON object, beside `serde_json::to_value` of the same input (what
//! fingerprinting had to do before hashing, until it encoded straight from `Serialize`).
//!
//! `cargo bench -p orchestrix --bench fingerprint`

use std::hint::black_box;
use std::time::Instant;

use serde::Serialize;

#[derive(Serialize)]
struct Payment {
    order_id: String,
    amount_cents: u64,
    currency: String,
    customer: String,
    card_last4: String,
}

/// Best of 5 rounds of `n` calls, in ns per call.
fn ns_per_call(n: u32, mut f: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..n {
                f();
            }
            started.elapsed().as_nanos() as f64 / f64::from(n)
        })
        .fold(f64::INFINITY, f64::min)
}

fn row<T: Serialize>(name: &str, n: u32, value: &T) {
    let fingerprint = ns_per_call(n, || {
        black_box(orchestrix::fingerprint_of(black_box(value)).ok());
    });
    let to_value = ns_per_call(n, || {
        black_box(serde_json::to_value(black_box(value)).ok());
    });
    println!("{name:<28} {fingerprint:>14.0} {to_value:>22.0}");
}

fn main() {
    // `cargo bench` passes `--bench`; under `cargo test` this is a quick smoke run.
    let n = if std::env::args().any(|a| a == "--bench") {
        500_000
    } else {
        1_000
    };
    let payment = Payment {
        order_id: "order-12345".into(),
        amount_cents: 4999,
        currency: "EUR".into(),
        customer: "cus_8823".into(),
        card_last4: "4242".into(),
    };
    let object = serde_json::json!({"sku": "A-1", "qty": 3, "tags": ["gift", "fragile"], "ship": {"zip": "75001", "express": true}});
    println!("best of 5 x {n} calls, ns per call");
    println!(
        "{:<28} {:>14} {:>22}",
        "input", "fingerprint_of", "serde_json::to_value"
    );
    row("u64", n, &42u64);
    row("struct, 5 fields", n, &payment);
    row("json object, nested", n, &object);
}
