//! One module per subcommand: resolve the arguments into a library's
//! settings, call the library, print. stdout carries data (tables, JSON),
//! stderr logs and progress.

mod bench_memory;
mod build;
#[cfg(feature = "cluster")]
mod cluster;
mod demo;
mod eval;
mod export;
mod generate;
mod mix;
mod plan;
mod sql;
mod stream;
mod synth;
mod train;
mod verify;

use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use lvpipe_sharding::storage::Location;

use crate::args::{Cli, Command, ScaleArg};

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Synth(args) => synth::run(args),
        Command::BuildShards(args) => build::run(args),
        Command::Sql(args) => sql::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Mix(args) => mix::run(args),
        Command::Stream(args) => stream::run(args),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Export(args) => export::run(args),
        Command::BenchMemory(args) => bench_memory::run(args),
        #[cfg(feature = "cluster")]
        Command::Cluster(command) => cluster::run(command),
        Command::BenchStep { steps } => {
            let report = lvpipe_trainer::bench::train_step_bench(steps)?;
            out(&format!("{report}\n"))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The exit code of an error: 1 a check failed (a `--strict` build met a
/// bad record), 3 a bug in lvpipe, 2 anything the user can fix (usage,
/// input, the machine's files).
pub fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        let internal = if let Some(e) = cause.downcast_ref::<lvpipe_sharding::Error>() {
            if matches!(e, lvpipe_sharding::Error::Strict { .. }) {
                return 1;
            }
            e.is_internal()
        } else if let Some(e) = cause.downcast_ref::<lvpipe_pipeline::Error>() {
            e.is_internal()
        } else if let Some(e) = cause.downcast_ref::<lvpipe_trainer::Error>() {
            e.is_internal()
        } else if let Some(e) = cause.downcast_ref::<lvpipe_eval::Error>() {
            e.is_internal()
        } else {
            continue;
        };
        return if internal { 3 } else { 2 };
    }
    2
}

/// Writes `text` to stdout.
#[allow(clippy::print_stdout)]
pub fn out(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// The runtime DataFusion and object storage run on (its I/O and timers
/// on: remote reads need both).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// A folder argument: a local path, or an `s3://`, `gs://`, `az://` URL.
pub fn location(arg: &std::path::Path) -> lvpipe_sharding::Result<Location> {
    Location::parse(&arg.to_string_lossy())
}

/// Where remote mixes are fetched to and remote outputs staged: `--cache`,
/// else `$LVPIPE_CACHE`, `$XDG_CACHE_HOME/lvpipe` or `~/.cache/lvpipe`.
pub fn cache_dir(arg: Option<&std::path::Path>) -> std::path::PathBuf {
    arg.map_or_else(lvpipe_sharding::storage::default_cache, |p| p.to_path_buf())
}

/// A stage's mix folder, local, or fetched from object storage into the
/// cache first (whose mixes then stay within `cache_size` bytes).
pub fn local_mix(
    arg: &std::path::Path,
    cache: Option<&std::path::Path>,
    cache_size: Option<u64>,
) -> Result<std::path::PathBuf> {
    match location(arg)? {
        Location::Local(path) => Ok(path),
        Location::Remote(remote) => {
            let cache = cache_dir(cache).join("mixes");
            let fetch = lvpipe_pipeline::fetch_mix(&remote, &cache, cache_size);
            Ok(runtime()?.block_on(fetch)?)
        }
    }
}

pub fn scale(arg: ScaleArg) -> lvpipe_synth::Scale {
    match arg {
        ScaleArg::Tiny => lvpipe_synth::Scale::Tiny,
        ScaleArg::Small => lvpipe_synth::Scale::Small,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_exit_codes_by_whose_fault() {
        let strict = lvpipe_sharding::Error::Strict {
            origin: "a.jsonl:3".into(),
            reason: lvpipe_schemas::QuarantineReason::MalformedJson,
            detail: "expected value".into(),
        };
        assert_eq!(exit_code(&anyhow::Error::new(strict)), 1);
        let bug = lvpipe_sharding::Error::Internal("a build thread panicked".into());
        assert_eq!(exit_code(&anyhow::Error::new(bug)), 3);
        let usage = lvpipe_pipeline::Error::Usage("world size 3".into());
        assert_eq!(exit_code(&anyhow::Error::new(usage)), 2);
        // Wrapped errors are classified by the innermost library error.
        let tensor = lvpipe_trainer::Error::Tensor {
            context: "step 4".into(),
            source: candle_core::Error::Msg("shape mismatch".into()),
        };
        let wrapped = lvpipe_eval::Error::Trainer(tensor);
        assert_eq!(exit_code(&anyhow::Error::new(wrapped)), 3);
        let input = lvpipe_eval::Error::Input("unknown suite `x`".into());
        let context = anyhow::Error::new(input).context("eval into out/");
        assert_eq!(exit_code(&context), 2);
        assert_eq!(exit_code(&anyhow::anyhow!("no such file")), 2);
    }
}
