//! `lvpipe generate`: a prompt answered by a model folder.

use std::process::ExitCode;

use anyhow::Result;
use lvpipe_eval::generate::{GenerateSettings, generate};
use lvpipe_trainer::model::Sampling;

use super::out;
use crate::args::GenerateArgs;
use crate::progress::log;

pub fn run(args: GenerateArgs) -> Result<ExitCode> {
    let settings = GenerateSettings {
        model: args.model,
        tokenizer: args.tokenizer,
        prompt: args.prompt,
        images: args.image,
        videos: args.video,
        frames: args.frames,
        max_new_tokens: args.max_new_tokens,
        raw: args.raw,
        sampling: Sampling {
            temperature: args.temperature,
            top_p: args.top_p,
            seed: args.seed,
        },
        device: args.device,
        dtype: args.dtype,
    };
    let g = generate(&settings)?;
    match args.json {
        true => out(&format!("{}\n", serde_json::to_string(&g)?))?,
        false => {
            out(&format!("{}\n", g.text))?;
            log(&format!(
                "{} prompt tokens, {} generated, {:.1} tokens/s",
                g.prompt_tokens.len(),
                g.tokens.len(),
                g.tokens_per_second
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}
