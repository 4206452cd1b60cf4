//! Files being written through the mount (a local spool per file) and the
//! group-commit queue that turns closes into staged batches.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::{Condvar, Mutex, RwLock};

use crate::tree::Op;

/// Files stay in memory up to this size while written: most files a tool
/// like tar or cp writes never need a spool file created and removed.
const MEMORY_SPOOL: u64 = 1 << 20;

/// A file open for writing: its bytes live in a spool (memory, then a file
/// once it grows) until a close or fsync chunks them into the store and
/// stages a `Put`.
pub struct WriteFile {
    /// Where the file is in its view (renames while open move it).
    pub path: Mutex<String>,
    dir: PathBuf,
    spool: RwLock<Spool>,
    spool_path: Mutex<Option<PathBuf>>,
    pub meta: Mutex<WriteMeta>,
    pub opens: AtomicUsize,
}

enum Spool {
    /// The bytes themselves; always exactly the file's size.
    Memory(Vec<u8>),
    Disk(fs::File),
}

#[derive(Debug, Clone)]
pub struct WriteMeta {
    pub size: u64,
    pub mode: u32,
    pub mtime: i64,
    /// Changed since the last time it was staged.
    pub dirty: bool,
    /// Unlinked while open: never staged again.
    pub unlinked: bool,
}

impl WriteFile {
    /// A spool (in memory, spilling to a file under `dir`), filled by
    /// `initial` (given a function writing bytes at an offset) with the
    /// current content; `initial` returns the size.
    pub fn new(
        dir: &std::path::Path,
        path: String,
        mode: u32,
        mtime: i64,
        initial: impl FnOnce(&dyn Fn(u64, &[u8]) -> std::io::Result<()>) -> std::io::Result<u64>,
        dirty: bool,
    ) -> std::io::Result<WriteFile> {
        let wf = WriteFile {
            path: Mutex::new(path),
            dir: dir.to_path_buf(),
            spool: RwLock::new(Spool::Memory(Vec::new())),
            spool_path: Mutex::new(None),
            meta: Mutex::new(WriteMeta {
                size: 0,
                mode,
                mtime,
                dirty,
                unlinked: false,
            }),
            opens: AtomicUsize::new(0),
        };
        let size = initial(&|at, data| wf.put(at, data))?;
        wf.resize(size)?;
        wf.meta.lock().size = size;
        Ok(wf)
    }

    /// Move an in-memory spool to a file (it grew past `MEMORY_SPOOL`).
    fn spill(&self, spool: &mut Spool) -> std::io::Result<()> {
        let Spool::Memory(bytes) = spool else {
            return Ok(());
        };
        fs::create_dir_all(&self.dir)?;
        let path = self.dir.join(format!("spool-{}", ulid::Ulid::new()));
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        *self.spool_path.lock() = Some(path);
        f.write_all_at(bytes, 0)?;
        *spool = Spool::Disk(f);
        Ok(())
    }

    /// Write bytes into the spool (no metadata change).
    fn put(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let end = offset + data.len() as u64;
        if let Spool::Disk(f) = &*self.spool.read() {
            return f.write_all_at(data, offset);
        }
        let mut spool = self.spool.write();
        if end > MEMORY_SPOOL {
            self.spill(&mut spool)?;
        }
        match &mut *spool {
            Spool::Disk(f) => f.write_all_at(data, offset),
            Spool::Memory(v) => {
                if v.len() < end as usize {
                    v.resize(end as usize, 0);
                }
                v[offset as usize..end as usize].copy_from_slice(data);
                Ok(())
            }
        }
    }

    /// Set the spool's length (no metadata change).
    fn resize(&self, size: u64) -> std::io::Result<()> {
        let mut spool = self.spool.write();
        if size > MEMORY_SPOOL {
            self.spill(&mut spool)?;
        }
        match &mut *spool {
            Spool::Disk(f) => f.set_len(size),
            Spool::Memory(v) => {
                v.resize(size as usize, 0);
                Ok(())
            }
        }
    }

    pub fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.put(offset, data)?;
        let mut m = self.meta.lock();
        m.size = m.size.max(offset + data.len() as u64);
        m.mtime = now_ns();
        m.dirty = true;
        Ok(())
    }

    pub fn read(&self, offset: u64, size: usize) -> std::io::Result<Vec<u8>> {
        let len = self.meta.lock().size;
        let end = (offset + size as u64).min(len);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut buf = vec![0; (end - offset) as usize];
        match &*self.spool.read() {
            Spool::Memory(v) => {
                // A write may be extending the file right now: bytes it has
                // not copied yet read as zeros, as a hole would.
                let have = (v.len() as u64).clamp(offset, end);
                buf[..(have - offset) as usize].copy_from_slice(&v[offset as usize..have as usize]);
            }
            Spool::Disk(f) => {
                let mut done = 0;
                while done < buf.len() {
                    let n = f.read_at(&mut buf[done..], offset + done as u64)?;
                    if n == 0 {
                        break; // a hole at the end: zeros, like the file size says
                    }
                    done += n;
                }
            }
        }
        Ok(buf)
    }

    pub fn truncate(&self, size: u64) -> std::io::Result<()> {
        self.resize(size)?;
        let mut m = self.meta.lock();
        m.size = size;
        m.mtime = now_ns();
        m.dirty = true;
        Ok(())
    }

    /// A reader over the spool's current bytes.
    pub fn reader(&self) -> std::io::Result<Box<dyn std::io::Read + Send>> {
        let size = self.meta.lock().size;
        Ok(match &*self.spool.read() {
            Spool::Memory(v) => {
                let n = (size as usize).min(v.len());
                let mut bytes = v[..n].to_vec();
                bytes.resize(size as usize, 0);
                Box::new(std::io::Cursor::new(bytes))
            }
            Spool::Disk(f) => Box::new(SpoolReader {
                f: f.try_clone()?,
                at: 0,
                size,
            }),
        })
    }
}

impl Drop for WriteFile {
    fn drop(&mut self) {
        if let Some(path) = self.spool_path.lock().take() {
            let _ = fs::remove_file(path);
        }
    }
}

struct SpoolReader {
    f: fs::File,
    at: u64,
    size: u64,
}

impl std::io::Read for SpoolReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = buf.len().min((self.size - self.at) as usize);
        if want == 0 {
            return Ok(0);
        }
        let n = self.f.read_at(&mut buf[..want], self.at)?;
        if n == 0 {
            // Past the spool's end but inside the size: a sparse tail.
            buf[..want].fill(0);
            self.at += want as u64;
            return Ok(want);
        }
        self.at += n as u64;
        Ok(n)
    }
}

pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Group commit: ops submitted while a batch is being staged wait and go
/// out together in the next batch, so concurrent closes share store round
/// trips. Every submitter returns only once its ops are durable.
#[derive(Default)]
pub struct StageQueue {
    state: Mutex<QueueState>,
    cv: Condvar,
}

#[derive(Default)]
struct QueueState {
    queue: Vec<(u64, Op)>,
    leading: bool,
    next: u64,
    done: u64,
    failed: HashMap<u64, String>,
}

impl StageQueue {
    /// Submit ops; `stage` is called (by whichever submitter leads) with
    /// each batch. Returns the error of the batch that carried these ops.
    pub fn submit(
        &self,
        ops: Vec<Op>,
        stage: impl Fn(Vec<Op>) -> Result<(), String>,
    ) -> Result<(), String> {
        let mine;
        {
            let mut st = self.state.lock();
            for op in ops {
                st.next += 1;
                let id = st.next;
                st.queue.push((id, op));
            }
            mine = st.next;
            if st.leading {
                while st.done < mine {
                    self.cv.wait(&mut st);
                }
                return match st.failed.remove(&mine) {
                    Some(e) => Err(e),
                    None => Ok(()),
                };
            }
            st.leading = true;
        }
        loop {
            let batch = std::mem::take(&mut self.state.lock().queue);
            if batch.is_empty() {
                let mut st = self.state.lock();
                if st.queue.is_empty() {
                    st.leading = false;
                    self.cv.notify_all();
                    break;
                }
                continue;
            }
            let last = batch.last().expect("non-empty").0;
            let ids: Vec<u64> = batch.iter().map(|(id, _)| *id).collect();
            let res = stage(batch.into_iter().map(|(_, op)| op).collect());
            let mut st = self.state.lock();
            if let Err(e) = res {
                for id in ids {
                    st.failed.insert(id, e.clone());
                }
            }
            st.done = last;
            self.cv.notify_all();
        }
        match self.state.lock().failed.remove(&mine) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Count of open handles on a write file.
pub fn open_ref(wf: &WriteFile) {
    wf.opens.fetch_add(1, Ordering::SeqCst);
}

/// Drop one open handle; true when it was the last.
pub fn close_ref(wf: &WriteFile) -> bool {
    wf.opens.fetch_sub(1, Ordering::SeqCst) == 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn spool_reads_writes_truncates_and_sparse_tails() {
        let dir = tempfile::tempdir().unwrap();
        let wf = WriteFile::new(
            dir.path(),
            "f".into(),
            0o644,
            0,
            |put| {
                put(0, b"0123456789")?;
                Ok(10)
            },
            false,
        )
        .unwrap();
        wf.write(5, b"XYZ").unwrap();
        wf.write(20, b"end").unwrap();
        assert_eq!(
            wf.read(0, 100).unwrap(),
            b"01234XYZ89\0\0\0\0\0\0\0\0\0\0end"
        );
        wf.truncate(2).unwrap();
        assert_eq!(wf.read(0, 100).unwrap(), b"01");
        wf.truncate(5).unwrap();
        let mut all = Vec::new();
        std::io::Read::read_to_end(&mut wf.reader().unwrap(), &mut all).unwrap();
        assert_eq!(all, b"01\0\0\0");
        assert!(wf.meta.lock().dirty);
        let spools = || std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(spools(), 0, "small files stay in memory");
        // Growing past the memory spool moves it to a file, bytes and all.
        wf.write(MEMORY_SPOOL + 10, b"far").unwrap();
        assert_eq!(spools(), 1);
        assert_eq!(wf.read(0, 6).unwrap(), b"01\0\0\0\0");
        assert_eq!(wf.read(MEMORY_SPOOL + 9, 10).unwrap(), b"\0far");
        let mut all = Vec::new();
        std::io::Read::read_to_end(&mut wf.reader().unwrap(), &mut all).unwrap();
        assert_eq!(all.len() as u64, MEMORY_SPOOL + 13);
        assert_eq!(&all[..2], b"01");
        drop(wf);
        assert_eq!(spools(), 0, "the spool file goes with the write file");
    }

    #[test]
    fn group_commit_batches_concurrent_submitters() {
        let q = Arc::new(StageQueue::default());
        let batches = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let q = q.clone();
                let batches = batches.clone();
                std::thread::spawn(move || {
                    q.submit(
                        vec![Op::Delete {
                            path: format!("p{i}"),
                        }],
                        |ops| {
                            std::thread::sleep(std::time::Duration::from_millis(5));
                            batches.lock().push(ops.len());
                            Ok(())
                        },
                    )
                    .unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let b = batches.lock();
        assert_eq!(b.iter().sum::<usize>(), 8, "every op staged exactly once");
        let failing = StageQueue::default();
        assert!(failing
            .submit(
                vec![Op::Delete { path: "x".into() }],
                |_| Err("boom".into())
            )
            .is_err());
    }
}
