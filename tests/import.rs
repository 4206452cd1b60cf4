//! Zero-copy import, grafts across repositories, and export, through the
//! real binary (and a real mount for reading imported objects in place).

mod common;
use common::*;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Everything `ls -lR` and `md5sum` would tell about a tree: the source
/// must look exactly the same after an import.
fn fingerprint(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for (rel, data) in tree_files(root) {
        let meta = std::fs::symlink_metadata(root.join(rel.trim_end_matches('/'))).unwrap();
        out.push(format!(
            "{rel} {} {} {} {:o} {}",
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.mode(),
            blake3::hash(&data).to_hex()
        ));
    }
    out
}

fn legacy_source(s: &Scratch) -> std::path::PathBuf {
    let src = s.path("legacy");
    for i in 0..30 {
        s.write(
            &format!("legacy/2023/q{}/part-{i}.csv", i % 3),
            format!("row,{i}\n").as_bytes(),
        );
    }
    s.write("legacy/2023/big.bin", &pseudo_random(9_000_000, 3));
    std::os::unix::fs::symlink("big.bin", src.join("2023/link")).unwrap();
    src
}

fn set_tree_mode(root: &Path, writable: bool) {
    for (rel, _) in tree_files(root) {
        let p = root.join(rel.trim_end_matches('/'));
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.mode() & 0o7777;
        let mode = if writable {
            mode | 0o200
        } else {
            mode & !0o222
        };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

fn url_of(p: &Path) -> String {
    format!("file://{}/", p.display())
}

#[test]
fn import_reads_in_place_and_never_touches_the_source() {
    let s = Scratch::new();
    s.ok(&["repo", "create", "sales"]);
    let src = legacy_source(&s);
    set_tree_mode(&src, false);
    let before = fingerprint(&src);

    // Dry run: lists, stages nothing.
    let dry = s.ok(&[
        "import",
        &url_of(&src.join("2023")),
        "sales/main/raw/2023",
        "--dry-run",
    ]);
    assert!(
        dry.contains("q1/part-1.csv") && dry.contains("would import 31 objects"),
        "{dry}"
    );
    assert!(s.staged("sales/main").is_empty());

    let v = s.json(&[
        "import",
        &url_of(&src.join("2023")),
        "sales/main/raw/2023",
        "-m",
        "onboard 2023",
    ]);
    assert_eq!(v["objects"], 31, "symlinks are not objects: {v}");
    assert_eq!(
        v["bytes"],
        9_000_000 + (0..30).map(|i| format!("row,{i}\n").len()).sum::<usize>()
    );
    assert_eq!(v["ops"], 1, "a new destination is one staged op");
    assert_eq!(
        s.messages(&["log", "sales/main", "-n", "1"]),
        ["onboard 2023"]
    );
    let show = s.json(&["show", "sales/main"]);
    assert_eq!(show["commit"]["meta"]["import"], url_of(&src.join("2023")));

    // Same bytes, read from the source; no content went into the lake.
    assert_eq!(
        s.ok(&["cat", "sales/main/raw/2023/q1/part-4.csv"]),
        "row,4\n"
    );
    assert_eq!(
        s.got("sales/main/raw/2023/big.bin"),
        pseudo_random(9_000_000, 3)
    );
    let chunks = s.dir.path().join("lake/chunks");
    assert!(!chunks.exists() || tree_files(&chunks).iter().all(|(p, _)| p.ends_with('/')));
    assert_eq!(fingerprint(&src), before, "the source changed");

    // Stage only, into a directory that has entries: the import adds to it.
    s.write("extra/new.csv", b"new\n");
    s.write("extra/q1/part-1.csv", b"replaced\n");
    s.ok(&[
        "import",
        &url_of(&s.path("extra")),
        "sales/main/raw/2023",
        "--no-commit",
    ]);
    let mut staged = s.staged("sales/main");
    staged.sort();
    assert_eq!(staged, ["raw/2023/new.csv", "raw/2023/q1/part-1.csv"]);
    assert_eq!(
        s.ok(&["cat", "sales/main/raw/2023/q1/part-1.csv"]),
        "replaced\n"
    );
    assert_eq!(
        s.ok(&["cat", "sales/main/raw/2023/q2/part-2.csv"]),
        "row,2\n"
    );

    // Bad sources: one clear error, nothing staged.
    s.ok(&["reset", "sales/main"]);
    s.fails(&["import", "file:///nonexistent/dir/", "sales/main/x"]);
    s.fails(&["import", "ftp://host/x/", "sales/main/x"]);
    s.fails(&["import", &url_of(&src.join("2023/big.bin")), "sales/main/x"]);
    s.fails(&["import", &url_of(&src), "sales/v1/x"]);
    assert!(s.staged("sales/main").is_empty());
    assert_eq!(fingerprint(&src), before);
    set_tree_mode(&src, true);
}

#[test]
fn changed_source_objects_fail_instead_of_serving_other_bytes() {
    let s = Scratch::new();
    s.ok(&["repo", "create", "r"]);
    let src = legacy_source(&s);
    s.ok(&["import", &url_of(&src), "r/main/in", "-m", "in"]);
    std::fs::write(src.join("2023/q0/part-0.csv"), "row,CHANGED\n").unwrap();
    let err = s.fails(&["cat", "r/main/in/2023/q0/part-0.csv"]);
    assert!(err.contains("changed since it was imported"), "{err}");
    std::fs::remove_file(src.join("2023/q1/part-1.csv")).unwrap();
    let err = s.fails(&["cat", "r/main/in/2023/q1/part-1.csv"]);
    assert!(err.contains("gone"), "{err}");
    // Importing again picks up the new version.
    s.ok(&["import", &url_of(&src), "r/main/in", "-m", "again"]);
    assert_eq!(
        s.ok(&["cat", "r/main/in/2023/q0/part-0.csv"]),
        "row,CHANGED\n"
    );
}

#[test]
fn grafts_are_one_op_and_record_lineage() {
    let s = Scratch::new();
    s.ok(&["repo", "create", "sales"]);
    s.ok(&["repo", "create", "marketing"]);
    let src = legacy_source(&s);
    s.ok(&["import", &url_of(&src), "sales/main/raw", "-m", "onboard"]);
    s.ok(&["tag", "create", "sales/v7", "main"]);
    let v7 = s.head("sales/v7");
    let v = s.json(&[
        "import",
        "tarn://sales/v7/raw/2023",
        "marketing/main/inputs/sales",
        "--no-commit",
    ]);
    assert_eq!(v["from_commit"], v7);
    // One staged op, whatever the tree holds (status lists its paths).
    assert_eq!(s.staged("marketing/main").len(), 31);
    s.ok(&["commit", "marketing/main", "-m", "consume sales v7"]);
    assert_eq!(
        s.ok(&["cat", "marketing/main/inputs/sales/q2/part-2.csv"]),
        "row,2\n"
    );
    let show = s.json(&["show", "marketing/main"]);
    assert_eq!(
        show["commit"]["meta"]["graft:inputs/sales"],
        format!("sales/{v7}/raw/2023")
    );
    let text = s.ok(&["log", "marketing/main", "-n", "1"]);
    assert!(
        text.contains(&format!("graft:inputs/sales=sales/{v7}/raw/2023")),
        "{text}"
    );
    // The source repository moving on does not change the graft.
    s.write("more.csv", b"more\n");
    s.ok(&[
        "put",
        s.path("more.csv").to_str().unwrap(),
        "sales/main/raw/2023/more.csv",
    ]);
    s.ok(&["commit", "sales/main", "-m", "more"]);
    s.fails(&["cat", "marketing/main/inputs/sales/more.csv"]);
    // Bad grafts change nothing.
    s.fails(&["import", "tarn://sales/v7/nosuch", "marketing/main/x"]);
    s.fails(&["import", "tarn://nosuchrepo/main/x", "marketing/main/x"]);
    s.fails(&[
        "import",
        "tarn://sales/v7/raw/2023/big.bin",
        "marketing/main",
    ]);
    s.ok(&["branch", "protect", "marketing/main"]);
    s.fails_with(5, &["import", "tarn://sales/v7/raw", "marketing/main/y"]);
    assert!(s.staged("marketing/main").is_empty());
}

#[test]
fn export_copies_plain_files_out_and_resumes() {
    let s = Scratch::new();
    s.ok(&["repo", "create", "r"]);
    s.write("data/a/x.csv", b"x\n");
    s.write("data/b.bin", &pseudo_random(3_000_000, 9));
    std::os::unix::fs::symlink("b.bin", s.path("data/link")).unwrap();
    s.ok(&["put", s.path("data").to_str().unwrap(), "r/main/d"]);
    let src = legacy_source(&s);
    s.ok(&[
        "import",
        &url_of(&src.join("2023/q1")),
        "r/main/d/imported",
        "--no-commit",
    ]);
    s.ok(&["commit", "r/main", "-m", "data"]);
    let out = s.path("out");
    let v = s.json(&["export", "r/main/d", &format!("file://{}/", out.display())]);
    assert_eq!(v["files"], 2 + 10);
    assert_eq!(
        std::fs::read(out.join("b.bin")).unwrap(),
        pseudo_random(3_000_000, 9)
    );
    assert_eq!(
        std::fs::read_to_string(out.join("imported/part-1.csv")).unwrap(),
        "row,1\n"
    );
    assert_eq!(
        std::fs::read_link(out.join("link")).unwrap(),
        Path::new("b.bin")
    );
    // Run again: nothing to do; a changed file is written again.
    let v = s.json(&["export", "r/main/d", &format!("file://{}/", out.display())]);
    assert_eq!(
        (v["files"].as_u64(), v["unchanged"].as_u64()),
        (Some(0), Some(12))
    );
    std::fs::write(out.join("a/x.csv"), "tampered, longer\n").unwrap();
    let v = s.json(&["export", "r/main/d", &format!("file://{}/", out.display())]);
    assert_eq!(v["files"], 1);
    assert_eq!(std::fs::read_to_string(out.join("a/x.csv")).unwrap(), "x\n");
    s.fails(&[
        "export",
        "r/main/nosuch",
        &format!("file://{}/", out.display()),
    ]);
}

#[test]
fn the_mount_reads_imported_objects_in_place() {
    if !fuse_available() {
        return;
    }
    let s = Scratch::new();
    s.ok(&["repo", "create", "r"]);
    let src = legacy_source(&s);
    s.ok(&["import", &url_of(&src), "r/main/in", "-m", "in"]);
    let m = Mount::new(&s, "mnt", &[]);
    let big = std::fs::read(m.p("r/main/in/2023/big.bin")).unwrap();
    assert_eq!(big, std::fs::read(src.join("2023/big.bin")).unwrap());
    assert_eq!(
        std::fs::metadata(m.p("r/main/in/2023/big.bin"))
            .unwrap()
            .len(),
        9_000_000
    );
    // Random reads inside pieces and across a piece boundary.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(m.p("r/main/in/2023/big.bin")).unwrap();
        let mut buf = vec![0; 100_000];
        f.read_exact_at(&mut buf, (8 << 20) - 50_000).unwrap();
        assert_eq!(buf, big[(8 << 20) - 50_000..(8 << 20) + 50_000]);
    }
    // A source object changed behind the lake's back: EIO, never its new bytes.
    std::fs::write(src.join("2023/q2/part-2.csv"), "row,CHANGED\n").unwrap();
    let err = std::fs::read(m.p("r/main/in/2023/q2/part-2.csv")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    // Writing an imported file makes it a normal file of the branch.
    std::fs::write(m.p("r/main/in/2023/q0/part-3.csv"), "mine\n").unwrap();
    assert_eq!(s.ok(&["cat", "r/main/in/2023/q0/part-3.csv"]), "mine\n");
    assert_eq!(
        std::fs::read_to_string(src.join("2023/q0/part-3.csv")).unwrap(),
        "row,3\n"
    );
}
