//! Helpers for tests that drive the real `tarn` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const TARN: &str = env!("CARGO_BIN_EXE_tarn");

/// A scratch lake: a temp dir holding the lake and local files.
pub struct Scratch {
    pub dir: tempfile::TempDir,
    pub lake: String,
}

impl Scratch {
    pub fn new() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let lake = format!("file://{}/lake", dir.path().display());
        let s = Scratch { dir, lake };
        s.ok(&["init"]);
        s
    }

    /// A scratch lake at an arbitrary URL (e.g. on the S3 test server).
    pub fn with_lake(lake: String) -> Scratch {
        let s = Scratch {
            dir: tempfile::tempdir().unwrap(),
            lake,
        };
        s.ok(&["init"]);
        s
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The bytes of the file at `address`, as `tarn get` writes them out.
    pub fn got(&self, address: &str) -> Vec<u8> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let out = self.path(&format!("got-{n}"));
        self.ok(&["get", address, out.to_str().unwrap()]);
        std::fs::read(out).unwrap()
    }

    pub fn write(&self, rel: &str, data: &[u8]) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
        p
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(TARN);
        c.args(args)
            .env("TARN_LAKE", &self.lake)
            .env("TARN_AUTHOR", "tester");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "tarn {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run and require failure with one of the documented exit codes and
    /// a one-line error; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "tarn {args:?} should fail");
        let code = out.status.code().unwrap_or(-1);
        assert!((1..=6).contains(&code), "tarn {args:?}: exit code {code}");
        Self::one_line_error(out)
    }

    /// Run and require failure with exit code `code`; returns stderr.
    pub fn fails_with(&self, code: i32, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "tarn {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self::one_line_error(out)
    }

    fn one_line_error(out: Output) -> String {
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "one-line error, got: {err}"
        );
        assert!(err.starts_with("tarn: error: "), "{err}");
        err
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    /// Commit messages of `tarn log ARGS --json`, newest first.
    pub fn messages(&self, args: &[&str]) -> Vec<String> {
        self.json(args)
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["message"].as_str().unwrap().to_string())
            .collect()
    }

    /// How many regular files `tarn ls -r REF` shows.
    pub fn count_files(&self, reference: &str) -> usize {
        let ls = self.json(&["ls", "-r", reference]);
        ls.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "file")
            .count()
    }

    /// Paths with staged changes on a branch.
    pub fn staged(&self, branch: &str) -> Vec<String> {
        let st = self.json(&["status", branch]);
        st["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["path"].as_str().unwrap().to_string())
            .collect()
    }

    /// Run a shell script with this lake in the environment, in the background.
    pub fn spawn_sh(&self, script: &str) -> Child {
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("TARN_LAKE", &self.lake)
            .spawn()
            .unwrap()
    }

    pub fn head(&self, branch: &str) -> String {
        self.json(&["log", branch, "-n", "1"])[0]["id"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

pub fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn tree_files(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().to_string();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                out.push((format!("{rel}/"), vec![]));
                walk(base, &p, out);
            } else if ft.is_symlink() {
                out.push((
                    rel,
                    std::fs::read_link(&p)
                        .unwrap()
                        .to_string_lossy()
                        .as_bytes()
                        .to_vec(),
                ));
            } else {
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    walk(root, root, &mut out);
    out
}

pub fn fuse_available() -> bool {
    if Path::new("/dev/fuse").exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run the mount tests: /dev/fuse is missing"
    );
    eprintln!("no /dev/fuse: skipping mount tests");
    false
}

pub fn mounted(dir: &Path) -> bool {
    let dir = dir.canonicalize().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| Path::new(m) == dir)
}

/// Wait for a condition with a deadline instead of sleeping blindly.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Make the kernel let go of every dentry and inode it is not using (as
/// memory pressure would): a FUSE daemon gets a FORGET for each. Needs
/// root, as the mount tests do in CI; false where it is not allowed.
pub fn drop_kernel_inodes() -> bool {
    match std::fs::write("/proc/sys/vm/drop_caches", "2") {
        Ok(()) => true,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run as root: cannot drop the kernel's caches: {e}"
            );
            false
        }
    }
}

/// How many inodes a mount's daemon holds (`.tarn/info` of a branch).
pub fn daemon_inodes(branch_dir: &Path) -> u64 {
    let info = std::fs::read_to_string(branch_dir.join(".tarn/info")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    v["inodes"].as_u64().expect("info tells the inodes held")
}

/// Does this kernel offer FUSE over io_uring, and io_uring to processes at
/// all? Asked once a daemon is up: a root daemon turns the module parameter
/// on where it can (in a container it may not).
pub fn io_uring_offered() -> bool {
    let enabled = std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .is_ok_and(|v| v.trim() == "Y");
    let io_uring_disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .is_ok_and(|v| v.trim() != "0");
    enabled && !io_uring_disabled
}

/// The names of a process's threads.
pub fn thread_names(pid: u32) -> Vec<String> {
    threads(pid).into_iter().map(|(name, _)| name).collect()
}

/// A process's threads: each one's name and scheduling policy
/// (`SCHED_OTHER` 0, `SCHED_IDLE` 5, ...).
pub fn threads(pid: u32) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let (Ok(name), Ok(stat)) = (
            std::fs::read_to_string(t.join("comm")),
            std::fs::read_to_string(t.join("stat")),
        ) else {
            continue; // the thread ended meanwhile
        };
        // Fields from the third on follow the name's closing parenthesis;
        // the policy is the 41st.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let policy = rest.split(' ').nth(41 - 3).unwrap().parse().unwrap();
        out.push((name.trim().to_string(), policy));
    }
    out
}

/// A running `tarn mount`; unmounted and stopped on drop, even when the test fails.
pub struct Mount {
    pub dir: PathBuf,
    pub child: Child,
}

impl Mount {
    pub fn new(s: &Scratch, name: &str, extra: &[&str]) -> Mount {
        let dir = s.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        let cache = s.path(&format!("{name}-cache"));
        let mut args = vec![
            "mount",
            dir.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let cmd = s.cmd(&args);
        Mount::start(dir, cmd)
    }

    /// Run a `tarn mount` command of the caller's making and wait for its
    /// mount at `dir` to come up.
    pub fn start(dir: PathBuf, mut cmd: Command) -> Mount {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut m = Mount { dir, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !mounted(&m.dir) {
            if let Some(status) = m.child.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(m.child.stderr.as_mut().unwrap(), &mut err).unwrap();
                panic!("tarn mount exited with {status}: {err}");
            }
            assert!(Instant::now() < deadline, "mount did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if mounted(&self.dir) {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.dir)
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh lake URL on the loopback S3 server that scripts/test.sh starts
/// (TARN_TEST_S3); outside CI without a server, `None` (the test says so
/// and passes); in CI a missing server is a failure.
pub fn s3_lake() -> Option<String> {
    match std::env::var("TARN_TEST_S3") {
        Ok(base) => Some(format!("{base}/t-{}", ulid::Ulid::new())),
        Err(_) if std::env::var_os("CI").is_some() => {
            panic!("CI must run the S3 tests: use scripts/test.sh")
        }
        Err(_) => {
            eprintln!("TARN_TEST_S3 not set: run scripts/test.sh for the S3 tests");
            None
        }
    }
}

/// Write one command line to a mounted branch's `.tarn/ctl`; the write's
/// result is the command's (an errno when it fails).
pub fn ctl(branch_dir: &Path, line: &str) -> std::io::Result<()> {
    std::fs::write(branch_dir.join(".tarn/ctl"), format!("{line}\n"))
}
