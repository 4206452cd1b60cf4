//! Merge bases, three-way tree merges, and the commands built on them:
//! merge, revert, cherry-pick. Every one ends in a compare-and-swap of the
//! destination ref that keeps the branch's staged changes staged.

use std::collections::{BTreeMap, BinaryHeap, HashMap};

use super::{now_ms, Cas, Commit, EventKind, HookEvent, Lake, RepoError, Result, CAS_ROUNDS};
use crate::hash::Hash;
use crate::tree::Entry;

/// How to resolve every conflict of a merge, instead of failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Take the source (merged-in) side.
    SourceWins,
    /// Keep the destination side.
    DestWins,
}

impl std::str::FromStr for Strategy {
    type Err = RepoError;
    fn from_str(s: &str) -> Result<Strategy> {
        match s {
            "source-wins" => Ok(Strategy::SourceWins),
            "dest-wins" => Ok(Strategy::DestWins),
            _ => Err(RepoError::BadStrategy(s.to_string())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeOutcome {
    /// The source is already part of the destination's history.
    UpToDate,
    FastForward(Hash),
    Merged(Hash),
}

#[derive(Debug, Clone, Default)]
pub struct MergeOptions {
    pub message: Option<String>,
    pub author: Option<String>,
    pub meta: BTreeMap<String, String>,
    pub strategy: Option<Strategy>,
    /// Move the destination to the source when it is an ancestor of it,
    /// instead of creating a merge commit.
    pub ff: bool,
}

/// `Some(Some(tree))` for a directory, `Some(None)` for an absent entry,
/// `None` for anything else (a file or symlink cannot be merged into).
fn dir_or_absent(e: &Option<Entry>) -> Option<Option<Hash>> {
    match e {
        Some(Entry::Dir(h)) => Some(Some(*h)),
        None => Some(None),
        Some(_) => None,
    }
}

const A: u8 = 1;
const B: u8 = 2;
const STALE: u8 = 4;

/// Depth limit for merging several merge bases into a virtual one.
const VIRTUAL_BASE_DEPTH: usize = 3;

impl Lake {
    /// The best common ancestors of two commits: common ancestors that are
    /// not ancestors of another common ancestor. Walks both histories in
    /// generation order and stops once only stale commits remain.
    pub fn merge_bases(&self, repo: &str, a: &Hash, b: &Hash) -> Result<Vec<Hash>> {
        if a == b {
            return Ok(vec![*a]);
        }
        let mut flags: HashMap<Hash, u8> = HashMap::new();
        let mut commits: HashMap<Hash, Commit> = HashMap::new();
        let mut heap = BinaryHeap::new();
        for (h, f) in [(*a, A), (*b, B)] {
            let c = self.commit(repo, &h)?;
            heap.push((c.generation, h));
            commits.insert(h, c);
            flags.insert(h, f);
        }
        let mut processed: HashMap<Hash, u8> = HashMap::new();
        let mut results = Vec::new();
        while heap.iter().any(|(_, h)| flags[h] & STALE == 0) {
            let Some((_, id)) = heap.pop() else { break };
            let mut f = flags[&id];
            if processed.get(&id) == Some(&f) {
                continue;
            }
            if f & (A | B) == (A | B) && f & STALE == 0 {
                results.push(id);
                f |= STALE;
                flags.insert(id, f);
            }
            processed.insert(id, f);
            let parents = commits[&id].parents.clone();
            for p in parents {
                let pf = flags.get(&p).copied().unwrap_or(0);
                let nf = pf | f;
                if nf != pf {
                    flags.insert(p, nf);
                    if let std::collections::hash_map::Entry::Vacant(v) = commits.entry(p) {
                        v.insert(self.commit(repo, &p)?);
                    }
                    heap.push((commits[&p].generation, p));
                }
            }
        }
        results.sort();
        Ok(results)
    }

    /// Is `a` an ancestor of (or equal to) `b`?
    pub fn is_ancestor(&self, repo: &str, a: &Hash, b: &Hash) -> Result<bool> {
        Ok(self.merge_bases(repo, a, b)? == vec![*a])
    }

    /// The tree to use as the base of a three-way merge of `a` and `b`. With
    /// several best common ancestors (criss-cross history), they are merged
    /// into a virtual base, conflicts there resolved towards the first.
    fn base_tree(&self, repo: &str, a: &Hash, b: &Hash, depth: usize) -> Result<Hash> {
        let bases = self.merge_bases(repo, a, b)?;
        let Some(first) = bases.first() else {
            return Ok(self.trees.empty_dir());
        };
        let mut tree = self.commit(repo, first)?.tree;
        for other in &bases[1..] {
            let base = if depth < VIRTUAL_BASE_DEPTH {
                self.base_tree(repo, first, other, depth + 1)?
            } else {
                self.trees.empty_dir()
            };
            let theirs = self.commit(repo, other)?.tree;
            tree = self
                .merge_trees(&base, &tree, &theirs, Some(Strategy::DestWins))?
                .0;
        }
        Ok(tree)
    }

    /// Three-way merge of trees: changes from `base` to `theirs` applied to
    /// `ours`. Returns the merged tree and the conflicting paths (always
    /// empty with a strategy). Only directories that differ are visited.
    pub fn merge_trees(
        &self,
        base: &Hash,
        ours: &Hash,
        theirs: &Hash,
        strategy: Option<Strategy>,
    ) -> Result<(Hash, Vec<String>)> {
        let mut conflicts = Vec::new();
        let tree = self.merge_dir(base, ours, theirs, "", strategy, &mut conflicts)?;
        Ok((tree, conflicts))
    }

    fn merge_dir(
        &self,
        base: &Hash,
        ours: &Hash,
        theirs: &Hash,
        prefix: &str,
        strategy: Option<Strategy>,
        conflicts: &mut Vec<String>,
    ) -> Result<Hash> {
        if ours == theirs || base == theirs {
            return Ok(*ours);
        }
        if base == ours {
            return Ok(*theirs);
        }
        let ours_changed: HashMap<String, Option<Entry>> = self
            .trees
            .diff_dir(base, ours)?
            .into_iter()
            .map(|(n, _, o)| (n, o))
            .collect();
        let mut edits = BTreeMap::new();
        for (name, b, t) in self.trees.diff_dir(base, theirs)? {
            let o = match ours_changed.get(&name) {
                Some(o) => o.clone(),
                None => b.clone(),
            };
            if o == b {
                edits.insert(name, t);
                continue;
            }
            if o == t {
                continue;
            }
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            // Directory against directory, or a directory one side deleted:
            // merge inside it, so conflicts name the files that clash.
            if let (Some(od), Some(td)) = (dir_or_absent(&o), dir_or_absent(&t)) {
                let empty = self.trees.empty_dir();
                let bd = match &b {
                    Some(Entry::Dir(h)) => *h,
                    _ => empty,
                };
                let merged = self.merge_dir(
                    &bd,
                    &od.unwrap_or(empty),
                    &td.unwrap_or(empty),
                    &path,
                    strategy,
                    conflicts,
                )?;
                let gone = merged == empty && (o.is_none() || t.is_none());
                edits.insert(name, (!gone).then_some(Entry::Dir(merged)));
                continue;
            }
            match strategy {
                Some(Strategy::SourceWins) => {
                    edits.insert(name, t);
                }
                Some(Strategy::DestWins) => {}
                None => conflicts.push(path),
            }
        }
        Ok(self.trees.update_dir(ours, edits)?)
    }

    /// Move a branch from `expected` to `new`, keeping its staging state.
    /// False when the branch no longer points at `expected`.
    fn move_branch(&self, repo: &str, branch: &str, expected: &Hash, new: &Hash) -> Result<bool> {
        for _ in 0..CAS_ROUNDS {
            let (cur, v) = self.branch(repo, branch)?;
            if cur.commit == new.to_hex() {
                return Ok(true);
            }
            if cur.commit != expected.to_hex() {
                return Ok(false);
            }
            let moved = super::BranchRef {
                commit: new.to_hex(),
                ..cur
            };
            if let Cas::Done(_) = self.cas_branch(repo, branch, Some(&v), &moved)? {
                return Ok(true);
            }
        }
        Err(RepoError::Concurrent(format!("{repo}/{branch}")))
    }

    /// Build a commit on top of a branch's head, run the pre-event checks
    /// (`kind`, from the head's tree) on it and publish it; rebuilds when
    /// the head moves underneath. `build` returns `None` for "nothing to do".
    fn commit_on_branch(
        &self,
        repo: &str,
        branch: &str,
        (kind, source): (EventKind, Option<&str>),
        mut build: impl FnMut(&Hash, &Commit) -> Result<Option<Commit>>,
    ) -> Result<Option<Hash>> {
        for _ in 0..CAS_ROUNDS {
            let (r, _) = self.branch(repo, branch)?;
            let head = self.parse_id(repo, &r.commit)?;
            let head_commit = self.commit(repo, &head)?;
            let Some(commit) = build(&head, &head_commit)? else {
                return Ok(None);
            };
            self.trees.flush()?;
            let id = self.write_commit(repo, &commit)?;
            let mut event = HookEvent::new(kind, repo, branch, id, head_commit.tree);
            event.source = source.map(str::to_string);
            self.pre_event(&event)?;
            if self.move_branch(repo, branch, &head, &id)? {
                self.post_event(&event, id);
                return Ok(Some(id));
            }
        }
        Err(RepoError::Concurrent(format!("{repo}/{branch}")))
    }

    /// Merge the ref `source` into the branch `dest`, after the pre-merge
    /// checks of `dest` pass on the result.
    pub fn merge(
        &self,
        repo: &str,
        source: &str,
        dest: &str,
        opts: &MergeOptions,
    ) -> Result<MergeOutcome> {
        self.check_repo_writable(repo)?;
        let dest = self.require_branch(repo, dest)?;
        let src = self.resolve(repo, source)?.commit;
        let src_commit = self.commit(repo, &src)?;
        // What to report when no merge commit is made.
        let mut outcome = MergeOutcome::UpToDate;
        let event = (EventKind::PreMerge, Some(source));
        let published =
            self.commit_on_branch(repo, &dest, event, |head, head_commit| {
                match self.build_merge(
                    repo,
                    source,
                    &src,
                    &src_commit,
                    &dest,
                    head,
                    head_commit,
                    opts,
                )? {
                    MergeBuild::Commit(c) => Ok(Some(c)),
                    MergeBuild::UpToDate => {
                        outcome = MergeOutcome::UpToDate;
                        Ok(None)
                    }
                    MergeBuild::FastForward => {
                        outcome = MergeOutcome::FastForward(src);
                        Ok(None)
                    }
                }
            })?;
        if let Some(id) = published {
            return Ok(MergeOutcome::Merged(id));
        }
        match outcome {
            MergeOutcome::FastForward(to) => {
                // A fast-forward is a plain ref move; retry if the head moved.
                for _ in 0..CAS_ROUNDS {
                    let (r, _) = self.branch(repo, &dest)?;
                    let head = self.parse_id(repo, &r.commit)?;
                    if !self.is_ancestor(repo, &head, &to)? {
                        return self.merge(
                            repo,
                            source,
                            &dest,
                            &MergeOptions {
                                ff: false,
                                ..opts.clone()
                            },
                        );
                    }
                    let config_tree = self.commit(repo, &head)?.tree;
                    let event = HookEvent::new(EventKind::PreMerge, repo, &dest, to, config_tree)
                        .with_source(source);
                    self.pre_event(&event)?;
                    if self.move_branch(repo, &dest, &head, &to)? {
                        self.post_event(&event, to);
                        return Ok(MergeOutcome::FastForward(to));
                    }
                }
                Err(RepoError::Concurrent(format!("{repo}/{dest}")))
            }
            other => Ok(other),
        }
    }

    /// What merging `src` into a destination at `head` makes.
    #[allow(clippy::too_many_arguments)]
    fn build_merge(
        &self,
        repo: &str,
        source: &str,
        src: &Hash,
        src_commit: &Commit,
        dest: &str,
        head: &Hash,
        head_commit: &Commit,
        opts: &MergeOptions,
    ) -> Result<MergeBuild> {
        if self.is_ancestor(repo, src, head)? {
            return Ok(MergeBuild::UpToDate);
        }
        if opts.ff && self.is_ancestor(repo, head, src)? {
            return Ok(MergeBuild::FastForward);
        }
        let base = self.base_tree(repo, head, src, 0)?;
        let (tree, conflicts) =
            self.merge_trees(&base, &head_commit.tree, &src_commit.tree, opts.strategy)?;
        if !conflicts.is_empty() {
            return Err(RepoError::Conflict {
                what: format!("merge of {source} into {dest}"),
                paths: conflicts,
            });
        }
        Ok(MergeBuild::Commit(Commit {
            tree,
            parents: vec![*head, *src],
            author: opts.author.clone().unwrap_or_else(super::default_author),
            time: now_ms(),
            message: opts
                .message
                .clone()
                .unwrap_or_else(|| format!("Merge {source} into {dest}")),
            meta: opts.meta.clone(),
            generation: head_commit.generation.max(src_commit.generation) + 1,
            consumed: vec![],
        }))
    }

    /// The commit a merge of `source` into `dest` would publish, written
    /// but not published (for rehearsing pre-merge checks), and the tree
    /// of `dest`'s head. With nothing to merge, that is `dest`'s head.
    pub fn merge_candidate(
        &self,
        repo: &str,
        source: &str,
        dest: &str,
        opts: &MergeOptions,
    ) -> Result<(Hash, Hash)> {
        let dest = self.require_branch(repo, dest)?;
        let src = self.resolve(repo, source)?.commit;
        let src_commit = self.commit(repo, &src)?;
        let head = self.branch_head(repo, &dest)?;
        let head_commit = self.commit(repo, &head)?;
        let candidate = match self.build_merge(
            repo,
            source,
            &src,
            &src_commit,
            &dest,
            &head,
            &head_commit,
            opts,
        )? {
            MergeBuild::UpToDate => head,
            MergeBuild::FastForward => src,
            MergeBuild::Commit(c) => {
                self.trees.flush()?;
                self.write_commit(repo, &c)?
            }
        };
        Ok((candidate, head_commit.tree))
    }

    /// A new commit on `branch` that undoes `commit` (relative to its
    /// `parent`-th parent, 1-based; required for merge commits).
    pub fn revert(
        &self,
        repo: &str,
        branch: &str,
        commit: &Hash,
        parent: Option<usize>,
        author: Option<String>,
    ) -> Result<Hash> {
        let branch = self.require_branch(repo, branch)?;
        self.check_direct_write(repo, &branch)?;
        let c = self.commit(repo, commit)?;
        let n = match (parent, c.parents.len()) {
            (_, 0) => return Err(RepoError::Unrevertable(commit.short())),
            (None, 1) => 1,
            (None, _) => return Err(RepoError::NeedParent(commit.short())),
            (Some(n), len) if n >= 1 && n <= len => n,
            (Some(n), _) => {
                return Err(RepoError::NoParent {
                    expr: format!("-m {n}"),
                    commit: commit.short(),
                    n,
                })
            }
        };
        let parent_tree = self.commit(repo, &c.parents[n - 1])?.tree;
        let mut meta = BTreeMap::new();
        meta.insert("reverts".to_string(), commit.to_hex());
        let change = Change {
            what: format!("revert of {}", commit.short()),
            from: c.tree,
            to: parent_tree,
            message: format!("Revert \"{}\"", c.message),
            meta,
            author,
        };
        self.apply_change(repo, &branch, &change)
    }

    /// Apply the change `commit` made (against its first parent) to `branch`
    /// as a new commit.
    pub fn cherry_pick(
        &self,
        repo: &str,
        commit: &Hash,
        branch: &str,
        author: Option<String>,
    ) -> Result<Hash> {
        let branch = self.require_branch(repo, branch)?;
        self.check_direct_write(repo, &branch)?;
        let c = self.commit(repo, commit)?;
        let base = match c.parents.first() {
            Some(p) => self.commit(repo, p)?.tree,
            None => self.trees.empty_dir(),
        };
        let mut meta = c.meta.clone();
        meta.insert("cherry-picked-from".to_string(), commit.to_hex());
        let change = Change {
            what: format!("cherry-pick of {}", commit.short()),
            from: base,
            to: c.tree,
            message: c.message.clone(),
            meta,
            author,
        };
        self.apply_change(repo, &branch, &change)
    }

    /// Commit onto `branch` the difference between two trees (a three-way
    /// merge with `from` as the base); conflicts fail it, and a change that
    /// is already there makes no commit.
    fn apply_change(&self, repo: &str, branch: &str, change: &Change) -> Result<Hash> {
        let event = (EventKind::PreCommit, None);
        let id = self.commit_on_branch(repo, branch, event, |head, head_commit| {
            let (tree, conflicts) =
                self.merge_trees(&change.from, &head_commit.tree, &change.to, None)?;
            if !conflicts.is_empty() {
                return Err(RepoError::Conflict {
                    what: change.what.clone(),
                    paths: conflicts,
                });
            }
            if tree == head_commit.tree {
                return Ok(None);
            }
            Ok(Some(Commit {
                tree,
                parents: vec![*head],
                author: change.author.clone().unwrap_or_else(super::default_author),
                time: now_ms(),
                message: change.message.clone(),
                meta: change.meta.clone(),
                generation: head_commit.generation + 1,
                consumed: vec![],
            }))
        })?;
        id.ok_or(RepoError::NothingToCommit {
            repo: repo.to_string(),
            branch: branch.to_string(),
        })
    }
}

/// What a merge would do to a destination head.
enum MergeBuild {
    UpToDate,
    FastForward,
    Commit(Commit),
}

/// A change to carry onto a branch: what `from` → `to` did.
struct Change {
    what: String,
    from: Hash,
    to: Hash,
    message: String,
    meta: BTreeMap<String, String>,
    author: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::Strategy;
    use super::*;
    use crate::repo::CommitOptions;
    use crate::store::Store;
    use crate::tree::{Content, File, Op};
    use proptest::prelude::{prop, prop_assert_eq, proptest, ProptestConfig};
    use proptest::strategy::Strategy as Gen;

    fn lake() -> Lake {
        let s = Store::open(&format!("memory://merge-{}", ulid::Ulid::new())).unwrap();
        let l = Lake::init(s).unwrap().0;
        l.create_repo("r", "main").unwrap();
        l
    }

    fn file(b: u8) -> Entry {
        Entry::File(File {
            size: 1,
            mode: 0o644,
            mtime: 0,
            content: Content::Inline(vec![b].into()),
        })
    }

    fn put(p: &str, b: u8) -> Op {
        Op::Put {
            path: p.into(),
            entry: file(b),
        }
    }

    fn commit(l: &Lake, branch: &str, ops: Vec<Op>, msg: &str) -> Hash {
        l.stage("r", branch, ops).unwrap();
        l.commit_branch(
            "r",
            branch,
            &CommitOptions {
                message: msg.into(),
                ..Default::default()
            },
        )
        .unwrap()
    }

    fn files(l: &Lake, tree: &Hash) -> BTreeMap<String, u8> {
        let mut all = Vec::new();
        l.trees().walk(tree, "", &mut all).unwrap();
        all.into_iter()
            .filter_map(|(p, e)| match e {
                Entry::File(File {
                    content: Content::Inline(b),
                    ..
                }) => Some((p, b[0])),
                _ => None,
            })
            .collect()
    }

    fn head_files(l: &Lake, branch: &str) -> BTreeMap<String, u8> {
        let h = l.resolve("r", branch).unwrap().commit;
        files(l, &l.commit("r", &h).unwrap().tree)
    }

    #[test]
    fn criss_cross_history_has_two_best_bases() {
        let l = lake();
        commit(&l, "main", vec![put("x", 0)], "base");
        l.create_branch("r", "dev", "main").unwrap();
        let m1 = commit(&l, "main", vec![put("a", 1)], "m1");
        let d1 = commit(&l, "dev", vec![put("b", 1)], "d1");
        // Criss-cross: each side merges the other's first commit.
        l.merge("r", &d1.to_hex(), "main", &MergeOptions::default())
            .unwrap();
        l.merge("r", &m1.to_hex(), "dev", &MergeOptions::default())
            .unwrap();
        let main = l.resolve("r", "main").unwrap().commit;
        let dev = l.resolve("r", "dev").unwrap().commit;
        let mut bases = l.merge_bases("r", &main, &dev).unwrap();
        bases.sort();
        let mut want = vec![m1, d1];
        want.sort();
        assert_eq!(
            bases, want,
            "both criss-cross commits are best bases, not the old base"
        );
        commit(&l, "main", vec![put("a", 2)], "m2");
        commit(&l, "dev", vec![put("c", 3)], "d2");
        let out = l
            .merge("r", "dev", "main", &MergeOptions::default())
            .unwrap();
        assert!(matches!(out, MergeOutcome::Merged(_)));
        let f = head_files(&l, "main");
        assert_eq!(f.get("a"), Some(&2));
        assert_eq!(f.get("b"), Some(&1));
        assert_eq!(f.get("c"), Some(&3));
    }

    #[test]
    fn directory_rename_merges_cleanly_and_staged_changes_stay() {
        let l = lake();
        let ops = (0..50).map(|i| put(&format!("old/sub/f{i}"), i)).collect();
        commit(&l, "main", ops, "base");
        l.create_branch("r", "dev", "main").unwrap();
        commit(
            &l,
            "dev",
            vec![Op::Move {
                from: "old".into(),
                to: "new".into(),
            }],
            "rename",
        );
        commit(&l, "main", vec![put("other.txt", 7)], "main edit");
        l.stage("r", "main", vec![put("staged.txt", 9)]).unwrap();
        l.merge("r", "dev", "main", &MergeOptions::default())
            .unwrap();
        let f = head_files(&l, "main");
        assert_eq!(f.get("new/sub/f3"), Some(&3));
        assert!(!f.contains_key("old/sub/f3"));
        assert_eq!(f.get("other.txt"), Some(&7));
        assert!(
            !f.contains_key("staged.txt"),
            "staged change is not in the merge commit"
        );
        let st = l.status("r", "main").unwrap();
        assert_eq!(
            st.iter().map(|c| c.path.as_str()).collect::<Vec<_>>(),
            ["staged.txt"]
        );
        // Merging again: nothing to merge, no commit.
        let head = l.resolve("r", "main").unwrap().commit;
        assert_eq!(
            l.merge("r", "dev", "main", &MergeOptions::default())
                .unwrap(),
            MergeOutcome::UpToDate
        );
        assert_eq!(l.resolve("r", "main").unwrap().commit, head);
    }

    #[test]
    fn conflicts_of_every_kind_are_listed_and_change_nothing() {
        let l = lake();
        commit(
            &l,
            "main",
            vec![put("both", 0), put("moddel", 0), put("d/x", 0)],
            "base",
        );
        l.create_branch("r", "dev", "main").unwrap();
        commit(
            &l,
            "dev",
            vec![
                put("both", 1),
                Op::Delete {
                    path: "moddel".into(),
                },
                put("fd", 1),
            ],
            "dev",
        );
        commit(
            &l,
            "main",
            vec![put("both", 2), put("moddel", 2), put("fd/inner", 2)],
            "main",
        );
        let head = l.resolve("r", "main").unwrap().commit;
        let err = l
            .merge("r", "dev", "main", &MergeOptions::default())
            .unwrap_err();
        let RepoError::Conflict { paths, .. } = err else {
            panic!("expected a conflict, got {err}")
        };
        assert_eq!(paths, ["both", "fd", "moddel"]);
        assert_eq!(
            l.resolve("r", "main").unwrap().commit,
            head,
            "a failed merge changes nothing"
        );
        let opts = MergeOptions {
            strategy: Some(Strategy::DestWins),
            ..Default::default()
        };
        l.merge("r", "dev", "main", &opts).unwrap();
        let f = head_files(&l, "main");
        assert_eq!((f["both"], f["moddel"], f["fd/inner"]), (2, 2, 2));
    }

    #[test]
    fn fast_forward_only_when_asked() {
        let l = lake();
        l.create_branch("r", "dev", "main").unwrap();
        let d = commit(&l, "dev", vec![put("a", 1)], "dev");
        let ff = MergeOptions {
            ff: true,
            ..Default::default()
        };
        assert_eq!(
            l.merge("r", "dev", "main", &ff).unwrap(),
            MergeOutcome::FastForward(d)
        );
        l.create_branch("r", "dev2", "main").unwrap();
        commit(&l, "dev2", vec![put("b", 1)], "dev2");
        let MergeOutcome::Merged(m) = l
            .merge("r", "dev2", "main", &MergeOptions::default())
            .unwrap()
        else {
            panic!("expected a merge commit")
        };
        assert_eq!(l.commit("r", &m).unwrap().parents.len(), 2);
    }

    #[test]
    fn revert_and_cherry_pick() {
        let l = lake();
        commit(&l, "main", vec![put("a", 1)], "a");
        l.create_branch("r", "dev", "main").unwrap();
        let z = commit(&l, "main", vec![put("z", 1), put("a", 2)], "z");
        commit(&l, "main", vec![put("q", 1)], "q");
        l.revert("r", "main", &z, None, None).unwrap();
        let f = head_files(&l, "main");
        assert_eq!(
            (f.get("z"), f.get("a"), f.get("q")),
            (None, Some(&1), Some(&1))
        );
        l.cherry_pick("r", &z, "dev", None).unwrap();
        let f = head_files(&l, "dev");
        assert_eq!(
            (f.get("z"), f.get("a"), f.get("q")),
            (Some(&1), Some(&2), None)
        );
        let initial = l.resolve("r", "main~4").unwrap().commit;
        assert!(matches!(
            l.revert("r", "main", &initial, None, None),
            Err(RepoError::Unrevertable(_))
        ));
    }

    #[test]
    fn concurrent_merges_and_commits_lose_nothing() {
        let l = std::sync::Arc::new(lake());
        for i in 0..4 {
            l.create_branch("r", &format!("f{i}"), "main").unwrap();
            commit(
                &l,
                &format!("f{i}"),
                vec![put(&format!("from-f{i}"), i as u8)],
                "feature",
            );
        }
        let mut threads = Vec::new();
        for i in 0..4 {
            let l = l.clone();
            threads.push(std::thread::spawn(move || {
                l.merge("r", &format!("f{i}"), "main", &MergeOptions::default())
                    .unwrap();
            }));
        }
        for i in 0..4 {
            let l = l.clone();
            threads.push(std::thread::spawn(move || {
                l.stage("r", "main", vec![put(&format!("direct{i}"), 1)])
                    .unwrap();
                // Another thread's commit may have taken this batch already.
                match l.commit_branch("r", "main", &CommitOptions::default()) {
                    Ok(_) | Err(RepoError::NothingToCommit { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
        let f = head_files(&l, "main");
        for i in 0..4 {
            assert!(f.contains_key(&format!("from-f{i}")), "merge {i} lost");
            assert!(f.contains_key(&format!("direct{i}")), "commit {i} lost");
        }
    }

    /// Reference three-way merge over path → content maps.
    fn model_merge(
        b: &BTreeMap<String, u8>,
        o: &BTreeMap<String, u8>,
        t: &BTreeMap<String, u8>,
        strategy: Option<Strategy>,
    ) -> (BTreeMap<String, u8>, bool) {
        let mut out = BTreeMap::new();
        let mut conflict = false;
        let keys: std::collections::BTreeSet<&String> =
            b.keys().chain(o.keys()).chain(t.keys()).collect();
        for k in keys {
            let (bv, ov, tv) = (b.get(k), o.get(k), t.get(k));
            let v = if ov == bv {
                tv
            } else if tv == bv || ov == tv {
                ov
            } else {
                match strategy {
                    Some(Strategy::SourceWins) => tv,
                    Some(Strategy::DestWins) => ov,
                    None => {
                        conflict = true;
                        ov
                    }
                }
            };
            if let Some(v) = v {
                out.insert(k.clone(), *v);
            }
        }
        (out, conflict)
    }

    fn side_ops() -> impl Gen<Value = Vec<(u8, Option<u8>)>> {
        prop::collection::vec((0u8..23, prop::option::weighted(0.8, 0u8..3)), 0..12)
    }

    fn path_of(i: u8) -> (String, bool) {
        // 0..20: files d{0..3}/f{0..4}; 20..23: deletion of a whole directory
        if i < 20 {
            (format!("d{}/f{}", i / 5, i % 5), false)
        } else {
            (format!("d{}", i - 20), true)
        }
    }

    fn apply_side(
        l: &Lake,
        base: &Hash,
        model: &BTreeMap<String, u8>,
        ops: &[(u8, Option<u8>)],
    ) -> (Hash, BTreeMap<String, u8>) {
        let mut m = model.clone();
        let mut tree_ops = Vec::new();
        for (i, v) in ops {
            let (p, is_dir) = path_of(*i);
            match (is_dir, v) {
                (false, Some(v)) => {
                    m.insert(p.clone(), *v);
                    tree_ops.push(put(&p, *v));
                }
                _ => {
                    m.retain(|k, _| k != &p && !k.starts_with(&format!("{p}/")));
                    tree_ops.push(Op::Delete { path: p });
                }
            }
        }
        (l.trees().apply(base, &tree_ops).unwrap(), m)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn tree_merge_matches_the_reference_model(base_ops in side_ops(), ours in side_ops(), theirs in side_ops(), strat in 0u8..3) {
            let l = lake();
            let empty = l.trees().empty_dir();
            let (base, bm) = apply_side(&l, &empty, &BTreeMap::new(), &base_ops);
            let (o, om) = apply_side(&l, &base, &bm, &ours);
            let (t, tm) = apply_side(&l, &base, &bm, &theirs);
            let strategy = match strat { 0 => None, 1 => Some(Strategy::SourceWins), _ => Some(Strategy::DestWins) };
            let (want, want_conflict) = model_merge(&bm, &om, &tm, strategy);
            let (merged, conflicts) = l.merge_trees(&base, &o, &t, strategy).unwrap();
            prop_assert_eq!(!conflicts.is_empty(), want_conflict, "conflicts: {:?}", conflicts);
            if !want_conflict {
                prop_assert_eq!(files(&l, &merged), want);
            }
            // Deterministic: same inputs, same tree.
            let (again, _) = l.merge_trees(&base, &o, &t, strategy).unwrap();
            prop_assert_eq!(again, merged);
        }
    }
}
