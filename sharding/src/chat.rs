//! The ChatML template, tokenization and the loss mask.
//!
//! The template is Qwen2's as VILA uses it:
//! `<|im_start|>system\nYou are a helpful assistant<|im_end|>\n` then
//! `<|im_start|>{role}\n{content}<|im_end|>\n` per turn. The loss mask covers
//! assistant content plus its closing `<|im_end|>` and nothing else.
//!
//! VILA finds the mask by tokenizing twice and aligning the results, and masks
//! the whole sample when alignment fails. Here the text is tokenized in pieces
//! that start and end at special tokens or newlines, where the byte-level
//! pre-tokenizer splits anyway, so the concatenation equals tokenizing the
//! whole string and every token's mask is known by construction.

use std::path::Path;

use lvpipe_schemas::tokens;
use tokenizers::Tokenizer;

use crate::{Error, Result};

/// Name of the template, stored in every shard's metadata.
pub const CHAT_TEMPLATE: &str = "chatml";
/// The system prompt used when a conversation does not bring its own.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful assistant";

/// The special tokens the template and the media placeholders need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    pub im_start: u32,
    pub im_end: u32,
    pub end_of_text: u32,
    pub image: u32,
    pub video: u32,
}

impl SpecialTokens {
    pub const IM_START: &'static str = tokens::IM_START;
    pub const IM_END: &'static str = tokens::IM_END;
    pub const END_OF_TEXT: &'static str = tokens::END_OF_TEXT;
    pub const IMAGE: &'static str = tokens::IMAGE;
    pub const VIDEO: &'static str = tokens::VIDEO;
    /// Tokens whose literal appearance in data text would corrupt the template.
    pub const RESERVED: [&'static str; 3] = [Self::IM_START, Self::IM_END, Self::END_OF_TEXT];
    /// Every special token, in the order a trained tokenizer numbers them.
    pub const ALL: [&'static str; 5] = tokens::ALL;
}

/// One turn of a conversation in template roles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// `system`, `user`, `assistant`, or `text` for a document.
    pub role: &'static str,
    pub content: String,
}

/// A Hugging Face tokenizer with the ChatML template applied on top.
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    special: SpecialTokens,
    fingerprint: String,
}

impl ChatTokenizer {
    /// Loads a `tokenizer.json` and checks that it has the template's tokens.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = fs_err::read(path)?;
        let tokenizer = Tokenizer::from_bytes(&bytes).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let id = |tok: &str| tokenizer.token_to_id(tok);
        let missing: Vec<_> = SpecialTokens::ALL
            .into_iter()
            .filter(|t| id(t).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(Error::Tokenizer {
                path: path.to_path_buf(),
                message: format!(
                    "lacks the special tokens {} that the {CHAT_TEMPLATE} template and media \
                     placeholders need (refusing to fall back to another template)",
                    missing.join(", ")
                ),
            });
        }
        let special = SpecialTokens {
            im_start: id(SpecialTokens::IM_START).unwrap_or_default(),
            im_end: id(SpecialTokens::IM_END).unwrap_or_default(),
            end_of_text: id(SpecialTokens::END_OF_TEXT).unwrap_or_default(),
            image: id(SpecialTokens::IMAGE).unwrap_or_default(),
            video: id(SpecialTokens::VIDEO).unwrap_or_default(),
        };
        Ok(ChatTokenizer {
            tokenizer,
            special,
            fingerprint: blake3::hash(&bytes).to_hex().to_string(),
        })
    }

    /// blake3 of the tokenizer.json bytes.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn special(&self) -> SpecialTokens {
        self.special
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Tokenizes a conversation with the template. Returns the token ids and
    /// the loss mask (1 on assistant content and its `<|im_end|>`).
    pub fn encode_conversation(&self, turns: &[Segment]) -> Result<(Vec<u32>, Vec<u8>)> {
        let (system, turns) = match turns.first() {
            Some(first) if first.role == "system" => (first.content.as_str(), &turns[1..]),
            _ => (DEFAULT_SYSTEM_PROMPT, turns),
        };
        let (start, end) = (SpecialTokens::IM_START, SpecialTokens::IM_END);
        let mut ids = Vec::new();
        let mut mask = Vec::new();
        // Untrained text accumulates in `prompt` until an assistant answer
        // starts, so the tokenizer runs once per prompt and once per answer.
        let mut prompt = format!("{start}system\n{system}{end}\n");
        for turn in turns {
            prompt.push_str(&format!("{start}{}\n", turn.role));
            if turn.role == "assistant" {
                self.push(&mut ids, &mut mask, &prompt, 0)?;
                self.push(&mut ids, &mut mask, &format!("{}{end}", turn.content), 1)?;
                prompt = "\n".to_string();
            } else {
                prompt.push_str(&turn.content);
                prompt.push_str(end);
                prompt.push('\n');
            }
        }
        self.push(&mut ids, &mut mask, &prompt, 0)?;
        Ok((ids, mask))
    }

    /// Tokenizes a conversation that the model should continue: the
    /// template applied to `turns`, then the assistant header
    /// (`<|im_start|>assistant\n`), as generation starts from it.
    pub fn encode_generation_prompt(&self, turns: &[Segment]) -> Result<Vec<u32>> {
        let (mut ids, _) = self.encode_conversation(turns)?;
        ids.extend(self.encode(&format!("{}assistant\n", SpecialTokens::IM_START))?);
        Ok(ids)
    }

    /// Tokenizes a document for language modelling: every token is trained
    /// except media placeholders; `<|endoftext|>` closes it.
    pub fn encode_document(&self, text: &str) -> Result<(Vec<u32>, Vec<u8>)> {
        let mut ids = self.encode(text)?;
        ids.push(self.special.end_of_text);
        let mask = ids
            .iter()
            .map(|&id| u8::from(id != self.special.image && id != self.special.video))
            .collect();
        Ok((ids, mask))
    }

    /// Plain tokenization, no template, special tokens recognized in the text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| Error::Internal(format!("tokenization failed: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids to text, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| Error::Internal(format!("decoding failed: {e}")))
    }

    fn push(&self, ids: &mut Vec<u32>, mask: &mut Vec<u8>, text: &str, trained: u8) -> Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        let piece = self.encode(text)?;
        mask.extend(std::iter::repeat_n(trained, piece.len()));
        ids.extend(piece);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> ChatTokenizer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let corpus: Vec<String> = (0..50)
            .map(|i| {
                format!("What color is shape {i}?\nIt is red, blue or green.\n<image>\nA square.")
            })
            .collect();
        lvpipe_synth::train_tokenizer(&corpus, 300, &path).unwrap();
        ChatTokenizer::load(&path).unwrap()
    }

    fn turn(role: &'static str, content: &str) -> Segment {
        Segment {
            role,
            content: content.to_string(),
        }
    }

    #[test]
    fn pieces_tokenize_like_the_whole_string_and_the_mask_covers_answers() {
        let tok = tokenizer();
        let turns = [
            turn("system", "Be brief."),
            turn("user", "<image>\nWhat color is it?"),
            turn("assistant", "Red."),
            turn("user", "And the shape?\n"),
            turn("assistant", " A square.\n"),
        ];
        let (ids, mask) = tok.encode_conversation(&turns).unwrap();
        let rendered = "<|im_start|>system\nBe brief.<|im_end|>\n\
            <|im_start|>user\n<image>\nWhat color is it?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n\
            <|im_start|>user\nAnd the shape?\n<|im_end|>\n<|im_start|>assistant\n A square.\n<|im_end|>\n";
        assert_eq!(ids, tok.encode(rendered).unwrap());
        let trained: Vec<u32> = ids
            .iter()
            .zip(&mask)
            .filter(|(_, m)| **m == 1)
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(
            tok.decode(&trained).unwrap(),
            "Red.<|im_end|> A square.\n<|im_end|>"
        );
        assert_eq!(ids.iter().filter(|&&i| i == tok.special().image).count(), 1);
    }

    #[test]
    fn the_default_system_prompt_is_qwen2s() {
        let tok = tokenizer();
        let (ids, _) = tok
            .encode_conversation(&[turn("user", "Hi"), turn("assistant", "Hello")])
            .unwrap();
        assert!(
            tok.decode(&ids)
                .unwrap()
                .starts_with("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n")
        );
    }

    #[test]
    fn a_tokenizer_without_the_template_tokens_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain.json");
        let mut tok = tokenizers::Tokenizer::new(tokenizers::models::bpe::BPE::default());
        tok.add_special_tokens(vec![tokenizers::AddedToken::from("<|im_start|>", true)])
            .unwrap();
        tok.save(&path, false).unwrap();
        let err = ChatTokenizer::load(&path).err().unwrap().to_string();
        assert!(
            err.contains("<|im_end|>") && err.contains("<image>"),
            "{err}"
        );
    }
}
