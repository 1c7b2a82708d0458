//! `lvpipe demo`: the whole chain on the synthetic corpus, with a report.
//!
//! A corpus is synthesized, built into shards at the recipe's image size and
//! audited with SQL; the recipe is planned and every stage mixed, and the
//! loader's first batch of each read back; then the stages are trained in
//! a chain and evaluated after stages 1, 3 and the last. The Markdown report
//! (`report.md`) holds the audit tables, the training table, the plots and
//! the evaluation.

use std::path::{Path, PathBuf};
use std::time::Instant;

use lvpipe_pipeline::{Catalog, Loader, Mix, OutputFormat, Recipe, build_mix, render};
use lvpipe_sharding::{BuildEvent, BuildSettings, BuildSummary, SourceSpec, build_shards};
use lvpipe_synth::{Scale, SynthSettings, SynthSummary, synthesize};
use lvpipe_trainer::{Chain, Summary, TrainEvent, chain};

use crate::{EvalReport, EvalSettings, Result, Suite, evaluate};

/// The demo's recipe, shipped in the binary so the demo runs anywhere.
pub const TINY_RECIPE: &str = include_str!("../../recipes/tiny.toml");

/// The audit queries of the report: title and SQL.
const AUDIT_QUERIES: [(&str, &str); 4] = [
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

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoSettings {
    /// Folder for everything it writes (raw/, shards/, mixes/, runs/,
    /// eval/, report.md).
    pub out: PathBuf,
    pub scale: Scale,
    /// Seed of the synthetic corpus.
    pub seed: u64,
    /// A recipe file instead of the shipped `recipes/tiny.toml`.
    pub recipe: Option<PathBuf>,
    /// Cap every stage at this many steps.
    pub steps: Option<u64>,
    /// Stop after the data side: no training or evaluation.
    pub no_train: bool,
    /// At most this many questions per evaluation suite (0: all).
    pub eval_limit: usize,
}

/// What happens during the demo, for a progress display.
#[derive(Debug)]
pub enum DemoEvent<'a> {
    /// A phase starts.
    Phase(String),
    Build(BuildEvent),
    Train(TrainEvent<'a>),
}

/// What the demo found.
#[derive(Debug, Clone)]
pub struct DemoOutcome {
    /// The Markdown report, also written to `report.md`.
    pub report: String,
    pub report_path: PathBuf,
    /// Every synthesized sample reached the shards and the recipe planned
    /// without problems.
    pub ok: bool,
    /// The curriculum's goals checked on the evaluations (also in
    /// `goals.json` and the report); empty without training.
    pub goals: Vec<crate::goals::GoalCheck>,
}

/// Runs the demo (see the module docs).
pub fn run(s: &DemoSettings, on_event: &(dyn Fn(DemoEvent) + Sync)) -> Result<DemoOutcome> {
    let started = Instant::now();
    let raw = s.out.join("raw");
    let shards = s.out.join("shards");
    let phase = |text: String| on_event(DemoEvent::Phase(text));
    phase(format!(
        "synthesizing the {:?} corpus into {}",
        s.scale,
        raw.display()
    ));
    let synth = synthesize(&SynthSettings {
        out: raw.clone(),
        scale: s.scale,
        seed: s.seed,
    })?;
    // The recipe first: shards are built at its model's image size.
    let recipe_path = s.out.join("recipes/tiny.toml");
    fs_err::create_dir_all(s.out.join("recipes"))?;
    match &s.recipe {
        Some(path) => fs_err::copy(path, &recipe_path).map(|_| ())?,
        None => fs_err::write(&recipe_path, TINY_RECIPE)?,
    }
    let recipe = Recipe::load(&recipe_path)?;
    phase(format!("building shards into {}", shards.display()));
    let mut settings = BuildSettings::new(&shards, raw.join("tokenizer.json"))
        .with_sources(SourceSpec::from_registry(&raw.join("registry.toml"))?);
    settings.image.size = recipe.model.image_size;
    settings.target_shard_bytes = 32 << 20;
    settings.overwrite = true;
    let built = build_shards(&settings, &|event| on_event(DemoEvent::Build(event)))?;
    let mut report = data_section(s, &synth, &built);
    let expected: u64 = synth.answers.counts.values().sum();
    let mixes = s.out.join("mixes");
    phase("planning and mixing the recipe's stages".to_string());
    let problems = audit_and_mix(&recipe, &shards, &mixes, &mut report)?;
    let mut goals = Vec::new();
    if problems.is_empty() {
        report.push_str(&loader_section(&recipe, &mixes)?);
        if !s.no_train {
            let paths = Paths {
                recipe: &recipe_path,
                shards: &shards,
                mixes: &mixes,
                raw: &raw,
            };
            let (text, evals) = train_and_evaluate(s, &recipe, &paths, on_event)?;
            let (short, lengths) = needle_lengths(&recipe);
            goals = crate::goals::check(
                &evals,
                short,
                recipe.stages.len(),
                lengths[1],
                started.elapsed().as_secs_f64(),
            );
            let json = serde_json::to_string_pretty(&goals).expect("goals serialize") + "\n";
            fs_err::write(s.out.join("goals.json"), json)?;
            // The goals first: what a reader looks for.
            let at = report.find("\n## ").unwrap_or(report.len());
            report.insert_str(at, &crate::goals::section(&goals));
            report.push_str(&text);
        }
    }
    let report_path = s.out.join("report.md");
    fs_err::write(&report_path, &report)?;
    Ok(DemoOutcome {
        report,
        report_path,
        ok: built.samples == expected && problems.is_empty(),
        goals,
    })
}

/// The corpus and the shards in numbers.
fn data_section(s: &DemoSettings, synth: &SynthSummary, built: &BuildSummary) -> String {
    let expected: u64 = synth.answers.counts.values().sum();
    format!(
        "# lvpipe demo report\n\nSynthetic corpus: scale {:?}, seed {}, {} files ({:.1} MB).\n\n\
         Shards: {} samples, {} quarantined, {} shards, {:.1} MB, built in {:.1}s.\n\
         \nSamples written vs synthesized: {} of {expected} ({}).\n",
        s.scale,
        s.seed,
        synth.files,
        synth.bytes as f64 / 1e6,
        built.samples,
        built.quarantined,
        built.shards,
        built.bytes as f64 / 1e6,
        built.seconds,
        built.samples,
        if built.samples == expected {
            "all present"
        } else {
            "MISMATCH"
        }
    )
}

/// The audit queries, the plan, and (when it has no problems) every stage
/// mixed with its mix report and packs; returns the plan's problems.
fn audit_and_mix(
    recipe: &Recipe,
    shards: &Path,
    mixes: &Path,
    report: &mut String,
) -> Result<Vec<String>> {
    let runtime = tokio::runtime::Builder::new_multi_thread().build()?;
    let (tables, problems, plan_text) = runtime.block_on(async {
        let catalog = Catalog::open(shards).await?;
        let mut tables = Vec::new();
        for (title, query) in AUDIT_QUERIES {
            let rendered = render(&catalog.query(query).await?, OutputFormat::Table)?;
            tables.push((title, query.to_string(), rendered));
        }
        let (problems, stages) = lvpipe_pipeline::plan(recipe, &catalog).await?;
        let plan_text = serde_json::to_string_pretty(&stages).unwrap_or_default();
        if problems.is_empty() {
            for stage in 1..=recipe.stages.len() {
                build_mix(&catalog, recipe, stage, mixes).await?;
            }
            catalog.register_mixes(mixes)?;
            for (title, query) in [
                (
                    "Mix report per stage",
                    "SELECT stage, source, selected, too_long, samples, tokens, \
                     round(target_share, 3) AS target, round(realized_share, 3) AS realized \
                     FROM mix_report ORDER BY stage, source",
                ),
                (
                    "Packs per stage",
                    "SELECT stage, count(*) AS packs, sum(tokens) AS tokens, \
                     round(avg(waste * 1.0 / (tokens + waste)), 3) AS padding FROM packs GROUP BY stage ORDER BY stage",
                ),
            ] {
                let rendered = render(&catalog.query(query).await?, OutputFormat::Table)?;
                tables.push((title, query.to_string(), rendered));
            }
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
    Ok(problems)
}

/// The loader's first global batch of every stage, as a smoke check.
fn loader_section(recipe: &Recipe, mixes: &Path) -> Result<String> {
    let mut text = String::from(
        "\n## Loader: first global batch per stage\n\n| stage | packs | samples | max tokens | context |\n|---|---|---|---|---|\n",
    );
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
        text.push_str(&format!(
            "| {} {} | {} | {samples} | {max} | {} |\n",
            i + 1,
            stage.name,
            batch.packs.len(),
            stage.context
        ));
    }
    Ok(text)
}

/// Where the demo's inputs are.
struct Paths<'a> {
    recipe: &'a Path,
    shards: &'a Path,
    mixes: &'a Path,
    /// The synthetic corpus (answers and the held-out set).
    raw: &'a Path,
}

/// Trains every stage, evaluates, and returns the report's section and the
/// evaluations.
fn train_and_evaluate(
    s: &DemoSettings,
    recipe: &Recipe,
    p: &Paths,
    on_event: &(dyn Fn(DemoEvent) + Sync),
) -> Result<(String, Vec<(usize, EvalReport)>)> {
    let started = Instant::now();
    let runs = s.out.join("runs");
    let stages = recipe.stages.len();
    on_event(DemoEvent::Phase(format!(
        "training stages 1 to {stages} into {}",
        runs.display()
    )));
    let trained = chain(
        &Chain {
            recipe: p.recipe,
            shards: p.shards,
            tokenizer: &p.raw.join("tokenizer.json"),
            out: &runs,
            mixes: Some(p.mixes),
            stages: (1, stages),
            steps: s.steps,
            clip: 1.0,
            save_every: 50,
            gradient_checkpointing: false,
            device: "cpu".into(),
            dtype: "f32".into(),
        },
        &mut |event| on_event(DemoEvent::Train(event)),
    )?;
    crate::charts::plot_runs(&runs)?;
    let train_seconds = started.elapsed().as_secs_f64();
    let mut text = training_table(recipe, &trained, train_seconds);

    // Needles at the short-SFT context and at four times it.
    let (_, lengths) = needle_lengths(recipe);
    let mut points = vec![(1, vec![Suite::Vqa])];
    if stages >= 3 {
        points.push((3, vec![Suite::Vqa, Suite::NiahText, Suite::Ppl]));
    }
    if stages > 3 {
        points.push((stages, Suite::ALL.to_vec()));
    }
    let mut evals: Vec<(usize, EvalReport)> = Vec::new();
    for (stage, suites) in points {
        let names: Vec<&str> = suites.iter().map(|s| s.as_str()).collect();
        on_event(DemoEvent::Phase(format!(
            "evaluating stage {stage} ({})",
            names.join(", ")
        )));
        let mut settings = EvalSettings::new(
            runs.join(format!("stage-{stage}")),
            p.raw,
            s.out.join(format!("eval/stage-{stage}")),
            suites,
        );
        settings.limit = s.eval_limit;
        settings.niah_lengths = lengths.to_vec();
        // A short evaluation (tests) asks one needle per cell, and fewer
        // V-NIAH cells.
        let quick = s.eval_limit > 0 && s.eval_limit < 20;
        settings.niah_trials = if quick { 1 } else { 4 };
        if quick {
            settings.vniah_frames = vec![8, 16];
            settings.vniah_depths = vec![0.0, 0.5, 1.0];
        }
        settings.video_frames.truncate(1);
        evals.push((stage, evaluate(&settings, &mut |_| {})?));
    }
    text.push_str(&evaluation_tables(&evals, &lengths, &s.out));
    text.push_str(&format!(
        "\nTraining and evaluation took {:.0} s.\n",
        started.elapsed().as_secs_f64()
    ));
    Ok((text, evals))
}

/// The short-SFT stage (the third, or the last of fewer) and the text
/// needle lengths the demo measures: its context and four times it.
fn needle_lengths(recipe: &Recipe) -> (usize, [usize; 2]) {
    let stage = recipe.stages.len().min(3);
    let context = stage
        .checked_sub(1)
        .map_or(512, |i| recipe.stages[i].context as usize);
    (stage, [context, 4 * context])
}

fn training_table(recipe: &Recipe, trained: &[(usize, Summary)], seconds: f64) -> String {
    let mut text = format!(
        "\n## Training\n\n{} stages in {seconds:.0} s on CPU.\n\n\
         | stage | steps | loss (first -> last) | tokens | seconds | tokens/s | trainable parameters |\n\
         |---|---|---|---|---|---|---|\n",
        trained.len()
    );
    for (number, s) in trained {
        text.push_str(&format!(
            "| {number} {} | {} | {:.3} -> {:.3} | {} | {:.1} | {:.0} | {} |\n",
            recipe.stages[number - 1].name,
            s.steps,
            s.first_loss,
            s.last_loss,
            s.tokens,
            s.seconds,
            s.tokens as f64 / s.seconds.max(1e-9),
            s.trainable_params
        ));
    }
    text.push_str("\n![loss](runs/loss.png)\n\n![learning rate](runs/lr.png)\n");
    text
}

fn evaluation_tables(evals: &[(usize, EvalReport)], lengths: &[usize], out: &Path) -> String {
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{:.1}%", x * 100.0));
    let mut text = format!(
        "\n## Evaluation (held-out synthetic set)\n\n\
         | after stage | VQA | VQA chance | needle @{} | needle @{} | V-NIAH | perplexity |\n\
         |---|---|---|---|---|---|---|\n",
        lengths[0], lengths[1]
    );
    for (stage, r) in evals {
        let needle = |length: usize| pct(r.niah_text.as_ref().and_then(|n| n.at(length)));
        text.push_str(&format!(
            "| {stage} | {} | {} | {} | {} | {} | {} |\n",
            pct(r.headline(Suite::Vqa)),
            pct(r.vqa.as_ref().map(|v| v.chance)),
            needle(lengths[0]),
            needle(lengths[1]),
            pct(r.headline(Suite::NiahVideo)),
            r.headline(Suite::Ppl)
                .map_or("-".to_string(), |p| format!("{p:.2}")),
        ));
    }
    for (stage, r) in evals {
        if let Some(vqa) = &r.vqa {
            text.push_str(&format!(
                "\nVQA after stage {stage}, by question:\n\n| modality | attribute | n | accuracy | chance |\n|---|---|---|---|---|\n"
            ));
            for row in &vqa.table {
                text.push_str(&format!(
                    "| {} | {} | {} | {} | {} |\n",
                    row.modality,
                    row.attribute,
                    row.score.n,
                    pct(Some(row.score.accuracy)),
                    pct(Some(row.chance)),
                ));
            }
        }
        for plot in ["niah_text.png", "niah_video.png", "niah_video_flash.png"] {
            if out.join(format!("eval/stage-{stage}/{plot}")).exists() {
                text.push_str(&format!(
                    "\n![{plot} after stage {stage}](eval/stage-{stage}/{plot})\n"
                ));
            }
        }
    }
    text
}
