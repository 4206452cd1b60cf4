//! FUSE over io_uring (Linux 6.14+, module parameter `fuse.enable_uring`):
//! the kernel keeps one request queue per CPU and puts each request on the
//! queue of the CPU its caller runs on; here a thread pinned to that CPU
//! serves the queue, so caller and server wake each other on one CPU (and,
//! in the idle scheduling class, `super::sched`, the caller woken by a reply
//! stays there).
//! Through `/dev/fuse` every request is two wakeups the scheduler puts on
//! another CPU about half the time, and on a small VM a wakeup across CPUs
//! costs ~30 µs: an untar of 20k small files took 4–5 s that way, and
//! 1.2–1.6 s through these queues.
//!
//! In the idle class, a thread looks for its caller's next request for a
//! little while (`LOOK`) before it sleeps, so a caller making one request
//! after another hands each over with no wakeup.
//!
//! Requests that may wait long (`LakeFs::may_wait`: control-file commands,
//! fsync, uploads on a synchronous close, closes of big files, reads
//! fetched from a remote store) go to helper threads, so they never hold up
//! the other callers on that CPU's queue.
//! INIT, FORGET and INTERRUPT still come through `/dev/fuse` (fuser's loop).
//!
//! The protocol (`include/uapi/linux/fuse.h`): each queue entry registers a
//! header buffer (the request's `fuse_in_header`, its per-operation header,
//! and the entry's commit id and payload size) and a payload buffer (names,
//! written data); a reply goes back in the same buffers with
//! COMMIT_AND_FETCH, which also waits for the entry's next request.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use parking_lot::Mutex;

use super::fs::{Attr, FsError, HandleOp, Kind};
use super::fuse::{errno, name_str, FuseAdapter, SetAttrIn, MAX_WRITE};
use super::sched::{QueueClass, Watchdog};
use crate::thread_class::may_leave_idle;

/// Requests one queue's thread can hold at once (the kernel hands each
/// entry one request; a caller waits while all are busy).
const ENTRIES: usize = 4;
/// Payload buffer of an entry: the largest write or read, or a directory
/// listing, the kernel sends or asks for.
const PAYLOAD: usize = MAX_WRITE as usize;
/// Completions that are not an entry's: a helper finished a request.
const WAKE: u64 = u64::MAX;

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// `struct fuse_uring_req_header`.
#[repr(C)]
struct Header {
    /// `fuse_in_header` of a request, `fuse_out_header` of its reply.
    in_out: [u8; 128],
    /// The operation's own header (`fuse_open_in`, ...), if it has one.
    op_in: [u8; 128],
    /// `struct fuse_uring_ent_in_out`.
    flags: u64,
    commit_id: u64,
    payload_sz: u32,
    padding: u32,
    reserved: u64,
}

/// One queue entry's buffers: the two registered with the kernel, and the
/// reply being built (kept, so requests reuse its allocation).
struct Bufs {
    header: Header,
    payload: Vec<u8>,
    out: Vec<u8>,
    iov: [libc::iovec; 2],
}

// SAFETY: the iovecs point into the entry's own buffers, which stay where
// they are (inside its `Arc`, and the payload's heap block); only whoever
// holds the entry's lock touches them.
unsafe impl Send for Bufs {}

type Entry = Arc<Mutex<Bufs>>;

/// A new entry, its iovecs pointing at its header and payload.
fn new_entry() -> Entry {
    let entry = Arc::new(Mutex::new(Bufs {
        header: Header {
            in_out: [0; 128],
            op_in: [0; 128],
            flags: 0,
            commit_id: 0,
            payload_sz: 0,
            padding: 0,
            reserved: 0,
        },
        payload: vec![0; PAYLOAD],
        out: Vec::new(),
        iov: [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 2],
    }));
    {
        let mut b = entry.lock();
        let b = &mut *b;
        b.iov[0] = libc::iovec {
            iov_base: (&mut b.header as *mut Header).cast(),
            iov_len: std::mem::size_of::<Header>(),
        };
        b.iov[1] = libc::iovec {
            iov_base: b.payload.as_mut_ptr().cast(),
            iov_len: b.payload.len(),
        };
    }
    entry
}

/// Serving threads of a connection's io_uring queues.
pub struct Queues {
    /// How many queue threads were started; each says when it ends.
    threads: usize,
    ended: mpsc::Receiver<()>,
}

impl Queues {
    /// Start one pinned thread per possible CPU (the kernel wants every
    /// queue registered before it uses any) and `helpers` helper threads.
    /// Until all queues are registered, and if registering fails, requests
    /// keep coming through `/dev/fuse`.
    /// `idle`: queue threads take the idle scheduling class (`QueueClass`).
    pub fn start(
        adapter: Arc<FuseAdapter>,
        dev: &OwnedFd,
        helpers: usize,
        idle: bool,
    ) -> io::Result<Queues> {
        // Only where a thread may come back from the idle class; and
        // without its watchdog the class is not safe: then none.
        let dog = (idle && may_leave_idle())
            .then(|| {
                Watchdog::start()
                    .inspect_err(|e| tracing::warn!(%e, "queue watchdog not started"))
                    .ok()
            })
            .flatten();
        let (jobs, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..helpers.max(1) {
            let rx = rx.clone();
            let adapter = adapter.clone();
            std::thread::Builder::new()
                .name(format!("tarn-uring-help-{i}"))
                .spawn(move || loop {
                    let Ok(job) = rx.lock().recv() else { return };
                    job.run(&adapter);
                })?;
        }
        let (end, ended) = mpsc::channel();
        let threads = possible_cpus();
        for qid in 0..threads {
            let dev = dev.try_clone()?;
            let adapter = adapter.clone();
            let jobs = jobs.clone();
            let end = end.clone();
            let dog = dog.clone();
            std::thread::Builder::new()
                .name(format!("tarn-uring-{qid}"))
                .spawn(move || {
                    if let Err(e) = serve(&adapter, dev, qid as u16, jobs, dog.as_ref()) {
                        tracing::warn!(qid, %e, "io_uring queue ended");
                    }
                    let _ = end.send(());
                })?;
        }
        Ok(Queues { threads, ended })
    }

    /// Wait (at most `max`) for the queues to end once the connection has.
    pub fn join(self, max: Duration) {
        let deadline = std::time::Instant::now() + max;
        for _ in 0..self.threads {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if self.ended.recv_timeout(left).is_err() {
                tracing::info!("io_uring queues still busy at exit");
                return;
            }
        }
    }
}

/// Queues the kernel makes: one per possible CPU (`/sys/.../possible`,
/// e.g. "0-3").
fn possible_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .filter_map(|r| r.rsplit('-').next()?.parse::<usize>().ok())
                .max()
        })
        .map_or_else(
            || std::thread::available_parallelism().map_or(1, |n| n.get()),
            |max| max + 1,
        )
}

/// A request handed to a helper thread, and where to say it is done.
struct Job {
    entry: Entry,
    index: usize,
    done: Arc<Done>,
}

impl Job {
    fn run(self, adapter: &FuseAdapter) {
        {
            let mut bufs = self.entry.lock();
            handle(adapter, &mut bufs);
        }
        self.done.list.lock().push(self.index);
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live local to an eventfd.
        unsafe { libc::write(self.done.event.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// Entries whose requests helpers have answered, and the eventfd that
/// wakes the queue's thread to commit them.
struct Done {
    list: Mutex<Vec<usize>>,
    event: OwnedFd,
}

/// One queue's ring and entries, as its thread sees them.
struct Queue {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    dev: OwnedFd,
    qid: u16,
    entries: Vec<Entry>,
    /// Was an entry's last command REGISTER (else COMMIT_AND_FETCH)?
    registering: [bool; ENTRIES],
}

impl Queue {
    /// Hand an entry's buffers to the kernel, as a new entry.
    fn register(&mut self, i: usize) -> io::Result<()> {
        self.registering[i] = true;
        let iov = self.entries[i].lock().iov.as_ptr() as u64;
        let cmd = command(self.dev.as_raw_fd(), CMD_REGISTER, self.qid, 0, Some(iov));
        push(&mut self.ring, cmd, i as u64)
    }

    /// Send the reply in an entry's buffers; the entry then waits for its
    /// next request.
    fn commit(&mut self, i: usize) -> io::Result<()> {
        self.registering[i] = false;
        let commit_id = self.entries[i].lock().header.commit_id;
        let cmd = command(
            self.dev.as_raw_fd(),
            CMD_COMMIT_AND_FETCH,
            self.qid,
            commit_id,
            None,
        );
        push(&mut self.ring, cmd, i as u64)
    }
}

fn serve(
    adapter: &FuseAdapter,
    dev: OwnedFd,
    qid: u16,
    jobs: mpsc::Sender<Job>,
    dog: Option<&Arc<Watchdog>>,
) -> io::Result<()> {
    pin_to_cpu(qid as usize);
    let mut class = QueueClass::start(dog);
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(2 * ENTRIES as u32 + 2)
        .or_else(|_| IoUring::builder().build(2 * ENTRIES as u32 + 2))?;
    // SAFETY: eventfd(2) with valid flags; the result is checked.
    let event = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if event < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned, owned by nobody else.
    let event = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(event) };
    let done = Arc::new(Done {
        list: Mutex::new(Vec::new()),
        event,
    });
    let mut wake_buf = Box::new(0u64);
    let mut q = Queue {
        ring,
        dev,
        qid,
        entries: (0..ENTRIES).map(|_| new_entry()).collect(),
        registering: [true; ENTRIES],
    };
    for i in 0..ENTRIES {
        q.register(i)?;
    }
    push(&mut q.ring, wake_read(&done, &mut wake_buf), WAKE)?;
    let mut live = ENTRIES;
    while live > 0 {
        class.tick();
        let came = class.idle() && look_for_requests(&mut q.ring)?;
        if !came {
            super::memory::give_back_if_asked();
            match q.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        let completed: Vec<(u64, i32)> = q
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (user_data, res) in completed {
            if user_data == WAKE {
                let answered = std::mem::take(&mut *done.list.lock());
                for i in answered {
                    q.commit(i)?;
                }
                if res >= 0 {
                    push(&mut q.ring, wake_read(&done, &mut wake_buf), WAKE)?;
                } else {
                    tracing::warn!(qid, errno = -res, "io_uring queue: helper wakeups failed");
                }
                continue;
            }
            let i = user_data as usize;
            if res < 0 {
                if [libc::ENOTCONN, libc::ECONNABORTED, libc::ENODEV].contains(&-res) {
                    // The connection ended (unmounted, or aborted).
                    live -= 1;
                } else if q.registering[i] {
                    tracing::warn!(qid, errno = -res, "io_uring queue entry refused");
                    live -= 1;
                } else {
                    // The kernel no longer knew the request answered (it
                    // ended meanwhile): the entry went with it, so the
                    // buffers are registered again as a new one.
                    tracing::debug!(qid, errno = -res, "io_uring commit refused");
                    q.register(i)?;
                }
                continue;
            }
            let entry = q.entries[i].clone();
            if may_wait(adapter, &entry.lock()) {
                let job = Job {
                    entry,
                    index: i,
                    done: done.clone(),
                };
                if let Err(mpsc::SendError(job)) = jobs.send(job) {
                    job.run(adapter);
                }
                continue;
            }
            class.serve(|| handle(adapter, &mut entry.lock()));
            q.commit(i)?;
        }
    }
    Ok(())
}

/// How long a queue thread in the idle class looks for its caller's next
/// request before it sleeps. A caller making one request after another
/// (an untar: 8.4 a file) then finds the thread awake: its request is
/// handed over with no wakeup, and the thread takes it as soon as the
/// caller waits. In the idle class the looking takes no time from the
/// caller or anything else on the CPU. By hand, 20k small files untarred
/// pinned: 1.69–1.83 s against 1.77–2.04 s sleeping at once.
const LOOK: Duration = Duration::from_micros(50);

/// Send what is queued (replies), then look for completions without
/// sleeping, for up to `LOOK`: true if some came.
fn look_for_requests(ring: &mut IoUring<squeue::Entry128, cqueue::Entry>) -> io::Result<bool> {
    match ring.submit() {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
        Err(e) => return Err(e),
    }
    let until = std::time::Instant::now() + LOOK;
    loop {
        // SAFETY: no argument is passed; GETEVENTS with no minimum only
        // runs the pending task work that delivers requests, and returns.
        match unsafe {
            ring.submitter().enter::<libc::sigset_t>(
                0,
                0,
                io_uring::EnterFlags::GETEVENTS.bits(),
                None,
            )
        } {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
        if !ring.completion().is_empty() {
            return Ok(true);
        }
        if std::time::Instant::now() >= until {
            return Ok(false);
        }
        std::hint::spin_loop();
    }
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays in bounds
    // for any cpu below CPU_SETSIZE, checked first.
    unsafe {
        if cpu >= libc::CPU_SETSIZE as usize {
            return;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        // Best effort: an offline CPU's queue is served from anywhere.
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn push(
    ring: &mut IoUring<squeue::Entry128, cqueue::Entry>,
    e: squeue::Entry128,
    user_data: u64,
) -> io::Result<()> {
    let e = e.user_data(user_data);
    // SAFETY: every buffer an entry names (the entry's `Bufs`, the wake
    // counter) lives until the ring is dropped.
    unsafe {
        while ring.submission().push(&e).is_err() {
            ring.submit()?;
        }
    }
    Ok(())
}

/// A FUSE ring command: `struct fuse_uring_cmd_req` in the SQE's command
/// area; REGISTER also points at the entry's two iovecs.
fn command(fd: RawFd, op: u32, qid: u16, commit_id: u64, iov: Option<u64>) -> squeue::Entry128 {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    let mut b = opcode::UringCmd80::new(types::Fd(fd), op).cmd(cmd);
    if let Some(iov) = iov {
        b = b.addr(Some(iov));
    }
    let e = b.build();
    match iov {
        // The SQE's `len` is the iovec count (2); the builder has no field
        // for it, so it is set in the SQE's bytes (offset 24, as in
        // `struct io_uring_sqe`).
        Some(_) => {
            const _: () = assert!(std::mem::size_of::<squeue::Entry128>() == 128);
            // SAFETY: Entry128 is a repr(C) 128-byte io_uring_sqe128; any
            // bytes are a valid value of it.
            let mut raw: [u8; 128] = unsafe { std::mem::transmute(e) };
            raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
            // SAFETY: as above.
            unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
        }
        None => e,
    }
}

fn wake_read(done: &Done, buf: &mut u64) -> squeue::Entry128 {
    opcode::Read::new(
        types::Fd(done.event.as_raw_fd()),
        (buf as *mut u64).cast(),
        8,
    )
    .build()
    .into()
}

// ---- requests and replies ------------------------------------------------

mod op {
    pub const LOOKUP: u32 = 1;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const DESTROY: u32 = 38;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
}

/// `fuse_setattr_in.valid`: which attributes a SETATTR sets.
mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const MTIME_NOW: u32 = 1 << 8;
}

/// Fields of the FUSE structs, in native byte order.
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The request in an entry: `fuse_in_header` fields, op header, payload.
struct Req<'a> {
    opcode: u32,
    nodeid: u64,
    uid: u32,
    gid: u32,
    op: &'a [u8],
    payload: &'a [u8],
}

impl<'a> Req<'a> {
    /// The payload's NUL-terminated strings (names, a symlink target).
    fn names(&self) -> impl Iterator<Item = &'a [u8]> {
        let p = self.payload;
        p.strip_suffix(&[0]).unwrap_or(p).split(|&c| c == 0)
    }

    fn name(&self) -> &'a [u8] {
        self.names().next().unwrap_or_default()
    }
}

fn may_wait(adapter: &FuseAdapter, bufs: &Bufs) -> bool {
    let h = &bufs.header;
    let fh = u64_at(&h.op_in, 0);
    match u32_at(&h.in_out, 4) {
        op::FSYNC | op::FSYNCDIR => true,
        op::READ => adapter.fs.may_wait(fh, HandleOp::Read),
        op::WRITE => adapter.fs.may_wait(fh, HandleOp::Write),
        op::FLUSH => adapter.fs.may_wait(fh, HandleOp::Flush),
        _ => false,
    }
}

/// Serve the request in `bufs` and leave its reply there.
fn handle(adapter: &FuseAdapter, bufs: &mut Bufs) {
    let Bufs {
        header,
        payload,
        out,
        ..
    } = bufs;
    let h = &header.in_out;
    let unique = u64_at(h, 8);
    let size = (header.payload_sz as usize).min(payload.len());
    let req = Req {
        opcode: u32_at(h, 4),
        nodeid: u64_at(h, 16),
        uid: u32_at(h, 24),
        gid: u32_at(h, 28),
        op: &header.op_in,
        payload: &payload[..size],
    };
    out.clear();
    let error = match dispatch(adapter, &req, out) {
        Ok(()) => 0,
        Err(e) => {
            out.clear();
            -e
        }
    };
    let len = out.len().min(payload.len());
    payload[..len].copy_from_slice(&out[..len]);
    header.in_out[..4].copy_from_slice(&(16 + len as u32).to_ne_bytes());
    header.in_out[4..8].copy_from_slice(&error.to_ne_bytes());
    header.in_out[8..16].copy_from_slice(&unique.to_ne_bytes());
    header.payload_sz = len as u32;
}

fn fs<T>(r: Result<T, FsError>) -> Result<T, i32> {
    r.map_err(|e| errno(&e))
}

/// Run one request against the adapter, appending its reply's arguments
/// to `out`; an error is an errno.
fn dispatch(a: &FuseAdapter, r: &Req, out: &mut Vec<u8>) -> Result<(), i32> {
    let ino = r.nodeid;
    match r.opcode {
        op::LOOKUP => entry_out(
            out,
            &fs(name_str(r.name()).and_then(|n| a.fs.lookup(ino, n)))?,
        ),
        op::GETATTR => attr_out(out, &fs(a.fs.getattr(ino))?),
        op::SETATTR => {
            let valid = u32_at(r.op, 0);
            let has = |bit: u32| valid & bit != 0;
            let mtime = if has(fattr::MTIME_NOW) {
                Some(SystemTime::now())
            } else if has(fattr::MTIME) {
                Some(UNIX_EPOCH + Duration::new(u64_at(r.op, 40), u32_at(r.op, 60)))
            } else {
                None
            };
            let set = SetAttrIn {
                mode: has(fattr::MODE).then(|| u32_at(r.op, 68)),
                owner_changed: has(fattr::UID) || has(fattr::GID),
                size: has(fattr::SIZE).then(|| u64_at(r.op, 16)),
                mtime,
                fh: has(fattr::FH).then(|| u64_at(r.op, 8)),
            };
            attr_out(out, &fs(a.setattr(r.uid, r.gid, ino, set))?)
        }
        op::READLINK => out.extend_from_slice(fs(a.fs.readlink(ino))?.as_bytes()),
        op::SYMLINK => {
            let mut names = r.names();
            let (name, target) = (
                names.next().unwrap_or_default(),
                names.next().unwrap_or_default(),
            );
            entry_out(out, &fs(a.symlink(ino, name, target))?)
        }
        op::MKNOD => entry_out(
            out,
            &fs(a.mknod(ino, r.name(), u32_at(r.op, 0), u32_at(r.op, 8)))?,
        ),
        op::MKDIR => entry_out(
            out,
            &fs(name_str(r.name()).and_then(|n| a.fs.mkdir(ino, n)))?,
        ),
        op::UNLINK => fs(name_str(r.name()).and_then(|n| a.fs.unlink(ino, n)))?,
        op::RMDIR => fs(name_str(r.name()).and_then(|n| a.fs.rmdir(ino, n)))?,
        op::RENAME | op::RENAME2 => {
            let flags = if r.opcode == op::RENAME2 {
                u32_at(r.op, 8)
            } else {
                0
            };
            let mut names = r.names();
            let (name, newname) = (
                names.next().unwrap_or_default(),
                names.next().unwrap_or_default(),
            );
            fs(a.rename(ino, name, u64_at(r.op, 0), newname, flags))?
        }
        // A versioned tree has no hard links.
        op::LINK => return Err(libc::EPERM),
        op::OPEN => {
            let o = fs(a.open(r.uid, r.gid, ino, u32_at(r.op, 0) as i32))?;
            open_out(out, o.fh, o.flags.bits(), o.backing_id)
        }
        op::READ => {
            let (fh, offset, size) = (u64_at(r.op, 0), u64_at(r.op, 8), u32_at(r.op, 16));
            out.extend_from_slice(&fs(a.fs.read(fh, offset, (size as usize).min(PAYLOAD)))?)
        }
        op::WRITE => {
            let (fh, offset, size) = (u64_at(r.op, 0), u64_at(r.op, 8), u32_at(r.op, 16) as usize);
            let data = r.payload.get(..size).ok_or(libc::EINVAL)?;
            let n = fs(a.write(r.uid, fh, offset, data))?;
            out.extend_from_slice(&(n as u32).to_ne_bytes());
            out.extend_from_slice(&0u32.to_ne_bytes());
        }
        op::STATFS => {
            let st = a.fs.statfs();
            for v in [st.blocks, st.blocks, st.blocks, st.files, st.files] {
                out.extend_from_slice(&v.to_ne_bytes());
            }
            // bsize, namelen, frsize, padding, spare[6]
            let bsize = Attr::BLOCK_SIZE;
            for v in [bsize, st.name_max, bsize, 0, 0, 0, 0, 0, 0, 0] {
                out.extend_from_slice(&v.to_ne_bytes());
            }
        }
        op::RELEASE => fs(a.release(u64_at(r.op, 0)))?,
        op::RELEASEDIR => {
            let _ = a.fs.release(u64_at(r.op, 0));
        }
        op::FSYNC => fs(a.fs.fsync(u64_at(r.op, 0)))?,
        op::FSYNCDIR | op::DESTROY => {}
        op::FLUSH => fs(a.fs.flush(u64_at(r.op, 0)))?,
        op::OPENDIR => open_out(out, fs(a.fs.opendir(ino))?, 0, None),
        op::READDIR | op::READDIRPLUS => {
            let plus = r.opcode == op::READDIRPLUS;
            let (fh, offset, size) = (u64_at(r.op, 0), u64_at(r.op, 8), u32_at(r.op, 16));
            let max = (size as usize).min(PAYLOAD);
            fs(
                a.list_dir(ino, fh, offset, plus, |ino, next, kind, name, attr| {
                    let start = out.len();
                    if let Some(attr) = attr {
                        entry_out(out, attr);
                    }
                    dirent(out, ino, next, kind, name);
                    if out.len() > max {
                        out.truncate(start);
                        return true;
                    }
                    false
                }),
            )?
        }
        op::ACCESS => fs(a.access(r.uid, r.gid, ino, u32_at(r.op, 0)))?,
        op::CREATE => {
            let (flags, mode, umask) = (u32_at(r.op, 0), u32_at(r.op, 4), u32_at(r.op, 8));
            let (attr, o) = fs(a.create(ino, r.name(), mode, umask, flags as i32))?;
            entry_out(out, &attr);
            open_out(out, o.fh, o.flags.bits(), o.backing_id)
        }
        // What fuser answers for operations tarn leaves out (xattrs,
        // locks, fallocate, ...): the kernel stops asking.
        _ => return Err(libc::ENOSYS),
    }
    Ok(())
}

fn mode_bits(a: &Attr) -> u32 {
    let kind = match a.kind {
        Kind::Dir => libc::S_IFDIR,
        Kind::File => libc::S_IFREG,
        Kind::Symlink => libc::S_IFLNK,
    };
    kind | a.perm as u32
}

fn secs(t: SystemTime) -> (u64, u32) {
    t.duration_since(UNIX_EPOCH)
        .map_or((0, 0), |d| (d.as_secs(), d.subsec_nanos()))
}

/// `struct fuse_attr`.
fn attr(out: &mut Vec<u8>, a: &Attr) {
    let (t, ns) = secs(a.mtime);
    for v in [a.ino, a.size, a.blocks(), t, t, t] {
        out.extend_from_slice(&v.to_ne_bytes());
    }
    let rdev = 0;
    for v in [
        ns,
        ns,
        ns,
        mode_bits(a),
        a.nlink,
        a.uid,
        a.gid,
        rdev,
        Attr::BLOCK_SIZE,
        0,
    ] {
        out.extend_from_slice(&v.to_ne_bytes());
    }
}

/// `struct fuse_entry_out`.
fn entry_out(out: &mut Vec<u8>, a: &Attr) {
    let (ttl, ttl_ns) = (a.ttl.as_secs(), a.ttl.subsec_nanos());
    for v in [a.ino, 0, ttl, ttl] {
        out.extend_from_slice(&v.to_ne_bytes());
    }
    out.extend_from_slice(&ttl_ns.to_ne_bytes());
    out.extend_from_slice(&ttl_ns.to_ne_bytes());
    attr(out, a);
}

/// `struct fuse_attr_out`.
fn attr_out(out: &mut Vec<u8>, a: &Attr) {
    out.extend_from_slice(&a.ttl.as_secs().to_ne_bytes());
    out.extend_from_slice(&a.ttl.subsec_nanos().to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    attr(out, a);
}

/// `struct fuse_open_out`.
fn open_out(out: &mut Vec<u8>, fh: u64, flags: u32, backing_id: Option<u32>) {
    let flags = flags
        | if backing_id.is_some() {
            fuser::FopenFlags::FOPEN_PASSTHROUGH.bits()
        } else {
            0
        };
    out.extend_from_slice(&fh.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&backing_id.unwrap_or(0).to_ne_bytes());
}

/// `struct fuse_dirent`, padded to 8 bytes.
fn dirent(out: &mut Vec<u8>, ino: u64, next: u64, kind: Kind, name: &str) {
    let dt = match kind {
        Kind::Dir => libc::DT_DIR,
        Kind::File => libc::DT_REG,
        Kind::Symlink => libc::DT_LNK,
    };
    out.extend_from_slice(&ino.to_ne_bytes());
    out.extend_from_slice(&next.to_ne_bytes());
    out.extend_from_slice(&(name.len() as u32).to_ne_bytes());
    out.extend_from_slice(&(dt as u32).to_ne_bytes());
    out.extend_from_slice(name.as_bytes());
    out.resize(out.len().next_multiple_of(8), 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> Attr {
        Attr {
            ino: 42,
            kind: Kind::File,
            size: 5000,
            perm: 0o640,
            nlink: 1,
            mtime: UNIX_EPOCH + Duration::new(1_700_000_000, 5),
            uid: 1000,
            gid: 100,
            ttl: Duration::from_millis(1500),
        }
    }

    #[test]
    fn replies_are_laid_out_as_the_kernel_reads_them() {
        assert_eq!(std::mem::size_of::<Header>(), 288);
        let mut out = Vec::new();
        entry_out(&mut out, &file());
        assert_eq!(out.len(), 128, "fuse_entry_out");
        assert_eq!(u64_at(&out, 0), 42, "nodeid");
        assert_eq!(u64_at(&out, 16), 1, "entry_valid");
        assert_eq!(u32_at(&out, 32), 500_000_000, "entry_valid_nsec");
        let attr = &out[40..];
        assert_eq!(u64_at(attr, 8), 5000, "size");
        assert_eq!(u64_at(attr, 16), 10, "blocks");
        assert_eq!(u64_at(attr, 32), 1_700_000_000, "mtime");
        assert_eq!(u32_at(attr, 52), 5, "mtimensec");
        assert_eq!(u32_at(attr, 60), libc::S_IFREG | 0o640, "mode");
        assert_eq!((u32_at(attr, 68), u32_at(attr, 72)), (1000, 100));

        out.clear();
        attr_out(&mut out, &file());
        assert_eq!(out.len(), 104, "fuse_attr_out");
        out.clear();
        open_out(&mut out, 7, 0, Some(3));
        assert_eq!(out.len(), 16, "fuse_open_out");
        assert_eq!(u32_at(&out, 8), fuser::FopenFlags::FOPEN_PASSTHROUGH.bits());
        assert_eq!(u32_at(&out, 12), 3, "backing_id");
        out.clear();
        dirent(&mut out, 9, 3, Kind::Symlink, "abc");
        assert_eq!(out.len(), 32, "fuse_dirent padded to 8 bytes");
        assert_eq!(u32_at(&out, 20), libc::DT_LNK as u32);
        assert_eq!(&out[24..27], b"abc");
    }

    #[test]
    fn payload_names_are_split_at_their_nuls() {
        let req = |payload: &'static [u8]| Req {
            opcode: op::RENAME,
            nodeid: 1,
            uid: 0,
            gid: 0,
            op: &[],
            payload,
        };
        let r = req(b"old\0new name\0");
        assert_eq!(r.names().collect::<Vec<_>>(), [&b"old"[..], b"new name"]);
        assert_eq!(req(b"a.txt\0").name(), b"a.txt");
        assert_eq!(req(b"").name(), b"");
    }

    #[test]
    fn every_possible_cpu_gets_a_queue() {
        assert!(possible_cpus() >= std::thread::available_parallelism().unwrap().get());
    }

    #[test]
    fn a_register_command_points_at_two_iovecs() {
        let entry = new_entry();
        let bufs = entry.lock();
        let iov = bufs.iov.as_ptr() as u64;
        let e = command(5, CMD_REGISTER, 1, 0, Some(iov));
        // SAFETY: Entry128 is 128 plain bytes (asserted in `command`).
        let raw: [u8; 128] = unsafe { std::mem::transmute(e) };
        assert_eq!(u64_at(&raw, 16), iov, "addr");
        assert_eq!(u32_at(&raw, 24), 2, "len");
        // struct fuse_uring_cmd_req at the command area (offset 48).
        assert_eq!(u16::from_ne_bytes([raw[64], raw[65]]), 1, "qid");
        assert_eq!(bufs.iov[1].iov_len, PAYLOAD);
    }
}
