//! The shared journal conformance suite, against the local DynamoDB-compatible server.

mod common;

orchestrix_conformance::journal_conformance_tests!(common::store());
