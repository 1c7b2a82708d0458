//! The modules a curriculum stage may train, as recipes name them.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A trainable part of the VILA-shaped model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainableModule {
    /// The vision tower (SigLIP).
    Vision,
    /// The `mlp_downsample` projector.
    Projector,
    /// The whole LLM.
    Llm,
    /// Low-rank adapters on the LLM's attention projections (q, k, v, o),
    /// merged into them at the end of the stage.
    LlmLora,
    /// The LLM's token embedding and output head.
    Embed,
    /// The LLM's norms.
    Norm,
}

impl TrainableModule {
    pub const ALL: [TrainableModule; 6] = [
        TrainableModule::Vision,
        TrainableModule::Projector,
        TrainableModule::Llm,
        TrainableModule::LlmLora,
        TrainableModule::Embed,
        TrainableModule::Norm,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TrainableModule::Vision => "vision",
            TrainableModule::Projector => "projector",
            TrainableModule::Llm => "llm",
            TrainableModule::LlmLora => "llm_lora",
            TrainableModule::Embed => "embed",
            TrainableModule::Norm => "norm",
        }
    }

    pub fn parse(value: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == value)
            .ok_or_else(|| Error::UnknownValue {
                what: "trainable module",
                value: value.to_string(),
                expected: Self::ALL.map(Self::as_str).join(", "),
            })
    }
}

impl fmt::Display for TrainableModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_match_serde() {
        for m in TrainableModule::ALL {
            assert_eq!(TrainableModule::parse(m.as_str()).unwrap(), m);
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{m}\""));
        }
        assert!(TrainableModule::parse("lm_head_only").is_err());
    }
}
