//! `verify`: every shard file of a folder read back against the manifest's
//! size and blake3, so a copy, a sync or a disk that changed a byte is
//! caught before a week of training reads it.

use std::io::Read;
use std::path::{Path, PathBuf};

use lvpipe_schemas::{Manifest, ManifestShard};
use rayon::prelude::*;
use serde::Serialize;

use crate::{Error, Result};

/// What is wrong with one file the manifest lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "problem")]
pub enum Problem {
    /// The file is not there.
    Missing { file: String },
    /// Its size is not the manifest's (truncated or appended to).
    Size {
        file: String,
        expected: u64,
        found: u64,
    },
    /// Same size, other bytes.
    Checksum {
        file: String,
        expected: String,
        found: String,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Missing { file } => write!(f, "{file}: missing"),
            Problem::Size {
                file,
                expected,
                found,
            } => write!(f, "{file}: {found} bytes, the manifest says {expected}"),
            Problem::Checksum {
                file,
                expected,
                found,
            } => write!(f, "{file}: blake3 {found}, the manifest says {expected}"),
        }
    }
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub folder: PathBuf,
    /// Files the manifest lists, and their bytes, all read.
    pub files: usize,
    pub bytes: u64,
    pub problems: Vec<Problem>,
}

/// Reads every file `dir`'s manifest lists (in parallel, `on_bytes` hearing
/// each chunk read) and compares its size and blake3 with the manifest's.
/// An unreadable manifest is an error; bad files are the report's problems.
pub fn verify(dir: &Path, on_bytes: &(dyn Fn(u64) + Sync)) -> Result<VerifyReport> {
    let path = dir.join(Manifest::FILE_NAME);
    let text = fs_err::read_to_string(&path).map_err(|e| {
        Error::Config(format!(
            "{}: {e} (a shard folder has one once its build finished)",
            path.display()
        ))
    })?;
    let manifest = Manifest::from_json(&text)
        .map_err(|e| Error::Conflict(format!("{}: {e}", path.display())))?;
    verify_shards(dir, &manifest.shards, on_bytes)
}

/// [`verify`] of `shards` (a manifest already read) in `dir`.
pub fn verify_shards(
    dir: &Path,
    shards: &[ManifestShard],
    on_bytes: &(dyn Fn(u64) + Sync),
) -> Result<VerifyReport> {
    let mut problems: Vec<Problem> = shards
        .par_iter()
        .map(|shard| check(dir, shard, on_bytes))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    problems.sort_by(|a, b| name(a).cmp(name(b)));
    Ok(VerifyReport {
        folder: dir.to_path_buf(),
        files: shards.len(),
        bytes: shards.iter().map(|s| s.bytes).sum(),
        problems,
    })
}

fn name(p: &Problem) -> &str {
    match p {
        Problem::Missing { file } | Problem::Size { file, .. } | Problem::Checksum { file, .. } => {
            file
        }
    }
}

/// One file against its manifest entry.
fn check(
    dir: &Path,
    shard: &ManifestShard,
    on_bytes: &(dyn Fn(u64) + Sync),
) -> Result<Option<Problem>> {
    let path = dir.join(&shard.file);
    let file = shard.file.clone();
    let mut f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Some(Problem::Missing { file }));
        }
        Err(e) => return Err(Error::Config(format!("{}: {e}", path.display()))),
    };
    let found = f.metadata()?.len();
    if found != shard.bytes {
        on_bytes(shard.bytes);
        return Ok(Some(Problem::Size {
            file,
            expected: shard.bytes,
            found,
        }));
    }
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        on_bytes(n as u64);
    }
    let found = hasher.finalize().to_hex().to_string();
    Ok((found != shard.blake3).then(|| Problem::Checksum {
        file,
        expected: shard.blake3.clone(),
        found,
    }))
}
