//! `orchestrix delete KEY`: remove a record, whatever its status.

use std::process::ExitCode;

use super::{Store, confirm, no_record};
use crate::cli::ChangeArgs;

pub(super) async fn run(store: &Store, args: ChangeArgs) -> anyhow::Result<ExitCode> {
    let key = args.key.stored();
    // What is being deleted, said before it goes; a record that cannot be decoded is
    // deleted too (that is how garbage is cleared).
    let what = match store.bounded(store.admin()?.inspect(&key)).await {
        Ok(None) => return Ok(no_record(&key)),
        Ok(Some(info)) => format!(
            "the {} record under {key:?} (owner {})",
            info.status, info.token
        ),
        Err(err) => format!(
            "the undecodable value under {key:?} ({})",
            crate::render::error_line(&err)
        ),
    };
    confirm(
        format!("Delete {what}? The operation may then run again under this key."),
        args.yes,
    )
    .await?;
    store.bounded(store.store.delete(&key)).await?;
    println!("deleted {key:?}");
    Ok(ExitCode::SUCCESS)
}
