//! Folders on object storage: `s3://`, `gs://`, `az://` (and `file://`)
//! URLs through `object_store`, the crate DataFusion reads with, configured
//! from the standard environment (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`,
//! `GOOGLE_SERVICE_ACCOUNT`, `AZURE_STORAGE_ACCOUNT_NAME`, ...).
//!
//! A folder on object storage is written as a local one is: every file
//! first, the file that says "complete" (`manifest.json`, `mix.json`) last.
//! An object appears whole or not at all (a multipart upload that is not
//! completed is never listed), so a reader that goes by that last file
//! never sees a partial folder. Reading back works the other way: files are
//! fetched into a local folder, checked against their recorded size and
//! blake3, and the last file written last there too.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, RetryConfig};
use tokio::io::AsyncWriteExt;
use url::Url;

use crate::{Error, Result};

/// A folder given on the command line: a local path or a URL.
#[derive(Debug, Clone)]
pub enum Location {
    Local(PathBuf),
    Remote(Remote),
}

impl Location {
    /// `s3://bucket/prefix`, `gs://...`, `az://...` (or `abfss://`) are
    /// remote; `file:///path` and anything without a scheme are local.
    pub fn parse(text: &str) -> Result<Location> {
        match text.split_once("://") {
            Some(("file", path)) => Ok(Location::Local(PathBuf::from(path))),
            Some(_) => Remote::open(text).map(Location::Remote),
            None => Ok(Location::Local(PathBuf::from(text))),
        }
    }

    /// A folder below this one.
    pub fn join(&self, name: &str) -> Location {
        match self {
            Location::Local(p) => Location::Local(p.join(name)),
            Location::Remote(r) => Location::Remote(r.join(name)),
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::Remote(r) => f.write_str(r.url()),
        }
    }
}

/// A folder on object storage.
#[derive(Clone)]
pub struct Remote {
    /// The folder's URL, without a trailing slash.
    url: String,
    /// `scheme://bucket/`: what DataFusion registers the store under.
    root: Url,
    prefix: ObjectPath,
    store: Arc<dyn ObjectStore>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish()
    }
}

/// Requests that fail for a reason worth retrying (a dropped connection, a
/// 5xx, throttling) are retried this often within this time, then the
/// command fails naming the URL: an unreachable endpoint is an error after
/// about half a minute, never a hang. Refused credentials and missing
/// buckets are not retried.
const RETRIES: usize = 4;
const RETRY_TIMEOUT: Duration = Duration::from_secs(30);

impl Remote {
    /// A remote folder from its URL and the environment's settings. An
    /// `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`) of `http://...` allows plain
    /// HTTP, as S3-compatible servers on a private network need.
    pub fn open(text: &str) -> Result<Remote> {
        let err = |message: String| Error::Storage {
            url: text.to_string(),
            message,
        };
        let url = Url::parse(text).map_err(|e| err(format!("not a URL: {e}")))?;
        let retry = RetryConfig {
            max_retries: RETRIES,
            retry_timeout: RETRY_TIMEOUT,
            ..Default::default()
        };
        let store: Arc<dyn ObjectStore> = match url.scheme() {
            "s3" | "s3a" => {
                let endpoint = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
                    .iter()
                    .find_map(|k| std::env::var(k).ok());
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_url(text)
                    .with_retry(retry);
                if let Some(endpoint) = endpoint {
                    builder = builder
                        .with_endpoint(&endpoint)
                        .with_allow_http(endpoint.starts_with("http://"));
                }
                Arc::new(builder.build().map_err(|e| err(e.to_string()))?)
            }
            "gs" => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(text)
                    .with_retry(retry)
                    .build()
                    .map_err(|e| err(e.to_string()))?,
            ),
            "az" | "azure" | "abfs" | "abfss" => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(text)
                    .with_retry(retry)
                    .build()
                    .map_err(|e| err(e.to_string()))?,
            ),
            other => {
                return Err(err(format!(
                    "`{other}://` is not a storage lvpipe reads: use s3://, gs://, az:// or a local path"
                )));
            }
        };
        let bucket = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| err("no bucket in the URL".into()))?;
        let root =
            Url::parse(&format!("{}://{bucket}/", url.scheme())).map_err(|e| err(e.to_string()))?;
        let prefix = ObjectPath::parse(url.path().trim_matches('/'))
            .map_err(|e| err(format!("bad path: {e}")))?;
        Ok(Remote {
            url: text.trim_end_matches('/').to_string(),
            root,
            prefix,
            store,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// `scheme://bucket/`, under which DataFusion finds [`Remote::store`].
    pub fn root(&self) -> &Url {
        &self.root
    }

    pub fn store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    /// The URL of `name` (a path relative to the folder, `/`-separated).
    pub fn file_url(&self, name: &str) -> String {
        format!("{}/{name}", self.url)
    }

    /// A folder below this one.
    pub fn join(&self, name: &str) -> Remote {
        Remote {
            url: self.file_url(name),
            root: self.root.clone(),
            prefix: self.path(name),
            store: self.store.clone(),
        }
    }

    fn path(&self, name: &str) -> ObjectPath {
        name.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.prefix.clone(), |path, part| path.join(part))
    }

    fn error(&self, name: &str, e: impl std::fmt::Display) -> Error {
        Error::Storage {
            url: self.file_url(name),
            message: describe(e.to_string()),
        }
    }

    /// The whole of a (small) file, or `None` where there is none.
    pub async fn read(&self, name: &str) -> Result<Option<bytes::Bytes>> {
        match self.store.get(&self.path(name)).await {
            Ok(got) => Ok(Some(got.bytes().await.map_err(|e| self.error(name, e))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(name, e)),
        }
    }

    /// Writes a (small) file in one request.
    pub async fn write(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        self.store
            .put(&self.path(name), bytes.into())
            .await
            .map_err(|e| self.error(name, e))?;
        Ok(())
    }

    pub async fn delete(&self, name: &str) -> Result<()> {
        match self.store.delete(&self.path(name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(name, e)),
        }
    }

    /// Every file below the folder: its path relative to the folder, and
    /// its size.
    pub async fn list(&self) -> Result<Vec<(String, u64)>> {
        let mut files = Vec::new();
        let mut listing = self.store.list(Some(&self.prefix));
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| self.error("", e))?;
            let name = meta
                .location
                .prefix_match(&self.prefix)
                .map(|parts| parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>())
                .unwrap_or_default()
                .join("/");
            files.push((name, meta.size));
        }
        files.sort();
        Ok(files)
    }

    /// The size and blake3 of a file, read as a stream (nothing is kept),
    /// or `None` where there is none.
    pub async fn hash(&self, name: &str) -> Result<Option<(u64, String)>> {
        self.read_through(name, None).await
    }

    /// Reads `name` as a stream, each chunk hashed and written to `copy`
    /// where given: its size and blake3, or `None` where there is none.
    async fn read_through(
        &self,
        name: &str,
        mut copy: Option<&mut tokio::fs::File>,
    ) -> Result<Option<(u64, String)>> {
        let got = match self.store.get(&self.path(name)).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.error(name, e)),
        };
        let mut hasher = blake3::Hasher::new();
        let mut bytes = 0u64;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.error(name, e))?;
            bytes += chunk.len() as u64;
            hasher.update(&chunk);
            if let Some(file) = copy.as_deref_mut() {
                file.write_all(&chunk).await?;
            }
        }
        Ok(Some((bytes, hasher.finalize().to_hex().to_string())))
    }

    /// Uploads a local file as `name`, streamed in parts (a multipart upload
    /// above 10 MB): the object appears only once the whole file is there.
    pub async fn upload(&self, local: &Path, name: &str) -> Result<()> {
        let mut file = tokio::fs::File::open(local).await?;
        let mut writer =
            object_store::buffered::BufWriter::new(self.store.clone(), self.path(name));
        let copied = tokio::io::copy(&mut file, &mut writer).await;
        if let Err(e) = copied {
            let _ = writer.abort().await;
            return Err(self.error(name, e));
        }
        writer.shutdown().await.map_err(|e| self.error(name, e))?;
        Ok(())
    }

    /// Downloads `name` into `local`, through a temporary file renamed into
    /// place once its size and blake3 match `expected` (when given).
    pub async fn download(
        &self,
        name: &str,
        local: &Path,
        expected: Option<(u64, &str)>,
    ) -> Result<()> {
        if let Some(dir) = local.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let tmp = local.with_extension("download");
        let mut file = tokio::fs::File::create(&tmp).await?;
        let Some((bytes, found)) = self.read_through(name, Some(&mut file)).await? else {
            drop(file);
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(self.error(name, "no such file"));
        };
        file.sync_all().await?;
        drop(file);
        if let Some((size, blake3)) = expected
            && (size != bytes || blake3 != found)
        {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(self.error(
                name,
                format!(
                    "read {bytes} bytes with blake3 {found}, but the folder's record says {size} bytes with blake3 {blake3}: the file was changed after it was written"
                ),
            ));
        }
        tokio::fs::rename(&tmp, local).await?;
        Ok(())
    }

    /// Uploads `files` (paths relative to `local`, `/`-separated), at most
    /// four at a time, then `last`: the file whose presence says the folder
    /// is complete. A file already there at the same size is not uploaded
    /// again (a publish that was stopped resumes), except `last`.
    pub async fn publish(&self, local: &Path, files: &[String], last: &str) -> Result<()> {
        let present: std::collections::HashMap<String, u64> =
            self.list().await?.into_iter().collect();
        // Anything written under an older `last` must not look complete
        // while the new files go up.
        self.delete(last).await?;
        let uploads = files
            .iter()
            .filter(|f| {
                let size = std::fs::metadata(local.join(f.as_str()))
                    .map(|m| m.len())
                    .ok();
                size.is_none() || present.get(f.as_str()).copied() != size
            })
            .cloned()
            .map(|f| {
                let (me, path) = (self.clone(), local.join(&f));
                async move { me.upload(&path, &f).await }
            });
        four_at_a_time(uploads).await?;
        self.upload(&local.join(last), last).await
    }

    /// Downloads `files` (name, size, blake3 where known) into `local`,
    /// at most four at a time, then `last`. A file already there at that
    /// size (and blake3, where known) is kept: a fetch that was stopped
    /// resumes, and a cache holding an older version is brought up to date.
    pub async fn fetch(
        &self,
        local: &Path,
        files: &[(String, u64, Option<String>)],
        last: &str,
    ) -> Result<()> {
        let present = |name: &str, size: u64, blake3: Option<&str>| {
            let path = local.join(name);
            let sized = std::fs::metadata(&path).map(|m| m.len()).ok() == Some(size);
            sized
                && blake3.is_none_or(|b| {
                    std::fs::File::open(&path)
                        .and_then(|mut f| crate::verify::blake3_of(&mut f, &|_| {}))
                        .is_ok_and(|found| found == b)
                })
        };
        let downloads = files
            .iter()
            .filter(|(name, size, blake3)| !present(name, *size, blake3.as_deref()))
            .cloned()
            .map(|(name, size, blake3)| {
                let (me, path) = (self.clone(), local.join(&name));
                async move {
                    let expected = blake3.as_deref().map(|b| (size, b));
                    me.download(&name, &path, expected).await
                }
            });
        four_at_a_time(downloads).await?;
        self.download(last, &local.join(last), None).await
    }
}

/// A storage error in a line: an S3 error document's code and message
/// instead of its XML, and what to check when the credentials were refused.
fn describe(message: String) -> String {
    let tag = |t: &str| {
        let (_, rest) = message.split_once(&format!("<{t}>"))?;
        Some(rest.split_once(&format!("</{t}>"))?.0)
    };
    let (Some(code), Some((head, _))) = (tag("Code"), message.split_once("<?xml")) else {
        return message;
    };
    let mut line = format!("{head}{code}: {}", tag("Message").unwrap_or_default());
    if matches!(
        code,
        "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "ExpiredToken" | "InvalidToken"
    ) {
        line.push_str(" (check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN)");
    }
    line
}

/// Runs `requests` at most four at a time; their results in completion
/// order, or the first error.
pub(crate) async fn four_at_a_time<T>(
    requests: impl IntoIterator<Item = impl Future<Output = Result<T>>>,
) -> Result<Vec<T>> {
    let results: Vec<Result<T>> = futures::stream::iter(requests)
        .buffer_unordered(4)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Publishes a finished shard folder (or one part of a partitioned build)
/// to `remote`: the files its manifest lists and its tokenizer, then the
/// manifest.
pub fn publish_shards(local: &Path, remote: &Remote) -> Result<()> {
    let manifest = lvpipe_schemas::Manifest::from_json(&fs_err::read_to_string(
        local.join(lvpipe_schemas::Manifest::FILE_NAME),
    )?)?;
    let mut files: Vec<String> = manifest.shards.iter().map(|s| s.file.clone()).collect();
    files.push(TOKENIZER.into());
    block_on(remote.publish(local, &files, lvpipe_schemas::Manifest::FILE_NAME))
}

/// Publishes what `--finalize` wrote over parts already on `remote`: the
/// tokenizer, then the manifest that lists the parts' files.
pub fn publish_finalized(local: &Path, remote: &Remote) -> Result<()> {
    let files = [TOKENIZER.to_string()];
    block_on(remote.publish(local, &files, lvpipe_schemas::Manifest::FILE_NAME))
}

/// The tokenizer a shard folder carries beside its manifest.
const TOKENIZER: &str = "tokenizer.json";

/// Fetches the finished parts of a partitioned build on `remote` into
/// `local` (each part's files checked against its manifest), for
/// `--finalize` to check and join. A part without a manifest is left out:
/// finalize names it.
pub fn fetch_parts(remote: &Remote, local: &Path) -> Result<()> {
    block_on(async {
        let listing = remote.list().await?;
        let parts: Vec<&str> = listing
            .iter()
            .filter_map(|(name, _)| name.strip_suffix(lvpipe_schemas::Manifest::FILE_NAME))
            .filter_map(|dir| dir.strip_suffix('/'))
            .filter(|dir| crate::Partition::from_dir_name(dir).is_some())
            .collect();
        for dir in parts {
            let part = remote.join(dir);
            let Some(text) = part.read(lvpipe_schemas::Manifest::FILE_NAME).await? else {
                continue;
            };
            let manifest = lvpipe_schemas::Manifest::from_json(&String::from_utf8_lossy(&text))?;
            let mut files: Vec<(String, u64, Option<String>)> = manifest
                .shards
                .iter()
                .map(|s| (s.file.clone(), s.bytes, Some(s.blake3.clone())))
                .collect();
            let tokenizer = format!("{dir}/{TOKENIZER}");
            if let Some((_, size)) = listing.iter().find(|(name, _)| *name == tokenizer) {
                files.push((TOKENIZER.into(), *size, None));
            }
            part.fetch(
                &local.join(dir),
                &files,
                lvpipe_schemas::Manifest::FILE_NAME,
            )
            .await?;
        }
        Ok(())
    })
}

/// Runs a storage future from synchronous code: on a runtime of its own,
/// or, called from a task of a multi-threaded runtime (DataFusion's), on
/// that one, with the task's worker handed over meanwhile.
pub fn block_on<F: Future>(future: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => tokio::task::block_in_place(|| handle.block_on(future)),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime starts")
            .block_on(future),
    }
}

/// The local folder that stands for `location`: the path itself, or a
/// folder of the cache named after the URL (where remote files are fetched
/// to, or staged before they are published).
pub fn local_folder(location: &Location, cache: &Path) -> PathBuf {
    match location {
        Location::Local(p) => p.clone(),
        Location::Remote(r) => {
            let key = blake3::hash(r.url().as_bytes()).to_hex();
            let tail: String = r
                .url()
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
                .collect();
            cache.join(format!("{tail}-{}", &key[..12]))
        }
    }
}

/// The cache folder for remote shards and mixes: `$LVPIPE_CACHE`, else
/// `$XDG_CACHE_HOME/lvpipe`, else `~/.cache/lvpipe`.
pub fn default_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("LVPIPE_CACHE") {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("lvpipe")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_remote_paths_are_local() {
        assert!(matches!(
            Location::parse("shards").unwrap(),
            Location::Local(p) if p == Path::new("shards")
        ));
        assert!(matches!(
            Location::parse("file:///data/shards").unwrap(),
            Location::Local(p) if p == Path::new("/data/shards")
        ));
        let Location::Remote(r) = Location::parse("s3://bucket/a/shards/").unwrap() else {
            panic!("s3 is remote")
        };
        assert_eq!(r.url(), "s3://bucket/a/shards");
        assert_eq!(r.root().as_str(), "s3://bucket/");
        assert_eq!(
            r.path("part-00000-of-00002/x.parquet").as_ref(),
            "a/shards/part-00000-of-00002/x.parquet"
        );
        assert_eq!(
            r.join("stage-1").file_url("mix.json"),
            "s3://bucket/a/shards/stage-1/mix.json"
        );
        let err = Location::parse("ftp://host/x").unwrap_err().to_string();
        assert!(
            err.contains("ftp://host/x") && err.contains("s3://"),
            "{err}"
        );
    }
}
