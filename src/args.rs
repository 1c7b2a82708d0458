//! The command line as clap parses it (the low-level arguments); each
//! command resolves them into a library's settings. Nothing here does work.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use lvpipe_schemas::FramePolicy;

/// Build, audit, mix and stream the training data of a long-context
/// vision-language curriculum (LongVILA's five stages).
#[derive(Debug, Parser)]
#[command(name = "lvpipe", version, about, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a synthetic corpus in the real formats, with known answers.
    Synth(SynthArgs),
    /// Turn raw sources into Parquet shards, a quarantine table and a manifest.
    BuildShards(BuildArgs),
    /// Run a read-only SQL query over a shard folder.
    Sql(SqlArgs),
    /// Read every shard file back against the manifest's sizes and blake3
    /// checksums; exit 1 if any differs or is missing.
    Verify(VerifyArgs),
    /// Check a curriculum recipe on its own and against shards; print what each stage will see.
    Plan(PlanArgs),
    /// Select, weigh, order and pack one stage's data into a memory-mappable mix.
    Mix(MixArgs),
    /// Print the batches the loader gives one rank (to inspect a mix).
    Stream(StreamArgs),
    /// Train a curriculum stage (or a chain of them, or resume one) on CPU, writing safetensors checkpoints, metrics, lineage and plots.
    Train(TrainArgs),
    /// Evaluate a trained stage on the synthetic corpus's held-out set (VQA, text and video needles, perplexity).
    Eval(EvalArgs),
    /// Run the whole chain on the synthetic corpus and write a report.
    Demo(DemoArgs),
    /// Answer a prompt (with images or videos) with a model folder: a run's,
    /// or a Hugging Face or VILA folder.
    Generate(GenerateArgs),
    /// Write a run as a folder transformers loads: the LLM alone (`hf`) or
    /// VILA's llm/, vision_tower/, mm_projector/ layout (`vila`).
    Export(ExportArgs),
    /// Peak memory and tokens/s of one training step of a recipe's LLM at
    /// each context (one sample filling it), with and without activation
    /// checkpointing: a table or JSON, and a PNG curve.
    BenchMemory(BenchMemoryArgs),
    /// Start a node of an Apache DataFusion Ballista cluster for `sql
    /// --cluster` and `mix --cluster` (built with `--features cluster`).
    #[cfg(feature = "cluster")]
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Time training steps of the reference decoder (4 layers, d256, 4 x 512
    /// tokens) for the PyTorch comparison in docs/benchmarks.md.
    #[command(hide = true)]
    BenchStep {
        /// Timed steps (after 2 warm-up steps).
        #[arg(long, default_value_t = 10)]
        steps: usize,
    },
}

#[cfg(feature = "cluster")]
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Run a scheduler until stopped: clients send it queries, it hands
    /// their tasks to the executors.
    Scheduler {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:50050")]
        bind: std::net::SocketAddr,
    },
    /// Run an executor until stopped: it takes tasks from the scheduler and
    /// reads the shards itself (a shared path or object storage, with this
    /// process's `AWS_*` settings).
    Executor {
        /// The scheduler's address.
        #[arg(long, default_value = "127.0.0.1:50050")]
        scheduler: std::net::SocketAddr,
        /// Host to bind and to advertise to the scheduler and the other
        /// executors.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Arrow Flight port (shuffle data between executors and to clients).
        #[arg(long, default_value_t = 50051)]
        flight_port: u16,
        /// gRPC port (tasks from the scheduler).
        #[arg(long, default_value_t = 50052)]
        grpc_port: u16,
        /// Tasks at once (default: the machine's cores).
        #[arg(long)]
        tasks: Option<usize>,
        /// Folder for shuffle files (default: a temporary folder).
        #[arg(long)]
        work_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A shard folder (with its manifest.json), a path or an `s3://`,
    /// `gs://`, `az://` URL (read as a stream; nothing is stored).
    #[arg(long)]
    pub shards: PathBuf,
    /// Print one JSON object instead of lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchMemoryArgs {
    /// Recipe whose [model] is measured (its LLM; no vision tower).
    #[arg(long)]
    pub recipe: PathBuf,
    /// Contexts in tokens, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2048,8192,32768,65536")]
    pub contexts: Vec<usize>,
    /// Only with (true) or only without (false) activation checkpointing
    /// (default: both).
    #[arg(long)]
    pub checkpointing: Option<bool>,
    /// The optimizer of the step.
    #[arg(long, default_value = "adamw", value_parser = parse_optimizer)]
    pub optimizer: lvpipe_pipeline::recipe::OptimizerKind,
    /// Timed steps per setting, after one untimed step.
    #[arg(long, default_value_t = 1)]
    pub steps: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Where the PNG curve of peak memory against context goes.
    #[arg(long, default_value = "bench-memory.png")]
    pub plot: PathBuf,
    /// Where the step computes: cpu, or cuda / cuda:N in a build with
    /// `--features cuda` (then the device's peak memory is measured too).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// What activations are computed in: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Run one context in this process and print its JSON (what the
    /// benchmark starts per setting).
    #[arg(long, hide = true)]
    pub one: Option<usize>,
}

fn parse_partition(s: &str) -> Result<lvpipe_sharding::Partition, String> {
    lvpipe_sharding::Partition::parse(s).map_err(|e| e.to_string())
}

fn parse_optimizer(s: &str) -> Result<lvpipe_pipeline::recipe::OptimizerKind, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("`{s}`: expected adamw, adamw8bit or adafactor"))
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Recipe file (TOML; see recipes/README.md).
    #[arg(long)]
    pub recipe: PathBuf,
    /// Shard folder the recipe's queries run against (a path or an
    /// `s3://`, `gs://`, `az://` URL).
    #[arg(long)]
    pub shards: PathBuf,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct MixArgs {
    /// Recipe file (TOML).
    #[arg(long)]
    pub recipe: PathBuf,
    /// Stage number, 1-based.
    #[arg(long)]
    pub stage: usize,
    /// Shard folder (a path or an `s3://`, `gs://`, `az://` URL).
    #[arg(long)]
    pub shards: PathBuf,
    /// Folder for mixes; the stage goes to OUT/stage-N. On object storage,
    /// the mix is made in the cache ($LVPIPE_CACHE, else ~/.cache/lvpipe)
    /// and uploaded, mix.json last.
    #[arg(long)]
    pub out: PathBuf,
    /// Run the stage's selection on a Ballista cluster (`df://HOST:PORT`,
    /// built with `--features cluster`); its executors must reach --shards.
    #[arg(long)]
    pub cluster: Option<String>,
}

#[derive(Debug, Args)]
pub struct StreamArgs {
    /// A stage's mix folder (OUT/stage-N of `lvpipe mix`), local or on
    /// object storage (`s3://...`).
    #[arg(long)]
    pub mix: PathBuf,
    /// Folder that remote mixes are fetched into, checked against their
    /// checksums (default: $LVPIPE_CACHE, else ~/.cache/lvpipe).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Most bytes the cache's mixes may take (e.g. 200GiB): the least
    /// recently used other mixes are removed to make room.
    #[arg(long, value_parser = parse_size)]
    pub cache_size: Option<u64>,
    /// This rank, 0-based.
    #[arg(long, default_value_t = 0)]
    pub rank: u32,
    /// Data-parallel ranks; must divide the stage's global batch.
    #[arg(long, default_value_t = 1)]
    pub world_size: u32,
    /// Global step to start at (resuming is exact and costs nothing).
    #[arg(long, default_value_t = 0)]
    pub from_step: u64,
    /// Number of steps to print.
    #[arg(long, default_value_t = 1)]
    pub steps: u64,
    /// One JSON object per batch instead of a summary line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Recipe file (TOML; see recipes/README.md).
    #[arg(long, required_unless_present = "resume")]
    pub recipe: Option<PathBuf>,
    /// Stage to train, 1-based (with --mix).
    #[arg(long, conflicts_with = "stages", required_unless_present_any = ["stages", "resume"])]
    pub stage: Option<usize>,
    /// The stage's mix folder (OUT/stage-N of `lvpipe mix`), local or on
    /// object storage (`s3://...`, fetched into --cache first).
    #[arg(long, requires = "stage")]
    pub mix: Option<PathBuf>,
    /// Folder that a remote --mix is fetched into (default: $LVPIPE_CACHE,
    /// else ~/.cache/lvpipe).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Most bytes the cache's mixes may take (e.g. 200GiB): the least
    /// recently used other mixes are removed to make room.
    #[arg(long, value_parser = parse_size)]
    pub cache_size: Option<u64>,
    /// Stages to run in a chain, like `1-5` or `3`: each is mixed from
    /// --shards into OUT/mixes/stage-N and trained into OUT/stage-N from the
    /// stage its recipe `init` names. Finished stages are skipped and a
    /// stage with checkpoints resumes, so rerunning the command continues.
    #[arg(long, requires = "shards", value_parser = parse_stages)]
    pub stages: Option<(usize, usize)>,
    /// Shard folder to mix each stage from (with --stages).
    #[arg(long)]
    pub shards: Option<PathBuf>,
    /// The shards' tokenizer.json (checked against the mix's fingerprint;
    /// gives the `<image>` token id; copied into the run folder).
    #[arg(long, required_unless_present = "resume")]
    pub tokenizer: Option<PathBuf>,
    /// Run folder (one stage), or folder of stage-N run folders (--stages).
    #[arg(long, required_unless_present = "resume")]
    pub out: Option<PathBuf>,
    /// The model the stage starts from: the previous stage's run folder, or
    /// `hf:DIR`, a Hugging Face folder (Qwen2 LLM, SigLIP tower) or a VILA
    /// folder, whose parts replace the fresh seeded weights.
    #[arg(long, conflicts_with = "stages", value_parser = parse_init)]
    pub init: Option<PathBuf>,
    /// Steps to run per stage (default: the stage's `steps`, or `epochs` x
    /// steps per epoch); the learning-rate schedule spans them.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Write a checkpoint every N steps (0: only at the end of the stage).
    #[arg(long, default_value_t = 50)]
    pub save_every: u64,
    /// Where training computes: cpu, or cuda / cuda:N in a build with
    /// `--features cuda`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// What activations are computed in: f32, bf16 or f16 (mixed
    /// precision: the weights and optimizer state stay f32; norms,
    /// softmaxes and the loss run in f32; f16 scales the loss dynamically).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Recompute each layer in the backward pass instead of keeping its
    /// activations (as a stage's `gradient_checkpointing = true`): memory
    /// of one layer instead of all, for one more forward pass.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Continue the run in this folder from its newest checkpoint, with the
    /// settings it was started with (its run.json): same batches, and on
    /// CPU the same losses, as if it had not stopped.
    #[arg(long, conflicts_with_all = ["recipe", "stage", "stages", "mix", "out", "init"])]
    pub resume: Option<PathBuf>,
    /// Abort the process right after this step, as a kill would (crash tests).
    #[arg(long, hide = true)]
    pub abort_after: Option<u64>,
    /// Stop making progress right after this step, as a stuck rank would
    /// (rank 0 of a group; tests of the collective timeout).
    #[arg(long, hide = true)]
    pub stall_after: Option<u64>,
}

/// A model folder, with or without the `hf:` prefix.
fn parse_init(s: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(s.strip_prefix("hf:").unwrap_or(s)))
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A run folder, or a Hugging Face (`hf:DIR` or DIR) or VILA folder.
    #[arg(long, value_parser = parse_init)]
    pub model: PathBuf,
    /// The user's message.
    #[arg(long)]
    pub prompt: String,
    /// An image to show the model (repeatable; before the prompt).
    #[arg(long)]
    pub image: Vec<PathBuf>,
    /// A video to show the model (repeatable), sampled as --frames says.
    #[arg(long)]
    pub video: Vec<PathBuf>,
    /// How frames are taken from each video: `uniform:N`, `fps:F,max:N`.
    #[arg(long, default_value = "uniform:8", value_parser = parse_frames)]
    pub frames: FramePolicy,
    /// Tokenizer (default: the model folder's tokenizer.json or llm/tokenizer.json).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Tokens to generate at most (fewer where the answer ends).
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 decodes greedily; above, tokens are drawn at this temperature.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Draw only from the most likely tokens whose probabilities reach this.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Seed of the draws (with --temperature).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tokenize the prompt as it is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Where it computes: cpu, or cuda / cuda:N in a build with
    /// `--features cuda`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// What activations are computed in: f32, bf16 or f16 (the weights
    /// stay f32; norms, softmaxes and log-probabilities run in f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Print one JSON object: prompt_tokens, tokens, text, logprobs.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ExportFormatArg {
    /// The LLM as a Qwen2ForCausalLM folder.
    Hf,
    /// VILA's folder: llm/, vision_tower/, mm_projector/, config.json.
    Vila,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A finished run folder (or any model folder lvpipe loads).
    #[arg(long)]
    pub run: PathBuf,
    /// What to write: the LLM alone (hf) or the whole VILA model (vila).
    #[arg(long, value_enum)]
    pub format: ExportFormatArg,
    /// New folder to write (must not exist or be empty).
    #[arg(long)]
    pub out: PathBuf,
}

/// `3` or `1-5`.
fn parse_stages(text: &str) -> Result<(usize, usize), String> {
    let bad = || format!("`{text}`: expected a stage like 3 or a range like 1-5");
    let (a, b) = match text.split_once('-') {
        Some((a, b)) => (a.trim(), b.trim()),
        None => (text.trim(), text.trim()),
    };
    let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if a == 0 || b < a {
        return Err(bad());
    }
    Ok((a, b))
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ScaleArg {
    /// Dozens of samples, for tests (seconds).
    Tiny,
    /// Thousands of samples, for the demo and benchmarks.
    Small,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Folder to write into (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// How much data to write.
    #[arg(long, value_enum, default_value = "tiny")]
    pub scale: ScaleArg,
    /// Random seed; the same seed and scale give the same bytes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AspectArg {
    /// Resize the longer side and pad to a square with grey (VILA `pad`).
    Pad,
    /// Squash to a square (VILA `resize`).
    Resize,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Folder for the shards (created if missing; an interrupted build there
    /// resumes). On object storage (`s3://`, `gs://`, `az://`), the build is
    /// made in the cache ($LVPIPE_CACHE, else ~/.cache/lvpipe) and uploaded,
    /// its manifest last.
    #[arg(long)]
    pub out: PathBuf,
    /// A Hugging Face tokenizer.json; special tokens the template and media
    /// need that it lacks (`<image>`, `<video>`, ...) are added.
    #[arg(long, required_unless_present = "finalize")]
    pub tokenizer: Option<PathBuf>,
    /// Build only task I of N (0-based; e.g. `$SLURM_ARRAY_TASK_ID/64`):
    /// its share of the records, into `OUT/part-IIIII-of-NNNNN/`. Each
    /// record goes to exactly one task; rerun a task to resume it.
    #[arg(long, value_parser = parse_partition, conflicts_with = "finalize")]
    pub partition: Option<lvpipe_sharding::Partition>,
    /// After all tasks of a partitioned build: check that every part is
    /// there, finished and intact, and write OUT's manifest over them.
    #[arg(long)]
    pub finalize: bool,
    /// The tokenizer family's chat format: chatml (Qwen2's, VILA's) or
    /// llama3 (Llama-3's header format).
    #[arg(long, default_value = "chatml")]
    pub chat_template: String,
    /// A source as KIND:PATH or NAME=KIND:PATH; KIND is llava,
    /// llava-parquet, text, tokens, wds or interleaved; NAME defaults to the
    /// file stem. Repeat for several.
    #[arg(long = "source", value_name = "[NAME=]KIND:PATH")]
    pub sources: Vec<String>,
    /// A registry file (TOML `[[source]]` tables with name, kind, path,
    /// media_root), read in addition to --source flags.
    #[arg(long)]
    pub registry: Option<PathBuf>,
    /// Folder that media paths of --source files resolve against (default:
    /// each source file's folder).
    #[arg(long)]
    pub media_root: Option<PathBuf>,
    /// Side of the square images stored in shards, in pixels.
    #[arg(long, default_value_t = 384)]
    pub image_size: u32,
    /// How images become square.
    #[arg(long, value_enum, default_value = "pad")]
    pub image_aspect: AspectArg,
    /// JPEG quality of stored images (1 to 100).
    #[arg(long, default_value_t = 90)]
    pub jpeg_quality: u8,
    /// Largest image accepted, in pixels (width x height); larger ones are
    /// quarantined as media_too_large (decompression bomb guard).
    #[arg(long, default_value_t = 89_478_485)]
    pub max_image_pixels: u64,
    /// Longest JSONL line read as a record (e.g. 64MiB); longer lines are
    /// quarantined as record_too_large.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub max_record_bytes: u64,
    /// Largest encoded media file accepted (e.g. 64MiB).
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub max_media_bytes: u64,
    /// Frames taken from each video: `uniform:N` (N evenly spread over the
    /// whole video), `fps:F,max:N` (LongVILA: min(N, F x duration) spread
    /// evenly) or `head:fps:F,max:N` (one every 1/F s from the start, at most
    /// N). A registry source's `frames` overrides it.
    #[arg(long, default_value = "uniform:8", value_parser = parse_frames)]
    pub frames: FramePolicy,
    /// `exact`: the frame shown at each target time (decodes from the
    /// keyframe before it); `keyframe`: the nearest keyframe, its real time
    /// recorded (approximate, many times faster on long videos).
    #[arg(long, value_enum, default_value = "exact")]
    pub frame_seek: FrameSeekArg,
    /// A video with fewer distinct decodable frames than its policy asks:
    /// `keep` what decodes, or `quarantine` it as too_few_frames.
    #[arg(long, value_enum, default_value = "keep")]
    pub short_videos: ShortVideosArg,
    /// Largest video frame accepted, in pixels (width x height).
    #[arg(long, default_value_t = 7680 * 4320)]
    pub max_video_pixels: u64,
    /// Approximate uncompressed size of one shard (e.g. 256MiB, 1GB).
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub shard_size: u64,
    /// Rows per Parquet row group, the unit of random access.
    #[arg(long, default_value_t = 256)]
    pub row_group_rows: usize,
    /// Stop at the first record that would be quarantined (exit code 1).
    #[arg(long)]
    pub strict: bool,
    /// Replace a different build found in --out instead of refusing.
    #[arg(long)]
    pub overwrite: bool,
    /// Keep exact duplicates (same content within a source) instead of
    /// quarantining them.
    #[arg(long)]
    pub keep_duplicates: bool,
    /// Read media wherever annotations point (absolute paths, `..`,
    /// symlinks out of the media root) instead of quarantining them as
    /// unsafe_path; recorded in the manifest.
    #[arg(long)]
    pub allow_media_outside_root: bool,
    /// Worker threads for decoding and tokenization (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Stop with an error after this many shards, as a crash would (for
    /// testing resume).
    #[arg(long, hide = true)]
    pub fail_after_shards: Option<u32>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FrameSeekArg {
    Exact,
    Keyframe,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ShortVideosArg {
    Keep,
    Quarantine,
}

fn parse_frames(s: &str) -> Result<FramePolicy, String> {
    s.parse().map_err(|e: lvpipe_schemas::Error| e.to_string())
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormatArg {
    /// Aligned text table (long cells cut).
    Table,
    /// CSV with a header row.
    Csv,
    /// Newline-delimited JSON objects.
    Json,
}

#[derive(Debug, Args)]
pub struct SqlArgs {
    /// Shard folder written by build-shards (tables: samples, quarantine,
    /// manifest), a path or an `s3://`, `gs://`, `az://` URL.
    #[arg(long, required_unless_present_any = ["mixes", "runs"])]
    pub shards: Option<PathBuf>,
    /// Folder of mixes written by `lvpipe mix` (adds tables mix_report and packs).
    #[arg(long)]
    pub mixes: Option<PathBuf>,
    /// A training run folder, or a folder of them (`lvpipe train --stages`):
    /// adds tables metrics (per step), source_tokens (per step and source)
    /// and lineage (the samples of every step).
    #[arg(long)]
    pub runs: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: FormatArg,
    /// Check every shard against the manifest's blake3 before querying.
    #[arg(long)]
    pub verify: bool,
    /// Memory a query may use (e.g. 2GiB; default: half of the machine's);
    /// a query that needs more fails with "resources exhausted".
    #[arg(long, value_parser = parse_size)]
    pub memory_limit: Option<u64>,
    /// Run the query on a Ballista cluster (`df://HOST:PORT`, built with
    /// `--features cluster`); its executors must reach --shards.
    #[arg(long, requires = "shards")]
    pub cluster: Option<String>,
    /// The query (SELECT, WITH, EXPLAIN, SHOW, DESCRIBE; writes are refused).
    pub query: String,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A stage's run folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub run: PathBuf,
    /// Where it computes: cpu, or cuda / cuda:N in a build with
    /// `--features cuda`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// What activations are computed in: f32, bf16 or f16 (the weights
    /// stay f32; norms, softmaxes and log-probabilities run in f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// The synthetic corpus `lvpipe synth` wrote (answers.json and eval/).
    #[arg(long)]
    pub data: PathBuf,
    /// Suites, comma-separated: vqa, niah_text, niah_video, ppl; `niah` is
    /// both needle suites, `all` every suite.
    #[arg(long, default_value = "all")]
    pub suite: String,
    /// Folder for eval.json and the heatmaps.
    #[arg(long)]
    pub out: PathBuf,
    /// At most this many questions (and video needles) per suite (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Document lengths of the text needles, in tokens.
    #[arg(long, value_delimiter = ',', default_value = "256,512,1024,2048")]
    pub niah_lengths: Vec<usize>,
    /// Depths of the text needles, 0 to 1.
    #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.5,0.75,1")]
    pub niah_depths: Vec<f64>,
    /// Needles per (length, depth) cell.
    #[arg(long, default_value_t = 4)]
    pub niah_trials: usize,
    /// V-NIAH haystack lengths, in frames of held-out videos (the heatmap's
    /// columns).
    #[arg(long, value_delimiter = ',', default_value = "16,32,64,128")]
    pub vniah_frames: Vec<usize>,
    /// V-NIAH needle depths, 0 to 1 (the heatmap's rows).
    #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.5,0.75,1")]
    pub vniah_depths: Vec<f64>,
    /// Frame policies of the flash test (the long videos' own two-second
    /// shape), `;`-separated (a heatmap row each).
    #[arg(long, value_delimiter = ';', default_value = "fps:2,max:64;uniform:16", value_parser = parse_frames)]
    pub video_frames: Vec<FramePolicy>,
    /// Frame policy of the questions about short clips.
    #[arg(long, default_value = "uniform:8", value_parser = parse_frames)]
    pub clip_frames: FramePolicy,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Folder for everything the demo writes (raw/, shards/, report.md).
    #[arg(long, default_value = "demo")]
    pub out: PathBuf,
    /// Size of the synthetic corpus.
    #[arg(long, value_enum, default_value = "small")]
    pub scale: ScaleArg,
    /// Random seed of the synthetic corpus.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Recipe to run (default: the shipped recipes/tiny.toml).
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    /// Cap every stage at this many steps (default: the recipe's).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Stop after the data side (synth, shards, plan, mixes): no training or evaluation.
    #[arg(long)]
    pub no_train: bool,
    /// At most this many questions per evaluation suite (0: all).
    #[arg(long, default_value_t = 240)]
    pub eval_limit: usize,
}

/// Parses `123`, `64KB`, `256MiB`, `1GB`, `2GiB`.
fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}`: expected a size like 256MiB"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        other => {
            return Err(format!(
                "`{text}`: unknown unit `{other}` (use B, KB, KiB, MB, MiB, GB, GiB)"
            ));
        }
    };
    Ok((number * scale as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size("1GB").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12 parsecs").is_err());
    }

    #[test]
    fn stage_ranges_parse() {
        assert_eq!(parse_stages("1-5").unwrap(), (1, 5));
        assert_eq!(parse_stages("3").unwrap(), (3, 3));
        assert!(parse_stages("0-2").is_err());
        assert!(parse_stages("4-2").is_err());
        assert!(parse_stages("a").is_err());
    }

    #[test]
    fn every_flag_has_help() {
        use clap::CommandFactory;
        let cli = Cli::command();
        for sub in cli.get_subcommands() {
            assert!(sub.get_about().is_some(), "{}", sub.get_name());
            for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
                assert!(
                    arg.get_help().is_some(),
                    "{} --{}",
                    sub.get_name(),
                    arg.get_id()
                );
            }
        }
    }
}
