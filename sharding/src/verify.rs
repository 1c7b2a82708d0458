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
    let problems = shards
        .par_iter()
        .map(|shard| check(dir, shard, on_bytes))
        .collect::<Result<Vec<_>>>()?;
    Ok(report(dir.to_path_buf(), shards, problems))
}

/// [`verify`] of a shard folder on object storage.
pub fn verify_remote_folder(remote: &crate::storage::Remote) -> Result<VerifyReport> {
    crate::storage::block_on(async {
        let text = remote.read(Manifest::FILE_NAME).await?.ok_or_else(|| {
            Error::Config(format!(
                "{}: no {} here: not a shard folder, or its build did not finish",
                remote.url(),
                Manifest::FILE_NAME
            ))
        })?;
        let manifest = Manifest::from_json(&String::from_utf8_lossy(&text))?;
        verify_remote(remote, &manifest.shards).await
    })
}

/// [`verify_shards`] of a folder on object storage: every file read as a
/// stream (four at a time) and hashed, nothing kept.
pub async fn verify_remote(
    remote: &crate::storage::Remote,
    shards: &[ManifestShard],
) -> Result<VerifyReport> {
    // Owned values: the futures must be `Send` for any caller's runtime.
    let checks = shards.iter().cloned().map(|shard| {
        let remote = remote.clone();
        async move {
            let file = shard.file.clone();
            Ok::<_, crate::Error>(match remote.hash(&shard.file).await? {
                None => Some(Problem::Missing { file }),
                Some((found, _)) if found != shard.bytes => Some(Problem::Size {
                    file,
                    expected: shard.bytes,
                    found,
                }),
                Some((_, blake3)) if blake3 != shard.blake3 => Some(Problem::Checksum {
                    file,
                    expected: shard.blake3.clone(),
                    found: blake3,
                }),
                Some(_) => None,
            })
        }
    });
    let problems = crate::storage::four_at_a_time(checks).await?;
    Ok(report(PathBuf::from(remote.url()), shards, problems))
}

/// The report on `shards` of `folder`, given each file's problem if any.
fn report(
    folder: PathBuf,
    shards: &[ManifestShard],
    problems: Vec<Option<Problem>>,
) -> VerifyReport {
    let mut problems: Vec<Problem> = problems.into_iter().flatten().collect();
    problems.sort_by(|a, b| name(a).cmp(name(b)));
    VerifyReport {
        folder,
        files: shards.len(),
        bytes: shards.iter().map(|s| s.bytes).sum(),
        problems,
    }
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
    let found = blake3_of(&mut f, on_bytes)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    Ok((found != shard.blake3).then(|| Problem::Checksum {
        file,
        expected: shard.blake3.clone(),
        found,
    }))
}

/// The blake3 of everything `reader` holds, read in 1 MiB chunks.
pub fn blake3_of(reader: &mut impl Read, on_bytes: &dyn Fn(u64)) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        on_bytes(n as u64);
    }
    Ok(hasher.finalize().to_hex().to_string())
}
