//! What a trained stage can do, scored against the synthetic corpus's known
//! answers; the charts of a run; and the demo that runs the whole chain.
//!
//! This crate sits at the end of the data flow (shards -> mixes -> loader ->
//! trainer -> eval). [`evaluate`] loads a stage's run folder (config.json,
//! model.safetensors, tokenizer.json), runs the [`Suite`]s on the held-out
//! set that `lvpipe_synth` wrote, and returns an [`EvalReport`], also written
//! as `eval.json` with heatmaps beside it. [`demo::run`] synthesizes a
//! corpus, builds and audits its shards, mixes and trains the recipe's
//! stages and evaluates them, and returns the Markdown report.
//!
//! ```no_run
//! use lvpipe_eval::{EvalSettings, Suite, evaluate};
//! # fn main() -> lvpipe_eval::Result<()> {
//! let settings = EvalSettings::new("runs/stage-5", "raw", "eval", vec![Suite::Vqa, Suite::NiahText]);
//! let report = evaluate(&settings, &mut |_suite| {})?;
//! print!("{}", report.summary());
//! # Ok(()) }
//! ```

pub mod charts;
pub mod demo;
mod error;
mod evaluator;
pub mod generate;
pub mod goals;
mod niah;
pub mod plot;
mod ppl;
mod report;
mod settings;
mod vqa;

pub use error::{Error, Result};
pub use evaluator::Evaluator;
pub use report::{
    EvalReport, NiahCell, NiahTextReport, NiahVideoCell, NiahVideoReport, PplRange, PplReport,
    VniahCell, VniahMiss, VqaReport, VqaRow,
};
pub use settings::{EvalSettings, Suite};

/// Runs the suites of `settings` and writes `eval.json` (and the heatmaps)
/// into `settings.out`. `on_suite` hears each suite as it starts.
pub fn evaluate(settings: &EvalSettings, on_suite: &mut dyn FnMut(Suite)) -> Result<EvalReport> {
    let device = lvpipe_trainer::device::parse(&settings.device)?;
    let mut ev = Evaluator::load_on(&settings.run, None, &device)?;
    ev.compute_in(lvpipe_trainer::device::parse_dtype(&settings.dtype)?);
    let answers = lvpipe_synth::Answers::load(&settings.data)?;
    fs_err::create_dir_all(&settings.out)?;
    let mut report = EvalReport {
        run: settings.run.display().to_string(),
        stage: ev.stage(),
        ..EvalReport::default()
    };
    for &suite in &settings.suites {
        on_suite(suite);
        match suite {
            Suite::Vqa => report.vqa = Some(vqa::run(&ev, settings, &answers)?),
            Suite::NiahText => report.niah_text = Some(niah::text(&ev, settings)?),
            Suite::NiahVideo => report.niah_video = Some(niah::video(&ev, settings, &answers)?),
            Suite::Ppl => report.ppl = Some(ppl::run(&ev, settings)?),
        }
    }
    let json = serde_json::to_string_pretty(&report).expect("the report serializes") + "\n";
    fs_err::write(settings.out.join("eval.json"), json)?;
    Ok(report)
}
