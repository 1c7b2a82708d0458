//! `lvpipe bench-memory`: peak memory and tokens/s of one long-context
//! training step per context, with and without activation checkpointing,
//! each setting in a fresh process (a process's peak memory never falls).

use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use lvpipe_eval::plot::{Series, line_chart};
use lvpipe_pipeline::recipe::Recipe;
use serde_json::Value;

use super::out;
use crate::args::BenchMemoryArgs;
use crate::progress::log;

pub fn run(args: BenchMemoryArgs) -> Result<ExitCode> {
    let recipe = Recipe::load(&args.recipe)?;
    let optimizer = args.optimizer;
    if let Some(context) = args.one {
        let report = lvpipe_trainer::bench::memory_step_bench(
            &recipe.model,
            context,
            args.checkpointing == Some(true),
            optimizer,
            args.steps,
            &lvpipe_trainer::device::parse(&args.device)?,
            lvpipe_trainer::device::parse_dtype(&args.dtype)?,
        )?;
        out(&format!("{report}\n"))?;
        return Ok(ExitCode::SUCCESS);
    }
    let modes = match args.checkpointing {
        Some(on) => vec![on],
        None => vec![false, true],
    };
    let exe = std::env::current_exe().context("the lvpipe executable")?;
    let mut rows: Vec<Value> = Vec::new();
    for &context in &args.contexts {
        for &on in &modes {
            let child = Command::new(&exe)
                .args(["bench-memory", "--recipe"])
                .arg(&args.recipe)
                .args(["--one", &context.to_string()])
                .args(["--checkpointing", &on.to_string()])
                .args(["--optimizer", optimizer.as_str()])
                .args(["--steps", &args.steps.to_string()])
                .args(["--device", &args.device, "--dtype", &args.dtype])
                .output()
                .context("starting a benchmark process")?;
            let row = if child.status.success() {
                serde_json::from_slice(&child.stdout).context("a benchmark process's report")?
            } else {
                // Out of memory or another failure: reported, the rest goes on.
                let err = String::from_utf8_lossy(&child.stderr);
                serde_json::json!({
                    "context": context,
                    "gradient_checkpointing": on,
                    "optimizer": optimizer.as_str(),
                    "error": format!("{} {}", child.status, err.trim()),
                })
            };
            log(&row.to_string());
            rows.push(row);
        }
    }
    plot(&args.plot, &rows)?;
    if args.json {
        out(&format!("{}\n", serde_json::to_string_pretty(&rows)?))?;
    } else {
        out(&table(&rows))?;
    }
    log(&format!("wrote {}", args.plot.display()));
    if rows.iter().all(|r| r.get("error").is_some()) {
        bail!("every setting failed")
    }
    Ok(ExitCode::SUCCESS)
}

/// What the peak is read from: the GPU's memory pool where the step ran
/// on one, else the process's resident memory. (key, its "before the
/// step" key, label).
fn measured(rows: &[Value]) -> (&'static str, &'static str, &'static str) {
    match rows.iter().any(|r| r["peak_device_mb"].is_number()) {
        true => ("peak_device_mb", "device_before_step_mb", "device"),
        false => ("peak_rss_mb", "rss_before_step_mb", "RSS"),
    }
}

fn table(rows: &[Value]) -> String {
    let (peak, before, what) = measured(rows);
    let mut text = format!(
        "{:>8} {:>13} {:>12} {:>15} {:>9} {:>10}\n",
        "context",
        "checkpointing",
        format!("peak {what} MB"),
        "before step MB",
        "step s",
        "tokens/s"
    );
    for r in rows {
        let num = |k: &str, digits: usize| {
            r[k].as_f64()
                .map_or("-".to_string(), |v| format!("{v:.digits$}"))
        };
        if let Some(e) = r.get("error") {
            text.push_str(&format!(
                "{:>8} {:>13} failed: {}\n",
                r["context"].to_string(),
                r["gradient_checkpointing"].to_string(),
                e.as_str().unwrap_or_default()
            ));
            continue;
        }
        text.push_str(&format!(
            "{:>8} {:>13} {:>12} {:>15} {:>9} {:>10}\n",
            r["context"].to_string(),
            r["gradient_checkpointing"].to_string(),
            num(peak, 0),
            num(before, 0),
            num("step_s", 2),
            num("tokens_per_s", 0)
        ));
    }
    text
}

/// Peak memory against context, one line per checkpointing setting.
fn plot(path: &Path, rows: &[Value]) -> Result<()> {
    let (peak, _, what) = measured(rows);
    let series: Vec<Series> = [false, true]
        .into_iter()
        .map(|on| Series {
            label: match on {
                true => "checkpointed".into(),
                false => "plain".into(),
            },
            points: rows
                .iter()
                .filter(|r| r["gradient_checkpointing"] == on)
                .filter_map(|r| Some((r["context"].as_f64()?, r[peak].as_f64()?)))
                .collect(),
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    line_chart(
        path,
        &format!("Peak {what} memory of one training step"),
        "context (tokens)",
        "MB",
        &series,
        &[],
    )?;
    Ok(())
}
