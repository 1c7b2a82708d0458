//! A DataFusion session over a shard folder: `samples`, `quarantine`, `manifest`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::MemTable;
use datafusion::dataframe::DataFrame;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::context::{SQLOptions, SessionConfig, SessionContext};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::sql::parser::{DFParser, Statement};
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use lvpipe_schemas::{Manifest, SCHEMA_VERSION, TableKind, quarantine_schema, samples_schema};
use lvpipe_sharding::storage::Location;

use crate::{Error, Result};

/// The tables of one shard folder, ready for read-only SQL.
pub struct Catalog {
    ctx: SessionContext,
    /// `None` for a session over run records only ([`Catalog::empty`]).
    manifest: Option<Manifest>,
    /// The shard folder (absolute where local).
    location: Location,
    /// Set once [`Catalog::verify`] has passed: each stage mixed from this
    /// catalog would hash the same files again.
    verified: std::sync::atomic::AtomicBool,
}

impl Catalog {
    /// Opens a finished build: reads its manifest, checks the schema version,
    /// and registers exactly the files the manifest lists. Queries may use
    /// [`default_memory_limit`] bytes.
    pub async fn open(shards: &Path) -> Result<Self> {
        Self::open_with_limit(shards, default_memory_limit()).await
    }

    /// [`Catalog::open`] with queries bounded to `memory_limit` bytes: a
    /// query that needs more fails with DataFusion's "resources exhausted"
    /// (spilling first where the operator can).
    pub async fn open_with_limit(shards: &Path, memory_limit: usize) -> Result<Self> {
        Self::open_at(&Location::Local(shards.to_path_buf()), memory_limit).await
    }

    /// A shard folder that is local or on object storage (`s3://...`):
    /// DataFusion reads remote shards where they are, through the same
    /// `object_store` client.
    pub async fn open_at(shards: &Location, memory_limit: usize) -> Result<Self> {
        Self::open_on(shards, memory_limit, None).await
    }

    /// [`Catalog::open_at`], its queries run on the Ballista cluster whose
    /// scheduler is at `cluster` (`df://HOST:PORT`) where given: every
    /// machine of the cluster must reach `shards` (object storage, or a
    /// shared filesystem path). Needs the `cluster` feature.
    pub async fn open_on(
        shards: &Location,
        memory_limit: usize,
        cluster: Option<&str>,
    ) -> Result<Self> {
        let shards_err = |message: String| Error::Folder {
            path: PathBuf::from(shards.to_string()),
            message,
        };
        let no_manifest = || {
            shards_err(format!(
                "no {} here: not a shard folder, or its build did not finish (rerun build-shards to resume it)",
                Manifest::FILE_NAME
            ))
        };
        let (location, text, sizes) = match shards {
            Location::Local(path) => {
                let dir = std::path::absolute(path)?;
                let text = match fs_err::read_to_string(dir.join(Manifest::FILE_NAME)) {
                    Ok(text) => text,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(no_manifest());
                    }
                    Err(e) => return Err(e.into()),
                };
                (Location::Local(dir), text, None)
            }
            Location::Remote(remote) => {
                let bytes = remote
                    .read(Manifest::FILE_NAME)
                    .await?
                    .ok_or_else(no_manifest)?;
                let text = String::from_utf8_lossy(&bytes).into_owned();
                let sizes: HashMap<String, u64> = remote.list().await?.into_iter().collect();
                (shards.clone(), text, Some(sizes))
            }
        };
        let manifest = Manifest::from_json(&text)?;
        if manifest.schema_version != SCHEMA_VERSION {
            return Err(shards_err(format!(
                "schema version {} but this lvpipe reads version {SCHEMA_VERSION}; rebuild the shards",
                manifest.schema_version
            )));
        }
        let ctx = match cluster {
            None => session(memory_limit)?,
            Some(url) => cluster_session(url).await?,
        };
        // Sizes always (a stat per file, or one listing): a truncated or
        // replaced shard is an error here, not a misread later. Checksums:
        // `verify`.
        for shard in &manifest.shards {
            let len = match (&location, &sizes) {
                (Location::Local(dir), _) => Some(fs_err::metadata(dir.join(&shard.file))?.len()),
                (_, Some(sizes)) => sizes.get(&shard.file).copied(),
                _ => None,
            };
            if len != Some(shard.bytes) {
                return Err(Error::Folder {
                    path: PathBuf::from(file_url(&location, &shard.file)),
                    message: match len {
                        Some(len) => format!(
                            "{len} bytes, but the manifest says {}: the shard was changed after the build",
                            shard.bytes
                        ),
                        None => "missing: the manifest lists it".into(),
                    },
                });
            }
        }
        if let Location::Remote(remote) = &location {
            ctx.runtime_env()
                .register_object_store(remote.root(), remote.store());
        }
        for (table, schema) in [
            (TableKind::Samples, samples_schema()),
            (TableKind::Quarantine, quarantine_schema()),
        ] {
            let files: Vec<String> = manifest
                .shards
                .iter()
                .filter(|s| s.table == table)
                .map(|s| file_url(&location, &s.file))
                .collect();
            register(&ctx, table.as_str(), files, schema)?;
        }
        let batch = manifest.to_record_batch()?;
        ctx.register_table(
            "manifest",
            Arc::new(MemTable::try_new(batch.schema(), vec![vec![batch]])?),
        )?;
        Ok(Catalog {
            ctx,
            manifest: Some(manifest),
            location,
            verified: Default::default(),
        })
    }

    /// The shard build's manifest (an error for a session without shards).
    /// Checks every shard file against the blake3 the manifest recorded
    /// when it was written: a flipped byte is an error naming the file.
    /// Once it has passed, a catalog does not hash its files again.
    pub fn verify(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.verified.load(Ordering::Relaxed) {
            return Ok(());
        }
        let shards = &self.manifest()?.shards;
        let folder = || PathBuf::from(self.location.to_string());
        let problems = match &self.location {
            Location::Local(dir) => {
                lvpipe_sharding::verify::verify_shards(dir, shards, &|_| {})
                    .map_err(|e| Error::Folder {
                        path: folder(),
                        message: e.to_string(),
                    })?
                    .problems
            }
            Location::Remote(remote) => {
                lvpipe_sharding::storage::block_on(lvpipe_sharding::verify::verify_remote(
                    remote, shards,
                ))?
                .problems
            }
        };
        if let Some(problem) = problems.first() {
            return Err(Error::Folder {
                path: folder(),
                message: format!(
                    "{problem}: the shard was changed or damaged after the build (`lvpipe verify` lists every such file)"
                ),
            });
        }
        self.verified.store(true, Ordering::Relaxed);
        Ok(())
    }

    pub fn manifest(&self) -> Result<&Manifest> {
        self.manifest.as_ref().ok_or_else(|| {
            Error::Usage("this session has no shards: open a shard folder first".into())
        })
    }

    /// The underlying session, for callers that register more tables.
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Registers `mix_report` and `packs` over every `stage-N` folder of a
    /// `mix` output folder (both tables have a `stage` column).
    pub fn register_mixes(&self, mixes: &Path) -> Result<()> {
        let mut stages: Vec<PathBuf> = fs_err::read_dir(mixes)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join(crate::mix::MixMeta::FILE_NAME).exists())
            .collect();
        stages.sort();
        if stages.is_empty() {
            return Err(Error::Folder {
                path: mixes.to_path_buf(),
                message: "no stage-N folders with a mix.json: run `lvpipe mix` first".into(),
            });
        }
        for (table, file) in [("mix_report", "mix_report.arrow"), ("packs", "packs.arrow")] {
            let mut batches = Vec::new();
            for dir in &stages {
                batches.extend(crate::mix::read_ipc(&dir.join(file))?);
            }
            let schema = batches[0].schema();
            self.ctx
                .register_table(table, Arc::new(MemTable::try_new(schema, vec![batches])?))?;
        }
        Ok(())
    }

    /// Registers the records of training runs under `runs` (a run folder,
    /// or a folder of them): `metrics` (one row per step), `source_tokens`
    /// (per step and source) and `lineage` (the samples of every step).
    pub fn register_runs(&self, runs: &Path) -> Result<()> {
        let dirs = crate::lineage::run_dirs(runs)?;
        if dirs.is_empty() {
            return Err(Error::Folder {
                path: runs.to_path_buf(),
                message: "no run folders with a metrics.jsonl: run `lvpipe train` first".into(),
            });
        }
        let (metrics, sources) = crate::lineage::metrics_tables(&dirs)?;
        for (name, batch) in [("metrics", metrics), ("source_tokens", sources)] {
            self.ctx.register_table(
                name,
                Arc::new(MemTable::try_new(batch.schema(), vec![vec![batch]])?),
            )?;
        }
        let lineage: Vec<PathBuf> = dirs
            .iter()
            .map(|d| d.join("lineage.parquet"))
            .filter(|p| p.exists())
            .collect();
        register(
            &self.ctx,
            "lineage",
            lineage
                .iter()
                .map(|p| Ok(std::path::absolute(p)?.to_string_lossy().into_owned()))
                .collect::<std::io::Result<_>>()?,
            lvpipe_schemas::lineage_schema(),
        )
    }

    /// A session with no shard tables, for `sql --runs` alone.
    pub fn empty(memory_limit: usize) -> Result<Self> {
        Ok(Catalog {
            ctx: session(memory_limit)?,
            manifest: None,
            location: Location::Local(PathBuf::new()),
            verified: Default::default(),
        })
    }

    /// Runs one read-only statement and collects its result.
    pub async fn query(&self, sql: &str) -> Result<Vec<RecordBatch>> {
        Ok(self.frame(sql).await?.collect().await?)
    }

    /// Runs one read-only statement as a stream of record batches: its
    /// result is never held whole.
    pub async fn stream(&self, sql: &str) -> Result<SendableRecordBatchStream> {
        Ok(self.frame(sql).await?.execute_stream().await?)
    }

    async fn frame(&self, sql: &str) -> Result<DataFrame> {
        check_read_only(sql)?;
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        Ok(self.ctx.sql_with_options(sql, options).await?)
    }
}

/// The URL (or absolute path) DataFusion reads `file` of a folder from.
fn file_url(location: &Location, file: &str) -> String {
    match location {
        Location::Local(dir) => dir.join(file).to_string_lossy().into_owned(),
        Location::Remote(remote) => remote.file_url(file),
    }
}

fn register(ctx: &SessionContext, name: &str, files: Vec<String>, schema: SchemaRef) -> Result<()> {
    if files.is_empty() {
        ctx.register_table(name, Arc::new(MemTable::try_new(schema, vec![vec![]])?))?;
        return Ok(());
    }
    let urls = files
        .iter()
        .map(ListingTableUrl::parse)
        .collect::<datafusion::error::Result<Vec<_>>>()?;
    let options =
        ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .with_schema(schema);
    ctx.register_table(name, Arc::new(ListingTable::try_new(config)?))?;
    Ok(())
}

/// Refuses anything but one query, with a message that names what was given.
/// DataFusion's `SQLOptions` guard the same at planning; this check runs
/// first so the error says what was refused instead of how it was planned.
fn check_read_only(sql: &str) -> Result<()> {
    let statements = DFParser::parse_sql(sql)?;
    if statements.len() != 1 {
        return Err(Error::NotAQuery(format!(
            "{} statements; give exactly one",
            statements.len()
        )));
    }
    let allowed = match &statements[0] {
        Statement::Statement(s) => matches!(
            s.as_ref(),
            SqlStatement::Query(_)
                | SqlStatement::Explain { .. }
                | SqlStatement::ShowTables { .. }
                | SqlStatement::ShowColumns { .. }
                | SqlStatement::ExplainTable { .. }
        ),
        Statement::Explain(_) => true,
        _ => false,
    };
    if !allowed {
        let text = statements[0].to_string();
        let head: String = text.chars().take(60).collect();
        return Err(Error::NotAQuery(head));
    }
    Ok(())
}

/// Half of the machine's memory (`MemTotal` in /proc/meminfo), or 4 GiB
/// where that cannot be read: room for the process itself and the page
/// cache that the mapped files live in.
pub fn default_memory_limit() -> usize {
    meminfo_bytes("MemTotal").map_or(4 << 30, |total| (total / 2) as usize)
}

/// A field of /proc/meminfo (`MemTotal`, `MemAvailable`, ...) in bytes.
pub fn meminfo_bytes(field: &str) -> Option<u64> {
    proc_kib_field("/proc/meminfo", field)
}

/// A field of this process's /proc/self/status (`VmHWM`, the peak resident
/// memory; `VmRSS`, the current) in bytes.
pub fn process_status_bytes(field: &str) -> Option<u64> {
    proc_kib_field("/proc/self/status", field)
}

/// A `Field:   N kB` line of a /proc file, in bytes.
fn proc_kib_field(path: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    let kib: u64 = value.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

#[cfg(feature = "cluster")]
async fn cluster_session(url: &str) -> Result<SessionContext> {
    crate::cluster::session(url).await
}

#[cfg(not(feature = "cluster"))]
async fn cluster_session(url: &str) -> Result<SessionContext> {
    Err(Error::Usage(format!(
        "--cluster {url}: this lvpipe was built without Ballista: build it with `--features cluster`"
    )))
}

/// A DataFusion session whose queries are bounded to `memory_limit` bytes.
fn session(memory_limit: usize) -> Result<SessionContext> {
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_limit(memory_limit, 1.0)
        .build_arc()?;
    Ok(SessionContext::new_with_config_rt(
        SessionConfig::new(),
        runtime,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_settings_are_refused_queries_pass() {
        for sql in [
            "CREATE TABLE t AS SELECT 1",
            "INSERT INTO samples VALUES (1)",
            "COPY samples TO '/tmp/x.parquet'",
            "DROP TABLE samples",
            "SET datafusion.execution.batch_size = 1",
            "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '/tmp'",
            "SELECT 1; SELECT 2",
        ] {
            let err = check_read_only(sql).unwrap_err();
            assert!(matches!(err, Error::NotAQuery(_)), "{sql}: {err}");
        }
        for sql in [
            "SELECT 1",
            "WITH a AS (SELECT 1) SELECT * FROM a",
            "EXPLAIN SELECT 1",
            "SHOW TABLES",
        ] {
            check_read_only(sql).unwrap();
        }
    }
}
