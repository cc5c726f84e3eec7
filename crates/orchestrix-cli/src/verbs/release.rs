//! `orchestrix release KEY`: free a stuck running record without its owner's token.

use std::process::ExitCode;

use anyhow::{Context as _, bail};
use orchestrix::store::{Lease, RecordStatus, Released};

use super::{Store, confirm, no_record};
use crate::cli::ChangeArgs;
use crate::render;

pub(super) async fn run(store: &Store, args: ChangeArgs) -> anyhow::Result<ExitCode> {
    let key = args.key.stored();
    let admin = store.admin()?;
    let info = store.bounded(admin.inspect(&key)).await.with_context(|| {
        format!("record under {key:?} (`orchestrix delete` removes what cannot be decoded)")
    })?;
    let Some(info) = info else {
        return Ok(no_record(&key));
    };
    if info.status != RecordStatus::Running {
        bail!(refused(&key, info.status));
    }
    let lease = match info.lease {
        Some(Lease::Held { left }) => format!(", lease {} left", render::duration(left)),
        Some(Lease::Lapsed { ago }) => format!(", lease lapsed {} ago", render::duration(ago)),
        _ => String::new(),
    };
    let what = if info.durable {
        "Its lease lapses now and its journal stays: the next run of the key resumes it."
    } else {
        "It is deleted: the next run of the key starts over."
    };
    confirm(
        format!(
            "Release the running record under {key:?} (owner {}{lease})? {what}",
            info.token
        ),
        args.yes,
    )
    .await?;
    match store.bounded(admin.release(&key)).await? {
        Released::NotRunning(status) => bail!(refused(&key, status)),
        Released::Absent => Ok(no_record(&key)),
        released => {
            println!("released {key:?}: {released}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn refused(key: &str, status: RecordStatus) -> String {
    format!(
        "refused: the record under {key:?} is {status}, not running \
         (`orchestrix delete` removes a finished record)"
    )
}
