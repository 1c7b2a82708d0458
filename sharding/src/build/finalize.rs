//! `build-shards --finalize`: the parts of a partitioned build joined into
//! one shard folder, once all of them are complete, agree and read back as
//! their manifests say.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use lvpipe_schemas::{FolderLock, Manifest, ManifestSource};

use super::manifest::summarize;
use super::{BuildSummary, Partition};
use crate::writer::write_atomic;
use crate::{Error, Result};

/// Joins the `part-IIIII-of-NNNNN/` folders of `out` into `out`'s manifest
/// (listing their files where they are) and tokenizer. Refuses parts of
/// different counts or builds, a missing or unfinished part, and any file
/// that does not read back as its part's manifest says.
pub fn finalize(out: &Path) -> Result<BuildSummary> {
    let started = Instant::now();
    let _lock = FolderLock::acquire(out, "build-shards --finalize")?;
    let mut parts: Vec<Partition> = fs_err::read_dir(out)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| Partition::from_dir_name(&e.file_name().to_string_lossy()))
        .collect();
    parts.sort_by_key(|p| (p.count, p.index));
    let Some(count) = parts.first().map(|p| p.count) else {
        return Err(Error::Config(format!(
            "{}: no part-IIIII-of-NNNNN folders: build the parts with --partition I/N first",
            out.display()
        )));
    };
    if let Some(other) = parts.iter().find(|p| p.count != count) {
        return Err(Error::Conflict(format!(
            "{}: parts of a build in {count} and of one in {} ({}); remove the folders of the build you do not want",
            out.display(),
            other.count,
            other.dir_name()
        )));
    }
    let missing: Vec<String> = (0..count)
        .filter(|i| !parts.iter().any(|p| p.index == *i))
        .map(|i| format!("{i}/{count}"))
        .collect();
    if !missing.is_empty() {
        return Err(Error::Config(format!(
            "{}: parts {} missing: run build-shards --partition for each",
            out.display(),
            missing.join(", ")
        )));
    }
    let mut manifests = Vec::with_capacity(parts.len());
    for p in &parts {
        let dir = out.join(p.dir_name());
        let path = dir.join(Manifest::FILE_NAME);
        let text = fs_err::read_to_string(&path).map_err(|_| {
            Error::Config(format!(
                "{}: part {}/{count} did not finish (no {}): rerun its task",
                out.display(),
                p.index,
                Manifest::FILE_NAME
            ))
        })?;
        let manifest = Manifest::from_json(&text)
            .map_err(|e| Error::Conflict(format!("{}: {e}", path.display())))?;
        if let Some(first) = manifests.first() {
            agree(first, &manifest, p, count)?;
        }
        let report = crate::verify::verify_shards(&dir, &manifest.shards, &|_| {})?;
        if let Some(problem) = report.problems.first() {
            return Err(Error::Conflict(format!(
                "{}: {problem} ({} files of part {}/{count} do not read back as written)",
                dir.display(),
                report.problems.len(),
                p.index
            )));
        }
        manifests.push(manifest);
    }
    let mut joined = manifests[0].clone();
    joined.shards.clear();
    let mut counts: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    let mut summary: Option<BuildSummary> = None;
    for (p, m) in parts.iter().zip(&manifests) {
        for shard in &m.shards {
            let mut shard = shard.clone();
            shard.file = format!("{}/{}", p.dir_name(), shard.file);
            joined.shards.push(shard);
        }
        for s in &m.sources {
            let c = counts.entry(s.name.clone()).or_default();
            (c.0, c.1, c.2) = (c.0 + s.records, c.1 + s.samples, c.2 + s.quarantined);
        }
        let part = summarize(m.clone(), &out.join(p.dir_name()), started, 0, false)?;
        summary = Some(match summary {
            None => part,
            Some(mut all) => {
                for (reason, n) in part.by_reason {
                    *all.by_reason.entry(reason).or_default() += n;
                }
                all.shards += part.shards;
                all
            }
        });
    }
    joined.sources = joined
        .sources
        .iter()
        .map(|s| {
            let (records, samples, quarantined) = counts[&s.name];
            ManifestSource {
                records,
                samples,
                quarantined,
                ..s.clone()
            }
        })
        .collect();
    fs_err::copy(
        out.join(parts[0].dir_name()).join("tokenizer.json"),
        out.join("tokenizer.json"),
    )?;
    write_atomic(&out.join(Manifest::FILE_NAME), joined.to_json().as_bytes())?;
    let mut summary = summary.expect("at least one part");
    summary.samples = joined.sources.iter().map(|s| s.samples).sum();
    summary.quarantined = joined.sources.iter().map(|s| s.quarantined).sum();
    summary.bytes = joined.shards.iter().map(|s| s.bytes).sum();
    summary.seconds = started.elapsed().as_secs_f64();
    summary.manifest = joined;
    Ok(summary)
}

/// Parts of one build: the same settings, inputs and tokenizer.
fn agree(first: &Manifest, other: &Manifest, p: &Partition, count: u32) -> Result<()> {
    let differs = |what: &str| {
        Err(Error::Conflict(format!(
            "part {}/{count} was built with other {what} than part 0/{count}",
            p.index
        )))
    };
    if other.build_fingerprint != first.build_fingerprint {
        return differs("settings or inputs");
    }
    if other.tokenizer_fingerprint != first.tokenizer_fingerprint
        || other.added_tokens != first.added_tokens
    {
        return differs("tokenizer");
    }
    if other.schema_version != first.schema_version {
        return differs("schema version");
    }
    Ok(())
}
