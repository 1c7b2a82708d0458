//! The `vqa` suite: greedy answers to every question about the held-out
//! images and clips, scored by attribute against the known answers.

use lvpipe_synth::Answers;
use rayon::prelude::*;

use crate::report::{Score, VqaMiss, VqaReport, VqaRow};
use crate::{EvalSettings, Evaluator, Result};

/// New tokens an answer may take ("Bottom right." is four).
const MAX_ANSWER_TOKENS: usize = 8;
/// Wrong answers kept in the report.
const MISSES_KEPT: usize = 8;

/// One graded question.
struct Graded {
    modality: &'static str,
    attribute: String,
    miss: Option<VqaMiss>,
}

pub(crate) fn run(ev: &Evaluator, s: &EvalSettings, answers: &Answers) -> Result<VqaReport> {
    let images = &answers.eval_vqa[..s.take(answers.eval_vqa.len())];
    let mut results: Vec<Graded> = images
        .par_iter()
        .map(|q| -> Result<_> {
            let pixels = ev.image_pixels(&s.data.join(&q.image))?;
            let got = ev.answer(&ev.prompt(1, &q.question)?, &pixels, MAX_ANSWER_TOKENS)?;
            Ok(grade(
                "image",
                &q.image,
                &q.attribute,
                &q.question,
                &q.answer,
                got,
            ))
        })
        .collect::<Result<_>>()?;
    if cfg!(feature = "video") {
        let clips = &answers.eval_video_vqa[..s.take(answers.eval_video_vqa.len())];
        let more: Vec<Graded> = clips
            .par_iter()
            .map(|q| -> Result<_> {
                let (n, pixels) = ev.video_pixels(&s.data.join(&q.video), s.clip_frames)?;
                let got = ev.answer(&ev.prompt(n, &q.question)?, &pixels, MAX_ANSWER_TOKENS)?;
                Ok(grade(
                    "video",
                    &q.video,
                    &q.attribute,
                    &q.question,
                    &q.answer,
                    got,
                ))
            })
            .collect::<Result<_>>()?;
        results.extend(more);
    }
    let mut keys: Vec<(&str, &str)> = results
        .iter()
        .map(|r| (r.modality, r.attribute.as_str()))
        .collect();
    keys.sort();
    keys.dedup();
    let table = keys
        .into_iter()
        .map(|(modality, attribute)| VqaRow {
            modality: modality.to_string(),
            attribute: attribute.to_string(),
            chance: 1.0 / classes(attribute),
            score: Score::of(
                results
                    .iter()
                    .filter(|r| r.modality == modality && r.attribute == attribute)
                    .map(|r| r.miss.is_none()),
            ),
        })
        .collect();
    let n = results.len();
    Ok(VqaReport {
        accuracy: Score::of(results.iter().map(|r| r.miss.is_none())).accuracy,
        chance: results
            .iter()
            .map(|r| 1.0 / classes(&r.attribute))
            .sum::<f64>()
            / n.max(1) as f64,
        n,
        table,
        misses: results
            .into_iter()
            .filter_map(|r| r.miss)
            .take(MISSES_KEPT)
            .collect(),
    })
}

fn grade(
    modality: &'static str,
    file: &str,
    attribute: &str,
    question: &str,
    answer: &str,
    got: String,
) -> Graded {
    let miss = (normalize(&got) != normalize(answer)).then(|| VqaMiss {
        file: file.to_string(),
        question: question.to_string(),
        answer: answer.to_string(),
        generated: got,
    });
    Graded {
        modality,
        attribute: attribute.to_string(),
        miss,
    }
}

/// Lower case, no article, no final period: "A red circle." -> "red circle".
pub(crate) fn normalize(text: &str) -> String {
    let t = text.trim().trim_end_matches('.').trim().to_lowercase();
    t.strip_prefix("a ").map(str::to_string).unwrap_or(t)
}

/// Answer classes of an attribute of the synthetic scenes.
fn classes(attribute: &str) -> f64 {
    match attribute {
        "colour" => 6.0,
        "shape" | "count" => 3.0,
        "position" => 5.0,
        "direction" => 2.0,
        _ => 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_compare_without_case_article_or_period() {
        assert_eq!(normalize(" A Red circle. "), "red circle");
        assert_eq!(normalize("Bottom right."), "bottom right");
        assert_ne!(normalize("A square."), normalize("A circle."));
    }
}
