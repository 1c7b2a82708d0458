//! `build-shards`: the bounded read -> process -> write pipeline
//! ([`pipeline`]), each record made a sample ([`sample`]), resume
//! ([`resume`]) and the manifest ([`manifest`]).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crossbeam_channel::bounded;
use lvpipe_schemas::{FolderLock, Manifest, QuarantineReason};
use rayon::prelude::*;

use crate::chat::ChatTokenizer;
use crate::readers::InputBytes;
use crate::writer::{PartIdentity, PartWriter};
use crate::{Error, Result};

mod finalize;
mod manifest;
mod pipeline;
mod resume;
mod sample;
mod settings;

pub use finalize::finalize;
use manifest::{summarize, write_manifest};
use pipeline::{Processed, RawRecord, process, read_all, write_all};
use resume::{OutState, existing_sample_ids, prepare_out_dir};
use sample::SourcePrep;
use settings::build_fingerprint;
pub use settings::{BuildSettings, ImageAspect, Partition};

/// What a build reports while it runs.
#[derive(Debug, Clone)]
pub enum BuildEvent {
    /// The build starts (or resumes after `resumed_records` records).
    Started {
        input_bytes: u64,
        resumed_records: u64,
        resumed_shards: u32,
    },
    /// Records processed so far in this run, and input bytes passed (read,
    /// or skipped as another partition's).
    Progress {
        input_bytes_done: u64,
        samples: u64,
        quarantined: u64,
    },
    /// A record was quarantined.
    Quarantined {
        origin: String,
        reason: QuarantineReason,
        detail: String,
    },
    /// A shard file was committed.
    ShardWritten { path: PathBuf },
}

/// The outcome of a build, from its manifest.
#[derive(Debug, Clone)]
pub struct BuildSummary {
    pub samples: u64,
    pub quarantined: u64,
    pub by_reason: BTreeMap<String, u64>,
    /// Number of samples shards.
    pub shards: usize,
    /// Bytes of all shard files.
    pub bytes: u64,
    pub seconds: f64,
    /// Records skipped because an earlier run had written them.
    pub resumed_records: u64,
    /// The folder already held this exact build; nothing was done.
    pub up_to_date: bool,
    /// Bytes this run read from annotation files and archives (media files
    /// aside): a partition reads only its own tar members.
    pub input_bytes_read: u64,
    pub manifest: Manifest,
}

/// Builds (or resumes, or confirms) the shards of `settings.out`; with a
/// partition, this task's share into its folder there.
pub fn build_shards(
    settings: &BuildSettings,
    observer: &(dyn Fn(BuildEvent) + Sync),
) -> Result<BuildSummary> {
    match settings.partition {
        None => build_folder(settings, observer),
        Some(p) => {
            fs_err::create_dir_all(&settings.out)?;
            let task = BuildSettings {
                out: settings.out.join(p.dir_name()),
                ..settings.clone()
            };
            build_folder(&task, observer)
        }
    }
}

fn build_folder(
    settings: &BuildSettings,
    observer: &(dyn Fn(BuildEvent) + Sync),
) -> Result<BuildSummary> {
    let started = Instant::now();
    settings.check()?;
    let tokenizer = ChatTokenizer::load_with(&settings.tokenizer, settings.chat_template)?;
    let (fingerprint, build_args) = build_fingerprint(settings, tokenizer.fingerprint())?;
    fs_err::create_dir_all(&settings.out)?;
    let _lock = FolderLock::acquire(&settings.out, "build-shards")?;
    let resume = match prepare_out_dir(settings, &fingerprint)? {
        OutState::Complete(manifest) => {
            return summarize(*manifest, &settings.out, started, 0, true);
        }
        OutState::Resume(resume) => resume,
    };
    let input_bytes = settings
        .sources
        .iter()
        .map(|s| s.path.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    observer(BuildEvent::Started {
        input_bytes,
        resumed_records: resume.next_record,
        resumed_shards: resume.next_index,
    });
    let seen = if settings.dedup {
        existing_sample_ids(&settings.out, resume.next_index)?
    } else {
        HashSet::new()
    };
    let identity = PartIdentity {
        tokenizer_fingerprint: tokenizer.fingerprint().to_string(),
        chat_template: settings.chat_template.as_str().to_string(),
        build_fingerprint: fingerprint.clone(),
    };
    let writer = PartWriter::new(
        &settings.out,
        identity,
        settings.target_shard_bytes,
        settings.row_group_rows,
        resume.next_index,
        resume.next_record,
    );
    let sources = SourcePrep::all(settings)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(settings.threads.unwrap_or(0))
        .build()
        .map_err(|e| Error::Internal(format!("thread pool: {e}")))?;

    let input = Arc::new(InputBytes::default());
    let (raw_tx, raw_rx) = bounded::<Vec<RawRecord>>(4);
    let (row_tx, row_rx) = bounded::<Vec<Processed>>(4);
    let (read_result, write_result) = std::thread::scope(|scope| {
        let reader = scope.spawn(|| read_all(settings, resume.next_record, raw_tx, &input));
        let writer = scope.spawn(|| write_all(settings, writer, seen, row_rx, observer));
        let (mut samples, mut quarantined) = (0u64, 0u64);
        for chunk in raw_rx.iter() {
            let out: Vec<Processed> = pool.install(|| {
                chunk
                    .into_par_iter()
                    .filter(|r| r.belongs_to(settings.partition))
                    .map(|r| process(r, settings, &sources, &tokenizer, &input))
                    .collect()
            });
            for p in &out {
                match p {
                    Processed::Sample(..) => samples += 1,
                    Processed::Rejected(_) => quarantined += 1,
                }
            }
            if row_tx.send(out).is_err() {
                break; // the writer stopped; its error is reported below
            }
            observer(BuildEvent::Progress {
                input_bytes_done: input.passed.load(Ordering::Relaxed),
                samples,
                quarantined,
            });
        }
        drop(raw_rx);
        drop(row_tx);
        (join(reader), join(writer))
    });
    // The writer's error is the cause when both failed (the reader then only
    // saw a closed channel).
    match (read_result, write_result) {
        (_, Err(e)) | (Err(e), _) => return Err(e),
        (Ok(total), Ok(writer)) => {
            if let Some(path) = writer.finish(total)? {
                observer(BuildEvent::ShardWritten { path });
            }
        }
    }
    let manifest = write_manifest(settings, &tokenizer, fingerprint, build_args)?;
    let mut summary = summarize(manifest, &settings.out, started, resume.next_record, false)?;
    summary.input_bytes_read = input.read.load(Ordering::Relaxed);
    Ok(summary)
}

fn join<T>(handle: std::thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    handle
        .join()
        .unwrap_or_else(|_| Err(Error::Internal("a build thread panicked".into())))
}
