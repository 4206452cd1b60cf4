//! Files being written through the mount (a local spool per file) and the
//! group-commit queue that turns closes into staged batches.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use parking_lot::{Condvar, Mutex, RwLock};

use std::sync::mpsc;

use crate::chunk::{ChunkParams, Cutter, Uploads};
use crate::hash::ChunkRef;
use crate::store::Store;
use crate::tree::Op;

/// Files stay in memory up to this size while written: most files a tool
/// like tar or cp writes never need a spool file created and removed.
const MEMORY_SPOOL: u64 = 1 << 20;

/// A file open for writing: its bytes live in a spool (memory, then a file
/// once it grows) until a close or fsync chunks them into the store and
/// stages a `Put`.
pub struct WriteFile {
    /// The view (`View::id`) it is written in.
    pub view: u64,
    /// Where the file is in its view (renames while open move it).
    pub path: Mutex<String>,
    dir: PathBuf,
    spool: RwLock<Spool>,
    /// Where a file written from its start in order is chunked as it comes
    /// (see `Spool::Stream`); `None`: always spool.
    stream_to: Mutex<Option<(Store, ChunkParams)>>,
    spool_path: Mutex<Option<PathBuf>>,
    pub meta: Mutex<WriteMeta>,
    pub opens: AtomicUsize,
    /// Handles on it open for writing that were not closed (flushed) since
    /// they last wrote: while there are none, a new reader gets a snapshot
    /// of what the closes staged, even before the kernel's (asynchronous)
    /// release of the last handle.
    pub writers: Mutex<rustc_hash::FxHashSet<u64>>,
    /// Held while a close (or fsync) of this file is staged: one at a
    /// time, in order. A close can come in the middle of writing — another
    /// process closing a descriptor it inherited, as every exec does with
    /// close-on-exec ones — and the part it stages must never land after a
    /// later, fuller close's. A rename or unlink of the file holds it too
    /// (`LakeFs::writers_at`), so no close lands at a path the file has
    /// left.
    pub staging: Mutex<()>,
    /// The inodes the mount's table of files open for writing holds it
    /// under (`LakeFs::writes`); changed only under that table's lock.
    pub inos: Mutex<Vec<u64>>,
    /// Made by a create in write-back mode and not yet staged by its last
    /// close (or removed): its changes are journaled as they come (see
    /// `Draft`). Held while a change is made and journaled, so its steps
    /// are journaled in the order they were made.
    pub draft: Mutex<Option<Draft>>,
    /// A draft's spool file stays (emptied, or when this is dropped) until
    /// `end_draft_spool`: its steps name it. (Not `draft.is_some()`: a
    /// truncate, which may empty the spool, runs under `draft`'s lock.)
    keep_spool: AtomicBool,
}

/// A file made by a create on a `--writeback` mount. The kernel is told
/// not to flush it at close (so a close sends no request at all), so each
/// change is journaled before it is answered (`journal::DraftRecord`), and
/// the file is staged by its release. Its spool file, if it grows one, is
/// kept in the journal's `drafts/` until then.
#[derive(Debug)]
pub struct Draft {
    pub id: u64,
    pub repo: String,
    pub branch: String,
    /// The spool file its steps name (`None`: its bytes are in its steps).
    pub spool: Option<String>,
}

enum Spool {
    /// The bytes themselves; always exactly the file's size.
    Memory(Vec<u8>),
    Disk(fs::File),
    /// A file written from its start, in order, past `MEMORY_SPOOL`: cut
    /// into chunks as it comes and uploaded in the background, so a close
    /// has only the last chunks left to store (no spool written and read
    /// back). Any other write, a truncate or a read turns it into `Disk`.
    Stream(Stream),
}

struct Stream {
    store: Store,
    params: ChunkParams,
    /// Bytes written so far.
    len: u64,
    /// To the cutter thread, which sends chunks on to the uploader thread:
    /// cutting, hashing and storing run beside the FUSE threads.
    cutter: mpsc::SyncSender<Cut>,
}

/// Every chunk cut so far, stored, and the bytes not cut yet.
type CutSoFar = Result<(Vec<ChunkRef>, Vec<u8>), String>;

enum Cut {
    Bytes(Vec<u8>),
    /// Reply once every chunk cut before is stored.
    Barrier(mpsc::Sender<CutSoFar>),
}

enum Upload {
    Chunk(Vec<u8>),
    /// Reply once every chunk sent before is stored, with their refs.
    Barrier(mpsc::Sender<Result<Vec<ChunkRef>, String>>),
}

/// Bytes of chunks stored per batch by a stream's uploader.
const STREAM_BATCH: usize = 16 << 20;

/// Writes (and chunks) each stage may run ahead of the next.
const STREAM_AHEAD: usize = 16;

fn gone() -> std::io::Error {
    std::io::Error::other("chunk uploader gone")
}

impl Stream {
    fn start(store: Store, params: ChunkParams) -> std::io::Result<Stream> {
        let (up_tx, up_rx) = mpsc::sync_channel::<Upload>(STREAM_AHEAD);
        let mut uploads = Uploads::new(store.clone(), STREAM_BATCH);
        std::thread::Builder::new()
            .name("tarn-stream-up".into())
            .spawn(move || {
                crate::thread_class::leave_inherited_idle();
                // The first failure is kept and told at every barrier.
                let mut failed: Option<String> = None;
                for msg in up_rx {
                    let res = match msg {
                        Upload::Chunk(data) => uploads.add(data, |_| {}),
                        Upload::Barrier(reply) => {
                            let res = uploads.flush();
                            if let Err(e) = &res {
                                failed.get_or_insert(e.to_string());
                            }
                            let _ = reply.send(match &failed {
                                Some(e) => Err(e.clone()),
                                None => Ok(uploads.refs.clone()),
                            });
                            continue;
                        }
                    };
                    if let Err(e) = res {
                        failed.get_or_insert(e.to_string());
                    }
                }
            })?;
        let (cut_tx, cut_rx) = mpsc::sync_channel::<Cut>(STREAM_AHEAD);
        std::thread::Builder::new()
            .name("tarn-stream-cut".into())
            .spawn(move || {
                crate::thread_class::leave_inherited_idle();
                let mut cutter = Cutter::new(params, Vec::new());
                for msg in cut_rx {
                    match msg {
                        Cut::Bytes(data) => {
                            for chunk in cutter.push(&data) {
                                if up_tx.send(Upload::Chunk(chunk)).is_err() {
                                    return;
                                }
                            }
                        }
                        Cut::Barrier(reply) => {
                            let (tx, rx) = mpsc::channel();
                            let stored = match up_tx.send(Upload::Barrier(tx)) {
                                Ok(()) => rx.recv().unwrap_or_else(|_| Err(gone().to_string())),
                                Err(_) => Err(gone().to_string()),
                            };
                            let _ = reply.send(stored.map(|refs| (refs, cutter.tail().to_vec())));
                        }
                    }
                }
            })?;
        Ok(Stream {
            store,
            params,
            len: 0,
            cutter: cut_tx,
        })
    }

    fn append(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.cutter
            .send(Cut::Bytes(data.to_vec()))
            .map_err(|_| gone())?;
        self.len += data.len() as u64;
        Ok(())
    }

    /// Every chunk cut so far, stored, and the bytes not cut yet.
    fn stored(&self) -> std::io::Result<(Vec<ChunkRef>, Vec<u8>)> {
        let (tx, rx) = mpsc::channel();
        self.cutter.send(Cut::Barrier(tx)).map_err(|_| gone())?;
        rx.recv()
            .map_err(|_| gone())?
            .map_err(std::io::Error::other)
    }

    /// The whole content so far as stored chunks; the stream goes on.
    fn content(&self) -> std::io::Result<Vec<ChunkRef>> {
        let (mut refs, tail) = self.stored()?;
        let mut rest = Uploads::new(self.store.clone(), usize::MAX);
        for c in Cutter::new(self.params, tail).rest() {
            rest.add(c.to_vec(), |_| {})
                .map_err(std::io::Error::other)?;
        }
        rest.flush().map_err(std::io::Error::other)?;
        refs.extend(rest.refs);
        Ok(refs)
    }

    /// The bytes so far, into `f`.
    fn write_out(&self, f: &fs::File) -> std::io::Result<()> {
        let (refs, tail) = self.stored()?;
        let mut at = 0;
        for c in refs {
            let bytes = self
                .store
                .get_verified(&c.hash.key("chunks"), &c.hash)
                .map_err(std::io::Error::other)?;
            f.write_all_at(&bytes, at)?;
            at += bytes.len() as u64;
        }
        f.write_all_at(&tail, at)
    }
}

#[derive(Debug, Clone)]
pub struct WriteMeta {
    pub size: u64,
    pub mode: u32,
    pub mtime: i64,
    /// Changes so far (`changed`), and how many of them were staged
    /// (`staged`): a close staging the file marks only what it saw, so a
    /// change coming meanwhile (a chmod from another process leaves size
    /// and time as they were) keeps the file `dirty`.
    pub changes: u64,
    pub staged: u64,
    /// Unlinked while open: never staged again.
    pub unlinked: bool,
}

/// `mode` without set-user-ID, and without set-group-ID if the group may
/// execute (without it, the bit means mandatory locking, which stays).
pub fn killed_suid(mode: u32) -> u32 {
    let mut m = mode & !0o4000;
    if m & 0o010 != 0 {
        m &= !0o2000;
    }
    m
}

impl WriteMeta {
    /// Clear set-user-ID (and set-group-ID where the group may execute).
    pub fn kill_suid(&mut self) {
        let mode = killed_suid(self.mode);
        if mode != self.mode {
            self.mode = mode;
            self.changed();
        }
    }

    /// Mark the file changed since it was last staged.
    pub fn changed(&mut self) {
        self.changes += 1;
    }

    /// Changed since the last time it was staged.
    pub fn dirty(&self) -> bool {
        self.changes != self.staged
    }
}

impl WriteFile {
    /// A spool (in memory, spilling to a file under `dir`), filled by
    /// `initial` (given a function writing bytes at an offset) with the
    /// current content; `initial` returns the size.
    pub fn new(
        dir: &std::path::Path,
        view: u64,
        path: String,
        mode: u32,
        mtime: i64,
        initial: impl FnOnce(&dyn Fn(u64, &[u8]) -> std::io::Result<()>) -> std::io::Result<u64>,
        dirty: bool,
    ) -> std::io::Result<WriteFile> {
        let wf = WriteFile {
            view,
            path: Mutex::new(path),
            dir: dir.to_path_buf(),
            spool: RwLock::new(Spool::Memory(Vec::new())),
            stream_to: Mutex::new(None),
            spool_path: Mutex::new(None),
            meta: Mutex::new(WriteMeta {
                size: 0,
                mode,
                mtime,
                // A new file is a change to stage even if nothing is written.
                changes: u64::from(dirty),
                staged: 0,
                unlinked: false,
            }),
            opens: AtomicUsize::new(0),
            writers: Mutex::default(),
            staging: Mutex::new(()),
            inos: Mutex::new(Vec::new()),
            draft: Mutex::new(None),
            keep_spool: AtomicBool::new(false),
        };
        let size = initial(&|at, data| wf.put(at, data))?;
        wf.resize(size)?;
        wf.meta.lock().size = size;
        Ok(wf)
    }

    /// Chunk this file as it is written, into `store`, while it is written
    /// from its start in order (see `Spool::Stream`).
    pub fn stream_to(&self, store: Store, params: ChunkParams) {
        *self.stream_to.lock() = Some((store, params));
    }

    /// The file's content as stored chunks, if it is being streamed (the
    /// last chunks are stored now; writing may go on).
    pub fn streamed(&self) -> std::io::Result<Option<(Vec<ChunkRef>, u64)>> {
        match &*self.spool.read() {
            Spool::Stream(s) => Ok(Some((s.content()?, s.len))),
            _ => Ok(None),
        }
    }

    /// Move the spool to a file: from memory (it grew past
    /// `MEMORY_SPOOL`), or from a stream (written out of order).
    fn spill(&self, spool: &mut Spool) -> std::io::Result<()> {
        if let Spool::Disk(_) = spool {
            return Ok(());
        }
        fs::create_dir_all(&self.dir)?;
        let path = self.dir.join(format!("spool-{}", ulid::Ulid::new()));
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        *self.spool_path.lock() = Some(path);
        match &*spool {
            Spool::Memory(v) => f.write_all_at(v, 0)?,
            Spool::Stream(s) => s.write_out(&f)?,
            Spool::Disk(_) => unreachable!("returned above"),
        }
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
        if let Spool::Stream(s) = &mut *spool {
            if offset == s.len {
                return s.append(data);
            }
        }
        if matches!(*spool, Spool::Stream(_)) {
            self.spill(&mut spool)?; // written out of order
        } else if end > MEMORY_SPOOL {
            let start = self.stream_to.lock().clone().and_then(|(store, params)| {
                match &mut *spool {
                    // Written in order from the start so far, and now too.
                    Spool::Memory(v) if offset == v.len() as u64 => {
                        Some((store, params, std::mem::take(v)))
                    }
                    _ => None,
                }
            });
            match start {
                Some((store, params, bytes)) => {
                    let mut s = Stream::start(store, params)?;
                    s.append(&bytes)?;
                    s.append(data)?;
                    *spool = Spool::Stream(s);
                    return Ok(());
                }
                None => self.spill(&mut spool)?,
            }
        }
        match &mut *spool {
            Spool::Stream(_) => unreachable!("spilled above"),
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
        if size == 0 && !self.keep_spool.load(Ordering::Relaxed) {
            // Emptied (O_TRUNC): written from the start again, it may stream.
            *spool = Spool::Memory(Vec::new());
            self.remove_spool();
            return Ok(());
        }
        if let Spool::Stream(s) = &*spool {
            if s.len == size {
                return Ok(());
            }
        }
        if size > MEMORY_SPOOL || matches!(*spool, Spool::Stream(_)) {
            self.spill(&mut spool)?;
        }
        match &mut *spool {
            Spool::Stream(_) => unreachable!("spilled above"),
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
        m.changed();
        Ok(())
    }

    pub fn read(&self, offset: u64, size: usize) -> std::io::Result<Vec<u8>> {
        let len = self.meta.lock().size;
        let end = (offset + size as u64).min(len);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut buf = vec![0; (end - offset) as usize];
        if matches!(*self.spool.read(), Spool::Stream(_)) {
            // Read while written in order: rare enough to spool it after all.
            let mut spool = self.spool.write();
            self.spill(&mut spool)?;
        }
        match &*self.spool.read() {
            Spool::Stream(_) => unreachable!("spilled above"),
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
        m.changed();
        Ok(())
    }

    /// A reader over the spool's current bytes.
    pub fn reader(&self) -> std::io::Result<Box<dyn std::io::Read + Send>> {
        if matches!(*self.spool.read(), Spool::Stream(_)) {
            let mut spool = self.spool.write();
            self.spill(&mut spool)?;
        }
        let size = self.meta.lock().size;
        Ok(match &*self.spool.read() {
            Spool::Stream(_) => unreachable!("spilled above"),
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

    /// Make this file a draft (see `Draft`): its spool file, if it grows
    /// one, stays until the draft ends (`end_draft_spool`).
    pub fn set_draft(&self, draft: Draft) {
        self.keep_spool.store(true, Ordering::Relaxed);
        *self.draft.lock() = Some(draft);
    }

    /// Its draft ended: its spool file is its own again, and goes now
    /// (handles still open read on through their descriptor).
    pub fn end_draft_spool(&self) {
        self.keep_spool.store(false, Ordering::Relaxed);
        self.remove_spool();
    }

    /// The name of its spool file, if it has one.
    pub fn spool_name(&self) -> Option<String> {
        let path = self.spool_path.lock();
        Some(path.as_ref()?.file_name()?.to_string_lossy().into_owned())
    }

    fn remove_spool(&self) {
        if let Some(path) = self.spool_path.lock().take() {
            let _ = fs::remove_file(path);
        }
    }
}

impl Drop for WriteFile {
    fn drop(&mut self) {
        if !self.keep_spool.load(Ordering::Relaxed) {
            self.remove_spool();
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
            0,
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
        assert!(wf.meta.lock().dirty());
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

    /// The scheduling class of this process's threads named `name`.
    fn classes_of(name: &str) -> Vec<i32> {
        let mut out = Vec::new();
        for t in fs::read_dir("/proc/self/task").unwrap() {
            let t = t.unwrap();
            let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim() == name {
                let tid: i32 = t.file_name().to_str().unwrap().parse().unwrap();
                // SAFETY: a thread id of this process.
                out.push(unsafe { libc::sched_getscheduler(tid) });
            }
        }
        out
    }

    #[test]
    fn a_stream_started_by_an_idle_thread_runs_in_the_normal_class() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("memory://class-{}", ulid::Ulid::new())).unwrap();
        let wf =
            Arc::new(WriteFile::new(dir.path(), 0, "f".into(), 0o644, 0, |_| Ok(0), true).unwrap());
        wf.stream_to(store, ChunkParams::default());
        let writer = wf.clone();
        let started = std::thread::spawn(move || {
            if !crate::thread_class::may_leave_idle() || !crate::thread_class::set_idle(true) {
                return false;
            }
            writer
                .write(0, &vec![7u8; MEMORY_SPOOL as usize + 1])
                .unwrap();
            true
        })
        .join()
        .unwrap();
        if !started {
            return; // the idle class is not ours to take here
        }
        assert!(wf.streamed().unwrap().is_some(), "streaming");
        for name in ["tarn-stream-up", "tarn-stream-cut"] {
            let classes = classes_of(name);
            assert!(!classes.is_empty(), "{name} runs");
            assert!(!classes.contains(&libc::SCHED_IDLE), "{name}: {classes:?}");
        }
    }

    #[test]
    fn files_written_in_order_are_chunked_as_they_come() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("memory://stream-{}", ulid::Ulid::new())).unwrap();
        let params = ChunkParams {
            min: 16 << 10,
            avg: 64 << 10,
            max: 256 << 10,
        };
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let wf = WriteFile::new(dir.path(), 0, "f".into(), 0o644, 0, |_| Ok(0), true).unwrap();
        wf.stream_to(store.clone(), params);
        for (i, part) in data.chunks(100_000).enumerate() {
            wf.write(i as u64 * 100_000, part).unwrap();
        }
        let spools = || std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(spools(), 0, "no spool file: chunked as written");
        let (refs, size) = wf.streamed().unwrap().expect("streaming");
        assert_eq!(size, data.len() as u64);
        // The same chunks a whole-file store makes, all in the store.
        let (whole, _) = crate::chunk::store_content(
            &Store::open(&format!("memory://whole-{}", ulid::Ulid::new())).unwrap(),
            params,
            &data[..],
            "x",
        )
        .unwrap();
        assert_eq!(crate::chunk::Stored::Chunks(refs.clone()), whole);
        let mut out = Vec::new();
        crate::chunk::write_chunks(&store, &refs, &mut out).unwrap();
        assert_eq!(out, data);
        // Appending goes on streaming; a write elsewhere spools it after all.
        wf.write(data.len() as u64, b"tail").unwrap();
        assert!(wf.streamed().unwrap().is_some());
        wf.write(10, b"XY").unwrap();
        assert!(wf.streamed().unwrap().is_none());
        assert_eq!(spools(), 1);
        let mut all = Vec::new();
        std::io::Read::read_to_end(&mut wf.reader().unwrap(), &mut all).unwrap();
        let mut want = data.clone();
        want[10..12].copy_from_slice(b"XY");
        want.extend_from_slice(b"tail");
        assert_eq!(all, want);
        // Emptied, it may stream again.
        wf.truncate(0).unwrap();
        assert_eq!(spools(), 0);
        wf.write(0, &data[..2_000_000]).unwrap();
        assert_eq!(wf.streamed().unwrap().unwrap().1, 2_000_000);
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
