//! The needle suites: a planted fact retrieved from filler documents of
//! several lengths (`niah_text`), and a shape that flashes for two seconds
//! in a long video (`niah_video`), each by depth, with heatmaps.

use lvpipe_pipeline::splitmix;
use lvpipe_schemas::FramePolicy;
use lvpipe_synth::{Answers, eval_needle, filler_sentences, needle_fact, needle_prompt};
use rayon::prelude::*;

use crate::plot::heatmap;
use crate::report::{
    NiahCell, NiahLength, NiahMiss, NiahTextReport, NiahVideoCell, NiahVideoReport, Score,
};
use crate::vqa::normalize;
use crate::{EvalSettings, Evaluator, Result};

/// Wrong answers kept in the report.
const MISSES_KEPT: usize = 8;
/// Chance of naming the flashing shape: 6 colours x 3 shapes.
const VIDEO_CHANCE: f64 = 1.0 / 18.0;

/// A filler document of about `tokens` tokens with `fact` at `depth`,
/// ending with `tail`; from `seed`.
pub(crate) fn haystack(
    ev: &Evaluator,
    seed: u64,
    tokens: usize,
    fact: &str,
    depth: f64,
    tail: &str,
) -> Result<Vec<u32>> {
    let tok = &ev.tokenizer;
    let reserve = tok.encode(fact)?.len() + tok.encode(tail)?.len() + 2;
    let budget = tokens.saturating_sub(reserve);
    let mut sentences = Vec::new();
    let mut used = 0;
    for sentence in filler_sentences(seed, tokens) {
        let n = tok.encode(&format!(" {sentence}"))?.len();
        if used + n > budget {
            break;
        }
        used += n;
        sentences.push(sentence);
    }
    let at = ((sentences.len() as f64) * depth).round() as usize;
    sentences.insert(at.min(sentences.len()), fact.to_string());
    let mut text = sentences.join(" ");
    text.push(' ');
    text.push_str(tail);
    Ok(tok.encode(&text)?)
}

pub(crate) fn text(ev: &Evaluator, s: &EvalSettings) -> Result<NiahTextReport> {
    let mut cells = Vec::new();
    for &length in &s.niah_lengths {
        for &depth in &s.niah_depths {
            for trial in 0..s.niah_trials {
                cells.push((length, depth, trial));
            }
        }
    }
    let results = cells
        .par_iter()
        .map(|&(length, depth, trial)| -> Result<_> {
            let key =
                splitmix(length as u64 * 1_000_003 + (depth * 1000.0) as u64 * 7919 + trial as u64);
            let (name, code) = eval_needle(key);
            let fact = needle_fact(&name, &code);
            let ids = haystack(ev, key, length, &fact, depth, &needle_prompt(&name))?;
            let out = ev.model.generate(&ids, &[], 6, &[], &ev.device)?;
            let text = ev.tokenizer.decode(&out)?;
            // Scored by the leading digits: a code followed by its period or
            // more text is found.
            let digits: String = text
                .trim_start()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            let miss = (digits != code).then_some(NiahMiss {
                length,
                depth,
                answer: code,
                generated: text,
            });
            Ok((length, depth, miss))
        })
        .collect::<Result<Vec<_>>>()?;
    let hits = |keep: &dyn Fn(usize, f64) -> bool| {
        Score::of(
            results
                .iter()
                .filter(|r| keep(r.0, r.1))
                .map(|r| r.2.is_none()),
        )
    };
    let mut table = Vec::new();
    for &length in &s.niah_lengths {
        for &depth in &s.niah_depths {
            table.push(NiahCell {
                length,
                depth,
                score: hits(&|l, d| l == length && d == depth),
            });
        }
    }
    let by_length = s
        .niah_lengths
        .iter()
        .map(|&length| NiahLength {
            length,
            accuracy: hits(&|l, _| l == length).accuracy,
        })
        .collect();
    let rows: Vec<String> = s.niah_lengths.iter().map(usize::to_string).collect();
    let cols: Vec<String> = s.niah_depths.iter().map(|d| percent(*d)).collect();
    let values: Vec<Vec<f64>> = table
        .chunks(s.niah_depths.len().max(1))
        .map(|row| row.iter().map(|c| c.score.accuracy).collect())
        .collect();
    heatmap(
        &s.out.join("niah_text.png"),
        &format!("Text needle retrieval, stage {}", ev.stage()),
        "length / depth",
        &rows,
        &cols,
        &values,
    )?;
    Ok(NiahTextReport {
        accuracy: hits(&|_, _| true).accuracy,
        by_length,
        table,
        misses: results
            .into_iter()
            .filter_map(|r| r.2)
            .take(MISSES_KEPT)
            .collect(),
    })
}

pub(crate) fn video(
    ev: &Evaluator,
    s: &EvalSettings,
    answers: &Answers,
) -> Result<NiahVideoReport> {
    if !cfg!(feature = "video") {
        return Ok(NiahVideoReport {
            accuracy: None,
            chance: None,
            table: vec![],
            skipped: Some("built without the video feature".into()),
        });
    }
    let needles = &answers.eval_video_needles[..s.take(answers.eval_video_needles.len())];
    let jobs: Vec<(&lvpipe_synth::VideoNeedle, FramePolicy)> = needles
        .iter()
        .flat_map(|n| s.video_frames.iter().map(move |p| (n, *p)))
        .collect();
    let results: Vec<(f64, FramePolicy, bool, usize)> = jobs
        .par_iter()
        .map(|&(needle, policy)| -> Result<_> {
            let (n, pixels) = ev.video_pixels(&s.data.join(&needle.video), policy)?;
            let got = ev.answer(&ev.prompt(n, &needle.question)?, &pixels, 8)?;
            Ok((
                needle.depth,
                policy,
                normalize(&got) == normalize(&needle.answer),
                n,
            ))
        })
        .collect::<Result<_>>()?;
    let mut depths: Vec<f64> = needles.iter().map(|n| n.depth).collect();
    depths.sort_by(f64::total_cmp);
    depths.dedup();
    let mut table = Vec::new();
    for policy in &s.video_frames {
        for &depth in &depths {
            let cell: Vec<_> = results
                .iter()
                .filter(|r| r.0 == depth && r.1 == *policy)
                .collect();
            table.push(NiahVideoCell {
                frames: policy.to_string(),
                depth,
                num_frames: cell.first().map(|c| c.3),
                score: Score::of(cell.iter().map(|c| c.2)),
            });
        }
    }
    let rows: Vec<String> = s.video_frames.iter().map(FramePolicy::to_string).collect();
    let cols: Vec<String> = depths.iter().map(|d| percent(*d)).collect();
    let values: Vec<Vec<f64>> = table
        .chunks(depths.len().max(1))
        .map(|row| row.iter().map(|c| c.score.accuracy).collect())
        .collect();
    heatmap(
        &s.out.join("niah_video.png"),
        &format!("Video needle retrieval, stage {}", ev.stage()),
        "frames / depth",
        &rows,
        &cols,
        &values,
    )?;
    Ok(NiahVideoReport {
        accuracy: Some(Score::of(results.iter().map(|r| r.2)).accuracy),
        chance: Some(VIDEO_CHANCE),
        table,
        skipped: None,
    })
}

/// 0.25 -> "25%".
fn percent(fraction: f64) -> String {
    format!("{:.0}%", fraction * 100.0)
}
