//! The command line against the local DynamoDB-compatible server (`DYNAMODB_ENDPOINT`):
//! every behaviour, durable runs included.

mod common;

cli_tests!(common::dynamodb());
cli_journal_tests!(common::dynamodb());
