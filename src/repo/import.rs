//! Zero-copy onboarding and consumption: import objects of an outside
//! source by reference (External entries, read in place), graft another
//! repository's published tree (one op, whatever its size), and read
//! External content back with its identity checked.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use super::{CommitOptions, Lake, RepoError, Result};
use crate::hash::Hash;
use crate::store::source::{self, Source, SourceObject};
use crate::tree::{self, Content, Entry, External, File, Op};

/// Staged ops per batch when an import adds to a directory that already has
/// entries (see `Lake::import`).
const IMPORT_BATCH_OPS: usize = 10_000;

/// Bytes per ranged read of an External object.
pub const EXTERNAL_PIECE: u64 = 8 << 20;

/// What an import did (or, dry, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportSummary {
    pub objects: u64,
    pub bytes: u64,
    pub seconds: f64,
    /// Source objects left out, with why (names a tree cannot hold).
    pub skipped: Vec<String>,
    /// Staged ops (1 when the destination was new).
    pub ops: u64,
    pub commit: Option<String>,
    pub dry_run: bool,
}

#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// List and report, stage nothing.
    pub dry_run: bool,
    /// Commit the branch once staged (`None`: stage only).
    pub commit: Option<CommitOptions>,
}

/// Builds a tree from paths that arrive depth first (every directory's
/// paths contiguous), writing each directory as soon as the listing leaves
/// it, so memory follows the depth and the widest directory, not the count.
struct TreeBuilder<'a> {
    lake: &'a Lake,
    /// Open directories from the root down: (name, entries so far).
    stack: Vec<(String, BTreeMap<String, Entry>)>,
}

impl<'a> TreeBuilder<'a> {
    fn new(lake: &'a Lake) -> Self {
        TreeBuilder {
            lake,
            stack: vec![(String::new(), BTreeMap::new())],
        }
    }

    /// Close directories until the open path is a prefix of `dirs`.
    fn close_to(&mut self, keep: usize) -> Result<()> {
        while self.stack.len() > keep + 1 {
            let (name, entries) = self.stack.pop().expect("non-root");
            let hash = self.lake.trees.build_dir(entries.into_iter().collect())?;
            self.stack
                .last_mut()
                .expect("root")
                .1
                .insert(name, Entry::Dir(hash));
        }
        Ok(())
    }

    /// Add a file at `rel`; false when the name clashes with a directory
    /// or file already there (it is then left out).
    fn add(&mut self, rel: &str, entry: Entry) -> Result<bool> {
        let parts: Vec<&str> = rel.split('/').collect();
        let (name, dirs) = parts.split_last().expect("non-empty path");
        let common = self.stack[1..]
            .iter()
            .zip(dirs.iter())
            .take_while(|((open, _), want)| open == *want)
            .count();
        self.close_to(common)?;
        for d in &dirs[common..] {
            if self.stack.last().expect("root").1.contains_key(*d) {
                return Ok(false); // a file of that name came first
            }
            self.stack.push((d.to_string(), BTreeMap::new()));
        }
        let top = &mut self.stack.last_mut().expect("root").1;
        if top.contains_key(*name) {
            return Ok(false);
        }
        top.insert(name.to_string(), entry);
        Ok(true)
    }

    fn finish(mut self) -> Result<Hash> {
        self.close_to(0)?;
        let (_, entries) = self.stack.pop().expect("root");
        Ok(self.lake.trees.build_dir(entries.into_iter().collect())?)
    }
}

fn external_entry(o: &SourceObject) -> Entry {
    Entry::File(File {
        size: o.size,
        mode: o.mode,
        mtime: o.mtime,
        content: Content::External(External {
            url: o.url.clone(),
            etag: o.etag.clone(),
            version: o.version.clone(),
        }),
    })
}

fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a}/{b}"),
    }
}

impl Lake {
    /// Import every object under the source URL (`file:///dir/`,
    /// `s3://bucket/prefix/`) into `dest` on a branch, by reference: only
    /// metadata is written, nothing is read from or written to the source
    /// but its listing. Into a new or empty `dest` the import is one staged
    /// op (atomic: an interrupted import stages nothing); into a directory
    /// with entries, the objects are added (same names replaced) by `Put`
    /// ops in batches, and running the same import again completes an
    /// interrupted one. `each` sees every object listed.
    pub fn import(
        &self,
        source_url: &str,
        repo: &str,
        branch: &str,
        dest: &str,
        opts: &ImportOptions,
        each: &mut dyn FnMut(&SourceObject),
    ) -> Result<ImportSummary> {
        let started = Instant::now();
        if !opts.dry_run {
            self.check_direct_write(repo, branch)?;
        } else {
            self.branch(repo, branch)?;
        }
        let src = Source::open(source_url)?;
        let mut summary = ImportSummary {
            dry_run: opts.dry_run,
            ..Default::default()
        };
        let mut builder = TreeBuilder::new(self);
        let mut files: Vec<(String, Entry)> = Vec::new();
        let into_existing = self.has_entries(repo, branch, dest)?;
        src.list(|o| -> Result<()> {
            let normal = tree::check_path(&o.rel)
                .map(|p| p == o.rel)
                .unwrap_or(false);
            if !normal {
                summary
                    .skipped
                    .push(format!("{}: not a name a tree can hold", o.url));
                return Ok(());
            }
            each(&o);
            if !opts.dry_run {
                let entry = external_entry(&o);
                if into_existing {
                    files.push((join(dest, &o.rel), entry));
                } else if !builder.add(&o.rel, entry)? {
                    summary.skipped.push(format!(
                        "{}: clashes with a directory of the same name",
                        o.url
                    ));
                    return Ok(());
                }
            }
            summary.objects += 1;
            summary.bytes += o.size;
            Ok(())
        })?;
        if !opts.dry_run {
            let ops: Vec<Op> = if into_existing {
                files
                    .into_iter()
                    .map(|(path, entry)| Op::Put { path, entry })
                    .collect()
            } else {
                let root = builder.finish()?;
                vec![Op::Put {
                    path: dest.to_string(),
                    entry: Entry::Dir(root),
                }]
            };
            self.trees.flush()?;
            summary.ops = ops.len() as u64;
            for batch in ops.chunks(IMPORT_BATCH_OPS) {
                self.stage(repo, branch, batch.to_vec())?;
            }
            if let Some(c) = &opts.commit {
                let mut c = c.clone();
                c.meta
                    .entry("import".into())
                    .or_insert_with(|| source_url.to_string());
                summary.commit = Some(self.commit_branch(repo, branch, &c)?.to_hex());
            }
        }
        summary.seconds = started.elapsed().as_secs_f64();
        Ok(summary)
    }

    /// Does `path` on the branch's working tree hold anything?
    fn has_entries(&self, repo: &str, branch: &str, path: &str) -> Result<bool> {
        let (_, work) = self.working_tree(repo, branch)?;
        Ok(match self.trees.lookup(&work, path)? {
            None => false,
            Some(Entry::Dir(h)) => self.trees.count(&h)? > 0,
            Some(_) => true,
        })
    }

    /// Stage a graft: `dest` on the branch becomes `source_repo`'s tree at
    /// the commit `source_ref` names, at `source_path`. One op, whatever the
    /// tree's size (trees are shared by the whole lake); the commit that
    /// applies it records the source in its metadata.
    pub fn graft(
        &self,
        source_repo: &str,
        source_ref: &str,
        source_path: &str,
        repo: &str,
        branch: &str,
        dest: &str,
    ) -> Result<(Hash, Entry)> {
        self.check_direct_write(repo, branch)?;
        let commit = self.resolve(source_repo, source_ref)?.commit;
        let tree = self.commit(source_repo, &commit)?.tree;
        let entry = self.trees.lookup(&tree, source_path)?.ok_or_else(|| {
            RepoError::NotFound(format!("{source_repo}/{source_ref}/{source_path}"))
        })?;
        if dest.is_empty() && !matches!(entry, Entry::Dir(_)) {
            return Err(RepoError::BadPath {
                path: dest.to_string(),
                why: "only a directory can be grafted at a branch root".into(),
            });
        }
        self.stage(
            repo,
            branch,
            vec![Op::Graft {
                path: dest.to_string(),
                entry: entry.clone(),
                repo: source_repo.to_string(),
                commit,
                source: source_path.to_string(),
            }],
        )?;
        Ok((commit, entry))
    }
}

/// Lineage a commit records for the grafts it applies: `graft:<path>` →
/// `<repo>/<commit>[/<path>]`, a tarn address of what was grafted.
pub(super) fn lineage<'a>(ops: impl Iterator<Item = &'a Op>) -> BTreeMap<String, String> {
    let mut meta = BTreeMap::new();
    for op in ops {
        if let Op::Graft {
            path,
            repo,
            commit,
            source,
            ..
        } = op
        {
            let key = if path.is_empty() { "/" } else { path.as_str() };
            meta.insert(
                format!("graft:{key}"),
                join(&format!("{repo}/{}", commit.to_hex()), source),
            );
        }
    }
    meta
}

/// Write an External file's bytes to `out`, piece by piece, each read
/// checked against the identity recorded at import.
pub fn read_external(file: &File, ext: &External, out: &mut impl std::io::Write) -> Result<u64> {
    let mut at = 0;
    while at < file.size {
        let end = (at + EXTERNAL_PIECE).min(file.size);
        let bytes = source::read_range(
            &ext.url,
            ext.etag.as_deref(),
            ext.version.as_deref(),
            file.size,
            at,
            end,
        )?;
        out.write_all(&bytes).map_err(|e| RepoError::Local {
            path: "output".into(),
            source: e,
        })?;
        at = end;
    }
    Ok(file.size)
}

/// What an export did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExportSummary {
    /// Files written.
    pub files: u64,
    /// Files already there (same size and mtime): left as they were.
    pub unchanged: u64,
    pub bytes: u64,
    /// Symlinks an object store cannot hold, left out.
    pub symlinks_skipped: u64,
    pub seconds: f64,
}

impl Lake {
    /// Copy the files at `repo/reference/path` out to a plain directory or
    /// S3 prefix. Resumable: files already there unchanged are skipped.
    /// `total` is told the bytes to copy once, `progress` each file's bytes.
    pub fn export(
        &self,
        repo: &str,
        reference: &str,
        path: &str,
        dest_url: &str,
        total: &mut dyn FnMut(u64),
        progress: &mut dyn FnMut(u64),
    ) -> Result<ExportSummary> {
        let started = Instant::now();
        let tree = self.tree_of(repo, reference)?;
        let entry = self
            .trees
            .lookup(&tree, path)?
            .ok_or_else(|| RepoError::NotFound(format!("{repo}/{reference}/{path}")))?;
        let mut items = Vec::new();
        match &entry {
            Entry::Dir(h) => self.trees.walk(h, "", &mut items)?,
            other => items.push((
                path.rsplit('/').next().unwrap_or("file").to_string(),
                other.clone(),
            )),
        }
        total(items.iter().map(|(_, e)| e.size()).sum());
        let sink = crate::store::sink::Sink::open(dest_url)?;
        let mut s = ExportSummary::default();
        for (rel, e) in items {
            match e {
                Entry::Dir(_) => {}
                Entry::Symlink(t) => {
                    if !sink.put_symlink(&rel, &t)? {
                        s.symlinks_skipped += 1;
                    }
                }
                Entry::File(f) => {
                    if sink.has(&rel, f.size, f.mtime)? {
                        s.unchanged += 1;
                    } else {
                        sink.put_file(&rel, f.mode, f.mtime, |w| {
                            let mut w = w;
                            self.read_file(&f, &mut w)
                                .map(|_| ())
                                .map_err(|e| e.to_string())
                        })?;
                        s.files += 1;
                        s.bytes += f.size;
                    }
                    progress(f.size);
                }
            }
        }
        s.seconds = started.elapsed().as_secs_f64();
        Ok(s)
    }
}
