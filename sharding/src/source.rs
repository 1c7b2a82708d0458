//! Source specifications: `--source kind:path` flags and registry files.

use std::path::{Path, PathBuf};

pub use lvpipe_schemas::{Registry, SourceKind};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One source of a build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceSpec {
    /// The value of the `source` column; defaults to the file stem.
    pub name: String,
    pub kind: SourceKind,
    pub path: PathBuf,
    /// Folder that relative media paths resolve against; defaults to the
    /// folder of `path`.
    pub media_root: Option<PathBuf>,
    /// Frame policy of this source's videos (`uniform:N`, `fps:F,max:N`,
    /// `head:fps:F,max:N`); defaults to the build's `--frames`.
    pub frames: Option<String>,
}

impl SourceSpec {
    /// Parses `[name=]kind:path`, as `--source` takes it.
    pub fn parse(spec: &str, media_root: Option<&Path>) -> Result<Self> {
        let (name, rest) = match spec.split_once('=') {
            Some((name, rest)) if !name.contains(':') => (Some(name.to_string()), rest),
            _ => (None, spec),
        };
        let (kind, path) = rest.split_once(':').ok_or_else(|| {
            Error::Config(format!(
                "--source `{spec}`: expected KIND:PATH or NAME=KIND:PATH, KIND one of {}",
                SourceKind::ALL.map(SourceKind::as_str).join(", ")
            ))
        })?;
        let kind = SourceKind::parse(kind)
            .map_err(|e| Error::Config(format!("--source `{spec}`: {e}")))?;
        let path = PathBuf::from(path);
        let name = match name {
            Some(name) => name,
            None => default_name(&path)?,
        };
        Ok(SourceSpec {
            name,
            kind,
            path,
            media_root: media_root.map(Path::to_path_buf),
            frames: None,
        })
    }

    /// The folder media paths of this source resolve against.
    pub fn media_root(&self) -> PathBuf {
        match &self.media_root {
            Some(root) => root.clone(),
            None => self
                .path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        }
    }
}

fn default_name(path: &Path) -> Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.split('.').next().unwrap_or(n).to_string())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| Error::Config(format!("cannot name a source after `{}`", path.display())))
}

impl SourceSpec {
    /// The sources of a registry file; relative paths resolve against its
    /// folder.
    pub fn from_registry(path: &Path) -> Result<Vec<SourceSpec>> {
        let text = fs_err::read_to_string(path)?;
        let registry = Registry::parse(&text, &path.display().to_string())?;
        let base = path.parent().unwrap_or(Path::new(""));
        registry
            .sources
            .into_iter()
            .map(|entry| {
                let file = base.join(&entry.path);
                Ok(SourceSpec {
                    name: match entry.name {
                        Some(name) => name,
                        None => default_name(&file)?,
                    },
                    kind: entry.kind,
                    media_root: entry.media_root.map(|root| base.join(root)),
                    path: file,
                    frames: entry.frames,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_flags_parse_with_default_names() {
        let s = SourceSpec::parse("wds:raw/pairs-000.tar", None).unwrap();
        assert_eq!((s.name.as_str(), s.kind), ("pairs-000", SourceKind::Wds));
        assert_eq!(s.media_root(), PathBuf::from("raw"));
        let s = SourceSpec::parse("cap=llava:raw/a.json", Some(Path::new("m"))).unwrap();
        assert_eq!(
            (s.name.as_str(), s.media_root()),
            ("cap", PathBuf::from("m"))
        );
        let err = SourceSpec::parse("video:x.json", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown source kind `video`"), "{err}");
        assert!(SourceSpec::parse("x.json", None).is_err());
    }

    #[test]
    fn registry_paths_resolve_against_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("registry.toml");
        std::fs::write(
            &file,
            "[[source]]\nkind = \"text\"\npath = \"docs.jsonl\"\nmedia_root = \".\"\n",
        )
        .unwrap();
        let specs = SourceSpec::from_registry(&file).unwrap();
        assert_eq!(specs[0].name, "docs");
        assert_eq!(specs[0].path, dir.path().join("docs.jsonl"));
        assert_eq!(specs[0].media_root(), dir.path().join("."));
    }
}
