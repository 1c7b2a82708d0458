//! `lvpipe verify`: a shard folder's files against its manifest.

use std::process::ExitCode;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use lvpipe_sharding::storage::Location;
use lvpipe_sharding::verify::{verify, verify_remote_folder};

use super::{location, out};
use crate::args::VerifyArgs;
use crate::progress::log;

pub fn run(args: VerifyArgs) -> Result<ExitCode> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} verify [{elapsed_precise}] {wide_bar} {binary_bytes} {binary_bytes_per_sec}",
        )
        .expect("valid template"),
    );
    let report = match location(&args.shards)? {
        Location::Local(dir) => verify(&dir, &|n| bar.inc(n)),
        Location::Remote(remote) => verify_remote_folder(&remote),
    };
    bar.finish_and_clear();
    let report = report?;
    if args.json {
        out(&(serde_json::to_string_pretty(&report)? + "\n"))?;
    } else {
        for p in &report.problems {
            out(&format!("{}: {p}\n", args.shards.display()))?;
        }
    }
    log(&format!(
        "verify: {} files, {} bytes read; {} bad",
        report.files,
        report.bytes,
        report.problems.len()
    ));
    Ok(match report.problems.is_empty() {
        true => ExitCode::SUCCESS,
        false => ExitCode::from(1),
    })
}
