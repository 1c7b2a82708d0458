//! `lvpipe train`: one stage, a chain of stages (`--stages 1-5`), or a
//! resume (`--resume DIR`).

use std::process::ExitCode;

use anyhow::{Result, bail};
use lvpipe_trainer::chain::StartFolder;
use lvpipe_trainer::{Chain, RunSpec, TrainEvent, chain, resume, train_stage};

use crate::args::TrainArgs;
use crate::progress::{TrainProgress, log};

pub fn run(args: TrainArgs) -> Result<ExitCode> {
    // Under `mpirun`/`srun`, this process is one rank of the group.
    let group = lvpipe_trainer::dist::init()?;
    let progress =
        TrainProgress::new(args.abort_after, group.is_root()).stall_after(args.stall_after);
    let on_event = &mut |event: TrainEvent| progress.on_event(event);
    if let Some(dir) = &args.resume {
        resume(dir, on_event)?;
        return Ok(ExitCode::SUCCESS);
    }
    let (Some(recipe), Some(tokenizer), Some(out)) = (&args.recipe, &args.tokenizer, &args.out)
    else {
        bail!("give --recipe, --tokenizer and --out (or --resume DIR)");
    };
    if let Some(stages) = args.stages {
        let Some(shards) = &args.shards else {
            bail!("--stages needs --shards");
        };
        let c = Chain {
            recipe,
            shards,
            tokenizer,
            out,
            mixes: None,
            stages,
            steps: args.steps,
            clip: args.clip,
            save_every: args.save_every,
            gradient_checkpointing: args.gradient_checkpointing,
            device: args.device.clone(),
            dtype: args.dtype.clone(),
        };
        chain(&c, on_event)?;
        if !group.is_root() {
            return Ok(ExitCode::SUCCESS);
        }
        let plots = lvpipe_eval::charts::plot_runs(out)?;
        if !plots.is_empty() {
            let names: Vec<String> = plots.iter().map(|p| p.display().to_string()).collect();
            log(&format!("plots: {}", names.join(", ")));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (Some(stage), Some(mix)) = (args.stage, &args.mix) else {
        bail!("give --stage N with --mix DIR, or --stages A-B with --shards DIR");
    };
    let spec = RunSpec {
        recipe: recipe.clone(),
        stage,
        mix: super::local_mix(mix, args.cache.as_deref(), args.cache_size)?,
        tokenizer: tokenizer.clone(),
        init: args.init.iter().map(StartFolder::all).collect(),
        steps: args.steps,
        clip: args.clip,
        save_every: args.save_every,
        gradient_checkpointing: args.gradient_checkpointing,
        device: args.device.clone(),
        dtype: args.dtype.clone(),
    };
    train_stage(&spec, out, false, on_event)?;
    Ok(ExitCode::SUCCESS)
}
