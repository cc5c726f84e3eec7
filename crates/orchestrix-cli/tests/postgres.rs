//! The command line against the machine's PostgreSQL (`DATABASE_URL`): every behaviour, durable runs included.

mod common;

cli_tests!(common::postgres());
cli_journal_tests!(common::postgres());
