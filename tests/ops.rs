//! Operations through the real binary: corrupt objects are detected and
//! never served, `kill -9` in the middle of a large copy and of a commit
//! loses no acknowledged write and leaves a lake that passes `tarn fsck`,
//! and `tarn doctor` says what a store can and cannot do.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// The file of a content-addressed object in a local lake.
fn object(s: &Scratch, kind: &str, hash: &str) -> PathBuf {
    s.dir
        .path()
        .join(format!("lake/{kind}/{}/{hash}", &hash[..2]))
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    tree_files(dir)
        .into_iter()
        .filter(|(p, _)| !p.ends_with('/'))
        .map(|(p, _)| dir.join(p))
        .collect()
}

fn flip_byte(p: &Path) {
    let mut b = std::fs::read(p).unwrap();
    let i = b.len() / 2;
    b[i] ^= 0x55;
    std::fs::write(p, b).unwrap();
}

#[test]
fn corrupt_objects_are_detected_never_served() {
    let s = Scratch::new();
    s.ok(&["repo", "create", "r"]);
    let big = pseudo_random(3_000_000, 11);
    s.write("d/big.bin", &big);
    for i in 0..50 {
        s.write(&format!("d/small/{i}.txt"), format!("{i}\n").as_bytes());
    }
    s.ok(&["put", s.path("d").to_str().unwrap(), "r/main/d"]);
    s.ok(&["commit", "r/main", "-m", "data"]);
    let clean = s.json(&["fsck"]);
    assert_eq!(clean["problems"], serde_json::json!([]));
    assert!(clean["chunks_verified"].as_u64().unwrap() >= 1);

    // A flipped byte in a chunk: reads fail, fsck names the chunk and path.
    let chunks = files_under(&s.dir.path().join("lake/chunks"));
    flip_byte(&chunks[0]);
    let err = s.fails(&["cat", "r/main/d/big.bin"]);
    assert!(err.contains("corrupt"), "{err}");
    let out = s.run(&["fsck"]);
    assert_eq!(out.status.code(), Some(1));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("corrupt") && report.contains("/d/big.bin"),
        "{report}"
    );
    if fuse_available() {
        let m = Mount::new(&s, "mnt", &[]);
        let e = std::fs::read(m.p("r/main/d/big.bin")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        // Other files still read.
        assert_eq!(
            std::fs::read_to_string(m.p("r/main/d/small/7.txt")).unwrap(),
            "7\n"
        );
    }
    flip_byte(&chunks[0]);
    assert_eq!(s.json(&["fsck"])["problems"], serde_json::json!([]));

    // A truncated tree node and a commit whose bytes do not match its name.
    let head = s.head("r/main");
    let tree = s.json(&["show", "r/main"])["commit"]["tree"]
        .as_str()
        .unwrap()
        .to_string();
    let node = object(&s, "nodes", &tree);
    let saved = std::fs::read(&node).unwrap();
    std::fs::write(&node, &saved[..saved.len() / 2]).unwrap();
    let err = s.fails(&["ls", "r/main/d"]);
    assert!(err.contains("corrupt"), "{err}");
    let report = s.run(&["fsck", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    let problems = v["problems"].as_array().unwrap();
    assert!(
        problems.iter().any(|p| p
            .as_str()
            .unwrap()
            .contains(&format!("node {}", &tree[..12]))),
        "{problems:?}"
    );
    std::fs::write(&node, &saved).unwrap();
    let commit = s
        .dir
        .path()
        .join(format!("lake/repos/r/commits/{}/{head}", &head[..2]));
    flip_byte(&commit);
    let err = s.fails(&["log", "r/main"]);
    assert!(err.contains("corrupt"), "{err}");
    let out = String::from_utf8(s.run(&["fsck"]).stdout).unwrap();
    assert!(out.contains(&format!("commit {}", &head[..12])), "{out}");
}

#[test]
fn kill_9_mid_copy_and_mid_commit_loses_no_acknowledged_write() {
    if fuse_available() {
        kill_9_scenario(&Scratch::new());
    }
}

#[test]
fn kill_9_on_an_s3_lake_loses_no_acknowledged_write() {
    if let Some(lake) = s3_lake() {
        if fuse_available() {
            kill_9_scenario(&Scratch::with_lake(lake));
        }
    }
}

fn kill_9_scenario(s: &Scratch) {
    s.ok(&["repo", "create", "r"]);
    s.ok(&["branch", "create", "r/dev"]);
    let mut m = Mount::new(s, "mnt", &[]);
    // A copy that records each file whose close() succeeded.
    let acked = s.path("acked");
    let script = format!(
        "i=0; while [ $i -lt 100000 ]; do head -c $((1000 + i * 7919 % 300000)) /dev/urandom >'{dir}'/f$i && echo $i >>'{acked}' || exit 0; i=$((i+1)); done",
        dir = m.p("r/dev").display(),
        acked = acked.display()
    );
    let mut copy = std::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("40 acknowledged files", Duration::from_secs(60), || {
        std::fs::read_to_string(&acked)
            .map(|t| t.lines().count() >= 40)
            .unwrap_or(false)
    });
    m.child.kill().unwrap(); // SIGKILL
    m.child.wait().unwrap();
    let _ = copy.wait();
    drop(m);
    let done: Vec<String> = std::fs::read_to_string(&acked)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    // Every acknowledged file is staged, whole.
    let staged = s.staged("r/dev");
    for i in &done {
        assert!(
            staged.contains(&format!("f{i}")),
            "f{i} acknowledged but lost; staged: {staged:?}"
        );
        let size = s.json(&["ls", &format!("r/dev/f{i}")])[0]["size"]
            .as_u64()
            .unwrap();
        assert_eq!(
            size,
            1000 + i.parse::<u64>().unwrap() * 7919 % 300000,
            "f{i}"
        );
    }
    assert_eq!(s.json(&["fsck"])["problems"], serde_json::json!([]));

    // Kill the committing process at a few points: the lake stays whole and
    // every staged file ends up committed exactly once.
    for delay_ms in [5, 20, 60] {
        let mut c = s
            .cmd(&[
                "commit",
                "r/dev",
                "-m",
                &format!("killed after {delay_ms} ms"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = c.kill();
        let _ = c.wait();
        assert_eq!(
            s.json(&["fsck"])["problems"],
            serde_json::json!([]),
            "after {delay_ms} ms"
        );
    }
    let _ = s.run(&["commit", "r/dev", "-m", "finish"]);
    assert!(s.staged("r/dev").is_empty());
    for i in &done {
        let log = s.json(&["log", "r/dev", "--path", &format!("f{i}")]);
        assert_eq!(log.as_array().unwrap().len(), 1, "f{i} committed once");
    }
    assert_eq!(s.json(&["fsck"])["problems"], serde_json::json!([]));
}

#[test]
fn doctor_says_what_the_store_can_do() {
    let s = Scratch::new();
    let v = s.json(&["doctor"]);
    let checks: Vec<(&str, &str)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["check"].as_str().unwrap(), f["level"].as_str().unwrap()))
        .collect();
    for want in [
        "access",
        "read",
        "create-only puts",
        "compare-and-swap",
        "clock",
        "lake",
    ] {
        assert!(checks.contains(&(want, "ok")), "{want}: {checks:?}");
    }
    // No lake there: one failing line that says what to do.
    let empty = s.path("nolake");
    let out = s
        .cmd(&["doctor"])
        .env("TARN_LAKE", format!("file://{}", empty.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("FAIL lake") && text.contains("tarn init"),
        "{text}"
    );
    let out = s
        .cmd(&["doctor"])
        .env("TARN_LAKE", "ftp://nowhere/x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn fsck_repairs_a_chunk_cache() {
    let s = Scratch::new();
    let cache = s.path("cache/chunks");
    let good = b"good bytes";
    let good_hash = blake3::hash(good).to_hex().to_string();
    let bad_hash = blake3::hash(b"what it should be").to_hex().to_string();
    // The good chunk in a shard directory, as older caches kept them.
    let old = cache.join(&good_hash[..2]).join(&good_hash);
    std::fs::create_dir_all(old.parent().unwrap()).unwrap();
    std::fs::write(&old, good).unwrap();
    std::fs::write(cache.join(&bad_hash), b"flipped").unwrap();
    let v = s.json(&["fsck", "--repair-cache", s.path("cache").to_str().unwrap()]);
    assert_eq!(
        (
            v["cache"]["checked"].as_u64(),
            v["cache"]["removed"].as_u64()
        ),
        (Some(2), Some(1))
    );
    assert!(cache.join(&good_hash).exists(), "kept, moved up");
    assert!(!old.exists());
    assert!(!cache.join(&bad_hash).exists());
}
