//! The needle suites: a planted fact retrieved from filler documents of
//! several lengths (`niah_text`), and a needle frame in haystacks of video
//! frames of several lengths, LongVILA's V-NIAH (`niah_video`, with the
//! long videos' own two-second flash beside it), each by depth, with
//! heatmaps.

use lvpipe_pipeline::splitmix;
use lvpipe_schemas::FramePolicy;
use lvpipe_sharding::video::Frame;
use lvpipe_synth::{
    Answers, VideoNeedle, draw_video_needle, eval_needle, filler_sentences, needle_fact,
    needle_prompt,
};
use rayon::prelude::*;

use crate::plot::heatmap;
use crate::report::{
    NiahCell, NiahLength, NiahMiss, NiahTextReport, NiahVideoCell, NiahVideoReport, Score,
    VniahCell, VniahMiss,
};
use crate::vqa::normalize;
use crate::{EvalSettings, Evaluator, Result};

/// Wrong answers kept in the report.
const MISSES_KEPT: usize = 8;
/// Chance of naming the flash's colour.
const VIDEO_CHANCE: f64 = 1.0 / lvpipe_synth::VIDEO_NEEDLE_ANSWERS as f64;

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
    score_heatmap(
        &s.out.join("niah_text.png"),
        &format!("Text needle retrieval, stage {}", ev.stage()),
        "length / depth",
        (
            s.niah_lengths.iter().map(usize::to_string).collect(),
            s.niah_depths.iter().map(|d| percent(*d)).collect(),
        ),
        table.iter().map(|c| c.score),
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
            misses: vec![],
            flash_accuracy: None,
            flash: vec![],
            skipped: Some("built without the video feature".into()),
        });
    }
    let needles = &answers.eval_video_needles[..s.take(answers.eval_video_needles.len())];
    let (table, misses) = vniah(ev, s, needles)?;
    let (flash, flash_accuracy) = flash(ev, s, needles)?;
    let all: Vec<Score> = table.iter().map(|c| c.score).collect();
    let correct: usize = all.iter().map(|c| c.correct).sum();
    let n: usize = all.iter().map(|c| c.n).sum();
    Ok(NiahVideoReport {
        accuracy: Some(correct as f64 / n.max(1) as f64),
        chance: Some(VIDEO_CHANCE),
        table,
        misses,
        flash_accuracy: Some(flash_accuracy),
        flash,
        skipped: None,
    })
}

/// V-NIAH as LongVILA measures it. Each held-out long video is sampled into
/// a haystack of N frames (its own two-second flash replaced by the frames
/// beside it); a needle frame, a held-out (colour, shape) drawn over the
/// haystack frame at that point, is inserted at each depth; the model is
/// asked the long videos' question about it. One trial per video and cell;
/// the needles cycle through the held-out videos' (colour, shape) pairs.
fn vniah(
    ev: &Evaluator,
    s: &EvalSettings,
    needles: &[VideoNeedle],
) -> Result<(Vec<VniahCell>, Vec<VniahMiss>)> {
    let haystacks: Vec<(usize, usize)> = (0..needles.len())
        .flat_map(|v| s.vniah_frames.iter().map(move |&n| (v, n)))
        .collect();
    let results: Vec<(usize, f64, Option<VniahMiss>)> = haystacks
        .par_iter()
        .map(|&(v, n)| haystack_trials(ev, s, needles, v, n))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    let mut table = Vec::new();
    for &depth in &s.vniah_depths {
        for &frames in &s.vniah_frames {
            let hits = results
                .iter()
                .filter(|r| r.0 == frames && r.1 == depth)
                .map(|r| r.2.is_none());
            table.push(VniahCell {
                frames,
                depth,
                score: Score::of(hits),
            });
        }
    }
    // LongVILA's layout: frames along x, depth down y.
    score_heatmap(
        &s.out.join("niah_video.png"),
        &format!("V-NIAH, stage {}", ev.stage()),
        "depth / frames",
        (
            s.vniah_depths.iter().map(|d| percent(*d)).collect(),
            s.vniah_frames.iter().map(usize::to_string).collect(),
        ),
        table.iter().map(|c| c.score),
    )?;
    let misses = results
        .into_iter()
        .filter_map(|r| r.2)
        .take(MISSES_KEPT)
        .collect();
    Ok((table, misses))
}

/// The V-NIAH trials of one haystack: held-out video `v` sampled into `n`
/// frames (its own flash cut) and prepared once, then a needle inserted at
/// each depth: (frames, depth, the miss if it was one).
fn haystack_trials(
    ev: &Evaluator,
    s: &EvalSettings,
    needles: &[VideoNeedle],
    v: usize,
    n: usize,
) -> Result<Vec<(usize, f64, Option<VniahMiss>)>> {
    let video = &needles[v].video;
    let path = s.data.join(video);
    let mut frames = ev.video_frames(&path, FramePolicy::Uniform { frames: n as u32 })?;
    cut_flash(&mut frames, &needles[v]);
    let pixels: Vec<Vec<f32>> = frames
        .iter()
        .map(|f| ev.frame_pixels(&path, f.rgb.clone(), f.width, f.height))
        .collect::<Result<_>>()?;
    let mut trials = Vec::with_capacity(s.vniah_depths.len());
    for (d, &depth) in s.vniah_depths.iter().enumerate() {
        let needle = &needles[(v + d) % needles.len()];
        let at = ((n as f64 * depth).round() as usize).min(frames.len());
        // The needle is drawn over the haystack frame it goes before (the
        // last one, at the end).
        let under = frames.get(at).or(frames.last()).ok_or_else(|| {
            crate::Error::Input(format!(
                "{}: no frames to make a haystack of",
                path.display()
            ))
        })?;
        let mut shown: Vec<f32> = pixels[..at].iter().flatten().copied().collect();
        shown.extend(needle_frame(ev, &path, under, needle)?);
        shown.extend(pixels[at..].iter().flatten());
        let got = ev.answer(&ev.prompt(frames.len() + 1, &needle.question)?, &shown, 8)?;
        let miss = (normalize(&got) != normalize(&needle.answer)).then(|| VniahMiss {
            frames: n,
            depth,
            video: video.clone(),
            answer: needle.answer.clone(),
            generated: got,
        });
        trials.push((n, depth, miss));
    }
    Ok(trials)
}

/// Replaces the frames that show `needle`'s own flash by the nearest frame
/// before it (after it, where the flash opens the video): a haystack holds
/// no needle of its own.
fn cut_flash(frames: &mut [Frame], needle: &VideoNeedle) {
    let shows = |f: &Frame| (needle.start_ms..needle.end_ms).contains(&f.timestamp_ms);
    let clean: Vec<usize> = (0..frames.len()).filter(|&i| !shows(&frames[i])).collect();
    for i in 0..frames.len() {
        if shows(&frames[i])
            && let Some(&j) = clean
                .iter()
                .rev()
                .find(|&&j| j < i)
                .or_else(|| clean.iter().find(|&&j| j > i))
        {
            frames[i] = frames[j].clone();
        }
    }
}

/// The pixels of `haystack` with `needle`'s shape drawn over it.
fn needle_frame(
    ev: &Evaluator,
    path: &std::path::Path,
    haystack: &Frame,
    needle: &VideoNeedle,
) -> Result<Vec<f32>> {
    let mut rgb = haystack.rgb.clone();
    draw_video_needle(
        &mut rgb,
        haystack.width,
        haystack.height,
        &needle.colour,
        &needle.shape,
    )
    .map_err(|e| crate::Error::Input(e.to_string()))?;
    ev.frame_pixels(path, rgb, haystack.width, haystack.height)
}

/// The held-out long videos' own flash (two seconds of a shape) under each
/// of the settings' frame policies, by depth; and the accuracy over all.
fn flash(
    ev: &Evaluator,
    s: &EvalSettings,
    needles: &[VideoNeedle],
) -> Result<(Vec<NiahVideoCell>, f64)> {
    let jobs: Vec<(&VideoNeedle, FramePolicy)> = needles
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
    score_heatmap(
        &s.out.join("niah_video_flash.png"),
        &format!("Two-second flash in held-out videos, stage {}", ev.stage()),
        "frames / depth",
        (
            s.video_frames.iter().map(FramePolicy::to_string).collect(),
            depths.iter().map(|d| percent(*d)).collect(),
        ),
        table.iter().map(|c| c.score),
    )?;
    Ok((table, Score::of(results.iter().map(|r| r.2)).accuracy))
}

/// The accuracies of `scores` (row by row, a column label each) as a
/// heatmap.
fn score_heatmap(
    path: &std::path::Path,
    title: &str,
    corner: &str,
    (rows, cols): (Vec<String>, Vec<String>),
    scores: impl Iterator<Item = Score>,
) -> Result<()> {
    let accuracies: Vec<f64> = scores.map(|s| s.accuracy).collect();
    let values: Vec<Vec<f64>> = accuracies
        .chunks(cols.len().max(1))
        .map(<[f64]>::to_vec)
        .collect();
    heatmap(path, title, corner, &rows, &cols, &values)
}

/// 0.25 -> "25%".
fn percent(fraction: f64) -> String {
    format!("{:.0}%", fraction * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_haystack_loses_its_own_flash_to_the_frames_beside_it() {
        let frame = |i: u8| Frame {
            rgb: vec![i; 3],
            width: 1,
            height: 1,
            index: u32::from(i),
            timestamp_ms: i64::from(i) * 250,
        };
        let needle = VideoNeedle {
            id: "v".into(),
            video: "v.mp4".into(),
            depth: 0.0,
            start_ms: 0,
            end_ms: 500,
            duration_ms: 2000,
            colour: "red".into(),
            shape: "circle".into(),
            question: String::new(),
            answer: String::new(),
        };
        // The flash opens the video: its frames take the first one after.
        let mut frames: Vec<Frame> = (0..6).map(frame).collect();
        cut_flash(&mut frames, &needle);
        let shown: Vec<u8> = frames.iter().map(|f| f.rgb[0]).collect();
        assert_eq!(shown, [2, 2, 2, 3, 4, 5]);
        // In the middle: the frame before it.
        let needle = VideoNeedle {
            start_ms: 500,
            end_ms: 1000,
            ..needle
        };
        let mut frames: Vec<Frame> = (0..6).map(frame).collect();
        cut_flash(&mut frames, &needle);
        let shown: Vec<u8> = frames.iter().map(|f| f.rgb[0]).collect();
        assert_eq!(shown, [0, 1, 1, 1, 4, 5]);
    }
}
