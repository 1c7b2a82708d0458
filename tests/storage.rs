//! Shards and mixes on object storage, against a real S3-compatible server
//! (moto's, started on 127.0.0.1 for each test): what `s3://` gives must be
//! what the local filesystem gives, byte for byte.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::s3::{S3, Server};
use common::{SYNTH_SOURCES, build_args, tiny_corpus};

/// A copy of the tiny corpus in a fresh folder.
fn corpus() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("cp")
        .arg("-r")
        .arg(tiny_corpus().join("raw"))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    dir
}

/// Asserts that `out` failed as a refused input does (exit 2) with a
/// message naming each of `needles`; returns the message.
fn refused(out: &Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    for needle in needles {
        assert!(err.contains(needle), "no `{needle}` in: {err}");
    }
    err
}

/// A copy of the tiny corpus, an S3 server, and a machine using it (its
/// cache in the corpus folder).
fn machine() -> (tempfile::TempDir, Server, S3) {
    let dir = corpus();
    let server = Server::start();
    let s3 = server.client(&dir.path().join("cache"));
    (dir, server, s3)
}

fn recipe() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/tiny.toml").to_string()
}

#[test]
fn shards_sql_mixes_and_streams_on_s3_equal_the_local_ones() {
    let (dir, _server, s3) = machine();
    let d = dir.path();
    s3.lvpipe_ok(d, &build_args("local", &[]));
    s3.lvpipe_ok(d, &build_args("s3://bkt/shards", &[]));
    // The objects are the local files, byte for byte.
    let local_manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("local/manifest.json")).unwrap()).unwrap();
    for shard in local_manifest["shards"].as_array().unwrap() {
        let file = shard["file"].as_str().unwrap();
        assert_eq!(
            s3.get(&format!("shards/{file}")).as_deref(),
            Some(&std::fs::read(d.join("local").join(file)).unwrap()[..]),
            "{file}"
        );
    }
    assert!(s3.get("shards/tokenizer.json").is_some());

    let query = "SELECT source, count(*) AS n, sum(media_bytes) AS m, sum(num_text_tokens) AS t FROM samples GROUP BY source ORDER BY source";
    let sql =
        |shards: &str| s3.lvpipe_ok(d, &["sql", "--shards", shards, "--format", "csv", query]);
    assert_eq!(sql("s3://bkt/shards"), sql("local"));
    assert!(sql("s3://bkt/shards").lines().count() > SYNTH_SOURCES.len() / 2);
    s3.lvpipe_ok(d, &["verify", "--shards", "s3://bkt/shards"]);

    // A mix from s3 to s3 is the local mix, and streams the same batches
    // from the cache it is fetched into.
    let r = recipe();
    let mix = |shards: &str, out: &str| {
        s3.lvpipe_ok(
            d,
            &[
                "mix", "--recipe", &r, "--stage", "3", "--shards", shards, "--out", out,
            ],
        )
    };
    mix("s3://bkt/shards", "s3://bkt/mixes");
    mix("local", "mixes");
    for file in [
        "samples.arrow",
        "packs.arrow",
        "mix_report.arrow",
        "mix.json",
    ] {
        assert_eq!(
            s3.get(&format!("mixes/stage-3/{file}")).as_deref(),
            Some(&std::fs::read(d.join("mixes/stage-3").join(file)).unwrap()[..]),
            "{file}"
        );
    }
    let stream = |mix: &str| {
        s3.lvpipe_ok(
            d,
            &[
                "stream", "--mix", mix, "--steps", "3", "--json", "--cache", "fetched",
            ],
        )
    };
    let local = stream("mixes/stage-3");
    assert_eq!(stream("s3://bkt/mixes/stage-3"), local);
    // A damaged copy in the cache is fetched again, not read.
    let cached: Vec<PathBuf> = std::fs::read_dir(d.join("fetched/mixes"))
        .unwrap()
        .map(|e| e.unwrap().path().join("samples.arrow"))
        .collect();
    assert_eq!(cached.len(), 1);
    let mut bytes = std::fs::read(&cached[0]).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&cached[0], &bytes).unwrap();
    std::fs::remove_file(cached[0].with_file_name("mix.json")).unwrap();
    assert_eq!(stream("s3://bkt/mixes/stage-3"), local);
    assert_eq!(
        std::fs::read(&cached[0]).unwrap(),
        std::fs::read(d.join("mixes/stage-3/samples.arrow")).unwrap()
    );

    // A flipped byte on the server: verify names the file, mix refuses.
    let file = local_manifest["shards"][0]["file"].as_str().unwrap();
    let mut bytes = s3.get(&format!("shards/{file}")).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    s3.put(&format!("shards/{file}"), &bytes);
    let out = s3.lvpipe(d, &["verify", "--shards", "s3://bkt/shards"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains(file));
    let out = s3.lvpipe(
        d,
        &[
            "mix",
            "--recipe",
            &r,
            "--stage",
            "3",
            "--shards",
            "s3://bkt/shards",
            "--out",
            "m2",
        ],
    );
    refused(&out, &[file]);
}

#[test]
fn a_folder_without_its_manifest_is_not_read_and_a_rerun_publishes_it() {
    let (dir, _server, s3) = machine();
    let d = dir.path();
    let sources = ["--source", "llava:raw/pretrain.json"];
    let args = common::build_sources("s3://bkt/s", "raw/tokenizer.json", "64", &[], &sources);
    s3.lvpipe_ok(d, &args);
    // As if the build had stopped after its shards went up.
    s3.delete("s/manifest.json");
    let out = s3.lvpipe(
        d,
        &[
            "sql",
            "--shards",
            "s3://bkt/s",
            "SELECT count(*) FROM samples",
        ],
    );
    refused(&out, &["s3://bkt/s", "manifest.json"]);
    s3.lvpipe_ok(d, &args);
    let count = s3.lvpipe_ok(
        d,
        &[
            "sql",
            "--shards",
            "s3://bkt/s",
            "--format",
            "csv",
            "SELECT count(*) AS n FROM samples",
        ],
    );
    assert_eq!(count.lines().nth(1), Some("48"), "{count}");
}

#[test]
fn partitions_built_apart_and_finalized_on_s3_equal_one_build() {
    let (dir, server, s3) = machine();
    let d = dir.path();
    s3.lvpipe_ok(d, &build_args("local", &[]));
    // Each task on a machine (a cache) of its own.
    for i in 0..2 {
        let part = format!("{i}/2");
        let task = server.client(&d.join(format!("task-{i}")));
        task.lvpipe_ok(d, &build_args("s3://bkt/parts", &["--partition", &part]));
    }
    // One part only: finalize names the missing one.
    let lone = server.client(&d.join("task-lone"));
    lone.lvpipe_ok(d, &build_args("s3://bkt/lone", &["--partition", "1/2"]));
    let out = lone.lvpipe(d, &["build-shards", "--finalize", "--out", "s3://bkt/lone"]);
    refused(&out, &["0/2"]);

    s3.lvpipe_ok(
        d,
        &["build-shards", "--finalize", "--out", "s3://bkt/parts"],
    );
    let query =
        "SELECT sample_id, source, media_bytes, num_text_tokens FROM samples ORDER BY sample_id";
    let sql =
        |shards: &str| s3.lvpipe_ok(d, &["sql", "--shards", shards, "--format", "csv", query]);
    assert_eq!(sql("s3://bkt/parts"), sql("local"));
    s3.lvpipe_ok(d, &["verify", "--shards", "s3://bkt/parts"]);
}

#[test]
fn a_missing_bucket_a_refused_request_and_an_unreachable_server_are_clear_errors() {
    let (dir, _server, s3) = machine();
    let d = dir.path();
    let out = s3.lvpipe(d, &["sql", "--shards", "s3://nobucket/shards", "SELECT 1"]);
    refused(&out, &["s3://nobucket/shards"]);
    let out = s3.lvpipe(d, &["stream", "--mix", "s3://nobucket/mixes/stage-1"]);
    refused(&out, &["s3://nobucket/mixes/stage-1"]);
    // A server that refuses the request (403: unsigned here, as it would
    // refuse bad credentials): no retries, the URL and the reason.
    s3.lvpipe_ok(d, &build_args("s3://bkt/shards", &[]));
    let out = s3
        .command(d, &["sql", "--shards", "s3://bkt/shards", "SELECT 1"])
        .env("AWS_SKIP_SIGNATURE", "true")
        .output()
        .unwrap();
    refused(&out, &["s3://bkt/shards/manifest.json", "403"]);
    // Nothing listens on the port: the retries end and the error names the URL.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let out = s3
        .command(d, &["verify", "--shards", "s3://bkt/shards"])
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .output()
        .unwrap();
    refused(&out, &["s3://bkt/shards/manifest.json", "retries"]);
}

#[test]
fn a_bounded_cache_keeps_the_most_recent_mixes() {
    let (dir, _server, s3) = machine();
    let d = dir.path();
    s3.lvpipe_ok(d, &build_args("shards", &[]));
    let r = recipe();
    for stage in ["2", "3"] {
        for out in ["mixes", "s3://bkt/mixes"] {
            s3.lvpipe_ok(
                d,
                &[
                    "mix", "--recipe", &r, "--stage", stage, "--shards", "shards", "--out", out,
                ],
            );
        }
    }
    let size = |stage: &str| -> u64 {
        std::fs::read_dir(d.join(format!("mixes/stage-{stage}")))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    // Room for either mix, not for both.
    let limit = (size("2").max(size("3")) + 1024).to_string();
    let stream = |stage: &str, limit: &str| {
        s3.lvpipe(
            d,
            &[
                "stream",
                "--mix",
                &format!("s3://bkt/mixes/stage-{stage}"),
                "--steps",
                "2",
                "--json",
                "--cache",
                "c",
                "--cache-size",
                limit,
            ],
        )
    };
    let cached = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(d.join("c/mixes"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert!(stream("2", &limit).status.success());
    assert_eq!(cached().len(), 1);
    assert!(cached()[0].starts_with("stage-2-"), "{:?}", cached());
    let out = stream("3", &limit);
    assert!(out.status.success());
    assert!(
        cached().len() == 1 && cached()[0].starts_with("stage-3-"),
        "{:?}",
        cached()
    );
    let local = s3.lvpipe_ok(
        d,
        &["stream", "--mix", "mixes/stage-3", "--steps", "2", "--json"],
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), local);
    // A mix larger than the whole cache: a clear error, nothing removed.
    let out = stream("2", "1000");
    refused(&out, &["--cache-size"]);
    let stage_3 = cached()
        .into_iter()
        .find(|n| n.starts_with("stage-3-"))
        .unwrap();
    assert!(d.join("c/mixes").join(stage_3).join("mix.json").exists());
}

/// A build killed (SIGKILL) while a shard file is going up in parts leaves
/// nothing a reader takes for shards: an object exists only once its upload
/// completes, and the manifest goes up last. The rerun publishes the
/// folder whole.
#[test]
fn a_build_killed_during_an_upload_leaves_nothing_a_reader_sees() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::copy(
        tiny_corpus().join("raw/tokenizer.json"),
        d.join("tokenizer.json"),
    )
    .unwrap();
    // 64 noise images re-encoded at 512 px make one shard of more than the
    // 10 MB at which an upload goes in parts.
    let tar = common::noise_tar(64, 512, image::ImageFormat::Bmp);
    std::fs::write(d.join("noise.tar"), tar).unwrap();
    let server = Server::start();
    let s3 = server.client(&d.join("cache"));
    let args = common::build_sources(
        "s3://bkt/big",
        "tokenizer.json",
        "512",
        &["wds:noise.tar"],
        &[],
    );
    let mut build = s3
        .command(d, &args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let uploading = loop {
        let (_, body) = s3.request("GET", "/bkt?uploads", &[]);
        let body = String::from_utf8_lossy(&body).into_owned();
        if body.contains("<UploadId>") {
            break body;
        }
        assert!(
            build.try_wait().unwrap().is_none(),
            "the build ended before any upload in parts was seen"
        );
        assert!(started.elapsed().as_secs() < 300, "no upload in parts");
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    build.kill().unwrap();
    build.wait().unwrap();
    let key = uploading
        .split("<Key>")
        .nth(1)
        .and_then(|k| k.split("</Key>").next())
        .expect("the upload's key")
        .to_string();
    assert!(
        key.starts_with("big/") && key.ends_with(".parquet"),
        "{key}"
    );
    assert!(s3.get(&key).is_none(), "{key} is visible half-uploaded");
    assert!(s3.get("big/manifest.json").is_none());
    let sql = |extra: &[&str]| {
        let mut a = vec!["sql", "--shards", "s3://bkt/big", "--format", "csv"];
        a.extend(extra);
        a.push("SELECT count(*) AS n FROM samples");
        s3.lvpipe(d, &a)
    };
    refused(&sql(&[]), &["manifest.json"]);

    s3.lvpipe_ok(d, &args);
    let counted = sql(&[]);
    assert!(counted.status.success());
    assert_eq!(String::from_utf8_lossy(&counted.stdout), "n\n64\n");
    s3.lvpipe_ok(d, &["verify", "--shards", "s3://bkt/big"]);
}

/// Against a server that checks signatures: the right key reads and writes;
/// an unknown key and a wrong secret are refused without retries (exit 2),
/// naming the URL, the server's reason and the variables to check.
#[test]
fn bad_credentials_are_refused_with_the_reason_and_what_to_check() {
    let dir = corpus();
    let d = dir.path();
    let (server, good) = Server::start_with_credentials();
    let s3 = server.client(&d.join("cache"));
    let with = |key: &str, secret: &str, args: &[&str]| {
        s3.command(d, args)
            .env("AWS_ACCESS_KEY_ID", key)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .output()
            .unwrap()
    };
    let sources = ["--source", "llava:raw/pretrain.json"];
    let build = common::build_sources("s3://bkt/s", "raw/tokenizer.json", "64", &[], &sources);
    let count = [
        "sql",
        "--shards",
        "s3://bkt/s",
        "--format",
        "csv",
        "SELECT count(*) AS n FROM samples",
    ];
    let out = with(&good.key, &good.secret, &build);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = with(&good.key, &good.secret, &count);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "n\n48\n");
    for (key, secret, reason, url) in [
        (
            "AKIAUNKNOWN0000000",
            good.secret.as_str(),
            "InvalidAccessKeyId",
            "s3://bkt/s/manifest.json",
        ),
        (
            good.key.as_str(),
            "not-the-secret",
            "SignatureDoesNotMatch",
            "s3://bkt/s/manifest.json",
        ),
    ] {
        let out = with(key, secret, &count);
        let err = refused(&out, &[url, reason, "AWS_SECRET_ACCESS_KEY"]);
        assert!(!err.contains("<?xml") && !err.contains("retries"), "{err}");
    }
    // A write with a wrong secret: refused the same way, nothing published.
    let other = common::build_sources("s3://bkt/t", "raw/tokenizer.json", "64", &[], &sources);
    let out = with(&good.key, "not-the-secret", &other);
    refused(&out, &["s3://bkt/t", "SignatureDoesNotMatch"]);
}
