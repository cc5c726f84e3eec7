//! The command line against the real Redis at `REDIS_URL`: every behaviour, durable runs included.

mod common;

cli_tests!(common::redis());
cli_journal_tests!(common::redis());
