//! File content: content-defined chunking (FastCDC v2020), blake3 chunk ids,
//! deduplicating upload, and verified reads.
//!
//! Owns: how bytes become chunks and back. Depends only on `store` (and the
//! shared `hash` vocabulary); knows nothing of trees, commits or refs.

use std::io::{Read, Write};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::hash::{ChunkRef, Hash};
use crate::store::{Store, StoreError};

/// Files up to this size live inside their directory node: one object
/// fewer per tiny file, which is most files in many lakes.
pub const INLINE_MAX: u64 = 4096;

/// Bytes of chunks uploaded per batch (many chunks in flight at once).
const UPLOAD_BATCH: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("reading {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, ChunkError>;

/// FastCDC size parameters, fixed per lake in `lake.json` (changing them
/// would stop new chunks from deduplicating against old ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Default for ChunkParams {
    /// 256 KiB / 1 MiB / 4 MiB: large enough that a 2 GiB file is ~2k
    /// objects (few requests, good S3 throughput), small enough that an
    /// append or edit re-uploads about a megabyte. See docs/BENCHMARKS.md.
    fn default() -> Self {
        ChunkParams {
            min: 256 << 10,
            avg: 1 << 20,
            max: 4 << 20,
        }
    }
}

/// What storing one file did.
#[derive(Debug, Default, Clone, Copy)]
pub struct StoreStats {
    pub bytes: u64,
    pub chunks: usize,
    pub new_chunks: usize,
}

/// A file's bytes as stored: small files inline, others as chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    Inline(Vec<u8>),
    Chunks(Vec<ChunkRef>),
}

/// Chunk `reader` and upload the chunks the store does not have yet.
pub fn store_content(
    store: &Store,
    params: ChunkParams,
    reader: impl Read,
    what: &str,
) -> Result<(Stored, StoreStats)> {
    store_content_seen(store, params, reader, what, |_| {})
}

/// `store_content`, telling `seen` each chunk's hash before it is put (a
/// caller that deletes chunks concurrently counts it as needed there).
pub fn store_content_seen(
    store: &Store,
    params: ChunkParams,
    reader: impl Read,
    what: &str,
    mut seen: impl FnMut(&Hash),
) -> Result<(Stored, StoreStats)> {
    let io = |e: std::io::Error| ChunkError::Io {
        what: what.to_string(),
        source: e,
    };
    let mut reader = reader;
    // Read the first INLINE_MAX + 1 bytes to decide inline vs chunked.
    let mut head = Vec::with_capacity(INLINE_MAX as usize + 1);
    (&mut reader)
        .take(INLINE_MAX + 1)
        .read_to_end(&mut head)
        .map_err(io)?;
    let mut stats = StoreStats::default();
    if head.len() as u64 <= INLINE_MAX {
        stats.bytes = head.len() as u64;
        // A copy of exactly its size: a small file's content is held for
        // as long as its file is (a mount's view and inodes hold every
        // file written), and a buffer shrunk in place may keep its room
        // (mimalloc's does, within a size class).
        return Ok((Stored::Inline(head.to_vec()), stats));
    }
    let source = std::io::Cursor::new(head).chain(reader);
    let mut uploads = Uploads::new(store.clone(), UPLOAD_BATCH);
    for chunk in fastcdc::v2020::StreamCDC::new(source, params.min, params.avg, params.max) {
        let chunk = chunk.map_err(|e| io(e.into()))?;
        stats.bytes += chunk.length as u64;
        uploads.add(chunk.data, &mut seen)?;
    }
    uploads.flush()?;
    stats.new_chunks = uploads.new_chunks;
    stats.chunks = uploads.refs.len();
    Ok((Stored::Chunks(uploads.refs), stats))
}

/// Chunks on their way into a store, in order: their refs, and their bytes
/// put many at a time once a batch is `limit` bytes (and at `flush`).
pub struct Uploads {
    store: Store,
    limit: usize,
    pub refs: Vec<ChunkRef>,
    batch: Vec<(String, Bytes)>,
    bytes: usize,
    /// Chunks the store did not have yet.
    pub new_chunks: usize,
}

impl Uploads {
    pub fn new(store: Store, limit: usize) -> Uploads {
        Uploads {
            store,
            limit,
            refs: Vec::new(),
            batch: Vec::new(),
            bytes: 0,
            new_chunks: 0,
        }
    }

    /// Add the next chunk; `seen` is told its hash before it is put.
    pub fn add(&mut self, data: Vec<u8>, seen: impl FnOnce(&Hash)) -> Result<()> {
        let hash = Hash::of(&data);
        seen(&hash);
        self.refs.push(ChunkRef {
            hash,
            len: data.len() as u32,
        });
        self.bytes += data.len();
        self.batch.push((hash.key("chunks"), Bytes::from(data)));
        if self.bytes >= self.limit {
            self.flush()?;
        }
        Ok(())
    }

    /// Put what is batched.
    pub fn flush(&mut self) -> Result<()> {
        self.bytes = 0;
        self.new_chunks += self
            .store
            .put_content_many(std::mem::take(&mut self.batch))?;
        Ok(())
    }
}

/// Content-defined cuts of bytes that arrive in pieces (a file written
/// through the mount): the same chunks `store_content` makes of the whole,
/// handed out as soon as no later byte can move their end.
pub struct Cutter {
    params: ChunkParams,
    tail: Vec<u8>,
}

impl Cutter {
    /// A cutter whose stream starts with `start`.
    pub fn new(params: ChunkParams, start: Vec<u8>) -> Cutter {
        Cutter {
            params,
            tail: start,
        }
    }

    /// Add bytes; returns the chunks that are final now.
    pub fn push(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        self.tail.extend_from_slice(data);
        // Cut only with room for several chunks: each byte is scanned about
        // once, not again with every small write.
        if self.tail.len() < 2 * self.params.max as usize {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut used = 0;
        for piece in self.cuts() {
            if used + piece.len() >= self.tail.len() {
                break; // more bytes may still move this cut
            }
            used += piece.len();
            out.push(piece.to_vec());
        }
        self.tail.drain(..used);
        out
    }

    /// The chunks of what is not cut yet, were the stream to end now.
    pub fn rest(&self) -> Vec<&[u8]> {
        self.cuts().collect()
    }

    /// The content-defined chunks of the bytes not cut yet.
    fn cuts(&self) -> impl Iterator<Item = &[u8]> {
        let p = self.params;
        fastcdc::v2020::FastCDC::new(&self.tail, p.min, p.avg, p.max)
            .map(|c| &self.tail[c.offset..c.offset + c.length])
    }

    /// The bytes not cut yet.
    pub fn tail(&self) -> &[u8] {
        &self.tail
    }
}

/// Read one chunk, verified.
pub fn read_chunk(store: &Store, hash: &Hash) -> Result<Bytes> {
    Ok(store.get_verified(&hash.key("chunks"), hash)?)
}

/// Write chunks, in order, to `out`, verifying every one. Chunks are
/// fetched a batch at a time, many in flight.
pub fn write_chunks(store: &Store, refs: &[ChunkRef], out: &mut impl Write) -> Result<u64> {
    let io = |e| ChunkError::Io {
        what: "output".into(),
        source: e,
    };
    let mut written = 0;
    for group in refs.chunks(16) {
        let keys: Vec<String> = group.iter().map(|c| c.hash.key("chunks")).collect();
        for (c, bytes) in group.iter().zip(store.get_many(&keys)?) {
            let key = c.hash.key("chunks");
            let bytes = bytes.ok_or_else(|| StoreError::Missing(key.clone()))?;
            let bytes = crate::store::verify(&key, &c.hash, bytes)?;
            out.write_all(&bytes).map_err(io)?;
            written += bytes.len() as u64;
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> Store {
        Store::open(&format!("memory://chunk-{}", ulid::Ulid::new())).unwrap()
    }

    fn chunks(s: Stored) -> Vec<ChunkRef> {
        match s {
            Stored::Chunks(c) => c,
            Stored::Inline(_) => panic!("expected chunks"),
        }
    }

    fn data(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn small_files_are_inline() {
        let s = setup();
        let (c, st) = store_content(&s, ChunkParams::default(), &b"hello"[..], "x").unwrap();
        assert_eq!(c, Stored::Inline(b"hello".to_vec()));
        assert_eq!(st.new_chunks, 0);
        // Held as long as its file is: no room left over (a mount writing
        // 50k small files held 250 MB of it).
        let Stored::Inline(v) = c else { unreachable!() };
        assert_eq!(v.capacity(), v.len());
    }

    #[test]
    fn round_trip_and_dedup() {
        let s = setup();
        let p = ChunkParams {
            min: 4096,
            avg: 16384,
            max: 65536,
        };
        let d = data(2_000_000, 7);
        let (c, st) = store_content(&s, p, &d[..], "x").unwrap();
        assert!(st.chunks > 10 && st.new_chunks == st.chunks);
        let mut out = Vec::new();
        write_chunks(&s, &chunks(c), &mut out).unwrap();
        assert_eq!(out, d);
        // Same bytes again: nothing new. Appended bytes: only the tail is new.
        let (_, st2) = store_content(&s, p, &d[..], "x").unwrap();
        assert_eq!(st2.new_chunks, 0);
        let mut d2 = d.clone();
        d2.extend_from_slice(&data(10_000, 9));
        let (_, st3) = store_content(&s, p, &d2[..], "x").unwrap();
        assert!(
            st3.new_chunks <= 2,
            "append uploaded {} chunks",
            st3.new_chunks
        );
    }

    #[test]
    fn pieces_are_cut_as_the_whole_is() {
        let s = setup();
        let p = ChunkParams {
            min: 4096,
            avg: 16384,
            max: 65536,
        };
        let d = data(1_500_000, 5);
        let whole = chunks(store_content(&s, p, &d[..], "x").unwrap().0);
        for piece in [1000, 4096, 65536, 100_000] {
            let mut cutter = Cutter::new(p, d[..10].to_vec());
            let mut got: Vec<Vec<u8>> = Vec::new();
            for part in d[10..].chunks(piece) {
                got.extend(cutter.push(part));
            }
            got.extend(cutter.rest().into_iter().map(|c| c.to_vec()));
            let refs: Vec<ChunkRef> = got
                .iter()
                .map(|c| ChunkRef {
                    hash: Hash::of(c),
                    len: c.len() as u32,
                })
                .collect();
            assert_eq!(refs, whole, "pieces of {piece} bytes");
        }
    }

    #[test]
    fn corrupt_chunk_is_never_served() {
        let s = setup();
        let d = data(100_000, 3);
        let p = ChunkParams {
            min: 4096,
            avg: 16384,
            max: 65536,
        };
        let (c, _) = store_content(&s, p, &d[..], "x").unwrap();
        let refs = chunks(c);
        s.put(&refs[1].hash.key("chunks"), Bytes::from_static(b"evil"))
            .unwrap();
        let mut out = Vec::new();
        assert!(matches!(
            write_chunks(&s, &refs, &mut out),
            Err(ChunkError::Store(StoreError::Corrupt { .. }))
        ));
    }
}
