//! The `ppl` suite: perplexity of held-out filler documents (each with one
//! planted fact) by position range, to see whether later tokens gain from
//! the context before them.

use lvpipe_pipeline::splitmix;
use lvpipe_synth::{NEEDLE_NAMES, needle_fact};
use rayon::prelude::*;

use crate::niah::haystack;
use crate::report::{PplRange, PplReport};
use crate::{EvalSettings, Evaluator, Result};

/// Documents scored.
const DOCUMENTS: u64 = 4;

pub(crate) fn run(ev: &Evaluator, s: &EvalSettings) -> Result<PplReport> {
    let longest = s.niah_lengths.iter().copied().max().unwrap_or(2048);
    let docs: Vec<Vec<f32>> = (0..DOCUMENTS)
        .into_par_iter()
        .map(|k| -> Result<_> {
            let key = splitmix(0x5EED_0000 + k);
            let name = format!("{}{}", NEEDLE_NAMES[(key % 16) as usize], 8000 + k);
            let fact = needle_fact(&name, &(1000 + key % 9000).to_string());
            let ids = haystack(ev, key, longest, &fact, 0.5, "")?;
            Ok(ev.model.token_nll(&ids, &ev.device)?)
        })
        .collect::<Result<_>>()?;
    // Ranges doubling from 128 tokens: 0-128, 128-256, ... up to the longest.
    let mut edges = vec![0usize];
    let mut e = 128;
    while e < longest {
        edges.push(e);
        e *= 2;
    }
    edges.push(longest);
    let mut table = Vec::new();
    for w in edges.windows(2) {
        let vals: Vec<f32> = docs
            .iter()
            .flat_map(|d| d.iter().skip(w[0]).take(w[1] - w[0]).copied())
            .collect();
        if vals.is_empty() {
            continue;
        }
        let mean = vals.iter().map(|v| f64::from(*v)).sum::<f64>() / vals.len() as f64;
        table.push(PplRange {
            from: w[0],
            to: w[1],
            tokens: vals.len(),
            perplexity: mean.exp(),
        });
    }
    let all: Vec<f64> = docs.iter().flatten().map(|v| f64::from(*v)).collect();
    let ppl = (all.iter().sum::<f64>() / all.len().max(1) as f64).exp();
    Ok(PplReport {
        accuracy: ppl,
        perplexity: ppl,
        documents: docs.len(),
        table,
    })
}
