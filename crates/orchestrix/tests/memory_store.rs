//! The memory store against the shared store conformance suite.

use orchestrix::store::MemoryStore;

orchestrix_conformance::store_conformance_tests!(async { MemoryStore::new() });
