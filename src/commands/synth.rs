//! `lvpipe synth`: a synthetic corpus with known answers.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use lvpipe_synth::{SynthSettings, synthesize};

use super::{out, scale};
use crate::args::SynthArgs;

pub fn run(args: SynthArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let settings = SynthSettings {
        out: args.out.clone(),
        scale: scale(args.scale),
        seed: args.seed,
    };
    let summary =
        synthesize(&settings).with_context(|| format!("synth into {}", args.out.display()))?;
    let mut text = String::new();
    for (source, count) in &summary.answers.counts {
        text.push_str(&format!("{source:<12} {count:>6} samples\n"));
    }
    text.push_str(&format!(
        "wrote {} files ({:.1} MB) to {} in {:.1}s; answers in answers.json, sources in registry.toml\n",
        summary.files,
        summary.bytes as f64 / 1e6,
        args.out.display(),
        started.elapsed().as_secs_f64()
    ));
    out(&text)?;
    Ok(ExitCode::SUCCESS)
}
