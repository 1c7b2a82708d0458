//! Property tests over mutated inputs, one per reader: whatever the bytes, a
//! reader ends without panicking, in bounded memory, and (for JSONL) emits
//! each non-blank line exactly once, as a sample or a quarantine row. The
//! case counts are fixed, so CI spends a bounded time on them.

use proptest::prelude::*;

use super::Body;
use crate::source::SourceKind;

/// A reader over `content` with 4 KiB limits.
fn read(kind: SourceKind, name: &str, content: &[u8]) -> Result<Vec<(String, Body)>, String> {
    super::tests::read_file(kind, name, content, 4096)
}

/// `seed` with some bytes flipped, a range cut out, and bytes inserted.
fn mutated(seed: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        any::<prop::sample::Index>(),
        0..64usize,
        prop::collection::vec(any::<u8>(), 0..16),
    )
        .prop_map(move |(flips, cut_at, cut_len, insert)| {
            let mut bytes = seed.to_vec();
            for (at, byte) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= byte;
            }
            let at = cut_at.index(bytes.len());
            let end = (at + cut_len).min(bytes.len());
            bytes.splice(at..end, insert);
            bytes
        })
}

const LLAVA_JSONL: &[u8] = br#"{"id": "0", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Red."}]}
{"id": "1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}

{"id": "2", "video": "v.mp4", "conversations": [{"from": "human", "value": "<video>\nWhich way?"}, {"from": "gpt", "value": "Left."}]}
"#;
const LLAVA_JSON: &[u8] = br#"[{"id": "0", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Red."}]},
 {"id": "1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]"#;
const TEXT: &[u8] = b"{\"id\": \"d0\", \"text\": \"A long story.\"}\n{\"text\": \"Another.\"}\n";
const INTERLEAVED: &[u8] = br#"{"id": "i0", "text_list": ["A page.", "A picture."], "image_info": [{"image_name": "a.png", "matched_text_index": 1}]}
"#;

/// Lines with something other than white space: what a JSONL reader must
/// emit one record each for.
fn records(bytes: &[u8]) -> usize {
    bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .count()
}

fn tar() -> &'static [u8] {
    static TAR: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    TAR.get_or_init(|| {
        let mut tar = tar::Builder::new(Vec::new());
        for (name, bytes) in [
            ("000.jpg", &b"\xFF\xD8\xFF not a jpeg"[..]),
            ("000.txt", b"A red square."),
            ("001.png", b"\x89PNG also not"),
            ("001.txt", b"Another."),
        ] {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, name, bytes).unwrap();
        }
        tar.into_inner().unwrap()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn jsonl_readers_emit_every_line_once(
        (kind, bytes) in prop_oneof![
            mutated(LLAVA_JSONL).prop_map(|b| (SourceKind::Llava, b)),
            mutated(TEXT).prop_map(|b| (SourceKind::Text, b)),
            mutated(INTERLEAVED).prop_map(|b| (SourceKind::Interleaved, b)),
        ]
    ) {
        // A mutation can make the first byte `[`: then it is a JSON array.
        let array = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
        let out = read(kind, "a.jsonl", &bytes);
        let out = out.map_err(TestCaseError::fail)?;
        if !(array && kind == SourceKind::Llava) {
            prop_assert_eq!(out.len(), records(&bytes));
        }
    }

    #[test]
    fn the_json_array_reader_ends_on_any_bytes(bytes in mutated(LLAVA_JSON)) {
        let out = read(SourceKind::Llava, "a.json", &bytes);
        prop_assert!(out.is_ok(), "{:?}", out.err());
    }

    #[test]
    fn the_tar_reader_ends_on_any_bytes(bytes in mutated(tar())) {
        let out = read(SourceKind::Wds, "a.tar", &bytes);
        prop_assert!(out.is_ok(), "{:?}", out.err());
    }

    #[test]
    fn registries_parse_or_fail_on_any_bytes(
        bytes in mutated(b"[[source]]\nname = \"sft\"\nkind = \"llava\"\npath = \"sft.json\"\nmedia_root = \".\"\nframes = \"uniform:8\"\n")
    ) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = lvpipe_schemas::Registry::parse(&text, "registry.toml");
    }
}
