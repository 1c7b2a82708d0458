//! `lvpipe eval`: a trained stage scored on the synthetic held-out set.

use std::process::ExitCode;

use anyhow::Result;
use lvpipe_eval::{EvalSettings, Suite, evaluate};

use super::out;
use crate::args::EvalArgs;
use crate::progress::log;

pub fn run(args: EvalArgs) -> Result<ExitCode> {
    let settings = EvalSettings {
        suites: Suite::parse_list(&args.suite)?,
        limit: args.limit,
        niah_lengths: args.niah_lengths,
        niah_depths: args.niah_depths,
        niah_trials: args.niah_trials,
        vniah_frames: args.vniah_frames,
        vniah_depths: args.vniah_depths,
        video_frames: args.video_frames,
        clip_frames: args.clip_frames,
        device: args.device,
        dtype: args.dtype,
        ..EvalSettings::new(args.run, args.data, args.out, vec![])
    };
    let report = evaluate(&settings, &mut |suite| log(&format!("eval: {suite}")))?;
    out(&report.summary())?;
    Ok(ExitCode::SUCCESS)
}
