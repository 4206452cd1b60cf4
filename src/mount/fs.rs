//! The filesystem core behind the mount: inodes, views of refs, handles,
//! reads through the chunk cache, writes through local spools into staged
//! changes, and the hidden `.tarn` control directory. It knows nothing of
//! fuser: `fuse.rs` adapts it, and tests drive it directly.
//!
//! Layout: in a whole-lake mount the root lists repositories, a repository
//! lists its branches, and `<repo>/<ref>` is the tree of that ref (branches
//! show their staged changes and are writable; other refs are resolved on
//! lookup, never listed, and read-only). A pinned mount shows one ref at the
//! root.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use rustc_hash::FxHashMap;

use super::assembly::Assembly;
use super::cache::ChunkCache;
use super::control;
use super::journal::{new_draft_id, DraftRecord, DraftState, DraftStep, Journal, JournalEntry};
use super::write::{close_ref, killed_suid, now_ns, open_ref, Draft, StageQueue, WriteFile};
use crate::hash::{ChunkRef, Hash};
use crate::repo::{BranchRef, Lake, RepoConfig, RepoError, StageHint};
use crate::tree::{Content, Entry, File, Op, TreeError, Trees};

pub const ROOT_INO: u64 = 1;

/// Name of the hidden control directory at the root of every ref's tree.
pub const CONTROL_DIR: &str = ".tarn";

/// Kernel cache lifetime for things that never change (pinned commits, tags).
const IMMUTABLE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Read-ahead grows to this many chunks past the current one (≈16 MiB).
const MAX_READAHEAD_CHUNKS: usize = 16;

/// A working view compacts its unwritten nodes once there are this many
/// more than after its last compaction (4x growth or this, whichever is more).
const COMPACT_AFTER_NODES: u64 = 4096;

/// Reads this close to where the previous one ended count as sequential.
const SEQUENTIAL_SLACK: u64 = 8 << 20;

/// How long a control command waits for write-back uploads before it
/// fails with EAGAIN (the store is down or very slow).
const JOURNAL_WAIT: Duration = Duration::from_secs(120);

/// Stripes of `LakeFs::file_order`.
const FILE_ORDER_STRIPES: usize = 256;

/// A branch view's staged changes (its working tree's unwritten nodes)
/// move to the spool directory once they weigh this much.
const VIEW_SPILL_AFTER: usize = 256 << 20;

/// Spill a working tree heavier than `limit`; on failure it stays in
/// memory.
fn spill_over(trees: &Trees, limit: usize) {
    if let Err(e) = trees.spill_over(limit) {
        tracing::warn!(%e, "spilling a working tree");
    }
}

/// How long an unknown name under a repository stays known-unknown.
const NEGATIVE_TTL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("read-only file system")]
    ReadOnly,
    #[error("not a directory")]
    NotADirectory,
    #[error("is a directory")]
    IsADirectory,
    #[error("directory not empty")]
    NotEmpty,
    #[error("file exists")]
    Exists,
    #[error("operation not permitted: {0}")]
    NotPermitted(&'static str),
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("operation not supported")]
    NotSupported,
    #[error("stale file handle")]
    BadHandle,
    #[error("this version of the file is gone (it changed since it was looked up)")]
    Stale,
    #[error("permission denied")]
    Denied,
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("local spool: {0}")]
    Io(#[from] std::io::Error),
    #[error("staging failed: {0}")]
    Stage(String),
}

impl FsError {
    /// The one place errors become errnos.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::ReadOnly => libc::EROFS,
            FsError::NotADirectory => libc::ENOTDIR,
            FsError::IsADirectory => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::Exists => libc::EEXIST,
            FsError::NotPermitted(_) => libc::EPERM,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::NotSupported => libc::ENOTSUP,
            FsError::BadHandle => libc::EBADF,
            FsError::Stale => libc::ESTALE,
            FsError::Denied => libc::EACCES,
            FsError::Control(e) => e.errno(),
            FsError::Repo(e) => match e {
                RepoError::NoRepo(_)
                | RepoError::NoBranch { .. }
                | RepoError::NoTag { .. }
                | RepoError::UnknownRef { .. }
                | RepoError::NoParent { .. }
                | RepoError::NotFound(_)
                | RepoError::BadName { .. }
                | RepoError::BadRefExpr(_)
                | RepoError::AmbiguousRef { .. } => libc::ENOENT,
                RepoError::NotABranch(_)
                | RepoError::Protected { .. }
                | RepoError::ReadOnlyRepo(_) => libc::EROFS,
                RepoError::CheckFailed(_) => libc::EPERM,
                RepoError::NoRun(_) => libc::ENOENT,
                RepoError::Concurrent(_) => libc::EAGAIN,
                RepoError::BadPath { .. } => libc::EINVAL,
                RepoError::Store(_)
                | RepoError::Tree(_)
                | RepoError::Chunk(_)
                | RepoError::NoLake(_)
                | RepoError::LakeFormat { .. }
                | RepoError::RepoExists(_)
                | RepoError::BranchExists { .. }
                | RepoError::TagExists { .. }
                | RepoError::DefaultBranch { .. }
                | RepoError::NothingToCommit { .. }
                | RepoError::Decode { .. }
                | RepoError::BadAddress(_)
                | RepoError::BadStrategy(_)
                | RepoError::Conflict { .. }
                | RepoError::Unrevertable(_)
                | RepoError::NeedParent(_)
                | RepoError::Local { .. }
                | RepoError::Source(_) => libc::EIO,
            },
            FsError::Tree(TreeError::BadPath { .. }) => libc::EINVAL,
            FsError::Tree(_) | FsError::Store(_) | FsError::Io(_) | FsError::Stage(_) => libc::EIO,
        }
    }
}

pub type Result<T> = std::result::Result<T, FsError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
}

/// What `stat` shows, plus how long the kernel may cache it.
#[derive(Debug, Clone)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub perm: u16,
    pub nlink: u32,
    pub mtime: SystemTime,
    pub uid: u32,
    pub gid: u32,
    pub ttl: Duration,
}

impl Attr {
    /// The block size reported for files and by `statfs`.
    pub const BLOCK_SIZE: u32 = 4096;

    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(512)
    }
}

/// What `statfs` reports.
pub struct StatFs {
    /// Blocks of `Attr::BLOCK_SIZE`, all free.
    pub blocks: u64,
    /// Inodes, all free.
    pub files: u64,
    pub name_max: u32,
}

/// Mount settings the core needs.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// Show one ref (`repo`, `ref`) at the root instead of the whole lake.
    pub pinned: Option<(String, String)>,
    pub read_only: bool,
    pub metadata_ttl: Duration,
    pub uid: u32,
    pub gid: u32,
    /// Where files being written are spooled.
    pub spool_dir: PathBuf,
    /// Write-back mode: closes go to this journal; an uploader stages them.
    pub writeback: Option<Arc<Journal>>,
}

/// Attribute changes (`chmod`, `truncate`, `touch`, `chown`).
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub size: Option<u64>,
    pub mtime: Option<SystemTime>,
    /// Clear set-user-ID (and set-group-ID on a group-executable file), as
    /// a local file system does on `chown`, and on a truncate by a caller
    /// other than root; the mount tells the kernel it does this itself, so
    /// a `chown` needs no attribute refresh first.
    pub kill_suid: bool,
}

/// What a create does when the name turns out to be taken: as `open`
/// with `O_CREAT` and `O_EXCL`, with `O_TRUNC`, or with neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfExists {
    Fail,
    Truncate,
    Keep,
}

/// The files of `.tarn/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ControlFile {
    Ctl,
    Head,
    Info,
    Result,
    Status,
}

impl ControlFile {
    pub const ALL: [ControlFile; 5] = [
        ControlFile::Ctl,
        ControlFile::Head,
        ControlFile::Info,
        ControlFile::Result,
        ControlFile::Status,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ControlFile::Ctl => "ctl",
            ControlFile::Head => "head",
            ControlFile::Info => "info",
            ControlFile::Result => "result",
            ControlFile::Status => "status",
        }
    }

    fn from_name(n: &str) -> Option<ControlFile> {
        ControlFile::ALL.into_iter().find(|c| c.name() == n)
    }
}

/// How the kernel may cache an open file's pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageCache {
    /// The inode's content can never change: keep pages across opens.
    Keep,
    /// As `Keep` from now on, but the pages cached so far are another
    /// version's: drop them first.
    Refresh,
    /// Generated content, or a file being written: direct I/O, so the
    /// daemon sees every write and readers never see half of one.
    Bypass,
}

/// One ref as a directory: a branch (refreshed on the metadata TTL, shows
/// staged changes, writable) or a pinned commit (resolved once, read-only).
pub struct View {
    id: u64,
    pub repo: String,
    pub name: String,
    pub branch: Option<String>,
    state: Mutex<ViewState>,
    refreshing: Mutex<()>,
    stager: StageQueue,
    /// Held (shared) by each stage from its write to the lake or the
    /// journal until it is applied here; a reload holds it alone (see
    /// `LakeFs::reload`).
    gate: parking_lot::RwLock<()>,
    last_result: Mutex<String>,
    /// Staged batches the view's root already reflects (kept out of
    /// `ViewState`, which is cloned on every operation). Ordered, not
    /// hashed: one more a close, and a hash set that grows past its room
    /// rehashes every id under the close (1.5 ms at 60k).
    seen: Mutex<BTreeSet<String>>,
    /// The largest of `seen`: this view's writes are staged after it.
    latest_seen: Mutex<Option<String>>,
    /// Unwritten nodes after the last compaction (see `apply_local`).
    compacted_at: AtomicU64,
    /// Held while pending ops are applied: two applies at once would each
    /// redo what the other did.
    applying: Mutex<()>,
    /// The applier thread has been asked to apply this view's closes.
    apply_queued: AtomicBool,
    /// Its working tree spills once it weighs this much.
    spill_after: usize,
}

#[derive(Clone)]
struct ViewState {
    commit: Hash,
    root: Hash,
    time: SystemTime,
    /// Shared, like `creating` and `pending`: a state is cloned on every
    /// lookup.
    branch_ref: Option<Arc<BranchRef>>,
    checked: Instant,
    /// Holds the nodes of `root` that are not in the store (staged changes
    /// applied locally); replaced, with its nodes, on every full refresh.
    trees: Arc<Trees>,
    /// Files created and still open, not yet staged: path → inode.
    creating: Arc<BTreeMap<String, u64>>,
    /// Ops staged but not applied to `root` yet (see `apply_local`).
    pending: Arc<Pending>,
}

/// Ops staged by this mount and not yet applied to its view's tree: closes,
/// new empty directories, and unlinks and renames of files and symlinks
/// wait here (applying each on its own rewrites and hashes the directory's
/// tree leaf every time; applied together, once per leaf: an untar over
/// files that exist unlinks each before creating it anew, rsync renames
/// each file into place); any other op is applied, with those before it,
/// as soon as it is queued (see `Pending::push`).
#[derive(Clone, Default)]
struct Pending {
    /// Shared, so the applier takes them under the view's lock without
    /// copying each (`View::apply_pending`).
    ops: Vec<Arc<Op>>,
    /// What `ops` leave at each path they touch: the newest entry put or
    /// moved there, or `None` where one was removed or moved away.
    entries: HashMap<String, Option<Entry>>,
}

impl Pending {
    /// Queue `op` (`at`: the entry at a path in the view's tree, which
    /// `ops` apply to). True if lookups see all it does in `entries`: a
    /// put of a file or of an empty directory (`empty_dir`; nothing under
    /// it but what is put after it), or an unlink or rename of a file or
    /// symlink. Not a directory's removal or rename, nor a put of one with
    /// content: lookups below it would miss it until applied; nor an op on
    /// a path `at` failed to read (applying it tells the error).
    fn push(
        &mut self,
        op: Op,
        empty_dir: Option<&Hash>,
        at: impl Fn(&str) -> Result<Option<Entry>>,
    ) -> bool {
        self.push_shared(Arc::new(op), empty_dir, at)
    }

    fn push_shared(
        &mut self,
        op: Arc<Op>,
        empty_dir: Option<&Hash>,
        at: impl Fn(&str) -> Result<Option<Entry>>,
    ) -> bool {
        let leaf =
            |e: &Result<Option<Entry>>| matches!(e, Ok(Some(Entry::File(_) | Entry::Symlink(_))));
        let waits = match &*op {
            Op::Put { path, entry } => {
                self.entries.insert(path.clone(), Some(entry.clone()));
                match entry {
                    Entry::Dir(h) => Some(h) == empty_dir,
                    _ => is_file_put(&op),
                }
            }
            Op::Delete { path } => {
                let was = self.entry(path, &at);
                self.entries.insert(path.clone(), None);
                leaf(&was)
            }
            Op::Move { from, to } => {
                let moving = self.entry(from, &at);
                let replaced = self.entry(to, &at);
                let waits = leaf(&moving) && (matches!(replaced, Ok(None)) || leaf(&replaced));
                if let (true, Ok(moving)) = (waits, moving) {
                    self.entries.insert(from.clone(), None);
                    self.entries.insert(to.clone(), moving);
                }
                waits
            }
            Op::Graft { .. } => false,
        };
        self.ops.push(op);
        waits
    }

    /// The entry at `path` once `ops` are applied to the tree `at` reads.
    fn entry(
        &self,
        path: &str,
        at: impl Fn(&str) -> Result<Option<Entry>>,
    ) -> Result<Option<Entry>> {
        match self.entries.get(path) {
            Some(e) => Ok(e.clone()),
            None => at(path),
        }
    }

    /// The ops after some were applied to the tree `at` reads.
    fn rebuild(ops: Vec<Arc<Op>>, at: impl Fn(&str) -> Result<Option<Entry>>) -> Pending {
        let mut p = Pending::default();
        for op in ops {
            p.push_shared(op, None, &at);
        }
        p
    }

    /// The closes (puts of files) no later op removed, moved away or
    /// replaced: a put of the same entry twice is the same tree.
    fn closes_left(&self) -> Vec<Arc<Op>> {
        let mut left: BTreeMap<&str, Option<&Arc<Op>>> = BTreeMap::new();
        for op in &self.ops {
            match &**op {
                Op::Put { path, .. } => {
                    left.insert(path, is_file_put(op).then_some(op));
                }
                Op::Delete { path } => {
                    left.insert(path, None);
                }
                Op::Move { from, to } => {
                    left.insert(from, None);
                    left.insert(to, None);
                }
                Op::Graft { path, .. } => {
                    left.insert(path, None);
                }
            }
        }
        left.into_values().flatten().cloned().collect()
    }
}

/// Closes pending this many are applied together by the applier thread,
/// off the request path (see `apply_local`).
const PENDING_MAX: usize = 256;

/// Closes pending this many are applied by the request that queued the
/// last of them: the applier thread has fallen behind.
const PENDING_LIMIT: usize = 16 * PENDING_MAX;

/// Is this op the staging of a closed file? (A put of the same file twice
/// is the same tree: it can be applied again after a reload.)
fn is_file_put(op: &Op) -> bool {
    matches!(
        op,
        Op::Put {
            entry: Entry::File(_),
            ..
        }
    )
}

/// A small file's content as an inode holds it: by its hash (32 bytes in
/// place of the content: its length then differs from the file's size),
/// not the bytes, which the view's tree has (and spills, see
/// `VIEW_SPILL_AFTER`). Inodes held every small file's bytes before: a
/// mount that staged 100k small files, or listed 240k distinct ones, held
/// all of them. Files of up to 32 bytes are kept as they are.
fn light(file: File) -> File {
    match whole_inline(&file).map(|b| Hash::of(b)) {
        Some(h) => File {
            content: Content::Inline(Bytes::copy_from_slice(&h.0)),
            ..file
        },
        None => file,
    }
}

/// The bytes of a small file held whole (not made `light`), past 32 bytes.
fn whole_inline(file: &File) -> Option<&Bytes> {
    match &file.content {
        Content::Inline(b) if b.len() as u64 == file.size && file.size > 32 => Some(b),
        _ => None,
    }
}

/// The content hash of a file made `light`.
fn light_hash(file: &File) -> Option<Hash> {
    match &file.content {
        Content::Inline(b) if b.len() == 32 && file.size != 32 => {
            Some(Hash(b[..].try_into().expect("32 bytes")))
        }
        _ => None,
    }
}

/// The hash of a small file's content, whole or made `light`; `None` for
/// files of up to 32 bytes and those stored in chunks.
fn digest(file: &File) -> Option<Hash> {
    whole_inline(file)
        .map(|b| Hash::of(b))
        .or_else(|| light_hash(file))
}

/// Are two entries for a path (whole or `light`) the same version?
fn same_version(a: &File, b: &File) -> bool {
    a.size == b.size
        && match (digest(a), digest(b)) {
            (Some(x), Some(y)) => x == y,
            (None, None) => a.content == b.content,
            _ => false,
        }
}

impl ViewState {
    /// The entry at `path`, counting puts still pending.
    fn entry_at(&self, path: &str) -> Result<Option<Entry>> {
        self.pending
            .entry(path, |p| Ok(self.trees.lookup(&self.root, p)?))
    }
}

impl View {
    /// Apply the view's pending ops to its tree, all at once.
    fn apply_pending(&self) -> Result<()> {
        let _one = self.applying.lock();
        loop {
            // Little is done under the lock, which every request on the
            // view takes: a close waiting for it sleeps until this thread,
            // on another CPU, wakes it.
            let (root, trees, ops) = {
                let st = self.state.lock();
                if st.pending.ops.is_empty() {
                    return Ok(());
                }
                // The ops, not the `Pending`: closes queued meanwhile must
                // not copy it.
                (st.root, st.trees.clone(), st.pending.ops.clone())
            };
            let applied = ops.len();
            let owned = ops.iter().map(|op| Op::clone(op)).collect();
            let new_root = trees.apply_owned(&root, owned)?;
            let mut st = self.state.lock();
            if st.root == root && Arc::ptr_eq(&st.trees, &trees) {
                st.root = new_root;
                // Ops can only have been added after the ones applied.
                let rest = st.pending.ops[applied..].to_vec();
                let rebuilt = Pending::rebuild(rest, |p| Ok(trees.lookup(&new_root, p)?));
                let applied = std::mem::replace(&mut st.pending, Arc::new(rebuilt));
                self.settle(st);
                // Freed out of the lock.
                drop((applied, ops));
                return Ok(());
            }
        }
    }

    /// After its tree changed: compact the tree when that is worth it,
    /// then (outside the state lock) spill what it holds past
    /// `spill_after`. Returns the state as it is then.
    fn settle(&self, mut st: parking_lot::MutexGuard<'_, ViewState>) -> ViewState {
        self.compact(&mut st);
        let settled = st.clone();
        drop(st);
        spill_over(&settled.trees, self.spill_after);
        settled
    }

    /// Every edit leaves the nodes it replaced behind; once they outnumber
    /// the live ones, keep only what the root reaches.
    fn compact(&self, st: &mut ViewState) {
        let pending = st.trees.pending_nodes() as u64;
        let live = self.compacted_at.load(Ordering::Relaxed);
        // Also before a spill (see `spill_over`): only what the root
        // reaches is worth writing out.
        if pending > 4 * live + COMPACT_AFTER_NODES || st.trees.pending_weight() > self.spill_after
        {
            let kept = st.trees.retain_reachable(&[st.root]);
            self.compacted_at
                .store(kept.pending_nodes() as u64, Ordering::Relaxed);
            st.trees = Arc::new(kept);
        }
    }

    fn note_latest(&self, id: Option<&str>) {
        let mut latest = self.latest_seen.lock();
        if id > latest.as_deref() {
            *latest = id.map(str::to_string);
        }
    }
}

/// What an inode is.
#[derive(Clone)]
enum Node {
    Root,
    Repo(String),
    /// A directory or symlink in a view, by path.
    Tree {
        view: Arc<View>,
        path: String,
    },
    /// One version of a file. The inode number includes the content's
    /// identity, so a reader's cached pages are never those of another
    /// version; writes through this inode move it to the written version.
    File {
        view: Arc<View>,
        path: String,
        file: File,
    },
    ControlDir(Arc<View>),
    Control(Arc<View>, ControlFile),
}

/// An open file or directory.
enum Handle {
    File(Arc<FileHandle>),
    Write(Arc<WriteFile>, u64),
    /// A directory's inode and its entries when it was opened.
    Dir(u64, Vec<(String, Kind, u64)>),
    Control(Bytes),
    Ctl(Arc<View>, Mutex<CtlState>),
}

/// What a request does with a handle (see `LakeFs::may_wait`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandleOp {
    Read,
    Write,
    Flush,
}

#[derive(Default)]
struct CtlState {
    pending: Vec<u8>,
    result: Option<String>,
    /// Reads return the result from its start after each command, whatever
    /// the file offset the writes moved to.
    read_pos: usize,
}

/// A snapshot of a file at open: its content never changes under a reader.
pub struct FileHandle {
    file: File,
    chunks: Vec<ChunkRef>,
    /// Start offset of each chunk.
    starts: Vec<u64>,
    readahead: Mutex<ReadAhead>,
    /// The cache's complete whole-file copy of a multi-chunk file, if it
    /// had one at open.
    whole: Option<std::fs::File>,
    /// The whole-file copy being made for this reader (see `assembly`).
    assembly: Mutex<Option<Arc<Assembly>>>,
}

#[derive(Default)]
struct ReadAhead {
    next: u64,
    window: usize,
    /// Read in order from the start so far.
    from_start: bool,
}

pub struct LakeFs {
    lake: Arc<Lake>,
    cache: Arc<ChunkCache>,
    cfg: FsConfig,
    started: SystemTime,
    nodes: Mutex<Nodes>,
    views: Mutex<HashMap<(String, String), Arc<View>>>,
    next_view: AtomicU64,
    negative: Mutex<HashMap<(String, String), Instant>>,
    handles: Mutex<FxHashMap<u64, Handle>>,
    next_handle: AtomicU64,
    /// Files open for writing.
    writes: Mutex<Writes>,
    /// Rename counts per (view, old path): see `generation`.
    moved_away: Mutex<HashMap<(u64, String), u64>>,
    /// Inodes a rename moved, by (view, where they are now): see
    /// `moved_here`.
    moved_to: Mutex<HashMap<(u64, String), Vec<u64>>>,
    /// Each repository's configuration (protected branches, read-only),
    /// re-read once its metadata TTL has passed.
    policies: Mutex<HashMap<String, (Arc<RepoConfig>, Instant)>>,
    /// The applier thread: views whose pending closes are to be applied.
    applier: Worker<Weak<View>>,
    /// Drafts (files a create made in write-back mode) not yet ended.
    drafts: Arc<Mutex<FxHashMap<u64, Weak<WriteFile>>>>,
    /// Releases of drafts left to their own thread (`defer_releases`): a
    /// release is answered at once and staging the file is left to it,
    /// off the CPU of the caller's next request.
    releaser: std::sync::OnceLock<Worker<u64>>,
    /// The empty directory's hash (see `Pending::push`).
    empty_dir: Hash,
    /// Names the spill directories of working trees.
    next_spill: AtomicU64,
    /// Numbers each create, for its inode number (see `create`).
    creates: AtomicU64,
    /// Inodes whose pages in the kernel are of another version (see
    /// `entry_node`): opened next without keeping them.
    stale_pages: Mutex<HashSet<u64>>,
    /// Striped by (view, path) (`order_on`): a change of a file's mode or
    /// times with no spool stages what it read before a spool can start
    /// from that, or sees the spool.
    file_order: Vec<Mutex<()>>,
    /// Working trees spill once they weigh this much (`VIEW_SPILL_AFTER`).
    spill_after: usize,
}

/// Inode numbers are a hash of what the inode is, so they are stable within
/// a mount (and across remounts) without a table of every entry ever listed.
fn ino_of(parts: &[&[u8]]) -> u64 {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let x = u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"));
    // Keep clear of ROOT_INO and of 0, which FUSE reserves.
    x | (1 << 63)
}

/// Every inode the kernel was given, by number; and those of branch
/// views by (view, hash of the path) too, so a rename or removal of a file
/// or symlink finds its inodes without going through them all (with 200k
/// looked up, a walk made each rename 6 ms). What is under a directory
/// still takes a walk (`of` with `below`).
///
/// Each inode counts the replies that gave it to the kernel (lookups,
/// creates, READDIRPLUS entries); the kernel's FORGET takes them back, and
/// an inode with none left is dropped (`forget`): a mount that writes or
/// lists millions of files holds only the inodes the kernel still holds.
/// One removed from its path (unlink, rmdir, a rename over it) keeps its
/// count until the kernel forgets it, so a later reply with the same
/// number (the same version back at the same path) adds to that count
/// rather than starting a new one the old FORGET would take away.
#[derive(Default)]
struct Nodes {
    /// Boxed: the map's slots stay small, which is most of the daemon's
    /// memory with a million inodes looked up (and twice that while the
    /// table grows).
    by_ino: FxHashMap<u64, Box<Known>>,
    /// The inodes at each place (hash of view and path).
    by_path: PathIndex,
}

/// Inodes by the hash of their view and path: almost always one a place.
/// Hashed, not ordered: a create adds one, and finding where in an
/// ordered set of 100k took 0.8 µs. One inode a place in `first`, any
/// more in `more` (~20–40 bytes an inode).
#[derive(Default)]
struct PathIndex {
    first: FxHashMap<u64, u64>,
    more: FxHashMap<u64, Vec<u64>>,
}

impl PathIndex {
    fn insert(&mut self, h: u64, ino: u64) {
        match self.first.entry(h) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(ino);
            }
            std::collections::hash_map::Entry::Occupied(o) if *o.get() == ino => {}
            std::collections::hash_map::Entry::Occupied(_) => {
                let more = self.more.entry(h).or_default();
                if !more.contains(&ino) {
                    more.push(ino);
                }
            }
        }
    }

    fn remove(&mut self, h: u64, ino: u64) {
        if self.first.get(&h) == Some(&ino) {
            let next = self.more.get_mut(&h).and_then(Vec::pop);
            if self.more.get(&h).is_some_and(Vec::is_empty) {
                self.more.remove(&h);
            }
            match next {
                Some(next) => self.first.insert(h, next),
                None => self.first.remove(&h),
            };
        } else if let Some(more) = self.more.get_mut(&h) {
            more.retain(|i| *i != ino);
            if more.is_empty() {
                self.more.remove(&h);
            }
        }
    }

    /// The inodes at `h`, in no particular order.
    fn get(&self, h: u64) -> impl Iterator<Item = u64> + '_ {
        let more = self.more.get(&h).map(Vec::as_slice).unwrap_or_default();
        self.first
            .get(&h)
            .copied()
            .into_iter()
            .chain(more.iter().copied())
    }

    fn is_empty(&self) -> bool {
        self.first.is_empty()
    }
}

/// An inode number's node (none once removed from its path while the
/// kernel still holds it) and how many replies gave it to the kernel.
struct Known {
    node: Option<Node>,
    /// (Past 2^32 it stays there: the inode is then never dropped.)
    lookups: u32,
    /// Made by a create: its number is no path's (see `LakeFs::moved`).
    created: bool,
}

impl Node {
    /// The view and path of a node in a view (a directory, symlink or
    /// file; not the root, a repository or a control file).
    fn place(&self) -> Option<(&View, &str)> {
        match self {
            Node::Tree { view, path } | Node::File { view, path, .. } => Some((view, path)),
            _ => None,
        }
    }
}

/// Where a node is in a branch view, hashed (see `Nodes`). Pinned views
/// never change: their nodes are not indexed (a million looked up cost
/// no more).
fn path_key(node: &Node) -> Option<u64> {
    let (view, path) = node.place()?;
    view.branch.is_some().then(|| path_hash(view.id, path))
}

/// May inode `node` answer for `entry` at `path` in a view: the same
/// place, and for a file the same version?
fn answers_for(node: &Node, view: &View, path: &str, entry: &Entry) -> bool {
    match (node, entry) {
        (
            Node::File {
                view: v,
                path: p,
                file,
            },
            Entry::File(f),
        ) => v.id == view.id && p == path && same_version(file, f),
        (Node::Tree { view: v, path: p }, _) => {
            v.id == view.id
                && p == path
                && (view.branch.is_none() || !matches!(entry, Entry::File(_)))
        }
        _ => false,
    }
}

/// Are two nodes at one path of one view (one key in `Nodes::by_path`)?
fn same_place(a: &Node, b: &Node) -> bool {
    match (a.place(), b.place()) {
        (Some((va, pa)), Some((vb, pb))) => va.id == vb.id && pa == pb,
        _ => false,
    }
}

fn path_hash(view: u64, path: &str) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (view, path).hash(&mut h);
    h.finish()
}

impl Nodes {
    fn get(&self, ino: &u64) -> Option<&Node> {
        self.by_ino.get(ino)?.node.as_ref()
    }

    /// Set an inode's node (its count, if it has one, stays).
    fn insert(&mut self, ino: u64, node: Node) {
        let known = self.by_ino.entry(ino).or_insert_with(|| {
            Box::new(Known {
                node: None,
                lookups: 0,
                created: false,
            })
        });
        let old = known.node.replace(node);
        // Another version at the same place (every close): indexed as is.
        let new = known.node.as_ref().expect("just set");
        if old.as_ref().is_some_and(|old| same_place(old, new)) {
            return;
        }
        let key = path_key(new);
        if let Some(h) = old.as_ref().and_then(path_key) {
            self.by_path.remove(h, ino);
        }
        if let Some(h) = key {
            self.by_path.insert(h, ino);
        }
    }

    /// Set the node of an inode the kernel holds or was given; one it
    /// forgot stays forgotten.
    fn update(&mut self, ino: u64, node: Node) {
        if self.by_ino.contains_key(&ino) {
            self.insert(ino, node);
        }
    }

    fn insert_if_absent(&mut self, ino: u64, node: impl FnOnce() -> Node) {
        if self.get(&ino).is_none() {
            self.insert(ino, node());
        }
    }

    /// A reply gives `ino` to the kernel: false if it has no node (a
    /// FORGET or a removal took it since it was looked up).
    fn counted(&mut self, ino: u64) -> bool {
        match self.by_ino.get_mut(&ino) {
            Some(known) if known.node.is_some() => {
                known.lookups = known.lookups.saturating_add(1);
                true
            }
            _ => false,
        }
    }

    /// An inode a create made (its number from nothing about its path).
    fn created(&mut self, ino: u64) {
        if let Some(known) = self.by_ino.get_mut(&ino) {
            known.created = true;
        }
    }

    fn is_created(&self, ino: u64) -> bool {
        self.by_ino.get(&ino).is_some_and(|k| k.created)
    }

    /// The kernel forgot `n` of an inode's lookups: its node, if that was
    /// the last and it had one.
    /// `keep`: the kernel let go of it, but it stays until `drop_unlooked`
    /// (a file closed whose release is still being staged).
    fn forget(&mut self, ino: u64, n: u64, keep: bool) -> Option<Node> {
        let known = self.by_ino.get_mut(&ino)?;
        if known.lookups == u32::MAX {
            return None;
        }
        known.lookups = known.lookups.saturating_sub(n.min(u32::MAX as u64) as u32);
        if keep {
            return None;
        }
        self.drop_unlooked(ino)
    }

    /// Forget an inode the kernel holds no more (see `forget`).
    fn drop_unlooked(&mut self, ino: u64) -> Option<Node> {
        if self.by_ino.get(&ino)?.lookups != 0 || ino == ROOT_INO {
            return None;
        }
        let node = self.by_ino.remove(&ino)?.node?;
        if let Some(h) = path_key(&node) {
            self.by_path.remove(h, ino);
        }
        Some(node)
    }

    /// The inodes of `path` in a view (and, rarely, of others whose
    /// hash is the same: callers check the node's view and path).
    fn at(&self, view: u64, path: &str) -> impl Iterator<Item = u64> + '_ {
        self.by_path.get(path_hash(view, path))
    }

    /// The first inode of `path` in a view whose node `pick` takes.
    fn find_at(&self, view: u64, path: &str, pick: impl Fn(&Node) -> bool) -> Option<u64> {
        if self.by_path.is_empty() {
            return None; // (no hash to make)
        }
        self.at(view, path)
            .find(|ino| self.get(ino).is_some_and(&pick))
    }

    /// Take inodes from their paths; one the kernel holds keeps its count.
    fn remove(&mut self, inos: &[u64]) {
        for ino in inos {
            let Some(known) = self.by_ino.get_mut(ino) else {
                continue;
            };
            let old = known.node.take();
            if known.lookups == 0 {
                self.by_ino.remove(ino);
            }
            if let Some(h) = old.as_ref().and_then(path_key) {
                self.by_path.remove(h, *ino);
            }
        }
    }

    /// Change nodes' paths: `f` returns a node's new path, if it moves.
    fn repath(&mut self, inos: &[u64], mut f: impl FnMut(u64, &Node) -> Option<String>) {
        for &ino in inos {
            let Some(node) = self.by_ino.get_mut(&ino).and_then(|k| k.node.as_mut()) else {
                continue;
            };
            let Some(new) = f(ino, node) else {
                continue;
            };
            if let Some(h) = path_key(node) {
                self.by_path.remove(h, ino);
            }
            if let Node::Tree { path, .. } | Node::File { path, .. } = node {
                *path = new;
            }
            if let Some(h) = path_key(node) {
                self.by_path.insert(h, ino);
            }
        }
    }

    /// The inodes of `path` in a view, or of it and all below it (a walk
    /// over every inode); with `trees`, only directories and symlinks.
    fn of(&self, view: u64, path: &str, below: bool, trees: bool) -> Vec<u64> {
        let pick = |node: &Node, exact: bool| {
            (!trees || matches!(node, Node::Tree { .. }))
                && node
                    .place()
                    .is_some_and(|(v, p)| v.id == view && is_at(p, path, exact))
        };
        if !below {
            return self
                .at(view, path)
                .filter(|ino| self.get(ino).is_some_and(|n| pick(n, true)))
                .collect();
        }
        self.by_ino
            .iter()
            .filter(|(_, k)| k.node.as_ref().is_some_and(|n| pick(n, false)))
            .map(|(ino, _)| *ino)
            .collect()
    }
}

/// Files open for writing (or being closed): each under every inode it
/// was opened or looked up through (`WriteFile::inos`), and under its
/// view and path until it is unlinked — so a lookup through an inode it
/// was not opened through finds it without going through them all.
#[derive(Default)]
struct Writes {
    by_ino: FxHashMap<u64, Arc<WriteFile>>,
    /// Sorted, so what is below a directory comes together.
    by_path: BTreeMap<(u64, String), Arc<WriteFile>>,
}

impl Writes {
    fn get(&self, ino: &u64) -> Option<&Arc<WriteFile>> {
        self.by_ino.get(ino)
    }

    fn contains_key(&self, ino: &u64) -> bool {
        self.by_ino.contains_key(ino)
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.by_ino.is_empty() && self.by_path.is_empty()
    }

    /// Put a new spool in the table, under `ino` and its path.
    fn add(&mut self, ino: u64, wf: &Arc<WriteFile>) {
        self.also_under(ino, wf);
        self.index(wf, wf.path.lock().clone());
    }

    /// A spool in the table is open through `ino` too.
    fn also_under(&mut self, ino: u64, wf: &Arc<WriteFile>) {
        self.by_ino.insert(ino, wf.clone());
        wf.inos.lock().push(ino);
    }

    /// A spool closed for good, under every inode it was opened through;
    /// unless it was opened again meanwhile (opens of a spool found here
    /// count themselves under the table's lock: see `LakeFs::spool_of`).
    fn forget(&mut self, wf: &Arc<WriteFile>) {
        if wf.opens.load(Ordering::SeqCst) != 0 {
            return;
        }
        for ino in wf.inos.lock().drain(..) {
            if self.get(&ino).is_some_and(|w| Arc::ptr_eq(w, wf)) {
                self.by_ino.remove(&ino);
            }
        }
        self.unindex(wf, wf.path.lock().clone());
    }

    /// The file being written at `path` in a view, if any.
    fn at(&self, view: u64, path: &str) -> Option<&Arc<WriteFile>> {
        if self.by_path.is_empty() {
            return None; // (no key to build)
        }
        self.by_path.get(&(view, path.to_string()))
    }

    /// The files being written at `path` or below it in a view (those
    /// unlinked meanwhile are not: their closes stage nothing).
    fn under<'a>(&'a self, view: u64, path: &'a str) -> impl Iterator<Item = &'a Arc<WriteFile>> {
        self.by_path
            .range((view, path.to_string())..)
            .take_while(move |((v, p), _)| *v == view && p.starts_with(path))
            .filter(move |((_, p), _)| is_under(p, path))
            .map(|(_, wf)| wf)
    }

    /// `wf` is at `path` now.
    fn index(&mut self, wf: &Arc<WriteFile>, path: String) {
        self.by_path.insert((wf.view, path), wf.clone());
    }

    /// `wf` is no longer at `path` (moved, unlinked or forgotten).
    fn unindex(&mut self, wf: &Arc<WriteFile>, path: String) {
        let key = (wf.view, path);
        if self.by_path.get(&key).is_some_and(|w| Arc::ptr_eq(w, wf)) {
            self.by_path.remove(&key);
        }
    }
}

/// Hold each file's staging, in the order given (`LakeFs::writers_at`).
fn hold(writers: &[Arc<WriteFile>]) -> Vec<parking_lot::MutexGuard<'_, ()>> {
    writers.iter().map(|wf| wf.staging.lock()).collect()
}

/// Is `p` at `path` or below it?
fn is_under(p: &str, path: &str) -> bool {
    p.strip_prefix(path)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Is `p` at `path` (`exact`), or at it or below it?
fn is_at(p: &str, path: &str, exact: bool) -> bool {
    if exact {
        p == path
    } else {
        is_under(p, path)
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}/{name}")
    }
}

fn parent_of(path: &str) -> &str {
    path.rfind('/').map(|i| &path[..i]).unwrap_or("")
}

fn time_of_ns(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH
    }
}

fn ns_of(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(FsError::Invalid("bad file name"));
    }
    if name.len() > 255 {
        return Err(FsError::Invalid("name longer than 255 bytes"));
    }
    Ok(())
}

/// While work keeps coming, a `PollQueue`'s thread looks for it this
/// often...
const POLL: Duration = Duration::from_millis(1);
/// ...and after this many looks that found none, sleeps until woken.
const IDLE_POLLS: u32 = 200;

/// Work for one thread, handed over by requests without waking it while
/// it is busy: the thread looks every `POLL` while work comes, and sleeps
/// to be woken only after `IDLE_POLLS` looks found none. A wakeup from a
/// request costs that request: the kernel counts a CPU that runs only
/// idle-class queue threads (`super::sched`) as idle, and runs the woken
/// thread there at once, ahead of the request (190 µs a wakeup in a
/// profiled untar, one every 256 closes).
struct PollQueue<T> {
    items: Mutex<Vec<T>>,
    /// The thread sleeps until woken.
    parked: AtomicBool,
    wake: parking_lot::Condvar,
    stop: AtomicBool,
}

/// A `PollQueue` and its thread, which stops when this is dropped.
struct Worker<T>(Arc<PollQueue<T>>);

impl<T> Drop for Worker<T> {
    fn drop(&mut self) {
        let _items = self.0.items.lock();
        self.0.stop.store(true, Ordering::SeqCst);
        self.0.wake.notify_one();
    }
}

impl<T: Send + 'static> PollQueue<T> {
    /// Start its thread, which hands what comes to `serve`, in order.
    fn start(name: &str, serve: impl FnMut(Vec<T>) + Send + 'static) -> Result<Worker<T>> {
        let q = Arc::new(PollQueue {
            items: Mutex::new(Vec::new()),
            parked: AtomicBool::new(false),
            wake: parking_lot::Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let shared = q.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || shared.run(serve))
            .map_err(FsError::Io)?;
        Ok(Worker(q))
    }

    fn push(&self, item: T) {
        self.items.lock().push(item);
        if self.parked.load(Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    /// What is queued and not yet taken by the thread.
    fn take(&self) -> Vec<T> {
        std::mem::take(&mut *self.items.lock())
    }

    fn run(&self, mut serve: impl FnMut(Vec<T>)) {
        let mut idle = 0;
        while !self.stop.load(Ordering::SeqCst) {
            let items = self.take();
            if !items.is_empty() {
                idle = 0;
                serve(items);
            } else if idle < IDLE_POLLS {
                idle += 1;
                std::thread::sleep(POLL);
            } else {
                super::memory::give_back_if_asked();
                // `push` pushes, then looks at `parked`: set under the
                // lock before the last look, so an item pushed after that
                // look finds it set and wakes this thread.
                let mut items = self.items.lock();
                self.parked.store(true, Ordering::SeqCst);
                while items.is_empty() && !self.stop.load(Ordering::SeqCst) {
                    self.wake.wait(&mut items);
                }
                self.parked.store(false, Ordering::SeqCst);
                idle = 0;
            }
        }
    }
}

/// The applier thread: views whose closes are to be applied, queued by
/// closes (see `PollQueue`).
fn start_applier() -> Result<Worker<Weak<View>>> {
    PollQueue::start("tarn-apply", |views: Vec<Weak<View>>| {
        for view in views {
            let Some(view) = view.upgrade() else { continue };
            view.apply_queued.store(false, Ordering::Release);
            if let Err(e) = view.apply_pending() {
                // The next request that needs the tree tries again
                // and reports it.
                tracing::debug!(repo = %view.repo, view = %view.name, %e, "applying closes");
            }
        }
    })
}

impl LakeFs {
    pub fn new(lake: Arc<Lake>, cache: Arc<ChunkCache>, cfg: FsConfig) -> Result<LakeFs> {
        let empty_dir = lake.trees().scratch().empty_dir();
        let applier = start_applier()?;
        let fs = LakeFs {
            lake,
            cache,
            cfg,
            started: SystemTime::now(),
            nodes: Mutex::new(Nodes::default()),
            views: Mutex::new(HashMap::new()),
            next_view: AtomicU64::new(1),
            negative: Mutex::new(HashMap::new()),
            handles: Mutex::new(FxHashMap::default()),
            next_handle: AtomicU64::new(1),
            writes: Mutex::new(Writes::default()),
            moved_away: Mutex::new(HashMap::new()),
            moved_to: Mutex::new(HashMap::new()),
            policies: Mutex::new(HashMap::new()),
            applier,
            drafts: Arc::default(),
            releaser: std::sync::OnceLock::new(),
            empty_dir,
            next_spill: AtomicU64::new(0),
            creates: AtomicU64::new(0),
            stale_pages: Mutex::new(HashSet::new()),
            file_order: (0..FILE_ORDER_STRIPES).map(|_| Mutex::new(())).collect(),
            spill_after: VIEW_SPILL_AFTER,
        };
        let root = match fs.cfg.pinned.clone() {
            Some((repo, reference)) => {
                let view = fs.view(&repo, &reference)?;
                Node::Tree {
                    view,
                    path: String::new(),
                }
            }
            None => Node::Root,
        };
        fs.nodes.lock().insert(ROOT_INO, root);
        if let Some(journal) = &fs.cfg.writeback {
            // The uploader asks for drafts kept open long to be written
            // whole again, so their first steps' segments can go.
            let drafts = Arc::downgrade(&fs.drafts);
            let j = Arc::downgrade(journal);
            journal.on_stale_drafts(move |ids| {
                let (Some(drafts), Some(j)) = (drafts.upgrade(), j.upgrade()) else {
                    return;
                };
                let files: Vec<Arc<WriteFile>> = {
                    let drafts = drafts.lock();
                    ids.iter()
                        .filter_map(|id| drafts.get(id)?.upgrade())
                        .collect()
                };
                for wf in files {
                    if let Some(d) = wf.draft.lock().as_mut() {
                        if let Err(e) = journal_state(&j, &wf, d) {
                            tracing::warn!(%e, "a draft not journaled again");
                        }
                    }
                }
            });
        }
        Ok(fs)
    }

    /// Answer releases of drafts at once and leave staging them to a
    /// thread running `serve` (which calls `release_now`); without this
    /// they are staged by the release itself.
    pub fn defer_releases(&self, serve: impl FnMut(Vec<u64>) + Send + 'static) -> Result<()> {
        let _ = self.releaser.set(PollQueue::start("tarn-release", serve)?);
        Ok(())
    }

    /// Stage what deferred releases are still queued, here and now.
    pub fn release_queued(&self) {
        if let Some(r) = self.releaser.get() {
            for fh in r.0.take() {
                self.release_logged(fh);
            }
        }
    }

    /// `release_now`, for a release already answered: a failure is logged
    /// (the draft stays, staged by the next command or recovered by the
    /// next daemon).
    pub fn release_logged(&self, fh: u64) {
        if let Err(e) = self.release_now(fh) {
            tracing::warn!(%e, "a released file not staged yet");
        }
    }

    /// Journal a step of a draft, under its lock, after the change: or its
    /// whole state, if its spool moved meanwhile (into a spool file as it
    /// grew, or back into memory).
    fn draft_step(&self, wf: &WriteFile, d: &mut Draft, step: DraftStep) -> Result<()> {
        let journal = self
            .cfg
            .writeback
            .as_ref()
            .expect("drafts only in write-back mode");
        if wf.spool_name() != d.spool {
            return journal_state(journal, wf, d);
        }
        journal
            .draft(&DraftRecord { id: d.id, step })
            .map_err(FsError::Stage)
    }

    /// End a draft (staged by its last close, or removed): no more steps,
    /// and its spool file is its own again (removed now: handles still
    /// open read on through their descriptor).
    fn end_draft(&self, wf: &WriteFile, draft: &mut Option<Draft>) -> Result<()> {
        let Some(d) = draft.as_mut() else {
            return Ok(());
        };
        self.draft_step(wf, d, DraftStep::Done)?;
        self.drafts.lock().remove(&d.id);
        *draft = None;
        wf.end_draft_spool();
        Ok(())
    }

    /// Truncate (or extend) a file open for writing; a draft's size is
    /// journaled with it.
    fn truncate_open(&self, wf: &WriteFile, draft: &mut Option<Draft>, size: u64) -> Result<()> {
        wf.truncate(size)?;
        match draft.as_mut() {
            Some(d) => {
                let mtime = wf.meta.lock().mtime;
                self.draft_step(wf, d, DraftStep::Size { size, mtime })
            }
            None => Ok(()),
        }
    }

    /// Before a command on `view`, or a look at its staged changes: stage
    /// what releases are queued, and every draft with changes not staged
    /// (a file closed whose release has not come yet: the kernel sends it
    /// after the close returns). A draft of another view that cannot be
    /// staged is only logged: it holds up no command but its own view's.
    fn catch_up(&self, view: &View) -> Result<()> {
        self.release_queued();
        let open: Vec<Arc<WriteFile>> = self
            .drafts
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for wf in open {
            let ino = wf.inos.lock().first().copied();
            let dirty = {
                let m = wf.meta.lock();
                m.dirty() && !m.unlinked
            };
            let (Some(ino), true) = (ino, dirty) else {
                continue;
            };
            match self.commit_write(ino, &wf) {
                Err(e) if wf.view == view.id => return Err(e),
                Err(e) => {
                    tracing::warn!(%e, path = %wf.path.lock(), "a closed file not staged yet")
                }
                Ok(()) => {}
            }
        }
        Ok(())
    }

    pub fn lake(&self) -> &Arc<Lake> {
        &self.lake
    }

    fn node(&self, ino: u64) -> Result<Node> {
        self.nodes
            .lock()
            .get(&ino)
            .cloned()
            .ok_or(FsError::NotFound)
    }

    fn remember(&self, ino: u64, node: Node) -> u64 {
        self.nodes.lock().insert_if_absent(ino, || node);
        ino
    }

    /// `remember` for a branch file's inode (its number names version `f`
    /// of `path`). A write through this inode made it another version, and
    /// this one is back (another writer, a revert): the node becomes this
    /// version again, unless the file is open for writing; the kernel's
    /// pages of it are the other version's, dropped at its next open.
    fn remember_version(&self, ino: u64, view: &Arc<View>, path: String, f: &File) {
        let node = || Node::File {
            view: view.clone(),
            path,
            file: f.clone(),
        };
        let open = self.writes.lock().contains_key(&ino);
        let mut nodes = self.nodes.lock();
        match nodes.get(&ino) {
            None => {
                nodes.insert(ino, node());
            }
            Some(Node::File { file, .. }) if !open && !same_version(file, f) => {
                nodes.insert(ino, node());
                drop(nodes);
                self.stale_pages.lock().insert(ino);
            }
            Some(_) => {}
        }
    }

    /// How many times the inodes at a path were moved away by a rename:
    /// part of the inode number, so what later appears at the old path never
    /// takes the inode of what moved.
    fn generation(&self, view: &View, path: &str) -> [u8; 8] {
        let g = self
            .moved_away
            .lock()
            .get(&(view.id, path.to_string()))
            .copied()
            .unwrap_or(0);
        g.to_le_bytes()
    }

    fn file_ino(&self, view: &View, path: &str, file: &File) -> u64 {
        // A small file's version by its hash, so that whole and `light`
        // entries of one version get one inode.
        let content = match digest(file) {
            Some(h) => h.0.to_vec(),
            None => postcard::to_allocvec(&file.content).expect("content encodes"),
        };
        let gen = self.generation(view, path);
        ino_of(&[
            b"file",
            &view.id.to_le_bytes(),
            path.as_bytes(),
            &gen,
            &file.size.to_le_bytes(),
            &content,
        ])
    }

    fn tree_ino(&self, view: &View, path: &str) -> u64 {
        if path.is_empty() {
            ino_of(&[b"view", &view.id.to_le_bytes()])
        } else {
            let gen = self.generation(view, path);
            ino_of(&[b"tree", &view.id.to_le_bytes(), path.as_bytes(), &gen])
        }
    }

    /// The inode a rename moved to `path`, if it still is there and is
    /// `entry` (for a file, the same version). A lookup of the new path
    /// answers with it rather than with the path's own number, so the
    /// kernel's dentry there stays valid: else, once the entry's TTL has
    /// passed, the kernel drops a moved directory's dentry for a new one
    /// (a process inside it loses its path, and the two lookups of one
    /// rename can see two dentries of one directory).
    fn moved_here(&self, view: &View, path: &str, entry: &Entry) -> Option<u64> {
        let inos = {
            let moved_to = self.moved_to.lock();
            if moved_to.is_empty() {
                return None;
            }
            moved_to.get(&(view.id, path.to_string()))?.clone()
        };
        let nodes = self.nodes.lock();
        inos.into_iter().find(|ino| {
            nodes
                .get(ino)
                .is_some_and(|n| answers_for(n, view, path, entry))
        })
    }

    /// The inode number of an entry found at `path` in a view.
    fn child_ino(&self, view: &View, path: &str, entry: &Entry) -> u64 {
        if let Some(ino) = self.moved_here(view, path, entry) {
            return ino;
        }
        match entry {
            Entry::File(f) if view.branch.is_some() => {
                // Hashed once for both (a listing's entries are whole).
                let f = light(f.clone());
                self.held_version(view, path, &Entry::File(f.clone()))
                    .unwrap_or_else(|| self.file_ino(view, path, &f))
            }
            _ => self.tree_ino(view, path),
        }
    }

    /// An inode this mount holds for `file` (an entry of `path`): the one
    /// it was created or written through. Its number is not the one
    /// the version's content names, and a lookup answering with that one
    /// would have the kernel drop its dentry and the inode (a FORGET and
    /// a LOOKUP more for each file, when an untar runs over files it
    /// wrote, or `ls -l` after it).
    fn held_version(&self, view: &View, path: &str, file: &Entry) -> Option<u64> {
        let nodes = self.nodes.lock();
        nodes.find_at(view.id, path, |n| answers_for(n, view, path, file))
    }

    /// The inode for an entry found at `path` in a view.
    fn entry_node(&self, view: &Arc<View>, path: String, entry: &Entry) -> u64 {
        match entry {
            Entry::File(f) if view.branch.is_some() => {
                // Made `light` first, so a small file's content is hashed
                // once: its inode number and its node take that form.
                let f = light(f.clone());
                let ino = self.child_ino(view, &path, &Entry::File(f.clone()));
                self.remember_version(ino, view, path, &f);
                ino
            }
            // A pinned view never changes: its files need no version in the
            // inode, and a path is all the node has to hold (1M looked-up
            // files stay small).
            _ => {
                let ino = self.child_ino(view, &path, entry);
                self.remember(
                    ino,
                    Node::Tree {
                        view: view.clone(),
                        path,
                    },
                );
                ino
            }
        }
    }

    // ---- views ----

    /// The view for `repo/name`, resolving `name` as a ref the first time.
    fn view(&self, repo: &str, name: &str) -> Result<Arc<View>> {
        let key = (repo.to_string(), name.to_string());
        if let Some(v) = self.views.lock().get(&key) {
            return Ok(v.clone());
        }
        if let Some(t) = self.negative.lock().get(&key) {
            if t.elapsed() < NEGATIVE_TTL {
                return Err(FsError::NotFound);
            }
        }
        let resolved = match self.lake.resolve(repo, name) {
            Ok(r) => r,
            Err(e) => {
                let fs_err = FsError::from(e);
                if fs_err.errno() == libc::ENOENT {
                    self.negative.lock().insert(key, Instant::now());
                }
                return Err(fs_err);
            }
        };
        let mut seen = BTreeSet::new();
        let state = match &resolved.branch {
            Some(b) => {
                let (state, batches) = self.read_branch(repo, b)?;
                seen = batches;
                state
            }
            None => {
                let c = self.lake.commit(repo, &resolved.commit)?;
                ViewState {
                    commit: resolved.commit,
                    root: c.tree,
                    time: UNIX_EPOCH + Duration::from_millis(c.time.max(0) as u64),
                    branch_ref: None,
                    checked: Instant::now(),
                    trees: Arc::new(self.lake.trees().scratch()),
                    creating: Arc::default(),
                    pending: Arc::default(),
                }
            }
        };
        let view = Arc::new(View {
            id: self.next_view.fetch_add(1, Ordering::Relaxed),
            repo: repo.to_string(),
            name: name.to_string(),
            branch: resolved.branch,
            state: Mutex::new(state),
            refreshing: Mutex::new(()),
            gate: parking_lot::RwLock::new(()),
            stager: StageQueue::default(),
            last_result: Mutex::new(String::new()),
            latest_seen: Mutex::new(seen.iter().max().cloned()),
            seen: Mutex::new(seen),
            compacted_at: AtomicU64::new(0),
            applying: Mutex::new(()),
            apply_queued: AtomicBool::new(false),
            spill_after: self.spill_after,
        });
        Ok(self.views.lock().entry(key).or_insert(view).clone())
    }

    /// A branch's working tree as the store has it now, and the staged
    /// batches it reflects.
    fn read_branch(&self, repo: &str, branch: &str) -> Result<(ViewState, BTreeSet<String>)> {
        let mut trees = Arc::new(self.working_trees());
        let w = self.lake.working_state(repo, branch, &trees)?;
        if trees.pending_weight() > self.spill_after {
            // Staged elsewhere, or by an earlier daemon: much to hold.
            trees = Arc::new(trees.retain_reachable(&[w.root]));
            spill_over(&trees, self.spill_after);
        }
        let state = ViewState {
            commit: w.head,
            root: w.root,
            time: UNIX_EPOCH + Duration::from_millis(w.commit_time.max(0) as u64),
            branch_ref: Some(Arc::new(w.branch_ref)),
            checked: Instant::now(),
            trees,
            creating: Arc::default(),
            pending: Arc::default(),
        };
        Ok((state, w.batches.into_iter().collect()))
    }

    /// A handle for a branch view's working tree: its staged changes spill
    /// to the spool directory once they weigh `spill_after`.
    fn working_trees(&self) -> Trees {
        let n = self.next_spill.fetch_add(1, Ordering::Relaxed);
        let dir = self.cfg.spool_dir.join("views").join(n.to_string());
        self.lake.trees().scratch_spilling(dir)
    }

    /// The current state of a view, refreshing a branch once its metadata
    /// TTL has passed: a moved ref means a full reload; otherwise only
    /// batches staged elsewhere since are applied. One thread refreshes a
    /// view at a time; the others use the state they have, so no one waits
    /// on the store while holding a lock others need.
    fn state(&self, view: &View) -> Result<ViewState> {
        view.apply_pending()?;
        self.state_with_pending(view)
    }

    /// `state`, leaving pending puts unapplied: for callers that look at
    /// one path and check `ViewState::pending` first (lookups, getattr).
    fn state_with_pending(&self, view: &View) -> Result<ViewState> {
        let current = view.state.lock().clone();
        let Some(branch) = &view.branch else {
            return Ok(current);
        };
        if current.checked.elapsed() < self.cfg.metadata_ttl {
            return Ok(current);
        }
        let Some(_refreshing) = view.refreshing.try_lock() else {
            return Ok(current);
        };
        self.refresh(view, branch)
    }

    fn refresh(&self, view: &View, branch: &str) -> Result<ViewState> {
        // Batches staged elsewhere come after this mount's pending puts.
        view.apply_pending()?;
        let current = view.state.lock().clone();
        let (r, _) = self.lake.branch(&view.repo, branch)?;
        if Some(&r) != current.branch_ref.as_deref() {
            return self.reload(view, branch);
        }
        let ids = self.lake.batch_ids(&view.repo, &r.staging)?;
        let new: Vec<String> = {
            // This view's own batches in the listing are in `seen` once
            // their stages are done: wait for those in flight, or one
            // would be applied twice (a rename twice moves what came next
            // to its old path).
            let _settled = view.gate.write();
            let seen = view.seen.lock();
            ids.into_iter().filter(|id| !seen.contains(id)).collect()
        };
        if new.is_empty() {
            view.state.lock().checked = Instant::now();
            return Ok(current);
        }
        // Batch by batch; the tree spills past what a view holds. The ops
        // are kept too while they are light, for local writes that land
        // meanwhile.
        let mut applying = current.trees.applying(&current.root, self.spill_after);
        let mut kept = Some(Vec::new());
        let mut weight = 0;
        for id in &new {
            let Some(b) = self.lake.read_batch(&view.repo, &r.staging, id)? else {
                continue;
            };
            weight += b.ops.iter().map(Op::encoded_size).sum::<usize>();
            if weight > self.spill_after {
                kept = None;
            }
            if let Some(k) = &mut kept {
                k.extend(b.ops.iter().cloned());
            }
            for op in b.ops {
                applying.op(op)?;
            }
        }
        let root = applying.finish()?;
        let mut st = view.state.lock();
        if st.root == current.root && Arc::ptr_eq(&st.trees, &current.trees) {
            st.root = root;
        } else if let Some(ops) = kept {
            // Local writes landed meanwhile: apply on top of them.
            st.root = st.trees.apply_owned(&st.root, ops)?;
        } else {
            // ...and much was staged elsewhere: read the branch afresh,
            // one batch at a time.
            drop(st);
            return self.reload(view, branch);
        }
        view.note_latest(new.iter().max().map(String::as_str));
        view.seen.lock().extend(new);
        st.checked = Instant::now();
        // As after local writes (refreshes add up).
        Ok(view.settle(st))
    }

    /// Replace a branch view's state with the branch as the store has it,
    /// keeping what is open and pending here.
    ///
    /// Every change applied here must be in what is read: no stage may be
    /// between its write and its apply meanwhile (`View::gate`), and with
    /// the write-back journal, what it holds is uploaded first. Else a
    /// change applied here but not read (a rename, a delete, a new
    /// directory or symlink) would be missing from the view until a
    /// refresh brought it back, and what was done meanwhile on the view
    /// as it then was (an rmdir of a directory that looked empty) would
    /// stay done.
    fn reload(&self, view: &View, branch: &str) -> Result<ViewState> {
        let _alone = view.gate.write();
        if let Some(journal) = &self.cfg.writeback {
            journal
                .wait_uploaded(JOURNAL_WAIT)
                .map_err(FsError::Stage)?;
        }
        let (mut fresh, batches) = self.read_branch(&view.repo, branch)?;
        let mut st = view.state.lock();
        fresh.creating = std::mem::take(&mut st.creating);
        // Closes that became pending meanwhile may be newer than what
        // the reload read: applied again on top (a put of the same entry
        // twice is the same tree), unless a later op removed, moved or
        // replaced the file. Other ops are not repeatable: one the reload
        // missed is not in `seen` either, so a refresh brings it.
        let closes = st.pending.closes_left();
        fresh.pending = Arc::new(Pending::rebuild(closes, |p| {
            Ok(fresh.trees.lookup(&fresh.root, p)?)
        }));
        *st = fresh.clone();
        *view.latest_seen.lock() = batches.last().cloned();
        *view.seen.lock() = batches;
        view.compacted_at.store(0, Ordering::Relaxed);
        Ok(fresh)
    }

    /// Force the next access to reload a view from the store.
    fn invalidate(&self, view: &View) {
        view.state.lock().checked = Instant::now() - self.cfg.metadata_ttl - Duration::from_secs(1);
    }

    fn ttl(&self, view: &View) -> Duration {
        if view.branch.is_some() {
            self.cfg.metadata_ttl
        } else {
            IMMUTABLE_TTL
        }
    }

    /// Can control commands be written for this view? Any branch of a
    /// writable mount: a protected branch still takes merges (which `repo`
    /// checks), and refuses the rest with EROFS.
    fn commandable(&self, view: &View) -> bool {
        !self.cfg.read_only && view.branch.is_some()
    }

    fn check_commandable(&self, view: &View) -> Result<()> {
        if self.commandable(view) {
            Ok(())
        } else {
            Err(FsError::ReadOnly)
        }
    }

    /// Can files of this view be written? Not on protected branches or in
    /// read-only repositories (as of the last metadata TTL).
    fn writable(&self, view: &View) -> bool {
        self.commandable(view) && !self.protected(view)
    }

    fn check_writable(&self, view: &View) -> Result<()> {
        if self.writable(view) {
            Ok(())
        } else {
            Err(FsError::ReadOnly)
        }
    }

    fn protected(&self, view: &View) -> bool {
        let Some(branch) = &view.branch else {
            return false;
        };
        let cached = self.policies.lock().get(&view.repo).cloned();
        let cfg = match cached {
            Some((cfg, at)) if at.elapsed() < self.cfg.metadata_ttl => cfg,
            stale => match self.lake.repo_config(&view.repo) {
                Ok(cfg) => {
                    let cfg = Arc::new(cfg);
                    self.policies
                        .lock()
                        .insert(view.repo.clone(), (cfg.clone(), Instant::now()));
                    cfg
                }
                // The store is unreachable: keep the last word we had.
                Err(_) => match stale {
                    Some((cfg, _)) => cfg,
                    None => return false,
                },
            },
        };
        cfg.read_only || cfg.protected.iter().any(|b| b == branch)
    }

    // ---- staging ----

    /// Stage ops on a view's branch (group commit with concurrent callers)
    /// and apply them to the view. Returns once they are durable.
    fn stage(&self, view: &Arc<View>, ops: Vec<Op>) -> Result<()> {
        let branch = view.branch.clone().ok_or(FsError::ReadOnly)?;
        // `stage_known` leaves this check to us: protection may have come
        // since the file was opened.
        self.check_writable(view)?;
        if let Some(journal) = &self.cfg.writeback {
            return view
                .stager
                .submit(ops, |batch| {
                    let _staging = view.gate.read();
                    let latest = view.latest_seen.lock().clone();
                    let id = Lake::new_batch_id(latest.as_deref());
                    let entry = JournalEntry {
                        repo: view.repo.clone(),
                        branch: branch.clone(),
                        batch: id,
                        ops: batch,
                    };
                    journal.append(&entry)?;
                    self.apply_local(view, &entry.batch, entry.ops)
                        .map_err(|e| e.to_string())
                })
                .map_err(FsError::Stage);
        }
        view.stager
            .submit(ops, |batch| {
                let _staging = view.gate.read();
                let hint = StageHint {
                    token: match &view.state.lock().branch_ref {
                        Some(r) => r.staging.clone(),
                        None => return Err("not a branch".to_string()),
                    },
                    seen: view.latest_seen.lock().clone(),
                    id: None,
                };
                let id = self
                    .lake
                    .stage_known(&view.repo, &branch, batch.clone(), &hint)
                    .map_err(|e| e.to_string())?;
                self.apply_local(view, &id, batch)
                    .map_err(|e| e.to_string())
            })
            .map_err(FsError::Stage)
    }

    fn apply_local(&self, view: &Arc<View>, id: &str, ops: Vec<Op>) -> Result<()> {
        let pending = {
            let mut st = view.state.lock();
            if view.seen.lock().contains(id) {
                return Ok(()); // a refresh already picked it up
            }
            // Closes (and unlinks and renames of files) wait to be applied
            // together; anything else goes now, after them.
            let ViewState {
                pending,
                trees,
                root,
                ..
            } = &mut *st;
            let p = Arc::make_mut(pending);
            let mut all_wait = true;
            for op in ops {
                all_wait &= p.push(op, Some(&self.empty_dir), |path| {
                    Ok(trees.lookup(root, path)?)
                });
            }
            view.note_latest(Some(id));
            view.seen.lock().insert(id.to_string());
            if all_wait {
                p.ops.len()
            } else {
                usize::MAX
            }
        };
        if pending >= PENDING_LIMIT {
            return view.apply_pending();
        }
        // Off the request path: on a small machine the caller and this
        // request's thread share a CPU, the applier another.
        if pending >= PENDING_MAX && !view.apply_queued.swap(true, Ordering::AcqRel) {
            self.applier.0.push(Arc::downgrade(view));
        }
        Ok(())
    }

    // ---- attributes ----

    fn dir_attr(&self, ino: u64, mtime: SystemTime, ttl: Duration, writable: bool) -> Attr {
        Attr {
            ino,
            kind: Kind::Dir,
            size: 4096,
            perm: if writable { 0o755 } else { 0o555 },
            nlink: 2,
            mtime,
            uid: self.cfg.uid,
            gid: self.cfg.gid,
            ttl,
        }
    }

    fn file_attr(&self, ino: u64, view: &View, size: u64, mode: u32, mtime: i64) -> Attr {
        Attr {
            ino,
            kind: Kind::File,
            size,
            perm: if self.writable(view) {
                (mode & 0o7777) as u16
            } else {
                (mode & 0o7555) as u16
            },
            nlink: 1,
            mtime: time_of_ns(mtime),
            uid: self.cfg.uid,
            gid: self.cfg.gid,
            ttl: self.ttl(view),
        }
    }

    fn entry_attr(&self, ino: u64, view: &View, state: &ViewState, entry: &Entry) -> Attr {
        match entry {
            Entry::Dir(_) => self.dir_attr(ino, state.time, self.ttl(view), self.writable(view)),
            Entry::File(f) => self.file_attr(ino, view, f.size, f.mode, f.mtime),
            Entry::Symlink(t) => Attr {
                ino,
                kind: Kind::Symlink,
                size: t.len() as u64,
                perm: 0o777,
                nlink: 1,
                mtime: state.time,
                uid: self.cfg.uid,
                gid: self.cfg.gid,
                ttl: self.ttl(view),
            },
        }
    }

    fn control_attr(&self, ino: u64, view: &View, file: ControlFile) -> Attr {
        let writable = file == ControlFile::Ctl && self.commandable(view);
        Attr {
            ino,
            kind: Kind::File,
            // Contents are made at open and read with direct I/O.
            size: 0,
            perm: if writable { 0o644 } else { 0o444 },
            nlink: 1,
            mtime: self.started,
            uid: self.cfg.uid,
            gid: self.cfg.gid,
            ttl: Duration::ZERO,
        }
    }

    /// May the caller `uid`/`gid` access `ino` as `mask` asks (`access(2)`'s
    /// `R_OK | W_OK | X_OK`; 0 only asks that it exists)? Root may do
    /// anything but execute a file that no one may execute. Supplementary
    /// groups are not known here: mounts shared with other users leave this
    /// to the kernel (`default_permissions`).
    pub fn check_access(&self, ino: u64, uid: u32, gid: u32, mask: u32) -> Result<()> {
        let a = self.getattr(ino)?;
        let mask = mask & 0o7;
        let perm = u32::from(a.perm);
        if uid == 0 {
            let exec = mask & 0o1 != 0 && a.kind == Kind::File && perm & 0o111 == 0;
            return if exec { Err(FsError::Denied) } else { Ok(()) };
        }
        let bits = if uid == a.uid {
            perm >> 6
        } else if gid == a.gid {
            perm >> 3
        } else {
            perm
        } & 0o7;
        if mask & !bits == 0 {
            Ok(())
        } else {
            Err(FsError::Denied)
        }
    }

    /// What `stat` shows of a file open for writing: its spool. Cached
    /// like any other: every change to it goes through this kernel, which
    /// drops its copy of size and times on each write and takes setattr's
    /// reply as the new attributes.
    fn spool_attr(&self, ino: u64, view: &View, wf: &WriteFile) -> Attr {
        let m = wf.meta.lock().clone();
        self.file_attr(ino, view, m.size, m.mode, m.mtime)
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        if let Some(wf) = self.writes.lock().get(&ino).cloned() {
            let Node::File { view, .. } = self.node(ino)? else {
                return Err(FsError::NotFound);
            };
            return Ok(self.spool_attr(ino, &view, &wf));
        }
        match self.node(ino)? {
            Node::Root => Ok(self.dir_attr(ino, self.started, self.cfg.metadata_ttl, false)),
            Node::Repo(_) => Ok(self.dir_attr(ino, self.started, self.cfg.metadata_ttl, false)),
            Node::ControlDir(_) => Ok(self.dir_attr(ino, self.started, Duration::ZERO, false)),
            Node::Control(view, f) => Ok(self.control_attr(ino, &view, f)),
            Node::File { view, path, file } => {
                // Metadata (mode, mtime) of the same content follows the
                // branch; another version keeps what it had.
                let state = self.state_with_pending(&view)?;
                let entry = match state.entry_at(&path)? {
                    Some(Entry::File(f)) if same_version(&file, &f) => {
                        // The branch's version, maybe being written through
                        // another inode: then what it is now is the spool.
                        if let Some(wf) = self.spool_of(ino, &view, &path, false) {
                            return Ok(self.spool_attr(ino, &view, &wf));
                        }
                        Entry::File(f)
                    }
                    _ => Entry::File(file),
                };
                Ok(self.entry_attr(ino, &view, &state, &entry))
            }
            Node::Tree { view, path } => {
                let state = self.state_with_pending(&view)?;
                let entry = state.entry_at(&path)?.ok_or(FsError::NotFound)?;
                Ok(self.entry_attr(ino, &view, &state, &entry))
            }
        }
    }

    // ---- lookup and listing ----

    /// The directory at `path` in a view (its tree hash), or an error.
    fn dir_at(&self, state: &ViewState, path: &str) -> Result<Hash> {
        match state.entry_at(path)? {
            Some(Entry::Dir(h)) => Ok(h),
            Some(_) => Err(FsError::NotADirectory),
            None => Err(FsError::NotFound),
        }
    }

    /// What is at `path` in a view, as `child` finds it, without making
    /// an inode for it (the kernel is given none): `Some(None)` for a file
    /// being created.
    fn child_entry(&self, state: &ViewState, path: &str) -> Result<Option<Option<Entry>>> {
        if state.creating.contains_key(path) {
            return Ok(Some(None));
        }
        Ok(state.entry_at(path)?.map(Some))
    }

    /// What is at `path` in a view: a file being created, or a tree entry.
    fn child(
        &self,
        view: &Arc<View>,
        state: &ViewState,
        path: &str,
    ) -> Result<Option<(u64, Option<Entry>)>> {
        if let Some(ino) = state.creating.get(path) {
            return Ok(Some((*ino, None)));
        }
        match state.entry_at(path)? {
            Some(e) => Ok(Some((self.entry_node(view, path.to_string(), &e), Some(e)))),
            None => Ok(None),
        }
    }

    /// Find `name` in directory `parent` for the kernel: the inode's count
    /// of replies (see `Nodes`) takes this one.
    pub fn lookup(&self, parent: u64, name: &str) -> Result<Attr> {
        // A FORGET can drop the inode between finding it and counting the
        // reply; finding it again makes its node anew.
        for _ in 0..3 {
            let attr = self.find(parent, name)?;
            if self.nodes.lock().counted(attr.ino) {
                return Ok(attr);
            }
        }
        Err(FsError::Stale)
    }

    /// The kernel let go of `n` lookups of an inode (FORGET): once it
    /// holds none, the mount forgets the inode too.
    pub fn forget(&self, ino: u64, n: u64) {
        // A file closed but not yet released (a draft's release is staged
        // after it is answered) keeps its inode until then: lookups still
        // find it at its path, among the files being created.
        let held = self.writes.lock().contains_key(&ino);
        let Some(node) = self.nodes.lock().forget(ino, n, held) else {
            return;
        };
        self.forgotten(ino, node);
    }

    /// What goes with an inode the kernel has let go of.
    fn forgotten(&self, ino: u64, node: Node) {
        self.stale_pages.lock().remove(&ino);
        if let Node::Tree { view, path } | Node::File { view, path, .. } = node {
            let key = (view.id, path);
            let mut moved_to = self.moved_to.lock();
            if let Some(here) = moved_to.get_mut(&key) {
                here.retain(|i| *i != ino);
                if here.is_empty() {
                    moved_to.remove(&key);
                }
            }
        }
    }

    /// `lookup` without counting the reply.
    fn find(&self, parent: u64, name: &str) -> Result<Attr> {
        match self.node(parent)? {
            Node::Root => {
                self.lake.repo_config(name)?;
                let ino = self.remember(
                    ino_of(&[b"repo", name.as_bytes()]),
                    Node::Repo(name.to_string()),
                );
                self.getattr(ino)
            }
            Node::Repo(repo) => {
                let view = self.view(&repo, name)?;
                let ino = self.remember(
                    self.tree_ino(&view, ""),
                    Node::Tree {
                        view,
                        path: String::new(),
                    },
                );
                self.getattr(ino)
            }
            Node::Tree { view, path } => {
                if path.is_empty() && name == CONTROL_DIR {
                    let ino = self.remember(
                        ino_of(&[b"ctl", &view.id.to_le_bytes()]),
                        Node::ControlDir(view),
                    );
                    return self.getattr(ino);
                }
                let state = self.state_with_pending(&view)?;
                self.dir_at(&state, &path)?;
                let child = join(&path, name);
                match self.child(&view, &state, &child)? {
                    // Being written (through this inode or another): its
                    // spool, or the kernel would take the branch's older
                    // size as the file's (an append would land there).
                    Some((ino, Some(Entry::File(_))))
                        if let Some(wf) = self.spool_of(ino, &view, &child, false) =>
                    {
                        Ok(self.spool_attr(ino, &view, &wf))
                    }
                    Some((ino, Some(entry))) => Ok(self.entry_attr(ino, &view, &state, &entry)),
                    Some((ino, None)) => self.getattr(ino),
                    None => Err(FsError::NotFound),
                }
            }
            Node::ControlDir(view) => {
                let f = ControlFile::from_name(name).ok_or(FsError::NotFound)?;
                let ino = self.remember(
                    ino_of(&[b"ctlfile", &view.id.to_le_bytes(), name.as_bytes()]),
                    Node::Control(view, f),
                );
                self.getattr(ino)
            }
            Node::Control(..) | Node::File { .. } => Err(FsError::NotADirectory),
        }
    }

    pub fn readlink(&self, ino: u64) -> Result<String> {
        let Node::Tree { view, path } = self.node(ino)? else {
            return Err(FsError::Invalid("not a symlink"));
        };
        let state = self.state(&view)?;
        match state.trees.lookup(&state.root, &path)? {
            Some(Entry::Symlink(t)) => Ok(t),
            Some(_) => Err(FsError::Invalid("not a symlink")),
            None => Err(FsError::NotFound),
        }
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, h);
        fh
    }

    /// Directory entries (without `.` and `..`), snapshotted for the handle.
    pub fn opendir(&self, ino: u64) -> Result<u64> {
        let entries: Vec<(String, Kind, u64)> = match self.node(ino)? {
            Node::Root => self
                .lake
                .list_repos()?
                .into_iter()
                .map(|r| {
                    let ino = ino_of(&[b"repo", r.as_bytes()]);
                    (r, Kind::Dir, ino)
                })
                .collect(),
            Node::Repo(repo) => {
                let mut out = Vec::new();
                for (b, _) in self.lake.list_branches(&repo)? {
                    let ino = match self.views.lock().get(&(repo.clone(), b.clone())) {
                        Some(v) => self.tree_ino(v, ""),
                        None => ino_of(&[b"unviewed", repo.as_bytes(), b.as_bytes()]),
                    };
                    out.push((b, Kind::Dir, ino));
                }
                out
            }
            Node::ControlDir(view) => ControlFile::ALL
                .iter()
                .map(|f| {
                    let ino = ino_of(&[b"ctlfile", &view.id.to_le_bytes(), f.name().as_bytes()]);
                    (f.name().to_string(), Kind::File, ino)
                })
                .collect(),
            Node::Control(..) | Node::File { .. } => return Err(FsError::NotADirectory),
            Node::Tree { view, path } => {
                let state = self.state(&view)?;
                let dir = self.dir_at(&state, &path)?;
                let mut out: BTreeMap<String, (Kind, u64)> = state
                    .trees
                    .entries(&dir)?
                    .into_iter()
                    .map(|(name, e)| {
                        let child = join(&path, &name);
                        let kind = match &e {
                            Entry::Dir(_) => Kind::Dir,
                            Entry::File(_) => Kind::File,
                            Entry::Symlink(_) => Kind::Symlink,
                        };
                        (name, (kind, self.child_ino(&view, &child, &e)))
                    })
                    .collect();
                for (p, ino) in state.creating.iter() {
                    if parent_of(p) == path {
                        let name = p.rsplit('/').next().unwrap_or(p);
                        out.insert(name.to_string(), (Kind::File, *ino));
                    }
                }
                out.into_iter().map(|(n, (k, i))| (n, k, i)).collect()
            }
        };
        Ok(self.add_handle(Handle::Dir(ino, entries)))
    }

    /// Entries of an open directory from `offset` on (offsets count entries
    /// after `.` and `..`, so they stay valid whatever changes meanwhile).
    pub fn readdir(
        &self,
        fh: u64,
        offset: usize,
        mut add: impl FnMut(u64, usize, Kind, &str) -> bool,
    ) -> Result<()> {
        let handles = self.handles.lock();
        let Some(Handle::Dir(_, entries)) = handles.get(&fh) else {
            return Err(FsError::BadHandle);
        };
        for (i, (name, kind, ino)) in entries.iter().enumerate().skip(offset) {
            if add(*ino, i + 1, *kind, name) {
                break;
            }
        }
        Ok(())
    }

    /// Like `readdir`, with each entry looked up (the kernel then needs no
    /// LOOKUP for it: `find | xargs cat` costs one request per file fewer).
    /// An entry gone since the directory was opened is left out.
    pub fn readdirplus(
        &self,
        fh: u64,
        offset: usize,
        mut add: impl FnMut(usize, &str, &Attr) -> bool,
    ) -> Result<()> {
        // Looked up in batches, without holding the handle table.
        const BATCH: usize = 256;
        let mut at = offset;
        loop {
            let (dir, batch) = match self.handles.lock().get(&fh) {
                Some(Handle::Dir(dir, entries)) => (
                    *dir,
                    entries
                        .iter()
                        .skip(at)
                        .take(BATCH)
                        .map(|(n, ..)| n.clone())
                        .collect::<Vec<_>>(),
                ),
                _ => return Err(FsError::BadHandle),
            };
            if batch.is_empty() {
                return Ok(());
            }
            for name in &batch {
                at += 1;
                match self.lookup(dir, name) {
                    Ok(attr) => {
                        if add(at, name, &attr) {
                            // Not in this reply: the kernel never saw it.
                            self.forget(attr.ino, 1);
                            return Ok(());
                        }
                    }
                    Err(FsError::NotFound) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }

    // ---- open, read, write, close ----

    /// Open a file; returns the handle and how the kernel may cache pages.
    pub fn open(&self, ino: u64, write: bool, truncate: bool) -> Result<(u64, PageCache)> {
        self.open_with_backing(ino, write, truncate)
            .map(|(fh, cache, _)| (fh, cache))
    }

    /// Like `open`, plus, for a file that is exactly one verified chunk in
    /// the local cache or has a complete whole-file copy there, that file:
    /// the kernel may read it directly (FUSE passthrough) instead of asking
    /// the daemon.
    pub fn open_with_backing(
        &self,
        ino: u64,
        write: bool,
        truncate: bool,
    ) -> Result<(u64, PageCache, Option<std::fs::File>)> {
        let (fh, cache) = self.open_handle(ino, write, truncate)?;
        // Only pinned views: their inodes can never change content, so one
        // backing file per inode is always right.
        let pinned = matches!(self.node(ino)?, Node::Tree { view, .. } if view.branch.is_none());
        if cache != PageCache::Keep || !pinned {
            return Ok((fh, cache, None));
        }
        let single = match self.handles.lock().get(&fh) {
            Some(Handle::File(h))
                if h.chunks.len() == 1 && h.file.size == h.chunks[0].len as u64 =>
            {
                Some(h.chunks[0].hash)
            }
            _ => None,
        };
        let backing = match single {
            Some(hash) => self.cache.local_file(&hash)?,
            None => match self.handles.lock().get(&fh) {
                Some(Handle::File(h)) => h.whole.as_ref().and_then(|f| f.try_clone().ok()),
                _ => None,
            },
        };
        Ok((fh, cache, backing))
    }

    fn open_handle(&self, ino: u64, write: bool, truncate: bool) -> Result<(u64, PageCache)> {
        match self.node(ino)? {
            Node::File { view, path, file } => {
                // Being written: the spool is the file (a file still being
                // created is not in the view's tree yet).
                if write || truncate {
                    self.check_writable(&view)?;
                    // Opened: the handle holds the reference from here.
                    let wf = {
                        let _in_order = self.order_on(&view, &path);
                        match self.spool_of(ino, &view, &path, true) {
                            Some(wf) => wf,
                            None => {
                                let file = self.full_file(&view, &path, file)?;
                                self.writer(ino, &view, &path, &file)?
                            }
                        }
                    };
                    if truncate {
                        // (A draft joined: its own release is still to come.)
                        let res = self.truncate_open(&wf, &mut wf.draft.lock(), 0);
                        if let Err(e) = res {
                            self.close_spool(&wf);
                            return Err(e);
                        }
                    }
                    let fh = self.add_handle(Handle::Write(wf.clone(), ino));
                    wf.writers.lock().insert(fh);
                    return Ok((fh, PageCache::Bypass));
                }
                let live = {
                    let writes = self.writes.lock();
                    let live = writes
                        .get(&ino)
                        .filter(|wf| !wf.writers.lock().is_empty() || wf.meta.lock().dirty())
                        .cloned();
                    // Opened under the lock, as `spool_of` does.
                    live.inspect(|wf| open_ref(wf))
                };
                if let Some(wf) = live {
                    // Reading a file someone is writing: see the spool.
                    return Ok((self.add_handle(Handle::Write(wf, ino)), PageCache::Bypass));
                }
                let file = self.full_file(&view, &path, file)?;
                // (Written and closed, maybe not yet released: the node is
                // the version its close staged.)
                let cache = if self.stale_pages.lock().remove(&ino) {
                    PageCache::Refresh
                } else {
                    PageCache::Keep
                };
                Ok((
                    self.add_handle(Handle::File(Arc::new(self.snapshot(file)?))),
                    cache,
                ))
            }
            Node::Control(view, ControlFile::Ctl) => {
                if write || truncate {
                    self.check_commandable(&view)?;
                }
                let state = Mutex::new(CtlState::default());
                Ok((self.add_handle(Handle::Ctl(view, state)), PageCache::Bypass))
            }
            Node::Control(view, f) => {
                if write {
                    return Err(FsError::NotPermitted(
                        "control files other than ctl are read-only",
                    ));
                }
                let text = self.control_text(&view, f)?;
                Ok((
                    self.add_handle(Handle::Control(Bytes::from(text))),
                    PageCache::Bypass,
                ))
            }
            Node::Tree { view, path } => {
                let state = self.state(&view)?;
                match state.trees.lookup(&state.root, &path)? {
                    Some(Entry::Dir(_)) => Err(FsError::IsADirectory),
                    Some(Entry::File(file)) => {
                        // A file of a pinned view.
                        if write || truncate {
                            return Err(FsError::ReadOnly);
                        }
                        let handle = Arc::new(self.snapshot(file)?);
                        Ok((self.add_handle(Handle::File(handle)), PageCache::Keep))
                    }
                    Some(Entry::Symlink(_)) => Err(FsError::NotSupported),
                    None => Err(FsError::NotFound),
                }
            }
            Node::Root | Node::Repo(_) | Node::ControlDir(_) => Err(FsError::IsADirectory),
        }
    }

    /// An inode's file as the view has it at `path`, if that is still the
    /// inode's version: its content (a `light` node holds a hash only), and
    /// its mode and mtime, which follow the branch as in `getattr` (another
    /// inode of this version may have had a chmod). Else `Stale`, and the
    /// kernel looks the path up again: an open through an inode of an
    /// older version (a dentry the kernel looked up before a close through
    /// another inode wrote the file anew) must not read that version, nor
    /// start a write from it.
    fn full_file(&self, view: &View, path: &str, file: File) -> Result<File> {
        match self.state_with_pending(view)?.entry_at(path)? {
            Some(Entry::File(f)) if same_version(&file, &f) => Ok(f),
            _ => Err(FsError::Stale),
        }
    }

    fn snapshot(&self, file: File) -> Result<FileHandle> {
        let chunks = match &file.content {
            // Read in place, piece by piece (see `read_file`).
            Content::External(_) => Vec::new(),
            content => self.lake.trees().chunk_list(content)?,
        };
        let mut starts = Vec::with_capacity(chunks.len());
        let mut at = 0;
        for c in &chunks {
            starts.push(at);
            at += c.len as u64;
        }
        let whole = match chunks.len() {
            0 | 1 => None,
            _ => self.cache.whole_file(&chunks),
        };
        Ok(FileHandle {
            file,
            chunks,
            starts,
            readahead: Mutex::new(ReadAhead::default()),
            whole,
            assembly: Mutex::new(None),
        })
    }

    /// A new write spool of an inode, made from `file`, for a file that has
    /// none (its callers looked, under `order_on`); opened (`open_ref`):
    /// the caller closes it.
    fn writer(&self, ino: u64, view: &View, path: &str, file: &File) -> Result<Arc<WriteFile>> {
        let snapshot = self.snapshot(file.clone())?;
        let cache = self.cache.clone();
        let wf = Arc::new(WriteFile::new(
            &self.cfg.spool_dir,
            view.id,
            path.to_string(),
            file.mode,
            file.mtime,
            |put| {
                let mut at = 0;
                while at < snapshot.file.size {
                    let part =
                        read_file(&cache, &snapshot, at, 4 << 20).map_err(std::io::Error::other)?;
                    if part.is_empty() {
                        break;
                    }
                    put(at, &part)?;
                    at += part.len() as u64;
                }
                Ok(snapshot.file.size)
            },
            false,
        )?);
        self.stream_writes(&wf);
        let mut writes = self.writes.lock();
        let wf = match writes.get(&ino) {
            Some(open) => open.clone(),
            None => {
                writes.add(ino, &wf);
                wf
            }
        };
        open_ref(&wf);
        Ok(wf)
    }

    /// The spool of a file open for writing, through this inode or another
    /// (the kernel looked its path up again meanwhile), now under this one
    /// too. One spool per file, or each close would stage its own copy and
    /// the last would undo the other's writes. With `open`, opened
    /// (`open_ref`) before the lock is let go: a last close forgetting the
    /// spool meanwhile would leave this open outside `writes`, where no
    /// rename finds it (its close would stage it at its old path).
    fn spool_of(&self, ino: u64, view: &View, path: &str, open: bool) -> Option<Arc<WriteFile>> {
        let mut writes = self.writes.lock();
        let wf = match writes.get(&ino) {
            Some(wf) => wf.clone(),
            None => {
                let same = writes.at(view.id, path).cloned()?;
                writes.also_under(ino, &same);
                same
            }
        };
        if open {
            open_ref(&wf);
        }
        Some(wf)
    }

    /// Drop an open of a spool that was not a handle's; the last forgets it.
    fn close_spool(&self, wf: &Arc<WriteFile>) {
        if close_ref(wf) {
            self.writes.lock().forget(wf);
        }
    }

    /// Taken from before a file's spool is looked for until one is made or
    /// joined, or (with none) until a change of its mode or times is
    /// staged: so a spool never starts from what such a change replaces,
    /// and such a change never stages content a close replaced meanwhile.
    fn order_on(&self, view: &View, path: &str) -> parking_lot::MutexGuard<'_, ()> {
        use std::hash::{Hash as _, Hasher as _};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (view.id, path).hash(&mut h);
        self.file_order[h.finish() as usize % self.file_order.len()].lock()
    }

    /// Files written in order from their start are chunked into the lake
    /// as they come (synchronous mode; the write-back journal keeps its own
    /// chunks until they are uploaded).
    fn stream_writes(&self, wf: &WriteFile) {
        if self.cfg.writeback.is_none() {
            wf.stream_to(self.lake.store().clone(), self.lake.config().chunking);
        }
    }

    /// Read up to `size` bytes at `offset` from an open file.
    pub fn read(&self, fh: u64, offset: u64, size: usize) -> Result<Bytes> {
        let handle = match self.handles.lock().get(&fh) {
            Some(Handle::File(f)) => f.clone(),
            Some(Handle::Write(wf, _)) => return Ok(Bytes::from(wf.read(offset, size)?)),
            Some(Handle::Control(b)) => {
                let start = (offset as usize).min(b.len());
                let end = (start + size).min(b.len());
                return Ok(b.slice(start..end));
            }
            Some(Handle::Ctl(view, st)) => {
                let mut st = st.lock();
                let text = st
                    .result
                    .clone()
                    .unwrap_or_else(|| view.last_result.lock().clone());
                let b = text.as_bytes();
                let start = st.read_pos.min(b.len());
                let end = (start + size).min(b.len());
                st.read_pos = end;
                return Ok(Bytes::copy_from_slice(&b[start..end]));
            }
            _ => return Err(FsError::BadHandle),
        };
        read_file(&self.cache, &handle, offset, size)
    }

    /// A write by a caller other than root clears set-user-ID and
    /// set-group-ID, as on a local file system.
    pub fn kill_suid(&self, fh: u64) {
        if let Some(Handle::Write(wf, _)) = self.handles.lock().get(&fh) {
            wf.meta.lock().kill_suid();
        }
    }

    /// Write to an open file (or run control commands written to `ctl`).
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<usize> {
        let (wf, view_for_ctl) = match self.handles.lock().get(&fh) {
            Some(Handle::Write(wf, _)) => (Some(wf.clone()), None),
            Some(Handle::Ctl(view, _)) => (None, Some(view.clone())),
            Some(_) => return Err(FsError::BadHandle),
            None => return Err(FsError::BadHandle),
        };
        if let Some(wf) = wf {
            let mut draft = wf.draft.lock();
            wf.write(offset, data)?;
            wf.writers.lock().insert(fh); // again, if written after a close
            if let Some(d) = draft.as_mut() {
                let (mode, mtime) = {
                    let m = wf.meta.lock();
                    (m.mode, m.mtime)
                };
                let bytes = match d.spool {
                    None => Bytes::copy_from_slice(data),
                    Some(_) => Bytes::new(),
                };
                let step = DraftStep::Write {
                    offset,
                    len: data.len() as u64,
                    bytes,
                    mode,
                    mtime,
                };
                self.draft_step(&wf, d, step)?;
            }
            return Ok(data.len());
        }
        let view = view_for_ctl.expect("ctl handle");
        self.check_commandable(&view)?;
        // Run every complete line now, so the write itself reports failure.
        let lines: Vec<String> = {
            let handles = self.handles.lock();
            let Some(Handle::Ctl(_, st)) = handles.get(&fh) else {
                return Err(FsError::BadHandle);
            };
            let mut st = st.lock();
            st.pending.extend_from_slice(data);
            let mut lines = Vec::new();
            while let Some(i) = st.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = st.pending.drain(..=i).collect();
                lines.push(String::from_utf8_lossy(&line).into_owned());
            }
            lines
        };
        for line in lines {
            if !line.trim().is_empty() {
                self.run_control(fh, &view, &line)?;
            }
        }
        Ok(data.len())
    }

    fn run_control(&self, fh: u64, view: &Arc<View>, line: &str) -> Result<()> {
        let branch = view.branch.clone().ok_or(FsError::ReadOnly)?;
        let outcome = control::parse(line).and_then(|cmd| {
            // Commands act on the lake: let it catch up with closed files first.
            if let Some(journal) = &self.cfg.writeback {
                self.catch_up(view)
                    .map_err(|e| control::ControlError::Pending(e.to_string()))?;
                journal
                    .wait_uploaded(JOURNAL_WAIT)
                    .map_err(control::ControlError::Pending)?;
            }
            control::run(&self.lake, &view.repo, &branch, &cmd)
        });
        let (text, res) = match outcome {
            Ok(mut v) => {
                v["ok"] = serde_json::json!(true);
                let warnings = self.lake.take_warnings();
                if !warnings.is_empty() {
                    v["warnings"] = serde_json::json!(warnings);
                }
                (v.to_string(), Ok(()))
            }
            Err(e) => {
                let mut v = serde_json::json!({"ok": false, "command": line.trim(), "error": e.to_string()});
                if let control::ControlError::Repo(RepoError::CheckFailed(f)) = &e {
                    v["check"] = serde_json::json!(f.check);
                    v["candidate"] = serde_json::json!(f.candidate);
                    v["run"] = serde_json::json!(f.run);
                }
                (v.to_string(), Err(FsError::Control(e)))
            }
        };
        let text = format!("{text}\n");
        *view.last_result.lock() = text.clone();
        if let Some(Handle::Ctl(_, st)) = self.handles.lock().get(&fh) {
            let mut st = st.lock();
            st.result = Some(text);
            st.read_pos = 0;
        }
        self.invalidate(view);
        // A commit or merge leaves the view's staged tree and the commit's
        // own work behind: reload the view now, so both are freed, and
        // hand the freed memory back.
        let _ = self.state_with_pending(view);
        super::memory::release_free_memory();
        res
    }

    /// Make an open file's changes durable: chunk the spool into the store
    /// and stage a `Put`. Called on every close (flush) and fsync.
    pub fn flush(&self, fh: u64) -> Result<()> {
        enum Pending {
            Write(Arc<WriteFile>, u64),
            Command(Arc<View>, String),
            Nothing,
        }
        let pending = match self.handles.lock().get(&fh) {
            Some(Handle::Write(wf, ino)) => Pending::Write(wf.clone(), *ino),
            Some(Handle::Ctl(view, st)) => {
                // A command without a trailing newline runs at close.
                let line =
                    String::from_utf8_lossy(&std::mem::take(&mut st.lock().pending)).into_owned();
                Pending::Command(view.clone(), line)
            }
            Some(_) => Pending::Nothing,
            None => return Err(FsError::BadHandle),
        };
        match pending {
            Pending::Write(wf, ino) => {
                self.commit_write(ino, &wf)?;
                wf.writers.lock().remove(&fh);
                Ok(())
            }
            Pending::Command(view, line) if !line.trim().is_empty() => {
                self.run_control(fh, &view, &line)
            }
            _ => Ok(()),
        }
    }

    fn commit_write(&self, ino: u64, wf: &Arc<WriteFile>) -> Result<()> {
        let _in_order = wf.staging.lock();
        let meta = wf.meta.lock().clone();
        if !meta.dirty() || meta.unlinked {
            return Ok(());
        }
        // (The inode is here even if the kernel has let go of it: a file
        // open for writing keeps its inodes until its release, `forget`.)
        let Node::File { view, .. } = self.node(ino)? else {
            return Err(FsError::BadHandle);
        };
        let path = wf.path.lock().clone();
        let what = || format!("spool of {path}");
        let (entry, journaled) = match &self.cfg.writeback {
            Some(journal) => {
                let (content, size, chunks) = journal
                    .store_file(self.lake.config().chunking, wf.reader()?, &what())
                    .map_err(FsError::Stage)?;
                let file = File {
                    size,
                    mode: meta.mode,
                    mtime: meta.mtime,
                    content,
                };
                (Entry::File(file), chunks)
            }
            None => {
                let entry = match wf.streamed()? {
                    // Cut and stored while it was written.
                    Some((refs, size)) => Entry::File(File {
                        size,
                        mode: meta.mode,
                        mtime: meta.mtime,
                        content: self.lake.trees().pack_chunks(refs),
                    }),
                    None => {
                        self.lake
                            .store_file(wf.reader()?, meta.mode, meta.mtime, &what())?
                            .0
                    }
                };
                self.lake.flush()?;
                (entry, vec![])
            }
        };
        // What this close saw is staged; changes that came in while it
        // was storing keep the file dirty.
        wf.meta.lock().staged = meta.changes;
        let staged = self.stage(
            &view,
            vec![Op::Put {
                path: path.clone(),
                entry: entry.clone(),
            }],
        );
        if let Err(e) = staged {
            if let Some(journal) = &self.cfg.writeback {
                journal.release(&journaled);
            }
            return Err(e);
        }
        if let Entry::File(file) = entry {
            // This inode, and every other the spool was opened or looked up
            // through, now is the written version, held by hash: one file,
            // whatever inode the kernel knows it by. (If one was a
            // looked-up inode, its number names the version looked up;
            // should that version come back, a lookup makes the node that
            // version again: see `entry_node`.)
            // The kernel may hold pages of another version for the others
            // (one never opened for writing was never made to drop them):
            // dropped at their next open.
            let others: Vec<u64> = wf
                .inos
                .lock()
                .iter()
                .copied()
                .filter(|i| *i != ino)
                .collect();
            self.stale_pages.lock().extend(others.iter().copied());
            let file = light(file);
            let mut nodes = self.nodes.lock();
            for ino in others.into_iter().chain([ino]) {
                nodes.update(
                    ino,
                    Node::File {
                        view: view.clone(),
                        path: path.clone(),
                        file: file.clone(),
                    },
                );
            }
        }
        Arc::make_mut(&mut view.state.lock().creating).remove(&path);
        Ok(())
    }

    pub fn fsync(&self, fh: u64) -> Result<()> {
        self.flush(fh)?;
        if let Some(journal) = &self.cfg.writeback {
            journal.sync().map_err(FsError::Stage)?;
        }
        Ok(())
    }

    /// A handle's release. That of a draft, with `defer_releases`, is
    /// left to the releases' thread: its steps are journaled already.
    pub fn release(&self, fh: u64) -> Result<()> {
        if let Some(r) = self.releaser.get() {
            if self.is_draft(fh) {
                r.0.push(fh);
                return Ok(());
            }
        }
        self.release_now(fh)
    }

    /// Is this a handle of a draft (a file a create made in write-back
    /// mode)? Its closes send no request (`FOPEN_NOFLUSH`).
    pub fn is_draft(&self, fh: u64) -> bool {
        match self.handles.lock().get(&fh) {
            Some(Handle::Write(wf, _)) => wf.draft.lock().is_some(),
            _ => false,
        }
    }

    pub fn release_now(&self, fh: u64) -> Result<()> {
        let Some(h) = self.handles.lock().remove(&fh) else {
            return Ok(());
        };
        if let Handle::Write(wf, ino) = h {
            let last = close_ref(&wf);
            // Normally flushed already (a draft, never); writes through
            // mmap may not be. A writer until staged, as in `flush`: a
            // reader opening meanwhile reads the spool.
            let res = self.commit_write(ino, &wf);
            wf.writers.lock().remove(&fh);
            // The last close lets go of the spool, unless an open came
            // meanwhile (an open joins a spool under the table's lock) or
            // a draft could not be staged (it stays, for the next command
            // to stage, or the next daemon to make again).
            let mut inos = Vec::new();
            let gone = last && {
                let mut writes = self.writes.lock();
                let idle = wf.opens.load(Ordering::SeqCst) == 0
                    && (res.is_ok() || wf.draft.lock().is_none());
                if idle {
                    inos = wf.inos.lock().clone();
                    writes.forget(&wf);
                }
                idle
            };
            if gone {
                // Staged above: a draft's steps are no longer needed.
                self.end_draft(&wf, &mut wf.draft.lock())?;
                if let Ok(Node::File { view, path, .. }) = self.node(ino) {
                    let mut st = view.state.lock();
                    if st.creating.get(&path) == Some(&ino) {
                        Arc::make_mut(&mut st.creating).remove(&path);
                    }
                }
                // Inodes the kernel let go of meanwhile (see `forget`).
                for ino in inos {
                    let node = self.nodes.lock().drop_unlooked(ino);
                    if let Some(node) = node {
                        self.forgotten(ino, node);
                    }
                }
            }
            return res;
        }
        Ok(())
    }

    // ---- namespace changes ----

    /// The writable view and path of a directory inode.
    fn dir_node(&self, parent: u64) -> Result<(Arc<View>, String)> {
        match self.node(parent)? {
            Node::Tree { view, path } => {
                self.check_writable(&view)?;
                Ok((view, path))
            }
            Node::Root | Node::Repo(_) => Err(FsError::NotPermitted(
                "create repositories and branches with tarn",
            )),
            Node::ControlDir(_) => Err(FsError::NotPermitted("the control directory is fixed")),
            Node::File { .. } | Node::Control(..) => Err(FsError::NotADirectory),
        }
    }

    /// Refuse names that would shadow the control directory.
    fn check_new_name(&self, path: &str, name: &str) -> Result<()> {
        check_name(name)?;
        if path.is_empty() && name == CONTROL_DIR {
            return Err(FsError::Exists);
        }
        Ok(())
    }

    /// Create and open a new regular file.
    pub fn create(
        &self,
        parent: u64,
        name: &str,
        mode: u32,
        if_exists: IfExists,
    ) -> Result<(Attr, u64)> {
        let (view, path) = self.dir_node(parent)?;
        self.check_new_name(&path, name)?;
        let child = join(&path, name);
        // Let go of before `creating` is edited below: were this copy of
        // the state still held, `Arc::make_mut` would copy the whole map
        // of files being created, at every create.
        let taken = {
            // `child` sees pending puts: nothing to apply first.
            let state = self.state_with_pending(&view)?;
            self.dir_at(&state, &path)?;
            self.child(&view, &state, &child)?
        };
        // The kernel thought the name free, but it is taken (made through
        // another mount, the CLI, or a lookup the kernel had not redone).
        if let Some((ino, entry)) = taken {
            if if_exists == IfExists::Fail {
                return Err(FsError::Exists);
            }
            if matches!(entry, Some(Entry::Dir(_))) {
                return Err(FsError::IsADirectory);
            }
            let (fh, _) = self.open(ino, true, if_exists == IfExists::Truncate)?;
            let attr = self.getattr(ino);
            if attr.is_err() || !self.nodes.lock().counted(ino) {
                // Forgotten since it was found (see `lookup`): the kernel
                // looks it up again on ESTALE.
                let _ = self.release(fh);
                return Err(attr.err().unwrap_or(FsError::Stale));
            }
            return Ok((attr?, fh));
        }
        let now = now_ns();
        let file = File {
            size: 0,
            mode: mode & 0o7777,
            mtime: now,
            content: Content::Inline(bytes::Bytes::new()),
        };
        let ino = ino_of(&[
            b"new",
            &view.id.to_le_bytes(),
            child.as_bytes(),
            &self.creates.fetch_add(1, Ordering::Relaxed).to_le_bytes(),
        ]);
        let spool_dir = match &self.cfg.writeback {
            Some(journal) => journal.drafts_dir(),
            None => self.cfg.spool_dir.clone(),
        };
        let wf = Arc::new(WriteFile::new(
            &spool_dir,
            view.id,
            child.clone(),
            mode & 0o7777,
            now,
            |_| Ok(0),
            true,
        )?);
        self.stream_writes(&wf);
        if let (Some(journal), Some(branch)) = (&self.cfg.writeback, &view.branch) {
            let mut d = Draft {
                id: new_draft_id(),
                repo: view.repo.clone(),
                branch: branch.clone(),
                spool: None,
            };
            journal_state(journal, &wf, &mut d)?;
            self.drafts.lock().insert(d.id, Arc::downgrade(&wf));
            wf.set_draft(d);
        }
        open_ref(&wf);
        {
            // Counted as it is made: the reply gives it to the kernel.
            let mut nodes = self.nodes.lock();
            nodes.insert(
                ino,
                Node::File {
                    view: view.clone(),
                    path: child.clone(),
                    file,
                },
            );
            nodes.counted(ino);
            nodes.created(ino);
        }
        self.writes.lock().add(ino, &wf);
        Arc::make_mut(&mut view.state.lock().creating).insert(child, ino);
        let fh = self.add_handle(Handle::Write(wf, ino));
        Ok((self.getattr(ino)?, fh))
    }

    /// The writable view and path for a new entry `name` under `parent`,
    /// which must not exist yet.
    fn free_child(&self, parent: u64, name: &str) -> Result<(Arc<View>, String)> {
        let (view, path) = self.dir_node(parent)?;
        self.check_new_name(&path, name)?;
        // `child` sees pending puts: nothing to apply first.
        let state = self.state_with_pending(&view)?;
        self.dir_at(&state, &path)?;
        let child = join(&path, name);
        if self.child_entry(&state, &child)?.is_some() {
            return Err(FsError::Exists);
        }
        Ok((view, child))
    }

    pub fn mkdir(&self, parent: u64, name: &str) -> Result<Attr> {
        let (view, child) = self.free_child(parent, name)?;
        let empty = self.lake.trees().empty_dir();
        self.lake.flush()?;
        self.stage(
            &view,
            vec![Op::Put {
                path: child.clone(),
                entry: Entry::Dir(empty),
            }],
        )?;
        self.lookup(parent, name)
    }

    pub fn symlink(&self, parent: u64, name: &str, target: &str) -> Result<Attr> {
        let (view, child) = self.free_child(parent, name)?;
        self.stage(
            &view,
            vec![Op::Put {
                path: child,
                entry: Entry::Symlink(target.to_string()),
            }],
        )?;
        self.lookup(parent, name)
    }

    pub fn unlink(&self, parent: u64, name: &str) -> Result<()> {
        let (view, path) = self.dir_node(parent)?;
        let child = join(&path, name);
        let writers = self.writers_at(&view, &[&child]);
        let _in_order = hold(&writers);
        // The state is let go of before `creating` is edited: a copy still
        // held would make `Arc::make_mut` copy every file being created.
        let found = {
            // An unlink of a file waits with the closes (`Pending::push`).
            let state = self.state_with_pending(&view)?;
            self.child_entry(&state, &child)?
        };
        match found {
            None => Err(FsError::NotFound),
            Some(Some(Entry::Dir(_))) => Err(FsError::IsADirectory),
            Some(entry) => {
                self.forget_writers_at(&view, &child, &writers);
                if entry.is_some() {
                    self.delete(&view, &child, false)?;
                }
                Ok(())
            }
        }
    }

    /// Stage the removal of what is at `path`, and `detach` it.
    /// `dir`: what is removed is a directory.
    fn delete(&self, view: &Arc<View>, path: &str, dir: bool) -> Result<()> {
        self.stage(
            view,
            vec![Op::Delete {
                path: path.to_string(),
            }],
        )?;
        self.detach(view, path, dir);
        Ok(())
    }

    /// Files being written in `view` at these paths or below them, each
    /// once (a file opened through two inodes is under both), in the order
    /// of their addresses (stable while they are open, as an inode order
    /// is not: two renames must take them in one order). A rename or
    /// unlink holds their `WriteFile::staging` (`hold`) from before it
    /// looks at the tree until it has staged: a close in flight lands
    /// first (and the rename or unlink sees it), and the next close stages
    /// the file where it went, or not at all.
    fn writers_at(&self, view: &View, paths: &[&str]) -> Vec<Arc<WriteFile>> {
        let writes = self.writes.lock();
        let mut found: Vec<Arc<WriteFile>> = paths
            .iter()
            .flat_map(|path| writes.under(view.id, path))
            .cloned()
            .collect();
        found.sort_by_key(|wf| Arc::as_ptr(wf) as usize);
        found.dedup_by(|a, b| Arc::ptr_eq(a, b));
        found
    }

    /// The file at `path` was removed or replaced: what is being written
    /// there (`writers`, from `writers_at`) must not be staged any more. By
    /// path, not inode: the kernel may know the file by the inode it was
    /// created or looked up as, the tree by another.
    fn forget_writers_at(&self, view: &View, path: &str, writers: &[Arc<WriteFile>]) {
        Arc::make_mut(&mut view.state.lock().creating).remove(path);
        let mut writes = self.writes.lock();
        for wf in writers {
            if *wf.path.lock() == path {
                wf.meta.lock().unlinked = true;
                writes.unindex(wf, path.to_string());
                // Removed: nothing to make again after a crash.
                if let Err(e) = self.end_draft(wf, &mut wf.draft.lock()) {
                    tracing::warn!(%e, "the end of a removed draft not journaled");
                }
            }
        }
    }

    pub fn rmdir(&self, parent: u64, name: &str) -> Result<()> {
        let (view, path) = self.dir_node(parent)?;
        let state = self.state(&view)?;
        let child = join(&path, name);
        match state.trees.lookup(&state.root, &child)? {
            None => Err(FsError::NotFound),
            Some(Entry::Dir(h)) => {
                let creating_inside = state
                    .creating
                    .keys()
                    .any(|p| p.starts_with(&format!("{child}/")));
                if state.trees.count(&h)? > 0 || creating_inside {
                    return Err(FsError::NotEmpty);
                }
                self.delete(&view, &child, true)
            }
            Some(_) => Err(FsError::NotADirectory),
        }
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &str,
        new_parent: u64,
        new_name: &str,
        no_replace: bool,
    ) -> Result<()> {
        let (view, from_dir) = self.dir_node(parent)?;
        let (view2, to_dir) = self.dir_node(new_parent)?;
        if view.id != view2.id {
            return Err(FsError::NotPermitted("rename across branches"));
        }
        self.check_new_name(&to_dir, new_name)?;
        let from = join(&from_dir, name);
        let to = join(&to_dir, new_name);
        if from == to {
            return Ok(());
        }
        if to.starts_with(&format!("{from}/")) {
            return Err(FsError::Invalid("cannot move a directory into itself"));
        }
        let writers = self.writers_at(&view, &[&from, &to]);
        let _in_order = hold(&writers);
        // A rename of a file waits with the closes (`Pending::push`); one
        // of a directory, or over one, looks at the tree with them applied.
        let mut state = self.state_with_pending(&view)?;
        let is_dir = |e: &Option<Entry>| matches!(e, Some(Entry::Dir(_)));
        let mut src = self.child_entry(&state, &from)?.ok_or(FsError::NotFound)?;
        let mut dst = self.child_entry(&state, &to)?;
        if is_dir(&src) || dst.as_ref().is_some_and(is_dir) {
            state = self.state(&view)?;
            src = self.child_entry(&state, &from)?.ok_or(FsError::NotFound)?;
            dst = self.child_entry(&state, &to)?;
        }
        if let Some(dst) = &dst {
            if no_replace {
                return Err(FsError::Exists);
            }
            match (&src, dst) {
                (Some(Entry::Dir(_)), Some(Entry::Dir(h))) if state.trees.count(h)? > 0 => {
                    return Err(FsError::NotEmpty)
                }
                (Some(Entry::Dir(_)), Some(Entry::Dir(_))) => {}
                (Some(Entry::Dir(_)), _) => return Err(FsError::NotADirectory),
                (_, Some(Entry::Dir(_))) => return Err(FsError::IsADirectory),
                _ => {}
            }
        }
        // Let go of before `creating` is edited (see `unlink`).
        drop(state);
        let dirs = is_dir(&src) || dst.as_ref().is_some_and(is_dir);
        if dst.is_some() {
            self.forget_writers_at(&view, &to, &writers);
        }
        let mut ops = Vec::new();
        if src.is_some() {
            ops.push(Op::Move {
                from: from.clone(),
                to: to.clone(),
            });
        } else {
            // A file still being created: it lands at the new name when
            // staged; whatever was at the new name goes now.
            ops.push(Op::Delete { path: to.clone() });
        }
        self.stage(&view, ops)?;
        self.moved(&view, &from, &to, dirs);
        Ok(())
    }

    /// After a rename: inodes, open writers and pending creates under `from`
    /// now live under `to`.
    /// `dirs`: what moves, or what it replaces, is a directory (else only
    /// inodes of `from` and `to` themselves are looked at).
    fn moved(&self, view: &View, from: &str, to: &str, dirs: bool) {
        let rebase = |p: &str| is_under(p, from).then(|| format!("{to}{}", &p[from.len()..]));
        {
            let mut st = view.state.lock();
            // Sorted: `from` and what is under it come together, from it.
            let moved: Vec<(String, u64)> = st
                .creating
                .range::<str, _>((std::ops::Bound::Included(from), std::ops::Bound::Unbounded))
                .take_while(|(p, _)| p.starts_with(from))
                .filter(|(p, _)| is_under(p, from))
                .map(|(p, i)| (p.clone(), *i))
                .collect();
            if !moved.is_empty() {
                let creating = Arc::make_mut(&mut st.creating);
                for (p, i) in moved {
                    creating.remove(&p);
                    creating.insert(rebase(&p).expect("filtered"), i);
                }
            }
        }
        {
            let mut writes = self.writes.lock();
            let moving: Vec<Arc<WriteFile>> = writes.under(view.id, from).cloned().collect();
            for wf in moving {
                let mut draft = wf.draft.lock();
                let new = rebase(&wf.path.lock()).expect("under `from`");
                let old = std::mem::replace(&mut *wf.path.lock(), new.clone());
                writes.unindex(&wf, old);
                writes.index(&wf, new.clone());
                if let Some(d) = draft.as_mut() {
                    if let Err(e) = self.draft_step(&wf, d, DraftStep::Path(new)) {
                        tracing::warn!(%e, "a draft's rename not journaled");
                    }
                }
            }
        }
        // What was at `to` is gone; else it would move with `to` next.
        self.detach(view, to, dirs);
        let mut nodes = self.nodes.lock();
        let mut moved_away = self.moved_away.lock();
        let mut moved_to = self.moved_to.lock();
        let inos = nodes.of(view.id, from, dirs, false);
        // A path's generation changes only when an inode numbered from it
        // leaves: not one a create made (rsync's temporary files, each of
        // a new name, would otherwise leave a generation behind apiece),
        // nor one a rename brought there (numbered from where it came).
        let created: HashSet<u64> = inos
            .iter()
            .copied()
            .filter(|ino| nodes.is_created(*ino))
            .collect();
        nodes.repath(&inos, |ino, node| {
            let (Node::Tree { path, .. } | Node::File { path, .. }) = node else {
                return None;
            };
            let n = rebase(path)?;
            let old = (view.id, path.clone());
            let mut came_here = false;
            if let Some(here) = moved_to.get_mut(&old) {
                came_here = here.contains(&ino);
                here.retain(|i| *i != ino);
                if here.is_empty() {
                    moved_to.remove(&old);
                }
            }
            if !came_here && !created.contains(&ino) {
                *moved_away.entry(old).or_default() += 1;
            }
            moved_to.entry((view.id, n.clone())).or_default().push(ino);
            Some(n)
        });
    }

    /// A rename replaced, or an unlink or rmdir removed, what was at
    /// `path`: its directory and symlink inodes (and any below) are gone.
    /// Else a later rename of whatever comes to `path` would carry them
    /// along, and one would answer lookups at the new path: the moved
    /// directory's inode number would change under the kernel, which then
    /// sees two directories where there is one. (A file's inode stays: it
    /// answers only for its own version, and an open descriptor of it
    /// still shows what it was.)
    /// `below`: `path` is (or was) a directory; else only inodes of
    /// `path` itself are looked at.
    fn detach(&self, view: &View, path: &str, below: bool) {
        let mut nodes = self.nodes.lock();
        let inos = nodes.of(view.id, path, below, true);
        nodes.remove(&inos);
        drop(nodes);
        let mut moved_to = self.moved_to.lock();
        if below {
            moved_to.retain(|(v, p), _| *v != view.id || !is_under(p, path));
        } else {
            moved_to.remove(&(view.id, path.to_string()));
        }
    }

    pub fn setattr(&self, ino: u64, fh: Option<u64>, set: SetAttr) -> Result<Attr> {
        let node = self.node(ino)?;
        let (view, path, file) = match node {
            Node::File { view, path, file } => (view, path, file),
            Node::Tree { view, .. } => {
                // Directories and symlinks carry no mode or times of their own.
                self.check_writable(&view)?;
                return self.getattr(ino);
            }
            Node::Control(_, ControlFile::Ctl) if set.size == Some(0) => return self.getattr(ino),
            _ => return Err(FsError::NotPermitted("cannot change this file")),
        };
        self.check_writable(&view)?;
        let _in_order = self.order_on(&view, &path);
        let open = match fh {
            Some(fh) => match self.handles.lock().get(&fh) {
                Some(Handle::Write(wf, _)) => Some(wf.clone()),
                _ => None,
            },
            None => None,
        }
        .or_else(|| self.spool_of(ino, &view, &path, false));
        if let Some(wf) = open {
            let mut draft = wf.draft.lock();
            if let Some(size) = set.size {
                self.truncate_open(&wf, &mut draft, size)?;
            }
            let mut m = wf.meta.lock();
            let before = (m.mode, m.mtime);
            if let Some(mode) = set.mode {
                m.mode = mode & 0o7777;
                m.changed();
            } else if set.kill_suid {
                m.kill_suid();
            }
            if let Some(t) = set.mtime {
                m.mtime = ns_of(t);
                m.changed();
            }
            let after = (m.mode, m.mtime);
            drop(m);
            if let Some(d) = draft.as_mut().filter(|_| after != before) {
                let (mode, mtime) = after;
                self.draft_step(&wf, d, DraftStep::Attr { mode, mtime })?;
            }
            drop(draft);
            // fchmod/futimens/truncate come without a handle (the kernel
            // names one only for ftruncate): while the file is open for
            // writing, the change is staged with its content at the close,
            // as writes are, rather than each on its own (tar sets mode and
            // times on every file before closing it).
            if wf.opens.load(Ordering::Acquire) == 0 {
                self.commit_write(ino, &wf)?;
            }
            return self.getattr(ino);
        }
        let file = self.full_file(&view, &path, file)?;
        if let Some(size) = set.size {
            if size != file.size {
                let wf = self.writer(ino, &view, &path, &file)?;
                let res = wf
                    .truncate(size)
                    .map_err(FsError::from)
                    .and_then(|()| self.commit_write(ino, &wf));
                self.close_spool(&wf);
                res?;
            }
        }
        let current = match self.node(ino)? {
            Node::File { file: now, .. } => self.full_file(&view, &path, now)?,
            _ => file,
        };
        let mut changed = current.clone();
        if let Some(mode) = set.mode {
            changed.mode = mode & 0o7777;
        } else if set.kill_suid {
            changed.mode = killed_suid(changed.mode);
        }
        if let Some(t) = set.mtime {
            changed.mtime = ns_of(t);
        }
        if changed != current {
            self.stage(
                &view,
                vec![Op::Put {
                    path: path.clone(),
                    entry: Entry::File(changed.clone()),
                }],
            )?;
            self.nodes.lock().insert(
                ino,
                Node::File {
                    view: view.clone(),
                    path,
                    file: light(changed),
                },
            );
        }
        self.getattr(ino)
    }

    fn control_text(&self, view: &View, f: ControlFile) -> Result<String> {
        if f == ControlFile::Status {
            // Files closed whose releases wait are staged changes already.
            // (Not every draft, as a command does: a file being written
            // stays "W", and is not staged at every look.)
            self.release_queued();
        }
        let state = self.state(view)?;
        Ok(match f {
            ControlFile::Head => format!("{}\n", state.commit.to_hex()),
            ControlFile::Status => {
                let base = self.lake.commit(&view.repo, &state.commit)?.tree;
                let mut out = String::new();
                let diff = self.lake.diff_trees_in(&state.trees, &base, &state.root)?;
                for c in diff {
                    let mark = match c.kind {
                        crate::repo::ChangeKind::Added => 'A',
                        crate::repo::ChangeKind::Removed => 'D',
                        crate::repo::ChangeKind::Modified => 'M',
                    };
                    out.push_str(&format!("{mark} {}\n", c.path));
                }
                for p in state.creating.keys() {
                    out.push_str(&format!("W {p}\n"));
                }
                out
            }
            ControlFile::Info => {
                let v = serde_json::json!({
                    "lake": self.lake.store().url(),
                    "repo": view.repo,
                    "ref": view.name,
                    "branch": view.branch,
                    "commit": state.commit.to_hex(),
                    // Of the whole mount: what the kernel holds (see `Nodes`).
                    "inodes": self.nodes.lock().by_ino.len(),
                });
                format!("{v}\n")
            }
            ControlFile::Result => view.last_result.lock().clone(),
            ControlFile::Ctl => String::new(),
        })
    }

    /// May a request on this handle wait long: a control-file command, an
    /// upload to a remote store before a synchronous close returns, chunking
    /// a big file at its close, a read that fetches from a remote store? A
    /// transport serving one queue per CPU hands those to helper threads, so
    /// they never hold up the other callers on that CPU.
    pub fn may_wait(&self, fh: u64, op: HandleOp) -> bool {
        /// Files up to this size are chunked and stored at close in well
        /// under a millisecond on a local disk.
        const QUICK_CLOSE: u64 = 4 << 20;
        match (self.handles.lock().get(&fh), op) {
            (Some(Handle::Ctl(..)), _) => true,
            (Some(Handle::Write(wf, _)), HandleOp::Flush) => {
                let uploads = self.cfg.writeback.is_none() && !self.cache.local_lake();
                uploads || wf.meta.lock().size > QUICK_CLOSE
            }
            (Some(Handle::File(_)), HandleOp::Read) => !self.cache.local_lake(),
            _ => false,
        }
    }

    /// Numbers for `statfs`: the lake has no fixed size, so report plenty.
    pub fn statfs(&self) -> StatFs {
        StatFs {
            blocks: 1 << 40,
            files: 1 << 30,
            name_max: 255,
        }
    }
}

/// Journal a draft's whole state (`d` notes where its bytes are now).
fn journal_state(journal: &Journal, wf: &WriteFile, d: &mut Draft) -> Result<()> {
    let spool = wf.spool_name();
    let (mode, mtime, size) = {
        let m = wf.meta.lock();
        (m.mode, m.mtime, m.size)
    };
    let bytes = match spool {
        Some(_) => Bytes::new(),
        None => Bytes::from(wf.read(0, size as usize)?),
    };
    d.spool = spool.clone();
    let state = DraftState {
        repo: d.repo.clone(),
        branch: d.branch.clone(),
        path: wf.path.lock().clone(),
        mode,
        mtime,
        size,
        bytes,
        spool,
    };
    let step = DraftStep::State(state);
    journal
        .draft(&DraftRecord { id: d.id, step })
        .map_err(FsError::Stage)
}

/// The handle's whole-file copy, started if it has none yet.
fn start_copy(cache: &Arc<ChunkCache>, h: &FileHandle) -> Option<Arc<Assembly>> {
    let mut a = h.assembly.lock();
    if a.is_none() {
        *a = cache.assembly(&h.chunks, true);
    }
    a.clone()
}

/// Read from a file snapshot, fetching chunks through the cache and
/// scheduling read-ahead for sequential readers.
fn read_file(cache: &Arc<ChunkCache>, h: &FileHandle, offset: u64, size: usize) -> Result<Bytes> {
    let end = (offset + size as u64).min(h.file.size);
    if offset >= end {
        return Ok(Bytes::new());
    }
    match &h.file.content {
        Content::Inline(b) => return Ok(b.slice(offset as usize..end as usize)),
        Content::External(ext) => return read_external(cache, &h.file, ext, offset, end),
        Content::Chunks(_) | Content::Manifest(_) => {}
    }
    if let Some(whole) = &h.whole {
        let mut buf = vec![0; (end - offset) as usize];
        whole.read_exact_at(&mut buf, offset)?;
        return Ok(Bytes::from(buf));
    }
    if h.chunks.len() > 1 && !cache.local_lake() {
        // A reader from the start of a remote lake's file gets a whole-file
        // copy made for it as it reads.
        let assembly = if offset == 0 {
            start_copy(cache, h)
        } else {
            h.assembly.lock().clone()
        };
        if let Some(bytes) = assembly.and_then(|a| a.read(offset, end)) {
            return Ok(bytes?);
        }
    }
    let first = h.starts.partition_point(|s| *s <= offset) - 1;
    // Sequential reads grow the read-ahead window; a jump resets it.
    let window = {
        let mut ra = h.readahead.lock();
        // The kernel keeps several reads in flight and they arrive out of
        // order: anything near where the last one ended is sequential.
        let near = offset.abs_diff(ra.next) <= SEQUENTIAL_SLACK;
        ra.window = if offset == 0 {
            2
        } else if near {
            (ra.window * 2).clamp(2, MAX_READAHEAD_CHUNKS)
        } else {
            0
        };
        ra.next = ra.next.max(end);
        if !near && offset != 0 {
            ra.next = end;
        }
        ra.from_start = offset == 0 || (ra.from_start && near);
        if ra.from_start && end == h.file.size && h.chunks.len() > 1 && cache.local_lake() {
            // Read whole: copy it now (in the background) for later readers.
            start_copy(cache, h);
        }
        ra.window
    };
    if window > 0 {
        let ahead = h.chunks[first + 1..].iter().take(window).map(|c| c.hash);
        cache.prefetch(ahead);
    }
    let mut parts = Vec::new();
    let mut at = offset;
    let mut i = first;
    while at < end {
        let chunk = cache.get(&h.chunks[i].hash)?;
        let start = (at - h.starts[i]) as usize;
        let stop = ((end - h.starts[i]) as usize).min(chunk.len());
        parts.push(chunk.slice(start..stop));
        at += (stop - start) as u64;
        i += 1;
    }
    if parts.len() == 1 {
        return Ok(parts.pop().expect("one part"));
    }
    let mut out = Vec::with_capacity((end - offset) as usize);
    for p in parts {
        out.extend_from_slice(&p);
    }
    Ok(Bytes::from(out))
}

/// Read `[offset, end)` of an imported object through the cache's pieces;
/// the next piece is fetched ahead for readers that reach a piece's end.
fn read_external(
    cache: &ChunkCache,
    file: &File,
    ext: &crate::tree::External,
    offset: u64,
    end: u64,
) -> Result<Bytes> {
    let piece = crate::repo::EXTERNAL_PIECE;
    let mut out = Vec::with_capacity((end - offset) as usize);
    let mut at = offset;
    while at < end {
        let index = at / piece;
        let bytes = cache.get_external(ext, file.size, index).map_err(|e| {
            tracing::warn!(url = %ext.url, %e, "imported object unreadable");
            FsError::Repo(RepoError::Source(e))
        })?;
        let start = (at - index * piece) as usize;
        let stop = ((end - index * piece) as usize).min(bytes.len());
        if start >= stop {
            break;
        }
        out.extend_from_slice(&bytes[start..stop]);
        at += (stop - start) as u64;
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    //! The filesystem core, driven directly: no kernel, no mount.
    use super::*;
    use crate::store::Store;

    #[test]
    fn a_path_index_keeps_every_inode_of_a_place() {
        let mut ix = PathIndex::default();
        let at = |ix: &PathIndex, h| {
            let mut v: Vec<u64> = ix.get(h).collect();
            v.sort();
            v
        };
        ix.insert(7, 1);
        ix.insert(7, 1);
        ix.insert(7, 2);
        ix.insert(7, 3);
        ix.insert(8, 4);
        assert_eq!(at(&ix, 7), [1, 2, 3]);
        ix.remove(7, 1); // the first goes: another takes its place
        assert_eq!(at(&ix, 7), [2, 3]);
        ix.remove(7, 3);
        ix.remove(7, 9); // not there
        assert_eq!(at(&ix, 7), [2]);
        ix.remove(7, 2);
        assert!(at(&ix, 7).is_empty() && ix.more.is_empty());
        assert_eq!(at(&ix, 8), [4]);
        ix.remove(8, 4);
        assert!(ix.is_empty());
    }

    fn setup() -> (tempfile::TempDir, LakeFs, u64) {
        setup_with(|_| {})
    }

    /// `setup`, with `adjust` applied to the file system before any view.
    fn setup_with(adjust: impl FnOnce(&mut LakeFs)) -> (tempfile::TempDir, LakeFs, u64) {
        let store = Store::open(&format!("memory://fs-{}", ulid::Ulid::new())).unwrap();
        setup_over(store, adjust)
    }

    /// `setup_with`, on a lake in `store`.
    fn setup_over(
        store: Store,
        adjust: impl FnOnce(&mut LakeFs),
    ) -> (tempfile::TempDir, LakeFs, u64) {
        let dir = tempfile::tempdir().unwrap();
        let lake = Arc::new(Lake::init(store.clone()).unwrap().0);
        lake.create_repo("r", "main").unwrap();
        let cache = ChunkCache::open(store, &dir.path().join("cache"), 1 << 30).unwrap();
        let mut fs = LakeFs::new(
            lake,
            cache,
            FsConfig {
                pinned: None,
                read_only: false,
                metadata_ttl: Duration::from_millis(50),
                uid: 0,
                gid: 0,
                spool_dir: dir.path().join("spool"),
                writeback: None,
            },
        )
        .unwrap();
        adjust(&mut fs);
        let repo = fs.lookup(ROOT_INO, "r").unwrap().ino;
        let main = fs.lookup(repo, "main").unwrap().ino;
        (dir, fs, main)
    }

    fn write(fs: &LakeFs, dir: u64, name: &str, data: &[u8]) -> u64 {
        let (a, fh) = fs.create(dir, name, 0o644, IfExists::Truncate).unwrap();
        fs.write(fh, 0, data).unwrap();
        fs.flush(fh).unwrap();
        fs.release(fh).unwrap();
        a.ino
    }

    /// A staged file of branch main: its bytes and mode.
    fn staged_file(lake: &Lake, path: &str) -> Option<(Vec<u8>, u32)> {
        let (_, work) = lake.working_tree("r", "main").unwrap();
        let Some(Entry::File(f)) = lake.trees().lookup(&work, path).unwrap() else {
            return None;
        };
        let mut out = Vec::new();
        lake.read_file(&f, &mut out).unwrap();
        Some((out, f.mode))
    }

    #[test]
    fn a_created_file_is_journaled_as_it_is_written_and_outlives_its_daemon() {
        let jdir = tempfile::tempdir().unwrap();
        let journal = Journal::open(jdir.path()).unwrap();
        let j = journal.clone();
        let (_dir, fs, main) = setup_with(move |fs| fs.cfg.writeback = Some(j));
        let lake = fs.lake.clone();
        let chmod = |mode| SetAttr {
            mode: Some(mode),
            ..SetAttr::default()
        };
        // Written and chmod-ed, never closed: a draft.
        let (a, fh_a) = fs.create(main, "a", 0o644, IfExists::Fail).unwrap();
        assert!(fs.is_draft(fh_a), "its close needs no FLUSH");
        fs.write(fh_a, 0, b"hello").unwrap();
        fs.setattr(a.ino, Some(fh_a), chmod(0o600)).unwrap();
        // Released: staged by its release.
        let (_, fh_b) = fs.create(main, "b", 0o644, IfExists::Fail).unwrap();
        fs.write(fh_b, 0, b"bee").unwrap();
        fs.release(fh_b).unwrap();
        // Removed while open: nothing to make again.
        let (_, fh_c) = fs.create(main, "c", 0o644, IfExists::Fail).unwrap();
        fs.write(fh_c, 0, b"sea").unwrap();
        fs.unlink(main, "c").unwrap();
        // Closed but not released yet: a command stages it first.
        let (_, fh_d) = fs.create(main, "d", 0o644, IfExists::Fail).unwrap();
        fs.write(fh_d, 0, b"dee").unwrap();
        let (view, _) = fs.dir_node(main).unwrap();
        fs.catch_up(&view).unwrap();
        journal.upload_all(&lake).unwrap();
        assert_eq!(staged_file(&lake, "d").unwrap().0, b"dee");
        assert_eq!(staged_file(&lake, "b").unwrap().0, b"bee");
        assert!(staged_file(&lake, "c").is_none());
        assert!(staged_file(&lake, "a").is_some(), "staged with d");
        fs.write(fh_a, 5, b" world").unwrap();
        // Closed, then opened again with O_TRUNC and written shorter before
        // its release came: the truncate is a step too.
        let (e, fh_e) = fs.create(main, "e", 0o644, IfExists::Fail).unwrap();
        fs.write(fh_e, 0, b"long content").unwrap();
        let (fh_e2, _) = fs.open(e.ino, true, true).unwrap();
        fs.write(fh_e2, 0, b"s").unwrap();
        fs.flush(fh_e2).unwrap();
        // The daemon dies here (its open files are never released).
        drop(fs);
        drop(journal);
        let journal = Journal::open(jdir.path()).unwrap();
        assert_eq!(
            journal.recover_drafts(lake.config().chunking).unwrap(),
            3,
            "a, d, e"
        );
        journal.upload_all(&lake).unwrap();
        assert_eq!(staged_file(&lake, "e").unwrap().0, b"s");
        assert_eq!(
            staged_file(&lake, "a").unwrap(),
            (b"hello world".to_vec(), 0o600)
        );
        assert_eq!(staged_file(&lake, "d").unwrap().0, b"dee");
        assert!(staged_file(&lake, "c").is_none());
    }

    /// A directory's entries with their inode numbers.
    /// A second inode of a file, as the kernel may hold one: the one its
    /// content names, beside the one it was written through (which
    /// lookups answer with, `held_version`), counted as a lookup's.
    fn other_inode(fs: &LakeFs, dir: u64, name: &str) -> u64 {
        let held = fs.lookup(dir, name).unwrap().ino;
        let (view, path) = fs.dir_node(dir).unwrap();
        let child = join(&path, name);
        let state = fs.state_with_pending(&view).unwrap();
        let Some(Entry::File(f)) = state.entry_at(&child).unwrap() else {
            panic!("{child} is not a file")
        };
        let f = light(f);
        let ino = fs.file_ino(&view, &child, &f);
        assert_ne!(ino, held);
        fs.remember_version(ino, &view, child, &f);
        assert!(fs.nodes.lock().counted(ino));
        ino
    }

    fn listed(fs: &LakeFs, dir: u64) -> Vec<(String, u64)> {
        let fh = fs.opendir(dir).unwrap();
        let mut out = Vec::new();
        fs.readdir(fh, 0, |ino, _, _, n| {
            out.push((n.to_string(), ino));
            false
        })
        .unwrap();
        fs.release(fh).unwrap();
        out
    }

    fn names(fs: &LakeFs, dir: u64) -> Vec<String> {
        let fh = fs.opendir(dir).unwrap();
        let mut out = Vec::new();
        fs.readdir(fh, 0, |_, _, _, n| {
            out.push(n.to_string());
            false
        })
        .unwrap();
        fs.release(fh).unwrap();
        out
    }

    /// Commit branch main; the commit's tree.
    fn commit(fs: &LakeFs) -> Hash {
        fs.lake
            .commit_branch("r", "main", &crate::repo::CommitOptions::default())
            .unwrap();
        fs.lake.tree_of("r", "main").unwrap()
    }

    /// Another writer puts 100 bytes of `fill` at `path` and commits; then
    /// the metadata TTL passes (the view reloads the branch).
    fn put_elsewhere(fs: &LakeFs, path: &str, fill: u8) {
        let op = Op::Put {
            path: path.into(),
            entry: Entry::File(File {
                size: 100,
                mode: 0o644,
                mtime: 0,
                content: Content::Inline(vec![fill; 100].into()),
            }),
        };
        fs.lake.stage("r", "main", vec![op]).unwrap();
        commit(fs);
        std::thread::sleep(Duration::from_millis(60));
    }

    /// What is at `path` in `tree`.
    fn at(fs: &LakeFs, tree: &Hash, path: &str) -> Option<Entry> {
        fs.lake.trees().lookup(tree, path).unwrap()
    }

    fn read_all(fs: &LakeFs, ino: u64) -> Vec<u8> {
        let (fh, _) = fs.open(ino, false, false).unwrap();
        let data = fs.read(fh, 0, 1 << 20).unwrap().to_vec();
        fs.release(fh).unwrap();
        data
    }

    #[test]
    fn permissions_are_checked_for_the_caller_and_chown_clears_set_id_bits() {
        let (_d, fs, main) = setup();
        let f = write(&fs, main, "f", b"x");
        let set_mode = |mode| {
            let set = SetAttr {
                mode: Some(mode),
                ..SetAttr::default()
            };
            fs.setattr(f, None, set).unwrap()
        };
        set_mode(0o640);
        let (r, w, x) = (libc::R_OK as u32, libc::W_OK as u32, libc::X_OK as u32);
        let denied =
            |uid, gid, mask| matches!(fs.check_access(f, uid, gid, mask), Err(FsError::Denied));
        // Files belong to the mounting user (uid 0 here): root reads and
        // writes anything, but executes only what someone may execute.
        assert!(!denied(0, 0, r | w));
        assert!(denied(0, 0, x));
        // Group bits for the file's group, the rest for anyone else.
        assert!(!denied(1000, 0, r));
        assert!(denied(1000, 0, w));
        assert!(denied(1000, 1000, r));
        assert!(!denied(1000, 1000, 0), "existence only");
        set_mode(0o755);
        assert!(!denied(0, 0, x));
        assert!(!denied(1000, 1000, r | x));
        assert!(denied(1000, 1000, w));
        // chown clears set-user-ID, and set-group-ID where the group may
        // execute; a mode set with it is taken as given.
        set_mode(0o6755);
        let chown = SetAttr {
            kill_suid: true,
            ..SetAttr::default()
        };
        assert_eq!(fs.setattr(f, None, chown.clone()).unwrap().perm, 0o755);
        set_mode(0o6745);
        assert_eq!(fs.setattr(f, None, chown).unwrap().perm, 0o2745);
        // A write by someone other than root clears them on an open file.
        set_mode(0o4644);
        let (fh, _) = fs.open(f, true, false).unwrap();
        fs.kill_suid(fh);
        fs.write(fh, 0, b"y").unwrap();
        fs.flush(fh).unwrap();
        fs.release(fh).unwrap();
        assert_eq!(fs.getattr(f).unwrap().perm, 0o644);
    }

    #[test]
    fn many_writes_keep_the_working_view_small() {
        let (_d, fs, main) = setup();
        let dir = fs.mkdir(main, "many").unwrap().ino;
        for i in 0..6000 {
            write(
                &fs,
                dir,
                &format!("f{i:05}"),
                format!("{i}\n").repeat(300).as_bytes(),
            );
        }
        assert_eq!(names(&fs, dir).len(), 6000);
        let f = fs.lookup(dir, "f04321").unwrap().ino;
        assert_eq!(read_all(&fs, f), "4321\n".repeat(300).as_bytes());
        let view = fs.views.lock().values().next().unwrap().clone();
        let pending = view.state.lock().trees.pending_nodes();
        assert!(
            pending < 40_000,
            "{pending} unwritten nodes kept for 6000 files"
        );
        // What the view shows is what a commit makes.
        let tree = commit(&fs);
        let Some(Entry::Dir(h)) = at(&fs, &tree, "many") else {
            panic!("many committed, a directory")
        };
        assert_eq!(fs.lake.trees().count(&h).unwrap(), 6000);
    }

    #[test]
    fn closed_files_are_applied_to_the_view_together() {
        let (_d, fs, main) = setup();
        let dir = fs.mkdir(main, "d").unwrap().ino;
        let view = fs.views.lock().values().next().unwrap().clone();
        let pending = || view.state.lock().pending.ops.len();
        for i in 0..10 {
            write(&fs, dir, &format!("f{i}"), format!("{i}\n").as_bytes());
        }
        // The new directory and its files: staged, not applied yet.
        assert_eq!(pending(), 11);
        assert_eq!(fs.lookup(main, "d").unwrap().kind, Kind::Dir);
        assert_eq!(fs.getattr(dir).unwrap().kind, Kind::Dir);
        // Lookups, attributes and reads see them meanwhile.
        let f3 = fs.lookup(dir, "f3").unwrap();
        assert_eq!(f3.size, 2);
        assert_eq!(fs.getattr(f3.ino).unwrap().size, 2);
        assert_eq!(read_all(&fs, f3.ino), b"3\n");
        write(&fs, dir, "f3", b"again\n");
        assert_eq!(read_all(&fs, fs.lookup(dir, "f3").unwrap().ino), b"again\n");
        assert_eq!(pending(), 12);
        // Listing applies them, in order, at once.
        assert_eq!(names(&fs, dir).len(), 10);
        assert_eq!(pending(), 0);
        // Unlinks and renames of files wait with them (an untar over
        // files that exist unlinks each; rsync renames each into place).
        write(&fs, dir, "g", b"g\n");
        fs.unlink(dir, "g").unwrap();
        assert_eq!(pending(), 2);
        assert_eq!(fs.lookup(dir, "g").unwrap_err().errno(), libc::ENOENT);
        write(&fs, dir, "t", b"t\n");
        write(&fs, dir, "u", b"old u\n");
        fs.rename(dir, "t", dir, "u", false).unwrap();
        assert_eq!(pending(), 5);
        assert_eq!(fs.lookup(dir, "t").unwrap_err().errno(), libc::ENOENT);
        assert_eq!(read_all(&fs, fs.lookup(dir, "u").unwrap().ino), b"t\n");
        fs.rename(dir, "u", dir, "g", false).unwrap();
        fs.unlink(dir, "g").unwrap();
        assert_eq!(pending(), 7);
        assert_eq!(fs.lookup(dir, "u").unwrap_err().errno(), libc::ENOENT);
        assert_eq!(fs.lookup(dir, "g").unwrap_err().errno(), libc::ENOENT);
        // A reload (a commit's) keeps what they did: files put, then
        // unlinked or moved away, stay gone.
        let tree = commit(&fs);
        fs.reload(&view, "main").unwrap();
        for gone in ["d/g", "d/t", "d/u"] {
            assert!(at(&fs, &tree, gone).is_none(), "{gone} committed");
        }
        for gone in ["g", "t", "u"] {
            assert_eq!(fs.lookup(dir, gone).unwrap_err().errno(), libc::ENOENT);
        }
        write(&fs, dir, "g", b"g again\n");
        assert_eq!(
            read_all(&fs, fs.lookup(dir, "g").unwrap().ino),
            b"g again\n"
        );
        // Any other change applies what is pending before itself.
        fs.mkdir(dir, "e").unwrap();
        fs.rename(dir, "e", dir, "e2", false).unwrap();
        assert_eq!(pending(), 0);
        assert_eq!(fs.lookup(dir, "u").unwrap_err().errno(), libc::ENOENT);
        assert_eq!(
            read_all(&fs, fs.lookup(dir, "g").unwrap().ino),
            b"g again\n"
        );
        assert_eq!(names(&fs, dir).len(), 12);
        // And the commit is what the view showed.
        let tree = commit(&fs);
        let Some(Entry::File(f)) = at(&fs, &tree, "d/f3") else {
            panic!("d/f3 committed")
        };
        assert_eq!(f.size, 6);
        // A burst larger than the limit is applied as it goes, by the
        // applier thread: with no further request, the view catches up.
        for i in 0..PENDING_MAX + 5 {
            write(&fs, dir, &format!("h{i}"), b"h\n");
            assert!(pending() <= PENDING_LIMIT);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while pending() >= PENDING_MAX {
            assert!(
                Instant::now() < deadline,
                "{} closes left pending",
                pending()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!view.apply_queued.load(Ordering::Acquire));
        assert_eq!(names(&fs, dir).len(), 12 + PENDING_MAX + 5);
    }

    #[test]
    fn writers_listers_and_the_applier_at_once_lose_nothing() {
        let (_d, fs, main) = setup();
        let fs = Arc::new(fs);
        let done = Arc::new(AtomicBool::new(false));
        // A lister walking the tree while the others write.
        let lister = {
            let (fs, done) = (fs.clone(), done.clone());
            std::thread::spawn(move || {
                let mut walks = 0;
                while !done.load(Ordering::Acquire) {
                    for d in names(&fs, main) {
                        if let Ok(a) = fs.lookup(main, &d) {
                            if a.kind == Kind::Dir {
                                let _ = fs.opendir(a.ino).map(|fh| fs.release(fh));
                            }
                        }
                    }
                    walks += 1;
                }
                walks
            })
        };
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let fs = fs.clone();
                std::thread::spawn(move || {
                    let dir = fs.mkdir(main, &format!("w{w}")).unwrap().ino;
                    for i in 0..300 {
                        if i % 100 == 0 {
                            fs.mkdir(dir, &format!("sub{i}")).unwrap();
                        }
                        write(
                            &fs,
                            dir,
                            &format!("f{i:03}"),
                            format!("{w}.{i}\n").as_bytes(),
                        );
                    }
                    // One directory moved while closes are pending.
                    fs.rename(dir, "sub0", dir, "moved", false).unwrap();
                })
            })
            .collect();
        for t in writers {
            t.join().unwrap();
        }
        done.store(true, Ordering::Release);
        assert!(lister.join().unwrap() > 0);
        for w in 0..4 {
            let dir = fs.lookup(main, &format!("w{w}")).unwrap().ino;
            let mut want: Vec<String> = (0..300).map(|i| format!("f{i:03}")).collect();
            want.extend(["moved", "sub100", "sub200"].map(String::from));
            want.sort();
            assert_eq!(names(&fs, dir), want);
            let f = fs.lookup(dir, "f299").unwrap().ino;
            assert_eq!(read_all(&fs, f), format!("{w}.299\n").as_bytes());
        }
        // The store has every staged change: the commit is what the view showed.
        let tree = commit(&fs);
        assert_eq!(fs.lake.trees().count(&tree).unwrap(), 4);
        for w in 0..4 {
            let Some(Entry::Dir(h)) = fs.lake.trees().lookup(&tree, &format!("w{w}")).unwrap()
            else {
                panic!("w{w} committed")
            };
            assert_eq!(fs.lake.trees().count(&h).unwrap(), 303);
        }
    }

    #[test]
    fn small_files_are_held_by_hash_and_keep_their_content() {
        let (_d, fs, main) = setup();
        let text = "0123456789".repeat(10);
        let f = write(&fs, main, "f", text.as_bytes());
        let held = |fs: &LakeFs, ino| match fs.node(ino).unwrap() {
            Node::File { file, .. } => file,
            _ => panic!("a file"),
        };
        let Content::Inline(b) = held(&fs, f).content else {
            panic!("inline")
        };
        assert_eq!(b.len(), 32, "the inode holds the content's hash");
        assert_eq!(read_all(&fs, f), text.as_bytes());
        // A chmod on a closed file stages the whole file, content and all.
        let set = |mode, size| SetAttr {
            mode,
            size,
            mtime: None,
            kill_suid: false,
        };
        fs.setattr(f, None, set(Some(0o600), None)).unwrap();
        assert_eq!(fs.getattr(f).unwrap().perm, 0o600);
        assert_eq!(fs.getattr(f).unwrap().size, 100);
        let tree = commit(&fs);
        let Some(Entry::File(c)) = at(&fs, &tree, "f") else {
            panic!("f committed")
        };
        assert_eq!((c.size, c.mode), (100, 0o600));
        assert_eq!(c.content, Content::Inline(text.clone().into_bytes().into()));
        // A truncate without a handle starts from the content too.
        fs.setattr(f, None, set(None, Some(40))).unwrap();
        let f = fs.lookup(main, "f").unwrap().ino;
        assert_eq!(read_all(&fs, f), &text.as_bytes()[..40]);
        // Another writer replaces it: the inode of the old version cannot
        // be opened any more (the kernel looks the name up again).
        let g = write(&fs, main, "g", text.as_bytes());
        put_elsewhere(&fs, "g", b'x');
        assert_eq!(fs.open(g, false, false).unwrap_err().errno(), libc::ESTALE);
        let g = fs.lookup(main, "g").unwrap().ino;
        assert_eq!(read_all(&fs, g), vec![b'x'; 100]);
    }

    #[test]
    fn looked_up_small_files_are_held_by_hash_too() {
        let (_d, fs, main) = setup();
        put_elsewhere(&fs, "f", b'a');
        let f = fs.lookup(main, "f").unwrap().ino;
        let Node::File { file, .. } = fs.node(f).unwrap() else {
            panic!("a file")
        };
        let Content::Inline(b) = file.content else {
            panic!("inline")
        };
        assert_eq!(b.len(), 32, "the inode holds the content's hash");
        assert_eq!(read_all(&fs, f), vec![b'a'; 100]);
        // The same version looked up again is the same inode; a listing
        // names it too.
        assert_eq!(fs.lookup(main, "f").unwrap().ino, f);
        let listed = listed(&fs, main);
        assert!(listed.contains(&("f".to_string(), f)), "{listed:?}");
        // Replaced elsewhere: the old inode cannot be opened any more, the
        // name looks up the new version.
        put_elsewhere(&fs, "f", b'b');
        assert_eq!(fs.open(f, false, false).unwrap_err().errno(), libc::ESTALE);
        let g = fs.lookup(main, "f").unwrap().ino;
        assert_ne!(g, f);
        assert_eq!(read_all(&fs, g), vec![b'b'; 100]);
    }

    #[test]
    fn an_inode_written_through_then_looked_up_again_is_that_version() {
        let (_d, fs, main) = setup();
        write(&fs, main, "f", &[b'a'; 100]);
        put_elsewhere(&fs, "f", b'b');
        // Its number now names version b; written through, it is version a.
        let x = fs.lookup(main, "f").unwrap().ino;
        let (fh, _) = fs.open(x, true, true).unwrap();
        fs.write(fh, 0, &[b'a'; 100]).unwrap();
        fs.flush(fh).unwrap();
        fs.release(fh).unwrap();
        commit(&fs);
        assert_eq!(read_all(&fs, x), [b'a'; 100]);
        // Version b again elsewhere: a lookup computes the same number, and
        // the inode is version b again (before that lookup it would open
        // with ESTALE: the version it held is gone). The kernel's pages of
        // it are version a's: the next open drops them.
        put_elsewhere(&fs, "f", b'b');
        assert_eq!(fs.lookup(main, "f").unwrap().ino, x);
        let (fh, cache) = fs.open(x, false, false).unwrap();
        assert_eq!(cache, PageCache::Refresh);
        assert_eq!(&fs.read(fh, 0, 1000).unwrap()[..], &[b'b'; 100][..]);
        fs.release(fh).unwrap();
        let (fh, cache) = fs.open(x, false, false).unwrap();
        assert_eq!(cache, PageCache::Keep);
        fs.release(fh).unwrap();
    }

    #[test]
    fn a_heavy_working_tree_spills_to_disk_and_reads_the_same() {
        let (d, fs, main) = setup_with(|fs| fs.spill_after = 64 << 10);
        let views = d.path().join("spool/views");
        let dirs: Vec<u64> = (0..3)
            .map(|i| fs.mkdir(main, &format!("d{i}")).unwrap().ino)
            .collect();
        let text = |i: usize| format!("{i:04}").repeat(750);
        for i in 0..600 {
            write(&fs, dirs[i % 3], &format!("f{i:03}"), text(i).as_bytes());
        }
        for i in (0..600).step_by(7) {
            let f = fs.lookup(dirs[i % 3], &format!("f{i:03}")).unwrap().ino;
            assert_eq!(read_all(&fs, f), text(i).as_bytes(), "f{i:03}");
        }
        // The closes went to the applier thread; once it is done (it holds
        // the view's `applying` lock until it has spilled), nothing waits.
        let view = fs.views.lock().values().next().unwrap().clone();
        view.apply_pending().unwrap();
        let spilled: usize = std::fs::read_dir(&views)
            .unwrap()
            .map(|v| std::fs::read_dir(v.unwrap().path()).unwrap().count())
            .sum();
        assert!(spilled > 0, "the working tree spilled");
        assert_eq!(names(&fs, dirs[1]).len(), 200);
        let tree = commit(&fs);
        let Some(Entry::Dir(h)) = at(&fs, &tree, "d2") else {
            panic!("d2 committed")
        };
        assert_eq!(fs.lake.trees().count(&h).unwrap(), 200);
        // Reloaded after the commit, the view drops its spill.
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(names(&fs, main), ["d0", "d1", "d2"]);
        let left: usize = std::fs::read_dir(&views)
            .unwrap()
            .map(|v| std::fs::read_dir(v.unwrap().path()).map_or(0, |d| d.count()))
            .sum();
        assert_eq!(left, 0, "spill files left after the reload");
    }

    #[test]
    fn new_directories_wait_with_the_files_put_in_them() {
        let (_d, fs, main) = setup();
        let view = fs.views.lock().values().next().unwrap().clone();
        let pending = || view.state.lock().pending.ops.len();
        let d = fs.mkdir(main, "d").unwrap().ino;
        let e = fs.mkdir(d, "e").unwrap().ino;
        write(&fs, e, "f", b"f\n");
        assert_eq!(pending(), 3, "staged, not applied yet");
        assert_eq!(fs.mkdir(main, "d").unwrap_err().errno(), libc::EEXIST);
        assert_eq!(fs.mkdir(d, "e").unwrap_err().errno(), libc::EEXIST);
        assert_eq!(fs.lookup(d, "e").unwrap().ino, e);
        assert_eq!(read_all(&fs, fs.lookup(e, "f").unwrap().ino), b"f\n");
        assert_eq!(fs.lookup(d, "f").unwrap_err().errno(), libc::ENOENT);
        assert_eq!(fs.rmdir(main, "d").unwrap_err().errno(), libc::ENOTEMPTY);
        assert_eq!(pending(), 0, "removing applies what is pending first");
        assert_eq!(names(&fs, e), ["f"]);
        // Pending again, when another writer puts a file in the new
        // directory and the branch moves: the reload keeps that file (the
        // directory is not put again, empty, over it).
        let g = fs.mkdir(main, "g").unwrap().ino;
        write(&fs, g, "mine", b"1\n");
        assert_eq!(pending(), 2);
        let other = |path: &str| Op::Put {
            path: path.to_string(),
            entry: Entry::File(File {
                size: 0,
                mode: 0o644,
                mtime: 0,
                content: Content::Inline(bytes::Bytes::new()),
            }),
        };
        fs.lake.stage("r", "main", vec![other("g/theirs")]).unwrap();
        commit(&fs);
        // Past the metadata TTL, the view reloads the branch.
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(fs.lookup(g, "theirs").unwrap().size, 0);
        assert_eq!(names(&fs, g), ["mine", "theirs"]);
        assert_eq!(names(&fs, main), ["d", "g"]);
    }

    #[test]
    fn much_staged_elsewhere_is_applied_batch_by_batch_and_spills() {
        let (d, fs, main) = setup_with(|fs| fs.spill_after = 64 << 10);
        write(&fs, main, "mine", b"1\n");
        let view = fs.views.lock().values().next().unwrap().clone();
        let handle = || view.state.lock().trees.clone();
        let theirs = |dir: &str, n: usize| -> Vec<Op> {
            (0..n)
                .map(|i| Op::Put {
                    path: format!("{dir}/f{i:03}"),
                    entry: Entry::File(File {
                        size: 2000,
                        mode: 0o644,
                        mtime: 0,
                        content: Content::Inline(vec![i as u8; 2000].into()),
                    }),
                })
                .collect()
        };
        let spilled = || -> usize {
            std::fs::read_dir(d.path().join("spool/views")).map_or(0, |vs| {
                vs.map(|v| std::fs::read_dir(v.unwrap().path()).map_or(0, |f| f.count()))
                    .sum()
            })
        };
        // A little staged elsewhere is applied to the view's tree.
        view.apply_pending().unwrap();
        let before = handle();
        fs.lake.stage("r", "main", theirs("small", 10)).unwrap();
        fs.invalidate(&view);
        let small = fs.lookup(main, "small").unwrap().ino;
        assert_eq!(names(&fs, small).len(), 10);
        assert_eq!(spilled(), 0);
        // 200 KB of it in four batches: applied batch by batch to the same
        // tree, which spills on the way instead of holding them all.
        for part in theirs("big", 100).chunks(25) {
            fs.lake.stage("r", "main", part.to_vec()).unwrap();
        }
        fs.invalidate(&view);
        let big = fs.lookup(main, "big").unwrap().ino;
        assert_eq!(names(&fs, big).len(), 100);
        assert!(Arc::ptr_eq(&before, &handle()), "applied, not reloaded");
        assert!(spilled() > 0, "the view's tree spilled");
        let f = fs.lookup(big, "f042").unwrap().ino;
        assert_eq!(read_all(&fs, f), vec![42u8; 2000]);
        assert_eq!(names(&fs, main), ["big", "mine", "small"]);
    }

    #[test]
    fn a_new_directory_at_a_renamed_ones_name_is_empty() {
        let (_d, fs, main) = setup();
        let d3 = fs.mkdir(main, "d3").unwrap().ino;
        write(&fs, d3, "c.txt", b"x\n");
        let d1 = fs.mkdir(main, "d1").unwrap().ino;
        fs.rename(main, "d3", d1, "b", false).unwrap();
        let new_d3 = fs.mkdir(main, "d3").unwrap().ino;
        assert_ne!(new_d3, d3);
        assert!(names(&fs, new_d3).is_empty());
        assert_eq!(
            fs.lookup(new_d3, "c.txt").unwrap_err().errno(),
            libc::ENOENT
        );
        // The moved inode still works, at its new place.
        assert_eq!(names(&fs, d3), ["c.txt"]);
        let c = fs.lookup(d3, "c.txt").unwrap().ino;
        assert_eq!(read_all(&fs, c), b"x\n");
        assert_eq!(names(&fs, main), ["d1", "d3"]);
    }

    #[test]
    fn a_rename_on_one_branch_leaves_a_file_open_on_another_where_it_is() {
        let (_d, fs, main) = setup();
        write(&fs, main, "a", b"old");
        commit(&fs);
        fs.lake.create_branch("r", "dev", "main").unwrap();
        let repo = fs.lookup(ROOT_INO, "r").unwrap().ino;
        let dev = fs.lookup(repo, "dev").unwrap().ino;
        // "a" open for writing on main while dev renames its own "a".
        let (_, fh) = fs.create(main, "n", 0o644, IfExists::Fail).unwrap();
        let a = fs.lookup(main, "a").unwrap().ino;
        let (afh, _) = fs.open(a, true, false).unwrap();
        fs.write(afh, 0, b"new").unwrap();
        fs.rename(dev, "a", dev, "b", false).unwrap();
        fs.flush(afh).unwrap();
        fs.release(afh).unwrap();
        fs.release(fh).unwrap();
        assert_eq!(names(&fs, main), ["a", "n"]);
        assert_eq!(read_all(&fs, fs.lookup(main, "a").unwrap().ino), b"new");
        assert_eq!(names(&fs, dev), ["b"]);
    }

    /// Flush `fh` and, once its close is storing chunks (slow ones:
    /// `slow_puts`), `then`.
    fn flush_while(
        fs: &LakeFs,
        faults: &crate::store::faults::FaultyStore,
        fh: u64,
        then: &dyn Fn(),
    ) {
        stalled_while(faults, || fs.flush(fh).unwrap(), then);
    }

    /// Run `work` and, once it is in a slow put (`slow_puts`), `then`.
    fn stalled_while(
        faults: &crate::store::faults::FaultyStore,
        work: impl FnOnce() + Send,
        then: &dyn Fn(),
    ) {
        let before = faults.counts.slow_puts.load(Ordering::Relaxed);
        std::thread::scope(|s| {
            let working = s.spawn(work);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while faults.counts.slow_puts.load(Ordering::Relaxed) == before {
                assert!(std::time::Instant::now() < deadline, "no slow put began");
                std::thread::sleep(Duration::from_millis(1));
            }
            then();
            working.join().unwrap();
        });
    }

    /// Bytes new to the store for each seed (else their chunks are not
    /// put, and a close is quick).
    fn fresh_bytes(seed: u32) -> Vec<u8> {
        (0..100_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8 ^ seed as u8)
            .collect()
    }

    /// A store whose chunk puts can be made slow, under a mount.
    fn setup_slow() -> (
        tempfile::TempDir,
        LakeFs,
        u64,
        Arc<crate::store::faults::FaultyStore>,
    ) {
        use crate::store::faults::{FaultPlan, FaultyStore};
        let faults = FaultyStore::new(
            Arc::new(object_store::memory::InMemory::new()),
            FaultPlan::default(),
        );
        let (d, fs, main) = setup_over(Store::over(faults.clone(), "memory://slow"), |_| {});
        (d, fs, main, faults)
    }

    /// Puts of keys under `prefix` take 300 ms from now on.
    fn slow_puts(faults: &crate::store::faults::FaultyStore, prefix: &str) {
        faults.set_plan(crate::store::faults::FaultPlan {
            slow_puts_under: Some((prefix.into(), Duration::from_millis(300))),
            ..Default::default()
        });
    }

    #[test]
    fn a_file_opened_again_while_its_last_close_is_staged_still_moves_with_a_rename() {
        let (_d, fs, main, faults) = setup_slow();
        let d = fs.mkdir(main, "d").unwrap().ino;
        let f = write(&fs, d, "f", b"old");
        commit(&fs);
        let (fh, _) = fs.open(f, true, false).unwrap();
        fs.write(fh, 0, &fresh_bytes(1)).unwrap();
        slow_puts(&faults, "chunks/");
        let again = std::sync::Mutex::new(None);
        // The last handle's release stages the file (slowly); meanwhile
        // the file is opened for writing again, joining its spool.
        stalled_while(&faults, || fs.release(fh).unwrap(), &|| {
            *again.lock().unwrap() = Some(fs.open(f, true, false).unwrap().0)
        });
        faults.set_plan(Default::default());
        let fh = again.into_inner().unwrap().unwrap();
        fs.rename(main, "d", main, "e", false).unwrap();
        fs.write(fh, 0, b"new").unwrap();
        fs.flush(fh).unwrap();
        fs.release(fh).unwrap();
        let mut want = fresh_bytes(1);
        want[..3].copy_from_slice(b"new");
        assert_eq!(names(&fs, main), ["e"]);
        let e = fs.lookup(main, "e").unwrap().ino;
        assert_eq!(read_all(&fs, fs.lookup(e, "f").unwrap().ino), want);
        let tree = commit(&fs);
        assert!(at(&fs, &tree, "d").is_none());
        assert!(at(&fs, &tree, "e/f").is_some());
    }

    #[test]
    fn a_chmod_lands_before_a_write_that_opens_the_file_meanwhile() {
        let (_d, fs, main, faults) = setup_slow();
        write(&fs, main, "f", b"old");
        commit(&fs);
        let f = fs.lookup(main, "f").unwrap().ino;
        slow_puts(&faults, "repos/r/staging/");
        stalled_while(
            &faults,
            || {
                let set = SetAttr {
                    mode: Some(0o600),
                    ..SetAttr::default()
                };
                fs.setattr(f, None, set).unwrap();
            },
            // The chmod is being staged: a truncating open, a write and a
            // close now (on a local disk: the new bytes, with mode 0600).
            &|| {
                let (fh, _) = fs.open(f, true, true).unwrap();
                fs.write(fh, 0, b"new").unwrap();
                fs.flush(fh).unwrap();
                fs.release(fh).unwrap();
            },
        );
        faults.set_plan(Default::default());
        let now = fs.lookup(main, "f").unwrap();
        assert_eq!(now.perm, 0o600);
        assert_eq!(read_all(&fs, now.ino), b"new");
        match at(&fs, &commit(&fs), "f") {
            Some(Entry::File(f)) => {
                assert_eq!(f.mode & 0o777, 0o600);
                assert_eq!(f.content, Content::Inline(b"new"[..].into()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_chmod_while_its_file_is_being_closed_holds() {
        let (_d, fs, main, faults) = setup_slow();
        let mode = |m| SetAttr {
            mode: Some(m),
            ..SetAttr::default()
        };
        for (seed, through_another) in [(1, false), (2, true)] {
            let name = format!("f{seed}");
            let a = write(&fs, main, &name, b"old");
            commit(&fs);
            // The same file through the inode it was written as, or through
            // another the kernel looked up meanwhile.
            let b = if through_another {
                other_inode(&fs, main, &name)
            } else {
                a
            };
            assert_eq!(a != b, through_another);
            let fh = fs.open(a, true, false).unwrap().0;
            fs.write(fh, 0, &fresh_bytes(seed)).unwrap();
            slow_puts(&faults, "chunks/");
            flush_while(&fs, &faults, fh, &|| {
                fs.setattr(b, None, mode(0o600)).unwrap();
            });
            fs.release(fh).unwrap();
            faults.set_plan(Default::default());
            let ino = fs.lookup(main, &name).unwrap();
            assert_eq!(ino.perm, 0o600, "{name}");
            assert_eq!(read_all(&fs, ino.ino), fresh_bytes(seed), "{name}");
            match at(&fs, &commit(&fs), &name) {
                Some(Entry::File(f)) => {
                    assert_eq!(f.mode & 0o777, 0o600, "{name}");
                    assert_eq!(f.size, 100_000, "{name}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_rename_or_unlink_waits_for_a_close_of_the_file_in_flight() {
        let (_d, fs, main, faults) = setup_slow();
        let data = fresh_bytes;
        write(&fs, main, "u", b"old");
        let d = fs.mkdir(main, "d").unwrap().ino;
        commit(&fs);
        slow_puts(&faults, "chunks/");
        // Close a file written in `dir` (its chunks are slow to store) and,
        // while that close is in flight, `then`.
        let close_while =
            |dir: u64, name: &str, seed: u32, open_existing: bool, then: &dyn Fn()| {
                let fh = if open_existing {
                    let ino = fs.lookup(dir, name).unwrap().ino;
                    fs.open(ino, true, true).unwrap().0
                } else {
                    fs.create(dir, name, 0o644, IfExists::Fail).unwrap().1
                };
                fs.write(fh, 0, &data(seed)).unwrap();
                flush_while(&fs, &faults, fh, then);
                fs.release(fh).unwrap();
            };
        // A new file renamed, an existing one unlinked, and a directory
        // renamed with a new file in it.
        close_while(main, "p", 1, false, &|| {
            fs.rename(main, "p", main, "q", false).unwrap()
        });
        close_while(main, "u", 2, true, &|| fs.unlink(main, "u").unwrap());
        close_while(d, "f", 3, false, &|| {
            fs.rename(main, "d", main, "e", false).unwrap()
        });
        assert_eq!(names(&fs, main), ["e", "q"]);
        let e = fs.lookup(main, "e").unwrap().ino;
        assert_eq!(names(&fs, e), ["f"]);
        for (dir, name, seed) in [(main, "q", 1), (e, "f", 3)] {
            assert_eq!(read_all(&fs, fs.lookup(dir, name).unwrap().ino), data(seed));
        }
        let tree = commit(&fs);
        for gone in ["p", "u", "d", "d/f"] {
            assert!(at(&fs, &tree, gone).is_none(), "{gone} came back");
        }
        for path in ["q", "e/f"] {
            match at(&fs, &tree, path) {
                Some(Entry::File(f)) => assert_eq!(f.size, 100_000, "{path}"),
                other => panic!("{path}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_file_unlinked_while_open_stays_gone_whatever_is_written_after() {
        let (_d, fs, main) = setup();
        let d1 = fs.mkdir(main, "d1").unwrap().ino;
        let b = write(&fs, d1, "b", &[b'x'; 100]);
        let (fh, _) = fs.open(b, true, false).unwrap();
        fs.unlink(d1, "b").unwrap();
        fs.write(fh, 0, &[b'y'; 100]).unwrap();
        fs.flush(fh).unwrap();
        fs.release(fh).unwrap();
        assert!(names(&fs, d1).is_empty());
        assert!(at(&fs, &commit(&fs), "d1/b").is_none());
    }

    #[test]
    fn what_a_rename_moved_keeps_its_inode_at_the_new_path() {
        let (_d, fs, main) = setup();
        let b = fs.mkdir(main, "b").unwrap().ino;
        let f = write(&fs, b, "f", b"data");
        let sub = fs.mkdir(b, "sub").unwrap().ino;
        fs.rename(main, "b", main, "d1", false).unwrap();
        // Looked up again (the kernel does once an entry's TTL passes):
        // the same inodes, so the kernel's dentries stay valid.
        let d1 = fs.lookup(main, "d1").unwrap().ino;
        assert_eq!(d1, b);
        assert_eq!(fs.lookup(d1, "f").unwrap().ino, f);
        assert_eq!(fs.lookup(d1, "sub").unwrap().ino, sub);
        // And in a listing.
        let listed = listed(&fs, main);
        assert_eq!(listed, [("d1".to_string(), b)]);
        // A new version of a moved file is a new inode, as anywhere.
        put_elsewhere(&fs, "d1/f", 7);
        assert_ne!(fs.lookup(d1, "f").unwrap().ino, f);
        // What is made at the old path is new.
        assert_ne!(fs.mkdir(main, "b").unwrap().ino, b);
    }

    #[test]
    fn an_inode_of_an_older_version_is_stale_for_opens() {
        let (_d, fs, main) = setup();
        // Chunked, not inline: big enough that nodes keep their content.
        let v1: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let v2: Vec<u8> = (0..20_000u32).map(|i| (i % 241) as u8).collect();
        let a = write(&fs, main, "f", &v1);
        // A lookup (another process, a TTL) names it by its version; then
        // it is opened for writing through the inode it was created as.
        // (An inode looked up while the file is open for writing is the
        // file's spool, then the version its close wrote.)
        let b = other_inode(&fs, main, "f");
        assert_ne!(a, b);
        let (fh, _) = fs.open(a, true, false).unwrap();
        fs.write(fh, 0, &v2).unwrap();
        fs.flush(fh).unwrap();
        fs.release(fh).unwrap();
        // `b` is v1's inode: neither a write nor a read may start from v1.
        for write in [true, false] {
            let err = fs.open(b, write, false).unwrap_err();
            assert_eq!(err.errno(), libc::ESTALE, "write: {write}");
        }
        // The kernel looks the path up again and finds v2.
        let c = fs.lookup(main, "f").unwrap().ino;
        assert_eq!(read_all(&fs, c), v2);
        assert_eq!(fs.getattr(c).unwrap().size, v2.len() as u64);
    }

    #[test]
    fn a_chmod_through_one_inode_holds_for_a_write_through_another() {
        let (_d, fs, main) = setup();
        let a = write(&fs, main, "g", b"small and inline");
        let b = other_inode(&fs, main, "g");
        assert_ne!(a, b, "two inodes of one version");
        let set = SetAttr {
            mode: Some(0o600),
            ..SetAttr::default()
        };
        fs.setattr(a, None, set).unwrap();
        let (fh, _) = fs.open(b, true, false).unwrap();
        fs.write(fh, 0, b"S").unwrap();
        fs.flush(fh).unwrap();
        fs.release(fh).unwrap();
        match at(&fs, &commit(&fs), "g") {
            Some(Entry::File(f)) => assert_eq!(f.mode, 0o600),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn writes_through_two_inodes_of_one_file_share_its_spool() {
        let (_d, fs, main) = setup();
        let a = write(&fs, main, "h", &[b'.'; 20]);
        let b = other_inode(&fs, main, "h");
        assert_ne!(a, b, "two inodes of one version");
        let (fa, _) = fs.open(a, true, false).unwrap();
        let (fb, _) = fs.open(b, true, false).unwrap();
        fs.write(fa, 0, b"AAAA").unwrap();
        fs.write(fb, 10, b"BBBB").unwrap();
        for fh in [fa, fb] {
            fs.flush(fh).unwrap();
            fs.release(fh).unwrap();
        }
        let want = b"AAAA......BBBB......";
        let c = fs.lookup(main, "h").unwrap().ino;
        assert_eq!(read_all(&fs, c), want);
        match at(&fs, &commit(&fs), "h") {
            Some(Entry::File(f)) => assert_eq!(f.content, Content::Inline(want[..].into())),
            other => panic!("{other:?}"),
        }
        // Closed for good: a new open starts from what was staged.
        assert!(fs.writes.lock().is_empty());
    }

    #[test]
    fn files_created_while_many_are_open_copy_nothing_of_the_others() {
        let (_d, fs, main) = setup();
        let Node::Tree { view, .. } = fs.node(main).unwrap() else {
            panic!("main is a directory")
        };
        // Where the map of files being created is. (Checked after each
        // call: a copy's old map is freed once the call returns, and a
        // later copy could land where it was.)
        let creating = || Arc::as_ptr(&view.state.lock().creating) as usize;
        let mut open = vec![fs.create(main, "f0", 0o644, IfExists::Fail).unwrap()];
        let at = creating();
        // A copy per create made opening n files at once cost n² (15k
        // files open at once: 0.5 ms per open).
        for i in 1..64 {
            open.push(
                fs.create(main, &format!("f{i}"), 0o644, IfExists::Fail)
                    .unwrap(),
            );
            assert_eq!(creating(), at, "a create copied the files being created");
        }
        assert_eq!(view.state.lock().creating.len(), 64);
        // Nor does a rename or an unlink of another file.
        write(&fs, main, "x", b"1");
        fs.rename(main, "x", main, "y", false).unwrap();
        assert_eq!(creating(), at, "a rename copied them");
        fs.unlink(main, "y").unwrap();
        assert_eq!(creating(), at, "an unlink copied them");
        for (attr, fh) in &open {
            let wf = fs.writes.lock().get(&attr.ino).cloned().unwrap();
            assert_eq!(*wf.inos.lock(), [attr.ino]);
            fs.write(*fh, 0, attr.ino.to_string().as_bytes()).unwrap();
            fs.flush(*fh).unwrap();
            fs.release(*fh).unwrap();
        }
        assert!(fs.writes.lock().is_empty());
        assert!(view.state.lock().creating.is_empty());
        for (i, (attr, _)) in open.iter().enumerate() {
            let ino = fs.lookup(main, &format!("f{i}")).unwrap().ino;
            assert_eq!(read_all(&fs, ino), attr.ino.to_string().as_bytes());
        }
    }

    #[test]
    fn what_a_rename_replaced_or_an_rmdir_removed_never_answers_for_another_path() {
        let (_d, fs, main) = setup();
        // A directory renamed over an empty one and back keeps its inode
        // (the replaced one must not come back with it).
        for n in 0..8 {
            let (a, b) = (format!("a{n}"), format!("b{n}"));
            let kept = fs.mkdir(main, &a).unwrap().ino;
            let replaced = fs.mkdir(main, &b).unwrap().ino;
            assert_ne!(kept, replaced);
            fs.rename(main, &a, main, &b, false).unwrap();
            assert_eq!(fs.lookup(main, &b).unwrap().ino, kept);
            fs.rename(main, &b, main, &a, false).unwrap();
            assert_eq!(fs.lookup(main, &a).unwrap().ino, kept, "{a}");
        }
        // A directory removed, its parent renamed, and one made where it
        // was moved to: a new directory, not the removed one.
        let p = fs.mkdir(main, "p").unwrap().ino;
        let removed = fs.mkdir(p, "d").unwrap().ino;
        fs.rmdir(p, "d").unwrap();
        fs.rename(main, "p", main, "q", false).unwrap();
        let q = fs.lookup(main, "q").unwrap().ino;
        assert_eq!(q, p);
        assert_ne!(fs.mkdir(q, "d").unwrap().ino, removed);
        // A file open while it is replaced still shows what it was.
        let f = write(&fs, main, "f", b"old");
        let (fh, _) = fs.open(f, false, false).unwrap();
        write(&fs, main, "g", b"newer");
        fs.rename(main, "g", main, "f", false).unwrap();
        assert_eq!(fs.getattr(f).unwrap().size, 3);
        assert_eq!(&fs.read(fh, 0, 10).unwrap()[..], b"old");
        fs.release(fh).unwrap();
        assert_eq!(fs.lookup(main, "f").unwrap().size, 5);
    }

    #[test]
    fn a_create_of_a_name_taken_meanwhile_keeps_it_unless_told_to_truncate() {
        let (_d, fs, main) = setup();
        write(&fs, main, "f", b"kept");
        let read_back = |fh| fs.read(fh, 0, 100).unwrap().to_vec();
        assert!(matches!(
            fs.create(main, "f", 0o644, IfExists::Fail),
            Err(FsError::Exists)
        ));
        // open(O_CREAT | O_APPEND): what is there stays, and the size the
        // kernel appends at is its size.
        let (attr, fh) = fs.create(main, "f", 0o644, IfExists::Keep).unwrap();
        assert_eq!(attr.size, 4);
        assert_eq!(read_back(fh), b"kept");
        fs.write(fh, 4, b"+").unwrap();
        fs.flush(fh).unwrap();
        fs.release(fh).unwrap();
        assert_eq!(read_all(&fs, fs.lookup(main, "f").unwrap().ino), b"kept+");
        // open(O_CREAT | O_TRUNC)
        let (attr, fh) = fs.create(main, "f", 0o644, IfExists::Truncate).unwrap();
        assert_eq!(attr.size, 0);
        fs.flush(fh).unwrap();
        fs.release(fh).unwrap();
        assert_eq!(fs.lookup(main, "f").unwrap().size, 0);
    }

    #[test]
    fn a_file_being_written_shows_its_spool_to_lookups_and_its_other_inodes() {
        let (_d, fs, main) = setup();
        let a = write(&fs, main, "f", b"12345");
        commit(&fs);
        let b = other_inode(&fs, main, "f");
        let (fh, _) = fs.open(a, true, false).unwrap();
        fs.write(fh, 0, &[b'x'; 20]).unwrap();
        // The kernel takes these as the file's size (an O_APPEND write
        // goes there): the branch's older 5 bytes would be wrong.
        let looked = fs.lookup(main, "f").unwrap();
        assert_eq!(looked.size, 20);
        assert_eq!(fs.getattr(looked.ino).unwrap().size, 20);
        assert_eq!(fs.getattr(b).unwrap().size, 20);
        let mut listed = Vec::new();
        let dir = fs.opendir(main).unwrap();
        fs.readdirplus(dir, 0, |_, name, attr| {
            listed.push((name.to_string(), attr.size));
            false
        })
        .unwrap();
        assert_eq!(listed, [("f".to_string(), 20)]);
        fs.flush(fh).unwrap();
        fs.release(fh).unwrap();
        // Closed for good: the branch's version again, the one written,
        // through every inode the kernel knows the file by.
        assert_eq!(fs.lookup(main, "f").unwrap().size, 20);
        assert_eq!(fs.getattr(b).unwrap().size, 20);
        // ...whose pages the kernel may hold of the older version.
        let (fh, cache) = fs.open(b, false, false).unwrap();
        assert!(matches!(cache, PageCache::Refresh));
        fs.release(fh).unwrap();
        assert_eq!(read_all(&fs, b), [b'x'; 20]);
        assert!(fs.writes.lock().is_empty());
    }

    #[test]
    fn renames_of_new_files_into_place_leave_nothing_behind() {
        let (_d, fs, main) = setup();
        // rsync: each file written to a temporary name of its own, then
        // renamed over the file; the kernel lets go of the one replaced.
        for round in 0..3 {
            for i in 0..100 {
                let tmp = format!(".f{i}.{round}");
                let a = write(&fs, main, &tmp, format!("{round}").as_bytes());
                fs.rename(main, &tmp, main, &format!("f{i}"), false)
                    .unwrap();
                if round == 2 {
                    fs.forget(a, 1);
                }
            }
        }
        assert!(fs.moved_away.lock().is_empty());
        assert!(fs.moved_to.lock().is_empty());
        // A file numbered from its path that moves away does change the
        // path's generation: the same content there next is another inode.
        let b = fs.lookup(main, "f0").unwrap().ino;
        fs.rename(main, "f0", main, "g", false).unwrap();
        assert_eq!(fs.moved_away.lock().len(), 1);
        let c = write(&fs, main, "f0", b"2");
        fs.forget(c, 1);
        assert_ne!(fs.lookup(main, "f0").unwrap().ino, b);
        assert_eq!(fs.lookup(main, "g").unwrap().ino, b);
    }

    #[test]
    fn lookups_answer_with_the_inode_a_file_was_written_through() {
        let (_d, fs, main) = setup();
        let a = write(&fs, main, "f", b"one");
        assert_eq!(fs.lookup(main, "f").unwrap().ino, a);
        commit(&fs);
        assert_eq!(fs.lookup(main, "f").unwrap().ino, a);
        assert_eq!(listed(&fs, main), [("f".to_string(), a)]);
        // Written again through it: still the one.
        let (fh, _) = fs.open(a, true, true).unwrap();
        fs.write(fh, 0, b"two").unwrap();
        fs.flush(fh).unwrap();
        fs.release(fh).unwrap();
        assert_eq!(fs.lookup(main, "f").unwrap().ino, a);
        assert_eq!(read_all(&fs, a), b"two");
        // Once the kernel forgot it (a create and three lookups), the
        // version's own number.
        fs.forget(a, 3);
        assert_eq!(fs.lookup(main, "f").unwrap().ino, a);
        fs.forget(a, 2);
        let b = fs.lookup(main, "f").unwrap().ino;
        assert_ne!(b, a);
        assert_eq!(read_all(&fs, b), b"two");
    }

    #[test]
    fn inodes_the_kernel_forgets_are_let_go_and_come_back_when_looked_up() {
        let (_d, fs, main) = setup();
        let held = || fs.nodes.lock().by_ino.len();
        let before = held();
        // A create gives the kernel its inode once; forgotten, it is gone.
        let created = write(&fs, main, "f", b"data");
        assert_eq!(held(), before + 1);
        fs.forget(created, 1);
        assert_eq!(held(), before);
        // Two lookups: the inode stays until both are forgotten.
        let f = fs.lookup(main, "f").unwrap().ino;
        assert_eq!(fs.lookup(main, "f").unwrap().ino, f);
        fs.forget(f, 1);
        assert_eq!(read_all(&fs, f), b"data");
        fs.forget(f, 1);
        assert!(matches!(fs.getattr(f), Err(FsError::NotFound)));
        assert_eq!(held(), before);
        // Looked up again: the same number, working as before.
        assert_eq!(fs.lookup(main, "f").unwrap().ino, f);
        assert_eq!(read_all(&fs, f), b"data");
        // A READDIRPLUS entry that did not fit in the reply is not counted.
        let dir = fs.opendir(main).unwrap();
        let mut left_out = None;
        fs.readdirplus(dir, 0, |_, _, a| {
            left_out = Some(a.ino);
            true
        })
        .unwrap();
        fs.release(dir).unwrap();
        assert_eq!(left_out, Some(f));
        fs.forget(f, 1);
        assert_eq!(held(), before);
        // Unlinked while the kernel holds it, and the same version back at
        // the same path: that reply adds to the count the kernel's FORGET
        // of the old inode takes from.
        let f = fs.lookup(main, "f").unwrap().ino;
        fs.unlink(main, "f").unwrap();
        let again = write(&fs, main, "f", b"data");
        fs.forget(again, 1);
        assert_eq!(fs.lookup(main, "f").unwrap().ino, f);
        fs.forget(f, 1);
        assert_eq!(read_all(&fs, f), b"data");
        fs.forget(f, 1);
        assert_eq!(held(), before);
        // What a rename moved is let go of with its inode.
        let a = write(&fs, main, "a", b"moved");
        fs.rename(main, "a", main, "b", false).unwrap();
        assert!(!fs.moved_to.lock().is_empty());
        fs.forget(a, 1);
        assert!(fs.moved_to.lock().is_empty());
        assert_eq!(read_all(&fs, fs.lookup(main, "b").unwrap().ino), b"moved");
        // Many files written and forgotten leave nothing behind.
        let inos: Vec<u64> = (0..300)
            .map(|i| write(&fs, main, &format!("m{i}"), b"x"))
            .collect();
        let listed: Vec<u64> = listed(&fs, main).into_iter().map(|(_, ino)| ino).collect();
        for ino in inos.into_iter().chain(listed.iter().copied()) {
            fs.forget(ino, 1);
        }
        let b = fs.lookup(main, "b").unwrap().ino;
        fs.forget(b, 1);
        assert!(
            held() <= before + 1,
            "{} inodes held, {before} before",
            held()
        );
        // The root is never let go of.
        fs.forget(ROOT_INO, 1_000_000);
        assert!(fs.getattr(ROOT_INO).is_ok());
    }

    #[test]
    fn a_renamed_file_or_symlink_keeps_its_inode_at_its_new_path_only() {
        let (_d, fs, main) = setup();
        let a = write(&fs, main, "a", b"data");
        let l = fs.symlink(main, "l", "a").unwrap().ino;
        // Other paths' inodes around them.
        for i in 0..200 {
            write(&fs, main, &format!("o{i}"), b"x");
        }
        fs.rename(main, "a", main, "b", false).unwrap();
        // (The rename's own lookup of `a` made another inode of the same
        // version: either may answer at `b`.)
        assert_eq!(read_all(&fs, fs.lookup(main, "b").unwrap().ino), b"data");
        assert!(fs.lookup(main, "a").is_err());
        // The inode the file was created as moved with it, and moves on.
        assert_eq!(read_all(&fs, a), b"data");
        fs.rename(main, "b", main, "c", false).unwrap();
        assert_eq!(read_all(&fs, a), b"data");
        fs.rename(main, "c", main, "b", false).unwrap();
        fs.rename(main, "l", main, "m", false).unwrap();
        assert_eq!(fs.lookup(main, "m").unwrap().ino, l);
        assert_eq!(fs.readlink(l).unwrap(), "a");
        // Removed, a symlink's inode is gone.
        fs.unlink(main, "m").unwrap();
        assert!(fs.readlink(l).is_err());
        // A file renamed over another is what answers there.
        fs.rename(main, "o7", main, "b", false).unwrap();
        assert_eq!(read_all(&fs, fs.lookup(main, "b").unwrap().ino), b"x");
        assert_eq!(read_all(&fs, fs.lookup(main, "o8").unwrap().ino), b"x");
    }

    #[test]
    fn a_file_being_written_is_found_where_renames_took_it_and_nowhere_else() {
        let (_d, fs, main) = setup();
        let Node::Tree { view, .. } = fs.node(main).unwrap() else {
            panic!("main is a directory")
        };
        let d = fs.mkdir(main, "d").unwrap().ino;
        let a = write(&fs, d, "f", b"12345");
        commit(&fs);
        let (fh, _) = fs.open(a, true, false).unwrap();
        fs.write(fh, 0, &[b'x'; 20]).unwrap();
        // What a lookup through an inode the file was not opened through
        // finds (a new inode each time, so none is in the table yet).
        let fresh = AtomicU64::new(1 << 40);
        let found = |path: &str| {
            let ino = fresh.fetch_add(1, Ordering::Relaxed);
            fs.spool_of(ino, &view, path, false).is_some()
        };
        assert!(found("d/f"));
        fs.rename(main, "d", main, "e", false).unwrap();
        assert!(found("e/f") && !found("d/f"));
        let e = fs.lookup(main, "e").unwrap().ino;
        assert_eq!(fs.lookup(e, "f").unwrap().size, 20);
        fs.rename(e, "f", e, "g", false).unwrap();
        assert!(found("e/g") && !found("e/f"));
        assert_eq!(fs.lookup(e, "g").unwrap().size, 20);
        // Another file made (and closed) where it was is not it.
        write(&fs, e, "f", b"abc");
        assert!(!found("e/f"));
        assert_eq!(fs.lookup(e, "f").unwrap().size, 3);
        // Unlinked while open, it answers for its name no more.
        fs.unlink(e, "g").unwrap();
        assert!(!found("e/g"));
        write(&fs, e, "g", b"new!");
        assert_eq!(fs.lookup(e, "g").unwrap().size, 4);
        fs.flush(fh).unwrap();
        fs.release(fh).unwrap();
        assert_eq!(fs.lookup(e, "g").unwrap().size, 4);
        assert!(fs.writes.lock().is_empty());
    }

    /// Run `f`; should it not return within a minute (a deadlock), end
    /// the test binary with `what` rather than hang it.
    fn or_abort<T>(what: &str, f: impl FnOnce() -> T) -> T {
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let what = what.to_string();
        let watchdog = std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                finished.recv_timeout(Duration::from_secs(60))
            {
                eprintln!("hung: {what}");
                std::process::abort();
            }
        });
        let out = f();
        drop(done);
        watchdog.join().unwrap();
        out
    }

    #[test]
    fn a_rename_and_an_unlink_of_a_file_open_through_two_inodes_go_through() {
        let (_d, fs, main) = setup();
        let a = write(&fs, main, "h", b"0123456789");
        let b = other_inode(&fs, main, "h");
        assert_ne!(a, b, "two inodes of one version");
        let (fa, _) = fs.open(a, true, false).unwrap();
        let (fb, _) = fs.open(b, true, false).unwrap();
        fs.write(fa, 0, b"AB").unwrap();
        // The file is under both inodes: each takes its staging once.
        or_abort("rename of a file open through two inodes", || {
            fs.rename(main, "h", main, "g", false).unwrap()
        });
        fs.write(fb, 2, b"CD").unwrap();
        for fh in [fa, fb] {
            fs.flush(fh).unwrap();
            fs.release(fh).unwrap();
        }
        let g = fs.lookup(main, "g").unwrap().ino;
        assert_eq!(read_all(&fs, g), b"ABCD456789");
        assert!(matches!(fs.lookup(main, "h"), Err(FsError::NotFound)));
        match at(&fs, &commit(&fs), "g") {
            Some(Entry::File(f)) => {
                assert_eq!(f.content, Content::Inline(b"ABCD456789"[..].into()))
            }
            other => panic!("{other:?}"),
        }

        let g = fs.lookup(main, "g").unwrap().ino;
        let (fa, _) = fs.open(g, true, false).unwrap();
        let c = fs.lookup(main, "g").unwrap().ino;
        let (fc, _) = fs.open(c, true, false).unwrap();
        fs.write(fc, 0, b"x").unwrap();
        or_abort("unlink of a file open through two inodes", || {
            fs.unlink(main, "g").unwrap()
        });
        for fh in [fa, fc] {
            fs.flush(fh).unwrap();
            fs.release(fh).unwrap();
        }
        assert!(matches!(fs.lookup(main, "g"), Err(FsError::NotFound)));
        assert!(at(&fs, &commit(&fs), "g").is_none());
    }
}
