//! The read side of the mount, through a real FUSE mount of the real binary.

mod common;
use common::*;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn setup() -> (Scratch, Vec<u8>, String) {
    let s = Scratch::new();
    s.ok(&["repo", "create", "sales"]);
    let big = pseudo_random(9_000_000, 11);
    let f = s.write("big.bin", &big);
    s.ok(&["put", f.to_str().unwrap(), "sales/main/data/big.bin"]);
    let h = s.write("h.txt", b"hello\n");
    s.ok(&["put", h.to_str().unwrap(), "sales/main/h.txt"]);
    std::os::unix::fs::symlink("h.txt", s.path("link")).unwrap();
    s.ok(&["put", s.path("link").to_str().unwrap(), "sales/main/link"]);
    s.ok(&["commit", "sales/main", "-m", "one"]);
    let first = s.head("sales/main");
    s.ok(&["tag", "create", "sales/v1", "main"]);
    let h2 = s.write("h2.txt", b"changed\n");
    s.ok(&["put", h2.to_str().unwrap(), "sales/main/h.txt"]);
    s.ok(&["commit", "sales/main", "-m", "two"]);
    (s, big, first)
}

#[test]
fn whole_lake_mount_reads_repos_branches_and_refs() {
    if !fuse_available() {
        return;
    }
    let (s, big, first) = setup();
    let m = Mount::new(&s, "mnt", &[]);
    {
        // Root raises the kernel's read-ahead for the mount past FUSE's
        // 128 KiB, so a sequential reader keeps several reads in flight
        // (where sysfs is writable: not in every container).
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(&m.dir).unwrap().dev();
        let path = format!(
            "/sys/class/bdi/{}:{}/read_ahead_kb",
            libc::major(dev),
            libc::minor(dev)
        );
        let c_path = std::ffi::CString::new(path.clone()).unwrap();
        // SAFETY: plain syscalls on a NUL-terminated path.
        let can = unsafe { libc::geteuid() == 0 && libc::access(c_path.as_ptr(), libc::W_OK) == 0 };
        if can {
            assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), "4096");
        } else {
            eprintln!("{path} not writable here: read-ahead not checked");
        }
    }
    let names = |p: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&m.dir), ["sales"]);
    assert_eq!(
        names(&m.p("sales")),
        ["main"],
        "tags and commits are not listed"
    );
    assert_eq!(
        names(&m.p("sales/main")),
        ["data", "h.txt", "link"],
        ".tarn is hidden"
    );
    assert_eq!(
        std::fs::read(m.p("sales/main/h.txt")).unwrap(),
        b"changed\n"
    );
    assert_eq!(std::fs::read(m.p("sales/main/data/big.bin")).unwrap(), big);
    let meta = std::fs::metadata(m.p("sales/main/data/big.bin")).unwrap();
    assert_eq!(meta.len(), 9_000_000);
    assert_eq!(meta.blocks(), 9_000_000u64.div_ceil(512));
    assert_eq!(meta.nlink(), 1);
    assert!(std::fs::metadata(m.p("sales/main/data")).unwrap().is_dir());
    assert_eq!(
        std::fs::read_link(m.p("sales/main/link")).unwrap(),
        Path::new("h.txt")
    );
    assert_eq!(std::fs::read(m.p("sales/main/link")).unwrap(), b"changed\n");
    // Inode numbers are stable.
    let ino = std::fs::metadata(m.p("sales/main/h.txt")).unwrap().ino();
    assert_eq!(
        std::fs::metadata(m.p("sales/main/h.txt")).unwrap().ino(),
        ino
    );

    // Refs resolve on lookup: commit prefix, tag, ~N. They are read-only.
    assert_eq!(
        std::fs::read(m.p(&format!("sales/{}/h.txt", &first[..10]))).unwrap(),
        b"hello\n"
    );
    assert_eq!(std::fs::read(m.p("sales/v1/h.txt")).unwrap(), b"hello\n");
    assert_eq!(
        std::fs::read(m.p("sales/main~1/h.txt")).unwrap(),
        b"hello\n"
    );
    let err = std::fs::write(m.p("sales/v1/new.txt"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let err = std::fs::metadata(m.p("sales/nosuchref")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    let err = std::fs::metadata(m.p("nosuchrepo")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));

    // The control directory.
    let head = std::fs::read_to_string(m.p("sales/main/.tarn/head")).unwrap();
    assert_eq!(head.trim(), s.head("sales/main"));
    assert_eq!(
        names(&m.p("sales/main/.tarn")),
        ["ctl", "head", "info", "result", "status"]
    );
    let f = s.write("staged.txt", b"staged");
    s.ok(&["put", f.to_str().unwrap(), "sales/main/staged.txt"]);

    // find sees exactly the files, never the control directory.
    let out = Command::new("find")
        .arg(m.p("sales/v1"))
        .arg("-type")
        .arg("f")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);

    // An open file is a snapshot; the branch picks up new commits within the TTL.
    let mut open = std::fs::File::open(m.p("sales/main/h.txt")).unwrap();
    let h3 = s.write("h3.txt", b"third\n");
    s.ok(&["put", h3.to_str().unwrap(), "sales/main/h.txt"]);
    s.ok(&["commit", "sales/main", "-m", "three"]);
    wait_until("the new commit", Duration::from_secs(5), || {
        std::fs::read(m.p("sales/main/h.txt")).unwrap() == b"third\n"
    });
    let mut old = String::new();
    std::io::Read::read_to_string(&mut open, &mut old).unwrap();
    assert_eq!(
        old, "changed\n",
        "an open file never changes under its reader"
    );
    assert!(
        std::fs::metadata(m.p("sales/main/staged.txt")).is_ok(),
        "staged changes are visible"
    );
    wait_until("status", Duration::from_secs(5), || {
        std::fs::read_to_string(m.p("sales/main/.tarn/status"))
            .unwrap()
            .is_empty()
    });
}

#[test]
fn pinned_mount_large_directory_and_umount() {
    if !fuse_available() {
        return;
    }
    let s = Scratch::new();
    s.ok(&["repo", "create", "r"]);
    let src = s.path("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..3000 {
        std::fs::write(src.join(format!("f{i:05}")), format!("{i}\n")).unwrap();
    }
    s.ok(&["put", src.to_str().unwrap(), "r/main/many"]);
    s.ok(&["commit", "r/main", "-m", "many"]);
    s.ok(&["tag", "create", "r/v1", "main"]);
    let m = Mount::new(&s, "pin", &["--ref", "r/v1"]);
    let mut names: Vec<String> = std::fs::read_dir(m.p("many"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let want: Vec<String> = (0..3000).map(|i| format!("f{i:05}")).collect();
    assert_eq!(names, want);
    assert_eq!(
        std::fs::read_to_string(m.p("many/f02999")).unwrap(),
        "2999\n"
    );
    let err = std::fs::create_dir(m.p("x")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    s.ok(&["umount", m.dir.to_str().unwrap()]);
    assert!(!mounted(&m.dir));
}

#[test]
fn chunk_cache_survives_remount_and_corruption_is_eio() {
    if !fuse_available() {
        return;
    }
    let (s, big, _) = setup();
    {
        let mut m = Mount::new(&s, "c", &["--ref", "sales/v1"]);
        assert_eq!(std::fs::read(m.p("data/big.bin")).unwrap(), big);
        // Read whole, the multi-chunk file is copied whole into the cache
        // (on a local lake, after the read; a mount ending lets it finish).
        s.ok(&["umount", m.dir.to_str().unwrap()]);
        assert!(m.child.wait().unwrap().success());
    }
    assert!(
        std::fs::read_dir(s.path("c-cache/chunks"))
            .unwrap()
            .next()
            .is_none(),
        "a local lake's chunks are not copied into the cache"
    );
    let whole: Vec<_> = std::fs::read_dir(s.path("c-cache/files"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(whole.len(), 1, "{whole:?}");
    assert_eq!(std::fs::read(&whole[0]).unwrap(), big);
    // Corrupt every chunk in the store: the warm cache still serves verified bytes.
    let lake = s.path("lake/chunks");
    let mut chunk_files = Vec::new();
    for shard in std::fs::read_dir(&lake).unwrap() {
        for f in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            chunk_files.push(f.unwrap().path());
        }
    }
    assert!(!chunk_files.is_empty());
    for f in &chunk_files {
        std::fs::write(f, b"corrupt").unwrap();
    }
    {
        let m = Mount::new(&s, "c", &["--ref", "sales/v1"]);
        assert_eq!(
            std::fs::read(m.p("data/big.bin")).unwrap(),
            big,
            "served from the chunk cache"
        );
    }
    // A corrupt whole-file copy is never served: it is checked against the
    // file's chunks when a new daemon first uses it, then dropped.
    let mut bad = big.clone();
    bad[7_500_000] ^= 1;
    std::fs::write(&whole[0], &bad).unwrap();
    {
        let m = Mount::new(&s, "c", &["--ref", "sales/v1"]);
        let err = std::fs::read(m.p("data/big.bin")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
    }
    assert!(!whole[0].exists(), "the corrupt copy was dropped");
    // A cold cache over corrupt chunks: EIO, never wrong bytes.
    let m = Mount::new(&s, "cold", &["--ref", "sales/v1"]);
    let err = std::fs::read(m.p("data/big.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
}

#[test]
fn a_relative_cache_dir_is_taken_from_where_tarn_was_run() {
    if !fuse_available() {
        return;
    }
    let s = Scratch::new();
    s.ok(&["repo", "create", "r"]);
    let dir = s.path("rel");
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = s.cmd(&[
        "mount",
        dir.to_str().unwrap(),
        "--cache-dir",
        "relative-cache",
    ]);
    cmd.current_dir(s.dir.path());
    // (Fails with the daemon's message if it exits instead of mounting.)
    let m = Mount::start(dir, cmd);
    std::fs::write(m.p("r/main/f"), b"x").unwrap();
    assert!(s.path("relative-cache/journal").is_dir());
}

#[test]
fn sigterm_unmounts_cleanly() {
    if !fuse_available() {
        return;
    }
    let s = Scratch::new();
    s.ok(&["repo", "create", "r"]);
    let mut m = Mount::new(&s, "sig", &[]);
    // SAFETY: sending SIGTERM to our own child process.
    unsafe { libc::kill(m.child.id() as i32, libc::SIGTERM) };
    let status = m.child.wait().unwrap();
    assert!(status.success(), "daemon exits cleanly: {status}");
    assert!(!mounted(&m.dir));
}

#[test]
fn fstab_helper_mounts_in_the_background() {
    if !fuse_available() {
        return;
    }
    let (s, _, _) = setup();
    let dir = s.path("fstab");
    std::fs::create_dir_all(&dir).unwrap();
    let cache = s.path("fstab-cache");
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/mount.tarn");
    let out = Command::new(helper)
        .arg(&s.lake)
        .arg(&dir)
        .arg("-o")
        .arg(format!(
            "rw,_netdev,ro,ref=sales/v1,cache_dir={}",
            cache.display()
        ))
        .env("TARN", TARN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(mounted(&dir), "the helper returns once mounted");
    let content = std::fs::read(dir.join("h.txt"));
    let _ = s.run(&["umount", dir.to_str().unwrap()]);
    assert_eq!(content.unwrap(), b"hello\n");
    wait_until("the daemon to unmount", Duration::from_secs(5), || {
        !mounted(&dir)
    });
}
