//! `tarn fsck`: is every object a ref can reach there and intact?
//!
//! Walks every repository's branches (and their staged batches) and tags,
//! every commit reachable from them, every tree node and manifest, and every
//! chunk, each object once. Commits, nodes and manifests are always read and
//! verified (blake3 of their bytes, then decoded); chunks are read and
//! verified, or with sampling only a share of them is and the rest are
//! checked to exist. Reports each problem as one line naming the object and
//! where it was reached from; never changes the lake.

use std::collections::HashSet;

use serde::Serialize;

use super::{Commit, Lake, Result, StagingBatch};
use crate::hash::{ChunkRef, Hash};
use crate::store::StoreError;
use crate::tree::{Content, Entry, Node, Op};

#[derive(Debug, Clone)]
pub struct FsckOptions {
    /// Share of chunks whose bytes are read and verified (0.0 to 1.0); the
    /// others are only checked to exist. Chosen by hash, so repeated runs
    /// with the same share check the same chunks.
    pub sample: f64,
    /// Only these repositories (all when empty).
    pub repos: Vec<String>,
    /// Also check that imported objects still exist at their source.
    pub external: bool,
}

impl Default for FsckOptions {
    fn default() -> Self {
        FsckOptions {
            sample: 1.0,
            repos: vec![],
            external: false,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct FsckReport {
    pub repos: u64,
    pub refs: u64,
    pub commits: u64,
    pub batches: u64,
    pub nodes: u64,
    pub chunks_verified: u64,
    pub chunks_present: u64,
    pub externals: u64,
    pub problems: Vec<String>,
}

struct Walk<'a> {
    lake: &'a Lake,
    opts: &'a FsckOptions,
    report: FsckReport,
    commits: HashSet<Hash>,
    nodes: HashSet<Hash>,
    chunks: HashSet<Hash>,
}

fn describe(e: &StoreError) -> String {
    match e {
        StoreError::Missing(_) => "missing".into(),
        StoreError::Corrupt { actual, .. } => format!("corrupt (its bytes hash to {actual})"),
        other => other.to_string(),
    }
}

impl Walk<'_> {
    fn problem(&mut self, p: String) {
        self.report.problems.push(p);
    }

    fn commit(&mut self, repo: &str, id: Hash, from: &str) {
        let mut todo = vec![(id, from.to_string())];
        while let Some((id, from)) = todo.pop() {
            if !self.commits.insert(id) {
                continue;
            }
            self.report.commits += 1;
            let key = Lake::commit_key(repo, &id);
            let c = match self.lake.store.get_verified(&key, &id) {
                Ok(bytes) => match Commit::decode(&bytes) {
                    Some(c) => c,
                    None => {
                        self.problem(format!(
                            "{repo}: commit {} ({from}): cannot be decoded",
                            id.short()
                        ));
                        continue;
                    }
                },
                Err(e) => {
                    self.problem(format!(
                        "{repo}: commit {} ({from}): {}",
                        id.short(),
                        describe(&e)
                    ));
                    continue;
                }
            };
            let at = format!("commit {}", id.short());
            self.dir(repo, c.tree, &at, "");
            for p in c.parents {
                todo.push((p, format!("parent of {}", id.short())));
            }
        }
    }

    /// A node (directory or manifest); `None` when it is unusable.
    fn node(&mut self, repo: &str, h: Hash, at: &str, path: &str) -> Option<Node> {
        let bytes = match self.lake.store.get_verified(&h.key("nodes"), &h) {
            Ok(b) => b,
            Err(e) => {
                self.problem(format!(
                    "{repo}: node {} ({at}, /{path}): {}",
                    h.short(),
                    describe(&e)
                ));
                return None;
            }
        };
        match Node::decode(&bytes) {
            Ok(n) => Some(n),
            Err(_) => {
                self.problem(format!(
                    "{repo}: node {} ({at}, /{path}): cannot be decoded",
                    h.short()
                ));
                None
            }
        }
    }

    fn dir(&mut self, repo: &str, h: Hash, at: &str, path: &str) {
        if !self.nodes.insert(h) {
            return;
        }
        self.report.nodes += 1;
        match self.node(repo, h, at, path) {
            Some(Node::Leaf(items)) => {
                for (name, e) in items {
                    let p = if path.is_empty() {
                        name
                    } else {
                        format!("{path}/{name}")
                    };
                    self.entry(repo, &e, at, &p);
                }
            }
            Some(Node::Internal { children, .. }) => {
                for c in children {
                    self.dir(repo, c.hash, at, path);
                }
            }
            Some(Node::Manifest(_)) => {
                self.problem(format!(
                    "{repo}: node {} ({at}, /{path}): a manifest where a directory belongs",
                    h.short()
                ));
            }
            None => {}
        }
    }

    fn entry(&mut self, repo: &str, e: &Entry, at: &str, path: &str) {
        match e {
            Entry::Dir(h) => self.dir(repo, *h, at, path),
            Entry::Symlink(_) => {}
            Entry::File(f) => match &f.content {
                Content::Inline(_) => {}
                Content::Chunks(refs) => self.chunks(repo, refs, at, path),
                Content::Manifest(h) => {
                    if !self.nodes.insert(*h) {
                        return;
                    }
                    self.report.nodes += 1;
                    match self.node(repo, *h, at, path) {
                        Some(Node::Manifest(refs)) => self.chunks(repo, &refs, at, path),
                        Some(_) => self.problem(format!(
                            "{repo}: node {} ({at}, /{path}): a directory where a manifest belongs",
                            h.short()
                        )),
                        None => {}
                    }
                }
                Content::External(x) => {
                    self.report.externals += 1;
                    if self.opts.external {
                        if let Err(e) = crate::store::source::read_range(
                            &x.url,
                            x.etag.as_deref(),
                            x.version.as_deref(),
                            f.size,
                            0,
                            f.size.min(1),
                        ) {
                            self.problem(format!("{repo}: imported /{path} ({at}): {e}"));
                        }
                    }
                }
            },
        }
    }

    fn chunks(&mut self, repo: &str, refs: &[ChunkRef], at: &str, path: &str) {
        for c in refs {
            if !self.chunks.insert(c.hash) {
                continue;
            }
            let key = c.hash.key("chunks");
            let pick = u32::from_le_bytes(c.hash.0[..4].try_into().expect("4 bytes"));
            let verify =
                (pick as f64) < self.opts.sample * u32::MAX as f64 || self.opts.sample >= 1.0;
            let outcome = if verify {
                self.lake.store.get_verified(&key, &c.hash).and_then(|b| {
                    if b.len() == c.len as usize {
                        self.report.chunks_verified += 1;
                        Ok(())
                    } else {
                        Err(StoreError::Corrupt {
                            key: key.clone(),
                            expected: format!("{} bytes", c.len),
                            actual: format!("{} bytes", b.len()),
                        })
                    }
                })
            } else {
                match self.lake.store.size(&key) {
                    Ok(Some(_)) => {
                        self.report.chunks_present += 1;
                        Ok(())
                    }
                    Ok(None) => Err(StoreError::Missing(key.clone())),
                    Err(e) => Err(e),
                }
            };
            if let Err(e) = outcome {
                self.problem(format!(
                    "{repo}: chunk {} ({at}, /{path}): {}",
                    c.hash.short(),
                    describe(&e)
                ));
            }
        }
    }

    fn batch(&mut self, repo: &str, branch: &str, token: &str) {
        let dir = Lake::repo_key(repo, &format!("staging/{token}"));
        let ids = match self.lake.store.list_files(&dir) {
            Ok(ids) => ids,
            Err(e) => {
                return self.problem(format!("{repo}: branch {branch}: staging {token}: {e}"))
            }
        };
        for id in ids {
            self.report.batches += 1;
            let at = format!("branch {branch}, staged batch {id}");
            match self.lake.read_batch(repo, token, &id) {
                Ok(Some(StagingBatch { ops, .. })) => {
                    for op in ops {
                        match op {
                            Op::Put { path, entry } | Op::Graft { path, entry, .. } => {
                                self.entry(repo, &entry, &at, &path)
                            }
                            Op::Delete { .. } | Op::Move { .. } => {}
                        }
                    }
                }
                Ok(None) => {} // consumed by a commit meanwhile
                Err(e) => self.problem(format!("{repo}: {at}: {e}")),
            }
        }
    }
}

impl Lake {
    /// Check that everything every ref reaches is present and intact.
    pub fn fsck(&self, opts: &FsckOptions) -> Result<FsckReport> {
        let mut w = Walk {
            lake: self,
            opts,
            report: FsckReport::default(),
            commits: HashSet::new(),
            nodes: HashSet::new(),
            chunks: HashSet::new(),
        };
        let repos = if opts.repos.is_empty() {
            self.list_repos()?
        } else {
            opts.repos.clone()
        };
        for repo in repos {
            w.report.repos += 1;
            if let Err(e) = self.repo_config(&repo) {
                w.problem(format!("{repo}: repo.json: {e}"));
                continue;
            }
            // Refs through the readers every command uses: a ref that does
            // not decode is reported, not fatal.
            let dir = Self::repo_key(&repo, "refs/branches");
            for name in self.store.list_files(&dir)? {
                if super::check_name("branch", &name).is_err() {
                    continue; // a ref update's temporary file, as list_branches
                }
                w.report.refs += 1;
                let r = match self.branch(&repo, &name) {
                    Ok((r, _)) => r,
                    Err(e) => {
                        w.problem(format!("{repo}: branch {name}: {e}"));
                        continue;
                    }
                };
                match self.parse_id(&repo, &r.commit) {
                    Ok(h) => w.commit(&repo, h, &format!("branch {name}")),
                    Err(e) => w.problem(format!("{repo}: branch {name}: {e}")),
                }
                for t in std::iter::once(&r.staging).chain(r.sealed.iter()) {
                    w.batch(&repo, &name, t);
                }
            }
            let dir = Self::repo_key(&repo, "refs/tags");
            for name in self.store.list_files(&dir)? {
                if super::check_name("tag", &name).is_err() {
                    continue;
                }
                w.report.refs += 1;
                match self.tag(&repo, &name) {
                    Ok(Some(h)) => w.commit(&repo, h, &format!("tag {name}")),
                    Ok(None) => {} // deleted meanwhile
                    Err(e) => w.problem(format!("{repo}: tag {name}: {e}")),
                }
            }
        }
        Ok(w.report)
    }
}
