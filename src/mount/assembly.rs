//! Whole-file copies in the chunk cache. A file read from its start is
//! copied, chunk after chunk, into one local file by a few workers at once;
//! the daemon answers reads from that file as soon as the bytes are there,
//! and once it is complete later opens hand it to the kernel (passthrough),
//! which then reads at the local disk's speed without the daemon.
//!
//! Every chunk is verified before it is written; a copy found on disk by a
//! later daemon is checked against the file's chunk list before first use.

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

/// A reader this many chunks or fewer ahead of the copy waits for it; one
/// further ahead (a random reader) reads the chunks itself.
const WAIT_AHEAD: usize = 8;

/// The newest chunks written are also kept in memory, so a reader close
/// behind the copy is answered without reading the file back.
const HELD: usize = 16;

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
    file: fs::File,
    chunks: Vec<ChunkRef>,
    starts: Vec<u64>,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// Which chunks are in the file.
    done: Vec<bool>,
    /// Next chunk a worker will take.
    next: usize,
    /// Chunks written.
    written: usize,
    failed: Option<String>,
    /// Bytes of the newest chunks written, by index.
    held: std::collections::BTreeMap<usize, Bytes>,
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
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(tmp)?;
        let mut starts = Vec::with_capacity(chunks.len());
        let mut at = 0;
        for c in &chunks {
            starts.push(at);
            at += c.len as u64;
        }
        file.set_len(at)?;
        let a = Arc::new(Assembly {
            id,
            tmp: tmp.to_path_buf(),
            file,
            state: Mutex::new(State {
                done: vec![false; chunks.len()],
                workers: WORKERS.min(chunks.len()),
                ..State::default()
            }),
            chunks,
            starts,
            changed: Condvar::new(),
        });
        let workers = a.state.lock().workers;
        for i in 0..workers {
            let (worker, cache) = (a.clone(), cache.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("tarn-whole-{i}"))
                .spawn(move || {
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
        let size = self.starts.last().copied().unwrap_or(0)
            + self.chunks.last().map_or(0, |c| c.len as u64);
        cache.assembled(self.id, &self.tmp, size, complete);
    }

    fn work(&self, cache: &ChunkCache) {
        loop {
            let i = {
                let mut st = self.state.lock();
                if st.failed.is_some() || st.next == self.chunks.len() {
                    return;
                }
                st.next += 1;
                st.next - 1
            };
            let c = &self.chunks[i];
            let res = cache
                .get_passing(&c.hash)
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    self.file
                        .write_all_at(&b, self.starts[i])
                        .map_err(|e| format!("writing the whole-file copy: {e}"))?;
                    Ok(b)
                });
            let mut st = self.state.lock();
            match res {
                Ok(bytes) => {
                    st.done[i] = true;
                    st.written += 1;
                    st.held.insert(i, bytes);
                    if st.held.len() > HELD {
                        st.held.pop_first();
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "whole-file copy abandoned");
                    st.failed = Some(e);
                }
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
            let missing = (first..=last).find(|i| !st.done[*i]);
            match missing {
                None => break,
                Some(i) if i < st.next + WAIT_AHEAD => self.changed.wait(&mut st),
                Some(_) => return None,
            }
        }
        let held: Option<Vec<Bytes>> = (first..=last).map(|i| st.held.get(&i).cloned()).collect();
        drop(st);
        if let Some(parts) = held {
            // The chunks are in memory: slices of them, no copy for a read
            // within one chunk.
            let piece = |i: usize, b: &Bytes| {
                let at = self.starts[first + i];
                let from = offset.saturating_sub(at) as usize;
                let to = ((end - at) as usize).min(b.len());
                b.slice(from..to)
            };
            if let [one] = &parts[..] {
                return Some(Ok(piece(0, one)));
            }
            let mut out = Vec::with_capacity((end - offset) as usize);
            for (i, b) in parts.iter().enumerate() {
                out.extend_from_slice(&piece(i, b));
            }
            return Some(Ok(Bytes::from(out)));
        }
        let mut buf = vec![0; (end - offset) as usize];
        Some(
            self.file
                .read_exact_at(&mut buf, offset)
                .map(|()| Bytes::from(buf)),
        )
    }
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
            let bytes: Vec<u8> = (0..1000 + i * 37).map(|j| (i * 7 + j) as u8).collect();
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
        for (from, to) in [(0, 10), (999, 1001), (5000, 9000), (0, content.len())] {
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
