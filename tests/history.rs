//! Diff, merge, revert, cherry-pick and merge-base through the real binary.

mod common;
use common::*;

fn put(s: &Scratch, name: &str, data: &str, dest: &str) {
    let f = s.write(name, data.as_bytes());
    s.ok(&["put", f.to_str().unwrap(), dest]);
}

#[test]
fn diff_merge_conflicts_revert_cherry_pick() {
    let s = Scratch::new();
    s.ok(&["repo", "create", "r"]);
    put(&s, "a", "a0", "r/main/a.txt");
    put(&s, "b", "b0", "r/main/b.txt");
    put(&s, "c", "c0", "r/main/d/c.txt");
    s.ok(&["commit", "r/main", "-m", "base"]);
    s.ok(&["branch", "create", "r/dev", "--from", "main"]);
    put(&s, "a1", "a-dev", "r/dev/a.txt");
    s.ok(&["commit", "r/dev", "-m", "dev edits a"]);
    put(&s, "b1", "b-main", "r/main/b.txt");
    s.ok(&["commit", "r/main", "-m", "main edits b"]);

    // diff of two refs, of staged changes, and under a path
    let d = s.json(&["diff", "r/main", "r/dev"]);
    let paths: Vec<&str> = d["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["a.txt", "b.txt"]);
    assert_eq!(d["changes"][0]["kind"], "modified");
    let d = s.json(&["diff", "r/main", "dev", "--path", "b.txt"]);
    assert_eq!(d["changes"].as_array().unwrap().len(), 1);
    put(&s, "n", "new", "r/dev/new.txt");
    let d = s.json(&["diff", "r/dev"]);
    assert_eq!(d["changes"][0]["path"], "new.txt");
    assert_eq!(d["changes"][0]["kind"], "added");
    s.ok(&["reset", "r/dev"]);

    let base = s.ok(&["merge-base", "r/main", "r/dev"]);
    assert_eq!(base.trim(), s.head("r/main~1"));

    s.ok(&["merge", "r/dev", "r/main", "-m", "merge dev"]);
    assert_eq!(s.ok(&["cat", "r/main/a.txt"]), "a-dev");
    assert_eq!(s.ok(&["cat", "r/main/b.txt"]), "b-main");
    assert_eq!(
        s.json(&["show", "r/main"])["commit"]["parents"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let again = s.json(&["merge", "r/dev", "r/main"]);
    assert_eq!(again["outcome"], "up-to-date");

    // Conflicts: listed (text and JSON), nothing changes.
    put(&s, "c1", "c-dev", "r/dev/d/c.txt");
    s.ok(&["commit", "r/dev", "-m", "dev c"]);
    put(&s, "c2", "c-main", "r/main/d/c.txt");
    s.ok(&["commit", "r/main", "-m", "main c"]);
    let head = s.head("r/main");
    let err = s.fails_with(3, &["merge", "r/dev", "r/main"]);
    assert!(err.contains("d/c.txt"), "{err}");
    let out = s.run(&["merge", "r/dev", "r/main", "--json"]);
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["conflicts"], serde_json::json!(["d/c.txt"]));
    assert_eq!(s.head("r/main"), head);
    s.fails(&["merge", "r/dev", "r/main", "--strategy", "bogus"]);
    s.ok(&["merge", "r/dev", "r/main", "--strategy", "source-wins"]);
    assert_eq!(s.ok(&["cat", "r/main/d/c.txt"]), "c-dev");

    // revert and cherry-pick
    put(&s, "z", "z1", "r/main/z.txt");
    s.ok(&["commit", "r/main", "-m", "add z"]);
    let z = s.head("r/main");
    s.ok(&["revert", "r/main", &z]);
    s.fails(&["cat", "r/main/z.txt"]);
    s.ok(&["cherry-pick", &z[..10], "r/dev"]);
    assert_eq!(s.ok(&["cat", "r/dev/z.txt"]), "z1");
    let merge_commit = s.head("r/main~3");
    s.fails(&["revert", "r/main", &merge_commit]);

    // log --path follows the path through the merge
    let msgs = s.messages(&["log", "r/main", "--path", "a.txt"]);
    assert_eq!(msgs, ["dev edits a", "base"]);

    // fast-forward
    s.ok(&["branch", "create", "r/ff", "--from", "main"]);
    put(&s, "f", "f", "r/ff/f.txt");
    s.ok(&["commit", "r/ff", "-m", "ff"]);
    let ff = s.json(&["merge", "r/ff", "r/main", "--ff"]);
    assert_eq!(ff["outcome"], "fast-forward");
    assert_eq!(s.head("r/main"), s.head("r/ff"));
}
