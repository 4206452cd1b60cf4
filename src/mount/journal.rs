//! The write-back journal (`tarn mount --writeback`): a close appends its
//! staged ops to a journal on the cache disk (fsynced) and returns; one
//! uploader thread then sends each entry's new chunks to the lake and stages
//! its ops, in order, under the batch id chosen at close. Entries left by a
//! crash are uploaded when the next daemon starts with the same cache dir.
//!
//! Layout under `<cache>/journal/`: `entries/<seq>` (one `JournalEntry`,
//! postcard, written to a temp file, fsynced, renamed) and `objects/`, a
//! local object store holding the chunks of files closed but not yet
//! uploaded (read by the chunk cache meanwhile). A chunk is counted for
//! each entry that needs it, from before it is written until its entry is
//! uploaded, and deleted when no entry needs it any more. An entry whose
//! branch was deleted meanwhile is moved to `orphaned/`, chunks kept.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use crate::chunk::Stored;
use crate::hash::Hash;
use crate::repo::{Lake, RepoError, StageHint};
use crate::store::Store;
use crate::tree::{Content, Entry, Op};

/// How long the uploader waits before trying a failed upload again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Most entries staged together as one batch (see `upload_all`).
const GROUP_ENTRIES: usize = 4096;

/// The uploader lets closes gather this long before staging them, so a
/// burst of closes (an untar) goes out as a few batches, not one each.
const GATHER: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalEntry {
    pub repo: String,
    pub branch: String,
    /// The staging batch id, chosen at close so the mount's view and the
    /// store agree on the batch.
    pub batch: String,
    pub ops: Vec<Op>,
}

/// Why an entry did not upload.
enum Upload {
    /// Try again later (the store is unreachable, a race was lost, ...).
    Retry(String),
    /// It never can: its branch or repository is gone.
    Gone(String),
}

#[derive(Default)]
struct Pending {
    /// Entries not yet uploaded.
    total: usize,
    last_error: Option<String>,
}

pub struct Journal {
    dir: PathBuf,
    /// Chunks of journaled files: a local store with the lake's key layout.
    objects: Store,
    /// The last entry's sequence number; held while appending.
    append: Mutex<u64>,
    /// Entries from this one on were appended by this daemon.
    fresh_from: u64,
    /// Entries (written or being written) that need each journaled chunk.
    needed: Mutex<HashMap<Hash, usize>>,
    pending: Mutex<Pending>,
    drained: Condvar,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Journal({})", self.dir.display())
    }
}

fn io_err(e: std::io::Error) -> String {
    e.to_string()
}

impl Journal {
    /// Open (or create) the journal in `cache_dir`; entries already there
    /// are pending uploads from an earlier daemon.
    pub fn open(cache_dir: &Path) -> std::io::Result<Arc<Journal>> {
        let dir = cache_dir.join("journal");
        std::fs::create_dir_all(dir.join("entries"))?;
        std::fs::create_dir_all(dir.join("objects"))?;
        let objects = Store::open(&format!("file://{}", dir.join("objects").display()))
            .map_err(std::io::Error::other)?;
        let mut j = Journal {
            objects,
            append: Mutex::new(0),
            fresh_from: 0,
            needed: Mutex::new(HashMap::new()),
            pending: Mutex::new(Pending::default()),
            drained: Condvar::new(),
            dir,
        };
        let mut last = 0;
        for (seq, path) in j.entries()? {
            last = last.max(seq);
            if let Ok(e) = Self::read(&path) {
                j.count(1);
                j.need(&chunks_of(&e.ops));
            }
        }
        *j.append.lock() = last;
        j.fresh_from = last + 1;
        Ok(Arc::new(j))
    }

    /// The local store where journaled files' chunks go.
    pub fn objects(&self) -> &Store {
        &self.objects
    }

    fn entries(&self) -> std::io::Result<Vec<(u64, PathBuf)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.dir.join("entries"))? {
            let e = e?;
            if let Some(seq) = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) {
                out.push((seq, e.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    fn read(path: &Path) -> Result<JournalEntry, String> {
        let bytes = std::fs::read(path).map_err(io_err)?;
        postcard::from_bytes(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn count(&self, delta: isize) {
        let mut p = self.pending.lock();
        p.total = p.total.saturating_add_signed(delta);
        // Wakes both the uploader (work came) and committers (work went).
        self.drained.notify_all();
    }

    fn need(&self, chunks: &[Hash]) {
        let mut needed = self.needed.lock();
        for h in chunks {
            *needed.entry(*h).or_default() += 1;
        }
    }

    /// Drop one entry's need of these chunks; delete the ones no entry
    /// needs any more (under the lock, so no one counts them meanwhile).
    pub fn release(&self, chunks: &[Hash]) {
        let mut needed = self.needed.lock();
        for h in chunks {
            if let Some(n) = needed.get_mut(h) {
                *n -= 1;
                if *n == 0 {
                    needed.remove(h);
                    let _ = self.objects.delete(&h.key("chunks"));
                }
            }
        }
    }

    /// Cut a file into chunks kept in the journal (counted as needed until
    /// `release`), or inline content for a small one. Returns the content,
    /// its size and the chunks it needs.
    pub fn store_file(
        &self,
        params: crate::chunk::ChunkParams,
        reader: impl std::io::Read,
        what: &str,
    ) -> Result<(Content, u64, Vec<Hash>), String> {
        let mut hashes = Vec::new();
        // Each chunk is counted before it is written: a concurrent release
        // of the same chunk cannot delete it under us.
        let stored = crate::chunk::store_content_seen(&self.objects, params, reader, what, |h| {
            self.need(&[*h]);
            hashes.push(*h);
        });
        match stored {
            Ok((Stored::Inline(b), stats)) => Ok((Content::Inline(b), stats.bytes, hashes)),
            Ok((Stored::Chunks(refs), stats)) => Ok((Content::Chunks(refs), stats.bytes, hashes)),
            Err(e) => {
                self.release(&hashes);
                Err(e.to_string())
            }
        }
    }

    /// Make every appended entry and journaled chunk survive a machine
    /// crash: one `syncfs` of the cache file system.
    pub fn sync(&self) -> Result<(), String> {
        let dir = std::fs::File::open(&self.dir).map_err(io_err)?;
        // SAFETY: syncfs on a descriptor we own.
        if unsafe { libc::syncfs(std::os::unix::io::AsRawFd::as_raw_fd(&dir)) } != 0 {
            return Err(io_err(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Append an entry (durable against the daemon dying; see `sync`). Its chunks must be in `objects`, counted
    /// as needed (by `store_file`); they stay until the entry is uploaded.
    pub fn append(&self, entry: &JournalEntry) -> Result<(), String> {
        let mut seq = self.append.lock();
        let bytes = postcard::to_allocvec(entry).map_err(|e| e.to_string())?;
        let entries = self.dir.join("entries");
        let path = entries.join(format!("{:020}", *seq + 1));
        let tmp = entries.join(format!(".tmp-{}", *seq + 1));
        let mut f = std::fs::File::create(&tmp).map_err(io_err)?;
        f.write_all(&bytes).map_err(io_err)?;
        // In the kernel now: it survives the daemon being killed. Surviving
        // a machine crash too is what `sync` (an fsync call) is for.
        std::fs::rename(&tmp, &path).map_err(io_err)?;
        *seq += 1;
        self.count(1);
        Ok(())
    }

    /// Wait until nothing is left to upload, or `limit` passes.
    pub fn wait_drained(&self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let mut p = self.pending.lock();
        while p.total > 0 {
            if self.drained.wait_until(&mut p, deadline).timed_out() {
                return Err(format!(
                    "{} closed change(s) are still uploading ({})",
                    p.total,
                    p.last_error.as_deref().unwrap_or("no error yet")
                ));
            }
        }
        Ok(())
    }

    /// Upload and stage every entry there is now, oldest first; stops at
    /// the first failure (to keep order) and says why.
    ///
    /// Consecutive entries of one branch that this daemon appended are
    /// staged together as one batch, under the id of the last of them (one
    /// store write for many closes). That keeps every order that matters:
    /// no other writer can have seen these entries (they were never in the
    /// store), and any batch this daemon had seen before one of them has a
    /// lower id than the last. Entries left by an earlier daemon may have
    /// reached the store already, under their own ids: they go one by one.
    pub fn upload_all(&self, lake: &Lake) -> Result<usize, String> {
        let mut done = 0;
        let mut group: Vec<(PathBuf, JournalEntry)> = Vec::new();
        for (seq, path) in self.entries().map_err(io_err)? {
            let entry = match Self::read(&path) {
                Ok(e) => e,
                Err(e) => {
                    // Unreadable (a torn write cannot happen: entries are
                    // renamed into place whole): keep it for a person.
                    done += self.upload_group(lake, std::mem::take(&mut group))?;
                    self.set_aside(&path, &e)?;
                    self.count(-1);
                    done += 1;
                    continue;
                }
            };
            let joins = seq >= self.fresh_from
                && group.len() < GROUP_ENTRIES
                && group.last().is_some_and(|(_, last)| {
                    last.repo == entry.repo && last.branch == entry.branch
                });
            if !joins {
                done += self.upload_group(lake, std::mem::take(&mut group))?;
            }
            if seq >= self.fresh_from {
                group.push((path, entry));
            } else {
                done += self.upload_group(lake, vec![(path, entry)])?;
            }
        }
        done += self.upload_group(lake, group)?;
        Ok(done)
    }

    /// Stage entries as one batch (see `upload_all`); returns how many.
    fn upload_group(
        &self,
        lake: &Lake,
        group: Vec<(PathBuf, JournalEntry)>,
    ) -> Result<usize, String> {
        let Some((_, last)) = group.last() else {
            return Ok(0);
        };
        let entry = JournalEntry {
            repo: last.repo.clone(),
            branch: last.branch.clone(),
            batch: last.batch.clone(),
            ops: group.iter().flat_map(|(_, e)| e.ops.clone()).collect(),
        };
        match self.upload(lake, &entry) {
            Ok(()) => {
                for (path, _) in &group {
                    std::fs::remove_file(path).map_err(io_err)?;
                }
                self.release(&chunks_of(&entry.ops));
            }
            Err(Upload::Retry(e)) => return Err(e),
            // Its branch was deleted: keep the entries (and their chunks)
            // aside for a person, and let the rest go on.
            Err(Upload::Gone(e)) => {
                for (path, _) in &group {
                    self.set_aside(path, &e)?;
                }
            }
        }
        self.count(-(group.len() as isize));
        Ok(group.len())
    }

    fn set_aside(&self, path: &Path, why: &str) -> Result<(), String> {
        let aside = self.dir.join("orphaned");
        std::fs::create_dir_all(&aside).map_err(io_err)?;
        let to = aside.join(path.file_name().expect("entry file"));
        std::fs::rename(path, &to).map_err(io_err)?;
        tracing::warn!(entry = %to.display(), "journaled change set aside: {why}");
        Ok(())
    }

    fn upload(&self, lake: &Lake, entry: &JournalEntry) -> Result<(), Upload> {
        let keys: Vec<String> = chunks_of(&entry.ops)
            .iter()
            .map(|h| h.key("chunks"))
            .collect();
        for (key, bytes) in keys.iter().zip(
            self.objects
                .get_many(&keys)
                .map_err(|e| Upload::Retry(e.to_string()))?,
        ) {
            // Missing here means an earlier upload of this entry got that far.
            if let Some(b) = bytes {
                lake.store()
                    .put_content_many(vec![(key.clone(), b)])
                    .map_err(|e| Upload::Retry(e.to_string()))?;
            }
        }
        let (r, _) = match lake.branch(&entry.repo, &entry.branch) {
            Ok(r) => r,
            Err(e @ (RepoError::NoBranch { .. } | RepoError::NoRepo(_))) => {
                return Err(Upload::Gone(e.to_string()))
            }
            Err(e) => return Err(Upload::Retry(e.to_string())),
        };
        lake.stage_known(
            &entry.repo,
            &entry.branch,
            entry.ops.clone(),
            &StageHint {
                token: r.staging,
                seen: None,
                id: Some(entry.batch.clone()),
            },
        )
        .map(|_| ())
        .map_err(|e| Upload::Retry(e.to_string()))
    }

    /// The uploader: wakes on every append and every `RETRY_AFTER`.
    pub fn spawn_uploader(self: &Arc<Self>, lake: Arc<Lake>) -> std::io::Result<()> {
        let j = self.clone();
        std::thread::Builder::new()
            .name("tarn-uploader".into())
            .spawn(move || loop {
                let has_work = j.pending.lock().total > 0;
                if has_work {
                    std::thread::sleep(GATHER);
                    match j.upload_all(&lake) {
                        Ok(_) => j.pending.lock().last_error = None,
                        Err(e) => {
                            tracing::warn!(%e, "write-back upload failed; retrying");
                            j.pending.lock().last_error = Some(e);
                            std::thread::sleep(RETRY_AFTER);
                        }
                    }
                } else {
                    let mut p = j.pending.lock();
                    if p.total == 0 {
                        j.drained.wait_for(&mut p, RETRY_AFTER);
                    }
                }
            })
            .map(|_| ())
    }
}

/// The journaled chunks an entry's ops refer to.
fn chunks_of(ops: &[Op]) -> Vec<Hash> {
    let mut out = Vec::new();
    for op in ops {
        if let Op::Put {
            entry: Entry::File(f),
            ..
        } = op
        {
            if let Content::Chunks(refs) = &f.content {
                out.extend(refs.iter().map(|r| r.hash));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::File;

    fn lake() -> Lake {
        let s = Store::open(&format!("memory://journal-{}", ulid::Ulid::new())).unwrap();
        let l = Lake::init(s).unwrap().0;
        l.create_repo("r", "main").unwrap();
        l
    }

    #[test]
    fn a_burst_of_closes_on_one_branch_is_staged_as_one_batch() {
        let l = lake();
        l.create_branch("r", "dev", "main").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut latest: Option<String> = None;
        let mut put = |branch: &str, path: &str, text: &str| {
            let batch = Lake::new_batch_id(latest.as_deref());
            latest = Some(batch.clone());
            let (content, size, _) = j
                .store_file(l.config().chunking, text.as_bytes(), "test")
                .unwrap();
            j.append(&JournalEntry {
                repo: "r".into(),
                branch: branch.into(),
                batch,
                ops: vec![Op::Put {
                    path: path.into(),
                    entry: Entry::File(File {
                        size,
                        mode: 0o644,
                        mtime: 0,
                        content,
                    }),
                }],
            })
            .unwrap();
        };
        put("main", "a", "1");
        put("main", "a", "2");
        put("main", "b", "3");
        put("dev", "c", "4");
        put("main", "a", "5");
        assert_eq!(j.upload_all(&l).unwrap(), 5);
        assert_eq!(j.pending.lock().total, 0);
        // main: the first three together, then the last; dev: one.
        assert_eq!(l.store().list("repos/r/staging").unwrap().len(), 3);
        let text = |branch: &str, path: &str| {
            let (_, work) = l.working_tree("r", branch).unwrap();
            let Some(Entry::File(f)) = l.trees().lookup(&work, path).unwrap() else {
                panic!("{path} is staged on {branch}")
            };
            let mut out = Vec::new();
            l.read_file(&f, &mut out).unwrap();
            String::from_utf8(out).unwrap()
        };
        assert_eq!(text("main", "a"), "5", "order kept");
        assert_eq!(text("main", "b"), "3");
        assert_eq!(text("dev", "c"), "4");
    }

    #[test]
    fn entries_left_by_a_dead_daemon_are_uploaded_in_order_by_the_next() {
        let l = lake();
        let dir = tempfile::tempdir().unwrap();
        let big = crate::chunk::INLINE_MAX as usize * 100;
        {
            let j = Journal::open(dir.path()).unwrap();
            for (i, byte) in [1u8, 2, 3].into_iter().enumerate() {
                let data = vec![byte; big];
                let (content, size, _) = j
                    .store_file(l.config().chunking, &data[..], "test")
                    .unwrap();
                let entry = Entry::File(File {
                    size,
                    mode: 0o644,
                    mtime: 0,
                    content,
                });
                j.append(&JournalEntry {
                    repo: "r".into(),
                    branch: "main".into(),
                    batch: Lake::new_batch_id(None),
                    ops: vec![Op::Put {
                        // The same path each time: the last must win.
                        path: "f".into(),
                        entry,
                    }],
                })
                .unwrap();
                assert_eq!(j.pending.lock().total, i + 1);
            }
            // Dropped without uploading: the daemon died.
        }
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.pending.lock().total, 3);
        assert_eq!(j.upload_all(&l).unwrap(), 3);
        j.wait_drained(Duration::from_secs(1)).unwrap();
        let (_, work) = l.working_tree("r", "main").unwrap();
        let Some(Entry::File(f)) = l.trees().lookup(&work, "f").unwrap() else {
            panic!("f is staged")
        };
        let mut out = Vec::new();
        l.read_file(&f, &mut out).unwrap();
        assert_eq!(out, vec![3u8; big]);
        // Every journaled chunk is in the lake and gone from the journal.
        assert!(j.objects.list("chunks").unwrap().is_empty());
        assert!(j.needed.lock().is_empty());
    }

    #[test]
    fn an_entry_whose_branch_is_gone_is_set_aside_not_retried_for_ever() {
        let l = lake();
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        for branch in ["deleted", "main"] {
            j.append(&JournalEntry {
                repo: "r".into(),
                branch: branch.into(),
                batch: Lake::new_batch_id(None),
                ops: vec![Op::Delete { path: "x".into() }],
            })
            .unwrap();
        }
        assert_eq!(j.upload_all(&l).unwrap(), 2);
        j.wait_drained(Duration::from_secs(1)).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("journal/orphaned"))
                .unwrap()
                .count(),
            1
        );
        assert_eq!(l.staged_ops("r", "main").unwrap().len(), 1);
    }
}
