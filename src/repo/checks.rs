//! The seam between the ref-update protocol and data-quality checks:
//! `repo` announces each operation through the `Hooks` trait it owns, and
//! the `hooks` module implements it (DESIGN.md: no arrow repo → hooks).
//!
//! Pre-events run after the candidate commit is written and before the ref
//! moves, so a refusal changes no ref and the candidate stays readable by
//! its id. Post-events run after the ref moved and never undo anything.

use std::fmt;

use super::{Lake, Result};
use crate::hash::Hash;

/// The operations hooks can watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    PreCommit,
    PostCommit,
    PreMerge,
    PostMerge,
    PreCreateBranch,
    PostCreateBranch,
    PreCreateTag,
    PostCreateTag,
}

impl EventKind {
    pub const ALL: [EventKind; 8] = [
        EventKind::PreCommit,
        EventKind::PostCommit,
        EventKind::PreMerge,
        EventKind::PostMerge,
        EventKind::PreCreateBranch,
        EventKind::PostCreateBranch,
        EventKind::PreCreateTag,
        EventKind::PostCreateTag,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EventKind::PreCommit => "pre-commit",
            EventKind::PostCommit => "post-commit",
            EventKind::PreMerge => "pre-merge",
            EventKind::PostMerge => "post-merge",
            EventKind::PreCreateBranch => "pre-create-branch",
            EventKind::PostCreateBranch => "post-create-branch",
            EventKind::PreCreateTag => "pre-create-tag",
            EventKind::PostCreateTag => "post-create-tag",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|e| e.name() == s)
    }

    /// A pre-event can refuse its operation; a post-event only reports.
    pub fn is_pre(self) -> bool {
        matches!(
            self,
            EventKind::PreCommit
                | EventKind::PreMerge
                | EventKind::PreCreateBranch
                | EventKind::PreCreateTag
        )
    }

    /// The post-event that follows this pre-event.
    pub fn post(self) -> EventKind {
        match self {
            EventKind::PreCommit => EventKind::PostCommit,
            EventKind::PreMerge => EventKind::PostMerge,
            EventKind::PreCreateBranch => EventKind::PostCreateBranch,
            EventKind::PreCreateTag => EventKind::PostCreateTag,
            other => other,
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One operation, as hooks see it.
#[derive(Debug, Clone)]
pub struct HookEvent {
    pub kind: EventKind,
    pub repo: String,
    /// The branch the operation changes (commit, merge destination), or
    /// the name of the branch or tag being created.
    pub target: String,
    /// The merged-in ref, or the ref a branch or tag is created from.
    pub source: Option<String>,
    /// The candidate commit (pre-events) or the published one (post-events).
    pub commit: Hash,
    /// The tree whose `_tarn/hooks/` says which checks run: the target
    /// branch's head before the operation, so a change cannot weaken the
    /// checks that guard it.
    pub config_tree: Hash,
    /// A rehearsal (`tarn hooks run`): nothing is published either way.
    pub dry_run: bool,
}

impl HookEvent {
    pub fn new(kind: EventKind, repo: &str, target: &str, commit: Hash, config_tree: Hash) -> Self {
        HookEvent {
            kind,
            repo: repo.to_string(),
            target: target.to_string(),
            source: None,
            commit,
            config_tree,
            dry_run: false,
        }
    }

    pub fn with_source(mut self, source: &str) -> Self {
        self.source = Some(source.to_string());
        self
    }
}

/// Why a check refused an operation (`RepoError::CheckFailed`).
#[derive(Debug, Clone)]
pub struct CheckFailure {
    pub event: String,
    pub repo: String,
    /// The operation, for people: "the merge of dev into sales/main".
    pub what: String,
    /// `<hook file>/<check name>`.
    pub check: String,
    /// Exit code or HTTP status, and the tail of the check's output.
    pub detail: String,
    /// The refused candidate commit (short id); it stays readable.
    pub candidate: String,
    pub run: String,
}

impl fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} check {} refused {}: {} (candidate commit {} kept; details: tarn hooks log {} --run {})",
            self.event, self.check, self.what, self.detail, self.candidate, self.repo, self.run
        )
    }
}

/// Runs checks for events. `pre` returns `Err(RepoError::CheckFailed)` to
/// refuse the operation; `post` returns one line per failed check, which
/// the caller reports as warnings.
pub trait Hooks: Send + Sync {
    fn pre(&self, lake: &Lake, event: &HookEvent) -> Result<()>;
    fn post(&self, lake: &Lake, event: &HookEvent) -> Vec<String>;
}
