//! Progress bars and log lines on stderr for long work.

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};
use lvpipe_sharding::BuildEvent;

/// Quarantine lines printed before they are only counted.
const MAX_QUARANTINE_LINES: u64 = 10;

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
    fn log(&self, line: String) {
        #[allow(clippy::print_stderr)]
        self.bar.suspend(|| eprintln!("{line}"));
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
                    self.log(format!(
                        "lvpipe: resuming after {resumed_records} records ({resumed_shards} shards already written)"
                    ));
                }
            }
            BuildEvent::Progress {
                input_bytes_read,
                samples,
                quarantined,
            } => {
                self.bar.set_position(input_bytes_read);
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
                    self.log(format!("lvpipe: quarantined {origin}: {reason}: {detail}"));
                } else if *n == MAX_QUARANTINE_LINES + 1 {
                    self.log(
                        "lvpipe: more quarantined records: see `lvpipe sql ... FROM quarantine`"
                            .into(),
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

/// A bar over training steps, with the loss and learning rate as its message.
pub fn steps_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {prefix} [{elapsed_precise}] {wide_bar} step {pos}/{len} {msg}",
        )
        .expect("valid template"),
    );
    bar
}
