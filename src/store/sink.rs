//! Where `tarn export` writes plain files: a local directory or an S3
//! prefix, for serving layers that cannot read tarn. Each file appears
//! whole or not at all (temp file + rename; one put or one completed
//! multipart upload), so an interrupted export is resumed by running it
//! again: files already there with the same size (and, locally, mtime) are
//! skipped.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use object_store::path::Path;
use object_store::{MultipartUpload, ObjectStore, ObjectStoreExt, PutPayload};

use super::block_on;
use super::source::{locate, Location, S3Prefix, SourceError};

/// Files up to this size go up in one put; larger ones in parts of it.
const PART: usize = 16 << 20;

pub enum Sink {
    Local { root: PathBuf },
    S3(S3Prefix),
}

fn io(what: impl std::fmt::Display) -> impl Fn(std::io::Error) -> SourceError {
    let url = what.to_string();
    move |e| SourceError::Io {
        url: url.clone(),
        source: e,
    }
}

impl Sink {
    /// `file:///dir/` (created if missing) or `s3://bucket/prefix/`.
    pub fn open(url: &str) -> Result<Sink, SourceError> {
        match locate(url)? {
            Location::Local(root) => {
                std::fs::create_dir_all(&root).map_err(io(url))?;
                Ok(Sink::Local { root })
            }
            Location::S3 { store, bucket, key } => Ok(Sink::S3(S3Prefix {
                store,
                bucket,
                prefix: key.trim_end_matches('/').to_string(),
            })),
        }
    }

    /// Is `rel` there already, as a file of this size (and mtime, in ns,
    /// where the sink keeps it)?
    pub fn has(&self, rel: &str, size: u64, mtime: i64) -> Result<bool, SourceError> {
        match self {
            Sink::Local { root } => match std::fs::symlink_metadata(root.join(rel)) {
                Ok(m) => Ok(m.is_file()
                    && m.size() == size
                    && m.mtime() * 1_000_000_000 + m.mtime_nsec() == mtime),
                Err(_) => Ok(false),
            },
            Sink::S3(s3) => {
                let key = s3.key(rel);
                match block_on(s3.store.head(&Path::from(key.as_str()))) {
                    Ok(m) => Ok(m.size == size),
                    Err(object_store::Error::NotFound { .. }) => Ok(false),
                    Err(e) => Err(SourceError::Backend {
                        url: s3.url(&key),
                        source: e,
                    }),
                }
            }
        }
    }

    /// Write one file: `fill` writes its bytes. It appears only once whole.
    pub fn put_file(
        &self,
        rel: &str,
        mode: u32,
        mtime: i64,
        fill: impl FnOnce(&mut dyn Write) -> Result<(), String>,
    ) -> Result<(), SourceError> {
        match self {
            Sink::Local { root } => {
                let path = root.join(rel);
                let dir = path.parent().expect("under root");
                std::fs::create_dir_all(dir).map_err(io(dir.display()))?;
                let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io(dir.display()))?;
                {
                    let mut w = std::io::BufWriter::new(tmp.as_file_mut());
                    fill(&mut w).map_err(|e| io(path.display())(std::io::Error::other(e)))?;
                    w.flush().map_err(io(path.display()))?;
                }
                use std::os::unix::fs::PermissionsExt;
                let f = tmp.as_file();
                f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(io(path.display()))?;
                let t =
                    std::time::UNIX_EPOCH + std::time::Duration::from_nanos(mtime.max(0) as u64);
                f.set_modified(t).map_err(io(path.display()))?;
                tmp.persist(&path)
                    .map_err(|e| io(path.display())(e.error))?;
                Ok(())
            }
            Sink::S3(s3) => {
                let store = &s3.store;
                let key = s3.key(rel);
                let url = s3.url(&key);
                let backend = |e| SourceError::Backend {
                    url: url.clone(),
                    source: e,
                };
                let path = Path::from(key.as_str());
                let mut w = PartWriter {
                    store: store.as_ref(),
                    path: &path,
                    buf: Vec::new(),
                    upload: None,
                    failed: None,
                };
                fill(&mut w).map_err(|e| io(&url)(std::io::Error::other(e)))?;
                if let Some(e) = w.failed.take() {
                    return Err(backend(e));
                }
                match w.upload.take() {
                    None => block_on(store.put(&path, PutPayload::from(w.buf)))
                        .map(|_| ())
                        .map_err(backend),
                    Some(mut upload) => {
                        let rest = std::mem::take(&mut w.buf);
                        block_on(async {
                            if !rest.is_empty() {
                                upload.put_part(PutPayload::from(rest)).await?;
                            }
                            upload.complete().await.map(|_| ())
                        })
                        .map_err(backend)
                    }
                }
            }
        }
    }

    /// A symlink (local sinks only; object stores have none).
    pub fn put_symlink(&self, rel: &str, target: &str) -> Result<bool, SourceError> {
        match self {
            Sink::Local { root } => {
                let path = root.join(rel);
                if std::fs::read_link(&path).is_ok_and(|t| t == std::path::Path::new(target)) {
                    return Ok(true);
                }
                let dir = path.parent().expect("under root");
                std::fs::create_dir_all(dir).map_err(io(dir.display()))?;
                let _ = std::fs::remove_file(&path);
                std::os::unix::fs::symlink(target, &path).map_err(io(path.display()))?;
                Ok(true)
            }
            Sink::S3(_) => Ok(false),
        }
    }
}

/// Buffers writes into parts; the first full part starts a multipart upload.
struct PartWriter<'a> {
    store: &'a dyn ObjectStore,
    path: &'a Path,
    buf: Vec<u8>,
    upload: Option<Box<dyn MultipartUpload>>,
    failed: Option<object_store::Error>,
}

impl Write for PartWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        while self.buf.len() >= PART {
            let rest = self.buf.split_off(PART);
            let part = std::mem::replace(&mut self.buf, rest);
            let sent = block_on(async {
                if self.upload.is_none() {
                    self.upload = Some(self.store.put_multipart(self.path).await?);
                }
                let upload = self.upload.as_mut().expect("started");
                upload.put_part(PutPayload::from(part)).await
            });
            if let Err(e) = sent {
                let msg = e.to_string();
                self.failed = Some(e);
                return Err(std::io::Error::other(msg));
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
