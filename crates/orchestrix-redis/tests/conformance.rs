//! The shared store conformance suite, against the real Redis at `REDIS_URL`.

mod common;

orchestrix_conformance::store_conformance_tests!(async { common::store("conformance").await });
