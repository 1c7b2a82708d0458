//! `lvpipe cluster scheduler|executor`: a node of a Ballista cluster.

use std::process::ExitCode;

use anyhow::Result;
use lvpipe_pipeline::cluster::{ExecutorSettings, run_executor, run_scheduler};

use super::runtime;
use crate::args::ClusterCommand;
use crate::progress::log;

/// Ballista's warnings and errors (a task that fails, an executor that is
/// lost), one line each on stderr.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            crate::progress::log(&format!(
                "{} {}: {}",
                record.level(),
                record.target(),
                record.args()
            ));
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLog = StderrLog;

pub fn run(command: ClusterCommand) -> Result<ExitCode> {
    let _ = log::set_logger(&LOGGER).map(|()| log::set_max_level(log::LevelFilter::Warn));
    match command {
        ClusterCommand::Scheduler { bind } => {
            log(&format!("ballista scheduler on {bind}"));
            runtime()?.block_on(run_scheduler(bind))?;
        }
        ClusterCommand::Executor {
            scheduler,
            host,
            flight_port,
            grpc_port,
            tasks,
            work_dir,
        } => {
            log(&format!(
                "ballista executor on {host}:{flight_port} (flight) and :{grpc_port} (grpc), scheduler {scheduler}"
            ));
            let settings = ExecutorSettings {
                scheduler,
                host,
                flight_port,
                grpc_port,
                tasks: tasks
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
                work_dir: work_dir.map(|p| p.to_string_lossy().into_owned()),
            };
            runtime()?.block_on(run_executor(settings))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
