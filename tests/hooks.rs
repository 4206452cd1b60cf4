//! Data CI/CD through the real binary: checks from `_tarn/hooks/` on
//! commits, merges and ref creation (exec and webhook, against a real HTTP
//! receiver on 127.0.0.1), the run log, rehearsals, protected branches,
//! read-only repositories, the mount's control file, and the orchestration
//! example script.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A real HTTP server on 127.0.0.1 that records each POST body and answers
/// with `status`.
struct Receiver {
    url: String,
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Receiver {
    fn start(status: u16) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/alerts", listener.local_addr().unwrap());
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let seen = bodies.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; len];
                if reader.read_exact(&mut body).is_ok() {
                    if let Ok(v) = serde_json::from_slice(&body) {
                        seen.lock().unwrap().push(v);
                    }
                }
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                );
            }
        });
        Receiver { url, bodies }
    }

    fn bodies(&self) -> Vec<serde_json::Value> {
        self.bodies.lock().unwrap().clone()
    }
}

/// A repo `sales` whose main carries `hooks` (name → TOML) and a schema
/// check script, committed.
fn repo_with_hooks(s: &Scratch, hooks: &[(&str, &str)]) {
    s.ok(&["repo", "create", "sales"]);
    for (name, text) in hooks {
        let f = s.write(&format!("setup/_tarn/hooks/{name}.toml"), text.as_bytes());
        s.ok(&[
            "put",
            f.to_str().unwrap(),
            &format!("sales/main/_tarn/hooks/{name}.toml"),
        ]);
    }
    let check = s.write(
        "setup/schema.sh",
        b"for f in raw/*.csv; do [ -e \"$f\" ] || continue; head -1 \"$f\" | grep -qx 'day,amount' || { echo \"bad header in $f\"; exit 1; }; done\n",
    );
    s.ok(&[
        "put",
        check.to_str().unwrap(),
        "sales/main/checks/schema.sh",
    ]);
    s.ok(&["commit", "sales/main", "-m", "checks"]);
}

fn stage_csv(s: &Scratch, branch: &str, name: &str, text: &str) {
    let f = s.write(&format!("data/{branch}-{name}"), text.as_bytes());
    s.ok(&[
        "put",
        f.to_str().unwrap(),
        &format!("sales/{branch}/raw/{name}"),
    ]);
}

fn quality_hook(url: &str) -> String {
    format!(
        r#"on = ["pre-merge"]
branches = ["main"]
[[check]]
name = "schema"
exec = "sh checks/schema.sh"
timeout = "60s"
[[check]]
name = "alert"
webhook = "{url}"
if = "failure"
"#
    )
}

#[test]
fn pre_merge_checks_guard_main() {
    let s = Scratch::new();
    let alerts = Receiver::start(200);
    repo_with_hooks(&s, &[("quality", &quality_hook(&alerts.url))]);
    s.ok(&["branch", "create", "sales/ingest"]);
    stage_csv(&s, "ingest", "d.csv", "wrong,header\n1,2\n");
    s.ok(&["commit", "sales/ingest", "-m", "bad"]);
    let main_before = s.head("sales/main");

    // Refused with the check's output, exit 4, main untouched.
    let err = s.fails_with(4, &["merge", "sales/ingest", "sales/main"]);
    assert!(err.contains("bad header in raw/d.csv"), "{err}");
    assert!(err.contains("quality/schema"), "{err}");
    assert_eq!(s.head("sales/main"), main_before);

    // --json names the run and the kept candidate, which is readable.
    let out = s.run(&["merge", "sales/ingest", "sales/main", "--json"]);
    assert_eq!(out.status.code(), Some(4));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["check"], "quality/schema");
    let candidate = v["candidate"].as_str().unwrap();
    assert_eq!(
        s.ok(&["cat", &format!("sales/{candidate}/raw/d.csv")]),
        "wrong,header\n1,2\n"
    );

    // The failure alert reached the receiver, with the failed check.
    wait_until("two alerts", Duration::from_secs(10), || {
        alerts.bodies().len() == 2
    });
    let alert = &alerts.bodies()[0];
    assert_eq!(alert["event"], "pre-merge");
    assert_eq!(alert["branch"], "main");
    assert_eq!(alert["source"], "ingest");
    assert_eq!(alert["checks"][0]["name"], "schema");
    assert_eq!(alert["checks"][0]["status"], "failed");

    // The run log has both runs, newest first, with status and output.
    let log = s.json(&["hooks", "log", "sales"]);
    let runs = log.as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["id"], v["run"]);
    assert_eq!(runs[0]["status"], "failed");
    assert_eq!(runs[0]["event"], "pre-merge");
    assert_eq!(runs[0]["checks"][0]["code"], 1);
    assert_eq!(runs[0]["checks"][1]["status"], "passed");
    let one = s.ok(&["hooks", "log", "sales", "--run", v["run"].as_str().unwrap()]);
    assert!(one.contains("bad header in raw/d.csv"), "{one}");

    // A feature branch cannot weaken the checks that guard main: they come
    // from main's head, not from the merged-in tree.
    s.ok(&["branch", "create", "sales/sneaky"]);
    s.ok(&["rm", "sales/sneaky/_tarn/hooks/quality.toml"]);
    stage_csv(&s, "sneaky", "e.csv", "x,y\n");
    s.ok(&["commit", "sales/sneaky", "-m", "sneaky"]);
    s.fails_with(4, &["merge", "sales/sneaky", "sales/main"]);
    assert_eq!(s.head("sales/main"), main_before);

    // Fixed data merges; the alert (if = failure) is skipped.
    stage_csv(&s, "ingest", "d.csv", "day,amount\nmon,3\n");
    s.ok(&["commit", "sales/ingest", "-m", "good"]);
    s.ok(&["merge", "sales/ingest", "sales/main"]);
    assert_eq!(
        s.ok(&["cat", "sales/main/raw/d.csv"]),
        "day,amount\nmon,3\n"
    );
    let last = &s.json(&["hooks", "log", "sales", "-n", "1"])[0];
    assert_eq!(last["status"], "passed");
    assert_eq!(last["checks"][1]["status"], "skipped");
    assert_eq!(alerts.bodies().len(), 3, "one more alert, for sneaky");
}

#[test]
fn rehearsals_publish_nothing() {
    let s = Scratch::new();
    let alerts = Receiver::start(200);
    repo_with_hooks(&s, &[("quality", &quality_hook(&alerts.url))]);
    s.ok(&["branch", "create", "sales/ingest"]);
    stage_csv(&s, "ingest", "d.csv", "wrong\n");
    s.ok(&["commit", "sales/ingest", "-m", "bad"]);
    let main_before = s.head("sales/main");
    let out = s.run(&[
        "hooks",
        "run",
        "sales/ingest",
        "--event",
        "pre-merge",
        "--target",
        "main",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(4));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["status"], "failed");
    assert_eq!(s.head("sales/main"), main_before);
    wait_until("the alert", Duration::from_secs(10), || {
        alerts.bodies().len() == 1
    });
    assert_eq!(alerts.bodies()[0]["dry_run"], true);
    // No hook reacts to pre-commit on this branch: nothing runs, exit 0.
    let none = s.json(&["hooks", "run", "sales/ingest", "--event", "pre-commit"]);
    assert_eq!(none["status"], "none");
    s.fails_with(1, &["hooks", "run", "sales/ingest", "--event", "pre-push"]);
    s.fails_with(1, &["hooks", "run", "sales/ingest", "--event", "pre-merge"]);
}

#[test]
fn commit_and_ref_creation_checks() {
    let s = Scratch::new();
    repo_with_hooks(
        &s,
        &[
            (
                "commits",
                r#"on = ["pre-commit"]
branches = ["ingest-*"]
[[check]]
name = "schema"
exec = "sh checks/schema.sh"
"#,
            ),
            (
                "naming",
                r#"on = ["pre-create-branch", "pre-create-tag"]
[[check]]
name = "names"
exec = "case $TARN_BRANCH in ingest-*|v*) exit 0;; *) echo \"name $TARN_BRANCH from $TARN_SOURCE_REF not allowed\"; exit 1;; esac"
"#,
            ),
            (
                "audit",
                r#"on = ["post-commit"]
[[check]]
name = "audit"
exec = "echo audit failed for $TARN_COMMIT; exit 7"
"#,
            ),
        ],
    );
    // Ref creation: names are policy, checked from the default branch.
    let err = s.fails_with(4, &["branch", "create", "sales/scratch"]);
    assert!(err.contains("name scratch from main not allowed"), "{err}");
    s.fails(&["cat", "sales/scratch/checks/schema.sh"]);
    s.ok(&["branch", "create", "sales/ingest-1"]);
    s.fails_with(4, &["tag", "create", "sales/nightly", "main"]);
    s.ok(&["tag", "create", "sales/v1", "main"]);

    // Pre-commit: refused, head unchanged, the change stays staged.
    let head = s.head("sales/ingest-1");
    stage_csv(&s, "ingest-1", "a.csv", "nope\n");
    let err = s.fails_with(4, &["commit", "sales/ingest-1", "-m", "bad"]);
    assert!(err.contains("bad header in raw/a.csv"), "{err}");
    assert_eq!(s.head("sales/ingest-1"), head);
    assert_eq!(s.staged("sales/ingest-1"), ["raw/a.csv"]);

    // Post-commit failures are reported and logged, never undo the commit.
    stage_csv(&s, "ingest-1", "a.csv", "day,amount\n");
    let out = s.run(&["commit", "sales/ingest-1", "-m", "good"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: post-commit check audit/audit failed"),
        "{err}"
    );
    assert_ne!(s.head("sales/ingest-1"), head);
    assert!(s.staged("sales/ingest-1").is_empty());
    let last = &s.json(&["hooks", "log", "sales", "-n", "1"])[0];
    assert_eq!(last["event"], "post-commit");
    assert_eq!(last["checks"][0]["code"], 7);
    assert_eq!(last["commit"], s.head("sales/ingest-1"));
}

#[test]
fn exec_checks_read_a_read_only_snapshot_within_a_time_limit() {
    let s = Scratch::new();
    repo_with_hooks(
        &s,
        &[(
            "probe",
            r#"on = ["pre-merge"]
[[check]]
name = "env"
exec = "cat raw/a.csv; echo commit=$TARN_COMMIT event=$TARN_EVENT repo=$TARN_REPO target=$TARN_BRANCH source=$TARN_SOURCE_REF; [ \"$PWD\" = \"$TARN_SNAPSHOT\" ] && echo in-snapshot; touch raw/new 2>/dev/null && echo WRITABLE; exit 0"
[[check]]
name = "slow"
exec = "sleep 60"
timeout = "300ms"
"#,
        )],
    );
    s.ok(&["branch", "create", "sales/dev"]);
    stage_csv(&s, "dev", "a.csv", "day,amount\n");
    s.ok(&["commit", "sales/dev", "-m", "a"]);
    let started = std::time::Instant::now();
    let v = {
        let out = s.run(&["merge", "sales/dev", "sales/main", "--json"]);
        assert_eq!(out.status.code(), Some(4));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(v["check"], "probe/slow");
    let run = &s.json(&["hooks", "log", "sales", "-n", "1"])[0];
    let out = run["checks"][0]["output"].as_str().unwrap();
    let candidate = run["commit"].as_str().unwrap();
    assert!(out.starts_with("day,amount\n"), "{out}");
    assert!(
        out.contains(&format!(
            "commit={candidate} event=pre-merge repo=sales target=main source=dev"
        )),
        "{out}"
    );
    assert!(out.contains("in-snapshot"), "{out}");
    assert!(!out.contains("WRITABLE"), "{out}");
    assert!(
        run["checks"][1]["output"]
            .as_str()
            .unwrap()
            .contains("time limit"),
        "{run}"
    );
}

#[test]
fn broken_hook_files_fail_closed_until_replaced() {
    let s = Scratch::new();
    repo_with_hooks(
        &s,
        &[("typo", "on = [\"pre-merge\"]\nbranch = [\"main\"]\n")],
    );
    // Events the broken file does not name go ahead.
    s.ok(&["branch", "create", "sales/dev"]);
    stage_csv(&s, "dev", "a.csv", "day,amount\n");
    s.ok(&["commit", "sales/dev", "-m", "a"]);
    let err = s.fails_with(4, &["merge", "sales/dev", "sales/main"]);
    assert!(err.contains("_tarn/hooks/typo.toml"), "{err}");
    assert!(err.contains("unknown field"), "{err}");
    // A change that replaces the broken file is the fix, and merges.
    let fixed = s.write(
        "typo.toml",
        b"on = [\"pre-merge\"]\nbranches = [\"main\"]\n",
    );
    s.ok(&[
        "put",
        fixed.to_str().unwrap(),
        "sales/dev/_tarn/hooks/typo.toml",
    ]);
    s.ok(&["commit", "sales/dev", "-m", "fix hooks"]);
    s.ok(&["merge", "sales/dev", "sales/main"]);
    // Unreadable TOML fails every pre-event, except the one that fixes it.
    let garbage = s.write("bad.toml", b"on = [");
    s.ok(&[
        "put",
        garbage.to_str().unwrap(),
        "sales/main/_tarn/hooks/typo.toml",
    ]);
    s.ok(&["commit", "sales/main", "-m", "oops"]);
    s.fails_with(4, &["branch", "create", "sales/other"]);
    s.ok(&[
        "put",
        fixed.to_str().unwrap(),
        "sales/main/_tarn/hooks/typo.toml",
    ]);
    s.ok(&["commit", "sales/main", "-m", "fix again"]);
    s.ok(&["branch", "create", "sales/other"]);
}

#[test]
fn protected_branches_and_read_only_repositories() {
    let s = Scratch::new();
    s.ok(&["repo", "create", "sales"]);
    s.ok(&["branch", "create", "sales/dev"]);
    stage_csv(&s, "dev", "a.csv", "day,amount\n");
    s.ok(&["commit", "sales/dev", "-m", "a"]);
    let first = s.head("sales/dev");
    s.ok(&["branch", "protect", "sales/main"]);
    let f = s.write("x.csv", b"x");
    let err = s.fails_with(5, &["put", f.to_str().unwrap(), "sales/main/x.csv"]);
    assert!(err.contains("protected"), "{err}");
    s.fails_with(5, &["commit", "sales/main", "-m", "x", "--allow-empty"]);
    s.fails_with(5, &["reset", "sales/main"]);
    s.fails_with(5, &["cherry-pick", &first, "sales/main"]);
    s.fails_with(5, &["branch", "delete", "sales/main"]);
    // Merges are how a protected branch changes.
    s.ok(&["merge", "sales/dev", "sales/main"]);
    assert_eq!(s.ok(&["cat", "sales/main/raw/a.csv"]), "day,amount\n");
    s.fails_with(5, &["rm", "sales/main/raw/a.csv"]);
    let main = s.head("sales/main");
    s.fails_with(5, &["revert", "sales/main", &main, "-m", "1"]);
    s.ok(&["branch", "unprotect", "sales/main"]);
    s.ok(&["revert", "sales/main", &main, "-m", "1"]);

    // A read-only repository refuses every change, merges included.
    s.ok(&["repo", "read-only", "sales"]);
    s.fails_with(5, &["put", f.to_str().unwrap(), "sales/dev/x.csv"]);
    s.fails_with(5, &["merge", "sales/main", "sales/dev"]);
    s.fails_with(5, &["branch", "create", "sales/other"]);
    s.fails_with(5, &["tag", "create", "sales/v1"]);
    assert_eq!(s.ok(&["cat", "sales/dev/raw/a.csv"]), "day,amount\n");
    s.ok(&["repo", "read-write", "sales"]);
    s.ok(&["tag", "create", "sales/v1"]);
    s.fails(&["branch", "protect", "sales/nosuch"]);
}

#[test]
fn mount_honours_protection_and_runs_checks_on_control_merges() {
    if !fuse_available() {
        return;
    }
    let s = Scratch::new();
    let alerts = Receiver::start(200);
    repo_with_hooks(&s, &[("quality", &quality_hook(&alerts.url))]);
    s.ok(&["branch", "create", "sales/ingest"]);
    s.ok(&["branch", "protect", "sales/main"]);
    let m = Mount::new(&s, "mnt", &["--metadata-ttl", "0s"]);
    let main = m.p("sales/main");
    let ingest = m.p("sales/ingest");

    let erofs = std::fs::write(main.join("x.csv"), "x").unwrap_err();
    assert_eq!(erofs.raw_os_error(), Some(libc::EROFS));
    assert_eq!(
        std::fs::create_dir(main.join("d"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );
    let mode = std::fs::metadata(&main).unwrap().permissions();
    assert!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o222 == 0);

    // Bad data written through the mount, committed through the control file.
    std::fs::create_dir_all(ingest.join("raw")).unwrap();
    std::fs::write(ingest.join("raw/d.csv"), "wrong\n").unwrap();
    ctl(&ingest, "commit -m bad").unwrap();

    // A merge into the protected branch runs its checks: EPERM, and the
    // result says which check failed and what it printed.
    let err = ctl(&main, "merge ingest").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(main.join(".tarn/result")).unwrap()).unwrap();
    assert_eq!(result["ok"], false);
    assert_eq!(result["check"], "quality/schema");
    assert!(
        result["error"]
            .as_str()
            .unwrap()
            .contains("bad header in raw/d.csv"),
        "{result}"
    );
    // Direct commits on the protected branch are refused with EROFS.
    assert_eq!(
        ctl(&main, "commit -m x").unwrap_err().raw_os_error(),
        Some(libc::EROFS)
    );

    std::fs::write(ingest.join("raw/d.csv"), "day,amount\nmon,1\n").unwrap();
    ctl(&ingest, "commit -m good").unwrap();
    ctl(&main, "merge ingest").unwrap();
    wait_until("the merge in the view", Duration::from_secs(10), || {
        std::fs::read_to_string(main.join("raw/d.csv"))
            .ok()
            .as_deref()
            == Some("day,amount\nmon,1\n")
    });
}

#[test]
fn orchestration_example_runs() {
    let s = Scratch::new();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/examples/dag.sh");
    let run = |id: &str, bad: Option<&str>| {
        let mut c = std::process::Command::new("bash");
        c.arg(&script)
            .arg(id)
            .env("TARN", TARN)
            .env("TARN_LAKE", &s.lake)
            .env_remove("BAD_JOB");
        if let Some(job) = bad {
            c.env("BAD_JOB", job);
        }
        c.output().unwrap()
    };
    let ok = run("r1", None);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let main = s.head("sales/main");
    assert_eq!(
        s.messages(&["log", "sales/main", "-n", "1"]),
        ["DAG run r1"]
    );
    assert_eq!(s.count_files("sales/main/raw"), 2);

    let bad = run("r2", Some("customers"));
    assert_eq!(bad.status.code(), Some(4));
    let out = String::from_utf8_lossy(&bad.stdout);
    assert!(out.contains("refused by checks"), "{out}");
    assert!(out.contains("bad header in raw/customers/r2.csv"), "{out}");
    assert_eq!(s.head("sales/main"), main, "main untouched");
    // The DAG branch kept what passed, for inspection.
    assert_eq!(s.count_files("sales/dag-r2/raw"), 3);
}
