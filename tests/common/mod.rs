//! Helpers shared by the CLI tests: run the binary, build fixtures in a temp dir.

#![allow(dead_code)]

pub mod s3;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use arrow::array::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// Waits until something listens on `port` of 127.0.0.1 (a minute at most).
pub fn wait_for_port(port: u16, what: &str) {
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "{what} does not listen on port {port}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Runs `lvpipe ARGS` in `cwd`.
pub fn lvpipe(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lvpipe"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("lvpipe runs")
}

/// `mpirun` as the tests run it: as root too, more ranks than cores, on
/// this machine without ssh, one thread per rank; the caller adds `-n N`,
/// the program and its arguments.
pub fn mpirun() -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "--bind-to", "none"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_plm", "isolated")
        // Containers often forbid the cross-process reads of OpenMPI's
        // shared-memory transport: copy through the buffer instead.
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("RAYON_NUM_THREADS", "1");
    c
}

/// Runs `lvpipe ARGS` and fails the test, with its stderr, unless it succeeds.
pub fn lvpipe_ok(cwd: &Path, args: &[&str]) -> String {
    let out = lvpipe(cwd, args);
    assert!(
        out.status.success(),
        "lvpipe {args:?} failed ({:?}):\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// A tiny synthetic corpus, made once per test binary and copied per test.
pub fn tiny_corpus() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir").keep();
        lvpipe_ok(
            &dir,
            &["synth", "--out", "raw", "--scale", "tiny", "--seed", "7"],
        );
        dir
    })
}

/// The synth sources as `--source` flags, relative to the corpus folder.
pub const SYNTH_SOURCES: [&str; 8] = [
    "llava:raw/pretrain.json",
    "llava:raw/sft.json",
    "text:raw/longdocs.jsonl",
    "text:raw/notes.jsonl",
    "interleaved:raw/interleaved.jsonl",
    "wds:raw/pairs-000.tar",
    "llava:raw/video_sft.json",
    "llava:raw/longvideo.json",
];

/// `build-shards` of the synthetic corpus's sources into `out`.
pub fn build_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    build_sources(out, "raw/tokenizer.json", "64", &SYNTH_SOURCES, extra)
}

/// `build-shards` of `sources` into `out` with `tokenizer`, images at
/// `image_size` px, and `extra` arguments.
pub fn build_sources<'a>(
    out: &'a str,
    tokenizer: &'a str,
    image_size: &'a str,
    sources: &[&'a str],
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "build-shards",
        "--out",
        out,
        "--tokenizer",
        tokenizer,
        "--image-size",
        image_size,
    ];
    for s in sources {
        args.extend(["--source", *s]);
    }
    args.extend(extra);
    args
}

/// `lvpipe mix` of one stage of `recipe` over `shards` into `out`, which
/// must succeed.
pub fn mix_ok(cwd: &Path, recipe: &str, stage: &str, shards: &str, out: &str) -> String {
    lvpipe_ok(
        cwd,
        &[
            "mix", "--recipe", recipe, "--stage", stage, "--shards", shards, "--out", out,
        ],
    )
}

/// Rows of `sql --format json` as JSON objects.
pub fn sql_json(cwd: &Path, shards: &str, query: &str) -> Vec<serde_json::Value> {
    lvpipe_ok(cwd, &["sql", "--shards", shards, "--format", "json", query])
        .lines()
        .map(|l| serde_json::from_str(l).expect("json row"))
        .collect()
}

/// All record batches of the Parquet files of a folder whose names start with `prefix`.
pub fn read_table(dir: &Path, prefix: &str) -> Vec<RecordBatch> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(prefix) && name.ends_with(".parquet")
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .flat_map(|f| {
            ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(f).unwrap())
                .unwrap()
                .build()
                .unwrap()
                .map(|b| b.unwrap())
        })
        .collect()
}

/// Every file of a folder (recursively) with its bytes, sorted by path.
pub fn folder_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((
                    path.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&path).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

/// Runs `lvpipe ARGS`, fails the test unless it succeeds, returns its stderr.
pub fn lvpipe_ok_stderr(cwd: &Path, args: &[&str]) -> String {
    let out = lvpipe(cwd, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "lvpipe {args:?} failed:\n{err}");
    err
}

/// A WebDataset tar of `count` samples: `NNN.EXT`, an image of random
/// pixels (`side` x `side`, incompressible) in `format`, and `NNN.txt`.
pub fn noise_tar(count: usize, side: u32, format: image::ImageFormat) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut tar = tar::Builder::new(Vec::new());
    let ext = format.extensions_str()[0];
    for i in 0..count {
        let image = image::RgbImage::from_fn(side, side, |_, _| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let [r, g, b, ..] = state.to_le_bytes();
            image::Rgb([r, g, b])
        });
        let mut encoded = Vec::new();
        image
            .write_to(&mut std::io::Cursor::new(&mut encoded), format)
            .unwrap();
        for (name, bytes) in [
            (format!("{i:03}.{ext}"), encoded),
            (
                format!("{i:03}.txt"),
                format!("Noise number {i}.").into_bytes(),
            ),
        ] {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            tar.append_data(&mut header, name, bytes.as_slice())
                .unwrap();
        }
    }
    tar.into_inner().unwrap()
}
