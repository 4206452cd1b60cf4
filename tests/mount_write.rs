//! The write side of the mount: POSIX operations, control files,
//! durability across `kill -9`, concurrency, and a reference-model test
//! against a plain directory.

mod common;
use common::*;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

fn errno_of(r: std::io::Result<impl Sized>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn branch_setup() -> Scratch {
    let s = Scratch::new();
    s.ok(&["repo", "create", "sales"]);
    s.ok(&["branch", "create", "sales/dev", "--from", "main"]);
    s
}

#[test]
fn posix_operations_and_their_errors() {
    if !fuse_available() {
        return;
    }
    let s = branch_setup();
    let m = Mount::new(&s, "mnt", &[]);
    // Where the kernel offers it, requests come through per-CPU io_uring
    // queues, each served by a thread of its own.
    let uring = || {
        thread_names(m.child.id())
            .iter()
            .any(|n| n.starts_with("tarn-uring-0"))
    };
    if io_uring_offered() {
        wait_until("io_uring queue threads", Duration::from_secs(10), uring);
    }
    posix_operations(&s, &m);
    assert_eq!(uring(), io_uring_offered());
}

#[test]
fn posix_operations_through_dev_fuse() {
    if !fuse_available() {
        return;
    }
    let s = branch_setup();
    let m = Mount::new(&s, "mnt", &["--no-io-uring"]);
    posix_operations(&s, &m);
    assert!(!thread_names(m.child.id())
        .iter()
        .any(|n| n.starts_with("tarn-uring")));
}

fn posix_operations(s: &Scratch, m: &Mount) {
    let d = m.p("sales/dev");
    std::fs::write(d.join("a.txt"), "one\n").unwrap();
    assert_eq!(std::fs::read_to_string(d.join("a.txt")).unwrap(), "one\n");
    // Append, random write, sparse extension, truncate.
    std::fs::OpenOptions::new()
        .append(true)
        .open(d.join("a.txt"))
        .unwrap()
        .write_all(b"two\n")
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(d.join("a.txt")).unwrap(),
        "one\ntwo\n"
    );
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(d.join("r.bin"))
            .unwrap();
        f.write_all(&[b'0'; 10000]).unwrap();
        f.seek(SeekFrom::Start(5000)).unwrap();
        f.write_all(b"XYZ").unwrap();
        f.seek(SeekFrom::Start(20000)).unwrap();
        f.write_all(b"end").unwrap();
    }
    let r = std::fs::read(d.join("r.bin")).unwrap();
    assert_eq!(r.len(), 20003);
    assert_eq!(&r[5000..5003], b"XYZ");
    assert!(r[10000..20000].iter().all(|b| *b == 0));
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("r.bin"))
        .unwrap()
        .set_len(2)
        .unwrap();
    assert_eq!(std::fs::metadata(d.join("r.bin")).unwrap().len(), 2);
    // O_EXCL on an existing name.
    let excl = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(d.join("a.txt"));
    assert_eq!(errno_of(excl), libc::EEXIST);
    // Directories, renames (file, directory, over a file), symlinks, chmod.
    std::fs::create_dir_all(d.join("x/y/z")).unwrap();
    std::fs::write(d.join("x/y/z/f.txt"), "deep\n").unwrap();
    std::fs::rename(d.join("x"), d.join("x2")).unwrap();
    assert_eq!(
        std::fs::read_to_string(d.join("x2/y/z/f.txt")).unwrap(),
        "deep\n"
    );
    assert_eq!(errno_of(std::fs::metadata(d.join("x"))), libc::ENOENT);
    std::fs::write(d.join("b.txt"), "bee").unwrap();
    std::fs::rename(d.join("a.txt"), d.join("b.txt")).unwrap();
    assert_eq!(
        std::fs::read_to_string(d.join("b.txt")).unwrap(),
        "one\ntwo\n"
    );
    std::os::unix::fs::symlink("b.txt", d.join("link")).unwrap();
    assert_eq!(
        std::fs::read_link(d.join("link")).unwrap(),
        Path::new("b.txt")
    );
    std::fs::set_permissions(d.join("b.txt"), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(
        std::fs::metadata(d.join("b.txt"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    std::fs::create_dir(d.join("empty")).unwrap();
    assert_eq!(errno_of(std::fs::create_dir(d.join("empty"))), libc::EEXIST);
    assert_eq!(errno_of(std::fs::remove_dir(d.join("x2"))), libc::ENOTEMPTY);
    std::fs::create_dir(d.join("full")).unwrap();
    std::fs::write(d.join("full/f"), "f").unwrap();
    assert_eq!(
        errno_of(std::fs::rename(d.join("empty"), d.join("full"))),
        libc::ENOTEMPTY
    );
    assert_eq!(
        errno_of(std::fs::rename(d.join("x2"), d.join("x2/y/inside"))),
        libc::EINVAL
    );
    // Not supported: hard links, fifos. A user file can't take the .tarn name.
    assert_eq!(
        errno_of(std::fs::hard_link(d.join("b.txt"), d.join("hl"))),
        libc::EPERM
    );
    let fifo = std::ffi::CString::new(d.join("fifo").to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid path.
    assert_ne!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    assert_eq!(errno_of(std::fs::write(d.join(".tarn"), "x")), libc::EISDIR);
    assert_eq!(errno_of(std::fs::create_dir(d.join(".tarn"))), libc::EEXIST);
    let listing: Vec<String> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(!listing.contains(&".tarn".to_string()));
    // Unlink.
    std::fs::write(d.join("gone.txt"), "gone").unwrap();
    std::fs::remove_file(d.join("gone.txt")).unwrap();
    assert_eq!(
        errno_of(std::fs::metadata(d.join("gone.txt"))),
        libc::ENOENT
    );

    // The CLI sees what the mount staged; commit through the control file.
    let status = std::fs::read_to_string(d.join(".tarn/status")).unwrap();
    assert!(status.contains("b.txt"), "{status}");
    assert!(s.ok(&["status", "sales/dev"]).contains("x2/y/z/f.txt"));
    std::fs::write(d.join(".tarn/ctl"), "commit -m \"from ctl\"\n").unwrap();
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join(".tarn/result")).unwrap()).unwrap();
    assert_eq!(result["ok"], true);
    assert_eq!(result["commit"].as_str().unwrap(), s.head("sales/dev"));
    assert_eq!(s.ok(&["cat", "sales/dev/x2/y/z/f.txt"]), "deep\n");
    let ls = s.ok(&["ls", "sales/dev/"]);
    assert!(
        ls.contains("empty"),
        "empty directories are committed: {ls}"
    );
    assert_eq!(
        s.json(&["log", "sales/dev", "-n", "1"])[0]["message"],
        "from ctl"
    );
    // A bad command fails the write with EINVAL and says why in result.
    assert_eq!(
        errno_of(std::fs::write(d.join(".tarn/ctl"), "frobnicate now\n")),
        libc::EINVAL
    );
    let result = std::fs::read_to_string(d.join(".tarn/result")).unwrap();
    assert!(
        result.contains("\"ok\":false") && result.contains("frobnicate"),
        "{result}"
    );
    // Reading the control file on the same fd returns the outcome.
    let mut ctl = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.join(".tarn/ctl"))
        .unwrap();
    ctl.write_all(b"branch experiment-1\n").unwrap();
    let mut out = String::new();
    ctl.read_to_string(&mut out).unwrap();
    assert!(out.contains("experiment-1"), "{out}");
    assert!(s.ok(&["branch", "list", "sales"]).contains("experiment-1"));
    std::fs::write(d.join("junk"), "junk").unwrap();
    std::fs::write(d.join(".tarn/ctl"), "reset\n").unwrap();
    wait_until("reset to show", Duration::from_secs(5), || {
        !d.join("junk").exists()
    });
    // Nothing to commit: the write fails, nothing changes.
    let head = s.head("sales/dev");
    assert_ne!(
        errno_of(std::fs::write(d.join(".tarn/ctl"), "commit -m nothing\n")),
        0
    );
    assert_eq!(s.head("sales/dev"), head);
    // Merge dev into main through main's control file.
    std::fs::write(m.p("sales/main/.tarn/ctl"), "merge dev\n").unwrap();
    assert_eq!(s.ok(&["cat", "sales/main/b.txt"]), "one\ntwo\n");
    // Pinned refs are read-only.
    assert_eq!(
        errno_of(std::fs::write(m.p("sales/main~0/x.txt"), "x")),
        libc::EROFS
    );
    // Inside the mount, the CLI takes the branch from the current directory.
    let out = s.cmd(&["status"]).current_dir(&d).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn mode_and_times_set_on_an_open_file_are_staged_at_its_close() {
    if !fuse_available() {
        return;
    }
    let s = branch_setup();
    let when = std::time::UNIX_EPOCH + Duration::from_secs(1_500_000_000);
    {
        let m = Mount::new(&s, "mnt", &[]);
        let path = m.p("sales/dev/tarred.txt");
        let f = std::fs::File::create(&path).unwrap();
        (&f).write_all(b"from an archive\n").unwrap();
        // As tar does: fchmod and futimens before close.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .unwrap();
        f.set_modified(when).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "seen at once");
        drop(f);
    }
    s.ok(&["commit", "sales/dev", "-m", "untar"]);
    let m = Mount::new(&s, "again", &[]);
    let meta = std::fs::metadata(m.p("sales/dev/tarred.txt")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.modified().unwrap(), when);
    assert_eq!(
        std::fs::read_to_string(m.p("sales/dev/tarred.txt")).unwrap(),
        "from an archive\n"
    );
}

#[test]
fn a_users_own_mount_checks_their_permission_bits() {
    if !fuse_available() || unsafe { libc::geteuid() } != 0 {
        eprintln!("needs root (to mount as another user) and /dev/fuse: skipped");
        return;
    }
    let s = branch_setup();
    let d = s.dir.path();
    // An unprivileged user mounts the lake and works in it, inside a mount
    // namespace of its own where /dev/fuse is open to everyone (as on a
    // stock system; this machine's may be root's only). Leaving the
    // namespace ends the mount even if the test fails.
    let script = r#"
        set -e
        D=$1; TARN=$2; as_user() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
        mkdir "$D/m"
        chown -R 65534:65534 "$D"
        mknod "$D/fuse" c 10 229; chmod 666 "$D/fuse"; mount --bind "$D/fuse" /dev/fuse
        as_user "$TARN" mount "$D/m" --cache-dir "$D/c" 2>"$D/mount.log" &
        daemon=$!
        trap 'fusermount3 -uz "$D/m" 2>/dev/null; kill $daemon 2>/dev/null' EXIT
        # (root may not even stat it: the mount table says when it is up)
        up() { grep -q " $D/m " /proc/self/mountinfo; }
        for _ in $(seq 250); do up && break; sleep 0.02; done
        up || { echo "not mounted: $(cat "$D/mount.log")"; exit 1; }
        if stat "$D/m/sales" >/dev/null 2>&1; then echo "root reached another user's mount"; exit 1; fi
        as_user sh -c '
            cd "$1/m/sales/main"
            echo one > f
            chmod 444 f
            if echo two > f 2>/dev/null; then echo "wrote a read-only file"; exit 1; fi
            if truncate -s 0 f 2>/dev/null; then echo "truncated a read-only file"; exit 1; fi
            if [ -w f ]; then echo "access(W_OK) said yes"; exit 1; fi
            [ -r f ] && [ "$(cat f)" = one ]
            chmod 200 f
            if cat f >/dev/null 2>&1; then echo "read a write-only file"; exit 1; fi
            chmod 644 f
            echo three > f
            [ "$(cat f)" = three ]
            if ./f 2>/dev/null; then echo "ran a file without x bits"; exit 1; fi
            echo ok
        ' sh "$D"
    "#;
    let out = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", script, "sh"])
        .arg(d)
        .arg(TARN)
        .env("TARN_LAKE", &s.lake)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn inodes_the_kernel_lets_go_of_the_daemon_lets_go_of_too() {
    if !fuse_available() {
        return;
    }
    let s = branch_setup();
    for transport in [&[][..], &["--writeback"][..]] {
        let m = Mount::new(&s, "mnt", transport);
        let dev = m.p("sales/dev");
        let path = |i: usize| dev.join(format!("d{}/f{i}", i / 500));
        let mut model = std::collections::BTreeMap::new();
        for i in 0..2000 {
            if i % 500 == 0 {
                std::fs::create_dir_all(path(i).parent().unwrap()).unwrap();
            }
            std::fs::write(path(i), format!("{i}\n")).unwrap();
            model.insert(i, format!("{i}\n"));
        }
        {
            // Held open, as other tests may drop the kernel's inodes
            // meanwhile: the daemon holds at least these.
            let open: Vec<std::fs::File> = (0..500)
                .map(|i| std::fs::File::open(path(i * 4)).unwrap())
                .collect();
            assert!(daemon_inodes(&dev) >= open.len() as u64);
        }
        if !drop_kernel_inodes() {
            return;
        }
        // FORGETs come asynchronously, and the kernel may keep a few.
        wait_until(
            "the daemon to let go of the inodes",
            Duration::from_secs(20),
            || {
                drop_kernel_inodes();
                daemon_inodes(&dev) < 100
            },
        );
        // Everything is found again, under the numbers it had.
        for (i, want) in &model {
            assert_eq!(&std::fs::read_to_string(path(*i)).unwrap(), want);
        }
        // And changes as before: overwritten, renamed (also over another),
        // removed, then committed.
        for i in (0..2000).step_by(7) {
            std::fs::write(path(i), "new\n").unwrap();
            model.insert(i, "new\n".into());
        }
        drop_kernel_inodes();
        // Each to the file 1000 away, in another directory, over it.
        let across = |i: usize| (i + 1000) % 2000;
        for i in (1..2000).step_by(11) {
            std::fs::rename(path(i), path(across(i))).unwrap();
            let moved = model.remove(&i).unwrap();
            model.insert(across(i), moved);
        }
        drop_kernel_inodes();
        for i in (3..2000).step_by(13) {
            if model.remove(&i).is_some() {
                std::fs::remove_file(path(i)).unwrap();
            }
        }
        ctl(&dev, "commit -m after-forgets").unwrap();
        let out = s.path(&format!("out{}", transport.len()));
        s.ok(&["get", "sales/dev", out.to_str().unwrap()]);
        let got: Vec<(String, Vec<u8>)> = tree_files(&out)
            .into_iter()
            .filter(|(p, _)| !p.ends_with('/'))
            .collect();
        let want: std::collections::BTreeMap<String, Vec<u8>> = model
            .iter()
            .map(|(i, c)| (format!("d{}/f{i}", i / 500), c.clone().into_bytes()))
            .collect();
        let wrong: Vec<_> = got
            .iter()
            .filter(|(p, c)| want.get(p) != Some(c))
            .map(|(p, _)| p)
            .collect();
        assert!(wrong.is_empty(), "wrong or extra files: {wrong:?}");
        assert_eq!(got.len(), want.len(), "files missing");
    }
}

#[test]
fn closed_files_survive_kill_9() {
    if !fuse_available() {
        return;
    }
    let s = branch_setup();
    let mut m = Mount::new(&s, "mnt", &[]);
    let big = pseudo_random(5_000_000, 3);
    std::fs::write(m.p("sales/dev/durable.txt"), "durable\n").unwrap();
    std::fs::write(m.p("sales/dev/big.bin"), &big).unwrap();
    {
        let mut f = std::fs::File::create(m.p("sales/dev/synced.txt")).unwrap();
        f.write_all(b"synced\n").unwrap();
        f.sync_all().unwrap();
        // Still open when the daemon dies: fsync made it durable.
        m.child.kill().unwrap();
        m.child.wait().unwrap();
    }
    drop(m);
    s.ok(&["commit", "sales/dev", "-m", "after kill"]);
    assert_eq!(s.ok(&["cat", "sales/dev/durable.txt"]), "durable\n");
    assert_eq!(s.ok(&["cat", "sales/dev/synced.txt"]), "synced\n");
    assert_eq!(s.got("sales/dev/big.bin"), big);
}

#[test]
fn concurrent_writers_readers_and_commits_lose_nothing() {
    if !fuse_available() {
        return;
    }
    let s = branch_setup();
    let m = Mount::new(&s, "mnt", &[]);
    let d = m.p("sales/dev");
    std::fs::write(d.join("shared.txt"), "old version\n").unwrap();
    // A reader opened before a rewrite keeps seeing the old version.
    let mut reader = std::fs::File::open(d.join("shared.txt")).unwrap();
    let mut first = [0u8; 4];
    reader.read_exact(&mut first).unwrap();
    std::fs::write(d.join("shared.txt"), "NEW VERSION, LONGER\n").unwrap();
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert_eq!(
        format!("{}{rest}", std::str::from_utf8(&first).unwrap()),
        "old version\n"
    );
    // A file open for writing across a commit made elsewhere is not lost.
    let mut open = std::fs::File::create(d.join("open-across-commit.txt")).unwrap();
    open.write_all(b"before ").unwrap();
    s.ok(&["commit", "sales/dev", "-m", "meanwhile"]);
    open.write_all(b"after\n").unwrap();
    drop(open);
    // Many writers at once.
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    std::fs::write(d.join(format!("t{t}-{i}.txt")), format!("{t} {i}\n")).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    s.ok(&["commit", "sales/dev", "-m", "all"]);
    assert_eq!(
        s.ok(&["cat", "sales/dev/open-across-commit.txt"]),
        "before after\n"
    );
    assert_eq!(
        s.ok(&["cat", "sales/dev/shared.txt"]),
        "NEW VERSION, LONGER\n"
    );
    let ls = s.json(&["ls", "sales/dev"]);
    let n = ls
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"].as_str().unwrap().starts_with('t'))
        .count();
    assert_eq!(n, 100);
}

/// A tiny deterministic generator, so a failing sequence can be replayed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Open for writing, creating it if missing, keeping what is there.
fn open_to_write(p: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
}

/// Apply one random operation to both roots; the outcome (success or the
/// errno) must match too.
fn random_op(rng: &mut Rng, roots: [&Path; 2], log: &mut Vec<String>) {
    const DIRS: [&str; 4] = ["", "d1", "d1/d2", "d3"];
    const NAMES: [&str; 5] = ["a", "b", "c.txt", "d1", "d3"];
    let dir = DIRS[rng.pick(DIRS.len())];
    let name = NAMES[rng.pick(NAMES.len())];
    let rel = if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    };
    let other = {
        let d2 = DIRS[rng.pick(DIRS.len())];
        let n2 = NAMES[rng.pick(NAMES.len())];
        if d2.is_empty() {
            n2.to_string()
        } else {
            format!("{d2}/{n2}")
        }
    };
    let data: Vec<u8> = (0..rng.pick(6000))
        .map(|i| (i % 251) as u8 ^ (rng.0 as u8))
        .collect();
    let offset = rng.pick(8000) as u64;
    let len = rng.pick(9000) as u64;
    let mode = [0o644, 0o600, 0o755][rng.pick(3)];
    let kind = rng.pick(17);
    let mut results = Vec::new();
    for root in roots {
        let p = root.join(&rel);
        let q = root.join(&other);
        // What an op read, as a digest (0: it reads nothing).
        let mut read = 0u64;
        let r: std::io::Result<()> = match kind {
            0 | 1 => std::fs::write(&p, &data),
            2 => std::fs::OpenOptions::new()
                .append(true)
                .open(&p)
                .and_then(|mut f| f.write_all(&data)),
            3 => std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .and_then(|mut f| {
                    f.seek(SeekFrom::Start(offset))?;
                    f.write_all(&data[..data.len().min(100)])
                }),
            4 => std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .and_then(|f| f.set_len(len)),
            5 => std::fs::create_dir(&p),
            6 => std::fs::remove_file(&p),
            7 => std::fs::remove_dir(&p),
            8 => std::fs::rename(&p, &q),
            9 => std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)),
            10 => std::os::unix::fs::symlink(&other, &p),
            // Two handles on one file, writing in turn and closed in turn.
            14 => open_to_write(&p).and_then(|mut f1| {
                let mut f2 = open_to_write(&p)?;
                let cut = data.len() / 2;
                f1.write_all(&data[..cut])?;
                f2.seek(SeekFrom::Start(offset / 4))?;
                f2.write_all(&data[cut..])?;
                drop(f1);
                f2.write_all(b"tail")
            }),
            // A file open for reading keeps what it had when opened while
            // the path is unlinked or replaced.
            15 => std::fs::File::open(&p).and_then(|mut f| {
                if len.is_multiple_of(2) {
                    std::fs::remove_file(&p)?;
                } else {
                    // Replaced whole (a write in place shows a reader on
                    // the mount the old version or the new, where a local
                    // file shows the new one).
                    let new = root.join(format!("{rel}.new"));
                    std::fs::write(&new, &data)?;
                    std::fs::rename(&new, &p)?;
                }
                let mut got = Vec::new();
                f.read_to_end(&mut got)?;
                read = got
                    .iter()
                    .fold(got.len() as u64, |h, &b| h.wrapping_mul(31) ^ b as u64);
                Ok(())
            }),
            // fsync in the middle of writing.
            16 => open_to_write(&p).and_then(|mut f| {
                f.write_all(&data[..data.len().min(1000)])?;
                f.sync_all()?;
                f.write_all(&data[data.len().min(1000)..])?;
                f.sync_data()
            }),
            // A file held open while it (or its directory) is renamed or
            // unlinked: the writes after follow the open file, not the path.
            _ => {
                let moved = if kind == 13 && !dir.is_empty() {
                    root.join(dir)
                } else {
                    p.clone()
                };
                open_to_write(&p).and_then(|mut f| {
                    f.write_all(&data[..data.len().min(3000)])?;
                    if kind == 12 {
                        std::fs::remove_file(&moved)?;
                    } else {
                        std::fs::rename(&moved, &q)?;
                    }
                    f.write_all(&data[data.len().min(3000)..])
                })
            }
        };
        results.push(r.map(|()| read).map_err(|e| e.raw_os_error()));
    }
    log.push(format!("op {kind} {rel} {other} -> {:?}", results));
    assert_eq!(
        results[0],
        results[1],
        "outcomes differ; ops so far:\n{}",
        log.join("\n")
    );
}

/// `snapshot` of a directory of files only, which may change while it is
/// read (a view catching up: a file listed, then gone): `None` then. A
/// missing directory is an empty one (the CLI may leave an emptied one).
fn flat_snapshot(dir: &Path) -> Option<Vec<(String, usize, String, u32)>> {
    if !dir.exists() {
        return Some(Vec::new());
    }
    let mut names = std::fs::read_dir(dir)
        .ok()?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<Vec<_>>>()
        .ok()?;
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let p = dir.join(&name);
        let data = std::fs::read(&p).ok()?;
        let mode = std::fs::metadata(&p).ok()?.permissions().mode() & 0o777;
        let hash = blake3::hash(&data).to_hex()[..12].to_string();
        out.push((name.to_string_lossy().into_owned(), data.len(), hash, mode));
    }
    Some(out)
}

/// The seeds of the random-operation tests: `default`, or TARN_FS_SEEDS
/// (e.g. 1,2,3) to replay a failure or widen the search.
fn fs_seeds(default: &[u64]) -> Vec<u64> {
    match std::env::var("TARN_FS_SEEDS") {
        Ok(v) => v
            .split(',')
            .map(|x| x.trim().parse().expect("seed"))
            .collect(),
        Err(_) => default.to_vec(),
    }
}

/// Seeds take turns on these: the io_uring queues where the kernel offers
/// them, /dev/fuse alone, and the write-back journal.
const TRANSPORTS: [&[&str]; 3] = [&[], &["--no-io-uring"], &["--writeback"]];

/// Each path under `root` with its mode and its content's length and
/// hash (short enough to read in a failure's message).
fn snapshot(root: &Path) -> Vec<(String, usize, String, u32)> {
    let mut out = Vec::new();
    for (p, data) in tree_files(root) {
        let full = root.join(p.trim_end_matches('/'));
        let meta = std::fs::symlink_metadata(&full).unwrap();
        let mode = if meta.is_file() {
            meta.permissions().mode() & 0o777
        } else {
            0
        };
        let hash = blake3::hash(&data).to_hex()[..12].to_string();
        out.push((p, data.len(), hash, mode));
    }
    out
}

#[test]
fn random_file_operations_match_a_plain_directory() {
    if !fuse_available() {
        return;
    }
    let seeds = fs_seeds(&[7, 1234, 33, 99_999]);
    // TARN_FS_CHECK_EACH=1 compares the trees after every op (to find
    // the first that goes wrong).
    let each = std::env::var("TARN_FS_CHECK_EACH").is_ok();
    for (n, seed) in seeds.into_iter().enumerate() {
        let transport = TRANSPORTS[n % 3];
        let s = branch_setup();
        let model = s.path("model");
        std::fs::create_dir_all(&model).unwrap();
        let mut rng = Rng(seed);
        let mut log = vec![format!("seed {seed} {transport:?}")];
        let mut m = Mount::new(&s, "mnt", transport);
        for root in [model.clone(), m.p("sales/dev")] {
            std::fs::create_dir_all(root.join("d1/d2")).unwrap();
            std::fs::create_dir_all(root.join("d3")).unwrap();
        }
        for step in 0..200 {
            let branch = m.p("sales/dev");
            random_op(&mut rng, [&model, &branch], &mut log);
            if each {
                assert_eq!(
                    snapshot(&model),
                    snapshot(&branch),
                    "ops:\n{}",
                    log.join("\n")
                );
            }
            if step % 25 == 12 && drop_kernel_inodes() {
                // The daemon forgets every inode the kernel lets go of;
                // what it shows next must not change.
                log.push("drop the kernel's inodes".into());
            }
            if step % 40 == 39 {
                let _ = std::fs::write(branch.join(".tarn/ctl"), format!("commit -m step{step}\n"));
                log.push("commit".into());
            }
            if step % 70 == 69 {
                // Every other time the daemon is killed (-9) instead:
                // every close returned, so nothing may be missing.
                let kill = step % 140 == 139;
                if kill {
                    m.child.kill().unwrap();
                    m.child.wait().unwrap();
                }
                drop(m);
                m = Mount::new(&s, "mnt", transport);
                log.push(if kill { "kill -9, remount" } else { "remount" }.into());
            }
        }
        let branch = m.p("sales/dev");
        let succeeded = log
            .iter()
            .filter(|l| l.contains("-> [Ok(") && !l.contains("Err("))
            .count();
        // The default seeds must each prove something; a seed from
        // TARN_FS_SEEDS that proves little is told of and passed over.
        if std::env::var("TARN_FS_SEEDS").is_ok() && succeeded < 15 {
            eprintln!("seed {seed}: only {succeeded} ops succeeded");
        } else {
            assert!(
                succeeded >= 15,
                "only {succeeded} ops succeeded: the test would prove little"
            );
        }
        assert_eq!(
            snapshot(&model),
            snapshot(&branch),
            "ops:\n{}",
            log.join("\n")
        );
        // And what is committed is exactly what the mount showed.
        let _ = std::fs::write(branch.join(".tarn/ctl"), "commit -m final\n");
        drop(m);
        let out = s.path("out");
        s.ok(&["get", "sales/dev", out.to_str().unwrap()]);
        assert_eq!(
            snapshot(&model),
            snapshot(&out),
            "committed tree; ops:\n{}",
            log.join("\n")
        );
    }
}

/// Writers at once, each making random changes in a directory of its own
/// while commits come through the control file, and the CLI puts, removes
/// and commits files in a directory of its own: each directory must end
/// as its own plain-directory model did (the mount showing what the CLI
/// did once its metadata TTL has passed), and the commit must hold it.
#[test]
fn concurrent_random_operations_each_match_their_own_plain_directory() {
    if !fuse_available() {
        return;
    }
    const WRITERS: usize = 3;
    let each = std::env::var("TARN_FS_CHECK_EACH").is_ok();
    // 1399 (no io_uring) and 1170 (write-back) each failed on every run
    // before the fixes they found: a replaced directory's inode moving
    // with its replacement, a lookup answering a file's older size while
    // it was being written.
    for (n, seed) in fs_seeds(&[1, 96, 5, 124, 7, 1399, 1170])
        .into_iter()
        .enumerate()
    {
        let transport = TRANSPORTS[(n + 2) % 3];
        let s = branch_setup();
        let m = Mount::new(&s, "mnt", transport);
        let branch = m.p("sales/dev");
        let roots: Vec<(std::path::PathBuf, std::path::PathBuf)> = (0..WRITERS)
            .map(|w| {
                let model = s.path(&format!("model{w}"));
                let mine = branch.join(format!("w{w}"));
                for root in [&model, &mine] {
                    std::fs::create_dir_all(root.join("d1/d2")).unwrap();
                    std::fs::create_dir_all(root.join("d3")).unwrap();
                }
                (model, mine)
            })
            .collect();
        let cli_model = s.path("model-cli");
        std::fs::create_dir_all(&cli_model).unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        let logs: Vec<Vec<String>> = std::thread::scope(|sc| {
            sc.spawn(|| {
                let mut k = 0u64;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let name = format!("f{}", k % 5);
                    let at = format!("sales/dev/cli/{name}");
                    if k % 8 == 3 {
                        // The kernel letting go of inodes while writers
                        // look them up (FORGETs racing lookups).
                        drop_kernel_inodes();
                    }
                    match k % 4 {
                        0 => {
                            let _ = ctl(&branch, &format!("commit -m during{k}"));
                        }
                        1 => {
                            let data = pseudo_random(((k * 2741) % 9000) as usize, seed + k);
                            let src = s.write("cli-src", &data);
                            s.ok(&["put", src.to_str().unwrap(), &at]);
                            std::fs::write(cli_model.join(&name), &data).unwrap();
                        }
                        2 if cli_model.join(&name).exists() => {
                            s.ok(&["rm", &at]);
                            std::fs::remove_file(cli_model.join(&name)).unwrap();
                        }
                        _ => {
                            // Nothing to commit is fine.
                            let _ = s.run(&["commit", "sales/dev", "-m", &format!("cli{k}")]);
                        }
                    }
                    k += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
            let writers: Vec<_> = roots
                .iter()
                .enumerate()
                .map(|(w, (model, mine))| {
                    sc.spawn(move || {
                        let mut rng = Rng(seed * 1000 + w as u64 + 1);
                        let mut log = vec![format!("seed {seed} writer {w} {transport:?}")];
                        for _ in 0..300 {
                            random_op(&mut rng, [model, mine], &mut log);
                            if each {
                                let (a, b) = (snapshot(model), snapshot(mine));
                                assert_eq!(a, b, "ops:\n{}", log.join("\n"));
                            }
                        }
                        log
                    })
                })
                .collect();
            let ended: Vec<_> = writers.into_iter().map(|h| h.join()).collect();
            // Before a writer's failure goes on: the committer must stop.
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            ended
                .into_iter()
                .map(|r| r.unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        for ((model, mine), log) in roots.iter().zip(&logs) {
            assert_eq!(snapshot(model), snapshot(mine), "ops:\n{}", log.join("\n"));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let want = flat_snapshot(&cli_model);
        while flat_snapshot(&branch.join("cli")) != want {
            assert!(
                std::time::Instant::now() < deadline,
                "the mount does not show what the CLI did: {:?} != {:?}",
                want,
                flat_snapshot(&branch.join("cli"))
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Nothing left to commit (ENODATA) is fine: the last commit during
        // took it all.
        if let Err(e) = ctl(&branch, "commit -m final") {
            assert_eq!(e.raw_os_error(), Some(libc::ENODATA), "{e}");
        }
        drop(m);
        let out = s.path("out");
        s.ok(&["get", "sales/dev", out.to_str().unwrap()]);
        for (w, ((model, _), log)) in roots.iter().zip(&logs).enumerate() {
            assert_eq!(
                snapshot(model),
                snapshot(&out.join(format!("w{w}"))),
                "committed; ops:\n{}",
                log.join("\n")
            );
        }
        assert_eq!(want, flat_snapshot(&out.join("cli")), "committed");
    }
}

#[test]
fn writeback_closes_journal_then_upload_and_commits_wait_for_them() {
    if !fuse_available() {
        return;
    }
    let s = branch_setup();
    // Mount::new gives the mount the cache dir <name>-cache.
    let cache = s.path("mnt-cache");
    let m = Mount::new(&s, "mnt", &["--writeback"]);
    let d = m.p("sales/dev");
    let big = pseudo_random(3_000_000, 21);
    std::fs::write(d.join("big.bin"), &big).unwrap();
    for i in 0..50 {
        std::fs::write(d.join(format!("f{i}.txt")), format!("{i}\n")).unwrap();
    }
    std::fs::rename(d.join("f0.txt"), d.join("renamed.txt")).unwrap();
    // Read back at once, through the mount.
    assert_eq!(std::fs::read(d.join("big.bin")).unwrap(), big);
    assert_eq!(
        std::fs::read_to_string(d.join("renamed.txt")).unwrap(),
        "0\n"
    );
    // `sync` waits for the uploads; then the CLI sees everything, in order.
    ctl(&d, "sync").unwrap();
    let staged = s.staged("sales/dev");
    assert!(staged.contains(&"renamed.txt".to_string()) && !staged.contains(&"f0.txt".to_string()));
    assert_eq!(staged.len(), 51);
    // A commit through the control file includes every closed file.
    std::fs::write(d.join("last.txt"), "last\n").unwrap();
    ctl(&d, "commit -m writeback").unwrap();
    assert!(s.staged("sales/dev").is_empty());
    assert_eq!(s.ok(&["cat", "sales/dev/last.txt"]), "last\n");
    assert_eq!(s.got("sales/dev/big.bin"), big);
    // Once uploaded, the journal's log keeps only the segment closes go
    // on appending to (and the next one, made ahead, not yet numbered).
    wait_until("a journal of one segment", Duration::from_secs(10), || {
        let names: Vec<String> = std::fs::read_dir(cache.join("journal/log"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != "next")
            .collect();
        names.len() <= 1
    });
    // A CLI commit asks the mounts on this machine to finish uploading first.
    for i in 0..100 {
        std::fs::write(d.join(format!("cli-{i}.txt")), "x").unwrap();
    }
    s.ok(&["commit", "sales/dev", "-m", "from the CLI"]);
    assert_eq!(s.ok(&["cat", "sales/dev/cli-99.txt"]), "x");
    assert!(s.staged("sales/dev").is_empty());
    assert_eq!(s.json(&["fsck"])["problems"], serde_json::json!([]));
}

#[test]
fn writeback_survives_kill_9_and_is_replayed_by_the_next_daemon() {
    if !fuse_available() {
        return;
    }
    let s = branch_setup();
    let cache = s.path("mnt-cache");
    let mut m = Mount::new(&s, "mnt", &["--writeback"]);
    let d = m.p("sales/dev");
    for i in 0..300 {
        std::fs::write(d.join(format!("f{i}.txt")), format!("{i}\n")).unwrap();
    }
    m.child.kill().unwrap(); // SIGKILL, uploads possibly still pending
    m.child.wait().unwrap();
    drop(m);
    let left = std::fs::read_dir(cache.join("journal/log"))
        .unwrap()
        .count();
    eprintln!("journal log segments left at kill: {left}");
    // The next daemon on that cache uploads what was left before serving.
    let m = Mount::new(&s, "mnt", &[]);
    assert_eq!(
        std::fs::read_dir(cache.join("journal/log"))
            .unwrap()
            .count(),
        0
    );
    let staged = s.staged("sales/dev");
    assert_eq!(staged.len(), 300, "every acknowledged close is staged");
    assert_eq!(
        std::fs::read_to_string(m.p("sales/dev/f299.txt")).unwrap(),
        "299\n"
    );
}

#[test]
fn writeback_files_still_open_at_kill_9_come_back_as_far_as_written() {
    if !fuse_available() {
        return;
    }
    let s = branch_setup();
    let mut m = Mount::new(&s, "mnt", &["--writeback"]);
    let d = m.p("sales/dev");
    // New files, held open while the daemon dies: every write and chmod
    // that returned is there after, with no close to stage them.
    let small = pseudo_random(10_000, 1);
    let big = pseudo_random(3 << 20, 2); // past the memory spool
    let mut f = std::fs::File::create(d.join("open.bin")).unwrap();
    f.write_all(&small).unwrap();
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .unwrap();
    std::fs::create_dir(d.join("dir")).unwrap();
    let mut g = std::fs::File::create(d.join("dir/big.bin")).unwrap();
    g.write_all(&big).unwrap();
    std::fs::rename(d.join("dir"), d.join("moved")).unwrap();
    g.write_all(b"tail").unwrap();
    // Made, written and removed while open: not there after.
    let mut h = std::fs::File::create(d.join("gone.txt")).unwrap();
    h.write_all(b"x").unwrap();
    std::fs::remove_file(d.join("gone.txt")).unwrap();
    m.child.kill().unwrap();
    m.child.wait().unwrap();
    drop((f, g, h));
    drop(m);
    let m = Mount::new(&s, "mnt", &[]);
    let d = m.p("sales/dev");
    assert_eq!(std::fs::read(d.join("open.bin")).unwrap(), small);
    let mode = std::fs::metadata(d.join("open.bin"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let mut whole = big.clone();
    whole.extend_from_slice(b"tail");
    assert_eq!(std::fs::read(d.join("moved/big.bin")).unwrap(), whole);
    assert!(!d.join("gone.txt").exists());
    assert!(!d.join("dir").exists());
    ctl(&d, "commit -m after").unwrap();
    assert_eq!(s.got("sales/dev/moved/big.bin"), whole);
    assert_eq!(s.json(&["fsck"])["problems"], serde_json::json!([]));
}

#[test]
fn closes_from_other_processes_mid_write_never_win_over_the_last() {
    if !fuse_available() {
        return;
    }
    // Every process this one starts while a file is open for writing gets
    // the descriptor and closes it at exec (close-on-exec): each such close
    // is a FLUSH of the file in the middle of its writing. What the file
    // holds once its own close returns must be all of it, in the mount and
    // in the commit, however those earlier stages interleave.
    let s = branch_setup();
    let m = Mount::new(&s, "mnt", &[]);
    let d = m.p("sales/dev");
    let piece = |k: usize| pseudo_random(64 << 10, 100 + k as u64);
    let mut whole = Vec::new();
    {
        let mut f = std::fs::File::create(d.join("w.bin")).unwrap();
        for k in 0..24 {
            f.write_all(&piece(k)).unwrap();
            whole.extend(piece(k));
            std::thread::scope(|sc| {
                for _ in 0..2 {
                    sc.spawn(|| std::process::Command::new("true").status().unwrap());
                }
            });
        }
    }
    assert_eq!(std::fs::read(d.join("w.bin")).unwrap(), whole);
    ctl(&d, "commit -m w").unwrap();
    assert_eq!(s.got("sales/dev/w.bin"), whole);
}
