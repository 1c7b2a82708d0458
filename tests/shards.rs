//! synth -> build-shards -> sql, end to end through the binary.

mod common;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{UInt8Type, UInt32Type};
use common::*;

#[test]
fn counts_per_source_and_kind_equal_what_synth_wrote() {
    let corpus = tiny_corpus();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("shards");
    let out = out.to_str().unwrap();
    let summary = lvpipe_ok(corpus, &build_args(out, &["--json"]));
    let summary: serde_json::Value = serde_json::from_str(&summary).unwrap();
    assert_eq!(summary["quarantined"], 0, "{summary}");

    let answers: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(corpus.join("raw/answers.json")).unwrap())
            .unwrap();
    let rows = sql_json(
        corpus,
        out,
        "SELECT source, kind, count(*) AS n, sum(num_text_tokens) AS tokens FROM samples GROUP BY 1, 2 ORDER BY 1",
    );
    let got: BTreeMap<String, (String, u64)> = rows
        .iter()
        .map(|r| {
            assert!(r["tokens"].as_u64().unwrap() > r["n"].as_u64().unwrap());
            (
                r["source"].as_str().unwrap().to_string(),
                (
                    r["kind"].as_str().unwrap().to_string(),
                    r["n"].as_u64().unwrap(),
                ),
            )
        })
        .collect();
    let expected: BTreeMap<String, (String, u64)> = answers["counts"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                (
                    answers["kinds"][k].as_str().unwrap().to_string(),
                    v.as_u64().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(got, expected);

    // The registry synth wrote builds the same samples.
    let reg_out = dir.path().join("from-registry");
    lvpipe_ok(
        corpus,
        &[
            "build-shards",
            "--registry",
            "raw/registry.toml",
            "--tokenizer",
            "raw/tokenizer.json",
            "--image-size",
            "64",
            "--out",
            reg_out.to_str().unwrap(),
        ],
    );
    let ids = |shards: &str| {
        sql_json(
            corpus,
            shards,
            "SELECT sample_id FROM samples ORDER BY sample_id",
        )
    };
    assert_eq!(ids(reg_out.to_str().unwrap()), ids(out));

    // Every stored image has the requested size, and the manifest table lists the files.
    let sizes = sql_json(
        corpus,
        out,
        "SELECT count(*) AS n FROM (SELECT unnest(media) AS m FROM samples) WHERE m['width'] != 64 OR m['height'] != 64",
    );
    assert_eq!(sizes[0]["n"], 0);
    let manifest = sql_json(
        corpus,
        out,
        "SELECT sum(rows) AS rows FROM manifest WHERE table_name = 'samples'",
    );
    assert_eq!(
        manifest[0]["rows"].as_u64(),
        Some(expected.values().map(|v| v.1).sum())
    );
}

#[test]
fn masked_tokens_decode_to_exactly_the_assistant_turns() {
    let corpus = tiny_corpus();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("shards");
    lvpipe_ok(corpus, &build_args(out.to_str().unwrap(), &[]));
    let tokenizer = tokenizers::Tokenizer::from_file(corpus.join("raw/tokenizer.json")).unwrap();
    let mut checked_conversations = 0;
    for batch in read_table(&out, "samples-") {
        let ids = batch.column_by_name("input_ids").unwrap().as_list::<i32>();
        let masks = batch.column_by_name("loss_mask").unwrap().as_list::<i32>();
        let messages = batch.column_by_name("messages").unwrap().as_list::<i32>();
        let kinds = batch.column_by_name("kind").unwrap().as_string::<i32>();
        let frames = batch
            .column_by_name("num_frames")
            .unwrap()
            .as_primitive::<UInt32Type>();
        for row in 0..batch.num_rows() {
            let ids = ids.value(row);
            let ids = ids.as_primitive::<UInt32Type>().values();
            let mask = masks.value(row);
            let mask = mask.as_primitive::<UInt8Type>().values();
            let turns = messages.value(row);
            let turns = turns.as_struct();
            let roles = turns.column(0).as_string::<i32>();
            let contents = turns.column(1).as_string::<i32>();
            // Contiguous runs of masked tokens, decoded.
            let mut runs: Vec<Vec<u32>> = Vec::new();
            for (i, (&id, &m)) in ids.iter().zip(mask).enumerate() {
                if m == 1 {
                    if i == 0 || mask[i - 1] == 0 {
                        runs.push(Vec::new());
                    }
                    runs.last_mut().unwrap().push(id);
                }
            }
            let decoded: Vec<String> = runs
                .iter()
                .map(|r| tokenizer.decode(r, false).unwrap())
                .collect();
            if ["image_text", "video_qa"].contains(&kinds.value(row)) {
                let expected: Vec<String> = (0..roles.len())
                    .filter(|&i| roles.value(i) == "assistant")
                    .map(|i| format!("{}<|im_end|>", contents.value(i)))
                    .collect();
                assert_eq!(decoded, expected, "row {row}");
                // And the whole row decodes to the ChatML rendering of the conversation.
                let mut chatml =
                    String::from("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n");
                // A video is one `<image>` and a newline per sampled frame.
                let video = "<image>\n".repeat(frames.value(row) as usize);
                for i in 0..roles.len() {
                    chatml.push_str(&format!(
                        "<|im_start|>{}\n{}<|im_end|>\n",
                        roles.value(i),
                        contents.value(i).replace("<video>\n", &video)
                    ));
                }
                assert_eq!(tokenizer.decode(ids, false).unwrap(), chatml);
                checked_conversations += 1;
            } else {
                // Documents train on everything but media placeholders, and end with <|endoftext|>.
                let text: String = (0..roles.len()).map(|i| contents.value(i)).collect();
                assert_eq!(
                    decoded.concat(),
                    format!("{}<|endoftext|>", text.replace("<image>", ""))
                );
            }
        }
    }
    assert!(checked_conversations >= 40, "{checked_conversations}");
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([200, 10, 10]));
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A small PNG whose header claims 50000 x 50000 pixels: a decompression bomb.
fn png_bomb() -> Vec<u8> {
    let mut bytes = png(8, 8);
    // IHDR data starts at byte 16 (8 signature + 4 length + 4 type).
    bytes[16..20].copy_from_slice(&50_000u32.to_be_bytes());
    bytes[20..24].copy_from_slice(&50_000u32.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

fn conversation(id: &str, image: Option<&str>, human: &str) -> String {
    let image = image
        .map(|i| format!(r#""image": "{i}", "#))
        .unwrap_or_default();
    format!(
        r#"{{"id": "{id}", {image}"conversations": [{{"from": "human", "value": "{human}"}}, {{"from": "gpt", "value": "A red square."}}]}}"#
    )
}

/// `build-shards` of three small sources in a test's folder (images at
/// 32 px, with its tokenizer.json) into `out`, with `extra` arguments.
fn small_build_args<'a>(out: &'a str, sources: [&'a str; 3], extra: &[&'a str]) -> Vec<&'a str> {
    build_sources(out, "tokenizer.json", "32", &sources, extra)
}

/// Writes one fixture per bad-input kind between good records.
fn bad_inputs(dir: &Path) {
    std::fs::create_dir_all(dir.join("img")).unwrap();
    for i in 0..3 {
        std::fs::write(dir.join(format!("img/good{i}.png")), png(40 + i, 30)).unwrap();
    }
    std::fs::write(
        dir.join("img/corrupt.jpg"),
        b"\xFF\xD8\xFF\xE0 this is not really a jpeg",
    )
    .unwrap();
    let good_png = png(30, 30);
    std::fs::write(
        dir.join("img/truncated.png"),
        &good_png[..good_png.len() / 2],
    )
    .unwrap();
    std::fs::write(dir.join("img/bomb.png"), png_bomb()).unwrap();
    let mut lines = vec![
        conversation("good-0", Some("img/good0.png"), "<image>\\nWhat is it?"),
        conversation("missing", Some("img/nope.png"), "<image>\\nWhat is it?"),
        conversation("corrupt", Some("img/corrupt.jpg"), "<image>\\nWhat is it?"),
        conversation("truncated", Some("img/truncated.png"), "<image>\\nWhat is it?"),
        conversation("bomb", Some("img/bomb.png"), "<image>\\nWhat is it?"),
        r#"{"id": "broken", "conversations": [{"from": "human""#.to_string(),
        conversation("good-1", Some("img/good1.png"), "<image>\\nWhat is it?"),
        conversation("mismatch", Some("img/good2.png"), "<image><image>\\nCompare them."),
        r#"{"id": "empty", "image": "img/good2.png", "conversations": []}"#.to_string(),
        r#"{"id": "alternation", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}"#.to_string(),
        conversation("good-2", None, "Say something."),
    ];
    lines.insert(6, String::new()); // blank lines are skipped, not quarantined
    let mut bytes = lines.join("\n").into_bytes();
    bytes.extend(b"\n{\"id\": \"latin1\", \"conversations\": [{\"from\": \"human\", \"value\": \"caf\xe9\"}]}\n");
    bytes.extend(conversation("good-3", Some("img/good2.png"), "<image>\\nAgain?").as_bytes());
    bytes.push(b'\n');
    std::fs::write(dir.join("vqa.jsonl"), bytes).unwrap();

    std::fs::write(
        dir.join("docs.jsonl"),
        "{\"id\": \"d0\", \"text\": \"A long story.\"}\n{\"id\": \"d1\", \"text\": \"   \"}\n{\"id\": \"d2\", \"text\": \"Another one.\"}\n",
    )
    .unwrap();

    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |name: &str, bytes: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        // Write the name into the raw header so `..` survives (the builder refuses it).
        let raw = &mut header.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        header.set_cksum();
        tar.append(&header, bytes).unwrap();
    };
    add("000.png", &png(20, 20));
    add("000.txt", b"A red square.");
    add("../evil.png", &png(20, 20));
    add("001.png", &png(21, 20));
    add("001.txt", b"Another red square.");
    std::fs::write(dir.join("pairs.tar"), tar.into_inner().unwrap()).unwrap();
}

#[test]
fn every_bad_input_kind_is_quarantined_and_good_records_survive() {
    let corpus = tiny_corpus();
    let dir = tempfile::tempdir().unwrap();
    bad_inputs(dir.path());
    std::fs::copy(
        corpus.join("raw/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let sources = ["llava:vqa.jsonl", "text:docs.jsonl", "wds:pairs.tar"];
    lvpipe_ok(dir.path(), &small_build_args("shards", sources, &[]));
    let rows = sql_json(
        dir.path(),
        "shards",
        "SELECT origin, reason, detail, annotation_id FROM quarantine ORDER BY origin",
    );
    let got: BTreeMap<String, String> = rows
        .iter()
        .map(|r| {
            (
                r["origin"].as_str().unwrap().to_string(),
                r["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected: BTreeMap<String, String> = [
        ("vqa.jsonl:2", "missing_media"),
        ("vqa.jsonl:3", "corrupt_media"),
        ("vqa.jsonl:4", "corrupt_media"),
        ("vqa.jsonl:5", "media_too_large"),
        ("vqa.jsonl:6", "malformed_json"),
        ("vqa.jsonl:9", "placeholder_mismatch"),
        ("vqa.jsonl:10", "empty_conversation"),
        ("vqa.jsonl:11", "non_alternating_conversation"),
        ("vqa.jsonl:13", "non_utf8"),
        ("docs.jsonl:2", "empty_document"),
        ("pairs.tar!../evil.png", "unsafe_path"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(got, expected);
    let bomb = rows.iter().find(|r| r["origin"] == "vqa.jsonl:5").unwrap();
    assert!(
        bomb["detail"].as_str().unwrap().contains("50000x50000"),
        "{bomb}"
    );
    assert_eq!(bomb["annotation_id"], "bomb");

    let good = sql_json(
        dir.path(),
        "shards",
        "SELECT source, coalesce(annotation_id, origin) AS id FROM samples ORDER BY 2",
    );
    let good: Vec<String> = good
        .iter()
        .map(|r| {
            format!(
                "{}/{}",
                r["source"].as_str().unwrap(),
                r["id"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        good,
        [
            "pairs/000",
            "pairs/001",
            "docs/d0",
            "docs/d2",
            "vqa/good-0",
            "vqa/good-1",
            "vqa/good-2",
            "vqa/good-3"
        ]
    );

    // --strict stops at the first bad record, names it, and exits 1.
    let strict = lvpipe(
        dir.path(),
        &[
            "build-shards",
            "--out",
            "strict",
            "--tokenizer",
            "tokenizer.json",
            "--strict",
            "--source",
            "llava:vqa.jsonl",
        ],
    );
    assert_eq!(strict.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&strict.stderr);
    assert!(stderr.contains("vqa.jsonl:2: missing_media"), "{stderr}");
}

#[test]
fn an_interrupted_build_resumes_to_the_same_shards() {
    let corpus = tiny_corpus();
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full");
    let resumed = dir.path().join("resumed");
    let small = ["--shard-size", "40KB", "--row-group-rows", "8"];
    lvpipe_ok(corpus, &build_args(full.to_str().unwrap(), &small));
    let shards = std::fs::read_dir(&full)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("samples-")
        })
        .count();
    assert!(
        shards >= 4,
        "want several shards to interrupt, got {shards}"
    );

    let mut crash = small.to_vec();
    crash.extend(["--fail-after-shards", "2"]);
    let first = lvpipe(corpus, &build_args(resumed.to_str().unwrap(), &crash));
    assert_eq!(first.status.code(), Some(2));
    assert!(!resumed.join("manifest.json").exists());
    assert!(
        resumed.join("samples-00001.parquet").exists()
            && !resumed.join("samples-00002.parquet").exists()
    );
    // What a kill leaves behind: a half-written file and a part without its samples file.
    std::fs::write(resumed.join("samples-00002.parquet.tmp"), b"half").unwrap();
    std::fs::copy(
        full.join("samples-00003.parquet"),
        resumed.join("quarantine-00002.parquet"),
    )
    .unwrap();

    let out = lvpipe(corpus, &build_args(resumed.to_str().unwrap(), &small));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming after"));
    assert_eq!(folder_bytes(&full), folder_bytes(&resumed));

    // A third run finds the build complete and changes nothing.
    let again = lvpipe_ok(corpus, &build_args(resumed.to_str().unwrap(), &small));
    assert!(again.contains("already holds this build"), "{again}");
    assert_eq!(folder_bytes(&full), folder_bytes(&resumed));

    // Other settings into the same folder are refused, not mixed in.
    let other = lvpipe(
        corpus,
        &build_args(resumed.to_str().unwrap(), &["--jpeg-quality", "80"]),
    );
    assert_eq!(other.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&other.stderr).contains("--overwrite"));
}

#[test]
fn synth_is_deterministic_per_seed() {
    let dir = tempfile::tempdir().unwrap();
    for (out, seed) in [("a", "3"), ("b", "3"), ("c", "4")] {
        lvpipe_ok(
            dir.path(),
            &["synth", "--out", out, "--scale", "tiny", "--seed", seed],
        );
    }
    let (a, b, c) = (
        folder_bytes(&dir.path().join("a")),
        folder_bytes(&dir.path().join("b")),
        folder_bytes(&dir.path().join("c")),
    );
    assert_eq!(a.len(), b.len());
    for ((pa, ba), (pb, bb)) in a.iter().zip(&b) {
        assert_eq!(pa, pb);
        assert!(
            ba == bb,
            "{} differs between two runs with the same seed",
            pa.display()
        );
    }
    assert_ne!(a, c);
}

#[test]
fn sql_refuses_writes_and_explains_bad_folders() {
    let corpus = tiny_corpus();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("shards");
    let out = out.to_str().unwrap();
    lvpipe_ok(corpus, &build_args(out, &[]));
    for query in [
        "CREATE TABLE x AS SELECT * FROM samples",
        "INSERT INTO quarantine SELECT * FROM quarantine",
        "COPY samples TO 'stolen.parquet'",
        "DROP TABLE samples",
        "SET datafusion.execution.batch_size = 1",
    ] {
        let res = lvpipe(corpus, &["sql", "--shards", out, query]);
        assert_eq!(res.status.code(), Some(2), "{query}");
        let stderr = String::from_utf8_lossy(&res.stderr);
        assert!(stderr.contains("only queries run"), "{query}: {stderr}");
    }
    assert!(!corpus.join("stolen.parquet").exists());
    let table = lvpipe_ok(
        corpus,
        &[
            "sql",
            "--shards",
            out,
            "SELECT count(*) AS n FROM quarantine",
        ],
    );
    assert!(table.contains("| 0 "), "{table}");
    let csv = lvpipe_ok(
        corpus,
        &[
            "sql",
            "--shards",
            out,
            "--format",
            "csv",
            "SELECT 'a' AS x, 2 AS y",
        ],
    );
    assert_eq!(csv, "x,y\na,2\n");
    let res = lvpipe(corpus, &["sql", "--shards", "raw", "SELECT 1"]);
    assert_eq!(res.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&res.stderr).contains("no manifest.json"));
    // A query that needs more memory than it may use ends with an error.
    let join = "SELECT a.sample_id, a.media, b.media FROM samples a CROSS JOIN samples b \
                ORDER BY a.sample_id";
    let res = lvpipe(
        corpus,
        &["sql", "--shards", out, "--memory-limit", "1MiB", join],
    );
    assert_eq!(res.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        stderr.to_lowercase().contains("resources exhausted"),
        "{stderr}"
    );
}

/// Runs `lvpipe ARGS` in `cwd`, failing the test if it has not ended after
/// `seconds` (a read that blocks on a FIFO would hang forever).
fn lvpipe_within(cwd: &Path, args: &[&str], seconds: u64) -> std::process::Output {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_lvpipe"))
        .args(args)
        .current_dir(cwd)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("lvpipe runs");
    let id = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(seconds)) {
        Ok(out) => out.expect("lvpipe output"),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-9", &id.to_string()])
                .status();
            panic!("lvpipe {args:?} did not end within {seconds} s");
        }
    }
}

/// Media that must not be read: outside the root (`..`, absolute, a
/// symlinked folder, a symlink to a device), special files (a FIFO, a
/// device), and a tar member whose header claims 2^62 bytes.
fn hostile_inputs(dir: &Path) {
    let root = dir.join("root");
    let outside = dir.join("outside");
    std::fs::create_dir_all(root.join("img")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(root.join("img/ok.png"), png(32, 32)).unwrap();
    std::fs::write(outside.join("secret.png"), png(33, 33)).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("linked")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", root.join("img/zero.png")).unwrap();
    let fifo = root.join("img/fifo.png");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let secret = outside.join("secret.png");
    let lines = [
        conversation("ok", Some("img/ok.png"), "<image>\\nWhat is it?"),
        conversation(
            "dotdot",
            Some("../outside/secret.png"),
            "<image>\\nWhat is it?",
        ),
        conversation(
            "absolute",
            Some(secret.to_str().unwrap()),
            "<image>\\nWhat is it?",
        ),
        conversation(
            "symlinked",
            Some("linked/secret.png"),
            "<image>\\nWhat is it?",
        ),
        conversation("device", Some("/dev/zero"), "<image>\\nWhat is it?"),
        conversation("device-link", Some("img/zero.png"), "<image>\\nWhat is it?"),
        conversation("fifo", Some("img/fifo.png"), "<image>\\nWhat is it?"),
    ];
    std::fs::write(root.join("vqa.jsonl"), lines.join("\n") + "\n").unwrap();
    std::fs::write(
        root.join("docs.jsonl"),
        r#"{"id": "doc", "text_list": ["A page.", "A picture."], "image_info": [{"image_name": "../outside/secret.png", "matched_text_index": 1}]}"#.to_string() + "\n",
    )
    .unwrap();
    // A tar whose second member's header claims 2^62 bytes (written by hand:
    // the builder would end the archive before it).
    let member = |name: &str, size: u64| {
        let mut header = tar::Header::new_gnu();
        header.set_path(name).unwrap();
        header.set_size(size);
        header.set_mode(0o644);
        header.set_cksum();
        header.as_bytes().to_vec()
    };
    let mut bytes = member("000.txt", 13);
    bytes.extend_from_slice(b"A red square.");
    bytes.resize(1024, 0);
    bytes.extend(member("001.png", 1 << 62));
    bytes.extend_from_slice(&[0u8; 1024]);
    std::fs::write(root.join("pairs.tar"), bytes).unwrap();
}

#[test]
fn media_outside_the_root_special_files_and_huge_tar_members_are_quarantined() {
    let corpus = tiny_corpus();
    let dir = tempfile::tempdir().unwrap();
    hostile_inputs(dir.path());
    let root = dir.path().join("root");
    std::fs::copy(
        corpus.join("raw/tokenizer.json"),
        root.join("tokenizer.json"),
    )
    .unwrap();
    let build = |out: &str, extra: &[&str]| {
        let sources = ["llava:vqa.jsonl", "interleaved:docs.jsonl", "wds:pairs.tar"];
        let args = small_build_args(out, sources, extra);
        let started = std::time::Instant::now();
        let out = lvpipe_within(&root, &args, 120);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (stdout, started.elapsed())
    };
    let (stdout, took) = build("shards", &[]);
    // Where to look is printed with the counts.
    assert!(
        stdout.contains("SELECT origin, reason, detail FROM quarantine"),
        "{stdout}"
    );
    assert!(took.as_secs() < 60, "{took:?}");
    let reasons = |shards: &str| -> Vec<(String, String)> {
        let mut rows: Vec<(String, String)> = sql_json(
            &root,
            shards,
            "SELECT annotation_id AS id, reason FROM quarantine WHERE annotation_id IS NOT NULL",
        )
        .into_iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_string(),
                r["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
        rows.sort();
        rows
    };
    let expect = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        let mut v: Vec<_> = pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        reasons("shards"),
        expect(&[
            ("absolute", "unsafe_path"),
            ("device", "unsafe_path"),
            ("device-link", "unsafe_path"),
            ("doc", "unsafe_path"),
            ("dotdot", "unsafe_path"),
            ("fifo", "unsupported_media"),
            ("symlinked", "unsafe_path"),
        ])
    );
    let samples = sql_json(
        &root,
        "shards",
        "SELECT annotation_id AS id FROM samples WHERE source = 'vqa'",
    );
    assert_eq!(samples.len(), 1, "{samples:?}");
    let tar = sql_json(
        &root,
        "shards",
        "SELECT origin, reason FROM quarantine WHERE source = 'pairs'",
    );
    assert!(
        tar.iter()
            .any(|r| r["origin"].as_str().unwrap().ends_with("!001.png")
                && r["reason"] == "media_too_large"),
        "{tar:?}"
    );
    // Opting in reads media outside the root, but still no device or FIFO.
    build(
        "allowed",
        &["--allow-media-outside-root", "--keep-duplicates"],
    );
    assert_eq!(
        reasons("allowed"),
        expect(&[
            ("device", "unsupported_media"),
            ("device-link", "unsupported_media"),
            ("fifo", "unsupported_media"),
        ])
    );
}

#[test]
fn a_second_writer_of_an_output_folder_is_refused() {
    let corpus = tiny_corpus();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("shards");
    // Another process (this test) is writing the folder.
    let held = lvpipe_schemas::FolderLock::acquire(&out, "build-shards").unwrap();
    let busy = lvpipe(corpus, &build_args(out.to_str().unwrap(), &[]));
    assert_eq!(busy.status.code(), Some(2));
    let err = String::from_utf8_lossy(&busy.stderr);
    assert!(
        err.contains("being written by another lvpipe process"),
        "{err}"
    );
    assert!(!out.join("manifest.json").exists());
    drop(held);
    lvpipe_ok(corpus, &build_args(out.to_str().unwrap(), &[]));
    assert!(out.join("manifest.json").exists());
}

#[test]
fn changed_shards_are_refused_by_size_always_and_by_checksum_on_request_and_in_mix() {
    let corpus = tiny_corpus();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("shards");
    let out_s = out.to_str().unwrap();
    lvpipe_ok(corpus, &build_args(out_s, &[]));
    let part = out.join("samples-00000.parquet");
    let mut bytes = std::fs::read(&part).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&part, &bytes).unwrap();
    let query = "SELECT count(*) AS n FROM samples";
    let verified = lvpipe(corpus, &["sql", "--shards", out_s, "--verify", query]);
    assert_eq!(verified.status.code(), Some(2));
    let err = String::from_utf8_lossy(&verified.stderr);
    assert!(
        err.contains("samples-00000.parquet") && err.contains("blake3"),
        "{err}"
    );
    let recipe = dir.path().join("r.toml");
    std::fs::write(
        &recipe,
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/tiny.toml")).unwrap(),
    )
    .unwrap();
    let mixes = dir.path().join("mixes");
    let mixed = lvpipe(
        corpus,
        &[
            "mix",
            "--recipe",
            recipe.to_str().unwrap(),
            "--stage",
            "1",
            "--shards",
            out_s,
            "--out",
            mixes.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&mixed.stderr);
    assert_eq!(mixed.status.code(), Some(2), "{err}");
    assert!(err.contains("samples-00000.parquet"), "{err}");
    assert!(!mixes.join("stage-1/mix.json").exists());
    // A shard cut short is refused by its size, without --verify.
    std::fs::write(&part, &bytes[..middle]).unwrap();
    let cut = lvpipe(corpus, &["sql", "--shards", out_s, query]);
    assert_eq!(cut.status.code(), Some(2));
    let err = String::from_utf8_lossy(&cut.stderr);
    assert!(err.contains("the manifest says"), "{err}");
}

#[test]
fn verify_finds_a_flipped_byte_a_truncated_file_and_a_missing_one() {
    let corpus = tiny_corpus();
    let dir = tempfile::tempdir().unwrap();
    let shards = dir.path().join("shards");
    let s = shards.to_str().unwrap();
    lvpipe_ok(corpus, &build_args(s, &["--shard-size", "200KiB"]));
    let verify = |json: bool| {
        let mut args = vec!["verify", "--shards", s];
        if json {
            args.push("--json");
        }
        lvpipe(corpus, &args)
    };
    let clean = verify(true);
    assert!(
        clean.status.success(),
        "{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&clean.stdout).unwrap();
    let files = report["files"].as_u64().unwrap();
    assert!(files >= 3, "{report}");
    assert_eq!(report["problems"].as_array().unwrap().len(), 0);

    let mut parts: Vec<_> = std::fs::read_dir(&shards)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    parts.sort();
    // One byte in the middle of the first, the last 10 bytes of the second,
    // the third removed.
    let mut bytes = std::fs::read(&parts[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&parts[0], bytes).unwrap();
    let len = std::fs::metadata(&parts[1]).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&parts[1])
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    std::fs::remove_file(&parts[2]).unwrap();
    let bad = verify(false);
    assert_eq!(bad.status.code(), Some(1));
    let text = String::from_utf8_lossy(&bad.stdout);
    let name = |i: usize| parts[i].file_name().unwrap().to_str().unwrap().to_string();
    let line = |i: usize| {
        text.lines()
            .find(|l| l.contains(&name(i)))
            .unwrap_or("")
            .to_string()
    };
    assert!(line(0).contains("blake3"), "{text}");
    assert!(
        line(1).contains(&format!("{} bytes, the manifest says {len}", len - 10)),
        "{text}"
    );
    assert!(line(2).ends_with("missing"), "{text}");
    assert_eq!(text.lines().count(), 3, "{text}");
}

/// `build-shards --partition I/4` four times, then `--finalize`: the same
/// samples (every column, media bytes included) and the same quarantine
/// rows (duplicates included) as one build, over the bad-input corpus; a
/// missing part or parts of another count refused.
#[test]
fn four_partitions_finalized_equal_one_build() {
    let corpus = tiny_corpus();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    bad_inputs(root);
    // Duplicates of a good record (the same text and image bytes, the
    // image under another name too): whichever task gets one gets them all.
    std::fs::copy(root.join("img/good1.png"), root.join("img/again.png")).unwrap();
    let mut vqa = std::fs::read(root.join("vqa.jsonl")).unwrap();
    for (id, image) in [("dup-a", "img/good1.png"), ("dup-b", "img/again.png")] {
        vqa.extend(conversation(id, Some(image), "<image>\\nWhat is it?").bytes());
        vqa.push(b'\n');
    }
    std::fs::write(root.join("vqa.jsonl"), vqa).unwrap();
    std::fs::copy(
        corpus.join("raw/tokenizer.json"),
        root.join("tokenizer.json"),
    )
    .unwrap();
    let build = |out: &str, extra: &[&str]| {
        let sources = ["llava:vqa.jsonl", "text:docs.jsonl", "wds:pairs.tar"];
        lvpipe_ok(root, &small_build_args(out, sources, extra));
    };
    build("single", &[]);
    let finalize = || lvpipe(root, &["build-shards", "--finalize", "--out", "parts"]);
    for i in 0..4 {
        build("parts", &["--partition", &format!("{i}/4")]);
        if i == 2 {
            let out = finalize();
            assert_eq!(out.status.code(), Some(2));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("parts 3/4 missing"), "{err}");
        }
    }
    let done = finalize();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    lvpipe_ok(root, &["verify", "--shards", "parts"]);
    for query in [
        "SELECT * FROM samples ORDER BY sample_id",
        "SELECT * FROM quarantine ORDER BY origin, reason",
        "SELECT reason, count(*) FROM quarantine GROUP BY 1 ORDER BY 1",
    ] {
        let (a, b) = (
            sql_json(root, "single", query),
            sql_json(root, "parts", query),
        );
        assert!(!a.is_empty(), "{query}");
        assert_eq!(a, b, "{query}");
    }
    let duplicates = sql_json(
        root,
        "parts",
        "SELECT count(*) AS n FROM quarantine WHERE reason = 'duplicate'",
    );
    assert!(duplicates[0]["n"].as_u64().unwrap() > 0, "{duplicates:?}");
    // Every part holds some of the records.
    for i in 0..4 {
        let part = format!("parts/part-{i:05}-of-00004");
        let rows = sql_json(
            root,
            &part,
            "SELECT (SELECT count(*) FROM samples) + (SELECT count(*) FROM quarantine) AS n",
        );
        assert!(rows[0]["n"].as_u64().unwrap() > 0, "part {i}: {rows:?}");
    }
    // A part of another partitioning beside them is refused.
    std::fs::create_dir(root.join("parts/part-00001-of-00003")).unwrap();
    let out = finalize();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("parts of a build in 3 and of one in 4"),
        "{err}"
    );
}

/// A partition task reads every tar sample's caption (its share is decided
/// by content) but seeks past the images of the samples it does not own;
/// the parts together still hold every sample once.
#[test]
fn a_partition_reads_only_its_own_tar_images() {
    let corpus = tiny_corpus();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::copy(
        corpus.join("raw/tokenizer.json"),
        root.join("tokenizer.json"),
    )
    .unwrap();
    // Noise does not compress: each image is about 270 KB, far more than
    // the reader's buffer, so skipping one saves its bytes.
    let tar = noise_tar(16, 300, image::ImageFormat::Png);
    std::fs::write(root.join("noise.tar"), &tar).unwrap();
    let build = |out: &str, extra: &[&str]| -> serde_json::Value {
        let mut args = build_sources(out, "tokenizer.json", "32", &["wds:noise.tar"], extra);
        args.push("--json");
        serde_json::from_str(&lvpipe_ok(root, &args)).unwrap()
    };
    let single = build("single", &[]);
    assert_eq!(single["samples"], 16, "{single}");
    let whole = tar.len() as u64;
    assert!(
        single["input_bytes_read"].as_u64().unwrap() >= whole,
        "{single}"
    );
    let mut samples = 0;
    for i in 0..4 {
        let part = build("parts", &["--partition", &format!("{i}/4")]);
        let read = part["input_bytes_read"].as_u64().unwrap();
        let owned = part["samples"].as_u64().unwrap();
        // Its own images, the captions and the headers around them.
        assert!(
            read < whole * (owned + 2) / 16,
            "part {i}: {read} of {whole}: {part}"
        );
        samples += owned;
    }
    assert_eq!(samples, 16);
    lvpipe_ok(root, &["build-shards", "--finalize", "--out", "parts"]);
    let query = "SELECT * FROM samples ORDER BY sample_id";
    assert_eq!(
        sql_json(root, "single", query),
        sql_json(root, "parts", query)
    );
}

/// The long videos' QA in LLaVA's video format: the needle question and one
/// other about the flash, each answered by that moment of the video alone,
/// as answers.json records it.
#[test]
fn long_videos_ask_about_their_flash() {
    let raw = tiny_corpus().join("raw");
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(raw.join(name)).unwrap()).unwrap()
    };
    let (records, answers) = (read("longvideo.json"), read("answers.json"));
    let needles = answers["video_needles"].as_array().unwrap();
    let records = records.as_array().unwrap();
    assert_eq!(records.len(), needles.len());
    for (record, needle) in records.iter().zip(needles) {
        assert_eq!(record["id"], needle["id"]);
        assert!(std::fs::metadata(raw.join(record["video"].as_str().unwrap())).is_ok());
        let (colour, shape) = (
            needle["colour"].as_str().unwrap(),
            needle["shape"].as_str().unwrap(),
        );
        let depth = needle["depth"].as_f64().unwrap();
        let seconds = needle["duration_ms"].as_i64().unwrap() / 1000;
        assert!((4..=64).contains(&seconds), "{needle}");
        let turns = record["conversations"].as_array().unwrap();
        assert_eq!(turns.len(), 4, "{record}");
        assert!(turns[0]["value"].as_str().unwrap().starts_with("<video>\n"));
        let mut asked = Vec::new();
        for pair in turns.chunks(2) {
            assert_eq!(
                (&pair[0]["from"], &pair[1]["from"]),
                (&"human".into(), &"gpt".into())
            );
            let question = pair[0]["value"]
                .as_str()
                .unwrap()
                .trim_start_matches("<video>\n");
            let answer = pair[1]["value"].as_str().unwrap();
            let expected = match question {
                "What colored shape appears briefly in the video?" => format!("a {colour} {shape}"),
                "What color is the shape that appears briefly?" => colour.to_string(),
                "What shape appears briefly in the video?" => shape.to_string(),
                q if q.starts_with("When does the shape appear") => match depth {
                    d if d < 1.0 / 3.0 => "near the beginning".into(),
                    d if d < 2.0 / 3.0 => "in the middle".into(),
                    _ => "near the end".into(),
                },
                q => panic!("unexpected question {q}"),
            };
            assert_eq!(answer.to_lowercase(), format!("{expected}."), "{record}");
            asked.push(question.to_string());
        }
        assert!(asked.contains(&needle["question"].as_str().unwrap().to_string()));
        assert_ne!(asked[0], asked[1]);
        // V-NIAH asks for the flash's colour: one of six answers.
        assert_eq!(needle["answer"], needle["colour"], "{needle}");
        assert_eq!(
            needle["question"],
            "What color is the shape that appears briefly?"
        );
    }
}
