//! The ChatML template, tokenization and the loss mask.
//!
//! The template is Qwen2's as VILA uses it:
//! `<|im_start|>system\nYou are a helpful assistant<|im_end|>\n` then
//! `<|im_start|>{role}\n{content}<|im_end|>\n` per turn. The loss mask covers
//! assistant content plus its closing `<|im_end|>` and nothing else.
//!
//! VILA finds the mask by tokenizing twice and aligning the results, and masks
//! the whole sample when alignment fails. Here the whole text is tokenized
//! once with byte offsets, and a token is in the loss when it starts inside
//! an assistant answer: the ids are exactly the tokenizer's on the whole
//! text, whatever its pre-tokenizer does at piece boundaries.

use std::path::Path;

use lvpipe_schemas::tokens;
use tokenizers::{AddedToken, Tokenizer};

use crate::{Error, Result};

/// Name of the default template, stored in every shard's metadata.
pub const CHAT_TEMPLATE: &str = "chatml";

/// A tokenizer family's chat format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChatTemplate {
    /// Qwen2's (and VILA's for Qwen2): `<|im_start|>{role}\n{content}<|im_end|>\n`.
    #[default]
    ChatMl,
    /// Llama-3's header format: `<|begin_of_text|>`, then
    /// `<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>`
    /// per turn (VILA's `llama_3` conversation).
    Llama3,
}

impl ChatTemplate {
    pub const ALL: [ChatTemplate; 2] = [ChatTemplate::ChatMl, ChatTemplate::Llama3];

    pub fn as_str(self) -> &'static str {
        match self {
            ChatTemplate::ChatMl => "chatml",
            ChatTemplate::Llama3 => "llama3",
        }
    }

    pub fn parse(value: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == value)
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown chat template `{value}` (expected chatml or llama3)"
                ))
            })
    }

    /// A tokenizer's family: Llama-3's where it has Llama-3's header tokens
    /// and no ChatML ones, ChatML otherwise.
    fn of(tokenizer: &Tokenizer) -> Self {
        let has = |t: &str| tokenizer.token_to_id(t).is_some();
        match has(LLAMA3_HEADER_START) && !has(tokens::IM_START) {
            true => ChatTemplate::Llama3,
            false => ChatTemplate::ChatMl,
        }
    }

    /// The special tokens the template and media need, in the order they
    /// are added to a tokenizer that lacks them.
    pub fn tokens(self) -> &'static [&'static str] {
        match self {
            ChatTemplate::ChatMl => &tokens::ALL,
            ChatTemplate::Llama3 => &[
                LLAMA3_BEGIN,
                LLAMA3_END_OF_TEXT,
                LLAMA3_HEADER_START,
                LLAMA3_HEADER_END,
                LLAMA3_EOT,
                tokens::IMAGE,
                tokens::VIDEO,
            ],
        }
    }

    /// The template's text of one turn's opening, before its content.
    fn open(self, role: &str) -> String {
        match self {
            ChatTemplate::ChatMl => format!("{}{role}\n", tokens::IM_START),
            ChatTemplate::Llama3 => format!("{LLAMA3_HEADER_START}{role}{LLAMA3_HEADER_END}\n\n"),
        }
    }

    /// The token that closes a turn (trained with an answer).
    fn close(self) -> &'static str {
        match self {
            ChatTemplate::ChatMl => tokens::IM_END,
            ChatTemplate::Llama3 => LLAMA3_EOT,
        }
    }
}

const LLAMA3_BEGIN: &str = "<|begin_of_text|>";
const LLAMA3_END_OF_TEXT: &str = "<|end_of_text|>";
const LLAMA3_HEADER_START: &str = "<|start_header_id|>";
const LLAMA3_HEADER_END: &str = "<|end_header_id|>";
const LLAMA3_EOT: &str = "<|eot_id|>";
/// The system prompt used when a conversation does not bring its own.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful assistant";

/// The special tokens the template and the media placeholders need, by
/// their ChatML names; under Llama-3's template `im_start` is
/// `<|start_header_id|>`, `im_end` `<|eot_id|>` and `end_of_text`
/// `<|end_of_text|>`.
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
    /// The `tokenizer.json` in effect: the file's bytes, or, where special
    /// tokens were added, the tokenizer serialized with them.
    json: Vec<u8>,
    /// Special tokens the file lacked and loading added.
    added: Vec<&'static str>,
    template: ChatTemplate,
}

impl ChatTokenizer {
    /// Loads a `tokenizer.json`. A stock tokenizer (Qwen2's, Llama's) that
    /// lacks the template's or the media placeholders' tokens gets them added
    /// as special tokens after its vocabulary, as VILA adds `<image>` and
    /// `<video>`; [`ChatTokenizer::added`] says which, and
    /// [`ChatTokenizer::json`] is the tokenizer with them, to write beside
    /// shards and models.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, ChatTemplate::ChatMl)
    }

    /// [`ChatTokenizer::load`] for another chat template.
    pub fn load_with(path: &Path, template: ChatTemplate) -> Result<Self> {
        Self::read(path, Some(template))
    }

    /// [`ChatTokenizer::load`] with the template of the tokenizer's family
    /// (for a model folder that does not say which it was trained with).
    pub fn load_family(path: &Path) -> Result<Self> {
        Self::read(path, None)
    }

    fn read(path: &Path, template: Option<ChatTemplate>) -> Result<Self> {
        let bytes = fs_err::read(path)?;
        let mut tokenizer = Tokenizer::from_bytes(&bytes).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let template = template.unwrap_or_else(|| ChatTemplate::of(&tokenizer));
        let added: Vec<&'static str> = template
            .tokens()
            .iter()
            .copied()
            .filter(|t| tokenizer.token_to_id(t).is_none())
            .collect();
        let json = if added.is_empty() {
            bytes
        } else {
            let new: Vec<AddedToken> = added.iter().map(|t| AddedToken::from(*t, true)).collect();
            tokenizer
                .add_special_tokens(new)
                .map_err(|e| Error::Tokenizer {
                    path: path.to_path_buf(),
                    message: format!("cannot add {}: {e}", added.join(", ")),
                })?;
            tokenizer
                .to_string(false)
                .map_err(|e| Error::Tokenizer {
                    path: path.to_path_buf(),
                    message: format!("cannot serialize it with the added tokens: {e}"),
                })?
                .into_bytes()
        };
        let id = |tok: &str| tokenizer.token_to_id(tok).unwrap_or_default();
        let special = match template {
            ChatTemplate::ChatMl => SpecialTokens {
                im_start: id(SpecialTokens::IM_START),
                im_end: id(SpecialTokens::IM_END),
                end_of_text: id(SpecialTokens::END_OF_TEXT),
                image: id(SpecialTokens::IMAGE),
                video: id(SpecialTokens::VIDEO),
            },
            ChatTemplate::Llama3 => SpecialTokens {
                im_start: id(LLAMA3_HEADER_START),
                im_end: id(LLAMA3_EOT),
                end_of_text: id(LLAMA3_END_OF_TEXT),
                image: id(SpecialTokens::IMAGE),
                video: id(SpecialTokens::VIDEO),
            },
        };
        Ok(ChatTokenizer {
            tokenizer,
            special,
            fingerprint: blake3::hash(&json).to_hex().to_string(),
            json,
            added,
            template,
        })
    }

    /// The chat template the tokenizer applies.
    pub fn template(&self) -> ChatTemplate {
        self.template
    }

    /// The special tokens loading added (none for a tokenizer that has them).
    pub fn added(&self) -> &[&'static str] {
        &self.added
    }

    /// The `tokenizer.json` in effect (with any added tokens): loading it
    /// gives the same tokenizer and fingerprint.
    pub fn json(&self) -> &[u8] {
        &self.json
    }

    /// Tokens in the vocabulary, added ones included: the least vocabulary
    /// a model needs.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// blake3 of the tokenizer.json in effect ([`ChatTokenizer::json`]).
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
    ///
    /// The templated text is tokenized once, whole, as the Python
    /// `tokenizers` package and `apply_chat_template` do (tokenizing it in
    /// pieces differs where a tokenizer prepends `▁` to every piece, as
    /// Llama's does); a token is in the loss when its first byte is in an
    /// assistant answer.
    pub fn encode_conversation(&self, turns: &[Segment]) -> Result<(Vec<u32>, Vec<u8>)> {
        let (system, turns) = match turns.first() {
            Some(first) if first.role == "system" => (first.content.as_str(), &turns[1..]),
            _ => (DEFAULT_SYSTEM_PROMPT, turns),
        };
        let t = self.template;
        let mut text = match t {
            ChatTemplate::ChatMl => String::new(),
            ChatTemplate::Llama3 => LLAMA3_BEGIN.to_string(),
        };
        let separator = match t {
            ChatTemplate::ChatMl => "\n",
            ChatTemplate::Llama3 => "",
        };
        text.push_str(&format!(
            "{}{system}{}{separator}",
            t.open("system"),
            t.close()
        ));
        let mut answers = Vec::new();
        for turn in turns {
            text.push_str(&t.open(turn.role));
            let from = text.len();
            text.push_str(&turn.content);
            text.push_str(t.close());
            if turn.role == "assistant" {
                answers.push(from..text.len());
            }
            text.push_str(separator);
        }
        let encoding = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| Error::Internal(format!("tokenization failed: {e}")))?;
        let mask = encoding
            .get_offsets()
            .iter()
            .map(|&(from, _)| u8::from(answers.iter().any(|a| a.contains(&from))))
            .collect();
        Ok((encoding.get_ids().to_vec(), mask))
    }

    /// Tokenizes a conversation that the model should continue: the
    /// template applied to `turns`, then the assistant header
    /// (`<|im_start|>assistant\n`), as generation starts from it.
    pub fn encode_generation_prompt(&self, turns: &[Segment]) -> Result<Vec<u32>> {
        let (mut ids, _) = self.encode_conversation(turns)?;
        ids.extend(self.encode(&self.template.open("assistant"))?);
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
    fn a_tokenizer_without_the_template_tokens_gets_them_added() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain.json");
        let mut tok = tokenizers::Tokenizer::new(tokenizers::models::bpe::BPE::default());
        tok.add_special_tokens(vec![tokenizers::AddedToken::from("<|im_start|>", true)])
            .unwrap();
        tok.save(&path, false).unwrap();
        let loaded = ChatTokenizer::load(&path).unwrap();
        assert_eq!(
            loaded.added(),
            ["<|endoftext|>", "<|im_end|>", "<image>", "<video>"]
        );
        let s = loaded.special();
        assert_eq!(s.im_start, 0, "the tokenizer's own token keeps its id");
        assert_eq!(
            [s.end_of_text, s.im_end, s.image, s.video],
            [1, 2, 3, 4],
            "added after the vocabulary, in order"
        );
        assert_eq!(loaded.vocab_size(), 5);
        // The fingerprint is the tokenizer's with the added tokens, not the file's.
        assert_ne!(
            loaded.fingerprint(),
            blake3::hash(&std::fs::read(&path).unwrap())
                .to_hex()
                .to_string()
        );
    }
}
