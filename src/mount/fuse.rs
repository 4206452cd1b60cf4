//! The fuser adapter: every callback translates arguments, calls the
//! filesystem core, and turns the result into a reply. No logic lives here.

use std::ffi::OsStr;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, Request,
};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fuser::BackingId;
use parking_lot::Mutex;

use super::fs::{Attr, FsError, Kind, LakeFs, PageCache, SetAttr};

pub struct FuseAdapter {
    pub fs: LakeFs,
    /// Did the kernel accept FUSE passthrough (root, recent kernel)?
    pub passthrough: AtomicBool,
    /// Backing files registered with the kernel, per inode (the kernel wants
    /// one id per inode while any handle on it is open), with open counts.
    pub backing: Mutex<HashMap<u64, (Arc<BackingId>, usize)>>,
    /// Which inode each passthrough handle belongs to.
    pub backed_handles: Mutex<HashMap<u64, u64>>,
    /// Mounted without `default_permissions`: opens and truncates are
    /// checked here (`LakeFs::check_access`), not by the kernel.
    pub check_permissions: bool,
}

impl FuseAdapter {
    pub fn new(fs: LakeFs, check_permissions: bool) -> FuseAdapter {
        FuseAdapter {
            fs,
            check_permissions,
            passthrough: AtomicBool::new(false),
            backing: Mutex::new(HashMap::new()),
            backed_handles: Mutex::new(HashMap::new()),
        }
    }

    /// Register (or reuse) the backing file of an inode for passthrough.
    fn backing_id(
        &self,
        ino: u64,
        fh: u64,
        file: std::fs::File,
        reply: &ReplyOpen,
    ) -> Option<Arc<BackingId>> {
        let mut backing = self.backing.lock();
        let id = match backing.get_mut(&ino) {
            Some((id, n)) => {
                *n += 1;
                id.clone()
            }
            None => match reply.open_backing(file) {
                Ok(id) => {
                    let id = Arc::new(id);
                    backing.insert(ino, (id.clone(), 1));
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

    fn release_backing(&self, fh: u64) {
        let Some(ino) = self.backed_handles.lock().remove(&fh) else {
            return;
        };
        let mut backing = self.backing.lock();
        if let Some((_, n)) = backing.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                backing.remove(&ino);
            }
        }
    }
}

fn errno(e: &FsError) -> Errno {
    if e.errno() == libc::EIO {
        tracing::warn!(error = %e, "I/O error");
    }
    Errno::from_i32(e.errno())
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
        blksize: 4096,
        flags: 0,
    }
}

fn name_str(name: &OsStr) -> Result<&str, FsError> {
    name.to_str()
        .ok_or(FsError::Invalid("file name is not UTF-8"))
}

fn reply_entry(reply: ReplyEntry, res: Result<Attr, FsError>) {
    match res {
        Ok(a) => reply.entry(&a.ttl, &file_attr(&a), Generation(0)),
        Err(e) => reply.error(errno(&e)),
    }
}

fn reply_empty(reply: ReplyEmpty, res: Result<(), FsError>) {
    match res {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
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
        // Passthrough lets the kernel read verified cache files directly.
        let passthrough = std::env::var_os("TARN_NO_PASSTHROUGH").is_none()
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(2).is_ok();
        self.passthrough.store(passthrough, Ordering::Relaxed);
        tracing::info!(passthrough, "FUSE session initialised");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _span = tracing::debug_span!("lookup", parent = parent.0, ?name).entered();
        reply_entry(
            reply,
            name_str(name).and_then(|name| self.fs.lookup(parent.0, name)),
        );
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _span = tracing::debug_span!("getattr", ino = ino.0).entered();
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&a.ttl, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _span = tracing::debug_span!("open", ino = ino.0).entered();
        let write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        let truncate = flags.0 & libc::O_TRUNC != 0;
        if self.check_permissions {
            let mask = match flags.0 & libc::O_ACCMODE {
                libc::O_RDONLY => libc::R_OK,
                libc::O_WRONLY => libc::W_OK,
                _ => libc::R_OK | libc::W_OK,
            };
            if let Err(e) = self
                .fs
                .check_access(ino.0, req.uid(), req.gid(), mask as u32)
            {
                return reply.error(errno(&e));
            }
        }
        match self.fs.open_with_backing(ino.0, write, truncate) {
            Ok((fh, cache, backing)) => {
                // Snapshot handles are read-only: closing one needs no FLUSH.
                let flags = match cache {
                    PageCache::Keep => FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
                    PageCache::Bypass => FopenFlags::FOPEN_DIRECT_IO,
                };
                if let (Some(file), true) = (backing, self.passthrough.load(Ordering::Relaxed)) {
                    if let Some(id) = self.backing_id(ino.0, fh, file, &reply) {
                        return reply.opened_passthrough(
                            FileHandle(fh),
                            FopenFlags::FOPEN_NOFLUSH,
                            &id,
                        );
                    }
                }
                reply.opened(FileHandle(fh), flags)
            }
            Err(e) => reply.error(errno(&e)),
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
        match self.fs.read(fh.0, offset, size as usize) {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(errno(&e)),
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
        self.release_backing(fh.0);
        reply_empty(reply, self.fs.release(fh.0));
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
        if req.uid() != 0 {
            self.fs.kill_suid(fh.0);
        }
        match self.fs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e)),
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
        reply_empty(reply, self.fs.flush(fh.0));
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
        reply_empty(reply, self.fs.fsync(fh.0));
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
        _ctime: Option<std::time::SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _span = tracing::debug_span!("setattr", ino = ino.0, ?mode, ?size).entered();
        if self.check_permissions && size.is_some() && fh.is_none() {
            // truncate(2) needs write permission; ftruncate, a handle open
            // for writing (checked at its open).
            if let Err(e) = self
                .fs
                .check_access(ino.0, req.uid(), req.gid(), libc::W_OK as u32)
            {
                return reply.error(errno(&e));
            }
        }
        let set = SetAttr {
            mode,
            size,
            mtime: mtime.map(|t| match t {
                fuser::TimeOrNow::SpecificTime(t) => t,
                fuser::TimeOrNow::Now => std::time::SystemTime::now(),
            }),
            kill_suid: uid.is_some() || gid.is_some() || (size.is_some() && req.uid() != 0),
        };
        match self.fs.setattr(ino.0, fh.map(|f| f.0), set) {
            Ok(a) => reply.attr(&a.ttl, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _span = tracing::debug_span!("opendir", ino = ino.0).entered();
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
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
        // Offsets: 1 after ".", 2 after "..", then 2 + n after the n-th entry.
        let mut off = offset;
        if off == 0 {
            if reply.add(ino, 1, FileType::Directory, ".") {
                return reply.ok();
            }
            off = 1;
        }
        if off == 1 {
            if reply.add(INodeNo(1), 2, FileType::Directory, "..") {
                return reply.ok();
            }
            off = 2;
        }
        let res = self
            .fs
            .readdir(fh.0, (off - 2) as usize, |ino, next, kind, name| {
                reply.add(INodeNo(ino), next as u64 + 2, file_type(kind), name)
            });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
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
        // Offsets as in `readdir`. The kernel links no entry for "." and
        // "..", so their attributes are only placeholders.
        let dot = |ino: u64| {
            file_attr(&Attr {
                ino,
                kind: Kind::Dir,
                size: 0,
                perm: 0o755,
                nlink: 2,
                mtime: std::time::UNIX_EPOCH,
                uid: 0,
                gid: 0,
                ttl: std::time::Duration::ZERO,
            })
        };
        let mut off = offset;
        let zero = std::time::Duration::ZERO;
        if off == 0 {
            if reply.add(ino, 1, ".", &zero, &dot(ino.0), Generation(0)) {
                return reply.ok();
            }
            off = 1;
        }
        if off == 1 {
            if reply.add(INodeNo(1), 2, "..", &zero, &dot(1), Generation(0)) {
                return reply.ok();
            }
            off = 2;
        }
        let res = self
            .fs
            .readdirplus(fh.0, (off - 2) as usize, |next, name, a| {
                reply.add(
                    INodeNo(a.ino),
                    next as u64 + 2,
                    name,
                    &a.ttl,
                    &file_attr(a),
                    Generation(0),
                )
            });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
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
        let _ = self.fs.release(fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (blocks, files) = self.fs.statfs();
        reply.statfs(blocks, blocks, blocks, files, files, 4096, 255, 4096);
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
        let name = match name_str(name) {
            Ok(n) => n,
            Err(e) => return reply.error(errno(&e)),
        };
        match self
            .fs
            .create(parent.0, name, mode & !umask, flags & libc::O_EXCL != 0)
        {
            Ok((a, fh)) => reply.created(
                &a.ttl,
                &file_attr(&a),
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(errno(&e)),
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
        if mode & libc::S_IFMT != libc::S_IFREG {
            // Devices, fifos and sockets cannot be versioned.
            return reply.error(Errno::from_i32(libc::EPERM));
        }
        let name = match name_str(name) {
            Ok(n) => n,
            Err(e) => return reply.error(errno(&e)),
        };
        let res = self
            .fs
            .create(parent.0, name, mode & !umask, true)
            .and_then(|(a, fh)| {
                self.fs.flush(fh)?;
                self.fs.release(fh)?;
                Ok(a)
            });
        reply_entry(reply, res);
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
            name_str(name).and_then(|name| self.fs.mkdir(parent.0, name)),
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
        let name = match name_str(link_name) {
            Ok(n) => n,
            Err(e) => return reply.error(errno(&e)),
        };
        let Some(target) = target.to_str() else {
            return reply.error(Errno::from_i32(libc::EINVAL));
        };
        reply_entry(reply, self.fs.symlink(parent.0, name, target));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _span = tracing::debug_span!("unlink", parent = parent.0, ?name).entered();
        reply_empty(
            reply,
            name_str(name).and_then(|name| self.fs.unlink(parent.0, name)),
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(
            reply,
            name_str(name).and_then(|name| self.fs.rmdir(parent.0, name)),
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
        let (name, newname) = match (name_str(name), name_str(newname)) {
            (Ok(a), Ok(b)) => (a, b),
            _ => return reply.error(Errno::from_i32(libc::EINVAL)),
        };
        let bits = flags.bits();
        if bits & !(libc::RENAME_NOREPLACE) != 0 {
            // RENAME_EXCHANGE and RENAME_WHITEOUT have no staged-op form.
            return reply.error(Errno::from_i32(libc::EINVAL));
        }
        let no_replace = bits & libc::RENAME_NOREPLACE != 0;
        reply_empty(
            reply,
            self.fs
                .rename(parent.0, name, newparent.0, newname, no_replace),
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
            self.fs
                .check_access(ino.0, req.uid(), req.gid(), mask.bits() as u32),
        );
    }
}
