//! The local chunk cache: a size-capped LRU of verified chunks on disk
//! (kept across remounts) in front of the store, a small in-memory LRU in
//! front of that, single-flight fetches, and a pool of read-ahead workers.
//! The same LRU holds whole-file copies of files read from their start
//! (see `assembly`), which the kernel can read directly.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use super::assembly::{self, Assembly};
use crate::hash::{ChunkRef, Hash};
use crate::store::source::SourceError;
use crate::store::{Store, StoreError};
use crate::tree::External;

/// Chunks kept decoded in memory: enough for every reader's current chunk
/// plus its read-ahead window, about 64 MiB at the default chunk size.
const MEMORY_CHUNKS: usize = 64;

/// Threads fetching read-ahead chunks; each keeps one store request in flight.
const PREFETCH_WORKERS: usize = 8;

type Slot = Arc<(Mutex<Option<Result<Bytes, String>>>, Condvar)>;

/// One file of the disk cache: a chunk, or a whole file's bytes.
#[derive(Clone, Copy)]
struct Cached {
    len: u64,
    whole: bool,
}

pub struct ChunkCache {
    store: Store,
    /// The lake is a local directory: its chunk files are as near as the
    /// cache's, so chunks are not copied into the cache, and whole-file
    /// copies are made after a file has been read whole rather than while
    /// it is read (the reader is not made to share the disk with them).
    local_lake: bool,
    dir: PathBuf,
    /// Whole-file copies, `files/<id>`.
    files: PathBuf,
    capacity: u64,
    used: AtomicU64,
    /// Chunks and whole files on disk, least recently used first out.
    disk: Mutex<lru::LruCache<Hash, Cached>>,
    /// Disk entries this daemon wrote or checked: not hashed again on use.
    verified: Mutex<HashSet<Hash>>,
    /// Whole-file copies being written, by file id.
    assembling: Mutex<HashMap<Hash, Arc<Assembly>>>,
    /// Signalled as each copy ends.
    copy_ended: Condvar,
    memory: Mutex<lru::LruCache<Hash, Bytes>>,
    inflight: Mutex<HashMap<Hash, Slot>>,
    prefetch: Mutex<Option<mpsc::Sender<Hash>>>,
    /// Chunks of files closed in write-back mode and not uploaded yet.
    journal: Mutex<Option<Store>>,
}

/// Every file in the cache's chunk directory. It is flat, so chunks cached
/// one after another sit together on disk, as the files of a local tree do
/// (caches from before kept them in `<2 hex>/` shards: moved up here).
fn cached_files(chunks: &Path) -> std::io::Result<Vec<fs::DirEntry>> {
    for shard in fs::read_dir(chunks)? {
        let shard = shard?;
        if shard.file_type()?.is_dir() {
            for f in fs::read_dir(shard.path())? {
                let f = f?;
                fs::rename(f.path(), chunks.join(f.file_name()))?;
            }
            fs::remove_dir(shard.path())?;
        }
    }
    fs::read_dir(chunks)?.collect()
}

impl ChunkCache {
    /// Open (or create) a cache directory, indexing the chunks already there.
    pub fn open(store: Store, dir: &Path, capacity: u64) -> std::io::Result<Arc<ChunkCache>> {
        let chunks = dir.join("chunks");
        let files = dir.join("files");
        fs::create_dir_all(&chunks)?;
        fs::create_dir_all(&files)?;
        let mut found = Vec::new();
        let whole = fs::read_dir(&files)?.collect::<std::io::Result<Vec<_>>>()?;
        for (f, is_whole) in cached_files(&chunks)?
            .into_iter()
            .map(|f| (f, false))
            .chain(whole.into_iter().map(|f| (f, true)))
        {
            let name = f.file_name();
            let Some(hash) = name.to_str().and_then(Hash::from_hex) else {
                let _ = fs::remove_file(f.path()); // a temp file from a crash
                continue;
            };
            let meta = f.metadata()?;
            found.push((meta.modified().ok(), hash, meta.len(), is_whole));
        }
        // Oldest first, so the most recently used end up most recent.
        found.sort_by_key(|(t, ..)| *t);
        let mut disk = lru::LruCache::unbounded();
        let mut used = 0;
        for (_, h, len, whole) in found {
            disk.put(h, Cached { len, whole });
            used += len;
        }
        let cache = Arc::new(ChunkCache {
            local_lake: store.is_local(),
            copy_ended: Condvar::new(),
            store,
            dir: chunks,
            files,
            capacity,
            used: AtomicU64::new(used),
            disk: Mutex::new(disk),
            verified: Mutex::new(HashSet::new()),
            assembling: Mutex::new(HashMap::new()),
            memory: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(MEMORY_CHUNKS).expect("non-zero"),
            )),
            inflight: Mutex::new(HashMap::new()),
            prefetch: Mutex::new(None),
            journal: Mutex::new(None),
        });
        cache.evict();
        let (tx, rx) = mpsc::channel::<Hash>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..PREFETCH_WORKERS {
            let rx = rx.clone();
            let weak = Arc::downgrade(&cache);
            std::thread::Builder::new()
                .name(format!("tarn-prefetch-{i}"))
                .spawn(move || loop {
                    let next = rx.lock().expect("prefetch queue").recv();
                    let Ok(hash) = next else { return };
                    let Some(cache) = weak.upgrade() else { return };
                    if let Err(e) = cache.get(&hash) {
                        tracing::debug!(%e, "read-ahead fetch failed");
                    }
                })?;
        }
        *cache.prefetch.lock() = Some(tx);
        Ok(cache)
    }

    fn path(&self, h: &Hash) -> PathBuf {
        self.dir.join(h.to_hex())
    }

    fn whole_path(&self, id: &Hash) -> PathBuf {
        self.files.join(id.to_hex())
    }

    fn path_of(&self, h: &Hash, whole: bool) -> PathBuf {
        if whole {
            self.whole_path(h)
        } else {
            self.path(h)
        }
    }

    /// Also read chunks from this store (the write-back journal's) when the
    /// lake does not have them yet.
    pub fn set_journal(&self, journal: Store) {
        *self.journal.lock() = Some(journal);
    }

    /// Is this chunk in memory or on disk already (no I/O)?
    pub fn is_cached(&self, h: &Hash) -> bool {
        self.memory.lock().contains(h) || self.disk.lock().contains(h)
    }

    /// A chunk's bytes, verified: from memory, the disk cache, or the store.
    /// Concurrent requests for the same chunk share one fetch.
    pub fn get(&self, h: &Hash) -> Result<Bytes, StoreError> {
        if let Some(b) = self.memory.lock().get(h) {
            return Ok(b.clone());
        }
        let (slot, leader) = {
            let mut inflight = self.inflight.lock();
            match inflight.get(h) {
                Some(s) => (s.clone(), false),
                None => {
                    let s: Slot = Arc::new((Mutex::new(None), Condvar::new()));
                    inflight.insert(*h, s.clone());
                    (s, true)
                }
            }
        };
        if !leader {
            let mut done = slot.0.lock();
            while done.is_none() {
                slot.1.wait(&mut done);
            }
            return match done.as_ref().expect("set") {
                Ok(b) => Ok(b.clone()),
                Err(e) => Err(StoreError::Missing(format!("{} ({e})", h.key("chunks")))),
            };
        }
        let result = self.fetch(h);
        self.inflight.lock().remove(h);
        *slot.0.lock() = Some(
            result
                .as_ref()
                .map(|b| b.clone())
                .map_err(|e| e.to_string()),
        );
        slot.1.notify_all();
        result
    }

    fn fetch(&self, h: &Hash) -> Result<Bytes, StoreError> {
        if let Some(b) = self.read_disk(h) {
            self.memory.lock().put(*h, b.clone());
            return Ok(b);
        }
        let bytes = self.read_store(h)?;
        self.memory.lock().put(*h, bytes.clone());
        if self.local_lake {
            return Ok(bytes);
        }
        if let Err(e) = self.write_disk(h, &bytes) {
            tracing::warn!(chunk = %h, %e, "cannot write the chunk cache");
        }
        Ok(bytes)
    }

    /// A chunk from the disk cache, verified; a bad copy is dropped.
    fn read_disk(&self, h: &Hash) -> Option<Bytes> {
        self.disk.lock().get(h)?;
        let key = h.key("chunks");
        match fs::read(self.path(h)) {
            Ok(b) => match crate::store::verify(&key, h, Bytes::from(b)) {
                Ok(b) => return Some(b),
                Err(_) => tracing::warn!(chunk = %h, "cached chunk is corrupt; fetching it again"),
            },
            Err(e) => tracing::warn!(chunk = %h, %e, "cached chunk unreadable; fetching it again"),
        }
        self.forget(h);
        None
    }

    /// A chunk from the lake, or from the write-back journal's store.
    fn read_store(&self, h: &Hash) -> Result<Bytes, StoreError> {
        let key = h.key("chunks");
        match self.store.get_verified(&key, h) {
            Err(StoreError::Missing(_)) if self.journal.lock().is_some() => {
                let journal = self.journal.lock().clone().expect("checked");
                journal.get_verified(&key, h)
            }
            r => r,
        }
    }

    /// A chunk's verified bytes for copying elsewhere: from memory, the disk
    /// cache or the store, without keeping a new copy in either cache.
    pub(super) fn get_passing(&self, h: &Hash) -> Result<Bytes, StoreError> {
        if let Some(b) = self.memory.lock().get(h) {
            return Ok(b.clone());
        }
        match self.read_disk(h) {
            Some(b) => Ok(b),
            None => self.read_store(h),
        }
    }

    fn write_disk(&self, h: &Hash, bytes: &[u8]) -> std::io::Result<()> {
        let path = self.path(h);
        let tmp = path.with_extension(format!("tmp{}", ulid::Ulid::new()));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        fs::rename(&tmp, &path)?;
        self.admit(*h, bytes.len() as u64, false);
        Ok(())
    }

    /// Count a new disk file (checked by this daemon) and evict to capacity.
    fn admit(&self, h: Hash, len: u64, whole: bool) {
        if self.disk.lock().put(h, Cached { len, whole }).is_none() {
            self.used.fetch_add(len, Ordering::Relaxed);
        }
        self.verified.lock().insert(h);
        self.evict();
    }

    fn forget(&self, h: &Hash) {
        if let Some(c) = self.disk.lock().pop(h) {
            self.used.fetch_sub(c.len, Ordering::Relaxed);
            let _ = fs::remove_file(self.path_of(h, c.whole));
        }
        self.verified.lock().remove(h);
    }

    fn evict(&self) {
        while self.used.load(Ordering::Relaxed) > self.capacity {
            let Some((h, c)) = self.disk.lock().pop_lru() else {
                return;
            };
            self.used.fetch_sub(c.len, Ordering::Relaxed);
            self.verified.lock().remove(&h);
            // Readers holding the file open keep reading it.
            let _ = fs::remove_file(self.path_of(&h, c.whole));
        }
    }

    /// The chunk as a verified local file, for the kernel to read directly
    /// (FUSE passthrough): a local lake's own chunk file, else the disk
    /// cache's copy, fetched first if needed. `None` when there is no such
    /// file (a local lake's chunk still in the write-back journal, a cache
    /// that could not keep it) or it is damaged: the daemon reads it then.
    pub fn local_file(&self, h: &Hash) -> Result<Option<fs::File>, StoreError> {
        let path = match self.store.local_path(&h.key("chunks")) {
            Some(p) => p,
            None => {
                if !self.disk.lock().contains(h) {
                    self.get(h)?;
                }
                self.path(h)
            }
        };
        if !self.verified.lock().contains(h) {
            let Ok(bytes) = fs::read(&path) else {
                return Ok(None);
            };
            if &Hash::of(&bytes) != h {
                if self.local_lake {
                    // Reading it through the daemon reports the damage.
                    return Ok(None);
                }
                tracing::warn!(chunk = %h, "cached chunk is corrupt; dropping it");
                self.forget(h);
                return Ok(None);
            }
            self.verified.lock().insert(*h);
        }
        self.disk.lock().promote(h);
        Ok(fs::File::open(&path).ok())
    }

    /// Is the lake a local directory? Its chunks are then read (and passed
    /// through) from its own files, and whole-file copies are made once a
    /// file has been read whole, not while it is read (see `local_lake`).
    pub fn local_lake(&self) -> bool {
        self.local_lake
    }

    /// Let the whole-file copies being made finish, for at most `max`
    /// (when the mount ends: a copy left half-made is wasted work).
    pub fn finish_copies(&self, max: std::time::Duration) {
        let deadline = std::time::Instant::now() + max;
        let mut running = self.assembling.lock();
        while !running.is_empty() {
            if self
                .copy_ended
                .wait_until(&mut running, deadline)
                .timed_out()
            {
                tracing::info!("whole-file copies left unfinished");
                return;
            }
        }
    }

    /// The whole-file copy of a file made of `chunks`, verified, if the
    /// cache has one: the kernel can read it directly (passthrough), and
    /// the daemon serves reads from it without looking at chunks.
    pub fn whole_file(&self, chunks: &[ChunkRef]) -> Option<fs::File> {
        let id = assembly::file_id(chunks);
        if !self.disk.lock().get(&id).is_some_and(|c| c.whole) {
            return None;
        }
        let file = fs::File::open(self.whole_path(&id)).ok();
        let checked = self.verified.lock().contains(&id);
        let file = match file {
            Some(f) if checked || assembly::verify(&f, chunks) => f,
            _ => {
                tracing::warn!(file = %id, "cached whole file is corrupt; dropping it");
                self.forget(&id);
                return None;
            }
        };
        self.verified.lock().insert(id);
        Some(file)
    }

    /// The assembly of a whole-file copy of `chunks` in progress, or (with
    /// `start`) a new one, if the copy would fit in the cache comfortably.
    pub fn assembly(self: &Arc<Self>, chunks: &[ChunkRef], start: bool) -> Option<Arc<Assembly>> {
        let id = assembly::file_id(chunks);
        let mut running = self.assembling.lock();
        if let Some(a) = running.get(&id) {
            return Some(a.clone());
        }
        let size: u64 = chunks.iter().map(|c| c.len as u64).sum();
        if !start || size > self.capacity / 4 || self.disk.lock().contains(&id) {
            return None;
        }
        let tmp = self
            .files
            .join(format!("{}.tmp{}", id.to_hex(), ulid::Ulid::new()));
        match Assembly::start(self.clone(), id, chunks.to_vec(), &tmp) {
            Ok(a) => {
                running.insert(id, a.clone());
                Some(a)
            }
            Err(e) => {
                tracing::warn!(%e, "cannot start a whole-file copy");
                None
            }
        }
    }

    /// An assembly ended: keep its file (complete) or drop it (failed).
    pub(super) fn assembled(&self, id: Hash, tmp: &Path, size: u64, complete: bool) {
        if complete && fs::rename(tmp, self.whole_path(&id)).is_ok() {
            self.admit(id, size, true);
        } else {
            let _ = fs::remove_file(tmp);
        }
        self.assembling.lock().remove(&id);
        self.copy_ended.notify_all();
    }

    /// Piece `index` (of `EXTERNAL_PIECE` bytes) of an imported object, read
    /// in place. Cached under an id made of the object's recorded identity
    /// and the piece's place, so a changed source never matches old pieces:
    /// reading it from the source fails instead. On disk a piece carries its
    /// blake3 after its bytes, checked on every read.
    pub fn get_external(
        &self,
        ext: &External,
        size: u64,
        index: u64,
    ) -> Result<Bytes, SourceError> {
        let id = {
            let mut h = blake3::Hasher::new();
            for part in [
                ext.url.as_bytes(),
                ext.etag.as_deref().unwrap_or("").as_bytes(),
                ext.version.as_deref().unwrap_or("").as_bytes(),
                &size.to_le_bytes(),
                &index.to_le_bytes(),
            ] {
                h.update(&(part.len() as u64).to_le_bytes());
                h.update(part);
            }
            Hash(*h.finalize().as_bytes())
        };
        if let Some(b) = self.memory.lock().get(&id) {
            return Ok(b.clone());
        }
        if self.disk.lock().get(&id).is_some() {
            if let Ok(stored) = fs::read(self.path(&id)) {
                if stored.len() >= 32 {
                    let (bytes, sum) = stored.split_at(stored.len() - 32);
                    if Hash::of(bytes).0 == sum {
                        let b = Bytes::copy_from_slice(bytes);
                        self.memory.lock().put(id, b.clone());
                        return Ok(b);
                    }
                }
            }
            tracing::warn!(url = %ext.url, index, "cached piece is corrupt; reading it again");
            self.forget(&id);
        }
        let piece = crate::repo::EXTERNAL_PIECE;
        let start = index * piece;
        let bytes = crate::store::source::read_range(
            &ext.url,
            ext.etag.as_deref(),
            ext.version.as_deref(),
            size,
            start,
            start + piece,
        )?;
        self.memory.lock().put(id, bytes.clone());
        let mut stored = Vec::with_capacity(bytes.len() + 32);
        stored.extend_from_slice(&bytes);
        stored.extend_from_slice(&Hash::of(&bytes).0);
        if let Err(e) = self.write_disk(&id, &stored) {
            tracing::warn!(url = %ext.url, %e, "cannot write the chunk cache");
        }
        Ok(bytes)
    }

    /// Check every file of a (not mounted) cache directory and delete the
    /// ones that do not verify: chunks must hash to their name, pieces of
    /// imported objects to the blake3 they carry. Returns (checked, removed).
    pub fn repair(dir: &Path) -> std::io::Result<(u64, u64)> {
        // Whole-file copies are checked against their file's chunk list
        // when first used; without it they cannot be checked here.
        let _ = fs::remove_dir_all(dir.join("files"));
        let chunks = dir.join("chunks");
        let (mut checked, mut removed) = (0, 0);
        if !chunks.is_dir() {
            return Ok((0, 0));
        }
        for f in cached_files(&chunks)? {
            checked += 1;
            let name = Hash::from_hex(&f.file_name().to_string_lossy());
            let bytes = fs::read(f.path())?;
            let chunk_ok = name == Some(Hash::of(&bytes));
            let piece_ok = bytes.len() >= 32 && {
                let (b, sum) = bytes.split_at(bytes.len() - 32);
                Hash::of(b).0 == sum
            };
            if name.is_none() || !(chunk_ok || piece_ok) {
                fs::remove_file(f.path())?;
                removed += 1;
            }
        }
        Ok((checked, removed))
    }

    /// Queue chunks for background fetching (read-ahead).
    pub fn prefetch(&self, hashes: impl IntoIterator<Item = Hash>) {
        let tx = self.prefetch.lock().clone();
        if let Some(tx) = tx {
            for h in hashes {
                if !self.is_cached(&h) && !self.inflight.lock().contains_key(&h) {
                    let _ = tx.send(h);
                }
            }
        }
    }

    /// Bytes of chunks on disk.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caches_verifies_evicts_and_survives_reopen() {
        let store = Store::open(&format!("memory://cache-{}", ulid::Ulid::new())).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<(Hash, Bytes)> = (0..5u8)
            .map(|i| {
                let b = Bytes::from(vec![i; 1000]);
                (Hash::of(&b), b)
            })
            .collect();
        for (h, b) in &chunks {
            store.put(&h.key("chunks"), b.clone()).unwrap();
        }
        let cache = ChunkCache::open(store.clone(), dir.path(), 3000).unwrap();
        for (h, b) in &chunks {
            assert_eq!(&cache.get(h).unwrap(), b);
        }
        assert!(cache.used() <= 3000, "evicted down to capacity");
        // The store loses a chunk; the cached copy still serves it.
        let (h4, b4) = &chunks[4];
        store.delete(&h4.key("chunks")).unwrap();
        drop(cache);
        let cache = ChunkCache::open(store.clone(), dir.path(), 3000).unwrap();
        assert_eq!(&cache.get(h4).unwrap(), b4, "disk cache survives a reopen");
        // A corrupt cache file is detected and refetched, never served.
        let (h3, b3) = &chunks[3];
        fs::write(cache.path(h3), b"junk").unwrap();
        let cache = ChunkCache::open(store.clone(), dir.path(), 3000).unwrap();
        assert_eq!(&cache.get(h3).unwrap(), b3);
        // Corrupt in the store and not cached: an error, not bytes.
        let (h0, _) = &chunks[0];
        store
            .put(&h0.key("chunks"), Bytes::from_static(b"evil"))
            .unwrap();
        let cold = ChunkCache::open(store, tempfile::tempdir().unwrap().path(), 3000).unwrap();
        assert!(cold.get(h0).is_err());
    }
}
