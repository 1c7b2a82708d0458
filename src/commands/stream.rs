//! `lvpipe stream`: the batches the loader gives one rank.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use lvpipe_pipeline::{Batch, Loader, Mix};

use super::{local_mix, out};
use crate::args::StreamArgs;
use crate::progress::log;

pub fn run(args: StreamArgs) -> Result<ExitCode> {
    let mix_dir = local_mix(&args.mix, args.cache.as_deref(), args.cache_size)?;
    let started = Instant::now();
    let mix = Mix::open(&mix_dir)?;
    let opened = started.elapsed();
    let loader = Loader::new(mix, args.rank, args.world_size)?;
    let mut text = String::new();
    let (mut first, mut batches, mut tokens) = (None, 0u64, 0u64);
    for batch in loader.stream(args.from_step, args.steps, 2) {
        let batch = batch?;
        first.get_or_insert_with(|| started.elapsed());
        batches += 1;
        tokens += batch
            .packs
            .iter()
            .map(|p| p.input_ids.len() as u64)
            .sum::<u64>();
        text.push_str(&describe(&batch, args.json));
    }
    out(&text)?;
    let secs = started.elapsed().as_secs_f64();
    log(&format!(
        "{batches} batches, {tokens} tokens in {secs:.3} s ({:.1} M tokens/s); mix opened in {:.1} ms, first batch after {:.1} ms",
        tokens as f64 / secs / 1e6,
        opened.as_secs_f64() * 1e3,
        first.unwrap_or_default().as_secs_f64() * 1e3,
    ));
    Ok(ExitCode::SUCCESS)
}

/// One line per batch: a JSON object, or a summary.
fn describe(batch: &Batch, json: bool) -> String {
    if json {
        let packs: Vec<_> = batch
            .packs
            .iter()
            .map(|p| serde_json::json!({"pack_id": p.pack_id, "sample_ids": p.sample_ids, "tokens": p.expanded_tokens, "media": p.num_media}))
            .collect();
        let line = serde_json::json!({"step": batch.step, "rank": batch.rank, "epoch": batch.epoch, "packs": packs});
        format!("{line}\n")
    } else {
        let ids: Vec<String> = batch.packs.iter().map(|p| p.pack_id.to_string()).collect();
        let samples: usize = batch.packs.iter().map(|p| p.sample_ids.len()).sum();
        format!(
            "step {} epoch {} rank {}: packs [{}], {samples} samples\n",
            batch.step,
            batch.epoch,
            batch.rank,
            ids.join(", ")
        )
    }
}
