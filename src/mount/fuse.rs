//! The FUSE adapter: translates requests into calls on the filesystem core
//! and results into replies. No logic lives here. `FuseAdapter` holds what
//! both transports share (permission checks at open, passthrough backing
//! files, directory offsets); `Classic` serves it through fuser's
//! `/dev/fuse` loop, `super::uring` through per-CPU io_uring queues.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, Request,
};
use parking_lot::Mutex;

use super::fs::{Attr, FsError, IfExists, Kind, LakeFs, PageCache, SetAttr};

/// Largest write the kernel sends in one request, and so the payload
/// buffer of each io_uring entry (the kernel caps requests at 256 pages).
pub const MAX_WRITE: u32 = 1 << 20;

pub struct FuseAdapter {
    pub fs: LakeFs,
    /// Did the kernel accept FUSE passthrough (root, recent kernel)?
    passthrough: AtomicBool,
    /// Did the kernel accept FUSE over io_uring for this connection?
    pub io_uring: AtomicBool,
    /// Ask for io_uring at INIT (the module allows it, and the mount was
    /// not told `--no-io-uring`).
    want_io_uring: bool,
    /// The connection's `/dev/fuse`, for registering backing files.
    pub dev: OnceLock<OwnedFd>,
    /// Backing files registered with the kernel, per inode (the kernel
    /// wants one id per inode while any handle on it is open): id and open
    /// count.
    backing: Mutex<HashMap<u64, (u32, usize)>>,
    /// Which inode each passthrough handle belongs to.
    backed_handles: Mutex<HashMap<u64, u64>>,
    /// Mounted without `default_permissions`: opens and truncates are
    /// checked here (`LakeFs::check_access`), not by the kernel.
    check_permissions: bool,
}

/// An opened file: its handle, `FOPEN_*` flags and passthrough backing id.
pub struct Opened {
    pub fh: u64,
    pub flags: FopenFlags,
    pub backing_id: Option<u32>,
}

/// The attributes a SETATTR asks to change, as the transports decode them.
pub struct SetAttrIn {
    pub mode: Option<u32>,
    pub owner_changed: bool,
    pub size: Option<u64>,
    pub mtime: Option<SystemTime>,
    pub fh: Option<u64>,
}

/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, uint32_t)`.
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = 0x4004_e502;

impl FuseAdapter {
    pub fn new(fs: LakeFs, check_permissions: bool, want_io_uring: bool) -> FuseAdapter {
        FuseAdapter {
            fs,
            check_permissions,
            want_io_uring,
            passthrough: AtomicBool::new(false),
            io_uring: AtomicBool::new(false),
            dev: OnceLock::new(),
            backing: Mutex::new(HashMap::new()),
            backed_handles: Mutex::new(HashMap::new()),
        }
    }

    /// What the daemon asks of the kernel at INIT.
    fn init(&self, config: &mut KernelConfig) {
        // (Read-ahead: the kernel offers 128 KiB here and takes no more;
        // `mount::raise_readahead` raises it through sysfs.)
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        // Directory listings carry each entry's attributes, so walking a
        // tree (find, ls -l, tar, cp -r) needs no LOOKUP per entry. Always,
        // not the kernel's "auto" mode: a walker reads whole directories
        // before it opens anything in them.
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS);
        // The core clears set-user-ID on chown, truncate and write (see
        // `SetAttr::kill_suid`), so the kernel need not fetch attributes
        // before each chown to do it (tar chowns every file it extracts).
        let _ = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV);
        let _ = config.set_max_write(MAX_WRITE);
        // Passthrough lets the kernel read verified cache files directly.
        let passthrough = std::env::var_os("TARN_NO_PASSTHROUGH").is_none()
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(2).is_ok();
        self.passthrough.store(passthrough, Ordering::Relaxed);
        let io_uring = self.want_io_uring
            && config
                .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                .is_ok();
        self.io_uring.store(io_uring, Ordering::Relaxed);
        tracing::info!(passthrough, io_uring, "FUSE session initialised");
    }

    /// open(2) of an existing file: the permission check this mount makes
    /// itself, the core's open, and a passthrough backing file for it.
    pub fn open(&self, uid: u32, gid: u32, ino: u64, flags: i32) -> Result<Opened, FsError> {
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let truncate = flags & libc::O_TRUNC != 0;
        if self.check_permissions {
            let mask = match flags & libc::O_ACCMODE {
                libc::O_RDONLY => libc::R_OK,
                libc::O_WRONLY => libc::W_OK,
                _ => libc::R_OK | libc::W_OK,
            };
            self.fs.check_access(ino, uid, gid, mask as u32)?;
        }
        let (fh, cache, backing) = self.fs.open_with_backing(ino, write, truncate)?;
        if let (Some(file), true) = (backing, self.passthrough.load(Ordering::Relaxed)) {
            if let Some(id) = self.backing_id(ino, fh, file) {
                return Ok(Opened {
                    fh,
                    flags: FopenFlags::FOPEN_NOFLUSH,
                    backing_id: Some(id),
                });
            }
        }
        // Snapshot handles are read-only: closing one needs no FLUSH.
        let flags = match cache {
            PageCache::Keep => FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
            // Without KEEP_CACHE the kernel drops the inode's pages at open.
            PageCache::Refresh => FopenFlags::FOPEN_NOFLUSH,
            PageCache::Bypass => FopenFlags::FOPEN_DIRECT_IO,
        };
        Ok(Opened {
            fh,
            flags,
            backing_id: None,
        })
    }

    /// Register (or reuse) the backing file of an inode for passthrough.
    fn backing_id(&self, ino: u64, fh: u64, file: std::fs::File) -> Option<u32> {
        let dev = self.dev.get()?;
        let mut backing = self.backing.lock();
        let id = match backing.get_mut(&ino) {
            Some((id, n)) => {
                *n += 1;
                *id
            }
            None => match BackingId::create_raw(dev, &file) {
                Ok(id) => {
                    backing.insert(ino, (id, 1));
                    id
                }
                Err(e) => {
                    tracing::debug!(%e, "passthrough unavailable; the daemon serves reads");
                    return None;
                }
            },
        };
        self.backed_handles.lock().insert(fh, ino);
        Some(id)
    }

    /// close(2) of a handle: its backing file goes with its inode's last.
    pub fn release(&self, fh: u64) -> Result<(), FsError> {
        if let Some(ino) = self.backed_handles.lock().remove(&fh) {
            let mut backing = self.backing.lock();
            if let Some((id, n)) = backing.get_mut(&ino) {
                *n -= 1;
                if *n == 0 {
                    let id = *id;
                    backing.remove(&ino);
                    if let Some(dev) = self.dev.get() {
                        // SAFETY: the ioctl reads one u32 from a live local.
                        unsafe {
                            libc::ioctl(dev.as_raw_fd(), FUSE_DEV_IOC_BACKING_CLOSE, &id);
                        }
                    }
                }
            }
        }
        self.fs.release(fh)
    }

    pub fn write(&self, uid: u32, fh: u64, offset: u64, data: &[u8]) -> Result<usize, FsError> {
        if uid != 0 {
            self.fs.kill_suid(fh);
        }
        self.fs.write(fh, offset, data)
    }

    pub fn setattr(&self, uid: u32, gid: u32, ino: u64, a: SetAttrIn) -> Result<Attr, FsError> {
        if self.check_permissions && a.size.is_some() && a.fh.is_none() {
            // truncate(2) needs write permission; ftruncate, a handle open
            // for writing (checked at its open).
            self.fs.check_access(ino, uid, gid, libc::W_OK as u32)?;
        }
        let set = SetAttr {
            mode: a.mode,
            size: a.size,
            mtime: a.mtime,
            kill_suid: a.owner_changed || (a.size.is_some() && uid != 0),
        };
        self.fs.setattr(ino, a.fh, set)
    }

    pub fn create(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Result<(Attr, Opened), FsError> {
        let if_exists = if flags & libc::O_EXCL != 0 {
            IfExists::Fail
        } else if flags & libc::O_TRUNC != 0 {
            IfExists::Truncate
        } else {
            IfExists::Keep
        };
        let (attr, fh) = self
            .fs
            .create(parent, name_str(name)?, mode & !umask, if_exists)?;
        // A new file is written through the spool, never the page cache.
        let mut flags = FopenFlags::FOPEN_DIRECT_IO;
        if self.fs.is_draft(fh) {
            // Each change is journaled as it comes: a close has nothing
            // left to do, so it need not wait for a FLUSH.
            flags |= FopenFlags::FOPEN_NOFLUSH;
        }
        let opened = Opened {
            fh,
            flags,
            backing_id: None,
        };
        Ok((attr, opened))
    }

    pub fn mknod(&self, parent: u64, name: &[u8], mode: u32, umask: u32) -> Result<Attr, FsError> {
        if mode & libc::S_IFMT != libc::S_IFREG {
            // Devices, fifos and sockets cannot be versioned.
            return Err(FsError::NotPermitted("only regular files can be made"));
        }
        let (a, fh) = self
            .fs
            .create(parent, name_str(name)?, mode & !umask, IfExists::Fail)?;
        self.fs.flush(fh)?;
        self.fs.release(fh)?;
        Ok(a)
    }

    pub fn symlink(&self, parent: u64, name: &[u8], target: &[u8]) -> Result<Attr, FsError> {
        let target = std::str::from_utf8(target)
            .map_err(|_| FsError::Invalid("symlink target is not UTF-8"))?;
        self.fs.symlink(parent, name_str(name)?, target)
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> Result<(), FsError> {
        if flags & !libc::RENAME_NOREPLACE != 0 {
            // RENAME_EXCHANGE and RENAME_WHITEOUT have no staged-op form.
            return Err(FsError::Invalid("rename flags other than RENAME_NOREPLACE"));
        }
        self.fs.rename(
            parent,
            name_str(name)?,
            newparent,
            name_str(newname)?,
            flags & libc::RENAME_NOREPLACE != 0,
        )
    }

    /// A directory listing from `offset`: 1 after ".", 2 after "..", then
    /// 2 + n after the n-th entry. `add` gets each entry's inode, the
    /// offset after it, its kind, name and (for READDIRPLUS) attributes, and
    /// returns true once the reply is full.
    pub fn list_dir(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        plus: bool,
        mut add: impl FnMut(u64, u64, Kind, &str, Option<&Attr>) -> bool,
    ) -> Result<(), FsError> {
        // The kernel links no entry for "." and "..", so their attributes
        // are only placeholders.
        let dot = |ino: u64| Attr {
            ino,
            kind: Kind::Dir,
            size: 0,
            perm: 0o755,
            nlink: 2,
            mtime: std::time::UNIX_EPOCH,
            uid: 0,
            gid: 0,
            ttl: Duration::ZERO,
        };
        let mut off = offset;
        if off == 0 {
            if add(ino, 1, Kind::Dir, ".", plus.then(|| dot(ino)).as_ref()) {
                return Ok(());
            }
            off = 1;
        }
        if off == 1 {
            if add(1, 2, Kind::Dir, "..", plus.then(|| dot(1)).as_ref()) {
                return Ok(());
            }
            off = 2;
        }
        let skip = (off - 2) as usize;
        if plus {
            self.fs.readdirplus(fh, skip, |next, name, a| {
                add(a.ino, next as u64 + 2, a.kind, name, Some(a))
            })
        } else {
            self.fs.readdir(fh, skip, |ino, next, kind, name| {
                add(ino, next as u64 + 2, kind, name, None)
            })
        }
    }

    pub fn access(&self, uid: u32, gid: u32, ino: u64, mask: u32) -> Result<(), FsError> {
        self.fs.check_access(ino, uid, gid, mask)
    }
}

pub fn errno(e: &FsError) -> i32 {
    if e.errno() == libc::EIO {
        tracing::warn!(error = %e, "I/O error");
    }
    e.errno()
}

fn fuser_errno(e: &FsError) -> Errno {
    Errno::from_i32(errno(e))
}

pub fn name_str(name: &[u8]) -> Result<&str, FsError> {
    std::str::from_utf8(name).map_err(|_| FsError::Invalid("file name is not UTF-8"))
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks(),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: Attr::BLOCK_SIZE,
        flags: 0,
    }
}

fn reply_entry(reply: ReplyEntry, res: Result<Attr, FsError>) {
    match res {
        Ok(a) => reply.entry(&a.ttl, &file_attr(&a), Generation(0)),
        Err(e) => reply.error(fuser_errno(&e)),
    }
}

fn reply_empty(reply: ReplyEmpty, res: Result<(), FsError>) {
    match res {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(fuser_errno(&e)),
    }
}

fn reply_attr(reply: ReplyAttr, res: Result<Attr, FsError>) {
    match res {
        Ok(a) => reply.attr(&a.ttl, &file_attr(&a)),
        Err(e) => reply.error(fuser_errno(&e)),
    }
}

fn time(t: fuser::TimeOrNow) -> SystemTime {
    match t {
        fuser::TimeOrNow::SpecificTime(t) => t,
        fuser::TimeOrNow::Now => SystemTime::now(),
    }
}

/// The adapter served by fuser's `/dev/fuse` loop: INIT, FORGET and
/// INTERRUPT always, everything else until io_uring queues take over.
pub struct Classic(pub Arc<FuseAdapter>);

impl Filesystem for Classic {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        self.0.init(config);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _span = tracing::debug_span!("lookup", parent = parent.0, ?name).entered();
        reply_entry(
            reply,
            name_str(name.as_bytes()).and_then(|name| self.0.fs.lookup(parent.0, name)),
        );
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.0.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _span = tracing::debug_span!("getattr", ino = ino.0).entered();
        reply_attr(reply, self.0.fs.getattr(ino.0));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.0.fs.readlink(ino.0) {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(fuser_errno(&e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _span = tracing::debug_span!("open", ino = ino.0).entered();
        match self.0.open(req.uid(), req.gid(), ino.0, flags.0) {
            Ok(Opened {
                fh,
                flags,
                backing_id: Some(id),
            }) => {
                // The adapter owns the id (closed with the inode's last
                // handle), not this wrapper.
                // SAFETY: the id was registered on this connection and
                // stays open while the handle is (see `release`).
                let backing = unsafe { reply.wrap_backing(id) };
                reply.opened_passthrough(FileHandle(fh), flags, &backing);
                backing.into_raw();
            }
            Ok(o) => reply.opened(FileHandle(o.fh), o.flags),
            Err(e) => reply.error(fuser_errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _span = tracing::debug_span!("read", ino = ino.0, fh = fh.0, offset, size).entered();
        match self.0.fs.read(fh.0, offset, size as usize) {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(fuser_errno(&e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.0.release(fh.0));
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: fuser::ReplyWrite,
    ) {
        let _span = tracing::debug_span!("write", ino = ino.0, fh = fh.0, offset, len = data.len())
            .entered();
        match self.0.write(req.uid(), fh.0, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(fuser_errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _span = tracing::debug_span!("flush", ino = ino.0, fh = fh.0).entered();
        reply_empty(reply, self.0.fs.flush(fh.0));
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _span = tracing::debug_span!("fsync", ino = ino.0, fh = fh.0).entered();
        reply_empty(reply, self.0.fs.fsync(fh.0));
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _span = tracing::debug_span!("setattr", ino = ino.0, ?mode, ?size).entered();
        let set = SetAttrIn {
            mode,
            owner_changed: uid.is_some() || gid.is_some(),
            size,
            mtime: mtime.map(time),
            fh: fh.map(|f| f.0),
        };
        reply_attr(reply, self.0.setattr(req.uid(), req.gid(), ino.0, set));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _span = tracing::debug_span!("opendir", ino = ino.0).entered();
        match self.0.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(fuser_errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let res = self
            .0
            .list_dir(ino.0, fh.0, offset, false, |ino, next, kind, name, _| {
                reply.add(INodeNo(ino), next, file_type(kind), name)
            });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fuser_errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        let res = self
            .0
            .list_dir(ino.0, fh.0, offset, true, |ino, next, _, name, a| {
                let a = a.expect("READDIRPLUS lists attributes");
                reply.add(
                    INodeNo(ino),
                    next,
                    name,
                    &a.ttl,
                    &file_attr(a),
                    Generation(0),
                )
            });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fuser_errno(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _ = self.0.fs.release(fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let st = self.0.fs.statfs();
        let bsize = Attr::BLOCK_SIZE;
        reply.statfs(
            st.blocks,
            st.blocks,
            st.blocks,
            st.files,
            st.files,
            bsize,
            st.name_max,
            bsize,
        );
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        let _span = tracing::debug_span!("create", parent = parent.0, ?name).entered();
        match self.0.create(parent.0, name.as_bytes(), mode, umask, flags) {
            Ok((a, o)) => reply.created(
                &a.ttl,
                &file_attr(&a),
                Generation(0),
                FileHandle(o.fh),
                o.flags,
            ),
            Err(e) => reply.error(fuser_errno(&e)),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply_entry(reply, self.0.mknod(parent.0, name.as_bytes(), mode, umask));
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let _span = tracing::debug_span!("mkdir", parent = parent.0, ?name).entered();
        reply_entry(
            reply,
            name_str(name.as_bytes()).and_then(|name| self.0.fs.mkdir(parent.0, name)),
        );
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply_entry(
            reply,
            self.0.symlink(
                parent.0,
                link_name.as_bytes(),
                target.as_os_str().as_bytes(),
            ),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _span = tracing::debug_span!("unlink", parent = parent.0, ?name).entered();
        reply_empty(
            reply,
            name_str(name.as_bytes()).and_then(|name| self.0.fs.unlink(parent.0, name)),
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(
            reply,
            name_str(name.as_bytes()).and_then(|name| self.0.fs.rmdir(parent.0, name)),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _span = tracing::debug_span!(
            "rename",
            parent = parent.0,
            ?name,
            newparent = newparent.0,
            ?newname
        )
        .entered();
        reply_empty(
            reply,
            self.0.rename(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                flags.bits(),
            ),
        );
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        // A versioned tree has no hard links.
        reply.error(Errno::from_i32(libc::EPERM));
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply_empty(
            reply,
            self.0
                .access(req.uid(), req.gid(), ino.0, mask.bits() as u32),
        );
    }
}
