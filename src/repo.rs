//! Repositories, commits, branches, tags, ref expressions, staging, and the
//! ref-update protocol (DESIGN.md: "Staging and the ref-update protocol").
//!
//! Owns every key under `repos/` and `lake.json`. Builds on `tree` (to
//! apply staged ops) and `chunk` (to store file bytes); must not know about
//! the CLI, the mount or hooks.

use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::chunk::{self, ChunkParams, Stored};
use crate::hash::Hash;
use crate::store::{Cas, Store, StoreError, Version};
use crate::tree::{self, Content, Entry, File, Op, TreeError, Trees};

mod checks;
#[cfg(test)]
mod decode_tests;
#[cfg(test)]
mod fault_tests;
mod fsck;
mod import;
mod merge;
pub use checks::{CheckFailure, EventKind, HookEvent, Hooks};
pub use fsck::{FsckOptions, FsckReport};
pub use import::{read_external, ExportSummary, ImportOptions, ImportSummary, EXTERNAL_PIECE};
pub use merge::{MergeOptions, MergeOutcome, Strategy};

pub const LAKE_FORMAT: u32 = 1;
pub const COMMIT_FORMAT: u8 = 1;
pub const BATCH_FORMAT: u8 = 1;

/// A commit or merge that keeps losing the race for its ref gives up after
/// this many rounds with a "concurrent update" error.
const CAS_ROUNDS: u32 = 30;

/// How far back along first parents a commit looks for batches it must not
/// apply twice (see `Lake::commit`).
const DEDUP_WALK: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error(transparent)]
    Chunk(#[from] chunk::ChunkError),
    #[error(transparent)]
    Source(#[from] crate::store::source::SourceError),
    #[error("no lake at {0}: run `tarn init` first")]
    NoLake(String),
    #[error("lake at {url} has format {found}; this tarn reads format {LAKE_FORMAT}")]
    LakeFormat { url: String, found: u32 },
    #[error("invalid {kind} name {name:?}: use letters, digits, '_', '.', '-' (not first), at most 128 characters")]
    BadName { kind: &'static str, name: String },
    #[error("repository {0} does not exist")]
    NoRepo(String),
    #[error("repository {0} already exists")]
    RepoExists(String),
    #[error("branch {repo}/{branch} does not exist")]
    NoBranch { repo: String, branch: String },
    #[error("branch {repo}/{branch} already exists")]
    BranchExists { repo: String, branch: String },
    #[error("tag {repo}/{tag} already exists")]
    TagExists { repo: String, tag: String },
    #[error("tag {repo}/{tag} does not exist")]
    NoTag { repo: String, tag: String },
    #[error("unknown ref {expr:?} in repository {repo}: not a branch, tag or commit id")]
    UnknownRef { repo: String, expr: String },
    #[error("ambiguous commit prefix {prefix:?} in repository {repo}: give more digits")]
    AmbiguousRef { repo: String, prefix: String },
    #[error("bad ref expression {0:?}: expected NAME, NAME~N or NAME^N")]
    BadRefExpr(String),
    #[error("commit {commit} has no parent {n} (in {expr})")]
    NoParent {
        expr: String,
        commit: String,
        n: usize,
    },
    #[error("bad address {0:?}: expected REPO/REF[/PATH]")]
    BadAddress(String),
    #[error("{0} is not a branch: commits, tags and ~N refs are read-only")]
    NotABranch(String),
    #[error("cannot delete {repo}/{branch}: it is the repository's default branch")]
    DefaultBranch { repo: String, branch: String },
    #[error("nothing to commit on {repo}/{branch}")]
    NothingToCommit { repo: String, branch: String },
    #[error("concurrent update of {0}: another writer kept winning; try again")]
    Concurrent(String),
    #[error("object {key} cannot be decoded (corrupt or from a newer tarn)")]
    Decode { key: String },
    #[error("{0}: no such file or directory")]
    NotFound(String),
    #[error("unknown merge strategy {0:?}: use source-wins or dest-wins")]
    BadStrategy(String),
    #[error("{what}: conflict in {} path(s): {}", paths.len(), paths.join(", "))]
    Conflict { what: String, paths: Vec<String> },
    #[error("commit {0} has no parent: nothing to revert against")]
    Unrevertable(String),
    #[error("commit {0} is a merge: say which parent to revert against with -m N")]
    NeedParent(String),
    #[error("{path}: {why}")]
    BadPath { path: String, why: String },
    #[error("branch {repo}/{branch} is protected: only merges that pass its checks change it (tarn branch unprotect to lift)")]
    Protected { repo: String, branch: String },
    #[error("repository {0} is read-only (tarn repo read-write to lift)")]
    ReadOnlyRepo(String),
    #[error("{0}")]
    CheckFailed(Box<CheckFailure>),
    #[error("hook run {0} not found")]
    NoRun(String),
    #[error("{path}: {source}")]
    Local {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, RepoError>;

/// `lake.json`: written once by `tarn init`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LakeConfig {
    pub format: u32,
    pub chunking: ChunkParams,
    pub inline_max: u64,
    pub created: String,
}

/// `repos/<repo>/repo.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepoConfig {
    pub default_branch: String,
    pub created: String,
    /// Branches that change only by merges that pass their checks.
    #[serde(default)]
    pub protected: Vec<String>,
    /// Nothing in the repository changes: no staging, commits, merges,
    /// branches or tags.
    #[serde(default)]
    pub read_only: bool,
}

/// A branch ref: its head commit, the staging token writers append to now,
/// and tokens sealed by a commit in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchRef {
    pub commit: String,
    pub staging: String,
    #[serde(default)]
    pub sealed: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRef {
    pub commit: String,
}

/// Staging batches a commit consumed, per token (so a batch re-put under a
/// later token is never applied twice).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consumed {
    pub token: String,
    pub batches: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    pub tree: Hash,
    pub parents: Vec<Hash>,
    pub author: String,
    /// Milliseconds since the Unix epoch (display only: order comes from parents).
    pub time: i64,
    pub message: String,
    pub meta: BTreeMap<String, String>,
    /// 1 + the largest parent generation; the initial commit has 1.
    pub generation: u64,
    pub consumed: Vec<Consumed>,
}

impl Commit {
    pub fn encode(&self) -> Vec<u8> {
        tree::encode_tagged(COMMIT_FORMAT, self, 512)
    }

    pub fn decode(bytes: &[u8]) -> Option<Commit> {
        match bytes.split_first() {
            Some((&COMMIT_FORMAT, rest)) => postcard::from_bytes(rest).ok(),
            _ => None,
        }
    }
}

/// One appended group of staged ops: `repos/<repo>/staging/<token>/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagingBatch {
    /// A ULID: batches apply in id order.
    pub id: String,
    /// Tokens this batch was put under before (it is re-put when its token
    /// was sealed before the writer could confirm it was seen).
    pub prior: Vec<String>,
    pub ops: Vec<Op>,
}

impl StagingBatch {
    pub fn encode(&self) -> Vec<u8> {
        tree::encode_tagged(
            BATCH_FORMAT,
            self,
            64 + self.ops.iter().map(Op::encoded_size).sum::<usize>(),
        )
    }

    pub fn decode(bytes: &[u8]) -> Option<StagingBatch> {
        match bytes.split_first() {
            Some((&BATCH_FORMAT, rest)) => postcard::from_bytes(rest).ok(),
            _ => None,
        }
    }
}

/// A resolved ref: the commit, and the branch when the expression named one.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub commit: Hash,
    pub branch: Option<String>,
}

/// `REPO/REF[/PATH]`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub repo: String,
    pub reference: Option<String>,
    pub path: String,
}

impl Address {
    pub fn parse(s: &str) -> Result<Address> {
        let bad = || RepoError::BadAddress(s.to_string());
        let mut parts = s.trim_start_matches('/').splitn(3, '/');
        let repo = parts.next().filter(|r| !r.is_empty()).ok_or_else(bad)?;
        check_name("repository", repo)?;
        let reference = parts.next().filter(|r| !r.is_empty()).map(str::to_string);
        let path =
            tree::check_path(parts.next().unwrap_or("")).map_err(|e| RepoError::BadPath {
                path: s.to_string(),
                why: e.to_string(),
            })?;
        Ok(Address {
            repo: repo.to_string(),
            reference,
            path,
        })
    }

    /// The ref, or an error saying the address needs one.
    pub fn reference(&self) -> Result<&str> {
        self.reference
            .as_deref()
            .ok_or_else(|| RepoError::BadAddress(format!("{} (no branch or ref)", self.repo)))
    }
}

/// Repos, branches and tags: `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`.
pub fn check_name(kind: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(RepoError::BadName {
            kind,
            name: name.to_string(),
        })
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn now_rfc3339ish() -> String {
    format!("{}", now_ms())
}

/// Who is committing: `$TARN_AUTHOR`, else `$USER`, else the login name of
/// the current uid.
pub fn default_author() -> String {
    if let Ok(a) = std::env::var("TARN_AUTHOR").or_else(|_| std::env::var("USER")) {
        return a;
    }
    // SAFETY: getpwuid returns a pointer to static storage or null; we copy
    // the name out before any other call could overwrite it.
    unsafe {
        let pw = libc::getpwuid(libc::getuid());
        if !pw.is_null() && !(*pw).pw_name.is_null() {
            return std::ffi::CStr::from_ptr((*pw).pw_name)
                .to_string_lossy()
                .into_owned();
        }
    }
    format!("uid-{}", unsafe { libc::getuid() })
}

fn new_token() -> String {
    ulid::Ulid::new().to_string()
}

/// Batch ids order staged changes. ULIDs from one process are strictly
/// increasing, so one writer's batches apply in the order it staged them;
/// and an id is always above `after`, the largest id the writer has seen
/// on the branch, so a change made after seeing another applies after it
/// even when this machine's clock is behind that writer's (a hybrid
/// logical clock: causality first, wall time only to break ties).
fn next_batch_id(after: Option<&str>) -> String {
    static GEN: parking_lot::Mutex<Option<ulid::Generator>> = parking_lot::Mutex::new(None);
    let mut g = GEN.lock();
    let gen = g.get_or_insert_with(ulid::Generator::new);
    let id = gen.generate().unwrap_or_else(|_| ulid::Ulid::new());
    let floor = after.and_then(|a| ulid::Ulid::from_string(a).ok());
    match floor {
        // Above the floor by a random step, not by one: writers that saw
        // the same newest batch (in the same millisecond) would otherwise
        // all pick the same next id.
        Some(f) if id <= f => {
            let step = 1 + u128::from(rand::random::<u32>());
            ulid::Ulid(f.0.saturating_add(step)).to_string()
        }
        _ => id.to_string(),
    }
}

/// Options for a commit.
#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    pub message: String,
    pub author: Option<String>,
    pub meta: BTreeMap<String, String>,
    /// Create a commit even when nothing changed.
    pub allow_empty: bool,
}

/// One changed path between two trees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub path: String,
    pub kind: ChangeKind,
    pub size_before: Option<u64>,
    pub size_after: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Added,
    Removed,
    Modified,
}

/// A branch as the mount shows it: see `Lake::working_state`.
#[derive(Debug, Clone)]
pub struct WorkingState {
    pub branch_ref: BranchRef,
    pub head: Hash,
    pub commit_time: i64,
    pub base: Hash,
    pub root: Hash,
    pub batches: HashSet<String>,
}

/// What a writer knows of a branch's staging when it stages.
#[derive(Debug, Clone, Default)]
pub struct StageHint {
    /// The staging token it last saw on the branch ref.
    pub token: String,
    /// The newest batch id it has seen there: its batch applies after it.
    pub seen: Option<String>,
    /// The batch id, when the writer chose it already (`Lake::new_batch_id`).
    pub id: Option<String>,
}

/// What `put` did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct PutSummary {
    pub files: u64,
    pub bytes: u64,
    pub chunks: u64,
    pub new_chunks: u64,
}

/// An open lake: the store, its tree handle and its configuration.
pub struct Lake {
    store: Store,
    trees: Trees,
    config: LakeConfig,
    hooks: Option<Arc<dyn Hooks>>,
    /// Post-event check failures not yet reported (see `take_warnings`).
    warnings: parking_lot::Mutex<Vec<String>>,
    background_cleanup: bool,
    /// Where a big commit's tree checkpoints spill (see `COMMIT_HOLD`);
    /// the system's temporary directory if unset.
    spill_dir: Option<PathBuf>,
    /// `COMMIT_HOLD`, smaller in tests.
    commit_hold: usize,
}

/// A commit applies staged ops holding at most about this many bytes of
/// them: past it, what is applied so far moves to a local spill. As much as
/// a mount's branch view holds before it spills: commits of everyday size
/// never touch the disk, and one of a million small files stays well
/// inside a small machine's memory.
const COMMIT_HOLD: usize = 256 << 20;

/// Which staged batches recent first-parent commits of a head consumed,
/// looked up only for the tokens a re-put batch names (`prior`).
struct Applied {
    head: Hash,
    asked: HashSet<String>,
    batches: HashSet<String>,
}

impl Applied {
    fn new(head: Hash) -> Applied {
        Applied {
            head,
            asked: HashSet::new(),
            batches: HashSet::new(),
        }
    }

    /// Did a commit consume batch `id` under one of `prior`?
    fn any(&mut self, lake: &Lake, repo: &str, prior: &[String], id: &str) -> Result<bool> {
        let mut wanted: HashSet<String> = prior
            .iter()
            .filter(|t| !self.asked.contains(*t))
            .cloned()
            .collect();
        self.asked.extend(wanted.iter().cloned());
        let mut at = Some(self.head);
        let mut steps = 0;
        while let Some(c) = at {
            if wanted.is_empty() || steps == DEDUP_WALK {
                break;
            }
            let c = lake.commit(repo, &c)?;
            for consumed in c.consumed {
                if wanted.remove(&consumed.token) {
                    self.batches.extend(consumed.batches);
                }
            }
            at = c.parents.first().copied();
            steps += 1;
        }
        Ok(self.batches.contains(id))
    }
}

impl Lake {
    /// Create the lake's `lake.json` if there is none; opening an existing
    /// lake is not an error.
    pub fn init(store: Store) -> Result<(Lake, bool)> {
        let config = LakeConfig {
            format: LAKE_FORMAT,
            chunking: ChunkParams::default(),
            inline_max: chunk::INLINE_MAX,
            created: now_rfc3339ish(),
        };
        let bytes = serde_json::to_vec_pretty(&config).expect("json");
        let created = store.put_if_absent("lake.json", Bytes::from(bytes))?;
        Ok((Lake::open(store)?, created))
    }

    pub fn open(store: Store) -> Result<Lake> {
        let bytes = store
            .get("lake.json")?
            .ok_or_else(|| RepoError::NoLake(store.url().to_string()))?;
        let config: LakeConfig = serde_json::from_slice(&bytes).map_err(|_| RepoError::Decode {
            key: "lake.json".into(),
        })?;
        if config.format != LAKE_FORMAT {
            return Err(RepoError::LakeFormat {
                url: store.url().to_string(),
                found: config.format,
            });
        }
        Ok(Lake {
            trees: Trees::new(store.clone()),
            store,
            config,
            hooks: None,
            warnings: Default::default(),
            background_cleanup: false,
            spill_dir: None,
            commit_hold: COMMIT_HOLD,
        })
    }

    /// Delete staging objects a commit consumed. A long-running process
    /// (the mount daemon) does it in the background, so a commit returns as
    /// soon as its ref has moved; leftovers of an interrupted cleanup are
    /// unreferenced and harmless.
    fn cleanup(&self, prefixes: Vec<String>) {
        let store = self.store.clone();
        let delete = move || {
            for p in prefixes {
                let _ = store.delete_prefix(&p);
            }
        };
        if self.background_cleanup {
            std::thread::spawn(move || {
                crate::thread_class::leave_inherited_idle();
                delete()
            });
        } else {
            delete();
        }
    }

    /// Delete consumed staging objects in the background (see `cleanup`).
    pub fn set_background_cleanup(&mut self, on: bool) {
        self.background_cleanup = on;
    }

    /// Spill big commits' trees under `dir` (a daemon's spool on its cache
    /// disk) rather than the system's temporary directory.
    pub fn set_spill_dir(&mut self, dir: PathBuf) {
        self.spill_dir = Some(dir);
    }

    /// For a process that reads trees and stages ops but writes no tree
    /// (the CLI's ls, cat, get, status, diff, rm): the working trees it
    /// computes stay in a handle that never writes them to the store and,
    /// past `COMMIT_HOLD`, spills them to local disk instead of holding them.
    pub fn read_trees_only(&mut self) {
        self.trees = self.spilling_trees();
    }

    /// A tree handle of its own (for one commit, or a reading process):
    /// spills (if it must) to a directory of its own, removed with it.
    fn spilling_trees(&self) -> Trees {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base = self.spill_dir.clone().unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("tarn-trees-{}-{n}", std::process::id()));
        self.trees.scratch_spilling(dir)
    }

    /// Run these hooks for every commit, merge and branch or tag creation.
    pub fn set_hooks(&mut self, hooks: Arc<dyn Hooks>) {
        self.hooks = Some(hooks);
    }

    pub fn hooks(&self) -> Option<&Arc<dyn Hooks>> {
        self.hooks.as_ref()
    }

    /// Post-event check failures since the last call, one line each.
    pub fn take_warnings(&self) -> Vec<String> {
        std::mem::take(&mut *self.warnings.lock())
    }

    fn pre_event(&self, event: &HookEvent) -> Result<()> {
        match &self.hooks {
            Some(h) => h.pre(self, event),
            None => Ok(()),
        }
    }

    /// The post-event of `event` for the published `commit`.
    fn post_event(&self, event: &HookEvent, commit: Hash) {
        if let Some(h) = &self.hooks {
            let post = HookEvent {
                kind: event.kind.post(),
                commit,
                ..event.clone()
            };
            let failed = h.post(self, &post);
            self.warnings.lock().extend(failed);
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn trees(&self) -> &Trees {
        &self.trees
    }

    pub fn config(&self) -> &LakeConfig {
        &self.config
    }

    // ---- repositories ----

    fn repo_key(repo: &str, rest: &str) -> String {
        format!("repos/{repo}/{rest}")
    }

    pub fn repo_config(&self, repo: &str) -> Result<RepoConfig> {
        check_name("repository", repo)?;
        let bytes = self
            .store
            .get(&Self::repo_key(repo, "repo.json"))?
            .ok_or_else(|| RepoError::NoRepo(repo.to_string()))?;
        serde_json::from_slice(&bytes).map_err(|_| RepoError::Decode {
            key: Self::repo_key(repo, "repo.json"),
        })
    }

    /// Change `repo.json` by compare-and-swap (protection and read-only
    /// flags change rarely, but two admins must not undo each other).
    fn update_repo_config(
        &self,
        repo: &str,
        change: impl Fn(&mut RepoConfig),
    ) -> Result<RepoConfig> {
        check_name("repository", repo)?;
        let key = Self::repo_key(repo, "repo.json");
        for _ in 0..CAS_ROUNDS {
            let (bytes, v) = self
                .store
                .get_versioned(&key)?
                .ok_or_else(|| RepoError::NoRepo(repo.to_string()))?;
            let mut cfg: RepoConfig = serde_json::from_slice(&bytes)
                .map_err(|_| RepoError::Decode { key: key.clone() })?;
            change(&mut cfg);
            let bytes = serde_json::to_vec_pretty(&cfg).expect("json");
            if let Cas::Done(_) = self.store.cas(&key, Some(&v), Bytes::from(bytes))? {
                return Ok(cfg);
            }
        }
        Err(RepoError::Concurrent(format!("{repo}/repo.json")))
    }

    /// Protect a branch (only merges that pass its checks change it) or
    /// lift the protection.
    pub fn set_protected(&self, repo: &str, branch: &str, on: bool) -> Result<()> {
        self.branch(repo, branch)?;
        self.update_repo_config(repo, |cfg| {
            cfg.protected.retain(|b| b != branch);
            if on {
                cfg.protected.push(branch.to_string());
                cfg.protected.sort();
            }
        })?;
        Ok(())
    }

    /// Make a whole repository read-only, or writable again.
    pub fn set_read_only(&self, repo: &str, on: bool) -> Result<()> {
        self.update_repo_config(repo, |cfg| cfg.read_only = on)?;
        Ok(())
    }

    /// Refuse any change to a read-only repository.
    pub fn check_repo_writable(&self, repo: &str) -> Result<RepoConfig> {
        let cfg = self.repo_config(repo)?;
        if cfg.read_only {
            return Err(RepoError::ReadOnlyRepo(repo.to_string()));
        }
        Ok(cfg)
    }

    /// Refuse direct changes (staging, commits, resets, reverts) to a
    /// protected branch or a read-only repository.
    pub fn check_direct_write(&self, repo: &str, branch: &str) -> Result<()> {
        let cfg = self.check_repo_writable(repo)?;
        if cfg.protected.iter().any(|b| b == branch) {
            return Err(RepoError::Protected {
                repo: repo.to_string(),
                branch: branch.to_string(),
            });
        }
        Ok(())
    }

    // ---- hook runs ----

    fn run_key(repo: &str, id: &str) -> String {
        Self::repo_key(repo, &format!("runs/{id}"))
    }

    /// Store the record of one hook run (an opaque JSON document, written
    /// once under a ULID so runs list in time order).
    pub fn record_run(&self, repo: &str, id: &str, record: &[u8]) -> Result<()> {
        check_name("run id", id)?;
        self.store
            .put_if_absent(&Self::run_key(repo, id), Bytes::copy_from_slice(record))?;
        Ok(())
    }

    /// Ids of the recorded hook runs of a repository, oldest first.
    pub fn list_runs(&self, repo: &str) -> Result<Vec<String>> {
        self.repo_config(repo)?;
        let mut ids = self.store.list_files(&Self::repo_key(repo, "runs"))?;
        ids.sort();
        Ok(ids)
    }

    pub fn read_run(&self, repo: &str, id: &str) -> Result<Vec<u8>> {
        check_name("run id", id).map_err(|_| RepoError::NoRun(id.to_string()))?;
        let bytes = self
            .store
            .get(&Self::run_key(repo, id))?
            .ok_or_else(|| RepoError::NoRun(id.to_string()))?;
        Ok(bytes.to_vec())
    }

    /// Create a repository with an empty initial commit on its default branch.
    pub fn create_repo(&self, repo: &str, default_branch: &str) -> Result<Hash> {
        check_name("repository", repo)?;
        check_name("branch", default_branch)?;
        let commit = Commit {
            tree: self.trees.empty_dir(),
            parents: vec![],
            author: default_author(),
            time: now_ms(),
            message: "repository created".into(),
            meta: BTreeMap::new(),
            generation: 1,
            consumed: vec![],
        };
        self.trees.flush()?;
        let id = self.write_commit(repo, &commit)?;
        let cfg = RepoConfig {
            default_branch: default_branch.to_string(),
            created: now_rfc3339ish(),
            protected: vec![],
            read_only: false,
        };
        let bytes = serde_json::to_vec_pretty(&cfg).expect("json");
        if !self
            .store
            .put_if_absent(&Self::repo_key(repo, "repo.json"), Bytes::from(bytes))?
        {
            return Err(RepoError::RepoExists(repo.to_string()));
        }
        self.create_branch_at(repo, default_branch, id)?;
        Ok(id)
    }

    pub fn list_repos(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        // A local lake can keep an empty directory after a delete.
        for name in self.store.list_dirs("repos")? {
            if self.store.exists(&Self::repo_key(&name, "repo.json"))? {
                out.push(name);
            }
        }
        Ok(out)
    }

    /// Delete a repository's refs, commits and staging. Content shared with
    /// other repositories stays (garbage collection decides about it).
    pub fn delete_repo(&self, repo: &str) -> Result<()> {
        self.repo_config(repo)?;
        // Refs first, so a half-finished delete never leaves refs pointing
        // at deleted commits; repo.json last, so it can be retried.
        self.store.delete_prefix(&Self::repo_key(repo, "refs"))?;
        self.store.delete_prefix(&Self::repo_key(repo, "staging"))?;
        self.store.delete_prefix(&Self::repo_key(repo, "commits"))?;
        self.store.delete(&Self::repo_key(repo, "repo.json"))?;
        Ok(())
    }

    // ---- commits ----

    fn commit_key(repo: &str, id: &Hash) -> String {
        Self::repo_key(repo, &id.key("commits"))
    }

    fn write_commit(&self, repo: &str, c: &Commit) -> Result<Hash> {
        let bytes = c.encode();
        let id = Hash::of(&bytes);
        self.store
            .put_if_absent(&Self::commit_key(repo, &id), Bytes::from(bytes))?;
        Ok(id)
    }

    pub fn commit(&self, repo: &str, id: &Hash) -> Result<Commit> {
        let key = Self::commit_key(repo, id);
        let bytes = self.store.get_verified(&key, id)?;
        Commit::decode(&bytes).ok_or(RepoError::Decode { key })
    }

    // ---- branches and tags ----

    fn branch_key(repo: &str, branch: &str) -> String {
        Self::repo_key(repo, &format!("refs/branches/{branch}"))
    }

    fn tag_key(repo: &str, tag: &str) -> String {
        Self::repo_key(repo, &format!("refs/tags/{tag}"))
    }

    pub fn branch(&self, repo: &str, branch: &str) -> Result<(BranchRef, Version)> {
        check_name("branch", branch)?;
        match self.store.get_versioned(&Self::branch_key(repo, branch))? {
            Some((bytes, v)) => {
                let r = serde_json::from_slice(&bytes).map_err(|_| RepoError::Decode {
                    key: Self::branch_key(repo, branch),
                })?;
                Ok((r, v))
            }
            None => {
                self.repo_config(repo)?;
                Err(RepoError::NoBranch {
                    repo: repo.to_string(),
                    branch: branch.to_string(),
                })
            }
        }
    }

    fn branch_head(&self, repo: &str, branch: &str) -> Result<Hash> {
        let (r, _) = self.branch(repo, branch)?;
        self.parse_id(repo, &r.commit)
    }

    fn parse_id(&self, repo: &str, hex: &str) -> Result<Hash> {
        Hash::from_hex(hex).ok_or_else(|| RepoError::Decode {
            key: format!("repos/{repo}/refs: commit id {hex:?}"),
        })
    }

    fn cas_branch(
        &self,
        repo: &str,
        branch: &str,
        expected: Option<&Version>,
        r: &BranchRef,
    ) -> Result<Cas> {
        let bytes = serde_json::to_vec(r).expect("json");
        Ok(self.store.cas(
            &Self::branch_key(repo, branch),
            expected,
            Bytes::from(bytes),
        )?)
    }

    fn create_branch_at(&self, repo: &str, branch: &str, commit: Hash) -> Result<()> {
        let r = BranchRef {
            commit: commit.to_hex(),
            staging: new_token(),
            sealed: vec![],
        };
        match self.cas_branch(repo, branch, None, &r)? {
            Cas::Done(_) => Ok(()),
            Cas::Lost => Err(RepoError::BranchExists {
                repo: repo.to_string(),
                branch: branch.to_string(),
            }),
        }
    }

    /// Create a branch at a ref (O(1): one ref object), after the
    /// pre-create-branch checks pass.
    pub fn create_branch(&self, repo: &str, branch: &str, from: &str) -> Result<Hash> {
        check_name("branch", branch)?;
        let cfg = self.check_repo_writable(repo)?;
        let at = self.resolve(repo, from)?.commit;
        let event =
            self.creation_event(&cfg, repo, EventKind::PreCreateBranch, branch, from, at)?;
        if let Some(e) = &event {
            self.pre_event(e)?;
        }
        self.create_branch_at(repo, branch, at)?;
        if let Some(e) = &event {
            self.post_event(e, at);
        }
        Ok(at)
    }

    /// The event for creating a branch or tag. Its checks come from the
    /// default branch's head: creating refs is repository policy, which a
    /// feature branch must not be able to rewrite.
    fn creation_event(
        &self,
        cfg: &RepoConfig,
        repo: &str,
        kind: EventKind,
        name: &str,
        from: &str,
        at: Hash,
    ) -> Result<Option<HookEvent>> {
        if self.hooks.is_none() {
            return Ok(None);
        }
        let head = self.branch_head(repo, &cfg.default_branch)?;
        let config_tree = self.commit(repo, &head)?.tree;
        Ok(Some(
            HookEvent::new(kind, repo, name, at, config_tree).with_source(from),
        ))
    }

    pub fn list_branches(&self, repo: &str) -> Result<Vec<(String, BranchRef)>> {
        self.repo_config(repo)?;
        let names = self
            .store
            .list_files(&Self::repo_key(repo, "refs/branches"))?;
        let mut out = Vec::new();
        for n in names {
            if check_name("branch", &n).is_err() {
                continue;
            }
            if let Ok((r, _)) = self.branch(repo, &n) {
                out.push((n, r));
            }
        }
        Ok(out)
    }

    pub fn delete_branch(&self, repo: &str, branch: &str) -> Result<()> {
        self.check_direct_write(repo, branch)?;
        let cfg = self.repo_config(repo)?;
        if cfg.default_branch == branch {
            return Err(RepoError::DefaultBranch {
                repo: repo.to_string(),
                branch: branch.to_string(),
            });
        }
        let (r, _) = self.branch(repo, branch)?;
        self.store.delete(&Self::branch_key(repo, branch))?;
        for t in std::iter::once(&r.staging).chain(r.sealed.iter()) {
            self.store
                .delete_prefix(&Self::repo_key(repo, &format!("staging/{t}")))?;
        }
        Ok(())
    }

    pub fn create_tag(&self, repo: &str, tag: &str, at: &str) -> Result<Hash> {
        check_name("tag", tag)?;
        let cfg = self.check_repo_writable(repo)?;
        let commit = self.resolve(repo, at)?.commit;
        let event = self.creation_event(&cfg, repo, EventKind::PreCreateTag, tag, at, commit)?;
        if let Some(e) = &event {
            self.pre_event(e)?;
        }
        let bytes = serde_json::to_vec(&TagRef {
            commit: commit.to_hex(),
        })
        .expect("json");
        if !self
            .store
            .put_if_absent(&Self::tag_key(repo, tag), Bytes::from(bytes))?
        {
            return Err(RepoError::TagExists {
                repo: repo.to_string(),
                tag: tag.to_string(),
            });
        }
        if let Some(e) = &event {
            self.post_event(e, commit);
        }
        Ok(commit)
    }

    fn tag(&self, repo: &str, tag: &str) -> Result<Option<Hash>> {
        match self.store.get(&Self::tag_key(repo, tag))? {
            Some(bytes) => {
                let t: TagRef = serde_json::from_slice(&bytes).map_err(|_| RepoError::Decode {
                    key: Self::tag_key(repo, tag),
                })?;
                Ok(Some(self.parse_id(repo, &t.commit)?))
            }
            None => Ok(None),
        }
    }

    pub fn list_tags(&self, repo: &str) -> Result<Vec<(String, Hash)>> {
        self.repo_config(repo)?;
        let mut out = Vec::new();
        for n in self.store.list_files(&Self::repo_key(repo, "refs/tags"))? {
            if let Some(h) = self.tag(repo, &n)? {
                out.push((n, h));
            }
        }
        Ok(out)
    }

    pub fn delete_tag(&self, repo: &str, tag: &str) -> Result<()> {
        check_name("tag", tag)?;
        self.check_repo_writable(repo)?;
        if self.tag(repo, tag)?.is_none() {
            return Err(RepoError::NoTag {
                repo: repo.to_string(),
                tag: tag.to_string(),
            });
        }
        Ok(self.store.delete(&Self::tag_key(repo, tag))?)
    }

    // ---- ref expressions ----

    /// Resolve `NAME[~N|^N]...`: NAME is a branch, then a tag, then a full
    /// commit id or a unique prefix of at least 6 hex digits.
    pub fn resolve(&self, repo: &str, expr: &str) -> Result<Resolved> {
        let split = expr.find(['~', '^']).unwrap_or(expr.len());
        let (base, mut rest) = expr.split_at(split);
        let unknown = || RepoError::UnknownRef {
            repo: repo.to_string(),
            expr: expr.to_string(),
        };
        if base.is_empty() {
            return Err(RepoError::BadRefExpr(expr.to_string()));
        }
        let mut branch = None;
        let mut commit = if check_name("ref", base).is_err() {
            return Err(unknown());
        } else if let Some(h) = match self.branch(repo, base) {
            Ok((r, _)) => Some(self.parse_id(repo, &r.commit)?),
            Err(RepoError::NoBranch { .. }) => None,
            Err(e) => return Err(e),
        } {
            branch = Some(base.to_string());
            h
        } else if let Some(h) = self.tag(repo, base)? {
            h
        } else if base.len() >= 6 && base.bytes().all(|b| b.is_ascii_hexdigit()) {
            self.resolve_prefix(repo, &base.to_ascii_lowercase())?
                .ok_or_else(unknown)?
        } else {
            return Err(unknown());
        };
        while !rest.is_empty() {
            let op = rest.as_bytes()[0];
            let digits_end = rest[1..]
                .find(|c: char| !c.is_ascii_digit())
                .map(|i| i + 1)
                .unwrap_or(rest.len());
            let n: usize = if digits_end == 1 {
                1
            } else {
                rest[1..digits_end]
                    .parse()
                    .map_err(|_| RepoError::BadRefExpr(expr.to_string()))?
            };
            rest = &rest[digits_end..];
            branch = None;
            let (steps, parent) = if op == b'~' { (n, 0) } else { (1, n) };
            if op == b'^' && n == 0 {
                continue;
            }
            for _ in 0..steps {
                let c = self.commit(repo, &commit)?;
                let idx = if op == b'~' { 0 } else { parent - 1 };
                commit = *c.parents.get(idx).ok_or_else(|| RepoError::NoParent {
                    expr: expr.to_string(),
                    commit: commit.short(),
                    n: idx + 1,
                })?;
            }
        }
        Ok(Resolved { commit, branch })
    }

    fn resolve_prefix(&self, repo: &str, prefix: &str) -> Result<Option<Hash>> {
        if prefix.len() == 64 {
            let h = Hash::from_hex(prefix).expect("64 hex digits");
            return Ok(self.store.exists(&Self::commit_key(repo, &h))?.then_some(h));
        }
        let dir = Self::repo_key(repo, &format!("commits/{}", &prefix[..2]));
        let found: Vec<String> = self
            .store
            .list_files(&dir)?
            .into_iter()
            .filter(|n| n.starts_with(prefix))
            .collect();
        match found.as_slice() {
            [] => Ok(None),
            [one] => Ok(Hash::from_hex(one)),
            _ => Err(RepoError::AmbiguousRef {
                repo: repo.to_string(),
                prefix: prefix.to_string(),
            }),
        }
    }

    /// Resolve a ref that must be a branch.
    pub fn require_branch(&self, repo: &str, expr: &str) -> Result<String> {
        match self.resolve(repo, expr)?.branch {
            Some(b) => Ok(b),
            None => Err(RepoError::NotABranch(format!("{repo}/{expr}"))),
        }
    }

    // ---- staging ----

    fn batch_key(repo: &str, token: &str, id: &str) -> String {
        Self::repo_key(repo, &format!("staging/{token}/{id}"))
    }

    /// Append ops to a branch's staging area. Returns once the batch is
    /// durable under a token that a future commit will consume: after each
    /// put, re-read the ref; if the token was sealed meanwhile, put the same
    /// batch under the new token (commits skip batches already applied).
    pub fn stage(&self, repo: &str, branch: &str, ops: Vec<Op>) -> Result<String> {
        if ops.is_empty() {
            return Ok(String::new());
        }
        self.check_direct_write(repo, branch)?;
        let (r, _) = self.branch(repo, branch)?;
        let mut seen = None;
        for t in std::iter::once(&r.staging).chain(r.sealed.iter()) {
            seen = seen.max(self.batch_ids(repo, t)?.pop());
        }
        self.stage_known(
            repo,
            branch,
            ops,
            &StageHint {
                token: r.staging,
                seen,
                id: None,
            },
        )
    }

    /// `stage` for a writer that keeps the branch in view (the mount): it
    /// has checked that the branch takes direct writes, and `hint` says the
    /// staging token and newest batch it knows of, which saves reading them.
    /// A stale token is harmless: the put is confirmed against the ref and
    /// repeated under the current token, as always.
    pub fn stage_known(
        &self,
        repo: &str,
        branch: &str,
        ops: Vec<Op>,
        hint: &StageHint,
    ) -> Result<String> {
        if ops.is_empty() {
            return Ok(String::new());
        }
        let mut batch = StagingBatch {
            id: hint
                .id
                .clone()
                .unwrap_or_else(|| next_batch_id(hint.seen.as_deref())),
            prior: vec![],
            ops,
        };
        let mut token = hint.token.clone();
        for _ in 0..CAS_ROUNDS {
            let key = Self::batch_key(repo, &token, &batch.id);
            let bytes = Bytes::from(batch.encode());
            if !self.store.put_if_absent(&key, bytes.clone())? {
                // The id is taken: by this very batch (a repeated put, e.g.
                // a journal replayed), or by another writer's batch that
                // got the same id. Never take the other for ours.
                if self.store.get(&key)?.as_ref() != Some(&bytes) {
                    if !batch.prior.is_empty() {
                        return Err(RepoError::Concurrent(format!(
                            "{repo}/{branch} staging: batch id {} taken",
                            batch.id
                        )));
                    }
                    batch.id = next_batch_id(Some(&batch.id));
                    continue;
                }
            }
            let (now, _) = self.branch(repo, branch)?;
            if now.staging == token {
                return Ok(batch.id);
            }
            batch.prior.push(std::mem::replace(&mut token, now.staging));
        }
        Err(RepoError::Concurrent(format!("{repo}/{branch} staging")))
    }

    /// A batch id above `after` (see `StageHint::id`).
    pub fn new_batch_id(after: Option<&str>) -> String {
        next_batch_id(after)
    }

    /// A staged batch read from `key`; `None` if it was gone.
    fn decode_batch(&self, key: &str, body: Option<Bytes>) -> Result<Option<StagingBatch>> {
        match body {
            Some(b) => Ok(Some(StagingBatch::decode(&b).ok_or_else(|| {
                RepoError::Decode {
                    key: key.to_string(),
                }
            })?)),
            None => Ok(None),
        }
    }

    /// All staged ops of a branch (active and sealed tokens), in order.
    pub fn staged_ops(&self, repo: &str, branch: &str) -> Result<Vec<Op>> {
        let (r, _) = self.branch(repo, branch)?;
        let mut tokens = r.sealed.clone();
        tokens.push(r.staging.clone());
        let head = self.parse_id(repo, &r.commit)?;
        let mut ops = Vec::new();
        self.each_pending_batch(
            repo,
            &head,
            &tokens,
            |_| {},
            |_, b| {
                ops.extend(b.ops);
                Ok(())
            },
        )?;
        Ok(ops)
    }

    /// Hand each staged batch under `tokens` that still needs applying on
    /// top of `head` to `f` with its token, in apply order (batch id), as
    /// it is read: a commit of many small files never holds all their
    /// batches. Each id once (a batch re-put under a later token is found
    /// under the first that still has it), minus those that recent
    /// first-parent commits already applied: a re-put batch names the
    /// tokens it was under in `prior` (see the commit protocol).
    fn each_pending_batch(
        &self,
        repo: &str,
        head: &Hash,
        tokens: &[String],
        mut already: impl FnMut(&str),
        mut f: impl FnMut(&str, StagingBatch) -> Result<()>,
    ) -> Result<()> {
        // Each id, and the tokens listing it, in token order.
        let mut ids: BTreeMap<String, Vec<&String>> = BTreeMap::new();
        for t in tokens {
            let dir = Self::repo_key(repo, &format!("staging/{t}"));
            for id in self.store.list_files(&dir)? {
                ids.entry(id).or_default().push(t);
            }
        }
        let ids: Vec<(String, Vec<&String>)> = ids.into_iter().collect();
        let first: Vec<String> = ids
            .iter()
            .map(|(id, ts)| Self::batch_key(repo, ts[0], id))
            .collect();
        let mut applied = Applied::new(*head);
        self.store.get_each(&first, |i, body| {
            let (id, ts) = &ids[i];
            let mut found = self.decode_batch(&first[i], body)?.map(|b| (ts[0], b));
            // Rare: the same batch under several tokens. Any copy's `prior`
            // may tell that a commit applied it.
            let mut prior = Vec::new();
            for t in &ts[1..] {
                if let Some(b) = self.read_batch(repo, t, id)? {
                    match found {
                        Some(_) => prior.extend(b.prior),
                        None => found = Some((t, b)),
                    }
                }
            }
            let Some((t, b)) = found else { return Ok(()) };
            prior.extend(b.prior.iter().cloned());
            if applied.any(self, repo, &prior, &b.id)? {
                already(&b.id);
                return Ok(());
            }
            f(t, b)
        })
    }

    /// `base` with the staged batches under `tokens` that `head` still
    /// needs applied, built in `trees` batch by batch (the ops of 300k
    /// staged small files carry 1.2 GB; a handle that spills holds about
    /// `COMMIT_HOLD` of them). `seen` is shown each batch first; the ids of
    /// batches a commit already applied (copies put again under a newer
    /// token, skipped) come back with the tree.
    fn apply_staged(
        &self,
        repo: &str,
        head: &Hash,
        tokens: &[String],
        base: &Hash,
        trees: &Trees,
        mut seen: impl FnMut(&str, &StagingBatch),
    ) -> Result<(Hash, Vec<String>)> {
        let mut applying = trees.applying(base, self.commit_hold);
        let mut already = Vec::new();
        let skip = |id: &str| already.push(id.to_string());
        self.each_pending_batch(repo, head, tokens, skip, |t, b| {
            seen(t, &b);
            for op in b.ops {
                applying.op(op)?;
            }
            Ok(())
        })?;
        Ok((applying.finish()?, already))
    }

    /// The tree a branch shows: its head tree with staged ops applied.
    pub fn working_tree(&self, repo: &str, branch: &str) -> Result<(Hash, Hash)> {
        let w = self.working_state(repo, branch, &self.trees)?;
        Ok((w.base, w.root))
    }

    /// A branch's ref, head, and working tree (built in `trees`), with the
    /// ids of the batches it reflects (applied to it, or by its head).
    pub fn working_state(&self, repo: &str, branch: &str, trees: &Trees) -> Result<WorkingState> {
        let (r, _) = self.branch(repo, branch)?;
        let head = self.parse_id(repo, &r.commit)?;
        let commit = self.commit(repo, &head)?;
        let mut tokens = r.sealed.clone();
        tokens.push(r.staging.clone());
        // Applied now, or by a commit already (a copy put again under a
        // newer token): a view takes them all as seen, or it would apply
        // such a copy again when a refresh lists it.
        let mut batches = HashSet::new();
        let (root, already) =
            self.apply_staged(repo, &head, &tokens, &commit.tree, trees, |_, b| {
                batches.insert(b.id.clone());
            })?;
        batches.extend(already);
        Ok(WorkingState {
            branch_ref: r,
            head,
            commit_time: commit.time,
            base: commit.tree,
            root,
            batches,
        })
    }

    /// Ids of the batches under one staging token, in apply order.
    pub fn batch_ids(&self, repo: &str, token: &str) -> Result<Vec<String>> {
        Ok(self
            .store
            .list_files(&Self::repo_key(repo, &format!("staging/{token}")))?)
    }

    /// One staged batch, if it is (still) there.
    pub fn read_batch(&self, repo: &str, token: &str, id: &str) -> Result<Option<StagingBatch>> {
        let key = Self::batch_key(repo, token, id);
        self.decode_batch(&key, self.store.get(&key)?)
    }

    /// The tree to read for a ref: a branch's working tree, or a commit's tree.
    pub fn tree_of(&self, repo: &str, expr: &str) -> Result<Hash> {
        let r = self.resolve(repo, expr)?;
        match r.branch {
            Some(b) => Ok(self.working_tree(repo, &b)?.1),
            None => Ok(self.commit(repo, &r.commit)?.tree),
        }
    }

    /// Staged changes of a branch, as paths changed against its head.
    pub fn status(&self, repo: &str, branch: &str) -> Result<Vec<Change>> {
        let (base, work) = self.working_tree(repo, branch)?;
        self.diff_trees(&base, &work)
    }

    /// Discard every staged change of a branch.
    pub fn reset(&self, repo: &str, branch: &str) -> Result<()> {
        self.check_direct_write(repo, branch)?;
        for _ in 0..CAS_ROUNDS {
            let (r, v) = self.branch(repo, branch)?;
            let new = BranchRef {
                commit: r.commit.clone(),
                staging: new_token(),
                sealed: vec![],
            };
            if let Cas::Done(_) = self.cas_branch(repo, branch, Some(&v), &new)? {
                for t in std::iter::once(&r.staging).chain(r.sealed.iter()) {
                    self.store
                        .delete_prefix(&Self::repo_key(repo, &format!("staging/{t}")))?;
                }
                return Ok(());
            }
        }
        Err(RepoError::Concurrent(format!("{repo}/{branch}")))
    }

    /// Discard staged changes under one path: stage ops that put it back as
    /// it is in the head commit.
    pub fn reset_path(&self, repo: &str, branch: &str, path: &str) -> Result<()> {
        let head = self.branch_head(repo, branch)?;
        let tree = self.commit(repo, &head)?.tree;
        let op = match self.trees.lookup(&tree, path)? {
            Some(entry) => Op::Put {
                path: path.to_string(),
                entry,
            },
            None => Op::Delete {
                path: path.to_string(),
            },
        };
        self.stage(repo, branch, vec![op])?;
        Ok(())
    }

    // ---- commit ----

    /// Commit a branch's staged changes (DESIGN.md, ref-update protocol):
    /// seal the active staging token by CAS, apply every sealed batch to the
    /// head tree, write nodes and the commit, then CAS the ref to the new
    /// commit. Losing a CAS to another committer restarts from the ref.
    pub fn commit_branch(&self, repo: &str, branch: &str, opts: &CommitOptions) -> Result<Hash> {
        self.check_direct_write(repo, branch)?;
        let mut backoff = Duration::from_millis(2);
        for _ in 0..CAS_ROUNDS {
            match self.try_commit(repo, branch, opts)? {
                Some(id) => return Ok(id),
                None => {
                    std::thread::sleep(backoff.mul_f64(0.5 + rand::random::<f64>()));
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
            }
        }
        Err(RepoError::Concurrent(format!("{repo}/{branch}")))
    }

    /// The commit `commit_branch` would make of a branch's staged changes
    /// now, written but not published (for rehearsing pre-commit checks),
    /// and the tree of the branch's head.
    pub fn commit_candidate(
        &self,
        repo: &str,
        branch: &str,
        message: &str,
    ) -> Result<(Hash, Hash)> {
        let trees = self.spilling_trees();
        let w = self.working_state(repo, branch, &trees)?;
        let head_commit = self.commit(repo, &w.head)?;
        trees.flush_reachable(&w.root)?;
        let id = self.write_commit(
            repo,
            &Commit {
                tree: w.root,
                parents: vec![w.head],
                author: default_author(),
                time: now_ms(),
                message: message.to_string(),
                meta: BTreeMap::new(),
                generation: head_commit.generation + 1,
                consumed: vec![],
            },
        )?;
        Ok((id, head_commit.tree))
    }

    /// One round of the commit protocol; `None` means "lost a race, retry".
    fn try_commit(&self, repo: &str, branch: &str, opts: &CommitOptions) -> Result<Option<Hash>> {
        let (r, v) = self.branch(repo, branch)?;
        let mut sealed = r.sealed.clone();
        sealed.push(r.staging.clone());
        let sealing = BranchRef {
            commit: r.commit.clone(),
            staging: new_token(),
            sealed: sealed.clone(),
        };
        if self.cas_branch(repo, branch, Some(&v), &sealing)? == Cas::Lost {
            return Ok(None);
        }
        let head = self.parse_id(repo, &r.commit)?;
        let head_commit = self.commit(repo, &head)?;
        let trees = self.spilling_trees();
        let mut consumed: BTreeMap<String, Vec<String>> =
            sealed.iter().map(|t| (t.clone(), vec![])).collect();
        let mut lineage = BTreeMap::new();
        let (tree, _) =
            self.apply_staged(repo, &head, &sealed, &head_commit.tree, &trees, |t, b| {
                consumed
                    .entry(t.to_string())
                    .or_default()
                    .push(b.id.clone());
                lineage.extend(import::lineage(b.ops.iter()));
            })?;
        let unchanged = tree == head_commit.tree;
        let new_head = if unchanged && !opts.allow_empty {
            None
        } else {
            trees.flush_reachable(&tree)?;
            let mut meta = opts.meta.clone();
            meta.extend(lineage);
            let commit = Commit {
                tree,
                parents: vec![head],
                author: opts.author.clone().unwrap_or_else(default_author),
                time: now_ms(),
                message: opts.message.clone(),
                meta,
                generation: head_commit.generation + 1,
                consumed: consumed
                    .into_iter()
                    .map(|(token, batches)| Consumed { token, batches })
                    .collect(),
            };
            let id = self.write_commit(repo, &commit)?;
            self.pre_event(&HookEvent::new(
                EventKind::PreCommit,
                repo,
                branch,
                id,
                head_commit.tree,
            ))?;
            Some(id)
        };
        // Publish: move the ref to the new commit and drop the tokens we
        // consumed, keeping whatever others sealed or started meanwhile.
        let mut version = None;
        loop {
            let (cur, cv) = match version.take() {
                Some(x) => x,
                None => self.branch(repo, branch)?,
            };
            if let Some(id) = new_head {
                if cur.commit == id.to_hex() {
                    return Ok(Some(id)); // our own write, reported as lost
                }
            }
            if cur.commit != r.commit {
                // Someone else committed or merged first; the batches we
                // consumed are still sealed (or in their commit). Start over.
                return Ok(None);
            }
            let done = BranchRef {
                commit: new_head
                    .map(|h| h.to_hex())
                    .unwrap_or_else(|| r.commit.clone()),
                staging: cur.staging.clone(),
                sealed: cur
                    .sealed
                    .iter()
                    .filter(|t| !sealed.contains(t))
                    .cloned()
                    .collect(),
            };
            match self.cas_branch(repo, branch, Some(&cv), &done)? {
                Cas::Done(_) => break,
                Cas::Lost => continue,
            }
        }
        // Consumed batches are now in the commit; their objects can go.
        let prefixes: Vec<String> = sealed
            .iter()
            .map(|t| Self::repo_key(repo, &format!("staging/{t}")))
            .collect();
        self.cleanup(prefixes);
        match new_head {
            Some(id) => {
                let event =
                    HookEvent::new(EventKind::PreCommit, repo, branch, id, head_commit.tree);
                self.post_event(&event, id);
                Ok(Some(id))
            }
            None => Err(RepoError::NothingToCommit {
                repo: repo.to_string(),
                branch: branch.to_string(),
            }),
        }
    }

    // ---- history ----

    /// Commits reachable from `from`, newest first (by generation, then time),
    /// at most `limit`.
    pub fn log(&self, repo: &str, from: &Hash, limit: usize) -> Result<Vec<(Hash, Commit)>> {
        let mut heap = BinaryHeap::new();
        let mut seen = HashSet::new();
        let first = self.commit(repo, from)?;
        heap.push((first.generation, first.time, *from));
        let mut cache: HashMap<Hash, Commit> = HashMap::from([(*from, first)]);
        let mut out = Vec::new();
        while let Some((_, _, id)) = heap.pop() {
            if !seen.insert(id) {
                continue;
            }
            let c = match cache.remove(&id) {
                Some(c) => c,
                None => self.commit(repo, &id)?,
            };
            for p in &c.parents {
                if !seen.contains(p) {
                    let pc = self.commit(repo, p)?;
                    heap.push((pc.generation, pc.time, *p));
                    cache.insert(*p, pc);
                }
            }
            out.push((id, c));
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    /// Like `log`, but only commits that changed `path`: a commit is shown
    /// when the entry at `path` differs from every parent (so a merge that
    /// just took one side's version is not).
    pub fn log_path(
        &self,
        repo: &str,
        from: &Hash,
        path: &str,
        limit: usize,
    ) -> Result<Vec<(Hash, Commit)>> {
        let mut out = Vec::new();
        for (id, c) in self.log(repo, from, usize::MAX)? {
            let here = self.trees.lookup(&c.tree, path)?;
            let mut changed = true;
            for p in &c.parents {
                let pt = self.commit(repo, p)?.tree;
                if self.trees.lookup(&pt, path)? == here {
                    changed = false;
                    break;
                }
            }
            if c.parents.is_empty() {
                changed = here.is_some();
            }
            if changed {
                out.push((id, c));
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Paths that differ between two trees. Subtrees and directory nodes
    /// with equal hashes are skipped, so cost grows with the change.
    pub fn diff_trees(&self, a: &Hash, b: &Hash) -> Result<Vec<Change>> {
        self.diff_trees_in(&self.trees, a, b)
    }

    /// `diff_trees`, reading nodes through another handle (one that holds
    /// unwritten nodes, like a mount's working view).
    pub fn diff_trees_in(&self, trees: &Trees, a: &Hash, b: &Hash) -> Result<Vec<Change>> {
        let mut out = Vec::new();
        self.diff_entries(
            trees,
            Some(&Entry::Dir(*a)),
            Some(&Entry::Dir(*b)),
            String::new(),
            &mut out,
        )?;
        Ok(out)
    }

    /// Changes between two trees under `path` only.
    pub fn diff_path(&self, a: &Hash, b: &Hash, path: &str) -> Result<Vec<Change>> {
        let x = self.trees.lookup(a, path)?;
        let y = self.trees.lookup(b, path)?;
        let mut out = Vec::new();
        self.diff_entries(
            &self.trees,
            x.as_ref(),
            y.as_ref(),
            path.to_string(),
            &mut out,
        )?;
        Ok(out)
    }

    fn diff_entries(
        &self,
        trees: &Trees,
        x: Option<&Entry>,
        y: Option<&Entry>,
        path: String,
        out: &mut Vec<Change>,
    ) -> Result<()> {
        let join = |name: &str| {
            if path.is_empty() {
                name.to_string()
            } else {
                format!("{path}/{name}")
            }
        };
        match (x, y) {
            (Some(Entry::Dir(a)), Some(Entry::Dir(b))) => {
                for (name, l, r) in trees.diff_dir(a, b)? {
                    self.diff_entries(trees, l.as_ref(), r.as_ref(), join(&name), out)?;
                }
            }
            (Some(a), Some(b)) if a == b => {}
            (Some(a), Some(b)) if !matches!(a, Entry::Dir(_)) && !matches!(b, Entry::Dir(_)) => out
                .push(Change {
                    path,
                    kind: ChangeKind::Modified,
                    size_before: Some(a.size()),
                    size_after: Some(b.size()),
                }),
            (x, y) => {
                if let Some(a) = x {
                    self.whole_change(trees, a, path.clone(), ChangeKind::Removed, out)?;
                }
                if let Some(b) = y {
                    self.whole_change(trees, b, path, ChangeKind::Added, out)?;
                }
            }
        }
        Ok(())
    }

    fn whole_change(
        &self,
        trees: &Trees,
        e: &Entry,
        path: String,
        kind: ChangeKind,
        out: &mut Vec<Change>,
    ) -> Result<()> {
        match e {
            Entry::Dir(h) if trees.count(h)? > 0 => {
                self.subtree_changes(trees, h, &path, kind, out)
            }
            _ => {
                let size = Some(e.size());
                out.push(Change {
                    path,
                    kind,
                    size_before: if kind == ChangeKind::Removed {
                        size
                    } else {
                        None
                    },
                    size_after: if kind == ChangeKind::Added {
                        size
                    } else {
                        None
                    },
                });
                Ok(())
            }
        }
    }

    fn subtree_changes(
        &self,
        trees: &Trees,
        dir: &Hash,
        prefix: &str,
        kind: ChangeKind,
        out: &mut Vec<Change>,
    ) -> Result<()> {
        for (name, e) in trees.entries(dir)? {
            self.whole_change(trees, &e, format!("{prefix}/{name}"), kind, out)?;
        }
        Ok(())
    }

    // ---- files ----

    /// Store a local file's bytes and return its entry.
    pub fn file_entry(
        &self,
        reader: impl std::io::Read,
        meta: &std::fs::Metadata,
        what: &str,
    ) -> Result<(Entry, chunk::StoreStats)> {
        use std::os::unix::fs::MetadataExt;
        let mtime = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
        self.store_file(reader, meta.mode() & 0o7777, mtime, what)
    }

    /// Store bytes as a file entry with the given mode and mtime (ns).
    /// Manifest nodes of large files are queued in `trees()`: `flush` before
    /// staging an op that names them.
    pub fn store_file(
        &self,
        reader: impl std::io::Read,
        mode: u32,
        mtime: i64,
        what: &str,
    ) -> Result<(Entry, chunk::StoreStats)> {
        let (stored, stats) =
            chunk::store_content(&self.store, self.config.chunking, reader, what)?;
        let content = match stored {
            Stored::Inline(b) => Content::Inline(b.into()),
            Stored::Chunks(refs) => self.trees.pack_chunks(refs),
        };
        Ok((
            Entry::File(File {
                size: stats.bytes,
                mode,
                mtime,
                content,
            }),
            stats,
        ))
    }

    /// Write a file entry's bytes to `out`.
    pub fn read_file(&self, file: &File, out: &mut impl std::io::Write) -> Result<u64> {
        match &file.content {
            Content::Inline(b) => {
                out.write_all(b).map_err(|e| chunk::ChunkError::Io {
                    what: "output".into(),
                    source: e,
                })?;
                return Ok(b.len() as u64);
            }
            Content::External(ext) => return read_external(file, ext, out),
            Content::Chunks(_) | Content::Manifest(_) => {}
        }
        let refs = self.trees.chunk_list(&file.content)?;
        Ok(chunk::write_chunks(&self.store, &refs, out)?)
    }

    /// Write an entry out as a local file, symlink or directory tree at
    /// `dest` (modes and mtimes kept); returns the number of files written.
    pub fn materialize(&self, entry: &Entry, dest: &std::path::Path) -> Result<u64> {
        use std::os::unix::fs::PermissionsExt;
        let local = |e: std::io::Error| RepoError::Local {
            path: dest.display().to_string(),
            source: e,
        };
        match entry {
            Entry::File(f) => {
                let mut out = std::fs::File::create(dest).map_err(local)?;
                let mut w = std::io::BufWriter::new(&mut out);
                self.read_file(f, &mut w)?;
                std::io::Write::flush(&mut w).map_err(local)?;
                drop(w);
                out.set_permissions(std::fs::Permissions::from_mode(f.mode))
                    .map_err(local)?;
                let t = UNIX_EPOCH + Duration::from_nanos(f.mtime.max(0) as u64);
                out.set_modified(t).map_err(local)?;
                Ok(1)
            }
            Entry::Symlink(t) => {
                std::os::unix::fs::symlink(t, dest).map_err(local)?;
                Ok(0)
            }
            Entry::Dir(h) => {
                std::fs::create_dir_all(dest).map_err(local)?;
                let mut n = 0;
                for (name, e) in self.trees.entries(h)? {
                    n += self.materialize(&e, &dest.join(name))?;
                }
                Ok(n)
            }
        }
    }

    /// Write staged content nodes (manifests) so staged ops can refer to them.
    pub fn flush(&self) -> Result<()> {
        self.trees.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lake() -> Lake {
        let s = Store::open(&format!("memory://repo-{}", ulid::Ulid::new())).unwrap();
        Lake::init(s).unwrap().0
    }

    fn put(l: &Lake, repo: &str, branch: &str, path: &str, data: &[u8]) {
        let e = Entry::File(File {
            size: data.len() as u64,
            mode: 0o644,
            mtime: 0,
            content: Content::Inline(data.to_vec().into()),
        });
        l.stage(
            repo,
            branch,
            vec![Op::Put {
                path: path.into(),
                entry: e,
            }],
        )
        .unwrap();
    }

    fn read(l: &Lake, repo: &str, r: &str, path: &str) -> Option<Vec<u8>> {
        let t = l.tree_of(repo, r).unwrap();
        match l.trees().lookup(&t, path).unwrap()? {
            Entry::File(f) => {
                let mut v = Vec::new();
                l.read_file(&f, &mut v).unwrap();
                Some(v)
            }
            _ => None,
        }
    }

    fn opts(m: &str) -> CommitOptions {
        CommitOptions {
            message: m.into(),
            ..Default::default()
        }
    }

    #[test]
    fn writers_that_pick_the_same_batch_id_both_stage() {
        let l = lake();
        l.create_repo("r", "main").unwrap();
        let (r, _) = l.branch("r", "main").unwrap();
        let put_op = |path: &str, data: &[u8]| Op::Put {
            path: path.into(),
            entry: Entry::File(File {
                size: data.len() as u64,
                mode: 0o644,
                mtime: 0,
                content: Content::Inline(data.to_vec().into()),
            }),
        };
        // Two writers that saw the same newest batch chose one id.
        let hint = StageHint {
            token: r.staging.clone(),
            seen: None,
            id: Some(Lake::new_batch_id(None)),
        };
        let a = l
            .stage_known("r", "main", vec![put_op("a", b"1")], &hint)
            .unwrap();
        let b = l
            .stage_known("r", "main", vec![put_op("b", b"2")], &hint)
            .unwrap();
        assert_ne!(a, b, "the second writer moved to another id");
        assert!(b > a, "and still after it");
        // The same batch again (a replayed journal) keeps its id.
        let again = l
            .stage_known("r", "main", vec![put_op("a", b"1")], &hint)
            .unwrap();
        assert_eq!(again, a);
        l.commit_branch("r", "main", &opts("both")).unwrap();
        assert_eq!(read(&l, "r", "main", "a").as_deref(), Some(&b"1"[..]));
        assert_eq!(read(&l, "r", "main", "b").as_deref(), Some(&b"2"[..]));
        // Ids chosen after the same newest one (here one from the future,
        // so none comes from the clock) differ, and all follow it.
        let newest = ulid::Ulid(u128::MAX >> 1).to_string();
        let ids: HashSet<String> = (0..1000).map(|_| next_batch_id(Some(&newest))).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().all(|id| *id > newest));
    }

    #[test]
    fn names_are_checked() {
        for ok in ["a", "sales", "A1_b.c-d"] {
            check_name("x", ok).unwrap();
        }
        for bad in ["", "-a", ".a", "a/b", "a b", &"x".repeat(129)] {
            assert!(check_name("x", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn branches_commits_refs() {
        let l = lake();
        l.create_repo("r", "main").unwrap();
        assert!(matches!(
            l.create_repo("r", "main"),
            Err(RepoError::RepoExists(_))
        ));
        put(&l, "r", "main", "a/x.txt", b"one");
        assert_eq!(
            read(&l, "r", "main", "a/x.txt").unwrap(),
            b"one",
            "working view shows staged"
        );
        let c1 = l.commit_branch("r", "main", &opts("first")).unwrap();
        assert!(l.status("r", "main").unwrap().is_empty());
        assert!(matches!(
            l.commit_branch("r", "main", &opts("empty")),
            Err(RepoError::NothingToCommit { .. })
        ));
        l.create_branch("r", "dev", "main").unwrap();
        put(&l, "r", "main", "a/x.txt", b"two");
        let c2 = l.commit_branch("r", "main", &opts("second")).unwrap();
        assert_eq!(l.resolve("r", "main~1").unwrap().commit, c1);
        assert_eq!(l.resolve("r", "main^").unwrap().commit, c1);
        assert_eq!(l.resolve("r", &c2.to_hex()[..8]).unwrap().commit, c2);
        assert_eq!(read(&l, "r", "dev", "a/x.txt").unwrap(), b"one");
        l.create_tag("r", "v1", "main~1").unwrap();
        assert_eq!(read(&l, "r", "v1", "a/x.txt").unwrap(), b"one");
        assert!(matches!(
            l.resolve("r", "nope"),
            Err(RepoError::UnknownRef { .. })
        ));
        assert!(matches!(
            l.resolve("r", "main~9"),
            Err(RepoError::NoParent { .. })
        ));
        let log = l.log("r", &c2, 10).unwrap();
        assert_eq!(
            log.iter().map(|(h, _)| *h).collect::<Vec<_>>()[..2],
            [c2, c1]
        );
        assert_eq!(log.len(), 3, "two commits and the initial one");
        // Reset discards staged changes.
        put(&l, "r", "dev", "junk", b"x");
        assert_eq!(l.status("r", "dev").unwrap().len(), 1);
        l.reset("r", "dev").unwrap();
        assert!(l.status("r", "dev").unwrap().is_empty());
        // Reset of one path.
        put(&l, "r", "dev", "a/x.txt", b"changed");
        put(&l, "r", "dev", "keep", b"k");
        l.reset_path("r", "dev", "a/x.txt").unwrap();
        let st = l.status("r", "dev").unwrap();
        assert_eq!(
            st.iter().map(|c| c.path.as_str()).collect::<Vec<_>>(),
            ["keep"]
        );
        assert!(matches!(
            l.delete_branch("r", "main"),
            Err(RepoError::DefaultBranch { .. })
        ));
        l.delete_branch("r", "dev").unwrap();
        assert!(matches!(
            l.resolve("r", "dev"),
            Err(RepoError::UnknownRef { .. })
        ));
    }

    #[test]
    fn addresses_parse() {
        let a = Address::parse("sales/main/raw/x.csv").unwrap();
        assert_eq!(
            (a.repo.as_str(), a.reference.as_deref(), a.path.as_str()),
            ("sales", Some("main"), "raw/x.csv")
        );
        assert!(Address::parse("bad name/main").is_err());
        assert!(Address::parse("r/main/../x").is_err());
        assert_eq!(Address::parse("r").unwrap().reference, None);
    }

    /// A lake with repository `r` whose commits and reads spill past
    /// `hold` bytes of ops into the directory returned.
    fn spilling_lake(hold: usize) -> (Lake, tempfile::TempDir) {
        let mut l = lake();
        let spill = tempfile::tempdir().unwrap();
        l.set_spill_dir(spill.path().to_path_buf());
        l.commit_hold = hold;
        l.create_repo("r", "main").unwrap();
        (l, spill)
    }

    #[test]
    fn a_commit_past_its_hold_spills_and_writes_only_its_tree() {
        let (l, spill) = spilling_lake(32 << 10);
        let file = |i: u32| {
            Entry::File(File {
                size: 1000,
                mode: 0o644,
                mtime: 1,
                content: Content::Inline(vec![i as u8; 1000].into()),
            })
        };
        let mut all = Vec::new();
        for b in 0..20u32 {
            let ops: Vec<Op> = (0..50u32)
                .map(|i| Op::Put {
                    path: format!("d{}/f{:04}", b % 4, b * 50 + i),
                    entry: file(b * 50 + i),
                })
                .collect();
            all.extend(ops.clone());
            l.stage("r", "main", ops).unwrap();
        }
        let tail = vec![
            Op::Move {
                from: "d0".into(),
                to: "x/d0".into(),
            },
            Op::Delete {
                path: "d1/f0051".into(),
            },
        ];
        all.extend(tail.clone());
        l.stage("r", "main", tail).unwrap();
        let c = l.commit_branch("r", "main", &opts("big")).unwrap();
        let tree = l.commit("r", &c).unwrap().tree;
        // The tree of applying every op at once.
        let plain = Trees::new(Store::open("memory://a-commit-past-its-hold").unwrap());
        assert_eq!(tree, plain.apply(&plain.empty_dir(), &all).unwrap());
        assert_eq!(l.trees.lookup(&tree, "x/d0/f0000").unwrap(), Some(file(0)));
        // It did spill (50 KB of ops per batch against a 32 KB hold), and
        // wrote no node its tree does not reach: every stored node is one
        // that fsck reaches from a ref.
        let report = l.fsck(&Default::default()).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.nodes as usize, l.store.list("nodes").unwrap().len());
        assert_eq!(std::fs::read_dir(spill.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_reading_lake_spills_big_working_trees_and_writes_none() {
        let (mut l, spill) = spilling_lake(4 << 10);
        for i in 0..40 {
            put(
                &l,
                "r",
                "main",
                &format!("d{}/f{i}", i % 3),
                &[i as u8; 600],
            );
        }
        let nodes = l.store.list("nodes").unwrap().len();
        l.read_trees_only();
        assert_eq!(l.status("r", "main").unwrap().len(), 40);
        let tree = l.tree_of("r", "main").unwrap();
        let mut all = Vec::new();
        l.trees().walk(&tree, "", &mut all).unwrap();
        assert_eq!(all.iter().filter(|(_, e)| e.size() == 600).count(), 40);
        assert_eq!(
            l.trees().lookup(&tree, "d1/f7").unwrap(),
            Some(Entry::File(File {
                size: 600,
                mode: 0o644,
                mtime: 0,
                content: Content::Inline(vec![7; 600].into()),
            }))
        );
        let spilled: usize = std::fs::read_dir(spill.path())
            .unwrap()
            .map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count())
            .sum();
        assert!(spilled > 0, "the working tree spilled");
        assert_eq!(l.store.list("nodes").unwrap().len(), nodes);
        drop(l);
        assert_eq!(std::fs::read_dir(spill.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_commit_that_cannot_spill_holds_its_tree_in_memory() {
        let mut l = lake();
        let dir = tempfile::tempdir().unwrap();
        // A file where the spill directory's parent should be.
        std::fs::write(dir.path().join("file"), b"").unwrap();
        l.set_spill_dir(dir.path().join("file"));
        l.commit_hold = 1 << 10;
        l.create_repo("r", "main").unwrap();
        for i in 0..20 {
            put(&l, "r", "main", &format!("d/f{i}"), &[i as u8; 600]);
        }
        let c = l.commit_branch("r", "main", &opts("held")).unwrap();
        let tree = l.commit("r", &c).unwrap().tree;
        let Some(Entry::Dir(d)) = l.trees.lookup(&tree, "d").unwrap() else {
            panic!("d committed")
        };
        assert_eq!(l.trees.count(&d).unwrap(), 20);
        assert_eq!(
            l.trees.lookup(&tree, "d/f7").unwrap().map(|e| e.size()),
            Some(600)
        );
    }

    #[test]
    fn a_batch_put_during_a_commit_is_committed_exactly_once() {
        let l = lake();
        l.create_repo("r", "main").unwrap();
        put(&l, "r", "main", "a", b"1");
        // Simulate the race: seal the token by hand (a commit in progress),
        // then stage: the batch lands in the sealed token, and the writer
        // re-puts it under the new one.
        let (r, v) = l.branch("r", "main").unwrap();
        let sealing = BranchRef {
            commit: r.commit.clone(),
            staging: new_token(),
            sealed: vec![r.staging.clone()],
        };
        let batch = StagingBatch {
            id: next_batch_id(None),
            prior: vec![],
            ops: vec![Op::Put {
                path: "b".into(),
                entry: Entry::Symlink("t".into()),
            }],
        };
        l.store
            .put_if_absent(
                &Lake::batch_key("r", &r.staging, &batch.id),
                Bytes::from(batch.encode()),
            )
            .unwrap();
        assert_eq!(
            l.cas_branch("r", "main", Some(&v), &sealing).unwrap(),
            Cas::Done(l.branch("r", "main").unwrap().1)
        );
        let mut again = batch.clone();
        again.prior.push(r.staging.clone());
        l.store
            .put_if_absent(
                &Lake::batch_key("r", &sealing.staging, &batch.id),
                Bytes::from(again.encode()),
            )
            .unwrap();
        let c = l.commit_branch("r", "main", &opts("both")).unwrap();
        let tree = l.commit("r", &c).unwrap().tree;
        assert!(l.trees().lookup(&tree, "a").unwrap().is_some());
        assert!(l.trees().lookup(&tree, "b").unwrap().is_some());
        // Deleting b and committing must not resurrect it from the duplicate.
        l.stage("r", "main", vec![Op::Delete { path: "b".into() }])
            .unwrap();
        let c2 = l.commit_branch("r", "main", &opts("del")).unwrap();
        let tree = l.commit("r", &c2).unwrap().tree;
        assert!(l.trees().lookup(&tree, "b").unwrap().is_none());
    }

    #[test]
    fn concurrent_writers_and_committers_lose_nothing() {
        let l = std::sync::Arc::new(lake());
        l.create_repo("r", "main").unwrap();
        let writers: Vec<_> = (0..3)
            .map(|w| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for i in 0..40 {
                        put(&l, "r", "main", &format!("w{w}/f{i}"), b"x");
                    }
                })
            })
            .collect();
        let committers: Vec<_> = (0..2)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for _ in 0..15 {
                        match l.commit_branch("r", "main", &opts("c")) {
                            Ok(_) | Err(RepoError::NothingToCommit { .. }) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                })
            })
            .collect();
        for t in writers.into_iter().chain(committers) {
            t.join().unwrap();
        }
        let _ = l.commit_branch("r", "main", &opts("final"));
        let head = l.resolve("r", "main").unwrap().commit;
        let tree = l.commit("r", &head).unwrap().tree;
        let mut all = Vec::new();
        l.trees().walk(&tree, "", &mut all).unwrap();
        let files = all
            .iter()
            .filter(|(_, e)| matches!(e, Entry::File(_)))
            .count();
        assert_eq!(files, 120);
        assert!(l.staged_ops("r", "main").unwrap().is_empty());
    }

    /// Refuses the pre-events in `refuse`, fails every post-event, and
    /// records what it saw.
    struct Gate {
        refuse: Vec<EventKind>,
        seen: parking_lot::Mutex<Vec<(EventKind, String, Hash)>>,
    }

    impl Hooks for Gate {
        fn pre(&self, lake: &Lake, e: &HookEvent) -> Result<()> {
            lake.commit(&e.repo, &e.commit)
                .expect("candidate written before pre-event");
            self.seen.lock().push((e.kind, e.target.clone(), e.commit));
            if self.refuse.contains(&e.kind) {
                return Err(RepoError::CheckFailed(Box::new(CheckFailure {
                    event: e.kind.to_string(),
                    repo: e.repo.clone(),
                    what: "test".into(),
                    check: "gate/x".into(),
                    detail: "no".into(),
                    candidate: e.commit.short(),
                    run: "r".into(),
                })));
            }
            Ok(())
        }

        fn post(&self, _: &Lake, e: &HookEvent) -> Vec<String> {
            self.seen.lock().push((e.kind, e.target.clone(), e.commit));
            vec![format!("{} failed", e.kind)]
        }
    }

    #[test]
    fn hooks_gate_every_ref_update() {
        let mut l = lake();
        l.create_repo("r", "main").unwrap();
        let gate = Arc::new(Gate {
            refuse: vec![
                EventKind::PreCommit,
                EventKind::PreMerge,
                EventKind::PreCreateTag,
            ],
            seen: Default::default(),
        });
        l.set_hooks(gate.clone());
        l.create_branch("r", "dev", "main").unwrap();
        assert_eq!(l.take_warnings(), ["post-create-branch failed"]);
        put(&l, "r", "dev", "a", b"1");
        let head = l.branch_head("r", "dev").unwrap();
        let err = l.commit_branch("r", "dev", &opts("x")).unwrap_err();
        assert!(matches!(err, RepoError::CheckFailed(_)), "{err}");
        assert_eq!(l.branch_head("r", "dev").unwrap(), head);
        assert_eq!(read(&l, "r", "dev", "a").unwrap(), b"1", "still staged");
        // The refused candidate stays readable by its id.
        let candidate = gate.seen.lock().last().unwrap().2;
        assert_eq!(read(&l, "r", &candidate.to_hex(), "a").unwrap(), b"1");
        assert!(l.create_tag("r", "v1", "main").is_err());
        assert!(l.list_tags("r").unwrap().is_empty());

        // Let commits through: the post-event reports, the commit stands.
        let gate = Arc::new(Gate {
            refuse: vec![EventKind::PreMerge],
            seen: Default::default(),
        });
        l.set_hooks(gate.clone());
        let c = l.commit_branch("r", "dev", &opts("x")).unwrap();
        assert_eq!(l.take_warnings(), ["post-commit failed"]);
        assert_eq!(l.branch_head("r", "dev").unwrap(), c);
        let main = l.branch_head("r", "main").unwrap();
        for ff in [false, true] {
            let o = MergeOptions {
                ff,
                ..Default::default()
            };
            assert!(matches!(
                l.merge("r", "dev", "main", &o),
                Err(RepoError::CheckFailed(_))
            ));
            assert_eq!(l.branch_head("r", "main").unwrap(), main);
        }
        let kinds: Vec<EventKind> = gate.seen.lock().iter().map(|s| s.0).collect();
        assert_eq!(
            kinds,
            [
                EventKind::PreCommit,
                EventKind::PostCommit,
                EventKind::PreMerge,
                EventKind::PreMerge
            ]
        );
        // The fast-forward candidate is the source itself.
        assert_eq!(gate.seen.lock()[3].2, c);
    }

    #[test]
    fn protection_refuses_direct_writes_but_not_merges() {
        let l = lake();
        l.create_repo("r", "main").unwrap();
        l.create_branch("r", "dev", "main").unwrap();
        put(&l, "r", "dev", "a", b"1");
        l.commit_branch("r", "dev", &opts("a")).unwrap();
        l.set_protected("r", "main", true).unwrap();
        assert_eq!(l.repo_config("r").unwrap().protected, ["main"]);
        fn protected<T>(r: Result<T>) -> bool {
            matches!(r, Err(RepoError::Protected { .. }))
        }
        assert!(protected(l.stage(
            "r",
            "main",
            vec![Op::Delete { path: "a".into() }]
        )));
        assert!(protected(l.commit_branch(
            "r",
            "main",
            &CommitOptions {
                allow_empty: true,
                ..opts("x")
            }
        )));
        assert!(protected(l.reset("r", "main")));
        assert!(protected(l.delete_branch("r", "main")));
        l.merge("r", "dev", "main", &MergeOptions::default())
            .unwrap();
        l.set_protected("r", "main", false).unwrap();
        l.reset("r", "main").unwrap();
        l.set_read_only("r", true).unwrap();
        fn ro<T>(r: Result<T>) -> bool {
            matches!(r, Err(RepoError::ReadOnlyRepo(_)))
        }
        assert!(ro(l.stage(
            "r",
            "dev",
            vec![Op::Delete { path: "a".into() }]
        )));
        assert!(ro(l.merge("r", "main", "dev", &MergeOptions::default())));
        assert!(ro(l.create_branch("r", "x", "main")));
        assert!(ro(l.create_tag("r", "x", "main")));
        l.set_read_only("r", false).unwrap();
        l.create_tag("r", "x", "main").unwrap();
    }

    /// Stagers and committers at once (the mount's closes, its control-file
    /// commits and the CLI's): each stager's own files must end in the
    /// last commit exactly as its own model of them says.
    #[test]
    fn concurrent_stages_and_commits_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("lake").display());
        let l = Arc::new(Lake::init(Store::open(&url).unwrap()).unwrap().0);
        l.create_repo("r", "main").unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        let commits = std::sync::atomic::AtomicUsize::new(0);
        let models: Vec<BTreeMap<String, Vec<u8>>> = std::thread::scope(|sc| {
            for _ in 0..2 {
                sc.spawn(|| {
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        match l.commit_branch("r", "main", &CommitOptions::default()) {
                            Ok(_) => {
                                commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Err(RepoError::NothingToCommit { .. })
                            | Err(RepoError::Concurrent(_)) => {}
                            Err(e) => panic!("commit: {e}"),
                        }
                    }
                });
            }
            let stagers: Vec<_> = (0..3u64)
                .map(|w| {
                    let l = l.clone();
                    let commits = &commits;
                    sc.spawn(move || {
                        let mut model = BTreeMap::new();
                        let mut x = w * 7919 + 1;
                        for k in 0..300u64 {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let a = format!("w{w}/f{}", x % 7);
                            let b = format!("w{w}/f{}", (x >> 8) % 7);
                            let op = match x % 3 {
                                0 if model.contains_key(&a) => {
                                    model.remove(&a);
                                    Op::Delete { path: a }
                                }
                                1 if model.contains_key(&a) && !model.contains_key(&b) => {
                                    let v = model.remove(&a).unwrap();
                                    model.insert(b.clone(), v);
                                    Op::Move { from: a, to: b }
                                }
                                _ => {
                                    let data = format!("{w}-{k}").into_bytes();
                                    model.insert(a.clone(), data.clone());
                                    Op::Put {
                                        path: a,
                                        entry: Entry::File(File {
                                            size: data.len() as u64,
                                            mode: 0o644,
                                            mtime: 0,
                                            content: Content::Inline(data.into()),
                                        }),
                                    }
                                }
                            };
                            l.stage("r", "main", vec![op]).unwrap();
                            if k % 30 == 29 {
                                // Let commits in between, whatever the
                                // machine's pace.
                                let want = (k / 30) as usize;
                                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                                while commits.load(std::sync::atomic::Ordering::Relaxed) < want
                                    && std::time::Instant::now() < deadline
                                {
                                    std::thread::sleep(Duration::from_millis(1));
                                }
                            }
                        }
                        model
                    })
                })
                .collect();
            let ended: Vec<_> = stagers.into_iter().map(|h| h.join()).collect();
            // Before a stager's failure goes on: the committers must stop.
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            ended
                .into_iter()
                .map(|r| r.unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        let _ = l.commit_branch("r", "main", &CommitOptions::default());
        let (r, _) = l.branch("r", "main").unwrap();
        assert!(l.staged_ops("r", "main").unwrap().is_empty());
        let tree = l
            .commit("r", &l.parse_id("r", &r.commit).unwrap())
            .unwrap()
            .tree;
        let mut files = Vec::new();
        l.trees().walk(&tree, "", &mut files).unwrap();
        let got: BTreeMap<String, Vec<u8>> = files
            .into_iter()
            .filter_map(|(p, e)| match e {
                Entry::File(f) => match f.content {
                    Content::Inline(b) => Some((p, b.to_vec())),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        let want: BTreeMap<String, Vec<u8>> = models.into_iter().flatten().collect();
        assert_eq!(got, want);
        let commits = commits.into_inner();
        assert!(commits >= 9, "only {commits} commits raced the stages");
    }

    /// A writer that had not seen a commit stages a batch the commit took
    /// again (a retry): it lands under the new token, naming the old one
    /// as prior. The working state skips it and counts it as seen, so a
    /// view that lists the new token does not apply it a second time.
    #[test]
    fn a_committed_batch_staged_again_counts_as_seen_not_applied() {
        let l = lake();
        l.create_repo("r", "main").unwrap();
        let (before, _) = l.branch("r", "main").unwrap();
        let op = Op::Move {
            from: "a".into(),
            to: "b".into(),
        };
        put(&l, "r", "main", "a", b"x");
        let hint = StageHint {
            token: before.staging.clone(),
            seen: None,
            id: None,
        };
        let id = l.stage_known("r", "main", vec![op.clone()], &hint).unwrap();
        l.commit_branch("r", "main", &CommitOptions::default())
            .unwrap();
        let again = StageHint {
            id: Some(id.clone()),
            ..hint
        };
        assert_eq!(l.stage_known("r", "main", vec![op], &again).unwrap(), id);
        let w = l.working_state("r", "main", l.trees()).unwrap();
        assert!(w.batches.contains(&id), "{:?}", w.batches);
        assert_eq!(w.root, w.base, "not applied again");
    }
}
