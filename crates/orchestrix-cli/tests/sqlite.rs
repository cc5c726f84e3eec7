//! The command line against a SQLite file of its own per test: every behaviour, durable runs included.

mod common;

cli_tests!(common::sqlite());
cli_journal_tests!(common::sqlite());
