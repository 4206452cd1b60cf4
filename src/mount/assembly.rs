//! Whole-file copies in the chunk cache. A file read from its start is
//! copied, chunk after chunk, into one local file: a few workers fetch chunks
//! at once and whichever is free appends them, in order, to the file in
//! large aligned blocks written with `O_DIRECT` (no second copy of the bytes
//! in the page cache, nothing left for the kernel to write back later). The
//! daemon answers reads from the fetched chunks and the file as soon as the
//! bytes are there, and once the copy is complete later opens hand it to the
//! kernel (passthrough), which then reads at the local disk's speed without
//! the daemon.
//!
//! Every chunk is verified before it is written; a copy found on disk by a
//! later daemon is checked against the file's chunk list before first use.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use super::cache::ChunkCache;
use crate::hash::{ChunkRef, Hash};

/// Chunks fetched at once for one copy.
const WORKERS: usize = 4;

/// Chunks fetched but not yet in the file, at most (bounds the memory a slow
/// chunk can make the others wait in).
const AHEAD: usize = 16;

/// A reader this many chunks or fewer ahead of the fetching waits for it;
/// one further ahead (a random reader) reads the chunks itself.
const WAIT_AHEAD: usize = 8;

/// The newest chunks written are also kept in memory, so a reader close
/// behind the copy is answered without reading the file back.
const HELD: usize = 16;

/// Bytes per write of the copy; a multiple of any device's block size.
const BLOCK: usize = 4 << 20;
const ALIGN: usize = 4096;

/// The id of a file's whole-file copy: its chunk list, hashed.
pub fn file_id(chunks: &[ChunkRef]) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(b"tarn whole file\0");
    for c in chunks {
        h.update(&c.hash.0);
        h.update(&c.len.to_le_bytes());
    }
    Hash(*h.finalize().as_bytes())
}

/// Does the file hold exactly these chunks, in order?
pub fn verify(file: &fs::File, chunks: &[ChunkRef]) -> bool {
    let size: u64 = chunks.iter().map(|c| c.len as u64).sum();
    if !file.metadata().is_ok_and(|m| m.len() == size) {
        return false;
    }
    let mut buf = Vec::new();
    let mut at = 0;
    for c in chunks {
        buf.resize(c.len as usize, 0);
        if file.read_exact_at(&mut buf, at).is_err() || Hash::of(&buf) != c.hash {
            return false;
        }
        at += c.len as u64;
    }
    true
}

pub struct Assembly {
    id: Hash,
    tmp: PathBuf,
    /// Reads of written ranges go through the page cache, as usual.
    file: fs::File,
    /// The file's writer (`O_DIRECT` where the file system allows it); only
    /// the worker holding `State::writing` touches it.
    writer: Mutex<BlockWriter>,
    chunks: Vec<ChunkRef>,
    starts: Vec<u64>,
    size: u64,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// Next chunk a worker will fetch.
    next: usize,
    /// Fetched chunks not yet in the file, and the newest ones that are.
    fetched: BTreeMap<usize, Bytes>,
    /// Chunks handed to the writer, in order.
    staged: usize,
    /// Chunks wholly in the file.
    written: usize,
    /// A worker is appending to the file.
    writing: bool,
    failed: Option<String>,
    /// Workers still running; the last one out keeps or drops the file.
    workers: usize,
}

impl Assembly {
    /// Create the file and start the workers.
    pub(super) fn start(
        cache: Arc<ChunkCache>,
        id: Hash,
        chunks: Vec<ChunkRef>,
        tmp: &Path,
    ) -> std::io::Result<Arc<Assembly>> {
        let out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)?;
        let file = match fs::File::open(tmp) {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_file(tmp);
                return Err(e);
            }
        };
        let mut starts = Vec::with_capacity(chunks.len());
        let mut at = 0;
        for c in &chunks {
            starts.push(at);
            at += c.len as u64;
        }
        let a = Arc::new(Assembly {
            id,
            tmp: tmp.to_path_buf(),
            file,
            writer: Mutex::new(BlockWriter::new(out)),
            state: Mutex::new(State {
                workers: WORKERS.min(chunks.len()),
                ..State::default()
            }),
            chunks,
            starts,
            size: at,
            changed: Condvar::new(),
        });
        let workers = a.state.lock().workers;
        for i in 0..workers {
            let (worker, cache) = (a.clone(), cache.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("tarn-whole-{i}"))
                .spawn(move || {
                    crate::thread_class::leave_inherited_idle();
                    worker.work(&cache);
                    worker.finish(&cache);
                });
            if let Err(e) = spawned {
                // Fewer workers do the same job; none cannot.
                a.state.lock().workers -= workers - i;
                if i == 0 {
                    let _ = fs::remove_file(tmp);
                    return Err(e);
                }
                break;
            }
        }
        Ok(a)
    }

    fn finish(&self, cache: &ChunkCache) {
        let mut st = self.state.lock();
        st.workers -= 1;
        if st.workers > 0 {
            return;
        }
        let complete = st.failed.is_none() && st.written == self.chunks.len();
        drop(st);
        cache.assembled(self.id, &self.tmp, self.size, complete);
    }

    fn work(&self, cache: &ChunkCache) {
        loop {
            let i = {
                let mut st = self.state.lock();
                while st.failed.is_none()
                    && st.next < self.chunks.len()
                    && st.next >= st.staged + AHEAD
                {
                    self.changed.wait(&mut st);
                }
                if st.failed.is_some() || st.next == self.chunks.len() {
                    return;
                }
                st.next += 1;
                st.next - 1
            };
            let res = cache.get_passing(&self.chunks[i].hash);
            let mut st = self.state.lock();
            match res {
                Ok(bytes) => {
                    st.fetched.insert(i, bytes);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "whole-file copy abandoned");
                    st.failed = Some(e.to_string());
                }
            }
            self.changed.notify_all();
            self.append(st);
        }
    }

    /// Append the fetched chunks that come next to the file, unless another
    /// worker is doing so (it will take these too before it stops).
    fn append<'a>(&'a self, mut st: parking_lot::MutexGuard<'a, State>) {
        if st.writing {
            return;
        }
        loop {
            let k = st.staged;
            let Some(bytes) = st.fetched.get(&k).cloned() else {
                return;
            };
            if st.failed.is_some() {
                return;
            }
            st.writing = true;
            drop(st);
            let last = k + 1 == self.chunks.len();
            let res = {
                let mut w = self.writer.lock();
                w.push(&bytes)
                    .and_then(|()| if last { w.finish(self.size) } else { Ok(()) })
            };
            let flushed = self.writer.lock().flushed;
            st = self.state.lock();
            st.writing = false;
            st.staged = k + 1;
            if let Err(e) = res {
                tracing::warn!(error = %e, "whole-file copy abandoned");
                st.failed = Some(format!("writing the whole-file copy: {e}"));
            }
            // Chunks wholly on disk; keep the newest few in memory.
            while st.written < st.staged
                && self.starts[st.written] + self.chunks[st.written].len as u64 <= flushed
            {
                st.written += 1;
            }
            let keep_from = st.written.saturating_sub(HELD);
            while st
                .fetched
                .first_key_value()
                .is_some_and(|(i, _)| *i < keep_from)
            {
                st.fetched.pop_first();
            }
            self.changed.notify_all();
        }
    }

    /// Bytes `[offset, end)` from the copy, waiting for them if the copy is
    /// about to reach them; `None` if the caller should read the chunks
    /// itself (the range is far ahead, or the copy failed).
    pub fn read(&self, offset: u64, end: u64) -> Option<std::io::Result<Bytes>> {
        let first = self
            .starts
            .partition_point(|s| *s <= offset)
            .checked_sub(1)?;
        let last = self.starts.partition_point(|s| *s < end).checked_sub(1)?;
        let mut st = self.state.lock();
        loop {
            if st.failed.is_some() {
                return None;
            }
            let missing = (first..=last).find(|i| *i >= st.written && !st.fetched.contains_key(i));
            match missing {
                None => break,
                Some(i) if i < st.next + WAIT_AHEAD => self.changed.wait(&mut st),
                Some(_) => return None,
            }
        }
        // Each chunk from memory if it is there, else from the file.
        let parts: Vec<Option<Bytes>> = (first..=last)
            .map(|i| st.fetched.get(&i).cloned())
            .collect();
        drop(st);
        let piece = |i: usize, b: &Bytes| {
            let at = self.starts[i];
            let from = offset.saturating_sub(at) as usize;
            let to = ((end - at) as usize).min(b.len());
            b.slice(from..to)
        };
        if let [Some(one)] = &parts[..] {
            // Within one chunk in memory: a slice of it, no copy.
            return Some(Ok(piece(first, one)));
        }
        let mut out = vec![0; (end - offset) as usize];
        let mut filled = 0;
        for (n, part) in parts.iter().enumerate() {
            let i = first + n;
            let at = self.starts[i].max(offset);
            let to = (self.starts[i] + self.chunks[i].len as u64).min(end);
            let len = (to - at) as usize;
            match part {
                Some(b) => out[filled..filled + len].copy_from_slice(&piece(i, b)),
                None => {
                    if let Err(e) = self.file.read_exact_at(&mut out[filled..filled + len], at) {
                        return Some(Err(e));
                    }
                }
            }
            filled += len;
        }
        Some(Ok(Bytes::from(out)))
    }
}

/// Appends bytes to a file in whole aligned blocks, with `O_DIRECT` when the
/// file system takes it (else through the page cache, as any write).
struct BlockWriter {
    out: fs::File,
    /// `BLOCK + ALIGN` bytes; the block is the aligned `BLOCK` inside.
    buf: Vec<u8>,
    start: usize,
    fill: usize,
    /// Bytes in the file.
    flushed: u64,
    direct: bool,
}

impl BlockWriter {
    fn new(out: fs::File) -> BlockWriter {
        let buf = vec![0; BLOCK + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN);
        let direct = set_direct(&out, true).is_ok();
        BlockWriter {
            out,
            buf,
            start,
            fill: 0,
            flushed: 0,
            direct,
        }
    }

    fn push(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let n = bytes.len().min(BLOCK - self.fill);
            let at = self.start + self.fill;
            self.buf[at..at + n].copy_from_slice(&bytes[..n]);
            self.fill += n;
            bytes = &bytes[n..];
            if self.fill == BLOCK {
                self.write(BLOCK)?;
                self.flushed += BLOCK as u64;
                self.fill = 0;
            }
        }
        Ok(())
    }

    /// Write what is left and cut the file to `size`.
    fn finish(&mut self, size: u64) -> std::io::Result<()> {
        if self.fill > 0 {
            // A direct write is a whole number of blocks: pad, then cut.
            let len = if self.direct {
                self.fill.next_multiple_of(ALIGN)
            } else {
                self.fill
            };
            self.buf[self.start + self.fill..self.start + len].fill(0);
            self.write(len)?;
            self.flushed += self.fill as u64;
            self.fill = 0;
        }
        self.out.set_len(size)
    }

    fn write(&mut self, len: usize) -> std::io::Result<()> {
        let block = &self.buf[self.start..self.start + len];
        match self.out.write_all_at(block, self.flushed) {
            Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                // Not for this file system after all: write as usual.
                self.direct = false;
                set_direct(&self.out, false)?;
                self.out.write_all_at(block, self.flushed)
            }
            r => r,
        }
    }
}

fn set_direct(file: &fs::File, on: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a file descriptor this function borrows.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use std::time::{Duration, Instant};

    #[test]
    fn copies_whole_files_serves_ranges_meanwhile_and_checks_old_copies() {
        let store = Store::open(&format!("memory://whole-{}", ulid::Ulid::new())).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut content = Vec::new();
        let mut chunks = Vec::new();
        for i in 0..40u32 {
            // Over two blocks in all, chunk ends nowhere near alignment.
            let bytes: Vec<u8> = (0..150_000 + i * 3701)
                .map(|j| (i * 7 + j / 3) as u8)
                .collect();
            let hash = Hash::of(&bytes);
            store
                .put(&hash.key("chunks"), Bytes::from(bytes.clone()))
                .unwrap();
            chunks.push(ChunkRef {
                hash,
                len: bytes.len() as u32,
            });
            content.extend_from_slice(&bytes);
        }
        let cache = ChunkCache::open(store.clone(), dir.path(), 1 << 30).unwrap();
        assert!(cache.whole_file(&chunks).is_none());
        assert!(
            cache.assembly(&chunks, false).is_none(),
            "only started on request"
        );
        let a = cache.assembly(&chunks, true).unwrap();
        // Readers get the right bytes at once or are told to read chunks.
        let ranges = [
            (0, 10),
            (149_999, 150_001),
            (BLOCK - 5, BLOCK + 5),
            (5_000_000, 5_300_000),
            (0, content.len()),
        ];
        for (from, to) in ranges {
            if let Some(b) = a.read(from as u64, to as u64) {
                assert_eq!(&b.unwrap()[..], &content[from..to]);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let file = loop {
            if let Some(f) = cache.whole_file(&chunks) {
                break f;
            }
            assert!(Instant::now() < deadline, "the copy did not complete");
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut got = vec![0; content.len()];
        file.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(got, content);
        // Once complete, ranges come from the file and the newest chunks.
        for (from, to) in ranges {
            let b = a.read(from as u64, to as u64).expect("complete").unwrap();
            assert_eq!(&b[..], &content[from..to]);
        }
        assert!(cache.used() >= content.len() as u64, "counted in the cache");

        // A later daemon checks a copy before its first use.
        let path = dir.path().join("files").join(file_id(&chunks).to_hex());
        let mut bad = content.clone();
        bad[12345] ^= 0x40;
        fs::write(&path, &bad).unwrap();
        drop(cache);
        let cache = ChunkCache::open(store, dir.path(), 1 << 30).unwrap();
        assert!(cache.whole_file(&chunks).is_none());
        assert!(!path.exists(), "the corrupt copy is dropped");
    }
}
