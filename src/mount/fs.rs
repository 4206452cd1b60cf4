//! The filesystem core behind the mount: inodes, views of refs, handles,
//! reads through the chunk cache, and the hidden `.tarn` control directory.
//! It knows nothing of fuser: `fuse.rs` adapts it, and tests drive it
//! directly.
//!
//! Layout: in a whole-lake mount the root lists repositories, a repository
//! lists its branches, and `<repo>/<ref>` is the tree of that ref (branches
//! show their staged changes; other refs are resolved on lookup and never
//! listed). A pinned mount shows one ref's tree at the root.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;

use super::cache::ChunkCache;
use crate::hash::{ChunkRef, Hash};
use crate::repo::{BranchRef, Lake, RepoError};
use crate::tree::{Content, Entry, File, TreeError};

pub const ROOT_INO: u64 = 1;

/// Name of the hidden control directory at the root of every ref's tree.
pub const CONTROL_DIR: &str = ".tarn";

/// Kernel cache lifetime for things that never change (pinned commits, tags).
const IMMUTABLE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Read-ahead grows to this many chunks past the current one (≈16 MiB).
const MAX_READAHEAD_CHUNKS: usize = 16;

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
    #[error("operation not supported")]
    NotSupported,
    #[error("stale file handle")]
    BadHandle,
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl FsError {
    /// The one place errors become errnos.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::ReadOnly => libc::EROFS,
            FsError::NotADirectory => libc::ENOTDIR,
            FsError::IsADirectory => libc::EISDIR,
            FsError::NotSupported => libc::ENOTSUP,
            FsError::BadHandle => libc::EBADF,
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
                RepoError::NotABranch(_) => libc::EROFS,
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
                | RepoError::NeedParent(_) => libc::EIO,
            },
            FsError::Tree(TreeError::BadPath { .. }) => libc::EINVAL,
            FsError::Tree(_) | FsError::Store(_) => libc::EIO,
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
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(512)
    }
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
}

/// The files of `.tarn/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ControlFile {
    Head,
    Status,
    Result,
    Ctl,
}

impl ControlFile {
    pub const ALL: [ControlFile; 4] = [
        ControlFile::Ctl,
        ControlFile::Head,
        ControlFile::Result,
        ControlFile::Status,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ControlFile::Head => "head",
            ControlFile::Status => "status",
            ControlFile::Result => "result",
            ControlFile::Ctl => "ctl",
        }
    }

    fn from_name(n: &str) -> Option<ControlFile> {
        ControlFile::ALL.into_iter().find(|c| c.name() == n)
    }
}

/// One ref as a directory: a branch (refreshed on the metadata TTL, shows
/// staged changes) or a pinned commit (resolved once, never changes).
pub struct View {
    id: u64,
    pub repo: String,
    pub name: String,
    pub branch: Option<String>,
    state: Mutex<ViewState>,
    refreshing: Mutex<()>,
}

#[derive(Clone)]
struct ViewState {
    commit: Hash,
    root: Hash,
    time: SystemTime,
    branch_ref: Option<BranchRef>,
    checked: Instant,
}

/// How the kernel may cache an open file's pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageCache {
    /// The inode's content can never change: keep pages across opens.
    Keep,
    /// Generated content with no fixed size (control files): direct I/O.
    Bypass,
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
    /// One version of a file: the inode number includes the content's
    /// identity, so an inode's bytes never change and a reader's pages are
    /// never replaced by a newer version's.
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
    Dir(Vec<(String, Kind, u64)>),
    Control(Bytes),
}

/// A snapshot of a file at open: its content never changes under a reader.
pub struct FileHandle {
    file: File,
    chunks: Vec<ChunkRef>,
    /// Start offset of each chunk.
    starts: Vec<u64>,
    readahead: Mutex<ReadAhead>,
}

#[derive(Default)]
struct ReadAhead {
    next: u64,
    window: usize,
}

pub struct LakeFs {
    lake: Arc<Lake>,
    cache: Arc<ChunkCache>,
    cfg: FsConfig,
    started: SystemTime,
    nodes: Mutex<HashMap<u64, Node>>,
    views: Mutex<HashMap<(String, String), Arc<View>>>,
    next_view: AtomicU64,
    negative: Mutex<HashMap<(String, String), Instant>>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_handle: AtomicU64,
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

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}/{name}")
    }
}

fn time_of_ns(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH
    }
}

impl LakeFs {
    pub fn new(lake: Arc<Lake>, cache: Arc<ChunkCache>, cfg: FsConfig) -> Result<LakeFs> {
        let fs = LakeFs {
            lake,
            cache,
            cfg,
            started: SystemTime::now(),
            nodes: Mutex::new(HashMap::new()),
            views: Mutex::new(HashMap::new()),
            next_view: AtomicU64::new(1),
            negative: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
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
        Ok(fs)
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
        self.nodes.lock().entry(ino).or_insert(node);
        ino
    }

    fn file_ino(view: &View, path: &str, file: &File) -> u64 {
        let content = postcard::to_allocvec(&file.content).expect("content encodes");
        ino_of(&[
            b"file",
            &view.id.to_le_bytes(),
            path.as_bytes(),
            &file.size.to_le_bytes(),
            &content,
        ])
    }

    /// The inode for an entry found at `path` in a view.
    fn entry_node(&self, view: &Arc<View>, path: String, entry: &Entry) -> u64 {
        match entry {
            Entry::File(f) => self.remember(
                Self::file_ino(view, &path, f),
                Node::File {
                    view: view.clone(),
                    path,
                    file: f.clone(),
                },
            ),
            _ => self.remember(
                Self::tree_ino(view, &path),
                Node::Tree {
                    view: view.clone(),
                    path,
                },
            ),
        }
    }

    fn tree_ino(view: &View, path: &str) -> u64 {
        if path.is_empty() {
            ino_of(&[b"view", &view.id.to_le_bytes()])
        } else {
            ino_of(&[b"tree", &view.id.to_le_bytes(), path.as_bytes()])
        }
    }

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
        let state = match &resolved.branch {
            Some(b) => self.read_branch(repo, b)?,
            None => {
                let c = self.lake.commit(repo, &resolved.commit)?;
                ViewState {
                    commit: resolved.commit,
                    root: c.tree,
                    time: UNIX_EPOCH + Duration::from_millis(c.time.max(0) as u64),
                    branch_ref: None,
                    checked: Instant::now(),
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
        });
        Ok(self.views.lock().entry(key).or_insert(view).clone())
    }

    /// A branch's working tree as the store has it now.
    fn read_branch(&self, repo: &str, branch: &str) -> Result<ViewState> {
        let (r, _) = self.lake.branch(repo, branch)?;
        let (_, root) = self.lake.working_tree(repo, branch)?;
        let commit = Hash::from_hex(&r.commit).ok_or(FsError::NotFound)?;
        let c = self.lake.commit(repo, &commit)?;
        Ok(ViewState {
            commit,
            root,
            time: UNIX_EPOCH + Duration::from_millis(c.time.max(0) as u64),
            branch_ref: Some(r),
            checked: Instant::now(),
        })
    }

    /// The current state of a view, refreshing a branch once its metadata
    /// TTL has passed. Only one thread refreshes a view at a time; the
    /// others keep using the state they have, so no one waits on the store
    /// while holding a lock others need.
    fn state(&self, view: &View) -> Result<ViewState> {
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
        let (r, _) = self.lake.branch(&view.repo, branch)?;
        if Some(&r) == current.branch_ref.as_ref() {
            view.state.lock().checked = Instant::now();
            return Ok(current);
        }
        let fresh = self.read_branch(&view.repo, branch)?;
        *view.state.lock() = fresh.clone();
        Ok(fresh)
    }

    fn ttl(&self, view: &View) -> Duration {
        if view.branch.is_some() {
            self.cfg.metadata_ttl
        } else {
            IMMUTABLE_TTL
        }
    }

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

    fn writable(&self, view: &View) -> bool {
        !self.cfg.read_only && view.branch.is_some() && super::WRITES_ENABLED
    }

    fn entry_attr(&self, ino: u64, view: &View, state: &ViewState, entry: &Entry) -> Attr {
        let ttl = self.ttl(view);
        match entry {
            Entry::Dir(_) => self.dir_attr(ino, state.time, ttl, self.writable(view)),
            Entry::File(f) => Attr {
                ino,
                kind: Kind::File,
                size: f.size,
                perm: if self.writable(view) {
                    (f.mode & 0o7777) as u16
                } else {
                    (f.mode & 0o7555) as u16
                },
                nlink: 1,
                mtime: time_of_ns(f.mtime),
                uid: self.cfg.uid,
                gid: self.cfg.gid,
                ttl,
            },
            Entry::Symlink(t) => Attr {
                ino,
                kind: Kind::Symlink,
                size: t.len() as u64,
                perm: 0o777,
                nlink: 1,
                mtime: state.time,
                uid: self.cfg.uid,
                gid: self.cfg.gid,
                ttl,
            },
        }
    }

    fn control_attr(&self, ino: u64, file: ControlFile) -> Attr {
        Attr {
            ino,
            kind: Kind::File,
            // Contents are made at open and read with direct I/O.
            size: 0,
            perm: if file == ControlFile::Ctl {
                0o644
            } else {
                0o444
            },
            nlink: 1,
            mtime: self.started,
            uid: self.cfg.uid,
            gid: self.cfg.gid,
            ttl: Duration::ZERO,
        }
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        match self.node(ino)? {
            Node::Root => Ok(self.dir_attr(ino, self.started, self.cfg.metadata_ttl, false)),
            Node::Repo(_) => Ok(self.dir_attr(ino, self.started, self.cfg.metadata_ttl, false)),
            Node::ControlDir(_) => Ok(self.dir_attr(ino, self.started, Duration::ZERO, false)),
            Node::Control(_, f) => Ok(self.control_attr(ino, f)),
            Node::File { view, path, file } => {
                // Metadata (mode, mtime) of the same content follows the
                // branch; an older version keeps what it had.
                let state = self.state(&view)?;
                let entry = match self.lake.trees().lookup(&state.root, &path)? {
                    Some(Entry::File(f)) if f.content == file.content && f.size == file.size => {
                        Entry::File(f)
                    }
                    _ => Entry::File(file),
                };
                Ok(self.entry_attr(ino, &view, &state, &entry))
            }
            Node::Tree { view, path } => {
                let state = self.state(&view)?;
                let entry = self
                    .lake
                    .trees()
                    .lookup(&state.root, &path)?
                    .ok_or(FsError::NotFound)?;
                Ok(self.entry_attr(ino, &view, &state, &entry))
            }
        }
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Result<Attr> {
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
                    Self::tree_ino(&view, ""),
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
                let state = self.state(&view)?;
                let child = join(&path, name);
                let entry = match self.lake.trees().lookup(&state.root, &path)? {
                    Some(Entry::Dir(h)) => self.lake.trees().get(&h, name)?,
                    Some(_) => return Err(FsError::NotADirectory),
                    None => return Err(FsError::NotFound),
                }
                .ok_or(FsError::NotFound)?;
                let ino = self.entry_node(&view, child, &entry);
                Ok(self.entry_attr(ino, &view, &state, &entry))
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
            return Err(FsError::NotSupported);
        };
        let state = self.state(&view)?;
        match self.lake.trees().lookup(&state.root, &path)? {
            Some(Entry::Symlink(t)) => Ok(t),
            Some(_) => Err(FsError::NotSupported),
            None => Err(FsError::NotFound),
        }
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, h);
        fh
    }

    pub fn release(&self, fh: u64) {
        self.handles.lock().remove(&fh);
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
                        Some(v) => Self::tree_ino(v, ""),
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
                let Some(Entry::Dir(dir)) = self.lake.trees().lookup(&state.root, &path)? else {
                    return Err(FsError::NotADirectory);
                };
                self.lake
                    .trees()
                    .entries(&dir)?
                    .into_iter()
                    .map(|(name, e)| {
                        let child = join(&path, &name);
                        let (kind, ino) = match &e {
                            Entry::Dir(_) => (Kind::Dir, Self::tree_ino(&view, &child)),
                            Entry::File(f) => (Kind::File, Self::file_ino(&view, &child, f)),
                            Entry::Symlink(_) => (Kind::Symlink, Self::tree_ino(&view, &child)),
                        };
                        (name, kind, ino)
                    })
                    .collect()
            }
        };
        Ok(self.add_handle(Handle::Dir(entries)))
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
        let Some(Handle::Dir(entries)) = handles.get(&fh) else {
            return Err(FsError::BadHandle);
        };
        for (i, (name, kind, ino)) in entries.iter().enumerate().skip(offset) {
            if add(*ino, i + 1, *kind, name) {
                break;
            }
        }
        Ok(())
    }

    /// Open a file for reading; returns the handle and how the kernel may
    /// cache its pages.
    pub fn open(&self, ino: u64, write: bool) -> Result<(u64, PageCache)> {
        match self.node(ino)? {
            Node::File { view, file, .. } => {
                if write {
                    return Err(FsError::ReadOnly);
                }
                let chunks = self.lake.trees().chunk_list(&file.content)?;
                let mut starts = Vec::with_capacity(chunks.len());
                let mut at = 0;
                for c in &chunks {
                    starts.push(at);
                    at += c.len as u64;
                }
                let handle = FileHandle {
                    file,
                    chunks,
                    starts,
                    readahead: Mutex::new(ReadAhead::default()),
                };
                let _ = view;
                // This inode's content never changes: keep its pages.
                Ok((
                    self.add_handle(Handle::File(Arc::new(handle))),
                    PageCache::Keep,
                ))
            }
            Node::Tree { view, path } => {
                let state = self.state(&view)?;
                match self.lake.trees().lookup(&state.root, &path)? {
                    Some(Entry::Dir(_)) => Err(FsError::IsADirectory),
                    Some(_) => Err(FsError::NotSupported),
                    None => Err(FsError::NotFound),
                }
            }
            Node::Control(view, f) => {
                if write {
                    return Err(FsError::ReadOnly);
                }
                let text = self.control_text(&view, f)?;
                Ok((
                    self.add_handle(Handle::Control(Bytes::from(text))),
                    PageCache::Bypass,
                ))
            }
            Node::Root | Node::Repo(_) | Node::ControlDir(_) => Err(FsError::IsADirectory),
        }
    }

    fn control_text(&self, view: &View, f: ControlFile) -> Result<String> {
        let state = self.state(view)?;
        Ok(match f {
            ControlFile::Head => format!("{}\n", state.commit.to_hex()),
            ControlFile::Status => {
                let base = self.lake.commit(&view.repo, &state.commit)?.tree;
                let mut out = String::new();
                for c in self.lake.diff_trees(&base, &state.root)? {
                    let mark = match c.kind {
                        crate::repo::ChangeKind::Added => 'A',
                        crate::repo::ChangeKind::Removed => 'D',
                        crate::repo::ChangeKind::Modified => 'M',
                    };
                    out.push_str(&format!("{mark} {}\n", c.path));
                }
                out
            }
            ControlFile::Result | ControlFile::Ctl => String::new(),
        })
    }

    /// Read up to `size` bytes at `offset` from an open file.
    pub fn read(&self, fh: u64, offset: u64, size: usize) -> Result<Bytes> {
        let handle = match self.handles.lock().get(&fh) {
            Some(Handle::File(f)) => f.clone(),
            Some(Handle::Control(b)) => {
                let start = (offset as usize).min(b.len());
                let end = (start + size).min(b.len());
                return Ok(b.slice(start..end));
            }
            _ => return Err(FsError::BadHandle),
        };
        read_file(&self.cache, &handle, offset, size)
    }

    /// Numbers for `statfs`: the lake has no fixed size, so report plenty.
    pub fn statfs(&self) -> (u64, u64) {
        (1 << 40, 1 << 30)
    }
}

/// Read from a file snapshot, fetching chunks through the cache and
/// scheduling read-ahead for sequential readers.
fn read_file(cache: &ChunkCache, h: &FileHandle, offset: u64, size: usize) -> Result<Bytes> {
    let end = (offset + size as u64).min(h.file.size);
    if offset >= end {
        return Ok(Bytes::new());
    }
    match &h.file.content {
        Content::Inline(b) => return Ok(Bytes::copy_from_slice(&b[offset as usize..end as usize])),
        Content::External(_) => return Err(FsError::NotSupported),
        Content::Chunks(_) | Content::Manifest(_) => {}
    }
    let first = h.starts.partition_point(|s| *s <= offset) - 1;
    // Sequential reads grow the read-ahead window; a jump resets it.
    let window = {
        let mut ra = h.readahead.lock();
        ra.window = if offset == ra.next && offset > 0 {
            (ra.window * 2).clamp(2, MAX_READAHEAD_CHUNKS)
        } else if offset == 0 {
            2
        } else {
            0
        };
        ra.next = end;
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
