//! The `tarn` command line: thin; each command parses its arguments, makes
//! one or two library calls and prints the result (text, or one JSON
//! document with `--json`). Errors are one line on stderr and exit code 1.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

mod snapshot;

use crate::hash::Hash;
use crate::hooks::{HookRunner, RunRecord, Status};
use crate::repo::{
    Address, Change, ChangeKind, Commit, CommitOptions, EventKind, HookEvent, Hooks, Lake,
    MergeOptions, MergeOutcome, PutSummary, RepoError,
};
use crate::store::Store;
use crate::tree::{Entry, Op};
use crate::units::{parse_duration, parse_size};

/// Ops per staging batch when putting a directory: big enough to amortise
/// the store round trips, small enough to keep a batch object a few MiB.
const PUT_BATCH_OPS: usize = 10_000;

#[derive(Parser, Debug)]
#[command(name = "tarn", version, about = "A versioned data lake you can mount")]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct Global {
    /// Lake URL: file:///dir, s3://bucket/prefix, memory://name.
    /// Default: $TARN_LAKE, else ~/.local/share/tarn/lake.
    #[arg(long, global = true, env = "TARN_LAKE")]
    lake: Option<String>,
    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a lake (idempotent).
    Init {
        /// Lake URL (overrides --lake).
        url: Option<String>,
    },
    /// Repositories: create, list, delete.
    #[command(subcommand)]
    Repo(RepoCmd),
    /// Branches: create, list, delete.
    #[command(subcommand)]
    Branch(BranchCmd),
    /// Tags: create, list, delete.
    #[command(subcommand)]
    Tag(TagCmd),
    /// Data-quality checks (`_tarn/hooks/*.toml` in the repository): rehearse them, read past runs.
    #[command(subcommand)]
    Hooks(HooksCmd),
    /// Stage a local file or directory (recursively) at REPO/BRANCH/PATH.
    Put { source: PathBuf, dest: String },
    /// Import a source by reference at REPO/BRANCH/PATH (nothing is copied,
    /// the source is never written): file:///dir/, s3://bucket/prefix/, or
    /// tarn://REPO/REF/PATH to graft another repository's tree (O(1)).
    ///
    /// Commits the branch unless --no-commit (message: -m, or "import SOURCE").
    Import {
        source: String,
        dest: String,
        #[arg(short, long)]
        message: Option<String>,
        /// Stage only.
        #[arg(long)]
        no_commit: bool,
        /// List what would be imported; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Metadata KEY=VALUE for the commit (repeatable).
        #[arg(long = "meta", value_name = "KEY=VALUE")]
        meta: Vec<String>,
    },
    /// Copy the files at REPO/REF[/PATH] out to DEST_URL (file:///dir/ or
    /// s3://bucket/prefix/) as plain files; run again to resume.
    Export { source: String, dest: String },
    /// Check that every object each ref reaches is present and intact
    /// (commits, tree nodes, chunks; one line per problem; exit 1 if any).
    Fsck {
        /// Only these repositories.
        repos: Vec<String>,
        /// Share of chunks to read and verify, 0.0-1.0 (the rest: checked to exist).
        #[arg(long, default_value_t = 1.0)]
        sample: f64,
        /// Also check that imported objects are still at their source, unchanged.
        #[arg(long)]
        external: bool,
        /// Also verify a mount's chunk cache directory (not in use) and delete bad entries.
        #[arg(long, value_name = "CACHE_DIR")]
        repair_cache: Option<PathBuf>,
    },
    /// Check that this machine can use the lake's store: access, create-only
    /// puts, compare-and-swap, clock skew, lake format. One line per finding.
    Doctor,
    /// Stage the removal of REPO/BRANCH/PATH.
    Rm {
        target: String,
        /// Remove a directory and everything under it.
        #[arg(short, long)]
        recursive: bool,
    },
    /// Staged changes of a branch.
    Status { branch: Option<String> },
    /// Commit a branch's staged changes.
    Commit {
        branch: Option<String>,
        #[arg(short, long)]
        message: String,
        /// Metadata KEY=VALUE (repeatable).
        #[arg(long = "meta", value_name = "KEY=VALUE")]
        meta: Vec<String>,
        #[arg(long)]
        allow_empty: bool,
    },
    /// Discard staged changes of a branch (all, or under --path).
    Reset {
        branch: Option<String>,
        #[arg(long)]
        path: Option<String>,
    },
    /// List a directory at REPO/REF[/PATH].
    Ls {
        target: String,
        #[arg(short, long)]
        recursive: bool,
    },
    /// Print a file at REPO/REF/PATH.
    Cat { target: String },
    /// Copy a file or directory at REPO/REF[/PATH] to a local path.
    Get { source: String, dest: PathBuf },
    /// Commit history of a ref, newest first.
    Log {
        target: String,
        #[arg(short = 'n', long, default_value_t = 50)]
        limit: usize,
        /// Only commits that changed this path.
        #[arg(long)]
        path: Option<String>,
    },
    /// A commit: its metadata and the paths it changed.
    Show { target: String },
    /// Paths added, removed or changed between two refs (REPO/REF REPO/REF),
    /// or the staged changes of one branch (REPO/BRANCH).
    Diff {
        from: String,
        to: Option<String>,
        /// Only changes under this path.
        #[arg(long)]
        path: Option<String>,
    },
    /// Three-way merge of SOURCE (REPO/REF) into DEST (REPO/BRANCH).
    ///
    /// Conflicts (both sides changed a path differently, one changed what the
    /// other deleted, a file against a directory) fail the merge and change
    /// nothing; every conflicting path is listed. Changes staged on DEST stay
    /// staged, on top of the merge result. Merging a source that is already
    /// in DEST's history does nothing.
    Merge {
        source: String,
        dest: String,
        #[arg(short, long)]
        message: Option<String>,
        /// Resolve every conflict one way: source-wins or dest-wins.
        #[arg(long)]
        strategy: Option<String>,
        /// Fast-forward DEST when it is an ancestor of SOURCE (no merge commit).
        #[arg(long)]
        ff: bool,
        /// Metadata KEY=VALUE (repeatable).
        #[arg(long = "meta", value_name = "KEY=VALUE")]
        meta: Vec<String>,
    },
    /// New commit on REPO/BRANCH undoing COMMIT.
    Revert {
        branch: String,
        commit: String,
        /// For a merge commit: the parent (1-based) to revert against.
        #[arg(short = 'm', long = "mainline", value_name = "PARENT")]
        mainline: Option<usize>,
    },
    /// Apply the change COMMIT made to REPO/BRANCH as a new commit.
    CherryPick { commit: String, branch: String },
    /// The best common ancestor(s) of two refs.
    MergeBase { a: String, b: String },
    /// Mount the lake (all repositories) or one ref at DIR, in the foreground.
    ///
    /// `tarn mount DIR` shows /DIR/<repo>/<branch>/...; any other ref (tag,
    /// commit id or prefix, main~3) is a read-only directory resolved on
    /// lookup. `tarn mount --ref REPO/REF DIR` (or `tarn mount REPO@REF DIR`)
    /// shows one ref at DIR. Ctrl-C or SIGTERM unmounts cleanly.
    Mount {
        /// [REPO@REF] DIR
        #[arg(num_args = 1..=2, required = true, value_name = "DIR")]
        args: Vec<PathBuf>,
        /// Show one ref (REPO/REF) at the mount root.
        #[arg(long = "ref", value_name = "REPO/REF")]
        pinned: Option<String>,
        #[arg(long)]
        read_only: bool,
        /// Local chunk cache (default: ~/.cache/tarn).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Chunk cache size cap, e.g. 10G, 512M.
        #[arg(long, default_value = "10G")]
        cache_size: String,
        /// How long branch views may be stale, e.g. 1s, 500ms.
        #[arg(long, default_value = "1s")]
        metadata_ttl: String,
        /// Let other users see the mount (needs user_allow_other in /etc/fuse.conf).
        #[arg(long)]
        allow_other: bool,
        /// Detach once mounted.
        #[arg(long)]
        daemon: bool,
        /// Threads serving /dev/fuse, and helpers for requests that may wait
        /// (control commands, uploads, remote reads) with io_uring queues.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// close() returns once the change is in a journal on the cache
        /// disk; uploads and staging happen in the background (and resume
        /// after a crash). Control-file commands wait for them.
        #[arg(long)]
        writeback: bool,
        /// Serve requests through /dev/fuse only, not the per-CPU io_uring
        /// queues a recent kernel offers.
        #[arg(long)]
        no_io_uring: bool,
        /// Keep the io_uring queue threads in the normal scheduling class.
        /// By default they run in the idle class while nothing else keeps
        /// them waiting, so a caller they answer stays on its CPU (no wakeup
        /// of another CPU per request).
        #[arg(long)]
        no_idle_queues: bool,
    },
    /// Unmount a tarn mount.
    Umount { dir: PathBuf },
    /// mount(8) helper: `mount.tarn LAKE_URL DIR -o OPTIONS` (fstab type `tarn`).
    #[command(hide = true)]
    MountHelper {
        spec: String,
        dir: PathBuf,
        /// Comma-separated mount options.
        #[arg(short = 'o')]
        options: Option<String>,
        /// sloppy (ignore unknown options)
        #[arg(short = 's')]
        sloppy: bool,
        /// fake: check everything, mount nothing
        #[arg(short = 'f')]
        fake: bool,
        #[arg(short = 'n')]
        no_mtab: bool,
        #[arg(short = 'v')]
        verbose: bool,
    },
}

#[derive(Subcommand, Debug)]
enum RepoCmd {
    Create {
        name: String,
        #[arg(long, default_value = "main")]
        default_branch: String,
    },
    List,
    Delete {
        name: String,
    },
    /// Make a repository read-only: no staging, commits, merges, branches or tags.
    ReadOnly {
        name: String,
    },
    /// Make a read-only repository writable again.
    ReadWrite {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum BranchCmd {
    /// Create REPO/BRANCH from a ref (default: the repository's default branch). O(1).
    Create {
        branch: String,
        #[arg(long)]
        from: Option<String>,
    },
    List {
        repo: String,
    },
    Delete {
        branch: String,
    },
    /// Protect REPO/BRANCH: no direct writes, commits, resets or reverts; only
    /// merges that pass its pre-merge checks change it.
    Protect {
        branch: String,
    },
    /// Lift the protection of REPO/BRANCH.
    Unprotect {
        branch: String,
    },
}

#[derive(Subcommand, Debug)]
enum HooksCmd {
    /// Rehearse the checks an operation on REPO/BRANCH would run, on the
    /// commit it would make, without publishing anything.
    ///
    /// pre-commit/post-commit: the branch's staged changes; pre-merge/post-merge:
    /// merging REPO/BRANCH into --target; pre-create-branch/tag: creating
    /// --target (a name) at REPO/BRANCH.
    Run {
        branch: String,
        #[arg(long, default_value = "pre-commit")]
        event: String,
        /// Merge destination, or the name of the branch or tag to create.
        #[arg(long)]
        target: Option<String>,
    },
    /// Past runs of checks in REPO, newest first.
    Log {
        repo: String,
        #[arg(short = 'n', long, default_value_t = 20)]
        limit: usize,
        /// Show one run in full (all output).
        #[arg(long)]
        run: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum TagCmd {
    /// Create REPO/TAG at a ref (default: the default branch).
    Create {
        tag: String,
        at: Option<String>,
    },
    List {
        repo: String,
    },
    Delete {
        tag: String,
    },
}

/// Entry point: run the command, print errors as one line, return the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("bad arguments");
            eprintln!("tarn: {first} (see tarn --help)");
            return exit::USAGE;
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("TARN_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let json = cli.global.json;
    if !matches!(cli.command, Command::Mount { .. }) {
        // Like other Unix tools, end quietly when the reader of our output
        // goes away (`tarn ls ... | head`). The daemon keeps ignoring it.
        // SAFETY: resetting a signal disposition before any thread writes.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match run(cli) {
        Ok(()) => exit::OK,
        Err(e) => {
            let msg = crate::hooks::error_chain(e.as_ref());
            if let Some(r) = e.downcast_ref::<Reported>() {
                eprintln!("tarn: error: {msg}");
                return r.code;
            }
            let repo_error = e.downcast_ref::<RepoError>();
            let code = repo_error.map(exit::code).unwrap_or(exit::ERROR);
            if json {
                let mut doc = json!({"ok": false, "error": msg, "exit": code});
                match repo_error {
                    Some(RepoError::Conflict { paths, .. }) => doc["conflicts"] = json!(paths),
                    Some(RepoError::CheckFailed(f)) => {
                        doc["check"] = json!(f.check);
                        doc["candidate"] = json!(f.candidate);
                        doc["run"] = json!(f.run);
                    }
                    _ => {}
                }
                print_json(&doc);
            }
            eprintln!("tarn: error: {msg}");
            code
        }
    }
}

/// A failure whose details the command already printed (with `--json`,
/// as its one document): `main` adds only the one-line message.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
struct Reported {
    code: i32,
    msg: String,
}

/// Exit codes, for orchestrators (docs/ORCHESTRATION.md).
pub mod exit {
    use crate::repo::RepoError;

    pub const OK: i32 = 0;
    /// Anything not listed below; the message says what.
    pub const ERROR: i32 = 1;
    /// Bad arguments.
    pub const USAGE: i32 = 2;
    /// A merge, revert or cherry-pick has conflicts; nothing changed.
    pub const CONFLICT: i32 = 3;
    /// A check refused the operation; nothing changed.
    pub const CHECK_FAILED: i32 = 4;
    /// The branch is protected or the repository read-only.
    pub const PROTECTED: i32 = 5;
    /// Another writer kept winning the race for the ref; try again.
    pub const CONCURRENT: i32 = 6;

    pub fn code(e: &RepoError) -> i32 {
        match e {
            RepoError::Conflict { .. } => CONFLICT,
            RepoError::CheckFailed(_) => CHECK_FAILED,
            RepoError::Protected { .. } | RepoError::ReadOnlyRepo(_) => PROTECTED,
            RepoError::Concurrent(_) => CONCURRENT,
            _ => ERROR,
        }
    }
}

fn default_lake_url() -> Result<String> {
    let home = std::env::var("HOME").context("neither --lake, TARN_LAKE nor HOME is set")?;
    Ok(format!("file://{home}/.local/share/tarn/lake"))
}

fn lake_url(g: &Global) -> Result<String> {
    match &g.lake {
        Some(u) => Ok(u.clone()),
        None => default_lake_url(),
    }
}

fn open_lake(g: &Global) -> Result<Lake> {
    open_lake_at(&lake_url(g)?)
}

/// `open_lake` for a command that reads trees and writes none (ls, cat,
/// get, rm): see `Lake::read_trees_only`.
fn open_reading_lake(g: &Global) -> Result<Lake> {
    let mut lake = open_lake(g)?;
    lake.read_trees_only();
    Ok(lake)
}

/// Open a lake with the repository's checks wired in: every commit, merge
/// and branch or tag creation runs them.
fn open_lake_at(url: &str) -> Result<Lake> {
    let mut lake = Lake::open(Store::open(url)?)?;
    lake.set_hooks(std::sync::Arc::new(WarningHooks(hook_runner())));
    Ok(lake)
}

fn hook_runner() -> HookRunner {
    HookRunner::new(std::sync::Arc::new(snapshot::AutoSnapshots::new()))
}

/// The CLI reports failed post-event checks on stderr as it goes.
struct WarningHooks(HookRunner);

impl Hooks for WarningHooks {
    fn pre(&self, lake: &Lake, event: &HookEvent) -> crate::repo::Result<()> {
        self.0.pre(lake, event)
    }

    fn post(&self, lake: &Lake, event: &HookEvent) -> Vec<String> {
        for w in self.0.post(lake, event) {
            eprintln!("tarn: warning: {w}");
        }
        vec![]
    }
}

/// The lake and `REPO/BRANCH` a command works on: from the argument, or,
/// without one, from the branch of a tarn mount that contains the current
/// directory (its `.tarn/info`).
fn branch_target(g: &Global, arg: Option<&str>) -> Result<(Lake, String, String)> {
    if let Some(arg) = arg {
        let lake = open_lake(g)?;
        let a = Address::parse(arg)?;
        let branch = lake.require_branch(&a.repo, a.reference()?)?;
        return Ok((lake, a.repo, branch));
    }
    let cwd = std::env::current_dir()?;
    for dir in cwd.ancestors() {
        let Ok(text) = std::fs::read_to_string(dir.join(".tarn/info")) else {
            continue;
        };
        let info: serde_json::Value = serde_json::from_str(&text).context("reading .tarn/info")?;
        let field = |k: &str| info[k].as_str().map(str::to_string);
        let (Some(url), Some(repo)) = (field("lake"), field("repo")) else {
            bail!("{}: unreadable .tarn/info", dir.display());
        };
        let Some(branch) = field("branch") else {
            bail!(
                "{} is a read-only ref ({}), not a branch",
                dir.display(),
                info["ref"]
            );
        };
        let lake = open_lake_at(&url)?;
        return Ok((lake, repo, branch));
    }
    bail!("give REPO/BRANCH (or run this inside a branch of a tarn mount)")
}

/// Ask every tarn mount on this machine that shows `repo/branch` of this
/// lake to finish uploading closed files (`--writeback` mounts journal
/// them first), so a commit from the CLI includes them.
fn sync_local_mounts(url: &str, repo: &str, branch: &str) -> Result<()> {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Ok(());
    };
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        // After "-": the file system type, then the source ("fuse" and
        // "tarn", or "fuse.tarn" where the subtype is kept).
        let mut after = fields.iter().skip_while(|f| **f != "-").skip(1);
        let is_tarn = match (after.next(), after.next()) {
            (Some(&"fuse.tarn"), _) => true,
            (Some(t), Some(&"tarn")) => t.starts_with("fuse"),
            _ => false,
        };
        let Some(point) = fields.get(4).filter(|_| is_tarn) else {
            continue;
        };
        let point = PathBuf::from(point.replace("\\040", " "));
        for root in [point.join(repo).join(branch), point.clone()] {
            let Ok(text) = std::fs::read_to_string(root.join(".tarn/info")) else {
                continue;
            };
            let info: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            if info["lake"] == url && info["repo"] == repo && info["branch"] == branch {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(root.join(".tarn/ctl"))
                    .and_then(|mut f| f.write_all(b"sync\n"))
                    .with_context(|| {
                        format!("waiting for uploads of the mount at {}", root.display())
                    })?;
                break;
            }
        }
    }
    Ok(())
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("json"));
}

fn commit_json(id: &Hash, c: &Commit) -> serde_json::Value {
    json!({
        "id": id.to_hex(),
        "parents": c.parents.iter().map(|p| p.to_hex()).collect::<Vec<_>>(),
        "tree": c.tree.to_hex(),
        "author": c.author,
        "time": c.time,
        "message": c.message,
        "meta": c.meta,
        "generation": c.generation,
    })
}

fn fmt_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn print_changes(changes: &[Change]) {
    for c in changes {
        let mark = match c.kind {
            ChangeKind::Added => "A",
            ChangeKind::Removed => "D",
            ChangeKind::Modified => "M",
        };
        let size = match (c.size_before, c.size_after) {
            (Some(a), Some(b)) => format!("{a} -> {b} bytes"),
            (None, Some(b)) => format!("{b} bytes"),
            (Some(a), None) => format!("{a} bytes"),
            (None, None) => String::new(),
        };
        println!("{mark}  {}  {size}", c.path);
    }
}

fn run(cli: Cli) -> Result<()> {
    let g = cli.global;
    match cli.command {
        Command::Init { url } => {
            let url = match url {
                Some(u) => u,
                None => lake_url(&g)?,
            };
            let (_, created) = Lake::init(Store::open(&url)?)?;
            if g.json {
                print_json(&json!({"lake": url, "created": created}));
            } else if created {
                println!("created lake at {url}");
            } else {
                println!("lake at {url} already exists");
            }
        }
        cmd @ (Command::Import { .. } | Command::Export { .. }) => exchange_cmd(&g, cmd)?,
        Command::Fsck {
            repos,
            sample,
            external,
            repair_cache,
        } => {
            if !(0.0..=1.0).contains(&sample) {
                bail!("--sample {sample}: give a share between 0.0 and 1.0");
            }
            let lake = open_lake(&g)?;
            let mut report = lake.fsck(&crate::repo::FsckOptions {
                sample,
                repos,
                external,
            })?;
            let cache = match &repair_cache {
                Some(dir) => {
                    let (checked, removed) = crate::mount::cache::ChunkCache::repair(dir)
                        .with_context(|| format!("cache {}", dir.display()))?;
                    Some(json!({"dir": dir, "checked": checked, "removed": removed}))
                }
                None => None,
            };
            let problems = std::mem::take(&mut report.problems);
            if g.json {
                let mut v = serde_json::to_value(&report)?;
                v["problems"] = json!(problems);
                v["cache"] = json!(cache);
                print_json(&v);
            } else {
                for p in &problems {
                    println!("{p}");
                }
                println!(
                    "fsck: {} repositories, {} refs, {} commits, {} staged batches, {} nodes, {} chunks verified, {} checked present, {} imported objects: {} problem(s)",
                    report.repos,
                    report.refs,
                    report.commits,
                    report.batches,
                    report.nodes,
                    report.chunks_verified,
                    report.chunks_present,
                    report.externals,
                    problems.len()
                );
                if let Some(c) = &cache {
                    println!(
                        "cache {}: {} entries checked, {} bad ones removed",
                        c["dir"].as_str().unwrap_or(""),
                        c["checked"],
                        c["removed"]
                    );
                }
            }
            if !problems.is_empty() {
                return Err(Reported {
                    code: exit::ERROR,
                    msg: format!("fsck found {} problem(s)", problems.len()),
                }
                .into());
            }
        }
        Command::Doctor => {
            use crate::store::doctor::{Finding, Level};
            let url = lake_url(&g)?;
            let mut findings = match Store::open(&url) {
                Ok(store) => store.doctor(),
                Err(e) => vec![Finding {
                    level: Level::Fail,
                    check: "url",
                    detail: e.to_string(),
                }],
            };
            if findings.iter().all(|f| f.level != Level::Fail) {
                findings.push(
                    match Store::open(&url)
                        .map_err(RepoError::from)
                        .and_then(Lake::open)
                    {
                        Ok(lake) => Finding {
                            level: Level::Ok,
                            check: "lake",
                            detail: format!(
                                "format {}, {} repositories",
                                lake.config().format,
                                lake.list_repos().map(|r| r.len()).unwrap_or(0)
                            ),
                        },
                        Err(e) => Finding {
                            level: Level::Fail,
                            check: "lake",
                            detail: e.to_string(),
                        },
                    },
                );
            }
            if g.json {
                print_json(&json!(findings));
            } else {
                for f in &findings {
                    let tag = match f.level {
                        Level::Ok => "ok  ",
                        Level::Warn => "WARN",
                        Level::Fail => "FAIL",
                    };
                    println!("{tag} {:<18} {}", f.check, f.detail);
                }
            }
            let failed = findings.iter().filter(|f| f.level == Level::Fail).count();
            if failed > 0 {
                return Err(Reported {
                    code: exit::ERROR,
                    msg: format!("doctor: {failed} check(s) failed"),
                }
                .into());
            }
        }
        Command::Repo(cmd) => repo_cmd(&g, cmd)?,
        Command::Hooks(cmd) => hooks_cmd(&g, cmd)?,
        Command::Branch(cmd) => branch_cmd(&g, cmd)?,
        Command::Tag(cmd) => tag_cmd(&g, cmd)?,
        Command::Put { source, dest } => {
            let lake = open_lake(&g)?;
            let a = Address::parse(&dest)?;
            let branch = lake.require_branch(&a.repo, a.reference()?)?;
            lake.check_direct_write(&a.repo, &branch)?;
            let summary = put(&lake, &a.repo, &branch, &source, &a.path, !g.json)?;
            if g.json {
                print_json(&serde_json::to_value(&summary)?);
            } else {
                println!(
                    "staged {} file(s), {} bytes ({} new chunks) on {}/{}",
                    summary.files, summary.bytes, summary.new_chunks, a.repo, branch
                );
            }
        }
        Command::Rm { target, recursive } => {
            let lake = open_reading_lake(&g)?;
            let a = Address::parse(&target)?;
            let branch = lake.require_branch(&a.repo, a.reference()?)?;
            if a.path.is_empty() {
                bail!("refusing to remove the root of {}/{branch}", a.repo);
            }
            let tree = lake.working_tree(&a.repo, &branch)?.1;
            match lake.trees().lookup(&tree, &a.path)? {
                None => bail!("{target}: no such file or directory"),
                Some(Entry::Dir(_)) if !recursive => bail!("{target} is a directory: use rm -r"),
                Some(_) => {}
            }
            lake.stage(
                &a.repo,
                &branch,
                vec![Op::Delete {
                    path: a.path.clone(),
                }],
            )?;
            if g.json {
                print_json(&json!({"removed": a.path}));
            } else {
                println!("staged removal of {}", a.path);
            }
        }
        Command::Status { branch } => {
            let (mut lake, repo, branch) = branch_target(&g, branch.as_deref())?;
            lake.read_trees_only();
            let changes = lake.status(&repo, &branch)?;
            if g.json {
                print_json(&json!({"repo": repo, "branch": branch, "changes": changes}));
            } else if changes.is_empty() {
                println!("{repo}/{branch}: nothing staged");
            } else {
                println!("{repo}/{branch}: {} staged change(s)", changes.len());
                print_changes(&changes);
            }
        }
        Command::Commit {
            branch,
            message,
            meta,
            allow_empty,
        } => {
            let (lake, repo, branch) = branch_target(&g, branch.as_deref())?;
            sync_local_mounts(lake.store().url(), &repo, &branch)?;
            let opts = CommitOptions {
                message,
                author: None,
                meta: parse_meta(meta)?,
                allow_empty,
            };
            let id = lake.commit_branch(&repo, &branch, &opts)?;
            if g.json {
                print_json(&json!({"id": id.to_hex(), "repo": repo, "branch": branch}));
            } else {
                println!("{repo}/{branch} {}", id.short());
            }
        }
        Command::Reset { branch, path } => {
            let (lake, repo, branch) = branch_target(&g, branch.as_deref())?;
            match path {
                Some(p) => {
                    let p = crate::tree::check_path(&p)?;
                    lake.reset_path(&repo, &branch, &p)?;
                }
                None => lake.reset(&repo, &branch)?,
            }
            if g.json {
                print_json(&json!({"reset": format!("{repo}/{branch}")}));
            } else {
                println!("{repo}/{branch}: staged changes discarded");
            }
        }
        Command::Ls { target, recursive } => {
            let lake = open_reading_lake(&g)?;
            let a = Address::parse(&target)?;
            let tree = lake.tree_of(&a.repo, a.reference()?)?;
            let entries = match lake.trees().lookup(&tree, &a.path)? {
                None => bail!("{target}: no such file or directory"),
                Some(Entry::Dir(h)) => {
                    if recursive {
                        let mut all = Vec::new();
                        lake.trees().walk(&h, "", &mut all)?;
                        all
                    } else {
                        lake.trees().entries(&h)?
                    }
                }
                Some(e) => vec![(a.path.rsplit('/').next().unwrap_or("").to_string(), e)],
            };
            if g.json {
                let v: Vec<_> = entries
                    .iter()
                    .map(|(n, e)| {
                        let (mode, mtime) = match e {
                            Entry::File(f) => (f.mode, f.mtime),
                            _ => (0, 0),
                        };
                        json!({"name": n, "kind": e.kind(), "size": e.size(), "mode": mode, "mtime_ns": mtime})
                    })
                    .collect();
                print_json(&json!(v));
            } else {
                for (n, e) in entries {
                    let suffix = match &e {
                        Entry::Dir(_) => "/".to_string(),
                        Entry::Symlink(t) => format!(" -> {t}"),
                        Entry::File(_) => String::new(),
                    };
                    println!("{:<7} {:>12}  {n}{suffix}", e.kind(), e.size());
                }
            }
        }
        Command::Cat { target } => {
            let lake = open_reading_lake(&g)?;
            let a = Address::parse(&target)?;
            let tree = lake.tree_of(&a.repo, a.reference()?)?;
            match lake.trees().lookup(&tree, &a.path)? {
                Some(Entry::File(f)) => {
                    let stdout = std::io::stdout();
                    let mut out = std::io::BufWriter::new(stdout.lock());
                    lake.read_file(&f, &mut out)?;
                    out.flush()?;
                }
                Some(Entry::Symlink(t)) => println!("{t}"),
                Some(Entry::Dir(_)) => bail!("{target} is a directory: use tarn ls or tarn get"),
                None => bail!("{target}: no such file or directory"),
            }
        }
        Command::Get { source, dest } => {
            let lake = open_reading_lake(&g)?;
            let a = Address::parse(&source)?;
            let tree = lake.tree_of(&a.repo, a.reference()?)?;
            let entry = lake
                .trees()
                .lookup(&tree, &a.path)?
                .ok_or_else(|| anyhow!("{source}: no such file or directory"))?;
            let dest = if dest.is_dir() && !matches!(entry, Entry::Dir(_)) {
                dest.join(a.path.rsplit('/').next().unwrap_or("file"))
            } else {
                dest
            };
            let n = lake.materialize(&entry, &dest)?;
            if g.json {
                print_json(&json!({"files": n, "dest": dest}));
            } else {
                println!("wrote {n} file(s) to {}", dest.display());
            }
        }
        Command::Log {
            target,
            limit,
            path,
        } => {
            let lake = open_lake(&g)?;
            let a = Address::parse(&target)?;
            let head = lake.resolve(&a.repo, a.reference()?)?.commit;
            let path = match path {
                Some(p) => Some(crate::tree::check_path(&p)?),
                None => None,
            };
            let commits = match &path {
                None => lake.log(&a.repo, &head, limit)?,
                Some(p) => lake.log_path(&a.repo, &head, p, limit)?,
            };
            if g.json {
                print_json(&json!(commits
                    .iter()
                    .map(|(h, c)| commit_json(h, c))
                    .collect::<Vec<_>>()));
            } else {
                for (h, c) in commits {
                    println!("commit {}", h.to_hex());
                    if c.parents.len() > 1 {
                        let ps: Vec<String> = c.parents.iter().map(|p| p.short()).collect();
                        println!("Merge:  {}", ps.join(" "));
                    }
                    println!("Author: {}", c.author);
                    println!("Date:   {}", fmt_time(c.time));
                    for (k, v) in &c.meta {
                        println!("Meta:   {k}={v}");
                    }
                    println!("\n    {}\n", c.message);
                }
            }
        }
        Command::Mount {
            args,
            pinned,
            read_only,
            cache_dir,
            cache_size,
            metadata_ttl,
            allow_other,
            daemon,
            threads,
            writeback,
            no_io_uring,
            no_idle_queues,
        } => {
            let (source, dir) = match args.as_slice() {
                [dir] => (pinned, dir.clone()),
                [src, dir] => {
                    if pinned.is_some() {
                        bail!("give the ref either as REPO@REF or with --ref, not both");
                    }
                    (Some(src.to_string_lossy().replace('@', "/")), dir.clone())
                }
                _ => bail!("usage: tarn mount [REPO@REF] DIR"),
            };
            let pinned = match source {
                Some(s) => {
                    let a = Address::parse(&s)?;
                    if !a.path.is_empty() {
                        bail!("{s}: give REPO/REF, without a path");
                    }
                    Some((a.repo.clone(), a.reference()?.to_string()))
                }
                None => None,
            };
            if !dir.is_dir() {
                bail!("{}: not a directory", dir.display());
            }
            if daemon {
                return spawn_daemon(&dir);
            }
            let signals = crate::mount::block_signals();
            let mut lake = open_lake(&g)?;
            // Failed post-event checks go into `.tarn/result`, not the log.
            lake.set_hooks(std::sync::Arc::new(hook_runner()));
            lake.set_background_cleanup(true);
            if let Some((repo, r)) = &pinned {
                lake.resolve(repo, r)?;
            }
            let cache_dir = match cache_dir {
                Some(d) => d,
                None => {
                    let base = std::env::var_os("XDG_CACHE_HOME")
                        .map(PathBuf::from)
                        .or_else(|| {
                            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache"))
                        })
                        .ok_or_else(|| anyhow!("give --cache-dir (no HOME)"))?;
                    base.join("tarn")
                }
            };
            crate::mount::run(
                lake,
                crate::mount::MountOptions {
                    mountpoint: dir,
                    pinned,
                    read_only,
                    cache_dir,
                    cache_size: parse_size(&cache_size).map_err(anyhow::Error::msg)?,
                    metadata_ttl: parse_duration(&metadata_ttl).map_err(anyhow::Error::msg)?,
                    allow_other,
                    threads,
                    writeback,
                    io_uring: !no_io_uring,
                    idle_queues: !no_idle_queues,
                },
                signals,
            )?;
        }
        Command::MountHelper {
            spec,
            dir,
            options,
            sloppy,
            fake,
            no_mtab: _,
            verbose,
        } => {
            let args = mount_helper_args(&spec, &dir, options.as_deref().unwrap_or(""), sloppy)?;
            if verbose || fake {
                eprintln!("tarn {}", args.join(" "));
            }
            if !fake {
                let status = std::process::Command::new(std::env::current_exe()?)
                    .args(&args)
                    .status()?;
                if !status.success() {
                    bail!("tarn mount failed ({status})");
                }
            }
        }
        Command::Umount { dir } => {
            crate::mount::unmount(&dir)?;
            if g.json {
                print_json(&json!({"unmounted": dir}));
            }
        }
        cmd @ (Command::Diff { .. }
        | Command::Merge { .. }
        | Command::Revert { .. }
        | Command::CherryPick { .. }
        | Command::MergeBase { .. }) => history_cmd(&g, cmd)?,
        Command::Show { target } => {
            let lake = open_lake(&g)?;
            let a = Address::parse(&target)?;
            let id = lake.resolve(&a.repo, a.reference()?)?.commit;
            let c = lake.commit(&a.repo, &id)?;
            let before = match c.parents.first() {
                Some(p) => lake.commit(&a.repo, p)?.tree,
                None => lake.trees().empty_dir(),
            };
            let changes = lake.diff_trees(&before, &c.tree)?;
            if g.json {
                print_json(&json!({"commit": commit_json(&id, &c), "changes": changes}));
            } else {
                println!("commit {}", id.to_hex());
                for p in &c.parents {
                    println!("Parent: {}", p.to_hex());
                }
                println!("Author: {}", c.author);
                println!("Date:   {}", fmt_time(c.time));
                for (k, v) in &c.meta {
                    println!("Meta:   {k}={v}");
                }
                println!("\n    {}\n", c.message);
                print_changes(&changes);
            }
        }
    }
    Ok(())
}

/// Options mount(8) and fstab pass that mean nothing to tarn.
const IGNORED_MOUNT_OPTIONS: &[&str] = &[
    "rw",
    "defaults",
    "auto",
    "noauto",
    "user",
    "users",
    "nouser",
    "nofail",
    "_netdev",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "async",
    "sync",
    "atime",
    "noatime",
    "relatime",
    "strictatime",
    "lazytime",
];

/// The `tarn mount` command line for a mount(8) helper call
/// (`mount.tarn LAKE_URL DIR -o opt,key=value,...`).
fn mount_helper_args(spec: &str, dir: &Path, options: &str, sloppy: bool) -> Result<Vec<String>> {
    let lake = spec.strip_prefix("tarn#").unwrap_or(spec);
    let mut args = vec![
        "mount".to_string(),
        dir.to_string_lossy().into_owned(),
        "--lake".to_string(),
        lake.to_string(),
        "--daemon".to_string(),
    ];
    for opt in options.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        let flag = |name: &str| -> Result<Vec<String>> {
            match value {
                Some(v) if !v.is_empty() => Ok(vec![format!("--{name}"), v.to_string()]),
                _ => bail!("mount option {key} needs a value ({key}=...)"),
            }
        };
        match key {
            "ro" => args.push("--read-only".into()),
            "allow_other" => args.push("--allow-other".into()),
            "writeback" => args.push("--writeback".into()),
            "no_io_uring" => args.push("--no-io-uring".into()),
            "no_idle_queues" => args.push("--no-idle-queues".into()),
            "ref" => args.extend(flag("ref")?),
            "cache_dir" => args.extend(flag("cache-dir")?),
            "cache_size" => args.extend(flag("cache-size")?),
            "metadata_ttl" => args.extend(flag("metadata-ttl")?),
            "threads" => args.extend(flag("threads")?),
            k if IGNORED_MOUNT_OPTIONS.contains(&k) || k.starts_with("x-") || k.starts_with("comment=") => {}
            _ if sloppy => {}
            _ => bail!("unknown mount option {opt:?} (tarn knows ro, allow_other, writeback, no_io_uring, no_idle_queues, ref=, cache_dir=, cache_size=, metadata_ttl=, threads=)"),
        }
    }
    Ok(args)
}

/// Start this same command again without `--daemon`, detached, and return
/// once the mount is up (or say why it did not come up).
fn spawn_daemon(dir: &Path) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()?;
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--daemon")
        .collect();
    let log_path = std::env::temp_dir().join(format!("tarn-mount-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid in the child before exec only changes its session.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        if crate::mount::is_mounted(dir) {
            println!(
                "mounted {} (daemon pid {}, log {})",
                dir.display(),
                child.id(),
                log_path.display()
            );
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!(
                "mount daemon exited ({status}): {}",
                log.lines().last().unwrap_or("no output")
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    bail!(
        "{} did not come up within 15 s (log {})",
        dir.display(),
        log_path.display()
    )
}

fn parse_meta(meta: Vec<String>) -> Result<BTreeMap<String, String>> {
    let mut m = BTreeMap::new();
    for kv in meta {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("--meta {kv:?}: expected KEY=VALUE"))?;
        m.insert(k.to_string(), v.to_string());
    }
    Ok(m)
}

/// A ref argument in the context of `repo`: `REPO/REF` or a bare `REF`.
fn ref_in(repo: &str, arg: &str) -> Result<String> {
    match arg.split_once('/') {
        Some((r, rest)) if !rest.contains('/') => {
            if r != repo {
                bail!("{arg}: refs must be in repository {repo}");
            }
            Ok(rest.to_string())
        }
        Some(_) => bail!("{arg}: expected REPO/REF"),
        None => Ok(arg.to_string()),
    }
}

fn history_cmd(g: &Global, cmd: Command) -> Result<()> {
    let mut lake = open_lake(g)?;
    if let Command::Diff { .. } = cmd {
        lake.read_trees_only();
    }
    match cmd {
        Command::Diff { from, to, path } => {
            let a = Address::parse(&from)?;
            let path = match path {
                Some(p) => crate::tree::check_path(&p)?,
                None => a.path.clone(),
            };
            let (before, after, what) = match to {
                None => {
                    let branch = lake.require_branch(&a.repo, a.reference()?)?;
                    let (base, work) = lake.working_tree(&a.repo, &branch)?;
                    (base, work, format!("staged on {}/{branch}", a.repo))
                }
                Some(to) => {
                    let b = ref_in(&a.repo, &to)?;
                    let x = lake.resolve(&a.repo, a.reference()?)?.commit;
                    let y = lake.resolve(&a.repo, &b)?.commit;
                    let tx = lake.commit(&a.repo, &x)?.tree;
                    let ty = lake.commit(&a.repo, &y)?.tree;
                    (tx, ty, format!("{} -> {}", x.short(), y.short()))
                }
            };
            let changes = if path.is_empty() {
                lake.diff_trees(&before, &after)?
            } else {
                lake.diff_path(&before, &after, &path)?
            };
            if g.json {
                print_json(&json!({"repo": a.repo, "diff": what, "changes": changes}));
            } else {
                print_changes(&changes);
            }
        }
        Command::Merge {
            source,
            dest,
            message,
            strategy,
            ff,
            meta,
        } => {
            let d = Address::parse(&dest)?;
            let src = ref_in(&d.repo, &source)?;
            let opts = MergeOptions {
                message,
                author: None,
                meta: parse_meta(meta)?,
                strategy: strategy.map(|s| s.parse()).transpose()?,
                ff,
            };
            let outcome = lake.merge(&d.repo, &src, d.reference()?, &opts)?;
            let (kind, id) = match &outcome {
                MergeOutcome::UpToDate => ("up-to-date", None),
                MergeOutcome::FastForward(h) => ("fast-forward", Some(h.to_hex())),
                MergeOutcome::Merged(h) => ("merged", Some(h.to_hex())),
            };
            if g.json {
                print_json(&json!({"merged": id.is_some(), "outcome": kind, "commit": id}));
            } else {
                match outcome {
                    MergeOutcome::UpToDate => {
                        println!("nothing to merge: {source} is already in {dest}")
                    }
                    MergeOutcome::FastForward(h) => {
                        println!("{dest} fast-forwarded to {}", h.short())
                    }
                    MergeOutcome::Merged(h) => {
                        println!("merged {source} into {dest}: {}", h.short())
                    }
                }
            }
        }
        Command::Revert {
            branch,
            commit,
            mainline,
        } => {
            let a = Address::parse(&branch)?;
            let c = lake.resolve(&a.repo, &ref_in(&a.repo, &commit)?)?.commit;
            let id = lake.revert(&a.repo, a.reference()?, &c, mainline, None)?;
            if g.json {
                print_json(&json!({"commit": id.to_hex(), "reverted": c.to_hex()}));
            } else {
                println!("reverted {} on {branch}: {}", c.short(), id.short());
            }
        }
        Command::CherryPick { commit, branch } => {
            let a = Address::parse(&branch)?;
            let c = lake.resolve(&a.repo, &ref_in(&a.repo, &commit)?)?.commit;
            let id = lake.cherry_pick(&a.repo, &c, a.reference()?, None)?;
            if g.json {
                print_json(&json!({"commit": id.to_hex(), "picked": c.to_hex()}));
            } else {
                println!("picked {} onto {branch}: {}", c.short(), id.short());
            }
        }
        Command::MergeBase { a, b } => {
            let x = Address::parse(&a)?;
            let y = ref_in(&x.repo, &b)?;
            let ha = lake.resolve(&x.repo, x.reference()?)?.commit;
            let hb = lake.resolve(&x.repo, &y)?.commit;
            let bases = lake.merge_bases(&x.repo, &ha, &hb)?;
            if bases.is_empty() {
                bail!("{a} and {b} have no common ancestor");
            }
            if g.json {
                print_json(&json!(bases.iter().map(|h| h.to_hex()).collect::<Vec<_>>()));
            } else {
                for h in bases {
                    println!("{}", h.to_hex());
                }
            }
        }
        _ => unreachable!("history_cmd handles history commands only"),
    }
    Ok(())
}

fn exchange_cmd(g: &Global, cmd: Command) -> Result<()> {
    let lake = open_lake(g)?;
    let bar = |len: Option<u64>, template: &str| {
        let pb = match (g.json, len) {
            (true, _) => indicatif::ProgressBar::hidden(),
            (false, Some(n)) => indicatif::ProgressBar::new(n),
            (false, None) => indicatif::ProgressBar::new_spinner(),
        };
        pb.set_style(indicatif::ProgressStyle::with_template(template).expect("template"));
        pb
    };
    match cmd {
        Command::Import {
            source,
            dest,
            message,
            no_commit,
            dry_run,
            meta,
        } => {
            let d = Address::parse(&dest)?;
            let branch = lake.require_branch(&d.repo, d.reference()?)?;
            let commit = (!no_commit).then(|| -> Result<CommitOptions> {
                Ok(CommitOptions {
                    message: message
                        .clone()
                        .unwrap_or_else(|| format!("import {source}")),
                    author: None,
                    meta: parse_meta(meta.clone())?,
                    allow_empty: false,
                })
            });
            let commit = commit.transpose()?;
            if let Some(rest) = source.strip_prefix("tarn://") {
                let a = Address::parse(rest)?;
                let reference = a.reference()?.to_string();
                if dry_run {
                    let tree = lake
                        .commit(&a.repo, &lake.resolve(&a.repo, &reference)?.commit)?
                        .tree;
                    let found = lake.trees().lookup(&tree, &a.path)?.is_some();
                    if !found {
                        bail!("{source}: no such file or directory");
                    }
                    if g.json {
                        print_json(&json!({"dry_run": true, "graft": source, "dest": dest}));
                    } else {
                        println!("would graft {source} at {dest}");
                    }
                    return Ok(());
                }
                let (at, entry) =
                    lake.graft(&a.repo, &reference, &a.path, &d.repo, &branch, &d.path)?;
                let id = match &commit {
                    Some(c) => Some(lake.commit_branch(&d.repo, &branch, c)?.to_hex()),
                    None => None,
                };
                if g.json {
                    print_json(
                        &json!({"graft": source, "from_commit": at.to_hex(), "kind": entry.kind(), "dest": dest, "commit": id}),
                    );
                } else {
                    println!(
                        "grafted {}/{} ({}) at {dest}",
                        a.repo,
                        at.short(),
                        if a.path.is_empty() { "/" } else { &a.path }
                    );
                    if let Some(id) = id {
                        println!("{}/{branch} {}", d.repo, &id[..12]);
                    }
                }
                return Ok(());
            }
            let pb = bar(None, "{spinner} {pos} objects listed {msg}");
            let opts = crate::repo::ImportOptions { dry_run, commit };
            let summary = lake.import(&source, &d.repo, &branch, &d.path, &opts, &mut |o| {
                if dry_run && !g.json {
                    pb.suspend(|| println!("{:>12}  {}  {}", o.size, o.rel, o.url));
                }
                pb.inc(1);
            })?;
            pb.finish_and_clear();
            for s in &summary.skipped {
                eprintln!("tarn: warning: skipped {s}");
            }
            if g.json {
                print_json(&serde_json::to_value(&summary)?);
            } else if dry_run {
                println!(
                    "would import {} objects, {} bytes, into {}/{branch}/{}",
                    summary.objects, summary.bytes, d.repo, d.path
                );
            } else {
                println!(
                    "imported {} objects, {} bytes, by reference into {}/{branch}/{} in {:.2} s{}",
                    summary.objects,
                    summary.bytes,
                    d.repo,
                    d.path,
                    summary.seconds,
                    match &summary.commit {
                        Some(c) => format!("; commit {}", &c[..12]),
                        None => " (staged)".to_string(),
                    }
                );
            }
        }
        Command::Export { source, dest } => {
            let a = Address::parse(&source)?;
            let pb = bar(
                Some(0),
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            );
            let summary = lake.export(
                &a.repo,
                a.reference()?,
                &a.path,
                &dest,
                &mut |n| pb.set_length(n),
                &mut |n| pb.inc(n),
            )?;
            pb.finish_and_clear();
            if g.json {
                print_json(&serde_json::to_value(&summary)?);
            } else {
                println!(
                    "exported {} files, {} bytes, to {dest} in {:.2} s ({} already there{})",
                    summary.files,
                    summary.bytes,
                    summary.seconds,
                    summary.unchanged,
                    if summary.symlinks_skipped > 0 {
                        format!(", {} symlinks left out", summary.symlinks_skipped)
                    } else {
                        String::new()
                    }
                );
            }
        }
        _ => unreachable!("exchange_cmd handles import and export only"),
    }
    Ok(())
}

fn repo_cmd(g: &Global, cmd: RepoCmd) -> Result<()> {
    let lake = open_lake(g)?;
    match &cmd {
        RepoCmd::Create {
            name,
            default_branch,
        } => {
            let id = lake.create_repo(name, default_branch)?;
            if g.json {
                print_json(
                    &json!({"repo": name, "default_branch": default_branch, "commit": id.to_hex()}),
                );
            } else {
                println!("created repository {name} (branch {default_branch})");
            }
        }
        RepoCmd::List => {
            let repos = lake.list_repos()?;
            if g.json {
                print_json(&json!(repos));
            } else {
                for r in repos {
                    println!("{r}");
                }
            }
        }
        RepoCmd::ReadOnly { name } | RepoCmd::ReadWrite { name } => {
            let on = matches!(cmd, RepoCmd::ReadOnly { .. });
            lake.set_read_only(name, on)?;
            let state = if on { "read-only" } else { "writable" };
            if g.json {
                print_json(&json!({"repo": name, "read_only": on}));
            } else {
                println!("repository {name} is {state}");
            }
        }
        RepoCmd::Delete { name } => {
            lake.delete_repo(name)?;
            if g.json {
                print_json(&json!({"deleted": name}));
            } else {
                println!("deleted repository {name}");
            }
        }
    }
    Ok(())
}

fn split_repo_name(s: &str, what: &str) -> Result<(String, String)> {
    match s.split_once('/') {
        Some((r, n)) if !r.is_empty() && !n.is_empty() && !n.contains('/') => {
            Ok((r.to_string(), n.to_string()))
        }
        _ => bail!("{s:?}: expected REPO/{what}"),
    }
}

fn branch_cmd(g: &Global, cmd: BranchCmd) -> Result<()> {
    let lake = open_lake(g)?;
    match &cmd {
        BranchCmd::Create { branch, from } => {
            let (repo, name) = split_repo_name(branch, "BRANCH")?;
            let from = match from {
                Some(f) => f.clone(),
                None => lake.repo_config(&repo)?.default_branch,
            };
            let at = lake.create_branch(&repo, &name, &from)?;
            if g.json {
                print_json(&json!({"repo": repo, "branch": name, "commit": at.to_hex()}));
            } else {
                println!("created branch {repo}/{name} at {}", at.short());
            }
        }
        BranchCmd::List { repo } => {
            let default = lake.repo_config(repo)?.default_branch;
            let branches = lake.list_branches(repo)?;
            if g.json {
                let v: Vec<_> = branches
                    .iter()
                    .map(|(n, r)| json!({"name": n, "commit": r.commit, "default": *n == default}))
                    .collect();
                print_json(&json!(v));
            } else {
                for (n, r) in branches {
                    let mark = if n == default { "*" } else { " " };
                    println!("{mark} {n:<24} {}", &r.commit[..12]);
                }
            }
        }
        BranchCmd::Protect { branch } | BranchCmd::Unprotect { branch } => {
            let on = matches!(cmd, BranchCmd::Protect { .. });
            let (repo, name) = split_repo_name(branch, "BRANCH")?;
            lake.set_protected(&repo, &name, on)?;
            if g.json {
                print_json(&json!({"repo": repo, "branch": name, "protected": on}));
            } else if on {
                println!("{branch} is protected: only merges that pass its checks change it");
            } else {
                println!("{branch} is no longer protected");
            }
        }
        BranchCmd::Delete { branch } => {
            let (repo, name) = split_repo_name(branch, "BRANCH")?;
            lake.delete_branch(&repo, &name)?;
            if g.json {
                print_json(&json!({"deleted": branch}));
            } else {
                println!("deleted branch {branch}");
            }
        }
    }
    Ok(())
}

fn hooks_cmd(g: &Global, cmd: HooksCmd) -> Result<()> {
    let lake = open_lake(g)?;
    match cmd {
        HooksCmd::Run {
            branch,
            event,
            target,
        } => {
            let a = Address::parse(&branch)?;
            let repo = a.repo.clone();
            let name = lake.require_branch(&repo, a.reference()?)?;
            let kind = EventKind::parse(&event).ok_or_else(|| {
                anyhow!(
                    "unknown event {event:?}: use one of {}",
                    EventKind::ALL.map(|k| k.name()).join(", ")
                )
            })?;
            let need_target = || {
                target
                    .as_deref()
                    .map(|t| ref_in(&repo, t))
                    .transpose()?
                    .ok_or_else(|| anyhow!("--event {kind} needs --target"))
            };
            let (target, source, commit, config_tree) = match kind {
                EventKind::PreCommit | EventKind::PostCommit => {
                    if target.is_some() {
                        bail!("--target is for merges and branch or tag creation, not {kind}");
                    }
                    let (c, tree) =
                        lake.commit_candidate(&repo, &name, "candidate (tarn hooks run)")?;
                    (name.clone(), None, c, tree)
                }
                EventKind::PreMerge | EventKind::PostMerge => {
                    let dest = need_target()?;
                    let (c, tree) =
                        lake.merge_candidate(&repo, &name, &dest, &MergeOptions::default())?;
                    (dest, Some(name.clone()), c, tree)
                }
                EventKind::PreCreateBranch
                | EventKind::PostCreateBranch
                | EventKind::PreCreateTag
                | EventKind::PostCreateTag => {
                    let new = need_target()?;
                    crate::repo::check_name("ref", &new)?;
                    let at = lake.resolve(&repo, &name)?.commit;
                    let default = lake.repo_config(&repo)?.default_branch;
                    let policy = lake.resolve(&repo, &default)?.commit;
                    (
                        new,
                        Some(name.clone()),
                        at,
                        lake.commit(&repo, &policy)?.tree,
                    )
                }
            };
            let event = HookEvent {
                kind,
                repo: repo.clone(),
                target,
                source,
                commit,
                config_tree,
                dry_run: true,
            };
            let Some(record) = hook_runner().run(&lake, &event)? else {
                if g.json {
                    print_json(&json!({"run": null, "status": "none"}));
                } else {
                    println!("no checks react to {kind} on {repo}/{}", event.target);
                }
                return Ok(());
            };
            if g.json {
                print_json(&serde_json::to_value(&record)?);
            } else {
                print_run(&record, Some(5));
            }
            if let Some((check, detail)) = record.failure_summary() {
                let e = RepoError::CheckFailed(Box::new(crate::repo::CheckFailure {
                    event: record.event.clone(),
                    repo,
                    what: "the rehearsal".into(),
                    check,
                    detail,
                    candidate: commit.short(),
                    run: record.id,
                }));
                return Err(Reported {
                    code: exit::code(&e),
                    msg: e.to_string(),
                }
                .into());
            }
        }
        HooksCmd::Log { repo, limit, run } => {
            let ids = match &run {
                Some(id) => vec![id.clone()],
                None => {
                    let mut ids = lake.list_runs(&repo)?;
                    ids.reverse();
                    ids.truncate(limit);
                    ids
                }
            };
            let mut records = Vec::new();
            for id in ids {
                let bytes = lake.read_run(&repo, &id)?;
                let r: RunRecord = serde_json::from_slice(&bytes)
                    .with_context(|| format!("hook run {id} is unreadable"))?;
                records.push(r);
            }
            if g.json {
                print_json(&serde_json::to_value(&records)?);
            } else if records.is_empty() {
                println!("{repo}: no hook runs yet");
            } else {
                let lines = if run.is_some() { None } else { Some(5) };
                for r in &records {
                    print_run(r, lines);
                }
            }
        }
    }
    Ok(())
}

/// Failures shout, so they stand out in a long log.
fn status_word(s: Status) -> &'static str {
    match s {
        Status::Passed => "passed",
        Status::Failed => "FAILED",
        Status::Skipped => "skipped",
    }
}

/// A hook run for people: a header line, a line per check, and the last
/// `lines` lines of each check's output (all of it with `None`).
fn print_run(r: &RunRecord, lines: Option<usize>) {
    let status = status_word(r.status);
    let what = match &r.source {
        Some(src) => format!("{} <- {src}", r.target),
        None => r.target.clone(),
    };
    let dry = if r.dry_run { " (rehearsal)" } else { "" };
    println!(
        "run {}  {}  {} {what}  {status}  {} ms  candidate {}{dry}",
        r.id,
        fmt_time(r.time),
        r.event,
        r.duration_ms,
        &r.commit[..12.min(r.commit.len())]
    );
    for c in &r.checks {
        let code = match (c.kind.as_str(), c.code) {
            ("webhook", Some(code)) => format!("HTTP {code}"),
            (_, Some(code)) => format!("exit {code}"),
            _ => String::new(),
        };
        let status = status_word(c.status);
        println!(
            "  {status:<8} {}/{}  {code}  {} ms",
            c.hook, c.check, c.duration_ms
        );
        let out: Vec<&str> = c.output.lines().collect();
        let from = lines.map(|n| out.len().saturating_sub(n)).unwrap_or(0);
        for l in &out[from..] {
            println!("      {l}");
        }
    }
}

fn tag_cmd(g: &Global, cmd: TagCmd) -> Result<()> {
    let lake = open_lake(g)?;
    match cmd {
        TagCmd::Create { tag, at } => {
            let (repo, name) = split_repo_name(&tag, "TAG")?;
            let at = match at {
                Some(a) => a,
                None => lake.repo_config(&repo)?.default_branch,
            };
            let id = lake.create_tag(&repo, &name, &at)?;
            if g.json {
                print_json(&json!({"repo": repo, "tag": name, "commit": id.to_hex()}));
            } else {
                println!("created tag {repo}/{name} at {}", id.short());
            }
        }
        TagCmd::List { repo } => {
            let tags = lake.list_tags(&repo)?;
            if g.json {
                let v: Vec<_> = tags
                    .iter()
                    .map(|(n, h)| json!({"name": n, "commit": h.to_hex()}))
                    .collect();
                print_json(&json!(v));
            } else {
                for (n, h) in tags {
                    println!("{n:<24} {}", h.short());
                }
            }
        }
        TagCmd::Delete { tag } => {
            let (repo, name) = split_repo_name(&tag, "TAG")?;
            lake.delete_tag(&repo, &name)?;
            if g.json {
                print_json(&json!({"deleted": tag}));
            } else {
                println!("deleted tag {tag}");
            }
        }
    }
    Ok(())
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}/{name}")
    }
}

/// Local sources of a `put`: (local path, path in the tree).
fn collect_sources(src: &Path, dest: &str, out: &mut Vec<(PathBuf, String)>) -> Result<()> {
    let meta = std::fs::symlink_metadata(src).with_context(|| format!("{}", src.display()))?;
    out.push((src.to_path_buf(), dest.to_string()));
    if meta.is_dir() {
        collect_dir(src, dest, out)?;
    }
    Ok(())
}

/// The entries under a directory, depth first; file types come from the
/// directory listing itself, so a million files cost no extra `stat`s here.
fn collect_dir(dir: &Path, dest: &str, out: &mut Vec<(PathBuf, String)>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("{}", dir.display()))?
        .collect::<std::io::Result<Vec<_>>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e
            .file_name()
            .into_string()
            .map_err(|n| anyhow!("{}: file name is not UTF-8", Path::new(&n).display()))?;
        let path = e.path();
        let child = join(dest, &name);
        let is_dir = e
            .file_type()
            .with_context(|| format!("{}", path.display()))?
            .is_dir();
        out.push((path.clone(), child.clone()));
        if is_dir {
            collect_dir(&path, &child, out)?;
        }
    }
    Ok(())
}

/// Stage a local file or directory tree at `dest` on a branch.
fn put(
    lake: &Lake,
    repo: &str,
    branch: &str,
    src: &Path,
    dest: &str,
    progress: bool,
) -> Result<PutSummary> {
    let meta = std::fs::metadata(src).with_context(|| format!("{}", src.display()))?;
    let dest = if dest.is_empty() || (dest.ends_with('/') && !meta.is_dir()) {
        let name = src
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| anyhow!("{}: give a destination path", src.display()))?;
        join(dest.trim_end_matches('/'), name)
    } else {
        dest.to_string()
    };
    if meta.is_dir() && dest.is_empty() {
        bail!("give a destination directory");
    }
    let mut sources = Vec::new();
    collect_sources(src, &dest, &mut sources)?;
    let bar =
        if progress && sources.len() > 1 && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            indicatif::ProgressBar::new(sources.len() as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} files {bytes_per_sec} {eta}")
            .expect("template"),
    );
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, Op)>> = Mutex::new(Vec::with_capacity(sources.len()));
    let summary = Mutex::new(PutSummary::default());
    let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= sources.len() || first_error.lock().expect("lock").is_some() {
                    return;
                }
                let (local, path) = &sources[i];
                match stage_one(lake, local, path) {
                    Ok((op, stats)) => {
                        let mut sum = summary.lock().expect("lock");
                        if let Some(st) = stats {
                            sum.files += 1;
                            sum.bytes += st.bytes;
                            sum.chunks += st.chunks as u64;
                            sum.new_chunks += st.new_chunks as u64;
                        }
                        drop(sum);
                        results.lock().expect("lock").push((i, op));
                        bar.inc(1);
                    }
                    Err(e) => {
                        first_error.lock().expect("lock").get_or_insert(e);
                    }
                }
            });
        }
    });
    bar.finish_and_clear();
    if let Some(e) = first_error.into_inner().expect("lock") {
        return Err(e);
    }
    let mut ops = results.into_inner().expect("lock");
    ops.sort_by_key(|(i, _)| *i);
    // Manifests of large files must be in the store before ops name them.
    lake.flush()?;
    let ops: Vec<Op> = ops.into_iter().map(|(_, op)| op).collect();
    for batch in ops.chunks(PUT_BATCH_OPS) {
        lake.stage(repo, branch, batch.to_vec())?;
    }
    Ok(summary.into_inner().expect("lock"))
}

fn stage_one(
    lake: &Lake,
    local: &Path,
    path: &str,
) -> Result<(Op, Option<crate::chunk::StoreStats>)> {
    let meta = std::fs::symlink_metadata(local).with_context(|| format!("{}", local.display()))?;
    let path = crate::tree::check_path(path)?;
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(local)?;
        let target = target
            .to_str()
            .ok_or_else(|| anyhow!("{}: link target is not UTF-8", local.display()))?;
        return Ok((
            Op::Put {
                path,
                entry: Entry::Symlink(target.to_string()),
            },
            None,
        ));
    }
    if meta.is_dir() {
        return Ok((
            Op::Put {
                path,
                entry: Entry::Dir(lake.trees().empty_dir()),
            },
            None,
        ));
    }
    if !meta.is_file() {
        bail!(
            "{}: not a regular file, directory or symlink",
            local.display()
        );
    }
    let f = std::fs::File::open(local).with_context(|| format!("{}", local.display()))?;
    let (entry, stats) = lake.file_entry(
        std::io::BufReader::with_capacity(1 << 20, f),
        &meta,
        &local.display().to_string(),
    )?;
    Ok((Op::Put { path, entry }, Some(stats)))
}

/// Write an entry to a local path (recursively for directories).
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstab_options_become_mount_flags() {
        let a = mount_helper_args(
            "file:///srv/lake",
            Path::new("/mnt/lake"),
            "rw,_netdev,nofail,x-systemd.automount,ref=sales/v1,cache_dir=/var/cache/tarn,cache_size=20G,allow_other,ro,no_io_uring,no_idle_queues",
            false,
        )
        .unwrap();
        assert_eq!(
            a,
            [
                "mount",
                "/mnt/lake",
                "--lake",
                "file:///srv/lake",
                "--daemon",
                "--ref",
                "sales/v1",
                "--cache-dir",
                "/var/cache/tarn",
                "--cache-size",
                "20G",
                "--allow-other",
                "--read-only",
                "--no-io-uring",
                "--no-idle-queues"
            ]
        );
        // fuse-style spec (tarn#URL) and empty options
        let a = mount_helper_args("tarn#s3://b/p", Path::new("/m"), "", false).unwrap();
        assert_eq!(a[3], "s3://b/p");
        assert!(mount_helper_args("file:///l", Path::new("/m"), "bogus", false).is_err());
        assert!(mount_helper_args("file:///l", Path::new("/m"), "bogus", true).is_ok());
        assert!(mount_helper_args("file:///l", Path::new("/m"), "ref=", false).is_err());
        assert!(mount_helper_args("file:///l", Path::new("/m"), "cache_size", false).is_err());
    }
}
