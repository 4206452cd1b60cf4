//! Snapshots for `exec` checks, wired here because they join two layers:
//! a candidate commit is mounted read-only (a `tarn mount --ref` child
//! process) so a check reads any amount of data at the cost of what it
//! touches; where FUSE is missing, the tree is copied out instead.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::hash::Hash;
use crate::hooks::{CopySnapshots, Snapshot, SnapshotSource};
use crate::repo::Lake;

/// How long a snapshot mount may take to come up before the check fails.
const MOUNT_DEADLINE: Duration = Duration::from_secs(15);

/// Mount when this process is the `tarn` binary, `/dev/fuse` exists and the
/// lake is reachable from another process (not `memory://`); else copy.
/// `TARN_HOOK_SNAPSHOT=copy` forces copies.
pub struct AutoSnapshots {
    exe: Option<PathBuf>,
}

impl AutoSnapshots {
    pub fn new() -> AutoSnapshots {
        let wanted = std::env::var("TARN_HOOK_SNAPSHOT").as_deref() != Ok("copy")
            && std::path::Path::new("/dev/fuse").exists();
        let exe = std::env::current_exe()
            .ok()
            .filter(|e| wanted && e.file_name().is_some_and(|n| n == "tarn"));
        AutoSnapshots { exe }
    }
}

impl SnapshotSource for AutoSnapshots {
    fn snapshot(&self, lake: &Lake, repo: &str, commit: &Hash) -> Result<Snapshot, String> {
        let url = lake.store().url();
        if let Some(exe) = self.exe.as_ref().filter(|_| !url.starts_with("memory:")) {
            match mount_snapshot(exe, url, repo, commit) {
                Ok(s) => return Ok(s),
                Err(e) => tracing::warn!("snapshot mount failed, copying instead: {e}"),
            }
        }
        CopySnapshots.snapshot(lake, repo, commit)
    }
}

struct MountGuard {
    dir: PathBuf,
    child: Child,
    _tmp: tempfile::TempDir,
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        // A check's processes killed at their time limit may still hold
        // the snapshot for a moment (EBUSY): try again, then detach it
        // lazily, so no mount is left behind.
        let fusermount = |flags: &str| {
            Command::new("fusermount3")
                .arg(flags)
                .arg(&self.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        for _ in 0..UNMOUNT_TRIES {
            if fusermount("-u") || !crate::mount::is_mounted(&self.dir) {
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        fusermount("-uz");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Unmount attempts (50 ms apart) before a lazy unmount.
const UNMOUNT_TRIES: usize = 40;

fn mount_snapshot(exe: &PathBuf, url: &str, repo: &str, commit: &Hash) -> Result<Snapshot, String> {
    let tmp = tempfile::Builder::new()
        .prefix("tarn-snapshot-")
        .tempdir()
        .map_err(|e| format!("snapshot directory: {e}"))?;
    let dir = tmp.path().join("tree");
    std::fs::create_dir(&dir).map_err(|e| e.to_string())?;
    let log_path = tmp.path().join("mount.log");
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let mut child = Command::new(exe);
    child
        .arg("mount")
        .arg("--lake")
        .arg(url)
        .arg("--ref")
        .arg(format!("{repo}/{}", commit.to_hex()))
        .arg("--read-only")
        .arg("--cache-dir")
        .arg(tmp.path().join("cache"))
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    // SAFETY: prctl in the child before exec only sets its own death signal.
    unsafe {
        use std::os::unix::process::CommandExt;
        // If this process dies before unmounting, the snapshot goes too
        // (SIGTERM unmounts cleanly).
        child.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let child = child
        .spawn()
        .map_err(|e| format!("starting {}: {e}", exe.display()))?;
    let mut guard = MountGuard {
        dir: dir.clone(),
        child,
        _tmp: tmp,
    };
    let deadline = Instant::now() + MOUNT_DEADLINE;
    while !crate::mount::is_mounted(&dir) {
        let exited = guard.child.try_wait().map_err(|e| e.to_string())?;
        if exited.is_some() || Instant::now() > deadline {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(format!(
                "snapshot mount did not come up: {}",
                log.lines().last().unwrap_or("no output")
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(Snapshot::new(dir, Box::new(guard)))
}
