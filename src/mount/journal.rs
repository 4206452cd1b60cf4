//! The write-back journal (`tarn mount --writeback`): a close appends its
//! staged ops to a log on the cache disk and returns (`fsync` also syncs
//! the cache file system); one
//! uploader thread then sends each entry's new chunks to the lake and stages
//! its ops, in order, under the batch id chosen at close. Entries left by a
//! crash are uploaded when the next daemon starts with the same cache dir.
//!
//! Layout under `<cache>/journal/`:
//! - `log/<seq>`: segments of records, one per close, each copied into the
//!   segment's file mapped in memory (in the page cache once copied: it
//!   survives the daemon being killed; `sync` makes it survive a machine
//!   crash). A record is `len: u32 LE`, the payload's check
//!   (`record_check`), the payload: a postcard `JournalEntry`, or a
//!   draft's step (`DRAFT_MARK`, then a postcard `DraftRecord`). A segment
//!   is named by the sequence number of its first record, allocated whole
//!   when made (`log/next`, made ahead by the uploader, numbered when
//!   taken), and closed at `SEGMENT_BYTES`, then cut to its last record by
//!   the uploader. Until then, and in one a daemon left open, zeros follow
//!   the records: a zero length ends them. Where
//!   a segment cannot be allocated and mapped, or its file system copies
//!   on write (`writes_in_place`), its records are written.
//! - `upload.pos`: `SEG OFFSET INTENT`, the next record to upload and, while
//!   a group of records is being staged, where that group ends: a daemon
//!   that dies meanwhile is followed by one that stages exactly that group
//!   again (the same batch, so staging it twice is harmless).
//! - `entries/<seq>`: one entry per file, as journals were written before
//!   the log; uploaded first, one by one.
//! - `drafts/`: spool files of drafts (`DraftRecord`) grown past 1 MiB.
//!   Records of drafts, the steps of files a create made and not yet
//!   staged, are in the log beside the entries; read only when a journal
//!   is opened (`Journal::open` folds them, `recover_drafts` makes the
//!   files again).
//! - `objects/`: a local object store holding the chunks of files closed
//!   but not yet uploaded (read by the chunk cache meanwhile). A chunk is
//!   counted for each entry that needs it, from before it is written until
//!   its entry is uploaded, and deleted when no entry needs it any more.
//! - `orphaned/`: entries whose branch was deleted meanwhile, and log
//!   segments that cannot be read, for a person; their chunks are kept.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use crate::chunk::Stored;
use crate::hash::Hash;
use crate::repo::{Lake, RepoError, StageHint};
use crate::store::Store;
use crate::tree::{Content, Entry, File, Op};

/// How long the uploader waits before trying a failed upload again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Most entries staged together as one batch (see `upload_log`).
const GROUP_ENTRIES: usize = 4096;

/// A log segment is closed once it holds this many bytes.
const SEGMENT_BYTES: u64 = 8 << 20;

/// Bytes before a record's payload: its length and checksum.
const RECORD_HEAD: usize = 12;

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

/// A step in the life of a file made through a `--writeback` mount and
/// not yet staged. The kernel is told not to flush such a file at close
/// (no request comes, so a close costs nothing), so each change to it is
/// journaled before it is answered: after a crash, `recover_drafts` makes
/// the file again from its steps and stages it. Until then the uploader
/// passes over these records, and the segments holding a file's steps are
/// kept while it is open (see `Journal::pins`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DraftRecord {
    /// The file (`new_draft_id`), for as long as it is open.
    pub id: u64,
    pub step: DraftStep,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DraftStep {
    /// The whole file. Its first step, and again whenever its steps would
    /// keep old segments, or its bytes moved (into a spool file, or back).
    State(DraftState),
    /// Written: `bytes` at `offset` (none once a spool file holds them),
    /// and its mode and time after.
    Write {
        offset: u64,
        len: u64,
        bytes: bytes::Bytes,
        mode: u32,
        mtime: i64,
    },
    /// Truncated or extended.
    Size { size: u64, mtime: i64 },
    /// Its mode or time set.
    Attr { mode: u32, mtime: i64 },
    /// Renamed (itself, or a directory above it).
    Path(String),
    /// Staged by its last close, or removed: nothing left to make again.
    Done,
}

/// A draft's whole state: where it is, its mode, time and size, and its
/// bytes (or the name of the spool file under `drafts/` that holds them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DraftState {
    pub repo: String,
    pub branch: String,
    pub path: String,
    pub mode: u32,
    pub mtime: i64,
    pub size: u64,
    pub bytes: bytes::Bytes,
    pub spool: Option<String>,
}

/// A fresh draft id: random, so no two daemons' drafts share one.
pub fn new_draft_id() -> u64 {
    ulid::Ulid::new().0 as u64
}

/// Records of drafts start with this byte, where an entry's payload starts
/// with the length of its (never empty) repository name.
const DRAFT_MARK: u8 = 0;

/// A draft whose steps began this many segments before the one being
/// written is written again whole (`Journal::on_stale_drafts`), so an open
/// file never keeps more than a few segments.
const REBASE_AFTER: u64 = 4;

/// A record of the log.
#[derive(Debug)]
enum Rec {
    Entry(JournalEntry),
    /// A draft's step: read only where asked for (`read_records`).
    Draft(Option<DraftRecord>),
}

/// Why an entry did not upload.
enum Upload {
    /// Try again later (the store is unreachable, a race was lost, ...).
    Retry(String),
    /// It never can: its branch or repository is gone.
    Gone(String),
}

#[derive(Default)]
struct Appender {
    /// Sequence number of the next record.
    next: u64,
    /// The open segment.
    segment: Option<Segment>,
    /// The last record's buffer, for the next one.
    buffer: Vec<u8>,
}

impl Appender {
    /// The number of the segment being appended to (or, none being open,
    /// of the next: all is before it).
    fn segment_seq(&self) -> u64 {
        self.segment.as_ref().map_or(self.next, |s| s.seq)
    }
}

/// The next log segment, made ready before it is needed, and segments
/// closed but not yet let go of: both the uploader's work (`tend`), not a
/// close's. Making one takes milliseconds (allocating and faulting in 8
/// MiB) and letting one go ~0.5 ms (unmapping, cutting the file); and a
/// thread started or woken for it from a close ran ahead of the close on
/// its CPU.
#[derive(Default)]
struct Spare {
    ready: Option<Segment>,
    /// One was taken (or none made yet when the log began): make another.
    wanted: bool,
    closed: Vec<Segment>,
}

/// The name of a segment made ahead, in `log/`, until it is numbered.
const SPARE: &str = "next";

/// A log segment: the one being appended to, the one made ahead, or one
/// closed and not yet let go of (see `Spare`).
struct Segment {
    /// Its number: the sequence number of its first record.
    seq: u64,
    file: std::fs::File,
    /// Bytes of whole records in it; what follows is zeros.
    size: u64,
    /// The file mapped, its blocks allocated when it was made: an append
    /// is a copy into the page cache (as durable as a `write`), no system
    /// call. `None` where the blocks could not be allocated or the file
    /// system copies on write (`writes_in_place`): records are then written.
    map: Option<memmap2::MmapMut>,
}

impl Segment {
    fn create(path: &Path, seq: u64, room: u64) -> std::io::Result<Segment> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        let map = Self::map(&file, room);
        Ok(Segment {
            seq,
            file,
            size: 0,
            map,
        })
    }

    fn map(file: &std::fs::File, room: u64) -> Option<memmap2::MmapMut> {
        use std::os::fd::AsRawFd;
        if !file_system_type(file).is_some_and(writes_in_place) {
            return None;
        }
        let len = room.next_multiple_of(4096);
        // Allocated up front, so a copy into the mapping never needs a
        // block: on a full disk it would end the daemon (SIGBUS) instead
        // of failing a close.
        // SAFETY: fallocate on a descriptor we own.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) } != 0 {
            return None;
        }
        // SAFETY: the file is this daemon's own segment, made just now; it
        // is not truncated while mapped (see `Drop`).
        let map = unsafe { memmap2::MmapOptions::new().len(len as usize).map_mut(file) }.ok()?;
        // Fault its pages in now, not one by one in the closes that follow.
        // A fault the file system refuses here (no room to write, on a
        // copy-on-write one) would end the daemon in a close: written
        // instead. (EINVAL: a kernel before 5.14; they fault as they come.)
        match map.advise(memmap2::Advice::PopulateWrite) {
            Err(e) if e.raw_os_error() != Some(libc::EINVAL) => None,
            _ => Some(map),
        }
    }

    /// Can `len` more bytes go in?
    fn has_room(&self, len: usize) -> bool {
        self.map
            .as_ref()
            .is_none_or(|m| self.size as usize + len <= m.len())
    }

    fn append(&mut self, record: &[u8]) -> std::io::Result<()> {
        match &mut self.map {
            Some(m) => {
                let at = self.size as usize;
                // Its head (a length, never zero) last: a record is whole
                // wherever a head is, even in a daemon killed mid-copy.
                m[at + RECORD_HEAD..at + record.len()].copy_from_slice(&record[RECORD_HEAD..]);
                m[at..at + RECORD_HEAD].copy_from_slice(&record[..RECORD_HEAD]);
            }
            None => std::os::unix::fs::FileExt::write_all_at(&self.file, record, self.size)?,
        }
        self.size += record.len() as u64;
        Ok(())
    }
}

impl Drop for Segment {
    /// A closed segment ends with its last whole record: the rest of its
    /// allocation (or a torn write) is cut off.
    fn drop(&mut self) {
        drop(self.map.take());
        let _ = self.file.set_len(self.size);
    }
}

/// Does a file system of this type (`statfs`'s `f_type`) write a mapped
/// page of a file over the blocks `fallocate` gave it, whenever it is
/// written? Then a copy into a mapped segment never needs room the disk may
/// not have. A copy-on-write one (btrfs, ZFS, bcachefs) needs new blocks for
/// a page written again after it went to disk, and where there are none the
/// copy ends the daemon (SIGBUS) instead of failing a close: segments there
/// are written, not mapped. So are they on file systems not known here.
fn writes_in_place(f_type: i64) -> bool {
    const EXT4: i64 = 0xEF53; // ext2, ext3 and ext4
    const XFS: i64 = 0x5846_5342;
    const TMPFS: i64 = 0x0102_1994;
    matches!(f_type, EXT4 | XFS | TMPFS)
}

/// The type of the file system `file` is on (`statfs`'s `f_type`).
fn file_system_type(file: &std::fs::File) -> Option<i64> {
    use std::os::fd::AsRawFd;
    // SAFETY: fstatfs fills the struct it is given, on a live descriptor.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } == 0).then_some(st.f_type as i64)
}

/// A record buffer bigger than this is not kept for the next record.
const KEEP_BUFFER: usize = 1 << 20;

/// Where uploading the log has got to (`upload.pos`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Position {
    segment: u64,
    offset: u64,
    /// While a group is being staged: the offset where it ends.
    intent: u64,
}

/// One record of a log segment: where it ends, and what it holds.
struct Record {
    end: u64,
    rec: Rec,
}

impl Record {
    fn entry(&self) -> Option<&JournalEntry> {
        match &self.rec {
            Rec::Entry(e) => Some(e),
            Rec::Draft(_) => None,
        }
    }
}

#[derive(Default)]
struct Pending {
    /// Entries not yet uploaded.
    total: usize,
    /// Of them, entries of the one-file-per-entry layout.
    entries: usize,
    /// How far uploads of the log have got: (segment, offset), every
    /// record before it uploaded (`u64::MAX`: the whole segment).
    uploaded: (u64, u64),
    last_error: Option<String>,
}

pub struct Journal {
    dir: PathBuf,
    /// Chunks of journaled files: a local store with the lake's key layout.
    objects: Store,
    /// The log segment being appended to; held while appending.
    append: Mutex<Appender>,
    /// A segment is closed once it holds this many bytes.
    segment_bytes: std::sync::atomic::AtomicU64,
    /// The next segment, made ahead (see `Spare`).
    spare: Mutex<Spare>,
    /// Entries (written or being written) that need each journaled chunk.
    needed: Mutex<HashMap<Hash, usize>>,
    pending: Mutex<Pending>,
    drained: Condvar,
    /// Drafts still open: the segment of each one's latest `State`. No
    /// segment from the oldest of them on is removed.
    pins: Mutex<HashMap<u64, u64>>,
    /// Writes a draft's `State` again (given the ids of those whose steps
    /// began `REBASE_AFTER` segments ago): set by the mount.
    rebase: Mutex<Option<Rebase>>,
    /// What the uploader reads the log into (see `read_records_with`).
    read_buf: Mutex<Vec<u8>>,
    /// Drafts a dead daemon left open, folded from their steps as `open`
    /// read the log: made again by `recover_drafts`.
    left_drafts: Mutex<HashMap<u64, Folded>>,
}

type Rebase = Box<dyn Fn(Vec<u64>) + Send + Sync>;

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
        std::fs::create_dir_all(dir.join("log"))?;
        std::fs::create_dir_all(dir.join("objects"))?;
        std::fs::create_dir_all(dir.join("drafts"))?;
        let objects = Store::open(&format!("file://{}", dir.join("objects").display()))
            .map_err(std::io::Error::other)?;
        let j = Journal {
            objects,
            append: Mutex::new(Appender::default()),
            segment_bytes: SEGMENT_BYTES.into(),
            spare: Mutex::default(),
            needed: Mutex::new(HashMap::new()),
            pending: Mutex::new(Pending::default()),
            drained: Condvar::new(),
            pins: Mutex::default(),
            rebase: Mutex::new(None),
            read_buf: Mutex::default(),
            left_drafts: Mutex::default(),
            dir,
        };
        for (_, path) in j.entries()? {
            if let Ok(e) = Self::read(&path) {
                j.count(1);
                j.pending.lock().entries += 1;
                j.need(&chunks_of(&e.ops));
            }
        }
        let pos = j.position();
        j.pending.lock().uploaded = (pos.segment, pos.offset);
        let mut next = 0;
        let mut drafts = HashMap::new();
        let mut steps = 0u64;
        // Each segment read once, whole: entries not uploaded yet are
        // counted, and drafts' steps folded (for `recover_drafts`; a
        // draft's first steps may be in a segment uploaded already).
        for (seg, path) in j.segments()? {
            let (records, _) = read_records(&path, 0, None, true)?;
            next = next.max(seg + records.len() as u64 + 1);
            for r in records {
                match r.rec {
                    Rec::Entry(e) if (seg, r.end) > (pos.segment, pos.offset) => {
                        j.count(1);
                        j.need(&chunks_of(&e.ops));
                    }
                    Rec::Draft(Some(d)) => {
                        steps += 1;
                        fold(&mut drafts, d, steps);
                    }
                    _ => {}
                }
            }
        }
        *j.left_drafts.lock() = drafts;
        j.append.lock().next = next.max(pos.segment + 1);
        // A segment made ahead by an earlier daemon, never used.
        let _ = std::fs::remove_file(j.spare_path());
        Ok(Arc::new(j))
    }

    /// Log segments, oldest first.
    fn segments(&self) -> std::io::Result<Vec<(u64, PathBuf)>> {
        self.numbered("log")
    }

    /// The files of `dir` named by a number, in order.
    fn numbered(&self, dir: &str) -> std::io::Result<Vec<(u64, PathBuf)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.dir.join(dir))? {
            let e = e?;
            if let Some(seq) = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) {
                out.push((seq, e.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    fn position(&self) -> Position {
        let text = std::fs::read_to_string(self.dir.join("upload.pos")).unwrap_or_default();
        let n: Vec<u64> = text
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        match n[..] {
            [segment, offset, intent] => Position {
                segment,
                offset,
                intent,
            },
            _ => Position::default(),
        }
    }

    /// Written in place, fixed width, with one `pwrite`: a daemon killed
    /// at any moment leaves the old position or the new one.
    fn set_position(&self, p: Position) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        let text = format!("{:020} {:020} {:020}\n", p.segment, p.offset, p.intent);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.dir.join("upload.pos"))
            .and_then(|f| f.write_all_at(text.as_bytes(), 0))
            .map_err(io_err)
    }

    /// The local store where journaled files' chunks go.
    pub fn objects(&self) -> &Store {
        &self.objects
    }

    /// Entry files of the older one-file-per-entry layout, oldest first.
    fn entries(&self) -> std::io::Result<Vec<(u64, PathBuf)>> {
        self.numbered("entries")
    }

    fn read(path: &Path) -> Result<JournalEntry, String> {
        let bytes = std::fs::read(path).map_err(io_err)?;
        postcard::from_bytes(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Uploads of the log have got to `offset` in segment `seg`.
    fn uploaded_to(&self, seg: u64, offset: u64) {
        let mut p = self.pending.lock();
        p.uploaded = p.uploaded.max((seg, offset));
        self.drained.notify_all();
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
            Ok((Stored::Inline(b), stats)) => Ok((Content::Inline(b.into()), stats.bytes, hashes)),
            Ok((Stored::Chunks(refs), stats)) => Ok((Content::Chunks(refs), stats.bytes, hashes)),
            Err(e) => {
                self.release(&hashes);
                Err(e.to_string())
            }
        }
    }

    /// Make again the files a daemon that died was still writing (drafts
    /// with no `Done`, as `open` found them), journal each as a close
    /// would, and end their drafts. Run before the uploader starts. Returns how many there were.
    pub fn recover_drafts(&self, params: crate::chunk::ChunkParams) -> Result<usize, String> {
        let left = std::mem::take(&mut *self.left_drafts.lock());
        let mut left: Vec<(u64, Folded)> = left.into_iter().collect();
        left.sort_by_key(|(_, f)| f.last_step);
        let mut batch: Option<String> = None;
        for (id, folded) in &left {
            let f = &folded.state;
            match folded.content(&self.drafts_dir()) {
                Ok(bytes) => {
                    let (content, size, _) = self.store_file(params, &bytes[..], &f.path)?;
                    let id_now = crate::repo::Lake::new_batch_id(batch.as_deref());
                    batch = Some(id_now.clone());
                    self.append(&JournalEntry {
                        repo: f.repo.clone(),
                        branch: f.branch.clone(),
                        batch: id_now,
                        ops: vec![Op::Put {
                            path: f.path.clone(),
                            entry: Entry::File(File {
                                size,
                                mode: f.mode,
                                mtime: f.mtime,
                                content,
                            }),
                        }],
                    })?;
                }
                Err(e) => {
                    let why = format!(
                        "{}/{}: {} cannot be made again: {e}",
                        f.repo, f.branch, f.path
                    );
                    self.put_aside(
                        std::ffi::OsStr::new(&format!("draft-{id:016x}")),
                        &why,
                        |to| std::fs::write(to, format!("{why}\n")),
                    )?;
                }
            }
            self.draft(&DraftRecord {
                id: *id,
                step: DraftStep::Done,
            })?;
        }
        if !left.is_empty() {
            // Closed, so it goes once uploaded (an open segment stays until
            // it is full; closes may never come).
            let closed = self.append.lock().segment.take();
            drop(closed);
            // Nor is one made ahead for closes that may never come.
            self.spare.lock().wanted = false;
        }
        // Every draft has ended: their spool files are no one's now.
        for e in std::fs::read_dir(self.drafts_dir()).map_err(io_err)? {
            let _ = std::fs::remove_file(e.map_err(io_err)?.path());
        }
        Ok(left.len())
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

    /// Append an entry (durable against the daemon dying; see `sync`). Its
    /// chunks must be in `objects`, counted as needed (by `store_file`);
    /// they stay until the entry is uploaded.
    pub fn append(&self, entry: &JournalEntry) -> Result<(), String> {
        // Counted before it can be read: the uploader may stage it and
        // count it off before this call returns.
        self.count(1);
        let res = self.append_record(entry);
        if res.is_err() {
            self.count(-1);
        }
        res
    }

    fn append_record(&self, entry: &JournalEntry) -> Result<(), String> {
        self.encode_and_write(None, entry).map(drop)
    }

    /// Append `value` (after `mark`) as a record; the appender, still
    /// held, for what goes with the append.
    fn encode_and_write<T: Serialize>(
        &self,
        mark: Option<u8>,
        value: &T,
    ) -> Result<parking_lot::MutexGuard<'_, Appender>, String> {
        let mut a = self.append.lock();
        let record = record_in(mark, value, std::mem::take(&mut a.buffer));
        let res = self.write_record(&mut a, &record);
        if record.capacity() <= KEEP_BUFFER {
            a.buffer = record;
        }
        res.map(|()| a)
    }

    /// Append a step of a draft (durable against the daemon dying, as an
    /// entry is). Not counted as an upload: the uploader passes over it.
    pub fn draft(&self, draft: &DraftRecord) -> Result<(), String> {
        let seg = self
            .encode_and_write(Some(DRAFT_MARK), draft)?
            .segment_seq();
        match draft.step {
            DraftStep::State(_) => {
                self.pins.lock().insert(draft.id, seg);
            }
            DraftStep::Done => {
                self.pins.lock().remove(&draft.id);
            }
            _ => {}
        }
        Ok(())
    }

    /// Where drafts' spool files go (kept across a crash, unlike the
    /// daemon's own spool directory).
    pub fn drafts_dir(&self) -> PathBuf {
        self.dir.join("drafts")
    }

    /// Set how a draft's whole state is written again (see `REBASE_AFTER`).
    pub fn on_stale_drafts(&self, f: impl Fn(Vec<u64>) + Send + Sync + 'static) {
        *self.rebase.lock() = Some(Box::new(f));
    }

    /// The oldest segment an open draft needs (`u64::MAX`: none).
    fn pinned_from(&self) -> u64 {
        self.pins.lock().values().copied().min().unwrap_or(u64::MAX)
    }

    /// Append a whole record to the open segment (another once it is full).
    fn write_record(&self, a: &mut Appender, record: &[u8]) -> Result<(), String> {
        let limit = self
            .segment_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        if a.segment
            .as_ref()
            .is_none_or(|s| s.size >= limit || !s.has_room(record.len()))
        {
            // Closed first; cut to its records and unmapped by the
            // uploader (`tend`): until then its records end where zeros
            // start, as in one a dead daemon left open.
            let closed = a.segment.take();
            let seq = a.next;
            let path = self.dir.join("log").join(format!("{seq:020}"));
            let room = limit.max(record.len() as u64);
            let made = match self.take_spare(seq, &path, room) {
                Some(spare) => spare,
                None => Segment::create(&path, seq, room).map_err(io_err)?,
            };
            a.segment = Some(made);
            let mut spare = self.spare.lock();
            spare.wanted = true;
            spare.closed.extend(closed);
        }
        let segment = a.segment.as_mut().expect("opened");
        if let Err(e) = segment.append(record) {
            // A torn record ends its segment: the next append starts another.
            a.segment = None;
            return Err(io_err(e));
        }
        a.next += 1;
        Ok(())
    }

    /// Where the next segment is made ready, before it has a number.
    fn spare_path(&self) -> PathBuf {
        self.dir.join("log").join(SPARE)
    }

    /// The segment made ahead, if it is ready and `room` fits in it,
    /// numbered `seq` at `path`.
    fn take_spare(&self, seq: u64, path: &Path, room: u64) -> Option<Segment> {
        let mut spare = self
            .spare
            .lock()
            .ready
            .take_if(|s| s.has_room(room as usize))?;
        std::fs::rename(self.spare_path(), path).ok()?;
        spare.seq = seq;
        Some(spare)
    }

    /// The uploader's care of the segments: let go of closed ones, and
    /// make the next one ready (once one has been taken).
    fn tend(&self) {
        let (closed, wanted) = {
            let mut spare = self.spare.lock();
            let wanted = spare.ready.is_none() && std::mem::take(&mut spare.wanted);
            (std::mem::take(&mut spare.closed), wanted)
        };
        drop(closed);
        let current = self.append.lock().segment_seq();
        let stale: Vec<u64> = (self.pins.lock().iter())
            .filter(|(_, seg)| **seg + REBASE_AFTER <= current)
            .map(|(id, _)| *id)
            .collect();
        if !stale.is_empty() {
            if let Some(rebase) = &*self.rebase.lock() {
                rebase(stale);
            }
        }
        if !wanted {
            return;
        }
        let path = self.spare_path();
        let _ = std::fs::remove_file(&path);
        let room = self
            .segment_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        match Segment::create(&path, 0, room) {
            Ok(made) => self.spare.lock().ready = Some(made),
            Err(e) => {
                tracing::debug!(%e, "no journal segment made ahead");
                self.spare.lock().wanted = true;
            }
        }
    }

    /// Wait until nothing is left to upload, or `limit` passes.
    #[cfg(test)]
    fn wait_drained(&self, limit: Duration) -> Result<(), String> {
        self.wait_until(limit, |p| p.total == 0)
    }

    /// Wait until every entry appended so far is uploaded (entries
    /// appended meanwhile need not be: closes going on elsewhere do not
    /// hold the caller up), or `limit` passes.
    pub fn wait_uploaded(&self, limit: Duration) -> Result<(), String> {
        self.wait_uploaded_to(self.mark(), limit)
    }

    /// Where the log ends now: (segment, offset).
    fn mark(&self) -> (u64, u64) {
        let a = self.append.lock();
        (a.segment_seq(), a.segment.as_ref().map_or(0, |s| s.size))
    }

    fn wait_uploaded_to(&self, mark: (u64, u64), limit: Duration) -> Result<(), String> {
        self.wait_until(limit, |p| {
            p.total == 0 || (p.entries == 0 && p.uploaded >= mark)
        })
    }

    fn wait_until(&self, limit: Duration, done: impl Fn(&Pending) -> bool) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let mut p = self.pending.lock();
        while !done(&p) {
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
    pub fn upload_all(&self, lake: &Lake) -> Result<usize, String> {
        Ok(self.upload_entries(lake)? + self.upload_log(lake)?)
    }

    /// Entries of the one-file-per-entry layout, one by one.
    fn upload_entries(&self, lake: &Lake) -> Result<usize, String> {
        let mut done = 0;
        for (_, path) in self.entries().map_err(io_err)? {
            let entry = match Self::read(&path) {
                Ok(e) => e,
                Err(e) => {
                    // Unreadable (a torn write cannot happen: entries were
                    // renamed into place whole): keep it for a person.
                    self.set_aside(&path, &e)?;
                    continue;
                }
            };
            match self.upload(lake, &entry) {
                Ok(()) => {
                    std::fs::remove_file(&path).map_err(io_err)?;
                    self.release(&chunks_of(&entry.ops));
                }
                Err(Upload::Retry(e)) => return Err(e),
                Err(Upload::Gone(e)) => self.set_aside(&path, &e)?,
            }
            self.pending.lock().entries -= 1;
            self.count(-1);
            done += 1;
        }
        Ok(done)
    }

    /// The log, from `upload.pos` on. Consecutive records of one branch are
    /// staged together as one batch, under the id of the last of them (one
    /// store write for many closes). That keeps every order that matters:
    /// no other writer can have seen these entries (none was in the store:
    /// `upload.pos` says how far uploads got, and a group being staged when
    /// a daemon died is staged again whole, as it was), and any batch the
    /// mount had seen before one of them has a lower id than the last.
    fn upload_log(&self, lake: &Lake) -> Result<usize, String> {
        let mut done = 0;
        let mut pos = self.position();
        let mut buf = self.read_buf.lock();
        for (seg, path) in self.segments().map_err(io_err)? {
            if seg < pos.segment {
                if seg < self.pinned_from() {
                    std::fs::remove_file(&path).map_err(io_err)?; // uploaded before
                }
                continue;
            }
            if seg > pos.segment {
                pos = Position {
                    segment: seg,
                    ..Position::default()
                };
            }
            loop {
                // Was the segment closed (no more appends) before this read?
                // If not, what is in it so far (it is allocated beyond).
                let appended = (self.append.lock().segment.as_ref())
                    .filter(|s| s.seq == seg)
                    .map(|s| s.size);
                let closed = appended.is_none();
                let (records, torn) =
                    read_records_with(&mut buf, &path, pos.offset, appended, false)
                        .map_err(io_err)?;
                // Drafts' steps are passed over (see `DraftRecord`).
                let entries: Vec<(u64, &JournalEntry)> = (records.iter())
                    .filter_map(|r| Some((r.end, r.entry()?)))
                    .collect();
                let mut i = 0;
                while i < entries.len() {
                    let first = entries[i].1;
                    let mut j = i + 1;
                    while j < entries.len()
                        && j - i < GROUP_ENTRIES
                        && if pos.intent > pos.offset {
                            // Exactly the group a dead daemon was staging.
                            entries[j - 1].0 < pos.intent
                        } else {
                            entries[j].1.repo == first.repo && entries[j].1.branch == first.branch
                        }
                    {
                        j += 1;
                    }
                    let group: Vec<&JournalEntry> = entries[i..j].iter().map(|(_, e)| *e).collect();
                    let end = entries[j - 1].0;
                    self.set_position(Position { intent: end, ..pos })?;
                    self.upload_group(lake, &group)?;
                    pos = Position {
                        segment: seg,
                        offset: end,
                        intent: 0,
                    };
                    self.set_position(pos)?;
                    self.uploaded_to(seg, end);
                    done += group.len();
                    i = j;
                }
                if let Some(last) = records.last().filter(|r| r.end > pos.offset) {
                    // Only drafts' steps after the last entry.
                    pos = Position {
                        segment: seg,
                        offset: last.end,
                        intent: 0,
                    };
                    self.set_position(pos)?;
                    self.uploaded_to(seg, last.end);
                }
                if torn {
                    // Records after a damaged one cannot be found: keep the
                    // segment for a person, and go on with the next.
                    self.set_aside(&path, "a damaged record")?;
                    self.uploaded_to(seg, u64::MAX);
                    break;
                }
                // Appends happen under this lock, so whether the segment is
                // closed, and its length then, is settled while it is held.
                let a = self.append.lock();
                if a.segment.as_ref().is_some_and(|s| s.seq == seg) {
                    // Closes go on appending to it: the next pass goes on
                    // from here. It stays until it is full (made and
                    // allocated ahead, a segment is not worth making for a
                    // close or two).
                    break;
                }
                // Something after what was read, appended before the segment
                // was closed (maybe after this read): read it again, now
                // settled. If it was read after the close and held no whole
                // record, it is only a torn tail (an append that never
                // returned) or the zeros after the records of a segment a
                // dead daemon left open.
                let more = pos.offset < std::fs::metadata(&path).map_err(io_err)?.len();
                if more && (!records.is_empty() || !closed) {
                    continue;
                }
                if seg < self.pinned_from() {
                    std::fs::remove_file(&path).map_err(io_err)?;
                }
                drop(a);
                self.uploaded_to(seg, u64::MAX);
                break;
            }
        }
        Ok(done)
    }

    /// Stage entries as one batch (see `upload_log`), then drop their
    /// chunks' counts; entries of a deleted branch are set aside.
    fn upload_group(&self, lake: &Lake, entries: &[&JournalEntry]) -> Result<(), String> {
        let Some(last) = entries.last() else {
            return Ok(());
        };
        let entry = JournalEntry {
            repo: last.repo.clone(),
            branch: last.branch.clone(),
            batch: last.batch.clone(),
            ops: entries.iter().flat_map(|e| e.ops.clone()).collect(),
        };
        match self.upload(lake, &entry) {
            Ok(()) => self.release(&chunks_of(&entry.ops)),
            Err(Upload::Retry(e)) => return Err(e),
            Err(Upload::Gone(why)) => {
                for entry in entries {
                    let bytes = postcard::to_allocvec(*entry).map_err(|e| e.to_string())?;
                    self.put_aside(entry.batch.as_ref(), &why, |to| std::fs::write(to, &bytes))?;
                }
            }
        }
        self.count(-(entries.len() as isize));
        Ok(())
    }

    /// Move an entry file or log segment to `orphaned/`, for a person.
    fn set_aside(&self, path: &Path, why: &str) -> Result<(), String> {
        let name = path.file_name().expect("entry file");
        self.put_aside(name, why, |to| std::fs::rename(path, to))
    }

    /// Make `orphaned/<name>` with `put` (a rename or a write).
    fn put_aside(
        &self,
        name: &std::ffi::OsStr,
        why: &str,
        put: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> Result<(), String> {
        let aside = self.dir.join("orphaned");
        std::fs::create_dir_all(&aside).map_err(io_err)?;
        let to = aside.join(name);
        put(&to).map_err(io_err)?;
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
                j.tend();
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
                    super::memory::give_back_if_asked();
                    let mut p = j.pending.lock();
                    if p.total == 0 {
                        j.drained.wait_for(&mut p, RETRY_AFTER);
                    }
                }
            })
            .map(|_| ())
    }
}

/// A draft as its steps so far leave it (see `recover_drafts`).
#[derive(Debug)]
struct Folded {
    /// Its state, but for its bytes...
    state: DraftState,
    /// ...which are here, until a spool file holds them.
    data: Vec<u8>,
    /// The number of its latest step: drafts are made again in that order.
    last_step: u64,
}

impl Folded {
    /// The file's bytes: exactly `size` of them (a sparse tail reads as
    /// zeros).
    fn content(&self, drafts: &Path) -> std::io::Result<Vec<u8>> {
        let mut bytes = match &self.state.spool {
            Some(name) => std::fs::read(drafts.join(name))?,
            None => self.data.clone(),
        };
        bytes.resize(self.state.size as usize, 0);
        Ok(bytes)
    }
}

/// Apply one step of draft `d` (the `n`th step read) to the open drafts.
fn fold(open: &mut HashMap<u64, Folded>, d: DraftRecord, n: u64) {
    let step = match d.step {
        DraftStep::State(mut state) => {
            let data = std::mem::take(&mut state.bytes).to_vec();
            let last_step = n;
            open.insert(
                d.id,
                Folded {
                    state,
                    data,
                    last_step,
                },
            );
            return;
        }
        DraftStep::Done => {
            open.remove(&d.id);
            return;
        }
        step => step,
    };
    // A step of a draft whose state is not here (it began in a segment
    // that is gone, so it had ended): nothing to make.
    let Some(f) = open.get_mut(&d.id) else {
        return;
    };
    f.last_step = n;
    let st = &mut f.state;
    match step {
        DraftStep::Write {
            offset,
            len,
            bytes,
            mode,
            mtime,
        } => {
            let end = offset + len;
            if st.spool.is_none() && bytes.len() as u64 == len {
                if f.data.len() < end as usize {
                    f.data.resize(end as usize, 0);
                }
                f.data[offset as usize..end as usize].copy_from_slice(&bytes);
            }
            st.size = st.size.max(end);
            st.mode = mode;
            st.mtime = mtime;
        }
        DraftStep::Size { size, mtime } => {
            if st.spool.is_none() {
                f.data.resize(size as usize, 0);
            }
            st.size = size;
            st.mtime = mtime;
        }
        DraftStep::Attr { mode, mtime } => {
            st.mode = mode;
            st.mtime = mtime;
        }
        DraftStep::Path(p) => st.path = p,
        DraftStep::State(_) | DraftStep::Done => unreachable!("handled above"),
    }
}

/// The records of a log segment from `from` on, and whether it ends with a
/// damaged record (a torn tail, only ever unacknowledged, reads as the end).
/// `drafts`: decode drafts' steps too (else only their place is read: the
/// uploader passes over them).
fn read_records(
    path: &Path,
    from: u64,
    to: Option<u64>,
    drafts: bool,
) -> std::io::Result<(Vec<Record>, bool)> {
    read_records_with(&mut Vec::new(), path, from, to, drafts)
}

/// `read_records`, reading into `bytes` (the uploader's, kept from one
/// pass to the next: a fresh buffer of a segment's worth of closes is
/// fresh pages, each faulted in and zeroed).
fn read_records_with(
    bytes: &mut Vec<u8>,
    path: &Path,
    from: u64,
    to: Option<u64>,
    drafts: bool,
) -> std::io::Result<(Vec<Record>, bool)> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), false)),
        Err(e) => return Err(e),
    };
    // Only what was appended since `from` (up to `to`, where the appends
    // have got to in an open segment): a segment is read a little at a
    // time while closes append to it.
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(from))?;
    let limit = to.map_or(u64::MAX, |to| to.saturating_sub(from));
    // Room for all of it at once: grown a little at a time, the buffer
    // for a segment's worth of closes is copied over and over.
    let size = match to {
        Some(_) => limit,
        None => f.metadata()?.len().saturating_sub(from),
    };
    bytes.clear();
    bytes.reserve(size as usize + 1);
    std::io::Read::read_to_end(&mut std::io::Read::take(f, limit), bytes)?;
    let bytes = &bytes[..];
    let mut out = Vec::new();
    let mut at = 0;
    while at + RECORD_HEAD <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        if len == 0 {
            break; // the zeros after the last record of a segment left open
        }
        let start = at + RECORD_HEAD;
        let Some(payload) = bytes.get(start..start + len) else {
            break; // torn tail
        };
        let rec = checks_out(payload, &bytes[at + 4..at + 12])
            .then(|| match payload.split_first() {
                Some((&DRAFT_MARK, _)) if !drafts => Some(Rec::Draft(None)),
                Some((&DRAFT_MARK, draft)) => postcard::from_bytes(draft)
                    .ok()
                    .map(|d| Rec::Draft(Some(d))),
                _ => postcard::from_bytes(payload).ok().map(Rec::Entry),
            })
            .flatten();
        let Some(rec) = rec else {
            return Ok((out, true));
        };
        at = start + len;
        out.push(Record {
            end: from + at as u64,
            rec,
        });
    }
    Ok((out, false))
}

/// `value` (after `mark`, if any) as a record (head and payload), built in
/// place in `buf`: encoded after room for its head, which is filled in after.
fn record_in<T: Serialize>(mark: Option<u8>, value: &T, buf: Vec<u8>) -> Vec<u8> {
    let mut prefix = [0; RECORD_HEAD + 1];
    prefix[RECORD_HEAD] = mark.unwrap_or_default();
    let prefix = &prefix[..RECORD_HEAD + usize::from(mark.is_some())];
    let mut record = crate::tree::encode_after_in(prefix, value, buf);
    let (head, payload) = record.split_at_mut(RECORD_HEAD);
    head[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    head[4..].copy_from_slice(&record_check(payload));
    record
}

/// A record's check: the CRC-32C of its payload, 8 bytes LE. It only has
/// to tell a torn or garbled record (the chunks an entry names are checked
/// by their hashes); in hardware it costs a fifth of a blake3 of 4 KiB,
/// and every close computes one.
fn record_check(payload: &[u8]) -> [u8; 8] {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, payload).to_le_bytes()
}

/// Does a record's payload match its head's check? Records written before
/// `record_check` carry the first 8 bytes of the payload's blake3 instead.
fn checks_out(payload: &[u8], check: &[u8]) -> bool {
    check == record_check(payload) || check == &Hash::of(payload).0[..8]
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
    use std::io::Write;

    fn lake() -> Lake {
        let s = Store::open(&format!("memory://journal-{}", ulid::Ulid::new())).unwrap();
        let l = Lake::init(s).unwrap().0;
        l.create_repo("r", "main").unwrap();
        l
    }

    /// A lake and a new journal in a temporary directory whose segments
    /// close once they hold `segment_bytes`.
    fn with_segments(segment_bytes: u64) -> (Lake, tempfile::TempDir, Arc<Journal>) {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.segment_bytes
            .store(segment_bytes, std::sync::atomic::Ordering::Relaxed);
        (lake(), dir, j)
    }

    #[test]
    fn a_burst_of_closes_on_one_branch_is_staged_as_one_batch() {
        let l = lake();
        l.create_branch("r", "dev", "main").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        put(&l, &j, "main", "a", "1");
        put(&l, &j, "main", "a", "2");
        put(&l, &j, "main", "b", "3");
        put(&l, &j, "dev", "c", "4");
        put(&l, &j, "main", "a", "5");
        assert_eq!(j.upload_all(&l).unwrap(), 5);
        assert_eq!(j.pending.lock().total, 0);
        // main: the first three together, then the last; dev: one.
        assert_eq!(l.store().list("repos/r/staging").unwrap().len(), 3);
        assert_eq!(text(&l, "main", "a"), "5", "order kept");
        assert_eq!(text(&l, "main", "b"), "3");
        assert_eq!(text(&l, "dev", "c"), "4");
    }

    /// Journal a put of `text` at `path`, under a batch id above the last
    /// one (as a mount's closes are).
    fn put(l: &Lake, j: &Journal, branch: &str, path: &str, text: &str) {
        static LAST: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
        let batch = {
            let mut last = LAST.lock().unwrap();
            let id = Lake::new_batch_id(last.as_deref());
            *last = Some(id.clone());
            id
        };
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
    }

    fn text(l: &Lake, branch: &str, path: &str) -> String {
        let (_, work) = l.working_tree("r", branch).unwrap();
        let Some(Entry::File(f)) = l.trees().lookup(&work, path).unwrap() else {
            panic!("{path} is staged on {branch}")
        };
        let mut out = Vec::new();
        l.read_file(&f, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// The journal a killed daemon left in `dir`, opened again: every file
    /// of `files` (path, text) is pending, is uploaded, and the log is
    /// emptied with nothing set aside.
    fn reopened_uploads_all(l: &Lake, dir: &Path, files: &[(String, String)]) {
        let j = Journal::open(dir).unwrap();
        assert_eq!(j.pending.lock().total, files.len());
        assert_eq!(j.upload_all(l).unwrap(), files.len());
        for (path, content) in files {
            assert_eq!(&text(l, "main", path), content);
        }
        assert!(j.segments().unwrap().is_empty(), "uploaded, not set aside");
        assert!(!dir.join("journal/orphaned").exists());
    }

    /// A draft step of file `id`.
    fn step(j: &Journal, id: u64, step: DraftStep) {
        j.draft(&DraftRecord { id, step }).unwrap();
    }

    /// The first step of a draft: an empty file at `path` on main.
    fn begin(j: &Journal, id: u64, path: &str, spool: Option<&str>) {
        let step = DraftStep::State(DraftState {
            repo: "r".into(),
            branch: "main".into(),
            path: path.into(),
            mode: 0o600,
            mtime: 1,
            size: 0,
            bytes: bytes::Bytes::new(),
            spool: spool.map(String::from),
        });
        self::step(j, id, step);
    }

    fn write(j: &Journal, id: u64, offset: u64, data: &str, mode: u32) {
        let step = DraftStep::Write {
            offset,
            len: data.len() as u64,
            bytes: bytes::Bytes::copy_from_slice(data.as_bytes()),
            mode,
            mtime: 2,
        };
        self::step(j, id, step);
    }

    fn mode_of(l: &Lake, path: &str) -> u32 {
        let (_, work) = l.working_tree("r", "main").unwrap();
        match l.trees().lookup(&work, path).unwrap() {
            Some(Entry::File(f)) => f.mode,
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn drafts_a_killed_daemon_left_open_are_made_again_and_staged() {
        let l = lake();
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path()).unwrap();
            // Written, truncated, chmod-ed and renamed; never released.
            begin(&j, 1, "a", None);
            write(&j, 1, 0, "hello world", 0o600);
            put(&l, &j, "main", "other", "x");
            step(&j, 1, DraftStep::Size { size: 5, mtime: 3 });
            write(&j, 1, 7, "!", 0o600);
            step(
                &j,
                1,
                DraftStep::Attr {
                    mode: 0o640,
                    mtime: 4,
                },
            );
            step(&j, 1, DraftStep::Path("b".into()));
            // Released (staged by its close): nothing to make again.
            begin(&j, 2, "c", None);
            write(&j, 2, 0, "staged", 0o644);
            step(&j, 2, DraftStep::Done);
            // Its bytes in a spool file, past a sparse tail.
            std::fs::write(j.drafts_dir().join("spool-1"), "spooled").unwrap();
            begin(&j, 3, "d", Some("spool-1"));
            write(&j, 3, 0, "", 0o644);
            step(&j, 3, DraftStep::Size { size: 9, mtime: 5 });
            // Removed while open.
            begin(&j, 4, "e", None);
            step(&j, 4, DraftStep::Done);
            assert_eq!(j.pinned_from(), 1, "open drafts keep their segment");
        }
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.pending.lock().total, 1, "steps are not uploads");
        assert_eq!(j.recover_drafts(l.config().chunking).unwrap(), 2);
        assert_eq!(j.pinned_from(), u64::MAX, "all ended");
        assert_eq!(std::fs::read_dir(j.drafts_dir()).unwrap().count(), 0);
        assert_eq!(j.upload_all(&l).unwrap(), 3);
        assert_eq!(text(&l, "main", "b"), "hello\0\0!");
        assert_eq!(mode_of(&l, "b"), 0o640);
        assert_eq!(text(&l, "main", "d"), "spooled\0\0");
        assert_eq!(text(&l, "main", "other"), "x");
        let (_, work) = l.working_tree("r", "main").unwrap();
        assert_eq!(l.trees().count(&work).unwrap(), 3, "not c, a nor e");
        assert!(j.segments().unwrap().is_empty(), "uploaded, emptied");
        // Made again once: the next daemon finds nothing left.
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.recover_drafts(l.config().chunking).unwrap(), 0);
    }

    #[test]
    fn segments_an_open_draft_needs_stay_and_a_stale_one_is_asked_for_again() {
        let (l, _dir, j) = with_segments(300);
        begin(&j, 7, "open", None);
        for i in 0..20 {
            put(&l, &j, "main", &format!("f{i}"), "x");
        }
        // The uploader passes over the steps and stages the rest...
        assert_eq!(j.upload_all(&l).unwrap(), 20);
        j.wait_uploaded(Duration::from_millis(50)).unwrap();
        let segments = j.segments().unwrap();
        assert_eq!(segments[0].0, j.pinned_from(), "...keeping the draft's");
        // Its steps began long ago: the mount is asked to write it whole.
        let asked = Arc::new(Mutex::new(Vec::new()));
        let seen = asked.clone();
        j.on_stale_drafts(move |ids| seen.lock().extend(ids));
        j.tend();
        assert_eq!(*asked.lock(), vec![7]);
        begin(&j, 7, "open", None); // as the mount does
        j.upload_all(&l).unwrap();
        assert_eq!(j.segments().unwrap().len(), 1, "the older ones went");
        asked.lock().clear();
        j.tend();
        assert!(asked.lock().is_empty());
        step(&j, 7, DraftStep::Done);
        assert_eq!(j.pinned_from(), u64::MAX);
    }

    #[test]
    fn waiting_for_what_was_appended_is_not_held_up_by_what_came_after() {
        let l = lake();
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let short = Duration::from_millis(50);
        put(&l, &j, "main", "a", "1");
        let mark = j.mark();
        assert!(j.wait_uploaded_to(mark, short).is_err(), "not uploaded yet");
        j.upload_all(&l).unwrap();
        // A close after the mark (another branch's, or the same one's).
        put(&l, &j, "main", "b", "2");
        j.wait_uploaded_to(mark, short).unwrap();
        assert!(j.wait_drained(short).is_err(), "b is still to upload");
        assert!(j.wait_uploaded(short).is_err(), "b is before a new mark");
        j.upload_all(&l).unwrap();
        j.wait_uploaded(short).unwrap();
        j.wait_drained(short).unwrap();
        assert_eq!(text(&l, "main", "b"), "2");
    }

    #[test]
    fn a_group_being_staged_when_the_daemon_died_is_staged_again_whole() {
        let l = lake();
        let dir = tempfile::tempdir().unwrap();
        let (seg, first_end) = {
            let j = Journal::open(dir.path()).unwrap();
            put(&l, &j, "main", "a", "1");
            let (seg, first_end) = j.mark();
            put(&l, &j, "main", "b", "2");
            assert_eq!(j.mark().0, seg, "one segment");
            (seg, first_end)
        };
        // The daemon died while staging a group of the first record alone
        // (the second came later): that group is staged again as it was,
        // not regrouped with the second under the second's id.
        std::fs::write(
            dir.path().join("journal/upload.pos"),
            format!("{seg} 0 {first_end}\n"),
        )
        .unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.pending.lock().total, 2);
        assert_eq!(j.upload_all(&l).unwrap(), 2);
        assert_eq!(l.store().list("repos/r/staging").unwrap().len(), 2);
        assert_eq!(text(&l, "main", "a"), "1");
        assert_eq!(text(&l, "main", "b"), "2");
        assert!(j.segments().unwrap().is_empty(), "uploaded, emptied");
    }

    #[test]
    fn closes_appending_while_segments_turn_over_are_all_uploaded() {
        // Small segments: many are closed while the uploader is in them.
        let (l, _dir, j) = with_segments(600);
        let l = Arc::new(l);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let uploader = {
            let (j, l, stop) = (j.clone(), l.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    j.upload_all(&l).unwrap();
                }
            })
        };
        for i in 0..2000 {
            put(&l, &j, "main", &format!("f{i}"), &i.to_string());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        uploader.join().unwrap();
        j.upload_all(&l).unwrap();
        assert_eq!(j.pending.lock().total, 0, "every close uploaded");
        let (_, work) = l.working_tree("r", "main").unwrap();
        assert_eq!(l.trees().count(&work).unwrap(), 2000);
        assert_eq!(text(&l, "main", "f1999"), "1999");
    }

    #[test]
    fn records_are_checked_by_crc32c_and_older_blake3_records_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let entry = |path: &str| JournalEntry {
            repo: "r".into(),
            branch: "main".into(),
            batch: "b".into(),
            ops: vec![Op::Delete { path: path.into() }],
        };
        let record = |e: &JournalEntry, check: fn(&[u8]) -> Vec<u8>| {
            let payload = postcard::to_allocvec(e).unwrap();
            let mut r = (payload.len() as u32).to_le_bytes().to_vec();
            r.extend(check(&payload));
            r.extend(&payload);
            r
        };
        // CRC-32C/ISCSI's check value.
        assert_eq!(
            record_check(b"123456789")[..4],
            0xe306_9283u32.to_le_bytes()
        );
        let seg = dir.path().join("seg");
        let mut bytes = record(&entry("old"), |p| Hash::of(p).0[..8].to_vec());
        bytes.extend(record(&entry("new"), |p| record_check(p).to_vec()));
        let mut garbled = record(&entry("bad"), |p| record_check(p).to_vec());
        let last = garbled.len() - 1;
        garbled[last] ^= 1;
        bytes.extend(garbled);
        std::fs::write(&seg, &bytes).unwrap();
        let (records, stopped) = read_records(&seg, 0, None, false).unwrap();
        let paths: Vec<_> = records
            .iter()
            .map(|r| match &r.entry().unwrap().ops[0] {
                Op::Delete { path } => path.as_str(),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(paths, ["old", "new"]);
        assert!(stopped, "the garbled record ends what is read");
    }

    #[test]
    fn a_torn_last_record_is_not_an_entry() {
        let l = lake();
        let dir = tempfile::tempdir().unwrap();
        let seg = {
            let j = Journal::open(dir.path()).unwrap();
            put(&l, &j, "main", "a", "1");
            put(&l, &j, "main", "b", "2");
            j.mark().0
        };
        // The daemon died in the middle of writing a third record.
        let seg = dir.path().join(format!("journal/log/{seg:020}"));
        let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3]).unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.pending.lock().total, 2);
        // New closes go to a new segment, after the old one.
        put(&l, &j, "main", "a", "3");
        assert_eq!(j.upload_all(&l).unwrap(), 3);
        assert_eq!(text(&l, "main", "a"), "3");
        assert_eq!(text(&l, "main", "b"), "2");
        // The old one is gone; the new one stays open for the next closes.
        let left: Vec<u64> = j.segments().unwrap().iter().map(|s| s.0).collect();
        assert_eq!(left, [j.mark().0]);
        assert!(!seg.exists());
    }

    #[test]
    fn a_segment_left_open_by_a_killed_daemon_is_uploaded_whole() {
        let l = lake();
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let files: Vec<_> = (0..3).map(|i| (format!("f{i}"), i.to_string())).collect();
        for (path, content) in &files {
            put(&l, &j, "main", path, content);
        }
        let (seg, end) = j.mark();
        // Killed: the segment is not closed, its allocation not cut off.
        std::mem::forget(j);
        let path = dir.path().join(format!("journal/log/{seg:020}"));
        assert!(
            std::fs::metadata(&path).unwrap().len() > end,
            "zeros follow"
        );
        reopened_uploads_all(&l, dir.path(), &files);
    }

    #[test]
    fn segments_closed_but_not_yet_cut_by_a_killed_daemon_are_uploaded_in_order() {
        let (l, dir, j) = with_segments(600);
        // Each close past 600 bytes closes its segment; no uploader tends
        // them, so each closed one still ends in zeros.
        let files: Vec<_> = (0..4)
            .map(|i| (format!("f{i}"), i.to_string().repeat(700)))
            .collect();
        for (path, content) in &files {
            put(&l, &j, "main", path, content);
        }
        let segments = j.segments().unwrap();
        assert_eq!(segments.len(), 4);
        let (records, _) = read_records(&segments[0].1, 0, None, false).unwrap();
        assert_eq!(records.len(), 1);
        assert!(
            std::fs::metadata(&segments[0].1).unwrap().len() > records[0].end,
            "zeros follow its record until the uploader cuts it"
        );
        std::mem::forget(j); // killed
        reopened_uploads_all(&l, dir.path(), &files);
    }

    #[test]
    fn a_segment_made_ahead_is_used_and_one_left_over_is_removed() {
        let (l, dir, j) = with_segments(600);
        let spare = j.spare_path();
        put(&l, &j, "main", "a", &"1".repeat(700));
        assert!(j.spare.lock().ready.is_none(), "made by the uploader");
        j.tend();
        assert!(j.spare.lock().ready.is_some(), "a segment is made ahead");
        use std::os::unix::fs::MetadataExt;
        let made = std::fs::metadata(&spare).unwrap().ino();
        put(&l, &j, "main", "b", "2"); // past 600 bytes: the next segment
        let segments = j.segments().unwrap();
        assert_eq!(segments.len(), 2);
        let second = std::fs::metadata(&segments[1].1).unwrap().ino();
        assert_eq!(second, made, "the segment made ahead, numbered");
        // The closed one is let go of (cut to its records) by the uploader.
        let first = &segments[0].1;
        j.tend();
        let (records, _) = read_records(first, 0, None, false).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(std::fs::metadata(first).unwrap().len(), records[0].end);
        assert_eq!(j.upload_all(&l).unwrap(), 2);
        assert_eq!(text(&l, "main", "b"), "2");
        j.tend();
        assert!(j.spare.lock().ready.is_some(), "another is made ahead");
        drop(j);
        assert!(spare.exists(), "never used");
        let j = Journal::open(dir.path()).unwrap();
        assert!(!spare.exists(), "removed by the next daemon");
        assert_eq!(j.pending.lock().total, 0);
    }

    #[test]
    fn a_segment_that_cannot_be_mapped_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        let entry = |path: &str| JournalEntry {
            repo: "r".into(),
            branch: "main".into(),
            batch: "b".into(),
            ops: vec![Op::Delete { path: path.into() }],
        };
        let record = |e: &JournalEntry| record_in(None, e, Vec::new());
        let mut s = Segment {
            seq: 0,
            file: std::fs::File::create(&path).unwrap(),
            size: 0,
            map: None,
        };
        assert!(s.has_room(1 << 30));
        s.append(&record(&entry("a"))).unwrap();
        s.append(&record(&entry("b"))).unwrap();
        let size = s.size;
        let (records, damaged) = read_records(&path, 0, Some(size), false).unwrap();
        assert_eq!((records.len(), damaged), (2, false));
        assert_eq!(records[1].end, size);
        drop(s);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
    }

    #[test]
    fn segments_are_mapped_only_where_the_file_system_writes_in_place() {
        const BTRFS: i64 = 0x9123_683E;
        const ZFS: i64 = 0x2FC1_2FC1;
        assert!(writes_in_place(0xEF53) && writes_in_place(0x5846_5342));
        assert!(!writes_in_place(BTRFS) && !writes_in_place(ZFS));
        let dir = tempfile::tempdir().unwrap();
        let s = Segment::create(&dir.path().join("seg"), 0, 1 << 20).unwrap();
        let f_type = file_system_type(&s.file).expect("statfs of a temp file");
        assert_eq!(s.map.is_some(), writes_in_place(f_type));
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
