//! The core workflow through the real `tarn` binary on a local-directory lake.

mod common;
use common::*;

#[test]
fn quickstart_workflow() {
    let s = Scratch::new();
    s.ok(&["repo", "create", "sales"]);
    assert!(s.ok(&["repo", "list"]).lines().any(|l| l == "sales"));
    let csv = s.write("daily.csv", b"day,amount\nmon,10\n");
    s.ok(&["put", csv.to_str().unwrap(), "sales/main/raw/daily.csv"]);
    let st = s.json(&["status", "sales/main"]);
    assert_eq!(st["changes"][0]["path"], "raw/daily.csv");
    assert_eq!(st["changes"][0]["kind"], "added");
    s.ok(&[
        "commit",
        "sales/main",
        "-m",
        "first load",
        "--meta",
        "source=crm",
    ]);
    let log = s.json(&["log", "sales/main"]);
    assert_eq!(log[0]["message"], "first load");
    assert_eq!(log[0]["meta"]["source"], "crm");
    assert_eq!(log[0]["author"], "tester");
    assert_eq!(log.as_array().unwrap().len(), 2, "plus the initial commit");
    assert!(s.staged("sales/main").is_empty());
    assert_eq!(
        s.ok(&["cat", "sales/main/raw/daily.csv"]),
        "day,amount\nmon,10\n"
    );

    // Branches are O(1) and independent.
    s.ok(&["branch", "create", "sales/dev", "--from", "main"]);
    assert!(s.ok(&["branch", "list", "sales"]).contains("dev"));
    assert!(s.ok(&["ls", "sales/dev/raw/"]).contains("daily.csv"));
    s.ok(&["rm", "sales/dev/raw/daily.csv"]);
    s.fails(&["cat", "sales/dev/raw/daily.csv"]);
    assert_eq!(
        s.ok(&["cat", "sales/main/raw/daily.csv"]),
        "day,amount\nmon,10\n"
    );
    s.ok(&["reset", "sales/dev"]);
    assert_eq!(
        s.ok(&["cat", "sales/dev/raw/daily.csv"]),
        "day,amount\nmon,10\n"
    );

    // Second commit; time travel by ~N, tag and commit prefix.
    let csv = s.write("daily.csv", b"day,amount\nmon,10\ntue,12\n");
    s.ok(&["put", csv.to_str().unwrap(), "sales/main/raw/daily.csv"]);
    s.ok(&["commit", "sales/main", "-m", "second load"]);
    assert_eq!(
        s.ok(&["cat", "sales/main~1/raw/daily.csv"]),
        "day,amount\nmon,10\n"
    );
    assert_eq!(
        s.ok(&["cat", "sales/main^/raw/daily.csv"]),
        "day,amount\nmon,10\n"
    );
    s.ok(&["tag", "create", "sales/v1", "main"]);
    assert!(s.ok(&["cat", "sales/v1/raw/daily.csv"]).contains("tue"));
    s.fails(&["tag", "create", "sales/v1", "main"]);
    let id = s.head("sales/main");
    assert!(s
        .ok(&["cat", &format!("sales/{}/raw/daily.csv", &id[..8])])
        .contains("tue"));
    let show = s.json(&["show", "sales/main~1"]);
    assert_eq!(show["commit"]["message"], "first load");
    assert_eq!(show["changes"][0]["path"], "raw/daily.csv");
    assert_eq!(show["commit"]["parents"].as_array().unwrap().len(), 1);

    // The tag is immutable even as the branch moves.
    let csv = s.write("daily.csv", b"changed\n");
    s.ok(&["put", csv.to_str().unwrap(), "sales/main/raw/daily.csv"]);
    s.ok(&["commit", "sales/main", "-m", "third"]);
    assert!(s.ok(&["cat", "sales/v1/raw/daily.csv"]).contains("tue"));
    // Pinned refs are read-only.
    s.fails(&["put", csv.to_str().unwrap(), "sales/v1/x"]);
    s.fails(&["commit", "sales/main~1", "-m", "x"]);

    s.ok(&["branch", "delete", "sales/dev"]);
    s.fails(&["cat", "sales/dev/raw/daily.csv"]);
    s.fails(&["branch", "delete", "sales/main"]);
    s.ok(&["tag", "delete", "sales/v1"]);
    s.ok(&["repo", "delete", "sales"]);
    assert!(!s.ok(&["repo", "list"]).contains("sales"));
}

#[test]
fn directories_round_trip_with_large_files_modes_and_symlinks() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new();
    s.ok(&["repo", "create", "r"]);
    let big = pseudo_random(5_000_000, 1);
    s.write("src/big.bin", &big);
    s.write("src/a/small.txt", b"small");
    s.write("src/a/b/empty.txt", b"");
    std::fs::create_dir_all(s.path("src/emptydir")).unwrap();
    std::os::unix::fs::symlink("a/small.txt", s.path("src/link")).unwrap();
    std::fs::set_permissions(
        s.path("src/a/small.txt"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let src = s.path("src");
    let sum = s.json(&["put", src.to_str().unwrap(), "r/main/data"]);
    assert_eq!(sum["files"], 3);
    assert!(
        sum["new_chunks"].as_u64().unwrap() >= 2,
        "5 MB is chunked: {sum}"
    );
    s.ok(&["commit", "r/main", "-m", "load"]);
    let out = s.path("out");
    s.ok(&["get", "r/main/data", out.to_str().unwrap()]);
    assert_eq!(tree_files(&src), tree_files(&out));
    let mode = std::fs::metadata(out.join("a/small.txt"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o755);
    // Same bytes under another name: no new chunks.
    let again = s.json(&[
        "put",
        s.path("src/big.bin").to_str().unwrap(),
        "r/main/copy.bin",
    ]);
    assert_eq!(again["new_chunks"], 0);
    let ls = s.json(&["ls", "r/main/data"]);
    let names: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "big.bin", "emptydir", "link"]);
    // rm of a directory needs -r.
    s.fails(&["rm", "r/main/data/a"]);
    s.ok(&["rm", "-r", "r/main/data/a"]);
    s.fails(&["cat", "r/main/data/a/small.txt"]);
}

#[test]
fn bad_input_gets_one_line_errors_and_changes_nothing() {
    let s = Scratch::new();
    s.ok(&["repo", "create", "r"]);
    let f = s.write("f", b"x");
    let before = s.head("r/main");
    s.fails(&["repo", "create", "bad/name"]);
    s.fails(&["repo", "create", "-x"]);
    s.fails(&["repo", "create", "r"]);
    s.fails(&["branch", "create", "r/a b"]);
    s.fails(&["branch", "create", "r/dev", "--from", "nosuch"]);
    s.fails(&["cat", "r/nosuchbranch/f"]);
    s.fails(&["cat", "nosuchrepo/main/f"]);
    s.fails(&["put", f.to_str().unwrap(), "r/main/../etc"]);
    s.fails(&["put", "/nonexistent/file", "r/main/x"]);
    s.fails(&["commit", "r/main", "-m", "nothing"]);
    s.fails(&["commit", "r/main", "-m", "x", "--meta", "novalue"]);
    s.fails(&["log", "r/main~5"]);
    s.fails(&["cat", "r/abcdef00/f"]);
    s.fails(&["show", "r/main~x"]);
    assert_eq!(s.head("r/main"), before);
    assert!(s.staged("r/main").is_empty());
    // A lake that does not exist.
    let out = std::process::Command::new(TARN)
        .args([
            "repo",
            "list",
            "--lake",
            &format!("file://{}/none", s.dir.path().display()),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tarn init"));
}

#[test]
fn reset_one_path_and_log_path() {
    let s = Scratch::new();
    s.ok(&["repo", "create", "r"]);
    let a = s.write("a", b"a1");
    let b = s.write("b", b"b1");
    s.ok(&["put", a.to_str().unwrap(), "r/main/a.txt"]);
    s.ok(&["put", b.to_str().unwrap(), "r/main/b.txt"]);
    s.ok(&["commit", "r/main", "-m", "both"]);
    let a2 = s.write("a2", b"a2");
    s.ok(&["put", a2.to_str().unwrap(), "r/main/a.txt"]);
    s.ok(&["commit", "r/main", "-m", "edit a"]);
    let b2 = s.write("b2", b"b2");
    s.ok(&["put", b2.to_str().unwrap(), "r/main/b.txt"]);
    s.ok(&["commit", "r/main", "-m", "edit b"]);
    let msgs = s.messages(&["log", "r/main", "--path", "a.txt"]);
    assert_eq!(msgs, ["edit a", "both"]);
    s.ok(&["put", a.to_str().unwrap(), "r/main/a.txt"]);
    s.ok(&["put", a.to_str().unwrap(), "r/main/new.txt"]);
    s.ok(&["reset", "r/main", "--path", "a.txt"]);
    let st = s.json(&["status", "r/main"]);
    let paths: Vec<&str> = st["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["new.txt"]);
    assert_eq!(s.ok(&["cat", "r/main/a.txt"]), "a2");
    assert_eq!(
        s.json(&["log", "r/main", "-n", "2"])
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

/// Several processes stage files while others commit, on one local lake:
/// every staged file ends up committed, none lost.
#[test]
fn concurrent_processes_lose_no_staged_file() {
    let s = Scratch::new();
    s.ok(&["repo", "create", "r"]);
    let f = s.write("f", b"payload");
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let args: Vec<String> = (0..12)
                .map(|i| format!("'{}' put '{}' r/main/w{w}/f{i}", TARN, f.display()))
                .collect();
            s.spawn_sh(&args.join(" && "))
        })
        .collect();
    let committers: Vec<_> = (0..2)
        .map(|_| {
            let cmds: Vec<String> = (0..8)
                .map(|_| format!("'{}' commit r/main -m c >/dev/null 2>&1; true", TARN))
                .collect();
            s.spawn_sh(&cmds.join("; "))
        })
        .collect();
    for mut c in writers {
        assert!(c.wait().unwrap().success(), "a writer failed");
    }
    for mut c in committers {
        c.wait().unwrap();
    }
    let _ = s.run(&["commit", "r/main", "-m", "final"]);
    let files = s.count_files("r/main~0");
    assert_eq!(files, 36);
    assert!(s.staged("r/main").is_empty());
}
