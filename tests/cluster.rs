//! SQL and mixing on a real Apache DataFusion Ballista cluster: a scheduler
//! and an executor started by `lvpipe cluster` on 127.0.0.1 (built with
//! `--features cluster`) give what the local engine gives.
#![cfg(feature = "cluster")]

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::s3::Server;
use common::{build_args, lvpipe_ok, mix_ok, tiny_corpus, wait_for_port};

/// A scheduler and one executor, stopped when dropped.
struct Cluster {
    nodes: Vec<Child>,
    url: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    /// Nodes with `env` (the executors read object storage with it).
    fn start(env: &[(String, String)]) -> Cluster {
        let (scheduler, flight, grpc) = (free_port(), free_port(), free_port());
        let node = |args: &[String]| {
            Command::new(env!("CARGO_BIN_EXE_lvpipe"))
                .arg("cluster")
                .args(args)
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("lvpipe cluster runs")
        };
        let mut nodes = vec![node(&[
            "scheduler".into(),
            "--bind".into(),
            format!("127.0.0.1:{scheduler}"),
        ])];
        wait_for_port(scheduler, "the scheduler");
        nodes.push(node(&[
            "executor".into(),
            "--scheduler".into(),
            format!("127.0.0.1:{scheduler}"),
            "--flight-port".into(),
            flight.to_string(),
            "--grpc-port".into(),
            grpc.to_string(),
            "--tasks".into(),
            "2".into(),
        ]));
        wait_for_port(flight, "the executor");
        wait_for_port(grpc, "the executor");
        Cluster {
            nodes,
            url: format!("df://127.0.0.1:{scheduler}"),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
    }
}

fn recipe() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/tiny.toml").to_string()
}

/// Every stage of the tiny curriculum mixed with its queries run on the
/// cluster is the mix the local engine makes, byte for byte, and an audit
/// query returns the same rows.
#[test]
fn the_curriculum_mixed_on_a_cluster_equals_the_local_mixes() {
    let corpus = tiny_corpus();
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_str().unwrap().to_string();
    lvpipe_ok(corpus, &build_args(&d("shards"), &[]));
    let cluster = Cluster::start(&[]);
    let r = recipe();
    for stage in ["1", "2", "3", "4", "5"] {
        mix_ok(corpus, &r, stage, &d("shards"), &d("local"));
        lvpipe_ok(
            corpus,
            &[
                "mix",
                "--recipe",
                &r,
                "--stage",
                stage,
                "--shards",
                &d("shards"),
                "--out",
                &d("cluster"),
                "--cluster",
                &cluster.url,
            ],
        );
        for file in [
            "samples.arrow",
            "packs.arrow",
            "mix_report.arrow",
            "mix.json",
        ] {
            let read =
                |root: &str| std::fs::read(Path::new(root).join(format!("stage-{stage}/{file}")));
            assert_eq!(
                read(&d("local")).unwrap(),
                read(&d("cluster")).unwrap(),
                "stage {stage}: {file}"
            );
        }
    }
    let query = "SELECT source, kind, count(*) AS n, sum(num_text_tokens) AS t, \
                 sum(array_length(input_ids)) AS ids FROM samples \
                 WHERE messages[1]['role'] = 'user' GROUP BY 1, 2 ORDER BY 1, 2";
    let shards = d("shards");
    let sql = |extra: &[&str]| {
        let mut args = vec!["sql", "--shards", &shards, "--format", "csv", query];
        args.extend(extra);
        lvpipe_ok(corpus, &args)
    };
    let local = sql(&[]);
    assert!(local.lines().count() > 3, "{local}");
    assert_eq!(sql(&["--cluster", &cluster.url]), local);
    // The queries did run on the cluster: its plan has Ballista's stages.
    let explain = |extra: &[&str]| {
        let query = "EXPLAIN SELECT source, count(*) FROM samples GROUP BY 1";
        let mut args = vec!["sql", "--shards", &shards, "--format", "csv", query];
        args.extend(extra);
        lvpipe_ok(corpus, &args)
    };
    assert!(explain(&["--cluster", &cluster.url]).contains("distributed_plan"));
    assert!(!explain(&[]).contains("distributed_plan"));
}

/// Shards on object storage: the executors read them with their own
/// environment's settings.
#[test]
fn a_cluster_queries_shards_on_s3() {
    let corpus = tiny_corpus();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server = Server::start();
    let s3 = server.client(&d.join("cache"));
    let sources = [
        "--source",
        "llava:raw/sft.json",
        "--source",
        "text:raw/notes.jsonl",
    ];
    let local = d.join("shards").to_str().unwrap().to_string();
    let args = common::build_sources(&local, "raw/tokenizer.json", "64", &[], &sources);
    s3.lvpipe_ok(corpus, &args);
    let args = common::build_sources("s3://bkt/shards", "raw/tokenizer.json", "64", &[], &sources);
    s3.lvpipe_ok(corpus, &args);
    let env: Vec<(String, String)> = s3
        .command(corpus, &[])
        .get_envs()
        .filter_map(|(k, v)| Some((k.to_str()?.to_string(), v?.to_str()?.to_string())))
        .collect();
    let cluster = Cluster::start(&env);
    let query =
        "SELECT source, count(*) AS n, sum(media_bytes) AS m FROM samples GROUP BY 1 ORDER BY 1";
    let on_cluster = |query: &str| {
        let shards = [
            "sql",
            "--shards",
            "s3://bkt/shards",
            "--cluster",
            &cluster.url,
        ];
        s3.lvpipe_ok(corpus, &[&shards[..], &["--format", "csv", query]].concat())
    };
    let here = s3.lvpipe_ok(
        corpus,
        &["sql", "--shards", &local, "--format", "csv", query],
    );
    assert_eq!(on_cluster(query), here);
    let plan = on_cluster(&format!("EXPLAIN {query}"));
    assert!(plan.contains("distributed_plan"), "{plan}");
    assert_eq!(here.lines().count(), 3, "{here}");
}
