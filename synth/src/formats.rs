//! The annotation formats synth writes, as the VILA code base reads them:
//! LLaVA JSON (images and videos), MMC4-style interleaved JSONL, text JSONL
//! and WebDataset tar.

use serde::Serialize;

use crate::Result;
use crate::scene::capitalize;

#[derive(Serialize)]
pub(crate) struct LlavaTurn {
    pub from: &'static str,
    pub value: String,
}

#[derive(Serialize)]
pub(crate) struct LlavaRecord {
    pub id: String,
    pub image: String,
    pub conversations: Vec<LlavaTurn>,
}

#[derive(Serialize)]
pub(crate) struct Mmc4Image {
    pub image_name: String,
    pub matched_text_index: usize,
}

#[derive(Serialize)]
pub(crate) struct Mmc4Record {
    pub id: String,
    pub url: String,
    pub text_list: Vec<String>,
    pub image_info: Vec<Mmc4Image>,
}

#[derive(Serialize)]
pub(crate) struct TextRecord {
    pub id: String,
    pub text: String,
}

/// A conversation of questions and answers (`"Red."`), the media
/// placeholder (`<image>` or `<video>`) before the first question.
pub(crate) fn qa_turns(placeholder: &str, qas: &[(&str, String, String)]) -> Vec<LlavaTurn> {
    let mut turns = Vec::with_capacity(qas.len() * 2);
    for (i, (_, question, answer)) in qas.iter().enumerate() {
        let value = if i == 0 {
            format!("{placeholder}\n{question}")
        } else {
            question.clone()
        };
        turns.push(LlavaTurn {
            from: "human",
            value,
        });
        turns.push(LlavaTurn {
            from: "gpt",
            value: format!("{}.", capitalize(answer)),
        });
    }
    turns
}

/// A pretty-printed JSON array, as LLaVA annotation files are.
pub(crate) fn json_array<T: Serialize>(items: &[T]) -> String {
    serde_json::to_string_pretty(items).expect("plain data serializes") + "\n"
}

/// One JSON object per line.
pub(crate) fn json_lines<T: Serialize>(items: &[T]) -> String {
    let lines: Vec<String> = items
        .iter()
        .map(|i| serde_json::to_string(i).expect("plain data serializes"))
        .collect();
    lines.join("\n") + "\n"
}

/// A WebDataset tar of `(member name, bytes)`, headers without times or
/// owners, so the same members give the same bytes.
pub(crate) fn tar(members: impl IntoIterator<Item = (String, Vec<u8>)>) -> Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, bytes) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        tar.append_data(&mut header, &name, bytes.as_slice())?;
    }
    Ok(tar.into_inner()?)
}
