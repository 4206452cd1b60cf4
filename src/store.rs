//! The lake's object store: one small synchronous interface over the
//! `object_store` backends (local directory, S3-compatible, in-memory).
//!
//! Owns: lake URLs, key layout helpers, retries with backoff, blake3
//! verification of content-addressed reads, and compare-and-swap puts for
//! refs on every backend. Knows nothing of trees, commits or chunks beyond
//! "this key must hash to this value".
//!
//! Callers are plain threads (CLI, FUSE workers); every call runs on one
//! shared tokio runtime through `block_on`, so it must never be called from
//! inside that runtime.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use parking_lot::Mutex;

use crate::hash::Hash;

pub mod doctor;
pub mod faults;
pub mod sink;
pub mod source;

/// How many store requests a batch call keeps in flight. Local disks and
/// S3 both gain little past this on a 2-core machine, and it bounds memory.
const CONCURRENCY: usize = 32;

/// Transient failures are retried this many times, with exponential
/// backoff and jitter starting at `RETRY_BASE`.
const RETRIES: u32 = 5;
const RETRY_BASE: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not a lake URL: {0} (use file:///dir, s3://bucket/prefix or memory://name)")]
    BadUrl(String),
    #[error("object {0} is missing from the store")]
    Missing(String),
    #[error("object {key} is corrupt: its bytes hash to {actual}, not {expected}")]
    Corrupt {
        key: String,
        expected: String,
        actual: String,
    },
    #[error("object {0} already exists")]
    AlreadyExists(String),
    #[error("cannot write to {0}: the bucket (or directory) does not exist")]
    NoBucket(String),
    #[error("store error on {key}: {source}")]
    Backend {
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("local store error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The version of a mutable object (a ref), for compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub e_tag: Option<String>,
    pub version: Option<String>,
}

/// The outcome of a compare-and-swap put.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cas {
    Done(Version),
    /// The object was not at the expected version: someone else moved it.
    Lost,
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            // Store calls are I/O bound; a few workers keep many requests in
            // flight without competing with FUSE threads for the 2 cores.
            .worker_threads(4)
            .thread_name("tarn-io")
            .on_thread_start(crate::thread_class::leave_inherited_idle)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// Aborts a task on the shared runtime when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Run a future to completion on the shared I/O runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

/// In-memory lakes are shared by name within one process, so a test can
/// open `memory://x` twice and see one lake.
fn memory_lake(name: &str) -> Arc<dyn ObjectStore> {
    static LAKES: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    LAKES
        .get_or_init(Default::default)
        .lock()
        .entry(name.to_string())
        .or_insert_with(|| Arc::new(object_store::memory::InMemory::new()))
        .clone()
}

/// Where refs get their compare-and-swap from.
#[derive(Debug, Clone)]
enum RefCas {
    /// S3 and memory: conditional puts (`PutMode::Update` / `Create`).
    Conditional,
    /// Local directory: `object_store` has no `PutMode::Update` there, so a
    /// ref is replaced by write-to-temp + rename under an exclusive `flock`
    /// on a lock file, which serialises every process on the machine.
    LocalLock { root: PathBuf },
}

/// A handle on one lake: an object store plus the key prefix of the lake.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: String,
    refs: RefCas,
    url: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.url)
    }
}

impl Store {
    /// Open a lake by URL: `file:///dir` (or a plain absolute path),
    /// `s3://bucket/prefix` (reads the usual AWS_* environment), `memory://name`.
    pub fn open(url: &str) -> Result<Store> {
        let bad = || StoreError::BadUrl(url.to_string());
        if url.starts_with('/') {
            return Self::open_local(FsPath::new(url), url);
        }
        let parsed = url::Url::parse(url).map_err(|_| bad())?;
        match parsed.scheme() {
            "file" => {
                let path = parsed.to_file_path().map_err(|_| bad())?;
                Self::open_local(&path, url)
            }
            "memory" => {
                let name = format!("{}{}", parsed.host_str().unwrap_or(""), parsed.path());
                Ok(Store {
                    inner: memory_lake(&name),
                    prefix: String::new(),
                    refs: RefCas::Conditional,
                    url: url.to_string(),
                })
            }
            "s3" => {
                let bucket = parsed
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(bad)?;
                let s3 = s3_builder(bucket)
                    .build()
                    .map_err(|e| StoreError::Backend {
                        key: url.to_string(),
                        source: e,
                    })?;
                Ok(Store {
                    inner: Arc::new(s3),
                    prefix: parsed.path().trim_matches('/').to_string(),
                    refs: RefCas::Conditional,
                    url: url.to_string(),
                })
            }
            _ => Err(bad()),
        }
    }

    /// A lake over any object store that supports conditional puts
    /// (`PutMode::Create` and `Update`), e.g. a fault-injecting wrapper in
    /// tests. `url` only names it in messages.
    pub fn over(inner: Arc<dyn ObjectStore>, url: &str) -> Store {
        Store {
            inner,
            prefix: String::new(),
            refs: RefCas::Conditional,
            url: url.to_string(),
        }
    }

    fn open_local(path: &FsPath, url: &str) -> Result<Store> {
        fs::create_dir_all(path).map_err(|e| StoreError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        let root = path.canonicalize().map_err(|e| StoreError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        let local = object_store::local::LocalFileSystem::new_with_prefix(&root).map_err(|e| {
            StoreError::Backend {
                key: url.to_string(),
                source: e,
            }
        })?;
        Ok(Store {
            inner: Arc::new(local),
            prefix: String::new(),
            refs: RefCas::LocalLock { root },
            url: url.to_string(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Is the lake a directory on this machine (its objects plain files,
    /// read and written on the calling thread: see `mod local`)?
    pub fn is_local(&self) -> bool {
        self.local_path("").is_some()
    }

    /// Where an object lives on this machine's disk, for a local-directory
    /// lake (`None` for any other store).
    pub fn local_path(&self, key: &str) -> Option<PathBuf> {
        match &self.refs {
            RefCas::LocalLock { root } if self.prefix.is_empty() => Some(root.join(key)),
            _ => None,
        }
    }

    fn path(&self, key: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(key)
        } else {
            Path::from(format!("{}/{}", self.prefix, key))
        }
    }

    fn strip(&self, path: &Path) -> String {
        let s = path.as_ref();
        if self.prefix.is_empty() {
            s.to_string()
        } else {
            s.strip_prefix(&self.prefix)
                .map(|r| r.trim_start_matches('/').to_string())
                .unwrap_or_else(|| s.to_string())
        }
    }

    fn backend(key: &str, e: object_store::Error) -> StoreError {
        match e {
            object_store::Error::NotFound { .. } => StoreError::Missing(key.to_string()),
            object_store::Error::AlreadyExists { .. } => StoreError::AlreadyExists(key.to_string()),
            e => StoreError::Backend {
                key: key.to_string(),
                source: e,
            },
        }
    }

    /// Read an object; `None` if it does not exist.
    pub fn get(&self, key: &str) -> Result<Option<Bytes>> {
        if let Some(path) = self.local_path(key) {
            return local::read(&path);
        }
        Ok(self.get_versioned(key)?.map(|(b, _)| b))
    }

    /// Read an object with its version (for a later compare-and-swap).
    pub fn get_versioned(&self, key: &str) -> Result<Option<(Bytes, Version)>> {
        if let Some(path) = self.local_path(key) {
            let Some(bytes) = local::read(&path)? else {
                return Ok(None);
            };
            // Local CAS compares content, not inode/mtime e-tags.
            let v = Version {
                e_tag: Some(Hash::of(&bytes).to_hex()),
                version: None,
            };
            return Ok(Some((bytes, v)));
        }
        let path = self.path(key);
        let res = block_on(retry(|| async {
            let r = self.inner.get(&path).await?;
            let v = Version {
                e_tag: r.meta.e_tag.clone(),
                version: r.meta.version.clone(),
            };
            Ok((r.bytes().await?, v))
        }));
        match res {
            Ok((bytes, v)) => Ok(Some((bytes, v))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Self::backend(key, e)),
        }
    }

    /// Read a content-addressed object and verify that its bytes hash to `hash`.
    pub fn get_verified(&self, key: &str, hash: &Hash) -> Result<Bytes> {
        let bytes = self
            .get(key)?
            .ok_or_else(|| StoreError::Missing(key.to_string()))?;
        verify(key, hash, bytes)
    }

    /// Read a byte range of an object (no verification: callers verify whole chunks).
    pub fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        let path = self.path(key);
        block_on(retry(|| self.inner.get_range(&path, range.clone())))
            .map_err(|e| Self::backend(key, e))
    }

    /// Size of an object, `None` if missing.
    pub fn size(&self, key: &str) -> Result<Option<u64>> {
        if let Some(path) = self.local_path(key) {
            return local::size(&path);
        }
        let path = self.path(key);
        match block_on(retry(|| self.inner.head(&path))) {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Self::backend(key, e)),
        }
    }

    pub fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.size(key)?.is_some())
    }

    /// Unconditional put (for objects only one writer ever names, e.g. `lake.json` at init).
    pub fn put(&self, key: &str, bytes: Bytes) -> Result<()> {
        if let Some(path) = self.local_path(key) {
            return local::put(&path, &bytes, false).map(|_| ());
        }
        let path = self.path(key);
        block_on(retry(|| {
            self.inner.put(&path, PutPayload::from_bytes(bytes.clone()))
        }))
        .map(|_| ())
        .map_err(|e| Self::backend(key, e))
    }

    /// Create-only put. Returns false if another object was there already;
    /// true if ours is there now, including when a retried attempt finds the
    /// bytes an earlier one stored before its answer was lost.
    pub fn put_if_absent(&self, key: &str, bytes: Bytes) -> Result<bool> {
        if let Some(path) = self.local_path(key) {
            return local::put(&path, &bytes, true);
        }
        let path = self.path(key);
        let sent = std::sync::atomic::AtomicU32::new(0);
        let res = block_on(retry(|| {
            sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.inner.put_opts(
                &path,
                PutPayload::from_bytes(bytes.clone()),
                PutOptions::from(PutMode::Create),
            )
        }));
        match res {
            Ok(_) => Ok(true),
            // Creating a key never finds it missing: the bucket is.
            Err(object_store::Error::NotFound { .. }) => {
                Err(StoreError::NoBucket(self.url.clone()))
            }
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => {
                if sent.into_inner() == 1 {
                    return Ok(false);
                }
                Ok(self.get(key)?.is_some_and(|now| now == bytes))
            }
            Err(e) => Err(Self::backend(key, e)),
        }
    }

    /// Store content-addressed objects that may already exist, many at once.
    /// Existing objects are skipped without re-sending their bytes.
    /// Returns how many were new.
    pub fn put_content_many(&self, objects: Vec<(String, Bytes)>) -> Result<usize> {
        if objects.len() <= LOCAL_INLINE_PUTS && self.is_local() {
            let mut new = 0;
            for (key, bytes) in objects {
                let path = self.local_path(&key).expect("a local lake");
                if local::size(&path)?.is_none() {
                    new += local::put(&path, &bytes, true)? as usize;
                }
            }
            return Ok(new);
        }
        let results: Vec<Result<bool>> = block_on(
            futures::stream::iter(objects.into_iter().map(|(key, bytes)| async move {
                let path = self.path(&key);
                match retry(|| self.inner.head(&path)).await {
                    Ok(_) => return Ok(false),
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(Self::backend(&key, e)),
                }
                let res = retry(|| {
                    self.inner.put_opts(
                        &path,
                        PutPayload::from_bytes(bytes.clone()),
                        PutOptions::from(PutMode::Create),
                    )
                })
                .await;
                match res {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::AlreadyExists { .. })
                    | Err(object_store::Error::Precondition { .. }) => Ok(false),
                    Err(e) => Err(Self::backend(&key, e)),
                }
            }))
            .buffer_unordered(CONCURRENCY)
            .collect(),
        );
        let mut new = 0;
        for r in results {
            new += r? as usize;
        }
        Ok(new)
    }

    /// Read many objects at once, in the order asked; missing ones are `None`.
    pub fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Bytes>>> {
        let results: Vec<Result<Option<Bytes>>> = block_on(self.fetches(keys).collect());
        results.into_iter().collect()
    }

    /// Read objects, handing each to `f` in the order of `keys` as it
    /// arrives (`None`: it does not exist), so only a few are held at once:
    /// one at a time from a local lake, `CONCURRENCY` in flight from others.
    /// `f` runs on the calling thread, so it may use the store itself.
    pub fn get_each<E: From<StoreError>>(
        &self,
        keys: &[String],
        mut f: impl FnMut(usize, Option<Bytes>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        if self.is_local() {
            for (i, key) in keys.iter().enumerate() {
                f(i, self.get(key)?)?;
            }
            return Ok(());
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel(CONCURRENCY);
        let (store, keys) = (self.clone(), keys.to_vec());
        let reads = runtime().spawn(async move {
            let mut bodies = store.fetches(&keys);
            while let Some(body) = bodies.next().await {
                if tx.send(body).await.is_err() {
                    return; // the caller stopped
                }
            }
        });
        // Stop reading when `f` fails (or panics).
        let _stop = AbortOnDrop(reads);
        let mut i = 0;
        while let Some(body) = rx.blocking_recv() {
            f(i, body?)?;
            i += 1;
        }
        Ok(())
    }

    /// Reads of `keys` through the backend, `CONCURRENCY` at once, in order.
    fn fetches<'a>(
        &'a self,
        keys: &'a [String],
    ) -> impl futures::Stream<Item = Result<Option<Bytes>>> + 'a {
        futures::stream::iter(keys.iter().map(move |key| async move {
            let path = self.path(key);
            match retry(|| async { self.inner.get(&path).await?.bytes().await }).await {
                Ok(b) => Ok(Some(b)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(Self::backend(key, e)),
            }
        }))
        .buffered(CONCURRENCY)
    }

    /// Compare-and-swap put of a mutable object (a ref). `expected = None`
    /// means "create; the object must not exist yet".
    pub fn cas(&self, key: &str, expected: Option<&Version>, bytes: Bytes) -> Result<Cas> {
        match &self.refs {
            RefCas::LocalLock { root } => local_cas(root, key, expected, &bytes),
            RefCas::Conditional => {
                let path = self.path(key);
                let mode = match expected {
                    None => PutMode::Create,
                    Some(v) => PutMode::Update(UpdateVersion {
                        e_tag: v.e_tag.clone(),
                        version: v.version.clone(),
                    }),
                };
                // Not the generic retry layer: a conditional put that failed
                // in transit may still have landed, and retrying it blindly
                // would report a false conflict. So after a transient error,
                // look: the ref holding exactly our bytes (they name a fresh
                // token, so no one else writes them) means it landed; else
                // the same conditional put is safe to send again.
                let mut attempt = 0;
                loop {
                    let res = block_on(self.inner.put_opts(
                        &path,
                        PutPayload::from_bytes(bytes.clone()),
                        PutOptions::from(mode.clone()),
                    ));
                    match res {
                        Ok(r) => {
                            return Ok(Cas::Done(Version {
                                e_tag: r.e_tag,
                                version: r.version,
                            }))
                        }
                        Err(object_store::Error::AlreadyExists { .. })
                        | Err(object_store::Error::Precondition { .. }) => return Ok(Cas::Lost),
                        Err(e) if attempt < RETRIES && is_transient(&e) => {
                            tracing::debug!(error = %e, key, "ref update failed in transit; checking whether it landed");
                            if let Some((now, v)) = self.get_versioned(key)? {
                                if now == bytes {
                                    return Ok(Cas::Done(v));
                                }
                            }
                            let cap = RETRY_BASE * 2u32.pow(attempt);
                            std::thread::sleep(cap.mul_f64(rand::random::<f64>()));
                            attempt += 1;
                        }
                        Err(e) => return Err(Self::backend(key, e)),
                    }
                }
            }
        }
    }

    /// Keys under `prefix` (recursive), relative to the lake root, sorted.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let path = self.path(prefix);
        let metas: Vec<object_store::ObjectMeta> =
            block_on(retry(|| self.inner.list(Some(&path)).try_collect()))
                .map_err(|e| Self::backend(prefix, e))?;
        let mut keys: Vec<String> = metas.iter().map(|m| self.strip(&m.location)).collect();
        keys.sort();
        Ok(keys)
    }

    /// The immediate "subdirectory" names under `prefix`, sorted.
    pub fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        let path = self.path(prefix);
        let res = block_on(retry(|| self.inner.list_with_delimiter(Some(&path))))
            .map_err(|e| Self::backend(prefix, e))?;
        let mut names: Vec<String> = res
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    /// The immediate object names under `prefix`, sorted.
    pub fn list_files(&self, prefix: &str) -> Result<Vec<String>> {
        if let Some(dir) = self.local_path(prefix) {
            return local::list_files(&dir);
        }
        let path = self.path(prefix);
        let res = block_on(retry(|| self.inner.list_with_delimiter(Some(&path))))
            .map_err(|e| Self::backend(prefix, e))?;
        let mut names: Vec<String> = res
            .objects
            .iter()
            .filter_map(|m| m.location.filename().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    pub fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key);
        match block_on(retry(|| self.inner.delete(&path))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Self::backend(key, e)),
        }
    }

    /// Delete every object under `prefix`, many requests at once.
    pub fn delete_prefix(&self, prefix: &str) -> Result<()> {
        let keys = self.list(prefix)?;
        let results: Vec<Result<()>> = block_on(
            futures::stream::iter(keys.iter().map(|key| async move {
                let path = self.path(key);
                match retry(|| self.inner.delete(&path)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(Self::backend(key, e)),
                }
            }))
            .buffer_unordered(CONCURRENCY)
            .collect(),
        );
        results.into_iter().collect()
    }
}

/// Check that `bytes` hash to `hash`; never hand out bytes that do not.
pub fn verify(key: &str, hash: &Hash, bytes: Bytes) -> Result<Bytes> {
    let actual = Hash::of(&bytes);
    if &actual != hash {
        return Err(StoreError::Corrupt {
            key: key.to_string(),
            expected: hash.to_hex(),
            actual: actual.to_hex(),
        });
    }
    Ok(bytes)
}

/// An S3 client for a bucket from the usual AWS_* environment, with
/// retries (the region defaults to us-east-1, as S3-compatible servers expect).
fn s3_builder(bucket: &str) -> object_store::aws::AmazonS3Builder {
    let mut builder = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_retry(object_store::RetryConfig {
            max_retries: RETRIES as usize,
            ..Default::default()
        });
    if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none()
    {
        builder = builder.with_region("us-east-1");
    }
    builder
}

fn is_transient(e: &object_store::Error) -> bool {
    matches!(
        e,
        object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }
    )
}

/// Retry transient errors with exponential backoff and full jitter.
async fn retry<T, F, Fut>(mut op: F) -> object_store::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = object_store::Result<T>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Err(e) if attempt < RETRIES && is_transient(&e) => {
                let cap = RETRY_BASE * 2u32.pow(attempt);
                let wait = cap.mul_f64(rand::random::<f64>());
                tracing::debug!(error = %e, attempt, "transient store error; retrying");
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            r => return r,
        }
    }
}

/// Up to this many objects, a local lake stores them one after another on
/// the calling thread; more go to the blocking pool, several at once.
const LOCAL_INLINE_PUTS: usize = 8;

/// A local-directory lake's objects are plain files under its root, read
/// and written here on the calling thread. object_store's local backend
/// runs every call on a blocking-pool thread: two thread switches a call,
/// about ten per synchronous close of a small file in a mount, which were
/// most of that close's time. Same layout as that backend, and its staging
/// (`KEY#N`, published by a hard link when create-only, else a rename)
/// where a create-only put cannot use a nameless file, so both can be used
/// on one lake; keys are names and hashes that need no escaping.
mod local {
    use super::{io_err, Result};
    use bytes::Bytes;
    use std::fs;
    use std::io::{ErrorKind, Write};
    use std::path::{Path, PathBuf};

    pub fn read(path: &Path) -> Result<Option<Bytes>> {
        match fs::read(path) {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if e.kind() == ErrorKind::NotFound || e.kind() == ErrorKind::IsADirectory => {
                Ok(None)
            }
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// The names of the objects in a directory, sorted, as object_store's
    /// backend lists them (files, not a put's `KEY#N` staging file) but
    /// without its `stat` of every one: a mount refreshing a branch lists
    /// its staged batches, one per synchronous close.
    pub fn list_files(dir: &Path) -> Result<Vec<String>> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(dir)(e)),
        };
        let mut names = Vec::new();
        for e in entries {
            let e = e.map_err(io_err(dir))?;
            if !e.file_type().map_err(io_err(dir))?.is_file() {
                continue;
            }
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            let staging = name
                .split_once('#')
                .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if !staging {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    pub fn size(path: &Path) -> Result<Option<u64>> {
        match fs::metadata(path) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// Write `bytes` at `path`; with `create_only`, false if an object was
    /// there already (and it is left as it was).
    pub fn put(path: &Path, bytes: &[u8], create_only: bool) -> Result<bool> {
        if create_only {
            if let Some(done) = put_anonymous(path, bytes)? {
                return Ok(done);
            }
        }
        let (mut file, staging) = staging_file(path)?;
        let written = file.write_all(bytes).map_err(io_err(&staging));
        drop(file);
        let published = written.and_then(|()| {
            if create_only {
                match fs::hard_link(&staging, path) {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
                    Err(e) => Err(io_err(path)(e)),
                }
            } else {
                fs::rename(&staging, path)
                    .map(|()| true)
                    .map_err(io_err(path))
            }
        });
        if create_only || published.is_err() {
            let _ = fs::remove_file(&staging);
        }
        published
    }

    /// A create-only put through a nameless file (`O_TMPFILE`), linked at
    /// `path` once written: one directory entry made instead of a staging
    /// name made, linked and removed (a synchronous close of a small file
    /// puts one such object: 22-24 -> 19 us each on ext4), and nothing left
    /// behind if the process dies midway. `None` where this cannot be done
    /// (no such directory yet, a file system without `O_TMPFILE`, no
    /// `/proc`): the caller then uses a `PATH#N` file.
    fn put_anonymous(path: &Path, bytes: &[u8]) -> Result<Option<bool>> {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::io::{AsRawFd, FromRawFd};
        let dir = path.parent().expect("an object key has a directory");
        let (Ok(dir_c), Ok(to)) = (
            CString::new(dir.as_os_str().as_bytes()),
            CString::new(path.as_os_str().as_bytes()),
        ) else {
            return Ok(None);
        };
        // SAFETY: a NUL-terminated path; the descriptor is owned by `file`
        // from here on.
        let fd = unsafe {
            libc::open(
                dir_c.as_ptr(),
                libc::O_TMPFILE | libc::O_WRONLY | libc::O_CLOEXEC,
                0o666 as libc::c_uint,
            )
        };
        if fd < 0 {
            return Ok(None);
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        let mut file = unsafe { fs::File::from_raw_fd(fd) };
        file.write_all(bytes).map_err(io_err(path))?;
        let from = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .expect("no NUL in a number");
        // SAFETY: two NUL-terminated paths.
        let linked = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if linked == 0 {
            return Ok(Some(true));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EEXIST) => Ok(Some(false)),
            // No /proc, or a file system that will not link it.
            Some(libc::ENOENT | libc::EPERM | libc::EXDEV | libc::EOPNOTSUPP) => Ok(None),
            _ => Err(io_err(path)(e)),
        }
    }

    /// A new file `PATH#N` beside `path` (its directories made as needed).
    fn staging_file(path: &Path) -> Result<(fs::File, PathBuf)> {
        let mut n = 1u32;
        loop {
            let mut name = path.as_os_str().to_owned();
            name.push(format!("#{n}"));
            let staging = PathBuf::from(name);
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&staging)
            {
                Ok(f) => return Ok((f, staging)),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => n += 1,
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    let dir = path.parent().expect("an object key has a directory");
                    fs::create_dir_all(dir).map_err(io_err(dir))?;
                }
                Err(e) => return Err(io_err(&staging)(e)),
            }
        }
    }
}

fn io_err(path: &FsPath) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::Io {
        path: path.display().to_string(),
        source: e,
    }
}

/// Compare-and-swap of a ref file in a local lake directory: lock, compare
/// the current content's hash with the expected version, write a temp file,
/// fsync, rename over the ref. The lock file lives under `.locks/` so ref
/// listings never see it.
fn local_cas(root: &FsPath, key: &str, expected: Option<&Version>, bytes: &[u8]) -> Result<Cas> {
    let target = root.join(key);
    let locks = root.join(".locks");
    fs::create_dir_all(&locks).map_err(io_err(&locks))?;
    let lock_path = locks.join(Hash::of(key.as_bytes()).to_hex());
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    // SAFETY: flock on a file descriptor we own; released when `lock` drops.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io_err(&lock_path)(std::io::Error::last_os_error()));
    }
    let current = match fs::read(&target) {
        Ok(b) => Some(Hash::of(&b).to_hex()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(&target)(e)),
    };
    let matches = match (expected, &current) {
        (None, None) => true,
        (Some(v), Some(cur)) => v.e_tag.as_deref() == Some(cur.as_str()),
        _ => false,
    };
    if !matches {
        return Ok(Cas::Lost);
    }
    let dir = target.parent().expect("ref key has a parent");
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dir.join(format!(".tmp.{}", ulid::Ulid::new()));
    let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, &target).map_err(io_err(&target))?;
    drop(lock);
    Ok(Cas::Done(Version {
        e_tag: Some(Hash::of(bytes).to_hex()),
        version: None,
    }))
}

#[cfg(test)]
pub(crate) mod conformance {
    //! One conformance suite that every backend runs.
    use super::*;

    pub fn run(store: &Store) {
        // get / put / missing
        assert_eq!(store.get("a/missing").unwrap(), None);
        store.put("a/x", Bytes::from_static(b"one")).unwrap();
        assert_eq!(
            store.get("a/x").unwrap().unwrap(),
            Bytes::from_static(b"one")
        );
        assert_eq!(store.size("a/x").unwrap(), Some(3));
        assert_eq!(
            store.get_range("a/x", 1..3).unwrap(),
            Bytes::from_static(b"ne")
        );

        // create-only
        assert!(store
            .put_if_absent("a/y", Bytes::from_static(b"1"))
            .unwrap());
        assert!(!store
            .put_if_absent("a/y", Bytes::from_static(b"2"))
            .unwrap());
        assert_eq!(store.get("a/y").unwrap().unwrap(), Bytes::from_static(b"1"));

        // verified reads
        let h = Hash::of(b"content");
        store.put("c/k", Bytes::from_static(b"content")).unwrap();
        assert!(store.get_verified("c/k", &h).is_ok());
        store.put("c/bad", Bytes::from_static(b"tampered")).unwrap();
        assert!(matches!(
            store.get_verified("c/bad", &h),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            store.get_verified("c/none", &h),
            Err(StoreError::Missing(_))
        ));

        // compare-and-swap
        let Cas::Done(v1) = store.cas("r/ref", None, Bytes::from_static(b"v1")).unwrap() else {
            panic!("create failed")
        };
        assert_eq!(
            store.cas("r/ref", None, Bytes::from_static(b"zz")).unwrap(),
            Cas::Lost
        );
        let (_, cur) = store.get_versioned("r/ref").unwrap().unwrap();
        let Cas::Done(_) = store
            .cas("r/ref", Some(&cur), Bytes::from_static(b"v2"))
            .unwrap()
        else {
            panic!("update failed")
        };
        // v1's version is stale now.
        assert_eq!(
            store
                .cas("r/ref", Some(&v1), Bytes::from_static(b"v3"))
                .unwrap(),
            Cas::Lost
        );
        assert_eq!(
            store.get("r/ref").unwrap().unwrap(),
            Bytes::from_static(b"v2")
        );

        // listing
        store.put("l/d1/x", Bytes::new()).unwrap();
        store.put("l/d2/y", Bytes::new()).unwrap();
        store.put("l/f", Bytes::new()).unwrap();
        assert_eq!(store.list_dirs("l").unwrap(), vec!["d1", "d2"]);
        assert_eq!(store.list_files("l").unwrap(), vec!["f"]);
        assert_eq!(store.list("l").unwrap(), vec!["l/d1/x", "l/d2/y", "l/f"]);
        store.delete_prefix("l").unwrap();
        assert!(store.list("l").unwrap().is_empty());

        // batch content puts skip existing objects
        let objs = vec![
            ("b/1".to_string(), Bytes::from_static(b"1")),
            ("b/2".to_string(), Bytes::from_static(b"2")),
        ];
        assert_eq!(store.put_content_many(objs.clone()).unwrap(), 2);
        assert_eq!(store.put_content_many(objs).unwrap(), 0);
        let got = store
            .get_many(&["b/2".to_string(), "b/none".to_string()])
            .unwrap();
        assert_eq!(got, vec![Some(Bytes::from_static(b"2")), None]);
        // One by one, in order, and an error from the caller stops it.
        let keys: Vec<String> = ["b/1", "b/none", "b/2"].map(String::from).to_vec();
        let mut seen = Vec::new();
        store
            .get_each(&keys, |i, body| {
                seen.push((i, body));
                Ok::<(), StoreError>(())
            })
            .unwrap();
        assert_eq!(
            seen,
            vec![
                (0, Some(Bytes::from_static(b"1"))),
                (1, None),
                (2, Some(Bytes::from_static(b"2")))
            ]
        );
        let mut calls = 0;
        let stopped = store.get_each(&keys, |_, _| {
            calls += 1;
            Err(StoreError::Missing("stop".into()))
        });
        assert!(matches!(stopped, Err(StoreError::Missing(_))));
        assert_eq!(calls, 1);
    }

    /// Many threads race to bump a counter ref by CAS; no increment is lost.
    pub fn cas_race(store: &Store) {
        store
            .cas("race/ctr", None, Bytes::from_static(b"0"))
            .unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = store.clone();
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        loop {
                            let (b, v) = s.get_versioned("race/ctr").unwrap().unwrap();
                            let n: u64 = std::str::from_utf8(&b).unwrap().parse().unwrap();
                            let next = Bytes::from((n + 1).to_string());
                            if let Cas::Done(_) = s.cas("race/ctr", Some(&v), next).unwrap() {
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(
            store.get("race/ctr").unwrap().unwrap(),
            Bytes::from_static(b"100")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_threads_leave_a_class_inherited_from_an_idle_caller() {
        let idle: Vec<bool> = std::thread::spawn(|| {
            if !crate::thread_class::may_leave_idle() || !crate::thread_class::set_idle(true) {
                return Vec::new();
            }
            // All at once: more than the pool had, so this idle thread
            // starts new ones.
            let all = Arc::new(std::sync::Barrier::new(64));
            let tasks: Vec<_> = (0..64)
                .map(|_| {
                    let all = all.clone();
                    runtime().spawn_blocking(move || {
                        all.wait();
                        crate::thread_class::is_idle()
                    })
                })
                .collect();
            tasks
                .into_iter()
                .map(|t| runtime().block_on(t).unwrap())
                .collect()
        })
        .join()
        .unwrap();
        assert!(!idle.contains(&true), "{idle:?}");
    }

    #[test]
    fn memory_backend_conforms() {
        let s = Store::open("memory://conformance").unwrap();
        conformance::run(&s);
        conformance::cas_race(&s);
    }

    #[test]
    fn local_backend_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&format!("file://{}", dir.path().display())).unwrap();
        conformance::run(&s);
        conformance::cas_race(&s);
    }

    #[test]
    fn a_local_lakes_direct_writes_are_what_object_stores_backend_reads() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&format!("file://{}", dir.path().display())).unwrap();
        assert!(s.put_if_absent("x/one", Bytes::from_static(b"1")).unwrap());
        assert!(!s.put_if_absent("x/one", Bytes::from_static(b"2")).unwrap());
        // Into a directory that exists: through a nameless file.
        assert!(s.put_if_absent("x/four", Bytes::from_static(b"4")).unwrap());
        assert!(!s.put_if_absent("x/four", Bytes::from_static(b"5")).unwrap());
        s.put("x/two", Bytes::from_static(b"22")).unwrap();
        s.put("x/two", Bytes::from_static(b"two")).unwrap();
        assert_eq!(
            s.put_content_many(vec![
                ("x/one".into(), Bytes::from_static(b"1")),
                ("y/three".into(), Bytes::from_static(b"3")),
            ])
            .unwrap(),
            1
        );
        // Through object_store's own local backend: same objects, and no
        // staging file left beside them.
        let backend = |key: &str| block_on(s.inner.get(&Path::from(key))).unwrap().bytes();
        assert_eq!(
            block_on(backend("x/one")).unwrap(),
            Bytes::from_static(b"1")
        );
        assert_eq!(
            block_on(backend("x/two")).unwrap(),
            Bytes::from_static(b"two")
        );
        assert_eq!(
            block_on(backend("x/four")).unwrap(),
            Bytes::from_static(b"4")
        );
        assert_eq!(s.list("").unwrap(), ["x/four", "x/one", "x/two", "y/three"]);
        // Listing one directory reads names only; it lists what the
        // backend lists (not a subdirectory, not a put's staging file).
        fs::create_dir(dir.path().join("x/sub")).unwrap();
        fs::write(dir.path().join("x/sub/five"), b"5").unwrap();
        fs::write(dir.path().join("x/six#12"), b"6").unwrap();
        let listed = block_on(s.inner.list_with_delimiter(Some(&Path::from("x")))).unwrap();
        let mut backend: Vec<_> = listed
            .objects
            .iter()
            .map(|m| m.location.filename().unwrap().to_string())
            .collect();
        backend.sort();
        assert_eq!(backend, ["four", "one", "two"]);
        assert_eq!(s.list_files("x").unwrap(), backend);
        assert_eq!(s.list_files("none").unwrap(), Vec::<String>::new());
        fs::remove_dir_all(dir.path().join("x/sub")).unwrap();
        fs::remove_file(dir.path().join("x/six#12")).unwrap();
        let mut files: Vec<_> = walkdir(dir.path());
        files.sort();
        assert_eq!(files, ["x/four", "x/one", "x/two", "y/three"]);
        assert_eq!(s.size("x/two").unwrap(), Some(3));
        assert_eq!(s.size("x").unwrap(), None, "a directory is no object");
        assert_eq!(s.get("x/none").unwrap(), None);
    }

    fn walkdir(root: &FsPath) -> Vec<String> {
        let mut out = Vec::new();
        let mut dirs = vec![root.to_path_buf()];
        while let Some(d) = dirs.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                } else {
                    let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                    out.push(rel);
                }
            }
        }
        out
    }

    #[test]
    fn bad_urls_are_rejected() {
        for u in ["ftp://x", "nonsense", "s3://"] {
            assert!(matches!(Store::open(u), Err(StoreError::BadUrl(_))), "{u}");
        }
    }

    #[test]
    fn s3_backend_conforms_when_a_server_is_given() {
        // scripts/test.sh starts a loopback S3 server and sets TARN_TEST_S3.
        let Ok(url) = std::env::var("TARN_TEST_S3") else {
            eprintln!("TARN_TEST_S3 not set; S3 conformance runs in scripts/test.sh");
            return;
        };
        let s = Store::open(&format!("{url}/conformance-{}", ulid::Ulid::new())).unwrap();
        conformance::run(&s);
        conformance::cas_race(&s);
    }
}
