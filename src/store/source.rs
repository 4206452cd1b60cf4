//! Sources outside the lake, read in place: a local directory or an S3
//! prefix that `tarn import` lists and that External entries point into.
//!
//! Read-only by construction: nothing here can write, delete or modify an
//! object (there is no such call). Every read names the identity the object
//! had when it was imported (S3 ETag or version id; for local files inode,
//! mtime and size) and fails with `SourceError::Changed` instead of
//! returning bytes of another version.

use std::collections::HashMap;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use futures::stream::StreamExt;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};
use parking_lot::Mutex;

use super::block_on;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("not a source URL: {0} (use file:///dir/ or s3://bucket/prefix/)")]
    BadUrl(String),
    #[error("{url} changed since it was imported (was {expected}, now {found}): refusing to serve other bytes; import it again")]
    Changed {
        url: String,
        expected: String,
        found: String,
    },
    #[error("{0} is gone from its source")]
    Missing(String),
    #[error("{url}: {source}")]
    Io {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: {source}")]
    Backend {
        url: String,
        #[source]
        source: object_store::Error,
    },
}

pub type Result<T> = std::result::Result<T, SourceError>;

/// One object found by a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceObject {
    /// Path below the listed prefix, `/`-separated.
    pub rel: String,
    /// The object's own URL (what an External entry records).
    pub url: String,
    pub size: u64,
    /// Nanoseconds since the Unix epoch.
    pub mtime: i64,
    /// Unix permission bits (0o644 for S3 objects).
    pub mode: u32,
    /// S3 ETag, or `<inode>-<mtime ns>-<size>` (hex) for a local file.
    pub etag: Option<String>,
    /// S3 version id, where the bucket keeps versions.
    pub version: Option<String>,
}

/// A listable prefix of a source.
pub enum Source {
    Local { root: PathBuf },
    S3(S3Prefix),
}

/// A key prefix in an S3 bucket (no trailing `/`; empty for the bucket).
pub struct S3Prefix {
    pub store: Arc<dyn ObjectStore>,
    pub bucket: String,
    pub prefix: String,
}

impl S3Prefix {
    /// The key of `rel` under the prefix.
    pub fn key(&self, rel: &str) -> String {
        if self.prefix.is_empty() {
            rel.to_string()
        } else {
            format!("{}/{rel}", self.prefix)
        }
    }

    pub fn url(&self, key: &str) -> String {
        s3_url(&self.bucket, key)
    }
}

/// S3 clients by bucket, shared by every read of this process.
fn s3_bucket(bucket: &str) -> Result<Arc<dyn ObjectStore>> {
    static BUCKETS: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    let mut map = BUCKETS.get_or_init(Default::default).lock();
    if let Some(s) = map.get(bucket) {
        return Ok(s.clone());
    }
    let s3 = super::s3_builder(bucket)
        .build()
        .map_err(|e| SourceError::Backend {
            url: format!("s3://{bucket}"),
            source: e,
        })?;
    let s3: Arc<dyn ObjectStore> = Arc::new(s3);
    map.insert(bucket.to_string(), s3.clone());
    Ok(s3)
}

/// `file:///abs/path` or `s3://bucket/key` → where it lives.
pub(super) enum Location {
    Local(PathBuf),
    S3 {
        store: Arc<dyn ObjectStore>,
        bucket: String,
        key: String,
    },
}

pub(super) fn locate(url: &str) -> Result<Location> {
    let bad = || SourceError::BadUrl(url.to_string());
    let parsed = url::Url::parse(url).map_err(|_| bad())?;
    match parsed.scheme() {
        "file" => Ok(Location::Local(parsed.to_file_path().map_err(|_| bad())?)),
        "s3" => {
            let bucket = parsed
                .host_str()
                .filter(|b| !b.is_empty())
                .ok_or_else(bad)?;
            let key = percent_decode(parsed.path().trim_start_matches('/'));
            Ok(Location::S3 {
                store: s3_bucket(bucket)?,
                bucket: bucket.to_string(),
                key,
            })
        }
        _ => Err(bad()),
    }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// A local file's URL (absolute path, percent-encoded where needed).
fn file_url(path: &FsPath) -> String {
    url::Url::from_file_path(path)
        .map(|u| u.to_string())
        .unwrap_or_else(|_| format!("file://{}", path.display()))
}

fn s3_url(bucket: &str, key: &str) -> String {
    let mut u = url::Url::parse(&format!("s3://{bucket}/")).expect("bucket URL");
    u.set_path(key);
    u.to_string()
}

/// The identity of a local file: changes whenever its bytes may have.
fn local_identity(meta: &std::fs::Metadata) -> String {
    let mtime = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
    format!("{:x}-{:x}-{:x}", meta.ino(), mtime, meta.size())
}

impl Source {
    /// Open a source prefix for listing: `file:///dir/` (a directory) or
    /// `s3://bucket/prefix/`.
    pub fn open(url: &str) -> Result<Source> {
        match locate(url)? {
            Location::Local(root) => {
                let meta = std::fs::metadata(&root).map_err(|e| SourceError::Io {
                    url: url.to_string(),
                    source: e,
                })?;
                if !meta.is_dir() {
                    return Err(SourceError::Io {
                        url: url.to_string(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::NotADirectory,
                            "not a directory",
                        ),
                    });
                }
                Ok(Source::Local { root })
            }
            Location::S3 { store, bucket, key } => Ok(Source::S3(S3Prefix {
                store,
                bucket,
                prefix: key.trim_end_matches('/').to_string(),
            })),
        }
    }

    /// Every object under the prefix, depth first (each directory's names
    /// sorted for local sources; S3 lists in key order, page by page).
    /// Symlinks, sockets and other special files are skipped.
    pub fn list<E: From<SourceError>>(
        &self,
        mut each: impl FnMut(SourceObject) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        match self {
            Source::Local { root } => list_local(root, root, &mut each),
            Source::S3(S3Prefix {
                store,
                bucket,
                prefix,
            }) => {
                let path = Path::from(prefix.as_str());
                let strip = if prefix.is_empty() {
                    0
                } else {
                    prefix.len() + 1
                };
                block_on(async {
                    let mut stream = store.list(Some(&path));
                    while let Some(meta) = stream.next().await {
                        let meta = meta.map_err(|e| SourceError::Backend {
                            url: s3_url(bucket, prefix),
                            source: e,
                        })?;
                        let key = meta.location.as_ref();
                        let rel = key.get(strip..).unwrap_or("").to_string();
                        if rel.is_empty() || rel.ends_with('/') {
                            continue; // a "directory marker" object
                        }
                        each(SourceObject {
                            url: s3_url(bucket, key),
                            rel,
                            size: meta.size,
                            mtime: meta.last_modified.timestamp_nanos_opt().unwrap_or(0),
                            mode: 0o644,
                            etag: meta.e_tag.clone(),
                            version: meta.version.clone(),
                        })?;
                    }
                    Ok(())
                })
            }
        }
    }
}

fn list_local<E: From<SourceError>>(
    root: &FsPath,
    dir: &FsPath,
    each: &mut impl FnMut(SourceObject) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let io = |p: &FsPath| {
        let url = file_url(p);
        move |e| SourceError::Io { url, source: e }
    };
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .collect::<std::io::Result<_>>()
        .map_err(io(dir))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let ft = e.file_type().map_err(io(&path))?;
        if ft.is_dir() {
            list_local(root, &path, each)?;
        } else if ft.is_file() {
            let meta = e.metadata().map_err(io(&path))?;
            let rel = path
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            each(SourceObject {
                url: file_url(&path),
                rel,
                size: meta.size(),
                mtime: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
                mode: meta.mode() & 0o7777,
                etag: Some(local_identity(&meta)),
                version: None,
            })?;
        }
    }
    Ok(())
}

/// Bytes `[start, end)` of an imported object, only if it still is the
/// object that was imported (same identity and size).
pub fn read_range(
    url: &str,
    etag: Option<&str>,
    version: Option<&str>,
    size: u64,
    start: u64,
    end: u64,
) -> Result<Bytes> {
    let end = end.min(size);
    if start >= end {
        return Ok(Bytes::new());
    }
    match locate(url)? {
        Location::Local(path) => {
            let io = |e: std::io::Error| match e.kind() {
                std::io::ErrorKind::NotFound => SourceError::Missing(url.to_string()),
                _ => SourceError::Io {
                    url: url.to_string(),
                    source: e,
                },
            };
            let f = std::fs::File::open(&path).map_err(io)?;
            let check = |f: &std::fs::File| -> Result<()> {
                let found = local_identity(&f.metadata().map_err(io)?);
                match etag {
                    Some(expected) if expected != found => Err(SourceError::Changed {
                        url: url.to_string(),
                        expected: expected.to_string(),
                        found,
                    }),
                    _ => Ok(()),
                }
            };
            check(&f)?;
            let mut buf = vec![0u8; (end - start) as usize];
            f.read_exact_at(&mut buf, start).map_err(io)?;
            // A write in place during the read changes the mtime.
            check(&f)?;
            Ok(Bytes::from(buf))
        }
        Location::S3 { store, key, .. } => {
            let opts = GetOptions {
                if_match: etag.map(str::to_string),
                version: version.map(str::to_string),
                range: Some(GetRange::Bounded(start..end)),
                ..Default::default()
            };
            let path = Path::from(key.as_str());
            block_on(async {
                let got = store.get_opts(&path, opts).await;
                let got = match got {
                    Ok(g) => g,
                    Err(object_store::Error::Precondition { .. }) => {
                        let found = store
                            .head(&path)
                            .await
                            .ok()
                            .and_then(|m| m.e_tag)
                            .unwrap_or_else(|| "unknown".into());
                        return Err(SourceError::Changed {
                            url: url.to_string(),
                            expected: etag.unwrap_or("").to_string(),
                            found,
                        });
                    }
                    Err(object_store::Error::NotFound { .. }) => {
                        return Err(SourceError::Missing(url.to_string()))
                    }
                    Err(e) => {
                        return Err(SourceError::Backend {
                            url: url.to_string(),
                            source: e,
                        })
                    }
                };
                if got.meta.size != size {
                    return Err(SourceError::Changed {
                        url: url.to_string(),
                        expected: format!("{size} bytes"),
                        found: format!("{} bytes", got.meta.size),
                    });
                }
                got.bytes().await.map_err(|e| SourceError::Backend {
                    url: url.to_string(),
                    source: e,
                })
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_reads_local_files_in_place_and_notices_changes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/x.csv"), "hello world").unwrap();
        std::fs::write(dir.path().join("top.txt"), "t").unwrap();
        std::os::unix::fs::symlink("top.txt", dir.path().join("link")).unwrap();
        let src = Source::open(&file_url(dir.path())).unwrap();
        let mut seen = Vec::new();
        src.list(|o| {
            seen.push(o);
            Ok::<_, SourceError>(())
        })
        .unwrap();
        let rels: Vec<&str> = seen.iter().map(|o| o.rel.as_str()).collect();
        assert_eq!(rels, ["a/b/x.csv", "top.txt"]);
        let x = &seen[0];
        assert_eq!(x.size, 11);
        let read =
            |o: &SourceObject, a, b| read_range(&o.url, o.etag.as_deref(), None, o.size, a, b);
        assert_eq!(read(x, 6, 11).unwrap(), "world");
        assert_eq!(read(x, 0, 100).unwrap(), "hello world");
        std::fs::write(dir.path().join("a/b/x.csv"), "HELLO WORLD").unwrap();
        assert!(matches!(read(x, 0, 5), Err(SourceError::Changed { .. })));
        std::fs::remove_file(dir.path().join("a/b/x.csv")).unwrap();
        assert!(matches!(read(x, 0, 5), Err(SourceError::Missing(_))));
        assert!(Source::open(&file_url(&dir.path().join("top.txt"))).is_err());
        assert!(Source::open("ftp://x/y").is_err());
    }

    #[test]
    fn urls_survive_odd_names() {
        let p = FsPath::new("/data/a b/%x#1.csv");
        let u = file_url(p);
        match locate(&u).unwrap() {
            Location::Local(back) => assert_eq!(back, p),
            _ => panic!("local"),
        }
        assert_eq!(s3_url("b", "k/a b+c.csv"), "s3://b/k/a%20b+c.csv");
    }
}
