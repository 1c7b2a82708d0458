//! Source specifications: `--source kind:path` flags and registry files.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The format of a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// LLaVA/VILA annotations: a JSON array or JSONL of
    /// `{"id", "image"|"video", "conversations": [{"from", "value"}]}`.
    Llava,
    /// JSONL of `{"text": ...}` documents (optionally with an `"id"`).
    Text,
    /// A WebDataset tar: members grouped by key, `KEY.jpg|png` + `KEY.txt`.
    Wds,
    /// MMC4-style JSONL: `{"text_list": [...], "image_info": [{"image_name",
    /// "matched_text_index"}]}`.
    Interleaved,
}

impl SourceKind {
    const NAMES: &'static str = "llava, text, wds, interleaved";

    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Llava => "llava",
            SourceKind::Text => "text",
            SourceKind::Wds => "wds",
            SourceKind::Interleaved => "interleaved",
        }
    }

    pub fn parse(value: &str) -> Result<Self> {
        match value {
            "llava" => Ok(SourceKind::Llava),
            "text" => Ok(SourceKind::Text),
            "wds" => Ok(SourceKind::Wds),
            "interleaved" => Ok(SourceKind::Interleaved),
            other => Err(Error::Config(format!(
                "unknown source kind `{other}` (expected one of: {})",
                Self::NAMES
            ))),
        }
    }
}

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
                SourceKind::NAMES
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

/// A registry file: the sources of a corpus with their names, kinds, paths
/// and media roots, the role VILA's dataset registry YAML plays.
///
/// ```toml
/// [[source]]
/// name = "sft"
/// kind = "llava"
/// path = "sft.json"      # relative to the registry file
/// media_root = "."
/// frames = "uniform:16"  # videos only; defaults to `--frames`
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    #[serde(rename = "source")]
    pub sources: Vec<RegistryEntry>,
}

/// One `[[source]]` of a registry file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryEntry {
    pub name: Option<String>,
    pub kind: SourceKind,
    pub path: PathBuf,
    pub media_root: Option<PathBuf>,
    /// Frame policy of this source's videos; defaults to the build's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames: Option<String>,
}

impl Registry {
    /// Reads a registry file; relative paths resolve against its folder.
    pub fn load(path: &Path) -> Result<Vec<SourceSpec>> {
        let text = fs_err::read_to_string(path)?;
        let registry: Registry = toml::from_str(&text)
            .map_err(|e| Error::Config(format!("registry {}: {e}", path.display())))?;
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

    /// The registry as TOML text, paths as given.
    pub fn to_toml(&self) -> String {
        let mut out = String::from(
            "# lvpipe source registry: `lvpipe build-shards --registry THIS_FILE` reads it.\n\
             # Paths are relative to this file's folder.\n",
        );
        out.push_str(&toml::to_string(self).expect("registry serializes"));
        out
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
        let reg = Registry {
            sources: vec![RegistryEntry {
                name: None,
                kind: SourceKind::Text,
                path: "docs.jsonl".into(),
                media_root: Some(".".into()),
                frames: Some("uniform:4".into()),
            }],
        };
        std::fs::write(&file, reg.to_toml()).unwrap();
        let specs = Registry::load(&file).unwrap();
        assert_eq!(specs[0].name, "docs");
        assert_eq!(specs[0].path, dir.path().join("docs.jsonl"));
        assert_eq!(specs[0].media_root(), dir.path().join("."));
    }
}
