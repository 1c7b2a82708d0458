//! One writer per output folder: a build, a mix or a training run holds an
//! exclusive lock on `.lvpipe.lock` in the folder it writes, so a second
//! writer is refused instead of interleaving its files with the first's (as
//! Cargo locks its build folder). The lock goes with the process: a kill
//! releases it.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A held lock; dropping it releases the folder.
#[derive(Debug)]
pub struct FolderLock {
    _file: File,
    path: PathBuf,
}

impl FolderLock {
    pub const FILE_NAME: &'static str = ".lvpipe.lock";

    /// Locks `dir` (created if missing) for `what` writes there, or fails
    /// at once if another process holds it.
    pub fn acquire(dir: &Path, what: &str) -> Result<Self> {
        let (file, path) = Self::open(dir)?;
        match file.try_lock() {
            Ok(()) => Ok(FolderLock { _file: file, path }),
            Err(TryLockError::WouldBlock) => Err(Error::Busy {
                dir: dir.to_path_buf(),
                what: what.to_string(),
            }),
            Err(TryLockError::Error(e)) => Err(io_error(dir, e)),
        }
    }

    /// Locks `dir` (created if missing), waiting while another process
    /// holds it: for work that every process of a machine may start and
    /// one does (filling a shared cache).
    pub fn wait(dir: &Path) -> Result<Self> {
        let (file, path) = Self::open(dir)?;
        file.lock().map_err(|e| io_error(dir, e))?;
        Ok(FolderLock { _file: file, path })
    }

    /// The lock file of `dir`, opened (both created if missing).
    fn open(dir: &Path) -> Result<(File, PathBuf)> {
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        let path = dir.join(Self::FILE_NAME);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io_error(dir, e))?;
        Ok((file, path))
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn io_error(dir: &Path, e: std::io::Error) -> Error {
    Error::Format {
        file: dir.display().to_string(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = FolderLock::acquire(dir.path(), "build-shards").unwrap();
        let err = FolderLock::acquire(dir.path(), "build-shards")
            .unwrap_err()
            .to_string();
        assert!(err.contains("another lvpipe process"), "{err}");
        drop(first);
        assert!(FolderLock::acquire(dir.path(), "build-shards").is_ok());
    }
}
