//! Progress bars and log lines on stderr: how the libraries' events look
//! in a terminal.

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};
use lvpipe_eval::demo::DemoEvent;
use lvpipe_sharding::BuildEvent;
use lvpipe_trainer::TrainEvent;

/// Quarantine lines printed before they are only counted.
const MAX_QUARANTINE_LINES: u64 = 10;

/// A log line on stderr.
#[allow(clippy::print_stderr)]
pub fn log(text: &str) {
    eprintln!("{text}");
}

/// Renders [`BuildEvent`]s: a bar over the bytes of the source files, and the
/// first few quarantined records as warnings.
pub struct BuildProgress {
    bar: ProgressBar,
    quarantined: Mutex<u64>,
}

impl BuildProgress {
    pub fn new() -> Self {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} {msg}",
            )
            .expect("valid template"),
        );
        BuildProgress {
            bar,
            quarantined: Mutex::new(0),
        }
    }

    /// A log line on stderr that does not tear the bar (and is printed even
    /// when stderr is not a terminal and the bar is hidden).
    fn log(&self, line: &str) {
        self.bar.suspend(|| log(line));
    }

    pub fn on_event(&self, event: BuildEvent) {
        match event {
            BuildEvent::Started {
                input_bytes,
                resumed_records,
                resumed_shards,
            } => {
                self.bar.set_length(input_bytes);
                if resumed_records > 0 {
                    self.log(&format!(
                        "lvpipe: resuming after {resumed_records} records ({resumed_shards} shards already written)"
                    ));
                }
            }
            BuildEvent::Progress {
                input_bytes_done,
                samples,
                quarantined,
            } => {
                self.bar.set_position(input_bytes_done);
                self.bar
                    .set_message(format!("{samples} samples, {quarantined} quarantined"));
            }
            BuildEvent::Quarantined {
                origin,
                reason,
                detail,
            } => {
                let mut n = self.quarantined.lock().unwrap_or_else(|e| e.into_inner());
                *n += 1;
                if *n <= MAX_QUARANTINE_LINES {
                    self.log(&format!("lvpipe: quarantined {origin}: {reason}: {detail}"));
                } else if *n == MAX_QUARANTINE_LINES + 1 {
                    self.log(
                        "lvpipe: more quarantined records: see `lvpipe sql ... FROM quarantine`",
                    );
                }
            }
            BuildEvent::ShardWritten { .. } => {}
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Renders [`TrainEvent`]s: a bar over each stage's steps with its loss and
/// learning rate, a line per stage.
pub struct TrainProgress {
    bar: Mutex<Option<ProgressBar>>,
    /// Abort the process right after this step, as a kill would: the crash
    /// tests' way to stop a run where no clean-up happens (in a group, rank
    /// 0 alone dies).
    abort_after: Option<u64>,
    /// Hang right after this step, as a stuck rank would (tests).
    stall_after: Option<u64>,
    /// Whether this process shows progress: rank 0 of a group only.
    speaks: bool,
}

impl TrainProgress {
    pub fn new(abort_after: Option<u64>, speaks: bool) -> Self {
        TrainProgress {
            bar: Mutex::new(None),
            abort_after,
            stall_after: None,
            speaks,
        }
    }

    /// Hang after step `step` (rank 0 of a group).
    pub fn stall_after(mut self, step: Option<u64>) -> Self {
        self.stall_after = step;
        self
    }

    pub fn on_event(&self, event: TrainEvent) {
        if !self.speaks {
            return;
        }
        let mut bar = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            TrainEvent::Mixing { stage, name } => log(&format!("stage {stage} ({name}): mixing")),
            TrainEvent::Skipped { stage, name, steps } => log(&format!(
                "stage {stage} ({name}): finished earlier ({steps} steps), skipped"
            )),
            TrainEvent::Retraining { stage, name, dir } => log(&format!(
                "stage {stage} ({name}): {} was trained on other data, another recipe or other start weights; training it again",
                dir.display()
            )),
            TrainEvent::AlreadyFinished { dir, state } => log(&format!(
                "{}: stage {} already finished all {} steps; nothing to resume",
                dir.display(),
                state.stage,
                state.steps
            )),
            TrainEvent::SequenceParallel {
                stage,
                name,
                sequence_parallel,
                ranks: 1,
                ..
            } => log(&format!(
                "stage {stage} ({name}): planned for sequence_parallel = {sequence_parallel}; one process trains whole rows (under mpirun with a multiple of {sequence_parallel} ranks, each row is split over {sequence_parallel})"
            )),
            TrainEvent::SequenceParallel {
                stage,
                name,
                sequence_parallel,
                mode,
                ranks,
            } => log(&format!(
                "stage {stage} ({name}): each row split over {sequence_parallel} ranks ({mode}), {} data-parallel groups",
                ranks / sequence_parallel as usize
            )),
            TrainEvent::Started { stage, name } => {
                let b = ProgressBar::new(0);
                b.set_style(
                    ProgressStyle::with_template(
                        "{spinner} {prefix} [{elapsed_precise}] {wide_bar} step {pos}/{len} {msg}",
                    )
                    .expect("valid template"),
                );
                b.set_prefix(format!("stage {stage} {name}"));
                *bar = Some(b);
            }
            TrainEvent::Step { metrics, steps, .. } => {
                if let Some(b) = bar.as_ref() {
                    b.set_length(steps);
                    b.set_position(metrics.step);
                    b.set_message(format!("loss {:.4} lr {:.2e}", metrics.loss, metrics.lr));
                }
                if self.abort_after == Some(metrics.step) {
                    std::process::abort();
                }
                if self.stall_after == Some(metrics.step) {
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(3600));
                    }
                }
            }
            TrainEvent::Finished {
                stage,
                name,
                summary,
                dir,
            } => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                let losses = if summary.first_loss.is_nan() {
                    "no steps".to_string()
                } else {
                    format!("loss {:.4} -> {:.4}", summary.first_loss, summary.last_loss)
                };
                let resumed = summary
                    .resumed_from
                    .map(|s| format!(", resumed after step {s}"))
                    .unwrap_or_default();
                log(&format!(
                    "stage {stage} ({name}): {} steps{resumed}, {losses}, {} tokens in {:.1} s ({:.0} tokens/s), {} trainable parameters; checkpoint in {}",
                    summary.steps,
                    summary.tokens,
                    summary.seconds,
                    summary.tokens as f64 / summary.seconds.max(1e-9),
                    summary.trainable_params,
                    dir.display()
                ));
            }
        }
    }
}

/// Renders [`DemoEvent`]s: phases as log lines, the build and the training
/// as above.
pub struct DemoProgress {
    build: Mutex<Option<BuildProgress>>,
    train: TrainProgress,
}

impl DemoProgress {
    pub fn new() -> Self {
        DemoProgress {
            build: Mutex::new(None),
            train: TrainProgress::new(None, true),
        }
    }

    pub fn on_event(&self, event: DemoEvent) {
        let mut build = self.build.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            DemoEvent::Phase(text) => {
                if let Some(b) = build.take() {
                    b.finish();
                }
                log(&format!("lvpipe demo: {text}"));
            }
            DemoEvent::Build(event) => build.get_or_insert_with(BuildProgress::new).on_event(event),
            DemoEvent::Train(event) => self.train.on_event(event),
        }
    }
}
