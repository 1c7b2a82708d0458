//! The source registry file (`registry.toml`): a corpus's sources with their
//! names, formats, paths and media roots, the role VILA's dataset registry
//! YAML plays. `synth` writes it, `sharding` reads it.

use std::path::PathBuf;

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
    /// Pre-tokenized documents (LongVILA's stage-4 SlimPajama): rows with an
    /// `input_ids` list, in Parquet, Arrow IPC or JSONL; every token in the
    /// loss.
    Tokens,
    /// LLaVA/VILA annotations as Parquet columns (`id`, `image` or `video`,
    /// `conversations` as a list of `{from, value}`).
    LlavaParquet,
}

impl SourceKind {
    pub const ALL: [SourceKind; 6] = [
        SourceKind::Llava,
        SourceKind::Text,
        SourceKind::Wds,
        SourceKind::Interleaved,
        SourceKind::Tokens,
        SourceKind::LlavaParquet,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Llava => "llava",
            SourceKind::Text => "text",
            SourceKind::Wds => "wds",
            SourceKind::Interleaved => "interleaved",
            SourceKind::Tokens => "tokens",
            SourceKind::LlavaParquet => "llava-parquet",
        }
    }

    pub fn parse(value: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == value)
            .ok_or_else(|| Error::UnknownValue {
                what: "source kind",
                value: value.to_string(),
                expected: Self::ALL.map(Self::as_str).join(", "),
            })
    }
}

/// A registry file:
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
    /// Parses a registry file's text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::Format {
            file: file.to_string(),
            message: e.to_string(),
        })
    }

    /// The registry as TOML text, paths as given.
    pub fn to_toml(&self) -> Result<String> {
        let body = toml::to_string(self).map_err(|e| Error::Format {
            file: "registry.toml".to_string(),
            message: e.to_string(),
        })?;
        Ok(format!(
            "# lvpipe source registry: `lvpipe build-shards --registry THIS_FILE` reads it.\n\
             # Paths are relative to this file's folder.\n{body}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_round_trips_and_names_bad_files() {
        let reg = Registry {
            sources: vec![RegistryEntry {
                name: None,
                kind: SourceKind::Text,
                path: "docs.jsonl".into(),
                media_root: Some(".".into()),
                frames: Some("uniform:4".into()),
            }],
        };
        let text = reg.to_toml().unwrap();
        assert_eq!(Registry::parse(&text, "r.toml").unwrap(), reg);
        let err = Registry::parse("[[source]]\nkind = \"video\"\npath = \"x\"\n", "r.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("r.toml: "), "{err}");
        assert!(SourceKind::parse("video").is_err());
        assert_eq!(SourceKind::parse("wds").unwrap(), SourceKind::Wds);
    }
}
