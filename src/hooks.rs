//! Data-quality checks for commits, merges and ref creation: the `Hooks`
//! implementation that `repo` calls (DESIGN.md: hooks → repo only).
//!
//! Checks are versioned in the repository, as TOML files under
//! `_tarn/hooks/`, read from the tree the event names (the target
//! branch's head), so a change cannot weaken the checks that guard it.
//! `exec` checks run a shell command in a read-only snapshot of the
//! candidate commit; `webhook` checks POST the event as JSON. Every run is
//! recorded in the repository (`Lake::record_run`) for `tarn hooks log`.
//!
//! Must not touch refs: whether an operation goes ahead is `repo`'s call,
//! made on what `pre` returns.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::hash::Hash;
use crate::repo::{CheckFailure, EventKind, HookEvent, Hooks, Lake, RepoError};
use crate::tree::Entry;
use crate::units::parse_duration;

/// Where hook files live in a repository's tree.
pub const HOOKS_DIR: &str = "_tarn/hooks";

/// Time limits when a check gives none: long enough for a real data check
/// over a mounted snapshot, short enough that a hung one does not hold a
/// merge for ever. Webhooks only have to answer.
const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// Output kept per check in a run record (the tail, where errors are).
const OUTPUT_KEEP: usize = 64 << 10;

/// One hook file, as written (`_tarn/hooks/<name>.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct HookFile {
    on: Vec<String>,
    #[serde(default)]
    branches: Vec<String>,
    #[serde(default)]
    check: Vec<CheckSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckSpec {
    name: String,
    exec: Option<String>,
    webhook: Option<String>,
    timeout: Option<String>,
    #[serde(rename = "if")]
    when: Option<String>,
}

/// When a check runs, given how the earlier checks of its hook went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum When {
    Success,
    Failure,
    Always,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Exec(String),
    Webhook(String),
}

#[derive(Debug, Clone)]
struct Check {
    name: String,
    action: Action,
    timeout: Duration,
    when: When,
}

/// A parsed hook file.
#[derive(Debug, Clone)]
struct Hook {
    /// The file name without `.toml`.
    name: String,
    on: Vec<EventKind>,
    branches: Vec<glob::Pattern>,
    checks: Vec<Check>,
}

impl Hook {
    fn parse(name: &str, text: &str) -> Result<Hook, String> {
        let file: HookFile = toml::from_str(text).map_err(|e| one_line(&e.to_string()))?;
        let mut on = Vec::new();
        for e in &file.on {
            on.push(EventKind::parse(e).ok_or_else(|| {
                format!(
                    "unknown event {e:?} in `on` (events: {})",
                    EventKind::ALL.map(|k| k.name()).join(", ")
                )
            })?);
        }
        let mut branches = Vec::new();
        for b in &file.branches {
            branches.push(glob::Pattern::new(b).map_err(|e| format!("branch glob {b:?}: {e}"))?);
        }
        let mut checks = Vec::new();
        for c in file.check {
            let what = format!("check {:?}", c.name);
            if c.name.is_empty() {
                return Err("a check needs a name".into());
            }
            let action = match (c.exec, c.webhook) {
                (Some(cmd), None) => Action::Exec(cmd),
                (None, Some(url)) => {
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(format!(
                            "{what}: webhook must be an http:// or https:// URL"
                        ));
                    }
                    Action::Webhook(url)
                }
                _ => return Err(format!("{what}: give exactly one of exec or webhook")),
            };
            let timeout = match &c.timeout {
                Some(t) => parse_duration(t).map_err(|e| format!("{what}: {e}"))?,
                None => match action {
                    Action::Exec(_) => DEFAULT_EXEC_TIMEOUT,
                    Action::Webhook(_) => DEFAULT_WEBHOOK_TIMEOUT,
                },
            };
            let when = match c.when.as_deref() {
                None | Some("success") => When::Success,
                Some("failure") => When::Failure,
                Some("always") => When::Always,
                Some(other) => {
                    return Err(format!(
                        "{what}: if = {other:?}; use \"success\", \"failure\" or \"always\""
                    ))
                }
            };
            checks.push(Check {
                name: c.name,
                action,
                timeout,
                when,
            });
        }
        Ok(Hook {
            name: name.to_string(),
            on,
            branches,
            checks,
        })
    }

    fn applies_to(&self, event: &HookEvent) -> bool {
        self.on.contains(&event.kind)
            && (self.branches.is_empty() || self.branches.iter().any(|p| p.matches(&event.target)))
    }
}

/// Check a hook file's text as the runner would read it: `Err` says what
/// is wrong, in one line.
pub fn check_hook_file(text: &str) -> Result<(), String> {
    Hook::parse("check", text).map(|_| ())
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A hook file that does not parse. It fails the pre-events it names
/// (all of them when even `on` cannot be read) so a typo never opens a
/// gate, unless the change being checked replaces it: that is the fix.
#[derive(Debug, Clone)]
struct BrokenHook {
    name: String,
    path: String,
    entry: Entry,
    on: Option<Vec<EventKind>>,
    why: String,
}

impl BrokenHook {
    fn applies_to(&self, event: &HookEvent) -> bool {
        event.kind.is_pre() && self.on.as_ref().is_none_or(|on| on.contains(&event.kind))
    }
}

/// The `on` list of a file that is TOML but not a valid hook file.
fn events_named(text: &str) -> Option<Vec<EventKind>> {
    let table: toml::Table = toml::from_str(text).ok()?;
    table
        .get("on")?
        .as_array()?
        .iter()
        .map(|v| v.as_str().and_then(EventKind::parse))
        .collect()
}

enum Loaded {
    Hook(Hook),
    Broken(BrokenHook),
}

/// The hook files in a tree, parsed or kept as broken.
fn load_hooks(lake: &Lake, tree: &Hash) -> Result<Vec<Loaded>, RepoError> {
    let Some(Entry::Dir(dir)) = lake.trees().lookup(tree, HOOKS_DIR)? else {
        return Ok(vec![]);
    };
    let mut out = Vec::new();
    for (file_name, entry) in lake.trees().entries(&dir)? {
        let Some(name) = file_name.strip_suffix(".toml") else {
            continue;
        };
        let Entry::File(f) = &entry else { continue };
        let mut bytes = Vec::new();
        lake.read_file(f, &mut bytes)?;
        let text = String::from_utf8(bytes).map_err(|_| "not UTF-8".to_string());
        let path = format!("{HOOKS_DIR}/{file_name}");
        out.push(match text.clone().and_then(|t| Hook::parse(name, &t)) {
            Ok(h) => Loaded::Hook(h),
            Err(why) => Loaded::Broken(BrokenHook {
                name: name.to_string(),
                why: format!("{path}: {why}"),
                on: text.ok().and_then(|t| events_named(&t)),
                path,
                entry,
            }),
        });
    }
    Ok(out)
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Passed,
    Failed,
    /// Not run: its `if` did not match how the earlier checks went.
    Skipped,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckRecord {
    pub hook: String,
    pub check: String,
    pub kind: String,
    pub status: Status,
    pub duration_ms: u64,
    /// Exit code (exec) or HTTP status (webhook), when there was one.
    pub code: Option<i32>,
    pub output: String,
}

/// One run of the checks for one event: `repos/<repo>/runs/<id>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: String,
    /// Milliseconds since the Unix epoch.
    pub time: i64,
    pub event: String,
    pub repo: String,
    pub target: String,
    pub source: Option<String>,
    pub commit: String,
    pub dry_run: bool,
    pub status: Status,
    pub duration_ms: u64,
    pub checks: Vec<CheckRecord>,
}

impl RunRecord {
    fn failed(&self) -> impl Iterator<Item = &CheckRecord> {
        self.checks.iter().filter(|c| c.status == Status::Failed)
    }

    /// One line on what failed, for error messages.
    pub fn failure_summary(&self) -> Option<(String, String)> {
        let first = self.failed().next()?;
        let tail: Vec<&str> = first
            .output
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let tail = tail[tail.len().saturating_sub(3)..].join(" / ");
        let mut detail = match (first.kind.as_str(), first.code) {
            ("exec", Some(c)) => format!("exit {c}"),
            ("webhook", Some(c)) => format!("HTTP {c}"),
            _ => "failed".to_string(),
        };
        if !tail.is_empty() {
            detail.push_str(": ");
            detail.push_str(&tail);
        }
        if detail.len() > 400 {
            let mut cut = 400;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
            detail.push('…');
        }
        Some((format!("{}/{}", first.hook, first.check), detail))
    }
}

/// A read-only directory holding a commit's tree while checks run; gone
/// when dropped.
pub struct Snapshot {
    pub path: PathBuf,
    /// Keeps the directory (and whatever serves it) alive.
    _guard: Box<dyn Send>,
}

impl Snapshot {
    pub fn new(path: PathBuf, guard: Box<dyn Send>) -> Snapshot {
        Snapshot {
            path,
            _guard: guard,
        }
    }
}

/// Makes snapshots of commits for `exec` checks.
pub trait SnapshotSource: Send + Sync {
    fn snapshot(&self, lake: &Lake, repo: &str, commit: &Hash) -> Result<Snapshot, String>;
}

/// Snapshots by writing the tree out to a temporary directory and making
/// it read-only: works everywhere, costs the tree's size. Where FUSE is
/// available the CLI mounts the commit instead (`cli::snapshot`).
pub struct CopySnapshots;

struct CopyGuard(tempfile::TempDir);

impl Drop for CopyGuard {
    fn drop(&mut self) {
        // Make it writable again so the temp dir can be removed.
        set_tree_writable(self.0.path(), true);
    }
}

fn set_tree_writable(dir: &Path, writable: bool) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(meta) = e.path().symlink_metadata() else {
            continue;
        };
        let mode = meta.permissions().mode();
        let new = if writable {
            mode | 0o200
        } else {
            mode & !0o222
        };
        if meta.is_dir() {
            set_tree_writable(&e.path(), writable);
        }
        if !meta.file_type().is_symlink() {
            let _ = std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(new));
        }
    }
    let mode = if writable { 0o755 } else { 0o555 };
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode));
}

impl SnapshotSource for CopySnapshots {
    fn snapshot(&self, lake: &Lake, repo: &str, commit: &Hash) -> Result<Snapshot, String> {
        let tmp = tempfile::Builder::new()
            .prefix("tarn-snapshot-")
            .tempdir()
            .map_err(|e| format!("snapshot directory: {e}"))?;
        let path = tmp.path().join("tree");
        let tree = lake.commit(repo, commit).map_err(|e| e.to_string())?.tree;
        lake.materialize(&Entry::Dir(tree), &path)
            .map_err(|e| e.to_string())?;
        set_tree_writable(&path, false);
        Ok(Snapshot::new(path, Box::new(CopyGuard(tmp))))
    }
}

/// Runs the checks of `_tarn/hooks/` for events, records every run, and
/// refuses operations whose pre-event checks fail.
pub struct HookRunner {
    snapshots: Arc<dyn SnapshotSource>,
}

impl HookRunner {
    pub fn new(snapshots: Arc<dyn SnapshotSource>) -> HookRunner {
        HookRunner { snapshots }
    }

    /// Run every check that applies to `event`; `None` when no hook file
    /// reacts to it (nothing is recorded then).
    pub fn run(&self, lake: &Lake, event: &HookEvent) -> Result<Option<RunRecord>, RepoError> {
        let hooks: Vec<_> = load_hooks(lake, &event.config_tree)?
            .into_iter()
            .filter(|h| match h {
                Loaded::Hook(h) => h.applies_to(event),
                Loaded::Broken(b) => b.applies_to(event),
            })
            .collect();
        if hooks.is_empty() {
            return Ok(None);
        }
        let started = Instant::now();
        let id = ulid::Ulid::new().to_string();
        let mut ctx = RunContext {
            lake,
            event,
            run_id: &id,
            snapshots: self.snapshots.as_ref(),
            snapshot: None,
            done: Vec::new(),
        };
        for hook in &hooks {
            match hook {
                Loaded::Hook(h) => ctx.run_hook(h),
                Loaded::Broken(b) => {
                    let candidate = lake.commit(&event.repo, &event.commit)?.tree;
                    let replaced =
                        lake.trees().lookup(&candidate, &b.path)?.as_ref() != Some(&b.entry);
                    let (status, output) = if replaced {
                        (
                            Status::Skipped,
                            format!("{} (replaced by this change)", b.why),
                        )
                    } else {
                        (Status::Failed, b.why.clone())
                    };
                    ctx.done.push(CheckRecord {
                        hook: b.name.clone(),
                        check: "config".into(),
                        kind: "config".into(),
                        status,
                        duration_ms: 0,
                        code: None,
                        output,
                    });
                }
            }
        }
        let checks = ctx.done;
        let status = if checks.iter().any(|c| c.status == Status::Failed) {
            Status::Failed
        } else {
            Status::Passed
        };
        let record = RunRecord {
            id: id.clone(),
            time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
            event: event.kind.name().to_string(),
            repo: event.repo.clone(),
            target: event.target.clone(),
            source: event.source.clone(),
            commit: event.commit.to_hex(),
            dry_run: event.dry_run,
            status,
            duration_ms: started.elapsed().as_millis() as u64,
            checks,
        };
        let json = serde_json::to_vec(&record).expect("run record encodes");
        lake.record_run(&event.repo, &id, &json)?;
        Ok(Some(record))
    }
}

impl Hooks for HookRunner {
    fn pre(&self, lake: &Lake, event: &HookEvent) -> crate::repo::Result<()> {
        let Some(record) = self.run(lake, event)? else {
            return Ok(());
        };
        match record.failure_summary() {
            None => Ok(()),
            Some((check, detail)) => Err(RepoError::CheckFailed(Box::new(CheckFailure {
                event: event.kind.name().to_string(),
                repo: event.repo.clone(),
                what: describe(event),
                check,
                detail,
                candidate: event.commit.short(),
                run: record.id,
            }))),
        }
    }

    fn post(&self, lake: &Lake, event: &HookEvent) -> Vec<String> {
        match self.run(lake, event) {
            Ok(Some(record)) => record
                .failed()
                .map(|c| {
                    format!(
                        "{} check {}/{} failed (run {}): {}",
                        record.event,
                        c.hook,
                        c.check,
                        record.id,
                        one_line(&c.output)
                    )
                })
                .collect(),
            Ok(None) => vec![],
            Err(e) => vec![format!("{} checks could not run: {e}", event.kind)],
        }
    }
}

/// What an event does, for people: "merge of dev into main".
fn describe(event: &HookEvent) -> String {
    let source = event.source.as_deref().unwrap_or("?");
    match event.kind {
        EventKind::PreCommit | EventKind::PostCommit => {
            format!("the commit on {}/{}", event.repo, event.target)
        }
        EventKind::PreMerge | EventKind::PostMerge => {
            format!("the merge of {source} into {}/{}", event.repo, event.target)
        }
        EventKind::PreCreateBranch | EventKind::PostCreateBranch => {
            format!("branch {}/{} (from {source})", event.repo, event.target)
        }
        EventKind::PreCreateTag | EventKind::PostCreateTag => {
            format!("tag {}/{} (at {source})", event.repo, event.target)
        }
    }
}

/// State of one run: the snapshot is made on the first `exec` check.
struct RunContext<'a> {
    lake: &'a Lake,
    event: &'a HookEvent,
    run_id: &'a str,
    snapshots: &'a dyn SnapshotSource,
    snapshot: Option<Result<Snapshot, String>>,
    done: Vec<CheckRecord>,
}

impl RunContext<'_> {
    fn run_hook(&mut self, hook: &Hook) {
        let mut failed = false;
        for check in &hook.checks {
            let run = match check.when {
                When::Success => !failed,
                When::Failure => failed,
                When::Always => true,
            };
            let started = Instant::now();
            let (status, code, output) = if !run {
                (Status::Skipped, None, String::new())
            } else {
                match &check.action {
                    Action::Exec(cmd) => self.exec(hook, check, cmd),
                    Action::Webhook(url) => self.webhook(hook, check, url),
                }
            };
            failed |= status == Status::Failed;
            self.done.push(CheckRecord {
                hook: hook.name.clone(),
                check: check.name.clone(),
                kind: match check.action {
                    Action::Exec(_) => "exec".into(),
                    Action::Webhook(_) => "webhook".into(),
                },
                status,
                duration_ms: started.elapsed().as_millis() as u64,
                code,
                output,
            });
        }
    }

    fn env(&self, hook: &Hook, check: &Check) -> Vec<(&'static str, String)> {
        let e = self.event;
        vec![
            ("TARN_EVENT", e.kind.name().to_string()),
            ("TARN_REPO", e.repo.clone()),
            ("TARN_BRANCH", e.target.clone()),
            ("TARN_TARGET_REF", e.target.clone()),
            ("TARN_SOURCE_REF", e.source.clone().unwrap_or_default()),
            ("TARN_COMMIT", e.commit.to_hex()),
            ("TARN_RUN_ID", self.run_id.to_string()),
            ("TARN_HOOK", hook.name.clone()),
            ("TARN_CHECK", check.name.clone()),
            (
                "TARN_DRY_RUN",
                if e.dry_run { "1" } else { "0" }.to_string(),
            ),
            ("TARN_LAKE", self.lake.store().url().to_string()),
        ]
    }

    fn exec(&mut self, hook: &Hook, check: &Check, cmd: &str) -> (Status, Option<i32>, String) {
        let (snapshots, lake, event) = (self.snapshots, self.lake, self.event);
        let snapshot = self
            .snapshot
            .get_or_insert_with(|| snapshots.snapshot(lake, &event.repo, &event.commit));
        let dir = match snapshot {
            Ok(s) => s.path.clone(),
            Err(e) => {
                return (
                    Status::Failed,
                    None,
                    format!("no snapshot of the candidate: {e}"),
                )
            }
        };
        let mut env = self.env(hook, check);
        env.push(("TARN_SNAPSHOT", dir.display().to_string()));
        match run_command(cmd, &dir, &env, check.timeout) {
            Ok((code, output)) => {
                let status = if code == Some(0) {
                    Status::Passed
                } else {
                    Status::Failed
                };
                let output = match code {
                    None => format!("{output}\n(killed after {:?} time limit)", check.timeout),
                    Some(_) => output,
                };
                (status, code, output)
            }
            Err(e) => (Status::Failed, None, format!("could not run {cmd:?}: {e}")),
        }
    }

    fn webhook(&self, hook: &Hook, check: &Check, url: &str) -> (Status, Option<i32>, String) {
        let e = self.event;
        let body = serde_json::json!({
            "event": e.kind.name(),
            "repo": e.repo,
            "branch": e.target,
            "source": e.source,
            "commit": e.commit.to_hex(),
            "run_id": self.run_id,
            "hook": hook.name,
            "check": check.name,
            "dry_run": e.dry_run,
            "lake": self.lake.store().url(),
            "checks": self.done.iter().filter(|c| c.hook == hook.name).map(|c| serde_json::json!({
                "name": c.check, "status": c.status, "output": c.output,
            })).collect::<Vec<_>>(),
        });
        match post_json(url, &body, check.timeout) {
            Ok((code, text)) => {
                let status = if (200..300).contains(&code) {
                    Status::Passed
                } else {
                    Status::Failed
                };
                (status, Some(code as i32), keep_tail(text))
            }
            Err(e) => (Status::Failed, None, format!("POST {url}: {e}")),
        }
    }
}

fn keep_tail(mut s: String) -> String {
    if s.len() > OUTPUT_KEEP {
        let mut cut = s.len() - OUTPUT_KEEP;
        while !s.is_char_boundary(cut) {
            cut += 1;
        }
        s = format!("…{}", &s[cut..]);
    }
    s
}

/// Run `sh -c cmd` in `dir` with stdout and stderr captured together;
/// the exit code, or `None` when it was killed at the time limit (with its
/// whole process group).
fn run_command(
    cmd: &str,
    dir: &Path,
    env: &[(&str, String)],
    limit: Duration,
) -> std::io::Result<(Option<i32>, String)> {
    use std::os::unix::process::CommandExt;
    let mut out = tempfile::tempfile()?;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out.try_clone()?)
        .process_group(0)
        .spawn()?;
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(limit) {
        Ok(status) => Some(status?),
        Err(_) => {
            // SAFETY: signals the process group the child leads; no memory involved.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            None
        }
    };
    let _ = waiter.join();
    let mut text = Vec::new();
    out.seek(SeekFrom::Start(0))?;
    out.read_to_end(&mut text)?;
    let text = keep_tail(String::from_utf8_lossy(&text).into_owned());
    Ok((status.map(|s| s.code().unwrap_or(-1)), text))
}

/// Connection failures are retried this many times (backoff from
/// `WEBHOOK_RETRY_BASE`, within the check's time limit): a receiver that is
/// restarting should not fail a merge. An HTTP answer is never retried.
const WEBHOOK_RETRIES: u32 = 4;
const WEBHOOK_RETRY_BASE: Duration = Duration::from_millis(100);

/// POST a JSON document; the HTTP status and the response body.
fn post_json(
    url: &str,
    body: &serde_json::Value,
    limit: Duration,
) -> Result<(u16, String), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + limit;
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(limit)
            .build()
            .map_err(|e| e.to_string())?;
        let mut attempt = 0;
        loop {
            let sent = client
                .post(url)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await;
            match sent {
                Ok(resp) => {
                    let code = resp.status().as_u16();
                    let text = resp.text().await.unwrap_or_default();
                    return Ok((code, text));
                }
                Err(e) => {
                    let wait = WEBHOOK_RETRY_BASE * 2u32.pow(attempt);
                    attempt += 1;
                    if !e.is_connect()
                        || attempt > WEBHOOK_RETRIES
                        || Instant::now() + wait > deadline
                    {
                        return Err(error_chain(&e));
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    })
}

/// An error and its causes on one line, each cause once (store and HTTP
/// errors often repeat their source's text in their own): "error sending
/// request: ...: Connection refused". The CLI prints its errors with it.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = c.source();
    }
    one_line(&parts.join(": "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hook_files() {
        let h = Hook::parse(
            "quality",
            r#"
on = ["pre-merge", "pre-commit"]
branches = ["main", "release-*"]
[[check]]
name = "schema"
exec = "sh checks/schema.sh"
timeout = "60s"
[[check]]
name = "alert"
webhook = "http://127.0.0.1:9/alerts"
if = "failure"
"#,
        )
        .unwrap();
        assert_eq!(h.on, [EventKind::PreMerge, EventKind::PreCommit]);
        assert_eq!(h.checks.len(), 2);
        assert_eq!(h.checks[0].timeout, Duration::from_secs(60));
        assert_eq!(h.checks[0].when, When::Success);
        assert_eq!(h.checks[1].when, When::Failure);
        assert_eq!(h.checks[1].timeout, DEFAULT_WEBHOOK_TIMEOUT);
        let ev =
            |target: &str, kind| HookEvent::new(kind, "r", target, Hash::of(b""), Hash::of(b""));
        assert!(h.applies_to(&ev("main", EventKind::PreMerge)));
        assert!(h.applies_to(&ev("release-7", EventKind::PreCommit)));
        assert!(!h.applies_to(&ev("dev", EventKind::PreMerge)));
        assert!(!h.applies_to(&ev("main", EventKind::PostMerge)));
    }

    #[test]
    fn rejects_bad_hook_files() {
        for (text, why) in [
            ("on = [\"pre-merge\"]\nbranch = [\"main\"]", "unknown field"),
            ("on = [\"pre-push\"]", "unknown event"),
            ("on = [\"pre-merge\"]\n[[check]]\nname = \"x\"", "exactly one of"),
            (
                "on = [\"pre-merge\"]\n[[check]]\nname = \"x\"\nexec = \"true\"\nwebhook = \"http://a\"",
                "exactly one of",
            ),
            ("on = [\"pre-merge\"]\n[[check]]\nname = \"x\"\nexec = \"true\"\nif = \"sometimes\"", "if ="),
            ("on = [\"pre-merge\"]\n[[check]]\nname = \"x\"\nexec = \"true\"\ntimeout = \"soon\"", "duration"),
            ("on = [\"pre-merge\"]\n[[check]]\nname = \"x\"\nwebhook = \"ftp://a\"", "http"),
            ("on = [", "expected"),
        ] {
            let err = Hook::parse("h", text).unwrap_err();
            assert!(err.contains(why), "{text:?}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn commands_run_with_env_output_and_time_limit() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("data.csv"), "a,b\n").unwrap();
        let env = [("TARN_REPO", "sales".to_string())];
        let (code, out) = run_command(
            "head -1 data.csv; echo \"repo=$TARN_REPO\" >&2; exit 3",
            dir.path(),
            &env,
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(code, Some(3));
        assert!(out.contains("a,b") && out.contains("repo=sales"), "{out}");
        let started = Instant::now();
        // The sleeping grandchild dies with its process group.
        let (code, _) = run_command(
            "sleep 30 & sleep 30",
            dir.path(),
            &[],
            Duration::from_millis(200),
        )
        .unwrap();
        assert_eq!(code, None);
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn output_keeps_its_tail() {
        let long = "x".repeat(OUTPUT_KEEP) + "the end";
        let kept = keep_tail(long);
        assert!(kept.ends_with("the end") && kept.len() <= OUTPUT_KEEP + 4);
    }
}
