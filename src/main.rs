//! `lvpipe`: a thin command line over the lvpipe crates.
//!
//! Arguments are parsed with clap (`args`), resolved once per command into
//! the libraries' settings (`commands/`), and the libraries do the work;
//! their events are rendered as progress bars and log lines (`progress`).
//! stdout carries data (tables, JSON), stderr carries progress and logs.
//! Exit codes: 0 success, 1 a check failed (a `--strict` build met a bad
//! record, a plan has problems), 2 usage, input or the machine's files, 3 a
//! bug in lvpipe.

mod args;
mod commands;
mod progress;

use std::process::ExitCode;

use clap::Parser;

// Image buffers of a few hundred KiB are allocated and freed per record on
// every worker; glibc returns them to the kernel and page-faults them back
// (about a fifth of build-shards' time on JPEGs), mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay`: the bindings do not name it; in the
/// `mi_option_t` enum of mimalloc 2 and 3 it comes right before
/// `mi_option_use_numa_nodes`.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t =
    libmimalloc_sys::mi_option_use_numa_nodes - 1;

/// Freed memory stays with the process instead of going back to the kernel
/// 10 ms later: training frees and reallocates the same large tensors every
/// step, and the kernel zeroed every returned page again on the next fault
/// (a tenth of a training step's time; 23% more tokens/s without it). The
/// peak is reached in the first step anyway.
#[allow(unsafe_code)]
fn keep_freed_memory() {
    // SAFETY: mi_option_set only stores an integer in mimalloc's option table;
    // the purge delay is read when memory is purged, so changing it at any
    // time is sound.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

/// candle's elementwise kernels run on their own worker threads, which spin
/// 25,000 times for the next op before sleeping, while the matmuls run on
/// rayon's threads: on 2 cores the spinning took a fifth of a training step
/// from the matmuls (`lvpipe bench-step`: 2,053 tokens/s spinning, 2,341
/// sleeping at once). A value the user set is kept.
#[allow(unsafe_code)]
fn quiet_candle_workers() {
    const SPIN: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(SPIN).is_none() {
        // SAFETY: called first thing in main, before any thread exists that
        // could read the environment concurrently.
        unsafe { std::env::set_var(SPIN, "0") }
    }
}

fn main() -> ExitCode {
    quiet_candle_workers();
    keep_freed_memory();
    let cli = args::Cli::parse();
    let result = commands::run(cli);
    let group = lvpipe_trainer::dist::group();
    match result {
        Ok(code) => {
            lvpipe_trainer::dist::finalize();
            code
        }
        Err(err) => {
            let code = commands::exit_code(&err);
            #[allow(clippy::print_stderr)]
            match group.size() {
                1 => eprintln!("lvpipe: error: {err:#}"),
                // One rank's error ends the group's run: the others would
                // wait for it in the next exchange.
                n => {
                    eprintln!("lvpipe: error: rank {} of {n}: {err:#}", group.rank());
                    group.abort(i32::from(code));
                }
            }
            ExitCode::from(code)
        }
    }
}
