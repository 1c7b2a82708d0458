//! The charts of a chain of runs: loss and learning rate over the global
//! steps of every stage, stage starts marked.

use std::path::{Path, PathBuf};

use lvpipe_schemas::StepMetrics;

use crate::Result;
use crate::plot::{Series, line_chart};

/// Writes `loss.png` and `lr.png` into `runs` from the `metrics.jsonl` of
/// its `stage-N` folders; returns their paths (none without metrics).
pub fn plot_runs(runs: &Path) -> Result<Vec<PathBuf>> {
    let dirs = lvpipe_pipeline::lineage::run_dirs(runs)?;
    let (mut loss, mut lr, mut markers) = (Vec::new(), Vec::new(), Vec::new());
    let mut offset = 0u64;
    for dir in dirs.iter().filter(|d| d.as_path() != runs) {
        let steps = StepMetrics::read(&dir.join(StepMetrics::FILE_NAME))
            .map_err(lvpipe_pipeline::Error::from)?;
        let mut last = 0;
        for m in &steps {
            let x = (offset + m.step) as f64;
            loss.push((x, m.loss));
            lr.push((x, m.lr));
            last = last.max(m.step);
        }
        if let Some(first) = steps.first() {
            markers.push(((offset + 1) as f64, format!("S{}", first.stage)));
        }
        offset += last;
    }
    if loss.is_empty() {
        return Ok(vec![]);
    }
    let paths = vec![runs.join("loss.png"), runs.join("lr.png")];
    line_chart(
        &paths[0],
        "Training loss across the curriculum",
        "global step",
        "loss",
        &[Series {
            label: "loss".into(),
            points: loss,
        }],
        &markers,
    )?;
    line_chart(
        &paths[1],
        "Learning rate (warmup, then cosine or constant; reset per stage)",
        "global step",
        "lr",
        &[Series {
            label: "lr".into(),
            points: lr,
        }],
        &markers,
    )?;
    Ok(paths)
}
