//! Each subcommand: resolve arguments into settings, call the library, print.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use lvpipe_pipeline::{Catalog, Loader, Mix, OutputFormat, Recipe, build_mix, render};
use lvpipe_sharding::synth::{Scale, SynthSettings, synthesize};
use lvpipe_sharding::video::{SeekMode, ShortVideos, VideoSettings};
use lvpipe_sharding::{
    BuildSettings, BuildSummary, ImageAspect, ImageLimits, ImageSettings, Registry, SourceSpec,
    build_shards,
};

use crate::args::{
    AspectArg, BuildArgs, Cli, Command, DemoArgs, FormatArg, FrameSeekArg, MixArgs, PlanArgs,
    ScaleArg, ShortVideosArg, SqlArgs, StreamArgs, SynthArgs,
};
use crate::progress::BuildProgress;

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Synth(args) => synth(args),
        Command::BuildShards(args) => build(args),
        Command::Sql(args) => sql(args),
        Command::Plan(args) => plan(args),
        Command::Mix(args) => mix(args),
        Command::Stream(args) => stream(args),
        Command::Train(args) => crate::training::train(args),
        Command::Eval(args) => eval(args),
        Command::Demo(args) => demo(args),
        Command::BenchStep { steps } => {
            let report =
                lvpipe_trainer::bench::train_step_bench(steps).map_err(anyhow::Error::msg)?;
            out(&format!("{report}\n"))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn plan(args: PlanArgs) -> Result<ExitCode> {
    let recipe = Recipe::load(&args.recipe)?;
    let (problems, stages) = runtime()?.block_on(async {
        let catalog = Catalog::open(&args.shards).await?;
        lvpipe_pipeline::plan(&recipe, &catalog).await
    })?;
    if args.json {
        let json =
            serde_json::json!({"ok": problems.is_empty(), "problems": problems, "stages": stages});
        out(&(serde_json::to_string_pretty(&json)? + "\n"))?;
    } else {
        let mut text = format!(
            "{:<3} {:<24} {:>8} {:>9} {:>12} {:>7} {:>6} {:>7} {:>8}\n",
            "#", "stage", "context", "samples", "tokens", "packs", "steps", "epochs", "padding"
        );
        for s in &stages {
            text.push_str(&format!(
                "{:<3} {:<24} {:>8} {:>9} {:>12} {:>7} {:>6} {:>7.2} {:>7.1}%\n",
                s.stage,
                s.name,
                s.context,
                s.samples,
                s.tokens,
                s.packs,
                s.steps,
                s.epochs,
                s.padding * 100.0
            ));
        }
        if problems.is_empty() {
            text.push_str("plan: ok\n");
        } else {
            text.push_str(&format!("plan: {} problem(s):\n", problems.len()));
            for p in &problems {
                text.push_str(&format!("  - {p}\n"));
            }
        }
        out(&text)?;
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn mix(args: MixArgs) -> Result<ExitCode> {
    let recipe = Recipe::load(&args.recipe)?;
    let meta = runtime()?.block_on(async {
        let catalog = Catalog::open(&args.shards).await?;
        build_mix(&catalog, &recipe, args.stage, &args.out).await
    })?;
    out(&format!(
        "stage {} ({}): {} samples in {} packs of {} tokens ({:.1}% padding) -> {}\n",
        meta.stage,
        meta.name,
        meta.samples,
        meta.packs,
        meta.context,
        100.0 * meta.padding as f64 / (meta.packs as f64 * meta.context as f64).max(1.0),
        args.out.join(format!("stage-{}", meta.stage)).display()
    ))?;
    Ok(ExitCode::SUCCESS)
}

fn stream(args: StreamArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let mix = Mix::open(&args.mix)?;
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
        if args.json {
            let packs: Vec<_> = batch
                .packs
                .iter()
                .map(|p| serde_json::json!({"pack_id": p.pack_id, "sample_ids": p.sample_ids, "tokens": p.expanded_tokens, "media": p.num_media}))
                .collect();
            let line = serde_json::json!({"step": batch.step, "rank": batch.rank, "epoch": batch.epoch, "packs": packs});
            text.push_str(&format!("{line}\n"));
        } else {
            let ids: Vec<String> = batch.packs.iter().map(|p| p.pack_id.to_string()).collect();
            let samples: usize = batch.packs.iter().map(|p| p.sample_ids.len()).sum();
            text.push_str(&format!(
                "step {} epoch {} rank {}: packs [{}], {samples} samples\n",
                batch.step,
                batch.epoch,
                batch.rank,
                ids.join(", ")
            ));
        }
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

fn eval(args: crate::args::EvalArgs) -> Result<ExitCode> {
    let settings = crate::eval::EvalSettings {
        run: args.run,
        data: args.data,
        suites: crate::eval::parse_suites(&args.suite)?,
        out: args.out,
        limit: args.limit,
        niah_lengths: args.niah_lengths,
        niah_depths: args.niah_depths,
        niah_trials: args.niah_trials,
        video_frames: args.video_frames,
        clip_frames: args.clip_frames,
    };
    let report = crate::eval::evaluate(&settings, &mut |suite| log(&format!("eval: {suite}")))?;
    out(&crate::eval::summary(&report))?;
    Ok(ExitCode::SUCCESS)
}

/// 1 when a check failed (a strict build met a bad record), 2 otherwise.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    match err.downcast_ref::<lvpipe_sharding::Error>() {
        Some(lvpipe_sharding::Error::Strict { .. }) => 1,
        _ => 2,
    }
}

#[allow(clippy::print_stdout)]
fn out(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

#[allow(clippy::print_stderr)]
pub fn log(text: &str) {
    eprintln!("{text}");
}

fn scale(arg: ScaleArg) -> Scale {
    match arg {
        ScaleArg::Tiny => Scale::Tiny,
        ScaleArg::Small => Scale::Small,
    }
}

fn synth(args: SynthArgs) -> Result<ExitCode> {
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

fn build_settings(args: &BuildArgs) -> Result<BuildSettings> {
    let mut sources = Vec::new();
    if let Some(registry) = &args.registry {
        sources.extend(
            Registry::load(registry).with_context(|| format!("registry {}", registry.display()))?,
        );
    }
    for spec in &args.sources {
        sources.push(SourceSpec::parse(spec, args.media_root.as_deref())?);
    }
    let mut settings = BuildSettings::new(&args.out, &args.tokenizer).with_sources(sources);
    settings.image = ImageSettings {
        size: args.image_size,
        aspect: match args.image_aspect {
            AspectArg::Pad => ImageAspect::Pad,
            AspectArg::Resize => ImageAspect::Resize,
        },
        jpeg_quality: args.jpeg_quality,
        limits: ImageLimits {
            max_pixels: args.max_image_pixels,
            max_bytes: args.max_media_bytes,
        },
    };
    settings.video = VideoSettings {
        policy: args.frames,
        seek: match args.frame_seek {
            FrameSeekArg::Exact => SeekMode::Exact,
            FrameSeekArg::Keyframe => SeekMode::Keyframe,
        },
        short: match args.short_videos {
            ShortVideosArg::Keep => ShortVideos::Keep,
            ShortVideosArg::Quarantine => ShortVideos::Quarantine,
        },
        max_pixels: args.max_video_pixels,
    };
    settings.target_shard_bytes = args.shard_size;
    settings.row_group_rows = args.row_group_rows;
    settings.strict = args.strict;
    settings.overwrite = args.overwrite;
    settings.threads = args.threads;
    settings.dedup = !args.keep_duplicates;
    settings.fail_after_shards = args.fail_after_shards;
    Ok(settings)
}

fn build(args: BuildArgs) -> Result<ExitCode> {
    let settings = build_settings(&args)?;
    let summary = run_build(&settings)?;
    if args.json {
        out(&(serde_json::to_string_pretty(&summary_json(&summary))? + "\n"))?;
    } else {
        out(&summary_text(&summary, &settings.out))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn run_build(settings: &BuildSettings) -> Result<BuildSummary> {
    let progress = BuildProgress::new();
    let result = build_shards(settings, &|event| progress.on_event(event));
    progress.finish();
    Ok(result.with_context(|| format!("build-shards into {}", settings.out.display()))?)
}

fn summary_json(s: &BuildSummary) -> serde_json::Value {
    serde_json::json!({
        "samples": s.samples,
        "quarantined": s.quarantined,
        "quarantined_by_reason": s.by_reason,
        "shards": s.shards,
        "bytes": s.bytes,
        "seconds": s.seconds,
        "resumed_records": s.resumed_records,
        "up_to_date": s.up_to_date,
        "sources": s.manifest.sources,
    })
}

fn summary_text(s: &BuildSummary, out_dir: &Path) -> String {
    let mut text = String::new();
    if s.up_to_date {
        text.push_str(&format!(
            "{} already holds this build (same inputs and settings); nothing to do\n",
            out_dir.display()
        ));
    }
    text.push_str(&format!(
        "{:<14} {:>8} {:>8} {:>11}\n",
        "source", "records", "samples", "quarantined"
    ));
    for src in &s.manifest.sources {
        text.push_str(&format!(
            "{:<14} {:>8} {:>8} {:>11}\n",
            src.name, src.records, src.samples, src.quarantined
        ));
    }
    for (reason, n) in &s.by_reason {
        text.push_str(&format!("  quarantined {reason}: {n}\n"));
    }
    text.push_str(&format!(
        "{} samples, {} quarantined, {} shards, {:.1} MB in {} in {:.1}s{}\n",
        s.samples,
        s.quarantined,
        s.shards,
        s.bytes as f64 / 1e6,
        out_dir.display(),
        s.seconds,
        if s.resumed_records > 0 {
            format!(" (resumed after {} records)", s.resumed_records)
        } else {
            String::new()
        }
    ));
    text
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().build()?)
}

fn sql(args: SqlArgs) -> Result<ExitCode> {
    let format = match args.format {
        FormatArg::Table => OutputFormat::Table,
        FormatArg::Csv => OutputFormat::Csv,
        FormatArg::Json => OutputFormat::Json,
    };
    let text = runtime()?.block_on(async {
        let catalog = match &args.shards {
            Some(shards) => Catalog::open(shards).await?,
            None => Catalog::empty(),
        };
        if let Some(mixes) = &args.mixes {
            catalog.register_mixes(mixes)?;
        }
        if let Some(runs) = &args.runs {
            catalog.register_runs(runs)?;
        }
        let batches = catalog.query(&args.query).await?;
        render(&batches, format)
    })?;
    out(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// The audit queries of the demo report: title and SQL.
const DEMO_QUERIES: [(&str, &str); 4] = [
    (
        "Samples per source and kind",
        "SELECT source, kind, count(*) AS samples, sum(num_text_tokens) AS text_tokens, \
         sum(num_loss_tokens) AS loss_tokens, sum(num_images) AS images \
         FROM samples GROUP BY source, kind ORDER BY source",
    ),
    (
        "Token length distribution per kind",
        "SELECT kind, min(num_text_tokens) AS min, approx_percentile_cont(num_text_tokens, 0.5) AS p50, \
         max(num_text_tokens) AS max FROM samples GROUP BY kind ORDER BY kind",
    ),
    (
        "Quarantine by reason",
        "SELECT source, reason, count(*) AS n FROM quarantine GROUP BY source, reason ORDER BY n DESC",
    ),
    (
        "Shards",
        "SELECT table_name, count(*) AS files, sum(rows) AS rows, sum(bytes) AS bytes FROM manifest GROUP BY table_name",
    ),
];

/// The demo's recipe, shipped in the binary so `lvpipe demo` runs anywhere.
const TINY_RECIPE: &str = include_str!("../recipes/tiny.toml");

fn demo(args: DemoArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let raw = args.out.join("raw");
    let shards = args.out.join("shards");
    log(&format!(
        "lvpipe demo: synthesizing the {:?} corpus into {}",
        args.scale,
        raw.display()
    ));
    let synth = synthesize(&SynthSettings {
        out: raw.clone(),
        scale: scale(args.scale),
        seed: args.seed,
    })?;
    log(&format!(
        "lvpipe demo: building shards into {}",
        shards.display()
    ));
    // The recipe first: shards are built at its model's image size.
    let recipe_path = args.out.join("recipes/tiny.toml");
    fs_err::create_dir_all(args.out.join("recipes"))?;
    match &args.recipe {
        Some(path) => fs_err::copy(path, &recipe_path).map(|_| ())?,
        None => fs_err::write(&recipe_path, TINY_RECIPE)?,
    }
    let recipe = Recipe::load(&recipe_path)?;
    let mut settings = BuildSettings::new(&shards, raw.join("tokenizer.json"))
        .with_sources(Registry::load(&raw.join("registry.toml"))?);
    settings.image.size = recipe.model.image_size;
    settings.target_shard_bytes = 32 << 20;
    settings.overwrite = true;
    let summary = run_build(&settings)?;

    let mut report = format!(
        "# lvpipe demo report\n\nSynthetic corpus: scale {:?}, seed {}, {} files ({:.1} MB).\n\n\
         Shards: {} samples, {} quarantined, {} shards, {:.1} MB, built in {:.1}s.\n",
        args.scale,
        args.seed,
        synth.files,
        synth.bytes as f64 / 1e6,
        summary.samples,
        summary.quarantined,
        summary.shards,
        summary.bytes as f64 / 1e6,
        summary.seconds,
    );
    let expected: u64 = synth.answers.counts.values().sum();
    report.push_str(&format!(
        "\nSamples written vs synthesized: {} of {expected} ({}).\n",
        summary.samples,
        if summary.samples == expected {
            "all present"
        } else {
            "MISMATCH"
        }
    ));
    // The curriculum's data side: the recipe, planned and mixed per stage.
    let mixes = args.out.join("mixes");
    let (tables, problems, plan_text) = runtime()?.block_on(async {
        let catalog = Catalog::open(&shards).await?;
        let mut tables = Vec::new();
        for (title, query) in DEMO_QUERIES {
            tables.push((title, query.to_string(), render(&catalog.query(query).await?, OutputFormat::Table)?));
        }
        log("lvpipe demo: planning and mixing the five stages of recipes/tiny.toml");
        let (problems, stages) = lvpipe_pipeline::plan(&recipe, &catalog).await?;
        let plan_text = serde_json::to_string_pretty(&stages).unwrap_or_default();
        if problems.is_empty() {
            for stage in 1..=recipe.stages.len() {
                build_mix(&catalog, &recipe, stage, &mixes).await?;
            }
            catalog.register_mixes(&mixes)?;
            let query = "SELECT stage, source, selected, too_long, samples, tokens, \
                         round(target_share, 3) AS target, round(realized_share, 3) AS realized \
                         FROM mix_report ORDER BY stage, source";
            tables.push(("Mix report per stage", query.to_string(), render(&catalog.query(query).await?, OutputFormat::Table)?));
            let query = "SELECT stage, count(*) AS packs, sum(tokens) AS tokens, \
                         round(avg(waste * 1.0 / (tokens + waste)), 3) AS padding FROM packs GROUP BY stage ORDER BY stage";
            tables.push(("Packs per stage", query.to_string(), render(&catalog.query(query).await?, OutputFormat::Table)?));
        }
        Ok::<_, lvpipe_pipeline::Error>((tables, problems, plan_text))
    })?;
    report.push_str(&format!(
        "\n## Plan of recipes/tiny.toml\n\n```json\n{plan_text}\n```\n"
    ));
    if !problems.is_empty() {
        report.push_str(&format!(
            "\nPlan problems:\n\n- {}\n",
            problems.join("\n- ")
        ));
    }
    for (title, query, table) in tables {
        report.push_str(&format!(
            "\n## {title}\n\n```sql\n{query}\n```\n\n```\n{table}```\n"
        ));
    }
    // The loader's first global batch of every stage, as a smoke check.
    if problems.is_empty() {
        report.push_str("\n## Loader: first global batch per stage\n\n| stage | packs | samples | max tokens | context |\n|---|---|---|---|---|\n");
        for (i, stage) in recipe.stages.iter().enumerate() {
            let mix = Mix::open(&mixes.join(format!("stage-{}", i + 1)))?;
            let batch = Loader::new(mix, 0, 1)?.batch(0)?;
            let samples: usize = batch.packs.iter().map(|p| p.sample_ids.len()).sum();
            let max = batch
                .packs
                .iter()
                .map(|p| p.expanded_tokens)
                .max()
                .unwrap_or(0);
            report.push_str(&format!(
                "| {} {} | {} | {samples} | {max} | {} |\n",
                i + 1,
                stage.name,
                batch.packs.len(),
                stage.context
            ));
        }
    }
    if problems.is_empty() && !args.no_train {
        report.push_str(&crate::demo::train_and_evaluate(
            &crate::demo::DemoTraining {
                out: &args.out,
                recipe_path: &recipe_path,
                recipe: &recipe,
                shards: &shards,
                mixes: &mixes,
                raw: &raw,
                steps: args.steps,
                eval_limit: args.eval_limit,
            },
        )?);
    }
    let path = args.out.join("report.md");
    fs_err::write(&path, &report)?;
    out(&report)?;
    log(&format!(
        "lvpipe demo: done in {:.1}s; report at {}",
        started.elapsed().as_secs_f64(),
        path.display()
    ));
    Ok(if summary.samples == expected && problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
