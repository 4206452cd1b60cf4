//! The core workflow and multi-process commits against a real S3-protocol
//! server (started by scripts/test.sh, which sets TARN_TEST_S3 and the AWS_*
//! environment). Outside CI, without a server, these tests say so and pass;
//! in CI a missing server is a failure.

mod common;
use common::*;

#[test]
fn s3_lake_workflow() {
    let Some(lake) = s3_lake() else { return };
    let s = Scratch::with_lake(lake);
    s.ok(&["repo", "create", "sales"]);
    let big = pseudo_random(3_000_000, 5);
    let f = s.write("big.bin", &big);
    s.ok(&["put", f.to_str().unwrap(), "sales/main/data/big.bin"]);
    s.ok(&["commit", "sales/main", "-m", "load"]);
    s.ok(&["branch", "create", "sales/dev"]);
    s.ok(&["tag", "create", "sales/v1", "main"]);
    assert_eq!(s.got("sales/v1/data/big.bin"), big);
    s.ok(&["rm", "sales/dev/data/big.bin"]);
    s.ok(&["commit", "sales/dev", "-m", "rm"]);
    s.fails(&["cat", "sales/dev/data/big.bin"]);
    let old = s.run(&["cat", "sales/dev~1/data/big.bin"]);
    assert!(old.status.success());
    assert_eq!(old.stdout, big);
    let msgs = s.messages(&["log", "sales/dev"]);
    assert_eq!(msgs, ["rm", "load", "repository created"]);
}

/// Writers and committers in separate processes coordinate only through
/// S3 conditional puts: every staged file is committed exactly once.
#[test]
fn s3_concurrent_processes_lose_nothing() {
    let Some(lake) = s3_lake() else { return };
    let s = Scratch::with_lake(lake);
    s.ok(&["repo", "create", "r"]);
    let f = s.write("f", b"payload");
    let spawn = |script: String| s.spawn_sh(&script);
    let writers: Vec<_> = (0..2)
        .map(|w| {
            spawn(
                (0..8)
                    .map(|i| format!("'{TARN}' put '{}' r/main/w{w}/f{i}", f.display()))
                    .collect::<Vec<_>>()
                    .join(" && "),
            )
        })
        .collect();
    let committers: Vec<_> = (0..2)
        .map(|_| {
            spawn(
                (0..5)
                    .map(|_| format!("'{TARN}' commit r/main -m c >/dev/null 2>&1; true"))
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })
        .collect();
    for mut w in writers {
        assert!(w.wait().unwrap().success());
    }
    for mut c in committers {
        c.wait().unwrap();
    }
    let _ = s.run(&["commit", "r/main", "-m", "final"]);
    let files = s.count_files("r/main~0");
    assert_eq!(files, 16);
    // History is a chain: every commit's parent is the previous one.
    let log = s.json(&["log", "r/main", "-n", "1000"]);
    for pair in log.as_array().unwrap().windows(2) {
        assert_eq!(pair[0]["parents"][0], pair[1]["id"]);
    }
}

#[test]
fn s3_export_and_import_by_reference() {
    let Some(bucket_prefix) = s3_lake() else {
        return;
    };
    let s = Scratch::new();
    s.ok(&["repo", "create", "r"]);
    // Over one multipart part (16 MiB), to go up in parts.
    let big = pseudo_random(20_000_000, 7);
    s.write("d/big.bin", &big);
    s.write("d/a/x.csv", b"x\n");
    s.ok(&["put", s.path("d").to_str().unwrap(), "r/main/d"]);
    s.ok(&["commit", "r/main", "-m", "d"]);
    let prefix = format!("{bucket_prefix}/export/");
    let v = s.json(&["export", "r/main/d", &prefix]);
    assert_eq!(v["files"], 2);
    let v = s.json(&["export", "r/main/d", &prefix]);
    assert_eq!(v["unchanged"], 2, "resumed: nothing to copy again");

    // Those objects, imported back by reference, read in place.
    let v = s.json(&["import", &prefix, "r/main/back", "-m", "back"]);
    assert_eq!(v["objects"], 2);
    assert_eq!(s.got("r/main/back/big.bin"), big);
    assert_eq!(s.ok(&["cat", "r/main/back/a/x.csv"]), "x\n");

    // Replace the object at the source: reads fail rather than serve it.
    s.write("d/a/x.csv", b"changed\n");
    s.ok(&[
        "put",
        s.path("d/a/x.csv").to_str().unwrap(),
        "r/main/d/a/x.csv",
    ]);
    s.ok(&["commit", "r/main", "-m", "x changed"]);
    s.ok(&["export", "r/main/d", &prefix]);
    let err = s.fails(&["cat", "r/main/back/a/x.csv"]);
    assert!(err.contains("changed since it was imported"), "{err}");
}

/// Two mount daemons (separate processes, separate caches) and the CLI on
/// one S3 lake: each sees the other's closed files within the metadata
/// TTL; commits and merges from all three at once put every closed file
/// in exactly one commit; the lake passes fsck.
#[test]
fn s3_two_daemons_and_the_cli_share_one_lake() {
    let Some(lake) = s3_lake() else { return };
    if !fuse_available() {
        return;
    }
    let s = Scratch::with_lake(lake);
    s.ok(&["repo", "create", "shared"]);
    s.ok(&["branch", "create", "shared/side"]);
    let ttl = ["--metadata-ttl", "200ms"];
    let a = Mount::new(&s, "a", &ttl);
    let b = Mount::new(&s, "b", &ttl);
    std::fs::write(a.p("shared/main/from-a.txt"), "a\n").unwrap();
    wait_until(
        "B sees A's file",
        std::time::Duration::from_secs(10),
        || {
            std::fs::read_to_string(b.p("shared/main/from-a.txt"))
                .ok()
                .as_deref()
                == Some("a\n")
        },
    );
    std::fs::write(b.p("shared/main/from-b.txt"), "b\n").unwrap();
    wait_until(
        "A sees B's file",
        std::time::Duration::from_secs(10),
        || {
            std::fs::read_to_string(a.p("shared/main/from-b.txt"))
                .ok()
                .as_deref()
                == Some("b\n")
        },
    );

    // Writers on both daemons, committers through both control files and
    // the CLI, a merge from the side branch, all at once.
    let mut threads = Vec::new();
    for (m, name) in [(&a, "a"), (&b, "b")] {
        let dir = m.p("shared/main");
        threads.push(std::thread::spawn(move || {
            for i in 0..12 {
                std::fs::write(dir.join(format!("{name}-{i}.txt")), format!("{name}{i}\n"))
                    .unwrap();
            }
        }));
        let branch = m.p("shared/main");
        threads.push(std::thread::spawn(move || {
            for i in 0..4 {
                // ENODATA (nothing to commit) and EAGAIN are fine here.
                let _ = ctl(&branch, &format!("commit -m ctl-{name}-{i}"));
            }
        }));
    }
    let side = s.write("side.txt", b"side\n");
    s.ok(&["put", side.to_str().unwrap(), "shared/side/side.txt"]);
    s.ok(&["commit", "shared/side", "-m", "side"]);
    let cli = s.spawn_sh(&format!(
        "for i in 1 2 3; do '{TARN}' commit shared/main -m cli-$i >/dev/null 2>&1; done; '{TARN}' merge shared/side shared/main -m merge-side >/dev/null"
    ));
    for t in threads {
        t.join().unwrap();
    }
    let mut cli = cli;
    assert!(cli.wait().unwrap().success(), "the merge failed");
    let _ = s.run(&["commit", "shared/main", "-m", "final"]);
    assert!(s.staged("shared/main").is_empty());

    // Every file in exactly one commit of main's history.
    let mut expected: Vec<String> =
        vec!["from-a.txt".into(), "from-b.txt".into(), "side.txt".into()];
    for name in ["a", "b"] {
        expected.extend((0..12).map(|i| format!("{name}-{i}.txt")));
    }
    for path in &expected {
        let log = s.json(&["log", "shared/main", "--path", path, "-n", "1000"]);
        assert_eq!(log.as_array().unwrap().len(), 1, "{path}: {log}");
        assert!(s
            .ok(&["cat", &format!("shared/main/{path}")])
            .ends_with('\n'));
    }
    assert_eq!(s.count_files("shared/main~0"), expected.len());
    assert_eq!(s.json(&["fsck"])["problems"], serde_json::json!([]));
}
