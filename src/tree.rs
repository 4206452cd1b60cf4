//! Immutable Merkle directory trees.
//!
//! Owns: entries (file, directory, symlink), the node encoding, prolly-tree
//! directories (content-defined B-trees of name → entry), lookup, ordered
//! listing with pagination, and `apply(ops)`, the one function that turns a
//! sequence of staged operations into a new tree. Depends only on `store`;
//! knows nothing of commits, refs or chunking.
//!
//! A directory is a sorted map stored as a prolly tree: a node ends after an
//! item when the hash of the item's key (salted by the level) falls under a
//! threshold, subject to minimum and maximum node sizes. Boundaries therefore
//! depend only on the content, so the same entries always give the same
//! nodes and root hash whatever the order of edits (history independence),
//! and an edit rewrites only the nodes on its path plus, rarely, a neighbour.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::hash::{ChunkRef, Hash};
use crate::store::{Store, StoreError};

/// Leading byte of every node encoding; bump when the encoding changes.
pub const NODE_FORMAT: u8 = 1;

/// Average items per node: about 4 KiB per node for typical names, small
/// enough that one edit rewrites little, big enough that 1M entries are
/// four levels deep.
const AVG_ITEMS: u32 = 32;
/// Never end a node before this many items (except the last node of a level).
const MIN_ITEMS: usize = 4;
/// Always end a node at this many items, so adversarial names cannot make a
/// single huge node.
const MAX_ITEMS: usize = 1024;
/// Always end a node once its items weigh this many bytes (roughly their
/// encoded size), so directories of inline files keep small nodes too.
const MAX_NODE_BYTES: usize = 64 << 10;

/// Decoded nodes kept in memory per `Trees` handle (and its scratch
/// handles): at most this many...
const NODE_CACHE: usize = 16 * 1024;

/// ...weighing at most this much (`Node::encoded_size`): leaves of small
/// files hold their content, up to `MAX_NODE_BYTES` each.
const NODE_CACHE_BYTES: usize = 128 << 20;

/// `flush_reachable` puts nodes in groups of about this many bytes: enough
/// to keep the store's parallel puts busy, little beside a commit's hold.
const FLUSH_GROUP_BYTES: usize = 32 << 20;

/// Decoded nodes by hash, least recently used dropped first, bounded in
/// count and in bytes.
struct NodeCache {
    nodes: lru::LruCache<Hash, (Arc<Node>, usize)>,
    bytes: usize,
    max_bytes: usize,
}

impl NodeCache {
    fn new(max_nodes: usize, max_bytes: usize) -> NodeCache {
        NodeCache {
            nodes: lru::LruCache::new(NonZeroUsize::new(max_nodes.max(1)).expect("non-zero")),
            bytes: 0,
            max_bytes,
        }
    }

    fn get(&mut self, hash: &Hash) -> Option<Arc<Node>> {
        self.nodes.get(hash).map(|(n, _)| n.clone())
    }

    fn put(&mut self, hash: Hash, node: Arc<Node>) {
        let size = node.encoded_size();
        if let Some((_, (_, old))) = self.nodes.push(hash, (node, size)) {
            // The same hash again, or the least recently used pushed out.
            self.bytes -= old;
        }
        self.bytes += size;
        while self.bytes > self.max_bytes && self.nodes.len() > 1 {
            match self.nodes.pop_lru() {
                Some((_, (_, old))) => self.bytes -= old,
                None => break,
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("node {0} cannot be decoded (corrupt or from a newer tarn)")]
    Decode(String),
    #[error("bad path {path:?}: {why}")]
    BadPath { path: String, why: &'static str },
    #[error("{0} is an imported object, read in place")]
    External(String),
    #[error("working tree spill file {0}: {1}")]
    Spill(std::path::PathBuf, std::io::Error),
}

pub type Result<T> = std::result::Result<T, TreeError>;

/// A file read in place from outside the lake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct External {
    pub url: String,
    pub etag: Option<String>,
    pub version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Content {
    /// Small files live in the directory node itself. Encoded as bytes, not
    /// a sequence of u8 (the same bytes in postcard, written in one copy);
    /// shared, not copied, as an entry passes through staging, journal and
    /// tree updates.
    Inline(bytes::Bytes),
    /// Chunks in file order.
    Chunks(Vec<ChunkRef>),
    /// A long chunk list, moved to its own node.
    Manifest(Hash),
    External(External),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct File {
    pub size: u64,
    pub mode: u32,
    /// Nanoseconds since the Unix epoch.
    pub mtime: i64,
    pub content: Content,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    File(File),
    Dir(Hash),
    Symlink(String),
}

impl Entry {
    pub fn kind(&self) -> &'static str {
        match self {
            Entry::File(_) => "file",
            Entry::Dir(_) => "dir",
            Entry::Symlink(_) => "symlink",
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Entry::File(f) => f.size,
            Entry::Dir(_) => 0,
            Entry::Symlink(t) => t.len() as u64,
        }
    }

    /// About how many bytes the entry takes encoded (what buffers for
    /// encodings are sized by, and where nodes are cut).
    fn encoded_size(&self) -> usize {
        let content = match self {
            Entry::File(File {
                content: Content::Inline(b),
                ..
            }) => b.len(),
            Entry::File(File {
                content: Content::Chunks(c),
                ..
            }) => c.len() * 36,
            Entry::File(File {
                content: Content::External(e),
                ..
            }) => e.url.len() + 64,
            Entry::Symlink(t) => t.len(),
            _ => 0,
        };
        content + 48
    }
}

/// A child pointer in an internal node: the child's first key, its hash,
/// and how many entries its subtree holds (for counts and offsets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Child {
    pub first: String,
    pub hash: Hash,
    pub count: u64,
}

/// Every object under `nodes/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Node {
    Leaf(Vec<(String, Entry)>),
    Internal {
        level: u8,
        children: Vec<Child>,
    },
    /// The chunk list of a large file.
    Manifest(Vec<ChunkRef>),
}

/// Where postcard output goes: a buffer, or straight into a hash.
trait Sink {
    fn put(&mut self, data: &[u8]);
}

impl Sink for Vec<u8> {
    fn put(&mut self, data: &[u8]) {
        self.extend_from_slice(data);
    }
}

/// Hashes an encoding as it is produced, gathered into runs of `GATHER`
/// bytes first: the hasher works on many 1 KiB blocks at once only when it
/// is handed them together (several times faster than piece by piece).
const GATHER: usize = 64 << 10;

struct Hashing {
    hasher: blake3::Hasher,
    gathered: Vec<u8>,
}

impl Hashing {
    /// For an encoding of about `size` bytes.
    fn new(size: usize) -> Hashing {
        Hashing {
            hasher: blake3::Hasher::new(),
            gathered: Vec::with_capacity(size.min(GATHER)),
        }
    }

    fn finish(mut self) -> Hash {
        self.hasher.update(&self.gathered);
        Hash(*self.hasher.finalize().as_bytes())
    }
}

impl Sink for Hashing {
    fn put(&mut self, data: &[u8]) {
        if self.gathered.len() + data.len() > GATHER {
            self.hasher.update(&self.gathered);
            self.gathered.clear();
        }
        if data.len() >= GATHER {
            self.hasher.update(data);
        } else {
            self.gathered.extend_from_slice(data);
        }
    }
}

/// A postcard flavor over a sink. Byte runs (inline file content) go in
/// whole; `postcard::to_extend` pushes them a byte at a time.
struct Flavored<S>(S);

impl<S: Sink> postcard::ser_flavors::Flavor for Flavored<S> {
    type Output = S;
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.put(data);
        Ok(())
    }
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.put(&[data]);
        Ok(())
    }
    fn finalize(self) -> postcard::Result<S> {
        Ok(self.0)
    }
}

/// `value` in postcard after `prefix`, into `sink`.
fn encode_into<S: Sink, T: Serialize + ?Sized>(prefix: &[u8], value: &T, mut sink: S) -> S {
    sink.put(prefix);
    postcard::serialize_with_flavor(value, Flavored(sink)).expect("in-memory encoding cannot fail")
}

/// `value` in postcard after `prefix` (a header to fill in later), in a
/// buffer sized for about `size_hint` bytes of encoding.
pub fn encode_after<T: Serialize + ?Sized>(prefix: &[u8], value: &T, size_hint: usize) -> Vec<u8> {
    encode_into(
        prefix,
        value,
        Vec::with_capacity(prefix.len() + size_hint.max(64)),
    )
}

/// `encode_after`, in `buf` (emptied first; it grows as needed): for
/// callers that encode one value after another.
pub fn encode_after_in<T: Serialize + ?Sized>(
    prefix: &[u8],
    value: &T,
    mut buf: Vec<u8>,
) -> Vec<u8> {
    buf.clear();
    encode_into(prefix, value, buf)
}

/// `value` in postcard after a format byte, in a buffer sized for about
/// `size_hint` bytes.
pub fn encode_tagged<T: Serialize + ?Sized>(format: u8, value: &T, size_hint: usize) -> Vec<u8> {
    encode_after(&[format], value, size_hint)
}

impl Node {
    pub fn encode(&self) -> Vec<u8> {
        encode_tagged(NODE_FORMAT, self, self.encoded_size())
    }

    /// The hash of `encode()`, without keeping the encoding.
    pub fn hash(&self) -> Hash {
        encode_into(&[NODE_FORMAT], self, Hashing::new(self.encoded_size())).finish()
    }

    /// About how many bytes `encode()` makes.
    fn encoded_size(&self) -> usize {
        16 + match self {
            Node::Leaf(items) => items.iter().map(Item::weight).sum(),
            Node::Internal { children, .. } => children.iter().map(Item::weight).sum::<usize>(),
            Node::Manifest(refs) => refs.len() * 40,
        }
    }

    /// `decode`, the error naming the node by `hash`.
    fn decode_as(hash: &Hash, bytes: &[u8]) -> Result<Node> {
        Node::decode(bytes).map_err(|_| TreeError::Decode(hash.to_hex()))
    }

    pub fn decode(bytes: &[u8]) -> std::result::Result<Node, postcard::Error> {
        match bytes.split_first() {
            Some((&NODE_FORMAT, rest)) => postcard::from_bytes(rest),
            _ => Err(postcard::Error::DeserializeBadEncoding),
        }
    }

    /// The nodes this one points at: children, directories and manifests.
    fn links(&self, out: &mut Vec<Hash>) {
        match self {
            Node::Internal { children, .. } => out.extend(children.iter().map(|c| c.hash)),
            Node::Leaf(items) => {
                for (_, e) in items {
                    match e {
                        Entry::Dir(d) => out.push(*d),
                        Entry::File(File {
                            content: Content::Manifest(m),
                            ..
                        }) => out.push(*m),
                        _ => {}
                    }
                }
            }
            Node::Manifest(_) => {}
        }
    }

    fn level(&self) -> u8 {
        match self {
            Node::Internal { level, .. } => *level,
            _ => 0,
        }
    }

    fn count(&self) -> u64 {
        match self {
            Node::Leaf(items) => items.len() as u64,
            Node::Internal { children, .. } => children.iter().map(|c| c.count).sum(),
            Node::Manifest(c) => c.len() as u64,
        }
    }

    fn first_key(&self) -> Option<&str> {
        match self {
            Node::Leaf(items) => items.first().map(|(k, _)| k.as_str()),
            Node::Internal { children, .. } => children.first().map(|c| c.first.as_str()),
            Node::Manifest(_) => None,
        }
    }
}

/// A staged operation on a tree. Paths are `/`-separated, relative to the
/// tree root, already validated by `check_path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Create or replace the entry at `path`; missing parents are created,
    /// a file standing where a parent directory should be is replaced.
    Put { path: String, entry: Entry },
    /// Remove `path` and everything under it; a missing path is a no-op.
    Delete { path: String },
    /// Move `from` (with its subtree) to `to`, replacing what was there.
    /// A missing `from`, or `to` inside `from`, is a no-op.
    Move { from: String, to: String },
    /// A `Put` of another repository's entry (`repo`'s `commit`, at
    /// `source`), applied exactly like `Put`; the commit that applies it
    /// records where it came from (lineage).
    Graft {
        path: String,
        entry: Entry,
        repo: String,
        commit: Hash,
        source: String,
    },
}

impl Op {
    /// About how many bytes the op takes encoded (see `Entry::encoded_size`).
    pub fn encoded_size(&self) -> usize {
        match self {
            Op::Put { path, entry } | Op::Graft { path, entry, .. } => {
                path.len() + entry.encoded_size() + 80
            }
            Op::Delete { path } => path.len() + 8,
            Op::Move { from, to } => from.len() + to.len() + 8,
        }
    }
}

/// Validate and normalise a path inside a tree: no empty, `.` or `..`
/// components, no NUL, each component at most 255 bytes. `""` is the root.
pub fn check_path(path: &str) -> Result<String> {
    let bad = |why| TreeError::BadPath {
        path: path.to_string(),
        why,
    };
    let trimmed = path.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    for c in trimmed.split('/') {
        match c {
            "" => return Err(bad("empty path component")),
            "." | ".." => return Err(bad("'.' and '..' are not allowed")),
            _ if c.contains('\0') => return Err(bad("NUL in name")),
            _ if c.len() > 255 => return Err(bad("name longer than 255 bytes")),
            _ => {}
        }
    }
    Ok(trimmed.to_string())
}

fn split_parent(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

fn components(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|c| !c.is_empty())
}

/// Should a node at `level` end after an item with `key`, given it would then
/// hold `len` items?
fn is_boundary(level: u8, key: &str, len: usize, bytes: usize) -> bool {
    if len >= MAX_ITEMS || bytes >= MAX_NODE_BYTES {
        return true;
    }
    if len < MIN_ITEMS {
        return false;
    }
    let mut h = blake3::Hasher::new();
    h.update(&[level]);
    h.update(key.as_bytes());
    let d = h.finalize();
    let x = u32::from_le_bytes(d.as_bytes()[..4].try_into().expect("4 bytes"));
    x < u32::MAX / AVG_ITEMS
}

/// Items stored at one level of a prolly tree.
trait Item: Clone {
    fn key(&self) -> &str;
    /// About how many bytes the item takes in an encoded node.
    fn weight(&self) -> usize;
    fn items(node: &Node) -> &[Self];
    fn node(level: u8, items: Vec<Self>) -> Node;
}

impl Item for (String, Entry) {
    fn key(&self) -> &str {
        &self.0
    }
    fn weight(&self) -> usize {
        self.0.len() + self.1.encoded_size()
    }
    fn items(node: &Node) -> &[Self] {
        match node {
            Node::Leaf(items) => items,
            _ => &[],
        }
    }
    fn node(_: u8, items: Vec<Self>) -> Node {
        Node::Leaf(items)
    }
}

impl Item for Child {
    fn key(&self) -> &str {
        &self.first
    }
    fn weight(&self) -> usize {
        self.first.len() + 44
    }
    fn items(node: &Node) -> &[Self] {
        match node {
            Node::Internal { children, .. } => children,
            _ => &[],
        }
    }
    fn node(level: u8, children: Vec<Self>) -> Node {
        Node::Internal { level, children }
    }
}

/// Cuts a stream of items into nodes at content-defined boundaries.
struct Chunker<'a, I: Item> {
    trees: &'a Trees,
    level: u8,
    buf: Vec<I>,
    bytes: usize,
    out: Vec<Child>,
}

impl<'a, I: Item> Chunker<'a, I> {
    fn new(trees: &'a Trees, level: u8) -> Self {
        Chunker {
            trees,
            level,
            buf: Vec::new(),
            bytes: 0,
            out: Vec::new(),
        }
    }

    fn push(&mut self, item: I) {
        self.bytes += item.weight();
        let end = is_boundary(self.level, item.key(), self.buf.len() + 1, self.bytes);
        self.buf.push(item);
        if end {
            self.emit();
        }
    }

    fn emit(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let items = std::mem::take(&mut self.buf);
        self.bytes = 0;
        let node = I::node(self.level, items);
        let first = node.first_key().expect("non-empty").to_string();
        let count = node.count();
        let hash = self.trees.save(node);
        self.out.push(Child { first, hash, count });
    }
}

/// A position at one level of a tree: the path of (node, child index) from
/// the root down to the current node at that level.
struct Cursor {
    stack: Vec<(Arc<Node>, usize)>,
}

impl Cursor {
    /// The node at `level` where `key` belongs.
    fn seek(trees: &Trees, root: &Hash, level: u8, key: &str) -> Result<Cursor> {
        let mut node = trees.load(root)?;
        let mut stack = Vec::new();
        while node.level() > level {
            let Node::Internal { children, .. } = &*node else {
                unreachable!()
            };
            // The last child whose first key is <= key; keys below every
            // child belong to the first.
            let idx = children
                .partition_point(|c| c.first.as_str() <= key)
                .saturating_sub(1);
            let next = trees.load(&children[idx].hash)?;
            stack.push((node, idx));
            node = next;
        }
        stack.push((node, 0));
        Ok(Cursor { stack })
    }

    fn node(&self) -> &Arc<Node> {
        &self.stack.last().expect("cursor has a node").0
    }

    /// The key the current node is filed under in its parent, if it has one.
    fn key_in_parent(&self) -> Option<&str> {
        let n = self.stack.len();
        if n < 2 {
            return None;
        }
        let (parent, idx) = &self.stack[n - 2];
        let Node::Internal { children, .. } = &**parent else {
            unreachable!()
        };
        Some(&children[*idx].first)
    }

    /// First key of the node after this one at the same level.
    fn next_first(&self) -> Option<String> {
        for (node, idx) in self.stack[..self.stack.len() - 1].iter().rev() {
            let Node::Internal { children, .. } = &**node else {
                unreachable!()
            };
            if idx + 1 < children.len() {
                return Some(children[idx + 1].first.clone());
            }
        }
        None
    }

    /// Move to the next node at the same level; false at the end.
    fn advance(&mut self, trees: &Trees) -> Result<bool> {
        let level = self.node().level();
        self.stack.pop();
        loop {
            let Some((node, idx)) = self.stack.last_mut() else {
                return Ok(false);
            };
            let Node::Internal { children, .. } = &**node else {
                unreachable!()
            };
            if *idx + 1 < children.len() {
                *idx += 1;
                break;
            }
            self.stack.pop();
        }
        loop {
            let (node, idx) = self.stack.last().expect("non-empty");
            let Node::Internal { children, .. } = &**node else {
                unreachable!()
            };
            let child = trees.load(&children[*idx].hash)?;
            let done = child.level() == level;
            self.stack.push((child, 0));
            if done {
                return Ok(true);
            }
        }
    }
}

/// Sorted edits to one level: key → new item, or `None` to remove it.
type Edits<I> = Vec<(String, Option<I>)>;

/// Chunk lists longer than this move to a manifest node, so directory
/// nodes stay small whatever the file sizes.
const MANIFEST_AFTER: usize = 64;

/// A saved node not yet in the store: its encoding (when kept) and itself.
type Unwritten = (Option<Bytes>, Arc<Node>);

/// A node's encoding and the node.
type Encoded = (Bytes, Arc<Node>);

/// Where a scratch handle moves its unwritten nodes out of memory (a
/// mount's working view of a branch with many staged files: the leaves of
/// small files hold their content). Each spill is one file of encoded
/// nodes, written once, in a directory of its own on local disk, removed
/// with the last handle that uses it; never written to the store, never in
/// the shared node cache.
struct Spill {
    dir: PathBuf,
    /// Where each node moved here is: file, offset, length.
    moved: Mutex<HashMap<Hash, (u32, u64, u32)>>,
    /// The spill files, in order.
    files: Mutex<Vec<Arc<std::fs::File>>>,
    /// The ones read back lately.
    cache: Mutex<NodeCache>,
}

/// Nodes of a spill read back and kept in memory: at most this many, of
/// at most this many bytes.
const SPILL_CACHE: usize = 4096;
const SPILL_CACHE_BYTES: usize = 32 << 20;

impl Spill {
    /// Write nodes to a new spill file; they are found there once this
    /// returns.
    fn write(&self, nodes: &[(Hash, Arc<Node>)]) -> Result<()> {
        let mut files = self.files.lock();
        let n = files.len() as u32;
        let path = self.dir.join(n.to_string());
        let err = |e| TreeError::Spill(path.clone(), e);
        std::fs::create_dir_all(&self.dir).map_err(err)?;
        // Truncated, not created anew: a failed spill (a full disk) leaves
        // its file to the next one.
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(err)?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, &file);
        let mut at = Vec::with_capacity(nodes.len());
        let mut offset = 0u64;
        for (h, node) in nodes {
            let bytes = node.encode();
            at.push((*h, (n, offset, bytes.len() as u32)));
            offset += bytes.len() as u64;
            std::io::Write::write_all(&mut out, &bytes).map_err(err)?;
        }
        std::io::Write::flush(&mut out).map_err(err)?;
        drop(out);
        files.push(Arc::new(file));
        drop(files);
        self.moved.lock().extend(at);
        Ok(())
    }

    /// A node moved here, read back: its encoding as written (checked
    /// against its hash) and the node.
    fn read(&self, hash: &Hash) -> Result<Option<Encoded>> {
        let Some((file, offset, len)) = self.moved.lock().get(hash).copied() else {
            return Ok(None);
        };
        let f = self.files.lock()[file as usize].clone();
        let mut bytes = vec![0; len as usize];
        std::os::unix::fs::FileExt::read_exact_at(&*f, &mut bytes, offset)
            .map_err(|e| TreeError::Spill(self.dir.join(file.to_string()), e))?;
        if Hash::of(&bytes) != *hash {
            return Err(TreeError::Decode(hash.to_hex()));
        }
        let node = Arc::new(Node::decode_as(hash, &bytes)?);
        Ok(Some((Bytes::from(bytes), node)))
    }

    /// A node moved here, through the spill's own cache.
    fn get(&self, hash: &Hash) -> Result<Option<Arc<Node>>> {
        if !self.moved.lock().contains_key(hash) {
            return Ok(None);
        }
        if let Some(n) = self.cache.lock().get(hash) {
            return Ok(Some(n));
        }
        let Some((_, node)) = self.read(hash)? else {
            return Ok(None);
        };
        self.cache.lock().put(*hash, node.clone());
        Ok(Some(node))
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A handle for reading and writing trees in one lake. New nodes are kept
/// in memory until `flush` writes them (in parallel) to the store.
pub struct Trees {
    store: Store,
    cache: Arc<Mutex<NodeCache>>,
    /// Nodes saved but not yet written, and their encoding when they are
    /// meant to be written (see `scratch`).
    pending: Mutex<HashMap<Hash, Unwritten>>,
    /// Keep the encoding of saved nodes for `flush` (a scratch handle only
    /// needs their hashes).
    keeps_bytes: bool,
    /// Where unwritten nodes go once they weigh too much (`spill_over`).
    spill: Option<Arc<Spill>>,
    /// What the unwritten nodes weigh (see `weight`).
    pending_weight: AtomicUsize,
}

impl Trees {
    pub fn new(store: Store) -> Trees {
        Trees {
            store,
            cache: Arc::new(Mutex::new(NodeCache::new(NODE_CACHE, NODE_CACHE_BYTES))),
            pending: Mutex::new(HashMap::new()),
            keeps_bytes: true,
            spill: None,
            pending_weight: AtomicUsize::new(0),
        }
    }

    /// A handle sharing this one's store and node cache but with its own
    /// unwritten nodes: for trees that are computed, read, and dropped
    /// (a mount's working view) without ever being written to the store.
    pub fn scratch(&self) -> Trees {
        Trees {
            store: self.store.clone(),
            cache: self.cache.clone(),
            pending: Mutex::new(HashMap::new()),
            keeps_bytes: false,
            spill: None,
            pending_weight: AtomicUsize::new(0),
        }
    }

    /// `scratch`, able to move its unwritten nodes to files in `dir` (made
    /// by the first spill; removed once no handle uses it) when
    /// `spill_over` is called.
    pub fn scratch_spilling(&self, dir: PathBuf) -> Trees {
        let mut t = self.scratch();
        t.spill = Some(Arc::new(Spill {
            dir,
            moved: Mutex::new(HashMap::new()),
            files: Mutex::new(Vec::new()),
            cache: Mutex::new(NodeCache::new(SPILL_CACHE, SPILL_CACHE_BYTES)),
        }));
        t
    }

    /// If the unwritten nodes weigh more than `limit` bytes, move them all
    /// to the spill (no-op without one); they are read back when needed.
    /// All at once, so a node moved never points at one left in memory.
    /// Returns how many moved.
    pub fn spill_over(&self, limit: usize) -> Result<usize> {
        let Some(spill) = &self.spill else {
            return Ok(0);
        };
        if self.pending_weight.load(Ordering::Relaxed) <= limit {
            return Ok(0);
        }
        // Written while still in `pending`, so they can be loaded all along.
        let nodes: Vec<(Hash, Arc<Node>)> = self
            .pending
            .lock()
            .iter()
            .map(|(h, (_, n))| (*h, n.clone()))
            .collect();
        spill.write(&nodes)?;
        let mut pending = self.pending.lock();
        for (h, n) in &nodes {
            if pending.remove(h).is_some() {
                self.pending_weight
                    .fetch_sub(self.weight(n), Ordering::Relaxed);
            }
        }
        Ok(nodes.len())
    }

    /// How many nodes are waiting for `flush`.
    pub fn pending_nodes(&self) -> usize {
        self.pending.lock().len()
    }

    /// What the nodes waiting for `flush` weigh (`weight`).
    pub fn pending_weight(&self) -> usize {
        self.pending_weight.load(Ordering::Relaxed)
    }

    /// What a queued node counts for in `pending_weight`: its encoded size
    /// in a handle that can spill (what a spill would write), else nothing.
    fn weight(&self, node: &Node) -> usize {
        if self.spill.is_some() {
            node.encoded_size()
        } else {
            0
        }
    }

    /// A handle like `scratch`, keeping only the unwritten nodes reachable
    /// from `roots`: a long-lived working view drops the intermediate nodes
    /// of every edit it applied. Nodes in the store never point at unwritten
    /// ones, so the walk stops at the first stored node on each path.
    pub fn retain_reachable(&self, roots: &[Hash]) -> Trees {
        let mut kept = self.scratch();
        kept.spill = self.spill.clone();
        let pending = self.pending.lock();
        let mut keep = kept.pending.lock();
        let mut stack: Vec<Hash> = roots.to_vec();
        while let Some(h) = stack.pop() {
            let Some((bytes, node)) = pending.get(&h) else {
                continue;
            };
            if keep.insert(h, (bytes.clone(), node.clone())).is_some() {
                continue;
            }
            kept.pending_weight
                .fetch_add(kept.weight(node), Ordering::Relaxed);
            node.links(&mut stack);
        }
        drop(keep);
        kept
    }

    /// Is this node saved here (in memory or spilled) and not yet written?
    fn unwritten(&self, hash: &Hash) -> bool {
        self.pending.lock().contains_key(hash)
            || self
                .spill
                .as_ref()
                .is_some_and(|s| s.moved.lock().contains_key(hash))
    }

    /// Write to the store the unwritten nodes (in memory or spilled) that
    /// `root` reaches, in post order, a bounded group at a time (each group
    /// in parallel, as `flush` does). Nodes it does not reach (the
    /// checkpoints of an `Applying`) are never written. Returns how many
    /// were.
    pub fn flush_reachable(&self, root: &Hash) -> Result<usize> {
        let mut seen = std::collections::HashSet::new();
        // (node, and once its links are pushed, its encoding and itself)
        let mut stack: Vec<(Hash, Option<Encoded>)> = vec![(*root, None)];
        let mut group: Vec<(String, Bytes)> = Vec::new();
        let mut group_bytes = 0;
        let mut done: Vec<(Hash, Arc<Node>)> = Vec::new();
        let mut written = 0;
        while let Some((hash, node)) = stack.pop() {
            if let Some((bytes, node)) = node {
                group_bytes += bytes.len();
                group.push((hash.key("nodes"), bytes));
                done.push((hash, node));
                if group_bytes >= FLUSH_GROUP_BYTES {
                    written += self.write_flushed(std::mem::take(&mut group), &mut done)?;
                    group_bytes = 0;
                }
                continue;
            }
            if !self.unwritten(&hash) || !seen.insert(hash) {
                continue;
            }
            let (bytes, node) = self.encoded(&hash)?;
            let mut links = Vec::new();
            node.links(&mut links);
            stack.push((hash, Some((bytes, node))));
            stack.extend(links.into_iter().map(|h| (h, None)));
        }
        written += self.write_flushed(group, &mut done)?;
        Ok(written)
    }

    /// Put one group of `flush_reachable`; its nodes leave the unwritten
    /// ones for the shared cache, as in `flush`.
    fn write_flushed(
        &self,
        group: Vec<(String, Bytes)>,
        done: &mut Vec<(Hash, Arc<Node>)>,
    ) -> Result<usize> {
        if group.is_empty() {
            return Ok(0);
        }
        let n = self.store.put_content_many(group)?;
        let mut pending = self.pending.lock();
        for (h, node) in done.drain(..) {
            if pending.remove(&h).is_some() {
                self.pending_weight
                    .fetch_sub(self.weight(&node), Ordering::Relaxed);
            }
            self.cache.lock().put(h, node);
        }
        Ok(n)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Load a node, verified against its hash.
    pub fn load(&self, hash: &Hash) -> Result<Arc<Node>> {
        if let Some(n) = self.cache.lock().get(hash) {
            return Ok(n);
        }
        // Unwritten nodes stay out of the shared cache: another handle must
        // never find a node it could not load again.
        if let Some((_, n)) = self.pending.lock().get(hash) {
            return Ok(n.clone());
        }
        if let Some(spill) = &self.spill {
            if let Some(n) = spill.get(hash)? {
                return Ok(n);
            }
        }
        let bytes = self.store.get_verified(&hash.key("nodes"), hash)?;
        let node = Arc::new(Node::decode_as(hash, &bytes)?);
        self.cache.lock().put(*hash, node.clone());
        Ok(node)
    }

    /// Queue a node for writing; returns its hash (of its encoding). A
    /// scratch handle hashes the encoding as it is produced and keeps none.
    pub fn save(&self, node: Node) -> Hash {
        let (hash, bytes) = if self.keeps_bytes {
            let bytes = node.encode();
            (Hash::of(&bytes), Some(Bytes::from(bytes)))
        } else {
            (node.hash(), None)
        };
        let weight = self.weight(&node);
        if let std::collections::hash_map::Entry::Vacant(v) = self.pending.lock().entry(hash) {
            v.insert((bytes, Arc::new(node)));
            self.pending_weight.fetch_add(weight, Ordering::Relaxed);
        }
        hash
    }

    /// Write every queued node to the store.
    pub fn flush(&self) -> Result<usize> {
        let mut hashes: Vec<Hash> = self.pending.lock().keys().copied().collect();
        if let Some(spill) = &self.spill {
            // Spilled nodes are unwritten too.
            hashes.extend(spill.moved.lock().keys().copied());
        }
        let mut group = Vec::with_capacity(hashes.len());
        let mut done = Vec::with_capacity(hashes.len());
        for h in hashes {
            let (bytes, node) = self.encoded(&h)?;
            group.push((h.key("nodes"), bytes));
            done.push((h, node));
        }
        // Only what was written: nodes saved meanwhile wait for the next flush.
        self.write_flushed(group, &mut done)
    }

    /// An unwritten node's encoding, and the node: the encoding kept with
    /// it, or the one its spill wrote, or (a scratch handle) made now.
    fn encoded(&self, hash: &Hash) -> Result<Encoded> {
        let kept = self.pending.lock().get(hash).cloned();
        if let Some((bytes, node)) = kept {
            let bytes = bytes.unwrap_or_else(|| Bytes::from(node.encode()));
            return Ok((bytes, node));
        }
        if let Some(read) = self
            .spill
            .as_ref()
            .map(|s| s.read(hash))
            .transpose()?
            .flatten()
        {
            return Ok(read);
        }
        let node = self.load(hash)?;
        Ok((Bytes::from(node.encode()), node))
    }

    /// Content for a chunk list: in the entry when short, else a manifest node.
    pub fn pack_chunks(&self, refs: Vec<ChunkRef>) -> Content {
        if refs.len() > MANIFEST_AFTER {
            Content::Manifest(self.save(Node::Manifest(refs)))
        } else {
            Content::Chunks(refs)
        }
    }

    /// The chunk list of a file's content (empty for inline content).
    pub fn chunk_list(&self, content: &Content) -> Result<Vec<ChunkRef>> {
        match content {
            Content::Inline(_) => Ok(Vec::new()),
            Content::Chunks(c) => Ok(c.clone()),
            Content::Manifest(h) => match &*self.load(h)? {
                Node::Manifest(c) => Ok(c.clone()),
                _ => Err(TreeError::Decode(h.to_hex())),
            },
            Content::External(e) => Err(TreeError::External(e.url.clone())),
        }
    }

    /// The hash of the empty directory.
    pub fn empty_dir(&self) -> Hash {
        self.save(Node::Leaf(Vec::new()))
    }

    /// Look up one name in a directory.
    pub fn get(&self, dir: &Hash, name: &str) -> Result<Option<Entry>> {
        let cur = Cursor::seek(self, dir, 0, name)?;
        let Node::Leaf(items) = &**cur.node() else {
            return Err(TreeError::Decode(dir.to_hex()));
        };
        Ok(items
            .binary_search_by(|(k, _)| k.as_str().cmp(name))
            .ok()
            .map(|i| items[i].1.clone()))
    }

    /// Number of entries in a directory (O(1): read from the root node).
    pub fn count(&self, dir: &Hash) -> Result<u64> {
        Ok(self.load(dir)?.count())
    }

    /// Up to `limit` entries of a directory in name order, starting after
    /// `after` (exclusive), for paginated listings.
    pub fn list(
        &self,
        dir: &Hash,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Entry)>> {
        let mut out = Vec::new();
        let mut cur = Cursor::seek(self, dir, 0, after.unwrap_or(""))?;
        loop {
            if let Node::Leaf(items) = &**cur.node() {
                for (k, e) in items {
                    if after.is_some_and(|a| k.as_str() <= a) {
                        continue;
                    }
                    if out.len() == limit {
                        return Ok(out);
                    }
                    out.push((k.clone(), e.clone()));
                }
            }
            if !cur.advance(self)? {
                return Ok(out);
            }
        }
    }

    /// Every entry of a directory, in name order.
    pub fn entries(&self, dir: &Hash) -> Result<Vec<(String, Entry)>> {
        self.list(dir, None, usize::MAX)
    }

    /// Build a directory from scratch (entries need not be sorted).
    pub fn build_dir(&self, entries: Vec<(String, Entry)>) -> Result<Hash> {
        let empty = self.empty_dir();
        self.update_dir(
            &empty,
            entries.into_iter().map(|(k, e)| (k, Some(e))).collect(),
        )
    }

    /// Apply edits (name → entry, or `None` to remove) to one directory.
    pub fn update_dir(&self, dir: &Hash, edits: BTreeMap<String, Option<Entry>>) -> Result<Hash> {
        if edits.is_empty() {
            return Ok(*dir);
        }
        let root = self.load(dir)?;
        let top = root.level();
        let leaf_edits: Edits<(String, Entry)> = edits
            .into_iter()
            .map(|(k, e)| {
                let item = e.map(|e| (k.clone(), e));
                (k, item)
            })
            .collect();
        let mut next = self.update_level(dir, 0, leaf_edits)?;
        for level in 1..=top {
            let edits = match next {
                LevelResult::Parent(e) => e,
                LevelResult::Root(_) => unreachable!("only the top level yields a root"),
            };
            next = self.update_level(dir, level, edits)?;
        }
        let LevelResult::Root(nodes) = next else {
            unreachable!("the top level yields a root")
        };
        self.finish_root(nodes, top)
    }

    /// Turn the new nodes of the old top level into a canonical root: grow
    /// levels while there is more than one node, shrink while the root has
    /// a single child.
    fn finish_root(&self, mut nodes: Vec<Child>, mut level: u8) -> Result<Hash> {
        if nodes.is_empty() {
            return Ok(self.empty_dir());
        }
        while nodes.len() > 1 {
            level += 1;
            let mut ch = Chunker::<Child>::new(self, level);
            for c in nodes {
                ch.push(c);
            }
            ch.emit();
            nodes = ch.out;
        }
        let mut root = nodes[0].hash;
        loop {
            match &*self.load(&root)? {
                Node::Internal { children, .. } if children.len() == 1 => root = children[0].hash,
                _ => return Ok(root),
            }
        }
    }

    /// Apply sorted edits to the items of one level of the tree rooted at
    /// `root`. Rewrites each node an edit touches, continuing into the
    /// following nodes until the new boundaries line up with old ones again.
    fn update_level<I: Item>(
        &self,
        root: &Hash,
        level: u8,
        edits: Edits<I>,
    ) -> Result<LevelResult> {
        let is_top = self.load(root)?.level() == level;
        let mut parent_edits: BTreeMap<String, Option<Child>> = BTreeMap::new();
        let mut replaced = Vec::new();
        let mut new_nodes = Vec::new();
        let mut i = 0;
        while i < edits.len() {
            let mut cur = Cursor::seek(self, root, level, &edits[i].0)?;
            let mut ch = Chunker::<I>::new(self, level);
            loop {
                if let Some(k) = cur.key_in_parent() {
                    replaced.push(k.to_string());
                }
                let next_first = cur.next_first();
                let end = i + edits[i..]
                    .iter()
                    .take_while(|(k, _)| next_first.as_deref().is_none_or(|n| k.as_str() < n))
                    .count();
                merge_into(&mut ch, I::items(cur.node()), &edits[i..end]);
                i = end;
                if next_first.is_none() {
                    ch.emit();
                    break;
                }
                // Boundaries agree with the old ones again: the rest of the
                // level is unchanged until the next edit.
                if ch.buf.is_empty()
                    && (i == edits.len() || next_first.as_deref() <= Some(edits[i].0.as_str()))
                {
                    break;
                }
                cur.advance(self)?;
            }
            new_nodes.extend(ch.out);
        }
        if is_top {
            return Ok(LevelResult::Root(new_nodes));
        }
        for k in replaced {
            parent_edits.insert(k, None);
        }
        for c in new_nodes {
            parent_edits.insert(c.first.clone(), Some(c));
        }
        Ok(LevelResult::Parent(parent_edits.into_iter().collect()))
    }

    /// The entry at a path under `root` (`""` is the root directory itself).
    pub fn lookup(&self, root: &Hash, path: &str) -> Result<Option<Entry>> {
        let mut entry = Entry::Dir(*root);
        for c in components(path) {
            let Entry::Dir(h) = entry else {
                return Ok(None);
            };
            match self.get(&h, c)? {
                Some(e) => entry = e,
                None => return Ok(None),
            }
        }
        Ok(Some(entry))
    }

    /// Apply staged operations, in order, to the tree `root`; returns the new
    /// root. Cost grows with the number of ops and the depth of their paths.
    pub fn apply(&self, root: &Hash, ops: &[Op]) -> Result<Hash> {
        self.apply_owned(root, ops.to_vec())
    }

    /// `apply`, for a caller that owns the ops: their entries move into
    /// the tree instead of being copied.
    pub fn apply_owned(&self, root: &Hash, ops: Vec<Op>) -> Result<Hash> {
        let mut a = self.applying(root, usize::MAX);
        for op in ops {
            a.op(op)?;
        }
        a.finish()
    }

    /// Apply ops one at a time onto `root` (see `Applying`), holding at
    /// most about `hold` bytes of them when this handle can spill.
    pub fn applying(&self, root: &Hash, hold: usize) -> Applying<'_> {
        Applying {
            trees: self,
            top: Overlay::Dir {
                base: Some(*root),
                children: BTreeMap::new(),
            },
            held: 0,
            hold,
            checkpoints: 0,
        }
    }

    fn apply_op(&self, top: &mut Overlay, op: Op) -> Result<()> {
        match op {
            Op::Put { path, entry } | Op::Graft { path, entry, .. } => {
                if path.is_empty() {
                    if let Entry::Dir(h) = entry {
                        *top = Overlay::Dir {
                            base: Some(h),
                            children: BTreeMap::new(),
                        };
                    }
                    return Ok(());
                }
                let (parent, name) = split_parent(&path);
                let dir = self.dir_mut(top, parent, true)?.expect("created");
                dir.insert(name.to_string(), Overlay::Entry(entry));
            }
            Op::Delete { path } => {
                if path.is_empty() {
                    *top = Overlay::Dir {
                        base: None,
                        children: BTreeMap::new(),
                    };
                    return Ok(());
                }
                let (parent, name) = split_parent(&path);
                if let Some(dir) = self.dir_mut(top, parent, false)? {
                    dir.insert(name.to_string(), Overlay::Deleted);
                }
            }
            Op::Move { from, to } => {
                if from.is_empty()
                    || to.is_empty()
                    || from == to
                    || to.starts_with(&format!("{from}/"))
                {
                    return Ok(());
                }
                let (fp, fname) = split_parent(&from);
                let Some(Overlay::Dir { base, children }) = self.dir_node(top, fp, false)? else {
                    return Ok(());
                };
                let moved = match children.remove(fname) {
                    Some(Overlay::Deleted) => None,
                    Some(o) => Some(o),
                    None => match base {
                        Some(b) => self.get(b, fname)?.map(Overlay::Entry),
                        None => None,
                    },
                };
                // Whatever was there, `from` is gone afterwards.
                children.insert(fname.to_string(), Overlay::Deleted);
                if let Some(o) = moved {
                    let (tp, tname) = split_parent(&to);
                    let dest = self.dir_mut(top, tp, true)?.expect("created");
                    dest.insert(tname.to_string(), o);
                }
            }
        }
        Ok(())
    }

    fn dir_mut<'o>(
        &self,
        top: &'o mut Overlay,
        path: &str,
        create: bool,
    ) -> Result<Option<&'o mut BTreeMap<String, Overlay>>> {
        match self.dir_node(top, path, create)? {
            Some(Overlay::Dir { children, .. }) => Ok(Some(children)),
            _ => Ok(None),
        }
    }

    /// Walk the overlay to the directory at `path`, opening base directories
    /// as overlay directories on the way. With `create`, missing directories
    /// (or non-directories in the way) become new empty directories.
    fn dir_node<'o>(
        &self,
        top: &'o mut Overlay,
        path: &str,
        create: bool,
    ) -> Result<Option<&'o mut Overlay>> {
        let mut node = top;
        for c in components(path) {
            let Overlay::Dir { base, children } = node else {
                unreachable!("dir_node only descends through directories")
            };
            if !children.contains_key(c) {
                let existing = match base {
                    Some(b) => self.get(b, c)?,
                    None => None,
                };
                let opened = match existing {
                    Some(Entry::Dir(h)) => Overlay::Dir {
                        base: Some(h),
                        children: BTreeMap::new(),
                    },
                    _ if create => Overlay::Dir {
                        base: None,
                        children: BTreeMap::new(),
                    },
                    _ => return Ok(None),
                };
                children.insert(c.to_string(), opened);
            }
            let child = children.get_mut(c).expect("inserted");
            match child {
                Overlay::Dir { .. } => {}
                Overlay::Entry(Entry::Dir(h)) => {
                    *child = Overlay::Dir {
                        base: Some(*h),
                        children: BTreeMap::new(),
                    }
                }
                _ if create => {
                    *child = Overlay::Dir {
                        base: None,
                        children: BTreeMap::new(),
                    }
                }
                _ => return Ok(None),
            }
            node = child;
        }
        Ok(Some(node))
    }

    fn write_overlay(&self, ov: Overlay) -> Result<Hash> {
        match ov {
            Overlay::Dir { base, children } => {
                let base = base.unwrap_or_else(|| self.empty_dir());
                let mut edits = BTreeMap::new();
                for (name, child) in children {
                    let e = match child {
                        Overlay::Deleted => None,
                        Overlay::Entry(e) => Some(e),
                        d @ Overlay::Dir { .. } => Some(Entry::Dir(self.write_overlay(d)?)),
                    };
                    edits.insert(name, e);
                }
                self.update_dir(&base, edits)
            }
            _ => unreachable!("the top of an overlay is a directory"),
        }
    }

    /// The names whose entries differ between two directories, in name
    /// order, as (name, entry in `a`, entry in `b`). Child nodes with equal
    /// hashes on both sides are skipped without being read, so the cost
    /// grows with the change, not with the directory.
    pub fn diff_dir(&self, a: &Hash, b: &Hash) -> Result<Vec<DirChange>> {
        if a == b {
            return Ok(Vec::new());
        }
        // Nodes still to compare on each side, as (hash, level); a node is
        // read only when it is not on the other side too.
        let mut left = vec![(*a, self.load(a)?.level())];
        let mut right = vec![(*b, self.load(b)?.level())];
        loop {
            drop_common(&mut left, &mut right);
            let top = left
                .iter()
                .chain(right.iter())
                .map(|(_, l)| *l)
                .max()
                .unwrap_or(0);
            if top == 0 {
                break;
            }
            left = self.expand_level(left, top)?;
            right = self.expand_level(right, top)?;
        }
        let items = |nodes: &[(Hash, u8)]| -> Result<Vec<(String, Entry)>> {
            let mut out = Vec::new();
            for (h, _) in nodes {
                let node = self.load(h)?;
                out.extend(<(String, Entry)>::items(&node).iter().cloned());
            }
            Ok(out)
        };
        let (l, r) = (items(&left)?, items(&right)?);
        let mut out = Vec::new();
        let (mut i, mut j) = (0, 0);
        while i < l.len() || j < r.len() {
            let ord = match (l.get(i), r.get(j)) {
                (Some(x), Some(y)) => x.0.cmp(&y.0),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            match ord {
                std::cmp::Ordering::Less => {
                    out.push((l[i].0.clone(), Some(l[i].1.clone()), None));
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    out.push((r[j].0.clone(), None, Some(r[j].1.clone())));
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    if l[i].1 != r[j].1 {
                        out.push((l[i].0.clone(), Some(l[i].1.clone()), Some(r[j].1.clone())));
                    }
                    i += 1;
                    j += 1;
                }
            }
        }
        Ok(out)
    }

    /// Replace the nodes at `level` by their children (in order).
    fn expand_level(&self, nodes: Vec<(Hash, u8)>, level: u8) -> Result<Vec<(Hash, u8)>> {
        let mut out = Vec::new();
        for (h, l) in nodes {
            if l != level {
                out.push((h, l));
                continue;
            }
            if let Node::Internal { children, .. } = &*self.load(&h)? {
                out.extend(children.iter().map(|c| (c.hash, level - 1)));
            }
        }
        Ok(out)
    }

    /// Every path under `root` with its entry, depth first in name order
    /// (directories are listed before their contents).
    pub fn walk(&self, root: &Hash, prefix: &str, out: &mut Vec<(String, Entry)>) -> Result<()> {
        for (name, e) in self.entries(root)? {
            let path = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let sub = if let Entry::Dir(h) = &e {
                Some(*h)
            } else {
                None
            };
            out.push((path.clone(), e));
            if let Some(h) = sub {
                self.walk(&h, &path, out)?;
            }
        }
        Ok(())
    }
}

/// One name that differs between two directories: (name, before, after).
pub type DirChange = (String, Option<Entry>, Option<Entry>);

/// Remove nodes present (by hash) on both sides: they hold the same items.
fn drop_common(left: &mut Vec<(Hash, u8)>, right: &mut Vec<(Hash, u8)>) {
    let l: std::collections::HashSet<Hash> = left.iter().map(|(h, _)| *h).collect();
    let common: std::collections::HashSet<Hash> = right
        .iter()
        .map(|(h, _)| *h)
        .filter(|h| l.contains(h))
        .collect();
    if !common.is_empty() {
        left.retain(|(h, _)| !common.contains(h));
        right.retain(|(h, _)| !common.contains(h));
    }
}

enum LevelResult {
    /// Edits for the level above.
    Parent(Edits<Child>),
    /// The new nodes replacing the old top level.
    Root(Vec<Child>),
}

/// Merge a node's sorted items with sorted edits into the chunker.
fn merge_into<I: Item>(ch: &mut Chunker<'_, I>, items: &[I], edits: &[(String, Option<I>)]) {
    let mut e = edits.iter().peekable();
    for item in items {
        while let Some((k, new)) = e.next_if(|(k, _)| k.as_str() < item.key()) {
            let _ = k;
            if let Some(n) = new {
                ch.push(n.clone());
            }
        }
        match e.next_if(|(k, _)| k.as_str() == item.key()) {
            Some((_, Some(n))) => ch.push(n.clone()),
            Some((_, None)) => {}
            None => ch.push(item.clone()),
        }
    }
    for (_, new) in e {
        if let Some(n) = new {
            ch.push(n.clone());
        }
    }
}

/// Ops applied one at a time (`Trees::applying`), so that a caller reading
/// them batch by batch never holds them all: a commit of many small files
/// carries their bytes in its ops. On a handle that can spill, once the ops
/// applied since the last checkpoint weigh more than `hold`, the changes so
/// far become nodes, those move to the spill, and the next ops apply on top
/// of that tree. Checkpoint nodes the final tree no longer reaches are
/// never written (`Trees::flush_reachable`). Elsewhere everything is held
/// until `finish`.
pub struct Applying<'t> {
    trees: &'t Trees,
    top: Overlay,
    /// What the ops since the last checkpoint weigh (`Op::encoded_size`).
    held: usize,
    hold: usize,
    checkpoints: usize,
}

impl Applying<'_> {
    pub fn op(&mut self, op: Op) -> Result<()> {
        self.held += op.encoded_size();
        self.trees.apply_op(&mut self.top, op)?;
        if self.held > self.hold && self.trees.spill.is_some() {
            let top = std::mem::replace(&mut self.top, Overlay::Deleted);
            let root = self.trees.write_overlay(top)?;
            self.top = Overlay::Dir {
                base: Some(root),
                children: BTreeMap::new(),
            };
            self.held = 0;
            self.checkpoints += 1;
            if let Err(e) = self.trees.spill_over(0) {
                // The nodes stay in memory, as without a spill; more
                // checkpoints would only add to them.
                tracing::warn!(%e, "cannot spill a large tree update: it stays in memory");
                self.hold = usize::MAX;
            }
        }
        Ok(())
    }

    /// How many times the changes were moved to the spill.
    pub fn checkpoints(&self) -> usize {
        self.checkpoints
    }

    /// The root of the tree with every op applied.
    pub fn finish(self) -> Result<Hash> {
        self.trees.write_overlay(self.top)
    }
}

/// Pending changes to a tree, as a sparse tree over the base.
enum Overlay {
    Entry(Entry),
    Deleted,
    Dir {
        base: Option<Hash>,
        children: BTreeMap<String, Overlay>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn trees() -> Trees {
        Trees::new(Store::open(&format!("memory://tree-{}", ulid::Ulid::new())).unwrap())
    }

    /// A small file of `len` bytes of `fill`.
    fn inline_file(fill: u8, len: usize, mode: u32, mtime: i64) -> Entry {
        Entry::File(File {
            size: len as u64,
            mode,
            mtime,
            content: Content::Inline(vec![fill; len].into()),
        })
    }

    fn file(n: u64) -> Entry {
        Entry::File(File {
            size: 8,
            mode: 0o644,
            mtime: 0,
            content: Content::Inline(n.to_le_bytes().to_vec().into()),
        })
    }

    #[test]
    fn the_node_cache_is_bounded_in_bytes_and_in_count() {
        let leaf = |i: u32, len: usize| {
            Node::Leaf(vec![(format!("f{i}"), inline_file(i as u8, len, 0o644, 0))])
        };
        let size = leaf(0, 10_000).encoded_size();
        let mut c = NodeCache::new(100, 5 * size);
        for i in 0..20u32 {
            c.put(Hash::of(&i.to_le_bytes()), Arc::new(leaf(i, 10_000)));
            assert!(c.bytes <= 5 * size && c.nodes.len() <= 5);
        }
        // The newest stay; the oldest went.
        assert!(c.get(&Hash::of(&19u32.to_le_bytes())).is_some());
        assert!(c.get(&Hash::of(&0u32.to_le_bytes())).is_none());
        // The same node again counts once.
        let h = Hash::of(&19u32.to_le_bytes());
        c.put(h, Arc::new(leaf(19, 10_000)));
        assert_eq!(c.bytes, c.nodes.iter().map(|(_, (_, s))| s).sum::<usize>());
        // Small nodes: the count is the bound.
        let mut c = NodeCache::new(3, usize::MAX);
        for i in 0..10u32 {
            c.put(Hash::of(&i.to_le_bytes()), Arc::new(leaf(i, 10)));
        }
        assert_eq!(c.nodes.len(), 3);
        assert_eq!(c.bytes, 3 * leaf(0, 10).encoded_size());
        // A node bigger than the whole budget is still kept (alone).
        let mut c = NodeCache::new(10, 100);
        c.put(h, Arc::new(leaf(1, 1000)));
        assert!(c.get(&h).is_some());
    }

    fn check_dir(t: &Trees, dir: &Hash, model: &BTreeMap<String, Entry>) {
        let got: BTreeMap<String, Entry> = t.entries(dir).unwrap().into_iter().collect();
        assert_eq!(&got, model);
        assert_eq!(t.count(dir).unwrap(), model.len() as u64);
        for (k, v) in model.iter().take(20) {
            assert_eq!(t.get(dir, k).unwrap().as_ref(), Some(v));
        }
        // A fresh build of the same entries has the same root hash.
        let fresh = t.build_dir(model.clone().into_iter().collect()).unwrap();
        assert_eq!(&fresh, dir, "history independence");
    }

    #[test]
    fn inline_content_encodes_as_a_length_and_the_bytes() {
        // Stored nodes depend on it: the same bytes as postcard's encoding
        // of a Vec<u8> as a sequence, which older nodes were written with.
        let inline = Content::Inline(vec![7, 8, 9].into());
        let bytes = postcard::to_allocvec(&inline).unwrap();
        assert_eq!(bytes, [0, 3, 7, 8, 9]);
        let as_seq = postcard::to_allocvec(&(0u8, vec![7u8, 8, 9])).unwrap();
        assert_eq!(bytes, as_seq);
        assert_eq!(postcard::from_bytes::<Content>(&bytes).unwrap(), inline);
        let json = serde_json::to_string(&inline).unwrap();
        assert_eq!(json, r#"{"Inline":[7,8,9]}"#);
    }

    #[test]
    fn a_node_hash_is_the_hash_of_its_encoding() {
        // `save` hashes the encoding as it is made; stored nodes are checked
        // against the hash of their bytes. Contents short and long (gathered
        // or handed to the hasher whole), names, levels, manifests.
        let inline = |n: usize| {
            Entry::File(File {
                size: n as u64,
                mode: 0o644,
                mtime: -(n as i64),
                content: Content::Inline((0..n).map(|i| (i * 31 % 251) as u8).collect()),
            })
        };
        let leaf = Node::Leaf(
            [0, 1, 5, 1023, 1024, 4096, 5000, 70_000]
                .iter()
                .map(|&n| (format!("f{n}"), inline(n)))
                .chain([
                    ("d".to_string(), Entry::Dir(Hash::of(b"x"))),
                    ("s".to_string(), Entry::Symlink("../t".repeat(300))),
                ])
                .collect(),
        );
        let internal = Node::Internal {
            level: 3,
            children: (0..100)
                .map(|i| Child {
                    first: format!("k{i:04}"),
                    hash: Hash::of(&[i as u8]),
                    count: i,
                })
                .collect(),
        };
        let manifest = Node::Manifest(vec![]);
        for node in [leaf, internal, manifest, Node::Leaf(vec![])] {
            let bytes = node.encode();
            assert_eq!(node.hash(), Hash::of(&bytes));
            assert_eq!(Node::decode(&bytes).unwrap(), node);
        }
    }

    #[test]
    fn a_scratch_handle_computes_the_same_trees() {
        // A mount's view (scratch: hashes, keeps no bytes) and the lake
        // (keeps bytes for flush) must agree on every root; a scratch
        // handle that is flushed after all still writes loadable nodes.
        let t = trees();
        let scratch = t.scratch();
        let big = |n: u8| inline_file(n, 5000, 0o600, 7);
        let ops: Vec<Op> = (0..600u32)
            .map(|i| Op::Put {
                path: format!("d{}/f{i:04}", i % 3),
                entry: if i % 2 == 0 {
                    big(i as u8)
                } else {
                    file(i as u64)
                },
            })
            .chain([Op::Move {
                from: "d1".into(),
                to: "e/d1".into(),
            }])
            .collect();
        let (mut a, mut b) = (t.empty_dir(), scratch.empty_dir());
        for batch in ops.chunks(97) {
            a = t.apply(&a, batch).unwrap();
            b = scratch.apply(&b, batch).unwrap();
            assert_eq!(a, b);
        }
        scratch.flush().unwrap();
        let fresh = Trees::new(t.store().clone());
        assert_eq!(fresh.lookup(&b, "d0/f0000").unwrap(), Some(big(0)));
        assert_eq!(fresh.lookup(&b, "e/d1/f0001").unwrap(), Some(file(1)));
        assert_eq!(fresh.count(&b).unwrap(), 3);
    }

    /// How many nodes `root` reaches, read through `t`.
    fn reachable(t: &Trees, root: Hash) -> usize {
        let mut reached = std::collections::HashSet::new();
        let mut stack = vec![root];
        while let Some(h) = stack.pop() {
            if reached.insert(h) {
                t.load(&h).unwrap().links(&mut stack);
            }
        }
        reached.len()
    }

    /// A handle, and a spilling scratch handle of it with its directory.
    fn spilling() -> (Trees, tempfile::TempDir, PathBuf, Trees) {
        let t = trees();
        let dir = tempfile::tempdir().unwrap();
        let spill_dir = dir.path().join("spill");
        let s = t.scratch_spilling(spill_dir.clone());
        (t, dir, spill_dir, s)
    }

    #[test]
    fn a_spilling_handle_computes_the_same_trees_from_disk() {
        let (t, _dir, spill_dir, spilling) = spilling();
        let plain = t.scratch();
        let content = |i: u32| inline_file(i as u8, 3000, 0o644, 1);
        let ops: Vec<Op> = (0..2000u32)
            .map(|i| Op::Put {
                path: format!("d{}/f{i:04}", i % 4),
                entry: content(i),
            })
            .collect();
        let (mut a, mut b) = (plain.empty_dir(), spilling.empty_dir());
        let mut spilling = Arc::new(spilling);
        let mut moved = 0;
        for (n, batch) in ops.chunks(128).enumerate() {
            a = plain.apply(&a, batch).unwrap();
            b = spilling.apply(&b, batch).unwrap();
            assert_eq!(a, b);
            // As a view does: compact now and then, spill when heavy.
            if n % 3 == 2 {
                spilling = Arc::new(spilling.retain_reachable(&[b]));
            }
            moved += spilling.spill_over(256 << 10).unwrap();
            assert!(spilling.pending_weight.load(Ordering::Relaxed) <= 1 << 20);
        }
        assert!(moved > 0, "nodes were spilled");
        assert!(std::fs::read_dir(&spill_dir).unwrap().count() > 0);
        // Reads come back from disk.
        for i in (0..2000u32).step_by(37) {
            let path = format!("d{}/f{i:04}", i % 4);
            assert_eq!(
                spilling.lookup(&b, &path).unwrap(),
                Some(content(i)),
                "{path}"
            );
        }
        assert_eq!(spilling.count(&b).unwrap(), 4);
        // A flush writes spilled nodes too: a fresh handle reads the tree.
        spilling.flush().unwrap();
        let fresh = Trees::new(t.store().clone());
        assert_eq!(fresh.lookup(&b, "d3/f1999").unwrap(), Some(content(1999)));
        // The spill goes with the last handle using it.
        drop(spilling);
        assert!(!spill_dir.exists());
    }

    #[test]
    fn an_apply_that_checkpoints_computes_the_same_tree_and_writes_only_what_it_reaches() {
        let (t, _dir, spill_dir, spilling) = spilling();
        let content = |i: u32| inline_file(i as u8, 2000, 0o644, 1);
        let mut ops: Vec<Op> = (0..1500u32)
            .map(|i| Op::Put {
                path: format!("d{}/e{}/f{i:04}", i % 3, i % 7),
                entry: content(i),
            })
            .collect();
        // Later ops reach into what checkpoints already wrote.
        ops.push(Op::Move {
            from: "d0".into(),
            to: "moved/d0".into(),
        });
        ops.push(Op::Delete {
            path: "d1/e3".into(),
        });
        ops.extend((0..200u32).map(|i| Op::Put {
            path: format!("d2/e{}/f{i:04}", i % 7),
            entry: content(i + 7),
        }));
        let plain = trees();
        let expected = plain.apply(&plain.empty_dir(), &ops).unwrap();

        let mut a = spilling.applying(&spilling.empty_dir(), 64 << 10);
        for op in ops.iter().cloned() {
            a.op(op).unwrap();
        }
        assert!(a.checkpoints() > 10, "{} checkpoints", a.checkpoints());
        let root = a.finish().unwrap();
        assert_eq!(root, expected);
        assert!(std::fs::read_dir(&spill_dir).unwrap().count() > 10);

        let written = spilling.flush_reachable(&root).unwrap();
        // Exactly the nodes of the final tree reach the store: none of the
        // checkpoints' own.
        let stored = t.store().list("nodes").unwrap().len();
        assert_eq!(written, stored);
        let fresh = Trees::new(t.store().clone());
        assert_eq!(stored, reachable(&fresh, root));
        assert_eq!(
            fresh.lookup(&root, "moved/d0/e0/f0000").unwrap(),
            Some(content(0))
        );
        assert_eq!(fresh.lookup(&root, "d1/e3").unwrap(), None);
        assert_eq!(
            fresh.lookup(&root, "d2/e4/f0004").unwrap(),
            Some(content(11))
        );
        // Everything flushed: nothing is left to write.
        assert_eq!(spilling.flush_reachable(&root).unwrap(), 0);
    }

    #[test]
    fn a_spill_that_fails_keeps_the_nodes_in_memory() {
        let (_t, _dir, spill_dir, s) = spilling();
        let ops: Vec<Op> = (0..300u64)
            .map(|i| Op::Put {
                path: format!("f{i:03}"),
                entry: file(i),
            })
            .collect();
        let root = s.apply(&s.empty_dir(), &ops).unwrap();
        let before = s.pending_nodes();
        // Something that is not a directory where the spill goes.
        std::fs::write(&spill_dir, b"").unwrap();
        assert!(matches!(s.spill_over(0), Err(TreeError::Spill(..))));
        assert_eq!(s.pending_nodes(), before);
        assert_eq!(s.lookup(&root, "f123").unwrap(), Some(file(123)));
        // Once it is gone, the next spill goes through.
        std::fs::remove_file(&spill_dir).unwrap();
        assert_eq!(s.spill_over(0).unwrap(), before);
        assert_eq!(s.pending_nodes(), 0);
        assert_eq!(s.lookup(&root, "f299").unwrap(), Some(file(299)));
    }

    #[test]
    fn big_directory_edits_match_a_fresh_build() {
        let t = trees();
        let mut model = BTreeMap::new();
        let mut dir = t.empty_dir();
        let mut edits = BTreeMap::new();
        for i in 0..20_000u64 {
            edits.insert(format!("f{i:06}"), Some(file(i)));
            model.insert(format!("f{i:06}"), file(i));
        }
        dir = t.update_dir(&dir, edits).unwrap();
        assert!(
            t.load(&dir).unwrap().level() >= 2,
            "20k entries need several levels"
        );
        check_dir(&t, &dir, &model);
        // Small edits scattered through the directory.
        let mut edits = BTreeMap::new();
        for i in (0..20_000u64).step_by(997) {
            edits.insert(format!("f{i:06}"), None);
            model.remove(&format!("f{i:06}"));
            edits.insert(format!("g{i}"), Some(file(i + 1)));
            model.insert(format!("g{i}"), file(i + 1));
        }
        dir = t.update_dir(&dir, edits).unwrap();
        check_dir(&t, &dir, &model);
        // Pagination.
        let page = t.list(&dir, Some("f000100"), 5).unwrap();
        let want: Vec<_> = model
            .range("f000101".to_string()..)
            .take(5)
            .map(|(k, _)| k.clone())
            .collect();
        assert_eq!(
            page.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
            want
        );
        // Delete everything: back to the empty directory.
        let all = model.keys().map(|k| (k.clone(), None)).collect();
        dir = t.update_dir(&dir, all).unwrap();
        assert_eq!(dir, t.empty_dir());
    }

    #[test]
    fn one_edit_rewrites_few_nodes() {
        let t = trees();
        let edits = (0..50_000u64)
            .map(|i| (format!("k{i}"), Some(file(i))))
            .collect();
        let dir = t.update_dir(&t.empty_dir(), edits).unwrap();
        t.flush().unwrap();
        let mut one = BTreeMap::new();
        one.insert("k777".to_string(), Some(file(0)));
        t.update_dir(&dir, one).unwrap();
        let written = t.pending.lock().len();
        assert!(written <= 12, "one edit wrote {written} nodes");
    }

    #[test]
    fn apply_ops_on_paths() {
        let t = trees();
        let root = t.empty_dir();
        let put = |p: &str, n| Op::Put {
            path: p.into(),
            entry: file(n),
        };
        let r = t
            .apply(
                &root,
                &[put("a/b/c.txt", 1), put("a/d.txt", 2), put("top", 3)],
            )
            .unwrap();
        assert_eq!(t.lookup(&r, "a/b/c.txt").unwrap(), Some(file(1)));
        let r2 = t
            .apply(
                &r,
                &[
                    Op::Move {
                        from: "a/b".into(),
                        to: "x/y".into(),
                    },
                    Op::Delete { path: "top".into() },
                    Op::Delete {
                        path: "no/such".into(),
                    },
                ],
            )
            .unwrap();
        assert_eq!(t.lookup(&r2, "x/y/c.txt").unwrap(), Some(file(1)));
        assert_eq!(t.lookup(&r2, "a/b").unwrap(), None);
        assert_eq!(t.lookup(&r2, "top").unwrap(), None);
        assert_eq!(
            t.lookup(&r2, "no").unwrap(),
            None,
            "delete of a missing path creates nothing"
        );
        // Moving back restores the original tree exactly.
        let r3 = t
            .apply(
                &r2,
                &[
                    Op::Move {
                        from: "x/y".into(),
                        to: "a/b".into(),
                    },
                    Op::Delete { path: "x".into() },
                    put("top", 3),
                ],
            )
            .unwrap();
        assert_eq!(r3, r);
        t.flush().unwrap();
        // Nodes are readable from the store after a flush, by a fresh handle.
        let t2 = Trees::new(t.store().clone());
        assert_eq!(t2.lookup(&r3, "a/d.txt").unwrap(), Some(file(2)));
    }

    #[test]
    fn diff_dir_reads_only_changed_nodes() {
        let t = trees();
        let edits = (0..50_000u64)
            .map(|i| (format!("k{i}"), Some(file(i))))
            .collect();
        let a = t.update_dir(&t.empty_dir(), edits).unwrap();
        let mut e = BTreeMap::new();
        e.insert("k10".to_string(), Some(file(99)));
        e.insert("k4000".to_string(), None);
        e.insert("new".to_string(), Some(file(1)));
        let b = t.update_dir(&a, e).unwrap();
        t.flush().unwrap();
        let fresh = Trees::new(t.store().clone());
        let d = fresh.diff_dir(&a, &b).unwrap();
        assert_eq!(
            d,
            vec![
                ("k10".to_string(), Some(file(10)), Some(file(99))),
                ("k4000".to_string(), Some(file(4000)), None),
                ("new".to_string(), None, Some(file(1))),
            ]
        );
        let loaded = fresh.cache.lock().nodes.len();
        assert!(loaded < 40, "diff loaded {loaded} nodes");
        assert!(fresh.diff_dir(&a, &a).unwrap().is_empty());
    }

    #[test]
    fn path_checks() {
        assert_eq!(check_path("/a/b/").unwrap(), "a/b");
        assert_eq!(check_path("").unwrap(), "");
        for bad in ["a//b", "a/../b", "./a", "a/\0"] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn corrupt_nodes_are_errors() {
        let t = trees();
        let mut e = BTreeMap::new();
        e.insert("x".to_string(), Some(file(1)));
        let dir = t.update_dir(&t.empty_dir(), e).unwrap();
        t.flush().unwrap();
        t.store()
            .put(&dir.key("nodes"), Bytes::from_static(b"garbage"))
            .unwrap();
        let fresh = Trees::new(t.store().clone());
        assert!(matches!(
            fresh.get(&dir, "x"),
            Err(TreeError::Store(StoreError::Corrupt { .. }))
        ));
        assert!(Node::decode(b"\x01\xff\xff").is_err());
        assert!(Node::decode(b"").is_err());
    }

    fn arb_edits() -> impl Strategy<Value = Vec<Vec<(u16, Option<u64>)>>> {
        prop::collection::vec(
            prop::collection::vec((0u16..3000, prop::option::of(0u64..5)), 1..300),
            1..6,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn prolly_matches_btreemap_model(rounds in arb_edits()) {
            let t = trees();
            let mut dir = t.empty_dir();
            let mut model = BTreeMap::new();
            for round in rounds {
                let (prev_dir, prev_model) = (dir, model.clone());
                let mut edits = BTreeMap::new();
                for (k, v) in round {
                    let key = format!("n{k}");
                    match v {
                        Some(n) => { model.insert(key.clone(), file(n)); edits.insert(key, Some(file(n))); }
                        None => { model.remove(&key); edits.insert(key, None); }
                    }
                }
                dir = t.update_dir(&dir, edits).unwrap();
                check_dir(&t, &dir, &model);
                let keys: std::collections::BTreeSet<&String> = prev_model.keys().chain(model.keys()).collect();
                let want: Vec<DirChange> = keys.into_iter()
                    .filter(|k| prev_model.get(*k) != model.get(*k))
                    .map(|k| (k.clone(), prev_model.get(k).cloned(), model.get(k).cloned()))
                    .collect();
                prop_assert_eq!(t.diff_dir(&prev_dir, &dir).unwrap(), want);
            }
        }

        #[test]
        fn apply_matches_path_model(ops in prop::collection::vec((0u8..3, 0u8..6, 0u8..6, 0u64..4), 1..60)) {
            // Model: a map of full file paths; paths are a/b style over a small alphabet.
            let t = trees();
            let names = ["a", "b", "a/x", "a/y", "b/x", "a/x/z"];
            let mut model: BTreeMap<String, u64> = BTreeMap::new();
            let mut tree_ops = Vec::new();
            for (kind, p, q, n) in ops {
                let (p, q) = (names[p as usize], names[q as usize]);
                match kind {
                    0 => {
                        // Put a file at p: drops anything under p and any file at a parent of p.
                        model.retain(|k, _| !k.starts_with(&format!("{p}/")));
                        let mut parent = p;
                        while let Some(i) = parent.rfind('/') { parent = &parent[..i]; model.remove(parent); }
                        model.insert(p.to_string(), n);
                        tree_ops.push(Op::Put { path: p.into(), entry: file(n) });
                    }
                    1 => {
                        model.retain(|k, _| k != p && !k.starts_with(&format!("{p}/")));
                        tree_ops.push(Op::Delete { path: p.into() });
                    }
                    _ => {
                        // Only model moves of plain files onto free names.
                        if model.contains_key(p) && !model.contains_key(q) && !q.starts_with(&format!("{p}/")) && p != q
                            && !model.keys().any(|k| k.starts_with(&format!("{q}/")))
                            && !model.keys().any(|k| q.starts_with(&format!("{k}/"))) {
                            let v = model.remove(p).unwrap();
                            model.insert(q.to_string(), v);
                            tree_ops.push(Op::Move { from: p.into(), to: q.into() });
                        }
                    }
                }
            }
            let root = t.apply(&t.empty_dir(), &tree_ops).unwrap();
            let mut all = Vec::new();
            t.walk(&root, "", &mut all).unwrap();
            let files: BTreeMap<String, u64> = all.into_iter().filter_map(|(p, e)| match e {
                Entry::File(File { content: Content::Inline(b), .. }) => Some((p, u64::from_le_bytes(b[..].try_into().unwrap()))),
                _ => None,
            }).collect();
            prop_assert_eq!(files, model);
        }

        #[test]
        fn checkpointed_apply_matches_apply(
            ops in prop::collection::vec((0u8..3, 0u8..7, 0u8..7, 0u64..4), 1..80),
            hold in prop::sample::select(vec![0usize, 200, 2000, 1 << 30]),
        ) {
            // Any moves, of files and directories alike: the reference is
            // `apply` itself, on a handle that never spills.
            let names = ["a", "b", "a/x", "a/y", "b/x", "a/x/z", "c/d/e"];
            let tree_ops: Vec<Op> = ops.into_iter().map(|(kind, p, q, n)| {
                let (p, q) = (names[p as usize].to_string(), names[q as usize].to_string());
                match kind {
                    0 => Op::Put { path: p, entry: file(n) },
                    1 => Op::Delete { path: p },
                    _ => Op::Move { from: p, to: q },
                }
            }).collect();
            let plain = trees();
            let expected = plain.apply(&plain.empty_dir(), &tree_ops).unwrap();

            let (t, _dir, _spill_dir, spilling) = spilling();
            let base = spilling.empty_dir();
            let mut a = spilling.applying(&base, hold);
            for op in tree_ops {
                a.op(op).unwrap();
            }
            let root = a.finish().unwrap();
            prop_assert_eq!(root, expected);
            // What reaches the store is the final tree, all of it and no more.
            let written = spilling.flush_reachable(&root).unwrap();
            let reached = reachable(&Trees::new(t.store().clone()), root);
            prop_assert_eq!(written, reached);
            prop_assert_eq!(t.store().list("nodes").unwrap().len(), reached);
        }
    }
}
