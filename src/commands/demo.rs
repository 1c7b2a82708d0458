//! `lvpipe demo`: the whole chain on the synthetic corpus, with a report.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use lvpipe_eval::demo::{self, DemoSettings};

use super::{out, scale};
use crate::args::DemoArgs;
use crate::progress::{DemoProgress, log};

pub fn run(args: DemoArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let settings = DemoSettings {
        out: args.out,
        scale: scale(args.scale),
        seed: args.seed,
        recipe: args.recipe,
        steps: args.steps,
        no_train: args.no_train,
        eval_limit: args.eval_limit,
    };
    let progress = DemoProgress::new();
    let outcome = demo::run(&settings, &|event| progress.on_event(event))?;
    out(&outcome.report)?;
    if !outcome.goals.is_empty() {
        let held = outcome.goals.iter().filter(|g| g.holds).count();
        log(&format!(
            "lvpipe demo: {held} of {} goals hold",
            outcome.goals.len()
        ));
        for g in outcome.goals.iter().filter(|g| !g.holds) {
            log(&format!("  {}: {}", g.goal, g.verdict()));
        }
    }
    log(&format!(
        "lvpipe demo: done in {:.1}s; report at {}",
        started.elapsed().as_secs_f64(),
        outcome.report_path.display()
    ));
    Ok(if outcome.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
