//! What a build is asked to do, checked before it starts, and its
//! fingerprint: the settings and inputs that make its output what it is.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use lvpipe_schemas::SCHEMA_VERSION;
use serde::Serialize;

use crate::chat::ChatTemplate;
use crate::media::ImageSettings;
use crate::source::SourceSpec;
use crate::video::VideoSettings;
use crate::{Error, Result};

/// How images keep their aspect ratio when made square.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageAspect {
    /// Resize the longer side to the target and pad to a square (VILA `pad`).
    Pad,
    /// Squash to the square, ignoring the aspect ratio (VILA `resize`).
    Resize,
}

/// One of `count` tasks of a distributed build (`--partition INDEX/COUNT`,
/// 0-based, as Slurm's `SLURM_ARRAY_TASK_ID` and Kubernetes' indexed jobs
/// count). Each task writes its shards and manifest into its own folder,
/// `part-IIIII-of-NNNNN/`, of the build's output; `--finalize` joins them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Partition {
    pub index: u32,
    pub count: u32,
}

impl Partition {
    /// `I/N` with `I < N`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || Error::Config(format!("--partition {s}: expected I/N with 0 <= I < N"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse::<u32>().map_err(|_| bad())?,
            n.trim().parse::<u32>().map_err(|_| bad())?,
        );
        if index >= count {
            return Err(bad());
        }
        Ok(Partition { index, count })
    }

    /// This task's folder in the build's output.
    pub fn dir_name(&self) -> String {
        format!("part-{:05}-of-{:05}", self.index, self.count)
    }

    /// The partition a folder name names (`part-IIIII-of-NNNNN`).
    pub fn from_dir_name(name: &str) -> Option<Self> {
        let rest = name.strip_prefix("part-")?;
        let (i, n) = rest.split_once("-of-")?;
        let p = Partition {
            index: i.parse().ok()?,
            count: n.parse().ok()?,
        };
        (p.index < p.count && p.dir_name() == name).then_some(p)
    }
}

/// Everything a build needs, resolved and validated by the caller's CLI.
#[derive(Debug, Clone)]
pub struct BuildSettings {
    pub out: PathBuf,
    pub tokenizer: PathBuf,
    /// The chat template conversations are tokenized with (the tokenizer's
    /// family's: ChatML for Qwen2, Llama-3's header format for Llama-3).
    pub chat_template: ChatTemplate,
    pub sources: Vec<SourceSpec>,
    pub image: ImageSettings,
    /// How videos are sampled; a source's `frames` overrides the policy.
    pub video: VideoSettings,
    /// Approximate uncompressed bytes per shard before it is cut.
    pub target_shard_bytes: u64,
    /// Rows per Parquet row group (the unit of random access).
    pub row_group_rows: usize,
    /// Records handed to the parallel stage at once.
    pub chunk_records: usize,
    /// Stop at the first record that would be quarantined.
    pub strict: bool,
    /// Replace a different build found in `out` instead of refusing.
    pub overwrite: bool,
    /// Worker threads for decoding and tokenization (default: all cores).
    pub threads: Option<usize>,
    /// Quarantine exact duplicates (same content) within a source.
    pub dedup: bool,
    /// Longest JSONL line read as a record; longer ones are quarantined as
    /// `record_too_large` without being held in memory.
    pub max_record_bytes: u64,
    /// Read media files wherever annotations point, instead of quarantining
    /// those outside their source's media root as `unsafe_path`.
    pub allow_media_outside_root: bool,
    /// Stop with an error after writing this many shards (to test resume).
    pub fail_after_shards: Option<u32>,
    /// Build only this task's share of the records, into its own folder.
    pub partition: Option<Partition>,
}

impl BuildSettings {
    /// The video settings of source `index`: the build's, with the source's
    /// own frame policy where the registry gives one.
    pub fn video_for(&self, index: usize) -> Result<VideoSettings> {
        let mut video = self.video;
        if let Some(frames) = &self.sources[index].frames {
            video.policy = frames.parse().map_err(|e| {
                Error::Config(format!("source `{}`: {e}", self.sources[index].name))
            })?;
        }
        Ok(video)
    }

    pub fn new(out: impl Into<PathBuf>, tokenizer: impl Into<PathBuf>) -> Self {
        BuildSettings {
            out: out.into(),
            tokenizer: tokenizer.into(),
            chat_template: ChatTemplate::ChatMl,
            sources: Vec::new(),
            image: ImageSettings::default(),
            video: VideoSettings::default(),
            target_shard_bytes: 256 << 20,
            row_group_rows: 256,
            chunk_records: 64,
            strict: false,
            overwrite: false,
            threads: None,
            dedup: true,
            allow_media_outside_root: false,
            max_record_bytes: 64 << 20,
            fail_after_shards: None,
            partition: None,
        }
    }

    pub fn with_sources(mut self, sources: Vec<SourceSpec>) -> Self {
        self.sources = sources;
        self
    }

    pub(super) fn check(&self) -> Result<()> {
        if self.sources.is_empty() {
            return Err(Error::Config(
                "no sources: give --source KIND:PATH or --registry FILE".into(),
            ));
        }
        for i in 0..self.sources.len() {
            self.video_for(i)?;
        }
        let mut names = HashSet::new();
        for s in &self.sources {
            if !names.insert(&s.name) {
                return Err(Error::Config(format!(
                    "two sources are named `{}`: name them with NAME=KIND:PATH or in the registry",
                    s.name
                )));
            }
            if !s.path.is_file() {
                return Err(Error::Config(format!(
                    "source `{}`: {} is not a file",
                    s.name,
                    s.path.display()
                )));
            }
            if let Some(root) = &s.media_root
                && !root.is_dir()
            {
                return Err(Error::Config(format!(
                    "source `{}`: media root {} is not a folder",
                    s.name,
                    root.display()
                )));
            }
        }
        if !(1..=100).contains(&self.image.jpeg_quality) || self.image.size == 0 {
            return Err(Error::Config(
                "image size must be > 0 and JPEG quality 1 to 100".into(),
            ));
        }
        Ok(())
    }
}

/// blake3 of a file when it is at most 2 MiB, else of its first and last MiB.
fn head_tail_hash(path: &Path, len: u64) -> Result<blake3::Hash> {
    use std::io::{Read, Seek, SeekFrom};
    const MIB: usize = 1 << 20;
    let mut file = fs_err::File::open(path)?;
    if len <= 2 * MIB as u64 {
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(&mut file)?;
        return Ok(hasher.finalize());
    }
    let mut buf = vec![0u8; MIB];
    let mut hasher = blake3::Hasher::new();
    file.read_exact(&mut buf)?;
    hasher.update(&buf);
    file.seek(SeekFrom::End(-(MIB as i64)))?;
    file.read_exact(&mut buf)?;
    hasher.update(&buf);
    Ok(hasher.finalize())
}

/// The identity of a build: settings that change the output, and for each
/// source its size and a hash of its first and last MiB (cheap on large
/// tars, and enough to tell an edited file from the one a crashed run read).
pub(super) fn build_fingerprint(
    settings: &BuildSettings,
    tokenizer_fingerprint: &str,
) -> Result<(String, serde_json::Value)> {
    let mut sources = Vec::new();
    for s in &settings.sources {
        let len = s.path.metadata()?.len();
        let sample = head_tail_hash(&s.path, len)?;
        sources.push(serde_json::json!({
            "name": s.name,
            "kind": s.kind,
            "path": s.path,
            "media_root": s.media_root(),
            "frames": s.frames,
            "bytes": len,
            "blake3_head_tail": sample.to_hex().to_string(),
        }));
    }
    let args = serde_json::json!({
        "schema_version": SCHEMA_VERSION,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "chat_template": settings.chat_template.as_str(),
        "image": settings.image,
        "video": settings.video,
        "target_shard_bytes": settings.target_shard_bytes,
        "row_group_rows": settings.row_group_rows,
        "dedup": settings.dedup,
        "allow_media_outside_root": settings.allow_media_outside_root,
        "max_record_bytes": settings.max_record_bytes,
        "sources": sources,
    });
    // The tasks of a partitioned build share one fingerprint: the count is
    // part of it, a task's index is not.
    let mut args = args;
    if let Some(p) = settings.partition {
        args["partitions"] = serde_json::json!(p.count);
    }
    let fingerprint = blake3::hash(args.to_string().as_bytes()).to_hex()[..32].to_string();
    Ok((fingerprint, args))
}
