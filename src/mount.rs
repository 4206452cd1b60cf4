//! The mount daemon: shows a lake (or one pinned ref) as a POSIX tree
//! through FUSE. `fs` is the filesystem core (testable without a mount),
//! `fuse` the thin fuser adapter, `cache` the local chunk cache.
//!
//! Depends on `repo` and `chunk`-level content; must not depend on `cli`.

pub mod assembly;
pub mod cache;
pub mod control;
pub mod fs;
pub mod fuse;
pub mod journal;
pub mod memory;
pub mod sched;
pub mod uring;
pub mod write;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::repo::Lake;

#[derive(Debug, Clone)]
pub struct MountOptions {
    pub mountpoint: PathBuf,
    /// `(repo, ref)` to show at the root instead of the whole lake.
    pub pinned: Option<(String, String)>,
    pub read_only: bool,
    pub cache_dir: PathBuf,
    pub cache_size: u64,
    pub metadata_ttl: Duration,
    pub allow_other: bool,
    /// FUSE worker threads.
    pub threads: usize,
    /// close() returns once the change is journaled on the cache disk;
    /// uploads happen in the background.
    pub writeback: bool,
    /// Serve requests through per-CPU io_uring queues where the kernel
    /// offers them (Linux 6.14+).
    pub io_uring: bool,
    /// Run the io_uring queue threads in the idle scheduling class while
    /// nothing else keeps them waiting (`mount::sched`).
    pub idle_queues: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{0}")]
    Fs(#[from] fs::FsError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MountError {
    let what = what.into();
    move |source| MountError::Io { what, source }
}

/// Block SIGINT/SIGTERM/SIGHUP in this thread and every thread it starts
/// afterwards (call it before anything starts threads), and return the set
/// for `run` to wait on: the daemon unmounts cleanly instead of dying with
/// a busy mountpoint.
pub fn block_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-set manipulation on a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Mount and serve until unmounted or signalled.
pub fn run(
    mut lake: Lake,
    mut opts: MountOptions,
    signals: libc::sigset_t,
) -> Result<(), MountError> {
    // The journal opens its store by URL: a relative cache dir must not
    // become one (nor change meaning if the daemon's directory does).
    opts.cache_dir = std::path::absolute(&opts.cache_dir)
        .map_err(io(format!("cache dir {}", opts.cache_dir.display())))?;
    let cache = cache::ChunkCache::open(lake.store().clone(), &opts.cache_dir, opts.cache_size)
        .map_err(io(format!("chunk cache {}", opts.cache_dir.display())))?;
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let spool_dir =
        spool_dir(&opts.cache_dir).map_err(io(format!("spool in {}", opts.cache_dir.display())))?;
    // A big commit's tree spills to the cache disk, next to the spool.
    lake.set_spill_dir(spool_dir.clone());
    let lake = Arc::new(lake);
    // The journal is also opened without --writeback: what a write-back
    // daemon left behind is uploaded before anything else happens.
    let journal = journal::Journal::open(&opts.cache_dir)
        .map_err(io(format!("journal in {}", opts.cache_dir.display())))?;
    // Files an earlier daemon was still writing when it died, first.
    let remade = journal
        .recover_drafts(lake.config().chunking)
        .map_err(|e| io("journal drafts")(std::io::Error::other(e)))?;
    if remade > 0 {
        tracing::info!(
            files = remade,
            "made again files an earlier daemon was writing"
        );
    }
    match journal.upload_all(&lake) {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            entries = n,
            "uploaded journaled changes left by an earlier daemon"
        ),
        Err(e) => {
            tracing::warn!(%e, "journaled changes not uploaded yet; retrying in the background")
        }
    }
    cache.set_journal(journal.objects().clone());
    journal
        .spawn_uploader(lake.clone())
        .map_err(io("uploader thread"))?;
    let copies = cache.clone();
    let core = fs::LakeFs::new(
        lake,
        cache,
        fs::FsConfig {
            pinned: opts.pinned.clone(),
            read_only: opts.read_only,
            metadata_ttl: opts.metadata_ttl,
            uid,
            gid,
            spool_dir,
            writeback: opts.writeback.then_some(journal),
        },
    )?;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("tarn".into()),
        fuser::MountOption::Subtype("tarn".into()),
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoAtime,
    ];
    // Only the mounting user can reach the mount unless --allow-other: the
    // core then checks that user's permission bits itself (on open,
    // truncate and access), so walking a directory the kernel has just
    // seen change needs no attribute refresh first. With other users, the
    // kernel checks modes, owners and groups.
    if opts.allow_other {
        config
            .mount_options
            .push(fuser::MountOption::DefaultPermissions);
    }
    if opts.read_only {
        config.mount_options.push(fuser::MountOption::RO);
    }
    if opts.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(opts.threads.max(1));
    let mountpoint = opts
        .mountpoint
        .canonicalize()
        .map_err(io(format!("mount {}", opts.mountpoint.display())))?;
    let adapter = Arc::new(fuse::FuseAdapter::new(
        core,
        !opts.allow_other,
        opts.io_uring && allow_io_uring(),
    ));
    if opts.writeback {
        let weak = Arc::downgrade(&adapter);
        adapter.fs.defer_releases(move |fhs| {
            if let Some(a) = weak.upgrade() {
                for fh in fhs {
                    a.fs.release_logged(fh);
                }
            }
        })?;
    }
    let mut session =
        fuser::Session::new(fuse::Classic(adapter.clone()), &opts.mountpoint, &config)
            .map_err(io(format!("mount {}", opts.mountpoint.display())))?;
    raise_readahead(&mountpoint);
    let dev = std::os::fd::AsFd::as_fd(&session)
        .try_clone_to_owned()
        .map_err(io("FUSE device"))?;
    let queues = if adapter.io_uring.load(std::sync::atomic::Ordering::Relaxed) {
        Some(
            uring::Queues::start(adapter.clone(), &dev, opts.threads, opts.idle_queues)
                .map_err(io("io_uring queues"))?,
        )
    } else {
        None
    };
    let _ = adapter.dev.set(dev);
    let mut unmounter = session.unmount_callable();
    std::thread::Builder::new()
        .name("tarn-signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: waits on the signal set blocked above.
            unsafe { libc::sigwait(&signals, &mut sig) };
            tracing::info!(signal = sig, "unmounting");
            if let Err(e) = unmounter.unmount() {
                tracing::warn!(%e, "unmount failed");
            }
        })
        .map_err(io("signal thread"))?;
    tracing::info!(mountpoint = %opts.mountpoint.display(), "mounted");
    session.run().map_err(io("FUSE session"))?;
    if let Some(q) = queues {
        q.join(std::time::Duration::from_secs(5));
    }
    // Releases answered but not yet staged (what stays open is journaled,
    // and made again by the next daemon).
    adapter.fs.release_queued();
    copies.finish_copies(std::time::Duration::from_secs(60));
    Ok(())
}

/// May this daemon ask for FUSE over io_uring? The kernel offers it only
/// while the `fuse` module's `enable_uring` parameter is set; root sets it
/// (it lets FUSE daemons use io_uring, nothing more).
fn allow_io_uring() -> bool {
    const PARAM: &str = "/sys/module/fuse/parameters/enable_uring";
    match std::fs::read_to_string(PARAM) {
        Ok(v) if v.trim() == "Y" => true,
        Ok(_) => match std::fs::write(PARAM, "Y") {
            Ok(()) => {
                tracing::info!("enabled FUSE over io_uring ({PARAM})");
                true
            }
            Err(e) => {
                tracing::debug!(%e, "FUSE over io_uring not enabled; serving /dev/fuse");
                false
            }
        },
        Err(_) => false,
    }
}

/// Kernel read-ahead for the mount, in KiB: sequential readers keep this
/// much in flight as concurrent FUSE reads (up to 1 MiB each), answered from
/// the daemon's own read-ahead (by the `/dev/fuse` threads in parallel, or
/// by the reader's CPU's io_uring queue). By hand, a
/// 2 GiB cold read took 2.5 s at FUSE's 128 KiB and 1.6–1.7 s at anything
/// from 1 to 8 MiB; not more, as a page fault of a file mapped in memory
/// reads around it by this much.
const KERNEL_READAHEAD_KB: u32 = 4096;

/// Raise the kernel's read-ahead for this mount (its "backing device",
/// `/sys/class/bdi/MAJOR:MINOR`). FUSE caps it at 128 KiB and lets a daemon
/// only lower it in the protocol, which keeps one sequential reader to about
/// one request in flight; root can raise it here. Best effort: without the
/// permission reads still work, with less in flight.
fn raise_readahead(mountpoint: &Path) {
    // Not a stat of the mountpoint: the session does not answer yet.
    let Some(dev) = mount_device(mountpoint) else {
        return;
    };
    let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    match std::fs::write(&path, KERNEL_READAHEAD_KB.to_string()) {
        Ok(()) => tracing::info!(kb = KERNEL_READAHEAD_KB, "kernel read-ahead raised"),
        Err(e) => tracing::debug!(%path, %e, "kernel read-ahead left as it is"),
    }
}

/// This daemon's spool directory, `<cache>/spool/<pid>`. Spools of daemons
/// that are gone held nothing acknowledged (a close returns only once its
/// data is staged), so they are removed.
fn spool_dir(cache_dir: &Path) -> std::io::Result<PathBuf> {
    let base = cache_dir.join("spool");
    std::fs::create_dir_all(&base)?;
    for e in std::fs::read_dir(&base)? {
        let e = e?;
        let alive = e
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let mine = base.join(std::process::id().to_string());
    std::fs::create_dir_all(&mine)?;
    Ok(mine)
}

/// Is `dir` a mountpoint right now?
pub fn is_mounted(dir: &Path) -> bool {
    dir.canonicalize()
        .is_ok_and(|dir| mount_device(&dir).is_some())
}

/// The `MAJOR:MINOR` of what is mounted at `dir` (an absolute, resolved
/// path), from the mount table: nothing is asked of the mount itself.
fn mount_device(dir: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // The last mount at a path is the one in effect.
    mounts.lines().rev().find_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        let at = fields.get(4)?.replace("\\040", " ");
        (Path::new(&at) == dir).then(|| fields.get(2).map(|d| d.to_string()))?
    })
}

/// Unmount a tarn mount (as its owner through fusermount3, or as root).
pub fn unmount(dir: &Path) -> Result<(), MountError> {
    let status = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(dir)
        .status();
    if matches!(status, Ok(s) if s.success()) {
        return Ok(());
    }
    let c =
        std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|_| MountError::Io {
            what: dir.display().to_string(),
            source: std::io::ErrorKind::InvalidInput.into(),
        })?;
    // SAFETY: umount2 with a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
        return Err(MountError::Io {
            what: format!("unmount {}", dir.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}
