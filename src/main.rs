//! `lvpipe`: a thin command line over the lvpipe crates.
//!
//! Arguments are parsed with clap, resolved once into the libraries' settings
//! types, and the libraries do the work. stdout carries data (tables, JSON),
//! stderr carries progress and logs. Exit codes: 0 success, 1 a check failed
//! (a `--strict` build met a bad record), 2 usage or input error.

mod args;
mod commands;
mod demo;
mod eval;
mod plot;
mod progress;
mod training;

use std::process::ExitCode;

use clap::Parser;

// Image buffers of a few hundred KiB are allocated and freed per record on
// every worker; glibc returns them to the kernel and page-faults them back
// (about a fifth of build-shards' time on JPEGs), mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    match commands::run(cli) {
        Ok(code) => code,
        Err(err) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("lvpipe: error: {err:#}");
            }
            ExitCode::from(commands::exit_code(&err))
        }
    }
}
